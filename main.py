"""Train the NumPy CNN+RNN on CIFAR-10: presets, schedule, SGD, checkpoints, logs.

    python main.py --preset fast --subset 0.4 --max-hours 1
    python main.py --resume runs/<run>/ckpt.npz
    python main.py --list-presets

A run writes into its own folder (default ``runs/<timestamp>-<preset>``):
config.json, history.json, train.log, ckpt.npz (resumable), best.npz,
metrics.json, predictions.npz; ``runs/latest`` points at the newest run.
See ``../shared/DESIGN.md`` and the README for the contents of each file.

Exit codes: 0 done (also when stopped early by the time budget or Ctrl-C),
1 training diverged (non-finite loss), 2 bad input (the message says which).
"""
import argparse
import datetime
import json
import math
import os
import signal
import sys
import time

import numpy as np

from cnn_rnn_numpy import (CNNRNN, ModelFileError, clip_grad_norm, load_npz, read_meta,
                           save_npz_atomic, softmax_loss, SEQ_LAYOUTS, RNN_INITS)
from data_utils import BatchIterator, DataError, channel_mean_std, load_cifar10
from viz import confusion_matrix, expected_calibration_error, write_text_atomic

PRESETS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'presets.json')
CHECKPOINT_KIND = 'checkpoint'

# Every preset key: (type, check, what a good value looks like). A preset or
# an override that fails a check is refused with that sentence.
PRESET_SCHEMA = {
    'description': (str, lambda v: True, 'a string'),
    'epochs': (int, lambda v: v > 0, 'a positive integer'),
    'batch_size': (int, lambda v: v > 0, 'a positive integer'),
    'lr': (float, lambda v: v > 0, 'a positive number'),
    'schedule': (str, lambda v: v in ('exponential', 'cosine'), "'exponential' or 'cosine'"),
    'warmup_epochs': (int, lambda v: v >= 0, 'an integer >= 0'),
    'decay': (float, lambda v: 0 < v <= 1, 'a number in (0, 1]'),
    'min_lr': (float, lambda v: v >= 0, 'a number >= 0'),
    'weight_decay': (float, lambda v: v >= 0, 'a number >= 0'),
    'clip': (float, lambda v: v >= 0, 'a number >= 0 (0 disables clipping)'),
    'momentum': (float, lambda v: 0 <= v < 1, 'a number in [0, 1)'),
    'nesterov': (bool, lambda v: True, 'true or false'),
    'seq_layout': (str, lambda v: v in SEQ_LAYOUTS, f"one of {list(SEQ_LAYOUTS)}"),
    'rnn_init': (str, lambda v: v in RNN_INITS, f"one of {list(RNN_INITS)}"),
    'hidden': (int, lambda v: v > 0, 'a positive integer'),
    'subset': (float, lambda v: 0 < v <= 1, 'a fraction in (0, 1]'),
    'augment': (bool, lambda v: True, 'true or false'),
    'standardize': (bool, lambda v: True, 'true or false'),
    'seed': (int, lambda v: v >= 0, 'an integer >= 0'),
    'eval_batch_size': (int, lambda v: v > 0, 'a positive integer'),
}


class UsageError(Exception):
    """Bad input from the command line or a file: one sentence, exit code 2."""


class Diverged(Exception):
    """The loss became NaN or infinite."""


# --------------------------------------------------------------------------
# Presets and configuration
# --------------------------------------------------------------------------

def load_presets(path=PRESETS_PATH):
    """All presets from presets.json, each validated against PRESET_SCHEMA."""
    try:
        with open(path) as f:
            presets = json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read the presets file {path} ({e}); restore it from git") from None
    for name, preset in presets.items():
        validate_config(preset, f"preset {name!r}", require_all=True)
    return presets


def validate_config(cfg, where, require_all=False):
    """Check keys, types and ranges; raise UsageError naming the first problem."""
    for key, value in cfg.items():
        if key not in PRESET_SCHEMA:
            raise UsageError(f"{where} has an unknown key {key!r}; known keys are "
                             f"{', '.join(sorted(PRESET_SCHEMA))}")
        typ, check, good = PRESET_SCHEMA[key]
        ok_type = (isinstance(value, bool) if typ is bool else
                   isinstance(value, (int, float)) and not isinstance(value, bool) if typ is float else
                   isinstance(value, int) and not isinstance(value, bool) if typ is int else
                   isinstance(value, typ))
        if not ok_type or not check(value):
            raise UsageError(f"{where}: {key} = {value!r} is invalid; it must be {good}")
    if require_all:
        missing = sorted(set(PRESET_SCHEMA) - set(cfg) - {'description'})
        if missing:
            raise UsageError(f"{where} is missing {', '.join(missing)}; add them to presets.json")


# --------------------------------------------------------------------------
# Optimiser and learning-rate schedule
# --------------------------------------------------------------------------

class SGD:
    """SGD with momentum (optionally Nesterov), updating parameters in place.

    v <- momentum * v - lr * g
    p <- p + v                          (classical)
    p <- p + momentum * v - lr * g      (Nesterov, in the form of Sutskever et al.)
    """

    def __init__(self, params, momentum=0.9, nesterov=False):
        self.params = params
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)
        self.velocity = {k: np.zeros_like(v) for k, v in params.items()}

    def step(self, grads, lr):
        for name, p in self.params.items():
            g = grads[name]
            v = self.velocity[name]
            v *= p.dtype.type(self.momentum)
            v -= p.dtype.type(lr) * g
            if self.nesterov:
                p += p.dtype.type(self.momentum) * v - p.dtype.type(lr) * g
            else:
                p += v


def learning_rate(cfg, step, steps_per_epoch):
    """Learning rate at global step ``step`` (0-based).

    Linear warm-up per step over ``warmup_epochs`` from lr/W to lr, then
    - 'exponential': lr * decay**k in the k-th epoch after the warm-up (constant within an epoch);
    - 'cosine': per step from lr down to min_lr at the end of the last epoch.
    """
    base = cfg['lr']
    warmup = cfg['warmup_epochs'] * steps_per_epoch
    if step < warmup:
        return base * (step + 1) / warmup
    if cfg['schedule'] == 'exponential':
        k = step // steps_per_epoch - cfg['warmup_epochs']
        return base * cfg['decay'] ** k
    total = cfg['epochs'] * steps_per_epoch
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return cfg['min_lr'] + 0.5 * (base - cfg['min_lr']) * (1 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------
# Run folder, logging, atomic files
# --------------------------------------------------------------------------

def write_json_atomic(path, obj):
    """json.dump through viz.write_text_atomic (temporary file, then rename)."""
    write_text_atomic(path, json.dumps(obj, indent=2) + '\n')


def normalization(state):
    """(mean, std) float32 (3,) arrays from a run state, or (None, None) without standardisation."""
    mean, std = state.get('mean'), state.get('std')
    if mean is None:
        return None, None
    return np.asarray(mean, np.float32), np.asarray(std, np.float32)


def to_jsonable(obj):
    """NumPy scalars and arrays inside a structure -> plain Python, for json.dump."""
    if isinstance(obj, dict):
        return {k: to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


class RunLog:
    """Print a line and append it to train.log (flushed, so a crash loses nothing)."""

    def __init__(self, path):
        self.path = path

    def __call__(self, msg):
        stamp = datetime.datetime.now().strftime('%Y-%m-%d %H:%M:%S')
        print(msg, flush=True)
        with open(self.path, 'a') as f:
            f.write(f"{stamp} {msg}\n")


def new_run_dir(out, preset):
    """Create the run folder; refuse to reuse a non-empty one."""
    if out is None:
        stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
        base = os.path.join('runs', f"{stamp}-{preset}")
        out, k = base, 1
        while os.path.exists(out):          # two runs started in the same second
            k += 1
            out = f"{base}-{k}"
    if os.path.isfile(out):
        raise UsageError(f"--out {out} is a file; give a folder path for the run")
    if os.path.isdir(out) and os.listdir(out):
        raise UsageError(f"--out {out} already holds files; choose a new folder, or continue "
                         f"that run with --resume {os.path.join(out, 'ckpt.npz')}")
    os.makedirs(out, exist_ok=True)
    return out


def point_latest_at(run_dir):
    """Make <parent>/latest a symlink to run_dir (runs/latest for the default layout)."""
    run_dir = os.path.abspath(run_dir)
    link = os.path.join(os.path.dirname(run_dir), 'latest')
    tmp = f"{link}.tmp-{os.getpid()}"
    try:
        if os.path.lexists(tmp):
            os.remove(tmp)
        os.symlink(os.path.basename(run_dir), tmp)
        os.replace(tmp, link)
    except OSError:
        pass   # a filesystem without symlinks: the run itself is unaffected


# --------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------

def save_checkpoint(path, model, opt, state, cfg):
    """Everything needed to resume: params, velocities, position, history, config."""
    meta = dict(model.config(), format_version=1, kind=CHECKPOINT_KIND,
                run_config=cfg, state=to_jsonable(state))
    arrays = {'meta': np.array(json.dumps(meta))}
    arrays.update({f'param/{k}': v for k, v in model.params.items()})
    arrays.update({f'velocity/{k}': v for k, v in opt.velocity.items()})
    save_npz_atomic(path, arrays)


def load_checkpoint(path):
    """Read a checkpoint written by save_checkpoint -> (model, velocities, state, cfg)."""
    try:
        arrays = load_npz(path)
        meta = read_meta(arrays, path)
        if meta.get('kind') != CHECKPOINT_KIND:
            raise ModelFileError(f"{path} holds model weights only (best.npz?), not a resumable "
                                 f"checkpoint; resume from the run's ckpt.npz")
        cfg = dict(meta['run_config'])
        validate_config({k: v for k, v in cfg.items() if k in PRESET_SCHEMA}, f"{path}'s configuration")
        model = CNNRNN.load(path, seq_layout=cfg['seq_layout'], hidden=cfg['hidden'])
        velocity = {k[len('velocity/'):]: v for k, v in arrays.items() if k.startswith('velocity/')}
        if set(velocity) != set(model.params) or any(
                velocity[k].shape != model.params[k].shape for k in velocity):
            raise ModelFileError(f"{path} has optimizer state that does not match its model; "
                                 f"it is corrupt: use another checkpoint")
        return model, velocity, meta['state'], cfg
    except (KeyError, TypeError, UsageError) as e:
        raise ModelFileError(f"{path} is not a complete checkpoint of this project ({e}); "
                             f"resume from a ckpt.npz written by main.py") from None


# --------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------

def evaluate(model, iterator):
    """Loss, accuracy, probabilities (N, 10) and final hidden states (N, H) over an iterator."""
    probs, hidden, labels = [], [], []
    for X, y in iterator.epoch(0):
        p, h = model.predict_proba(X, batch_size=len(X), return_features=True)
        probs.append(p)
        hidden.append(h)
        labels.append(y)
    probs = np.concatenate(probs)
    labels = np.concatenate(labels)
    # Cross-entropy from the probabilities (clipped: a float32 probability can round to 0).
    loss = float(-np.log(np.maximum(probs[np.arange(len(labels)), labels], 1e-12)).mean())
    acc = float((probs.argmax(1) == labels).mean())
    return loss, acc, probs, np.concatenate(hidden)


# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------

class StopFlag:
    """Set by SIGINT/SIGTERM; the loop checks it between steps. A second Ctrl-C aborts at once."""

    def __init__(self):
        self.reason = None

    def install(self):
        def handler(signum, frame):
            if self.reason is not None:
                raise KeyboardInterrupt
            self.reason = 'interrupted by ' + signal.Signals(signum).name
            print(f"\n{self.reason}: stopping after this step (Ctrl-C again to abort)", flush=True)
        self.previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}

    def uninstall(self):
        for s, h in getattr(self, 'previous', {}).items():
            signal.signal(s, h)


def train(cfg, run_dir, model, opt, state, data, log, max_hours=None, stop=None,
          stop_after_steps=None):
    """Run (or continue) the training loop; return the updated state.

    state: dict with epoch (0-based, next to run), step (next step within it),
    global_step, history, best_val_acc, best_epoch, elapsed_s, and the running
    sums of the current epoch; it is what ckpt.npz stores.
    stop_after_steps: stop (as if the budget ran out) after this many steps of
    this call; used by the tests to interrupt a run at an exact step.
    """
    from tqdm import tqdm

    mean, std = normalization(state)
    train_it = BatchIterator(data['X_train'], data['y_train'], cfg['batch_size'], shuffle=True,
                             augment=cfg['augment'], seed=cfg['seed'], mean=mean, std=std)
    val_it = BatchIterator(data['X_val'], data['y_val'], cfg['eval_batch_size'], mean=mean, std=std)
    steps_per_epoch = len(train_it)
    n_val, n_test = len(data['y_val']), len(data['y_test'])
    budget_s = None if max_hours is None else max_hours * 3600.0
    t_start = time.monotonic()
    elapsed_before = state['elapsed_s']
    steps_this_call = 0
    eval_rate = state.get('eval_images_per_s')   # for reserving time for the final evaluation

    def out_of_time():
        if budget_s is None:
            return False
        reserve = 0.0
        if eval_rate:   # leave room for a validation pass and the test evaluation
            reserve = (n_val + n_test) / eval_rate
        return time.monotonic() - t_start + reserve > budget_s

    while state['epoch'] < cfg['epochs']:
        e = state['epoch']
        t_epoch = time.monotonic()
        train_time, images_here = 0.0, 0     # of this epoch, in this call
        lr = learning_rate(cfg, state['global_step'], steps_per_epoch)
        bar = tqdm(total=steps_per_epoch, initial=state['step'], desc=f"epoch {e + 1}/{cfg['epochs']}",
                   unit='step', leave=False, dynamic_ncols=True, disable=None)
        t_step = time.monotonic()
        for X, y in train_it.epoch(e, start=state['step']):
            if stop is not None and stop.reason:
                state['stop_reason'] = stop.reason
            elif stop_after_steps is not None and steps_this_call >= stop_after_steps:
                state['stop_reason'] = f'stopped after {steps_this_call} steps (test hook)'
            elif out_of_time():
                state['stop_reason'] = f'time budget of {max_hours} h reached'
            if state.get('stop_reason'):
                bar.close()
                state['elapsed_s'] = elapsed_before + time.monotonic() - t_start
                save_checkpoint(os.path.join(run_dir, 'ckpt.npz'), model, opt, state, cfg)
                log(f"stopped at epoch {e + 1}, step {state['step']}/{steps_per_epoch}: "
                    f"{state['stop_reason']}; resumable checkpoint written")
                return state
            lr = learning_rate(cfg, state['global_step'], steps_per_epoch)
            loss, grads, logits = model.loss(X, y, return_logits=True)
            if not np.isfinite(loss):
                bar.close()
                raise Diverged(f"the loss became {loss} at epoch {e + 1}, step {state['step'] + 1} "
                               f"(lr {lr:.4g}); lower --lr and resume from the last checkpoint")
            clip_grad_norm(grads, cfg['clip'])
            opt.step(grads, lr)
            # Running sums of the epoch (cross-entropy without the L2 term, so it compares with val loss).
            state['sum_loss'] += softmax_loss(logits, y)[0] * len(y)
            state['sum_correct'] += int((logits.argmax(1) == y).sum())
            state['seen'] += len(y)
            state['step'] += 1
            state['global_step'] += 1
            steps_this_call += 1
            images_here += len(y)
            now = time.monotonic()
            train_time += now - t_step
            t_step = now
            bar.update(1)
            bar.set_postfix(loss=f"{state['sum_loss'] / state['seen']:.3f}",
                            acc=f"{state['sum_correct'] / state['seen']:.3f}", lr=f"{lr:.4f}",
                            img_s=f"{images_here / train_time:.0f}")
        bar.close()

        t_val = time.monotonic()
        val_loss, val_acc, _, _ = evaluate(model, val_it)
        eval_rate = state['eval_images_per_s'] = n_val / max(1e-9, time.monotonic() - t_val)
        record = {'epoch': e + 1, 'train_loss': state['sum_loss'] / state['seen'],
                  'train_acc': state['sum_correct'] / state['seen'], 'val_loss': val_loss,
                  'val_acc': val_acc, 'lr': lr, 'epoch_time_s': time.monotonic() - t_epoch,
                  'images_per_s': images_here / train_time if train_time > 0 else None}
        state['history'].append(record)
        improved = val_acc > state['best_val_acc']
        if improved:
            state['best_val_acc'], state['best_epoch'] = val_acc, e + 1
            model.save(os.path.join(run_dir, 'best.npz'), extra_meta={'epoch': e + 1, 'val_acc': val_acc})
        state.update(epoch=e + 1, step=0, sum_loss=0.0, sum_correct=0, seen=0)
        state['elapsed_s'] = elapsed_before + time.monotonic() - t_start
        save_checkpoint(os.path.join(run_dir, 'ckpt.npz'), model, opt, state, cfg)
        write_json_atomic(os.path.join(run_dir, 'history.json'), to_jsonable(state['history']))
        speed = f"  {record['images_per_s']:.0f} img/s" if record['images_per_s'] else ''
        log(f"epoch {e + 1:3d}/{cfg['epochs']}  train loss {record['train_loss']:.4f} "
            f"acc {record['train_acc']:.4f}  val loss {val_loss:.4f} acc {val_acc:.4f}"
            f"{' *' if improved else '  '}  lr {lr:.4g}  {record['epoch_time_s']:.1f}s{speed}")
    state['stop_reason'] = None
    return state


def final_evaluation(cfg, run_dir, model, state, data, log):
    """Evaluate the best parameters on the test set; write metrics.json and predictions.npz."""
    best_path = os.path.join(run_dir, 'best.npz')
    if os.path.exists(best_path):
        model = CNNRNN.load(best_path)
        evaluated = f"best.npz (epoch {state['best_epoch']})"
    else:
        evaluated = 'the current parameters (no epoch finished, so no best.npz yet)'
    mean, std = normalization(state)
    test_it = BatchIterator(data['X_test'], data['y_test'], cfg['eval_batch_size'], mean=mean, std=std)
    t0 = time.monotonic()
    test_loss, test_acc, probs, hidden = evaluate(model, test_it)
    eval_s = time.monotonic() - t0
    labels = data['y_test']
    confusion = confusion_matrix(labels, probs.argmax(1))
    per_class = confusion.diagonal() / np.maximum(1, confusion.sum(1))
    speeds = [r['images_per_s'] for r in state['history'] if r.get('images_per_s')]
    metrics = {
        'test_loss': test_loss, 'test_acc': test_acc,
        'ece': expected_calibration_error(probs, labels, n_bins=15),
        'per_class_acc': per_class, 'confusion_matrix': confusion,
        'best_val_acc': state['best_val_acc'] if state['best_epoch'] else None,
        'best_epoch': state['best_epoch'], 'epochs_done': state['epoch'],
        'epochs_planned': cfg['epochs'],
        'stopped_early': bool(state.get('stop_reason')), 'stop_reason': state.get('stop_reason'),
        'evaluated': evaluated,
        'wall_time_s': state['elapsed_s'] + eval_s,
        'train_images_per_s': float(np.median(speeds)) if speeds else None,
        'test_images_per_s': len(labels) / max(eval_s, 1e-9),
        'test_images': int(len(labels)), 'label_names': list(data['label_names']),
    }
    write_json_atomic(os.path.join(run_dir, 'metrics.json'), to_jsonable(metrics))
    save_npz_atomic(os.path.join(run_dir, 'predictions.npz'),
                    {'probs': probs.astype(np.float32), 'labels': labels.astype(np.int64),
                     'indices': np.arange(len(labels), dtype=np.int64),
                     'hidden': hidden.astype(np.float32)})
    log(summary(cfg, run_dir, metrics, data['label_names']))
    return metrics


def summary(cfg, run_dir, m, names):
    """The one-screen summary printed at the end of a run."""
    lines = ['', '=' * 64,
             f"run      {run_dir}",
             f"preset   {cfg['preset']}  layout {cfg['seq_layout']}  epochs {m['epochs_done']}/{cfg['epochs']}"
             f"  subset {cfg['subset']}" + ('  (stopped early: ' + m['stop_reason'] + ')' if m['stopped_early'] else ''),
             f"test     accuracy {100 * m['test_acc']:.2f}%  loss {m['test_loss']:.4f}  ECE {m['ece']:.4f}"
             f"  ({m['test_images']} images, {m['evaluated']})",
             f"val      best accuracy {100 * m['best_val_acc']:.2f}% at epoch {m['best_epoch']}"
             if m['best_val_acc'] is not None else 'val      no epoch finished',
             f"time     {m['wall_time_s'] / 60:.1f} min"
             + (f", {m['train_images_per_s']:.0f} training images/s" if m['train_images_per_s'] else ''),
             'per class ' + '  '.join(f"{n[:5]} {100 * a:.0f}" for n, a in zip(names, m['per_class_acc'])),
             f"next     python viz.py {run_dir}", '=' * 64]
    return '\n'.join(lines)


def build_parser():
    ap = argparse.ArgumentParser(
        description='Train the NumPy CNN+RNN on CIFAR-10.',
        epilog='Examples:\n  python main.py --preset fast --subset 0.4 --max-hours 1\n'
               '  python main.py --resume runs/latest/ckpt.npz\n  python main.py --list-presets',
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--preset', default='fast', help="named settings from presets.json (default: fast)")
    ap.add_argument('--list-presets', action='store_true', help='print the presets and exit')
    ap.add_argument('--subset', type=float, help='fraction in (0, 1] of the 50,000 training images '
                    '(split 9:1 into train/validation); the test set is always all 10,000')
    ap.add_argument('--max-hours', type=float, help='time budget for this invocation; training stops '
                    'cleanly in time to evaluate, with a resumable checkpoint')
    ap.add_argument('--resume', metavar='CKPT', help='continue the run that wrote this ckpt.npz, in '
                    'its own folder, with its saved configuration')
    ap.add_argument('--out', help='run folder (default: runs/<timestamp>-<preset>); must be new or empty')
    ap.add_argument('--data-dir', default=None, help='folder holding cifar-10-python.tar.gz or '
                    'cifar-10-batches-py (default: data)')
    ap.add_argument('--epochs', type=int, help='override the number of epochs')
    ap.add_argument('--batch-size', type=int, help='override the batch size')
    ap.add_argument('--lr', type=float, help='override the peak learning rate')
    ap.add_argument('--seed', type=int, help='override the seed (init, split, shuffles, augmentation)')
    ap.add_argument('--seq-layout', choices=SEQ_LAYOUTS, help="override how the 8x8x64 map is read: "
                    "'pixels' = 64 steps x 64 features, 'rows' = 8 steps x 512 features")
    ap.add_argument('--schedule', choices=('exponential', 'cosine'), help='override the lr schedule')
    ap.add_argument('--rnn-init', choices=RNN_INITS, help='override the W_hh initialisation')
    ap.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                    help='override any preset key, e.g. --set standardize=false --set decay=0.95 '
                         '(VALUE is read as JSON; repeatable)')
    return ap


OVERRIDES = ('subset', 'epochs', 'batch_size', 'lr', 'seed', 'seq_layout', 'schedule', 'rnn_init')


def resolve_config(args):
    """Preset + command-line overrides -> validated config dict."""
    presets = load_presets()
    if args.preset not in presets:
        raise UsageError(f"unknown preset {args.preset!r}; choose one of {', '.join(presets)} "
                         f"(python main.py --list-presets shows them)")
    cfg = dict(presets[args.preset])
    cfg.pop('description', None)
    for key in OVERRIDES:
        value = getattr(args, key)
        if value is not None:
            cfg[key] = value
    cfg.update(parse_set_options(args.set))
    validate_config(cfg, 'the configuration')
    cfg['preset'] = args.preset
    cfg['data_dir'] = args.data_dir or 'data'
    return cfg


def parse_set_options(items):
    """['standardize=false', 'decay=0.95'] -> {'standardize': False, 'decay': 0.95}."""
    out = {}
    for item in items:
        key, sep, text = item.partition('=')
        if not sep or not key:
            raise UsageError(f"--set {item!r} is malformed; write --set KEY=VALUE, e.g. --set decay=0.95")
        if key not in PRESET_SCHEMA or key == 'description':
            raise UsageError(f"--set {key}: unknown key; known keys are "
                             f"{', '.join(sorted(k for k in PRESET_SCHEMA if k != 'description'))}")
        try:
            out[key] = json.loads(text)
        except ValueError:
            out[key] = text            # a bare word such as rows or cosine
    return out


def check_args(args):
    if args.max_hours is not None and not (args.max_hours > 0 and math.isfinite(args.max_hours)):
        raise UsageError(f"--max-hours {args.max_hours} is invalid; give a positive number of hours")
    if args.subset is not None and not 0 < args.subset <= 1:
        raise UsageError(f"--subset {args.subset} is out of range; give a fraction in (0, 1], "
                         f"e.g. 0.4 for 40% of the training images")
    if args.epochs is not None and args.epochs <= 0:
        raise UsageError(f"--epochs {args.epochs} is invalid; give a positive number of epochs")
    if args.resume:
        fixed = [f"--{k.replace('_', '-')}" for k in OVERRIDES if getattr(args, k) is not None]
        fixed += ['--set'] if args.set else []
        fixed += ['--out'] if args.out else []
        fixed += ['--preset'] if args.preset != 'fast' else []
        if fixed:
            raise UsageError(f"{', '.join(fixed)} cannot be combined with --resume: a resumed run "
                             f"keeps its saved configuration (only --max-hours and --data-dir apply)")


def run(argv=None, stop_after_steps=None):
    """The CLI; returns the exit code. stop_after_steps is a hook for the tests."""
    args = build_parser().parse_args(argv)
    try:
        if args.list_presets:
            for name, p in load_presets().items():
                print(f"{name:6} {p.get('description', '')}")
                print('       ' + ', '.join(f"{k}={v}" for k, v in p.items() if k != 'description'))
            return 0
        check_args(args)
        if args.resume:
            model, velocity, state, cfg = load_checkpoint(args.resume)
            if args.data_dir:
                cfg['data_dir'] = args.data_dir
            run_dir = os.path.dirname(os.path.abspath(args.resume))
            return _run(cfg, args, run_dir, (model, velocity, state), stop_after_steps)
        return _run(resolve_config(args), args, None, None, stop_after_steps)
    except (UsageError, ModelFileError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(cfg, args, run_dir, resumed, stop_after_steps):
    # Load the data before creating anything, so bad data leaves no empty run folder behind.
    try:
        data = load_cifar10(cfg['data_dir'], subset=cfg['subset'], seed=cfg['seed'])
    except ValueError as e:       # e.g. a subset too small to give every class a validation image
        raise UsageError(str(e)) from None
    if resumed is None:
        run_dir = new_run_dir(args.out, cfg['preset'])
        model = CNNRNN(seq_layout=cfg['seq_layout'], hidden=cfg['hidden'], reg=cfg['weight_decay'],
                       seed=cfg['seed'], rnn_init=cfg['rnn_init'])
        opt = SGD(model.params, momentum=cfg['momentum'], nesterov=cfg['nesterov'])
        mean, std = channel_mean_std(data['X_train']) if cfg['standardize'] else (None, None)
        state = {'epoch': 0, 'step': 0, 'global_step': 0, 'history': [], 'best_val_acc': -1.0,
                 'best_epoch': 0, 'elapsed_s': 0.0, 'sum_loss': 0.0, 'sum_correct': 0, 'seen': 0,
                 'mean': mean, 'std': std, 'stop_reason': None}
        write_json_atomic(os.path.join(run_dir, 'config.json'), to_jsonable(cfg))
        log = RunLog(os.path.join(run_dir, 'train.log'))
        log(f"run {run_dir}: preset {cfg['preset']}, {len(data['y_train'])} train / "
            f"{len(data['y_val'])} val / {len(data['y_test'])} test images")
    else:
        model, velocity, state = resumed
        opt = SGD(model.params, momentum=cfg['momentum'], nesterov=cfg['nesterov'])
        opt.velocity = {k: np.array(v, dtype=model.dtype) for k, v in velocity.items()}
        state['stop_reason'] = None
        log = RunLog(os.path.join(run_dir, 'train.log'))
        log(f"resuming {run_dir} at epoch {state['epoch'] + 1}, step {state['step']}")
    point_latest_at(run_dir)
    log('config ' + json.dumps(to_jsonable(cfg)))

    stop = StopFlag()
    stop.install()
    try:
        state = train(cfg, run_dir, model, opt, state, data, log, max_hours=args.max_hours,
                      stop=stop, stop_after_steps=stop_after_steps)
    except Diverged as e:
        log(f"error: {e}")
        return 1
    finally:
        stop.uninstall()
    final_evaluation(cfg, run_dir, model, state, data, log)
    return 0


def main():
    sys.exit(run())


if __name__ == '__main__':
    main()
