"""Tests of claims.py, the suite runner: the plan, refusals, and a tiny suite
(2 variants x 2 seeds of the smoke preset on a synthetic archive) that
resumes an interrupted run, restarts a crashed one, keeps a diverged one,
skips everything on a second pass, stops cleanly on SIGTERM, and ends with
the comparison."""
import json
import shlex
import signal
import subprocess
import sys
import time

import pytest

import claims
import main
from cnn_rnn_numpy import CNNRNN
from conftest import REPO_ROOT, make_cifar_archive


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return str(make_cifar_archive(tmp_path_factory.mktemp('cifar'), n_per_batch=50, n_test=100))


def smoke_extra(data_dir):
    return f'--data-dir {data_dir} --subset 1 --epochs 1'


def plan_lines(out):
    """{(variant, seed): action} from the plan that claims.py prints first."""
    plan = {}
    for line in out.splitlines():
        words = line.split()
        if len(words) >= 4 and words[0] in claims.VARIANTS and words[1] == 'seed':
            plan.setdefault((words[0], int(words[2])), words[3])
    return plan


def test_the_dry_run_prints_the_plan_and_every_command_and_runs_nothing(tmp_path, capsys):
    runs = tmp_path / 'claims'
    assert claims.main(['--runs-dir', str(runs), '--dry-run']) == 0
    out = capsys.readouterr().out
    assert plan_lines(out) == {(v, s): 'run' for v in claims.VARIANTS for s in (0, 1, 2)}
    command = 'python main.py --preset fast --subset 0.4 --set weight_decay=0 --seed 1 --out'
    assert f"{command} {runs / 'no-weight-decay-seed1'}" in out
    for options in ('--set clip=0', '--set warmup_epochs=0', '--set decay=1', '--set augment=false',
                    '--seq-layout flat', '--seq-layout rows', '--cell gru', '--cell lstm'):
        assert options in out
    assert '30 run' in out and not runs.exists()


@pytest.mark.parametrize('args, words', [
    (['--only', 'baseline', 'no-dropout'], 'unknown variant no-dropout'),
    (['--seeds', '-1'], '--seeds -1'),
    (['--seeds', '0', '0'], 'repeats a seed'),
    (['--extra', '--seed 3'], '--extra cannot contain --seed'),
    (['--extra', '--data-dir "x'], 'quotes'),
    (['--runs-dir', ' '], 'empty path'),
    (['--colour', 'red'], 'unrecognized arguments'),
])
def test_bad_arguments_exit_2_with_one_sentence(tmp_path, capsys, args, words):
    assert claims.main(['--runs-dir', str(tmp_path / 'c'), '--dry-run', *args]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('claims.py: ') and words in lines[0], err


def test_a_resumed_run_keeps_only_the_options_main_py_allows_on_resume(tmp_path):
    extra = shlex.split('--data-dir /d --epochs 1 --max-hours=0.5 --subset 1')
    assert claims.resume_args(tmp_path / 'r', extra) == [
        '--resume', str(tmp_path / 'r' / 'ckpt.npz'), '--data-dir', '/d', '--max-hours=0.5']
    assert claims.resume_args(tmp_path / 'r', [], evaluate=True)[-1] == '--evaluate'


def test_a_tiny_suite_resumes_restarts_keeps_divergence_skips_and_compares(data_dir, tmp_path, capfd,
                                                                          monkeypatch):
    runs = tmp_path / 'claims'
    extra = smoke_extra(data_dir)
    tokens = shlex.split(extra)
    # baseline seed 0: interrupted by its time budget in its first step (a checkpoint, stopped early).
    assert main.run(claims.train_args('baseline', 0, runs / 'baseline-seed0', 'smoke', tokens)
                    + ['--max-hours', '1e-9']) == 0
    # flat seed 1: diverged at its first step (no checkpoint, the error in train.log).
    real_loss = CNNRNN.loss

    def diverging(self, X, y, **kw):
        _, grads, details = real_loss(self, X, y, **kw)
        return float('nan'), grads, details
    monkeypatch.setattr(CNNRNN, 'loss', diverging)
    assert main.run(claims.train_args('flat', 1, runs / 'flat-seed1', 'smoke', tokens)) == 1
    monkeypatch.undo()
    # flat seed 0: crashed in its first epoch (files, no checkpoint, no error line).
    crashed = runs / 'flat-seed0'
    crashed.mkdir()
    (crashed / 'config.json').write_text((runs / 'flat-seed1' / 'config.json').read_text())
    (crashed / 'train.log').write_text('2024-01-01 12:00:00 run flat-seed0: preset smoke\n')
    capfd.readouterr()

    args = ['--runs-dir', str(runs), '--preset', 'smoke', '--only', 'baseline', 'flat', '--seeds', '0', '1',
            '--extra', extra]
    assert claims.main(args) == 0
    out, _ = capfd.readouterr()
    assert plan_lines(out) == {('baseline', 0): 'resume', ('baseline', 1): 'run',
                               ('flat', 0): 'restart', ('flat', 1): 'diverged'}
    assert 'Total wall time' in out
    for name in ('baseline-seed0', 'baseline-seed1', 'flat-seed0'):
        metrics = json.loads((runs / name / 'metrics.json').read_text())
        assert metrics['stopped_early'] is False and metrics['epochs_done'] == 1, name
    (moved,) = runs.glob('flat-seed0.failed-*')
    assert (moved / 'train.log').read_text().startswith('2024-01-01 12:00:00 run flat-seed0')
    assert not (runs / 'flat-seed1' / 'metrics.json').exists()
    record = json.loads((runs / 'comparison' / 'comparison.json').read_text())
    counts = {v['label']: (v['finished'], v['diverged']) for v in record['variants']}
    assert counts == {'baseline': (2, 0), 'seq_layout=flat': (1, 1)}
    assert [r['run'] for r in record['left_out']] == [moved.name]
    assert (runs / 'comparison' / 'comparison.md').is_file()

    # A second pass: everything is finished or diverged, nothing runs, the comparison is redone.
    finished = {name: (runs / name / 'metrics.json').read_bytes() for name in ('baseline-seed0', 'flat-seed0')}
    assert claims.main(args) == 0
    out, _ = capfd.readouterr()
    assert set(plan_lines(out).values()) == {'finished', 'diverged'} and '[1/' not in out
    assert all((runs / name / 'metrics.json').read_bytes() == b for name, b in finished.items())


def test_sigterm_stops_the_running_main_py_cleanly_and_then_the_suite(data_dir, tmp_path):
    runs = tmp_path / 'claims'
    proc = subprocess.Popen([sys.executable, 'claims.py', '--runs-dir', str(runs), '--preset', 'smoke',
                             '--only', 'baseline', '--seeds', '0', '1', '--extra', f'--data-dir {data_dir} --subset 1'],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # main.py writes config.json after installing its signal handlers, just before training.
    deadline = time.time() + 60
    while not (runs / 'baseline-seed0' / 'config.json').exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == claims.EXIT_INTERRUPTED, output
    metrics = json.loads((runs / 'baseline-seed0' / 'metrics.json').read_text())
    assert metrics['stopped_early'] is True and 'SIGTERM' in metrics['stop_reason']
    assert not (runs / 'baseline-seed1').exists() and 'run the same command again' in output
    assert claims.plan_run(runs / 'baseline-seed0') == ('resume', '')
