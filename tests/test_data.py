"""Data: the bundled digits, npz loading and its errors, subsets, downsampling, labels, 8-bit grid."""

import functools
import io
import json
import re

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import memdiff

# Strategies. Bounds are small for speed.
SEEDS = st.integers(0, 2**31 - 1)
SUBSET_SIZES = st.integers(1, 300)
RESOLUTIONS = st.sampled_from([1, 2, 4])
FACTORS = st.sampled_from([1, 2, 4])
SMALL = st.integers(1, 3)
RANDOM_CLASSES = st.integers(1, 20)


@functools.cache
def digits():
    """The bundled digits, loaded once per test session."""
    return memdiff.load_dataset('digits')


#----------------------------------------------------------------------------
# The bundled digits.

def test_digits_have_documented_shape_range_and_grid():
    """digits are 1,797 float32 images 1x8x8 on the grid v/8 - 1, v in 0..16, spanning [-1, 1]."""
    images, _ = digits()
    assert images.shape == (1797, 1, 8, 8)
    assert images.dtype == torch.float32
    assert images.min().item() == -1.0 and images.max().item() == 1.0
    v = (images.double() + 1) * 8
    assert torch.equal(v, v.round()), 'pixels are not on the v/8 - 1 grid'


def test_digits_have_ten_balanced_classes_and_no_duplicates():
    """digits labels are int64 0..9 with about 180 images per class and no exact duplicate image."""
    images, labels = digits()
    assert labels.dtype == torch.int64 and labels.shape == (1797,)
    counts = torch.bincount(labels)
    assert len(counts) == 10
    assert counts.min().item() >= 170 and counts.max().item() <= 190
    assert len(torch.unique(images.flatten(1), dim=0)) == 1797


#----------------------------------------------------------------------------
# Class-balanced nested subsets.

@given(n=SUBSET_SIZES, seed=SEEDS)
def test_balanced_subset_is_class_balanced(n, seed):
    """balanced_subset takes n//C distinct images per class, the remainder going to the lowest classes."""
    _, labels = digits()
    idx = memdiff.balanced_subset(labels, n, seed=seed)
    assert idx.dtype == torch.int64 and idx.shape == (n,)
    assert len(torch.unique(idx)) == n
    assert idx.min().item() >= 0 and idx.max().item() < len(labels)
    counts = torch.bincount(labels[idx], minlength=10)
    expected = torch.tensor([n // 10 + (c < n % 10) for c in range(10)])
    assert torch.equal(counts, expected)


@pytest.mark.parametrize('labelled', [True, False], ids=['labels', 'unlabelled'])
@given(sizes=st.tuples(SUBSET_SIZES, SUBSET_SIZES), seed=SEEDS)
def test_balanced_subset_is_nested_and_seeded(labelled, sizes, seed):
    """For one seed, the subset of size m lies inside the subset of size n whenever m <= n."""
    _, labels = digits()
    source = labels if labelled else len(labels)            # an unlabelled set is given by its size
    m, n = sorted(sizes)
    small = memdiff.balanced_subset(source, m, seed=seed)
    large = memdiff.balanced_subset(source, n, seed=seed)
    assert set(small.tolist()) <= set(large.tolist())
    assert len(torch.unique(large)) == n
    assert torch.equal(large, memdiff.balanced_subset(source, n, seed=seed))


@pytest.mark.parametrize('n', [0, -1, 1798])
def test_balanced_subset_rejects_sizes_outside_the_data_set(n):
    """balanced_subset raises ValueError when n < 1 or n exceeds the number of images."""
    _, labels = digits()
    with pytest.raises(ValueError):
        memdiff.balanced_subset(labels, n)
    with pytest.raises(ValueError):
        memdiff.balanced_subset(len(labels), n)


def test_balanced_subset_gives_a_short_class_share_to_the_others():
    """A class with fewer images than its share is taken whole; the rest is balanced and nested."""
    labels = torch.tensor([0] * 10 + [1] * 2 + [2] * 10)
    counts = [torch.bincount(labels[memdiff.balanced_subset(labels, n)], minlength=3).tolist()
              for n in (3, 8, 21, 22)]
    assert counts == [[1, 1, 1], [3, 2, 3], [10, 2, 9], [10, 2, 10]]
    subsets = [set(memdiff.balanced_subset(labels, n).tolist()) for n in range(1, 23)]
    assert all(a <= b for a, b in zip(subsets, subsets[1:]))



@given(caps=st.lists(st.integers(1, 6), min_size=1, max_size=5), seed=SEEDS)
def test_balanced_subset_of_uneven_classes_has_every_size_and_the_water_level(caps, seed):
    """For classes of any sizes and every n: n distinct images, each class min(size, L) or one more,
    the extra ones to the lowest classes that still have images (water filling)."""
    labels = torch.cat([torch.full((cap,), c) for c, cap in enumerate(caps)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]
    for n in range(1, len(labels) + 1):
        idx = memdiff.balanced_subset(labels, n, seed=seed)
        assert len(torch.unique(idx)) == len(idx) == n
        counts = torch.bincount(labels[idx], minlength=len(caps)).tolist()
        L = max(level for level in range(max(caps) + 1) if sum(min(c, level) for c in caps) <= n)
        base = [min(c, L) for c in caps]
        extra = n - sum(base)
        open_classes = [c for c, cap in enumerate(caps) if cap > L]
        expected = [b + (c in open_classes[:extra]) for c, b in enumerate(base)]
        assert counts == expected, (caps, n)


#----------------------------------------------------------------------------
# Downsampling and the loader's builders.

@given(seed=SEEDS, n=SMALL, channels=SMALL, resolution=RESOLUTIONS, factor=FACTORS)
def test_downsample_equals_block_means(seed, n, channels, resolution, factor):
    """downsample to r averages each non-overlapping (H/r)x(H/r) block, checked by explicit loops."""
    g = torch.Generator().manual_seed(seed)
    H = resolution * factor
    images = torch.rand(n, channels, H, H, generator=g) * 2 - 1
    out = memdiff.downsample(images, resolution)
    assert out.shape == (n, channels, resolution, resolution)
    expected = torch.empty(n, channels, resolution, resolution, dtype=torch.float64)
    x = images.double()
    for i in range(resolution):
        for j in range(resolution):
            block = x[:, :, i * factor:(i + 1) * factor, j * factor:(j + 1) * factor]
            expected[:, :, i, j] = block.mean(dim=(2, 3))
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-6)


def test_load_dataset_resolution_and_classes_build_on_the_full_set():
    """load_dataset('digits', resolution, classes) equals filtering labels < C then downsampling."""
    images, labels = digits()
    small, small_labels = memdiff.load_dataset('digits', resolution=4, classes=3)
    keep = labels < 3
    assert torch.equal(small_labels, labels[keep])
    torch.testing.assert_close(small, memdiff.downsample(images[keep], 4))
    assert small.shape == (int(keep.sum()), 1, 4, 4)
    same, _ = memdiff.load_dataset('digits', resolution=8)
    assert torch.equal(same, images)


#----------------------------------------------------------------------------
# The npz format and its errors.

def _write_npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.parametrize('layout', ['NCHW', 'NHWC'])
@pytest.mark.parametrize('dtype', ['uint8', 'float32'])
def test_npz_round_trips(tmp_path, layout, dtype):
    """An npz of uint8 (x/127.5 - 1) or float images in either layout loads as the same NCHW tensor."""
    rng = np.random.default_rng(0)
    # 8x8 RGB: a 4x4 RGB NHWC array (5, 4, 4, 3) would be ambiguous with 4-channel NCHW.
    pixels = rng.integers(0, 256, size=(5, 3, 8, 8), dtype=np.uint8)
    expected = torch.from_numpy(pixels.astype(np.float64) / 127.5 - 1)
    stored = pixels if dtype == 'uint8' else (pixels / 127.5 - 1).astype(np.float32)
    if layout == 'NHWC':
        stored = stored.transpose(0, 2, 3, 1)
    labels = np.array([0, 1, 2, 1, 0], dtype=np.int32)
    path = _write_npz(tmp_path / 'set.npz', images=stored, labels=labels)
    images, loaded_labels = memdiff.load_dataset(path)
    assert images.dtype == torch.float32 and images.shape == (5, 3, 8, 8)
    torch.testing.assert_close(images.double(), expected, rtol=0, atol=1e-6)
    assert loaded_labels.dtype == torch.int64
    assert loaded_labels.tolist() == labels.tolist()


def test_npz_without_labels_loads_labels_none(tmp_path):
    """An npz holding only images loads with labels None."""
    path = _write_npz(tmp_path / 'unlabelled.npz', images=np.zeros((3, 1, 2, 2), np.uint8))
    images, labels = memdiff.load_dataset(path)
    assert labels is None
    assert images.shape == (3, 1, 2, 2)
    assert torch.equal(images, torch.full((3, 1, 2, 2), -1.0))


def _good_images():
    return np.random.default_rng(1).integers(0, 256, size=(4, 1, 4, 4), dtype=np.uint8)


def _nan_images():
    x = np.zeros((4, 1, 4, 4), np.float32)
    x[2, 0, 1, 1] = np.nan
    return x


def _inf_images():
    x = np.zeros((4, 1, 4, 4), np.float32)
    x[0, 0, 3, 2] = -np.inf
    return x


MALFORMED = {
    # case: (file name, arrays written to it or None for no file, load_dataset keywords)
    'missing_file': ('never_written.npz', None, {}),
    'unknown_extension': ('pixels.txt', 'text', {}),
    'rank_2_images': ('flat.npz', dict(images=np.zeros((4, 16), np.uint8)), {}),
    'nan_pixels': ('nan.npz', dict(images=_nan_images()), {}),
    'inf_pixels': ('inf.npz', dict(images=_inf_images()), {}),
    'label_length_mismatch': ('short.npz', dict(images=_good_images(), labels=np.arange(3)), {}),
    'resolution_not_dividing': ('res.npz', dict(images=_good_images()), dict(resolution=3)),
    'too_many_classes': ('cls.npz', dict(images=_good_images(), labels=np.array([0, 1, 0, 1])),
                         dict(classes=3)),
}


@pytest.mark.parametrize('case', list(MALFORMED))
def test_malformed_input_raises_value_error_naming_the_file(tmp_path, case):
    """Each malformed data file raises ValueError whose message contains the file's name."""
    name, content, kwargs = MALFORMED[case]
    path = tmp_path / name
    if content == 'text':
        path.write_text('not images\n')
    elif content is not None:
        np.savez(path, **content)
    with pytest.raises(ValueError, match=re.escape(name)):
        memdiff.load_dataset(str(path), **kwargs)


def test_unknown_data_set_name_raises_value_error_naming_it():
    """load_dataset of an unknown name raises ValueError that repeats the name."""
    with pytest.raises(ValueError, match='no_such_data_set'):
        memdiff.load_dataset('no_such_data_set')


#----------------------------------------------------------------------------
# Label modes.

def test_assign_labels_none_true_and_unique():
    """'none' -> (None, 0); 'true' -> (labels, max + 1); 'unique' -> (arange(n), n)."""
    labels = torch.tensor([0, 2, 2, 1, 4])
    assert memdiff.assign_labels(labels, 'none') == (None, 0)
    out, dim = memdiff.assign_labels(labels, 'true')
    assert torch.equal(out, labels) and dim == 5
    out, dim = memdiff.assign_labels(labels, 'unique')
    assert torch.equal(out, torch.arange(5)) and dim == 5


@given(num_classes=RANDOM_CLASSES, seed=SEEDS)
def test_assign_labels_random_draws_seeded_labels_in_range(num_classes, seed):
    """'random:C' gives int64 labels in [0, C) for every image, the same for the same seed."""
    _, labels = digits()
    out, dim = memdiff.assign_labels(labels[:50], f'random:{num_classes}', seed=seed)
    assert dim == num_classes
    assert out.dtype == torch.int64 and out.shape == (50,)
    assert out.min().item() >= 0 and out.max().item() < num_classes
    again, _ = memdiff.assign_labels(labels[:50], f'random:{num_classes}', seed=seed)
    assert torch.equal(out, again)
    if num_classes > 1:
        other, _ = memdiff.assign_labels(labels[:50], f'random:{num_classes}', seed=seed + 1)
        assert not torch.equal(out, other)                  # 50 draws agree with odds <= 2**-50


@pytest.mark.parametrize('labels, mode', [
    (torch.tensor([0, 1]), 'bogus'),
    (torch.tensor([0, 1]), 'random:0'),
    (torch.tensor([0, 1]), 'random:-2'),
    (torch.tensor([0, 1]), 'random:many'),
    (None, 'true'),
])
def test_assign_labels_rejects_bad_modes(labels, mode):
    """Unknown modes, random:C with C < 1 and 'true' without labels raise ValueError."""
    with pytest.raises(ValueError):
        memdiff.assign_labels(labels, mode)


#----------------------------------------------------------------------------
# The study's 8-bit grid.

@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@given(seed=SEEDS)
def test_quantize_uint8_matches_floor_of_clipped_affine_map(dtype, seed):
    """to_uint8 is floor(clip(127.5 x + 128, 0, 255)) and quantize_uint8 is that u / 127.5 - 1."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(64, generator=g, dtype=torch.float64) * 2.4 - 1.2).to(dtype)
    v = torch.clip(x.double() * 127.5 + 128, 0, 255)          # float64 reference
    u = torch.floor(v)
    # Within float32 rounding (256 eps ~ 3e-5) of a grid boundary either side is right.
    clear = (v - v.round()).abs() > 1e-4
    pixels = memdiff.to_uint8(x)
    assert pixels.dtype == torch.uint8 and pixels.shape == x.shape
    assert torch.equal(pixels.long()[clear], u.long()[clear])
    q = memdiff.quantize_uint8(x)
    assert q.dtype == dtype and q.shape == x.shape
    torch.testing.assert_close(q.double()[clear], u[clear] / 127.5 - 1, rtol=0, atol=1e-6)


@given(seed=SEEDS)
def test_quantize_uint8_is_idempotent_and_keeps_the_range_ends(seed):
    """Quantizing twice equals quantizing once; -1 and 1 are grid points."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(64, generator=g) * 2 - 1
    q = memdiff.quantize_uint8(x)
    assert torch.equal(memdiff.quantize_uint8(q), q)
    ends = memdiff.quantize_uint8(torch.tensor([-1.0, 1.0]))
    assert ends.tolist() == [-1.0, 1.0]


#----------------------------------------------------------------------------
# Every layout, range rule and file format, round-tripped.

@pytest.mark.parametrize('channels', [1, 3, 4])
@pytest.mark.parametrize('layout', ['NCHW', 'NHWC'])
def test_every_channel_count_loads_in_both_layouts(tmp_path, channels, layout):
    """1, 3 and 4 channels load from NCHW and NHWC; a shape that fits both (N,3,3,3) stays NCHW."""
    pixels = np.random.default_rng(channels).integers(0, 256, size=(2, channels, 6, 6), dtype=np.uint8)
    stored = pixels if layout == 'NCHW' else pixels.transpose(0, 2, 3, 1)
    images, _ = memdiff.load_dataset(_write_npz(tmp_path / 'x.npz', images=stored))
    assert torch.equal(images, torch.from_numpy(pixels.astype(np.float32) / 127.5 - 1))
    for c in [1, 3, 4]:
        both = np.arange(2 * c ** 3, dtype=np.uint8).reshape(2, c, c, c)
        images, _ = memdiff.load_dataset(_write_npz(tmp_path / f'both{c}.npz', images=both))
        assert torch.equal(images, torch.from_numpy(both.astype(np.float32) / 127.5 - 1))


@pytest.mark.parametrize('low, high, ok', [(-1.0, 1.0, True), (-1.5, 0.0, False), (0.0, 1.5, False),
                                           (-1 - 1e-7, 1 + 1e-7, True), (-1.01, 1.01, False)])
def test_float_images_must_lie_in_minus_one_one(tmp_path, low, high, ok):
    """Float pixels outside [-1, 1] (either end, beyond float rounding) are a ValueError."""
    x = np.linspace(low, high, 16, dtype=np.float64).reshape(1, 1, 4, 4)
    path = _write_npz(tmp_path / 'range.npz', images=x)
    if ok:
        assert memdiff.load_dataset(path)[0].shape == (1, 1, 4, 4)
    else:
        with pytest.raises(ValueError, match='range.npz'):
            memdiff.load_dataset(path)


@pytest.mark.parametrize('labels, ok', [([0.0, 2.0, 1.0], True), ([0.0, 0.5, 1.0], False),
                                        ([0.0, np.nan, 1.0], False), ([0, -1, 1], False),
                                        ([[1, 0], [0, 1], [1, 0]], True)])
def test_labels_must_be_non_negative_integers_or_one_hot_rows(tmp_path, labels, ok):
    """Labels: whole numbers >= 0 (any dtype), or one-hot rows read as their argmax."""
    path = _write_npz(tmp_path / 'labels.npz', images=np.zeros((3, 1, 2, 2), np.uint8),
                      labels=np.array(labels))
    if ok:
        loaded = memdiff.load_dataset(path)[1]
        assert loaded.dtype == torch.int64
        assert loaded.tolist() == (np.argmax(labels, 1) if np.ndim(labels) == 2 else
                                   np.array(labels, dtype=np.int64)).tolist()
    else:
        with pytest.raises(ValueError, match='labels.npz'):
            memdiff.load_dataset(path)


def _write_cifar(folder, n_per_batch=3):
    """The CIFAR-10 python layout: data_batch_1..5, each a pickle of uint8 rows [n, 3072] and labels."""
    import pickle
    rng = np.random.default_rng(0)
    rows, labels = [], []
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(1, 6):
        data = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        lab = [int(v) for v in rng.integers(0, 10, size=n_per_batch)]
        with open(folder / f'data_batch_{i}', 'wb') as f:
            pickle.dump({'data': data, 'labels': lab}, f)
        rows.append(data)
        labels += lab
    return np.concatenate(rows).reshape(-1, 3, 32, 32), labels


@pytest.mark.parametrize('form', ['folder', 'tar.gz'])
def test_cifar10_python_archive_loads_the_five_batches_in_order(tmp_path, form):
    """CIFAR-10's python archive (or its folder): batches 1..5 in order, rows as 3x32x32, x/127.5 - 1."""
    import tarfile
    pixels, labels = _write_cifar(tmp_path / 'cifar-10-batches-py')
    path = tmp_path
    if form == 'tar.gz':
        path = tmp_path / 'cifar-10-python.tar.gz'
        with tarfile.open(path, 'w:gz') as tar:
            tar.add(tmp_path / 'cifar-10-batches-py', arcname='cifar-10-batches-py')
    images, loaded = memdiff.load_dataset(str(path))
    assert torch.equal(images, torch.from_numpy(pixels.astype(np.float32) / 127.5 - 1))
    assert loaded.tolist() == labels


@pytest.mark.parametrize('with_labels', [True, False])
def test_png_zip_loads_images_in_name_order_with_dataset_json_labels(tmp_path, with_labels):
    """An EDM-style zip: PNGs sorted by name, labels from dataset.json, or None without it."""
    import zipfile
    from PIL import Image
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(3, 4, 4, 3), dtype=np.uint8)
    names = ['img2.png', 'img0.png', 'img1.png']
    path = tmp_path / 'set.zip'
    with zipfile.ZipFile(path, 'w') as z:
        for name, p in zip(names, pixels):
            buf = io.BytesIO()
            Image.fromarray(p).save(buf, format='PNG')
            z.writestr(name, buf.getvalue())
        if with_labels:
            z.writestr('dataset.json', json.dumps({'labels': [[n, i] for i, n in enumerate(names)]}))
    images, labels = memdiff.load_dataset(str(path))
    order = np.argsort(names)
    assert torch.equal(images, torch.from_numpy(pixels[order].transpose(0, 3, 1, 2).astype(np.float32)
                                                / 127.5 - 1))
    assert labels is None if not with_labels else labels.tolist() == order.tolist()


@pytest.mark.parametrize('classes', [1, 2, 10])
def test_classes_keeps_the_first_c_classes_one_to_all(classes):
    """classes=C keeps the images of classes 0..C-1, for every C from 1 to the number of classes."""
    images, labels = digits()
    kept_images, kept = memdiff.load_dataset('digits', classes=classes)
    assert torch.equal(kept, labels[labels < classes])
    assert torch.equal(kept_images, images[labels < classes])
    for bad in [0, 11]:
        with pytest.raises(ValueError, match=f'classes={bad}'):
            memdiff.load_dataset('digits', classes=bad)
