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
  the same number of threads (``torch_reference.py``), and the NumPy/PyTorch
  ratio measured side by side in this one run (PyTorch is not a requirement
  of the project). PyTorch is timed twice: in this process, which
  ``fast_layers.prepare_process_for_training()`` has given the settings a
  training run uses (glibc keeps freed memory for reuse) (``torch``), and in
  a fresh process with the C library's defaults, as a PyTorch user runs it
  (``torch-own``). Both ratios are printed;
- each gated cell's step time relative to the vanilla RNN's, same layout,
  same repeat.

Usage:
    python benchmarks/speed.py [--repeats 3] [--steps 10] [--batch 256] [--layouts pixels rows]
                               [--cells rnn gru lstm] [--profile]
"""
import argparse
import json
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

import repo_on_path  # noqa: E402,F401  (the project's modules)
import fast_layers  # noqa: E402
from cnn_rnn_numpy import CELL_GATES, CELLS, CNNRNN  # noqa: E402
from optim import SGD, clip_grad_norm  # noqa: E402
from torch_reference import median_time, torch_step_fn  # noqa: E402

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


# The functions of cnn_rnn_numpy and fast_layers that --profile times (tests check they exist).
PROFILED_FUNCTIONS = ['im2col_3x3', 'conv_weight_grad', 'col2im_3x3', 'input_grad_taps',
                      'winograd_input_transform', 'winograd_products', 'winograd_output_transform',
                      'winograd_output_transform_backward', 'winograd_products_backward',
                      'winograd_input_transform_backward', 'winograd_kernel_transform',
                      'winograd_kernel_transform_backward',
                      'pool_blocks_forward', 'pool_blocks_backward', 'rnn_forward', 'rnn_backward',
                      'conv_relu_pool_forward', 'conv_relu_pool_backward',
                      'winograd_relu_pool_forward', 'winograd_relu_pool_backward']


def profiled_function(name):
    """The function ``name`` of the model's modules (fast_layers first, then cnn_rnn_numpy), or None."""
    import cnn_rnn_numpy as M
    import fast_layers as F
    return getattr(F, name, None) or getattr(M, name, None)


def install_timers(names, seconds):
    """Wrap each named function wherever a training step looks it up; returns a function that undoes it.

    A step finds a function in the globals of the module that calls it (either
    model module) or, for a recurrent cell's forward and backward, in
    ``CELL_TABLE``; each such place gets the timed wrapper, which adds the
    function's wall time to ``seconds[name]``.
    """
    import dataclasses
    import cnn_rnn_numpy as M
    import fast_layers as F
    undo = []
    for name in names:
        original = profiled_function(name)

        def timed(*a, _f=original, _n=name, **k):
            t0 = time.perf_counter()
            r = _f(*a, **k)
            seconds[_n] = seconds.get(_n, 0.0) + time.perf_counter() - t0
            return r
        for module in (F, M):
            if getattr(module, name, None) is original:
                undo.append(lambda m=module, n=name, f=original: setattr(m, n, f))
                setattr(module, name, timed)
        for cell, spec in list(M.CELL_TABLE.items()):
            for role in ('forward', 'backward'):
                if getattr(spec, role) is original:
                    undo.append(lambda c=cell, s=spec: M.CELL_TABLE.__setitem__(c, s))
                    M.CELL_TABLE[cell] = dataclasses.replace(M.CELL_TABLE[cell], **{role: timed})

    def uninstall():
        for restore in reversed(undo):
            restore()
    return uninstall


def numpy_profile(layout, batch):
    """Time per layer of one training step on ONE core (median of 5), in ms.

    The model runs with threads=1 and single-threaded BLAS here, so the
    parts add up to the step: this is where the core-time goes. With the
    default threads the step runs on every core and is correspondingly shorter.
    """
    import fast_layers as F
    from threadpoolctl import threadpool_limits
    names = PROFILED_FUNCTIONS
    totals = {n: [] for n in names}
    current = {}
    uninstall = install_timers(names, current)
    threads_before = F.THREADS
    try:
        model, _, step = numpy_train_step_fn(layout, batch)
        F.THREADS = 1
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
        F.THREADS = threads_before
        uninstall()
    med = {n: 1e3 * float(np.median(v)) for n, v in totals.items()}
    step_ms = 1e3 * float(np.median(whole))
    # conv1 (im2col): its forward product, bias and ReLU = block total minus the parts timed.
    # The pooling of both blocks is timed together, so it comes off the two blocks' sum.
    conv_fwd = med['conv_relu_pool_forward'] + med['winograd_relu_pool_forward']
    conv_bwd = med['conv_relu_pool_backward'] + med['winograd_relu_pool_backward']
    fwd_rest = (conv_fwd - med['im2col_3x3'] - med['winograd_input_transform'] - med['winograd_products']
                - med['winograd_output_transform'] - med['pool_blocks_forward'])
    bwd_rest = (conv_bwd - med['conv_weight_grad'] - med['col2im_3x3'] - med['input_grad_taps']
                - med['winograd_output_transform_backward'] - med['winograd_products_backward']
                - med['winograd_input_transform_backward'] - med['pool_blocks_backward'])
    rows = [('conv1 im2col', med['im2col_3x3']),
            ('conv1 product + bias/ReLU of both', fwd_rest),
            ('conv2 Winograd input transform', med['winograd_input_transform']),
            ('conv2 Winograd products', med['winograd_products']),
            ('conv2 Winograd output transform', med['winograd_output_transform']),
            ('max-pool forward (both)', med['pool_blocks_forward']),
            ('RNN forward', med['rnn_forward']),
            ('RNN backward (BPTT)', med['rnn_backward']),
            ('max-pool backward (both)', med['pool_blocks_backward']),
            ('conv2 Winograd output transform, backward', med['winograd_output_transform_backward']),
            ('conv2 Winograd products, backward (dU, dV)', med['winograd_products_backward']),
            ('conv2 Winograd input transform, backward', med['winograd_input_transform_backward']),
            ('conv1 dW product', med['conv_weight_grad']),
            ('ReLU/bias grads, conv1 reorder (both)', bwd_rest),
            ('kernel transforms (once per step)', med['winograd_kernel_transform']
             + med['winograd_kernel_transform_backward'])]
    accounted = sum(v for _, v in rows)
    rows.append(('rest (loss, head, clip, SGD, glue)', step_ms - accounted))
    return step_ms, rows


def torch_in_own_process(layout, cell, batch, steps, threads, eval_images):
    """(train img/s, eval img/s) of the PyTorch model timed in a fresh Python process."""
    script = Path(__file__).resolve().parent / 'torch_reference.py'
    out = subprocess.run([sys.executable, str(script), '--layout', layout, '--cell', cell, '--batch', str(batch),
                          '--steps', str(steps), '--threads', str(threads), '--eval-images', str(eval_images)],
                         capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    return result['train_img_s'], result['eval_img_s']


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
    # As a training run does; the thread count is the worker threads', for PyTorch too.
    print(f'process settings: {fast_layers.prepare_process_for_training()}')

    try:
        from threadpoolctl import threadpool_info
        blas = ', '.join(f"{i['internal_api']} {i.get('version')} {i['num_threads']} threads"
                         for i in threadpool_info())
    except ImportError:
        blas = 'threadpoolctl not installed'
    threads = fast_layers.THREADS
    print(f'numpy {np.__version__} ({blas}); {threads} worker threads; batch {args.batch}; '
          f'median of {args.steps} steps after 2 warm-up steps')
    torch_ok = False
    if not args.no_torch:
        try:
            import torch
            torch_ok = True
            print(f'torch {torch.__version__}, {threads} threads')
        except ImportError:
            print('PyTorch is not importable: NumPy figures only')

    header = (f"{'layout':8} {'cell':5} {'impl':9} {'train img/s':>11} {'eval img/s':>10} "
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
                    train, evaluation = torch_in_own_process(layout, cell, args.batch, args.steps, threads,
                                                             args.eval_images)
                    results.append((rep, layout, cell, 'torch-own', train, evaluation,
                                    1e3 * args.batch / train, float('nan'), flop * train / args.batch))
        if args.repeats > 1:
            line = '; '.join(f'{lay} {cell} {impl} {tr:.0f}' for r, lay, cell, impl, tr, *_ in results if r == rep)
            print(f'repeat {rep + 1}: training img/s: {line}')

    def rows_of(layout, cell, impl):
        return {r[0]: r[4:] for r in results if r[1:4] == (layout, cell, impl)}

    print(f'\nmedians over {args.repeats} repeat(s)')
    print(header)
    impls = ['numpy'] + (['torch', 'torch-own'] if torch_ok else [])
    for layout in args.layouts:
        for cell in args.cells:
            for impl in impls:
                tr, ev, ms, peak, gf = np.median(np.array(list(rows_of(layout, cell, impl).values())), axis=0)
                print(f'{layout:8} {cell:5} {impl:9} {tr:11.0f} {ev:10.0f} {ms:8.1f} {peak:8.0f} {gf:8.1f}')
    if torch_ok:
        print("(torch: this process, with the NumPy model's allocator settings; "
              "torch-own: a fresh process with the C library's defaults)")
        for other in ('torch', 'torch-own'):
            for layout in args.layouts:
                for cell in args.cells:
                    ours, theirs = rows_of(layout, cell, 'numpy'), rows_of(layout, cell, other)
                    train_ratio = [ours[r][0] / theirs[r][0] for r in ours]
                    eval_ratio = [ours[r][1] / theirs[r][1] for r in ours]
                    print(f"ratio numpy/{other}, {layout} {cell}: training {np.median(train_ratio):.2f}x "
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
