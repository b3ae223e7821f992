"""Evaluation math shared by main.py (metrics.json) and viz.py (figures, report).

One definition of each number, so the ECE in metrics.json, in the reliability
diagram and in report.md is the same computation:

- calibration: equal-width confidence bins, the reliability statistics and the
  expected calibration error (ECE);
- the confusion matrix and the per-class accuracy read off it.
"""
import warnings

import numpy as np

from data_utils import NUM_CLASSES

TIME_TO_VAL_ACC = (0.70, 0.75, 0.85, 0.90)   # validation accuracies whose wall time runs report
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



# --------------------------------------------------------------------------
# Temperature scaling (Guo et al., 2017)
# --------------------------------------------------------------------------

TEMPERATURE_RANGE = (0.05, 20.0)   # searched on a log scale; a fit at a bound says the outputs are degenerate


def log_probabilities(probs):
    """log p in float64, clipped at the smallest positive float32 (a probability may round to 0).

    These serve as logits: softmax(log p) = p, and softmax(log p / T) is p tempered by T,
    so temperature scaling applies to the probabilities a run reports, flip-averaged or not.
    """
    return np.log(np.maximum(np.asarray(probs, dtype=np.float64), np.finfo(np.float32).tiny))


def apply_temperature(probs, temperature):
    """softmax(log p / T), row by row: (N, C) -> (N, C) float64. T > 1 softens, T < 1 sharpens."""
    z = log_probabilities(probs) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def temperature_nll(log_t, log_p, labels):
    """Mean negative log-likelihood of softmax(log_p / e^log_t) at the true labels (a scalar)."""
    z = log_p / np.exp(log_t)
    z_max = z.max(axis=1)
    log_norm = z_max + np.log(np.exp(z - z_max[:, None]).sum(axis=1))
    return float((log_norm - z[np.arange(len(labels)), labels]).mean())


def fit_temperature(probs, labels):
    """The temperature T minimising the NLL of softmax(log p / T) on (probs (N, C), labels (N,)).

    One scalar, fitted on log T so it stays positive (Guo et al. 2017, "On Calibration of
    Modern Neural Networks"). Temperature scaling never changes the argmax, so accuracy is
    unchanged. Returns a Python float in TEMPERATURE_RANGE.
    """
    from scipy.optimize import minimize_scalar   # installed with scikit-learn
    log_p = log_probabilities(probs)
    labels = np.asarray(labels)
    lo, hi = np.log(TEMPERATURE_RANGE[0]), np.log(TEMPERATURE_RANGE[1])
    result = minimize_scalar(temperature_nll, bounds=(lo, hi), args=(log_p, labels), method='bounded',
                             options={'xatol': 1e-6})
    return float(np.exp(result.x))


# --------------------------------------------------------------------------
# ECE and its noise
# --------------------------------------------------------------------------

def _confidence_and_correct(probs, labels):
    probs = np.asarray(probs)
    return probs.max(axis=1).astype(np.float64), (probs.argmax(axis=1) == np.asarray(labels)).astype(np.float64)


def _binned_ece(bins, confidence, correct, n_bins, weights=None):
    """sum_b |sum(correct) - sum(confidence)| / N over bins (weights: counts of a resample)."""
    w = np.ones_like(confidence) if weights is None else weights
    diff = np.bincount(bins, weights=w * (correct - confidence), minlength=n_bins)
    return float(np.abs(diff).sum() / w.sum())


def equal_mass_bins(confidence, n_bins=N_BINS):
    """Bin index of each confidence with bins of (nearly) equal counts: (N,) -> (N,) int.

    The images are ordered by confidence (ties kept in their order) and cut into n_bins
    runs whose sizes differ by at most one (Kumar et al. 2019; Roelofs et al. 2022).
    """
    order = np.argsort(confidence, kind='stable')
    bins = np.empty(len(confidence), dtype=np.int64)
    bins[order] = np.arange(len(confidence)) * n_bins // len(confidence)
    return bins


def ece_equal_mass(probs, labels, n_bins=N_BINS):
    """ECE with equal-mass bins: each bin holds N / n_bins images. (N, C), (N,) -> float."""
    confidence, correct = _confidence_and_correct(probs, labels)
    return _binned_ece(equal_mass_bins(confidence, n_bins), confidence, correct, n_bins)


def ece_debiased(probs, labels, n_bins=N_BINS, samples=1000, seed=0):
    """The debiased ECE of Kumar et al. 2019 ("Verified Uncertainty Calibration"), equal-width bins.

    The plug-in ECE is biased upward: even a calibrated model's bin accuracies scatter around
    their confidences. The bias is estimated by redrawing each bin's accuracy from a normal
    with the bin's observed accuracy and its binomial standard error, sqrt(a (1 - a) / n_b):
    debiased = 2 * plug-in - mean(redrawn ECE). It can be slightly negative. -> float.
    """
    confidence, correct = _confidence_and_correct(probs, labels)
    bins = confidence_bins(confidence, n_bins)
    count = np.bincount(bins, minlength=n_bins)
    used = count > 0
    n_b = count[used]
    acc = np.bincount(bins, weights=correct, minlength=n_bins)[used] / n_b
    conf = np.bincount(bins, weights=confidence, minlength=n_bins)[used] / n_b
    weight = n_b / n_b.sum()
    plugin = float(weight @ np.abs(acc - conf))
    rng = np.random.default_rng(seed)
    redrawn = rng.normal(acc, np.sqrt(acc * (1 - acc) / n_b), size=(samples, len(n_b)))
    return 2 * plugin - float((np.abs(redrawn - conf) @ weight).mean())


def ece_bootstrap_interval(probs, labels, n_bins=N_BINS, samples=1000, seed=0, level=0.95):
    """Percentile bootstrap interval (lo, hi) of the 15-bin ECE: images resampled with replacement."""
    confidence, correct = _confidence_and_correct(probs, labels)
    bins = confidence_bins(confidence, n_bins)
    n = len(confidence)
    rng = np.random.default_rng(seed)
    values = [_binned_ece(bins, confidence, correct, n_bins,
                          weights=np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float64))
              for _ in range(samples)]
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return float(lo), float(hi)


def ece_if_calibrated(probs, n_bins=N_BINS, samples=1000, seed=0):
    """The ECE a perfectly calibrated model with these confidences would score, by simulation.

    Each image is drawn correct with probability equal to its confidence, so accuracy equals
    confidence in expectation and every bit of ECE is sampling noise. Returns (mean, 95th
    percentile) over ``samples`` draws: a measured ECE below the 95th percentile cannot be
    told apart from perfect calibration.
    """
    confidence = np.asarray(probs).max(axis=1).astype(np.float64)
    bins = confidence_bins(confidence, n_bins)
    rng = np.random.default_rng(seed)
    values = [_binned_ece(bins, confidence, (rng.random(len(confidence)) < confidence).astype(np.float64), n_bins)
              for _ in range(samples)]
    return float(np.mean(values)), float(np.percentile(values, 95))


def calibration_report(probs, labels, n_bins=N_BINS, samples=1000, seed=0):
    """Every calibration figure of one set of predictions, for metrics.json (a dict of floats).

    ece (15 equal-width bins, the method's), ece_equal_mass, ece_debiased, ece_ci95 [lo, hi]
    (bootstrap), ece_if_calibrated {mean, p95} (simulated) and distinguishable (the ECE is
    above what a perfectly calibrated model scores 95% of the time), nll and mean_confidence.
    """
    confidence, correct = _confidence_and_correct(probs, labels)
    ece = expected_calibration_error(probs, labels, n_bins)
    mean_cal, p95_cal = ece_if_calibrated(probs, n_bins, samples, seed)
    return {'ece': ece, 'ece_equal_mass': ece_equal_mass(probs, labels, n_bins),
            'ece_debiased': ece_debiased(probs, labels, n_bins, samples, seed),
            'ece_ci95': list(ece_bootstrap_interval(probs, labels, n_bins, samples, seed)),
            'ece_if_calibrated': {'mean': mean_cal, 'p95': p95_cal},
            'distinguishable': bool(ece > p95_cal),
            'nll': cross_entropy(probs, labels), 'mean_confidence': float(confidence.mean()),
            'accuracy': float(correct.mean())}


# --------------------------------------------------------------------------
# Comparing variants over seeds: Welch's t-test and Holm's correction
# --------------------------------------------------------------------------

def welch_test(variant, baseline, level=0.95):
    """Welch's unequal-variance t-test of mean(variant) - mean(baseline), from scipy.stats.

    variant, baseline: 1-D sequences of per-seed values (at least 2 each, not both constant).
    Returns a dict: diff, t, df (Welch-Satterthwaite, not rounded), p (two-sided) and ci
    [lo, hi] of the difference at ``level``.
    """
    from scipy import stats
    a, b = np.asarray(variant, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    diff, se = a.mean() - b.mean(), np.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    with warnings.catch_warnings():
        # scipy warns of precision loss when one side's values are all equal (a variance of 0): the
        # test itself is exact then, the other side's variance carries it.
        warnings.simplefilter('ignore', RuntimeWarning)
        result = stats.ttest_ind(a, b, equal_var=False)
    half = stats.t.ppf(0.5 + level / 2, df) * se
    return {'diff': float(diff), 't': float(result.statistic), 'df': float(df), 'p': float(result.pvalue),
            'ci': [float(diff - half), float(diff + half)]}


def holm_adjust(pvalues):
    """Holm's step-down adjusted p-values (family-wise error), in the order given.

    Sorted ascending, the k-th smallest (0-based) of m is multiplied by m - k, made
    non-decreasing, and capped at 1. A variant is 'better' or 'worse' at 5% when its
    adjusted p is below 0.05.
    """
    p = np.asarray(pvalues, dtype=np.float64)
    m = len(p)
    order = np.argsort(p, kind='stable')
    adjusted = np.minimum(1.0, np.maximum.accumulate(p[order] * (m - np.arange(m))))
    out = np.empty(m)
    out[order] = adjusted
    return out.tolist()
