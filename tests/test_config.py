"""Tests of config.py: the method's settings as defaults, presets as differences, one check
per value whatever its source (presets.json, a flag, --set), and the flags made from the fields."""
import argparse
import json
from pathlib import Path

import pytest

import config
from config import Config, ConfigError

REPO_ROOT = Path(config.__file__).resolve().parent


def parse(*argv):
    parser = argparse.ArgumentParser()
    config.add_override_flags(parser)
    return config.overrides_from_args(parser.parse_args(list(argv)))


def test_the_defaults_are_the_methods_settings_and_fast_changes_nothing():
    fast = config.load_presets()['fast']
    assert fast.settings() == Config.method_defaults()
    assert (fast.epochs, fast.batch_size, fast.lr, fast.decay, fast.warmup_epochs) == (15, 256, 0.02, 0.9, 1)
    assert (fast.seq_layout, fast.cell, fast.hidden, fast.subset) == ('pixels', 'rnn', 128, 0.4)


def test_presets_json_lists_only_what_differs_from_the_method():
    raw = json.loads((REPO_ROOT / 'presets.json').read_text())
    defaults = Config.method_defaults()
    for name, preset in raw.items():
        same = sorted(k for k, v in preset.items() if k in defaults and v == defaults[k])
        assert same == [], f'preset {name!r} repeats the defaults of {same}'
    gated = config.load_presets()['gated']
    assert {k: v for k, v in gated.settings().items() if v != defaults[k]} == {'cell': 'lstm', 'seq_layout': 'rows'}


@pytest.mark.parametrize('bad, words', [({'colour': 'red'}, "unknown key 'colour'"),
                                        ({'epochs': -3}, 'epochs = -3 is invalid'),
                                        ({'lr': 'fast'}, 'lr'), ({'schedule': 'linear'}, 'schedule'),
                                        ({'nesterov': 1}, 'nesterov'), ({'min_lr': 0.5}, 'min_lr'),
                                        ({'description': 3}, 'description')])
def test_a_bad_preset_is_refused_with_one_sentence(tmp_path, bad, words):
    path = tmp_path / 'presets.json'
    path.write_text(json.dumps({'x': {'epochs': 2, **bad}}))
    with pytest.raises(ConfigError, match=words):
        config.load_presets(path)


def test_a_preset_may_leave_out_any_key(tmp_path):
    path = tmp_path / 'presets.json'
    path.write_text(json.dumps({'lean': {'description': 'two epochs', 'epochs': 2}}))
    lean = config.load_presets(path)['lean']
    assert lean.settings() == dict(Config.method_defaults(), epochs=2) and lean.preset == 'lean'


@pytest.mark.parametrize('path_kind', ['missing', 'folder', 'not json', 'a list'])
def test_an_unreadable_presets_file_is_one_sentence(tmp_path, path_kind):
    path = tmp_path / 'presets.json'
    if path_kind == 'folder':
        path.mkdir()
    elif path_kind == 'not json':
        path.write_text('{')
    elif path_kind == 'a list':
        path.write_text('[]')
    with pytest.raises(ConfigError, match='presets'):
        config.load_presets(path)


def test_the_flags_come_from_the_fields():
    assert parse('--epochs', '3', '--batch-size', '64', '--seq-layout', 'rows', '--cell', 'gru') == \
        {'epochs': 3, 'batch_size': 64, 'seq_layout': 'rows', 'cell': 'gru'}
    parser = argparse.ArgumentParser()
    config.add_override_flags(parser)
    options = {a.dest for a in parser._actions}
    assert set(Config.flag_keys()) <= options and 'set' in options


@pytest.mark.parametrize('argv, words', [
    (['--subset', '1.5'], '--subset: subset = 1.5 is invalid; it must be a fraction in (0, 1]'),
    (['--epochs', '0'], '--epochs: epochs = 0 is invalid'),
    (['--lr', 'nan'], '--lr: lr = nan is invalid'),
    (['--seq-layout', 'columns'], "--seq-layout: seq_layout = 'columns' is invalid; it must be one of"),
    (['--set', 'subset=1.5'], '--set: subset = 1.5 is invalid; it must be a fraction in (0, 1]'),
    (['--set', 'colour=red'], "unknown key 'colour'"),
    (['--set', 'decay'], 'malformed'),
    (['--cell', 'gru', '--set', 'cell=lstm'], '--cell gru and --set cell=lstm both set cell'),
    (['--set', 'lr=0.1', '--set', 'lr=0.2'], 'given twice'),
])
def test_each_bad_value_gets_one_message_whatever_its_source(argv, words):
    with pytest.raises(ConfigError) as e:
        parse(*argv)
    assert words in str(e.value) and '\n' not in str(e.value)


def test_keys_added_after_the_first_runs_are_the_levers_the_cell_the_backbone_and_what_the_evaluation_writes():
    assert Config.defaults() == {'val_fraction': 0.1, 'cell': 'rnn', 'readout': 'last', 'crop': 'paste', 'alternate_flip': False, 'label_smoothing': 0.0,
                                 'ema': 0.0, 'lookahead': 0, 'tta_flip': False, 'tta_translate': False, 'val_views': 'test',
                                 'widths': [64, 64],
                                 'convs_per_block': 1, 'batchnorm': False, 'bn_momentum': 0.1, 'bn_eps': 1e-5,
                                 'bn_gamma_lr': 1.0, 'bn_beta_lr': 1.0,
                                 'whiten': 0, 'identity_init': False, 'fit_epochs': False,
                                 'calibrated_predictions': False}


def test_the_airbench_keys_are_checked_and_off_by_default():
    assert parse('--set', 'schedule=triangular', '--set', 'alternate_flip=true', '--set', 'tta_translate=true',
                 '--set', 'whiten=2', '--set', 'identity_init=true') == \
        {'schedule': 'triangular', 'alternate_flip': True, 'tta_translate': True, 'whiten': 2, 'identity_init': True}
    assert parse('--schedule', 'triangular') == {'schedule': 'triangular'}
    assert parse('--set', 'readout=mean') == {'readout': 'mean'}
    fast = config.load_presets()['fast']
    assert (fast.alternate_flip, fast.tta_translate, fast.whiten, fast.identity_init) == (False, False, 0, False)
    for bad, words in (('whiten=1', 'whiten = 1 is invalid; it must be one of 0, 2, 3'),
                       ('whiten=true', 'whiten = True is invalid'), ('whiten=2.0', 'whiten = 2.0 is invalid'),
                       ('alternate_flip=1', 'alternate_flip = 1 is invalid'),
                       ('tta_translate=yes', "tta_translate = 'yes' is invalid"),
                       ('identity_init=0', 'identity_init = 0 is invalid'),
                       ('readout=avg', "readout = 'avg' is invalid; it must be one of ['last', 'mean', 'max']"),
                       ('bn_beta_lr=-1', 'bn_beta_lr = -1 is invalid; it must be a finite number >= 0'),
                       ('bn_gamma_lr=false', 'bn_gamma_lr = False is invalid'),
                       ('schedule=triangle', "schedule = 'triangle' is invalid; it must be 'exponential', "
                                             "'cosine' or 'triangular'")):
        with pytest.raises(ConfigError) as e:
            parse('--set', bad)
        assert words in str(e.value) and '\n' not in str(e.value), str(e.value)
    # Alternating the flips of no augmentation is refused, naming both keys.
    with pytest.raises(ConfigError, match='alternate_flip = true .* augment, which is false') as e:
        config.with_overrides(fast, {'alternate_flip': True, 'augment': False}, 'the configuration')
    assert '\n' not in str(e.value)
    # BatchNorm's learning rates without BatchNorm are refused too; with it they are kept.
    with pytest.raises(ConfigError, match='bn_gamma_lr = 0 and bn_beta_lr = 64 set how fast BatchNorm learns, '
                                          'but batchnorm is false') as e:
        config.with_overrides(fast, {'bn_gamma_lr': 0, 'bn_beta_lr': 64}, 'the configuration')
    assert '\n' not in str(e.value)
    deep = config.with_overrides(config.load_presets()['deep'], {'bn_gamma_lr': 0, 'bn_beta_lr': 64}, 'x')
    assert (deep.bn_gamma_lr, deep.bn_beta_lr) == (0, 64)


def test_val_fraction_is_checked_and_the_methods_tenth_by_default():
    assert parse('--set', 'val_fraction=0.02') == {'val_fraction': 0.02}
    # The method's 9:1 split everywhere but deep, which holds out 2% (its seventh version).
    assert {n: p.val_fraction for n, p in config.load_presets().items() if p.val_fraction != 0.1} == {'deep': 0.02}
    for bad in ('0', '1', '1.0', '-0.1', '1.5', 'true', '"0.1"', 'NaN'):
        with pytest.raises(ConfigError) as e:
            parse('--set', f'val_fraction={bad}')
        assert 'val_fraction = ' in str(e.value) and 'is invalid; it must be a fraction in (0, 1)' in str(e.value) \
            and '\n' not in str(e.value), str(e.value)


def test_tta_mode_names_the_test_time_augmentation():
    fast = config.load_presets()['fast']
    assert fast.tta_mode() == 'none'
    assert config.with_overrides(fast, {'tta_flip': True}, 'x').tta_mode() == 'flip'
    for flip in (False, True):        # the shifts imply the flip
        assert config.with_overrides(fast, {'tta_flip': flip, 'tta_translate': True}, 'x').tta_mode() == \
            'flip+translate'
