"""Tests of claims.py, the claims suite (sweep.py with sweeps/claims.json, so these also test
sweep.py's run-folder handling): the plan, refusals, and a tiny suite
(2 variants x 2 seeds of the smoke preset on a synthetic archive) that
resumes an interrupted run, restarts a crashed one, keeps a diverged one,
skips everything on a second pass, stops cleanly on SIGTERM, and ends with
the comparison.

The hostile cases of issue 18 (a crash or a kill is a failure, not a
divergence; a damaged checkpoint or a named pipe is set aside, never resumed;
an interrupt while starting) run the suite in a process of its own, with
main.py replaced by a fake one (FAKE_MAIN) that crashes, diverges, is killed or
refuses on demand, so that every exit code is covered in seconds."""
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

import claims
import main
import runfiles
import sweep
from cnn_rnn_numpy import CNNRNN
from conftest import (REPO_ROOT, build_run_folder, edit_json, make_cifar_archive, make_run_folder,
                      wait_for_handler)


# The claims suite as sweep.py reads it: its variants, in the file's order.
CLAIMS = sweep.load_sweep(claims.CLAIMS_SWEEP)
VARIANTS = list(CLAIMS.variants)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return str(make_cifar_archive(tmp_path_factory.mktemp('cifar'), n_per_batch=50, n_test=100))


def smoke_extra(data_dir):
    return f'--data-dir {data_dir} --subset 1 --epochs 1'


def plan_lines(out):
    """{(variant, seed): action} from the plan that claims.py prints first."""
    plan = {}
    for line in out.splitlines():
        words = line.split()
        if len(words) >= 4 and words[0] in VARIANTS and words[1] == 'seed':
            plan.setdefault((words[0], int(words[2])), words[3])
    return plan


def test_the_dry_run_prints_the_plan_and_every_command_and_runs_nothing(tmp_path, capsys):
    runs = tmp_path / 'claims'
    assert claims.main(['--runs-dir', str(runs), '--dry-run']) == 0
    out = capsys.readouterr().out
    assert plan_lines(out) == {(v, s): 'run' for v in VARIANTS for s in (0, 1, 2)}
    command = 'python main.py --preset fast --subset 0.4 --set weight_decay=0 --seed 1 --out'
    assert f"{command} {runs / 'no-weight-decay-seed1'}" in out
    for options in ('--set clip=0', '--set warmup_epochs=0', '--set decay=1', '--set augment=false',
                    '--seq-layout flat', '--seq-layout rows', '--cell gru', '--cell lstm'):
        assert options in out
    assert '30 run' in out and not runs.exists()


@pytest.mark.parametrize('args, words', [
    (['--only', 'baseline', 'no-dropout'], 'unknown variant no-dropout'),
    (['--seeds', '-1'], '--seeds holds -1'),
    (['--seeds', '0', '0'], 'repeats a seed'),
    (['--extra', '--seed 3'], '--extra cannot contain --seed'),
    (['--extra', '--data-dir "x'], 'quotes'),
    (['--runs-dir', ' '], 'empty path'),
    (['--colour', 'red'], 'unrecognized arguments'),
])
def test_bad_arguments_exit_2_with_one_sentence(tmp_path, capsys, args, words):
    assert claims.main(['--runs-dir', str(tmp_path / 'c'), '--dry-run', *args]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('claims.py: ') and words in lines[0], err


def test_a_resumed_run_keeps_only_the_options_main_py_allows_on_resume(tmp_path):
    extra = shlex.split('--data-dir /d --epochs 1 --max-hours=0.5 --subset 1')
    assert sweep.resume_args(tmp_path / 'r', extra) == [
        '--resume', str(tmp_path / 'r' / 'ckpt.npz'), '--data-dir', '/d', '--max-hours=0.5']
    assert sweep.resume_args(tmp_path / 'r', [], evaluate=True)[-1] == '--evaluate'


def test_a_tiny_suite_resumes_restarts_keeps_divergence_skips_and_compares(data_dir, tmp_path, capfd,
                                                                          monkeypatch):
    runs = tmp_path / 'claims'
    extra = smoke_extra(data_dir)
    tokens = shlex.split(extra)
    # baseline seed 0: interrupted by its time budget in its first step (a checkpoint, stopped early).
    assert main.run(sweep.train_args(CLAIMS, 'baseline', 0, runs / 'baseline-seed0', 'smoke', tokens)
                    + ['--max-hours', '1e-9']) == 0
    # flat seed 1: diverged at its first step (no checkpoint, the error in train.log).
    real_loss = CNNRNN.loss

    def diverging(self, X, y, **kw):
        _, grads, details = real_loss(self, X, y, **kw)
        return float('nan'), grads, details
    monkeypatch.setattr(CNNRNN, 'loss', diverging)
    assert main.run(sweep.train_args(CLAIMS, 'flat', 1, runs / 'flat-seed1', 'smoke', tokens)) == 1
    monkeypatch.undo()
    # flat seed 0: killed in its first epoch (config.json and train.log, no checkpoint, no record).
    build_run_folder(runs / 'flat-seed0', runfiles.read_config(runs / 'flat-seed1'),
                     log=['2024-01-01 12:00:00 run flat-seed0: preset smoke'])
    capfd.readouterr()

    args = ['--runs-dir', str(runs), '--preset', 'smoke', '--only', 'baseline', 'flat', '--seeds', '0', '1',
            '--extra', extra]
    assert claims.main(args) == 0
    out, _ = capfd.readouterr()
    assert plan_lines(out) == {('baseline', 0): 'resume', ('baseline', 1): 'run',
                               ('flat', 0): 'restart', ('flat', 1): 'diverged'}
    assert 'Total wall time' in out
    for name in ('baseline-seed0', 'baseline-seed1', 'flat-seed0'):
        metrics = json.loads((runs / name / 'metrics.json').read_text())
        assert metrics['stopped_early'] is False and metrics['epochs_done'] == 1, name
    (moved,) = runs.glob('flat-seed0.failed-*')
    assert (moved / 'train.log').read_text().startswith('2024-01-01 12:00:00 run flat-seed0')
    assert not (runs / 'flat-seed1' / 'metrics.json').exists()
    record = json.loads((runs / 'comparison' / 'comparison.json').read_text())
    counts = {v['label']: (v['finished'], v['diverged']) for v in record['variants']}
    assert counts == {'baseline': (2, 0), 'seq_layout=flat': (1, 1)}
    assert [r['run'] for r in record['left_out']] == [moved.name]
    assert (runs / 'comparison' / 'comparison.md').is_file()

    # A second pass: everything is finished or diverged, nothing runs, the comparison is redone.
    finished = {name: (runs / name / 'metrics.json').read_bytes() for name in ('baseline-seed0', 'flat-seed0')}
    assert claims.main(args) == 0
    out, _ = capfd.readouterr()
    assert set(plan_lines(out).values()) == {'finished', 'diverged'} and '[1/' not in out
    assert all((runs / name / 'metrics.json').read_bytes() == b for name, b in finished.items())


def test_sigterm_stops_the_running_main_py_cleanly_and_then_the_suite(data_dir, tmp_path):
    runs = tmp_path / 'claims'
    proc = subprocess.Popen([sys.executable, 'claims.py', '--runs-dir', str(runs), '--preset', 'smoke',
                             '--only', 'baseline', '--seeds', '0', '1', '--jobs', '1', '--extra',
                             f'--data-dir {data_dir} --subset 1'],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # main.py writes config.json after installing its signal handlers, just before training.
    deadline = time.time() + 60
    while not (runs / 'baseline-seed0' / 'config.json').exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == sweep.EXIT_INTERRUPTED, output
    metrics = json.loads((runs / 'baseline-seed0' / 'metrics.json').read_text())
    assert metrics['stopped_early'] is True and 'SIGTERM' in metrics['stop_reason']
    assert not (runs / 'baseline-seed1').exists() and 'run the same command again' in output
    assert sweep.plan_run(runs / 'baseline-seed0') == {'action': 'resume', 'detail': '', 'evaluate': False}


# --------------------------------------------------------------------------
# Crashes, damaged checkpoints, pipes and interrupts, through the command line (issue 18)
# --------------------------------------------------------------------------

CLI_TIMEOUT = 120        # seconds: a hang (a named pipe read, a run retried forever) fails the test here

# A stand-in for main.py, so that the suite's handling of every exit code is tested in seconds.
# What it does for a run folder is looked up by the folder's name in $FAKE_MAIN_PLAN (JSON;
# 'finish' when absent): finish (a finished run folder, exit 0), crash (config.json, train.log
# ending in cli.report_crash's lines and crashed.json, exit 3), diverge (diverged.json, exit 1),
# kill (SIGKILL itself), refuse (exit 2). It writes through conftest's builder, as main.py writes
# through the run-folder contract.
# Every invocation's arguments are appended to $FAKE_MAIN_LOG as one JSON line.
FAKE_MAIN = r'''
import json, os, signal, sys
from pathlib import Path
sys.path[:0] = [os.environ['REPO_ROOT'], os.path.join(os.environ['REPO_ROOT'], 'tests')]
import runfiles
from conftest import build_run_folder, make_run_folder

args = sys.argv[1:]
with open(os.environ['FAKE_MAIN_LOG'], 'a') as f:
    f.write(json.dumps(args) + '\n')
def option(name, default=None):
    return args[args.index(name) + 1] if name in args else default
folder = Path(option('--out') or Path(option('--resume')).parent)
behaviour = json.loads(os.environ.get('FAKE_MAIN_PLAN', '{}')).get(folder.name, 'finish')
if behaviour == 'refuse':
    print(f'error: {folder} is refused for this test', file=sys.stderr)
    sys.exit(2)
config = runfiles.read_config(folder) if folder.is_dir() else None
if config is None:
    import config as configuration
    config = configuration.load_presets()[option('--preset', 'fast')].to_dict()
    config.update(seed=int(option('--seed', 0)), preset=option('--preset', 'fast'), description='',
                  data_dir='data', lr_changes=[])
    if '--seq-layout' in args:
        config['seq_layout'] = option('--seq-layout')
    if '--cell' in args:
        config['cell'] = option('--cell')
    for i, a in enumerate(args):
        if a == '--set':
            key, value = args[i + 1].split('=', 1)
            config[key] = json.loads(value) if value not in ('rows', 'flat', 'gru', 'lstm') else value
runfiles.Crash.remove(folder)        # as main.py does when it takes up a crashed run again
start = [f'2024-01-01 12:00:00 run {folder}: fake']
if behaviour == 'crash':
    build_run_folder(folder, config, log=start + ['crash: RuntimeError: boom', 'Traceback (most recent call last):'],
                     crash=runfiles.Crash('RuntimeError: boom', during='training'))
    print('error: main.py crashed (RuntimeError: boom)', file=sys.stderr)
    sys.exit(3)
if behaviour == 'diverge':
    build_run_folder(folder, config, log=start, divergence=runfiles.Divergence(
        epoch=1, step=1, global_step=1, lr=0.02, loss='nan',
        message='the loss became nan at epoch 1, step 1 (lr 0.02); no checkpoint was written yet'))
    sys.exit(1)
if behaviour == 'kill':
    build_run_folder(folder, config, log=start)
    os.kill(os.getpid(), signal.SIGKILL)
make_run_folder(folder.parent, folder.name, config=config, n_test=100, acc=0.5, epochs=1, ckpt=True,
                log=start + ['2024-01-01 12:00:02 test     accuracy 50.00%'])
'''


@pytest.fixture
def fake_main(tmp_path):
    """(path of the fake main.py, path of its invocation log)."""
    path, log = tmp_path / 'fake_main.py', tmp_path / 'fake_main.log'
    path.write_text(FAKE_MAIN)
    log.write_text('')
    return path, log


def claims_cli(fake, *args, plan=None, cwd=REPO_ROOT):
    """Run the claims suite in a process of its own, with main.py replaced by the fake one.

    claims.py's and sweep.py's own code runs unchanged (main(), the subprocesses, the exit code);
    only the path of the script sweep.py runs for each run (sweep.MAIN) is the fake's.
    Returns (exit code, stdout, stderr).
    """
    path, log = fake
    runner = ('import sys, claims, sweep; sweep.MAIN = sys.argv.pop(1); sys.argv[0] = "claims.py"; '
              'sys.exit(claims.main(sys.argv[1:]))')
    env = dict(os.environ, FAKE_MAIN_LOG=str(log), FAKE_MAIN_PLAN=json.dumps(plan or {}), REPO_ROOT=str(REPO_ROOT),
               PYTHONPATH=str(REPO_ROOT))
    p = subprocess.run([sys.executable, '-c', runner, str(path), *map(str, args)], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=CLI_TIMEOUT)
    return p.returncode, p.stdout, p.stderr


def invocations(fake):
    """The argument lists the fake main.py was called with, in order."""
    return [json.loads(line) for line in fake[1].read_text().splitlines()]


def result_lines(out):
    """{(variant, seed): its line of the results at the end} from claims.py's output."""
    results = out[out.index('Sweep results:'):]
    lines = {}
    for line in results.splitlines():
        words = line.split()
        if len(words) >= 3 and words[0] in VARIANTS and words[1] == 'seed':
            lines[(words[0], int(words[2]))] = line
    return lines


def test_a_crash_or_a_kill_is_a_failure_not_a_divergence_and_the_rest_still_runs(tmp_path, fake_main):
    runs = tmp_path / 'claims'
    plan = {'baseline-seed1': 'crash', 'flat-seed0': 'diverge', 'flat-seed1': 'kill'}
    args = ['--runs-dir', runs, '--only', 'baseline', 'flat', '--seeds', '0', '1']
    code, out, err = claims_cli(fake_main, *args, plan=plan)
    assert code == 3, (out, err)
    lines = result_lines(out)
    assert 'crashed (exit 3: RuntimeError: boom), a bug' in lines[('baseline', 1)]
    assert f"traceback is in {runs / 'baseline-seed1' / 'train.log'}" in lines[('baseline', 1)]
    assert 'crashed: killed by SIGKILL' in lines[('flat', 1)]
    assert 'diverged (kept as a result)' in lines[('flat', 0)] and lines[('baseline', 0)].endswith('finished')
    assert len(invocations(fake_main)) == 4, 'a crash stopped the suite, or a crashed run was tried twice'
    last = err.strip().splitlines()[-1]
    assert last.startswith('claims.py: 2 runs crashed (baseline seed 1, flat seed 1)') and 'Traceback' not in err
    record = json.loads((runs / 'comparison' / 'comparison.json').read_text())
    counts = {v['label']: (v['finished'], v['diverged']) for v in record['variants']}
    assert counts == {'baseline': (1, 0), 'seq_layout=flat': (0, 1)}, counts
    left_out = {r['run']: r['reason'] for r in record['left_out']}
    assert 'crashed (RuntimeError: boom)' in left_out['baseline-seed1'] and 'flat-seed1' in left_out

    # The next run of the suite tries the crashed and the killed run again (no checkpoint: moved
    # aside, started afresh), keeps the divergence, and now that they finish, exits 0.
    code, out, err = claims_cli(fake_main, *args)
    assert code == 0, (out, err)
    assert plan_lines(out) == {('baseline', 0): 'finished', ('baseline', 1): 'restart', ('flat', 0): 'diverged',
                               ('flat', 1): 'restart'}
    assert 'crashed earlier (RuntimeError: boom)' in out
    assert len(list(runs.glob('baseline-seed1.failed-*'))) == 1 and len(invocations(fake_main)) == 6


def test_a_crash_with_a_checkpoint_is_resumed_by_the_next_run_of_the_suite(tmp_path, fake_main):
    runs = tmp_path / 'claims'
    args = ['--runs-dir', runs, '--only', 'baseline', '--seeds', '0']
    stopped_run(runs / 'baseline-seed0', 0, crashed='MemoryError: ')
    code, out, err = claims_cli(fake_main, *args, plan={'baseline-seed0': 'crash'})
    assert code == 3 and plan_lines(out) == {('baseline', 0): 'resume'}, (out, err)
    assert invocations(fake_main)[-1][:2] == ['--resume', str(runs / 'baseline-seed0' / 'ckpt.npz')]
    code, out, err = claims_cli(fake_main, *args)
    assert code == 0 and plan_lines(out) == {('baseline', 0): 'resume'}, (out, err)


def stopped_run(folder, seed, crashed=None):
    """A run folder of the baseline variant stopped early by its time budget: a readable ckpt.npz,
    metrics.json with stopped_early (and with crashed, a crashed.json); the suite would resume it."""
    return make_run_folder(folder.parent, folder.name, seed, ckpt=True, stopped_early=True, crashed=crashed)


# How each seed's run folder is damaged: the plan's action, and words its line of the results must hold.
DAMAGES = {
    'truncated checkpoint': ('damaged', 'ckpt.npz is damaged or was not written by main.py'),
    'checkpoint with NaN weights': ('damaged', 'values that are not finite'),
    'checkpoint meta not JSON': ('damaged', 'unreadable meta'),
    'checkpoint is a .npy': ('damaged', 'not an .npz archive'),
    'train.log is a pipe': ('damaged', 'train.log: it is a named pipe (FIFO)'),
    'metrics.json is a pipe': ('damaged', 'metrics.json: it is a named pipe (FIFO)'),
    '.lock is a pipe': ('damaged', '.lock: it is a named pipe (FIFO)'),
    'ckpt.npz is a pipe': ('damaged', 'ckpt.npz: it is a named pipe (FIFO)'),
    'config.json edited': ('inconsistent', 'weight_decay: 0 in config.json, 0.0005 in ckpt.npz'),
    'finished, config.json edited': ('inconsistent', 'weight_decay: 0 in config.json, 0.0005 in ckpt.npz'),
    'finished, NaN test accuracy': ('inconsistent', 'test_acc'),
}


def damage(folder, how):
    """Damage a stopped run folder in one of the ways of DAMAGES."""
    if how.startswith('finished'):         # a finished run instead, with all its files
        shutil.rmtree(folder)
        make_run_folder(folder.parent, folder.name, int(folder.name[-1]), ckpt=True)
    if how == 'truncated checkpoint':
        (folder / 'ckpt.npz').write_bytes((folder / 'ckpt.npz').read_bytes()[:200])
    elif how == 'checkpoint with NaN weights':
        arrays = runfiles.read_npz(folder / 'ckpt.npz')
        runfiles.write_npz(folder / 'ckpt.npz', dict(arrays, **{'param/b_o': np.full(10, np.nan, np.float32)}))
    elif how == 'checkpoint meta not JSON':
        runfiles.write_npz(folder / 'ckpt.npz', {'meta': np.array('{not json')})
    elif how == 'checkpoint is a .npy':
        with open(folder / 'ckpt.npz', 'wb') as f:
            np.save(f, np.zeros(3))
    elif how.endswith('config.json edited'):
        edit_json(folder / 'config.json', weight_decay=0)
    elif how.endswith('NaN test accuracy'):
        edit_json(folder / 'metrics.json', test_acc=float('nan'))
    else:                          # a named pipe where one of the run's files should be
        name = how.split()[0]
        (folder / name).unlink(missing_ok=True)
        os.mkfifo(folder / name)


def test_a_damaged_run_is_set_aside_never_resumed_and_the_fix_it_names_works(tmp_path, fake_main):
    runs = tmp_path / 'claims'
    for seed, how in enumerate(DAMAGES):
        stopped_run(runs / f'baseline-seed{seed}', seed)
        damage(runs / f'baseline-seed{seed}', how)
    args = ['--runs-dir', runs, '--only', 'baseline', '--seeds', *range(len(DAMAGES))]
    code, out, err = claims_cli(fake_main, *args)
    assert code == 2, (out, err)
    assert invocations(fake_main) == [], 'a damaged run was given to main.py'
    lines = result_lines(out)
    for seed, (how, (action, words)) in enumerate(DAMAGES.items()):
        assert plan_lines(out)[('baseline', seed)] == action, (how, out)
        assert words in lines[('baseline', seed)], (how, out)
        if action == 'damaged':
            assert '--resume' not in lines[('baseline', seed)], (how, out)
    assert 'continues it' not in out and 'Traceback' not in err
    assert err.strip().splitlines()[-1].startswith(f'claims.py: {len(DAMAGES)} runs could not be run')
    # The fix each damaged checkpoint's line names, typed as it is: the run is moved aside, and the
    # next run of the suite starts it afresh.
    for seed, how in enumerate(list(DAMAGES)[:4]):
        line = lines[('baseline', seed)]
        move = shlex.split(line[line.index('mv '):].split(' and run the sweep again')[0])
        assert subprocess.run(move, timeout=CLI_TIMEOUT).returncode == 0, line
    code, out, err = claims_cli(fake_main, *args[:-len(DAMAGES)], 0, 1, 2, 3)
    assert code == 0 and set(plan_lines(out).values()) == {'run'}, (out, err)
    assert len(invocations(fake_main)) == 4 and len(list(runs.glob('baseline-seed*.damaged'))) == 4


def test_a_resume_that_main_py_refuses_is_a_failure_not_a_promise(tmp_path, fake_main):
    runs = tmp_path / 'claims'
    args = ['--runs-dir', runs, '--only', 'baseline', '--seeds', '0']
    stopped_run(runs / 'baseline-seed0', 0)
    code, out, err = claims_cli(fake_main, *args, plan={'baseline-seed0': 'refuse'})
    assert code == 2, (out, err)
    line = result_lines(out)[('baseline', 0)]
    assert 'refused by main.py (exit 2' in line and 'resume it' not in line
    # main.py's output went to the run's .out file; its last line, the reason, is quoted.
    assert f"refused by main.py (exit 2: error: {runs / 'baseline-seed0'} is refused for this test)" in line
    assert 'is refused for this test' in (runs / 'baseline-seed0.out').read_text()


def test_a_folder_without_a_checkpoint_is_moved_aside_never_answered_with_resume(tmp_path, fake_main):
    runs = tmp_path / 'claims'
    folder = build_run_folder(runs / 'baseline-seed0', {}, log=['2024-01-01 12:00:00 run x: preset fast'])
    code, out, err = claims_cli(fake_main, '--runs-dir', runs, '--only', 'baseline', '--seeds', '0', '--dry-run')
    assert code == 0 and plan_lines(out) == {('baseline', 0): 'restart'} and '--resume' not in out, out
    assert f'moves {folder} aside to baseline-seed0.failed-<timestamp>, then runs' in out
    code, out, err = claims_cli(fake_main, '--runs-dir', runs, '--only', 'baseline', '--seeds', '0')
    assert code == 0 and invocations(fake_main)[-1][-2:] == ['--out', str(folder)], (out, err)
    (moved,) = runs.glob('baseline-seed0.failed-*')
    assert (moved / 'train.log').is_file()


@pytest.mark.skipif(not Path('/proc/self/status').exists(), reason='needs /proc')
@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_while_starting_ends_with_one_line_and_exit_130(tmp_path, signum):
    proc = subprocess.Popen([sys.executable, 'claims.py', '--runs-dir', str(tmp_path / 'c'), '--dry-run'],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for_handler(proc), 'claims.py never installed its start-up interrupt handler'
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=CLI_TIMEOUT)
    finally:
        proc.kill()
    assert proc.returncode == 130, (proc.returncode, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f'interrupted by {signal.Signals(signum).name}' in lines[0], err


def test_bad_arguments_through_the_command_line(tmp_path):
    (tmp_path / 'a-file').write_text('x')
    for args, words in (([], '--runs-dir was given an empty path'), (['--seeds', '0', '0'], 'repeats a seed')):
        p = subprocess.run([sys.executable, 'claims.py', '--runs-dir', '' if not args else str(tmp_path), *args],
                           cwd=REPO_ROOT, capture_output=True, text=True, timeout=CLI_TIMEOUT)
        assert p.returncode == 2 and p.stderr.strip() == p.stderr.strip().splitlines()[0] and words in p.stderr
    make_run_folder(tmp_path / 'runs', 'a-run', ckpt=True)
    (tmp_path / 'runs' / 'latest').symlink_to('a-run')
    for runs_dir, words in (('a-file', '--runs-dir a-file is not a folder'),
                            ('runs/latest', '--runs-dir runs/latest is a run folder'),
                            ('runs/latest/claims', 'is inside the run folder')):
        p = subprocess.run([sys.executable, str(REPO_ROOT / 'claims.py'), '--runs-dir', runs_dir, '--dry-run'],
                           cwd=tmp_path, capture_output=True, text=True, timeout=CLI_TIMEOUT)
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and words in p.stderr, p.stderr
    assert not (tmp_path / 'runs' / 'a-run' / 'claims').exists()


def test_an_unexpected_error_is_a_crash_with_exit_3_and_one_line(tmp_path, capsys, monkeypatch):
    def broken(*args):
        raise ZeroDivisionError('a bug')
    monkeypatch.setattr(sweep, 'make_plan', broken)
    assert claims.main(['--runs-dir', str(tmp_path / 'c'), '--dry-run']) == 3
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and 'claims.py crashed (ZeroDivisionError: a bug)' in err
