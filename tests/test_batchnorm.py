"""Tests of the spatial BatchNorm layer (cnn_rnn_numpy.batchnorm_forward / batchnorm_backward):
numeric gradient checks in both modes, the normalisation and the running statistics by hand,
agreement with PyTorch's nn.BatchNorm2d (skipped without torch), dtypes and memory layout."""
import numpy as np
import pytest

from cnn_rnn_numpy import SUM_BLOCK, batchnorm_backward, batchnorm_forward, channel_sum
from conftest import numeric_gradient, rel_error

RTOL = 1e-7           # bound on the elementwise relative error of every float64 gradient
# Central-difference step. At the usual 1e-5 the rounding of a loss of ~20 (~1e-9 absolute)
# is 4e-7 of the smallest entries of dx (~1e-3); at 1e-4 the truncation error stays ~1e-9
# relative (the layer is smooth on the scale of its inputs' spread, ~1) and rounding drops 10x.
STEP = 1e-4
N, H, W, C = 4, 3, 5, 6


@pytest.fixture
def rng():
    return np.random.default_rng(23)


def layer_inputs(rng, dtype=np.float64):
    """x (N, H, W, C) off-centre and off-scale per channel, gamma, beta, running mean and var."""
    x = rng.standard_normal((N, H, W, C)) * rng.uniform(0.5, 3, C) + rng.uniform(-2, 2, C)
    gamma = rng.uniform(0.5, 2, C) * rng.choice([-1, 1], C)     # a negative scale too
    beta = rng.standard_normal(C)
    running_mean = rng.standard_normal(C) * 0.3
    running_var = rng.uniform(0.5, 2, C)
    return [a.astype(dtype) for a in (x, gamma, beta, running_mean, running_var)]


def channel_stats(x):
    """Per-channel mean, biased and unbiased variance of an NHWC map, written the plain way."""
    per_channel = np.moveaxis(x, -1, 0).reshape(x.shape[-1], -1).astype(np.float64)
    return per_channel.mean(axis=1), per_channel.var(axis=1), per_channel.var(axis=1, ddof=1)


# --------------------------------------------------------------------------
# Numeric gradient checks (float64)
# --------------------------------------------------------------------------

@pytest.mark.parametrize('train', [True, False], ids=['train', 'eval'])
def test_gradients_match_numeric(rng, train):
    x, gamma, beta, rm, rv = layer_inputs(rng)
    dout = rng.standard_normal(x.shape)
    out, cache, _, _ = batchnorm_forward(x, gamma, beta, rm, rv, train)
    dx, dgamma, dbeta = batchnorm_backward(dout, cache)

    def f():
        return float(np.sum(batchnorm_forward(x, gamma, beta, rm, rv, train)[0] * dout))

    for name, a, g in (('dx', x, dx), ('dgamma', gamma, dgamma), ('dbeta', beta, dbeta)):
        assert g.shape == a.shape and g.dtype == np.float64, name
        idx, num = numeric_gradient(f, a, h=STEP)
        assert rel_error(num, g.reshape(-1)[idx]) < RTOL, name


def test_train_gradient_sums_to_zero_per_channel(rng):
    """Shifting a channel of x by a constant does not change the output in train mode,
    so dx sums to zero over (N, H, W); with eps = 0 neither does scaling it, so dx * x_hat does too."""
    x, gamma, beta, rm, rv = layer_inputs(rng)
    out, cache, _, _ = batchnorm_forward(x, gamma, beta, rm, rv, True, eps=0.0)
    dx, _, _ = batchnorm_backward(rng.standard_normal(x.shape), cache)
    np.testing.assert_allclose(dx.sum(axis=(0, 1, 2)), 0, atol=1e-12)
    np.testing.assert_allclose((dx * (out - beta)).sum(axis=(0, 1, 2)), 0, atol=1e-12)


# --------------------------------------------------------------------------
# Forward: normalisation and running statistics by hand
# --------------------------------------------------------------------------

def test_train_output_is_normalised_per_channel(rng):
    x, _, _, rm, rv = layer_inputs(rng)
    out, _, _, _ = batchnorm_forward(x, np.ones(C), np.zeros(C), rm, rv, True, eps=0.0)
    mean, var, _ = channel_stats(out)
    np.testing.assert_allclose(mean, 0, atol=1e-12)
    np.testing.assert_allclose(var, 1, rtol=1e-12)


def test_train_output_and_running_stats_by_hand(rng):
    x, gamma, beta, rm, rv = layer_inputs(rng)
    rm0, rv0 = rm.copy(), rv.copy()
    momentum, eps = 0.3, 1e-3
    out, _, new_mean, new_var = batchnorm_forward(x, gamma, beta, rm, rv, True, momentum=momentum, eps=eps)
    mean, var, var_unbiased = channel_stats(x)
    np.testing.assert_allclose(out, gamma * (x - mean) / np.sqrt(var + eps) + beta, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(new_mean, 0.7 * rm0 + 0.3 * mean, rtol=1e-12)
    np.testing.assert_allclose(new_var, 0.7 * rv0 + 0.3 * var_unbiased, rtol=1e-12)
    # returned, never written in place
    np.testing.assert_array_equal(rm, rm0)
    np.testing.assert_array_equal(rv, rv0)
    assert new_mean is not rm and new_var is not rv


def test_eval_uses_running_stats_and_returns_them_unchanged(rng):
    x, gamma, beta, rm, rv = layer_inputs(rng)
    eps = 1e-3
    out, _, new_mean, new_var = batchnorm_forward(x, gamma, beta, rm, rv, False, eps=eps)
    np.testing.assert_allclose(out, gamma * (x - rm) / np.sqrt(rv + eps) + beta, rtol=1e-12, atol=1e-12)
    assert new_mean is rm and new_var is rv


def test_input_is_not_modified_and_any_layout_of_memory_works(rng):
    x, gamma, beta, rm, rv = layer_inputs(rng)
    x_nchw = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    x_view = x_nchw.transpose(0, 2, 3, 1)       # NHWC values, non-contiguous memory
    x0 = x.copy()
    dout = rng.standard_normal(x.shape)
    for train in (True, False):
        out, cache, m, v = batchnorm_forward(x, gamma, beta, rm, rv, train)
        out_v, cache_v, m_v, v_v = batchnorm_forward(x_view, gamma, beta, rm, rv, train)
        np.testing.assert_allclose(out_v, out, rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(m_v, m, rtol=1e-13)
        np.testing.assert_allclose(v_v, v, rtol=1e-13)
        for g, g_v in zip(batchnorm_backward(dout, cache), batchnorm_backward(dout, cache_v)):
            np.testing.assert_allclose(g_v, g, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(x, x0)


def test_train_mode_refuses_a_single_value_per_channel(rng):
    x = rng.standard_normal((1, 1, 1, C))
    with pytest.raises(ValueError, match='more than one value per channel'):
        batchnorm_forward(x, np.ones(C), np.zeros(C), np.zeros(C), np.ones(C), True)


# --------------------------------------------------------------------------
# dtype
# --------------------------------------------------------------------------

@pytest.mark.parametrize('train', [True, False], ids=['train', 'eval'])
def test_float32_stays_float32_and_agrees_with_float64(rng, train):
    inputs64 = layer_inputs(rng)
    inputs32 = [a.astype(np.float32) for a in inputs64]
    dout = rng.standard_normal(inputs64[0].shape)
    results = {}
    for dtype, inputs in ((np.float32, inputs32), (np.float64, inputs64)):
        out, cache, m, v = batchnorm_forward(*inputs, train)
        grads = batchnorm_backward(dout.astype(dtype), cache)
        for a in (out, m, v) + grads:
            assert a.dtype == dtype
        results[dtype] = (out, m, v) + grads
    for a32, a64 in zip(results[np.float32], results[np.float64]):
        np.testing.assert_allclose(a32, a64, rtol=2e-5, atol=2e-5)



def test_float32_statistics_of_a_large_off_centre_map(rng):
    """Per-channel sums of a float32 map are float32 only within blocks of 64 rows, float64
    across them (channel_sum): NumPy adds the rows of a column reduction one by one, which in
    float32 over all 16k rows of values ~50 +- 1 would shift the mean by ~1e-4 of the spread,
    and the normalised output with it."""
    x = (rng.standard_normal((64, 16, 16, 4)) + 50).astype(np.float32)
    ones, zeros = np.ones(4, np.float32), np.zeros(4, np.float32)
    out, _, m, v = batchnorm_forward(x, ones, zeros, zeros, ones, True, momentum=1.0)
    mean, _, var_unbiased = channel_stats(x)                  # float64, of the same float32 values
    np.testing.assert_allclose(m, mean, rtol=1e-7)
    np.testing.assert_allclose(v, var_unbiased, rtol=1e-6)
    exact = (x - mean) / np.sqrt(channel_stats(x)[1] + 1e-5)
    np.testing.assert_allclose(out, exact, atol=2e-5)

@pytest.mark.parametrize('rows', [64 * 16 * 16, SUM_BLOCK * 3, 48, 7 * 13, 1])
def test_channel_sum_is_float64_accurate_for_any_number_of_rows(rng, rows):
    """Blocks of 64 rows (fewer where 64 does not divide the rows: 16 for 48, 1 for 91, an odd
    number), float32 inside, float64 across: a sum and a product's sum within 1e-7 of the
    float64 sums of the same values, with no float32 partial over more than 64 rows."""
    a = (rng.standard_normal((rows, 5)) + 50).astype(np.float32)
    b = rng.standard_normal((rows, 5)).astype(np.float32)
    exact_a, exact_ab = a.astype(np.float64).sum(0), (a.astype(np.float64) * b).sum(0)
    got_a, got_ab = channel_sum(a), channel_sum(a, b)
    assert got_a.dtype == got_ab.dtype == np.float64 and got_a.shape == (5,)
    np.testing.assert_allclose(got_a, exact_a, rtol=1e-7)
    np.testing.assert_allclose(got_ab, exact_ab, rtol=1e-6, atol=1e-7 * np.abs(a).sum(0).max())
    # Against the float32 column reduction it replaces: at 16k rows that one is ~100x further off.
    if rows == 64 * 16 * 16:
        plain = np.abs(a.sum(0, dtype=np.float32) - exact_a).max()
        assert np.abs(got_a - exact_a).max() * 20 < plain


# --------------------------------------------------------------------------
# PyTorch's nn.BatchNorm2d (NCHW), same weights, three training steps then eval
# --------------------------------------------------------------------------

TORCH_TOL = {np.float64: 1e-12, np.float32: 2e-5}


@pytest.mark.parametrize('dtype', [np.float64, np.float32], ids=['float64', 'float32'])
def test_matches_pytorch_batchnorm2d(rng, dtype):
    torch = pytest.importorskip('torch')
    tol = TORCH_TOL[dtype]
    momentum, eps = 0.1, 1e-5
    _, gamma, beta, rm, rv = layer_inputs(rng, dtype)
    layer = torch.nn.BatchNorm2d(C, eps=eps, momentum=momentum).to(torch.float64 if dtype == np.float64
                                                                     else torch.float32)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(gamma))
        layer.bias.copy_(torch.from_numpy(beta))
        layer.running_mean.copy_(torch.from_numpy(rm))
        layer.running_var.copy_(torch.from_numpy(rv))
    layer.train()

    def close(a, t, name):
        np.testing.assert_allclose(a, t.detach().numpy(), rtol=tol, atol=tol, err_msg=name)

    for step in range(3):
        x = layer_inputs(rng, dtype)[0] * (step + 1)       # batches of different spread
        dout = rng.standard_normal(x.shape).astype(dtype)
        xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).requires_grad_(True)
        layer.zero_grad()
        out_t = layer(xt)
        (out_t * torch.from_numpy(np.ascontiguousarray(dout.transpose(0, 3, 1, 2)))).sum().backward()

        out, cache, rm, rv = batchnorm_forward(x, gamma, beta, rm, rv, True, momentum=momentum, eps=eps)
        dx, dgamma, dbeta = batchnorm_backward(dout, cache)
        close(out.transpose(0, 3, 1, 2), out_t, f'out, step {step}')
        close(dx.transpose(0, 3, 1, 2), xt.grad, f'dx, step {step}')
        close(dgamma, layer.weight.grad, f'dgamma, step {step}')
        close(dbeta, layer.bias.grad, f'dbeta, step {step}')
    close(rm, layer.running_mean, 'running mean after 3 steps')
    close(rv, layer.running_var, 'running var after 3 steps')

    layer.eval()
    x = layer_inputs(rng, dtype)[0]
    out, _, _, _ = batchnorm_forward(x, gamma, beta, rm, rv, False, momentum=momentum, eps=eps)
    with torch.no_grad():
        out_t = layer(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))
    close(out.transpose(0, 3, 1, 2), out_t, 'eval out')
