"""Speed and memory of the NumPy CNN+RNN, and the same model in PyTorch.

Prints, for each sequence layout and recurrent cell (rnn, gru, lstm):
- training throughput: one full step (forward, backward, clipping, SGD
  momentum update) at batch 256 in float32, median images/s over several
  steps after a warm-up;
- evaluation throughput (forward only, ``predict_proba`` batches of 500);
- the peak memory allocated during one training step (tracemalloc, which
  NumPy reports its array allocations to);
- a profile of one step by layer (``--profile``);
- when PyTorch is importable, the same architecture trained the same way on
  the same number of threads, and the NumPy/PyTorch ratio measured side by
  side in this one run (PyTorch is not a requirement of the project);
- each gated cell's step time relative to the vanilla RNN's, same layout,
  same repeat.

Usage:
    python benchmarks/speed.py [--repeats 3] [--steps 10] [--batch 256] [--layouts pixels rows]
                               [--cells rnn gru lstm] [--profile]
"""
import argparse
import os
import time
import tracemalloc

import numpy as np

import repo_on_path  # noqa: E402,F401  (the project's modules)
from cnn_rnn_numpy import CELL_GATES, CELLS, CNNRNN  # noqa: E402
from optim import SGD, clip_grad_norm  # noqa: E402

FLOP_PER_IMAGE = {}  # filled by flops_per_image()


def flops_per_image(layout, cell='rnn', hidden=128):
    """Multiply-add FLOPs (2 per MAC) of one training step per image.

    Forward matrix products, then backward ~2x forward, except that the
    first convolution needs no input gradient. A cell with G gate blocks
    does G times the recurrent products of the vanilla RNN.
    """
    conv1 = 2 * 32 * 32 * 64 * 27
    conv2 = 2 * 16 * 16 * 64 * 576
    T, D = (64, 64) if layout == 'pixels' else (8, 512)
    rnn = 2 * T * (D * hidden + hidden * hidden) * CELL_GATES[cell]
    head = 2 * hidden * 10
    forward = conv1 + conv2 + rnn + head
    backward = conv1 + 2 * conv2 + 2 * rnn + 2 * head
    return forward + backward


def median_time(fn, steps, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def numpy_train_step_fn(layout, batch, seed=0, cell='rnn'):
    rng = np.random.default_rng(seed)
    X = rng.random((batch, 3, 32, 32), dtype=np.float32)
    y = rng.integers(0, 10, batch)
    model = CNNRNN(seq_layout=layout, seed=seed, cell=cell)
    opt = SGD(model.params, momentum=0.9)

    def step():
        loss, grads = model.loss(X, y)
        clip_grad_norm(grads, 5.0)
        opt.step(grads, lr=0.01)
    return model, X, step


def numpy_peak_memory_mb(step):
    tracemalloc.start()
    tracemalloc.reset_peak()
    step()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / 2**20


def numpy_profile(layout, batch):
    """Time per layer of one training step on ONE core (median of 5), in ms.

    The model runs with threads=1 and single-threaded BLAS here, so the
    parts add up to the step: this is where the core-time goes. With the
    default threads the step runs on every core and is correspondingly shorter.
    """
    import cnn_rnn_numpy as M
    from threadpoolctl import threadpool_limits
    names = ['im2col_3x3', 'col2im_3x3', 'conv_weight_grad', 'input_grad_taps',
             'pool_blocks_forward', 'pool_blocks_backward', 'rnn_forward', 'rnn_backward',
             'conv_relu_pool_forward', 'conv_relu_pool_backward']
    totals = {n: [] for n in names}
    originals = {n: getattr(M, n) for n in names}
    current = {}

    def wrap(n):
        def f(*a, **k):
            t0 = time.perf_counter()
            r = originals[n](*a, **k)
            current[n] = current.get(n, 0.0) + time.perf_counter() - t0
            return r
        return f
    for n in names:
        setattr(M, n, wrap(n))
    threads_before = M.THREADS
    try:
        model, _, step = numpy_train_step_fn(layout, batch)
        M.THREADS = 1
        whole = []
        with threadpool_limits(1, 'blas'):
            step()
            for _ in range(5):
                current.clear()
                t0 = time.perf_counter()
                step()
                whole.append(time.perf_counter() - t0)
                for n in names:
                    totals[n].append(current.get(n, 0.0))
    finally:
        M.THREADS = threads_before
        for n in names:
            setattr(M, n, originals[n])
    med = {n: 1e3 * float(np.median(v)) for n, v in totals.items()}
    step_ms = 1e3 * float(np.median(whole))
    # Matrix products and small glue inside the block functions = block total minus the parts timed.
    fwd_rest = med['conv_relu_pool_forward'] - med['im2col_3x3'] - med['pool_blocks_forward']
    bwd_rest = (med['conv_relu_pool_backward'] - med['col2im_3x3'] - med['conv_weight_grad']
                - med['input_grad_taps'] - med['pool_blocks_backward'])
    rows = [('im2col (both convs)', med['im2col_3x3']),
            ('conv forward products + bias/ReLU', fwd_rest),
            ('max-pool forward (both)', med['pool_blocks_forward']),
            ('RNN forward', med['rnn_forward']),
            ('RNN backward (BPTT)', med['rnn_backward']),
            ('max-pool backward (both)', med['pool_blocks_backward']),
            ('conv dW products (both)', med['conv_weight_grad']),
            ('conv2 input-gradient product', med['input_grad_taps']),
            ('col2im (conv2)', med['col2im_3x3']),
            ('ReLU/bias grads, reorder (both)', bwd_rest)]
    accounted = sum(v for _, v in rows)
    rows.append(('rest (loss, head, clip, SGD, glue)', step_ms - accounted))
    return step_ms, rows


def torch_model(layout, cell='rnn', hidden=128):
    from torch import nn

    class TorchCNNRNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Sequential(
                nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
            D = 64 if layout == 'pixels' else 512
            if cell == 'rnn':
                self.rnn = nn.RNN(D, hidden, nonlinearity='tanh', batch_first=True)
            else:
                self.rnn = {'gru': nn.GRU, 'lstm': nn.LSTM}[cell](D, hidden, batch_first=True)
            self.head = nn.Linear(hidden, 10)

        def forward(self, x):
            f = self.conv(x).permute(0, 2, 3, 1)           # (N, 8, 8, 64), as the NumPy model
            n = f.shape[0]
            seq = f.reshape(n, 64, 64) if layout == 'pixels' else f.reshape(n, 8, 512)
            _, h = self.rnn(seq)
            if cell == 'lstm':
                h = h[0]                                    # (h_n, c_n)
            return self.head(h[-1])
    return TorchCNNRNN()


def torch_step_fn(layout, batch, threads, seed=0, cell='rnn'):
    import torch
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = torch_model(layout, cell)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    X = torch.rand(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(X), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()

    def evaluate(Xe):
        with torch.no_grad():
            for s in range(0, len(Xe), 500):
                torch.softmax(model(Xe[s:s + 500]), dim=1)
    return step, evaluate


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--steps', type=int, default=10, help='timed training steps per measurement')
    ap.add_argument('--batch', type=int, default=256)
    ap.add_argument('--eval-images', type=int, default=2000)
    ap.add_argument('--layouts', nargs='+', default=['pixels', 'rows'], choices=['pixels', 'rows'])
    ap.add_argument('--cells', nargs='+', default=list(CELLS), choices=CELLS)
    ap.add_argument('--repeats', type=int, default=3, help='repeat the whole comparison; medians are printed')
    ap.add_argument('--profile', action='store_true', help='print a per-layer profile of one step')
    ap.add_argument('--no-torch', action='store_true', help='skip the PyTorch comparison')
    args = ap.parse_args()

    try:
        from threadpoolctl import threadpool_info
        blas = ', '.join(f"{i['internal_api']} {i.get('version')} {i['num_threads']} threads"
                         for i in threadpool_info())
    except ImportError:
        blas = 'threadpoolctl not installed'
    threads = os.cpu_count()
    print(f'numpy {np.__version__} ({blas}); {threads} CPUs; batch {args.batch}; '
          f'median of {args.steps} steps after 2 warm-up steps')
    torch_ok = False
    if not args.no_torch:
        try:
            import torch
            torch_ok = True
            print(f'torch {torch.__version__}, {threads} threads')
        except ImportError:
            print('PyTorch is not importable: NumPy figures only')

    header = (f"{'layout':8} {'cell':5} {'impl':6} {'train img/s':>11} {'eval img/s':>10} "
              f"{'step ms':>8} {'peak MB':>8} {'GFLOP/s':>8}")
    # Each repeat measures NumPy and PyTorch back to back, so every ratio
    # compares the two under the same machine load; the summary takes medians.
    results = []   # (repeat, layout, cell, impl, train img/s, eval img/s, step ms, peak MB, GFLOP/s)
    Xe = np.random.default_rng(1).random((args.eval_images, 3, 32, 32), dtype=np.float32)
    for rep in range(args.repeats):
        for layout in args.layouts:
            for cell in args.cells:
                flop = flops_per_image(layout, cell) * args.batch / 1e9
                model, X, step = numpy_train_step_fn(layout, args.batch, cell=cell)
                t_np = median_time(step, args.steps)
                peak = numpy_peak_memory_mb(step)
                t_eval = median_time(lambda: model.predict_proba(Xe, batch_size=500), 3, warmup=1)
                results.append((rep, layout, cell, 'numpy', args.batch / t_np, args.eval_images / t_eval,
                                1e3 * t_np, peak, flop / t_np))
                if torch_ok:
                    import torch
                    tstep, teval = torch_step_fn(layout, args.batch, threads, cell=cell)
                    t_t = median_time(tstep, args.steps)
                    Xt = torch.from_numpy(Xe)
                    t_te = median_time(lambda: teval(Xt), 3, warmup=1)
                    results.append((rep, layout, cell, 'torch', args.batch / t_t, args.eval_images / t_te,
                                    1e3 * t_t, float('nan'), flop / t_t))
        if args.repeats > 1:
            line = '; '.join(f'{lay} {cell} {impl} {tr:.0f}' for r, lay, cell, impl, tr, *_ in results if r == rep)
            print(f'repeat {rep + 1}: training img/s: {line}')

    def rows_of(layout, cell, impl):
        return {r[0]: r[4:] for r in results if r[1:4] == (layout, cell, impl)}

    print(f'\nmedians over {args.repeats} repeat(s)')
    print(header)
    impls = ['numpy'] + (['torch'] if torch_ok else [])
    for layout in args.layouts:
        for cell in args.cells:
            for impl in impls:
                tr, ev, ms, peak, gf = np.median(np.array(list(rows_of(layout, cell, impl).values())), axis=0)
                print(f'{layout:8} {cell:5} {impl:6} {tr:11.0f} {ev:10.0f} {ms:8.1f} {peak:8.0f} {gf:8.1f}')
    if torch_ok:
        for layout in args.layouts:
            for cell in args.cells:
                ours, theirs = rows_of(layout, cell, 'numpy'), rows_of(layout, cell, 'torch')
                train_ratio = [ours[r][0] / theirs[r][0] for r in ours]
                eval_ratio = [ours[r][1] / theirs[r][1] for r in ours]
                print(f"ratio numpy/torch, {layout} {cell}: training {np.median(train_ratio):.2f}x "
                      f"(per repeat {', '.join(f'{x:.2f}' for x in train_ratio)}), "
                      f"evaluation {np.median(eval_ratio):.2f}x")
    if 'rnn' in args.cells:
        for layout in args.layouts:
            base = rows_of(layout, 'rnn', 'numpy')
            for cell in args.cells:
                if cell != 'rnn':
                    rel = [rows_of(layout, cell, 'numpy')[r][2] / base[r][2] for r in base]
                    print(f"step time of {cell} relative to rnn, {layout} (NumPy): {np.median(rel):.2f}x "
                          f"(per repeat {', '.join(f'{x:.2f}' for x in rel)})")
    for layout in args.layouts:
        for cell in args.cells:
            print(f'FLOP per image per training step, {layout} {cell}: {flops_per_image(layout, cell) / 1e6:.1f} M')

    if args.profile:
        for layout in args.layouts:
            step_ms, rows = numpy_profile(layout, args.batch)
            print(f'\nsingle-core profile of one training step, {layout}, batch {args.batch}: '
                  f'{step_ms:.1f} ms of core time')
            for name, ms in rows:
                print(f'  {name:40} {ms:7.1f} ms  {100 * ms / step_ms:5.1f}%')


if __name__ == '__main__':
    main()
