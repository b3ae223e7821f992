"""Run-folder I/O shared by main.py and viz.py: atomic writes, safe reads, the lock, `latest`.

Every file of a run folder is written the same way: into a temporary file
beside its destination (named ``<name>.tmp-<random>``), flushed and fsynced,
then renamed over the destination with ``os.replace``. A crash, a full disk or
a kill at any moment leaves either the old file or the new one, never half of
one; the temporary files such a kill leaves behind are removed the next time a
process takes the run folder's lock (``RunFolderLock``).

Every failure, of a write or of a read, is raised as ``RunFileError`` whose
message is one sentence naming the path and the fix, so that the command-line
tools can print it as it is and exit with code 2.
"""
import errno
import fcntl
import json
import math
import os
import re
import stat
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TEMP_MARK = '.tmp-'          # every temporary file of this module has it in its name
LOCK_NAME = '.lock'
# The files this project writes into a run folder and its figures/: only temporary files
# of these names (``<name>.tmp-<8 characters of mkstemp>``) are ours to remove.
DIVERGED_NAME = 'diverged.json'   # where and how the loss became non-finite, written when it happens
RUN_FOLDER_FILES = ('config.json', 'history.json', 'metrics.json', 'ckpt.npz', 'best.npz',
                    'predictions.npz', 'report.md', DIVERGED_NAME)
FIGURE_FILE_SUFFIX = '.png'
_OWN_TEMP = re.compile(r'^(?P<base>.+)' + re.escape(TEMP_MARK) + r'[a-z0-9_]{8}$')
# Seeds both command lines accept: what NumPy's and scikit-learn's generators both take.
MAX_SEED = 2 ** 32 - 1


class RunFileError(Exception):
    """A run-folder file cannot be written or read; the message says why and what to do."""


class NotRegularFile(OSError):
    """A path that should be a file is a named pipe, a device, a socket or a folder.

    Reading a named pipe blocks until some other process writes to it, and a
    device such as /dev/zero never ends, so such paths are refused up front.
    """

    def __init__(self, path, kind):
        super().__init__(errno.EINVAL, f'it is {kind}, not a regular file', os.fspath(path))
        self.kind = kind


def file_kind(mode):
    """Words for the kind of file an ``st_mode`` describes ('a named pipe (FIFO)', ...)."""
    if stat.S_ISDIR(mode):
        return 'a folder'
    if stat.S_ISFIFO(mode):
        return 'a named pipe (FIFO)'
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return 'a device'
    if stat.S_ISSOCK(mode):
        return 'a socket'
    return 'a regular file' if stat.S_ISREG(mode) else 'not a regular file'


def open_regular(path, mode='rb', **kwargs):
    """``open(path, mode)``, but only for a regular file (or a link to one).

    The file is opened without blocking (a named pipe would otherwise wait for a
    writer forever) and its kind checked on the open descriptor, so nothing can
    swap it in between. Raises NotRegularFile (an OSError) for a named pipe, a
    device, a socket or a folder; other OSErrors as ``open`` does.
    """
    flags = {'r': os.O_RDONLY, 'w': os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
             'a': os.O_WRONLY | os.O_CREAT | os.O_APPEND}[mode[0]]
    if '+' in mode:
        flags = (flags & ~os.O_WRONLY) | os.O_RDWR
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except OSError as e:
        if e.errno == errno.ENXIO:     # a named pipe opened for writing with no reader
            raise NotRegularFile(path, 'a named pipe (FIFO)') from None
        if e.errno == errno.EISDIR:
            raise NotRegularFile(path, 'a folder') from None
        raise
    try:
        st_mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(st_mode):
            raise NotRegularFile(path, file_kind(st_mode))
        os.set_blocking(fd, True)
        return open(fd, mode, **kwargs)
    except BaseException:
        os.close(fd)
        raise


def check_regular(path):
    """Raise NotRegularFile unless ``path`` is missing or a regular file (links followed)."""
    try:
        st_mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st_mode):
        raise NotRegularFile(path, file_kind(st_mode))


# --------------------------------------------------------------------------
# Errors from the operating system, in one sentence
# --------------------------------------------------------------------------

def describe_os_error(e, path, doing='write'):
    """One sentence for an OSError met while doing something to ``path``.

    The fix depends on the cause: free space, permissions, a file where a
    folder should be, a dangling link.
    """
    path = os.fspath(e.filename or path) if getattr(e, 'filename', None) else os.fspath(path)
    code = e.errno
    if isinstance(e, NotRegularFile):
        return f'cannot {doing} {path}: {e.strerror}; replace it with the file itself or remove it'
    if code in (errno.ENOSPC, errno.EDQUOT):
        return (f'no space left to {doing} {path}; free disk space (files already written '
                f'are intact) and run the command again')
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return (f"cannot {doing} {path}: permission denied or read-only file system; "
                f"fix the folder's permissions or choose a writable folder")
    if code == errno.ENOTDIR:
        return (f'cannot {doing} {path}: a part of that path is a file, not a folder; '
                f'choose a path whose parents are folders')
    if code == errno.EISDIR:
        return f'cannot {doing} {path}: it is a folder, not a file; give the path of a file'
    if code == errno.ENOENT:
        if os.path.islink(path):
            return f'cannot {doing} {path}: it is a link to nothing; remove the link or point it at a folder'
        return f'cannot {doing} {path}: it does not exist; check the path'
    if code == errno.ENAMETOOLONG:
        return f'cannot {doing} {path}: the name is too long; choose a shorter path'
    return f'cannot {doing} {path} ({e.strerror or e}); check the path, its permissions and free space'


# --------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------

def write_atomic(path, write, binary=True):
    """Write ``path`` atomically through ``write(file_object)``.

    The temporary file gets the permissions a plain ``open`` would give
    (mkstemp's 0600 would hide figures and reports from other users), is
    fsynced before the rename, and is removed if anything fails.
    Raises RunFileError for any OSError.
    """
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + TEMP_MARK)
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, 'wb' if binary else 'w') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise RunFileError(describe_os_error(e, path)) from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def write_text(path, text):
    """Write a text file atomically."""
    write_atomic(path, lambda f: f.write(text), binary=False)


def write_json(path, obj):
    """Write an object as indented, strict JSON atomically.

    NumPy values become plain Python and a non-finite float (NaN, inf), which
    strict JSON cannot hold, becomes null: every reader treats it as unknown.
    """
    write_text(path, dumps_strict(obj, indent=2) + '\n')


def dumps_strict(obj, **kwargs):
    """json.dumps of ``to_jsonable(obj)`` that can never write NaN or Infinity."""
    return json.dumps(to_jsonable(obj), allow_nan=False, **kwargs)


def write_npz(path, arrays):
    """Write a dict of arrays as an uncompressed .npz atomically."""
    write_atomic(path, lambda f: np.savez(f, **arrays))


def to_jsonable(obj):
    """NumPy scalars and arrays inside a structure -> plain Python, for json.dump."""
    if isinstance(obj, dict):
        return {k: to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def append_line(path, line):
    """Append one line to a log file (train.log is a journal, so it is appended, not replaced)."""
    try:
        with open_regular(path, 'a') as f:
            f.write(line + '\n')
    except OSError as e:
        raise RunFileError(describe_os_error(e, path)) from None


# --------------------------------------------------------------------------
# Safe reads
# --------------------------------------------------------------------------

def resolve_folder(given, hint):
    """The real folder behind a path a user typed, links such as runs/latest resolved.

    An empty path (an unset shell variable), a loop of links, a link to
    nothing, a file or a missing path raise RunFileError: one sentence naming
    the path, ending with ``hint`` (what to pass instead).
    """
    if not os.fspath(given).strip():
        raise RunFileError(f'the folder given is an empty path; {hint}')
    path = Path(given)
    try:
        real = path.resolve()
    except RuntimeError:       # a loop of links
        raise RunFileError(f'{given} is a loop of links; {hint}') from None
    if not real.is_dir():
        if path.is_symlink() and not real.exists():
            raise RunFileError(f'{given} is a link to {os.readlink(path)}, which does not exist; {hint}')
        raise RunFileError(f"{given} {'is not a folder' if real.exists() else 'does not exist'}; {hint}")
    return real


def read_json(path, fix='re-run training or restore the file'):
    """Parse a JSON file; any failure is a RunFileError naming the file and ``fix``."""
    try:
        with open_regular(path, 'r') as f:
            return json.load(f)
    except OSError as e:
        raise RunFileError(describe_os_error(e, path, 'read')) from None
    except ValueError as e:   # JSONDecodeError and UnicodeDecodeError
        raise RunFileError(f'{path} is not valid JSON ({e}); {fix}') from None


def load_npz_archive(f):
    """np.load of an open file that must be an .npz archive (a plain .npy gives ValueError)."""
    loaded = np.load(f, allow_pickle=False)
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ValueError('it is a single array (.npy), not an .npz archive')
    return loaded


def read_npz(path, fix='use another file or re-run the step that wrote it'):
    """Every array of an .npz file, read into memory, as a dict.

    Every member is read here, so a truncated file, a bit flip (zip CRC
    error) or a member that is not a plain array fails now, as one
    RunFileError, rather than later at first use.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise RunFileError(f'{path} does not exist or is not a file; {fix}')
    try:
        with open_regular(path, 'rb') as raw, load_npz_archive(raw) as f:
            return {k: f[k] for k in f.files}
    except OSError as e:
        if e.errno is not None:
            raise RunFileError(describe_os_error(e, path, 'read')) from None
        raise RunFileError(f'{path} is not a readable .npz file ({e}); it is corrupt or truncated: {fix}') from None
    except (zipfile.BadZipFile, ValueError, EOFError, KeyError, zlib.error) as e:
        reason = str(e) or type(e).__name__
        raise RunFileError(f'{path} is not a readable .npz file ({reason}); it is corrupt or '
                           f'truncated: {fix}') from None


# --------------------------------------------------------------------------
# One writer per run folder
# --------------------------------------------------------------------------

class RunFolderLock:
    """An exclusive lock on a run folder, held by one process at a time.

    The lock is the operating system's (``flock`` on ``<run>/.lock``), so it
    disappears with the process that holds it, however that process ends; the
    file itself only records who holds it, for the message to a second process.
    Taking the lock also removes the temporary files that a killed write left.

        with RunFolderLock(run_dir, 'main.py'):
            ...
    """

    def __init__(self, run_dir, owner):
        self.run_dir = Path(run_dir)
        self.owner = owner
        self.fd = None

    def acquire(self, busy_ok=False):
        """Take the lock without waiting.

        Returns True. If another process holds it, raises RunFileError naming
        that process, or returns False when busy_ok is True.
        """
        path = self.run_dir / LOCK_NAME
        try:
            fd = _open_lock_file(path, os.O_RDWR | os.O_CREAT)
        except OSError as e:
            raise RunFileError(describe_os_error(e, path)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode('utf-8', 'replace').strip() or 'another process'
            os.close(fd)
            if busy_ok:
                return False
            raise RunFileError(f'the run folder {self.run_dir} is in use by {holder}; wait for it '
                               f'to finish or stop it, then run the command again') from None
        try:   # who holds the lock, for the message to a second process; optional
            os.ftruncate(fd, 0)
            os.write(fd, f'{self.owner} (pid {os.getpid()})\n'.encode())
        except OSError:
            pass
        self.fd = fd
        remove_stale_temp_files(self.run_dir)
        return True

    def release(self):
        if self.fd is not None:
            os.close(self.fd)          # closing the descriptor releases the flock
            self.fd = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def _open_lock_file(path, flags):
    """os.open of a lock file that must be a regular file (a named pipe would block the open)."""
    fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    st_mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(st_mode):
        os.close(fd)
        raise NotRegularFile(path, file_kind(st_mode))
    return fd


def folder_in_use(run_dir):
    """True while another process holds the run folder's lock (main.py training, viz.py drawing).

    A shared lock on the existing lock file, dropped at once. Unlike
    RunFolderLock.acquire, this writes nothing (no owner line, no clean-up of
    temporary files), so a reader such as compare.py never changes a run folder.
    """
    try:
        fd = _open_lock_file(Path(run_dir) / LOCK_NAME, os.O_RDONLY)
    except FileNotFoundError:  # no lock file: no process of this project ever held it
        return False
    except OSError as e:       # a named pipe or a folder where the lock file should be
        raise RunFileError(describe_os_error(e, Path(run_dir) / LOCK_NAME, 'use')) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)           # closing drops the shared lock


def is_own_temp_file(name, in_figures=False):
    """True if ``name`` is a temporary file that write_atomic made for a run-folder file.

    Only the temporaries of the files this project writes (RUN_FOLDER_FILES, or a
    figure in figures/), with mkstemp's 8-character tail, are ours: a user's
    ``notes.tmp-keep`` or ``figures/draft.tmp-1`` is not.
    """
    m = _OWN_TEMP.match(name)
    if m is None:
        return False
    base = m.group('base')
    return base.endswith(FIGURE_FILE_SUFFIX) if in_figures else base in RUN_FOLDER_FILES


def remove_stale_temp_files(run_dir):
    """Delete the temporary files a killed write left in a run folder and its figures/.

    Only call under the lock; only this project's own temporaries (is_own_temp_file) go.
    """
    for folder, in_figures in ((Path(run_dir), False), (Path(run_dir) / 'figures', True)):
        if not folder.is_dir() or folder.is_symlink():
            continue
        for p in folder.iterdir():
            if is_own_temp_file(p.name, in_figures) and p.is_file() and not p.is_symlink():
                p.unlink(missing_ok=True)


# --------------------------------------------------------------------------
# runs/latest
# --------------------------------------------------------------------------

def point_latest_at(run_dir, warn=print):
    """Make ``<parent of run_dir>/latest`` a relative symlink to the run folder.

    Only a missing ``latest`` or one that is already a link is (re)placed:
    a file or folder of the user's that happens to be called ``latest`` is
    left alone, with one warning line. The new link is made under a
    temporary name and renamed over the old one, so ``latest`` always
    points somewhere valid; the temporary name never outlives the call.
    A file system without symlinks just gets no link.
    """
    run_dir = Path(run_dir).resolve()
    link = run_dir.parent / 'latest'
    if run_dir == link:
        return      # the run folder itself is called latest
    if os.path.lexists(link) and not link.is_symlink():
        warn(f'warning: {link} exists and is not a link, so it was left alone and does not '
             f'point at this run')
        return
    tmp = run_dir.parent / f'latest{TEMP_MARK}{os.getpid()}'
    try:
        tmp.unlink(missing_ok=True)
        os.symlink(run_dir.name, tmp)
        os.replace(tmp, link)
    except OSError:
        pass        # no symlinks here (or a race with another run): the run itself is unaffected
    finally:
        if os.path.lexists(tmp):
            try:
                tmp.unlink()
            except OSError:
                pass


# --------------------------------------------------------------------------
# The run folder's state: one vocabulary for every tool
# --------------------------------------------------------------------------

CONFIG_NAME, HISTORY_NAME, LOG_NAME = 'config.json', 'history.json', 'train.log'
CHECKPOINT_NAME, BEST_NAME = 'ckpt.npz', 'best.npz'
METRICS_NAME, PREDICTIONS_NAME = 'metrics.json', 'predictions.npz'
REPORT_NAME, FIGURES_NAME = 'report.md', 'figures'

NEW, IN_USE, STOPPED, NEEDS_EVALUATION, FINISHED, DIVERGED, DAMAGED = (
    'new', 'in use', 'stopped', 'needs evaluation', 'finished', 'diverged', 'damaged')
STATES = (NEW, IN_USE, STOPPED, NEEDS_EVALUATION, FINISHED, DIVERGED, DAMAGED)


@dataclass
class RunStatus:
    """What a run folder is now, and why.

    state: one of STATES --
      new               the folder is empty (or does not exist yet): a run may start in it
      in use            a process holds its lock (training, or viz.py drawing)
      stopped           stopped before its last epoch (time budget, Ctrl-C, a crash): --resume continues it
      needs evaluation  trained to its last epoch, but metrics.json / predictions.npz are missing
      finished          trained and evaluated
      diverged          the loss became non-finite (diverged.json records where)
      damaged           cannot be used as it is; ``reason`` says why and what to do
    reason: one sentence for diverged and damaged (else '').
    epoch, epochs: epochs done and planned, from the checkpoint (None if there is none).
    """
    state: str
    reason: str = ''
    epoch: int = None
    epochs: int = None

    @property
    def resumable(self):
        return self.state in (STOPPED, NEEDS_EVALUATION)


def checkpoint_meta(path):
    """The JSON metadata of an .npz written by this project, reading only its 'meta' member.

    Raises RunFileError if the file cannot be read or holds no such metadata object.
    """
    fix = 'it is damaged: use another checkpoint, or start the run again in a new folder'
    try:
        with open_regular(path, 'rb') as raw, load_npz_archive(raw) as f:
            if 'meta' not in f.files:
                raise RunFileError(f'{path} has no metadata; {fix}')
            meta = json.loads(str(f['meta']))
    except OSError as e:
        raise RunFileError(describe_os_error(e, path, 'read')) from None
    except (zipfile.BadZipFile, ValueError, EOFError, KeyError, zlib.error) as e:
        raise RunFileError(f'{path} is not a readable .npz file ({str(e) or type(e).__name__}); {fix}') from None
    if not isinstance(meta, dict):
        raise RunFileError(f'{path} has metadata that is not a JSON object; {fix}')
    return meta


def status(folder):
    """The RunStatus of a run folder (a path as typed; links such as runs/latest are followed).

    Reads only what it needs: the lock, which files exist, diverged.json, and the
    checkpoint's metadata (not its arrays). Whether metrics.json and predictions.npz
    hold valid values is the business of their readers; here they only have to be
    regular files.
    """
    folder = Path(folder)
    if not folder.exists() and not folder.is_symlink():
        return RunStatus(NEW)
    try:
        folder = resolve_folder(folder, 'pass a run folder such as runs/latest')
        names = {p.name for p in folder.iterdir()} - {LOCK_NAME}
        for name in names & set(RUN_FOLDER_FILES + (LOG_NAME,)):
            check_regular(folder / name)
        if folder_in_use(folder):
            return RunStatus(IN_USE, f'another process holds {folder / LOCK_NAME}')
    except (RunFileError, OSError) as e:
        return RunStatus(DAMAGED, str(e) if isinstance(e, RunFileError) else describe_os_error(e, folder, 'read'))
    if not names:
        return RunStatus(NEW)
    if DIVERGED_NAME in names:
        return _diverged_status(folder)
    if CHECKPOINT_NAME not in names:
        return RunStatus(DAMAGED, f'{folder} holds no checkpoint ({CHECKPOINT_NAME}): the run stopped before '
                                  f'its first one, or the folder is not a run of main.py; start the run '
                                  f'again in a new folder')
    return _status_from_checkpoint(folder, names)


def _diverged_status(folder):
    try:
        record = read_json(folder / DIVERGED_NAME)
        reason = str(record['message']) if isinstance(record, dict) and 'message' in record else ''
    except RunFileError as e:
        return RunStatus(DAMAGED, str(e))
    return RunStatus(DIVERGED, reason or f'the loss diverged ({folder / DIVERGED_NAME})')


def _status_from_checkpoint(folder, names):
    try:
        meta = checkpoint_meta(folder / CHECKPOINT_NAME)
        epoch, epochs = meta['state']['epoch'], meta['run_config']['epochs']
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (epoch, epochs)):
            raise TypeError
    except RunFileError as e:
        return RunStatus(DAMAGED, str(e))
    except (KeyError, TypeError):
        return RunStatus(DAMAGED, f'{folder / CHECKPOINT_NAME} has no valid epoch in its metadata; it is '
                                  f'damaged: start the run again in a new folder')
    if epoch < epochs:
        return RunStatus(STOPPED, epoch=epoch, epochs=epochs)
    # main.py writes metrics.json, then predictions.npz: a stop between the two leaves only the first.
    evaluated = {METRICS_NAME, PREDICTIONS_NAME} <= names
    return RunStatus(FINISHED if evaluated else NEEDS_EVALUATION, epoch=epoch, epochs=epochs)
