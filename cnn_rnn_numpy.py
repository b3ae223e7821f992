"""A CNN+RNN image classifier for CIFAR-10, forward and backward, in NumPy.

Architecture (one image of shape (3, 32, 32)):

    conv1 3x3, 3->64, pad 1  -> ReLU -> 2x2 max-pool   (64, 16, 16)
    conv2 3x3, 64->64, pad 1 -> ReLU -> 2x2 max-pool   (64, 8, 8)
    read the 8x8x64 map as a sequence                  (T, D)
        'pixels': T=64 steps (row-major positions), D=64 channels
        'rows':   T=8 steps (one per row),          D=512 = 8 cols x 64 channels
        'flat':   T=1 step (the whole map),         D=4096 (no recurrence: a pure CNN)
    a tanh RNN (or GRU, LSTM), H=128 units, h_0 = 0    h_T (128,)
    affine H->10, softmax cross-entropy

Every layer is a pair of functions in the CS231n style: ``*_forward`` returns
``(out, cache)`` and ``*_backward`` takes the upstream gradient and the cache
and returns the gradients. ``CNNRNN.loss`` chains them.

Internal layout. Images enter the model as NCHW (the archive's own order) but
every convolutional layer works in NHWC: with channels last, the 64 channels of
one pixel are contiguous, so

* im2col is a strided *view* of the padded input (no index arithmetic) and a
  single copy turns it into the (N*H*W, 9*C) matrix that BLAS multiplies;
* the conv output ``cols @ W`` already comes out as NHWC, no transpose;
* both sequence layouts are free reshapes of the pooled NHWC map:
  (N, 8, 8, 64) -> (N, 64, 64) for 'pixels', -> (N, 8, 512) for 'rows'.

conv1 runs as im2col + one matrix product (``conv_relu_pool_forward``); conv2,
with 64 input channels and three quarters of the arithmetic, runs as
Winograd's F(2x2, 3x3) (``winograd_relu_pool_forward``), which computes the
same convolution with 2.25x fewer multiply-adds. ``conv3x3_forward`` is the
plain layer both are tested against.

The public parameter shapes stay those of common frameworks (conv weights
``(O, I, kH, kW)``, cross-correlation); the README lists them.
"""
import ctypes
import json
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from data_utils import NUM_CLASSES
from runfiles import RunFileError, read_npz, write_npz

FORMAT_VERSION = 1
# How the pooled 8x8x64 map is read: 64 steps of 64 channels, 8 steps of one
# row each, or 'flat', the whole map as one step (with h_0 = 0 the cell is then
# one hidden layer and W_hh is never read: the pure-CNN baseline).
SEQ_LAYOUTS = ('pixels', 'rows', 'flat')
MODEL_DTYPES = ('float32', 'float64')   # float32 to train, float64 for gradient checks
RNN_INITS = ('xavier', 'orthogonal')
# Recurrent cells and the number of gate blocks in their W_xh, W_hh and b_h.
CELL_GATES = {'rnn': 1, 'gru': 3, 'lstm': 4}
CELLS = tuple(CELL_GATES)
# Parameters that carry L2 weight decay (biases are not decayed).
DECAYED_PARAMS = ('conv1_W', 'conv2_W', 'W_xh', 'W_hh', 'W_ho')


class ModelFileError(RunFileError):
    """A model or checkpoint file that cannot be loaded; the message says why and what to do."""


# --------------------------------------------------------------------------
# Convolution (3x3, stride 1, padding 1) via im2col / col2im, NHWC
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


def pool_blocks_backward(dout, winner):
    """Backward pass of ``pool_blocks_forward``.

    Inputs:
    - dout: (...) gradient of the window maxima
    - winner: (...) int8 from the forward pass

    Returns:
    - dblocks: (2, 2, ...) with each dout value at its window's winner, zeros elsewhere
    """
    dblocks = np.empty((2, 2) + dout.shape, dtype=dout.dtype)
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


def maxpool2x2_forward(x):
    """2x2 max-pooling with stride 2.

    Inputs:
    - x: (N, H, W, C) with H and W even

    Returns a tuple of:
    - out: (N, H/2, W/2, C)
    - cache: (winner, x.shape), see ``pool_blocks_forward``
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


def winograd_kernel_transform(w):
    """The transformed kernels U = G g G^T of every (output, input) channel pair.

    Inputs:
    - w: (O, C, 3, 3) conv weights (framework order)

    Returns:
    - U: (4, 4, C, O), U[xi, nu] the (C, O) matrix of tile position (xi, nu)
    """
    G = WINOGRAD_G.astype(w.dtype)
    Gw = np.tensordot(G, w, axes=([1], [2]))            # (4, O, C, 3): G applied to kernel rows
    U = np.tensordot(Gw, G, axes=([3], [1]))            # (4, O, C, 4): and to kernel columns
    return np.ascontiguousarray(U.transpose(0, 3, 2, 1))


def winograd_kernel_transform_backward(dU):
    """Adjoint of ``winograd_kernel_transform``: dU (4, 4, C, O) -> dw (O, C, 3, 3) = G^T dU G."""
    G = WINOGRAD_G.astype(dU.dtype)
    Gt_dU = np.tensordot(G, dU, axes=([0], [0]))        # (3, 4, C, O)
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
    """The 16 matrix products of F(2x2, 3x3), one per tile position.

    Inputs:
    - V: (4, 4, ..., C) transformed input tiles
    - U: (4, 4, C, O) transformed kernels

    Returns:
    - M: (4, 4, ..., O), M[xi, nu] = V[xi, nu] @ U[xi, nu] over the tile axes
    """
    C, O = U.shape[2:]
    M = np.matmul(V.reshape(16, -1, C), U.reshape(16, C, O))      # (16, tiles, O)
    return M.reshape(V.shape[:-1] + (O,))


def winograd_products_backward(dM, V, U, need_dV=True):
    """Backward of ``winograd_products``: dM (4, 4, ..., O) -> (dV (4, 4, ..., C) or None, dU (4, 4, C, O))."""
    C, O = U.shape[2:]
    dM16 = dM.reshape(16, -1, O)
    dU = np.matmul(V.reshape(16, -1, C).transpose(0, 2, 1), dM16).reshape(4, 4, C, O)
    dV = None
    if need_dV:
        # U^T made contiguous first: OpenBLAS multiplies by a transposed view ~1.5x slower.
        U_T = np.ascontiguousarray(U.reshape(16, C, O).transpose(0, 2, 1))
        dV = np.matmul(dM16, U_T).reshape(V.shape)
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
# Feature map <-> sequence
# --------------------------------------------------------------------------

def sequence_length_and_size(layout, rows=8, cols=8, channels=64):
    """(T, D) of the sequence read from a (rows, cols, channels) map.

    'pixels': (rows*cols, channels); 'rows': (rows, cols*channels);
    'flat': (1, rows*cols*channels), the whole map as a single step.
    """
    if layout == 'pixels':
        return rows * cols, channels
    if layout == 'rows':
        return rows, cols * channels
    if layout == 'flat':
        return 1, rows * cols * channels
    raise ValueError(f'unknown sequence layout {layout!r}; use one of {SEQ_LAYOUTS}')


def map_to_sequence(F, layout):
    """Read a pooled feature map as a sequence.

    Inputs:
    - F: (N, R, Cc, K) NHWC map (R rows, Cc columns, K channels)
    - layout: 'pixels' -> (N, R*Cc, K), step t = row*Cc + col, features = channels;
              'rows'   -> (N, R, Cc*K), step t = row, features ordered col*K + channel;
              'flat'   -> (N, 1, R*Cc*K), one step, features ordered
                          row*Cc*K + col*K + channel.

    Returns:
    - x: (N, T, D). With NHWC every layout is a reshape of the same memory.
    """
    N, R, Cc, K = F.shape
    T, D = sequence_length_and_size(layout, R, Cc, K)
    return F.reshape(N, T, D)


def sequence_to_map(dx, layout, map_shape):
    """Inverse of ``map_to_sequence`` for the backward pass: (N, T, D) -> (N, R, Cc, K)."""
    sequence_length_and_size(layout)  # validates the layout name
    return dx.reshape(map_shape)


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


def rnn_backward(dh_T, cache):
    """Backpropagation through time for ``rnn_forward``.

    Inputs:
    - dh_T: (N, H) gradient of the loss with respect to the last hidden state

    Returns a tuple of:
    - dx: (N, T, D), dW_xh: (D, H), dW_hh: (H, H), db_h: (H,)
    """
    x_tm, hs, W_xh, W_hh = cache
    T, N, D = x_tm.shape
    H = W_hh.shape[0]
    # da[t] is the gradient at the pre-activation of step t+1; the loop only
    # carries dh backwards, the weight gradients are then single products.
    da = np.empty((T, N, H), dtype=dh_T.dtype)
    dh = dh_T
    W_hh_T = W_hh.T
    for t in range(T - 1, -1, -1):
        h = hs[t + 1]
        np.multiply(dh, 1 - h * h, out=da[t])   # tanh' = 1 - tanh^2
        flush_tiny(da[t])
        dh = da[t] @ W_hh_T
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


def gru_backward(dh_T, cache):
    """Backpropagation through time for ``gru_forward``.

    Inputs:
    - dh_T: (N, H) gradient of the loss with respect to the last hidden state

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


def lstm_backward(dh_T, cache):
    """Backpropagation through time for ``lstm_forward``.

    Inputs:
    - dh_T: (N, H) gradient of the loss with respect to the last hidden state

    Returns a tuple of:
    - dx: (N, T, D), dW_xh: (D, 4H), dW_hh: (H, 4H), db_h: (4H,)
    """
    x_tm, hs, cs, tanh_cs, gates, W_xh, W_hh = cache
    T, N, D = x_tm.shape
    H = W_hh.shape[0]
    # da[t] is the gradient at the pre-activations a of step t+1 (blocks
    # i, f, g, o); the loop carries only dh and dc backwards.
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
    da2 = da.reshape(T * N, 4 * H)
    dW_hh = hs[:-1].reshape(T * N, H).T @ da2
    dW_xh = x_tm.reshape(T * N, D).T @ da2
    db_h = da2.sum(axis=0)
    dx = (da2 @ W_xh.T).reshape(T, N, D).transpose(1, 0, 2)
    return dx, dW_xh, dW_hh, db_h


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
# Running a batch on every core: micro-batches on worker threads
# --------------------------------------------------------------------------

THREADS = os.cpu_count() or 1   # worker threads; 1 runs everything in the calling thread
CONV_CHUNK = 16                 # images per conv micro-batch; 16 timed best or tied against 32 and 64
_pools = {}                     # thread count -> ThreadPoolExecutor, made once
_blas = []                      # the threadpoolctl controller, made once


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


# A process-wide setting, made when the model is imported: before any worker
# thread exists, so that no thread gets an arena of its own.
MALLOC_TUNED = keep_freed_memory_for_reuse()


def map_on_threads(fn, items, threads=None):
    """``[fn(item) for item in items]``, spread over ``threads`` worker threads.

    Each worker carries one item from start to end with single-threaded BLAS,
    so the elementwise work (im2col, pooling, col2im), which NumPy runs on one
    core, is spread over the cores as well as the products. NumPy releases the
    GIL inside these operations. Results come back in the order of ``items``,
    so sums over them are deterministic.
    """
    threads = THREADS if threads is None else threads
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


def cell_forward(x, p, cell):
    """Run one recurrent cell over x (N, T, D) with the model's params p -> (h_T, cache)."""
    if cell == 'gru':
        return gru_forward(x, p['W_xh'], p['W_hh'], p['b_h'], p['b_hn'])
    if cell == 'lstm':
        return lstm_forward(x, p['W_xh'], p['W_hh'], p['b_h'])
    return rnn_forward(x, p['W_xh'], p['W_hh'], p['b_h'])


def cell_backward(dh_T, cache, cell):
    """Backward of ``cell_forward`` -> (dx (N, T, D), {name: gradient} of the cell's params)."""
    backward = {'rnn': rnn_backward, 'gru': gru_backward, 'lstm': lstm_backward}[cell]
    dx, *dparams = backward(dh_T, cache)
    names = ('W_xh', 'W_hh', 'b_h', 'b_hn')[:len(dparams)]
    return dx, dict(zip(names, dparams))


def recurrent_forward(seq, p, cell='rnn'):
    """``cell_forward`` on one slice of the batch per worker thread.

    The recurrence is sequential in time but independent across images, so
    splitting the batch lets its 64 (or 8) small steps run on every core.
    seq: (N, T, D) -> h_T (N, H), caches.
    """
    slices = batch_slices(seq.shape[0], THREADS)
    results = map_on_threads(lambda s: cell_forward(seq[s], p, cell), slices)
    return np.concatenate([h for h, _ in results]), (slices, [c for _, c in results])


def recurrent_backward(dh_T, caches, cell='rnn'):
    """BPTT per slice on the worker threads.

    dh_T: (N, H). Returns grads (the cell's params, summed over slices) and dx (N, T, D).
    """
    slices, slice_caches = caches
    results = map_on_threads(lambda i: cell_backward(dh_T[slices[i]], slice_caches[i], cell),
                             range(len(slices)))
    grads = {name: sum_in_order([g[name] for _, g in results]) for name in results[0][1]}
    return grads, np.concatenate([dx for dx, _ in results])


# --------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------

class CNNRNN:
    """Two conv blocks, a recurrent cell over the feature map, a softmax head.

    Parameters (``self.params``), H = hidden, D = 64 ('pixels'), 512 ('rows') or 4096 ('flat'),
    G = the cell's gate blocks (1 'rnn', 3 'gru', 4 'lstm'):
      conv1_W (64, 3, 3, 3), conv1_b (64,), conv2_W (64, 64, 3, 3), conv2_b (64,),
      W_xh (D, G*H), W_hh (H, G*H), b_h (G*H,), b_hn (H,) for 'gru' only,
      W_ho (H, 10), b_o (10,)
    """

    channels = 64

    def __init__(self, seq_layout='pixels', hidden=128, reg=5e-4, seed=0,
                 dtype=np.float32, rnn_init='orthogonal', cell='rnn'):
        if seq_layout not in SEQ_LAYOUTS:
            raise ValueError(f'unknown sequence layout {seq_layout!r}; use one of {SEQ_LAYOUTS}')
        if cell not in CELLS:
            raise ValueError(f'unknown cell {cell!r}; use one of {CELLS}')
        if rnn_init not in RNN_INITS:
            raise ValueError(f'unknown rnn_init {rnn_init!r}; use one of {RNN_INITS}')
        if int(hidden) < 1:
            raise ValueError(f'hidden must be a positive integer, got {hidden}')
        if reg < 0:
            raise ValueError(f'reg must be >= 0, got {reg}')
        if np.dtype(dtype).name not in MODEL_DTYPES:
            raise ValueError(f'dtype must be one of {MODEL_DTYPES}, got {np.dtype(dtype).name}')
        self.seq_layout = seq_layout
        self.hidden = int(hidden)
        self.reg = float(reg)
        self.seed = int(seed)
        self.dtype = np.dtype(dtype)
        self.rnn_init = rnn_init
        self.cell = cell
        self.params = self._init_params(np.random.default_rng(self.seed))

    # ---- configuration -------------------------------------------------
    def config(self):
        """The constructor arguments, JSON-serialisable."""
        return {'seq_layout': self.seq_layout, 'hidden': self.hidden, 'reg': self.reg,
                'seed': self.seed, 'dtype': self.dtype.name, 'rnn_init': self.rnn_init,
                'cell': self.cell}

    def param_shapes(self):
        """Expected shape of every parameter, keyed like ``params``."""
        C, H = self.channels, self.hidden
        G = CELL_GATES[self.cell]
        _, D = sequence_length_and_size(self.seq_layout, 8, 8, C)
        shapes = {'conv1_W': (C, 3, 3, 3), 'conv1_b': (C,),
                  'conv2_W': (C, C, 3, 3), 'conv2_b': (C,),
                  'W_xh': (D, G * H), 'W_hh': (H, G * H), 'b_h': (G * H,),
                  'W_ho': (H, NUM_CLASSES), 'b_o': (NUM_CLASSES,)}
        if self.cell == 'gru':
            shapes['b_hn'] = (H,)     # the recurrent bias of the candidate, inside r * (...)
        return shapes

    def _init_params(self, rng):
        """He for the convolutions, Xavier for W_xh (per gate block) and W_ho,
        orthogonal (or Xavier, per rnn_init) for each H x H block of W_hh,
        zero biases except the LSTM's forget gate (1, so c_t is kept at first)."""
        shapes = self.param_shapes()
        H, G = self.hidden, CELL_GATES[self.cell]
        p = {}
        # He initialisation for the ReLU convolutions: std = sqrt(2 / fan_in).
        for name in ('conv1_W', 'conv2_W'):
            O, I, kh, kw = shapes[name]
            p[name] = rng.standard_normal(shapes[name]) * np.sqrt(2.0 / (I * kh * kw))
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
                p[name] = np.zeros(shapes[name])
        if self.cell == 'lstm':
            p['b_h'][H:2 * H] = 1.0       # gate order i, f, g, o
        return {k: np.ascontiguousarray(v, dtype=self.dtype) for k, v in p.items()}

    # ---- forward / backward --------------------------------------------
    def _forward(self, X):
        """Forward pass up to the logits, keeping the caches for backward.

        X: (N, 3, 32, 32) images. Returns logits (N, 10), h_T (N, H), caches.
        """
        p = self.params
        x = np.asarray(X, dtype=self.dtype).transpose(0, 2, 3, 1)       # NCHW -> NHWC view
        fmap, c_conv = conv_stack_forward(x, p)                          # (N,8,8,64)
        seq = map_to_sequence(fmap, self.seq_layout)                     # (N,T,D)
        h_T, c_rnn = recurrent_forward(seq, p, self.cell)                # (N,H)
        logits, c_out = affine_forward(h_T, p['W_ho'], p['b_o'])         # (N,10)
        return logits, h_T, (c_conv, fmap.shape, c_rnn, c_out)

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

        Returns a tuple of:
        - loss: mean (smoothed) cross-entropy + reg/2 * sum of squared decayed weights
        - grads: dict keyed like ``params``
        - details: {'logits', 'data_loss'}, only when details is True
        """
        p = self.params
        logits, _, (c_conv, map_shape, c_rnn, c_out) = self._forward(X)
        data_loss, dlogits = softmax_loss(logits, np.asarray(y), smoothing=label_smoothing)
        dh, dW_ho, db_o = affine_backward(dlogits, c_out)
        rnn_grads, dseq = recurrent_backward(dh, c_rnn, self.cell)
        conv_grads, dx = conv_stack_backward(sequence_to_map(dseq, self.seq_layout, map_shape), c_conv,
                                             input_grad=input_grad)
        grads = {**conv_grads, **rnn_grads, 'W_ho': dW_ho, 'b_o': db_o}

        reg_loss = 0.0
        for name in DECAYED_PARAMS:
            W = p[name]
            reg_loss += float(np.vdot(W, W))
            grads[name] += self.dtype.type(self.reg) * W
        loss = data_loss + 0.5 * self.reg * reg_loss
        grads = {k: grads[k].astype(self.dtype, copy=False) for k in p}
        if input_grad:
            grads['X'] = np.ascontiguousarray(dx.transpose(0, 3, 1, 2))   # NHWC -> NCHW
        if details:
            return loss, grads, {'logits': logits, 'data_loss': data_loss}
        return loss, grads

    def forward(self, X):
        """Logits for a batch. X: (N, 3, 32, 32) -> (N, 10)."""
        return self._forward(X)[0]

    def features(self, X):
        """Final RNN hidden states. X: (N, 3, 32, 32) -> h_T (N, H)."""
        return self._forward(X)[1]

    def predict_proba(self, X, batch_size=500, return_features=False):
        """Class probabilities, computed in batches to bound memory.

        Inputs:
        - X: (N, 3, 32, 32) images (float, or uint8 already normalised by the caller)
        - batch_size: images per forward pass

        Returns probs (N, 10), and h_T (N, H) too when return_features is True.
        """
        probs, feats = [], []
        for s in range(0, len(X), batch_size):
            logits, h_T, _ = self._forward(X[s:s + batch_size])
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
                    rnn_init=meta['rnn_init'], cell=meta['cell'])
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
    allowed = {'seq_layout': SEQ_LAYOUTS, 'rnn_init': RNN_INITS, 'cell': CELLS, 'dtype': MODEL_DTYPES}
    for key, values in allowed.items():
        if meta[key] not in values:
            return f'{key} = {meta[key]!r}, not one of {list(values)}'
    for key in ('hidden', 'seed'):
        if not isinstance(meta[key], int) or isinstance(meta[key], bool) or meta[key] < (key == 'hidden'):
            return f'{key} = {meta[key]!r} is not a{" positive" if key == "hidden" else " non-negative"} integer'
    reg = meta['reg']
    if not isinstance(reg, (int, float)) or isinstance(reg, bool) or not (0 <= reg < float('inf')):
        return f'reg = {reg!r} is not a finite number >= 0'
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
    version = meta.get('format_version')
    if version != FORMAT_VERSION:
        raise ModelFileError(f'{path} has format version {version!r}, this code reads version '
                             f'{FORMAT_VERSION}; retrain or use a matching version of the code')
    return meta
