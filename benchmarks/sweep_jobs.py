"""Runs per hour of a sweep on this machine: one run at a time with 2 threads against two at a
time with 1 thread each (and, with --ray, the same sweep as Ray tasks).

The same 4 runs of the `fast` protocol on a small subset (2 variants, `baseline` and
`no-weight-decay`, which cost the same, x 2 seeds; --subset 0.05 --epochs 2 by default) are
run through the real sweep.py command line, from a temporary sweep file into a fresh temporary
runs folder each time (outside the repository, removed afterwards), in two ways:

    A   python sweep.py SWEEP --jobs 1 --threads 2 --runs-dir TMP     one run at a time, 2 threads
    B   python sweep.py SWEEP --jobs 2 --threads 1 --runs-dir TMP     two at a time, 1 thread each
    C   python sweep.py SWEEP --ray --threads 1 --runs-dir TMP        (--ray) a local Ray instance

A and B (and C) alternate over the repeats (--order abba: ABBAAB...; abab: ABABAB...), so a
change in the machine's load touches both. Each repeat's wall time is taken from sweep.py's own
lines, as they appear: from the first run's start to the last run's end ("runs"), and of the
whole sweep.py process ("process": start-up and compare.py at the end included).

How to read the output:
- the table: the runs' wall time of each repeat and the median; B/A = median(A) / median(B)
  is B's throughput (runs per hour) over A's, > 1 means two 1-thread runs at a time finish more
  runs per hour; the per-repeat ratios (each repeat's A / B) show how steady it is.
- run time: one run's median wall time in A (alone with 2 threads) and B (1 thread beside another
  run); B's / A's is what a 1-thread run costs per run (2 / (B/A) when the sweep adds nothing).
  Not shown for C: sweep.py submits every Ray task at once, so a queued run's wait would count.
- test accuracy of each variant by seed: A and B differ (a run's result depends on its thread
  count) but each way should give the same numbers in every repeat, and B and C (both 1 thread)
  the same numbers as each other ('identical' compares the test predictions bit for bit).
- with --ray: Ray's fixed costs measured with its public API (ray.init of a local instance with
  the sweep's working_dir, the first task, the median round trip of an empty task), then a
  paper estimate of the claims suite (sweeps/claims.json: 30 runs) on 16 machines of 2 CPUs,
  with 1-thread tasks (32 slots: 1 wave) and 2-thread tasks (16 slots: 2 waves), from
  --claims-run-minutes (a claims run with 2 threads alone on a 2-CPU machine) and the run-time
  ratio measured here. The formula is printed with the numbers. It leaves out shipping the code
  and the 163 MB archive to each machine, and the stragglers of a real cluster.

The tiny runs here are dominated by fixed costs (start-up, loading the data, the 10,000-image test
evaluation) more than a claims run (15 epochs on 40%) is; raise --subset/--epochs to come closer.
Run it on an otherwise idle machine: a one-line warning says when the load average suggests other
work is running.

Usage:
    python benchmarks/sweep_jobs.py [--subset 0.05] [--epochs 2] [--repeats 3] [--order abba]
                                    [--ray] [--claims-run-minutes 5.3] [--data-dir data]
    python benchmarks/sweep_jobs.py --subset 0.02 --epochs 1 --repeats 1      # a quick check
"""
import argparse
import datetime
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import repo_on_path  # noqa: F401  (the project's modules)
from fast_layers import usable_cpus

REPO = Path(repo_on_path.REPO_ROOT)
SWEEP = REPO / 'sweep.py'
CLAIMS = REPO / 'sweeps' / 'claims.json'
VARIANTS = {'baseline': {}, 'no-weight-decay': {'weight_decay': 0}}    # the same cost per run
SEEDS = [0, 1]
WAYS = {'A': ['--jobs', '1', '--threads', '2'],
        'B': ['--jobs', '2', '--threads', '1'],
        'C': ['--ray', '--threads', '1']}
ABOUT = {'A': 'one run at a time, 2 threads', 'B': 'two runs at a time, 1 thread each',
         'C': 'a local Ray instance, 1-thread tasks'}
# The cluster of the paper estimate.
NODES, NODE_CPUS = 16, 2
# A 1-minute load average above this: other work is running.
BUSY_LOAD = 0.5
# sweep.py's progress lines: "[k/N] VARIANT seed S started: ..." and "[k/N] VARIANT seed S: RESULT (TIME)".
STARTED = re.compile(r'^\[(\d+)/\d+\] (\S+) seed (\d+) (?:started|submitted): ')
ENDED = re.compile(r'^\[(\d+)/\d+\] (\S+) seed (\d+): (.*)$')


def machine_facts():
    """'2 usable CPUs (CPU model), commit abc1234, date' for the header."""
    model = ''
    try:
        with open('/proc/cpuinfo') as f:
            model = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), '')
    except OSError:
        pass
    commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=REPO, capture_output=True,
                            text=True).stdout.strip() or 'unknown'
    # --no-optional-locks: a read-only look, git writes nothing (not even its index's timestamps)
    dirty = subprocess.run(['git', '--no-optional-locks', 'status', '--porcelain', '--untracked-files=no'],
                           cwd=REPO, capture_output=True, text=True).stdout.strip()
    return (f"{usable_cpus()} usable CPUs{f' ({model})' if model else ''}, commit {commit}"
            f"{' + uncommitted changes' if dirty else ''}, {datetime.datetime.now():%Y-%m-%d %H:%M:%S}")


def warn_if_busy(when):
    load = os.getloadavg()[0]
    if load > BUSY_LOAD:
        print(f'warning ({when}): load average {load:.2f} over the last minute: other work is running, '
              f'the times are noisy; measure on an idle machine', flush=True)


def write_sweep_file(folder, subset, epochs):
    """The temporary sweep file: VARIANTS x SEEDS of `fast` on the subset, for the given epochs."""
    path = Path(folder) / 'sweep-jobs.json'
    path.write_text(json.dumps({
        'description': 'benchmarks/sweep_jobs.py: the same runs one at a time or two at a time',
        'preset': 'fast', 'set': {'subset': subset, 'epochs': epochs}, 'seeds': SEEDS,
        'variants': VARIANTS}, indent=1))
    return path


def run_sweep(way, sweep_file, data_dir):
    """One sweep.py process in way A, B or C into a fresh temporary runs folder; returns
    {'runs': first start to last end (s), 'process': s, 'run_times': [s], 'results': {name: (acc, digest)}}."""
    runs_dir = Path(tempfile.mkdtemp(prefix=f'sweep-jobs-{way}-'))
    command = [sys.executable, str(SWEEP), str(sweep_file), *WAYS[way], '--runs-dir', str(runs_dir),
               f'--extra=--data-dir {shlex.quote(str(data_dir))}']
    lines, starts, ends, failed = [], {}, {}, []
    try:
        t0 = time.monotonic()
        with subprocess.Popen(command, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env=dict(os.environ, PYTHONUNBUFFERED='1')) as child:
            for line in child.stdout:
                now = time.monotonic()
                line = line.rstrip('\n')
                lines.append(line)
                if STARTED.match(line):
                    starts[int(STARTED.match(line)[1])] = now
                elif ENDED.match(line):
                    match = ENDED.match(line)
                    ends[int(match[1])] = now
                    if not match[4].startswith('finished'):
                        failed.append(line)
        process = time.monotonic() - t0
        if child.returncode != 0 or failed or len(ends) != len(VARIANTS) * len(SEEDS):
            tail = '\n'.join('    ' + line for line in lines[-25:])
            raise SystemExit(f'sweep_jobs: way {way} failed (sweep.py exit {child.returncode}):\n'
                             f'    {shlex.join(command)}\n{tail}')
        results = {}
        for variant in VARIANTS:
            for seed in SEEDS:
                folder = runs_dir / f'{variant}-seed{seed}'
                acc = json.loads((folder / 'metrics.json').read_text())['test_acc']
                with np.load(folder / 'predictions.npz') as p:
                    digest = hashlib.sha256(np.ascontiguousarray(p['probs']).tobytes()).hexdigest()
                results[(variant, seed)] = (acc, digest)
        return {'runs': max(ends.values()) - min(starts.values()), 'process': process,
                'run_times': [ends[k] - starts[k] for k in ends], 'results': results}
    finally:
        shutil.rmtree(runs_dir, ignore_errors=True)


def ray_overhead(empty_tasks=20):
    """Ray's fixed costs on a local instance, with sweep.py's runtime_env: (init s, first task s,
    median empty-task round trip s)."""
    import logging
    import ray
    import sweep
    t0 = time.perf_counter()
    ray.init(num_cpus=usable_cpus(), include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
             runtime_env={'working_dir': str(REPO), 'excludes': sweep.RAY_EXCLUDES})
    init = time.perf_counter() - t0
    try:
        @ray.remote(num_cpus=1)
        def empty():
            return None
        t0 = time.perf_counter()
        ray.get(empty.remote())           # starts a worker
        first = time.perf_counter() - t0
        trips = []
        for _ in range(empty_tasks):
            t0 = time.perf_counter()
            ray.get(empty.remote())
            trips.append(time.perf_counter() - t0)
    finally:
        ray.shutdown()
    return init, first, float(np.median(trips))


def paper_estimate(run_minutes, slowdown, init, first, trip, runs):
    """Print the claims suite's wall time on NODES machines of NODE_CPUS CPUs, from the measured
    Ray costs, a claims run's minutes with 2 threads (alone) and the measured 1-thread slowdown."""
    print(f'\nPaper estimate: the claims suite ({runs} runs, {CLAIMS.relative_to(REPO)}) on {NODES} machines '
          f'of {NODE_CPUS} CPUs, on Ray:')
    print('  wall = ray.init + first task + waves x (run time + task round trip), '
          'waves = ceil(runs / slots)')
    print(f'  t2 = {run_minutes:.2f} min, a claims run with 2 threads alone (--claims-run-minutes); '
          f't1 = t2 x {slowdown:.2f} (B/A of the run times above) = {run_minutes * slowdown:.2f} min')
    fixed = (init + first) / 60
    for threads, minutes in ((1, run_minutes * slowdown), (2, run_minutes)):
        slots = NODES * NODE_CPUS // threads
        waves = math.ceil(runs / slots)
        wall = fixed + waves * (minutes + trip / 60)
        print(f'  {threads}-thread tasks: {slots} slots, {waves} wave{"s" if waves > 1 else ""}: '
              f'{init:.1f} s + {first:.1f} s + {waves} x ({minutes:.2f} min + {1e3 * trip:.1f} ms) '
              f'= {wall:.1f} min')


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--subset', type=float, default=0.05, help='fraction of the training set of every run')
    ap.add_argument('--epochs', type=int, default=2, help='epochs of every run')
    ap.add_argument('--repeats', type=int, default=3, help='repeats of each way')
    ap.add_argument('--order', choices=['abba', 'abab'], default='abba',
                    help='abba: ABBAAB... (the order turns every repeat), abab: ABABAB...')
    ap.add_argument('--ray', action='store_true', help='also C: the sweep on a local Ray instance, '
                    "Ray's fixed costs and the paper estimate (needs Ray)")
    ap.add_argument('--claims-run-minutes', type=float, default=5.3,
                    help='minutes of a claims run with 2 threads alone on a 2-CPU machine (for --ray\'s estimate)')
    ap.add_argument('--data-dir', default=str(REPO / 'data'), help='folder with the CIFAR-10 archive')
    args = ap.parse_args()
    if args.repeats < 1 or args.epochs < 1 or not 0 < args.subset <= 1:
        ap.error('--repeats and --epochs must be at least 1, --subset in (0, 1]')
    data_dir = Path(args.data_dir).resolve()

    ways = ['A', 'B']
    if args.ray:
        try:
            import ray  # noqa: F401
            ways.append('C')
        except ImportError:
            print('Ray is not installed (pip install ray): C and the paper estimate are skipped')
    command = [f'.venv/bin/python benchmarks/sweep_jobs.py --subset {args.subset:g} --epochs {args.epochs} '
               f'--repeats {args.repeats} --order {args.order}'] + (['--ray'] if args.ray else []) + \
        ([f'--claims-run-minutes {args.claims_run_minutes:g}'] if args.ray else []) + \
        ([f'--data-dir {shlex.quote(str(data_dir))}'] if data_dir != (REPO / 'data').resolve() else [])
    n_runs = len(VARIANTS) * len(SEEDS)
    print(f'{n_runs} runs of the fast protocol (--subset {args.subset:g} --epochs {args.epochs}; variants '
          f'{", ".join(VARIANTS)} x seeds {", ".join(map(str, SEEDS))}) per sweep, {args.repeats} '
          f'repeat{"s" if args.repeats > 1 else ""} of each way')
    print(f'machine: {machine_facts()}')
    print(f'reproduce: {" ".join(command)}')
    for way in ways:
        print(f'  {way} = sweep.py SWEEP {" ".join(WAYS[way])} --runs-dir TMP   ({ABOUT[way]})')
    warn_if_busy('before')

    measured = {way: [] for way in ways}
    order = []
    for r in range(args.repeats):
        order += ways if args.order == 'abab' or r % 2 == 0 else ways[::-1]
    with tempfile.TemporaryDirectory(prefix='sweep-jobs-') as folder:
        sweep_file = write_sweep_file(folder, args.subset, args.epochs)
        for k, way in enumerate(order):
            m = run_sweep(way, sweep_file, data_dir)
            measured[way].append(m)
            print(f'[{k + 1}/{len(order)}] {way}: runs {m["runs"]:.1f} s, process {m["process"]:.1f} s, '
                  f'one run {np.median(m["run_times"]):.1f} s (median)', flush=True)
    warn_if_busy('after')

    print(f'\nWall time of the {n_runs} runs (first start to last end), s; order {"".join(order)}:')
    print('      ' + ''.join(f'{f"repeat {r + 1}":>10s}' for r in range(args.repeats)) + f'{"median":>10s}'
          f'{"process":>10s}')
    med = {}
    for way in ways:
        runs = [m['runs'] for m in measured[way]]
        med[way] = float(np.median(runs))
        print(f'  {way}   ' + ''.join(f'{t:10.1f}' for t in runs) + f'{med[way]:10.1f}'
              f'{np.median([m["process"] for m in measured[way]]):10.1f}')
    ratios = [a['runs'] / b['runs'] for a, b in zip(measured['A'], measured['B'])]
    print(f'  B/A throughput (runs per hour) = median(A) / median(B) = {med["A"] / med["B"]:.3f}x '
          f'(per repeat {", ".join(f"{x:.3f}" for x in ratios)}); > 1: two 1-thread runs at a time do more')
    if 'C' in ways:
        process = {way: np.median([m['process'] for m in measured[way]]) for way in 'BC'}
        print(f'  C/B throughput = median(B) / median(C) = {med["B"] / med["C"]:.3f}x on the runs, '
              f'{process["B"] / process["C"]:.3f}x on the whole process (Ray start-up included)')
    # C's runs count from their submission, all at once: a queued run's wait would count as its time.
    run_time = {way: float(np.median([t for m in measured[way] for t in m['run_times']])) for way in 'AB'}
    slowdown = run_time['B'] / run_time['A']
    print(f"One run (start to end), median: A {run_time['A']:.1f} s, B {run_time['B']:.1f} s; B/A {slowdown:.2f}x "
          f'(the 1-thread run beside another against the 2-thread run alone)')

    print('\nTest accuracy by variant and seed (A and B differ by their thread counts; each way should '
          'repeat itself, and B and C agree):')
    for variant in VARIANTS:
        cells = []
        for way in ways:
            accs = ' '.join(f'{measured[way][0]["results"][(variant, s)][0]:.4f}' for s in SEEDS)
            cells.append(f'{way} {accs}')
        print(f'  {variant:16s} ' + '   '.join(cells))
    for way in ways:
        same = all(m['results'] == measured[way][0]['results'] for m in measured[way])
        print(f'  {way}: the {len(measured[way])} repeats give identical predictions: {"yes" if same else "NO"}')
    same = measured['A'][0]['results'] == measured['B'][0]['results']
    print(f'  A and B give identical predictions: {"yes" if same else "no"} (not expected: 2 threads against 1)')
    if 'C' in ways:
        same = measured['B'][0]['results'] == measured['C'][0]['results']
        print(f'  B and C (both 1 thread) give identical predictions: {"yes" if same else "NO"}')

    if 'C' in ways:
        warn_if_busy('before the Ray costs')
        init, first, trip = ray_overhead()
        print(f"\nRay's fixed costs (local instance, sweep.py's working_dir): ray.init {init:.2f} s, first task "
              f'{first:.2f} s, empty task round trip {1e3 * trip:.2f} ms (median of 20)')
        claims = json.loads(CLAIMS.read_text())
        paper_estimate(args.claims_run_minutes, slowdown, init, first, trip,
                       len(claims['variants']) * len(claims['seeds']))


if __name__ == '__main__':
    main()
