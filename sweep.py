"""Run a sweep, variants x seeds of main.py described by a JSON file, many runs at once,
on this machine or across machines on Ray; then compare the runs.

    python sweep.py SWEEP.json [--jobs N] [--threads T] [--ray [ADDRESS]] [--runs-dir DIR]
                    [--seeds K ...] [--only VARIANT ...] [--dry-run] [--preset P] [--extra "..."]

    python sweep.py sweeps/claims.json             # the method's claims: 10 variants x 3 seeds
    python sweep.py sweeps/levers.json --jobs 2    # the levers of `best`, two runs at a time
    python sweep.py sweeps/claims.json --ray       # on a local Ray instance
    python sweep.py sweeps/claims.json --ray 10.0.0.1:6379    # on a running Ray cluster

The sweep file (sweeps/*.json; ``load_sweep`` checks every word of it before anything runs):

    {"description": "what the sweep measures",
     "preset": "fast",                        # presets.json's name: every run starts from it
     "set": {"subset": 0.4},                  # preset keys every run changes (optional)
     "seeds": [0, 1, 2],
     "runs_dir": "runs/claims",               # optional; default runs/<file name>
     "baseline": "baseline",                  # the variant the others are compared with (default the first)
     "variants": {"baseline": {}, "no-weight-decay": {"weight_decay": 0}, ...},
     "about": {"no-weight-decay": "the claim the variant tests", ...}}   # optional

Every variant x seed is one run of main.py in a process of its own (a crash or a divergence of
one run stops no other), in the folder <runs-dir>/<variant>-seed<K>:

    python main.py --preset P <the set keys> <the variant's keys> --seed K --out <folder> <--extra>

(a key with an option of its own is given by it, e.g. --subset 0.4, --cell gru; the others by
--set KEY=VALUE). The console output of each run goes to <runs-dir>/<variant>-seed<K>.out; its
own log is train.log in its folder.

Where the runs run:

    --jobs N, --threads T   on this machine (the default): N runs at a time, each with T worker
                            threads and T BLAS threads (CNNRNN_THREADS and the BLAS variables set
                            for it); N x T is at most the CPUs this process may use. By default
                            T = 1 and N = those CPUs (fewer if memory is short): one run per CPU
                            is the most runs per hour (docs/benchmarks.md); the plan says what
                            was chosen. A run's result depends on T, never on N.
    --ray [ADDRESS]         each run is one Ray task asking for T CPUs (default 1): a local Ray
                            instance, or the cluster at ADDRESS. Nothing is shared but Ray: the
                            code travels with the job (Ray's working_dir), the data archive is
                            shipped once through Ray's object store (a worker that already has
                            it in $CNNRNN_DATA_CACHE, default <tmp>/cnnrnn-data/<sha256>/, uses
                            that), the run trains in a temporary folder on its worker, and the
                            finished run folder comes back and is renamed into <runs-dir> whole
                            (never half-copied). A run whose worker is lost is tried again from
                            its start (or from the checkpoint it was resumed from), up to
                            RAY_RETRIES more times. Ray is optional: pip install -r requirements-ray.txt

The sweep is resumable; what it does with each run folder, by its state (runfiles.status,
the one vocabulary of the run-folder contract):

    new (absent or empty)                   run it
    finished (consistent by compare.py's checks)
                                            skip it
    diverged (diverged.json)                skip it: the divergence is the result
    stopped (early, interrupted, or crashed: crashed.json), or needs evaluation
                                            resume it: python main.py --resume <run>/ckpt.npz
                                            (with --evaluate when only the test evaluation is to redo)
    in use by another process               skip it this time
    damaged: files but no checkpoint        rename it to <name>.failed-<timestamp> (nothing is
                                            deleted) and run it again
    damaged (a checkpoint that cannot be read, a named pipe or folder where a file
    should be) or inconsistent (figures compare.py would leave out)
                                            set it aside: never run, named in the results with
                                            the fix, counted as a failure

What a main.py process's exit code means (cli.py): 0 finished (or stopped early by a time
budget: resumed next time); 1 diverged, kept as a result; 2 refused (bad input: its message is
in the run's .out file and shown; a resume refused because its checkpoint is damaged is set
aside as damaged); 3, a death by a signal or any other code: crashed, a failure, tried again
only by the next run of the sweep; 130 aborted, which stops the sweep.

The plan is printed first, one progress bar follows the sweep (done, running, failed, elapsed,
estimated time left), a line reports each run as it ends, and a table sums up at the end;
then compare.py writes <runs-dir>/comparison/ (comparison.md, comparison.json and figures) over
every run in the folder, against the baseline variant.

--preset and --extra change the protocol, e.g. for a quick check on other data: --preset smoke
--extra="--data-dir X --subset 1 --epochs 1". Of --extra, only --max-hours and --data-dir also
apply to resumed runs (main.py keeps a resumed run's configuration).

Exit codes: 0 every run finished, diverged or stopped early by a time budget (run the same
command again to resume those) and the comparison was written; 2 a bad sweep file or argument
(one sentence, before anything runs), or some run was refused, damaged, inconsistent or in use,
or the comparison could not be written; 3 some run crashed (or sweep.py itself did: a bug);
130 interrupted (run the same command again to continue). The sweep runs every other run
before it exits non-zero, and names the failures. Ctrl-C stops the running main.py processes
cleanly (they receive the terminal's signal themselves and write their checkpoints) and then
the sweep; SIGTERM sent to this process is passed on to them. On Ray, Ctrl-C cancels the tasks:
their runs start again next time, and no half-placed folder is left.
"""
import cli                      # standard library only: set up before the slow imports below

if __name__ == '__main__':
    cli.exit_cleanly_on_interrupt_while_starting()

import argparse
import contextlib
import datetime
import fcntl
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

import compare
import config as configuration
import runfiles
from config import Config, ConfigError
from fast_layers import THREADS_ENV, usable_cpus
from runfiles import MAX_SEED, RecordError, RunFileError, describe_os_error

REPO = Path(__file__).resolve().parent
MAIN = REPO / 'main.py'
EXIT_OK, EXIT_BAD_INPUT, EXIT_CRASHED, EXIT_INTERRUPTED = (cli.EXIT_OK, cli.EXIT_BAD_INPUT, cli.EXIT_CRASHED,
                                                           cli.EXIT_ABORTED)
# main.py's exit codes.
MAIN_OK, MAIN_DIVERGED, MAIN_REFUSED, MAIN_CRASHED, MAIN_ABORTED = (
    cli.EXIT_OK, cli.EXIT_DIVERGED, cli.EXIT_BAD_INPUT, cli.EXIT_CRASHED, cli.EXIT_ABORTED)

# The options of --extra that main.py also accepts with --resume.
RESUME_OPTIONS = ('--max-hours', '--data-dir')
# What each outcome of a run means for the sweep's exit code (see the module docstring).
DONE, UNFINISHED, REFUSED, CRASHED = 'done', 'unfinished', 'refused', 'crashed'
# The plan's actions that run main.py.
RUNNING = ('run', 'restart', 'resume')

# The keys of a sweep file; the required ones first.
SWEEP_KEYS = ('preset', 'seeds', 'variants', 'description', 'set', 'runs_dir', 'baseline', 'about')
REQUIRED_KEYS = SWEEP_KEYS[:3]
# A variant's name is part of its run folders' names.
VARIANT_NAME = re.compile(r'[A-Za-z0-9][A-Za-z0-9_.=+-]*')
# The BLAS and OpenMP libraries read these when they start; main.py then sets the BLAS threads
# again (threadpoolctl), so both agree with the run's worker threads.
BLAS_THREAD_VARIABLES = ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS')
# What the default --jobs allows for a run's memory: a `best` run peaks below 2 GiB
# (a `fast` run at 0.45 GiB).
MEMORY_PER_RUN = 2 * 2**30
# How many more times a Ray task whose worker died is tried (Ray's max_retries).
RAY_RETRIES = 2
# Where a Ray worker keeps the data archive (by its sha256), so it is fetched once per machine.
DATA_CACHE_ENV = 'CNNRNN_DATA_CACHE'
# What Ray does not ship to the workers: the data goes once through the object store instead,
# and the runs come back through it.
RAY_EXCLUDES = ['data/', 'runs/', '.pytest_cache/', '__pycache__/', '*.png']   # .git and .venv: by Ray itself
POLL_SECONDS = 0.2
# The temporary folders runs train in on Ray workers.
WORK_PREFIX = 'cnnrnn-sweep-'


class UsageError(Exception):
    """A bad sweep file or argument: one sentence, exit code 2."""


# --------------------------------------------------------------------------
# The sweep file
# --------------------------------------------------------------------------

@dataclass
class Sweep:
    """A sweep file, checked: what to run."""
    path: Path
    preset: str
    seeds: list
    variants: dict          # name -> {key: value}, in the file's order
    settings: dict = field(default_factory=dict)   # the "set" keys, for every variant
    description: str = ''
    runs_dir: str = ''
    baseline: str = ''
    about: dict = field(default_factory=dict)      # name -> what the variant tests

    def overrides(self, variant):
        """{key: value} a variant's runs change from the preset: the sweep's, then the variant's."""
        return {**self.settings, **self.variants[variant]}


def _no_duplicates(pairs):
    """json's object_pairs_hook: a key given twice is an error, not the last one silently."""
    keys = [k for k, _ in pairs]
    twice = next((k for k in keys if keys.count(k) > 1), None)
    if twice is not None:
        raise UsageError(f'the name {twice!r} appears twice in one object; give each name once')
    return dict(pairs)


def read_sweep_file(path):
    """The JSON object of a sweep file; UsageError naming the file and the fix."""
    where = f'the sweep file {path}'
    if not str(path).strip():
        raise UsageError('the sweep file was given as an empty path; give one, e.g. sweeps/claims.json')
    try:
        with runfiles.open_regular(path, 'r') as f:
            text = f.read()
    except OSError as e:
        raise UsageError(f"{describe_os_error(e, path, 'read')}; give a sweep file such as "
                         f"sweeps/claims.json") from None
    except UnicodeDecodeError:
        raise UsageError(f'{where} is not text; give a JSON sweep file such as sweeps/claims.json') from None
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates,
                          parse_constant=lambda name: _not_a_number(name))
    except UsageError as e:
        raise UsageError(f'{where}: {e}') from None
    except ValueError as e:
        raise UsageError(f'{where} is not valid JSON ({e}); fix it (sweeps/claims.json is an example)') from None
    if not isinstance(data, dict):
        raise UsageError(f'{where} must hold a JSON object with "preset", "seeds" and "variants"; '
                         f'see sweeps/claims.json')
    return data


def _not_a_number(name):
    raise UsageError(f'{name} is not a number a setting can take; give a finite number')


def load_sweep(path):
    """Read and check a sweep file -> Sweep. Every problem is a UsageError of one sentence
    naming the file, the place and a good value; nothing has run yet."""
    data = read_sweep_file(path)     # before Path(): Path('') is '.', and '' must be refused as empty
    path = Path(path)
    where = f'the sweep file {path}'
    unknown = [k for k in data if k not in SWEEP_KEYS]
    if unknown:
        raise UsageError(f'{where} has an unknown key {unknown[0]!r}; its keys are {", ".join(SWEEP_KEYS)}')
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise UsageError(f'{where} lacks {missing[0]!r}; a sweep names its preset, seeds and variants '
                         f'(see sweeps/claims.json)')
    for key in ('preset', 'description', 'runs_dir', 'baseline'):
        if not isinstance(data.get(key, ''), str):
            raise UsageError(f'{where}: {key!r} must be a string')
    sweep = Sweep(path=path, preset=data['preset'], seeds=check_seeds(data['seeds'], f'{where}: "seeds"'),
                  variants={}, description=data.get('description', ''),
                  runs_dir=data.get('runs_dir') or str(Path('runs') / path.stem))
    if not sweep.runs_dir.strip():
        raise UsageError(f'{where}: "runs_dir" is blank; give a folder such as runs/claims, or leave it out')
    sweep.settings = check_keys(data.get('set', {}), f'{where}: "set"')
    variants = data['variants']
    if not isinstance(variants, dict) or not variants:
        raise UsageError(f'{where}: "variants" must be a non-empty object of name -> preset keys, '
                         f'e.g. {{"baseline": {{}}, "gru": {{"cell": "gru"}}}}')
    for name, keys in variants.items():
        if not VARIANT_NAME.fullmatch(name) or '.failed-' in name:
            raise UsageError(f'{where}: the variant name {name!r} cannot name a run folder; use letters, '
                             f'digits and . _ = + - (e.g. no-weight-decay)')
        sweep.variants[name] = check_keys(keys, f'{where}: variant {name!r}')
    sweep.baseline = data.get('baseline') or next(iter(sweep.variants))
    if sweep.baseline not in sweep.variants:
        raise UsageError(f'{where}: "baseline" names {sweep.baseline!r}, which is not a variant; name one '
                         f'of {", ".join(sweep.variants)}')
    about = data.get('about', {})
    if not isinstance(about, dict) or not all(isinstance(v, str) for v in about.values()):
        raise UsageError(f'{where}: "about" must be an object of variant name -> text')
    stray = [name for name in about if name not in sweep.variants]
    if stray:
        raise UsageError(f'{where}: "about" describes {stray[0]!r}, which is not a variant')
    sweep.about = dict(about)
    check_preset(sweep, sweep.preset, where)
    return sweep


def check_seeds(seeds, where):
    """A list of distinct seeds in [0, MAX_SEED], not empty."""
    if not isinstance(seeds, list) or not seeds:
        raise UsageError(f'{where} must be a non-empty list of seeds, e.g. [0, 1, 2]')
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise UsageError(f'{where} holds {seed!r}; a seed is an integer in [0, {MAX_SEED}]')
    if len(set(seeds)) != len(seeds):
        raise UsageError(f'{where} repeats a seed; give each seed once')
    return list(seeds)


def check_keys(keys, where):
    """{key: value} of preset keys, each checked by Config (type and range); the seed is the sweep's."""
    if not isinstance(keys, dict):
        raise UsageError(f'{where} must be an object of preset keys, e.g. {{"weight_decay": 0}}')
    for key, value in keys.items():
        if key == 'seed':
            raise UsageError(f'{where} sets "seed"; the sweep\'s "seeds" give every run its seed')
        try:
            Config.check(key, value, where)
        except ConfigError as e:
            raise UsageError(str(e)) from None
    return dict(keys)


def check_preset(sweep, preset, where):
    """The preset must exist and every variant's settings must hold together on top of it."""
    try:
        presets = configuration.load_presets()
    except ConfigError as e:
        raise UsageError(str(e)) from None
    if preset not in presets:
        raise UsageError(f'{where}: unknown preset {preset!r}; choose one of {", ".join(presets)} '
                         f'(python main.py --list-presets)')
    for name in sweep.variants:
        try:
            configuration.with_overrides(presets[preset], sweep.overrides(name), f'{where}: variant {name!r}')
        except ConfigError as e:
            raise UsageError(str(e)) from None


# --------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------

def option_args(overrides):
    """main.py's options for {key: value}: the key's own option where it has one (--subset 0.4,
    --cell gru), else --set KEY=VALUE (VALUE as JSON, a word as itself)."""
    args = []
    for key, value in overrides.items():
        text = value if isinstance(value, str) else json.dumps(value, separators=(',', ':'))
        if key in Config.flag_keys():
            args += [configuration.flag_name(key), text]
        else:
            args += ['--set', f'{key}={text}']
    return args


def train_args(sweep, variant, seed, folder, preset=None, extra=()):
    """main.py's arguments for a new run of a variant and seed (without the interpreter and script)."""
    return (['--preset', preset or sweep.preset, *option_args(sweep.overrides(variant)), '--seed', str(seed),
             '--out', str(folder), *extra])


def resume_args(folder, extra=(), evaluate=False):
    """main.py's arguments to continue a run; of ``extra`` only RESUME_OPTIONS are kept."""
    kept, tokens = [], list(extra)
    for i, token in enumerate(tokens):
        name = token.split('=', 1)[0]
        if name in RESUME_OPTIONS:
            kept += [token] if '=' in token else tokens[i:i + 2]
    return ['--resume', str(Path(folder) / runfiles.CHECKPOINT_NAME), *kept] + (['--evaluate'] if evaluate else [])


def without_options(extra, names):
    """``extra`` without the options ``names`` (and their values)."""
    out, tokens, i = [], list(extra), 0
    while i < len(tokens):
        name = tokens[i].split('=', 1)[0]
        if name in names:
            i += 1 if '=' in tokens[i] else 2
            continue
        out.append(tokens[i])
        i += 1
    return out


def shown(args):
    """main.py's command line as it works when typed in the current folder."""
    return compare.main_command(*args)


def move_command(folder, suffix):
    """The shell command that moves a run folder aside, e.g. mv runs/claims/x runs/claims/x.damaged."""
    return f'mv {compare.quoted(folder)} {compare.quoted(f"{folder}.{suffix}")}'


def log_path(folder):
    """Where a run's console output goes: <runs-dir>/<run name>.out, beside its folder."""
    return Path(folder).with_name(Path(folder).name + '.out')


# --------------------------------------------------------------------------
# The plan: what to do with each run folder
# --------------------------------------------------------------------------

def plan_run(folder):
    """What to do with one run folder, from its state (runfiles.status) and, for the details, its
    checkpoint, config.json and files: a dict with action, detail and evaluate. action is one of

    'run'           nothing there yet
    'restart'       files but no checkpoint: move it aside, then run
    'resume'        stopped, crashed, or its test evaluation to redo (evaluate: only that is
                    to redo: trained to its last epoch, metrics.json damaged or missing)
    'finished', 'diverged', 'in use'                    nothing to do now
    'not a folder', 'damaged', 'inconsistent'           set aside: never run; detail says why and how to fix it
    """
    def job(action, detail='', evaluate=False):
        return {'action': action, 'detail': detail, 'evaluate': evaluate}

    if not folder.exists() and not folder.is_symlink():
        return job('run')
    if not folder.is_dir():
        what = f'is a link to {folder.readlink()}, which is not a folder' if folder.is_symlink() else \
            'exists and is not a folder'
        return job('not a folder', f'{folder} {what}; move it away ({move_command(folder, "old")})')
    # status never blocks: a named pipe where a file (or the lock) should be makes the folder damaged.
    state = runfiles.status(folder)
    if state.state == runfiles.NEW:
        return job('run')
    if state.state == runfiles.IN_USE:
        return job('in use', 'another process holds its folder; run the sweep again once it has finished')
    if state.state == runfiles.DIVERGED:
        return job('diverged', state.divergence.summary)
    return job(*plan_by_state(folder, state))


def plan_by_state(folder, state):
    """(action, detail, evaluate) of a run folder that is neither new, in use nor diverged.

    A crash (crashed.json) is tried again: resumed from its checkpoint, or started afresh.
    """
    crashed = state.crash.message if state.crash is not None else None
    if state.state == runfiles.DAMAGED:
        return plan_damaged(folder, state, crashed)
    if state.state == runfiles.FINISHED and not crashed:
        return plan_finished(folder)
    # Stopped early, interrupted or crashed: resume. Trained to the end: evaluate again.
    evaluate = state.state != runfiles.STOPPED
    earlier = (f'it crashed earlier ({crashed}): trying again' if crashed
               else 'only the test evaluation is to redo' if evaluate else '')
    return plan_resume(folder, earlier, evaluate)


def plan_damaged(folder, state, crashed):
    """(action, detail, evaluate) of a damaged run folder: started afresh if it has no checkpoint
    at all, else set aside with the fix."""
    ckpt = folder / runfiles.CHECKPOINT_NAME
    if state.file != ckpt:
        return 'damaged', f'{state.reason}; then run the sweep again', False
    if not os.path.lexists(ckpt):
        return 'restart', (f'it crashed earlier ({crashed}), before its first checkpoint: starting it afresh'
                           if crashed else 'no checkpoint: it crashed or was stopped in its first epoch'), False
    return 'damaged', checkpoint_problem(folder) or f'{state.reason}; then run the sweep again', False


def plan_finished(folder):
    """(action, detail, evaluate) of a finished run: skipped if compare.py would compare it; its
    test evaluation redone if metrics.json cannot be read; else set aside as inconsistent."""
    try:
        runfiles.read_metrics(folder)
    except RecordError:      # readable but impossible: compare.py's reason says so
        pass
    except RunFileError:     # truncated, not JSON: main.py writes it again from the checkpoint
        return plan_resume(folder, 'only the test evaluation is to redo', True)
    run = compare.read_run(folder)
    if run.status == 'finished':
        return 'finished', '', False
    return 'inconsistent', f"{run.reason}; then run the sweep again", False


def plan_resume(folder, detail, evaluate):
    """('resume', detail, evaluate) once the checkpoint reads whole and config.json agrees with it;
    else the run is set aside."""
    problem = checkpoint_problem(folder)
    if problem:
        return 'damaged', problem, False
    edited = config_problem(folder)
    if edited:
        return 'inconsistent', f'{edited}; then run the sweep again', False
    return 'resume', detail, evaluate


def checkpoint_problem(folder):
    """Why the run's ckpt.npz cannot be resumed, with the fix, or None if it reads well.

    Every member is read (a truncated file or a bit flip fails here, not in
    main.py) and the metadata must hold the run's configuration. main.py checks
    more on --resume; what it refuses there is reported after it exits.
    """
    try:
        runfiles.verify_checkpoint(folder / runfiles.CHECKPOINT_NAME)
    except RunFileError as e:
        return (f'{e}; it was not resumed: restore the checkpoint, or set the run aside with '
                f'{move_command(folder, "damaged")} and run the sweep again to start it afresh')
    return None


def config_problem(folder):
    """Why the run's config.json does not describe what its checkpoint trains (edited, or
    unreadable), with the fix; None if it agrees. main.py resumes from the checkpoint's copy, so
    an edit would be ignored and the comparison would group the run under the wrong variant."""
    try:
        config = runfiles.read_config(folder, advice=lambda run_dir, name: 'restore the file')
        if config is not None:     # without one, main.py resumes from the checkpoint alone
            compare.check_against_checkpoint(folder, config)
    except (RunFileError, compare.LeftOut) as e:
        return str(e)
    return None


def make_plan(runs_dir, variants, seeds):
    """[{variant, seed, folder, action, detail, evaluate}] for every variant x seed, in that order."""
    plan = []
    for variant in variants:
        for seed in seeds:
            folder = Path(runs_dir) / f'{variant}-seed{seed}'
            plan.append({'variant': variant, 'seed': seed, 'folder': folder, **plan_run(folder)})
    return plan


def name_width(jobs):
    """The width of the variant column of the plan and the results: the longest name, at least 16."""
    return max([16] + [len(job['variant']) for job in jobs])


def print_plan(plan, sweep, runs_dir, preset, extra, dry_run, where):
    variants = list(dict.fromkeys(job['variant'] for job in plan))
    seeds = list(dict.fromkeys(job['seed'] for job in plan))
    protocol = compare.main_command('--preset', preset, *option_args(sweep.settings), *extra)
    print(f'Sweep {sweep.path.stem}: {len(variants)} variants x {len(seeds)} seeds = {len(plan)} runs in '
          f'{runs_dir}; protocol: {protocol}')
    print(f'  {where}')
    width = name_width(plan)
    for job in plan:
        detail = f"  ({job['detail']})" if job['detail'] else ''
        print(f"  {job['variant']:<{width}s} seed {job['seed']:<3} {job['action']:<9s} {job['folder']}{detail}")
        if dry_run and job['action'] == 'restart':
            print(f"      moves {job['folder']} aside to {job['folder'].name}.failed-<timestamp>, then runs")
        if dry_run and job['action'] in RUNNING:
            print(f'      {shown(command_of(job, sweep, preset, extra))}')
    counts = {}
    for job in plan:
        counts[job['action']] = counts.get(job['action'], 0) + 1
    print('  ' + ', '.join(f'{n} {action}' for action, n in counts.items()), flush=True)


def command_of(job, sweep, preset, extra):
    """main.py's arguments for a job of the plan."""
    if job['action'] == 'resume':
        return resume_args(job['folder'], extra, evaluate=job['evaluate'])
    return train_args(sweep, job['variant'], job['seed'], job['folder'], preset, extra)


# --------------------------------------------------------------------------
# How many runs at once, with how many threads
# --------------------------------------------------------------------------

def available_memory():
    """Bytes of memory available for new processes (MemAvailable), or None if unknown."""
    try:
        with open('/proc/meminfo') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def choose_jobs(jobs, threads, cpus, memory=None):
    """(runs at a time, threads per run, the sentence saying why) for --jobs and --threads
    (None: not given) on a process that may use ``cpus`` CPUs with ``memory`` bytes available.

    One thread per run unless told: on this project's step, 2 threads make a run only about
    1.5x faster than 1 (docs/benchmarks.md), so two 1-thread runs finish more work per hour.
    N x T never exceeds the CPUs: more would make every run slower for nothing.
    """
    for name, value in (('--jobs', jobs), ('--threads', threads)):
        if value is not None and value < 1:
            raise UsageError(f'{name} {value} is not a positive integer; give e.g. {name} 1')
    if threads is not None and threads > cpus:
        raise UsageError(f'--threads {threads} is more than the {cpus} CPUs this process may use; '
                         f'give --threads {cpus} or fewer')
    if jobs is not None and jobs > cpus:
        raise UsageError(f'--jobs {jobs} is more than the {cpus} CPUs this process may use (each run needs '
                         f'one at least); give --jobs {cpus} or fewer')
    if jobs is not None and threads is not None:
        if jobs * threads > cpus:
            raise UsageError(f'--jobs {jobs} x --threads {threads} = {jobs * threads} threads is more than the '
                             f'{cpus} CPUs this process may use; give fewer jobs or threads')
        return jobs, threads, f'{_runs(jobs)} at a time, {_threads(threads)} each (as given)'
    if jobs is not None:
        threads = max(1, cpus // jobs)
        return jobs, threads, f'{_runs(jobs)} at a time (as given), {_threads(threads)} each (of {cpus} CPUs)'
    if threads is not None:
        jobs = max(1, cpus // threads)
        return jobs, threads, f'{_runs(jobs)} at a time (the {cpus} CPUs / --threads {threads})'
    jobs = cpus if memory is None else max(1, min(cpus, memory // MEMORY_PER_RUN))
    why = f'{_runs(jobs)} at a time, 1 thread each: one per CPU this process may use ({cpus})'
    if jobs < cpus:
        why += f', fewer for the memory available ({memory / 2**30:.1f} GiB, 2 GiB a run)'
    return jobs, 1, why + '; choose with --jobs/--threads'


def _runs(n):
    return f"{n} run{'s' if n != 1 else ''}"


def _threads(n):
    return f"{n} thread{'s' if n != 1 else ''}"


def run_environment(threads, base=None):
    """The environment of a run's main.py process: its worker threads and BLAS threads set."""
    env = dict(os.environ if base is None else base)
    env[THREADS_ENV] = str(threads)
    for name in BLAS_THREAD_VARIABLES:
        env[name] = str(threads)
    return env


# --------------------------------------------------------------------------
# Outcomes
# --------------------------------------------------------------------------

def outcome(job, code, output=''):
    """What a finished main.py process means for the run: (result, kind), kind one of DONE,
    UNFINISHED, REFUSED, CRASHED. output: the run's last console lines, quoted when it failed."""
    folder = job['folder']
    said = f': {output}' if output else ''
    if code == MAIN_OK:
        try:
            metrics = runfiles.read_metrics(folder)
            if metrics is None:
                raise RunFileError(f'{folder} has none')
        except RunFileError as e:
            return f'crashed: main.py exited 0 without a readable metrics.json ({e})', CRASHED
        if metrics.stopped_early:
            return f'stopped early ({metrics.stop_reason}); run the sweep again to resume it', UNFINISHED
        return 'finished', DONE
    if code == MAIN_DIVERGED:
        return 'diverged (kept as a result)', DONE
    if code == MAIN_ABORTED:
        return 'aborted (exit 130); run the sweep again to resume it', UNFINISHED
    if code == MAIN_REFUSED:
        problem = checkpoint_problem(folder) if job['action'] == 'resume' else None
        if problem:
            return f'damaged, set aside: {problem}', REFUSED
        return (f'refused by main.py (exit 2{said}); fix what it names and run the sweep again'), REFUSED
    return crash_result(folder, code), CRASHED


def crash_result(folder, code):
    """The result line of a main.py that crashed (exit 3), was killed by a signal or exited
    with a code main.py does not use."""
    log = compare.quoted(log_path(folder))
    if code == MAIN_CRASHED:
        try:
            crash = runfiles.read_crash(folder)     # main.py records what it crashed on
        except RunFileError:
            crash = None
        what = f'exit 3: {crash.message}' if crash else 'exit 3'
        where = f'the traceback is in {folder / runfiles.LOG_NAME}' if crash else f'its output is in {log}'
        cause = f'crashed ({what}), a bug: {where}'
    elif code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f'signal {-code}'
        cause = f'crashed: killed by {name} (out of memory, or killed by someone?)'
    else:
        cause = f'crashed: main.py exited with code {code}, which it does not use (its output is in {log})'
    return f'{cause}; the next run of the sweep tries it again'


def last_line(path):
    """The last non-blank line of a run's console output ('' if none): what main.py said last."""
    try:
        with open(path, 'rb') as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
            lines = [l.strip() for l in f.read().decode('utf-8', 'replace').splitlines() if l.strip()]
    except OSError:
        return ''
    return lines[-1].split('\r')[-1] if lines else ''


def move_aside(folder):
    """Rename a failed run folder to <name>.failed-<timestamp>; returns the new path."""
    stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
    target = folder.with_name(f'{folder.name}.failed-{stamp}')
    folder.rename(target)
    return target


def skipped_result(job):
    """(result, kind) of a job that is not run this time."""
    action, detail = job['action'], job['detail']
    if action == 'finished':
        return 'finished (skipped)', DONE
    if action == 'diverged':
        return f'diverged earlier: {detail} (kept as a result)', DONE
    if action == 'in use':
        return f'in use: {detail}', REFUSED
    if detail.startswith(f'{action}: '):          # compare.py's reasons start with the same word
        detail = detail[len(action) + 2:]
    return f'{action}, set aside: {detail}', REFUSED


# --------------------------------------------------------------------------
# Running: the progress of the sweep, and signals
# --------------------------------------------------------------------------

class Signals:
    """Remembers a SIGINT or SIGTERM, so the sweep stops once its running runs have stopped.

    Ctrl-C reaches the running main.py processes from the terminal itself (same process
    group), which then stop cleanly; a SIGTERM sent to this process alone is passed on to them.
    """

    def __init__(self):
        self.reason = None
        self.children = set()
        self.terminated = set()     # the children the handler passed a SIGTERM on to
        self.previous = {}

    def __enter__(self):
        cli.raise_if_interrupted_while_starting()    # one whose exception was discarded on the way

        def handler(signum, frame):
            self.reason = signal.Signals(signum).name
            if signum == signal.SIGTERM:
                for child in list(self.children):
                    if child.poll() is None:
                        child.send_signal(signal.SIGTERM)
                        self.terminated.add(child)
        self.previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, h in self.previous.items():
            signal.signal(s, h)


class Progress:
    """One bar for the sweep (done / running / failed, elapsed, time left) and a line per run.

    started_word: 'started' for runs on this machine; 'submitted' on Ray, where a task may wait
    in Ray's queue for a free CPU (the bar then counts runs in flight, queued or running).
    """

    def __init__(self, total, started_word='started'):
        self.total, self.done, self.running, self.failed = total, 0, 0, 0
        self.started_word = started_word
        self.in_flight = 'running' if started_word == 'started' else 'in flight'
        self.bar = tqdm(total=total, unit='run', desc='sweep', dynamic_ncols=True, disable=None,
                        bar_format='{desc}: {n}/{total} runs |{bar}| {elapsed} elapsed, {remaining} left{postfix}')
        self._show()

    def _show(self):
        self.bar.set_postfix_str(f'{self.running} {self.in_flight}, {self.failed} failed', refresh=True)

    def say(self, line):
        self.bar.write(line, file=sys.stdout)
        sys.stdout.flush()

    def started(self, k, job, args):
        self.running += 1
        self.say(f"[{k}/{self.total}] {job['variant']} seed {job['seed']} {self.started_word}: {shown(args)}")
        self._show()

    def ended(self, k, job, result, kind, seconds, started=True):
        """A run's end; started=False for one that failed before it could start."""
        self.running -= started
        self.done += 1
        self.failed += kind in (CRASHED, REFUSED)
        self.say(f"[{k}/{self.total}] {job['variant']} seed {job['seed']}: {result} "
                 f"({cli.format_duration(seconds)})")
        self.bar.update(1)
        self._show()

    def close(self):
        self.bar.close()


def prepare_folder(job):
    """Move a 'restart' job's failed folder aside; returns an error result tuple, or None."""
    if job['action'] != 'restart':
        return None
    try:
        moved = move_aside(job['folder'])
    except OSError as e:
        return (f"cannot move the failed folder aside ({describe_os_error(e, job['folder'])}); "
                f"move it by hand: {move_command(job['folder'], 'failed')}", REFUSED)
    print(f"moved {job['folder']} (no checkpoint) aside to {moved.name}", flush=True)
    return None


def open_log(folder, args):
    """The run's console log, opened for appending, with a header line for this attempt."""
    log = runfiles.open_regular(log_path(folder), 'a')
    log.write(f"\n=== {datetime.datetime.now():%Y-%m-%d %H:%M:%S} python main.py {shlex.join(args)}\n")
    log.flush()
    return log


def run_locally(todo, sweep, preset, extra, jobs, threads, signals, progress):
    """Carry out the jobs on this machine, ``jobs`` main.py processes at a time, each with
    ``threads`` threads; returns [(job, result, kind, seconds)] and stops starting new runs on a
    signal. A run that fails is not tried again within the same call."""
    results, queue, running = [], list(enumerate(todo, 1)), {}
    env = run_environment(threads)
    while queue or running:
        while queue and len(running) < jobs and not signals.reason:
            k, job = queue.pop(0)
            failed = prepare_folder(job)
            if failed:
                results.append((job, *failed, 0.0))
                progress.ended(k, job, *failed, 0.0, started=False)
                continue
            args = command_of(job, sweep, preset, extra)
            try:
                log = open_log(job['folder'], args)
            except OSError as e:
                failed = (f"cannot write its console log ({describe_os_error(e, log_path(job['folder']))}); "
                          f"choose a writable --runs-dir", REFUSED)
                results.append((job, *failed, 0.0))
                progress.ended(k, job, *failed, 0.0, started=False)
                continue
            with log:
                child = subprocess.Popen([sys.executable, str(MAIN), *args], stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, env=env)
            signals.children.add(child)
            if signals.reason == 'SIGTERM' and child not in signals.terminated:
                child.send_signal(signal.SIGTERM)       # it came while Popen was starting this one
            running[child] = (k, job, time.monotonic())
            progress.started(k, job, args)
        if signals.reason and queue:
            for k, job in queue:
                results.append((job, f'not started ({signals.reason})', UNFINISHED, 0.0))
            queue = []
        for child in [c for c in running if c.poll() is not None]:
            k, job, start = running.pop(child)
            signals.children.discard(child)
            code = child.returncode
            result, kind = outcome(job, code, last_line(log_path(job['folder'])))
            results.append((job, result, kind, time.monotonic() - start))
            progress.ended(k, job, result, kind, time.monotonic() - start)
            if code == MAIN_ABORTED and not signals.reason:
                signals.reason = 'main.py aborted'
                for other in running:           # the others stop after their step, checkpointed
                    other.send_signal(signal.SIGTERM)
        if running:
            time.sleep(POLL_SECONDS)
    return results


# --------------------------------------------------------------------------
# Running on Ray
# --------------------------------------------------------------------------

def pack_folder(folder):
    """A run folder as tar bytes (uncompressed: the .npz members are compressed already)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode='w') as tar:
        tar.add(str(folder), arcname='run',
                filter=lambda info: None if Path(info.name).name == runfiles.LOCK_NAME else info)
    return buffer.getvalue()


def unpack_folder(data, into):
    """Extract pack_folder's bytes into ``into``/run (links, devices and paths leaving it refused)."""
    with tarfile.open(fileobj=io.BytesIO(data), mode='r') as tar:
        tar.extractall(into, filter='data')
    return Path(into) / 'run'


def _die_with_parent_then_exec():
    """The start of a worker's main.py process, given as ``python -c``: ask Linux to kill this
    process when the Ray worker that started it dies (PR_SET_PDEATHSIG), then become main.py.
    A worker killed mid-run then leaves no training behind, and Ray tries the run again."""
    return ('import ctypes, os, signal, sys\n'
            'try:\n'
            '    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)\n'
            'except (OSError, AttributeError):\n'
            '    pass\n'
            'if os.getppid() != int(sys.argv[1]):\n'
            '    sys.exit(137)\n'
            'os.execv(sys.executable, [sys.executable] + sys.argv[2:])\n')


def worker_archive(archive_refs, sha256):
    """The data archive on this Ray worker's machine: the cached copy named by its sha256, or
    the one shipped through Ray written there first (atomically: tasks side by side share it)."""
    import ray
    root = Path(os.environ.get(DATA_CACHE_ENV) or Path(tempfile.gettempdir()) / 'cnnrnn-data')
    cache = root / sha256
    archive = cache / 'cifar-10-python.tar.gz'
    if not archive.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        data = ray.get(archive_refs[0])
        fd, tmp = tempfile.mkstemp(prefix='.archive-', dir=cache)
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
        os.replace(tmp, archive)
    return cache


@contextlib.contextmanager
def held_lock(path):
    """An exclusive lock on ``path`` (created) while the with-block runs: the work folder is in use."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def remove_abandoned_work_folders(min_age=60.0):
    """Remove the work folders of tasks whose worker was killed (see remove_if_abandoned)."""
    for work in Path(tempfile.gettempdir()).glob(WORK_PREFIX + '*'):
        remove_if_abandoned(work, min_age)


def remove_if_abandoned(work, min_age=60.0):
    """Remove one work folder if nobody holds its lock any more and it is older than ``min_age``
    seconds (a brand-new one may not be locked yet)."""
    try:
        if not work.is_dir() or work.is_symlink() or time.time() - work.stat().st_mtime < min_age:
            return
        # O_CREAT: a task killed between making its folder and its lock left no lock file.
        fd = os.open(work / '.lock', os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        shutil.rmtree(work, ignore_errors=True)
    except OSError:          # still in use
        pass
    finally:
        os.close(fd)


def train_on_worker(args, archive_refs, sha256, threads, folder_tar):
    """A Ray task: one main.py run in a temporary folder of the worker's machine.

    args: main.py's arguments with the run folder 'run' and the data folder 'data' (both
    relative to the temporary folder); folder_tar: the run folder to resume (pack_folder's
    bytes) or None. Returns {'code': main.py's exit code, 'folder': the run folder as tar
    bytes (None if main.py made none), 'output': its console output}.
    """
    remove_abandoned_work_folders()
    with tempfile.TemporaryDirectory(prefix=WORK_PREFIX) as work, held_lock(Path(work) / '.lock'):
        os.symlink(worker_archive(archive_refs, sha256), Path(work) / 'data')
        if folder_tar is not None:
            unpack_folder(folder_tar, work)
        child = subprocess.Popen(
            [sys.executable, '-c', _die_with_parent_then_exec(), str(os.getpid()), str(MAIN), *args],
            cwd=work, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=run_environment(threads))
        try:
            output, _ = child.communicate()
        except BaseException:           # cancelled: stop the run with the task
            child.kill()
            child.wait()
            raise
        run = Path(work) / 'run'
        return {'code': child.returncode, 'folder': pack_folder(run) if run.is_dir() else None,
                'output': output.decode('utf-8', 'replace')}


def place_folder(data, folder):
    """Put a run folder that came back from a worker at ``folder``, whole: it is unpacked into a
    hidden temporary folder beside it and renamed into place. A resumed run's old folder is
    renamed away first and removed only once the new one is in place."""
    runs_dir = folder.parent
    tmp = Path(tempfile.mkdtemp(prefix=f'.{folder.name}.incoming-', dir=runs_dir))
    try:
        new = unpack_folder(data, tmp)
        if folder.exists():
            folder.rename(tmp / 'old')
        new.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_incoming_leftovers(runs_dir):
    """Remove the hidden temporary folders a sweep killed while placing a run left behind."""
    for path in Path(runs_dir).glob('.*.incoming-*'):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)


def archive_to_ship(extra):
    """The data archive the driver ships to the workers: <data dir>/cifar-10-python.tar.gz, the
    data dir from --extra's --data-dir or 'data'; UsageError if it is not a regular file."""
    tokens, data_dir = list(extra), 'data'
    for i, token in enumerate(tokens):
        if token.split('=', 1)[0] == '--data-dir':
            data_dir = token.split('=', 1)[1] if '=' in token else (tokens[i + 1] if i + 1 < len(tokens) else '')
    archive = Path(data_dir) / 'cifar-10-python.tar.gz'
    try:
        with runfiles.open_regular(archive):     # missing, unreadable or not a file: refused before Ray starts
            pass
    except OSError as e:
        raise UsageError(f"--ray ships the data archive to the workers, and {describe_os_error(e, archive, 'read')}; "
                         f'put cifar-10-python.tar.gz in {data_dir} (or give --extra="--data-dir DIR")') from None
    return archive


def check_listening(address, timeout=10.0):
    """UsageError at once when nothing accepts a connection at a HOST:PORT address: ray.init would
    retry there for many minutes (20 tries of about 40 s in Ray 2.60), deaf to Ctrl-C. Other
    forms (ray://..., auto) are left to Ray."""
    host, _, port = address.rpartition(':')
    if '://' in address or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip('[]'), int(port)), timeout=timeout).close()
    except OSError as e:
        why = e.strerror or str(e) or type(e).__name__
        raise UsageError(f'nothing answers at the Ray address {address} ({why}); start Ray there '
                         f'(ray start --head --port={port}) or give the address of a running cluster\'s '
                         f'head, e.g. --ray 10.0.0.1:6379') from None


def start_ray(address, cpus):
    """ray.init for a local instance (address None: ``cpus`` CPUs) or a running cluster, with
    the project's code as the job's working_dir; UsageError when Ray is missing or unreachable."""
    try:
        import ray
    except ImportError:
        raise UsageError('--ray needs Ray, which is not installed; install it with '
                         'pip install -r requirements-ray.txt (or run without --ray)') from None
    import logging
    if address:
        check_listening(address)
    runtime_env = {'working_dir': str(REPO), 'excludes': RAY_EXCLUDES}
    commit = cli.code_commit(REPO)
    if commit:      # the copy in working_dir has no .git: its runs record this commit all the same
        runtime_env['env_vars'] = {cli.CODE_COMMIT_ENV: commit}
    try:
        # 'local': a new instance even when RAY_ADDRESS is set or `ray start` left a cluster here
        # (ray.init(address=None) would join that one, and refuse num_cpus).
        ray.init(address=address or 'local', num_cpus=None if address else cpus, include_dashboard=False,
                 log_to_driver=False, logging_level=logging.ERROR, runtime_env=runtime_env)
    except (ConnectionError, ValueError, RuntimeError) as e:
        why = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        if not address:
            raise UsageError(f'cannot start a local Ray instance ({why}); fix what it names, or give the '
                             f'address of a running cluster, e.g. --ray 10.0.0.1:6379') from None
        raise UsageError(f'cannot reach a Ray cluster at {address} ({why}); start one (ray start --head) '
                         f'or give its address, e.g. --ray 10.0.0.1:6379') from None
    return ray


def run_on_ray(todo, sweep, preset, extra, address, threads, signals, progress):
    """Carry out the jobs as Ray tasks; returns [(job, result, kind, seconds)]. On a signal the
    tasks not finished are cancelled (their runs start again next time)."""
    archive = archive_to_ship(extra)
    ray = start_ray(address, usable_cpus())
    try:
        with runfiles.open_regular(archive) as f:
            data = f.read()
        sha256 = hashlib.sha256(data).hexdigest()
        archive_refs = [ray.put(data)]       # in a list, so a task fetches it only when it has no copy
        del data
        import sweep as importable    # so that Ray's workers import the function from the code shipped to them
        task = ray.remote(importable.train_on_worker)
        worker_extra = without_options(extra, ('--data-dir',)) + ['--data-dir', 'data']
        pending, results = {}, []
        for k, job in enumerate(todo, 1):
            failed = prepare_folder(job)
            if failed:
                results.append((job, *failed, 0.0))
                progress.ended(k, job, *failed, 0.0, started=False)
                continue
            args = command_of(dict(job, folder=Path('run')), sweep, preset, worker_extra)
            folder_tar = pack_folder(job['folder']) if job['action'] == 'resume' else None
            ref = task.options(num_cpus=threads, max_retries=RAY_RETRIES, retry_exceptions=False,
                               name=f"{job['variant']}-seed{job['seed']}").remote(
                args, archive_refs, sha256, threads, folder_tar)
            shown_args = command_of(job, sweep, preset, extra)    # what the run is, in the user's folders
            pending[ref] = (k, job, time.monotonic(), shown_args)
            progress.started(k, job, shown_args)
        while pending and not signals.reason:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_SECONDS * 5)
            for ref in ready:
                k, job, start, args = pending.pop(ref)
                result, kind = collect(ray, ref, job, args)
                results.append((job, result, kind, time.monotonic() - start))
                progress.ended(k, job, result, kind, time.monotonic() - start)
        for ref, (k, job, start, _) in pending.items():
            ray.cancel(ref, force=True)
            results.append((job, f'cancelled ({signals.reason}); it starts again next time', UNFINISHED,
                            time.monotonic() - start))
    finally:
        ray.shutdown()
    return results


def collect(ray, ref, job, args):
    """(result, kind) of a finished Ray task: its run folder placed, its output logged under a
    header naming ``args`` (main.py's arguments in this machine's folders)."""
    folder = job['folder']
    try:
        answer = ray.get(ref)
    except ray.exceptions.RayTaskError as e:      # train_on_worker raised: not retried (retry_exceptions=False)
        cause = e.cause if getattr(e, 'cause', None) is not None else e
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else ''
        return (f'crashed on its Ray worker ({type(cause).__name__}: {first}); the next run of the sweep '
                f'tries it again'), CRASHED
    except ray.exceptions.RayError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return (f'crashed on Ray after {RAY_RETRIES + 1} tries ({type(e).__name__}: {first}); the next run '
                f'of the sweep tries it again'), CRASHED
    try:
        with open_log(folder, args) as log:
            log.write(answer['output'])
        if answer['folder'] is not None:
            place_folder(answer['folder'], folder)
    except OSError as e:
        return (f'its run folder came back but could not be placed ({describe_os_error(e, folder)}); '
                f'free the space or choose another --runs-dir and run the sweep again'), REFUSED
    return outcome(job, answer['code'], last_line(log_path(folder)))


# --------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------

def print_results(results, seconds):
    print('\nSweep results:')
    width = name_width([job for job, *_ in results])
    for job, result, _, took in results:
        time_taken = '' if not took else f'{took:.0f} s' if took < 90 else f'{took / 60:.1f} min'
        print(f"  {job['variant']:<{width}s} seed {job['seed']:<3} {time_taken:>9s}  {result}")
    counts = {}
    for _, _, kind, _ in results:
        counts[kind] = counts.get(kind, 0) + 1
    print('  ' + ', '.join(f'{n} {kind}' for kind, n in counts.items()))
    print(f'Total wall time: {seconds / 60:.1f} min ({seconds:.0f} s).')


def failures(results):
    """The exit code the runs' results call for (0, 2 or 3) and the words naming the failures ('' if none)."""
    crashed = [f"{job['variant']} seed {job['seed']}" for job, _, kind, _ in results if kind == CRASHED]
    refused = [f"{job['variant']} seed {job['seed']}" for job, _, kind, _ in results if kind == REFUSED]
    parts = []
    if crashed:
        parts.append(f"{len(crashed)} run{'s' if len(crashed) > 1 else ''} crashed ({', '.join(crashed)})")
    if refused:
        parts.append(f"{len(refused)} run{'s' if len(refused) > 1 else ''} could not be run: set aside, "
                     f"refused or in use ({', '.join(refused)})")
    code = EXIT_CRASHED if crashed else EXIT_BAD_INPUT if refused else EXIT_OK
    return code, ' and '.join(parts)


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: {message}; see {cli.help_command(self.prog)}\n")


def parse_args(argv=None, prog='sweep.py', sweep_file=None):
    """The arguments; with ``sweep_file`` (claims.py) the sweep file is fixed, not an argument."""
    parser = _Parser(prog=prog, description='Run a sweep (variants x seeds of main.py, from a JSON file), '
                                            'many runs at once or on Ray, then compare.py over the runs.')
    if sweep_file is None:
        parser.add_argument('sweep', help='the sweep file, e.g. sweeps/claims.json or sweeps/levers.json')
    parser.add_argument('--runs-dir', help="folder of the run folders (default: the sweep file's runs_dir)")
    parser.add_argument('--seeds', type=int, nargs='+', help="seeds of every variant (default: the sweep file's)")
    parser.add_argument('--only', nargs='+', metavar='VARIANT', help='run only these variants')
    parser.add_argument('--dry-run', action='store_true', help='print the plan and the commands; run nothing')
    parser.add_argument('--preset', help="preset of the protocol (default: the sweep file's)")
    parser.add_argument('--extra', default='', help='more main.py options for every new run, as one string, '
                        'e.g. --extra="--data-dir X --max-hours 1"')
    parser.add_argument('--jobs', type=int, help='runs at a time on this machine (default: one per CPU this '
                        'process may use, as memory allows)')
    parser.add_argument('--threads', type=int, help='worker and BLAS threads of each run (default 1, or the '
                        'CPUs / --jobs)')
    parser.add_argument('--ray', nargs='?', const='', default=None, metavar='ADDRESS',
                        help='run each run as a Ray task: on a local Ray instance, or the cluster at ADDRESS')
    args = parser.parse_args(argv)
    if sweep_file is not None:
        args.sweep = sweep_file
    return args


def check_args(args, sweep):
    """(variants, seeds, runs_dir, extra) to run; UsageError for bad arguments."""
    unknown = [v for v in args.only or [] if v not in sweep.variants]
    if unknown:
        raise UsageError(f"unknown variant {', '.join(unknown)}; choose from {', '.join(sweep.variants)}")
    seeds = sweep.seeds if args.seeds is None else check_seeds(args.seeds, '--seeds')
    if args.preset is not None:
        check_preset(sweep, args.preset, '--preset')
    if args.runs_dir is not None and not args.runs_dir.strip():
        raise UsageError('--runs-dir was given an empty path; give a folder, e.g. runs/claims')
    runs_dir = Path(args.runs_dir if args.runs_dir is not None else sweep.runs_dir)
    if runs_dir.exists() and not runs_dir.is_dir():
        raise UsageError(f'--runs-dir {runs_dir} is not a folder; give a folder, e.g. runs/claims')
    if runs_dir.is_symlink() and not runs_dir.exists():
        raise UsageError(f'--runs-dir {runs_dir} is a link to nothing; remove the link or give '
                         f'another folder, e.g. runs/claims')
    inside = compare.run_folder_at_or_above(runs_dir.resolve(), [])
    if inside is not None:
        where = 'a run folder' if inside == runs_dir.resolve() else f'inside the run folder {inside}'
        raise UsageError(f'--runs-dir {runs_dir} is {where}; give the folder that holds the sweep\'s '
                         f'runs, e.g. runs/claims')
    try:
        extra = shlex.split(args.extra)
    except ValueError as e:
        raise UsageError(f'--extra {args.extra!r} cannot be split into options ({e}); check its quotes') from None
    fixed = [t for t in extra if t.split('=', 1)[0] in ('--out', '--seed', '--resume')]
    if fixed:
        raise UsageError(f"--extra cannot contain {fixed[0].split('=', 1)[0]}: the sweep sets it for each run")
    if args.ray is not None and args.jobs is not None:
        raise UsageError('--jobs is for runs on this machine; with --ray each run asks Ray for --threads '
                         'CPUs and Ray places them')
    variants = [v for v in sweep.variants if v in (args.only or sweep.variants)]
    return variants, seeds, runs_dir, extra


def baseline_run(runs_dir, variant):
    """A run folder of the baseline variant with a config.json, for compare.py's --baseline, or None.

    Only the sweep's own names (<variant>-seed<K>): a folder moved aside
    (...-seed0.failed-..., .damaged) may hold anything. Only a run whose
    config.json agrees with its checkpoint: an edited one would name the wrong
    baseline, and compare.py refuses it.
    """
    return next((p for p in sorted(Path(runs_dir).glob(f'{variant}-seed*'))
                 if re.fullmatch(re.escape(variant) + r'-seed\d+', p.name)
                 and (p / runfiles.CONFIG_NAME).is_file() and config_problem(p) is None), None)


def run_sweep(args):
    """Everything after the arguments were parsed; returns the exit code."""
    try:
        sweep = load_sweep(args.sweep)
        variants, seeds, runs_dir, extra = check_args(args, sweep)
        if args.ray is None:
            jobs, threads, where = choose_jobs(args.jobs, args.threads, usable_cpus(), available_memory())
            where = f'on this machine: {where}'
        else:
            threads = 1 if args.threads is None else args.threads
            if threads < 1:
                raise UsageError(f'--threads {threads} is not a positive integer; give e.g. --threads 1')
            jobs, where = None, (f"on Ray ({'a local instance' if not args.ray else args.ray}): each run a "
                                 f'task of {_threads(threads)} (--threads)')
            if args.ray == '' and threads > usable_cpus():
                raise UsageError(f'--threads {threads} is more than the {usable_cpus()} CPUs of the local '
                                 f'Ray instance; give --threads {usable_cpus()} or fewer')
    except UsageError as e:
        print(f'{args.prog}: {e}', file=sys.stderr)
        return EXIT_BAD_INPUT
    preset = args.preset or sweep.preset
    plan = make_plan(runs_dir, variants, seeds)
    print_plan(plan, sweep, runs_dir, preset, extra, args.dry_run, where)
    if args.dry_run:
        return EXIT_OK
    try:
        runs_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"{args.prog}: {describe_os_error(e, runs_dir, 'create')}; choose a writable --runs-dir",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    remove_incoming_leftovers(runs_dir)
    start = time.monotonic()
    skipped = [(job, *skipped_result(job), 0.0) for job in plan if job['action'] not in RUNNING]
    todo = [job for job in plan if job['action'] in RUNNING]
    with Signals() as signals:
        progress = Progress(len(todo), 'started' if args.ray is None else 'submitted')
        try:
            if args.ray is None:
                ran = run_locally(todo, sweep, preset, extra, jobs, threads, signals, progress)
            else:
                ran = run_on_ray(todo, sweep, preset, extra, args.ray or None, threads, signals, progress)
        except UsageError as e:
            progress.close()
            print(f'{args.prog}: {e}', file=sys.stderr)
            return EXIT_BAD_INPUT
        progress.close()
    order = {id(job): i for i, job in enumerate(plan)}
    results = sorted(skipped + ran, key=lambda r: order[id(r[0])])
    print_results(results, time.monotonic() - start)
    if signals.reason:
        print(f'{args.prog}: stopped ({signals.reason}); run the same command again to continue: finished '
              f'runs are skipped, interrupted ones resume', file=sys.stderr)
        return EXIT_INTERRUPTED
    return compare_all(runs_dir, results, sweep.baseline, args.prog)


def compare_all(runs_dir, results, baseline, prog):
    """compare.py over every run in runs_dir, then the sweep's exit code and its last sentence."""
    print(f'\nComparing every run in {runs_dir}:')
    base = baseline_run(runs_dir, baseline)
    compared = compare.main([str(runs_dir), '--out', str(runs_dir / 'comparison')]
                            + (['--baseline', str(base)] if base else []))
    if compared == compare.EXIT_ABORTED:
        print(f'{prog}: interrupted while comparing; run the same command again (finished runs are '
              f'skipped, the comparison is redone)', file=sys.stderr)
        return EXIT_INTERRUPTED
    code, failed = failures(results)
    if compared != compare.EXIT_OK:
        failed = '; '.join(filter(None, [failed, f'the comparison was not written (compare.py exit {compared})']))
        code = max(code, EXIT_BAD_INPUT if compared == compare.EXIT_BAD_INPUT else EXIT_CRASHED)
    if failed:
        print(f'{prog}: {failed}; the lines of the results above say why and what to do', file=sys.stderr)
    return code


def main(argv=None, prog='sweep.py', sweep_file=None):
    """CLI entry point; returns the exit code (see the module docstring)."""
    try:
        cli.raise_if_interrupted_while_starting()
        args = parse_args(argv, prog, sweep_file)
        args.prog = prog
        return run_sweep(args)
    except SystemExit as e:       # --help, or a usage error already printed as one sentence
        return e.code
    except cli.StartupInterrupted as e:
        print(cli.interrupted_message(prog, e), file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:        # a bug: one line, not a traceback
        return cli.report_crash(prog, e)


if __name__ == '__main__':
    sys.exit(main())
