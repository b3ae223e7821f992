"""Re-measure the method's claims: the baseline and one variant per claim, over seeds, then a comparison.

    python claims.py [--runs-dir runs/claims] [--seeds 0 1 2] [--only VARIANT ...] [--dry-run]
                     [--preset fast] [--extra "MORE MAIN.PY OPTIONS"]

Every variant x seed is one run of the `fast` protocol (15 epochs on 40% of
the training set), trained by main.py in a process of its own, so that a crash
or a divergence of one run does not stop the others:

    python main.py --preset fast --subset 0.4 <the variant's options> --seed K \\
                   --out <runs-dir>/<variant>-seed<K> <--extra>

The suite is resumable; what it does with each run folder:

    absent or empty                         run it
    finished (metrics.json, not stopped early)   skip it
    diverged (train.log ends in main.py's divergence error)
                                            skip it: the divergence is the result
                                            (running it again would diverge again)
    stopped early or interrupted (ckpt.npz) resume it: python main.py --resume <run>/ckpt.npz
    in use by another process               skip it this time
    files but no checkpoint (crashed or killed in its first epoch)
                                            rename it to <name>.failed-<timestamp>
                                            (nothing is deleted) and run it again

The plan is printed first, the total wall time at the end, and then compare.py
writes <runs-dir>/comparison/ (comparison.md, comparison.json and figures)
over every run in the folder.

--preset and --extra change the protocol, e.g. for a quick check on other
data: --preset smoke --extra="--data-dir X --subset 1 --epochs 1". Of --extra,
only --max-hours and --data-dir also apply to resumed runs (main.py keeps a
resumed run's configuration).

Exit codes: 0 every run finished or diverged and the comparison was written;
1 some run failed or is unfinished (its line says why), or the comparison
could not be written; 2 bad arguments; 130 interrupted (run the same command
again to continue). Ctrl-C stops the running main.py cleanly (it receives the
terminal's signal itself and writes its checkpoint) and then the suite; SIGTERM
sent to this process is passed on to the running main.py.
"""
import argparse
import datetime
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import compare
from runfiles import MAX_SEED, RunFileError, folder_in_use, read_json

REPO = Path(__file__).resolve().parent
MAIN = REPO / 'main.py'
EXIT_OK, EXIT_INCOMPLETE, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
# main.py's exit codes.
MAIN_DIVERGED, MAIN_ABORTED = 1, 130

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
    return ['--resume', str(Path(folder) / 'ckpt.npz'), *kept] + (['--evaluate'] if evaluate else [])


def shown(args):
    return shlex.join(['python', 'main.py', *args])


# --------------------------------------------------------------------------
# The plan: what to do with each run folder
# --------------------------------------------------------------------------

def plan_run(folder):
    """(action, detail) for one run folder; action is one of

    'run'      nothing there yet
    'restart'  files but no checkpoint: move it aside, then run
    'resume'   a checkpoint and no final metrics (detail 'evaluate' when only the test evaluation
               is to redo: metrics.json damaged, or predictions.npz missing)
    'finished', 'diverged', 'in use', 'not a folder'   nothing to do now
    """
    if not folder.exists() and not folder.is_symlink():
        return 'run', ''
    if not folder.is_dir():
        return 'not a folder', f'{folder} exists and is not a folder; move it away'
    if not any(folder.iterdir()):
        return 'run', ''
    if folder_in_use(folder):
        return 'in use', 'another process holds its folder'
    diverged = compare.divergence(folder)
    if diverged:
        return 'diverged', diverged
    # main.py writes metrics.json, then predictions.npz: a run killed between the two, or one
    # whose metrics.json is damaged, needs its evaluation redone (--evaluate).
    evaluate = False
    if (folder / 'metrics.json').is_file():
        try:
            metrics = read_json(folder / 'metrics.json')
            finished = isinstance(metrics, dict) and metrics.get('stopped_early') is False
        except RunFileError:
            finished, evaluate = False, True
        if finished and (folder / 'predictions.npz').is_file():
            return 'finished', ''
        evaluate = evaluate or finished
    if (folder / 'ckpt.npz').is_file():
        return 'resume', 'evaluate' if evaluate else ''
    return 'restart', 'no checkpoint: it crashed or was stopped in its first epoch'


def make_plan(runs_dir, variants, seeds):
    """[{variant, seed, folder, action, detail}] for every variant x seed, in that order."""
    plan = []
    for variant in variants:
        for seed in seeds:
            folder = Path(runs_dir) / f'{variant}-seed{seed}'
            action, detail = plan_run(folder)
            plan.append({'variant': variant, 'seed': seed, 'folder': folder, 'action': action,
                         'detail': detail})
    return plan


def print_plan(plan, runs_dir, preset, extra, dry_run):
    variants = list(dict.fromkeys(job['variant'] for job in plan))
    seeds = list(dict.fromkeys(job['seed'] for job in plan))
    protocol = shlex.join(['--preset', preset, '--subset', SUBSET, *extra])
    print(f'Claims suite: {len(variants)} variants x {len(seeds)} seeds = {len(plan)} runs in {runs_dir}; '
          f'protocol: python main.py {protocol}')
    for job in plan:
        detail = f"  ({job['detail']})" if job['detail'] and job['detail'] != 'evaluate' else ''
        print(f"  {job['variant']:<16s} seed {job['seed']:<3} {job['action']:<9s} {job['folder']}{detail}")
        if dry_run and job['action'] in ('run', 'restart', 'resume'):
            print(f'      {shown(command_of(job, preset, extra))}')
    counts = {}
    for job in plan:
        counts[job['action']] = counts.get(job['action'], 0) + 1
    print('  ' + ', '.join(f'{n} {action}' for action, n in counts.items()))


def command_of(job, preset, extra):
    if job['action'] == 'resume':
        return resume_args(job['folder'], extra, evaluate=job['detail'] == 'evaluate')
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
    """Run main.py with ``args`` in a child process; return its exit code."""
    signals.child = subprocess.Popen([sys.executable, str(MAIN), *args])
    try:
        return signals.child.wait()
    finally:
        signals.child = None


def outcome(job, code):
    """What a finished main.py process means for the run: (result, ok)."""
    if code == 0:
        try:
            metrics = read_json(job['folder'] / 'metrics.json')
        except RunFileError as e:
            return f'exit 0 but no readable metrics.json ({e})', False
        if isinstance(metrics, dict) and metrics.get('stopped_early'):
            return f"stopped early ({metrics.get('stop_reason')}); run the suite again to resume it", False
        return 'finished', True
    if code == MAIN_DIVERGED:
        return 'diverged (kept as a result)', True
    if code == MAIN_ABORTED:
        return 'aborted (exit 130); run the suite again to resume it', False
    return f'failed with exit code {code} (see the message above)', False


def move_aside(folder):
    """Rename a failed run folder to <name>.failed-<timestamp>; returns the new path."""
    stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
    target = folder.with_name(f'{folder.name}.failed-{stamp}')
    folder.rename(target)
    return target


def run_plan(plan, preset, extra, signals):
    """Carry out the plan; returns [(job, result, ok, seconds)] and stops early on a signal."""
    results = []
    todo = [job for job in plan if job['action'] in ('run', 'restart', 'resume')]
    for job in plan:
        if job['action'] == 'finished':
            results.append((job, 'finished (skipped)', True, 0.0))
        elif job['action'] == 'diverged':
            results.append((job, f"diverged earlier: {job['detail']} (kept as a result)", True, 0.0))
        elif job['action'] in ('in use', 'not a folder'):
            results.append((job, f"{job['action']}: {job['detail']}", False, 0.0))
    for k, job in enumerate(todo, 1):
        if signals.reason:
            results.append((job, f'not started ({signals.reason})', False, 0.0))
            continue
        if job['action'] == 'restart':
            try:
                moved = move_aside(job['folder'])
            except OSError as e:
                results.append((job, f'cannot move the failed folder aside ({e.strerror}); move it by hand',
                                False, 0.0))
                continue
            print(f"moved {job['folder']} (no checkpoint) aside to {moved.name}", flush=True)
        args = command_of(job, preset, extra)
        print(f"\n[{k}/{len(todo)}] {job['variant']} seed {job['seed']}: {shown(args)}", flush=True)
        start = time.monotonic()
        code = run_main(args, signals)
        result, ok = outcome(job, code)
        results.append((job, result, ok, time.monotonic() - start))
        if code == MAIN_ABORTED and not signals.reason:
            signals.reason = 'main.py aborted'
    order = {id(job): i for i, job in enumerate(plan)}
    return sorted(results, key=lambda r: order[id(r[0])])


def print_results(results, seconds):
    print('\nClaims suite results:')
    for job, result, ok, took in results:
        time_taken = '' if not took else f'{took:.0f} s' if took < 90 else f'{took / 60:.1f} min'
        print(f"  {job['variant']:<16s} seed {job['seed']:<3} {time_taken:>9s}  {result}")
    print(f'Total wall time: {seconds / 60:.1f} min ({seconds:.0f} s).')


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f'claims.py: {message}; see python claims.py --help\n')


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
    """A run folder of the baseline variant with a config.json, for compare.py's --baseline, or None."""
    return next((p for p in sorted(Path(runs_dir).glob('baseline-seed*'))
                 if p.is_dir() and (p / 'config.json').is_file()), None)


def main(argv=None):
    """CLI entry point; returns the exit code (see the module docstring)."""
    try:
        args = parse_args(argv)
    except SystemExit as e:       # --help, or a usage error already printed as one sentence
        return e.code
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
            print(f'claims.py: cannot create {runs_dir} ({e.strerror}); choose a writable --runs-dir',
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
    print(f'\nComparing every run in {runs_dir}:')
    base = baseline_run(runs_dir)
    compared = compare.main([str(runs_dir), '--out', str(runs_dir / 'comparison')]
                            + (['--baseline', str(base)] if base else []))
    if compared != compare.EXIT_OK or not all(ok for _, _, ok, _ in results):
        return EXIT_INCOMPLETE
    return EXIT_OK


if __name__ == '__main__':
    sys.exit(main())
