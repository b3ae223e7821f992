"""Each convolution of a preset's backbone by Winograd tile and micro-batch size.

For every Winograd layer of the network (default: the 'deep' preset's; its widths,
convs_per_block, batchnorm, whiten), on random data of the layer's true shape
(batch --batch, default the preset's), this times the layer's forward and backward
(``fast_layers.conv_layer_forward`` / ``conv_layer_backward`` on micro-batches on the
worker threads, as ``cnn_rnn_numpy.backbone_forward`` runs a stage) for each Winograd
tile, F(2x2, 3x3) and F(4x4, 3x3) where the map allows it, and each micro-batch size
in --chunks (images), alternating the variants repeat by repeat so that all see the
same machine load. It prints each variant's median forward + backward time in ms
(min-max of the totals) and marks the one ``backbone_layers`` chooses
(``ConvLayer.tile``, ``CONV_CHUNK * chunk_scale``), so the choice can be checked on
any machine.

Usage:
    python benchmarks/conv_tiles.py [--preset deep] [--batch 512] [--chunks 16 32 64] [--repeats 5]
"""
import argparse
import sys
import time

import numpy as np

import repo_on_path  # noqa: F401  (the project's modules)
import config
import fast_layers
from cnn_rnn_numpy import IMAGE_SIDE, backbone_layers


def layer_shapes(preset):
    """[(ConvLayer, side, C, O)]: every Winograd convolution of the preset's backbone (a
    config.Config) with the side of its input map and its input and output channels."""
    in_channels = 2 * 3 * preset.whiten ** 2 if preset.whiten else 3
    layers = backbone_layers(preset.widths, preset.convs_per_block, preset.batchnorm,
                             in_channels=in_channels, large_tiles=True)
    shapes, side, inputs, i = [], IMAGE_SIDE, in_channels, 0
    for width in preset.widths:
        for j in range(preset.convs_per_block):
            layer = layers[i]
            if layer.winograd:
                shapes.append((layer, side, inputs, width))
            inputs, i = width, i + 1
            if j == 0:
                side //= 2
    return shapes


def time_variant(x, w, layer, chunk):
    """Seconds of one forward and one backward pass of ``layer`` over x in micro-batches of chunk."""
    b = np.zeros(w.shape[0], np.float32)
    t0 = time.perf_counter()
    wt = fast_layers.conv_layer_weights(w, True, layer.tile)
    results = fast_layers.map_on_threads(
        lambda start: fast_layers.conv_layer_forward(x[start:start + chunk], w, wt, b, layer, relu=False),
        range(0, x.shape[0], chunk))
    t1 = time.perf_counter()
    douts = [np.ones_like(out) for out, _ in results]
    t2 = time.perf_counter()
    fast_layers.map_on_threads(lambda i: fast_layers.conv_layer_backward(douts[i], results[i][1]),
                               range(len(results)))
    t3 = time.perf_counter()
    return t1 - t0, t3 - t2


def refuse(message):
    """A bad command line that argparse cannot see: one sentence on stderr, exit 2."""
    print(f'conv_tiles: error: {message}', file=sys.stderr)
    sys.exit(2)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--preset', default='deep', help="the network of this preset of presets.json (default deep)")
    ap.add_argument('--batch', type=int, help="images (default: the preset's batch_size)")
    ap.add_argument('--chunks', type=int, nargs='+', default=[16, 32, 64], help='micro-batch sizes to time')
    ap.add_argument('--repeats', type=int, default=5, help='timed repeats of every variant (after one warm-up)')
    args = ap.parse_args()
    try:
        preset = config.load_preset(args.preset)
    except config.ConfigError as e:
        refuse(str(e))
    batch = args.batch or preset.batch_size
    if batch < 1 or args.repeats < 1 or not args.chunks or min(args.chunks) < 1:
        refuse('--batch, --repeats and every --chunks must be at least 1; give positive numbers')
    fast_layers.prepare_process_for_training()
    print(f"preset {args.preset}: widths {list(preset.widths)}, {preset.convs_per_block} convs a block, "
          f"batch {batch}, {fast_layers.thread_count()} worker threads, float32; "
          f"median of {args.repeats} forward + backward (min-max), ms")
    rng = np.random.default_rng(0)
    for chosen, side, C, O in layer_shapes(preset):
        x = rng.standard_normal((batch, side, side, C), dtype=np.float32)
        w = (rng.standard_normal((O, C, 3, 3)) / np.sqrt(9 * C)).astype(np.float32)
        tiles = [2, 4] if side % 4 == 0 else [2]
        variants = [(tile, chunk) for tile in tiles for chunk in args.chunks]
        times = {v: [] for v in variants}
        for repeat in range(args.repeats + 1):
            for tile, chunk in variants:
                layer = fast_layers.ConvLayer(k=chosen.k, pool=chosen.pool, bn=chosen.bn, winograd=True, tile=tile)
                forward, backward = time_variant(x, w, layer, chunk)
                if repeat:                       # the first round warms up
                    times[(tile, chunk)].append(1000 * (forward + backward))
        pool = ', pooled' if chosen.pool else ''
        print(f'conv{chosen.k} {C}->{O} at {side}x{side}{pool}:')
        choice = (chosen.tile, fast_layers.CONV_CHUNK * chosen.chunk_scale)
        for v in variants:
            t = times[v]
            mark = '  <- backbone_layers' if v == choice else ''
            print(f'  F({v[0]}x{v[0]}, 3x3), {v[1]:3d} images: {np.median(t):7.1f} ms '
                  f'({min(t):.1f}-{max(t):.1f}){mark}')


if __name__ == '__main__':
    main()
