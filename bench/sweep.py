"""Benchmark: the normalised loss for every block size n with virtual pruning vs copying / reloading the model per n.

For each n on a grid over 0..L-1 the same layers (`--strategy`, default Lu et al.'s reverse order) are removed three ways:
  virtual  `layerprune.prune.skip_layers(model, layers)`: no weights copied, the model restored on exit
  copy     `copy.deepcopy(model)` + `drop_layers` (what a script without virtual pruning does), freed after use
  reload   `load_model(name)` again + `drop_layers` (the PruneMe / mergekit way: one pruned checkpoint per n)
and the normalised loss (`layerprune.evaluate.lm_loss`) is computed on the same held-out texts. All three give the same loss (checked). Per n it prints time and peak memory
above the loaded model (CUDA max-allocated on a GPU, else sampled RSS after returning freed memory to the OS), and
  time   copy / virtual, reload / virtual   (summed over the grid)
  memory virtual: max over n / n = 0      goal: flat (<= 1.10, i.e. no weights are copied at any n)
  memory copy / virtual at n = 0          (the extra weights copy the virtual sweep avoids)
Absolute times are indicative only on a shared machine; the ratios are measured side by side in one run.

  python bench/sweep.py [--model smollm2-135m] [--step 6] [--samples 4] [--seq-len 64] [--json OUT]
"""
import argparse, copy, ctypes, gc, json, sys
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).parent))
from _common import PeakMemory, timed, machine
from layerprune.models import load_model, decoder
from layerprune.data import load_texts
from layerprune.prune import skip_layers, drop_layers, select_layers

from layerprune.loss import lm_loss
LOSS = 'layerprune.evaluate.lm_loss (normalized: nats / ln V)'

def loss_fn(model, tok, texts, seq_len, bs): return lm_loss(model, tok, texts, seq_len, bs)['normalized']

def release():
    "Free what Python/torch no longer uses and hand freed heap back to the OS, so the next RSS delta starts clean."
    gc.collect()
    if torch.cuda.is_available(): torch.cuda.empty_cache()
    try: ctypes.CDLL('libc.so.6').malloc_trim(0)
    except OSError: pass


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='smollm2-135m'); p.add_argument('--samples', type=int, default=4)
    p.add_argument('--seq-len', type=int, default=64); p.add_argument('--batch-size', type=int, default=4)
    p.add_argument('--step', type=int, default=6, help='grid step over n (1 = every n = 0..L-1; L-1 is always included)')
    p.add_argument('--strategy', default='reverse', choices=['reverse', 'deepest'])
    p.add_argument('--no-reload', action='store_true', help='skip the reload-per-n approach')
    p.add_argument('--device', default=None, help='default: cuda if available, else cpu'); p.add_argument('--json', default=None)
    args = p.parse_args()

    model, tok = load_model(args.model, device=args.device)
    dev = next(model.parameters()).device; L = decoder(model).num_layers
    texts = load_texts('wiki', 'validation', args.samples)
    grid = sorted(set(range(0, L, max(1, args.step))) | {L - 1})
    modes = ['virtual', 'copy'] + ([] if args.no_reload else ['reload'])
    print(f'# {args.model} (L={L}) on {machine()}; n in {grid}, {args.strategy} order; '
          f'{args.samples} samples x <= {args.seq_len} tokens; loss: {LOSS}')
    loss_fn(model, tok, texts[:1], 16, 1)   # warm up kernels and allocator

    def run(mode, layers):
        if mode == 'virtual':
            with skip_layers(model, layers) as m: return loss_fn(m, tok, texts, args.seq_len, args.batch_size)
        if mode == 'copy': m = copy.deepcopy(model)
        else: m = load_model(args.model, device=args.device)[0]
        if layers: drop_layers(m, layers)
        try: return loss_fn(m, tok, texts, args.seq_len, args.batch_size)
        finally: del m

    rows = []
    print(f'{"n":>3} {"layers removed (0-based, half-open)":>36} {"loss":>7} ' + ' '.join(f'{m + " s":>9}' for m in modes)
          + ' ' + ' '.join(f'{m + " MB":>10}' for m in modes))
    for n in grid:
        layers = select_layers(model, n, args.strategy) if n else []
        row = dict(n=n, layers=layers)
        for mode in modes:
            release()
            with PeakMemory(dev) as pm: t, loss = timed(lambda: run(mode, layers), dev)
            row[mode] = dict(seconds=t, peak_mb=pm.delta / 2**20, loss=loss)
        release()
        row['loss'] = row['virtual']['loss']
        rows.append(row)
        rng = f'[{layers[0]}, {layers[-1] + 1})' if layers else '-'
        print(f'{n:>3} {rng:>36} {row["loss"]:7.4f} ' + ' '.join(f'{row[m]["seconds"]:9.2f}' for m in modes)
              + ' ' + ' '.join(f'{row[m]["peak_mb"]:10.0f}' for m in modes), flush=True)

    diff = max(abs(r[m]['loss'] - r['loss']) for r in rows for m in modes)
    tot = {m: sum(r[m]['seconds'] for r in rows) for m in modes}
    vmem = [r['virtual']['peak_mb'] for r in rows]
    res = dict(model=args.model, L=L, grid=grid, strategy=args.strategy, samples=args.samples, seq_len=args.seq_len,
               loss=LOSS, machine=machine(), rows=rows, total_s=tot, max_loss_diff=diff,
               time_ratio_copy=tot['copy'] / tot['virtual'],
               virtual_memory_flatness=max(vmem) / max(vmem[0], 1.0),
               copy_memory_ratio=rows[0]['copy']['peak_mb'] / max(rows[0]['virtual']['peak_mb'], 1.0))
    print(f'loss   identical across approaches: max |difference| = {diff:.2e}')
    print(f'time   copy / virtual (sum over {len(grid)} n)     = {res["time_ratio_copy"]:.2f}x  '
          f'({tot["copy"]:.1f}s vs {tot["virtual"]:.1f}s)')
    if 'reload' in modes:
        res['time_ratio_reload'] = tot['reload'] / tot['virtual']
        print(f'time   reload / virtual (sum over {len(grid)} n)   = {res["time_ratio_reload"]:.2f}x  ({tot["reload"]:.1f}s)')
    print(f'memory virtual peak, max over n / n=0      = {res["virtual_memory_flatness"]:.2f}  (goal: flat <= 1.10; '
          f'{min(vmem):.0f}..{max(vmem):.0f} MB above the loaded model)')
    print(f'memory copy / virtual peak at n=0          = {res["copy_memory_ratio"]:.2f}x  '
          f'({rows[0]["copy"]["peak_mb"]:.0f} MB vs {rows[0]["virtual"]["peak_mb"]:.0f} MB)')
    if args.json: Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == '__main__': main()
