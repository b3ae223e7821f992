"""CIFAR-10 data pipeline: download, verify, extract, load, split, normalize, batch.

The dataset is kept as uint8 arrays in NCHW order, exactly as the archive stores
it (3,072 bytes per image: 1,024 red, then 1,024 green, then 1,024 blue values).
All of CIFAR-10 then takes about 180 MB instead of the ~700 MB a float32 copy
would need; images become float32 only one mini-batch at a time, inside
`BatchIterator` (or `normalize` for small arrays).

Typical use:

    data = load_cifar10('data', subset=0.4, val_fraction=0.1, seed=0)
    mean, std = channel_mean_std(data['X_train'])
    train = BatchIterator(data['X_train'], data['y_train'], 128, shuffle=True,
                          augment=True, seed=0, mean=mean, std=std)
    for epoch in range(num_epochs):
        for X_batch, y_batch in train.epoch(epoch):   # (128, 3, 32, 32) float32
            ...

Where the data comes from (`prepare_cifar10`, called by `load_cifar10`):
  1. `data/cifar-10-batches-py/` already extracted -> used as it is;
  2. else `data/cifar-10-python.tar.gz` present (downloaded earlier or placed by
     hand) -> extracted safely and atomically; a hand-placed archive whose md5
     is not the official one gets a one-line warning and is used if valid;
  3. else the archive is downloaded from the official URL and its md5 checked.

Every problem with the files on disk or the download raises `DataError` whose
message is one sentence naming the file and the fix; bad arguments raise
`ValueError`. Callers (main.py) print the message and exit, no traceback.
"""
import codecs
import hashlib
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.request
import zlib

import numpy as np
from tqdm import tqdm

CIFAR10_URL = 'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz'
CIFAR10_MD5 = 'c58f30108f718f92721af3b95e74349a'  # md5 of the official archive
ARCHIVE_NAME = 'cifar-10-python.tar.gz'
FOLDER_NAME = 'cifar-10-batches-py'
TRAIN_BATCHES = tuple('data_batch_%d' % i for i in range(1, 6))
TEST_BATCH = 'test_batch'
META_FILE = 'batches.meta'
REQUIRED_FILES = TRAIN_BATCHES + (TEST_BATCH, META_FILE)
NUM_CLASSES = 10
IMAGE_SHAPE = (3, 32, 32)
IMAGE_SIZE = 3 * 32 * 32

_EXTRACT_PREFIX = '.cifar-10-extract-'  # temp dirs; never named like the real folder
_md5_warned = set()  # archives already warned about in this process


class DataError(Exception):
    """A data file is missing, corrupt or unsafe, or the download failed.

    The message is one sentence naming the file and how to fix it; it is meant
    to be shown to the user as it is, without a traceback.
    """


# ----------------------------------------------------------------------------
# Download, verify, extract
# ----------------------------------------------------------------------------

def _paths(data_dir):
    """(archive path, extracted folder path) inside data_dir."""
    return os.path.join(data_dir, ARCHIVE_NAME), os.path.join(data_dir, FOLDER_NAME)


def _redownload_hint(data_dir):
    """The fix for anything broken on disk: remove both and fetch again."""
    archive, folder = _paths(data_dir)
    return ('delete %s and %s and run again to re-download (or put a good copy of '
            'the archive at %s by hand)' % (folder, archive, archive))


def md5sum(path, chunk_size=1 << 20):
    """Hex md5 of a file, read in 1 MB chunks so memory stays flat."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(chunk_size), b''):
            digest.update(chunk)
    return digest.hexdigest()


def download_cifar10(data_dir='data', url=CIFAR10_URL, expected_md5=CIFAR10_MD5,
                     timeout=30.0):
    """Download the CIFAR-10 archive into data_dir unless the data is already there.

    The file is streamed to `<archive>.part` with a progress bar, its md5 checked
    against `expected_md5`, and only then renamed into place, so an interrupted
    or corrupted download never leaves a file that looks finished.

    Inputs:
    - data_dir: folder that holds (or will hold) cifar-10-python.tar.gz.
    - url: where to fetch it from (tests point this at a local http.server).
    - expected_md5: hex md5 the downloaded bytes must have.
    - timeout: seconds to wait for the connection and for each read.

    Returns the archive path. Nothing is downloaded when the archive or the
    extracted folder already exists (the archive may then be absent).
    Raises DataError when the server cannot be reached or the md5 differs.
    """
    archive, folder = _paths(data_dir)
    if os.path.isfile(archive) or os.path.isdir(folder):
        return archive
    if os.path.islink(archive):
        raise DataError('%s is a broken link; point it at a copy of %s or delete it '
                        'and run again to download' % (archive, ARCHIVE_NAME))
    try:
        os.makedirs(data_dir, exist_ok=True)
    except OSError as e:
        raise DataError('could not create the data folder %s (%s); choose another '
                        'data folder or fix its permissions' % (data_dir, e.strerror or e)) from e
    part = archive + '.part'
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, \
                open(part, 'wb') as f:
            total = int(response.headers.get('Content-Length') or 0) or None
            with tqdm(total=total, unit='B', unit_scale=True, unit_divisor=1024,
                      desc='downloading ' + ARCHIVE_NAME) as bar:
                for chunk in iter(lambda: response.read(1 << 20), b''):
                    f.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except BaseException as e:  # URLError, timeouts, refused connections, bad URLs, ...
        _remove_quietly(part)  # never leave a partial file, even on Ctrl-C
        if not isinstance(e, Exception):
            raise
        raise DataError('could not download %s (%s); download it yourself and put it '
                        'at %s, then run again' % (url, _reason(e), archive)) from e
    if digest.hexdigest() != expected_md5:
        _remove_quietly(part)
        raise DataError('the file downloaded from %s has md5 %s instead of %s, so it '
                        'was discarded; run again to retry, or put the official '
                        'archive at %s by hand' % (url, digest.hexdigest(),
                                                   expected_md5, archive))
    os.replace(part, archive)
    return archive


def _reason(exc):
    """Short human reason for a failed download (URLError wraps the real one)."""
    reason = getattr(exc, 'reason', None) or exc
    return str(reason) or type(exc).__name__


def _remove_quietly(path):
    try:
        os.remove(path)
    except OSError:
        pass


def _check_member(member, archive):
    """Refuse a tar member that could write outside the extraction folder.

    Absolute paths, '..' components, links and device/fifo entries are never
    needed by CIFAR-10, so any of them means the archive is not what it claims.
    """
    name = member.name
    parts = name.replace('\\', '/').split('/')
    if (name.startswith(('/', '\\')) or os.path.isabs(name) or '..' in parts
            or (len(name) > 1 and name[1] == ':')):
        problem = 'would be written outside the data folder'
    elif not (member.isfile() or member.isdir()):
        problem = 'is a link or special file'
    else:
        return
    raise DataError('%s contains the member %r which %s, so it was not extracted; '
                    'delete %s and run again to re-download the official archive'
                    % (archive, name, problem, archive))


def extract_cifar10(data_dir='data', check_md5=True):
    """Extract data_dir/cifar-10-python.tar.gz into data_dir/cifar-10-batches-py.

    Safe: every member is checked before it is written (no absolute paths, no
    '..', no links), and tarfile's 'data' filter is used as a second guard.
    Atomic: members go to a fresh hidden temp dir inside data_dir; only when all
    required files are there is the folder moved into place with os.replace, so
    a crash never leaves a half-extracted `cifar-10-batches-py`.

    If check_md5 and the archive's md5 is not the official one (an archive
    placed by hand, like a re-packed proxy), one warning line goes to stderr,
    once per archive per process, and the archive is used anyway.

    Returns the extracted folder path (nothing to do if it already exists).
    """
    archive, folder = _paths(data_dir)
    if os.path.isdir(folder):
        return folder
    if not os.path.isfile(archive):
        raise DataError('%s is missing; put the CIFAR-10 python archive there by hand '
                        'or run again with network access to download it' % archive)
    md5 = md5sum(archive) if check_md5 else None
    _remove_stale_temp_dirs(data_dir)
    tmp = tempfile.mkdtemp(prefix=_EXTRACT_PREFIX, dir=data_dir)
    try:
        _extract_members(archive, tmp, data_dir)
        for name in REQUIRED_FILES:
            if not os.path.isfile(os.path.join(tmp, FOLDER_NAME, name)):
                raise DataError('%s does not contain %s/%s; delete %s and run again '
                                'to re-download it' % (archive, FOLDER_NAME, name, archive))
        try:
            os.replace(os.path.join(tmp, FOLDER_NAME), folder)
        except OSError:
            # Another process finished extracting first: its folder is as good.
            if not os.path.isdir(folder):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if md5 is not None and md5 != CIFAR10_MD5:
        key = (os.path.realpath(archive), md5)
        if key not in _md5_warned:
            _md5_warned.add(key)
            print('warning: %s has md5 %s, not the official %s; using it as placed '
                  'by hand' % (archive, md5, CIFAR10_MD5), file=sys.stderr)
    return folder


def _extract_members(archive, tmp, data_dir):
    """Stream through the archive once, checking and extracting the folder's members."""
    # filter='data' (Python >= 3.11.4) also rejects unsafe members; our own check
    # below covers older Pythons and gives a clearer message.
    extract_kwargs = {'filter': 'data'} if hasattr(tarfile, 'data_filter') else {}
    try:
        with tarfile.open(archive, 'r:*') as tar:
            # Iterating (instead of getmembers() + extractall()) decompresses the
            # 170 MB stream once rather than twice.
            for member in tar:
                _check_member(member, archive)
                if member.name == FOLDER_NAME or member.name.startswith(FOLDER_NAME + '/'):
                    tar.extract(member, tmp, **extract_kwargs)
    except DataError:
        raise
    except (tarfile.TarError, EOFError, zlib.error) as e:
        if isinstance(e, getattr(tarfile, 'FilterError', ())):
            raise DataError('%s contains an unsafe member (%s), so it was not extracted; '
                            'delete %s and run again to re-download the official archive'
                            % (archive, e, archive)) from e
        raise DataError('%s is truncated or corrupt (%s); %s'
                        % (archive, _reason(e), _redownload_hint(data_dir))) from e
    except OSError as e:  # gzip.BadGzipFile is an OSError; so are disk-full errors
        raise DataError('could not extract %s (%s); free disk space or %s'
                        % (archive, _reason(e), _redownload_hint(data_dir))) from e


def _remove_stale_temp_dirs(data_dir, max_age_s=3600):
    """Delete temp dirs left by extractions killed over an hour ago."""
    now = time.time()
    for name in os.listdir(data_dir):
        path = os.path.join(data_dir, name)
        if name.startswith(_EXTRACT_PREFIX) and os.path.isdir(path):
            try:
                if now - os.path.getmtime(path) > max_age_s:
                    shutil.rmtree(path, ignore_errors=True)
            except OSError:
                pass


def prepare_cifar10(data_dir='data', url=None, expected_md5=None):
    """Make sure data_dir/cifar-10-batches-py exists; return its path.

    Uses the extracted folder if present, else extracts the archive (downloaded
    earlier or placed by hand), else downloads it first from `url` (default
    CIFAR10_URL) checking `expected_md5` (default CIFAR10_MD5).
    """
    archive, folder = _paths(data_dir)
    if os.path.isdir(folder):
        return folder
    downloaded = False
    if not os.path.isfile(archive):
        download_cifar10(data_dir, url or CIFAR10_URL, expected_md5 or CIFAR10_MD5)
        downloaded = True
    # A fresh download was just verified; only a hand-placed archive is hashed.
    return extract_cifar10(data_dir, check_md5=not downloaded)


# ----------------------------------------------------------------------------
# Reading the pickled batches
# ----------------------------------------------------------------------------

# The batches are pickles, and unpickling can run arbitrary code, so only the
# few globals that numpy arrays need are allowed: those written by Python 2 (the
# official archive) and by Python 3 with any protocol, under the module names
# of numpy 1 (numpy.core) and numpy 2 (numpy._core).
try:
    from numpy._core import multiarray as _np_multiarray, numeric as _np_numeric
except ImportError:  # numpy < 2
    from numpy.core import multiarray as _np_multiarray, numeric as _np_numeric
_SAFE_GLOBALS = {('numpy', 'ndarray'): np.ndarray, ('numpy', 'dtype'): np.dtype,
                 ('_codecs', 'encode'): codecs.encode}
for _core in ('numpy.core', 'numpy._core'):
    _SAFE_GLOBALS[(_core + '.multiarray', '_reconstruct')] = _np_multiarray._reconstruct
    if hasattr(_np_numeric, '_frombuffer'):
        _SAFE_GLOBALS[(_core + '.numeric', '_frombuffer')] = _np_numeric._frombuffer


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        # Returning the objects directly also skips numpy 2's numpy.core shim
        # and its deprecation warning.
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError('unexpected object %s.%s' % (module, name)) from None


def _unpickle(path, data_dir):
    """Load one pickled dict with str keys (bytes keys from Python 2 are decoded)."""
    try:
        with open(path, 'rb') as f:
            obj = _SafeUnpickler(f, encoding='bytes').load()
    except FileNotFoundError:
        raise DataError('%s is missing; %s' % (path, _redownload_hint(data_dir))) from None
    except OSError as e:
        raise DataError('could not read %s (%s); check its permissions or %s' % (
            path, e.strerror or e, _redownload_hint(data_dir))) from e
    except Exception as e:  # any failure to decode means the file is damaged
        raise DataError('%s is corrupt (%s: %s); %s' % (
            path, type(e).__name__, e, _redownload_hint(data_dir))) from e
    if not isinstance(obj, dict):
        raise DataError('%s is corrupt (not a dict); %s' % (path, _redownload_hint(data_dir)))
    return {(k.decode('latin1') if isinstance(k, bytes) else k): v for k, v in obj.items()}


def load_batch(path, data_dir=None):
    """Load one CIFAR-10 batch file.

    Inputs:
    - path: a data_batch_k or test_batch file.
    - data_dir: only used to word the fix in error messages.

    Returns a tuple of:
    - X: uint8 array of shape (n, 3072), one flattened NCHW image per row
    - y: int64 array of shape (n,), labels in 0..9
    """
    data_dir = data_dir or os.path.dirname(os.path.dirname(path)) or '.'
    d = _unpickle(path, data_dir)
    hint = _redownload_hint(data_dir)
    if 'data' not in d or 'labels' not in d:
        raise DataError('%s has no data/labels entries; %s' % (path, hint))
    X, y = np.asarray(d['data']), np.asarray(d['labels'])
    if X.ndim != 2 or X.shape[1] != IMAGE_SIZE or y.shape != (X.shape[0],):
        raise DataError('%s has images of shape %s and labels of shape %s, expected '
                        '(n, %d) and (n,); %s' % (path, X.shape, y.shape, IMAGE_SIZE, hint))
    if X.dtype != np.uint8:
        if X.dtype.kind not in 'iu' or (X.size and (X.min() < 0 or X.max() > 255)):
            raise DataError('%s has %s pixels, expected uint8 0..255; %s'
                            % (path, X.dtype, hint))
        X = X.astype(np.uint8)
    if y.size and (y.dtype.kind not in 'iu' or y.min() < 0 or y.max() >= NUM_CLASSES):
        bad = y[(y < 0) | (y >= NUM_CLASSES)][:1] if y.dtype.kind in 'iuf' else y[:1]
        raise DataError('%s has labels outside 0..%d (e.g. %r); %s'
                        % (path, NUM_CLASSES - 1, bad.tolist(), hint))
    return X, y.astype(np.int64)


def load_label_names(folder, data_dir=None):
    """The 10 class names (list of str) from batches.meta in the extracted folder."""
    path = os.path.join(folder, META_FILE)
    data_dir = data_dir or os.path.dirname(folder) or '.'
    names = _unpickle(path, data_dir).get('label_names')
    if not isinstance(names, (list, tuple)) or len(names) != NUM_CLASSES:
        raise DataError('%s does not list %d label_names; %s'
                        % (path, NUM_CLASSES, _redownload_hint(data_dir)))
    return [n.decode('utf-8') if isinstance(n, bytes) else str(n) for n in names]


def _load_train_rows(folder, data_dir):
    """All training batches as one (N, 3072) uint8 array that owns its memory.

    Each batch is copied into one preallocated array as soon as it is read, so
    at most one batch's pickle is in memory besides the result (concatenating a
    list of batches would briefly need twice the 150 MB).
    """
    X_all, labels, filled = None, [], 0
    for name in TRAIN_BATCHES:
        Xb, yb = load_batch(os.path.join(folder, name), data_dir)
        n = len(Xb)
        if X_all is None:
            X_all = np.empty((n * len(TRAIN_BATCHES), IMAGE_SIZE), np.uint8)
        if filled + n > len(X_all):  # unequal batch sizes: not the official layout
            grown = np.empty((filled + n * (len(TRAIN_BATCHES) - len(labels)), IMAGE_SIZE),
                             np.uint8)
            grown[:filled] = X_all[:filled]
            X_all = grown
        X_all[filled:filled + n] = Xb
        labels.append(yb)
        filled += n
        del Xb
    return X_all, np.concatenate(labels)


def _keep_rows_inplace(X, keep):
    """Move rows `keep` (sorted ascending) of the owning 2-D array X to its front,
    in place and in order, then shrink X to len(keep) rows; returns X.

    This is X[keep] without a second full-size copy. Moving chunk by chunk in
    ascending order is safe because row keep[j] >= j: a destination row is only
    overwritten after every row that still has to move out of it has moved.
    """
    for start in range(0, len(keep), 4096):
        idx = keep[start:start + 4096]
        X[start:start + len(idx)] = X[idx]  # X[idx] copies the chunk before writing
    try:
        # realloc to the smaller size; refcheck=False is safe because no views of
        # X exist at this point (all slices above were temporaries).
        X.resize((len(keep), X.shape[1]), refcheck=False)
        return X
    except ValueError:  # X does not own its memory: fall back to a copy
        return X[:len(keep)].copy()


# ----------------------------------------------------------------------------
# Subset and split
# ----------------------------------------------------------------------------

def _check_fraction(name, value, allow_one):
    """ValueError unless 0 < value < 1 (or <= 1 when allow_one)."""
    ok = (isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
          and 0 < value and (value <= 1 if allow_one else value < 1))
    if not ok:
        raise ValueError('%s must be a number in (0, %s, got %r'
                         % (name, '1]' if allow_one else '1)', value))


def _apportion(weights, total):
    """Split the integer `total` into parts proportional to `weights` that sum to it.

    Largest-remainder rounding: floor every quota, then give the leftover units to
    the largest fractional parts (ties to the lower index), so each part is within
    one of its exact share and never more than its weight.
    """
    weights = np.asarray(weights, dtype=np.int64)
    quota = weights * (total / max(weights.sum(), 1))
    parts = np.floor(quota).astype(np.int64)
    leftover = int(total - parts.sum())
    order = np.argsort(-(quota - parts), kind='stable')
    parts[order[:leftover]] += 1
    return np.minimum(parts, weights)


def split_indices(y, subset=1.0, val_fraction=0.1, seed=0):
    """Stratified, seeded subset of the samples, then a stratified train/val split.

    Inputs:
    - y: int array of shape (N,), class labels.
    - subset: fraction in (0, 1] of the N samples to keep.
    - val_fraction: fraction in (0, 1) of the kept samples that go to validation.
    - seed: the split depends only on (y, subset, val_fraction, seed).

    Returns (train_idx, val_idx): int64 arrays of indices into y, each sorted
    ascending. Every class keeps its share of round(subset * N) samples up to
    rounding (largest remainder), and likewise for validation; e.g. 50,000
    CIFAR-10 labels with subset=0.4 give 18,000 train (1,800 per class) and 2,000
    validation (200 per class).
    """
    _check_fraction('subset', subset, allow_one=True)
    _check_fraction('val_fraction', val_fraction, allow_one=False)
    y = np.asarray(y)
    classes, counts = np.unique(y, return_counts=True)
    n_keep = int(np.floor(subset * len(y) + 0.5))
    keep_per_class = _apportion(counts, n_keep)
    val_per_class = _apportion(keep_per_class, int(np.floor(val_fraction * n_keep + 0.5)))
    n_val = int(val_per_class.sum())
    if n_val == 0 or n_val == n_keep:
        raise ValueError('subset=%r keeps %d of %d images, too few to split into train '
                         'and validation with val_fraction=%r; use a larger subset'
                         % (subset, n_keep, len(y), val_fraction))
    # Shuffle, then stable-sort by label: indices grouped by class, random within.
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(y))
    by_class = perm[np.argsort(y[perm], kind='stable')]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    train, val = [], []
    for c in range(len(classes)):  # a loop over the 10 classes, not over images
        picked = by_class[starts[c]:starts[c] + keep_per_class[c]]
        val.append(picked[:val_per_class[c]])
        train.append(picked[val_per_class[c]:])
    return (np.sort(np.concatenate(train)).astype(np.int64),
            np.sort(np.concatenate(val)).astype(np.int64))


def load_cifar10(data_dir='data', subset=1.0, val_fraction=0.1, seed=0):
    """Load CIFAR-10 (downloading and extracting it first if needed) and split it.

    Inputs:
    - data_dir: folder with cifar-10-batches-py/ or cifar-10-python.tar.gz.
    - subset: fraction in (0, 1] of the 50,000 training images to use, drawn
      stratified by class with `seed`.
    - val_fraction: fraction in (0, 1) of that subset held out for validation,
      also stratified (0.1 gives the 9:1 split).
    - seed: the subset and split depend only on this seed.

    Returns a dict with
    - X_train, X_val, X_test: uint8 arrays of shape (N, 3, 32, 32)
    - y_train, y_val, y_test: int64 arrays of shape (N,), labels 0..9
    - label_names: list of the 10 class names
    subset=0.4 gives 18,000 train, 2,000 val; test is always the full 10,000.
    Train and val images keep the archive's (already shuffled) order.

    Raises ValueError for bad arguments and DataError for bad files.
    """
    _check_fraction('subset', subset, allow_one=True)
    _check_fraction('val_fraction', val_fraction, allow_one=False)
    folder = prepare_cifar10(data_dir)
    label_names = load_label_names(folder, data_dir)

    X_all, y_all = _load_train_rows(folder, data_dir)
    train_idx, val_idx = split_indices(y_all, subset, val_fraction, seed)
    # Peak memory: validation is copied out (small), then the training rows are
    # compacted in place, so the 150 MB of training images are never duplicated.
    X_val = X_all[val_idx]
    X_train = _keep_rows_inplace(X_all, train_idx)
    del X_all
    # The test batch is read last, when the training copy has already shrunk.
    X_test, y_test = load_batch(os.path.join(folder, TEST_BATCH), data_dir)
    return {
        'X_train': X_train.reshape((-1,) + IMAGE_SHAPE), 'y_train': y_all[train_idx],
        'X_val': X_val.reshape((-1,) + IMAGE_SHAPE), 'y_val': y_all[val_idx],
        'X_test': X_test.reshape((-1,) + IMAGE_SHAPE), 'y_test': y_test,
        'label_names': label_names,
    }


# ----------------------------------------------------------------------------
# Normalization and labels
# ----------------------------------------------------------------------------

def _norm_coeffs(mean, std):
    """Per-channel (scale, shift), float32 arrays (3,), such that
    x_float = x_uint8 * scale + shift  ==  (x_uint8 / 255 - mean) / std.
    Returns (None, None) for plain [0, 1] scaling."""
    if mean is None and std is None:
        return None, None
    if mean is None or std is None:
        raise ValueError('give both mean and std for standardization, or neither')
    mean = np.asarray(mean, dtype=np.float64)
    std = np.asarray(std, dtype=np.float64)
    if mean.shape != (3,) or std.shape != (3,) or not np.all(std > 0):
        raise ValueError('mean and std must be per-channel arrays of shape (3,) with '
                         'std > 0, got shapes %s and %s' % (mean.shape, std.shape))
    return (1.0 / (255.0 * std)).astype(np.float32), (-mean / std).astype(np.float32)


def _normalize_into(X, out, scale, shift, chunk=64):
    """Write normalized float32 pixels of uint8 X (N, 3, H, W) into out; return out.

    Works on 64 images at a time so the uint8 -> float32 cast, the multiply and
    the add all run on data still in the CPU cache, and expands the per-channel
    constants to full (3*H*W,) rows so each pass is one long contiguous loop;
    together about 2x faster than three whole-batch broadcast passes.
    """
    X2, out2 = X.reshape(len(X), -1), out.reshape(len(X), -1)
    if scale is not None:
        per_channel = X2.shape[1] // 3
        scale, shift = np.repeat(scale, per_channel), np.repeat(shift, per_channel)
    for start in range(0, len(X2), chunk):
        x, o = X2[start:start + chunk], out2[start:start + chunk]
        if scale is None:
            # True division by 255 (not * 1/255) keeps 255 -> exactly 1.0.
            np.divide(x, np.float32(255), out=o)
        else:
            np.copyto(o, x)
            o *= scale
            o += shift
    return out


def normalize(X, mean=None, std=None):
    """Convert uint8 pixels to float32.

    Inputs:
    - X: uint8 array of shape (N, 3, H, W) (or (3, H, W)).
    - mean, std: optional per-channel arrays of shape (3,) in [0, 1] units, e.g.
      from channel_mean_std on the training split.

    Returns float32 array of X's shape: X / 255 in [0, 1], or, with mean/std,
    (X / 255 - mean[c]) / std[c] for each channel c.
    """
    X = np.asarray(X)
    if X.dtype != np.uint8:
        raise ValueError('normalize expects uint8 pixels 0..255, got %s (already '
                         'normalized?)' % X.dtype)
    if X.ndim not in (3, 4) or X.shape[-3] != 3:
        raise ValueError('normalize expects images of shape (N, 3, H, W) or (3, H, W), '
                         'got %s' % (X.shape,))
    scale, shift = _norm_coeffs(mean, std)
    out = np.empty(X.shape, np.float32)
    _normalize_into(X.reshape((-1,) + X.shape[-3:]), out.reshape((-1,) + X.shape[-3:]),
                    scale, shift)
    return out


def channel_mean_std(X, chunk_size=4096):
    """Per-channel mean and std of uint8 images, in [0, 1] units.

    Inputs:
    - X: uint8 array of shape (N, 3, H, W), normally the training split only (so
      no information leaks from validation or test).

    Returns (mean, std), float32 arrays of shape (3,). Pixel-value histograms are
    accumulated chunk by chunk, so memory stays at a few MB and the result is
    exact (integer counts, no float32 sums over millions of values).
    """
    X = np.asarray(X)
    if X.dtype != np.uint8 or X.ndim != 4 or X.shape[1] != 3 or len(X) == 0:
        raise ValueError('channel_mean_std expects a non-empty uint8 array of shape '
                         '(N, 3, H, W), got %s %s' % (X.dtype, X.shape))
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
    if y.ndim != 1 or (y.size and y.dtype.kind not in 'iu'):
        raise ValueError('one_hot expects a 1-D integer array, got %s %s' % (y.dtype, y.shape))
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError('one_hot labels must be in 0..%d, got %d..%d'
                         % (num_classes - 1, y.min(), y.max()))
    out = np.zeros((len(y), num_classes), np.float32)
    out[np.arange(len(y)), y] = 1.0
    return out


# ----------------------------------------------------------------------------
# Augmentation and batches
# ----------------------------------------------------------------------------

_SIDE, _CROP = 32, 28
_NUM_OFFSETS = _SIDE - _CROP + 1  # crop and paste offsets are 0..4
_MARGIN = _SIDE - _CROP           # zero margin around each image in the work buffer
_BUF = _SIDE + 2 * _MARGIN        # 40: a 32x32 image with a 4-pixel zero frame


def augment_batch(X, crop_rc, paste_rc, flip, buffer=None):
    """Random-crop, re-pad and flip a batch of images, vectorized over the batch.

    Each image: take the 28x28 window at offset crop_rc[i] of the 32x32 source,
    mirror it left-right if flip[i], and paste it at offset paste_rc[i] on a
    black (zero) 32x32 canvas.

    How: output pixel (r, c) inside the pasted window shows source pixel
    (r + crop - paste) (columns mirrored when flipped), i.e. the output is the
    source shifted by at most 4 pixels each way. So each image is written into
    a zero-framed 40x40 slot of a work buffer (mirrored images into a second
    slot), one 32x32 window per image is read out of a sliding-window view with
    a single fancy index, and a mask blacks out what lies outside the pasted
    28x28 window. Per image this copies whole rows; no Python loop over images.

    Inputs:
    - X: uint8 array (B, 3, 32, 32).
    - crop_rc, paste_rc: int arrays (B, 2) of (row, col) offsets in 0..4.
    - flip: bool array (B,).
    - buffer: optional uint8 work array (>= B, 3, 40, 80), zero-initialized
      and reused between calls to skip an allocation.

    Returns uint8 array (B, 3, 32, 32).
    """
    B, m = len(X), _MARGIN
    if buffer is None or len(buffer) < B:
        buffer = np.zeros((B, 3, _BUF, 2 * _BUF), np.uint8)
    buf = buffer[:B]
    # Columns 0..39 hold the image, columns 40..79 its mirror. Each image fills
    # only the slot it will be read from; the other slot is never read, so
    # whatever an earlier batch left there does not matter. Frames stay zero.
    flip = np.asarray(flip, dtype=bool)
    keep = ~flip
    buf[keep, :, m:m + _SIDE, m:m + _SIDE] = X[keep]
    buf[flip, :, m:m + _SIDE, _BUF + m:_BUF + m + _SIDE] = X[flip][..., ::-1]

    # Top-left corner, in the buffer, of the 32x32 window each output shows.
    crop_r, crop_c = crop_rc[:, 0], crop_rc[:, 1]
    paste_r, paste_c = paste_rc[:, 0], paste_rc[:, 1]
    row0 = crop_r - paste_r + m
    col0 = np.where(flip, _BUF + (_SIDE - _CROP) + m - crop_c - paste_c,
                    crop_c - paste_c + m)
    windows = np.lib.stride_tricks.sliding_window_view(buf, (_SIDE, _SIDE), axis=(2, 3))
    out = windows[np.arange(B), :, row0, col0]  # (B, 3, 32, 32), a fresh array

    # Black out the source pixels that lie outside the 28x28 crop.
    pos = np.arange(_SIDE)
    rows_in = (pos >= paste_r[:, None]) & (pos < paste_r[:, None] + _CROP)  # (B, 32)
    cols_in = (pos >= paste_c[:, None]) & (pos < paste_c[:, None] + _CROP)
    inside = rows_in[:, None, :, None] & cols_in[:, None, None, :]          # (B, 1, 32, 32)
    np.multiply(out, inside.view(np.uint8), out=out)
    return out


class BatchIterator:
    """Mini-batches over uint8 images, normalized to float32 one batch at a time.

    Re-entrant: the order and augmentation of epoch e depend only on (seed, e),
    drawn up front from numpy.random.default_rng([seed, e]) for the whole epoch.
    So iterating an epoch twice gives identical batches, and epoch(e, start=k)
    gives exactly batches k, k+1, ... of epoch e without replaying 0..k-1 (the
    training loop resumes mid-epoch with this).

    With shuffle=False and augment=False (evaluation) every sample is visited
    once, in order; the last batch may be smaller than batch_size.

    Usage:
        it = BatchIterator(X, y, 128, shuffle=True, augment=True, seed=0)
        for X_batch, y_batch in it.epoch(3):   # (128, 3, 32, 32) float32, (128,)
            ...
        len(it)                                # batches per epoch, ceil(N / 128)
    """

    def __init__(self, X, y, batch_size, shuffle=False, augment=False, seed=0,
                 mean=None, std=None):
        """
        Inputs:
        - X: uint8 array (N, 3, H, W); 32x32 when augment is on.
        - y: array (N,) of labels (returned per batch as they are).
        - batch_size: positive int.
        - shuffle: random order per epoch.
        - augment: random 28x28 crop re-pasted on a 32x32 black canvas + flip.
        - seed: non-negative int; with the epoch number it fixes all randomness.
        - mean, std: optional per-channel (3,) standardization in [0, 1] units.
        """
        X, y = np.asarray(X), np.asarray(y)
        if X.dtype != np.uint8 or X.ndim != 4 or X.shape[1] != 3:
            raise ValueError('BatchIterator expects uint8 images of shape (N, 3, H, W), '
                             'got %s %s' % (X.dtype, X.shape))
        if y.shape != (len(X),):
            raise ValueError('y must have shape (%d,), got %s' % (len(X), y.shape))
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
                or batch_size < 1:
            raise ValueError('batch_size must be a positive int, got %r' % (batch_size,))
        if augment and X.shape[2:] != (_SIDE, _SIDE):
            raise ValueError('augmentation needs 32x32 images, got %s' % (X.shape[2:],))
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError('seed must be a non-negative int, got %r' % (seed,))
        self.X = np.ascontiguousarray(X)  # no copy for arrays from load_cifar10
        self.y = y
        self.batch_size = int(batch_size)
        self.shuffle, self.augment, self.seed = bool(shuffle), bool(augment), int(seed)
        self._scale, self._shift = _norm_coeffs(mean, std)
        self._buffer = None  # augmentation work array, made on first use

    def __len__(self):
        """Number of batches per epoch, counting a last partial batch."""
        return -(-len(self.X) // self.batch_size)

    def __iter__(self):
        """Epoch 0 (for evaluation loops: `for X_batch, y_batch in it:`)."""
        return self.epoch(0)

    def plan(self, e):
        """Sample order and augmentation parameters of epoch e, for all N samples.

        Returns (order, crop_rc, paste_rc, flip): order int (N,); the others are
        None without augmentation, else int (N, 2), int (N, 2), bool (N,), where
        entry i belongs to the i-th sample *in epoch order*.
        """
        rng = np.random.default_rng([self.seed, e])
        n = len(self.X)
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        if not self.augment:
            return order, None, None, None
        crop_rc = rng.integers(0, _NUM_OFFSETS, size=(n, 2))
        paste_rc = rng.integers(0, _NUM_OFFSETS, size=(n, 2))
        flip = rng.random(n) < 0.5
        return order, crop_rc, paste_rc, flip

    def epoch(self, e, start=0):
        """Generator of (X_batch float32 (B, 3, H, W), y_batch (B,)) for epoch e,
        from batch index `start` (0 <= start <= len(self)) to the end."""
        if isinstance(e, bool) or not isinstance(e, (int, np.integer)) or e < 0:
            raise ValueError('epoch must be a non-negative int, got %r' % (e,))
        if isinstance(start, bool) or not isinstance(start, (int, np.integer)) \
                or not 0 <= start <= len(self):
            raise ValueError('start must be an int in 0..%d, got %r' % (len(self), start))
        return self._batches(int(e), int(start))

    def _batches(self, e, start):
        order, crop_rc, paste_rc, flip = self.plan(e)
        bs = self.batch_size
        for step in range(start, len(self)):
            sl = slice(step * bs, (step + 1) * bs)
            ids = order[sl]
            if self.augment:
                if self._buffer is None:
                    self._buffer = np.zeros((bs, 3, _BUF, 2 * _BUF), np.uint8)
                images = augment_batch(self.X[ids], crop_rc[sl], paste_rc[sl], flip[sl],
                                       self._buffer)
            elif self.shuffle:
                images = self.X[ids]
            else:
                images = self.X[sl]  # a view: evaluation needs no gather
            X_batch = _normalize_into(images, np.empty(images.shape, np.float32),
                                      self._scale, self._shift)
            yield X_batch, self.y[ids]
