"""The command line as a careless user or an attacker meets it: every bad input ends in one line and exit 2, before any
model is loaded where it can be, and leaves nothing behind; a property-based fuzz (hypothesis) of each command's
arguments and input files asserts that no run ends in a traceback."""
import contextlib, io, json, os, shutil, tempfile, time
from pathlib import Path
import pytest, yaml
from hypothesis import HealthCheck, event, given, settings, strategies as st
import layerprune.models
from layerprune.cli import build_parser, main
from layerprune.models import tiny_model, tiny_tokenizer

GOOD = '\n\n'.join(['The quick brown fox jumps over the lazy dog.', 'Layer pruning removes the deeper layers.',
                    'A third short document about nothing at all.'] * 20)


def run(argv):
    "Run `layerprune argv` in this process; return (exit code, stdout, stderr)."
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err): code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def one_line(cmd, err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f'layerprune {cmd}: error: '), err
    assert 'Traceback' not in err
    return lines[0]


def _nb(path):
    import nbformat
    nb = nbformat.v4.new_notebook(metadata={'kernelspec': {'name': 'python3', 'display_name': 'python3', 'language': 'python'}})
    nb.cells = [nbformat.v4.new_code_cell("model_name = 'tiny:llama'\nscale = 2\nout_dir = 'figures'\ncache_dir = 'runs/cache'",
                                          metadata={'tags': ['parameters']})]
    nbformat.write(nb, str(path))


@pytest.fixture(scope='module')
def pool():
    "A folder of good and malformed inputs, copied afresh for every example."
    d = Path(tempfile.mkdtemp(prefix='lp-cli-pool-'))
    (d/'good.txt').write_text(GOOD)
    (d/'good.jsonl').write_text('\n'.join(json.dumps({'text': t}) for t in GOOD.split('\n\n')))
    (d/'empty.txt').write_text('')
    (d/'blank.txt').write_text('\n\n  \n')
    (d/'binary.txt').write_bytes(bytes(range(256)) * 4)
    (d/'latin1.txt').write_bytes('caf\xe9 cr\xe8me'.encode('latin-1'))
    (d/'bad.jsonl').write_text('not json\n')
    (d/'notext.jsonl').write_text('{"title": "no text field"}\n')
    (d/'afile').write_text('an existing file')
    (d/'adir').mkdir()
    (d/'garbage.gguf').write_bytes(b'not a gguf file')
    for name in ('m_cfgonly', 'm_garbcfg', 'm_notok', 'm_badst', 'm_ok'): (d/name).mkdir()
    tiny_model('llama').config.save_pretrained(d/'m_cfgonly')
    (d/'m_garbcfg'/'config.json').write_text('{garbage')
    tiny_model('llama').config.save_pretrained(d/'m_notok'); (d/'m_notok'/'model.safetensors').write_bytes(b'\x08' + b'\x00' * 30)
    tiny_model('llama').config.save_pretrained(d/'m_badst'); tiny_tokenizer().save_pretrained(d/'m_badst')
    (d/'m_badst'/'model.safetensors').write_bytes(b'\xff' * 64)
    tiny_model('llama').save_pretrained(d/'m_ok'); tiny_tokenizer().save_pretrained(d/'m_ok')
    _nb(d/'toy.ipynb')
    (d/'toy.yaml').write_text(yaml.safe_dump({'runs': {'toy': {'notebook': 'toy.ipynb', 'offline': [{'model_name': 'tiny:llama', 'scale': 2}]}}}))
    yield d
    shutil.rmtree(d, ignore_errors=True)


FILES = ['good.txt', 'good.jsonl', 'empty.txt', 'blank.txt', 'binary.txt', 'latin1.txt', 'bad.jsonl', 'notext.jsonl', 'afile',
         'adir', 'missing.txt', 'afile/under.json', 'new/deeper/x', 'garbage.gguf', 'm_cfgonly', 'm_garbcfg', 'm_notok', 'm_badst',
         'm_ok', 'toy.yaml', 'toy.ipynb']

# ---- explicit cases ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('folder,msg', [('m_cfgonly', 'has no tokenizer'), ('m_garbcfg', 'config.json is not valid JSON'),
                                        ('m_notok', 'has no tokenizer'), ('m_badst', 'not a valid safetensors file'),
                                        ('garbage.gguf', 'is not a GGUF file'), ('adir', 'no config.json'),
                                        ('afile', 'no config.json')])
def test_malformed_model_folders_one_line(pool, tmp_path, folder, msg):
    for cmd, extra in [('distances', ['--out', tmp_path/'d.json']), ('evaluate', ['--out', tmp_path/'e.json']),
                       ('prune', ['--n', '1', '--strategy', 'deepest', '--out', tmp_path/'p'])]:
        code, _, err = run([cmd, '--model', pool/folder, *extra])
        assert code == 2 and msg in one_line(cmd, err), (cmd, err)
    assert list(tmp_path.iterdir()) == []


def test_config_only_folder_reaches_load_model_as_one_line(pool, tmp_path, monkeypatch):
    "Without the CLI's pre-check, `load_model` itself reports a folder holding only config.json in one line."
    import layerprune.cli
    monkeypatch.setitem(layerprune.cli.CHECKS, layerprune.cli.ModelName, (2, lambda v, flag, vals: None))
    code, _, err = run(['distances', '--model', pool/'m_cfgonly', '--text', pool/'good.txt', '--out', tmp_path/'d.json'])
    assert code == 2 and 'could not load model' in one_line('distances', err)
    assert not (tmp_path/'d.json').exists()


@pytest.mark.parametrize('name,msg', [('binary.txt', 'cannot read'), ('latin1.txt', 'not UTF-8'), ('empty.txt', 'no text found'),
                                      ('blank.txt', 'no text found'), ('missing.txt', 'not found'), ('adir', 'not found')])
def test_bad_text_files_one_line(pool, tmp_path, name, msg):
    for cmd, extra in [('distances', ['--out', tmp_path/'d.json']), ('evaluate', ['--out', tmp_path/'e.json']),
                       ('prune', ['--n', '1', '--strategy', 'bi', '--out', tmp_path/'p'])]:
        code, _, err = run([cmd, '--model', 'tiny:llama', '--text', pool/name, *extra])
        assert code == 2 and msg in one_line(cmd, err), (cmd, err)
    assert list(tmp_path.iterdir()) == []


def _no_loading(monkeypatch):
    def boom(*a, **k): raise AssertionError('a model was loaded')
    monkeypatch.setattr(layerprune.models, 'load_model', boom)


def test_output_under_a_file_fails_before_any_work(pool, tmp_path, monkeypatch):
    _no_loading(monkeypatch)
    bad = pool/'afile'/'out'
    for argv in (['distances', '--out', bad], ['evaluate', '--out', bad], ['prune', '--n', '2', '--out', bad],
                 ['prune', '--n', '2', '--out', tmp_path/'p', '--mergekit', bad]):
        t0 = time.time()
        code, _, err = run([*argv, '--model', 'smollm2-135m'])
        assert code == 2 and 'is not a directory' in one_line(argv[0], err), err
        assert time.time() - t0 < 5
    assert list(tmp_path.iterdir()) == []
    for flag in ('--out-dir', '--runs-dir', '--cache-dir'):
        code, _, err = run(['run', pool/'toy.yaml', flag, 'afile/x'])
        assert code == 2 and f'{flag} ' in one_line('run', err) and 'not a directory' in err, err
    assert not (pool/'figures').exists() and not (pool/'runs').exists()


def _as_nobody(argv):
    "Run `main(argv)` in a forked child that dropped root for 'nobody'; return (code, stderr)."
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r); os.setgroups([]); os.setgid(65534); os.setuid(65534)
            code, _, err = run(argv)
            os.write(w, json.dumps([code, err]).encode())
        finally: os._exit(0)
    os.close(w); data = b''
    while chunk := os.read(r, 1 << 16): data += chunk
    os.close(r); os.waitpid(pid, 0)
    return json.loads(data)


def test_read_only_folder_fails_before_any_work(monkeypatch):
    _no_loading(monkeypatch)
    build_parser()   # import every command module before a forked child loses access to root's files
    d = Path(tempfile.mkdtemp(prefix='lp-ro-')); d.chmod(0o755)
    try:
        ro = d/'ro'; ro.mkdir(); ro.chmod(0o555)
        argv = ['distances', '--model', 'smollm2-135m', '--out', ro/'sub'/'d.json']
        t0 = time.time()
        code, err = _as_nobody(argv) if os.geteuid() == 0 else run(argv)[::2]
        assert code == 2 and 'not writable' in one_line('distances', err), err
        assert time.time() - t0 < 5 and list(ro.iterdir()) == []
    finally: ro.chmod(0o755); shutil.rmtree(d)


def test_existing_outputs_kept_without_overwrite(pool, tmp_path):
    out = tmp_path/'p'; out.mkdir(); (out/'keep').write_text('mine'); (tmp_path/'m.yaml').write_text('x')
    code, _, err = run(['prune', '--model', 'tiny:llama', '--n', '1', '--strategy', 'deepest', '--out', out])
    assert code == 2 and 'pass --overwrite' in one_line('prune', err)
    code, _, err = run(['prune', '--model', 'tiny:llama', '--n', '1', '--strategy', 'deepest', '--mergekit', tmp_path/'m.yaml'])
    assert code == 2 and 'pass --overwrite' in one_line('prune', err)
    assert (out/'keep').read_text() == 'mine' and (tmp_path/'m.yaml').read_text() == 'x'


@pytest.mark.parametrize('spec,msg', [
    ('runs: [1, 2]', "top-level 'runs:' mapping"),
    ('runs: {fig: {notebook: 3, offline: [{}]}}', "'notebook:' path must be strings"),
    ('runs: {fig: {notebook: [a, b], offline: [{}]}}', "'notebook:' path must be strings"),
    ('runs: {1: {notebook: toy.ipynb, offline: [{}]}}', "must be strings"),
    ('runs: {fig: {notebook: toy.ipynb, offline: {model: x}}}', 'must be a list of parameter mappings'),
    ('runs: {fig: {notebook: toy.ipynb, offline: [{1: 2, b: 3}]}}', 'must be a list of parameter mappings'),
    ('runs: {fig: {notebook: good.txt, offline: [{}]}}', 'is not a notebook (.ipynb)'),
    ('runs: {fig: {notebook: bad.ipynb, offline: [{}]}}', 'is not a readable notebook'),
    ('runs: {fig: {notebook: toy.ipynb, offline: [{model_name: tiny:llama, scale: 2, extra: 1}]}}', 'unknown parameter(s) extra'),
    ('runs: {fig: {notebook: toy.ipynb, offline: [{model_name: [1, 2], scale: 2}]}}', 'is not an embedded name'),
    ('runs: !!python/object:os.system {}', 'is not valid YAML'),
    ('\x00\x01binary', 'is not valid YAML'),
])
def test_run_file_wrong_types_one_line(pool, tmp_path, spec, msg):
    shutil.copy(pool/'toy.ipynb', tmp_path); shutil.copy(pool/'good.txt', tmp_path); shutil.copy(pool/'good.txt', tmp_path/'bad.ipynb')
    (tmp_path/'runs.yaml').write_text(spec)
    code, _, err = run(['run', tmp_path/'runs.yaml', '--prepare-only'])
    assert code == 2 and msg in one_line('run', err), err


def test_usage_errors_are_one_line():
    for argv, msg in [(['distances', '--samples', 'x', '--out', 'o.json'], "invalid int value: 'x'"),
                      (['distances', '--frobnicate', '--out', 'o.json'], 'unrecognized arguments: --frobnicate'),
                      (['prune', '--strategy', 'deepest'], 'the following arguments are required: --n'),
                      (['evaluate', '--offline', 'maybe', '--out', 'o.json'], "invalid choice: 'maybe'"),
                      (['distances', '--seed', '1', '--out', 'o.json'], 'unrecognized arguments')]:
        code, _, err = run(argv)
        assert code == 2 and msg in one_line(argv[0], err), err
    code, _, err = run(['frobnicate'])
    assert code == 2 and err.startswith('layerprune: error: argument COMMAND: invalid choice') and err.count('\n') == 1


def test_unexpected_failure_is_one_line_exit_1(tmp_path, monkeypatch):
    import layerprune.distance
    def broken(*a, **k): raise RuntimeError('boom\nsecond line')
    monkeypatch.setattr(layerprune.distance, 'angular_distances', broken)
    code, _, err = run(['distances', '--model', 'tiny:llama', '--samples', '2', '--seq-len', '8', '--out', tmp_path/'d.json'])
    assert code == 1 and one_line('distances', err) == 'layerprune distances: error: RuntimeError: boom second line'
    assert not (tmp_path/'d.json').exists()


def test_help_shows_shared_flags_once_with_defaults(capsys):
    assert main(['evaluate', '--help']) == 0
    h = capsys.readouterr().out
    for flag in ('--model', '--dtype', '--quantization', '--trust-remote-code', '--out', '--text', '--split', '--samples',
                 '--seq-len', '--batch-size', '--seed', '--quiet'):
        assert h.count(f'  {flag}') == 1, flag
    assert 'loss documents, one sample each (default: 256)' in h and '{none,nf4,int8}' in h

# ---- property-based fuzz ---------------------------------------------------------------------------------------------------

CHARS = st.characters(blacklist_categories=('Cs',), blacklist_characters='\x00')   # what a real argv can hold
TEXT = st.text(CHARS, max_size=24)
INTS = st.one_of(st.integers(-3, 12), st.integers(-2**70, 2**70), st.sampled_from([0, -1, 2**31, 2**32, 2**63, 10**30]))
PLAUSIBLE = st.one_of(st.integers(1, 6).map(str), st.sampled_from(['good.txt', 'good.jsonl', 'm_ok', 'tiny:llama', 'tiny:gpt2',
                                                                     'float32', 'bfloat16', 'o/x.json', 'toy']))
VALUES = st.one_of(PLAUSIBLE, INTS.map(str), st.sampled_from(['nan', 'inf', '-inf', '1e999', '0.5', '-0.0', '', ' ', '-', '--']), TEXT,
                   st.sampled_from(FILES), st.sampled_from(['tiny:llama', 'tiny:gpt2', 'tiny:nope', 'wiki', 'c4', 'x/y']))


def flags(cmd, exclude=()):
    p = build_parser()._subparsers._group_actions[0].choices[cmd]
    return sorted(s for a in p._actions for s in a.option_strings if s.startswith('--') and s != '--help' and s not in exclude)


def mutations(cmd, exclude=()):
    fl = st.one_of(st.sampled_from(flags(cmd, exclude)), st.sampled_from(['--nope', '-x']))
    pair = st.tuples(fl, VALUES).map(list)
    return st.lists(st.one_of(pair, fl.map(lambda f: [f])), max_size=2).map(lambda ms: [x for m in ms for x in m])


def _snapshot(d):
    return sorted((str(p.relative_to(d)), p.stat().st_size, p.stat().st_mtime_ns) for p in d.rglob('*'))


def fuzz_once(pool, cmd, base, extra):
    "Run `cmd base extra` in a fresh copy of the pool (relative paths resolve inside it); check the properties."
    d = Path(tempfile.mkdtemp(prefix='lp-fuzz-'))
    try:
        shutil.copytree(pool, d, dirs_exist_ok=True)
        before, cwd = _snapshot(d), os.getcwd()
        os.chdir(d)
        try: code, out, err = run([cmd, *base, *extra])
        finally: os.chdir(cwd)
        event(f'exit {code}')
        assert code in (0, 2), (cmd, extra, code, err)
        assert 'Traceback' not in err, err
        if code:
            one_line(cmd, err)
            assert _snapshot(d) == before, (cmd, extra, 'a failed run changed files')
        return code
    finally: shutil.rmtree(d, ignore_errors=True)


FUZZ = settings(max_examples=int(os.environ.get('LAYERPRUNE_FUZZ_EXAMPLES', 20)), deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@FUZZ
@given(extra=mutations('distances'))
def test_fuzz_distances(pool, extra):
    fuzz_once(pool, 'distances', ['--model', 'tiny:llama', '--text', 'good.txt', '--samples', '2', '--seq-len', '8',
                                  '--batch-size', '2', '--quiet', '--out', 'o/d.json'], extra)


@FUZZ
@given(extra=mutations('prune', exclude=('--verify', '--push-to-hub')))   # a push fails after saving, by design
def test_fuzz_prune(pool, extra):
    fuzz_once(pool, 'prune', ['--model', 'tiny:llama', '--strategy', 'deepest', '--n', '2', '--text', 'good.txt', '--samples', '2',
                              '--seq-len', '8', '--quiet', '--out', 'o/p', '--no-verify'], [x for x in extra if x != '--verify'])


@FUZZ
@given(extra=mutations('evaluate', exclude=('--tasks',)), tasks=st.one_of(st.sampled_from(['loss', 'loss', 'loss,,', '', ',']), TEXT))
def test_fuzz_evaluate(pool, extra, tasks):
    fuzz_once(pool, 'evaluate', ['--model', 'tiny:llama', '--tasks', tasks, '--text', 'good.txt', '--samples', '2', '--seq-len', '8',
                                 '--prompt-len', '8', '--decode-tokens', '2', '--quiet', '--out', 'o/e.json'], extra)


LEAF = st.one_of(st.none(), st.booleans(), INTS, st.floats(), TEXT, st.sampled_from(['toy.ipynb', 'good.txt', 'missing.ipynb', 'offline']))
TREE = st.recursive(LEAF, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.one_of(TEXT, INTS), c, max_size=3), max_leaves=8)
SPEC = st.fixed_dictionaries({'runs': st.one_of(TREE, st.dictionaries(st.one_of(st.just('toy'), TEXT), st.fixed_dictionaries(
    {'notebook': st.one_of(st.just('toy.ipynb'), LEAF)},
    optional={'offline': st.one_of(TREE, st.lists(st.fixed_dictionaries({'model_name': st.one_of(st.just('tiny:llama'), LEAF),
                                                                         'scale': LEAF}), max_size=2))}), max_size=2))})


TOY = {'runs': {'toy': {'notebook': 'toy.ipynb', 'offline': [{'model_name': 'tiny:llama', 'scale': 2}]}}}


@FUZZ
@given(spec=st.one_of(st.just(yaml.safe_dump(TOY)), SPEC.map(lambda s: yaml.safe_dump(s, allow_unicode=True)), st.binary(max_size=64).map(lambda b: b.decode('latin-1')),
                      TREE.map(yaml.safe_dump), TEXT),
       extra=mutations('run', exclude=('--prepare-only', '--no-prepare-only')))
def test_fuzz_run(pool, spec, extra):
    (pool/'runs.yaml').write_bytes(spec.encode('utf-8', 'surrogateescape'))
    try: fuzz_once(pool, 'run', ['runs.yaml', *[x for x in extra if 'prepare-only' not in x], '--prepare-only'], [])
    finally: (pool/'runs.yaml').unlink()


def test_quiet_prints_nothing(tmp_path):
    argv = ['distances', '--model', 'tiny:llama', '--samples', '2', '--seq-len', '8', '--out', tmp_path/'d.json']
    code, out, err = run(argv + ['--quiet'])
    assert code == 0 and out == '' and err == '' and json.loads((tmp_path/'d.json').read_text())['num_samples'] == 2
    code, out, err = run(argv)
    assert code == 0 and 'drop layers [' in out and '(0-based, half-open)' in out


HEAL = ['--model', 'tiny:llama', '--method', 'lora', '--rank', '2', '--steps', '1', '--seq-len', '16', '--batch-size', '2',
        '--text', 'good.txt', '--quiet', '--out', 'o/h']


def test_heal_bad_inputs_one_line_before_loading(pool, tmp_path, monkeypatch):
    _no_loading(monkeypatch)
    for extra, msg in [(['--out', pool/'afile'/'h'], 'is not a directory'), (['--model', pool/'m_cfgonly'], 'has no tokenizer'),
                       (['--text', pool/'binary.txt'], 'cannot read'), (['--lr', 'nan'], 'must be a finite number'),
                       (['--seq-len', '0'], '--seq-len must be >= 1'), (['--schedule', 'cyclic'], "invalid choice: 'cyclic'"),
                       (['--teacher', 'nope', '--distill', '1', '--interface', '2'], '--teacher: unknown model')]:
        code, _, err = run(['heal', *[pool/a if a == 'good.txt' else a for a in HEAL[:-1]], tmp_path/'h', *extra])
        assert code == 2 and msg in one_line('heal', err), (extra, err)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    code, _, err = run(['heal', *[pool/a if a == 'good.txt' else a for a in HEAL[:-1]], tmp_path/'h', '--rank', str(2**40)])
    assert code == 2 and 'exceeds the hidden size' in one_line('heal', err) and list(tmp_path.iterdir()) == []


@FUZZ
@given(extra=mutations('heal', exclude=('--steps', '--save-every')))
def test_fuzz_heal(pool, extra):
    fuzz_once(pool, 'heal', HEAL, extra)
