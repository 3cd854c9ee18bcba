"Integration tests for layerprune.heal: real training on tiny models, real subprocesses (kill -9, torchrun/gloo)."
import json, os, pickle, signal, subprocess, sys, time
from pathlib import Path
import pytest, torch
from torch import nn
from layerprune.heal import HealConfig, heal, prepare, merge
from layerprune.hooks import layer_hooks
from layerprune.loss import lm_loss
from layerprune.models import tiny_model, tiny_tokenizer, decoder, load_model
from layerprune.data import load_texts
from layerprune.cli import main
from layerprune.utils import LayerpruneError



@pytest.fixture(autouse=True, scope='module')
def _one_thread():
    "Tiny models train ~7x faster on one thread here; restore the count for the modules that run after this one."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, 'PYTHONPATH': str(REPO), 'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1', 'TOKENIZERS_PARALLELISM': 'false'}


from conftest import pruned_tiny   # a 6-layer tiny model with layers [2, 4) removed by `drop_layers`


@pytest.fixture(scope='module')
def tok(): return tiny_tokenizer()

@pytest.fixture(scope='module')
def train(): return load_texts('wiki', 'train', n=300)

@pytest.fixture(scope='module')
def val(): return load_texts('wiki', 'validation', n=40)

def small(**kw):
    return HealConfig(**{**dict(steps=6, warmup=1, lr=1e-2, batch_size=4, micro_batch=2, seq_len=32, rank=4), **kw})


def block_loss(model, tok, texts, seq_len):
    "Mean next-token loss (nats) over packed validation blocks."
    return lm_loss(model, tok, texts, seq_len=seq_len, batch_size=4, packed=True, max_blocks=16)['nats']


def snapshot(m): return {k: v.detach().clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize('k', [0, 2])
def test_partial_changes_only_lm_head_and_last_k(tok, train, k):
    m = pruned_tiny(tie=False); before = snapshot(m)
    healed, log = heal(m, tok, small(method='partial', last_k=k), train, progress=False)
    after = healed.state_dict(); L = decoder(healed).num_layers
    trained = ('lm_head.',) + tuple(f'model.layers.{i}.' for i in range(L - k, L))
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert 'lm_head.weight' in changed
    for n in before:
        if n.startswith(trained): continue
        # byte-compare everything that must not move
        assert before[n].numpy().tobytes() == after[n].numpy().tobytes(), n
    if k: assert any(n.startswith(f'model.layers.{L-1}.') for n in changed)


def test_tied_embeddings_stay_as_chosen(tok, train, tmp_path):
    # untie=True (default): lm_head gets its own copy, the embedding does not move, reload stays untied
    m = pruned_tiny(); emb0 = m.get_input_embeddings().weight.detach().clone()
    healed, log = heal(m, tok, small(method='partial', last_k=1), train, tmp_path/'untied', progress=False)
    assert log['untied'] and any('untied' in s for s in log['notes'])
    assert torch.equal(healed.get_input_embeddings().weight, emb0)
    r, _ = load_model(str(tmp_path/'untied'))
    assert r.config.tie_word_embeddings is False and r.lm_head.weight is not r.model.embed_tokens.weight
    assert torch.equal(r.lm_head.weight, healed.lm_head.weight) and torch.equal(r.model.embed_tokens.weight, emb0)
    # untie=False: they stay tied, so the embedding trains with lm_head; reload stays tied
    m = pruned_tiny()
    healed, log = heal(m, tok, small(method='partial', last_k=1, untie=False), train, tmp_path/'tied', progress=False)
    assert not log['untied'] and healed.lm_head.weight is healed.model.embed_tokens.weight
    assert not torch.equal(healed.get_input_embeddings().weight, emb0)
    r, _ = load_model(str(tmp_path/'tied'))
    assert r.config.tie_word_embeddings and r.lm_head.weight is r.model.embed_tokens.weight
    # LoRA leaves tying alone
    healed, _ = heal(pruned_tiny(), tok, small(method='lora'), train, progress=False)
    assert healed.lm_head.weight is healed.model.embed_tokens.weight


def test_qlora_trains_only_lora_and_merged_model_reloads(tok, train, tmp_path):
    from transformers import AutoModelForCausalLM
    m = pruned_tiny(); x = torch.tensor([tok('The quick brown fox jumps over the lazy dog.')['input_ids']])
    healed, log = heal(m, tok, small(method='qlora', lr=3e-2), train, tmp_path/'q', progress=False)
    assert log['trainable_names'] and all('lora_' in n for n in log['trainable_names'])
    assert all(any(t in n for t in ('gate_proj', 'up_proj', 'down_proj')) for n in log['trainable_names'])  # FFN only
    plain = AutoModelForCausalLM.from_pretrained(tmp_path/'q', dtype=torch.float32)
    assert not any('lora' in n for n, _ in plain.named_parameters())
    assert type(plain.model.layers[0].mlp.up_proj) is nn.Linear
    with torch.no_grad(): torch.testing.assert_close(plain(x, use_cache=False).logits, healed(x, use_cache=False).logits)
    # the merge adds each LoRA delta to the original fp32 weights (not to the de-quantized NF4 ones)
    m = pruned_tiny(); orig = snapshot(m); cfg = small(method='qlora')
    tm, info = prepare(m, cfg)
    with torch.no_grad():
        for n, p in tm.named_parameters():
            if 'lora_B' in n: p.normal_(0, 0.1)
        deltas = {n: mod.get_delta_weight('default') for n, mod in tm.get_base_model().named_modules() if hasattr(mod, 'get_delta_weight')}
        merged = merge(tm, m, 'qlora')
    assert deltas and all(torch.allclose(merged.state_dict()[n + '.weight'], orig[n + '.weight'] + d, atol=1e-6) for n, d in deltas.items())
    assert all(torch.equal(merged.state_dict()[k], v) for k, v in orig.items() if not any(k.startswith(n) for n in deltas))


def test_healing_lowers_validation_loss(tok, train, val):
    for method in ('lora', 'partial'):
        m = pruned_tiny(); before = block_loss(m, tok, val, seq_len=64)
        cfg = small(method=method, steps=30, lr=2e-2 if method == 'lora' else 3e-3, batch_size=8, micro_batch=4, seq_len=64,
                    rank=8, target='all-linear')
        healed, log = heal(m, tok, cfg, train, progress=False)
        after = block_loss(healed, tok, val, seq_len=64)
        # a random tiny model: LoRA (frozen random lm_head) gains ~0.15 nats, lm_head + last layers far more
        assert after < before - (0.1 if method == 'lora' else 0.5), (method, before, after)


def interface_mse(student, teacher, x, interface, n_removed):
    a, b = {}, {}
    with torch.no_grad(), layer_hooks(student, pre=lambda i, h: a.__setitem__('h', h), pre_layers=[interface]), \
         layer_hooks(teacher, pre=lambda i, h: b.__setitem__('h', h), pre_layers=[interface + n_removed]):
        student(input_ids=x, use_cache=False); teacher(input_ids=x, use_cache=False)
    return torch.nn.functional.mse_loss(a['h'], b['h']).item()


def test_distill_pulls_interface_towards_teacher(tok, train, val):
    teacher = tiny_model('llama', 6)
    x = torch.tensor([tok(val[0])['input_ids'][:64]])
    res = {}
    for w in (0.0, 1000.0):
        cfg = small(method='lora', distill=w, steps=10, target='all-linear')
        healed, log = heal(pruned_tiny(), tok, cfg, train, teacher=teacher, interface=2, progress=False)
        res[w] = interface_mse(healed, teacher, x, 2, 2)
        if w: assert log['distill_mse'][-1] < log['distill_mse'][0]
    assert res[1000.0] < 0.5 * res[0.0], res
    ref = tiny_model('llama', 6)  # the teacher is untouched
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), ref.state_dict().values()))


def _cli(args, **kw):
    return subprocess.run([sys.executable, '-m', 'layerprune.heal', *args], env=ENV, cwd=REPO, capture_output=True, text=True, **kw)


def _no_nan(c): raise AssertionError(f'{c} in JSON')


def _weights(d):
    from safetensors.torch import load_file
    return load_file(str(Path(d)/'model.safetensors'))


def test_resume_after_kill_matches_uninterrupted(tmp_path):
    pruned = pruned_tiny(); pruned.save_pretrained(tmp_path/'pruned'); tiny_tokenizer().save_pretrained(tmp_path/'pruned')
    args = ['--model', str(tmp_path/'pruned'), '--method', 'lora', '--rank', '4', '--steps', '16', '--save-every', '4',
            '--seq-len', '48', '--batch-size', '8', '--micro-batch', '4', '--lr', '1e-2', '--warmup', '2', '--max-texts', '300']
    r = _cli(args + ['--out', str(tmp_path/'a')]); assert r.returncode == 0, r.stderr
    # the same run, killed with SIGKILL once its second checkpoint exists, then resumed
    p = subprocess.Popen([sys.executable, '-m', 'layerprune.heal', *args, '--out', str(tmp_path/'b')], env=ENV, cwd=REPO,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ck = tmp_path/'b.checkpoints'
    t0 = time.time()
    while not (ck/'step-0000008'/'state.json').exists() and p.poll() is None and time.time() - t0 < 120: time.sleep(0.01)
    p.send_signal(signal.SIGKILL); p.wait()
    assert p.returncode == -signal.SIGKILL and not (tmp_path/'b').exists()
    r = _cli(args + ['--out', str(tmp_path/'b')]); assert r.returncode == 2 and '--resume' in r.stderr
    # what a kill in the middle of writing leaves: a half-written checkpoint folder and a half-written output folder
    # (temporaries carry their writer's process id: here the killed one's)
    for tmp in (ck/f'.step-0000012.{p.pid}.k1ll.tmp', tmp_path/f'.b.{p.pid}.k1ll.tmp'):
        tmp.mkdir(); (tmp/'model.safetensors').write_bytes(b'\0' * 10)
    r = _cli(args + ['--out', str(tmp_path/'b'), '--resume']); assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path)) == ['a', 'b', 'pruned']  # temporaries, checkpoints and lock gone
    log_a, log_b = (json.loads((tmp_path/d/'heal_log.json').read_text(), parse_constant=_no_nan) for d in 'ab')
    assert log_b['resumed_from'] >= 8 and log_a['loss'] == log_b['loss']
    wa, wb = _weights(tmp_path/'a'), _weights(tmp_path/'b')
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


class _Stop(Exception): pass

def stop_at(k):
    "A `heal` callback that raises right after step `k` (after its checkpoint is written), as a kill would."
    def cb(step, log):
        if step == k: raise _Stop()
    return cb


class _Planted:
    "A pickle that creates `marker` when loaded: what a planted file could do, harmlessly."
    def __init__(self, marker): self.marker = str(marker)
    def __reduce__(self): return (open, (self.marker, 'w'))


def test_planted_pickle_in_any_checkpoint_file_runs_no_code(tok, train, tmp_path):
    cfg = small(method='lora', steps=4, save_every=2)
    ref, _ = heal(pruned_tiny(), tok, cfg, train, progress=False)
    with pytest.raises(_Stop): heal(pruned_tiny(), tok, cfg, train, tmp_path/'o', progress=False, callback=stop_at(2))
    work = tmp_path/'o.checkpoints'
    files = sorted((p for p in work.rglob('*') if p.is_file()), key=lambda p: (p.name == '.lock', str(p)))
    assert [p.name for p in files] == ['optimizer.safetensors', 'rng.safetensors', 'state.json', 'trainable.safetensors', '.lock']
    probe = tmp_path/'probe'; pickle.loads(pickle.dumps(_Planted(probe))); assert probe.exists()  # the pickle does run code
    for f in files:
        marker, good = tmp_path/f'marker-{f.name}', f.read_bytes()
        f.write_bytes(pickle.dumps(_Planted(marker)))
        try: healed, _ = heal(pruned_tiny(), tok, cfg, train, tmp_path/'o', resume=True, progress=False)
        except LayerpruneError as e:
            assert f.name != '.lock' and '\n' not in str(e) and 'delete it' in str(e), (f.name, e)
            f.write_bytes(good)
        else:  # only the lock file is never read: the run resumes and matches the uninterrupted one
            assert f.name == '.lock'
            assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), healed.state_dict().values()))
        assert not marker.exists(), f.name
    assert sorted(os.listdir(tmp_path)) == ['o', 'probe']


def test_malformed_checkpoint_content_gives_one_line(tok, train, tmp_path):
    from safetensors.torch import load_file, save_file
    cfg = small(method='partial', last_k=1, steps=4, save_every=2)
    with pytest.raises(_Stop): heal(pruned_tiny(), tok, cfg, train, tmp_path/'o', progress=False, callback=stop_at(2))
    ck = tmp_path/'o.checkpoints'/'step-0000002'
    good = {f: (ck/f).read_bytes() for f in os.listdir(ck)}
    st = json.loads(good['state.json']); tr = load_file(str(ck/'trainable.safetensors'))
    op, rng = load_file(str(ck/'optimizer.safetensors')), load_file(str(ck/'rng.safetensors'))
    name = next(iter(tr))
    cases = {'state.json': [dict(st, step=3), dict(st, step='2'), dict(st, scheduler={**st['scheduler'], 'last_epoch': 1.5}),
                            dict(st, python_rng=[3, [1] * 3, None]), dict(st, param_groups=[]), dict(st, format='x'),
                            dict(st, log={**st['log'], 'loss': [1.0]})],
             'trainable.safetensors': [{**tr, name: tr[name][:1]}, {k: v for k, v in tr.items() if k != name},
                                       {**tr, name: tr[name].double()}],
             'optimizer.safetensors': [{k: v for k, v in op.items() if k != '0.exp_avg'}, {**op, '0.exp_avg': op['0.exp_avg'][:1]},
                                       {**op, '99.step': op['0.step'].clone()}, {**op, 'x': op['0.step'].clone()}],
             'rng.safetensors': [{}, {'torch': rng['torch'].float()}, {**rng, 'other': rng['torch'].clone()}, {'torch': rng['torch'][:7]}]}
    for f, bads in cases.items():
        for bad in bads:
            if f == 'state.json': (ck/f).write_text(json.dumps(bad))
            else: save_file(bad, str(ck/f))
            with pytest.raises(LayerpruneError) as e: heal(pruned_tiny(), tok, cfg, train, tmp_path/'o', resume=True, progress=False)
            assert '\n' not in str(e.value) and str(ck) in str(e.value), e.value
            (ck/f).write_bytes(good[f])
    heal(pruned_tiny(), tok, cfg, train, tmp_path/'o', resume=True, progress=False)  # restored: resumes
    assert sorted(os.listdir(tmp_path)) == ['o']


def test_divergence_stops_saves_nothing_and_keeps_last_good_checkpoint(tok, train, tmp_path):
    cfg = small(method='partial', last_k=1, steps=6, save_every=2)
    m = pruned_tiny(tie=False)
    def poison(step, log):  # right after step 2's checkpoint: step 3's loss is NaN
        if step == 2:
            with torch.no_grad(): m.lm_head.weight.fill_(float('nan'))
    with pytest.raises(LayerpruneError, match=r'training diverged at step 3/6 \(loss nan') as e:
        heal(m, tok, cfg, train, tmp_path/'o', progress=False, callback=poison)
    assert 'step-0000002' in str(e.value) and '\n' not in str(e.value)
    assert sorted(os.listdir(tmp_path)) == ['o.checkpoints'] and sorted(os.listdir(tmp_path/'o.checkpoints')) == ['.lock', 'step-0000002']
    healed, log = heal(pruned_tiny(tie=False), tok, cfg, train, tmp_path/'o', resume=True, progress=False)  # the kept one is good
    ref, log_ref = heal(pruned_tiny(tie=False), tok, cfg, train, progress=False)
    assert log['resumed_from'] == 2 and log['loss'] == log_ref['loss']
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), healed.state_dict().values()))


def test_diverging_cli_run_exits_nonzero_with_nothing_saved(tmp_path, capsys):
    pruned = pruned_tiny(); pruned.save_pretrained(tmp_path/'pruned'); tiny_tokenizer().save_pretrained(tmp_path/'pruned')
    args = ['heal', '--model', str(tmp_path/'pruned'), '--method', 'partial', '--last-k', '1', '--steps', '6', '--warmup', '1',
            '--seq-len', '32', '--batch-size', '4', '--max-texts', '200', '--save-every', '2', '--out', str(tmp_path/'o')]
    assert main(args + ['--lr', '1e30']) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()  # progress lines, then the one error line (no traceback)
    assert lines[-1].startswith('layerprune heal: error: training diverged at step') and 'Traceback' not in err, err
    assert sorted(os.listdir(tmp_path)) == ['pruned']  # no model, no checkpoint folder (none was complete)
    assert main(args + ['--lr', '1e-3']) == 0  # the same run with a sane learning rate: a finite log, valid JSON
    log = json.loads((tmp_path/'o'/'heal_log.json').read_text(), parse_constant=_no_nan)
    assert len(log['loss']) == 6 and log['distill_mse'] == [None] * 6


def test_two_process_gloo_matches_single_process(tmp_path):
    pruned = pruned_tiny(); pruned.save_pretrained(tmp_path/'pruned'); tiny_tokenizer().save_pretrained(tmp_path/'pruned')
    args = ['--model', str(tmp_path/'pruned'), '--method', 'partial', '--last-k', '2', '--steps', '8', '--seq-len', '32',
            '--batch-size', '8', '--micro-batch', '2', '--lr', '3e-3', '--warmup', '2', '--max-texts', '300']
    r = _cli(args + ['--out', str(tmp_path/'one')]); assert r.returncode == 0, r.stderr
    torchrun = Path(sys.executable).parent/'torchrun'
    r = subprocess.run([str(torchrun), '--nproc_per_node', '2', '--master_port', '29533', '-m', 'layerprune.heal', *args,
                        '--out', str(tmp_path/'two')], env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = (json.loads((tmp_path/d/'heal_log.json').read_text()) for d in ('one', 'two'))
    assert two['world_size'] == 2 and one['world_size'] == 1
    torch.testing.assert_close(torch.tensor(two['loss']), torch.tensor(one['loss']), atol=1e-4, rtol=0)
    w1, w2 = _weights(tmp_path/'one'), _weights(tmp_path/'two')
    assert all(torch.allclose(w1[k], w2[k], atol=1e-4) for k in w1)


def test_bad_input_clear_error_nothing_written(tmp_path, capsys):
    pruned = pruned_tiny(); pruned.save_pretrained(tmp_path/'pruned'); tiny_tokenizer().save_pretrained(tmp_path/'pruned')
    (tmp_path/'leak.txt').write_text('\n\n'.join(load_texts('wiki', 'train', n=50) + load_texts('wiki', 'validation', n=1)))
    out = tmp_path/'out'
    base = ['heal', '--model', str(tmp_path/'pruned'), '--out', str(out), '--steps', '2', '--seq-len', '32', '--batch-size', '4',
            '--rank', '4']   # the gromov preset's rank for unknown models (64) exceeds the tiny model's width
    cases = [(['--method', 'sgd'], 'unknown healing method'), (['--method', 'lora', '--rank', '0'], 'rank must be'),
             (['--method', 'partial', '--last-k', '5'], 'larger than the number of decoder layers'),
             (['--method', 'lora', '--steps', '0'], 'steps must be'),
             (['--method', 'lora', '--text', str(tmp_path/'leak.txt')], 'overlaps the validation split'),
             (['--method', 'lora', '--distill', '1'], '--teacher'),
             (['--method', 'lora', '--text', str(tmp_path/'missing.txt')], 'not found'),
             (['--method', 'lora', '--lr', 'inf'], 'lr must be a finite number'),
             (['--method', 'lora', '--lr', 'nan'], 'lr must be a finite number')]
    for extra, msg in cases:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err
        errs = [l for l in err.splitlines() if l.startswith('layerprune heal: error:')]
        assert len(errs) == 1 and msg in errs[0] and 'Traceback' not in err, (extra, msg, err)
        assert sorted(os.listdir(tmp_path)) == ['leak.txt', 'pruned'], extra


def test_heal_paper_notebooks_execute_with_papermill(run_paper):
    "heal_curves, heal_rank and lu_finetune run end to end through the runner on a tiny model (PNG+PDF+CSV+JSON)."
    common = dict(model_name='tiny:llama', steps=2, batch_size=4, seq_len=32, train_docs=120, val_docs=4, eval_seq_len=32, threads=1)
    dist = dict(calib_samples=4, calib_seq_len=32)
    params = {'heal_curves': dict(common, **dist, fractions=[0.34], strategies=['similarity', 'deepest'], seeds=[0], method='lora',
                                  rank=2, lr=1e-3, tag='curves'),
              'heal_rank': dict(common, **dist, fraction=0.34, strategy='similarity', ranks=[1, 2], method='lora', lr=1e-3,
                                tasks=['arc_easy', 'mmlu'], limit=3, mmlu_limit=2, mmlu_fewshot=1),
              'lu_finetune': dict(common, fraction=0.25, strategy='reverse', methods=['qlora', 'partial-1'],
                                  rank=2, lora_lrs=[1e-3], partial_lrs=[1e-3, 1e-2], tasks=['arc_easy'], limit=2, mmlu_limit=1)}
    r, tmp_path = run_paper(params)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-3000:]
    names = sorted(p.name for p in (tmp_path/'figures').iterdir())
    assert names == sorted(f'{f}_tiny_llama.{e}' for f in ('heal_curves', 'heal_rank', 'lu_finetune') for e in ('png', 'pdf', 'csv', 'json', 'run.json'))
    rows = (tmp_path/'figures'/'lu_finetune_tiny_llama.csv').read_text().splitlines()
    assert len(rows) == 3 and rows[1].startswith('qlora,')
    assert len(list((tmp_path/'runs'/'cache').glob('healed/*.json'))) >= 5  # one JSON per (pruned, healed) point
    rank = json.loads((tmp_path/'figures'/'heal_rank_tiny_llama.json').read_text())   # the QA half of Fig. 9, per rank
    assert [r['rank'] for r in rank['rows']] == [1, 2] and rank['provenance']['items'] == {'arc_easy': [3], 'mmlu': [114]}
    for r in rank['rows']:
        assert 0 <= r['acc_arc_easy'] <= 1 and r['acc_arc_easy_stderr'] is not None and r['items_arc_easy'] == 3 and r['items_mmlu'] == 114
        assert abs(r['avg_acc'] - (r['acc_arc_easy'] + r['acc_mmlu']) / 2) < 1e-12
        assert abs(r['avg_acc_stderr'] - (r['acc_arc_easy_stderr'] ** 2 + r['acc_mmlu_stderr'] ** 2) ** 0.5 / 2) < 1e-12
        assert r['loss_healed_qa_run'] == r['loss_healed']   # healed once: heal_sweep read back the point healed_eval_point stored
    assert len(list((tmp_path/'runs'/'cache').glob('healed_eval/*.json'))) == 2 + 2   # heal_rank's two ranks + lu_finetune's two methods


def test_committed_heal_figures_exist():
    for f in ('heal_curves', 'heal_seeds', 'heal_rank', 'lu_finetune'):
        for e in ('png', 'pdf', 'csv', 'json'):
            assert (REPO/'figures'/f'{f}_smollm2-135m.{e}').exists(), f'{f}.{e}'
