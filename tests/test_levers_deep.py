"""The training-side levers of Keller Jordan's airbench recipe (issue 23), each a preset key that
is off by default: the triangular learning-rate schedule, the alternating flip, test-time
augmentation by flips and one-pixel shifts, and the pass-through of the model's patch-whitening
and identity initialisation (which cnn_rnn_numpy.CNNRNN provides); and val_views, which lets each
epoch's validation score one view while the final evaluation keeps the test-time views."""
import inspect
import json

import numpy as np
import pytest

import config
import data_utils as du
import main
import runfiles
import viz
from cnn_rnn_numpy import CNNRNN, FROZEN_PARAMS
from conftest import SMOKE, STEPS_PER_EPOCH, arrays, resume, train_run
from optim import Lookahead, learning_rate


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    from conftest import make_cifar_archive
    return str(make_cifar_archive(tmp_path_factory.mktemp('cifar'), n_per_batch=50, n_test=100))


def todays_plan(n, seed, e, crop):
    """BatchIterator.plan as it was before alternate_flip (shuffled, augmented): the reference
    that every iterator without the lever must still give, draw for draw."""
    rng = np.random.default_rng([seed, e])
    order = rng.permutation(n)
    if crop == 'pad':
        crop_rc, paste_rc = rng.integers(0, 9, size=(n, 2)), None
    elif crop == 'reflect2':           # (added with alternate_flip; its draws are these)
        crop_rc, paste_rc = rng.integers(0, 5, size=(n, 2)), None
    else:
        crop_rc, paste_rc = rng.integers(0, 5, size=(n, 2)), rng.integers(0, 5, size=(n, 2))
    return order, crop_rc, paste_rc, rng.random(n) < 0.5


def augmented(X, crop_rc, paste_rc, flip, crop):
    """The batch BatchIterator makes of X with ``crop``'s augmentation function."""
    if crop == 'pad':
        return du.pad_crop_batch(X, crop_rc, flip)
    if crop == 'reflect2':
        return du.reflect_crop_batch(X, crop_rc, flip)
    return du.augment_batch(X, crop_rc, paste_rc, flip)


def flips_by_image(plan):
    """(N,) bool: whether each sample (by its index) is flipped in the epoch of ``plan``."""
    order, _, _, flip = plan
    out = np.empty(len(order), bool)
    out[order] = flip
    return out


def images(n, seed=0):
    return np.random.default_rng(seed).integers(1, 256, (n, 3, 32, 32), dtype=np.uint8)


# --------------------------------------------------------------------------
# The triangular schedule, end to end (optim's values: tests/test_optim.py)
# --------------------------------------------------------------------------

def test_a_triangular_run_follows_its_schedule_and_resumes_bit_identically(data_dir, tmp_path):
    levers = ['--epochs', '3', '--set', 'schedule=triangular', '--set', 'min_lr=0.001',
              '--set', 'alternate_flip=true']
    full = tmp_path / 'full'
    assert train_run(data_dir, full, *levers) == 0
    cfg = main.load_checkpoint(full / 'ckpt.npz').cfg
    assert (cfg.schedule, cfg.alternate_flip) == ('triangular', True)
    history = json.loads((full / 'history.json').read_text())
    # Each epoch records the rate of its last step: the warm-up's peak, then the straight line down.
    expected = [learning_rate(cfg, (e + 1) * STEPS_PER_EPOCH - 1, STEPS_PER_EPOCH) for e in range(3)]
    assert [r['lr'] for r in history] == pytest.approx(expected)
    assert expected[0] == pytest.approx(cfg.lr) and expected[2] == pytest.approx(0.001 + (cfg.lr - 0.001) / 16)
    # Stopped mid-epoch in the second epoch (an odd one, whose flips are epoch 0's reversed), resumed.
    split = tmp_path / 'split'
    assert train_run(data_dir, split, *levers, interrupt_after=STEPS_PER_EPOCH + 3) == 0
    assert resume(split / 'ckpt.npz') == 0
    a, b = arrays(full / 'ckpt.npz'), arrays(split / 'ckpt.npz')
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    resumed = json.loads((split / 'history.json').read_text())
    assert [r['lr'] for r in resumed] == [r['lr'] for r in history]
    assert [r['train_loss'] for r in resumed] == [r['train_loss'] for r in history]


# --------------------------------------------------------------------------
# Alternating flip
# --------------------------------------------------------------------------

@pytest.mark.parametrize('crop', du.CROPS)
def test_alternating_flip_shows_every_image_both_ways_in_every_pair_of_epochs(crop):
    n = 50
    it = du.BatchIterator(images(n), np.arange(n), 16, shuffle=True, augment=True, seed=7, crop=crop,
                          alternate_flip=True)
    flips = [flips_by_image(it.plan(e)) for e in range(6)]
    for e in range(5):
        assert np.all(flips[e] != flips[e + 1]), e       # once flipped and once not
    # Image i is flipped iff its epoch-0 flip XOR the epoch is odd.
    for e in range(6):
        np.testing.assert_array_equal(flips[e], flips[0] ^ bool(e % 2))
    assert 0 < flips[0].sum() < n                         # epoch 0's own flips are random
    np.testing.assert_array_equal(it.first_flips(), flips[0])
    # The order and the shifts are the iterator's without the lever: only the flips alternate.
    for e in range(4):
        ref = todays_plan(n, 7, e, crop)
        for got, want in zip(it.plan(e)[:3], ref[:3]):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize('crop', du.CROPS)
def test_alternating_flip_batches_epoch_0_as_without_it_and_flip_the_images_it_plans(crop):
    n, X = 40, images(40, seed=1)
    y = np.arange(n)
    on = du.BatchIterator(X, y, 16, shuffle=True, augment=True, seed=3, crop=crop, alternate_flip=True)
    off = du.BatchIterator(X, y, 16, shuffle=True, augment=True, seed=3, crop=crop)
    for (a, ya), (b, yb) in zip(on.epoch(0), off.epoch(0)):   # epoch 0 is a fresh iterator's
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(ya, yb)
    # Epoch 1: the batches are the augmentation of epoch 0's flips reversed, image by image.
    order, crop_rc, paste_rc, _ = todays_plan(n, 3, 1, crop)
    flip = ~flips_by_image(todays_plan(n, 3, 0, crop))[order]
    batches = [b for b, _ in on.epoch(1)]
    first = augmented(X[order[:16]], crop_rc[:16], None if paste_rc is None else paste_rc[:16], flip[:16], crop)
    np.testing.assert_allclose(batches[0], first.astype(np.float32) / 255, atol=1e-7)
    assert not np.array_equal(batches[0], next(off.epoch(1))[0])


def test_alternating_flip_is_reproducible_across_iterators_and_resumes_mid_epoch():
    n, X = 45, images(45, seed=2)
    y = np.arange(n)

    def make():
        return du.BatchIterator(X, y, 8, shuffle=True, augment=True, seed=5, alternate_flip=True)
    walked = make()
    for e in (0, 4, 1):                    # another history of epochs first: nothing is carried over
        list(walked.epoch(e))
    fresh = make()
    for e in (3, 2):
        a = [b for b, _ in walked.epoch(e)]
        b = [b for b, _ in fresh.epoch(e)]
        for u, v in zip(a, b):
            np.testing.assert_array_equal(u, v)
        # A resumed epoch (start=k) gives exactly the remaining batches.
        for u, v in zip(a[2:], [b for b, _ in make().epoch(e, start=2)]):
            np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize('crop', du.CROPS)
def test_without_the_lever_the_batches_are_todays(crop):
    n, X = 40, images(40, seed=4)
    y = np.arange(n)
    default = du.BatchIterator(X, y, 16, shuffle=True, augment=True, seed=9, crop=crop)
    assert default.alternate_flip is False
    for e in (0, 1, 2):
        ref = todays_plan(n, 9, e, crop)
        for got, want in zip(default.plan(e), ref):
            np.testing.assert_array_equal(got, want)
        order, crop_rc, paste_rc, flip = ref
        expected = augmented(X[order[:16]], crop_rc[:16], None if paste_rc is None else paste_rc[:16], flip[:16],
                             crop)
        np.testing.assert_allclose(next(default.epoch(e))[0], expected.astype(np.float32) / 255, atol=1e-7)


def test_alternating_flip_needs_augment():
    with pytest.raises(ValueError, match='alternate_flip'):
        du.BatchIterator(images(4), np.arange(4), 2, shuffle=True, alternate_flip=True)


# --------------------------------------------------------------------------
# Test-time augmentation: flips and one-pixel shifts
# --------------------------------------------------------------------------

def reference_translate(image, dr, dc):
    """One image (C, H, W) moved by (dr, dc) the slow, obvious way: pixel by pixel, a source
    index outside the image reflected about the border pixel (-1 -> 1, H -> H - 2)."""
    C, H, W = image.shape

    def reflect(i, size):
        return -i if i < 0 else 2 * (size - 1) - i if i >= size else i
    out = np.empty_like(image)
    for r in range(H):
        for c in range(W):
            out[:, r, c] = image[:, reflect(r - dr, H), reflect(c - dc, W)]
    return out


def test_translate_is_exactly_one_pixel_with_a_reflected_border():
    X = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    for dr, dc in ((1, 1), (-1, -1), (1, 0), (0, -1), (0, 0)):
        out = du.translate_batch(X, dr, dc)
        assert out.shape == X.shape and out.dtype == X.dtype
        for i in range(3):
            np.testing.assert_array_equal(out[i], reference_translate(X[i], dr, dc), err_msg=f'{dr, dc, i}')
    down_right = du.translate_batch(X, 1, 1)
    np.testing.assert_array_equal(down_right[:, :, 1:, 1:], X[:, :, :-1, :-1])    # moved by one
    np.testing.assert_array_equal(down_right[:, :, 0, 1:], X[:, :, 1, :-1])       # row -1 is row 1
    up_left = du.translate_batch(X, -1, -1)
    np.testing.assert_array_equal(up_left[:, :, :-1, :-1], X[:, :, 1:, 1:])
    np.testing.assert_array_equal(up_left[:, :, -1, :-1], X[:, :, -2, 1:])        # row 32 is row 30
    with pytest.raises(ValueError, match='one pixel'):
        du.translate_batch(X, 2, 0)


def test_the_view_weights_sum_to_one_and_are_airbenchs():
    assert du.TTA_MODES == ('none', 'flip', 'flip+translate')
    for mode in du.TTA_MODES:
        assert du.tta_weights(mode).sum() == 1.0
    assert list(du.tta_weights('flip')) == [0.5, 0.5]
    assert list(du.tta_weights('flip+translate')) == [0.25, 0.25, 0.125, 0.125, 0.125, 0.125]
    with pytest.raises(ValueError, match='test-time augmentation'):
        du.tta_weights('flip+rotate')


def test_the_views_are_the_image_its_mirror_and_both_shifts_with_their_mirrors():
    X = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    views = list(du.tta_views(X, 'flip+translate'))
    assert [w for w, _ in views] == list(du.tta_weights('flip+translate'))
    assert views[0][1] is X
    expected = [X, X[..., ::-1], du.translate_batch(X, 1, 1), du.translate_batch(X, 1, 1)[..., ::-1],
                du.translate_batch(X, -1, -1), du.translate_batch(X, -1, -1)[..., ::-1]]
    for (_, v), e in zip(views, expected):
        assert v.flags.c_contiguous
        np.testing.assert_array_equal(v, e)
    assert [w for w, _ in du.tta_views(X, 'none')] == [1.0]


@pytest.fixture(scope='module')
def small_model():
    rng = np.random.default_rng(0)
    m = CNNRNN(seq_layout='rows', hidden=16, seed=1)
    for v in m.params.values():       # random biases too, so nothing is symmetric by accident
        v += rng.standard_normal(v.shape).astype(v.dtype) * 0.1
    return m


def test_evaluate_averages_the_views_and_keeps_the_single_view(small_model):
    rng = np.random.default_rng(2)
    X8 = rng.integers(0, 256, (12, 3, 32, 32), dtype=np.uint8)
    it = du.BatchIterator(X8, rng.integers(0, 10, 12), 5)
    X = du.normalize(X8)
    p = small_model.predict_proba
    single = {}
    loss, acc, probs, hidden = main.evaluate(small_model, it, 'flip+translate', single_view=single)
    views = [X, X[..., ::-1], du.translate_batch(X, 1, 1), du.translate_batch(X, 1, 1)[..., ::-1],
             du.translate_batch(X, -1, -1), du.translate_batch(X, -1, -1)[..., ::-1]]
    expected = sum(w * p(np.ascontiguousarray(v)) for w, v in zip([.25, .25, .125, .125, .125, .125], views))
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-5)
    assert probs.dtype == np.float32
    np.testing.assert_allclose(single['probs'], p(X), rtol=1e-5, atol=1e-7)   # float32, other batch shapes
    np.testing.assert_allclose(hidden, small_model.features(X), rtol=1e-4, atol=1e-5)
    assert not np.allclose(probs, single['probs'])         # the views differ for a real image
    # 'flip' is the mean of the two views exactly as it was computed before the shifts existed.
    _, _, flip_probs, _ = main.evaluate(small_model, it, 'flip')
    old = np.concatenate([0.5 * (p(b, batch_size=len(b)) + p(np.ascontiguousarray(b[..., ::-1]), batch_size=len(b)))
                          for b, _ in it.epoch(0)])
    np.testing.assert_array_equal(flip_probs, old)
    # Without augmentation the probabilities are the single view's, unchanged.
    _, _, none_probs, _ = main.evaluate(small_model, it)
    np.testing.assert_array_equal(none_probs, np.concatenate([p(b, batch_size=len(b)) for b, _ in it.epoch(0)]))


def test_constant_images_look_the_same_in_every_view(small_model):
    """A flip or a reflected one-pixel shift leaves an image of one colour per channel as it
    is, so every view's probabilities are the single view's."""
    colours = np.random.default_rng(3).integers(0, 256, (6, 3), dtype=np.uint8)
    X8 = np.broadcast_to(colours[:, :, None, None], (6, 3, 32, 32)).copy()
    it = du.BatchIterator(X8, np.zeros(6, int), 6, mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3])
    single = {}
    _, _, probs, _ = main.evaluate(small_model, it, 'flip+translate', single_view=single)
    np.testing.assert_allclose(probs, single['probs'], rtol=1e-5, atol=1e-7)
    assert np.ptp(probs, axis=0).max() > 1e-4              # the colours do give different outputs


def metrics_json(folder):
    return json.loads((folder / 'metrics.json').read_text())


def test_a_flip_and_translate_run_writes_its_single_view_and_names_its_tta(data_dir, tmp_path):
    out = tmp_path / 'tta'
    assert train_run(data_dir, out, '--epochs', '1', '--set', 'tta_translate=true') == 0
    m = metrics_json(out)
    assert m['tta'] == 'flip+translate'
    assert set(m['single_view']) == {'test_acc', 'test_loss', 'ece'}
    model = CNNRNN.load(out / 'best.npz')
    data = du.load_cifar10(data_dir, subset=1.0, seed=0)
    mean, std = main.load_checkpoint(out / 'ckpt.npz').state.normalization()
    test_it = du.BatchIterator(data['X_test'], data['y_test'], 500, mean=mean, std=std)
    single = {}
    _, _, expected, _ = main.evaluate(model, test_it, 'flip+translate', single_view=single)
    with np.load(out / 'predictions.npz') as p:
        np.testing.assert_allclose(p['probs'], expected, atol=1e-6)
        labels = p['labels']
    assert m['single_view']['test_acc'] == pytest.approx((single['probs'].argmax(1) == labels).mean())
    # Validation scored the same views as the test: best.npz's epoch has that accuracy.
    history = json.loads((out / 'history.json').read_text())
    val_it = du.BatchIterator(data['X_val'], data['y_val'], 500, mean=mean, std=std)
    assert main.evaluate(model, val_it, 'flip+translate')[1] == history[-1]['val_acc']
    assert 'with the flip and the one-pixel shifts;' in (out / 'train.log').read_text()
    # The run-folder module reads both; the report names the views of its test accuracy.
    got = runfiles.read_metrics(out)
    assert got.single_view == m['single_view'] and got.tta == 'flip+translate'
    assert runfiles.status(out).state == runfiles.FINISHED
    assert viz.main([str(out), '--tsne-samples', '0']) == 0
    report = (out / runfiles.REPORT_NAME).read_text()
    assert '| Test accuracy (flip+translate test-time views averaged) |' in report
    assert '| One view (no test-time augmentation) |' in report


def test_the_tta_key_says_none_or_flip_and_single_view_comes_only_with_an_augmentation(data_dir, tmp_path):
    plain, flip = tmp_path / 'plain', tmp_path / 'flip'
    assert train_run(data_dir, plain, '--epochs', '1') == 0
    assert train_run(data_dir, flip, '--epochs', '1', '--set', 'tta_flip=true') == 0
    assert metrics_json(plain)['tta'] == 'none' and 'single_view' not in metrics_json(plain)
    assert metrics_json(flip)['tta'] == 'flip' and 'single_view' in metrics_json(flip)
    assert 'with the flip;' in (flip / 'train.log').read_text()


# --------------------------------------------------------------------------
# Pass-through of the model's levers: patch whitening, identity initialisation, the readout
# --------------------------------------------------------------------------

def test_model_settings_pass_the_model_levers_only_when_on():
    fast = config.load_presets()['fast']
    before = {'seq_layout', 'hidden', 'cell', 'widths', 'convs_per_block', 'batchnorm', 'bn_momentum', 'bn_eps'}
    assert set(main.model_settings(fast)) == before       # so models and files without them work as before
    on = config.with_overrides(fast, {'whiten': 3, 'identity_init': True, 'readout': 'mean'}, 'x')
    settings = main.model_settings(on)
    assert (settings['whiten'], settings['identity_init'], settings['readout']) == (3, True, 'mean')
    assert set(settings) - before == {'whiten', 'identity_init', 'readout'}


def test_a_fresh_run_fits_the_whitening_on_the_normalized_training_images_before_anything_copies_them(
        data_dir, tmp_path, monkeypatch):
    """The wiring of main.py: the model gets the arguments, the fit sees the training images as the
    iterator feeds them, before the optimizer and the weight average are made. With the real
    model's whitening when it has one, else a stand-in that takes the arguments and records the fit."""
    calls = []
    has_whiten = 'whiten' in inspect.signature(CNNRNN).parameters

    class Recorded(CNNRNN):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            calls.append(('init', kwargs.get('whiten', 0), kwargs.get('identity_init', False)))

        def fit_whitening(self, X):
            calls.append(('fit', X.copy()))
            super().fit_whitening(X)

    class StandIn(CNNRNN):
        def __init__(self, *args, whiten=0, identity_init=False, **kwargs):
            super().__init__(*args, **kwargs)
            self.whiten, self.identity_init = whiten, identity_init
            calls.append(('init', whiten, identity_init))

        def config(self):
            return {**super().config(), 'whiten': self.whiten, 'identity_init': self.identity_init}

        def fit_whitening(self, X):
            calls.append(('fit', X.copy()))

    def spy(name, real):
        def make(*args, **kwargs):
            calls.append((name,))
            return real(*args, **kwargs)
        return make
    monkeypatch.setattr(main, 'CNNRNN', Recorded if has_whiten else StandIn)
    monkeypatch.setattr(main, 'SGD', spy('sgd', main.SGD))
    monkeypatch.setattr(main, 'WeightAverage', spy('average', main.WeightAverage))
    out = tmp_path / 'whiten'
    assert train_run(data_dir, out, '--epochs', '1', '--set', 'whiten=2', '--set', 'identity_init=true',
                     '--set', 'ema=0.9') == 0
    assert [c[0] for c in calls[:4]] == ['init', 'fit', 'sgd', 'average']
    assert calls[0][1:] == (2, True)
    X = calls[1][1]
    data = du.load_cifar10(data_dir, subset=1.0, seed=0)
    mean, std = main.load_checkpoint(out / 'ckpt.npz').state.normalization()
    assert mean is not None                     # the smoke preset standardizes: the fit sees that too
    assert X.dtype == np.float32 and X.shape == (min(5000, len(data['y_train'])), 3, 32, 32)
    np.testing.assert_array_equal(X, du.normalize(data['X_train'][:5000], mean, std))
    np.testing.assert_array_equal(X, next(iter(du.BatchIterator(data['X_train'], data['y_train'], 5000,
                                                                mean=mean, std=std)))[0])
    assert sum(c[0] == 'fit' for c in calls) == 1


def test_whiten_passthrough(data_dir, tmp_path, monkeypatch):
    """With the real model: a whiten run fits its whitening once, keeps it in the checkpoint and
    resumes bit-identically without fitting again. Runs once CNNRNN(whiten=...) exists."""
    if 'whiten' not in inspect.signature(CNNRNN).parameters:
        pytest.skip('CNNRNN has no whiten argument yet (cnn_rnn_numpy.py is adding it); this test '
                    'runs as soon as it does')
    fits = []
    real_fit = CNNRNN.fit_whitening

    def counted(self, X):
        fits.append(X.shape)
        return real_fit(self, X)
    monkeypatch.setattr(CNNRNN, 'fit_whitening', counted)
    levers = ['--epochs', '2', '--set', 'whiten=2', '--set', 'identity_init=true']
    full = tmp_path / 'full'
    assert train_run(data_dir, full, *levers) == 0
    assert len(fits) == 1 and fits[0][1:] == (3, 32, 32)
    ckpt = main.load_checkpoint(full / 'ckpt.npz')
    assert (ckpt.cfg.whiten, ckpt.cfg.identity_init) == (2, True)
    assert ckpt.model.config()['whiten'] == 2
    split = tmp_path / 'split'
    assert train_run(data_dir, split, *levers, interrupt_after=STEPS_PER_EPOCH + 2) == 0
    assert len(fits) == 2
    assert resume(split / 'ckpt.npz') == 0
    assert len(fits) == 2                         # a resume keeps the checkpoint's whitening
    a, b = arrays(full / 'ckpt.npz'), arrays(split / 'ckpt.npz')
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# --------------------------------------------------------------------------
# val_views: each epoch's validation with the test-time views or one view
# --------------------------------------------------------------------------

TIMING = {'epoch_time_s', 'images_per_s', 'elapsed_s', 'wall_time_s', 'train_images_per_s',
          'test_images_per_s', 'time_to_val_acc'}


def without_timing(record):
    return {k: v for k, v in record.items() if k not in TIMING}


@pytest.fixture
def counted_views(monkeypatch):
    """The images each call of CNNRNN.predict_proba sees (one entry per view of a batch), and the
    Stopper of the run (main.run makes one), for its last reserve."""
    seen, stoppers = [], []
    real = CNNRNN.predict_proba

    def predict_proba(self, X, *args, **kwargs):
        seen.append(len(X))
        return real(self, X, *args, **kwargs)

    class Kept(main.Stopper):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            stoppers.append(self)
    monkeypatch.setattr(CNNRNN, 'predict_proba', predict_proba)
    monkeypatch.setattr(main, 'Stopper', Kept)
    return seen, stoppers


def test_val_views_one_validates_one_view_and_still_tests_six(data_dir, tmp_path, counted_views):
    seen, stoppers = counted_views
    out = tmp_path / 'one'
    assert train_run(data_dir, out, '--epochs', '1', '--set', 'tta_translate=true', '--set', 'val_views=one') == 0
    data = du.load_cifar10(data_dir, subset=1.0, seed=0)
    n_val, n_test = len(data['y_val']), len(data['y_test'])
    # One view of the validation images in the epoch, then six of validation and test at the end.
    assert sum(seen) == n_val + 6 * (n_val + n_test)
    ck = main.load_checkpoint(out / 'ckpt.npz')
    assert ck.cfg.val_views == 'one' and ck.cfg.tta_mode() == 'flip+translate'
    model = CNNRNN.load(out / 'best.npz')
    mean, std = ck.state.normalization()
    val_it = du.BatchIterator(data['X_val'], data['y_val'], ck.cfg.eval_batch_size, mean=mean, std=std)
    record = json.loads((out / 'history.json').read_text())[-1]
    one, six = main.evaluate(model, val_it, 'none'), main.evaluate(model, val_it, 'flip+translate')
    assert (record['val_loss'], record['val_acc']) == (one[0], one[1])
    assert record['val_loss'] != six[0]
    # The final evaluation is the test-time views', with the single view beside them.
    m = metrics_json(out)
    assert m['tta'] == 'flip+translate' and set(m['single_view']) == {'test_acc', 'test_loss', 'ece'}
    test_it = du.BatchIterator(data['X_test'], data['y_test'], ck.cfg.eval_batch_size, mean=mean, std=std)
    single = {}
    _, _, expected, _ = main.evaluate(model, test_it, 'flip+translate', single_view=single)
    with np.load(out / 'predictions.npz') as p:
        np.testing.assert_allclose(p['probs'], expected, atol=1e-6)
    assert m['single_view']['test_acc'] == pytest.approx((single['probs'].argmax(1) == data['y_test']).mean())
    assert m['best_val_acc'] == one[1]
    assert '(one view: val_views one)' in (out / 'train.log').read_text()
    # The budget's reserve was counted from that one-view speed, the final evaluation at six views.
    assert stoppers[-1].reserve_s == main.evaluation_reserve_s(n_val, n_test, 'none', 'flip+translate',
                                                               ck.state.eval_images_per_s)


def test_val_views_one_averages_val_acc_raw_with_one_view_too(data_dir, tmp_path, counted_views):
    seen, stoppers = counted_views
    out = tmp_path / 'ema'
    assert train_run(data_dir, out, '--epochs', '1', '--set', 'tta_flip=true', '--set', 'val_views=one',
                     '--set', 'ema=0.9') == 0
    data = du.load_cifar10(data_dir, subset=1.0, seed=0)
    n_val, n_test = len(data['y_val']), len(data['y_test'])
    # The average's and the last weights' validation, one view each; the final evaluation two.
    assert sum(seen) == 2 * n_val + 2 * (n_val + n_test)
    ck = main.load_checkpoint(out / 'ckpt.npz')
    mean, std = ck.state.normalization()
    val_it = du.BatchIterator(data['X_val'], data['y_val'], ck.cfg.eval_batch_size, mean=mean, std=std)
    record = json.loads((out / 'history.json').read_text())[-1]
    assert record['val_acc_raw'] == main.evaluate(ck.model, val_it, 'none')[1]
    # The budget's reserve counts both validation passes of an epoch.
    assert stoppers[-1].reserve_s == main.evaluation_reserve_s(n_val, n_test, 'none', 'flip',
                                                               ck.state.eval_images_per_s, val_passes=2)
    assert stoppers[-1].reserve_s == pytest.approx((2 * n_val + 2 * (n_val + n_test)) / ck.state.eval_images_per_s)


def test_val_views_test_is_the_default_and_trains_and_tests_as_before(data_dir, tmp_path, counted_views):
    seen, stoppers = counted_views
    assert config.Config().val_views == 'test' and config.Config.defaults()['val_views'] == 'test'
    default, explicit = tmp_path / 'default', tmp_path / 'explicit'
    assert train_run(data_dir, default, '--epochs', '2', '--set', 'tta_translate=true') == 0
    data = du.load_cifar10(data_dir, subset=1.0, seed=0)
    n_val, n_test = len(data['y_val']), len(data['y_test'])
    assert sum(seen) == 2 * 6 * n_val + 6 * (n_val + n_test)       # six views everywhere, as before
    speed = main.load_checkpoint(default / 'ckpt.npz').state.eval_images_per_s
    assert stoppers[-1].reserve_s == (2 * n_val + n_test) / speed    # the reserve of before, to the bit
    assert train_run(data_dir, explicit, '--epochs', '2', '--set', 'tta_translate=true',
                     '--set', 'val_views=test') == 0
    a, b = (json.loads((f / 'history.json').read_text()) for f in (default, explicit))
    assert [without_timing(r) for r in a] == [without_timing(r) for r in b]
    assert without_timing(metrics_json(default)) == without_timing(metrics_json(explicit))
    assert json.loads((default / 'config.json').read_text()) == json.loads((explicit / 'config.json').read_text())
    x, y = arrays(default / 'ckpt.npz'), arrays(explicit / 'ckpt.npz')
    for k in x:
        if k.startswith(('param/', 'velocity/')):
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)
    with np.load(default / 'predictions.npz') as p, np.load(explicit / 'predictions.npz') as q:
        np.testing.assert_array_equal(p['probs'], q['probs'])


def test_the_reserve_counts_view_images():
    n_val, n_test, speed = 5000, 10000, 123.4          # speed: images/s of an epoch's validation pass
    for mode in du.TTA_MODES:       # the same views each epoch and at the end: the reserve of before, bit for bit
        assert main.evaluation_reserve_s(n_val, n_test, mode, mode, speed) == (2 * n_val + n_test) / speed
    # One view each epoch, six at the end: the validation pass as measured, the final evaluation
    # (validation and test) six times what counting images alone would reserve.
    reserve = main.evaluation_reserve_s(n_val, n_test, 'none', 'flip+translate', speed)
    naive = (2 * n_val + n_test) / speed
    epoch_pass = n_val / speed
    assert reserve == pytest.approx(epoch_pass + 6 * (n_val + n_test) / speed)
    assert (reserve - epoch_pass) / (naive - epoch_pass) == pytest.approx(6)
    assert main.evaluation_reserve_s(n_val, n_test, 'none', 'flip', speed) == pytest.approx(
        epoch_pass + 2 * (n_val + n_test) / speed)
    # With the weight average an epoch validates twice (the average, then the last weights).
    assert main.evaluation_reserve_s(n_val, n_test, 'flip', 'flip', speed, val_passes=2) == \
        (3 * n_val + n_test) / speed


@pytest.mark.parametrize('val_views', ['test', 'one'])
def test_a_resumed_trainer_reserves_from_the_checkpoints_speed(val_views, small_model):
    """Trainer.__init__ (a resume) turns the stored eval_images_per_s (images/s of the run's own
    per-epoch validation pass, whose views the run's configuration fixes) into the reserve."""
    rng = np.random.default_rng(0)

    def split(n):
        return rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, n)
    (Xt, yt), (Xv, yv), (Xs, ys) = split(8), split(30), split(70)
    data = dict(X_train=Xt, y_train=yt, X_val=Xv, y_val=yv, X_test=Xs, y_test=ys)
    cfg = config.with_overrides(config.load_presets()['fast'], {'tta_translate': True, 'val_views': val_views}, 'x')
    state = main.TrainState(eval_images_per_s=40.0)
    stopper = main.Stopper()
    trainer = main.Trainer(cfg, None, small_model, main.SGD(small_model.params), state, data, stopper)
    assert trainer.val_tta == ('flip+translate' if val_views == 'test' else 'none')
    expected = (2 * 30 + 70) / 40.0 if val_views == 'test' else (30 + 6 * (30 + 70)) / 40.0
    assert stopper.reserve_s == pytest.approx(expected, rel=1e-12)
    if val_views == 'test':
        assert stopper.reserve_s == (2 * 30 + 70) / 40.0


def test_val_tta_mode_follows_val_views():
    fast = config.load_presets()['fast']
    assert fast.val_views == 'test' and fast.val_tta_mode() == fast.tta_mode() == 'none'
    for tta in ({'tta_flip': True}, {'tta_translate': True}, {}):
        on = config.with_overrides(fast, tta, 'x')
        assert on.val_tta_mode() == on.tta_mode()
        assert config.with_overrides(on, {'val_views': 'one'}, 'x').val_tta_mode() == 'none'


@pytest.mark.parametrize('value', ['all', 'One', 1, True, None])
def test_a_bad_val_views_is_refused_with_one_sentence(value, tmp_path):
    with pytest.raises(config.ConfigError) as e:
        config.with_overrides(config.load_presets()['fast'], {'val_views': value}, 'preset x')
    message = str(e.value)
    assert f"val_views = {value!r} is invalid; it must be 'test'" in message and "or 'one'" in message
    assert '\n' not in message
    path = tmp_path / 'presets.json'
    path.write_text(json.dumps({'x': {'val_views': value}}))
    with pytest.raises(config.ConfigError, match="preset 'x': val_views"):
        config.load_presets(path)


def test_a_bad_val_views_on_the_command_line_is_one_line_and_writes_nothing(data_dir, tmp_path, capsys):
    out = tmp_path / 'bad'
    assert main.run(SMOKE + ['--data-dir', data_dir, '--out', str(out), '--set', 'val_views=both']) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --set: val_views = 'both' is invalid") and '\n' not in err
    assert not out.exists()


# --------------------------------------------------------------------------
# Lookahead (airbench's): the weights pulled back to a slow copy every few steps
# --------------------------------------------------------------------------

def test_a_pull_moves_the_slow_copy_toward_the_weights_and_the_weights_onto_it():
    rng = np.random.default_rng(0)
    frozen = sorted(FROZEN_PARAMS)[0]
    params = {'w': rng.normal(size=(3, 4)).astype(np.float32), frozen: rng.normal(size=(2,)).astype(np.float32)}
    look = Lookahead(params, 5)
    start = {k: v.copy() for k, v in params.items()}
    params['w'] += 1.0
    params[frozen] += 1.0               # a frozen array is never trained; if it changes, the pull leaves it
    moved = params['w'].copy()
    look.pull(params, 0.25)
    expected = (np.float32(0.25) * start['w'] + np.float32(0.75) * moved)
    np.testing.assert_allclose(look.slow['w'], expected, rtol=1e-6)
    np.testing.assert_array_equal(params['w'], look.slow['w'])
    np.testing.assert_array_equal(params[frozen], start[frozen] + 1.0)
    # Decay 0 copies the weights (exactly); finish puts the slow copy back whatever the weights did.
    params['w'] += 2.0
    look.pull(params, 0.0)
    np.testing.assert_array_equal(look.slow['w'], params['w'])
    kept = look.slow['w'].copy()
    params['w'] -= 3.0
    look.finish(params)
    np.testing.assert_array_equal(params['w'], kept)
    # A resumed run's slow copy is the checkpoint's, not the weights.
    assert np.array_equal(Lookahead(params, 5, slow={'w': start['w'], frozen: start[frozen]}).slow['w'], start['w'])


def test_the_pull_grows_cubically_to_airbenchs_strength_at_the_end():
    look = Lookahead({'w': np.zeros(1, np.float32)}, 5)
    assert look.decay(0, 100) == 0.0
    assert look.decay(50, 100) == pytest.approx(0.95 ** 5 / 8)
    assert look.decay(100, 100) == pytest.approx(0.95 ** 5) == pytest.approx(0.7738, abs=1e-4)
    assert look.decay(130, 100) == look.decay(100, 100)      # a re-planned, shorter schedule: no more than d_max
    assert [s for s in range(1, 21) if look.due(s)] == [5, 10, 15, 20]


def test_a_lookahead_run_pulls_on_schedule_ends_on_the_slow_weights_and_resumes_exactly(
        data_dir, tmp_path, monkeypatch):
    levers = ['--epochs', '2', '--set', 'lookahead=3']
    pulls, finishes = [], []
    pull, finish = Lookahead.pull, Lookahead.finish
    monkeypatch.setattr(Lookahead, 'pull', lambda self, p, d: (pulls.append(d), pull(self, p, d))[1])
    monkeypatch.setattr(Lookahead, 'finish', lambda self, p: (finishes.append(len(pulls)), finish(self, p))[1])
    full = tmp_path / 'full'
    assert train_run(data_dir, full, *levers) == 0
    total = 2 * STEPS_PER_EPOCH                 # 16 steps: pulls after steps 3, 6, 9, 12 and 15, then the end
    assert pulls == pytest.approx([0.95 ** 3 * (t / total) ** 3 for t in range(3, total + 1, 3)])
    assert finishes == [len(pulls)]
    ckpt = arrays(full / 'ckpt.npz')
    slow = {k[len('lookahead/'):]: v for k, v in ckpt.items() if k.startswith('lookahead/')}
    assert sorted(slow) == sorted(CNNRNN().params)
    for name, v in slow.items():                # the model is the slow copy: best.npz of the last epoch too
        np.testing.assert_array_equal(ckpt[f'param/{name}'], v, err_msg=name)
    assert main.load_checkpoint(full / 'ckpt.npz').cfg.lookahead == 3
    # The lever changes training: without it the same seed ends elsewhere.
    plain = tmp_path / 'plain'
    assert train_run(data_dir, plain, '--epochs', '2') == 0
    assert not np.array_equal(arrays(plain / 'ckpt.npz')['param/W_ho'], ckpt['param/W_ho'])
    # Stopped between two pulls (after step 4 of 16) and resumed: bit-identical, slow copy included.
    split = tmp_path / 'split'
    assert train_run(data_dir, split, *levers, interrupt_after=4) == 0
    assert resume(split / 'ckpt.npz') == 0
    resumed = arrays(split / 'ckpt.npz')
    assert set(resumed) == set(ckpt)
    for k, v in resumed.items():
        np.testing.assert_array_equal(v, ckpt[k], err_msg=k)


@pytest.mark.parametrize('value', [-1, 1001, 2.5, True, '5'])
def test_a_bad_lookahead_is_refused_with_one_sentence(value):
    with pytest.raises(config.ConfigError) as e:
        config.with_overrides(config.load_presets()['fast'], {'lookahead': value}, 'preset x')
    message = str(e.value)
    assert f'lookahead = {value!r} is invalid; it must be an integer in [0, 1000]' in message
    assert '\n' not in message
