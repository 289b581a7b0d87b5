"""Memorization over training time (section 9): tau_mem per size, the law tau_mem = a |D|^b across
sizes with its bootstrap interval."""

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, example, given
from hypothesis import strategies as st

import memdiff

# Strategies. Bounds are small for speed: a few snapshots, a few sizes.
SEEDS = st.integers(0, 2**31 - 1)
THRESHOLDS = st.floats(0.05, 1.0)
RATIO_LISTS = st.lists(st.floats(0.0, 1.0), min_size=1, max_size=10)
FIRST_STEPS = st.integers(1, 100)
GROWTHS = st.floats(1.1, 10.0)                               # step ratio between snapshots
EXPONENTS = st.floats(0.3, 2.0)
PREFACTORS = st.floats(1.0, 500.0)
DIGITS = memdiff.load_dataset('digits')


def log_linear(steps, a, b):
    """Snapshots of the ratio a + b log(step), clipped to [0, 1]."""
    return [dict(step=s, ratio=min(1.0, max(0.0, a + b * math.log(s)))) for s in steps]


def geometric(first, growth, count):
    return sorted({round(first * growth ** k) for k in range(count)})

#----------------------------------------------------------------------------
# tau_mem of one size

@given(FIRST_STEPS, GROWTHS, st.floats(0.01, 0.3), THRESHOLDS)
def test_tau_mem_is_exact_on_a_log_linear_curve(first, growth, b, threshold):
    """On ratio = a + b log(step) the interpolation in log-step returns exp((threshold - a) / b)."""
    steps = geometric(first, growth, 8)
    assume(len(steps) >= 3)
    tau_true = math.sqrt(steps[1] * steps[2])               # inside the second bracket
    a = threshold - b * math.log(tau_true)
    assume(0 <= a + b * math.log(steps[1]) and a + b * math.log(steps[2]) <= 1)  # not clipped
    tau, bracket = memdiff.tau_mem(log_linear(steps, a, b), threshold)
    assert bracket == [steps[1], steps[2]]
    assert tau == pytest.approx(tau_true, rel=1e-9)


def test_tau_mem_by_hand():
    """Ratio 0.5 at step 10, 1.0 at step 1000: 0.9 is reached at 10^(1 + 0.8 * 2) steps."""
    snaps = [dict(step=1000, ratio=1.0), dict(step=10, ratio=0.5), dict(step=1, ratio=0.0)]
    tau, bracket = memdiff.tau_mem(snaps, 0.9)
    assert bracket == [10, 1000] and tau == pytest.approx(10 ** 2.6)
    # From step 1 (log 1 = 0) as from any step > 0: ratio 0.5 at 1, 1.0 at 100 -> 100^0.8.
    tau, bracket = memdiff.tau_mem([dict(step=1, ratio=0.5), dict(step=100, ratio=1.0)], 0.9)
    assert bracket == [1, 100] and tau == pytest.approx(100 ** 0.8)


@given(st.lists(st.floats(0.0, 0.89), min_size=1, max_size=10))
def test_tau_mem_is_null_when_the_threshold_is_never_reached(ratios):
    """No snapshot at or above the threshold: tau_mem and its bracket are None."""
    snaps = [dict(step=10 * (k + 1), ratio=r) for k, r in enumerate(ratios)]
    assert memdiff.tau_mem(snaps, 0.9) == (None, None)


@given(st.integers(1, 10_000), st.floats(0.9, 1.0))
def test_tau_mem_passing_at_the_first_snapshot_is_that_step_bracketed_from_zero(step, ratio):
    """A first snapshot that already memorizes gives its own step, bracket [0, step]."""
    snaps = [dict(step=step, ratio=ratio), dict(step=2 * step, ratio=0.0)]
    assert memdiff.tau_mem(snaps, 0.9) == (float(step), [0, step])


@given(st.integers(1, 10_000), st.floats(0.9, 1.0), st.floats(0.0, 0.89))
def test_tau_mem_after_a_snapshot_at_step_zero_is_the_next_step_bracketed_from_zero(step, ratio, r0):
    """A snapshot at step 0 (the initial network, as a score of step 0 records it) below the
    threshold, then one that passes: no log-step to interpolate from, so tau is that step, an upper
    bound bracketed by [0, step]."""
    snaps = [dict(step=0, ratio=r0), dict(step=step, ratio=ratio), dict(step=2 * step, ratio=1.0)]
    assert memdiff.tau_mem(snaps, 0.9) == (float(step), [0, step])


@given(RATIO_LISTS, FIRST_STEPS, GROWTHS, THRESHOLDS, THRESHOLDS)
@example([0.0, 0.0, 1.0], 1, 3.0, 1.0, 1.0)            # reached exactly at step 11: exp(log) gave 11 + 2e-15
def test_tau_mem_is_monotone_in_the_threshold(ratios, first, growth, t1, t2):
    """A higher threshold is reached no earlier, on any curve (monotone or not)."""
    steps = [round(first * growth ** k) + k for k in range(len(ratios))]  # strictly increasing
    snaps = [dict(step=s, ratio=r) for s, r in zip(steps, ratios)]
    lo, hi = sorted((t1, t2))
    tau_lo, tau_hi = memdiff.tau_mem(snaps, lo)[0], memdiff.tau_mem(snaps, hi)[0]
    if tau_hi is not None:
        assert tau_lo is not None and tau_lo <= tau_hi * (1 + 1e-12)
    if tau_lo is not None:
        assert steps[0] <= tau_lo <= steps[-1]

#----------------------------------------------------------------------------
# The law across sizes

def law_points(sizes, a, b, slope=0.1, steps=None):
    """Points whose log-linear snapshot curves reach 0.9 exactly at tau = a n^b (unclipped within
    a factor 2 of tau at this slope)."""
    steps = steps or [2 ** k for k in range(0, 28)]
    points = []
    for n in sizes:
        tau = a * n ** b
        snaps = log_linear(steps, 0.9 - slope * math.log(tau), slope)
        points.append(dict(size=n, snapshots=snaps, tau_mem=memdiff.tau_mem(snaps)[0]))
    return points


@given(PREFACTORS, EXPONENTS)
def test_fit_recovers_a_planted_exponent_without_noise(a, b):
    """tau_mem exactly a n^b: least squares in log-log returns a and b."""
    sizes = [16, 32, 64, 128]
    a_fit, b_fit = memdiff.fit_power_law(sizes, [a * n ** b for n in sizes])
    assert b_fit == pytest.approx(b, rel=1e-9) and a_fit == pytest.approx(a, rel=1e-9)
    points = law_points(sizes, a, b)
    law = memdiff.tau_law(points, samples=10**9, replicates=20,
                          generator=torch.Generator().manual_seed(0))
    assert law['sizes'] == sizes
    assert law['exponent'] == pytest.approx(b, rel=1e-6)
    assert law['prefactor'] == pytest.approx(a, rel=1e-5)


def test_bootstrap_interval_covers_the_planted_exponent_under_binomial_noise():
    """Snapshot ratios drawn as Binomial(200, ratio) / 200 around tau = 40 n: the 95% interval of
    the fitted exponent covers 1 (seeded)."""
    g = torch.Generator().manual_seed(1)
    points = []
    for n in (16, 32, 64, 128):
        snaps = law_points([n], 40, 1.0, steps=[30 * 2 ** k for k in range(10)])[0]['snapshots']
        for s in snaps:
            s['ratio'] = torch.binomial(torch.tensor(200.), torch.tensor(s['ratio']),
                                        generator=g).item() / 200
        points.append(dict(size=n, snapshots=snaps, tau_mem=memdiff.tau_mem(snaps)[0]))
    law = memdiff.tau_law(points, samples=200, replicates=500, generator=torch.Generator().manual_seed(0))
    assert law['ci'][0] <= 1.0 <= law['ci'][1]
    assert law['ci'][0] <= law['exponent'] <= law['ci'][1]
    assert law['replicates'] == 500


def test_law_needs_two_sizes_with_tau_mem():
    """One size with tau_mem (the others never memorize, or the optimum's step 0) gives None."""
    points = law_points([16], 40, 1.0) + [dict(size=32, snapshots=[], tau_mem=None),
                                          dict(size=64, snapshots=[], tau_mem=0.0)]
    assert memdiff.tau_law(points, samples=100) is None


def test_law_leaves_out_sizes_whose_tau_mem_is_only_an_upper_bound():
    """A size that already passes at its first snapshot has tau_mem = that step, bracket [0, step]:
    an upper bound. The law is fitted on the bracketed sizes only, so it is the planted one."""
    points = law_points([32, 64, 128], 40, 1.0)
    early = [dict(step=1000, ratio=1.0), dict(step=2000, ratio=1.0)]      # passes at once
    points.append(dict(size=16, snapshots=early, tau_mem=memdiff.tau_mem(early)[0]))
    law = memdiff.tau_law(points, samples=10**9, replicates=10,
                          generator=torch.Generator().manual_seed(0))
    assert law['sizes'] == [32, 64, 128] and law['exponent'] == pytest.approx(1.0, rel=1e-6)
    assert memdiff.tau_law(points[:1] + points[3:], samples=100) is None   # one bracketed size
    # A snapshot at step 1 below the threshold brackets an onset as well as any other.
    tight = [dict(step=1, ratio=0.0), dict(step=100, ratio=1.0)]
    law = memdiff.tau_law(points[:1] + [dict(size=8, snapshots=tight, tau_mem=memdiff.tau_mem(tight)[0])],
                          samples=100, replicates=10, generator=torch.Generator().manual_seed(0))
    assert law['sizes'] == [32, 8]


def test_law_interval_is_the_bootstrap_quantiles_and_two_sizes_suffice():
    """With exactly two bracketed sizes the law is fitted, and its interval is the 2.5% and 97.5%
    quantiles of the exponents refitted on the binomial redraws, redone here by hand."""
    points = law_points([16, 64], 40, 1.0, steps=[30 * 2 ** k for k in range(10)])
    for p in points:
        for s in p['snapshots']:
            s['ratio'] = round(s['ratio'] * 100) / 100
        p['tau_mem'] = memdiff.tau_mem(p['snapshots'])[0]
    R, samples = 200, 100
    law = memdiff.tau_law(points, samples, replicates=R, generator=torch.Generator().manual_seed(5))
    g, redrawn = torch.Generator().manual_seed(5), []
    for p in points:
        prob = torch.tensor([s['ratio'] for s in p['snapshots']], dtype=torch.float64)
        redrawn.append(torch.binomial(torch.full((R, len(prob)), float(samples), dtype=torch.float64),
                                      prob.expand(R, -1), generator=g) / samples)
    exponents = []
    for r in range(R):
        taus = [memdiff.tau_mem([dict(step=s['step'], ratio=q)
                                 for s, q in zip(p['snapshots'], ratios[r].tolist())])
                for p, ratios in zip(points, redrawn)]
        if all(t is not None and bracket[0] > 0 for t, bracket in taus):
            exponents.append(memdiff.fit_power_law([16, 64], [t for t, _ in taus])[1])
    assert law['replicates'] == len(exponents) > 0
    assert law['ci'] == pytest.approx([np.quantile(exponents, 0.025), np.quantile(exponents, 0.975)])


def test_law_is_reproducible_with_the_same_generator():
    """The same seed gives the same interval."""
    points = law_points([16, 32, 64], 40, 1.0)
    for p in points:
        for s in p['snapshots']:
            s['ratio'] = round(s['ratio'] * 50) / 50
        p['tau_mem'] = memdiff.tau_mem(p['snapshots'])[0]
    laws = [memdiff.tau_law(points, 50, replicates=50, generator=torch.Generator().manual_seed(3))
            for _ in range(2)]
    assert laws[0] == laws[1]
