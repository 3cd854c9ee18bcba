"Integration tests of layerprune.prune: surgery on every architecture, the real smollm2-135m, strategies, CLI errors."
import copy, json, subprocess, sys, os
from pathlib import Path
import pytest, torch, yaml
from layerprune.models import ARCHS, tiny_model, tiny_tokenizer, decoder, load_model
from layerprune.prune import (drop_layers, skip_layers, select_layers, layer_scores, verify_pruned, reference_logits,
                              reload_logits, save_pruned, mergekit_yaml, num_params, STRATEGIES)
from layerprune.utils import LayerpruneError
from layerprune.cli import main

IDS = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43]])
REMOVE = [1, 4]          # with the tiny models' sliding/full pattern S S F S S F -> kept S F S F
TEXTS = ['The quick brown fox jumps over the lazy dog.', 'Layer pruning removes the deeper layers.',
         'A fox and a dog.', 'Pruning layers of language models.']


# ---- every architecture: surgery is exact, cache-safe, and reloads with plain transformers -------------------------

@pytest.mark.parametrize('arch', ARCHS)
def test_surgery_every_arch(arch, tmp_path):
    m = tiny_model(arch, num_layers=6)
    orig = copy.deepcopy(m)
    types = list(getattr(m.config, 'layer_types', None) or [])
    expected = reference_logits(m, REMOVE, IDS)                        # unpruned model, removed layers = identity
    with torch.no_grad(), skip_layers(orig, REMOVE): virtual = orig(IDS).logits
    drop_layers(m, REMOVE)
    r = verify_pruned(m, IDS, reference=expected, reload='inprocess', max_new_tokens=10)
    assert r['ok'] and r['generation_cache_equal'], r
    assert r['cache_max_abs_diff'] < 1e-4 and r['reference_max_abs_diff'] < 1e-5 and r['reload_max_abs_diff'] == 0, r
    with torch.no_grad(): torch.testing.assert_close(m(IDS).logits, virtual, rtol=0, atol=1e-5)   # skip == drop
    assert decoder(m).num_layers == m.config.num_hidden_layers == 4
    if arch == 'gpt2': assert m.config.n_layer == 4
    idx = [mod.layer_idx for mod in decoder(m).layers.modules() if isinstance(getattr(mod, 'layer_idx', None), int)]
    assert sorted(set(idx)) == [0, 1, 2, 3]
    assert m.config.pruned_layers == REMOVE
    assert m.get_output_embeddings().weight is m.get_input_embeddings().weight          # still tied
    if types:  # the ORIGINAL pattern of the kept layers, not one regenerated for 4 layers
        kept = [types[i] for i in (0, 2, 3, 5)]
        assert m.config.layer_types == kept == ['sliding_attention', 'full_attention', 'sliding_attention', 'full_attention']
    # saved copy, loaded with plain transformers: same config, still tied, same logits
    m.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM
    re = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation='eager').eval()
    assert re.config.num_hidden_layers == 4 and re.config.pruned_layers == REMOVE
    if types: assert re.config.layer_types == m.config.layer_types
    assert re.get_output_embeddings().weight is re.get_input_embeddings().weight
    with torch.no_grad(): assert torch.equal(re(IDS).logits, m(IDS).logits)


@pytest.mark.parametrize('arch', ['qwen2', 'gemma3', 'gpt2'])
def test_repeated_prunes_match_one_prune(arch):
    once = drop_layers(tiny_model(arch, num_layers=8), [1, 2, 6])
    twice = drop_layers(drop_layers(tiny_model(arch, num_layers=8), [6]), [2, 1])
    assert once.config.pruned_layers == twice.config.pruned_layers == [1, 2, 6]
    with torch.no_grad(): torch.testing.assert_close(once(IDS).logits, twice(IDS).logits, rtol=0, atol=0)
    assert verify_pruned(twice, IDS, reference=tiny_model(arch, num_layers=8), reload=None)['ok']


def test_naive_surgery_is_caught():
    "The self-check fails on a model whose layer_types were regenerated instead of sliced."
    m = tiny_model('qwen2'); exp = reference_logits(m, REMOVE, IDS)
    drop_layers(m, REMOVE); m.config.layer_types = tiny_model('qwen2', num_layers=4).config.layer_types
    with pytest.raises(LayerpruneError, match='reference_max_abs_diff'): verify_pruned(m, IDS, reference=exp, reload=None)


def test_skip_layers_restores_on_error():
    m = tiny_model('gemma3'); st = [id(l) for l in decoder(m).layers]; types = list(m.config.layer_types)
    with pytest.raises(RuntimeError):
        with skip_layers(m, [0, 5]):
            assert decoder(m).num_layers == 4; raise RuntimeError
    assert [id(l) for l in decoder(m).layers] == st and m.config.layer_types == types and m.config.num_hidden_layers == 6
    assert [l.self_attn.layer_idx for l in decoder(m).layers] == list(range(6)) and 'pruned_layers' not in vars(m.config)


# ---- bad input: one clear error, nothing changed or written ---------------------------------------------------------

def test_bad_inputs(tmp_path):
    m = tiny_model('llama'); tok = tiny_tokenizer()
    for layers, msg in [([], 'empty'), ([2, 2], 'duplicate'), ([6], 'out of range'), ([-1], 'out of range'),
                        (list(range(6)), 'keep at least one'), (['a'], 'integers')]:
        with pytest.raises(LayerpruneError, match=msg): drop_layers(m, layers)
    assert decoder(m).num_layers == 6 and 'pruned_layers' not in vars(m.config)
    for n in (0, 6, 7, -2, 1.5):
        with pytest.raises(LayerpruneError, match=r'1 <= n < 6'): select_layers(m, n, 'deepest')
    with pytest.raises(LayerpruneError, match='known: similarity, deepest, reverse, random, magnitude-l1, magnitude-l2, taylor, ppl, bi'):
        select_layers(m, 1, 'cosine')
    for s in ('similarity', 'taylor', 'ppl', 'bi'):
        with pytest.raises(LayerpruneError, match='needs calibration data'): select_layers(m, 1, s)
        with pytest.raises(LayerpruneError, match='needs calibration data'): select_layers(m, 1, s, tokenizer=tok, texts=[])
    # CLI: existing non-empty output dir / mergekit file -> exit 2 before any work, nothing written
    out = tmp_path/'out'; out.mkdir(); (out/'keep.txt').write_text('mine')
    assert main(['prune', '--model', 'tiny:llama', '--strategy', 'deepest', '--n', '2', '--out', str(out),
                 '--mergekit', str(tmp_path/'m.yaml')]) == 2
    assert [p.name for p in out.iterdir()] == ['keep.txt'] and not (tmp_path/'m.yaml').exists()
    (tmp_path/'m2.yaml').write_text('x')
    assert main(['prune', '--model', 'tiny:llama', '--strategy', 'deepest', '--n', '2', '--mergekit', str(tmp_path/'m2.yaml')]) == 2
    assert (tmp_path/'m2.yaml').read_text() == 'x'
    for argv in (['--strategy', 'nope', '--n', '1'], ['--strategy', 'deepest', '--n', '0'], ['--strategy', 'deepest', '--n', '6'],
                 ['--strategy', 'bi', '--n', '1', '--text', str(tmp_path/'missing.txt')]):
        assert main(['prune', '--model', 'tiny:llama', *argv, '--out', str(tmp_path/'o')]) == 2
    assert not (tmp_path/'o').exists()
    # --overwrite replaces it
    assert main(['prune', '--model', 'tiny:llama', '--strategy', 'reverse', '--n', '2', '--out', str(out), '--overwrite', '--no-verify']) == 0
    assert json.loads((out/'layerprune_report.json').read_text())['removed_layers'] == [4, 5] and not (out/'keep.txt').exists()


# ---- strategies -----------------------------------------------------------------------------------------------------

def test_block_strategies():
    for L in (2, 5, 30):
        m = tiny_model('gpt2', num_layers=L)
        for n in range(1, L):
            d, r = select_layers(m, n, 'deepest'), select_layers(m, n, 'reverse')
            assert d == list(range(L - n - 1, L - 1)) and L - 1 not in d          # deepest never removes L-1
            assert r == list(range(L - n, L)) and L - 1 in r                      # reverse always does
            x = select_layers(m, n, 'random', seed=n)
            assert x == select_layers(m, n, 'random', seed=n) and len(set(x)) == n and all(0 <= i < L for i in x)
    m = tiny_model('gpt2', num_layers=30)
    assert len({tuple(select_layers(m, 5, 'random', seed=s)) for s in range(10)}) > 1


def test_similarity_is_argmin_of_distances():
    dist = pytest.importorskip('layerprune.distance')
    m = tiny_model('llama', num_layers=8); tok = tiny_tokenizer()
    res = dist.angular_distances(m, tok, TEXTS, seq_len=16, batch_size=2)
    D = res.mean
    for n in range(1, 8):
        l = min(range(8 - n + 1), key=lambda l: D[l, l + n])
        assert select_layers(m, n, 'similarity', tokenizer=tok, texts=TEXTS, seq_len=16, batch_size=2) == list(range(l, l + n))
        assert select_layers(m, n, 'similarity', distances=res, tokenizer=tok, texts=TEXTS) == list(range(l, l + n))


def test_metric_strategies_find_identity_layer():
    "A layer with zeroed o_proj and down_proj returns its input: bi, taylor and ppl rank it least important."
    m = tiny_model('llama', num_layers=6); tok = tiny_tokenizer()
    with torch.no_grad():
        m.model.layers[3].self_attn.o_proj.weight.zero_(); m.model.layers[3].mlp.down_proj.weight.zero_()
    bi = layer_scores(m, 'bi', tok, TEXTS)
    assert abs(bi[3]) < 1e-6 and min(s for i, s in enumerate(bi) if i != 3) > 1e-3
    assert select_layers(m, 1, 'bi', tokenizer=tok, texts=TEXTS) == [3]
    assert select_layers(m, 1, 'taylor', tokenizer=tok, texts=TEXTS) == [3]
    ppl = layer_scores(m, 'ppl', tok, TEXTS)
    from layerprune.loss import lm_loss
    mean_nll = lambda m, tok, texts: lm_loss(m, tok, texts, 128)['nats']
    assert abs(ppl[3] - mean_nll(m, tok, TEXTS)) < 1e-5                           # removing it changes nothing
    def loss_without(l):
        with skip_layers(m, [l]): return mean_nll(m, tok, TEXTS)
    losses = [loss_without(l) for l in range(6)]
    assert ppl == pytest.approx(losses, abs=1e-6)
    assert select_layers(m, 2, 'ppl', tokenizer=tok, texts=TEXTS) == sorted(sorted(range(6), key=losses.__getitem__)[:2])
    # magnitude: scaling one layer's weights down makes it the least important under both norms
    m2 = tiny_model('llama', num_layers=6)
    with torch.no_grad():
        for p in m2.model.layers[4].parameters(): p.mul_(0.1)
    assert select_layers(m2, 1, 'magnitude-l1') == select_layers(m2, 1, 'magnitude-l2') == [4]
    assert all(p.grad is None for p in m.parameters())


def test_mergekit_yaml_equivalent():
    for removed in ([0], [29], [3, 4, 5], [0, 7, 8, 29]):
        cfg = yaml.safe_load(mergekit_yaml(30, removed, 'HuggingFaceTB/SmolLM2-135M', dtype='bfloat16'))
        kept = [i for s in cfg['slices'] for a, b in [s['sources'][0]['layer_range']] for i in range(a, b)]
        assert kept == [i for i in range(30) if i not in removed] and cfg['merge_method'] == 'passthrough'
        assert all(s['sources'][0]['model'] == 'HuggingFaceTB/SmolLM2-135M' for s in cfg['slices'])


# ---- the real smollm2-135m ------------------------------------------------------------------------------------------

def test_smollm2_params_per_layer(smollm2):
    model, tok = smollm2
    per_layer = sum(p.numel() for p in decoder(model).layers[0].parameters())
    before = num_params(model)
    with skip_layers(model, [10, 11, 12]): after = num_params(model)
    assert before - after == 3 * per_layer
    assert num_params(model) == before


def test_smollm2_prune_save_reload_generate(smollm2, tmp_path):
    model, tok = smollm2
    m = copy.deepcopy(model)
    layers = select_layers(m, 6, 'deepest')
    assert layers == list(range(23, 29))
    before, per_layer = num_params(m), sum(p.numel() for p in decoder(m).layers[0].parameters())
    ids = tok('The capital of France is', return_tensors='pt')['input_ids']
    expected = reference_logits(m, layers, ids)
    drop_layers(m, layers)
    assert before - num_params(m) == 6 * per_layer
    r = verify_pruned(m, ids, reference=expected, reload=None, max_new_tokens=6)
    assert r['ok'] and r['reference_max_abs_diff'] < 1e-4 and r['cache_max_abs_diff'] < 1e-2, r
    out = save_pruned(m, tok, tmp_path/'pruned', report=dict(strategy='deepest', params_before=before))
    rep = json.loads((out/'layerprune_report.json').read_text())
    assert rep['removed_layers'] == layers and rep['params_before'] - rep['params_after'] == 6 * per_layer
    # a fresh python that never imports layerprune loads and generates
    # same intra-op thread count as this process, so float reductions run in the same order (bit-identical)
    code = (f'import sys, torch\ntorch.set_num_threads({torch.get_num_threads()})\n'
            'from transformers import AutoModelForCausalLM, AutoTokenizer\n'
            f'p = {str(out)!r}\nt = AutoTokenizer.from_pretrained(p); m = AutoModelForCausalLM.from_pretrained(p)\n'
            'ids = t("The capital of France is", return_tensors="pt")\n'
            'torch.save(m(ids["input_ids"]).logits.detach(), "logits.pt")\n'
            'print(m.config.num_hidden_layers, m.generate(**ids, max_new_tokens=6, do_sample=False)[0].tolist())\n'
            'assert "layerprune" not in sys.modules')
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    p = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    L, toks = p.stdout.strip().splitlines()[-1].split(' ', 1)
    assert int(L) == 24
    with torch.no_grad():
        mine = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)[0].tolist()
    assert json.loads(toks) == mine and len(mine) == ids.shape[1] + 6
    with torch.no_grad(): assert torch.equal(torch.load(tmp_path/'logits.pt'), m(ids).logits)   # identical logits


def test_smollm2_bi_finds_identity_layer(smollm2):
    model, tok = smollm2
    from layerprune.data import load_texts
    m = copy.deepcopy(model)
    with torch.no_grad():
        m.model.layers[13].self_attn.o_proj.weight.zero_(); m.model.layers[13].mlp.down_proj.weight.zero_()
    texts = load_texts('wiki', 'train', n=4)
    assert select_layers(m, 1, 'bi', tokenizer=tok, texts=texts, seq_len=32)[0] == 13


def test_cli_prune_verifies_and_exports(tmp_path):
    "The CLI path end to end (default: verified, with a plain-transformers reload in a fresh process)."
    out = tmp_path/'out'; txt = tmp_path/'cal.txt'; txt.write_text('\n\n'.join(TEXTS))
    assert main(['prune', '--model', 'tiny:gemma3', '--strategy', 'bi', '--n', '2', '--text', str(txt), '--seq-len', '32',
                 '--out', str(out), '--mergekit', str(tmp_path/'m.yaml')]) == 0
    rep = json.loads((out/'layerprune_report.json').read_text())
    assert rep['n'] == 2 and len(rep['removed_layers']) == 2 and rep['verified'] and rep['num_layers_after'] == 4
    cfg = yaml.safe_load((tmp_path/'m.yaml').read_text())
    kept = [i for s in cfg['slices'] for a, b in [s['sources'][0]['layer_range']] for i in range(a, b)]
    assert kept == [i for i in range(6) if i not in rep['removed_layers']]
    saved = json.loads((out/'config.json').read_text())
    assert saved['pruned_layers'] == rep['removed_layers'] and saved['num_hidden_layers'] == 4


# ---- the paper figure notebook runs end to end --------------------------------------------------------------------

def test_unhealed_loss_notebook_executes(run_paper):
    "papermill through the runner, tiny model, every strategy: PNG+PDF+CSV+JSON, resumable from the cache."
    small = dict(model_name='tiny:qwen2', eval_samples=3, calib_samples=3, seq_len=24, batch_size=3, fractions=[0.0, 0.5])
    r, tmp_path = run_paper({'unhealed_loss': small})
    assert r.returncode == 0, r.stderr + r.stdout
    names = sorted(p.name for p in (tmp_path/'figures').iterdir())
    assert names == sorted(f'unhealed_loss_tiny_qwen2.{e}' for e in ('png', 'pdf', 'csv', 'json', 'run.json'))
    import csv
    rows = list(csv.DictReader(open(tmp_path/'figures'/'unhealed_loss_tiny_qwen2.csv')))
    assert len(rows) == 9 * 2 and {r['strategy'] for r in rows} == set(STRATEGIES)
    assert len({r['loss'] for r in rows if r['n'] == '0'}) == 1                   # n = 0: the intact model, every strategy
    j = json.loads((tmp_path/'figures'/'unhealed_loss_tiny_qwen2.json').read_text())
    assert j['selections']['reverse']['3'] == [3, 4, 5] and j['selections']['deepest']['3'] == [2, 3, 4]
