"""Tests of the recurrent cells, every one registered in cnn_rnn_numpy.CELL_TABLE:
numeric gradient checks, a naive reference recurrence, agreement with PyTorch's
nn.RNN / nn.GRU / nn.LSTM, no subnormals, and the cells inside CNNRNN (shapes,
initialisation, files). The tests loop over the table, so a new cell is
tested as soon as it is registered."""
import numpy as np
import pytest

import cnn_rnn_numpy
from cnn_rnn_numpy import CELL_TABLE, CELLS, sigmoid
from conftest import numeric_gradient, rel_error, rel_error_vector, rewrite_model_meta

RTOL = 1e-6   # the bound on the elementwise relative error of every gradient
N, T, D, H = 3, 5, 4, 6
ERRORS = {}   # largest error per check, printed at the end with -s


def numeric_gradient_extrapolated(f, x, h=2e-3):
    """Central differences at steps h and h/2 combined by Richardson extrapolation.

    A plain central difference at h = 1e-5 has ~1e-11 of rounding noise; over
    five gated steps some entries of dx are ~1e-5, so their elementwise relative
    error reaches 1e-6 even for exact gradients (it did for 1 in 3 seeds).
    (4 D(h/2) - D(h)) / 3 cancels the h^2 term, so a larger h (less rounding)
    is accurate to ~1e-8 relative here.
    """
    _, coarse = numeric_gradient(f, x, h=h)
    idx, fine = numeric_gradient(f, x, h=h / 2)
    return idx, (4 * fine - coarse) / 3


def ref_sigmoid(x):
    return 1 / (1 + np.exp(-x))


def cell_inputs(cell, rng, dtype=np.float64):
    """[x (N, T, D), then the cell's params in its ``names`` order], random, from the table's shapes.

    Weights are scaled by 0.5 and biases are standard normal, so gates sit far from 0.5.
    """
    shapes = CELL_TABLE[cell].shapes(D, H)
    inputs = [rng.standard_normal((N, T, D))]
    for name in CELL_TABLE[cell].names:
        scale = 0.5 if name.startswith('W') else 1.0
        inputs.append(rng.standard_normal(shapes[name]) * scale)
    return [a.astype(dtype) for a in inputs]


def naive_rnn(x, Wx, Wh, b):
    h = np.zeros((x.shape[0], Wh.shape[0]))
    for t in range(x.shape[1]):
        h = np.tanh(x[:, t] @ Wx + h @ Wh + b)
    return h


def naive_gru(x, Wx, Wh, b, bhn):
    h = np.zeros((x.shape[0], Wh.shape[0]))
    for t in range(x.shape[1]):
        a = x[:, t] @ Wx + b
        g = h @ Wh
        ar, az, an = np.split(a, 3, axis=1)
        gr, gz, gn = np.split(g, 3, axis=1)
        r, z = ref_sigmoid(ar + gr), ref_sigmoid(az + gz)
        n = np.tanh(an + r * (gn + bhn))
        h = (1 - z) * n + z * h
    return h


def naive_lstm(x, Wx, Wh, b):
    h = np.zeros((x.shape[0], Wh.shape[0]))
    c = np.zeros_like(h)
    for t in range(x.shape[1]):
        ai, af, ag, ao = np.split(x[:, t] @ Wx + h @ Wh + b, 4, axis=1)
        c = ref_sigmoid(af) * c + ref_sigmoid(ai) * np.tanh(ag)
        h = ref_sigmoid(ao) * np.tanh(c)
    return h


# The documented recurrence of each cell (README and DESIGN.md), written the plain way.
NAIVE = {'rnn': naive_rnn, 'gru': naive_gru, 'lstm': naive_lstm}


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(scope='module', autouse=True)
def report_errors():
    yield
    for k, v in ERRORS.items():
        print(f'{k}: {v:.2e}')


def test_sigmoid_is_the_logistic_function_and_does_not_overflow():
    x = np.linspace(-30, 30, 1001)
    np.testing.assert_allclose(sigmoid(x), ref_sigmoid(x), rtol=1e-14, atol=1e-15)
    with np.errstate(all='raise'):
        big = np.array([-1e30, -1000, -100, 0, 100, 1000, 1e30], np.float32)
        s = sigmoid(big)
    assert s.dtype == np.float32
    np.testing.assert_array_equal(s, [0, 0, 0, 0.5, 1, 1, 1])
    out = big.copy()
    assert sigmoid(out, out=out) is out and np.array_equal(out, s)
    # never within eps/4 of 0 or 1 without being exactly 0 or 1: sigma (1 - sigma)
    # cannot become a (slow) subnormal number
    s = sigmoid(np.linspace(-40, 40, 200001, dtype=np.float32))
    gap = np.minimum(s, 1 - s)
    assert np.all((gap == 0) | (gap >= np.finfo(np.float32).eps / 4))


def test_the_table_is_the_only_list_of_cells():
    assert CELLS == tuple(CELL_TABLE)
    assert cnn_rnn_numpy.CELL_GATES == {name: cell.gates for name, cell in CELL_TABLE.items()}
    for name, cell in CELL_TABLE.items():
        assert cell.names[:3] == ('W_xh', 'W_hh', 'b_h')
        assert cell.gate_bias is None or len(cell.gate_bias) == cell.gates, name


@pytest.mark.parametrize('cell', CELLS)
def test_forward_matches_the_naive_recurrence(rng, cell):
    if cell not in NAIVE:
        pytest.skip(f'no naive reference recurrence for {cell!r} yet: add one to NAIVE')
    fwd = CELL_TABLE[cell].forward
    inputs = cell_inputs(cell, rng)
    h_T, _ = fwd(*inputs)
    np.testing.assert_allclose(h_T, NAIVE[cell](*inputs), rtol=1e-12, atol=1e-14)
    # dtype follows the inputs
    h32, cache32 = fwd(*[a.astype(np.float32) for a in inputs])
    assert h32.dtype == np.float32
    assert all(c.dtype == np.float32 for c in cache32 if isinstance(c, np.ndarray))
    np.testing.assert_allclose(h32, h_T, atol=1e-5)


@pytest.mark.parametrize('seed', [0, 1, 2])
@pytest.mark.parametrize('cell', CELLS)
def test_gradients_match_central_differences(cell, seed):
    fwd, bwd = CELL_TABLE[cell].forward, CELL_TABLE[cell].backward
    rng = np.random.default_rng(seed)
    inputs = cell_inputs(cell, rng)
    h_T, cache = fwd(*inputs)
    dh = rng.standard_normal(h_T.shape)
    dh_copy = dh.copy()
    grads = bwd(dh, cache)
    assert len(grads) == len(inputs)
    # backward changes neither its upstream gradient nor the cache (it can run twice)
    np.testing.assert_array_equal(dh, dh_copy)
    for g, g2 in zip(grads, bwd(dh, cache)):
        np.testing.assert_array_equal(g, g2)
    names = ('x',) + CELL_TABLE[cell].names
    for k, (a, g) in enumerate(zip(inputs, grads)):
        assert g.shape == a.shape and g.dtype == np.float64
        idx, num = numeric_gradient_extrapolated(lambda: float(np.sum(fwd(*inputs)[0] * dh)), a)
        err = rel_error(num, g.reshape(-1)[idx])
        key = f'numeric {cell} d{names[k]}'
        ERRORS[key] = max(err, ERRORS.get(key, 0))
        assert err < RTOL, names[k]


# --------------------------------------------------------------------------
# PyTorch's nn.RNN / nn.GRU / nn.LSTM, mapped as the README states
# --------------------------------------------------------------------------

TORCH_LAYERS = {'rnn': 'RNN', 'gru': 'GRU', 'lstm': 'LSTM'}   # cell -> torch.nn class name


def torch_layer(cell, rng):
    torch = pytest.importorskip('torch')
    if cell not in TORCH_LAYERS:
        pytest.skip(f'no PyTorch counterpart of {cell!r}')
    layer = getattr(torch.nn, TORCH_LAYERS[cell])(D, H, batch_first=True).double()
    with torch.no_grad():
        for p in layer.parameters():     # random, far from the default init
            p.copy_(torch.from_numpy(rng.standard_normal(tuple(p.shape)) * 0.7))
    return torch, layer


def torch_to_numpy_params(cell, layer):
    w_ih = layer.weight_ih_l0.detach().numpy()
    w_hh = layer.weight_hh_l0.detach().numpy()
    b_ih = layer.bias_ih_l0.detach().numpy()
    b_hh = layer.bias_hh_l0.detach().numpy()
    if cell != 'gru':
        return [w_ih.T.copy(), w_hh.T.copy(), b_ih + b_hh]     # both biases add
    b_h = b_ih.copy()
    b_h[:2 * H] += b_hh[:2 * H]          # r and z parts of bias_hh fold in
    return [w_ih.T.copy(), w_hh.T.copy(), b_h, b_hh[2 * H:].copy()]


@pytest.mark.parametrize('cell', CELLS)
def test_matches_pytorch(rng, cell):
    torch, layer = torch_layer(cell, rng)
    fwd, bwd = CELL_TABLE[cell].forward, CELL_TABLE[cell].backward
    x = rng.standard_normal((N, T, D))
    dh = rng.standard_normal((N, H))

    xt = torch.from_numpy(x).requires_grad_(True)
    out, _ = layer(xt)
    h_torch = out[:, -1]
    (h_torch * torch.from_numpy(dh)).sum().backward()

    params = torch_to_numpy_params(cell, layer)
    h_T, cache = fwd(x, *params)
    grads = bwd(dh, cache)

    errs = {'h_T': np.max(np.abs(h_T - h_torch.detach().numpy())),
            'dx': np.max(np.abs(grads[0] - xt.grad.numpy())),
            'dW_xh': np.max(np.abs(grads[1] - layer.weight_ih_l0.grad.numpy().T)),
            'dW_hh': np.max(np.abs(grads[2] - layer.weight_hh_l0.grad.numpy().T))}
    gb_ih = layer.bias_ih_l0.grad.numpy()
    gb_hh = layer.bias_hh_l0.grad.numpy()
    # b_h enters exactly where bias_ih does (and bias_hh where folded in)
    errs['db_h'] = np.max(np.abs(grads[3] - gb_ih))
    if cell != 'gru':
        errs['db_h vs bias_hh'] = np.max(np.abs(grads[3] - gb_hh))
    else:
        errs['db_h[r,z] vs bias_hh'] = np.max(np.abs(grads[3][:2 * H] - gb_hh[:2 * H]))
        errs['db_hn'] = np.max(np.abs(grads[4] - gb_hh[2 * H:]))
    for k, e in errs.items():
        ERRORS[f'torch {cell} {k}'] = e
        assert e < 1e-10, k


# --------------------------------------------------------------------------
# subnormals
# --------------------------------------------------------------------------

# The upstream gradient that underflows within 64 steps without the flush (default 1e-20):
# the GRU's dh * z path keeps values larger for longer.
SATURATED_DH = {'gru': 1e-24}


def saturated_case(cell):
    """float32 inputs that saturate the units, and an upstream gradient that
    underflows within the 64 steps of BPTT unless the cell flushes it.

    Returns (args of the cell's forward, dh_T)."""
    spec = CELL_TABLE[cell]
    rng = np.random.default_rng(0)
    n, t_, d, h = 64, 64, 8, 32
    k = spec.gates
    x = rng.standard_normal((n, t_, d)).astype(np.float32)
    Wx = (rng.standard_normal((d, k * h)) * 3).astype(np.float32)     # saturating inputs
    Wh = (rng.standard_normal((h, k * h)) * 0.5).astype(np.float32)
    b = np.zeros(k * h, np.float32)
    # The second gate mostly closed (z of the GRU, f of the LSTM): the gradient that
    # passes straight through it, dh * z or dc * f, shrinks every step without a flushed slab.
    b[h:2 * h] = -3
    extra = [np.zeros(shape, np.float32) for name, shape in spec.shapes(d, h).items() if name in spec.extra]
    dh = np.full((n, h), SATURATED_DH.get(cell, 1e-20), np.float32)
    return (x, Wx, Wh, b, *extra), dh


def count_subnormals(arrays):
    tiny = np.finfo(np.float32).tiny
    return sum(int(np.sum((np.abs(a) > 0) & (np.abs(a) < tiny))) for a in arrays)


@pytest.mark.parametrize('cell', CELLS)
def test_bptt_produces_no_subnormals_with_saturated_gates(cell, monkeypatch):
    """Saturated units make BPTT gradients underflow, and subnormal floats are
    ~100x slower on x86, so the cells flush them to zero."""
    fwd, bwd = CELL_TABLE[cell].forward, CELL_TABLE[cell].backward
    args, dh = saturated_case(cell)
    _, cache = fwd(*args)
    grads = bwd(dh, cache)
    assert count_subnormals(grads) == 0
    # The flush removes only what is negligible: float64 gives the same gradients
    # (to float32 accuracy relative to each gradient's largest entry).
    grads64 = bwd(dh.astype(np.float64), fwd(*[a.astype(np.float64) for a in args])[1])
    for g, g64 in zip(grads, grads64):
        assert np.max(np.abs(g - g64)) < 1e-4 * np.max(np.abs(g64))
    # And the case really underflows without the flush.
    monkeypatch.setattr(cnn_rnn_numpy, 'flush_tiny', lambda a: a)
    assert count_subnormals(bwd(dh, cache)) > 0


# --------------------------------------------------------------------------
# The cells inside CNNRNN: shapes, initialisation, files
# --------------------------------------------------------------------------

@pytest.mark.parametrize('layout, D', [('pixels', 64), ('rows', 512)])
@pytest.mark.parametrize('cell', CELLS)
def test_parameters_follow_the_table(cell, layout, D):
    """Shapes, initialisation and gradient names of every registered cell inside CNNRNN."""
    spec, H = CELL_TABLE[cell], 128
    m = cnn_rnn_numpy.CNNRNN(seq_layout=layout, cell=cell)
    assert {k: v.shape for k, v in m.params.items()} == {
        'conv1_W': (64, 3, 3, 3), 'conv1_b': (64,), 'conv2_W': (64, 64, 3, 3), 'conv2_b': (64,),
        **spec.shapes(D, H), 'W_ho': (H, 10), 'b_o': (10,)}
    # Gate biases as the table says (zero by default), extra parameters zero.
    np.testing.assert_array_equal(m.params['b_h'], np.repeat(spec.gate_bias or (0,) * spec.gates, H))
    for name in spec.extra:
        assert not m.params[name].any(), name
    # Each H x H block of W_hh orthogonal, each gate block of W_xh Xavier.
    for k in range(spec.gates):
        block = m.params['W_hh'][:, k * H:(k + 1) * H].astype(np.float64)
        np.testing.assert_allclose(block.T @ block, np.eye(H), atol=1e-5)
        x_block = m.params['W_xh'][:, k * H:(k + 1) * H]
        assert abs(x_block.std() - np.sqrt(2 / (D + H))) < 0.1 * np.sqrt(2 / (D + H))
    # The L2 term covers the whole W_xh and W_hh, not the biases.
    assert {'W_xh', 'W_hh'} <= set(cnn_rnn_numpy.DECAYED_PARAMS)
    assert not set(spec.extra) & set(cnn_rnn_numpy.DECAYED_PARAMS)
    # One gradient per parameter, under its name.
    X = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
    _, grads = m.loss(X, np.array([1, 2]))
    assert {k: g.shape for k, g in grads.items()} == {k: v.shape for k, v in m.params.items()}


def test_gated_cells_have_the_designed_parameters():
    """DESIGN.md's forms: the GRU's extra b_hn (H,), the LSTM's forget-gate bias 1."""
    H = 128
    gru = cnn_rnn_numpy.CNNRNN(cell='gru')
    assert {k: gru.params[k].shape for k in ('W_xh', 'W_hh', 'b_h', 'b_hn')} == {
        'W_xh': (64, 3 * H), 'W_hh': (H, 3 * H), 'b_h': (3 * H,), 'b_hn': (H,)}
    assert not gru.params['b_h'].any() and not gru.params['b_hn'].any()
    lstm = cnn_rnn_numpy.CNNRNN(cell='lstm')
    assert {k: lstm.params[k].shape for k in ('W_xh', 'W_hh', 'b_h')} == {
        'W_xh': (64, 4 * H), 'W_hh': (H, 4 * H), 'b_h': (4 * H,)}
    assert 'b_hn' not in lstm.params
    np.testing.assert_array_equal(lstm.params['b_h'], np.repeat([0, 1, 0, 0], H))    # gates i, f, g, o


@pytest.mark.parametrize('cell', CELLS)
def test_checkpoints_record_the_cell(tmp_path, cell):
    m = cnn_rnn_numpy.CNNRNN(cell=cell, hidden=8, seed=1)
    m.save(tmp_path / 'model.npz')
    loaded = cnn_rnn_numpy.CNNRNN.load(tmp_path / 'model.npz')
    assert loaded.cell == cell
    assert list(loaded.params) == list(m.param_shapes())
    for k, v in m.params.items():
        np.testing.assert_array_equal(v, loaded.params[k])
    other = next(c for c in CELLS if c != cell)
    with pytest.raises(cnn_rnn_numpy.ModelFileError, match=f"cell='{cell}', not '{other}'"):
        cnn_rnn_numpy.CNNRNN.load(tmp_path / 'model.npz', cell=other)


def test_files_written_before_the_cells_existed_load_as_rnn(tmp_path):
    # A file written before the cells existed has no 'cell' in its metadata.
    cnn_rnn_numpy.CNNRNN(hidden=8, seed=2).save(tmp_path / 'new.npz')
    old = rewrite_model_meta(tmp_path / 'new.npz', tmp_path / 'old.npz', drop=['cell'])
    assert cnn_rnn_numpy.CNNRNN.load(old, cell='rnn').cell == 'rnn'


# --------------------------------------------------------------------------
# Readouts: the head reading every hidden state (cnn_rnn_numpy.READOUTS)
# --------------------------------------------------------------------------

def naive_hidden_states(cell, inputs):
    """(T, N, H): h_t of the naive recurrence run over the first t steps, for t = 1..T."""
    x, params = inputs[0], inputs[1:]
    return np.stack([NAIVE[cell](x[:, :t], *params) for t in range(1, x.shape[1] + 1)])


@pytest.mark.parametrize('cell', CELLS)
def test_readouts_read_the_hidden_states_of_the_naive_recurrence(rng, cell):
    inputs = cell_inputs(cell, rng)
    hs = naive_hidden_states(cell, inputs)
    p = dict(zip(CELL_TABLE[cell].names, inputs[1:]))
    want = {'last': hs[-1], 'mean': hs.mean(axis=0), 'max': hs.max(axis=0)}
    assert set(want) == set(cnn_rnn_numpy.READOUTS)
    for readout, expected in want.items():
        r, _ = cnn_rnn_numpy.recurrent_forward(inputs[0], p, cell, readout)
        np.testing.assert_allclose(r, expected, rtol=1e-12, atol=1e-14, err_msg=readout)
    with pytest.raises(ValueError, match="unknown readout 'sum'"):
        cnn_rnn_numpy.recurrent_forward(inputs[0], p, cell, 'sum')


@pytest.mark.parametrize('cell', CELLS)
def test_a_gradient_at_the_last_step_alone_is_the_last_state_gradient(rng, cell):
    """The per-step form of dh (T, N, H) with zeros before step T gives the same bits as dh_T."""
    fwd, bwd = CELL_TABLE[cell].forward, CELL_TABLE[cell].backward
    inputs = cell_inputs(cell, rng, dtype=np.float32)
    _, cache = fwd(*inputs)
    dh_T = rng.standard_normal((N, H)).astype(np.float32)
    per_step = np.zeros((T, N, H), np.float32)
    per_step[-1] = dh_T
    for g, g_steps in zip(bwd(dh_T, cache), bwd(per_step, cache)):
        np.testing.assert_array_equal(g, g_steps)
    with pytest.raises(ValueError, match='per-step gradient has 4 steps, the sequence 5'):
        bwd(per_step[1:], cache)


@pytest.mark.parametrize('cell', CELLS)
def test_per_step_gradients_match_pytorch(rng, cell):
    """The gradient at every hidden state (what 'mean' and 'max' send) against torch's autograd
    through the layer's whole output sequence."""
    torch, layer = torch_layer(cell, rng)
    fwd, bwd = CELL_TABLE[cell].forward, CELL_TABLE[cell].backward
    x = rng.standard_normal((N, T, D))
    dh = rng.standard_normal((N, T, H))                       # at h_1..h_T, batch-first as torch's
    xt = torch.from_numpy(x).requires_grad_(True)
    out, _ = layer(xt)
    (out * torch.from_numpy(dh)).sum().backward()
    _, cache = fwd(x, *torch_to_numpy_params(cell, layer))
    np.testing.assert_allclose(cnn_rnn_numpy.hidden_states(cache)[1:].transpose(1, 0, 2),
                               out.detach().numpy(), atol=1e-12)
    grads = bwd(np.ascontiguousarray(dh.transpose(1, 0, 2)), cache)
    errs = {'dx': np.max(np.abs(grads[0] - xt.grad.numpy())),
            'dW_xh': np.max(np.abs(grads[1] - layer.weight_ih_l0.grad.numpy().T)),
            'dW_hh': np.max(np.abs(grads[2] - layer.weight_hh_l0.grad.numpy().T))}
    for k, e in errs.items():
        ERRORS[f'torch per-step {cell} {k}'] = e
        assert e < 1e-10, k


@pytest.mark.parametrize('readout', ('mean', 'max'))
@pytest.mark.parametrize('cell', CELLS)
def test_readout_gradients_match_central_differences(cell, readout):
    """recurrent_forward / recurrent_backward with a readout of every hidden state, float64,
    on the worker threads' slices of the batch."""
    rng = np.random.default_rng(7)
    inputs = cell_inputs(cell, rng)
    names = CELL_TABLE[cell].names
    p = dict(zip(names, inputs[1:]))
    x = inputs[0]
    r, caches = cnn_rnn_numpy.recurrent_forward(x, p, cell, readout)
    dr = rng.standard_normal(r.shape)
    grads, dx = cnn_rnn_numpy.recurrent_backward(dr, caches, cell)
    loss = lambda: float(np.sum(cnn_rnn_numpy.recurrent_forward(x, p, cell, readout)[0] * dr))
    for name, a, g in [('x', x, dx)] + [(name, p[name], grads[name]) for name in names]:
        # 'max' has kinks where two steps tie: the plain central difference at a small step
        # stays on one side of them (the extrapolated one's larger step might not).
        idx, num = numeric_gradient(loss, a, h=1e-6)
        err = rel_error_vector(num, g.reshape(-1)[idx])
        ERRORS[f'numeric {cell} {readout} d{name}'] = err
        assert err < 1e-8, name
