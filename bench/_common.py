"Shared helpers for the benchmark scripts: peak-memory sampling and timing (not part of the package)."
import json, os, statistics, sys, threading, time, subprocess
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
