"""EMM search, summaries, training durations, the training loop and one |D| measurement."""

import copy
import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import memdiff

# Strategies. Bounds are small for speed: a search over a few thousand sizes takes microseconds.
SEEDS = st.integers(0, 2**31 - 1)
THRESHOLDS = st.floats(0.1, 1.0)
SLOPES = st.floats(1e-4, 0.5)                               # ratio lost per extra training image
GAPS = st.floats(0.0, 0.05)                                 # extra drop just past the true EMM
STEPS = st.integers(1, 8)
TOLERANCES = st.floats(0.01, 1.0)
POINT_SIZES = st.lists(st.integers(1, 500), min_size=1, max_size=12, unique=True)
RATIOS = st.floats(0.0, 1.0)
SUBSET_SIZES = st.integers(1, 1797)                        # up to every digit
DURATION_SIZES = st.integers(1, 100_000)
EPOCHS = st.floats(0.01, 1000.0)
BATCHES = st.integers(1, 1024)
SNAPSHOT_COUNTS = st.integers(1, 20)
TOTAL_STEPS = st.integers(1, 5000)
SNAPSHOT_IMAGES = st.integers(1, 100_000)
DIGIT_LABELS = memdiff.load_dataset('digits')[1]          # 1,797 labels, 10 classes


@dataclass
class Curve:
    """A non-increasing memorization ratio over integer sizes that passes exactly up to size m."""
    m: int
    threshold: float
    slope: float
    gap: float

    def __call__(self, n):
        if n <= self.m:
            return min(1.0, self.threshold + self.slope * (self.m - n))  # >= threshold
        return max(0.0, self.threshold - self.gap - self.slope * (n - self.m))  # < threshold


@dataclass
class Search:
    lo: int
    hi: int
    step: int
    curve: Curve

    def expected_emm(self):
        """The largest multiple of step in [lo, hi] that passes, by brute force (None if none)."""
        passing = [n for n in range(self.lo, self.hi + 1) if n % self.step == 0 and
                   self.curve(n) >= self.curve.threshold]
        return max(passing) if passing else None


@st.composite
def searches(draw, steps=st.just(1)):
    """A search range [lo, hi] holding at least one multiple of step, and a curve whose true EMM
    lies anywhere from below lo to above hi (the edges drawn often)."""
    step = draw(steps)
    lo = draw(st.integers(step, 300))
    first = -(-lo // step) * step
    hi = draw(st.integers(first, first + 3000))
    m = draw(st.one_of(st.integers(lo - 3, hi + 3), st.sampled_from([lo - 1, lo, hi - 1, hi])))
    return Search(lo, hi, step, Curve(m, draw(THRESHOLDS), draw(SLOPES), draw(GAPS)))


class Counting:
    """ratio_at that records every size it is called with."""
    def __init__(self, curve):
        self.curve, self.calls = curve, []

    def __call__(self, n):
        self.calls.append(n)
        return self.curve(n)


def run_search(s, tolerance=0.0, known=None):
    ratio_at = Counting(s.curve)
    result = memdiff.find_emm(ratio_at, s.lo, s.hi, s.curve.threshold, s.step, tolerance, known)
    return result, ratio_at.calls


def first_failing(result, threshold):
    """The smallest evaluated size whose ratio is under the threshold (None if every size passed)."""
    failing = [n for n, r in result['evaluated'] if r < threshold]
    return min(failing) if failing else None

#----------------------------------------------------------------------------
# find_emm

@given(searches())
def test_find_emm_returns_largest_passing_size(s):
    """With tolerance 0, emm is the largest size in [lo, hi] whose ratio reaches the threshold."""
    result, _ = run_search(s)
    expected = s.expected_emm()
    assert result['emm'] == expected
    if expected is None:
        assert result['status'].startswith('below range') and result['crossing'] is None
    elif s.curve(s.hi) >= s.curve.threshold:
        assert expected == s.hi
        assert result['status'].startswith('above range') and result['crossing'] is None
    else:
        assert result['status'] == 'bracketed'


@given(searches(STEPS), st.sampled_from([0.0, 0.1, 0.5]))
def test_find_emm_calls_ratio_at_once_per_size_and_only_inside_the_range(s, tolerance):
    """ratio_at is never called twice for a size, nor outside [lo, hi]; evaluated lists every call."""
    result, calls = run_search(s, tolerance)
    assert len(calls) == len(set(calls))
    assert all(s.lo <= n <= s.hi for n in calls)
    assert [n for n, _ in result['evaluated']] == calls
    assert all(r == s.curve(n) for n, r in result['evaluated'])


@given(searches(STEPS))
def test_find_emm_exact_search_is_logarithmic(s):
    """Exact search: <= ceil(log2(hi/lo)) + 1 doublings and ceil(log2((hi - lo)/step)) bisections."""
    result, calls = run_search(s)
    doublings = math.ceil(math.log2(s.hi / s.lo)) + 1
    bisections = math.ceil(math.log2(max(1, (s.hi - s.lo) / s.step)))
    bound = doublings + bisections
    assert len(calls) <= bound


@given(searches(STEPS), TOLERANCES)
def test_find_emm_with_tolerance_costs_log_of_range_and_tolerance(s, tolerance):
    """With tolerance > 0 the cost is O(log(hi/lo)): <= 2 ceil(log2 hi/lo) + ceil(log2 1/tol) + 3."""
    _, calls = run_search(s, tolerance)
    bound = 2 * math.ceil(math.log2(s.hi / s.lo)) + math.ceil(math.log2(1 / tolerance)) + 3
    assert len(calls) <= bound


@given(searches(STEPS), st.data())
def test_find_emm_never_evaluates_known_sizes(s, data):
    """Sizes in `known` are never passed to ratio_at, and knowing them does not change the answer."""
    grid = range(-(-s.lo // s.step) * s.step, s.hi + 1, s.step)
    sizes = data.draw(st.lists(st.sampled_from(grid), max_size=8, unique=True))
    known = {n: s.curve(n) for n in sizes}
    plain, _ = run_search(s)
    result, calls = run_search(s, known=dict(known))
    assert not set(calls) & set(known)
    assert (result['emm'], result['crossing'], result['status']) == \
        (plain['emm'], plain['crossing'], plain['status'])


@given(searches(STEPS), st.sampled_from([0.0, 0.2]))
def test_find_emm_crossing_interpolates_between_emm_and_first_failing_size(s, tolerance):
    """The crossing interpolates the ratio linearly between emm and the first failing size."""
    result, _ = run_search(s, tolerance)
    assume(result['status'] == 'bracketed')
    thr, emm = s.curve.threshold, result['emm']
    fail = first_failing(result, thr)
    assert emm < fail
    rp, rf = s.curve(emm), s.curve(fail)
    assert emm <= result['crossing'] <= fail
    assert result['crossing'] == pytest.approx(emm + (rp - thr) / (rp - rf) * (fail - emm))


@given(searches(STEPS))
def test_find_emm_with_step_evaluates_only_multiples(s):
    """With step=k every evaluated size is a multiple of k; emm is the largest passing multiple."""
    result, calls = run_search(s)
    assert all(n % s.step == 0 for n in calls)
    assert result['emm'] == s.expected_emm()


def test_find_emm_range_without_a_multiple_of_step_is_an_error():
    """A range [lo, hi] that holds no multiple of step is rejected before ratio_at is called."""
    ratio_at = Counting(lambda n: 1.0)
    with pytest.raises(ValueError):
        memdiff.find_emm(ratio_at, 5, 7, step=4)
    assert ratio_at.calls == []


@given(searches(STEPS), TOLERANCES)
def test_find_emm_tolerance_stops_early_with_a_valid_bracket(s, tolerance):
    """tolerance > 0 evaluates a prefix of the exact search; its bracket holds the true EMM and is
    one step wide or at most tolerance * emm wide."""
    exact, exact_calls = run_search(s)
    result, calls = run_search(s, tolerance)
    assert calls == exact_calls[:len(calls)]
    if exact['status'] != 'bracketed':
        assert result['emm'] == exact['emm'] and result['status'] == exact['status']
        return
    assert result['status'] == 'bracketed'
    emm, fail = result['emm'], first_failing(result, s.curve.threshold)
    assert emm <= exact['emm'] < fail
    assert fail - emm <= s.step or fail - emm <= tolerance * emm


INVALID_RANGES = st.one_of(
    st.tuples(st.integers(2, 100), st.integers(1, 100)).filter(lambda t: t[0] > t[1])
    .map(lambda t: (t[0], t[1], 1)),                                            # lo > hi
    st.tuples(st.integers(1, 50), st.integers(1, 50)).map(lambda t: (t[0], t[0] + 10, t[0] + t[1])),
    st.integers(-5, 0).map(lambda lo: (lo, 10, 1)),                             # lo < 1
    st.integers(-3, 0).map(lambda step: (4, 10, step)),                         # step < 1
)


@given(INVALID_RANGES)
def test_find_emm_rejects_invalid_arguments(args):
    """lo > hi, step > lo, lo < 1 or step < 1 raise ValueError before ratio_at is called."""
    lo, hi, step = args
    ratio_at = Counting(lambda n: 1.0)
    with pytest.raises(ValueError):
        memdiff.find_emm(ratio_at, lo, hi, step=step)
    assert ratio_at.calls == []


@given(searches(STEPS), st.sampled_from([0.0, 0.3]))
def test_find_emm_agrees_with_summarize_of_its_evaluations(s, tolerance):
    """summarize() of the evaluated sizes gives the search's emm and crossing."""
    result, _ = run_search(s, tolerance)
    points = [dict(size=n, ratio=r) for n, r in result['evaluated']]
    summary = memdiff.summarize(points, s.curve.threshold)
    assert summary['emm'] == result['emm']
    assert summary['crossing'] == pytest.approx(result['crossing'])

#----------------------------------------------------------------------------
# summarize

@given(POINT_SIZES, st.data(), THRESHOLDS)
def test_summarize_emm_is_largest_passing_size(sizes, data, threshold):
    """emm is the largest measured size that passes (curves need not be monotone); the crossing is
    interpolated to the next measured size above it, which fails."""
    ratios = data.draw(st.lists(RATIOS, min_size=len(sizes), max_size=len(sizes)))
    points = [dict(size=n, ratio=r) for n, r in zip(sizes, ratios)]
    summary = memdiff.summarize(points, threshold)
    passing = [n for n, r in zip(sizes, ratios) if r >= threshold]
    assert summary['emm'] == (max(passing) if passing else None)
    above = sorted(n for n in sizes if passing and n > max(passing))
    if not above:
        assert summary['crossing'] is None
        return
    emm, nxt = max(passing), above[0]
    at = dict(zip(sizes, ratios))
    rp, rf = at[emm], at[nxt]
    assert emm <= summary['crossing'] <= nxt
    assert summary['crossing'] == pytest.approx(emm + (rp - threshold) / (rp - rf) * (nxt - emm))


@given(POINT_SIZES, st.data(), THRESHOLDS, SEEDS)
def test_summarize_ignores_point_order(sizes, data, threshold, seed):
    """Permuting the points leaves the summary unchanged."""
    ratios = data.draw(st.lists(RATIOS, min_size=len(sizes), max_size=len(sizes)))
    points = [dict(size=n, ratio=r) for n, r in zip(sizes, ratios)]
    perm = torch.randperm(len(points), generator=torch.Generator().manual_seed(seed)).tolist()
    assert memdiff.summarize([points[i] for i in perm], threshold) == \
        memdiff.summarize(points, threshold)

#----------------------------------------------------------------------------
# Training durations and subsets

@given(DURATION_SIZES, EPOCHS, BATCHES)
def test_total_steps_in_epochs_scale_with_size(n, epochs, batch):
    """In epochs mode the step count is ceil(epochs * n / batch): non-decreasing in n, at least 1."""
    cfg = memdiff.TrainConfig(epochs=epochs, batch=batch)
    total = cfg.total_steps(n)
    assert total == max(1, math.ceil(epochs * n / batch))
    assert cfg.total_steps(2 * n) >= total
    assert cfg.total_steps(2 * n) <= 2 * total


@given(DURATION_SIZES, TOTAL_STEPS)
def test_total_steps_without_epochs_ignore_size(n, steps):
    """In steps mode the duration is the fixed step count, whatever the training-set size."""
    assert memdiff.TrainConfig(steps=steps).total_steps(n) == steps


@given(TOTAL_STEPS, SNAPSHOT_COUNTS)
def test_snapshot_steps_are_ascending_unique_and_end_at_the_final_step(steps, snapshots):
    """Snapshot steps ascend strictly within [1, total], end at the final step, and number at most
    the snapshots asked for."""
    cfg = memdiff.TrainConfig(steps=steps, snapshots=snapshots)
    snaps = cfg.snapshot_steps(10)
    assert snaps == sorted(set(snaps))
    assert snaps[-1] == steps and snaps[0] >= 1
    assert 1 <= len(snaps) <= snapshots


@given(st.integers(1, 2000), st.floats(0.01, 100.0), BATCHES, SNAPSHOT_IMAGES)  # <= 2e5 steps
def test_snapshot_steps_by_images_are_multiples_of_the_interval(n, epochs, batch, images):
    """With snapshot_images, every snapshot but the final one falls on a multiple of the interval."""
    cfg = memdiff.TrainConfig(epochs=epochs, batch=batch, snapshot_images=images)
    snaps, total = cfg.snapshot_steps(n), cfg.total_steps(n)
    every = math.ceil(images / batch)
    assert snaps == sorted(set(snaps)) and snaps[-1] == total
    assert all(s % every == 0 and s < total for s in snaps[:-1])


@given(SUBSET_SIZES, SUBSET_SIZES, SEEDS)
def test_balanced_subset_is_nested(n1, n2, seed):
    """The subset of the smaller size lies inside the subset of the larger one (same seed)."""
    labels = DIGIT_LABELS
    small, large = sorted((n1, n2))
    a = set(memdiff.balanced_subset(labels, small, seed).tolist())
    b = set(memdiff.balanced_subset(labels, large, seed).tolist())
    assert len(a) == small and len(b) == large and a <= b


#----------------------------------------------------------------------------
# Training loop (tiny: 8 channels, one level, batch 8, a handful of steps)

TINY_TRAIN = memdiff.TrainConfig(steps=6, batch=8, snapshots=3)


def tiny_network(dropout=0.0, init_seed=0):
    torch.manual_seed(init_seed)
    cfg = memdiff.EMMConfig(channels=8, channel_mult=(1,), attn=(), dropout=dropout)
    return memdiff.build_network(cfg, (1, 8, 8), 0)


def tiny_images(n=8):
    images, labels = memdiff.load_dataset('digits')
    return images[memdiff.balanced_subset(labels, n)]


def snapshots_of(precond, images, cfg, seed, checkpoint=None, stop_after=None, global_seed=0):
    """[(step, EMA state dict copy)] from train(); stop after that many snapshots (an interrupt).
    torch's global seed is set first, as measure() does, so dropout masks are seeded too."""
    torch.manual_seed(global_seed)
    out = []
    for step, ema in memdiff.train(precond, images, None, cfg, seed=seed, checkpoint=checkpoint):
        out.append((step, {k: v.clone() for k, v in ema.state_dict().items()}))
        if stop_after is not None and len(out) == stop_after:
            break
    return out


def max_difference(a, b):
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.mark.slow
def test_train_yields_ema_at_every_snapshot_step():
    """train() yields (step, EMA network) exactly at the configured snapshot steps."""
    y = tiny_images()
    snaps = snapshots_of(tiny_network(), y, TINY_TRAIN, seed=0)
    assert [s for s, _ in snaps] == TINY_TRAIN.snapshot_steps(len(y))


@pytest.mark.slow
def test_train_same_seed_gives_identical_ema():
    """Two runs from the same initial network and seed end with bit-identical EMA weights."""
    y, net = tiny_images(), tiny_network()
    a = snapshots_of(copy.deepcopy(net), y, TINY_TRAIN, seed=5)
    b = snapshots_of(copy.deepcopy(net), y, TINY_TRAIN, seed=5)
    c = snapshots_of(copy.deepcopy(net), y, TINY_TRAIN, seed=6)
    for (sa, ea), (sb, eb) in zip(a, b):
        assert sa == sb and max_difference(ea, eb) == 0
    assert max_difference(a[-1][1], c[-1][1]) > 0               # the seed matters


def check_resume_is_exact(tmp_path, dropout):
    y, net = tiny_images(), tiny_network(dropout)
    whole = snapshots_of(copy.deepcopy(net), y, TINY_TRAIN, seed=1)
    ckpt = str(tmp_path / 'state.pt')
    # Stopped while the second snapshot is in the caller's hands: only the first is saved (a
    # snapshot's state is saved once the caller asks for the next one), so the second is redone.
    first = snapshots_of(copy.deepcopy(net), y, TINY_TRAIN, seed=1, checkpoint=ckpt, stop_after=2)
    # A new process: a differently initialised network, the state comes from the checkpoint.
    rest = snapshots_of(tiny_network(dropout, init_seed=99), y, TINY_TRAIN, seed=1, checkpoint=ckpt)
    assert [s for s, _ in first] == [s for s, _ in whole][:2]
    assert [s for s, _ in rest] == [s for s, _ in whole][1:]
    assert max_difference(first[1][1], rest[0][1]) == 0.0
    resumed = first[:1] + rest
    diffs = [max_difference(a, b) for (_, a), (_, b) in zip(whole, resumed)]
    assert diffs == [0.0] * len(whole), f'max |EMA difference| per snapshot: {diffs}'


@pytest.mark.slow
def test_train_resume_after_interrupt_is_exact(tmp_path):
    """Stopping during a snapshot and resuming from the checkpoint gives the EMA weights of an
    uninterrupted run, bit for bit."""
    check_resume_is_exact(tmp_path, dropout=0.0)


@pytest.mark.slow
def test_train_resume_after_interrupt_is_exact_with_dropout(tmp_path):
    """With dropout (the paper preset uses 0.13) resuming is exact too."""
    check_resume_is_exact(tmp_path, dropout=0.5)

#----------------------------------------------------------------------------
# One |D| measurement

TINY_MEASURE = memdiff.EMMConfig(channels=8, train=memdiff.TrainConfig(steps=4, batch=8, snapshots=2),
                                 samples=16, num_steps=3)


def check_point(point, samples, y, cfg, n):
    assert point['size'] == n
    assert set(point) >= {'size', 'ratio', 'ci', 'best_step', 'snapshots'}
    best = max(s['ratio'] for s in point['snapshots'])
    assert point['ratio'] == best
    assert point['best_step'] == next(s['step'] for s in point['snapshots'] if s['ratio'] == best)
    for s in point['snapshots']:
        k = round(s['ratio'] * cfg.samples)
        assert s['ratio'] == k / cfg.samples
        assert s['ci'] == pytest.approx(list(memdiff.wilson_interval(k, cfg.samples)))
    assert samples.shape == (cfg.samples, *y.shape[1:])
    assert y.shape[0] == n
    assert torch.equal(y, memdiff.training_set(*memdiff.load_dataset('digits'), n, cfg)[0])
    # The returned samples are those of the best snapshot: rescoring them gives the point's ratio.
    assert memdiff.score(samples, y, cfg.mem_threshold)[0]['ratio'] == point['ratio']


def test_measure_optimum_scores_one_snapshot_and_memorizes():
    """The closed-form optimum gives one snapshot (step 0) that memorizes every sample."""
    cfg = memdiff.EMMConfig(optimum=True, samples=16, num_steps=3)
    images, labels = memdiff.load_dataset('digits')
    point, samples, y = memdiff.measure(images, labels, 24, cfg)
    check_point(point, samples, y, cfg, 24)
    assert [s['step'] for s in point['snapshots']] == [0]
    assert point['ratio'] == 1.0


@pytest.mark.slow
def test_measure_trained_keeps_the_best_snapshot(tmp_path):
    """A trained measurement has one entry per snapshot step; its ratio is the best of them."""
    images, labels = memdiff.load_dataset('digits')
    point, samples, y = memdiff.measure(images, labels, 16, TINY_MEASURE, workdir=tmp_path)
    assert [s['step'] for s in point['snapshots']] == TINY_MEASURE.train.snapshot_steps(16)
    check_point(point, samples, y, TINY_MEASURE, 16)


class Interrupt:
    """A progress callback that raises KeyboardInterrupt at the given (kind, count) event."""
    def __init__(self, kind, at, skip=0):
        self.kind, self.at, self.skip, self.fired = kind, at, skip, False

    def __call__(self, kind, done, total):
        if kind == self.kind and done == self.at and not self.fired:
            if self.skip:
                self.skip -= 1
                return
            self.fired = True
            raise KeyboardInterrupt


@pytest.mark.slow
def test_measure_is_reproducible_whatever_the_global_rng():
    """The same configuration gives the same point and samples, whatever torch's global RNG holds."""
    images, labels = memdiff.load_dataset('digits')
    torch.manual_seed(1)
    p1, x1, _ = memdiff.measure(images, labels, 16, TINY_MEASURE)
    torch.manual_seed(2)
    p2, x2, _ = memdiff.measure(images, labels, 16, TINY_MEASURE)
    assert p1 == p2
    assert torch.equal(x1, x2), f'max |sample difference| {(x1 - x2).abs().max().item():.3g}'


def measure_seeded(*args, **kwargs):
    """measure() with torch's global RNG seeded first: the network's initial weights are drawn from it
    (see test_measure_is_reproducible_whatever_the_global_rng), which these resume tests set aside."""
    torch.manual_seed(7)
    return memdiff.measure(*args, **kwargs)


@pytest.mark.slow
def test_measure_resumed_after_interrupt_in_training_equals_uninterrupted(tmp_path):
    """Interrupted between snapshots and rerun with the same workdir, measure() gives the point and
    samples of an uninterrupted run."""
    images, labels = memdiff.load_dataset('digits')
    (tmp_path / 'a').mkdir(), (tmp_path / 'b').mkdir()
    clean, x_clean, _ = measure_seeded(images, labels, 16, TINY_MEASURE, workdir=tmp_path / 'a')
    with pytest.raises(KeyboardInterrupt):                   # after snapshot 2, during step 3
        measure_seeded(images, labels, 16, TINY_MEASURE, workdir=tmp_path / 'b',
                       progress=Interrupt('train', 3))
    resumed, x_resumed, _ = measure_seeded(images, labels, 16, TINY_MEASURE, workdir=tmp_path / 'b')
    assert resumed == clean
    assert torch.equal(x_resumed, x_clean)


@pytest.mark.slow
def test_measure_resumed_after_interrupt_in_sampling_keeps_every_snapshot(tmp_path):
    """Interrupted while sampling the last snapshot and rerun, measure() scores every snapshot."""
    images, labels = memdiff.load_dataset('digits')
    (tmp_path / 'a').mkdir(), (tmp_path / 'b').mkdir()
    clean, x_clean, _ = measure_seeded(images, labels, 16, TINY_MEASURE, workdir=tmp_path / 'a')
    with pytest.raises(KeyboardInterrupt):                   # the second snapshot's sampling
        measure_seeded(images, labels, 16, TINY_MEASURE, workdir=tmp_path / 'b',
                       progress=Interrupt('sample', 2, skip=1))
    resumed, x_resumed, _ = measure_seeded(images, labels, 16, TINY_MEASURE, workdir=tmp_path / 'b')
    assert [s['step'] for s in resumed['snapshots']] == TINY_MEASURE.train.snapshot_steps(16)
    assert resumed == clean
    assert torch.equal(x_resumed, x_clean)
