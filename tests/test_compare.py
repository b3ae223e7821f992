"""Tests of compare.py: grouping runs into variants, the numbers, the verdicts,
runs left out, refusals, the figures; on run folders written by hand and on
real smoke runs of main.py."""
import json
import os
from pathlib import Path

import numpy as np
import pytest

import compare
import main
import runfiles
from cnn_rnn_numpy import CNNRNN
from conftest import LABEL_NAMES, make_cifar_archive
from metrics import confusion_matrix, expected_calibration_error, per_class_accuracy
from test_viz import assert_valid_png

FAST = runfiles.read_json(Path(compare.__file__).parent / 'presets.json')['fast']
FIGURES = ('val_accuracy.png', 'test_accuracy.png')


# --------------------------------------------------------------------------
# Run folders written by hand, in main.py's format
# --------------------------------------------------------------------------

def make_run(root, name, seed=0, acc=0.4, n_test=200, epochs=3, preset='fast', stopped_early=False,
             wall_time_s=300.0, **settings):
    """A finished run folder: config.json, history.json, metrics.json, predictions.npz, train.log.

    The test predictions are right on exactly round(acc * n_test) images, and
    metrics.json holds their accuracy and ECE (metrics.py), like main.py's.
    settings override the `fast` preset's keys. Returns the folder's Path.
    """
    run = Path(root) / name
    run.mkdir(parents=True)
    config = dict(FAST, **settings, seed=seed, preset=preset, description='', data_dir='data', lr_changes=[])
    rng = np.random.default_rng(seed + 1000 * len(name))
    labels = np.arange(n_test) % 10
    predicted = labels.copy()
    wrong = np.arange(n_test) >= round(acc * n_test)
    predicted[wrong] = (labels[wrong] + rng.integers(1, 10, wrong.sum())) % 10
    logits = rng.normal(scale=0.5, size=(n_test, 10))
    logits[np.arange(n_test), predicted] += 4      # 8 sigma above the noise: the argmax is `predicted`
    probs = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)
    cm = confusion_matrix(labels, probs.argmax(1))
    history = [{'epoch': e, 'train_loss': 2.0 / e, 'train_acc': acc * e / epochs, 'val_loss': 2.1 / e,
                'val_acc': acc * e / epochs + 0.01 * seed, 'lr': 0.02, 'epoch_time_s': 20.0,
                'images_per_s': 900.0} for e in range(1, epochs + 1)]
    metrics = {'test_loss': 1.5, 'test_acc': float((probs.argmax(1) == labels).mean()),
               'ece': expected_calibration_error(probs, labels), 'per_class_acc': per_class_accuracy(cm),
               'confusion_matrix': cm, 'best_val_acc': history[-1]['val_acc'], 'best_epoch': epochs,
               'epochs_done': epochs, 'epochs_planned': epochs, 'stopped_early': stopped_early,
               'stop_reason': 'time budget of 1.0 h reached' if stopped_early else None,
               'wall_time_s': wall_time_s, 'train_images_per_s': 900.0, 'test_images': n_test,
               'label_names': LABEL_NAMES}
    runfiles.write_json(run / 'config.json', config)
    runfiles.write_json(run / 'history.json', history)
    runfiles.write_json(run / 'metrics.json', metrics)
    runfiles.write_npz(run / 'predictions.npz', {
        'probs': probs, 'labels': labels.astype(np.int64), 'indices': np.arange(n_test),
        'hidden': rng.normal(size=(n_test, 8)).astype(np.float32)})
    runfiles.append_line(run / 'train.log', f'2024-01-01 12:00:00 run {run}: preset {preset}')
    return run


def snapshot(folder):
    """{relative path: bytes} of every file under a folder but comparison/, to prove nothing was written there."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob('*'))
            if p.is_file() and p.relative_to(folder).parts[0] != 'comparison'}


def run_compare(capsys, *args):
    """compare.main with the arguments; returns (exit code, stdout, stderr)."""
    code = compare.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(code, err, *words, left_out=0):
    """Exit code 2 and one sentence on stderr (after one line per run left out), naming each of words."""
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 + left_out, err
    assert all(line.startswith('compare.py: ') for line in lines) and 'Traceback' not in err
    for word in words:
        assert word in lines[-1], (word, lines[-1])


# --------------------------------------------------------------------------
# Variants, labels and numbers
# --------------------------------------------------------------------------

@pytest.fixture(scope='module')
def claims_like(tmp_path_factory):
    """runs/ with a baseline (3 seeds), weight_decay=0 (3), seq_layout=flat (2) and a two-key variant (1)."""
    root = tmp_path_factory.mktemp('compare') / 'runs'
    for seed, acc in enumerate((0.40, 0.42, 0.44)):
        # One baseline run from another preset name: the same settings are the same variant.
        make_run(root, f'baseline-seed{seed}', seed, acc, preset='fast' if seed else 'mine')
    for seed, acc in enumerate((0.30, 0.31, 0.32)):
        make_run(root, f'no-wd-seed{seed}', seed, acc, weight_decay=0)
    for seed, acc in enumerate((0.41, 0.44)):
        make_run(root, f'flat-seed{seed}', seed, acc, seq_layout='flat', wall_time_s=120.0)
    make_run(root, 'both-seed0', 0, 0.35, clip=0, decay=1)
    return root


@pytest.fixture(scope='module')
def compared(claims_like, tmp_path_factory):
    before = snapshot(claims_like)
    out = tmp_path_factory.mktemp('out') / 'cmp'
    assert compare.main([str(claims_like), '--out', str(out)]) == 0
    assert snapshot(claims_like) == before, 'compare.py wrote into the run folders it read'
    return out, json.loads((out / 'comparison.json').read_text()), (out / 'comparison.md').read_text()


def test_runs_are_grouped_by_their_settings_and_labelled_by_what_differs(compared):
    _, record, md = compared
    by_label = {v['label']: v for v in record['variants']}
    assert list(by_label) == ['baseline', 'seq_layout=flat', 'decay=1, clip=0', 'weight_decay=0']
    assert record['baseline']['chosen_as'] == "the variant with the settings of presets.json's `fast` preset"
    assert [v['finished'] for v in by_label.values()] == [3, 2, 1, 3]
    assert sorted(by_label['baseline']['seeds']) == [0, 1, 2]
    assert by_label['weight_decay=0']['differs'] == [{'key': 'weight_decay', 'baseline': 0.0005, 'value': 0}]
    assert '| weight_decay=0 | 3 | 0 of 3 |' in md and 'weight_decay: 0.0005 → 0' in md
    assert 'decay: 0.9 → 1; clip: 5 → 0' in md


def test_means_stds_and_the_verdict_against_the_baseline(compared):
    _, record, md = compared
    by_label = {v['label']: v for v in record['variants']}
    base, wd = by_label['baseline'], by_label['weight_decay=0']
    assert base['test_acc']['mean'] == pytest.approx(0.42)
    assert base['test_acc']['std'] == pytest.approx(0.02)          # sample std, n - 1
    assert base['wall_time_s']['mean'] == pytest.approx(300.0)
    eces = [r['ece'] for r in base['runs']]
    assert base['ece']['mean'] == pytest.approx(np.mean(eces)) and base['ece']['std'] == pytest.approx(
        np.std(eces, ddof=1))
    assert '| baseline | 3 | 0 of 3 | 42.00 ± 2.00 |' in md and '| 5.0 | (the baseline) |' in md
    # Welch: diff -11 points, se = sqrt(2^2/3 + 1^2/3) = 1.29, t = -8.5, df = 2.9 -> 2 -> t_crit 4.303.
    w = wd['vs_baseline']
    assert w['diff'] == pytest.approx(-11.0) and w['se'] == pytest.approx(np.sqrt(5 / 3))
    assert w['t'] == pytest.approx(-11 / np.sqrt(5 / 3)) and w['t_crit'] == 4.303
    assert w['verdict'] == 'worse'
    assert by_label['seq_layout=flat']['vs_baseline']['verdict'] == 'within noise'
    assert by_label['decay=1, clip=0']['vs_baseline']['verdict'] == 'too few runs'
    assert '| weight_decay=0 | -11.00 | 1.29 | -8.52 (2.9) | worse |' in md
    assert "Welch's t-test" in md
    # The baseline's validation curve: mean, min and max over the seeds per epoch.
    curve = base['val_acc_curve']
    assert curve['epoch'] == [1, 2, 3]
    assert curve['min'][2] == pytest.approx(0.40) and curve['max'][2] == pytest.approx(0.46)


def test_the_figures_are_valid_pngs(compared):
    out, _, md = compared
    for name in FIGURES:
        assert_valid_png(out / name)
        assert f'({name})' in md


def test_the_t_table_is_students():
    stats = pytest.importorskip('scipy.stats')
    for df, value in enumerate(compare.T_CRIT_95, 1):
        assert value == pytest.approx(stats.t.ppf(0.975, df), abs=6e-4)


def test_the_baseline_is_the_given_run_or_else_the_largest_group(tmp_path, capsys):
    root = tmp_path / 'runs'
    for seed in range(3):
        make_run(root, f'lr-seed{seed}', seed, 0.3 + 0.01 * seed, lr=0.01)
    for seed in range(2):
        make_run(root, f'rows-seed{seed}', seed, 0.5, lr=0.01, seq_layout='rows')
    code, _, _ = run_compare(capsys, root)          # default --out: comparison/ beside the runs
    record = json.loads((root / 'comparison' / 'comparison.json').read_text())
    assert code == 0 and record['baseline']['chosen_as'] == 'the variant with the most runs'
    assert [v['label'] for v in record['variants']] == ['baseline', 'seq_layout=rows']
    code, _, _ = run_compare(capsys, root, '--baseline', root / 'rows-seed1', '--out', tmp_path / 'b')
    record = json.loads((tmp_path / 'b' / 'comparison.json').read_text())
    assert code == 0 and [v['label'] for v in record['variants']] == ['baseline', 'seq_layout=pixels']
    assert record['variants'][1]['vs_baseline']['verdict'] == 'worse'


def test_links_are_resolved_and_a_run_counts_once(tmp_path, capsys):
    root = tmp_path / 'runs'
    for seed in range(2):
        make_run(root, f'a-seed{seed}', seed, 0.4)
    (root / 'latest').symlink_to('a-seed1')
    code, _, _ = run_compare(capsys, root, root / 'latest', root / 'a-seed0', '--out', tmp_path / 'o')
    record = json.loads((tmp_path / 'o' / 'comparison.json').read_text())
    assert code == 0 and [r['name'] for r in record['variants'][0]['runs']] == ['a-seed0', 'a-seed1']


# --------------------------------------------------------------------------
# Runs that cannot be compared
# --------------------------------------------------------------------------

def test_runs_that_cannot_be_compared_are_named_and_left_out(tmp_path, capsys):
    root = tmp_path / 'runs'
    for seed in range(2):
        make_run(root, f'good-seed{seed}', seed, 0.4)
    training = make_run(root, 'training', 5)
    (training / 'metrics.json').unlink()
    interrupted = make_run(root, 'interrupted', 6)
    (interrupted / 'metrics.json').unlink()
    (interrupted / 'ckpt.npz').write_bytes(b'a checkpoint')
    crashed = root / 'crashed'
    crashed.mkdir()
    runfiles.write_json(crashed / 'config.json', dict(FAST, seed=7))
    make_run(root, 'stopped', 8, stopped_early=True)
    make_run(root, 'small-test-set', 9, n_test=100)
    damaged = make_run(root, 'bad-json', 10)
    (damaged / 'metrics.json').write_text((damaged / 'metrics.json').read_text()[:50])
    wrong_type = make_run(root, 'wrong-type', 11)
    m = json.loads((wrong_type / 'metrics.json').read_text())
    runfiles.write_json(wrong_type / 'metrics.json', dict(m, test_acc='high'))
    flipped = make_run(root, 'bit-flip', 12)
    data = bytearray((flipped / 'predictions.npz').read_bytes())
    data[len(data) // 3] ^= 0x40
    (flipped / 'predictions.npz').write_bytes(bytes(data))
    truncated = make_run(root, 'truncated', 13)
    (truncated / 'predictions.npz').write_bytes((truncated / 'predictions.npz').read_bytes()[:3000])
    inconsistent = make_run(root, 'inconsistent', 14)
    runfiles.write_json(inconsistent / 'metrics.json', dict(m, test_acc=0.9))
    no_config = make_run(root, 'no-config', 15)
    (no_config / 'config.json').unlink()
    diverged = make_run(root, 'diverged', 16)
    for name in ('metrics.json', 'predictions.npz'):
        (diverged / name).unlink()
    runfiles.append_line(diverged / 'train.log', '2024-01-01 12:01:00 error: the loss became nan at epoch 2, '
                                                 'step 3 (lr 0.02); the last checkpoint is intact: ...')
    expected = {'training': 'in use by another process', 'interrupted': 'stopped before its test evaluation',
                'crashed': 'neither metrics.json nor a checkpoint', 'stopped': 'stopped early (time budget',
                'small-test-set': 'evaluated on 100 test images, the other runs on 200',
                'bad-json': 'not valid JSON', 'wrong-type': "'test_acc'", 'bit-flip': 'corrupt or truncated',
                'truncated': 'corrupt or truncated', 'inconsistent': 'does not match predictions.npz',
                'no-config': 'no config.json'}
    with runfiles.RunFolderLock(training, 'main.py'):
        before = snapshot(root)
        code, _, err = run_compare(capsys, root, '--out', tmp_path / 'out')
        assert snapshot(root) == before
    assert code == 0, err
    md = (tmp_path / 'out' / 'comparison.md').read_text()
    left_out = md[md.index('## Left out'):]
    record = json.loads((tmp_path / 'out' / 'comparison.json').read_text())
    reasons = {r['run']: r['reason'] for r in record['left_out']}
    assert set(reasons) == set(expected)
    for name, words in expected.items():
        assert words in reasons[name], (name, reasons[name])
        assert f'left out {root / name}: ' in err and f'`{root / name}`: ' in left_out
    assert 'python main.py --resume' in reasons['interrupted'] and 'Traceback' not in err
    # The diverged run is no result but a count of its variant.
    (variant,) = record['variants']
    assert variant['finished'] == 2 and variant['diverged'] == 1
    assert '| baseline | 2 | 1 of 3 |' in md and 'diverged: the loss became nan at epoch 2, step 3' in md


def test_nothing_comparable_or_bad_arguments_exit_2_with_one_sentence(tmp_path, capsys):
    root = tmp_path / 'runs'
    good = make_run(root, 'good', 0)
    broken = tmp_path / 'broken' / 'only'
    broken.mkdir(parents=True)
    runfiles.write_json(broken / 'config.json', FAST)
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'a-file').write_text('x')
    code, _, err = run_compare(capsys, tmp_path / 'broken')
    assert_refused(code, err, 'no comparable run among the 1 found', left_out=1)
    cases = [
        ([tmp_path / 'missing'], ['does not exist']),
        ([tmp_path / 'empty'], ['is not a run folder and holds none']),
        ([root, '--out', good / 'cmp'], ['inside the run folder', 'never writes into']),
        ([root, '--out', tmp_path / 'a-file'], ['is a file']),
        ([root, '--out', tmp_path / 'a-file' / 'sub'], ['a-file']),          # a file where a folder should be
        ([root, '--baseline', tmp_path / 'missing'], ['--baseline']),
        ([root, '--colour', 'red'], ['unrecognized arguments']),
        ([], ['RUN']),
    ]
    for args, words in cases:
        code, _, err = run_compare(capsys, *args)
        assert_refused(code, err, *words)
    assert not (good / 'cmp').exists() and not (root / 'comparison').exists()


# --------------------------------------------------------------------------
# Real runs of main.py
# --------------------------------------------------------------------------

def test_on_real_smoke_runs_with_a_diverged_one(tmp_path, capsys, monkeypatch):
    """main.py's smoke preset on a synthetic archive: 2 variants x 2 seeds, and one diverged run."""
    data = str(make_cifar_archive(tmp_path, n_per_batch=50, n_test=100))
    runs = tmp_path / 'runs'
    common = ['--preset', 'smoke', '--subset', '1', '--epochs', '1', '--data-dir', data]
    for seed in (0, 1):
        assert main.run(common + ['--seed', str(seed), '--out', str(runs / f'base-seed{seed}')]) == 0
        assert main.run(common + ['--seed', str(seed), '--seq-layout', 'flat',
                                  '--out', str(runs / f'flat-seed{seed}')]) == 0
    real_loss = CNNRNN.loss

    def diverging(self, X, y, **kw):
        _, grads, details = real_loss(self, X, y, **kw)
        return float('nan'), grads, details
    monkeypatch.setattr(CNNRNN, 'loss', diverging)
    assert main.run(common + ['--seed', '2', '--out', str(runs / 'base-seed2')]) == 1
    monkeypatch.undo()
    capsys.readouterr()
    before = snapshot(runs)
    code, out, err = run_compare(capsys, runs, '--baseline', runs / 'base-seed0')
    assert code == 0, err
    assert snapshot(runs) == before
    out_dir = runs / 'comparison'
    record = json.loads((out_dir / 'comparison.json').read_text())
    base, flat = record['variants']
    assert (base['label'], flat['label']) == ('baseline', 'seq_layout=flat')
    assert (base['finished'], base['diverged'], flat['finished'], flat['diverged']) == (2, 1, 2, 0)
    for v in (base, flat):
        for r in v['runs']:
            if r['status'] == 'finished':
                m = json.loads((Path(r['path']) / 'metrics.json').read_text())
                assert r['test_acc'] == m['test_acc'] and r['ece'] == m['ece']
        accs = [r['test_acc'] for r in v['runs'] if r['status'] == 'finished']
        assert v['test_acc']['mean'] == pytest.approx(np.mean(accs))
    diverged = next(r for r in base['runs'] if r['status'] == 'diverged')
    assert diverged['name'] == 'base-seed2' and 'the loss became nan' in diverged['diverged']
    assert record['left_out'] == [] and os.path.islink(runs / 'latest')
    for name in FIGURES:
        assert_valid_png(out_dir / name)
    assert 'baseline' in out and 'seq_layout=flat' in out
