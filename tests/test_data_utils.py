"""Tests for data_utils: loading, splitting, normalization, batches, augmentation,
bad inputs and the download path (against a local http.server).

Everything runs on small synthetic archives from conftest.make_cifar_archive,
except the integration test, which uses the real archive when it is linked at
data/cifar-10-python.tar.gz and is skipped otherwise.
"""
import errno
import functools
import http.server
import os
import socket
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import data_utils as du
from conftest import (LABEL_NAMES, batch_bytes, code_running_pickle, make_cifar_archive,
                      replace_archive_member)


def load(data_dir, **kwargs):
    return du.load_cifar10(str(data_dir), **kwargs)


def raw_training_set(data_dir):
    """All training images (N, 3072) and labels (N,) of an extracted folder, in
    archive order, read with plain pickle as an independent reference."""
    import pickle
    X, y = [], []
    for name in du.TRAIN_BATCHES:
        with open(os.path.join(data_dir, du.FOLDER_NAME, name), 'rb') as f:
            d = pickle.load(f, encoding='bytes')
        X.append(d[b'data'])
        y.extend(d[b'labels'])
    return np.concatenate(X), np.array(y)


def coded_images(n):
    """Images whose pixels say where they came from: channel 0 = row + 1,
    channel 1 = column + 1, channel 2 = image index + 1 (so 0 only on the canvas)."""
    assert n < 255
    X = np.empty((n, 3, 32, 32), np.uint8)
    X[:, 0] = np.arange(1, 33)[None, :, None]
    X[:, 1] = np.arange(1, 33)[None, None, :]
    X[:, 2] = np.arange(1, n + 1)[:, None, None]
    return X


def entries(data_dir):
    return sorted(os.listdir(data_dir))


# ----------------------------------------------------------------------------
# Loading, shapes, splits
# ----------------------------------------------------------------------------

def test_load_shapes_dtypes_and_names(cifar_data_dir):
    data = load(cifar_data_dir)
    # 5 batches x 50 = 250 training images -> 225 train / 25 val; 100 test.
    expected = {'X_train': 225, 'X_val': 25, 'X_test': 100}
    for key, n in expected.items():
        X, y = data[key], data['y' + key[1:]]
        assert X.shape == (n, 3, 32, 32) and X.dtype == np.uint8
        assert y.shape == (n,) and y.dtype == np.int64
        assert y.min() >= 0 and y.max() <= 9
    assert data['label_names'] == LABEL_NAMES
    assert all(type(name) is str for name in data['label_names'])


def test_loaded_images_are_the_archive_pixels_in_nchw(cifar_data_dir):
    data = load(cifar_data_dir, seed=3)
    raw_X, raw_y = raw_training_set(cifar_data_dir)
    train_idx, val_idx = du.split_indices(raw_y, 1.0, 0.1, seed=3)
    # Row i of a batch is 1024 red, 1024 green, 1024 blue values, row-major.
    np.testing.assert_array_equal(data['X_train'].reshape(-1, 3072), raw_X[train_idx])
    np.testing.assert_array_equal(data['X_val'].reshape(-1, 3072), raw_X[val_idx])
    np.testing.assert_array_equal(data['y_train'], raw_y[train_idx])
    assert data['X_train'][5, 1, 7, 9] == raw_X[train_idx[5], 1024 + 7 * 32 + 9]


def test_train_val_disjoint_and_cover_subset(cifar_data_dir):
    load(cifar_data_dir)  # extracts
    _, raw_y = raw_training_set(cifar_data_dir)
    train_idx, val_idx = du.split_indices(raw_y, 1.0, 0.1, seed=0)
    assert len(np.intersect1d(train_idx, val_idx)) == 0
    np.testing.assert_array_equal(np.union1d(train_idx, val_idx), np.arange(250))


def test_subset_split_is_stratified(cifar_archive_factory):
    data_dir = cifar_archive_factory(n_per_batch=200, n_test=100)  # 100 per class
    data = load(data_dir, subset=0.4, val_fraction=0.1, seed=1)
    assert len(data['X_train']) == 360 and len(data['X_val']) == 40
    assert np.bincount(data['y_train'], minlength=10).tolist() == [36] * 10
    assert np.bincount(data['y_val'], minlength=10).tolist() == [4] * 10
    assert np.bincount(data['y_test'], minlength=10).tolist() == [10] * 10


def test_split_indices_cifar_sized():
    y = np.random.default_rng(0).permutation(np.repeat(np.arange(10), 5000))
    train, val = du.split_indices(y, subset=0.4, val_fraction=0.1, seed=0)
    assert (len(train), len(val)) == (18000, 2000)
    assert np.bincount(y[train]).tolist() == [1800] * 10
    assert np.bincount(y[val]).tolist() == [200] * 10
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)
    assert len(np.intersect1d(train, val)) == 0
    train, val = du.split_indices(y, subset=1.0, val_fraction=0.1, seed=0)
    assert (len(train), len(val)) == (45000, 5000)
    assert np.bincount(y[val]).tolist() == [500] * 10


def test_split_indices_uneven_classes_stay_proportional():
    counts = np.array([100, 37, 250, 5, 64, 80, 91, 13, 300, 60])
    y = np.random.default_rng(1).permutation(np.repeat(np.arange(10), counts))
    train, val = du.split_indices(y, subset=0.3, val_fraction=0.2, seed=2)
    kept = np.bincount(y[np.concatenate([train, val])], minlength=10)
    assert kept.sum() == round(0.3 * len(y))
    assert np.all(np.abs(kept - 0.3 * counts) <= 1)
    assert len(val) == round(0.2 * kept.sum())
    assert np.all(np.abs(np.bincount(y[val], minlength=10) - 0.2 * kept) <= 1)


def test_split_is_seeded():
    y = np.repeat(np.arange(10), 100)
    a = du.split_indices(y, 0.5, 0.1, seed=7)
    b = du.split_indices(y, 0.5, 0.1, seed=7)
    c = du.split_indices(y, 0.5, 0.1, seed=8)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


def test_load_is_deterministic_per_seed(cifar_data_dir):
    a = load(cifar_data_dir, subset=0.6, seed=4)
    b = load(cifar_data_dir, subset=0.6, seed=4)
    c = load(cifar_data_dir, subset=0.6, seed=5)
    for key in ('X_train', 'y_train', 'X_val', 'y_val', 'X_test', 'y_test'):
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a['X_val'], c['X_val'])
    np.testing.assert_array_equal(a['X_test'], c['X_test'])  # test never subsampled


@pytest.mark.parametrize('kwargs', [
    {'subset': 0}, {'subset': -0.1}, {'subset': 1.5}, {'subset': float('nan')},
    {'subset': True}, {'subset': '0.5'}, {'val_fraction': 0}, {'val_fraction': 1.0},
    {'val_fraction': 1.2}, {'val_fraction': None},
])
def test_bad_fractions_raise_value_error_before_touching_disk(tmp_path, kwargs):
    missing = tmp_path / 'nothing-here'
    with pytest.raises(ValueError, match='subset|val_fraction'):
        du.load_cifar10(str(missing), **kwargs)
    assert not missing.exists()  # no download attempted, no folder created


def test_subset_too_small_for_a_split(cifar_data_dir):
    with pytest.raises(ValueError, match='too few'):
        load(cifar_data_dir, subset=0.001)


def test_str_key_pickles_load_like_bytes_keys(tmp_path):
    a = load(make_cifar_archive(tmp_path, name='bytes_keys'))
    b = load(make_cifar_archive(tmp_path, name='str_keys', str_keys=True))
    for key in ('X_train', 'y_train', 'X_val', 'y_val', 'X_test', 'y_test', 'label_names'):
        np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize('protocol', [4, 5])
def test_python3_pickle_protocols_load(cifar_archive_factory, protocol):
    import pickle
    data_dir = cifar_archive_factory(extracted=True)
    images = np.random.default_rng(0).integers(0, 256, (50, 3072), dtype=np.uint8)
    labels = list(range(10)) * 5
    path = data_dir / du.FOLDER_NAME / 'data_batch_1'
    path.write_bytes(pickle.dumps({'data': images, 'labels': labels}, protocol=protocol))
    X, y = du.load_batch(str(path))
    np.testing.assert_array_equal(X, images)
    assert y.tolist() == labels and y.dtype == np.int64


def test_unequal_batch_sizes_are_loaded(cifar_archive_factory):
    data_dir = cifar_archive_factory(extracted=True)
    labels = np.arange(120) % 10
    images = np.full((120, 3, 32, 32), 7, np.uint8)
    path = data_dir / du.FOLDER_NAME / 'data_batch_5'
    path.write_bytes(batch_bytes(images, labels))
    data = load(data_dir)
    assert len(data['X_train']) + len(data['X_val']) == 4 * 50 + 120
    assert (data['X_train'] == 7).all(axis=(1, 2, 3)).sum() + \
        (data['X_val'] == 7).all(axis=(1, 2, 3)).sum() == 120


def test_apportion_largest_remainder():
    assert du.apportion([5000] * 10, 20000).tolist() == [2000] * 10
    # Exact shares 0.75, 0.75, 1.5: the two leftover units go to the largest remainders.
    assert du.apportion([1, 1, 2], 3).tolist() == [1, 1, 1]
    # Exact shares 1.5, 1.5, 3: the leftover unit goes to the lower index of the tie.
    assert du.apportion([3, 3, 6], 6).tolist() == [2, 1, 3]
    assert du.apportion([10, 0, 5], 3).tolist() == [2, 0, 1]
    assert du.apportion([4, 4], 0).tolist() == [0, 0]
    assert du.apportion([], 0).tolist() == []
    rng = np.random.default_rng(0)
    for _ in range(500):
        weights = rng.integers(0, rng.choice([3, 40, 5000]), rng.integers(1, 12))
        total = int(rng.integers(0, weights.sum() + 1))
        parts = du.apportion(weights, total)
        assert parts.dtype == np.int64 and parts.sum() == total
        assert np.all(parts <= weights)
        assert np.all(np.abs(parts - weights * total / max(weights.sum(), 1)) < 1)


@pytest.mark.parametrize('weights,total', [([3, 4], 8), ([3, 4], -1), ([3, -4], 1),
                                           ([[1, 2]], 1)])
def test_apportion_rejects_impossible_requests(weights, total):
    with pytest.raises(ValueError):
        du.apportion(weights, total)


# ----------------------------------------------------------------------------
# Normalization, statistics, one-hot
# ----------------------------------------------------------------------------

def test_normalize_to_unit_range():
    X = np.arange(256, dtype=np.uint8).repeat(12).reshape(1, 3, 32, 32)
    out = du.normalize(X)
    assert out.dtype == np.float32 and out.shape == X.shape
    assert out.min() == 0.0 and out.max() == 1.0
    np.testing.assert_allclose(out, X / 255.0, rtol=1e-6)


def test_normalize_standardizes_per_channel():
    X = np.random.default_rng(0).integers(0, 256, (20, 3, 32, 32), dtype=np.uint8)
    mean, std = np.array([0.2, 0.5, 0.7]), np.array([0.1, 0.25, 0.3])
    out = du.normalize(X, mean, std)
    expected = (X / 255.0 - mean[None, :, None, None]) / std[None, :, None, None]
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    # With the data's own statistics every channel ends at mean 0, std 1.
    m, s = du.channel_mean_std(X)
    z = du.normalize(X, m, s)
    np.testing.assert_allclose(z.mean(axis=(0, 2, 3)), 0, atol=1e-4)
    np.testing.assert_allclose(z.std(axis=(0, 2, 3)), 1, atol=1e-4)


@pytest.mark.parametrize('X,mean,std', [
    (np.zeros((2, 3, 32, 32), np.float32), None, None),    # already float
    (np.zeros((2, 3, 32, 32), np.uint8), [0.5, 0.5], [0.2, 0.2]),  # wrong shape
    (np.zeros((2, 3, 32, 32), np.uint8), [0.5] * 3, [0.0] * 3),    # std 0
    (np.zeros((2, 3, 32, 32), np.uint8), [0.5] * 3, None),          # mean only
    (np.zeros((2, 4, 32, 32), np.uint8), None, None),      # not 3 channels
])
def test_normalize_rejects_bad_input(X, mean, std):
    with pytest.raises(ValueError):
        du.normalize(X, mean, std)


def test_channel_mean_std_exact_and_chunk_independent():
    X = np.random.default_rng(1).integers(0, 256, (50, 3, 32, 32), dtype=np.uint8)
    X[:, 2] //= 4  # make the channels differ
    mean, std = du.channel_mean_std(X)
    assert mean.dtype == np.float32 and mean.shape == (3,) and std.shape == (3,)
    Xf = X.astype(np.float64) / 255
    np.testing.assert_allclose(mean, Xf.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(std, Xf.std(axis=(0, 2, 3)), rtol=1e-5)
    m7, s7 = du.channel_mean_std(X, chunk_size=7)
    np.testing.assert_array_equal(m7, mean)
    np.testing.assert_array_equal(s7, std)


def test_one_hot():
    out = du.one_hot(np.array([3, 0, 9, 3]))
    assert out.dtype == np.float32 and out.shape == (4, 10)
    np.testing.assert_array_equal(out.argmax(axis=1), [3, 0, 9, 3])
    np.testing.assert_array_equal(out.sum(axis=1), 1)
    assert du.one_hot(np.array([1, 2]), num_classes=3).tolist() == [[0, 1, 0], [0, 0, 1]]
    for bad in (np.array([10]), np.array([-1]), np.array([0.5]), np.zeros((2, 2), int)):
        with pytest.raises(ValueError):
            du.one_hot(bad)


# ----------------------------------------------------------------------------
# BatchIterator
# ----------------------------------------------------------------------------

def small_set(n=37, seed=0):
    X = np.random.default_rng(seed).integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    return X, np.arange(n)  # label = index, so batches show which samples came


def test_evaluation_order_and_last_partial_batch():
    X, y = small_set(10)
    it = du.BatchIterator(X, y, 4)
    assert len(it) == 3
    batches = list(it.epoch(0))
    assert [len(yb) for _, yb in batches] == [4, 4, 2]
    assert all(xb.dtype == np.float32 and xb.shape[1:] == (3, 32, 32) for xb, _ in batches)
    np.testing.assert_array_equal(np.concatenate([yb for _, yb in batches]), y)
    np.testing.assert_array_equal(np.concatenate([xb for xb, _ in batches]),
                                  du.normalize(X))
    # Evaluation does not depend on the epoch number, and __iter__ is epoch 0.
    np.testing.assert_array_equal(np.concatenate([yb for _, yb in it.epoch(5)]), y)
    assert len(list(iter(it))) == 3
    assert len(du.BatchIterator(X, y, 5)) == 2 and len(du.BatchIterator(X, y, 11)) == 1


def test_standardized_batches_match_normalize():
    X, y = small_set(20)
    mean, std = du.channel_mean_std(X)
    (xb, yb), = du.BatchIterator(X, y, 32, mean=mean, std=std).epoch(0)
    np.testing.assert_allclose(xb, du.normalize(X, mean, std), rtol=1e-6, atol=1e-6)


def test_shuffle_visits_every_sample_once_and_pixels_follow_labels():
    X, y = small_set(37)
    it = du.BatchIterator(X, y, 8, shuffle=True, seed=3)
    batches = list(it.epoch(0))
    order = np.concatenate([yb for _, yb in batches])
    assert sorted(order.tolist()) == list(range(37))
    assert not np.array_equal(order, y)
    np.testing.assert_array_equal(np.concatenate([xb for xb, _ in batches]),
                                  du.normalize(X[order]))


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)


def test_epoch_is_reentrant_and_resumable():
    X, y = small_set(37)
    it = du.BatchIterator(X, y, 8, shuffle=True, augment=True, seed=11)
    full = list(it.epoch(2))
    assert len(full) == len(it) == 5
    assert_same_batches(list(it.epoch(2)), full)  # iterating again: same batches
    for k in range(len(it) + 1):  # resuming at step k: exactly steps k..
        assert_same_batches(list(it.epoch(2, start=k)), full[k:])
    # A fresh iterator with the same seed reproduces the epoch too.
    fresh = du.BatchIterator(X, y, 8, shuffle=True, augment=True, seed=11)
    assert_same_batches(list(fresh.epoch(2, start=3)), full[3:])


def test_epochs_and_seeds_differ():
    X, y = small_set(37)
    it = du.BatchIterator(X, y, 8, shuffle=True, augment=True, seed=11)
    other_seed = du.BatchIterator(X, y, 8, shuffle=True, augment=True, seed=12)
    e2 = np.concatenate([yb for _, yb in it.epoch(2)])
    e3 = np.concatenate([yb for _, yb in it.epoch(3)])
    s2 = np.concatenate([yb for _, yb in other_seed.epoch(2)])
    assert not np.array_equal(e2, e3) and not np.array_equal(e2, s2)
    # Augmentation alone (no shuffle) also changes with the epoch.
    aug = du.BatchIterator(X, y, 37, augment=True, seed=0)
    (a0, _), = aug.epoch(0)
    (a1, _), = aug.epoch(1)
    assert not np.array_equal(a0, a1)


def test_iterator_rejects_bad_arguments():
    X, y = small_set(10)
    with pytest.raises(ValueError):
        du.BatchIterator(X.astype(np.float32), y, 4)
    with pytest.raises(ValueError):
        du.BatchIterator(X, y[:5], 4)
    with pytest.raises(ValueError):
        du.BatchIterator(X, y, 0)
    with pytest.raises(ValueError):
        du.BatchIterator(X[:, :, :28, :28], y, 4, augment=True)
    it = du.BatchIterator(X, y, 4)
    for bad_start in (-1, 4, 1.5):
        with pytest.raises(ValueError):
            it.epoch(0, start=bad_start)
    with pytest.raises(ValueError):
        it.epoch(-1)


def decode_augmented(out):
    """For one augmented coded image (3, 32, 32) uint8, check the layout and
    return (paste_row, paste_col, crop_row, crop_col, flipped, image_id)."""
    canvas = out[2] == 0
    rows = np.flatnonzero(~canvas.all(axis=1))
    cols = np.flatnonzero(~canvas.all(axis=0))
    # The non-canvas region is exactly one 28x28 window...
    assert len(rows) == 28 and len(cols) == 28
    assert rows[-1] - rows[0] == 27 and cols[-1] - cols[0] == 27
    pr, pc = rows[0], cols[0]
    window = out[:, pr:pr + 28, pc:pc + 28].astype(int)
    assert (window > 0).all()
    # ...and everything outside it is black in every channel.
    outside = out.copy()
    outside[:, pr:pr + 28, pc:pc + 28] = 0
    assert not outside.any()
    # Inside: one source image, consecutive source rows top to bottom, and
    # consecutive source columns left to right (or right to left if flipped).
    image_ids = np.unique(window[2])
    assert len(image_ids) == 1
    src_rows, src_cols = window[0] - 1, window[1] - 1
    np.testing.assert_array_equal(
        src_rows, np.broadcast_to(src_rows[0, 0] + np.arange(28)[:, None], (28, 28)))
    flipped = src_cols[0, 1] < src_cols[0, 0]
    step = -1 if flipped else 1
    np.testing.assert_array_equal(
        src_cols, np.broadcast_to(src_cols[0, 0] + step * np.arange(28)[None, :], (28, 28)))
    cr = src_rows[0, 0]
    cc = src_cols[0, -1] if flipped else src_cols[0, 0]
    assert 0 <= cr <= 4 and 0 <= cc <= 4
    return pr, pc, cr, cc, flipped, image_ids[0] - 1


def test_augmentation_is_a_28x28_crop_pasted_on_black_with_flips():
    X = coded_images(200)
    y = np.arange(200)
    it = du.BatchIterator(X, y, 64, shuffle=True, augment=True, seed=5)
    seen = []
    for xb, yb in it.epoch(0):
        pixels = np.rint(xb * 255).astype(np.uint8)
        for out, label in zip(pixels, yb):
            pr, pc, cr, cc, flipped, image_id = decode_augmented(out)
            assert image_id == label  # the labels travel with their own images
            seen.append((pr, pc, cr, cc, flipped))
    seen = np.array(seen)
    assert len(seen) == 200
    for column in range(4):  # every crop and paste offset 0..4 occurs
        assert set(seen[:, column]) == set(range(5))
    assert 0.35 < seen[:, 4].mean() < 0.65  # flips with probability 1/2


def test_augment_batch_fixed_offsets_and_flip_mirrors():
    X = np.random.default_rng(0).integers(1, 256, (4, 3, 32, 32), dtype=np.uint8)
    same = np.full((4, 2), 2)
    plain = du.augment_batch(X, same, same, np.zeros(4, bool))
    # Crop and paste at the same offset: the image with a 2-pixel black frame.
    expected = np.zeros_like(X)
    expected[:, :, 2:30, 2:30] = X[:, :, 2:30, 2:30]
    np.testing.assert_array_equal(plain, expected)
    # The window is centred, so flipping is exactly a left-right mirror.
    flipped = du.augment_batch(X, same, same, np.ones(4, bool))
    np.testing.assert_array_equal(flipped, plain[..., ::-1])
    # Crop at (0, 4), paste at (4, 0): source rows 0..27 land on rows 4..31,
    # source columns 4..31 on columns 0..27.
    moved = du.augment_batch(X, np.array([[0, 4]] * 4), np.array([[4, 0]] * 4),
                             np.zeros(4, bool))
    expected = np.zeros_like(X)
    expected[:, :, 4:, :28] = X[:, :, :28, 4:]
    np.testing.assert_array_equal(moved, expected)


def test_augmentation_canvas_is_black_before_standardization():
    X = coded_images(16)
    mean, std = np.array([0.4, 0.5, 0.6]), np.array([0.2, 0.25, 0.3])
    it = du.BatchIterator(X, np.arange(16), 16, augment=True, seed=0, mean=mean, std=std)
    (xb, _), = it.epoch(0)
    # Channel 2 is never 0 in the source images, so 0 there marks the canvas.
    canvas = np.rint((xb[:, 2] * std[2] + mean[2]) * 255) == 0
    assert 0 < canvas.mean() < 0.5
    np.testing.assert_allclose(xb[:, 0][canvas], -mean[0] / std[0], rtol=1e-5)
    assert X.dtype == np.uint8 and X[0, 0, 0, 0] == 1  # the dataset is untouched


# ----------------------------------------------------------------------------
# Bad archives and folders
# ----------------------------------------------------------------------------

@pytest.mark.parametrize('corrupt,target,needle', [
    ('truncate', 'data_batch_3', 'cifar-10-python.tar.gz is truncated or corrupt'),
    ('missing', 'data_batch_3', 'does not contain cifar-10-batches-py/data_batch_3'),
    ('missing', 'batches.meta', 'does not contain cifar-10-batches-py/batches.meta'),
    ('traversal', 'data_batch_3', "'../evil.txt'"),
    ('absolute', 'data_batch_3', "'/tmp/evil-cifar-test.txt'"),
    ('symlink', 'data_batch_3', "'cifar-10-batches-py/link'"),
])
def test_bad_archive_is_refused_and_nothing_is_left(cifar_archive_factory, tmp_path,
                                                   corrupt, target, needle):
    data_dir = cifar_archive_factory(corrupt=corrupt, target=target)
    with pytest.raises(du.DataError) as info:
        load(data_dir)
    message = str(info.value)
    assert needle in message
    assert 'cifar-10-python.tar.gz' in message and ('delete' in message)
    assert '\n' not in message
    # Atomic: no extracted folder and no temp dir; unsafe members went nowhere.
    assert entries(data_dir) == ['cifar-10-python.tar.gz']
    assert not (tmp_path / 'evil.txt').exists()
    assert not os.path.exists('/tmp/evil-cifar-test.txt')


@pytest.mark.parametrize('corrupt,target,needle', [
    ('pickle', 'data_batch_3', 'data_batch_3 is corrupt'),
    ('pickle', 'batches.meta', 'batches.meta is corrupt'),
    ('shape', 'data_batch_2', 'data_batch_2 has images of shape (50, 3000)'),
    ('labels', 'data_batch_4', 'data_batch_4 has labels outside 0..9'),
    ('labels', 'test_batch', 'test_batch has labels outside 0..9'),
])
def test_bad_batch_file_names_the_file_and_the_fix(cifar_archive_factory, corrupt,
                                                   target, needle):
    data_dir = cifar_archive_factory(corrupt=corrupt, target=target)
    with pytest.raises(du.DataError) as info:
        load(data_dir)
    message = str(info.value)
    assert needle in message
    folder = os.path.join(str(data_dir), du.FOLDER_NAME)
    assert os.path.join(folder, target) in message
    assert 'delete %s and %s' % (folder, os.path.join(str(data_dir), du.ARCHIVE_NAME)) \
        in message
    assert 'run again to re-download' in message


def test_missing_batch_in_extracted_folder(cifar_data_dir):
    load(cifar_data_dir)
    batch = os.path.join(str(cifar_data_dir), du.FOLDER_NAME, 'data_batch_3')
    os.remove(batch)
    with pytest.raises(du.DataError) as info:
        load(cifar_data_dir)
    assert str(info.value).startswith('%s is missing; delete %s and ' % (
        batch, os.path.join(str(cifar_data_dir), du.FOLDER_NAME)))


def test_pickle_cannot_run_code(cifar_archive_factory):
    data_dir = cifar_archive_factory(extracted=True)

    class Exploit:
        def __reduce__(self):
            return (os.system, ('touch %s' % (data_dir / 'pwned'),))

    import pickle
    path = data_dir / du.FOLDER_NAME / 'data_batch_1'
    path.write_bytes(pickle.dumps({b'data': Exploit(), b'labels': []}, protocol=2))
    with pytest.raises(du.DataError, match='data_batch_1 is corrupt'):
        load(data_dir)
    assert not (data_dir / 'pwned').exists()


def test_half_extracted_temp_dir_is_never_used(cifar_data_dir):
    # A killed extraction leaves a hidden temp folder with a partial folder.
    stale = cifar_data_dir / (du._EXTRACT_PREFIX + 'crashed') / du.FOLDER_NAME
    stale.mkdir(parents=True)
    (stale / 'data_batch_1').write_bytes(b'partial')
    data = load(cifar_data_dir)
    assert len(data['X_train']) == 225
    assert (cifar_data_dir / du.FOLDER_NAME / 'data_batch_5').is_file()
    # The extraction cleans up only its own temp folder.
    assert entries(cifar_data_dir) == sorted([du.ARCHIVE_NAME, du.FOLDER_NAME,
                                              stale.parent.name])


def test_hand_placed_archive_warns_once_about_md5(cifar_data_dir, capsys):
    load(cifar_data_dir)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    archive = os.path.join(str(cifar_data_dir), du.ARCHIVE_NAME)
    assert err[0].startswith('warning: %s has md5 %s' % (archive, du.md5sum(archive)))
    assert du.CIFAR10_MD5 in err[0]
    load(cifar_data_dir)  # already extracted: silent
    import shutil
    shutil.rmtree(cifar_data_dir / du.FOLDER_NAME)
    load(cifar_data_dir)  # re-extracted in the same process: still silent
    assert capsys.readouterr().err == ''


def test_official_md5_gives_no_warning(cifar_data_dir, capsys, monkeypatch):
    archive = os.path.join(str(cifar_data_dir), du.ARCHIVE_NAME)
    monkeypatch.setattr(du, 'CIFAR10_MD5', du.md5sum(archive))
    load(cifar_data_dir)
    assert capsys.readouterr().err == ''


# ----------------------------------------------------------------------------
# load_test_set: the test split for the figures, without extracting anything
# ----------------------------------------------------------------------------

@pytest.mark.parametrize('extracted', [False, True])
def test_load_test_set_matches_load_cifar10(tmp_path, extracted):
    data_dir = make_cifar_archive(tmp_path, extracted=extracted)
    before = snapshot(data_dir)
    X, y, names = du.load_test_set(str(data_dir))
    assert snapshot(data_dir) == before  # nothing extracted, no temp folder left
    assert X.shape == (100, 3, 32, 32) and X.dtype == np.uint8
    assert y.shape == (100,) and y.dtype == np.int64
    assert names == LABEL_NAMES and all(type(name) is str for name in names)
    reference = load(make_cifar_archive(tmp_path, name='reference'))
    np.testing.assert_array_equal(X, reference['X_test'])
    np.testing.assert_array_equal(y, reference['y_test'])


def test_load_test_set_without_data_says_what_to_pass(tmp_path):
    (tmp_path / 'empty').mkdir()
    for data_dir in (tmp_path / 'empty', tmp_path / 'nowhere'):
        with pytest.raises(du.DataError) as info:
            du.load_test_set(str(data_dir))
        assert_one_sentence(info, str(data_dir / du.FOLDER_NAME),
                            str(data_dir / du.ARCHIVE_NAME), '--data-dir')
    assert entries(tmp_path) == ['empty'] and entries(tmp_path / 'empty') == []


@pytest.mark.parametrize('extracted', [False, True])
def test_load_test_set_refuses_pickles_that_run_code(tmp_path, extracted):
    data_dir = make_cifar_archive(tmp_path)
    marker = tmp_path / 'pwned'
    replace_archive_member(data_dir, 'test_batch', code_running_pickle(marker))
    if extracted:
        du.extract_cifar10(str(data_dir), check_md5=False)  # extracting unpickles nothing
    with pytest.raises(du.DataError) as info:
        du.load_test_set(str(data_dir))
    assert_one_sentence(info, 'test_batch', 'is corrupt (UnpicklingError: unexpected object')
    assert not marker.exists()
    # The crafted pickle is a real exploit: plain pickle would have run it.
    import pickle
    pickle.loads(code_running_pickle(marker))
    assert marker.exists()


@pytest.mark.parametrize('corrupt,target,needle', [
    ('truncate', 'test_batch', 'cifar-10-python.tar.gz is truncated or corrupt'),
    ('missing', 'batches.meta', 'does not contain cifar-10-batches-py/batches.meta'),
    ('pickle', 'test_batch', 'cifar-10-batches-py/test_batch in '),
    ('labels', 'test_batch', 'has labels outside 0..9'),
])
def test_load_test_set_from_a_bad_archive(cifar_archive_factory, corrupt, target, needle):
    data_dir = cifar_archive_factory(corrupt=corrupt, target=target)
    before = snapshot(data_dir)
    with pytest.raises(du.DataError) as info:
        du.load_test_set(str(data_dir))
    assert_one_sentence(info, needle, 'delete', du.ARCHIVE_NAME)
    assert snapshot(data_dir) == before


# ----------------------------------------------------------------------------
# Operating-system errors: one sentence, and nothing on disk is damaged
# ----------------------------------------------------------------------------

def snapshot(data_dir):
    """{relative path: file bytes (None for a folder)} of everything under data_dir."""
    root = Path(data_dir)
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob('*'))}


def assert_one_sentence(info, *needles):
    message = str(info.value)
    assert '\n' not in message and message.count('; ') >= 1
    for needle in needles:
        assert needle in message


@pytest.fixture
def fail_open(monkeypatch):
    """fail_open(path, code=EACCES): open() and tarfile.open() of `path` raise
    OSError(code), like a file without read permission; the tests run as root
    too, where chmod alone would not stop a read."""
    import builtins
    failing = {}
    real_open, real_tar_open = builtins.open, tarfile.open

    def check(file):
        if isinstance(file, (str, os.PathLike)) and os.path.abspath(file) in failing:
            code = failing[os.path.abspath(file)]
            raise OSError(code, os.strerror(code), os.fspath(file))

    def fake_open(file, *args, **kwargs):
        check(file)
        return real_open(file, *args, **kwargs)

    def fake_tar_open(name=None, *args, **kwargs):
        check(name)
        return real_tar_open(name, *args, **kwargs)

    monkeypatch.setattr(builtins, 'open', fake_open)
    monkeypatch.setattr(tarfile, 'open', fake_tar_open)

    def fail(path, code=errno.EACCES):
        failing[os.path.abspath(path)] = code
    return fail


@pytest.mark.parametrize('call', ['load_cifar10', 'load_test_set', 'prepare_cifar10',
                                  'download_cifar10'])
def test_extracted_folder_that_is_a_file(cifar_data_dir, call):
    (cifar_data_dir / du.FOLDER_NAME).write_bytes(b'not a folder')
    before = snapshot(cifar_data_dir)
    with pytest.raises(du.DataError) as info:
        getattr(du, call)(str(cifar_data_dir))
    assert_one_sentence(info, f'{cifar_data_dir / du.FOLDER_NAME} is a file', 'move it away')
    assert snapshot(cifar_data_dir) == before


@pytest.mark.parametrize('call', ['load_cifar10', 'load_test_set', 'prepare_cifar10',
                                  'download_cifar10', 'extract_cifar10'])
def test_data_dir_that_is_a_file(tmp_path, call):
    data_dir = tmp_path / 'data'
    data_dir.write_bytes(b'not a folder')
    with pytest.raises(du.DataError) as info:
        getattr(du, call)(str(data_dir))
    assert_one_sentence(info, f'the data folder {data_dir} is a file', 'pass a folder')
    assert entries(tmp_path) == ['data'] and data_dir.read_bytes() == b'not a folder'


@pytest.mark.parametrize('call', ['load_cifar10', 'load_test_set'])
@pytest.mark.parametrize('unreadable', [du.ARCHIVE_NAME, du.FOLDER_NAME + '/test_batch'])
def test_unreadable_file(cifar_archive_factory, fail_open, call, unreadable):
    data_dir = cifar_archive_factory(extracted=unreadable != du.ARCHIVE_NAME)
    before = snapshot(data_dir)
    fail_open(data_dir / unreadable)
    with pytest.raises(du.DataError) as info:
        getattr(du, call)(str(data_dir))
    assert_one_sentence(info, f'could not read {data_dir / unreadable} (Permission denied)',
                        'check its permissions')
    assert snapshot(data_dir) == before


def fail_after(n, real, code):
    """A stand-in for `real` that works n times, then raises OSError(code)."""
    calls = []

    def fake(*args, **kwargs):
        calls.append(1)
        if len(calls) > n:
            raise OSError(code, os.strerror(code))
        return real(*args, **kwargs)
    return fake


@pytest.mark.parametrize('step', ['extract', 'rename'])
def test_full_disk_during_extraction(cifar_data_dir, monkeypatch, step):
    if step == 'extract':  # the disk fills up after three members
        monkeypatch.setattr(tarfile.TarFile, 'extract',
                            fail_after(3, tarfile.TarFile.extract, errno.ENOSPC))
    else:
        monkeypatch.setattr(os, 'replace', fail_after(0, os.replace, errno.ENOSPC))
    before = snapshot(cifar_data_dir)
    with pytest.raises(du.DataError) as info:
        load(cifar_data_dir)
    assert_one_sentence(info, f'could not extract {cifar_data_dir / du.ARCHIVE_NAME}',
                        'No space left on device', 'free some disk space')
    monkeypatch.undo()
    assert snapshot(cifar_data_dir) == before  # the archive intact, no half folder
    assert len(load(cifar_data_dir)['X_train']) == 225  # and it works once there is room


def test_read_only_data_dir_when_extraction_is_needed(cifar_data_dir, monkeypatch):
    monkeypatch.setattr(tempfile, 'mkdtemp', fail_after(0, tempfile.mkdtemp, errno.EROFS))
    before = snapshot(cifar_data_dir)
    with pytest.raises(du.DataError) as info:
        load(cifar_data_dir)
    assert_one_sentence(info, 'could not extract', 'Read-only file system',
                        'make that folder writable')
    assert snapshot(cifar_data_dir) == before


def test_read_only_data_dir_when_download_is_needed(tmp_path, fail_open):
    data_dir = tmp_path / 'data'
    data_dir.mkdir()
    fail_open(data_dir / (du.ARCHIVE_NAME + '.part'), errno.EROFS)
    with pytest.raises(du.DataError) as info:
        du.download_cifar10(str(data_dir), url=closed_port_url())
    assert_one_sentence(info, f'could not write {data_dir / du.ARCHIVE_NAME}.part',
                        'Read-only file system', 'writable')
    assert entries(data_dir) == []


@pytest.mark.skipif(os.name != 'posix' or os.geteuid() == 0,
                    reason='needs a non-root POSIX user for real file permissions')
def test_real_permissions(cifar_data_dir):
    archive = cifar_data_dir / du.ARCHIVE_NAME
    try:
        os.chmod(cifar_data_dir, 0o555)  # read-only data folder
        with pytest.raises(du.DataError, match='could not extract .*Permission denied'):
            load(cifar_data_dir)
        os.chmod(cifar_data_dir, 0o755)
        os.chmod(archive, 0)  # unreadable archive
        with pytest.raises(du.DataError, match='could not read .*Permission denied'):
            load(cifar_data_dir)
    finally:
        os.chmod(cifar_data_dir, 0o755)
        os.chmod(archive, 0o644)
    assert entries(cifar_data_dir) == [du.ARCHIVE_NAME]


# ----------------------------------------------------------------------------
# Download against a local http.server
# ----------------------------------------------------------------------------

class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope='module')
def archive_server(tmp_path_factory):
    """(url, md5) of a synthetic archive served on 127.0.0.1 (ephemeral port)."""
    site = make_cifar_archive(tmp_path_factory.mktemp('served'), name='site')
    handler = functools.partial(QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = 'http://127.0.0.1:%d/' % server.server_address[1]
    yield base + du.ARCHIVE_NAME, du.md5sum(site / du.ARCHIVE_NAME)
    server.shutdown()
    server.server_close()


@pytest.fixture
def no_proxy(monkeypatch):
    """Make sure urllib talks to 127.0.0.1 directly even if a proxy is configured."""
    for var in ('http_proxy', 'https_proxy', 'HTTP_PROXY', 'HTTPS_PROXY', 'all_proxy',
                'ALL_PROXY'):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv('no_proxy', '*')


def closed_port_url():
    """A URL on 127.0.0.1 where nothing listens (connection refused at once)."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    return 'http://127.0.0.1:%d/%s' % (port, du.ARCHIVE_NAME)


def test_download_verifies_md5_and_renames_into_place(tmp_path, archive_server, no_proxy):
    url, md5 = archive_server
    data_dir = tmp_path / 'data'
    path = du.download_cifar10(str(data_dir), url=url, expected_md5=md5)
    assert path == os.path.join(str(data_dir), du.ARCHIVE_NAME)
    assert entries(data_dir) == [du.ARCHIVE_NAME]  # no .part left
    assert du.md5sum(path) == md5
    assert len(load(data_dir)['X_test']) == 100


def test_download_with_wrong_md5_leaves_nothing(tmp_path, archive_server, no_proxy):
    url, md5 = archive_server
    data_dir = tmp_path / 'data'
    with pytest.raises(du.DataError) as info:
        du.download_cifar10(str(data_dir), url=url, expected_md5='0' * 32)
    message = str(info.value)
    assert 'has md5 %s instead of %s' % (md5, '0' * 32) in message
    assert os.path.join(str(data_dir), du.ARCHIVE_NAME) in message
    assert entries(data_dir) == []


@pytest.mark.parametrize('url', ['closed-port', 'missing-file'])
def test_unreachable_download_says_where_to_put_the_archive(tmp_path, archive_server,
                                                            no_proxy, url):
    url = closed_port_url() if url == 'closed-port' else archive_server[0] + '.nope'
    data_dir = tmp_path / 'data'
    start = time.time()
    with pytest.raises(du.DataError) as info:
        du.download_cifar10(str(data_dir), url=url, timeout=5)
    assert time.time() - start < 5
    message = str(info.value)
    assert message.startswith('could not download %s' % url)
    assert 'put it at %s' % os.path.join(str(data_dir), du.ARCHIVE_NAME) in message
    assert entries(data_dir) == []


def test_download_is_a_no_op_when_data_is_present(cifar_data_dir, tmp_path):
    archive = cifar_data_dir / du.ARCHIVE_NAME
    before = archive.read_bytes()
    # An unreachable URL proves nothing is fetched.
    assert du.download_cifar10(str(cifar_data_dir), url=closed_port_url()) == str(archive)
    assert archive.read_bytes() == before
    # Extracted folder only (archive deleted after extraction): still nothing to do.
    load(cifar_data_dir)
    archive.unlink()
    du.download_cifar10(str(cifar_data_dir), url=closed_port_url())
    assert entries(cifar_data_dir) == [du.FOLDER_NAME]
    assert len(load(cifar_data_dir)['X_train']) == 225


def test_load_downloads_when_nothing_is_present(tmp_path, archive_server, no_proxy,
                                                monkeypatch, capsys):
    url, md5 = archive_server
    monkeypatch.setattr(du, 'CIFAR10_URL', url)
    monkeypatch.setattr(du, 'CIFAR10_MD5', md5)
    data_dir = tmp_path / 'fresh'
    data = load(data_dir)
    assert len(data['X_train']) == 225
    assert entries(data_dir) == sorted([du.ARCHIVE_NAME, du.FOLDER_NAME])
    assert 'warning' not in capsys.readouterr().err


def test_load_without_network_or_archive_fails_clearly(tmp_path, no_proxy, monkeypatch):
    monkeypatch.setattr(du, 'CIFAR10_URL', closed_port_url())
    with pytest.raises(du.DataError, match='put it at .*cifar-10-python.tar.gz'):
        load(tmp_path / 'data')


# ----------------------------------------------------------------------------
# Integration: the real archive
# ----------------------------------------------------------------------------

def test_real_archive_subset_split(real_archive_dir):
    data = du.load_cifar10(str(real_archive_dir), subset=0.4, val_fraction=0.1, seed=0)
    assert data['X_train'].shape == (18000, 3, 32, 32)
    assert data['X_val'].shape == (2000, 3, 32, 32)
    assert data['X_test'].shape == (10000, 3, 32, 32)
    assert np.bincount(data['y_train'], minlength=10).tolist() == [1800] * 10
    assert np.bincount(data['y_val'], minlength=10).tolist() == [200] * 10
    assert np.bincount(data['y_test'], minlength=10).tolist() == [1000] * 10
    assert data['label_names'] == LABEL_NAMES
    # Real photos: pixels span the range and the channels differ on average.
    mean, std = du.channel_mean_std(data['X_train'])
    assert np.all((mean > 0.3) & (mean < 0.6)) and np.all((std > 0.15) & (std < 0.35))
