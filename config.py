"""The settings of a run: ``Config`` (whose defaults are the method's settings), the presets
of presets.json (each lists only what differs from those defaults), and the command-line
override flags built from the fields.

    presets = load_presets()                    # {name: Config}
    cfg = presets['best']
    cfg = with_overrides(cfg, {'epochs': 10}, where='--epochs')

Every value, whether from presets.json, a flag, ``--set KEY=VALUE`` or a checkpoint, is
checked by one function (``Config.check``) against its field's type and range, and refused
with one sentence (``ConfigError``) naming where it came from and what a good value is.

Importing this module changes nothing outside it: it reads the model's and the data's
vocabularies (layouts, cells, crops), never runs their code.
"""
import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import runfiles
from cnn_rnn_numpy import CELLS, IMAGE_SIDE, MAX_BLOCKS, READOUTS, RNN_INITS, SEQ_LAYOUTS, WHITEN_SIZES
from data_utils import CROPS
from runfiles import MAX_SEED, RunFileError

PRESETS_PATH = Path(__file__).resolve().parent / 'presets.json'
SCHEDULES = ('exponential', 'cosine', 'triangular')     # optim.learning_rate's
VAL_VIEWS = ('test', 'one')                              # Config.val_views


class ConfigError(Exception):
    """A setting has the wrong type or range, or presets.json is malformed: one sentence."""


def setting(default, check, good, flag=None, since_first_runs=True):
    """A preset key: its default (the method's value), its check, the words for a good value.

    flag: the help text of a command-line option ``--<key>`` that overrides it, or None.
    since_first_runs: False for keys added later (the levers): older run folders lack them
    and trained with the default, which compare.py fills in.
    """
    metadata = {'check': check, 'good': good, 'flag': flag, 'since_first_runs': since_first_runs,
                'default': default}
    if isinstance(default, list):     # a dataclass refuses a shared mutable default: each Config gets a copy
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def default_of(f):
    """The default of a setting's field (a fresh copy for a list, which Config's callers may change)."""
    default = f.metadata['default']
    return list(default) if isinstance(default, list) else default


def _finite(v):
    return math.isfinite(v)


def _widths_ok(v):
    return (1 <= len(v) <= MAX_BLOCKS
            and all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in v))


@dataclass
class Config:
    """Every setting of a run. The preset keys are the fields made by ``setting``; their
    defaults are the method's reference settings (the ``fast`` preset)."""
    epochs: int = setting(15, lambda v: v > 0, 'a positive integer', flag='number of epochs')
    batch_size: int = setting(256, lambda v: v > 0, 'a positive integer', flag='batch size')
    lr: float = setting(0.02, lambda v: 0 < v and _finite(v), 'a positive finite number',
                        flag='peak learning rate (with --resume: the new base rate from the resumed step on)')
    schedule: str = setting('exponential', lambda v: v in SCHEDULES,
                            "'exponential', 'cosine' or 'triangular'",
                            flag="learning-rate schedule after the warm-up: 'exponential' (x decay per epoch), "
                                 "'cosine' or 'triangular' (per step down to min_lr at the end of the last epoch, "
                                 "on a half cosine or a straight line)")
    warmup_epochs: int = setting(1, lambda v: v >= 0, 'an integer >= 0')
    decay: float = setting(0.9, lambda v: 0 < v <= 1, 'a number in (0, 1]')
    min_lr: float = setting(0.0, lambda v: 0 <= v and _finite(v), 'a finite number >= 0')
    weight_decay: float = setting(5e-4, lambda v: 0 <= v and _finite(v), 'a finite number >= 0')
    clip: float = setting(5.0, lambda v: 0 <= v and _finite(v), 'a finite number >= 0 (0 disables clipping)')
    momentum: float = setting(0.9, lambda v: 0 <= v < 1, 'a number in [0, 1)')
    nesterov: bool = setting(False, lambda v: True, 'true or false')
    seq_layout: str = setting('pixels', lambda v: v in SEQ_LAYOUTS, f'one of {list(SEQ_LAYOUTS)}',
                              flag="how the 8x8x64 map is read: 'pixels' = 64 steps x 64 features, "
                                   "'rows' = 8 steps x 512 features, 'flat' = 1 step x 4096 features "
                                   "(no recurrence: the pure-CNN baseline), 'rowmax' = 8 steps x 64 "
                                   "features, each row max-pooled over its columns")
    rnn_init: str = setting('orthogonal', lambda v: v in RNN_INITS, f'one of {list(RNN_INITS)}',
                            flag=f"W_hh initialisation, one of {', '.join(RNN_INITS)}")
    hidden: int = setting(128, lambda v: v > 0, 'a positive integer')
    subset: float = setting(0.4, lambda v: 0 < v <= 1, 'a fraction in (0, 1]',
                            flag='fraction in (0, 1] of the 50,000 training images (split into '
                                 'train/validation by val_fraction, 9:1 by default); the test set is always '
                                 'all 10,000')
    # The method holds out a tenth of the subset for validation (model selection, the temperature,
    # the time to 85% and 90%); a smaller share trains on more images, e.g. 0.02 of all 50,000 keeps
    # 1,000 for validation and trains on 49,000, at the cost of a noisier validation accuracy.
    val_fraction: float = setting(0.1, lambda v: 0 < v < 1, 'a fraction in (0, 1) of the subset held out '
                                  'for validation (0.1 is the method\'s 9:1 split)', since_first_runs=False)
    augment: bool = setting(True, lambda v: True, 'true or false')
    standardize: bool = setting(False, lambda v: True, 'true or false')
    seed: int = setting(0, lambda v: 0 <= v <= MAX_SEED, f'an integer in [0, {MAX_SEED}]',
                        flag='seed of the initialisation, split, shuffles and augmentation')
    eval_batch_size: int = setting(500, lambda v: v > 0, 'a positive integer')
    cell: str = setting('rnn', lambda v: v in CELLS, f'one of {list(CELLS)}',
                        flag=f"recurrent cell, one of {', '.join(CELLS)} ('rnn' is the method's vanilla tanh RNN)",
                        since_first_runs=False)
    # What the head reads of the hidden states: the method's h_T, or every h_t averaged or
    # max-pooled over time (cnn_rnn_numpy.readout_forward).
    readout: str = setting('last', lambda v: v in READOUTS,
                           f"one of {list(READOUTS)} ('last' is the method's h_T; 'mean' and 'max' pool "
                           f"every hidden state over time)", since_first_runs=False)
    # Levers beyond the method, each off by default (a preset without them trains as the method does).
    crop: str = setting('paste', lambda v: v in CROPS, f"one of {list(CROPS)} ('paste' is the method's "
                        f"28x28 crop re-pasted, 'pad' pads by 4 and crops 32x32, 'reflect2' reflect-pads by 2 "
                        f"and crops 32x32: airbench's translate)", since_first_runs=False)
    # airbench's alternating flip: epoch 0 flips at random, later epochs flip each image the other
    # way from the epoch before (data_utils.BatchIterator), so every pair of epochs shows both.
    alternate_flip: bool = setting(False, lambda v: True, 'true or false (with augment: each image flipped '
                                   'the other way from one epoch to the next)', since_first_runs=False)
    label_smoothing: float = setting(0.0, lambda v: 0 <= v < 1, 'a number in [0, 1) (0 is off)',
                                     since_first_runs=False)
    ema: float = setting(0.0, lambda v: 0 <= v < 1, 'a number in [0, 1): the decay of the weight '
                         'average (0 is off, e.g. 0.999)', since_first_runs=False)
    # airbench's lookahead (optim.Lookahead): every `lookahead` steps the weights are pulled back
    # to a slow copy that trails them, more strongly as training ends, and the last step leaves
    # the slow copy as the model (airbench: every 5 steps).
    lookahead: int = setting(0, lambda v: 0 <= v <= 1000, 'an integer in [0, 1000]: the steps between '
                             'the pulls to the slow weights (0 is off, airbench uses 5)', since_first_runs=False)
    tta_flip: bool = setting(False, lambda v: True, 'true or false', since_first_runs=False)
    # airbench's TTA level 2: the flip's two views and both one-pixel shifts of each (implies the flip).
    tta_translate: bool = setting(False, lambda v: True, 'true or false', since_first_runs=False)
    # What each epoch's validation (and with ema its val_acc_raw) scores: 'test' the run's test-time
    # views (tta_mode), 'one' the image as given alone, up to six times cheaper with tta_translate
    # (deep's first version spent ~50 s of a ~310 s epoch on six views). best.npz is then chosen
    # by one view; the final evaluation (the temperature's validation pass and the test) always
    # uses tta_mode.
    val_views: str = setting('test', lambda v: v in VAL_VIEWS,
                             "'test' (each epoch's validation uses the test-time views) or 'one' "
                             "(it uses the image as given alone)", since_first_runs=False)
    # The convolutional backbone (levers beyond the method too): the method's two blocks of one
    # 3x3 convolution of 64 channels, ReLU and 2x2 max-pool, without BatchNorm, by default.
    widths: list = setting([64, 64], _widths_ok,
                           f'a list of 1 to {MAX_BLOCKS} positive integers, the channels of each block '
                           f'(each block halves the {IMAGE_SIDE}x{IMAGE_SIDE} map, so at most {MAX_BLOCKS}), '
                           f'e.g. [64, 256, 256]',
                           since_first_runs=False)
    convs_per_block: int = setting(1, lambda v: v >= 1, 'an integer >= 1 (3x3 convolutions per block)',
                                   since_first_runs=False)
    batchnorm: bool = setting(False, lambda v: True, 'true or false', since_first_runs=False)
    bn_momentum: float = setting(0.1, lambda v: 0 < v <= 1, "a number in (0, 1] (torch's BatchNorm momentum)",
                                 since_first_runs=False)
    bn_eps: float = setting(1e-5, lambda v: 0 < v and _finite(v), 'a finite number > 0', since_first_runs=False)
    # How fast BatchNorm's own parameters learn, as multiples of the learning rate (optim.SGD's
    # lr_scales): airbench freezes every gamma at 1 (0) and trains the betas 64 times faster.
    bn_gamma_lr: float = setting(1.0, lambda v: 0 <= v and _finite(v),
                                 "a finite number >= 0: BatchNorm's gammas learn at this multiple of lr "
                                 "(0 freezes them at 1)", since_first_runs=False)
    bn_beta_lr: float = setting(1.0, lambda v: 0 <= v and _finite(v),
                                "a finite number >= 0: BatchNorm's betas learn at this multiple of lr",
                                since_first_runs=False)
    whiten: int = setting(0, lambda v: v in WHITEN_SIZES,
                          f"one of {', '.join(map(str, WHITEN_SIZES))}: the patch size of the frozen "
                          f"patch-whitening first layer, 0 off", since_first_runs=False)
    identity_init: bool = setting(False, lambda v: True, 'true or false', since_first_runs=False)
    # With --max-hours, the number of epochs that fits the budget, chosen when the warm-up is over
    # and again after every epoch as the host's speed drifts (main.Trainer.fit_epochs_to_budget): a
    # per-step schedule (triangular, cosine) then ends inside the hour at this machine's speed
    # instead of being cut off. `epochs` is the most the run may train.
    fit_epochs: bool = setting(False, lambda v: True, 'true or false (with --max-hours: from the warm-up on, '
                               'epochs becomes the number that fits the budget, re-chosen after every epoch)',
                               since_first_runs=False)
    # Not a lever: what the test evaluation writes. The temperature is always fitted and reported;
    # this only adds the calibrated probabilities to predictions.npz (probs_calibrated).
    calibrated_predictions: bool = setting(False, lambda v: True, 'true or false', since_first_runs=False)
    # Not settings: what the preset says of itself, where the run came from, what changed on resume.
    description: str = ''
    preset: str = ''
    data_dir: str = 'data'
    lr_changes: list = field(default_factory=list)

    # ---- the keys ------------------------------------------------------------
    @classmethod
    def preset_keys(cls):
        """The names of the settings, in the order of the fields."""
        return [f.name for f in dataclasses.fields(cls) if 'check' in f.metadata]

    @classmethod
    def method_defaults(cls):
        """{key: the method's value} of every setting: what a preset that omits a key gets."""
        return {f.name: default_of(f) for f in dataclasses.fields(cls) if 'check' in f.metadata}

    @classmethod
    def defaults(cls):
        """{key: default} of the keys added after the first runs, with the value that older
        runs, whose config.json lacks them, trained with (compare.py fills them in)."""
        return {f.name: default_of(f) for f in dataclasses.fields(cls)
                if 'check' in f.metadata and not f.metadata['since_first_runs']}

    @classmethod
    def flag_keys(cls):
        """The keys that have a command-line option ``--<key>`` of their own."""
        return [f.name for f in dataclasses.fields(cls) if f.metadata.get('flag')]

    # ---- checking ------------------------------------------------------------
    @classmethod
    def check(cls, key, value, where):
        """Raise ConfigError unless ``value`` has the type and range of preset key ``key``."""
        f = next((f for f in dataclasses.fields(cls) if f.name == key and 'check' in f.metadata), None)
        if f is None:
            raise ConfigError(f"{where} has an unknown key {key!r}; known keys are "
                              f"{', '.join(sorted(cls.preset_keys()))}")
        if f.type is float:    # an integer is a fine float; a bool is not a number here
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif f.type is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, f.type)
        if not ok or not f.metadata['check'](value):
            raise ConfigError(f"{where}: {key} = {value!r} is invalid; it must be {f.metadata['good']}")

    @classmethod
    def from_dict(cls, d, where):
        """Validate a dict of settings (a preset, a config.json, a checkpoint's) -> Config.

        Keys left out take the method's defaults."""
        extra = {k: d[k] for k in ('description', 'preset', 'data_dir', 'lr_changes') if k in d}
        settings = {k: v for k, v in d.items() if k not in extra}
        for key, value in settings.items():
            cls.check(key, value, where)
        cfg = cls(**settings, **extra)
        cfg.check_together(where)
        return cfg

    def check_together(self, where):
        """Checks that involve two settings."""
        if self.min_lr > self.lr:
            raise ConfigError(f'{where}: min_lr = {self.min_lr} is above lr = {self.lr}; '
                              f'make min_lr at most the learning rate')
        changed = [f'{k} = {getattr(self, k)}' for k in ('bn_gamma_lr', 'bn_beta_lr') if getattr(self, k) != 1]
        if changed and not self.batchnorm:
            verb = 'sets' if len(changed) == 1 else 'set'
            raise ConfigError(f"{where}: {' and '.join(changed)} {verb} how fast BatchNorm learns, but "
                              f"batchnorm is false; turn batchnorm on or leave the BatchNorm rates at 1")
        if self.alternate_flip and not self.augment:
            raise ConfigError(f'{where}: alternate_flip = true alternates the flips of augment, which is '
                              f'false; turn augment on or leave alternate_flip false')

    def tta_mode(self):
        """The test-time augmentation of validation and test: 'none', 'flip' (tta_flip) or
        'flip+translate' (tta_translate, which implies the flip); data_utils.TTA_MODES."""
        if self.tta_translate:
            return 'flip+translate'
        return 'flip' if self.tta_flip else 'none'

    def val_tta_mode(self):
        """The test-time augmentation of each epoch's validation: tta_mode() with val_views 'test',
        'none' with 'one' (the final evaluation uses tta_mode() either way)."""
        return self.tta_mode() if self.val_views == 'test' else 'none'

    def settings(self):
        """{key: value} of the preset keys alone."""
        return {k: getattr(self, k) for k in self.preset_keys()}

    def to_dict(self):
        return dataclasses.asdict(self)


def with_overrides(cfg, overrides, where):
    """A copy of ``cfg`` with ``overrides`` ({key: value}) applied, checked as a whole."""
    return Config.from_dict({**cfg.to_dict(), **overrides}, where)


# --------------------------------------------------------------------------
# presets.json
# --------------------------------------------------------------------------

def load_presets(path=None):
    """All presets of presets.json (or ``path``) -> {name: Config}, each validated.

    A preset lists only what differs from the method's settings (Config's defaults).
    """
    path = path or PRESETS_PATH
    try:
        presets = runfiles.read_json(path, fix='restore it from git')
    except RunFileError as e:
        raise ConfigError(f'the presets file: {e}') from None
    if not isinstance(presets, dict) or not presets or not all(isinstance(p, dict) for p in presets.values()):
        raise ConfigError(f'the presets file {path} must hold a JSON object of named presets, each an '
                          f'object of settings; restore it from git')
    for name, preset in presets.items():
        if not isinstance(preset.get('description', ''), str):
            raise ConfigError(f'preset {name!r}: description must be a string; fix presets.json')
    return {name: Config.from_dict(dict(preset, preset=name), f'preset {name!r}')
            for name, preset in presets.items()}


def load_preset(name, hint='presets.json'):
    """The preset ``name`` of presets.json as a Config; ConfigError (one sentence, ending in the
    hint of where to look) if presets.json has no such preset or cannot be read."""
    presets = load_presets()
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(presets)} ({hint})")
    return presets[name]


# --------------------------------------------------------------------------
# Command-line options made from the fields
# --------------------------------------------------------------------------

def add_override_flags(parser):
    """Add ``--<key>`` (dashes for underscores) for every key with a flag, and ``--set``.

    The options only parse text into the field's type; the range is checked by
    Config.check like any other value, so there is one message per bad value.
    """
    for f in dataclasses.fields(Config):
        if f.metadata.get('flag'):
            parse = {bool: _parse_bool}.get(f.type, f.type)
            parser.add_argument('--' + f.name.replace('_', '-'), type=parse, dest=f.name,
                                metavar=f.name.upper(),
                                help=f"{f.metadata['flag']} (default: the preset's; the method's is "
                                     f"{default_of(f)})")
    parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                        help='override any preset key, e.g. --set standardize=false --set decay=0.95 '
                             '(VALUE is read as JSON; repeatable)')


def _parse_bool(text):
    if text.lower() in ('true', 'false'):
        return text.lower() == 'true'
    raise argparse.ArgumentTypeError(f'{text!r} is not true or false')


def flag_name(key):
    return '--' + key.replace('_', '-')


def parse_set_options(items):
    """['standardize=false', 'decay=0.95'] -> {'standardize': False, 'decay': 0.95}, each checked.

    VALUE is read as JSON, else kept as a word (rows, cosine). A key given twice is refused:
    which of the two values was meant cannot be guessed.
    """
    out = {}
    for item in items:
        key, sep, text = item.partition('=')
        if not sep or not key:
            raise ConfigError(f'--set {item!r} is malformed; write --set KEY=VALUE, e.g. --set decay=0.95')
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        Config.check(key, value, '--set')
        if key in out:
            raise ConfigError(f'--set {key} is given twice ({out[key]!r} and {value!r}); give it once')
        out[key] = value
    return out


def overrides_from_args(args):
    """{key: value} of the override flags given (--epochs, --cell, ...) and of --set, each checked.

    The same key from a flag and from --set (e.g. --cell gru --set cell=lstm) is refused.
    """
    flags = {k: getattr(args, k) for k in Config.flag_keys() if getattr(args, k, None) is not None}
    for key, value in flags.items():
        Config.check(key, value, flag_name(key))
    sets = parse_set_options(args.set)
    both = sorted(set(flags) & set(sets))
    if both:
        k = both[0]
        raise ConfigError(f'{flag_name(k)} {flags[k]} and --set {k}={sets[k]} both set {k}; give it once')
    return {**flags, **sets}
