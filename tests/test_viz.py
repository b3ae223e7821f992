"""Tests for viz.py on a synthetic run folder (no training, no real CIFAR-10).

`make_fake_run` lays out repo/runs/<run>/ and repo/data/cifar-10-batches-py/
the way main.py and data_utils.py do, with predictions whose accuracy,
calibration and hidden-state clusters look like a half-trained model's.
"""

import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import viz  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ALL_FIGURES = ["training_curves", "confusion_matrix", "reliability", "tsne", "misclassified"]
# Small t-SNE sample in tests: the default 2,000 is timed by hand, not in CI.
TSNE_SAMPLES = "300"


# --------------------------------------------------------------------------
# Synthetic run folder
# --------------------------------------------------------------------------

def _softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fake_predictions(n=2000, hidden_size=128, seed=0):
    """probs (n, 10) float32, labels (n,), indices (n,), hidden (n, H) float32.

    Classes are balanced; about half the predictions are right, and the hidden
    states are class centroids plus noise, so t-SNE has clusters to show.
    """
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    logits = rng.normal(scale=1.5, size=(n, 10)) + 2.0 * np.eye(10)[labels]
    probs = _softmax(logits).astype(np.float32)
    centroids = rng.normal(size=(10, hidden_size))
    hidden = np.tanh(centroids[labels] + rng.normal(scale=0.8, size=(n, hidden_size))).astype(np.float32)
    indices = rng.permutation(n)
    return probs, labels.astype(np.int64), indices.astype(np.int64), hidden


def write_test_batch(data_dir, labels_by_index):
    """A CIFAR-style test_batch pickle (bytes keys, NCHW rows) with patterned images.

    labels_by_index: (n,) true class of test image i.
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
    folder = Path(data_dir) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": images.reshape(n, 3072), b"labels": [int(v) for v in labels_by_index],
                     b"batch_label": b"testing batch 1 of 1"}, f)
    return images


def fake_history(epochs=6):
    history = []
    for e in range(1, epochs + 1):
        history.append({
            "epoch": e, "train_loss": 2.2 / e ** 0.5, "train_acc": 0.2 + 0.08 * e,
            "val_loss": 2.0 / e ** 0.4 + 0.02 * max(0, e - 4), "val_acc": 0.25 + 0.06 * min(e, 4) - 0.01 * max(0, e - 4),
            "lr": 0.05 * 0.5 * (1 + np.cos(np.pi * (e - 1) / epochs)),
            "epoch_time_s": 30.0 + e, "images_per_s": 1500.0 + e,
        })
    return history


def make_fake_run(root, n=2000, hidden_size=128, with_metrics=True, with_predictions=True,
                  with_data=True, name="20240101-120000-fast"):
    """Write repo-like folders under root; return the run folder Path.

    root/runs/<name>/{config,history,metrics}.json, predictions.npz,
    root/runs/latest -> <name>, and root/data/cifar-10-batches-py/test_batch.
    metrics.json's ECE is computed by a loop independent of viz.
    """
    root = Path(root)
    run = root / "runs" / name
    run.mkdir(parents=True)
    (root / "runs" / "latest").symlink_to(name)
    config = {"preset": "fast", "epochs": 6, "batch_size": 64, "lr": 0.05, "seed": 3,
              "seq_layout": "pixels", "subset": 0.1, "data_dir": "data", "schedule": "cosine",
              "warmup_epochs": 1, "weight_decay": 5e-4, "clip": 5.0, "momentum": 0.9, "hidden": hidden_size}
    (run / "config.json").write_text(json.dumps(config, indent=2))
    history = fake_history(6)
    (run / "history.json").write_text(json.dumps(history, indent=2))
    probs, labels, indices, hidden = fake_predictions(n, hidden_size)
    if with_predictions:
        np.savez(run / "predictions.npz", probs=probs, labels=labels, indices=indices, hidden=hidden)
    if with_metrics:
        pred = probs.argmax(axis=1)
        cm = np.zeros((10, 10), dtype=int)
        for t, p in zip(labels, pred):
            cm[t, p] += 1
        best = max(history, key=lambda r: r["val_acc"])
        metrics = {
            "test_loss": float(-np.mean(np.log(probs[np.arange(n), labels]))),
            "test_acc": float((pred == labels).mean()),
            "ece": loop_ece(probs, labels),
            "per_class_acc": (np.diag(cm) / cm.sum(axis=1)).tolist(),
            "confusion_matrix": cm.tolist(),
            "best_val_acc": best["val_acc"], "best_epoch": best["epoch"],
            "epochs_done": 6, "stopped_early": False, "wall_time_s": 215.3,
            "train_images_per_s": 1503.2, "label_names": viz.CIFAR10_CLASSES,
        }
        (run / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if with_data:
        # Test image i has label labels[row] where indices[row] == i.
        by_index = np.empty(n, dtype=np.int64)
        by_index[indices] = labels
        write_test_batch(root / "data", by_index)
    return run


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


def run_cli(args, cwd):
    """Run viz.py as a user would; return the CompletedProcess."""
    return subprocess.run([sys.executable, str(REPO / "viz.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def assert_valid_png(path):
    """PNG signature, decodes, and is not blank (varied pixels, more than one colour)."""
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    pixels = mpimg.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    rgb = pixels[..., :3].reshape(-1, 3)
    assert rgb.std() > 0.05, f"{path.name} looks blank (pixel std {rgb.std():.4f})"
    assert len(np.unique(rgb[::7], axis=0)) > 10, f"{path.name} has almost a single colour"


# --------------------------------------------------------------------------
# Full run through the CLI (once per module; the tests below read its output)
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    run = make_fake_run(root)
    # cwd is not the repo root, so data_dir "data" must be found via runs/<run>/../../data;
    # the argument is the runs/latest symlink.
    result = run_cli([str(root / "runs" / "latest"), "--tsne-samples", TSNE_SAMPLES], cwd=root.parent)
    assert result.returncode == 0, result.stderr
    return run, result


def test_every_figure_is_a_valid_nonblank_png(full_run):
    run, _ = full_run
    umask = os.umask(0)
    os.umask(umask)
    for stem in ALL_FIGURES:
        assert_valid_png(run / "figures" / f"{stem}.png")
        # Atomic writes go through mkstemp (0600); the results get normal permissions.
        assert (run / "figures" / f"{stem}.png").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (run / "report.md").stat().st_mode & 0o777 == 0o666 & ~umask
    # Atomic writes leave no temporary files behind.
    leftovers = [p.name for p in run.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]
    assert leftovers == []


def test_cli_prints_timing_per_figure(full_run):
    _, result = full_run
    for stem in ALL_FIGURES:
        assert re.search(rf"{stem}\.png\s+\d+\.\d+ s", result.stdout), result.stdout


def test_report_mentions_figures_and_headline_numbers(full_run):
    run, _ = full_run
    report = (run / "report.md").read_text()
    metrics = json.loads((run / "metrics.json").read_text())
    for stem in ALL_FIGURES:
        assert f"](figures/{stem}.png)" in report
    assert f"{100 * metrics['test_acc']:.2f} %" in report
    assert f"{metrics['test_loss']:.4f}" in report
    assert f"{metrics['ece']:.4f}" in report
    assert f"{100 * metrics['best_val_acc']:.2f} %" in report
    assert "1503 images/s" in report and "215" in report
    for name in viz.CIFAR10_CLASSES:
        assert f"| {name} |" in report
    assert "Most confused class pairs" in report
    assert '"seq_layout"' not in report and "| seq_layout | pixels |" in report


def test_report_ece_of_the_diagram_equals_metrics_json(full_run):
    run, _ = full_run
    report = (run / "report.md").read_text()
    metrics = json.loads((run / "metrics.json").read_text())
    shown = re.search(r"ECE in the diagram: ([0-9.]+)", report).group(1)
    assert shown == f"{metrics['ece']:.4f}"
    assert "differs" not in report


def test_report_most_confused_pairs_are_the_top_off_diagonal_cells(full_run):
    run, _ = full_run
    report = (run / "report.md").read_text()
    cm = np.array(json.loads((run / "metrics.json").read_text())["confusion_matrix"])
    off = cm.copy()
    np.fill_diagonal(off, -1)
    i, j = np.unravel_index(off.argmax(), off.shape)
    names = viz.CIFAR10_CLASSES
    section = report.split("## Most confused class pairs")[1].split("##")[0]
    rows = [r for r in section.splitlines() if r.startswith("| ") and "---" not in r][1:]
    assert len(rows) == 5
    assert rows[0].startswith(f"| {names[i]} | {names[j]} | {off[i, j]} |")


def test_gallery_shows_the_most_confident_wrong_predictions(full_run):
    run, _ = full_run
    with np.load(run / "predictions.npz") as z:
        probs, labels, indices = z["probs"], z["labels"], z["indices"]
    conf = probs.max(axis=1)
    wrong = probs.argmax(axis=1) != labels
    # Independent pick: the 36 largest confidences among the wrong rows.
    threshold = np.sort(conf[wrong])[-36]
    expected = set(indices[wrong & (conf >= threshold)].tolist())
    report = (run / "report.md").read_text()
    listed = re.search(r"Test-set indices shown, most confident first: ([0-9, ]+)\.", report).group(1)
    shown = [int(s) for s in listed.split(",")]
    assert len(shown) == 36 and set(shown) == expected
    row_of = {int(ix): r for r, ix in enumerate(indices)}
    shown_conf = [conf[row_of[i]] for i in shown]
    assert shown_conf == sorted(shown_conf, reverse=True)


# --------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------

def test_ece_matches_an_independent_loop_on_random_predictions():
    rng = np.random.default_rng(7)
    for n, scale in ((500, 1.0), (3000, 3.0)):
        probs = _softmax(rng.normal(scale=scale, size=(n, 10))).astype(np.float32)
        labels = rng.integers(0, 10, size=n)
        assert viz.expected_calibration_error(probs, labels) == pytest.approx(loop_ece(probs, labels), abs=1e-12)
        assert viz.expected_calibration_error(probs, labels, n_bins=7) == pytest.approx(
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
    assert viz.expected_calibration_error(probs, labels) == pytest.approx(0.33, abs=1e-12)
    # Perfect, fully confident predictions are perfectly calibrated.
    assert viz.expected_calibration_error(np.eye(3), np.arange(3)) == 0.0


def test_bin_convention_is_right_closed():
    edges = viz.calibration_bin_edges(15)
    conf = np.array([0.0, edges[1], np.nextafter(edges[1], 1), 0.5, edges[14], 1.0, 1.0 + 1e-7])
    assert viz.confidence_bins(conf, 15).tolist() == [0, 0, 1, 7, 13, 14, 14]


def test_reliability_title_carries_the_same_ece():
    probs, labels, _, _ = fake_predictions(500)
    fig = viz.plot_reliability(probs, labels)
    ece = viz.expected_calibration_error(probs, labels)
    assert f"ECE = {ece:.4f}" in fig.axes[0].get_title()


def test_importing_viz_does_not_import_sklearn_or_pyplot():
    code = "import sys, viz; print('sklearn' in sys.modules, 'matplotlib.pyplot' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


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


def test_load_test_images_gives_hwc_in_archive_order(tmp_path):
    labels = np.arange(20) % 10
    nchw = write_test_batch(tmp_path, labels)
    images, got_labels, _ = viz.load_test_images(tmp_path)
    assert images.shape == (20, 32, 32, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, nchw.transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(got_labels, labels)
    with pytest.raises(FileNotFoundError):
        viz.load_test_images(tmp_path / "nowhere")


# --------------------------------------------------------------------------
# Partial runs, missing data and wrong folders
# --------------------------------------------------------------------------

def test_partial_run_draws_curves_and_says_what_is_missing(tmp_path, capsys):
    run = make_fake_run(tmp_path, with_metrics=False, with_predictions=False, with_data=False)
    assert viz.main([str(run)]) == 0
    out = capsys.readouterr().out
    assert_valid_png(run / "figures" / "training_curves.png")
    assert sorted(p.name for p in (run / "figures").iterdir()) == ["training_curves.png"]
    missing_lines = [line for line in out.splitlines() if "metrics.json" in line and "predictions.npz" in line]
    assert len(missing_lines) == 1 and "not found" in missing_lines[0]
    report = (run / "report.md").read_text()
    assert "](figures/training_curves.png)" in report and "Best validation accuracy so far" in report


def test_metrics_without_predictions_still_gives_confusion_matrix(tmp_path, capsys):
    run = make_fake_run(tmp_path, with_predictions=False, with_data=False)
    assert viz.main([str(run)]) == 0
    assert "predictions.npz not found" in capsys.readouterr().out
    assert sorted(p.stem for p in (run / "figures").iterdir()) == ["confusion_matrix", "training_curves"]


def test_config_only_run_writes_a_report_without_figures(tmp_path):
    run = make_fake_run(tmp_path, with_metrics=False, with_predictions=False, with_data=False)
    (run / "history.json").unlink()
    assert viz.main([str(run)]) == 0
    assert list((run / "figures").iterdir()) == []
    assert "| preset | fast |" in (run / "report.md").read_text()


def test_missing_images_skip_only_the_gallery_and_data_dir_option_finds_them(tmp_path, capsys):
    run = make_fake_run(tmp_path)
    moved = tmp_path / "elsewhere"
    (tmp_path / "data").rename(moved)
    assert viz.main([str(run), "--tsne-samples", "0"]) == 0
    out = capsys.readouterr().out
    assert len([line for line in out.splitlines() if "Skipped misclassified.png" in line]) == 1
    assert not (run / "figures" / "misclassified.png").exists()
    assert (run / "figures" / "reliability.png").exists()

    assert viz.main([str(run), "--tsne-samples", "0", "--data-dir", str(moved), "--gallery-size", "9"]) == 0
    assert_valid_png(run / "figures" / "misclassified.png")
    report = (run / "report.md").read_text()
    listed = re.search(r"most confident first: ([0-9, ]+)\.", report).group(1)
    assert len(listed.split(",")) == 9


def test_mismatched_test_images_skip_the_gallery(tmp_path, capsys):
    run = make_fake_run(tmp_path)
    write_test_batch(tmp_path / "data", np.zeros(2000, dtype=int))  # wrong labels
    assert viz.main([str(run), "--tsne-samples", "0"]) == 0
    assert "do not match" in capsys.readouterr().out
    assert not (run / "figures" / "misclassified.png").exists()


def test_wrong_folder_exits_2_and_writes_nothing(tmp_path):
    (tmp_path / "notes.txt").write_text("not a run")
    before = sorted(os.listdir(tmp_path))
    result = run_cli([str(tmp_path)], cwd=tmp_path)
    assert result.returncode == 2
    assert "not a run folder" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == before
    assert viz.main([str(tmp_path / "does-not-exist")]) == 2
    assert sorted(os.listdir(tmp_path)) == before


def test_damaged_files_get_one_sentence_and_exit_2(tmp_path, capsys):
    run = make_fake_run(tmp_path, with_data=False)
    (run / "history.json").write_text('{"epoch": 1}')
    assert viz.main([str(run)]) == 2
    err = capsys.readouterr().err
    assert "history.json is not a list of per-epoch records" in err and len(err.strip().splitlines()) == 1
    assert not (run / "figures").exists() and not (run / "report.md").exists()

    (run / "history.json").write_text(json.dumps(fake_history(2)))
    np.savez(run / "predictions.npz", probs=np.zeros((5, 10)), labels=np.zeros(4, dtype=int))
    assert viz.main([str(run)]) == 2
    assert "inconsistent arrays" in capsys.readouterr().err
    assert not (run / "figures").exists()
