"""A/B speed of the model's training step: this working tree against a git revision.

Loads ``cnn_rnn_numpy.py`` as it was at REV (``git show``) beside the current
one and times ``model.loss(X, y)`` (forward and backward, batch 256, float32)
of both, alternating A and B step by step, so both see the same machine load.
Prints each side's median step time and the median of the per-pair ratios.

Usage:
    python benchmarks/ab_step.py REV [--steps 20] [--layouts pixels rows] [--batch 256]
"""
import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import repo_on_path  # noqa: F401  (the project's modules)
import cnn_rnn_numpy


def module_at(rev):
    """cnn_rnn_numpy.py as it was at ``rev``, imported under another name."""
    source = subprocess.run(['git', 'show', f'{rev}:cnn_rnn_numpy.py'], cwd=repo_on_path.REPO_ROOT,
                            capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / 'cnn_rnn_numpy_ref.py'
    path.write_text(source)
    spec = importlib.util.spec_from_file_location('cnn_rnn_numpy_ref', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('rev', help='git revision to compare with, e.g. HEAD~3')
    ap.add_argument('--steps', type=int, default=20, help='timed pairs of steps per layout')
    ap.add_argument('--batch', type=int, default=256)
    ap.add_argument('--layouts', nargs='+', default=['pixels', 'rows'])
    args = ap.parse_args()
    ref = module_at(args.rev)
    rng = np.random.default_rng(0)
    X = rng.random((args.batch, 3, 32, 32), dtype=np.float32)
    y = rng.integers(0, 10, args.batch)
    print(f'A = working tree, B = {args.rev}; batch {args.batch}, float32, model.loss (forward + backward), '
          f'{args.steps} alternating pairs after 2 warm-up steps each')
    for layout in args.layouts:
        models = {'A': cnn_rnn_numpy.CNNRNN(seq_layout=layout, seed=0),
                  'B': ref.CNNRNN(seq_layout=layout, seed=0)}
        times = {'A': [], 'B': []}
        for k in range(args.steps + 2):
            for side in ('A', 'B') if k % 2 == 0 else ('B', 'A'):
                t0 = time.perf_counter()
                models[side].loss(X, y)
                if k >= 2:
                    times[side].append(time.perf_counter() - t0)
        ratio = np.array(times['B']) / np.array(times['A'])
        print(f"{layout:7} A {1e3 * np.median(times['A']):7.1f} ms   B {1e3 * np.median(times['B']):7.1f} ms   "
              f'B/A {np.median(ratio):.3f} (quartiles {np.percentile(ratio, 25):.3f}-{np.percentile(ratio, 75):.3f}; '
              f'> 1 means the working tree is faster)')


if __name__ == '__main__':
    sys.exit(main())
