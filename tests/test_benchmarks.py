"""The benchmarks are not run in the suite (they print figures, they assert nothing),
but what they rely on in the project's modules is checked here, so a rename cannot
silently break them."""
import importlib.util
import json
import platform
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
