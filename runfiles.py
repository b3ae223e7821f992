"""The run-folder contract: what a run folder holds, how its files are written and read, and what
state a run is in. main.py writes through it; viz.py, compare.py and claims.py read through it;
no other module opens a run folder's files by name.

    runs/<run>/config.json      the resolved configuration: config.Config's dict (read_config)
               history.json     one EpochRecord per epoch (read_history, write_history)
               train.log        the journal, appended line by line (append_line)
               ckpt.npz         the resumable state; its JSON 'meta' member (checkpoint_meta)
               best.npz         the weights of the best validation epoch (cnn_rnn_numpy reads it)
               metrics.json     the Metrics record of the test evaluation
               predictions.npz  the Predictions arrays of the test evaluation
               diverged.json    a Divergence record: the loss became non-finite (main.py exit 1)
               crashed.json     a Crash record: main.py crashed (exit 3)
               figures/, report.md   viz.py's

    status(folder)     -> RunStatus: new, in use, stopped, needs evaluation, finished, diverged or
                          damaged (with the reason), and the divergence and crash records
    read_run(folder)   -> Run: the status and every record (None where a file is absent), each
                          checked; one sentence (RunFileError, RecordError) for what is not

Every file is written the same way: into a temporary file beside its destination (named
``<name>.tmp-<random>``), flushed and fsynced, then renamed over the destination with
``os.replace``. A crash, a full disk or a kill at any moment leaves either the old file or the new
one, never half of one; the temporary files such a kill leaves behind are removed the next time a
process takes the run folder's lock (``RunFolderLock``).

Every failure, of a write or of a read, is raised as ``RunFileError`` whose message is one
sentence naming the path and the fix, so that the command-line tools can print it as it is and
exit with code 2. ``RecordError`` (a RunFileError) says that a file reads well but holds what
main.py does not write: a NaN, an accuracy outside [0, 1], probabilities that do not sum to 1, a
confusion matrix that disagrees with test_acc.

Run folders written by earlier versions read as they are: a record field added later (e.g.
history's elapsed_s, metrics' data_fingerprint and time_to_val_acc) is None when absent. Before
diverged.json and crashed.json existed a divergence or a crash was only told by train.log, which
no module reads to learn a run's state: such a folder reads as its other files say (stopped,
needs evaluation or finished with a checkpoint, damaged without one).

This module imports only the standard library and NumPy (data_utils, metrics and the model import
it), and never config.py: config.json is read as the dict of config.Config, and callers build
``Config.from_dict`` where they need it.
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
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

import cli

REPO = Path(__file__).resolve().parent

# --------------------------------------------------------------------------
# File names
# --------------------------------------------------------------------------

CONFIG_NAME, HISTORY_NAME, LOG_NAME = 'config.json', 'history.json', 'train.log'
CHECKPOINT_NAME, BEST_NAME = 'ckpt.npz', 'best.npz'
METRICS_NAME, PREDICTIONS_NAME = 'metrics.json', 'predictions.npz'
DIVERGED_NAME = 'diverged.json'   # where and how the loss became non-finite, written when it happens
CRASHED_NAME = 'crashed.json'     # what main.py crashed on (exit 3), written when it happens
REPORT_NAME, FIGURES_NAME = 'report.md', 'figures'
LOCK_NAME = '.lock'
# Every file main.py writes into a run folder: any one of them makes a folder a run folder.
MAIN_FILES = (CONFIG_NAME, HISTORY_NAME, LOG_NAME, CHECKPOINT_NAME, BEST_NAME, METRICS_NAME,
              PREDICTIONS_NAME, DIVERGED_NAME, CRASHED_NAME)
# The files this project writes atomically into a run folder and its figures/: only temporary
# files of these names (``<name>.tmp-<8 characters of mkstemp>``) are ours to remove.
TEMP_MARK = '.tmp-'          # every temporary file of this module has it in its name
RUN_FOLDER_FILES = tuple(n for n in MAIN_FILES if n != LOG_NAME) + (REPORT_NAME,)
FIGURE_FILE_SUFFIX = '.png'
_OWN_TEMP = re.compile(r'^(?P<base>.+)' + re.escape(TEMP_MARK) + r'[a-z0-9_]{8}$')
# What the 'kind' of a checkpoint's metadata says (best.npz, a model file, says 'CNNRNN').
CHECKPOINT_KIND = 'checkpoint'
# Seeds both command lines accept: what NumPy's and scikit-learn's generators both take.
MAX_SEED = 2 ** 32 - 1


class RunFileError(Exception):
    """A run-folder file cannot be written or read; the message says why and what to do.

    ``path``: the file the message is about, when the raiser knows it (else None).
    """

    def __init__(self, message, path=None):
        super().__init__(message)
        self.path = None if path is None else Path(path)


class RecordError(RunFileError):
    """A run file reads well but holds what main.py does not write (a NaN, an impossible value,
    a part that disagrees with another); the message names the file, the value and the fix."""


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
        raise RunFileError(describe_os_error(e, path), path) from None
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


def write_checkpoint(path, meta, arrays):
    """Write a checkpoint atomically: ``meta`` (a dict) as the JSON text of its 'meta' member,
    then ``arrays`` ({name: array}), the layout checkpoint_meta reads."""
    write_npz(path, {'meta': np.array(json.dumps(meta)), **arrays})


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
        raise RunFileError(describe_os_error(e, path), path) from None


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
        raise RunFileError(describe_os_error(e, path, 'read'), path) from None
    except ValueError as e:   # JSONDecodeError and UnicodeDecodeError
        raise RunFileError(f'{path} is not valid JSON ({e}); {fix}', path) from None


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
        raise RunFileError(f'{path} does not exist or is not a file; {fix}', path)
    try:
        with open_regular(path, 'rb') as raw, load_npz_archive(raw) as f:
            return {k: f[k] for k in f.files}
    except OSError as e:
        if e.errno is not None:
            raise RunFileError(describe_os_error(e, path, 'read'), path) from None
        raise RunFileError(f'{path} is not a readable .npz file ({e}); it is corrupt or truncated: {fix}',
                           path) from None
    except (zipfile.BadZipFile, ValueError, EOFError, KeyError, zlib.error) as e:
        reason = str(e) or type(e).__name__
        raise RunFileError(f'{path} is not a readable .npz file ({reason}); it is corrupt or '
                           f'truncated: {fix}', path) from None


def present(path):
    """True if a run file is there, False if absent; RunFileError for anything that is not a file.

    A named pipe would block its reader forever and a device never ends; a link
    to nothing is named as such rather than taken for a missing file.
    """
    try:
        if not os.path.lexists(path):
            return False
        if not os.path.exists(path):
            raise RunFileError(f'{path} is a link to {os.readlink(path)}, which does not exist; '
                               f'restore the file it points at, or remove the link', path)
        check_regular(path)
    except OSError as e:
        raise RunFileError(describe_os_error(e, path, 'read'), path) from None
    return True


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
        lock = Path(run_dir) / LOCK_NAME
        raise RunFileError(describe_os_error(e, lock, 'use'), lock) from None
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
# Advice that works when typed
# --------------------------------------------------------------------------

typed_path = cli.typed_path


def main_command(*args):
    """'python <main.py> ARGS' as it works when typed in the current folder (Paths made typeable)."""
    return cli.python_command(REPO / 'main.py', *args)


def repair_advice(folder, name):
    """What to do about the damaged run file ``name`` of ``folder``, as a command that works when typed.

    metrics.json and predictions.npz come from the test evaluation, which main.py
    redoes from the run's ckpt.npz; the other files cannot be rebuilt by a command.
    """
    folder = Path(folder)
    if name in (METRICS_NAME, PREDICTIONS_NAME):
        if (folder / CHECKPOINT_NAME).is_file():
            return f"redo the test evaluation with {main_command('--resume', folder, '--evaluate')}"
        return f'restore it from a backup (the run has no {CHECKPOINT_NAME} to evaluate again from)'
    path = typed_path(folder / name)
    return f'restore it from a backup, or move it aside (mv {path} {path}.damaged) to use the run without it'


# --------------------------------------------------------------------------
# What a value must be: the tests behind the records' fields
# --------------------------------------------------------------------------

def _number(v):
    # true/false is an int to Python but not a measurement.
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _finite(v):
    if not _number(v):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:      # an integer too large for a float: no real measurement
        return False


def _fraction(v):
    return _finite(v) and 0 <= v <= 1


def _at_least_0(v):
    return _finite(v) and v >= 0


def _count(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _text(v):
    return isinstance(v, str)


def _or_null(test):
    return lambda v: v is None or test(v)


def _table(shape, kinds, upper=None):
    """A test for nested JSON lists: an array of ``shape``, dtype kind in ``kinds``, finite entries in [0, upper]."""
    def test(value):
        try:
            a = np.array(value)
        except (ValueError, OverflowError):      # ragged lists, integers too large
            return False
        if a.shape != shape or a.dtype.kind not in kinds or a.size == 0:
            return a.shape == shape and a.dtype.kind in kinds
        return bool(np.isfinite(a).all() and a.min() >= 0 and (upper is None or a.max() <= upper))
    return test


def _fingerprints(v):
    return (isinstance(v, dict) and isinstance(v.get('test'), str)
            and re.fullmatch(r'[0-9a-f]{64}', v['test']) is not None)


# The test-time augmentations main.evaluate knows (data_utils.tta_views holds their views):
# metrics.json's tta names the one its figures are of.
TTA_MODES = ('none', 'flip', 'flip+translate')


def _single_view(v):
    return (isinstance(v, dict) and _fraction(v.get('test_acc')) and _fraction(v.get('ece'))
            and _or_null(_at_least_0)(v.get('test_loss')))


def _texts(v):
    return isinstance(v, list) and all(isinstance(s, str) for s in v)


def _budgets(v):
    return isinstance(v, list) and all(b is None or (_finite(b) and b > 0) for b in v)


def _times(v):
    return isinstance(v, dict) and all(isinstance(k, str) and _or_null(_at_least_0)(x) for k, x in v.items())


def _temperature(v):
    return _finite(v) and v > 0


def _calibration_report(v):
    """One report of metrics.calibration_report: the ECE and its noise, NLL, mean confidence."""
    if not isinstance(v, dict):
        return False
    interval, simulated = v.get('ece_ci95'), v.get('ece_if_calibrated')
    return (all(_fraction(v.get(k)) for k in ('ece', 'ece_equal_mass', 'mean_confidence'))
            and _at_least_0(v.get('nll')) and _finite(v.get('ece_debiased')) and abs(v['ece_debiased']) <= 1
            and isinstance(interval, list) and len(interval) == 2 and all(_fraction(x) for x in interval)
            and interval[0] <= interval[1]
            and isinstance(simulated, dict) and all(_fraction(simulated.get(k)) for k in ('mean', 'p95'))
            and isinstance(v.get('distinguishable'), bool) and _or_null(_fraction)(v.get('accuracy')))


def _calibration(v):
    """metrics.json's calibration block: the raw and the calibrated report, and the validation fit."""
    fit = v.get('validation') if isinstance(v, dict) else None
    return (isinstance(v, dict) and _calibration_report(v.get('raw')) and _calibration_report(v.get('calibrated'))
            and (fit is None or (isinstance(fit, dict) and _or_null(lambda n: _count(n) and n > 0)(fit.get('images'))
                                 and all(_or_null(_at_least_0)(fit.get(k)) for k in ('nll', 'nll_calibrated')))))


# {key: (test, what it must be)}; an absent key counts as null. null means unknown
# (write_json writes a NaN as null) and leaves a gap; a NaN, an infinity or an
# impossible value is refused, so no report ever shows one.
FRACTION_OR_NULL = (_or_null(_fraction), 'a fraction in [0, 1] or null')
LOSS_OR_NULL = (_or_null(_at_least_0), 'a finite loss >= 0 or null')
AMOUNT_OR_NULL = (_or_null(_at_least_0), 'a finite number >= 0 or null')
COUNT_OR_NULL = (_or_null(_count), 'a whole number or null')
TEXT_OR_NULL = (_or_null(_text), 'a text or null')
CONFIG_RULES = {'seed': (_or_null(lambda v: _count(v) and v <= MAX_SEED), f'an integer in [0, {MAX_SEED}]'),
                'data_dir': (_or_null(_text), 'a path')}


def check_values(values, rules, path, fix, where='{!r}'):
    """RecordError naming the first value of the dict ``values`` that fails its rule."""
    for key, (test, what) in rules.items():
        value = values.get(key)
        if not test(value):
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + '...'
            raise RecordError(f'{path} has {where.format(key)} = {shown}, which is not {what}; {fix}', path)


def check_finite(value, path, fix, where=''):
    """RecordError for the first NaN or infinity anywhere in a JSON value."""
    if isinstance(value, dict):
        for k, v in value.items():
            check_finite(v, path, fix, f'{where}.{k}' if where else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_finite(v, path, fix, f'{where}[{i}]')
    elif isinstance(value, float) and not math.isfinite(value):
        raise RecordError(f'{path} has {where!r} = {value}, which is not a finite number; {fix}', path)


def _from_json(cls, values, path, fix, rules, where='{!r}'):
    """``cls`` built from the dict ``values`` once every field passes ``rules``; unknown keys
    (written by another version) are left out. RecordError otherwise."""
    if not isinstance(values, dict):
        raise RecordError(f'{path} is not a JSON object; {fix}', path)
    check_values(values, rules, path, fix, where)
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


# --------------------------------------------------------------------------
# The records
# --------------------------------------------------------------------------

@dataclass
class EpochRecord:
    """One record of history.json: the end of epoch ``epoch`` (1-based), as main.py writes it.

    train_loss is the epoch's mean cross-entropy without the L2 term (so it compares with
    val_loss), train_acc/val_acc fractions, lr the rate of the epoch's last step and base_lr the
    run's base rate then, epoch_time_s the epoch's wall time (validation included), images_per_s
    its training speed, elapsed_s the run's wall time at its end (absent in older runs),
    val_acc_raw the validation accuracy of the last step's weights when validation uses a
    weight average (ema; absent otherwise).
    """
    epoch: int
    train_loss: float = None
    train_acc: float = None
    val_loss: float = None
    val_acc: float = None
    lr: float = None
    base_lr: float = None
    epoch_time_s: float = None
    images_per_s: float = None
    elapsed_s: float = None
    val_acc_raw: float = None

    RULES = {'epoch': (_count, 'an epoch number'),
             **dict.fromkeys(('train_loss', 'val_loss'), LOSS_OR_NULL),
             **dict.fromkeys(('train_acc', 'val_acc', 'val_acc_raw'), FRACTION_OR_NULL),
             **dict.fromkeys(('lr', 'base_lr', 'epoch_time_s', 'images_per_s', 'elapsed_s'), AMOUNT_OR_NULL)}

    @classmethod
    def from_json(cls, values, path, fix, number=1):
        """The record of a dict read from history.json (its ``number``-th, 1-based); RecordError."""
        return _from_json(cls, values, path, fix, cls.RULES, where=f"record {number}'s {{!r}}")

    def to_json(self):
        record = asdict(self)
        if self.val_acc_raw is None:
            del record['val_acc_raw']
        return record


@dataclass
class Metrics:
    """metrics.json: a run's test evaluation (main.py's final_evaluation), C classes.

    test_loss, test_acc and ece (15 bins) of the probabilities in predictions.npz; per_class_acc
    (C,) and confusion_matrix (C, C) counts, rows true; best_val_acc and best_epoch of the weights
    evaluated (best.npz's, else the last), evaluated saying which; epochs_done of epochs_planned,
    stopped_early with stop_reason; wall_time_s of the whole run; train_images_per_s (median
    over epochs) and test_images_per_s; test_images (N); label_names (C); time_to_val_acc
    {'0.70': seconds or null, ...}; data_fingerprint {'train': sha256, 'test': sha256}
    (data_utils.fingerprint); tta, the test-time augmentation the figures are of (one of
    TTA_MODES); single_view, with a test-time augmentation, the same figures of the image as given.
    temperature: T of temperature scaling, fitted on the validation set's outputs of the parameters
    evaluated (metrics.fit_temperature); calibration {'raw': report, 'calibrated': report,
    'validation': {'images', 'nll', 'nll_calibrated'}}, each report metrics.calibration_report of the
    test predictions before and after dividing their log-probabilities by T. test_loss and ece stay
    the raw figures (the method's). time_to_val_acc, data_fingerprint, temperature and calibration
    are absent (None) in runs of earlier versions. code_commits: the commits of the code that trained
    and evaluated the run, in order (cli.code_commit; None outside git and in earlier runs).
    time_budgets_h: the --max-hours (None: none given) of each invocation that trained the run, in
    order; None in runs of earlier versions.
    """
    test_loss: float
    test_acc: float
    ece: float
    per_class_acc: list = None
    confusion_matrix: list = None
    best_val_acc: float = None
    best_epoch: int = None
    epochs_done: int = None
    epochs_planned: int = None
    stopped_early: bool = False
    stop_reason: str = None
    evaluated: str = None
    wall_time_s: float = None
    train_images_per_s: float = None
    test_images_per_s: float = None
    test_images: int = None
    label_names: list = None
    time_to_val_acc: dict = None
    data_fingerprint: dict = None
    single_view: dict = None
    tta: str = None
    temperature: float = None
    calibration: dict = None
    code_commits: list = None
    time_budgets_h: list = None

    @staticmethod
    def rules(n_classes):
        """What each field must be, for C = n_classes classes."""
        c = n_classes
        return {
            # Written with every test evaluation, so never null.
            'test_acc': (_fraction, 'a fraction in [0, 1]'),
            'test_loss': (_at_least_0, 'a finite loss >= 0'),
            'ece': (_fraction, 'a calibration error in [0, 1]'),
            'best_val_acc': FRACTION_OR_NULL,
            **dict.fromkeys(('wall_time_s', 'train_images_per_s', 'test_images_per_s'), AMOUNT_OR_NULL),
            **dict.fromkeys(('best_epoch', 'epochs_done', 'epochs_planned'), COUNT_OR_NULL),
            'stopped_early': (lambda v: v is None or isinstance(v, bool), 'true or false'),
            **dict.fromkeys(('stop_reason', 'evaluated'), TEXT_OR_NULL),
            'test_images': (_or_null(lambda v: _count(v) and v > 0), 'a number of test images or null'),
            'label_names': (_or_null(_texts), 'a list of class names'),
            'time_to_val_acc': (_or_null(_times), 'null or {accuracy: seconds or null}'),
            'single_view': (_or_null(_single_view), 'null or test_acc, ece (fractions in [0, 1]) and test_loss'),
            'tta': (_or_null(lambda v: v in TTA_MODES), f"null or one of {', '.join(map(repr, TTA_MODES))}"),
            'data_fingerprint': (_or_null(_fingerprints), "null or a 'test' sha256 in hex (data_utils.fingerprint)"),
            'temperature': (_or_null(_temperature), 'a finite temperature above 0 (or null)'),
            'calibration': (_or_null(_calibration), 'null or the raw and calibrated reports of '
                                                    'metrics.calibration_report'),
            'code_commits': (_or_null(_texts), 'null or a list of commits'),
            'time_budgets_h': (_or_null(_budgets), 'null or a list of time budgets in hours (positive '
                                                   'numbers or null)'),
            'per_class_acc': (_or_null(_table((c,), 'iuf', upper=1)), f'a list of {c} fractions in [0, 1]'),
            'confusion_matrix': (_or_null(_table((c, c), 'iu')), f'a {c} x {c} table of counts >= 0'),
        }

    @classmethod
    def from_json(cls, values, path, fix, n_classes):
        """The record of a dict read from metrics.json, checked field by field and as a whole."""
        record = _from_json(cls, values, path, fix, cls.rules(n_classes))
        if record.stopped_early is None:
            record.stopped_early = False
        problem = record.problem()
        if problem:
            raise RecordError(f'{path} is inconsistent: {problem}; {fix}', path)
        return record

    def problem(self):
        """How the record disagrees with itself, in a few words, or None: the report shows
        test_acc and per_class_acc next to figures drawn from the confusion matrix, and the raw and
        calibrated figures side by side."""
        if self.tta == 'none' and self.single_view is not None:
            return "it has single_view (the figures without test-time augmentation) but tta is 'none'"
        calibration = self.calibration_problem()
        if calibration or self.confusion_matrix is None:
            return calibration
        cm = np.asarray(self.confusion_matrix, dtype=np.int64)
        total, n = int(cm.sum()), self.test_images
        if n is not None and total != n:
            return f'its confusion_matrix counts {total} test images, test_images says {n}'
        if total > 0 and abs(self.test_acc - np.trace(cm) / total) > 1e-6:
            return (f'test_acc {self.test_acc:.4f} is not the accuracy of its confusion_matrix '
                    f'({np.trace(cm) / total:.4f})')
        per_class = np.diag(cm) / np.maximum(cm.sum(axis=1), 1)
        if self.per_class_acc is not None and np.abs(np.asarray(self.per_class_acc, float) - per_class).max() > 1e-6:
            return 'per_class_acc is not the per-class accuracy of its confusion_matrix'
        return None

    def calibration_problem(self):
        """How the temperature and the calibration reports disagree with the rest, or None."""
        if (self.temperature is None) != (self.calibration is None):
            return 'temperature and calibration are written together, but it has only one of them'
        if self.calibration is None:
            return None
        raw = self.calibration['raw']
        if abs(raw['ece'] - self.ece) > 1e-6:
            return f"calibration.raw.ece {raw['ece']:.6f} is not its ece ({self.ece:.6f})"
        for name in ('raw', 'calibrated'):
            acc = self.calibration[name].get('accuracy')
            if acc is not None and abs(acc - self.test_acc) > 1e-9:
                return (f'calibration.{name}.accuracy {acc:.4f} is not its test_acc ({self.test_acc:.4f}), '
                        f'which temperature scaling never changes')
        return None

    def to_json(self):
        record = asdict(self)
        for key in ('single_view', 'tta', 'temperature', 'calibration'):   # absent in older runs (single_view: with a TTA only)
            if record[key] is None:
                del record[key]
        return record

    def write(self, folder):
        write_json(Path(folder) / METRICS_NAME, self.to_json())


# float32 probabilities of one image sum to 1 within ~1e-6; 1e-3 only catches real damage.
PROB_SUM_TOLERANCE = 1e-3
# main.py writes CIFAR-10's 10 classes; past 100 a confusion matrix cannot be drawn or read.
MAX_CLASSES = 100


@dataclass
class Predictions:
    """predictions.npz: the test evaluation's arrays, N test images of C classes.

    probs (N, C) float32, rows in [0, 1] summing to 1; labels (N,) int64 in 0..C-1; indices
    (N,) int64, distinct rows of the test set (0..N-1 when a file lacks them); hidden (N, H)
    float32, the final RNN states (None when absent); probs_calibrated (N, C) float64, probs
    tempered by metrics.json's temperature (written with the preset key calibrated_predictions,
    else None).
    """
    probs: np.ndarray
    labels: np.ndarray
    indices: np.ndarray
    hidden: np.ndarray = None
    probs_calibrated: np.ndarray = None

    @property
    def n_classes(self):
        return self.probs.shape[1]

    @classmethod
    def from_arrays(cls, arrays, path, fix):
        """The record of predictions.npz's arrays, consistent with each other; RecordError otherwise."""
        if 'probs' not in arrays or 'labels' not in arrays:
            raise RecordError(f"{path} lacks the arrays 'probs' and 'labels'; {fix}", path)
        arrays = dict(arrays)
        arrays.setdefault('indices', np.arange(arrays['labels'].size))
        probs, labels, indices, hidden, calibrated = (
            arrays.get(k) for k in ('probs', 'labels', 'indices', 'hidden', 'probs_calibrated'))
        n = len(labels) if labels.ndim == 1 else -1
        consistent = (probs.ndim == 2 and len(probs) == n > 0 and 0 < probs.shape[1] <= MAX_CLASSES
                      and indices.shape == (n,)
                      and probs.dtype.kind == 'f' and labels.dtype.kind in 'iu' and indices.dtype.kind in 'iu'
                      and (hidden is None or (hidden.shape[:1] == (n,) and hidden.ndim == 2
                                              and hidden.dtype.kind in 'fiu'))
                      and (calibrated is None or (calibrated.shape == probs.shape and calibrated.dtype.kind == 'f')))
        if not consistent:
            shown = ', '.join(f'{k} {v.dtype}{v.shape}' for k, v in arrays.items())
            raise RecordError(f'{path} has inconsistent arrays ({shown}); expected float probs '
                              f'(N, 10), integer labels (N,) and indices (N,), hidden (N, H), '
                              f'probs_calibrated like probs; {fix}', path)
        record = cls(probs, labels, indices, hidden, calibrated)
        problem = record.problem()
        if problem:
            raise RecordError(f'{path} has {problem}; {fix}', path)
        return record

    def problem(self):
        """The first impossible value among arrays of consistent shapes, in words, or None."""
        probs, labels, indices, hidden = self.probs, self.labels, self.indices, self.hidden
        for name, p in (('', probs), ('calibrated ', self.probs_calibrated)):
            if p is None:
                continue
            if not np.isfinite(p).all():
                return f'non-finite {name}probabilities (NaN or infinite)'
            if p.min() < 0 or p.max() > 1:
                return f'{name}probabilities outside [0, 1]'
            sums = p.sum(axis=1, dtype=np.float64)
            worst = np.abs(sums - 1).argmax()
            if abs(sums[worst] - 1) > PROB_SUM_TOLERANCE:
                return f'rows of {name}probabilities that do not sum to 1 (e.g. {sums[worst]:.4f})'
        if self.probs_calibrated is not None and (self.probs_calibrated.argmax(1) != probs.argmax(1)).any():
            return ('calibrated probabilities whose most probable class differs from probs (temperature '
                    'scaling never changes it)')
        if hidden is not None and not np.isfinite(hidden).all():
            return 'non-finite hidden states'
        if labels.min() < 0 or labels.max() >= probs.shape[1]:
            return f'labels outside 0..{probs.shape[1] - 1}'
        if indices.min() < 0 or len(np.unique(indices)) != len(indices):
            return 'negative or repeated test-set indices'
        return None

    def to_arrays(self):
        arrays = {'probs': self.probs, 'labels': self.labels, 'indices': self.indices}
        if self.hidden is not None:
            arrays['hidden'] = self.hidden
        if self.probs_calibrated is not None:
            arrays['probs_calibrated'] = self.probs_calibrated
        return arrays

    def write(self, folder):
        write_npz(Path(folder) / PREDICTIONS_NAME, self.to_arrays())


class EventRecord:
    """What Divergence and Crash share: a small JSON file of their own (NAME) in a run folder,
    written when the event happens and removed when a resume moves past it."""

    @classmethod
    def from_json(cls, values, path, fix):
        return _from_json(cls, values, path, fix, cls.RULES)

    def to_json(self):
        return asdict(self)

    def write(self, folder):
        write_json(Path(folder) / self.NAME, self.to_json())

    @classmethod
    def remove(cls, folder):
        (Path(folder) / cls.NAME).unlink(missing_ok=True)


@dataclass
class Divergence(EventRecord):
    """diverged.json: where the loss (or a weight) became NaN or infinite, as data.

    main.py writes it when that happens (exit code 1) and removes it when a resume continues the
    run. epoch and step are 1-based, global_step counts every step of the run, lr is the rate of
    that step, loss what it became ('nan', 'inf', 'non-finite in W_hh'), message main.py's
    error: what happened, then (after ';') what to do.
    """
    epoch: int = None
    step: int = None
    global_step: int = None
    lr: float = None
    loss: str = None
    message: str = ''

    RULES = {**dict.fromkeys(('epoch', 'step', 'global_step'), COUNT_OR_NULL), 'lr': AMOUNT_OR_NULL,
             'loss': TEXT_OR_NULL, 'message': (_or_null(_text), 'a text')}
    NAME = DIVERGED_NAME

    @property
    def summary(self):
        """What happened, without the advice: 'the loss became nan at epoch 2, step 3 (lr 0.02)'."""
        return (self.message or '').split(';')[0] or 'the loss diverged'

    @classmethod
    def from_json(cls, values, path, fix):
        record = super().from_json(values, path, fix)
        record.message = record.message or ''
        return record


@dataclass
class Crash(EventRecord):
    """crashed.json: main.py stopped on an unexpected error, a bug (exit code 3).

    main.py writes it with the one-line report (the traceback goes to train.log) and removes it
    when a resume continues or re-evaluates the run. message is the error, e.g.
    'ValueError: boom'; during what the run was doing ('training', 'evaluation'); time when,
    in ISO format.
    """
    message: str
    during: str = None
    time: str = None

    RULES = {'message': (_text, 'a text'), 'during': TEXT_OR_NULL, 'time': TEXT_OR_NULL}
    NAME = CRASHED_NAME


# --------------------------------------------------------------------------
# Reading and writing each file of a run folder
# --------------------------------------------------------------------------

def read_config(folder, advice=repair_advice):
    """config.json as the dict of config.Config (build ``Config.from_dict`` where it is needed),
    or None if the run has none. Its seed and data folder are checked, and that no number in it
    is NaN or infinite; RunFileError / RecordError with ``advice(folder, name)`` as the fix."""
    path = Path(folder) / CONFIG_NAME
    if not present(path):
        return None
    fix = advice(folder, CONFIG_NAME)
    values = read_json(path, fix=fix)
    if not isinstance(values, dict):
        raise RecordError(f'{path} is not a JSON object; {fix}', path)
    check_values(values, CONFIG_RULES, path, fix)
    check_finite(values, path, fix)
    return values


def write_config(folder, config):
    """config.json from the dict of a config.Config (``cfg.to_dict()``)."""
    write_json(Path(folder) / CONFIG_NAME, config)


def read_history(folder, advice=repair_advice):
    """history.json as a list of EpochRecord (None if absent); RunFileError / RecordError."""
    path = Path(folder) / HISTORY_NAME
    if not present(path):
        return None
    fix = advice(folder, HISTORY_NAME)
    values = read_json(path, fix=fix)
    if not isinstance(values, list) or not all(isinstance(r, dict) for r in values):
        raise RecordError(f'{path} is not a list of per-epoch records; {fix}', path)
    return [EpochRecord.from_json(r, path, fix, i) for i, r in enumerate(values, 1)]


def write_history(folder, records):
    """history.json from EpochRecords (or their to_json dicts, as a checkpoint's state keeps them)."""
    write_json(Path(folder) / HISTORY_NAME, [r.to_json() if isinstance(r, EpochRecord) else r for r in records])


def read_metrics(folder, n_classes=None, advice=repair_advice):
    """metrics.json as a Metrics record (None if absent), for C = n_classes classes (default
    CIFAR-10's); RunFileError / RecordError."""
    if n_classes is None:
        from data_utils import NUM_CLASSES        # here: data_utils imports this module
        n_classes = NUM_CLASSES
    path = Path(folder) / METRICS_NAME
    if not present(path):
        return None
    fix = advice(folder, METRICS_NAME)
    return Metrics.from_json(read_json(path, fix=fix), path, fix, n_classes)


def read_predictions(folder, advice=repair_advice):
    """predictions.npz as a Predictions record (None if absent); RunFileError / RecordError."""
    path = Path(folder) / PREDICTIONS_NAME
    if not present(path):
        return None
    fix = advice(folder, PREDICTIONS_NAME)
    return Predictions.from_arrays(read_npz(path, fix=fix), path, fix)


def read_divergence(folder):
    """diverged.json as a Divergence record, or None; RunFileError / RecordError."""
    return _read_event(Divergence, folder, 'remove it if the run did not diverge')


def read_crash(folder):
    """crashed.json as a Crash record, or None; RunFileError / RecordError."""
    return _read_event(Crash, folder, 'remove it if the run did not crash')


def _read_event(cls, folder, fix):
    path = Path(folder) / cls.NAME
    if not present(path):
        return None
    fix = f'restore it, or {fix}'
    return cls.from_json(read_json(path, fix=fix), path, fix)


# --------------------------------------------------------------------------
# The checkpoint's metadata
# --------------------------------------------------------------------------

def checkpoint_meta(path):
    """The JSON metadata of a checkpoint written by main.py, reading only its 'meta' member:
    a dict holding at least ``run_config`` (config.Config's dict) and ``state``.

    Raises RunFileError, one sentence naming the file and what is wrong with it
    ('... is damaged or was not written by main.py (...), so it cannot be resumed').
    """
    def damaged(detail):
        return RunFileError(f'{path} is damaged or was not written by main.py ({detail}), so it cannot '
                            f'be resumed', path)
    try:
        with open_regular(path, 'rb') as raw, load_npz_archive(raw) as f:
            if 'meta' not in f.files:
                raise damaged('it has no meta member')
            meta = f['meta']
    except RunFileError:
        raise
    except OSError as e:
        if e.errno is not None:
            raise RunFileError(describe_os_error(e, path, 'read'), path) from None
        raise damaged(e) from None
    except (zipfile.BadZipFile, ValueError, EOFError, KeyError, zlib.error) as e:
        raise damaged(str(e) or type(e).__name__) from None
    try:
        if meta.ndim != 0 or meta.dtype.kind not in 'US':
            raise ValueError(f'its meta is a {meta.dtype} array of shape {meta.shape}, not a JSON text')
        text = meta.item()
        meta = json.loads(text.decode('utf-8') if isinstance(text, bytes) else text)
    except ValueError as e:
        raise damaged(f'unreadable meta: {e}') from None
    if not isinstance(meta, dict) or not isinstance(meta.get('run_config'), dict):
        raise damaged('its meta holds no run configuration')
    return meta


def verify_checkpoint(path):
    """Raise RunFileError unless a checkpoint reads whole: its metadata (checkpoint_meta) and every
    member (a truncated file or a bit flip fails here), every float array finite.

    main.py checks more on --resume (shapes, types and ranges of the state).
    """
    checkpoint_meta(path)      # first: it words a plain .npy, which read_npz does not expect
    arrays = read_npz(path)
    bad = next((name for name, a in arrays.items() if a.dtype.kind in 'fc' and not np.isfinite(a).all()), None)
    if bad:
        raise RunFileError(f'{path} holds {bad} with values that are not finite (NaN or infinite)', path)


# --------------------------------------------------------------------------
# The run folder's state: one vocabulary for every tool
# --------------------------------------------------------------------------

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
      finished          trained and evaluated (a folder whose checkpoint was removed but which holds
                        metrics.json, not stopped early, and predictions.npz counts as finished too)
      diverged          the loss became non-finite (diverged.json records where)
      damaged           cannot be used as it is; ``reason`` says why and what to do
    reason: one sentence for diverged and damaged (else '').
    epoch, epochs: epochs done and planned, from the checkpoint (None if there is none).
    file: the file a damaged state is about (ckpt.npz when the run has no checkpoint), else None.
    divergence, crash: the Divergence and Crash records of the folder, or None. A crash record
      leaves the state to the other files (a crashed run with a checkpoint is stopped).
    """
    state: str
    reason: str = ''
    epoch: int = None
    epochs: int = None
    file: Path = None
    divergence: Divergence = None
    crash: Crash = None

    @property
    def resumable(self):
        return self.state in (STOPPED, NEEDS_EVALUATION)


def status(folder):
    """The RunStatus of a run folder (a path as typed; links such as runs/latest are followed).

    Reads only what it needs: the lock, which files exist, diverged.json and crashed.json, and
    the checkpoint's metadata (not its arrays; metrics.json too when there is no checkpoint).
    Whether metrics.json and predictions.npz hold valid values is the business of their readers
    (read_run); here they only have to be regular files. Never blocks: a named pipe, a device
    or a folder where a file should be makes the folder damaged.
    """
    folder = Path(folder)
    if not folder.exists() and not folder.is_symlink():
        return RunStatus(NEW)
    try:
        folder = resolve_folder(folder, 'pass a run folder such as runs/latest')
        names = {p.name for p in folder.iterdir()} - {LOCK_NAME}
        for name in sorted(names & set(MAIN_FILES + RUN_FOLDER_FILES)):
            check_regular(folder / name)
        if folder_in_use(folder):
            return RunStatus(IN_USE, f'another process holds {folder / LOCK_NAME}')
    except RunFileError as e:
        return RunStatus(DAMAGED, str(e), file=e.path or folder)
    except OSError as e:
        return RunStatus(DAMAGED, describe_os_error(e, folder, 'read'), file=Path(e.filename or folder))
    if not names:
        return RunStatus(NEW)
    try:
        divergence, crash = read_divergence(folder), read_crash(folder)
    except RunFileError as e:
        return RunStatus(DAMAGED, str(e), file=e.path)
    if divergence is not None:
        found = RunStatus(DIVERGED, divergence.message or f'the loss diverged ({folder / DIVERGED_NAME})')
    elif CHECKPOINT_NAME in names:
        found = _status_from_checkpoint(folder, names)
    else:
        found = _status_without_checkpoint(folder, names)
    found.divergence, found.crash = divergence, crash
    return found


def _status_from_checkpoint(folder, names):
    path = folder / CHECKPOINT_NAME
    try:
        meta = checkpoint_meta(path)
        epoch, epochs = meta['state']['epoch'], meta['run_config']['epochs']
        if not all(_count(v) for v in (epoch, epochs)):
            raise TypeError
    except RunFileError as e:
        return RunStatus(DAMAGED, f'{e}; use another checkpoint, or start the run again in a new folder', file=path)
    except (KeyError, TypeError):
        return RunStatus(DAMAGED, f'{path} has no valid epoch in its metadata; it is damaged: start the run '
                                  f'again in a new folder', file=path)
    if epoch < epochs:
        return RunStatus(STOPPED, epoch=epoch, epochs=epochs)
    # main.py writes metrics.json, then predictions.npz: a stop between the two leaves only the first.
    evaluated = {METRICS_NAME, PREDICTIONS_NAME} <= names
    return RunStatus(FINISHED if evaluated else NEEDS_EVALUATION, epoch=epoch, epochs=epochs)


def _status_without_checkpoint(folder, names):
    """A folder without ckpt.npz: finished if it holds a test evaluation of a run that was not
    stopped early (its checkpoint was removed), else damaged: nothing can continue it."""
    path = folder / CHECKPOINT_NAME
    if {METRICS_NAME, PREDICTIONS_NAME} <= names:
        try:
            metrics = read_json(folder / METRICS_NAME)
        except RunFileError as e:
            return RunStatus(DAMAGED, str(e), file=e.path)
        if isinstance(metrics, dict) and metrics.get('stopped_early', False) is False:
            done, planned = metrics.get('epochs_done'), metrics.get('epochs_planned')
            return RunStatus(FINISHED, epoch=done if _count(done) else None,
                             epochs=planned if _count(planned) else None)
        return RunStatus(DAMAGED, f'{folder} stopped early and holds no checkpoint ({CHECKPOINT_NAME}) to '
                                  f'continue from; start the run again in a new folder', file=path)
    return RunStatus(DAMAGED, f'{folder} holds no checkpoint ({CHECKPOINT_NAME}): the run stopped before '
                              f'its first one, or the folder is not a run of main.py; start the run '
                              f'again in a new folder', file=path)


# --------------------------------------------------------------------------
# One entry point for readers
# --------------------------------------------------------------------------

def is_run_folder(path, certain=False):
    """True if ``path`` is a folder holding any file main.py writes (MAIN_FILES; a named pipe or a
    dangling link in its place counts: its reader names the problem).

    certain=True asks for both config.json and train.log, which main.py writes within moments of
    each other, so that a user's folder that merely holds a config.json is not taken for a run.
    """
    path = Path(path)
    if not path.is_dir():
        return False
    if certain:
        return all(os.path.lexists(path / name) for name in (CONFIG_NAME, LOG_NAME))
    return any(os.path.lexists(path / name) for name in MAIN_FILES)


@dataclass
class Run:
    """What read_run found in a run folder: its status and its records, None where a file is absent.

    folder: the real folder (links resolved); config: config.json's dict; history: [EpochRecord];
    metrics: Metrics; predictions: Predictions; missing: the names of those four files that are
    absent, in that order. The divergence and crash records are the status's.
    """
    folder: Path
    status: RunStatus
    config: dict = None
    history: list = None
    metrics: Metrics = None
    predictions: Predictions = None
    missing: list = field(default_factory=list)


def read_run(folder, advice=repair_advice):
    """Read a run folder (a path as typed; runs/latest is followed) through the contract.

    Every record is checked on its own and against the others (metrics.json's test_images
    against predictions.npz, its tables against the predictions' classes). A folder without any
    of main.py's files, a file that cannot be read (also a named pipe, a device, a folder or a
    dangling link where a file should be) raise RunFileError; a file that holds what main.py
    does not write raises RecordError; each one sentence naming the file, with
    ``advice(folder, name)`` as the fix (repair_advice: commands that work when typed). Never
    blocks, never writes.
    """
    given = folder
    folder = resolve_folder(folder, 'pass a run folder such as runs/latest')
    if not is_run_folder(folder):
        raise RunFileError(f'{given} is not a run folder (it has none of the files main.py writes, such as '
                           f'{CONFIG_NAME} or {HISTORY_NAME}); pass a folder written by main.py, such as '
                           f'runs/latest')
    run = Run(folder, status(folder))
    run.predictions = read_predictions(folder, advice)
    run.config = read_config(folder, advice)
    run.history = read_history(folder, advice)
    run.metrics = read_metrics(folder, run.predictions.n_classes if run.predictions else None, advice)
    run.missing = [name for name, value in ((CONFIG_NAME, run.config), (HISTORY_NAME, run.history),
                                            (METRICS_NAME, run.metrics), (PREDICTIONS_NAME, run.predictions))
                   if value is None]
    n = run.metrics.test_images if run.metrics else None
    if run.predictions is not None and n is not None and len(run.predictions.labels) != n:
        path = folder / METRICS_NAME
        raise RecordError(f'{path} is inconsistent: test_images says {n}, {PREDICTIONS_NAME} holds '
                          f'{len(run.predictions.labels)}; {advice(folder, METRICS_NAME)}', path)
    return run
