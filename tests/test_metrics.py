"""Tests for metrics.py: calibration (bins, reliability statistics, ECE) and the confusion matrix.

`loop_ece` is an independent, slow reference for the ECE; test_viz.py uses it
too, to fill a synthetic metrics.json without going through metrics.py.
"""

import numpy as np
import pytest

import metrics
from conftest import loop_ece, softmax


# --------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------

def test_ece_matches_an_independent_loop_on_random_predictions():
    rng = np.random.default_rng(7)
    for n, scale in ((500, 1.0), (3000, 3.0)):
        probs = softmax(rng.normal(scale=scale, size=(n, 10))).astype(np.float32)
        labels = rng.integers(0, 10, size=n)
        assert metrics.expected_calibration_error(probs, labels) == pytest.approx(
            loop_ece(probs, labels), abs=1e-12)
        assert metrics.expected_calibration_error(probs, labels, n_bins=7) == pytest.approx(
            loop_ece(probs, labels, n_bins=7), abs=1e-12)


def test_ece_hand_computed_tiny_example():
    # 4 predictions, 2 classes, 15 bins of width 1/15:
    #   conf 0.95 right, conf 0.95 wrong -> last bin (14/15, 1]
    #   conf 1.00 right                  -> last bin too (bins are right-closed)
    #   conf 0.58 right                  -> bin (8/15, 9/15] = (0.533, 0.6]: acc 1, conf 0.58, gap 0.42
    # Last bin: acc 2/3, mean conf (0.95 + 0.95 + 1.0)/3 = 0.9667, gap 0.3.
    # ECE = 3/4 * 0.3 + 1/4 * 0.42 = 0.33
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.42, 0.58], [1.0, 0.0]])
    labels = np.array([0, 1, 1, 0])
    assert metrics.expected_calibration_error(probs, labels) == pytest.approx(0.33, abs=1e-12)
    # Perfect, fully confident predictions are perfectly calibrated.
    assert metrics.expected_calibration_error(np.eye(3), np.arange(3)) == 0.0


def test_bin_convention_is_right_closed():
    edges = metrics.calibration_bin_edges(15)
    assert edges.shape == (16,) and edges[0] == 0.0 and edges[-1] == 1.0
    conf = np.array([0.0, edges[1], np.nextafter(edges[1], 1), 0.5, edges[14], 1.0, 1.0 + 1e-7])
    assert metrics.confidence_bins(conf, 15).tolist() == [0, 0, 1, 7, 13, 14, 14]


def test_reliability_stats_per_bin_counts_and_means():
    # Same tiny example as above: the last bin holds 3 predictions, bin 8 one.
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.42, 0.58], [1.0, 0.0]])
    stats = metrics.reliability_stats(probs, np.array([0, 1, 1, 0]))
    assert stats['count'].sum() == stats['n'] == 4
    assert stats['count'][14] == 3 and stats['count'][8] == 1
    assert stats['accuracy'][14] == pytest.approx(2 / 3) and stats['confidence'][8] == pytest.approx(0.58)
    assert np.isnan(stats['accuracy'][0])          # empty bins have no mean
    assert stats['overall_accuracy'] == 0.75
    with pytest.raises(ValueError):
        metrics.reliability_stats(np.zeros((0, 2)), np.zeros(0, dtype=int))


# --------------------------------------------------------------------------
# Confusion matrix
# --------------------------------------------------------------------------

def test_confusion_matrix_rows_are_true_classes():
    labels = np.array([0, 0, 1, 2, 2, 2])
    predictions = np.array([0, 1, 1, 2, 0, 2])
    cm = metrics.confusion_matrix(labels, predictions, num_classes=3)
    np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 1, 0], [1, 0, 2]])
    assert metrics.confusion_matrix(labels, predictions).shape == (metrics.NUM_CLASSES,) * 2


def test_per_class_accuracy_is_recall_and_zero_for_absent_classes():
    cm = np.array([[1, 1, 0], [0, 1, 0], [0, 0, 0]])
    np.testing.assert_allclose(metrics.per_class_accuracy(cm), [0.5, 1.0, 0.0])


def test_time_to_accuracy_is_the_first_epoch_at_or_above_the_threshold():
    history = [{'epoch': 1, 'val_acc': 0.5, 'elapsed_s': 60.0},
               {'epoch': 2, 'val_acc': 0.71, 'elapsed_s': 130.0},
               {'epoch': 3, 'val_acc': 0.69, 'elapsed_s': 200.0},
               {'epoch': 4, 'val_acc': 0.75, 'elapsed_s': 260.0}]
    assert metrics.time_to_accuracy(history, 0.70) == 130.0
    assert metrics.time_to_accuracy(history, 0.75) == 260.0
    assert metrics.time_to_accuracy(history, 0.80) is None
    # Histories written before elapsed_s existed: the running sum of epoch times.
    old = [{'epoch': 1, 'val_acc': 0.6, 'epoch_time_s': 50.0}, {'epoch': 2, 'val_acc': 0.72, 'epoch_time_s': 55.0}]
    assert metrics.time_to_accuracy(old, 0.70) == 105.0
    assert metrics.time_to_accuracy([], 0.70) is None


# --------------------------------------------------------------------------
# Temperature scaling, ECE's noise, Welch and Holm
# --------------------------------------------------------------------------

def tempered_model(n=20000, temperature=1.0, seed=0, classes=10):
    """Labels drawn from softmax(z) (a perfectly calibrated model of logits z), reported as
    softmax(z / temperature): over-confident for T < 1, under-confident for T > 1."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2.5, size=(n, classes))
    true = np.exp(z - z.max(1, keepdims=True))
    true /= true.sum(1, keepdims=True)
    labels = (rng.random(n)[:, None] > np.cumsum(true, 1)).sum(1)
    reported = metrics.apply_temperature(true, temperature)
    return reported, labels


@pytest.mark.parametrize('temperature', [0.5, 1.0, 2.0])
def test_the_fitted_temperature_undoes_a_known_one(temperature):
    probs, labels = tempered_model(temperature=temperature)
    fitted = metrics.fit_temperature(probs, labels)
    # softmax(log(softmax(z / T)) / T') = softmax(z / (T T')): the fit must give T' = 1 / T.
    assert fitted == pytest.approx(1 / temperature, rel=0.05)


@pytest.mark.parametrize('temperature', [0.5, 2.0])
def test_calibration_lowers_the_ece_of_an_over_or_under_confident_model(temperature):
    probs, labels = tempered_model(temperature=temperature, seed=1)
    val, test = slice(0, 10000), slice(10000, None)
    t = metrics.fit_temperature(probs[val], labels[val])
    raw = metrics.expected_calibration_error(probs[test], labels[test])
    calibrated = metrics.apply_temperature(probs[test], t)
    assert metrics.expected_calibration_error(calibrated, labels[test]) < raw / 3
    assert (calibrated.argmax(1) == probs[test].argmax(1)).all()      # the accuracy is unchanged


def test_temperature_one_changes_nothing():
    probs, _ = tempered_model(n=50)
    np.testing.assert_allclose(metrics.apply_temperature(probs, 1.0), probs, rtol=1e-9, atol=1e-15)


def test_equal_mass_bins_hold_equal_counts_in_confidence_order():
    confidence = np.array([0.9, 0.1, 0.5, 0.3, 0.7, 0.2])
    assert metrics.equal_mass_bins(confidence, 3).tolist() == [2, 0, 1, 1, 2, 0]
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.7, 0.3]])
    labels = np.array([0, 1, 1, 0])
    # bins of 2 by confidence: {0.6 wrong, 0.7 right}, {0.8 right, 0.9 right}
    expected = (abs(1 - 1.3) + abs(2 - 1.7)) / 4
    assert metrics.ece_equal_mass(probs, labels, n_bins=2) == pytest.approx(expected)


def test_the_debiased_ece_against_its_definition_on_a_small_case():
    probs = np.array([[0.95, 0.05], [0.9, 0.1], [0.6, 0.4], [0.55, 0.45]])
    labels = np.array([0, 1, 0, 0])
    # 4 bins: (0.5, 0.75] holds 0.6, 0.55 (both right), (0.75, 1] holds 0.95 (right), 0.9 (wrong).
    acc, conf, n_b = np.array([1.0, 0.5]), np.array([0.575, 0.925]), np.array([2, 2])
    plugin = 0.5 * np.abs(acc - conf).sum()
    rng = np.random.default_rng(7)
    redrawn = rng.normal(acc, np.sqrt(acc * (1 - acc) / n_b), size=(500, 2))
    expected = 2 * plugin - (np.abs(redrawn - conf) @ np.array([0.5, 0.5])).mean()
    got = metrics.ece_debiased(probs, labels, n_bins=4, samples=500, seed=7)
    assert got == pytest.approx(expected)
    assert metrics.expected_calibration_error(probs, labels, n_bins=4) == pytest.approx(plugin)


def test_the_debiased_ece_of_a_calibrated_model_is_near_zero_where_the_plug_in_is_not():
    probs, labels = tempered_model(n=2000, seed=3)
    plugin = metrics.expected_calibration_error(probs, labels)
    assert abs(metrics.ece_debiased(probs, labels)) < plugin / 2


def test_the_bootstrap_interval_against_a_direct_resampling():
    probs, labels = tempered_model(n=300, seed=4, temperature=0.7)
    lo, hi = metrics.ece_bootstrap_interval(probs, labels, samples=200, seed=5)
    rng = np.random.default_rng(5)
    direct = []
    for _ in range(200):
        i = np.bincount(rng.integers(0, 300, 300), minlength=300)
        idx = np.repeat(np.arange(300), i)
        direct.append(metrics.expected_calibration_error(probs[idx], labels[idx]))
    assert (lo, hi) == pytest.approx(tuple(np.percentile(direct, [2.5, 97.5])))
    assert lo <= metrics.expected_calibration_error(probs, labels) <= hi


def test_what_a_calibrated_model_scores_by_chance():
    probs, labels = tempered_model(n=10000, seed=6)
    mean, p95 = metrics.ece_if_calibrated(probs, samples=300)
    assert 0 < mean < p95 < 0.03
    report = metrics.calibration_report(probs, labels, samples=300)
    assert report['distinguishable'] is False and report['ece_if_calibrated']['p95'] == pytest.approx(p95)
    over, labels = tempered_model(n=10000, seed=6, temperature=0.5)
    assert metrics.calibration_report(over, labels, samples=300)['distinguishable'] is True


def test_welch_equals_scipy_and_a_hand_worked_example():
    from scipy import stats
    a, b = [45.1, 46.0, 47.2], [40.3, 41.9, 41.0, 39.8]
    w = metrics.welch_test(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert w['t'] == pytest.approx(ref.statistic) and w['p'] == pytest.approx(ref.pvalue)
    # by hand: means 46.1 and 40.75, variances 1.11 and 0.83 (ddof 1)
    va, vb = 1.11 / 3, 0.83 / 4
    assert w['diff'] == pytest.approx(5.35)
    assert w['t'] == pytest.approx(5.35 / np.sqrt(va + vb))
    assert w['df'] == pytest.approx((va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 3))
    half = stats.t.ppf(0.975, w['df']) * np.sqrt(va + vb)
    assert w['ci'] == pytest.approx([5.35 - half, 5.35 + half])


def test_holm_against_its_definition_and_a_hand_worked_example():
    # m = 4: sorted 0.01, 0.02, 0.03, 0.5 -> 0.04, 0.06, 0.06 (made non-decreasing), 0.5
    assert metrics.holm_adjust([0.03, 0.5, 0.01, 0.02]) == pytest.approx([0.06, 0.5, 0.04, 0.06])
    rng = np.random.default_rng(0)
    p = rng.random(7) ** 3
    order = np.argsort(p)
    by_definition = np.empty(7)
    for k, i in enumerate(order):
        by_definition[i] = min(1.0, max((7 - j) * p[order[j]] for j in range(k + 1)))
    assert metrics.holm_adjust(p) == pytest.approx(by_definition.tolist())
