"""What lower precision does to the distances and the loss: fp32 vs bf16 vs 4-bit NF4 (vs 8-bit) on the embedded models.

For each model and precision, on the same held-out wiki documents:
  max |d - d_fp32| over the (L+1) x (L+1) angular-distance matrix (states in that precision, distances in float64)
  whether l*(n) = argmin_l d(x^(l), x^(l+n)) changes, and for which n (the block [l*, l*+n) the similarity rule drops)
  the unpruned LM loss (`layerprune.loss.lm_loss`, formerly evaluate.lm_loss; nats per token) next to fp32's

  python bench/precision.py [--models smollm2-135m gemma3-270m] [--precisions fp32 bf16 nf4] [--samples 32] [--seq-len 128] [--json OUT]

Precisions: fp32, bf16, fp16 (weights and states in that dtype), nf4 (bitsandbytes 4-bit NF4 weights, bf16 compute,
the rest in bf16), nf4-fp32 (NF4 weights, fp32 compute: the 4-bit error alone), int8 (LLM.int8, the rest in fp32).
"""
import argparse, json, os, sys, time
from pathlib import Path
import numpy as np
import torch
sys.path.insert(0, str(Path(__file__).parent))
from _common import machine
from layerprune.data import load_texts
from layerprune.data import batches, last_token_index
from layerprune.distance import _Accumulator, _batch_distances, _load_for_distances, capture_states, check_precision
from layerprune.loss import lm_loss, token_losses

PRECISIONS = {'fp32': ('float32', 'none'), 'bf16': ('bfloat16', 'none'), 'fp16': ('float16', 'none'),
              'nf4': ('bfloat16', 'nf4'), 'nf4-fp32': ('float32', 'nf4'), 'int8': ('float32', 'int8')}


def local(model_name):
    "A tiny model (built in memory) is saved once, so that it can be loaded quantised like any folder."
    if not model_name.startswith('tiny:'): return model_name
    import tempfile
    from layerprune.models import tiny_model, tiny_tokenizer
    d = tempfile.mkdtemp(prefix='bench_precision_'); tiny_model(model_name[5:]).save_pretrained(d); tiny_tokenizer().save_pretrained(d)
    return d


def distances_and_loss(model, tok, texts, seq_len, batch_size):
    """`angular_distances` and `lm_loss` (nats per predicted token) from one backbone forward per batch: the capture
    hooks keep the last-token states of the forward that `token_losses` runs (bf16 matmuls are ~7x slower than fp32
    on a CPU without bf16 instructions, so each forward counts). Checked against the two separate calls in fp32."""
    from layerprune.models import decoder
    acc, tot, n = _Accumulator(decoder(model).num_layers), 0.0, 0
    for b in batches(texts, tok, seq_len, batch_size):
        idx = last_token_index(b['attention_mask']); r = torch.arange(len(idx))
        with torch.inference_mode(), capture_states(model, lambda h: h[r, idx.to(h.device)].float()) as xs:
            losses, _ = token_losses(model, b)
        acc.add(_batch_distances(xs, b['attention_mask'], False))
        tot += float(losses.double().sum()); n += losses.numel()
    return acc.result('', seq_len, 'last', 'wiki'), tot / n


def measure(model_name, prec, texts, seq_len, batch_size, check=False):
    dtype, q = check_precision(*PRECISIONS[prec])
    t = time.perf_counter()
    model, tok = _load_for_distances(model_name, dtype, q, 'cpu' if not torch.cuda.is_available() else None)
    r, loss = distances_and_loss(model, tok, texts, seq_len, batch_size)
    secs = time.perf_counter() - t
    if check:   # the one-pass shortcut equals the package's own two calls
        from layerprune.distance import angular_distances
        r2, l2 = angular_distances(model, tok, texts, seq_len, batch_size), lm_loss(model, tok, texts, seq_len, batch_size)
        assert np.abs(r2.mean - r.mean).max() < 1e-9 and abs(l2['nats'] - loss) < 1e-6, (np.abs(r2.mean - r.mean).max(), l2['nats'], loss)
    del model
    return r, dict(nats=loss), secs


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--models', nargs='+', default=['smollm2-135m', 'gemma3-270m'])
    p.add_argument('--precisions', nargs='+', default=['fp32', 'bf16', 'nf4'], choices=list(PRECISIONS))
    p.add_argument('--samples', type=int, default=32, help='wiki validation documents (distances and loss)')
    p.add_argument('--seq-len', type=int, default=128); p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--no-check', action='store_true', help='skip the fp32 check of the one-pass shortcut against angular_distances + lm_loss')
    p.add_argument('--json', default=None)
    args = p.parse_args()
    precs = ['fp32'] + [x for x in args.precisions if x != 'fp32']
    texts = load_texts('wiki', 'validation', args.samples)
    print(f'# {", ".join(args.models)} on {machine()}; {args.samples} wiki validation docs x <= {args.seq_len} tokens; '
          f'load average {"%.2f %.2f %.2f" % os.getloadavg()}')
    out = []
    for name in args.models:
        ref = None; path = local(name)
        for prec in precs:
            r, loss, secs = measure(path, prec, texts, args.seq_len, args.batch_size, check=prec == 'fp32' and not args.no_check)
            if ref is None: ref = (r, loss)
            diff = float(np.abs(r.mean - ref[0].mean).max())
            changed = [dict(n=n, fp32=a, here=b) for n, (a, b) in enumerate(zip(ref[0].best_start, r.best_start), 1) if a != b]
            row = dict(model=name, precision=prec, dtype=PRECISIONS[prec][0], quantization=PRECISIONS[prec][1],
                       max_abs_diff=diff, mean_abs_diff=float(np.abs(r.mean - ref[0].mean).mean()),
                       lstar_changed=changed, best_start=r.best_start, loss_nats=loss['nats'], loss_diff=loss['nats'] - ref[1]['nats'], seconds=secs)
            out.append(row)
            ch = ('none' if not changed else
                  ', '.join(f'n={c["n"]}: {c["fp32"]}->{c["here"]}' for c in changed))
            print(f'{name:>13} {prec:>8}: max |d - d_fp32| = {diff:.2e} (mean {row["mean_abs_diff"]:.1e}); '
                  f'l*(n) changes: {ch}; loss {loss["nats"]:.4f} nats (fp32 {ref[1]["nats"]:.4f}, '
                  f'diff {row["loss_diff"]:+.4f}); {secs:.0f}s', flush=True)
    print(f'# load average {"%.2f %.2f %.2f" % os.getloadavg()}')
    if args.json: Path(args.json).write_text(json.dumps(dict(machine=machine(), samples=args.samples, seq_len=args.seq_len,
                                                             rows=out), indent=1))


if __name__ == '__main__': main()
