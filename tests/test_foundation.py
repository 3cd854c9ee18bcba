"Integration tests of issue 2 on the real offline models: loading, text, distances CLI, paper runner."
import json, math, os, shutil, subprocess, sys
from pathlib import Path
import numpy as np, pytest, torch, yaml
from conftest import run_cli, ROOT


def prose_loss(model, tok, texts):
    "Mean next-token cross-entropy (nats) over a few documents, one at a time."
    tot = n = 0
    for t in texts:
        ids = tok(t, return_tensors='pt')['input_ids'][:, :256]
        with torch.no_grad(): out = model(ids, labels=ids)
        tot += out.loss.item() * (ids.shape[1] - 1); n += ids.shape[1] - 1
    return tot / n


@pytest.mark.parametrize('name,layers', [('smollm2-135m', 30), ('gemma3-270m', 18)])
def test_embedded_models_load_offline_and_score_prose(name, layers, wiki_val):
    from layerprune.models import load_model, decoder
    model, tok = load_model(name)
    assert decoder(model).num_layers == layers
    loss = prose_loss(model, tok, wiki_val[:6])
    print(f'{name}: {loss:.3f} nats/token on wiki validation')
    assert 1.0 < loss < 3.5
    # the cached safetensors copy reloads with plain transformers, no layerprune involved
    from layerprune.models import resolve_model
    from transformers import AutoModelForCausalLM
    plain = AutoModelForCausalLM.from_pretrained(resolve_model(name), dtype=torch.float32)
    ids = tok(wiki_val[0], return_tensors='pt')['input_ids'][:, :32]
    with torch.no_grad(): torch.testing.assert_close(plain(ids).logits, model(ids).logits)
    del model, plain


def test_distances_cli_on_smollm2(tmp_path):
    out = tmp_path/'d.json'
    r = run_cli('distances', '--model', 'smollm2-135m', '--samples', '12', '--seq-len', '64', '--batch-size', '5', '--out', out)
    assert r.returncode == 0, r.stderr
    j = json.loads(out.read_text())
    L = j['num_layers']
    assert L == 30 and j['num_samples'] == 12 and j['seq_len'] == 64 and j['model'] == 'smollm2-135m'
    assert [len(x) for x in j['distances']] == list(range(L, 0, -1))
    assert np.shape(j['stderr'][0]) == (L,)
    assert all(0 <= v <= 1 for row in j['distances'] for v in row)
    assert j['best_start'] == [int(np.argmin(row)) for row in j['distances']]
    # sanity on a real model: longer blocks are further apart on average, and the first layer moves the state a lot
    means = [np.mean(row) for row in j['distances']]
    assert means[L // 2] > means[0]


@pytest.mark.parametrize('args,msg', [
    (['--samples', '0'], '--samples must be >= 1'),
    (['--seq-len', '0'], '--seq-len must be >= 1'),
    (['--model', 'no-such-model'], 'unknown model'),
    (['--text', '{tmp}/empty.txt'], 'no text found'),
    (['--text', '{tmp}/missing.txt'], 'not found'),
    (['--text', '{tmp}/binary.txt'], 'cannot read'),
])
def test_distances_cli_bad_input(tmp_path, args, msg):
    (tmp_path/'empty.txt').write_text('\n\n')
    (tmp_path/'binary.txt').write_bytes(b'\xff\xfe\x00\x81' * 10)
    out = tmp_path/'out.json'
    r = run_cli('distances', '--model', 'tiny:llama', *[a.format(tmp=tmp_path) for a in args], '--out', out)
    assert r.returncode == 2 and msg in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr   # one clear line, no traceback
    assert not out.exists()


def test_batch_larger_than_samples_is_fine(tmp_path):
    r = run_cli('distances', '--model', 'tiny:llama', '--samples', '3', '--batch-size', '64', '--seq-len', '16', '--out', tmp_path/'o.json')
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path/'o.json').read_text())['num_samples'] == 3


def test_paper_profile_validates():
    r = run_cli('run', 'paper_runs.yaml', '--profile', 'paper', '--prepare-only')
    assert r.returncode == 0, r.stderr
    assert 'validated; nothing executed' in r.stdout


def test_every_run_has_offline_and_paper_profiles():
    spec = yaml.safe_load((ROOT/'paper_runs.yaml').read_text())
    for name, e in spec['runs'].items():
        assert 'offline' in e and 'paper' in e, name
        assert (ROOT/e['notebook']).exists(), name


def test_distance_notebooks_execute_with_papermill(run_paper):
    "fig1c and fig4 run end to end (papermill, tiny model), producing PNG+PDF+CSV+JSON."
    small = {'model_name': 'tiny:llama', 'text': 'wiki', 'samples': 6, 'seq_len': 32, 'batch_size': 3}
    r, tmp_path = run_paper({'fig1c': small, 'fig4': small})
    assert r.returncode == 0, r.stderr + r.stdout
    names = sorted(p.name for p in (tmp_path/'figures').iterdir())
    assert names == sorted(f'{f}_tiny_llama.{e}' for f in ('fig1c', 'fig4') for e in ('png', 'pdf', 'csv', 'json', 'run.json'))
    j = json.loads((tmp_path/'figures'/'fig1c_tiny_llama.json').read_text())
    assert j['num_layers'] == 6 and len(j['best_start']) == 6
    assert len(list((tmp_path/'runs'/'cache').glob('distances/*.json'))) == 1   # computed once, shared by both figures


def test_committed_distance_figures_exist():
    for f in ('fig1c', 'fig4'):
        for e in ('png', 'pdf', 'csv', 'json'):
            assert (ROOT/'figures'/f'{f}_smollm2-135m.{e}').exists(), f'{f}.{e}'
