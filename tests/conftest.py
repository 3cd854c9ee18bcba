import os, sys, subprocess
from pathlib import Path
import pytest, yaml

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault('HF_HUB_OFFLINE', '1'); os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
ENV = {**os.environ, 'PYTHONPATH': str(ROOT), 'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1',
       'TOKENIZERS_PARALLELISM': 'false'}

@pytest.fixture(scope='session')
def root(): return ROOT

@pytest.fixture(scope='session')
def smollm2():
    "The real smollm2-135m `(model, tokenizer)`, loaded once for every test file (do not modify it: use `skip_layers`)."
    from layerprune.models import load_model
    return load_model('smollm2-135m')

@pytest.fixture(scope='session')
def wiki_val():
    from layerprune.data import load_texts
    return load_texts('wiki', 'validation')

def pruned_tiny(arch='llama', drop=(2, 4), tie=True, num_layers=6):
    "A tiny model with layers [drop[0], drop[1]) removed by `drop_layers` (0-based, half-open)."
    from layerprune.models import tiny_model
    from layerprune.prune import drop_layers
    return drop_layers(tiny_model(arch, num_layers, tie=tie), range(*drop))

def run_cli(*args, cwd=ROOT):
    "Run the `layerprune` command of this checkout in a subprocess; return the CompletedProcess."
    exe = Path(sys.executable).parent/'layerprune'
    return subprocess.run([str(exe), *map(str, args)], cwd=cwd, capture_output=True, text=True, env=ENV)

@pytest.fixture
def run_paper(tmp_path):
    """Run `layerprune run` on a temporary copy of paper_runs.yaml holding only `runs` ({name: tiny parameter overrides of
    its first offline parameter set}); the overrides must name parameters the real run has. Returns
    `(CompletedProcess, folder)`: figures land in `folder/'figures'`, the cache in `folder/'runs'/'cache'`."""
    def run(runs:dict, *args):
        spec = yaml.safe_load((ROOT/'paper_runs.yaml').read_text())['runs']
        out = {}
        for name, small in runs.items():
            real = spec[name]['offline'][0]
            extra = set(small) - set(real)
            assert not extra, f'{name}: {sorted(extra)} are not parameters of the real run'
            out[name] = {'notebook': str(ROOT/spec[name]['notebook']), 'offline': [dict(real, **small)]}
        (tmp_path/'runs.yaml').write_text(yaml.safe_dump({'runs': out}))
        return run_cli('run', tmp_path/'runs.yaml', *args, cwd=tmp_path), tmp_path
    return run
