"""Tests of runfiles.py, the run-folder contract: atomic writes, safe reads, the run-folder lock and
`latest`, the typed records, status(folder), read_run(folder), and run folders of earlier versions."""
import ast
import errno
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import compare
import main
import runfiles
import viz
from conftest import (REPO_ROOT, SMOKE, arrays, assert_valid_png, make_cifar_archive, make_run_folder,
                      write_checkpoint)
from runfiles import RecordError, RunFileError


def test_write_atomic_gives_normal_permissions_and_replaces_whole_files(tmp_path):
    path = tmp_path / 'a.json'
    runfiles.write_json(path, {'x': np.float32(1.5), 'y': np.arange(3)})
    assert json.loads(path.read_text()) == {'x': 1.5, 'y': [0, 1, 2]}
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    runfiles.write_text(path, 'new')
    assert path.read_text() == 'new' and os.listdir(tmp_path) == ['a.json']


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / 'x.npz'
    runfiles.write_npz(path, {'a': np.ones(3)})
    before = path.read_bytes()

    def fail(fd):
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(runfiles.os, 'fsync', fail)
    with pytest.raises(RunFileError, match=f'no space left to write {path}'):
        runfiles.write_npz(path, {'a': np.zeros(3)})
    assert path.read_bytes() == before and os.listdir(tmp_path) == ['x.npz']


@pytest.mark.parametrize('code, words', [
    (errno.ENOSPC, 'no space left'), (errno.EROFS, 'read-only'), (errno.EACCES, 'permission'),
    (errno.ENOTDIR, 'is a file, not a folder'), (errno.EISDIR, 'is a folder, not a file'),
    (errno.ENOENT, 'does not exist'), (errno.EIO, 'check the path'),
])
def test_os_errors_become_one_sentence_with_the_path(code, words):
    text = runfiles.describe_os_error(OSError(code, os.strerror(code)), '/some/where/file.json')
    assert words in text and '/some/where/file.json' in text and '\n' not in text


def test_read_npz_turns_every_damage_into_one_error(tmp_path):
    good = tmp_path / 'good.npz'
    runfiles.write_npz(good, {'a': np.arange(1000, dtype=np.float32), 'b': np.ones(5)})
    assert set(runfiles.read_npz(good)) == {'a', 'b'}
    data = good.read_bytes()
    truncated = tmp_path / 'truncated.npz'
    truncated.write_bytes(data[:len(data) // 2])
    flipped = tmp_path / 'flipped.npz'
    raw = bytearray(data)
    with zipfile.ZipFile(good) as z:     # a bit inside the stored array 'a': only the CRC notices
        info = z.getinfo('a.npy')
    raw[info.header_offset + 30 + len(info.filename) + 400] ^= 0x10
    flipped.write_bytes(bytes(raw))
    text = tmp_path / 'text.npz'
    text.write_text('hello')
    pickled = tmp_path / 'pickled.npz'
    np.savez(pickled, obj=np.array([{'a': 1}], dtype=object))
    for path in (truncated, flipped, text, pickled):
        with pytest.raises(RunFileError, match='corrupt or truncated'):
            runfiles.read_npz(path)
    with pytest.raises(RunFileError, match='does not exist'):
        runfiles.read_npz(tmp_path / 'missing.npz')
    with pytest.raises(RunFileError, match='does not exist or is not a file'):
        runfiles.read_npz(tmp_path)


def test_read_json_errors_name_the_file(tmp_path):
    bad = tmp_path / 'bad.json'
    bad.write_text('{"a": ')
    with pytest.raises(RunFileError, match=f'{bad} is not valid JSON'):
        runfiles.read_json(bad)
    binary = tmp_path / 'bin.json'
    binary.write_bytes(b'\xff\xfe\x00')
    with pytest.raises(RunFileError, match='not valid JSON'):
        runfiles.read_json(binary)
    with pytest.raises(RunFileError, match='does not exist'):
        runfiles.read_json(tmp_path / 'nope.json')


def test_the_lock_names_its_holder_and_dies_with_it(tmp_path):
    holder = subprocess.Popen([sys.executable, '-c',
                               'import sys, time, runfiles; '
                               f'runfiles.RunFolderLock({str(tmp_path)!r}, "holder.py").acquire(); '
                               'print("locked", flush=True); time.sleep(60)'],
                              stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(runfiles.__file__))
    try:
        assert holder.stdout.readline().strip() == 'locked'
        lock = runfiles.RunFolderLock(tmp_path, 'test')
        with pytest.raises(RunFileError, match=rf'in use by holder.py \(pid {holder.pid}\)'):
            lock.acquire()
        assert lock.acquire(busy_ok=True) is False
        before = (tmp_path / '.lock').read_bytes()
        assert runfiles.folder_in_use(tmp_path) is True
        assert (tmp_path / '.lock').read_bytes() == before       # probing writes nothing
    finally:
        holder.kill()
        holder.wait()
    assert runfiles.folder_in_use(tmp_path) is False
    with runfiles.RunFolderLock(tmp_path, 'test'):
        pass


def test_taking_the_lock_removes_only_our_stale_temporary_files(tmp_path):
    (tmp_path / 'figures').mkdir()
    ours = ('ckpt.npz.tmp-abc_1234', 'figures/tsne.png.tmp-x1y2z3w4', 'history.json.tmp-00000000')
    users = ('keep.json', 'notes.tmp-keep', 'notes.tmp-abcd1234', 'figures/draft.tmp-1',
             'ckpt.npz.tmp-short', 'figures/config.json.tmp-abcd1234', 'config.json.tmp-ABCD1234')
    for name in ours + users:
        (tmp_path / name).write_text('x')
    with runfiles.RunFolderLock(tmp_path, 'test'):
        pass
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob('*')) == sorted(
        ('.lock', 'figures') + users)


def test_write_atomic_temporaries_are_recognised_as_ours(tmp_path, monkeypatch):
    seen = []
    real = runfiles.os.replace
    monkeypatch.setattr(runfiles.os, 'replace', lambda a, b: (seen.append(Path(a).name), real(a, b)))
    runfiles.write_json(tmp_path / 'metrics.json', {'a': 1})
    (tmp_path / 'figures').mkdir()
    runfiles.write_text(tmp_path / 'figures' / 'tsne.png', 'x')
    assert runfiles.is_own_temp_file(seen[0]) and runfiles.is_own_temp_file(seen[1], in_figures=True)


def test_json_written_is_strict(tmp_path):
    runfiles.write_json(tmp_path / 'a.json', {'nan': float('nan'), 'inf': np.float32('inf'),
                                              'arr': np.array([1.0, np.nan])})
    text = (tmp_path / 'a.json').read_text()
    assert 'NaN' not in text and 'Infinity' not in text
    assert json.loads(text) == {'nan': None, 'inf': None, 'arr': [1.0, None]}


@pytest.mark.parametrize('kind', ['fifo', 'folder', 'device'])
def test_reading_something_that_is_not_a_file_is_refused_without_blocking(tmp_path, kind):
    path = tmp_path / 'history.json'
    if kind == 'fifo':
        os.mkfifo(path)
    elif kind == 'folder':
        path.mkdir()
    else:
        path.symlink_to('/dev/zero')
    for call in (lambda: runfiles.read_json(path), lambda: runfiles.read_npz(path),
                 lambda: runfiles.append_line(path, 'x')):
        with pytest.raises(runfiles.RunFileError, match='not a regular file|is a folder|not a file'):
            call()


def test_latest_follows_runs_but_never_replaces_a_users_file(tmp_path):
    runs = tmp_path / 'runs'
    (runs / 'a').mkdir(parents=True)
    (runs / 'b').mkdir()
    runfiles.point_latest_at(runs / 'a')
    assert os.readlink(runs / 'latest') == 'a'
    runfiles.point_latest_at(runs / 'latest')          # through the link: still the real folder
    assert os.readlink(runs / 'latest') == 'a'
    runfiles.point_latest_at(runs / 'b')
    assert os.readlink(runs / 'latest') == 'b'
    (runs / 'latest').unlink()
    (runs / 'latest').write_text('mine')
    warnings = []
    runfiles.point_latest_at(runs / 'a', warn=warnings.append)
    assert (runs / 'latest').read_text() == 'mine' and len(warnings) == 1
    assert sorted(os.listdir(runs)) == ['a', 'b', 'latest']


def test_resolve_folder_names_every_kind_of_bad_path(tmp_path):
    (tmp_path / 'run').mkdir()
    (tmp_path / 'file').write_text('x')
    os.symlink('run', tmp_path / 'latest')
    os.symlink('gone', tmp_path / 'dangling')
    os.symlink('loop2', tmp_path / 'loop1')
    os.symlink('loop1', tmp_path / 'loop2')
    assert runfiles.resolve_folder(tmp_path / 'latest', 'hint') == (tmp_path / 'run').resolve()
    for given, words in [('', 'empty path'), (' ', 'empty path'), (tmp_path / 'file', 'is not a folder'),
                         (tmp_path / 'missing', 'does not exist'), (tmp_path / 'dangling', 'link to gone'),
                         (tmp_path / 'loop1', 'loop of links')]:
        with pytest.raises(RunFileError, match=f'{words}.*; pass a folder'):
            runfiles.resolve_folder(given, 'pass a folder')


@pytest.mark.parametrize('kind', ['fifo', 'folder'])
def test_a_lock_file_that_is_not_a_file_is_refused_without_blocking(tmp_path, kind):
    lock = tmp_path / runfiles.LOCK_NAME
    os.mkfifo(lock) if kind == 'fifo' else lock.mkdir()
    with pytest.raises(RunFileError, match=r'\.lock'):
        runfiles.folder_in_use(tmp_path)
    with pytest.raises(RunFileError, match=r'\.lock'):
        runfiles.RunFolderLock(tmp_path, 'test').acquire()


# --------------------------------------------------------------------------
# status(folder): one vocabulary
# --------------------------------------------------------------------------

def fake_checkpoint(path, epoch, epochs):
    """A ckpt.npz with just the metadata status() reads (the arrays are main.py's business)."""
    write_checkpoint(Path(path).parent, {'epochs': epochs}, epoch)


@pytest.mark.parametrize('files, state', [
    ({}, runfiles.NEW),
    ({'ckpt.npz': (1, 3)}, runfiles.STOPPED),
    ({'ckpt.npz': (1, 3), 'metrics.json': '{}', 'predictions.npz': b''}, runfiles.STOPPED),
    ({'ckpt.npz': (3, 3)}, runfiles.NEEDS_EVALUATION),
    ({'ckpt.npz': (3, 3), 'metrics.json': '{}'}, runfiles.NEEDS_EVALUATION),
    ({'ckpt.npz': (3, 3), 'metrics.json': '{}', 'predictions.npz': b''}, runfiles.FINISHED),
    ({'ckpt.npz': (2, 3), 'diverged.json': '{"message": "the loss became nan"}'}, runfiles.DIVERGED),
    ({'train.log': 'x', 'config.json': '{}'}, runfiles.DAMAGED),
    ({'ckpt.npz': b'not a zip'}, runfiles.DAMAGED),
    ({'ckpt.npz': (3, 3), 'metrics.json': 'fifo', 'predictions.npz': b''}, runfiles.DAMAGED),
])
def test_status_of_a_run_folder(tmp_path, files, state):
    run = tmp_path / 'run'
    run.mkdir()
    for name, content in files.items():
        if isinstance(content, tuple):
            fake_checkpoint(run / name, *content)
        elif content == 'fifo':
            os.mkfifo(run / name)
        else:
            (run / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    got = runfiles.status(run)
    assert got.state == state, got
    assert (got.reason != '') == (state in (runfiles.DAMAGED, runfiles.DIVERGED))
    assert got.resumable == (state in (runfiles.STOPPED, runfiles.NEEDS_EVALUATION))


def test_status_follows_links_and_sees_the_lock(tmp_path):
    assert runfiles.status(tmp_path / 'not-yet').state == runfiles.NEW
    run = tmp_path / 'run'
    run.mkdir()
    fake_checkpoint(run / 'ckpt.npz', 1, 2)
    (tmp_path / 'latest').symlink_to('run')
    assert runfiles.status(tmp_path / 'latest').state == runfiles.STOPPED
    with runfiles.RunFolderLock(run, 'test'):
        assert runfiles.status(tmp_path / 'latest').state == runfiles.IN_USE
    (tmp_path / 'file').write_text('x')
    assert runfiles.status(tmp_path / 'file').state == runfiles.DAMAGED


def test_a_single_array_file_is_not_an_npz(tmp_path):
    with open(tmp_path / 'ckpt.npz', 'wb') as f:
        np.save(f, np.zeros(3))
    for read in (runfiles.read_npz, runfiles.checkpoint_meta):
        with pytest.raises(RunFileError, match='single array'):
            read(tmp_path / 'ckpt.npz')


@pytest.mark.parametrize('files, state', [
    ({'ckpt': 3, 'metrics': True, 'predictions': True, 'crashed': True}, runfiles.FINISHED),
    ({'ckpt': 1, 'crashed': True}, runfiles.STOPPED),
    ({'ckpt': 3, 'crashed': True}, runfiles.NEEDS_EVALUATION),
    ({'crashed': True}, runfiles.DAMAGED),
    ({'metrics': True, 'predictions': True}, runfiles.FINISHED),
    ({'metrics': True, 'predictions': True, 'stopped_early': True}, runfiles.DAMAGED),
    ({'ckpt': 1, 'diverged': True, 'crashed': True}, runfiles.DIVERGED),
])
def test_status_of_crashed_and_checkpointless_runs(tmp_path, files, state):
    """A crash leaves the state to the other files (with the record attached); a folder whose
    checkpoint is gone is finished if it holds an evaluation of a run that was not stopped early."""
    run = make_run_folder(tmp_path, 'run', epochs=3, evaluated=False, stopped_early=files.get('stopped_early', False),
                          crashed='ValueError: boom' if files.get('crashed') else None,
                          diverged='the loss became nan at epoch 2, step 1 (lr 0.02); ...' if files.get('diverged')
                          else None)
    if 'ckpt' in files:
        write_checkpoint(run, runfiles.read_config(run) | {'epochs': 3}, files['ckpt'])
    if files.get('metrics'):
        done = make_run_folder(tmp_path, 'evaluated', stopped_early=files.get('stopped_early', False))
        for name in (runfiles.METRICS_NAME, runfiles.PREDICTIONS_NAME):
            shutil.copy(done / name, run / name)
    got = runfiles.status(run)
    assert got.state == state, got
    assert (got.crash is not None) == bool(files.get('crashed'))
    if got.crash is not None:
        assert got.crash.message == 'ValueError: boom' and got.crash.during == 'training'
    if state == runfiles.DAMAGED:
        assert got.file == run / runfiles.CHECKPOINT_NAME and 'start the run again in a new folder' in got.reason
    if state == runfiles.DIVERGED:
        assert got.divergence.summary == 'the loss became nan at epoch 2, step 1 (lr 0.02)'


@pytest.mark.parametrize('name, content, words', [
    ('crashed.json', '{"during": "training"}', "crashed.json has 'message' = None, which is not a text"),
    ('crashed.json', '[1]', 'crashed.json is not a JSON object'),
    ('diverged.json', '{"message": "x", "step": -1}', "diverged.json has 'step' = -1"),
    ('diverged.json', '{"message": "x"', 'diverged.json is not valid JSON'),
])
def test_an_unreadable_record_makes_the_folder_damaged_with_the_file_named(tmp_path, name, content, words):
    run = make_run_folder(tmp_path, 'run', ckpt=True)
    (run / name).write_text(content)
    got = runfiles.status(run)
    assert got.state == runfiles.DAMAGED and words in got.reason and got.file == run / name, got


# --------------------------------------------------------------------------
# The typed records
# --------------------------------------------------------------------------

def test_every_record_reads_back_what_it_wrote(tmp_path):
    run = make_run_folder(tmp_path, 'run', ckpt=True, fingerprint='c' * 64)
    got = runfiles.read_run(run)
    assert got.status.state == runfiles.FINISHED and got.missing == []
    assert runfiles.Metrics.from_json(got.metrics.to_json(), 'm', 'fix', 10) == got.metrics
    assert [runfiles.EpochRecord.from_json(r.to_json(), 'h', 'fix') for r in got.history] == got.history
    again = runfiles.Predictions.from_arrays(got.predictions.to_arrays(), 'p', 'fix')
    for key, value in got.predictions.to_arrays().items():
        np.testing.assert_array_equal(getattr(again, key), value)
    for record in (runfiles.Divergence(epoch=2, step=3, global_step=19, lr=0.02, loss='nan', message='a; b'),
                   runfiles.Crash('KeyError: k', during='evaluation', time='2024-01-01T12:00:00')):
        record.write(run)
        assert type(record).from_json(json.loads((run / record.NAME).read_text()), 'x', 'fix') == record
    assert runfiles.Divergence(message='the loss became inf at epoch 1, step 2 (lr 0.1); do this').summary == \
        'the loss became inf at epoch 1, step 2 (lr 0.1)'
    # The fields added after the first runs are None when a file lacks them; nothing else is.
    old = {k: v for k, v in got.metrics.to_json().items() if k not in ('time_to_val_acc', 'data_fingerprint')}
    assert runfiles.Metrics.from_json(old, 'm', 'fix', 10).data_fingerprint is None


@pytest.mark.parametrize('change, words', [
    ({'test_acc': 1.5}, "metrics.json has 'test_acc' = 1.5, which is not a fraction in [0, 1]"),
    ({'stopped_early': 'yes'}, "'stopped_early' = 'yes', which is not true or false"),
    ({'time_to_val_acc': {'0.70': -3}}, "'time_to_val_acc'"),
    ({'data_fingerprint': {'test': 'abc'}}, "'data_fingerprint'"),
    ({'test_images': 199}, 'is inconsistent: its confusion_matrix counts 200 test images, test_images says 199'),
    ({'per_class_acc': [0.0] * 10}, 'per_class_acc is not the per-class accuracy of its confusion_matrix'),
    ({'confusion_matrix': [[1, 2], [3, 4]]}, "'confusion_matrix' = [[1, 2], [3, 4]], which is not a 10 x 10"),
    ({'temperature': 0}, "'temperature' = 0, which is not a finite temperature above 0"),
    ({'temperature': -1.5}, "'temperature' = -1.5, which is not a finite temperature above 0"),
    ({'temperature': 'warm'}, "'temperature' = 'warm', which is not a finite temperature above 0"),
    ({'calibration': {'raw': {'ece': 0.1}}}, "'calibration'"),
    ({'tta': 'mirror'}, "'tta' = 'mirror', which is not null or one of 'none', 'flip', 'flip+translate'"),
    ({'tta': 'none', 'single_view': {'test_acc': 0.5, 'test_loss': 1.0, 'ece': 0.1}},
     "is inconsistent: it has single_view (the figures without test-time augmentation) but tta is 'none'"),
])
def test_a_metrics_record_main_py_cannot_have_written_is_refused_in_one_sentence(tmp_path, change, words):
    run = make_run_folder(tmp_path, 'run', ckpt=True)
    values = json.loads((run / runfiles.METRICS_NAME).read_text())
    runfiles.write_json(run / runfiles.METRICS_NAME, {**values, **change})
    with pytest.raises(RecordError) as refused:
        runfiles.read_run(run)
    text = str(refused.value)
    assert words in text and str(run / runfiles.METRICS_NAME) in text and '\n' not in text
    assert refused.value.path == run / runfiles.METRICS_NAME
    assert 'main.py --resume' in text and '--evaluate' in text     # a fix that works when typed


@pytest.mark.parametrize('text, words', [
    ('NaN', "'temperature' = nan, which is not a finite temperature above 0"),
    ('Infinity', "'temperature' = inf, which is not a finite temperature above 0"),
    ('-Infinity', "'temperature' = -inf, which is not a finite temperature above 0"),
])
def test_a_temperature_that_is_not_finite_is_refused_in_one_sentence(tmp_path, text, words):
    """Python's json writes NaN and Infinity (runfiles.write_json never does): a damaged file."""
    run = make_run_folder(tmp_path, 'run', ckpt=True, temperature=1.5)
    values = json.loads((run / runfiles.METRICS_NAME).read_text())
    assert runfiles.read_run(run).metrics.temperature == 1.5
    text_of = json.dumps({k: v for k, v in values.items() if k != 'temperature'})
    (run / runfiles.METRICS_NAME).write_text(text_of[:-1] + f', "temperature": {text}}}')
    with pytest.raises(RecordError) as refused:
        runfiles.read_run(run)
    assert words in str(refused.value) and '\n' not in str(refused.value)
    assert str(refused.value).count('; ') == 1 and str(run / runfiles.METRICS_NAME) in str(refused.value)


@pytest.mark.parametrize('change, words', [
    (lambda m: dict(m, temperature=None), 'temperature and calibration are written together'),
    (lambda m: {k: v for k, v in m.items() if k != 'calibration'}, 'temperature and calibration are written together'),
    (lambda m: dict(m, calibration=dict(m['calibration'], calibrated=dict(m['calibration']['calibrated'],
                                                                         accuracy=0.01))),
     r'calibration.calibrated.accuracy 0.0100 is not its test_acc \(0.4000\), which temperature scaling never'),
    (lambda m: dict(m, calibration=dict(m['calibration'], raw=dict(m['calibration']['raw'], ece=0.5))),
     'calibration.raw.ece 0.500000 is not its ece'),
])
def test_calibration_figures_that_disagree_with_the_rest_are_refused(tmp_path, change, words):
    run = make_run_folder(tmp_path, 'run', ckpt=True, temperature=0.8)
    values = json.loads((run / runfiles.METRICS_NAME).read_text())
    runfiles.write_json(run / runfiles.METRICS_NAME, change(values))
    with pytest.raises(RecordError, match='is inconsistent: ' + words):
        runfiles.read_run(run)


@pytest.mark.parametrize('arrays_of, words', [
    (lambda a: dict(a, probs=a['probs'] * 0.5), 'rows of probabilities that do not sum to 1'),
    (lambda a: dict(a, labels=a['labels'][:5]), 'inconsistent arrays'),
    (lambda a: dict(a, hidden=np.full_like(a['hidden'], np.inf)), 'non-finite hidden states'),
    (lambda a: {k: v for k, v in a.items() if k != 'probs'}, "lacks the arrays 'probs' and 'labels'"),
    (lambda a: dict(a, probs_calibrated=a['probs'][:, :5]), 'probs_calibrated like probs'),
    (lambda a: dict(a, probs_calibrated=a['probs'] * 0.5), 'rows of calibrated probabilities that do not sum to 1'),
    (lambda a: dict(a, probs_calibrated=a['probs'][:, ::-1].copy()), 'most probable class differs from probs'),
])
def test_predictions_main_py_cannot_have_written_are_refused(tmp_path, arrays_of, words):
    run = make_run_folder(tmp_path, 'run')
    runfiles.write_npz(run / runfiles.PREDICTIONS_NAME, arrays_of(runfiles.read_npz(run / runfiles.PREDICTIONS_NAME)))
    with pytest.raises(RecordError, match=words):
        runfiles.read_run(run)


def test_read_run_refuses_what_is_not_a_run_folder_and_reads_a_partial_one(tmp_path):
    (tmp_path / 'notes').mkdir()
    (tmp_path / 'notes' / 'a.txt').write_text('x')
    with pytest.raises(RunFileError, match='is not a run folder'):
        runfiles.read_run(tmp_path / 'notes')
    run = make_run_folder(tmp_path, 'run', ckpt=True, evaluated=False)
    got = runfiles.read_run(run)
    assert got.missing == [runfiles.METRICS_NAME, runfiles.PREDICTIONS_NAME]
    assert got.status.state == runfiles.NEEDS_EVALUATION and len(got.history) == 3
    assert runfiles.is_run_folder(run) and runfiles.is_run_folder(run, certain=True)
    assert not runfiles.is_run_folder(tmp_path / 'notes') and not runfiles.is_run_folder(run / 'config.json')


def test_the_readers_open_no_run_file_themselves():
    """viz.py, compare.py and claims.py read run folders through runfiles alone, and no module
    outside it spells a run file's name in code (only in messages and docstrings)."""
    names = set(runfiles.MAIN_FILES) | {runfiles.REPORT_NAME, runfiles.LOCK_NAME}
    readers = {'read_json', 'read_npz', 'open_regular', 'load_npz_archive', 'open', 'load', 'loads',
               'read_text', 'read_bytes', 'checkpoint_meta', 'append_line'}
    for module in ('viz', 'compare', 'claims', 'main'):
        tree = ast.parse((REPO_ROOT / f'{module}.py').read_text())
        spelled = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in names]
        assert spelled == [], (module, spelled)
        if module != 'main':      # main.py reads its checkpoint through the model module
            called = {n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, 'id', None)
                      for n in ast.walk(tree) if isinstance(n, ast.Call)}
            assert not called & (readers - {'checkpoint_meta'} if module == 'compare' else readers), module


# --------------------------------------------------------------------------
# What main.py records: a crash as data, cleared when the run is taken up again
# --------------------------------------------------------------------------

def test_a_crash_is_recorded_and_cleared_when_the_run_is_taken_up_again(tmp_path, monkeypatch, capsys):
    data = str(make_cifar_archive(tmp_path))
    out = tmp_path / 'run'
    real, calls = main.Trainer.end_epoch, []

    def crashing(self):
        calls.append(1)
        if len(calls) == 2:         # the end of epoch 2: epoch 1's checkpoint is on disk
            raise ZeroDivisionError('injected fault')
        return real(self)
    monkeypatch.setattr(main.Trainer, 'end_epoch', crashing)
    assert main.run(SMOKE + ['--epochs', '2', '--data-dir', data, '--out', str(out)]) == 3
    assert 'crashed (ZeroDivisionError: injected fault)' in capsys.readouterr().err
    got = runfiles.status(out)
    assert got.state == runfiles.STOPPED and (got.epoch, got.epochs) == (1, 2)
    assert got.crash.message == 'ZeroDivisionError: injected fault' and got.crash.during == 'training'
    assert 'crash: ZeroDivisionError: injected fault' in (out / runfiles.LOG_NAME).read_text()
    monkeypatch.undo()
    assert main.run(['--resume', str(out)]) == 0
    got = runfiles.status(out)
    assert got.state == runfiles.FINISHED and got.crash is None and not (out / runfiles.CRASHED_NAME).exists()
    assert 'trying again after the crash recorded in crashed.json: ZeroDivisionError' in \
        (out / runfiles.LOG_NAME).read_text()


# --------------------------------------------------------------------------
# Run folders written by earlier versions
# --------------------------------------------------------------------------

# What main.py wrote before 902f7d2 (git log -p -- main.py config.py): history records had no
# elapsed_s and metrics.json no time_to_val_acc (both 902f7d2); metrics.json had no
# data_fingerprint and the checkpoint's state no data_fingerprint, epoch_wall_s, epoch_train_s,
# epoch_timed_images (d1d54a8); config.json and the checkpoint's run_config had none of the lever
# keys crop, label_smoothing, ema, tta_flip (9d8ef24); there was no diverged.json (ad71d7d) nor
# crashed.json; nor temperature scaling (metrics.json's temperature and calibration, the config key
# calibrated_predictions: issue 21); nor metrics.json's tta (issue 23). (metrics.json has held epochs_planned since main.py's first
# version, and single_view only ever with tta_flip.)
OLD_HISTORY_KEYS = ('elapsed_s',)
OLD_METRICS_KEYS = ('time_to_val_acc', 'data_fingerprint', 'temperature', 'calibration', 'tta')
OLD_STATE_KEYS = ('data_fingerprint', 'epoch_wall_s', 'epoch_train_s', 'epoch_timed_images')
OLD_CONFIG_KEYS = ('crop', 'label_smoothing', 'ema', 'tta_flip', 'calibrated_predictions')


def to_old_format(folder):
    """Rewrite a run folder of this version as main.py wrote it before 902f7d2 (see above)."""
    def without(d, keys):
        return {k: v for k, v in d.items() if k not in keys}
    config = without(json.loads((folder / runfiles.CONFIG_NAME).read_text()), OLD_CONFIG_KEYS)
    runfiles.write_json(folder / runfiles.CONFIG_NAME, config)
    history = [without(r, OLD_HISTORY_KEYS) for r in json.loads((folder / runfiles.HISTORY_NAME).read_text())]
    runfiles.write_json(folder / runfiles.HISTORY_NAME, history)
    metrics = without(json.loads((folder / runfiles.METRICS_NAME).read_text()), OLD_METRICS_KEYS)
    runfiles.write_json(folder / runfiles.METRICS_NAME, metrics)
    ckpt = folder / runfiles.CHECKPOINT_NAME
    meta = runfiles.checkpoint_meta(ckpt)
    state = dict(without(meta['state'], OLD_STATE_KEYS), history=history)
    meta = dict(meta, run_config=without(meta['run_config'], OLD_CONFIG_KEYS), state=state)
    runfiles.write_checkpoint(ckpt, meta, {k: v for k, v in runfiles.read_npz(ckpt).items() if k != 'meta'})
    (folder / runfiles.DIVERGED_NAME).unlink(missing_ok=True)
    return metrics


def test_a_run_folder_of_an_earlier_version_is_drawn_compared_and_re_evaluated(tmp_path, capsys):
    data = str(make_cifar_archive(tmp_path))
    run = tmp_path / 'runs' / 'old'
    assert main.run(SMOKE + ['--epochs', '2', '--data-dir', data, '--out', str(run)]) == 0
    before = arrays(run / runfiles.CHECKPOINT_NAME)
    old_metrics = to_old_format(run)
    got = runfiles.read_run(run)
    assert got.status.state == runfiles.FINISHED and got.metrics.data_fingerprint is None
    assert got.metrics.time_to_val_acc is None and all(r.elapsed_s is None for r in got.history)
    assert got.metrics.temperature is None and got.metrics.calibration is None and got.metrics.tta is None
    assert 'crop' not in got.config and runfiles.checkpoint_meta(run / runfiles.CHECKPOINT_NAME)['state'].get(
        'epoch_wall_s') is None

    # viz.py draws it (the gallery's test images checked by their labels, without a fingerprint).
    assert viz.main([str(run), '--tsne-samples', '0']) == 0
    for stem in ('training_curves', 'confusion_matrix', 'reliability', 'misclassified'):
        assert_valid_png(run / runfiles.FIGURES_NAME / f'{stem}.png')
    assert 'Validation accuracy' in (run / runfiles.REPORT_NAME).read_text()
    assert 'No temperature is recorded for this run' in (run / runfiles.REPORT_NAME).read_text()

    # compare.py compares it, beside a run of this version on the same data.
    new = tmp_path / 'runs' / 'new'
    assert main.run(SMOKE + ['--epochs', '2', '--data-dir', data, '--out', str(new), '--seed', '1']) == 0
    capsys.readouterr()
    assert compare.main([str(run), str(new), '--out', str(tmp_path / 'cmp')]) == 0, capsys.readouterr().err
    record = json.loads((tmp_path / 'cmp' / 'comparison.json').read_text())
    runs = {r['name']: r for v in record['variants'] for r in v['runs']}
    assert record['left_out'] == [] and runs['old']['status'] == runs['new']['status'] == 'finished'
    assert runs['old']['test_acc'] == old_metrics['test_acc'] and len(record['variants']) == 1

    # main.py: a resume finds it finished; --evaluate evaluates it again, the same numbers, and
    # records what it lacked (the data fingerprint; the lever keys in config.json).
    assert main.run(['--resume', str(run)]) == 0
    assert 'already finished' in capsys.readouterr().out
    assert main.run(['--resume', str(run), '--evaluate']) == 0, capsys.readouterr().err
    again = runfiles.read_run(run)
    assert again.metrics.test_acc == old_metrics['test_acc'] and again.metrics.ece == old_metrics['ece']
    assert again.metrics.data_fingerprint is not None and again.config['crop'] == 'paste'
    assert again.metrics.temperature > 0 and again.metrics.calibration['raw']['ece'] == old_metrics['ece']
    assert again.config['calibrated_predictions'] is False and again.predictions.probs_calibrated is None
    after = arrays(run / runfiles.CHECKPOINT_NAME)
    assert set(after) == set(before) and all(np.array_equal(after[k], before[k]) for k in before)
