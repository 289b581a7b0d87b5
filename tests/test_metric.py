"""The memorization metric: nearest neighbours, the d1/d2 ratio, duplicates, the Wilson interval."""

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import memdiff

# Strategies. Bounds are small for speed.
SEEDS = st.integers(0, 2**31 - 1)
REFERENCE_SIZES = st.integers(2, 20)
BATCHES = st.integers(1, 5)
NEIGHBOURS = st.integers(1, 4)
CHUNKS = st.integers(1, 25)
SHAPES = st.sampled_from([(2,), (1, 2, 2), (3, 2, 2)])
FRACTIONS = st.floats(0.0, 0.5)                             # position along a segment to the NN
SCALES = st.floats(0.01, 100)
TRIALS = st.integers(1, 10_000)


def draw(seed, *shape, dtype=torch.float64):
    """Uniform values in [-1, 1] from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)


def brute_distances(x, y):
    """All L2 distances [B, N] in float64 from explicit differences."""
    return ((x.flatten(1).double()[:, None] - y.flatten(1).double()[None]) ** 2).sum(-1).sqrt()


#----------------------------------------------------------------------------
# Nearest neighbours.

@given(n=REFERENCE_SIZES, b=BATCHES, k=NEIGHBOURS, chunk=CHUNKS, shape=SHAPES, seed=SEEDS)
def test_chunked_nearest_neighbors_equal_one_matrix_search(n, b, k, chunk, shape, seed):
    """Chunked search returns the k smallest distances, ascending, and their indices, as topk does."""
    k = min(k, n)
    y, x = draw(seed, n, *shape), 1.5 * draw(seed + 1, b, *shape)
    expected_d, expected_i = brute_distances(x, y).topk(k, dim=1, largest=False, sorted=True)
    d, i = memdiff.nearest_neighbors(x, y, k=k, chunk=chunk)
    assert d.shape == (b, k) and i.shape == (b, k) and i.dtype == torch.int64
    torch.testing.assert_close(d.double(), expected_d, rtol=1e-9, atol=1e-12)
    assert torch.equal(i, expected_i)
    assert (d[:, 1:] >= d[:, :-1]).all()


@given(n=st.integers(1024, 1500), b=BATCHES, k=NEIGHBOURS, chunk=st.integers(1024, 1600),
       near=st.lists(st.integers(0, 63), max_size=3), seed=SEEDS)
def test_nearest_neighbours_over_large_chunks_match_brute_force(n, b, k, chunk, near, seed):
    """With chunks long enough for the block-minimum search, the neighbours are still topk's."""
    y, x = draw(seed, n, 16), 1.5 * draw(seed + 1, b, 16)
    # Samples close to the last images of the first chunk: the blocks leave those over.
    last = [min(n, chunk) - 1 - p for p in near]
    x = torch.cat([x, y[last] + 1e-3 * draw(seed + 2, len(last), 16)])
    expected_d, expected_i = brute_distances(x, y).topk(k, dim=1, largest=False, sorted=True)
    d, i = memdiff.nearest_neighbors(x, y, k=k, chunk=chunk)
    torch.testing.assert_close(d.double(), expected_d, rtol=1e-9, atol=1e-12)
    assert torch.equal(i, expected_i)


@given(n=REFERENCE_SIZES, b=BATCHES, shape=SHAPES, seed=SEEDS)
def test_exact_copy_has_distance_exactly_zero(n, b, shape, seed):
    """A sample equal to a reference image has nearest distance exactly 0 and that image's index."""
    y = draw(seed, n, *shape, dtype=torch.float32) * 50      # a large scale invites cancellation
    which = torch.randint(n, (b,), generator=torch.Generator().manual_seed(seed + 1))
    d, i = memdiff.nearest_neighbors(y[which], y, k=2)
    assert (d[:, 0] == 0).all()
    assert torch.equal(i[:, 0], which)


#----------------------------------------------------------------------------
# The ratio d1/d2 and the memorized mask.

@given(n=REFERENCE_SIZES, b=BATCHES, shape=SHAPES, seed=SEEDS)
def test_copies_are_memorized(n, b, shape, seed):
    """Exact copies of training images have ratio 0 and are all memorized."""
    y = draw(seed, n, *shape, dtype=torch.float32)
    which = torch.randint(n, (b,), generator=torch.Generator().manual_seed(seed + 1))
    ratio, mask = memdiff.memorization_scores(y[which], y)
    assert ratio.shape == (b,) and mask.dtype == torch.bool
    assert (ratio == 0).all() and mask.all()
    assert memdiff.memorization_ratio(y[which], y) == 1.0


@given(n=REFERENCE_SIZES, shape=SHAPES, t=FRACTIONS, seed=SEEDS)
def test_ratio_along_the_segment_to_the_nearest_neighbour_is_t_over_one_minus_t(n, shape, t, seed):
    """x = a + t (b - a), b the nearest image to a, has d1/d2 = t / (1 - t): memorized iff t < 1/4."""
    y = draw(seed, n, *shape)
    d = brute_distances(y, y) + torch.eye(n) * 1e9
    a = int(torch.randint(n, (1,), generator=torch.Generator().manual_seed(seed + 1)))
    b = int(d[a].argmin())
    x = y[a] + t * (y[b] - y[a])
    ratio, mask = memdiff.memorization_scores(x[None], y)
    assert math.isclose(ratio.item(), t / (1 - t), rel_tol=1e-9, abs_tol=1e-12)
    if abs(t - 0.25) > 1e-6:
        assert mask.item() == (t < 0.25)


def test_midpoints_between_nearest_neighbours_are_not_memorized():
    """Midpoints of each digit and its nearest other digit have ratio 1 and none is memorized."""
    images, _ = memdiff.load_dataset('digits')
    y = images[:100]
    d = brute_distances(y, y) + torch.eye(100) * 1e9
    midpoints = (y + y[d.argmin(1)]) / 2
    ratio, mask = memdiff.memorization_scores(midpoints, y)
    torch.testing.assert_close(ratio, torch.ones(100), rtol=1e-5, atol=0)
    assert not mask.any()
    assert memdiff.memorization_ratio(midpoints, y) == 0.0


@given(n=REFERENCE_SIZES, b=BATCHES, shape=SHAPES, scale=SCALES, seed=SEEDS)
def test_scores_are_invariant_to_shared_shift_and_positive_scale(n, b, shape, scale, seed):
    """Mapping samples and references by a x + c (a > 0, shared c) leaves ratios and mask unchanged."""
    y, x = draw(seed, n, *shape), 1.5 * draw(seed + 1, b, *shape)
    shift = 5 * draw(seed + 2, *shape)
    ratio, mask = memdiff.memorization_scores(x, y)
    moved_ratio, moved_mask = memdiff.memorization_scores(scale * x + shift, scale * y + shift)
    torch.testing.assert_close(moved_ratio, ratio, rtol=1e-7, atol=1e-9)
    assume(((ratio - 1 / 3).abs() > 1e-6).all())           # no sample on the threshold
    assert torch.equal(moved_mask, mask)


@given(n=REFERENCE_SIZES, b=BATCHES, shape=SHAPES, threshold=st.floats(0.05, 1.0), seed=SEEDS)
def test_ratio_is_the_fraction_of_scores_below_the_threshold(n, b, shape, threshold, seed):
    """memorization_ratio is the mean of the mask, and the mask is ratio < threshold."""
    y = draw(seed, n, *shape)
    # Half the samples start near training images, so both outcomes occur.
    which = torch.randint(n, (b,), generator=torch.Generator().manual_seed(seed + 1))
    x = y[which] + 0.3 * draw(seed + 2, b, *shape)
    ratio, mask = memdiff.memorization_scores(x, y, mem_threshold=threshold)
    assert torch.equal(mask, ratio < threshold)
    fraction = memdiff.memorization_ratio(x, y, mem_threshold=threshold)
    assert isinstance(fraction, float)
    assert math.isclose(fraction, mask.double().mean().item())


#----------------------------------------------------------------------------
# Duplicates in the reference set.

@given(n=REFERENCE_SIZES, b=BATCHES, shape=SHAPES, seed=SEEDS)
def test_duplicated_reference_images_count_once(n, b, shape, seed):
    """Duplicating reference images changes no score; a copy of a duplicated image is memorized."""
    y, x = draw(seed, n, *shape), 1.5 * draw(seed + 1, b, *shape)
    g = torch.Generator().manual_seed(seed + 2)
    dup = torch.randint(n, (3,), generator=g)
    with_dups = torch.cat([y, y[dup]])[torch.randperm(n + 3, generator=g)]
    ratio, mask = memdiff.memorization_scores(x, y)
    dup_ratio, dup_mask = memdiff.memorization_scores(x, with_dups)
    torch.testing.assert_close(dup_ratio, ratio, rtol=1e-12, atol=1e-12)
    assert torch.equal(dup_mask, mask)
    copy_ratio, copy_mask = memdiff.memorization_scores(y[dup], with_dups)
    assert (copy_ratio == 0).all() and copy_mask.all()


@given(n=REFERENCE_SIZES, b=st.integers(1, 30), shape=SHAPES, copies=st.integers(1, 3), seed=SEEDS)
def test_score_reports_the_studys_rule_beside_its_own_when_the_set_holds_duplicates(n, b, shape,
                                                                                   copies, seed):
    """With duplicated training images, score() gives ratio (deduplicated: a copy of a duplicated
    image is memorized) and ratio_study (mem_ratio.py's: the two nearest of the whole set, so such a
    copy has d1/d2 = 1), each equal to its definition computed by brute force; without duplicates
    there is no ratio_study. The indices point at the first copy of each nearest image."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.randint(0, 256, (n, *shape), generator=g).double() / 127.5 - 1).clip(-1, 1)
    assume(len(torch.unique(y.flatten(1), dim=0)) == n)
    result, _ = memdiff.score(y[torch.randint(n, (b,), generator=g)], y)
    assert 'ratio_study' not in result and 'duplicates' not in result
    dup = torch.randint(n, (copies,), generator=g)
    y2 = torch.cat([y, y[dup]])
    x = torch.cat([y2[torch.randint(n + copies, (b,), generator=g)],
                   (y[:1] + 0.5 * draw(seed, 1, *shape)).clip(-1, 1)])
    result, per_sample = memdiff.score(x, y2)
    q = memdiff.quantize_uint8(x)
    d = brute_distances(q, y2).sort(1).values                      # with the duplicates
    study = (d[:, 0] / d[:, 1] < 1 / 3).double().mean().item()
    u = torch.unique(y2.flatten(1), dim=0)
    du = brute_distances(q, u).sort(1).values                      # one copy of each image
    ours = (du[:, 0] / du[:, 1] < 1 / 3).double().mean().item()
    assert result['ratio'] == pytest.approx(ours) and result['ratio_study'] == pytest.approx(study)
    assert result['duplicates'] == sum(c for c in torch.unique(y2.flatten(1), dim=0,
                                                                 return_counts=True)[1].tolist()
                                       if c > 1)
    first = {tuple(r): i for i, r in reversed(list(enumerate(y2.flatten(1).tolist())))}
    for k, (i, j) in enumerate(per_sample['index'].tolist()):
        assert first[tuple(y2[i].flatten().tolist())] == i and first[tuple(y2[j].flatten().tolist())] == j
        dist = brute_distances(q[k:k + 1], y2[[i, j]])[0]
        torch.testing.assert_close(dist, torch.stack([per_sample['d1'][k], per_sample['d2'][k]]).double())


def test_fewer_than_two_distinct_references_raise():
    """A reference set of one image, repeated or not, raises ValueError."""
    y = draw(0, 1, 1, 2, 2)
    with pytest.raises(ValueError):
        memdiff.memorization_scores(y, y)
    with pytest.raises(ValueError):
        memdiff.memorization_scores(y, y.expand(3, -1, -1, -1))


def test_no_samples_give_empty_scores_and_score_refuses_them():
    """An empty batch (a rank's share under torchrun) has empty scores; score() of it raises."""
    y = draw(0, 5, 1, 2, 2)
    ratio, mask = memdiff.memorization_scores(y[:0], y)
    assert ratio.shape == mask.shape == (0,)
    with pytest.raises(ValueError, match='at least one sample'):
        memdiff.score(y[:0], y)


#----------------------------------------------------------------------------
# The study's 8-bit pipeline.

@given(n=REFERENCE_SIZES, shape=SHAPES, seed=SEEDS)
def test_rounding_near_copies_to_uint8_recovers_grid_images(n, shape, seed):
    """Samples within half a grid step of uint8-grid images quantize back onto them: ratio 1.0."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (n, *shape), generator=g)
    assume(len(torch.unique(pixels.flatten(1), dim=0)) == n)
    y = (pixels.double() / 127.5 - 1).float()
    jitter = (torch.rand(n, *shape, generator=g) * 2 - 1) * 0.4 / 127.5   # under half a step
    samples = memdiff.quantize_uint8((y + jitter).clip(-1, 1))
    assert torch.equal(memdiff.to_uint8(samples).long(), pixels)
    assert memdiff.memorization_ratio(samples, y) == 1.0


#----------------------------------------------------------------------------
# Wilson score interval.

@given(n=TRIALS, data=st.data())
def test_wilson_interval_matches_closed_form_and_contains_the_estimate(n, data):
    """wilson_interval is the Wilson score interval, inside [0, 1], containing k / n."""
    k = data.draw(st.integers(0, n), label='k')
    z, p = 1.96, k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    low, high = memdiff.wilson_interval(k, n)
    assert math.isclose(low, max(0.0, centre - half), abs_tol=1e-12)
    assert math.isclose(high, min(1.0, centre + half), abs_tol=1e-12)
    assert 0.0 <= low <= p <= high <= 1.0


@pytest.mark.parametrize('k, n, low, high', [
    (0, 10, 0.0, 0.2775),                                   # textbook values, z = 1.96
    (5, 10, 0.2366, 0.7634),
    (10, 10, 0.7225, 1.0),
    (90, 100, 0.8256, 0.9448),
])
def test_wilson_interval_matches_tabulated_values(k, n, low, high):
    """wilson_interval reproduces published 95% Wilson intervals to four decimals."""
    got = memdiff.wilson_interval(k, n)
    assert got[0] == pytest.approx(low, abs=1e-4) and got[1] == pytest.approx(high, abs=1e-4)


def test_wilson_interval_reaches_zero_and_one_at_the_extremes():
    """With no successes the interval starts at exactly 0; with all successes it ends at exactly 1."""
    for n in range(1, 200):
        assert memdiff.wilson_interval(0, n)[0] == 0.0, n
        assert memdiff.wilson_interval(n, n)[1] == 1.0, n


#----------------------------------------------------------------------------
# The cut, in exact arithmetic: integer coordinates whose distances are whole numbers or square
# roots of integers, so d1/d2 = 1/3 holds exactly in floating point (5/15, as 1/3 is computed).

CUT_CASES = [  # (second neighbour, d2^2): d1 = 5 from (3, 4); d2 = 15 exactly, just above, just below
    ((9, 12), 225), ((15, 1), 226), ((14, 4), 212)]
DTYPES = st.sampled_from([torch.float32, torch.float64])


@given(dtype=DTYPES, shift=st.integers(-3, 3), scale=st.sampled_from([1, 2, 4, 0.5]),
       chunk=st.integers(1, 4))
def test_the_cut_is_strict_at_exactly_one_third(dtype, shift, scale, chunk):
    """d1/d2 = 1/3 exactly is not memorized (strict <); d2 a hair longer is, a hair shorter is not."""
    for (a, b), d2_sq in CUT_CASES:
        y = torch.tensor([[3, 4], [a, b], [40, 40], [-30, 7]], dtype=dtype) * scale + shift
        x = torch.tensor([[0, 0]], dtype=dtype) * scale + shift
        ratio, mask = memdiff.memorization_scores(x, y, chunk=chunk)
        assert ratio.item() == pytest.approx(5 / math.sqrt(d2_sq), rel=1e-6)
        if d2_sq == 225:
            assert ratio.item() == torch.tensor(1 / 3, dtype=dtype).item() and not mask.item()
        assert bool(mask.item()) == (d2_sq > 225)          # the default cut is 1/3
        assert memdiff.memorization_ratio(x, y, chunk=chunk) == float(d2_sq > 225)


def test_the_studys_rule_is_strict_at_exactly_one_third_too():
    """ratio_study (no deduplication) counts d1/d2 = 1/3 exactly as not memorized, a hair inside as
    memorized: the same strict cut as the deduplicated ratio. Coordinates of +-1 stay exact on the
    8-bit grid, and d^2 = 4 x (coordinates that differ): d1 = 2 against d2 = 6, sqrt(40), sqrt(32)."""
    x = -torch.ones(1, 10, dtype=torch.float64)

    def flipped(k):
        return torch.cat([torch.ones(1, k), -torch.ones(1, 10 - k)], 1).double()
    for second, memorized in ((flipped(9), False), (flipped(10), True), (flipped(8), False)):
        y = torch.cat([flipped(1), second, flipped(10), flipped(10)])  # the last image twice
        result, _ = memdiff.score(x, y)
        assert result['duplicates'] >= 2 and result['ratio_study'] == float(memorized)


@given(dtype=DTYPES, cut=st.sampled_from([(1, 2), (1, 4), (3, 5), (2, 3)]))
def test_the_cut_is_strict_at_any_mem_threshold(dtype, cut):
    """With mem_threshold = p/q, a sample at d1/d2 = p/q exactly is not memorized, just inside is."""
    p, q = cut
    y = torch.tensor([[p, 0], [0, q], [0, -q - 1], [50, 50]], dtype=dtype)  # d1 = p, d2 = q, q + 1
    x = torch.zeros(1, 2, dtype=dtype)
    ratio, mask = memdiff.memorization_scores(x, y, mem_threshold=p / q)
    assert ratio.item() == torch.tensor(p / q, dtype=dtype).item() and not mask.item()
    assert memdiff.memorization_ratio(x, y, mem_threshold=p / q + 1e-6) == 1.0
    assert memdiff.memorization_ratio(x, y, p / q + 1e-6, 1) == 1.0   # positional (threshold, chunk)
    d, i = memdiff.nearest_neighbors(x, y, k=3, chunk=1)
    assert d.tolist() == [[p, q, q + 1]] and i.tolist() == [[0, 1, 2]]


@given(dtype=DTYPES, seed=SEEDS)
def test_score_uses_its_mem_threshold_and_the_papers_default(dtype, seed):
    """score(samples, y, mem_threshold) counts d1/d2 < mem_threshold; its default is 1/3."""
    y = draw(seed, 12, 1, 2, 2, dtype=dtype).clip(-1, 1)
    which = torch.randint(12, (40,), generator=torch.Generator().manual_seed(seed))
    x = (y[which] + 0.3 * draw(seed + 1, 40, 1, 2, 2, dtype=dtype)).clip(-1, 1)
    for threshold in [None, 0.2, 0.6]:
        kwargs = {} if threshold is None else dict(mem_threshold=threshold)
        result, per_sample = memdiff.score(x, y, **kwargs)
        expected = memdiff.memorization_scores(memdiff.quantize_uint8(x), y)[0]
        torch.testing.assert_close(per_sample['d1'] / per_sample['d2'], expected, rtol=0, atol=0)
        k = int((expected < (1 / 3 if threshold is None else threshold)).sum())
        assert result['ratio'] == k / 40
        assert result['ci'] == list(memdiff.wilson_interval(k, 40))


@given(n=TRIALS, data=st.data(), z=st.floats(0.5, 4.0))
def test_wilson_interval_follows_its_z(n, data, z):
    """wilson_interval(k, n, z) is the closed form at that z; the default z is 1.96 (95%)."""
    k = data.draw(st.integers(0, n), label='k')
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    low, high = memdiff.wilson_interval(k, n, z=z)
    assert math.isclose(low, min(p, max(0.0, centre - half)), abs_tol=1e-12)
    assert math.isclose(high, max(p, min(1.0, centre + half)), abs_tol=1e-12)
    assert memdiff.wilson_interval(k, n) == memdiff.wilson_interval(k, n, z=1.96)


def test_wilson_interval_of_no_trials_is_everything():
    """n = 0 (or less) says nothing: the interval is [0, 1]."""
    assert memdiff.wilson_interval(0, 0) == (0.0, 1.0)
    assert memdiff.wilson_interval(0, -1) == (0.0, 1.0)
