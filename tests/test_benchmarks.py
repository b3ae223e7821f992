"""The benchmarks are not run in the suite (they print figures, they assert nothing),
but what they rely on in the project's modules is checked here, so a rename cannot
silently break them."""
import importlib.util
import json
import platform
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cnn_rnn_numpy as M
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
    assert tuned['faults'] < 500 < untuned['faults']
    assert tuned['faults'] < untuned['faults'] / 10


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
    assert np.isclose(f['executed'], f['total'] - sum(3 * c for c in convs[1:]) * (1 - 1 / 2.25))


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


@pytest.mark.parametrize('torch_too', [False, True], ids=['no-torch', 'torch'])
def test_deep_step_runs_on_a_tiny_backbone_and_prints_positive_figures(torch_too):
    if torch_too and importlib.util.find_spec('torch') is None:
        pytest.skip('PyTorch is not importable')
    # One thread with PyTorch: OpenMP's spinning threads are slow on a machine busy with other work.
    cmd = [sys.executable, str(BENCHMARKS / 'deep_step.py'), '--widths', '8,16', '--convs-per-block', '2',
           '--batch', '8', '--repeats', '1', '--warmup', '0', '--gemm-sizes', '64,128',
           *(['--threads', '1'] if torch_too else ['--no-torch'])]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=BENCHMARKS.parent).stdout
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
