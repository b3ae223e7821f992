"""Does the working tree compute bit for bit what a git revision computed?

For a refactoring that must not change a single number (issue 19: "every preset
trains bit-identically"). Loads the model as it was at REV beside the current
one (as ``ab_step.py`` does), gives both the same worker-thread count, and for
every cell and sequence layout, in float32 with the same seed and batch,
checks with ``np.array_equal`` (and equal dtypes and key order):

- the initial parameters;
- ``loss`` (plain and with label smoothing) and every gradient, the input
  gradient included;
- the same after two SGD steps (momentum 0.9, clipping), so the second step
  starts from parameters the first one updated;
- ``predict_proba`` with its hidden states, in batches smaller than the batch.

Prints one line per case and exits 1 if anything differs. A check, not a
timing: the machine load does not matter.

Usage:
    python benchmarks/ab_identical.py REV [--batch 40] [--threads 1 2] [--cells rnn gru lstm]
                                          [--layouts pixels rows flat]
"""
import argparse
import sys

import numpy as np

import repo_on_path  # noqa: F401  (the project's modules)
import cnn_rnn_numpy
import fast_layers
from ab_step import module_at, set_threads
from optim import SGD, clip_grad_norm


def differences(a, b, what):
    """Why two results differ (a list of short strings; empty when bit-identical).

    a, b: arrays, floats, or dicts of arrays (compared key by key and in key order).
    """
    if isinstance(a, dict):
        if list(a) != list(b):
            return [f'{what}: keys {list(a)} != {list(b)}']
        return [d for k in a for d in differences(a[k], b[k], f'{what}[{k}]')]
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype != b.dtype or a.shape != b.shape:
        return [f'{what}: {a.dtype}{a.shape} != {b.dtype}{b.shape}']
    if not np.array_equal(a, b):
        return [f'{what}: differs by up to {np.max(np.abs(a.astype(float) - b.astype(float))):.3g}']
    return []


def compare_case(new, old, layout, cell, X, y):
    """Every difference between the two model modules for one layout and cell (empty: bit-identical)."""
    models = [module.CNNRNN(seq_layout=layout, cell=cell, seed=0) for module in (new, old)]
    problems = differences(*(m.params for m in models), 'initial params')
    opts = [SGD(m.params, momentum=0.9) for m in models]
    for step in range(3):
        results = [m.loss(X, y, input_grad=(step == 0), details=True) for m in models]
        problems += differences(*(r[0] for r in results), f'step {step} loss')
        problems += differences(*(r[1] for r in results), f'step {step} grads')
        problems += differences(*(r[2]['logits'] for r in results), f'step {step} logits')
        if step < 2:
            for (_, grads, _), opt in zip(results, opts):
                grads.pop('X', None)
                clip_grad_norm(grads, 5.0)
                opt.step(grads, lr=0.05)
    smoothed = [m.loss(X, y, label_smoothing=0.1) for m in models]
    problems += differences(*(s[0] for s in smoothed), 'smoothed loss')
    problems += differences(*(s[1] for s in smoothed), 'smoothed grads')
    proba = [m.predict_proba(X, batch_size=16, return_features=True) for m in models]
    problems += differences(*(p[0] for p in proba), 'predict_proba')
    problems += differences(*(p[1] for p in proba), 'predict_proba features')
    return problems


def compare(new, old, cells, layouts, threads, batch=40):
    """Compare two model modules on every case; returns {(threads, layout, cell): [differences]}."""
    rng = np.random.default_rng(0)
    X = rng.random((batch, 3, 32, 32), dtype=np.float32)
    y = rng.integers(0, 10, batch)
    report = {}
    for n in threads:
        set_threads(new, n)
        set_threads(old, n)
        for layout in layouts:
            for cell in cells:
                report[n, layout, cell] = compare_case(new, old, layout, cell, X, y)
    return report


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('rev', help='git revision to compare with, e.g. ea53f72')
    ap.add_argument('--batch', type=int, default=40)
    ap.add_argument('--threads', type=int, nargs='+', default=None,
                    help="worker-thread counts to compare at (default: 1 and this process's count)")
    ap.add_argument('--cells', nargs='+', default=list(cnn_rnn_numpy.CELLS))
    ap.add_argument('--layouts', nargs='+', default=list(cnn_rnn_numpy.SEQ_LAYOUTS))
    args = ap.parse_args()
    print(fast_layers.prepare_process_for_training())
    threads = args.threads or sorted({1, fast_layers.THREADS})
    report = compare(cnn_rnn_numpy, module_at(args.rev), args.cells, args.layouts, threads, args.batch)
    for (n, layout, cell), problems in report.items():
        print(f"{n} thread(s), {layout:6} {cell:4}: {'bit-identical' if not problems else 'DIFFERENT'}")
        for p in problems:
            print(f'    {p}')
    bad = sum(1 for p in report.values() if p)
    print(f'{len(report) - bad} of {len(report)} cases bit-identical to {args.rev}')
    return 1 if bad else 0


if __name__ == '__main__':
    sys.exit(main())
