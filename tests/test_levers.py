"""The accuracy levers beyond the method, each a preset key that is off by default:
label smoothing, a weight average (EMA), test-time flip averaging, and the
pad-and-crop augmentation."""
import json

import numpy as np
import pytest

import cnn_rnn_numpy as M
import data_utils as du
import main
from cnn_rnn_numpy import CNNRNN
from optim import WeightAverage
from conftest import SMOKE, arrays, numeric_gradient, rel_error, rel_error_vector, resume, train_run


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    from conftest import make_cifar_archive
    return str(make_cifar_archive(tmp_path_factory.mktemp('cifar'), n_per_batch=50, n_test=100))


# --------------------------------------------------------------------------
# Label smoothing
# --------------------------------------------------------------------------

@pytest.mark.parametrize('s', [0.1, 0.3])
def test_label_smoothing_loss_and_gradient(s):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, 10)) * 3
    y = rng.integers(0, 10, 6)
    loss, dlogits = M.softmax_loss(logits, y, smoothing=s)
    # Against the definition: cross-entropy with targets Q = (1 - s) onehot + s / C.
    Q = (1 - s) * np.eye(10)[y] + s / 10
    log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    assert loss == pytest.approx(-(Q * log_p).sum(1).mean(), abs=1e-12)
    np.testing.assert_allclose(dlogits, (np.exp(log_p) - Q) / 6, atol=1e-12)
    idx, num = numeric_gradient(lambda: M.softmax_loss(logits, y, smoothing=s)[0], logits)
    assert rel_error(num, dlogits.reshape(-1)[idx]) < 1e-7
    # No smoothing is exactly the plain loss; smoothing changes it.
    plain = M.softmax_loss(logits, y)
    assert M.softmax_loss(logits, y, smoothing=0.0)[0] == plain[0]
    assert loss != plain[0]


def test_model_loss_with_label_smoothing_is_gradient_checked():
    rng = np.random.default_rng(1)
    m = CNNRNN(seq_layout='rows', hidden=8, reg=0.01, seed=2, dtype=np.float64)
    X, y = rng.random((2, 3, 32, 32)), rng.integers(0, 10, 2)
    loss, grads = m.loss(X, y, label_smoothing=0.2)
    assert loss != m.loss(X, y)[0]
    for name in ('W_ho', 'W_xh', 'conv1_W'):
        sample = rng.choice(m.params[name].size, 10, replace=False)
        idx, num = numeric_gradient(lambda: m.loss(X, y, label_smoothing=0.2)[0], m.params[name],
                                    indices=sample, h=1e-6)
        assert rel_error_vector(num, grads[name].reshape(-1)[idx]) < 1e-6, name


# --------------------------------------------------------------------------
# Weight average
# --------------------------------------------------------------------------

def test_weight_average_follows_its_formula_and_never_writes_the_model():
    params = {'w': np.zeros(3, np.float32)}
    avg = WeightAverage(params, decay=0.9)
    assert avg.params['w'] is not params['w']
    expected = np.zeros(3)
    for n in range(40):
        params['w'] += 1.0
        avg.update(params)
        d = min(0.9, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * params['w']
        np.testing.assert_allclose(avg.params['w'], expected, rtol=1e-5)
    assert avg.updates == 40
    np.testing.assert_array_equal(params['w'], 40.0)
    # Behind the moving weights, as an average must be, and within the ~1/(1-d) last steps.
    assert 30 < avg.params['w'][0] < 40
    # A resumed average continues where it was.
    resumed = WeightAverage(params, decay=0.9, averaged=avg.params, updates=avg.updates)
    params['w'] += 1.0
    avg.update(params)
    resumed.update(params)
    np.testing.assert_array_equal(avg.params['w'], resumed.params['w'])


def test_ema_run_evaluates_and_saves_the_average_and_resumes_exactly(data_dir, tmp_path):
    levers = ['--epochs', '2', '--set', 'ema=0.9']
    full = tmp_path / 'full'
    assert train_run(data_dir, full, *levers) == 0
    ckpt = arrays(full / 'ckpt.npz')
    assert {k for k in ckpt if k.startswith('average/')} == {f'average/{k}' for k in CNNRNN().params}
    # The average differs from the last weights, and best.npz holds the average of its epoch.
    assert not np.array_equal(ckpt['average/W_ho'], ckpt['param/W_ho'])
    history = json.loads((full / 'history.json').read_text())
    assert all(0 <= r['val_acc_raw'] <= 1 for r in history)
    # Validation scored the average (val_acc), not the last weights (val_acc_raw), and
    # best.npz holds the parameters that were scored.
    assert any(r['val_acc'] != r['val_acc_raw'] for r in history)
    best, best_meta = CNNRNN.load(full / 'best.npz', return_meta=True)
    data = du.load_cifar10(data_dir, subset=1.0, seed=0)
    mean, std = main.load_checkpoint(full / 'ckpt.npz').state.normalization()
    val_it = du.BatchIterator(data['X_val'], data['y_val'], 500, mean=mean, std=std)
    assert main.evaluate(best, val_it)[1] == history[best_meta['epoch'] - 1]['val_acc']
    # The test set is evaluated with best.npz (the average), as validation was.
    m = json.loads((full / 'metrics.json').read_text())
    with np.load(full / 'predictions.npz') as p:
        probs, labels = p['probs'], p['labels']
    assert m['test_acc'] == pytest.approx((probs.argmax(1) == labels).mean())
    it = du.BatchIterator(data['X_test'], data['y_test'], 500, mean=mean, std=std)
    np.testing.assert_allclose(probs, main.evaluate(best, it)[2], atol=1e-6)
    # Stopped mid-epoch and resumed: bit-identical, average included.
    split = tmp_path / 'split'
    assert train_run(data_dir, split, *levers, interrupt_after=5) == 0
    assert resume(split / 'ckpt.npz') == 0
    for k, v in arrays(split / 'ckpt.npz').items():
        np.testing.assert_array_equal(v, ckpt[k], err_msg=k)


@pytest.mark.parametrize('lever, arrays_of', [('ema=0.5', 'average'), ('lookahead=2', 'lookahead')])
def test_checkpoint_of_a_run_without_its_weight_copy_is_refused(data_dir, tmp_path, capsys, lever, arrays_of):
    """A checkpoint of an ema run without its average, of a lookahead run without its slow copy."""
    out = tmp_path / 'run'
    assert train_run(data_dir, out, '--epochs', '1', '--set', lever, interrupt_after=3) == 0
    with np.load(out / 'ckpt.npz') as f:
        assert any(k.startswith(f'{arrays_of}/') for k in f.files)
        kept = {k: f[k] for k in f.files if not k.startswith(f'{arrays_of}/')}
    np.savez(tmp_path / 'without.npz', **kept)
    capsys.readouterr()
    assert resume(tmp_path / 'without.npz') == 2
    err = capsys.readouterr().err
    assert f'optimizer state ({arrays_of}) that does not match its model' in err and 'Traceback' not in err


# --------------------------------------------------------------------------
# Test-time flip averaging
# --------------------------------------------------------------------------

def test_flip_averaging_is_the_mean_of_both_views(data_dir, tmp_path):
    out = tmp_path / 'tta'
    assert train_run(data_dir, out, '--epochs', '1', '--set', 'tta_flip=true') == 0
    m = json.loads((out / 'metrics.json').read_text())
    model = CNNRNN.load(out / 'best.npz')
    data = du.load_cifar10(data_dir, subset=1.0, seed=0)
    mean, std = main.load_checkpoint(out / 'ckpt.npz').state.normalization()
    it = du.BatchIterator(data['X_test'], data['y_test'], 500, mean=mean, std=std)
    X = next(iter(it))[0]
    expected = 0.5 * (model.predict_proba(X) + model.predict_proba(X[..., ::-1].copy()))
    with np.load(out / 'predictions.npz') as p:
        np.testing.assert_allclose(p['probs'], expected, atol=1e-6)
        labels = p['labels']
    single = model.predict_proba(X)
    assert m['single_view']['test_acc'] == pytest.approx((single.argmax(1) == labels).mean())
    assert 'without)' in (out / 'train.log').read_text()
    # viz's report shows both.
    import viz
    assert viz.main([str(out), '--tsne-samples', '0', '--gallery-size', '0']) in (0, None)
    report = (out / 'report.md').read_text()
    assert (f"| One view (no test-time augmentation) | {100 * m['single_view']['test_acc']:.2f} %, "
            f"ECE {m['single_view']['ece']:.4f} |") in report
    # A mirrored image is a different input: the two views do not give the same probabilities.
    assert not np.allclose(single, expected)


# --------------------------------------------------------------------------
# Pad-and-crop augmentation
# --------------------------------------------------------------------------

def reference_pad_crop(image, offset, flip):
    """One image the slow, obvious way: mirror, pad by 4 with zeros, cut 32x32 at the offset."""
    if flip:
        image = image[..., ::-1]
    padded = np.pad(image, ((0, 0), (4, 4), (4, 4)))
    r, c = offset
    return padded[:, r:r + 32, c:c + 32]


def test_pad_crop_matches_the_per_image_reference():
    rng = np.random.default_rng(0)
    X = rng.integers(1, 256, (64, 3, 32, 32), dtype=np.uint8)     # no zeros: padding is visible
    offsets = rng.integers(0, 9, (64, 2))
    flip = rng.random(64) < 0.5
    out = du.pad_crop_batch(X, offsets, flip)
    assert out.dtype == np.uint8 and out.shape == X.shape
    for i in range(64):
        np.testing.assert_array_equal(out[i], reference_pad_crop(X[i], offsets[i], flip[i]), err_msg=str(i))
    # (4, 4) without a flip is the image itself; (0, 0) moves it 4 pixels down and right.
    center = du.pad_crop_batch(X[:2], np.array([[4, 4]] * 2), np.zeros(2, bool))
    np.testing.assert_array_equal(center, X[:2])
    corner = du.pad_crop_batch(X[:1], np.array([[0, 0]]), np.zeros(1, bool))
    assert not corner[0, :, :4].any() and not corner[0, :, :, :4].any()
    np.testing.assert_array_equal(corner[0, :, 4:, 4:], X[0, :, :28, :28])


def reference_reflect_crop(image, offset, flip):
    """One image the slow, obvious way: mirror, reflect-pad by 2, cut 32x32 at the offset."""
    if flip:
        image = image[..., ::-1]
    padded = np.pad(image, ((0, 0), (2, 2), (2, 2)), mode='reflect')
    r, c = offset
    return padded[:, r:r + 32, c:c + 32]


def test_reflect_crop_matches_the_per_image_reference_and_leaves_no_black_frame():
    rng = np.random.default_rng(5)
    X = rng.integers(1, 256, (64, 3, 32, 32), dtype=np.uint8)     # no zeros: a black frame would show
    offsets = rng.integers(0, 5, (64, 2))
    flip = rng.random(64) < 0.5
    out = du.reflect_crop_batch(X, offsets, flip)
    assert out.dtype == np.uint8 and out.shape == X.shape and out.min() >= 1
    for i in range(64):
        np.testing.assert_array_equal(out[i], reference_reflect_crop(X[i], offsets[i], flip[i]), err_msg=str(i))
    # (2, 2) without a flip is the image itself, with one its mirror; (0, 0) moves it 2 pixels
    # down and right, the rows and columns that come in reflected (not repeating the edge).
    np.testing.assert_array_equal(du.reflect_crop_batch(X[:2], np.array([[2, 2]] * 2), np.zeros(2, bool)), X[:2])
    np.testing.assert_array_equal(du.reflect_crop_batch(X[:2], np.array([[2, 2]] * 2), np.ones(2, bool)),
                                  X[:2, :, :, ::-1])
    corner = du.reflect_crop_batch(X[:1], np.array([[0, 0]]), np.zeros(1, bool))[0]
    np.testing.assert_array_equal(corner[:, 2:, 2:], X[0, :, :30, :30])
    np.testing.assert_array_equal(corner[:, 0, 2:], X[0, :, 2, :30])
    np.testing.assert_array_equal(corner[:, 1, 2:], X[0, :, 1, :30])
    # The flipped one-pixel shift at test time (translate_batch) is one of its crops.
    shifted = du.translate_batch(X[:1], 1, 1)
    np.testing.assert_array_equal(du.reflect_crop_batch(X[:1], np.array([[1, 1]]), np.zeros(1, bool)), shifted)


def test_batch_iterator_reflect_crop_shifts_by_at_most_two_pixels():
    rng = np.random.default_rng(6)
    X = rng.integers(1, 256, (40, 3, 32, 32), dtype=np.uint8)
    it = du.BatchIterator(X, np.arange(40), 16, shuffle=True, augment=True, crop='reflect2', seed=3)
    order, offsets, paste, flip = it.plan(1)
    assert paste is None and offsets.min() == 0 and offsets.max() == 4
    expected = du.reflect_crop_batch(X[order[:16]], offsets[:16], flip[:16]).astype(np.float32) / 255
    np.testing.assert_allclose(next(it.epoch(1))[0], expected, atol=1e-7)
    np.testing.assert_array_equal(next(it.epoch(1))[0], next(it.epoch(1))[0])


def test_batch_iterator_pad_crop_is_reproducible_and_shifts_whole_images():
    rng = np.random.default_rng(1)
    X = rng.integers(1, 256, (40, 3, 32, 32), dtype=np.uint8)
    y = np.arange(40)
    it = du.BatchIterator(X, y, 16, shuffle=True, augment=True, crop='pad', seed=3)
    first = [b for b, _ in it.epoch(2)]
    again = [b for b, _ in it.epoch(2)]
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    order, offsets, paste, flip = it.plan(2)
    assert paste is None and offsets.min() >= 0 and offsets.max() <= 8 and len(np.unique(offsets)) > 5
    # Each batch is pad_crop_batch of its images, scaled to [0, 1].
    expected = du.pad_crop_batch(X[order[:16]], offsets[:16], flip[:16]).astype(np.float32) / 255
    np.testing.assert_allclose(first[0], expected, atol=1e-7)
    with pytest.raises(ValueError, match='crop must be one of'):
        du.BatchIterator(X, y, 16, augment=True, crop='mirror')


def test_levers_are_validated_as_preset_keys(data_dir, tmp_path, capsys):
    for setting, words in (('label_smoothing=1', 'label_smoothing = 1 is invalid'),
                           ('label_smoothing=-0.1', 'label_smoothing = -0.1 is invalid'),
                           ('ema=1', 'ema = 1 is invalid'),
                           ('crop=mirror', "crop = 'mirror' is invalid"),
                           ('tta_flip=2', 'tta_flip = 2 is invalid')):
        out = tmp_path / setting.replace('=', '_')
        assert main.run(SMOKE + ['--data-dir', data_dir, '--out', str(out), '--set', setting]) == 2, setting
        err = capsys.readouterr().err
        assert words in err and err.count('\n') == 1, err
        assert not out.exists()


def test_a_run_with_every_lever_trains_and_reports_them(data_dir, tmp_path):
    out = tmp_path / 'all'
    assert train_run(data_dir, out, '--epochs', '1', '--set', 'crop=pad', '--set', 'label_smoothing=0.1',
                     '--set', 'ema=0.99', '--set', 'tta_flip=true') == 0
    cfg = json.loads((out / 'config.json').read_text())
    assert (cfg['crop'], cfg['label_smoothing'], cfg['ema'], cfg['tta_flip']) == ('pad', 0.1, 0.99, True)
    m = json.loads((out / 'metrics.json').read_text())
    assert 0 <= m['single_view']['test_acc'] <= 1 and m['stopped_early'] is False
