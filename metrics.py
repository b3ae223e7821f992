"""Evaluation math shared by main.py (metrics.json) and viz.py (figures, report).

One definition of each number, so the ECE in metrics.json, in the reliability
diagram and in report.md is the same computation:

- calibration: equal-width confidence bins, the reliability statistics and the
  expected calibration error (ECE);
- the confusion matrix and the per-class accuracy read off it.
"""
import numpy as np

from data_utils import NUM_CLASSES

TIME_TO_VAL_ACC = (0.70, 0.75)   # validation accuracies whose wall time runs report
N_BINS = 15                 # reliability bins, the usual choice in the calibration literature


# --------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------

def calibration_bin_edges(n_bins=N_BINS):
    """Edges of `n_bins` equal-width confidence bins on [0, 1], shape (n_bins + 1,)."""
    return np.linspace(0.0, 1.0, n_bins + 1)


def confidence_bins(confidences, n_bins=N_BINS):
    """Bin index of each confidence: the bin convention shared by ECE and the plot.

    Bin k (0-based) is the half-open interval (k/n_bins, (k+1)/n_bins], so a
    confidence of exactly 1.0 falls in the last bin and one exactly on an inner
    edge falls in the bin below it. A confidence of 0 (impossible for a max
    probability) goes to bin 0, and values a rounding error above 1 go to the
    last bin rather than off the end.

    confidences: (N,) floats in [0, 1]. Returns (N,) int in [0, n_bins).
    """
    inner_edges = calibration_bin_edges(n_bins)[1:-1]
    # right=True gives edges[k] < c <= edges[k+1], i.e. right-closed bins.
    return np.digitize(np.asarray(confidences, dtype=np.float64), inner_edges, right=True)


def reliability_stats(probs, labels, n_bins=N_BINS):
    """Per-bin statistics behind the reliability diagram and the ECE.

    probs: (N, C) class probabilities; labels: (N,) int true classes.
    Confidence is the max probability, the prediction its argmax.
    Returns a dict of arrays of shape (n_bins,) unless noted:
      edges (n_bins + 1,), count (int), accuracy and confidence (mean per bin,
      NaN for empty bins), sum_correct and sum_confidence (per-bin sums), and
      the scalars n (N) and overall accuracy / mean confidence.
    """
    probs = np.asarray(probs)
    labels = np.asarray(labels)
    if probs.ndim != 2 or labels.ndim != 1 or len(probs) != len(labels):
        raise ValueError(f'expected probs (N, C) and labels (N,), got {probs.shape} and {labels.shape}')
    if len(labels) == 0:
        raise ValueError('cannot compute calibration on zero predictions')
    # float64 so the per-bin sums over 10,000 float32 values do not lose digits.
    confidence = probs.max(axis=1).astype(np.float64)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    bins = confidence_bins(confidence, n_bins)
    count = np.bincount(bins, minlength=n_bins)
    sum_correct = np.bincount(bins, weights=correct, minlength=n_bins)
    sum_confidence = np.bincount(bins, weights=confidence, minlength=n_bins)
    with np.errstate(invalid='ignore', divide='ignore'):
        accuracy = np.where(count > 0, sum_correct / count, np.nan)
        mean_conf = np.where(count > 0, sum_confidence / count, np.nan)
    return {
        'edges': calibration_bin_edges(n_bins), 'count': count,
        'accuracy': accuracy, 'confidence': mean_conf,
        'sum_correct': sum_correct, 'sum_confidence': sum_confidence,
        'n': len(labels), 'overall_accuracy': correct.mean(),
        'overall_confidence': confidence.mean(),
    }


def expected_calibration_error(probs, labels, n_bins=N_BINS):
    """Expected calibration error (Guo et al., 2017) with equal-width bins.

        ECE = sum_b |B_b| / N * |accuracy(B_b) - mean confidence(B_b)|

    where confidence is the max class probability, the prediction is its
    argmax, and B_b are the bins of `confidence_bins`: (k/n_bins, (k+1)/n_bins].
    Empty bins contribute nothing.

    probs: (N, C) probabilities (rows sum to 1); labels: (N,) int true classes.
    Returns a Python float in [0, 1].
    """
    stats = reliability_stats(probs, labels, n_bins)
    # |B|/N * |acc - conf| = |sum(correct) - sum(conf)| / N, without dividing by |B|.
    return float(np.abs(stats['sum_correct'] - stats['sum_confidence']).sum() / stats['n'])


# --------------------------------------------------------------------------
# Confusion matrix
# --------------------------------------------------------------------------

def confusion_matrix(labels, predictions, num_classes=NUM_CLASSES):
    """Counts (num_classes, num_classes): rows are true classes, columns predicted."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(labels), np.asarray(predictions)), 1)
    return cm


def accuracy(probs, labels):
    """Share of images whose most probable class is the label. (N, C), (N,) -> float."""
    return float((np.asarray(probs).argmax(axis=1) == labels).mean())


def cross_entropy(probs, labels):
    """Mean -log p(true class), clipped: a float32 probability can round to 0. (N, C), (N,) -> float."""
    return float(-np.log(np.maximum(probs[np.arange(len(labels)), labels], 1e-12)).mean())


def per_class_accuracy(cm):
    """Recall of each true class from a confusion matrix: (C, C) counts -> (C,) fractions.

    A class with no test images gets 0.
    """
    cm = np.asarray(cm)
    return np.diag(cm) / np.maximum(cm.sum(axis=1), 1)


# --------------------------------------------------------------------------
# Time to accuracy
# --------------------------------------------------------------------------

def time_to_accuracy(history, threshold):
    """Wall time in seconds at which validation accuracy first reached ``threshold``, or None.

    history: per-epoch records with val_acc and elapsed_s (the run's wall time
    at the end of that epoch, validation included). Records written before
    elapsed_s existed fall back to the running sum of epoch_time_s.
    """
    total = 0.0
    for record in history:
        total = record.get('elapsed_s') or total + (record.get('epoch_time_s') or 0.0)
        if record.get('val_acc') is not None and record['val_acc'] >= threshold:
            return total
    return None

