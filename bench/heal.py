"""Benchmark: training throughput and peak memory of the healing methods on the same pruned model.

The model is pruned by 25% in reverse order (Lu et al.: the last n = round(L/4) layers, `drop_layers`) and healed for
a few optimizer steps with `layerprune.heal.heal` on packed wiki *train* text, once per method, each in a fresh process
(clean memory accounting):
  lora     LoRA on the FFN projections of the fp32 model (Gromov et al.'s targets)
  qlora    the same adapters on a 4-bit NF4 copy of the base (bitsandbytes)
  partial  Lu et al.'s partial-layer fine-tuning: lm_head (untied) + the last k = 3 layers
Per method it prints tokens/s (global batch x seq_len / median optimizer-step time, the first step dropped as warm-up),
peak memory during the steps above the loaded pruned model (CUDA max-allocated on a GPU, else RSS) and the trainable
parameters, then the ratios partial / lora and qlora / lora. Lu et al. report partial fine-tuning faster than LoRA:
the output says whether that holds here. Absolute numbers are indicative only on a shared machine.

  python bench/heal.py [--model smollm2-135m] [--steps 4] [--batch-size 2] [--seq-len 64] [--methods lora,qlora,partial] [--json OUT]
"""
import argparse, json, os, statistics, sys, time
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).parent))
from _common import in_subprocess, machine, rss_bytes


def child(args):
    from layerprune.models import load_model, decoder
    from layerprune.data import load_texts
    from layerprune.prune import drop_layers, select_layers
    from layerprune.heal import heal, HealConfig
    model, tok = load_model(args.model, device=args.device); L = decoder(model).num_layers
    n = max(1, round(L / 4)); removed = select_layers(model, n, 'reverse'); drop_layers(model, removed)
    texts = load_texts('wiki', 'train', args.texts)
    cfg = HealConfig(method=args.child, last_k=3, steps=args.steps, warmup=0, schedule='constant', lr=1e-4,
                     batch_size=args.batch_size, micro_batch=args.batch_size, seq_len=args.seq_len, save_every=10**9)
    dev = next(model.parameters()).device; cuda = dev.type == 'cuda'
    base = torch.cuda.memory_allocated() if cuda else rss_bytes()
    stamps = []
    def cb(step, log):
        if cuda: torch.cuda.synchronize()
        stamps.append(time.perf_counter())
    _, log = heal(model, tok, cfg, texts, progress=False, callback=cb)
    steps = [b - a for a, b in zip(stamps, stamps[1:])]   # step 2.. (step 1 also holds warm-up)
    step_s = statistics.median(steps) if steps else log['wall_s'] / cfg.steps
    print('RESULT ' + json.dumps(dict(
        method=args.child, L=L, removed=removed, step_s=step_s, step_times=steps,
        tokens_per_s=cfg.batch_size * cfg.seq_len / step_s, peak_mb=(log['peak_memory_bytes'] - base) / 2**20,
        peak_abs_mb=log['peak_memory_bytes'] / 2**20, peak_kind=log['peak_memory_kind'],
        trainable_params=log['trainable_params'], total_params=log['total_params'], loss=log['loss'])))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='smollm2-135m'); p.add_argument('--steps', type=int, default=4)
    p.add_argument('--batch-size', type=int, default=2); p.add_argument('--seq-len', type=int, default=64)
    p.add_argument('--texts', type=int, default=64, help='wiki train documents packed into blocks')
    p.add_argument('--methods', default='lora,qlora,partial')
    p.add_argument('--device', default=None, help='default: cuda if available, else cpu')
    p.add_argument('--json', default=None)
    p.add_argument('--child', help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child: return child(args)
    if args.steps < 2: p.error('--steps must be >= 2 (the first step is warm-up)')

    methods = [m.strip() for m in args.methods.split(',') if m.strip()]
    print(f'# {args.model} pruned 25% (reverse order) on {machine()}; {args.steps} steps x batch {args.batch_size} x '
          f'{args.seq_len} tokens per method, each in a fresh process')
    fwd = ['--model', args.model, '--steps', args.steps, '--batch-size', args.batch_size, '--seq-len', args.seq_len,
           '--texts', args.texts] + (['--device', args.device] if args.device else [])
    res = dict(model=args.model, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, machine=machine(), methods={})
    print(f'{"method":<8} {"tokens/s":>9} {"s/step":>7} {"peak MB":>8} {"trainable":>11}  loss first -> last')
    for m in methods:
        r = in_subprocess(__file__, ['--child', m, *fwd]); res['methods'][m] = r
        print(f'{m:<8} {r["tokens_per_s"]:9.1f} {r["step_s"]:7.2f} {r["peak_mb"]:8.0f} {r["trainable_params"] / 1e6:9.2f} M'
              f'  {r["loss"][0]:.3f} -> {r["loss"][-1]:.3f}', flush=True)
    M = res['methods']
    if 'removed' in next(iter(M.values()), {}):
        r0 = next(iter(M.values())); res['removed'] = r0['removed']
        print(f'  (removed layers {r0["removed"][0]}..{r0["removed"][-1]} of {r0["L"]}, 0-based; peak = {r0["peak_kind"]} above the loaded pruned model)')
    for a, b in [('partial', 'lora'), ('qlora', 'lora'), ('partial', 'qlora')]:
        if a in M and b in M:
            t = M[a]['tokens_per_s'] / M[b]['tokens_per_s']; mem = M[a]['peak_mb'] / max(M[b]['peak_mb'], 1.0)
            res[f'{a}_over_{b}'] = dict(tokens_per_s=t, peak_memory=mem)
            print(f'ratio  {a} / {b}: tokens/s {t:.2f}x, peak memory {mem:.2f}x')
    if 'partial' in M and 'lora' in M:
        faster = M['partial']['tokens_per_s'] > M['lora']['tokens_per_s']
        res['partial_faster_than_lora'] = faster
        print(f'Lu et al. (partial faster than LoRA): {"holds" if faster else "does not hold"} here')
    if args.json: Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == '__main__': main()
