"Issue 10, item 6: the planner's estimates checked against measured memory on CPU, and the `plan` / `run` commands."
import json, os, subprocess, sys
from pathlib import Path
import pytest, torch
from conftest import run_cli, ROOT


def test_param_counts_are_exact_for_every_family():
    from layerprune.plan import arch_from_config
    from layerprune.models import tiny_model
    for arch, tie in [('llama', False), ('qwen2', False), ('gemma3', True), ('phi', True)]:   # all 14: nbs/06a_plan.ipynb
        m = tiny_model(arch, tie=tie)
        assert arch_from_config(m.config.to_dict(), arch).params() == sum(p.numel() for p in m.parameters()), (arch, tie)


def test_weights_of_smollm2_are_exact_bytes(smollm2):
    "The planner's weight bytes for smollm2-135m (from its config only) equal the loaded model's, fp32 and bf16."
    from layerprune.plan import load_arch, weight_bytes
    model, _ = smollm2
    a = load_arch('smollm2-135m')
    assert a.tied and a.L == 30
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert weight_bytes(a, 'fp32') == nbytes == 4 * a.params()
    assert weight_bytes(a, 'bf16') == nbytes // 2
    assert weight_bytes(a, 'bf16', layers=26) == nbytes // 2 - 4 * a.layer_params * 2   # 4 layers dropped


def test_estimates_match_measured_peaks_on_cpu():
    """Peak RSS above the loaded process (sampled every 0.5 ms in a fresh process) of building a model, one distance pass
    and one `lm_loss` pass, against the planner's estimate of the same stage (fp32). Tolerance: the measurement is
    within 0.85x-1.2x of the estimate (measured here: weights 1.02, distances 1.04, loss 1.03; the estimate counts
    the large tensors, small temporaries and allocator slack are what is left)."""
    from layerprune.plan import arch_from_config, infer_act_bytes, stage_loss, weight_bytes
    B, T = 4, 512
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_='65536', MALLOC_TRIM_THRESHOLD_='0')   # RSS follows live tensors
    r = subprocess.run([sys.executable, str(ROOT/'tests'/'_plan_measure.py'), str(B), str(T)],
                       capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads([l for l in r.stdout.splitlines() if l.startswith('RESULT ')][-1][7:])
    a = arch_from_config(m['config'], 'wide-llama')
    assert weight_bytes(a, 'fp32') == m['weights_bytes']                       # exact
    est = dict(weights=weight_bytes(a, 'fp32'),
               distances=infer_act_bytes(a, B, T, 4) + (a.L + 1) * B * a.d * 4,
               loss=sum(v for k, v in stage_loss(a, 'fp32', [a.L], B, T, B, 4).parts.items() if k != 'weights'))
    meas = dict(weights=m['weights_rss'], distances=m['distances_rss'], loss=m['loss_rss'])
    for k in est:
        ratio = meas[k] / est[k]
        print(f'{k}: measured {meas[k] / 1e6:.1f} MB, estimated {est[k] / 1e6:.1f} MB, ratio {ratio:.2f}')
        assert 0.85 <= ratio <= 1.2, (k, ratio)


def test_paper_facts_are_the_papers_table():
    from layerprune.papers import paper_facts, PAPER_MODELS, LU_FINETUNE_TABLE
    f = paper_facts('microsoft/phi-2')
    assert (f['peak_lr'], f['peak_lr_prose'], f['lora_rank'], f['ffn_modules']) == (2e-4, 3e-5, 64, ['fc1', 'fc2'])
    assert f['inconsistencies'] and f['inconsistencies'][0]['used'] == 'table'
    assert paper_facts('meta-llama/Meta-Llama-3.1-8B-Instruct')['model'] == 'meta-llama/Llama-3.1-8B-Instruct'
    assert all(Path(ROOT/'layerprune'/'paper_configs').glob('*.json'))
    assert len(list((ROOT/'layerprune'/'paper_configs').glob('*.json'))) == len(PAPER_MODELS) == 12
    # Lu's trainable-parameter column follows from the shipped Llama-3.1-8B config
    from layerprune.plan import load_arch
    a = load_arch('meta-llama/Llama-3.1-8B-Instruct')
    for row, got in zip(LU_FINETUNE_TABLE, [a.lora_params(8, 'all-linear', 24)] * 2 + [a.head_params + k * a.layer_params for k in range(4)]):
        assert abs(got - row['trainable_params']) / row['trainable_params'] < 0.005, (row, got)


def _cli(capsys, *args):
    "Run `layerprune ARGS` in this process (no second torch import); return (exit status, stdout, stderr)."
    from layerprune.cli import main
    try: rc = main([str(a) for a in args])
    except SystemExit as e: rc = e.code
    out = capsys.readouterr(); return rc, out.out, out.err


def test_plan_cli_paper_profile_fits_one_a100(tmp_path, capsys):
    out = tmp_path/'plan.json'
    rc, stdout, err = _cli(capsys, 'plan', ROOT/'paper_runs.yaml', '--profile', 'paper', '--gpu', 'A100-80GB', '--json', out)
    assert rc in (0, None), err
    rows = json.loads(out.read_text())
    assert len(rows) == 30 and all(r['fits'] is True for r in rows)
    assert {'run', 'model', 'peak_gb', 'gpu_hours', 'fits', 'mode', 'stages'} <= set(rows[0])
    big = [r for r in rows if r['model'] == 'meta-llama/Llama-2-70b-hf']
    assert {r['run'] for r in big} == {'fig1c', 'fig4', 'fig2', 'heal_curves', 'heal_seeds', 'heal_rank'}
    assert next(r for r in big if r['run'] == 'fig1c')['mode'] == 'streamed'
    assert next(r for r in big if r['run'] == 'fig2')['mode'] == 'nf4'
    assert all('qlora' in r['mode'] for r in big if r['run'].startswith('heal'))
    assert all(r['peak_gb'] < 80 for r in rows)
    assert 'heal_curves' in stdout and 'GPU-hours in total' in stdout


def test_plan_cli_refuses_70b_qlora_on_a100_40gb(capsys):
    rc, _, err = _cli(capsys, 'plan', ROOT/'paper_runs.yaml', '--only', 'heal_rank,fig1c', '--gpu', 'A100-40GB')
    assert rc == 1
    err = err.strip().splitlines()
    assert len(err) == 1 and 'heal_rank' in err[0] and 'do not fit on one A100-40GB' in err[0] and 'fig1c' not in err[0]
    assert _cli(capsys, 'plan', ROOT/'paper_runs.yaml', '--gpu', 'V100')[0] == 2


def test_run_checks_the_plan_before_any_work(tmp_path):
    "Through the installed command (a fresh process): refused before any notebook runs, nothing written."
    r = run_cli('run', 'paper_runs.yaml', '--profile', 'paper', '--only', 'heal_rank', '--gpu', 'A100-40GB',
                '--runs-dir', tmp_path/'runs', '--out-dir', tmp_path/'figs')
    assert r.returncode == 2 and 'refusing to run' in r.stderr and 'heal_rank' in r.stderr
    assert not (tmp_path/'runs').exists() and not (tmp_path/'figs').exists()


def test_paper_profile_heals_with_the_papers_settings():
    "The paper profile's healing jobs take the papers' text, steps, batch, warm-up, sequence length, LR and rank."
    import yaml
    from layerprune.papers import paper_facts, GROMOV_HEALING, LU_HEALING
    runs = yaml.safe_load((ROOT/'paper_runs.yaml').read_text())['runs']
    seen = 0
    for name in ('heal_curves', 'heal_seeds', 'heal_rank'):
        for p in runs[name]['paper']:
            f = paper_facts(p['model_name']); seen += 1
            assert (p['text'], p['steps'], p['batch_size'], p['warmup']) == ('c4', GROMOV_HEALING['steps'], GROMOV_HEALING['global_batch'], GROMOV_HEALING['warmup']), name
            assert (p['lr'], p['seq_len'], p['method']) == (f['peak_lr'], f['max_seq_len'], 'qlora'), name
            assert abs(p['steps'] * p['batch_size'] * p['seq_len'] - f['ft_tokens']) / f['ft_tokens'] < 0.01, name   # 16 x 5000 x seq_len
            assert p['batch_size'] % p['micro_batch'] == 0, name
            if 'rank' in p: assert p['rank'] == f['lora_rank'], name
            else: assert f['lora_rank'] in p['ranks'], name
    for p in runs['lu_finetune']['paper']:
        seen += 1
        assert (p['text'], p['batch_size'], p['warmup'], p['rank']) == ('alpaca', LU_HEALING['global_batch'], LU_HEALING['warmup'], LU_HEALING['lora_rank'])
        assert LU_HEALING['lr'] in p['partial_lrs'] and p['tasks'] == LU_HEALING['eval']['tasks']
    assert seen == 4
