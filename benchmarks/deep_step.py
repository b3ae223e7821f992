"""A deep backbone's training step against the machine's matrix-product peak, its memory, and PyTorch.

The network is a preset's (--preset, default 'deep' of presets.json): its widths,
convs_per_block, batchnorm, seq_layout, cell, hidden, batch_size, whiten,
identity_init and readout, each of the first eight overridden by its option when
given (--widths, --convs-per-block, --no-batchnorm, --layout, --cell, --hidden,
--batch, --whiten); float32. The 'deep' preset: widths 64,256,256, two convolutions per
block, BatchNorm, identity initialisation, the 'rows' layout, a tanh RNN of 256
units, batch 512 (--whiten 2 adds the frozen 2x2 patch-whitening layer it had
before the deep-levers screen: 3 -> 24 channels, ReLU, before conv1). An
unknown preset is refused with one sentence on stderr (exit status 2). The
first line printed names the preset, the options that overrode it, and every
resulting setting. For that network it prints, all
measured in this one invocation:

1. The machine's float32 matrix-product peak: NumPy ``A @ B`` of a few square
   sizes on the worker-thread count (BLAS limited to it, as in training); the
   best size's median GFLOP/s is the peak the step is compared with.
2. The NumPy training step, ``model.loss(X, y)`` (forward and backward, train
   mode: no clipping or optimizer update) on random data, and inference
   (``model.forward``, eval mode) on the same batch. With whitening the
   model's filters are fit on that random batch first (``fit_whitening``, as
   a training run fits them on its images; a new model's are zeros). The
   step's FLOPs are counted from the network: the whitening layer's product
   2*32*32*2P*P per image (P = 3*k*k: the k x k patches times its 2P filters;
   forward only: it is frozen and the images need no gradient); each
   convolution 2*H*W*O*I*9 per image at its output resolution (before its
   pool; conv1's I is 2P after whitening, else 3), times 3 for forward and
   backward (times 2 for the first, whose input gradient nobody needs); the
   RNN's x_t @ W_xh and h @ W_hh for every step and the output layer, times 3;
   elementwise work (BatchNorm, ReLU, pooling, the patch copies, the Winograd
   transforms) is not counted. The achieved rate divides these
   direct-convolution-equivalent FLOPs by the step's time. Convolutions on
   even maps run by Winograd (all but a first convolution that reads the
   3-channel image itself; after whitening conv1 does too: each layer's
   ``winograd`` flag says): F(2x2, 3x3), 2.25x fewer multiplications than the
   direct convolution, or on maps of 8x8 and more F(4x4, 3x3), 4x fewer
   (the layer's ``tile``), so this *effective* rate may exceed the GEMM peak; the
   products Winograd actually executes are counted on a line of their own.
   Then a profile by phase: the whitening layer's forward, every
   convolution's forward and backward, every BatchNorm's, the RNN's and the
   head's, each timed on its own by calling the layer functions a step calls
   (``whiten_forward`` in micro-batches of ``fast_layers.CONV_CHUNK`` images
   on the worker threads, as ``backbone_forward`` runs it inside the first
   stage's micro-batches, its outputs not joined; ``backbone_forward`` /
   ``backbone_backward`` on a one-convolution backbone, conv1's fed the
   whitened map; ``batchnorm_forward`` / ``_backward``, ``recurrent_forward``
   / ``_backward``) with the shapes of the step, on the same worker threads.
   Rows are labelled from the layers' flags (Winograd or im2col, pool) and
   show each convolution's true inputs. The model has no hooks and cProfile
   sees only the main thread (the layers run on worker threads), so this is
   the honest split; its parts are timed apart (warm caches, a concatenation
   after every convolution), so their sum is compared with the step and the
   difference printed as 'rest'. A convolution's row includes its bias and
   ReLU (with BatchNorm the model applies the ReLU after the BatchNorm
   instead: the same work).
3. The peak memory of a training step: a fresh process (with the training
   process settings) builds the model (fitting its whitening) and runs
   --warmup + 1 steps; its peak resident set (VmHWM, or ru_maxrss) above its
   level after the imports, and the absolute peak, in GB, against the target
   of 8 GB.
4. PyTorch CPU on the same network (skipped, with the reason, without torch or
   with --no-torch): with whitening first a frozen ``nn.Conv2d(3, 2P, k,
   bias=False)`` (requires_grad False) padded as the NumPy layer (k=2: one
   zero row and column at the bottom and right; k=3: one on every side), then
   ReLU; per block conv3x3 -> max-pool -> BatchNorm -> ReLU, then conv3x3 ->
   BatchNorm -> ReLU; the last map read in the same layout (NHWC order),
   ``nn.RNN`` (or GRU/LSTM), Linear to 10, cross-entropy (default
   initialisation: timing only); the step is zero_grad + forward + backward,
   inference the forward under no_grad in eval mode. Timed in fresh
   processes, twice: with PyTorch's defaults (``torch.set_num_threads`` the
   same thread count), and with the process settings the NumPy model trains
   with (``fast_layers.prepare_process_for_training``: glibc's malloc told to
   keep freed memory, by ``mallopt`` before torch is imported; the project
   sets no MALLOC_* environment variables). The step-time ratio NumPy/PyTorch
   (above 1: NumPy slower) is printed for both.

Every time is the median of --repeats after --warmup untimed runs, with the
min-max spread. The NumPy figures come from this process, which has called
``prepare_process_for_training`` as a training run does.

Usage:
    python benchmarks/deep_step.py [--preset deep] [--widths 64,256,256] [--convs-per-block 2]
                                   [--no-batchnorm] [--whiten {0,2,3}] [--layout rows] [--cell rnn]
                                   [--hidden 256] [--batch 512]
                                   [--repeats 5] [--warmup 1] [--threads N] [--gemm-sizes 1024,2048,3072]
                                   [--no-torch]
    (the network options default to the preset's values; identity_init is always the preset's)

Reading the output: section 1's 'peak' is what one BLAS product reaches here;
section 2's 'achieved' rate over that peak says how far the whole step is
from a step that did nothing but large products (above 1 is possible only
thanks to Winograd; the 'executed products' ratio cannot exceed 1 by much);
the profile says which layers hold the rest. Memory is for the target; the
PyTorch lines give the step next to a mainstream implementation of the same
network on the same threads.
"""
import argparse
import dataclasses
import importlib.util
import json
import math
import resource
import subprocess
import sys

import numpy as np

import repo_on_path  # noqa: E402,F401  (the project's modules)
import fast_layers  # noqa: E402
import cnn_rnn_numpy as M  # noqa: E402
from torch_reference import timed  # noqa: E402  (the benchmarks' timing loop; torch is imported only when used)
import config as configuration  # noqa: E402

MEMORY_TARGET_GB = 8.0
DEFAULT_PRESET = 'deep'
# The network's settings: the argparse name -> the preset key it takes its default from.
# identity_init and readout have no option of their own: they are always the preset's.
PRESET_SETTINGS = {'widths': 'widths', 'convs_per_block': 'convs_per_block', 'batchnorm': 'batchnorm',
                   'whiten': 'whiten', 'identity_init': 'identity_init', 'layout': 'seq_layout',
                   'cell': 'cell', 'readout': 'readout', 'hidden': 'hidden', 'batch': 'batch_size'}
# Multiplications the direct convolution does per Winograd product: F(2x2, 3x3) runs 16 products
# per 2x2 outputs where the direct convolution does 36; F(4x4, 3x3) 36 per 4x4 outputs against 144.
WINOGRAD_SAVING = {2: 2.25, 4: 4.0}


# --------------------------------------------------------------------------
# Timing and memory helpers
# --------------------------------------------------------------------------

def num(x):
    """x with three significant digits and at least one decimal (0.0123, 1.23, 123.4, 1234.5)."""
    x = float(x)
    return f'{x:.{max(1, 2 - math.floor(math.log10(abs(x))))}f}' if x and math.isfinite(x) else f'{x:.1f}'


def plural(n, noun):
    return f'{n} {noun}{"s" * (n != 1)}'


def ms(times):
    """'median ms (min-max min-max)' of a list of seconds."""
    t = 1e3 * np.asarray(times)
    return f'{num(np.median(t))} ms (min-max {num(t.min())}-{num(t.max())})'


def peak_rss_bytes():
    """This process's peak resident set so far: VmHWM from /proc/self/status, else ru_maxrss."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == 'darwin' else peak * 1024      # bytes on macOS, kB on Linux


# --------------------------------------------------------------------------
# The network and its FLOPs
# --------------------------------------------------------------------------

def build_model(args, X=None):
    """The NumPy model of the settings (float32). With a whitening layer and images X (N, 3, 32, 32),
    its filters are fit on X (``fit_whitening``, as a training run does on its images): a new
    model's whiten_W is zeros, which would make every map after it zero."""
    model = M.CNNRNN(seq_layout=args.layout, hidden=args.hidden, cell=args.cell, widths=args.widths,
                     convs_per_block=args.convs_per_block, batchnorm=args.batchnorm, whiten=args.whiten,
                     identity_init=args.identity_init, readout=args.readout, seed=0)
    if model.whiten and X is not None:
        model.fit_whitening(X)
    return model


def random_batch(batch, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((batch, 3, 32, 32), dtype=np.float32), rng.integers(0, 10, batch)


def conv_table(model):
    """One dict per convolution: layer (ConvLayer), side (its output side before any pool), I, O,
    forward (its FLOPs per image), backward (2x forward; 1x for the first: no input gradient)."""
    rows, side = [], M.IMAGE_SIDE
    for i, layer in enumerate(model.layers):
        O, I = model.params[f'conv{layer.k}_W'].shape[:2]
        forward = 2 * side * side * O * I * 9
        rows.append({'layer': layer, 'side': side, 'I': I, 'O': O, 'forward': forward,
                     'backward': forward * (1 if i == 0 else 2)})
        if layer.pool:
            side //= 2
    return rows


def whitening_flops(model):
    """FLOPs per image of the patch-whitening layer's forward (0 without one): the 32x32 map's
    k x k patches (P = 3*k*k values each) @ its (P, 2P) filters, 2 * 32*32 * 2P * P. It has no
    backward: its filters are frozen and the images need no gradient."""
    if not model.whiten:
        return 0
    F, C, k, _ = model.params['whiten_W'].shape
    return 2 * M.IMAGE_SIDE * M.IMAGE_SIDE * F * (C * k * k)


def step_flops(model):
    """FLOPs per image of one training step, by part (2 FLOPs per multiply-add, matrix products only).

    Returns a dict: whiten_forward (the whitening layer's, 0 without; it has no backward),
    conv_forward, conv_backward, rnn_forward, rnn_backward, head_forward, head_backward, forward,
    total (the direct convolution's count), and executed (the products actually run: Winograd
    layers at 1/2.25 (F(2x2, 3x3)) or 1/4 (F(4x4, 3x3)) of their direct count).
    """
    convs = conv_table(model)
    R, C, H = model.map_side, model.channels, model.hidden
    T, D = M.sequence_length_and_size(model.seq_layout, R, R, C)
    G = M.CELL_GATES[model.cell]
    f = {'whiten_forward': whitening_flops(model),
         'conv_forward': sum(c['forward'] for c in convs), 'conv_backward': sum(c['backward'] for c in convs),
         'rnn_forward': 2 * T * (D * G * H + H * G * H), 'head_forward': 2 * H * M.NUM_CLASSES}
    f['rnn_backward'], f['head_backward'] = 2 * f['rnn_forward'], 2 * f['head_forward']
    f['forward'] = f['whiten_forward'] + f['conv_forward'] + f['rnn_forward'] + f['head_forward']
    f['total'] = f['forward'] + f['conv_backward'] + f['rnn_backward'] + f['head_backward']
    winograd = sum((c['forward'] + c['backward']) * (1 - 1 / WINOGRAD_SAVING[c['layer'].tile])
                   for c in convs if c['layer'].winograd)
    f['executed'] = f['total'] - winograd
    return f


# --------------------------------------------------------------------------
# 1. The GEMM peak
# --------------------------------------------------------------------------

def gemm_rates(sizes, repeats, warmup):
    """{n: [GFLOP/s of each timed float32 n x n @ n x n]}, BLAS on the threads it is allowed."""
    rng = np.random.default_rng(0)
    rates = {}
    for n in sizes:
        A, B = rng.random((n, n), dtype=np.float32), rng.random((n, n), dtype=np.float32)
        out = np.empty((n, n), np.float32)
        times = timed(lambda: np.matmul(A, B, out=out), repeats, max(warmup, 1))
        rates[n] = [2 * n ** 3 / t / 1e9 for t in times]
    return rates


# --------------------------------------------------------------------------
# 2. The NumPy step, and its profile by phase
# --------------------------------------------------------------------------

def numpy_profile(model, X, y, repeats, warmup):
    """[(phase, times (s), FLOPs of the batch or None)] of one training step, each part timed on its own.

    The parts, in the order a step runs them: the whitening layer's forward, if any
    (``whiten_forward`` on micro-batches of ``fast_layers.CONV_CHUNK`` images on the worker
    threads, as ``backbone_forward`` runs it inside the first stage's micro-batches; its outputs
    are not joined, as there; no backward: frozen, and the images need no gradient), per
    convolution its forward (``backbone_forward`` on a one-convolution backbone, conv1's on the
    whitened map: micro-batches on the worker threads, bias, ReLU, pool) and its
    BatchNorm's (over the whole batch, train mode), the RNN, the head with the loss (forward and
    backward), the RNN's backward, then per convolution from the last its BatchNorm's backward and
    its backward (with the kernel transform's adjoint; the first without input gradient). Each
    runs on the real activations of the step before it.
    """
    p, N = model.params, X.shape[0]
    rng = np.random.default_rng(1)
    f = step_flops(model)
    h = np.asarray(X, dtype=model.dtype).transpose(0, 2, 3, 1)
    forward, backward = [], []
    if model.whiten:
        W, chunk, images = p['whiten_W'], fast_layers.CONV_CHUNK, h
        run = lambda: fast_layers.map_on_threads(                           # noqa: E731
            lambda s: M.whiten_forward(images[s:s + chunk], W)[0], range(0, N, chunk))
        times = timed(run, repeats, warmup)
        h = np.concatenate(run())                                           # conv1's input
        side, k = M.IMAGE_SIDE, model.whiten
        forward.append((f'whitening {k}x{k} {W.shape[1]}->{W.shape[0]} at {side}x{side} (frozen) forward', times,
                        f['whiten_forward'] * N))
    for i, c in enumerate(conv_table(model)):
        layer, k = c['layer'], c['layer'].k
        conv_only = [dataclasses.replace(layer, bn=False)]
        x_in = h
        run = lambda: M.backbone_forward(x_in, p, conv_only, True)     # noqa: E731
        times = timed(run, repeats, warmup)
        out, cache, _ = run()
        kind = f'Winograd F({layer.tile}x{layer.tile})' if layer.winograd else 'im2col'
        pool = ', pool' if layer.pool else ''
        name = f"conv{k} {c['I']}->{c['O']} at {c['side']}x{c['side']} ({kind}{pool})"
        forward.append((f'{name} forward', times, c['forward'] * N))
        dout = rng.standard_normal(out.shape).astype(model.dtype)
        times = timed(lambda: M.backbone_backward(dout, cache, input_grad=i > 0), repeats, warmup)
        backward.append((f'{name} backward', times, c['backward'] * N))
        if layer.bn:
            args = (p[f'bn{k}_gamma'], p[f'bn{k}_beta'], p[f'bn{k}_mean'], p[f'bn{k}_var'], True,
                    model.bn_momentum, model.bn_eps)
            bn_in = out
            times = timed(lambda: M.batchnorm_forward(bn_in, *args), repeats, warmup)
            out, bn_cache, _, _ = M.batchnorm_forward(bn_in, *args)
            forward.append((f'bn{k} forward', times, None))
            times = timed(lambda: M.batchnorm_backward(dout, bn_cache), repeats, warmup)
            backward.append((f'bn{k} backward', times, None))
            out = np.maximum(out, 0)
        h = out
    seq = M.map_to_sequence(h, model.seq_layout)
    times = timed(lambda: M.recurrent_forward(seq, p, model.cell, model.readout), repeats, warmup)
    r, rnn_cache = M.recurrent_forward(seq, p, model.cell, model.readout)    # r: what the head reads
    rnn = [(f'{model.cell.upper()} forward', times, f['rnn_forward'] * N)]

    def head():
        logits, c_out = M.affine_forward(r, p['W_ho'], p['b_o'])
        _, dlogits = M.softmax_loss(logits, y)
        return M.affine_backward(dlogits, c_out)
    rnn.append(('head + loss, forward and backward', timed(head, repeats, warmup),
                (f['head_forward'] + f['head_backward']) * N))
    dh = head()[0]
    times = timed(lambda: M.recurrent_backward(dh, rnn_cache, model.cell), repeats, warmup)
    rnn.append((f'{model.cell.upper()} backward (BPTT)', times, f['rnn_backward'] * N))
    return forward + rnn + backward[::-1]


# --------------------------------------------------------------------------
# 3. Peak memory (a fresh process) and 4. PyTorch (fresh processes)
# --------------------------------------------------------------------------

def child_memory(args):
    """In a fresh process: peak RSS after the imports, then after building and --warmup + 1 steps."""
    fast_layers.prepare_process_for_training(args.threads)
    baseline = peak_rss_bytes()
    X, y = random_batch(args.batch)
    model = build_model(args, X)
    for _ in range(args.warmup + 1):
        model.loss(X, y)
    return {'baseline': baseline, 'peak': peak_rss_bytes()}


def torch_model(widths, convs_per_block, batchnorm, layout, cell, hidden, whiten=0, readout='last'):
    """The NumPy model's network in PyTorch (default initialisation; timing only).

    readout: what the head reads of the hidden states, as the NumPy model's (``M.readout_forward``):
    the last, or the mean or maximum over time of the layer's output sequence.

    whiten = k > 0 puts the frozen patch-whitening layer first: zero padding as the NumPy layer's
    ((k-1)//2 before, k//2 after on each spatial axis: k=2 one row and column at the bottom and
    right, k=3 one on every side), a k x k convolution 3 -> 2P without bias and without gradient
    (P = 3*k*k), ReLU."""
    from torch import nn
    layers, inputs = [], 3
    if whiten:
        before, after = (whiten - 1) // 2, whiten // 2
        planes = 2 * 3 * whiten * whiten
        frozen = nn.Conv2d(3, planes, whiten, bias=False)
        frozen.weight.requires_grad_(False)
        layers += [nn.ZeroPad2d((before, after, before, after)), frozen, nn.ReLU()]
        inputs = planes
    for width in widths:
        for j in range(convs_per_block):
            layers.append(nn.Conv2d(inputs, width, 3, padding=1))
            if j == 0:
                layers.append(nn.MaxPool2d(2))
            layers += ([nn.BatchNorm2d(width)] if batchnorm else []) + [nn.ReLU()]
            inputs = width
    R, C = M.IMAGE_SIDE >> len(widths), widths[-1]
    T, D = M.sequence_length_and_size(layout, R, R, C)

    class TorchDeepCNNRNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Sequential(*layers)
            if cell == 'rnn':
                self.rnn = nn.RNN(D, hidden, nonlinearity='tanh', batch_first=True)
            else:
                self.rnn = {'gru': nn.GRU, 'lstm': nn.LSTM}[cell](D, hidden, batch_first=True)
            self.head = nn.Linear(hidden, M.NUM_CLASSES)

        def forward(self, x):
            f = self.backbone(x).permute(0, 2, 3, 1)        # (N, R, R, C): NHWC, as the NumPy model
            seq = f.amax(dim=2) if layout == 'rowmax' else f.reshape(x.shape[0], T, D)
            out, h = self.rnn(seq)                           # out (N, T, H): h_1..h_T
            if readout != 'last':
                return self.head(out.mean(dim=1) if readout == 'mean' else out.amax(dim=1))
            if cell == 'lstm':
                h = h[0]
            return self.head(h[-1])
    return TorchDeepCNNRNN()


def child_torch(args, settings):
    """In a fresh process: PyTorch's step and inference times, with torch's defaults or the NumPy
    model's process settings (applied before torch is imported)."""
    applied = str(fast_layers.prepare_process_for_training(args.threads)) if settings else None
    baseline = peak_rss_bytes()
    import torch
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torch_model(args.widths, args.convs_per_block, args.batchnorm, args.layout, args.cell, args.hidden,
                        args.whiten, args.readout)
    X, y = (torch.from_numpy(a) for a in random_batch(args.batch))
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        model.zero_grad(set_to_none=True)
        loss_fn(model(X), y).backward()

    def infer():
        with torch.no_grad():
            model(X)
    model.train()
    train = timed(step, args.repeats, args.warmup)
    model.eval()
    infer_times = timed(infer, args.repeats, args.warmup)
    return {'train': train, 'infer': infer_times, 'baseline': baseline, 'peak': peak_rss_bytes(),
            'version': torch.__version__, 'threads': torch.get_num_threads(), 'settings': applied}


def run_child(args, mode):
    """Run this script in a fresh process in ``mode``; (result dict, None) or (None, why it failed)."""
    cmd = [sys.executable, __file__, '--child', mode, '--preset', args.preset,
           '--widths', ','.join(map(str, args.widths)), '--convs-per-block', str(args.convs_per_block),
           '--whiten', str(args.whiten), '--layout', args.layout, '--cell', args.cell,
           '--hidden', str(args.hidden), '--batch', str(args.batch), '--repeats', str(args.repeats),
           '--warmup', str(args.warmup), '--threads', str(args.threads)]
    if not args.batchnorm:
        cmd.append('--no-batchnorm')
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        lines = (out.stderr.strip() or out.stdout.strip() or f'exit status {out.returncode}').splitlines()
        return None, lines[-1]
    return json.loads(out.stdout.strip().splitlines()[-1]), None


# --------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------

def int_list(text):
    """'64,256,256' -> (64, 256, 256)."""
    return tuple(int(v) for v in text.split(',') if v.strip())


def refuse(message):
    """A bad command line that argparse cannot see (an unknown preset): one sentence on stderr, exit 2."""
    print(f'deep_step: error: {message}', file=sys.stderr)
    sys.exit(2)


def describe(args, model):
    """The first line: the preset, what overrode it, and every resulting setting."""
    R, C = model.map_side, model.channels
    T, D = M.sequence_length_and_size(args.layout, R, R, C)
    options = {'widths': '--widths', 'convs_per_block': '--convs-per-block', 'batchnorm': '--no-batchnorm',
               'whiten': '--whiten', 'layout': '--layout', 'cell': '--cell', 'hidden': '--hidden', 'batch': '--batch'}
    overridden = ', '.join(options[name] for name in args.overridden) or 'nothing'
    if model.whiten:
        k, I = model.whiten, model.conv1_inputs
        whitening = f'whiten {k} ({k}x{k} patch whitening, frozen: 3 -> {I} channels, ReLU)'
    else:
        whitening = 'whiten 0 (no whitening layer)'
    return (f"deep_step: preset {args.preset} (overridden: {overridden}): widths {','.join(map(str, args.widths))}, "
            f"{args.convs_per_block} conv(s) per block, BatchNorm {'on' if args.batchnorm else 'off'}, {whitening}, "
            f"identity_init {'on' if args.identity_init else 'off'}, layout {args.layout} (T={T}, D={D}), "
            f'cell {args.cell}, readout {args.readout}, hidden {args.hidden}, batch {args.batch}, float32; '
            f'{len(model.layers)} convolutions')


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--preset', default=DEFAULT_PRESET,
                    help=f"the preset of presets.json whose network is measured (default {DEFAULT_PRESET}); "
                         f"the options below override its settings")
    ap.add_argument('--widths', type=int_list, help="channels of each block, e.g. 64,256,256 (default: the preset's)")
    ap.add_argument('--convs-per-block', type=int, help="default: the preset's")
    ap.add_argument('--no-batchnorm', dest='batchnorm', action='store_const', const=False,
                    help="no BatchNorm after the convs (default: the preset's)")
    ap.add_argument('--whiten', type=int, choices=M.WHITEN_SIZES,
                    help="patch size of the frozen patch-whitening layer before conv1, 0 none (default: the preset's)")
    ap.add_argument('--layout', choices=M.SEQ_LAYOUTS, help="default: the preset's seq_layout")
    ap.add_argument('--cell', choices=M.CELLS, help="default: the preset's")
    ap.add_argument('--hidden', type=int, help="default: the preset's")
    ap.add_argument('--batch', type=int, help="default: the preset's batch_size")
    ap.add_argument('--repeats', type=int, default=5, help='timed runs of every figure (their median is printed)')
    ap.add_argument('--warmup', type=int, default=1, help='untimed runs before each figure')
    ap.add_argument('--threads', type=int, default=None,
                    help=f'worker threads (default {fast_layers.THREADS_ENV} or the CPUs this process may use)')
    ap.add_argument('--gemm-sizes', type=int_list, default=(1024, 2048, 3072), help='square matmul sizes for the peak')
    ap.add_argument('--no-torch', action='store_true', help='skip the PyTorch comparison')
    ap.add_argument('--child', choices=['memory', 'torch-defaults', 'torch-settings'], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.identity_init = args.readout = None
    try:
        preset = configuration.load_preset(args.preset)
    except configuration.ConfigError as e:
        refuse(str(e))
    args.overridden = [name for name in PRESET_SETTINGS if getattr(args, name) is not None]
    for name, key in PRESET_SETTINGS.items():
        if getattr(args, name) is None:
            value = getattr(preset, key)
            setattr(args, name, tuple(value) if isinstance(value, list) else value)
    if args.repeats < 1 or args.warmup < 0 or args.batch < 2 or not args.gemm_sizes:
        ap.error('--repeats must be >= 1, --warmup >= 0, --batch >= 2 and --gemm-sizes non-empty')
    try:
        args.threads_given = args.threads is not None      # for the settings' 'from argument' / 'usable CPUs'
        args.threads = fast_layers.worker_threads() if args.threads is None else args.threads
        if args.threads < 1:
            raise ValueError(f'--threads must be a positive integer, got {args.threads}')
        build_model(args)
    except ValueError as e:
        ap.error(str(e))
    return args


def main():
    args = parse_args()
    if args.child:
        result = (child_memory(args) if args.child == 'memory'
                  else child_torch(args, settings=args.child == 'torch-settings'))
        print(json.dumps(result))
        return

    settings = fast_layers.prepare_process_for_training(args.threads if args.threads_given else None)
    X, y = random_batch(args.batch)
    model = build_model(args, X)
    threads = plural(args.threads, 'thread')
    print(describe(args, model))
    print(f'process settings: {settings}')
    try:
        from threadpoolctl import threadpool_info
        blas = ', '.join(f"{i['internal_api']} {i.get('version')}" for i in threadpool_info())
    except ImportError:
        blas = 'threadpoolctl not installed'
    print(f'numpy {np.__version__} ({blas}); every time: median (min-max) of {args.repeats} '
          f'after {args.warmup} warm-up run(s)')

    # 1. The GEMM peak
    print(f'\n1. float32 matrix-product peak (NumPy matmul, {threads})')
    rates = gemm_rates(args.gemm_sizes, args.repeats, args.warmup)
    for n, r in rates.items():
        print(f'  matmul {n}x{n}: {np.median(r):.1f} GFLOP/s (min-max {min(r):.1f}-{max(r):.1f})')
    best = max(rates, key=lambda n: np.median(rates[n]))
    peak = float(np.median(rates[best]))
    print(f'  GEMM peak: {peak:.1f} GFLOP/s (size {best}, {threads})')

    # 2. The NumPy step
    print('\n2. NumPy training step (model.loss: forward + backward, train mode) and inference '
          '(model.forward, eval mode)')
    f = step_flops(model)
    whitening = f"whitening {f['whiten_forward'] / 1e6:.1f}, " if model.whiten else ''
    print(f"  FLOPs per image: {f['total'] / 1e6:.1f} MFLOP per training step (forward "
          f"{f['forward'] / 1e6:.1f}: {whitening}convolutions {f['conv_forward'] / 1e6:.1f}, "
          f"RNN {f['rnn_forward'] / 1e6:.2f}, "
          f"head {f['head_forward'] / 1e6:.4f}; backward {(f['total'] - f['forward']) / 1e6:.1f}), "
          f'direct convolution counted')
    train = timed(lambda: model.loss(X, y), args.repeats, args.warmup)
    infer = timed(lambda: model.forward(X), args.repeats, args.warmup)
    t_step = float(np.median(train))
    print(f'  numpy train step: {ms(train)}, {args.batch / t_step:.1f} img/s')
    print(f'  numpy inference: {ms(infer)}, {args.batch / np.median(infer):.1f} img/s')
    achieved = f['total'] * args.batch / t_step / 1e9
    executed = f['executed'] * args.batch / t_step / 1e9
    print(f'  achieved: {achieved:.1f} GFLOP/s effective (direct-convolution-equivalent FLOPs / step time) '
          f'= {achieved / peak:.2f}x the GEMM peak')
    print(f"  executed products: {f['executed'] / 1e6:.1f} MFLOP per image, {executed:.1f} GFLOP/s "
          f'= {executed / peak:.2f}x the GEMM peak')
    winograd = [f'conv{layer.k} F({layer.tile}x{layer.tile},3x3) {WINOGRAD_SAVING[layer.tile]}x'
                for layer in model.layers if layer.winograd]
    print(f"  ({', '.join(winograd) or 'no convolution'} fewer multiplications than the direct count, by "
          f'Winograd, so the effective rate may exceed the GEMM peak; the executed rate may not)')

    print(f'  profile by phase (each part timed on its own by calling the layer functions a step calls, '
          f'same shapes, {plural(args.threads, "worker thread")}; the model has no hooks '
          f'and cProfile sees only the main thread):')
    if model.method_backbone:
        print("    (the method's backbone trains on its fused kernels, conv_stack_forward; the rows time the "
              'general backbone functions on its layers, the same arithmetic)')
    rows = numpy_profile(model, X, y, args.repeats, args.warmup)
    print(f"    {'phase':52} {'time':>30} {'of step':>8} {'GFLOP/s':>8}")
    for name, times, flops in rows:
        t = float(np.median(times))
        rate = f'{flops / t / 1e9:8.1f}' if flops else f"{'':8}"
        print(f'    {name:52} {ms(times):>30} {100 * t / t_step:7.1f}% {rate}')
    parts = sum(float(np.median(times)) for _, times, _ in rows)
    phases = {}
    for name, times, _ in rows:
        kind = name.split()[0].rstrip('0123456789') if name.startswith(('whitening', 'conv', 'bn')) else 'RNN + head'
        if kind != 'RNN + head':
            kind += ' forward' if name.endswith('forward') else ' backward'
        phases[kind] = phases.get(kind, 0.0) + float(np.median(times))
    print('  phases: ' + ', '.join(f'{kind} {1e3 * t:.1f} ms ({100 * t / t_step:.0f}%)' for kind, t in phases.items()))
    print(f'  sum of the parts: {1e3 * parts:.1f} ms; the step: {1e3 * t_step:.1f} ms; rest (L2 term, '
          f'concatenations, glue; negative: the parts ran slower alone): {1e3 * (t_step - parts):.1f} ms')

    # 3. Memory
    print(f'\n3. peak memory of a training step (fresh process, training process settings, '
          f'{args.warmup} + 1 step(s))')
    mem, why = run_child(args, 'memory')
    if mem is None:
        print(f'  memory not measured: {why}')
    else:
        above, absolute = (mem['peak'] - mem['baseline']) / 2**30, mem['peak'] / 2**30
        print(f"  peak RSS: {absolute:.3f} GB absolute, {above:.3f} GB above the {mem['baseline'] / 2**30:.3f} GB "
              f"after the imports; target under {MEMORY_TARGET_GB:.0f} GB: "
              f"{'met' if absolute < MEMORY_TARGET_GB else 'NOT met'}")

    # 4. PyTorch
    print(f'\n4. PyTorch CPU, the same network ({threads}, fresh processes)')
    if args.no_torch:
        print('  PyTorch skipped: --no-torch')
        return
    if importlib.util.find_spec('torch') is None:
        print('  PyTorch skipped: torch is not importable (pip install torch; it is optional)')
        return
    results = {}
    for mode, label in (('torch-defaults', "torch's defaults"),
                        ('torch-settings', "the NumPy model's process settings")):
        r, why = run_child(args, mode)
        if r is None:
            print(f'  torch ({label}) failed: {why}')
            continue
        results[mode] = r
        print(f"  torch {r['version']} train step, {label}: {ms(r['train'])}, "
              f"{args.batch / np.median(r['train']):.1f} img/s; inference {ms(r['infer'])}; "
              f"peak RSS {r['peak'] / 2**30:.3f} GB")
        if r['settings']:
            print(f"    (settings: {r['settings']})")
    for mode, label in (('torch-defaults', "torch's defaults"), ('torch-settings', 'same process settings')):
        if mode in results:
            r = results[mode]
            print(f"  step time numpy/torch ({label}): train {t_step / np.median(r['train']):.2f}x, "
                  f"inference {np.median(infer) / np.median(r['infer']):.2f}x (above 1: NumPy slower)")


if __name__ == '__main__':
    main()
