"""Overhead of the training loop over the bare training step.

The bare step is the one ``benchmarks/speed.py`` times: forward, backward,
clipping and the SGD update on a batch already in memory. The loop adds the
data path (shuffle, augmentation, normalisation), the per-step bookkeeping,
tqdm, validation on the whole validation split every epoch, checkpoints,
best.npz and history.json. The script runs the real loop (main.Trainer) with
the bare-step calls (model.loss, clip_grad_norm, SGD.step) timed inside it, so
both are measured on the same steps, the same model states and the same
machine load, and prints

    overhead = loop wall time / time inside the bare steps - 1

and, for reference, the loop against a separately timed bare step on one
fixed batch (the way speed.py measures it), which is noisier.

Usage:
    python benchmarks/loop_overhead.py [--train 9000] [--epochs 2] [--preset fast] [--repeats 3]
"""
import argparse
import tempfile
import time

import numpy as np

import repo_on_path  # noqa: E402,F401  (the project's modules)
import fast_layers  # noqa: E402
import main  # noqa: E402
from cnn_rnn_numpy import CNNRNN  # noqa: E402
from data_utils import BatchIterator, channel_mean_std  # noqa: E402
from optim import SGD, clip_grad_norm  # noqa: E402


def main_():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--train', type=int, default=9000, help='training images (9:1 with validation)')
    ap.add_argument('--epochs', type=int, default=2)
    ap.add_argument('--preset', default='fast')
    ap.add_argument('--repeats', type=int, default=3)
    args = ap.parse_args()
    # The process settings of a training run, made where training starts (this
    # script drives main.Trainer directly, so it makes them itself).
    print(f'process settings: {fast_layers.prepare_process_for_training()}')

    cfg = main.load_presets()[args.preset]
    cfg.epochs, cfg.preset = args.epochs, args.preset
    rng = np.random.default_rng(0)
    n_val = args.train // 9
    data = {'X_train': rng.integers(0, 256, (args.train, 3, 32, 32), dtype=np.uint8),
            'y_train': rng.integers(0, 10, args.train),
            'X_val': rng.integers(0, 256, (n_val, 3, 32, 32), dtype=np.uint8),
            'y_val': rng.integers(0, 10, n_val),
            'X_test': np.zeros((0, 3, 32, 32), np.uint8), 'y_test': np.zeros(0, np.int64)}
    mean, std = channel_mean_std(data['X_train'])
    it = BatchIterator(data['X_train'], data['y_train'], cfg.batch_size, shuffle=True,
                       augment=True, seed=0, mean=mean, std=std)
    X0, y0 = next(iter(it.epoch(0)))
    steps = len(it) * args.epochs

    ratios = []
    for r in range(args.repeats):
        # Bare step on one in-memory batch, as benchmarks/speed.py times it.
        model = CNNRNN(seq_layout=cfg.seq_layout, reg=cfg.weight_decay, seed=r)
        opt = SGD(model.params, momentum=cfg.momentum, nesterov=cfg.nesterov)
        times = []
        for i in range(12):
            t0 = time.perf_counter()
            _, grads = model.loss(X0, y0)
            clip_grad_norm(grads, cfg.clip)
            opt.step(grads, 0.01)
            times.append(time.perf_counter() - t0)
        bare = float(np.median(times[2:]))

        # The real loop, everything included.
        model = CNNRNN(seq_layout=cfg.seq_layout, reg=cfg.weight_decay, seed=r)
        opt = SGD(model.params, momentum=cfg.momentum, nesterov=cfg.nesterov)
        state = main.TrainState(mean=mean, std=std)
        inside = {'s': 0.0, 'n': 0}

        def timed(fn, count=False):
            def wrapper(*a, **k):
                t = time.perf_counter()
                out = fn(*a, **k)
                inside['s'] += time.perf_counter() - t
                inside['n'] += count
                return out
            return wrapper
        model.loss = timed(model.loss, count=True)
        opt.step = timed(opt.step)
        real_clip = main.clip_grad_norm
        main.clip_grad_norm = timed(real_clip)
        try:
            with tempfile.TemporaryDirectory() as run_dir:
                trainer = main.Trainer(cfg, main.RunFolder(run_dir), model, opt, state, data, main.Stopper())
                t0 = time.perf_counter()
                trainer.train()
                loop = time.perf_counter() - t0
        finally:
            main.clip_grad_norm = real_clip
        assert inside['n'] == steps
        ratio = loop / inside['s']
        ratios.append(ratio)
        print(f"repeat {r + 1}: loop {loop:.1f} s for {steps} steps (validation of {n_val} images each "
              f"epoch included), of which {inside['s']:.1f} s inside the bare steps: overhead "
              f"{100 * (ratio - 1):+.1f}%; against a bare step timed apart ({1e3 * bare:.0f} ms): "
              f"{100 * (loop / (steps * bare) - 1):+.1f}%")
    print(f'median overhead of the loop over the bare step ({args.preset}, batch {cfg.batch_size}, '
          f'{cfg.seq_layout}): {100 * (np.median(ratios) - 1):+.1f}%  (target <= +10%)')


if __name__ == '__main__':
    main_()
