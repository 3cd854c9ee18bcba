"""Benchmark: `evaluate_tasks` answering through `eval_lm` (layerprune's SweepLM) vs lm-eval's own `HFLM`.

lm-eval's HFLM runs the LM head at every position of every request and gives each of a question's answers its own row.
`eval_lm` applies the head only at the continuation tokens and lets a request whose input is a prefix of another's ride
on its row (the 4 one-token answers of an MMLU question: 1 row). On a model with a large vocabulary (Gemma 3: 262k,
hidden 640) the head costs more per token than all the decoder layers, so both savings add up.

The same tasks run both ways, interleaved (ABAB... over --repeats, order alternating), on the same in-memory model.
Results must agree: it prints whether every task's acc / acc_norm match. It prints
  eval_lm / HFLM time ratio = X        (median of the interleaved pairs, min, max)
  ideal = Y                            (FLOPs of what each computes: layers x positions fed + head x positions read)

  python bench/evaluate.py [--model gemma3-270m] [--tasks hellaswag,mmlu] [--limit 20] [--repeats 3] [--json OUT]
  python bench/evaluate.py --smoke    # tiny:llama, seconds (tests/test_bench.py)
"""
import argparse, json, os, sys
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).parent))
from _common import timed, machine
import layerprune.evaluate as E
import layerprune.sweep as S
from layerprune.models import load_model, decoder
from layerprune.loss import output_vocab_size

def load(): return ' '.join(f'{x:.2f}' for x in os.getloadavg())

def hflm(model, tokenizer, batch_size=8):
    from lm_eval.models.huggingface import HFLM
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='gemma3-270m'); p.add_argument('--tasks', default='hellaswag,mmlu')
    p.add_argument('--limit', type=int, default=20, help='items per task (MMLU: per subject)')
    p.add_argument('--num-fewshot', type=int, default=None); p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--repeats', type=int, default=3, help='interleaved pairs')
    p.add_argument('--smoke', action='store_true', help='tiny:llama with the tiniest sizes (seconds)')
    p.add_argument('--device', default=None); p.add_argument('--json', default=None)
    a = p.parse_args()
    if a.smoke: a.model, a.tasks, a.limit, a.repeats = 'tiny:llama', 'arc_easy', 3, 1
    model, tok = load_model(a.model, device=a.device)
    dev = next(model.parameters()).device
    tasks = a.tasks.split(',')
    print(f'# {a.model} on {machine()}; load average {load()} (1/5/15 min; a shared machine); tasks {tasks}, '
          f'{a.limit} items each, {a.num_fewshot or 0}-shot, batch {a.batch_size}')
    seen, orig = [], S.sweep_loglikelihoods
    def spy(m, reqs, *x, **k): seen.extend(reqs); return orig(m, reqs, *x, **k)
    orig_lm = E.eval_lm
    def run(way):
        E.eval_lm = orig_lm if way == 'eval_lm' else hflm
        try: return E.evaluate_tasks(model, tok, tasks, a.limit, a.num_fewshot, batch_size=a.batch_size, offline=True)
        finally: E.eval_lm = orig_lm
    S.sweep_loglikelihoods = spy
    try: run('eval_lm')   # warm-up; records the requests
    finally: S.sweep_loglikelihoods = orig
    t_new, t_old, same = [], [], True
    for r in range(a.repeats):
        for way in (('eval_lm', 'hflm') if r % 2 == 0 else ('hflm', 'eval_lm')):
            t, res = timed(lambda: run(way), dev)
            (t_new if way == 'eval_lm' else t_old).append(t)
            if way == 'eval_lm': rn = res
            else: ro = res
        same = same and all(rn[t].get(k) == ro[t].get(k) for t in tasks for k in ('acc', 'acc_norm'))
        print(f'  pair {r + 1}/{a.repeats}: eval_lm {t_new[-1]:.1f}s, HFLM {t_old[-1]:.1f}s; load {load()}', flush=True)
    ratios = sorted(x / y for x, y in zip(t_new, t_old)); med = ratios[len(ratios) // 2]
    # ideal: layer FLOPs ~ 2 x non-embedding params per position fed; head 2 x hidden x vocab per position it runs at
    H, V = model.config.get_text_config().hidden_size, output_vocab_size(model)
    layer_params = sum(p.numel() for p in decoder(model).layers.parameters())
    fed_old = sum(len(c) + len(x) - 1 for c, x in seen)
    fed_new = sum(len(t) for t, _ in S._cont_rows(seen, 2048)); read = sum(len(x) for _, x in seen)
    y = (2 * layer_params * fed_new + 2 * H * V * read) / (2 * layer_params * fed_old + 2 * H * V * fed_old)
    print(f'requests: {len(seen)}; positions fed {fed_old} (HFLM) vs {fed_new} (shared rows); head at {read} positions '
          f'vs {fed_old}; head / layers FLOPs per position = {H * V / layer_params:.2f}')
    print(f'results identical (acc, acc_norm of every task): {same}')
    print(f'eval_lm / HFLM time ratio = {med:.3f}  (median of {len(ratios)} interleaved pairs, min {ratios[0]:.3f}, max {ratios[-1]:.3f})')
    print(f'ideal = {y:.3f}')
    print(f'load average at the end {load()}')
    if a.json:
        Path(a.json).write_text(json.dumps(dict(model=a.model, machine=machine(), tasks=tasks, limit=a.limit, ratio=med,
            ratios=ratios, ideal=y, identical=same, eval_lm_s=t_new, hflm_s=t_old, requests=len(seen), fed_hflm=fed_old,
            fed_shared=fed_new, head_positions=read, results=rn, load_end=load()), indent=1))


if __name__ == '__main__': main()
