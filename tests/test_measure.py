"""One |D| measurement (section 9): the study's samples, the best snapshot, resume through the ledger."""

import pytest
import torch

import memdiff
import run_emm

TINY_MEASURE = memdiff.EMMConfig(channels=8, train=memdiff.TrainConfig(steps=4, batch=8, snapshots=2),
                                 samples=16, num_steps=3)
DIGITS = memdiff.load_dataset('digits')


def measure_with_samples(n, cfg, **kwargs):
    """memdiff.measure -> (point, samples of the best snapshot, training set)."""
    seen = []
    point = memdiff.measure(*DIGITS, n, cfg, on_snapshot=lambda s, x, y: seen.append((s, x, y)),
                            **kwargs)
    best = max(seen, key=lambda e: e[0]['ratio'])            # the first of the highest
    return point, best[1], best[2]


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
    assert torch.equal(y, memdiff.training_set(*DIGITS, n, cfg)[0])
    # The samples are those of the best snapshot: rescoring them gives the point's ratio.
    assert memdiff.score(samples, y, cfg.mem_threshold)[0]['ratio'] == point['ratio']


def test_measure_optimum_scores_one_snapshot_and_memorizes():
    """The closed-form optimum gives one snapshot (step 0) that memorizes every sample."""
    cfg = memdiff.EMMConfig(optimum=True, samples=16, num_steps=3)
    point, samples, y = measure_with_samples(24, cfg)
    check_point(point, samples, y, cfg, 24)
    assert [s['step'] for s in point['snapshots']] == [0]
    assert point['ratio'] == 1.0


@pytest.mark.parametrize('labels', ['random:100', 'random:10'])
def test_conditional_optimum_with_empty_classes_falls_back_and_counts_them(labels):
    """Random classes can be empty: those samples get the unconditional optimum, which still
    memorizes, and the snapshot counts them."""
    cfg = memdiff.EMMConfig(optimum=True, samples=40, num_steps=4, labels=labels)
    point = memdiff.measure(*DIGITS, 16, cfg)
    y, c, label_dim = memdiff.training_set(*DIGITS, 16, cfg)
    _, classes = memdiff.study_latents(range(40), (1, 8, 8), label_dim, torch.device('cpu'))
    expected = int((~torch.isin(classes, c)).sum())
    assert point['snapshots'][0]['unconditional'] == expected
    assert expected > 0 or labels != 'random:100'           # 16 images cannot fill 100 classes
    assert point['ratio'] == 1.0


def test_study_latents_are_those_of_per_seed_generators():
    """Seed s gives randn([C,H,W]) of Generator().manual_seed(s), then its class from the same one."""
    z, c = memdiff.study_latents([0, 5, 7], (3, 4, 4), 10, torch.device('cpu'))
    for s, zs, cs in zip([0, 5, 7], z, c):
        g = torch.Generator().manual_seed(s)
        assert torch.equal(zs, torch.randn([3, 4, 4], generator=g))
        assert cs == torch.randint(10, size=[], generator=g)
    z2, none = memdiff.study_latents([5], (3, 4, 4), 0, torch.device('cpu'))
    assert none is None and torch.equal(z2[0], z[1])


def test_generate_draws_seeds_zero_to_n_whatever_the_batch():
    """generate() samples the seeds 0..num-1: batching does not change a sample."""
    D = memdiff.OptimalDenoiser(DIGITS[0][:20].double())
    a, _ = memdiff.generate(D, 10, (1, 8, 8), 0, torch.device('cpu'), num_steps=4)
    b, _ = memdiff.generate(D, 10, (1, 8, 8), 0, torch.device('cpu'), num_steps=4, batch=3)
    assert torch.equal(a, b)


def test_non_finite_samples_stop_the_size_naming_the_step(monkeypatch):
    """A sampler that returns NaN is a ValueError naming the step, not a ratio of 0."""
    monkeypatch.setattr(memdiff, 'edm_sampler', lambda d, z, *a, **k: z * float('nan'))
    cfg = memdiff.EMMConfig(optimum=True, samples=8, num_steps=3)
    with pytest.raises(ValueError, match='step 0'):
        memdiff.measure(*DIGITS, 16, cfg)


def test_measure_trained_keeps_the_best_snapshot():
    """A trained measurement has one entry per snapshot step; its ratio is the best of them."""
    point, samples, y = measure_with_samples(16, TINY_MEASURE)
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


def test_measure_is_reproducible_whatever_the_global_rng():
    """The same configuration gives the same point and samples, whatever torch's global RNG holds."""
    torch.manual_seed(1)
    p1, x1, _ = measure_with_samples(16, TINY_MEASURE)
    torch.manual_seed(2)
    p2, x2, _ = measure_with_samples(16, TINY_MEASURE)
    assert p1 == p2
    assert torch.equal(x1, x2), f'max |sample difference| {(x1 - x2).abs().max().item():.3g}'


def measure_in(work, **kwargs):
    """run_emm's ledger around measure() in the folder work, torch's global RNG seeded first."""
    torch.manual_seed(7)
    return run_emm.measure_size(TINY_MEASURE, DIGITS, 16, work, **kwargs)


def test_measure_resumed_after_interrupt_in_training_equals_uninterrupted(tmp_path):
    """Interrupted between snapshots and rerun with the same ledger, the size gives the point and
    samples of an uninterrupted run."""
    (tmp_path / 'a').mkdir(), (tmp_path / 'b').mkdir()
    clean, x_clean = measure_in(tmp_path / 'a')
    with pytest.raises(KeyboardInterrupt):                   # after snapshot 2, during step 3
        measure_in(tmp_path / 'b', progress=Interrupt('train', 3))
    resumed, x_resumed = measure_in(tmp_path / 'b')
    assert resumed == clean
    assert torch.equal(x_resumed, x_clean)


def test_measure_resumed_after_interrupt_in_sampling_keeps_every_snapshot(tmp_path):
    """Interrupted while sampling the last snapshot and rerun, every snapshot is scored once."""
    (tmp_path / 'a').mkdir(), (tmp_path / 'b').mkdir()
    clean, x_clean = measure_in(tmp_path / 'a')
    with pytest.raises(KeyboardInterrupt):                   # the second snapshot's sampling
        measure_in(tmp_path / 'b', progress=Interrupt('sample', 2, skip=1))
    resumed, x_resumed = measure_in(tmp_path / 'b')
    assert [s['step'] for s in resumed['snapshots']] == TINY_MEASURE.train.snapshot_steps(16)
    assert resumed == clean
    assert torch.equal(x_resumed, x_clean)


def test_training_set_with_true_labels_keeps_the_subsets_labels():
    """labels='true': the subset's own labels and label_dim = 10; 'none': no labels."""
    images, labels = DIGITS
    for mode, dim in [('true', 10), ('none', 0)]:
        y, c, label_dim = memdiff.training_set(images, labels, 30, memdiff.EMMConfig(labels=mode))
        idx = memdiff.balanced_subset(labels, 30)
        assert torch.equal(y, images[idx]) and label_dim == dim
        assert (c is None) if mode == 'none' else torch.equal(c, labels[idx])


def test_generate_reports_progress_in_network_evaluations():
    """progress('sample', calls, total) counts every denoiser call: total = batches x (2 steps - 1)."""
    D = memdiff.OptimalDenoiser(DIGITS[0][:20].double())
    seen = []
    memdiff.generate(D, 10, (1, 8, 8), 0, torch.device('cpu'), num_steps=4, batch=4,
                     progress=lambda *a: seen.append(a))
    assert seen[-1] == ('sample', 3 * 7, 3 * 7) and len(seen) == 21


def test_score_counts_d1_d2_strictly_below_the_cut(monkeypatch):
    """score() counts d1/d2 < mem_threshold: a ratio exactly at the cut is not memorized."""
    ratios = torch.tensor([1 / 3, 0.2, 0.5, 1 / 3 - 1e-12], dtype=torch.float64)
    monkeypatch.setattr(memdiff, 'memorization_scores', lambda x, y, t: (ratios, ratios < t))
    result, d1_d2 = memdiff.score(torch.zeros(4, 1, 2, 2), torch.zeros(2, 1, 2, 2))
    assert result['ratio'] == 0.5 and torch.equal(d1_d2, ratios)
    result, _ = memdiff.score(torch.zeros(4, 1, 2, 2), torch.zeros(2, 1, 2, 2), mem_threshold=0.2)
    assert result['ratio'] == 0.0
