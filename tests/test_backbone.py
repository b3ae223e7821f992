"""Tests of the configurable backbone (issue 23): widths, convolutions per block and BatchNorm in
cnn_rnn_numpy.CNNRNN (the kernels in fast_layers.conv_layer_*), the preset keys, SGD over the
trained parameters, and a run of main.py that trains, resumes bit for bit and evaluates.

A default model must stay the method's: its names, shapes and order are checked here, and
benchmarks/ab_identical.py checks it bit for bit against an earlier revision."""
import json
import re
from dataclasses import replace

import numpy as np
import pytest

import cnn_rnn_numpy as M
import config
import fast_layers as F
from cnn_rnn_numpy import CNNRNN, ModelFileError
from conftest import (arrays, check_model_gradients, make_cifar_archive, perturbed, resume, rewrite_model_meta,
                      train_run)
from optim import SGD, WeightAverage, clip_grad_norm

RTOL = 1e-6            # bound on the relative error of every float64 gradient (as tests/test_model.py)
SMALL = dict(widths=[4, 8], convs_per_block=2, hidden=6, reg=0.1, seed=3, dtype=np.float64)


@pytest.fixture
def rng():
    return np.random.default_rng(2023)


def images(rng, n=5, side=8, dtype=np.float64):
    """(n, 3, side, side) images and (n,) labels. With the 'pixels' layout the model takes any
    side divisible by 2**blocks: D = C does not depend on the map's size, and 8x8 keeps the
    numeric checks fast."""
    return rng.standard_normal((n, 3, side, side)).astype(dtype), rng.integers(0, 10, n)



# --------------------------------------------------------------------------
# The default is the method
# --------------------------------------------------------------------------

def test_a_default_model_is_the_methods():
    m = CNNRNN()
    shapes = {'conv1_W': (64, 3, 3, 3), 'conv1_b': (64,), 'conv2_W': (64, 64, 3, 3), 'conv2_b': (64,),
              'W_xh': (64, 128), 'W_hh': (128, 128), 'b_h': (128,), 'W_ho': (128, 10), 'b_o': (10,)}
    assert list(m.param_shapes().items()) == list(shapes.items())
    # A new model's dict is in the order of the draws; gradients and the clipping norm follow it.
    assert list(m.params) == ['conv1_W', 'conv2_W', 'W_xh', 'W_ho', 'W_hh', 'conv1_b', 'conv2_b', 'b_h', 'b_o']
    assert m.trained_names() == list(m.params) and m.decayed_names() == list(M.DECAYED_PARAMS)
    assert m.method_backbone and (m.channels, m.map_side) == (64, 8)
    assert {k: m.config()[k] for k in M.METHOD_BACKBONE} == M.METHOD_BACKBONE
    assert [(layer.k, layer.pool, layer.bn, layer.winograd) for layer in m.layers] == \
        [(1, True, False, False), (2, True, False, True)]
    # The preset keys' defaults are the model's.
    assert {k: config.Config.method_defaults()[k] for k in M.METHOD_BACKBONE} == M.METHOD_BACKBONE


def test_the_general_path_computes_the_methods_backbone_bit_for_bit(rng, monkeypatch):
    """backbone_forward/backward with the method's layers are the fused kernels' ops in the same order."""
    X, y = images(rng, n=20, side=32, dtype=np.float32)
    m = CNNRNN(seed=1)
    l_fused, g_fused = m.loss(X, y, input_grad=True)
    p_fused = m.predict_proba(X, batch_size=7)
    monkeypatch.setattr(m, 'method_backbone', False)        # the same parameters through backbone_forward
    l_general, g_general = m.loss(X, y, input_grad=True)
    assert l_general == l_fused and list(g_general) == list(g_fused)
    for k in g_fused:
        assert np.array_equal(g_general[k], g_fused[k]), k
    assert np.array_equal(m.predict_proba(X, batch_size=7), p_fused)


# --------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------

def test_names_shapes_and_order_of_a_configurable_backbone():
    m = CNNRNN(widths=[4, 8], convs_per_block=2, batchnorm=True, hidden=6)
    bn = ('gamma', 'beta', 'mean', 'var')
    expected = [('conv1_W', (4, 3, 3, 3)), ('conv1_b', (4,)), *[(f'bn1_{s}', (4,)) for s in bn],
                ('conv2_W', (4, 4, 3, 3)), ('conv2_b', (4,)), *[(f'bn2_{s}', (4,)) for s in bn],
                ('conv3_W', (8, 4, 3, 3)), ('conv3_b', (8,)), *[(f'bn3_{s}', (8,)) for s in bn],
                ('conv4_W', (8, 8, 3, 3)), ('conv4_b', (8,)), *[(f'bn4_{s}', (8,)) for s in bn],
                ('W_xh', (8, 6)), ('W_hh', (6, 6)), ('b_h', (6,)), ('W_ho', (6, 10)), ('b_o', (10,))]
    assert list(m.param_shapes().items()) == expected
    assert {k: v.shape for k, v in m.params.items()} == dict(expected)
    assert [(layer.pool, layer.winograd) for layer in m.layers] == [(True, False), (False, True), (True, True),
                                                                    (False, True)]
    running = [f'bn{k}_{s}' for k in range(1, 5) for s in ('mean', 'var')]
    assert m.trained_names() == [k for k in m.params if k not in running]
    assert m.decayed_names() == ['conv1_W', 'conv2_W', 'conv3_W', 'conv4_W', 'W_xh', 'W_hh', 'W_ho']
    for k in range(1, 5):
        assert np.all(m.params[f'bn{k}_gamma'] == 1) and np.all(m.params[f'bn{k}_beta'] == 0)
        assert np.all(m.params[f'bn{k}_mean'] == 0) and np.all(m.params[f'bn{k}_var'] == 1)
    # He initialisation for every convolution, seeded.
    big = CNNRNN(widths=[32, 64, 64], convs_per_block=2, seed=0)
    assert np.std(big.params['conv4_W']) == pytest.approx(np.sqrt(2 / (64 * 9)), rel=0.05)
    assert np.array_equal(CNNRNN(widths=[32, 64, 64], convs_per_block=2, seed=0).params['conv6_W'],
                          big.params['conv6_W'])


@pytest.mark.parametrize('layout, T, D', [('pixels', 16, 8), ('rows', 4, 32), ('flat', 1, 128), ('rowmax', 4, 8)])
def test_the_layouts_read_the_last_map_at_its_own_size(rng, layout, T, D):
    """Three blocks leave a 4x4 map of widths[-1] = 8 channels: T and D as DESIGN.md gives them."""
    m = CNNRNN(seq_layout=layout, widths=[4, 4, 8], hidden=5, dtype=np.float64)
    assert (m.map_side, m.channels) == (4, 8)
    assert m.params['W_xh'].shape == (D, 5)
    assert M.sequence_length_and_size(layout, 4, 4, 8) == (T, D)
    X, y = images(rng, n=2, side=32)
    fmap, _, _ = M.backbone_forward(X.transpose(0, 2, 3, 1), m.params, m.layers, train=False)
    assert fmap.shape == (2, 4, 4, 8) and M.map_to_sequence(fmap, layout).shape == (2, T, D)
    assert m.forward(X).shape == (2, 10) and np.isfinite(m.loss(X, y)[0])


@pytest.mark.parametrize('settings, words', [
    (dict(widths=[8] * 6), 'widths = [8, 8, 8, 8, 8, 8] is not a list of 1 to 5 positive integers'),
    (dict(widths=[]), 'widths'), (dict(widths=[8, 0]), 'widths'), (dict(widths=[8.0]), 'widths'),
    (dict(convs_per_block=0), 'convs_per_block'), (dict(batchnorm='yes'), 'batchnorm'),
    (dict(bn_momentum=0.0), 'bn_momentum'), (dict(bn_eps=-1e-5), 'bn_eps')])
def test_a_bad_backbone_is_refused_in_one_sentence(settings, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        CNNRNN(**settings)
    key, value = next(iter(settings.items()))
    with pytest.raises(config.ConfigError) as e:
        config.parse_set_options([f'{key}={json.dumps(value)}'])
    assert f'{key} = ' in str(e.value) and '\n' not in str(e.value)


def test_the_preset_keys_read_json_lists_and_keep_older_runs_defaults():
    assert config.parse_set_options(['widths=[64,256,256]', 'convs_per_block=2', 'batchnorm=true',
                                     'bn_momentum=0.2', 'bn_eps=1e-3']) == \
        {'widths': [64, 256, 256], 'convs_per_block': 2, 'batchnorm': True, 'bn_momentum': 0.2, 'bn_eps': 1e-3}
    defaults = config.Config.defaults()
    assert {k: defaults[k] for k in M.METHOD_BACKBONE} == M.METHOD_BACKBONE
    a, b = config.Config(), config.Config()
    a.widths.append(8)                     # every Config has its own list
    assert b.widths == [64, 64] and config.Config.method_defaults()['widths'] == [64, 64]


# --------------------------------------------------------------------------
# Gradients, BatchNorm's modes and running statistics
# --------------------------------------------------------------------------

@pytest.mark.parametrize('batchnorm', [False, True])
def test_model_gradient_check(rng, batchnorm, monkeypatch):
    """Every trained parameter (a random sample of entries of each) and the input, float64,
    micro-batches of 2 images (so a BatchNorm joins three of them at every sync point)."""
    m = perturbed(CNNRNN(batchnorm=batchnorm, **SMALL), rng)
    X, y = images(rng)
    monkeypatch.setattr(F, 'CONV_CHUNK', 2)
    check_model_gradients(m, X, y, rng, RTOL)


def test_model_gradient_check_through_large_winograd_tiles(rng, monkeypatch):
    """32x32 images: conv2 and conv3 run on 16x16 maps, by F(4x4, 3x3) (conv3 pooled), conv4 on
    8x8 by F(4x4, 3x3) too, in micro-batches of 4 x CONV_CHUNK images; every parameter's and the
    input's gradient checked in float64."""
    m = perturbed(CNNRNN(batchnorm=True, **SMALL), rng)
    assert [(layer.winograd, layer.tile, layer.chunk_scale) for layer in m.layers] == [
        (False, 2, 1), (True, 4, 1), (True, 4, 1), (True, 4, 4)]
    X, y = images(rng, n=3, side=32)
    monkeypatch.setattr(F, 'CONV_CHUNK', 2)
    check_model_gradients(m, X, y, rng, RTOL)


def test_large_winograd_tiles_in_float32_round_off_like_a_convolution(rng):
    """F(4x4, 3x3)'s transforms have entries up to 8 (A^T) and 5 (B^T): in float32 a layer of
    256 input channels stays within 3e-5 (relative to the output's scale) of the exact float64
    convolution -- a few times F(2x2)'s error, far below what SGD notices."""
    x = rng.standard_normal((2, 16, 16, 256))
    w = rng.standard_normal((32, 256, 3, 3)) / 48
    exact, _ = M.conv3x3_forward(x, w, np.zeros(32))
    errors = []
    for tile in (2, 4):
        layer = F.ConvLayer(k=2, pool=False, bn=True, winograd=True, tile=tile)
        x32, w32 = x.astype(np.float32), w.astype(np.float32)
        out, _ = F.conv_layer_forward(x32, w32, F.conv_layer_weights(w32, True, tile), np.zeros(32, np.float32),
                                      layer, relu=False)
        assert out.dtype == np.float32
        errors.append(np.abs(out - exact).max() / np.abs(exact).max())
    assert errors[1] < 3e-5 and errors[0] < errors[1] * 2, errors


def test_the_methods_backbone_keeps_small_tiles_and_any_other_takes_large_ones_on_large_maps():
    method = CNNRNN(hidden=8)
    assert all(layer.tile == 2 for layer in method.layers)
    deep = CNNRNN(widths=[8, 16, 16], convs_per_block=2, batchnorm=True, hidden=8)
    # conv1-conv3 at 32x32 and 16x16, conv4 and conv5 at 8x8, conv6 at 4x4 (one tile an image):
    # the maps of 8x8 and less in micro-batches four times as large.
    assert [(layer.winograd, layer.tile, layer.chunk_scale) for layer in deep.layers] == [
        (False, 2, 1), (True, 4, 1), (True, 4, 1), (True, 4, 4), (True, 4, 4), (True, 4, 4)]
    assert all(layer.chunk_scale == 1 for layer in method.layers)
    whitened = CNNRNN(widths=[8, 16], whiten=2, batchnorm=True, hidden=8)
    assert [(layer.winograd, layer.tile) for layer in whitened.layers] == [(True, 4), (True, 4)]


def test_smaller_images_fall_back_to_small_tiles_where_a_map_side_is_not_divisible_by_4(rng):
    """The layers are made for 32x32 images; on 8x8 ones conv4's map is 2x2, which F(4x4, 3x3)
    cannot tile: it runs F(2x2, 3x3) there, and the model's outputs are the plain layers'."""
    m = CNNRNN(batchnorm=True, **SMALL)
    assert M.layers_for_side(m.layers, 32) is m.layers
    assert [layer.tile for layer in M.layers_for_side(m.layers, 8)] == [2, 4, 4, 2]
    assert [layer.tile for layer in M.layers_for_side(m.layers, 16)] == [2, 4, 4, 4]
    X, _ = images(rng, n=2)
    fmap, _, _ = M.backbone_forward(X.transpose(0, 2, 3, 1), m.params, m.layers, train=False)
    plain = M.backbone_forward(X.transpose(0, 2, 3, 1), m.params,
                               [F.ConvLayer(k=l.k, pool=l.pool, bn=l.bn, winograd=False) for l in m.layers],
                               train=False)[0]
    np.testing.assert_allclose(fmap, plain, rtol=1e-10, atol=1e-12)


def assert_a_step_changes_only_rounding(m, X, y, change):
    """m.loss(X, y) before and after ``change()`` (from the same running statistics): the same
    loss, gradients and updated running statistics, to rounding (float64)."""
    stats = {k: v.copy() for k, v in m.params.items() if M.is_running_statistic(k)}
    l_a, g_a = m.loss(X, y)
    after_a = {k: m.params[k].copy() for k in stats}
    for k in stats:
        m.params[k][:] = stats[k]
    change()
    l_b, g_b = m.loss(X, y)
    assert l_a == pytest.approx(l_b, rel=1e-12)
    for k in g_a:
        np.testing.assert_allclose(g_a[k], g_b[k], rtol=1e-9, atol=1e-13, err_msg=k)
    for k in stats:
        np.testing.assert_allclose(after_a[k], m.params[k], rtol=1e-12, err_msg=k)


@pytest.mark.parametrize('chunk', [1, 2])
def test_larger_micro_batches_on_small_maps_change_only_rounding(rng, monkeypatch, chunk):
    """chunk_scale cuts the stages of 8x8 and 4x4 maps into fewer, larger micro-batches: the
    loss, every gradient and the running statistics are those of equal micro-batches (float64,
    32x32 images, 9 of them: with CONV_CHUNK 2 the conv4 stage runs as 8 + 1 images)."""
    monkeypatch.setattr(F, 'CONV_CHUNK', chunk)
    X, y = images(rng, n=9, side=32)
    m = perturbed(CNNRNN(batchnorm=True, **SMALL), rng)

    def equal_micro_batches():
        m.layers = [replace(layer, chunk_scale=1) for layer in m.layers]
    assert_a_step_changes_only_rounding(m, X, y, equal_micro_batches)


def test_running_statistics_move_in_loss_only(rng):
    m = perturbed(CNNRNN(batchnorm=True, bn_momentum=0.3, **SMALL), rng)
    X, y = images(rng)
    before = {k: v.copy() for k, v in m.params.items()}
    held = m.params['bn1_mean']
    m.forward(X), m.features(X), m.predict_proba(X, batch_size=2)
    assert all(np.array_equal(m.params[k], before[k]) for k in before)     # eval mode changes nothing
    _, grads = m.loss(X, y)
    assert not any(M.is_running_statistic(k) for k in grads)
    # The first BatchNorm's input, by the plain layers: conv -> pool -> + bias, over the whole batch.
    z, _ = M.conv3x3_forward(X.transpose(0, 2, 3, 1), m.params['conv1_W'], np.zeros(4))
    z = M.maxpool2x2_forward(z)[0] + m.params['conv1_b']
    per_channel = z.reshape(-1, 4)
    np.testing.assert_allclose(m.params['bn1_mean'], 0.7 * before['bn1_mean'] + 0.3 * per_channel.mean(0),
                               rtol=1e-12)
    np.testing.assert_allclose(m.params['bn1_var'], 0.7 * before['bn1_var'] + 0.3 * per_channel.var(0, ddof=1),
                               rtol=1e-12)
    assert m.params['bn1_mean'] is held                                    # written in place
    for k in before:
        if not M.is_running_statistic(k):
            assert np.array_equal(m.params[k], before[k]), k               # only the statistics moved


def test_eval_mode_uses_the_running_statistics_and_is_per_image(rng):
    m = perturbed(CNNRNN(batchnorm=True, **SMALL), rng)
    X, y = images(rng, n=6)
    _, _, details = m.loss(X, y, details=True)
    train_logits = details['logits']
    eval_logits = m.forward(X)
    assert not np.allclose(eval_logits, train_logits)
    # Eval mode: an image's output does not depend on the others; train mode: it does.
    np.testing.assert_allclose(m.forward(X[:3]), eval_logits[:3], rtol=1e-12, atol=1e-14)
    assert not np.allclose(m.loss(X[:3], y[:3], details=True)[2]['logits'], train_logits[:3])
    # With the batch's own statistics as running ones (momentum 1 and the biased variance rescaled),
    # a single-block model with one convolution is the same in both modes.
    one = perturbed(CNNRNN(widths=[4], batchnorm=True, bn_momentum=1.0, hidden=6, dtype=np.float64), rng)
    train = one.loss(X, y, details=True)[2]['logits']
    n = X.shape[0] * 4 * 4
    one.params['bn1_var'] *= (n - 1) / n
    np.testing.assert_allclose(one.forward(X), train, rtol=1e-10, atol=1e-12)


def test_the_same_call_twice_gives_the_same_bits(rng):
    X, y = images(rng, n=7, side=32, dtype=np.float32)
    results = []
    for _ in range(2):
        m = CNNRNN(widths=[8, 16, 16], convs_per_block=2, batchnorm=True, hidden=8, seed=4)
        loss, grads = m.loss(X, y)
        results.append((loss, grads, {k: v.copy() for k, v in m.params.items()}, m.predict_proba(X, 3)))
    (l1, g1, p1, q1), (l2, g2, p2, q2) = results
    assert l1 == l2 and np.array_equal(q1, q2)
    assert all(np.array_equal(g1[k], g2[k]) for k in g1) and all(np.array_equal(p1[k], p2[k]) for k in p1)


def test_micro_batches_change_only_rounding(rng, monkeypatch):
    X, y = images(rng, n=7)
    m = perturbed(CNNRNN(batchnorm=True, **SMALL), rng)
    assert_a_step_changes_only_rounding(m, X, y, lambda: monkeypatch.setattr(F, 'CONV_CHUNK', 3))


@pytest.mark.parametrize('side', [(6, 6), (8, 12)])
def test_winograd_and_im2col_agree_on_every_kind_of_layer(rng, side):
    """conv_layer_forward/backward: im2col, Winograd F(2x2, 3x3) and (on sides divisible by 4)
    F(4x4, 3x3), pooled or not, with or without the ReLU, in float64."""
    x = rng.standard_normal((3,) + side + (5,))
    w = rng.standard_normal((4, 5, 3, 3))
    b = rng.standard_normal(4)
    kernels = [(False, 2), (True, 2)] + ([(True, 4)] if side[0] % 4 == 0 and side[1] % 4 == 0 else [])
    for pool in (False, True):
        for relu in (False, True):
            results = []
            for winograd, tile in kernels:
                layer = F.ConvLayer(k=2, pool=pool, bn=not relu, winograd=winograd, tile=tile)
                out, cache = F.conv_layer_forward(x, w, F.conv_layer_weights(w, winograd, tile), b, layer, relu)
                dout = np.random.default_rng(1).standard_normal(out.shape)
                dx, dweights, db = F.conv_layer_backward(dout, cache)
                dw = F.winograd_kernel_transform_backward(dweights, tile) if winograd else dweights
                results.append((out, dx, dw, db))
            for other in results[1:]:
                for a, c in zip(results[0], other):
                    np.testing.assert_allclose(a, c, rtol=1e-10, atol=1e-10)
            # ... and the plain layers: conv -> [pool] -> + bias -> [ReLU].
            z, _ = M.conv3x3_forward(x, w, np.zeros(4))
            z = (M.maxpool2x2_forward(z)[0] if pool else z) + b
            np.testing.assert_allclose(results[0][0], np.maximum(z, 0) if relu else z, rtol=1e-12)


# --------------------------------------------------------------------------
# Files, the optimizer, the weight average
# --------------------------------------------------------------------------

def test_save_load_round_trip_keeps_the_running_statistics(tmp_path, rng):
    m = CNNRNN(widths=[8, 16, 16], convs_per_block=2, batchnorm=True, bn_momentum=0.2, bn_eps=1e-4,
               seq_layout='rows', hidden=8, seed=5)
    X, y = images(rng, n=4, side=32, dtype=np.float32)
    m.loss(X, y)
    m.loss(X[::-1], y)
    assert not np.all(m.params['bn3_var'] == 1)
    m.save(tmp_path / 'm.npz')
    m2 = CNNRNN.load(tmp_path / 'm.npz', widths=(8, 16, 16), batchnorm=True)
    assert m2.config() == m.config() and list(m2.params) == list(m.param_shapes())
    for k in m.params:
        assert m2.params[k].dtype == m.params[k].dtype and np.array_equal(m2.params[k], m.params[k]), k
    assert np.array_equal(m2.forward(X), m.forward(X))
    with pytest.raises(ModelFileError, match=r'widths=\[8, 16, 16\], not \[8, 16\]'):
        CNNRNN.load(tmp_path / 'm.npz', widths=[8, 16])


def test_older_files_hold_the_methods_backbone_and_bad_settings_are_refused(tmp_path):
    CNNRNN(hidden=8).save(tmp_path / 'new.npz')
    old = CNNRNN.load(rewrite_model_meta(tmp_path / 'new.npz', tmp_path / 'old.npz', drop=M.METHOD_BACKBONE),
                      widths=[64, 64], batchnorm=False)
    assert old.method_backbone and {k: old.config()[k] for k in M.METHOD_BACKBONE} == M.METHOD_BACKBONE
    for widths, words in (([64] * 6, r'widths = \[64, 64, 64, 64, 64, 64\] is not a list of 1 to 5'),
                          ([64, 64, 64], 'make 3 convolutions, but the file holds 2'),
                          ([64, 10 ** 9], r'widths = \[64, 1000000000\] but conv2_W has shape \(64, 64, 3, 3\)')):
        bad = rewrite_model_meta(tmp_path / 'old.npz', tmp_path / 'bad.npz', widths=widths)
        with pytest.raises(ModelFileError, match=r'invalid model configuration \(.*' + words):
            CNNRNN.load(bad)


def test_sgd_steps_the_trained_parameters_only_and_the_average_covers_all(rng):
    m = CNNRNN(batchnorm=True, **SMALL)
    X, y = images(rng)
    opt = SGD(m.params, momentum=0.9, names=m.trained_names())
    average = WeightAverage(m.params, 0.9)
    assert list(opt.velocity) == m.trained_names()
    for _ in range(2):
        _, grads = m.loss(X, y)
        stats = {k: m.params[k].copy() for k in m.params if M.is_running_statistic(k)}
        clip_grad_norm(grads, 5.0)
        opt.step(grads, lr=0.1)
        assert all(np.array_equal(m.params[k], v) for k, v in stats.items())   # the step leaves them
        average.update(m.params)
    assert set(average.params) == set(m.params)
    with pytest.raises(KeyError):         # without names SGD would need a gradient for every array
        SGD(m.params).step(grads, lr=0.1)


# --------------------------------------------------------------------------
# PyTorch as an oracle (skipped without torch)
# --------------------------------------------------------------------------

def test_matches_an_equivalent_torch_model(rng):
    """conv -> pool -> BN -> ReLU, conv -> BN -> ReLU per block, the 'pixels' sequence, tanh RNN,
    linear head, cross-entropy + L2: logits in train and eval mode, every gradient and the
    running statistics, in float64."""
    torch = pytest.importorskip('torch')
    nn = torch.nn
    m = perturbed(CNNRNN(batchnorm=True, bn_momentum=0.2, bn_eps=1e-4, **SMALL), rng)
    X, y = images(rng, n=6)
    p = {k: torch.tensor(v) for k, v in m.params.items()}
    layers = []
    for layer in m.layers:
        k = layer.k
        conv = nn.Conv2d(*p[f'conv{k}_W'].shape[1::-1], 3, padding=1).double()
        bn = nn.BatchNorm2d(p[f'conv{k}_W'].shape[0], eps=1e-4, momentum=0.2).double()
        with torch.no_grad():
            conv.weight.copy_(p[f'conv{k}_W'])
            conv.bias.copy_(p[f'conv{k}_b'])
            bn.weight.copy_(p[f'bn{k}_gamma'])
            bn.bias.copy_(p[f'bn{k}_beta'])
            bn.running_mean.copy_(p[f'bn{k}_mean'])
            bn.running_var.copy_(p[f'bn{k}_var'])
        layers += [conv] + ([nn.MaxPool2d(2)] if layer.pool else []) + [bn, nn.ReLU()]
    backbone = nn.Sequential(*layers)
    rnn = nn.RNN(8, 6, nonlinearity='tanh', batch_first=True).double()
    head = nn.Linear(6, 10).double()
    with torch.no_grad():
        rnn.weight_ih_l0.copy_(p['W_xh'].T)
        rnn.weight_hh_l0.copy_(p['W_hh'].T)
        rnn.bias_ih_l0.copy_(p['b_h'])
        rnn.bias_hh_l0.zero_()
        head.weight.copy_(p['W_ho'].T)
        head.bias.copy_(p['b_o'])

    def logits_of(x):
        fmap = backbone(x)                                              # (N, C, R, R)
        seq = fmap.permute(0, 2, 3, 1).reshape(x.shape[0], -1, fmap.shape[1])    # 'pixels': t = row*R + col
        return head(rnn(seq)[0][:, -1])

    x = torch.tensor(X)
    backbone.train()
    logits = logits_of(x)
    decayed = [t.weight for t in backbone if isinstance(t, nn.Conv2d)] + [rnn.weight_ih_l0, rnn.weight_hh_l0,
                                                                          head.weight]
    loss = nn.functional.cross_entropy(logits, torch.tensor(y)) + 0.05 * sum((w * w).sum() for w in decayed)
    loss.backward()
    ours, grads, details = m.loss(X, y, details=True)
    np.testing.assert_allclose(details['logits'], logits.detach().numpy(), rtol=1e-10, atol=1e-12)
    assert ours == pytest.approx(loss.item(), rel=1e-12)
    convs = [t for t in backbone if isinstance(t, nn.Conv2d)]
    bns = [t for t in backbone if isinstance(t, nn.BatchNorm2d)]
    theirs = {'W_xh': rnn.weight_ih_l0.grad.T, 'W_hh': rnn.weight_hh_l0.grad.T, 'b_h': rnn.bias_ih_l0.grad,
              'W_ho': head.weight.grad.T, 'b_o': head.bias.grad}
    for layer, conv, bn in zip(m.layers, convs, bns):
        k = layer.k
        theirs.update({f'conv{k}_W': conv.weight.grad, f'conv{k}_b': conv.bias.grad,
                       f'bn{k}_gamma': bn.weight.grad, f'bn{k}_beta': bn.bias.grad})
        np.testing.assert_allclose(m.params[f'bn{k}_mean'], bn.running_mean.numpy(), rtol=1e-12)
        np.testing.assert_allclose(m.params[f'bn{k}_var'], bn.running_var.numpy(), rtol=1e-12)
    assert sorted(theirs) == sorted(grads)
    for name, g in theirs.items():
        np.testing.assert_allclose(grads[name], g.numpy(), rtol=1e-8, atol=1e-12, err_msg=name)
    backbone.eval()
    with torch.no_grad():
        np.testing.assert_allclose(m.forward(X), logits_of(x).numpy(), rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------
# main.py: train, stop, resume bit for bit, evaluate
# --------------------------------------------------------------------------

BACKBONE = ['--set', 'widths=[16,32,32]', '--set', 'convs_per_block=2', '--set', 'batchnorm=true']


def test_main_trains_resumes_bit_identically_and_evaluates_a_batchnorm_backbone(tmp_path):
    data_dir = str(make_cifar_archive(tmp_path, n_per_batch=50, n_test=100))
    full, split = tmp_path / 'full', tmp_path / 'split'
    assert train_run(data_dir, full, *BACKBONE, '--set', 'ema=0.9') == 0
    # Stopped mid-way through the second epoch (8 steps each), then resumed.
    assert train_run(data_dir, split, *BACKBONE, '--set', 'ema=0.9', interrupt_after=11) == 0
    assert json.loads((split / 'metrics.json').read_text())['stopped_early'] is True
    assert resume(split / 'ckpt.npz') == 0
    cfg = json.loads((full / 'config.json').read_text())
    assert (cfg['widths'], cfg['convs_per_block'], cfg['batchnorm']) == ([16, 32, 32], 2, True)
    a, b = arrays(full / 'ckpt.npz'), arrays(split / 'ckpt.npz')
    assert set(a) == set(b)
    assert 'param/bn6_mean' in a and 'average/bn6_var' in a and 'velocity/bn6_gamma' in a
    assert not any(k.startswith('velocity/') and M.is_running_statistic(k.split('/')[1]) for k in a)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert not np.all(a['param/bn6_var'] == 1)              # the running statistics were measured
    for name in ('best.npz', 'predictions.npz'):
        for k, v in arrays(full / name).items():
            np.testing.assert_array_equal(v, arrays(split / name)[k], err_msg=f'{name} {k}')
    ma, mb = (json.loads((d / 'metrics.json').read_text()) for d in (full, split))
    assert mb['stopped_early'] is False and (ma['test_acc'], ma['test_loss']) == (mb['test_acc'], mb['test_loss'])
    best = CNNRNN.load(full / 'best.npz')
    assert best.batchnorm and best.widths == (16, 32, 32) and best.convs_per_block == 2


def test_a_run_from_before_the_backbone_keys_resumes(tmp_path):
    """config.json and ckpt.npz without the backbone keys (as written before them): the method's."""
    data_dir = str(make_cifar_archive(tmp_path, n_per_batch=50, n_test=100))
    out = tmp_path / 'old'
    assert train_run(data_dir, out, '--epochs', '1', interrupt_after=3) == 0
    keys = list(M.METHOD_BACKBONE)
    config_json = json.loads((out / 'config.json').read_text())
    (out / 'config.json').write_text(json.dumps({k: v for k, v in config_json.items() if k not in keys}))
    with np.load(out / 'ckpt.npz') as f:
        stored = {k: f[k] for k in f.files}
    meta = {k: v for k, v in json.loads(str(stored['meta'])).items() if k not in keys}
    meta['run_config'] = {k: v for k, v in meta['run_config'].items() if k not in keys}
    np.savez(out / 'ckpt.npz', **dict(stored, meta=np.array(json.dumps(meta))))
    assert resume(out / 'ckpt.npz') == 0
    assert json.loads((out / 'metrics.json').read_text())['stopped_early'] is False
    assert CNNRNN.load(out / 'best.npz').method_backbone
