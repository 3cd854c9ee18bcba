"GPU-only checks (`make gpu-check` runs them with `-m gpu`); skipped where there is no CUDA device, as in CI."
import pytest, torch
from layerprune.models import load_model, tiny_model, tiny_tokenizer, decoder
from layerprune.prune import drop_layers, reference_logits, verify_pruned
from layerprune.distance import angular_distances

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')]
TEXTS = ['The quick brown fox jumps over the lazy dog.', 'Layer pruning removes the deeper layers of a model.'] * 4

def test_default_dtype_on_cuda_is_bf16_and_tf32_on():
    model, _ = load_model('tiny:llama', device='cuda')
    assert model.dtype == torch.bfloat16 and next(model.parameters()).is_cuda
    assert torch.backends.cuda.matmul.allow_tf32

def test_bf16_prune_verifies_on_cuda(tmp_path):
    model, tok = load_model('tiny:qwen2', dtype='bfloat16', device='cuda')
    ref = reference_logits(model, [1, 2], tok); drop_layers(model, [1, 2])
    assert verify_pruned(model, tok, reference=ref, reload='inprocess')['ok']

def test_cuda_distances_match_cpu():
    tok = tiny_tokenizer()
    cpu = angular_distances(tiny_model('llama'), tok, TEXTS, 32, 4)
    gpu = angular_distances(tiny_model('llama').cuda(), tok, TEXTS, 32, 4)
    assert abs(cpu.mean - gpu.mean).max() < 1e-4 and cpu.best_start == gpu.best_start

def test_nf4_loads_and_runs():
    model, tok = load_model('tiny:llama', quantization='nf4', device='cuda')
    with torch.no_grad(): out = model(**{k: v.cuda() for k, v in tok('hello world', return_tensors='pt').items()})
    assert torch.isfinite(out.logits).all()
