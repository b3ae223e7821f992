"""The speed machinery of the CNN+RNN: how ``cnn_rnn_numpy`` runs fast, not what it computes.

``cnn_rnn_numpy.py`` states the method: one forward/backward pair per layer,
the recurrent cells and the ``CNNRNN`` model. This module holds what makes a
training step fast, each piece tested against the plain layers it stands in
for (tests/test_model.py), the way CS231n's fast_layers.py sits beside its
layers.py:

* im2col/col2im for 3x3 convolutions in NHWC. They live here, not in
  ``cnn_rnn_numpy``, because the fused block below needs them and imports run
  one way (``cnn_rnn_numpy`` imports this module, never the reverse); the
  plain ``conv3x3_forward`` of ``cnn_rnn_numpy`` is built from them.
* The fused conv -> ReLU -> 2x2 max-pool block (``conv_relu_pool_*``): im2col
  rows in pooling order, bias and ReLU after pooling, on a 4x smaller map.
* conv2 by Winograd's F(2x2, 3x3) (``winograd_*``): 2.25x fewer multiply-adds.
* One convolution of a configurable backbone (``ConvLayer``, ``conv_layer_*``): the same
  kernels, with or without the pool, with or without the ReLU (a BatchNorm may come between).
* Worker threads: the conv blocks run in micro-batches and the recurrence in
  slices of the batch on a pool of threads (``conv_stack_*``,
  ``map_on_threads``). Their number comes from the CPUs this process may use
  (CPU affinity and cgroup quota, ``usable_cpus``), or from the environment
  variable CNNRNN_THREADS (``worker_threads``).
* Process-wide settings for training, applied only when asked
  (``prepare_process_for_training``): the C allocator keeps freed memory for
  reuse, and BLAS uses as many threads as the workers. Importing this module
  changes no process-wide setting.
"""
import ctypes
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path, PurePosixPath

import numpy as np


# --------------------------------------------------------------------------
# im2col / col2im for 3x3 convolutions (stride 1, padding 1), NHWC
# --------------------------------------------------------------------------

def im2col_3x3(x, pool_order=False):
    """Unfold every 3x3 neighbourhood of a zero-padded NHWC batch into a row.

    Inputs:
    - x: (N, H, W, C)
    - pool_order: the order of the rows (output pixels).
      False: (n, y, x), the usual one.
      True: (a, b, n, py, px) with y = 2*py + a and x = 2*px + b, for H and W
      even. The four members of every 2x2 pooling window then land in four
      separate contiguous blocks of the convolution output, so the max-pool
      that follows is an elementwise maximum of four contiguous arrays
      instead of a strided gather.

    Returns:
    - cols: (N*H*W, 9*C), each row the padded patch centred on one output
      pixel, ordered (kh, kw, c) so that C is the fastest axis.
    """
    N, H, W, C = x.shape
    step = 2 if pool_order else 1
    if H % step or W % step:
        raise ValueError(f'pool order needs an even height and width, got {H}x{W}')
    xp = np.zeros((N, H + 2, W + 2, C), dtype=x.dtype)
    xp[:, 1:-1, 1:-1, :] = x
    # A view of shape (N, H, W, C, 3, 3): no data moves until the copy below.
    windows = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(1, 2))
    # Split y -> (py, a) and x -> (px, b) (still a view), then bring the
    # block indices (a, b) to the front and (kh, kw, c) to the back.
    windows = windows.reshape(N, H // step, step, W // step, step, C, 3, 3)
    windows = windows.transpose(2, 4, 0, 1, 3, 6, 7, 5)
    cols = np.empty(windows.shape, dtype=x.dtype)
    # One strided copy: measured 2-3x faster than nine slice assignments.
    np.copyto(cols, windows)
    return cols.reshape(N * H * W, 9 * C)


def col2im_3x3(dcols_taps, x_shape):
    """Adjoint of ``im2col_3x3`` (plain row order): scatter-add patch gradients to pixels.

    Inputs:
    - dcols_taps: (9, N*H*W, C) gradient with respect to the im2col matrix,
      given *tap-major*: dcols_taps[3*i + j, m, c] is the gradient of entry
      (m, (i, j, c)) of the (N*H*W, 9*C) matrix. In this layout each kernel
      tap's contribution is one contiguous (N, H, W, C) slab, so the nine
      adds below run over long contiguous rows instead of 64-float pieces
      (measured 2x faster than scattering the patch-major matrix).
    - x_shape: (N, H, W, C) shape of the unpadded input

    Returns:
    - dx: (N, H, W, C)
    """
    N, H, W, C = x_shape
    dcols_taps = dcols_taps.reshape(9, N, H, W, C)
    dxp = np.zeros((N, H + 2, W + 2, C), dtype=dcols_taps.dtype)
    # Nine shifted adds (a loop over kernel taps, never over pixels): output
    # pixel (y, x) read padded input (y + i, x + j) through tap (i, j).
    for i in range(3):
        for j in range(3):
            dxp[:, i:i + H, j:j + W, :] += dcols_taps[3 * i + j]
    return dxp[:, 1:-1, 1:-1, :]


def input_grad_taps(dout2, w):
    """Gradient with respect to the im2col matrix, tap-major: (9, M, C).

    dout2: (M, O) gradient of the convolution output; w: (O, C, 3, 3).
    One batched product of dout2 with the nine (O, C) tap matrices.
    """
    O, C = w.shape[:2]
    w_taps = w.transpose(2, 3, 0, 1).reshape(9, O, C)
    return np.matmul(dout2[None], w_taps)


def conv_weight_matrix(w):
    """(O, C, 3, 3) framework-order weights -> (9*C, O) matrix in im2col order."""
    O, C = w.shape[:2]
    return w.transpose(2, 3, 1, 0).reshape(9 * C, O)


def conv_weight_grad(cols, dout2, w_shape):
    """dW in framework order from the im2col matrix (M, 9C) and dout (M, O)."""
    O, C = w_shape[:2]
    return np.ascontiguousarray((cols.T @ dout2).reshape(3, 3, C, O).transpose(3, 2, 0, 1))


# --------------------------------------------------------------------------
# 2x2 max-pooling over four blocks, and pooling before bias and ReLU
# --------------------------------------------------------------------------

def pool_blocks_forward(blocks):
    """Maximum over the four members of every 2x2 window, given as blocks.

    Inputs:
    - blocks: (2, 2, ...) where blocks[a, b] holds window member (row a, col b)

    Returns a tuple of:
    - out: (...) the window maxima
    - winner: (...) int8 in 0..3, the index 2*a + b of the member that won.
      Ties go to the first member in the order (0,0), (0,1), (1,0), (1,1),
      so a tie never sends the gradient to two places.
    """
    top = np.maximum(blocks[0, 0], blocks[0, 1])
    bottom = np.maximum(blocks[1, 0], blocks[1, 1])
    out = np.maximum(top, bottom)
    # Strict comparisons give ties to the earlier member. Bit operations on
    # the boolean masks, because np.where on 4M elements is ~10x slower.
    right_in_top = blocks[0, 1] > blocks[0, 0]
    right_in_bottom = blocks[1, 1] > blocks[1, 0]
    bottom_wins = bottom > top
    right_wins = right_in_top ^ (bottom_wins & (right_in_top ^ right_in_bottom))
    winner = (bottom_wins.view(np.int8) << 1) | right_wins.view(np.int8)
    return out, winner


def pool_blocks_backward(dout, winner, out=None):
    """Backward pass of ``pool_blocks_forward``.

    Inputs:
    - dout: (...) gradient of the window maxima
    - winner: (...) int8 from the forward pass
    - out: (2, 2, ...) where to write dblocks (a view of a larger array may be given), or None

    Returns:
    - dblocks: (2, 2, ...) with each dout value at its window's winner, zeros elsewhere
    """
    dblocks = np.empty((2, 2) + dout.shape, dtype=dout.dtype) if out is None else out
    for k in range(4):
        np.multiply(dout, winner == k, out=dblocks[k // 2, k % 2])
    return dblocks


def pool_bias_relu_forward(blocks, b):
    """2x2 max-pool, then bias, then ReLU, for the fused conv blocks.

    ReLU and max-pooling commute (both monotone) and the bias is the same for
    the four members of a window, so bias and ReLU run on the 4x smaller
    pooled map. blocks: (2, 2, N, H/2, W/2, O), b: (O,).
    Returns out (N, H/2, W/2, O) and the cache (winner, out).
    """
    out, winner = pool_blocks_forward(blocks)
    out += b
    np.maximum(out, 0, out=out)
    return out, (winner, out)


def pool_bias_relu_backward(dout, cache):
    """Backward of ``pool_bias_relu_forward`` -> (dblocks (2, 2, N, H/2, W/2, O), db (O,))."""
    winner, out = cache
    dpooled = dout * (out > 0)
    db = dpooled.reshape(-1, out.shape[-1]).sum(axis=0)
    return pool_blocks_backward(dpooled, winner), db


# --------------------------------------------------------------------------
# The fused block the model uses: conv -> ReLU -> 2x2 max-pool
# --------------------------------------------------------------------------

def conv_relu_pool_forward(x, w, b):
    """conv3x3 -> ReLU -> 2x2 max-pool, computed in the cheapest order.

    Same values and gradients as chaining ``conv3x3_forward``,
    ``relu_forward`` and ``maxpool2x2_forward``, with three savings:
    - im2col rows in pool order, so pooling is a maximum of four contiguous
      blocks of the convolution output;
    - ReLU and max-pooling commute (both monotone), and the bias is the same
      for the four members of a window, so bias and ReLU are applied to the
      4x smaller pooled map.

    Inputs:
    - x: (N, H, W, C) NHWC, H and W even
    - w: (O, C, 3, 3), b: (O,)

    Returns a tuple of:
    - out: (N, H/2, W/2, O)
    - cache
    """
    N, H, W, C = x.shape
    O = w.shape[0]
    cols = im2col_3x3(x, pool_order=True)
    blocks = (cols @ conv_weight_matrix(w)).reshape(2, 2, N, H // 2, W // 2, O)
    out, pool_cache = pool_bias_relu_forward(blocks, b)
    return out, (cols, pool_cache, w, x.shape)


def conv_relu_pool_backward(dout, cache, need_dx=True):
    """Backward pass of ``conv_relu_pool_forward``.

    Inputs:
    - dout: (N, H/2, W/2, O)
    - need_dx: False skips the input gradient (the first block's input is the
      image, whose gradient nobody uses: it saves a third of that block's work)

    Returns a tuple of:
    - dx: (N, H, W, C), or None when need_dx is False
    - dw: (O, C, 3, 3)
    - db: (O,)
    """
    cols, pool_cache, w, x_shape = cache
    O = w.shape[0]
    dblocks, db = pool_bias_relu_backward(dout, pool_cache)         # (2, 2, N, H/2, W/2, O), (O,)
    dw = conv_weight_grad(cols, dblocks.reshape(-1, O), w.shape)    # rows in pool order, like cols
    dx = None
    if need_dx:
        # Back to plain (n, y, x) order for col2im, whose adds then run over
        # contiguous rows; the reorder moves a 9x smaller array than dcols.
        N, H, W, C = x_shape
        dout_plain = dblocks.transpose(2, 3, 0, 4, 1, 5).reshape(N * H * W, O)
        dx = col2im_3x3(input_grad_taps(dout_plain, w), x_shape)
    return dx, dw, db


# --------------------------------------------------------------------------
# conv2 by Winograd's minimal filtering F(2x2, 3x3)
# --------------------------------------------------------------------------
#
# Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (CVPR 2016).
# A 3x3 convolution producing one 2x2 tile of output reads a 4x4 tile d of the
# padded input. Directly that is 2*2*9 = 36 multiplications per channel pair;
# Winograd's F(2x2, 3x3) needs 16:
#
#     Y = A^T [ (G g G^T) * (B^T d B) ] A        (* elementwise, all 4x4)
#
# with g the 3x3 kernel and the small constant matrices below. Summed over
# input channels, the 16 elementwise products become 16 matrix products
# (tiles, C) @ (C, O), 2.25x fewer multiply-adds than im2col's single
# (pixels, 9C) @ (9C, O) product. The transforms with B and A are sums and
# differences only (entries 0, +1, -1), done as whole-array adds over all
# tiles at once: a Python loop over the 16 tile positions, never over pixels.
#
# Tiles sit at even positions, so each 2x2 output tile is exactly one window
# of the 2x2 max-pool that follows: the four outputs of the transform are the
# four pool members that ``pool_blocks_forward`` takes, no reordering needed.
#
# Only conv2 (64 -> 64 channels on a 16x16 map, three quarters of the model's
# arithmetic) uses it. conv1 has C = 3 input channels, too few for products of
# (tiles, 3) @ (3, 64) to pay for the transforms; it stays on im2col.

WINOGRAD_BT = np.array([[1, 0, -1, 0],
                        [0, 1, 1, 0],
                        [0, -1, 1, 0],
                        [0, 1, 0, -1]])       # (4, 4) input transform B^T
WINOGRAD_G = np.array([[1.0, 0.0, 0.0],
                       [0.5, 0.5, 0.5],
                       [0.5, -0.5, 0.5],
                       [0.0, 0.0, 1.0]])      # (4, 3) kernel transform G
WINOGRAD_AT = np.array([[1, 1, 1, 0],
                        [0, 1, -1, -1]])      # (2, 4) output transform A^T


def signed_sum(signs, parts, out):
    """out[...] = sum_k signs[k] * parts[k] for signs in {-1, 0, +1}.

    The rows of B^T and A^T as whole-array adds: one NumPy call for the first
    two terms, one in-place add per further term, no multiplications.
    """
    plus = [p for s, p in zip(signs, parts) if s > 0]
    minus = [p for s, p in zip(signs, parts) if s < 0]
    if len(plus) >= 2:
        np.add(plus.pop(0), plus.pop(0), out=out)
    elif plus and minus:
        np.subtract(plus.pop(0), minus.pop(0), out=out)
    elif plus:
        np.copyto(out, plus.pop(0))
    else:
        np.negative(minus.pop(0), out=out)
    for p in plus:
        out += p
    for p in minus:
        out -= p
    return out


def add_signed(signs, parts, out):
    """out[...] += sum_k signs[k] * parts[k] for signs in {-1, 0, +1} (the adjoint of ``signed_sum``)."""
    for s, p in zip(signs, parts):
        if s > 0:
            out += p
        elif s < 0:
            out -= p


def winograd_kernel_transform(w, tile=2):
    """The transformed kernels U = G g G^T of every (output, input) channel pair.

    Inputs:
    - w: (O, C, 3, 3) conv weights (framework order)
    - tile: 2 for F(2x2, 3x3) (G is WINOGRAD_G), 4 for F(4x4, 3x3) (WINOGRAD4_G)

    Returns:
    - U: (P, P, C, O) with P = tile + 2, U[xi, nu] the (C, O) matrix of tile position (xi, nu)
    """
    G = winograd_kernel_matrix(tile).astype(w.dtype)
    Gw = np.tensordot(G, w, axes=([1], [2]))            # (P, O, C, 3): G applied to kernel rows
    U = np.tensordot(Gw, G, axes=([3], [1]))            # (P, O, C, P): and to kernel columns
    return np.ascontiguousarray(U.transpose(0, 3, 2, 1))


def winograd_kernel_transform_backward(dU, tile=2):
    """Adjoint of ``winograd_kernel_transform``: dU (P, P, C, O) -> dw (O, C, 3, 3) = G^T dU G."""
    G = winograd_kernel_matrix(tile).astype(dU.dtype)
    Gt_dU = np.tensordot(G, dU, axes=([0], [0]))        # (3, P, C, O)
    dw = np.tensordot(Gt_dU, G, axes=([1], [0]))        # (3, C, O, 3): (i, c, o, j)
    return np.ascontiguousarray(dw.transpose(2, 1, 0, 3))


def winograd_input_transform(x):
    """B^T d B of every 4x4 input tile d, tiles at stride 2 over the zero-padded input.

    Inputs:
    - x: (N, H, W, C) NHWC, H and W even

    Returns:
    - V: (4, 4, N, H/2, W/2, C), V[xi, nu, n, ty, tx] the transformed tile
      whose 2x2 output lands on pixels (2ty..2ty+1, 2tx..2tx+1)
    """
    N, H, W, C = x.shape
    xp = np.zeros((N, H + 2, W + 2, C), dtype=x.dtype)
    xp[:, 1:-1, 1:-1, :] = x
    # Row r of every tile, for all tiles at once: a stride-2 view.
    tile_rows = [xp[:, r:r + H:2] for r in range(4)]                  # 4 x (N, H/2, W+2, C)
    row_mix = np.empty((4, N, H // 2, W + 2, C), dtype=x.dtype)
    for xi in range(4):
        signed_sum(WINOGRAD_BT[xi], tile_rows, row_mix[xi])           # B^T along tile rows
    # Column s of every tile, for all four row mixes at once.
    tile_cols = [row_mix[:, :, :, s:s + W:2] for s in range(4)]       # 4 x (4, N, H/2, W/2, C)
    V = np.empty((4, 4, N, H // 2, W // 2, C), dtype=x.dtype)
    for nu in range(4):
        signed_sum(WINOGRAD_BT[nu], tile_cols, V[:, nu])              # ... then along tile columns
    return V


def winograd_input_transform_backward(dV, x_shape):
    """Adjoint of ``winograd_input_transform``: dV (4, 4, N, H/2, W/2, C) -> dx (N, H, W, C).

    Overlapping tiles (neighbours share two rows or columns) add their
    contributions, as col2im does for overlapping patches.
    """
    N, H, W, C = x_shape
    d_row_mix = np.zeros((4, N, H // 2, W + 2, C), dtype=dV.dtype)
    dV_by_column = dV.transpose(1, 0, 2, 3, 4, 5)        # dV_by_column[nu] = dV[:, nu], all four rows xi
    for s in range(4):
        add_signed(WINOGRAD_BT[:, s], dV_by_column, d_row_mix[:, :, :, s:s + W:2])
    dxp = np.zeros((N, H + 2, W + 2, C), dtype=dV.dtype)
    for r in range(4):
        add_signed(WINOGRAD_BT[:, r], d_row_mix, dxp[:, r:r + H:2])
    return dxp[:, 1:-1, 1:-1, :]


def winograd_output_transform(M):
    """A^T m A of every 4x4 tile of products: M (4, 4, ...) -> Y (2, 2, ...)."""
    Y = np.empty((2, 2) + M.shape[2:], dtype=M.dtype)
    row_mix = np.empty((4,) + M.shape[2:], dtype=M.dtype)
    for a in range(2):
        signed_sum(WINOGRAD_AT[a], M, row_mix)          # A^T along tile rows, all columns nu at once
        for b in range(2):
            signed_sum(WINOGRAD_AT[b], row_mix, Y[a, b])
    return Y


def winograd_output_transform_backward(dY):
    """Adjoint of ``winograd_output_transform``: dY (2, 2, ...) -> dM (4, 4, ...) = A dY A^T."""
    dM = np.empty((4, 4) + dY.shape[2:], dtype=dY.dtype)
    row_mix = np.empty((2,) + dY.shape[2:], dtype=dY.dtype)
    for xi in range(4):
        signed_sum(WINOGRAD_AT[:, xi], dY, row_mix)     # A along tile rows, both columns b at once
        for nu in range(4):
            signed_sum(WINOGRAD_AT[:, nu], row_mix, dM[xi, nu])
    return dM


def winograd_products(V, U):
    """The P*P matrix products of F(2x2, 3x3) (P = 4) or F(4x4, 3x3) (P = 6), one per tile position.

    Inputs:
    - V: (P, P, ..., C) transformed input tiles
    - U: (P, P, C, O) transformed kernels

    Returns:
    - M: (P, P, ..., O), M[xi, nu] = V[xi, nu] @ U[xi, nu] over the tile axes
    """
    C, O = U.shape[2:]
    positions = U.shape[0] * U.shape[1]
    M = np.matmul(V.reshape(positions, -1, C), U.reshape(positions, C, O))      # (P*P, tiles, O)
    return M.reshape(V.shape[:-1] + (O,))


def winograd_products_backward(dM, V, U, need_dV=True):
    """Backward of ``winograd_products``: dM (P, P, ..., O) -> (dV (P, P, ..., C) or None, dU (P, P, C, O))."""
    C, O = U.shape[2:]
    positions = U.shape[0] * U.shape[1]
    dM_flat = dM.reshape(positions, -1, O)
    dU = np.matmul(V.reshape(positions, -1, C).transpose(0, 2, 1), dM_flat).reshape(U.shape)
    dV = None
    if need_dV:
        # U^T made contiguous first: OpenBLAS multiplies by a transposed view ~1.5x slower.
        U_T = np.ascontiguousarray(U.reshape(positions, C, O).transpose(0, 2, 1))
        dV = np.matmul(dM_flat, U_T).reshape(V.shape)
    return dV, dU


def winograd_relu_pool_forward(x, U, b):
    """conv3x3 -> ReLU -> 2x2 max-pool like ``conv_relu_pool_forward``, the convolution by Winograd.

    Inputs:
    - x: (N, H, W, C) NHWC, H and W even
    - U: (4, 4, C, O) from ``winograd_kernel_transform(w)``, computed once
      per step for all micro-batches
    - b: (O,)

    Returns a tuple of:
    - out: (N, H/2, W/2, O), equal to the im2col block's up to float rounding
    - cache
    """
    V = winograd_input_transform(x)                       # (4, 4, N, H/2, W/2, C)
    blocks = winograd_output_transform(winograd_products(V, U))    # (2, 2, N, H/2, W/2, O)
    out, pool_cache = pool_bias_relu_forward(blocks, b)
    return out, (V, U, pool_cache, x.shape)


def winograd_relu_pool_backward(dout, cache, need_dx=True):
    """Backward pass of ``winograd_relu_pool_forward``.

    Inputs:
    - dout: (N, H/2, W/2, O)

    Returns a tuple of:
    - dx: (N, H, W, C), or None when need_dx is False
    - dU: (4, 4, C, O) gradient of the transformed kernels; summed over the
      micro-batches, ``winograd_kernel_transform_backward`` turns it into dw
    - db: (O,)
    """
    V, U, pool_cache, x_shape = cache
    dblocks, db = pool_bias_relu_backward(dout, pool_cache)           # (2, 2, N, H/2, W/2, O), (O,)
    dM = winograd_output_transform_backward(dblocks)                  # (4, 4, N, H/2, W/2, O)
    dV, dU = winograd_products_backward(dM, V, U, need_dV=need_dx)
    dx = winograd_input_transform_backward(dV, x_shape) if need_dx else None
    return dx, dU, db


# --------------------------------------------------------------------------
# Winograd's F(4x4, 3x3): larger tiles for the larger maps of a configurable backbone
# --------------------------------------------------------------------------
#
# The same identity with 6x6 input tiles at stride 4, each giving a 4x4 tile of
# output: 36 products per 16 outputs (2.25 multiplications per output and
# channel pair, against F(2x2)'s 4 and the direct 9). What matters more on
# this CPU is memory: the products M of a 16x16 map are 36 * 16 = 576 values
# per image and output channel, against F(2x2)'s 16 * 64 = 1,024, and a layer
# with few input channels (64 -> 256 at 16x16: deep's conv3, the step's
# largest) is bound by writing and reading them. On an 8x8 map a micro-batch
# has only 4 tiles an image, and the 36 products of (tiles, C) @ (C, O) become
# too small to run at BLAS speed, so those layers keep F(2x2)
# (``backbone_layers`` chooses). The transforms have entries other than 0 and
# +-1, so they are small matrix products (P, P) @ (P, everything) rather than
# signed sums. Their float32 round-off is a few times F(2x2)'s (relative
# error ~1e-5 against ~3e-6 for a layer of 256 channels): harmless for SGD,
# which is why cuDNN and others use these tiles too.
#
# The 4x4 output tile holds four windows of the 2x2 max-pool: output pixel
# (4ty + a, 4tx + b), a = 2 a_hi + a_lo, is member (a_lo, b_lo) of pooled
# pixel (2ty + a_hi, 2tx + b_hi). A strided view of Y gives the pool its
# blocks without a copy (``winograd4_pool_blocks``).

WINOGRAD4_BT = np.array([[4, 0, -5, 0, 1, 0],
                         [0, -4, -4, 1, 1, 0],
                         [0, 4, -4, -1, 1, 0],
                         [0, -2, -1, 2, 1, 0],
                         [0, 2, -1, -2, 1, 0],
                         [0, 4, 0, -5, 0, 1]], dtype=np.float64)    # (6, 6) input transform B^T
WINOGRAD4_G = np.array([[1 / 4, 0, 0],
                        [-1 / 6, -1 / 6, -1 / 6],
                        [-1 / 6, 1 / 6, -1 / 6],
                        [1 / 24, 1 / 12, 1 / 6],
                        [1 / 24, -1 / 12, 1 / 6],
                        [0, 0, 1]])                                   # (6, 3) kernel transform G
WINOGRAD4_AT = np.array([[1, 1, 1, 1, 1, 0],
                         [0, 1, -1, 2, -2, 0],
                         [0, 1, 1, 4, 4, 0],
                         [0, 1, -1, 8, -8, 1]], dtype=np.float64)    # (4, 6) output transform A^T


def winograd_kernel_matrix(tile):
    """The kernel transform G of F(tile x tile, 3x3): WINOGRAD_G (tile 2) or WINOGRAD4_G (tile 4)."""
    if tile == 2:
        return WINOGRAD_G
    if tile == 4:
        return WINOGRAD4_G
    raise ValueError(f'Winograd tiles are 2 or 4 pixels on a side, not {tile}')


def winograd4_input_transform(x):
    """B^T d B of every 6x6 input tile d, tiles at stride 4 over the zero-padded input.

    Inputs:
    - x: (N, H, W, C) NHWC, H and W divisible by 4

    Returns:
    - V: (6, 6, N, H/4, W/4, C), V[xi, nu, n, ty, tx] the transformed tile
      whose 4x4 output lands on pixels (4ty..4ty+3, 4tx..4tx+3)
    """
    N, H, W, C = x.shape
    BT = WINOGRAD4_BT.astype(x.dtype)
    xp = np.zeros((N, H + 2, W + 2, C), dtype=x.dtype)
    xp[:, 1:-1, 1:-1, :] = x
    # Column s of every tile, for all tiles at once (stride-4 views), mixed by B^T ...
    cols = np.stack([xp[:, :, s:s + W:4] for s in range(6)])           # (6, N, H+2, W/4, C)
    col_mix = (BT @ cols.reshape(6, -1)).reshape(cols.shape)           # (6_nu, N, H+2, W/4, C)
    # ... then row r of every tile, for all six column mixes at once.
    rows = np.stack([col_mix[:, :, r:r + H:4] for r in range(6)])      # (6, 6_nu, N, H/4, W/4, C)
    return (BT @ rows.reshape(6, -1)).reshape(rows.shape)             # (6_xi, 6_nu, N, H/4, W/4, C)


def winograd4_input_transform_backward(dV, x_shape):
    """Adjoint of ``winograd4_input_transform``: dV (6, 6, N, H/4, W/4, C) -> dx (N, H, W, C).
    Neighbouring tiles share two rows or columns; their gradients add there."""
    N, H, W, C = x_shape
    B = WINOGRAD4_BT.T.astype(dV.dtype)
    d_rows = (B @ dV.reshape(6, -1)).reshape(dV.shape)                 # (6_r, 6_nu, N, H/4, W/4, C)
    d_col_mix = np.zeros((6, N, H + 2, W // 4, C), dtype=dV.dtype)
    for r in range(6):
        d_col_mix[:, :, r:r + H:4] += d_rows[r]
    d_cols = (B @ d_col_mix.reshape(6, -1)).reshape(d_col_mix.shape)    # (6_s, N, H+2, W/4, C)
    dxp = np.zeros((N, H + 2, W + 2, C), dtype=dV.dtype)
    for s in range(6):
        dxp[:, :, s:s + W:4] += d_cols[s]
    return dxp[:, 1:-1, 1:-1, :]


def winograd4_output_transform(M):
    """A^T m A of every 6x6 tile of products: M (6, 6, ...) -> Y (4, 4, ...), Y[a, b] the
    output pixel (4ty + a, 4tx + b)."""
    AT = WINOGRAD4_AT.astype(M.dtype)
    rest = M.shape[2:]
    row_mix = (AT @ M.reshape(6, -1)).reshape(4, 6, -1)                # (4_a, 6_nu, tiles * O)
    Y = np.empty((4, 4, row_mix.shape[2]), dtype=M.dtype)
    for a in range(4):
        np.matmul(AT, row_mix[a], out=Y[a])                             # (4_b, tiles * O)
    return Y.reshape((4, 4) + rest)


def winograd4_output_transform_backward(dY):
    """Adjoint of ``winograd4_output_transform``: dY (4, 4, ...) -> dM (6, 6, ...) = A dY A^T."""
    A = WINOGRAD4_AT.T.astype(dY.dtype)
    rest = dY.shape[2:]
    d_row_mix = np.empty((4, 6, math.prod(rest)), dtype=dY.dtype)
    for a in range(4):
        np.matmul(A, dY[a].reshape(4, -1), out=d_row_mix[a])            # (6_nu, tiles * O)
    return (A @ d_row_mix.reshape(4, -1)).reshape((6, 6) + rest)


def winograd4_pool_blocks(Y):
    """The 2x2 pool's blocks in a 4x4 output tile, as a view: Y (4, 4, N, T, S, O) ->
    (2, 2, 2, 2, N, T, S, O) indexed [a_lo, b_lo, a_hi, b_hi] (``pool_blocks_forward``'s
    members first; the pooled pixel is (2ty + a_hi, 2tx + b_hi))."""
    return Y.reshape((2, 2, 2, 2) + Y.shape[2:]).transpose(1, 3, 0, 2, 4, 5, 6, 7)


# --------------------------------------------------------------------------
# One convolution of a configurable backbone, on one micro-batch
# --------------------------------------------------------------------------
#
# The method's two blocks have the fused kernels above. A configurable backbone
# (cnn_rnn_numpy.CNNRNN with other widths, more convolutions per block, or
# BatchNorm) chains convolutions described by ConvLayer, each computed by
# ``conv_layer_forward``: the same kernels (im2col in pool order, Winograd, and
# the pooling of four contiguous blocks), so a pooled convolution followed by a
# ReLU computes exactly what conv_relu_pool_forward / winograd_relu_pool_forward
# compute. What differs is what may follow the convolution: no pool (the
# further convolutions of a block run on the pooled map), and no ReLU when a
# BatchNorm comes first (the BatchNorm needs the statistics of the whole batch,
# so it runs outside the micro-batches: cnn_rnn_numpy.backbone_forward).

@dataclass(frozen=True)
class ConvLayer:
    """One 3x3 convolution (padding 1) of a backbone and what follows it, for ``conv_layer_forward``.

    - k: its number; its parameters are convK_W (O, C, 3, 3), convK_b (O,) and, with bn,
      bnK_gamma, bnK_beta, bnK_mean, bnK_var (O,)
    - pool: a 2x2 max-pool follows the convolution (the first convolution of each block)
    - bn: a BatchNorm follows (after the pool), then the ReLU; without it the ReLU follows at once
    - winograd: computed by Winograd rather than im2col (the map's sides must be divisible by tile)
    - tile: with winograd, F(2x2, 3x3) (2) or F(4x4, 3x3) (4)
    - chunk_scale: its micro-batches hold chunk_scale x CONV_CHUNK images. Small maps take larger
      micro-batches: at 8x8 and 4x4 the matrix products of 16 images are too small to run at
      BLAS speed (cnn_rnn_numpy.backbone_layers gives the timings)
    """
    k: int
    pool: bool
    bn: bool
    winograd: bool
    tile: int = 2
    chunk_scale: int = 1


def conv_layer_weights(w, winograd, tile=2):
    """The form of the weights w (O, C, 3, 3) the kernel multiplies by, made once per step for all
    micro-batches: Winograd's transformed kernels U (P, P, C, O), P = tile + 2, or the im2col
    matrix (9C, O)."""
    return winograd_kernel_transform(w, tile) if winograd else conv_weight_matrix(w)


def conv_layer_forward(x, w, wt, b, layer, relu):
    """conv3x3 -> [2x2 max-pool] -> + bias -> [ReLU] on one micro-batch.

    The bias is added after the pool (the same for the four members of a window, so it commutes
    with the maximum) and ReLU commutes with max-pooling: with pool and relu this is
    conv -> ReLU -> pool, the ops of ``conv_relu_pool_forward`` (im2col) or
    ``winograd_relu_pool_forward`` (Winograd) in the same order, hence the same bits.

    Inputs:
    - x: (n, H, W, C) NHWC; H and W even for a pool or Winograd
    - w: (O, C, 3, 3) the weights; wt: ``conv_layer_weights(w, layer.winograd)``
    - b: (O,)
    - layer: a ConvLayer (uses pool and winograd)
    - relu: apply the ReLU (False when a BatchNorm follows)

    Returns a tuple of:
    - out: (n, H/2, W/2, O) with a pool, else (n, H, W, O)
    - cache: for ``conv_layer_backward``
    """
    n, H, W, C = x.shape
    O = w.shape[0]
    if (layer.pool or layer.winograd) and (H % 2 or W % 2):
        raise ValueError(f'conv{layer.k} needs a map with even sides (for its pool or Winograd), got {H}x{W}; '
                         f'give images whose side is 32 or 32 / 2**j')
    if layer.winograd and layer.tile == 4:
        if H % 4 or W % 4:
            raise ValueError(f'conv{layer.k} runs Winograd F(4x4, 3x3), which needs map sides divisible by 4, '
                             f'got {H}x{W}')
        core = winograd4_input_transform(x)                                 # V (6, 6, n, H/4, W/4, C)
        y = winograd4_output_transform(winograd_products(core, wt))         # (4, 4, n, H/4, W/4, O)
        winner = None
        if layer.pool:     # the pool's blocks are a view of the tiles; the pooled pixels back in order
            z, winner = pool_blocks_forward(winograd4_pool_blocks(y))      # (2, 2, n, H/4, W/4, O)
            z = z.transpose(2, 3, 0, 4, 1, 5).reshape(n, H // 2, W // 2, O)
        else:
            z = y.transpose(2, 3, 0, 4, 1, 5).reshape(n, H, W, O)
    else:
        if layer.winograd:
            core = winograd_input_transform(x)                              # V (4, 4, n, H/2, W/2, C)
            z = winograd_output_transform(winograd_products(core, wt))      # (2, 2, n, H/2, W/2, O)
            if not layer.pool:     # the four members of every 2x2 output tile back to their pixels
                z = z.transpose(2, 3, 0, 4, 1, 5).reshape(n, H, W, O)
        else:
            core = im2col_3x3(x, pool_order=layer.pool)                     # cols (n*H*W, 9C)
            z = (core @ wt).reshape((2, 2, n, H // 2, W // 2, O) if layer.pool else (n, H, W, O))
        winner = None
        if layer.pool:
            z, winner = pool_blocks_forward(z)
    z += b
    if relu:
        np.maximum(z, 0, out=z)
    return z, (core, winner, z if relu else None, w, wt, x.shape, layer)


def conv_layer_backward(dout, cache, need_dx=True):
    """Backward pass of ``conv_layer_forward``.

    Inputs:
    - dout: the shape of its out
    - need_dx: False skips the input gradient (the image's, which nobody uses)

    Returns a tuple of:
    - dx: (n, H, W, C), or None when need_dx is False
    - dweights: dU (P, P, C, O) for Winograd (summed over micro-batches,
      ``winograd_kernel_transform_backward`` turns it into dw once), else dw (O, C, 3, 3)
    - db: (O,)
    """
    core, winner, relu_out, w, wt, x_shape, layer = cache
    n, H, W, C = x_shape
    O = w.shape[0]
    dz = dout * (relu_out > 0) if relu_out is not None else dout
    db = dz.reshape(-1, O).sum(axis=0)
    if layer.winograd and layer.tile == 4:
        T, S = H // 4, W // 4
        if layer.pool:     # each pooled pixel's gradient to its winner, written straight into dY's tiles
            dy = np.empty((4, 4, n, T, S, O), dtype=dz.dtype)
            pooled = dz.reshape(n, T, 2, S, 2, O).transpose(2, 4, 0, 1, 3, 5)      # [a_hi, b_hi, n, ty, tx]
            pool_blocks_backward(pooled, winner, out=winograd4_pool_blocks(dy))
        else:
            dy = dz.reshape(n, T, 4, S, 4, O).transpose(2, 4, 0, 1, 3, 5)          # [a, b, n, ty, tx]
        dV, dU = winograd_products_backward(winograd4_output_transform_backward(dy), core, wt, need_dV=need_dx)
        return (winograd4_input_transform_backward(dV, x_shape) if need_dx else None), dU, db
    if layer.pool:
        dz = pool_blocks_backward(dz, winner)                               # (2, 2, n, H/2, W/2, O)
    if layer.winograd:
        if not layer.pool:
            dz = dz.reshape(n, H // 2, 2, W // 2, 2, O).transpose(2, 4, 0, 1, 3, 5)
        dV, dU = winograd_products_backward(winograd_output_transform_backward(dz), core, wt, need_dV=need_dx)
        return (winograd_input_transform_backward(dV, x_shape) if need_dx else None), dU, db
    dw = conv_weight_grad(core, dz.reshape(-1, O), w.shape)                 # rows in the order of cols
    dx = None
    if need_dx:
        if layer.pool:     # back to plain (n, y, x) order for col2im, as conv_relu_pool_backward does
            dz = dz.transpose(2, 3, 0, 4, 1, 5)
        dx = col2im_3x3(input_grad_taps(dz.reshape(n * H * W, O), w), x_shape)
    return dx, dw, db


# --------------------------------------------------------------------------
# How many worker threads: the CPUs this process may use
# --------------------------------------------------------------------------

THREADS_ENV = 'CNNRNN_THREADS'           # a positive integer overrides usable_cpus()
CGROUP_ROOT = '/sys/fs/cgroup'           # where the cgroup file systems are mounted
PROC_SELF_CGROUP = '/proc/self/cgroup'   # which cgroup this process is in


class ThreadSettingError(ValueError):
    """A bad thread count (CNNRNN_THREADS or an argument); the message names the fix."""


def _read_text(path):
    """The stripped text of a small file, or None when it cannot be read (no file: no limit)."""
    try:
        return Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _cgroup_folders(root, membership):
    """Every cgroup folder whose CPU quota applies to this process: its own and its ancestors.

    membership: the text of /proc/self/cgroup, lines 'id:controllers:path'
    ('0::path' for cgroup v2, a list with 'cpu' for the v1 cpu controller).
    Inside a container the process's own cgroup is usually the mount's root, and
    the path in /proc may name a folder the container cannot see: missing folders
    are skipped, and the mount roots are always looked at.
    """
    v2_paths, v1_paths = ['/'], ['/']
    for line in (membership or '').splitlines():
        parts = line.split(':', 2)
        if len(parts) == 3 and parts[1] == '':
            v2_paths.append(parts[2])
        elif len(parts) == 3 and 'cpu' in parts[1].split(','):
            v1_paths.append(parts[2])
    mounts = [(root, v2_paths), (root / 'cpu', v1_paths), (root / 'cpu,cpuacct', v1_paths)]
    folders = []
    for mount, paths in mounts:
        for path in paths:
            names = [p for p in PurePosixPath(path).parts if p not in ('/', '.', '..')]
            for k in range(len(names) + 1):       # the cgroup, then each ancestor up to the mount
                folder = mount.joinpath(*names[:k])
                if folder not in folders:
                    folders.append(folder)
    return folders


def _quota_of(folder):
    """The CPU quota set on one cgroup folder, as a Fraction of CPUs; None for no quota.

    cgroup v2: cpu.max holds 'QUOTA PERIOD' or 'max PERIOD' (microseconds).
    cgroup v1: cpu.cfs_quota_us (-1 for none) over cpu.cfs_period_us.
    """
    v2 = _read_text(folder / 'cpu.max')
    if v2 is not None:
        fields = v2.split()
        quota, period = (fields + ['100000'])[:2] if fields else ('max', '')
    else:
        quota, period = _read_text(folder / 'cpu.cfs_quota_us'), _read_text(folder / 'cpu.cfs_period_us')
    try:
        quota, period = int(quota), int(period)
    except (TypeError, ValueError):          # 'max', a missing file, or garbage: no quota
        return None
    return Fraction(quota, period) if quota > 0 and period > 0 else None


def cgroup_cpu_limit(root=None, membership=None):
    """The CPUs a cgroup CPU quota allows this process, rounded up (at least 1); None without a quota.

    root: where the cgroup file systems are mounted (default CGROUP_ROOT);
    membership: the text of /proc/self/cgroup (default: read from PROC_SELF_CGROUP).
    A quota on the process's cgroup or any ancestor applies; the smallest wins.
    A quota of 1.5 CPUs gives 2: the threads then share what the quota allows.
    """
    root = Path(CGROUP_ROOT if root is None else root)
    if membership is None:
        membership = _read_text(PROC_SELF_CGROUP)
    quotas = [q for q in map(_quota_of, _cgroup_folders(root, membership)) if q is not None]
    return max(1, math.ceil(min(quotas))) if quotas else None


def usable_cpus():
    """The number of CPUs this process may use: its CPU affinity, capped by a cgroup CPU quota.

    Not ``os.cpu_count()``, the machine's count: under ``taskset``, a container
    quota or a sweep that gives each run a share, more threads than CPUs only
    wait for each other.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:                    # no affinity API (macOS, Windows)
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_limit()
    return max(1, min(cpus, quota) if quota is not None else cpus)


def worker_threads(environ=None):
    """The worker-thread count to use: CNNRNN_THREADS if set, else ``usable_cpus()``.

    environ: the environment to read (default os.environ). An empty value counts
    as unset. Raises ThreadSettingError (a ValueError) naming the variable and a
    good value when CNNRNN_THREADS is not a positive integer.
    """
    value = (os.environ if environ is None else environ).get(THREADS_ENV, '').strip()
    if not value:
        return usable_cpus()
    if not (value.isascii() and value.isdigit() and int(value) >= 1):
        raise ThreadSettingError(
            f'{THREADS_ENV}={value!r} is not a positive integer: set it to the number of worker '
            f'threads, e.g. {THREADS_ENV}={usable_cpus()} (the CPUs this process may use), or unset it')
    return int(value)


# --------------------------------------------------------------------------
# Running a batch on every core: micro-batches on worker threads
# --------------------------------------------------------------------------

# Worker threads; 1 runs everything in the calling thread. None until decided, by
# prepare_process_for_training() or at first use (thread_count()).
THREADS = None
CONV_CHUNK = 16   # images per conv micro-batch; 16 timed best or tied against 32 and 64
_pools = {}       # thread count -> ThreadPoolExecutor, made once
_blas = []        # the threadpoolctl controller, made once


def thread_count():
    """THREADS, set from ``worker_threads()`` the first time it is needed.

    Decided once per process, so a run's result (which depends on how the
    batch is sliced) cannot change if the CPUs it may use change mid-run.
    """
    global THREADS
    if THREADS is None:
        THREADS = worker_threads()
    return THREADS


def map_on_threads(fn, items, threads=None):
    """``[fn(item) for item in items]``, spread over ``threads`` worker threads (default ``thread_count()``).

    Each worker carries one item from start to end with single-threaded BLAS,
    so the elementwise work (im2col, pooling, col2im), which NumPy runs on one
    core, is spread over the cores as well as the products. NumPy releases the
    GIL inside these operations. Results come back in the order of ``items``,
    so sums over them are deterministic.
    """
    threads = thread_count() if threads is None else threads
    items = list(items)
    if threads <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    if threads not in _pools:
        _pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix='cnnrnn')
    if not _blas:
        import threadpoolctl
        _blas.append(threadpoolctl.ThreadpoolController())
    with _blas[0].limit(limits=1, user_api='blas'):
        return list(_pools[threads].map(fn, items))


def sum_in_order(arrays):
    """Sum a list of equally shaped arrays left to right into a new array.

    A fixed order keeps float rounding, and so training runs, reproducible
    whatever thread finished first.
    """
    total = arrays[0].copy()
    for a in arrays[1:]:
        total += a
    return total


def batch_slices(N, parts):
    """``range(N)`` cut into at most ``parts`` contiguous, nearly equal slices."""
    edges = np.linspace(0, N, min(parts, N) + 1).astype(int)
    return [slice(a, b) for a, b in zip(edges[:-1], edges[1:])]


def conv_stack_forward(x, p, chunk=None):
    """The two conv blocks over a batch, in micro-batches of ``chunk`` images on the workers.

    Inputs:
    - x: (N, 32, 32, 3) NHWC images
    - p: the model's params (conv1_W, conv1_b, conv2_W, conv2_b)

    Returns a tuple of:
    - fmap: (N, 8, 8, 64) the pooled map
    - caches: one (cache1, cache2) per micro-batch
    """
    chunk = chunk or CONV_CHUNK
    U2 = winograd_kernel_transform(p['conv2_W'])      # (4, 4, 64, 64), once for all micro-batches

    def blocks(s):
        r1, c1 = conv_relu_pool_forward(x[s:s + chunk], p['conv1_W'], p['conv1_b'])   # (n,16,16,64)
        r2, c2 = winograd_relu_pool_forward(r1, U2, p['conv2_b'])                      # (n,8,8,64)
        return r2, (c1, c2)
    results = map_on_threads(blocks, range(0, x.shape[0], chunk))
    return np.concatenate([r2 for r2, _ in results]), [c for _, c in results]


def conv_stack_backward(dmap, caches, input_grad=False, chunk=None):
    """Backward through the conv blocks, micro-batch by micro-batch.

    Inputs:
    - dmap: (N, 8, 8, 64) gradient of the pooled map
    - caches: from ``conv_stack_forward``
    - input_grad: also compute the gradient with respect to the input
    - chunk: the micro-batch size the forward pass used

    Returns a tuple of:
    - grads: dict with conv1_W, conv1_b, conv2_W, conv2_b, summed over micro-batches
    - dx: (N, 32, 32, 3), or None without input_grad
    """
    chunk = chunk or CONV_CHUNK

    def blocks(i):
        c1, c2 = caches[i]
        dr1, dU2, db2 = winograd_relu_pool_backward(dmap[i * chunk:(i + 1) * chunk], c2)
        dx, dw1, db1 = conv_relu_pool_backward(dr1, c1, need_dx=input_grad)
        return dx, {'conv1_W': dw1, 'conv1_b': db1, 'conv2_U': dU2, 'conv2_b': db2}
    results = map_on_threads(blocks, range(len(caches)))
    grads = {name: sum_in_order([g[name] for _, g in results]) for name in results[0][1]}
    # The kernel transform is linear: transform the summed dU back once.
    grads['conv2_W'] = winograd_kernel_transform_backward(grads.pop('conv2_U'))
    return grads, (np.concatenate([dx for dx, _ in results]) if input_grad else None)


# --------------------------------------------------------------------------
# Process-wide settings for training (applied only when asked)
# --------------------------------------------------------------------------

def keep_freed_memory_for_reuse():
    """Ask glibc's malloc to keep freed memory in the process instead of returning it to the OS.

    Why: a training step allocates and frees the same large arrays (im2col
    matrices, Winograd tiles, activations: 1-30 MB each) every step. By
    default glibc hands blocks like these back to the kernel when they are
    freed (munmap, heap trimming, one heap per worker thread), so the next
    step's arrays arrive as fresh pages that the kernel must fault in and
    zero: about 28,000 page faults and 110 ms of system time per step at
    batch 256 on 2 cores. With these settings the freed memory is reused:
    under 100 faults per step, and the step ran 2.5x-3.4x faster in three
    repeats (``benchmarks/page_faults.py``; README, "Benchmarks"). Memory use
    stays at the step's peak.

    The settings: one malloc arena for all threads (M_ARENA_MAX = 1), blocks up
    to 32 MB from the heap rather than from mmap (M_MMAP_THRESHOLD, 32 MB is
    glibc's ceiling), and no trimming of the heap below 1 GB of free space
    (M_TRIM_THRESHOLD). A no-op where the C library is not glibc.
    Returns True when the settings were applied.
    """
    try:
        mallopt = ctypes.CDLL('libc.so.6').mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8     # from glibc's malloc.h
    return all([mallopt(M_ARENA_MAX, 1), mallopt(M_MMAP_THRESHOLD, 32 << 20),
                mallopt(M_TRIM_THRESHOLD, 1 << 30)])


@dataclass(frozen=True)
class ProcessSettings:
    """What ``prepare_process_for_training`` did, for the training log."""
    threads: int             # worker threads (THREADS)
    threads_from: str        # 'argument', 'CNNRNN_THREADS' or 'usable CPUs'
    usable_cpus: int         # affinity capped by the cgroup quota
    blas_threads: dict       # BLAS / OpenMP library (threadpoolctl's prefix) -> its thread limit now
    allocator_tuned: bool    # glibc keeps freed memory for reuse

    def __str__(self):
        blas = ', '.join(f'{name} {n}' for name, n in self.blas_threads.items()) or 'none found'
        return (f'{self.threads} worker thread{"s" * (self.threads != 1)} (from {self.threads_from}; '
                f'this process may use {self.usable_cpus} CPUs), BLAS threads: {blas}, '
                f'allocator keeps freed memory: {"yes" if self.allocator_tuned else "no (not glibc)"}')


_process_blas_limit = []    # the threadpoolctl limiter prepare_process_for_training set, kept alive


def prepare_process_for_training(threads=None):
    """Apply the process-wide settings a training run wants; returns what it did (ProcessSettings).

    This changes settings of the whole process, not just of this module, so it
    is a call of its own, made where training starts (importing the model
    changes nothing):
    - the worker-thread count THREADS: ``threads`` if given, else
      ``worker_threads()`` (CNNRNN_THREADS, or the CPUs this process may use);
    - the C allocator keeps freed memory for reuse (``keep_freed_memory_for_reuse``):
      2.5x-3.4x faster steps where the step's large arrays would otherwise be
      faulted in afresh every step. Call this before the first step, while no
      worker thread exists, so that no thread gets a malloc arena of its own;
    - BLAS (and OpenMP) libraries use at most THREADS threads
      (``threadpoolctl.threadpool_limits``): by default they take every CPU of
      the machine, which oversubscribes a process given fewer. Inside the
      workers BLAS runs single-threaded anyway (``map_on_threads``).

    Raises ThreadSettingError (a ValueError) for a bad ``threads`` or CNNRNN_THREADS.
    """
    global THREADS
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ThreadSettingError(f'threads must be a positive integer, got {threads!r}')
    source = 'argument' if threads is not None else (
        THREADS_ENV if os.environ.get(THREADS_ENV, '').strip() else 'usable CPUs')
    THREADS = threads if threads is not None else worker_threads()
    tuned = keep_freed_memory_for_reuse()
    import threadpoolctl
    _process_blas_limit[:] = [threadpoolctl.threadpool_limits(limits=THREADS)]
    blas = {i['prefix']: i['num_threads'] for i in threadpoolctl.threadpool_info()}
    return ProcessSettings(threads=THREADS, threads_from=source, usable_cpus=usable_cpus(),
                           blas_threads=blas, allocator_tuned=tuned)
