"""The documentation is real: every command that README.md and docs/*.md give names a script, a
make target and flags that exist; every link resolves; the README stays short; the generated
tables match their sources, and docs/tables.py rewrites them from run folders (written here by
hand in main.py's format and compared by compare.py) and keeps them when there are none.

Each script's --help runs once, in parallel subprocesses, as users run it."""
import concurrent.futures
import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import config
import runfiles
from conftest import LABEL_NAMES, REPO_ROOT
from metrics import (apply_temperature, calibration_report, confusion_matrix, expected_calibration_error,
                     per_class_accuracy)

README = REPO_ROOT / 'README.md'
DOCS = REPO_ROOT / 'docs'
MAKEFILE = REPO_ROOT / 'Makefile'
README_MAX_BYTES = 15_000
PAGES = [README] + sorted(DOCS.glob('*.md'))
INTERPRETERS = ('python', 'python3', '.venv/bin/python', '$(BIN)/python')


def load_tables():
    spec = importlib.util.spec_from_file_location('docs_tables', DOCS / 'tables.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tables = load_tables()


# --------------------------------------------------------------------------
# Commands in the pages
# --------------------------------------------------------------------------

def code_snippets(text):
    """The code of a Markdown page: each line of a fenced block, each inline `code` span."""
    snippets, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith('```'):
            fenced = not fenced
            continue
        if fenced:
            snippets.append(line)
        else:
            snippets += re.findall(r'`([^`]+)`', line)
    return snippets


def words(snippet):
    try:
        return shlex.split(snippet, comments=True)
    except ValueError:            # an unbalanced quote in prose-like code: plain words will do
        return snippet.split()


def commands(snippet):
    """[(cwd, [words])] of the shell commands in a snippet, split at && ; | and following cd."""
    out, cwd, current = [], Path('.'), []
    for word in words(snippet) + ['&&']:
        if word in ('&&', ';', '|', '||'):
            if current[:1] == ['cd'] and len(current) == 2:
                cwd = cwd / current[1]
            elif current:
                out.append((cwd, current))
            current = []
        else:
            current.append(word)
    return out


def flags_of(args):
    """The option names among command-line words: --name (before any =), -x; not '-' or numbers."""
    names = []
    for a in args:
        a = a.strip('[]')
        if re.fullmatch(r'--?[A-Za-z][\w-]*(=.*)?', a):
            names.append(a.split('=', 1)[0])
    return names


def python_commands(pages):
    """(page, script path relative to the repository, flags, the snippet) of every
    `python X.py ...` in the pages (python, python3, .venv/bin/python)."""
    found = []
    for page in pages:
        for snippet in code_snippets(page.read_text(encoding='utf-8')):
            for cwd, cmd in commands(snippet):
                if cmd[0] in INTERPRETERS and len(cmd) > 1 and cmd[1].endswith('.py'):
                    found.append((page.name, str(cwd / cmd[1]), flags_of(cmd[2:]), snippet))
    return found


def make_commands(pages):
    """(page, target, {VAR: value}, snippet) of every `make ...` in the pages."""
    found = []
    for page in pages:
        for snippet in code_snippets(page.read_text(encoding='utf-8')):
            for _, cmd in commands(snippet):
                if cmd[0] != 'make':
                    continue
                assigned = dict(w.split('=', 1) for w in cmd[1:] if re.fullmatch(r'[A-Z_]+=.*', w))
                targets = [w for w in cmd[1:] if '=' not in w and not w.startswith('-')] or ['']
                found += [(page.name, t, assigned, snippet) for t in targets]
    return found


# --------------------------------------------------------------------------
# What exists: scripts' options (from --help) and the Makefile
# --------------------------------------------------------------------------

def help_options(script):
    """The options a script accepts, read from the usage lines of its --help (run as users do)."""
    proc = subprocess.run([sys.executable, script, '--help'], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, f'{script} --help exited {proc.returncode}: {proc.stderr[-500:]}'
    usage = proc.stdout.split('\n\n', 1)[0]
    assert usage.startswith('usage:'), f'{script} --help does not start with argparse usage lines'
    options = set(re.findall(r'(?<![\w-])(--?[A-Za-z][\w-]*)', usage))
    return options | ({'--help'} if '-h' in options else set())     # usage shows only -h of -h/--help


@pytest.fixture(scope='session')
def script_options():
    """{script: its options} for every script the pages (and the Makefile) run; missing ones absent."""
    scripts = {s for _, s, _, _ in python_commands(PAGES)} | set(makefile()['scripts'].values())
    existing = sorted(s for s in scripts if (REPO_ROOT / s).is_file())
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(existing, pool.map(help_options, existing)))


def makefile(path=MAKEFILE):
    """targets, .PHONY names, variables, the header comment's `make X` names, and {VAR: script}
    for variables handed to a script in a recipe, and the recipes' python commands."""
    text = path.read_text(encoding='utf-8')
    lines = text.splitlines()
    targets = {m for line in lines for m in re.findall(r'^([A-Za-z][\w-]*)\s*:(?!=)', line)}
    phony = {w for line in lines if line.startswith('.PHONY:') for w in line.split(':', 1)[1].split()}
    variables = set(re.findall(r'^([A-Z_]+)\s*[?:]?=', text, flags=re.M))
    header = []
    for line in lines:
        if not line.startswith('#'):
            break
        header.append(line)
    header_names = set()
    for m in re.finditer(r'\bmake ([\w-]+(?:, [\w-]+)*)', '\n'.join(header)):
        header_names |= set(m.group(1).split(', '))
    scripts, recipes = {}, []
    for line in lines:
        m = re.match(r'\t\$\(BIN\)/python (\S+\.py)(.*)$', line)
        if m:
            recipes.append((m.group(1), flags_of(m.group(2).split())))
            for var in re.findall(r'\$\(([A-Z_]+)\)', m.group(2)):
                scripts[var] = m.group(1)
    return {'targets': targets, 'phony': phony, 'variables': variables, 'header': header_names,
            'scripts': scripts, 'recipes': recipes}


def unknown_options(cmds, options):
    """The problems of (page, script, flags, snippet) commands against {script: options}."""
    problems = []
    for page, script, flags, snippet in cmds:
        if not (REPO_ROOT / script).is_file():
            problems.append(f'{page}: `{snippet}` runs {script}, which does not exist')
            continue
        problems += [f'{page}: `{snippet}`: {script} has no option {f}' for f in flags
                     if f not in options[script]]
    return problems


def test_every_python_command_names_a_script_and_options_that_exist(script_options):
    cmds = python_commands(PAGES)
    assert len(cmds) > 40 and {'main.py', 'viz.py', 'compare.py', 'claims.py', 'sweep.py'} <= {c[1] for c in cmds}
    assert unknown_options(cmds, script_options) == []


def test_the_check_fails_on_a_wrong_flag_or_a_missing_script(script_options, tmp_path):
    page = tmp_path / 'page.md'
    page.write_text('Run `.venv/bin/python main.py --preset fast --no-such-flag 3`, then\n'
                    '```bash\ncd benchmarks && python speed.py --profile --steps=3   # fine\n'
                    'python nowhere.py --x\n```\n', encoding='utf-8')
    cmds = python_commands([page])
    assert [c[1] for c in cmds] == ['main.py', 'benchmarks/speed.py', 'nowhere.py']
    assert cmds[1][2] == ['--profile', '--steps']
    problems = unknown_options(cmds, script_options)
    assert len(problems) == 2
    assert 'no option --no-such-flag' in problems[0] and 'nowhere.py, which does not exist' in problems[1]


def test_every_make_command_names_a_target_and_variables_that_exist(script_options):
    mk = makefile()
    cmds = make_commands(PAGES)
    assert {'train', 'test', 'report', 'claims', 'docs', 'bench'} <= {t for _, t, _, _ in cmds}
    problems = [f'{page}: `{snippet}`: no make target {t!r}' for page, t, _, snippet in cmds
                if t and t not in mk['targets']]
    for page, _, assigned, snippet in cmds:
        for var, value in assigned.items():
            if var not in mk['variables']:
                problems.append(f'{page}: `{snippet}`: the Makefile has no variable {var}')
            elif var in mk['scripts']:     # the value holds options of the script the recipe runs
                script = mk['scripts'][var]
                problems += [f'{page}: `{snippet}`: {script} has no option {f}'
                             for f in flags_of(words(value)) if f not in script_options[script]]
    assert problems == []


def test_the_makefile_lists_every_target_in_phony_and_in_its_header(script_options):
    mk = makefile()
    assert mk['targets'] - mk['phony'] == set(), 'targets missing from .PHONY'
    assert mk['targets'] - mk['header'] == set(), 'targets missing from the header comment'
    assert mk['header'] - mk['targets'] == set(), 'the header names targets that do not exist'
    assert {'report', 'docs', 'claims', 'bench'} <= mk['targets']
    problems = [f'Makefile: {script} has no option {f}' for script, flags in mk['recipes']
                for f in flags if f not in script_options[script]]
    assert problems == []
    # make bench runs every benchmark a user should run.
    bench = re.search(r'^bench:(.*)$', MAKEFILE.read_text(encoding='utf-8'), flags=re.M).group(1).split()
    assert set(bench) == {'bench-speed', 'bench-faults', 'bench-loop', 'bench-data', 'bench-sweep'}


@pytest.mark.skipif(shutil.which('make') is None, reason='make is not installed')
def test_make_report_draws_the_latest_run_with_the_venvs_python():
    # (under an outer make, as in make test, the inner one would print 'Leaving directory' lines)
    env = {k: v for k, v in os.environ.items() if k not in ('MAKEFLAGS', 'MAKELEVEL', 'MFLAGS')}
    proc = subprocess.run(['make', '--no-print-directory', '-n', '-o', '.venv/.installed', 'report'],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == '.venv/bin/python viz.py runs/latest'


# --------------------------------------------------------------------------
# Links, size, pages
# --------------------------------------------------------------------------

def slug(heading):
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r'[^\w\- ]', '', heading.strip().lower().replace('`', ''))
    return text.replace(' ', '-')


def anchors(page):
    text = re.sub(r'```.*?```', '', page.read_text(encoding='utf-8'), flags=re.S)
    return {slug(m) for m in re.findall(r'^#{1,6} (.+)$', text, flags=re.M)}


def links(page):
    text = re.sub(r'```.*?```', '', page.read_text(encoding='utf-8'), flags=re.S)
    return re.findall(r'!?\[[^\]]*\]\(([^)\s]+)\)', text)


def test_every_relative_link_and_image_resolves():
    problems, checked = [], 0
    for page in PAGES:
        for target in links(page):
            if re.match(r'[a-z]+:', target):
                continue
            path, _, fragment = target.partition('#')
            resolved = (page.parent / path).resolve() if path else page
            checked += 1
            if not resolved.exists():
                problems.append(f'{page.name}: {target} does not exist')
            elif fragment and resolved.suffix == '.md' and fragment not in anchors(resolved):
                problems.append(f'{page.name}: {target}: {resolved.name} has no heading #{fragment}')
    assert checked > 30 and problems == []


def test_the_readme_is_short_and_links_every_docs_page_and_every_figure_is_shown():
    assert len(README.read_bytes()) <= README_MAX_BYTES
    readme_links = {(README.parent / t.partition('#')[0]).resolve() for t in links(README)}
    assert {p.resolve() for p in DOCS.glob('*.md')} <= readme_links
    shown = {(page.parent / t).resolve() for page in PAGES for t in links(page)}
    assert {p.resolve() for p in DOCS.glob('*.png')} <= shown


def test_the_readme_sections_come_in_the_order_of_issue_20():
    headings = re.findall(r'^## (.+)$', re.sub(r'```.*?```', '', README.read_text(encoding='utf-8'),
                                                  flags=re.S), flags=re.M)
    assert headings == ['Quick start', 'The data, online or offline', 'Using the tools', 'Presets',
                        'The run folder', 'The code', 'Tests', 'Results', 'Documentation']


def test_the_run_folder_table_is_one_table_with_the_lock_row():
    section = README.read_text(encoding='utf-8').split('## The run folder', 1)[1].split('\n## ', 1)[0]
    rows = re.findall(r'^\|.*\|$', section, flags=re.M)
    block = section[section.index(rows[0]):section.index(rows[-1]) + len(rows[-1])]
    assert '\n\n' not in block, 'a blank line breaks the run-folder table'
    assert rows[-1].startswith('| `.lock` |')
    for name in ('config.json', 'history.json', 'train.log', 'ckpt.npz', 'best.npz', 'metrics.json',
                 'predictions.npz', 'report.md'):
        assert f'`{name}`' in block


# --------------------------------------------------------------------------
# Generated tables
# --------------------------------------------------------------------------

def test_the_presets_table_is_the_one_presets_json_gives():
    presets = config.load_presets()
    block = tables.read_block(README.read_text(encoding='utf-8'), 'presets', 'README.md')
    assert block == tables.render_presets(presets)
    rows = [line for line in block.splitlines() if line.startswith('| `')]
    assert [r.split('|')[1].strip().strip('`') for r in rows] == list(presets)


def test_the_images_column_names_a_validation_share_other_than_a_tenth():
    presets = config.load_presets()
    held_out = {'fast': presets['fast'],
                'deep': config.with_overrides(presets['deep'], {'val_fraction': 0.02}, 'the configuration')}
    rows = [line.split(' | ') for line in tables.render_presets(held_out).splitlines() if line.startswith('| `')]
    column = [c for c, _, _ in tables.PRESET_COLUMNS].index('of the 50,000 training images') + 2
    assert [r[column] for r in rows] == ['40%', '100%, 2% of them held out']
    assert 'val_fraction' not in tables.render_presets(presets)      # shown in that column, not in "share"


def test_the_views_column_names_a_one_view_validation():
    deep = config.load_presets()['deep'].settings()
    assert tables.describe_views(dict(deep, val_views='one')) == 'flip, shifts (validation: one)'
    assert tables.describe_views(dict(deep, val_views='test')) == 'flip, shifts'
    assert tables.describe_views(dict(deep, tta_translate=False, tta_flip=True, val_views='one')) == \
        'flip (validation: one)'
    # Without test-time views, one view is one view whatever val_views says.
    assert tables.describe_views(dict(deep, tta_translate=False, tta_flip=False, val_views='one')) == 'one'


def test_the_backbone_column_names_batchnorm_settings_that_are_not_the_defaults():
    deep = config.load_presets()['deep'].settings()
    assert tables.describe_backbone(deep) == '64-256-256, 2 convs, BN, identity init'
    airbench = dict(deep, bn_momentum=0.4, bn_gamma_lr=0, bn_beta_lr=64)
    assert tables.describe_backbone(airbench) == \
        '64-256-256, 2 convs, BN bn_momentum 0.4 bn_gamma_lr 0 bn_beta_lr 64, identity init'


def test_the_pages_are_up_to_date_and_kept_without_run_folders(tmp_path, capsys):
    assert tables.main(['--runs', str(tmp_path / 'no-runs'), '--check']) == 0
    out = capsys.readouterr().out
    assert 'README.md presets: rewritten from presets.json' in out
    # Every block made from runs: the headline, the preset tables, calibration, the claims suite's two
    # and one for each lever screen (20 in all).
    assert out.count(': kept') == 1 + len(tables.PRESET_RUN_TABLES) + 1 + 2 + len(tables.LEVER_SCREENS) == 20


def finished_run(root, name, seed=0, acc=0.5, preset='fast', wall_time_s=300.0, single_view=None,
                 n_test=200, temperature=None, budget_stop_at=None, time_budgets_h=None, **settings):
    """A finished run folder as main.py writes it (config, history, metrics, predictions, log,
    a checkpoint at the last epoch), its test predictions right on round(acc * n_test) images.
    budget_stop_at: the run --max-hours stopped (and evaluated) after that many epochs instead.
    time_budgets_h: metrics.json's record of the --max-hours given (None: a run of an earlier
    version, which has none)."""
    run = Path(root) / name
    run.mkdir(parents=True)
    base = config.load_presets()[preset].settings()
    cfg = dict(base, **settings, seed=seed, preset=preset, description='', data_dir='data', lr_changes=[])
    epochs = cfg['epochs']
    rng = np.random.default_rng(seed + 1000 * len(name))
    labels = np.arange(n_test) % 10
    predicted = labels.copy()
    wrong = np.arange(n_test) >= round(acc * n_test)
    predicted[wrong] = (labels[wrong] + rng.integers(1, 10, wrong.sum())) % 10
    logits = rng.normal(scale=0.5, size=(n_test, 10))
    logits[np.arange(n_test), predicted] += 4
    probs = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)
    cm = confusion_matrix(labels, probs.argmax(1))
    history = [{'epoch': e, 'train_loss': 2.0 / e, 'train_acc': acc * e / epochs, 'val_loss': 2.1 / e,
                'val_acc': acc * e / epochs, 'lr': 0.02, 'base_lr': 0.02, 'epoch_time_s': 20.0,
                'images_per_s': 900.0, 'elapsed_s': 20.0 * e} for e in range(1, (budget_stop_at or epochs) + 1)]
    metrics = {'test_loss': 1.5, 'test_acc': float((probs.argmax(1) == labels).mean()),
               'ece': expected_calibration_error(probs, labels), 'per_class_acc': per_class_accuracy(cm),
               'confusion_matrix': cm, 'best_val_acc': history[-1]['val_acc'], 'best_epoch': epochs,
               'epochs_done': epochs, 'epochs_planned': epochs, 'stopped_early': False, 'stop_reason': None,
               'wall_time_s': wall_time_s, 'train_images_per_s': 900.0, 'test_images': n_test,
               'label_names': LABEL_NAMES, 'time_to_val_acc': {'0.70': None, '0.75': None}}
    if budget_stop_at is not None:
        metrics.update(best_val_acc=history[-1]['val_acc'], best_epoch=budget_stop_at, epochs_done=budget_stop_at,
                       stopped_early=True, stop_reason='time budget of 1.0 h reached')
        epochs = budget_stop_at
    if single_view is not None:
        metrics['single_view'] = single_view
    if time_budgets_h is not None:
        metrics['time_budgets_h'] = time_budgets_h
    if temperature is not None:      # as main.py's calibration writes them
        calibrated = apply_temperature(probs, temperature)
        metrics['temperature'] = temperature
        metrics['calibration'] = {'raw': calibration_report(probs, labels, samples=50),
                                  'calibrated': calibration_report(calibrated, labels, samples=50)}
    runfiles.write_json(run / 'config.json', cfg)
    meta = {'format_version': 1, 'kind': 'checkpoint', 'run_config': cfg, 'state': {'epoch': epochs}}
    runfiles.write_npz(run / 'ckpt.npz', {'meta': np.array(json.dumps(meta)), 'param/b_o': np.zeros(10, np.float32)})
    runfiles.write_json(run / 'history.json', history)
    runfiles.write_json(run / 'metrics.json', metrics)
    runfiles.write_npz(run / 'predictions.npz', {
        'probs': probs, 'labels': labels.astype(np.int64), 'indices': np.arange(n_test),
        'hidden': rng.normal(size=(n_test, 8)).astype(np.float32)})
    runfiles.append_line(run / 'train.log', f'2024-01-01 12:00:00 run {run}: preset {preset}')
    return run


def deep_screen(folder, short, base, *variants, seeds=(0, 1)):
    """The fake runs of a screen of `deep` on the schedule ``short``: for each seed the base's run,
    then the variants'. ``base`` and each variant are (name, test accuracy per seed, settings changed
    from ``short``); the folders are NAME-seedS, as sweep.py names them. Returns compare.py's
    arguments for the screen: the folder, with the base's first seed as the baseline."""
    for i, seed in enumerate(seeds):
        for name, accuracies, changes in (base, *variants):
            finished_run(folder, f'{name}-seed{seed}', seed, accuracies[i], preset='deep', **dict(short, **changes))
    return [str(folder), '--baseline', str(folder / f'{base[0]}-seed{seeds[0]}')]


def copy_of_the_pages(tmp_path):
    """A folder holding copies of README.md and docs/*.md, for tables.plan/apply to rewrite."""
    root = tmp_path / 'repo'
    (root / 'docs').mkdir(parents=True)
    shutil.copy(README, root / 'README.md')
    for page in DOCS.glob('*.md'):
        shutil.copy(page, root / 'docs' / page.name)
    return root


# The fake deep run stops one epoch short of the preset's last; its validation accuracy grows
# linearly to 94% at the last epoch (finished_run), so it first passes 85% at DEEP_85 and 90% at
# DEEP_90, if that is before its stop (an epoch is 20 s).
DEEP_EPOCHS = config.load_presets()['deep'].epochs
DEEP_STOP = DEEP_EPOCHS - 1
DEEP_85 = math.ceil(0.85 * DEEP_EPOCHS / 0.94)
DEEP_90 = math.ceil(0.90 * DEEP_EPOCHS / 0.94)
DEEP_90_CELL = f'{20 * DEEP_90 / 60:.1f} min' if DEEP_90 <= DEEP_STOP else 'not reached'


@pytest.fixture(scope='module')
def fake_runs(tmp_path_factory):
    """runs/ with a claims suite (baseline, no weight decay, flat, gru: 2 seeds each; no-clipping
    with a diverged-free pair), second-round levers on `best` at 10 epochs, and two `best` runs;
    compared by compare.py's command line, as make claims does."""
    runs = tmp_path_factory.mktemp('docs') / 'runs'
    claims_dir = runs / 'claims'
    for seed in (0, 1):
        finished_run(claims_dir, f'baseline-seed{seed}', seed, 0.45 + 0.01 * seed)
        finished_run(claims_dir, f'no-weight-decay-seed{seed}', seed, 0.30 + 0.01 * seed, weight_decay=0)
        finished_run(claims_dir, f'flat-seed{seed}', seed, 0.62 + 0.01 * seed, seq_layout='flat')
        finished_run(claims_dir, f'gru-seed{seed}', seed, 0.455 - 0.01 * seed, cell='gru')
    levers = runs / 'levers'
    sv = {'test_acc': 0.7, 'test_loss': 1.0, 'ece': 0.012}
    for seed in (0, 1, 2):
        finished_run(levers, f'base-s{seed}', seed, 0.72 + 0.005 * seed, preset='best', epochs=10,
                     single_view=sv, wall_time_s=360.0)
    finished_run(levers, 'gru-s0', 0, 0.76, preset='best', epochs=10, cell='gru', single_view=sv)
    for seed in (0, 1):
        finished_run(runs / 'calib', f'gru-s{seed}', seed, 0.75, preset='best', epochs=10, cell='gru',
                     single_view=sv, temperature=0.9)
    for seed in (0, 1):
        finished_run(runs, f'2026-best-seed{seed}', seed, 0.80 + 0.01 * seed, preset='best',
                     single_view={'test_acc': 0.795, 'test_loss': 0.7, 'ece': 0.03}, wall_time_s=2500.0)
    # A deep run the time budget stopped one epoch before its last; metrics.json without the 85% and
    # 90% times (as runs before those thresholds), so the table reads them from history.json.
    finished_run(runs / 'deep', 'deep-seed0', 0, 0.94, preset='deep', budget_stop_at=DEEP_STOP,
                 single_view={'test_acc': 0.93, 'test_loss': 0.3, 'ece': 0.04}, wall_time_s=3550.0)
    # compare.py's arguments for each folder of runs, as make claims and make docs give them.
    compare_args = [[str(claims_dir)], [str(levers), '--baseline', str(levers / 'base-s0')]]
    # The deep-levers screen: one view (no single_view), a short schedule of `deep`.
    deep_levers = runs / 'deep-levers'
    short = dict(subset=0.2, epochs=4, batch_size=256, lr=0.1, warmup_epochs=1, tta_translate=False, whiten=2,
                 crop='pad', val_views='test', readout='last')
    compare_args.append(deep_screen(deep_levers, short, ('deep', [0.60, 0.61], {}),
                                    ('no-whitening', [0.55, 0.55], {'whiten': 0})))
    # The second screen: the preset as it was on a short schedule, one variant changing the head. The
    # screens before the sixth pinned the last hidden state's readout when the preset took the mean.
    deep_levers_2 = runs / 'deep-levers-2'
    short = dict(subset=0.2, epochs=5, batch_size=256, lr=0.1, warmup_epochs=1, tta_translate=False,
                 readout='last')
    compare_args.append(deep_screen(deep_levers_2, short, ('deep', [0.65, 0.66], {}),
                                    ('flat', [0.70, 0.70], {'seq_layout': 'flat'})))
    # The third: the preset's weight decay against five times it (the preset holds the larger one).
    deep_weight_decay = runs / 'deep-weight-decay'
    compare_args.append(deep_screen(deep_weight_decay, dict(short, subset=0.5, epochs=6),
                                    ('deep', [0.79, 0.79], {'weight_decay': 5e-4}),
                                    ('weight-decay-2.5e-3', [0.80, 0.81], {'weight_decay': 2.5e-3})))
    # The fourth: the recurrent head of the preset as it is, on the second screen's schedule.
    deep_head = runs / 'deep-head'
    compare_args.append(deep_screen(deep_head, short, ('deep', [0.68, 0.68], {}),
                                    ('gru', [0.69, 0.70], {'cell': 'gru'})))
    # The fifth: the recurrent head against flat and the rows max-pooled.
    deep_head_2 = runs / 'deep-head-2'
    compare_args.append(deep_screen(deep_head_2, short, ('deep', [0.70, 0.70], {}),
                                    ('rowmax', [0.71, 0.72], {'seq_layout': 'rowmax'})))
    # The sixth: the mean readout against the last hidden state, on seeds of its own.
    deep_readout = runs / 'deep-readout'
    compare_args.append(deep_screen(deep_readout, short, ('deep', [0.70, 0.70], {}),
                                    ('mean', [0.72, 0.73], {'readout': 'mean'}), seeds=(3, 4)))
    # The seventh, eighth and ninth ran with the mean readout (the preset's since the sixth): airbench's
    # BatchNorm statistics, then its BatchNorm learning rates, then those again on seeds of their own.
    short = dict(short, readout='mean')
    bn_rates = {'bn_gamma_lr': 0, 'bn_beta_lr': 64}
    deep_bn = runs / 'deep-bn'
    compare_args.append(deep_screen(deep_bn, short, ('mean', [0.70, 0.70], {}),
                                    ('bn-airbench', [0.68, 0.69], {'bn_momentum': 0.4, 'bn_eps': 1e-12})))
    deep_bn_lr = runs / 'deep-bn-lr'
    compare_args.append(deep_screen(deep_bn_lr, short, ('deep', [0.70, 0.70], {}),
                                    ('bn-rates-airbench', [0.71, 0.72], bn_rates)))
    deep_bn_lr_2 = runs / 'deep-bn-lr-2'
    compare_args.append(deep_screen(deep_bn_lr_2, short, ('deep', [0.70, 0.70], {}),
                                    ('bn-rates-airbench', [0.69, 0.68], bn_rates), seeds=(3, 4)))
    deep_smoothing = runs / 'deep-smoothing'
    compare_args.append(deep_screen(deep_smoothing, dict(short, epochs=15), ('deep', [0.80, 0.80], {}),
                                    ('label-smoothing-0.2', [0.81, 0.82], {'label_smoothing': 0.2})))
    deep_overfit = runs / 'deep-overfit'
    compare_args.append(deep_screen(deep_overfit, dict(short, epochs=15), ('deep', [0.80, 0.80], {}),
                                    ('bn-rates-airbench', [0.79, 0.80], bn_rates),
                                    ('weight-decay-5e-3', [0.82, 0.82], {'weight_decay': 0.005})))
    deep_weight_decay_2 = runs / 'deep-weight-decay-2'
    compare_args.append(deep_screen(deep_weight_decay_2, dict(short, epochs=15), ('deep', [0.80, 0.81], {}),
                                    ('weight-decay-5e-3', [0.83, 0.84], {'weight_decay': 0.005}), seeds=(3, 4)))
    # The thirteenth: airbench's lookahead, at the 9:1 split the screens before the seventh version had.
    deep_lookahead = runs / 'deep-lookahead'
    compare_args.append(deep_screen(deep_lookahead, dict(short, epochs=15, val_fraction=0.1),
                                    ('deep', [0.78, 0.78], {}), ('lookahead-5', [0.77, 0.78], {'lookahead': 5})))
    procs = [subprocess.Popen([sys.executable, 'compare.py', *args], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for args in compare_args]
    for proc in procs:      # all at once on 2 cores: minutes if the machine is busy with a sweep
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    return runs


def test_the_tables_are_rewritten_from_run_folders_between_their_markers(fake_runs, tmp_path, capsys):
    root = copy_of_the_pages(tmp_path)
    before = {p: (root / p).read_text(encoding='utf-8') for p in ('README.md', 'docs/claims.md', 'docs/results.md')}

    changed = tables.apply(tables.plan(fake_runs, 'abc1234', root=root), root=root, log=print)
    figures = {'docs/claims_test_accuracy.png': 'claims/comparison/test_accuracy.png',
               'docs/claims_val_accuracy.png': 'claims/comparison/val_accuracy.png'}
    figures.update({tables.screen_figure(name): f'{name}/comparison/test_accuracy.png'
                    for name in tables.LEVER_SCREENS})
    assert figures['docs/deep_head_test_accuracy.png'] == 'deep-head/comparison/test_accuracy.png'
    assert sorted(changed) == sorted(['README.md', 'docs/claims.md', 'docs/results.md', *figures])
    assert ': kept' not in capsys.readouterr().out
    for page, source in figures.items():      # compare.py's figures of the same runs, copied
        assert (root / page).read_bytes() == (fake_runs / source).read_bytes()
    readme, claims, results = ((root / p).read_text(encoding='utf-8')
                               for p in ('README.md', 'docs/claims.md', 'docs/results.md'))
    # Only the text between the markers changed.
    for page, text in (('README.md', readme), ('docs/claims.md', claims), ('docs/results.md', results)):
        outside = re.sub(r'<!-- docs/tables.py: begin (\S+) -->.*?<!-- docs/tables.py: end \1 -->', '', text,
                         flags=re.S)
        assert outside == re.sub(r'<!-- docs/tables.py: begin (\S+) -->.*?<!-- docs/tables.py: end \1 -->',
                                 '', before[page], flags=re.S)

    calibration = tables.read_block(results, 'calibration', 'docs/results.md')
    assert '`.venv/bin/python main.py --preset best --epochs 10 --cell gru --seed S` | 2 (0, 1)' in calibration
    assert '| 0.900 ± 0.000 |' in calibration

    headline = tables.read_block(readme, 'headline', 'README.md')
    assert "| reference (the method's report) |" in headline and '37.01%' in headline
    assert ('| `fast` | `.venv/bin/python main.py --preset fast --subset 0.4 --max-hours 1 --seed S` '
            '| 45.50% ± 0.71 |') in headline
    assert '| `best` | `.venv/bin/python main.py --preset best --max-hours 1 --seed S` | 80.50% ± 0.71 |' in headline
    assert '41.7 min | 2 (0, 1) | abc1234 |' in headline

    claims_table = tables.read_block(claims, 'claims', 'docs/claims.md')
    assert claims_table.startswith("Baseline (the method's `fast` protocol, unchanged): 45.50% ± 0.71 over 2 "
                                   'seeds. Measured at abc1234, by `make claims`; generated from `')
    assert '251fa83' not in claims_table
    # Welch with df 2 and Holm over the three variants (p 0.0022, 0.0017, 0.553): compare.py's numbers.
    assert ('| L2 weight decay: about +3% validation accuracy | `--set weight_decay=0` | 30.50% ± 0.71 (2 seeds), '
            '-15.00 points (95% CI -18.04 to -11.96), worse (p = 0.002, Holm-adjusted 0.005) | holds |') in claims_table
    assert ('| `--seq-layout flat` | 62.50% ± 0.71 (2 seeds), +17.00 points (95% CI +13.96 to +20.04), better '
            '(p = 0.002, Holm-adjusted 0.005)') in claims_table
    assert 'does not hold: reversed (better)' in claims_table
    assert '| gradient clipping: no NaN divergence | `--set clip=0` | not run | - |' in claims_table
    cells = tables.read_block(claims, 'cells', 'docs/claims.md')
    assert ('| `gru` | 2 | 45.00% ± 0.71 | 45.50, 44.50 | -0.50 points (95% CI -3.54 to +2.54), within noise '
            '(p = 0.553, Holm-adjusted 0.553) |') in cells
    assert '`lstm`' not in cells

    levers = tables.read_block(results, 'levers', 'docs/results.md')
    assert ('| base: `best` | `.venv/bin/python main.py --preset best --epochs 10 --seed S` | 3 '
            '| 72.50% ± 0.50 (72.00, 72.50, 73.00) |') in levers
    assert ('| cell=gru | `.venv/bin/python main.py --preset best --epochs 10 --cell gru --seed S` | 1 '
            '| 76.00% (76.00) |') in levers
    assert '/ 0.012 | 6.0 min |' in levers and '+3.50 points (1 seed)' in levers
    assert '| ECE views averaged / single view |' in levers
    deep_levers = tables.read_block(results, 'deep-levers', 'docs/results.md')
    assert deep_levers.startswith('Measured at abc1234; generated from `')
    assert '| ECE | wall time |' in deep_levers and 'single view' not in deep_levers
    assert ('| base: `deep` | `.venv/bin/python main.py --preset deep --epochs 4 --batch-size 256 --lr 0.1 '
            '--set warmup_epochs=1 --subset 0.2 --set readout=last --set crop=pad --set tta_translate=false '
            '--set val_views=test --set whiten=2 --seed S` | 2 '
            '| 60.50% ± 0.71 (60.00, 61.00) |') in deep_levers, deep_levers
    assert '| whiten=0 | ' in deep_levers and '| 55.00% ± 0.00 (55.00, 55.00) |' in deep_levers
    deep_levers_2 = tables.read_block(results, 'deep-levers-2', 'docs/results.md')
    assert ('| base: `deep` | `.venv/bin/python main.py --preset deep --epochs 5 --batch-size 256 --lr 0.1 '
            '--set warmup_epochs=1 --subset 0.2 --set readout=last --set tta_translate=false --seed S` | 2 '
            '| 65.50% ± 0.71 (65.00, 66.00) |') in deep_levers_2, deep_levers_2
    assert ('| seq_layout=flat | `.venv/bin/python main.py --preset deep --epochs 5 --batch-size 256 --lr 0.1 '
            '--set warmup_epochs=1 --seq-layout flat --subset 0.2 --set readout=last --set tta_translate=false '
            '--seed S` | 2 | 70.00% ± 0.00 (70.00, 70.00) |') in deep_levers_2, deep_levers_2
    # One variant row of each later screen, and its difference from the base.
    for screen, row, change in (
            ('deep-weight-decay',
             '| weight_decay=0.0025 | `.venv/bin/python main.py --preset deep --epochs 6 --batch-size 256 --lr 0.1 '
             '--set warmup_epochs=1 --subset 0.5 --set readout=last --set tta_translate=false --seed S` | 2 '
             '| 80.50% ± 0.71 (80.00, 81.00) |', '+1.50 points'),
            ('deep-head',
             '| cell=gru | `.venv/bin/python main.py --preset deep --epochs 5 --batch-size 256 --lr 0.1 '
             '--set warmup_epochs=1 --subset 0.2 --cell gru --set readout=last --set tta_translate=false '
             '--seed S` | 2 | 69.50% ± 0.71 (69.00, 70.00) |', '+1.50 points'),
            ('deep-head-2',
             '| seq_layout=rowmax | `.venv/bin/python main.py --preset deep --epochs 5 --batch-size 256 --lr 0.1 '
             '--set warmup_epochs=1 --seq-layout rowmax --subset 0.2 --set readout=last --set tta_translate=false '
             '--seed S` | 2 | 71.50% ± 0.71 (71.00, 72.00) |', '+1.50 points'),
            ('deep-readout',
             '| readout=mean | `.venv/bin/python main.py --preset deep --epochs 5 --batch-size 256 --lr 0.1 '
             '--set warmup_epochs=1 --subset 0.2 --set tta_translate=false --seed S` | 2 | '
             '72.50% ± 0.71 (72.00, 73.00) |', '+2.50 points'),
            ('deep-bn-lr',
             '| bn_gamma_lr=0, bn_beta_lr=64 | `.venv/bin/python main.py --preset deep --epochs 5 --batch-size 256 '
             '--lr 0.1 --set warmup_epochs=1 --subset 0.2 --set tta_translate=false --set bn_gamma_lr=0 '
             '--set bn_beta_lr=64 --seed S` | 2 | 71.50% ± 0.71 (71.00, 72.00) |', '+1.50 points'),
            ('deep-bn-lr-2',
             '| bn_gamma_lr=0, bn_beta_lr=64 | `.venv/bin/python main.py --preset deep --epochs 5 --batch-size 256 '
             '--lr 0.1 --set warmup_epochs=1 --subset 0.2 --set tta_translate=false --set bn_gamma_lr=0 '
             '--set bn_beta_lr=64 --seed S` | 2 | 68.50% ± 0.71 (69.00, 68.00) |', '-1.50 points'),
            ('deep-smoothing',
             '| label_smoothing=0.2 | `.venv/bin/python main.py --preset deep --epochs 15 --batch-size 256 '
             '--lr 0.1 --set warmup_epochs=1 --subset 0.2 --set label_smoothing=0.2 --set tta_translate=false '
             '--seed S` | 2 | 81.50% ± 0.71 (81.00, 82.00) |', '+1.50 points'),
            ('deep-overfit',
             '| weight_decay=0.005 | `.venv/bin/python main.py --preset deep --epochs 15 --batch-size 256 '
             '--lr 0.1 --set warmup_epochs=1 --set weight_decay=0.005 --subset 0.2 --set tta_translate=false '
             '--seed S` | 2 | 82.00% ± 0.00 (82.00, 82.00) |', '+2.00 points'),
            ('deep-weight-decay-2',
             '| weight_decay=0.005 | `.venv/bin/python main.py --preset deep --epochs 15 --batch-size 256 '
             '--lr 0.1 --set warmup_epochs=1 --set weight_decay=0.005 --subset 0.2 --set tta_translate=false '
             '--seed S` | 2 | 83.50% ± 0.71 (83.00, 84.00) |', '+3.00 points'),
            ('deep-lookahead',
             '| lookahead=5 | `.venv/bin/python main.py --preset deep --epochs 15 --batch-size 256 '
             '--lr 0.1 --set warmup_epochs=1 --subset 0.2 --set val_fraction=0.1 --set lookahead=5 '
             '--set tta_translate=false --seed S` | 2 | 77.50% ± 0.71 (77.00, 78.00) |', '-0.50 points')):
        block = tables.read_block(results, screen, 'docs/results.md')
        assert row in block and change in block, (screen, block)
    # The eleventh screen's other variant (airbench's BatchNorm rates) is below the base.
    deep_overfit = tables.read_block(results, 'deep-overfit', 'docs/results.md')
    assert '-0.50 points' in deep_overfit, deep_overfit
    deep_bn = tables.read_block(results, 'deep-bn', 'docs/results.md')
    assert '| base: `deep` | ' in deep_bn and '--set readout' not in deep_bn, deep_bn     # the preset's mean
    assert '| bn_momentum=0.4, bn_eps=1e-12 | ' in deep_bn and '-1.50 points' in deep_bn, deep_bn
    best = tables.read_block(results, 'best-runs', 'docs/results.md')
    assert best.startswith('Generated from the `best` runs under') and 'Seed 0: measured at' not in best
    assert '| 0 | 80.00% | 79.50% |' in best and '| 1 | 81.00% | 79.50% |' in best
    assert '| mean | **80.50% ± 0.71** | 79.50% |' in best
    deep = tables.read_block(results, 'deep-runs', 'docs/results.md')
    assert DEEP_85 <= DEEP_STOP, 'the fake run must pass 85% before its stop'
    assert (f'| 0 | 94.00% | 93.00% | ' in deep
            and f'| 59.2 min | {DEEP_STOP} of {DEEP_EPOCHS}, time budget | {20 * DEEP_85 / 60:.1f} min | {DEEP_90_CELL} '
                f'| {DEEP_STOP}, {100 * 0.94 * DEEP_STOP / DEEP_EPOCHS:.2f}% | abc1234 |' in deep), deep
    assert 'validation 85% reached | validation 90% reached' in deep

    # Run again: nothing changes, even at a later commit (the same runs keep the commit they were
    # measured at); a block whose runs changed takes the new one.
    assert tables.apply(tables.plan(fake_runs, 'abc1234', root=root), root=root, log=lambda _: None) == []
    assert tables.apply(tables.plan(fake_runs, 'fff9999', root=root), root=root, log=lambda _: None) == []
    assert 'fff9999' not in (root / 'docs/results.md').read_text(encoding='utf-8')


def test_a_block_made_again_from_the_same_runs_keeps_its_commit():
    stored = 'Measured at abc1234; generated from `runs/x`.\n\n| lever | acc |\n| --- | --- |\n| a | 1% |'
    assert tables.with_earlier_commits(stored.replace('abc1234', 'fff9999'), stored) == stored
    changed = stored.replace('abc1234', 'fff9999').replace('1%', '2%')
    assert tables.with_earlier_commits(changed, stored) == changed
    # A table with a commit column: the unchanged row keeps its commit, the changed one takes the new.
    header = '| seed | acc | measured at |\n| --- | --- | --- |\n'
    stored = 'Generated.\n\n' + header + '| 0 | 88.52% | cbf94df (re-measure) |\n| 1 | 89.00% | 08486c4 |'
    made = 'Generated.\n\n' + header + '| 0 | 88.52% | fff9999 |\n| 1 | 90.00% | fff9999 |'
    assert tables.with_earlier_commits(made, stored).splitlines()[-2:] == [
        '| 0 | 88.52% | cbf94df (re-measure) |', '| 1 | 90.00% | fff9999 |']
    # Without a commit column a row's last cell is a figure: a changed one is never taken back.
    stored = 'Generated.\n\n| lever | against |\n| --- | --- |\n| a | +1.00 |'
    made = 'Generated.\n\n| lever | against |\n| --- | --- |\n| a | +2.00 |'
    assert tables.with_earlier_commits(made, stored) == made


def test_every_lever_screen_has_its_sweep_block_and_figure():
    # Every sweep file but the claims suite's (docs/claims.md) is a screen whose table is on the page.
    assert sorted(p.stem for p in (REPO_ROOT / 'sweeps').glob('*.json') if p.stem != 'claims') == sorted(
        tables.LEVER_SCREENS)
    results = (DOCS / 'results.md').read_text(encoding='utf-8')
    for name in tables.LEVER_SCREENS:
        assert (REPO_ROOT / 'sweeps' / f'{name}.json').is_file(), name
        tables.read_block(results, name, 'docs/results.md')
        assert (REPO_ROOT / tables.screen_figure(name)).is_file(), name
        assert f'({tables.screen_figure(name)[len("docs/"):]})' in results, name


def test_a_seed_without_a_run_here_keeps_its_row_and_counts_in_the_mean(tmp_path):
    # Each session's machine starts without the earlier run folders: a deep row measured before
    # (seed 0) stays, the run here (seed 1) adds its row, the mean is over both; an old mean row
    # and a row of another table's shape are not kept.
    root = copy_of_the_pages(tmp_path)
    header = tables.preset_runs_header('flip and shifts', ('0.85', '0.90'))
    stored = [['0', '88.52%', '87.37%', '0.022', '0.054', '54.9 min', '16', '37.3 min', 'not reached',
               '16, 88.06%', 'cbf94df'],
              ['mean', '**70.00% ± 1.00**', '70.00%', '0.500', '0.500', '', '', '', '', '', ''],
              ['7', 'a row of an older table', '-']]
    results = root / 'docs' / 'results.md'
    results.write_text(tables.write_block(results.read_text(encoding='utf-8'), 'deep-runs',
                                          'Before.\n\n' + tables.table(header, stored), 'docs/results.md'),
                       encoding='utf-8')
    runs = tmp_path / 'runs'
    finished_run(runs, 'deep-seed1', 1, 0.90, preset='deep', wall_time_s=3300.0,
                 single_view={'test_acc': 0.89, 'test_loss': 0.3, 'ece': 0.040})
    tables.apply(tables.plan(runs, 'def5678', root=root), root=root, log=lambda _: None)
    deep = tables.read_block(results.read_text(encoding='utf-8'), 'deep-runs', 'docs/results.md')
    body = tables.table_rows(deep)
    assert [r[0] for r in body] == ['0', '1', 'mean'], deep
    assert body[0] == stored[0]
    assert body[1][:3] == ['1', '90.00%', '89.00%'] and body[1][-1] == 'def5678'
    ece_1 = float(body[1][3])
    assert body[2][:5] == ['mean', f'**{tables.mean_pm([0.8852, 0.90])}**', '88.19%',
                           f'{(0.022 + ece_1) / 2:.3f}', f'{(0.054 + 0.040) / 2:.3f}'], deep
    assert 'the rows of the other seeds are those measured before' in deep
    assert 'a row of an older table' not in deep

    # A run of seed 0 here replaces the stored row; then the table says it is all from runs/.
    finished_run(runs, 'deep-seed0', 0, 0.91, preset='deep', wall_time_s=3300.0,
                 single_view={'test_acc': 0.90, 'test_loss': 0.3, 'ece': 0.040})
    tables.apply(tables.plan(runs, 'def5678', root=root), root=root, log=lambda _: None)
    deep = tables.read_block(results.read_text(encoding='utf-8'), 'deep-runs', 'docs/results.md')
    assert [r[:2] for r in tables.table_rows(deep)][:2] == [['0', '91.00%'], ['1', '90.00%']]
    assert '88.52%' not in deep and 'measured before' not in deep


def test_a_run_that_records_its_commits_is_stamped_with_them(tmp_path):
    root = copy_of_the_pages(tmp_path)
    runs = tmp_path / 'runs'
    recorded = finished_run(runs, 'deep-seed5', 5, 0.90, preset='deep', wall_time_s=3300.0,
                            single_view={'test_acc': 0.89, 'test_loss': 0.3, 'ece': 0.040})
    older = finished_run(runs, 'deep-seed6', 6, 0.91, preset='deep', wall_time_s=3300.0,
                         single_view={'test_acc': 0.89, 'test_loss': 0.3, 'ece': 0.040})
    metrics = json.loads((recorded / 'metrics.json').read_text())
    runfiles.write_json(recorded / 'metrics.json', dict(metrics, code_commits=['1111111', '2222222+changes']))
    tables.apply(tables.plan(runs, 'abc1234', root=root), root=root, log=lambda _: None)
    deep = tables.read_block((root / 'docs/results.md').read_text(encoding='utf-8'), 'deep-runs', 'docs/results.md')
    rows = {r[0]: r for r in tables.table_rows(deep)}
    assert rows['5'][-1] == '1111111, 2222222+changes' and rows['6'][-1] == 'abc1234', deep
    # A comparison's block names its runs' commits only if every run records them.
    assert tables.comparison_commits({'variants': [{'runs': [{'path': str(recorded)}]}]}) == (
        '1111111, 2222222+changes')
    assert tables.comparison_commits({'variants': [{'runs': [{'path': str(recorded)}, {'path': str(older)}]}]}) is None


def test_a_page_without_its_markers_or_a_bad_comparison_is_one_sentence(fake_runs, tmp_path, capsys):
    root = copy_of_the_pages(tmp_path)
    text = (root / 'docs/claims.md').read_text(encoding='utf-8')
    (root / 'docs/claims.md').write_text(text.replace('<!-- docs/tables.py: end claims -->', ''), encoding='utf-8')
    with pytest.raises(tables.SourceError, match='docs/claims.md must hold the markers'):
        tables.apply(tables.plan(tmp_path / 'none', 'x', root=root), root=root, log=lambda _: None)

    runs = tmp_path / 'runs'
    (runs / 'claims' / 'comparison').mkdir(parents=True)
    (runs / 'claims' / 'comparison' / 'comparison.json').write_text('{"variants": 3}', encoding='utf-8')
    assert tables.main(['--runs', str(runs), '--check']) == 2
    assert 'is not a comparison.json written by compare.py' in capsys.readouterr().err

    for empty in ('', ' '):                 # --runs "$RUNS" with RUNS unset: refused, nothing read
        assert tables.main(['--runs', empty]) == 2
        err = capsys.readouterr().err.strip()
        assert err == ('docs/tables.py: --runs is empty; give the folder holding the run folders, '
                       'e.g. --runs runs'), err


def test_a_run_that_fitted_its_epochs_to_the_budget_counts_as_its_presets(tmp_path):
    """deep's fit_epochs writes the epochs that fit the hour (12 of at most 20) into config.json: the
    run is still the preset's, and its epochs cell says they were fitted; the same epochs without
    fit_epochs, or with another key --set, are another setting."""
    presets = config.load_presets()
    most = presets['deep'].epochs
    finished_run(tmp_path, 'fitted', 0, 0.88, preset='deep', epochs=most - 8)
    finished_run(tmp_path, 'fixed', 1, 0.88, preset='deep', epochs=most - 8, fit_epochs=False)
    finished_run(tmp_path, 'longer', 2, 0.88, preset='deep', epochs=most + 1)
    # main.py --preset deep --epochs 18 (no --max-hours): the same config.json, but no budget chose
    # its epochs (metrics.json's time_budgets_h says so); one given a budget, then resumed without.
    finished_run(tmp_path, 'fixed-no-budget', 3, 0.88, preset='deep', epochs=most - 8, time_budgets_h=[None])
    finished_run(tmp_path, 'fitted-recorded', 4, 0.88, preset='deep', epochs=most - 8, time_budgets_h=[1.0, None])
    # --preset deep --max-hours 1 --set val_fraction=0.1: fitted too, but another setting (the sixth
    # version's 9:1 split), so not one of the preset's rows.
    assert presets['deep'].val_fraction != 0.1
    finished_run(tmp_path, 'other-share', 5, 0.89, preset='deep', epochs=most - 4, val_fraction=0.1,
                 time_budgets_h=[1.0])
    runs = tables.finished_runs(tmp_path, 'abc1234')
    assert [r['path'].name for r in tables.runs_of_preset(runs, 'deep', presets)] == ['fitted', 'fitted-recorded']
    fitted = next(r for r in runs if r['path'].name == 'fitted')
    assert tables.epochs_text(fitted['metrics'], fitted['config']) == f'{most - 8}, fitted to the budget'
