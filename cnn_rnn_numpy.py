"""A CNN+RNN image classifier for CIFAR-10, forward and backward, in NumPy.

Architecture (one image of shape (3, 32, 32)):

    conv1 3x3, 3->64, pad 1  -> ReLU -> 2x2 max-pool   (64, 16, 16)
    conv2 3x3, 64->64, pad 1 -> ReLU -> 2x2 max-pool   (64, 8, 8)
    read the 8x8x64 map as a sequence                  (T, D)
        'pixels': T=64 steps (row-major positions), D=64 channels
        'rows':   T=8 steps (one per row),          D=512 = 8 cols x 64 channels
        'flat':   T=1 step (the whole map),         D=4096 (no recurrence: a pure CNN)
        'rowmax': T=8 steps (one per row),          D=64, each row max-pooled over its columns
    a tanh RNN (or GRU, LSTM), H=128 units, h_0 = 0    h_T (128,)
        (readout 'mean' or 'max': the mean or maximum of h_1..h_T instead, a lever)
    affine H->10, softmax cross-entropy

That is the method, and the default. Other backbones are preset keys (``CNNRNN``'s widths,
convs_per_block, batchnorm): blocks of 3x3 convolutions, a 2x2 max-pool after the first of each
block, each convolution followed by [BatchNorm and] ReLU (``backbone_layers``, ``backbone_forward``);
the layouts read the last map, whatever its size. Two of airbench's levers, off in the method:
a frozen k x k patch-whitening layer before conv1 (``whiten``, ``whiten_forward``,
``patch_whitening_weights``) and identity (dirac) initialisation of the convolutions
(``identity_init``, ``dirac_init``).

Every layer is a pair of functions in the CS231n style: ``*_forward`` returns
``(out, cache)`` and ``*_backward`` takes the upstream gradient and the cache
and returns the gradients. ``CNNRNN.loss`` chains them. The recurrent cells
are registered in one table, ``CELL_TABLE``, which is all the model knows
about them.

This module is the method, readable top to bottom; ``fast_layers.py`` holds
what makes it fast, as CS231n's fast_layers.py sits beside its layers.py:
im2col/col2im, the fused conv -> ReLU -> max-pool block, conv2 by
Winograd's F(2x2, 3x3) (2.25x fewer multiply-adds), and the worker threads
that run micro-batches of the conv blocks and slices of the recurrence on
every CPU the process may use. ``conv3x3_forward``, ``relu_forward`` and
``maxpool2x2_forward`` below are the plain layers the fused blocks are tested
against. Process-wide settings for training (allocator, BLAS threads) are
``fast_layers.prepare_process_for_training()``; importing either module
changes none.

Internal layout. Images enter the model as NCHW (the archive's own order) but
every convolutional layer works in NHWC: with channels last, the 64 channels of
one pixel are contiguous, so

* im2col is a strided *view* of the padded input (no index arithmetic) and a
  single copy turns it into the (N*H*W, 9*C) matrix that BLAS multiplies;
* the conv output ``cols @ W`` already comes out as NHWC, no transpose;
* every sequence layout is a free reshape of the pooled NHWC map:
  (N, 8, 8, 64) -> (N, 64, 64) for 'pixels', -> (N, 8, 512) for 'rows'.

The public parameter shapes stay those of common frameworks (conv weights
``(O, I, kH, kW)``, cross-correlation); the README lists them.
"""
import json
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

import fast_layers
from data_utils import IMAGE_SHAPE, NUM_CLASSES
from fast_layers import (ConvLayer, batch_slices, col2im_3x3, conv_layer_backward, conv_layer_forward,
                         conv_layer_weights, conv_stack_backward, conv_stack_forward, conv_weight_grad,
                         conv_weight_matrix, im2col_3x3, input_grad_taps, map_on_threads, pool_blocks_backward,
                         pool_blocks_forward, sum_in_order, thread_count, winograd_kernel_transform_backward)
from runfiles import RunFileError, read_npz, write_npz

FORMAT_VERSION = 1
# How the pooled 8x8x64 map is read: 64 steps of 64 channels, 8 steps of one
# row each, or 'flat', the whole map as one step (with h_0 = 0 the cell is then
# one hidden layer and W_hh is never read: the pure-CNN baseline), or 'rowmax', one step a row
# as 'rows' but each row max-pooled over its columns (airbench's head pools the whole map to one
# pixel; this keeps the rows as the sequence and pools only across them).
SEQ_LAYOUTS = ('pixels', 'rows', 'flat', 'rowmax')
MODEL_DTYPES = ('float32', 'float64')   # float32 to train, float64 for gradient checks
RNN_INITS = ('xavier', 'orthogonal')
# The recurrent cells (CELL_TABLE, CELLS, CELL_GATES) are registered after their functions, below.
# The parameters of the method's model that carry L2 weight decay (biases are not decayed);
# CNNRNN.decayed_names() gives them for any backbone: every convK_W, then these three.
DECAYED_PARAMS = ('conv1_W', 'conv2_W', 'W_xh', 'W_hh', 'W_ho')
RECURRENT_DECAYED = ('W_xh', 'W_hh', 'W_ho')
# The backbone. Each block halves the map with a 2x2 max-pool, so at most MAX_BLOCKS blocks
# leave a pixel of the 32x32 image. The method's is two blocks of one 64-channel convolution
# without BatchNorm; files written before the backbone was configurable hold that one.
IMAGE_SIDE = IMAGE_SHAPE[1]
MAX_BLOCKS = IMAGE_SIDE.bit_length() - 1
METHOD_BACKBONE = {'widths': [64, 64], 'convs_per_block': 1, 'batchnorm': False,
                   'bn_momentum': 0.1, 'bn_eps': 1e-5}
# BatchNorm's running statistics bnK_mean, bnK_var: kept in params (so files, checkpoints and the
# weight average carry them), but measured by the forward pass in train mode, not trained.
RUNNING_STATISTICS = ('_mean', '_var')
# How the convolutions start (issue 23's airbench levers, both off in the method): ``whiten`` = k
# puts a frozen k x k patch-whitening layer before conv1 (0: none; ``patch_whitening_weights``),
# ``identity_init`` makes each convolution with no more inputs than outputs start as the identity
# on its first inputs (``dirac_init``). Files written before these keys hold the method's.
METHOD_CONV_INIT = {'whiten': 0, 'identity_init': False}
WHITEN_SIZES = (0, 2, 3)
# The parameters fit once from the data, then frozen: saved with the others, never trained.
FROZEN_PARAMS = ('whiten_W',)


def is_running_statistic(name):
    """True for BatchNorm's running statistics (bnK_mean, bnK_var): measured by the forward pass."""
    return name.startswith('bn') and name.endswith(RUNNING_STATISTICS)


def is_frozen(name):
    """True for the parameters no optimizer updates and no gradient reaches: BatchNorm's running
    statistics (measured by ``CNNRNN.loss``'s forward pass) and the patch-whitening filters
    whiten_W (fit from the training images by ``CNNRNN.fit_whitening``). Both are in ``params``,
    so files, checkpoints and the weight average carry them."""
    return is_running_statistic(name) or name in FROZEN_PARAMS


class ModelFileError(RunFileError):
    """A model or checkpoint file that cannot be loaded; the message says why and what to do."""


# --------------------------------------------------------------------------
# Convolution (3x3, stride 1, padding 1), NHWC: im2col + one matrix product
# --------------------------------------------------------------------------
# im2col_3x3 and its adjoint col2im_3x3 come from fast_layers, which shares
# them with the fused conv blocks the model trains with.

def conv3x3_forward(x, w, b):
    """3x3 convolution (cross-correlation), stride 1, zero padding 1.

    Inputs:
    - x: (N, H, W, C) input, NHWC
    - w: (O, C, 3, 3) weights
    - b: (O,) biases

    Returns a tuple of:
    - out: (N, H, W, O)
    - cache: (cols, w, x_shape)
    """
    N, H, W, C = x.shape
    cols = im2col_3x3(x)
    out = cols @ conv_weight_matrix(w)
    out += b
    return out.reshape(N, H, W, w.shape[0]), (cols, w, x.shape)


def conv3x3_backward(dout, cache):
    """Backward pass of ``conv3x3_forward``.

    Inputs:
    - dout: (N, H, W, O) upstream gradient

    Returns a tuple of:
    - dx: (N, H, W, C)
    - dw: (O, C, 3, 3)
    - db: (O,)
    """
    cols, w, x_shape = cache
    dout2 = dout.reshape(-1, w.shape[0])
    dx = col2im_3x3(input_grad_taps(dout2, w), x_shape)
    return dx, conv_weight_grad(cols, dout2, w.shape), dout2.sum(axis=0)


# --------------------------------------------------------------------------
# ReLU and 2x2 max-pooling, NHWC
# --------------------------------------------------------------------------

def relu_forward(x):
    """ReLU. x: any shape. Returns (out same shape, cache)."""
    out = np.maximum(x, 0)
    return out, out


def relu_backward(dout, cache):
    """Backward pass of ReLU: the gradient passes where the output is positive."""
    return dout * (cache > 0)


def maxpool2x2_forward(x):
    """2x2 max-pooling with stride 2.

    Inputs:
    - x: (N, H, W, C) with H and W even

    Returns a tuple of:
    - out: (N, H/2, W/2, C)
    - cache: (winner, x.shape), see ``fast_layers.pool_blocks_forward``
    """
    N, H, W, C = x.shape
    blocks = x.reshape(N, H // 2, 2, W // 2, 2, C).transpose(2, 4, 0, 1, 3, 5)
    out, winner = pool_blocks_forward(blocks)
    return out, (winner, x.shape)


def maxpool2x2_backward(dout, cache):
    """Backward pass of ``maxpool2x2_forward``: dout (N, H/2, W/2, C) -> dx (N, H, W, C)."""
    winner, (N, H, W, C) = cache
    dblocks = pool_blocks_backward(dout, winner)
    return dblocks.transpose(2, 3, 0, 4, 1, 5).reshape(N, H, W, C)


# --------------------------------------------------------------------------
# Spatial BatchNorm, NHWC (torch.nn.BatchNorm2d's forms)
# --------------------------------------------------------------------------
# Channels last, as the conv stack produces them: every per-channel statistic
# is a reduction over the leading axes of the (N*H*W, C) view of the map, and
# broadcasting a (C,) vector needs no reshaping. NumPy adds the N*H*W rows of a
# column reduction one after the other (no pairwise summation across rows),
# which in float32 loses ~1e-5 relative over a 32k-row batch, and a reduction
# cast to float64 runs several times slower than one in float32 (the map is
# converted chunk by chunk). channel_sum takes the middle road: float32 sums of
# blocks of SUM_BLOCK rows, then float64 across the blocks (~1e-8 relative).

# Rows per float32 block of channel_sum: short enough for float32, long enough
# that the float64 sum of the (N*H*W / SUM_BLOCK, C) partial sums is cheap.
SUM_BLOCK = 64


def channel_sum(a, b=None):
    """Per-channel sum over the rows of a, or of the product a * b, in float64.

    a, b: (n, C) arrays of one dtype (b, if given, a's shape). Rows are summed in a's dtype in
    blocks of SUM_BLOCK (or the largest power of two below it that divides n), the blocks'
    sums in float64. Returns (C,) float64.
    """
    n, C = a.shape
    m = SUM_BLOCK
    while n % m:
        m //= 2
    blocks = a.reshape(n // m, m, C)
    part = (np.einsum('kij->kj', blocks) if b is None
            else np.einsum('kij,kij->kj', blocks, b.reshape(n // m, m, C)))    # (n / m, C)
    return part.sum(axis=0, dtype=np.float64)


def batchnorm_forward(x, gamma, beta, running_mean, running_var, train, momentum=0.1, eps=1e-5):
    """Spatial batch normalisation of an NHWC map, per channel over (N, H, W).

    y = gamma * (x - mu) / sqrt(var + eps) + beta, with mu, var the batch mean and
    biased variance (train) or the running statistics (eval); in train mode
    running <- (1 - momentum) * running + momentum * batch, var unbiased (n / (n - 1)).

    Inputs:
    - x: (N, H, W, C), channels last like the conv stack's maps (any (..., C) works)
    - gamma, beta: (C,) scale and shift
    - running_mean, running_var: (C,) running statistics; never modified
    - train: True normalises with the batch statistics and updates the running
      ones; False (eval) normalises with the running statistics
    - momentum, eps: as torch.nn.BatchNorm2d (n = N*H*W must be > 1 in train mode)

    Returns a tuple of:
    - out: same shape and dtype as x
    - cache: for ``batchnorm_backward``
    - new_mean, new_var: (C,) the updated running statistics, new arrays in the
      dtype of running_mean/running_var (train), or the inputs themselves (eval).
      Returned, not written in place, so a caller holding the old arrays (a
      checkpoint being written, a gradient check) never sees them change.
    """
    C = x.shape[-1]
    # A view for a contiguous map (the conv blocks' outputs are); a copy otherwise.
    x2 = x.reshape(-1, C)
    if not train:
        inv_std = 1.0 / np.sqrt(running_var.astype(np.float64) + eps)
        scale = (gamma * inv_std).astype(x.dtype)
        shift = (beta - running_mean * gamma * inv_std).astype(x.dtype)
        out = x2 * scale
        out += shift
        # x itself, not x-hat: inference needs no second map, and the eval
        # backward (rare: gradient checks, frozen statistics) rebuilds x-hat.
        cache = (False, x2, gamma, running_mean, inv_std)
        return out.reshape(x.shape), cache, running_mean, running_var

    n = x2.shape[0]
    if n < 2:
        raise ValueError(f'batchnorm_forward in train mode needs more than one value per channel, got '
                         f'input shape {x.shape}; use a larger batch or eval mode.')
    mean = channel_sum(x2) / n
    # The one map-sized array the layer keeps: centred here, scaled in place
    # below into x-hat, which both the output and the backward pass need.
    xhat = x2 - mean.astype(x.dtype)
    var = channel_sum(xhat, xhat) / n      # biased; no squared temporary
    inv_std = 1.0 / np.sqrt(var + eps)
    xhat *= inv_std.astype(x.dtype)
    out = xhat * gamma.astype(x.dtype)
    out += beta.astype(x.dtype)
    new_mean = ((1 - momentum) * running_mean + momentum * mean).astype(running_mean.dtype)
    new_var = ((1 - momentum) * running_var + momentum * var * (n / (n - 1))).astype(running_var.dtype)
    cache = (True, xhat, gamma, None, inv_std)
    return out.reshape(x.shape), cache, new_mean, new_var


def batchnorm_backward(dout, cache):
    """Backward pass of ``batchnorm_forward``.

    Train mode (mu and var depend on x), with g = gamma / sqrt(var + eps) and means over (N, H, W):
    dx = g * (dout - mean(dout) - x_hat * mean(dout * x_hat)); eval mode (statistics constant): dx = g * dout.
    Both: dgamma = sum(dout * x_hat), dbeta = sum(dout).

    Inputs:
    - dout: (N, H, W, C) upstream gradient (the shape of x)

    Returns a tuple of:
    - dx: the shape and dtype of dout
    - dgamma, dbeta: (C,), dtype of dout
    """
    train, x2, gamma, running_mean, inv_std = cache
    C = x2.shape[-1]
    dout2 = dout.reshape(-1, C)
    dtype = dout.dtype
    dbeta = channel_sum(dout2)
    g = (gamma * inv_std).astype(dtype)
    if not train:
        # x_hat is rebuilt here (a temporary) rather than kept by the eval forward.
        xhat = (x2 - running_mean.astype(x2.dtype)) * inv_std.astype(x2.dtype)
        dgamma = channel_sum(dout2, xhat)
        return (dout2 * g).reshape(dout.shape), dgamma.astype(dtype), dbeta.astype(dtype)

    xhat = x2
    n = xhat.shape[0]
    dgamma = channel_sum(dout2, xhat)
    # dx built in one new array: start from the x_hat term, then add and scale in place.
    dx = xhat * (-dgamma / n).astype(dtype)
    dx += dout2
    dx -= (dbeta / n).astype(dtype)
    dx *= g
    return dx.reshape(dout.shape), dgamma.astype(dtype), dbeta.astype(dtype)


# --------------------------------------------------------------------------
# Patch whitening: a frozen k x k first layer (Keller Jordan's airbench), NHWC
# --------------------------------------------------------------------------
# P = C*k*k values per patch. The layer multiplies every k x k patch by 2P filters, [W; -W],
# whose first P rows whiten the patches of the training images (their second moment becomes
# ~the identity), then applies a ReLU: the pair (W, -W) keeps both signs of every whitened
# component through the ReLU. The filters are fit once (``patch_whitening_weights``) and never
# trained. The map keeps its size: patches are taken around every pixel of the zero-padded image,
# (k-1)//2 zeros before and k//2 after on each spatial axis: 1 on every side for k=3 (like the
# 3x3 convolutions), 1 at the bottom and right for k=2 (the patch's top-left pixel is its own).
WHITEN_EPS = 5e-4         # airbench's: added to the eigenvalues, bounds the gain of the weakest directions
WHITEN_FIT_CHUNK = 256    # images per block of the patch second moment (k=3: 59 MB of float64 patches)


def image_patches(x, k, padded=True):
    """Every k x k patch of an NHWC batch, as the channels of a map.

    Inputs:
    - x: (N, H, W, C)
    - k: patch side (2 or 3; any k >= 1 works)
    - padded: True takes the patch at every pixel of the zero-padded map ((k-1)//2 zeros before,
      k//2 after on each spatial axis: the map keeps its size, as the whitening layer needs);
      False only the patches inside the map (airbench's, to fit the filters)

    Returns:
    - patches: (N, H, W, k*k*C) padded, else (N, H-k+1, W-k+1, k*k*C); each patch ordered
      (kh, kw, c), C fastest, as ``fast_layers.im2col_3x3`` orders a 3x3 one.
    """
    N, H, W, C = x.shape
    if padded:
        before = (k - 1) // 2
        xp = np.zeros((N, H + k - 1, W + k - 1, C), dtype=x.dtype)
        xp[:, before:before + H, before:before + W, :] = x
    else:
        xp, H, W = x, H - k + 1, W - k + 1
    # k*k shifted views of the padded map, one copy into the patches' channels.
    return np.concatenate([xp[:, i:i + H, j:j + W, :] for i in range(k) for j in range(k)], axis=3)


def image_patches_backward(dpatches, k, x_shape):
    """Adjoint of ``image_patches(x, k, padded=True)``: (N, H, W, k*k*C) -> dx (N, H, W, C).

    Every patch channel (i, j, c) read the padded map shifted by (i, j); its gradient is
    added back there, and the padding cut off.
    """
    N, H, W, C = x_shape
    before = (k - 1) // 2
    dxp = np.zeros((N, H + k - 1, W + k - 1, C), dtype=dpatches.dtype)
    for i in range(k):
        for j in range(k):
            tap = (i * k + j) * C
            dxp[:, i:i + H, j:j + W, :] += dpatches[..., tap:tap + C]
    return dxp[:, before:before + H, before:before + W, :]


def whiten_matrix(w):
    """(F, C, k, k) framework-order filters -> (k*k*C, F) matrix in ``image_patches`` order."""
    F, C, k, _ = w.shape
    return w.transpose(2, 3, 1, 0).reshape(k * k * C, F)


def whiten_forward(x, w):
    """The patch-whitening layer: k x k patches (zero-padded, same size) @ filters -> ReLU.

    Equals a k x k convolution (cross-correlation) without bias, padded as ``image_patches``
    says, followed by a ReLU.

    Inputs:
    - x: (N, H, W, C) NHWC images
    - w: (F, C, k, k) filters, F = 2P = 2*C*k*k for [W; -W]

    Returns a tuple of:
    - out: (N, H, W, F)
    - cache: (x, w). Not the F-channel output (2P / C = 24 or 54 times the input's size):
      the backward, needed only for input gradients (w is frozen), recomputes its ReLU mask.
    """
    N, H, W, C = x.shape
    k = w.shape[-1]
    z = image_patches(x, k).reshape(N * H * W, -1) @ whiten_matrix(w)
    np.maximum(z, 0, out=z)
    return z.reshape(N, H, W, w.shape[0]), (x, w)


def whiten_backward(dout, cache):
    """Backward pass of ``whiten_forward`` with respect to its input (its filters are frozen).

    Inputs:
    - dout: (N, H, W, F) upstream gradient

    Returns:
    - dx: (N, H, W, C)
    """
    x, w = cache
    N, H, W, C = x.shape
    k = w.shape[-1]
    wm = whiten_matrix(w)
    z = image_patches(x, k).reshape(N * H * W, -1) @ wm
    dz = dout.reshape(N * H * W, -1) * (z > 0)
    return image_patches_backward((dz @ wm.T).reshape(N, H, W, -1), k, x.shape)


def patch_whitening_weights(X, k, eps=WHITEN_EPS):
    """The filters of the patch-whitening layer for the training images X, deterministically.

    The second moment M = E[p p^T] (P x P, P = C*k*k, float64) of the k x k patches p of X, as
    airbench measures it: about zero (the layer has no bias, so this is what it multiplies;
    for normalised images, whose mean is ~0, it is close to the covariance), over the patches
    inside the images only (``image_patches(..., padded=False)``, airbench's): the zeros
    that pad the border are the layer's, not the images' statistics, and would shrink the
    variance measured for the border taps. With M = V diag(lam) V^T (``np.linalg.eigh``), the
    filters are W = V^T / sqrt(lam + eps), one row per eigenvector, largest eigenvalue first
    (airbench's order); W M W^T = diag(lam / (lam + eps)), ~the identity for lam >> eps.
    Each eigenvector's sign is fixed (its entry of largest magnitude is positive) so that the
    filters do not depend on the LAPACK build: [W; -W] with a row's sign flipped would swap
    two of conv1's input channels.

    Inputs:
    - X: (N, C, H, W) training images (NCHW, already normalised; C = 3 for CIFAR-10), H, W >= k
    - k: patch side (2 or 3)
    - eps: added to every eigenvalue (bounds the gain of directions of ~zero variance)

    Returns:
    - w: (2P, C, k, k) float64, [W; -W], row i of W reshaped from ``image_patches``'s
      (kh, kw, c) order to the framework order (c, kh, kw)
    """
    X = np.asarray(X)
    if X.ndim != 4 or min(X.shape[2:]) < k or X.shape[0] < 1:
        raise ValueError(f'patch_whitening_weights needs (N, C, H, W) images with H, W >= {k}, '
                         f'got shape {X.shape}')
    if not eps > 0:
        raise ValueError(f'patch_whitening_weights needs eps > 0, got {eps!r}')
    C = X.shape[1]
    P = C * k * k
    M, count = np.zeros((P, P)), 0
    for s in range(0, X.shape[0], WHITEN_FIT_CHUNK):
        x = X[s:s + WHITEN_FIT_CHUNK].transpose(0, 2, 3, 1).astype(np.float64)
        patches = image_patches(x, k, padded=False).reshape(-1, P)
        M += patches.T @ patches
        count += patches.shape[0]
    M /= count
    lam, V = np.linalg.eigh(M)                    # ascending
    lam, V = lam[::-1], V[:, ::-1]
    V = V * np.sign(V[np.argmax(np.abs(V), axis=0), np.arange(P)])
    W = V.T / np.sqrt(np.maximum(lam, 0) + eps)[:, None]
    filters = W.reshape(P, k, k, C).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(np.concatenate([filters, -filters]))


# --------------------------------------------------------------------------
# A configurable backbone: blocks of convolutions, with or without BatchNorm
# --------------------------------------------------------------------------
# The method's two blocks run on fast_layers.conv_stack_forward. Any other
# backbone (CNNRNN's widths, convs_per_block, batchnorm) runs here, its
# convolutions by fast_layers.conv_layer_forward in micro-batches of CONV_CHUNK
# images on the worker threads, as the method's. A BatchNorm in train mode
# normalises with the statistics of the whole batch, so it is a sync point:
# the micro-batches of the convolutions before it are joined into one map, the
# BatchNorm and the ReLU after it run on that map, and the next convolutions
# are cut into micro-batches again. Without BatchNorm (or in eval mode, where
# it is per image) nothing needs the whole batch and all convolutions of the
# backbone run in one pass per micro-batch. Sums over micro-batches go left to
# right (sum_in_order) and BatchNorm's statistics are reductions over one map,
# so the result does not depend on which thread finished first.

def backbone_layers(widths, convs_per_block, batchnorm, in_channels=IMAGE_SHAPE[0], large_tiles=False):
    """The convolutions of a backbone, in order, as fast_layers.ConvLayer.

    Block i (widths[i] channels): conv -> pool -> [BN] -> ReLU, then convs_per_block - 1
    times conv -> [BN] -> ReLU on the pooled map. (Pooling right after the first
    convolution, as the method's fused block does: with ReLU, conv -> ReLU -> pool is the
    same as conv -> pool -> ReLU; with BN, airbench's order puts BN on the 4x smaller map.)
    Every convolution is computed by Winograd where its map's sides are even, but a first one
    whose input is the image itself (in_channels = 3: too few channels for Winograd's transforms
    to pay); after the patch-whitening layer (in_channels = 2P = 24 or 54) Winograd's pays too
    (1.1x and 1.4x faster in one timing of conv1's forward and backward, and 2.25x less cache).
    With large_tiles (every backbone but the method's, which keeps its numbers bit for bit),
    every map whose side is divisible by 4 uses F(4x4, 3x3), whose products are fewer and take
    less memory (fast_layers, "Winograd's F(4x4, 3x3)"), and the maps of 8x8 and less run in
    micro-batches of 4 x CONV_CHUNK images (``ConvLayer.chunk_scale``): the matrix products of 16
    images are too small there to run at BLAS speed. ``benchmarks/conv_tiles.py`` times each
    choice; for deep (batch 512, forward + backward, 2 threads, idle, median of 5): conv3 at
    16x16 452 ms with 16 images, 474 with 32, 489 with 64 (F(2x2): 614); conv4 at 8x8 477 ms by
    F(2x2) with 16 images, 393 by F(4x4) with 16, 340 with 64; conv6 at 4x4 199 ms by F(2x2) with
    16, 163 with 64, 143 by F(4x4) with 64.
    """
    layers, k, side = [], 0, IMAGE_SIDE
    for _ in widths:
        for j in range(convs_per_block):
            k += 1
            winograd = (k > 1 or in_channels > IMAGE_SHAPE[0]) and side % 2 == 0
            tile = 4 if winograd and large_tiles and side % 4 == 0 else 2
            chunk_scale = 4 if large_tiles and side <= 8 else 1
            layers.append(ConvLayer(k=k, pool=(j == 0), bn=bool(batchnorm), winograd=winograd, tile=tile,
                                    chunk_scale=chunk_scale))
            if j == 0:
                side //= 2
    return layers


def layers_for_side(layers, side):
    """``layers`` (made for IMAGE_SIDE) on images of another side: F(4x4, 3x3) needs map sides
    divisible by 4, so a layer whose map is not falls back to F(2x2, 3x3) (the same convolution,
    other rounding). The images of the 'pixels' layout and of the small models in tests may be
    smaller than 32x32."""
    if side == IMAGE_SIDE:
        return layers
    sized = []
    for layer in layers:
        sized.append(replace(layer, tile=2) if layer.tile == 4 and side % 4 else layer)
        if layer.pool:
            side //= 2
    return sized


def backbone_stages(layers, train):
    """The layers cut at the sync points: a stage ends after a BatchNorm in train mode."""
    stages, current = [], []
    for layer in layers:
        current.append(layer)
        if layer.bn and train:
            stages.append(current)
            current = []
    return stages + ([current] if current else [])


def backbone_forward(x, p, layers, train, momentum=0.1, eps=1e-5, chunk=None, whiten=False):
    """The convolutional backbone over a batch, in micro-batches of ``chunk`` images on the workers.

    Inputs:
    - x: (N, S, S, 3) NHWC images (S = 32 for CIFAR-10; any S divisible by 2**blocks)
    - p: the model's params (convK_W, convK_b, and bnK_* for layers with bn; whiten_W with whiten)
    - layers: ``backbone_layers(...)``
    - train: BatchNorm with the batch's statistics (and new running ones), else the running ones
    - momentum, eps: BatchNorm's, as torch.nn.BatchNorm2d
    - chunk: images per micro-batch (default fast_layers.CONV_CHUNK), times the chunk_scale of
      a stage's first layer
    - whiten: the patch-whitening layer p['whiten_W'] (``whiten_forward``) first. It runs inside
      each micro-batch of the first stage, so its map (2P channels at full size, the model's
      largest) never exists for the whole batch and its work is spread over the workers.

    Returns a tuple of:
    - fmap: (N, R, R, C) the last map, R = S / 2**blocks, C = the last width
    - cache: for ``backbone_backward``
    - running: {bnK_mean: (C_K,), bnK_var: (C_K,)} the updated running statistics (train mode
      with BatchNorm; else empty), new arrays: the caller decides when they replace p's
    """
    chunk = chunk or fast_layers.CONV_CHUNK
    layers = layers_for_side(layers, x.shape[1])
    weights = {layer.k: conv_layer_weights(p[f'conv{layer.k}_W'], layer.winograd, layer.tile) for layer in layers}
    h, caches, running = x, [], {}
    for stage in backbone_stages(layers, train):
        stage_chunk = chunk * stage[0].chunk_scale

        def micro_batch(start, h=h, stage=stage, first_stage=not caches, stage_chunk=stage_chunk):
            out, layer_caches = h[start:start + stage_chunk], []
            if whiten and first_stage:
                out, _ = whiten_forward(out, p['whiten_W'])
            for layer in stage:
                k = layer.k
                out, conv_cache = conv_layer_forward(out, p[f'conv{k}_W'], weights[k], p[f'conv{k}_b'], layer,
                                                     relu=not layer.bn)
                bn_cache = None
                if layer.bn and not train:     # eval mode: per image, so inside the micro-batch
                    out, bn_cache, _, _ = batchnorm_forward(out, p[f'bn{k}_gamma'], p[f'bn{k}_beta'],
                                                            p[f'bn{k}_mean'], p[f'bn{k}_var'], False, momentum, eps)
                    np.maximum(out, 0, out=out)
                layer_caches.append((conv_cache, bn_cache, out if bn_cache is not None else None))
            return out, layer_caches
        results = map_on_threads(micro_batch, range(0, h.shape[0], stage_chunk))
        h = np.concatenate([out for out, _ in results])
        synced = None
        last = stage[-1]
        if last.bn and train:                # the sync point: the statistics of the whole batch
            k = last.k
            h, bn_cache, running[f'bn{k}_mean'], running[f'bn{k}_var'] = batchnorm_forward(
                h, p[f'bn{k}_gamma'], p[f'bn{k}_beta'], p[f'bn{k}_mean'], p[f'bn{k}_var'], True, momentum, eps)
            np.maximum(h, 0, out=h)           # BN's output is new; its cache holds x-hat, not this
            synced = (bn_cache, h)
        caches.append((stage, stage_chunk, [c for _, c in results], synced))
    # The whitening layer's backward needs only the images and its filters (``whiten_forward``).
    return h, (caches, layers[0].k, (x, p['whiten_W']) if whiten else None), running


def backbone_backward(dmap, cache, input_grad=False):
    """Backward through ``backbone_forward``, stage by stage from the last.

    At a sync point the ReLU's and BatchNorm's gradients are taken over the whole map
    (dgamma, dbeta and the mean terms of dx need every image) before dx is cut into the
    micro-batches of the convolutions before it.

    Inputs:
    - dmap: (N, R, R, C) gradient of the last map
    - cache: from ``backbone_forward``
    - input_grad: also compute the gradient with respect to the input

    Returns a tuple of:
    - grads: {convK_W, convK_b, bnK_gamma, bnK_beta} summed over micro-batches (never whiten_W:
      the whitening layer is frozen, and only an input gradient passes through it)
    - dx: (N, S, S, 3), or None without input_grad
    """
    caches, first, whiten_cache = cache
    grads, d = {}, dmap
    for stage, chunk, chunk_caches, synced in reversed(caches):
        if synced is not None:
            bn_cache, relu_out = synced
            k = stage[-1].k
            d, grads[f'bn{k}_gamma'], grads[f'bn{k}_beta'] = batchnorm_backward(d * (relu_out > 0), bn_cache)

        def micro_batch(i, d=d, stage=stage):
            dout, g = d[i * chunk:(i + 1) * chunk], {}
            for layer, (conv_cache, bn_cache, relu_out) in reversed(list(zip(stage, chunk_caches[i]))):
                k = layer.k
                if bn_cache is not None:      # eval-mode BatchNorm inside the micro-batch
                    dout, g[f'bn{k}_gamma'], g[f'bn{k}_beta'] = batchnorm_backward(dout * (relu_out > 0), bn_cache)
                dout, g[f'conv{k}_U' if layer.winograd else f'conv{k}_W'], g[f'conv{k}_b'] = conv_layer_backward(
                    dout, conv_cache, need_dx=input_grad or k != first)
            return dout, g
        results = map_on_threads(micro_batch, range(len(chunk_caches)))
        grads.update({name: sum_in_order([g[name] for _, g in results]) for name in results[0][1]})
        d = np.concatenate([dx for dx, _ in results]) if results[0][0] is not None else None
    tiles = {f'conv{layer.k}_U': layer.tile for stage, _, _, _ in caches for layer in stage}
    for name in [n for n in grads if n.endswith('_U')]:
        # The kernel transform is linear: transform the summed dU back once.
        grads[name[:-1] + 'W'] = winograd_kernel_transform_backward(grads.pop(name), tiles[name])
    if d is not None and whiten_cache is not None:
        # Whole-batch: only input gradients (gradient checks, saliency maps) come this far.
        d = whiten_backward(d, whiten_cache)
    return grads, d


# --------------------------------------------------------------------------
# Feature map <-> sequence
# --------------------------------------------------------------------------

def sequence_length_and_size(layout, rows=8, cols=8, channels=64):
    """(T, D) of the sequence read from a (rows, cols, channels) map.

    'pixels': (rows*cols, channels); 'rows': (rows, cols*channels);
    'flat': (1, rows*cols*channels), the whole map as a single step; 'rowmax': (rows, channels).
    """
    if layout == 'pixels':
        return rows * cols, channels
    if layout == 'rows':
        return rows, cols * channels
    if layout == 'flat':
        return 1, rows * cols * channels
    if layout == 'rowmax':
        return rows, channels
    raise ValueError(f'unknown sequence layout {layout!r}; use one of {SEQ_LAYOUTS}')


def map_to_sequence(F, layout):
    """Read a pooled feature map as a sequence.

    Inputs:
    - F: (N, R, Cc, K) NHWC map (R rows, Cc columns, K channels)
    - layout: 'pixels' -> (N, R*Cc, K), step t = row*Cc + col, features = channels;
              'rows'   -> (N, R, Cc*K), step t = row, features ordered col*K + channel;
              'flat'   -> (N, 1, R*Cc*K), one step, features ordered
                          row*Cc*K + col*K + channel;
              'rowmax' -> (N, R, K), step t = row, feature k = the largest of channel k over
                          the row's columns.

    Returns:
    - x: (N, T, D). With NHWC every layout but 'rowmax' is a reshape of the same memory.
    """
    N, R, Cc, K = F.shape
    T, D = sequence_length_and_size(layout, R, Cc, K)
    if layout == 'rowmax':
        return F.max(axis=2)
    return F.reshape(N, T, D)


def sequence_to_map(dx, layout, F):
    """Backward of ``map_to_sequence``: dx (N, T, D) -> dF (N, R, Cc, K), F the map it read.

    The reshapes put dx back where it came from; 'rowmax' passes each gradient to the column
    that held the row's maximum (the first, on a tie: after a ReLU the only ties are at 0,
    whose gradient the ReLU stops anyway) and zero to the others.
    """
    sequence_length_and_size(layout)  # validates the layout name
    if layout == 'rowmax':
        dF = np.zeros_like(F, dtype=dx.dtype)
        winner = F.argmax(axis=2)[:, :, None, :]                       # (N, R, 1, K)
        np.put_along_axis(dF, winner, dx[:, :, None, :], axis=2)
        return dF
    return dx.reshape(F.shape)


# --------------------------------------------------------------------------
# Vanilla tanh RNN with backpropagation through time
# --------------------------------------------------------------------------

def flush_tiny(a):
    """Set the entries of ``a`` that are within 2**30 of underflow to zero, in place.

    Saturated units make BPTT gradients underflow into subnormal floats, which
    x86 CPUs process ~100x slower (README, "Benchmarks"). The 2**30 margin
    leaves room for the factors the later layers multiply in; values this small
    never move a weight.
    """
    a[np.abs(a) < np.finfo(a.dtype).tiny * 2.0 ** 30] = 0
    return a


def rnn_forward(x, W_xh, W_hh, b_h):
    """Run a vanilla RNN over a whole sequence, from h_0 = 0.

    h_t = tanh(x_t @ W_xh + h_{t-1} @ W_hh + b_h)

    Inputs:
    - x: (N, T, D) input sequence
    - W_xh: (D, H), W_hh: (H, H), b_h: (H,)

    Returns a tuple of:
    - h_T: (N, H) last hidden state
    - cache: (x_tm, hs, W_xh, W_hh); hs is (T+1, N, H) time-major with hs[0] = h_0
    """
    N, T, D = x.shape
    H = W_hh.shape[0]
    # Time-major copy so each step reads one contiguous (N, .) slab.
    x_tm = np.ascontiguousarray(x.transpose(1, 0, 2))
    # The input projection of every step is one large matrix product; only the
    # recurrent part must wait for the previous step.
    hs = np.empty((T + 1, N, H), dtype=x.dtype)
    hs[0] = 0
    hs[1:] = (x_tm.reshape(T * N, D) @ W_xh).reshape(T, N, H)
    hs[1:] += b_h
    for t in range(T):
        a = hs[t + 1]
        a += hs[t] @ W_hh
        np.tanh(a, out=a)
    return hs[T].copy(), (x_tm, hs, W_xh, W_hh)


def step_gradients(dh, T):
    """Split the upstream gradient of a cell's backward into (dh_T (N, H), per_step).

    dh is (N, H), the gradient at the last hidden state only (the method's head reads h_T):
    per_step is None. Or dh is (T, N, H) time-major, the gradient at every hidden state h_1..h_T
    (a readout of all of them, ``readout_forward``): dh_T is its last step, and the backward loop
    adds per_step[t - 1] to the gradient it carries into h_{t} (1-based t < T). Either way dh_T
    is the caller's array (or a view of it), read but never written: the gated cells copy it
    before their in-place updates.
    """
    if dh.ndim == 3:
        if dh.shape[0] != T:
            raise ValueError(f'per-step gradient has {dh.shape[0]} steps, the sequence {T}')
        return dh[T - 1], dh
    return dh, None


def rnn_backward(dh, cache):
    """Backpropagation through time for ``rnn_forward``.

    Inputs:
    - dh: (N, H) gradient of the loss with respect to the last hidden state h_T, or
      (T, N, H) time-major with respect to every hidden state h_1..h_T (``step_gradients``)

    Returns a tuple of:
    - dx: (N, T, D), dW_xh: (D, H), dW_hh: (H, H), db_h: (H,)
    """
    x_tm, hs, W_xh, W_hh = cache
    T, N, D = x_tm.shape
    H = W_hh.shape[0]
    dh, per_step = step_gradients(dh, T)
    # da[t] is the gradient at the pre-activation of step t+1; the loop only
    # carries dh backwards, the weight gradients are then single products.
    da = np.empty((T, N, H), dtype=dh.dtype)
    W_hh_T = W_hh.T
    for t in range(T - 1, -1, -1):
        h = hs[t + 1]
        np.multiply(dh, 1 - h * h, out=da[t])   # tanh' = 1 - tanh^2
        flush_tiny(da[t])
        dh = da[t] @ W_hh_T
        if per_step is not None and t:
            dh += per_step[t - 1]               # what the readout sends to h_t directly
    da2 = da.reshape(T * N, H)
    dW_hh = hs[:-1].reshape(T * N, H).T @ da2
    dW_xh = x_tm.reshape(T * N, D).T @ da2
    db_h = da2.sum(axis=0)
    dx = (da2 @ W_xh.T).reshape(T, N, D).transpose(1, 0, 2)
    return dx, dW_xh, dW_hh, db_h


# --------------------------------------------------------------------------
# Gated recurrent cells: GRU and LSTM (PyTorch's nn.GRU / nn.LSTM forms)
# --------------------------------------------------------------------------

def sigmoid(x, out=None):
    """Logistic function 1 / (1 + exp(-x)), elementwise; ``out`` may be ``x``.

    Computed as (1 + tanh(x / 2)) / 2: the same function, but tanh never
    overflows (exp(-x) does for x < -89 in float32, with a warning), and the
    result is either exactly 0 or 1 or at least eps / 4 (3e-8 in float32)
    away from both, so neither it nor sigma' = sigma (1 - sigma) is ever a
    subnormal number (see flush_tiny).
    """
    out = np.multiply(x, 0.5, out=out)
    np.tanh(out, out=out)
    out += 1
    out *= 0.5
    return out


def gru_forward(x, W_xh, W_hh, b_h, b_hn):
    """Run a GRU over a whole sequence, from h_0 = 0.

    Gate blocks are the column blocks r, z, n (reset, update, new) of W_xh,
    W_hh and b_h, each H wide:

        a   = x_t @ W_xh + b_h          g = h_{t-1} @ W_hh
        r   = sigma(a_r + g_r)          z = sigma(a_z + g_z)
        n   = tanh(a_n + r * (g_n + b_hn))
        h_t = (1 - z) * n + z * h_{t-1}

    Inputs:
    - x: (N, T, D) input sequence
    - W_xh: (D, 3H), W_hh: (H, 3H), b_h: (3H,), b_hn: (H,)

    Returns a tuple of:
    - h_T: (N, H) last hidden state
    - cache: (x_tm, hs, gates, hn, W_xh, W_hh), time-major: hs (T+1, N, H)
      with hs[0] = h_0; gates (T, N, 3H) holds r, z, n after their
      nonlinearities; hn (T, N, H) holds g_n + b_hn
    """
    N, T, D = x.shape
    H = W_hh.shape[0]
    x_tm = np.ascontiguousarray(x.transpose(1, 0, 2))
    # The input projection of every step is one large matrix product; the
    # buffer then holds each step's gates in place of their pre-activations.
    gates = (x_tm.reshape(T * N, D) @ W_xh).reshape(T, N, 3 * H)
    gates += b_h
    hs = np.empty((T + 1, N, H), dtype=x.dtype)
    hs[0] = 0
    hn = np.empty((T, N, H), dtype=x.dtype)
    g = np.empty((N, 3 * H), dtype=x.dtype)
    for t in range(T):
        h_prev, h = hs[t], hs[t + 1]
        rz, n = gates[t, :, :2 * H], gates[t, :, 2 * H:]
        np.matmul(h_prev, W_hh, out=g)          # one recurrent product for all gates
        rz += g[:, :2 * H]
        sigmoid(rz, out=rz)
        np.add(g[:, 2 * H:], b_hn, out=hn[t])
        # n = tanh(a_n + r * hn); h reuses its slab for the temporary r * hn
        np.multiply(rz[:, :H], hn[t], out=h)
        n += h
        np.tanh(n, out=n)
        # h_t = n + z * (h_{t-1} - n), one multiply fewer than the textbook form
        np.subtract(h_prev, n, out=h)
        h *= rz[:, H:]
        h += n
    return hs[T].copy(), (x_tm, hs, gates, hn, W_xh, W_hh)


def gru_backward(dh, cache):
    """Backpropagation through time for ``gru_forward``.

    Inputs:
    - dh: (N, H) gradient of the loss with respect to the last hidden state h_T, or
      (T, N, H) time-major with respect to every hidden state h_1..h_T (``step_gradients``)

    Returns a tuple of:
    - dx: (N, T, D), dW_xh: (D, 3H), dW_hh: (H, 3H), db_h: (3H,), db_hn: (H,)
    """
    x_tm, hs, gates, hn, W_xh, W_hh = cache
    T, N, D = x_tm.shape
    H = W_hh.shape[0]
    # Per step the gradients at the pre-activations, laid out as the blocks
    # [da_n | da_r | da_z | dg_n] with dg_n = r * da_n (the n block of
    # g = h_{t-1} @ W_hh). Then the recurrent-side gradient [da_r da_z dg_n]
    # is the contiguous slab d[:, H:] in W_hh's column order, so the step's
    # dh needs one product, and the input side [da_n da_r da_z] is the
    # contiguous slab d[:, :3H], W_xh's blocks rotated by one (undone after
    # the loop).
    dh_T, per_step = step_gradients(dh, T)
    d = np.empty((T, N, 4 * H), dtype=dh_T.dtype)
    dn = np.empty((N, H), dtype=dh_T.dtype)
    dh_z = np.empty((N, H), dtype=dh_T.dtype)
    dh = dh_T.copy()                    # overwritten in place every step
    W_hh_T = W_hh.T
    for t in range(T - 1, -1, -1):
        r, z, n = gates[t, :, :H], gates[t, :, H:2 * H], gates[t, :, 2 * H:]
        da_n, da_r, da_z, dg_n = (d[t, :, k * H:(k + 1) * H] for k in range(4))
        # h_t = (1 - z) * n + z * h_{t-1}
        np.multiply(dh, z, out=dh_z)                     # the part of dh_{t-1} that skips the gates
        np.subtract(dh, dh_z, out=dn)                    # dn = (1 - z) dh
        # da_z = (h_{t-1} - n) dh * sigma'(z), sigma' = z (1 - z): = (h_{t-1} - n) z dn
        np.subtract(hs[t], n, out=da_z)
        da_z *= z
        da_z *= dn
        np.multiply(n, n, out=da_n)
        np.subtract(1, da_n, out=da_n)                   # tanh' = 1 - n^2
        da_n *= dn
        # n = tanh(a_n + r * hn), hn = g_n + b_hn
        np.multiply(da_n, r, out=dg_n)
        # da_r = da_n hn * sigma'(r) = dg_n hn (1 - r)
        np.multiply(dg_n, hn[t], out=da_r)
        np.subtract(1, r, out=dn)                        # dn's buffer is free again
        da_r *= dn
        flush_tiny(d[t])
        # dh_{t-1}: through the gates (one product) and straight through z
        np.matmul(d[t, :, H:], W_hh_T, out=dh)
        dh += dh_z
        # dh_z bypasses the flushed slab and shrinks by z every step
        flush_tiny(dh)
        if per_step is not None and t:
            dh += per_step[t - 1]                        # what the readout sends to h_t directly
    d2 = d.reshape(T * N, 4 * H)
    dW_hh = hs[:-1].reshape(T * N, H).T @ d2[:, H:]
    da = d2[:, :3 * H]                                   # blocks n, r, z
    dW_xh = np.roll(x_tm.reshape(T * N, D).T @ da, -H, axis=1)   # -> r, z, n
    dx = (da @ np.roll(W_xh, H, axis=1).T).reshape(T, N, D).transpose(1, 0, 2)
    db = d2.sum(axis=0)                                  # blocks n, r, z, g_n
    db_h = np.roll(db[:3 * H], -H)
    db_hn = db[3 * H:]
    return dx, dW_xh, dW_hh, db_h, db_hn


def lstm_forward(x, W_xh, W_hh, b_h):
    """Run an LSTM over a whole sequence, from h_0 = c_0 = 0.

    Gate blocks are the column blocks i, f, g, o (input, forget, cell, output)
    of W_xh, W_hh and b_h, each H wide:

        a   = x_t @ W_xh + h_{t-1} @ W_hh + b_h
        i, f, o = sigma(a_i), sigma(a_f), sigma(a_o)      g = tanh(a_g)
        c_t = f * c_{t-1} + i * g
        h_t = o * tanh(c_t)

    Inputs:
    - x: (N, T, D) input sequence
    - W_xh: (D, 4H), W_hh: (H, 4H), b_h: (4H,)

    Returns a tuple of:
    - h_T: (N, H) last hidden state
    - cache: (x_tm, hs, cs, tanh_cs, gates, W_xh, W_hh), time-major: hs and cs
      (T+1, N, H) with hs[0] = cs[0] = 0; tanh_cs (T, N, H) holds tanh(c_t);
      gates (T, N, 4H) holds i, f, g, o after their nonlinearities
    """
    N, T, D = x.shape
    H = W_hh.shape[0]
    # sigma(a) = (1 + tanh(a / 2)) / 2, so with the i, f, o columns of the
    # weights and bias halved (exactly: a power of two), one tanh call per
    # step covers all four gates; i, f, o are then mapped from (-1, 1) to
    # (0, 1). Bit for bit the same gates as sigmoid(); measured ~5% faster
    # per forward pass than three activation calls per step.
    half = np.full(4 * H, 0.5, dtype=x.dtype)
    half[2 * H:3 * H] = 1
    W_hh_half = W_hh * half
    x_tm = np.ascontiguousarray(x.transpose(1, 0, 2))
    gates = (x_tm.reshape(T * N, D) @ (W_xh * half)).reshape(T, N, 4 * H)
    gates += b_h * half
    hs = np.empty((T + 1, N, H), dtype=x.dtype)
    cs = np.empty((T + 1, N, H), dtype=x.dtype)
    hs[0] = 0
    cs[0] = 0
    tanh_cs = np.empty((T, N, H), dtype=x.dtype)
    hg = np.empty((N, 4 * H), dtype=x.dtype)
    for t in range(T):
        a = gates[t]
        np.matmul(hs[t], W_hh_half, out=hg)     # one recurrent product for all gates
        a += hg
        np.tanh(a, out=a)
        for ifo in (a[:, :2 * H], a[:, 3 * H:]):
            ifo += 1
            ifo *= 0.5
        i, f, g, o = (a[:, k * H:(k + 1) * H] for k in range(4))
        c, h = cs[t + 1], hs[t + 1]
        np.multiply(f, cs[t], out=c)
        np.multiply(i, g, out=h)                # h's slab as scratch for i * g
        c += h
        np.tanh(c, out=tanh_cs[t])
        np.multiply(o, tanh_cs[t], out=h)
    return hs[T].copy(), (x_tm, hs, cs, tanh_cs, gates, W_xh, W_hh)


def lstm_backward(dh, cache):
    """Backpropagation through time for ``lstm_forward``.

    Inputs:
    - dh: (N, H) gradient of the loss with respect to the last hidden state h_T, or
      (T, N, H) time-major with respect to every hidden state h_1..h_T (``step_gradients``)

    Returns a tuple of:
    - dx: (N, T, D), dW_xh: (D, 4H), dW_hh: (H, 4H), db_h: (4H,)
    """
    x_tm, hs, cs, tanh_cs, gates, W_xh, W_hh = cache
    T, N, D = x_tm.shape
    H = W_hh.shape[0]
    # da[t] is the gradient at the pre-activations a of step t+1 (blocks
    # i, f, g, o); the loop carries only dh and dc backwards.
    dh_T, per_step = step_gradients(dh, T)
    da = np.empty((T, N, 4 * H), dtype=dh_T.dtype)
    dc = np.zeros((N, H), dtype=dh_T.dtype)
    tmp = np.empty((N, H), dtype=dh_T.dtype)
    local = np.empty((N, 4 * H), dtype=dh_T.dtype)
    dh = dh_T.copy()                    # overwritten in place every step
    W_hh_T = W_hh.T
    for t in range(T - 1, -1, -1):
        s = gates[t]
        i, f, g, o = (s[:, k * H:(k + 1) * H] for k in range(4))
        tc = tanh_cs[t]
        d = da[t]
        da_i, da_f, da_g, da_o = (d[:, k * H:(k + 1) * H] for k in range(4))
        # h_t = o * tanh(c_t): to o, and to c_t on top of the dc from step t+1
        np.multiply(dh, tc, out=da_o)
        np.multiply(tc, tc, out=tmp)
        np.subtract(1, tmp, out=tmp)
        tmp *= o
        tmp *= dh
        dc += tmp
        # dc * f decays every step without passing through the flushed slab
        flush_tiny(dc)
        # c_t = f * c_{t-1} + i * g
        np.multiply(dc, g, out=da_i)
        np.multiply(dc, cs[t], out=da_f)
        np.multiply(dc, i, out=da_g)
        # Local derivatives of all four blocks at once: s (1 - s) is sigma'
        # for i, f, o; the g block is then overwritten with tanh' = 1 - g^2.
        np.subtract(1, s, out=local)
        local *= s
        lg = local[:, 2 * H:3 * H]
        np.multiply(g, g, out=lg)
        np.subtract(1, lg, out=lg)
        d *= local
        flush_tiny(d)
        dc *= f
        np.matmul(d, W_hh_T, out=dh)
        if per_step is not None and t:
            dh += per_step[t - 1]       # what the readout sends to h_t directly
    da2 = da.reshape(T * N, 4 * H)
    dW_hh = hs[:-1].reshape(T * N, H).T @ da2
    dW_xh = x_tm.reshape(T * N, D).T @ da2
    db_h = da2.sum(axis=0)
    dx = (da2 @ W_xh.T).reshape(T, N, D).transpose(1, 0, 2)
    return dx, dW_xh, dW_hh, db_h


# --------------------------------------------------------------------------
# The cell table: everything the model knows about a recurrent cell
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class RecurrentCell:
    """A recurrent cell as the model sees it. Each cell is one entry of CELL_TABLE.

    With G = ``gates`` and H hidden units the cell's parameters are W_xh (D, G*H),
    W_hh (H, G*H) and b_h (G*H,), the gates as column blocks in the cell's own
    order, then one (k*H,) array for each entry name: k of ``extra``.

    - forward: (x (N, T, D), *params in ``names`` order) -> (h_T (N, H), cache); every cell's
      cache holds the hidden states hs (T+1, N, H), time-major with hs[0] = h_0, at index 1
      (``hidden_states``)
    - backward: (dh, cache) -> (dx (N, T, D), *their gradients in ``names`` order); dh is
      (N, H) at h_T, or (T, N, H) at every h_t (``step_gradients``)
    - gates: G
    - extra: {name: k} parameters after b_h; zero at initialisation, not decayed
    - gate_bias: the initial value of each gate block of b_h (None: all zero)

    The initialisation is otherwise the same for every cell (``CNNRNN._init_params``):
    Xavier for each gate block of W_xh, orthogonal (or Xavier) for each of W_hh.
    """
    forward: Callable
    backward: Callable
    gates: int
    extra: dict = field(default_factory=dict)
    gate_bias: tuple | None = None

    @property
    def names(self):
        """The cell's parameter names, in the order ``forward`` takes them and ``backward`` returns gradients."""
        return ('W_xh', 'W_hh', 'b_h') + tuple(self.extra)

    def shapes(self, D, H):
        """{name: shape} of the cell's parameters for D input features and H hidden units."""
        G = self.gates
        return {'W_xh': (D, G * H), 'W_hh': (H, G * H), 'b_h': (G * H,),
                **{name: (k * H,) for name, k in self.extra.items()}}


CELL_TABLE = {
    'rnn': RecurrentCell(rnn_forward, rnn_backward, gates=1),
    # b_hn: the recurrent bias of the candidate n, inside r * (...), so it cannot fold into b_h.
    'gru': RecurrentCell(gru_forward, gru_backward, gates=3, extra={'b_hn': 1}),
    # Forget-gate bias 1 (gate order i, f, g, o), so that c_t is kept at first.
    'lstm': RecurrentCell(lstm_forward, lstm_backward, gates=4, gate_bias=(0, 1, 0, 0)),
}
CELLS = tuple(CELL_TABLE)
CELL_GATES = {name: cell.gates for name, cell in CELL_TABLE.items()}


def hidden_states(cache):
    """The hidden states hs (T+1, N, H) of a cell's forward cache, time-major, hs[0] = h_0."""
    return cache[1]


def cell_forward(x, p, cell):
    """Run the recurrent cell named ``cell`` over x (N, T, D) with the model's params p -> (h_T (N, H), cache)."""
    spec = CELL_TABLE[cell]
    return spec.forward(x, *(p[name] for name in spec.names))


def cell_backward(dh, cache, cell):
    """Backward of ``cell_forward`` -> (dx (N, T, D), {name: gradient} of the cell's params).
    dh: (N, H) at h_T, or (T, N, H) at every hidden state (``step_gradients``)."""
    spec = CELL_TABLE[cell]
    dx, *dparams = spec.backward(dh, cache)
    return dx, dict(zip(spec.names, dparams))


# --------------------------------------------------------------------------
# Readout: what the head reads of the hidden states
# --------------------------------------------------------------------------

# 'last' is the method's: the head reads h_T alone. 'mean' and 'max' read every hidden state
# h_1..h_T, averaged or max-pooled over time, unit by unit, so each step of the sequence (each
# row of the map) reaches the head directly as well as through the recurrence. With T = 1
# ('flat') all three are the same.
READOUTS = ('last', 'mean', 'max')


def readout_forward(hs, readout):
    """What the head reads of a cell's hidden states.

    Inputs:
    - hs: (T+1, N, H) hidden states, time-major, hs[0] = h_0 (``hidden_states``)
    - readout: 'last' -> h_T; 'mean' -> (h_1 + ... + h_T) / T; 'max' -> the largest of h_1..h_T,
      unit by unit

    Returns a tuple of:
    - r: (N, H)
    - cache: for ``readout_backward``
    """
    T = hs.shape[0] - 1
    if readout == 'last':
        return hs[T].copy(), (readout, T, None)
    if readout == 'mean':
        return hs[1:].mean(axis=0), (readout, T, None)
    if readout == 'max':
        winner = hs[1:].argmax(axis=0)                                   # (N, H) step of the maximum
        return np.take_along_axis(hs[1:], winner[None], axis=0)[0], (readout, T, winner)
    raise ValueError(f'unknown readout {readout!r}; use one of {READOUTS}')


def readout_backward(dr, cache):
    """Backward of ``readout_forward``: dr (N, H) -> the cell's dh, (N, H) at h_T for 'last',
    else (T, N, H) at every hidden state (the form ``step_gradients`` reads)."""
    readout, T, winner = cache
    if readout == 'last':
        return dr
    if readout == 'mean':
        return np.broadcast_to(dr / dr.dtype.type(T), (T, *dr.shape))
    dh = np.zeros((T, *dr.shape), dtype=dr.dtype)
    np.put_along_axis(dh, winner[None], dr[None], axis=0)                # to the step of the maximum
    return dh


def recurrent_forward(seq, p, cell='rnn', readout='last'):
    """``cell_forward`` and ``readout_forward`` on one slice of the batch per worker thread.

    The recurrence is sequential in time but independent across images, so
    splitting the batch lets its 64 (or 8) small steps run on every core.
    seq: (N, T, D) -> r (N, H) (h_T with the method's readout 'last'), caches.
    """
    def run(s):
        h_T, cache = cell_forward(seq[s], p, cell)
        r, r_cache = readout_forward(hidden_states(cache), readout)
        return r, (cache, r_cache)

    slices = batch_slices(seq.shape[0], thread_count())
    results = map_on_threads(run, slices)
    return np.concatenate([r for r, _ in results]), (slices, [c for _, c in results])


def recurrent_backward(dr, caches, cell='rnn'):
    """``readout_backward`` and BPTT per slice on the worker threads.

    dr: (N, H), the gradient at what the head read. Returns grads (the cell's params, summed over
    slices) and dx (N, T, D).
    """
    slices, slice_caches = caches

    def run(i):
        cache, r_cache = slice_caches[i]
        return cell_backward(readout_backward(dr[slices[i]], r_cache), cache, cell)

    results = map_on_threads(run, range(len(slices)))
    grads = {name: sum_in_order([g[name] for _, g in results]) for name in results[0][1]}
    return grads, np.concatenate([dx for dx, _ in results])


# --------------------------------------------------------------------------
# Affine layer and softmax cross-entropy
# --------------------------------------------------------------------------

def affine_forward(x, w, b):
    """x: (N, D), w: (D, M), b: (M,) -> out (N, M), cache."""
    return x @ w + b, (x, w)


def affine_backward(dout, cache):
    """dout: (N, M) -> dx (N, D), dw (D, M), db (M,)."""
    x, w = cache
    return dout @ w.T, x.T @ dout, dout.sum(axis=0)


def softmax(logits):
    """Row-wise softmax, stable for any logits. logits: (N, C) -> probs (N, C)."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def softmax_loss(logits, y, smoothing=0.0):
    """Mean softmax cross-entropy and its gradient, optionally with label smoothing.

    With smoothing s the target of an image is no longer one-hot: the true
    class gets 1 - s + s/C and every class s/C. The model is then never pushed
    to infinite logits, which tends to help generalisation and changes
    calibration (it makes a model less confident).

    Inputs:
    - logits: (N, C)
    - y: (N,) integer labels in [0, C)
    - smoothing: s in [0, 1); 0 is the plain cross-entropy

    Returns a tuple of:
    - loss: scalar, the mean over images of -sum_c Q[c] log P[c]
    - dlogits: (N, C) = (P - Q) / N, Q the (smoothed) targets
    """
    N = logits.shape[0]
    # log-softmax via the max-shift: exp never overflows and log never sees 0,
    # because the largest shifted logit is exactly 0 and its exp is 1.
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_sum = np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    log_probs = shifted - log_sum
    loss = -log_probs[np.arange(N), y].mean()
    dlogits = np.exp(log_probs)
    dlogits[np.arange(N), y] -= 1
    if smoothing:
        # Q = (1 - s) * onehot + s / C: the loss mixes in the mean of -log P over classes.
        C = logits.shape[1]
        loss = (1 - smoothing) * loss - smoothing * log_probs.mean(axis=1).mean()
        dlogits[np.arange(N), y] += smoothing
        dlogits -= smoothing / C
    dlogits /= N
    return float(loss), dlogits


# --------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------

def backbone_problem(widths, convs_per_block, batchnorm, bn_momentum, bn_eps):
    """Why these backbone settings cannot build a model, in a few words; None if they can."""
    def integer(v):
        return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))
    if (not isinstance(widths, (list, tuple)) or not 1 <= len(widths) <= MAX_BLOCKS
            or not all(integer(w) and w > 0 for w in widths)):
        return (f'widths = {widths!r} is not a list of 1 to {MAX_BLOCKS} positive integers (each block '
                f'halves the {IMAGE_SIDE}x{IMAGE_SIDE} map, so more would leave no pixel)')
    if not integer(convs_per_block) or convs_per_block < 1:
        return f'convs_per_block = {convs_per_block!r} is not an integer >= 1'
    if not isinstance(batchnorm, (bool, np.bool_)):
        return f'batchnorm = {batchnorm!r} is not true or false'
    number = (int, float, np.integer, np.floating)
    if not isinstance(bn_momentum, number) or isinstance(bn_momentum, bool) or not 0 < bn_momentum <= 1:
        return f'bn_momentum = {bn_momentum!r} is not a number in (0, 1]'
    if not isinstance(bn_eps, number) or isinstance(bn_eps, bool) or not 0 < bn_eps < float('inf'):
        return f'bn_eps = {bn_eps!r} is not a finite number > 0'
    return None


def conv_init_problem(whiten, identity_init):
    """Why these settings of how the convolutions start (``METHOD_CONV_INIT``) cannot build a
    model, in a few words; None if they can."""
    # bool is an int to Python (False == 0): refused, as the patch size is a number.
    if (not isinstance(whiten, (int, np.integer)) or isinstance(whiten, (bool, np.bool_))
            or whiten not in WHITEN_SIZES):
        return (f'whiten = {whiten!r} is not one of {list(WHITEN_SIZES)} (0: no whitening layer, '
                f'else its patch size)')
    if not isinstance(identity_init, (bool, np.bool_)):
        return f'identity_init = {identity_init!r} is not true or false'
    return None


def dirac_init(w):
    """Make the convolution w (O, I, kh, kw), I <= O, the identity on its inputs, in place.

    Its first I filters pass input channel i straight to output channel i (a 1 at the centre
    tap, zeros elsewhere), as torch.nn.init.dirac_ on w[:I] (airbench's initialisation); the
    other O - I filters are left as they are. At the start of training a deep stack then
    carries its input forward instead of scrambling it.
    """
    O, I, kh, kw = w.shape
    if I > O:
        raise ValueError(f'dirac_init needs no more inputs than outputs, got weights of shape {w.shape}')
    w[:I] = 0
    w[np.arange(I), np.arange(I), kh // 2, kw // 2] = 1
    return w


class CNNRNN:
    """Conv blocks, a recurrent cell over the last feature map, a softmax head.

    The backbone: len(widths) blocks (``backbone_layers``); block i has convs_per_block 3x3
    convolutions of widths[i] channels, a 2x2 max-pool after the first, each convolution
    followed by [BatchNorm and] ReLU. The default, two blocks of one 64-channel convolution
    without BatchNorm, is the method's and runs on its fused kernels (conv_stack_forward).
    The last map is (R, R, C), R = 32 / 2**len(widths), C = widths[-1].

    Parameters (``self.params``; ``param_shapes()`` gives them in this order, the order of
    files, while a new model's dict holds them in the order they are drawn at initialisation,
    which the gradients and the optimizer follow); convolutions numbered K = 1, 2, ... through
    all blocks, O_K their widths, I_K their inputs (3 for the first); H = hidden; D = C
    ('pixels', 'rowmax'), R*C ('rows') or R*R*C ('flat'); G = the cell's gate blocks (``CELL_TABLE``:
    1 'rnn', 3 'gru', 4 'lstm'):
      convK_W (O_K, I_K, 3, 3), convK_b (O_K,), and with batchnorm bnK_gamma, bnK_beta,
      bnK_mean, bnK_var (O_K,), for each K in turn;
      W_xh (D, G*H), W_hh (H, G*H), b_h (G*H,), W_ho (H, 10), b_o (10,),
      then the cell's extra parameters (b_hn (H,) for 'gru').
    readout: what W_ho reads, 'last' (the method's h_T), 'mean' or 'max' (of every h_t over time,
    ``readout_forward``); the parameters are the same.
    The method's: conv1_W (64, 3, 3, 3), conv1_b (64,), conv2_W (64, 64, 3, 3), conv2_b (64,),
    then the recurrent ones with D = 64 ('pixels', 'rowmax'), 512 ('rows') or 4096 ('flat').

    Patch whitening (whiten = k, 2 or 3; 0 is the method's none), airbench's frozen first layer:
    P = 3*k*k, a parameter whiten_W (2P, 3, k, k) comes first of all (before conv1_W), and conv1
    reads its 2P channels: conv1_W (O_1, 2P, 3, 3). The images' k x k patches (zero-padded: the
    map stays 32x32, ``image_patches``) are multiplied by whiten_W, then a ReLU
    (``whiten_forward``), then conv1 and the rest. A new model holds zeros in whiten_W (its
    values are not random draws, so every other parameter is drawn as without it): call
    ``fit_whitening`` with the training images before training. A model with whitening runs
    the general backbone (``backbone_forward``), not the method's fused kernels.
    identity_init: every convolution with I_K <= O_K starts as the identity on its inputs
    (``dirac_init``, after the usual He draws, which the other filters keep).

    Frozen parameters (``is_frozen``) are in ``params`` (files, checkpoints and weight averages
    carry them) but never in the gradients and never decayed: BatchNorm's running statistics
    bnK_mean and bnK_var, and whiten_W. ``loss`` (train mode) normalises with the batch's
    statistics and then writes the updated running statistics into ``params``; ``forward``,
    ``features`` and ``predict_proba`` (eval mode) use them. whiten_W changes only by
    ``fit_whitening``.
    ``trained_names()`` lists the parameters an optimizer updates. A convolution followed by
    BatchNorm keeps its bias convK_b (the public names are the same for every convolution);
    added before the BatchNorm, which subtracts the batch mean, it gets a zero gradient in
    train mode (up to rounding) and stays at its initial 0, BatchNorm's beta doing its job.
    """

    def __init__(self, seq_layout='pixels', hidden=128, reg=5e-4, seed=0,
                 dtype=np.float32, rnn_init='orthogonal', cell='rnn', widths=(64, 64), convs_per_block=1,
                 batchnorm=False, bn_momentum=0.1, bn_eps=1e-5, whiten=0, identity_init=False,
                 readout='last'):
        if seq_layout not in SEQ_LAYOUTS:
            raise ValueError(f'unknown sequence layout {seq_layout!r}; use one of {SEQ_LAYOUTS}')
        if cell not in CELLS:
            raise ValueError(f'unknown cell {cell!r}; use one of {CELLS}')
        if rnn_init not in RNN_INITS:
            raise ValueError(f'unknown rnn_init {rnn_init!r}; use one of {RNN_INITS}')
        if readout not in READOUTS:
            raise ValueError(f'unknown readout {readout!r}; use one of {READOUTS}')
        if int(hidden) < 1:
            raise ValueError(f'hidden must be a positive integer, got {hidden}')
        if reg < 0:
            raise ValueError(f'reg must be >= 0, got {reg}')
        if np.dtype(dtype).name not in MODEL_DTYPES:
            raise ValueError(f'dtype must be one of {MODEL_DTYPES}, got {np.dtype(dtype).name}')
        problem = (backbone_problem(widths, convs_per_block, batchnorm, bn_momentum, bn_eps)
                   or conv_init_problem(whiten, identity_init))
        if problem:
            raise ValueError(problem)
        self.seq_layout = seq_layout
        self.hidden = int(hidden)
        self.reg = float(reg)
        self.seed = int(seed)
        self.dtype = np.dtype(dtype)
        self.rnn_init = rnn_init
        self.cell = cell
        self.readout = readout
        self.widths = tuple(int(w) for w in widths)
        self.convs_per_block = int(convs_per_block)
        self.batchnorm = bool(batchnorm)
        self.bn_momentum = float(bn_momentum)
        self.bn_eps = float(bn_eps)
        self.whiten = int(whiten)
        self.identity_init = bool(identity_init)
        # The method's backbone keeps its own fused path (conv_stack_forward), bit for bit.
        self.method_backbone = (list(self.widths) == METHOD_BACKBONE['widths']
                                and self.convs_per_block == 1 and not self.batchnorm and not self.whiten)
        self.layers = backbone_layers(self.widths, self.convs_per_block, self.batchnorm,
                                      in_channels=self.conv1_inputs, large_tiles=not self.method_backbone)
        self.params = self._init_params(np.random.default_rng(self.seed))

    # ---- configuration -------------------------------------------------
    def config(self):
        """The constructor arguments, JSON-serialisable."""
        return {'seq_layout': self.seq_layout, 'hidden': self.hidden, 'reg': self.reg,
                'seed': self.seed, 'dtype': self.dtype.name, 'rnn_init': self.rnn_init,
                'cell': self.cell, 'widths': list(self.widths), 'convs_per_block': self.convs_per_block,
                'batchnorm': self.batchnorm, 'bn_momentum': self.bn_momentum, 'bn_eps': self.bn_eps,
                'whiten': self.whiten, 'identity_init': self.identity_init, 'readout': self.readout}

    @property
    def channels(self):
        """C, the channels of the last map (the last width)."""
        return self.widths[-1]

    @property
    def conv1_inputs(self):
        """I_1, the channels conv1 reads: the image's 3, or 2P = 2*3*k*k after patch whitening."""
        return 2 * IMAGE_SHAPE[0] * self.whiten ** 2 if self.whiten else IMAGE_SHAPE[0]

    @property
    def map_side(self):
        """R, the rows (and columns) of the last map of a 32x32 image."""
        return IMAGE_SIDE >> len(self.widths)

    def param_shapes(self):
        """Expected shape of every parameter, keyed like ``params``, in their fixed order."""
        C, H, R = self.channels, self.hidden, self.map_side
        _, D = sequence_length_and_size(self.seq_layout, R, R, C)
        recurrent = CELL_TABLE[self.cell].shapes(D, H)
        shapes, inputs = {}, self.conv1_inputs
        if self.whiten:
            k = self.whiten
            shapes['whiten_W'] = (inputs, IMAGE_SHAPE[0], k, k)
        for layer in self.layers:
            k, O = layer.k, self.widths[(layer.k - 1) // self.convs_per_block]
            shapes[f'conv{k}_W'], shapes[f'conv{k}_b'] = (O, inputs, 3, 3), (O,)
            if layer.bn:
                shapes.update({f'bn{k}_{part}': (O,) for part in ('gamma', 'beta', 'mean', 'var')})
            inputs = O
        shapes.update({**{name: recurrent.pop(name) for name in ('W_xh', 'W_hh', 'b_h')},
                       'W_ho': (H, NUM_CLASSES), 'b_o': (NUM_CLASSES,)})
        # The cell's extra parameters come last. The order matters beyond files:
        # gradient norms are summed in it, so it is part of bit-identical training.
        return {**shapes, **recurrent}

    def trained_names(self):
        """The names of the parameters an optimizer updates (all but the frozen ones, ``is_frozen``:
        BatchNorm's running statistics and whiten_W), in the order of ``params``: the keys of
        ``loss``'s gradients, in their order."""
        return [name for name in self.params if not is_frozen(name)]

    def decayed_names(self):
        """The parameters the L2 term covers, in the order it sums them: every convK_W, then
        W_xh, W_hh and W_ho (never biases, BatchNorm's parameters or whiten_W)."""
        return [f'conv{layer.k}_W' for layer in self.layers] + list(RECURRENT_DECAYED)

    def _init_params(self, rng):
        """He for the convolutions (with identity_init, the identity on the first I_K filters of
        each with I_K <= O_K), Xavier for W_xh (per gate block) and W_ho, orthogonal (or Xavier,
        per rnn_init) for each H x H block of W_hh, zero biases except the gate biases the cell
        table sets (the LSTM's forget gate); whiten_W zero until ``fit_whitening``."""
        shapes = self.param_shapes()
        cell = CELL_TABLE[self.cell]
        H, G = self.hidden, cell.gates
        # whiten_W first, as in param_shapes; zeros, not drawn, so the draws below are the same
        # with or without it.
        p = {'whiten_W': np.zeros(shapes['whiten_W'])} if self.whiten else {}
        # He initialisation for the ReLU convolutions: std = sqrt(2 / fan_in).
        for name in (f'conv{layer.k}_W' for layer in self.layers):
            O, I, kh, kw = shapes[name]
            p[name] = rng.standard_normal(shapes[name]) * np.sqrt(2.0 / (I * kh * kw))
            if self.identity_init and I <= O:
                # Over the draw, which is still made: the other parameters' draws do not move.
                dirac_init(p[name])
        # Xavier (Glorot) for the tanh/sigmoid and linear layers: std = sqrt(2 / (fan_in + fan_out)),
        # each gate block of W_xh on its own as if it were a layer of H units.
        D = shapes['W_xh'][0]
        p['W_xh'] = np.concatenate([rng.standard_normal((D, H)) * np.sqrt(2.0 / (D + H))
                                    for _ in range(G)], axis=1)
        p['W_ho'] = rng.standard_normal((H, NUM_CLASSES)) * np.sqrt(2.0 / (H + NUM_CLASSES))
        blocks = []
        for _ in range(G):
            if self.rnn_init == 'orthogonal':
                # An orthogonal block has all singular values 1, so the backward
                # signal through 64 steps neither explodes nor vanishes at init.
                q, r = np.linalg.qr(rng.standard_normal((H, H)))
                blocks.append(q * np.sign(np.diag(r)))
            else:
                blocks.append(rng.standard_normal((H, H)) * np.sqrt(1.0 / H))
        p['W_hh'] = np.concatenate(blocks, axis=1)
        for name in shapes:
            if name not in p:
                # BatchNorm starts as the identity on a standardised map: gamma 1, beta 0; running
                # statistics those of a standard normal, as torch's (mean 0, var 1).
                p[name] = (np.ones if name.endswith(('_gamma', '_var')) else np.zeros)(shapes[name])
        if cell.gate_bias is not None:
            p['b_h'][:] = np.repeat(cell.gate_bias, H)
        # The draws above are in a fixed order (and so is this dict): a seed gives the same model.
        return {k: np.ascontiguousarray(v, dtype=self.dtype) for k, v in p.items()}

    # ---- forward / backward --------------------------------------------
    def _forward(self, X, train=False):
        """Forward pass up to the logits, keeping the caches for backward.

        X: (N, 3, 32, 32) images (with the 'pixels' layout any (N, 3, S, S) whose S is divisible
        by 2**len(widths): D does not depend on the map's size). train: BatchNorm with the
        batch's statistics (no effect without BatchNorm). Returns logits (N, 10), r (N, H) what
        the head read (h_T with the method's readout 'last'), caches, and {bnK_mean, bnK_var:
        updated running statistics} (train mode; else empty).
        """
        p = self.params
        x = np.asarray(X, dtype=self.dtype).transpose(0, 2, 3, 1)       # NCHW -> NHWC view
        if self.method_backbone:
            fmap, c_conv = conv_stack_forward(x, p)                      # (N,8,8,64)
            running = {}
        else:
            fmap, c_conv, running = backbone_forward(x, p, self.layers, train, self.bn_momentum,
                                                     self.bn_eps, whiten=bool(self.whiten))  # (N,R,R,C)
        seq = map_to_sequence(fmap, self.seq_layout)                     # (N,T,D)
        r, c_rnn = recurrent_forward(seq, p, self.cell, self.readout)   # (N,H)
        logits, c_out = affine_forward(r, p['W_ho'], p['b_o'])           # (N,10)
        return logits, r, (c_conv, fmap, c_rnn, c_out), running

    def loss(self, X, y, input_grad=False, details=False, label_smoothing=0.0):
        """Loss and gradients on a batch.

        Inputs:
        - X: (N, 3, 32, 32) images
        - y: (N,) integer labels
        - label_smoothing: s in [0, 1), see softmax_loss; 0 trains on one-hot targets
        - input_grad: also return the gradient with respect to X under the
          key 'X' (N, 3, 32, 32), for gradient checks and saliency maps;
          training leaves it off, it costs a col2im on the largest map
        - details: also return a dict with the logits (N, 10) and the data loss
          (cross-entropy without the L2 term), so a training loop can report
          both without a second pass

        Train mode: BatchNorm normalises with the batch's statistics, and the updated running
        statistics replace (in place) bnK_mean and bnK_var of ``params`` after the forward pass.

        Returns a tuple of:
        - loss: mean (smoothed) cross-entropy + reg/2 * sum of squared decayed weights
        - grads: dict keyed like ``trained_names()`` (all of ``params`` but the frozen ones)
        - details: {'logits', 'data_loss'}, only when details is True
        """
        p = self.params
        logits, _, (c_conv, fmap, c_rnn, c_out), running = self._forward(X, train=True)
        for name, value in running.items():
            # In place: whoever holds the arrays (the optimizer's dict, a test) sees the new values.
            np.copyto(p[name], value)
        data_loss, dlogits = softmax_loss(logits, np.asarray(y), smoothing=label_smoothing)
        dh, dW_ho, db_o = affine_backward(dlogits, c_out)
        rnn_grads, dseq = recurrent_backward(dh, c_rnn, self.cell)
        dmap = sequence_to_map(dseq, self.seq_layout, fmap)
        if self.method_backbone:
            conv_grads, dx = conv_stack_backward(dmap, c_conv, input_grad=input_grad)
        else:
            conv_grads, dx = backbone_backward(dmap, c_conv, input_grad=input_grad)
        grads = {**conv_grads, **rnn_grads, 'W_ho': dW_ho, 'b_o': db_o}

        reg_loss = 0.0
        for name in self.decayed_names():
            W = p[name]
            reg_loss += float(np.vdot(W, W))
            grads[name] += self.dtype.type(self.reg) * W
        loss = data_loss + 0.5 * self.reg * reg_loss
        grads = {k: grads[k].astype(self.dtype, copy=False) for k in self.trained_names()}
        if input_grad:
            grads['X'] = np.ascontiguousarray(dx.transpose(0, 3, 1, 2))   # NHWC -> NCHW
        if details:
            return loss, grads, {'logits': logits, 'data_loss': data_loss}
        return loss, grads

    def fit_whitening(self, X, eps=WHITEN_EPS):
        """Set whiten_W (in place, in the model's dtype) to the patch-whitening filters of X.

        X: (N, 3, 32, 32) training images, normalised as the model will see them (all of the
        training set, or a subset: airbench fits on 5000 images). Deterministic: the same X gives
        the same bits. In place, so an optimizer's or a test's reference to params sees the new
        values; a weight average made before this call still holds the zeros.
        See ``patch_whitening_weights``.
        """
        if not self.whiten:
            raise ValueError('fit_whitening needs a model with a whitening layer; build it with whiten=2 or 3')
        np.copyto(self.params['whiten_W'], patch_whitening_weights(X, self.whiten, eps), casting='same_kind')

    def forward(self, X):
        """Logits for a batch. X: (N, 3, 32, 32) -> (N, 10)."""
        return self._forward(X)[0]

    def features(self, X):
        """What the head reads: the final RNN hidden states h_T (N, H) with the method's readout
        'last', their mean or maximum over time with 'mean' or 'max'. X: (N, 3, 32, 32)."""
        return self._forward(X)[1]

    def predict_proba(self, X, batch_size=500, return_features=False):
        """Class probabilities, computed in batches to bound memory.

        Inputs:
        - X: (N, 3, 32, 32) images (float, or uint8 already normalised by the caller)
        - batch_size: images per forward pass

        Returns probs (N, 10), and the features (N, H) too when return_features is True.
        """
        probs, feats = [], []
        for s in range(0, len(X), batch_size):
            logits, h_T, _, _ = self._forward(X[s:s + batch_size])
            probs.append(softmax(logits))
            feats.append(h_T)
        probs = np.concatenate(probs) if probs else np.zeros((0, NUM_CLASSES), self.dtype)
        if return_features:
            feats = np.concatenate(feats) if feats else np.zeros((0, self.hidden), self.dtype)
            return probs, feats
        return probs

    # ---- persistence -----------------------------------------------------
    def set_params(self, params):
        """Replace the parameters, checking names and shapes against this model."""
        expected = self.param_shapes()
        missing = sorted(set(expected) - set(params))
        extra = sorted(set(params) - set(expected))
        if missing or extra:
            raise ModelFileError(f'parameter names do not match the model: missing {missing}, '
                                 f'unexpected {extra}')
        for name, shape in expected.items():
            if tuple(params[name].shape) != shape:
                raise ModelFileError(
                    f'parameter {name} has shape {tuple(params[name].shape)} but a '
                    f'{self.seq_layout!r} {self.cell} model with hidden={self.hidden} needs {shape}')
        for name in expected:
            problem = array_problem(params[name])
            if problem:
                raise ModelFileError(f'parameter {name} {problem}')
        self.params = {k: np.ascontiguousarray(params[k], dtype=self.dtype) for k in expected}

    def save(self, path, extra_meta=None):
        """Write the parameters and configuration to ``path`` (.npz), atomically.

        extra_meta: optional JSON-serialisable dict stored alongside (e.g. the epoch).
        """
        meta = dict(extra_meta or {}, **self.config(), format_version=FORMAT_VERSION, kind='CNNRNN')
        write_npz(path, {'meta': np.array(json.dumps(meta)),
                         **{f'param/{k}': v for k, v in self.params.items()}})

    @classmethod
    def load(cls, path, return_meta=False, **expected):
        """Load a model written by ``save`` (or a training checkpoint).

        ``expected`` may name configuration values the caller relies on, e.g.
        ``seq_layout='rows'``; a file that disagrees raises ModelFileError.
        With return_meta, returns (model, the file's metadata dict), so a caller
        learns e.g. the epoch a best.npz was saved at from the file itself.
        """
        arrays = load_npz(path)
        model = cls.from_arrays(arrays, path, **expected)
        return (model, read_meta(arrays, path)) if return_meta else model

    @classmethod
    def from_arrays(cls, arrays, path, **expected):
        """The model held by the arrays of a file already read (``load_npz``); see ``load``."""
        meta = read_meta(arrays, path)
        for key, want in expected.items():
            want = list(want) if isinstance(want, tuple) else want      # widths: JSON has lists
            if want is not None and meta.get(key) != want:
                raise ModelFileError(
                    f'{path} holds a model with {key}={meta.get(key)!r}, not {want!r}; '
                    f'use a checkpoint trained with {key}={want!r}')
        problem = model_config_problem(meta, arrays)
        if problem:
            raise ModelFileError(f'{path} has an invalid model configuration ({problem}); it is '
                                 f'damaged or was not written by this project: use another file')
        model = cls(seq_layout=meta['seq_layout'], hidden=meta['hidden'], reg=meta['reg'],
                    seed=meta['seed'], dtype=expected.get('dtype') or meta['dtype'],
                    rnn_init=meta['rnn_init'], cell=meta['cell'], readout=meta['readout'],
                    **{key: meta[key] for key in (*METHOD_BACKBONE, *METHOD_CONV_INIT)})
        try:
            model.set_params({k[len('param/'):]: v for k, v in arrays.items() if k.startswith('param/')})
        except ModelFileError as e:
            raise ModelFileError(f'{path}: {e}; the file is damaged or belongs to another model: '
                                 f'use another file') from None
        return model


# --------------------------------------------------------------------------
# File metadata
# --------------------------------------------------------------------------

def load_npz(path):
    """Every array of an .npz file written by this project; any failure is a ModelFileError."""
    try:
        return read_npz(path, fix='use another checkpoint, e.g. runs/<run>/ckpt.npz')
    except RunFileError as e:
        raise ModelFileError(str(e)) from None


def array_problem(a):
    """Why ``a`` cannot be a parameter (or optimizer state), in a few words; None if it can.

    Only real floating-point arrays of finite values are accepted: complex numbers
    would train in complex arithmetic, and a NaN or inf can only come from a
    diverged run or a damaged file.
    """
    if a.dtype.kind != 'f':
        return f'holds {a.dtype} values, not real floating-point numbers'
    if not np.isfinite(a).all():
        return 'holds values that are not finite (NaN or inf)'
    return None


def model_config_problem(meta, arrays):
    """Why a file's model configuration cannot build a model, in a few words; None if it can.

    Checked before the model is built, so a damaged ``hidden`` cannot make the
    constructor allocate an absurd amount of memory.
    """
    for key in ('seq_layout', 'hidden', 'reg', 'seed', 'dtype', 'rnn_init', 'cell'):
        if key not in meta:
            return f'no {key!r}'
    allowed = {'seq_layout': SEQ_LAYOUTS, 'rnn_init': RNN_INITS, 'cell': CELLS, 'dtype': MODEL_DTYPES,
               'readout': READOUTS}
    for key, values in allowed.items():
        if meta[key] not in values:
            return f'{key} = {meta[key]!r}, not one of {list(values)}'
    for key in ('hidden', 'seed'):
        if not isinstance(meta[key], int) or isinstance(meta[key], bool) or meta[key] < (key == 'hidden'):
            return f'{key} = {meta[key]!r} is not a{" positive" if key == "hidden" else " non-negative"} integer'
    reg = meta['reg']
    if not isinstance(reg, (int, float)) or isinstance(reg, bool) or not (0 <= reg < float('inf')):
        return f'reg = {reg!r} is not a finite number >= 0'
    problem = (backbone_problem(**{key: meta.get(key) for key in METHOD_BACKBONE})
               or conv_init_problem(**{key: meta.get(key) for key in METHOD_CONV_INIT}))
    if problem:
        return problem
    # whiten must be what the file's arrays hold: its whiten_W, and conv1's inputs (checked below).
    whiten, whiten_W = meta['whiten'], arrays.get('param/whiten_W')
    want = (2 * IMAGE_SHAPE[0] * whiten ** 2, IMAGE_SHAPE[0], whiten, whiten) if whiten else None
    if (None if whiten_W is None else whiten_W.shape) != want:
        return f'whiten = {whiten} but whiten_W has shape {None if whiten_W is None else whiten_W.shape}'
    inputs = want[0] if whiten else IMAGE_SHAPE[0]
    W1 = arrays.get('param/conv1_W')
    if W1 is not None and (W1.ndim != 4 or W1.shape[1] != inputs):
        return f'whiten = {whiten} makes conv1 read {inputs} channels, but conv1_W has shape {W1.shape}'
    # The widths must be those of the file's own convolutions (as hidden must be W_hh's), so that
    # damaged ones cannot make the constructor allocate more than the file holds.
    widths, per_block = meta['widths'], meta['convs_per_block']
    n_convs = sum(1 for name in arrays if name.startswith('param/conv') and name.endswith('_W'))
    if len(widths) * per_block != n_convs:
        return (f'widths = {widths} and convs_per_block = {per_block} make {len(widths) * per_block} '
                f'convolutions, but the file holds {n_convs}')
    for k in range(1, n_convs + 1):
        W = arrays.get(f'param/conv{k}_W')
        if W is None or W.ndim != 4 or W.shape[0] != widths[(k - 1) // per_block]:
            return (f'widths = {widths} but conv{k}_W has shape {None if W is None else W.shape}')
    W_hh = arrays.get('param/W_hh')
    if W_hh is not None and (W_hh.ndim != 2 or W_hh.shape[0] != meta['hidden']):
        return f"hidden = {meta['hidden']} but W_hh has shape {W_hh.shape}"
    return None


def read_meta(arrays, path):
    """The JSON metadata of a file written by ``CNNRNN.save`` or main.py, checked."""
    if 'meta' not in arrays:
        raise ModelFileError(f'{path} has no model metadata; it was not written by this project')
    try:
        meta = json.loads(str(arrays['meta']))
    except ValueError:
        raise ModelFileError(f'{path} has unreadable metadata; it is corrupt') from None
    if not isinstance(meta, dict):
        raise ModelFileError(f'{path} has metadata that is a JSON {type(meta).__name__}, not an '
                             f'object; it is damaged or was not written by this project: use another file')
    meta.setdefault('cell', 'rnn')     # files written before the gated cells existed
    meta.setdefault('readout', 'last')  # ... and before the readout of every hidden state
    for key, value in METHOD_BACKBONE.items():     # ... and before the backbone was configurable
        meta.setdefault(key, list(value) if isinstance(value, list) else value)
    for key, value in METHOD_CONV_INIT.items():    # ... and before whitening and identity_init
        meta.setdefault(key, value)
    version = meta.get('format_version')
    if version != FORMAT_VERSION:
        raise ModelFileError(f'{path} has format version {version!r}, this code reads version '
                             f'{FORMAT_VERSION}; retrain or use a matching version of the code')
    return meta
