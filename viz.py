"""Turn a run folder into figures and a Markdown report.

    python viz.py runs/latest [--tsne-samples N] [--gallery-size N]
                              [--data-dir DIR] [--seed S]

A run folder (see DESIGN.md, "Run directory") is written by main.py. This
script reads what it finds there and writes, atomically, into the same folder:

    figures/training_curves.png   loss, accuracy and learning rate per epoch  (history.json)
    figures/confusion_matrix.png  counts and row-normalised rates   (metrics.json or predictions.npz)
    figures/reliability.png       reliability diagram + confidence histogram  (predictions.npz)
    figures/tsne.png              t-SNE of the final RNN hidden states        (predictions.npz)
    figures/misclassified.png     most confidently wrong test images   (predictions.npz + test images)
    report.md                     configuration, headline metrics, tables, every figure embedded

A run that is still training (no metrics.json / predictions.npz yet) gets the
figures its files allow and exit code 0; a folder that is not a run folder (or
whose files are damaged) gets one sentence on stderr and exit code 2, and
nothing is written.

`expected_calibration_error` is the single definition of ECE in the project:
main.py imports it to fill metrics.json, so the number in the report, in the
reliability diagram and in metrics.json is the same computation. Importing this
module is cheap (numpy only); matplotlib and scikit-learn are imported inside
the functions that draw.
"""

import argparse
import datetime
import json
import os
import pickle
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

# Used when metrics.json does not name the classes.
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck"]

N_BINS = 15                 # reliability bins, the usual choice in the calibration literature
DEFAULT_TSNE_SAMPLES = 2000
DEFAULT_GALLERY_SIZE = 36
# t-SNE budget for the default 2,000 points: ~4 s on one core. Past ~400
# iterations the layout only spreads out; a coarser Barnes-Hut angle (0.6 vs
# 0.5) is ~25% faster with no visible change at this size.
TSNE_MAX_ITER = 400
TSNE_ANGLE = 0.6
DPI = 100

# Exit codes of main().
EXIT_OK = 0
EXIT_NOT_A_RUN = 2


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
        raise ValueError(f"expected probs (N, C) and labels (N,), got {probs.shape} and {labels.shape}")
    if len(labels) == 0:
        raise ValueError("cannot compute calibration on zero predictions")
    # float64 so the per-bin sums over 10,000 float32 values do not lose digits.
    confidence = probs.max(axis=1).astype(np.float64)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    bins = confidence_bins(confidence, n_bins)
    count = np.bincount(bins, minlength=n_bins)
    sum_correct = np.bincount(bins, weights=correct, minlength=n_bins)
    sum_confidence = np.bincount(bins, weights=confidence, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.where(count > 0, sum_correct / count, np.nan)
        mean_conf = np.where(count > 0, sum_confidence / count, np.nan)
    return {
        "edges": calibration_bin_edges(n_bins), "count": count,
        "accuracy": accuracy, "confidence": mean_conf,
        "sum_correct": sum_correct, "sum_confidence": sum_confidence,
        "n": len(labels), "overall_accuracy": correct.mean(),
        "overall_confidence": confidence.mean(),
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
    return float(np.abs(stats["sum_correct"] - stats["sum_confidence"]).sum() / stats["n"])


# --------------------------------------------------------------------------
# Small numeric helpers
# --------------------------------------------------------------------------

def confusion_matrix(labels, predictions, num_classes=10):
    """Counts (num_classes, num_classes): rows are true classes, columns predicted."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(labels), np.asarray(predictions)), 1)
    return cm


def most_confused_pairs(cm, k=5):
    """The k largest off-diagonal cells of a confusion matrix.

    cm: (C, C) counts, rows true. Returns a list of (true, predicted, count)
    sorted by count, largest first (ties: lower true index, then lower predicted).
    """
    cm = np.asarray(cm)
    pairs = [(int(cm[i, j]), i, j) for i in range(cm.shape[0]) for j in range(cm.shape[1])
             if i != j and cm[i, j] > 0]
    pairs.sort(key=lambda p: (-p[0], p[1], p[2]))
    return [(i, j, c) for c, i, j in pairs[:k]]


def most_confident_mistakes(probs, labels, k=DEFAULT_GALLERY_SIZE):
    """Rows of the k wrong predictions with the highest confidence.

    probs: (N, C); labels: (N,). Returns (min(k, #wrong),) int row indices into
    probs, most confident first (a stable sort, so ties keep row order).
    """
    probs = np.asarray(probs)
    wrong = np.flatnonzero(probs.argmax(axis=1) != np.asarray(labels))
    confidence = probs[wrong].max(axis=1)
    order = np.argsort(-confidence, kind="stable")
    return wrong[order[:k]]


def stratified_sample(labels, n, seed=0):
    """A seeded sample of about n rows with the class proportions of `labels`.

    Each class gets its share of n (largest-remainder rounding, so the total is
    exactly n) drawn without replacement. labels: (N,) int.
    Returns sorted (min(n, N),) int row indices.
    """
    labels = np.asarray(labels)
    if n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * n / len(labels)
    quota = np.floor(exact).astype(int)
    # Hand the leftover points to the classes that lost the most to flooring.
    leftover = n - quota.sum()
    quota[np.argsort(-(exact - quota), kind="stable")[:leftover]] += 1
    chosen = [rng.choice(np.flatnonzero(labels == c), size=q, replace=False)
              for c, q in zip(classes, quota)]
    return np.sort(np.concatenate(chosen))


# --------------------------------------------------------------------------
# Reading a run folder and the test images
# --------------------------------------------------------------------------

class RunFolderError(Exception):
    """The folder cannot be read as a run folder; the message says why and what to do."""


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise RunFolderError(f"{path} cannot be read as JSON ({e}); "
                             "re-run training or restore the file.") from None


def load_run(run_dir):
    """Read whatever a run folder holds.

    Returns a dict with keys run_dir (resolved Path), config, history, metrics
    (dicts/lists or None when the file is absent), predictions (dict of arrays
    probs (N, C), labels (N,), indices (N,), hidden (N, H) or None), and
    missing (list of absent file names). Raises RunFolderError when the folder
    has neither config.json nor history.json.
    """
    given = Path(run_dir)
    # runs/latest is a symlink: work on the real folder so relative paths resolve.
    run_dir = given.resolve()
    if not run_dir.is_dir():
        raise RunFolderError(f"{given} is not a folder; pass a run folder such as runs/latest.")
    if not (run_dir / "config.json").is_file() and not (run_dir / "history.json").is_file():
        raise RunFolderError(f"{given} is not a run folder (it has no config.json or history.json); "
                             "pass a folder written by main.py, such as runs/latest.")
    run = {"run_dir": run_dir, "config": None, "history": None, "metrics": None,
           "predictions": None, "missing": []}
    expected = {"config": dict, "history": list, "metrics": dict}
    for name, kind in expected.items():
        path = run_dir / f"{name}.json"
        if path.is_file():
            run[name] = _read_json(path)
            if not isinstance(run[name], kind) or (name == "history" and
                                                    not all(isinstance(r, dict) for r in run[name])):
                what = "a list of per-epoch records" if kind is list else "a JSON object"
                raise RunFolderError(f"{path} is not {what}; it was not written by main.py "
                                     "or is damaged - re-run training or restore the file.")
        else:
            run["missing"].append(path.name)
    path = run_dir / "predictions.npz"
    if path.is_file():
        try:
            with np.load(path) as z:
                preds = {k: z[k] for k in z.files}
        except (OSError, ValueError) as e:
            raise RunFolderError(f"{path} cannot be read ({e}); re-run the test evaluation.") from None
        if "probs" not in preds or "labels" not in preds:
            raise RunFolderError(f"{path} lacks the arrays 'probs' and 'labels'; re-run the test evaluation.")
        preds.setdefault("indices", np.arange(len(preds["labels"])))
        n = len(preds["labels"])
        shapes_ok = (preds["probs"].ndim == 2 and len(preds["probs"]) == n > 0
                     and preds["labels"].ndim == 1 and preds["indices"].shape == (n,)
                     and ("hidden" not in preds or (preds["hidden"].ndim == 2 and len(preds["hidden"]) == n)))
        if not shapes_ok:
            shapes = ", ".join(f"{k} {v.shape}" for k, v in preds.items())
            raise RunFolderError(f"{path} has inconsistent arrays ({shapes}); expected probs (N, 10), "
                                 "labels (N,), indices (N,), hidden (N, H) - re-run the test evaluation.")
        run["predictions"] = preds
    else:
        run["missing"].append(path.name)
    return run


def _pickle_get(d, key):
    """Value of `key` in a CIFAR pickle dict whose keys may be bytes or str."""
    if key in d:
        return d[key]
    return d[key.encode()]


def load_test_images(data_dir):
    """The CIFAR-10 test images from a data folder, without data_utils.

    Looks for <data_dir>/cifar-10-batches-py/test_batch, then
    <data_dir>/test_batch, then the test batch inside
    <data_dir>/cifar-10-python.tar.gz (slower: the archive is decompressed).
    Returns (images (N, 32, 32, 3) uint8 HWC, labels (N,) int64, label_names
    list of str or None). Raises FileNotFoundError when none is there.
    """
    data_dir = Path(data_dir)
    label_names = None
    for folder in (data_dir / "cifar-10-batches-py", data_dir):
        meta = folder / "batches.meta"
        if meta.is_file() and label_names is None:
            with open(meta, "rb") as f:
                names = _pickle_get(pickle.load(f, encoding="bytes"), "label_names")
            label_names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    batch = None
    for path in (data_dir / "cifar-10-batches-py" / "test_batch", data_dir / "test_batch"):
        if path.is_file():
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            break
    archive = data_dir / "cifar-10-python.tar.gz"
    if batch is None and archive.is_file():
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:  # iterate, not getmember(): stop as soon as it is found
                if member.name.endswith("cifar-10-batches-py/test_batch"):
                    batch = pickle.load(tar.extractfile(member), encoding="bytes")
                    break
    if batch is None:
        raise FileNotFoundError(f"no CIFAR-10 test batch in {data_dir}")
    data = np.asarray(_pickle_get(batch, "data"), dtype=np.uint8).reshape(-1, 3, 32, 32)
    labels = np.asarray(_pickle_get(batch, "labels"), dtype=np.int64)
    # The archive stores NCHW rows; imshow wants HWC.
    return data.transpose(0, 2, 3, 1), labels, label_names


def resolve_data_dir(config, run_dir, override=None):
    """Candidate data folders, in the order to try them.

    --data-dir wins alone. Otherwise the config's data_dir (default "data"):
    as given if absolute, else relative to the current directory and then to
    the repository root, which is the run folder's grandparent (runs/<run>/).
    """
    if override is not None:
        return [Path(override)]
    data_dir = Path((config or {}).get("data_dir") or "data")
    if data_dir.is_absolute():
        return [data_dir]
    return [Path.cwd() / data_dir, Path(run_dir).parent.parent / data_dir]


# --------------------------------------------------------------------------
# Figures (object-oriented matplotlib: no pyplot, no global backend state)
# --------------------------------------------------------------------------

def _new_figure(**kwargs):
    # A bare Figure renders with Agg on savefig, so this stays headless even
    # when the caller has an interactive pyplot backend selected.
    from matplotlib.figure import Figure
    return Figure(layout="constrained", **kwargs)


def plot_training_curves(history, best_epoch=None):
    """Loss, accuracy and learning rate per epoch, best epoch marked.

    history: list of per-epoch dicts with epoch, train_loss, train_acc,
    val_loss, val_acc (fractions), lr; missing values are drawn as gaps.
    best_epoch: epoch to mark (1-based); default the epoch of highest val_acc.
    Returns a matplotlib Figure.
    """
    from matplotlib.ticker import MaxNLocator

    def column(key):
        return np.array([np.nan if r.get(key) is None else float(r[key]) for r in history])

    epoch = column("epoch")
    if best_epoch is None:
        val_acc = column("val_acc")
        if np.isfinite(val_acc).any():
            best_epoch = int(epoch[np.nanargmax(val_acc)])
    # With few epochs a plain line is invisible; markers keep single points visible.
    style = {"marker": "o", "markersize": 3 if len(history) > 30 else 5}

    fig = _new_figure(figsize=(15, 4.4))
    ax_loss, ax_acc, ax_lr = fig.subplots(1, 3)
    ax_loss.plot(epoch, column("train_loss"), label="train", **style)
    ax_loss.plot(epoch, column("val_loss"), label="validation", **style)
    ax_loss.set(title="Loss", ylabel="cross-entropy loss")
    ax_acc.plot(epoch, 100 * column("train_acc"), label="train", **style)
    ax_acc.plot(epoch, 100 * column("val_acc"), label="validation", **style)
    ax_acc.set(title="Accuracy", ylabel="accuracy (%)")
    ax_lr.plot(epoch, column("lr"), color="tab:green", **style)
    ax_lr.set(title="Learning rate", ylabel="learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))

    if best_epoch is not None:
        for ax in (ax_loss, ax_acc, ax_lr):
            ax.axvline(best_epoch, color="0.4", linestyle="--", linewidth=1,
                       label=f"best epoch ({best_epoch})")
        row = [r for r in history if r.get("epoch") == best_epoch]
        if row and row[0].get("val_acc") is not None:
            ax_acc.plot([best_epoch], [100 * row[0]["val_acc"]], marker="*", markersize=14,
                        color="tab:red", linestyle="none",
                        label=f"best val {100 * row[0]['val_acc']:.2f}%")
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    ax_loss.legend()
    ax_acc.legend()
    return fig


def plot_confusion_matrix(cm, label_names):
    """Two panels: raw counts and row-normalised rates (recall per true class).

    cm: (C, C) counts, rows true class, columns predicted; label_names: C str.
    Returns a matplotlib Figure.
    """
    cm = np.asarray(cm, dtype=np.int64)
    row_sums = cm.sum(axis=1, keepdims=True)
    rates = cm / np.maximum(row_sums, 1)
    c = len(label_names)

    fig = _new_figure(figsize=(16, 7))
    axes = fig.subplots(1, 2)
    panels = [(cm, "Counts", "{:d}", "Blues"), (rates, "Row-normalised (fraction of true class)", "{:.2f}", "Greens")]
    for ax, (values, title, fmt, cmap) in zip(axes, panels):
        image = ax.imshow(values, cmap=cmap, vmin=0, vmax=max(values.max(), 1e-12))
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02)
        # Dark text on light cells, light text on dark ones.
        threshold = values.max() / 2
        for i in range(c):
            for j in range(c):
                ax.text(j, i, fmt.format(values[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if values[i, j] > threshold else "black")
        ax.set_xticks(range(c), label_names, rotation=45, ha="right", rotation_mode="anchor")
        ax.set_yticks(range(c), label_names)
        ax.set(title=title, xlabel="predicted class", ylabel="true class")
    fig.suptitle(f"Confusion matrix on {int(cm.sum())} test images "
                 f"(accuracy {100 * np.trace(cm) / max(cm.sum(), 1):.2f}%)", fontsize=14)
    return fig


def plot_reliability(probs, labels, n_bins=N_BINS):
    """Reliability diagram with the per-bin gap, and a confidence histogram beneath.

    probs: (N, C) probabilities; labels: (N,) int. Bars are the accuracy of the
    predictions whose confidence falls in each bin (`confidence_bins`); the
    hatched bars span the gap to the bin's mean confidence. The title carries
    `expected_calibration_error` of the same inputs. Returns a matplotlib Figure.
    """
    stats = reliability_stats(probs, labels, n_bins)
    ece = expected_calibration_error(probs, labels, n_bins)
    edges = stats["edges"]
    centers = (edges[:-1] + edges[1:]) / 2
    width = edges[1] - edges[0]
    filled = stats["count"] > 0

    fig = _new_figure(figsize=(7, 8.5))
    ax, ax_hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.bar(centers[filled], stats["accuracy"][filled], width=width, color="tab:blue",
           edgecolor="black", linewidth=0.6, label="accuracy")
    gap = stats["confidence"][filled] - stats["accuracy"][filled]
    ax.bar(centers[filled], gap, bottom=stats["accuracy"][filled], width=width,
           color="tab:red", alpha=0.3, edgecolor="tab:red", hatch="//", linewidth=0.6,
           label="gap to mean confidence")
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.3", label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy in bin",
           title=f"Reliability diagram: ECE = {ece:.4f}\n({n_bins} equal-width bins, "
                 f"{stats['n']} test predictions)")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)

    ax_hist.bar(centers, stats["count"], width=width, color="0.6", edgecolor="black", linewidth=0.6)
    ax_hist.axvline(stats["overall_accuracy"], color="tab:blue", linestyle="-",
                    label=f"accuracy {100 * stats['overall_accuracy']:.1f}%")
    ax_hist.axvline(stats["overall_confidence"], color="tab:red", linestyle="--",
                    label=f"mean confidence {100 * stats['overall_confidence']:.1f}%")
    ax_hist.set(xlabel="confidence (max class probability)", ylabel="predictions")
    ax_hist.legend(loc="upper left", fontsize=8)
    ax_hist.grid(alpha=0.3)
    return fig


def tsne_embedding(hidden, seed=0):
    """2-D t-SNE of hidden states: PCA to 50 dims first (cheaper, less noise).

    hidden: (n, H) floats. Returns (n, 2) float.
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits  # installed with scikit-learn

    x = np.asarray(hidden, dtype=np.float32)
    n_components = min(50, x.shape[0], x.shape[1])
    # sklearn requires perplexity < n; keep the usual 30 unless the sample is tiny.
    perplexity = min(30.0, max(1.0, (len(x) - 1) / 3))
    # One thread: t-SNE's OpenMP loops synchronise every iteration, so on a
    # machine whose cores are busy with other work (training, benchmarks) two
    # threads measured 4-5x slower than one, while on an idle machine one
    # thread costs only ~1.5x.
    with threadpool_limits(limits=1):
        if n_components < x.shape[1]:
            x = PCA(n_components=n_components, random_state=seed).fit_transform(x)
        tsne = TSNE(n_components=2, init="pca", learning_rate="auto", perplexity=perplexity,
                    max_iter=TSNE_MAX_ITER, angle=TSNE_ANGLE, random_state=seed)
        return tsne.fit_transform(x)


def plot_tsne(embedding, labels, label_names, n_total):
    """Scatter of a t-SNE embedding coloured by true class.

    embedding: (n, 2); labels: (n,) int; n_total: size of the set sampled from
    (for the title). Returns a matplotlib Figure.
    """
    import matplotlib

    colors = matplotlib.colormaps["tab10"]
    fig = _new_figure(figsize=(9, 7.5))
    ax = fig.subplots()
    for c, name in enumerate(label_names):
        mask = labels == c
        ax.scatter(embedding[mask, 0], embedding[mask, 1], s=6, color=colors(c % 10),
                   label=name, alpha=0.8, linewidths=0)
    ax.set(title=f"t-SNE of the final RNN hidden states\n{len(labels)} test images "
                 f"(seeded stratified sample of {n_total}), coloured by true class",
           xticks=[], yticks=[])
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), markerscale=3, frameon=False)
    return fig


def plot_gallery(images, true, pred, confidence, label_names, n_wrong=None):
    """Grid of misclassified images, each titled with true / predicted class.

    images: (k, 32, 32, 3) uint8 HWC; true, pred: (k,) int; confidence: (k,)
    probability of the predicted class; n_wrong: total errors (for the title).
    Returns a matplotlib Figure.
    """
    k = len(images)
    ncols = int(np.ceil(np.sqrt(k)))
    nrows = int(np.ceil(k / ncols))
    fig = _new_figure(figsize=(1.75 * ncols, 1.95 * nrows + 0.6))
    axes = np.atleast_1d(fig.subplots(nrows, ncols)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, image, t, p, c in zip(axes, images, true, pred, confidence):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(f"true: {label_names[t]}\npred: {label_names[p]} {100 * c:.0f}%", fontsize=8)
    of = f" (of {n_wrong} errors)" if n_wrong is not None else ""
    fig.suptitle(f"The {k} most confidently wrong test predictions{of}", fontsize=12)
    return fig


def _temp_file_beside(path, suffix):
    """A new temporary file next to ``path`` -> (fd, name), with the usual permissions.

    mkstemp creates files readable by the owner only (0600); the final file
    should get what a plain open() would give (0666 minus the umask).
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return fd, tmp


def save_figure(fig, path):
    """Write a Figure as PNG atomically: a temporary file, then os.replace."""
    path = Path(path)
    fd, tmp = _temp_file_beside(path, ".png.tmp")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=DPI)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(path, text):
    """Write a text file atomically: a temporary file, then os.replace."""
    path = Path(path)
    fd, tmp = _temp_file_beside(path, ".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------

FIGURE_TITLES = {
    "training_curves": "Training curves",
    "confusion_matrix": "Confusion matrix",
    "reliability": "Reliability diagram",
    "tsne": "t-SNE of the final hidden states",
    "misclassified": "Most confidently wrong predictions",
}


def _fmt_duration(seconds):
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    h, rest = divmod(int(round(seconds)), 3600)
    m, s = divmod(rest, 60)
    return f"{seconds:.0f} s ({h} h {m:02d} min {s:02d} s)" if h else f"{seconds:.0f} s ({m} min {s:02d} s)"


def _fmt_value(v):
    if isinstance(v, (dict, list)):
        return "`" + json.dumps(v) + "`"
    return str(v)


def build_report(run, figures, notes, label_names, cm):
    """The text of report.md.

    run: from load_run; figures: list of (stem, caption) drawn, in order;
    notes: lines about what is missing or skipped; label_names: C str;
    cm: (C, C) confusion counts or None.
    """
    config, history, metrics = run["config"], run["history"], run["metrics"]
    lines = [f"# Run report: {run['run_dir'].name}", "",
             f"Generated by `viz.py` on {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}.", ""]
    if config:
        # One line for the settings people look for first; the full table is at the end.
        summary = [f"{key} `{config[key]}`" for key in ("preset", "epochs", "seq_layout", "subset", "seed")
                   if config.get(key) is not None]
        if summary:
            lines += ["Run: " + ", ".join(summary) + " (full configuration at the end).", ""]
    if notes:
        lines += ["> " + n for n in notes] + [""]

    lines += ["## Headline metrics", "", "| metric | value |", "| --- | --- |"]
    if metrics:
        def row(name, key, fmt):
            if metrics.get(key) is not None:
                lines.append(f"| {name} | {fmt(metrics[key])} |")
        row("Test accuracy", "test_acc", lambda v: f"{100 * v:.2f} %")
        row("Test loss", "test_loss", lambda v: f"{v:.4f}")
        row(f"ECE ({N_BINS} bins)", "ece", lambda v: f"{v:.4f}")
        best = metrics.get("best_val_acc")
        if best is not None:
            at = f" (epoch {metrics['best_epoch']})" if metrics.get("best_epoch") is not None else ""
            lines.append(f"| Best validation accuracy | {100 * best:.2f} %{at} |")
        if metrics.get("epochs_done") is not None:
            early = " (stopped early)" if metrics.get("stopped_early") else ""
            lines.append(f"| Epochs trained | {metrics['epochs_done']}{early} |")
        row("Wall time", "wall_time_s", _fmt_duration)
        row("Training throughput", "train_images_per_s", lambda v: f"{v:.0f} images/s")
    elif history:
        # No test evaluation yet: summarise what the history shows so far.
        val = [r["val_acc"] for r in history if r.get("val_acc") is not None]
        lines.append(f"| Epochs done so far | {len(history)} |")
        if val:
            best_row = max((r for r in history if r.get("val_acc") is not None), key=lambda r: r["val_acc"])
            lines.append(f"| Best validation accuracy so far | {100 * best_row['val_acc']:.2f} % "
                         f"(epoch {best_row['epoch']}) |")
        last = history[-1]
        for name, key in (("Last train loss", "train_loss"), ("Last validation loss", "val_loss")):
            if last.get(key) is not None:
                lines.append(f"| {name} | {last[key]:.4f} |")
        times = [r["epoch_time_s"] for r in history if r.get("epoch_time_s") is not None]
        if times:
            lines.append(f"| Training time so far | {_fmt_duration(sum(times))} |")
        ips = [r["images_per_s"] for r in history if r.get("images_per_s") is not None]
        if ips:
            lines.append(f"| Training throughput | {np.mean(ips):.0f} images/s |")
    else:
        lines.append("| (no metrics or history yet) | |")
    lines.append("")

    per_class = None
    if metrics and metrics.get("per_class_acc") is not None:
        per_class = np.asarray(metrics["per_class_acc"], dtype=float)
    elif cm is not None:
        per_class = np.diag(cm) / np.maximum(cm.sum(axis=1), 1)
    if per_class is not None:
        lines += ["## Per-class accuracy", "", "| class | accuracy | test images |", "| --- | ---: | ---: |"]
        for c, acc in enumerate(per_class):
            n = str(int(cm[c].sum())) if cm is not None else ""
            lines.append(f"| {label_names[c]} | {100 * acc:.1f} % | {n} |")
        lines.append("")

    if cm is not None:
        lines += ["## Most confused class pairs", "",
                  "| true class | predicted as | count | share of true class |",
                  "| --- | --- | ---: | ---: |"]
        for i, j, count in most_confused_pairs(cm, 5):
            lines.append(f"| {label_names[i]} | {label_names[j]} | {count} | "
                         f"{100 * count / max(cm[i].sum(), 1):.1f} % |")
        lines.append("")

    if figures:
        lines += ["## Figures", ""]
        for stem, caption in figures:
            lines += [f"### {FIGURE_TITLES[stem]}", "",
                      f"![{FIGURE_TITLES[stem]}](figures/{stem}.png)", ""]
            if caption:
                lines += [caption, ""]

    if config:
        lines += ["## Configuration", "", "| key | value |", "| --- | --- |"]
        lines += [f"| {k} | {_fmt_value(v)} |" for k, v in config.items()]
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Orchestration and CLI
# --------------------------------------------------------------------------

def make_report(run_dir, tsne_samples=DEFAULT_TSNE_SAMPLES, gallery_size=DEFAULT_GALLERY_SIZE,
                data_dir=None, seed=None, log=print):
    """Draw every figure the run folder allows and write report.md.

    Returns the list of figure paths written. Raises RunFolderError (before
    writing anything) when run_dir is not a run folder. `log` receives one
    line per figure (with its timing) and one per thing missing or skipped.
    """
    run = load_run(run_dir)
    out_dir = run["run_dir"]
    config, history, metrics, preds = run["config"], run["history"], run["metrics"], run["predictions"]
    if seed is None:
        seed = int((config or {}).get("seed") or 0)
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(exist_ok=True)

    notes = []  # lines for the console and the top of the report

    def note(line):
        notes.append(line)
        log(line)

    missing = run["missing"]
    if "metrics.json" in missing or "predictions.npz" in missing:
        absent = " and ".join(n for n in ("metrics.json", "predictions.npz") if n in missing)
        lacking = ", ".join(m for m in missing if m not in ("metrics.json", "predictions.npz"))
        note(f"Partial run: {absent} not found{' (nor ' + lacking + ')' if lacking else ''} "
             "- the run is still training or stopped before the test evaluation; "
             "drawing only what the files allow.")
    elif missing:
        note(f"Missing from the run folder: {', '.join(missing)}.")

    label_names = None
    if metrics and metrics.get("label_names"):
        label_names = list(metrics["label_names"])
    n_classes = preds["probs"].shape[1] if preds is not None else 10
    if label_names is None or len(label_names) != n_classes:
        label_names = CIFAR10_CLASSES if n_classes == 10 else [str(c) for c in range(n_classes)]

    figures, written = [], []

    def emit(stem, draw, caption="", start=None):
        # `start` lets a figure count the loading it needed (the gallery's images).
        start = time.perf_counter() if start is None else start
        fig = draw()
        path = fig_dir / f"{stem}.png"
        save_figure(fig, path)
        figures.append((stem, caption))
        written.append(path)
        log(f"  {stem + '.png':<22s} {time.perf_counter() - start:6.2f} s")

    # 1. Training curves
    if history:
        best_epoch = metrics.get("best_epoch") if metrics else None
        emit("training_curves", lambda: plot_training_curves(history, best_epoch))
    elif history is not None:
        note("history.json has no epochs yet: no training curves.")

    # 2. Confusion matrix: metrics.json has it; predictions can rebuild it.
    cm = None
    if metrics and metrics.get("confusion_matrix") is not None:
        cm = np.asarray(metrics["confusion_matrix"], dtype=np.int64)
    elif preds is not None:
        cm = confusion_matrix(preds["labels"], preds["probs"].argmax(axis=1), n_classes)
    if cm is not None:
        emit("confusion_matrix", lambda: plot_confusion_matrix(cm, label_names))

    if preds is not None:
        probs, labels = preds["probs"], preds["labels"]

        # 3. Reliability diagram
        ece_plotted = expected_calibration_error(probs, labels, N_BINS)
        caption = f"ECE in the diagram: {ece_plotted:.4f}"
        if metrics and metrics.get("ece") is not None:
            if abs(metrics["ece"] - ece_plotted) <= 1e-6:
                caption += " (equal to metrics.json)."
            else:
                caption += f" - differs from metrics.json's {metrics['ece']:.4f}."
                note(f"ECE recomputed from predictions.npz ({ece_plotted:.6f}) differs from "
                     f"metrics.json ({metrics['ece']:.6f}); the files may come from different evaluations.")
        emit("reliability", lambda: plot_reliability(probs, labels, N_BINS), caption)

        # 4. t-SNE of the hidden states
        if "hidden" not in preds:
            note("predictions.npz has no 'hidden' array: no t-SNE figure.")
        elif tsne_samples == 0:
            log("  tsne.png               skipped (--tsne-samples 0)")
        elif tsne_samples < 5:
            note(f"--tsne-samples {tsne_samples} is too small for t-SNE (need at least 5): no t-SNE figure.")
        else:
            rows = stratified_sample(labels, tsne_samples, seed)

            def draw_tsne():
                emb = tsne_embedding(preds["hidden"][rows], seed)
                return plot_tsne(emb, labels[rows], label_names, len(labels))
            emit("tsne", draw_tsne, f"{len(rows)} points, stratified by true class, seed {seed}.")

        # 5. Misclassification gallery
        if gallery_size < 1:
            log("  misclassified.png      skipped (--gallery-size 0)")
        else:
            _gallery(preds, config, out_dir, data_dir, gallery_size, label_names, emit, note)

    report = build_report(run, figures, notes, label_names, cm)
    write_text_atomic(out_dir / "report.md", report)
    return written


def _gallery(preds, config, run_dir, data_dir, gallery_size, label_names, emit, note):
    """Draw the gallery if the test images can be found; return the test indices shown."""
    start = time.perf_counter()
    probs, labels, indices = preds["probs"], preds["labels"], preds["indices"]
    rows = most_confident_mistakes(probs, labels, gallery_size)
    if len(rows) == 0:
        note("No misclassified test images: no gallery.")
        return None
    candidates = resolve_data_dir(config, run_dir, data_dir)
    images = test_labels = None
    for candidate in candidates:
        try:
            images, test_labels, _ = load_test_images(candidate)
            break
        except FileNotFoundError:
            continue
    if images is None:
        tried = " or ".join(str(c) for c in dict.fromkeys(candidates))
        note(f"Skipped misclassified.png: no CIFAR-10 test batch found in {tried}; "
             "pass --data-dir pointing at the folder that holds cifar-10-batches-py/.")
        return None
    shown = indices[rows]
    if (indices.min() < 0 or indices.max() >= len(images)
            or not np.array_equal(test_labels[indices], labels)):
        note(f"Skipped misclassified.png: the test images in {candidate} do not match the run's "
             "labels; pass --data-dir pointing at the data the run was evaluated on.")
        return None
    pred = probs[rows].argmax(axis=1)
    conf = probs[rows].max(axis=1)
    n_wrong = int((probs.argmax(axis=1) != labels).sum())
    caption = ("Test-set indices shown, most confident first: "
               + ", ".join(str(int(i)) for i in shown) + ".")
    emit("misclassified",
         lambda: plot_gallery(images[shown], labels[rows], pred, conf, label_names, n_wrong),
         caption, start)
    return shown


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Write figures/*.png and report.md into a run folder written by main.py.")
    parser.add_argument("run_dir", help="run folder, e.g. runs/latest")
    parser.add_argument("--tsne-samples", type=int, default=DEFAULT_TSNE_SAMPLES,
                        help=f"points in the t-SNE sample (default {DEFAULT_TSNE_SAMPLES}; 0 skips t-SNE)")
    parser.add_argument("--gallery-size", type=int, default=DEFAULT_GALLERY_SIZE,
                        help=f"images in the misclassification gallery (default {DEFAULT_GALLERY_SIZE}; 0 skips it)")
    parser.add_argument("--data-dir", default=None,
                        help="data folder holding cifar-10-batches-py/ (default: the run config's data_dir)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed for the t-SNE sample and embedding (default: the run's seed)")
    return parser.parse_args(argv)


def main(argv=None):
    """CLI entry point; returns the exit code (0 done, 2 not a run folder)."""
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        written = make_report(args.run_dir, args.tsne_samples, args.gallery_size,
                              args.data_dir, args.seed)
    except RunFolderError as e:
        print(f"viz.py: {e}", file=sys.stderr)
        return EXIT_NOT_A_RUN
    out_dir = Path(args.run_dir).resolve()
    print(f"Wrote report.md and {len(written)} figure(s) to {out_dir} "
          f"in {time.perf_counter() - start:.1f} s.")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
