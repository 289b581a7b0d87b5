"""The EMM definition and its search: find_emm against brute force on synthetic curves, summarize."""

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


@given(searches(STEPS), st.sampled_from([0.0, 0.1, 0.35]))
def test_find_emm_doubles_from_lo_then_bisects_only_a_bracket_wider_than_its_tolerance(s, tolerance):
    """The search asks lo, 2 lo, 4 lo, ... (capped at hi) until a size fails; after that each size
    it asks bisects a bracket wider than one step and than tolerance * its passing end."""
    result, calls = run_search(s, tolerance)
    lo, hi = math.ceil(s.lo / s.step) * s.step, s.hi // s.step * s.step
    passing, failing, n = None, None, lo
    for k, (size, ratio) in enumerate(result['evaluated']):
        if failing is None and (passing is None or passing < hi):        # the doubling phase
            assert size == n
            n = min(2 * n, hi)
        else:
            assert passing < size < failing
            assert failing - passing > s.step and failing - passing > tolerance * passing
        if ratio >= s.curve.threshold:
            passing = size
        else:
            failing = size
    if passing is not None and failing is not None:                    # stopped: narrow enough
        assert failing - passing <= s.step or failing - passing <= tolerance * passing or \
            (passing + failing) // 2 // s.step * s.step <= passing


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


def test_emm_defaults_are_the_papers():
    """EMM_eps with eps = 0.1: find_emm and summarize cut at 0.9; EMMConfig's measurement defaults."""
    import inspect
    default = lambda fn, name: inspect.signature(fn).parameters[name].default
    assert default(memdiff.find_emm, 'threshold') == default(memdiff.summarize, 'threshold') == 0.9
    assert (default(memdiff.find_emm, 'step'), default(memdiff.find_emm, 'tolerance')) == (1, 0.0)
    assert default(memdiff.score, 'mem_threshold') == 1 / 3
    assert default(memdiff.generate, 'num_steps') == 18
    assert default(memdiff.nearest_neighbors, 'k') == 2          # d1 and d2
    # The onset law: the same cut, and the bootstrap of 1,000 replicates the README states.
    assert (default(memdiff.tau_law, 'threshold'), default(memdiff.tau_law, 'replicates')) == (0.9, 1000)
    assert default(memdiff.tau_mem, 'threshold') == 0.9
    cfg = memdiff.EMMConfig()
    assert (cfg.threshold, cfg.mem_threshold, cfg.num_steps, cfg.samples) == (0.9, 1 / 3, 18, 1000)
    assert (cfg.data, cfg.labels, cfg.arch, cfg.model_channels, cfg.channel_mult, cfg.num_blocks,
            cfg.attn_resolutions, cfg.dropout, cfg.optimum, cfg.seed) == (
        'digits', 'none', 'ddpmpp', 16, (1, 2), 1, None, 0.0, False, 0)
    # A ratio of exactly 0.9 passes (>=), just under fails: at the default and at any threshold.
    for threshold, kwargs in [(0.9, {}), (0.75, dict(threshold=0.75))]:
        ratio_at = lambda n: 1.0 if n < 16 else threshold if n == 16 else threshold - 1e-9
        assert memdiff.find_emm(ratio_at, 8, 64, **kwargs)['emm'] == 16
        curve = {n: ratio_at(n) for n in [8, 16, 32, 64]}
        points = [dict(size=n, ratio=r) for n, r in curve.items()]
        assert memdiff.summarize(points, **kwargs)['emm'] == 16


@given(searches(STEPS), st.sampled_from([0.0, 0.2]))
def test_find_emm_sizes_are_whole_numbers(s, tolerance):
    """Every size find_emm evaluates, and the EMM, is a Python int (a data set size, not 24.0)."""
    result, calls = run_search(s, tolerance)
    assert all(type(n) is int for n, _ in result['evaluated']) and all(type(n) is int for n in calls)
    assert result['emm'] is None or type(result['emm']) is int
