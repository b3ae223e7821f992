"""Optimisation: SGD with momentum, global-norm gradient clipping, the learning-rate
schedule, and an exponential moving average of the weights.

Shared by the training driver (main.py) and the benchmarks, which time the
same update the training loop does.
"""
import math

import numpy as np

from cnn_rnn_numpy import FROZEN_PARAMS


class SGD:
    """SGD with momentum (optionally Nesterov), updating parameters in place.

        v <- momentum * v - lr * g
        p <- p + v                          (classical)
        p <- p + momentum * v - lr * g      (Nesterov, in the form of Sutskever et al.)

    Inputs:
    - params: dict name -> array, updated in place by ``step``
    - momentum: float in [0, 1)
    - nesterov: bool
    - names: the parameters to update (default: all of params), e.g. ``model.trained_names()``,
      which leaves out BatchNorm's running statistics: the model measures them, they have no
      gradient and no velocity
    - lr_scales: {name: factor} of the parameters that learn at factor * lr instead of lr (0
      keeps a parameter where it is), e.g. ``bn_lr_scales``; the others learn at lr
    """

    def __init__(self, params, momentum=0.9, nesterov=False, names=None, lr_scales=None):
        self.params = params
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)
        names = list(params) if names is None else list(names)
        self.velocity = {k: np.zeros_like(params[k]) for k in names}
        self.lr_scales = dict(lr_scales or {})
        unknown = sorted(set(self.lr_scales) - set(names))
        if unknown:
            raise ValueError(f'lr_scales names parameters the optimizer does not update: {unknown}')

    def step(self, grads, lr):
        """One update of the parameters that have a velocity. grads: dict with (at least) their names; lr: float."""
        for name, v in self.velocity.items():
            p = self.params[name]
            g = grads[name]
            rate = lr * self.lr_scales.get(name, 1.0)      # x 1.0 is exact: the plain update, bit for bit
            v *= p.dtype.type(self.momentum)
            v -= p.dtype.type(rate) * g
            if self.nesterov:
                p += p.dtype.type(self.momentum) * v - p.dtype.type(rate) * g
            else:
                p += v


def bn_lr_scales(names, gamma_lr=1.0, beta_lr=1.0):
    """{name: factor} for SGD's lr_scales: BatchNorm's gammas (bnK_gamma) at gamma_lr, its betas
    (bnK_beta) at beta_lr, among ``names`` (e.g. ``model.trained_names()``); a factor of 1 is left
    out, so the defaults give {} and the plain update. airbench's is gamma_lr=0, beta_lr=64."""
    scales = {}
    for name in names:
        if name.startswith('bn') and name.endswith('_gamma'):
            scales[name] = float(gamma_lr)
        elif name.startswith('bn') and name.endswith('_beta'):
            scales[name] = float(beta_lr)
    return {name: factor for name, factor in scales.items() if factor != 1}


class WeightAverage:
    """Exponential moving average (EMA) of the parameters, for evaluation.

    After every optimizer step:  avg <- d * avg + (1 - d) * p,  with
    d = min(decay, (1 + n) / (10 + n)) after n earlier updates. The average
    smooths out the noise of the last steps of SGD, so it is often a better
    model than the weights of any one step; the ramp-up of d lets the average
    forget the random initialisation quickly at the start.

    Every trained array of params is averaged (a frozen, fitted one, ``FROZEN_PARAMS``, is
    copied), BatchNorm's running statistics (bnK_mean, bnK_var) as
    well, as timm's ModelEmaV2 averages a model's buffers with its weights: the averaged model
    then normalises with the average of the statistics its recent weights measured, which a
    plain copy of the last step's statistics would not match.

    Inputs:
    - params: dict name -> array (the model's, read by ``update``, never written)
    - decay: float in (0, 1), e.g. 0.999 (an average over about 1 / (1 - decay) steps)
    - averaged, updates: the state of a resumed run, as written by a checkpoint
    """

    def __init__(self, params, decay, averaged=None, updates=0):
        self.decay = float(decay)
        self.updates = int(updates)
        source = params if averaged is None else averaged
        self.params = {k: np.array(source[k], dtype=v.dtype) for k, v in params.items()}

    def update(self, params):
        """Move the average toward the current parameters (after an optimizer step)."""
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, avg in self.params.items():
            if name in FROZEN_PARAMS:
                # A fitted, never-trained array (whiten_W): d*w + (1-d)*w rounds away from w in
                # float32, so the average keeps the fit itself.
                np.copyto(avg, params[name])
                continue
            avg *= avg.dtype.type(d)
            avg += avg.dtype.type(1 - d) * params[name]
        self.updates += 1


class Lookahead:
    """airbench's lookahead: a slow copy of the parameters that the trained ones are pulled back to.

    Every ``every`` optimizer steps (after global step t of the schedule's T):
        slow <- d * slow + (1 - d) * p,   then   p <- slow,   with   d = 0.95**every * (t / T)**3.
    Early on d is near 0 and the slow copy simply follows the parameters; toward the end d nears
    0.95**every (0.77 for every = 5) and each pull restarts SGD from an average of its last few
    dozen steps, which damps the noise of the steps as the learning rate falls. After the last
    step, ``finish`` leaves the slow copy itself as the model (d = 1). Unlike WeightAverage (ema),
    which is only evaluated, the pulled-back parameters are the ones training continues from.

    Every array of params takes part, BatchNorm's running statistics too (airbench pulls its whole
    state_dict, buffers included); a frozen, fitted array (``FROZEN_PARAMS``) is left as it is.
    The optimizer's velocities are not touched.

    Inputs:
    - params: dict name -> array (the model's; ``pull`` and ``finish`` write them in place)
    - every: int >= 1, the steps between pulls (Config.lookahead)
    - slow: the slow copy of a resumed run, as written by a checkpoint
    """

    def __init__(self, params, every, slow=None):
        self.every = int(every)
        source = params if slow is None else slow
        self.slow = {k: np.array(source[k], dtype=v.dtype) for k, v in params.items()}

    def decay(self, step, total_steps):
        """d after global step ``step`` (1-based: the steps done) of ``total_steps``."""
        return 0.95 ** self.every * min(1.0, step / max(1, total_steps)) ** 3

    def due(self, step):
        """Whether a pull follows global step ``step`` (the steps done)."""
        return step % self.every == 0

    def pull(self, params, decay):
        """slow <- decay * slow + (1 - decay) * params, then params <- slow (both in place)."""
        for name, slow in self.slow.items():
            if name in FROZEN_PARAMS:
                continue
            slow *= slow.dtype.type(decay)
            slow += slow.dtype.type(1 - decay) * params[name]
            np.copyto(params[name], slow)

    def finish(self, params):
        """The end of training: the parameters become the slow copy (a pull with decay 1)."""
        for name, slow in self.slow.items():
            if name not in FROZEN_PARAMS:
                np.copyto(params[name], slow)


def clip_grad_norm(grads, max_norm):
    """Scale all gradients in place so their global L2 norm is at most max_norm.

    Inputs:
    - grads: dict name -> array
    - max_norm: positive float, or None / <= 0 to only measure

    Returns the global norm before clipping (a float).
    """
    total = float(np.sqrt(sum(float(np.vdot(g, g)) for g in grads.values())))
    if max_norm and max_norm > 0 and total > max_norm:
        scale = max_norm / (total + 1e-12)
        for g in grads.values():
            g *= g.dtype.type(scale)
    return total


def learning_rate(cfg, step, steps_per_epoch, anchor=None):
    """Learning rate at global step ``step`` (0-based).

    Linear warm-up per step over ``cfg.warmup_epochs`` from lr/W to lr, then
    - 'exponential': lr * decay**k in the k-th epoch after the warm-up (constant within an epoch);
    - 'cosine': per step from lr down to min_lr at the end of the last epoch;
    - 'triangular': per step linearly from lr down to min_lr at the end of the last epoch
      (airbench's short triangular schedule; with warmup_epochs = 0 a pure linear decay from lr).
    Cosine and triangular reach min_lr at step epochs * steps_per_epoch, one past the last step,
    so the last step still learns a little when min_lr is 0.

    anchor: None, or (global_step, fraction) where a run re-planned its length (fit_epochs changed
    cfg.epochs at that step, main.Trainer.fit_epochs_to_budget). From that step on, cosine and
    triangular start again from fraction * lr -- the rate the old plan had reached there -- and fall
    to min_lr at the end of the new last epoch, so the rate never jumps when the end moves. The
    fraction is of cfg.lr, so a resume with a new base rate (--lr) scales the rest of the line.

    cfg: any object with the attributes lr, schedule, warmup_epochs, decay,
    epochs and min_lr (main.Config is one).
    """
    base = cfg.lr
    warmup = cfg.warmup_epochs * steps_per_epoch
    if step < warmup:
        return base * (step + 1) / warmup
    if cfg.schedule == 'exponential':
        k = step // steps_per_epoch - cfg.warmup_epochs
        return base * cfg.decay ** k
    start = warmup
    if anchor is not None and step >= anchor[0]:
        start, base = anchor[0], base * anchor[1]
    total = cfg.epochs * steps_per_epoch
    progress = min(1.0, (step - start) / max(1, total - start))
    if cfg.schedule == 'triangular':
        return base + (cfg.min_lr - base) * progress
    return cfg.min_lr + 0.5 * (base - cfg.min_lr) * (1 + math.cos(math.pi * progress))
