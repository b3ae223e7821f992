"""Turn a run folder into figures and a Markdown report.

    python viz.py runs/latest [--tsne-samples N] [--gallery-size N]
                              [--data-dir DIR] [--seed S]

A run folder (README.md, "The run folder") is written by main.py. This script
reads what it finds there and writes, atomically, into the same folder:

    figures/training_curves.png   loss, accuracy and learning rate per epoch  (history.json)
    figures/confusion_matrix.png  counts and row-normalised rates   (metrics.json or predictions.npz)
    figures/reliability.png       reliability diagram + confidence histogram  (predictions.npz)
    figures/tsne.png              t-SNE of the final RNN hidden states        (predictions.npz)
    figures/misclassified.png     most confidently wrong test images   (predictions.npz + test images)
    report.md                     configuration, headline metrics, tables, every figure embedded

A run that is still training (no metrics.json / predictions.npz yet, or
main.py holding the run folder's lock) gets the figures its files allow and
exit code 0. Bad options, a folder that is not a run folder, damaged files or
a folder that cannot be written get one sentence on stderr and exit code 2,
all checked before the first file is written, so a refusal changes nothing.

The numbers come from metrics.py (as in metrics.json), files go through
runfiles.py and the test images through data_utils.py. matplotlib and
scikit-learn are imported inside the functions that draw, so importing this
module is cheap.
"""

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from data_utils import NUM_CLASSES, DataError, apportion, load_test_set
from metrics import (N_BINS, TIME_TO_VAL_ACC, confusion_matrix, expected_calibration_error,
                     per_class_accuracy, reliability_stats, time_to_accuracy)
from runfiles import (MAX_SEED, TEMP_MARK, RunFileError, RunFolderLock, describe_os_error,
                      read_json, read_npz, resolve_folder, write_atomic, write_text)

# Used when metrics.json does not name the classes.
CIFAR10_CLASSES = ['airplane', 'automobile', 'bird', 'cat', 'deer',
                   'dog', 'frog', 'horse', 'ship', 'truck']

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
EXIT_BAD_INPUT = 2


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
# Options and the run folder, checked before anything is drawn
# --------------------------------------------------------------------------

class RunFolderError(Exception):
    """The folder is not a run folder or its files are damaged; the message says why and what to do."""


def check_options(tsne_samples, gallery_size, seed):
    """The first problem with the drawing options as one sentence, or None."""
    if tsne_samples < 0:
        return f'--tsne-samples {tsne_samples} is negative; give a number of points, or 0 to skip t-SNE'
    if gallery_size < 0:
        return f'--gallery-size {gallery_size} is negative; give a number of images, or 0 for no gallery'
    if seed is not None and not 0 <= seed <= MAX_SEED:
        return f'--seed {seed} is outside [0, {MAX_SEED}]; give an integer in that range, as for main.py'
    return None


def _number(v):
    # true/false is an int to Python but not a measurement.
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _count(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _or_null(test):
    return lambda v: v is None or test(v)


def _table(shape, kinds):
    """A test for nested JSON lists: an array of `shape`, dtype kind in `kinds`, entries >= 0."""
    def test(value):
        try:
            a = np.array(value)
        except ValueError:      # ragged lists
            return False
        return a.shape == shape and a.dtype.kind in kinds and (a.size == 0 or a.min() >= 0)
    return test


# What the figures and the report read from each JSON file of a run, as
# {key: (test, what it must be)}; an absent key counts as null.
NUMBER_OR_NULL = (_or_null(_number), 'a number or null')
CONFIG_RULES = {'seed': (_or_null(lambda v: _count(v) and v <= MAX_SEED), f'an integer in [0, {MAX_SEED}]'),
                'data_dir': (_or_null(lambda v: isinstance(v, str)), 'a path')}
HISTORY_RULES = {'epoch': (_count, 'an epoch number'),
                 **dict.fromkeys(('train_loss', 'train_acc', 'val_loss', 'val_acc', 'lr',
                                  'epoch_time_s', 'images_per_s', 'elapsed_s'), NUMBER_OR_NULL)}
METRICS_RULES = {
    # Written with every test evaluation, so never null.
    **dict.fromkeys(('test_acc', 'test_loss', 'ece'), (_number, 'a number')),
    **dict.fromkeys(('best_val_acc', 'wall_time_s', 'train_images_per_s'), NUMBER_OR_NULL),
    **dict.fromkeys(('best_epoch', 'epochs_done'), (_or_null(_count), 'a whole number or null')),
    'label_names': (_or_null(lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v)),
                    'a list of class names'),
}


def _check_values(values, rules, path, where='{!r}'):
    """RunFolderError naming the first value of the dict `values` that fails its rule."""
    for key, (test, what) in rules.items():
        value = values.get(key)
        if not test(value):
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + '...'
            raise RunFolderError(f'{path} has {where.format(key)} = {shown}, which is not {what}; '
                                 f'it was not written by main.py or is damaged - re-run training '
                                 f'or restore the file')


def load_run(run_dir):
    """Read whatever a run folder holds, and check every value the figures and report use.

    Returns a dict with keys run_dir (resolved Path), config, history, metrics
    (dicts/lists or None when the file is absent), predictions (dict of arrays
    probs (N, C), labels (N,), indices (N,), hidden (N, H) or None), and
    missing (list of absent file names). Raises RunFolderError when the folder
    has neither config.json nor history.json or a file holds what main.py
    does not write, and RunFileError when a file cannot be read.
    """
    # runs/latest is a symlink: work on the real folder so relative paths resolve;
    # '' must not quietly mean the current folder.
    given = run_dir
    run_dir = resolve_folder(run_dir, 'pass a run folder such as runs/latest')
    if not (run_dir / 'config.json').is_file() and not (run_dir / 'history.json').is_file():
        raise RunFolderError(f'{given} is not a run folder (it has no config.json or history.json); '
                             f'pass a folder written by main.py, such as runs/latest')
    run = {'run_dir': run_dir, 'config': None, 'history': None, 'metrics': None,
           'predictions': None, 'missing': []}
    path = run_dir / 'predictions.npz'
    if path.is_file():
        run['predictions'] = _check_predictions(
            read_npz(path, fix='re-run the test evaluation or restore the file'), path)
    c = run['predictions']['probs'].shape[1] if run['predictions'] else NUM_CLASSES
    rules = {'config': CONFIG_RULES, 'history': HISTORY_RULES, 'metrics': {
        **METRICS_RULES, 'per_class_acc': (_or_null(_table((c,), 'iuf')), f'a list of {c} fractions'),
        'confusion_matrix': (_or_null(_table((c, c), 'iu')), f'a {c} x {c} table of counts')}}
    for name, kind in {'config': dict, 'history': list, 'metrics': dict}.items():
        path = run_dir / f'{name}.json'
        if not path.is_file():
            run['missing'].append(path.name)
            continue
        values = run[name] = read_json(path)
        if not isinstance(values, kind) or (kind is list and not all(isinstance(r, dict) for r in values)):
            what = 'a list of per-epoch records' if kind is list else 'a JSON object'
            raise RunFolderError(f'{path} is not {what}; it was not written by main.py '
                                 f'or is damaged - re-run training or restore the file')
        for i, record in enumerate(values if kind is list else [values], 1):
            _check_values(record, rules[name], path, f"record {i}'s {{!r}}" if kind is list else '{!r}')
    if run['predictions'] is None:
        run['missing'].append('predictions.npz')
    return run


def _check_predictions(preds, path):
    """The arrays of predictions.npz, consistent with each other; indices default to 0..N-1."""
    if 'probs' not in preds or 'labels' not in preds:
        raise RunFolderError(f"{path} lacks the arrays 'probs' and 'labels'; re-run the test evaluation")
    preds.setdefault('indices', np.arange(preds['labels'].size))
    probs, labels, indices, hidden = (preds.get(k) for k in ('probs', 'labels', 'indices', 'hidden'))
    n = len(labels) if labels.ndim == 1 else -1
    consistent = (probs.ndim == 2 and len(probs) == n > 0 and probs.shape[1] > 0 and indices.shape == (n,)
                  and probs.dtype.kind == 'f' and labels.dtype.kind in 'iu' and indices.dtype.kind in 'iu'
                  and (hidden is None or (hidden.shape[:1] == (n,) and hidden.ndim == 2
                                          and hidden.dtype.kind in 'fiu')))
    if not consistent:
        arrays = ', '.join(f'{k} {v.dtype}{v.shape}' for k, v in preds.items())
        raise RunFolderError(f'{path} has inconsistent arrays ({arrays}); expected float probs '
                             f'(N, 10), integer labels (N,) and indices (N,), hidden (N, H) - '
                             f're-run the test evaluation')
    c = probs.shape[1]
    for problem, found in (('non-finite probabilities', not np.isfinite(probs).all()),
                           ('non-finite hidden states', hidden is not None and not np.isfinite(hidden).all()),
                           (f'labels outside 0..{c - 1}', labels.min() < 0 or labels.max() >= c)):
        if found:
            raise RunFolderError(f'{path} has {problem}; re-run the test evaluation')
    return preds


# --------------------------------------------------------------------------
# The test images and the folders written to
# --------------------------------------------------------------------------

def resolve_data_dir(config, run_dir, override=None):
    """Candidate data folders, in the order to try them, without repeats.

    --data-dir wins alone (given as the extracted cifar-10-batches-py/ itself,
    its parent). Otherwise the config's data_dir (default 'data'): as given if
    absolute, else relative to the current directory and then to the
    repository root, which is the run folder's grandparent (runs/<run>/).
    """
    if override is not None:
        override = Path(override)
        return [override.parent if override.name == 'cifar-10-batches-py' else override]
    data_dir = Path((config or {}).get('data_dir') or 'data')
    if data_dir.is_absolute():
        return [data_dir]
    return list(dict.fromkeys([Path.cwd() / data_dir, Path(run_dir).parent.parent / data_dir]))


def load_gallery_images(candidates):
    """The test images of the first candidate data folder that holds CIFAR-10, read by data_utils.

    Returns (images (N, 32, 32, 3) uint8 HWC, labels (N,) int64, folder).
    Raises DataError whose sentence says that nothing was found, or names the
    file that was refused and why.
    """
    # Folders without the data are passed over quietly; a file that is there
    # but refused is named, since it is damaged or not what it claims to be.
    held = [c for c in candidates
            if (c / 'cifar-10-batches-py').exists() or (c / 'cifar-10-python.tar.gz').exists()]
    refusal = None
    for folder in held:
        try:
            images, labels, _ = load_test_set(folder)
        except DataError as e:
            refusal = refusal or e
            continue
        # The archive stores NCHW rows; imshow wants HWC.
        return images.transpose(0, 2, 3, 1), labels, folder
    tried = ' or '.join(str(c) for c in candidates)
    raise refusal or DataError(f'no CIFAR-10 test batch found in {tried}; pass --data-dir '
                               f'pointing at the folder that holds cifar-10-batches-py/.')


def _check_writable(folder):
    """RunFileError unless a new file can be made in `folder` (permissions, read-only mounts)."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=f'.viz{TEMP_MARK}')
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        # Name the folder, not the probe's random name: the folder is what to fix.
        raise RunFileError(describe_os_error(OSError(e.errno, e.strerror), folder)) from None


def prepare_output(run_dir):
    """Check that report.md and figures/ can be written, before the first figure; returns figures/.

    Refusing here rather than at the first failing write keeps a folder that
    cannot take the report from ending up with some of the figures.
    """
    _check_writable(run_dir)
    fig_dir = run_dir / 'figures'
    if os.path.lexists(fig_dir) and not fig_dir.is_dir():
        raise RunFolderError(f'{fig_dir} exists and is not a folder; move or delete it so that '
                             f'viz.py can put the figures there')
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

    history: list of per-epoch dicts with epoch, train_loss, train_acc,
    val_loss, val_acc (fractions), lr; missing values are drawn as gaps.
    best_epoch: epoch to mark (1-based); default the epoch of highest val_acc.
    Returns a matplotlib Figure.
    """
    from matplotlib.ticker import MaxNLocator

    def column(key):
        return np.array([np.nan if r.get(key) is None else float(r[key]) for r in history])

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
        row = [r for r in history if r.get('epoch') == best_epoch]
        if row and row[0].get('val_acc') is not None:
            ax_acc.plot([best_epoch], [100 * row[0]['val_acc']], marker='*', markersize=14,
                        color='tab:red', linestyle='none',
                        label=f"best val {100 * row[0]['val_acc']:.2f}%")
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


def plot_reliability(probs, labels, n_bins=N_BINS):
    """Reliability diagram with the per-bin gap, and a confidence histogram beneath.

    probs: (N, C) probabilities; labels: (N,) int. Bars are the accuracy of the
    predictions whose confidence falls in each bin (`confidence_bins`); the
    hatched bars span the gap to the bin's mean confidence. The title carries
    `expected_calibration_error` of the same inputs. Returns a matplotlib Figure.
    """
    stats = reliability_stats(probs, labels, n_bins)
    ece = expected_calibration_error(probs, labels, n_bins)
    edges = stats['edges']
    centers = (edges[:-1] + edges[1:]) / 2
    width = edges[1] - edges[0]
    filled = stats['count'] > 0

    fig = _new_figure(figsize=(7, 8.5))
    ax, ax_hist = fig.subplots(2, 1, sharex=True, gridspec_kw={'height_ratios': [3, 1]})
    ax.bar(centers[filled], stats['accuracy'][filled], width=width, color='tab:blue',
           edgecolor='black', linewidth=0.6, label='accuracy')
    gap = stats['confidence'][filled] - stats['accuracy'][filled]
    ax.bar(centers[filled], gap, bottom=stats['accuracy'][filled], width=width,
           color='tab:red', alpha=0.3, edgecolor='tab:red', hatch='//', linewidth=0.6,
           label='gap to mean confidence')
    ax.plot([0, 1], [0, 1], linestyle='--', color='0.3', label='perfect calibration')
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel='accuracy in bin',
           title=f'Reliability diagram: ECE = {ece:.4f}\n({n_bins} equal-width bins, '
                 f"{stats['n']} test predictions)")
    ax.legend(loc='upper left')
    ax.grid(alpha=0.3)

    ax_hist.bar(centers, stats['count'], width=width, color='0.6', edgecolor='black', linewidth=0.6)
    ax_hist.axvline(stats['overall_accuracy'], color='tab:blue', linestyle='-',
                    label=f"accuracy {100 * stats['overall_accuracy']:.1f}%")
    ax_hist.axvline(stats['overall_confidence'], color='tab:red', linestyle='--',
                    label=f"mean confidence {100 * stats['overall_confidence']:.1f}%")
    ax_hist.set(xlabel='confidence (max class probability)', ylabel='predictions')
    ax_hist.legend(loc='upper left', fontsize=8)
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


def _fmt_duration(seconds):
    seconds = float(seconds)
    if seconds < 60:
        return f'{seconds:.1f} s'
    h, rest = divmod(int(round(seconds)), 3600)
    m, s = divmod(rest, 60)
    return f'{seconds:.0f} s ({h} h {m:02d} min {s:02d} s)' if h else f'{seconds:.0f} s ({m} min {s:02d} s)'


def _fmt_value(v):
    if isinstance(v, (dict, list)):
        return '`' + json.dumps(v) + '`'
    return str(v)


def build_report(run, figures, notes, label_names, cm):
    """The text of report.md.

    run: from load_run; figures: list of (stem, caption) drawn, in order;
    notes: lines about what is missing or skipped; label_names: C str;
    cm: (C, C) confusion counts or None.
    """
    config, history, metrics = run['config'], run['history'], run['metrics']
    lines = [f"# Run report: {run['run_dir'].name}", '',
             f"Generated by `viz.py` on {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}.", '']
    if config:
        # One line for the settings people look for first; the full table is at the end.
        summary = [f'{key} `{config[key]}`' for key in ('preset', 'epochs', 'seq_layout', 'subset', 'seed')
                   if config.get(key) is not None]
        if summary:
            lines += ['Run: ' + ', '.join(summary) + ' (full configuration at the end).', '']
    if notes:
        lines += ['> ' + n for n in notes] + ['']

    lines += ['## Headline metrics', '', '| metric | value |', '| --- | --- |']
    if metrics:
        def row(name, key, fmt):
            if metrics.get(key) is not None:
                lines.append(f'| {name} | {fmt(metrics[key])} |')
        row('Test accuracy', 'test_acc', lambda v: f'{100 * v:.2f} %')
        row('Test loss', 'test_loss', lambda v: f'{v:.4f}')
        row(f'ECE ({N_BINS} bins)', 'ece', lambda v: f'{v:.4f}')
        single = metrics.get('single_view')
        if isinstance(single, dict) and all(_number(single.get(k)) for k in ('test_acc', 'ece')):
            lines.append(f"| Without the mirror view (tta_flip off) | {100 * single['test_acc']:.2f} %, "
                         f"ECE {single['ece']:.4f} |")
        best = metrics.get('best_val_acc')
        if best is not None:
            at = f" (epoch {metrics['best_epoch']})" if metrics.get('best_epoch') is not None else ''
            lines.append(f'| Best validation accuracy | {100 * best:.2f} %{at} |')
        if metrics.get('epochs_done') is not None:
            early = ' (stopped early)' if metrics.get('stopped_early') else ''
            lines.append(f"| Epochs trained | {metrics['epochs_done']}{early} |")
        row('Wall time', 'wall_time_s', _fmt_duration)
        row('Training throughput', 'train_images_per_s', lambda v: f'{v:.0f} images/s')
    elif history:
        # No test evaluation yet: summarise what the history shows so far.
        val = [r['val_acc'] for r in history if r.get('val_acc') is not None]
        lines.append(f'| Epochs done so far | {len(history)} |')
        if val:
            best_row = max((r for r in history if r.get('val_acc') is not None), key=lambda r: r['val_acc'])
            lines.append(f"| Best validation accuracy so far | {100 * best_row['val_acc']:.2f} % "
                         f"(epoch {best_row['epoch']}) |")
        last = history[-1]
        for name, key in (('Last train loss', 'train_loss'), ('Last validation loss', 'val_loss')):
            if last.get(key) is not None:
                lines.append(f'| {name} | {last[key]:.4f} |')
        times = [r['epoch_time_s'] for r in history if r.get('epoch_time_s') is not None]
        if times:
            lines.append(f'| Training time so far | {_fmt_duration(sum(times))} |')
        ips = [r['images_per_s'] for r in history if r.get('images_per_s') is not None]
        if ips:
            lines.append(f'| Training throughput | {np.mean(ips):.0f} images/s |')
    else:
        lines.append('| (no metrics or history yet) | |')
    for threshold in TIME_TO_VAL_ACC:
        if history:
            seconds = time_to_accuracy(history, threshold)
            shown = _fmt_duration(seconds) if seconds is not None else 'not reached'
            lines.append(f'| Validation accuracy {100 * threshold:.0f} % first reached | {shown} |')
    lines.append('')

    per_class = None
    if metrics and metrics.get('per_class_acc') is not None:
        per_class = np.asarray(metrics['per_class_acc'], dtype=float)
    elif cm is not None:
        per_class = per_class_accuracy(cm)
    if per_class is not None:
        lines += ['## Per-class accuracy', '', '| class | accuracy | test images |', '| --- | ---: | ---: |']
        for c, acc in enumerate(per_class):
            n = str(int(cm[c].sum())) if cm is not None else ''
            lines.append(f'| {label_names[c]} | {100 * acc:.1f} % | {n} |')
        lines.append('')

    if cm is not None:
        lines += ['## Most confused class pairs', '',
                  '| true class | predicted as | count | share of true class |',
                  '| --- | --- | ---: | ---: |']
        for i, j, count in most_confused_pairs(cm, 5):
            lines.append(f'| {label_names[i]} | {label_names[j]} | {count} | '
                         f'{100 * count / max(cm[i].sum(), 1):.1f} % |')
        lines.append('')

    if figures:
        lines += ['## Figures', '']
        for stem, caption in figures:
            lines += [f'### {FIGURE_TITLES[stem]}', '',
                      f'![{FIGURE_TITLES[stem]}](figures/{stem}.png)', '']
            if caption:
                lines += [caption, '']

    if config:
        lines += ['## Configuration', '', '| key | value |', '| --- | --- |']
        lines += [f'| {k} | {_fmt_value(v)} |' for k, v in config.items()]
        lines.append('')
    return '\n'.join(lines)


# --------------------------------------------------------------------------
# Orchestration and CLI
# --------------------------------------------------------------------------

def make_report(run_dir, tsne_samples=DEFAULT_TSNE_SAMPLES, gallery_size=DEFAULT_GALLERY_SIZE,
                data_dir=None, seed=None, log=print):
    """Draw every figure the run folder allows and write report.md.

    Returns the list of figure paths written. Everything that can be checked
    is checked before the first file is written: the options (ValueError),
    the folder and every value the figures use (RunFolderError, RunFileError)
    and that figures/ and report.md can be written (RunFileError).
    `log` receives one line per figure (with its timing) and one per thing
    missing or skipped.
    """
    problem = check_options(tsne_samples, gallery_size, seed)
    if problem:
        raise ValueError(problem)
    run = load_run(run_dir)
    if seed is None:
        seed = (run['config'] or {}).get('seed') or 0
    fig_dir = prepare_output(run['run_dir'])
    lock = RunFolderLock(run['run_dir'], 'viz.py')
    # Busy means main.py is still writing: its files are each complete (atomic
    # writes), so draw what they hold now, but leave its temporary files alone.
    if not lock.acquire(busy_ok=True):
        log(f"{run['run_dir']} is in use by another process (main.py still training?); "
            'drawing what its files hold now.')
    try:
        return _draw(run, fig_dir, tsne_samples, gallery_size, data_dir, seed, log)
    finally:
        lock.release()


def _draw(run, fig_dir, tsne_samples, gallery_size, data_dir, seed, log):
    """The figures and report.md of a checked run folder; returns the figure paths written."""
    out_dir = run['run_dir']
    config, history, metrics, preds = run['config'], run['history'], run['metrics'], run['predictions']
    notes = []  # lines for the console and the top of the report

    def note(line):
        notes.append(line)
        log(line)

    missing = run['missing']
    if 'metrics.json' in missing or 'predictions.npz' in missing:
        absent = ' and '.join(n for n in ('metrics.json', 'predictions.npz') if n in missing)
        lacking = ', '.join(m for m in missing if m not in ('metrics.json', 'predictions.npz'))
        note(f"Partial run: {absent} not found{' (nor ' + lacking + ')' if lacking else ''} "
             '- the run is still training or stopped before the test evaluation; '
             'drawing only what the files allow.')
    elif missing:
        note(f"Missing from the run folder: {', '.join(missing)}.")

    label_names = None
    if metrics and metrics.get('label_names'):
        label_names = list(metrics['label_names'])
    n_classes = preds['probs'].shape[1] if preds is not None else NUM_CLASSES
    if label_names is None or len(label_names) != n_classes:
        label_names = CIFAR10_CLASSES if n_classes == 10 else [str(c) for c in range(n_classes)]

    figures, written = [], []

    def emit(stem, draw, caption='', start=None):
        # `start` lets a figure count the loading it needed (the gallery's images).
        start = time.perf_counter() if start is None else start
        fig = draw()
        path = fig_dir / f'{stem}.png'
        write_atomic(path, lambda f: fig.savefig(f, format='png', dpi=DPI))
        figures.append((stem, caption))
        written.append(path)
        log(f"  {stem + '.png':<22s} {time.perf_counter() - start:6.2f} s")

    # 1. Training curves
    if history:
        best_epoch = metrics.get('best_epoch') if metrics else None
        emit('training_curves', lambda: plot_training_curves(history, best_epoch))
    elif history is not None:
        note('history.json has no epochs yet: no training curves.')

    # 2. Confusion matrix: metrics.json has it; predictions can rebuild it.
    cm = None
    if metrics and metrics.get('confusion_matrix') is not None:
        cm = np.asarray(metrics['confusion_matrix'], dtype=np.int64)
    elif preds is not None:
        cm = confusion_matrix(preds['labels'], preds['probs'].argmax(axis=1), n_classes)
    if cm is not None:
        emit('confusion_matrix', lambda: plot_confusion_matrix(cm, label_names))

    if preds is not None:
        probs, labels = preds['probs'], preds['labels']

        # 3. Reliability diagram
        ece_plotted = expected_calibration_error(probs, labels, N_BINS)
        caption = f'ECE in the diagram: {ece_plotted:.4f}'
        if metrics and metrics.get('ece') is not None:
            if abs(metrics['ece'] - ece_plotted) <= 1e-6:
                caption += ' (equal to metrics.json).'
            else:
                caption += f" - differs from metrics.json's {metrics['ece']:.4f}."
                note(f'ECE recomputed from predictions.npz ({ece_plotted:.6f}) differs from '
                     f"metrics.json ({metrics['ece']:.6f}); the files may come from different evaluations.")
        emit('reliability', lambda: plot_reliability(probs, labels, N_BINS), caption)

        # 4. t-SNE of the hidden states
        if 'hidden' not in preds:
            note("predictions.npz has no 'hidden' array: no t-SNE figure.")
        elif tsne_samples == 0:
            log('  tsne.png               skipped (--tsne-samples 0)')
        elif tsne_samples < 5:
            note(f'--tsne-samples {tsne_samples} is too small for t-SNE (need at least 5): no t-SNE figure.')
        else:
            rows = stratified_sample(labels, tsne_samples, seed)

            def draw_tsne():
                emb = tsne_embedding(preds['hidden'][rows], seed)
                return plot_tsne(emb, labels[rows], label_names, len(labels))
            emit('tsne', draw_tsne, f'{len(rows)} points, stratified by true class, seed {seed}.')

        # 5. Misclassification gallery
        if gallery_size < 1:
            log('  misclassified.png      skipped (--gallery-size 0)')
        else:
            _gallery(preds, config, out_dir, data_dir, gallery_size, label_names, emit, note)

    report = build_report(run, figures, notes, label_names, cm)
    write_text(out_dir / 'report.md', report)
    return written


def _gallery(preds, config, run_dir, data_dir, gallery_size, label_names, emit, note):
    """Draw the gallery if the test images can be found; return the test indices shown."""
    start = time.perf_counter()
    probs, labels, indices = preds['probs'], preds['labels'], preds['indices']
    rows = most_confident_mistakes(probs, labels, gallery_size)
    if len(rows) == 0:
        note('No misclassified test images: no gallery.')
        return None
    try:
        images, test_labels, folder = load_gallery_images(resolve_data_dir(config, run_dir, data_dir))
    except DataError as e:
        note(f'Skipped misclassified.png: {e}')
        return None
    shown = indices[rows]
    if (indices.min() < 0 or indices.max() >= len(images)
            or not np.array_equal(test_labels[indices], labels)):
        note(f"Skipped misclassified.png: the test images in {folder} do not match the run's "
             'labels; pass --data-dir pointing at the data the run was evaluated on.')
        return None
    pred = probs[rows].argmax(axis=1)
    conf = probs[rows].max(axis=1)
    n_wrong = int((probs.argmax(axis=1) != labels).sum())
    caption = ('Test-set indices shown, most confident first: '
               + ', '.join(str(int(i)) for i in shown) + '.')
    emit('misclassified',
         lambda: plot_gallery(images[shown], labels[rows], pred, conf, label_names, n_wrong),
         caption, start)
    return shown


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line like every other refusal of this script, not argparse's usage block.
        self.exit(EXIT_BAD_INPUT, f'viz.py: {message}; see python viz.py --help\n')


def parse_args(argv=None):
    parser = _Parser(
        description='Write figures/*.png and report.md into a run folder written by main.py.')
    parser.add_argument('run_dir', help='run folder, e.g. runs/latest')
    parser.add_argument('--tsne-samples', type=int, default=DEFAULT_TSNE_SAMPLES,
                        help=f'points in the t-SNE sample (default {DEFAULT_TSNE_SAMPLES}; 0 skips t-SNE)')
    parser.add_argument('--gallery-size', type=int, default=DEFAULT_GALLERY_SIZE,
                        help=f'images in the misclassification gallery (default {DEFAULT_GALLERY_SIZE}; 0 skips it)')
    parser.add_argument('--data-dir', default=None,
                        help="data folder holding cifar-10-batches-py/ (default: the run config's data_dir)")
    parser.add_argument('--seed', type=int, default=None,
                        help=f'seed for the t-SNE sample and embedding, 0..{MAX_SEED} '
                             f"(default: the run's seed)")
    return parser.parse_args(argv)


def main(argv=None):
    """CLI entry point; returns the exit code (0 done, 2 refused with one sentence on stderr)."""
    args = parse_args(argv)
    start = time.perf_counter()
    problem = check_options(args.tsne_samples, args.gallery_size, args.seed)
    if problem is None:
        try:
            written = make_report(args.run_dir, args.tsne_samples, args.gallery_size,
                                  args.data_dir, args.seed)
        except (RunFolderError, RunFileError) as e:
            problem = str(e)
        except OSError as e:        # anything runfiles and data_utils did not word themselves
            problem = describe_os_error(e, e.filename or args.run_dir, 'use')
        except MemoryError:
            problem = ('this machine ran out of memory while drawing; lower --tsne-samples '
                       '(figures already written are intact)')
    if problem is not None:
        print(f'viz.py: {problem}', file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f'Wrote report.md and {len(written)} figure(s) to {Path(args.run_dir).resolve()} '
          f'in {time.perf_counter() - start:.1f} s.')
    return EXIT_OK


if __name__ == '__main__':
    sys.exit(main())
