"""Tests for viz.py on a synthetic run folder (no training, no real CIFAR-10).

`make_fake_run` lays out repo/runs/<run>/ (through conftest's builder of run
folders, which writes through the run-folder contract) and
repo/data/cifar-10-batches-py/ the way main.py and data_utils.py do, with
predictions whose accuracy, calibration and hidden-state clusters look like a
half-trained model's. The calibration math itself is tested in test_metrics.py.
"""

import ast
import errno
import json
import os
import pickle
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

import metrics
import runfiles
import viz
from conftest import assert_valid_png, build_run_folder, loop_ece, metrics_for, softmax

REPO = Path(__file__).resolve().parent.parent
ALL_FIGURES = ['training_curves', 'confusion_matrix', 'reliability', 'tsne', 'misclassified']
# Small t-SNE sample in tests: the default 2,000 is timed by hand, not in CI.
TSNE_SAMPLES = '300'
# Options that skip the two slow figures, for tests about something else.
QUICK_FIGURES = ['--tsne-samples', '0', '--gallery-size', '0']


# --------------------------------------------------------------------------
# Synthetic run folder
# --------------------------------------------------------------------------

def fake_predictions(n=2000, hidden_size=128, seed=0):
    """probs (n, 10) float32, labels (n,), indices (n,), hidden (n, H) float32.

    Classes are balanced; about half the predictions are right, and the hidden
    states are class centroids plus noise, so t-SNE has clusters to show.
    """
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    logits = rng.normal(scale=1.5, size=(n, 10)) + 2.0 * np.eye(10)[labels]
    probs = softmax(logits).astype(np.float32)
    centroids = rng.normal(size=(10, hidden_size))
    hidden = np.tanh(centroids[labels] + rng.normal(scale=0.8, size=(n, hidden_size))).astype(np.float32)
    indices = rng.permutation(n)
    return probs, labels.astype(np.int64), indices.astype(np.int64), hidden


def write_test_batch(data_dir, labels_by_index):
    """CIFAR-style test_batch and batches.meta pickles (bytes keys, NCHW rows), patterned images.

    labels_by_index: (n,) true class of test image i. Returns the images (n, 3, 32, 32) uint8.
    """
    n = len(labels_by_index)
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:32, 0:32]
    images = np.empty((n, 3, 32, 32), dtype=np.uint8)
    for i in range(n):
        # A colour gradient per class plus a little noise: clearly not blank.
        c = labels_by_index[i]
        base = np.stack([(xx * 8 + 25 * c), (yy * 8 + 50 * c), ((xx + yy) * 4 + 90 * c)]) % 256
        images[i] = np.clip(base + rng.integers(0, 30, size=(3, 32, 32)), 0, 255)
    folder = Path(data_dir) / 'cifar-10-batches-py'
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / 'test_batch', 'wb') as f:
        pickle.dump({b'data': images.reshape(n, 3072), b'labels': [int(v) for v in labels_by_index],
                     b'batch_label': b'testing batch 1 of 1'}, f)
    with open(folder / 'batches.meta', 'wb') as f:
        pickle.dump({b'label_names': [name.encode() for name in viz.CIFAR10_CLASSES]}, f)
    return images


def fake_history(epochs=6):
    """[runfiles.EpochRecord]: losses falling, validation accuracy peaking at epoch 4, cosine rate."""
    return [runfiles.EpochRecord(
        epoch=e, train_loss=2.2 / e ** 0.5, train_acc=0.2 + 0.08 * e,
        val_loss=2.0 / e ** 0.4 + 0.02 * max(0, e - 4), val_acc=0.25 + 0.06 * min(e, 4) - 0.01 * max(0, e - 4),
        lr=0.05 * 0.5 * (1 + np.cos(np.pi * (e - 1) / epochs)), epoch_time_s=30.0 + e, images_per_s=1500.0 + e)
        for e in range(1, epochs + 1)]


def make_fake_run(root, n=2000, hidden_size=128, with_metrics=True, with_predictions=True,
                  with_data=True, name='20240101-120000-fast'):
    """Write repo-like folders under root; return the run folder Path.

    root/runs/<name>/{config,history,metrics}.json, predictions.npz (conftest.build_run_folder),
    root/runs/latest -> <name>, and root/data/cifar-10-batches-py/test_batch.
    metrics.json's ECE is computed by a loop independent of metrics.py.
    """
    root = Path(root)
    config = {'preset': 'fast', 'epochs': 6, 'batch_size': 64, 'lr': 0.05, 'seed': 3,
              'seq_layout': 'pixels', 'subset': 0.1, 'data_dir': 'data', 'schedule': 'cosine',
              'warmup_epochs': 1, 'weight_decay': 5e-4, 'clip': 5.0, 'momentum': 0.9, 'hidden': hidden_size}
    history = fake_history(6)
    probs, labels, indices, hidden = fake_predictions(n, hidden_size)
    predictions = runfiles.Predictions(probs, labels, indices, hidden)
    metrics_record = metrics_for(predictions, history, ece=loop_ece(probs, labels), wall_time_s=215.3,
                                 train_images_per_s=1503.2, label_names=viz.CIFAR10_CLASSES)
    run = build_run_folder(root / 'runs' / name, config, history=history,
                           predictions=predictions if with_predictions else None,
                           metrics=metrics_record if with_metrics else None)
    (root / 'runs' / 'latest').symlink_to(name)
    if with_data:
        # Test image i has label labels[row] where indices[row] == i.
        by_index = np.empty(n, dtype=np.int64)
        by_index[indices] = labels
        write_test_batch(root / 'data', by_index)
    return run


def run_cli(args, cwd, timeout=300):
    """Run viz.py as a user would; return the CompletedProcess. A hang fails the test (TimeoutExpired)."""
    return subprocess.run([sys.executable, str(REPO / 'viz.py'), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def cli_refusal(result, *words):
    """viz.py exited 2 with exactly one line on stderr, 'viz.py: ' first, naming each of `words`."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('viz.py: '), result.stderr
    assert 'Traceback' not in result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def snapshot(folder):
    """{relative path: (bytes, mtime)} of every file under a folder, to prove a refusal changed nothing."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob('*')) if p.is_file() and not p.is_symlink()}


@pytest.fixture(autouse=True)
def _outside_the_repository(tmp_path, monkeypatch):
    # viz looks for data/ under the current folder first: the repository's own
    # data/ (maybe the real CIFAR-10) must not stand in for a test's images.
    monkeypatch.chdir(tmp_path)


def assert_refused(capsys, *words):
    """viz.main returned 2: exactly one line on stderr, 'viz.py: ' first, naming each of `words`."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('viz.py: '), err
    assert 'Traceback' not in err
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def assert_nothing_drawn(run):
    assert not (run / 'figures').exists() and not (run / 'report.md').exists()


# --------------------------------------------------------------------------
# Full run through the CLI (once per module; the tests below read its output)
# --------------------------------------------------------------------------

@pytest.fixture(scope='module')
def full_run(tmp_path_factory):
    root = tmp_path_factory.mktemp('repo')
    run = make_fake_run(root)
    # cwd is not the repo root, so data_dir 'data' must be found via runs/<run>/../../data;
    # the argument is the runs/latest symlink.
    # The largest seed main.py accepts must work for the t-SNE sample and embedding too.
    result = run_cli([str(root / 'runs' / 'latest'), '--tsne-samples', TSNE_SAMPLES,
                      '--seed', str(runfiles.MAX_SEED)], cwd=root.parent)
    assert result.returncode == 0, result.stderr
    return run, result


def test_every_figure_is_a_valid_nonblank_png(full_run):
    run, _ = full_run
    umask = os.umask(0)
    os.umask(umask)
    for stem in ALL_FIGURES:
        assert_valid_png(run / 'figures' / f'{stem}.png')
        # Atomic writes go through mkstemp (0600); the results get normal permissions.
        assert (run / 'figures' / f'{stem}.png').stat().st_mode & 0o777 == 0o666 & ~umask
    assert (run / 'report.md').stat().st_mode & 0o777 == 0o666 & ~umask
    # Atomic writes leave no temporary files behind; the lock file is the only extra.
    leftovers = [p.name for p in run.rglob('*') if runfiles.TEMP_MARK in p.name or p.suffix == '.tmp']
    assert leftovers == []
    assert sorted(p.name for p in run.iterdir() if p.name.startswith('.')) == [runfiles.LOCK_NAME]


def test_cli_prints_timing_per_figure(full_run):
    _, result = full_run
    for stem in ALL_FIGURES:
        assert re.search(rf'{stem}\.png\s+\d+\.\d+ s', result.stdout), result.stdout


def test_report_mentions_figures_and_headline_numbers(full_run):
    run, _ = full_run
    report = (run / 'report.md').read_text()
    metrics_json = json.loads((run / 'metrics.json').read_text())
    assert report.startswith(f'# Run report: {run.name}\n')      # the real folder, not 'latest'
    for stem in ALL_FIGURES:
        assert f'](figures/{stem}.png)' in report
    assert f"{100 * metrics_json['test_acc']:.2f} %" in report
    assert f"{metrics_json['test_loss']:.4f}" in report
    assert f"{metrics_json['ece']:.4f}" in report
    assert f"{100 * metrics_json['best_val_acc']:.2f} %" in report
    assert '1503 images/s' in report and '215' in report
    for name in viz.CIFAR10_CLASSES:
        assert f'| {name} |' in report
    assert 'Most confused class pairs' in report
    assert '"seq_layout"' not in report and '| seq_layout | pixels |' in report
    assert f'stratified by true class, seed {runfiles.MAX_SEED}.' in report


def test_report_ece_of_the_diagram_equals_metrics_json(full_run):
    run, _ = full_run
    report = (run / 'report.md').read_text()
    metrics_json = json.loads((run / 'metrics.json').read_text())
    shown = re.search(r'ECE in the diagram: ([0-9.]+)', report).group(1)
    assert shown == f"{metrics_json['ece']:.4f}"
    assert 'differs' not in report


def test_report_most_confused_pairs_are_the_top_off_diagonal_cells(full_run):
    run, _ = full_run
    report = (run / 'report.md').read_text()
    cm = np.array(json.loads((run / 'metrics.json').read_text())['confusion_matrix'])
    off = cm.copy()
    np.fill_diagonal(off, -1)
    i, j = np.unravel_index(off.argmax(), off.shape)
    names = viz.CIFAR10_CLASSES
    section = report.split('## Most confused class pairs')[1].split('##')[0]
    rows = [r for r in section.splitlines() if r.startswith('| ') and '---' not in r][1:]
    assert len(rows) == 5
    assert rows[0].startswith(f'| {names[i]} | {names[j]} | {off[i, j]} |')


def test_gallery_shows_the_most_confident_wrong_predictions(full_run):
    run, _ = full_run
    with np.load(run / 'predictions.npz') as z:
        probs, labels, indices = z['probs'], z['labels'], z['indices']
    conf = probs.max(axis=1)
    wrong = probs.argmax(axis=1) != labels
    # Independent pick: the 36 largest confidences among the wrong rows.
    threshold = np.sort(conf[wrong])[-36]
    expected = set(indices[wrong & (conf >= threshold)].tolist())
    report = (run / 'report.md').read_text()
    listed = re.search(r'Test-set indices shown, most confident first: ([0-9, ]+)\.', report).group(1)
    shown = [int(s) for s in listed.split(',')]
    assert len(shown) == 36 and set(shown) == expected
    row_of = {int(ix): r for r, ix in enumerate(indices)}
    shown_conf = [conf[row_of[i]] for i in shown]
    assert shown_conf == sorted(shown_conf, reverse=True)


# --------------------------------------------------------------------------
# Module boundaries
# --------------------------------------------------------------------------

def test_importing_viz_imports_neither_main_nor_sklearn_nor_pyplot():
    code = "import sys, viz; print(*(m in sys.modules for m in ('sklearn', 'matplotlib.pyplot', 'main')))"
    out = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ['False', 'False', 'False']


def test_viz_unpickles_nothing_itself():
    # Only data_utils may unpickle (through its restricted unpickler); viz asks it for the images.
    tree = ast.parse((REPO / 'viz.py').read_text())
    imported = {alias.name.split('.')[0] for node in ast.walk(tree)
                if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or '')])}
    assert not imported & {'pickle', 'tarfile', 'main'}


def test_reliability_title_carries_the_same_ece_as_metrics():
    probs, labels, _, _ = fake_predictions(500)
    fig = viz.plot_reliability(probs, labels)
    ece = metrics.expected_calibration_error(probs, labels)
    assert f'ECE = {ece:.4f}' in fig.axes[0].get_title()


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------

def test_most_confident_mistakes_orders_by_confidence():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4], [0.05, 0.95]])
    labels = np.array([1, 0, 1, 1, 0])   # rows 0, 1, 3, 4 are wrong
    assert viz.most_confident_mistakes(probs, labels, 3).tolist() == [4, 0, 1]
    assert viz.most_confident_mistakes(probs, labels, 10).tolist() == [4, 0, 1, 3]


def test_stratified_sample_is_seeded_and_keeps_class_shares():
    labels = np.repeat(np.arange(10), [50, 100, 150, 200, 250, 300, 350, 400, 450, 750])  # 3000
    a = viz.stratified_sample(labels, 600, seed=1)
    assert len(a) == 600 == len(np.unique(a))
    np.testing.assert_array_equal(a, viz.stratified_sample(labels, 600, seed=1))
    assert not np.array_equal(a, viz.stratified_sample(labels, 600, seed=2))
    np.testing.assert_array_equal(np.bincount(labels[a]), np.bincount(labels) // 5)
    assert len(viz.stratified_sample(labels, 5000)) == 3000


def test_stratified_sample_shares_come_from_data_utils_apportion(monkeypatch):
    # One largest-remainder rounding in the project: viz asks data_utils for the shares.
    import data_utils

    calls = []

    def spy(weights, total):
        calls.append((np.asarray(weights).tolist(), total))
        return data_utils.apportion(weights, total)
    monkeypatch.setattr(viz, 'apportion', spy)
    labels = np.repeat(np.arange(3), [5, 7, 9])
    rows = viz.stratified_sample(labels, 10, seed=0)
    assert calls == [([5, 7, 9], 10)]
    np.testing.assert_array_equal(np.bincount(labels[rows], minlength=3), data_utils.apportion([5, 7, 9], 10))


# --------------------------------------------------------------------------
# Partial runs and the gallery's test images
# --------------------------------------------------------------------------

def test_partial_run_draws_curves_and_says_what_is_missing(tmp_path, capsys):
    run = make_fake_run(tmp_path, with_metrics=False, with_predictions=False, with_data=False)
    assert viz.main([str(run)]) == 0
    out = capsys.readouterr().out
    assert_valid_png(run / 'figures' / 'training_curves.png')
    assert sorted(p.name for p in (run / 'figures').iterdir()) == ['training_curves.png']
    missing_lines = [line for line in out.splitlines()
                     if 'metrics.json' in line and 'predictions.npz' in line]
    assert len(missing_lines) == 1 and 'not found' in missing_lines[0]
    report = (run / 'report.md').read_text()
    assert '](figures/training_curves.png)' in report and 'Best validation accuracy so far' in report


def test_metrics_without_predictions_still_gives_confusion_matrix(tmp_path, capsys):
    run = make_fake_run(tmp_path, with_predictions=False, with_data=False)
    assert viz.main([str(run)]) == 0
    assert 'predictions.npz not found' in capsys.readouterr().out
    assert sorted(p.stem for p in (run / 'figures').iterdir()) == ['confusion_matrix', 'training_curves']


def test_config_only_run_writes_a_report_without_figures(tmp_path):
    run = make_fake_run(tmp_path, with_metrics=False, with_predictions=False, with_data=False)
    (run / 'history.json').unlink()
    assert viz.main([str(run)]) == 0
    assert list((run / 'figures').iterdir()) == []
    assert '| preset | fast |' in (run / 'report.md').read_text()


def test_missing_images_skip_only_the_gallery_and_data_dir_option_finds_them(tmp_path, capsys):
    run = make_fake_run(tmp_path)
    moved = tmp_path / 'elsewhere'
    (tmp_path / 'data').rename(moved)
    assert viz.main([str(run), '--tsne-samples', '0']) == 0
    out = capsys.readouterr().out
    skipped = [line for line in out.splitlines() if 'Skipped misclassified.png' in line]
    assert len(skipped) == 1 and 'no CIFAR-10 test batch found' in skipped[0]
    assert not (run / 'figures' / 'misclassified.png').exists()
    assert (run / 'figures' / 'reliability.png').exists()

    assert viz.main([str(run), '--tsne-samples', '0', '--data-dir', str(moved), '--gallery-size', '9']) == 0
    assert_valid_png(run / 'figures' / 'misclassified.png')
    report = (run / 'report.md').read_text()
    listed = re.search(r'most confident first: ([0-9, ]+)\.', report).group(1)
    assert len(listed.split(',')) == 9


def test_mismatched_test_images_are_refused_before_any_figure(tmp_path, capsys):
    # Images found but not the run's: the user decides (--data-dir or --gallery-size 0), so
    # this is a refusal, not a quiet skip (an old run without data_fingerprint: by its labels).
    run = make_fake_run(tmp_path)
    write_test_batch(tmp_path / 'data', np.zeros(2000, dtype=int))  # wrong labels
    assert viz.main([str(run), '--tsne-samples', '0']) == 2
    assert_refused(capsys, 'do not match', '--data-dir', '--gallery-size 0')
    assert_nothing_drawn(run)
    assert viz.main([str(run), '--tsne-samples', '0', '--gallery-size', '0']) == 0


class _MakesADirectory:
    """Unpickling this calls os.mkdir(path): the stand-in for any code a crafted pickle runs."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_a_crafted_test_batch_is_refused_not_run(tmp_path, capsys):
    run = make_fake_run(tmp_path, n=300)
    marker = tmp_path / 'code-ran'
    batch = tmp_path / 'data' / 'cifar-10-batches-py' / 'test_batch'
    batch.write_bytes(pickle.dumps({b'data': _MakesADirectory(marker), b'labels': [0] * 300}))
    assert viz.main([str(run), '--tsne-samples', '0']) == 2
    assert not marker.exists(), 'loading the test images ran code from the pickle'
    assert_refused(capsys, str(batch), '--gallery-size 0')
    assert_nothing_drawn(run)


# --------------------------------------------------------------------------
# Refusals: one sentence, exit 2, nothing written
# --------------------------------------------------------------------------

def test_wrong_folder_exits_2_and_writes_nothing(tmp_path):
    (tmp_path / 'notes.txt').write_text('not a run')
    before = sorted(os.listdir(tmp_path))
    result = run_cli([str(tmp_path)], cwd=tmp_path)
    assert result.returncode == 2
    assert 'not a run folder' in result.stderr and 'Traceback' not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == before
    assert viz.main([str(tmp_path / 'does-not-exist')]) == 2
    assert sorted(os.listdir(tmp_path)) == before


def _truncate(path):
    path.write_bytes(path.read_bytes()[:50_000])


def _flip_a_bit_in_probs(npz):
    """Flip one bit in the stored bytes of probs.npy (np.savez does not compress): a zip CRC error."""
    data = bytearray(npz.read_bytes())
    data[data.index(b'probs.npy') + 1000] ^= 0x10
    npz.write_bytes(bytes(data))


def _write_json(value):
    return lambda path: path.write_text(json.dumps(value))


DAMAGE = {
    # case: (file of the run, how it is damaged (a function of its path, or
    # changes to its JSON object), what the one-sentence refusal must name)
    'truncated predictions': ('predictions.npz', _truncate, 'predictions.npz'),
    'bit flip in predictions': ('predictions.npz', _flip_a_bit_in_probs, 'predictions.npz'),
    'inconsistent predictions': ('predictions.npz', lambda p: np.savez(
        p, probs=np.zeros((5, 10)), labels=np.zeros(4, dtype=int)), 'inconsistent arrays'),
    'labels out of range': ('predictions.npz', lambda p: np.savez(
        p, probs=np.full((4, 10), 0.1), labels=np.array([0, 1, 2, 10])), 'predictions.npz'),
    'test_acc a string': ('metrics.json', {'test_acc': '0.5'}, "'test_acc'"),
    'per_class_acc a dict': ('metrics.json', {'per_class_acc': {'cat': 0.5}}, "'per_class_acc'"),
    'ece null': ('metrics.json', {'ece': None}, "'ece'"),
    'confusion matrix 3 x 3': ('metrics.json', {'confusion_matrix': np.eye(3, dtype=int).tolist()},
                               "'confusion_matrix'"),
    'label_names a string': ('metrics.json', {'label_names': 'airplane'}, "'label_names'"),
    'metrics not JSON': ('metrics.json', lambda p: p.write_text('{"test_acc": 0.5,'), 'metrics.json'),
    'history not a list': ('history.json', _write_json({'epoch': 1}),
                           'history.json is not a list of per-epoch records'),
    'val_acc a string': ('history.json', _write_json([{'epoch': 1, 'val_acc': 'high'}]), "'val_acc'"),
    'config seed negative': ('config.json', {'seed': -4}, "'seed'"),
    # Numbers that are not numbers, or impossible ones (class 5 of issue 18): json.dumps
    # writes NaN and Infinity as older versions of main.py did, and json.load reads them.
    'test_acc NaN': ('metrics.json', {'test_acc': float('nan')}, "'test_acc' = nan"),
    'test_acc infinite': ('metrics.json', {'test_acc': float('inf')}, "'test_acc' = inf"),
    'test_acc above 1': ('metrics.json', {'test_acc': 1.5}, "'test_acc' = 1.5"),
    'test_loss negative': ('metrics.json', {'test_loss': -0.1}, "'test_loss'"),
    'ece NaN': ('metrics.json', {'ece': float('nan')}, "'ece' = nan"),
    'best_val_acc above 1': ('metrics.json', {'best_val_acc': 2.0}, "'best_val_acc'"),
    'wall time infinite': ('metrics.json', {'wall_time_s': float('inf')}, "'wall_time_s'"),
    'wall time too large for a float': ('metrics.json', {'wall_time_s': 10 ** 400}, "'wall_time_s'"),
    'single view NaN': ('metrics.json', {'single_view': {'test_acc': float('nan'), 'ece': 0.1}},
                        "'single_view'"),
    'per_class_acc above 1': ('metrics.json', {'per_class_acc': [1.2] + [0.5] * 9}, "'per_class_acc'"),
    'per_class_acc NaN': ('metrics.json', {'per_class_acc': [float('nan')] + [0.5] * 9}, "'per_class_acc'"),
    'negative count': ('metrics.json', {'confusion_matrix': (np.eye(10, dtype=int) * 5 - 1).tolist()},
                       "'confusion_matrix'"),
    'data fingerprint not sha256': ('metrics.json', {'data_fingerprint': {'train': 'x', 'test': 'abc'}},
                                    "'data_fingerprint'"),
    'counts disagree with test_images': ('metrics.json', {'test_images': 1999}, 'test_images says 1999'),
    'test_acc disagrees with the confusion matrix': ('metrics.json', {'test_acc': 0.9},
                                                    'is not the accuracy of its confusion_matrix'),
    'val_loss NaN': ('history.json', _write_json([{'epoch': 1, 'val_loss': float('nan')}]), "'val_loss' = nan"),
    'train_acc above 1': ('history.json', _write_json([{'epoch': 1, 'train_acc': 1.7}]), "'train_acc'"),
    'lr negative': ('history.json', _write_json([{'epoch': 1, 'lr': -0.1}]), "'lr'"),
    'epoch time infinite': ('history.json', _write_json([{'epoch': 1, 'epoch_time_s': float('inf')}]),
                            "'epoch_time_s' = inf"),
    'config lr NaN': ('config.json', {'lr': float('nan')}, "'lr' = nan"),
    'probabilities NaN': ('predictions.npz', lambda p: np.savez(
        p, probs=np.full((4, 10), np.nan), labels=np.arange(4)), 'non-finite probabilities'),
    'probabilities above 1': ('predictions.npz', lambda p: np.savez(
        p, probs=np.eye(10)[:4] * 2 - 0.1, labels=np.arange(4)), 'outside [0, 1]'),
    'rows not summing to 1': ('predictions.npz', lambda p: np.savez(
        p, probs=np.full((4, 10), 0.2), labels=np.arange(4)), 'do not sum to 1 (e.g. 2.0000)'),
    'repeated test indices': ('predictions.npz', lambda p: np.savez(
        p, probs=np.full((4, 10), 0.1), labels=np.arange(4), indices=np.array([0, 1, 1, 2])),
        'repeated test-set indices'),
    'a thousand classes': ('predictions.npz', lambda p: np.savez(
        p, probs=np.full((4, 1000), 0.001), labels=np.arange(4)), 'inconsistent arrays'),
}


@pytest.mark.parametrize('case', DAMAGE)
def test_damaged_files_get_one_sentence_exit_2_and_nothing_written(tmp_path, capsys, case):
    run = make_fake_run(tmp_path, with_data=False)
    name, damage, named = DAMAGE[case]
    if isinstance(damage, dict):
        values = json.loads((run / name).read_text())
        damage = _write_json({**values, **damage})
    damage(run / name)
    assert viz.main([str(run), *QUICK_FIGURES]) == 2
    assert_refused(capsys, named)
    assert_nothing_drawn(run)


@pytest.mark.parametrize('option, value', [('--seed', '-1'), ('--seed', str(runfiles.MAX_SEED + 1)),
                                           ('--tsne-samples', '-1'), ('--gallery-size', '-3'),
                                           ('--tsne-samples', '3'), ('--tsne-samples', '10001'),
                                           ('--gallery-size', '101')])
def test_bad_options_get_one_sentence_exit_2_and_nothing_written(tmp_path, capsys, option, value):
    run = make_fake_run(tmp_path, with_data=False)
    assert viz.main([str(run), option, value]) == 2
    assert_refused(capsys, f'{option} {value}')
    assert_nothing_drawn(run)


def test_options_argparse_refuses_are_one_line_too(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        viz.main([str(tmp_path), '--seed', 'abc'])
    assert stop.value.code == 2
    assert_refused(capsys, '--seed', 'abc')


def test_figures_being_a_file_is_refused_before_drawing(tmp_path, capsys):
    run = make_fake_run(tmp_path, with_data=False)
    (run / 'figures').write_text('my notes')
    assert viz.main([str(run), *QUICK_FIGURES]) == 2
    assert_refused(capsys, str(run / 'figures'), 'not a folder')
    assert (run / 'figures').read_text() == 'my notes' and not (run / 'report.md').exists()


@pytest.mark.skipif(os.geteuid() == 0, reason='root writes into a read-only (0555) folder anyway; '
                    'test_unwritable_run_folder_simulated covers this case')
def test_read_only_run_folder_is_refused_before_drawing(tmp_path, capsys):
    run = make_fake_run(tmp_path, with_data=False)
    run.chmod(0o555)
    try:
        assert viz.main([str(run), *QUICK_FIGURES]) == 2
        assert_refused(capsys, str(run), 'permission denied')
        assert_nothing_drawn(run)
    finally:
        run.chmod(0o755)


@pytest.mark.parametrize('failing, code', [('mkstemp', errno.EROFS), ('replace', errno.EACCES),
                                           ('replace', errno.ENOSPC)])
def test_unwritable_run_folder_simulated(tmp_path, capsys, monkeypatch, failing, code):
    # What a read-only mount, a folder of another user or a full disk does to the
    # writes, whoever runs the tests (root ignores 0555).
    run = make_fake_run(tmp_path, with_data=False)

    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(tempfile if failing == 'mkstemp' else os, failing, refuse)
    assert viz.main([str(run), *QUICK_FIGURES]) == 2
    monkeypatch.undo()
    assert_refused(capsys, str(run))
    assert not (run / 'report.md').exists()
    assert not (run / 'figures').exists() or list((run / 'figures').iterdir()) == []
    assert [p.name for p in run.iterdir() if runfiles.TEMP_MARK in p.name] == []


# --------------------------------------------------------------------------
# The run folder's lock and the temporary files of killed writes
# --------------------------------------------------------------------------

def _stale_temp_files(run):
    """Temporary files as a killed atomic write leaves them, in the run folder and in figures/."""
    (run / 'figures').mkdir(exist_ok=True)
    # mkstemp's names: <file>.tmp- and 8 characters.
    stale = [run / f'history.json{runfiles.TEMP_MARK}abc_1234',
             run / 'figures' / f'tsne.png{runfiles.TEMP_MARK}xyz98765']
    for path in stale:
        path.write_bytes(b'half a file')
    return stale


def test_stale_temp_files_are_removed_when_nobody_holds_the_run(tmp_path):
    run = make_fake_run(tmp_path, with_metrics=False, with_predictions=False, with_data=False)
    stale = _stale_temp_files(run)
    assert viz.main([str(run)]) == 0
    assert not any(p.exists() for p in stale)
    assert (run / 'figures' / 'training_curves.png').exists()


def test_a_run_held_by_training_is_drawn_but_its_temp_files_are_left(tmp_path, capsys):
    run = make_fake_run(tmp_path, with_metrics=False, with_predictions=False, with_data=False)
    training = runfiles.RunFolderLock(run, 'main.py')
    assert training.acquire()
    try:
        stale = _stale_temp_files(run)     # main.py's writes in progress
        assert viz.main([str(run)]) == 0
        assert 'in use' in capsys.readouterr().out
        assert all(p.exists() for p in stale)
        assert (run / 'figures' / 'training_curves.png').exists() and (run / 'report.md').exists()
    finally:
        training.release()
    assert viz.main([str(run)]) == 0       # viz released its own lock: nobody holds the run now
    assert not any(p.exists() for p in stale)


# --------------------------------------------------------------------------
# Paths as users type them
# --------------------------------------------------------------------------

def test_relative_paths_and_the_latest_link(tmp_path, monkeypatch):
    run = make_fake_run(tmp_path, with_metrics=False, with_predictions=False, with_data=False)
    monkeypatch.chdir(tmp_path)
    assert viz.main(['runs/latest']) == 0
    assert (run / 'figures' / 'training_curves.png').exists()
    assert (run / 'report.md').read_text().startswith(f'# Run report: {run.name}\n')
    assert not (tmp_path / 'runs' / 'figures').exists()
    (run / 'report.md').unlink()
    monkeypatch.chdir(tmp_path / 'runs')
    assert viz.main([run.name]) == 0
    assert (run / 'report.md').exists()


def test_an_empty_path_is_refused_not_taken_for_the_current_folder(tmp_path, monkeypatch, capsys):
    run = make_fake_run(tmp_path, with_data=False)
    monkeypatch.chdir(run)          # a run folder: '' must not quietly mean this one
    assert viz.main(['', *QUICK_FIGURES]) == 2
    assert_refused(capsys, 'empty')
    assert_nothing_drawn(run)


def test_a_dangling_link_is_named_as_such(tmp_path, capsys):
    (tmp_path / 'runs').mkdir()
    (tmp_path / 'runs' / 'latest').symlink_to('20240101-deleted')
    assert viz.main([str(tmp_path / 'runs' / 'latest')]) == 2
    assert_refused(capsys, 'latest', 'link', '20240101-deleted')
    assert os.listdir(tmp_path / 'runs') == ['latest']


# --------------------------------------------------------------------------
# Issue 18 through the real CLI: things that are not files (class 1)
# --------------------------------------------------------------------------

# Refusals must come at once; 60 s is ample on a busy machine, and a hang fails the test.
QUICK = 60


def _fifo(path):
    path.unlink()
    os.mkfifo(path)


def _folder(path):
    path.unlink()
    path.mkdir()


def _link_to_dev_zero(path):
    path.unlink()
    path.symlink_to('/dev/zero')


NOT_FILES = {
    # case: (file, how it is replaced, what the sentence names)
    'config.json a named pipe': ('config.json', _fifo, 'named pipe'),
    'history.json a named pipe': ('history.json', _fifo, 'named pipe'),
    'metrics.json a named pipe': ('metrics.json', _fifo, 'named pipe'),
    'predictions.npz a named pipe': ('predictions.npz', _fifo, 'named pipe'),
    'metrics.json a folder': ('metrics.json', _folder, 'a folder'),
    'predictions.npz a link to /dev/zero': ('predictions.npz', _link_to_dev_zero, 'a device'),
    'test_batch a named pipe': ('../../data/cifar-10-batches-py/test_batch', _fifo, 'named pipe'),
    'batches.meta a named pipe': ('../../data/cifar-10-batches-py/batches.meta', _fifo, 'named pipe'),
    'batches.meta a folder': ('../../data/cifar-10-batches-py/batches.meta', _folder, 'a folder'),
}


@pytest.mark.parametrize('case', NOT_FILES)
def test_what_is_not_a_file_is_refused_at_once_through_the_cli(tmp_path, case):
    run = make_fake_run(tmp_path, n=300)
    name, replace, kind = NOT_FILES[case]
    path = Path(os.path.normpath(run / name))
    replace(path)
    result = run_cli(['runs/latest', '--tsne-samples', '0'], cwd=tmp_path, timeout=QUICK)
    cli_refusal(result, str(path), kind)
    assert_nothing_drawn(run)


def test_an_archive_that_is_a_link_to_dev_zero_is_refused_through_the_cli(tmp_path):
    # The gallery reads the archive itself when there is no extracted folder.
    run = make_fake_run(tmp_path, n=300)
    (tmp_path / 'data' / 'cifar-10-batches-py').rename(tmp_path / 'moved')
    (tmp_path / 'data' / 'cifar-10-python.tar.gz').symlink_to('/dev/zero')
    result = run_cli([str(run), '--tsne-samples', '0'], cwd=tmp_path, timeout=QUICK)
    cli_refusal(result, 'cifar-10-python.tar.gz', 'a device', '--gallery-size 0')
    assert_nothing_drawn(run)


def test_a_named_pipe_for_train_log_does_not_block_viz(tmp_path):
    # viz.py never reads train.log; a pipe there must not make it wait.
    run = make_fake_run(tmp_path, n=300, with_data=False)
    os.mkfifo(run / 'train.log')
    result = run_cli([str(run), *QUICK_FIGURES], cwd=tmp_path, timeout=QUICK)
    assert result.returncode == 0, result.stderr


def _sigterm_handler_installed(pid):
    """True once the process catches SIGTERM (cli's start-up handler); False if it ended first."""
    deadline = time.monotonic() + QUICK
    while time.monotonic() < deadline:
        try:
            status = Path(f'/proc/{pid}/status').read_text()
        except FileNotFoundError:
            return False
        caught = int(re.search(r'SigCgt:\s*([0-9a-f]+)', status).group(1), 16)
        if caught >> (signal.SIGTERM - 1) & 1:
            return True
        time.sleep(0.001)
    return False


@pytest.mark.skipif(not Path('/proc/self/status').exists(), reason='needs /proc to see the handler')
@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_during_start_up_ends_with_one_line_and_exit_130(tmp_path, signum):
    run = make_fake_run(tmp_path, n=300)
    before = snapshot(tmp_path)
    proc = subprocess.Popen([sys.executable, str(REPO / 'viz.py'), str(run)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # The handler goes in before NumPy is imported, so the signal lands during the imports.
        assert _sigterm_handler_installed(proc.pid), 'viz.py installs no start-up handler'
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=QUICK)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    name = signal.Signals(signum).name
    assert err.strip() == f'viz.py: interrupted by {name} while starting; nothing was changed'
    assert snapshot(tmp_path) == before and not (run / 'figures').exists()


def test_an_interrupt_while_drawing_keeps_whole_figures_and_says_so(tmp_path):
    run = make_fake_run(tmp_path)
    proc = subprocess.Popen([sys.executable, str(REPO / 'viz.py'), str(run)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = run / 'figures' / 'training_curves.png'
        deadline = time.monotonic() + QUICK
        while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=QUICK)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('viz.py: interrupted by SIGINT after writing'), err
    assert 'report.md' in lines[0] and 'Traceback' not in err
    assert not (run / 'report.md').exists()
    for path in (run / 'figures').iterdir():
        assert runfiles.TEMP_MARK not in path.name
        assert_valid_png(path)


# --------------------------------------------------------------------------
# A crash is not a divergence (class 2): exit code 3, one line
# --------------------------------------------------------------------------

def test_an_unexpected_error_exits_3_with_one_line_not_a_traceback(tmp_path):
    run = make_fake_run(tmp_path, n=300, with_data=False)
    # A planted bug in what viz.py calls, then viz.py's own __main__ path, as `python viz.py` runs it.
    code = ('import runpy, sys, metrics\n'
            'def broken(*args, **kwargs):\n'
            '    raise RuntimeError("planted bug")\n'
            'metrics.reliability_stats = broken\n'
            f'sys.argv = ["viz.py", *sys.argv[1:]]\n'
            f'runpy.run_path({str(REPO / "viz.py")!r}, run_name="__main__")\n')
    env = {k: v for k, v in os.environ.items() if k != 'CNNRNN_TRACEBACK'}
    env['PYTHONPATH'] = str(REPO)
    result = subprocess.run([sys.executable, '-c', code, str(run), *QUICK_FIGURES], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=QUICK)
    assert result.returncode == 3, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and 'Traceback' not in result.stderr, result.stderr
    assert lines[0].startswith('error: viz.py crashed (RuntimeError: planted bug)')
    assert 'CNNRNN_TRACEBACK=1' in lines[0]


# --------------------------------------------------------------------------
# Numbers that are not numbers (class 5), through the CLI
# --------------------------------------------------------------------------

NOT_NUMBERS = {
    'test accuracy NaN': ('metrics.json', lambda v: dict(v, test_acc=float('nan')), "'test_acc' = nan"),
    'test accuracy infinite': ('metrics.json', lambda v: dict(v, test_acc=float('inf')), "'test_acc' = inf"),
    'an ECE of -0.5': ('metrics.json', lambda v: dict(v, ece=-0.5), "'ece' = -0.5"),
    'validation loss Infinity in the history': (
        'history.json', lambda v: [dict(r, val_loss=float('inf')) if r['epoch'] == 3 else r for r in v],
        "record 3's 'val_loss' = inf"),
}


@pytest.mark.parametrize('case', NOT_NUMBERS)
def test_numbers_that_are_not_numbers_are_refused_through_the_cli(tmp_path, case):
    run = make_fake_run(tmp_path, n=300, with_data=False)
    name, change, named = NOT_NUMBERS[case]
    (run / name).write_text(json.dumps(change(json.loads((run / name).read_text()))))
    line = cli_refusal(run_cli([str(run), *QUICK_FIGURES], cwd=tmp_path, timeout=QUICK), str(run / name), named)
    assert 'nan %' not in line and 'inf %' not in line
    assert_nothing_drawn(run)


def test_probabilities_that_do_not_sum_to_1_are_refused_through_the_cli(tmp_path):
    run = make_fake_run(tmp_path, n=300, with_data=False)
    with np.load(run / 'predictions.npz') as z:
        arrays = dict(z)
    arrays['probs'][7] *= 0.5
    np.savez(run / 'predictions.npz', **arrays)
    cli_refusal(run_cli([str(run), *QUICK_FIGURES], cwd=tmp_path, timeout=QUICK),
                'predictions.npz', 'do not sum to 1 (e.g. 0.5000)')
    assert_nothing_drawn(run)


def test_null_history_values_are_gaps_and_the_report_shows_no_nan(tmp_path):
    # runfiles.write_json writes a NaN as null: unknown, drawn as a gap, never printed.
    run = make_fake_run(tmp_path, n=300, with_metrics=False, with_predictions=False, with_data=False)
    history = json.loads((run / 'history.json').read_text())
    history[-1].update(val_loss=None, train_loss=None, images_per_s=None)
    (run / 'history.json').write_text(json.dumps(history))
    result = run_cli([str(run)], cwd=tmp_path, timeout=QUICK)
    assert result.returncode == 0, result.stderr
    report = (run / 'report.md').read_text()
    assert not re.search(r'\b(nan|inf)\b', report, re.IGNORECASE)
    assert_valid_png(run / 'figures' / 'training_curves.png')


# --------------------------------------------------------------------------
# Everything checked before the first figure (class 6): a refusal changes nothing
# --------------------------------------------------------------------------

def _drawn_once(tmp_path, **kwargs):
    """A fake run with its figures and report already drawn (QUICK_FIGURES), and a snapshot of it."""
    run = make_fake_run(tmp_path, **kwargs)
    assert viz.main([str(run), *QUICK_FIGURES]) == 0
    return run, snapshot(run)


def test_report_md_being_a_folder_is_found_before_any_figure(tmp_path):
    run, _ = _drawn_once(tmp_path, n=300, with_data=False)
    (run / 'report.md').unlink()
    (run / 'report.md').mkdir()
    before = snapshot(run)
    cli_refusal(run_cli([str(run), *QUICK_FIGURES], cwd=tmp_path, timeout=QUICK), str(run / 'report.md'),
                'is a folder')
    assert snapshot(run) == before


def test_a_figure_path_being_a_folder_is_found_before_any_figure(tmp_path):
    run, _ = _drawn_once(tmp_path, n=300, with_data=False)
    target = run / 'figures' / 'reliability.png'
    target.unlink()
    target.mkdir()
    before = snapshot(run)
    cli_refusal(run_cli([str(run), *QUICK_FIGURES], cwd=tmp_path, timeout=QUICK), str(target), 'is a folder')
    assert snapshot(run) == before


def test_a_lock_that_is_a_folder_is_found_before_any_figure(tmp_path):
    run, _ = _drawn_once(tmp_path, n=300, with_data=False)
    (run / runfiles.LOCK_NAME).unlink()
    (run / runfiles.LOCK_NAME).mkdir()
    before = snapshot(run)
    cli_refusal(run_cli([str(run), *QUICK_FIGURES], cwd=tmp_path, timeout=QUICK), runfiles.LOCK_NAME, 'a folder',
                'remove it')
    assert snapshot(run) == before


def _write_meta(data_dir, names):
    with open(Path(data_dir) / 'cifar-10-batches-py' / 'batches.meta', 'wb') as f:
        pickle.dump({b'label_names': names}, f)


def test_label_names_that_are_not_utf8_are_found_before_any_figure(tmp_path):
    run, before = _drawn_once(tmp_path, n=300)
    _write_meta(tmp_path / 'data', [b'\xff\xfe' + n.encode() for n in viz.CIFAR10_CLASSES])
    result = run_cli([str(run), '--tsne-samples', '0'], cwd=tmp_path, timeout=QUICK)
    cli_refusal(result, 'batches.meta', 'UTF-8', '--gallery-size 0')
    assert snapshot(run) == before


def test_a_huge_gallery_is_refused_at_once_and_the_bounds_are_in_help(tmp_path):
    run, before = _drawn_once(tmp_path, n=300)
    start = time.monotonic()
    for option, value, bound in (('--gallery-size', '1000000', '1 to 100'),
                                 ('--tsne-samples', '50000', '5 to 10000')):
        result = run_cli([str(run), option, value], cwd=tmp_path, timeout=QUICK)
        cli_refusal(result, f'{option} {value}', bound)
    assert time.monotonic() - start < QUICK
    assert snapshot(run) == before
    help_text = ' '.join(run_cli(['--help'], cwd=tmp_path, timeout=QUICK).stdout.split())
    assert '1 to 100' in help_text and '5 to 10000' in help_text


def test_the_largest_gallery_and_sample_are_accepted():
    assert viz.check_options(viz.MAX_TSNE_SAMPLES, viz.MAX_GALLERY_SIZE, 0) is None
    assert viz.check_options(viz.MIN_TSNE_SAMPLES, 1, 0) is None


def test_label_names_with_dollar_signs_do_not_break_the_figures(tmp_path):
    # matplotlib reads $...$ as mathematics and raised on '$$' or '$x^$' after the first figure.
    run = make_fake_run(tmp_path, n=300)
    values = json.loads((run / 'metrics.json').read_text())
    values['label_names'] = ['$$', 'a $x^$ b', '$5 bill'] + ['x' * 300] + viz.CIFAR10_CLASSES[4:]
    (run / 'metrics.json').write_text(json.dumps(values))
    result = run_cli([str(run), '--tsne-samples', '20', '--gallery-size', '4'], cwd=tmp_path, timeout=QUICK * 3)
    assert result.returncode == 0, result.stderr
    for stem in ALL_FIGURES:
        assert_valid_png(run / 'figures' / f'{stem}.png')


# --------------------------------------------------------------------------
# The data a run was tested on (class 4): data_fingerprint in metrics.json
# --------------------------------------------------------------------------

def _record_test_fingerprint(run, data_dir):
    import data_utils

    X, y, _ = data_utils.load_test_set(data_dir)
    values = json.loads((run / 'metrics.json').read_text())
    values['data_fingerprint'] = {'train': '0' * 64, 'test': data_utils.fingerprint(X, y)}
    (run / 'metrics.json').write_text(json.dumps(values))


def test_another_test_set_than_the_recorded_one_is_refused_before_any_figure(tmp_path):
    run = make_fake_run(tmp_path, n=300)
    _record_test_fingerprint(run, tmp_path / 'data')
    # Same labels, one pixel changed: only the fingerprint can tell.
    batch = tmp_path / 'data' / 'cifar-10-batches-py' / 'test_batch'
    with open(batch, 'rb') as f:
        d = pickle.load(f)
    d[b'data'][0, 0] ^= 1
    with open(batch, 'wb') as f:
        pickle.dump(d, f)
    result = run_cli(['runs/latest', '--tsne-samples', '0'], cwd=tmp_path, timeout=QUICK)
    cli_refusal(result, 'is not the one this run was tested on', 'data_fingerprint', '--data-dir',
                '--gallery-size 0')
    assert_nothing_drawn(run)


def test_the_recorded_test_set_is_found_past_another_one(tmp_path):
    # data/ of the current folder holds other images; the repository's data/ (the run's) is used.
    run = make_fake_run(tmp_path / 'repo', n=300)
    _record_test_fingerprint(run, tmp_path / 'repo' / 'data')
    write_test_batch(tmp_path / 'data', np.arange(300) % 10)
    result = run_cli([str(run), '--tsne-samples', '0', '--gallery-size', '4'], cwd=tmp_path, timeout=QUICK)
    assert result.returncode == 0, result.stderr
    assert_valid_png(run / 'figures' / 'misclassified.png')


def test_a_data_dir_that_holds_nothing_is_refused_not_skipped(tmp_path):
    # Asked for by name, so a typo must not quietly drop the gallery.
    run = make_fake_run(tmp_path, n=300)
    (tmp_path / 'empty').mkdir()
    for value, named in (('empty', 'holds no CIFAR-10 test set'), ('', 'empty path')):
        result = run_cli([str(run), '--tsne-samples', '0', '--data-dir', value], cwd=tmp_path, timeout=QUICK)
        cli_refusal(result, '--data-dir', named)
    assert_nothing_drawn(run)
    # An empty run folder (an unset shell variable) is not the current folder either.
    cli_refusal(run_cli(['', *QUICK_FIGURES], cwd=run, timeout=QUICK), 'empty path')
    # Typed as a relative path, and given as the extracted folder itself, it is found.
    result = run_cli([str(run), '--tsne-samples', '0', '--gallery-size', '4',
                      '--data-dir', 'data/cifar-10-batches-py'], cwd=tmp_path, timeout=QUICK)
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------
# Advice that can be followed (class 7): the suggested commands work when typed
# --------------------------------------------------------------------------

def test_damaged_metrics_name_a_re_evaluation_of_a_run_that_exists(tmp_path):
    run = make_fake_run(tmp_path, n=300, with_data=False)
    (run / 'ckpt.npz').write_bytes(b'stands for a checkpoint')
    (run / 'metrics.json').write_text('{"test_acc": NaN}')
    line = cli_refusal(run_cli(['runs/latest', *QUICK_FIGURES], cwd=tmp_path, timeout=QUICK), "'test_acc' = nan")
    words = shlex.split(line[line.index('python '):])
    assert words[:3] == ['python', str(REPO / 'main.py'), '--resume'] and words[4:] == ['--evaluate']
    assert words[3] == f'runs/{run.name}'            # the run itself, not the link that may move on
    assert (tmp_path / words[3] / 'ckpt.npz').is_file()
    main_py = (REPO / 'main.py').read_text()
    assert "'--resume'" in main_py and "'--evaluate'" in main_py


def test_without_a_checkpoint_no_resume_is_suggested(tmp_path):
    run = make_fake_run(tmp_path, n=300, with_data=False)
    (run / 'metrics.json').write_text('{"test_acc": NaN}')
    line = cli_refusal(run_cli([str(run), *QUICK_FIGURES], cwd=tmp_path, timeout=QUICK), 'no ckpt.npz')
    assert '--resume' not in line


def test_the_suggested_move_of_a_damaged_history_works_when_typed(tmp_path):
    # A folder name with a space: the command must quote it.
    run = make_fake_run(tmp_path / 'my runs', n=300, with_metrics=False, with_predictions=False,
                        with_data=False)
    (run / 'history.json').write_text('[{"epoch": 1, "val_acc": NaN}]')
    line = cli_refusal(run_cli([str(run)], cwd=tmp_path, timeout=QUICK), "'val_acc' = nan")
    move = re.search(r'\((mv .*?)\)', line).group(1)
    subprocess.run(move, shell=True, cwd=tmp_path, check=True)
    assert (run / 'history.json.damaged').is_file() and not (run / 'history.json').exists()
    assert run_cli([str(run)], cwd=tmp_path, timeout=QUICK).returncode == 0


def test_the_help_command_suggested_for_a_bad_option_works_when_typed(tmp_path):
    result = run_cli(['runs/latest', '--seed', 'abc'], cwd=tmp_path, timeout=QUICK)
    line = cli_refusal(result, '--seed')
    suggested = line[line.index('see ') + 4:]
    assert suggested.startswith('python ') and suggested.endswith(' --help')
    typed = subprocess.run(f'{shlex.quote(sys.executable)} {suggested[len("python "):]}', shell=True,
                           cwd=tmp_path, capture_output=True, text=True, timeout=QUICK)
    assert typed.returncode == 0 and '--gallery-size' in typed.stdout


def test_damaged_data_files_do_not_advise_a_download_viz_cannot_do(tmp_path):
    run = make_fake_run(tmp_path, n=300)
    (tmp_path / 'data' / 'cifar-10-batches-py' / 'test_batch').write_bytes(b'not a pickle')
    line = cli_refusal(run_cli([str(run), '--tsne-samples', '0'], cwd=tmp_path, timeout=QUICK), 'test_batch')
    assert 're-download' not in line and 'cifar-10-python.tar.gz' in line and '--gallery-size 0' in line


# --------------------------------------------------------------------------
# Only this project's temporary files are removed (class 8)
# --------------------------------------------------------------------------

def test_a_users_files_with_tmp_in_their_names_are_kept(tmp_path):
    run = make_fake_run(tmp_path, n=300, with_data=False)
    (run / 'figures').mkdir()
    kept = [run / 'notes.tmp-keep', run / 'figures' / 'draft.tmp-1', run / 'history.json.tmp-mine']
    for path in kept:
        path.write_text('mine')
    result = run_cli([str(run), *QUICK_FIGURES], cwd=tmp_path, timeout=QUICK)
    assert result.returncode == 0, result.stderr
    assert all(p.read_text() == 'mine' for p in kept)


# --------------------------------------------------------------------------
# Text from files in report.md (class 10): escaped Markdown
# --------------------------------------------------------------------------

def _cells(row):
    """The cells of a Markdown table row, split at the pipes that are not escaped."""
    return [c.strip() for c in re.split(r'(?<!\\)\|', row)[1:-1]]


def test_label_names_and_config_values_are_escaped_in_report_md(tmp_path):
    run = make_fake_run(tmp_path, n=300, with_data=False, name='run *1*')
    names = ['cat|dog', '*bold*', '<script>', 'new\nline', '`tick`', '_under_', '[link](x)', 'a & b',
             '# head', 'plain_name']
    values = json.loads((run / 'metrics.json').read_text())
    values['label_names'] = names
    (run / 'metrics.json').write_text(json.dumps(values))
    config = json.loads((run / 'config.json').read_text())
    config.update(description='a | b <i>', lr_changes=[{'note': 'x|`y`'}])
    (run / 'config.json').write_text(json.dumps(config))
    result = run_cli([str(run), *QUICK_FIGURES], cwd=tmp_path, timeout=QUICK)
    assert result.returncode == 0, result.stderr
    report = (run / 'report.md').read_text()
    assert report.startswith('# Run report: run \\*1\\*\n')
    section = report.split('## Per-class accuracy')[1].split('##')[0]
    rows = [r for r in section.splitlines() if r.startswith('|')][2:]
    assert len(rows) == 10 and all(len(_cells(r)) == 3 for r in rows)
    shown = [_cells(r)[0] for r in rows]
    assert shown == ['cat\\|dog', '\\*bold\\*', '\\<script\\>', 'new line', '\\`tick\\`', '\\_under\\_',
                     '\\[link\\](x)', 'a \\& b', '\\# head', 'plain_name']
    for row in report.split('## Configuration')[1].splitlines()[4:]:
        if row:
            assert len(_cells(row)) == 2, row
    assert '| description | a \\| b \\<i\\> |' in report
    assert '<script>' not in report and '<i>' not in report
