"""Tests of cnn_rnn_numpy and fast_layers: numeric gradient checks for every
layer and the whole model, the fast kernels against the plain layers and naive
reference implementations, overfitting a tiny batch, float32/float64
agreement, save/load, and the worker-thread count and process settings."""
import errno
import json
import os
import platform
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import cnn_rnn_numpy as M
import fast_layers as F
from cnn_rnn_numpy import CNNRNN, ModelFileError
from conftest import numeric_gradient, rel_error, rel_error_vector, rewrite_model_meta
from optim import SGD, clip_grad_norm
from runfiles import RunFileError

RTOL = 1e-6   # the bound on the relative error of every gradient


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def check_layer(forward, backward, inputs, wrt, rng, dout_seed=0):
    """Gradient check a layer: loss = sum(forward(*inputs) * dout).

    wrt: names (indices into inputs) to check; backward returns grads in the same order.
    """
    out, cache = forward(*inputs)
    dout = np.random.default_rng(dout_seed).standard_normal(out.shape)
    grads = backward(dout, cache)
    if not isinstance(grads, tuple):
        grads = (grads,)
    for k in wrt:
        x = inputs[k]
        idx, num = numeric_gradient(lambda: float(np.sum(forward(*inputs)[0] * dout)), x)
        assert rel_error(num, grads[k].reshape(-1)[idx]) < RTOL, f'input {k}'


def naive_conv(x_nchw, w, b):
    """Reference 3x3 cross-correlation, padding 1, NCHW in and out (frameworks' convention)."""
    N, C, H, W = x_nchw.shape
    xp = np.pad(x_nchw, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((N, w.shape[0], H, W))
    for i in range(3):
        for j in range(3):
            out += np.einsum('nchw,oc->nohw', xp[:, :, i:i + H, j:j + W], w[:, :, i, j])
    return out + b[None, :, None, None]


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# --------------------------------------------------------------------------
# layers
# --------------------------------------------------------------------------

def test_conv_forward_matches_naive_cross_correlation(rng):
    x = rng.standard_normal((2, 5, 6, 4))          # NHWC
    w = rng.standard_normal((3, 4, 3, 3))
    b = rng.standard_normal(3)
    out, _ = M.conv3x3_forward(x, w, b)
    ref = naive_conv(x.transpose(0, 3, 1, 2), w, b).transpose(0, 2, 3, 1)
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)


def test_col2im_is_the_adjoint_of_im2col(rng):
    x = rng.standard_normal((2, 4, 6, 3))
    cols = F.im2col_3x3(x)
    c = rng.standard_normal(cols.shape)
    c_taps = c.reshape(-1, 9, 3).transpose(1, 0, 2)        # tap-major view of the same numbers
    # <im2col(x), c> == <x, col2im(c)> for every x, c  <=>  col2im = im2col^T
    np.testing.assert_allclose(np.vdot(cols, c), np.vdot(x, F.col2im_3x3(c_taps, x.shape)), rtol=1e-12)


def test_pool_order_is_a_row_permutation_of_plain_order(rng):
    x = rng.standard_normal((2, 4, 6, 3))
    plain = F.im2col_3x3(x).reshape(2, 2, 2, 3, 2, 27)       # (n, py, a, px, b, patch)
    pooled = F.im2col_3x3(x, pool_order=True).reshape(2, 2, 2, 2, 3, 27)   # (a, b, n, py, px, patch)
    np.testing.assert_array_equal(pooled, plain.transpose(2, 4, 0, 1, 3, 5))


def test_conv_gradients(rng):
    x = rng.standard_normal((2, 4, 4, 3))
    w = rng.standard_normal((5, 3, 3, 3))
    b = rng.standard_normal(5)
    check_layer(M.conv3x3_forward, M.conv3x3_backward, [x, w, b], wrt=[0, 1, 2], rng=rng)


def test_relu_gradient(rng):
    x = rng.standard_normal((3, 4, 5))
    x[np.abs(x) < 1e-3] = 0.5     # keep away from the kink
    check_layer(M.relu_forward, M.relu_backward, [x], wrt=[0], rng=rng)


def test_maxpool_forward_and_gradient(rng):
    x = rng.standard_normal((2, 4, 6, 3))
    out, _ = M.maxpool2x2_forward(x)
    ref = x.reshape(2, 2, 2, 3, 2, 3).max(axis=(2, 4))
    np.testing.assert_array_equal(out, ref)
    check_layer(M.maxpool2x2_forward, M.maxpool2x2_backward, [x], wrt=[0], rng=rng)


def test_maxpool_ties_do_not_double_the_gradient():
    x = np.zeros((1, 2, 2, 1))            # four equal candidates
    out, cache = M.maxpool2x2_forward(x)
    dx = M.maxpool2x2_backward(np.ones_like(out), cache)
    assert dx.sum() == 1.0 and dx[0, 0, 0, 0] == 1.0
    # Ties between the two bottom members only, and between one top and one bottom member.
    x = np.array([[[[0.], [1.]], [[3.], [3.]]]])
    _, cache = M.maxpool2x2_forward(x)
    dx = M.maxpool2x2_backward(np.ones((1, 1, 1, 1)), cache)
    np.testing.assert_array_equal(dx.reshape(-1), [0, 0, 1, 0])
    x = np.array([[[[2.], [5.]], [[5.], [1.]]]])
    _, cache = M.maxpool2x2_forward(x)
    dx = M.maxpool2x2_backward(np.ones((1, 1, 1, 1)), cache)
    np.testing.assert_array_equal(dx.reshape(-1), [0, 1, 0, 0])


def test_conv_relu_pool_equals_the_chain_of_plain_layers(rng):
    x = rng.standard_normal((3, 6, 4, 2))
    w = rng.standard_normal((4, 2, 3, 3))
    b = rng.standard_normal(4)
    out, cache = F.conv_relu_pool_forward(x, w, b)
    a, c_conv = M.conv3x3_forward(x, w, b)
    r, c_relu = M.relu_forward(a)
    ref, c_pool = M.maxpool2x2_forward(r)
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)
    dout = rng.standard_normal(out.shape)
    dx, dw, db = F.conv_relu_pool_backward(dout, cache)
    rdx, rdw, rdb = M.conv3x3_backward(M.relu_backward(M.maxpool2x2_backward(dout, c_pool), c_relu), c_conv)
    np.testing.assert_allclose(dx, rdx, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dw, rdw, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(db, rdb, rtol=1e-10, atol=1e-12)
    assert F.conv_relu_pool_backward(dout, cache, need_dx=False)[0] is None


def test_conv_relu_pool_gradients(rng):
    x = rng.standard_normal((2, 4, 4, 3))
    w = rng.standard_normal((4, 3, 3, 3))
    b = rng.standard_normal(4)
    check_layer(F.conv_relu_pool_forward, F.conv_relu_pool_backward, [x, w, b], wrt=[0, 1, 2], rng=rng)


def winograd_block_forward(x, w, b):
    """The Winograd block with framework-order weights, as the model runs it (transform, then block)."""
    return F.winograd_relu_pool_forward(x, F.winograd_kernel_transform(w), b)


def winograd_block_backward(dout, cache):
    dx, dU, db = F.winograd_relu_pool_backward(dout, cache)
    return dx, F.winograd_kernel_transform_backward(dU), db


def test_winograd_conv_equals_the_im2col_conv(rng):
    # Several tiles in each direction and channel counts unlike each other, so a
    # swapped axis or a tile misplaced by one cannot pass.
    x = rng.standard_normal((3, 6, 8, 5))
    w = rng.standard_normal((7, 5, 3, 3))
    b = rng.standard_normal(7)
    out, cache = winograd_block_forward(x, w, b)
    ref, ref_cache = F.conv_relu_pool_forward(x, w, b)
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)
    dout = rng.standard_normal(out.shape)
    for got, want in zip(winograd_block_backward(dout, cache), F.conv_relu_pool_backward(dout, ref_cache)):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    assert F.winograd_relu_pool_backward(dout, cache, need_dx=False)[0] is None
    # In float32, as trained, it agrees to float32 rounding.
    x32, w32, b32 = (a.astype(np.float32) for a in (x, w, b))
    out32, _ = winograd_block_forward(x32, w32, b32)
    assert out32.dtype == np.float32
    np.testing.assert_allclose(out32, ref, rtol=1e-4, atol=1e-4)


def test_winograd_transforms_and_their_adjoints(rng):
    # <T(a), c> == <a, T_adjoint(c)> for the input, output and kernel transforms.
    x = rng.standard_normal((2, 4, 6, 3))
    V = F.winograd_input_transform(x)
    c = rng.standard_normal(V.shape)
    np.testing.assert_allclose(np.vdot(V, c), np.vdot(x, F.winograd_input_transform_backward(c, x.shape)),
                               rtol=1e-12)
    m = rng.standard_normal((4, 4, 5, 2))
    Y = F.winograd_output_transform(m)
    dY = rng.standard_normal(Y.shape)
    np.testing.assert_allclose(np.vdot(Y, dY), np.vdot(m, F.winograd_output_transform_backward(dY)), rtol=1e-12)
    w = rng.standard_normal((3, 2, 3, 3))
    U = F.winograd_kernel_transform(w)
    assert U.shape == (4, 4, 2, 3)
    dU = rng.standard_normal(U.shape)
    np.testing.assert_allclose(np.vdot(U, dU), np.vdot(w, F.winograd_kernel_transform_backward(dU)), rtol=1e-12)
    # U = G g G^T for one channel pair, written out.
    np.testing.assert_allclose(U[:, :, 1, 2], F.WINOGRAD_G @ w[2, 1] @ F.WINOGRAD_G.T, rtol=1e-12)


def test_winograd_block_gradients(rng):
    x = rng.standard_normal((2, 4, 4, 3))
    w = rng.standard_normal((4, 3, 3, 3))
    b = rng.standard_normal(4)
    check_layer(winograd_block_forward, winograd_block_backward, [x, w, b], wrt=[0, 1, 2], rng=rng)


def test_signed_sum_and_its_adjoint(rng):
    parts = [rng.standard_normal(5) for _ in range(4)]
    for signs in ([1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 0, 0, -1], [-1, 1, 1, 0], [1, 1, 1, 0]):
        out = F.signed_sum(signs, parts, np.empty(5))
        np.testing.assert_allclose(out, sum(s * p for s, p in zip(signs, parts)), rtol=1e-12)
        acc = np.ones(5)
        F.add_signed(signs, parts, acc)
        np.testing.assert_allclose(acc, 1 + out, rtol=1e-12)


@pytest.mark.parametrize('layout', M.SEQ_LAYOUTS)
def test_sequence_layouts_follow_the_design(rng, layout):
    F_nchw = rng.standard_normal((2, 64, 8, 8))            # (N, channels, rows, cols)
    seq = M.map_to_sequence(np.ascontiguousarray(F_nchw.transpose(0, 2, 3, 1)), layout)
    row, col, ch = 6, 2, 40
    if layout == 'pixels':
        assert seq.shape == (2, 64, 64)
        assert seq[1, row * 8 + col, ch] == F_nchw[1, ch, row, col]
    elif layout == 'rows':
        assert seq.shape == (2, 8, 512)
        assert seq[1, row, col * 64 + ch] == F_nchw[1, ch, row, col]
    elif layout == 'flat':
        assert seq.shape == (2, 1, 4096)
        assert seq[1, 0, row * 512 + col * 64 + ch] == F_nchw[1, ch, row, col]
    else:
        assert seq.shape == (2, 8, 64)
        assert seq[1, row, ch] == F_nchw[1, ch, row, :].max()
    assert M.sequence_length_and_size(layout) == seq.shape[1:]
    F_nhwc = np.ascontiguousarray(F_nchw.transpose(0, 2, 3, 1))
    back = M.sequence_to_map(seq, layout, F_nhwc)
    if layout == 'rowmax':
        # Each row's maximum gets its gradient (here: the maximum itself), every other pixel 0.
        winners = F_nchw == F_nchw.max(axis=3, keepdims=True)
        np.testing.assert_array_equal(back.transpose(0, 3, 1, 2), np.where(winners, F_nchw, 0))
    else:
        np.testing.assert_array_equal(back.transpose(0, 3, 1, 2), F_nchw)
    with pytest.raises(ValueError, match='layout'):
        M.map_to_sequence(F_nchw, 'columns')


def test_rnn_matches_the_recurrence_and_its_gradients(rng):
    N, T, D, H = 3, 5, 4, 6
    x = rng.standard_normal((N, T, D))
    Wx = rng.standard_normal((D, H)) * 0.5
    Wh = rng.standard_normal((H, H)) * 0.5
    b = rng.standard_normal(H)
    h = np.zeros((N, H))
    for t in range(T):
        h = np.tanh(x[:, t] @ Wx + h @ Wh + b)
    h_T, _ = M.rnn_forward(x, Wx, Wh, b)
    np.testing.assert_allclose(h_T, h, rtol=1e-12)
    check_layer(M.rnn_forward, M.rnn_backward, [x, Wx, Wh, b], wrt=[0, 1, 2, 3], rng=rng)


def test_affine_gradients(rng):
    check_layer(M.affine_forward, M.affine_backward,
                [rng.standard_normal((4, 5)), rng.standard_normal((5, 3)), rng.standard_normal(3)],
                wrt=[0, 1, 2], rng=rng)


def test_softmax_loss_value_gradient_and_stability(rng):
    logits = rng.standard_normal((5, 10))
    y = rng.integers(0, 10, 5)
    loss, dlogits = M.softmax_loss(logits, y)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert abs(loss - (-np.log(p[np.arange(5), y]).mean())) < 1e-12
    idx, num = numeric_gradient(lambda: M.softmax_loss(logits, y)[0], logits)
    assert rel_error(num, dlogits.reshape(-1)[idx]) < RTOL
    # P - Y, divided by N
    Y = np.eye(10)[y]
    np.testing.assert_allclose(dlogits, (p - Y) / 5, rtol=1e-10)
    # Huge logits: no overflow, no log(0), the loss of a confident wrong answer is finite.
    big = np.array([[1e4, -1e4, 0.0], [-5e3, 5e3, 1.0]], dtype=np.float32)
    loss, d = M.softmax_loss(big, np.array([1, 1]))
    assert np.isfinite(loss) and np.all(np.isfinite(d))
    assert abs(loss - 1e4) < 1.0
    probs = M.softmax(big)
    assert np.all(np.isfinite(probs)) and np.allclose(probs.sum(1), 1)


# --------------------------------------------------------------------------
# the whole model
# --------------------------------------------------------------------------

def small_batch(rng, n=2, dtype=np.float64):
    X = rng.random((n, 3, 32, 32)).astype(dtype)
    y = rng.integers(0, 10, n)
    return X, y


@pytest.mark.parametrize('layout', M.SEQ_LAYOUTS)
def test_parameter_names_and_shapes(layout):
    m = CNNRNN(seq_layout=layout)
    D = {'pixels': 64, 'rows': 512, 'flat': 4096, 'rowmax': 64}[layout]
    expected = {'conv1_W': (64, 3, 3, 3), 'conv1_b': (64,), 'conv2_W': (64, 64, 3, 3),
                'conv2_b': (64,), 'W_xh': (D, 128), 'W_hh': (128, 128), 'b_h': (128,),
                'W_ho': (128, 10), 'b_o': (10,)}
    assert {k: v.shape for k, v in m.params.items()} == expected
    assert all(v.dtype == np.float32 for v in m.params.values())


# Every layout with every cell, the method's readout; the other readouts on a few of them.
GRADIENT_CASES = ([(layout, cell, 'last') for layout in M.SEQ_LAYOUTS for cell in M.CELLS]
                  + [('rows', 'rnn', 'mean'), ('rows', 'rnn', 'max'), ('pixels', 'gru', 'mean'),
                     ('rows', 'lstm', 'max')])


@pytest.mark.parametrize('layout, cell, readout', GRADIENT_CASES)
def test_model_gradient_check(rng, layout, cell, readout, monkeypatch):
    """Every parameter (a random sample of entries of each) and the input, float64, every cell."""
    m = CNNRNN(seq_layout=layout, hidden=16, reg=0.1, seed=3, dtype=np.float64, cell=cell, readout=readout)
    for name in m.params:           # non-zero biases, so their gradients are exercised too
        if name.endswith('_b') or name.startswith('b_'):
            m.params[name][:] = rng.standard_normal(m.params[name].shape) * 0.1
    X, y = small_batch(rng)
    monkeypatch.setattr(F, 'CONV_CHUNK', 1)   # also exercises the micro-batch accumulation
    _, grads = m.loss(X, y, input_grad=True)
    for name, arr in list(m.params.items()) + [('X', X)]:
        sample = rng.choice(arr.size, size=min(arr.size, 12), replace=False)
        # h = 1e-6: a conv bias moves every pre-activation of its channel, and at
        # 1e-5 one of them crossed a ReLU/max-pool kink for the GRU sample.
        idx, num = numeric_gradient(lambda: m.loss(X, y)[0], arr, indices=sample, h=1e-6)
        err = rel_error_vector(num, grads[name].reshape(-1)[idx])
        assert err < RTOL, f'{cell} {layout} {readout} {name}: relative error {err:.2e}'
        assert np.max(np.abs(num)) > 1e-6, f'{cell} {layout} {readout} {name}: the check sampled only zero gradients'


def test_flat_layout_is_one_hidden_layer_without_recurrence(rng):
    """'flat': the pooled map as one step of 4096 features, h = tanh(x @ W_xh + b_h), W_hh unused."""
    X, y = small_batch(rng, n=3)
    m = CNNRNN(seq_layout='flat', hidden=16, reg=0.0, seed=1, dtype=np.float64)
    m.params['b_h'][:] = rng.standard_normal(16) * 0.1
    fmap, _ = F.conv_stack_forward(X.transpose(0, 2, 3, 1), m.params)        # (N, 8, 8, 64)
    h = np.tanh(fmap.reshape(3, 4096) @ m.params['W_xh'] + m.params['b_h'])
    np.testing.assert_allclose(m.features(X), h, rtol=1e-12, atol=1e-12)
    _, grads = m.loss(X, y)
    assert np.all(grads['W_hh'] == 0)           # h_0 = 0: the data never reaches W_hh
    m.reg = 0.1
    _, grads = m.loss(X, y)
    np.testing.assert_allclose(grads['W_hh'], 0.1 * m.params['W_hh'], rtol=1e-12)   # only L2 acts on it


def test_l2_is_in_the_loss_and_gradients_as_designed(rng):
    X, y = small_batch(rng)
    m0 = CNNRNN(reg=0.0, dtype=np.float64, seed=5)
    m1 = CNNRNN(reg=0.3, dtype=np.float64, seed=5)
    l0, g0 = m0.loss(X, y)
    l1, g1 = m1.loss(X, y)
    sq = sum(np.sum(m1.params[k] ** 2) for k in M.DECAYED_PARAMS)
    assert l1 - l0 == pytest.approx(0.15 * sq, rel=1e-10)
    for k in m1.params:
        expected = g0[k] + (0.3 * m1.params[k] if k in M.DECAYED_PARAMS else 0)
        np.testing.assert_allclose(g1[k], expected, rtol=1e-10, atol=1e-14)


def test_float32_and_float64_agree(rng):
    X, y = small_batch(rng, n=8, dtype=np.float32)
    m32 = CNNRNN(seq_layout='pixels', seed=7)
    m64 = CNNRNN(seq_layout='pixels', seed=7, dtype=np.float64)
    m64.params = {k: v.astype(np.float64) for k, v in m32.params.items()}
    l32, g32 = m32.loss(X, y)
    l64, g64 = m64.loss(X.astype(np.float64), y)
    assert l32 == pytest.approx(l64, rel=1e-5)
    for k in g32:
        assert g32[k].dtype == np.float32
        scale = np.abs(g64[k]).max() + 1e-12
        assert np.abs(g32[k] - g64[k]).max() / scale < 1e-4, k


def test_micro_batch_size_does_not_change_the_result(rng, monkeypatch):
    X, y = small_batch(rng, n=10)
    m = CNNRNN(dtype=np.float64, seed=2)
    l_a, g_a = m.loss(X, y)
    monkeypatch.setattr(F, 'CONV_CHUNK', 3)
    l_b, g_b = m.loss(X, y)
    assert l_a == pytest.approx(l_b, rel=1e-12)
    for k in g_a:
        np.testing.assert_allclose(g_a[k], g_b[k], rtol=1e-10, atol=1e-15)


def test_forward_features_and_predict_proba_agree_with_loss(rng):
    X, y = small_batch(rng, n=7, dtype=np.float32)
    m = CNNRNN(seq_layout='rows', seed=4, reg=0.0)
    logits = m.forward(X)
    loss, _ = m.loss(X, y)
    assert M.softmax_loss(logits, y)[0] == pytest.approx(loss, rel=1e-6)
    probs, feats = m.predict_proba(X, batch_size=3, return_features=True)
    np.testing.assert_allclose(probs, M.softmax(logits), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(feats, m.features(X), rtol=1e-5, atol=1e-6)
    h = feats
    np.testing.assert_allclose(h @ m.params['W_ho'] + m.params['b_o'], logits, rtol=1e-4, atol=1e-5)
    assert probs.shape == (7, 10) and feats.shape == (7, 128)


def test_initialisation(rng):
    m = CNNRNN(seq_layout='pixels', rnn_init='orthogonal', seed=0)
    W = m.params['W_hh'].astype(np.float64)
    np.testing.assert_allclose(W @ W.T, np.eye(128), atol=1e-5)
    assert np.std(m.params['conv2_W']) == pytest.approx(np.sqrt(2 / 576), rel=0.05)       # He
    assert np.std(m.params['W_xh']) == pytest.approx(np.sqrt(2 / (64 + 128)), rel=0.05)   # Xavier
    assert np.all(m.params['b_h'] == 0)
    x = CNNRNN(rnn_init='xavier', seed=0).params['W_hh']
    assert np.std(x) == pytest.approx(np.sqrt(1 / 128), rel=0.05)
    # Seeded: the same seed gives the same parameters, another seed others.
    assert np.array_equal(CNNRNN(seed=0).params['W_xh'], m.params['W_xh'])
    assert not np.array_equal(CNNRNN(seed=1).params['W_xh'], m.params['W_xh'])
    with pytest.raises(ValueError, match='rnn_init'):
        CNNRNN(rnn_init='identity')


# Every layout with the method's cell, every cell and readout with the rows (the gradient checks
# cover every pairing; memorising is slow with 64 steps of a gated cell, so not every pairing here).
OVERFIT_CASES = ([(layout, 'rnn', 'last') for layout in M.SEQ_LAYOUTS]
                 + [('rows', cell, 'last') for cell in M.CELLS if cell != 'rnn']
                 + [('rows', 'rnn', readout) for readout in M.READOUTS if readout != 'last'])


@pytest.mark.parametrize('layout, cell, readout', OVERFIT_CASES)
def test_overfits_a_tiny_batch(layout, cell, readout):
    """64 random images with random labels are memorised to 100% training accuracy."""
    rng = np.random.default_rng(0)
    X = rng.random((64, 3, 32, 32), dtype=np.float32)
    y = rng.integers(0, 10, 64)
    m = CNNRNN(seq_layout=layout, reg=0.0, seed=0, cell=cell, readout=readout)
    opt = SGD(m.params, momentum=0.9)
    for step in range(300):
        _, grads = m.loss(X, y)
        clip_grad_norm(grads, 5.0)
        opt.step(grads, lr=0.02)
        if step % 10 == 9 and (m.forward(X).argmax(1) == y).mean() == 1.0:
            break
    assert (m.forward(X).argmax(1) == y).mean() == 1.0


# --------------------------------------------------------------------------
# save / load
# --------------------------------------------------------------------------

def test_save_load_round_trip(tmp_path, rng):
    m = CNNRNN(seq_layout='rows', hidden=32, reg=1e-3, seed=9, rnn_init='xavier')
    path = tmp_path / 'model.npz'
    m.save(path)
    m2 = CNNRNN.load(path)
    assert m2.config() == m.config()
    for k in m.params:
        assert m2.params[k].dtype == m.params[k].dtype
        np.testing.assert_array_equal(m2.params[k], m.params[k])
    X, _ = small_batch(rng, n=3, dtype=np.float32)
    np.testing.assert_array_equal(m2.forward(X), m.forward(X))
    assert not any(p.name.startswith('model.npz.tmp') for p in tmp_path.iterdir())


def test_load_errors_name_the_problem(tmp_path):
    m = CNNRNN(seq_layout='pixels')
    good = tmp_path / 'good.npz'
    m.save(good)
    with pytest.raises(ModelFileError, match="seq_layout='pixels'"):
        CNNRNN.load(good, seq_layout='rows')
    with pytest.raises(ModelFileError, match='does not exist'):
        CNNRNN.load(tmp_path / 'missing.npz')
    truncated = tmp_path / 'truncated.npz'
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(ModelFileError, match='corrupt or truncated'):
        CNNRNN.load(truncated)
    garbage = tmp_path / 'garbage.npz'
    garbage.write_bytes(b'not a zip file at all')
    with pytest.raises(ModelFileError, match='corrupt or truncated'):
        CNNRNN.load(garbage)
    # A file whose arrays do not fit the configuration it declares.
    arrays = dict(np.load(good))
    arrays['param/W_xh'] = np.zeros((512, 128), np.float32)
    bad_shape = tmp_path / 'bad_shape.npz'
    np.savez(bad_shape, **arrays)
    with pytest.raises(ModelFileError, match=r'W_xh has shape \(512, 128\).*needs \(64, 128\)'):
        CNNRNN.load(bad_shape)
    arrays = dict(np.load(good))
    del arrays['param/b_o']
    missing = tmp_path / 'missing_param.npz'
    np.savez(missing, **arrays)
    with pytest.raises(ModelFileError, match='missing'):
        CNNRNN.load(missing)
    arrays = dict(np.load(good))
    meta = json.loads(str(arrays['meta']))
    meta['format_version'] = 99
    arrays['meta'] = np.array(json.dumps(meta))
    future = tmp_path / 'future.npz'
    np.savez(future, **arrays)
    with pytest.raises(ModelFileError, match='format version 99'):
        CNNRNN.load(future)
    no_meta = tmp_path / 'plain.npz'
    np.savez(no_meta, a=np.zeros(3))
    with pytest.raises(ModelFileError, match='no model metadata'):
        CNNRNN.load(no_meta)


@pytest.mark.parametrize('readout', ('mean', 'max'))
def test_files_record_the_readout(tmp_path, rng, readout):
    """The readout is in the file; a file without one (written before it existed) reads h_T."""
    m = CNNRNN(seq_layout='rows', hidden=8, seed=4, readout=readout)
    X, _ = small_batch(rng, n=3, dtype=np.float32)
    # What the head reads is what features() returns, the same parameters as the method's.
    np.testing.assert_allclose(m.forward(X), m.features(X) @ m.params['W_ho'] + m.params['b_o'], rtol=1e-5)
    assert {k: v.shape for k, v in m.params.items()} == CNNRNN(seq_layout='rows', hidden=8).param_shapes()
    m.save(tmp_path / 'model.npz')
    loaded = CNNRNN.load(tmp_path / 'model.npz')
    assert loaded.readout == readout and loaded.config() == m.config()
    np.testing.assert_array_equal(loaded.forward(X), m.forward(X))
    with pytest.raises(M.ModelFileError, match=f"readout='{readout}', not 'last'"):
        CNNRNN.load(tmp_path / 'model.npz', readout='last')
    # A file written before the key: no 'readout' in its metadata.
    old = CNNRNN.load(rewrite_model_meta(tmp_path / 'model.npz', tmp_path / 'old.npz', drop=['readout']),
                      readout='last')
    method = CNNRNN(seq_layout='rows', hidden=8, seed=4)
    method.set_params(m.params)
    assert old.readout == 'last'
    np.testing.assert_array_equal(old.features(X), method.features(X))
    assert not np.allclose(old.features(X), m.features(X))
    # A damaged readout in the metadata is refused with the file's name and the fix.
    bad = rewrite_model_meta(tmp_path / 'model.npz', tmp_path / 'bad.npz', readout='sum')
    with pytest.raises(M.ModelFileError, match=r"bad.npz has an invalid model configuration \(readout = 'sum', "
                                               r"not one of \['last', 'mean', 'max'\]\)"):
        CNNRNN.load(bad)
    with pytest.raises(ValueError, match="unknown readout 'sum'"):
        CNNRNN(readout='sum')


def test_save_is_atomic_and_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    m = CNNRNN()
    path = tmp_path / 'm.npz'
    m.save(path)
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(np, 'savez', boom)
    with pytest.raises(RunFileError, match='no space left'):
        CNNRNN(seed=1).save(path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ['m.npz']
    assert zipfile.is_zipfile(path)


def test_bptt_flushes_values_that_would_become_subnormal():
    """Saturated tanh units make BPTT gradients underflow; subnormal floats are ~100x
    slower on x86, so rnn_backward flushes them (and a margin above) to zero."""
    rng = np.random.default_rng(0)
    N, T, D, H = 64, 64, 8, 32
    x = rng.standard_normal((N, T, D)).astype(np.float32)
    Wx = (rng.standard_normal((D, H)) * 3).astype(np.float32)      # saturating inputs
    Wh = (rng.standard_normal((H, H)) * 0.5).astype(np.float32)
    b = np.zeros(H, np.float32)
    _, cache = M.rnn_forward(x, Wx, Wh, b)
    dh = np.full((N, H), 1e-20, np.float32)
    dx, dWx, dWh, db = M.rnn_backward(dh, cache)
    tiny = np.finfo(np.float32).tiny
    for g in (dx, dWx, dWh, db):
        a = np.abs(g)
        assert not np.any((a > 0) & (a < tiny))
    # The flush only removes what is negligible: float64 gives the same gradients.
    cache64 = tuple(c.astype(np.float64) for c in cache)
    dx64, dWx64, _, _ = M.rnn_backward(dh.astype(np.float64), cache64)
    np.testing.assert_allclose(dWx, dWx64, rtol=1e-3, atol=1e-9)
    # And the case really underflows without the flush.
    x_tm, hs, _, _ = cache
    d = dh
    smallest = np.inf
    for t in range(T - 1, -1, -1):
        d = (d * (1 - hs[t + 1] ** 2)) @ Wh.T
        nz = np.abs(d[d != 0])
        smallest = min(smallest, nz.min() if nz.size else np.inf)
    assert smallest < tiny


# --------------------------------------------------------------------------
# worker threads: the CPUs this process may use, CNNRNN_THREADS, process settings
# --------------------------------------------------------------------------

@pytest.fixture
def machine(tmp_path, monkeypatch):
    """A fake machine: CPU affinity and cgroup files under tmp_path, no CNNRNN_THREADS.

    Returns set_up(affinity=None, membership=None, files=None): each call changes what it is given
    (affinity: a number of CPUs; membership: the text of /proc/self/cgroup; files: {path under
    the cgroup root: text}).
    """
    monkeypatch.delenv(F.THREADS_ENV, raising=False)
    monkeypatch.setattr(F, 'CGROUP_ROOT', str(tmp_path / 'cgroup'))
    monkeypatch.setattr(F, 'PROC_SELF_CGROUP', str(tmp_path / 'proc_self_cgroup'))

    def set_up(affinity=None, membership=None, files=None):
        if affinity is not None:
            monkeypatch.setattr(F.os, 'sched_getaffinity', lambda pid: set(range(affinity)), raising=False)
        if membership is not None:
            (tmp_path / 'proc_self_cgroup').write_text(membership)
        for rel, text in (files or {}).items():
            path = tmp_path / 'cgroup' / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    return set_up


def test_usable_cpus_is_the_affinity_without_a_quota(machine):
    machine(affinity=3)                                        # no cgroup files at all
    assert F.usable_cpus() == 3 and F.cgroup_cpu_limit() is None
    machine(affinity=3, membership='0::/\n', files={'cpu.max': 'max 100000\n'})
    assert F.usable_cpus() == 3 and F.cgroup_cpu_limit() is None


@pytest.mark.parametrize('cpu_max, expected', [('150000 100000', 2), ('200000 100000', 2),
                                               ('50000 100000', 1), ('1000 100000', 1),
                                               ('600000 100000', 6), ('250000 50000', 5)])
def test_a_cgroup_v2_quota_caps_the_affinity_rounded_up(machine, cpu_max, expected):
    machine(affinity=8, membership='0::/\n', files={'cpu.max': cpu_max + '\n'})
    assert F.cgroup_cpu_limit() == expected
    assert F.usable_cpus() == expected
    machine(affinity=1)                                        # the affinity can be the smaller one
    assert F.usable_cpus() == 1


def test_the_quota_of_the_process_cgroup_and_its_ancestors_applies(machine):
    # A quota two levels up, none on the process's own cgroup: the ancestor's applies.
    machine(affinity=16, membership='0::/runs/sweep/run3\n',
            files={'runs/cpu.max': '400000 100000', 'runs/sweep/run3/cpu.max': 'max 100000',
                   'other/cpu.max': '100000 100000'})
    assert F.usable_cpus() == 4
    # A smaller one on the process's own cgroup wins.
    machine(files={'runs/sweep/run3/cpu.max': '300000 100000'})
    assert F.usable_cpus() == 3


def test_a_cgroup_v1_quota(machine):
    machine(affinity=8, membership='5:cpu,cpuacct:/job\n4:memory:/job\n',
            files={'cpu,cpuacct/job/cpu.cfs_quota_us': '250000', 'cpu,cpuacct/job/cpu.cfs_period_us': '100000'})
    assert F.usable_cpus() == 3
    machine(files={'cpu,cpuacct/job/cpu.cfs_quota_us': '-1'})      # -1: no quota
    assert F.usable_cpus() == 8
    # Inside a container /proc names a cgroup the container cannot see; its own is the mount root.
    machine(membership='5:cpu,cpuacct:/docker/abc\n',
            files={'cpu/cpu.cfs_quota_us': '100000', 'cpu/cpu.cfs_period_us': '100000'})
    assert F.usable_cpus() == 1


def test_unreadable_cgroup_values_mean_no_quota(machine):
    machine(affinity=4, membership='garbage\n0::/\n', files={'cpu.max': 'lots of cpus'})
    assert F.usable_cpus() == 4
    machine(files={'cpu.max': '0 100000'})
    assert F.usable_cpus() == 4


def test_cnnrnn_threads_overrides_and_bad_values_name_the_fix(machine, monkeypatch):
    machine(affinity=2)
    assert F.worker_threads() == 2
    monkeypatch.setenv('CNNRNN_THREADS', '5')
    assert F.worker_threads() == 5                     # more than the CPUs is allowed: it is an override
    monkeypatch.setenv('CNNRNN_THREADS', ' ')
    assert F.worker_threads() == 2                     # empty counts as unset
    for bad in ('0', '-1', '2.5', 'two', '1e3'):
        monkeypatch.setenv('CNNRNN_THREADS', bad)
        with pytest.raises(ValueError, match=rf"CNNRNN_THREADS='{re.escape(bad)}' is not a positive "
                                             rf"integer.*e\.g\. CNNRNN_THREADS=2 .*or unset it"):
            F.worker_threads()
        with pytest.raises(F.ThreadSettingError):
            F.prepare_process_for_training()            # refused before anything is changed
    assert F.worker_threads({'CNNRNN_THREADS': '3'}) == 3


def test_the_thread_count_is_decided_once(machine, monkeypatch):
    machine(affinity=2)
    monkeypatch.setattr(F, 'THREADS', None)
    monkeypatch.setenv('CNNRNN_THREADS', '3')
    assert F.thread_count() == 3 and F.THREADS == 3
    monkeypatch.setenv('CNNRNN_THREADS', '1')
    assert F.thread_count() == 3


@pytest.mark.parametrize('threads', [0, -2, 2.0, True, '2'])
def test_prepare_refuses_a_bad_thread_count(threads):
    with pytest.raises(F.ThreadSettingError, match='threads must be a positive integer'):
        F.prepare_process_for_training(threads)


def test_the_thread_count_changes_only_rounding(rng, monkeypatch):
    X, y = small_batch(rng, n=7)
    m = CNNRNN(seq_layout='rows', hidden=16, dtype=np.float64, seed=2, cell='gru')
    results = []
    for threads in (1, 3):
        monkeypatch.setattr(F, 'THREADS', threads)
        results.append(m.loss(X, y))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-12)
    for k in results[0][1]:
        np.testing.assert_allclose(results[0][1][k], results[1][1][k], rtol=1e-10, atol=1e-15)


def run_python(code, **env):
    """Run ``code`` in a fresh interpreter in the repository; returns its stdout's last line as JSON."""
    environ = {k: v for k, v in os.environ.items() if k != 'CNNRNN_THREADS'}
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                         env={**environ, **env}, cwd=Path(__file__).resolve().parent.parent).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_importing_the_model_changes_no_process_setting():
    code = '''if True:
        import ctypes, json
        calls = []
        real = ctypes.CDLL
        ctypes.CDLL = lambda name, *a, **k: (calls.append(str(name)), real(name, *a, **k))[1]
        import numpy
        from threadpoolctl import threadpool_info
        before = [i['num_threads'] for i in threadpool_info()]
        calls.clear()
        import cnn_rnn_numpy, fast_layers
        libc = [c for c in calls if 'libc' in c]
        after = [i['num_threads'] for i in threadpool_info()]
        print(json.dumps({'libc': libc, 'blas': before == after,
                          'threads': fast_layers.THREADS}))
    '''
    assert run_python(code) == {'libc': [], 'blas': True, 'threads': None}


def test_prepare_sets_threads_blas_and_the_allocator():
    code = '''if True:
        import json, fast_layers
        from threadpoolctl import threadpool_info
        s = fast_layers.prepare_process_for_training()
        print(json.dumps({'threads': s.threads, 'from': s.threads_from, 'module': fast_layers.THREADS,
                          'blas': sorted({i['num_threads'] for i in threadpool_info()}),
                          'reported': sorted(set(s.blas_threads.values())), 'tuned': s.allocator_tuned,
                          'line': str(s)}))
    '''
    got = run_python(code, CNNRNN_THREADS='1')
    assert (got['threads'], got['from'], got['module']) == (1, 'CNNRNN_THREADS', 1)
    assert got['blas'] in ([], [1]) and got['reported'] == got['blas']
    assert got['line'].startswith('1 worker thread (from CNNRNN_THREADS')
    if sys.platform.startswith('linux') and platform.libc_ver()[0] == 'glibc':
        assert got['tuned'] is True
