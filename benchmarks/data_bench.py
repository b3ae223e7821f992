"""Data-pipeline figures: load time, peak memory of the loaded dataset, batch time.

Prints numbers against the targets of issue 2; it is a measurement, not a test.

    python benchmarks/data_bench.py --data-dir data [--repeats 5] [--batches 300]

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
"""
import argparse
import gc
import os
import resource
import statistics
import sys
import time
import tracemalloc

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import data_utils  # noqa: E402

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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--data-dir', default='data')
    parser.add_argument('--repeats', type=int, default=5, help='timed full loads')
    parser.add_argument('--batches', type=int, default=300, help='timed batches of 256')
    parser.add_argument('--batch-size', type=int, default=256)
    args = parser.parse_args()

    try:
        t = time.perf_counter()
        folder = data_utils.prepare_cifar10(args.data_dir)
        print('data folder: %s (ready in %.2f s)' % (folder, time.perf_counter() - t))

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
        for _ in range(args.repeats):
            t = time.perf_counter()
            data = data_utils.load_cifar10(args.data_dir)
            times.append(time.perf_counter() - t)
            if _ < args.repeats - 1:
                del data
                gc.collect()
    except (data_utils.DataError, ValueError) as e:
        print('error: %s' % e, file=sys.stderr)
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

    med_load = statistics.median(times)
    med_aug = statistics.median(aug_ms)
    print('python %s, numpy %s, %d CPUs' % (sys.version.split()[0],
                                            data_utils.np.__version__, os.cpu_count()))
    print('dataset: %d train, %d val, %d test images'
          % (len(data['X_train']), len(data['X_val']), len(data['X_test'])))
    print('load_cifar10 (extracted folder), %d runs: median %.3f s (min %.3f, max %.3f)'
          '   target <= %.0f s: %s' % (args.repeats, med_load, min(times), max(times),
                                       TARGET_LOAD_S, verdict(med_load, TARGET_LOAD_S)))
    print('peak memory during one load (tracemalloc): %.1f MB   target <= %.0f MB: %s'
          % (peak / 1e6, TARGET_PEAK_MB, verdict(peak / 1e6, TARGET_PEAK_MB)))
    print('  returned arrays (nbytes): %.1f MB; peak RSS growth over that load: %.1f MB'
          % (arrays_mb, rss_growth))
    print('augmented+standardized batch of %d, %d batches: median %.2f ms '
          '(p90 %.2f, min %.2f)   target <= %.0f ms: %s'
          % (args.batch_size, len(aug_ms), med_aug,
             statistics.quantiles(aug_ms, n=10)[-1], min(aug_ms), TARGET_BATCH_MS,
             verdict(med_aug, TARGET_BATCH_MS)))
    print('  evaluation batch (no shuffle/augment): median %.2f ms; epoch plan '
          '(permutation + offsets for %d images): %.2f ms' % (
              statistics.median(eval_ms), len(X), plan_ms))
    print('channel_mean_std on %d training images: %.3f s' % (len(X), stats_s))
    return 0


if __name__ == '__main__':
    sys.exit(main())
