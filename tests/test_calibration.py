"""Temperature scaling in main.py's final evaluation (issue 21), and how viz.py shows it: smoke runs
of main.py's command line on a synthetic archive, a run folder of an earlier version re-evaluated
by main.py in its own process, and the reliability diagram's two curves."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest

import data_utils as du
import main
import runfiles
import viz
from cnn_rnn_numpy import CNNRNN
from conftest import REPO_ROOT, make_cifar_archive, softmax, train_run
from metrics import apply_temperature, calibration_report, expected_calibration_error, fit_temperature

REPORT_KEYS = {'nll', 'ece', 'ece_equal_mass', 'ece_debiased', 'ece_ci95', 'ece_if_calibrated', 'distinguishable',
               'mean_confidence', 'accuracy'}
SENTENCE = 'distinguishable from a perfectly calibrated model'


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return str(make_cifar_archive(tmp_path_factory.mktemp('cifar'), n_per_batch=50, n_test=100))


@pytest.fixture(scope='module')
def flip_run(data_dir, tmp_path_factory):
    """A 2-epoch smoke run with flip averaging that also writes the calibrated probabilities."""
    out = tmp_path_factory.mktemp('runs') / 'flip'
    assert train_run(data_dir, out, '--epochs', '2', '--set', 'tta_flip=true',
                     '--set', 'calibrated_predictions=true') == 0
    return out


def outputs_of_best(run, data_dir, flip):
    """{'val': (probs, labels), 'test': (probs, labels)} of the run's best.npz, computed here with
    the run's own normalisation, flip-averaged or not."""
    model = CNNRNN.load(run / 'best.npz')
    data = du.load_cifar10(data_dir, subset=1.0, seed=0)
    mean, std = main.load_checkpoint(run / 'ckpt.npz').state.normalization()
    return {split: (main.evaluate(model, du.BatchIterator(data[f'X_{split}'], data[f'y_{split}'], 500, mean=mean,
                                                          std=std), 'flip' if flip else 'none')[2], data[f'y_{split}'])
            for split in ('val', 'test')}


def test_the_temperature_is_fitted_on_the_flip_averaged_validation_outputs_of_the_parameters_tested(
        flip_run, data_dir):
    m = json.loads((flip_run / 'metrics.json').read_text())
    T = m['temperature']
    assert isinstance(T, float) and math.isfinite(T) and T > 0
    flipped, single = outputs_of_best(flip_run, data_dir, True), outputs_of_best(flip_run, data_dir, False)
    assert T == pytest.approx(fit_temperature(*flipped['val']), rel=1e-12)
    # Not the single view's, nor the test set's: the reported outputs of the validation set.
    assert abs(T - fit_temperature(*single['val'])) > 1e-6 and abs(T - fit_temperature(*flipped['test'])) > 1e-6
    assert m['calibration']['validation']['images'] == len(flipped['val'][1]) == 25


def test_metrics_json_holds_the_raw_and_the_calibrated_reports_and_accuracy_is_unchanged(flip_run):
    m = json.loads((flip_run / 'metrics.json').read_text())
    raw, cal = m['calibration']['raw'], m['calibration']['calibrated']
    assert set(raw) == set(cal) == REPORT_KEYS
    with np.load(flip_run / 'predictions.npz') as p:
        probs, labels, calibrated = p['probs'], p['labels'], p['probs_calibrated']
    # The raw figures are the method's, as metrics.json always had them.
    assert raw['ece'] == m['ece'] and raw['nll'] == pytest.approx(m['test_loss'], abs=1e-9)
    expected = calibration_report(apply_temperature(probs, m['temperature']), labels)
    for key in ('nll', 'ece', 'ece_equal_mass', 'ece_debiased', 'mean_confidence'):
        assert cal[key] == pytest.approx(expected[key], abs=1e-12), key
    assert cal['ece_ci95'] == pytest.approx(expected['ece_ci95']) and cal['distinguishable'] == expected['distinguishable']
    assert cal['nll'] != raw['nll'] and cal['mean_confidence'] != raw['mean_confidence']
    # Temperature scaling changes no prediction: same argmax, same accuracy.
    assert raw['accuracy'] == cal['accuracy'] == m['test_acc']
    # calibrated_predictions=true: predictions.npz holds them, rows summing to 1, the same argmax.
    np.testing.assert_allclose(calibrated.sum(axis=1), 1, atol=1e-9)
    np.testing.assert_array_equal(calibrated.argmax(axis=1), probs.argmax(axis=1))
    np.testing.assert_allclose(calibrated, apply_temperature(probs, m['temperature']), atol=1e-12)
    assert runfiles.read_run(flip_run).predictions.probs_calibrated is not None


def test_the_run_summary_shows_raw_and_calibrated_nll_and_ece_and_t(flip_run):
    m = json.loads((flip_run / 'metrics.json').read_text())
    log = (flip_run / 'train.log').read_text()
    raw, cal = m['calibration']['raw'], m['calibration']['calibrated']
    assert 'calib    raw' in log and f"NLL {raw['nll']:.4f}  ECE {raw['ece']:.4f}" in log
    assert f"calibrated, T = {m['temperature']:.3f}" in log and f"NLL {cal['nll']:.4f}  ECE {cal['ece']:.4f}" in log
    assert 'T fitted on 25 validation images' in log


def test_the_summary_says_when_t_is_at_an_end_of_its_search_range(flip_run):
    m = runfiles.read_metrics(flip_run)
    assert 'end of its search range' not in '\n'.join(main.calibration_lines(m))
    for t in (0.05, 20.0):
        m.temperature = t
        assert "end of its search range (0.05 to 20)" in main.calibration_lines(m)[-1]


def test_viz_draws_raw_and_calibrated_and_says_in_one_sentence_whether_it_is_distinguishable(flip_run):
    assert viz.main([str(flip_run), '--tsne-samples', '0', '--gallery-size', '0']) == 0
    m = json.loads((flip_run / 'metrics.json').read_text())
    report = (flip_run / 'report.md').read_text()
    raw, cal = m['calibration']['raw'], m['calibration']['calibrated']
    assert f"| Test loss (NLL) | {m['test_loss']:.4f} raw, {cal['nll']:.4f} calibrated (T = {m['temperature']:.3f}) |" \
        in report
    section = report.split('## Calibration')[1].split('\n## ')[0]
    assert f"| | raw | calibrated (T = {m['temperature']:.3f}) |" in section
    assert f"| ECE, 15 equal-mass bins | {raw['ece_equal_mass']:.4f} | {cal['ece_equal_mass']:.4f} |" in section
    assert f"| ECE, debiased (Kumar et al. 2019) | {raw['ece_debiased']:.4f} | {cal['ece_debiased']:.4f} |" in section
    assert f"{raw['ece_ci95'][0]:.4f} to {raw['ece_ci95'][1]:.4f}" in section
    assert f"{raw['ece_if_calibrated']['mean']:.4f} ({raw['ece_if_calibrated']['p95']:.4f})" in section
    # ONE sentence on whether the model can be told apart from a calibrated one.
    sentences = [line for line in report.splitlines() if SENTENCE in line]
    assert len(sentences) == 1 and sentences[0].count('. ') == 0 and sentences[0].endswith('.')
    said = 'distinguishable' if raw['distinguishable'] else 'not distinguishable'
    assert sentences[0].startswith(f'The raw predictions are {said} from a perfectly calibrated model')
    assert 'after temperature scaling they are' in sentences[0]
    # The diagram's caption: raw, as in metrics.json, and calibrated by the recorded T.
    assert (f"ECE in the diagram: {m['ece']:.4f} (equal to metrics.json) for the raw predictions, "
            f"{cal['ece']:.4f} after temperature scaling with T = {m['temperature']:.3f}") in report


def test_the_reliability_diagram_has_a_raw_and_a_calibrated_curve():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 2000)
    logits = rng.normal(size=(2000, 10))
    logits[np.arange(2000), labels] += 1.5
    probs = softmax(3 * logits)                   # over-confident
    calibrated = apply_temperature(probs, 3.0)
    fig = viz.plot_reliability(probs, labels, calibrated=calibrated, temperature=3.0)
    ax = fig.axes[0]
    curves = [line.get_label() for line in ax.get_lines()]
    ece, ece_cal = expected_calibration_error(probs, labels), expected_calibration_error(calibrated, labels)
    assert curves == ['perfect calibration', f'raw: ECE {ece:.4f}', f'calibrated, T = 3.000: ECE {ece_cal:.4f}']
    assert f'ECE = {ece:.4f} raw, {ece_cal:.4f} calibrated' in ax.get_title() and ece_cal < ece
    # Without a temperature: the raw curve alone, and the title says so.
    fig = viz.plot_reliability(probs, labels)
    assert [line.get_label() for line in fig.axes[0].get_lines()] == ['perfect calibration', f'raw: ECE {ece:.4f}']
    assert 'raw only' in fig.axes[0].get_title()


def test_evaluate_of_a_run_folder_without_a_temperature_fits_it(data_dir, tmp_path):
    """A run folder of an earlier version (metrics.json without temperature): viz.py draws the raw
    predictions alone and says so; `main.py --resume RUN --evaluate`, typed as a user does, fits T,
    and with --set calibrated_predictions=true adds the calibrated probabilities."""
    run = tmp_path / 'old'
    assert train_run(data_dir, run, '--epochs', '1') == 0
    with np.load(run / 'predictions.npz') as p:
        assert 'probs_calibrated' not in p.files          # the preset key is off by default
    m = json.loads((run / 'metrics.json').read_text())
    old = {k: v for k, v in m.items() if k not in ('temperature', 'calibration')}
    runfiles.write_json(run / 'metrics.json', old)
    assert runfiles.read_metrics(run).temperature is None

    assert viz.main([str(run), '--tsne-samples', '0', '--gallery-size', '0']) == 0
    report = (run / 'report.md').read_text()
    assert 'metrics.json holds no temperature' in report and 'No temperature is recorded for this run' in report
    assert 'calibrated (T =' not in report and '--evaluate' in report
    assert sum(SENTENCE in line for line in report.splitlines()) == 1

    proc = subprocess.run([sys.executable, str(REPO_ROOT / 'main.py'), '--resume', str(run), '--evaluate',
                           '--set', 'calibrated_predictions=true'], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    again = json.loads((run / 'metrics.json').read_text())
    assert math.isfinite(again['temperature']) and again['temperature'] > 0
    assert set(again['calibration']['raw']) == set(again['calibration']['calibrated']) == REPORT_KEYS
    assert again['test_acc'] == old['test_acc'] and again['ece'] == old['ece']
    assert 'calibrated, T = ' in proc.stdout
    assert json.loads((run / 'config.json').read_text())['calibrated_predictions'] is True
    with np.load(run / 'predictions.npz') as p:
        np.testing.assert_array_equal(p['probs_calibrated'].argmax(1), p['probs'].argmax(1))
    assert viz.main([str(run), '--tsne-samples', '0', '--gallery-size', '0']) == 0
    assert f"calibrated (T = {again['temperature']:.3f})" in (run / 'report.md').read_text()
