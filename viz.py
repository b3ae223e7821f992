"""Turn a run folder into figures and a Markdown report.

    python viz.py runs/latest [--tsne-samples N] [--gallery-size N]
                              [--data-dir DIR] [--seed S]

A run folder (README.md, "The run folder") is written by main.py. This script
reads what it finds there and writes, atomically, into the same folder:

    figures/training_curves.png   loss, accuracy and learning rate per epoch  (history.json)
    figures/confusion_matrix.png  counts and row-normalised rates   (metrics.json or predictions.npz)
    figures/reliability.png       reliability diagram + confidence histogram, raw and calibrated by
                                  metrics.json's temperature           (predictions.npz + metrics.json)
    figures/tsne.png              t-SNE of the final RNN hidden states        (predictions.npz)
    figures/misclassified.png     most confidently wrong test images   (predictions.npz + test images)
    report.md                     configuration, headline metrics, tables, every figure embedded

A run that is still training (no metrics.json / predictions.npz yet, or
main.py holding the run folder's lock) gets the figures its files allow and
exit code 0; so does a run whose test images cannot be found (no gallery).
Everything is checked before the first file is written: the options, every
file of the run folder (a named pipe, a device or a folder where a file
should be is refused, not waited on) and every number the figures and the
report use (a NaN, an accuracy outside [0, 1], probabilities that do not sum
to 1 are refused), the test images of the gallery (damaged, or not the test
set the run was tested on), and that report.md and every figure can be
written. A refusal is one sentence on stderr and exit code 2, and changes
nothing. Exit codes are cli.py's: 3 for a crash (a bug), 130 for Ctrl-C or
SIGTERM.

The numbers come from metrics.py (as in metrics.json); the run's files are
read and checked by runfiles.read_run (the run-folder contract), the test
images by data_utils.py. matplotlib and
scikit-learn are imported inside the functions that draw, so importing this
module is cheap.
"""

import cli                      # standard library only: set up before the slow imports below

if __name__ == '__main__':
    # A Ctrl-C or SIGTERM from here on ends with one line and exit code 130, not a
    # KeyboardInterrupt traceback: during the imports through cli's excepthook, later in main().
    cli.exit_cleanly_on_interrupt_while_starting()

import argparse
import datetime
import json
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import data_utils
import runfiles
from data_utils import ARCHIVE_NAME, FOLDER_NAME, NUM_CLASSES, DataError, apportion, fingerprint, load_test_set
from metrics import (N_BINS, TIME_TO_VAL_ACC, apply_temperature, calibration_report, confusion_matrix,
                     expected_calibration_error, per_class_accuracy, reliability_stats, time_to_accuracy)
from runfiles import (FIGURES_NAME, LOCK_NAME, MAX_SEED, REPORT_NAME, TEMP_MARK, RunFileError, RunFolderLock,
                      check_regular, describe_os_error, read_run, typed_path, write_atomic, write_text)

REPO = Path(__file__).resolve().parent

# Used when metrics.json does not name the classes.
CIFAR10_CLASSES = ['airplane', 'automobile', 'bird', 'cat', 'deer',
                   'dog', 'frog', 'horse', 'ship', 'truck']

DEFAULT_TSNE_SAMPLES = 2000
DEFAULT_GALLERY_SIZE = 36
# t-SNE needs a handful of points (perplexity < n); it cannot sample more than the
# 10,000 test images, and 10,000 already takes about a minute on one core.
MIN_TSNE_SAMPLES = 5
MAX_TSNE_SAMPLES = 10_000
# A 10 x 10 grid is about 1750 x 2000 pixels with each 32 x 32 image shown 5x; more
# images make each one too small to read (and 1,000,000 took minutes and 4.5 GB).
MAX_GALLERY_SIZE = 100
# Figures label classes with their names; longer names are shortened so the axes keep room.
FIGURE_NAME_CHARS = 24
# t-SNE budget for the default 2,000 points: ~4 s on one core. Past ~400
# iterations the layout only spreads out; a coarser Barnes-Hut angle (0.6 vs
# 0.5) is ~25% faster with no visible change at this size.
TSNE_MAX_ITER = 400
TSNE_ANGLE = 0.6
DPI = 100

# Exit codes of main(), the same for every tool (cli.py).
EXIT_OK = cli.EXIT_OK
EXIT_BAD_INPUT = cli.EXIT_BAD_INPUT
EXIT_CRASHED = cli.EXIT_CRASHED
EXIT_ABORTED = cli.EXIT_ABORTED


# --------------------------------------------------------------------------
# Small numeric helpers
# --------------------------------------------------------------------------

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
    order = np.argsort(-confidence, kind='stable')
    return wrong[order[:k]]


def stratified_sample(labels, n, seed=0):
    """A seeded sample of n rows with the class proportions of `labels`.

    Each class gets its share of n (data_utils.apportion: largest-remainder
    rounding, so the total is exactly n) drawn without replacement.
    labels: (N,) int. Returns sorted (min(n, N),) int row indices.
    """
    labels = np.asarray(labels)
    if n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    chosen = [rng.choice(np.flatnonzero(labels == c), size=q, replace=False)
              for c, q in zip(classes, apportion(counts, n))]
    return np.sort(np.concatenate(chosen))


# --------------------------------------------------------------------------
# Commands in messages: they must work when typed
# --------------------------------------------------------------------------

def command(tool, *args):
    """'python <tool> ARGS' for a tool of this repository, typed from the current folder.

    args: option strings (taken as they are) and Paths (made typeable by runfiles.typed_path).
    """
    words = [typed_path(REPO / tool)] + [typed_path(a) if isinstance(a, Path) else a for a in args]
    return 'python ' + ' '.join(words)


# --------------------------------------------------------------------------
# Options and the run folder, checked before anything is drawn
# --------------------------------------------------------------------------

class RunFolderError(Exception):
    """What viz.py needs beyond the run's own files is unusable (the gallery's test images, a folder
    where a figure or the report goes); the message says why and what to do. The run's files are
    refused by runfiles.read_run (RunFileError, RecordError)."""


class DrawingInterrupted(BaseException):
    """SIGINT or SIGTERM arrived while the figures were being written.

    `signal` names it; `written` lists the figures written completely before it.
    A BaseException like cli.StartupInterrupted, so no ``except Exception`` swallows it.
    """

    def __init__(self, signal, written):
        super().__init__(signal)
        self.signal, self.written = signal, list(written)


def check_options(tsne_samples, gallery_size, seed, data_dir=None):
    """The first problem with the drawing options as one sentence, or None."""
    if tsne_samples < 0:
        return f'--tsne-samples {tsne_samples} is negative; give a number of points, or 0 to skip t-SNE'
    if 0 < tsne_samples < MIN_TSNE_SAMPLES or tsne_samples > MAX_TSNE_SAMPLES:
        why = ('too few for t-SNE' if tsne_samples < MIN_TSNE_SAMPLES else
               f'more than the {MAX_TSNE_SAMPLES} test images t-SNE can sample')
        return (f'--tsne-samples {tsne_samples} is {why}; give {MIN_TSNE_SAMPLES} to '
                f'{MAX_TSNE_SAMPLES} points, or 0 to skip t-SNE')
    if gallery_size < 0:
        return f'--gallery-size {gallery_size} is negative; give a number of images, or 0 for no gallery'
    if gallery_size > MAX_GALLERY_SIZE:
        side = math.isqrt(MAX_GALLERY_SIZE)
        return (f'--gallery-size {gallery_size} is more than the {MAX_GALLERY_SIZE} images a readable '
                f'gallery holds ({side} x {side}); give 1 to {MAX_GALLERY_SIZE}, or 0 for no gallery')
    if seed is not None and not 0 <= seed <= MAX_SEED:
        return f'--seed {seed} is outside [0, {MAX_SEED}]; give an integer in that range, as for main.py'
    if data_dir is not None and not data_dir.strip():
        return ('--data-dir was given an empty path; give the folder holding cifar-10-batches-py/ or '
                f"{ARCHIVE_NAME}, or leave the option out to use the run's data_dir")
    return None


# --------------------------------------------------------------------------
# The test images of the gallery
# --------------------------------------------------------------------------

class _Unusable(Exception):
    """A data folder holds CIFAR-10 files that cannot serve as this run's test images."""


def resolve_data_dir(config, run_dir, override=None):
    """Candidate data folders, in the order to try them, without repeats.

    --data-dir wins alone (given as the extracted cifar-10-batches-py/ itself
    or the archive itself, its parent). Otherwise the config's data_dir
    (default 'data'): as given if absolute, else relative to the current
    directory and then to the repository root, which is the run folder's
    grandparent (runs/<run>/).
    """
    if override is not None:
        override = Path(override)
        return [override.parent if override.name in (FOLDER_NAME, ARCHIVE_NAME) else override]
    data_dir = Path((config or {}).get('data_dir') or 'data')
    if data_dir.is_absolute():
        return [data_dir]
    return list(dict.fromkeys([Path.cwd() / data_dir, Path(run_dir).parent.parent / data_dir]))


def _holds_cifar(folder):
    # lexists: a named pipe or a link to nothing is CIFAR-10 gone wrong, to be named, not passed over.
    return os.path.lexists(folder / FOLDER_NAME) or os.path.lexists(folder / ARCHIVE_NAME)


def _data_fix(folder):
    """What to do about a damaged data file, for viz.py (which reads the archive but never downloads it)."""
    archive = folder / ARCHIVE_NAME
    return (f'put a good copy of {ARCHIVE_NAME} at {typed_path(archive)} (viz.py reads it as it is) '
            f'and move {typed_path(folder / FOLDER_NAME)} aside')


def _read_test_set(folder):
    """(X (N, 3, 32, 32) uint8, y (N,) int64) of a data folder, or _Unusable naming what is wrong."""
    try:
        # data_utils opens every file as a regular one: a named pipe or a device is a DataError.
        X, y, _ = load_test_set(folder)
    except DataError as e:
        # data_utils' fix says to "run again to re-download", which main.py does and viz.py does not.
        hint = getattr(data_utils, '_redownload_hint', lambda d: None)(folder)
        text = str(e).replace(hint, _data_fix(folder)) if hint else str(e)
        raise _Unusable(text) from None
    except OSError as e:
        raise _Unusable(describe_os_error(e, e.filename or folder, 'read')) from None
    return X, y


def _matching_test_set(run, folder):
    """The test images of `folder` if they are the run's test set: (images (N, 32, 32, 3) HWC uint8, labels (N,)).

    The run's recorded fingerprint (metrics.json's data_fingerprint, new runs)
    decides; older runs are checked by their labels. Raises _Unusable.
    """
    X, y = _read_test_set(folder)
    other = (f'pass --data-dir the folder the run used (its config.json says '
             f"{(run.config or {}).get('data_dir') or 'data'})")
    recorded = ((run.metrics.data_fingerprint if run.metrics else None) or {}).get('test')
    if recorded is not None and fingerprint(X, y) != recorded:
        raise _Unusable(f'the test set in {folder} is not the one this run was tested on (its fingerprint '
                        f"differs from metrics.json's data_fingerprint); {other}")
    indices, labels = run.predictions.indices, run.predictions.labels
    if indices.max() >= len(X) or not np.array_equal(y[indices], labels):
        raise _Unusable(f"the test images in {folder} do not match the run's labels; {other}")
    # The archive stores NCHW rows; imshow wants HWC.
    return X.transpose(0, 2, 3, 1), y


def find_test_images(run, data_dir=None):
    """The test images (N, 32, 32, 3) uint8 HWC of a run (runfiles.Run) from the first data folder
    that holds them, or None.

    None when no candidate folder holds CIFAR-10 at all and --data-dir was not
    given (the gallery is then skipped). RunFolderError when the folder asked
    for holds nothing, or every folder that holds CIFAR-10 holds damaged files
    or another test set: the images are there but wrong, so the user decides.
    """
    candidates = resolve_data_dir(run.config, run.folder, data_dir)
    refusal = None
    for folder in (c for c in candidates if _holds_cifar(c)):
        try:
            return _matching_test_set(run, folder)[0]
        except _Unusable as e:
            refusal = refusal or str(e)
    skip = 'or pass --gallery-size 0 to draw the other figures without the gallery'
    if refusal is not None:
        raise RunFolderError(f'{refusal}, {skip}')
    if data_dir is not None:
        raise RunFolderError(f'--data-dir {data_dir} holds no CIFAR-10 test set (neither {FOLDER_NAME}/ '
                             f'nor {ARCHIVE_NAME}); pass the folder that holds one, {skip}')
    return None


# --------------------------------------------------------------------------
# The files written
# --------------------------------------------------------------------------

def _check_writable(folder):
    """RunFileError unless a new file can be made in `folder` (permissions, read-only mounts)."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=f'.viz{TEMP_MARK}')
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        # Name the folder, not the probe's random name: the folder is what to fix.
        raise RunFileError(describe_os_error(OSError(e.errno, e.strerror), folder)) from None


def _check_replaceable(path, what):
    """RunFolderError if a real folder sits where viz.py writes the file `path` (os.replace cannot replace it)."""
    if os.path.isdir(path) and not os.path.islink(path):
        raise RunFolderError(f'{path} is a folder, where viz.py writes {what}; move it aside or '
                             f'remove it, then run the command again')


def prepare_output(run_dir):
    """Check that report.md and every figure can be written, before the first figure; returns figures/.

    Refusing here rather than at the first failing write keeps a folder that
    cannot take the report from ending up with some of the figures.
    """
    _check_writable(run_dir)
    lock = run_dir / LOCK_NAME
    try:
        check_regular(lock)
    except OSError as e:
        # Said here because opening a folder for the lock fails as 'give the path of a file'.
        raise RunFolderError(f"{lock} is {getattr(e, 'kind', e.strerror)}, where main.py and viz.py "
                             f"keep the run folder's lock; remove it (it holds no data)") from None
    fig_dir = run_dir / FIGURES_NAME
    if os.path.lexists(fig_dir) and not fig_dir.is_dir():
        raise RunFolderError(f'{fig_dir} exists and is not a folder; move or delete it so that '
                             f'viz.py can put the figures there')
    _check_replaceable(run_dir / REPORT_NAME, 'the report')
    for stem in FIGURE_TITLES:
        _check_replaceable(fig_dir / f'{stem}.png', 'a figure')
    try:
        fig_dir.mkdir(exist_ok=True)
    except OSError as e:
        raise RunFileError(describe_os_error(e, fig_dir)) from None
    _check_writable(fig_dir)
    return fig_dir


# --------------------------------------------------------------------------
# Figures (object-oriented matplotlib: no pyplot, no global backend state)
# --------------------------------------------------------------------------

def _new_figure(**kwargs):
    # A bare Figure renders with Agg on savefig, so this stays headless even
    # when the caller has an interactive pyplot backend selected.
    from matplotlib.figure import Figure
    return Figure(layout='constrained', **kwargs)


def plot_training_curves(history, best_epoch=None):
    """Loss, accuracy and learning rate per epoch, best epoch marked.

    history: list of runfiles.EpochRecord (epoch, train_loss, train_acc,
    val_loss, val_acc (fractions), lr); missing values are drawn as gaps.
    best_epoch: epoch to mark (1-based); default the epoch of highest val_acc.
    Returns a matplotlib Figure.
    """
    from matplotlib.ticker import MaxNLocator

    def column(key):
        return np.array([np.nan if getattr(r, key) is None else float(getattr(r, key)) for r in history])

    epoch = column('epoch')
    if best_epoch is None:
        val_acc = column('val_acc')
        if np.isfinite(val_acc).any():
            best_epoch = int(epoch[np.nanargmax(val_acc)])
    # With few epochs a plain line is invisible; markers keep single points visible.
    style = {'marker': 'o', 'markersize': 3 if len(history) > 30 else 5}

    fig = _new_figure(figsize=(15, 4.4))
    ax_loss, ax_acc, ax_lr = fig.subplots(1, 3)
    ax_loss.plot(epoch, column('train_loss'), label='train', **style)
    ax_loss.plot(epoch, column('val_loss'), label='validation', **style)
    ax_loss.set(title='Loss', ylabel='cross-entropy loss')
    ax_acc.plot(epoch, 100 * column('train_acc'), label='train', **style)
    ax_acc.plot(epoch, 100 * column('val_acc'), label='validation', **style)
    ax_acc.set(title='Accuracy', ylabel='accuracy (%)')
    ax_lr.plot(epoch, column('lr'), color='tab:green', **style)
    ax_lr.set(title='Learning rate', ylabel='learning rate')
    ax_lr.ticklabel_format(axis='y', style='sci', scilimits=(-3, 3))

    if best_epoch is not None:
        for ax in (ax_loss, ax_acc, ax_lr):
            ax.axvline(best_epoch, color='0.4', linestyle='--', linewidth=1,
                       label=f'best epoch ({best_epoch})')
        row = [r for r in history if r.epoch == best_epoch]
        if row and row[0].val_acc is not None:
            ax_acc.plot([best_epoch], [100 * row[0].val_acc], marker='*', markersize=14,
                        color='tab:red', linestyle='none',
                        label=f'best val {100 * row[0].val_acc:.2f}%')
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.set_xlabel('epoch')
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
    panels = [(cm, 'Counts', '{:d}', 'Blues'), (rates, 'Row-normalised (fraction of true class)', '{:.2f}', 'Greens')]
    for ax, (values, title, fmt, cmap) in zip(axes, panels):
        image = ax.imshow(values, cmap=cmap, vmin=0, vmax=max(values.max(), 1e-12))
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02)
        # Dark text on light cells, light text on dark ones.
        threshold = values.max() / 2
        for i in range(c):
            for j in range(c):
                ax.text(j, i, fmt.format(values[i, j]), ha='center', va='center', fontsize=8,
                        color='white' if values[i, j] > threshold else 'black')
        ax.set_xticks(range(c), label_names, rotation=45, ha='right', rotation_mode='anchor')
        ax.set_yticks(range(c), label_names)
        ax.set(title=title, xlabel='predicted class', ylabel='true class')
    fig.suptitle(f'Confusion matrix on {int(cm.sum())} test images '
                 f'(accuracy {100 * np.trace(cm) / max(cm.sum(), 1):.2f}%)', fontsize=14)
    return fig


def plot_reliability(probs, labels, n_bins=N_BINS, calibrated=None, temperature=None):
    """Reliability diagram of the raw predictions and, if given, of the calibrated ones; a
    confidence histogram of each beneath.

    probs: (N, C) probabilities; labels: (N,) int; calibrated: (N, C) the same predictions after
    temperature scaling (metrics.apply_temperature with ``temperature``), or None to draw the raw
    ones alone. Each curve joins the bins' (mean confidence, accuracy) points (`confidence_bins`);
    on the diagonal a model is perfectly calibrated. The title carries `expected_calibration_error`
    of each. Returns a matplotlib Figure.
    """
    curves = [('raw', probs, 'tab:red', 'o')]
    if calibrated is not None:
        curves.append(('calibrated' + ('' if temperature is None else f', T = {temperature:.3f}'),
                       calibrated, 'tab:blue', 's'))
    fig = _new_figure(figsize=(7, 8.5))
    ax, ax_hist = fig.subplots(2, 1, sharex=True, gridspec_kw={'height_ratios': [3, 1]})
    ax.plot([0, 1], [0, 1], linestyle='--', color='0.3', label='perfect calibration')
    eces = []
    for name, p, color, marker in curves:
        stats = reliability_stats(p, labels, n_bins)
        ece = expected_calibration_error(p, labels, n_bins)
        eces.append(ece)
        filled = stats['count'] > 0
        ax.plot(stats['confidence'][filled], stats['accuracy'][filled], color=color, marker=marker,
                markersize=6, linewidth=1.8, label=f'{name}: ECE {ece:.4f}')
        confidence = np.asarray(p).max(axis=1)
        ax_hist.hist(confidence, bins=stats['edges'], histtype='step', color=color, linewidth=1.6,
                     label=f"{name.split(',')[0]}: mean confidence {100 * confidence.mean():.1f}%")
    ax_hist.axvline(stats['overall_accuracy'], color='0.2', linestyle='-', linewidth=1,
                    label=f"accuracy {100 * stats['overall_accuracy']:.1f}%")
    which = (f'ECE = {eces[0]:.4f} raw, {eces[1]:.4f} calibrated' if len(eces) > 1
             else f'ECE = {eces[0]:.4f} (raw only: no temperature)')
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel='accuracy in bin',
           title=f'Reliability diagram: {which}\n({n_bins} equal-width bins, {len(labels)} test predictions)')
    ax.legend(loc='upper left')
    ax.grid(alpha=0.3)
    ax_hist.set(xlabel='confidence (max class probability)', ylabel='predictions')
    ax_hist.legend(loc='upper right', fontsize=8)
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
        tsne = TSNE(n_components=2, init='pca', learning_rate='auto', perplexity=perplexity,
                    max_iter=TSNE_MAX_ITER, angle=TSNE_ANGLE, random_state=seed)
        return tsne.fit_transform(x)


def plot_tsne(embedding, labels, label_names, n_total):
    """Scatter of a t-SNE embedding coloured by true class.

    embedding: (n, 2); labels: (n,) int; n_total: size of the set sampled from
    (for the title). Returns a matplotlib Figure.
    """
    import matplotlib

    colors = matplotlib.colormaps['tab10']
    fig = _new_figure(figsize=(9, 7.5))
    ax = fig.subplots()
    for c, name in enumerate(label_names):
        mask = labels == c
        ax.scatter(embedding[mask, 0], embedding[mask, 1], s=6, color=colors(c % 10),
                   label=name, alpha=0.8, linewidths=0)
    ax.set(title=f't-SNE of the final RNN hidden states\n{len(labels)} test images '
                 f'(seeded stratified sample of {n_total}), coloured by true class',
           xticks=[], yticks=[])
    ax.legend(loc='center left', bbox_to_anchor=(1.01, 0.5), markerscale=3, frameon=False)
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
        ax.axis('off')
    for ax, image, t, p, c in zip(axes, images, true, pred, confidence):
        ax.imshow(image, interpolation='nearest')
        ax.set_title(f'true: {label_names[t]}\npred: {label_names[p]} {100 * c:.0f}%', fontsize=8)
    of = f' (of {n_wrong} errors)' if n_wrong is not None else ''
    fig.suptitle(f'The {k} most confidently wrong test predictions{of}', fontsize=12)
    return fig

# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------

FIGURE_TITLES = {
    'training_curves': 'Training curves',
    'confusion_matrix': 'Confusion matrix',
    'reliability': 'Reliability diagram',
    'tsne': 't-SNE of the final hidden states',
    'misclassified': 'Most confidently wrong predictions',
}

# Markdown's inline syntax, and $ (math on GitHub) and & (entities); every one of them may be
# backslash-escaped. An underscore inside a word (seq_layout) never starts emphasis, so it stays.
_MD_SPECIAL = re.compile(r'[\\`*\[\]<>|~#$&!{}]|(?<![^\W_])_|_(?![^\W_])')
# Line breaks would end a table row or a quote: control characters and Unicode line separators.
_LINE_BREAKS = re.compile(r'[\x00-\x1f\x7f\x85\u2028\u2029]+')


def md_text(text):
    """Any text from a file (class names, configuration values, paths) as literal Markdown, on one line."""
    return _MD_SPECIAL.sub(lambda m: '\\' + m.group(), _LINE_BREAKS.sub(' ', str(text)))


def md_code(text):
    """Text as one Markdown code span that a table cell can hold.

    The fence is longer than any run of backticks inside; a | must be \\| even in
    a code span, or the table splits there (GitHub shows it as |).
    """
    text = _LINE_BREAKS.sub(' ', str(text)).replace('|', '\\|')
    fence = '`' * (max((len(run) for run in re.findall('`+', text)), default=0) + 1)
    pad = ' ' if text.startswith('`') or text.endswith('`') else ''
    return f'{fence}{pad}{text}{pad}{fence}'


def figure_label(name):
    """A class name as figure text: one line, at most FIGURE_NAME_CHARS long, no mathtext.

    matplotlib reads $...$ as mathematics and raises on an unbalanced $; a
    legend entry starting with _ would be hidden.
    """
    name = _LINE_BREAKS.sub(' ', str(name))
    if len(name) > FIGURE_NAME_CHARS:
        name = name[:FIGURE_NAME_CHARS - 1] + '\u2026'
    name = name.replace('$', r'\$')
    return ' ' + name if name.startswith('_') else name


def _fmt_value(v):
    if isinstance(v, (dict, list)):
        return md_code(json.dumps(v))
    return md_text(v)


def build_report(run, figures, notes, label_names, cm, calibration=None):
    """The text of report.md.

    run: a runfiles.Run (read_run); figures: list of (stem, caption) drawn, in order;
    notes: lines about what is missing or skipped; label_names: C str;
    cm: (C, C) confusion counts or None; calibration: calibration_of(run) or None. Every text
    that comes from a file is escaped (md_text), so a class name such as 'a|b' cannot break a table.
    """
    config = run.config
    lines = [f'# Run report: {md_text(run.folder.name)}', '',
             f"Generated by `viz.py` on {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}.", '']
    if config:
        # One line for the settings people look for first; the full table is at the end.
        summary = [f'{key} {md_code(config[key])}' for key in ('preset', 'epochs', 'seq_layout', 'subset', 'seed')
                   if config.get(key) is not None]
        if summary:
            lines += ['Run: ' + ', '.join(summary) + ' (full configuration at the end).', '']
    if notes:
        lines += ['> ' + md_text(n) for n in notes] + ['']
    lines += _headline_section(run.metrics, run.history)
    lines += _calibration_section(calibration)
    names = [md_text(n) for n in label_names]
    lines += _per_class_section(run.metrics, cm, names)
    lines += _confused_section(cm, names)
    lines += _figures_section(figures)
    if config:
        lines += ['## Configuration', '', '| key | value |', '| --- | --- |']
        lines += [f'| {md_text(k)} | {_fmt_value(v)} |' for k, v in config.items()]
        lines.append('')
    return '\n'.join(lines)


def _headline_section(metrics, history):
    """The headline table: metrics.json's numbers (a runfiles.Metrics), or the history's so far
    (runfiles.EpochRecord); times to accuracy."""
    lines = ['## Headline metrics', '', '| metric | value |', '| --- | --- |']
    if metrics:
        lines += _metrics_rows(metrics)
    elif history:
        lines += _history_rows(history)
    else:
        lines.append('| (no metrics or history yet) | |')
    for threshold in TIME_TO_VAL_ACC:
        if history:
            seconds = time_to_accuracy([r.to_json() for r in history], threshold)
            shown = cli.format_duration(seconds) if seconds is not None else 'not reached'
            lines.append(f'| Validation accuracy {100 * threshold:.0f} % first reached | {shown} |')
    return lines + ['']


def _metrics_rows(metrics):
    """Table rows from a checked metrics.json (runfiles.Metrics: every number finite and in range)."""
    lines = []

    def row(name, key, fmt):
        if getattr(metrics, key) is not None:
            lines.append(f'| {name} | {fmt(getattr(metrics, key))} |')
    views = f' ({metrics.tta} test-time views averaged)' if metrics.tta not in (None, 'none') else ''
    row(f'Test accuracy{views}', 'test_acc', lambda v: f'{100 * v:.2f} %')
    if metrics.calibration is not None:      # the raw figures are the method's; the calibrated ones labelled
        cal = metrics.calibration['calibrated']
        lines.append(f"| Test loss (NLL) | {metrics.test_loss:.4f} raw, {cal['nll']:.4f} calibrated "
                     f"(T = {metrics.temperature:.3f}) |")
        lines.append(f"| ECE ({N_BINS} bins) | {metrics.ece:.4f} raw, {cal['ece']:.4f} calibrated |")
    else:
        row('Test loss', 'test_loss', lambda v: f'{v:.4f}')
        row(f'ECE ({N_BINS} bins)', 'ece', lambda v: f'{v:.4f}')
    single = metrics.single_view
    if single is not None:
        lines.append(f"| One view (no test-time augmentation) | {100 * single['test_acc']:.2f} %, "
                     f"ECE {single['ece']:.4f} |")
    best = metrics.best_val_acc
    if best is not None:
        at = f' (epoch {metrics.best_epoch})' if metrics.best_epoch is not None else ''
        lines.append(f'| Best validation accuracy | {100 * best:.2f} %{at} |')
    if metrics.epochs_done is not None:
        early = ' (stopped early)' if metrics.stopped_early else ''
        lines.append(f'| Epochs trained | {metrics.epochs_done}{early} |')
    row('Wall time', 'wall_time_s', cli.format_duration)
    row('Training throughput', 'train_images_per_s', lambda v: f'{v:.0f} images/s')
    return lines


def _calibration_section(calibration):
    """The calibration table: raw and calibrated NLL and ECE, the ECE's noise, and one sentence on
    whether the model can be told apart from a perfectly calibrated one. [] without predictions."""
    if calibration is None:
        return []
    raw, cal, t = calibration['raw'], calibration['calibrated'], calibration['temperature']
    reports = [raw] + ([cal] if cal is not None else [])
    header = '| | raw |' + (f' calibrated (T = {t:.3f}) |' if cal is not None else '')
    lines = ['## Calibration', '', header, '| --- |' + ' ---: |' * len(reports)]

    def row(name, cell):
        lines.append(f'| {name} | ' + ' | '.join(cell(r) for r in reports) + ' |')
    row('Test loss (NLL)', lambda r: f"{r['nll']:.4f}")
    row(f'ECE, {N_BINS} equal-width bins (the method\'s)', lambda r: f"{r['ece']:.4f}")
    row(f'ECE, {N_BINS} equal-mass bins', lambda r: f"{r['ece_equal_mass']:.4f}")
    row('ECE, debiased (Kumar et al. 2019)', lambda r: f"{r['ece_debiased']:.4f}")
    row('ECE, bootstrap 95% interval', lambda r: f"{r['ece_ci95'][0]:.4f} to {r['ece_ci95'][1]:.4f}")
    row('ECE of a perfectly calibrated model with these confidences: mean (95th percentile)',
        lambda r: f"{r['ece_if_calibrated']['mean']:.4f} ({r['ece_if_calibrated']['p95']:.4f})")
    row('Mean confidence', lambda r: f"{100 * r['mean_confidence']:.2f} %")
    if all(r.get('accuracy') is not None for r in reports):
        row('Accuracy', lambda r: f"{100 * r['accuracy']:.2f} %")
    lines += ['', distinguishable_sentence(raw, cal), '']
    fit = calibration.get('validation') or {}
    if cal is None:
        lines += ['No temperature is recorded for this run (a run of an earlier version), so only the raw '
                  f"predictions are shown; {md_code(calibration['how_to_fit'])} fits it.", '']
    elif fit.get('images'):
        nll = (f" (validation NLL {fit['nll']:.4f} raw, {fit['nll_calibrated']:.4f} calibrated)"
               if fit.get('nll') is not None and fit.get('nll_calibrated') is not None else '')
        lines += [f"T was fitted on the {fit['images']} validation images{nll}, on the same outputs as the test "
                  "figures; dividing the log-probabilities by T changes no prediction, so the accuracy is "
                  "the raw one.", '']
    return lines


def distinguishable_sentence(raw, calibrated=None):
    """ONE sentence: whether the raw (and the calibrated) predictions' ECE is above the 95th
    percentile of the ECE that a perfectly calibrated model with the same confidences scores."""
    def figures(r):
        return (f"ECE {r['ece']:.4f}, {'above' if r['distinguishable'] else 'not above'} "
                f"{r['ece_if_calibrated']['p95']:.4f}")
    text = (f"The raw predictions are {'' if raw['distinguishable'] else 'not '}distinguishable from a perfectly "
            f"calibrated model ({figures(raw)}, the 95th percentile of the ECE of one with the same confidences)")
    if calibrated is not None:
        text += (f"; after temperature scaling they are {'' if calibrated['distinguishable'] else 'not '}"
                 f"({figures(calibrated)})")
    return text + '.'


def _history_rows(history):
    """Table rows for a run without a test evaluation yet: what the history shows so far."""
    val = [r for r in history if r.val_acc is not None]
    lines = [f'| Epochs done so far | {len(history)} |']
    if val:
        best_row = max(val, key=lambda r: r.val_acc)
        lines.append(f'| Best validation accuracy so far | {100 * best_row.val_acc:.2f} % '
                     f'(epoch {best_row.epoch}) |')
    last = history[-1]
    for name, value in (('Last train loss', last.train_loss), ('Last validation loss', last.val_loss)):
        if value is not None:
            lines.append(f'| {name} | {value:.4f} |')
    times = [r.epoch_time_s for r in history if r.epoch_time_s is not None]
    if times:
        lines.append(f'| Training time so far | {cli.format_duration(sum(times))} |')
    ips = [r.images_per_s for r in history if r.images_per_s is not None]
    if ips:
        lines.append(f'| Training throughput | {np.mean(ips):.0f} images/s |')
    return lines


def _per_class_section(metrics, cm, names):
    """Accuracy per true class (metrics.json's, else from the confusion matrix); names escaped."""
    per_class = None
    if metrics and metrics.per_class_acc is not None:
        per_class = np.asarray(metrics.per_class_acc, dtype=float)
    elif cm is not None:
        per_class = per_class_accuracy(cm)
    if per_class is None:
        return []
    lines = ['## Per-class accuracy', '', '| class | accuracy | test images |', '| --- | ---: | ---: |']
    for c, acc in enumerate(per_class):
        n = str(int(cm[c].sum())) if cm is not None else ''
        lines.append(f'| {names[c]} | {100 * acc:.1f} % | {n} |')
    return lines + ['']


def _confused_section(cm, names):
    """The five largest off-diagonal cells of the confusion matrix; names escaped."""
    if cm is None:
        return []
    lines = ['## Most confused class pairs', '',
             '| true class | predicted as | count | share of true class |',
             '| --- | --- | ---: | ---: |']
    for i, j, count in most_confused_pairs(cm, 5):
        lines.append(f'| {names[i]} | {names[j]} | {count} | {100 * count / max(cm[i].sum(), 1):.1f} % |')
    return lines + ['']


def _figures_section(figures):
    """Every figure drawn, embedded, with its caption (captions quote files only through md_text)."""
    if not figures:
        return []
    lines = ['## Figures', '']
    for stem, caption in figures:
        lines += [f'### {FIGURE_TITLES[stem]}', '', f'![{FIGURE_TITLES[stem]}](figures/{stem}.png)', '']
        if caption:
            lines += [caption, '']
    return lines


# --------------------------------------------------------------------------
# Orchestration and CLI
# --------------------------------------------------------------------------

def make_report(run_dir, tsne_samples=DEFAULT_TSNE_SAMPLES, gallery_size=DEFAULT_GALLERY_SIZE,
                data_dir=None, seed=None, log=print):
    """Draw every figure the run folder allows and write report.md.

    Returns the list of figure paths written. Everything that can be checked
    is checked before the first file is written: the options (ValueError),
    the folder, every file and every value the figures use (runfiles.read_run:
    RunFileError, RecordError), the gallery's test images (RunFolderError,
    RunFileError) and that figures/, every
    figure and report.md can be written (RunFileError, RunFolderError).
    `log` receives one line per figure (with its timing) and one per thing
    missing or skipped. A SIGINT/SIGTERM (cli's handlers) while drawing raises
    DrawingInterrupted with the figures written so far.
    """
    problem = check_options(tsne_samples, gallery_size, seed, data_dir)
    if problem:
        raise ValueError(problem)
    run = read_run(run_dir)
    if seed is None:
        seed = (run.config or {}).get('seed') or 0
    plan = plan_report(run, tsne_samples, gallery_size, data_dir, seed, log)
    fig_dir = prepare_output(run.folder)
    lock = RunFolderLock(run.folder, 'viz.py')
    # Busy means main.py is still writing: its files are each complete (atomic
    # writes), so draw what they hold now, but leave its temporary files alone.
    if not lock.acquire(busy_ok=True):
        log(f'{run.folder} is in use by another process (main.py still training?); '
            'drawing what its files hold now.')
    written = []
    try:
        cli.raise_if_interrupted_while_starting()     # one whose exception was discarded on the way
        _draw(plan, fig_dir, log, written)
        write_text(run.folder / REPORT_NAME, build_report(
            run, [(stem, caption) for stem, _, caption, _ in plan.figures], plan.notes, plan.label_names, plan.cm,
            plan.calibration))
        return written
    except cli.StartupInterrupted as e:
        raise DrawingInterrupted(str(e), written) from None
    finally:
        lock.release()


@dataclass
class Plan:
    """What make_report draws, decided and loaded before the first file is written.

    figures: (stem, draw() -> Figure, caption, seconds already spent preparing it), in order;
    notes: lines for the console and the top of the report; label_names: C str;
    cm: (C, C) confusion counts or None; calibration: the report's calibration figures
    (calibration_of) or None.
    """
    label_names: list
    cm: np.ndarray = None
    figures: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    calibration: dict = None


def plan_report(run, tsne_samples, gallery_size, data_dir, seed, log):
    """The Plan of a run (runfiles.Run). Raises RunFolderError when the gallery's test images are
    there but unusable."""
    metrics, preds = run.metrics, run.predictions
    n_classes = preds.n_classes if preds is not None else NUM_CLASSES
    names = list(metrics.label_names or []) if metrics else []
    if len(names) != n_classes:
        names = CIFAR10_CLASSES if n_classes == 10 else [str(c) for c in range(n_classes)]
    # metrics.json has the confusion matrix; predictions can rebuild it.
    if metrics and metrics.confusion_matrix is not None:
        cm = np.asarray(metrics.confusion_matrix, dtype=np.int64)
    elif preds is not None:
        cm = confusion_matrix(preds.labels, preds.probs.argmax(axis=1), n_classes)
    else:
        cm = None
    plan, shown = Plan(names, cm), [figure_label(n) for n in names]

    def note(line):
        plan.notes.append(line)
        log(line)
    for line in _missing_notes(run):
        note(line)
    if run.history:
        best_epoch = metrics.best_epoch if metrics else None
        plan.figures.append(('training_curves', lambda: plot_training_curves(run.history, best_epoch), '', 0))
    elif run.history is not None:
        note('history.json has no epochs yet: no training curves.')
    if cm is not None:
        plan.figures.append(('confusion_matrix', lambda: plot_confusion_matrix(cm, shown), '', 0))
    plan.calibration = calibration_of(run)
    if preds is not None:
        plan.figures.append(_reliability_spec(run, note))
        plan.figures += _tsne_spec(preds, tsne_samples, seed, shown, note, log)
        plan.figures += _gallery_spec(run, data_dir, gallery_size, shown, note, log)
    return plan


def _missing_notes(run):
    """The line about the files a run (runfiles.Run) lacks, as a list of 0 or 1 lines; for a
    partial run, why, from its status."""
    missing, evaluation = run.missing, (runfiles.METRICS_NAME, runfiles.PREDICTIONS_NAME)
    if not any(name in missing for name in evaluation):
        return [f"Missing from the run folder: {', '.join(missing)}."] if missing else []
    absent = ' and '.join(n for n in evaluation if n in missing)
    lacking = ', '.join(m for m in missing if m not in evaluation)
    st = run.status
    why = {runfiles.IN_USE: 'the run is still training',
           runfiles.STOPPED: f"the run stopped at epoch {st.epoch} of {st.epochs} "
                             f"({command('main.py', '--resume', run.folder)} continues it)",
           runfiles.NEEDS_EVALUATION: 'the run stopped before its test evaluation',
           }.get(st.state, 'the run is still training or stopped before the test evaluation')
    return [f"Partial run: {absent} not found{' (nor ' + lacking + ')' if lacking else ''} - {why}; "
            'drawing only what the files allow.']


def calibration_of(run):
    """What the report says of calibration (a runfiles.Run), or None without predictions or metrics:
    {'temperature', 'raw', 'calibrated', 'validation'} from metrics.json (reports of
    metrics.calibration_report), or for a run without a temperature (an earlier version) the raw
    report computed from predictions.npz, with temperature and calibrated None and how_to_fit the
    command that fits the temperature."""
    metrics, preds = run.metrics, run.predictions
    if metrics is not None and metrics.calibration is not None:
        return dict(metrics.calibration, temperature=metrics.temperature)
    if preds is None:
        return None
    return {'temperature': None, 'raw': calibration_report(preds.probs, preds.labels, N_BINS),
            'calibrated': None, 'validation': None,
            'how_to_fit': command('main.py', '--resume', run.folder, '--evaluate')}


def calibrated_probabilities(preds, metrics):
    """(N, C) the calibrated test probabilities of a run: predictions.npz's probs_calibrated, else its
    probs tempered by metrics.json's temperature; None when the run records no temperature."""
    if preds.probs_calibrated is not None:
        return preds.probs_calibrated
    if metrics is not None and metrics.temperature is not None:
        return apply_temperature(preds.probs, metrics.temperature)
    return None


def _reliability_spec(run, note):
    """The reliability diagram's figure spec, raw and calibrated; a note if its ECE differs from
    metrics.json's, or if the run has no temperature (then the raw predictions are drawn alone)."""
    preds, metrics = run.predictions, run.metrics
    probs, labels = preds.probs, preds.labels
    temperature = metrics.temperature if metrics else None
    calibrated = calibrated_probabilities(preds, metrics)
    ece_plotted = expected_calibration_error(probs, labels, N_BINS)
    caption = f'ECE in the diagram: {ece_plotted:.4f}'
    if metrics:
        if abs(metrics.ece - ece_plotted) <= 1e-6:
            caption += ' (equal to metrics.json)'
        else:
            caption += f" (differs from metrics.json's {metrics.ece:.4f})"
            note(f'ECE recomputed from predictions.npz ({ece_plotted:.6f}) differs from '
                 f'metrics.json ({metrics.ece:.6f}); the files may come from different evaluations.')
    if calibrated is not None:
        with_t = '' if temperature is None else f' with T = {temperature:.3f} fitted on the validation set'
        caption += (f' for the raw predictions, {expected_calibration_error(calibrated, labels, N_BINS):.4f} '
                    f'after temperature scaling{with_t}.')
    else:
        caption += ' for the raw predictions; no temperature was fitted, so the calibrated ones are not drawn.'
        if metrics:
            note(f"metrics.json holds no temperature (a run of an earlier version): the reliability diagram "
                 f"and the report show the raw predictions only; "
                 f"{command('main.py', '--resume', run.folder, '--evaluate')} fits it.")
    return ('reliability', lambda: plot_reliability(probs, labels, N_BINS, calibrated, temperature), caption, 0)


def _tsne_spec(preds, tsne_samples, seed, names, note, log):
    """[] or [the t-SNE figure spec] of a seeded stratified sample of the hidden states."""
    labels = preds.labels
    if preds.hidden is None:
        note("predictions.npz has no 'hidden' array: no t-SNE figure.")
        return []
    if tsne_samples == 0:
        log('  tsne.png               skipped (--tsne-samples 0)')
        return []
    if len(labels) < MIN_TSNE_SAMPLES:
        note(f'predictions.npz holds {len(labels)} test predictions, too few for t-SNE '
             f'(need at least {MIN_TSNE_SAMPLES}): no t-SNE figure.')
        return []
    rows = stratified_sample(labels, tsne_samples, seed)

    def draw():
        emb = tsne_embedding(preds.hidden[rows], seed)
        return plot_tsne(emb, labels[rows], names, len(labels))
    return [('tsne', draw, f'{len(rows)} points, stratified by true class, seed {seed}.', 0)]


def _gallery_spec(run, data_dir, gallery_size, names, note, log):
    """[] or [the gallery's figure spec], its test images already loaded and checked."""
    if gallery_size == 0:
        log('  misclassified.png      skipped (--gallery-size 0)')
        return []
    start = time.perf_counter()
    probs, labels, indices = run.predictions.probs, run.predictions.labels, run.predictions.indices
    rows = most_confident_mistakes(probs, labels, gallery_size)
    if len(rows) == 0:
        note('No misclassified test images: no gallery.')
        return []
    images = find_test_images(run, data_dir)
    if images is None:
        tried = ' or '.join(str(c) for c in resolve_data_dir(run.config, run.folder))
        note(f'Skipped misclassified.png: no CIFAR-10 test batch found in {tried}; pass --data-dir '
             f'pointing at the folder that holds {FOLDER_NAME}/ or {ARCHIVE_NAME}.')
        return []
    shown = indices[rows]
    images = images[shown]       # only the k shown: the 10,000 test images are not kept
    pred, conf = probs[rows].argmax(axis=1), probs[rows].max(axis=1)
    n_wrong = int((probs.argmax(axis=1) != labels).sum())
    caption = ('Test-set indices shown, most confident first: '
               + ', '.join(str(int(i)) for i in shown) + '.')
    return [('misclassified', lambda: plot_gallery(images, labels[rows], pred, conf, names, n_wrong),
             caption, time.perf_counter() - start)]


def _draw(plan, fig_dir, log, written):
    """Draw and write every planned figure, in order; append each path to `written` once it is complete."""
    for stem, draw, _, prepared_s in plan.figures:
        start = time.perf_counter() - prepared_s   # the gallery counts the loading of its images
        fig = draw()
        path = fig_dir / f'{stem}.png'
        write_atomic(path, lambda f: fig.savefig(f, format='png', dpi=DPI))
        written.append(path)
        log(f"  {stem + '.png':<22s} {time.perf_counter() - start:6.2f} s")


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line like every other refusal of this script, not argparse's usage block.
        self.exit(EXIT_BAD_INPUT, f"viz.py: {message}; see {command('viz.py', '--help')}\n")


def parse_args(argv=None):
    parser = _Parser(
        description='Write figures/*.png and report.md into a run folder written by main.py.',
        epilog='Exit codes: 0 done, 2 refused (one sentence says why; nothing was changed), '
               '3 crashed (a bug), 130 interrupted.')
    parser.add_argument('run_dir', help='run folder, e.g. runs/latest')
    parser.add_argument('--tsne-samples', type=int, default=DEFAULT_TSNE_SAMPLES,
                        help=f'points in the t-SNE sample, {MIN_TSNE_SAMPLES} to {MAX_TSNE_SAMPLES} '
                             f'(the test set; default {DEFAULT_TSNE_SAMPLES}; 0 skips t-SNE)')
    parser.add_argument('--gallery-size', type=int, default=DEFAULT_GALLERY_SIZE,
                        help=f'images in the misclassification gallery, 1 to {MAX_GALLERY_SIZE} '
                             f'(a {math.isqrt(MAX_GALLERY_SIZE)} x {math.isqrt(MAX_GALLERY_SIZE)} grid; '
                             f'default {DEFAULT_GALLERY_SIZE}; 0 skips it)')
    parser.add_argument('--data-dir', default=None,
                        help=f'data folder holding {FOLDER_NAME}/ or {ARCHIVE_NAME}, for the gallery '
                             "(default: the run config's data_dir)")
    parser.add_argument('--seed', type=int, default=None,
                        help=f'seed for the t-SNE sample and embedding, 0..{MAX_SEED} '
                             f"(default: the run's seed)")
    return parser.parse_args(argv)


def main(argv=None):
    """CLI entry point; returns the exit code: 0 done, 2 refused with one sentence on stderr,
    3 crashed (a bug; one line), 130 interrupted by SIGINT/SIGTERM (one line)."""
    try:
        cli.raise_if_interrupted_while_starting()
        return _run(parse_args(argv))
    except cli.StartupInterrupted as e:        # cli's handlers are installed only under __main__
        print(cli.interrupted_message('viz.py', e), file=sys.stderr)
    except DrawingInterrupted as e:
        print(f'viz.py: interrupted by {e.signal} after writing {len(e.written)} figure(s), each '
              'complete, and before report.md; run the same command again to finish', file=sys.stderr)
    return EXIT_ABORTED


def _run(args):
    """main() after the options are parsed: the work, and every error as an exit code."""
    start = time.perf_counter()
    problem = check_options(args.tsne_samples, args.gallery_size, args.seed, args.data_dir)
    if problem is None:
        try:
            written = make_report(args.run_dir, args.tsne_samples, args.gallery_size,
                                  args.data_dir, args.seed)
        except (RunFolderError, RunFileError) as e:
            problem = str(e)
        except MemoryError:
            problem = ('this machine ran out of memory while drawing (figures already written are intact); '
                       'run the command again with a smaller --tsne-samples, e.g. --tsne-samples 500')
        except OSError as e:        # anything runfiles and data_utils did not word themselves
            problem = describe_os_error(e, e.filename or args.run_dir, 'use')
        except Exception as e:      # a bug: one line, exit code 3, never 1 (that means diverged)
            return cli.report_crash('viz.py', e)
    if problem is not None:
        print(f'viz.py: {problem}', file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f'Wrote report.md and {len(written)} figure(s) to {Path(args.run_dir).resolve()} '
          f'in {time.perf_counter() - start:.1f} s.')
    return EXIT_OK


if __name__ == '__main__':
    sys.exit(main())
