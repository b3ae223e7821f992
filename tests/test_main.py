"""End-to-end tests of the training driver on synthetic archives: the run
folder, exact resume, the time budget, signals, divergence, bad input, and
the learning-rate schedule."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import main
from cnn_rnn_numpy import CNNRNN
from conftest import (REPO_ROOT, SMOKE, STEPS_PER_EPOCH, arrays, folder_snapshot, make_cifar_archive, resume,
                      train_run)
from metrics import expected_calibration_error


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return str(make_cifar_archive(tmp_path_factory.mktemp('cifar'), n_per_batch=50, n_test=100))


@pytest.fixture(scope='module')
def full_run(data_dir, tmp_path_factory):
    """A complete 3-epoch smoke run, the reference for the resume tests."""
    out = tmp_path_factory.mktemp('runs') / 'full'
    assert train_run(data_dir, out, '--epochs', '3') == 0
    return out


def test_every_run_folder_file_exists_and_is_valid(full_run):
    names = set(os.listdir(full_run))
    assert {'config.json', 'history.json', 'train.log', 'ckpt.npz', 'best.npz', 'metrics.json',
            'predictions.npz'} <= names
    cfg = json.loads((full_run / 'config.json').read_text())
    assert cfg['preset'] == 'smoke' and cfg['epochs'] == 3 and cfg['subset'] == 1.0
    history = json.loads((full_run / 'history.json').read_text())
    assert [r['epoch'] for r in history] == [1, 2, 3]
    for r in history:
        assert set(r) >= {'train_loss', 'train_acc', 'val_loss', 'val_acc', 'lr', 'epoch_time_s',
                          'images_per_s'}
        assert 0 <= r['train_acc'] <= 1 and 0 <= r['val_acc'] <= 1 and r['images_per_s'] > 0
    m = json.loads((full_run / 'metrics.json').read_text())
    for key in ('test_loss', 'test_acc', 'ece', 'per_class_acc', 'confusion_matrix', 'best_val_acc',
                'epochs_done', 'stopped_early', 'wall_time_s'):
        assert key in m
    assert m['epochs_done'] == 3 and m['stopped_early'] is False
    # Time to accuracy: the wall time of the first epoch at or above each threshold.
    elapsed = [r['elapsed_s'] for r in history]
    assert elapsed == sorted(elapsed) and elapsed[-1] <= m['wall_time_s']
    assert sorted(m['time_to_val_acc']) == ['0.70', '0.75', '0.85', '0.90']
    for key, threshold in (('0.70', 0.70), ('0.75', 0.75), ('0.85', 0.85), ('0.90', 0.90)):
        reached = [r['elapsed_s'] for r in history if r['val_acc'] >= threshold]
        assert m['time_to_val_acc'][key] == (reached[0] if reached else None)
    assert 'reached  70% val at' in (full_run / 'train.log').read_text()
    assert m['best_val_acc'] == max(r['val_acc'] for r in history)
    with np.load(full_run / 'predictions.npz') as p:
        probs, labels, indices, hidden = p['probs'], p['labels'], p['indices'], p['hidden']
    assert probs.shape == (100, 10) and hidden.shape == (100, 128)
    np.testing.assert_array_equal(indices, np.arange(100))
    np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-5)
    assert m['test_acc'] == pytest.approx((probs.argmax(1) == labels).mean())
    assert m['ece'] == pytest.approx(expected_calibration_error(probs, labels), abs=1e-9)
    cm = np.array(m['confusion_matrix'])
    assert cm.shape == (10, 10) and cm.sum() == 100
    np.testing.assert_array_equal(cm.sum(1), np.bincount(labels, minlength=10))
    best = CNNRNN.load(full_run / 'best.npz')
    assert best.seq_layout == 'pixels'
    log = (full_run / 'train.log').read_text()
    assert log.count('epoch ') >= 3 and 'test     accuracy' in log
    latest = full_run.parent / 'latest'
    assert latest.is_symlink() and latest.resolve() == full_run.resolve()


@pytest.mark.parametrize('stop_at', [STEPS_PER_EPOCH, 5, STEPS_PER_EPOCH + 3])
def test_stop_and_resume_is_bit_identical(data_dir, full_run, tmp_path, stop_at):
    """Stopped after one epoch, mid-epoch in the first, or mid-epoch in the second, then resumed."""
    out = tmp_path / 'split'
    assert train_run(data_dir, out, '--epochs', '3', interrupt_after=stop_at) == 0
    m = json.loads((out / 'metrics.json').read_text())
    assert m['stopped_early'] is True
    assert resume(out / 'ckpt.npz') == 0
    a, b = arrays(full_run / 'ckpt.npz'), arrays(out / 'ckpt.npz')
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    for k, v in arrays(full_run / 'best.npz').items():
        np.testing.assert_array_equal(v, arrays(out / 'best.npz')[k])
    ha = json.loads((full_run / 'history.json').read_text())
    hb = json.loads((out / 'history.json').read_text())
    for ra, rb in zip(ha, hb):
        for key in ('train_loss', 'train_acc', 'val_loss', 'val_acc', 'lr'):
            assert ra[key] == rb[key], key
    ma = json.loads((full_run / 'metrics.json').read_text())
    mb = json.loads((out / 'metrics.json').read_text())
    assert mb['stopped_early'] is False and mb['test_acc'] == ma['test_acc']


def test_max_hours_stops_cleanly_and_evaluates(data_dir, tmp_path):
    out = tmp_path / 'budget'
    assert train_run(data_dir, out, '--max-hours', '1e-9') == 0
    m = json.loads((out / 'metrics.json').read_text())
    assert m['stopped_early'] is True and 'time budget' in m['stop_reason']
    assert os.path.exists(out / 'predictions.npz')
    assert 'time budget' in (out / 'train.log').read_text()
    # The checkpoint resumes to the end.
    assert resume(out / 'ckpt.npz') == 0
    m = json.loads((out / 'metrics.json').read_text())
    assert m['stopped_early'] is False and m['epochs_done'] == 2


def test_sigterm_stops_cleanly_with_a_checkpoint(data_dir, tmp_path):
    out = tmp_path / 'term'
    proc = subprocess.Popen([sys.executable, 'main.py', *SMOKE, '--epochs', '200', '--data-dir', data_dir,
                             '--out', str(out)], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while not os.path.exists(out / 'history.json') and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    m = json.loads((out / 'metrics.json').read_text())
    assert m['stopped_early'] is True and 'SIGTERM' in m['stop_reason']
    assert 1 <= m['epochs_done'] < 200
    state = main.load_checkpoint(str(out / 'ckpt.npz')).state
    assert state.stop_reason and state.epoch == m['epochs_done']


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / 'nan'
    assert train_run(data_dir, out, '--epochs', '2', interrupt_after=STEPS_PER_EPOCH) == 0
    before = folder_snapshot(out)
    real_loss = CNNRNN.loss
    calls = {'n': 0}

    def poisoned(self, X, y, **kw):
        calls['n'] += 1
        loss, grads, details = real_loss(self, X, y, **kw)
        return (float('nan') if calls['n'] == 3 else loss), grads, details
    monkeypatch.setattr(CNNRNN, 'loss', poisoned)
    capsys.readouterr()
    assert resume(out / 'ckpt.npz') == 1
    assert 'the loss became nan at epoch 2, step 3' in capsys.readouterr().err
    after = folder_snapshot(out)
    for name in ('ckpt.npz', 'best.npz', 'history.json', 'metrics.json', 'predictions.npz'):
        assert after[name] == before[name], name
    # The divergence is recorded as data where it happened, not only as log text...
    record = json.loads((out / 'diverged.json').read_text())
    assert (record['epoch'], record['step'], record['loss']) == (2, 3, 'nan') and record['lr'] > 0
    # ...and a resume with a lower learning rate continues the run, which is then no longer diverged.
    monkeypatch.undo()
    assert resume(out / 'ckpt.npz', '--lr', '0.01') == 0
    assert not (out / 'diverged.json').exists()
    assert 'continuing after the divergence' in (out / 'train.log').read_text()


def bad_input_cases(data_dir, tmp_path):
    """(name, argv, expected words in the message)."""
    ckpt_dir = tmp_path / 'good_run'
    assert train_run(data_dir, ckpt_dir, '--epochs', '1') == 0
    corrupt = tmp_path / 'corrupt.npz'
    corrupt.write_bytes((ckpt_dir / 'ckpt.npz').read_bytes()[:2000])
    # A checkpoint whose model does not fit its declared configuration.
    with np.load(ckpt_dir / 'ckpt.npz') as f:
        a = {k: f[k] for k in f.files}
    a['param/W_xh'] = np.zeros((512, 128), np.float32)
    incompatible = tmp_path / 'incompatible.npz'
    np.savez(incompatible, **a)
    return ckpt_dir, [
        ('unknown preset', ['--preset', 'turbo'], 'unknown preset'),
        ('subset zero', ['--preset', 'smoke', '--subset', '0'], '--subset'),
        ('subset above one', ['--preset', 'smoke', '--subset', '1.5'], '--subset'),
        ('zero hours', ['--preset', 'smoke', '--max-hours', '0'], '--max-hours'),
        ('negative hours', ['--preset', 'smoke', '--max-hours', '-1'], '--max-hours'),
        ('zero epochs', ['--preset', 'smoke', '--epochs', '0'], '--epochs'),
        ('negative lr', ['--preset', 'smoke', '--lr', '-0.1'], 'lr'),
        ('missing resume', ['--resume', str(tmp_path / 'nope' / 'ckpt.npz')], 'does not exist'),
        ('corrupt resume', ['--resume', str(corrupt)], 'corrupt'),
        ('weights, not a checkpoint', ['--resume', str(ckpt_dir / 'best.npz')], 'not a resumable'),
        ('incompatible resume', ['--resume', str(incompatible)], 'W_xh'),
        ('existing out', SMOKE + ['--data-dir', data_dir, '--out', str(ckpt_dir)], 'already holds files'),
        ('resume with overrides', ['--resume', str(ckpt_dir / 'ckpt.npz'), '--batch-size', '64'], 'cannot be combined'),
        ('unknown --set key', ['--preset', 'smoke', '--set', 'colour=red'], 'unknown key'),
        ('bad --set value', ['--preset', 'smoke', '--set', 'decay=2'], 'decay = 2 is invalid'),
        ('malformed --set', ['--preset', 'smoke', '--set', 'decay'], 'malformed'),
    ]


def test_bad_input_gives_one_sentence_exit_2_and_touches_nothing(data_dir, tmp_path, capsys):
    ckpt_dir, cases = bad_input_cases(data_dir, tmp_path)
    capsys.readouterr()
    before = folder_snapshot(ckpt_dir)
    listing = sorted(os.listdir(tmp_path))
    for name, argv, words in cases:
        if '--data-dir' not in argv and '--resume' not in argv:
            argv = argv + ['--data-dir', data_dir, '--out', str(tmp_path / 'should_not_exist')]
        assert main.run(argv) == 2, name
        err = capsys.readouterr().err.strip()
        assert err.startswith('error: ') and words in err, (name, err)
        assert '\n' not in err and 'Traceback' not in err, (name, err)
        assert folder_snapshot(ckpt_dir) == before, name
        assert sorted(os.listdir(tmp_path)) == listing, name


def test_bad_input_through_the_real_cli(tmp_path):
    proc = subprocess.run([sys.executable, 'main.py', '--preset', 'nope'], cwd=REPO_ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith('error: unknown preset') and 'Traceback' not in proc.stderr
    proc = subprocess.run([sys.executable, 'main.py', '--help'], cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 0
    for option in ('--preset', '--subset', '--max-hours', '--resume', '--out', '--data-dir', '--epochs',
                   '--batch-size', '--lr', '--seed', '--seq-layout', '--list-presets'):
        assert option in proc.stdout
    proc = subprocess.run([sys.executable, 'main.py', '--list-presets'], cwd=REPO_ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0 and all(p in proc.stdout for p in ('fast', 'best', 'smoke'))


def test_missing_data_is_a_clear_error(tmp_path, capsys):
    rc = main.run(SMOKE + ['--data-dir', str(tmp_path / 'empty'), '--out', str(tmp_path / 'r')])
    assert rc == 2
    err = capsys.readouterr().err
    assert 'cifar-10-python.tar.gz' in err
    assert not os.path.exists(tmp_path / 'r')


def test_set_overrides_any_preset_key(data_dir, tmp_path):
    out = tmp_path / 'set'
    assert train_run(data_dir, out, '--epochs', '1', '--set', 'standardize=false', '--set', 'schedule=cosine',
                     '--set', 'decay=0.5') == 0
    cfg = json.loads((out / 'config.json').read_text())
    assert cfg['standardize'] is False and cfg['schedule'] == 'cosine' and cfg['decay'] == 0.5
    state = main.load_checkpoint(str(out / 'ckpt.npz')).state
    assert state.mean is None and state.std is None


def split_sizes(run):
    """(train, validation) image counts from the run's train.log."""
    train, val = re.search(r', (\d+) train / (\d+) val / ', (run / 'train.log').read_text()).groups()
    return int(train), int(val)


def test_val_fraction_sets_the_share_held_out_for_validation(data_dir, full_run, tmp_path):
    out = tmp_path / 'half'
    assert train_run(data_dir, out, '--epochs', '1', '--set', 'val_fraction=0.5') == 0
    assert json.loads((out / 'config.json').read_text())['val_fraction'] == 0.5
    assert json.loads((full_run / 'config.json').read_text())['val_fraction'] == 0.1
    (train, val), (train_default, val_default) = split_sizes(out), split_sizes(full_run)
    # The same images, split 1:1 instead of 9:1 (the split rounds per class).
    assert train + val == train_default + val_default
    assert abs(val - 0.5 * (train + val)) <= 10 and abs(val_default - 0.1 * (train + val)) <= 10
    m = json.loads((out / 'metrics.json').read_text())
    assert m['calibration']['validation']['images'] == val


def test_real_archive_smoke_run(real_archive_dir, tmp_path):
    """The smoke preset end to end on the real CIFAR-10 (CI links it into data/), evaluated as
    deep is: six views (flip x three translations) of the 10,000 test images, and one view."""
    out = tmp_path / 'real'
    assert main.run(['--preset', 'smoke', '--data-dir', str(real_archive_dir), '--out', str(out),
                     '--epochs', '1', '--set', 'tta_translate=true']) == 0
    m = json.loads((out / 'metrics.json').read_text())
    assert m['tta'] == 'flip+translate' and m['test_images'] == 10000
    assert all(0 <= m['single_view'][k] <= 1 for k in ('test_acc', 'ece')) and m['single_view']['test_loss'] > 0
    with np.load(out / 'predictions.npz') as p:
        assert p['probs'].shape == (10000, 10) and p['hidden'].shape == (10000, 128)
        assert np.allclose(p['probs'].sum(axis=1), 1, atol=1e-5)


def test_viz_on_a_run_folder_made_by_a_smoke_run(full_run, data_dir):
    """viz.py on what main.py really writes: every figure a valid, non-blank PNG, same ECE."""
    import viz
    from conftest import assert_valid_png
    assert viz.main([str(full_run), '--data-dir', data_dir, '--tsne-samples', '100']) == 0
    for stem in ('training_curves', 'confusion_matrix', 'reliability', 'tsne', 'misclassified'):
        assert_valid_png(full_run / 'figures' / f'{stem}.png')
    m = json.loads((full_run / 'metrics.json').read_text())
    report = (full_run / 'report.md').read_text()
    assert f"{m['ece']:.4f}" in report and 'equal to metrics.json' in report
    assert '| Validation accuracy 70 % first reached |' in report


def test_a_gated_cell_and_a_readout_train_resume_and_are_recorded(data_dir, tmp_path, capsys):
    out = tmp_path / 'gru'
    assert train_run(data_dir, out, '--cell', 'gru', '--set', 'readout=max', interrupt_after=3) == 0
    run_config = json.loads((out / 'config.json').read_text())
    assert (run_config['cell'], run_config['readout']) == ('gru', 'max')
    assert resume(out / 'ckpt.npz') == 0
    best = CNNRNN.load(out / 'best.npz')
    assert (best.cell, best.readout) == ('gru', 'max')
    with np.load(out / 'predictions.npz') as p:
        assert p['hidden'].shape == (100, 128)
    capsys.readouterr()
    assert resume(out / 'ckpt.npz', '--cell', 'lstm') == 2
    assert 'cannot be combined' in capsys.readouterr().err
    # A checkpoint whose configuration names another cell than its parameters have.
    with np.load(out / 'ckpt.npz') as f:
        arrays = {k: f[k] for k in f.files}
    meta = json.loads(str(arrays['meta']))
    meta['run_config']['cell'] = 'lstm'
    arrays['meta'] = np.array(json.dumps(meta))
    np.savez(tmp_path / 'mismatch.npz', **arrays)
    assert resume(tmp_path / 'mismatch.npz') == 2
    err = capsys.readouterr().err
    assert "cell='gru', not 'lstm'" in err and 'Traceback' not in err


def test_batchnorm_rates_freeze_the_gammas_speed_the_betas_and_resume_bit_identically(data_dir, tmp_path):
    """airbench's BatchNorm training (bn_gamma_lr 0, bn_beta_lr 64): every gamma stays exactly 1,
    the betas move further than at the plain rate, and a run stopped mid-epoch resumes to the
    same bits (the optimizer rebuilt from the checkpoint's configuration keeps the rates)."""
    bn = ['--epochs', '2', '--set', 'batchnorm=true']
    rates = ['--set', 'bn_gamma_lr=0', '--set', 'bn_beta_lr=64']
    assert train_run(data_dir, tmp_path / 'plain', *bn) == 0
    assert train_run(data_dir, tmp_path / 'whole', *bn, *rates) == 0
    assert train_run(data_dir, tmp_path / 'split', *bn, *rates, interrupt_after=STEPS_PER_EPOCH + 2) == 0
    assert resume(tmp_path / 'split' / 'ckpt.npz') == 0
    plain, whole, split = (arrays(tmp_path / name / 'ckpt.npz') for name in ('plain', 'whole', 'split'))
    for k in whole:
        np.testing.assert_array_equal(whole[k], split[k], err_msg=k)
    gammas = [f'param/bn{k}_gamma' for k in (1, 2)]
    betas = [f'param/bn{k}_beta' for k in (1, 2)]
    assert all(np.all(whole[k] == 1) and not np.all(plain[k] == 1) for k in gammas)
    assert all(np.abs(whole[k]).sum() > 5 * np.abs(plain[k]).sum() > 0 for k in betas)
    assert all(not whole[k.replace('param/', 'velocity/')].any() for k in gammas)     # a rate of 0: no velocity either
    run_config = json.loads((tmp_path / 'whole' / 'config.json').read_text())
    assert (run_config['bn_gamma_lr'], run_config['bn_beta_lr']) == (0, 64)


# ---- fit_epochs: the schedule chosen to end inside the time budget ----------

@pytest.mark.parametrize('done, epoch_s, left_s, most, expected', [
    (2, 100.0, 1000.0, 20, 2 + 9),     # 1000 // 103 = 9 more
    (2, 100.0, 1000.0, 8, 8),          # never more than the configured epochs
    (2, 100.0, 50.0, 20, 3),           # not one more fits: one more all the same, cut by the budget
    (2, 100.0, -30.0, 20, 3),          # already past the budget: the same
    (19, 100.0, -30.0, 20, 20),        # the last one
    (3, 100.0, 1030.0, 20, 3 + 10),    # exactly ten at the margin
    (1, 0.0, 10.0, 6, 6),              # an epoch measured at 0 s: all of them
])
def test_epochs_that_fit(done, epoch_s, left_s, most, expected):
    assert main.epochs_that_fit(done, epoch_s, left_s, most) == expected


class StepClock:
    """main.time with a monotonic clock that only a training step moves, by ``step_s`` seconds:
    epoch times are then exact whatever the machine's speed (8 steps of 10 s = 80 s an epoch).
    ``speed_change`` {epoch: step_s} changes the step's time from that (0-based) epoch on; ``lrs``
    collects the rate of every step (the optimizer's)."""

    def __init__(self, step_s):
        self.now, self.step_s, self.steps, self.speed_change, self.lrs = 1000.0, step_s, 0, {}, []

    def monotonic(self):
        return self.now

    def __getattr__(self, name):
        return getattr(time, name)


@pytest.fixture
def step_clock(monkeypatch):
    clock = StepClock(10.0)
    real_loss, real_step = CNNRNN.loss, main.SGD.step

    def timed_loss(self, X, y, **kw):
        clock.step_s = clock.speed_change.get(clock.steps / STEPS_PER_EPOCH, clock.step_s)
        clock.now += clock.step_s
        clock.steps += 1
        return real_loss(self, X, y, **kw)

    def recorded_step(self, grads, lr):
        clock.lrs.append(lr)
        return real_step(self, grads, lr)
    monkeypatch.setattr(main, 'time', clock)
    monkeypatch.setattr(CNNRNN, 'loss', timed_loss)
    monkeypatch.setattr(main.SGD, 'step', recorded_step)
    return clock


FIT = ['--epochs', '12', '--set', 'schedule=triangular', '--set', 'warmup_epochs=1', '--max-hours', '0.1']


def lines_down_to_zero(lrs):
    """The number of straight lines the per-step rates ``lrs`` fall on, checking that they only
    fall, that no step falls alone by another amount (a jump where the plan changed would), and
    that the last step is one step's fall above 0: the last line ends exactly at the run's end."""
    fall = -np.diff(lrs)
    assert (fall > 0).all()
    same = np.isclose(fall[1:], fall[:-1], rtol=1e-6, atol=0)
    alone = ~np.r_[False, same] & ~np.r_[same, False]
    assert not alone.any(), f'a jump at step {np.flatnonzero(alone)}'
    assert lrs[-1] == pytest.approx(fall[-1])
    return 1 + int((~same).sum())


def test_fit_epochs_ends_the_schedule_inside_the_budget(data_dir, tmp_path, step_clock):
    """A 0.1 h budget (360 s) of 80-s epochs: after the warm-up's epoch 3 more fit (280 s left,
    counted at 82.4 s each), so the run trains 4 epochs and its triangular schedule reaches 0 at
    the end of the 4th, instead of being cut by the budget in its 5th with the rate still high.
    At a steady speed the later epochs' choices agree with the first: one line in the log."""
    fitted, cut = tmp_path / 'fitted', tmp_path / 'cut'
    assert train_run(data_dir, fitted, *FIT, '--set', 'fit_epochs=true') == 0
    lrs, step_clock.lrs = step_clock.lrs, []
    assert train_run(data_dir, cut, *FIT) == 0
    cfg = json.loads((fitted / 'config.json').read_text())
    history = json.loads((fitted / 'history.json').read_text())
    m = json.loads((fitted / 'metrics.json').read_text())
    assert cfg['epochs'] == 4 and cfg['fit_epochs'] is True and len(history) == 4
    assert m['epochs_done'] == 4 and m['stopped_early'] is False
    state = main.load_checkpoint(fitted / 'ckpt.npz').state
    assert (state.fitted_epochs, state.most_epochs) == (4, 12)
    assert state.schedule_anchor == [STEPS_PER_EPOCH, 1.0]     # the line from the warm-up's peak
    # The rate of the last step: one step before the line's end at 4 epochs (lr 0.02 by default).
    steps = 4 * STEPS_PER_EPOCH
    assert history[-1]['lr'] == pytest.approx(0.02 * (1 - (steps - 1 - STEPS_PER_EPOCH) / (steps - STEPS_PER_EPOCH)))
    assert len(lrs) == steps and lrs[-1] == history[-1]['lr']
    assert lrs[STEPS_PER_EPOCH] == 0.02 and lines_down_to_zero(lrs[STEPS_PER_EPOCH:]) == 1
    log = (fitted / 'train.log').read_text()
    assert log.count('fit_epochs: 4 of at most 12 epochs fit the 0.1 h budget (80 s an epoch') == 1
    assert log.count('fit_epochs:') == 1
    # Without it the same run is stopped by the budget during its 5th epoch, mid-decay.
    m_cut = json.loads((cut / 'metrics.json').read_text())
    assert m_cut['stopped_early'] is True and m_cut['epochs_done'] == 4
    assert json.loads((cut / 'history.json').read_text())[-1]['lr'] > 0.02 * 0.6
    assert 'fit_epochs:' not in (cut / 'train.log').read_text()


@pytest.mark.parametrize('first_s, later_s, plans, final', [
    # 80-s epochs, then 40-s ones from the third: 4 fit, then 5 (mean of 80, 80, 40), then 6.
    (10.0, 5.0, ['4 of at most 12', '5 of at most 12 epochs fit the 0.1 h budget (was 4)',
                 '6 of at most 12 epochs fit the 0.1 h budget (was 5)'], 6),
    # 40-s epochs, then 80-s ones from the third: 8 fit, then 6 (mean of 40, 40, 80), then 5.
    (5.0, 10.0, ['8 of at most 12', '6 of at most 12 epochs fit the 0.1 h budget (was 8)',
                 '5 of at most 12 epochs fit the 0.1 h budget (was 6)'], 5),
])
def test_fit_epochs_follows_the_hosts_speed(data_dir, tmp_path, step_clock, first_s, later_s, plans, final):
    """The choice is made again after every epoch from the last three epochs' times: a host that
    speeds up gets more epochs, one that slows down fewer, and each time the rest of the schedule
    continues from the rate it had reached, down to 0 at the new end, inside the budget."""
    step_clock.step_s, step_clock.speed_change = first_s, {2: later_s}
    out = tmp_path / 'drift'
    assert train_run(data_dir, out, *FIT, '--set', 'fit_epochs=true') == 0
    log = (out / 'train.log').read_text()
    chosen = [line.split('fit_epochs: ')[1] for line in log.splitlines() if 'fit_epochs: ' in line]
    assert len(chosen) == len(plans) and all(c.startswith(p) for c, p in zip(chosen, plans)), chosen
    cfg = json.loads((out / 'config.json').read_text())
    state = main.load_checkpoint(out / 'ckpt.npz').state
    assert cfg['epochs'] == state.fitted_epochs == final and state.most_epochs == 12
    assert json.loads((out / 'metrics.json').read_text())['stopped_early'] is False
    lrs = step_clock.lrs
    assert len(lrs) == final * STEPS_PER_EPOCH and lrs[STEPS_PER_EPOCH] == 0.02
    # Three lines: from the peak to the first choice's end, re-aimed twice at an epoch's end.
    assert lines_down_to_zero(lrs[STEPS_PER_EPOCH:]) == 3
    anchor_step, fraction = state.schedule_anchor
    assert anchor_step == 4 * STEPS_PER_EPOCH and fraction * 0.02 == pytest.approx(lrs[anchor_step])


def test_fit_epochs_is_chosen_again_on_resume_from_the_new_budget(data_dir, tmp_path, step_clock):
    """Stopped in epoch 3 after the choice of 4, the run resumes with them (its checkpoint and
    config.json agree). Resumed without a budget it keeps them; resumed with a longer one it
    chooses again after its first epoch, up to the configuration's 12, the rate continuing."""
    for budget, epochs in (([], 4), (['--max-hours', '10'], 12)):
        out = tmp_path / f'split{epochs}'
        assert train_run(data_dir, out, *FIT, '--set', 'fit_epochs=true',
                         interrupt_after=2 * STEPS_PER_EPOCH + 3) == 0
        assert json.loads((out / 'config.json').read_text())['epochs'] == 4
        step_clock.lrs = []
        assert resume(out / 'ckpt.npz', *budget) == 0
        history = json.loads((out / 'history.json').read_text())
        assert len(history) == epochs and json.loads((out / 'metrics.json').read_text())['stopped_early'] is False
        assert json.loads((out / 'config.json').read_text())['epochs'] == epochs
        log = (out / 'train.log').read_text()
        assert log.count('fit_epochs:') == (1 if epochs == 4 else 2)
        assert lines_down_to_zero(step_clock.lrs) == (1 if epochs == 4 else 2)
        if epochs == 12:
            assert 'fit_epochs: 12 of at most 12 epochs fit the 10 h budget (was 4)' in log


@pytest.mark.parametrize('fields, wrong', [
    (dict(fitted_epochs=4, most_epochs=3), 'most_epochs'),                 # a cap below the plan
    (dict(fitted_epochs=4, schedule_anchor=[9, 0.5]), 'schedule_anchor'),  # anchored in the future
    (dict(fitted_epochs=4, schedule_anchor=[2, 1.5]), 'schedule_anchor'),  # above the peak
    (dict(fitted_epochs=4, schedule_anchor=[2]), 'schedule_anchor'),
    (dict(fitted_epochs=4, schedule_anchor=[2.0, 0.5]), 'schedule_anchor'),
    (dict(fitted_epochs=4, most_epochs=12, schedule_anchor=[8, 0.5]), None),
    (dict(fitted_epochs=4), None),      # a checkpoint of a run planned before most_epochs existed
])
def test_the_plan_in_a_checkpoint_is_validated(fields, wrong):
    state = main.TrainState(epoch=1, global_step=8, history=[{}], **fields)
    problem = state.problem()
    assert (problem is None) if wrong is None else problem.startswith(wrong + ' = ')


def test_fit_epochs_does_nothing_without_a_budget(data_dir, tmp_path, step_clock):
    out = tmp_path / 'unbounded'
    assert train_run(data_dir, out, '--epochs', '3', '--set', 'fit_epochs=true') == 0
    assert json.loads((out / 'config.json').read_text())['epochs'] == 3
    assert main.load_checkpoint(out / 'ckpt.npz').state.fitted_epochs is None
