"""Parallel sizes in the search (run_emm --workers): the same sizes, in the same order, with the same
points as a sequential run; the frontier of sizes the search may ask for next."""

import functools
import json

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

import memdiff
import run_emm

# Strategies: small ranges for speed (a search over a few hundred sizes takes microseconds).
MS = st.integers(1, 300)                                    # the largest passing size
LOS = st.integers(1, 40)
SPANS = st.integers(0, 300)
STEPS = st.integers(1, 4)
TOLERANCES = st.sampled_from([0.0, 0.1, 0.35])


def ratio(m, n):
    """A synthetic ratio that passes (0.9) exactly up to size m and fails (0.5) above it."""
    return 0.9 if n <= m else 0.5


def synthetic_point(m, n):
    """What measure_size returns, for the synthetic ratio: (point, samples)."""
    return dict(size=n, ratio=ratio(m, n)), None


@given(m=MS, lo=LOS, span=SPANS, step=STEPS, tolerance=TOLERANCES)
def test_the_frontier_opens_with_the_size_the_search_asks_next(m, lo, span, step, tolerance):
    """Before each size find_emm asks for, search_frontier (given the ratios so far) lists that size
    first, and the frontier of the start holds every size the search will ask for."""
    lo, hi = lo * step, lo * step + span
    asked = memdiff.find_emm(functools.partial(ratio, m), lo, hi, 0.9, step, tolerance)['evaluated']
    first = run_emm.search_frontier({}, lo, hi, 0.9, step, tolerance, limit=10_000)
    assert {n for n, _ in asked} <= set(first)
    for k, (n, _) in enumerate(asked):
        known = dict(asked[:k])
        assert run_emm.search_frontier(known, lo, hi, 0.9, step, tolerance)[0] == n
    known = dict(asked)
    assert run_emm.search_frontier(known, lo, hi, 0.9, step, tolerance) == []


@pytest.mark.slow                                           # spawns a process per size
@pytest.mark.parametrize('workers', [2, 3])
def test_a_prefetching_search_asks_for_the_sequential_sizes(workers):
    """find_emm through Prefetch (sizes measured ahead in worker processes) asks for the same sizes
    in the same order and gets the same ratios as a sequential search; speculative sizes that turn
    out unreachable are stopped."""
    m, lo, hi = 40, 16, 64                                  # doubles 16, 32, 64, then bisects
    sequential = memdiff.find_emm(functools.partial(ratio, m), lo, hi, 0.9, 1, 0.1)
    run = functools.partial(synthetic_point, m)

    def frontier(known):
        return run_emm.search_frontier(known, lo, hi, 0.9, 1, 0.1)
    prefetch = run_emm.Prefetch(run, workers, frontier)
    try:
        parallel = memdiff.find_emm(lambda n: prefetch(n)[0]['ratio'], lo, hi, 0.9, 1, 0.1)
    finally:
        prefetch.close()
    assert parallel == sequential
    assert not prefetch.running


@pytest.mark.slow
@pytest.mark.parametrize('search', [['--max-size', 64], ['--sizes', '16,48,32']])
def test_parallel_and_sequential_runs_write_the_same_record(tmp_path, search):
    """run_emm --workers 2 writes the record of --workers 1: the same sizes, in the same order, the
    same points (the closed-form optimum, so it is quick)."""
    records = []
    for workers in (1, 2):
        out = tmp_path / f'w{workers}'
        args = ['--optimum', '--samples', 20, '--sampler-steps', 2, '--outdir', out,
                '--workers', workers, *search]
        result = CliRunner().invoke(run_emm.main, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        record = json.loads((out / 'results.json').read_text())
        record.pop('versions')
        records.append(record)
    assert records[0] == records[1]


def test_workers_are_refused_under_torchrun_or_on_a_gpu(tmp_path):
    """--workers above 1 is for CPU processes: on another device it is an error that says so."""
    import torch
    with pytest.raises(ValueError, match='--workers'):
        run_emm.emm_search(memdiff.EMMConfig(optimum=True), tmp_path, (torch.zeros(4, 1, 2, 2),
                           None), sizes=[2], lo=2, hi=4, device=torch.device('meta'), workers=2)
