"""Tests of optim.py: the learning-rate schedule, SGD with momentum, gradient clipping."""
from types import SimpleNamespace

import numpy as np
import pytest

from optim import SGD, bn_lr_scales, clip_grad_norm, learning_rate


def test_learning_rate_schedule():
    cfg = {'lr': 0.02, 'warmup_epochs': 1, 'schedule': 'exponential', 'decay': 0.9, 'epochs': 15,
           'min_lr': 0.0}
    S = 10
    lr = lambda step: learning_rate(SimpleNamespace(**cfg), step, S)   # noqa: E731
    assert lr(0) == pytest.approx(0.002)          # warm-up: linear per step
    assert lr(4) == pytest.approx(0.01)
    assert lr(9) == pytest.approx(0.02)
    assert lr(10) == pytest.approx(0.02)          # first epoch after warm-up
    assert lr(19) == pytest.approx(0.02)          # constant within an epoch
    assert lr(20) == pytest.approx(0.018)
    assert lr(149) == pytest.approx(0.02 * 0.9 ** 13)
    cfg.update(schedule='cosine', lr=0.05, epochs=11, min_lr=0.001)
    assert lr(9) == pytest.approx(0.05)
    assert lr(10) == pytest.approx(0.05)          # cosine starts at the peak
    assert lr(60) == pytest.approx(0.001 + 0.5 * 0.049)   # half way
    assert lr(110) == pytest.approx(0.001)        # end
    cfg['warmup_epochs'] = 0
    assert lr(0) == pytest.approx(0.05)


def test_sgd_momentum_and_nesterov():
    p = {'w': np.array([1.0])}
    opt = SGD(p, momentum=0.9)
    opt.step({'w': np.array([1.0])}, lr=0.1)
    assert p['w'][0] == pytest.approx(0.9)
    opt.step({'w': np.array([1.0])}, lr=0.1)      # v = 0.9 * -0.1 - 0.1 = -0.19
    assert p['w'][0] == pytest.approx(0.71)
    q = {'w': np.array([1.0])}
    nes = SGD(q, momentum=0.9, nesterov=True)
    nes.step({'w': np.array([1.0])}, lr=0.1)      # v = -0.1; p += 0.9 * v - 0.1
    assert q['w'][0] == pytest.approx(0.81)


@pytest.mark.parametrize('nesterov', [False, True])
def test_sgd_lr_scales_step_each_parameter_at_its_multiple_of_the_rate(nesterov):
    g = {'a': np.array([1.0, -2.0]), 'b': np.array([3.0]), 'c': np.array([0.5])}
    p = {'a': np.ones(2), 'b': np.ones(1), 'c': np.ones(1)}
    factors = {'a': 1.0, 'b': 0.0, 'c': 64.0}
    opt = SGD(p, momentum=0.9, nesterov=nesterov, lr_scales={k: f for k, f in factors.items() if k != 'a'})
    # Each parameter moves as a plain SGD at its own rate would move it: 'a' (not in lr_scales) at lr,
    # 'c' at 64 lr.
    alone = {}
    for k, v in p.items():
        q = {k: np.ones_like(v)}
        alone[k] = (q, SGD(q, momentum=0.9, nesterov=nesterov))
    for _ in range(3):
        opt.step(g, lr=0.01)
        for k, (q, plain) in alone.items():
            plain.step({k: g[k]}, lr=0.01 * factors[k])
    for k, (q, _) in alone.items():
        np.testing.assert_array_equal(p[k], q[k])
    assert p['b'][0] == 1.0 and not opt.velocity['b'].any()    # a factor of 0 keeps it where it is
    assert p['c'][0] < p['a'][0] - 1 and np.all(p['a'] != 1)
    with pytest.raises(ValueError, match=r"does not update: \['x'\]"):
        SGD(p, lr_scales={'x': 2.0})


def test_bn_lr_scales_name_the_batchnorm_parameters_and_leave_out_factors_of_one():
    names = ['conv1_W', 'conv1_b', 'bn1_gamma', 'bn1_beta', 'bn2_gamma', 'bn2_beta', 'W_xh', 'b_h']
    assert bn_lr_scales(names) == {}
    assert bn_lr_scales(names, 0, 64) == {'bn1_gamma': 0.0, 'bn1_beta': 64.0, 'bn2_gamma': 0.0, 'bn2_beta': 64.0}
    assert bn_lr_scales(names, beta_lr=2) == {'bn1_beta': 2.0, 'bn2_beta': 2.0}
    assert bn_lr_scales(['W_xh', 'b_h'], 0, 64) == {}


def test_clip_grad_norm():
    g = {'a': np.array([3.0, 0.0]), 'b': np.array([[4.0]])}
    assert clip_grad_norm(g, 10.0) == pytest.approx(5.0)
    assert g['a'][0] == 3.0                     # under the limit: unchanged
    assert clip_grad_norm(g, 1.0) == pytest.approx(5.0)
    total = np.sqrt(sum(np.sum(v ** 2) for v in g.values()))
    assert total == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_allclose(g['a'], [0.6, 0.0], rtol=1e-6)


def test_triangular_schedule_warms_up_then_falls_on_a_straight_line_to_min_lr():
    cfg = SimpleNamespace(lr=0.2, warmup_epochs=2, schedule='triangular', decay=0.9, epochs=12, min_lr=0.02)
    S = 10
    lrs = [learning_rate(cfg, step, S) for step in range(cfg.epochs * S)]
    # The warm-up is the other schedules' (per step, lr/W to lr).
    assert lrs[0] == pytest.approx(0.2 / 20) and lrs[19] == pytest.approx(0.2)
    assert lrs[:20] == [learning_rate(SimpleNamespace(**{**vars(cfg), 'schedule': 'cosine'}), s, S)
                        for s in range(20)]
    assert lrs[20] == pytest.approx(0.2)                        # the peak: the first step after the warm-up
    assert lrs[70] == pytest.approx(0.2 - 0.5 * 0.18)           # half way down, 50 of 100 steps
    assert lrs[-1] == pytest.approx(0.02 + 0.18 / 100)          # one step short of min_lr at the end
    assert learning_rate(cfg, cfg.epochs * S, S) == pytest.approx(0.02)   # the end of the last epoch
    assert learning_rate(cfg, cfg.epochs * S + 50, S) == pytest.approx(0.02)   # never below min_lr
    down = np.diff(lrs[20:])
    assert np.all(down < 0) and np.allclose(down, -0.18 / 100)  # monotonic, a straight line
    assert np.all(np.diff(lrs[19:]) <= 0)                       # the last warm-up step is the peak too
    assert np.all(np.diff(lrs[:20]) > 0) and min(lrs) >= 0.0
    assert min(lrs[20:]) > cfg.min_lr


def test_triangular_without_warm_up_is_a_pure_linear_decay_from_lr():
    cfg = SimpleNamespace(lr=0.1, warmup_epochs=0, schedule='triangular', decay=0.9, epochs=5, min_lr=0.0)
    S = 4
    np.testing.assert_allclose([learning_rate(cfg, s, S) for s in range(20)], 0.1 * (1 - np.arange(20) / 20))
    assert learning_rate(cfg, 20, S) == 0.0


def test_an_anchored_schedule_continues_from_the_rate_it_reached():
    """fit_epochs moves a run's end: from the anchor step the line starts again from the rate
    reached there (a fraction of lr) and ends at the new last epoch; before it, nothing changes."""
    S = 10
    cfg = SimpleNamespace(lr=0.2, warmup_epochs=2, schedule='triangular', decay=0.9, epochs=12, min_lr=0.0)
    planned = [learning_rate(cfg, step, S) for step in range(12 * S)]
    # Anchored at the warm-up's end on the peak, the line is the unanchored one, bit for bit.
    assert [learning_rate(cfg, step, S, anchor=(20, 1.0)) for step in range(12 * S)] == planned
    # At step 50 the 12-epoch line is at 0.2 * (1 - 30/100) = 0.14; the run now ends after 16 epochs.
    longer = SimpleNamespace(**{**vars(cfg), 'epochs': 16})
    lrs = [learning_rate(longer, step, S, anchor=(50, 0.7)) for step in range(16 * S)]
    assert lrs[:50] == [learning_rate(longer, step, S) for step in range(50)]
    assert lrs[50] == pytest.approx(0.14) and lrs[-1] == pytest.approx(0.14 / 110)
    np.testing.assert_allclose(np.diff(lrs[50:]), -0.14 / 110)
    assert learning_rate(longer, 16 * S, S, anchor=(50, 0.7)) == 0.0
    # A new base rate (resume --lr) scales the rest of the line; cosine starts from the same rate.
    assert learning_rate(SimpleNamespace(**{**vars(longer), 'lr': 0.1}), 50, S, anchor=(50, 0.7)) == pytest.approx(0.07)
    cosine = SimpleNamespace(**{**vars(longer), 'schedule': 'cosine'})
    assert learning_rate(cosine, 50, S, anchor=(50, 0.7)) == pytest.approx(0.14)
    assert learning_rate(cosine, 105, S, anchor=(50, 0.7)) == pytest.approx(0.07)
    # The exponential schedule does not depend on the end: the anchor changes nothing.
    expo = SimpleNamespace(**{**vars(cfg), 'schedule': 'exponential'})
    assert learning_rate(expo, 70, S, anchor=(50, 0.7)) == learning_rate(expo, 70, S)
