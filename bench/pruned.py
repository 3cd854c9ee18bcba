"""Benchmark: is a pruned model really smaller and faster? Measured vs ideal ratios for n = 0, L/4, L/2.

The model is pruned with `layerprune.prune.drop_layers` (removing the layers `--strategy` picks, default Lu et al.'s
reverse order) and measured with `layerprune.evaluate.efficiency` (random prompt of `--prompt-len` tokens, prefill with
`logits_to_keep=1`, then `--decode-tokens` greedy tokens one at a time with the KV cache). All models are measured in
interleaved rounds (so drift on a shared machine hits each alike) and the median over rounds is taken. Each quantity is
printed as a ratio to the unpruned model, next to its ideal ratio:

  params, weights memory   (P - P_removed) / P, with P counting the tied embedding/head once and P_removed the
                           parameters of the removed layers. The embedding (V x d) does not shrink, so for
                           smollm2-135m n = L/2 gives 0.61, not 0.5.
  KV-cache bytes           (L - n) / L: every decoder layer caches K and V, nothing else does.
  prefill latency          the FLOP share of what is left. Per sequence of T tokens a layer costs
                           2 T P_layer (matmuls) + 2 T^2 A (causal QK^T and AV, A = heads x head_dim); the LM head
                           runs on the last position only (2 d V); the embedding is a lookup (0).
  decode latency / token   per token a layer costs 2 P_layer + 4 c A with c the cached context (mean over the decoded
                           tokens); the LM head 2 d V. So the head's fixed cost keeps decode above (L - n) / L.
Goal: each measured ratio within 10% of its ideal (measured / ideal in [0.9, 1.1]). FLOPs are the ideal because the
model's compute is all that should scale; per-call overhead (Python, kernel launch, sampling) that does not shrink
with the layer count shows up as a ratio above the ideal.

  python bench/pruned.py [--model smollm2-135m] [--prompt-len 128] [--decode-tokens 16] [--rounds 5] [--json OUT]
"""
import argparse, copy, json, statistics, sys
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).parent))
from _common import machine
from layerprune.models import load_model, decoder
from layerprune.prune import drop_layers, select_layers, num_params
from layerprune.efficiency import efficiency
from layerprune.loss import output_vocab_size


def layer_params(layer) -> int: return sum(p.numel() for p in layer.parameters())


def ideal_flops(model, layers_kept, prompt_len, decode_tokens):
    "Model FLOPs of one prefill (T = prompt_len, head on the last position) and of one decode step (mean context)."
    cfg = model.config; d = cfg.hidden_size
    A = cfg.num_attention_heads * (getattr(cfg, 'head_dim', None) or d // cfg.num_attention_heads)
    head = 2 * d * output_vocab_size(model)
    T, c = prompt_len, prompt_len + (decode_tokens - 1) / 2
    Pl = [layer_params(l) for l in layers_kept]
    prefill = sum(2 * T * p + 2 * T * T * A for p in Pl) + head
    decode = sum(2 * p + 4 * c * A for p in Pl) + head
    return prefill, decode


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='smollm2-135m'); p.add_argument('--prompt-len', type=int, default=128)
    p.add_argument('--decode-tokens', type=int, default=16); p.add_argument('--rounds', type=int, default=5)
    p.add_argument('--strategy', default='reverse', choices=['reverse', 'deepest'])
    p.add_argument('--device', default=None, help='default: cuda if available, else cpu')
    p.add_argument('--json', default=None)
    args = p.parse_args()

    base, tok = load_model(args.model, device=args.device); L = decoder(base).num_layers
    ns = sorted({0, L // 4, L // 2})
    print(f'# {args.model} (L={L}) on {machine()}; n in {ns} ({args.strategy} order, drop_layers); prompt {args.prompt_len} '
          f'tokens, {args.decode_tokens} greedy decode tokens with KV cache; median of {args.rounds} interleaved rounds')
    P = num_params(base)
    models, ideal = {}, {}
    full_pf, full_dec = ideal_flops(base, list(decoder(base).layers), args.prompt_len, args.decode_tokens)
    for n in ns:
        if n == 0: m, removed = base, []
        else:
            removed = select_layers(base, n, args.strategy)
            removed_params = sum(layer_params(decoder(base).layers[i]) for i in removed)
            m = drop_layers(copy.deepcopy(base), removed)
            assert num_params(m) == P - removed_params, 'drop_layers left parameters behind'
        pf, dec = ideal_flops(m, list(decoder(m).layers), args.prompt_len, args.decode_tokens)
        models[n] = m
        ideal[n] = dict(removed=removed, params=num_params(m) / P, weights_bytes=num_params(m) / P,
                        kv_cache_bytes=(L - n) / L, prefill_ms=pf / full_pf, decode_ms_per_token=dec / full_dec)
    meas = {n: [] for n in ns}
    for r in range(args.rounds):
        order = ns[r % len(ns):] + ns[:r % len(ns)]   # rotate who goes first
        for n in order:
            meas[n].append(efficiency(models[n], tok, prompt_len=args.prompt_len, decode_tokens=args.decode_tokens, repeats=1))
    keys = ['params', 'weights_bytes', 'kv_cache_bytes', 'prefill_ms', 'decode_ms_per_token']
    med = {n: {k: statistics.median(e[k] for e in meas[n]) for k in keys} for n in ns}
    res = dict(model=args.model, L=L, ns=ns, prompt_len=args.prompt_len, decode_tokens=args.decode_tokens, rounds=args.rounds,
               machine=machine(), absolute={str(n): med[n] for n in ns}, rows=[])
    print(f'{"quantity":<20} {"n":>3} {"absolute":>14} {"ratio":>7} {"ideal":>7} {"ratio/ideal":>11}  within 10%')
    for k in keys:
        for n in ns:
            ratio = med[n][k] / med[0][k]; rel = ratio / ideal[n][k]; ok = abs(rel - 1) <= 0.10
            unit = {'params': f'{med[n][k] / 1e6:.1f} M', 'weights_bytes': f'{med[n][k] / 2**20:.0f} MB',
                    'kv_cache_bytes': f'{med[n][k] / 2**20:.2f} MB'}.get(k, f'{med[n][k]:.1f} ms')
            res['rows'].append(dict(quantity=k, n=n, absolute=med[n][k], ratio=ratio, ideal=ideal[n][k], ratio_over_ideal=rel, within_10pct=ok))
            if n: print(f'{k:<20} {n:>3} {unit:>14} {ratio:7.3f} {ideal[n][k]:7.3f} {rel:11.3f}  {"yes" if ok else "NO"}')
            else: print(f'{k:<20} {n:>3} {unit:>14} {"1":>7} {"1":>7} {"":>11}')
    bad = [f'{r["quantity"]} n={r["n"]}' for r in res['rows'] if r['n'] and not r['within_10pct']]
    res['all_within_10pct'] = not bad
    print('all within 10% of ideal' if not bad else f'outside 10% of ideal: {", ".join(bad)}')
    if args.json: Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == '__main__': main()
