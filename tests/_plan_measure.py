"""Measured peaks for tests/test_plan.py, run in a fresh process (clean memory accounting); prints RESULT <json>.
Run it with MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0 so that glibc returns every freed large tensor to the OS
(RSS then follows live memory; with glibc's adaptive threshold a repeated pass reuses retained heap and shows no peak)."""
import json, sys
import torch
from layerprune.utils import PeakMemory

def wide_model(attn):
    "A 4-layer llama that is wide for its depth, so one batch's activations are large next to the noise."
    from transformers import LlamaConfig, AutoModelForCausalLM
    cfg = LlamaConfig(vocab_size=320, hidden_size=256, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True, pad_token_id=0,
                      bos_token_id=1, eos_token_id=1)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation=attn).eval()

def main(B, T, reps=1):
    torch.set_num_threads(1)
    from layerprune.models import tiny_tokenizer
    from layerprune.distance import angular_distances
    from layerprune.loss import lm_loss
    tok = tiny_tokenizer()
    texts = [' '.join(f'word{i * 7 + j} the of and' for j in range(T)) for i in range(B)]   # every document fills T tokens
    wide_model('sdpa')                                                          # imports, first allocations (freed)
    with PeakMemory(interval=0.0005) as pw: model = wide_model('sdpa')
    out = dict(config=model.config.to_dict(), weights_rss=pw.delta,
               weights_bytes=sum(p.numel() * p.element_size() for p in model.parameters()))
    # each pass runs once unmeasured first: tokenizer objects, kernels and thread pools stay; the big tensors go back
    # to the OS when freed, so a later pass's peak above its start is the stage's transient memory. The sampler can miss
    # a short-lived peak (never report one that was not there), so the largest of `reps` passes is kept.
    for name, fn in [('distances', lambda: angular_distances(model, tok, texts, seq_len=T, batch_size=B)),
                     ('loss', lambda: lm_loss(model, tok, texts, seq_len=T, batch_size=B))]:
        fn(); peaks = []
        for _ in range(reps):
            with PeakMemory(interval=0.0005) as p: fn()
            peaks.append(p.delta)
        out[f'{name}_rss'] = max(peaks); out[f'{name}_rss_all'] = peaks
    print('RESULT ' + json.dumps(out))

if __name__ == '__main__': main(int(sys.argv[1]), int(sys.argv[2]))
