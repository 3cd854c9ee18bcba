"Issue 15: the README's claim table is generated from the committed figure JSONs, not typed."
import json, shutil, subprocess, sys
from pathlib import Path
from layerprune.claims import claims_markdown, claim_rows, update_index, BEGIN, MODELS, MISSING, REQUIRED

REPO = Path(__file__).resolve().parents[1]

def _cell():
    nb = json.loads((REPO/'nbs'/'index.ipynb').read_text())
    cells = [''.join(c['source']) for c in nb['cells'] if c['cell_type'] == 'markdown' and ''.join(c['source']).startswith(BEGIN[:20])]
    assert len(cells) == 1, 'nbs/index.ipynb must hold exactly one claims cell'
    return cells[0]

def test_committed_claims_cell_is_generated_from_committed_jsons():
    assert _cell() == claims_markdown(REPO/'figures'), 'stale claims table: run `make claims` and commit'
    assert BEGIN in (REPO/'README.md').read_text(), 'README.md lacks the claims table: run `make readme`'

def test_every_claim_has_a_verdict_for_both_models():
    for m in MODELS:
        rows = claim_rows(REPO/'figures', m)
        assert [r['letter'] for r in rows] == list('abcdef') and all(r['verdict'] for r in rows)
        assert all(r['ours'] for r in rows if r['verdict'] == MISSING)   # says what is missing

def test_small_figure_is_not_measured(tmp_path):
    "A heal_curves JSON trained on fewer tokens than required gives 'not yet measured', naming the shortfall."
    rows = [dict(strategy='similarity', n=n, fraction=n / 30, loss_unhealed=4.0 + n, loss_healed=3.5, loss_unhealed_stderr=0.01,
                 loss_healed_stderr=0.01, norm_unhealed=1.0, norm_healed=1.0) for n in (3, 6, 9)]
    prov = dict(tokens_trained=[dict(tokens_trained=1536)] * 3, texts=dict(evaluation=dict(documents=64)))
    (tmp_path/'heal_curves_x.json').write_text(json.dumps(dict(rows=rows, provenance=prov)))
    b = claim_rows(tmp_path, 'x')[1]
    assert b['verdict'] == MISSING and f"1,536 < {REQUIRED['heal_tokens']:,}" in b['ours']

def test_cli_check_detects_a_stale_table(tmp_path):
    idx = tmp_path/'index.ipynb'; shutil.copy(REPO/'nbs'/'index.ipynb', idx)
    figs = tmp_path/'figures'; figs.mkdir()
    run = lambda *a: subprocess.run([sys.executable, '-m', 'layerprune.claims', '--index', str(idx), '--figures', str(figs), *a],
                                    capture_output=True, text=True, cwd=REPO)
    ref = claims_markdown(figs)
    assert (run('--check').returncode == 0) == (ref == _cell())
    (figs/'fig1c_smollm2-135m.json').write_text(json.dumps(dict(num_layers=4, provenance=dict(documents=8), summary={})))
    r = run('--check'); assert r.returncode == 1 and 'STALE' in r.stdout
    assert run().returncode == 0 and run('--check').returncode == 0
    assert 'distance documents 8 < 64' in idx.read_text()


def test_committed_plan_table_is_generated_from_paper_runs():
    from layerprune.claims import update_block
    from layerprune.plan import plan_markdown, PLAN_BEGIN
    assert update_block(REPO/'nbs/index.ipynb', plan_markdown(REPO/'paper_runs.yaml'), check=True), \
        'stale plan table in nbs/index.ipynb: run `make claims` and commit'
    assert PLAN_BEGIN in (REPO/'README.md').read_text(), 'README.md lacks the plan table: run `make readme`'
