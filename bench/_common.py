"Shared helpers for the benchmark scripts: peak-memory sampling and timing (not part of the package)."
import json, os, statistics, sys, threading, time, subprocess
from contextlib import contextmanager
from pathlib import Path
import torch

from layerprune.utils import PeakMemory, rss_bytes   # the package's one peak-memory meter (CUDA max-allocated, else RSS)

def timed(fn, device='cpu'):
    if str(device).startswith('cuda'): torch.cuda.synchronize()
    t = time.perf_counter(); out = fn()
    if str(device).startswith('cuda'): torch.cuda.synchronize()
    return time.perf_counter() - t, out

def median(xs): return statistics.median(xs)

def in_subprocess(script, args, key='RESULT'):
    "Run `script args` in a fresh Python (clean memory accounting); return the JSON it prints after `key`."
    r = subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True)
    if r.returncode: raise RuntimeError(f'{script} {args} failed:\n{r.stderr[-3000:]}')
    line = [l for l in r.stdout.splitlines() if l.startswith(key + ' ')][-1]
    return json.loads(line[len(key) + 1:])

def machine() -> str:
    import platform
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f'CPU x{os.cpu_count()} ({platform.processor() or platform.machine()})'
    return f'{dev}, torch {torch.__version__}, {torch.get_num_threads()} threads'

def load() -> str:
    "The load average (1/5/15 min) as printed next to every timing: on a shared machine it says how far to trust it."
    return ' '.join(f'{x:.2f}' for x in os.getloadavg())

class _Captured(Exception): pass

@contextmanager
def recording(module, name='sweep_loglikelihoods', stop=False):
    """Record the requests (first positional argument after the model) of every call to `module.name` inside the block.
    stop=False: the calls go through. stop=True: the first call is recorded and then aborted, which ends the block
    quietly (collect a task's real requests without computing them)."""
    seen, orig = [], getattr(module, name)
    def spy(m, reqs, *x, **k):
        seen.extend(reqs)
        if stop: raise _Captured
        return orig(m, reqs, *x, **k)
    setattr(module, name, spy)
    try: yield seen
    except _Captured: pass
    finally: setattr(module, name, orig)

def fed(c, x, max_length):
    "What a loglikelihood pass feeds for request (context c, continuation x): all but the last token, cut from the left."
    return (list(c) + list(x))[-(max_length + 1):][:-1]

def one_row_each(reqs, max_length):
    "The loglikelihood pass before row sharing: one row per request, longest first (as lm-eval's HFLM)."
    inps = [fed(c, x, max_length) for c, x in reqs]
    return [(inps[i], [(i, len(inps[i]))]) for i in sorted(range(len(reqs)), key=lambda i: (-len(inps[i]), tuple(inps[i])))]

def one_row_per_input(reqs, max_length):
    """lm-eval HFLM's pass: one row per distinct input, longest first. Its logits cache lets the one-token answers after
    one context share a row (their inputs, context + answer[:-1], are equal); longer answers each get their own."""
    rows = {}
    for i, (c, x) in enumerate(reqs):
        inp = tuple(fed(c, x, max_length)); rows.setdefault(inp, []).append((i, len(inp)))
    return [(list(k), m) for k, m in sorted(rows.items(), key=lambda kv: (-len(kv[0]), kv[0]))]

def padded_positions(rows, batch_size):
    "Positions a pass really feeds when `rows` (token lists first, longest first) go in batches padded to their longest."
    return sum(len(rows[i][0]) * len(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size))
