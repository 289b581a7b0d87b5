"""One |D| measurement (section 9): the study's samples and sigma range, the best snapshot, resume."""

import pytest
import torch

import memdiff
import run_emm

TINY_MEASURE = memdiff.EMMConfig(model_channels=8, train=memdiff.TrainConfig(train_steps=4, batch=8, snapshots=2),
                                 samples=16, num_steps=3)
DIGITS = memdiff.load_dataset('digits')


def measure_all(n, cfg, **kwargs):
    """memdiff.measure run to the end -> (point, samples of the best snapshot, training set)."""
    seen = [(s, d['samples']) for s, d, _ in memdiff.measure(*DIGITS, n, cfg, **kwargs)]
    best = max(seen, key=lambda e: e[0]['ratio'])            # the first of the highest
    return memdiff.best_point(n, [s for s, _ in seen], cfg.threshold), best[1], \
        memdiff.training_set(*DIGITS, n, cfg)[0]


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
    cfg = memdiff.EMMConfig(arch="optimum", samples=16, num_steps=3)
    point, samples, y = measure_all(24, cfg)
    check_point(point, samples, y, cfg, 24)
    assert [s['step'] for s in point['snapshots']] == [0]
    assert point['ratio'] == 1.0


@pytest.mark.parametrize('labels', ['random:100', 'random:10'])
def test_conditional_optimum_with_empty_classes_falls_back_and_counts_them(labels):
    """Random classes can be empty: those samples get the unconditional optimum, which still
    memorizes, and the snapshot counts them."""
    cfg = memdiff.EMMConfig(arch="optimum", samples=40, num_steps=4, labels=labels)
    point = measure_all(16, cfg)[0]
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
    z0, c0 = memdiff.study_latents([], (3, 4, 4), 10, torch.device('cpu'))  # a rank with no seeds
    assert z0.shape == (0, 3, 4, 4) and c0.shape == (0,) and c0.dtype == torch.long


def test_generate_draws_seeds_zero_to_n_whatever_the_batch():
    """generate() samples the seeds 0..num-1: batching does not change a sample."""
    D = memdiff.OptimalDenoiser(DIGITS[0][:20].double())
    a, _ = memdiff.generate(D, 10, (1, 8, 8), 0, torch.device('cpu'), num_steps=4)
    b, _ = memdiff.generate(D, 10, (1, 8, 8), 0, torch.device('cpu'), num_steps=4, batch=3)
    assert torch.equal(a, b)


def test_non_finite_samples_stop_the_size_naming_the_step(monkeypatch):
    """A sampler that returns NaN is a ValueError naming the step, not a ratio of 0."""
    monkeypatch.setattr(memdiff, 'edm_sampler', lambda d, z, *a, **k: z * float('nan'))
    cfg = memdiff.EMMConfig(arch="optimum", samples=8, num_steps=3)
    with pytest.raises(ValueError, match='step 0'):
        measure_all(16, cfg)


def test_measure_trained_keeps_the_best_snapshot():
    """A trained measurement has one entry per snapshot step; its ratio is the best of them."""
    point, samples, y = measure_all(16, TINY_MEASURE)
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
    p1, x1, _ = measure_all(16, TINY_MEASURE)
    torch.manual_seed(2)
    p2, x2, _ = measure_all(16, TINY_MEASURE)
    assert p1 == p2
    assert torch.equal(x1, x2), f'max |sample difference| {(x1 - x2).abs().max().item():.3g}'


def test_measure_leaves_the_callers_global_rng_as_it_was():
    """Training seeds torch's global RNG inside a fork: the caller's state is unchanged afterwards."""
    torch.manual_seed(3)
    before = torch.get_rng_state()
    measure_all(16, TINY_MEASURE)
    assert torch.equal(torch.get_rng_state(), before)


def measure_in(outdir, progress=None, monkeypatch=None):
    """run_emm's per-size files around measure() in outdir, torch's global RNG seeded first ->
    (point, best samples); progress is handed to memdiff.measure."""
    torch.manual_seed(7)
    outdir.mkdir(exist_ok=True)
    (outdir / 'work').mkdir(exist_ok=True)
    original = memdiff.measure
    if progress is not None:
        monkeypatch.setattr(memdiff, 'measure', lambda *a: original(*a[:-1], progress))
    try:
        point = run_emm.measure_size(TINY_MEASURE, DIGITS, 16, outdir, torch.device('cpu'),
                                     lambda *a: None)
    finally:
        monkeypatch.setattr(memdiff, 'measure', original) if monkeypatch else None
    return {k: v for k, v in point.items() if k != 'versions'}


def test_measure_resumed_after_interrupt_in_training_equals_uninterrupted(tmp_path, monkeypatch):
    """Interrupted between snapshots and rerun with the same files, the size gives the point of an
    uninterrupted run, and training resumes from the saved state instead of step 0."""
    clean = measure_in(tmp_path / 'a')
    with pytest.raises(KeyboardInterrupt):                   # after snapshot 2, during step 3
        measure_in(tmp_path / 'b', Interrupt('train', 3), monkeypatch)
    assert (tmp_path / 'b' / 'work' / 'n16.pt').exists()
    steps = []
    resumed = measure_in(tmp_path / 'b', lambda kind, done, total: steps.append(done)
                         if kind == 'train' else None, monkeypatch)
    assert resumed == clean and min(steps) == 3
    assert not (tmp_path / 'b' / 'work' / 'n16.pt').exists()


def test_measure_resumed_after_interrupt_in_sampling_keeps_every_snapshot(tmp_path, monkeypatch):
    """Interrupted while sampling the last snapshot and rerun, every snapshot is scored once."""
    clean = measure_in(tmp_path / 'a')
    with pytest.raises(KeyboardInterrupt):                   # the second snapshot's sampling
        measure_in(tmp_path / 'b', Interrupt('sample', 2, skip=1), monkeypatch)
    resumed = measure_in(tmp_path / 'b')
    assert [s['step'] for s in resumed['snapshots']] == TINY_MEASURE.train.snapshot_steps(16)
    assert resumed == clean


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
    d = torch.tensor([[1.0, 3.0], [1.0, 5.0], [1.0, 2.0], [1 - 1e-12, 3.0]], dtype=torch.float64)
    monkeypatch.setattr(memdiff, 'nearest_distinct', lambda x, y: (d, torch.zeros(4, 2).long()))
    result, per_sample = memdiff.score(torch.zeros(4, 1, 2, 2), torch.arange(2.).reshape(2, 1, 1, 1))
    assert result['ratio'] == 0.5 and torch.equal(per_sample['d1'] / per_sample['d2'],
                                                  d[:, 0] / d[:, 1])
    result, _ = memdiff.score(torch.zeros(4, 1, 2, 2), torch.arange(2.).reshape(2, 1, 1, 1),
                              mem_threshold=0.2)
    assert result['ratio'] == 0.0


class RangeNet(torch.nn.Module):
    """A denoiser with a declared noise range that records every sigma it is called with."""
    def __init__(self, sigma_min, sigma_max):
        super().__init__()
        self.sigma_min, self.sigma_max, self.calls = sigma_min, sigma_max, []

    def forward(self, x, sigma, labels=None):
        self.calls.append(float(torch.as_tensor(sigma).reshape(-1)[0]))
        return x * 0.5


@pytest.mark.parametrize('sigma_min, sigma_max', [(0.02, 100.0), (0.01, 40.0), (0.0, float('inf'))])
def test_generate_with_a_progress_bar_samples_the_networks_own_sigma_range(sigma_min, sigma_max):
    """With or without a progress callback, generate() takes the sampler's steps over the range the
    denoiser declares, clamped as the study's sampler: [max(0.002, min), min(80, max)]."""
    expected = memdiff.edm_sigma_steps(5, max(0.002, sigma_min), min(80.0, sigma_max))[:-1]
    for progress in (None, lambda *a: None):
        net = RangeNet(sigma_min, sigma_max)
        memdiff.generate(net, 3, (1, 2, 2), 0, torch.device('cpu'), num_steps=5, progress=progress)
        euler = net.calls[0::2] + net.calls[-1:]             # each step's first call is at t_cur
        assert torch.tensor(sorted(set(net.calls), reverse=True)) == pytest.approx(expected)
        assert max(net.calls) == pytest.approx(min(80.0, sigma_max))
        assert min(net.calls) == pytest.approx(max(0.002, sigma_min)) and len(euler) >= 1


def test_generated_samples_with_a_bar_equal_the_sampler_called_directly_with_the_clamp():
    """A denoiser declaring VE's range [0.02, 100] gives, through generate() with a progress bar,
    the samples of edm_sampler called directly with the study's clamp [0.02, 80], image for image
    (uint8), and not those of the unclamped [0.002, 80]."""
    D = memdiff.GaussianDenoiser(DIGITS[0][:12])
    D.sigma_min, D.sigma_max = 0.02, 100.0
    x, _ = memdiff.generate(D, 64, (1, 8, 8), 0, torch.device('cpu'), num_steps=4,
                            progress=lambda *a: None)
    z, _ = memdiff.study_latents(range(64), (1, 8, 8), 0, torch.device('cpu'))
    plain = memdiff.GaussianDenoiser(DIGITS[0][:12])         # declares no range
    direct = memdiff.edm_sampler(plain, z, num_steps=4, sigma_min=0.02, sigma_max=80)
    wide = memdiff.edm_sampler(plain, z, num_steps=4)
    assert torch.equal(memdiff.to_uint8(x), memdiff.to_uint8(direct))
    assert not torch.equal(memdiff.to_uint8(x), memdiff.to_uint8(wide))
