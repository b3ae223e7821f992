"""The run folder under hostile or careless use: links, locks, full and read-only
disks, interrupted writes and evaluations, resume variants, damaged presets.

Every bad input must end with exit code 2, one sentence on stderr naming the
problem and the fix, and nothing already written touched.
"""
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import config
import main
import runfiles
from cnn_rnn_numpy import CNNRNN
from conftest import (REPO_ROOT, SMOKE, STEPS_PER_EPOCH, folder_snapshot, make_cifar_archive, resume,
                      train_run)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return str(make_cifar_archive(tmp_path_factory.mktemp('cifar'), n_per_batch=50, n_test=100))


def one_sentence_error(capsys, *words):
    """The stderr of the last call: one line starting with 'error: ', holding every word."""
    err = capsys.readouterr().err.strip()
    assert err.startswith('error: ') and '\n' not in err and 'Traceback' not in err, err
    for w in words:
        assert w in err, (w, err)
    return err


def stale_temp_files(folder):
    return [p.name for p in Path(folder).rglob('*') if runfiles.TEMP_MARK in p.name]


# --------------------------------------------------------------------------
# runs/latest
# --------------------------------------------------------------------------

def test_resume_through_the_latest_link_keeps_latest_pointing_at_the_run(data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert train_run(data_dir, 'runs/first', interrupt_after=3) == 0
    latest = tmp_path / 'runs' / 'latest'
    assert latest.is_symlink() and latest.resolve() == (tmp_path / 'runs' / 'first').resolve()
    # The README's command, typed from the folder that holds runs/.
    assert main.run(['--resume', 'runs/latest/ckpt.npz', '--max-hours', '1e-9']) == 0
    assert latest.is_symlink() and latest.resolve() == (tmp_path / 'runs' / 'first').resolve()
    assert sorted(os.listdir(tmp_path / 'runs')) == ['first', 'latest']
    assert 'resuming' in (tmp_path / 'runs' / 'first' / 'train.log').read_text()
    # The run folder itself, through the link, resumes too.
    assert main.run(['--resume', 'runs/latest']) == 0
    m = json.loads((tmp_path / 'runs' / 'first' / 'metrics.json').read_text())
    assert m['stopped_early'] is False and m['epochs_done'] == 2
    assert latest.resolve() == (tmp_path / 'runs' / 'first').resolve()


@pytest.mark.parametrize('kind', ['file', 'folder'])
def test_a_users_latest_is_never_replaced(data_dir, tmp_path, capsys, kind):
    runs = tmp_path / 'runs'
    runs.mkdir()
    latest = runs / 'latest'
    if kind == 'file':
        latest.write_text('my notes')
    else:
        latest.mkdir()
        (latest / 'keep.txt').write_text('mine')
    assert train_run(data_dir, runs / 'new', '--epochs', '1') == 0
    out = capsys.readouterr().out
    assert 'is not a link, so it was left alone' in out
    if kind == 'file':
        assert latest.read_text() == 'my notes'
    else:
        assert (latest / 'keep.txt').read_text() == 'mine'
    assert sorted(os.listdir(runs)) == ['latest', 'new']       # nothing else, no latest.tmp-*


def test_nothing_is_written_outside_the_run_folder_but_latest(data_dir, tmp_path):
    runs = tmp_path / 'runs'
    runs.mkdir()
    (runs / 'other').mkdir()
    (runs / 'other' / 'x.txt').write_text('x')
    before = {p.relative_to(tmp_path) for p in tmp_path.rglob('*')}
    assert train_run(data_dir, runs / 'new', '--epochs', '1') == 0
    after = {p.relative_to(tmp_path) for p in tmp_path.rglob('*')}
    added = {p for p in after - before if p.parts[:2] != ('runs', 'new')}
    assert added == {Path('runs/latest')}


# --------------------------------------------------------------------------
# One writer per run folder
# --------------------------------------------------------------------------

def test_a_run_folder_in_use_is_refused_and_the_lock_dies_with_its_process(data_dir, tmp_path, capsys):
    out = tmp_path / 'busy'
    proc = subprocess.Popen([sys.executable, 'main.py', *SMOKE, '--epochs', '500', '--data-dir', data_dir,
                             '--out', str(out)], cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not (out / 'ckpt.npz').exists() and time.time() < deadline:
            time.sleep(0.1)
        assert (out / 'ckpt.npz').exists()
        capsys.readouterr()
        assert main.run(['--resume', str(out / 'ckpt.npz')]) == 2
        one_sentence_error(capsys, 'in use by main.py', f'pid {proc.pid}', str(out.resolve()))
    finally:
        proc.kill()                 # a crash: no clean-up code runs
        proc.wait()
    # The lock went away with the process: the run resumes.
    assert main.run(['--resume', str(out / 'ckpt.npz'), '--max-hours', '1e-9']) == 0
    assert (out / 'metrics.json').is_file()


# --------------------------------------------------------------------------
# File-system errors: exit 2, one sentence, the last checkpoint intact
# --------------------------------------------------------------------------

def test_file_system_problems_with_the_run_folder(data_dir, tmp_path, capsys):
    (tmp_path / 'afile').write_text('not a folder')
    os.symlink(tmp_path / 'nowhere', tmp_path / 'dangling')
    cases = [
        (['--out', str(tmp_path / 'afile' / 'run')], ['afile', 'is a file, not a folder']),
        (['--out', ''], ['--out', 'empty']),
        (['--out', str(tmp_path / 'dangling')], ['dangling', 'link to nothing']),
        (['--out', str(tmp_path / 'afile')], ['afile', 'is a file']),
        (['--data-dir', ''], ['--data-dir', 'empty']),
    ]
    listing = sorted(os.listdir(tmp_path))
    for extra, words in cases:
        argv = SMOKE + ['--data-dir', data_dir] + extra
        if '--out' not in extra:
            argv += ['--out', str(tmp_path / 'r')]
        capsys.readouterr()
        assert main.run(argv) == 2, extra
        one_sentence_error(capsys, *words)
        assert sorted(os.listdir(tmp_path)) == listing, extra
    assert (tmp_path / 'afile').read_text() == 'not a folder'


def test_an_absurd_model_size_is_a_clear_error(data_dir, tmp_path, capsys):
    assert main.run(SMOKE + ['--data-dir', data_dir, '--out', str(tmp_path / 'huge'),
                             '--set', 'hidden=1000000000']) == 2
    one_sentence_error(capsys, 'hidden=1000000000', 'smaller')
    assert not (tmp_path / 'huge').exists()


def test_an_injected_write_failure_keeps_the_last_checkpoint(data_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / 'run'
    assert train_run(data_dir, out, '--epochs', '2', interrupt_after=STEPS_PER_EPOCH + 2) == 0
    before = folder_snapshot(out)

    def no_space(fd):
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(runfiles.os, 'fsync', no_space)
    resume_fails_without_touching_the_run(out, before, capsys)
    monkeypatch.undo()
    assert resume(out / 'ckpt.npz') == 0


def resume_fails_without_touching_the_run(out, before, capsys):
    """A resume on a full disk: exit 2, one sentence, the run's files as they were, no temporaries."""
    capsys.readouterr()
    assert resume(out / 'ckpt.npz') == 2
    one_sentence_error(capsys, 'no space left', 'free disk space')
    after = folder_snapshot(out)
    for name in ('ckpt.npz', 'best.npz', 'history.json', 'config.json', 'metrics.json'):
        assert after[name] == before[name], name
    assert stale_temp_files(out) == []


def mount_tmpfs(path, size):
    """Mount a small tmpfs at path; False where this machine does not allow it."""
    path.mkdir()
    if os.geteuid() != 0:
        return False
    proc = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)],
                          capture_output=True)
    return proc.returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / 'mnt'
    if not mount_tmpfs(mnt, '4m'):
        pytest.skip('cannot mount a tmpfs here (needs root); the injected-failure test covers the code path')
    yield mnt
    subprocess.run(['umount', '-l', str(mnt)], check=False)


def fill(folder):
    """Write into folder until the disk is full; returns the filler file."""
    filler = folder / 'filler'
    with open(filler, 'wb') as f:
        try:
            while True:
                f.write(b'\0' * 65536)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC
    return filler


def test_a_full_disk_keeps_the_last_checkpoint_and_resumes(data_dir, small_disk, capsys):
    out = small_disk / 'run'
    assert train_run(data_dir, out, '--epochs', '2', interrupt_after=STEPS_PER_EPOCH + 2) == 0
    before = folder_snapshot(out)
    filler = fill(small_disk)
    resume_fails_without_touching_the_run(out, before, capsys)
    filler.unlink()
    assert resume(out / 'ckpt.npz') == 0
    assert json.loads((out / 'metrics.json').read_text())['stopped_early'] is False


def test_a_read_only_disk_is_a_clear_error(data_dir, small_disk, capsys):
    out = small_disk / 'run'
    assert train_run(data_dir, out, '--epochs', '2', interrupt_after=3) == 0
    before = folder_snapshot(out)
    subprocess.run(['mount', '-o', 'remount,ro', str(small_disk)], check=True)
    capsys.readouterr()
    assert resume(out / 'ckpt.npz') == 2
    one_sentence_error(capsys, 'read-only', str(out.resolve()))
    assert main.run(SMOKE + ['--data-dir', data_dir, '--out', str(small_disk / 'new')]) == 2
    one_sentence_error(capsys, 'read-only', 'new')
    assert folder_snapshot(out) == before


# --------------------------------------------------------------------------
# Divergence, a new learning rate on resume
# --------------------------------------------------------------------------

def poison_loss(monkeypatch, at_call):
    real_loss, calls = CNNRNN.loss, {'n': 0}

    def poisoned(self, X, y, **kw):
        calls['n'] += 1
        loss, grads, details = real_loss(self, X, y, **kw)
        return (float('nan') if calls['n'] == at_call else loss), grads, details
    monkeypatch.setattr(CNNRNN, 'loss', poisoned)


def test_the_fix_a_divergence_proposes_works_as_written(data_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / 'div'
    assert train_run(data_dir, out, '--epochs', '3', interrupt_after=STEPS_PER_EPOCH + 2) == 0
    poison_loss(monkeypatch, 4)
    capsys.readouterr()
    assert resume(out / 'ckpt.npz') == 1
    err = capsys.readouterr().err
    assert 'the loss became nan' in err
    command = re.search(r'python main\.py (--resume \S+ --lr \S+)', err).group(1).split()
    monkeypatch.undo()
    assert main.run(command) == 0
    cfg = json.loads((out / 'config.json').read_text())
    assert cfg['lr'] == pytest.approx(0.01) and cfg['lr_changes'][-1]['from'] == 0.02
    assert cfg['lr_changes'][-1]['to'] == pytest.approx(0.01)
    history = json.loads((out / 'history.json').read_text())
    assert [r['base_lr'] for r in history] == [0.02, pytest.approx(0.01), pytest.approx(0.01)]
    # The schedule now runs from the new base: epoch 3 is the second after the warm-up.
    assert history[2]['lr'] == pytest.approx(0.01 * 0.9)


def test_a_divergence_before_any_checkpoint_says_so(data_dir, tmp_path, capsys, monkeypatch):
    poison_loss(monkeypatch, 2)
    assert train_run(data_dir, tmp_path / 'early') == 1
    err = capsys.readouterr().err
    assert 'no checkpoint was written yet' in err and '--lr 0.01' in err
    assert not (tmp_path / 'early' / 'ckpt.npz').exists()


@pytest.mark.parametrize('argv, words', [
    (['--lr', 'inf'], ['--lr: lr = inf is invalid']),
    (['--lr', 'nan'], ['--lr: lr = nan is invalid']),
    (['--set', 'min_lr=0.5'], ['min_lr = 0.5 is above lr']),
    (['--set', 'bn_beta_lr=64'], ['bn_beta_lr = 64 sets how fast BatchNorm learns, but batchnorm is false']),
    (['--seed', '-1'], ['seed = -1']),
    (['--seed', str(2 ** 32)], [f'seed = {2 ** 32}']),
])
def test_learning_rates_and_seeds_out_of_range(data_dir, tmp_path, capsys, argv, words):
    assert main.run(SMOKE + ['--data-dir', data_dir, '--out', str(tmp_path / 'r')] + argv) == 2
    one_sentence_error(capsys, *words)
    assert not (tmp_path / 'r').exists()


# --------------------------------------------------------------------------
# Resume: empty paths, folders, finished runs, stale temporary files
# --------------------------------------------------------------------------

def test_resume_paths_users_type(data_dir, tmp_path, capsys, monkeypatch):
    capsys.readouterr()
    assert main.run(['--resume', '']) == 2
    one_sentence_error(capsys, '--resume', 'empty')
    (tmp_path / 'empty_run').mkdir()
    assert main.run(['--resume', str(tmp_path / 'empty_run')]) == 2
    one_sentence_error(capsys, str(tmp_path / 'empty_run' / 'ckpt.npz'))
    assert os.listdir(tmp_path / 'empty_run') == []
    # An unset shell variable: `--resume "$RUN/ckpt.npz"` becomes /ckpt.npz.
    assert main.run(['--resume', '/ckpt.npz']) == 2
    one_sentence_error(capsys, '/ckpt.npz', 'does not exist')
    assert main.run(['--evaluate']) == 2
    one_sentence_error(capsys, '--evaluate', '--resume')


def test_resuming_a_finished_run_says_so_and_evaluates_only_if_asked(data_dir, tmp_path, capsys):
    out = tmp_path / 'done'
    assert train_run(data_dir, out, '--epochs', '1') == 0
    before = folder_snapshot(out)
    capsys.readouterr()
    assert resume(out / 'ckpt.npz') == 0
    assert 'already finished' in capsys.readouterr().out
    assert folder_snapshot(out) == before
    assert resume(out / 'ckpt.npz', '--evaluate') == 0
    assert 're-evaluating' in capsys.readouterr().out
    after = folder_snapshot(out)
    assert after['ckpt.npz'] == before['ckpt.npz'] and after['best.npz'] == before['best.npz']
    m0, m1 = (json.loads(s['metrics.json']) for s in (before, after))
    assert m1['test_acc'] == m0['test_acc'] and m1['ece'] == m0['ece']
    # Killed between metrics.json and predictions.npz: the evaluation is redone without asking.
    (out / 'predictions.npz').unlink()
    assert resume(out / 'ckpt.npz') == 0
    assert 're-evaluating' in capsys.readouterr().out and (out / 'predictions.npz').is_file()


def test_stale_temporary_files_are_removed_when_the_run_is_reopened(data_dir, tmp_path):
    out = tmp_path / 'stale'
    assert train_run(data_dir, out, '--epochs', '2', interrupt_after=3) == 0
    for name in ('ckpt.npz.tmp-k1ll3d_0', 'history.json.tmp-abc12345'):
        (out / name).write_bytes(b'half a file')
    assert resume(out / 'ckpt.npz') == 0
    assert stale_temp_files(out) == []


# --------------------------------------------------------------------------
# What metrics.json describes; signals during the final evaluation
# --------------------------------------------------------------------------

def test_metrics_describe_the_best_npz_they_evaluated(data_dir, tmp_path, monkeypatch):
    """A crash between writing best.npz and ckpt.npz must not mislabel metrics.json."""
    out = tmp_path / 'crash'
    assert train_run(data_dir, out, '--epochs', '2', interrupt_after=3) == 0
    real_save = main.save_checkpoint

    def crash(*args, **kwargs):
        raise MemoryError
    monkeypatch.setattr(main, 'save_checkpoint', crash)
    assert resume(out / 'ckpt.npz') == 2       # end of epoch 1: best.npz written, then the crash
    monkeypatch.setattr(main, 'save_checkpoint', real_save)
    _, meta = CNNRNN.load(out / 'best.npz', return_meta=True)
    assert meta['epoch'] == 1
    # The checkpoint still says epoch 1, step 3 and no best epoch; stop at once and evaluate.
    assert resume(out / 'ckpt.npz', '--max-hours', '1e-9') == 0
    m = json.loads((out / 'metrics.json').read_text())
    assert m['best_epoch'] == 1 and m['best_val_acc'] == meta['val_acc']
    assert m['evaluated'] == 'best.npz (epoch 1)'


def interrupt_final_evaluation(monkeypatch, times):
    real = main.final_evaluation

    def interrupted(*args, **kwargs):
        for _ in range(times):
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)
    monkeypatch.setattr(main, 'final_evaluation', interrupted)


def test_ctrl_c_during_the_final_evaluation_finishes_it(data_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / 'eval'
    interrupt_final_evaluation(monkeypatch, 1)
    assert train_run(data_dir, out, '--epochs', '1') == 0
    assert 'finishing the test evaluation first' in (out / 'train.log').read_text()
    m = json.loads((out / 'metrics.json').read_text())
    assert m['epochs_done'] == 1 and (out / 'predictions.npz').is_file()


def test_a_second_ctrl_c_during_the_final_evaluation_aborts_cleanly(data_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / 'abort'
    interrupt_final_evaluation(monkeypatch, 2)
    capsys.readouterr()
    assert train_run(data_dir, out, '--epochs', '1') == 130
    one_sentence_error(capsys, 'aborted', f"--resume {out.resolve() / 'ckpt.npz'}")
    assert not (out / 'metrics.json').exists()
    monkeypatch.undo()
    assert resume(out / 'ckpt.npz') == 0         # training was complete: only the evaluation runs
    assert json.loads((out / 'metrics.json').read_text())['epochs_done'] == 1


def test_sigterm_during_the_final_evaluation_in_a_real_process(data_dir, tmp_path):
    """The real CLI: a SIGTERM that lands during the evaluation is never a traceback."""
    out = tmp_path / 'term'
    code = ('import os, signal, sys; sys.argv[0] = "main.py"; import main; real = main.final_evaluation\n'
            'def ev(*a, **k):\n    os.kill(os.getpid(), signal.SIGTERM)\n    return real(*a, **k)\n'
            'main.final_evaluation = ev\nsys.exit(main.run(sys.argv[1:]))\n')
    proc = subprocess.run([sys.executable, '-c', code, *SMOKE, '--epochs', '1', '--data-dir', data_dir,
                           '--out', str(out)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and 'Traceback' not in proc.stderr, proc.stderr
    assert (out / 'metrics.json').is_file()


# --------------------------------------------------------------------------
# presets.json of the wrong shape
# --------------------------------------------------------------------------

@pytest.mark.parametrize('content', ['[]', '{"x": 5}', '{}', '"fast"', '{"x": {"epochs": 1}'])
def test_presets_of_the_wrong_shape_are_refused(tmp_path, monkeypatch, capsys, content):
    path = tmp_path / 'presets.json'
    path.write_text(content)
    monkeypatch.setattr(config, 'PRESETS_PATH', path)
    for argv in (['--list-presets'], ['--preset', 'x', '--out', str(tmp_path / 'r')]):
        capsys.readouterr()
        assert main.run(argv) == 2
        one_sentence_error(capsys, str(path))
    assert not (tmp_path / 'r').exists()
