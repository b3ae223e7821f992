"""CIFAR-10 for the model: download, verify, extract, load, split, normalize, batch.

Images stay uint8 in NCHW order, as the archive stores them (~180 MB for all of
CIFAR-10), and become float32 one mini-batch at a time:

    data = load_cifar10('data', subset=0.4, val_fraction=0.1, seed=0)
    mean, std = channel_mean_std(data['X_train'])
    train = BatchIterator(data['X_train'], data['y_train'], 128, shuffle=True,
                          augment=True, seed=0, mean=mean, std=std)
    for epoch in range(num_epochs):
        for X_batch, y_batch in train.epoch(epoch):   # (128, 3, 32, 32) float32
            ...

Every problem with the files on disk or the download raises `DataError`, whose
message is one sentence naming the file and the fix; bad arguments raise
`ValueError`. Callers print the message and exit, without a traceback.
"""
import codecs
import contextlib
import fcntl
import gzip
import hashlib
import os
import pickle
import re
import shlex
import shutil
import stat
import sys
import tarfile
import tempfile
import urllib.request
import zlib
from pathlib import Path

import numpy as np
from tqdm import tqdm

from runfiles import TTA_MODES, NotRegularFile, file_kind, open_regular

if not hasattr(tarfile, 'data_filter') or not hasattr(hashlib, 'file_digest'):
    raise ImportError(f'this project needs Python 3.11.4 or newer (tarfile extraction filters, '
                      f'hashlib.file_digest), not {sys.version.split()[0]}; install a newer Python')

CIFAR10_URL = 'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz'
CIFAR10_MD5 = 'c58f30108f718f92721af3b95e74349a'  # md5 of the official archive
ARCHIVE_NAME = 'cifar-10-python.tar.gz'
FOLDER_NAME = 'cifar-10-batches-py'
TRAIN_BATCHES = tuple(f'data_batch_{i}' for i in range(1, 6))
TEST_BATCH = 'test_batch'
META_FILE = 'batches.meta'
REQUIRED_FILES = TRAIN_BATCHES + (TEST_BATCH, META_FILE)
NUM_CLASSES = 10
IMAGE_SHAPE = (3, 32, 32)
IMAGE_SIZE = 3 * 32 * 32

_EXTRACT_PREFIX = '.cifar-10-extract-'  # temp folders; never named like the real one
# Exactly the names tempfile.mkdtemp gives them: only these are ever removed as stale.
_EXTRACT_NAME = re.compile(re.escape(_EXTRACT_PREFIX) + r'[a-z0-9_]{8}')
_EXTRACT_LOCK = '.lock'  # in each temp folder; flock'ed by its extraction until it is done
_md5_warned = set()  # archives already warned about in this process
# Errors that mean an archive's bytes are damaged (BadGzipFile is an OSError).
_CORRUPT_ARCHIVE = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)


class DataError(Exception):
    """A data file is missing, corrupt or unsafe, or the download failed; the
    message is one sentence naming the file and the fix, to show as it is."""


# ----------------------------------------------------------------------------
# Download, verify, extract
# ----------------------------------------------------------------------------

def _paths(data_dir):
    """(archive, extracted folder): the Paths of the two forms data_dir may hold."""
    return Path(data_dir) / ARCHIVE_NAME, Path(data_dir) / FOLDER_NAME


def _redownload_hint(data_dir):
    """The fix for a damaged file: delete the data and fetch it again."""
    archive, folder = _paths(data_dir)
    return (f'delete {folder} and {archive} and run again to re-download (or put a '
            f'good copy of the archive at {archive} by hand)')


def _reason(exc):
    """Short human reason for an exception (a URLError wraps the real one)."""
    reason = getattr(exc, 'reason', None) or getattr(exc, 'strerror', None) or exc
    return str(reason) or type(exc).__name__


def _kind(path):
    """What path is, links followed: None if nothing is there (or a link to nothing),
    else runfiles.file_kind's words ('a regular file', 'a folder', 'a device', ...)."""
    try:
        return file_kind(os.stat(path).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _what(path, kind):
    """kind as said of path: 'a file', 'a device' or 'a link to /dev/zero, a device'."""
    kind = 'a file' if kind == 'a regular file' else kind
    return f'a link to {os.path.realpath(path)}, {kind}' if os.path.islink(path) else kind


def _move_away(path):
    """A command that moves path aside, as typed in a shell."""
    return f'mv {shlex.quote(str(path))} {shlex.quote(str(path) + ".old")}'


def _archive_error(archive, kind):
    """The DataError for an archive path that is kind (file_kind words), not a regular file."""
    return DataError(f'{archive} is {_what(archive, kind)}, not a CIFAR-10 archive; move it '
                     f'away ({_move_away(archive)}), then put the archive there by hand or '
                     f'run main.py to download it')


def _check_folders(data_dir):
    """DataError if data_dir or its cifar-10-batches-py exists but is not a folder."""
    data_dir = Path(data_dir)
    folder = data_dir / FOLDER_NAME
    try:
        kind = _kind(data_dir)
        if kind is None and data_dir.is_symlink():
            raise DataError(f'the data folder {data_dir} is a broken link; point it at a '
                            f'folder or delete it, then run again')
        if kind not in (None, 'a folder'):
            raise DataError(f'the data folder {data_dir} is {_what(data_dir, kind)}; pass a '
                            f'folder that holds (or may hold) {FOLDER_NAME}/ or {ARCHIVE_NAME}')
        kind = _kind(folder)
        if kind is None and folder.is_symlink():
            raise DataError(f'{folder} is a broken link, not the extracted CIFAR-10 folder; '
                            f'delete it (rm {shlex.quote(str(folder))}) and run again')
        if kind not in (None, 'a folder'):
            raise DataError(f'{folder} is {_what(folder, kind)}, not the extracted CIFAR-10 '
                            f'folder; move it away and run again to extract the archive afresh')
    except OSError as e:  # e.g. a parent folder without search permission
        raise DataError(f'cannot access {data_dir} ({_reason(e)}); fix its permissions '
                        f'or pass another data folder') from e


def md5sum(path):
    """Hex md5 of a regular file (or a link to one), read in chunks.

    Raises runfiles.NotRegularFile (an OSError) for a named pipe, a device or a
    folder, which would otherwise block or never end.
    """
    with open_regular(path) as f:
        return hashlib.file_digest(f, 'md5').hexdigest()


def _open_archive(archive, fix):
    """The archive opened for binary reading, or DataError (missing, not a regular file,
    unreadable). Opened through runfiles.open_regular, so a named pipe never blocks."""
    try:
        return open_regular(archive)
    except NotRegularFile as e:
        raise _archive_error(archive, e.kind) from None
    except FileNotFoundError:
        if archive.is_symlink():
            raise DataError(f'{archive} is a broken link; point it at a copy of '
                            f'{ARCHIVE_NAME} or delete it and run again') from None
        raise DataError(f'{archive} is missing; put the CIFAR-10 python archive there by '
                        f'hand or run again with network access to download it') from None
    except OSError as e:
        raise DataError(f'could not read {archive} ({_reason(e)}); check its permissions '
                        f'or {fix}') from e


def _start_download(archive):
    """Open archive's `.part` file for a new download (binary, exclusive); return it."""
    part = archive.with_name(ARCHIVE_NAME + '.part')
    kind = _kind(part)
    if kind not in (None, 'a regular file') and not part.is_symlink():
        raise DataError(f'{part} is {kind}, not a partial download; move it away '
                        f'({_move_away(part)}) and run again')
    try:
        archive.parent.mkdir(parents=True, exist_ok=True)
        # A killed download's leftover (or a link) is replaced, never written through.
        part.unlink(missing_ok=True)
        return open(part, 'xb')
    except OSError as e:
        raise DataError(f'could not write {part} ({_reason(e)}); make {archive.parent} '
                        f'writable or pass another data folder') from e


def download_cifar10(data_dir='data', url=CIFAR10_URL, expected_md5=CIFAR10_MD5,
                     timeout=30.0):
    """Download the archive into data_dir unless the archive or the extracted
    folder is already there; return the archive's path (str).

    The bytes are streamed to `<archive>.part` with a progress bar, their md5
    checked against expected_md5, and only then renamed into place, so an
    interrupted or corrupted download never leaves a file that looks finished.
    `timeout` (seconds) applies to the connection and to each read.
    """
    archive, folder = _paths(data_dir)
    _check_folders(data_dir)
    kind = _kind(archive)
    if kind == 'a regular file' or folder.is_dir():
        return str(archive)
    if kind is not None:  # checked first: the rename would replace it, after the download
        raise _archive_error(archive, kind)
    if archive.is_symlink():
        raise DataError(f'{archive} is a broken link; point it at a copy of {ARCHIVE_NAME} '
                        f'or delete it and run again to download')
    f = _start_download(archive)
    part = Path(f.name)
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with f, urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get('Content-Length') or 0) or None
            with tqdm(total=total, unit='B', unit_scale=True, unit_divisor=1024,
                      desc=f'downloading {ARCHIVE_NAME}') as bar:
                for chunk in iter(lambda: response.read(1 << 20), b''):
                    f.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        if digest.hexdigest() != expected_md5:
            raise DataError(f'the file downloaded from {url} has md5 {digest.hexdigest()} '
                            f'instead of {expected_md5}, so it was discarded; run again to '
                            f'retry, or put the official archive at {archive} by hand')
        os.replace(part, archive)
    except BaseException as e:  # URLError, timeout, full disk, Ctrl-C, ...
        part.unlink(missing_ok=True)  # never leave a partial file
        if isinstance(e, DataError) or not isinstance(e, Exception):
            raise
        raise DataError(f'could not download {url} ({_reason(e)}); download it yourself '
                        f'and put it at {archive}, then run again') from e
    return str(archive)


# Extraction happens in a temp folder beside the real one. A run killed while
# extracting (SIGKILL, power loss) leaves that folder behind, so every run first
# removes the stale ones; each extraction holds an flock on <its folder>/.lock
# until it is done, and the kernel drops the lock when the process dies, so a
# folder whose lock can be taken without waiting is stale, and one whose lock is
# held belongs to a run extracting right now.

def _lock_new_folder(tmp):
    """flock tmp/.lock for the extraction that just created tmp; return the open file
    descriptor, or None when a clean-up claimed tmp first (it then removes tmp)."""
    lock = tmp / _EXTRACT_LOCK
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except (FileExistsError, FileNotFoundError):  # a clean-up made the lock, or removed tmp
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # A clean-up may have taken the lock, removed tmp and let go in between.
        if os.stat(lock, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
            return fd
    except (BlockingIOError, FileNotFoundError):
        pass
    os.close(fd)
    return None


@contextlib.contextmanager
def _extraction_folder(parent):
    """A new temp folder in parent (a Path), locked while the with-block runs, then removed."""
    for _ in range(10):  # a clean-up claims a brand-new folder only in a microsecond race
        tmp = Path(tempfile.mkdtemp(prefix=_EXTRACT_PREFIX, dir=parent))
        fd = _lock_new_folder(tmp)
        if fd is not None:
            break
    else:
        raise OSError(f'could not lock a temporary folder in {parent}')
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # still locked: no clean-up runs into it
        os.close(fd)


def _remove_if_stale(tmp):
    """Remove tmp (a Path named like our temp folders) if it is a folder holding only
    what an extraction puts there and no process holds its lock; True if removed."""
    try:
        if not stat.S_ISDIR(os.lstat(tmp).st_mode):
            return False  # we only ever make folders: a file or link is someone else's
        if not set(os.listdir(tmp)) <= {_EXTRACT_LOCK, FOLDER_NAME}:
            return False  # holds something an extraction never writes: not ours to remove
        # O_CREAT: an extraction killed before it made its lock file leaves none.
        fd = os.open(tmp / _EXTRACT_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW
                     | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: still extracting
        shutil.rmtree(tmp)
        return True
    except OSError:  # locked, or not ours to remove (permissions): left for later
        return False
    finally:
        os.close(fd)


def _remove_stale_extractions(data_dir):
    """Remove the temp folders that killed extractions left in data_dir; return their names.

    Never touches a folder another process is extracting into, nor anything not
    named exactly like the temp folders tempfile.mkdtemp makes for us.
    """
    try:
        names = os.listdir(data_dir)
    except OSError:  # no data folder yet, or unreadable: nothing we could clean
        return []
    return [name for name in sorted(names) if _EXTRACT_NAME.fullmatch(name)
            and _remove_if_stale(Path(data_dir) / name)]


_MEMBER_KINDS = {tarfile.SYMTYPE: 'a symbolic link', tarfile.LNKTYPE: 'a hard link',
                 tarfile.CHRTYPE: 'a device', tarfile.BLKTYPE: 'a device',
                 tarfile.FIFOTYPE: 'a named pipe (FIFO)'}


def _check_member(member, archive, fix, seen):
    """DataError unless the TarInfo member is the folder cifar-10-batches-py or a regular
    file directly in it, met once (seen: the file names met so far, updated).

    The official archive holds nothing else. Links are refused whatever their
    target: tarfile's 'data' filter accepts one that stays inside the folder, and
    a data_batch_1 that links to test_batch makes a run train on the test images.
    """
    name = member.name
    head, _, base = name.partition('/')
    if head != FOLDER_NAME:  # also '../x' and '/x' (which filter='data' would re-root)
        raise DataError(f'{archive} contains the member {name!r} outside {FOLDER_NAME}/, '
                        f'so it was refused; {fix}')
    kind = _MEMBER_KINDS.get(member.type, f'of tar type {member.type!r}')
    if member.issym() or member.islnk():
        raise DataError(f'{archive} contains {name!r}, {kind} to {member.linkname!r}, and '
                        f'links are refused (the official archive holds none); {fix}')
    if not (member.isfile() or member.isdir()):
        raise DataError(f'{archive} contains {name!r}, which is {kind}, not a file; {fix}')
    plain = (name == FOLDER_NAME if member.isdir()
             else base not in ('', '.', '..') and '/' not in base)
    if not plain:
        raise DataError(f'{archive} contains {name!r}, which is not a file directly in '
                        f'{FOLDER_NAME}/ as in the official archive; {fix}')
    if member.isfile():
        if name in seen:  # extraction would keep the last copy, a stream read the first
            raise DataError(f'{archive} contains {name!r} twice, so which copy is meant is '
                            f'unclear; {fix}')
        seen.add(name)


def _extract_into_place(f, archive, folder, fix):
    """Extract the open archive file f into a locked temp folder beside folder, then
    rename its cifar-10-batches-py to folder (Path) once every required file is there."""
    try:
        with (_extraction_folder(archive.parent) as tmp,
              tarfile.open(fileobj=f, mode='r:*') as tar):
            seen = set()
            for member in tar:  # one pass: extractall() would decompress it twice
                _check_member(member, archive, fix, seen)
                tar.extract(member, tmp, filter='data')  # needs Python >= 3.11.4
            extracted = tmp / FOLDER_NAME
            for name in REQUIRED_FILES:
                if not (extracted / name).is_file():
                    raise DataError(f'{archive} does not contain {FOLDER_NAME}/{name}; {fix}')
            try:
                os.replace(extracted, folder)
            except OSError:
                if not folder.is_dir():  # else another process extracted it first
                    raise
    except tarfile.FilterError as e:  # a second line of defence behind _check_member
        raise DataError(f'{archive} contains an unsafe member ({e}), so it was not '
                        f'extracted; {fix}') from e
    except _CORRUPT_ARCHIVE as e:
        raise DataError(f'{archive} is truncated or corrupt ({_reason(e)}); {fix}') from e
    except OSError as e:  # full disk, read-only or unwritable data folder
        raise DataError(f'could not extract {archive} into {archive.parent} ({_reason(e)}); '
                        f'free some disk space or make that folder writable (or pass '
                        f'another data folder), then run again') from e


def extract_cifar10(data_dir='data', check_md5=True):
    """Extract data_dir/cifar-10-python.tar.gz into data_dir/cifar-10-batches-py
    (unless that exists); return the folder's path (str).

    Safe: the archive must be a regular file (or a link to one), and only the
    folder cifar-10-batches-py/ and regular files directly in it are accepted (no
    links, devices or paths that would leave the folder; _check_member).
    Atomic: the members go to a hidden temp folder inside data_dir, renamed into
    place only once every required file is there, so a crash never leaves a
    half-extracted cifar-10-batches-py (and the next run removes the temp folder).

    With check_md5, an archive whose md5 is not the official one (placed by
    hand, e.g. a re-packed copy) gets one warning line on stderr, once per
    archive per process, and is used anyway.
    """
    archive, folder = _paths(data_dir)
    _check_folders(data_dir)
    _remove_stale_extractions(data_dir)
    if folder.is_dir():
        return str(folder)
    fix = f'delete {archive} and run again to re-download it'
    with _open_archive(archive, fix) as f:  # one descriptor: md5 and extraction see one file
        try:
            md5 = hashlib.file_digest(f, 'md5').hexdigest() if check_md5 else None
            f.seek(0)
        except OSError as e:
            raise DataError(f'could not read {archive} ({_reason(e)}); check its '
                            f'permissions or {fix}') from e
        _extract_into_place(f, archive, folder, fix)
    if md5 is not None and md5 != CIFAR10_MD5:
        key = (os.path.realpath(archive), md5)
        if key not in _md5_warned:
            _md5_warned.add(key)
            print(f'warning: {archive} has md5 {md5}, not the official {CIFAR10_MD5}; '
                  f'using it as placed by hand', file=sys.stderr)
    return str(folder)


def prepare_cifar10(data_dir='data', url=None, expected_md5=None):
    """Make sure data_dir/cifar-10-batches-py exists; return its path (str).

    Uses the extracted folder if present, else extracts the archive (downloaded
    earlier or placed by hand), else downloads it first from `url` (default
    CIFAR10_URL) checking `expected_md5` (default CIFAR10_MD5). Either way, the
    temp folders of extractions killed earlier are removed first.
    """
    archive, folder = _paths(data_dir)
    _check_folders(data_dir)
    _remove_stale_extractions(data_dir)
    if folder.is_dir():
        return str(folder)
    downloaded = not os.path.lexists(archive)
    if downloaded:
        download_cifar10(data_dir, url or CIFAR10_URL, expected_md5 or CIFAR10_MD5)
    # A fresh download was just verified; only a hand-placed archive is hashed.
    return extract_cifar10(data_dir, check_md5=not downloaded)


# ----------------------------------------------------------------------------
# Reading the pickled batches
# ----------------------------------------------------------------------------

# Unpickling can run arbitrary code, so only the few globals that numpy arrays
# need are allowed: those written by Python 2 (the official archive) and by
# Python 3 with any protocol, under numpy 1's and numpy 2's module names.
try:
    from numpy._core import multiarray as _np_multiarray, numeric as _np_numeric
except ImportError:  # numpy < 2
    from numpy.core import multiarray as _np_multiarray, numeric as _np_numeric
_SAFE_GLOBALS = {('numpy', 'ndarray'): np.ndarray, ('numpy', 'dtype'): np.dtype,
                 ('_codecs', 'encode'): codecs.encode}
for _core in ('numpy.core', 'numpy._core'):
    _SAFE_GLOBALS[(f'{_core}.multiarray', '_reconstruct')] = _np_multiarray._reconstruct
    if hasattr(_np_numeric, '_frombuffer'):
        _SAFE_GLOBALS[(f'{_core}.numeric', '_frombuffer')] = _np_numeric._frombuffer


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        # Returning the objects directly also skips numpy 2's numpy.core shim
        # and its deprecation warning.
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f'unexpected object {module}.{name}') from None


def _unpickle(f, name, fix):
    """The dict pickled in the open binary file f, with str keys (a Python 2
    pickle has bytes keys). name and fix word the DataError for a damaged file."""
    try:
        obj = _SafeUnpickler(f, encoding='bytes').load()
    except Exception as e:  # any failure to decode means the file is damaged
        raise DataError(f'{name} is corrupt ({type(e).__name__}: {e}); {fix}') from e
    if not isinstance(obj, dict):
        raise DataError(f'{name} is corrupt (not a dict); {fix}')
    return {(k.decode('latin1') if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _unpickle_file(path, fix):
    """_unpickle for a file on disk, which must be a regular file or a link to one
    (a named pipe would block the read forever, a device never end)."""
    try:
        with open_regular(path) as f:
            return _unpickle(f, path, fix)
    except NotRegularFile as e:
        raise DataError(f'{path} is {_what(path, e.kind)}, not a regular file; {fix}') from None
    except FileNotFoundError:
        raise DataError(f'{path} is missing; {fix}') from None
    except OSError as e:
        raise DataError(f'could not read {path} ({_reason(e)}); check its permissions '
                        f'or {fix}') from e


def _unpickle_members(archive, names, fix):
    """_unpickle for the members cifar-10-batches-py/<name> of the archive (a Path), in
    the order of names. The archive is streamed once, to its end, and every member
    checked as extraction checks it (_check_member: no links, no duplicates, ...),
    so both read the same archive the same way; nothing touches the disk."""
    found = {f'{FOLDER_NAME}/{name}': None for name in names}
    seen = set()
    with _open_archive(archive, fix) as f:
        try:
            with tarfile.open(fileobj=f, mode='r|*') as tar:
                for member in tar:  # the official archive ends with batches.meta, readme.html
                    _check_member(member, archive, fix, seen)
                    if member.name in found:
                        found[member.name] = _unpickle(tar.extractfile(member),
                                                       f'{member.name} in {archive}', fix)
        except _CORRUPT_ARCHIVE as e:
            raise DataError(f'{archive} is truncated or corrupt ({_reason(e)}); {fix}') from e
        except OSError as e:
            raise DataError(f'could not read {archive} ({_reason(e)}); check its '
                            f'permissions or {fix}') from e
    for member, d in found.items():
        if d is None:
            raise DataError(f'{archive} does not contain {member}; {fix}')
    return list(found.values())


# Words for the labels' dtype kinds that are not whole numbers.
_LABEL_KINDS = {'b': 'true/false', 'f': 'floating-point', 'c': 'complex', 'U': 'text',
                'S': 'bytes', 'O': 'mixed'}


def _batch_arrays(d, name, fix):
    """Check an unpickled batch dict; return X uint8 (n, 3072) and y int64 (n,)."""
    if 'data' not in d or 'labels' not in d:
        raise DataError(f'{name} has no data/labels entries; {fix}')
    try:
        X, y = np.asarray(d['data']), np.asarray(d['labels'])
    except (ValueError, TypeError):  # e.g. rows of different lengths
        raise DataError(f'{name} has data or labels that are not rectangular arrays; '
                        f'{fix}') from None
    if X.ndim != 2 or X.shape[1] != IMAGE_SIZE or y.shape != (X.shape[0],):
        raise DataError(f'{name} has images of shape {X.shape} and labels of shape '
                        f'{y.shape}, expected (n, {IMAGE_SIZE}) and (n,); {fix}')
    if X.dtype != np.uint8:
        if X.dtype.kind not in 'iu' or (X.size and (X.min() < 0 or X.max() > 255)):
            raise DataError(f'{name} has {X.dtype} pixels, expected uint8 0..255; {fix}')
        X = X.astype(np.uint8)
    # An empty list of labels is float64 to numpy: only non-empty labels have a type.
    if y.size and y.dtype.kind not in 'iu':  # 3.0 is not a class index, even if it looks like 3
        words = _LABEL_KINDS.get(y.dtype.kind, str(y.dtype))
        raise DataError(f'{name} has {words} labels ({y.dtype}, e.g. {y[:1].tolist()!r}) '
                        f'where whole numbers 0..{NUM_CLASSES - 1} are expected; {fix}')
    if y.size and (y.min() < 0 or y.max() >= NUM_CLASSES):
        bad = y[(y < 0) | (y >= NUM_CLASSES)][:1]
        raise DataError(f'{name} has labels outside 0..{NUM_CLASSES - 1} '
                        f'(e.g. {bad.tolist()!r}); {fix}')
    return X, y.astype(np.int64)


def _label_name(n, name, fix):
    """One class name of batches.meta as str: bytes must be UTF-8 text, and a name must be
    printable (it goes into messages, figures and report.md)."""
    if isinstance(n, bytes):
        try:
            n = n.decode('utf-8')
        except UnicodeDecodeError:
            raise DataError(f'{name} has label names that are not valid UTF-8 text (e.g. '
                            f'{n[:40]!r}); {fix}') from None
    if not isinstance(n, str):
        raise DataError(f'{name} has label names of type {type(n).__name__} where text is '
                        f'expected; {fix}')
    if not n.strip() or not n.isprintable():
        raise DataError(f'{name} has the label name {n[:40]!r}, which is empty or holds '
                        f'control characters; {fix}')
    return n


def _label_names(d, name, fix):
    """The 10 class names (list of str) of an unpickled batches.meta dict."""
    names = d.get('label_names')
    if not isinstance(names, (list, tuple)) or len(names) != NUM_CLASSES:
        raise DataError(f'{name} does not list {NUM_CLASSES} label_names; {fix}')
    return [_label_name(n, name, fix) for n in names]


def fingerprint(X, y):
    """What identifies a set of images: the sha256 (hex) of its uint8 pixels and int64 labels.

    Runs record the fingerprints of the data they trained and were tested on, so a
    resume, a re-evaluation or a comparison on other images is refused, not
    silently mixed. Inputs: X uint8 (N, 3, 32, 32) or (N, 3072); y int (N,).
    """
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(X, dtype=np.uint8).data)
    digest.update(np.ascontiguousarray(y, dtype=np.int64).data)
    return digest.hexdigest()


def load_batch(path, data_dir=None):
    """Load one CIFAR-10 batch file.

    Inputs:
    - path: a data_batch_k or test_batch file
    - data_dir: only words the fix in error messages (default: two levels up)

    Returns a tuple of:
    - X: (n, 3072) uint8, one flattened NCHW image per row
    - y: (n,) int64 labels in 0..9
    """
    fix = _redownload_hint(data_dir or Path(path).parent.parent)
    return _batch_arrays(_unpickle_file(path, fix), path, fix)


def load_test_set(data_dir='data'):
    """The CIFAR-10 test images and class names, without extracting anything.

    Reads test_batch and batches.meta from data_dir/cifar-10-batches-py/ if it
    exists, else straight out of data_dir/cifar-10-python.tar.gz (decompressed
    in memory; nothing is written to disk).

    Inputs:
    - data_dir: folder with cifar-10-batches-py/ or cifar-10-python.tar.gz

    Returns a tuple of:
    - X: (N, 3, 32, 32) uint8, NCHW
    - y: (N,) int64 labels in 0..9
    - label_names: list of the 10 class names
    """
    archive, folder = _paths(data_dir)
    _check_folders(data_dir)
    fix = _redownload_hint(data_dir)
    if folder.is_dir():
        sources = [folder / TEST_BATCH, folder / META_FILE]
        test, meta = [_unpickle_file(path, fix) for path in sources]
    elif os.path.lexists(archive):  # whatever it is: _open_archive says what is wrong
        sources = [f'{FOLDER_NAME}/{name} in {archive}' for name in (TEST_BATCH, META_FILE)]
        test, meta = _unpickle_members(archive, (TEST_BATCH, META_FILE), fix)
    else:
        raise DataError(f'found neither {folder}/ nor {archive}; pass --data-dir pointing '
                        f'at the folder that holds {FOLDER_NAME}/ or the archive')
    X, y = _batch_arrays(test, sources[0], fix)
    return X.reshape((-1,) + IMAGE_SHAPE), y, _label_names(meta, sources[1], fix)


def _training_images(paths, data_dir, ys, train_idx, val_idx):
    """The second pass over the training batches: each batch's chosen rows go straight
    into the train and val arrays, and its pixels into the sha256 of the training set.

    Inputs:
    - paths: the batch files, in archive order
    - ys: the (n_k,) int64 labels of each of them, from the first pass (N in all)
    - train_idx, val_idx: int indices into the N images (split_indices)

    Returns a tuple of:
    - X_train: (len(train_idx), 3072) uint8
    - X_val: (len(val_idx), 3072) uint8
    - fingerprint: hex sha256 of all N images and then y, equal to
      fingerprint(np.concatenate(all X), np.concatenate(ys)) without holding all
      images at once
    """
    X_train = np.empty((len(train_idx), IMAGE_SIZE), np.uint8)
    X_val = np.empty((len(val_idx), IMAGE_SIZE), np.uint8)
    digest = hashlib.sha256()
    start = 0
    for path, y_first in zip(paths, ys):
        Xb, yb = load_batch(path, data_dir)
        stop = start + len(Xb)
        # The rows were chosen, and the labels are hashed, from the first pass's read.
        if not np.array_equal(yb, y_first):
            raise DataError(f'{path} changed while it was being read; wait until nothing '
                            f'writes to {path.parent} and run again')
        digest.update(np.ascontiguousarray(Xb).data)
        for idx, out in ((train_idx, X_train), (val_idx, X_val)):
            here = (idx >= start) & (idx < stop)
            out[here] = Xb[idx[here] - start]
        start = stop
    for y_first in ys:
        digest.update(np.ascontiguousarray(y_first, dtype=np.int64).data)
    return X_train, X_val, digest.hexdigest()


def load_cifar10(data_dir='data', subset=1.0, val_fraction=0.1, seed=0):
    """Load CIFAR-10 (downloading and extracting it first if needed) and split it.

    Inputs:
    - data_dir: folder with cifar-10-batches-py/ or cifar-10-python.tar.gz
    - subset: fraction in (0, 1] of the 50,000 training images to use
    - val_fraction: fraction in (0, 1) of that subset held out for validation
    - seed: the stratified subset and split depend only on this (split_indices)

    Returns a dict with:
    - X_train, X_val, X_test: (N, 3, 32, 32) uint8
    - y_train, y_val, y_test: (N,) int64 labels in 0..9
    - label_names: list of the 10 class names
    - fingerprint: {'train': hex, 'test': hex}, what identifies the data whatever
      subset, split and seed: fingerprint() of all training images of the five
      batches in archive order with their labels, and of the test set
    subset=0.4 gives 18,000 train, 2,000 val; test is always the full 10,000.
    """
    _check_fraction('subset', subset, allow_one=True)
    _check_fraction('val_fraction', val_fraction, allow_one=False)
    folder = Path(prepare_cifar10(data_dir))
    fix = _redownload_hint(data_dir)
    label_names = _label_names(_unpickle_file(folder / META_FILE, fix),
                               folder / META_FILE, fix)
    # Two passes over the five batches: the labels first, to choose the rows,
    # then each batch's chosen rows straight into the train and val arrays, so
    # the 150 MB of training images are never held twice (peak about 250 MB
    # instead of 310 MB, for about 0.1 s more).
    paths = [folder / name for name in TRAIN_BATCHES]
    ys = [load_batch(path, data_dir)[1] for path in paths]
    y = np.concatenate(ys)
    train_idx, val_idx = split_indices(y, subset, val_fraction, seed)
    X_train, X_val, train_print = _training_images(paths, data_dir, ys, train_idx, val_idx)
    X_test, y_test = load_batch(folder / TEST_BATCH, data_dir)
    return {
        'X_train': X_train.reshape((-1,) + IMAGE_SHAPE), 'y_train': y[train_idx],
        'X_val': X_val.reshape((-1,) + IMAGE_SHAPE), 'y_val': y[val_idx],
        'X_test': X_test.reshape((-1,) + IMAGE_SHAPE), 'y_test': y_test,
        'label_names': label_names,
        'fingerprint': {'train': train_print, 'test': fingerprint(X_test, y_test)},
    }


# ----------------------------------------------------------------------------
# Subset and split
# ----------------------------------------------------------------------------

def _check_fraction(name, value, allow_one):
    """ValueError unless 0 < value < 1 (or <= 1 when allow_one)."""
    ok = (isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
          and 0 < value and (value <= 1 if allow_one else value < 1))
    if not ok:
        bound = '1]' if allow_one else '1)'
        raise ValueError(f'{name} must be a number in (0, {bound}, got {value!r}')


def apportion(weights, total):
    """Split the integer total into integer parts proportional to weights.

    Largest-remainder rounding: each part gets the floor of its exact share
    total * w / sum(weights), and the units left over go one each to the parts
    with the largest remainders (ties to the lower index). So the parts sum to
    total, and each is within one of its exact share and at most its weight.

    Inputs:
    - weights: (K,) non-negative ints, e.g. the number of samples per class
    - total: int in 0..sum(weights)

    Returns:
    - parts: (K,) int64
    """
    weights = np.asarray(weights).astype(np.int64)
    if weights.ndim != 1 or (weights < 0).any() or not 0 <= total <= weights.sum():
        raise ValueError(f'apportion needs 1-D non-negative weights and 0 <= total <= '
                         f'their sum, got {weights.shape} weights and total {total!r}')
    # Integer arithmetic, so that equal remainders really are equal.
    parts, remainders = np.divmod(weights * int(total), max(int(weights.sum()), 1))
    parts[np.argsort(-remainders, kind='stable')[:int(total) - parts.sum()]] += 1
    return parts


def split_indices(y, subset=1.0, val_fraction=0.1, seed=0):
    """Stratified, seeded subset of the samples, then a stratified train/val split.

    Each class keeps its share of round(subset * N) samples (apportion), and
    likewise for validation: 50,000 CIFAR-10 labels with subset=0.4 give 18,000
    train (1,800 per class) and 2,000 validation (200 per class).

    Inputs:
    - y: (N,) int class labels
    - subset: fraction in (0, 1] of the N samples to keep
    - val_fraction: fraction in (0, 1) of the kept samples that go to validation
    - seed: the split depends only on (y, subset, val_fraction, seed)

    Returns a tuple of:
    - train_idx: int64 indices into y, sorted
    - val_idx: int64 indices into y, sorted
    """
    _check_fraction('subset', subset, allow_one=True)
    _check_fraction('val_fraction', val_fraction, allow_one=False)
    y = np.asarray(y)
    classes, counts = np.unique(y, return_counts=True)
    n_keep = int(np.floor(subset * len(y) + 0.5))
    keep_per_class = apportion(counts, n_keep)
    val_per_class = apportion(keep_per_class, int(np.floor(val_fraction * n_keep + 0.5)))
    n_val = int(val_per_class.sum())
    if n_val == 0 or n_val == n_keep:
        # No validation image, or no training image: a larger subset mends either; the share
        # itself mends the side it leaves empty.
        share = 'larger' if n_val == 0 else 'smaller'
        raise ValueError(f'subset={subset!r} keeps {n_keep} of {len(y)} images, too few to '
                         f'split into train and validation with val_fraction='
                         f'{val_fraction!r}; use a larger subset or a {share} val_fraction')
    # Shuffle, then stable-sort by label: indices grouped by class, random within.
    perm = np.random.default_rng(seed).permutation(len(y))
    by_class = perm[np.argsort(y[perm], kind='stable')]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    train, val = [], []
    for c in range(len(classes)):  # a loop over the 10 classes, not over images
        picked = by_class[starts[c]:starts[c] + keep_per_class[c]]
        val.append(picked[:val_per_class[c]])
        train.append(picked[val_per_class[c]:])
    return (np.sort(np.concatenate(train)).astype(np.int64),
            np.sort(np.concatenate(val)).astype(np.int64))


# ----------------------------------------------------------------------------
# Normalization and labels
# ----------------------------------------------------------------------------

def _norm_coeffs(mean, std):
    """float32 (3,) scale and shift with x * scale + shift == (x / 255 - mean) / std
    per channel, or (None, None) for plain [0, 1] scaling."""
    if mean is None and std is None:
        return None, None
    if mean is None or std is None:
        raise ValueError('give both mean and std for standardization, or neither')
    mean, std = np.asarray(mean, dtype=np.float64), np.asarray(std, dtype=np.float64)
    if mean.shape != (3,) or std.shape != (3,) or not np.all(std > 0):
        raise ValueError(f'mean and std must be per-channel arrays of shape (3,) with '
                         f'std > 0, got shapes {mean.shape} and {std.shape}')
    return (1.0 / (255.0 * std)).astype(np.float32), (-mean / std).astype(np.float32)


def _normalize(X, scale, shift):
    """float32 copy of uint8 images (..., 3, H, W), given _norm_coeffs."""
    if scale is None:
        return np.divide(X, 255, dtype=np.float32)  # not * (1/255): 255 -> exactly 1.0
    out = X.astype(np.float32)
    out *= scale[:, None, None]
    out += shift[:, None, None]
    return out


def normalize(X, mean=None, std=None):
    """Convert uint8 pixels to float32.

    Inputs:
    - X: (N, 3, H, W) or (3, H, W) uint8
    - mean, std: optional (3,) per-channel statistics in [0, 1] units, e.g.
      channel_mean_std of the training split

    Returns:
    - out: float32 of X's shape, X / 255 or, with mean and std,
      (X / 255 - mean[c]) / std[c] for each channel c
    """
    X = np.asarray(X)
    if X.dtype != np.uint8:
        raise ValueError(f'normalize expects uint8 pixels 0..255, got {X.dtype} '
                         f'(already normalized?)')
    if X.ndim not in (3, 4) or X.shape[-3] != 3:
        raise ValueError(f'normalize expects images of shape (N, 3, H, W) or (3, H, W), '
                         f'got {X.shape}')
    return _normalize(X, *_norm_coeffs(mean, std))


def channel_mean_std(X, chunk_size=4096):
    """Exact per-channel mean and std of uint8 images, in [0, 1] units.

    Pixel-value histograms are counted chunk by chunk, so memory stays at a few
    MB and the sums are exact integers, not float32 sums of millions of values.

    Inputs:
    - X: (N, 3, H, W) uint8, normally the training split only (so nothing
      leaks from validation or test)
    - chunk_size: images per chunk

    Returns a tuple of:
    - mean: (3,) float32
    - std: (3,) float32
    """
    X = np.asarray(X)
    if X.dtype != np.uint8 or X.ndim != 4 or X.shape[1] != 3 or len(X) == 0:
        raise ValueError(f'channel_mean_std expects a non-empty uint8 array of shape '
                         f'(N, 3, H, W), got {X.dtype} {X.shape}')
    counts = np.zeros((3, 256), np.int64)
    for start in range(0, len(X), chunk_size):
        chunk = X[start:start + chunk_size]
        for c in range(3):
            counts[c] += np.bincount(chunk[:, c].ravel(), minlength=256)
    values = np.arange(256, dtype=np.float64)
    n = counts[0].sum()
    mean = counts @ values / n
    var = counts @ values ** 2 / n - mean ** 2
    # A constant channel would give std 0 and divide by zero when standardizing.
    std = np.maximum(np.sqrt(np.maximum(var, 0.0)), 1e-3 * 255)
    return (mean / 255).astype(np.float32), (std / 255).astype(np.float32)


def one_hot(y, num_classes=NUM_CLASSES):
    """Labels (N,) ints in 0..num_classes-1 -> float32 array (N, num_classes)."""
    y = np.asarray(y)
    if y.ndim != 1 or (y.size and (y.dtype.kind not in 'iu' or y.min() < 0
                                   or y.max() >= num_classes)):
        raise ValueError(f'one_hot expects a 1-D array of ints in 0..{num_classes - 1}, '
                         f'got {y.dtype} {y.shape}')
    return np.eye(num_classes, dtype=np.float32)[y.astype(np.intp)]


# ----------------------------------------------------------------------------
# Augmentation and batches
# ----------------------------------------------------------------------------

_SIDE, _CROP = 32, 28  # crop and paste offsets are 0..4
_PAD = _SIDE - _CROP   # 4: the largest shift of an image, in either augmentation
_REFLECT = 2           # 'reflect2': airbench's translate, a shift of at most 2 pixels
CROPS = ('paste', 'pad', 'reflect2')


def _framed_windows(X, flip):
    """A sliding-window view over the images in zero frames, for shifting a batch at once.

    Image i goes into a zero-framed 40x40 slot of a work buffer, mirrored
    images into a second slot beside it (columns 40..79). The 32x32 window of
    image i whose top-left corner is at buffer (row, col) is then
    ``windows[i, :, row, col]``; (PAD, PAD) is the image unshifted and
    (PAD, slot + PAD) its mirror.

    Inputs:
    - X: (B, 3, 32, 32) uint8
    - flip: (B,) bool

    Returns windows, a read-only view of shape (B, 3, 9, 49, 32, 32), and the slot width 40.
    """
    B, side, m = len(X), _SIDE, _PAD
    slot = side + 2 * m                                  # 40
    buf = np.zeros((B, 3, slot, 2 * slot), np.uint8)     # columns 0..39 image, 40..79 its mirror
    buf[~flip, :, m:m + side, m:m + side] = X[~flip]
    buf[flip, :, m:m + side, slot + m:slot + m + side] = X[flip][..., ::-1]
    return np.lib.stride_tricks.sliding_window_view(buf, (side, side), axis=(2, 3)), slot


def augment_batch(X, crop_rc, paste_rc, flip):
    """The method's augmentation: random-crop, flip and re-paste a batch, vectorized.

    Image i: the 28x28 window at offset crop_rc[i] of the source, mirrored
    left-right if flip[i], pasted at offset paste_rc[i] on a black 32x32 canvas.

    How: the output is the source shifted by at most 4 pixels each way, read
    out of ``_framed_windows`` with a single fancy index (no Python loop over
    images); a mask then blacks out what lies outside the pasted 28x28 window.

    Inputs:
    - X: (B, 3, 32, 32) uint8
    - crop_rc, paste_rc: (B, 2) int (row, col) offsets in 0..4
    - flip: (B,) bool

    Returns:
    - out: (B, 3, 32, 32) uint8
    """
    flip = np.asarray(flip, dtype=bool)
    windows, slot = _framed_windows(X, flip)
    side, m = _SIDE, _PAD
    # Top-left corner, in the buffer, of the 32x32 window each output shows.
    (crop_r, crop_c), (paste_r, paste_c) = crop_rc.T, paste_rc.T
    row0 = crop_r - paste_r + m
    col0 = np.where(flip, slot + (side - _CROP) + m - crop_c - paste_c, crop_c - paste_c + m)
    out = windows[np.arange(len(X)), :, row0, col0]      # (B, 3, 32, 32), a fresh array
    # Black out the source pixels that lie outside the 28x28 crop.
    pos = np.arange(side)
    rows_in = (pos >= paste_r[:, None]) & (pos < paste_r[:, None] + _CROP)    # (B, 32)
    cols_in = (pos >= paste_c[:, None]) & (pos < paste_c[:, None] + _CROP)
    out *= rows_in[:, None, :, None] & cols_in[:, None, None, :]
    return out


def pad_crop_batch(X, offset_rc, flip):
    """The common CIFAR augmentation: pad by 4 black pixels, random 32x32 crop, random flip.

    Image i, mirrored left-right if flip[i], framed by 4 black pixels on each
    side (40x40), cut back to 32x32 at offset offset_rc[i]. Unlike
    ``augment_batch`` no pixel of the shifted image is blacked out, so the
    model sees the whole of it (up to 4 rows/columns pushed off the edge).

    Inputs:
    - X: (B, 3, 32, 32) uint8
    - offset_rc: (B, 2) int (row, col) offsets in 0..8; (4, 4) is the image unshifted
    - flip: (B,) bool

    Returns:
    - out: (B, 3, 32, 32) uint8
    """
    flip = np.asarray(flip, dtype=bool)
    windows, slot = _framed_windows(X, flip)
    row0, col0 = offset_rc.T
    return windows[np.arange(len(X)), :, row0, col0 + slot * flip]


def reflect_crop_batch(X, offset_rc, flip):
    """airbench's training translate: reflect-pad by 2, random 32x32 crop, random flip.

    Image i, mirrored left-right if flip[i], reflect-padded by 2 pixels on each side (36x36;
    numpy's 'reflect', as translate_batch's test-time shifts), cut back to 32x32 at offset
    offset_rc[i]. A shift of at most 2 pixels each way, with no black frame: a lighter
    augmentation than 'pad' for short schedules.

    Inputs:
    - X: (B, 3, 32, 32) uint8
    - offset_rc: (B, 2) int (row, col) offsets in 0..4; (2, 2) is the image unshifted
    - flip: (B,) bool

    Returns:
    - out: (B, 3, 32, 32) uint8, a fresh array
    """
    flip = np.asarray(flip, dtype=bool)
    m = _REFLECT
    padded = np.pad(X, ((0, 0), (0, 0), (m, m), (m, m)), mode='reflect')       # (B, 3, 36, 36)
    # Mirroring commutes with the symmetric padding: the mirror of the padded image is the
    # padded mirror image.
    padded[flip] = padded[flip][..., ::-1]
    windows = np.lib.stride_tricks.sliding_window_view(padded, (_SIDE, _SIDE), axis=(2, 3))
    row0, col0 = offset_rc.T
    return windows[np.arange(len(X)), :, row0, col0]


def translate_batch(X, dr, dc):
    """Shift a batch by one pixel, airbench's translate_batch: reflect-pad by 1, cut 32x32.

    The output pixel (r, c) is the input's (r - dr, c - dc); the row or column that comes in at
    the border is the reflection of the one beside it (numpy's and torch's 'reflect', which does
    not repeat the edge pixel), so no black frame appears.

    Inputs:
    - X: (B, C, H, W) images, any dtype (test-time views shift normalized float32 images)
    - dr, dc: -1, 0 or 1; (1, 1) moves the picture one pixel down and right, (-1, -1) up and left

    Returns:
    - out: (B, C, H, W), a new array of X's dtype
    """
    if dr not in (-1, 0, 1) or dc not in (-1, 0, 1):
        raise ValueError(f'translate_batch shifts by one pixel at most, got ({dr}, {dc})')
    H, W = X.shape[-2:]
    padded = np.pad(X, ((0, 0), (0, 0), (1, 1), (1, 1)), mode='reflect')
    return padded[:, :, 1 - dr:1 - dr + H, 1 - dc:1 - dc + W]


# Test-time augmentation (main.evaluate): the views of each image and their weights in the mean
# of the probabilities. 'flip' is the image and its mirror; 'flip+translate' is airbench's TTA
# level 2: those two (half the weight) and the image moved one pixel down-right and one up-left,
# each with its mirror (a quarter each). TTA_MODES (runfiles: metrics.json names the mode) lists them.
_TTA_VIEWS = {'none': ((1.0, 0, 0, False),),
              'flip': ((0.5, 0, 0, False), (0.5, 0, 0, True)),
              'flip+translate': ((0.25, 0, 0, False), (0.25, 0, 0, True),
                                 (0.125, 1, 1, False), (0.125, 1, 1, True),
                                 (0.125, -1, -1, False), (0.125, -1, -1, True))}


def tta_weights(mode):
    """(V,) float64 weights of the views of TTA ``mode`` (one of TTA_MODES), in tta_views' order; they sum to 1."""
    if mode not in TTA_MODES:
        raise ValueError(f'test-time augmentation must be one of {TTA_MODES}, got {mode!r}')
    return np.array([view[0] for view in _TTA_VIEWS[mode]])


def tta_views(X, mode):
    """Generator of (weight, view) for test-time augmentation ``mode``, one whole batch per view.

    The first view is X itself; a mirrored view is flipped left-right after its shift, as
    airbench's ``net(inputs.flip(-1))`` of the translated inputs.

    Inputs:
    - X: (B, 3, H, W) float32 normalized images
    - mode: one of TTA_MODES

    Yields (weight float, view (B, 3, H, W) C-contiguous, X itself for the first).
    """
    tta_weights(mode)           # checks the mode
    for weight, dr, dc, mirror in _TTA_VIEWS[mode]:
        view = translate_batch(X, dr, dc) if (dr, dc) != (0, 0) else X
        if mirror:
            view = view[..., ::-1]
        yield weight, np.ascontiguousarray(view)


def _is_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


class BatchIterator:
    """Mini-batches over uint8 images, normalized to float32 one batch at a time.

    Re-entrant: the order and augmentation of epoch e depend only on (seed, e),
    drawn up front from numpy.random.default_rng([seed, e]). So iterating an
    epoch twice gives identical batches, and epoch(e, start=k) gives exactly
    batches k, k+1, ... of epoch e (the training loop resumes mid-epoch so).
    With alternate_flip the flips of epoch e > 0 depend on epoch 0's too, which
    are re-drawn from (seed, 0) whenever needed: still nothing but (seed, e).
    Without shuffle every sample is visited once, in order; the last batch may
    be smaller than batch_size; len() is the number of batches per epoch.

        it = BatchIterator(X, y, 128, shuffle=True, augment=True, seed=0)
        for X_batch, y_batch in it.epoch(3):   # (128, 3, 32, 32) float32, (128,)

    Inputs:
    - X: (N, 3, H, W) uint8 images; 32x32 when augment is on
    - y: (N,) labels, returned per batch as they are
    - batch_size: positive int
    - shuffle: random order per epoch
    - augment: random shifts and left-right flips, as ``crop`` says
    - crop: 'paste' (the method's: a random 28x28 crop re-pasted on a 32x32
      black canvas, augment_batch), 'pad' (pad by 4, random 32x32 crop,
      pad_crop_batch) or 'reflect2' (reflect-pad by 2, random 32x32 crop,
      reflect_crop_batch: airbench's translate)
    - alternate_flip: airbench's alternating flip (needs augment). Epoch 0 flips
      each image at random, exactly as without it; in epoch e > 0 image i is
      flipped iff its epoch-0 flip XOR e is odd, so every image is seen both ways
      in every pair of epochs. Shifts stay random per epoch, as without it.
    - seed: non-negative int; with the epoch number it fixes all randomness
    - mean, std: optional (3,) per-channel standardization in [0, 1] units
    """

    def __init__(self, X, y, batch_size, shuffle=False, augment=False, seed=0,
                 mean=None, std=None, crop='paste', alternate_flip=False):
        X, y = np.asarray(X), np.asarray(y)
        if X.dtype != np.uint8 or X.ndim != 4 or X.shape[1] != 3:
            raise ValueError(f'BatchIterator expects uint8 images of shape (N, 3, H, W), '
                             f'got {X.dtype} {X.shape}')
        if y.shape != (len(X),):
            raise ValueError(f'y must have shape ({len(X)},), got {y.shape}')
        if not _is_int(batch_size) or batch_size < 1:
            raise ValueError(f'batch_size must be a positive int, got {batch_size!r}')
        if augment and X.shape[2:] != (_SIDE, _SIDE):
            raise ValueError(f'augmentation needs 32x32 images, got {X.shape[2:]}')
        if not _is_int(seed) or seed < 0:
            raise ValueError(f'seed must be a non-negative int, got {seed!r}')
        if crop not in CROPS:
            raise ValueError(f'crop must be one of {CROPS}, got {crop!r}')
        if alternate_flip and not augment:
            raise ValueError('alternate_flip alternates the flips of the augmentation; use it with augment=True')
        self.X = np.ascontiguousarray(X)  # no copy for arrays from load_cifar10
        self.y = y
        self.batch_size = int(batch_size)
        self.shuffle, self.augment, self.seed = bool(shuffle), bool(augment), int(seed)
        self.crop = crop
        self.alternate_flip = bool(alternate_flip)
        self._first_flips = None       # alternate_flip: epoch 0's flip of each image, by image index
        self._scale, self._shift = _norm_coeffs(mean, std)

    def __len__(self):
        return -(-len(self.X) // self.batch_size)

    def __iter__(self):
        """Epoch 0, for evaluation loops: `for X_batch, y_batch in it:`."""
        return self.epoch(0)

    def plan(self, e):
        """Sample order and augmentation of epoch e, for all N samples.

        Returns a tuple of:
        - order: (N,) int
        - crop_rc: (N, 2) int, the crop offsets in 0..4 ('paste') or the
          offsets in the padded image in 0..8 ('pad') or 0..4 ('reflect2');
          None without augmentation
        - paste_rc: (N, 2) int paste offsets in 0..4 ('paste'); None otherwise
        - flip: (N,) bool, or None without augmentation
        Row i of the last three belongs to the i-th sample in epoch order.
        """
        rng = np.random.default_rng([self.seed, e])
        n = len(self.X)
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        if not self.augment:
            return order, None, None, None
        if self.crop == 'pad':
            crop_rc, paste_rc = rng.integers(0, 2 * _PAD + 1, size=(n, 2)), None
        elif self.crop == 'reflect2':
            crop_rc, paste_rc = rng.integers(0, 2 * _REFLECT + 1, size=(n, 2)), None
        else:
            crop_rc = rng.integers(0, _PAD + 1, size=(n, 2))
            paste_rc = rng.integers(0, _PAD + 1, size=(n, 2))
        flip = rng.random(n) < 0.5         # drawn last: alternate_flip leaves order and shifts as they are
        if self.alternate_flip and e > 0:
            flip = self.first_flips()[order] ^ bool(e % 2)
        return order, crop_rc, paste_rc, flip

    def first_flips(self):
        """(N,) bool: whether epoch 0 flips sample i (indexed by sample, not by epoch order).

        Re-derived from the seed alone (epoch 0's plan, drawn again), so any epoch of a resumed
        run or of another iterator over the same samples alternates from the same start.
        """
        if not self.augment:
            raise ValueError('an iterator without augment flips no image')
        if self._first_flips is None:
            order, _, _, flip = self.plan(0)
            first = np.empty(len(self.X), bool)
            first[order] = flip
            self._first_flips = first
        return self._first_flips

    def epoch(self, e, start=0):
        """Generator of (X_batch (B, 3, H, W) float32, y_batch (B,)) for batches
        start, start + 1, ... of epoch e (0 <= start <= len(self))."""
        if not _is_int(e) or e < 0:
            raise ValueError(f'epoch must be a non-negative int, got {e!r}')
        if not _is_int(start) or not 0 <= start <= len(self):
            raise ValueError(f'start must be an int in 0..{len(self)}, got {start!r}')
        return self._batches(int(e), int(start))

    def _batches(self, e, start):
        order, crop_rc, paste_rc, flip = self.plan(e)
        for step in range(start, len(self)):
            sl = slice(step * self.batch_size, (step + 1) * self.batch_size)
            images = self.X[order[sl]]
            if self.augment and self.crop == 'pad':
                images = pad_crop_batch(images, crop_rc[sl], flip[sl])
            elif self.augment and self.crop == 'reflect2':
                images = reflect_crop_batch(images, crop_rc[sl], flip[sl])
            elif self.augment:
                images = augment_batch(images, crop_rc[sl], paste_rc[sl], flip[sl])
            yield _normalize(images, self._scale, self._shift), self.y[order[sl]]
