"""Tests of runfiles.py: atomic writes, safe reads, the run-folder lock and `latest`."""
import errno
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import runfiles
from runfiles import RunFileError


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
    """An .npz with just the metadata status() reads (the arrays are main.py's business)."""
    meta = {'kind': 'checkpoint', 'state': {'epoch': epoch}, 'run_config': {'epochs': epochs}}
    with open(path, 'wb') as f:
        np.savez(f, meta=np.array(json.dumps(meta)))


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
