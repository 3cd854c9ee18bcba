"""Benchmark: a pruning sweep evaluated with the shared prefix (`layerprune.sweep`) vs one evaluation per variant.

The plan is the paper's kind of grid: fractions x strategies (default 8 fractions 0.0-0.7 x similarity, deepest, reverse;
n = round(fraction * L) layers removed, 0-based blocks). Both ways evaluate the same distinct variants:
  loss     `sweep_loss` (all variants, one pass per batch)  vs  `lm_loss` under `skip_layers` per variant
  lm-eval  `evaluate_variants` (one shared pass per request batch)  vs  `evaluate_tasks` under `skip_layers` per variant
Interleaving: the loss texts are split into chunks of one batch; each chunk runs both ways, the order alternating
(ABBA); the lm-eval per-variant runs are split in two halves with the shared run between them. Results must be equal:
it prints the max relative loss difference and whether every accuracy is identical. It prints
  shared-prefix / per-variant time ratio = X        (loss sweep, summed over chunks)
  ideal = Y                                          (FLOP counts of the same plan: layers + head, per token)
  lm-eval shared-prefix / per-variant time ratio = X
  lm-eval ideal = Y
and the ideal ratios for the paper's grids on Llama-2-70B's config (80 layers, hidden 8192, intermediate 28672,
64 heads, 8 KV heads, vocab 32000; seq_len 2048). FLOPs per token: a layer 2 x its matmul parameters + attention
4 x (mean attended length) x hidden; the head 2 x hidden x vocab, at the positions where it runs (per-variant loss
and the shared pass: the read positions; per-variant lm-eval (HFLM): every position).

  python bench/sweep.py [--model smollm2-135m] [--samples 16] [--seq-len 128] [--limit 50] [--json OUT]
  python bench/sweep.py --smoke      # tiny:llama, seconds (tests/test_bench.py)

With --rows TASK[:SHOTS] it measures instead the row sharing inside `sweep_loglikelihoods` on that task's real requests
(unpruned model): a request whose input is a prefix of another's rides on its row (MMLU's 4 one-token answers after
one context: 1 row instead of 4) vs one row per request (the pass before), interleaved ABAB over --repeats, answers
compared. It prints
  rows: shared / one-per-request time ratio = X      (median of the interleaved pairs, min, max)
  ideal = Y                                          (tokens fed, shared / one-per-request)

  python bench/sweep.py --rows boolq --limit 24 --repeats 3
  python bench/sweep.py --rows mmlu:5 --limit 1 --repeats 1   # 57 subjects x 1 question, 5-shot
"""
import argparse, json, sys, time
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).parent))
from _common import timed, machine, load, recording, fed, one_row_each, padded_positions
import layerprune.sweep as S
from layerprune.models import load_model, decoder
from layerprune.data import load_texts
from layerprune.prune import skip_layers, select_layers
from layerprune.evaluate import evaluate_tasks
from layerprune.loss import lm_loss, output_vocab_size


def layer_flops(H, I, heads, kv_heads, ctx, head_dim=None):
    "FLOPs per token of one llama-style decoder layer attending to `ctx` tokens on average."
    d = head_dim or H // heads
    params = H * heads * d * 2 + H * kv_heads * d * 2 + 3 * H * I
    return 2 * params + 4 * ctx * heads * d

def ideal(variants, L, c_layer, c_head, read_shared, read_per):
    "Shared-prefix / per-variant FLOPs of the distinct `variants` (head at a fraction `read_*` of the positions)."
    vs = list(dict.fromkeys(S.check_variants(variants, L)))
    cost = S.plan_cost(S.build_trie(vs, L))
    shared = cost['layers'] * c_layer + cost['heads'] * c_head * read_shared
    per = sum((L - len(v)) * c_layer + c_head * read_per for v in vs)
    return shared / per

def grid(model, tok, L, fractions, strategies, calib, seq_len, bs):
    dist = None
    out = []
    for s in strategies:
        for f in fractions:
            n = round(f * L)
            if n == 0: out.append(dict(strategy=s, fraction=f, n=0, layers=[])); continue
            kw = {}
            if s == 'similarity':
                if dist is None:
                    from layerprune.distance import angular_distances
                    dist = angular_distances(model, tok, calib, seq_len=seq_len, batch_size=bs)
                kw = dict(tokenizer=tok, texts=calib, distances=dist)
            out.append(dict(strategy=s, fraction=f, n=n, layers=select_layers(model, n, s, **kw)))
    return out

def llama70b_ideals(read_cont):
    "Ideal ratios on Llama-2-70B's config for the paper's grids (similarity blocks assumed deep: [L-n-2, L-2))."
    L, H, I, V = 80, 8192, 28672, 32000
    c_l, c_h = layer_flops(H, I, 64, 8, (2048 + 1) / 2), 2 * H * V
    sim = lambda n: list(range(L - n - 2, L - 2))
    deep = lambda n: list(range(L - n - 1, L - 1))
    rev = lambda n: list(range(L - n, L))
    ns = lambda fr: [round(f * L) for f in fr]
    fig2 = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
    loss16 = [i * 0.05 for i in range(16)]
    def vs(fns, fr): return [f(n) if n else [] for f in fns for n in ns(fr)]
    return {
        'fig2 (similarity, deepest x 0.0-0.7) loss': ideal(vs([sim, deep], fig2), L, c_l, c_h, 1, 1),
        'fig2 (similarity, deepest x 0.0-0.7) lm-eval': ideal(vs([sim, deep], fig2), L, c_l, c_h, read_cont, 1),
        'unhealed loss (deepest, reverse x 0.0-0.75 step 0.05) loss': ideal(vs([deep, rev], loss16), L, c_l, c_h, 1, 1),
        'this plan (similarity, deepest, reverse x 0.0-0.7) loss': ideal(vs([sim, deep, rev], fig2), L, c_l, c_h, 1, 1),
    }

def rows_bench(a, model, tok, dev):
    "Row sharing in `sweep_loglikelihoods` vs one row per request, on the real requests of `a.rows`."
    task, _, shots = a.rows.partition(':')
    shared_rows = S._cont_rows
    with recording(S, stop=True) as seen:
        S.evaluate_variants(model, tok, [[]], [task], limit=a.limit, num_fewshot=int(shots) if shots else None)
    if a.max_requests: seen = seen[:a.max_requests]   # lm-eval lists a question's answers together
    ml = 2048
    n_fed = lambda rows: sum(len(t) for t, _ in rows)
    rows, one = shared_rows(seen, ml), one_row_each(seen, ml); n_rows = len(rows)
    y = n_fed(rows) / n_fed(one)
    y_pad = padded_positions(rows, a.batch_size) / padded_positions(one, a.batch_size)
    print(f'rows: {task} {shots or 0}-shot, {len(seen)} requests: {n_rows} shared rows vs {len(seen)}; load {load()}', flush=True)
    ts, to, diff = [], [], 0.0
    for r in range(a.repeats):
        for way in (('shared', 'one') if r % 2 == 0 else ('one', 'shared')):
            S._cont_rows = shared_rows if way == 'shared' else one_row_each
            try: t, res = timed(lambda: S.sweep_loglikelihoods(model, seen, [[]], a.batch_size, ml), dev)
            finally: S._cont_rows = shared_rows
            (ts if way == 'shared' else to).append(t)
            if way == 'shared': rs = res[()]
            else: ro = res[()]
        diff = max([diff] + [abs(x[0] - z[0]) / max(1.0, abs(z[0])) for x, z in zip(rs, ro)])
        print(f'  pair {r + 1}/{a.repeats}: shared {ts[-1]:.1f}s, one row per request {to[-1]:.1f}s; load {load()}', flush=True)
    ratios = sorted(x / z for x, z in zip(ts, to)); med = ratios[len(ratios) // 2]
    greedy_same = sum(x[1] == z[1] for x, z in zip(rs, ro))
    print(f'rows: answers max relative difference {diff:.1e}, is_greedy equal for {greedy_same} of {len(seen)}')
    print(f'rows: shared / one-per-request time ratio = {med:.3f}  (median of {len(ratios)} interleaved pairs, '
          f'min {ratios[0]:.3f}, max {ratios[-1]:.3f})')
    print(f'ideal = {y:.3f}  (tokens fed); {y_pad:.3f} counting the padding of batches of {a.batch_size} rows')
    return dict(task=task, shots=int(shots or 0), requests=len(seen), rows=n_rows, ratio=med,
                ratios=ratios, ideal=y, ideal_padded=y_pad, max_rel_diff=diff, greedy_equal=greedy_same, shared_s=ts, one_row_s=to, load_end=load())

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='smollm2-135m'); p.add_argument('--samples', type=int, default=16)
    p.add_argument('--seq-len', type=int, default=128); p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--fractions', default='0.0,0.1,0.2,0.3,0.4,0.5,0.6,0.7')
    p.add_argument('--strategies', default='similarity,deepest,reverse')
    p.add_argument('--calib-samples', type=int, default=32, help="similarity: distance documents (wiki train split)")
    p.add_argument('--task', default='arc_easy'); p.add_argument('--limit', type=int, default=50)
    p.add_argument('--no-lm-eval', action='store_true'); p.add_argument('--no-loss', action='store_true')
    p.add_argument('--per-variant-sample', type=int, default=None,
                   help='lm-eval: time the per-variant way on only K of the distinct variants (chosen evenly from the list '
                        'sorted by kept layers) and scale its time by (distinct / K); equality is checked on those K')
    p.add_argument('--rows', default=None, metavar='TASK[:SHOTS]',
                   help="measure row sharing in sweep_loglikelihoods on this task's requests instead (see above)")
    p.add_argument('--repeats', type=int, default=3, help='--rows: interleaved pairs')
    p.add_argument('--max-requests', type=int, default=None, help="--rows: only the task's first N requests")
    p.add_argument('--smoke', action='store_true', help='tiny:llama with the tiniest sizes (seconds)')
    p.add_argument('--device', default=None); p.add_argument('--json', default=None)
    a = p.parse_args()
    if a.smoke: a.model, a.samples, a.seq_len, a.batch_size, a.calib_samples, a.limit, a.fractions = 'tiny:llama', 4, 16, 2, 4, 2, '0.0,0.5'

    model, tok = load_model(a.model, device=a.device)
    dev = next(model.parameters()).device; L = decoder(model).num_layers
    if a.rows:
        print(f'# {a.model} on {machine()}; load average {load()} (1/5/15 min; a shared machine)')
        res = dict(model=a.model, machine=machine(), rows=rows_bench(a, model, tok, dev))
        if a.json: Path(a.json).write_text(json.dumps(res, indent=1))
        return
    texts = load_texts('wiki', 'validation', a.samples)
    calib = load_texts('wiki', 'train', a.calib_samples)
    fr = [float(x) for x in a.fractions.split(',')]; strategies = a.strategies.split(',')
    print(f'# {a.model} (L={L}) on {machine()}; load average {load()} (1/5/15 min; a shared machine); '
          f'fractions {fr} x {strategies}; loss: {a.samples} docs x <= {a.seq_len} tokens, batch {a.batch_size}; '
          f'lm-eval: {a.task}, {a.limit} items')
    plan = grid(model, tok, L, fr, strategies, calib, a.seq_len, a.batch_size)
    variants = [r['layers'] for r in plan]
    distinct = [list(v) for v in dict.fromkeys(tuple(v) for v in variants)]
    cost = S.plan_cost(S.build_trie(S.check_variants(distinct, L), L))
    print(f'plan: {len(variants)} variants, {len(distinct)} distinct; shared pass per token: {cost["layers"]} layer '
          f'applications + {cost["heads"]} heads, per-variant: {sum(L - len(v) for v in distinct)} layers + {len(distinct)} heads')
    for r in plan: print(f'  {r["strategy"]:>10} {r["fraction"]:.2f} n={r["n"]:>2}: ' + (f'[{r["layers"][0]}, {r["layers"][-1] + 1})'
                         if r['layers'] and r['layers'] == list(range(r['layers'][0], r['layers'][-1] + 1)) else str(r['layers'])))
    lm_loss(model, tok, texts[:1], 16, 1); S.sweep_loss(model, tok, texts[:1], distinct, 16, 1)  # warm-up

    # loss: chunks of one batch, ABBA order
    chunks = [] if a.no_loss else [texts[i:i + a.batch_size] for i in range(0, len(texts), a.batch_size)]
    t_sh = t_per = 0.0; diff = 0.0; read = tok_n = 0
    for i, ch in enumerate(chunks):
        def shared(): return S.sweep_loss(model, tok, ch, distinct, a.seq_len, a.batch_size)
        def per():
            out = []
            for v in distinct:
                with skip_layers(model, v): out.append(lm_loss(model, tok, ch, a.seq_len, a.batch_size))
            return out
        for which in ((shared, per) if i % 2 == 0 else (per, shared)):
            t, res = timed(which, dev)
            if which is shared: t_sh += t; rs = res
            else: t_per += t; rp = res
        diff = max([diff] + [abs(x['nats'] - y['nats']) / abs(y['nats']) for x, y in zip(rs, rp)])
        read += rs[0]['tokens']; tok_n += sum(min(len(x), a.seq_len) for x in tok(ch)['input_ids'])
        print(f'  loss chunk {i + 1}/{len(chunks)}: shared {t_sh:.1f}s, per-variant {t_per:.1f}s so far; load {load()}', flush=True)
    H, V = model.config.hidden_size, output_vocab_size(model)
    heads, kvh = model.config.num_attention_heads, getattr(model.config, 'num_key_value_heads', model.config.num_attention_heads)
    hd = getattr(model.config, 'head_dim', None) or H // heads
    c_head = 2 * H * V
    c_layer_of = lambda ctx: layer_flops(H, model.config.intermediate_size, heads, kvh, ctx, hd)
    res = dict(model=a.model, L=L, machine=machine(), plan=plan, distinct=distinct, plan_cost=cost)
    if chunks:
        c_l = c_layer_of((tok_n / len(texts) + 1) / 2)
        y_loss = ideal(distinct, L, c_l, c_head, read / tok_n, read / tok_n)
        res['loss'] = dict(shared_s=t_sh, per_variant_s=t_per, ratio=t_sh / t_per, ideal=y_loss, max_rel_diff=diff,
                           chunks=len(chunks), samples=a.samples, seq_len=a.seq_len)
        print(f'loss: max relative difference shared vs per-variant = {diff:.2e} (over {len(distinct)} variants)')
        print(f'shared-prefix / per-variant time ratio = {t_sh / t_per:.3f}  ({t_sh:.1f}s vs {t_per:.1f}s)')
        print(f'ideal = {y_loss:.3f}')

    read_cont = 1.0
    if not a.no_lm_eval:
        K = len(distinct) if a.per_variant_sample is None else max(1, min(a.per_variant_sample, len(distinct)))
        by_kept = sorted(distinct, key=len)
        sample = [by_kept[int((i + 0.5) * len(distinct) / K)] for i in range(K)]
        sample = sample[0::2] + sample[1::2]   # both halves span the range of kept layers
        half = (K + 1) // 2; per_res = {}
        def per_run(vs):
            for v in vs:
                with skip_layers(model, v): per_res[tuple(v)] = evaluate_tasks(model, tok, [a.task], limit=a.limit, batch_size=a.batch_size)
        print(f'  lm-eval: load {load()}', flush=True)
        t1, _ = timed(lambda: per_run(sample[:half]), dev); print(f'  lm-eval per-variant first half {t1:.1f}s; load {load()}', flush=True)
        with recording(S) as seen:   # the shared pass's requests (evaluate_tasks goes through it too)
            t2, sh = timed(lambda: S.evaluate_variants(model, tok, distinct, [a.task], limit=a.limit, batch_size=a.batch_size), dev)
        print(f'  lm-eval shared {t2:.1f}s; load {load()}', flush=True)
        t3, _ = timed(lambda: per_run(sample[half:]), dev); print(f'  lm-eval per-variant second half {t3:.1f}s; load {load()}', flush=True)
        scale = len(distinct) / K; t_pv = (t1 + t3) * scale
        same = sum(sh[i] == per_res[tuple(v)] for i, v in enumerate(distinct) if tuple(v) in per_res)
        cont = sum(len(x) for _, x in seen); tot = sum(len(fed(c, x, 2048)) for c, x in seen)
        read_cont = cont / tot
        y_lm = ideal(distinct, L, c_layer_of((tot / len(seen) + 1) / 2), c_head, read_cont, 1.0)
        accs = [(v, sh[i][a.task]['acc'], per_res[tuple(v)][a.task]['acc'] if tuple(v) in per_res else None) for i, v in enumerate(distinct)]
        res['lm_eval'] = dict(task=a.task, limit=a.limit, shared_s=t2, per_variant_s=t_pv, ratio=t2 / t_pv, ideal=y_lm,
                              identical=same, compared=K, variants=len(distinct), per_variant_measured=[list(v) for v in sample],
                              per_variant_measured_s=t1 + t3, continuation_fraction=read_cont, accs=accs)
        est = '' if K == len(distinct) else f'; per-variant time measured on {K} of {len(distinct)} variants, x{scale:.2f}'
        print(f'lm-eval: results identical for {same} of {K} variants compared (acc, acc_norm, stderr); '
              f'continuation tokens = {read_cont:.3f} of the positions')
        print(f'lm-eval shared-prefix / per-variant time ratio = {t2 / t_pv:.3f}  ({t2:.1f}s vs {t_pv:.1f}s{est})')
        print(f'lm-eval ideal = {y_lm:.3f}')
    res['llama2_70b_ideal'] = llama70b_ideals(read_cont)
    for k, v in res['llama2_70b_ideal'].items(): print(f'Llama-2-70B ideal, {k} = {v:.3f}')
    print(f'  (70B: seq_len 2048; lm-eval continuation fraction {read_cont:.3f} as measured here; similarity blocks assumed [L-n-2, L-2))')
    res['load_end'] = load(); print(f'load average at the end {load()}')
    if a.json: Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == '__main__': main()
