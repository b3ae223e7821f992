"""Tests for data_utils: loading, splitting, normalization, batches, augmentation,
bad inputs and the download path (against a local http.server).

Everything runs on small synthetic archives from conftest.make_cifar_archive,
except the integration test, which uses the real archive when it is linked at
data/cifar-10-python.tar.gz and is skipped otherwise. The tests of hostile files
(issue 18) also run main.py as a subprocess, with a timeout, so that a hang fails.
"""
import contextlib
import errno
import functools
import http.server
import io
import os
import pickle
import select
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import data_utils as du
from conftest import (LABEL_NAMES, REPO_ROOT, batch_bytes, code_running_pickle,
                      make_cifar_archive, replace_archive_member)
from runfiles import NotRegularFile


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
    with pytest.raises(ValueError, match='too few.*; use a larger subset or a larger val_fraction$'):
        load(cifar_data_dir, subset=0.001)
    # Every kept image held out leaves none to train on: the share is the other fix.
    with pytest.raises(ValueError, match='too few.*; use a larger subset or a smaller val_fraction$'):
        du.split_indices(np.arange(20) % 10, subset=1.0, val_fraction=0.99)


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


def test_half_extracted_temp_dir_is_never_used_and_is_removed(cifar_data_dir):
    # A killed extraction leaves a hidden temp folder with a partial folder.
    stale = cifar_data_dir / (du._EXTRACT_PREFIX + 'k1lled_0') / du.FOLDER_NAME
    stale.mkdir(parents=True)
    (stale / 'data_batch_1').write_bytes(b'partial')
    data = load(cifar_data_dir)
    assert len(data['X_train']) == 225
    assert (cifar_data_dir / du.FOLDER_NAME / 'data_batch_5').is_file()
    # Nobody holds its lock (its process is gone): removed, with the new temp folder.
    assert entries(cifar_data_dir) == sorted([du.ARCHIVE_NAME, du.FOLDER_NAME])


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
    """fail_open(path, code=EACCES): open(), runfiles.open_regular() (as data_utils
    calls it) and tarfile.open() of `path` raise OSError(code), like a file without
    read permission; the tests run as root too, where chmod alone would not stop a read."""
    import builtins
    failing = {}
    real_open, real_tar_open, real_open_regular = builtins.open, tarfile.open, du.open_regular

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

    def fake_open_regular(path, *args, **kwargs):
        check(path)
        return real_open_regular(path, *args, **kwargs)

    monkeypatch.setattr(builtins, 'open', fake_open)
    monkeypatch.setattr(tarfile, 'open', fake_tar_open)
    monkeypatch.setattr(du, 'open_regular', fake_open_regular)

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
# Issue 18: files that are not files, the archive's links, stale extractions,
# messages that name the real problem, and what identifies the data
# ----------------------------------------------------------------------------

CLI_TIMEOUT = 60  # seconds: a hang fails the test instead of blocking CI


def run_main(data_dir, out, timeout=CLI_TIMEOUT):
    """main.py as a user runs it (one epoch of the smoke preset); the CompletedProcess."""
    return subprocess.run([sys.executable, str(REPO_ROOT / 'main.py'), '--preset', 'smoke',
                           '--data-dir', str(data_dir), '--epochs', '1', '--subset', '1',
                           '--out', str(out)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


def assert_cli_refuses(proc, out, *needles):
    """Exit code 2, one 'error: ' sentence holding the needles, no run folder made.

    The only other line allowed on stderr is the warning about a hand-placed
    archive's md5 (the synthetic archives are not the official one)."""
    lines = [line for line in proc.stderr.splitlines()
             if line.strip() and not line.startswith('warning: ')]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith('error: '), proc.stderr
    assert lines[0].count('; ') >= 1 and 'Traceback' not in proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not os.path.exists(out)
    return lines[0]


@contextlib.contextmanager
def no_hang(seconds=20):
    """Fail with TimeoutError instead of blocking forever (a named pipe opened for
    reading waits for a writer): SIGALRM interrupts the blocked system call."""
    def alarm(signum, frame):
        raise TimeoutError(f'blocked for {seconds} s')
    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def put_in_place(path, kind, elsewhere):
    """Replace the file at path by kind: 'fifo', 'folder', 'dev-zero' (a link to
    /dev/zero) or 'link-to-fifo' (a link to a named pipe made in elsewhere)."""
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()
    if kind == 'fifo':
        os.mkfifo(path)
    elif kind == 'folder':
        path.mkdir()
    elif kind == 'dev-zero':
        os.symlink('/dev/zero', path)
    else:
        fifo = Path(elsewhere) / ('pipe-' + path.name)
        os.mkfifo(fifo)
        os.symlink(fifo, path)


NOT_REGULAR = {'fifo': 'is a named pipe (FIFO)', 'folder': 'is a folder',
               'dev-zero': 'is a link to /dev/zero, a device',
               'link-to-fifo': ', a named pipe (FIFO)'}


@pytest.mark.parametrize('target,kind', [
    ('data_batch_2', 'fifo'), ('batches.meta', 'fifo'), ('test_batch', 'fifo'),
    ('data_batch_4', 'dev-zero'), ('test_batch', 'folder'), ('data_batch_1', 'link-to-fifo'),
    (du.ARCHIVE_NAME, 'fifo'), (du.ARCHIVE_NAME, 'folder'), (du.ARCHIVE_NAME, 'dev-zero'),
    (du.ARCHIVE_NAME, 'link-to-fifo'),
])
def test_cli_refuses_files_that_are_not_regular_files(tmp_path, target, kind):
    in_archive = target == du.ARCHIVE_NAME
    data_dir = make_cifar_archive(tmp_path, extracted=not in_archive)
    path = data_dir / (target if in_archive else f'{du.FOLDER_NAME}/{target}')
    put_in_place(path, kind, tmp_path)
    before = snapshot(data_dir)
    out = tmp_path / 'run'
    proc = run_main(data_dir, out)  # used to block forever on a named pipe
    fix = ('move it away (mv ', 'then put the archive there') if in_archive else \
        (f'delete {data_dir / du.FOLDER_NAME} and',)
    assert_cli_refuses(proc, out, f'{path} ', NOT_REGULAR[kind], *fix)
    assert snapshot(data_dir) == before


@pytest.mark.parametrize('extracted', [True, False])
@pytest.mark.parametrize('kind', ['fifo', 'dev-zero', 'folder'])
def test_load_test_set_refuses_files_that_are_not_regular_files(tmp_path, extracted, kind):
    data_dir = make_cifar_archive(tmp_path, extracted=extracted)
    targets = ([data_dir / du.FOLDER_NAME / name for name in ('test_batch', 'batches.meta')]
               if extracted else [data_dir / du.ARCHIVE_NAME])
    for path in targets:
        saved = path.read_bytes()
        put_in_place(path, kind, tmp_path)
        with no_hang(), pytest.raises(du.DataError) as info:
            du.load_test_set(str(data_dir))
        assert_one_sentence(info, f'{path} {NOT_REGULAR[kind]}')
        put_in_place(path, 'folder', tmp_path)
        path.rmdir()
        path.write_bytes(saved)


def test_links_to_regular_files_are_followed(tmp_path):
    reference = load(make_cifar_archive(tmp_path, name='reference'))
    # The archive is a link (as CI links the real one), and so is an extracted batch.
    elsewhere = make_cifar_archive(tmp_path, name='elsewhere', extracted=True)
    data_dir = tmp_path / 'linked'
    data_dir.mkdir()
    (data_dir / du.ARCHIVE_NAME).symlink_to(elsewhere / du.ARCHIVE_NAME)
    X, y, _ = du.load_test_set(str(data_dir))
    assert du.fingerprint(X, y) == reference['fingerprint']['test']
    assert load(data_dir)['fingerprint'] == reference['fingerprint']
    batch = data_dir / du.FOLDER_NAME / 'data_batch_3'
    batch.unlink()
    batch.symlink_to(elsewhere / du.FOLDER_NAME / 'data_batch_3')
    assert load(data_dir)['fingerprint'] == reference['fingerprint']


def test_md5sum_refuses_a_named_pipe_without_blocking(tmp_path):
    os.mkfifo(tmp_path / 'pipe')
    with no_hang(), pytest.raises(NotRegularFile):
        du.md5sum(tmp_path / 'pipe')


@pytest.mark.parametrize('kind', ['fifo', 'folder', 'dev-zero'])
def test_download_refuses_an_archive_path_that_is_not_a_file_before_downloading(
        tmp_path, kind):
    data_dir = make_cifar_archive(tmp_path)
    put_in_place(data_dir / du.ARCHIVE_NAME, kind, tmp_path)
    before = snapshot(data_dir)
    # An unreachable URL: a download attempt would be reported as 'could not download'.
    with no_hang(), pytest.raises(du.DataError) as info:
        du.download_cifar10(str(data_dir), url=closed_port_url())
    assert_one_sentence(info, f'{data_dir / du.ARCHIVE_NAME} {NOT_REGULAR[kind]}',
                        'move it away')
    assert snapshot(data_dir) == before


def test_download_never_writes_through_a_part_file_that_is_a_link(tmp_path, archive_server,
                                                                  no_proxy):
    url, md5 = archive_server
    data_dir = tmp_path / 'data'
    data_dir.mkdir()
    precious = tmp_path / 'precious.txt'
    precious.write_bytes(b'keep me')
    (data_dir / (du.ARCHIVE_NAME + '.part')).symlink_to(precious)
    du.download_cifar10(str(data_dir), url=url, expected_md5=md5)
    assert precious.read_bytes() == b'keep me'
    assert entries(data_dir) == [du.ARCHIVE_NAME] and du.md5sum(data_dir / du.ARCHIVE_NAME) == md5
    # A named pipe there is not ours to remove, and would block the write: refused.
    (data_dir / du.ARCHIVE_NAME).unlink()
    os.mkfifo(data_dir / (du.ARCHIVE_NAME + '.part'))
    with no_hang(), pytest.raises(du.DataError) as info:
        du.download_cifar10(str(data_dir), url=url, expected_md5=md5)
    assert_one_sentence(info, '.part is a named pipe (FIFO), not a partial download', 'mv ')


# --- Stale extraction folders ------------------------------------------------

# Extracts the archive in argv[1], but stops for good after the first file, as if
# the machine were slow; the test kills it there (SIGKILL), as a user or the OOM
# killer would.
PAUSED_EXTRACTION = r'''
import sys, tarfile, time
import data_utils
real_extract = tarfile.TarFile.extract
def extract_then_stop(self, member, path, **kwargs):
    real_extract(self, member, path, **kwargs)
    if member.isfile():
        print('extracting', flush=True)
        time.sleep(600)
tarfile.TarFile.extract = extract_then_stop
data_utils.extract_cifar10(sys.argv[1], check_md5=False)
'''


def start_paused_extraction(data_dir):
    """A process stopped in the middle of extracting data_dir's archive, and its temp folder."""
    already = set(Path(data_dir).glob(du._EXTRACT_PREFIX + '*'))
    proc = subprocess.Popen([sys.executable, '-c', PAUSED_EXTRACTION, str(data_dir)],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], CLI_TIMEOUT)
        assert ready and proc.stdout.readline().strip() == 'extracting', 'did not start'
        tmp, = set(Path(data_dir).glob(du._EXTRACT_PREFIX + '*')) - already
    except BaseException:
        kill(proc)
        raise
    return proc, tmp


def kill(proc):
    """SIGKILL a helper process and reap it."""
    proc.kill()
    proc.wait()


def user_folders(data_dir):
    """Things beside the data that only look like ours: none may ever be removed."""
    made = [data_dir / 'my-notes', data_dir / (du._EXTRACT_PREFIX + 'keep'),
            data_dir / (du._EXTRACT_PREFIX + 'abcd1234')]
    for folder in made:
        folder.mkdir()
        (folder / 'notes.txt').write_bytes(b'mine')
    # A copy of the extracted folder kept by hand: what a stale extraction holds, but
    # not a name tempfile.mkdtemp gives.
    backup = data_dir / (du._EXTRACT_PREFIX + 'backup') / du.FOLDER_NAME
    backup.mkdir(parents=True)
    (backup / 'data_batch_1').write_bytes(b'mine')
    (data_dir / (du._EXTRACT_PREFIX + 'file0000')).write_bytes(b'a file, not a folder')
    (data_dir / (du._EXTRACT_PREFIX + 'link0000')).symlink_to(made[0])
    return snapshot(data_dir)


def test_cli_removes_a_killed_extraction_but_never_a_running_one(tmp_path):
    data_dir = make_cifar_archive(tmp_path)
    user = user_folders(data_dir)
    proc, tmp = start_paused_extraction(data_dir)
    try:
        partial = snapshot(tmp)
        assert (tmp / du.FOLDER_NAME / 'data_batch_1').is_file()
        # Two runs at once: this one extracts too, and leaves the other's folder alone.
        first = run_main(data_dir, tmp_path / 'run1')
        assert first.returncode == 0, first.stderr
        assert snapshot(tmp) == partial
        assert (data_dir / du.FOLDER_NAME / 'data_batch_5').is_file()
    finally:
        kill(proc)  # SIGKILL: no clean-up of its own
    assert snapshot(tmp) == partial  # left behind, about 41 MB with the real archive
    second = run_main(data_dir, tmp_path / 'run2')
    assert second.returncode == 0, second.stderr
    assert not os.path.lexists(tmp)
    after = snapshot(data_dir)
    assert {k: v for k, v in after.items() if k in user} == user
    assert sorted(set(after) - set(user)) == [du.FOLDER_NAME] + sorted(
        f'{du.FOLDER_NAME}/{name}' for name in os.listdir(data_dir / du.FOLDER_NAME))


def hold_lock(path):
    """A process holding an flock on path (created if needed) until it is killed."""
    code = ('import fcntl, os, sys, time\n'
            'fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n'
            'fcntl.flock(fd, fcntl.LOCK_EX)\n'
            'print("locked", flush=True)\n'
            'time.sleep(600)\n')
    proc = subprocess.Popen([sys.executable, '-c', code, str(path)], stdout=subprocess.PIPE,
                            text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], CLI_TIMEOUT)
        assert ready and proc.stdout.readline().strip() == 'locked'
    except BaseException:
        kill(proc)
        raise
    return proc


def test_stale_extraction_folders_removed_locked_or_foreign_ones_kept(cifar_data_dir):
    user = user_folders(cifar_data_dir)
    extracting = cifar_data_dir / (du._EXTRACT_PREFIX + 'live0000')
    (extracting / du.FOLDER_NAME).mkdir(parents=True)
    killed_early = cifar_data_dir / (du._EXTRACT_PREFIX + 'early000')  # before its lock file
    killed_early.mkdir()
    killed_late = cifar_data_dir / (du._EXTRACT_PREFIX + 'late0000')
    (killed_late / du.FOLDER_NAME).mkdir(parents=True)
    (killed_late / du.FOLDER_NAME / 'data_batch_1').write_bytes(b'partial')
    (killed_late / du._EXTRACT_LOCK).write_bytes(b'')
    holder = hold_lock(extracting / du._EXTRACT_LOCK)
    try:
        load(cifar_data_dir)
        assert extracting.is_dir() and (extracting / du.FOLDER_NAME).is_dir()
        assert not killed_early.exists() and not killed_late.exists()
        after = snapshot(cifar_data_dir)
        assert {k: v for k, v in after.items() if k in user} == user
    finally:
        kill(holder)
    load(cifar_data_dir)  # its process is gone: now it is stale
    assert not extracting.exists()


def test_extraction_never_uses_a_folder_a_clean_up_claimed(cifar_data_dir, monkeypatch):
    # The race: a clean-up sees a brand-new temp folder before its extraction locked
    # it, makes the lock file itself and removes the folder. The extraction must
    # notice and take another folder.
    claimed = cifar_data_dir / (du._EXTRACT_PREFIX + 'claimed0')
    claimed.mkdir()
    (claimed / du._EXTRACT_LOCK).write_bytes(b'')
    real_mkdtemp, calls = tempfile.mkdtemp, []

    def mkdtemp(*args, **kwargs):
        calls.append(1)
        return str(claimed) if len(calls) == 1 else real_mkdtemp(*args, **kwargs)
    monkeypatch.setattr(tempfile, 'mkdtemp', mkdtemp)
    monkeypatch.setattr(du, '_remove_stale_extractions', lambda data_dir: [])
    assert len(load(cifar_data_dir)['X_train']) == 225
    assert len(calls) == 2 and entries(claimed) == [du._EXTRACT_LOCK]


# --- The archive's links and other members ------------------------------------

def rewrite_archive(data_dir, edit):
    """Rewrite data_dir's archive with edit(members) -> members, where members is a
    list of (TarInfo, bytes or None) in archive order."""
    path = Path(data_dir) / du.ARCHIVE_NAME
    with tarfile.open(path) as src:
        members = [(info, src.extractfile(info).read() if info.isfile() else None)
                   for info in src]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode='w:gz') as dst:
        for info, content in edit(members):
            if content is not None:
                info.size = len(content)
            dst.addfile(info, io.BytesIO(content) if content is not None else None)
    path.write_bytes(buf.getvalue())


def special_member(name, kind, target=''):
    info = tarfile.TarInfo(f'{du.FOLDER_NAME}/{name}' if '/' not in name else name)
    info.type = {'symlink': tarfile.SYMTYPE, 'hardlink': tarfile.LNKTYPE,
                 'fifo': tarfile.FIFOTYPE, 'device': tarfile.CHRTYPE}[kind]
    info.linkname = target
    return info


def replace_with_link(data_dir, name, kind, target):
    """Make member `name` of the archive a link to target, after the other members."""
    def edit(members):
        kept = [(i, c) for i, c in members if i.name != f'{du.FOLDER_NAME}/{name}']
        return kept + [(special_member(name, kind, target), None)]
    rewrite_archive(data_dir, edit)


LINK_TARGETS = {'inside': f'{du.FOLDER_NAME}/test_batch', 'outside': '/etc/passwd',
                'nowhere': 'no-such-file'}


@pytest.mark.parametrize('kind', ['symlink', 'hardlink'])
@pytest.mark.parametrize('target', sorted(LINK_TARGETS))
def test_every_link_member_is_refused_by_extraction(cifar_data_dir, kind, target):
    # The example: data_batch_1 links to test_batch, so a run would train on
    # the test images; a symlink's target is relative to its folder.
    link_to = LINK_TARGETS[target]
    if kind == 'symlink' and target == 'inside':
        link_to = 'test_batch'
    replace_with_link(cifar_data_dir, 'data_batch_1', kind, link_to)
    with pytest.raises(du.DataError) as info:
        load(cifar_data_dir)
    word = 'a symbolic link' if kind == 'symlink' else 'a hard link'
    assert_one_sentence(info, f"contains '{du.FOLDER_NAME}/data_batch_1', {word} to "
                              f"{link_to!r}, and links are refused", 'delete')
    assert entries(cifar_data_dir) == [du.ARCHIVE_NAME]  # nothing extracted, no temp folder


@pytest.mark.parametrize('kind', ['symlink', 'hardlink'])
@pytest.mark.parametrize('member', ['test_batch', 'readme.html', 'extra'])
def test_every_link_member_is_refused_by_load_test_set(cifar_data_dir, kind, member):
    # A test_batch that links to data_batch_1 would report accuracy on training
    # images; a link anywhere else is refused too, as extraction refuses it.
    target = f'{du.FOLDER_NAME}/data_batch_1'
    replace_with_link(cifar_data_dir, member, kind, target)
    before = snapshot(cifar_data_dir)
    with pytest.raises(du.DataError) as info:
        du.load_test_set(str(cifar_data_dir))
    assert_one_sentence(info, f"contains '{du.FOLDER_NAME}/{member}'", 'links are refused',
                        str(cifar_data_dir / du.ARCHIVE_NAME))
    assert snapshot(cifar_data_dir) == before


@pytest.mark.parametrize('kind', ['hardlink', 'symlink'])
def test_cli_refuses_a_batch_that_links_to_the_test_batch(cifar_data_dir, tmp_path, kind):
    replace_with_link(cifar_data_dir, 'data_batch_1', kind,
                      'test_batch' if kind == 'symlink' else f'{du.FOLDER_NAME}/test_batch')
    out = tmp_path / 'run'
    proc = run_main(cifar_data_dir, out)
    assert_cli_refuses(proc, out, f'{cifar_data_dir / du.ARCHIVE_NAME} contains '
                       f"'{du.FOLDER_NAME}/data_batch_1'", 'links are refused',
                       f'delete {cifar_data_dir / du.ARCHIVE_NAME}')
    assert entries(cifar_data_dir) == [du.ARCHIVE_NAME]


def duplicate_batch(members):
    """A second data_batch_2 with other pixels: extraction would keep the last copy,
    a streaming read the first."""
    second = [(tarfile.TarInfo(i.name), c[:-40] + bytes(40)) for i, c in members
              if i.name.endswith('/data_batch_2')]
    return members + second


@pytest.mark.parametrize('edit,needle', [
    (lambda m: m + [(special_member('pipe', 'fifo'), None)],
     f"'{du.FOLDER_NAME}/pipe', which is a named pipe (FIFO), not a file"),
    (lambda m: m + [(special_member('tty', 'device'), None)],
     f"'{du.FOLDER_NAME}/tty', which is a device, not a file"),
    (duplicate_batch, f"'{du.FOLDER_NAME}/data_batch_2' twice"),
    (lambda m: m + [(tarfile.TarInfo(f'{du.FOLDER_NAME}/sub/data_batch_1'), b'x')],
     f"'{du.FOLDER_NAME}/sub/data_batch_1', which is not a file directly in"),
    (lambda m: [(tarfile.TarInfo(f'{du.FOLDER_NAME}/./{i.name.split("/")[-1]}'), c)
                if i.name.endswith('data_batch_1') else (i, c) for i, c in m],
     f"'{du.FOLDER_NAME}/./data_batch_1', which is not a file directly in"),
], ids=['fifo', 'device', 'duplicate', 'subfolder', 'dot-path'])
@pytest.mark.parametrize('reader', ['load_cifar10', 'load_test_set'])
def test_members_other_than_plain_files_are_refused_by_both_readers(
        cifar_data_dir, edit, needle, reader):
    rewrite_archive(cifar_data_dir, edit)
    with pytest.raises(du.DataError) as info:
        getattr(du, reader)(str(cifar_data_dir))
    assert_one_sentence(info, needle, str(cifar_data_dir / du.ARCHIVE_NAME), 'delete')
    assert entries(cifar_data_dir) == [du.ARCHIVE_NAME]


# --- Data that is the wrong kind of data ---------------------------------------

def write_meta(data_dir, label_names):
    d = {b'num_cases_per_batch': 10000, b'num_vis': 3072, b'label_names': label_names}
    (data_dir / du.FOLDER_NAME / 'batches.meta').write_bytes(pickle.dumps(d, protocol=2))


def write_batch(data_dir, name, data=None, labels=None):
    """Rewrite batch `name` of an extracted folder with other data and/or labels."""
    path = data_dir / du.FOLDER_NAME / name
    with open(path, 'rb') as f:
        d = pickle.load(f, encoding='bytes')
    d[b'data'] = d[b'data'] if data is None else data(d[b'data'])
    d[b'labels'] = d[b'labels'] if labels is None else labels(d[b'labels'])
    path.write_bytes(pickle.dumps(d, protocol=2))


def float_labels(data_dir):
    write_batch(data_dir, 'data_batch_2', labels=lambda y: [float(v) for v in y])


def text_labels(data_dir):
    write_batch(data_dir, 'test_batch', labels=lambda y: [str(v) for v in y])


def ragged_rows(data_dir):
    write_batch(data_dir, 'data_batch_5',
                data=lambda X: [row[:len(row) - i % 2].tolist() for i, row in enumerate(X)])


# case: (damage(data_dir), the file named, what the sentence says about it)
BAD_DATA = {
    'non-utf8 names': (lambda d: write_meta(d, [b'\xff\xfeplane'] + [b'x'] * 9), 'batches.meta',
                       "has label names that are not valid UTF-8 text (e.g. b'\\xff\\xfeplane')"),
    'control characters': (lambda d: write_meta(d, [b'air\nplane'] + [b'x'] * 9), 'batches.meta',
                           "has the label name 'air\\nplane', which is empty or holds control"),
    'names not text': (lambda d: write_meta(d, list(range(10))), 'batches.meta',
                       'has label names of type int where text is expected'),
    'float labels': (float_labels, 'data_batch_2',
                     'has floating-point labels (float64, e.g. ['),
    'text labels': (text_labels, 'test_batch', 'has text labels (<U1'),
    'ragged rows': (ragged_rows, 'data_batch_5',
                    'has data or labels that are not rectangular arrays'),
}


@pytest.mark.parametrize('case', sorted(BAD_DATA))
def test_bad_data_gets_a_sentence_naming_the_real_problem(cifar_archive_factory, case):
    data_dir = cifar_archive_factory(extracted=True)
    damage, target, needle = BAD_DATA[case]
    damage(data_dir)
    calls = ['load_cifar10'] + (['load_test_set'] if target in ('batches.meta', 'test_batch')
                                else [])
    for call in calls:
        with pytest.raises(du.DataError) as info:
            getattr(du, call)(str(data_dir))
        assert_one_sentence(info, f'{data_dir / du.FOLDER_NAME / target} {needle}',
                            f'delete {data_dir / du.FOLDER_NAME} and')


@pytest.mark.parametrize('case', ['non-utf8 names', 'float labels'])
def test_cli_bad_data_gets_a_sentence_naming_the_real_problem(cifar_archive_factory,
                                                              tmp_path, case):
    data_dir = cifar_archive_factory(extracted=True)
    damage, target, needle = BAD_DATA[case]
    damage(data_dir)
    before = snapshot(data_dir)
    out = tmp_path / 'run'
    assert_cli_refuses(run_main(data_dir, out), out,
                       f'{data_dir / du.FOLDER_NAME / target} {needle}')
    assert snapshot(data_dir) == before


def test_whole_number_labels_of_any_integer_type_are_accepted(cifar_archive_factory):
    data_dir = cifar_archive_factory(extracted=True)
    reference = load(data_dir)
    write_batch(data_dir, 'data_batch_2', labels=lambda y: np.array(y, np.uint8))
    write_batch(data_dir, 'test_batch', labels=lambda y: np.array(y, '>i4'))
    data = load(data_dir)
    assert data['fingerprint'] == reference['fingerprint']
    np.testing.assert_array_equal(data['y_train'], reference['y_train'])


# --- What identifies the data ---------------------------------------------------

def test_fingerprint_is_of_all_training_images_in_archive_order(cifar_archive_factory):
    data_dir = cifar_archive_factory(extracted=True)
    data = load(data_dir, subset=0.6, seed=3)
    raw_X, raw_y = raw_training_set(data_dir)  # plain pickle, batch 1..5 in order
    assert data['fingerprint']['train'] == du.fingerprint(raw_X, raw_y)
    assert data['fingerprint']['test'] == du.fingerprint(data['X_test'], data['y_test'])
    assert data['fingerprint']['test'] == du.fingerprint(*du.load_test_set(str(data_dir))[:2])
    # It names the data, not the split: any subset, seed or validation share gives it.
    other = load(data_dir, subset=1.0, val_fraction=0.2, seed=9)
    assert other['fingerprint'] == data['fingerprint']


def test_fingerprint_from_the_archive_alone(tmp_path):
    data_dir = make_cifar_archive(tmp_path)
    X, y, _ = du.load_test_set(str(data_dir))  # streamed, before any extraction
    data = load(data_dir)
    assert data['fingerprint']['test'] == du.fingerprint(X, y)
    assert data['fingerprint'] == load(make_cifar_archive(tmp_path, name='again',
                                                          extracted=True))['fingerprint']


def swap_batches(data_dir):
    folder = data_dir / du.FOLDER_NAME
    one, two = (folder / 'data_batch_1').read_bytes(), (folder / 'data_batch_2').read_bytes()
    (folder / 'data_batch_1').write_bytes(two)
    (folder / 'data_batch_2').write_bytes(one)


def flip_pixel(X):
    X = X.copy()
    X[-1, -1] ^= 1
    return X


@pytest.mark.parametrize('change,changed', [
    (lambda d: write_batch(d, 'data_batch_5', data=flip_pixel), 'train'),
    (lambda d: write_batch(d, 'data_batch_1', labels=lambda y: [(y[0] + 1) % 10] + y[1:]),
     'train'),
    (swap_batches, 'train'),
    (lambda d: write_batch(d, 'test_batch', data=flip_pixel), 'test'),
    (lambda d: write_batch(d, 'test_batch', labels=lambda y: y[::-1]), 'test'),
], ids=['one-pixel', 'one-label', 'batch-order', 'test-pixel', 'test-labels'])
def test_fingerprint_changes_with_the_data(cifar_archive_factory, change, changed):
    data_dir = cifar_archive_factory(extracted=True)
    before = load(data_dir)['fingerprint']
    change(data_dir)
    after = load(data_dir)['fingerprint']
    for part in ('train', 'test'):
        assert (after[part] != before[part]) == (part == changed), part


def test_a_batch_that_changes_between_the_two_passes_is_refused(cifar_data_dir, monkeypatch):
    real_load_batch, calls = du.load_batch, []

    def load_batch(path, data_dir=None):
        X, y = real_load_batch(path, data_dir)
        calls.append(path)
        if len(calls) == 7:  # the second read of data_batch_2 has one image fewer
            return X[:-1], y[:-1]
        return X, y
    monkeypatch.setattr(du, 'load_batch', load_batch)
    with pytest.raises(du.DataError) as info:
        load(cifar_data_dir)
    assert_one_sentence(info, 'data_batch_2 changed while it was being read', 'run again')


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
    # The fingerprints, hashed batch by batch, are those of all 50,000 and 10,000 images.
    raw_X, raw_y = raw_training_set(real_archive_dir)
    assert len(raw_y) == 50000
    assert data['fingerprint']['train'] == du.fingerprint(raw_X, raw_y)
    del raw_X
    assert data['fingerprint']['test'] == du.fingerprint(
        *du.load_test_set(str(real_archive_dir))[:2])
