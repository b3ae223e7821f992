"""Tests of compare.py: grouping runs into variants, the numbers, the verdicts,
runs left out, refusals, the figures; on run folders made by conftest's builder (through the
run-folder contract) and on real smoke runs of main.py. The hostile cases of issue 18 (named pipes, crashes,
numbers that are not numbers, an edited config.json, --out that is not ours)
run compare.py as a subprocess, the way users run it, with a timeout so that a
hang fails."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import compare
import main
import runfiles
from cnn_rnn_numpy import CNNRNN
from conftest import (FAST, REPO_ROOT, assert_valid_png, edit_json, make_cifar_archive, make_run_folder,
                      metrics_for, predictions_with_accuracy, wait_for_handler)

FIGURES = ('val_accuracy.png', 'test_accuracy.png')


def snapshot(folder):
    """{relative path: bytes} of every file under a folder but comparison/, to prove nothing was written there."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob('*'))
            if p.is_file() and p.relative_to(folder).parts[0] != 'comparison'}


def run_compare(capsys, *args):
    """compare.main with the arguments; returns (exit code, stdout, stderr)."""
    code = compare.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(code, err, *words, left_out=0):
    """Exit code 2 and one sentence on stderr (after one line per run left out), naming each of words."""
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 + left_out, err
    assert all(line.startswith('compare.py: ') for line in lines) and 'Traceback' not in err
    for word in words:
        assert word in lines[-1], (word, lines[-1])


# --------------------------------------------------------------------------
# Variants, labels and numbers
# --------------------------------------------------------------------------

@pytest.fixture(scope='module')
def claims_like(tmp_path_factory):
    """runs/ with a baseline (3 seeds), weight_decay=0 (3), seq_layout=flat (2) and a two-key variant (1)."""
    root = tmp_path_factory.mktemp('compare') / 'runs'
    for seed, acc in enumerate((0.40, 0.42, 0.44)):
        # One baseline run from another preset name: the same settings are the same variant.
        make_run_folder(root, f'baseline-seed{seed}', seed, acc, preset='fast' if seed else 'mine')
    for seed, acc in enumerate((0.30, 0.31, 0.32)):
        make_run_folder(root, f'no-wd-seed{seed}', seed, acc, weight_decay=0)
    for seed, acc in enumerate((0.41, 0.44)):
        make_run_folder(root, f'flat-seed{seed}', seed, acc, seq_layout='flat', wall_time_s=120.0)
    make_run_folder(root, 'both-seed0', 0, 0.35, clip=0, decay=1)
    return root


@pytest.fixture(scope='module')
def compared(claims_like, tmp_path_factory):
    before = snapshot(claims_like)
    out = tmp_path_factory.mktemp('out') / 'cmp'
    assert compare.main([str(claims_like), '--out', str(out)]) == 0
    assert snapshot(claims_like) == before, 'compare.py wrote into the run folders it read'
    return out, json.loads((out / 'comparison.json').read_text()), (out / 'comparison.md').read_text()


def test_runs_are_grouped_by_their_settings_and_labelled_by_what_differs(compared):
    _, record, md = compared
    by_label = {v['label']: v for v in record['variants']}
    assert list(by_label) == ['baseline', 'seq_layout=flat', 'decay=1, clip=0', 'weight_decay=0']
    assert record['baseline']['chosen_as'] == "the variant with the settings of presets.json's `fast` preset"
    assert [v['finished'] for v in by_label.values()] == [3, 2, 1, 3]
    assert sorted(by_label['baseline']['seeds']) == [0, 1, 2]
    assert by_label['weight_decay=0']['differs'] == [{'key': 'weight_decay', 'baseline': 0.0005, 'value': 0}]
    assert '| weight_decay=0 | 3 | 0 of 3 |' in md and 'weight_decay: 0.0005 → 0' in md
    assert 'decay: 0.9 → 1; clip: 5 → 0' in md


def test_means_stds_and_the_verdict_against_the_baseline(compared):
    _, record, md = compared
    by_label = {v['label']: v for v in record['variants']}
    base, wd = by_label['baseline'], by_label['weight_decay=0']
    assert base['test_acc']['mean'] == pytest.approx(0.42)
    assert base['test_acc']['std'] == pytest.approx(0.02)          # sample std, n - 1
    assert base['wall_time_s']['mean'] == pytest.approx(300.0)
    eces = [r['ece'] for r in base['runs']]
    assert base['ece']['mean'] == pytest.approx(np.mean(eces)) and base['ece']['std'] == pytest.approx(
        np.std(eces, ddof=1))
    assert '| baseline | 3 | 0 of 3 | 42.00 ± 2.00 |' in md and '| 5.0 | (the baseline) |' in md
    # Welch by hand: diff -11 points, se = sqrt(2^2/3 + 1^2/3) = 1.29, t = -8.52,
    # df = (4/3 + 1/3)^2 / ((4/3)^2/2 + (1/3)^2/2) = 50/17 = 2.94 (exact, not rounded down).
    stats = pytest.importorskip('scipy.stats')
    w = wd['vs_baseline']
    assert w['diff'] == pytest.approx(-11.0) and w['se'] == pytest.approx(np.sqrt(5 / 3))
    assert w['t'] == pytest.approx(-11 / np.sqrt(5 / 3)) and w['df'] == pytest.approx(50 / 17)
    assert w['p'] == pytest.approx(stats.ttest_ind([30, 31, 32], [40, 42, 44], equal_var=False).pvalue)
    half = stats.t.ppf(0.975, 50 / 17) * np.sqrt(5 / 3)
    assert w['ci95'] == pytest.approx([-11 - half, -11 + half])
    # Holm over the two variants with a p-value (flat's p = 0.81): the smaller p doubled.
    flat = by_label['seq_layout=flat']['vs_baseline']
    assert record['holm_family'] == 2 and w['p_holm'] == pytest.approx(2 * w['p']) and flat['p_holm'] == flat['p']
    assert w['verdict'] == 'worse' and flat['verdict'] == 'within noise'
    few = by_label['decay=1, clip=0']['vs_baseline']
    assert few['verdict'] == 'too few runs' and few['p'] is None and few['p_holm'] is None
    assert (f"| weight_decay=0 | 31.00 ± 1.00 | -11.00 | {-11 - half:+.2f} to {-11 + half:+.2f} | -8.52 (2.9) "
            f"| 0.004 | 0.007 | worse | 0 of 3 |") in md
    assert "Welch's t-test" in md and 'Holm' in md
    # The baseline's validation curve: mean, min and max over the seeds per epoch.
    curve = base['val_acc_curve']
    assert curve['epoch'] == [1, 2, 3]
    assert curve['min'][2] == pytest.approx(0.40) and curve['max'][2] == pytest.approx(0.46)


def test_the_figures_are_valid_pngs(compared):
    out, _, md = compared
    for name in FIGURES:
        assert_valid_png(out / name)
        assert f'({name})' in md


def test_verdicts_follow_the_holm_adjusted_p_not_the_raw_one(tmp_path, capsys):
    """Three variants each 5 points above the baseline (3 seeds a side, std 2 points): each p = 0.038,
    below 5% alone, but Holm over the three makes every one 0.113: within noise. A fourth variant
    far above stays better after the adjustment (its p times 4)."""
    stats = pytest.importorskip('scipy.stats')
    root = tmp_path / 'runs'
    for seed, acc in enumerate((0.40, 0.42, 0.44)):
        make_run_folder(root, f'base-seed{seed}', seed, acc)
    variants = {'lr': 0.01, 'weight_decay': 0, 'momentum': 0.5}
    for key, value in variants.items():
        for seed, acc in enumerate((0.45, 0.47, 0.49)):
            make_run_folder(root, f'{key}-seed{seed}', seed, acc, **{key: value})
    for seed, acc in enumerate((0.80, 0.81, 0.82)):
        make_run_folder(root, f'far-seed{seed}', seed, acc, seq_layout='rows')
    code, out, err = run_compare(capsys, root, '--out', tmp_path / 'cmp')
    assert code == 0, err
    record = json.loads((tmp_path / 'cmp' / 'comparison.json').read_text())
    by_label = {v['label']: v['vs_baseline'] for v in record['variants'] if not v['is_baseline']}
    p = stats.ttest_ind([45, 47, 49], [40, 42, 44], equal_var=False).pvalue
    assert p == pytest.approx(0.0376, abs=1e-4) and record['holm_family'] == 4
    for key, value in variants.items():
        w = by_label[f'{key}={compare.show(value)}']
        assert w['p'] == pytest.approx(p) and w['p'] < 0.05          # each alone would be 'better'
        assert w['p_holm'] == pytest.approx(3 * p) and w['p_holm'] > 0.05
        assert w['verdict'] == 'within noise'
    far = by_label['seq_layout=rows']
    assert far['p_holm'] == pytest.approx(4 * far['p']) and far['verdict'] == 'better'
    md = (tmp_path / 'cmp' / 'comparison.md').read_text()
    assert '| lr=0.01 | 47.00 ± 2.00 | +5.00 |' in md and '| 0.038 | 0.113 | within noise |' in md
    assert 'within noise (p 0.038, Holm 0.113)' in out
    # The JSON is strict: no NaN or Infinity anywhere.
    json.loads((tmp_path / 'cmp' / 'comparison.json').read_text(),
               parse_constant=lambda c: pytest.fail(f'comparison.json holds {c}'))


def test_raw_and_calibrated_nll_and_ece_are_shown_where_runs_have_them(tmp_path, capsys):
    root = tmp_path / 'runs'
    for seed, t in enumerate((0.7, 0.9)):
        make_run_folder(root, f'base-seed{seed}', seed, 0.4 + 0.02 * seed, temperature=t)
    make_run_folder(root, 'base-seed2', 2, 0.44)                 # an earlier version's: no temperature
    for seed in range(2):
        make_run_folder(root, f'wd-seed{seed}', seed, 0.3, weight_decay=0)
    code, _, err = run_compare(capsys, root, '--out', tmp_path / 'cmp')
    assert code == 0, err
    record = json.loads((tmp_path / 'cmp' / 'comparison.json').read_text())
    base, wd = record['variants']
    runs = {r['name']: r for r in base['runs']}
    m = {name: json.loads((root / name / 'metrics.json').read_text()) for name in runs}
    for name, r in runs.items():
        cal = (m[name].get('calibration') or {}).get('calibrated') or {}
        assert r['temperature'] == m[name].get('temperature') and r['nll'] == m[name]['test_loss']
        assert r['ece_calibrated'] == cal.get('ece') and r['nll_calibrated'] == cal.get('nll')
    assert base['temperature']['values'] == [0.7, 0.9] and len(base['nll']['values']) == 3
    assert base['ece_calibrated']['mean'] == pytest.approx(np.mean([runs[f'base-seed{s}']['ece_calibrated']
                                                                    for s in (0, 1)]))
    assert wd['temperature'] == {'mean': None, 'std': None, 'values': []}
    md = (tmp_path / 'cmp' / 'comparison.md').read_text()
    table = md.split('## Calibration')[1].split('\n## ')[0]
    assert '| variant | runs with T | T | NLL raw | NLL calibrated | ECE raw | ECE calibrated |' in table
    assert (f"| baseline | 2 of 3 | 0.800 ± 0.141 | {base['nll']['mean']:.4f} ± {base['nll']['std']:.4f} | "
            f"{base['nll_calibrated']['mean']:.4f} ± {base['nll_calibrated']['std']:.4f} | ") in table
    assert '| weight_decay=0 | 0 of 2 | - | ' in table and table.rstrip().endswith('every finished run.')
    assert f"| base-seed0 | baseline | 0 | 40.00 | {runs['base-seed0']['ece']:.4f} | 0.700 | " \
           f"{runs['base-seed0']['ece_calibrated']:.4f} |" in md
    assert '| base-seed2 | baseline | 2 | 44.00 | ' in md and ' | - | - | 3 | 5.0 |' in md


def test_the_baseline_is_the_given_run_or_else_the_largest_group(tmp_path, capsys):
    root = tmp_path / 'runs'
    for seed in range(3):
        make_run_folder(root, f'lr-seed{seed}', seed, 0.3 + 0.01 * seed, lr=0.01)
    for seed in range(2):
        make_run_folder(root, f'rows-seed{seed}', seed, 0.5, lr=0.01, seq_layout='rows')
    code, _, _ = run_compare(capsys, root)          # default --out: comparison/ beside the runs
    record = json.loads((root / 'comparison' / 'comparison.json').read_text())
    assert code == 0 and record['baseline']['chosen_as'] == 'the variant with the most runs'
    assert [v['label'] for v in record['variants']] == ['baseline', 'seq_layout=rows']
    code, _, _ = run_compare(capsys, root, '--baseline', root / 'rows-seed1', '--out', tmp_path / 'b')
    record = json.loads((tmp_path / 'b' / 'comparison.json').read_text())
    assert code == 0 and [v['label'] for v in record['variants']] == ['baseline', 'seq_layout=pixels']
    assert record['variants'][1]['vs_baseline']['verdict'] == 'worse'


def test_links_are_resolved_and_a_run_counts_once(tmp_path, capsys):
    root = tmp_path / 'runs'
    for seed in range(2):
        make_run_folder(root, f'a-seed{seed}', seed, 0.4)
    (root / 'latest').symlink_to('a-seed1')
    code, _, _ = run_compare(capsys, root, root / 'latest', root / 'a-seed0', '--out', tmp_path / 'o')
    record = json.loads((tmp_path / 'o' / 'comparison.json').read_text())
    assert code == 0 and [r['name'] for r in record['variants'][0]['runs']] == ['a-seed0', 'a-seed1']


# --------------------------------------------------------------------------
# Runs that cannot be compared
# --------------------------------------------------------------------------

def test_runs_that_cannot_be_compared_are_named_and_left_out(tmp_path, capsys):
    root = tmp_path / 'runs'
    for seed in range(2):
        make_run_folder(root, f'good-seed{seed}', seed, 0.4)
    training = make_run_folder(root, 'training', 5, evaluated=False)
    make_run_folder(root, 'interrupted', 6, ckpt=True, evaluated=False)
    make_run_folder(root, 'crashed', 7, epochs=0, evaluated=False, config=dict(FAST, seed=7), log=())
    make_run_folder(root, 'stopped', 8, stopped_early=True)
    make_run_folder(root, 'small-test-set', 9, n_test=100)
    damaged = make_run_folder(root, 'bad-json', 10)
    (damaged / 'metrics.json').write_text((damaged / 'metrics.json').read_text()[:50])
    wrong_type = make_run_folder(root, 'wrong-type', 11)
    m = json.loads((wrong_type / 'metrics.json').read_text())
    runfiles.write_json(wrong_type / 'metrics.json', dict(m, test_acc='high'))
    flipped = make_run_folder(root, 'bit-flip', 12)
    data = bytearray((flipped / 'predictions.npz').read_bytes())
    data[len(data) // 3] ^= 0x40
    (flipped / 'predictions.npz').write_bytes(bytes(data))
    truncated = make_run_folder(root, 'truncated', 13)
    (truncated / 'predictions.npz').write_bytes((truncated / 'predictions.npz').read_bytes()[:3000])
    inconsistent = make_run_folder(root, 'inconsistent', 14)
    runfiles.write_json(inconsistent / 'metrics.json', dict(m, test_acc=0.9))
    # A metrics.json of other predictions (consistent in itself): compare.py checks it against its own.
    other = metrics_for(predictions_with_accuracy(200, 0.5, np.random.default_rng(0)))
    other.write(make_run_folder(root, 'other-evaluation', 17))
    no_config = make_run_folder(root, 'no-config', 15)
    (no_config / 'config.json').unlink()
    make_run_folder(root, 'diverged', 16, evaluated=False,
                    diverged='the loss became nan at epoch 2, step 3 (lr 0.02); the last checkpoint is intact: ...')
    expected = {'training': 'in use by another process', 'interrupted': 'stopped before its test evaluation',
                'crashed': 'neither metrics.json nor a checkpoint', 'stopped': 'stopped early (time budget',
                'small-test-set': 'evaluated on 100 test images, the other runs on 200',
                'bad-json': 'not valid JSON', 'wrong-type': "'test_acc'", 'bit-flip': 'corrupt or truncated',
                'truncated': 'corrupt or truncated',
                'inconsistent': 'test_acc 0.9000 is not the accuracy of its confusion_matrix',
                'other-evaluation': 'does not match predictions.npz', 'no-config': 'no config.json'}
    with runfiles.RunFolderLock(training, 'main.py'):
        before = snapshot(root)
        code, _, err = run_compare(capsys, root, '--out', tmp_path / 'out')
        assert snapshot(root) == before
    assert code == 0, err
    md = (tmp_path / 'out' / 'comparison.md').read_text()
    left_out = md[md.index('## Left out'):]
    record = json.loads((tmp_path / 'out' / 'comparison.json').read_text())
    reasons = {r['run']: r['reason'] for r in record['left_out']}
    assert set(reasons) == set(expected)
    for name, words in expected.items():
        assert words in reasons[name], (name, reasons[name])
        assert f'left out {root / name}: ' in err and f'`{root / name}`: ' in left_out
    assert 'python main.py --resume' in reasons['interrupted'] and 'Traceback' not in err
    # The diverged run is no result but a count of its variant.
    (variant,) = record['variants']
    assert variant['finished'] == 2 and variant['diverged'] == 1
    assert '| baseline | 2 | 1 of 3 |' in md and 'diverged: the loss became nan at epoch 2, step 3' in md


def test_nothing_comparable_or_bad_arguments_exit_2_with_one_sentence(tmp_path, capsys):
    root = tmp_path / 'runs'
    good = make_run_folder(root, 'good', 0)
    make_run_folder(tmp_path / 'broken', 'only', epochs=0, evaluated=False, config=FAST, log=())
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'a-file').write_text('x')
    code, _, err = run_compare(capsys, tmp_path / 'broken')
    assert_refused(code, err, 'no comparable run among the 1 found', left_out=1)
    cases = [
        ([tmp_path / 'missing'], ['does not exist']),
        ([tmp_path / 'empty'], ['is not a run folder and holds none']),
        ([root, '--out', good / 'cmp'], ['inside the run folder', 'never writes into']),
        ([root, '--out', tmp_path / 'a-file'], ['is a file']),
        ([root, '--out', tmp_path / 'a-file' / 'sub'], ['a-file']),          # a file where a folder should be
        ([root, '--baseline', tmp_path / 'missing'], ['--baseline']),
        ([root, '--colour', 'red'], ['unrecognized arguments']),
        ([], ['RUN']),
    ]
    for args, words in cases:
        code, _, err = run_compare(capsys, *args)
        assert_refused(code, err, *words)
    assert not (good / 'cmp').exists() and not (root / 'comparison').exists()


# --------------------------------------------------------------------------
# Real runs of main.py
# --------------------------------------------------------------------------

def test_on_real_smoke_runs_with_a_diverged_one(tmp_path, capsys, monkeypatch):
    """main.py's smoke preset on a synthetic archive: 2 variants x 2 seeds, and one diverged run."""
    data = str(make_cifar_archive(tmp_path, n_per_batch=50, n_test=100))
    runs = tmp_path / 'runs'
    common = ['--preset', 'smoke', '--subset', '1', '--epochs', '1', '--data-dir', data]
    for seed in (0, 1):
        assert main.run(common + ['--seed', str(seed), '--out', str(runs / f'base-seed{seed}')]) == 0
        assert main.run(common + ['--seed', str(seed), '--seq-layout', 'flat',
                                  '--out', str(runs / f'flat-seed{seed}')]) == 0
    real_loss = CNNRNN.loss

    def diverging(self, X, y, **kw):
        _, grads, details = real_loss(self, X, y, **kw)
        return float('nan'), grads, details
    monkeypatch.setattr(CNNRNN, 'loss', diverging)
    assert main.run(common + ['--seed', '2', '--out', str(runs / 'base-seed2')]) == 1
    monkeypatch.undo()
    capsys.readouterr()
    before = snapshot(runs)
    code, out, err = run_compare(capsys, runs, '--baseline', runs / 'base-seed0')
    assert code == 0, err
    assert snapshot(runs) == before
    out_dir = runs / 'comparison'
    record = json.loads((out_dir / 'comparison.json').read_text())
    base, flat = record['variants']
    assert (base['label'], flat['label']) == ('baseline', 'seq_layout=flat')
    assert (base['finished'], base['diverged'], flat['finished'], flat['diverged']) == (2, 1, 2, 0)
    for v in (base, flat):
        for r in v['runs']:
            if r['status'] == 'finished':
                m = json.loads((Path(r['path']) / 'metrics.json').read_text())
                assert r['test_acc'] == m['test_acc'] and r['ece'] == m['ece']
        accs = [r['test_acc'] for r in v['runs'] if r['status'] == 'finished']
        assert v['test_acc']['mean'] == pytest.approx(np.mean(accs))
    diverged = next(r for r in base['runs'] if r['status'] == 'diverged')
    assert diverged['name'] == 'base-seed2' and 'the loss became nan' in diverged['diverged']
    assert record['left_out'] == [] and os.path.islink(runs / 'latest')
    for name in FIGURES:
        assert_valid_png(out_dir / name)
    assert 'baseline' in out and 'seq_layout=flat' in out


# --------------------------------------------------------------------------
# Hostile inputs through the command line (issue 18)
# --------------------------------------------------------------------------

CLI_TIMEOUT = 60         # seconds: a named pipe read by mistake blocks forever, and fails the test here


def compare_cli(*args, cwd=REPO_ROOT):
    """Run `python compare.py ARGS` as a user does; returns (exit code, stdout, stderr)."""
    p = subprocess.run([sys.executable, str(REPO_ROOT / 'compare.py'), *map(str, args)], cwd=cwd,
                       capture_output=True, text=True, timeout=CLI_TIMEOUT)
    return p.returncode, p.stdout, p.stderr


def strict_json(path):
    """Parse a JSON file, failing on NaN and Infinity, which strict JSON does not have."""
    def refuse(constant):
        raise ValueError(f'{path} holds {constant}, which is not JSON')
    return json.loads(Path(path).read_text(), parse_constant=refuse)


def suggested_commands(text):
    """Every `python main.py ...` command a message suggests, as argument lists."""
    commands = []
    for part in text.split('python main.py ')[1:]:
        words = shlex.split(part.split(';')[0])
        commands.append(words[:words.index('continues')] if 'continues' in words
                        else words[:words.index('redoes')] if 'redoes' in words else words)
    return commands


def hostile_runs(root):
    """Two good runs, and beside them one run folder per hostile case: {name: words its reason must hold}."""
    base = dict(ckpt=True, fingerprint='a' * 64)
    for seed in (0, 1):
        make_run_folder(root, f'good-seed{seed}', seed, 0.4, **base)
    make_run_folder(root, 'old-no-fingerprint', 2, 0.4)           # an older run: kept, compared by size
    cases = {}
    # Class 1: named pipes and folders where a file should be never block and are named.
    for name, file, kind in (('fifo-log', 'train.log', 'fifo'), ('fifo-metrics', 'metrics.json', 'fifo'),
                             ('fifo-config', 'config.json', 'fifo'), ('fifo-lock', '.lock', 'fifo'),
                             ('fifo-ckpt', 'ckpt.npz', 'fifo'), ('dir-predictions', 'predictions.npz', 'dir'),
                             ('fifo-history', 'history.json', 'fifo'), ('fifo-diverged', 'diverged.json', 'fifo')):
        run = make_run_folder(root, name, 3, **base)
        (run / file).unlink(missing_ok=True)
        os.mkfifo(run / file) if kind == 'fifo' else (run / file).mkdir()
        cases[name] = ['named pipe (FIFO)' if kind == 'fifo' else 'a folder', file]
    # Class 2: a crash (crashed.json) is a crash, not a divergence, with or without a checkpoint.
    for name, ckpt in (('crashed', True), ('crashed-early', False)):
        make_run_folder(root, name, 4, ckpt=ckpt, evaluated=False, crashed='ValueError: boom')
        cases[name] = ['crashed (ValueError: boom)', 'traceback is in']
    # A run that diverged, was resumed (which removes diverged.json) and then crashed.
    make_run_folder(root, 'diverged-then-crashed', 5, ckpt=True, crashed='KeyError: k',
                    log=['2024-01-01 12:01:00 error: the loss became nan at epoch 2, step 3 (lr 0.02); ...',
                         '2024-01-01 12:02:00 resuming x at epoch 2, step 0'])
    cases['diverged-then-crashed'] = ['crashed (KeyError: k)']
    # Class 5: numbers that are not numbers, or impossible ones.
    for name, (key, value) in (('nan-accuracy', ('test_acc', float('nan'))), ('accuracy-above-1', ('test_acc', 1.5)),
                               ('infinite-loss', ('test_loss', float('inf'))), ('nan-ece', ('ece', float('nan'))),
                               ('best-val-above-1', ('best_val_acc', 2.0))):
        run = make_run_folder(root, name, 6, ckpt=True)
        edit_json(run / 'metrics.json', **{key: value})
        cases[name] = ['inconsistent', 'metrics.json', key, f' = {value}']
    run = make_run_folder(root, 'history-nan', 6, ckpt=True)
    history = json.loads((run / 'history.json').read_text())
    history[1]['val_loss'] = float('nan')
    (run / 'history.json').write_text(json.dumps(history))
    cases['history-nan'] = ['inconsistent', 'history.json', 'record 2', 'val_loss', ' = nan']
    for name, scale in (('probabilities-sum-to-half', 0.5), ('probabilities-nan', float('nan'))):
        run = make_run_folder(root, name, 7, ckpt=True)
        preds = runfiles.read_npz(run / 'predictions.npz')
        runfiles.write_npz(run / 'predictions.npz', dict(preds, probs=preds['probs'] * np.float32(scale)))
        cases[name] = ['inconsistent', 'predictions.npz', 'sum to 1' if scale == 0.5 else 'finite']
    # Class 4: config.json edited after the run started disagrees with its checkpoint.
    run = make_run_folder(root, 'edited-config', 8, ckpt=True)
    edit_json(run / 'config.json', weight_decay=0, seed=80)
    cases['edited-config'] = ['inconsistent', 'config.json was changed', 'seed: 80 in config.json, 8 in ckpt.npz',
                              'weight_decay: 0 in config.json, 0.0005 in ckpt.npz']
    run = make_run_folder(root, 'damaged-ckpt', 9)
    (run / 'ckpt.npz').write_bytes(b'PK\x03\x04 not really a zip archive')
    cases['damaged-ckpt'] = ['damaged', 'ckpt.npz', 'mv ']
    run = make_run_folder(root, 'ckpt-a-npy', 9)
    with open(run / 'ckpt.npz', 'wb') as f:
        np.save(f, np.zeros(3))
    cases['ckpt-a-npy'] = ['damaged', 'not an .npz archive']
    run = make_run_folder(root, 'ckpt-meta-a-list', 9)
    runfiles.write_npz(run / 'ckpt.npz', {'meta': np.array('[1, 2]')})
    cases['ckpt-meta-a-list'] = ['damaged', 'no run configuration']
    # Another test set: the same size, another data fingerprint.
    make_run_folder(root, 'other-test-set', 10, ckpt=True, fingerprint='b' * 64)
    cases['other-test-set'] = ['another test set', 'bbbbbbbbbbbb']
    # Class 7: no checkpoint, so no --resume advice.
    run = make_run_folder(root, 'no-predictions-no-ckpt', 11)
    (run / 'predictions.npz').unlink()
    cases['no-predictions-no-ckpt'] = ['no checkpoint to evaluate again from', 'train it again in a new folder']
    return cases


def test_cli_leaves_out_pipes_crashes_non_numbers_and_edited_configs_with_the_reason(tmp_path):
    root = tmp_path / 'runs'
    cases = hostile_runs(root)
    # A diverged run resumed with a lower --lr and diverged again before its next checkpoint:
    # config.json's new lr is not an edit, and the run counts as diverged, not as inconsistent.
    lowered = make_run_folder(root, 'lowered-lr', 12, ckpt=True, evaluated=False,
                              diverged='the loss became inf at epoch 2, step 4 (lr 0.01); ...')
    change = {'global_step': 30, 'epoch': 2, 'step': 0, 'from': 0.02, 'to': 0.01}
    edit_json(lowered / 'config.json', lr=0.01, lr_changes=[change])
    # A run diverged as main.py records it: diverged.json, whatever train.log says (here: nothing).
    recorded = make_run_folder(root, 'diverged-json', 13, ckpt=True, evaluated=False)
    runfiles.Divergence(epoch=2, step=7, global_step=37, lr=0.02, loss='nan',
                        message='the loss became nan at epoch 2, step 7; ...').write(recorded)
    before = snapshot(root)
    start = time.monotonic()
    code, out, err = compare_cli(root, '--out', tmp_path / 'out')
    assert code == 0, err
    assert time.monotonic() - start < CLI_TIMEOUT and 'Traceback' not in err
    assert snapshot(root) == before
    record = strict_json(tmp_path / 'out' / 'comparison.json')
    reasons = {r['run']: r['reason'] for r in record['left_out']}
    assert set(reasons) == set(cases), set(reasons) ^ set(cases)
    for name, words in cases.items():
        for word in words:
            assert word in reasons[name], (name, word, reasons[name])
        assert f'compare.py: left out {root / name}: ' in err
    runs = {r['name']: r for v in record['variants'] for r in v['runs']}
    assert {n for n, r in runs.items() if r['status'] == 'finished'} == {'good-seed0', 'good-seed1',
                                                                          'old-no-fingerprint'}
    assert runs['lowered-lr']['status'] == 'diverged' and 'crashed' not in str(record['variants'])
    assert runs['diverged-json']['diverged'] == 'the loss became nan at epoch 2, step 7'
    # Every command a reason suggests names a checkpoint that exists; a run without one gets none.
    for name, reason in reasons.items():
        for words in suggested_commands(reason):
            ckpt = Path(words[1])          # main.py takes a ckpt.npz or the run folder holding one
            assert words[0] == '--resume' and (ckpt.is_file() or (ckpt / 'ckpt.npz').is_file()), (name, reason)
    for name in ('crashed-early', 'no-predictions-no-ckpt'):
        assert '--resume' not in reasons[name]
    assert 'nan%' not in (tmp_path / 'out' / 'comparison.md').read_text() and 'nan%' not in out


def test_cli_a_nan_accuracy_with_one_or_three_seeds_never_reaches_the_statistics(tmp_path):
    """The issue's example: a NaN test accuracy gave a traceback in the t-test with 3 seeds, and
    'nan%' and a non-JSON NaN in comparison.json with 1 seed."""
    for seeds in (1, 3):
        root = tmp_path / f'runs{seeds}'
        for seed in range(3):
            make_run_folder(root, f'base-seed{seed}', seed, 0.4 + 0.01 * seed)
        for seed in range(seeds):
            run = make_run_folder(root, f'wd-seed{seed}', seed, 0.3, weight_decay=0)
            edit_json(run / 'metrics.json', test_acc=float('nan'))
        make_run_folder(root, 'wd-seed9', 9, 0.3, weight_decay=0)
        code, out, err = compare_cli(root)
        assert code == 0 and 'Traceback' not in err, err
        record = strict_json(root / 'comparison' / 'comparison.json')
        assert len(record['left_out']) == seeds and 'nan%' not in out and 'nan ±' not in out
        wd = next(v for v in record['variants'] if v['label'] == 'weight_decay=0')
        assert wd['finished'] == 1 and wd['test_acc']['mean'] == pytest.approx(0.3)


@pytest.mark.parametrize('case, words', [
    ('empty', ['--out was given an empty path']),
    ('another run folder', ['is a run folder', 'never writes into run folders', '--out']),
    ('runs/latest', ['--out runs/latest is a run folder']),
    ('inside another run', ['is inside the run folder']),
    ('a file', ['is a file, not a folder']),
    ('a named pipe', ['is a named pipe (FIFO), not a folder']),
    ('a link to nothing', ['is a link to', 'which does not exist']),
    ('comparison.md is a pipe', ['comparison.md', 'named pipe (FIFO)']),
    ('empty baseline', ['--baseline was given an empty path']),
    ('baseline config.json is a pipe', ['--baseline', 'config.json: it is a named pipe (FIFO)']),
])
def test_cli_refuses_an_output_that_is_not_ours_with_one_sentence(tmp_path, case, words):
    work = tmp_path / 'work'                       # the current folder: '' must not mean it
    runs = work / 'runs'
    make_run_folder(runs, 'a-seed0', 0, 0.4)
    other = make_run_folder(tmp_path / 'elsewhere', 'other-run', 1, 0.5)
    (runs / 'latest').symlink_to('a-seed0')
    (work / 'cmp').mkdir()
    out = {'empty': '', 'another run folder': other, 'runs/latest': 'runs/latest',
           'inside another run': other / 'figures' / 'cmp', 'a file': other / 'train.log',
           'a named pipe': work / 'pipe', 'a link to nothing': work / 'dangling', 'comparison.md is a pipe': 'cmp',
           'empty baseline': 'cmp', 'baseline config.json is a pipe': 'cmp'}[case]
    if case == 'a named pipe':
        os.mkfifo(work / 'pipe')
    if case == 'a link to nothing':
        (work / 'dangling').symlink_to(tmp_path / 'nowhere')
    if case == 'comparison.md is a pipe':
        os.mkfifo(work / 'cmp' / 'comparison.md')
    extra = ['--baseline', ''] if case == 'empty baseline' else []
    if case == 'baseline config.json is a pipe':
        (work / 'piped').mkdir()
        os.mkfifo(work / 'piped' / 'config.json')
        extra = ['--baseline', 'piped']
    before = snapshot(tmp_path)
    listing = sorted(p.name for p in work.iterdir())
    code, out_text, err = compare_cli('runs', '--out', out, *extra, cwd=work)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith('compare.py: '), err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert snapshot(tmp_path) == before and sorted(p.name for p in work.iterdir()) == listing
    assert not (work / 'cmp' / 'val_accuracy.png').exists() and not (tmp_path / 'nowhere').exists()


def test_cli_relative_paths_and_runs_latest_work(tmp_path):
    work = tmp_path / 'work'
    runs = work / 'runs'
    for seed in range(2):
        make_run_folder(runs, f'a-seed{seed}', seed, 0.4)
    (runs / 'latest').symlink_to('a-seed1')
    stopped = make_run_folder(runs, 'stopped seed', 3, 0.4, ckpt=True, stopped_early=True)     # a space in its name
    code, out, err = compare_cli('runs/latest', 'runs/a-seed0', stopped, '--out', 'cmp', '--baseline', 'runs/latest',
                                 cwd=work)
    assert code == 0, err
    record = strict_json(work / 'cmp' / 'comparison.json')
    assert [r['name'] for r in record['variants'][0]['runs']] == ['a-seed1', 'a-seed0']
    # The command the stopped run's reason suggests works from where compare.py was run.
    (reason,) = [r['reason'] for r in record['left_out']]
    words = shlex.split(reason[reason.index('python '):].split(' continues it')[0])
    assert words[0] == 'python' and words[1].endswith('main.py') and (work / words[1]).is_file(), reason
    assert words[2] == '--resume' and (work / words[3]).is_file() and words[3].endswith('ckpt.npz'), reason


@pytest.mark.skipif(not Path('/proc/self/status').exists(), reason='needs /proc')
@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM])
def test_cli_an_interrupt_while_starting_ends_with_one_line_and_exit_130(tmp_path, signum):
    runs = tmp_path / 'runs'
    for seed in range(3):
        make_run_folder(runs, f'a-seed{seed}', seed, 0.4)
    proc = subprocess.Popen([sys.executable, str(REPO_ROOT / 'compare.py'), str(runs)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for_handler(proc), 'compare.py never installed its start-up interrupt handler'
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=CLI_TIMEOUT)
    finally:
        proc.kill()
    assert proc.returncode == 130, (proc.returncode, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f'interrupted by {signal.Signals(signum).name}' in lines[0], err
    assert not (runs / 'comparison').exists()


def test_an_unexpected_error_is_a_crash_with_exit_3_and_one_line(tmp_path, capsys, monkeypatch):
    make_run_folder(tmp_path / 'runs', 'a-seed0', 0, 0.4)

    def broken(run_dir):
        raise ZeroDivisionError('a bug')
    monkeypatch.setattr(compare, 'read_run', broken)
    code, _, err = run_compare(capsys, tmp_path / 'runs')
    assert code == 3 and len(err.strip().splitlines()) == 1 and 'compare.py crashed (ZeroDivisionError: a bug)' in err


def test_compare_learns_what_a_run_holds_from_the_contract(tmp_path, monkeypatch):
    """compare.py reads every run folder through runfiles.read_run (the checks viz.py and every
    other reader share): NaN, impossible figures or probabilities that do not sum to 1 leave a run
    out as inconsistent, with the file and the value named."""
    read = []
    real = runfiles.read_run
    monkeypatch.setattr(runfiles, 'read_run', lambda folder, *args: read.append(folder) or real(folder, *args))
    root = tmp_path / 'runs'
    cases = {}
    for name, key, value in (('nan-acc', 'test_acc', float('nan')), ('acc-1.5', 'test_acc', 1.5),
                             ('inf-loss', 'test_loss', float('inf')), ('ece-nan', 'ece', float('nan')),
                             ('best-val-2', 'best_val_acc', 2.0), ('fingerprint-a-list', 'data_fingerprint', [1])):
        edit_json(make_run_folder(root, name) / 'metrics.json', **{key: value})
        cases[name] = f"metrics.json has '{key}' = "
    run = make_run_folder(root, 'history-inf')
    history = json.loads((run / 'history.json').read_text())
    history[0]['train_loss'] = float('inf')
    (run / 'history.json').write_text(json.dumps(history))
    cases['history-inf'] = "history.json has record 1's 'train_loss' = inf"
    for name, scale in (('probs-half', 0.5), ('probs-nan', float('nan'))):
        run = make_run_folder(root, name)
        preds = runfiles.read_npz(run / 'predictions.npz')
        runfiles.write_npz(run / 'predictions.npz', dict(preds, probs=preds['probs'] * np.float32(scale)))
        cases[name] = 'do not sum to 1' if scale == 0.5 else 'non-finite probabilities'
    for name, words in cases.items():
        run = compare.read_run(root / name)
        assert run.status == 'left out' and run.reason.startswith('inconsistent: '), (name, run.reason)
        assert words in run.reason, (name, run.reason)
    assert compare.read_run(make_run_folder(root, 'good')).status == 'finished'
    assert [Path(p).name for p in read] == list(cases) + ['good']
