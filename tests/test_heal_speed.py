"Faster healing (issue 12 item 4): the fast paths give the loss curves of the plain loop on tiny models (fp32, within 1e-5)."
import pytest, torch
from torch import nn
from layerprune.heal import HealConfig, heal
from layerprune.heal.train import set_threads, _boundary, _from_boundary, _Prefix
from layerprune.models import tiny_model, tiny_tokenizer, decoder
from layerprune.data import load_texts, pack


@pytest.fixture(autouse=True, scope='module')
def _one_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pruned_tiny(arch='llama'):
    "A 6-layer tiny model with layers [2, 4) removed (0-based, half-open)."
    m = tiny_model(arch, 6); d = decoder(m)
    setattr(d.owner, d.attr, nn.ModuleList([l for i, l in enumerate(d.layers) if not 2 <= i < 4]))
    m.config.num_hidden_layers = d.num_layers
    if getattr(m.config, 'layer_types', None): m.config.layer_types = [t for i, t in enumerate(m.config.layer_types) if not 2 <= i < 4]
    return m


def assert_same_training(w1, w0, init, rel=1e-3):
    """The two runs trained the same: every weight's update (from `init`) agrees to `rel` of its size (in norm; Adam turns
    last-bit differences of a near-zero gradient into element-wise differences of ~1e-5 that depend on the CPU's kernels),
    and weights that did not train are equal."""
    assert w1.keys() == w0.keys()
    for k in w0:
        d0 = w0[k].float() - init[k].float() if k in init and init[k].shape == w0[k].shape else None
        if d0 is None or d0.norm() == 0: torch.testing.assert_close(w1[k], w0[k], atol=1e-6, rtol=0, msg=f'{k}: should be equal'); continue
        err = (w1[k].float() - w0[k].float()).norm() / d0.norm()
        assert err <= rel, f'{k}: the runs\' updates differ by {err:.1e} of their size (allowed {rel:.0e})'


@pytest.fixture(scope='module')
def tok(): return tiny_tokenizer()

@pytest.fixture(scope='module')
def few(tok):
    "Texts that pack into 6 blocks of 32 tokens: 12 steps x batch 4 go over them 8 times (the boundary cache is hit)."
    texts = load_texts('wiki', 'train', n=300)
    out = []
    for t in texts:
        out.append(t)
        if len(pack(out, tok, 32)) >= 6: return out
    raise AssertionError('not enough text')


def run(tok, texts, fast, **kw):
    cfg = HealConfig(**{**dict(method='partial', last_k=1, steps=12, warmup=1, lr=1e-2, batch_size=4, micro_batch=2, seq_len=32,
                               rank=4, dropout=0.0), **kw})
    m, log = heal(pruned_tiny(), tok, cfg, texts, progress=False, fast=fast)
    return {k: v.detach().clone() for k, v in m.state_dict().items()}, log



@pytest.mark.parametrize('last_k', [0, 1, 3])
def test_partial_fast_matches_plain_loop(tok, few, last_k):
    w0, slow = run(tok, few, False, last_k=last_k)
    w1, fast = run(tok, few, True, last_k=last_k)
    assert fast['frozen_prefix_layers'] == 4 - last_k and slow['frozen_prefix_layers'] == 0
    assert fast['optimizer'] == 'adamw-fused' and slow['optimizer'] == 'adamw'
    assert fast['boundary_cache']['hits'] > 0  # repeated blocks reused their cached boundary states
    torch.testing.assert_close(torch.tensor(fast['loss']), torch.tensor(slow['loss']), atol=1e-5, rtol=0)
    assert slow['loss'][-1] < slow['loss'][0] - 0.1  # it really trains
    assert_same_training(w1, w0, pruned_tiny().state_dict())


def test_partial_without_cache_and_lora_match(tok, few):
    cfg = dict(method='partial', last_k=1, steps=12, warmup=1, lr=1e-2, batch_size=4, micro_batch=2, seq_len=32)
    _, slow = heal(pruned_tiny(), tok, HealConfig(**cfg), few, progress=False, fast=False)
    _, nocache = heal(pruned_tiny(), tok, HealConfig(**cfg), few, progress=False, boundary_cache_mb=0)
    assert nocache['boundary_cache']['hits'] == 0 and nocache['boundary_cache']['mb'] == 0
    torch.testing.assert_close(torch.tensor(nocache['loss']), torch.tensor(slow['loss']), atol=1e-5, rtol=0)
    _, a = run(tok, few, False, method='lora'); _, b = run(tok, few, True, method='lora')
    assert 'boundary_cache' not in b and b['frozen_prefix_layers'] == 0
    torch.testing.assert_close(torch.tensor(b['loss']), torch.tensor(a['loss']), atol=1e-5, rtol=0)


def test_dropout_in_prefix_turns_the_fast_path_off(tok, few):
    m = pruned_tiny(); m.config.attention_dropout = 0.1
    _, log = heal(m, tok, HealConfig(method='partial', last_k=1, steps=2, warmup=1, batch_size=4, micro_batch=2, seq_len=32),
                  few, progress=False)
    assert log['frozen_prefix_layers'] == 0 and 'boundary_cache' not in log


def test_skipped_prefix_gives_the_full_forward():
    m = pruned_tiny().eval(); x = torch.randint(0, 100, (2, 12))
    with torch.no_grad(): ref = m(input_ids=x, use_cache=False).logits
    for first in (1, 3, 4):
        p = _Prefix(m, first, 10**9)
        h = p.states(m, x, [0, 1], 'cpu'); assert not h.requires_grad
        with torch.no_grad(), _from_boundary(m, first, p.states(m, x, [1, 0], 'cpu')[[1, 0]], p.tuple_out):
            out = m(input_ids=x, use_cache=False).logits
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
        assert p.hits == 2 and p.misses == 2
    assert all('forward' not in l.__dict__ for l in decoder(m).layers)  # the skip is undone


def test_set_threads():
    n0 = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
        n = set_threads('auto'); assert torch.get_num_threads() == n >= 1
        with pytest.raises(Exception, match='positive integer'): set_threads(0)
    finally: torch.set_num_threads(n0)


FSDP_SCRIPT = r'''
import json, sys, torch
from torch import nn
from layerprune.heal import HealConfig, heal
from layerprune.models import tiny_model, tiny_tokenizer, decoder
from layerprune.data import load_texts
torch.set_num_threads(1)
out, kill = sys.argv[1], int(sys.argv[2])
def pruned():
    m = tiny_model('llama', 6); d = decoder(m)
    setattr(d.owner, d.attr, nn.ModuleList([l for i, l in enumerate(d.layers) if not 2 <= i < 4])); m.config.num_hidden_layers = 4
    return m
cfg = HealConfig(method='partial', last_k=2, steps=8, warmup=2, lr=3e-3, batch_size=8, micro_batch=2, seq_len=32, save_every=3)
tok, texts = tiny_tokenizer(), load_texts('wiki', 'train', n=300)
class Killed(Exception): pass
def cb(step, log):
    if step == kill: raise Killed
try: heal(pruned(), tok, cfg, texts, out, progress=False, callback=cb, parallel='fsdp' if kill < 99 else 'ddp')
except Killed: pass
healed, log = heal(pruned(), tok, cfg, texts, out, progress=False, resume=True, overwrite=True, parallel='fsdp' if kill < 99 else 'ddp')
if torch.distributed.is_initialized() and torch.distributed.get_rank() > 0: assert healed is None
'''


def test_fsdp_two_processes_gloo_match_single_process_with_resume(tmp_path):
    "FSDP2 (fully_shard) over 2 CPU processes (gloo): killed at step 5, resumed from the step-3 checkpoint (gathered, then"
    "re-sharded), the same loss curve and weights as one uninterrupted process (1e-4); the merged model is saved by rank 0."
    import json, os, subprocess, sys
    from pathlib import Path
    from safetensors.torch import load_file
    repo = Path(__file__).resolve().parents[1]; (tmp_path/'s.py').write_text(FSDP_SCRIPT)
    env = {**os.environ, 'PYTHONPATH': str(repo), 'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1', 'TOKENIZERS_PARALLELISM': 'false'}
    r = subprocess.run([sys.executable, str(tmp_path/'s.py'), str(tmp_path/'one'), '99'], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    torchrun = Path(sys.executable).parent/'torchrun'
    r = subprocess.run([str(torchrun), '--nproc_per_node', '2', '--master_port', '29547', str(tmp_path/'s.py'), str(tmp_path/'two'), '5'],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = (json.loads((tmp_path/d/'heal_log.json').read_text()) for d in ('one', 'two'))
    assert two['world_size'] == 2 and two['parallel'] == 'fsdp' and two['resumed_from'] == 3 and one['world_size'] == 1
    torch.testing.assert_close(torch.tensor(two['loss']), torch.tensor(one['loss']), atol=1e-4, rtol=0)
    w1, w2 = (load_file(str(tmp_path/d/'model.safetensors')) for d in ('one', 'two'))
    assert set(w1) == set(w2) and all(torch.allclose(w1[k], w2[k], atol=1e-4) for k in w1)
    assert not (tmp_path/'two.checkpoints').exists()


@pytest.mark.parametrize('dropout,target', [(0.1, 'ffn'), (0.0, 'all-linear')])
def test_lora_fast_matches_plain_loop(tok, few, dropout, target):
    "Lean LoRA layers (one autograd node each, the same dropout masks) and the fused loss give the plain loop's curve and weights."
    w0, slow = run(tok, few, False, method='lora', dropout=dropout, target=target)
    w1, fast = run(tok, few, True, method='lora', dropout=dropout, target=target)
    assert fast['fused_loss'] and fast['lean_lora_layers'] == 4 * (3 if target == 'ffn' else 7)  # 4 layers x LoRA targets
    assert not slow['fused_loss'] and 'lean_lora_layers' not in slow
    torch.testing.assert_close(torch.tensor(fast['loss']), torch.tensor(slow['loss']), atol=1e-5, rtol=0)
    assert slow['loss'][-1] < slow['loss'][0] - 0.05  # it really trains (LoRA on a tiny model: slowly)
    assert_same_training(w1, w0, pruned_tiny().state_dict())
