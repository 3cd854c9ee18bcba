"Measured peaks for tests/test_plan.py, run in a fresh process (clean memory accounting); prints RESULT <json>."
import json, os, sys, threading, time
import torch

def rss():
    with open('/proc/self/statm') as f: return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')

class Peak:
    "Peak RSS above the level at entry, sampled every 0.5 ms."
    def __enter__(self):
        self.base = self.peak = rss(); self.stop = False
        def loop():
            while not self.stop: self.peak = max(self.peak, rss()); time.sleep(0.0005)
        self.t = threading.Thread(target=loop, daemon=True); self.t.start(); return self
    def __exit__(self, *a):
        self.stop = True; self.t.join(); self.peak = max(self.peak, rss()); self.delta = self.peak - self.base

def wide_model(attn):
    "A 4-layer llama that is wide for its depth, so one batch's activations are large next to the noise."
    from transformers import LlamaConfig, AutoModelForCausalLM
    cfg = LlamaConfig(vocab_size=320, hidden_size=256, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True, pad_token_id=0,
                      bos_token_id=1, eos_token_id=1)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation=attn).eval()

def main(what, B, T):
    torch.set_num_threads(1)
    from layerprune.models import tiny_tokenizer
    from layerprune.distance import angular_distances
    from layerprune.evaluate import lm_loss
    tok = tiny_tokenizer()
    texts = [' '.join(f'word{i * 7 + j} the of and' for j in range(T)) for i in range(B)]   # every document fills T tokens
    wide_model('sdpa')                                                          # imports, first allocations (freed)
    with Peak() as pw: model = wide_model('sdpa')
    out = dict(config=model.config.to_dict(), weights_rss=pw.delta,
               weights_bytes=sum(p.numel() * p.element_size() for p in model.parameters()))
    # each pass runs once unmeasured first: tokenizer objects, kernels and thread pools stay; the big tensors go back
    # to the OS when freed, so the second pass's peak above its start is the stage's transient memory
    for name, fn in [('distances', lambda: angular_distances(model, tok, texts, seq_len=T, batch_size=B)),
                     ('loss', lambda: lm_loss(model, tok, texts, seq_len=T, batch_size=B))]:
        fn()
        with Peak() as p: fn()
        out[f'{name}_rss'] = p.delta
    print('RESULT ' + json.dumps(out))

if __name__ == '__main__': main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
