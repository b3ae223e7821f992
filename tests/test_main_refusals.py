"""main.py against hostile input, through the real command line (subprocesses): files that are
not files, interrupts while starting, crashes, checkpoints that lie, resumes on other data or
with an edited config.json, advice that must work when typed, clean-up of only our own files,
conflicting settings and the timing of an epoch split by a resume."""
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import main
from cnn_rnn_numpy import CNNRNN
from conftest import REPO_ROOT, interrupted_after, make_cifar_archive, replace_archive_member

SMOKE = ['--preset', 'smoke', '--subset', '1']
TIMEOUT = 120        # a hang fails the test instead of blocking the suite


def cli(*args, env=None, cwd=REPO_ROOT):
    """Run ``python main.py ARGS`` -> CompletedProcess (text)."""
    return subprocess.run([sys.executable, str(REPO_ROOT / 'main.py'), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=TIMEOUT, env=env)


def one_sentence_error(proc, *words):
    """Exit 2 and one line on stderr, 'error: ...' holding every one of ``words``."""
    # (a synthetic archive gets a warning line first: its md5 is not the official one)
    err = '\n'.join(line for line in proc.stderr.strip().splitlines() if not line.startswith('warning: '))
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert err.startswith('error: ') and '\n' not in err and 'Traceback' not in err, err
    for w in words:
        assert w in err, (w, err)
    return err


def snapshot(folder):
    """{relative path: bytes} of every file under ``folder``, to prove nothing was touched."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob('*'))
            if p.is_file() and not p.is_symlink() and p.name != '.lock'}


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return str(make_cifar_archive(tmp_path_factory.mktemp('cifar'), n_per_batch=50, n_test=100))


@pytest.fixture(scope='module')
def finished(data_dir, tmp_path_factory):
    """A finished 2-epoch smoke run (made in-process: it is only the material of these tests)."""
    out = tmp_path_factory.mktemp('runs') / 'finished'
    assert main.run(SMOKE + ['--epochs', '2', '--data-dir', data_dir, '--out', str(out)]) == 0
    return out


@pytest.fixture(scope='module')
def stopped(data_dir, tmp_path_factory):
    """A 3-epoch smoke run stopped by Ctrl-C at step 3 of epoch 2: resumable, with a best.npz."""
    out = tmp_path_factory.mktemp('runs') / 'stopped'
    with interrupted_after(8 + 3):
        assert main.run(SMOKE + ['--epochs', '3', '--data-dir', data_dir, '--out', str(out)]) == 0
    return out


def copy_run(src, dst):
    shutil.copytree(src, dst, symlinks=True)
    (dst / '.lock').unlink(missing_ok=True)
    return dst


def rewrite_checkpoint(path, meta=None, state=None, arrays=None):
    """Rewrite an .npz of this project in place: ``meta(d)``/``state(d)`` edit its JSON metadata
    (return a replacement, or None to keep the edited dict), ``arrays(a)`` its arrays."""
    with np.load(path) as f:
        a = {k: f[k] for k in f.files}
    d = json.loads(str(a['meta']))
    if state is not None:
        d['state'] = state(d['state']) or d['state']
    if meta is not None:
        d = meta(d) or d
    if arrays is not None:
        arrays(a)
    a['meta'] = np.array(json.dumps(d))
    with open(path, 'wb') as f:
        np.savez(f, **a)


# --------------------------------------------------------------------------
# 1. Things that are not regular files; interrupts while starting
# --------------------------------------------------------------------------

@pytest.mark.parametrize('name', ['train.log', 'config.json', 'best.npz', 'history.json'])
def test_a_named_pipe_in_a_run_folder_is_refused_not_waited_for(stopped, tmp_path, name):
    run = copy_run(stopped, tmp_path / 'run')
    (run / name).unlink()
    os.mkfifo(run / name)
    before = snapshot(run)
    one_sentence_error(cli('--resume', run), str(run / name), 'named pipe')
    assert snapshot(run) == before


def test_a_device_where_the_checkpoint_should_be_is_refused(tmp_path):
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'ckpt.npz').symlink_to('/dev/zero')
    proc = cli('--resume', run / 'ckpt.npz')
    one_sentence_error(proc, 'ckpt.npz')


def test_a_named_pipe_for_the_checkpoint_itself_is_refused(tmp_path):
    os.mkfifo(tmp_path / 'ckpt.npz')
    one_sentence_error(cli('--resume', tmp_path / 'ckpt.npz'), 'ckpt.npz')


def handler_installed(proc, timeout=TIMEOUT):
    """True once the process catches SIGTERM (its bit in /proc/PID/status SigCgt): cli.py installs
    its SIGINT and SIGTERM handlers together, and Python itself catches SIGINT from its start."""
    sig = signal.SIGTERM
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        status = Path(f'/proc/{proc.pid}/status').read_text()
        caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith('SigCgt:')), 16)
        if caught >> (sig - 1) & 1:
            return True
        time.sleep(0.001)
    return False


@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize('after_s', [0.0, 1.5])
def test_an_interrupt_while_starting_ends_cleanly(real_archive_dir, tmp_path, sig, after_s):
    """At once after main.py installed its handler it is importing NumPy; at 1.5 s it is
    extracting the real archive into a fresh data folder. Either way: exit 130, one line, no traceback, no run folder, no
    half-extracted folder."""
    data = tmp_path / 'data'
    data.mkdir()
    (data / 'cifar-10-python.tar.gz').symlink_to((real_archive_dir / 'cifar-10-python.tar.gz').resolve())
    out = tmp_path / 'run'
    proc = subprocess.Popen([sys.executable, str(REPO_ROOT / 'main.py'), '--data-dir', str(data),
                             '--out', str(out), '--epochs', '1'], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # The interpreter's own start-up (before main.py's first line) is not main.py's to handle:
    # wait until main.py has installed its handler, then for the rest of after_s.
    t0 = time.monotonic()
    assert handler_installed(proc), 'main.py never installed its start-up interrupt handler'
    time.sleep(max(0.0, after_s - (time.monotonic() - t0)))
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 130, err
    # One line, after at most the archive check's warning, which main.py prints (once the check
    # has finished: on a fast machine within 1.5 s) for an archive that is not the official file,
    # as the shared one is.
    lines = [line for line in err.strip().splitlines()
             if not (line.startswith('warning: ') and 'using it as placed by hand' in line)]
    assert 'Traceback' not in err and len(lines) == 1, err
    assert 'interrupted' in lines[0] and sig.name in lines[0]
    assert not out.exists()
    assert sorted(p.name for p in data.iterdir()) in (['cifar-10-python.tar.gz'],
                                                      ['cifar-10-batches-py', 'cifar-10-python.tar.gz'])


def test_an_interrupt_while_loading_a_resume_leaves_the_run_unchanged(stopped, tmp_path):
    run = copy_run(stopped, tmp_path / 'run')
    before = snapshot(run)
    proc = subprocess.Popen([sys.executable, str(REPO_ROOT / 'main.py'), '--resume', str(run)],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # From main.py's handler on (before it, Python is still starting up: a busy host once took
    # more than the 0.3 s, and the interrupt hit its imports).
    assert handler_installed(proc), 'main.py never installed its start-up interrupt handler'
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=TIMEOUT)
    # Either still starting (130, nothing changed) or already training (stopped at its next step, 0).
    assert proc.returncode in (0, 130) and 'Traceback' not in err, err
    if proc.returncode == 130:
        assert snapshot(run) == before


# --------------------------------------------------------------------------
# 2. A crash is not a divergence
# --------------------------------------------------------------------------

def test_a_crash_exits_3_with_one_line_and_the_traceback_in_train_log(data_dir, tmp_path):
    hook = tmp_path / 'hook'
    hook.mkdir()
    # sitecustomize runs before main.py: it breaks one function main.py uses during training.
    (hook / 'sitecustomize.py').write_text(
        'import optim\n'
        'def broken(*args, **kwargs):\n'
        '    raise ZeroDivisionError("injected fault")\n'
        'optim.clip_grad_norm = broken\n')
    env = dict(os.environ, PYTHONPATH=f'{hook}{os.pathsep}{REPO_ROOT}')
    out = tmp_path / 'run'
    proc = cli(*SMOKE, '--epochs', '1', '--data-dir', data_dir, '--out', out, env=env)
    assert proc.returncode == 3, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len([line for line in err if not line.startswith('warning')]) == 1, err
    assert 'crashed' in err[-1] and 'ZeroDivisionError' in err[-1] and 'train.log' in err[-1]
    log = (out / 'train.log').read_text()
    assert 'crash: ZeroDivisionError: injected fault' in log and 'Traceback' in log
    assert 'the loss became' not in log


# --------------------------------------------------------------------------
# 3. Checkpoints are validated as a whole before use
# --------------------------------------------------------------------------

def _set(key, value):
    def edit(d):
        d[key] = value
    return edit


def _nan_in(group):
    def edit(a):
        a[f'{group}/W_hh'] = np.full_like(a[f'{group}/W_hh'], np.nan)
    return edit


CHECKPOINT_LIES = {
    'meta a JSON list': (dict(meta=lambda d: [1, 2]), 'JSON list'),
    'meta a JSON string': (dict(meta=lambda d: 'hello'), 'JSON str'),
    'run_config a list': (dict(meta=_set('run_config', [])), 'configuration'),
    'run_config lr a word': (dict(meta=lambda d: d['run_config'].update(lr='fast')), 'lr'),
    'state a number': (dict(meta=_set('state', 3)), 'state'),
    'epoch a string': (dict(state=_set('epoch', '1')), "epoch = '1'"),
    'epoch negative': (dict(state=_set('epoch', -1)), 'epoch = -1'),
    'epoch past the run': (dict(state=_set('epoch', 99)), 'epoch = 99'),
    'step past the epoch': (dict(state=_set('step', 9999)), 'step = 9999'),
    'history not a list': (dict(state=_set('history', {'a': 1})), 'history'),
    'mean of two channels': (dict(state=lambda s: s.update(mean=[0.5, 0.5], std=[0.2, 0.2])), 'mean'),
    'std zero': (dict(state=lambda s: s.update(mean=[0.5] * 3, std=[0.2, 0.0, 0.2])), 'std'),
    'elapsed NaN': (dict(state=_set('elapsed_s', float('nan'))), 'elapsed_s'),
    'schedule anchor without a plan': (dict(state=_set('schedule_anchor', [0, 0.5])), 'schedule_anchor'),
    'most epochs without a plan': (dict(state=_set('most_epochs', 30)), 'most_epochs'),
    'code commits a string': (dict(state=_set('code_commits', 'abc1234')), 'code_commits'),
    'time budgets a number': (dict(state=_set('time_budgets_h', 1.0)), 'time_budgets_h'),
    'a negative time budget': (dict(state=_set('time_budgets_h', [-1.0])), 'time_budgets_h'),
    'dtype complex128': (dict(meta=_set('dtype', 'complex128')), 'complex128'),
    'hidden huge': (dict(meta=_set('hidden', 10 ** 9)), 'hidden'),
    'weights NaN': (dict(arrays=_nan_in('param')), 'not finite'),
    'velocity NaN': (dict(arrays=_nan_in('velocity')), 'not finite'),
    'weights complex': (dict(arrays=lambda a: a.update({'param/b_o': a['param/b_o'].astype(complex)})),
                        'complex'),
    'weights of the wrong shape': (dict(arrays=lambda a: a.update({'param/W_ho': np.zeros((3, 3), np.float32)})),
                                   'W_ho'),
}


@pytest.mark.parametrize('case', sorted(CHECKPOINT_LIES))
def test_a_checkpoint_that_lies_is_refused_before_use(stopped, tmp_path, case):
    edits, words = CHECKPOINT_LIES[case]
    run = copy_run(stopped, tmp_path / 'run')
    rewrite_checkpoint(run / 'ckpt.npz', **edits)
    before = snapshot(run)
    err = one_sentence_error(cli('--resume', run / 'ckpt.npz'), words)
    assert str(run / 'ckpt.npz') in err
    assert 'use another' in err or 'use a checkpoint' in err
    assert snapshot(run) == before


def test_evaluate_with_non_finite_best_weights_keeps_the_metrics(finished, tmp_path):
    run = copy_run(finished, tmp_path / 'run')
    rewrite_checkpoint(run / 'best.npz', arrays=_nan_in('param'))
    before = snapshot(run)
    one_sentence_error(cli('--resume', run, '--evaluate'), 'best.npz', 'not finite')
    assert snapshot(run) == before


def test_a_best_npz_with_an_impossible_record_is_refused(finished, tmp_path):
    run = copy_run(finished, tmp_path / 'run')
    rewrite_checkpoint(run / 'best.npz', meta=_set('val_acc', 7.0))
    before = snapshot(run)
    err = one_sentence_error(cli('--resume', run, '--evaluate'), 'best.npz', '7.0')
    assert snapshot(run) == before
    # The advice works as typed: without best.npz the last weights are evaluated.
    (run / 'best.npz').unlink()
    command = err.split('(python ', 1)[1].split(')')[0]
    assert cli(*shlex.split(command)[1:]).returncode == 0


# --------------------------------------------------------------------------
# 4. The data a run was started on, and its config.json
# --------------------------------------------------------------------------

@pytest.fixture(scope='module')
def other_data_dir(tmp_path_factory):
    """Another synthetic CIFAR-10 of the same sizes, other images."""
    return str(make_cifar_archive(tmp_path_factory.mktemp('other'), n_per_batch=50, n_test=100, seed=5))


@pytest.mark.parametrize('which', ['stopped', 'finished', 'mid-epoch'])
def test_a_resume_on_other_images_is_refused(stopped, finished, data_dir, other_data_dir, tmp_path, which):
    if which == 'mid-epoch':
        run = tmp_path / 'mid'
        with interrupted_after(3):
            assert main.run(SMOKE + ['--epochs', '2', '--data-dir', data_dir, '--out', str(run)]) == 0
    else:
        run = copy_run(stopped if which == 'stopped' else finished, tmp_path / 'run')
    before = snapshot(run)
    extra = ['--evaluate'] if which == 'finished' else []
    one_sentence_error(cli('--resume', run, '--data-dir', other_data_dir, *extra),
                       'not the ones', '--data-dir')
    assert snapshot(run) == before


@pytest.mark.parametrize('recorded', [None, ['0000000'], ['NOW']])
def test_a_run_records_the_commits_of_its_code(stopped, tmp_path, recorded):
    """A run records the commit of the code that started it; a resume under other code adds its
    own, under the same code nothing; a checkpoint from before the record (no key) starts it."""
    now = main.cli.code_commit()
    assert now is not None, 'the tests run in a git checkout of the project'
    run = copy_run(stopped, tmp_path / 'run')
    assert main.load_checkpoint(run / 'ckpt.npz').state.code_commits == [now]
    if recorded is None:
        rewrite_checkpoint(run / 'ckpt.npz', state=lambda s: s.pop('code_commits') and None)
    else:
        rewrite_checkpoint(run / 'ckpt.npz', state=_set('code_commits', [now if c == 'NOW' else c for c in recorded]))
    proc = cli('--resume', run)
    assert proc.returncode == 0, proc.stderr
    expected = {None: [now], ('0000000',): ['0000000', now], ('NOW',): [now]}[recorded and tuple(recorded)]
    assert json.loads((run / 'metrics.json').read_text())['code_commits'] == expected
    assert main.load_checkpoint(run / 'ckpt.npz').state.code_commits == expected


@pytest.mark.parametrize('recorded', [None, [None], [0.25]])
def test_a_run_records_the_time_budget_of_each_invocation_that_trains_it(stopped, tmp_path, recorded):
    """time_budgets_h: the --max-hours of the invocation that started the run (null: none given),
    then of each resume that trains it, into the checkpoint and metrics.json; a checkpoint from
    before the record (no key) starts it at the resume. A re-evaluation trains nothing and adds none."""
    run = copy_run(stopped, tmp_path / 'run')
    assert main.load_checkpoint(run / 'ckpt.npz').state.time_budgets_h == [None]     # SMOKE: no --max-hours
    if recorded is None:
        rewrite_checkpoint(run / 'ckpt.npz', state=lambda s: s.pop('time_budgets_h') and None)
    else:
        rewrite_checkpoint(run / 'ckpt.npz', state=_set('time_budgets_h', recorded))
    proc = cli('--resume', run, '--max-hours', '0.5')
    assert proc.returncode == 0, proc.stderr
    expected = (recorded or []) + [0.5]
    assert json.loads((run / 'metrics.json').read_text())['time_budgets_h'] == expected
    assert main.load_checkpoint(run / 'ckpt.npz').state.time_budgets_h == expected
    proc = cli('--resume', run, '--evaluate')
    assert proc.returncode == 0, proc.stderr
    assert json.loads((run / 'metrics.json').read_text())['time_budgets_h'] == expected


def test_code_commit_names_the_checkout_and_its_changes(tmp_path):
    assert main.cli.code_commit(tmp_path) is None             # not a git work tree
    def git(*args):
        return subprocess.run(['git', '-c', 'user.name=t', '-c', 'user.email=t@t', *args], cwd=tmp_path,
                              capture_output=True, text=True, check=True).stdout.strip()
    git('init', '-q')
    (tmp_path / 'a.py').write_text('x = 1\n')
    git('add', 'a.py')
    git('commit', '-q', '-m', 'one')
    head = git('rev-parse', '--short', 'HEAD')
    assert main.cli.code_commit(tmp_path) == head
    (tmp_path / 'notes.txt').write_text('untracked files do not count')
    assert main.cli.code_commit(tmp_path) == head
    (tmp_path / 'a.py').write_text('x = 2\n')
    assert main.cli.code_commit(tmp_path) == head + '+changes'


def test_the_same_images_in_another_folder_are_accepted_and_recorded(stopped, data_dir, tmp_path):
    run = copy_run(stopped, tmp_path / 'run')
    moved = tmp_path / 'moved'
    shutil.copytree(data_dir, moved)
    proc = cli('--resume', run, '--data-dir', moved)
    assert proc.returncode == 0, proc.stderr
    config = json.loads((run / 'config.json').read_text())
    assert config['data_dir'] == str(moved)
    assert main.load_checkpoint(run / 'ckpt.npz').cfg.data_dir == str(moved)
    metrics = json.loads((run / 'metrics.json').read_text())
    assert set(metrics['data_fingerprint']) == {'train', 'test'}


def test_a_test_batch_of_other_images_is_refused_on_evaluate(finished, data_dir, other_data_dir, tmp_path):
    """Same training batches, another test_batch: the run cannot be re-evaluated on it."""
    swapped = tmp_path / 'swapped'
    shutil.copytree(data_dir, swapped)
    shutil.rmtree(swapped / 'cifar-10-batches-py', ignore_errors=True)
    other_test = subprocess.run(['tar', '-xzOf', str(Path(other_data_dir) / 'cifar-10-python.tar.gz'),
                                 'cifar-10-batches-py/test_batch'], capture_output=True, check=True).stdout
    replace_archive_member(swapped, 'test_batch', other_test)
    run = copy_run(finished, tmp_path / 'run')
    before = snapshot(run)
    one_sentence_error(cli('--resume', run, '--evaluate', '--data-dir', swapped), 'test images')
    assert snapshot(run) == before


@pytest.mark.parametrize('key, value', [('lr', 0.5), ('cell', 'gru'), ('seed', 3)])
def test_an_edited_config_json_is_detected_not_ignored(stopped, tmp_path, key, value):
    run = copy_run(stopped, tmp_path / 'run')
    config = json.loads((run / 'config.json').read_text())
    config[key] = value
    (run / 'config.json').write_text(json.dumps(config))
    before = snapshot(run)
    err = one_sentence_error(cli('--resume', run), 'config.json', f'{key} = {value!r}')
    assert snapshot(run) == before
    # The fix offered works: with config.json deleted the resume rewrites it from the checkpoint.
    (run / 'config.json').unlink()
    assert 'delete' in err and cli('--resume', run).returncode == 0
    assert json.loads((run / 'config.json').read_text())[key] != value


# --------------------------------------------------------------------------
# 7. Every suggested command works when typed
# --------------------------------------------------------------------------

def suggested_command(text):
    """The 'python main.py ...' command inside a message, as argv for main.py."""
    words = shlex.split(text[text.index('python main.py'):].rstrip(').'))
    return words[2:]


def test_a_run_without_a_checkpoint_is_told_a_command_that_starts_it_again(finished, tmp_path):
    run = tmp_path / 'killed-in-epoch-1'
    run.mkdir()
    for name in ('config.json', 'train.log'):
        shutil.copy(finished / name, run / name)
    for given in (run, run / 'ckpt.npz'):
        err = one_sentence_error(cli('--resume', given), 'first checkpoint', 'python main.py')
        assert 'ckpt.npz continues' not in err
    argv = suggested_command(err)
    proc = cli(*argv, '--out', tmp_path / 'again')
    assert proc.returncode == 0, proc.stderr
    again = json.loads((tmp_path / 'again' / 'config.json').read_text())
    original = json.loads((finished / 'config.json').read_text())
    assert {k: again[k] for k in main.Config.preset_keys()} == {k: original[k] for k in main.Config.preset_keys()}


def test_out_naming_a_folder_without_a_checkpoint_does_not_suggest_resuming_it(finished, data_dir, tmp_path):
    run = tmp_path / 'partial'
    run.mkdir()
    shutil.copy(finished / 'train.log', run / 'train.log')
    err = one_sentence_error(cli(*SMOKE, '--data-dir', data_dir, '--out', run), 'already holds files')
    assert '--resume' not in err


def test_divergence_before_the_first_checkpoint_names_a_command_that_works(data_dir, tmp_path, monkeypatch, capsys):
    real_loss = CNNRNN.loss

    def nan_loss(self, X, y, **kw):
        loss, grads, details = real_loss(self, X, y, **kw)
        return float('nan'), grads, details
    monkeypatch.setattr(CNNRNN, 'loss', nan_loss)
    out = tmp_path / 'diverged'
    assert main.run(SMOKE + ['--epochs', '2', '--lr', '0.08', '--data-dir', data_dir, '--out', str(out)]) == 1
    err = capsys.readouterr().err
    assert 'no checkpoint was written yet' in err
    monkeypatch.setattr(CNNRNN, 'loss', real_loss)
    argv = suggested_command(err.strip().splitlines()[-1])
    assert main.run(argv + ['--out', str(tmp_path / 'again')]) == 0
    again = json.loads((tmp_path / 'again' / 'config.json').read_text())
    assert again['lr'] == 0.04 and again['epochs'] == 2 and again['data_dir'] == data_dir


def test_out_of_memory_in_the_evaluation_advises_a_command_that_works(data_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / 'oom'

    def no_memory(*args, **kwargs):
        raise MemoryError
    monkeypatch.setattr(main, 'final_evaluation', no_memory)
    assert main.run(SMOKE + ['--epochs', '1', '--data-dir', data_dir, '--out', str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('error: ') and '--set eval_batch_size=' in err and '\n' not in err
    monkeypatch.undo()
    argv = suggested_command(err)
    assert main.run(argv) == 0
    assert json.loads((out / 'config.json').read_text())['eval_batch_size'] == 100
    assert main.load_checkpoint(out / 'ckpt.npz').cfg.eval_batch_size == 100
    assert (out / 'metrics.json').is_file()


# --------------------------------------------------------------------------
# 8. Clean-up removes only what is ours
# --------------------------------------------------------------------------

def test_a_resume_removes_only_our_own_temporary_files(stopped, tmp_path):
    run = copy_run(stopped, tmp_path / 'run')
    (run / 'figures').mkdir(exist_ok=True)
    users = ['notes.tmp-keep', 'figures/draft.tmp-1', 'results.tmp-abcd1234']
    ours = ['ckpt.npz.tmp-abcd1234', 'history.json.tmp-zz99_x0y']
    for name in users + ours:
        (run / name).write_text('x')
    proc = cli('--resume', run)
    assert proc.returncode == 0, proc.stderr
    for name in users:
        assert (run / name).read_text() == 'x', name
    for name in ours:
        assert not (run / name).exists(), name


# --------------------------------------------------------------------------
# 10. Smaller ones
# --------------------------------------------------------------------------

@pytest.mark.parametrize('argv, words', [
    (['--cell', 'gru', '--set', 'cell=lstm'], '--cell gru and --set cell=lstm'),
    (['--epochs', '2', '--set', 'epochs=3'], 'both set epochs'),
    (['--set', 'lr=0.1', '--set', 'lr=0.2'], 'given twice'),
])
def test_conflicting_settings_are_an_error(data_dir, tmp_path, argv, words):
    out = tmp_path / 'run'
    one_sentence_error(cli(*SMOKE, '--data-dir', data_dir, '--out', out, *argv), words)
    assert not out.exists()


def test_a_resume_may_only_change_the_evaluation_batch_size(stopped, tmp_path):
    run = copy_run(stopped, tmp_path / 'run')
    one_sentence_error(cli('--resume', run, '--set', 'hidden=64'), '--set hidden', 'cannot be combined')
    proc = cli('--resume', run, '--set', 'eval_batch_size=7')
    assert proc.returncode == 0, proc.stderr
    assert json.loads((run / 'config.json').read_text())['eval_batch_size'] == 7


def test_an_epoch_split_by_a_resume_reports_the_time_and_speed_of_both_parts(data_dir, tmp_path):
    """Stopped after 3 of 8 steps, resumed: the epoch's images/s is that of its 8 steps,
    comparable to an uninterrupted epoch's (it was ~17x too low: only the 5 resumed steps'
    images over a time that included start-up)."""
    whole, split = tmp_path / 'whole', tmp_path / 'split'
    argv = SMOKE + ['--epochs', '1', '--data-dir', data_dir]
    assert main.run(argv + ['--out', str(whole)]) == 0

    with interrupted_after(3):
        assert main.run(argv + ['--out', str(split)]) == 0
    state = main.load_checkpoint(split / 'ckpt.npz').state
    assert state.step == 3 and state.epoch_timed_images == state.seen == 96 and state.epoch_train_s > 0
    time.sleep(1.0)            # a pause between the parts is not training time
    assert main.run(['--resume', str(split / 'ckpt.npz')]) == 0
    a = json.loads((whole / 'history.json').read_text())[0]
    b = json.loads((split / 'history.json').read_text())[0]
    assert 0.25 < b['images_per_s'] / a['images_per_s'] < 4, (a, b)
    assert b['epoch_time_s'] < a['epoch_time_s'] * 4 + 5


def test_the_run_summary_names_a_viz_command_that_works_as_typed(data_dir, tmp_path):
    """Printed for a run made from another folder, with the interpreter of this process."""
    proc = cli(*SMOKE, '--epochs', '1', '--data-dir', data_dir, '--out', 'runs/first', cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    line = next(line for line in proc.stdout.splitlines() if line.startswith('next '))
    argv = shlex.split(line[len('next '):])
    assert argv[-1] == 'runs/first' and argv[1].endswith('viz.py')
    drawn = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT)
    assert drawn.returncode == 0, drawn.stderr
    assert (tmp_path / 'runs' / 'first' / 'report.md').is_file()


def test_a_missing_package_is_one_sentence_not_a_traceback(tmp_path):
    """An interpreter without the requirements (python3 main.py outside the venv) is told what to do."""
    hide = tmp_path / 'hide'
    hide.mkdir()
    (hide / 'tqdm.py').write_text('raise ModuleNotFoundError("No module named \'tqdm\'", name="tqdm")\n')
    env = dict(os.environ, PYTHONPATH=str(hide))
    proc = cli('--help', env=env)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    assert "needs the Python package 'tqdm'" in proc.stderr and 'requirements' in proc.stderr


def test_an_interrupt_whose_exception_python_discarded_still_ends_the_start_up(data_dir, tmp_path, monkeypatch):
    """Python discards an exception raised while it runs some of its own callbacks ("Exception
    ignored in <function _get_module_lock.<locals>.cb>"): the interrupt must still end the start-up."""
    import cli
    monkeypatch.setattr(cli, '_interrupted_by', None)
    try:
        cli._interrupted_while_starting(signal.SIGINT, None)     # during the imports...
    except cli.StartupInterrupted:
        pass                                                      # ...and discarded
    out = tmp_path / 'run'
    assert main.run(SMOKE + ['--data-dir', data_dir, '--out', str(out)]) == 130
    assert not out.exists()

    monkeypatch.setattr(cli, '_interrupted_by', None)
    real_load = main.load_data

    def load_then_discarded_interrupt(cfg):
        data = real_load(cfg)
        try:                                                      # main.py's own handler, while loading
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
        except cli.StartupInterrupted:
            pass
        return data
    monkeypatch.setattr(main, 'load_data', load_then_discarded_interrupt)
    assert main.run(SMOKE + ['--data-dir', data_dir, '--out', str(out)]) == 130
    assert not out.exists()


def test_an_interrupt_that_python_discards_while_starting_prints_nothing_of_its_own():
    """An interrupt can land while the import system runs a weakref callback, where Python discards
    the handler's exception and prints "Exception ignored in ..." with a traceback (it broke
    test_an_interrupt_while_starting_ends_cleanly once). The tool's start-up hook keeps quiet about
    it; _interrupted_by still says an interrupt came, and any other discarded exception is still
    reported."""
    code = ('import gc, weakref, cli\n'
            'cli.exit_cleanly_on_interrupt_while_starting()\n'
            'class Thing: pass\n'
            'def callback(ref, error): raise error\n'
            'for error in (cli.StartupInterrupted("SIGINT"), ValueError("a real bug")):\n'
            '    thing = Thing()\n'
            '    ref = weakref.ref(thing, lambda r, e=error: callback(r, e))\n'
            '    del thing\n'
            '    gc.collect()\n'
            '    print("went on", flush=True)\n')
    proc = subprocess.run([sys.executable, '-c', code], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert proc.returncode == 0 and proc.stdout.splitlines() == ['went on', 'went on'], proc
    assert 'StartupInterrupted' not in proc.stderr
    assert 'Exception ignored in' in proc.stderr and 'ValueError: a real bug' in proc.stderr
