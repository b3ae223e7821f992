"""Tests of sweep.py on this machine (issue 22): the sweep file is checked before anything runs,
choose_jobs picks runs x threads within the CPUs, two runs at a time give exactly the results of
one at a time, the progress, the results and the comparison against the sweep's baseline, a
second pass that runs nothing, SIGTERM to a sweep of two running runs, and the project's own
sweep files (sweeps/claims.json, sweeps/levers.json, sweeps/deep-levers.json,
sweeps/deep-levers-2.json, sweeps/deep-weight-decay.json, sweeps/deep-head.json,
sweeps/deep-head-2.json, sweeps/deep-readout.json, sweeps/deep-bn.json).

The runs are real main.py processes on a tiny synthetic archive (90 training images, 1 epoch);
the sweeps whose comparison another test checks replace compare.main by a recorder, to keep the
module fast. sweep.py's handling of crashed, damaged and diverged run folders is tested through
claims.py (tests/test_claims.py), which is sweep.py with sweeps/claims.json.
"""
import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import claims
import compare
import runfiles
import sweep
from conftest import REPO_ROOT, make_cifar_archive
from fast_layers import THREADS_ENV

CLI_TIMEOUT = 120       # seconds: a hang (a named pipe read, a run that never ends) fails the test here

# metrics.json's keys measured by a clock (main.py's final_evaluation): they differ between two
# runs of the same computation; every other key must be equal.
TIMING_METRICS = ('wall_time_s', 'train_images_per_s', 'test_images_per_s', 'time_to_val_acc')
# history.json's keys measured by a clock (runfiles.EpochRecord).
TIMING_HISTORY = ('epoch_time_s', 'images_per_s', 'elapsed_s')

# 2 variants x 2 seeds of one epoch of `smoke`; the baseline is the second variant, so that
# "the first variant" and "the sweep's baseline" are told apart.
SMOKE_SWEEP = {
    'description': 'a tiny sweep for the tests',
    'preset': 'smoke',
    'set': {'subset': 1, 'epochs': 1},
    'seeds': [0, 1],
    'baseline': 'gru',
    'variants': {'rnn': {}, 'gru': {'cell': 'gru'}},
}
RUN_NAMES = ['rnn-seed0', 'rnn-seed1', 'gru-seed0', 'gru-seed1']


@pytest.fixture(scope='module')
def tiny_data(tmp_path_factory):
    """A synthetic archive of 100 training (90 train / 10 val) and 20 test images."""
    return make_cifar_archive(tmp_path_factory.mktemp('cifar'), n_per_batch=20, n_test=20)


def write_sweep(path, data=None, text=None):
    """A sweep file holding ``data`` as JSON (or ``text`` as it is); returns its path."""
    path = Path(path)
    path.write_text(json.dumps(data) if text is None else text)
    return path


def sweep_in_process(argv):
    """sweep.main(argv) in this process; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = sweep.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def plan_lines(out, variants):
    """{(variant, seed): action} from the plan sweep.py prints first."""
    plan = {}
    for line in out.splitlines():
        words = line.split()
        if len(words) >= 4 and words[0] in variants and words[1] == 'seed':
            plan.setdefault((words[0], int(words[2])), words[3])
    return plan


PROGRESS_LINE = re.compile(r'\[(\d+)/(\d+)\] (\S+) seed (\d+)(?: started: (.*)|: (.*))$')


def progress_events(out):
    """[(kind, 'variant-seedK', text)] of the per-run lines in order; kind 'started' or 'ended',
    text the command started or the result."""
    events = []
    for line in out.splitlines():
        m = PROGRESS_LINE.fullmatch(line.strip())
        if m:
            started = m.group(5) is not None
            events.append(('started' if started else 'ended', f'{m.group(3)}-seed{m.group(4)}',
                           m.group(5) if started else m.group(6)))
    return events


def most_running(events):
    """The most runs running at once, by the started / ended lines."""
    running = most = 0
    for kind, _, _ in events:
        running += 1 if kind == 'started' else -1
        most = max(most, running)
    return most


def result_lines(out):
    """{'variant-seedK': its line of the results table}."""
    table = out[out.index('Sweep results:'):]
    lines = {}
    for line in table.splitlines()[1:]:
        words = line.split()
        if len(words) >= 3 and words[1] == 'seed':
            lines[f'{words[0]}-seed{words[2]}'] = line
    return lines


def log_times(folder):
    """(first, last) timestamp of a run's train.log, as 'YYYY-mm-dd HH:MM:SS' (sortable)."""
    stamps = [line[:19] for line in (Path(folder) / runfiles.LOG_NAME).read_text().splitlines()
              if re.match(r'\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ', line)]
    return stamps[0], stamps[-1]


def npz_arrays(path):
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files if k != 'meta'}


def without(record, keys):
    return {k: v for k, v in record.items() if k not in keys}


def one_line_of_stderr(err, prog='sweep.py'):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f'{prog}: '), err
    assert 'Traceback' not in err
    return lines[0]


# --------------------------------------------------------------------------
# a. A bad sweep file: one sentence, exit 2, before anything runs
# --------------------------------------------------------------------------

GOOD = {'preset': 'smoke', 'seeds': [0, 1], 'variants': {'a': {}, 'b': {'cell': 'gru'}}}

BAD_SWEEPS = {
    'unknown top-level key': (dict(GOOD, colour='red'), "unknown key 'colour'"),
    'unknown preset key in a variant': (dict(GOOD, variants={'a': {'dropout': 0.5}}),
                                        "variant 'a' has an unknown key 'dropout'"),
    'unknown preset key in set': (dict(GOOD, set={'dropout': 0.5}), '"set" has an unknown key \'dropout\''),
    'negative lr': (dict(GOOD, variants={'a': {'lr': -1}}), "variant 'a': lr = -1 is invalid"),
    'unknown cell': (dict(GOOD, variants={'a': {'cell': 'transformer'}}), "cell = 'transformer' is invalid"),
    'bad value in set': (dict(GOOD, set={'epochs': 0}), 'epochs = 0 is invalid'),
    'NaN as a value': ('{"preset": "smoke", "seeds": [0], "variants": {"a": {"lr": NaN}}}', 'NaN is not a number'),
    'unknown preset': (dict(GOOD, preset='nope'), "unknown preset 'nope'"),
    'preset not a string': (dict(GOOD, preset=['smoke']), "'preset' must be a string"),
    'a variant named twice': ('{"preset": "smoke", "seeds": [0], "variants": {"a": {}, "a": {"lr": 0.1}}}',
                              "the name 'a' appears twice"),
    'no seeds': (dict(GOOD, seeds=[]), '"seeds" must be a non-empty list'),
    'seeds not a list': (dict(GOOD, seeds=0), '"seeds" must be a non-empty list'),
    'a repeated seed': (dict(GOOD, seeds=[1, 2, 1]), '"seeds" repeats a seed'),
    'a negative seed': (dict(GOOD, seeds=[-1]), '"seeds" holds -1'),
    'a seed above the range': (dict(GOOD, seeds=[2 ** 32]), f'"seeds" holds {2 ** 32}'),
    'a seed that is not an integer': (dict(GOOD, seeds=[1.5]), '"seeds" holds 1.5'),
    'a seed that is a boolean': (dict(GOOD, seeds=[True]), '"seeds" holds True'),
    'seed set in a variant': (dict(GOOD, variants={'a': {'seed': 3}}), 'variant \'a\' sets "seed"'),
    'seed set for every run': (dict(GOOD, set={'seed': 3}), '"set" sets "seed"'),
    'baseline naming no variant': (dict(GOOD, baseline='c'), '"baseline" names \'c\', which is not a variant'),
    'no variants': (dict(GOOD, variants={}), '"variants" must be a non-empty object'),
    'variants not an object': (dict(GOOD, variants=['a']), '"variants" must be a non-empty object'),
    'a variant not an object': (dict(GOOD, variants={'a': 3}), "variant 'a' must be an object"),
    'a variant name that cannot name a folder': (dict(GOOD, variants={'a/b': {}}), "variant name 'a/b'"),
    'about an unknown variant': (dict(GOOD, about={'c': 'text'}), '"about" describes \'c\''),
    'blank runs_dir': (dict(GOOD, runs_dir=' '), '"runs_dir" is blank'),
    'no variants key': ({'preset': 'smoke', 'seeds': [0]}, "lacks 'variants'"),
    'not JSON': ('{"preset": "smoke",', 'is not valid JSON'),
    'an empty file': ('', 'is not valid JSON'),
    'a JSON list': ('[1, 2]', 'must hold a JSON object'),
}


@pytest.mark.parametrize('case', list(BAD_SWEEPS))
def test_a_bad_sweep_file_is_refused_in_one_sentence_before_anything_runs(tmp_path, case):
    content, words = BAD_SWEEPS[case]
    path = write_sweep(tmp_path / 'bad.json', **({'text': content} if isinstance(content, str) else
                                                 {'data': content}))
    runs = tmp_path / 'runs'
    code, out, err = sweep_in_process([path, '--runs-dir', runs, '--jobs', '1'])
    assert code == 2, (out, err)
    line = one_line_of_stderr(err)
    assert words in line and str(path) in line, line
    assert out == '' and not runs.exists()


def test_a_sweep_file_that_cannot_be_read_is_refused_in_one_sentence(tmp_path):
    os.mkfifo(tmp_path / 'pipe.json')
    (tmp_path / 'binary.json').write_bytes(b'\xff\xfe\x00 not text')
    cases = [(tmp_path / 'missing.json', 'it does not exist'), (tmp_path, 'it is a folder'),
             (tmp_path / 'binary.json', 'is not text'), ('', 'the sweep file was given as an empty path'),
             (tmp_path / 'pipe.json', 'it is a named pipe (FIFO)')]
    for path, words in cases:
        code, out, err = sweep_in_process([path, '--runs-dir', tmp_path / 'runs', '--jobs', '1'])
        assert code == 2 and words in one_line_of_stderr(err), (path, err)
        assert not (tmp_path / 'runs').exists()


@pytest.mark.parametrize('name, words', [
    ('pipe.json', 'it is a named pipe (FIFO)'),         # read without blocking: no hang
    ('', 'the sweep file was given as an empty path'),
    ('bad.json', "unknown key 'colour'"),
])
def test_a_bad_sweep_file_through_the_command_line(tmp_path, name, words):
    os.mkfifo(tmp_path / 'pipe.json')
    write_sweep(tmp_path / 'bad.json', dict(GOOD, colour='red'))
    path = str(tmp_path / name) if name else ''
    p = subprocess.run([sys.executable, 'sweep.py', path, '--runs-dir', str(tmp_path / 'runs')], cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=CLI_TIMEOUT)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert words in one_line_of_stderr(p.stderr) and p.stdout == ''
    assert not (tmp_path / 'runs').exists()


def test_a_good_sweep_file_loads_with_its_defaults(tmp_path):
    path = write_sweep(tmp_path / 'mine.json', GOOD)
    loaded = sweep.load_sweep(path)
    assert (loaded.preset, loaded.seeds, list(loaded.variants)) == ('smoke', [0, 1], ['a', 'b'])
    assert loaded.baseline == 'a' and loaded.runs_dir == str(Path('runs') / 'mine')      # the defaults
    assert loaded.overrides('b') == {'cell': 'gru'}
    loaded = sweep.load_sweep(write_sweep(tmp_path / 's.json', dict(GOOD, set={'epochs': 1, 'lr': 0.1},
                                                                    variants={'a': {'lr': 0.2}})))
    assert loaded.overrides('a') == {'epochs': 1, 'lr': 0.2}        # the variant's keys win


# --------------------------------------------------------------------------
# b. How many runs at once, with how many threads
# --------------------------------------------------------------------------

GiB = 2 ** 30


@pytest.mark.parametrize('jobs, threads, cpus, memory, expected', [
    (None, None, 4, None, (4, 1)),              # one 1-thread run per CPU
    (None, None, 4, 64 * GiB, (4, 1)),
    (None, None, 4, 5 * GiB, (2, 1)),           # capped by memory: 2 GiB a run
    (None, None, 4, 1 * GiB, (1, 1)),           # but one run at least
    (None, None, 1, None, (1, 1)),
    (2, None, 4, None, (2, 2)),                 # --jobs: the CPUs shared among them
    (3, None, 4, None, (3, 1)),
    (4, None, 4, 1 * GiB, (4, 1)),              # as given, whatever the memory
    (None, 2, 4, None, (2, 2)),                 # --threads: as many runs as fit
    (None, 3, 4, None, (1, 3)),
    (None, 4, 4, None, (1, 4)),
    (2, 2, 4, None, (2, 2)),                    # both
    (1, 1, 4, None, (1, 1)),
    (3, 1, 4, 1 * GiB, (3, 1)),
])
def test_choose_jobs(jobs, threads, cpus, memory, expected):
    n, t, why = sweep.choose_jobs(jobs, threads, cpus, memory)
    assert (n, t) == expected, why
    assert n * t <= cpus and why


@pytest.mark.parametrize('jobs, threads, words', [
    (3, 2, '--jobs 3 x --threads 2 = 6 threads is more than the 4 CPUs'),
    (2, 3, 'more than the 4 CPUs'),
    (5, None, '--jobs 5 is more than the 4 CPUs'),
    (5, 1, '--jobs 5 is more than the 4 CPUs'),
    (None, 5, '--threads 5 is more than the 4 CPUs'),
    (0, None, '--jobs 0 is not a positive integer'),
    (None, 0, '--threads 0 is not a positive integer'),
    (-1, 1, '--jobs -1 is not a positive integer'),
    (1, 0, '--threads 0 is not a positive integer'),
])
def test_choose_jobs_refuses_more_threads_than_cpus_and_non_positive_counts(jobs, threads, words):
    with pytest.raises(sweep.UsageError, match=re.escape(words)):
        sweep.choose_jobs(jobs, threads, 4, 64 * GiB)


def test_the_plan_says_what_was_chosen_and_refusals_exit_2(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, 'usable_cpus', lambda: 2)
    monkeypatch.setattr(sweep, 'available_memory', lambda: 64 * GiB)
    path = write_sweep(tmp_path / 's.json', GOOD)
    runs = tmp_path / 'runs'
    code, out, err = sweep_in_process([path, '--runs-dir', runs, '--dry-run'])
    assert code == 0 and 'on this machine: 2 runs at a time, 1 thread each' in out, (out, err)
    code, out, err = sweep_in_process([path, '--runs-dir', runs, '--dry-run', '--threads', '2'])
    assert code == 0 and 'on this machine: 1 run at a time (the 2 CPUs / --threads 2)' in out, (out, err)
    monkeypatch.setattr(sweep, 'available_memory', lambda: 3 * GiB)
    code, out, err = sweep_in_process([path, '--runs-dir', runs, '--dry-run'])
    assert code == 0 and '1 run at a time' in out and 'memory' in out, (out, err)
    for args in (['--jobs', '3'], ['--jobs', '2', '--threads', '2'], ['--jobs', '0'], ['--threads', '3']):
        code, out, err = sweep_in_process([path, '--runs-dir', runs, *args])
        assert code == 2 and '--' in one_line_of_stderr(err) and out == '', (args, err)
    assert not runs.exists()


def test_a_run_gets_its_threads_in_its_environment():
    env = sweep.run_environment(3, base={'PATH': '/bin', THREADS_ENV: '8', 'OMP_NUM_THREADS': '8'})
    assert env['PATH'] == '/bin' and env[THREADS_ENV] == '3'
    assert all(env[name] == '3' for name in ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS'))


# --------------------------------------------------------------------------
# c, d. Two runs at a time equal one at a time; the progress, results and comparison
# --------------------------------------------------------------------------

@pytest.fixture(scope='module')
def parallel(tmp_path_factory, tiny_data):
    """The smoke sweep run with --jobs 2 --threads 1, while this process's environment asks for
    2 threads (the runs must get 1 all the same)."""
    root = tmp_path_factory.mktemp('parallel')
    path = write_sweep(root / 'smoke.json', SMOKE_SWEEP)
    runs = root / 'runs'
    with pytest.MonkeyPatch.context() as mp:
        for name in (THREADS_ENV, *sweep.BLAS_THREAD_VARIABLES):
            mp.setenv(name, '2')
        code, out, err = sweep_in_process([path, '--runs-dir', runs, '--jobs', '2', '--threads', '1',
                                           '--extra', f'--data-dir {tiny_data}'])
    return SimpleNamespace(code=code, out=out, err=err, runs=runs, path=path)


def test_two_runs_at_a_time_give_exactly_the_results_of_one_at_a_time(parallel, tiny_data, tmp_path, monkeypatch):
    assert parallel.code == 0, (parallel.out, parallel.err)
    monkeypatch.setattr(compare, 'main', lambda argv: compare.EXIT_OK)   # the comparison: the next test
    runs = tmp_path / 'runs'
    code, out, err = sweep_in_process([parallel.path, '--runs-dir', runs, '--jobs', '1', '--threads', '1',
                                       '--extra', f'--data-dir {tiny_data}'])
    assert code == 0, (out, err)

    # The runs did run two at a time (and one at a time in the other sweep): by the sweep's lines...
    assert most_running(progress_events(parallel.out)) == 2, parallel.out
    assert most_running(progress_events(out)) == 1, out
    # ... and by the runs' own logs: neither of the first two started after the other ended
    # (train.log's times have whole seconds, and a smoke run on an idle machine lasts about one).
    (start0, end0), (start1, end1) = (log_times(parallel.runs / name) for name in RUN_NAMES[:2])
    assert start1 <= end0 and start0 <= end1, 'the first two runs did not overlap in time'
    (start0, end0), (start1, end1) = (log_times(runs / name) for name in RUN_NAMES[:2])
    assert start1 >= end0, 'the reference runs were not made one at a time'

    for name in RUN_NAMES:
        a, b = parallel.runs / name, runs / name
        for folder in (a, b):    # each run had 1 worker thread, from the sweep
            log = (folder / runfiles.LOG_NAME).read_text()
            assert f'process 1 worker thread (from {THREADS_ENV};' in log, log
            assert 'process 1 worker thread' in sweep.log_path(folder).read_text()
        metrics_a, metrics_b = (json.loads((f / runfiles.METRICS_NAME).read_text()) for f in (a, b))
        assert set(metrics_a) == set(metrics_b) and set(TIMING_METRICS) <= set(metrics_a), name
        assert without(metrics_a, TIMING_METRICS) == without(metrics_b, TIMING_METRICS), name
        assert metrics_a['epochs_done'] == 1 and metrics_a['stopped_early'] is False, name
        history_a, history_b = (json.loads((f / 'history.json').read_text()) for f in (a, b))
        assert ([without(r, TIMING_HISTORY) for r in history_a] == [without(r, TIMING_HISTORY) for r in history_b]
                and len(history_a) == 1), name
        for file in (runfiles.PREDICTIONS_NAME, 'best.npz'):
            arrays_a, arrays_b = npz_arrays(a / file), npz_arrays(b / file)
            assert arrays_a.keys() == arrays_b.keys() and arrays_a, (name, file)
            for key in arrays_a:
                assert arrays_a[key].dtype == arrays_b[key].dtype, (name, file, key)
                assert np.array_equal(arrays_a[key], arrays_b[key]), f'{name}/{file}: {key} differs'
    # Sanity of the comparison itself: the variants learn different things.
    probs = [npz_arrays(runs / name / runfiles.PREDICTIONS_NAME)['probs'] for name in ('rnn-seed0', 'gru-seed0')]
    assert not np.array_equal(*probs)


def test_the_progress_the_results_and_the_comparison_against_the_baseline(parallel, tiny_data, tmp_path,
                                                                         monkeypatch):
    assert parallel.code == 0 and parallel.err == '', (parallel.out, parallel.err)
    out, runs = parallel.out, parallel.runs
    assert plan_lines(out, SMOKE_SWEEP['variants']) == {(v, s): 'run' for v in ('rnn', 'gru') for s in (0, 1)}
    assert 'on this machine: 2 runs at a time, 1 thread each (as given)' in out
    # One line as each run starts (its command) and one as it ends (its result).
    events = progress_events(out)
    started = {name: text for kind, name, text in events if kind == 'started'}
    ended = {name: text for kind, name, text in events if kind == 'ended'}
    assert len(events) == 8 and set(started) == set(ended) == set(RUN_NAMES), events
    for name in RUN_NAMES:
        cell = ' --cell gru' if name.startswith('gru') else ''
        assert started[name].endswith(f'main.py --preset smoke --subset 1 --epochs 1{cell} --seed {name[-1]} '
                                      f'--out {runs / name} --data-dir {tiny_data}'), started[name]
        assert ended[name].startswith('finished ('), ended[name]
        assert sweep.log_path(runs / name).is_file()         # each run's console output: its .out file
    # The results table, every run in it, and the wall time.
    lines = result_lines(out)
    assert set(lines) == set(RUN_NAMES) and all(line.endswith('finished') for line in lines.values()), lines
    assert '4 done' in out and 'Total wall time' in out
    # The comparison, against the sweep's baseline variant (gru: not the first variant).
    record = json.loads((runs / 'comparison' / 'comparison.json').read_text())
    assert record['baseline']['chosen_as'] == 'the variant of the run given by --baseline'
    assert record['baseline']['settings']['cell'] == 'gru'
    by_label = {v['label']: v for v in record['variants']}
    assert set(by_label) == {'baseline', 'cell=rnn'} and by_label['baseline']['is_baseline']
    assert sorted(r['name'] for r in by_label['baseline']['runs']) == ['gru-seed0', 'gru-seed1']
    assert (by_label['cell=rnn']['finished'], by_label['baseline']['finished']) == (2, 2)
    assert (runs / 'comparison' / 'comparison.md').is_file()

    # A second pass: every run is finished, nothing runs (a run would fail: main.py is gone), and
    # the comparison is redone against the baseline's first run.
    monkeypatch.setattr(sweep, 'MAIN', tmp_path / 'no-main.py')
    compared = []
    monkeypatch.setattr(compare, 'main', lambda argv: compared.append(argv) or compare.EXIT_OK)
    before = {name: (runs / name / runfiles.METRICS_NAME).read_bytes() for name in RUN_NAMES}
    outs = {name: sweep.log_path(runs / name).read_bytes() for name in RUN_NAMES}
    code, out, err = sweep_in_process([parallel.path, '--runs-dir', runs, '--jobs', '2', '--threads', '1',
                                       '--extra', f'--data-dir {tiny_data}'])
    assert code == 0 and err == '', (out, err)
    assert set(plan_lines(out, SMOKE_SWEEP['variants']).values()) == {'finished'} and '4 finished' in out
    assert progress_events(out) == [], out
    assert all(line.endswith('finished (skipped)') for line in result_lines(out).values())
    assert compared == [[str(runs), '--out', str(runs / 'comparison'), '--baseline', str(runs / 'gru-seed0')]]
    assert before == {name: (runs / name / runfiles.METRICS_NAME).read_bytes() for name in RUN_NAMES}
    assert outs == {name: sweep.log_path(runs / name).read_bytes() for name in RUN_NAMES}


# --------------------------------------------------------------------------
# e. SIGTERM to a sweep of two running runs
# --------------------------------------------------------------------------

def test_sigterm_stops_both_running_runs_cleanly_and_the_next_pass_resumes_them(tiny_data, tmp_path, monkeypatch):
    # 8 epochs of 3 steps: long enough that both runs are still training when the signal comes.
    path = write_sweep(tmp_path / 'long.json', dict(SMOKE_SWEEP, set={'subset': 1, 'epochs': 8},
                                                    variants={'rnn': {}}, baseline='rnn'))
    runs = tmp_path / 'runs'
    names = ['rnn-seed0', 'rnn-seed1']
    argv = [str(path), '--runs-dir', str(runs), '--jobs', '2', '--threads', '1', '--extra', f'--data-dir {tiny_data}']
    proc = subprocess.Popen([sys.executable, 'sweep.py', *argv], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        # main.py writes config.json after installing its signal handlers, just before training.
        deadline = time.monotonic() + CLI_TIMEOUT
        while (not all((runs / name / runfiles.CONFIG_NAME).exists() for name in names)
               and time.monotonic() < deadline and proc.poll() is None):
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=CLI_TIMEOUT)
    finally:
        proc.kill()
    assert proc.returncode == sweep.EXIT_INTERRUPTED, output
    assert 'Traceback' not in output and 'run the same command again' in output
    assert not (runs / 'comparison').exists()
    for name in names:
        metrics = json.loads((runs / name / runfiles.METRICS_NAME).read_text())
        assert metrics['stopped_early'] is True and 'SIGTERM' in metrics['stop_reason'], (name, metrics)
        assert metrics['epochs_done'] < 8 and (runs / name / runfiles.CHECKPOINT_NAME).is_file()
        assert sweep.plan_run(runs / name) == {'action': 'resume', 'detail': '', 'evaluate': False}

    monkeypatch.setattr(compare, 'main', lambda argv: compare.EXIT_OK)   # compared in the test above
    code, out, err = sweep_in_process(argv)
    assert code == 0, (out, err)
    assert plan_lines(out, ['rnn']) == {('rnn', 0): 'resume', ('rnn', 1): 'resume'}
    started = {name: text for kind, name, text in progress_events(out) if kind == 'started'}
    for name in names:
        assert started[name].endswith(f"--resume {runs / name / 'ckpt.npz'} --data-dir {tiny_data}"), started
        metrics = json.loads((runs / name / runfiles.METRICS_NAME).read_text())
        assert metrics['stopped_early'] is False and metrics['epochs_done'] == 8, (name, metrics)
        assert sweep.log_path(runs / name).read_text().count('\n=== ') == 2     # both attempts' output


def test_a_sigterm_that_comes_while_a_run_is_being_started_reaches_that_run_too(tmp_path, monkeypatch):
    # main.py replaced by a script that would sleep 30 s and then leave a mark; the SIGTERM comes
    # to the sweep just as Popen returns, before the sweep knows the child.
    marker = tmp_path / 'ran-to-the-end'
    script = tmp_path / 'slow_main.py'
    script.write_text(f'import time\ntime.sleep(30)\nopen({str(marker)!r}, "w").close()\n')
    monkeypatch.setattr(sweep, 'MAIN', script)
    real_popen = subprocess.Popen

    def popen_then_sigterm(*args, **kwargs):
        child = real_popen(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)       # caught by the sweep's handler (sweep.Signals)
        return child
    monkeypatch.setattr(sweep.subprocess, 'Popen', popen_then_sigterm)
    path = write_sweep(tmp_path / 's.json', dict(GOOD, variants={'a': {}}, seeds=[0, 1]))
    start = time.monotonic()
    code, out, err = sweep_in_process([path, '--runs-dir', tmp_path / 'runs', '--jobs', '1'])
    assert code == sweep.EXIT_INTERRUPTED, (out, err)
    assert time.monotonic() - start < 20, 'the sweep waited for a run it should have stopped'
    assert not marker.exists()
    lines = result_lines(out)
    assert 'finished' not in lines['a-seed0'] and 'not started (SIGTERM)' in lines['a-seed1'], lines


# --------------------------------------------------------------------------
# f. The project's sweep files
# --------------------------------------------------------------------------

CLAIMS_OPTIONS = {
    'baseline': '', 'no-weight-decay': '--set weight_decay=0', 'no-clipping': '--set clip=0',
    'no-warmup': '--set warmup_epochs=0', 'constant-lr': '--set decay=1', 'no-augmentation': '--set augment=false',
    'flat': '--seq-layout flat', 'rows': '--seq-layout rows', 'gru': '--cell gru', 'lstm': '--cell lstm',
}
LEVERS_OPTIONS = {
    'base': '', 'gru': '--cell gru', 'hidden-256': '--set hidden=256', 'lstm': '--cell lstm',
    'batch-256-lr-0.1': '--batch-size 256 --lr 0.1', 'lr-0.1': '--lr 0.1',
}

DEEP_LEVERS_OPTIONS = {
    'deep': '', 'no-whitening': '--set whiten=0', 'no-identity-init': '--set identity_init=false',
    'random-flip': '--set alternate_flip=false', 'cosine': '--schedule cosine',
    'label-smoothing-0.2': '--set label_smoothing=0.2', 'lr-0.2': '--lr 0.2', 'lr-0.05': '--lr 0.05',
    'reflect2': '--set crop=reflect2', 'weight-decay-5e-5': '--set weight_decay=5e-05',
}

# The seeds of a sweep file that does not run 0, 1 and 2: deep-readout, deep-bn-lr-2 and deep-weight-decay-2
# test deep-head-2's, deep-bn-lr's and deep-overfit's findings again on seeds of their own.
SWEEP_SEEDS = {'deep-readout': [3, 4, 5], 'deep-bn-lr-2': [3, 4, 5], 'deep-weight-decay-2': [3, 4, 5]}

DEEP_LEVERS_2_OPTIONS = {
    'deep': '', 'ema-0.95': '--set ema=0.95', 'label-smoothing-0.1': '--set label_smoothing=0.1',
    'weight-decay-2.5e-3': '--set weight_decay=0.0025', 'pixels': '--seq-layout pixels', 'flat': '--seq-layout flat',
}

# The eighth screen and its confirmation on fresh seeds: the same protocol and variants.
BN_RATES_PROTOCOL = ('--subset 0.2 --epochs 5 --batch-size 256 --lr 0.1 --set warmup_epochs=1 '
                     '--set tta_translate=false')
BN_RATES_OPTIONS = {'deep': '', 'bn-rates-airbench': '--set bn_gamma_lr=0 --set bn_beta_lr=64'}
# The tenth to thirteenth screens: 9,000 images for 15 epochs (527 steps), where the model overfits.
OVERFIT_PROTOCOL = ('--subset 0.2 --epochs 15 --batch-size 256 --lr 0.1 --set warmup_epochs=1 '
                    '--set tta_translate=false')


@pytest.mark.parametrize('name, preset, protocol, baseline, options', [
    ('claims', 'fast', '--subset 0.4', 'baseline', CLAIMS_OPTIONS),
    ('levers', 'best', '--epochs 10', 'base', LEVERS_OPTIONS),
    ('deep-levers', 'deep', '--subset 0.2 --epochs 4 --batch-size 256 --lr 0.1 --set warmup_epochs=1 '
                            '--set tta_translate=false --set whiten=2 --set crop=pad --set val_views=test '
                            '--set weight_decay=0.0005 --set readout=last', 'deep',
     DEEP_LEVERS_OPTIONS),
    ('deep-levers-2', 'deep', '--subset 0.2 --epochs 5 --batch-size 256 --lr 0.1 --set warmup_epochs=1 '
                              '--set tta_translate=false --set weight_decay=0.0005 --set readout=last', 'deep',
     DEEP_LEVERS_2_OPTIONS),
    ('deep-weight-decay', 'deep', '--subset 0.5 --epochs 6 --batch-size 256 --lr 0.1 --set warmup_epochs=1 '
                                  '--set tta_translate=false --set weight_decay=0.0005 --set readout=last', 'deep',
     {'deep': '', 'weight-decay-2.5e-3': '--set weight_decay=0.0025'}),
    ('deep-head', 'deep', '--subset 0.2 --epochs 5 --batch-size 256 --lr 0.1 --set warmup_epochs=1 '
                          '--set tta_translate=false --set readout=last', 'deep',
     {'deep': '', 'hidden-512': '--set hidden=512', 'gru': '--cell gru', 'lstm': '--cell lstm'}),
    ('deep-head-2', 'deep', '--subset 0.2 --epochs 5 --batch-size 256 --lr 0.1 --set warmup_epochs=1 '
                            '--set tta_translate=false --set readout=last', 'deep',
     {'deep': '', 'flat': '--seq-layout flat', 'rowmax': '--seq-layout rowmax', 'mean': '--set readout=mean',
      'max': '--set readout=max'}),
    ('deep-readout', 'deep', '--subset 0.2 --epochs 5 --batch-size 256 --lr 0.1 --set warmup_epochs=1 '
                             '--set tta_translate=false --set readout=last', 'deep',
     {'deep': '', 'mean': '--set readout=mean'}),
    ('deep-bn', 'deep', '--subset 0.2 --epochs 5 --batch-size 256 --lr 0.1 --set warmup_epochs=1 '
                        '--set tta_translate=false --set readout=mean', 'mean',
     {'mean': '', 'bn-airbench': '--set bn_momentum=0.4 --set bn_eps=1e-12'}),
    ('deep-bn-lr', 'deep', BN_RATES_PROTOCOL, 'deep', BN_RATES_OPTIONS),
    ('deep-bn-lr-2', 'deep', BN_RATES_PROTOCOL, 'deep', BN_RATES_OPTIONS),      # the same on seeds 3-5
    ('deep-smoothing', 'deep', OVERFIT_PROTOCOL, 'deep', {'deep': '', 'label-smoothing-0.2': '--set label_smoothing=0.2'}),
    ('deep-overfit', 'deep', OVERFIT_PROTOCOL, 'deep',
     {'deep': '', 'bn-rates-airbench': BN_RATES_OPTIONS['bn-rates-airbench'],
      'weight-decay-5e-3': '--set weight_decay=0.005'}),
    ('deep-weight-decay-2', 'deep', OVERFIT_PROTOCOL, 'deep',      # the twelfth: the eleventh's on seeds 3-5
     {'deep': '', 'weight-decay-5e-3': '--set weight_decay=0.005'}),
    ('deep-lookahead', 'deep', OVERFIT_PROTOCOL + ' --set val_fraction=0.1', 'deep',   # the thirteenth, at 9:1
     {'deep': '', 'lookahead-5': '--set lookahead=5'}),
])
def test_the_project_sweep_files_load_and_plan_the_expected_commands(tmp_path, name, preset, protocol, baseline,
                                                                     options):
    loaded = sweep.load_sweep(REPO_ROOT / 'sweeps' / f'{name}.json')
    seeds = SWEEP_SEEDS.get(name, [0, 1, 2])
    assert (loaded.preset, loaded.seeds, loaded.baseline) == (preset, seeds, baseline)
    assert list(loaded.variants) == list(options) and loaded.runs_dir == f'runs/{name}'
    assert set(loaded.about) == set(options)
    runs = tmp_path / name
    code, out, err = sweep_in_process([REPO_ROOT / 'sweeps' / f'{name}.json', '--runs-dir', runs, '--dry-run'])
    assert code == 0 and err == '', (out, err)
    assert plan_lines(out, options) == {(v, s): 'run' for v in options for s in seeds}
    # One column for the seeds, however long a variant's name (label-smoothing-0.2).
    lines = [line for line in out.splitlines() if line.split()[:2][-1:] == ['seed']]
    assert len(lines) == 3 * len(options) and len({line.index(' seed ') for line in lines}) == 1, out
    commands = [line.strip() for line in out.splitlines() if 'main.py --preset' in line and '--out' in line]
    assert len(commands) == 3 * len(options) and all(c.startswith('python ') for c in commands), out
    commands = [c[c.index('main.py --preset'):] for c in commands]       # 'python main.py' in the repository
    for variant, opts in options.items():
        # A variant's option that the protocol also gives replaces it in place (deep-levers' --lr,
        # --set whiten=..., --set crop=...).
        flag = opts.split('=')[0] + '=' if opts.startswith('--set ') else opts.split(' ')[0] + ' '
        replaces = opts and flag in protocol
        replaced = re.sub(re.escape(flag) + r'\S+', opts, protocol) if replaces else None
        for seed in seeds:
            words = ' '.join(filter(None, [f'--preset {preset} {replaced or protocol}', None if replaced else opts,
                                           f'--seed {seed}']))
            assert f'main.py {words} --out {runs / f"{variant}-seed{seed}"}' in commands, (variant, seed, out)
    assert f'{3 * len(options)} run' in out and not runs.exists()


def test_the_claims_suite_is_the_claims_sweep(tmp_path, capsys):
    runs = tmp_path / 'claims'
    assert claims.main(['--runs-dir', str(runs), '--dry-run']) == 0
    through_claims = capsys.readouterr().out
    code, through_sweep, _ = sweep_in_process([claims.CLAIMS_SWEEP, '--runs-dir', runs, '--dry-run'])
    assert code == 0 and through_claims == through_sweep
    assert 'python main.py --preset fast --subset 0.4 --set weight_decay=0 --seed 1 --out ' \
           f"{runs / 'no-weight-decay-seed1'}" in through_claims
