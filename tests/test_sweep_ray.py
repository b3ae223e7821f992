"""sweep.py --ray end to end, through the real command line on a synthetic archive.

Each test runs `python sweep.py SWEEP --ray ...` as a subprocess in a session of its own (so a
SIGINT to its process group is what Ctrl-C in a terminal sends: the driver and Ray's own
processes; Ray's workers have process groups of their own). Its environment carries a tag unique
to the test, which every process it starts inherits (Ray's gcs_server and raylet, the workers,
main.py): that is how a test finds the main.py of a run, and checks that nothing is left running
once the sweep has ended.

    a  a 4-run sweep on a local Ray instance equals the same runs made locally, bit for bit
    b  a Ray worker killed mid-run: Ray tries the run again, the sweep ends well, the same result
    c  Ctrl-C: exit 130, no half-placed folder; the same command then finishes the sweep
    d  refusals (exit 2, one line) before any Ray instance starts, and no hang on a dead address
    e  the work folders of killed tasks are cleaned up, busy ones kept (no Ray needed)
    f  a worker's main.py dies with the worker (PR_SET_PDEATHSIG; no Ray needed)

Ray's local start costs seconds, so each test starts as few sweeps as it can.
"""
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import ray    # requirements-dev.txt installs Ray: without it this file must fail, not skip

import sweep
from conftest import REPO_ROOT, make_cifar_archive

TAG = 'CNNRNN_TEST_RAY_TAG'
SWEEP_TIMEOUT = 300          # seconds; a sweep here takes 10-40 s on 2 busy cores
REFUSAL_TIMEOUT = 60
# What every finished run folder holds (besides .lock, which stays on the worker).
RUN_FILES = {'config.json', 'history.json', 'train.log', 'ckpt.npz', 'best.npz', 'metrics.json',
             'predictions.npz'}
# The keys that are times or speeds: the only ones allowed to differ between two runs.
METRICS_TIMES = {'wall_time_s', 'train_images_per_s', 'test_images_per_s', 'time_to_val_acc'}
HISTORY_TIMES = {'epoch_time_s', 'images_per_s', 'elapsed_s'}


# --------------------------------------------------------------------------
# Processes, sweeps, run folders
# --------------------------------------------------------------------------

def tagged_processes(tag):
    """{pid: (ppid, argv, cwd)} of the live (not zombie) processes whose environment holds the tag."""
    needle = f'{TAG}={tag}'.encode()
    found = {}
    for entry in os.scandir('/proc'):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            with open(f'/proc/{pid}/environ', 'rb') as f:
                if needle not in f.read().split(b'\0'):
                    continue
            with open(f'/proc/{pid}/stat') as f:
                state, ppid = f.read().rsplit(')', 1)[1].split()[:2]
            with open(f'/proc/{pid}/cmdline', 'rb') as f:
                argv = [a.decode('utf-8', 'replace') for a in f.read().split(b'\0')[:-1]]
            cwd = os.readlink(f'/proc/{pid}/cwd')
        except OSError:          # ended meanwhile, or not ours to read
            continue
        if state not in 'ZX':
            found[pid] = (int(ppid), argv, cwd)
    return found


def worker_main_processes(tag):
    """{pid: (ppid, argv, cwd)} of the main.py processes that Ray workers started: they train in
    a temporary work folder, not in the repository or a runs dir."""
    return {pid: p for pid, p in tagged_processes(tag).items()
            if len(p[1]) > 1 and Path(p[1][1]).name == 'main.py'
            and Path(p[2]).name.startswith(sweep.WORK_PREFIX)}


def wait_until_gone(tag, seconds=20.0):
    """The tagged processes still alive after waiting up to ``seconds`` for them to end."""
    deadline = time.monotonic() + seconds
    while True:
        left = tagged_processes(tag)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def alive(pid):
    """True while the process runs (a zombie has ended: only its parent has not reaped it yet)."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] not in 'ZX'
    except OSError:
        return False


def work_folders():
    return set(Path(tempfile.gettempdir()).glob(sweep.WORK_PREFIX + '*'))


@pytest.fixture
def env(tmp_path):
    """The environment of a test's sweeps: the test's tag, and a data cache of its own. Afterwards:
    nothing tagged may be left running (Ray's processes, workers, main.py), and the work folders
    of tasks the test killed are removed."""
    tag = uuid.uuid4().hex
    before = work_folders()
    environment = dict(os.environ, **{TAG: tag, sweep.DATA_CACHE_ENV: str(tmp_path / 'data-cache')})
    # A sweep that joined this instead of starting its own local instance would fail.
    environment['RAY_ADDRESS'] = '127.0.0.1:1'
    yield environment
    left = wait_until_gone(tag)
    for pid in left:             # the test's own processes: started by its sweeps
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    for folder in work_folders() - before:
        sweep.remove_if_abandoned(folder, min_age=5.0)   # 60 s in sweep.py: a task locks its folder at once
    assert not left, f'processes left running after the sweep ended: {[" ".join(p[1])[:120] for p in left.values()]}'


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return make_cifar_archive(tmp_path_factory.mktemp('ray-data'))


def write_sweep(path, epochs, variants, seeds):
    path.write_text(json.dumps({'description': 'sweep.py --ray test', 'preset': 'smoke',
                                'set': {'subset': 1, 'epochs': epochs}, 'seeds': seeds,
                                'variants': variants}))
    return path


class Sweep:
    """sweep.py running in a session of its own; stdout and stderr go to files."""

    def __init__(self, tmp_path, name, args, env):
        self.name = name
        self.stdout_path, self.stderr_path = tmp_path / f'{name}.stdout', tmp_path / f'{name}.stderr'
        with open(self.stdout_path, 'w') as out, open(self.stderr_path, 'w') as err:
            self.proc = subprocess.Popen([sys.executable, 'sweep.py', *map(str, args)], cwd=REPO_ROOT, env=env,
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True)
        self.started = time.monotonic()

    @property
    def stdout(self):
        return self.stdout_path.read_text()

    @property
    def stderr(self):
        return self.stderr_path.read_text()

    def output(self):
        return f'--- {self.name} stdout:\n{self.stdout[-3000:]}\n--- stderr:\n{self.stderr[-3000:]}'

    def wait(self, timeout=SWEEP_TIMEOUT):
        """Its exit code; the test fails (and the sweep is killed) if it takes longer than timeout."""
        try:
            return self.proc.wait(timeout=max(0.1, timeout - (time.monotonic() - self.started)))
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)      # its own session: the driver and Ray's processes
            self.proc.wait()
            pytest.fail(f'sweep.py did not end within {timeout} s\n{self.output()}')


def sweep_args(sweep_file, runs_dir, data_dir, *where):
    return [sweep_file, *where, '--runs-dir', runs_dir, '--extra', f'--data-dir {shlex.quote(str(data_dir))}']


def without(record, keys):
    return {k: v for k, v in record.items() if k not in keys}


def assert_same_run(got, expected):
    """Two run folders of the same configuration hold the same results: the same files, metrics
    and history but for times, the same configuration but for the data folder, and every array
    of every .npz file bit for bit (the checkpoints' metadata, which holds times, aside)."""
    names = {p.name for p in got.iterdir()}
    assert names == {p.name for p in expected.iterdir()} - {'.lock'}, (got, expected)
    assert RUN_FILES <= names, f'{got} lacks {RUN_FILES - names}'

    def read(folder, name):
        return json.loads((folder / name).read_text())
    metrics = read(got, 'metrics.json')
    assert METRICS_TIMES <= set(metrics), 'main.py renamed a timing key: update METRICS_TIMES'
    assert without(metrics, METRICS_TIMES) == without(read(expected, 'metrics.json'), METRICS_TIMES), got
    assert ([without(r, HISTORY_TIMES) for r in read(got, 'history.json')]
            == [without(r, HISTORY_TIMES) for r in read(expected, 'history.json')]), got
    assert without(read(got, 'config.json'), {'data_dir'}) == without(read(expected, 'config.json'), {'data_dir'})
    for name in sorted(n for n in names if n.endswith('.npz')):
        with np.load(got / name) as a, np.load(expected / name) as b:
            assert sorted(a.files) == sorted(b.files), (got / name)
            for key in a.files:
                if key != 'meta':
                    assert (a[key].dtype, a[key].shape, a[key].tobytes()) == \
                        (b[key].dtype, b[key].shape, b[key].tobytes()), f'{got / name}: {key} differs'


def result_line(stdout, variant, seed):
    """The line of sweep.py's results table for a run."""
    lines = stdout.split('\nSweep results:\n', 1)[1].splitlines()
    return next(line for line in lines if line.split()[:3] == [variant, 'seed', str(seed)])


def work_folder_named_in(run):
    """The worker's temporary folder a run trained in, as its train.log names it."""
    first = (run / 'train.log').read_text().splitlines()[0]
    return next(Path(word.rstrip(':')).parent for word in first.split() if sweep.WORK_PREFIX in word)


def test_the_installed_ray_is_one_requirements_ray_txt_allows():
    least = re.search(r'^ray>=([\d.]+)', (REPO_ROOT / 'requirements-ray.txt').read_text(), re.M).group(1)

    def version(text):
        return tuple(int(part) for part in re.findall(r'\d+', text)[:3])
    assert version(ray.__version__) >= version(least), (ray.__version__, least)


# --------------------------------------------------------------------------
# a. A sweep on Ray equals the same runs made locally
# --------------------------------------------------------------------------

def test_a_ray_sweep_equals_the_same_runs_made_locally(tmp_path, env, data_dir):
    sweep_file = write_sweep(tmp_path / 'smoke.json', epochs=1, variants={'base': {}, 'gru': {'cell': 'gru'}},
                             seeds=[0, 1])
    runs = [f'{v}-seed{s}' for v in ('base', 'gru') for s in (0, 1)]
    on_ray, here = tmp_path / 'on-ray', tmp_path / 'here'
    # Side by side: a run's result depends on its threads, never on what runs beside it.
    ray_sweep = Sweep(tmp_path, 'ray', sweep_args(sweep_file, on_ray, data_dir, '--ray', '--threads', 1), env)
    local = Sweep(tmp_path, 'local', sweep_args(sweep_file, here, data_dir, '--jobs', 1, '--threads', 1), env)
    assert ray_sweep.wait() == 0, ray_sweep.output()
    assert local.wait() == 0, local.output()

    assert 'on Ray (a local instance)' in ray_sweep.stdout
    for run in runs:
        assert_same_run(on_ray / run, here / run)
        assert 'finished' in result_line(ray_sweep.stdout, *run.split('-seed'))
        # The console output came back into <run>.out, under a header naming the run's own folders.
        log = (on_ray / f'{run}.out').read_text()
        headers = [line for line in log.splitlines() if line.startswith('=== ')]
        assert len(headers) == 1 and f'--out {on_ray / run} ' in headers[0], log[:500]
        accuracy = [line for line in log.splitlines() if line.startswith('test     accuracy')]
        assert accuracy and accuracy == [line for line in (here / f'{run}.out').read_text().splitlines()
                                         if line.startswith('test     accuracy')], log
        assert not work_folder_named_in(on_ray / run).exists(), 'a worker left its temporary folder behind'
    assert not [p.name for p in on_ray.iterdir() if p.name.startswith('.')], 'a hidden .incoming folder is left'
    assert (on_ray / 'comparison' / 'comparison.md').is_file()
    # The archive went once through Ray's object store into the workers' cache, by its sha256.
    cached = list(Path(env[sweep.DATA_CACHE_ENV]).glob('*/cifar-10-python.tar.gz'))
    assert [p.read_bytes() for p in cached] == [(data_dir / 'cifar-10-python.tar.gz').read_bytes()]


# --------------------------------------------------------------------------
# b. A worker killed mid-run: the run is tried again, with the same result
# --------------------------------------------------------------------------

def test_b_a_run_whose_worker_is_killed_is_run_again_with_the_same_result(tmp_path, env, data_dir):
    # 3 epochs: the run is still training for a few seconds after its first checkpoint.
    sweep_file = write_sweep(tmp_path / 'one.json', epochs=3, variants={'base': {}}, seeds=[0])
    on_ray, here = tmp_path / 'on-ray', tmp_path / 'here'
    ray_sweep = Sweep(tmp_path, 'ray', sweep_args(sweep_file, on_ray, data_dir, '--ray', '--threads', 1), env)
    local = Sweep(tmp_path, 'local', sweep_args(sweep_file, here, data_dir, '--jobs', 1, '--threads', 1), env)

    killed = None
    while killed is None and ray_sweep.proc.poll() is None and time.monotonic() - ray_sweep.started < SWEEP_TIMEOUT:
        for pid, (worker, argv, cwd) in worker_main_processes(env[TAG]).items():
            run = Path(cwd) / 'run'
            if (run / 'ckpt.npz').exists() and not (run / 'metrics.json').exists():    # mid-run
                title = tagged_processes(env[TAG]).get(worker, (0, ['?'], ''))[1]
                assert title and title[0].startswith('ray::'), f'the parent of main.py is not a Ray worker: {title}'
                os.kill(worker, signal.SIGKILL)
                killed = pid, Path(cwd)
                break
        time.sleep(0.05)
    assert killed is not None, f'main.py was never seen training on a Ray worker\n{ray_sweep.output()}'
    main_pid, work = killed
    deadline = time.monotonic() + 10
    while alive(main_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(main_pid), 'main.py outlived its killed worker'

    assert ray_sweep.wait() == 0, ray_sweep.output()
    assert local.wait() == 0, local.output()
    # An orphaned main.py would have trained on to the end in the dead task's folder.
    assert not (work / 'run' / 'metrics.json').exists(), 'main.py went on training after its worker died'
    placed = on_ray / 'base-seed0'
    assert 'finished' in result_line(ray_sweep.stdout, 'base', 0)
    # Made by the second try, in a work folder of its own, from the start.
    assert work_folder_named_in(placed) != work
    assert [r['epoch'] for r in json.loads((placed / 'history.json').read_text())] == [1, 2, 3]
    assert_same_run(placed, here / 'base-seed0')
    assert not [p.name for p in on_ray.iterdir() if p.name.startswith('.')]


# --------------------------------------------------------------------------
# c. Ctrl-C cancels the tasks; the same command then finishes the sweep
# --------------------------------------------------------------------------

def test_c_ctrl_c_cancels_the_tasks_and_the_same_command_then_finishes_the_sweep(tmp_path, env, data_dir):
    # 2 epochs: long enough that Ctrl-C, sent as soon as a run trains, finds at least one running.
    sweep_file = write_sweep(tmp_path / 'two.json', epochs=2, variants={'base': {}}, seeds=[0, 1])
    runs_dir = tmp_path / 'on-ray'
    args = sweep_args(sweep_file, runs_dir, data_dir, '--ray', '--threads', 1)
    first = Sweep(tmp_path, 'interrupted', args, env)
    while not worker_main_processes(env[TAG]):
        assert first.proc.poll() is None and time.monotonic() - first.started < SWEEP_TIMEOUT, \
            f'no main.py was seen running on a Ray worker\n{first.output()}'
        time.sleep(0.05)
    training = worker_main_processes(env[TAG])
    os.killpg(first.proc.pid, signal.SIGINT)        # Ctrl-C: the terminal signals the foreground group
    assert first.wait() == 130, first.output()
    assert 'stopped (SIGINT)' in first.stderr

    cancelled = 0
    for seed in (0, 1):
        line, folder = result_line(first.stdout, 'base', seed), runs_dir / f'base-seed{seed}'
        if 'cancelled (SIGINT)' in line:
            cancelled += 1
            assert not folder.exists() and not (runs_dir / f'base-seed{seed}.out').exists(), line
        else:             # it ended before the signal: placed whole
            assert 'finished' in line and (folder / 'metrics.json').is_file(), line
    assert cancelled >= 1, first.stdout
    assert not [p.name for p in runs_dir.iterdir() if p.name.startswith('.')], 'a half-placed folder is left'
    # The cancelled tasks' workers were killed, and their main.py with them; Ray shut down.
    left = wait_until_gone(env[TAG])
    assert not left, [' '.join(p[1])[:120] for p in left.values()]
    for _, _, work in training.values():     # an orphaned main.py would have trained on to the end
        assert not (Path(work) / 'run' / 'metrics.json').exists(), 'main.py went on after its task was cancelled'

    again = Sweep(tmp_path, 'again', args, env)
    assert again.wait() == 0, again.output()
    for seed in (0, 1):
        assert 'finished' in result_line(again.stdout, 'base', seed)
        assert (runs_dir / f'base-seed{seed}' / 'metrics.json').is_file()


# --------------------------------------------------------------------------
# d. Refusals: exit 2 and one sentence, before any Ray instance starts
# --------------------------------------------------------------------------

@pytest.mark.parametrize('case', ['--jobs', 'no archive', 'nobody listens'])
def test_d_refusals_are_one_line_and_start_no_ray(case, tmp_path, env, data_dir):
    sweep_file = write_sweep(tmp_path / 'one.json', epochs=1, variants={'base': {}}, seeds=[0])
    empty = tmp_path / 'empty'
    empty.mkdir()
    where, data, says = {
        '--jobs': (['--ray', '--jobs', 2], data_dir, '--jobs is for runs on this machine'),
        'no archive': (['--ray'], empty, f'put cifar-10-python.tar.gz in {empty}'),
        'nobody listens': (['--ray', '127.0.0.1:1'], data_dir, 'ray start --head'),
    }[case]
    refused = Sweep(tmp_path, 'refused', sweep_args(sweep_file, tmp_path / 'runs', data, *where), env)
    others = set()
    while refused.proc.poll() is None and time.monotonic() - refused.started < REFUSAL_TIMEOUT:
        others |= set(tagged_processes(env[TAG])) - {refused.proc.pid}   # Ray's would be its children
        time.sleep(0.05)
    assert refused.wait(timeout=REFUSAL_TIMEOUT) == 2, refused.output()
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('sweep.py: ') and says in lines[0], refused.output()
    assert not others, 'a Ray instance was started'
    assert time.monotonic() - refused.started < 30, 'the refusal took as long as a Ray start, or longer'
    assert not (tmp_path / 'runs' / 'base-seed0').exists()


# --------------------------------------------------------------------------
# e. The work folders of killed tasks are removed by the next task on the machine
# --------------------------------------------------------------------------

def test_e_abandoned_work_folders_are_removed_and_busy_or_new_ones_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path))
    busy, killed, lockless, new = (tmp_path / f'{sweep.WORK_PREFIX}{name}' for name in
                                   ('busy', 'killed', 'lockless', 'new'))
    for folder in (busy, killed, lockless, new):
        (folder / 'run').mkdir(parents=True)
    (killed / '.lock').touch()       # its task was killed: nobody holds the lock
    # lockless: its task was killed between making the folder and its lock file
    an_hour_ago = time.time() - 3600
    with sweep.held_lock(busy / '.lock'):
        for folder in (busy, killed, lockless):
            os.utime(folder, (an_hour_ago, an_hour_ago))
        sweep.remove_abandoned_work_folders()
        assert busy.is_dir() and new.is_dir(), 'a folder in use (or too new to be locked yet) was removed'
        assert not killed.exists() and not lockless.exists()


# --------------------------------------------------------------------------
# f. main.py dies with the worker that started it
# --------------------------------------------------------------------------

def test_f_the_run_process_dies_with_the_worker_that_started_it():
    """The python -c start of a worker's main.py (PR_SET_PDEATHSIG), in a parent of our own: killing
    the parent kills the run. (On a local Ray instance the raylet also kills a dead worker's process
    group, which test b cannot tell apart; this covers a worker dying without its raylet's help.)"""
    starter = ('import os, subprocess, sys\n'
               'child = subprocess.Popen([sys.executable, "-c", sys.argv[1], str(os.getpid()),\n'
               '                          "-c", "import time; time.sleep(120)"])\n'
               'print(child.pid, flush=True)\n'
               'child.wait()\n')
    parent = subprocess.Popen([sys.executable, '-c', starter, sweep._die_with_parent_then_exec()],
                              stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        deadline = time.monotonic() + 30
        while b'time.sleep(120)' not in Path(f'/proc/{child}/cmdline').read_bytes():   # until it has become the run
            assert time.monotonic() < deadline and alive(child), 'the start never became the run'
            time.sleep(0.02)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 5
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(child), 'the run outlived the worker that started it'
    finally:
        if alive(child):
            os.kill(child, signal.SIGKILL)
        parent.kill()
        parent.wait()
        parent.stdout.close()
