"""Re-measure the method's claims: the baseline and one variant per claim, over seeds, then a comparison.

    python claims.py [--runs-dir runs/claims] [--seeds 0 1 2] [--only VARIANT ...] [--dry-run]
                     [--preset fast] [--extra "MORE MAIN.PY OPTIONS"]

Every variant x seed is one run of the `fast` protocol (15 epochs on 40% of
the training set), trained by main.py in a process of its own, so that a crash
or a divergence of one run does not stop the others:

    python main.py --preset fast --subset 0.4 <the variant's options> --seed K \\
                   --out <runs-dir>/<variant>-seed<K> <--extra>

The suite is resumable; what it does with each run folder, by its state (runfiles.status,
the one vocabulary of the run-folder contract):

    new (absent or empty)                   run it
    finished (consistent by compare.py's checks)
                                            skip it
    diverged (diverged.json)                skip it: the divergence is the result
                                            (running it again would diverge again)
    stopped (early, interrupted, or crashed: crashed.json), or needs evaluation
                                            resume it: python main.py --resume <run>/ckpt.npz
                                            (with --evaluate when only the test evaluation is to redo)
    in use by another process               skip it this time
    damaged: files but no checkpoint (crashed, killed or diverged-then-resumed in its first epoch)
                                            rename it to <name>.failed-<timestamp>
                                            (nothing is deleted) and run it again
    damaged (a checkpoint that cannot be read, a named pipe or folder where a file
    should be) or inconsistent (figures compare.py would leave out)
                                            set it aside: never run, named in the
                                            results with the fix, counted as a failure

What a main.py process's exit code means (cli.py): 0 finished (or stopped early
by a time budget: resumed next time); 1 diverged, kept as a result; 2 refused
(bad input: its message above says why; a resume refused because its checkpoint
is damaged is set aside as damaged); 3, a death by a signal or any other code:
crashed, a failure, tried again (resumed or restarted) only by the next run of
the suite; 130 aborted, which stops the suite.

The plan is printed first, the total wall time at the end, and then compare.py
writes <runs-dir>/comparison/ (comparison.md, comparison.json and figures)
over every run in the folder.

--preset and --extra change the protocol, e.g. for a quick check on other
data: --preset smoke --extra="--data-dir X --subset 1 --epochs 1". Of --extra,
only --max-hours and --data-dir also apply to resumed runs (main.py keeps a
resumed run's configuration).

Exit codes: 0 every run finished, diverged or stopped early by a time budget
(run the same command again to resume those) and the comparison was written;
2 bad arguments, or some run was refused, damaged, inconsistent or in use, or
the comparison could not be written; 3 some run crashed (or claims.py itself
did: a bug); 130 interrupted (run the same command again to continue). The
suite runs every other run before it exits non-zero, and names the failures.
Ctrl-C stops the running main.py cleanly (it receives the terminal's signal
itself and writes its checkpoint) and then the suite; SIGTERM sent to this
process is passed on to the running main.py.
"""
import cli                      # standard library only: set up before the slow imports below

if __name__ == '__main__':
    cli.exit_cleanly_on_interrupt_while_starting()

import argparse
import datetime
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import compare
import runfiles
from runfiles import MAX_SEED, RecordError, RunFileError, describe_os_error

REPO = Path(__file__).resolve().parent
MAIN = REPO / 'main.py'
EXIT_OK, EXIT_BAD_INPUT, EXIT_CRASHED, EXIT_INTERRUPTED = (cli.EXIT_OK, cli.EXIT_BAD_INPUT, cli.EXIT_CRASHED,
                                                           cli.EXIT_ABORTED)
# main.py's exit codes.
MAIN_OK, MAIN_DIVERGED, MAIN_REFUSED, MAIN_CRASHED, MAIN_ABORTED = (
    cli.EXIT_OK, cli.EXIT_DIVERGED, cli.EXIT_BAD_INPUT, cli.EXIT_CRASHED, cli.EXIT_ABORTED)

# The method's protocol: the `fast` preset on 40% of the training set.
PRESET, SUBSET = 'fast', '0.4'
# Each variant: the main.py options on top of the protocol, and the claim it tests.
VARIANTS = {
    'baseline': ([], "the method's settings, unchanged"),
    'no-weight-decay': (['--set', 'weight_decay=0'], 'L2 weight decay: about +3% validation accuracy'),
    'no-clipping': (['--set', 'clip=0'], 'gradient clipping: no NaN divergence'),
    'no-warmup': (['--set', 'warmup_epochs=0'], 'one warm-up epoch: a smoother first epoch'),
    'constant-lr': (['--set', 'decay=1'], 'exponential decay x0.9: better than a constant rate'),
    'no-augmentation': (['--set', 'augment=false'], 'crop + flip augmentation: about +2%'),
    'flat': (['--seq-layout', 'flat'], 'the CNN+RNN design: about +5% over a pure CNN'),
    'rows': (['--seq-layout', 'rows'], "the map read row by row (8 steps) instead of the 'pixels' 64"),
    'gru': (['--cell', 'gru'], 'a GRU cell instead of the vanilla tanh RNN'),
    'lstm': (['--cell', 'lstm'], 'an LSTM cell instead of the vanilla tanh RNN'),
}
# The options of --extra that main.py also accepts with --resume.
RESUME_OPTIONS = ('--max-hours', '--data-dir')
# What each outcome of a run means for the suite's exit code (see the module docstring).
DONE, UNFINISHED, REFUSED, CRASHED = 'done', 'unfinished', 'refused', 'crashed'
# The plan's actions that run main.py.
RUNNING = ('run', 'restart', 'resume')


class UsageError(Exception):
    """Bad arguments: one sentence, exit code 2."""


# --------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------

def train_args(variant, seed, folder, preset=PRESET, extra=()):
    """main.py's arguments for a new run of a variant and seed (without the interpreter and script)."""
    return (['--preset', preset, '--subset', SUBSET, *VARIANTS[variant][0], '--seed', str(seed),
             '--out', str(folder), *extra])


def resume_args(folder, extra=(), evaluate=False):
    """main.py's arguments to continue a run; of ``extra`` only RESUME_OPTIONS are kept."""
    kept, tokens = [], list(extra)
    for i, token in enumerate(tokens):
        name = token.split('=', 1)[0]
        if name in RESUME_OPTIONS:
            kept += [token] if '=' in token else tokens[i:i + 2]
    return ['--resume', str(Path(folder) / runfiles.CHECKPOINT_NAME), *kept] + (['--evaluate'] if evaluate else [])


def shown(args):
    """main.py's command line as it works when typed in the current folder."""
    return compare.main_command(*args)


def move_command(folder, suffix):
    """The shell command that moves a run folder aside, e.g. mv runs/claims/x runs/claims/x.damaged."""
    return f'mv {compare.quoted(folder)} {compare.quoted(f"{folder}.{suffix}")}'



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
        return job('in use', 'another process holds its folder; run the suite again once it has finished')
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
        return 'damaged', f'{state.reason}; then run the suite again', False
    if not os.path.lexists(ckpt):
        return 'restart', (f'it crashed earlier ({crashed}), before its first checkpoint: starting it afresh'
                           if crashed else 'no checkpoint: it crashed or was stopped in its first epoch'), False
    return 'damaged', checkpoint_problem(folder) or f'{state.reason}; then run the suite again', False


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
    return 'inconsistent', f"{run.reason}; then run the suite again", False


def plan_resume(folder, detail, evaluate):
    """('resume', detail, evaluate) once the checkpoint reads whole and config.json agrees with it;
    else the run is set aside."""
    problem = checkpoint_problem(folder)
    if problem:
        return 'damaged', problem, False
    edited = config_problem(folder)
    if edited:
        return 'inconsistent', f'{edited}; then run the suite again', False
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
                f'{move_command(folder, "damaged")} and run the suite again to start it afresh')
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


def print_plan(plan, runs_dir, preset, extra, dry_run):
    variants = list(dict.fromkeys(job['variant'] for job in plan))
    seeds = list(dict.fromkeys(job['seed'] for job in plan))
    protocol = compare.main_command('--preset', preset, '--subset', SUBSET, *extra)
    print(f'Claims suite: {len(variants)} variants x {len(seeds)} seeds = {len(plan)} runs in {runs_dir}; '
          f'protocol: {protocol}')
    for job in plan:
        detail = f"  ({job['detail']})" if job['detail'] else ''
        print(f"  {job['variant']:<16s} seed {job['seed']:<3} {job['action']:<9s} {job['folder']}{detail}")
        if dry_run and job['action'] == 'restart':
            print(f"      moves {job['folder']} aside to {job['folder'].name}.failed-<timestamp>, then runs")
        if dry_run and job['action'] in RUNNING:
            print(f'      {shown(command_of(job, preset, extra))}')
    counts = {}
    for job in plan:
        counts[job['action']] = counts.get(job['action'], 0) + 1
    print('  ' + ', '.join(f'{n} {action}' for action, n in counts.items()))


def command_of(job, preset, extra):
    if job['action'] == 'resume':
        return resume_args(job['folder'], extra, evaluate=job['evaluate'])
    return train_args(job['variant'], job['seed'], job['folder'], preset, extra)


# --------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------

class Signals:
    """Remembers a SIGINT or SIGTERM, so the suite stops after the running main.py.

    Ctrl-C reaches the running main.py from the terminal itself (same process
    group), which then stops cleanly; a SIGTERM sent to this process alone is
    passed on to it.
    """

    def __init__(self):
        self.reason = None
        self.child = None
        self.previous = {}

    def __enter__(self):
        cli.raise_if_interrupted_while_starting()    # one whose exception was discarded on the way

        def handler(signum, frame):
            self.reason = signal.Signals(signum).name
            if signum == signal.SIGTERM and self.child is not None and self.child.poll() is None:
                self.child.send_signal(signal.SIGTERM)
        self.previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, h in self.previous.items():
            signal.signal(s, h)


def run_main(args, signals):
    """Run main.py with ``args`` in a child process; return its exit code (negative: killed by that signal)."""
    signals.child = subprocess.Popen([sys.executable, str(MAIN), *args])
    try:
        return signals.child.wait()
    finally:
        signals.child = None


def outcome(job, code):
    """What a finished main.py process means for the run: (result, kind), kind one of DONE,
    UNFINISHED, REFUSED, CRASHED."""
    folder = job['folder']
    if code == MAIN_OK:
        try:
            metrics = runfiles.read_metrics(folder)
            if metrics is None:
                raise RunFileError(f'{folder} has none')
        except RunFileError as e:
            return f'crashed: main.py exited 0 without a readable metrics.json ({e})', CRASHED
        if metrics.stopped_early:
            return f'stopped early ({metrics.stop_reason}); run the suite again to resume it', UNFINISHED
        return 'finished', DONE
    if code == MAIN_DIVERGED:
        return 'diverged (kept as a result)', DONE
    if code == MAIN_ABORTED:
        return 'aborted (exit 130); run the suite again to resume it', UNFINISHED
    if code == MAIN_REFUSED:
        problem = checkpoint_problem(folder) if job['action'] == 'resume' else None
        if problem:
            return f'damaged, set aside: {problem}', REFUSED
        return ('refused by main.py (exit 2; its message above says why); fix what it names and run '
                'the suite again'), REFUSED
    return crash_result(folder, code), CRASHED


def crash_result(folder, code):
    """The result line of a main.py that crashed (exit 3), was killed by a signal or exited
    with a code main.py does not use."""
    if code == MAIN_CRASHED:
        try:
            crash = runfiles.read_crash(folder)     # main.py records what it crashed on
        except RunFileError:
            crash = None
        what = f'exit 3: {crash.message}' if crash else 'exit 3'
        where = f'the traceback is in {folder / runfiles.LOG_NAME}' if crash else \
            'its message above says where the traceback is'
        cause = f'crashed ({what}), a bug: {where}'
    elif code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f'signal {-code}'
        cause = f'crashed: killed by {name} (out of memory, or killed by someone?)'
    else:
        cause = f'crashed: main.py exited with code {code}, which it does not use (see its output above)'
    return f'{cause}; the next run of the suite tries it again'


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


def run_plan(plan, preset, extra, signals):
    """Carry out the plan; returns [(job, result, kind, seconds)] in the plan's order and stops
    early on a signal. A run that fails is not tried again within the same call."""
    results = [(job, *skipped_result(job), 0.0) for job in plan if job['action'] not in RUNNING]
    todo = [job for job in plan if job['action'] in RUNNING]
    for k, job in enumerate(todo, 1):
        if signals.reason:
            results.append((job, f'not started ({signals.reason})', UNFINISHED, 0.0))
            continue
        if job['action'] == 'restart':
            try:
                moved = move_aside(job['folder'])
            except OSError as e:
                results.append((job, f"cannot move the failed folder aside ({describe_os_error(e, job['folder'])}); "
                                     f"move it by hand: {move_command(job['folder'], 'failed')}", REFUSED, 0.0))
                continue
            print(f"moved {job['folder']} (no checkpoint) aside to {moved.name}", flush=True)
        args = command_of(job, preset, extra)
        print(f"\n[{k}/{len(todo)}] {job['variant']} seed {job['seed']}: {shown(args)}", flush=True)
        start = time.monotonic()
        code = run_main(args, signals)
        results.append((job, *outcome(job, code), time.monotonic() - start))
        if code == MAIN_ABORTED and not signals.reason:
            signals.reason = 'main.py aborted'
    order = {id(job): i for i, job in enumerate(plan)}
    return sorted(results, key=lambda r: order[id(r[0])])


def print_results(results, seconds):
    print('\nClaims suite results:')
    for job, result, _, took in results:
        time_taken = '' if not took else f'{took:.0f} s' if took < 90 else f'{took / 60:.1f} min'
        print(f"  {job['variant']:<16s} seed {job['seed']:<3} {time_taken:>9s}  {result}")
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
        self.exit(EXIT_BAD_INPUT, f"claims.py: {message}; see python {compare.quoted(REPO / 'claims.py')} --help\n")


def parse_args(argv=None):
    parser = _Parser(description="Re-measure the method's claims: the baseline and one variant per claim, "
                                 'over several seeds, then compare.py over all the runs.',
                     epilog='variants: ' + '; '.join(f'{name} ({claim})' for name, (_, claim) in VARIANTS.items()))
    parser.add_argument('--runs-dir', default='runs/claims', help='folder of the run folders (default runs/claims)')
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2], help='seeds of every variant '
                        '(default 0 1 2)')
    parser.add_argument('--only', nargs='+', metavar='VARIANT', help='run only these variants')
    parser.add_argument('--dry-run', action='store_true', help='print the plan and the commands; run nothing')
    parser.add_argument('--preset', default=PRESET, help=f'preset of the protocol (default {PRESET})')
    parser.add_argument('--extra', default='', help='more main.py options for every new run, as one string, '
                        'e.g. --extra="--data-dir X --max-hours 1"')
    return parser.parse_args(argv)


def check_args(args):
    """The variants to run and the --extra options as a list; UsageError for bad arguments."""
    unknown = [v for v in args.only or [] if v not in VARIANTS]
    if unknown:
        raise UsageError(f"unknown variant {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    bad = [s for s in args.seeds if not 0 <= s <= MAX_SEED]
    if bad:
        raise UsageError(f'--seeds {bad[0]} is outside [0, {MAX_SEED}]; give seeds as for main.py')
    if len(set(args.seeds)) != len(args.seeds):
        raise UsageError('--seeds repeats a seed; give each seed once')
    if not args.runs_dir.strip():
        raise UsageError('--runs-dir was given an empty path; give a folder, e.g. runs/claims')
    runs_dir = Path(args.runs_dir)
    if runs_dir.exists() and not runs_dir.is_dir():
        raise UsageError(f'--runs-dir {args.runs_dir} is not a folder; give a folder, e.g. runs/claims')
    if runs_dir.is_symlink() and not runs_dir.exists():
        raise UsageError(f'--runs-dir {args.runs_dir} is a link to nothing; remove the link or give '
                         f'another folder, e.g. runs/claims')
    inside = compare.run_folder_at_or_above(runs_dir.resolve(), [])
    if inside is not None:
        where = 'a run folder' if inside == runs_dir.resolve() else f'inside the run folder {inside}'
        raise UsageError(f'--runs-dir {args.runs_dir} is {where}; give the folder that holds the suite\'s '
                         f'runs, e.g. runs/claims')
    try:
        extra = shlex.split(args.extra)
    except ValueError as e:
        raise UsageError(f'--extra {args.extra!r} cannot be split into options ({e}); check its quotes') from None
    fixed = [t for t in extra if t.split('=', 1)[0] in ('--out', '--seed', '--resume')]
    if fixed:
        raise UsageError(f"--extra cannot contain {fixed[0].split('=', 1)[0]}: the suite sets it for each run")
    variants = [v for v in VARIANTS if v in (args.only or VARIANTS)]
    return variants, extra


def baseline_run(runs_dir):
    """A run folder of the baseline variant with a config.json, for compare.py's --baseline, or None.

    Only the suite's own names (baseline-seed<K>): a folder moved aside
    (baseline-seed0.failed-..., .damaged) may hold anything. Only a run whose
    config.json agrees with its checkpoint: an edited one would name the wrong
    baseline, and compare.py refuses it.
    """
    return next((p for p in sorted(Path(runs_dir).glob('baseline-seed*'))
                 if re.fullmatch(r'baseline-seed\d+', p.name) and (p / runfiles.CONFIG_NAME).is_file()
                 and config_problem(p) is None), None)


def run_suite(args):
    """Everything after the arguments were parsed; returns the exit code."""
    try:
        variants, extra = check_args(args)
    except UsageError as e:
        print(f'claims.py: {e}', file=sys.stderr)
        return EXIT_BAD_INPUT
    runs_dir = Path(args.runs_dir)
    plan = make_plan(runs_dir, variants, args.seeds)
    print_plan(plan, runs_dir, args.preset, extra, args.dry_run)
    if args.dry_run:
        return EXIT_OK
    if any(job['action'] in ('run', 'restart') for job in plan):
        try:
            runs_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            print(f"claims.py: {describe_os_error(e, runs_dir, 'create')}; choose a writable --runs-dir",
                  file=sys.stderr)
            return EXIT_BAD_INPUT
    start = time.monotonic()
    with Signals() as signals:
        results = run_plan(plan, args.preset, extra, signals)
    print_results(results, time.monotonic() - start)
    if signals.reason:
        print(f'claims.py: stopped ({signals.reason}); run the same command again to continue: finished '
              f'runs are skipped, interrupted ones resume', file=sys.stderr)
        return EXIT_INTERRUPTED
    return compare_all(runs_dir, results)


def compare_all(runs_dir, results):
    """compare.py over every run in runs_dir, then the suite's exit code and its last sentence."""
    print(f'\nComparing every run in {runs_dir}:')
    base = baseline_run(runs_dir)
    compared = compare.main([str(runs_dir), '--out', str(runs_dir / 'comparison')]
                            + (['--baseline', str(base)] if base else []))
    if compared == compare.EXIT_ABORTED:
        print('claims.py: interrupted while comparing; run the same command again (finished runs are '
              'skipped, the comparison is redone)', file=sys.stderr)
        return EXIT_INTERRUPTED
    code, failed = failures(results)
    if compared != compare.EXIT_OK:
        failed = '; '.join(filter(None, [failed, f'the comparison was not written (compare.py exit {compared})']))
        code = max(code, EXIT_BAD_INPUT if compared == compare.EXIT_BAD_INPUT else EXIT_CRASHED)
    if failed:
        print(f'claims.py: {failed}; the lines of the results above say why and what to do',
              file=sys.stderr)
    return code


def main(argv=None):
    """CLI entry point; returns the exit code (see the module docstring)."""
    try:
        cli.raise_if_interrupted_while_starting()
        return run_suite(parse_args(argv))
    except SystemExit as e:       # --help, or a usage error already printed as one sentence
        return e.code
    except cli.StartupInterrupted as e:
        print(cli.interrupted_message('claims.py', e), file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:        # a bug: one line, not a traceback
        return cli.report_crash('claims.py', e)


if __name__ == '__main__':
    sys.exit(main())
