"Shared helpers for the benchmark scripts: peak-memory sampling and timing (not part of the package)."
import json, os, statistics, sys, threading, time, subprocess
from pathlib import Path
import torch

def rss_bytes() -> int:
    with open('/proc/self/statm') as f: return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')

class PeakMemory:
    "Peak memory above the level at entry: CUDA max-allocated on a GPU, else sampled RSS (every 1 ms)."
    def __init__(self, device='cpu'): self.cuda = str(device).startswith('cuda')
    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); self.base = torch.cuda.memory_allocated()
        else:
            self.base = self.peak = rss_bytes(); self.stop = False
            def loop():
                while not self.stop: self.peak = max(self.peak, rss_bytes()); time.sleep(0.001)
            self.t = threading.Thread(target=loop, daemon=True); self.t.start()
        return self
    def __exit__(self, *a):
        if self.cuda: torch.cuda.synchronize(); self.delta = torch.cuda.max_memory_allocated() - self.base
        else: self.stop = True; self.t.join(); self.peak = max(self.peak, rss_bytes()); self.delta = self.peak - self.base

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
