"""Train the NumPy CNN+RNN on CIFAR-10: presets, schedule, SGD, checkpoints, logs.

    python main.py --preset fast --subset 0.4 --max-hours 1
    python main.py --resume runs/latest/ckpt.npz [--lr 0.01]
    python main.py --list-presets

A run writes into its own folder (default ``runs/<timestamp>-<preset>``):
config.json, history.json, train.log, ckpt.npz (resumable), best.npz,
metrics.json, predictions.npz; ``runs/latest`` points at the newest run.
The README describes each file.

Exit codes (cli.py): 0 done (also when stopped early by the time budget or
Ctrl-C), 1 training diverged (non-finite loss), 2 bad input or a file-system
problem (the message says which), 3 crashed (a bug; the traceback goes to the
run's train.log), 130 interrupted before training started, or aborted by a
second Ctrl-C.
"""
import cli                      # standard library only: set up before the slow imports below

if __name__ == '__main__':
    cli.exit_cleanly_on_interrupt_while_starting()

import argparse
import copy
import dataclasses
import datetime
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import runfiles
from config import (Config, ConfigError, add_override_flags, flag_name, load_presets, overrides_from_args,
                    parse_set_options)
from cnn_rnn_numpy import CNNRNN, FORMAT_VERSION, ModelFileError, array_problem, load_npz, read_meta
from data_utils import (BatchIterator, DataError, channel_mean_std, load_cifar10, normalize, tta_views,
                        tta_weights)
from fast_layers import ThreadSettingError, prepare_process_for_training
from metrics import (N_BINS, TEMPERATURE_RANGE, TIME_TO_VAL_ACC, accuracy, apply_temperature, calibration_report,
                     confusion_matrix, cross_entropy, expected_calibration_error, fit_temperature,
                     per_class_accuracy, time_to_accuracy)
from optim import SGD, Lookahead, WeightAverage, bn_lr_scales, clip_grad_norm, learning_rate
from runfiles import RunFileError

CHECKPOINT_KIND = runfiles.CHECKPOINT_KIND
EXIT_OK, EXIT_DIVERGED, EXIT_BAD_INPUT, EXIT_CRASHED, EXIT_ABORTED = (
    cli.EXIT_OK, cli.EXIT_DIVERGED, cli.EXIT_BAD_INPUT, cli.EXIT_CRASHED, cli.EXIT_ABORTED)


class UsageError(Exception):
    """Bad input from the command line or a file: one sentence, exit code 2."""


class Diverged(Exception):
    """The loss (or a weight) became NaN or infinite; ``record`` says where, for diverged.json."""

    def __init__(self, message, record=None):
        super().__init__(message)
        self.record = record or runfiles.Divergence()


# --------------------------------------------------------------------------
# The resumable state of a run
# --------------------------------------------------------------------------

@dataclass
class TrainState:
    """Where a run is: what ckpt.npz stores besides parameters and momentum.

    epoch is the next epoch to run (0-based) and step the next step within
    it; sum_loss, sum_correct and seen are the running sums of the current
    epoch; epoch_wall_s, epoch_train_s and epoch_timed_images its time so far
    (all of it, and of the steps alone) and the images those steps saw, summed
    over the invocations that ran it; mean/std are the per-channel input
    statistics ((3,) lists) or None; data_fingerprint identifies the images
    ({'train': sha256, 'test': sha256}, data_utils.fingerprint), None in runs
    started before it was recorded. eval_images_per_s is the speed of the last
    epoch's validation pass: its images per second, each image under that pass's
    views (Config.val_tta_mode; the test-time views in runs without val_views),
    None before the first one; evaluation_reserve_s turns it into the time budget's reserve.
    fitted_epochs is the number of epochs fit_epochs last chose (and wrote into the config's epochs),
    None before the first choice or without it; most_epochs the configuration's epochs before that
    first choice, the most a later one may choose; schedule_anchor [global_step, fraction] the step
    of the last change of plan and the rate there as a fraction of lr, where the rest of the
    schedule starts (optim.learning_rate's anchor), or None. code_commits are the commits of the code
    that trained and evaluated the run (cli.code_commit), in order, one entry per change of code
    between invocations; empty outside git and in runs started before they were recorded.
    time_budgets_h holds the --max-hours of each invocation that trained the run, in order (None for
    one given no budget): whether fit_epochs' epochs were fitted to an hour or fixed on the command
    line, which config.json cannot say. Empty in runs started before it was recorded.
    """
    epoch: int = 0
    step: int = 0
    global_step: int = 0
    history: list = field(default_factory=list)
    best_val_acc: float = -1.0
    best_epoch: int = 0
    elapsed_s: float = 0.0
    sum_loss: float = 0.0
    sum_correct: int = 0
    seen: int = 0
    mean: list = None
    std: list = None
    stop_reason: str = None
    eval_images_per_s: float = None
    data_fingerprint: dict = None
    epoch_wall_s: float = 0.0
    epoch_train_s: float = 0.0
    epoch_timed_images: int = 0
    fitted_epochs: int = None
    most_epochs: int = None
    schedule_anchor: list = None
    code_commits: list = field(default_factory=list)
    time_budgets_h: list = field(default_factory=list)

    @classmethod
    def from_dict(cls, d, cfg=None):
        """The state stored in a checkpoint's metadata; UsageError if it is not a valid one.

        cfg (the run's Config) bounds the epoch and the position. Unknown keys are
        ignored and missing ones take their defaults (older checkpoints).
        """
        if not isinstance(d, dict):
            raise UsageError(f'its state is a JSON {type(d).__name__}, not an object')
        known = {f.name for f in dataclasses.fields(cls)}
        state = cls(**{k: v for k, v in d.items() if k in known})
        problem = state.problem(cfg)
        if problem:
            raise UsageError(f'its state has {problem}')
        return state

    def problem(self, cfg=None):
        """What is wrong with the values, in a few words; None if nothing is."""
        def count(v, low=0):
            return isinstance(v, int) and not isinstance(v, bool) and v >= low

        def number(v, low=0.0, high=math.inf):
            return (isinstance(v, (int, float)) and not isinstance(v, bool)
                    and math.isfinite(v) and low <= v <= high)
        epochs = cfg.epochs if cfg is not None else math.inf
        # Each rule is checked only if the ones before it hold, so a comparison never meets a wrong type.
        rules = [(k, lambda k=k: count(getattr(self, k)), 'an integer >= 0')
                 for k in ('epoch', 'step', 'global_step', 'best_epoch', 'seen', 'sum_correct',
                           'epoch_timed_images')]
        rules += [('epoch', lambda: self.epoch <= epochs, f'an integer in [0, {epochs}]'),
                  ('best_epoch', lambda: self.best_epoch <= self.epoch, 'an integer in [0, epoch]'),
                  ('sum_correct', lambda: self.sum_correct <= self.seen, 'an integer in [0, seen]'),
                  ('best_val_acc', lambda: number(self.best_val_acc, -1.0, 1.0), 'a number in [-1, 1]')]
        rules += [(k, lambda k=k: number(getattr(self, k)), 'a finite number >= 0')
                  for k in ('elapsed_s', 'sum_loss', 'epoch_wall_s', 'epoch_train_s')]
        rules += [('eval_images_per_s', lambda: self.eval_images_per_s is None or (
                      number(self.eval_images_per_s) and self.eval_images_per_s > 0), 'null or a positive number'),
                  ('fitted_epochs', lambda: self.fitted_epochs is None or (
                      count(self.fitted_epochs, 1) and (cfg is None or self.fitted_epochs == epochs)),
                   f"null or the configuration's epochs ({epochs})"),
                  ('most_epochs', lambda: self.most_epochs is None or (
                      self.fitted_epochs is not None and count(self.most_epochs, 1)
                      and self.most_epochs >= self.fitted_epochs),
                   f'null or an integer >= fitted_epochs ({self.fitted_epochs})'),
                  ('schedule_anchor', lambda: self.schedule_anchor is None or (
                      self.fitted_epochs is not None and isinstance(self.schedule_anchor, list)
                      and len(self.schedule_anchor) == 2 and count(self.schedule_anchor[0])
                      and self.schedule_anchor[0] <= self.global_step and number(self.schedule_anchor[1], 0.0, 1.0)),
                   'null or [global_step <= the current one, a fraction in [0, 1]] (with fitted_epochs)'),
                  ('stop_reason', lambda: self.stop_reason is None or isinstance(self.stop_reason, str),
                   'null or a string'),
                  ('code_commits', lambda: isinstance(self.code_commits, list)
                   and all(isinstance(c, str) for c in self.code_commits), 'a list of commits (strings)'),
                  ('time_budgets_h', lambda: isinstance(self.time_budgets_h, list) and all(
                      b is None or (number(b) and b > 0) for b in self.time_budgets_h),
                   'a list of time budgets in hours (positive numbers or null)'),
                  ('history', lambda: isinstance(self.history, list) and len(self.history) == self.epoch
                   and all(isinstance(r, dict) for r in self.history), 'a list of one record per epoch done'),
                  ('data_fingerprint', lambda: self.data_fingerprint is None or (
                      isinstance(self.data_fingerprint, dict)
                      and all(isinstance(self.data_fingerprint.get(k), str) for k in ('train', 'test'))),
                   "null or {'train': hex, 'test': hex}")]
        for key, ok, good in rules:
            if not ok():
                return f'{key} = {getattr(self, key)!r}, which must be {good}'
        for key in ('mean', 'std'):
            v = getattr(self, key)
            if (v is None) != (self.mean is None) or v is not None and not (
                    isinstance(v, list) and len(v) == 3 and all(number(x) for x in v)
                    and (key == 'mean' or min(v) > 0)):
                return (f'{key} = {v!r}, which must be null (with mean and std both null) or 3 '
                        f'finite per-channel numbers' + (' above 0' if key == 'std' else ''))
        return None

    def note_code_commit(self):
        """Add the commit of the code running now to code_commits, unless it is the last one there."""
        commit = cli.code_commit()
        if commit and (not self.code_commits or self.code_commits[-1] != commit):
            self.code_commits.append(commit)

    def normalization(self):
        """(mean, std) float32 (3,) arrays, or (None, None) without standardisation."""
        if self.mean is None:
            return None, None
        return np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)


def save_checkpoint(path, model, opt, state, cfg, average=None, lookahead=None):
    """Everything needed to resume: params, velocities, the weight average and the lookahead's
    slow weights (if any), position, history, config."""
    meta = dict(model.config(), format_version=FORMAT_VERSION, kind=CHECKPOINT_KIND,
                run_config=cfg.to_dict(), state=runfiles.to_jsonable(dataclasses.asdict(state)))
    arrays = {f'param/{k}': v for k, v in model.params.items()}
    arrays.update({f'velocity/{k}': v for k, v in opt.velocity.items()})
    if average is not None:
        arrays.update({f'average/{k}': v for k, v in average.params.items()})
    if lookahead is not None:
        arrays.update({f'lookahead/{k}': v for k, v in lookahead.slow.items()})
    runfiles.write_checkpoint(path, meta, arrays)


@dataclass
class Checkpoint:
    """What load_checkpoint reads: the model, the optimizer's velocities, the weight average and
    the lookahead's slow weights ({name: array}; None without them), the state, the config."""
    model: CNNRNN
    velocity: dict
    average: dict
    state: 'TrainState'
    cfg: Config
    slow: dict = None


def load_checkpoint(path):
    """Read a checkpoint written by save_checkpoint -> Checkpoint.

    Everything is validated before it is used: the metadata's types and ranges
    (configuration and state), the model's configuration and dtype, and that every
    parameter, velocity and average is a real array of finite values of the
    model's shapes. Anything else raises ModelFileError naming the file and what is wrong.
    """
    arrays = load_npz(path)
    meta = read_meta(arrays, path)
    if meta.get('kind') != CHECKPOINT_KIND:
        raise ModelFileError(f"{path} holds model weights only (best.npz?), not a resumable "
                             f"checkpoint; resume from the run's ckpt.npz")
    damaged = ('it is damaged or was not written by main.py: use another checkpoint, or start '
               'the run again in a new folder')
    try:
        if not isinstance(meta.get('run_config'), dict):
            raise UsageError('its configuration is missing or not a JSON object')
        cfg = Config.from_dict(dict(meta['run_config']), 'its configuration')
        state = TrainState.from_dict(meta.get('state'), cfg)
    except (TypeError, UsageError, ConfigError) as e:
        raise ModelFileError(f'{path} is not a valid checkpoint ({e}); {damaged}') from None
    model = CNNRNN.from_arrays(arrays, path, **model_settings(cfg))

    def arrays_like_params(prefix, names):
        """{name: array} of the arrays stored as '<prefix>/<name>', checked against the model's ``names``."""
        group = {k[len(prefix) + 1:]: v for k, v in arrays.items() if k.startswith(prefix + '/')}
        if set(group) != set(names) or any(group[k].shape != model.params[k].shape for k in group):
            raise ModelFileError(f'{path} has optimizer state ({prefix}) that does not match its '
                                 f'model; {damaged}')
        for name, a in group.items():
            problem = array_problem(a)
            if problem:
                raise ModelFileError(f'{path}: {prefix} of {name} {problem}; {damaged}')
        return group
    # The optimizer has a velocity for the trained parameters (all but BatchNorm's running
    # statistics); the weight average and the lookahead's slow copy hold every parameter.
    average = arrays_like_params('average', model.params) if cfg.ema else None
    slow = arrays_like_params('lookahead', model.params) if cfg.lookahead else None
    return Checkpoint(model, arrays_like_params('velocity', model.trained_names()), average, state, cfg, slow)


# Model settings added after model files first recorded their configuration (model_settings).
LATER_MODEL_SETTINGS = ('whiten', 'identity_init', 'readout')


def model_settings(cfg):
    """The settings of the model a run's configuration builds, as CNNRNN's arguments (those a
    model file records, checked against the run's when one is loaded).

    The LATER_MODEL_SETTINGS are passed only when they are not the method's: a model built
    without them, and every file written before they existed (which does not record them), is
    built and checked exactly as before."""
    settings = dict(seq_layout=cfg.seq_layout, hidden=cfg.hidden, cell=cfg.cell, widths=cfg.widths,
                    convs_per_block=cfg.convs_per_block, batchnorm=cfg.batchnorm, bn_momentum=cfg.bn_momentum,
                    bn_eps=cfg.bn_eps)
    method = Config.method_defaults()
    settings.update({key: getattr(cfg, key) for key in LATER_MODEL_SETTINGS if getattr(cfg, key) != method[key]})
    return settings


# The training images a fresh run fits the patch-whitening layer on (airbench uses 5000 too).
WHITENING_IMAGES = 5000


def fit_whitening(model, cfg, data, mean, std):
    """Fit the frozen patch-whitening first layer (cfg.whiten) of a fresh model on the first
    WHITENING_IMAGES training images, normalized as the training iterator feeds them (NCHW
    float32 (n, 3, 32, 32), before augmentation). Nothing without whiten; a resumed run keeps the
    whitening its checkpoint holds."""
    if cfg.whiten:
        model.fit_whitening(normalize(data['X_train'][:WHITENING_IMAGES], mean, std))


# --------------------------------------------------------------------------
# The run folder
# --------------------------------------------------------------------------

class RunFolder:
    """The files of one run, the lock that makes this process their only writer, the log."""

    def __init__(self, path):
        self.path = Path(path).resolve()     # runs/latest/... -> the real folder
        self.lock = runfiles.RunFolderLock(self.path, 'main.py')

    def file(self, name):
        return self.path / name

    def log(self, msg, stream=None):
        """Print a line (to stdout, or ``stream``) and append it, time-stamped, to train.log."""
        print(msg, file=stream or sys.stdout, flush=True)
        stamp = datetime.datetime.now().strftime('%Y-%m-%d %H:%M:%S')
        runfiles.append_line(self.file(runfiles.LOG_NAME), f'{stamp} {msg}')


def new_run_folder(out, preset):
    """Create the folder of a new run; refuse a file, a dangling link or a non-empty folder."""
    if out is None:
        stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
        out = base = os.path.join('runs', f'{stamp}-{preset}')
        k = 1
        while os.path.lexists(out):          # two runs started in the same second
            k += 1
            out = f'{base}-{k}'
    path = Path(out)
    if path.is_symlink() and not path.exists():
        raise UsageError(f'--out {out} is a link to nothing; remove the link or give another folder')
    if path.exists() and not path.is_dir():
        raise UsageError(f'--out {out} is a file; give a folder path for the run')
    if path.is_dir() and any(path.iterdir()):
        if (path / runfiles.CHECKPOINT_NAME).is_file():
            raise UsageError(f"--out {out} already holds files; choose a new folder, or continue "
                             f"that run with python main.py --resume {path / runfiles.CHECKPOINT_NAME}")
        raise UsageError(f'--out {out} already holds files (and no checkpoint to continue from); '
                         f'choose a new folder, or move that one away first')
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(runfiles.describe_os_error(e, path, 'create the run folder')) from None
    return RunFolder(path)


def checkpoint_path(given):
    """The ckpt.npz that --resume names: a file, or a run folder that holds one."""
    if not given.strip():
        raise UsageError("--resume was given an empty path; give a run's checkpoint, "
                         "e.g. --resume runs/latest/ckpt.npz")
    path = Path(given)
    if path.is_dir():
        ckpt = path / runfiles.CHECKPOINT_NAME
        if not ckpt.is_file():
            if runfiles.is_run_folder(path):
                raise UsageError(f'--resume {given}: that run stopped before writing its first checkpoint '
                                 f'({ckpt}), so it cannot be continued; {restart_hint(path)}')
            raise UsageError(f"--resume {given} is a folder without a checkpoint: expected "
                             f"{ckpt}; give a run folder written by main.py")
        path = ckpt
    elif not path.is_file() and not path.is_symlink() and path.name == runfiles.CHECKPOINT_NAME \
            and runfiles.is_run_folder(path.parent):
        raise UsageError(f'--resume {given}: that run stopped before writing its first checkpoint, so it '
                         f'cannot be continued; {restart_hint(path.parent)}')
    return path


def restart_hint(folder):
    """How to start the run of ``folder`` again (in a new folder), from its config.json."""
    try:
        d = runfiles.read_config(folder)
        cfg = Config.from_dict({k: v for k, v in d.items() if k != 'lr_changes'}, runfiles.CONFIG_NAME)
        return f'start it again: {restart_command(cfg, cfg.lr)}'
    except (RunFileError, ConfigError, TypeError, AttributeError):
        return 'start it again with the settings it was given (its config.json is unreadable)'


# --------------------------------------------------------------------------
# Stopping early: signals and the time budget
# --------------------------------------------------------------------------

class Stopper:
    """Decides when training stops early, checked between steps.

    While starting (``during == 'starting'``: reading the data and the
    checkpoint, before anything is written), SIGINT or SIGTERM ends the
    process at once through cli.StartupInterrupted. After that they set
    ``reason`` (a second one aborts with KeyboardInterrupt); ``request`` does
    the same from code. The time budget counts from construction and keeps
    ``reserve_s`` free for the validation pass and the test evaluation that
    follow the stop.
    """

    def __init__(self, max_hours=None):
        self.reason = None
        self.max_hours = max_hours
        self.t_start = time.monotonic()
        self.reserve_s = 0.0
        self.during = 'starting'      # then 'training', then 'evaluation' (begin)
        self.interrupted_while_starting = None
        self.ckpt = None          # the run's ckpt.npz, for the message when aborted
        self.log = print          # the run's log, once its folder exists
        self.process_settings = None   # what prepare_process set (threads, allocator), for the log
        self.previous = {}

    def request(self, reason):
        self.reason = reason

    def should_stop(self):
        """The reason to stop now, or None."""
        if self.reason is None and self.max_hours is not None:
            if time.monotonic() - self.t_start + self.reserve_s > self.max_hours * 3600.0:
                self.reason = f'time budget of {self.max_hours} h reached'
        return self.reason

    def install(self):
        def handler(signum, frame):
            if self.during == 'starting':
                # Kept as well as raised: Python may discard an exception raised inside one of
                # its own callbacks; begin() raises it again where the start-up ends.
                self.interrupted_while_starting = signal.Signals(signum).name
                raise cli.StartupInterrupted(self.interrupted_while_starting)
            if self.reason is not None and self.reason.startswith('interrupted'):
                raise KeyboardInterrupt
            self.request('interrupted by ' + signal.Signals(signum).name)
            then = ('stopping after this step' if self.during == 'training'
                    else 'finishing the test evaluation first')
            print(flush=True)
            self.log(f'{self.reason}: {then} (Ctrl-C again to abort)')
        self.previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}

    def begin(self, phase):
        """Enter 'training' or 'evaluation'. An interrupt that arrived while starting ends the
        process here if its exception was discarded on the way."""
        if self.during == 'starting':
            cli.raise_if_interrupted_while_starting()
            if self.interrupted_while_starting:
                raise cli.StartupInterrupted(self.interrupted_while_starting)
        self.during = phase

    def uninstall(self):
        for s, h in self.previous.items():
            signal.signal(s, h)
        self.previous = {}


# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------

class Trainer:
    """The training loop of one run: epochs of steps, then validation and checkpoint."""

    def __init__(self, cfg, run, model, opt, state, data, stopper, average=None, lookahead=None):
        self.cfg, self.run, self.model, self.opt, self.state = cfg, run, model, opt, state
        self.stopper = stopper
        # With a weight average (cfg.ema), validation, best.npz and the test use the average.
        self.average = average
        self.lookahead = lookahead      # cfg.lookahead's slow weights (optim.Lookahead), or None
        self.eval_model = averaged_model(model, average)
        mean, std = state.normalization()
        self.train_it = BatchIterator(data['X_train'], data['y_train'], cfg.batch_size, shuffle=True,
                                      augment=cfg.augment, crop=cfg.crop, seed=cfg.seed, mean=mean, std=std,
                                      alternate_flip=cfg.alternate_flip)
        self.val_it = BatchIterator(data['X_val'], data['y_val'], cfg.eval_batch_size, mean=mean, std=std)
        self.val_tta = cfg.val_tta_mode()       # each epoch's views; the final evaluation's are cfg.tta_mode()
        self.steps_per_epoch = len(self.train_it)
        self.n_val, self.n_test = len(data['y_val']), len(data['y_test'])
        self.t_start = time.monotonic()
        self.first_epoch = state.epoch    # history[first_epoch:]: the epochs this invocation ended
        self.elapsed_before = state.elapsed_s
        if state.eval_images_per_s:    # measured in an earlier call: reserve evaluation time now
            stopper.reserve_s = self.reserve_s(state.eval_images_per_s)

    def elapsed(self):
        return self.elapsed_before + time.monotonic() - self.t_start

    def reserve_s(self, val_images_per_s):
        """The time budget's reserve for what follows a stop (evaluation_reserve_s)."""
        return evaluation_reserve_s(self.n_val, self.n_test, self.val_tta, self.cfg.tta_mode(), val_images_per_s,
                                    val_passes=1 if self.average is None else 2)

    def lr(self, step=None):
        """The learning rate of global step ``step`` (the next one by default)."""
        s = self.state
        return learning_rate(self.cfg, s.global_step if step is None else step, self.steps_per_epoch,
                             s.schedule_anchor)

    def train(self):
        """Run epochs until the last one or a stop; the state says which."""
        while self.state.epoch < self.cfg.epochs:
            if not self.run_epoch():
                return
            self.end_epoch()
        self.state.stop_reason = None

    def run_epoch(self):
        """The remaining steps of the current epoch. False if it stopped early (checkpoint written)."""
        from tqdm import tqdm
        s, cfg = self.state, self.cfg
        # Time and images of this invocation's part of the epoch, added to the state's sums at the end
        # (or at a stop), so an epoch split by a resume reports the time and speed of both parts.
        t_epoch, train_time, images = time.monotonic(), 0.0, 0
        bar = tqdm(total=self.steps_per_epoch, initial=s.step, desc=f'epoch {s.epoch + 1}/{cfg.epochs}',
                   unit='step', leave=False, dynamic_ncols=True, disable=None)
        t_step = time.monotonic()
        for X, y in self.train_it.epoch(s.epoch, start=s.step):
            if self.stopper.should_stop():
                bar.close()
                s.stop_reason = self.stopper.reason
                s.elapsed_s = self.elapsed()
                self.add_epoch_time(time.monotonic() - t_epoch, train_time, images)
                self.check_finite_weights()
                save_checkpoint(self.run.file(runfiles.CHECKPOINT_NAME), self.model, self.opt, s, cfg,
                                self.average, self.lookahead)
                self.run.log(f'stopped at epoch {s.epoch + 1}, step {s.step}/{self.steps_per_epoch}: '
                             f'{s.stop_reason}; resumable checkpoint written')
                return False
            lr = self.lr()
            loss, grads, details = self.model.loss(X, y, details=True, label_smoothing=cfg.label_smoothing)
            if not np.isfinite(loss):
                bar.close()
                raise Diverged(self.divergence_message(loss, lr), self.divergence_record(loss, lr))
            clip_grad_norm(grads, cfg.clip)
            self.opt.step(grads, lr)
            s.global_step += 1
            if self.lookahead is not None:
                self.pull_to_slow_weights()
            if self.average is not None:
                self.average.update(self.model.params)
            # Running sums of the epoch (cross-entropy without the L2 term, so it compares with val loss;
            # with label smoothing it is the smoothed cross-entropy, which is higher).
            s.sum_loss += details['data_loss'] * len(y)
            s.sum_correct += int((details['logits'].argmax(1) == y).sum())
            s.seen += len(y)
            s.step += 1
            images += len(y)
            now = time.monotonic()
            train_time, t_step = train_time + now - t_step, now
            bar.update(1)
            bar.set_postfix(loss=f'{s.sum_loss / s.seen:.3f}', acc=f'{s.sum_correct / s.seen:.3f}',
                            lr=f'{lr:.4f}', img_s=f'{images / train_time:.0f}')
        bar.close()
        self.add_epoch_time(time.monotonic() - t_epoch, train_time, images)
        return True

    def pull_to_slow_weights(self):
        """cfg.lookahead: after every lookahead-th step, pull the weights to the slow copy, more
        strongly as the schedule's end (its steps as planned now) nears; after its last step,
        make the slow copy the model, as airbench does."""
        total = self.cfg.epochs * self.steps_per_epoch
        step = self.state.global_step
        if self.lookahead.due(step):
            self.lookahead.pull(self.model.params, self.lookahead.decay(step, total))
        if step == total:
            self.lookahead.finish(self.model.params)

    def add_epoch_time(self, wall_s, train_s, images):
        s = self.state
        s.epoch_wall_s += wall_s
        s.epoch_train_s += train_s
        s.epoch_timed_images += images

    def check_finite_weights(self):
        """Diverged if an update made a weight non-finite: a checkpoint never holds one, so the
        last checkpoint can always be resumed (with a lower learning rate)."""
        bad = next((k for k, v in self.model.params.items() if not np.isfinite(v).all()), None)
        if bad is not None:
            what = f'non-finite in {bad}'
            raise Diverged(self.divergence_message(what, self.lr()), self.divergence_record(what, self.lr()))

    def end_epoch(self):
        """Validate, keep best.npz, write ckpt.npz and history.json, log one line."""
        s, cfg = self.state, self.cfg
        lr = self.lr(s.global_step - 1)
        t_val = time.monotonic()
        val_loss, val_acc, _, _ = evaluate(self.eval_model, self.val_it, self.val_tta)
        s.eval_images_per_s = len(self.val_it.y) / max(1e-9, time.monotonic() - t_val)
        # Leave room for a validation pass and the final evaluation in the time budget.
        self.stopper.reserve_s = self.reserve_s(s.eval_images_per_s)
        speed = s.epoch_timed_images / s.epoch_train_s if s.epoch_train_s > 0 else None
        epoch_time = s.epoch_wall_s
        record = runfiles.EpochRecord(
            epoch=s.epoch + 1, train_loss=s.sum_loss / s.seen, train_acc=s.sum_correct / s.seen,
            val_loss=val_loss, val_acc=val_acc, lr=lr, base_lr=cfg.lr,
            epoch_time_s=epoch_time + time.monotonic() - t_val, images_per_s=speed)
        if self.average is not None:      # what the average gains over the last step's weights
            record.val_acc_raw = evaluate(self.model, self.val_it, self.val_tta)[1]
        improved = val_acc > s.best_val_acc
        if improved:
            s.best_val_acc, s.best_epoch = val_acc, s.epoch + 1
            self.eval_model.save(self.run.file(runfiles.BEST_NAME),
                                 extra_meta={'epoch': s.epoch + 1, 'val_acc': val_acc})
        s.epoch, s.step, s.sum_loss, s.sum_correct, s.seen = s.epoch + 1, 0, 0.0, 0, 0
        s.epoch_wall_s, s.epoch_train_s, s.epoch_timed_images = 0.0, 0.0, 0
        s.elapsed_s = record.elapsed_s = self.elapsed()
        s.history.append(record.to_json())
        fitted = self.fit_epochs_to_budget()
        self.check_finite_weights()
        save_checkpoint(self.run.file(runfiles.CHECKPOINT_NAME), self.model, self.opt, s, cfg, self.average,
                        self.lookahead)
        if fitted:      # after the checkpoint, as on resume: both then say the same epochs
            runfiles.write_config(self.run.path, cfg.to_dict())
        runfiles.write_history(self.run.path, s.history)
        shown = f'  {speed:.0f} img/s' if speed else ''
        self.run.log(f"epoch {record.epoch:3d}/{cfg.epochs}  train loss {record.train_loss:.4f} "
                     f"acc {record.train_acc:.4f}  val loss {val_loss:.4f} acc {val_acc:.4f}"
                     f"{' *' if improved else '  '}  lr {lr:.4g}  {record.epoch_time_s:.1f}s{shown}")
        if fitted:
            self.run.log(fitted)

    def fit_epochs_to_budget(self):
        """With fit_epochs and a time budget, at the end of every epoch from the warm-up's last (at
        least the first): choose again how many epochs fit the budget (epochs_that_fit), up to the
        configuration's own, and make cfg.epochs that number -- lower or higher than the last
        choice -- so the schedule's decay ends just before the stop at the speed the host has now,
        instead of being cut off (the host slowed) or leaving time unused (it sped up).

        The rate never jumps: the rest of the schedule starts from the rate the old plan had reached
        at this step (state.schedule_anchor, optim.learning_rate's anchor). An epoch's time is the
        mean of this invocation's last FIT_RECENT epochs, validation included; the budget, like the
        Stopper's, counts from this invocation's start and keeps the final evaluation's reserve.
        Returns the log line saying what was chosen (the first choice, then each change), or None."""
        s, cfg, stopper = self.state, self.cfg, self.stopper
        times = [r['epoch_time_s'] for r in s.history[self.first_epoch:]][-FIT_RECENT:]
        if (not cfg.fit_epochs or stopper.max_hours is None
                or s.epoch < max(1, cfg.warmup_epochs) or s.epoch >= cfg.epochs or not times):
            return None
        epoch_s = sum(times) / len(times)
        left_s = stopper.max_hours * 3600.0 - (time.monotonic() - stopper.t_start) - stopper.reserve_s
        most = s.most_epochs or cfg.epochs
        chosen, before, first = epochs_that_fit(s.epoch, epoch_s, left_s, most), cfg.epochs, s.fitted_epochs is None
        if not first and chosen == before:
            return None
        fraction = min(1.0, self.lr(s.global_step) / cfg.lr)      # where the old plan is now
        s.schedule_anchor = [s.global_step, fraction]
        cfg.epochs = s.fitted_epochs = chosen
        s.most_epochs = most
        change = '' if first else f' (was {before})'
        return (f'fit_epochs: {chosen} of at most {most} epochs fit the {stopper.max_hours:g} h budget{change} '
                f'({epoch_s:.0f} s an epoch, {left_s / 60:.1f} min left before the final evaluation, '
                f'{stopper.reserve_s:.0f} s kept for it); the schedule now falls from lr '
                f'{fraction * cfg.lr:.4g} to {cfg.min_lr:g} at the end of epoch {chosen}')

    def divergence_record(self, loss, lr):
        """Where the run diverged, as data (diverged.json; the message is added when it is written):
        epoch and step are 1-based."""
        s = self.state
        return runfiles.Divergence(epoch=s.epoch + 1, step=s.step + 1, global_step=s.global_step + 1,
                                   lr=float(lr), loss=str(loss))

    def divergence_message(self, loss, lr):
        """What happened, and a command that continues (or restarts) with a lower learning rate."""
        s, cfg = self.state, self.cfg
        lower = float(f'{cfg.lr / 2:.3g}')
        what = f'the loss became {loss} at epoch {s.epoch + 1}, step {s.step + 1} (lr {lr:.4g})'
        ckpt = self.run.file(runfiles.CHECKPOINT_NAME)
        if ckpt.is_file() and lower >= cfg.min_lr:
            return (f'{what}; the last checkpoint is intact: continue from it with a lower learning '
                    f'rate, python main.py --resume {ckpt} --lr {lower:g}')
        then = 'no checkpoint was written yet' if not ckpt.is_file() else \
            f"this run's min_lr = {cfg.min_lr:g} does not allow a lower rate on resume"
        return (f'{what}; {then}, so start the run again with a lower learning rate: '
                f'{restart_command(cfg, lower)}')


def evaluation_reserve_s(n_val, n_test, val_tta, test_tta, val_images_per_s, val_passes=1):
    """Seconds the time budget keeps free for what follows a stop: an epoch's validation of the
    n_val images with its views (val_tta, Config.val_tta_mode) -- val_passes of them: 2 with the
    weight average (ema), whose epoch also scores the last weights (val_acc_raw) -- then the final
    evaluation's validation pass (for the temperature) and test of n_val + n_test images with the
    test-time views (test_tta, Config.tta_mode).

    The work is counted in view-images (an image under V views costs V predictions):
    n_val * V_val * val_passes + (n_val + n_test) * V_test. val_images_per_s
    (TrainState.eval_images_per_s) was measured on an epoch's validation pass, so it is
    val_images_per_s * V_val view-images per second. The quotient is computed with the ratio V_test / V_val: with the same views (val_views
    'test') the ratio is 1.0 and the reserve is (2 n_val + n_test) / val_images_per_s bit for
    bit, as before val_views existed; with val_views 'one' and tta 'flip+translate' the final
    evaluation's part is six times what counting images alone would reserve.
    """
    v_val, v_test = len(tta_weights(val_tta)), len(tta_weights(test_tta))
    return (n_val * val_passes + (n_val + n_test) * v_test / v_val) / val_images_per_s


# An epoch may take a little longer than the ones measured (this host's speed drifts by several
# percent within an hour): the choice counts each remaining epoch at this much of their mean time.
FIT_MARGIN = 1.03


# fit_epochs times an epoch by the mean of this many of the last ones: recent enough to follow
# the host's speed as it drifts, several so one slow epoch does not decide alone.
FIT_RECENT = 3


def epochs_that_fit(done, epoch_s, left_s, most, margin=FIT_MARGIN):
    """The number of epochs a run with a time budget trains (fit_epochs): the ``done`` ones and
    as many more of ``epoch_s`` seconds each (counted at ``margin`` times that) as fit in the
    ``left_s`` seconds the budget has before its final evaluation, at most ``most`` in all.

    At least one more than ``done`` (``done`` < ``most``): a schedule never ends with its rate
    still high. When not even one more epoch fits, that last epoch still falls to min_lr, and the
    budget's stop cuts it late in its fall, where the rate is low."""
    more = int(max(0.0, left_s) // (epoch_s * margin)) if epoch_s > 0 else most
    return min(most, done + max(1, more))


def restart_command(cfg, lr):
    """The main.py command that starts ``cfg``'s run again in a new folder, with learning rate ``lr``."""
    presets = load_presets()
    name = cfg.preset if cfg.preset in presets else 'fast'
    base = presets[name].to_dict()
    changed = {k: getattr(cfg, k) for k in Config.preset_keys() if base.get(k) != getattr(cfg, k)}
    changed.pop('lr', None)
    if changed.get('min_lr', base['min_lr']) > lr:
        changed['min_lr'] = lr
    words = [f'python main.py --preset {name} --lr {lr:g}'] + [
        f"--set {k}={json.dumps(v, separators=(',', ':')) if not isinstance(v, str) else v}"
        for k, v in sorted(changed.items())]
    if cfg.data_dir != 'data':
        words.append(f'--data-dir {cfg.data_dir}')
    return ' '.join(words)


def averaged_model(model, average):
    """The model to evaluate: ``model`` itself, or a twin holding the weight average's parameters."""
    if average is None:
        return model
    twin = copy.copy(model)            # same configuration; params is the average's dict, shared
    twin.params = average.params
    return twin


def evaluate(model, iterator, tta='none', single_view=None):
    """Loss, accuracy, probabilities (N, 10) and final hidden states (N, H) over an iterator.

    tta: test-time augmentation, one of data_utils.TTA_MODES (Config.tta_mode): 'none'; 'flip',
    the mean of the probabilities of each image and of its left-right mirror (twice the cost);
    'flip+translate', the weighted mean over those two and the image shifted one pixel down-right
    and up-left, each with its mirror (six times the cost; data_utils.tta_views). The hidden
    states are those of the image as given. single_view: an optional dict that receives the
    probabilities of the images as given ('probs'), to measure what the augmentation adds.
    """
    # Summed in multiples of the smallest weight, scaled once at the end: 'flip' is then
    # 0.5 * (p + p_mirror) exactly as before there were other augmentations.
    unit = float(tta_weights(tta).min())
    probs, plain, hidden, labels = [], [], [], []
    for X, y in iterator.epoch(0):
        total = None
        for k, (weight, view) in enumerate(tta_views(X, tta)):
            if k == 0:                        # the image as given: its hidden states too
                p, h = model.predict_proba(view, batch_size=len(X), return_features=True)
                plain.append(p)
            else:
                p = model.predict_proba(view, batch_size=len(X))
            term = p if weight == unit else (weight / unit) * p
            total = term if total is None else total + term
        probs.append(total if unit == 1 else total * unit)
        hidden.append(h)
        labels.append(y)
    probs = np.concatenate(probs)
    labels = np.concatenate(labels)
    if single_view is not None:
        single_view['probs'] = np.concatenate(plain)
    return cross_entropy(probs, labels), accuracy(probs, labels), probs, np.concatenate(hidden)


def final_evaluation(cfg, run, model, state, data, announce=None):
    """Evaluate the best parameters on the test set; write metrics.json and predictions.npz.

    The epoch and validation accuracy reported come from best.npz's own
    metadata, so they always describe the parameters evaluated. ``announce`` is
    logged once best.npz has been read and checked. The temperature of
    temperature scaling is fitted on the validation outputs of the same
    parameters, computed as the test outputs are (with the run's test-time
    augmentation, Config.tta_mode), and applied to the test outputs: metrics.json
    reports both (calibrate). With a test-time augmentation, metrics.json's
    single_view holds the figures of the images as given; its key tta names the
    augmentation ('none', 'flip' or 'flip+translate').
    Nothing here draws from a random generator of the training.
    """
    model, best = load_best(cfg, run, model)
    if announce:
        run.log(announce)
    mean, std = state.normalization()
    t_start = time.monotonic()
    val_it = BatchIterator(data['X_val'], data['y_val'], cfg.eval_batch_size, mean=mean, std=std)
    tta = cfg.tta_mode()
    _, _, val_probs, _ = evaluate(model, val_it, tta)
    test_it = BatchIterator(data['X_test'], data['y_test'], cfg.eval_batch_size, mean=mean, std=std)
    t0 = time.monotonic()
    single = {}
    test_loss, test_acc, probs, hidden = evaluate(model, test_it, tta, single_view=single)
    eval_s = time.monotonic() - t0
    labels = data['y_test']
    if not (math.isfinite(test_loss) and np.isfinite(probs).all() and np.isfinite(val_probs).all()):
        raise RuntimeError('the test evaluation gave non-finite probabilities; metrics.json was not written')
    probs = probs.astype(np.float32)         # as predictions.npz holds them: every figure is of those
    metrics = test_metrics(cfg, state, best, probs, labels, eval_s, data['label_names'])
    if tta != 'none':     # the same parameters on the images as given: what the augmentation adds
        metrics.single_view = {'test_acc': accuracy(single['probs'], labels),
                               'test_loss': cross_entropy(single['probs'], labels),
                               'ece': expected_calibration_error(single['probs'], labels, n_bins=N_BINS)}
    calibrated = calibrate(metrics, val_probs, data['y_val'], probs, labels)
    # The whole final evaluation (the validation pass and the calibration too) counts in the wall time.
    metrics.wall_time_s = state.elapsed_s + time.monotonic() - t_start
    metrics.tta = tta
    runfiles.write_json(run.file(runfiles.METRICS_NAME), metrics.to_json())
    runfiles.Predictions(probs=probs, labels=labels.astype(np.int64),
                         indices=np.arange(len(labels), dtype=np.int64), hidden=hidden.astype(np.float32),
                         probs_calibrated=calibrated if cfg.calibrated_predictions else None).write(run.path)
    run.log(summary(cfg, run.path, metrics, data['label_names']))
    return metrics


def calibrate(metrics, val_probs, val_labels, probs, labels):
    """Temperature scaling (Guo et al. 2017): fit T on the validation outputs (val_probs (M, C),
    val_labels (M,)), apply it to the test outputs (probs (N, C), labels (N,)); record T and the
    raw and calibrated calibration reports in ``metrics`` (a runfiles.Metrics). Returns the
    calibrated test probabilities, (N, C) float64 (their argmax is probs')."""
    temperature = fit_temperature(val_probs, val_labels)
    calibrated = apply_temperature(probs, temperature)
    metrics.temperature = temperature
    metrics.calibration = {
        'raw': calibration_report(probs, labels, n_bins=N_BINS),
        'calibrated': calibration_report(calibrated, labels, n_bins=N_BINS),
        'validation': {'images': int(len(val_labels)), 'nll': cross_entropy(val_probs, val_labels),
                       'nll_calibrated': cross_entropy(apply_temperature(val_probs, temperature), val_labels)}}
    return calibrated


def load_best(cfg, run, model):
    """(the model to test, {'epoch', 'val_acc', 'evaluated'}): best.npz if the run has one, else ``model``.

    best.npz is checked before use (names, shapes, finite values, the run's own model and a
    record it can have written), so a damaged one is refused before metrics.json is touched.
    """
    best_path = run.file(runfiles.BEST_NAME)
    if not best_path.is_file():
        return model, {'epoch': None, 'val_acc': None,
                       'evaluated': 'the current parameters (no epoch finished, so no best.npz yet)'}
    model, meta = CNNRNN.load(best_path, return_meta=True, **model_settings(cfg))
    epoch, val_acc = meta.get('epoch'), meta.get('val_acc')
    # (best.npz may be an epoch ahead of the checkpoint: a stop between the two writes.)
    if not (isinstance(epoch, int) and 1 <= epoch <= cfg.epochs
            and isinstance(val_acc, (int, float)) and 0 <= val_acc <= 1):
        raise UsageError(f'{best_path} records epoch {epoch!r} and validation accuracy '
                         f'{val_acc!r}, which this run cannot have written; it is damaged: '
                         f'delete it and re-evaluate (python main.py --resume {run.file(runfiles.CHECKPOINT_NAME)} '
                         f'--evaluate) to test the last weights instead')
    return model, {'epoch': epoch, 'val_acc': val_acc, 'evaluated': f'best.npz (epoch {epoch})'}


def test_metrics(cfg, state, best, probs, labels, eval_s, label_names):
    """The runfiles.Metrics record (metrics.json) of a test evaluation (probs (N, 10), labels (N,))."""
    confusion = confusion_matrix(labels, probs.argmax(1))
    speeds = [r['images_per_s'] for r in state.history if r.get('images_per_s')]
    return runfiles.Metrics(
        test_loss=cross_entropy(probs, labels), test_acc=accuracy(probs, labels),
        ece=expected_calibration_error(probs, labels, n_bins=N_BINS),
        per_class_acc=per_class_accuracy(confusion), confusion_matrix=confusion,
        best_val_acc=best['val_acc'], best_epoch=best['epoch'], epochs_done=state.epoch,
        epochs_planned=cfg.epochs,
        stopped_early=bool(state.stop_reason), stop_reason=state.stop_reason,
        evaluated=best['evaluated'],
        wall_time_s=state.elapsed_s + eval_s,
        train_images_per_s=float(np.median(speeds)) if speeds else None,
        test_images_per_s=len(labels) / max(eval_s, 1e-9),
        test_images=int(len(labels)), label_names=list(label_names),
        time_to_val_acc={f'{t:.2f}': time_to_accuracy(state.history, t) for t in TIME_TO_VAL_ACC},
        data_fingerprint=state.data_fingerprint, code_commits=list(state.code_commits) or None,
        time_budgets_h=list(state.time_budgets_h) or None)


def viz_command(run_dir):
    """The command that draws this run's figures, as it works when typed in the current folder:
    the interpreter that runs this process (e.g. .venv/bin/python after make train) and viz.py
    beside this file."""
    return cli.python_command(Path(__file__).resolve().parent / 'viz.py', Path(run_dir),
                              interpreter=cli.typed_path(sys.executable))


def summary(cfg, run_dir, m, names):
    """The one-screen summary printed at the end of a run (m: its runfiles.Metrics)."""
    early = f'  (stopped early: {m.stop_reason})' if m.stopped_early else ''
    tta = {'flip': 'with the flip', 'flip+translate': 'with the flip and the one-pixel shifts'}.get(cfg.tta_mode())
    lines = ['', '=' * 64,
             f'run      {run_dir}',
             f'preset   {cfg.preset}  cell {cfg.cell}  layout {cfg.seq_layout}  epochs {m.epochs_done}/{cfg.epochs}'
             f'  subset {cfg.subset}{early}',
             f'test     accuracy {100 * m.test_acc:.2f}%  loss {m.test_loss:.4f}  ECE {m.ece:.4f}'
             f'  ({m.test_images} images, {m.evaluated}'
             + (f", {tta}; {100 * m.single_view['test_acc']:.2f}% without)"
                if m.single_view is not None and tta else ')'),
             *calibration_lines(m),
             f'val      best accuracy {100 * m.best_val_acc:.2f}% at epoch {m.best_epoch}'
             + (' (one view: val_views one)' if cfg.val_tta_mode() != cfg.tta_mode() else '')
             if m.best_val_acc is not None else 'val      no epoch finished',
             f'time     {m.wall_time_s / 60:.1f} min'
             + (f', {m.train_images_per_s:.0f} training images/s' if m.train_images_per_s else ''),
             'reached  ' + ', '.join(f'{100 * float(t):.0f}% val at '
                                     + (f'{s / 60:.1f} min' if s is not None else '-')
                                     for t, s in m.time_to_val_acc.items()),
             'per class ' + '  '.join(f'{n[:5]} {100 * a:.0f}' for n, a in zip(names, m.per_class_acc)),
             f'next     {viz_command(run_dir)}', '=' * 64]
    return '\n'.join(lines)


def calibration_lines(m):
    """The summary's lines on calibration (m: runfiles.Metrics): raw and calibrated NLL and ECE, T,
    and whether each ECE is above what a perfectly calibrated model with those confidences scores."""
    if m.calibration is None:
        return []
    fit = m.calibration.get('validation') or {}

    def line(head, r):
        noise = r['ece_if_calibrated']
        return (f"{head:<32}NLL {r['nll']:.4f}  ECE {r['ece']:.4f}  ("
                f"{'distinguishable from' if r['distinguishable'] else 'within the noise of'} a calibrated "
                f"model: {noise['mean']:.4f}, 95% under {noise['p95']:.4f})")
    lo, hi = TEMPERATURE_RANGE
    bound = (f' T is at an end of its search range ({lo:g} to {hi:g}): the validation outputs do not pin it '
             f'down, as when every validation image is right.'
             if min(abs(math.log(m.temperature / lo)), abs(math.log(m.temperature / hi))) < 1e-3 else '')
    return [line('calib    raw', m.calibration['raw']),
            line(f'         calibrated, T = {m.temperature:.3f}', m.calibration['calibrated']),
            f"         (T fitted on {fit.get('images') or 'the'} validation images; the predictions, "
            f"hence the accuracy, are unchanged.{bound})"]


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------

# Preset keys a resume may change with --set: they change how the run is evaluated, not what it learns.
RESUME_SETTABLE = ('eval_batch_size', 'calibrated_predictions')


def build_parser():
    ap = cli.ArgumentParser(
        prog='main.py', description='Train the NumPy CNN+RNN on CIFAR-10.',
        epilog='Examples:\n  python main.py --preset fast --subset 0.4 --max-hours 1\n'
               '  python main.py --resume runs/latest/ckpt.npz\n  python main.py --list-presets',
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--preset', default='fast', help='named settings from presets.json (default: fast)')
    ap.add_argument('--list-presets', action='store_true', help='print the presets and exit')
    ap.add_argument('--max-hours', type=float, help='time budget for this invocation; training stops '
                    'cleanly in time to evaluate, with a resumable checkpoint')
    ap.add_argument('--resume', metavar='CKPT', help='continue the run that wrote this ckpt.npz (or '
                    'the run folder holding it), in its own folder, with its saved configuration; '
                    '--lr may set a new base learning rate from the resumed step on')
    ap.add_argument('--evaluate', action='store_true', help='with --resume of a finished run: redo '
                    'the test evaluation (metrics.json, predictions.npz)')
    ap.add_argument('--out', help='run folder (default: runs/<timestamp>-<preset>); must be new or empty')
    ap.add_argument('--data-dir', default=None, help='folder holding cifar-10-python.tar.gz or '
                    'cifar-10-batches-py (default: data)')
    add_override_flags(ap)      # --epochs, --batch-size, --lr, ... and --set, from config.Config
    return ap


def check_args(args):
    """Checks of the options themselves, before any file is read; returns the overrides
    ({key: value}) the flags and --set give, each checked by config.Config."""
    if args.max_hours is not None and not (args.max_hours > 0 and math.isfinite(args.max_hours)):
        raise UsageError(f'--max-hours {args.max_hours} is invalid; give a positive number of hours')
    if args.data_dir is not None and not args.data_dir.strip():
        raise UsageError('--data-dir was given an empty path; give the folder holding '
                         'cifar-10-python.tar.gz, or leave the option out for data/')
    if args.out is not None and not args.out.strip():
        raise UsageError('--out was given an empty path; give a folder for the run, or leave the '
                         'option out for runs/<timestamp>-<preset>')
    if args.evaluate and args.resume is None:
        raise UsageError('--evaluate redoes the test evaluation of a finished run; use it with --resume')
    overrides = overrides_from_args(args)
    if args.resume is not None:
        fixed = [flag_name(k) for k in Config.flag_keys() if k != 'lr' and getattr(args, k) is not None]
        fixed += [f'--set {k}' for k in parse_set_options(args.set) if k not in RESUME_SETTABLE]
        fixed += ['--out'] if args.out else []
        fixed += ['--preset'] if args.preset != 'fast' else []
        if fixed:
            raise UsageError(f"{', '.join(fixed)} cannot be combined with --resume: a resumed run "
                             f"keeps its saved configuration (only --lr, --max-hours, --data-dir and "
                             f"--set {'/'.join(RESUME_SETTABLE)} apply)")
    return overrides


def resolve_config(args, overrides):
    """Preset + command-line overrides -> validated Config."""
    presets = load_presets()
    if args.preset not in presets:
        raise UsageError(f"unknown preset {args.preset!r}; choose one of {', '.join(presets)} "
                         f"(python main.py --list-presets shows them)")
    settings = presets[args.preset].to_dict()
    settings.update(overrides)
    settings.update(preset=args.preset, data_dir=args.data_dir or 'data', description='')
    return Config.from_dict(settings, 'the configuration')


def list_presets():
    for name, cfg in load_presets().items():
        print(f'{name:6} {cfg.description}')
        print('       ' + ', '.join(f'{k}={getattr(cfg, k)}' for k in Config.preset_keys()))


def run(argv=None):
    """The command line; returns the exit code."""
    stopper = Stopper()
    stopper.install()
    try:
        cli.raise_if_interrupted_while_starting()     # one that arrived during the imports
        args = build_parser().parse_args(argv)
        stopper.max_hours = args.max_hours
        if args.list_presets:
            list_presets()
            return EXIT_OK
        overrides = check_args(args)
        # Threads, BLAS threads and the allocator are process-wide: set here, where a model will train.
        prepare_process(stopper)
        if args.resume is not None:
            return resume_run(args, stopper)
        return new_run(args, overrides, stopper)
    except (UsageError, ConfigError, RunFileError, DataError) as e:
        print(f'error: {e}', file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:     # anything the modules above did not word themselves
        print(f"error: {runfiles.describe_os_error(e, e.filename or '?', 'use')}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except MemoryError:
        print(f'error: this machine ran out of memory {out_of_memory_advice(stopper)}', file=sys.stderr)
        return EXIT_BAD_INPUT
    except cli.StartupInterrupted as e:
        then = (f'{stopper.ckpt} is unchanged' if stopper.ckpt is not None
                else 'no run folder was created')
        print(f'main.py: interrupted by {e} before training started; {then}', file=sys.stderr)
        return EXIT_ABORTED
    except KeyboardInterrupt:
        ckpt = stopper.ckpt
        then = (f'the last checkpoint is intact: python main.py --resume {ckpt} continues'
                if ckpt is not None and ckpt.is_file() else 'no checkpoint was written yet')
        print(f'error: aborted by a second interrupt; {then}', file=sys.stderr)
        return EXIT_ABORTED
    except Exception as e:   # a bug: one line here, the traceback in the run's train.log, crashed.json
        folder = stopper.ckpt.parent if stopper.ckpt is not None else None
        code = cli.report_crash('main.py', e, folder / runfiles.LOG_NAME if folder is not None else None)
        if folder is not None:
            record_crash(folder, e, stopper.during)
        return code
    finally:
        stopper.uninstall()


def record_crash(folder, exc, during):
    """Write the run's crashed.json (a runfiles.Crash record), under its lock. A failure to write
    it changes nothing: the one-line report and train.log's traceback already tell of the crash."""
    lock = runfiles.RunFolderLock(folder, 'main.py')
    try:
        if lock.acquire(busy_ok=True):
            runfiles.Crash(f'{type(exc).__name__}: {exc}', during=during,
                           time=datetime.datetime.now().isoformat(timespec='seconds')).write(folder)
    except (RunFileError, OSError):
        pass
    finally:
        lock.release()


def prepare_process(stopper):
    """fast_layers.prepare_process_for_training: worker and BLAS threads from the CPUs this process
    may use (or CNNRNN_THREADS), and the allocator settings; logged at the start of training."""
    try:
        settings = prepare_process_for_training()
    except ThreadSettingError as e:
        raise UsageError(str(e)) from None
    stopper.process_settings = settings
    return settings


def out_of_memory_advice(stopper):
    """The rest of the out-of-memory sentence: a command that works from where the run stopped."""
    ckpt = stopper.ckpt
    if stopper.during == 'evaluation' and ckpt is not None and ckpt.is_file():
        return (f'during the test evaluation (the checkpoint is intact); evaluate in smaller batches: '
                f'python main.py --resume {ckpt} --evaluate --set eval_batch_size=100')
    if ckpt is not None and ckpt.is_file():
        return (f'(the last checkpoint is intact); close other programs and continue with '
                f'python main.py --resume {ckpt}, or start a new run with a smaller --batch-size '
                f'or --set hidden=...')
    return ('before the first checkpoint; start the run again with a smaller --batch-size, '
            '--set hidden=... or --set eval_batch_size=...')


def load_data(cfg):
    try:
        return load_cifar10(cfg.data_dir, subset=cfg.subset, val_fraction=cfg.val_fraction, seed=cfg.seed)
    except ValueError as e:       # e.g. a subset too small to give every class a validation image
        raise UsageError(str(e)) from None


def new_run(args, overrides, stopper):
    cfg = resolve_config(args, overrides)
    # Data and model come first, so bad data or an absurd size leaves no empty run folder behind.
    data = load_data(cfg)
    mean, std = channel_mean_std(data['X_train']) if cfg.standardize else (None, None)
    try:
        model = CNNRNN(reg=cfg.weight_decay, seed=cfg.seed, rnn_init=cfg.rnn_init, **model_settings(cfg))
    except MemoryError:
        raise UsageError(f'a model with hidden={cfg.hidden} needs more memory than this machine has; '
                         f'choose a smaller --set hidden (the method uses 128)') from None
    # Before the optimizer and the weight average copy the parameters: both start from the fitted layer.
    fit_whitening(model, cfg, data, mean, std)
    opt = new_optimizer(model, cfg)
    average = WeightAverage(model.params, cfg.ema) if cfg.ema else None
    lookahead = Lookahead(model.params, cfg.lookahead) if cfg.lookahead else None
    state = TrainState(mean=mean, std=std, data_fingerprint=data['fingerprint'],
                       time_budgets_h=[args.max_hours])
    state.note_code_commit()
    # From here on a signal stops the run at its next step, with a resumable checkpoint.
    stopper.begin('training')
    run = new_run_folder(args.out, cfg.preset)
    run.lock.acquire()
    stopper.ckpt, stopper.log = run.file(runfiles.CHECKPOINT_NAME), run.log
    try:
        runfiles.write_config(run.path, cfg.to_dict())
        run.log(f"run {run.path}: preset {cfg.preset}, {len(data['y_train'])} train / "
                f"{len(data['y_val'])} val / {len(data['y_test'])} test images")
        return train_and_evaluate(cfg, run, model, opt, state, data, stopper, average, lookahead)
    finally:
        run.lock.release()


def resume_run(args, stopper):
    ckpt = checkpoint_path(args.resume)
    run = RunFolder(ckpt.parent)
    check_run_files(run)
    ck = load_checkpoint(ckpt)
    if not args.evaluate and runfiles.status(run.path).state == runfiles.FINISHED:
        print(f'{run.path} already finished training ({ck.state.epoch} of {ck.cfg.epochs} epochs) and '
              f'has metrics.json; nothing to do (add --evaluate to redo the test evaluation)')
        return EXIT_OK
    run.lock.acquire()
    stopper.ckpt, stopper.log = run.file(runfiles.CHECKPOINT_NAME), run.log
    try:
        # Read again under the lock: another process may have written it since.
        ck = load_checkpoint(ckpt)
        model, state, cfg = ck.model, ck.state, ck.cfg
        check_config_file(run, cfg)
        new_lr = lr_change(args, cfg, finished=state.epoch >= cfg.epochs)
        data_dir_given = args.data_dir is not None and args.data_dir != cfg.data_dir
        data = load_data(dataclasses.replace(cfg, data_dir=args.data_dir or cfg.data_dir))
        adopted = check_same_data(state, data, run, cfg.data_dir, args.data_dir or cfg.data_dir)
        check_position(state, cfg, data, ckpt)
        # The average's update count is the number of optimizer steps: one per step.
        average = (WeightAverage(model.params, cfg.ema, averaged=ck.average, updates=state.global_step)
                   if cfg.ema else None)
        lookahead = Lookahead(model.params, cfg.lookahead, slow=ck.slow) if cfg.lookahead else None
        opt = optimizer_from(ck, model, cfg)
        stopper.begin('training')
        changes = apply_resume_changes(args, cfg, state, data, new_lr, data_dir_given)
        if changes or adopted:
            # The checkpoint first, then config.json: both say the same before anything else runs.
            save_checkpoint(run.file(runfiles.CHECKPOINT_NAME), model, opt, state, cfg, average, lookahead)
            runfiles.write_config(run.path, cfg.to_dict())
            run.log(f"resume changes: {'; '.join(changes + (['data fingerprint recorded'] if adopted else []))}")
        forget_crash(run)
        state.note_code_commit()
        if state.epoch >= cfg.epochs:
            stopper.begin('evaluation')
            final_evaluation(cfg, run, averaged_model(model, average), state, data,
                             announce=f're-evaluating {run.path} (training finished at epoch {state.epoch})')
            return EXIT_OK
        state.stop_reason = None
        state.time_budgets_h.append(args.max_hours)
        forget_divergence(run)
        run.log(f'resuming {run.path} at epoch {state.epoch + 1}, step {state.step}')
        return train_and_evaluate(cfg, run, model, opt, state, data, stopper, average, lookahead)
    finally:
        run.lock.release()


def forget_divergence(run):
    """A resume of a diverged run (with a lower learning rate) continues it: the run is no longer
    diverged, so its diverged.json goes (train.log keeps the story)."""
    forget_record(run, runfiles.read_divergence, runfiles.Divergence, runfiles.DIVERGED_NAME,
                  'continuing after the divergence')


def forget_crash(run):
    """A resume of a crashed run continues (or re-evaluates) it: the crash no longer describes the
    run, so its crashed.json goes (train.log keeps the traceback)."""
    forget_record(run, runfiles.read_crash, runfiles.Crash, runfiles.CRASHED_NAME, 'trying again after the crash')


def forget_record(run, read, record_class, name, words):
    """Log and remove the record ``name`` (diverged.json or crashed.json) of ``run``, if it has one."""
    try:
        record = read(run.path)
        what = None if record is None else record.message[:200]
    except RunFileError:
        what = '(unreadable)'
    if what is not None:
        run.log(f'{words} recorded in {name}: {what}')
        record_class.remove(run.path)


def new_optimizer(model, cfg):
    """The run's SGD: every trained parameter at the schedule's rate, BatchNorm's at the multiples
    bn_gamma_lr and bn_beta_lr of it."""
    return SGD(model.params, momentum=cfg.momentum, nesterov=cfg.nesterov, names=model.trained_names(),
               lr_scales=bn_lr_scales(model.trained_names(), cfg.bn_gamma_lr, cfg.bn_beta_lr))


def optimizer_from(ck, model, cfg):
    """The SGD optimizer of a checkpoint, velocities restored."""
    opt = new_optimizer(model, cfg)
    opt.velocity = {k: np.array(v, dtype=model.dtype) for k, v in ck.velocity.items()}
    return opt


def check_run_files(run):
    """UsageError if a file main.py reads or appends to is a named pipe, a device or a folder."""
    for name in runfiles.MAIN_FILES:
        try:
            runfiles.check_regular(run.file(name))
        except OSError as e:
            raise UsageError(runfiles.describe_os_error(e, run.file(name), 'use')) from None


def check_config_file(run, cfg):
    """A resumed run keeps the configuration saved in its checkpoint: refuse a config.json that
    says otherwise (edited by hand), rather than ignore it. A missing config.json is rewritten."""
    path = run.file(runfiles.CONFIG_NAME)
    given = runfiles.read_config(run.path, advice=lambda folder, name: 'delete it and resume again: it '
                                                                      'is rewritten from the checkpoint')
    if given is None:
        runfiles.write_config(run.path, cfg.to_dict())
        return
    saved = json.loads(runfiles.dumps_strict(cfg.to_dict()))
    # Keys added after older runs were started are absent from their config.json: they trained
    # with the defaults, which their checkpoint's configuration gets too.
    given = {**Config.defaults(), **given}
    differ = sorted(k for k in set(saved) | set(given) if saved.get(k) != given.get(k))
    if differ:
        k = differ[0]
        raise UsageError(
            f"{path} says {k} = {given.get(k)!r} but the run's checkpoint says {saved.get(k)!r}"
            + (f' (and {len(differ) - 1} more keys differ)' if len(differ) > 1 else '')
            + f'; a resumed run keeps its saved configuration: undo the edit (or delete {path.name} to '
              f'have it rewritten), and start a new run with --set {k}=... to train with another value')


def lr_change(args, cfg, finished):
    """The new base learning rate --lr asks for, or None (same rate, or a finished run)."""
    if args.lr is None or args.lr == cfg.lr or finished:
        return None
    if args.lr < cfg.min_lr:
        raise UsageError(f"--lr {args.lr} is below this run's min_lr = {cfg.min_lr}; give a learning "
                         f"rate of at least {cfg.min_lr}")
    return args.lr


def check_same_data(state, data, run, recorded_dir, data_dir):
    """Refuse to continue or re-evaluate a run on images other than those it was started on.

    A run started before fingerprints were recorded adopts the current data's (returns True).
    """
    if state.data_fingerprint is None:
        state.data_fingerprint = data['fingerprint']
        return True
    for part, words in (('train', 'training'), ('test', 'test')):
        if state.data_fingerprint[part] != data['fingerprint'][part]:
            raise UsageError(
                f'the {words} images in {data_dir} are not the ones the run {run.path} was started on '
                f'(from {recorded_dir}); resume it with --data-dir pointing at that same CIFAR-10 data')
    return False


def check_position(state, cfg, data, ckpt):
    """Refuse a checkpoint whose step lies past the end of its epoch (steps depend on the data)."""
    steps = -(-len(data['y_train']) // cfg.batch_size)
    if state.step > steps or (state.step == steps and state.epoch < cfg.epochs):
        raise UsageError(f'{ckpt} is not a valid checkpoint (its state has step = {state.step}, past the '
                         f'end of an epoch of {steps} steps); it is damaged: use another checkpoint, '
                         f'or start the run again in a new folder')


def apply_resume_changes(args, cfg, state, data, new_lr, data_dir_given):
    """Apply what a resume may change (--lr, --data-dir of the same data, --set of RESUME_SETTABLE);
    return one phrase per change, for the log."""
    changes = []
    if new_lr is not None:
        # The schedule is a function of the base rate, so the new rate applies from this step on.
        cfg.lr_changes.append({'global_step': state.global_step, 'epoch': state.epoch + 1,
                               'step': state.step, 'from': cfg.lr, 'to': new_lr})
        changes.append(f'base learning rate now {new_lr} (was {cfg.lr})')
        cfg.lr = new_lr
    if data_dir_given:      # the same images (fingerprints checked) in another folder
        changes.append(f'data folder now {args.data_dir} (was {cfg.data_dir}; the same images)')
        cfg.data_dir = args.data_dir
    for key, value in parse_set_options(args.set).items():
        if getattr(cfg, key) != value:
            changes.append(f'{key} now {value} (was {getattr(cfg, key)})')
            setattr(cfg, key, value)
    return changes


def train_and_evaluate(cfg, run, model, opt, state, data, stopper, average=None, lookahead=None):
    stopper.begin('training')
    runfiles.point_latest_at(run.path, warn=run.log)
    run.log('config ' + json.dumps(cfg.to_dict()))
    if stopper.process_settings is not None:
        run.log(f'process {stopper.process_settings}')
    trainer = Trainer(cfg, run, model, opt, state, data, stopper, average, lookahead)
    try:
        trainer.train()
    except Diverged as e:
        dataclasses.replace(e.record, message=str(e)).write(run.path)
        run.log(f'error: {e}', stream=sys.stderr)
        return EXIT_DIVERGED
    stopper.begin('evaluation')
    final_evaluation(cfg, run, trainer.eval_model, state, data)
    return EXIT_OK


def main():
    sys.exit(run())


if __name__ == '__main__':
    main()
