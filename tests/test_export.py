"""Saved pruned folders as users take them further: model card, hub push failure, GGUF (llama.cpp), the lm_eval CLI."""
import json, os, subprocess, sys
from pathlib import Path
import pytest, torch
from conftest import run_cli

SENTENCE = 'The quick brown fox jumps over the lazy dog because layer pruning removes the deeper layers of a model.'


def _front_matter(readme: Path) -> dict:
    import yaml
    text = readme.read_text()
    assert text.startswith('---\n'), text[:200]
    return yaml.safe_load(text.split('---\n')[1])


def _agreement(folder: Path, gguf: Path):
    "(layers of the safetensors model, layers of the GGUF reload, argmax agreement on SENTENCE, max |logit diff|)."
    from transformers import AutoModelForCausalLM, AutoTokenizer
    m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    g = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    tg = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ids = AutoTokenizer.from_pretrained(folder)(SENTENCE, return_tensors='pt').input_ids
    assert tg(SENTENCE, return_tensors='pt').input_ids.tolist() == ids.tolist(), 'GGUF tokenizer tokenises differently'
    with torch.no_grad(): a, b = m(ids).logits, g(ids).logits
    return m.config.num_hidden_layers, g.config.num_hidden_layers, (a.argmax(-1) == b.argmax(-1)).float().mean().item(), (a - b).abs().max().item()


def test_smollm2_prune_card_and_gguf(tmp_path):
    "The issue's check: prune smollm2 (deepest, n=2) -> README.md with base_model; export-gguf -> transformers reload agrees."
    d, f = tmp_path/'D', tmp_path/'D.gguf'
    r = run_cli('prune', '--model', 'smollm2-135m', '--strategy', 'deepest', '--n', 2, '--out', d, '--no-verify')
    assert r.returncode == 0, r.stderr[-2000:]
    fm = _front_matter(d/'README.md')
    assert fm['base_model'] == 'HuggingFaceTB/SmolLM2-135M-Instruct' and fm['library_name'] == 'transformers'
    assert {'layer-pruning', 'deepest'} <= set(fm['tags']) and fm['pipeline_tag'] == 'text-generation'
    body = (d/'README.md').read_text()
    assert '[27, 29) (0-based, half-open)' in body and 'layerprune prune --model smollm2-135m' in body
    r = run_cli('export-gguf', d, f)
    assert r.returncode == 0, r.stderr[-2000:]
    n_st, n_gguf, agree, _ = _agreement(d, f)
    assert (n_st, n_gguf) == (28, 28)
    assert agree >= 0.95, agree


@pytest.mark.parametrize('arch,kw', [('llama', {}), ('qwen2', dict(use_sliding_window=False, layer_types=['full_attention'] * 6)),
                                     ('gemma3', dict(sliding_window=128, layer_types=['sliding_attention'] * 6))])
@pytest.mark.parametrize('outtype', ['f32', 'q8_0'])
def test_gguf_round_trip_tiny(tmp_path, arch, kw, outtype):
    from transformers import AutoModelForCausalLM
    from layerprune.models import tiny_config, tiny_tokenizer
    from layerprune.prune import drop_layers, save_pruned
    from layerprune.export import export_gguf
    cfg = tiny_config(arch)
    for k, v in kw.items(): setattr(cfg, k, v)
    cfg.intermediate_size = 64; torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg).eval(); drop_layers(m, [1, 2])
    save_pruned(m, tiny_tokenizer(), tmp_path/'p')
    export_gguf(tmp_path/'p', tmp_path/'p.gguf', outtype=outtype)
    n_st, n_gguf, agree, diff = _agreement(tmp_path/'p', tmp_path/'p.gguf')
    assert n_st == n_gguf == 4
    if outtype == 'f32': assert diff < 1e-4, diff
    else: assert agree >= 0.95 and diff < 0.05, (agree, diff)


def test_gguf_refuses_opt_cleanly(tmp_path):
    from layerprune.models import tiny_model, tiny_tokenizer
    from layerprune.prune import save_pruned
    save_pruned(tiny_model('opt'), tiny_tokenizer(), tmp_path/'opt')
    r = run_cli('export-gguf', tmp_path/'opt', tmp_path/'opt.gguf')
    assert r.returncode == 2 and 'llama.cpp has no OPT architecture' in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and sorted(os.listdir(tmp_path)) == ['opt']


@pytest.mark.parametrize('env', [dict(HF_HUB_OFFLINE='1'),
                                 dict(HF_HUB_OFFLINE='0', HF_ENDPOINT='http://127.0.0.1:9', HF_TOKEN='hf_not_a_token')])
def test_push_to_hub_fails_after_saving(tmp_path, env, monkeypatch):
    "Without a reachable hub the push fails with one clear line, and the folder (with its card) is already saved."
    for k, v in env.items(): monkeypatch.setenv(k, v)
    r = run_cli('prune', '--model', 'tiny:llama', '--strategy', 'deepest', '--n', 2, '--out', tmp_path/'D', '--push-to-hub', 'me/pruned')
    assert r.returncode == 2, r.stderr[-2000:]
    err = [l for l in r.stderr.splitlines() if l.startswith('layerprune prune: error:')]
    assert len(err) == 1 and 'me/pruned' in err[0] and f'saved locally in {tmp_path/"D"}' in err[0], r.stderr[-2000:]
    assert 'Traceback' not in r.stderr
    assert (tmp_path/'D'/'model.safetensors').exists() and (tmp_path/'D'/'README.md').exists()


def test_lm_eval_cli_on_saved_pruned_model(tmp_path):
    "The plain lm-eval command, with the package's offline task files, scores a saved pruned model."
    r = run_cli('prune', '--model', 'tiny:llama', '--strategy', 'deepest', '--n', 2, '--out', tmp_path/'D')
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli('tasks', '--out', tmp_path/'tasks')
    assert r.returncode == 0 and '@DATA@' not in (tmp_path/'tasks'/'arc_easy.yaml').read_text(), r.stderr[-2000:]
    lm_eval = Path(sys.executable).parent/'lm_eval'
    r = subprocess.run([str(lm_eval), '--model', 'hf', '--model_args', f'pretrained={tmp_path/"D"},dtype=float32',
                        '--tasks', 'arc_easy', '--include_path', str(tmp_path/'tasks'), '--limit', '5', '--device', 'cpu',
                        '--batch_size', '4', '--output_path', str(tmp_path/'lm')], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    [res] = list((tmp_path/'lm').rglob('results_*.json'))
    out = json.loads(res.read_text())
    acc = out['results']['arc_easy']['acc,none']
    assert 0 <= acc <= 1 and out['n-samples']['arc_easy']['effective'] == 5
    assert out['config']['model_args']['pretrained'] == str(tmp_path/'D')
