"""Tests for metrics.py: calibration (bins, reliability statistics, ECE) and the confusion matrix.

`loop_ece` is an independent, slow reference for the ECE; test_viz.py uses it
too, to fill a synthetic metrics.json without going through metrics.py.
"""

import numpy as np
import pytest

import metrics


def softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def loop_ece(probs, labels, n_bins=15):
    """ECE written the slow, obvious way: a loop over bins (lo, hi]."""
    confidence = [float(max(row)) for row in probs]
    prediction = [int(np.argmax(row)) for row in probs]
    n = len(labels)
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        members = [i for i in range(n) if (lo < confidence[i] <= hi) or (b == 0 and confidence[i] == 0)]
        if not members:
            continue
        acc = sum(prediction[i] == labels[i] for i in members) / len(members)
        conf = sum(confidence[i] for i in members) / len(members)
        total += len(members) / n * abs(acc - conf)
    return total


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
