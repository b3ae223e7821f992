"""Tests of issue 23's airbench levers on the model side (cnn_rnn_numpy): the frozen patch-whitening
first layer (CNNRNN's whiten, whiten_forward/backward, patch_whitening_weights, fit_whitening) and the
identity (dirac) initialisation of the convolutions (identity_init, dirac_init).

Both are off by default, and a model built with them off must be the model built without them."""
import json
import re

import numpy as np
import pytest

import cnn_rnn_numpy as M
import fast_layers as F
from cnn_rnn_numpy import CNNRNN, ModelFileError
from conftest import check_model_gradients, numeric_gradient, perturbed, rel_error
from optim import SGD, WeightAverage

RTOL = 1e-6            # bound on the relative error of every float64 gradient (as tests/test_backbone.py)
SMALL = dict(widths=[4, 6], hidden=6, reg=0.1, seed=3, dtype=np.float64)


@pytest.fixture
def rng():
    return np.random.default_rng(1923)


def images(rng, n=5, side=8, dtype=np.float64):
    """(n, 3, side, side) images and (n,) labels ('pixels' takes any side divisible by 2**blocks)."""
    return rng.standard_normal((n, 3, side, side)).astype(dtype), rng.integers(0, 10, n)


def correlated_images(rng, n=64, side=16):
    """Images whose neighbouring pixels and channels are correlated (as natural images' are), with
    a patch second moment far from the identity but every eigenvalue well above WHITEN_EPS."""
    white = rng.standard_normal((n, 3, side + 1, side + 1))
    smooth = white[:, :, 1:, 1:] + 0.7 * white[:, :, :-1, 1:] + 0.5 * white[:, :, 1:, :-1]
    mix = np.array([[1.0, 0.6, 0.3], [0.0, 1.0, 0.6], [0.0, 0.0, 1.0]])
    return np.einsum('dc,nchw->ndhw', mix, smooth) * 2.0 + 0.1



def whitened_features(X, w):
    """The whitening layer's features before its ReLU, at the pixels whose patch lies inside the
    image (those the filters are fit on), computed by whiten_forward itself: with [W; -W],
    relu(z) - relu(-z) = z."""
    k = w.shape[-1]
    P = w.shape[0] // 2
    out, _ = M.whiten_forward(X.transpose(0, 2, 3, 1), w)
    z = out[..., :P] - out[..., P:]
    before, S = (k - 1) // 2, X.shape[-1]
    return z[:, before:before + S - k + 1, before:before + S - k + 1].reshape(-1, P)


# --------------------------------------------------------------------------
# Parameters: names, shapes, order, initial values
# --------------------------------------------------------------------------

@pytest.mark.parametrize('k', [2, 3])
def test_whiten_w_comes_first_and_conv1_reads_its_channels(k):
    P = 3 * k * k
    m = CNNRNN(widths=[4, 6], batchnorm=True, hidden=5, whiten=k)
    shapes = list(m.param_shapes().items())
    assert shapes[0] == ('whiten_W', (2 * P, 3, k, k)) and shapes[1] == ('conv1_W', (4, 2 * P, 3, 3))
    assert [name for name, _ in shapes[1:]] == list(CNNRNN(widths=[4, 6], batchnorm=True, hidden=5).param_shapes())
    assert list(m.params)[0] == 'whiten_W' and m.params['whiten_W'].dtype == np.float32
    assert not m.params['whiten_W'].any()                 # zeros until fit_whitening
    assert m.conv1_inputs == 2 * P and m.config()['whiten'] == k
    # The general backbone, even with the method's widths; conv1 by Winograd on its 2P channels.
    assert not CNNRNN(whiten=k).method_backbone and CNNRNN().method_backbone
    assert m.layers[0].winograd and not CNNRNN(widths=[4, 6]).layers[0].winograd


def test_whiten_w_is_not_drawn_from_the_generator():
    """conv1_W is the generator's first draw with or without whitening, conv2_W its second:
    whiten_W takes none (only conv1's larger draw moves the later ones along the stream)."""
    for whiten in (0, 2, 3):
        m = CNNRNN(widths=[4, 6], hidden=5, seed=11, whiten=whiten)
        I = m.conv1_inputs
        draws = np.random.default_rng(11)
        conv1 = draws.standard_normal((4, I, 3, 3)) * np.sqrt(2.0 / (I * 9))
        conv2 = draws.standard_normal((6, 4, 3, 3)) * np.sqrt(2.0 / (4 * 9))
        assert np.array_equal(m.params['conv1_W'], conv1.astype(np.float32)), whiten
        assert np.array_equal(m.params['conv2_W'], conv2.astype(np.float32)), whiten


@pytest.mark.parametrize('settings', [dict(), dict(widths=[4, 8], convs_per_block=2, batchnorm=True, hidden=6)])
def test_the_levers_off_are_the_model_without_them(rng, settings):
    """Params (values, order, dtype), one loss and its gradients, bit for bit."""
    X, y = images(rng, n=4, side=32, dtype=np.float32)
    a = CNNRNN(seed=5, **settings)
    b = CNNRNN(seed=5, whiten=0, identity_init=False, **settings)
    assert list(a.params) == list(b.params) and a.trained_names() == b.trained_names()
    assert a.decayed_names() == b.decayed_names() and a.layers == b.layers
    assert a.method_backbone == b.method_backbone == (not settings)
    for name in a.params:
        assert a.params[name].dtype == b.params[name].dtype and np.array_equal(a.params[name], b.params[name])
    (la, ga), (lb, gb) = a.loss(X, y, input_grad=True), b.loss(X, y, input_grad=True)
    assert la == lb and list(ga) == list(gb)
    assert all(np.array_equal(ga[k], gb[k]) for k in ga)


# --------------------------------------------------------------------------
# The whitening layer and its filters
# --------------------------------------------------------------------------

@pytest.mark.parametrize('k', [2, 3])
def test_patches_are_the_padded_neighbourhoods_and_the_backward_is_their_adjoint(rng, k):
    x = rng.standard_normal((2, 5, 6, 3))
    patches = M.image_patches(x, k)
    assert patches.shape == (2, 5, 6, 3 * k * k)
    before = (k - 1) // 2                                   # k=3: 1 zero on every side; k=2: bottom, right
    xp = np.pad(x, ((0, 0), (before, k - 1 - before), (before, k - 1 - before), (0, 0)))
    for y0, x0 in ((0, 0), (4, 5), (2, 3)):
        expected = xp[:, y0:y0 + k, x0:x0 + k, :].reshape(2, -1)       # (kh, kw, c), c fastest
        np.testing.assert_array_equal(patches[:, y0, x0], expected)
    inside = patches[:, before:before + 5 - k + 1, before:before + 6 - k + 1]    # patches with no padding
    assert np.array_equal(M.image_patches(x, k, padded=False), inside)
    d = rng.standard_normal(patches.shape)
    assert np.vdot(patches, d) == pytest.approx(np.vdot(x, M.image_patches_backward(d, k, x.shape)), rel=1e-12)


@pytest.mark.parametrize('k', [2, 3])
def test_whitened_patches_have_identity_covariance(rng, k):
    X = correlated_images(rng)
    P = 3 * k * k
    patches = M.image_patches(X.transpose(0, 2, 3, 1), k, padded=False).reshape(-1, P)
    raw = patches.T @ patches / len(patches)
    assert np.abs(raw - np.eye(P)).max() > 1.0              # far from white to start with
    w = M.patch_whitening_weights(X, k)
    assert w.shape == (2 * P, 3, k, k) and w.dtype == np.float64
    np.testing.assert_array_equal(w[P:], -w[:P])
    z = whitened_features(X, w)
    cov = z.T @ z / len(z)
    lam = np.linalg.eigvalsh(raw)[::-1]
    assert lam.min() > 0.1                                  # so lam / (lam + eps) > 0.995
    np.testing.assert_allclose(cov, np.diag(lam / (lam + M.WHITEN_EPS)), atol=1e-10)
    assert np.abs(cov - np.eye(P)).max() < 5e-3
    # Largest eigenvalue first (the shortest filter), each filter's largest entry positive.
    W = w[:P].reshape(P, -1)
    assert np.all(np.diff(np.linalg.norm(W, axis=1)) >= 0)
    assert np.all(W[np.arange(P), np.argmax(np.abs(W), axis=1)] > 0)
    # The padded layer at the border is not white (its zeros are not the images'), but it is not far.
    out, _ = M.whiten_forward(X.transpose(0, 2, 3, 1), w)
    z_all = (out[..., :P] - out[..., P:]).reshape(-1, P)
    assert np.abs(z_all.T @ z_all / len(z_all) - np.eye(P)).max() < 0.5


def test_the_fit_is_deterministic_and_in_place(rng, monkeypatch):
    X = correlated_images(rng, n=40)
    m = CNNRNN(widths=[4, 6], hidden=5, whiten=3)
    held = m.params['whiten_W']
    m.fit_whitening(X)
    assert m.params['whiten_W'] is held and held.dtype == np.float32 and held.any()
    np.testing.assert_array_equal(held, M.patch_whitening_weights(X, 3).astype(np.float32))
    first = held.copy()
    other = CNNRNN(widths=[4, 6], hidden=5, whiten=3, seed=9)
    other.fit_whitening(X.copy())
    m.fit_whitening(X)
    np.testing.assert_array_equal(other.params['whiten_W'], first)
    np.testing.assert_array_equal(m.params['whiten_W'], first)
    # Blocks of images change only the rounding of the second moment (no sign or order flips).
    monkeypatch.setattr(M, 'WHITEN_FIT_CHUNK', 7)
    np.testing.assert_allclose(M.patch_whitening_weights(X, 3).astype(np.float32), first, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match='whiten=2 or 3'):
        CNNRNN(widths=[4, 6], hidden=5).fit_whitening(X)
    with pytest.raises(ValueError, match=re.escape('(N, C, H, W) images')):
        m.fit_whitening(X[0])


def test_the_layer_runs_inside_the_micro_batches_as_on_the_whole_batch(rng, monkeypatch):
    m = perturbed(CNNRNN(batchnorm=True, whiten=2, **SMALL), rng)
    X, y = images(rng, n=7)
    m.fit_whitening(X)
    x = X.transpose(0, 2, 3, 1)
    whitened, _ = M.whiten_forward(x, m.params['whiten_W'])
    monkeypatch.setattr(F, 'CONV_CHUNK', 3)
    for train in (False, True):
        fused, _, _ = M.backbone_forward(x, m.params, m.layers, train, whiten=True)
        plain, _, _ = M.backbone_forward(whitened, m.params, m.layers, train)
        np.testing.assert_allclose(fused, plain, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------
# Frozen: never trained, never decayed, saved
# --------------------------------------------------------------------------

def test_whiten_w_is_frozen(rng):
    m = CNNRNN(batchnorm=True, whiten=2, **SMALL)
    X, y = images(rng)
    m.fit_whitening(X)
    assert M.is_frozen('whiten_W') and not M.is_running_statistic('whiten_W')
    assert 'whiten_W' not in m.trained_names() and 'whiten_W' not in m.decayed_names()
    assert m.trained_names() == [k for k in m.params if not (k == 'whiten_W' or M.is_running_statistic(k))]
    fitted = m.params['whiten_W'].copy()
    opt = SGD(m.params, momentum=0.9, names=m.trained_names())
    average = WeightAverage(m.params, 0.9)
    for _ in range(2):
        loss, grads = m.loss(X, y, input_grad=True)
        assert 'whiten_W' not in grads and sorted(grads) == sorted(m.trained_names() + ['X'])
        del grads['X']
        opt.step(grads, lr=0.1)
        average.update(m.params)
    assert np.array_equal(m.params['whiten_W'], fitted)
    # The weight average carries the fit itself: averaging a constant would round it away.
    assert np.array_equal(average.params['whiten_W'], fitted)
    # The L2 term does not see it: its loss is that of reg's sum over the decayed names only.
    reg_sum = sum(float(np.vdot(m.params[k], m.params[k])) for k in m.decayed_names())
    _, _, details = m.loss(X, y, details=True)
    assert m.loss(X, y)[0] == pytest.approx(details['data_loss'] + 0.5 * m.reg * reg_sum, rel=1e-12)


@pytest.mark.parametrize('k', [2, 3])
@pytest.mark.parametrize('batchnorm', [False, True])
def test_model_gradient_check_through_the_whitening_layer(rng, monkeypatch, k, batchnorm):
    """Every trained parameter (a sample of entries of each) and the input, float64, micro-batches of 2."""
    m = perturbed(CNNRNN(batchnorm=batchnorm, whiten=k, **SMALL), rng)
    X, y = images(rng)
    m.fit_whitening(X)
    monkeypatch.setattr(F, 'CONV_CHUNK', 2)
    check_model_gradients(m, X, y, rng, RTOL)


@pytest.mark.parametrize('k', [2, 3])
def test_layer_input_gradient(rng, k):
    x = rng.standard_normal((2, 5, 4, 3))
    w = rng.standard_normal((6 * k * k, 3, k, k))
    dout = rng.standard_normal((2, 5, 4, 6 * k * k))
    dx = M.whiten_backward(dout, M.whiten_forward(x, w)[1])
    # The layer is piecewise linear, so a central difference is exact unless a step crosses a
    # ReLU kink (none within 1e-4 of these inputs: asserted); a smaller step only adds the
    # round-off of f (~1e-13 over 2h), which depends on the BLAS's summation order.
    z = M.image_patches(x, k).reshape(-1, 3 * k * k) @ M.whiten_matrix(w)
    assert np.abs(z).min() > 1e-3
    idx, num = numeric_gradient(lambda: float(np.vdot(M.whiten_forward(x, w)[0], dout)), x, h=1e-4)
    assert rel_error(num, dx.reshape(-1)[idx]) < 1e-7


# --------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------

def stored(path):
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    return arrays, json.loads(str(arrays['meta']))


def rewrite(path, arrays, meta, out):
    np.savez(out, **dict(arrays, meta=np.array(json.dumps(meta))))
    return out


@pytest.mark.parametrize('k', [2, 3])
def test_save_load_round_trip_keeps_whiten_w(tmp_path, rng, k):
    m = CNNRNN(widths=[8, 16], batchnorm=True, hidden=6, seed=4, whiten=k, identity_init=True)
    X, y = images(rng, n=4, side=32, dtype=np.float32)
    m.fit_whitening(X)
    m.loss(X, y)
    m.save(tmp_path / 'm.npz')
    m2 = CNNRNN.load(tmp_path / 'm.npz', whiten=k, identity_init=True)
    assert m2.config() == m.config() and (m2.whiten, m2.identity_init) == (k, True)
    assert list(m2.params) == list(m.param_shapes())
    for name in m.params:
        assert m2.params[name].dtype == m.params[name].dtype and np.array_equal(m2.params[name], m.params[name]), name
    assert np.array_equal(m2.forward(X), m.forward(X))
    with pytest.raises(ModelFileError, match=f'whiten={k}, not 0'):
        CNNRNN.load(tmp_path / 'm.npz', whiten=0)


def test_an_older_file_has_neither_lever(tmp_path):
    CNNRNN(widths=[4, 6], hidden=8).save(tmp_path / 'old.npz')
    arrays, meta = stored(tmp_path / 'old.npz')
    assert (meta['whiten'], meta['identity_init']) == (0, False)
    del meta['whiten'], meta['identity_init']
    old = CNNRNN.load(rewrite(tmp_path / 'old.npz', arrays, meta, tmp_path / 'old.npz'), whiten=0, identity_init=False)
    assert (old.whiten, old.identity_init) == (0, False) and 'whiten_W' not in old.params


@pytest.mark.parametrize('settings, words', [
    (dict(whiten=1), 'whiten = 1 is not one of [0, 2, 3]'), (dict(whiten=4), 'whiten = 4'),
    (dict(whiten=True), 'whiten = True'), (dict(whiten=2.0), 'whiten = 2.0'), (dict(whiten='2'), "whiten = '2'"),
    (dict(identity_init=1), 'identity_init = 1 is not true or false'),
    (dict(identity_init='yes'), "identity_init = 'yes'")])
def test_bad_settings_are_refused_in_one_sentence(tmp_path, settings, words):
    with pytest.raises(ValueError, match=re.escape(words)) as e:
        CNNRNN(**settings)
    assert '\n' not in str(e.value)
    assert M.conv_init_problem(**{**M.METHOD_CONV_INIT, **settings}) == str(e.value)
    CNNRNN(widths=[4, 6], hidden=8).save(tmp_path / 'm.npz')
    arrays, meta = stored(tmp_path / 'm.npz')
    with pytest.raises(ModelFileError, match=r'invalid model configuration \(' + re.escape(words)):
        CNNRNN.load(rewrite(tmp_path / 'm.npz', arrays, dict(meta, **settings), tmp_path / 'bad.npz'))


def test_a_file_whose_whiten_disagrees_with_its_arrays_is_refused(tmp_path):
    CNNRNN(widths=[4, 6], hidden=8, whiten=2).save(tmp_path / 'w2.npz')
    CNNRNN(widths=[4, 6], hidden=8).save(tmp_path / 'w0.npz')
    cases = [('w2.npz', dict(whiten=3), 'whiten = 3 but whiten_W has shape (24, 3, 2, 2)'),
             ('w2.npz', dict(whiten=0), 'whiten = 0 but whiten_W has shape (24, 3, 2, 2)'),
             ('w0.npz', dict(whiten=2), 'whiten = 2 but whiten_W has shape None')]
    for name, change, words in cases:
        arrays, meta = stored(tmp_path / name)
        with pytest.raises(ModelFileError, match=r'invalid model configuration \(' + re.escape(words)) as e:
            CNNRNN.load(rewrite(tmp_path / name, arrays, dict(meta, **change), tmp_path / 'bad.npz'))
        assert '\n' not in str(e.value)
    # A whiten_W of the right shape beside a conv1 that reads the image itself.
    arrays, meta = stored(tmp_path / 'w0.npz')
    arrays['param/whiten_W'] = np.zeros((24, 3, 2, 2), np.float32)
    with pytest.raises(ModelFileError, match=re.escape('whiten = 2 makes conv1 read 24 channels, but conv1_W has '
                                                       'shape (4, 3, 3, 3)')):
        CNNRNN.load(rewrite(tmp_path / 'w0.npz', arrays, dict(meta, whiten=2), tmp_path / 'bad.npz'))


# --------------------------------------------------------------------------
# Identity (dirac) initialisation
# --------------------------------------------------------------------------

def test_identity_init_replaces_the_first_filters_of_every_widening_conv():
    settings = dict(widths=[4, 8, 6], convs_per_block=2, batchnorm=True, hidden=5, seed=7)
    he, dirac = CNNRNN(**settings), CNNRNN(identity_init=True, **settings)
    assert list(he.params) == list(dirac.params)
    # (O, I): conv1 (4, 3), conv2 (4, 4), conv3 (8, 4), conv4 (8, 8), conv5 (6, 8) I > O, conv6 (6, 6)
    for layer in he.layers:
        name = f'conv{layer.k}_W'
        a, b = he.params[name], dirac.params[name]
        O, I = a.shape[:2]
        if I > O:
            assert np.array_equal(a, b), name
            continue
        identity = np.zeros((I, I, 3, 3))
        identity[np.arange(I), np.arange(I), 1, 1] = 1
        assert np.array_equal(b[:I], identity), name
        assert np.array_equal(b[I:], a[I:]), name            # the He draws, unmoved
    for name in he.params:
        if not name.endswith('_W') or not name.startswith('conv'):
            assert np.array_equal(he.params[name], dirac.params[name]), name
    # An identity conv passes its input through: conv2 (4 -> 4) of a map is the map.
    x = np.random.default_rng(0).standard_normal((2, 6, 6, 4)).astype(np.float32)
    out, _ = M.conv3x3_forward(x, dirac.params['conv2_W'], np.zeros(4, np.float32))
    np.testing.assert_array_equal(out, x)


def test_identity_init_after_whitening_and_on_the_methods_backbone():
    m = CNNRNN(widths=[32, 16], hidden=5, whiten=2, identity_init=True)     # conv1 (32, 24), conv2 (16, 32)
    w1 = m.params['conv1_W']
    assert np.array_equal(w1[:24, :, 1, 1], np.eye(24)) and np.count_nonzero(w1[:24]) == 24
    assert np.array_equal(w1[24:], CNNRNN(widths=[32, 16], hidden=5, whiten=2).params['conv1_W'][24:])
    assert np.array_equal(m.params['conv2_W'], CNNRNN(widths=[32, 16], hidden=5, whiten=2).params['conv2_W'])
    assert not m.params['whiten_W'].any()                                    # not a convolution of the backbone
    method = CNNRNN(identity_init=True)
    assert method.method_backbone and np.array_equal(method.params['conv2_W'][:, :, 1, 1], np.eye(64))
    with pytest.raises(ValueError, match='no more inputs than outputs'):
        M.dirac_init(np.zeros((2, 3, 3, 3)))


# --------------------------------------------------------------------------
# PyTorch as an oracle (skipped without torch)
# --------------------------------------------------------------------------

@pytest.mark.parametrize('k', [2, 3])
def test_the_layer_is_torchs_conv2d_then_relu(rng, k):
    torch = pytest.importorskip('torch')
    X = correlated_images(rng, n=3, side=8)
    w = M.patch_whitening_weights(X, k)
    x = torch.tensor(X)
    # k=3: one zero on every side; k=2: one at the right and the bottom (F.pad's order: left, right, top, bottom).
    padded = torch.nn.functional.pad(x, (0, 1, 0, 1)) if k == 2 else torch.nn.functional.pad(x, (1, 1, 1, 1))
    expected = torch.relu(torch.nn.functional.conv2d(padded, torch.tensor(w))).numpy()
    ours, _ = M.whiten_forward(X.transpose(0, 2, 3, 1), w)
    np.testing.assert_allclose(ours.transpose(0, 3, 1, 2), expected, rtol=1e-10, atol=1e-10)


def test_the_weight_average_keeps_the_fit_exactly_in_float32(rng):
    # d*w + (1-d)*w rounds away from w in float32: an averaged constant would drift.
    m = CNNRNN(whiten=2, **{**SMALL, 'dtype': np.float32})
    m.fit_whitening(images(rng, dtype=np.float32)[0])
    fitted = m.params['whiten_W'].copy()
    average = WeightAverage(m.params, 0.999)
    for _ in range(200):
        average.update(m.params)
    assert np.array_equal(average.params['whiten_W'], fitted)
