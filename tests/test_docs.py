"""The documentation site (`make docs`) opened in headless Chromium: pages, figures, formulas, links, screenshots."""
import importlib.util, os, re, shutil, subprocess, sys
from pathlib import Path
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT/'_docs'
CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser')
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (Debian's `chromium`; `make docs` installs it as root)")


def _builder():
    spec = importlib.util.spec_from_file_location('build_docs', ROOT/'tools'/'build_docs.py')
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope='module')
def site():
    "The site `make docs` built (which then runs this file); skipped in `make test` when it has not been built."
    if not (DOCS/'index.html').exists(): pytest.skip('no built site: `make docs` builds it (several minutes) and runs these tests')
    (DOCS/'screenshots').mkdir(exist_ok=True)
    return DOCS


def _chromium(*args, page):
    cmd = [CHROMIUM, '--headless', '--no-sandbox', '--disable-gpu', '--hide-scrollbars', '--virtual-time-budget=8000',
           '--window-size=1280,1600', *args, page.resolve().as_uri()]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def _figure_pixels(png: Path) -> tuple[float, float]:
    """(fraction of strongly coloured, fraction of yellow pixels) right of the sidebar. The figures' colour maps
    (viridis, magma) reach yellow; text, links, code highlighting and a broken-image icon do not."""
    import matplotlib.image as mpimg
    a = mpimg.imread(png)[..., :3][:, 300:]
    r, g, b = a[..., 0], a[..., 1], a[..., 2]
    return float(((a.max(-1) - a.min(-1)) > 0.35).mean()), float(((r > 0.6) & (g > 0.6) & (b < 0.4)).mean())


def test_pages_and_links(site):
    pages = [p for p in site.rglob('*.html') if 'mathjax' not in p.parts]
    names = {p.relative_to(site).as_posix() for p in pages}
    assert 'index.html' in names and len(pages) >= 12, sorted(names)
    nbs = [p for p in (ROOT/'nbs').rglob('*.ipynb') if not any(s.startswith(('_', '.')) for s in p.relative_to(ROOT/'nbs').parts)]
    assert len(pages) >= len(nbs), (len(pages), len(nbs))      # one page per module and paper notebook, plus the index
    assert {'paper/fig1c_distances.html', 'export.html', 'prune.html'} <= names
    assert _builder().broken_links(site) == []


@pytest.mark.parametrize('page,shot,figure', [('index.html', 'index.png', 'figures/fig1c_smollm2-135m.png'),
                                              ('paper/fig1c_distances.html', 'fig1c.png', '../figures/fig1c_gemma3-270m.png')])
def test_page_renders_with_figures(site, page, shot, figure):
    dom = _chromium('--dump-dom', page=site/page)
    imgs = re.findall(r'<img[^>]+src="([^"]+)"', dom)
    assert figure in imgs, imgs
    for src in imgs:
        if not src.startswith('data:'): assert (site/page).parent.joinpath(src).resolve().is_file(), src
    assert 'class="MathJax' in dom or 'mjx-' in dom, 'formulas were not typeset'
    png = site/'screenshots'/shot
    _chromium(f'--screenshot={png}', page=site/page)
    assert png.stat().st_size > 20_000
    colour, yellow = _figure_pixels(png)
    assert colour > 0.012 and yellow > 0.0005, f'{png}: no figure visible ({colour:.4f}, {yellow:.5f})'


def test_api_reference_page(site):
    "Module pages carry the API reference nbdev renders from the docments."
    dom = _chromium('--dump-dom', page=site/'export.html')
    assert 'export_gguf' in dom and 'a saved model folder' in dom and 'model_card' in dom
    png = site/'screenshots'/'export.png'
    _chromium(f'--screenshot={png}', page=site/'export.html')
    colour, yellow = _figure_pixels(png)   # a page without figures: the figure check above would fail on it
    assert colour < 0.012 and yellow < 0.0005, (colour, yellow)
