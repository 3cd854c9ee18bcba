"""Benchmark: healing throughput (tokens/s), model-FLOP utilisation and peak memory, this version side by side with the
version before the faster-healing change (issue 12 item 4).

The model is pruned by 25% in reverse order (Lu et al.: the last n = round(L/4) layers, `drop_layers`) and healed for a
few optimizer steps with `heal` on packed wiki *train* text, in a fresh process per (method, version, repeat); the runs
are interleaved (repeat 1: lora old, lora new, partial old, partial new; repeat 2: ...) so that a change of machine load
hits both versions alike. Versions:
  old  `layerprune/heal/train.py` as of git revision --legacy-rev (written to a temporary module), on 1 thread (what
       the paper notebooks used)
  new  the current `heal` with `threads='auto'` (measured), fused AdamW, the fused next-token loss (no full-vocabulary
       copies), LoRA layers as one autograd node each and, for partial, the frozen prefix without autograd plus the
       boundary-state cache (used when blocks repeat: --blocks N < steps x batch means several epochs)
Methods: lora (LoRA on the FFN projections, Gromov et al.), partial (lm_head untied + the last k = 3 layers, Lu et al.),
optionally qlora. Per run: tokens/s = global batch x seq_len / median optimizer-step time (the first step dropped).

FLOP count per training token (fp32 matmuls, the embedding lookup and norms/activations not counted; T = seq_len):
  every nn.Linear with N weights that runs: forward 2N
  + 2N (activation gradient) if a trained parameter lies before it (gradients must flow through it)
  + 2N (weight gradient) if its weight is trained; LoRA adapters count the same way with their own A, B weights
  attention scores (QK^T and AV, causal: on average T/2 keys): forward 2*T*d per layer, + 4*T*d where gradients flow
  lm_head: the same rules (forward always, activation gradient if anything before it trains, weight gradient if trained)
This is the work one step of the method *needs* (model FLOPs, as in MFU): the cached prefix of the new partial path
skips part of it, so its model-FLOP utilisation can exceed what the hardware executes; `executed` counts only what ran.
Peak: the best of several 2048^3 fp32 matmuls timed in the same process at the run's thread count, before and after.
`achieved / peak = F` is printed per method and version.

  python bench/heal.py [--model smollm2-135m] [--steps 6] [--batch-size 2] [--seq-len 64] [--blocks 4] [--repeats 3]
                       [--methods lora,partial] [--legacy-rev REV] [--json OUT]
                       [--versions new] [--target all-linear] [--threads 1]   # methods side by side only, as lu_finetune heals
"""
import argparse, importlib.util, json, os, statistics, subprocess, sys, tempfile, time
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).parent))
from _common import in_subprocess, machine, rss_bytes

ROOT = Path(__file__).resolve().parents[1]
LEGACY_REV = '8d906f7'   # the last main commit of layerprune/heal/train.py before the faster-healing change


def legacy_heal(rev):
    "`heal` of `layerprune/heal/train.py` at git revision `rev`, imported as `layerprune.heal._legacy_train`."
    src = subprocess.run(['git', '-C', str(ROOT), 'show', f'{rev}:layerprune/heal/train.py'], capture_output=True, text=True, check=True).stdout
    f = Path(tempfile.mkdtemp())/'legacy_train.py'; f.write_text(src)
    spec = importlib.util.spec_from_file_location('layerprune.heal._legacy_train', f)
    mod = importlib.util.module_from_spec(spec); sys.modules[spec.name] = mod; spec.loader.exec_module(mod)
    return mod.heal


def peak_flops(n=2048, reps=3) -> float:
    "FLOP/s of the best of `reps` n^3 fp32 matmuls at the current thread count."
    a, b = torch.randn(n, n), torch.randn(n, n); a @ b
    best = min(timed_once(lambda: a @ b) for _ in range(reps))
    return 2 * n**3 / best


def timed_once(fn):
    t = time.perf_counter(); fn(); return time.perf_counter() - t


def flops_per_token(model, method, last_k, rank, seq_len, target='ffn'):
    "(model FLOPs, FLOPs of the frozen prefix's forward) per training token of `method` (see the module docstring)."
    from layerprune.models import decoder
    from layerprune.heal import ffn_targets
    d = decoder(model); L = d.num_layers; first = L - last_k if method == 'partial' else 0
    targets = [] if method == 'partial' else ffn_targets(model) if target == 'ffn' else None   # None: every linear of a layer
    total = prefix = 0.0; grads_flow = False
    for i, layer in enumerate(d.layers):
        trained_layer = method == 'partial' and i >= first
        attn_dim = sum(m.out_features for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear) and n.split('.')[-1] in ('q_proj', 'query', 'Wqkv')) or d.embed.weight.shape[1]
        for name, m in layer.named_modules():
            if not isinstance(m, torch.nn.Linear): continue
            N = m.weight.numel(); lora = method != 'partial' and (targets is None or any(name == t or name.endswith('.' + t) for t in targets))
            f = 2 * N
            if grads_flow: f += 2 * N
            if trained_layer: f += 2 * N
            if lora:
                r = rank * (m.in_features + m.out_features); f += 6 * r; grads_flow = True
            if trained_layer: grads_flow = True
            total += f
            if method == 'partial' and i < first: prefix += 2 * N
        att = 2 * seq_len * attn_dim * (3 if grads_flow else 1)
        total += att
        if method == 'partial' and i < first: prefix += att
    head = d.lm_head.weight.numel()
    total += 2 * head + (2 * head if grads_flow else 0) + (2 * head if method == 'partial' else 0)
    return total, prefix


def child(args):
    from layerprune.models import load_model, decoder
    from layerprune.data import load_texts, pack
    from layerprune.prune import drop_layers, select_layers
    from layerprune.heal import heal, HealConfig
    old = args.version == 'old'
    heal_fn = legacy_heal(args.legacy_rev) if old else heal
    if old: torch.set_num_threads(1)   # the new version sets its own (`heal(threads=...)`)
    model, tok = load_model(args.model, device=args.device); L = decoder(model).num_layers
    n = max(1, round(L / 4)); removed = select_layers(model, n, 'reverse'); drop_layers(model, removed)
    texts = load_texts('wiki', 'train', args.texts)
    if args.blocks:   # the text of the first `blocks` blocks only (about as many blocks again): the steps go over them several times
        texts = [tok.decode(b) for b in pack(texts, tok, args.seq_len, max_blocks=args.blocks)]
    cfg = HealConfig(method=args.child, last_k=3, steps=args.steps, warmup=0, schedule='constant', lr=1e-4, target=args.target,
                     batch_size=args.batch_size, micro_batch=args.batch_size, seq_len=args.seq_len, save_every=10**9)
    kw = {} if old else dict(threads=args.threads or 'auto')
    model_flops, prefix_flops = flops_per_token(model, args.child, cfg.last_k, cfg.rank, cfg.seq_len, cfg.target)
    dev = next(model.parameters()).device; cuda = dev.type == 'cuda'
    base = torch.cuda.memory_allocated() if cuda else rss_bytes()
    stamps = []
    def cb(step, log):
        if cuda: torch.cuda.synchronize()
        stamps.append(time.perf_counter())
    _, log = heal_fn(model, tok, cfg, texts, progress=False, callback=cb, **kw)
    threads = torch.get_num_threads(); peak = max(peak_flops(), peak_flops())   # same process, the run's thread count
    steps = [b - a for a, b in zip(stamps, stamps[1:])]   # step 2.. (step 1 also holds warm-up)
    step_s = statistics.median(steps) if steps else log['wall_s'] / cfg.steps
    tps = cfg.batch_size * cfg.seq_len / step_s
    bc = log.get('boundary_cache'); hit = bc['hits'] / max(1, bc['hits'] + bc['misses']) if bc else 0.0
    executed = model_flops - hit * prefix_flops
    print('RESULT ' + json.dumps(dict(
        method=args.child, version=args.version, L=L, removed=removed, step_s=step_s, step_times=steps, tokens_per_s=tps,
        threads=threads, peak_flops=peak, model_flops_per_token=model_flops, executed_flops_per_token=executed,
        mfu=tps * model_flops / peak, executed_fraction=tps * executed / peak, blocks=int(len(pack(texts, tok, cfg.seq_len))),
        boundary_cache=bc, optimizer=log.get('optimizer', 'adamw'), frozen_prefix_layers=log.get('frozen_prefix_layers', 0),
        fused_loss=log.get('fused_loss', False), lean_lora_layers=log.get('lean_lora_layers', 0),
        peak_mb=(log['peak_memory_bytes'] - base) / 2**20, peak_kind=log['peak_memory_kind'],
        trainable_params=log['trainable_params'], total_params=log['total_params'], loss=log['loss'])))


def spread(xs): return f'{statistics.median(xs):9.1f} [{min(xs):.1f}-{max(xs):.1f}]'


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='smollm2-135m'); p.add_argument('--steps', type=int, default=6)
    p.add_argument('--batch-size', type=int, default=2); p.add_argument('--seq-len', type=int, default=64)
    p.add_argument('--texts', type=int, default=64, help='wiki train documents packed into blocks')
    p.add_argument('--blocks', type=int, default=4, help='use only the documents that make this many blocks (0: all): '
                   'steps x batch-size / blocks epochs; the boundary-state cache of partial needs more than one')
    p.add_argument('--repeats', type=int, default=None, help='interleaved repeats per (method, version); default 3 (1 for tiny: smoke runs)')
    p.add_argument('--methods', default='lora,partial')
    p.add_argument('--legacy-rev', default=LEGACY_REV, help='git revision of the version before (default: %(default)s)')
    p.add_argument('--device', default=None, help='default: cuda if available, else cpu')
    p.add_argument('--versions', default='old,new', help="'new' alone: the methods side by side, no version before")
    p.add_argument('--target', default='ffn', help="LoRA/QLoRA targets: 'ffn' (Gromov et al.) or 'all-linear' (Lu et al.)")
    p.add_argument('--threads', type=int, default=None, help="threads of the new version (default: 'auto')")
    p.add_argument('--json', default=None)
    p.add_argument('--child', help=argparse.SUPPRESS); p.add_argument('--version', help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child: return child(args)
    if args.steps < 2: p.error('--steps must be >= 2 (the first step is warm-up)')
    if args.repeats is None: args.repeats = 1 if args.model.startswith('tiny:') else 3
    versions = [v.strip() for v in args.versions.split(',') if v.strip()]
    if not versions or set(versions) - {'old', 'new'} or 'new' not in versions: p.error("--versions: 'old,new' or 'new'")

    methods = [m.strip() for m in args.methods.split(',') if m.strip()]
    load = os.getloadavg()
    print(f'# {args.model} pruned 25% (reverse order) on {machine()}; {args.steps} steps x batch {args.batch_size} x '
          f'{args.seq_len} tokens, {args.blocks or "all"} blocks; {args.repeats} interleaved repeats, fresh process each; '
          f'old = git {args.legacy_rev} on 1 thread; LoRA targets {args.target}; new on {args.threads or "auto"} threads; '
          f'versions {",".join(versions)}; load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}')
    fwd = ['--model', args.model, '--steps', args.steps, '--batch-size', args.batch_size, '--seq-len', args.seq_len,
           '--texts', args.texts, '--blocks', args.blocks, '--legacy-rev', args.legacy_rev, '--target', args.target] + \
          (['--device', args.device] if args.device else []) + (['--threads', args.threads] if args.threads else [])
    runs = {(m, v): [] for m in methods for v in versions}
    for rep in range(args.repeats):
        for m in methods:
            for v in versions:
                runs[m, v].append(in_subprocess(__file__, ['--child', m, '--version', v, *fwd]))
    load_end = os.getloadavg()
    from layerprune.experiments import provenance
    from layerprune.plots import run_record   # commit, machine, date: as a figure's run record
    prov = dict(provenance(args.model), **run_record(), script='bench/heal.py', argv=sys.argv[1:])
    res = dict(model=args.model, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, blocks=args.blocks,
               repeats=args.repeats, legacy_rev=args.legacy_rev, target=args.target, threads=args.threads, versions=versions,
               machine=machine(), load_start=load, load_end=load_end,
               methods={}, legacy={}, runs={f'{m}/{v}': r for (m, v), r in runs.items()}, provenance=prov)
    print(f'{"method":<8} {"ver":<4} {"tokens/s median [min-max]":>27} {"thr":>3} {"peak GFLOP/s":>12} {"F (model)":>9} '
          f'{"executed":>8} {"peak MB":>8} {"trainable":>10}  loss first -> last')
    for m in methods:
        for v in versions:
            rs = runs[m, v]; r0 = rs[-1]
            agg = dict(r0, tokens_per_s=statistics.median(r['tokens_per_s'] for r in rs),
                       tokens_per_s_all=[r['tokens_per_s'] for r in rs], mfu=statistics.median(r['mfu'] for r in rs),
                       executed_fraction=statistics.median(r['executed_fraction'] for r in rs),
                       peak_flops=statistics.median(r['peak_flops'] for r in rs), peak_mb=statistics.median(r['peak_mb'] for r in rs))
            (res['methods'] if v == 'new' else res['legacy'])[m] = agg
            print(f'{m:<8} {v:<4} {spread(agg["tokens_per_s_all"]):>27} {r0["threads"]:>3} {agg["peak_flops"] / 1e9:12.1f} '
                  f'{agg["mfu"]:9.3f} {agg["executed_fraction"]:8.3f} {agg["peak_mb"]:8.0f} {r0["trainable_params"] / 1e6:8.2f} M'
                  f'  {r0["loss"][0]:.3f} -> {r0["loss"][-1]:.3f}', flush=True)
    for m in (methods if 'old' in versions else []):
        new, old = res['methods'][m], res['legacy'][m]
        x = new['tokens_per_s'] / old['tokens_per_s']; res[f'{m}_new_over_old'] = x
        print(f'{m}: new / old tokens/s = {x:.2f}x (target >= 1.5x: {"met" if x >= 1.5 else "NOT met"}); '
              f'achieved / peak = {new["mfu"]:.3f} (old {old["mfu"]:.3f})')
    r0 = next(iter(res['methods'].values())); res['removed'] = r0['removed']
    print(f'  (removed layers {r0["removed"][0]}..{r0["removed"][-1]} of {r0["L"]}, 0-based; {r0["blocks"]} blocks; peak = {r0["peak_kind"]} '
          f'above the loaded pruned model; load average at end {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f})')
    M = res['methods']
    for a, b in [('partial', 'lora'), ('qlora', 'lora'), ('partial', 'qlora')]:
        if a in M and b in M:
            t = M[a]['tokens_per_s'] / M[b]['tokens_per_s']; mem = M[a]['peak_mb'] / max(M[b]['peak_mb'], 1.0)
            res[f'{a}_over_{b}'] = dict(tokens_per_s=t, peak_memory=mem)
            per = [x / y for x, y in zip(M[a]['tokens_per_s_all'], M[b]['tokens_per_s_all'])]   # interleaved repeat by repeat
            res[f'{a}_over_{b}']['per_repeat'] = per
            print(f'ratio  {a} / {b}: tokens/s {t:.2f}x (per repeat {", ".join(f"{x:.2f}" for x in per)}), '
                  f'peak memory {mem:.2f}x (new version)')
    if 'partial' in M and 'lora' in M:
        faster = M['partial']['tokens_per_s'] > M['lora']['tokens_per_s']
        res['partial_faster_than_lora'] = faster
        print(f'Lu et al. (partial faster than LoRA): {"holds" if faster else "does not hold"} here')
    if args.json: Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == '__main__': main()
