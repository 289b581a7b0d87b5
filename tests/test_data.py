"""Data: the bundled digits, npz loading and its errors, the study's subsets, LANCZOS
down-sampling and labels, the 8-bit grid, and --export of the study's files."""

import functools
import io
import json
import os
import random
import re
import zipfile

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

import memdiff

# Strategies. Bounds are small for speed.
SEEDS = st.integers(0, 2**31 - 1)
SUBSET_SIZES = st.integers(1, 300)
RESOLUTIONS = st.sampled_from([1, 2, 4])
FACTORS = st.sampled_from([1, 2, 4])
SMALL = st.integers(1, 3)
RANDOM_CLASSES = st.integers(1, 20)
# Up to 4 classes over at most 40 images, every class present.
SMALL_LABELS = st.integers(1, 4).flatmap(
    lambda C: st.lists(st.integers(0, C - 1), min_size=C, max_size=40)
    .filter(lambda v: len(set(v)) == C))


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
# The study's training sets: the first k = n // C images of each class, the remainder to the last.

def first_k_by_hand(labels, n):
    """Oracle: scan the labels in file order, keep the first share of each class, class-sorted."""
    labels = list(labels)
    classes = sorted(set(labels))
    k = n // len(classes)
    shares = {c: k for c in classes}
    shares[classes[-1]] = n - k * (len(classes) - 1)
    out = []
    for c in classes:
        out += [i for i, v in enumerate(labels) if v == c][:shares[c]]
    return out


@given(n=SUBSET_SIZES)
def test_balanced_subset_takes_the_first_k_of_each_class_in_class_sorted_order(n):
    """balanced_subset is the first n//C images of each class in file order, the remainder
    n - (C-1)(n//C) from the last class, class 0's images first."""
    _, labels = digits()
    idx = memdiff.balanced_subset(labels, n)
    assert idx.dtype == torch.int64 and idx.shape == (n,)
    assert idx.tolist() == first_k_by_hand(labels.tolist(), n)
    counts = torch.bincount(labels[idx], minlength=10).tolist()
    assert counts == [n // 10] * 9 + [n - 9 * (n // 10)]
    assert torch.equal(labels[idx], labels[idx].sort().values)   # class-sorted


@given(labels=SMALL_LABELS, data=st.data())
def test_balanced_subset_matches_the_hand_scan_on_any_labelling(labels, data):
    """On any labelling, balanced_subset equals the hand scan for every n up to max_subset_size, and
    the next size leaves some class short of its share."""
    top = memdiff.max_subset_size(torch.tensor(labels))
    n = data.draw(st.integers(1, top))
    assert memdiff.balanced_subset(torch.tensor(labels), n).tolist() == first_k_by_hand(labels, n)
    if top < len(labels):
        with pytest.raises(ValueError, match='fewer than its share'):
            memdiff.balanced_subset(torch.tensor(labels), top + 1)


@given(sizes=st.tuples(SUBSET_SIZES, SUBSET_SIZES))
def test_balanced_subset_is_nested_exactly_when_the_last_share_does_not_shrink(sizes):
    """For m <= n the subset of size m lies inside the one of size n iff the last class's share
    m - 9 (m//10) <= n - 9 (n//10) (digits, C = 10): always when 10 divides m."""
    _, labels = digits()
    m, n = sorted(sizes)
    small = set(memdiff.balanced_subset(labels, m).tolist())
    large = set(memdiff.balanced_subset(labels, n).tolist())
    assert (small <= large) == (m - 9 * (m // 10) <= n - 9 * (n // 10))
    if m % 10 == 0:
        assert small <= large


@given(sizes=st.tuples(SUBSET_SIZES, SUBSET_SIZES))
def test_unlabelled_subset_is_the_first_n_images_and_nested(sizes):
    """Unlabelled data (labels given as the size N): the subset of size n is images 0..n-1."""
    m, n = sorted(sizes)
    assert torch.equal(memdiff.balanced_subset(1797, n), torch.arange(n))
    assert set(memdiff.balanced_subset(1797, m).tolist()) <= set(range(n))


@pytest.mark.parametrize('n', [0, -1, 1798])
def test_balanced_subset_rejects_sizes_outside_the_data_set(n):
    """balanced_subset raises ValueError when n < 1 or n exceeds the number of images."""
    _, labels = digits()
    with pytest.raises(ValueError):
        memdiff.balanced_subset(labels, n)
    with pytest.raises(ValueError):
        memdiff.balanced_subset(len(labels), n)


def test_balanced_subset_rejects_a_class_shorter_than_its_share():
    """A class with fewer images than its share raises ValueError naming the class; max_subset_size
    is the last size before the first such failure."""
    labels = torch.tensor([0] * 10 + [1] * 2 + [2] * 10)
    assert [torch.bincount(labels[memdiff.balanced_subset(labels, n)]).tolist()
            for n in (3, 7, 8)] == [[1, 1, 1], [2, 2, 3], [2, 2, 4]]
    with pytest.raises(ValueError, match='class 1 has 2 images'):
        memdiff.balanced_subset(labels, 9)
    assert memdiff.max_subset_size(labels) == 8
    _, digit_labels = digits()
    top = memdiff.max_subset_size(digit_labels)
    memdiff.balanced_subset(digit_labels, top)
    with pytest.raises(ValueError, match='fewer than its share'):
        memdiff.balanced_subset(digit_labels, top + 1)



#----------------------------------------------------------------------------
# Down-sampling: Pillow's LANCZOS on uint8 pixels, as the study's dataset_tool.py.

def pillow_rgb_resize(pixels, resolution):
    """Oracle: dataset_tool.py's path, Image.fromarray(HWC uint8).resize((r, r), LANCZOS)."""
    size = (resolution, resolution)
    out = [np.array(Image.fromarray(p.transpose(1, 2, 0)).resize(size, Image.LANCZOS)) for p in pixels]
    return np.stack(out).transpose(0, 3, 1, 2)


@given(seed=SEEDS, n=SMALL, resolution=RESOLUTIONS, factor=FACTORS)
def test_downsample_of_uint8_equals_pillow_lanczos_of_rgb_images(seed, n, resolution, factor):
    """downsample keeps uint8 and equals Pillow's LANCZOS resize of the RGB image, pixel by pixel."""
    rng = np.random.default_rng(seed)
    H = resolution * factor
    pixels = rng.integers(0, 256, size=(n, 3, H, H), dtype=np.uint8)
    out = memdiff.downsample(pixels, resolution)
    assert out.dtype == np.uint8 and out.shape == (n, 3, resolution, resolution)
    assert np.array_equal(out, pillow_rgb_resize(pixels, resolution))
    as_tensor = memdiff.downsample(torch.from_numpy(pixels), resolution)
    assert torch.equal(as_tensor, torch.from_numpy(out))


@given(seed=SEEDS, n=SMALL, channels=SMALL, resolution=RESOLUTIONS, factor=FACTORS)
def test_downsample_of_floats_is_the_same_filter_without_rounding(seed, n, channels, resolution,
                                                                  factor):
    """On 8-bit images the float path lies within 1.5 grid steps of the uint8 path (which rounds
    after each of its two passes), stays in [-1, 1], and maps constant images to themselves."""
    rng = np.random.default_rng(seed)
    H = resolution * factor
    # Mid-range pixels: LANCZOS overshoots, and the uint8 path clips after each pass, the float
    # path only at the end; within 64..191 neither clips, so only the rounding differs.
    pixels = rng.integers(64, 192, size=(n, channels, H, H), dtype=np.uint8)
    floats = torch.from_numpy(pixels.astype(np.float32) / 127.5 - 1)
    out = memdiff.downsample(floats, resolution)
    assert out.dtype == torch.float32 and out.shape == (n, channels, resolution, resolution)
    grid = torch.from_numpy(memdiff.downsample(pixels, resolution).astype(np.float32)) / 127.5 - 1
    assert (out - grid).abs().max().item() <= 1.5 / 127.5
    assert out.min().item() >= -1 and out.max().item() <= 1
    flat = torch.full((1, channels, H, H), float(rng.uniform(-1, 1)), dtype=torch.float32)
    torch.testing.assert_close(memdiff.downsample(flat, resolution),
                               flat[..., :resolution, :resolution], rtol=0, atol=1e-5)


def test_downsample_to_the_same_size_is_the_identity():
    """downsample with resolution == H returns the images unchanged (uint8 and float)."""
    pixels = np.random.default_rng(0).integers(0, 256, size=(2, 3, 8, 8), dtype=np.uint8)
    assert memdiff.downsample(pixels, 8) is pixels
    images, _ = digits()
    assert torch.equal(memdiff.downsample(images, 8), images)


def test_load_dataset_resizes_uint8_before_scaling(tmp_path):
    """A uint8 npz loaded at a lower resolution equals Pillow's LANCZOS of its pixels, then
    u/127.5 - 1: every pixel lies on the 8-bit grid."""
    pixels = np.random.default_rng(2).integers(0, 256, size=(6, 3, 16, 16), dtype=np.uint8)
    path = _write_npz(tmp_path / 'rgb.npz', images=pixels)
    images, _ = memdiff.load_dataset(path, resolution=4)
    expected = torch.from_numpy(pillow_rgb_resize(pixels, 4).astype(np.float32) / 127.5 - 1)
    assert torch.equal(images, expected)
    u = (images.double() + 1) * 127.5
    assert torch.allclose(u, u.round(), rtol=0, atol=1e-4)


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


def test_npz_of_integer_images_in_range_loads_them_as_values_not_pixels(tmp_path):
    """Integer images other than uint8 (int16 of -1, 0, 1 here) are values in [-1, 1], kept as floats."""
    values = np.array([-1, 0, 1, 0], np.int16).reshape(1, 1, 2, 2).repeat(3, 0)
    images, _ = memdiff.load_dataset(_write_npz(tmp_path / 'int.npz', images=values))
    assert images.dtype == torch.float32 and torch.equal(images, torch.from_numpy(values).float())


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
    'resolution_not_power_of_two': ('res.npz', dict(images=_good_images()), dict(resolution=3)),
    'resolution_above_size': ('big.npz', dict(images=_good_images()), dict(resolution=8)),
    'too_many_classes': ('cls.npz', dict(images=_good_images(), labels=np.array([0, 1, 0, 1])),
                         dict(classes=3)),
    'npz_without_images': ('pixels.npz', dict(labels=np.arange(4)), {}),
    'float_out_of_range': ('range.npz', dict(images=np.full((4, 1, 2, 2), 2.0, np.float32)), {}),
    'npz_not_a_zip': ('broken.npz', 'text', {}),
    'npz_member_not_npy': ('junk.npz', b'not an array', {}),    # zips numpy cannot read as .npz
    'npz_member_bad_header': ('torn.npz', b'\x93NUMPY\x01\x00torn header', {}),
    'png_zip_not_a_zip': ('set.zip', 'text', {}),
}


@pytest.mark.parametrize('case', list(MALFORMED))
def test_malformed_input_raises_value_error_naming_the_file(tmp_path, case):
    """Each malformed data file raises ValueError whose message contains the file's name."""
    name, content, kwargs = MALFORMED[case]
    path = tmp_path / name
    if content == 'text':
        path.write_text('not images\n')
    elif isinstance(content, bytes):                            # a zip whose images.npy is that
        with zipfile.ZipFile(path, 'w') as z:
            z.writestr('images.npy', content)
    elif content is not None:
        np.savez(path, **content)
    with pytest.raises(ValueError, match=re.escape(name)) as error:
        memdiff.load_dataset(str(path), **kwargs)
    assert str(error.value).startswith(str(path) + ': ')       # 'file: problem', the file first


def test_npz_holding_a_pickle_is_refused_without_running_it(tmp_path, hostile):
    """An npz whose images are an object array (a pickle) is refused with one line naming the file,
    and the pickle never runs: arrays are read with allow_pickle=False."""
    payload, marker = hostile
    path = tmp_path / 'pickled.npz'
    np.savez(path, images=np.array([payload], dtype=object))
    with pytest.raises(ValueError) as error:
        memdiff.load_dataset(str(path))
    assert str(error.value).startswith(f'{path}: ')
    assert not marker.exists()


def test_to_uint8_is_edms_formula_and_saturates_outside_the_range():
    """x*127.5 + 128 clipped to [0, 255] and truncated, as EDM writes PNGs: values beyond [-1, 1]
    (a sampler's overshoot) saturate at 0 and 255 instead of wrapping around."""
    x = torch.cat([torch.linspace(-3, 3, 6001), torch.arange(256) / 127.5 - 1])
    expected = np.clip(x.double().numpy() * 127.5 + 128, 0, 255).astype(np.uint8)
    assert np.array_equal(memdiff.to_uint8(x).numpy(), expected)
    assert (memdiff.to_uint8(x[x > 1]) == 255).all() and (memdiff.to_uint8(x[x < -1]) == 0).all()


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
    out, dim = memdiff.assign_labels(None, 'unique', n=7)
    assert torch.equal(out, torch.arange(7)) and dim == 7


def study_random_labels(n, num_classes):
    """Oracle: dataset_random.py's draws, random.seed(1024) then randint(0, C-1) per image, on the
    module's global generator (whose state is saved and restored around the draws)."""
    state = random.getstate()
    try:
        random.seed(1024)
        return [random.randint(0, num_classes - 1) for _ in range(n)]
    finally:
        random.setstate(state)


@given(num_classes=RANDOM_CLASSES, n=SUBSET_SIZES)
def test_assign_labels_random_draws_the_study_sequence(num_classes, n):
    """'random:C' gives the n draws of random.seed(1024); randint(0, C-1), in class-sorted order,
    with label_dim = max label + 1, and leaves Python's global random state untouched."""
    _, labels = digits()
    subset = labels[memdiff.balanced_subset(labels, n)]
    before = random.getstate()
    out, dim = memdiff.assign_labels(subset, f'random:{num_classes}')
    assert random.getstate() == before
    assert out.dtype == torch.int64 and out.shape == (n,)
    assert out.tolist() == study_random_labels(n, num_classes)
    assert dim == max(out.tolist()) + 1 and dim <= num_classes
    unlabelled, _ = memdiff.assign_labels(None, f'random:{num_classes}', n=n)
    assert torch.equal(unlabelled, out)                     # the draws ignore the true labels


def test_training_set_uses_the_study_rules():
    """training_set = images[balanced_subset] with the label mode's labels (no seed involved)."""
    images, labels = digits()
    for seed in (0, 1):
        cfg = memdiff.EMMConfig(labels='random:3', seed=seed)
        y, c, dim = memdiff.training_set(images, labels, 25, cfg)
        assert torch.equal(y, images[first_k_by_hand(labels.tolist(), 25)])
        assert c.tolist() == study_random_labels(25, 3) and dim == max(c.tolist()) + 1


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
# --export: the training set written as the study's dataset tools write it.

def export(*args):
    """Run `run_emm.py ... --export` in-process -> click's result."""
    from click.testing import CliRunner
    import run_emm
    return CliRunner().invoke(run_emm.main, [str(a) for a in args])


def rgb_npz(tmp_dir):
    """1,200 uint8 RGB images 4x4 whose 10 classes are shuffled in file order."""
    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 256, size=(1200, 3, 4, 4), dtype=np.uint8)
    labels = rng.permutation(np.arange(1200) % 10)
    return _write_npz(tmp_dir / 'rgb1200.npz', images=pixels, labels=labels)


@pytest.mark.parametrize('mode, n', [('true', 1005), ('none', 30), ('random:7', 30), ('unique', 30)])
def test_export_round_trips_and_has_the_study_layout(tmp_path, mode, n):
    """--export writes n PNGs 00000/img00000000.png.. (1,000 per folder, stored, uncompressed) and
    dataset.json {"labels": [[name, label], ..]}; loading it gives training_set's images and labels
    (the true labels for mode 'none', as dataset_size.py writes them)."""
    data = rgb_npz(tmp_path)
    out = tmp_path / 'set.zip'
    result = export('--data', data, '--labels', mode, '--sizes', n, '--export', out)
    assert result.exit_code == 0, result.output
    images, labels = memdiff.load_dataset(data)
    y, c, _ = memdiff.training_set(images, labels, n, memdiff.EMMConfig(labels=mode))
    if mode == 'none':
        c = labels[memdiff.balanced_subset(labels, n)]
    names = [f'{i // 1000:05d}/img{i:08d}.png' for i in range(n)]
    with zipfile.ZipFile(out) as z:
        assert z.namelist() == names + ['dataset.json']
        assert all(info.compress_type == zipfile.ZIP_STORED for info in z.infolist())
        assert json.loads(z.read('dataset.json')) == {'labels': [[m, v] for m, v in
                                                                 zip(names, c.tolist())]}
        first = Image.open(z.open(names[0]))
        assert first.mode == 'RGB' and first.size == (4, 4)
    loaded, loaded_labels = memdiff.load_dataset(str(out))
    assert torch.equal(loaded, y) and torch.equal(loaded_labels, c)


def test_export_of_float_digits_writes_their_8bit_rounding(tmp_path):
    """Digits (not uint8) export as grayscale PNGs of to_uint8(y), reloaded as quantize_uint8(y)."""
    out = tmp_path / 'digits.zip'
    result = export('--sizes', 20, '--resolution', 4, '--export', out)
    assert result.exit_code == 0, result.output
    images, labels = memdiff.load_dataset('digits', resolution=4)
    y, _, _ = memdiff.training_set(images, labels, 20, memdiff.EMMConfig())
    with zipfile.ZipFile(out) as z:
        assert Image.open(z.open('00000/img00000000.png')).mode == 'L'
    loaded, loaded_labels = memdiff.load_dataset(str(out))
    assert torch.equal(loaded, memdiff.quantize_uint8(y))
    assert torch.equal(loaded_labels, labels[memdiff.balanced_subset(labels, 20)])


@pytest.mark.parametrize('args, message', [
    (['--sizes', '20', '--export', 'set.npz'], 'ending in .zip'),
    (['--sizes', '20,40', '--export', 'set.zip'], 'exactly one size'),
    (['--export', 'set.zip'], 'exactly one size'),
    (['--sizes', '1797', '--export', 'set.zip'], 'fewer than its share'),
])
def test_export_rejects_bad_input_with_a_one_line_error(tmp_path, monkeypatch, args, message):
    """No .zip suffix, not exactly one size, or an impossible size: a one-line error, no file."""
    monkeypatch.chdir(tmp_path)
    result = export(*args)
    assert result.exit_code != 0
    assert message in result.output and 'Traceback' not in result.output
    assert list(tmp_path.iterdir()) == []


#----------------------------------------------------------------------------
# CIFAR-10's python archive

def write_cifar(root, batches, as_tar=True):
    """A CIFAR-10 python archive (tar.gz or folder) holding the given batch dicts."""
    import pickle
    import tarfile
    folder = root / 'cifar-10-batches-py'
    folder.mkdir(parents=True)
    for i, batch in enumerate(batches, 1):
        (folder / f'data_batch_{i}').write_bytes(pickle.dumps(batch, protocol=2))
    if not as_tar:
        return root
    path = root / 'cifar-10-python.tar.gz'
    with tarfile.open(path, 'w:gz') as tar:
        tar.add(folder, arcname='cifar-10-batches-py')
    return path


def cifar_batch(seed, n=6):
    g = np.random.default_rng(seed)
    return {'batch_label': b'training batch', 'labels': g.integers(0, 10, n).tolist(),
            'data': g.integers(0, 256, (n, 3072), dtype=np.uint8),
            'filenames': [b'x.png'] * n}


@pytest.mark.parametrize('as_tar', [True, False])
def test_cifar_archive_loads_its_five_batches_in_order(tmp_path, as_tar):
    """The tar.gz and the extracted folder give the five batches' images (CHW rows) and labels."""
    batches = [cifar_batch(k) for k in range(5)]
    path = write_cifar(tmp_path, batches, as_tar)
    images, labels = memdiff.load_dataset(path)
    expected = np.concatenate([b['data'] for b in batches]).reshape(-1, 3, 32, 32)
    assert torch.equal(images, torch.from_numpy(expected).float() / 127.5 - 1)
    assert labels.tolist() == sum((b['labels'] for b in batches), [])


def test_cifar_batch_that_runs_a_command_is_refused(tmp_path, hostile):
    """A batch naming anything but numpy's array rebuilders is a clear error; nothing runs."""
    exploit, marker = hostile
    batches = [cifar_batch(k) for k in range(5)]
    batches[2]['labels'] = exploit
    path = write_cifar(tmp_path, batches)
    with pytest.raises(ValueError, match='not a CIFAR-10 python archive') as error:
        memdiff.load_dataset(path)
    assert str(error.value).startswith(str(path) + ': ') and not marker.exists()


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


@pytest.mark.parametrize('resolution', [4])
def test_float_lanczos_ringing_is_clipped_to_minus_one_one(resolution):
    """LANCZOS overshoots at sharp edges; float images come back inside [-1, 1], as uint8 ones are
    clipped to 0..255, and at the ends of the range where the filter rang past them."""
    x = -np.ones((1, 1, 8, 8), np.float32)
    x[..., 2:6, 3:5] = 1.0                                  # a bright bar: ringing on both sides
    y = memdiff.downsample(x, resolution)
    assert y.min() >= -1 and y.max() <= 1
    image = Image.fromarray(x[0, 0]).resize((resolution, resolution), Image.LANCZOS)
    raw = np.asarray(image)
    assert raw.max() > 1 or raw.min() < -1                  # the filter did ring past the range
    np.testing.assert_array_equal(y[0, 0], raw.clip(-1, 1))



#----------------------------------------------------------------------------
# Files that declare more than they hold: sizes are read from headers and refused before decoding.

def blank_png(width, height):
    """A real PNG of black grey pixels, written row by row: a few kB for any size."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    deflate, row, rows = zlib.compressobj(9), bytes(width + 1), []  # filter byte 0, then zeros
    rows = b''.join(deflate.compress(row) for _ in range(height)) + deflate.flush()
    header = struct.pack('>IIBBBBB', width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', rows) + chunk(b'IEND', b'')


def peak_growth(fn):
    """(fn's outcome or exception, growth of the peak resident memory in MiB, seconds)."""
    from test_snapshots import peak_growth as measure
    return measure(fn)


def zip_of_pngs(path, pngs):
    with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_STORED) as z:
        for i, png in enumerate(pngs):
            z.writestr(f'00000/img{i:08d}.png', png)


def test_a_zip_of_huge_blank_pngs_is_refused_in_under_a_second(tmp_path):
    """Three black 12,000 x 12,000 PNGs (432 MB of pixels in a zip of a few hundred kB) are refused
    from their headers, naming the file and the size, in under a second with little memory."""
    png = blank_png(12_000, 12_000)
    path = tmp_path / 'bomb.zip'
    zip_of_pngs(path, [png] * 3)
    assert path.stat().st_size < 1_000_000
    outcome, mib, seconds = peak_growth(lambda: memdiff.load_dataset(path))
    assert isinstance(outcome, ValueError), outcome
    assert str(path) in str(outcome) and '12000 x 12000' in str(outcome)
    assert mib < 100 and seconds < 1.0, (mib, seconds)


def test_pngs_of_different_sizes_are_refused_naming_both(tmp_path):
    """A zip whose images differ in size is one ValueError naming the odd image and the first's size."""
    path = tmp_path / 'mixed.zip'
    zip_of_pngs(path, [blank_png(8, 8), blank_png(8, 8), blank_png(4, 4)])
    with pytest.raises(ValueError, match=r'img00000002.png is 4 x 4 x 1, .*8 x 8 x 1'):
        memdiff.load_dataset(path)


def test_an_npz_declaring_an_enormous_array_is_refused_from_its_header(tmp_path):
    """images.npy whose header declares 10^6 x 3 x 1024 x 1024 uint8 but holds 1 kB is refused
    before numpy allocates it."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, dict(descr='|u1', fortran_order=False,
                                                      shape=(10 ** 6, 3, 1024, 1024)))
    path = tmp_path / 'huge.npz'
    with zipfile.ZipFile(path, 'w') as z:
        z.writestr('images.npy', b'\x93NUMPY\x01\x00' + header.getvalue()[8:] + bytes(1000))
    outcome, mib, seconds = peak_growth(lambda: memdiff.load_dataset(path))
    assert isinstance(outcome, ValueError), outcome
    assert str(path) in str(outcome) and '1000000, 3, 1024, 1024' in str(outcome)
    assert mib < 100 and seconds < 1.0, (mib, seconds)


def test_an_npz_declaring_more_float64_values_than_it_holds_is_refused_from_its_header(tmp_path):
    """The header's shape times the item size (8 bytes for float64) is what the member must hold:
    100 images declared over the bytes of 10 are refused as a declaration, before any read."""
    data = io.BytesIO()
    np.save(data, np.zeros((10, 1, 8, 8)))
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, dict(descr='<f8', fortran_order=False,
                                                      shape=(100, 1, 8, 8)))
    path = tmp_path / 'short.npz'
    with zipfile.ZipFile(path, 'w') as z:
        z.writestr('images.npy', header.getvalue() + data.getvalue()[len(header.getvalue()):])
    with pytest.raises(ValueError, match=r'declares \(100, 1, 8, 8\) of float64'):
        memdiff.load_dataset(path)


def test_png_images_of_exactly_max_pixels_load(tmp_path, monkeypatch):
    """MAX_PIXELS is the largest size read: an image of exactly that many pixels loads."""
    monkeypatch.setattr(memdiff, 'MAX_PIXELS', 64)
    zip_of_pngs(tmp_path / 'set.zip', [blank_png(8, 8)] * 2)
    assert memdiff.load_dataset(tmp_path / 'set.zip')[0].shape == (2, 1, 8, 8)


def test_held_out_of_an_unlabelled_set_is_its_last_images():
    """Without labels the images left out of the first n are n..N-1; held_out takes the last count."""
    assert memdiff.held_out(100, 10, 5).tolist() == [95, 96, 97, 98, 99]

@pytest.mark.parametrize('count', [0, 1])
def test_a_data_set_of_one_image_loads_and_of_none_is_refused(tmp_path, count):
    """N = 1 is a data set; N = 0 is one line naming the shape, for uint8 and float images alike."""
    for dtype in (np.uint8, np.float32):
        _write_npz(tmp_path / 'one.npz', images=np.zeros((count, 1, 4, 4), dtype))
        if count:
            assert memdiff.load_dataset(tmp_path / 'one.npz')[0].shape == (1, 1, 4, 4)
        else:
            with pytest.raises(ValueError, match=r'with N > 0, got shape \(0, 1, 4, 4\)'):
                memdiff.load_dataset(tmp_path / 'one.npz')


def test_without_proc_meminfo_the_free_memory_is_the_physical_memory(monkeypatch):
    """Where /proc/meminfo cannot be read (not Linux), the memory left is page size x pages."""
    def no_meminfo(*args, **kwargs):
        raise OSError('no /proc/meminfo here')
    monkeypatch.setattr(memdiff, 'open', no_meminfo, raising=False)
    assert memdiff._free_memory() == os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')

def test_a_data_set_larger_than_free_memory_is_refused_naming_the_sizes(tmp_path, monkeypatch):
    """When the float32 copy a file declares needs more than the machine has free, the file is
    refused before it is decoded, with one line naming the sizes (PNG zips and .npz alike)."""
    monkeypatch.setattr(memdiff, '_free_memory', lambda: 1000)
    path = tmp_path / 'set.zip'
    zip_of_pngs(path, [blank_png(8, 8)] * 5)
    with pytest.raises(ValueError, match=r'5 x 1 x 8 x 8 images need .* GiB as float32'):
        memdiff.load_dataset(path)
    _write_npz(tmp_path / 'set.npz', images=np.zeros((5, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match=r'5 x 8 x 8 x 3 images need'):
        memdiff.load_dataset(tmp_path / 'set.npz')


@pytest.mark.parametrize('shape', [(3, 1, 6, 4), (3, 6, 4, 1), (3, 3, 8, 4)])
def test_non_square_images_are_refused_naming_the_shape(tmp_path, shape):
    """The U-Net takes square images: any other shape, in either layout, is one ValueError."""
    path = _write_npz(tmp_path / 'x.npz', images=np.zeros(shape, np.uint8))
    with pytest.raises(ValueError, match='must be square'):
        memdiff.load_dataset(path)
