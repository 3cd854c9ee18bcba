"Shared-prefix sweeps (layerprune.sweep) give exactly the per-variant results, compute each prefix once, and hold one batch's states."
import copy
import pytest, torch
from layerprune.models import ARCHS, decoder, tiny_model, tiny_tokenizer
from layerprune.data import load_texts
from layerprune.prune import skip_layers, drop_layers
from layerprune.utils import LayerpruneError
from layerprune import sweep as S
from layerprune.loss import lm_loss

VARIANTS = [[], [4, 5], [5], [1], [1, 4], [2, 3], [0, 1, 2, 3, 4]]   # L = 6: unpruned, reverse, branch + shared suffix, all but one


@pytest.fixture(scope='module')
def texts(): return load_texts('wiki', 'validation', 5)


def rel(a, b): return abs(a - b) / abs(b)


@pytest.mark.parametrize('arch', ARCHS)
def test_loss_equals_per_variant(arch, texts):
    m, tok = tiny_model(arch), tiny_tokenizer()
    for side in ('left', 'right'):
        res = S.sweep_loss(m, tok, texts, VARIANTS, seq_len=20, batch_size=2, padding_side=side)
        for v, r in zip(VARIANTS, res):
            with skip_layers(m, v): ref = lm_loss(m, tok, texts, 20, 2, padding_side=side)
            assert rel(r['nats'], ref['nats']) < 1e-5 and rel(r['stderr'], ref['stderr']) < 1e-5, (arch, side, v)
            assert rel(r['normalized'], ref['normalized']) < 1e-5
            assert (r['tokens'], r['documents'], r['vocab_size']) == (ref['tokens'], ref['documents'], ref['vocab_size'])
    # a really pruned copy (drop_layers) gives the same loss too
    pruned = drop_layers(copy.deepcopy(m), [1, 4])
    assert rel(res[4]['nats'], lm_loss(pruned, tok, texts, 20, 2, padding_side='right')['nats']) < 1e-5


def test_each_prefix_computed_once(texts):
    "Real layer calls per batch = the trie's distinct edges (layers before a variant's first removed layer are not recomputed)."
    m, tok = tiny_model('llama'), tiny_tokenizer()
    calls = []
    def hook(mod, args, kwargs, out):
        calls.append(out is not (args[0] if args else kwargs['hidden_states']))   # the capture pass makes layers identities
    hs = [l.register_forward_hook(hook, with_kwargs=True) for l in decoder(m).layers]
    try:
        st = {}
        S.sweep_loss(m, tok, texts[:2], VARIANTS, seq_len=20, batch_size=2, stats=st)
    finally:
        for h in hs: h.remove()
    # unpruned path 6 + [1]: layers 2, 3, then 4 and 5 (branch at 4 for [1, 4]: 5) + [2, 3]: 4, 5 + [0..4]: 5
    assert st['layers'] == 6 + 5 + 2 + 1 and st['heads'] == len(VARIANTS)
    assert sum(calls) == st['layers']            # one batch: every distinct prefix once
    per_variant = sum(6 - len(v) for v in VARIANTS)
    assert st['layers'] < 0.6 * per_variant


def test_memory_bounded_by_one_batch(texts):
    m, tok = tiny_model('llama'), tiny_tokenizer()
    flat = [[]] + [list(range(s, 6)) for s in range(1, 6)] + [list(range(s, 5)) for s in range(1, 5)]   # reverse + deepest
    for vs, most in ((flat[:6], 1), (flat[:7], 2), (flat, 2)):
        st = {}
        S.sweep_loss(m, tok, texts, vs, seq_len=20, batch_size=2, stats=st)
        # reverse blocks end on the unpruned path (no state held); a deepest block branches off it: the path's state and
        # one branch state, however many variants; and only this batch's rows
        assert st['max_states'] == most and st['max_rows'] == 2, st
    leaf_rows = []
    root = S.build_trie(S.check_variants(flat, 6), 6)
    from layerprune.data import batches
    for b in batches(texts, tok, 20, 2):
        S.run_variants(m, root, b, lambda v, h: leaf_rows.append(h.shape[0]))
    assert max(leaf_rows) == 2 and len(leaf_rows) == len(flat) * 3   # 5 texts, batch 2 -> 3 batches


def test_duplicates_and_empty_variant(texts):
    m, tok = tiny_model('qwen2'), tiny_tokenizer()
    vs = [[], [3, 2], {2, 3}, [], (5,)]
    res = S.sweep_loss(m, tok, texts, vs, seq_len=20, batch_size=3)
    assert res[0] == res[3] and res[1] == res[2] and res[1]['layers'] == [2, 3] and res[0]['layers'] == []
    ref = lm_loss(m, tok, texts, 20, 3)
    assert rel(res[0]['nats'], ref['nats']) < 1e-5


@pytest.mark.parametrize('bad, msg', [([[6]], 'out of range'), ([[-1]], 'out of range'), ([list(range(6))], 'keep at least one'),
                                      ([[0, 1, 2, 3, 4, 5], []], 'keep at least one'), ([[2, 2]], 'repeats'),
                                      ('2,3', 'list of sets'), ([3], 'set/list'), ([[1.5]], 'integers'), ([], 'no variants')])
def test_bad_variants_fail_before_work(bad, msg, texts):
    m, tok = tiny_model('llama'), tiny_tokenizer()
    ran = []
    h = decoder(m).embed.register_forward_hook(lambda *a: ran.append(1))
    try:
        with pytest.raises(LayerpruneError, match=msg): S.sweep_loss(m, tok, texts, bad, seq_len=20)
        with pytest.raises(LayerpruneError, match=msg): S.sweep_loglikelihoods(m, [([5, 6], [7])], bad)
    finally: h.remove()
    assert not ran and decoder(m).num_layers == 6 and m.config.num_hidden_layers == 6


def test_bad_texts(texts):
    m, tok = tiny_model('llama'), tiny_tokenizer()
    with pytest.raises(LayerpruneError, match='not one string'): S.sweep_loss(m, tok, 'one text', [[]])
    with pytest.raises(LayerpruneError, match='no texts'): S.sweep_loss(m, tok, [], [[]])
    with pytest.raises(LayerpruneError, match='>= 1'): S.sweep_loss(m, tok, texts, [[]], seq_len=0)


def assert_equal_hflm(m, tok, reqs, vs, batch_size=4):
    "`sweep_loglikelihoods` of every variant equals lm-eval HFLM's own (log-likelihood, is_greedy) under `skip_layers`."
    from lm_eval.models.huggingface import HFLM
    res = S.sweep_loglikelihoods(m, reqs, vs, batch_size=batch_size)
    lm = HFLM(pretrained=m, tokenizer=tok, batch_size=1)
    for v in vs:
        with skip_layers(m, v): ref = lm._loglikelihood_tokens([(('', ''), c, x) for c, x in reqs], disable_tqdm=True)
        for (ll, gr), (rll, rgr) in zip(res[tuple(v)], ref):
            assert abs(ll - rll) <= 1e-5 * max(1.0, abs(rll)) and gr == rgr, (v, ll, rll)


def test_loglikelihoods_equal_hflm():
    "Per request and variant, the shared pass gives lm-eval HFLM's own (log-likelihood, is_greedy)."
    m, tok = tiny_model('gemma3'), tiny_tokenizer()
    g = torch.Generator().manual_seed(0)
    reqs = [(torch.randint(2, 300, (int(n),), generator=g).tolist(), torch.randint(2, 300, (int(k),), generator=g).tolist())
            for n, k in zip(torch.randint(1, 30, (11,), generator=g), torch.randint(1, 5, (11,), generator=g))]
    assert_equal_hflm(m, tok, reqs, [[], [2, 3], [5], [0, 1, 2, 3, 4]])


def test_loglikelihoods_shared_rows_equal_hflm():
    "Requests that ride on another's row (one-token answers after one context, a continuation that prefixes another) get HFLM's answers."
    m, tok = tiny_model('llama'), tiny_tokenizer()
    g = torch.Generator().manual_seed(1)
    ctxs = [torch.randint(2, 300, (int(n),), generator=g).tolist() for n in torch.randint(3, 40, (6,), generator=g)]
    reqs = [(c, [a]) for c in ctxs for a in (11, 12, 13, 14)]                        # MMLU-like: 4 one-token answers
    reqs += [(ctxs[0], [7, 8, 9]), (ctxs[0], [7, 8]), (ctxs[0][:2], ctxs[0][2:5])]   # prefixes of one another
    rows = S._cont_rows(reqs, 2048)
    assert len(rows) == 6 and sorted(i for _, mem in rows for i, _ in mem) == list(range(len(reqs)))
    for t, mem in rows:
        for i, n in mem: assert t[:n] == (reqs[i][0] + reqs[i][1])[:-1]
    assert_equal_hflm(m, tok, reqs, [[], [1, 2], [4]])
    cut = S._cont_rows([(list(range(2, 40)), [5])], 10)   # past the context window: cut from the left, as HFLM
    assert cut == [(list(range(30, 40)), [(0, 10)])]


def test_lm_eval_equals_per_variant():
    from layerprune.evaluate import evaluate_tasks
    m, tok = tiny_model('llama'), tiny_tokenizer()
    vs = [[], [3, 4], [5], [3, 4], [0, 1, 2, 3, 4]]
    res = S.evaluate_variants(m, tok, vs, ['arc_easy'], limit=5)
    assert res[1] == res[3]
    for v, r in zip(vs, res):
        with skip_layers(m, v): assert r == evaluate_tasks(m, tok, ['arc_easy'], limit=5), v
    kw = dict(limit=2, num_fewshot=1, fewshot_sampler='random', seed=1)   # few-shot prompts (Fig. 7's seeded draw)
    res = S.evaluate_variants(m, tok, [[], [2, 3]], ['arc_easy'], **kw)
    for v, r in zip([[], [2, 3]], res):
        with skip_layers(m, v): assert r == evaluate_tasks(m, tok, ['arc_easy'], **kw), v
    assert S.sweep_lm_class() is S.sweep_lm_class()
    from lm_eval.api.registry import get_model
    assert get_model('layerprune_sweep') is S.sweep_lm_class()


def test_sweep_lm_class_built_twice_in_one_process():
    "A second copy of SweepLM (another notebook run by the same nbdev_test worker, a reloaded module) must not fail on lm-eval's registry."
    from lm_eval.api.registry import get_model
    first = S.sweep_lm_class()
    again = S.sweep_lm_class.__wrapped__()   # the uncached builder: a new class, as a notebook kernel defining it again makes
    assert again is not first and again.__name__ == 'SweepLM'
    assert get_model('layerprune_sweep') is first   # the name keeps the first registration
    m, tok = tiny_model('llama'), tiny_tokenizer()
    lm = again(pretrained=m, tokenizer=tok, variants=[[], [2]], batch_size=2)
    lm.select([2]); assert lm.variant == (2,)


@pytest.mark.parametrize('sampler', [None, 'random'])
def test_lm_eval_group_task_reused_across_variants(sampler):
    "MMLU's group of 57 subjects is built once and reused for every variant: each variant still gets exactly its own lm-eval run's result."
    from layerprune.evaluate import evaluate_tasks
    m, tok = tiny_model('llama'), tiny_tokenizer()
    vs, kw = [[2, 3], [], [5]], dict(limit=1, num_fewshot=2, fewshot_sampler=sampler, seed=3)
    res = S.evaluate_variants(m, tok, vs, ['mmlu'], **kw)
    assert res[0]['mmlu']['subjects'] == 57 and len({r['mmlu']['acc'] for r in res}) > 1   # the variants differ
    for v, r in list(zip(vs, res))[:2]:   # the first variant built the tasks; the second reused them
        with skip_layers(m, v): assert r == evaluate_tasks(m, tok, ['mmlu'], **kw), v
