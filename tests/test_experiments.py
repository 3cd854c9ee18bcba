"layerprune.experiments: the one fraction rule, and a cache keyed on content (never answering for other inputs)."
import shutil
import numpy as np, pytest
from layerprune import experiments as ex
from layerprune.experiments import fractions_to_ns, distances_point, unhealed_point, select_layers_cached
from layerprune.models import tiny_model, tiny_tokenizer
from layerprune.utils import LayerpruneError

TEXT_A = '\n\n'.join(['The quick brown fox jumps over the lazy dog.', 'Layer pruning removes the deeper layers.',
                      'The lazy dog sleeps in the sun all day.', 'Deeper layers are often redundant.'])
TEXT_B = TEXT_A.replace('fox', 'cat').replace('sleeps', 'runs')


@pytest.mark.parametrize('fractions,L,ns', [
    ([0.0, 0.25, 0.5, 0.75], 30, [0, 8, 15, 22]),    # round half to even: 7.5 -> 8, 22.5 -> 22
    ([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7], 30, [0, 3, 6, 9, 12, 15, 18, 21]),
    ([0.01], 30, [1]),                               # f > 0 never gives n = 0
    ([1.0], 30, [29]), ([0.99, 1.0, 0.95], 6, [5]),  # never n = L; duplicates removed
    ([0.5, 0.0, 0.5], 6, [0, 3]),                    # sorted, unique
    (0.25, 18, [4]), ([0], 1, [0]), (np.array([0.5]), 4, [2])])
def test_fractions_to_ns(fractions, L, ns):
    assert fractions_to_ns(fractions, L) == ns


@pytest.mark.parametrize('fractions,L,msg', [
    ([-0.1], 6, 'in [0, 1]'), ([1.01], 6, 'in [0, 1]'), ([float('nan')], 6, 'in [0, 1]'), ([float('inf')], 6, 'in [0, 1]'),
    (['0.5'], 6, 'in [0, 1]'), ([True], 6, 'in [0, 1]'), ([None], 6, 'in [0, 1]'), ([], 6, 'no fractions'),
    ([0.5], 1, 'keep one'), ([0.5], 0, 'integer >= 1'), ([0.5], 6.0, 'integer >= 1')])
def test_fractions_to_ns_refuses(fractions, L, msg):
    with pytest.raises(LayerpruneError, match=msg.replace('[', r'\[').replace(']', r'\]')): fractions_to_ns(fractions, L)


def counter(monkeypatch, name):
    "Count the calls of `layerprune.experiments.<name>` (the computation behind a cached point)."
    calls, f = [], getattr(ex, name)
    monkeypatch.setattr(ex, name, lambda *a, **k: calls.append(1) or f(*a, **k))
    return calls

def save_tiny(folder, seed):
    tiny_model('llama', seed=seed).save_pretrained(folder); tiny_tokenizer().save_pretrained(folder)


def test_identical_inputs_reuse_the_cache_and_names_do_not_matter(tmp_path, monkeypatch):
    save_tiny(tmp_path/'m', 0); (tmp_path/'a.txt').write_text(TEXT_A)
    dist, loss = counter(monkeypatch, 'angular_distances'), counter(monkeypatch, 'lm_loss')
    args = dict(samples=4, seq_len=16, batch_size=2, cache_dir=tmp_path/'c')
    a = distances_point(str(tmp_path/'m'), str(tmp_path/'a.txt'), **args)
    b = distances_point(str(tmp_path/'m'), str(tmp_path/'a.txt'), **args)
    assert len(dist) == 1 and a.to_json() == b.to_json()
    # the same content under other names is the same point (keyed on content, not names)
    shutil.copytree(tmp_path/'m', tmp_path/'m2'); shutil.copy(tmp_path/'a.txt', tmp_path/'a2.txt')
    c = distances_point(str(tmp_path/'m2'), str(tmp_path/'a2.txt'), **args)
    assert len(dist) == 1 and np.array_equal(c.mean, a.mean) and c.model == str(tmp_path/'m2')
    u = [unhealed_point(str(tmp_path/'m'), 'similarity', 2, str(tmp_path/'a.txt'), 4, 4, 16, 2, cache_dir=tmp_path/'c')
         for _ in range(2)]
    assert u[0] == u[1] and len(loss) == 1
    assert len(dist) == 2            # selection ran on the calibration split: another (cached) distance point
    # every other parameter is part of the key
    distances_point(str(tmp_path/'m'), str(tmp_path/'a.txt'), **dict(args, seq_len=12)); assert len(dist) == 3


def test_edited_text_file_gives_new_numbers(tmp_path, monkeypatch):
    save_tiny(tmp_path/'m', 0); txt = tmp_path/'t.txt'; txt.write_text(TEXT_A)
    dist, loss = counter(monkeypatch, 'angular_distances'), counter(monkeypatch, 'lm_loss')
    point = lambda: (distances_point(str(tmp_path/'m'), str(txt), 4, 16, 2, cache_dir=tmp_path/'c'),
                     unhealed_point(str(tmp_path/'m'), 'deepest', 2, str(txt), 4, 4, 16, 2, cache_dir=tmp_path/'c'))
    d1, u1 = point()
    txt.write_text(TEXT_B)                                     # same path, same size, edited in place
    d2, u2 = point()
    assert len(dist) == 2 and len(loss) == 2                   # recomputed, not answered from the cache
    assert not np.array_equal(d1.mean, d2.mean) and u1['nats'] != u2['nats']
    txt.write_text(TEXT_A); d3, u3 = point()                   # back to the first content: its stored points
    assert len(dist) == 2 and len(loss) == 2 and np.array_equal(d3.mean, d1.mean) and u3 == u1


def test_model_folder_replaced_in_place_gives_new_numbers(tmp_path, monkeypatch):
    folder = tmp_path/'model'; save_tiny(folder, 0); (tmp_path/'t.txt').write_text(TEXT_A)
    dist, loss, scores = (counter(monkeypatch, n) for n in ('angular_distances', 'lm_loss', 'layer_scores'))
    point = lambda: (distances_point(str(folder), str(tmp_path/'t.txt'), 4, 16, 2, cache_dir=tmp_path/'c'),
                     unhealed_point(str(folder), 'magnitude-l2', 2, str(tmp_path/'t.txt'), 4, 4, 16, 2, cache_dir=tmp_path/'c'))
    d1, u1 = point(); d1b, u1b = point()
    assert (len(dist), len(loss), len(scores)) == (1, 1, 1) and u1b == u1
    save_tiny(folder, 1)                                       # model B saved over model A, same folder
    d2, u2 = point()
    assert (len(dist), len(loss), len(scores)) == (2, 2, 2)
    assert not np.array_equal(d1.mean, d2.mean) and u1['nats'] != u2['nats']


def test_bad_input_fails_before_any_work(tmp_path, monkeypatch):
    dist = counter(monkeypatch, 'angular_distances')
    with pytest.raises(LayerpruneError, match='unknown strategy'): select_layers_cached('tiny:llama', 'nope', 2, cache_dir=tmp_path)
    with pytest.raises(LayerpruneError, match='samples'): distances_point('tiny:llama', samples=0, cache_dir=tmp_path)
    with pytest.raises(LayerpruneError, match='not found'): distances_point('tiny:llama', str(tmp_path/'missing.txt'), cache_dir=tmp_path)
    with pytest.raises(LayerpruneError, match='unknown model'): distances_point('no-such-model', cache_dir=tmp_path)
    with pytest.raises(LayerpruneError, match='tasks'): ex.accuracy_sweep('tiny:llama', ['deepest'], [0.5], [{}], cache_dir=tmp_path)
    assert dist == []
