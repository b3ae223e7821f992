"""Tests for viz.py on a synthetic run folder (no training, no real CIFAR-10).

`make_fake_run` lays out repo/runs/<run>/ and repo/data/cifar-10-batches-py/
the way main.py and data_utils.py do, with predictions whose accuracy,
calibration and hidden-state clusters look like a half-trained model's.
The calibration math itself is tested in test_metrics.py.
"""

import ast
import errno
import json
import os
import pickle
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

import metrics
import runfiles
import viz
from test_metrics import loop_ece, softmax

REPO = Path(__file__).resolve().parent.parent
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
ALL_FIGURES = ['training_curves', 'confusion_matrix', 'reliability', 'tsne', 'misclassified']
# Small t-SNE sample in tests: the default 2,000 is timed by hand, not in CI.
TSNE_SAMPLES = '300'
# Options that skip the two slow figures, for tests about something else.
FAST = ['--tsne-samples', '0', '--gallery-size', '0']


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
    history = []
    for e in range(1, epochs + 1):
        history.append({
            'epoch': e, 'train_loss': 2.2 / e ** 0.5, 'train_acc': 0.2 + 0.08 * e,
            'val_loss': 2.0 / e ** 0.4 + 0.02 * max(0, e - 4),
            'val_acc': 0.25 + 0.06 * min(e, 4) - 0.01 * max(0, e - 4),
            'lr': 0.05 * 0.5 * (1 + np.cos(np.pi * (e - 1) / epochs)),
            'epoch_time_s': 30.0 + e, 'images_per_s': 1500.0 + e,
        })
    return history


def make_fake_run(root, n=2000, hidden_size=128, with_metrics=True, with_predictions=True,
                  with_data=True, name='20240101-120000-fast'):
    """Write repo-like folders under root; return the run folder Path.

    root/runs/<name>/{config,history,metrics}.json, predictions.npz,
    root/runs/latest -> <name>, and root/data/cifar-10-batches-py/test_batch.
    metrics.json's ECE is computed by a loop independent of metrics.py.
    """
    root = Path(root)
    run = root / 'runs' / name
    run.mkdir(parents=True)
    (root / 'runs' / 'latest').symlink_to(name)
    config = {'preset': 'fast', 'epochs': 6, 'batch_size': 64, 'lr': 0.05, 'seed': 3,
              'seq_layout': 'pixels', 'subset': 0.1, 'data_dir': 'data', 'schedule': 'cosine',
              'warmup_epochs': 1, 'weight_decay': 5e-4, 'clip': 5.0, 'momentum': 0.9, 'hidden': hidden_size}
    (run / 'config.json').write_text(json.dumps(config, indent=2))
    history = fake_history(6)
    (run / 'history.json').write_text(json.dumps(history, indent=2))
    probs, labels, indices, hidden = fake_predictions(n, hidden_size)
    if with_predictions:
        np.savez(run / 'predictions.npz', probs=probs, labels=labels, indices=indices, hidden=hidden)
    if with_metrics:
        pred = probs.argmax(axis=1)
        cm = np.zeros((10, 10), dtype=int)
        for t, p in zip(labels, pred):
            cm[t, p] += 1
        best = max(history, key=lambda r: r['val_acc'])
        metrics_json = {
            'test_loss': float(-np.mean(np.log(probs[np.arange(n), labels]))),
            'test_acc': float((pred == labels).mean()),
            'ece': loop_ece(probs, labels),
            'per_class_acc': (np.diag(cm) / cm.sum(axis=1)).tolist(),
            'confusion_matrix': cm.tolist(),
            'best_val_acc': best['val_acc'], 'best_epoch': best['epoch'],
            'epochs_done': 6, 'stopped_early': False, 'wall_time_s': 215.3,
            'train_images_per_s': 1503.2, 'label_names': viz.CIFAR10_CLASSES,
        }
        (run / 'metrics.json').write_text(json.dumps(metrics_json, indent=2))
    if with_data:
        # Test image i has label labels[row] where indices[row] == i.
        by_index = np.empty(n, dtype=np.int64)
        by_index[indices] = labels
        write_test_batch(root / 'data', by_index)
    return run


def run_cli(args, cwd):
    """Run viz.py as a user would; return the CompletedProcess."""
    return subprocess.run([sys.executable, str(REPO / 'viz.py'), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(autouse=True)
def _outside_the_repository(tmp_path, monkeypatch):
    # viz looks for data/ under the current folder first: the repository's own
    # data/ (maybe the real CIFAR-10) must not stand in for a test's images.
    monkeypatch.chdir(tmp_path)


def assert_valid_png(path):
    """PNG signature, decodes, and is not blank (varied pixels, more than one colour)."""
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == PNG_SIGNATURE, f'{path.name} is not a PNG'
    pixels = mpimg.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    rgb = pixels[..., :3].reshape(-1, 3)
    assert rgb.std() > 0.05, f'{path.name} looks blank (pixel std {rgb.std():.4f})'
    assert len(np.unique(rgb[::7], axis=0)) > 10, f'{path.name} has almost a single colour'


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


def test_mismatched_test_images_skip_the_gallery(tmp_path, capsys):
    run = make_fake_run(tmp_path)
    write_test_batch(tmp_path / 'data', np.zeros(2000, dtype=int))  # wrong labels
    assert viz.main([str(run), '--tsne-samples', '0']) == 0
    assert 'do not match' in capsys.readouterr().out
    assert not (run / 'figures' / 'misclassified.png').exists()


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
    assert viz.main([str(run), '--tsne-samples', '0']) == 0
    assert not marker.exists(), 'loading the test images ran code from the pickle'
    skipped = [line for line in capsys.readouterr().out.splitlines() if 'Skipped misclassified.png' in line]
    assert len(skipped) == 1 and str(batch) in skipped[0]
    assert not (run / 'figures' / 'misclassified.png').exists()
    assert (run / 'figures' / 'reliability.png').exists()
    assert str(batch) in (run / 'report.md').read_text()


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
}


@pytest.mark.parametrize('case', DAMAGE)
def test_damaged_files_get_one_sentence_exit_2_and_nothing_written(tmp_path, capsys, case):
    run = make_fake_run(tmp_path, with_data=False)
    name, damage, named = DAMAGE[case]
    if isinstance(damage, dict):
        values = json.loads((run / name).read_text())
        damage = _write_json({**values, **damage})
    damage(run / name)
    assert viz.main([str(run), *FAST]) == 2
    assert_refused(capsys, named)
    assert_nothing_drawn(run)


@pytest.mark.parametrize('option, value', [('--seed', '-1'), ('--seed', str(runfiles.MAX_SEED + 1)),
                                           ('--tsne-samples', '-1'), ('--gallery-size', '-3')])
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
    assert viz.main([str(run), *FAST]) == 2
    assert_refused(capsys, str(run / 'figures'), 'not a folder')
    assert (run / 'figures').read_text() == 'my notes' and not (run / 'report.md').exists()


@pytest.mark.skipif(os.geteuid() == 0, reason='root writes into a read-only (0555) folder anyway; '
                    'test_unwritable_run_folder_simulated covers this case')
def test_read_only_run_folder_is_refused_before_drawing(tmp_path, capsys):
    run = make_fake_run(tmp_path, with_data=False)
    run.chmod(0o555)
    try:
        assert viz.main([str(run), *FAST]) == 2
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
    assert viz.main([str(run), *FAST]) == 2
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
    stale = [run / f'history.json{runfiles.TEMP_MARK}abc',
             run / 'figures' / f'tsne.png{runfiles.TEMP_MARK}xyz']
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
    assert viz.main(['', *FAST]) == 2
    assert_refused(capsys, 'empty')
    assert_nothing_drawn(run)


def test_a_dangling_link_is_named_as_such(tmp_path, capsys):
    (tmp_path / 'runs').mkdir()
    (tmp_path / 'runs' / 'latest').symlink_to('20240101-deleted')
    assert viz.main([str(tmp_path / 'runs' / 'latest')]) == 2
    assert_refused(capsys, 'latest', 'link', '20240101-deleted')
    assert os.listdir(tmp_path / 'runs') == ['latest']
