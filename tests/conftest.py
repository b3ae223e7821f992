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
import json
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


def rewrite_model_meta(src, dst, drop=(), **changes):
    """Copy the model file ``src`` to ``dst`` with the keys ``drop`` removed from its JSON
    metadata and ``changes`` set in it (a file written before a key existed, or one damaged);
    the arrays are unchanged. Returns dst."""
    with np.load(src) as f:
        stored = {k: f[k] for k in f.files}
    meta = json.loads(str(stored['meta']))
    for key in drop:
        del meta[key]
    meta.update(changes)
    np.savez(dst, **dict(stored, meta=np.array(json.dumps(meta))))
    return dst


def folder_snapshot(path):
    """{file name: bytes} of a folder, to prove that nothing was touched."""
    return {name: open(os.path.join(path, name), 'rb').read() for name in sorted(os.listdir(path))
            if os.path.isfile(os.path.join(path, name))}


# --------------------------------------------------------------------------
# Fake run folders, written through the run-folder contract (runfiles), and the helpers
# the viz, compare and claims tests share
# --------------------------------------------------------------------------

import json
import time

import config as configuration
import runfiles
from cnn_rnn_numpy import FORMAT_VERSION
from metrics import (accuracy, apply_temperature, calibration_report, confusion_matrix, cross_entropy,
                     expected_calibration_error, per_class_accuracy)

# The settings of presets.json's `fast` preset (the method's), the variant compare.py calls the baseline.
FAST = configuration.load_presets()['fast'].settings()
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def loop_ece(probs, labels, n_bins=15):
    """ECE written the slow, obvious way: a loop over bins (lo, hi]."""
    confidence = [float(max(row)) for row in probs]
    prediction = [int(np.argmax(row)) for row in probs]
    n = len(labels)
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        members = [i for i in range(n) if (lo < confidence[i] <= hi) or (b == 0 and confidence[i] == 0)]
        if not members:
            continue
        acc = sum(prediction[i] == labels[i] for i in members) / len(members)
        conf = sum(confidence[i] for i in members) / len(members)
        total += len(members) / n * abs(acc - conf)
    return total


def assert_valid_png(path):
    """PNG signature, decodes, and is not blank (varied pixels, more than one colour)."""
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == PNG_SIGNATURE, f'{path.name} is not a PNG'
    pixels = mpimg.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    rgb = pixels[..., :3].reshape(-1, 3)
    assert rgb.std() > 0.05, f'{path.name} looks blank (pixel std {rgb.std():.4f})'
    assert len(np.unique(rgb[::7], axis=0)) > 10, f'{path.name} has almost a single colour'


def edit_json(path, **changes):
    """Rewrite a JSON file with some keys changed; NaN and inf are written as Python's json does
    (as older versions of main.py did): a damaged file, for the refusal tests."""
    data = json.loads(Path(path).read_text())
    data.update(changes)
    Path(path).write_text(json.dumps(data))


def wait_for_handler(proc, signum=signal.SIGTERM, timeout=60):
    """Wait until the process catches signum (its bit in /proc/PID/status SigCgt): the tool has
    installed cli.py's start-up handler, and is still starting (importing NumPy and the rest)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            status = Path(f'/proc/{proc.pid}/status').read_text()
        except OSError:
            break
        caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith('SigCgt:')), 16)
        if caught >> (signum - 1) & 1:
            return True
        time.sleep(0.001)
    return False


def write_checkpoint(folder, run_config, epoch, **arrays):
    """A ckpt.npz as far as the run-folder contract reads it (runfiles.checkpoint_meta, status):
    metadata of main.py's layout holding the configuration and the epoch reached, and a parameter
    array (or the arrays given). Not resumable by main.py, which checks the whole model."""
    meta = {'format_version': FORMAT_VERSION, 'kind': runfiles.CHECKPOINT_KIND, 'run_config': run_config,
            'state': {'epoch': epoch}}
    runfiles.write_checkpoint(Path(folder) / runfiles.CHECKPOINT_NAME, meta,
                              arrays or {'param/b_o': np.zeros(10, np.float32)})


def build_run_folder(folder, config=None, history=None, predictions=None, metrics=None, checkpoint_epoch=None,
                     divergence=None, crash=None, log=()):
    """THE builder of fake run folders: writes each part given, and only those, through the contract.

    config: config.json's dict; history: [runfiles.EpochRecord]; predictions: runfiles.Predictions;
    metrics: runfiles.Metrics; checkpoint_epoch: write a ckpt.npz (write_checkpoint) that has
    reached this epoch of config's; divergence, crash: runfiles.Divergence / runfiles.Crash;
    log: lines appended to train.log. The folder may exist (its other files are kept).
    Returns the folder as a Path.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if config is not None:
        runfiles.write_config(folder, config)
    for line in log:
        runfiles.append_line(folder / runfiles.LOG_NAME, line)
    if checkpoint_epoch is not None:
        write_checkpoint(folder, config, checkpoint_epoch)
    if history is not None:
        runfiles.write_history(folder, history)
    for record in (predictions, metrics, divergence, crash):
        if record is not None:
            record.write(folder)
    return folder


def metrics_for(predictions, history=(), temperature=None, **fields):
    """The runfiles.Metrics record main.py writes for these predictions (metrics.py's numbers),
    the best validation epoch taken from the history; ``fields`` override any of it.
    temperature: also the temperature and the raw and calibrated calibration reports main.py
    writes (as if T had been fitted on 50 validation images); None leaves them out, as in runs
    of earlier versions."""
    probs, labels = predictions.probs, predictions.labels
    cm = confusion_matrix(labels, probs.argmax(1))
    best = max(history, key=lambda r: r.val_acc) if history else None
    values = dict(test_loss=cross_entropy(probs, labels), test_acc=accuracy(probs, labels),
                  ece=expected_calibration_error(probs, labels), per_class_acc=per_class_accuracy(cm).tolist(),
                  confusion_matrix=cm.tolist(), best_val_acc=best.val_acc if best else None,
                  best_epoch=best.epoch if best else None, epochs_done=len(history), epochs_planned=len(history),
                  evaluated=f'best.npz (epoch {best.epoch})' if best else 'the current parameters',
                  wall_time_s=300.0, train_images_per_s=900.0, test_images_per_s=2000.0,
                  test_images=len(labels), label_names=list(LABEL_NAMES))
    if temperature is not None:
        values.update(temperature=temperature, calibration={
            'raw': calibration_report(probs, labels, samples=200),
            'calibrated': calibration_report(apply_temperature(probs, temperature), labels, samples=200),
            'validation': {'images': 50, 'nll': 1.0, 'nll_calibrated': 0.9}})
    values.update(fields)
    return runfiles.Metrics(**values)


def predictions_with_accuracy(n_test, acc, rng):
    """runfiles.Predictions of n_test images (labels 0..9 in turn) right on exactly
    round(acc * n_test) of them, confidently; hidden states (n_test, 8)."""
    labels = np.arange(n_test) % 10
    predicted = labels.copy()
    wrong = np.arange(n_test) >= round(acc * n_test)
    predicted[wrong] = (labels[wrong] + rng.integers(1, 10, wrong.sum())) % 10
    logits = rng.normal(scale=0.5, size=(n_test, 10))
    logits[np.arange(n_test), predicted] += 4      # 8 sigma above the noise: the argmax is `predicted`
    probs = softmax(logits).astype(np.float32)
    return runfiles.Predictions(probs=probs, labels=labels.astype(np.int64), indices=np.arange(n_test),
                                hidden=rng.normal(size=(n_test, 8)).astype(np.float32))


def make_run_folder(root, name, seed=0, acc=0.4, n_test=200, epochs=3, preset='fast', stopped_early=False,
                    wall_time_s=300.0, ckpt=False, fingerprint=None, evaluated=True, diverged=None,
                    crashed=None, config=None, log=None, temperature=None, **settings):
    """A run folder of the `fast` preset's settings (``settings`` override them) in main.py's format,
    built by build_run_folder. Returns its Path.

    By default finished: config.json, train.log, history.json (``epochs`` records), predictions.npz
    right on exactly round(acc * n_test) test images and metrics.json of them (metrics.py's numbers).
    ckpt: also a ckpt.npz at the configuration's last epoch (at ``epochs`` if stopped_early).
    stopped_early: metrics.json says the time budget stopped it. evaluated=False: no metrics.json
    nor predictions.npz (epochs=0: no history either). fingerprint: the test set's sha256 in
    metrics.json. diverged / crashed: the message of a diverged.json / crashed.json. config:
    config.json's dict as it is; log: train.log's lines. temperature: metrics.json also holds it
    and the calibration reports (metrics_for).
    """
    if config is None:
        config = dict(FAST, **settings, seed=seed, preset=preset, description='', data_dir='data', lr_changes=[])
    rng = np.random.default_rng(seed + 1000 * len(name))
    predictions = predictions_with_accuracy(n_test, acc, rng)
    history = [runfiles.EpochRecord(epoch=e, train_loss=2.0 / e, train_acc=acc * e / epochs, val_loss=2.1 / e,
                                    val_acc=acc * e / epochs + 0.01 * seed, lr=0.02, base_lr=0.02,
                                    epoch_time_s=20.0, images_per_s=900.0, elapsed_s=20.0 * e)
               for e in range(1, epochs + 1)]
    metrics = metrics_for(predictions, history, temperature, stopped_early=stopped_early, wall_time_s=wall_time_s,
                          stop_reason='time budget of 1.0 h reached' if stopped_early else None,
                          data_fingerprint=None if fingerprint is None else {'train': '0' * 64, 'test': fingerprint})
    return build_run_folder(
        Path(root) / name, config, history=history if epochs else None,
        predictions=predictions if evaluated else None, metrics=metrics if evaluated else None,
        checkpoint_epoch=(epochs if stopped_early else config['epochs']) if ckpt else None,
        divergence=runfiles.Divergence(message=diverged) if diverged else None,
        crash=runfiles.Crash(crashed, during='training') if crashed else None,
        log=[f'2024-01-01 12:00:00 run {Path(root) / name}: preset {preset}'] if log is None else log)


def perturbed(model, rng):
    """``model`` with non-zero biases and BatchNorm parameters away from their initial values,
    so that their gradients (and the running statistics in eval mode) are exercised."""
    for name, a in model.params.items():
        if name.endswith('_b') or name.startswith('b_') or name.endswith('_beta'):
            a[:] = rng.standard_normal(a.shape) * 0.1
        elif name.endswith('_gamma'):
            a[:] = rng.uniform(0.5, 1.5, a.shape)
        elif name.endswith('_mean'):
            a[:] = rng.standard_normal(a.shape) * 0.1
        elif name.endswith('_var'):
            a[:] = rng.uniform(0.5, 1.5, a.shape)
    return model


def check_model_gradients(m, X, y, rng, rtol, samples=10):
    """model.loss's gradients of every trained parameter (``samples`` random entries of each) and
    of the input against central differences (float64). A convolution bias before a BatchNorm
    must have a zero gradient in train mode (it moves the batch mean with it)."""
    _, grads = m.loss(X, y, input_grad=True)
    assert sorted(grads) == sorted(m.trained_names() + ['X'])
    for name in m.trained_names() + ['X']:
        arr = X if name == 'X' else m.params[name]
        sample = rng.choice(arr.size, size=min(arr.size, samples), replace=False)
        idx, num = numeric_gradient(lambda: m.loss(X, y)[0], arr, indices=sample, h=1e-6)
        analytic = grads[name].reshape(-1)[idx]
        if m.batchnorm and name.startswith('conv') and name.endswith('_b'):
            assert np.max(np.abs(num)) < 1e-8 and np.max(np.abs(analytic)) < 1e-12, name
            continue
        err = rel_error_vector(num, analytic)
        assert err < rtol, f'{name}: relative error {err:.2e}'
        assert np.max(np.abs(num)) > 1e-6, f'{name}: the check sampled only zero gradients'
