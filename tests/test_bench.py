"Smoke tests of the benchmark scripts in bench/: each runs with the tiniest sizes, prints its ratio lines and writes JSON."
import importlib.util, json, os, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_bench(name, *args, tmp_path):
    out = tmp_path/f'{name}.json'
    env = {**os.environ, 'PYTHONPATH': os.environ.get('PYTHONPATH') or str(ROOT), 'HF_HUB_OFFLINE': '1',
           'HF_DATASETS_OFFLINE': '1', 'TOKENIZERS_PARALLELISM': 'false'}
    r = subprocess.run([sys.executable, str(ROOT/'bench'/f'{name}.py'), *map(str, args), '--json', str(out)],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.splitlines()[0].startswith('# tiny:llama'), r.stdout   # the machine/setup line
    return r.stdout, json.loads(out.read_text())


def common():
    "bench/_common.py, imported as the scripts import it (it is not part of the package)."
    spec = importlib.util.spec_from_file_location('bench_common', ROOT/'bench'/'_common.py')
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); return m


def test_common_rows_and_recording():
    "The row counts the ideals are built from, and the request recorder the scripts use to read a task's requests."
    C = common()
    reqs = [([1, 2], [3]), ([1, 2], [4]), ([1, 2], [3, 5]), ([7], [8, 9])]
    assert C.one_row_each(reqs, 2048) == [([1, 2, 3], [(2, 3)]), ([1, 2], [(0, 2)]), ([1, 2], [(1, 2)]), ([7, 8], [(3, 2)])]
    # HFLM's logits cache: the two one-token answers after [1, 2] share a row; the 2-token answer has its own
    assert C.one_row_per_input(reqs, 2048) == [([1, 2, 3], [(2, 3)]), ([1, 2], [(0, 2), (1, 2)]), ([7, 8], [(3, 2)])]
    rows = C.one_row_per_input(reqs, 2)   # cut at the context window: the last 2 input tokens
    assert [t for t, _ in rows] == [[1, 2], [2, 3], [7, 8]]   # equal lengths: in token order
    assert C.padded_positions(C.one_row_each(reqs, 2048), 8) == 4 * 3 and C.padded_positions(C.one_row_each(reqs, 2048), 2) == 2 * 3 + 2 * 2
    class M:
        @staticmethod
        def f(model, reqs, k=0): return [len(r) for r in reqs]
    with C.recording(M, 'f') as seen: assert M.f(None, ['ab', 'c'], k=1) == [2, 1]
    assert seen == ['ab', 'c'] and M.f(None, ['x']) == [1]   # recorded, passed through, restored
    with C.recording(M, 'f', stop=True) as seen:
        M.f(None, ['q']); raise AssertionError('not reached: the first call ends the block')
    assert seen == ['q'] and M.f(None, ['x']) == [1]
    with pytest.raises(ValueError), C.recording(M, 'f', stop=True): raise ValueError   # other errors go through
    assert M.f(None, ['x']) == [1]


def test_distance(tmp_path):
    out, res = run_bench('distance', '--model', 'tiny:llama', '--samples', 2, '--seq-len', 16, '--batch-size', 2,
                         '--repeats', 1, '--per-n', 1, '--skip-scaling', tmp_path=tmp_path)
    for line in ('time   distance / bare forward', 'memory distance / bare forward', 'speed  one pass per n'): assert line in out
    for k in ('time_ratio', 'memory_ratio', 'speedup_vs_per_n', 'bare_s', 'distance_s', 'machine'): assert k in res
    assert res['L'] == 6 and res['time_ratio'] > 0 and res['speedup_vs_per_n'] > 0


def test_sweep(tmp_path):
    out, res = run_bench('sweep', '--smoke', tmp_path=tmp_path)
    for line in ('shared-prefix / per-variant time ratio = ', '\nideal = ', 'lm-eval shared-prefix / per-variant time ratio = ',
                 '\nlm-eval ideal = ', 'Llama-2-70B ideal, fig2', 'load average'):
        assert line in out, line
    assert res['L'] == 6 and len(res['plan']) == 6 and len(res['distinct']) == 4   # 2 fractions x 3 strategies; n = 0 shared
    assert res['loss']['max_rel_diff'] < 1e-5                       # shared prefix == per-variant lm_loss
    assert res['lm_eval']['identical'] == res['lm_eval']['variants'] == 4   # same accuracies as per-variant evaluate_tasks
    assert 0 < res['loss']['ideal'] < 1 and 0 < res['lm_eval']['ideal'] < 1
    assert res['loss']['ratio'] > 0 and res['lm_eval']['ratio'] > 0
    assert all(0 < v < 0.5 for v in res['llama2_70b_ideal'].values())   # 80 layers: deep blocks share almost everything


def test_sweep_rows(tmp_path):
    "--rows: an MMLU question's 4 answers (' A'...' D', 2 tokens each here) ride on one row; the answers match one row per request."
    out, res = run_bench('sweep', '--model', 'tiny:llama', '--rows', 'mmlu', '--limit', 1, '--max-requests', 12, '--repeats', 1,
                         tmp_path=tmp_path)
    assert 'rows: shared / one-per-request time ratio = ' in out and '\nideal = ' in out
    r = res['rows']
    assert r['requests'] == 12 and r['rows'] == 3 and r['ideal'] == pytest.approx(0.25) and 0 < r['ideal_padded'] < 1
    assert r['max_rel_diff'] < 1e-5 and r['greedy_equal'] == 12 and r['ratio'] > 0


def test_evaluate(tmp_path):
    "evaluate_tasks through eval_lm (SweepLM) vs lm-eval's HFLM: same results, both timed, an ideal below 1."
    out, res = run_bench('evaluate', '--smoke', tmp_path=tmp_path)
    for line in ('eval_lm / HFLM time ratio = ', '\nideal = ', 'results identical (acc, acc_norm of every task): True',
                 'without the model (tasks, requests, scoring; both pay it): ', 'counting the padding'):
        assert line in out, line
    assert res['identical'] and res['ratio'] > 0 and 0 < res['ideal'] < 1 and 0 < res['ideal_padded'] < 1
    assert len(res['no_model_s']) == len(res['eval_lm_s']) == 1 and res['no_model_s'][0] < res['hflm_s'][0]
    assert res['fed_shared'] <= res['fed_hflm'] and res['head_positions'] < res['fed_hflm']   # the head only where answers are read


def test_pruned(tmp_path):
    out, res = run_bench('pruned', '--model', 'tiny:llama', '--prompt-len', 8, '--decode-tokens', 2, '--rounds', 1,
                         tmp_path=tmp_path)
    assert 'ratio/ideal' in out and ('all within 10% of ideal' in out or 'outside 10% of ideal' in out)
    assert res['ns'] == [0, 1, 3]
    rows = {(r['quantity'], r['n']): r for r in res['rows']}
    # structural quantities are exact: drop_layers removes exactly the layers' parameters and KV cache
    for q in ('params', 'weights_bytes', 'kv_cache_bytes'):
        for n in (1, 3): assert abs(rows[q, n]['ratio_over_ideal'] - 1) < 1e-9, rows[q, n]
    assert rows['kv_cache_bytes', 3]['ratio'] == pytest.approx(0.5)
    assert rows['params', 3]['ideal'] > 0.5   # the embedding does not shrink


@pytest.mark.skipif(importlib.util.find_spec('layerprune.heal') is None, reason='layerprune.heal has not landed on this branch')
def test_heal(tmp_path):
    out, res = run_bench('heal', '--model', 'tiny:llama', '--steps', 2, '--batch-size', 2, '--seq-len', 16, '--texts', 16,
                         '--methods', 'lora,partial', tmp_path=tmp_path)
    assert 'ratio  partial / lora: tokens/s' in out and 'Lu et al. (partial faster than LoRA)' in out
    assert set(res['methods']) == {'lora', 'partial'}
    for m in res['methods'].values(): assert m['tokens_per_s'] > 0 and m['trainable_params'] > 0
    assert res['methods']['partial']['trainable_params'] > res['methods']['lora']['trainable_params']   # lm_head + 3 layers
    assert 'tokens_per_s' in res['partial_over_lora']
