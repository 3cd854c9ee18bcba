"Layer-streamed distances: the same matrix as the in-memory pass, with at most one decoder layer in memory at a time."
import json, subprocess, sys
import numpy as np
import pytest
import torch
from layerprune.models import ARCHS, decoder, load_model, tiny_model, tiny_tokenizer
from layerprune.distance import angular_distances
from layerprune.utils import LayerpruneError
from layerprune import streamed
from layerprune.streamed import streamed_distances, _record_layer_inputs, _skeleton
from conftest import run_cli, ROOT

TEXTS = ['The quick brown fox jumps over the lazy dog.', 'Layer pruning.', 'Deeper layers are often redundant, say Gromov et al.',
         'A fox.', 'Removing layers [2, 5) drops three of them (0-based, half-open).', 'The lazy dog sleeps.']


def saved(tmp_path, arch, shard=None, **kw):
    d = tmp_path/arch
    tiny_model(arch, num_layers=5, **kw).save_pretrained(d, **({'max_shard_size': shard} if shard else {}))
    tiny_tokenizer().save_pretrained(d)
    return d


@pytest.mark.parametrize('arch', ARCHS)
@pytest.mark.parametrize('shard', [None, '50KB'])
def test_same_matrix_as_in_memory(tmp_path, arch, shard):
    d = saved(tmp_path, arch, shard)
    if shard: assert len(list(d.glob('model-*.safetensors'))) > 1 and (d/'model.safetensors.index.json').exists()
    ref = angular_distances(*load_model(d), TEXTS, seq_len=32, batch_size=2)
    s = streamed_distances(d, None, TEXTS, seq_len=32, batch_size=2)
    assert np.abs(s.mean - ref.mean).max() < 1e-6 and np.abs(s.sem - ref.sem).max() < 1e-6
    assert s.best_start == ref.best_start and s.num_samples == ref.num_samples == len(TEXTS)
    assert ref.mean[0, 1] > 0.01   # a real, non-trivial matrix


def test_untied_and_chunks_and_padding(tmp_path):
    d = saved(tmp_path, 'llama', tie=False)
    ref = angular_distances(*load_model(d), TEXTS, seq_len=32, batch_size=2)
    for kw in (dict(chunk_size=1), dict(chunk_size=4, padding_side='left'), dict(batch_size=6)):
        s = streamed_distances(d, None, TEXTS, seq_len=32, **{'batch_size': 2, **kw})
        assert np.abs(s.mean - ref.mean).max() < 1e-6, kw


def test_one_layer_in_memory_at_a_time(tmp_path, monkeypatch):
    d = saved(tmp_path, 'gemma3')
    seen = []
    step = streamed._Chunk.step
    def spy(self, layer, i):
        layers = decoder(layer_owner[0]).layers
        seen.append([j for j, l in enumerate(layers) if not any(p.is_meta for p in l.parameters())])
        return step(self, layer, i)
    layer_owner = []
    skel = streamed._skeleton
    monkeypatch.setattr(streamed, '_skeleton', lambda *a: layer_owner.append(skel(*a)) or layer_owner[-1])
    monkeypatch.setattr(streamed._Chunk, 'step', spy)
    streamed_distances(d, None, TEXTS, seq_len=32, batch_size=2, chunk_size=3)
    assert seen == [[i] for i in range(5)] * 2   # two chunks, each layer alone in memory while it runs
    m = layer_owner[0]
    assert all(p.is_meta for p in m.lm_head.parameters())                      # the LM head is never read
    assert all(p.is_meta for l in decoder(m).layers for p in l.parameters())   # freed at the end


def test_bf16_and_dispatch(tmp_path):
    d = saved(tmp_path, 'qwen2')
    ref = angular_distances(*load_model(d, dtype='bfloat16'), TEXTS, seq_len=32, batch_size=2)
    s = angular_distances(str(d), None, TEXTS, seq_len=32, batch_size=2, dtype='bfloat16', streamed=True)
    assert np.abs(s.mean - ref.mean).max() < 1e-6


def test_errors(tmp_path):
    d = saved(tmp_path, 'llama')
    with pytest.raises(LayerpruneError, match='unquantised'): streamed_distances(d, None, TEXTS, quantization='nf4')
    with pytest.raises(LayerpruneError, match='not a loaded model'): angular_distances(tiny_model(), tiny_tokenizer(), TEXTS, streamed=True)
    with pytest.raises(LayerpruneError, match='no texts'): streamed_distances(d, None, [])
    b = tmp_path/'noweights'; b.mkdir(); (b/'config.json').write_text((d/'config.json').read_text())
    with pytest.raises(LayerpruneError, match='no safetensors'): streamed_distances(b, tiny_tokenizer(), TEXTS)
    # a backbone that does not run every layer (num_hidden_layers below the module count) is refused, not mis-measured
    m = _skeleton(d, torch.float32); m.config.num_hidden_layers = 4
    from layerprune.data import batches
    streamed._load_params(streamed.Checkpoint(d), m, [n for n, _ in m.model.named_parameters(prefix='model') if '.layers.' not in n], 'cpu')
    with pytest.raises(LayerpruneError, match='does not call each decoder layer'):
        _record_layer_inputs(m, next(iter(batches(TEXTS, tiny_tokenizer(), 16, 2))))


def test_cli(tmp_path):
    d = saved(tmp_path, 'mistral')
    a, b = tmp_path/'a.json', tmp_path/'b.json'
    for out, extra in ((a, []), (b, ['--streamed'])):
        r = run_cli('distances', '--model', d, '--samples', 4, '--seq-len', 32, '--batch-size', 2, '--out', out, *extra)
        assert r.returncode == 0, r.stderr
    ja, jb = json.loads(a.read_text()), json.loads(b.read_text())
    assert ja['best_start'] == jb['best_start'] and np.abs(np.array(ja['distances'][0]) - jb['distances'][0]).max() < 1e-6
    r = run_cli('distances', '--model', 'tiny:llama', '--streamed', '--out', tmp_path/'c.json')
    assert r.returncode == 2 and 'error' in r.stderr and not (tmp_path/'c.json').exists()


def test_smollm2(wiki_val):
    texts = wiki_val[:8]
    ref = angular_distances(*load_model('smollm2-135m'), texts, seq_len=64, batch_size=4)
    s = streamed_distances('smollm2-135m', None, texts, seq_len=64, batch_size=4)
    assert s.num_layers == 30 and np.abs(s.mean - ref.mean).max() < 1e-6 and s.best_start == ref.best_start


def test_bench_streamed(tmp_path):
    "bench/distance.py --streamed on a tiny model: its ratio lines, and the two passes give the same matrix."
    import os
    out = tmp_path/'b.json'
    env = {**os.environ, 'PYTHONPATH': os.environ.get('PYTHONPATH') or str(ROOT)}
    r = subprocess.run([sys.executable, str(ROOT/'bench'/'distance.py'), '--streamed', '--model', 'tiny:llama', '--samples', '3',
                        '--seq-len', '16', '--batch-size', '2', '--repeats', '1', '--json', str(out)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for line in ('streamed / in-memory time = ', 'streamed / in-memory peak memory = ', 'matrix max |streamed - in-memory|'):
        assert line in r.stdout
    res = json.loads(out.read_text())
    assert res['max_abs_diff'] < 1e-6 and res['same_best_start'] and res['time_ratio'] > 0 and res['memory_ratio'] > 0
