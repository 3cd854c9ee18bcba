"""Benchmark: the full (l, n) angular-distance matrix vs a bare backbone forward, and vs one pass per n.

Prints ratios measured side by side in one run (absolute times are only indicative on a shared machine):
  time(distance matrix) / time(bare backbone forward)         goal <= 1.10
  peak memory(distance) / peak memory(bare forward)           goal <= 1.2   (each in a fresh process)
  time(one forward pass per n, PruneMe-style) / time(ours)    goal >= 10x at L = 30
      (PruneMe runs the full model, LM head on every token included, with output_hidden_states, once per n;
       each timed per-n pass is paired with one of ours run just before it)
and how the distance pass scales with samples and seq_len.

With --streamed it compares instead the layer-streamed pass (`layerprune.streamed`: one decoder layer at a time read
from the safetensors files) against the in-memory one, each in a fresh process, interleaved --repeats times:
  streamed / in-memory time          goal <= 1.25   (both from the weights on disk to the matrix: the in-memory
                                                     side is load_model + angular_distances; the pass alone too)
  streamed / in-memory peak memory   goal <= 0.5    (peak above the process after imports, weights included)
  and the max |difference| of the two matrices (goal: < 1e-6 in float32).

The load average is printed before and after: on a shared machine, ratios carry noise (a pass that comes out faster
than the forward it contains is noise, not a speed-up).

  python bench/distance.py [--model smollm2-135m] [--samples 16] [--seq-len 128] [--batch-size 8] [--per-n 4] [--json OUT]
  python bench/distance.py --time-only --repeats 7     # only the interleaved distance / bare forward time ratio
  python bench/distance.py --streamed [--repeats 3] [--json OUT]
"""
import argparse, json, math, os, sys, tempfile, time
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).parent))
from _common import PeakMemory, timed, median, in_subprocess, machine
from layerprune.models import load_model, decoder
from layerprune.data import load_texts, batches
from layerprune.distance import angular_distances, _forward_backbone, _pairwise
from layerprune.data import last_token_index


def bare_pass(model, tok, texts, seq_len, bs):
    with torch.inference_mode():
        for b in batches(texts, tok, seq_len, bs): _forward_backbone(model, {k: v.to(model.device) for k, v in b.items()})


def distance_pass(model, tok, texts, seq_len, bs):
    return angular_distances(model, tok, texts, seq_len, bs)


def per_n_pass(model, tok, texts, seq_len, bs, n):
    "PruneMe-style: one forward pass with output_hidden_states for a single block size n."
    L = decoder(model).num_layers; tot = torch.zeros(L - n + 1, dtype=torch.float64)
    with torch.inference_mode():
        for b in batches(texts, tok, seq_len, bs):
            b = {k: v.to(model.device) for k, v in b.items()}
            hs = model(input_ids=b['input_ids'], attention_mask=b['attention_mask'], output_hidden_states=True).hidden_states
            idx = last_token_index(b['attention_mask']); r = torch.arange(len(idx))
            for l in range(L - n + 1):
                a, c = hs[l][r, idx].double(), hs[l + n][r, idx].double()
                tot[l] += (torch.arccos((torch.nn.functional.cosine_similarity(a, c)).clamp(-1, 1)) / math.pi).sum()
    return tot


def memory_child(args):
    "Run in a fresh process: peak memory of one mode above the loaded-model baseline."
    model, tok = load_model(args.model); texts = load_texts('wiki', 'validation', args.samples)
    fn = bare_pass if args.child == 'bare' else distance_pass
    # warm up with the measured mode itself: first calls page in code and allocate one-time buffers (RSS that is not
    # per-run memory, e.g. the float64 einsum/arccos kernels only the distance pass uses)
    fn(model, tok, texts[:2], 16, 2)
    with PeakMemory(model.device) as pm: fn(model, tok, texts, args.seq_len, args.batch_size)
    print('RESULT ' + json.dumps({'delta': pm.delta}))


def load() -> str:
    return 'load average %.2f %.2f %.2f' % os.getloadavg()


def spread(xs) -> str:
    return f'min {min(xs):.3f}, max {max(xs):.3f}, n = {len(xs)}'


def streamed_child(args):
    "Fresh process: one mode from the weights on disk to the matrix; time and peak memory above the imports."
    from layerprune.streamed import streamed_distances
    texts = load_texts('wiki', 'validation', args.samples)
    def inmem(tx, T, bs):
        t = time.perf_counter(); model, tok = load_model(args.model); t_load = time.perf_counter() - t
        r = angular_distances(model, tok, tx, T, bs); return r, t_load
    def stream(tx, T, bs): return streamed_distances(args.model, None, tx, T, bs), 0.0
    fn = inmem if args.child == 'in-memory' else stream
    fn(texts[:2], 16, 2)   # warm-up with the measured mode itself (code pages, page cache of the weights, kernels)
    import gc; gc.collect()
    with PeakMemory('cpu') as pm:
        t = time.perf_counter(); r, t_load = fn(texts, args.seq_len, args.batch_size); total = time.perf_counter() - t
    print('RESULT ' + json.dumps(dict(total_s=total, load_s=t_load, pass_s=total - t_load, peak=pm.delta,
                                      mean=r.mean.tolist(), best_start=r.best_start)))


def streamed_main(args):
    "--streamed: the layer-streamed pass against the in-memory one, fresh process each, interleaved."
    import numpy as np
    model = args.model
    if model.startswith('tiny:'):   # a tiny model has no files: save it once
        from layerprune.models import tiny_model, tiny_tokenizer
        d = tempfile.mkdtemp(prefix='bench_streamed_'); tiny_model(model[5:]).save_pretrained(d); tiny_tokenizer().save_pretrained(d)
        model = d
    print(f'# {args.model} on {machine()}; {args.samples} samples x <= {args.seq_len} tokens, batch {args.batch_size}; '
          f'{load()} (shared machine: ratios carry its noise)')
    os.environ.setdefault('MALLOC_MMAP_THRESHOLD_', str(1 << 16))   # RSS follows live memory (see memory_child)
    runs = {'in-memory': [], 'streamed': []}
    for _ in range(args.repeats):
        for mode in runs:
            runs[mode].append(in_subprocess(__file__, ['--child', mode, '--model', model, '--samples', args.samples,
                                                       '--seq-len', args.seq_len, '--batch-size', args.batch_size]))
    im, st = runs['in-memory'], runs['streamed']
    rt = [b['total_s'] / a['total_s'] for a, b in zip(im, st)]
    rp = [b['total_s'] / a['pass_s'] for a, b in zip(im, st)]
    rm = [b['peak'] / a['peak'] for a, b in zip(im, st)]
    diff = max(float(np.abs(np.array(a['mean']) - np.array(b['mean'])).max()) for a, b in zip(im, st))
    res = dict(model=args.model, samples=args.samples, seq_len=args.seq_len, machine=machine(), runs=runs,
               time_ratio=median(rt), time_ratio_pass_only=median(rp), memory_ratio=median(rm), max_abs_diff=diff,
               same_best_start=all(a['best_start'] == b['best_start'] for a, b in zip(im, st)))
    for r in runs.values():
        for x in r: del x['mean']
    print(f'streamed / in-memory time = {res["time_ratio"]:.3f}  (goal <= 1.25; from disk to matrix, median of {args.repeats} '
          f'interleaved pairs, {spread(rt)}; streamed {median([b["total_s"] for b in st]):.2f}s vs in-memory '
          f'{median([a["total_s"] for a in im]):.2f}s = load {median([a["load_s"] for a in im]):.2f}s + pass {median([a["pass_s"] for a in im]):.2f}s)')
    print(f'streamed / in-memory pass alone (its load not counted) = {res["time_ratio_pass_only"]:.3f}  ({spread(rp)})')
    print(f'streamed / in-memory peak memory = {res["memory_ratio"]:.3f}  (goal <= 0.5; peak above imports, weights included: '
          f'{median([b["peak"] for b in st]) / 2**20:.0f} MB vs {median([a["peak"] for a in im]) / 2**20:.0f} MB, fresh process each, {spread(rm)})')
    print(f'matrix max |streamed - in-memory| = {diff:.2e}  (goal < 1e-6); same l*(n) for every n: {res["same_best_start"]}')
    print(f'# {load()}')
    if args.json: Path(args.json).write_text(json.dumps(res, indent=1))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='smollm2-135m'); p.add_argument('--samples', type=int, default=16)
    p.add_argument('--seq-len', type=int, default=128); p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--per-n', type=int, default=4, help='block sizes timed for the one-pass-per-n approach (the rest extrapolated: each is one identical forward)')
    p.add_argument('--skip-scaling', action='store_true'); p.add_argument('--json', default=None)
    p.add_argument('--time-only', action='store_true', help='stop after the distance / bare forward time ratio')
    p.add_argument('--streamed', action='store_true', help='compare the layer-streamed pass with the in-memory one instead')
    p.add_argument('--child', choices=['bare', 'distance', 'in-memory', 'streamed'], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child in ('in-memory', 'streamed'): return streamed_child(args)
    if args.child: return memory_child(args)
    if args.streamed: return streamed_main(args)

    model, tok = load_model(args.model); L = decoder(model).num_layers
    texts = load_texts('wiki', 'validation', args.samples)
    dev = model.device
    print(f'# {args.model} (L={L}) on {machine()}; {args.samples} samples x <= {args.seq_len} tokens, batch {args.batch_size}; '
          f'{load()} (shared machine: ratios carry its noise)')
    bare_pass(model, tok, texts[:2], 16, 2)
    tb, td = [], []
    for _ in range(args.repeats):   # interleaved, so drift on a shared machine hits both alike
        tb.append(timed(lambda: bare_pass(model, tok, texts, args.seq_len, args.batch_size), dev)[0])
        td.append(timed(lambda: distance_pass(model, tok, texts, args.seq_len, args.batch_size), dev)[0])
    ratios = [d / b for b, d in zip(tb, td)]
    res = dict(model=args.model, L=L, samples=args.samples, seq_len=args.seq_len, machine=machine(),
               bare_s=median(tb), distance_s=median(td), bare_runs=tb, distance_runs=td, load=os.getloadavg())
    res['time_ratio'] = median(ratios)
    print(f'time   distance / bare forward      = {res["time_ratio"]:.3f}  (goal <= 1.10; median of {args.repeats} interleaved '
          f'pairs, {spread(ratios)}; {res["distance_s"]:.2f}s vs {res["bare_s"]:.2f}s; < 1 is noise: the pass contains the forward; {load()})')

    if args.time_only:
        if args.json: Path(args.json).write_text(json.dumps(res, indent=1))
        return print(f'# {load()}')

    # children: a fixed glibc mmap threshold puts every tensor > 64 KB in its own mapping, returned to the OS on free,
    # so RSS tracks live memory (with the default dynamic threshold, heap fragmentation made the ratio swing 1.2-2.4)
    os.environ.setdefault('MALLOC_MMAP_THRESHOLD_', str(1 << 16))
    mem = {m: in_subprocess(__file__, ['--child', m, '--model', args.model, '--samples', args.samples, '--seq-len', args.seq_len,
                                      '--batch-size', args.batch_size])['delta'] for m in ('bare', 'distance')}
    res.update(bare_peak_mb=mem['bare'] / 2**20, distance_peak_mb=mem['distance'] / 2**20)
    res['memory_ratio'] = mem['distance'] / max(mem['bare'], 1)
    print(f'memory distance / bare forward      = {res["memory_ratio"]:.3f}  (goal <= 1.2; peak above loaded model: '
          f'{res["distance_peak_mb"]:.0f} MB vs {res["bare_peak_mb"]:.0f} MB, fresh process each)')

    ns = sorted({1, max(1, L // 4), max(1, L // 2), L - 1}) [:max(1, args.per_n)]
    tn, to = [], []
    for n in ns:   # each per-n pass timed right after one of ours, so drift on a shared machine hits both alike
        to.append(timed(lambda: distance_pass(model, tok, texts, args.seq_len, args.batch_size), dev)[0])
        tn.append(timed(lambda: per_n_pass(model, tok, texts, args.seq_len, args.batch_size, n), dev)[0])
    res['per_n_measured'] = dict(zip(map(str, ns), tn)); res['ours_next_to_per_n'] = to
    res['per_n_total_s'] = median(tn) * L
    res['speedup_vs_per_n'] = median([a / b for a, b in zip(tn, to)]) * L
    print(f'speed  one pass per n ({L} passes) / ours = {res["speedup_vs_per_n"]:.1f}x  (goal >= 10x; '
          f'{len(ns)} of {L} passes timed, each next to one of ours: median {median(tn):.2f}s vs {median(to):.2f}s, x{L})')

    if not args.skip_scaling:
        print('scaling of the distance pass (time relative to the first row):')
        rows = []
        for s, T in [(args.samples, args.seq_len // 2), (args.samples, args.seq_len), (2 * args.samples, args.seq_len)]:
            tx = load_texts('wiki', 'validation', s)
            t = timed(lambda: distance_pass(model, tok, tx, T, args.batch_size), dev)[0]
            rows.append(dict(samples=s, seq_len=T, seconds=t)); print(f'  samples {s:>4}  seq_len {T:>5}: {t:6.2f}s  x{t / rows[0]["seconds"]:.2f}')
        res['scaling'] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == '__main__': main()
