"""The GPU check (`make gpu-check`): on any CUDA machine, in a few minutes, measure what CI cannot.

Prints, side by side in one run:
  * a bf16 distance pass vs fp32 on smollm2-135m: max |difference| of the distance matrix, whether l*(n) changes,
    and the time ratio;
  * measured peak GPU memory vs the planner's estimate (`layerprune.plan`) for that distance pass and for one
    QLoRA (NF4, bf16 compute) and one partial-layer (lm_head + last 3, bf16 with fp32 master weights) healing run;
then the GPU-marked tests run (`pytest -m gpu`, from the Makefile).
Exit 2 (one line) where there is no CUDA device.
"""
import argparse, json, sys, time
import torch

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--model', default='smollm2-135m'); ap.add_argument('--samples', type=int, default=64)
    ap.add_argument('--seq-len', type=int, default=256); ap.add_argument('--batch-size', type=int, default=8)
    ap.add_argument('--gpu', default=None, help="planner GPU name (default: guessed from the device name)")
    ap.add_argument('--json', default=None, help='also write the numbers here')
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print('gpu_check: error: no CUDA device here: nothing to check (CI has no GPU)', file=sys.stderr); return 2
    from layerprune.models import load_model, decoder
    from layerprune.data import load_texts
    from layerprune.distance import angular_distances
    from layerprune.utils import PeakMemory
    from layerprune import plan
    name = torch.cuda.get_device_name()
    gpu = plan.gpu_spec(a.gpu or next((g for g in ('H200', 'H100-80GB', 'A100-80GB', 'A100-40GB') if g.split('-')[0] in name), 'A100-80GB'))
    arch = plan.load_arch(a.model)
    texts = load_texts('wiki', 'validation', a.samples)
    out = dict(device=name, torch=torch.__version__, model=a.model)
    res = {}
    for dt in ('float32', 'bfloat16'):
        model, tok = load_model(a.model, dtype=dt, device='cuda')
        angular_distances(model, tok, texts[:a.batch_size], a.seq_len, a.batch_size)   # warm-up
        torch.cuda.synchronize(); t0 = time.perf_counter()
        with PeakMemory('cuda') as mem: r = angular_distances(model, tok, texts, a.seq_len, a.batch_size)
        torch.cuda.synchronize()
        res[dt] = dict(r=r, s=time.perf_counter() - t0, peak=mem.peak)
        del model; torch.cuda.empty_cache()
    d32, d16 = res['float32']['r'], res['bfloat16']['r']
    diff = float(abs(d32.mean - d16.mean).max())
    changed = [n for n, (x, y) in enumerate(zip(d32.best_start, d16.best_start), 1) if x != y]
    planned = plan.stage_distances(arch, 'bf16', a.samples, a.seq_len, a.batch_size, gpu).peak
    out.update(distance_max_abs_diff_bf16_vs_fp32=diff, lstar_changed_for_n=changed,
               distance_time_bf16_over_fp32=res['bfloat16']['s'] / res['float32']['s'],
               distance_peak_measured_over_planned=res['bfloat16']['peak'] / planned)
    print(f"bf16 vs fp32 distance matrix: max |diff| = {diff:.2e}; l*(n) changes for n = {changed or 'none'}")
    print(f"bf16 / fp32 distance pass time ratio = {out['distance_time_bf16_over_fp32']:.2f}")
    print(f"distance pass: measured / planned peak GPU memory = {out['distance_peak_measured_over_planned']:.2f} "
          f"({res['bfloat16']['peak'] / 1e9:.2f} GB vs {planned / 1e9:.2f} GB)")
    from layerprune.heal import HealConfig, heal
    from layerprune.prune import drop_layers
    train = load_texts('wiki', 'train', 400)
    for method in ('qlora', 'partial'):
        model, tok = load_model(a.model, dtype='bfloat16', device='cuda')
        L = decoder(model).num_layers; drop_layers(model, list(range(L - 9, L - 1)))
        cfg = HealConfig(method=method, steps=4, warmup=1, batch_size=16, micro_batch=4, seq_len=a.seq_len,
                         lr=1e-4 if method == 'qlora' else 1e-5, rank=8)
        _, log = heal(model, tok, cfg, train, progress=False)
        planned = plan.stage_heal(arch, method, L - 8, cfg.steps, cfg.batch_size, cfg.seq_len, cfg.micro_batch, cfg.rank).peak
        ratio = log['peak_memory_bytes'] / planned
        out[f'heal_{method}_tokens_per_s'] = log['tokens_per_s']; out[f'heal_{method}_peak_measured_over_planned'] = ratio
        print(f"heal {method}: {log['tokens_per_s']:.0f} tokens/s; measured / planned peak GPU memory = {ratio:.2f} "
              f"({log['peak_memory_bytes'] / 1e9:.2f} GB vs {planned / 1e9:.2f} GB)")
        del model; torch.cuda.empty_cache()
    if a.json:
        from layerprune.utils import atomic_write_json
        atomic_write_json(a.json, out)
    return 0

if __name__ == '__main__': sys.exit(main())
