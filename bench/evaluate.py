"""Benchmark: `evaluate_tasks` answering through `eval_lm` (layerprune's SweepLM) vs lm-eval's own `HFLM`.

lm-eval's HFLM runs the LM head at every position of every row. Its logits cache already gives the one-token answers
after one context a single row (MMLU's 4 letters, BoolQ's yes / no); a longer answer gets a row of its own. `eval_lm`
applies the head only at the continuation tokens, and lets any request whose input is a prefix of another's ride on
its row. On a model with a large vocabulary (Gemma 3: 262k, hidden 640) the head costs more per position than all the
decoder layers, so running it at the answer tokens only is the main saving.

The same tasks run both ways, interleaved (over --repeats rounds, order alternating), on the same in-memory model,
and a third way with an lm-eval model that computes nothing: what building the tasks and requests and scoring costs
both ways alike. Results must agree: it prints whether every task's acc / acc_norm match. It prints
  eval_lm / HFLM time ratio = X        (median of the interleaved rounds, min, max)
  net of it, eval_lm / HFLM = X'       (the same with the no-model time taken off both)
  ideal = Y; Y' counting the padding   (FLOPs of what each computes: layers x positions fed + head x positions read;
                                        Y' with every batch padded to its longest row, as both passes do)

  python bench/evaluate.py [--model gemma3-270m] [--tasks hellaswag,mmlu] [--limit 20] [--repeats 3] [--json OUT]
  python bench/evaluate.py --smoke    # tiny:llama, seconds (tests/test_bench.py)
"""
import argparse, json, sys
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).parent))
from _common import timed, machine, load, recording, one_row_per_input, padded_positions
import layerprune.evaluate as E
import layerprune.sweep as S
from layerprune.models import load_model, decoder
from layerprune.loss import output_vocab_size

def hflm(model, tokenizer, batch_size=8):
    from lm_eval.models.huggingface import HFLM
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)

def null_lm(model, tokenizer, batch_size=8):
    """An lm-eval model that answers every request with log-likelihood 0 and computes nothing: what is left of an
    evaluation without its model (building the tasks and requests, scoring) costs both ways the same."""
    from lm_eval.api.model import LM
    class NullLM(LM):
        def loglikelihood(self, requests, disable_tqdm=False): return [(0.0, False)] * len(requests)
        def loglikelihood_rolling(self, requests, disable_tqdm=False): return [0.0] * len(requests)
        def generate_until(self, requests, disable_tqdm=False): return [''] * len(requests)
    return NullLM()

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
    orig_lm = E.eval_lm
    def run(way):
        E.eval_lm = dict(eval_lm=orig_lm, hflm=hflm, null=null_lm)[way]
        try: return E.evaluate_tasks(model, tok, tasks, a.limit, a.num_fewshot, batch_size=a.batch_size, offline=True)
        finally: E.eval_lm = orig_lm
    with recording(S) as seen: run('eval_lm')   # warm-up; records the requests
    t_new, t_old, t_null, same = [], [], [], True
    for r in range(a.repeats):
        for way in (('eval_lm', 'hflm', 'null') if r % 2 == 0 else ('null', 'hflm', 'eval_lm')):
            t, res = timed(lambda: run(way), dev)
            dict(eval_lm=t_new, hflm=t_old, null=t_null)[way].append(t)
            if way == 'eval_lm': rn = res
            elif way == 'hflm': ro = res
        same = same and all(rn[t].get(k) == ro[t].get(k) for t in tasks for k in ('acc', 'acc_norm'))
        print(f'  round {r + 1}/{a.repeats}: eval_lm {t_new[-1]:.1f}s, HFLM {t_old[-1]:.1f}s, no model {t_null[-1]:.1f}s; '
              f'load {load()}', flush=True)
    ratios = sorted(x / y for x, y in zip(t_new, t_old)); med = ratios[len(ratios) // 2]
    # net of what both pay without a model (tasks, requests, scoring): the model's share of the time
    nets = sorted((x - z) / (y - z) for x, y, z in zip(t_new, t_old, t_null)); net = nets[len(nets) // 2]
    # ideal: layer FLOPs ~ 2 x non-embedding params per position fed; head 2 x hidden x vocab per position it runs at
    H, V = model.config.get_text_config().hidden_size, output_vocab_size(model)
    layer_params = sum(p.numel() for p in decoder(model).layers.parameters())
    shared, hflm_rows = S._cont_rows(seen, 2048), one_row_per_input(seen, 2048)
    fed_new, fed_old = sum(len(t) for t, _ in shared), sum(len(t) for t, _ in hflm_rows); read = sum(len(x) for _, x in seen)
    y = (2 * layer_params * fed_new + 2 * H * V * read) / (2 * layer_params * fed_old + 2 * H * V * fed_old)
    # with the padding of batches (both sort longest first and pad each batch to its longest row)
    pad_new, pad_old = padded_positions(shared, a.batch_size), padded_positions(hflm_rows, a.batch_size)
    y_pad = (2 * layer_params * pad_new + 2 * H * V * read) / (2 * layer_params * pad_old + 2 * H * V * pad_old)
    print(f'requests: {len(seen)}; positions fed {fed_old} (HFLM) vs {fed_new} (shared rows); head at {read} positions '
          f'vs {fed_old}; head / layers FLOPs per position = {H * V / layer_params:.2f}')
    print(f'results identical (acc, acc_norm of every task): {same}')
    print(f'eval_lm / HFLM time ratio = {med:.3f}  (median of {len(ratios)} interleaved rounds, min {ratios[0]:.3f}, max {ratios[-1]:.3f})')
    print(f'without the model (tasks, requests, scoring; both pay it): {sorted(t_null)[len(t_null) // 2]:.1f}s; '
          f'net of it, eval_lm / HFLM = {net:.3f}  (min {nets[0]:.3f}, max {nets[-1]:.3f})')
    print(f'ideal = {y:.3f}; {y_pad:.3f} counting the padding of batches of {a.batch_size} rows ({pad_new} vs {pad_old} positions)')
    print(f'load average at the end {load()}')
    if a.json:
        Path(a.json).write_text(json.dumps(dict(model=a.model, machine=machine(), tasks=tasks, limit=a.limit, ratio=med,
            ratios=ratios, ideal=y, ideal_padded=y_pad, net_ratio=net, net_ratios=nets,
            identical=same, eval_lm_s=t_new, hflm_s=t_old, no_model_s=t_null, requests=len(seen), fed_hflm=fed_old,
            fed_shared=fed_new, head_positions=read, results=rn, load_end=load()), indent=1))


if __name__ == '__main__': main()
