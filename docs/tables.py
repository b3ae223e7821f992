"""Write the tables of README.md and docs/*.md that come from presets.json and from run folders.

    .venv/bin/python docs/tables.py [--runs runs] [--commit REV] [--check]      (make docs)

Each generated table sits between two markers in its page,

    <!-- docs/tables.py: begin NAME -->
    ...
    <!-- docs/tables.py: end NAME -->

and only the text between them is rewritten. The sources:

    presets    README.md          presets.json (config.load_presets)
    headline   README.md          the finished runs of the `fast` and `best` presets under --runs
    best-runs  docs/results.md    the finished runs of the `best` preset under --runs, one row each
                                  (a seed with no run here keeps the row the page has)
    deep-runs  docs/results.md    the same for the `deep` preset
    claims     docs/claims.md     <runs>/claims/comparison/comparison.json   (make claims writes it)
    cells      docs/claims.md     the same file: the `pixels` RNN against the GRU and the LSTM
    levers, deep-levers, deep-levers-2, deep-weight-decay, deep-head, deep-head-2, deep-readout,
    deep-bn, deep-bn-lr, deep-bn-lr-2, deep-smoothing,
    deep-overfit, deep-weight-decay-2, deep-lookahead (LEVER_SCREENS)
               docs/results.md    <runs>/NAME/comparison/comparison.json of the screen NAME
                                  (make sweep SWEEP=sweeps/NAME.json writes it)

compare.py's figures of those comparisons are copied over the ones in docs/
(claims_test_accuracy.png, claims_val_accuracy.png, and NAME_test_accuracy.png of each
screen, with its dashes as underscores: deep_head_test_accuracy.png).
A table whose source is missing (no run folders on this machine) is left as it
is: the pages keep the figures measured earlier, each with the commit it was
measured at. A generated row (or a block from a comparison) names the commits its
runs record (metrics.json's code_commits, main.py's); for runs that record none
(those trained before it was recorded), the commit given by --commit (default: HEAD
when the tables are made, marked `+changes` when tracked files differ from it) --
unless it says what the page already says: a row, or a block's "Measured at"
sentence, whose figures are unchanged keeps the commit the page gives it.

--check writes nothing and exits 1 if a page would change (0 if none would).
Exit code 2: a page without its markers, a source that is not what compare.py
or main.py writes, or an empty --runs (one sentence).
"""
import argparse
import dataclasses
import json
import math
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import cli                          # noqa: E402  (the repository's modules, found through REPO)
import config                       # noqa: E402
import runfiles                     # noqa: E402
from metrics import time_to_accuracy  # noqa: E402
from config import Config, flag_name  # noqa: E402

PYTHON = '.venv/bin/python'
CLAIMS_SWEEP = REPO / 'sweeps' / 'claims.json'     # the claims suite: variants and the claim each tests
FULL_TRAIN = 50_000                  # training images of CIFAR-10 before the train/validation split
# Settings in which two runs of one preset may differ: they change neither what is trained nor what is
# measured (calibrated_predictions only adds the calibrated probabilities to predictions.npz).
NOT_COMPARED = ('seed', 'eval_batch_size', 'calibrated_predictions')
HEADLINE_COMMANDS = {'fast': 'main.py --preset fast --subset 0.4 --max-hours 1',
                     'best': 'main.py --preset best --max-hours 1'}
# The claims suite's variants whose claim predicts a direction: removing what the method
# credits should make the runs worse (or, for clipping, make them diverge).
EXPECTED = {'no-weight-decay': 'worse', 'no-warmup': 'worse', 'constant-lr': 'worse',
            'no-augmentation': 'worse', 'flat': 'worse', 'no-clipping': 'diverges'}


# The lever screens: each a sweep sweeps/NAME.json whose comparison (<runs>/NAME/comparison/) fills the
# block NAME of docs/results.md and the figure docs/NAME_test_accuracy.png (dashes as underscores).
LEVER_SCREENS = ('levers', 'deep-levers', 'deep-levers-2', 'deep-weight-decay', 'deep-head', 'deep-head-2',
                 'deep-readout', 'deep-bn', 'deep-bn-lr', 'deep-bn-lr-2', 'deep-smoothing',
                 'deep-overfit', 'deep-weight-decay-2', 'deep-lookahead')


def screen_figure(name):
    """The figure in docs/ of the lever screen ``name``: 'deep-head' -> 'docs/deep_head_test_accuracy.png'."""
    return f"docs/{name.replace('-', '_')}_test_accuracy.png"


class SourceError(Exception):
    """A page or a source file is not in the form this script reads: one sentence."""


# --------------------------------------------------------------------------
# Markers
# --------------------------------------------------------------------------

def markers(name):
    return f'<!-- docs/tables.py: begin {name} -->', f'<!-- docs/tables.py: end {name} -->'


def block_span(text, name, page):
    """(start, end) of the text between the two markers of ``name`` in ``text``."""
    begin, end = markers(name)
    i, j = text.find(begin), text.find(end)
    if i < 0 or j < i or text.count(begin) != 1 or text.count(end) != 1:
        raise SourceError(f'{page} must hold the markers {begin} and {end} once each, in that order; '
                          f'restore them from git')
    return i + len(begin), j


def read_block(text, name, page):
    i, j = block_span(text, name, page)
    return text[i:j].strip('\n')


def write_block(text, name, body, page):
    i, j = block_span(text, name, page)
    return text[:i] + '\n' + body.strip('\n') + '\n' + text[j:]


# --------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------

def show(value):
    """A setting as a person types it: 0.0005, false, rows."""
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, float):
        return f'{value:g}'
    if isinstance(value, list):        # widths: JSON without spaces, one word on a command line
        return json.dumps(value, separators=(',', ':'))
    return str(value)


def same(a, b):
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


def pct(x, digits=2):
    return '-' if x is None else f'{100 * x:.{digits}f}%'


def minutes(seconds):
    return '-' if seconds is None else f'{seconds / 60:.1f} min'


def mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def std(values):
    values = [v for v in values if v is not None]
    if len(values) < 2:
        return None
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def mean_pm(values, digits=2):
    """'81.01% ± 0.29' for fractions in [0, 1] (the std in points), '80.80%' for one value."""
    m, s = mean(values), std(values)
    if m is None:
        return '-'
    return pct(m, digits) + ('' if s is None else f' ± {100 * s:.{digits}f}')


def seeds_text(seeds):
    return f"{len(seeds)} ({', '.join(str(s) for s in seeds)})"


def table(header, rows):
    lines = ['| ' + ' | '.join(header) + ' |', '|' + ' --- |' * len(header)]
    return '\n'.join(lines + ['| ' + ' | '.join(r) + ' |' for r in rows])


def options_for(settings, base):
    """The main.py options that turn the settings ``base`` into ``settings`` (flags where
    a key has one, else --set KEY=VALUE), in the order of Config's fields; seed left out."""
    out = []
    for key in Config.preset_keys():
        if key in NOT_COMPARED or key not in settings or same(settings[key], base.get(key)):
            continue
        value = settings[key]
        if key in Config.flag_keys():
            out.append(f'{flag_name(key)} {show(value)}')
        else:
            out.append(f'--set {key}={show(value)}')
    return out


def closest_preset(settings, presets):
    """(name, settings) of the preset that differs from ``settings`` in the fewest keys."""
    return min(((name, p.settings()) for name, p in presets.items()),
               key=lambda item: len(options_for(settings, item[1])))


def command_for(settings, presets, seed_placeholder=True):
    name, base = closest_preset(settings, presets)
    words = [PYTHON, 'main.py', '--preset', name, *options_for(settings, base)]
    if seed_placeholder:
        words += ['--seed', 'S']
    return ' '.join(words)


# --------------------------------------------------------------------------
# presets: README.md, from presets.json
# --------------------------------------------------------------------------

def describe_lr(s):
    text = f"{show(s['lr'])}, {s['warmup_epochs']} warm-up epoch{'s' if s['warmup_epochs'] != 1 else ''}, then "
    if s['schedule'] in ('cosine', 'triangular'):
        text += f"{'cosine' if s['schedule'] == 'cosine' else 'linear'} to {show(s['min_lr'])}"
    else:
        text += f"x{show(s['decay'])} per epoch" if s['decay'] != 1 else 'constant'
    return text + (', Nesterov' if s['nesterov'] else '')


def describe_augmentation(s):
    if not s['augment']:
        return 'none'
    crop = {'paste': '28x28 crop pasted on black', 'pad': 'pad 4, crop 32x32',
            'reflect2': 'reflect-pad 2, crop 32x32'}.get(s['crop'], s['crop'])
    return f"{crop}, {'alternating' if s['alternate_flip'] else ''} flip".replace(',  ', ', ')


def describe_backbone(s):
    """'64-64' (the method's), '64-256-256, 2 convs, BN' (BatchNorm's momentum and eps if not torch's,
    its learning-rate multiples if not 1)."""
    text = '-'.join(str(w) for w in s['widths'])
    if s['convs_per_block'] != 1:
        text += f", {s['convs_per_block']} convs"
    if s['batchnorm']:
        defaults = Config.method_defaults()
        text += ', BN' + ''.join(f" {k} {show(s[k])}" for k in ('bn_momentum', 'bn_eps', 'bn_gamma_lr', 'bn_beta_lr')
                                 if not same(s[k], defaults[k]))
    if s['whiten']:
        text += f", {s['whiten']}x{s['whiten']} whitening"
    if s['identity_init']:
        text += ', identity init'
    return text


def describe_views(s):
    """The test-time views, and the validation's when val_views makes them differ."""
    views = 'flip, shifts' if s['tta_translate'] else 'flip' if s['tta_flip'] else 'one'
    return views + (' (validation: one)' if s['val_views'] == 'one' and views != 'one' else '')


def describe_images(s):
    """The share of the training images, and of them the share held out when it is not the method's."""
    held_out = s['val_fraction']
    return f"{100 * s['subset']:g}%" + ('' if same(held_out, Config.method_defaults()['val_fraction'])
                                        else f", {100 * held_out:g}% of them held out")


PRESET_COLUMNS = [
    ('backbone', ('widths', 'convs_per_block', 'batchnorm', 'bn_momentum', 'bn_eps', 'bn_gamma_lr', 'bn_beta_lr',
                  'whiten', 'identity_init'), describe_backbone),
    ('layout', ('seq_layout',), lambda s: f"`{s['seq_layout']}`"),
    ('cell', ('cell', 'hidden', 'readout'),
     lambda s: f"`{s['cell']}` {s['hidden']}" + (f", {s['readout']} of h_t" if s['readout'] != 'last' else '')),
    (f'of the {FULL_TRAIN:,} training images', ('subset', 'val_fraction'), describe_images),
    ('epochs', ('epochs', 'fit_epochs'),
     lambda s: ('up to ' if s.get('fit_epochs') else '') + str(s['epochs'])),
    ('batch', ('batch_size',), lambda s: str(s['batch_size'])),
    ('learning rate', ('lr', 'warmup_epochs', 'schedule', 'decay', 'min_lr', 'nesterov'), describe_lr),
    ('augmentation', ('augment', 'crop', 'alternate_flip'), describe_augmentation),
    ('inputs', ('standardize',), lambda s: 'standardised' if s['standardize'] else 'scaled to [0, 1]'),
    ('test-time views', ('tta_flip', 'tta_translate', 'val_views'), describe_views),
]


def render_presets(presets):
    """The presets table (one row per preset of presets.json) and the settings all presets share."""
    shown = {k for _, keys, _ in PRESET_COLUMNS for k in keys} | set(NOT_COMPARED)
    settings = {name: p.settings() for name, p in presets.items()}
    rest = [k for k in Config.preset_keys() if k not in shown]
    shared = [k for k in rest if all(same(s[k], settings[next(iter(settings))][k]) for s in settings.values())]
    differing = [k for k in rest if k not in shared]
    header = ['preset', 'what'] + [c for c, _, _ in PRESET_COLUMNS] + (['also'] if differing else [])
    rows = []
    for name, p in presets.items():
        s = settings[name]
        what = re.split(r'[:;.]', p.description, maxsplit=1)[0].strip() or '-'
        row = [f'`{name}`', what] + [fmt(s) for _, _, fmt in PRESET_COLUMNS]
        if differing:
            row.append(', '.join(f'{k}={show(s[k])}' for k in differing
                                 if not same(s[k], Config.method_defaults()[k])) or '-')
        rows.append(row)
    first = settings[next(iter(settings))]
    common = ', '.join(f'`{k}` {show(first[k])}' for k in shared)
    return (table(header, rows) + '\n\n' + f'All presets share {common}. '
            '`.venv/bin/python main.py --list-presets` prints every setting of each.')


# --------------------------------------------------------------------------
# Run folders
# --------------------------------------------------------------------------

def candidate_folders(runs_dir, depth=2):
    """Folders under runs_dir (up to ``depth`` levels) that hold a config.json; links such as
    runs/latest are not followed, so that a run counts once."""
    found, level = [], [Path(runs_dir)]
    for _ in range(depth):
        nxt = []
        for folder in level:
            try:
                children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.is_symlink())
            except OSError:
                continue
            for child in children:
                if child.name == 'comparison' or '.failed-' in child.name:
                    continue
                if (child / runfiles.CONFIG_NAME).is_file():
                    found.append(child)
                else:
                    nxt.append(child)
        level = nxt
    return found


def finished_runs(runs_dir, commit, budget_stops=False):
    """Every finished run under runs_dir (trained to its last epoch, evaluated, not stopped
    early), as dicts: path, config (a Config), metrics, commit. With budget_stops, also the runs
    that --max-hours stopped before their last epoch and evaluated (a preset's result within the
    hour is what the budget allowed)."""
    runs = []
    for folder in candidate_folders(runs_dir):
        state = runfiles.status(folder).state
        if state != runfiles.FINISHED and not (budget_stops and state == runfiles.STOPPED):
            continue
        try:
            raw = runfiles.read_json(folder / runfiles.CONFIG_NAME)
            metrics = runfiles.read_json(folder / runfiles.METRICS_NAME)
            known = {f.name for f in dataclasses.fields(Config)}
            cfg = Config.from_dict({k: v for k, v in raw.items() if k in known}, str(folder / runfiles.CONFIG_NAME))
        except (runfiles.RunFileError, config.ConfigError, TypeError, AttributeError):
            continue
        if not isinstance(metrics, dict) or metrics.get('test_acc') is None:
            continue
        if metrics.get('stopped_early') and not (budget_stops and 'time budget' in str(metrics.get('stop_reason'))):
            continue
        run_commit = ', '.join(dict.fromkeys(recorded_commits(metrics) or [commit]))
        runs.append({'path': folder, 'config': cfg, 'metrics': metrics, 'commit': str(run_commit)})
    return runs


def recorded_commits(metrics):
    """The commits a run's metrics.json records (code_commits, main.py's: more than one for a run
    resumed under other code), or None for a run that records none."""
    commits = metrics.get('code_commits') if isinstance(metrics, dict) else None
    if not isinstance(commits, list) or not commits or not all(isinstance(c, str) for c in commits):
        return None
    return commits


def comparison_commits(data):
    """'08486c4, 62bfb8b': the commits of the runs of a comparison.json, when every run records
    them; else None."""
    commits = []
    for v in data['variants']:
        for r in v['runs']:
            try:
                recorded = recorded_commits(runfiles.read_json(Path(r['path']) / runfiles.METRICS_NAME))
            except runfiles.RunFileError:
                return None
            if recorded is None:
                return None
            commits += recorded
    return ', '.join(dict.fromkeys(commits)) or None


def runs_of_preset(runs, name, presets):
    """The runs whose settings are those of preset ``name`` (seed aside). With fit_epochs a run
    writes the epochs that fit its time budget into its config.json: fewer than the preset's
    (its most) still count as the preset's, if a budget chose them. A run given a fixed --epochs
    N and no --max-hours writes the same config.json; its metrics.json's time_budgets_h (all
    null) tells it apart. Runs of earlier versions record no budgets and count as before."""
    want = presets[name].settings()

    def settings(r):
        have = r['config'].settings()
        if (have.get('fit_epochs') and want.get('fit_epochs') and have['epochs'] <= want['epochs']
                and given_a_budget(r['metrics'])):
            have = dict(have, epochs=want['epochs'])
        return have
    return sorted((r for r in runs if not options_for(settings(r), want) and not options_for(want, settings(r))),
                  key=lambda r: (r['config'].seed, str(r['path'])))


def given_a_budget(metrics):
    """Whether a run was trained under --max-hours: some invocation gave one (metrics.json's
    time_budgets_h), or the run predates the record (None: assumed, as before it existed)."""
    budgets = metrics.get('time_budgets_h')
    return not isinstance(budgets, list) or any(b is not None for b in budgets)


def commits_text(runs):
    return ', '.join(dict.fromkeys(r['commit'] for r in runs))


def headline_rows(runs, presets):
    """{preset: row} of the headline table for the presets with finished runs."""
    rows = {}
    for name, command in HEADLINE_COMMANDS.items():
        mine = runs_of_preset(runs, name, presets) if name in presets else []
        if not mine:
            continue
        seeds = [r['config'].seed for r in mine]
        typed = f'{PYTHON} {command}' + (' --seed S' if seeds != [0] else '')
        rows[f'`{name}`'] = [f'`{name}`', f'`{typed}`', mean_pm([r['metrics']['test_acc'] for r in mine]),
                             f"{mean([r['metrics']['ece'] for r in mine]):.3f}",
                             minutes(mean([r['metrics'].get('wall_time_s') for r in mine])),
                             seeds_text(seeds), commits_text(mine)]
    return rows


def row_cells(line):
    """The cells of one table line ('| a | b |' -> ['a', 'b'])."""
    return [c.strip() for c in line.strip().strip('|').split('|')]


def merge_rows(stored, rows):
    """The stored table with the rows whose first cell is a key of ``rows`` replaced."""
    out = []
    for line in stored.splitlines():
        key = row_cells(line)[0] if line.startswith('|') else None
        out.append('| ' + ' | '.join(rows[key]) + ' |' if key in rows else line)
    missing = [k for k in rows if not any(line.startswith(f'| {k} |') for line in out)]
    if missing:
        raise SourceError(f'the headline table has no row for {", ".join(missing)}; restore it from git')
    return '\n'.join(out)


def preset_run_rows(runs, presets, name, thresholds):
    """One row per finished run of preset ``name``: the seed, test accuracy with the preset's
    test-time views and with one view, both ECEs, the wall time, when validation first reached
    each of ``thresholds`` (keys of metrics.json's time_to_val_acc), the best epoch, the commit."""
    rows = []
    for r in runs_of_preset(runs, name, presets) if name in presets else []:
        m = r['metrics']
        single = m.get('single_view') or {}
        reached = m.get('time_to_val_acc') or {}
        best = (f"{m['best_epoch']}, {pct(m.get('best_val_acc'))}" if m.get('best_epoch') is not None else '-')
        rows.append([str(r['config'].seed), pct(m['test_acc']), pct(single.get('test_acc')),
                     f"{m['ece']:.3f}", '-' if single.get('ece') is None else f"{single['ece']:.3f}",
                     minutes(m.get('wall_time_s')), epochs_text(m, r['config'])]
                    + [reached_text(reached, t, r['path']) for t in thresholds]
                    + [best, r['commit']])
    return rows


def table_rows(block):
    """The body rows of a generated table (a list of cells each), header and separator left out."""
    lines = [line for line in block.splitlines() if line.startswith('|')]
    return [row_cells(line) for line in lines[2:]]


def number(cell):
    """The number of a table cell ('88.52%' -> 0.8852, '0.022' -> 0.022), None for '-' or text."""
    match = re.fullmatch(r'(-?\d+(?:\.\d+)?)(%?)', cell)
    if not match:
        return None
    return float(match.group(1)) / (100 if match.group(2) else 1)


def with_stored_rows(rows, stored):
    """This machine's rows (one per seed) with the stored table's rows of the other seeds, by
    seed, then a mean row over all of them for two or more.

    Each session's machine starts without the run folders of earlier ones, so a row measured
    elsewhere stays on the page (its `measured at` commit says when) until a run of the same
    seed here replaces it; when the preset changes, delete the old rows by hand. The mean row is
    computed from the cells as printed (two decimals, ECE three), not from the runs."""
    mine = {r[0] for r in rows}
    kept = [r for r in table_rows(stored) if r and r[0] != 'mean' and r[0] not in mine and len(r) == len(rows[0])]
    out = sorted(rows + kept, key=lambda r: (int(r[0]) if r[0].lstrip('-').isdigit() else math.inf, r[0]))
    if len(out) > 1:
        columns = [[number(r[i]) for r in out] for i in (1, 2, 3, 4)]
        accs, singles, eces, single_eces = columns
        out.append(['mean', f'**{mean_pm(accs)}**', pct(mean(singles)), f'{mean(eces):.3f}',
                    '-' if mean(single_eces) is None else f'{mean(single_eces):.3f}']
                   + [''] * (len(rows[0]) - 5))
    return out


def epochs_text(metrics, cfg):
    """'70' (all of them), '12, fitted to the budget' (fit_epochs chose them), or '10 of 11, time
    budget' for a run --max-hours stopped early."""
    done = metrics.get('epochs_done')
    if done is None or (done == cfg.epochs and not metrics.get('stopped_early')):
        return str(cfg.epochs) + (', fitted to the budget' if cfg.fit_epochs else '')
    return f"{done} of {cfg.epochs}" + (', time budget' if metrics.get('stopped_early') else '')


def reached_text(reached, threshold, folder):
    """When validation first reached ``threshold`` (metrics.json's time_to_val_acc; for a run
    older than the threshold, from its history.json), or 'not reached'; '-' if neither says."""
    if threshold in reached:
        seconds = reached[threshold]
    else:
        try:
            history = runfiles.read_json(Path(folder) / runfiles.HISTORY_NAME)
            seconds = time_to_accuracy([r for r in history if isinstance(r, dict)], float(threshold))
        except (runfiles.RunFileError, TypeError, ValueError):
            return '-'
    return 'not reached' if seconds is None else minutes(seconds)


def preset_runs_header(views, thresholds):
    return (['seed', f'test accuracy ({views})', 'single view', f'ECE ({views})', 'ECE single view', 'wall time',
             'epochs']
            + [f'validation {100 * float(t):.0f}% reached' for t in thresholds]
            + ['best epoch, validation', 'measured at'])


# (block, preset, its test-time views, the validation accuracies whose times the table shows)
PRESET_RUN_TABLES = [('best-runs', 'best', 'flip averaged', ('0.70', '0.75')),
                     ('deep-runs', 'deep', 'flip and shifts', ('0.85', '0.90'))]


# --------------------------------------------------------------------------
# Calibration: docs/results.md, from the runs under runs/calib
# --------------------------------------------------------------------------

CALIBRATION_HEADER = ['command', 'seeds', 'test accuracy', 'T', 'ECE raw', 'ECE calibrated',
                      'NLL raw', 'NLL calibrated', 'ECE of a calibrated model (95th pct.)',
                      'distinguishable raw / calibrated', 'measured at']


def spread(values, digits):
    """'0.0123 ± 0.0004' (mean ± sample std), or the one value."""
    return f'{mean(values):.{digits}f} ± {std(values):.{digits}f}' if len(values) > 1 else f'{values[0]:.{digits}f}'


def calibration_rows(runs, presets):
    """One row per setting (seeds pooled) of the runs that recorded a temperature."""
    groups = {}
    for r in runs:
        if r['metrics'].get('temperature') is not None:
            groups.setdefault(command_for(r['config'].settings(), presets), []).append(r)
    rows = []
    for command, mine in sorted(groups.items()):
        mine.sort(key=lambda r: r['config'].seed)
        raw = [r['metrics']['calibration']['raw'] for r in mine]
        cal = [r['metrics']['calibration']['calibrated'] for r in mine]
        rows.append([f'`{command}`', seeds_text([r['config'].seed for r in mine]),
                     mean_pm([r['metrics']['test_acc'] for r in mine]),
                     spread([r['metrics']['temperature'] for r in mine], 3),
                     spread([c['ece'] for c in raw], 4), spread([c['ece'] for c in cal], 4),
                     spread([c['nll'] for c in raw], 4), spread([c['nll'] for c in cal], 4),
                     spread([c['ece_if_calibrated']['p95'] for c in cal], 4),
                     f"{sum(c['distinguishable'] for c in raw)} / {sum(c['distinguishable'] for c in cal)} "
                     f'of {len(mine)}', commits_text(mine)])
    return rows


# --------------------------------------------------------------------------
# Comparisons (compare.py's comparison.json)
# --------------------------------------------------------------------------

def read_comparison(path):
    """The variants of a comparison.json written by compare.py, checked for what is used here."""
    try:
        data = json.loads(Path(path).read_text(encoding='utf-8'))
        variants = data['variants']
        for v in variants:
            missing = [k for k in ('label', 'is_baseline', 'differs', 'settings', 'seeds', 'test_acc', 'ece',
                                   'wall_time_s', 'runs', 'diverged') if k not in v]
            missing += [f'test_acc.{k}' for k in ('values', 'mean') if k not in v['test_acc']]
            missing += [f'differs.{k}' for d in v['differs'] for k in ('key', 'value') if k not in d]
            missing += [f'runs.{k}' for r in v['runs'] for k in ('path',) if k not in r]
            if missing:
                raise KeyError(', '.join(missing))
            dict(v['settings'])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SourceError(f'{path} is not a comparison.json written by compare.py ({type(e).__name__}: {e}); '
                          f'write it again with compare.py') from None
    if not any(v['is_baseline'] for v in variants):
        raise SourceError(f'{path} has no baseline variant; write it again with compare.py --baseline RUN')
    return data


def p_value(p):
    """A p-value as the pages show it (compare.py's form): three decimals, below 0.001 in powers of ten."""
    if p in (0, 1):
        return f'{p:g}'
    return f'{p:.1e}' if p < 0.001 else f'{p:.3f}'


def against(v):
    """'+3.06 points (95% CI +1.20 to +4.92), better (p = 0.004, Holm-adjusted 0.012)' from a variant's
    vs_baseline record; a comparison.json of an earlier compare.py (no p-value) gives
    '+3.06 points, better (t = +10.85, df 2.3)'."""
    w = v.get('vs_baseline') or {}
    if w.get('diff') is None:
        return '-'
    text = f"{w['diff']:+.2f} points"
    if w.get('p') is not None:
        ci = f" (95% CI {w['ci95'][0]:+.2f} to {w['ci95'][1]:+.2f})" if w.get('ci95') else ''
        holm = f", Holm-adjusted {p_value(w['p_holm'])}" if w.get('p_holm') is not None else ''
        return text + f"{ci}, {w['verdict']} (p = {p_value(w['p'])}{holm})"
    if w.get('t') is None:
        return text + f" ({len(v['test_acc']['values'])} seed{'s' if len(v['test_acc']['values']) != 1 else ''})"
    return text + f", {w['verdict']} (t = {w['t']:+.2f}, df {w['df']:.1f})"


def single_view_ece(v):
    """The mean single-view ECE of a variant's runs, read from their metrics.json (tta_flip runs), or None."""
    values = []
    for r in v['runs']:
        try:
            m = runfiles.read_json(Path(r['path']) / runfiles.METRICS_NAME)
            values.append(m['single_view']['ece'])
        except (runfiles.RunFileError, KeyError, TypeError):
            return None
    return mean(values)


def claim_verdict(name, v):
    w = v.get('vs_baseline') or {}
    expected = EXPECTED.get(name)
    n_div, n = v['diverged'], len(v['runs'])
    if expected == 'diverges':
        return (f'holds: {n_div} of {n} runs diverged' if n_div else
                f'does not hold: 0 of {n} runs diverged; accuracy {w.get("verdict", "-")}')
    verdict = w.get('verdict', 'too few runs')
    if expected is None or verdict == 'too few runs':
        return verdict
    if verdict == expected:
        return 'holds'
    if verdict == 'within noise':
        return 'not shown: within noise'
    return f'does not hold: reversed ({verdict})'


def find_variant(variants, overrides):
    for v in variants:
        if {d['key']: d['value'] for d in v['differs']}.keys() == overrides.keys() and all(
                same(d['value'], overrides[d['key']]) for d in v['differs']):
            return v
    return None


def render_claims(data, commit, source):
    import sweep        # the suite's variants and the claim each tests: sweeps/claims.json
    suite = sweep.load_sweep(CLAIMS_SWEEP)
    variants = data['variants']
    base = next(v for v in variants if v['is_baseline'])
    rows = []
    for name, overrides in suite.variants.items():
        if name == suite.baseline:
            continue
        options, claim = ' '.join(sweep.option_args(overrides)), suite.about.get(name, name)
        v = find_variant(variants, overrides)
        if v is None:
            rows.append([claim, f"`{options}`", 'not run', '-'])
            continue
        div = f", {v['diverged']} of {len(v['runs'])} diverged" if v['diverged'] else ''
        rows.append([claim, f"`{options}`",
                     f"{mean_pm(v['test_acc']['values'])} ({len(v['seeds'])} seeds{div}), {against(v)}",
                     claim_verdict(name, v)])
    head = (f"Baseline (the method's `fast` protocol, unchanged): {mean_pm(base['test_acc']['values'])} over "
            f"{len(base['seeds'])} seeds. Measured at {commit}, by `make claims`; generated from "
            f"`{shown(source)}`.")
    return head + '\n\n' + table(['claim of the method', 'variant: `main.py` options',
                                  'measured: the variant against the baseline', 'verdict'], rows)


def render_cells(data, commit, source):
    variants = data['variants']
    base = next(v for v in variants if v['is_baseline'])
    rows = [['`rnn` (the method)', base, '']]
    for cell in ('gru', 'lstm'):
        v = find_variant(variants, {'cell': cell})
        if v is not None:
            rows.append([f'`{cell}`', v, against(v)])
    head = f'Measured at {commit}, by `make claims`; generated from `{shown(source)}`.'
    return head + '\n\n' + table(
        ['`pixels`, 15 epochs', 'seeds', 'test accuracy, mean ± std', 'each seed', 'against `rnn`'],
        [[label, str(len(v['seeds'])), mean_pm(v['test_acc']['values']),
          ', '.join(f'{100 * a:.2f}' for a in v['test_acc']['values']), vs] for label, v, vs in rows])


def render_levers(data, commit, source, presets):
    """A levers table (the levers and deep-levers sweeps, both screens): each variant's command, test accuracy
    over its seeds, ECE (and the single view's when its runs average test-time views), wall time and
    compare.py's verdict against the base."""
    variants = data['variants']
    base = next(v for v in variants if v['is_baseline'])
    singles = [single_view_ece(v) for v in variants]
    views = any(single is not None for single in singles)
    rows = []
    for v, single in zip(variants, singles):
        label = f"base: `{closest_preset(base['settings'], presets)[0]}`" if v['is_baseline'] else v['label']
        rows.append([label, f"`{command_for(v['settings'], presets)}`", str(len(v['seeds'])),
                     f"{mean_pm(v['test_acc']['values'])} "
                     f"({', '.join(f'{100 * a:.2f}' for a in v['test_acc']['values'])})",
                     f"{v['ece']['mean']:.3f}" + ('' if single is None else f' / {single:.3f}'),
                     minutes(v['wall_time_s']['mean']), '' if v['is_baseline'] else against(v)])
    head = f'Measured at {commit}; generated from `{shown(source)}`.'
    ece = 'ECE views averaged / single view' if views else 'ECE'
    return head + '\n\n' + table(['lever', 'command', 'seeds', 'test accuracy, mean ± std (each seed)',
                                  ece, 'wall time', 'against the base'], rows)


# --------------------------------------------------------------------------
# The pages
# --------------------------------------------------------------------------

def shown(path):
    """A path as the pages show it: relative to the repository (or the current folder) when below it."""
    path = Path(path).absolute()
    for base in (REPO, Path.cwd()):
        try:
            return str(path.relative_to(base))
        except ValueError:
            pass
    return str(path)


def head_commit():
    """HEAD's short hash, with '+changes' when tracked files differ from it; 'unknown' without git."""
    return cli.code_commit(REPO) or 'unknown'


def plan(runs_dir, commit, root=REPO):
    """[(page, block name, new body or None to keep, what was done)] for every generated table."""
    presets = config.load_presets()
    runs_dir = Path(runs_dir)
    out = [('README.md', 'presets', render_presets(presets), 'rewritten from presets.json')]
    # One scan of the run folders: the preset tables also count runs the time budget stopped,
    # the headline only those that trained to their last epoch.
    within_budget = finished_runs(runs_dir, commit, budget_stops=True) if runs_dir.is_dir() else []
    runs = [r for r in within_budget if not r['metrics'].get('stopped_early')]

    rows = headline_rows(runs, presets)
    if rows:
        stored = read_block((root / 'README.md').read_text(encoding='utf-8'), 'headline', 'README.md')
        out.append(('README.md', 'headline', merge_rows(stored, rows),
                    f"rows {', '.join(rows)} rewritten from the runs under {shown(runs_dir)}"))
    else:
        out.append(('README.md', 'headline', None,
                    f'kept: no finished `fast` or `best` run under {shown(runs_dir)}'))

    results = (root / 'docs/results.md').read_text(encoding='utf-8')
    for block, name, views, thresholds in PRESET_RUN_TABLES:
        rows = preset_run_rows(within_budget, presets, name, thresholds)
        head = f'Generated from the `{name}` runs under `{shown(runs_dir)}`.'
        if rows:
            merged = with_stored_rows(rows, read_block(results, block, 'docs/results.md'))
            if len([r for r in merged if r[0] != 'mean']) > len(rows):
                head = (f'Generated from the `{name}` runs under `{shown(runs_dir)}`; the rows of the other '
                        f'seeds are those measured before (their commit says when).')
            rows = merged
        out.append(('docs/results.md', block,
                    head + '\n\n' + table(preset_runs_header(views, thresholds), rows) if rows else None,
                    f'rewritten from the `{name}` runs under {shown(runs_dir)}' if rows
                    else f'kept: no finished `{name}` run under {shown(runs_dir)}'))

    calib_dir = runs_dir / 'calib'
    calibration = calibration_rows(finished_runs(calib_dir, commit), presets) if calib_dir.is_dir() else []
    out.append(('docs/results.md', 'calibration',
                f'Generated from the runs under `{shown(calib_dir)}`.\n\n' + table(CALIBRATION_HEADER, calibration)
                if calibration else None,
                f'rewritten from the runs under {shown(calib_dir)}' if calibration
                else f'kept: no run with a temperature under {shown(calib_dir)}'))

    # compare.py's comparisons: the claims suite's (two blocks of docs/claims.md) and each lever screen's.
    def render_screen(data, commit, source):
        return render_levers(data, commit, source, presets)
    comparisons = [(runs_dir / 'claims' / 'comparison' / 'comparison.json',
                    [('docs/claims.md', 'claims', render_claims), ('docs/claims.md', 'cells', render_cells)],
                    [('test_accuracy.png', 'docs/claims_test_accuracy.png'),
                     ('val_accuracy.png', 'docs/claims_val_accuracy.png')])]
    comparisons += [(runs_dir / name / 'comparison' / 'comparison.json',
                     [('docs/results.md', name, render_screen)],
                     [('test_accuracy.png', screen_figure(name))]) for name in LEVER_SCREENS]
    for source, blocks, figures in comparisons:
        data = read_comparison(source) if source.is_file() else None
        for page, name, render in blocks:
            if data is None:
                out.append((page, name, None, f'kept: {shown(source)} not found'))
            else:
                out.append((page, name, render(data, comparison_commits(data) or commit, source),
                            f'rewritten from {shown(source)}'))
        for figure, page in figures:
            if data is not None and (source.parent / figure).is_file():
                out.append((page, None, source.parent / figure, f'copied from {shown(source.parent / figure)}'))
    return out


MEASURED_AT = re.compile(r'Measured at [^\s;,]+')


def with_earlier_commits(body, stored):
    """``body`` with the commits that ``stored`` (the block on the page) gives to what body repeats:
    the whole stored block if only its "Measured at <commit>" differs, else each table row whose cells
    but the last equal a stored row's, in a table whose last column is the commit ('measured at').

    Runs from before main.py recorded code_commits do not say which commit trained them, so a block
    made again from them would otherwise be stamped with today's --commit; the page's commit is the
    one they were measured at."""
    body, stored = body.strip('\n'), stored.strip('\n')
    if MEASURED_AT.sub('Measured at ?', body) == MEASURED_AT.sub('Measured at ?', stored):
        return stored
    lines = [line for line in body.splitlines() if line.startswith('|')]
    if not lines or row_cells(lines[0])[-1].lower() != 'measured at':
        return body
    earlier = {tuple(row_cells(line)[:-1]): line for line in stored.splitlines() if line.startswith('|')}
    return '\n'.join(earlier.get(tuple(row_cells(line)[:-1]), line) if line.startswith('|') else line
                     for line in body.splitlines())


def apply(plan_items, root=REPO, check=False, log=print):
    """Write (or with check, only compare) every page and figure; returns those that changed.

    plan_items: (page, block name, new body or None to keep it, what) for a table;
    (figure, None, the file to copy, what) for a figure of compare.py's."""
    texts, changed = {}, []
    for page, name, body, what in plan_items:
        if name is None:
            content = Path(body).read_bytes()
            target = root / page
            if not target.is_file() or target.read_bytes() != content:
                changed.append(page)
                if not check:
                    runfiles.write_atomic(target, lambda f: f.write(content))
            log(f'{page}: {what}')
            continue
        text = texts.setdefault(page, (root / page).read_text(encoding='utf-8'))
        if body is None:
            block_span(text, name, page)          # the markers must be there all the same
        else:
            texts[page] = write_block(text, name, with_earlier_commits(body, read_block(text, name, page)), page)
        log(f'{page} {name}: {what}')
    for page, text in texts.items():
        if text != (root / page).read_text(encoding='utf-8'):
            changed.append(page)
            if not check:
                runfiles.write_text(root / page, text)
    return changed


def main(argv=None):
    parser = argparse.ArgumentParser(description='Rewrite the generated tables of README.md and docs/*.md '
                                                 'from presets.json and the run folders.')
    parser.add_argument('--runs', default=str(REPO / 'runs'),
                        help='the folder holding the run folders (default: runs/ of the repository)')
    parser.add_argument('--commit', default=None,
                        help="the commit of the code that trained the runs (default: HEAD, '+changes' "
                             'if tracked files differ from it)')
    parser.add_argument('--check', action='store_true',
                        help='write nothing; exit 1 if a page would change')
    args = parser.parse_args(argv)
    if not args.runs.strip():
        # An unset shell variable (--runs "$RUNS") would otherwise read the current folder's runs.
        print('docs/tables.py: --runs is empty; give the folder holding the run folders, e.g. --runs runs',
              file=sys.stderr)
        return 2
    try:
        changed = apply(plan(args.runs, args.commit or head_commit()), check=args.check)
    except (SourceError, config.ConfigError, runfiles.RunFileError) as e:
        print(f'docs/tables.py: {e}', file=sys.stderr)
        return 2
    if args.check and changed:
        print(f"docs/tables.py: {', '.join(changed)} would change; run make docs", file=sys.stderr)
        return 1
    print(('changed: ' + ', '.join(changed)) if changed else 'no page changed')
    return 0


if __name__ == '__main__':
    sys.exit(main())
