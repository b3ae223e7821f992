"""A/B speed of the model's training step: this working tree against a git revision.

Loads the model as it was at REV (``git show`` of ``cnn_rnn_numpy.py`` and,
from revisions that have it, ``fast_layers.py``) beside the current one, on
the same number of worker threads, and times ``model.loss(X, y)`` (forward
and backward, batch 256, float32) of both, alternating A and B step by step,
so both see the same machine load. Prints each side's median step time and
the median of the per-pair ratios.

With --preset NAME both sides build the preset's network instead of the
method's (its backbone, layout, cell, hidden size; weights from seed 0), and
--layouts is ignored, e.g. ``--preset deep --batch 512 --steps 5``.

Usage:
    python benchmarks/ab_step.py REV [--steps 20] [--layouts pixels rows] [--batch 256] [--preset NAME]
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
import config
import fast_layers
import main as training

MODEL_FILES = ('cnn_rnn_numpy.py', 'fast_layers.py')   # the model's modules (fast_layers.py since the split)


def load_model_from(folder, tag):
    """``cnn_rnn_numpy`` from ``folder``, imported as a separate module named cnn_rnn_numpy_<tag>.

    If the folder has a ``fast_layers.py`` the module gets that copy, not the
    working tree's: while it is imported, 'fast_layers' in sys.modules is the
    folder's copy; the working tree's is put back afterwards. The copy it bound
    is returned as the module's attribute ``fast_layers_module`` (None when
    the folder has none, as before the split).
    """
    folder = Path(folder)
    saved = sys.modules.pop('fast_layers', None)
    sys.path.insert(0, str(folder))
    try:
        spec = importlib.util.spec_from_file_location(f'cnn_rnn_numpy_{tag}', folder / 'cnn_rnn_numpy.py')
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(folder))
        own = sys.modules.pop('fast_layers', None)
        if saved is not None:
            sys.modules['fast_layers'] = saved
    module.fast_layers_module = own if (folder / 'fast_layers.py').exists() else None
    return module


def module_at(rev):
    """The model as it was at ``rev``, imported under other names (``load_model_from``)."""
    folder = Path(tempfile.mkdtemp())
    for name in MODEL_FILES:
        shown = subprocess.run(['git', 'show', f'{rev}:{name}'], cwd=repo_on_path.REPO_ROOT,
                               capture_output=True, text=True)
        if shown.returncode == 0:
            (folder / name).write_text(shown.stdout)
        elif name == 'cnn_rnn_numpy.py':
            raise SystemExit(f'cannot read cnn_rnn_numpy.py at {rev}: {shown.stderr.strip()}')
    return load_model_from(folder, 'ref')


def set_threads(module, threads):
    """Set the worker-thread count of the working tree's model or one loaded by ``load_model_from``.

    Before the split THREADS was the model module's own, since then it is its fast_layers'.
    """
    holder = fast_layers if module is cnn_rnn_numpy else (module.fast_layers_module or module)
    assert hasattr(holder, 'THREADS'), f'{holder.__name__} has no THREADS'
    holder.THREADS = threads


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('rev', help='git revision to compare with, e.g. HEAD~3')
    ap.add_argument('--steps', type=int, default=20, help='timed pairs of steps per layout')
    ap.add_argument('--batch', type=int, default=256)
    ap.add_argument('--layouts', nargs='+', default=['pixels', 'rows'])
    ap.add_argument('--preset', help="build the preset's network (presets.json) instead of the method's")
    args = ap.parse_args()
    presets = config.load_presets()
    if args.preset is not None and args.preset not in presets:
        ap.error(f"unknown preset {args.preset!r}; presets.json has {', '.join(presets)}")
    # Both sides in one process: the allocator and BLAS settings a training run makes apply to both.
    print(fast_layers.prepare_process_for_training())
    ref = module_at(args.rev)
    set_threads(ref, fast_layers.THREADS)
    rng = np.random.default_rng(0)
    X = rng.random((args.batch, 3, 32, 32), dtype=np.float32)
    y = rng.integers(0, 10, args.batch)
    print(f'A = working tree, B = {args.rev}; batch {args.batch}, float32, model.loss (forward + backward), '
          f'{args.steps} alternating pairs after 2 warm-up steps each')
    if args.preset is not None:      # one network: the preset's (its layout among its settings)
        settings = training.model_settings(presets[args.preset])
        networks = [(f"{args.preset} ({settings['seq_layout']})", settings)]
    else:
        networks = [(layout, {'seq_layout': layout}) for layout in args.layouts]
    for name, settings in networks:
        models = {'A': cnn_rnn_numpy.CNNRNN(seed=0, **settings), 'B': ref.CNNRNN(seed=0, **settings)}
        times = {'A': [], 'B': []}
        for k in range(args.steps + 2):
            for side in ('A', 'B') if k % 2 == 0 else ('B', 'A'):
                t0 = time.perf_counter()
                models[side].loss(X, y)
                if k >= 2:
                    times[side].append(time.perf_counter() - t0)
        ratio = np.array(times['B']) / np.array(times['A'])
        print(f"{name:7} A {1e3 * np.median(times['A']):7.1f} ms   B {1e3 * np.median(times['B']):7.1f} ms   "
              f'B/A {np.median(ratio):.3f} (quartiles {np.percentile(ratio, 25):.3f}-{np.percentile(ratio, 75):.3f}; '
              f'> 1 means the working tree is faster)')


if __name__ == '__main__':
    sys.exit(main())
