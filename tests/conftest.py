import os, sys, subprocess
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault('HF_HUB_OFFLINE', '1'); os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')

@pytest.fixture(scope='session')
def root(): return ROOT

@pytest.fixture(scope='session')
def smollm2():
    from layerprune.models import load_model
    return load_model('smollm2-135m')

@pytest.fixture(scope='session')
def wiki_val():
    from layerprune.data import load_texts
    return load_texts('wiki', 'validation')

def run_cli(*args, cwd=ROOT):
    "Run the installed `layerprune` command in a subprocess; return CompletedProcess."
    exe = Path(sys.executable).parent/'layerprune'
    return subprocess.run([str(exe), *map(str, args)], cwd=cwd, capture_output=True, text=True)
