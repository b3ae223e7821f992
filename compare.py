"""Compare run folders: variants over seeds, their test accuracy, and whether a difference is noise.

    python compare.py RUN [RUN ...] [--out DIR] [--baseline RUN]

Each RUN is a run folder written by main.py, or a folder holding run folders
(runs/claims: its subfolders that are run folders are taken). Links such as
runs/latest are resolved and a run given twice counts once.

Runs are grouped into variants by their config.json, except the keys that
do not change what is trained: the seed, the data folder, the preset's name
and description (two presets with the same settings train the same thing),
the record of learning-rate changes on resume, and calibrated_predictions
(which only adds the calibrated probabilities to predictions.npz). A variant is labelled by the
keys in which it differs from the baseline variant (e.g. 'weight_decay=0',
'seq_layout=flat'). The baseline is the variant of --baseline RUN; without it,
the variant whose settings are those of presets.json's `fast` preset; without
that, the variant with the most runs.

Written into --out (default: `comparison/` beside the run folders, i.e. in the
folder that holds them; runs/claims/comparison for `compare.py runs/claims`):

    val_accuracy.png   validation accuracy per epoch: per variant the mean over
                       seeds as a line, the min-max band over seeds around it
    test_accuracy.png  test accuracy per variant: mean, +- std whiskers, every seed's point
    comparison.md      the table (variant, seeds, test accuracy and ECE mean +- std,
                       wall time, what differs from the baseline), raw and calibrated
                       NLL and ECE, each variant against the baseline (Welch's t-test
                       with Holm's correction), every run, the runs left out
    comparison.json    the same numbers, machine-readable (strict JSON: no NaN)

Each variant's mean test accuracy is tested against the baseline's by Welch's t-test (exact
degrees of freedom and two-sided p from scipy.stats, metrics.welch_test); the p-values of the
variants tested against the one baseline are adjusted together by Holm's method
(metrics.holm_adjust), and a difference is *better* or *worse* when its adjusted p is below 5%,
else *within noise* (*too few runs* below 2 finished runs a side).

--out must not be a run folder or lie inside one, and is never the current
folder by accident (an empty --out is refused).

A run that cannot be compared is named (on stderr and in comparison.md) and
left out, not fatal: still training (its folder is locked by another process),
interrupted or stopped early before finishing its epochs, crashed (main.py
recorded the crash in crashed.json), no metrics yet, damaged files (including a
named pipe or a folder where one of its files should be), inconsistent files
(figures that are not finite or impossible, probabilities whose rows do not
sum to 1, a metrics.json that its predictions.npz does not give, a config.json
edited after the run started so that it differs from the configuration saved
in ckpt.npz), or a test set other than the other runs' (another size, or
another data fingerprint). A run whose loss diverged (main.py exit code 1, and
diverged.json) is not left out but counted as 'diverged' in its variant: for a
claim such as "clipping prevents divergence" that count is the result.

Run folders are only read, through the run-folder contract (runfiles.read_run
and runfiles.status, which decide what a run folder is and what state it is
in), never written: the lock is probed without taking it over. Exit codes (cli.py): 0
written; 2 bad arguments, no comparable run, or the output cannot be written
(one sentence on stderr); 3 crashed (a bug); 130 interrupted (before writing,
nothing was changed; while writing, run the command again).
"""
import cli                      # standard library only: set up before the slow imports below

if __name__ == '__main__':
    cli.exit_cleanly_on_interrupt_while_starting()

import argparse
import contextlib
import datetime
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import viz
import config
import runfiles
from config import Config
from metrics import accuracy, expected_calibration_error, holm_adjust, welch_test
from runfiles import (NotRegularFile, RecordError, RunFileError, check_regular, describe_os_error, file_kind,
                      resolve_folder, write_atomic, write_json, write_text)

EXIT_OK, EXIT_BAD_INPUT, EXIT_CRASHED, EXIT_ABORTED = (cli.EXIT_OK, cli.EXIT_BAD_INPUT, cli.EXIT_CRASHED,
                                                       cli.EXIT_ABORTED)

REPO = Path(__file__).resolve().parent
BASELINE_PRESET = 'fast'
# Configuration keys that do not define a variant (see the module docstring).
NOT_SETTINGS = ('seed', 'data_dir', 'description', 'preset', 'lr_changes', 'calibrated_predictions')
# Keys in which config.json may differ from the copy saved in ckpt.npz without an edit:
# the data folder may move (main.py --resume --data-dir), names do not change what is trained,
# and lr_changes is checked on its own (a resume with --lr rewrites config.json first).
NOT_CHECKED_AGAINST_CHECKPOINT = ('data_dir', 'description', 'preset', 'lr_changes')
# Keys added to config.json after some runs were made, with the value those runs had.
KEY_DEFAULTS = Config.defaults()
# What compare.py writes into --out.
OUT_FILES = ('val_accuracy.png', 'test_accuracy.png', 'comparison.md', 'comparison.json')
# The family-wise error rate of the verdicts: Holm-adjusted p below it is a difference.
ALPHA = 0.05


class CompareError(Exception):
    """Bad arguments, nothing to compare, or an output that cannot be written: one sentence."""


class LeftOut(Exception):
    """A run that cannot be compared; the message is the reason, with what to do about it."""


@dataclass
class RunResult:
    """One run folder as the comparison counts it (read_run).

    status: 'finished', 'diverged' (counted in its variant) or 'left out' (reason says why and
    what to do; for a diverged run, where it diverged). config, seed and settings (what defines
    its variant) for a usable run; for a finished one test_acc, ece, nll (the raw test loss),
    wall_time_s, epochs_done, test_images, test_fingerprint (sha256 hex of its test set, None in
    older runs), val_acc (per-epoch fractions, None for a missing value), and temperature,
    ece_calibrated and nll_calibrated (metrics.json's temperature scaling; None in older runs).
    """
    name: str
    path: Path
    status: str = 'left out'
    reason: str = None
    config: dict = None
    seed: int = None
    settings: dict = None
    test_acc: float = None
    ece: float = None
    wall_time_s: float = None
    epochs_done: int = None
    test_images: int = None
    test_fingerprint: str = None
    val_acc: list = None
    nll: float = None
    temperature: float = None
    ece_calibrated: float = None
    nll_calibrated: float = None


@dataclass
class Variant:
    """The runs of one setting: label (what differs from the baseline, or 'baseline'),
    is_baseline, settings, differs [(key, baseline value, this value)], runs (RunResult; the
    finished and the diverged), and over the finished ones test_acc, ece, nll and wall_time_s
    ({'mean', 'std', 'values'}; over those that have them, temperature, ece_calibrated and
    nll_calibrated), val_curve, and vs_baseline (welch() with Holm's adjustment and the verdict,
    None for the baseline)."""
    label: str
    is_baseline: bool
    settings: dict
    differs: list
    runs: list
    test_acc: dict = None
    ece: dict = None
    nll: dict = None
    wall_time_s: dict = None
    temperature: dict = None
    ece_calibrated: dict = None
    nll_calibrated: dict = None
    val_curve: dict = None
    vs_baseline: dict = None

    @property
    def finished(self):
        return [r for r in self.runs if r.status == 'finished']

    @property
    def diverged(self):
        return [r for r in self.runs if r.status == 'diverged']


quoted = cli.typed_path
main_command = runfiles.main_command


# --------------------------------------------------------------------------
# Finding the run folders
# --------------------------------------------------------------------------

def expand_runs(paths):
    """The run folders that the command-line arguments name, resolved, each once, in order.

    A run folder stands for itself; any other folder for its subfolders that
    are run folders (sorted by name). Raises RunFileError for a path that is
    not a folder (runfiles.resolve_folder) and CompareError for a folder that
    holds no run.
    """
    found = []
    for given in paths:
        real = resolve_folder(given, 'give a run folder or a folder of run folders such as runs/claims')
        if runfiles.is_run_folder(real):
            found.append(real)
            continue
        inside = sorted(p for p in map(_resolved, real.iterdir()) if p is not None and runfiles.is_run_folder(p))
        if not inside:
            raise CompareError(f'{given} is not a run folder and holds none; give folders written by '
                               f'main.py, or a folder of them such as runs/claims')
        found += inside
    return list(dict.fromkeys(found))


def _resolved(path):
    """The real path behind links, or None for a loop of links."""
    try:
        return path.resolve()
    except (RuntimeError, OSError):
        return None


# --------------------------------------------------------------------------
# One run's configuration against its checkpoint
# --------------------------------------------------------------------------

def config_edits(config, saved):
    """[(key, config.json's value, the checkpoint's value)] in which config.json differs from the
    configuration saved in ckpt.npz, or [] when they agree.

    Keys absent on one side count as their default (older runs). A resume with
    --lr rewrites config.json (lr and lr_changes) before its next checkpoint:
    that, and only that, is not an edit.
    """
    def comparable(c):
        values = dict(KEY_DEFAULTS)
        values.update({k: v for k, v in c.items() if k not in NOT_CHECKED_AGAINST_CHECKPOINT})
        return values
    now, then = comparable(config), comparable(saved)
    edits = [(k, now.get(k), then.get(k)) for k in sorted(set(now) | set(then))
             if canonical(now.get(k)) != canonical(then.get(k))]
    changes, before = config.get('lr_changes'), saved.get('lr_changes') or []
    lr_pending = (isinstance(changes, list) and isinstance(before, list) and len(changes) > len(before)
                  and changes[:len(before)] == before and isinstance(changes[-1], dict)
                  and canonical(changes[-1].get('to')) == canonical(config.get('lr')))
    if [k for k, _, _ in edits] == ['lr'] and lr_pending:
        return []
    return edits


def check_against_checkpoint(run_dir, config):
    """LeftOut if ckpt.npz cannot be read or its saved configuration differs from config.json.

    A run without ckpt.npz has nothing to be checked against and passes.
    """
    path = Path(run_dir) / runfiles.CHECKPOINT_NAME
    if not path.exists():
        return
    try:
        saved = runfiles.checkpoint_meta(path)['run_config']
    except RunFileError as e:
        raise LeftOut(f'damaged: {e} and its configuration cannot be checked: restore it, or move it away '
                      f'(mv {quoted(path)} {quoted(str(path) + ".damaged")}) to compare the run by its '
                      f'config.json alone') from None
    edits = config_edits(config, saved)
    if edits:
        shown = '; '.join(f'{k}: {_short(show(a))} in config.json, {_short(show(b))} in ckpt.npz'
                          for k, a, b in edits[:5]) + ('; ...' if len(edits) > 5 else '')
        raise LeftOut(f'inconsistent: its config.json was changed after the run started and differs from '
                      f'the configuration saved in its checkpoint ({shown}), so its variant is uncertain; '
                      f"put back the checkpoint's values in {Path(run_dir) / runfiles.CONFIG_NAME} "
                      f'(they are what it trained with)')


def _short(text, limit=40):
    return text if len(text) <= limit else text[:limit - 3] + '...'


# --------------------------------------------------------------------------
# Reading one run
# --------------------------------------------------------------------------

def read_run(run_dir):
    """Read and check one run folder through the run-folder contract (runfiles.read_run, status).

    Returns a RunResult: finished, diverged or left out with the reason.
    """
    try:
        files = _read_checked(run_dir)
        config, state = files.config, files.status
        usable = dict(name=run_dir.name, path=run_dir, config=config, seed=config.get('seed'),
                      settings=settings_of(config))
        # Before the metrics: a run resumed after a stop and then diverged keeps its earlier metrics.json.
        if state.state == runfiles.DIVERGED:
            return RunResult(**usable, status='diverged', reason=state.divergence.summary)
        if state.crash is not None:
            raise LeftOut(crashed_reason(run_dir, state.crash.message))
        return RunResult(**usable, status='finished', **finished_figures(files))
    except LeftOut as e:
        return RunResult(run_dir.name, run_dir, reason=str(e))


def _read_checked(run_dir):
    """The run's files (a runfiles.Run) once they read well, the run is neither in use nor damaged
    (but for its checkpoint, said below), has a config.json, and that agrees with its checkpoint
    (first: other advice may rely on the checkpoint). LeftOut otherwise."""
    try:
        files = runfiles.read_run(run_dir)
    except RecordError as e:          # readable, but holds what main.py does not write (NaN, 1.5, 'high')
        raise LeftOut(f'inconsistent: {e}') from None
    except RunFileError as e:         # unreadable: truncated, not JSON, not a regular file
        raise LeftOut(f'damaged: {e}') from None
    state = files.status
    if state.state == runfiles.IN_USE:
        raise LeftOut('its folder is in use by another process (still training?)')
    if state.state == runfiles.DAMAGED and (state.file is None or state.file.name != runfiles.CHECKPOINT_NAME):
        raise LeftOut(f'damaged: {state.reason}')
    if files.config is None:
        raise LeftOut(f'it has no {runfiles.CONFIG_NAME}, so its variant is unknown')
    check_against_checkpoint(run_dir, files.config)
    return files


# How to redo a run that has no checkpoint: main.py cannot continue it, nor start it in its own folder.
RESTART_ADVICE = ('train it again in a new folder (main.py does not write into a folder that holds files) '
                  'with the settings in its config.json')


def resume_advice(run_dir, evaluate=False):
    """What to do to continue (or, evaluate=True, re-evaluate) a run: a command that works when
    typed if the run has a checkpoint, else how to start it again."""
    ckpt = Path(run_dir) / runfiles.CHECKPOINT_NAME
    if ckpt.is_file():
        command = main_command('--resume', ckpt, *(['--evaluate'] if evaluate else []))
        return f'{command} {"redoes the test evaluation" if evaluate else "continues it"}'
    return f'it has no checkpoint to {"evaluate again" if evaluate else "continue"} from: {RESTART_ADVICE}'


def crashed_reason(run_dir, what):
    """Why a run whose crashed.json records a crash of main.py is left out, and what to do."""
    log = Path(run_dir) / runfiles.LOG_NAME
    then = (f'once the cause is fixed, {resume_advice(run_dir)}'
            if (Path(run_dir) / runfiles.CHECKPOINT_NAME).is_file() else resume_advice(run_dir))
    return f'it crashed ({what}), a bug, not a result: the traceback is in {log}; {then}'


def finished_figures(files):
    """The figures of a finished run (a runfiles.Run, its records checked): test_acc, ece, nll,
    wall_time_s, epochs_done, test_images, test_fingerprint, val_acc, and temperature,
    ece_calibrated and nll_calibrated (None without a temperature). LeftOut if it is unfinished
    or its metrics.json is not that of its predictions.npz."""
    run_dir, state, metrics, preds = files.folder, files.status, files.metrics, files.predictions
    unfinished = unfinished_reason(files)
    if unfinished:
        raise LeftOut(unfinished)
    if state.state == runfiles.DAMAGED:        # its checkpoint, which nothing above has named
        raise LeftOut(f'damaged: {state.reason}')
    if state.state != runfiles.FINISHED:
        raise LeftOut(f'its checkpoint is at epoch {state.epoch} of {state.epochs}, so its metrics.json is '
                      f'not its last; {resume_advice(run_dir)}')
    if not files.history:
        raise LeftOut('it has no per-epoch history (history.json missing or empty)')
    # The numbers of metrics.json must be those of the predictions beside them.
    test_acc = accuracy(preds.probs, preds.labels)
    ece = expected_calibration_error(preds.probs, preds.labels)
    if abs(test_acc - metrics.test_acc) > 1e-9 or abs(ece - metrics.ece) > 1e-6:
        raise LeftOut(f'inconsistent: metrics.json (test accuracy {metrics.test_acc:.4f}, ECE {metrics.ece:.4f}) '
                      f'does not match predictions.npz ({test_acc:.4f}, {ece:.4f}); '
                      f'{resume_advice(run_dir, evaluate=True)}')
    fingerprint = metrics.data_fingerprint
    calibrated = (metrics.calibration or {}).get('calibrated') or {}
    return dict(test_acc=float(metrics.test_acc), ece=float(metrics.ece), nll=float(metrics.test_loss),
                wall_time_s=metrics.wall_time_s, epochs_done=metrics.epochs_done, test_images=len(preds.labels),
                test_fingerprint=fingerprint['test'] if fingerprint else None,
                val_acc=[r.val_acc for r in sorted(files.history, key=lambda r: r.epoch)],
                temperature=metrics.temperature, ece_calibrated=calibrated.get('ece'),
                nll_calibrated=calibrated.get('nll'))


def unfinished_reason(files):
    """Why a run (a runfiles.Run) has no final figures yet (no metrics, stopped early, no
    predictions), with what to do; None when it has them."""
    run_dir, metrics = files.folder, files.metrics
    if metrics is None:
        if (run_dir / runfiles.CHECKPOINT_NAME).is_file():
            return f'it stopped before its test evaluation (no metrics.json); {resume_advice(run_dir)}'
        return ('it has neither metrics.json nor a checkpoint: it crashed or was stopped in its first '
                f'epoch (or is just starting); {RESTART_ADVICE}')
    if metrics.stopped_early:
        planned = metrics.epochs_planned if metrics.epochs_planned is not None else files.config.get('epochs')
        return (f'it stopped early ({metrics.stop_reason or "no reason given"}) after '
                f'{metrics.epochs_done} of {planned} epochs; {resume_advice(run_dir)}')
    if files.predictions is None:
        return (f'it has metrics.json but no predictions.npz (its evaluation was interrupted?); '
                f'{resume_advice(run_dir, evaluate=True)}')
    return None


def leave_out_other_test_sets(runs):
    """Leave out finished runs tested on another test set than the usual one.

    The usual test set has the most common size (ties: the larger) and, among the
    runs that record it, the most common data fingerprint (ties: the first in
    sorted order); a run without a fingerprint (older versions) is compared by size.
    """
    finished = [r for r in runs if r.status == 'finished']
    if not finished:
        return
    sizes = [r.test_images for r in finished]
    usual = max(set(sizes), key=lambda s: (sizes.count(s), s))
    prints = sorted(r.test_fingerprint for r in finished if r.test_images == usual and r.test_fingerprint)
    usual_print = max(dict.fromkeys(prints), key=prints.count) if prints else None
    for r in finished:
        if r.test_images != usual:
            r.status, r.reason = 'left out', f'it was evaluated on {r.test_images} test images, the other runs on {usual}'
        elif usual_print and r.test_fingerprint and r.test_fingerprint != usual_print:
            r.status, r.reason = 'left out', (
                f'it was tested on another test set than the other runs (data fingerprint '
                f'{r.test_fingerprint[:12]}..., theirs {usual_print[:12]}...); compare it with runs '
                f'tested on the same test_batch')


# --------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------

def canonical(value):
    """A JSON value in a form where equal settings compare equal (an int and the same float)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, list):
        return [canonical(v) for v in value]
    if isinstance(value, dict):
        return {k: canonical(v) for k, v in value.items()}
    return str(value)


def settings_of(config):
    """The settings that define a run's variant: its configuration minus NOT_SETTINGS."""
    settings = dict(KEY_DEFAULTS)
    settings.update({k: v for k, v in config.items() if k not in NOT_SETTINGS})
    return settings


def variant_key(settings):
    return json.dumps({k: canonical(v) for k, v in settings.items()}, sort_keys=True)


def show(value):
    """A setting as a person writes it: 0.0005, false, rows."""
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, float):
        return f'{value:g}'
    if value is None:
        return 'unset'
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(',', ':'))     # a list (widths) as one word: [64,256]


def differences(settings, base):
    """[(key, baseline value, this value)] for every key in which settings differ from base."""
    keys = list(settings) + [k for k in base if k not in settings]
    return [(k, base.get(k), settings.get(k)) for k in keys
            if canonical(settings.get(k)) != canonical(base.get(k))]


def preset_settings(name=BASELINE_PRESET):
    """The settings of a preset of presets.json (the method's defaults where it is silent),
    or None if presets.json is unreadable or has no such preset."""
    try:
        preset = config.load_presets().get(name)
    except config.ConfigError:
        return None
    return settings_of(preset.settings()) if preset is not None else None


def group_variants(runs, baseline_settings=None):
    """Group finished and diverged runs by their settings; label each against the baseline.

    Returns (variants, baseline, why): variants a list of Variant, the baseline variant first,
    then by mean test accuracy, highest first; baseline the settings dict the
    labels are relative to; why a phrase saying how the baseline was chosen.
    """
    groups = {}
    for r in runs:
        if r.status in ('finished', 'diverged'):
            groups.setdefault(variant_key(r.settings), []).append(r)
    if baseline_settings is not None:
        why = 'the variant of the run given by --baseline'
    else:
        fast = preset_settings()
        if fast is not None and variant_key(fast) in groups:
            baseline_settings, why = fast, f"the variant with the settings of presets.json's `{BASELINE_PRESET}` preset"
        else:
            # The most finished runs, then the most runs; a tie goes to the group met first.
            largest = max(groups.values(), key=lambda g: (sum(r.status == 'finished' for r in g), len(g)))
            baseline_settings, why = largest[0].settings, 'the variant with the most runs'
    base_key = variant_key(baseline_settings)
    variants = []
    for key, members in groups.items():
        differs = differences(members[0].settings, baseline_settings)
        label = 'baseline' if key == base_key else ', '.join(f'{k}={show(v)}' for k, _, v in differs)
        finished = [r for r in members if r.status == 'finished']
        variants.append(Variant(label, key == base_key, members[0].settings, differs, members, **summarise(finished)))
    variants.sort(key=lambda v: (not v.is_baseline, v.test_acc['mean'] is None,
                                 -(v.test_acc['mean'] or 0), v.label))
    return variants, baseline_settings, why


# --------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------

def mean_std(values):
    """{'mean', 'std', 'values'} of a list of numbers; std is the sample std (n - 1), None below 2 values."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return {'mean': None, 'std': None, 'values': []}
    std = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return {'mean': float(np.mean(values)), 'std': std, 'values': values}


def summarise(finished):
    """Per-variant numbers over its finished runs: test accuracy, ECE, wall time, the val curve.

    The curve has one entry per epoch: mean, min and max of val_acc over the
    runs that recorded that epoch (None where none did).
    """
    curves = [r.val_acc for r in finished]
    curve = {'epoch': [], 'mean': [], 'min': [], 'max': []}
    for e in range(max((len(c) for c in curves), default=0)):
        values = [c[e] for c in curves if e < len(c) and c[e] is not None]
        curve['epoch'].append(e + 1)
        curve['mean'].append(float(np.mean(values)) if values else None)
        curve['min'].append(min(values) if values else None)
        curve['max'].append(max(values) if values else None)
    stats = {key: mean_std([getattr(r, key) for r in finished])
             for key in ('test_acc', 'ece', 'nll', 'wall_time_s', 'temperature', 'ece_calibrated', 'nll_calibrated')}
    return dict(stats, val_curve=curve)


def welch(variant, baseline):
    """The variant's test accuracy against the baseline's, in percentage points (metrics.welch_test).

    Returns {'n': [n_variant, n_baseline], 'diff': mean_v - mean_b, 'ci95': [lo, hi] of the
    difference, 'se' (sqrt(s_v^2/n_v + s_b^2/n_b), s the sample std over seeds), 't', 'df'
    (Welch-Satterthwaite, not rounded), 'p' (two-sided), 'p_holm' and 'verdict'}; the last two are
    set by holm_verdicts, across the variants. Fewer than 2 finished runs on a side: p None
    ('too few runs'). Every seed equal on both sides: no spread to test against, p = 0 for a
    difference (1 for none), t and df None.
    """
    a, b = variant.test_acc['values'], baseline.test_acc['values']
    out = {'n': [len(a), len(b)], 'diff': None, 'ci95': None, 'se': None, 't': None, 'df': None, 'p': None,
           'p_holm': None, 'verdict': 'too few runs'}
    if not a or not b:
        return out
    a, b = 100 * np.asarray(a, dtype=np.float64), 100 * np.asarray(b, dtype=np.float64)
    out['diff'] = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return out
    out['se'] = float(math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b)))
    if out['se'] == 0:
        out.update(ci95=[out['diff'], out['diff']], p=0.0 if out['diff'] != 0 else 1.0)
        return out
    test = welch_test(a, b)
    out.update(ci95=test['ci'], t=test['t'], df=test['df'], p=test['p'])
    return out


def holm_verdicts(tests, alpha=ALPHA):
    """Holm's adjustment across the tests against one baseline (welch() records, None skipped),
    and each verdict from its adjusted p: 'better' or 'worse' below alpha, else 'within noise'.
    Returns the size of the family (the tests with a p-value)."""
    tested = [w for w in tests if w is not None and w['p'] is not None]
    if tested:
        for w, adjusted in zip(tested, holm_adjust([w['p'] for w in tested])):
            w['p_holm'] = adjusted
            w['verdict'] = ('better' if w['diff'] > 0 else 'worse') if adjusted < alpha else 'within noise'
    return len(tested)


# --------------------------------------------------------------------------
# Figures (viz.py's style: constrained-layout figures, light grids, the same DPI)
# --------------------------------------------------------------------------

def variant_colors(variants):
    """One colour per variant, the baseline black, shared by both figures."""
    import matplotlib
    palette = matplotlib.colormaps['tab10']
    colors, k = {}, 0
    for v in variants:
        if v.is_baseline:
            colors[v.label] = 'black'
        else:
            colors[v.label] = palette(k % 10)
            k += 1
    return colors


def legend_label(v):
    n = len(v.finished)
    diverged = f", {len(v.diverged)} diverged" if v.diverged else ''
    return f"{v.label} ({n} seed{'s' if n != 1 else ''}{diverged})"


def plot_val_accuracy(variants, colors):
    """Validation accuracy per epoch: mean over seeds (line) and min-max over seeds (band)."""
    from matplotlib.ticker import MaxNLocator

    fig = viz._new_figure(figsize=(11, 5.5))
    ax = fig.subplots()
    last = 0
    for v in variants:
        curve = v.val_curve
        if not v.finished or not curve['epoch']:
            continue
        epoch = np.array(curve['epoch'])
        mean, lo, hi = (100 * np.array([np.nan if x is None else x for x in curve[k]], dtype=float)
                        for k in ('mean', 'min', 'max'))
        style = {'marker': 'o', 'markersize': 3 if len(epoch) > 30 else 4}
        ax.plot(epoch, mean, color=colors[v.label], label=legend_label(v),
                linewidth=2.2 if v.is_baseline else 1.5, zorder=3 if v.is_baseline else 2, **style)
        ax.fill_between(epoch, lo, hi, color=colors[v.label], alpha=0.15, linewidth=0)
        if len(epoch) == 1:      # a band of one epoch has no width: show the spread as a bar
            ax.vlines(epoch, lo, hi, color=colors[v.label], alpha=0.4, linewidth=6)
        last = max(last, len(epoch))
    ax.set(title='Validation accuracy per epoch: mean over seeds, band from the lowest to the highest seed',
           xlabel='epoch', ylabel='validation accuracy (%)')
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if last == 1:
        ax.set_xlim(0.5, 1.5)
        ax.set_xticks([1])
    ax.grid(alpha=0.3)
    ax.legend(loc='center left', bbox_to_anchor=(1.01, 0.5), frameon=False)
    return fig


def plot_test_accuracy(variants, colors):
    """Test accuracy per variant: the mean (diamond), +- one std (whiskers), every seed (dots)."""
    fig = viz._new_figure(figsize=(11, 1.6 + 0.6 * len(variants)))
    ax = fig.subplots()
    base = next((v for v in variants if v.is_baseline), None)
    if base is not None and base.test_acc['mean'] is not None:
        ax.axvline(100 * base.test_acc['mean'], color='0.5', linestyle='--', linewidth=1,
                   label=f"baseline mean {100 * base.test_acc['mean']:.2f}%")
    for y, v in enumerate(variants):
        color, acc = colors[v.label], v.test_acc
        if acc['values']:
            # The seeds just below the mean, each a little lower than the last, so that
            # none hides under the mean's marker or under another seed of equal accuracy.
            spread = np.linspace(0.14, 0.3, len(acc['values'])) if len(acc['values']) > 1 else [0.22]
            ax.scatter(100 * np.array(acc['values']), y + np.asarray(spread), s=36, color=color,
                       alpha=0.55, edgecolors='black', linewidths=0.5, zorder=3)
            ax.errorbar(100 * acc['mean'], y, xerr=None if acc['std'] is None else 100 * acc['std'],
                        fmt='D', markersize=9, color=color, ecolor=color, elinewidth=2, capsize=6, zorder=4)
            std = '' if acc['std'] is None else f" ± {100 * acc['std']:.2f}"
            ax.annotate(f"{100 * acc['mean']:.2f}{std}%", (100 * acc['mean'], y), xytext=(0, 11),
                        textcoords='offset points', ha='center', fontsize=9)
        if v.diverged:
            ax.annotate(f"{len(v.diverged)} of {len(v.runs)} diverged", (0, y),
                        xycoords=('axes fraction', 'data'), xytext=(6, -14), textcoords='offset points',
                        color='tab:red', fontsize=9)
    ax.set_yticks(range(len(variants)), [legend_label(v) for v in variants])
    ax.set_ylim(len(variants) - 0.4, -0.6)      # the baseline on top
    ax.set(title='Test accuracy per variant: diamond = mean, whiskers = ± 1 std over seeds, dots = seeds',
           xlabel='test accuracy (%)')
    ax.grid(alpha=0.3, axis='x')
    if base is not None and base.test_acc['mean'] is not None:
        ax.legend(loc='lower right', fontsize=9)
    return fig


# --------------------------------------------------------------------------
# comparison.md and comparison.json
# --------------------------------------------------------------------------

def _pm(stat, scale, digits):
    if stat['mean'] is None:
        return '-'
    std = '' if stat['std'] is None else f" ± {scale * stat['std']:.{digits}f}"
    return f"{scale * stat['mean']:.{digits}f}{std}"


def _minutes(seconds):
    # Smoke runs last seconds: two decimals keep them from all reading 0.0.
    if seconds is None:
        return '-'
    return f'{seconds / 60:.1f}' if seconds >= 60 else f'{seconds / 60:.2f}'


def _signed(x, digits=2):
    return '-' if x is None else f'{x:+.{digits}f}'


def _p(p):
    """A p-value as the tables show it: three decimals, below 0.001 in powers of ten."""
    if p is None:
        return '-'
    if p in (0, 1):
        return f'{p:g}'
    return f'{p:.1e}' if p < 0.001 else f'{p:.3f}'


def _ci(w):
    return '-' if w['ci95'] is None else f"{w['ci95'][0]:+.2f} to {w['ci95'][1]:+.2f}"


RULE = ("The rule: Welch's t-test of the mean test accuracies (variant minus baseline), with the exact "
        "(not rounded) Welch-Satterthwaite degrees of freedom and the two-sided p-value from scipy.stats; the "
        "95% confidence interval is that of the difference. Testing several variants against one baseline "
        "at 5% each would call some difference real by chance alone, so the p-values of all the variants "
        "tested against the baseline are adjusted together by Holm's method (the k-th smallest of m "
        "multiplied by m - k + 1, kept increasing, capped at 1), which keeps the chance of any false "
        "*better* or *worse* at 5%. A variant is *better* or *worse* when its adjusted p is below 0.05, "
        "and *within noise* otherwise: a difference of that size can come from the seeds alone. With 3 "
        "seeds only large differences pass; more seeds resolve smaller ones. *Too few runs*: a side has "
        "fewer than 2 finished runs.")


def build_markdown(variants, left_out, why, sources):
    n_runs = sum(len(v.runs) for v in variants)
    lines = ['# Comparison of runs', '',
             f"Generated by `compare.py` on {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} from "
             + ', '.join(f'`{s}`' for s in sources) + '.', '',
             f'{n_runs} runs in {len(variants)} variants'
             + (f'; {len(left_out)} left out (listed at the end)' if left_out else '')
             + f'. The baseline is {why}. Runs are grouped by their configuration except '
             + ', '.join(NOT_SETTINGS) + '; each variant is named by the settings in which it differs '
             'from the baseline.', '',
             '![validation accuracy per epoch](val_accuracy.png)', '',
             '![test accuracy per variant](test_accuracy.png)', '',
             '## Variants', '',
             ('| variant | seeds | diverged | test accuracy (%) | ECE | wall time (min) '
              '| differs from the baseline in |'),
             '| --- | ---: | ---: | ---: | ---: | ---: | --- |']
    for v in variants:
        differs = '(the baseline)' if v.is_baseline else '; '.join(
            f'{k}: {show(b)} → {show(x)}' for k, b, x in v.differs)
        lines.append(f"| {v.label} | {len(v.finished)} | {len(v.diverged)} of {len(v.runs)} | "
                     f"{_pm(v.test_acc, 100, 2)} | {_pm(v.ece, 1, 4)} | {_minutes(v.wall_time_s['mean'])} | "
                     f'{differs} |')
    lines += ['', ('*seeds*: the finished runs of the variant. Mean ± sample standard deviation (n - 1) '
                   'over them. A diverged run (non-finite loss, main.py exit code 1) has no test accuracy '
                   'and counts only in the *diverged* column. The ECE is that of the raw predictions '
                   '(the method\'s); calibrated figures are in the next table.'), '']
    lines += calibration_table(variants)

    lines += against_baseline_table(variants)

    lines += ['## Runs', '', ('| run | variant | seed | test accuracy (%) | ECE | T | ECE calibrated | epochs '
                              '| wall time (min) |'),
              '| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |']
    for v in variants:
        for r in v.runs:
            if r.status == 'diverged':
                lines.append(f"| {r.name} | {v.label} | {r.seed} | diverged: {r.reason} | | | | | |")
            else:
                t = '-' if r.temperature is None else f'{r.temperature:.3f}'
                cal = '-' if r.ece_calibrated is None else f'{r.ece_calibrated:.4f}'
                lines.append(f"| {r.name} | {v.label} | {r.seed} | {100 * r.test_acc:.2f} | "
                             f"{r.ece:.4f} | {t} | {cal} | {r.epochs_done} | {_minutes(r.wall_time_s)} |")
    lines.append('')
    if left_out:
        lines += ['## Left out', '']
        lines += [f"- `{r.path}`: {r.reason}" for r in left_out]
        lines.append('')
    return '\n'.join(lines)


def against_baseline_table(variants):
    """The '## Against the baseline' section of comparison.md (Welch, Holm, verdicts), as lines."""
    lines = []
    base = next((v for v in variants if v.is_baseline), None)
    others = [v for v in variants if not v.is_baseline]
    if others:
        lines += ['## Against the baseline', '']
        if base is None or not base.finished:
            lines += ['No finished run of the baseline variant: no differences to report.', '']
        else:
            lines += [f"The baseline: {_pm(base.test_acc, 100, 2)} % test accuracy over {len(base.finished)} "
                      f"finished runs ({len(base.diverged)} of {len(base.runs)} diverged).", '',
                      ('| variant | test accuracy (%) | difference (points) | 95% CI of the difference '
                       '| Welch t (df) | p | Holm-adjusted p | verdict | diverged |'),
                      '| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |']
            for v in others:
                w = v.vs_baseline
                t = '-' if w['t'] is None else f"{w['t']:+.2f} ({w['df']:.1f})"
                lines.append(f"| {v.label} | {_pm(v.test_acc, 100, 2)} | {_signed(w['diff'])} | {_ci(w)} | {t} | "
                             f"{_p(w['p'])} | {_p(w['p_holm'])} | {w['verdict']} | "
                             f"{len(v.diverged)} of {len(v.runs)} |")
            lines += ['', RULE, '']
    return lines


def calibration_table(variants):
    """comparison.md's table of raw and calibrated test NLL and ECE per variant (mean ± std over
    seeds), with the temperature; a line instead when no run records a temperature."""
    lines = ['## Calibration', '']
    if not any(v.temperature['values'] for v in variants):
        return lines + ['No run records a temperature (runs of an earlier version): '
                        '`main.py --resume RUN --evaluate` fits it.', '']
    lines += ['| variant | runs with T | T | NLL raw | NLL calibrated | ECE raw | ECE calibrated |',
              '| --- | ---: | ---: | ---: | ---: | ---: | ---: |']
    for v in variants:
        lines.append(f"| {v.label} | {len(v.temperature['values'])} of {len(v.finished)} | "
                     f"{_pm(v.temperature, 1, 3)} | {_pm(v.nll, 1, 4)} | {_pm(v.nll_calibrated, 1, 4)} | "
                     f"{_pm(v.ece, 1, 4)} | {_pm(v.ece_calibrated, 1, 4)} |")
    return lines + ['', ('Raw: the test predictions as the model gives them (the method\'s figures). Calibrated: '
                         'the same predictions with their log-probabilities divided by the temperature T, fitted '
                         'on the validation set of each run (main.py); the accuracy is unchanged. The calibrated '
                         'columns are over the runs with T; the raw ones over every finished run.'), '']


def build_json(variants, baseline_settings, left_out, why, sources, family=0):
    def run_record(r):
        keys = ('name', 'seed', 'status', 'test_acc', 'ece', 'nll', 'temperature', 'ece_calibrated',
                'nll_calibrated', 'wall_time_s', 'epochs_done', 'test_images')
        record = {k: getattr(r, k) for k in keys}
        record['path'] = str(r.path)
        if r.status == 'diverged':
            record['diverged'] = r.reason
        return record

    return {
        'generated': datetime.datetime.now().isoformat(timespec='seconds'),
        'sources': [str(s) for s in sources],
        'baseline': {'chosen_as': why, 'settings': baseline_settings},
        'not_settings': list(NOT_SETTINGS),
        'rule': (f"Welch's t-test of test accuracy against the baseline (exact df, two-sided p, scipy.stats); "
                 f"Holm's adjustment across the {family} variant(s) tested; better or worse when the "
                 f"adjusted p is below {ALPHA}"),
        'alpha': ALPHA,
        'holm_family': family,
        'variants': [{
            'label': v.label, 'is_baseline': v.is_baseline,
            'differs': [{'key': k, 'baseline': b, 'value': x} for k, b, x in v.differs],
            'settings': v.settings,
            'finished': len(v.finished), 'diverged': len(v.diverged),
            'seeds': [r.seed for r in v.finished],
            'test_acc': v.test_acc, 'ece': v.ece, 'nll': v.nll, 'wall_time_s': v.wall_time_s,
            'temperature': v.temperature, 'ece_calibrated': v.ece_calibrated, 'nll_calibrated': v.nll_calibrated,
            'val_acc_curve': v.val_curve,
            'vs_baseline': v.vs_baseline,
            'runs': [run_record(r) for r in v.runs],
        } for v in variants],
        'left_out': [{'run': r.name, 'path': str(r.path), 'reason': r.reason} for r in left_out],
    }


# --------------------------------------------------------------------------
# The whole comparison
# --------------------------------------------------------------------------

def baseline_settings_from(given):
    """The settings of the run folder --baseline names (its config.json, checked against its
    checkpoint when it has one)."""
    example = 'give one of the runs, e.g. --baseline runs/claims/baseline-seed0'
    if not given.strip():
        raise CompareError(f'--baseline was given an empty path; {example}')
    path = Path(given)
    if not path.is_dir():
        raise CompareError(f'--baseline {given} is not a run folder; {example}')
    try:
        config = runfiles.read_config(path, advice=lambda folder, name: 'give another run of the baseline variant')
    except RunFileError as e:
        raise CompareError(f'--baseline: {e}') from None
    if config is None:
        raise CompareError(f'--baseline {given} has no config.json; give another run of the baseline variant')
    try:
        check_against_checkpoint(path.resolve(), config)
    except LeftOut as e:
        raise CompareError(f'--baseline {given} is {e}; or give another run of the baseline variant') from None
    return settings_of(config)


def default_out(run_dirs):
    """`comparison/` in the folder that holds the runs (their common parent)."""
    parent = Path(os.path.commonpath([str(p.parent) for p in run_dirs]))
    if parent == Path(parent.anchor):
        raise CompareError(f'the runs have no folder in common but {parent}; give --out DIR for the comparison')
    return parent / 'comparison'


def run_folder_at_or_above(out, run_dirs):
    """The run folder that the resolved path out is, or lies inside, or None.

    out itself counts if it looks like a run folder at all (runfiles.is_run_folder); a
    folder above it only if it is one of the runs read or was certainly made by main.py.
    """
    if out in run_dirs or runfiles.is_run_folder(out):
        return out
    return next((p for p in out.parents if p in run_dirs or runfiles.is_run_folder(p, certain=True)), None)


def check_out(given, run_dirs):
    """The resolved output folder for --out as given (None: the default).

    CompareError (one sentence) for an empty path, a link to nothing, something
    other than a folder, a run folder or a folder inside one (compare.py never
    writes into runs), or an output file that is not a regular file.
    """
    if given is None:
        given = default_out(run_dirs)
    elif not given.strip():
        raise CompareError('--out was given an empty path; give a folder for the comparison, e.g. --out '
                           'comparison, or leave --out out to write comparison/ beside the runs')
    path = Path(given)
    if path.is_symlink() and not path.exists():
        raise CompareError(f'--out {given} is a link to {os.readlink(path)}, which does not exist; '
                           f'remove the link or give another folder')
    out = path.resolve()
    if out.exists() and not out.is_dir():
        what = 'a file' if out.is_file() else file_kind(out.stat().st_mode)
        raise CompareError(f'--out {given} is {what}, not a folder; give a folder for the comparison')
    inside = run_folder_at_or_above(out, run_dirs)
    if inside is not None:
        where = 'a run folder' if inside == out else f'inside the run folder {inside}'
        raise CompareError(f'--out {given} is {where}; compare.py never writes into run folders: choose '
                           f'another folder, e.g. --out {quoted(inside.parent / "comparison")}')
    for name in OUT_FILES:
        try:
            check_regular(out / name)
        except NotRegularFile as e:
            raise CompareError(f'{describe_os_error(e, out / name, "write")} (it is one of the files '
                               f'compare.py writes into --out)') from None
    return out


def compare(paths, out=None, baseline=None, log=print, warn=None):
    """Read the runs, group them, write the figures, comparison.md and comparison.json.

    paths: run folders or folders of them; out: output folder (default
    default_out); baseline: a run folder whose variant is the baseline.
    warn receives one line per run left out. Returns (out folder, the JSON
    record). Raises CompareError (one sentence) when nothing can be compared
    or the output cannot be written.
    """
    warn = warn or (lambda line: print(line, file=sys.stderr))
    run_dirs = expand_runs(paths)
    baseline_settings = baseline_settings_from(baseline) if baseline is not None else None
    out = check_out(out, run_dirs)
    runs = [read_run(d) for d in run_dirs]
    leave_out_other_test_sets(runs)
    left_out = [r for r in runs if r.status == 'left out']
    for r in left_out:
        warn(f"compare.py: left out {r.path}: {r.reason}")
    if not any(r.status == 'finished' for r in runs):
        diverged = sum(r.status == 'diverged' for r in runs)
        raise CompareError(f'no comparable run among the {len(runs)} found ({diverged} diverged, '
                           f'{len(left_out)} left out, as listed above); finish or resume some runs first')
    variants, baseline_settings, why = group_variants(runs, baseline_settings)
    base = next((v for v in variants if v.is_baseline), None)
    for v in variants:
        if not v.is_baseline:
            v.vs_baseline = welch(v, base) if base is not None else None
    family = holm_verdicts([v.vs_baseline for v in variants])
    record = build_json(variants, baseline_settings, left_out, why, paths, family)
    with interrupts_while_writing():
        write_outputs(out, variants, left_out, why, paths, record, log)
    return out, record


def write_outputs(out, variants, left_out, why, sources, record, log=print):
    """The two figures, comparison.md and comparison.json, each written atomically into out."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CompareError(describe_os_error(e, out, 'create the output folder')) from None
    colors = variant_colors(variants)
    for stem, draw in (('val_accuracy', plot_val_accuracy), ('test_accuracy', plot_test_accuracy)):
        start = time.perf_counter()
        fig = draw(variants, colors)
        write_atomic(out / f'{stem}.png', lambda f, fig=fig: fig.savefig(f, format='png', dpi=viz.DPI))
        log(f'  {stem}.png  {time.perf_counter() - start:5.2f} s')
    write_text(out / 'comparison.md', build_markdown(variants, left_out, why, sources))
    write_json(out / 'comparison.json', record)


@contextlib.contextmanager
def interrupts_while_writing():
    """Make SIGINT and SIGTERM raise KeyboardInterrupt while the outputs are written.

    Before this, an interrupt ends compare.py with nothing changed; during the
    writes, KeyboardInterrupt lets write_atomic remove its temporary file, and
    main() says that the output folder may be incomplete. Only the main thread
    can set handlers; elsewhere this does nothing.
    """
    def handler(signum, frame):
        raise KeyboardInterrupt
    cli.raise_if_interrupted_while_starting()    # one whose exception was discarded on the way
    try:
        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:           # not the main thread
        previous = {}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line like every other refusal of this script, not argparse's usage block.
        self.exit(EXIT_BAD_INPUT, f"compare.py: {message}; see python {quoted(REPO / 'compare.py')} --help\n")


def parse_args(argv=None):
    parser = _Parser(description='Compare run folders: variants over seeds, figures and a Markdown table.')
    parser.add_argument('runs', nargs='+', metavar='RUN',
                        help='run folders, or folders holding run folders (e.g. runs/claims)')
    parser.add_argument('--out', default=None,
                        help='output folder (default: comparison/ in the folder that holds the runs); '
                             'never a run folder')
    parser.add_argument('--baseline', default=None, metavar='RUN',
                        help="a run of the baseline variant (default: the runs with the settings of "
                             "presets.json's fast preset, else the variant with the most runs)")
    return parser.parse_args(argv)


def print_summary(out, record, seconds):
    """One line per variant on stdout, then where the comparison went."""
    for v in record['variants']:
        acc = v['test_acc']
        shown = '-' if acc['mean'] is None else f"{100 * acc['mean']:.2f}%" + (
            '' if acc['std'] is None else f" ± {100 * acc['std']:.2f}")
        w = v['vs_baseline']
        verdict = (f"  {w['verdict']}" + (f" (p {_p(w['p'])}, Holm {_p(w['p_holm'])})" if w['p'] is not None else '')
                   if w else '')
        print(f"{v['label']:<32s} {v['finished']} finished  {shown}{verdict}"
              + (f"  ({v['diverged']} diverged)" if v['diverged'] else ''))
    print(f'Wrote comparison.md, comparison.json and 2 figures to {out} in {seconds:.1f} s.')


def main(argv=None):
    """CLI entry point; returns the exit code (0 written, 2 refused with one sentence on stderr,
    3 crashed, 130 interrupted)."""
    start = time.perf_counter()
    try:
        cli.raise_if_interrupted_while_starting()
        args = parse_args(argv)
        out, record = compare(args.runs, args.out, args.baseline)
    except SystemExit as e:       # --help, or a usage error already printed as one sentence
        return e.code
    except (CompareError, RunFileError) as e:
        problem = str(e)
    except OSError as e:          # anything the modules above did not word themselves
        problem = describe_os_error(e, e.filename or (args.out or '.'), 'use')
    except cli.StartupInterrupted as e:
        print(cli.interrupted_message('compare.py', e), file=sys.stderr)
        return EXIT_ABORTED
    except KeyboardInterrupt:
        print('compare.py: interrupted while writing the comparison; its folder may mix old and new '
              'files: run the same command again', file=sys.stderr)
        return EXIT_ABORTED
    except Exception as e:        # a bug: one line, not a traceback
        return cli.report_crash('compare.py', e)
    else:
        print_summary(out, record, time.perf_counter() - start)
        return EXIT_OK
    print(f'compare.py: {problem}', file=sys.stderr)
    return EXIT_BAD_INPUT


if __name__ == '__main__':
    sys.exit(main())
