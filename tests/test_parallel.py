"""Parallel sizes in the search (run_emm --workers): the same sizes, in the same order, with the same
points as a sequential run; the frontier of sizes the search may ask for next."""

import functools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
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


def synthetic_point(m, n, progress=None):
    """What measure_size returns, for the synthetic ratio: (point, samples), after reporting its
    training stage done (its size as the count, so the report names its sender)."""
    if progress is not None:
        progress('train', n, n)
    return dict(size=n, ratio=ratio(m, n)), None


def next_size(known, lo, hi, step, tolerance):
    """The size find_emm asks for next given the ratios known {n: ratio}, or None when it is done."""
    def ratio_at(n):
        raise run_emm._Ask(n)
    try:
        memdiff.find_emm(ratio_at, lo, hi, 0.9, step, tolerance, known)
    except run_emm._Ask as ask:
        return ask.n
    return None


@given(m=MS, lo=LOS, span=SPANS, step=STEPS, tolerance=TOLERANCES,
       guess=st.none() | st.integers(0, 400))
def test_the_frontier_opens_with_the_size_the_search_asks_next(m, lo, span, step, tolerance, guess):
    """Before each size find_emm asks for, search_frontier (given the ratios so far) lists that size
    first, then the size it asks after that under the predicted outcome; the frontier of the start
    holds every size the search will ask for, whatever the prediction."""
    lo, hi = lo * step, lo * step + span
    passes = None if guess is None else (lambda n: n <= guess)
    asked = memdiff.find_emm(functools.partial(ratio, m), lo, hi, 0.9, step, tolerance)['evaluated']
    first = run_emm.search_frontier({}, lo, hi, 0.9, step, tolerance, limit=10_000, passes=passes)
    assert {n for n, _ in asked} <= set(first)
    for k, (n, _) in enumerate(asked):
        known = dict(asked[:k])
        frontier = run_emm.search_frontier(known, lo, hi, 0.9, step, tolerance, passes=passes)
        assert frontier[0] == n
        outcomes = [0.9, 0.5] if passes is None or passes(n) else [0.5, 0.9]
        after = [next_size({**known, n: r}, lo, hi, step, tolerance) for r in outcomes]
        assert frontier[1:2] == [a for a in after if a is not None][:1]
    known = dict(asked)
    assert run_emm.search_frontier(known, lo, hi, 0.9, step, tolerance, passes=passes) == []


def onset_points(a, b, sizes, budget=1500, snapshots=3):
    """Points whose snapshots rise through 0.9 at step a n^b (log-linear between them, as tau_mem
    reads them), snapshots evenly spaced up to the budget."""
    points = []
    for n in sizes:
        tau = a * n ** b
        steps = [budget * (k + 1) // snapshots for k in range(snapshots)]
        ratios = [min(1.0, 0.9 + 0.1 * math.log(s / tau)) for s in steps]  # uncapped to e tau
        points.append(dict(size=n, ratio=max(ratios), snapshots=[
            dict(step=s, ratio=r) for s, r in zip(steps, ratios)]))
    return points


@given(a=st.floats(5, 100), b=st.floats(0.5, 1.5), n=st.integers(2, 10_000))
def test_the_onset_prediction_passes_a_size_whose_onset_law_comes_within_its_budget(a, b, n):
    """onset_prediction fits tau_mem = a n^b to the measured sizes and predicts a pass exactly when
    the law's onset comes within the size's training steps."""
    sizes = [s for s in (16, 32, 64) if 500 < a * s ** b < 1000]  # bracketed by the snapshots
    points = onset_points(a, b, sizes)
    passes = run_emm.onset_prediction(points, 0.9, lambda n: 1500)
    if len(sizes) < 2:
        assert passes is None
        return
    law = memdiff.tau_law(points, 1, 0.9, replicates=0)
    assert law['exponent'] == pytest.approx(b, rel=1e-6)
    assert passes(n) == (memdiff.tau_budget(law, n) <= 1500)


# The default run's snapshot ratios at steps 500, 1000 and 1500 (README, The command line).
DEFAULT_RUN = {16: [0.876, 0.995, 0.996], 32: [0.53, 0.908, 0.983], 40: [0.247, 0.738, 0.918],
               48: [0.117, 0.617, 0.872], 64: [0.019, 0.35, 0.643]}


class Replay:
    """Prefetch's interface in this process: each size asked gets the default run's point, and the
    frontier emm_search gives its workers is kept, with the size asked, in `frontiers`."""
    frontiers = []

    def __init__(self, run, workers, frontier, threads=1, progress=None):
        self.frontier, self.points = frontier, {}

    def __call__(self, n):
        Replay.frontiers.append((n, self.frontier(dict(self.points))))
        snaps = [dict(step=s, ratio=r, ci=[r, r]) for s, r in zip((500, 1000, 1500), DEFAULT_RUN[n])]
        self.points[n] = memdiff.best_point(n, snaps)
        return self.points[n], torch.zeros(64, 1, 8, 8)

    def close(self):
        pass


def test_a_resumed_search_speculates_with_the_law_of_its_recorded_sizes(tmp_path, monkeypatch):
    """emm_search hands its workers a frontier ordered by the onset law of every size measured so
    far, those of the record it resumes included: after 16 and 32 from an earlier run, 48 is
    measured beside 64."""
    monkeypatch.setattr(run_emm, 'Prefetch', Replay)
    monkeypatch.setattr(Replay, 'frontiers', [])
    cfg = memdiff.EMMConfig()
    data = run_emm.dataset(cfg.data, cfg.resolution, cfg.classes)
    run_emm.emm_search(cfg, tmp_path, data, sizes=[16, 32], workers=2, log=lambda *a: None)
    Replay.frontiers.clear()
    record = run_emm.emm_search(cfg, tmp_path, data, tolerance=0.35, workers=2, log=lambda *a: None)
    assert [n for n, _ in Replay.frontiers] == [64, 48, 40]
    assert Replay.frontiers[0][1][:2] == [64, 48]
    assert record['emm'] == 40


def test_the_default_search_speculates_on_its_bisection_after_two_passing_sizes():
    """With the default run's first two sizes (README: 16 and 32 pass, their onsets at 575 and 985
    of 1,500 steps), the law predicts that 64 fails, so a second worker measures 48 beside it, the
    size the search then asks for, instead of the next doubling, 128."""
    snaps = {16: [0.876, 0.995, 0.996], 32: [0.53, 0.908, 0.983]}
    points = [dict(size=n, ratio=r[-1], snapshots=[dict(step=s, ratio=q) for s, q in
                                                  zip((500, 1000, 1500), r)]) for n, r in snaps.items()]
    cfg = memdiff.EMMConfig()
    passes = run_emm.onset_prediction(points, 0.9, cfg.train.total_steps)
    known = {p['size']: p['ratio'] for p in points}
    assert run_emm.search_frontier(known, 16, 1740, 0.9, 1, 0.35, passes=passes)[:2] == [64, 48]
    assert run_emm.search_frontier(known, 16, 1740, 0.9, 1, 0.35)[:2] == [64, 128]


@pytest.mark.slow                                           # spawns a process per size
@pytest.mark.parametrize('workers, guess', [(2, None), (3, None), (2, 40), (2, 48)])
def test_a_prefetching_search_asks_for_the_sequential_sizes(workers, guess):
    """find_emm through Prefetch (sizes measured ahead in worker processes) asks for the same sizes
    in the same order and gets the same ratios as a sequential search, whether its speculation is
    ordered by a right prediction (40), a wrong one (48) or none; speculative sizes that turn out
    unreachable are stopped, and only the size waited for shows its progress."""
    m, lo, hi = 40, 16, 64                                  # doubles 16, 32, 64, then bisects
    sequential = memdiff.find_emm(functools.partial(ratio, m), lo, hi, 0.9, 1, 0.1)
    run = functools.partial(synthetic_point, m)

    def frontier(done):
        return run_emm.search_frontier({n: p['ratio'] for n, p in done.items()}, lo, hi, 0.9, 1, 0.1,
                                       passes=None if guess is None else lambda n: n <= guess)
    started = []

    class Counting(run_emm.Prefetch):
        def _start(self, n):
            started.append(n)
            super()._start(n)
    shown = []
    prefetch = Counting(run, workers, frontier, progress=lambda kind, done, total: shown.append(done))
    try:
        parallel = memdiff.find_emm(lambda n: prefetch(n)[0]['ratio'], lo, hi, 0.9, 1, 0.1)
    finally:
        prefetch.close()
    assert parallel == sequential
    assert not prefetch.running
    assert len(started) == len(set(started))                # no size measured twice
    # Progress is shown for the size the search waits for only, the first one always.
    asked = [n for n, _ in sequential['evaluated']]
    assert shown[0] == lo and shown == sorted(shown, key=asked.index)


TRAINING = ['--channels', 4, '--steps', 12, '--snapshots', 2, '--batch', 16]  # seconds a size


@pytest.mark.slow
@pytest.mark.parametrize('search', [['--optimum', '--max-size', 64],
                                    ['--optimum', '--sizes', '16,48,32'],
                                    [*TRAINING, '--sizes', '16,32']])
def test_parallel_and_sequential_runs_write_the_same_record(tmp_path, search):
    """run_emm --workers 2 writes the record of --workers 1 run on one thread, as each worker runs:
    the same sizes, in the same order, the same points to the last bit, for the closed-form optimum
    and for trained networks."""
    records = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                                # torch's sums depend on the thread count
    try:
        for workers in (1, 2):
            out = tmp_path / f'w{workers}'
            args = ['--samples', 20, '--sampler-steps', 2, '--outdir', out, '--workers', workers,
                    *search]
            result = CliRunner().invoke(run_emm.main, [str(a) for a in args])
            assert result.exit_code == 0, result.output
            record = json.loads((out / 'results.json').read_text())
            record.pop('versions')
            records.append(record)
    finally:
        torch.set_num_threads(threads)
    assert records[0] == records[1]


def test_workers_are_refused_under_torchrun_or_on_a_gpu(tmp_path):
    """--workers above 1 is for CPU processes: on another device it is an error that says so."""
    with pytest.raises(ValueError, match='--workers'):
        run_emm.emm_search(memdiff.EMMConfig(optimum=True), tmp_path, (torch.zeros(4, 1, 2, 2),
                           None), sizes=[2], lo=2, hi=4, device=torch.device('meta'), workers=2)


def test_auto_workers_are_one_per_core_only_when_training_on_the_cpu_in_one_process():
    """--workers auto (the default) runs one worker per core for trained networks on the CPU, and
    one process for the optimum (a size takes less than a worker's start), on a GPU or under
    torchrun."""
    cores = max(1, os.cpu_count() or 1)
    cpu, gpu = torch.device('cpu'), torch.device('cuda')
    assert run_emm.default_workers(cpu, 1) == cores
    assert run_emm.default_workers(cpu, 1, optimum=True) == 1
    assert run_emm.default_workers(gpu, 1) == 1
    assert run_emm.default_workers(cpu, 2) == 1
    params = {p.name: p for p in run_emm.main.params}
    assert params['workers'].default == 'auto'


@pytest.mark.slow                                           # a real run, interrupted
def test_ctrl_c_stops_the_workers_with_one_line_and_no_traceback(tmp_path):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) while two workers train:
    the search stops them and ends with its one-line error; no worker prints a traceback."""
    args = ['--steps', '5000', '--samples', '16', '--snapshots', '1', '--channels', '8', '--batch',
            '8', '--sizes', '16,32', '--workers', '2', '--outdir', str(tmp_path / 'run')]
    p = subprocess.Popen([sys.executable, 'run_emm.py', *args], cwd=Path(__file__).parents[1],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in p.stdout:                               # the workers are started by now
            if 'training 5000 steps' in line:
                break
        time.sleep(3)                                       # inside torch, in both workers
        os.killpg(p.pid, signal.SIGINT)
        out = line + p.communicate(timeout=120)[0]
    finally:
        p.kill()
    assert p.returncode != 0
    assert 'Traceback' not in out and 'KeyboardInterrupt' not in out, out
    assert out.rstrip().splitlines()[-1] == 'Error: interrupted: rerun the same command to resume'
