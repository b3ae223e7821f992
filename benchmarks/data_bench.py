"""Data-pipeline figures: load time, peak memory of the loaded dataset, batch time.

Prints numbers next to the pipeline's targets (load <= 5 s, peak memory <= 250 MB,
batch <= 5 ms); it is a measurement, not a test.

    python benchmarks/data_bench.py --data-dir data [--repeats 5] [--batches 300]
    python benchmarks/data_bench.py --module /tmp/old/data_utils.py   # another version

The data folder must hold cifar-10-python.tar.gz or the extracted
cifar-10-batches-py/; extraction (if needed) happens once, before timing.

What is measured:
- load: wall time of load_cifar10(data_dir) (full 50k + 10k, default split) from
  the extracted folder, median over --repeats runs.
- memory: peak bytes traced by tracemalloc during one load (numpy reports its
  array buffers to tracemalloc, so this is the high-water mark of the arrays and
  pickles the load holds at once), next to the size of the returned arrays and
  the growth of the process's peak RSS (ru_maxrss) over that load. The memory
  load runs first, in a fresh process state, so the RSS figure is not inflated
  by earlier loads.
- batch: time to produce one shuffled, augmented, standardized float32 batch
  of 256 with BatchIterator (gather + crop/pad/flip + normalize), median over
  --batches batches; the plain evaluation batch is shown for comparison.
- load_test_set (if the module has it): from the extracted folder, and streamed
  out of the archive when data_dir holds it.
"""
import argparse
import gc
import importlib.util
import os
import resource
import statistics
import sys
import tempfile
import time
import tracemalloc

import repo_on_path  # noqa: E402,F401  (the project's modules)
data_utils = None  # the module measured: the repository's, or --module

TARGET_LOAD_S = 5.0
TARGET_PEAK_MB = 250.0
TARGET_BATCH_MS = 5.0


def rss_mb():
    """Current resident set size in MB (Linux /proc)."""
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 1e6


def max_rss_mb():
    """Peak resident set size of this process so far, in MB (Linux reports KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3


def verdict(value, target):
    return 'ok' if value <= target else 'OVER TARGET'


def import_data_utils(path):
    """The repository's data_utils, or the data_utils.py file at `path`."""
    if path is None:
        import data_utils as module
        return module
    spec = importlib.util.spec_from_file_location('data_utils', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def time_test_set(data_dir):
    """(seconds from the extracted folder, seconds from the archive or None)."""
    t = time.perf_counter()
    data_utils.load_test_set(data_dir)
    from_folder = time.perf_counter() - t
    archive = os.path.join(data_dir, data_utils.ARCHIVE_NAME)
    if not os.path.isfile(archive):
        return from_folder, None
    with tempfile.TemporaryDirectory() as only_archive:
        os.symlink(os.path.abspath(archive), os.path.join(only_archive, data_utils.ARCHIVE_NAME))
        t = time.perf_counter()
        data_utils.load_test_set(only_archive)
        return from_folder, time.perf_counter() - t


def main():
    global data_utils
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--data-dir', default='data')
    parser.add_argument('--repeats', type=int, default=5, help='timed full loads')
    parser.add_argument('--batches', type=int, default=300, help='timed batches of 256')
    parser.add_argument('--batch-size', type=int, default=256)
    parser.add_argument('--module', default=None,
                        help='path of another data_utils.py to measure (e.g. an older copy)')
    args = parser.parse_args()
    data_utils = import_data_utils(args.module)
    print(f'module: {data_utils.__file__}')

    try:
        t = time.perf_counter()
        folder = data_utils.prepare_cifar10(args.data_dir)
        print(f'data folder: {folder} (ready in {time.perf_counter() - t:.2f} s)')

        # Memory first, while the process has not yet touched a dataset.
        gc.collect()
        rss_before, max_rss_before = rss_mb(), max_rss_mb()
        tracemalloc.start()
        data = data_utils.load_cifar10(args.data_dir)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        rss_growth = max(max_rss_mb(), rss_before) - max(max_rss_before, rss_before)
        arrays_mb = sum(v.nbytes for v in data.values() if hasattr(v, 'nbytes')) / 1e6
        del data
        gc.collect()

        times = []
        for i in range(args.repeats):
            t = time.perf_counter()
            data = data_utils.load_cifar10(args.data_dir)
            times.append(time.perf_counter() - t)
            if i < args.repeats - 1:
                del data
                gc.collect()
        test_set_s = (time_test_set(args.data_dir) if hasattr(data_utils, 'load_test_set')
                      else None)
    except (data_utils.DataError, ValueError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2

    X, y = data['X_train'], data['y_train']
    t = time.perf_counter()
    mean, std = data_utils.channel_mean_std(X)
    stats_s = time.perf_counter() - t

    def batch_times(it):
        gen, out = it.epoch(0), []
        for _ in range(min(args.batches, len(it) - 1)):  # skip the partial last batch
            t = time.perf_counter()
            next(gen)
            out.append((time.perf_counter() - t) * 1e3)
        return out

    train_it = data_utils.BatchIterator(X, y, args.batch_size, shuffle=True, augment=True,
                                        seed=0, mean=mean, std=std)
    eval_it = data_utils.BatchIterator(X, y, args.batch_size, mean=mean, std=std)
    t = time.perf_counter()
    train_it.plan(0)
    plan_ms = (time.perf_counter() - t) * 1e3
    aug_ms = batch_times(train_it)
    eval_ms = batch_times(eval_it)

    med_load, med_aug, peak_mb = statistics.median(times), statistics.median(aug_ms), peak / 1e6
    print(f'python {sys.version.split()[0]}, numpy {data_utils.np.__version__}, '
          f'{os.cpu_count()} CPUs')
    print(f"dataset: {len(data['X_train'])} train, {len(data['X_val'])} val, "
          f"{len(data['X_test'])} test images")
    print(f'load_cifar10 (extracted folder), {args.repeats} runs: median {med_load:.3f} s '
          f'(min {min(times):.3f}, max {max(times):.3f})   target <= {TARGET_LOAD_S:.0f} s: '
          f'{verdict(med_load, TARGET_LOAD_S)}')
    print(f'peak memory during one load (tracemalloc): {peak_mb:.1f} MB   '
          f'target <= {TARGET_PEAK_MB:.0f} MB: {verdict(peak_mb, TARGET_PEAK_MB)}')
    print(f'  returned arrays (nbytes): {arrays_mb:.1f} MB; peak RSS growth over that '
          f'load: {rss_growth:.1f} MB')
    print(f'augmented+standardized batch of {args.batch_size}, {len(aug_ms)} batches: '
          f'median {med_aug:.2f} ms (p90 {statistics.quantiles(aug_ms, n=10)[-1]:.2f}, '
          f'min {min(aug_ms):.2f})   target <= {TARGET_BATCH_MS:.0f} ms: '
          f'{verdict(med_aug, TARGET_BATCH_MS)}')
    print(f'  evaluation batch (no shuffle/augment): median {statistics.median(eval_ms):.2f} '
          f'ms; epoch plan (permutation + offsets for {len(X)} images): {plan_ms:.2f} ms')
    print(f'channel_mean_std on {len(X)} training images: {stats_s:.3f} s')
    if test_set_s is not None:
        from_folder, from_archive = test_set_s
        streamed = 'no archive' if from_archive is None else f'{from_archive:.2f} s'
        print(f'load_test_set: {from_folder:.3f} s from the folder; streamed out of the '
              f'archive: {streamed}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
