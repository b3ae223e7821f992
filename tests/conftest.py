"""Shared pytest fixtures: small synthetic CIFAR-10 archives and the real one.

`make_cifar_archive` writes a tiny archive in the official "python version"
format, so every test of the data path, the training CLI or the figures can run
offline in well under a second. Use it as a plain function

    from conftest import make_cifar_archive
    data_dir = make_cifar_archive(tmp_path)           # tmp_path/'data'
    data = data_utils.load_cifar10(str(data_dir))

or through the fixtures `cifar_archive_factory` (same function, tmp_path filled
in) and `cifar_data_dir` (a default archive, ready to load).

`real_archive_dir` gives the project's data folder when the real archive has
been linked there (CI does this; locally:
`mkdir -p data && ln -sf /path/to/cifar-10-python.tar.gz data/`) and skips
the test otherwise.
"""
import contextlib
import io
import os
import pickle
import signal
import tarfile
from pathlib import Path

import numpy as np
import pytest

import main
from cnn_rnn_numpy import CNNRNN

REPO_ROOT = Path(__file__).resolve().parent.parent   # pytest.ini puts it on sys.path

LABEL_NAMES = ['airplane', 'automobile', 'bird', 'cat', 'deer',
               'dog', 'frog', 'horse', 'ship', 'truck']
BATCH_NAMES = ['data_batch_%d' % i for i in range(1, 6)] + ['test_batch']

# What `corrupt=` can break, for the bad-input tests.
CORRUPTIONS = (
    'truncate',     # the .tar.gz is cut in half
    'pickle',       # `target` holds bytes that are not a pickle
    'missing',      # `target` is left out of the archive
    'shape',        # `target`'s data has shape (n, 3000) instead of (n, 3072)
    'labels',       # `target` has a label 10
    'traversal',    # an extra member '../evil.txt'
    'absolute',     # an extra member '/tmp/evil.txt' (absolute path)
    'symlink',      # an extra member: a symlink cifar-10-batches-py/link -> /etc/passwd
)


def synthetic_images(labels, seed=0):
    """uint8 images (n, 3, 32, 32) for the given labels: noise plus a per-class
    tint, so the classes are learnable by a small model in a few steps."""
    rng = np.random.default_rng(seed)
    tints = np.random.default_rng(1234).integers(0, 256, size=(10, 3))
    noise = rng.integers(0, 256, size=(len(labels), 3, 32, 32))
    images = (noise + tints[labels][:, :, None, None]) // 2
    return images.astype(np.uint8)


def balanced_labels(n, rng):
    """n labels, as class-balanced as n allows, in a random order."""
    return rng.permutation(np.arange(n) % 10)


def batch_bytes(images, labels, batch_label='training batch 1 of 5', str_keys=False):
    """A batch file's bytes in the official layout (protocol 2, like the original).

    images: uint8 (n, 3, 32, 32) or (n, 3072); labels: n ints. Write the result
    over a file of an extracted folder to build unusual cases by hand.
    """
    d = {
        b'batch_label': batch_label.encode(),
        b'labels': [int(v) for v in labels],
        b'data': np.ascontiguousarray(images).reshape(len(images), -1),
        b'filenames': [('img_%05d.png' % i).encode() for i in range(len(images))],
    }
    if str_keys:
        d = {k.decode(): (v.decode() if isinstance(v, bytes) else v) for k, v in d.items()}
        d['filenames'] = [f.decode() for f in d['filenames']]
    return pickle.dumps(d, protocol=2)


def _meta_bytes(label_names, str_keys):
    d = {b'num_cases_per_batch': 10000, b'num_vis': 3072,
         b'label_names': [n.encode() for n in label_names]}
    if str_keys:
        d = {k.decode(): v for k, v in d.items()}
        d['label_names'] = list(label_names)
    return pickle.dumps(d, protocol=2)


def make_cifar_archive(root, n_per_batch=50, n_test=100, seed=0, str_keys=False,
                       corrupt=None, target='data_batch_3', name='data',
                       images=None, extracted=False):
    """Write a small synthetic CIFAR-10 in the official format; return its data dir.

    Creates `<root>/<name>/cifar-10-python.tar.gz` holding
    cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta, readme.html:
    pickled dicts (protocol 2) with b'data' uint8 (n, 3072) in NCHW order,
    b'labels' a list of ints, and batches.meta with b'label_names'.

    Inputs:
    - root: a directory (usually pytest's tmp_path).
    - n_per_batch: images per training batch (5 batches), class-balanced.
    - n_test: images in test_batch, class-balanced.
    - seed: fixes labels order and pixels.
    - str_keys: write str keys ('data') instead of bytes keys (b'data').
    - corrupt: one of CORRUPTIONS (see above) to break the archive, or None.
    - target: the batch file `corrupt` applies to (default data_batch_3).
    - name: the data dir's name inside root (to build several in one root).
    - images: optional function (labels, seed) -> uint8 (n, 3, 32, 32) to
      control the pixels, e.g. unique values for augmentation checks.
    - extracted: also write the extracted cifar-10-batches-py/ folder (as if
      a previous run had already extracted the archive).

    Returns the data dir as a pathlib.Path; pass str(path) as data_dir.
    Labels of training batch k use seed (seed, k), so the 5 * n_per_batch
    training images are exactly class-balanced when n_per_batch % 10 == 0.
    """
    if corrupt is not None and corrupt not in CORRUPTIONS:
        raise ValueError('corrupt must be one of %s, got %r' % (CORRUPTIONS, corrupt))
    make_images = images or synthetic_images
    data_dir = Path(root) / name
    data_dir.mkdir(parents=True, exist_ok=True)

    files = {}
    for i, batch in enumerate(BATCH_NAMES):
        n = n_test if batch == 'test_batch' else n_per_batch
        labels = balanced_labels(n, np.random.default_rng([seed, i]))
        X = make_images(labels, seed * 100 + i)
        if corrupt == 'labels' and batch == target:
            labels[0] = 10
        if corrupt == 'shape' and batch == target:
            X = X.reshape(n, -1)[:, :3000]
        label = 'testing batch 1 of 1' if batch == 'test_batch' else \
            'training batch %d of 5' % (i + 1)
        files[batch] = batch_bytes(X, labels, label, str_keys)
    files['batches.meta'] = _meta_bytes(LABEL_NAMES, str_keys)
    files['readme.html'] = (b'<meta HTTP-EQUIV="REFRESH" content="0; '
                            b'URL=https://www.cs.toronto.edu/~kriz/cifar.html">\n')
    if corrupt == 'pickle':
        files[target] = b'this is not a pickle\n' * 10
    if corrupt == 'missing':
        del files[target]

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode='w:gz') as tar:
        _add_dir(tar, 'cifar-10-batches-py')
        for fname, content in files.items():
            _add_file(tar, 'cifar-10-batches-py/' + fname, content)
        if corrupt == 'traversal':
            _add_file(tar, '../evil.txt', b'escaped\n')
        elif corrupt == 'absolute':
            _add_file(tar, '/tmp/evil-cifar-test.txt', b'escaped\n')
        elif corrupt == 'symlink':
            link = tarfile.TarInfo('cifar-10-batches-py/link')
            link.type, link.linkname = tarfile.SYMTYPE, '/etc/passwd'
            tar.addfile(link)
    payload = buf.getvalue()
    if corrupt == 'truncate':
        payload = payload[:len(payload) // 2]
    _write_atomic(data_dir / 'cifar-10-python.tar.gz', payload)

    if extracted:
        folder = data_dir / 'cifar-10-batches-py'
        folder.mkdir(exist_ok=True)
        for fname, content in files.items():
            _write_atomic(folder / fname, content)
    return data_dir


def _add_dir(tar, name):
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1262304000
    tar.addfile(info)


def _add_file(tar, name, content):
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(content), 0o644, 1262304000
    tar.addfile(info, io.BytesIO(content))


def _write_atomic(path, content):
    tmp = Path(str(path) + '.tmp')
    tmp.write_bytes(content)
    os.replace(tmp, path)


@pytest.fixture
def cifar_archive_factory(tmp_path):
    """make_cifar_archive with root=tmp_path: `cifar_archive_factory(**kwargs)`."""
    def factory(**kwargs):
        return make_cifar_archive(tmp_path, **kwargs)
    return factory


@pytest.fixture
def cifar_data_dir(tmp_path):
    """A default synthetic archive (250 train, 100 test images) in tmp_path/'data'."""
    return make_cifar_archive(tmp_path)


@pytest.fixture(scope='session')
def real_archive_dir():
    """The project's data folder (repo/data) if the real CIFAR-10 is there, else skip.

    The real archive is data/cifar-10-python.tar.gz (a link in CI); a folder
    already extracted there counts too. Loading extracts it in place, once.
    """
    data_dir = REPO_ROOT / 'data'
    if not ((data_dir / 'cifar-10-python.tar.gz').is_file()
            or (data_dir / 'cifar-10-batches-py').is_dir()):
        pytest.skip('real CIFAR-10 archive not found at %s/cifar-10-python.tar.gz'
                    % data_dir)
    return data_dir


def replace_archive_member(data_dir, member, content):
    """Rewrite <data_dir>/cifar-10-python.tar.gz with cifar-10-batches-py/<member>
    holding `content` (bytes, e.g. a crafted pickle); other members are kept."""
    path = Path(data_dir) / 'cifar-10-python.tar.gz'
    buf = io.BytesIO()
    with tarfile.open(path) as src, tarfile.open(fileobj=buf, mode='w:gz') as dst:
        for info in src:
            if info.name == 'cifar-10-batches-py/' + member:
                _add_file(dst, info.name, content)
            else:
                dst.addfile(info, src.extractfile(info) if info.isfile() else None)
    _write_atomic(path, buf.getvalue())


def code_running_pickle(marker_path):
    """Pickle bytes that would run `touch marker_path` if loaded with plain
    pickle.load; a safe loader must refuse them and leave marker_path absent."""
    class Exploit:
        def __reduce__(self):
            return (os.system, (f'touch {marker_path}',))
    return pickle.dumps({b'data': Exploit(), b'labels': []}, protocol=2)


# --------------------------------------------------------------------------
# Shared by the test modules (so that no test module imports another)
# --------------------------------------------------------------------------

def numeric_gradient(f, x, h=1e-5, indices=None):
    """Central-difference gradient of the scalar f() with respect to array x (changed in place).

    indices: optional list of flat indices to check (all when None).
    Returns (flat indices, numeric gradient at them).
    """
    flat = x.reshape(-1)
    if indices is None:
        indices = np.arange(flat.size)
    grad = np.empty(len(indices))
    for k, i in enumerate(indices):
        old = flat[i]
        flat[i] = old + h
        fp = f()
        flat[i] = old - h
        fm = f()
        flat[i] = old
        grad[k] = (fp - fm) / (2 * h)
    return indices, grad


def rel_error(a, b):
    """Largest elementwise relative error, CS231n style: max |a-b| / max(|a|+|b|, 1e-8)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.max(np.abs(a - b) / np.maximum(1e-8, np.abs(a) + np.abs(b))))


def rel_error_vector(a, b):
    """Relative error of a gradient vector: max |a-b| / max(|a|+|b|).

    Used for the whole model, where a few entries (a nearly dead ReLU channel)
    have true gradients near 1e-11, below what central differences resolve on
    a loss of ~2 (eps * loss / h ~ 5e-11): their elementwise ratio measures
    rounding, not the gradient.
    """
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.max(np.abs(a - b)) / max(1e-300, np.max(np.abs(a) + np.abs(b))))


# 250 training images -> 225 train / 25 val; batch 32 -> 8 steps per epoch.
SMOKE = ['--preset', 'smoke', '--subset', '1']


STEPS_PER_EPOCH = 8


def train_run(data_dir, out, *extra, interrupt_after=None):
    with interrupted_after(interrupt_after):
        return main.run(SMOKE + ['--data-dir', data_dir, '--out', str(out), *extra])


def resume(ckpt, *extra, interrupt_after=None):
    with interrupted_after(interrupt_after):
        return main.run(['--resume', str(ckpt), *extra])


@contextlib.contextmanager
def interrupted_after(steps):
    """Send this process SIGINT during training step ``steps`` (1-based), as Ctrl-C would.

    The run's own signal handler (main.Stopper) then stops it after that step,
    exactly as it does for a user.
    """
    if steps is None:
        yield
        return
    real_loss, calls = CNNRNN.loss, {'n': 0}

    def loss(self, *args, **kwargs):
        calls['n'] += 1
        if calls['n'] == steps:
            os.kill(os.getpid(), signal.SIGINT)
        return real_loss(self, *args, **kwargs)
    CNNRNN.loss = loss
    try:
        yield
    finally:
        CNNRNN.loss = real_loss


def arrays(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files if k != 'meta'}


def folder_snapshot(path):
    """{file name: bytes} of a folder, to prove that nothing was touched."""
    return {name: open(os.path.join(path, name), 'rb').read() for name in sorted(os.listdir(path))
            if os.path.isfile(os.path.join(path, name))}
