"""The benchmarks are not run in the suite (they print figures, they assert nothing),
but what they rely on in the project's modules is checked here, so a rename cannot
silently break them."""
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cnn_rnn_numpy as M
import config
import fast_layers as F

BENCHMARKS = Path(__file__).resolve().parent.parent / 'benchmarks'


def load(name):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f'{name}.py')
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_every_profiled_function_exists_and_runs_in_a_step():
    speed = load('speed')
    missing = [n for n in speed.PROFILED_FUNCTIONS if not callable(speed.profiled_function(n))]
    assert missing == []
    # A small profile: every function the step uses must have been timed, and
    # the rows must add up to the step (the last row is the remainder).
    before = (F.THREADS, F.winograd_products, M.rnn_forward, dict(M.CELL_TABLE))
    step_ms, rows = speed.numpy_profile('rows', 8)
    # The model is left as it was: thread count, the timed functions and the cell table restored.
    assert (F.THREADS, F.winograd_products, M.rnn_forward, dict(M.CELL_TABLE)) == before
    assert step_ms > 0
    assert abs(sum(ms for _, ms in rows) - step_ms) < 1e-6
    names = dict(rows)
    for row in ('conv2 Winograd products', 'conv2 Winograd products, backward (dU, dV)', 'conv1 im2col',
                'RNN forward', 'RNN backward (BPTT)'):
        assert names[row] > 0, row


def test_the_bit_identity_check_compares_a_separate_copy_and_sees_a_change(monkeypatch):
    """ab_identical.py's machinery: a second copy of the model (with its own fast_layers)
    computes the same bits, and a changed number is reported."""
    ab_step, ab_identical = load('ab_step'), load('ab_identical')
    copy = ab_step.load_model_from(BENCHMARKS.parent, 'copy')
    assert copy is not M and copy.fast_layers_module is not F
    assert sys.modules['fast_layers'] is F                     # the working tree's copy is back
    ab_step.set_threads(copy, 2)
    monkeypatch.setattr(F, 'THREADS', 2)
    assert copy.fast_layers_module.THREADS == 2
    report = ab_identical.compare(M, copy, ['gru'], ['rows'], threads=[2], batch=6)
    assert report == {(2, 'rows', 'gru'): []}
    monkeypatch.setattr(copy, 'RECURRENT_DECAYED', ('W_xh', 'W_hh'))   # less weight decay in the copy: none on W_ho
    problems = ab_identical.compare(M, copy, ['rnn'], ['flat'], threads=[2], batch=6)[2, 'flat', 'rnn']
    assert any(p.startswith('step 0 loss') for p in problems)
    assert any('grads[W_ho]' in p for p in problems)


def test_ab_step_times_a_presets_network_against_a_revision():
    """ab_step.py --preset: both sides build the preset's network (deep's BatchNorm backbone, tiny
    batch), one line of times; an unknown preset is refused in one line with exit 2."""
    cmd = [sys.executable, str(BENCHMARKS / 'ab_step.py'), 'HEAD', '--batch', '2', '--steps', '1']
    done = subprocess.run(cmd + ['--preset', 'deep'], capture_output=True, text=True, cwd=BENCHMARKS.parent,
                          env=dict(os.environ, CNNRNN_THREADS='1'))
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip().splitlines()[-1]
    assert re.match(r'deep \(rows\) A +[\d.]+ ms +B +[\d.]+ ms +B/A [\d.]+ ', line), line
    refused = subprocess.run(cmd + ['--preset', 'nope'], capture_output=True, text=True, cwd=BENCHMARKS.parent)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1] == (
        f"ab_step.py: error: unknown preset 'nope'; presets.json has {', '.join(config.load_presets())}")


def test_flop_count_of_the_direct_convolutions():
    speed = load('speed')
    # conv1 + conv2 forward, backward twice conv2 and once conv1, RNN and head: by hand for rows rnn.
    conv1, conv2 = 2 * 32 * 32 * 64 * 27, 2 * 16 * 16 * 64 * 576
    rnn = 2 * 8 * (512 * 128 + 128 * 128)
    head = 2 * 128 * 10
    assert speed.flops_per_image('rows', 'rnn') == (conv1 + conv2 + rnn + head) + (conv1 + 2 * conv2 + 2 * rnn + 2 * head)
    assert np.isclose(speed.flops_per_image('rows', 'lstm') - speed.flops_per_image('rows', 'rnn'), 3 * 3 * rnn)


@pytest.mark.skipif(not sys.platform.startswith('linux') or platform.libc_ver()[0] != 'glibc',
                    reason='the allocator settings are for glibc')
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    """With the allocator settings a training step reuses the last step's memory: few page faults.

    The control run (``benchmarks/page_faults.py``'s 'without': the settings
    cannot be applied, as off glibc) must fault far more, so the test can tell.
    """
    step = load('page_faults').STEP

    def run(mode):
        out = subprocess.run([sys.executable, '-c', step, mode, 'rows', '64', '3'], capture_output=True,
                             text=True, cwd=BENCHMARKS.parent, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])
    tuned, untuned = run('with'), run('without')
    assert (tuned['tuned'], untuned['tuned']) == (True, False)
    # Against the control, not an absolute count: the tuned step faulted 0-185 times per
    # step here and 524 once in CI on a busy host; the control 7,600-10,500 times here.
    assert untuned['faults'] > 2000, untuned
    assert tuned['faults'] < untuned['faults'] / 5, (tuned, untuned)


def test_deep_step_counts_the_flops_of_the_method_and_of_a_deep_backbone():
    deep_step, speed = load('deep_step'), load('speed')
    for layout in ('pixels', 'rows'):
        for cell in M.CELLS:
            method = M.CNNRNN(seq_layout=layout, cell=cell, rnn_init='xavier')   # no QR: shapes are enough
            assert deep_step.step_flops(method)['total'] == speed.flops_per_image(layout, cell)
    # By hand for widths 8,16, two convolutions per block, 'rows' (the last map 8x8x16: T=8, D=128).
    model = M.CNNRNN(seq_layout='rows', widths=(8, 16), convs_per_block=2, batchnorm=True, rnn_init='xavier')
    convs = [2 * 32 * 32 * 8 * 3 * 9, 2 * 16 * 16 * 8 * 8 * 9, 2 * 16 * 16 * 16 * 8 * 9, 2 * 8 * 8 * 16 * 16 * 9]
    rnn, head = 2 * 8 * (128 * 128 + 128 * 128), 2 * 128 * 10
    f = deep_step.step_flops(model)
    assert f['forward'] == sum(convs) + rnn + head
    assert f['total'] == 3 * (sum(convs) + rnn + head) - convs[0]        # no input gradient for conv1
    # conv2 and conv3 (16x16) and conv4 (8x8) run by F(4x4, 3x3): 4x fewer products.
    saved = 3 * (convs[1] + convs[2] + convs[3]) * (1 - 1 / 4)
    assert np.isclose(f['executed'], f['total'] - saved)
    assert f['whiten_forward'] == 0


@pytest.mark.parametrize('k', [2, 3])
def test_deep_step_counts_the_whitening_layer_in_the_forward_only(k):
    """The whitening layer adds 2*32*32*2P*P per image to the forward and nothing to the backward;
    conv1 reads its 2P channels (and runs by Winograd)."""
    deep_step = load('deep_step')
    P = 3 * k * k
    settings = dict(seq_layout='rows', widths=(8, 16), convs_per_block=2, batchnorm=True, rnn_init='xavier')
    plain, whitened = M.CNNRNN(**settings), M.CNNRNN(**settings, whiten=k, identity_init=True)
    f0, f = deep_step.step_flops(plain), deep_step.step_flops(whitened)
    layer = 2 * 32 * 32 * 2 * P * P
    assert f['whiten_forward'] == deep_step.whitening_flops(whitened) == layer
    assert deep_step.conv_table(whitened)[0]['I'] == 2 * P
    conv1 = lambda inputs: 2 * 32 * 32 * 8 * inputs * 9                  # noqa: E731
    assert f['forward'] - f0['forward'] == layer + conv1(2 * P) - conv1(3)
    assert f['conv_forward'] - f0['conv_forward'] == conv1(2 * P) - conv1(3)
    # The backward grows by conv1's weight gradient alone (no input gradient, nothing for the frozen layer).
    assert (f['total'] - f['forward']) - (f0['total'] - f0['forward']) == conv1(2 * P) - conv1(3)
    assert whitened.layers[0].winograd and not plain.layers[0].winograd
    convs = [conv1(2 * P), 2 * 16 * 16 * 8 * 8 * 9, 2 * 16 * 16 * 16 * 8 * 9, 2 * 8 * 8 * 16 * 16 * 9]
    # conv1 (32x32), conv2 and conv3 (16x16) and conv4 (8x8), all by F(4x4, 3x3).
    winograd = (2 * convs[0] + 3 * convs[1] + 3 * convs[2] + 3 * convs[3]) * (1 - 1 / 4)
    assert np.isclose(f['executed'], f['total'] - winograd)


def test_deep_step_takes_the_network_from_the_preset_and_the_options_override_it():
    deep_step = load('deep_step')
    import config
    presets = config.load_presets()
    args = deep_step.parse_args(['--threads', '1'])
    deep = presets['deep']
    assert args.preset == 'deep' and args.overridden == []
    assert (args.widths, args.convs_per_block, args.batchnorm, args.whiten, args.identity_init, args.layout,
            args.cell, args.hidden, args.batch) == (tuple(deep.widths), deep.convs_per_block, deep.batchnorm,
                                                    deep.whiten, deep.identity_init, deep.seq_layout, deep.cell,
                                                    deep.hidden, deep.batch_size)
    assert (args.widths, args.whiten, args.identity_init, args.hidden, args.batch) == ((64, 256, 256), 0, True, 256, 512)
    assert args.readout == deep.readout and deep_step.build_model(args).readout == deep.readout
    args = deep_step.parse_args(['--preset', 'smoke', '--widths', '8,16', '--whiten', '3', '--no-batchnorm',
                                 '--cell', 'gru', '--threads', '1'])
    assert (args.widths, args.whiten, args.batchnorm, args.cell, args.batch, args.layout, args.identity_init) == (
        (8, 16), 3, False, 'gru', presets['smoke'].batch_size, presets['smoke'].seq_layout, False)
    assert args.overridden == ['widths', 'batchnorm', 'whiten', 'cell']
    model = deep_step.build_model(args, deep_step.random_batch(4)[0])
    assert model.whiten == 3 and model.conv1_inputs == 54 and np.abs(model.params['whiten_W']).max() > 0


def test_deep_step_refuses_an_unknown_preset_in_one_line():
    out = subprocess.run([sys.executable, str(BENCHMARKS / 'deep_step.py'), '--preset', 'no-such-preset',
                          '--no-torch'], capture_output=True, text=True, cwd=BENCHMARKS.parent)
    assert out.returncode == 2 and out.stdout == ''
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown preset 'no-such-preset'" in lines[0] and 'deep' in lines[0], out.stderr


@pytest.mark.parametrize('k', [2, 3])
def test_deep_step_torch_twin_whitens_as_the_numpy_layer(k):
    """The PyTorch twin's frozen first layer, given the NumPy filters, computes whiten_forward
    (same padding), takes no gradient, and the backbone after it reads its 2P channels."""
    torch = pytest.importorskip('torch')
    deep_step = load('deep_step')
    X = deep_step.random_batch(2)[0]
    w = M.patch_whitening_weights(X, k).astype(np.float32)
    net = deep_step.torch_model((8,), 1, True, 'rows', 'rnn', 4, whiten=k)
    pad, frozen, relu = net.backbone[:3]
    assert isinstance(frozen, torch.nn.Conv2d) and frozen.bias is None and not frozen.weight.requires_grad
    assert tuple(frozen.weight.shape) == w.shape == (2 * 3 * k * k, 3, k, k)
    assert net.backbone[3].in_channels == 2 * 3 * k * k
    with torch.no_grad():
        frozen.weight.copy_(torch.from_numpy(w))
        ours = relu(frozen(pad(torch.from_numpy(X)))).numpy().transpose(0, 2, 3, 1)
    expected, _ = M.whiten_forward(X.transpose(0, 2, 3, 1), w)
    assert ours.shape == expected.shape == (2, 32, 32, 2 * 3 * k * k)
    assert np.allclose(ours, expected, atol=1e-4)
    assert tuple(net(torch.from_numpy(X)).shape) == (2, 10)


@pytest.mark.parametrize('readout', ('mean', 'max'))
def test_deep_step_torch_twin_reads_out_as_the_numpy_model(readout):
    """The twin's head reads the mean or maximum over time of its RNN's outputs, as
    M.readout_forward does of the same hidden states."""
    torch = pytest.importorskip('torch')
    deep_step = load('deep_step')
    torch.manual_seed(0)
    net = deep_step.torch_model((8,), 1, False, 'rows', 'rnn', 4, readout=readout)
    X = torch.from_numpy(deep_step.random_batch(3)[0])
    read = {}
    net.head.register_forward_hook(lambda module, inputs, output: read.setdefault('r', inputs[0]))
    with torch.no_grad():
        net(X)
        seq = net.backbone(X).permute(0, 2, 3, 1).reshape(3, 16, 16 * 8)
        out, _ = net.rnn(seq)
    hs = np.concatenate([np.zeros((1, 3, 4), np.float32), out.numpy().transpose(1, 0, 2)])
    expected, _ = M.readout_forward(hs, readout)
    assert np.allclose(read['r'].numpy(), expected, atol=1e-6)
    assert not np.allclose(expected, hs[-1])


DEEP_STEP_NUMBER = r'([0-9]+\.[0-9]+)'
DEEP_STEP_LINES = {   # a line each run prints -> the numbers on it, all positive
    'GEMM peak': rf'GEMM peak: {DEEP_STEP_NUMBER} GFLOP/s \(size (\d+), (\d+) threads?\)',
    'FLOPs': rf'FLOPs per image: {DEEP_STEP_NUMBER} MFLOP per training step',
    'step': rf'numpy train step: {DEEP_STEP_NUMBER} ms \(min-max {DEEP_STEP_NUMBER}-{DEEP_STEP_NUMBER}\), '
            rf'{DEEP_STEP_NUMBER} img/s',
    'inference': rf'numpy inference: {DEEP_STEP_NUMBER} ms \(min-max {DEEP_STEP_NUMBER}-{DEEP_STEP_NUMBER}\)',
    'achieved': rf'achieved: {DEEP_STEP_NUMBER} GFLOP/s effective .* = {DEEP_STEP_NUMBER}x the GEMM peak',
    'executed': rf'executed products: {DEEP_STEP_NUMBER} MFLOP per image, {DEEP_STEP_NUMBER} GFLOP/s',
    'parts': rf'sum of the parts: {DEEP_STEP_NUMBER} ms; the step: {DEEP_STEP_NUMBER} ms',
    'memory': rf'peak RSS: {DEEP_STEP_NUMBER} GB absolute, (-?[0-9.]+) GB above the {DEEP_STEP_NUMBER} GB '
              r'after the imports; target under 8 GB: met',
}


def deep_step_numbers(out, pattern):
    match = re.search(pattern, out)
    assert match, f'no line matching {pattern!r} in:\n{out}'
    return [float(v) for v in match.groups()]


@pytest.mark.parametrize('torch_too, whiten', [(False, 0), (False, 2), (True, 2)],
                         ids=['no-torch', 'no-torch-whiten', 'torch-whiten'])
def test_deep_step_runs_on_a_tiny_backbone_and_prints_positive_figures(torch_too, whiten):
    if torch_too and importlib.util.find_spec('torch') is None:
        pytest.skip('PyTorch is not importable')
    # One thread: OpenMP's spinning threads (PyTorch's) are slow on a machine busy with other work.
    # The deep preset's network (BatchNorm, rows, rnn, identity init) made tiny by the options.
    cmd = [sys.executable, str(BENCHMARKS / 'deep_step.py'), '--preset', 'deep', '--widths', '8,16',
           '--convs-per-block', '2', '--whiten', str(whiten), '--hidden', '16', '--batch', '8',
           '--repeats', '1', '--warmup', '0', '--gemm-sizes', '64,128', '--threads', '1',
           *([] if torch_too else ['--no-torch'])]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=BENCHMARKS.parent).stdout
    first = out.splitlines()[0]
    assert first.startswith('deep_step: preset deep (overridden: --widths, --convs-per-block, --whiten, '
                            '--hidden, --batch): widths 8,16, 2 conv(s) per block, BatchNorm on, '
                            f'whiten {whiten} '), first
    readout = config.load_presets()['deep'].readout           # the preset's, which the tiny network keeps
    assert 'identity_init on, layout rows' in first and f'cell rnn, readout {readout}, hidden 16' in first, first
    for name, pattern in DEEP_STEP_LINES.items():
        numbers = deep_step_numbers(out, pattern)
        if name == 'memory':    # the step's own growth may round to nothing at this size
            absolute, above, baseline = numbers
            assert absolute >= baseline > 0 and above >= 0, out
        else:
            assert all(v > 0 for v in numbers), (name, out)
    # The profile: one forward and one backward row per convolution and BatchNorm, the RNN's, the head's.
    rows = re.findall(rf'^    (conv\d|bn\d|RNN|head)\b.* {DEEP_STEP_NUMBER} ms \(min-max', out, re.M)
    assert sorted(name for name, _ in rows) == sorted(['conv1', 'conv2', 'conv3', 'conv4'] * 2
                                                      + ['bn1', 'bn2', 'bn3', 'bn4'] * 2 + ['RNN'] * 2 + ['head'])
    assert all(float(t) > 0 for _, t in rows)
    # conv1's row shows its true inputs and how it runs; the whitening layer has a forward row, no backward.
    whitening = re.findall(rf'^    whitening 2x2 3->24 at 32x32 \(frozen\) forward +{DEEP_STEP_NUMBER} ms', out, re.M)
    if whiten:
        assert len(whitening) == 1 and float(whitening[0]) > 0, out
        assert re.search(r'^    conv1 24->8 at 32x32 \(Winograd F\(4x4\), pool\) forward', out, re.M), out
        assert 'FLOP per training step (forward' in out and ': whitening 0.6, convolutions' in out, out
        assert 'whitening forward' in re.search(r'phases: .*', out).group(), out
    else:
        assert whitening == [] and 'whitening' not in out.split('\n', 1)[1], out
        assert re.search(r'^    conv1 3->8 at 32x32 \(im2col, pool\) forward', out, re.M), out
    if not torch_too:
        assert 'PyTorch skipped: --no-torch' in out
        assert 'torch 2' not in out and 'numpy/torch' not in out
        return
    for label in ("torch's defaults", "the NumPy model's process settings"):
        numbers = deep_step_numbers(out, rf'train step, {re.escape(label)}: {DEEP_STEP_NUMBER} ms .* inference '
                                         rf'{DEEP_STEP_NUMBER} ms .* peak RSS {DEEP_STEP_NUMBER} GB')
        assert all(v > 0 for v in numbers), out
    for label in ("torch's defaults", 'same process settings'):
        numbers = deep_step_numbers(out, rf'step time numpy/torch \({re.escape(label)}\): train {DEEP_STEP_NUMBER}x, '
                                         rf'inference {DEEP_STEP_NUMBER}x')
        assert all(v > 0 for v in numbers), out


def test_conv_tiles_lists_deep_s_winograd_layers_and_marks_the_models_choice():
    """Every Winograd convolution of deep with its input side and channels; a tiny run prints each
    tile and micro-batch size (the choice of backbone_layers is marked when among them); an unknown preset
    is refused in one line, exit 2."""
    conv_tiles = load('conv_tiles')
    shapes = conv_tiles.layer_shapes(config.load_presets()['deep'])
    assert [(layer.k, side, C, O) for layer, side, C, O in shapes] == [
        (2, 16, 64, 64), (3, 16, 64, 256), (4, 8, 256, 256), (5, 8, 256, 256), (6, 4, 256, 256)]
    cmd = [sys.executable, str(BENCHMARKS / 'conv_tiles.py'), '--batch', '4', '--chunks', '2', '4',
           '--repeats', '1']
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=BENCHMARKS.parent,
                          env=dict(os.environ, CNNRNN_THREADS='1'))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len([line for line in lines if line.startswith('conv')]) == 5
    # Every map's side (16, 8, 4) is divisible by 4: both tiles, 2 micro-batch sizes each.
    assert len([line for line in lines if line.startswith('  F(')]) == 5 * 2 * 2
    refused = subprocess.run(cmd + ['--preset', 'nope'], capture_output=True, text=True, cwd=BENCHMARKS.parent)
    assert refused.returncode == 2 and refused.stdout == ''
    assert refused.stderr.strip() == ("conv_tiles: error: unknown preset 'nope'; choose one of "
                                      f"{', '.join(config.load_presets())} (presets.json)")
