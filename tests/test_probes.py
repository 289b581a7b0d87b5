"""The Gaussian denoiser D_G (section 6) and the probes that place a network between D* and D_G
(section 9): closed forms checked against independent computations."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import memdiff

# Strategies. Bounds are small for speed.
SEEDS = st.integers(0, 2**31 - 1)
TRAIN_SIZES = st.integers(1, 12)
BATCHES = st.integers(1, 4)
SHAPES = st.sampled_from([(1, 2, 2), (1, 3, 3), (2, 2, 2), (3, 2, 1)])
SIGMAS = st.floats(math.log(0.05), math.log(20)).map(math.exp)   # log-uniform
KINDS = st.sampled_from(['edm', 'vp', 've'])
DIGITS = memdiff.load_dataset('digits')


def draw(seed, *shape):
    """Uniform values in [-1, 1] (float64) from a seeded generator."""
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed),
                      dtype=torch.float64) * 2 - 1


def gaussian_by_hand(x, y, sigma):
    """mu + Sigma (Sigma + sigma^2 I)^-1 (x - mu), Sigma the covariance of y with 1/N, by a solve."""
    x, y = x.flatten(1).double(), y.flatten(1).double()
    mu = y.mean(0)
    cov = (y - mu).T @ (y - mu) / len(y)
    eye = torch.eye(len(mu), dtype=torch.float64)
    return mu + torch.linalg.solve(cov + sigma ** 2 * eye, cov @ (x - mu).T).T

#----------------------------------------------------------------------------
# The Gaussian denoiser.

@given(n=TRAIN_SIZES, b=BATCHES, shape=SHAPES, sigma=SIGMAS, seed=SEEDS)
def test_gaussian_denoiser_is_the_linear_solve_of_its_formula(n, b, shape, sigma, seed):
    """D_G(x; sigma) = mu + Sigma (Sigma + sigma^2 I)^-1 (x - mu), computed by a direct solve."""
    y, x = draw(seed, n, *shape), 2 * draw(seed + 1, b, *shape)
    out = memdiff.GaussianDenoiser(y)(x, sigma)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out.flatten(1), gaussian_by_hand(x, y, sigma), rtol=1e-9, atol=1e-9)


@given(n=TRAIN_SIZES, b=BATCHES, shape=SHAPES, seed=SEEDS)
def test_gaussian_denoiser_takes_one_sigma_per_sample(n, b, shape, seed):
    """sigma [B] denoises each sample at its own level, as the optimum and Precond take it."""
    y, x = draw(seed, n, *shape), draw(seed + 1, b, *shape)
    sigma = torch.linspace(0.1, 3.0, b, dtype=torch.float64)
    out = memdiff.GaussianDenoiser(y)(x, sigma)
    for k in range(b):
        torch.testing.assert_close(out[k].flatten(), gaussian_by_hand(x[k:k + 1], y, sigma[k].item())[0],
                                   rtol=1e-9, atol=1e-9)


@given(b=BATCHES, shape=SHAPES, sigma=SIGMAS, seed=SEEDS)
def test_gaussian_denoiser_of_one_image_equals_the_optimum(b, shape, sigma, seed):
    """With one training image both closed forms return it, whatever the input and noise level."""
    y, x = draw(seed, 1, *shape), 3 * draw(seed + 1, b, *shape)
    expected = memdiff.OptimalDenoiser(y)(x, sigma)
    torch.testing.assert_close(memdiff.GaussianDenoiser(y)(x, sigma), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(expected, y.expand_as(x), rtol=0, atol=1e-12)


@given(n=TRAIN_SIZES, b=BATCHES, shape=SHAPES, seed=SEEDS)
def test_gaussian_denoiser_tends_to_the_mean_as_sigma_grows(n, b, shape, seed):
    """As sigma -> inf, D_G(x; sigma) -> mu, with an error that shrinks as 1/sigma^2."""
    y, x = draw(seed, n, *shape), draw(seed + 1, b, *shape)
    D, mu = memdiff.GaussianDenoiser(y), y.mean(0)
    errors = [(D(x, s) - mu).abs().max().item() for s in (1e2, 1e4)]
    assert errors[1] <= 1e-3 * errors[0] + 1e-12 and errors[1] < 1e-6


@given(n=TRAIN_SIZES, b=BATCHES, shape=SHAPES, seed=SEEDS)
def test_gaussian_denoiser_projects_onto_the_datas_span_at_sigma_zero(n, b, shape, seed):
    """At sigma = 0, D_G is the orthogonal projection onto the affine span of the training set:
    training images are fixed points, and x - D_G(x; 0) is orthogonal to every y_i - mu."""
    y, x = draw(seed, n, *shape), 2 * draw(seed + 1, b, *shape)
    D = memdiff.GaussianDenoiser(y)
    torch.testing.assert_close(D(y, 0.0), y, rtol=0, atol=1e-9)
    residual = (x - D(x, 0.0)).flatten(1)
    centred = (y - y.mean(0)).flatten(1)
    torch.testing.assert_close(residual @ centred.T, torch.zeros(b, n, dtype=torch.float64),
                               rtol=0, atol=1e-9)
    assert not D(x, 0.0).isnan().any()


@given(n=TRAIN_SIZES, b=BATCHES, shape=SHAPES, sigma=SIGMAS, seed=SEEDS)
def test_gaussian_denoiser_does_not_depend_on_the_order_of_the_training_set(n, b, shape, sigma, seed):
    """Permuting the training set leaves D_G unchanged."""
    y, x = draw(seed, n, *shape), draw(seed + 1, b, *shape)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(memdiff.GaussianDenoiser(y[perm])(x, sigma),
                               memdiff.GaussianDenoiser(y)(x, sigma), rtol=1e-10, atol=1e-10)


@settings(max_examples=5)
@given(n=st.integers(2, 6), sigma=st.floats(0.2, 1.0), seed=SEEDS)
def test_gaussian_denoiser_minimises_the_loss_among_affine_denoisers(n, sigma, seed):
    """The least-squares affine fit of y from y + sigma n, on 200k noisy training samples, is D_G:
    D_G is the minimiser of the denoising loss over affine maps (to the fit's sampling error)."""
    g = torch.Generator().manual_seed(seed)
    y = draw(seed, n, 3)
    clean = y[torch.randint(n, (200_000,), generator=g)]
    noisy = clean + sigma * torch.randn(clean.shape, generator=g, dtype=torch.float64)
    A = torch.cat([noisy, torch.ones(len(noisy), 1, dtype=torch.float64)], 1)
    W = torch.linalg.lstsq(A, clean).solution                # [4, 3]
    x = draw(seed + 1, 5, 3)
    fit = torch.cat([x, torch.ones(5, 1, dtype=torch.float64)], 1) @ W
    torch.testing.assert_close(memdiff.GaussianDenoiser(y)(x, sigma), fit, rtol=0, atol=0.02)


@given(sigma=SIGMAS, seed=SEEDS)
def test_class_conditional_gaussian_uses_the_class_moments_and_the_whole_set_for_an_empty_class(
        sigma, seed):
    """With labels, a sample of class c gets D_G of the images of c; a class no image has gets
    D_G of the whole set (the optimum's rule); no labels: the whole set."""
    y, x = draw(seed, 9, 1, 2, 2), draw(seed + 1, 4, 1, 2, 2)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2])
    c = torch.tensor([0, 1, 2, 5])
    out = memdiff.GaussianDenoiser(y, labels)(x, sigma, c)
    for k in range(3):
        torch.testing.assert_close(out[k].flatten(), gaussian_by_hand(x[k:k + 1], y[labels == k],
                                                                     sigma)[0], rtol=1e-9, atol=1e-9)
    whole = gaussian_by_hand(x[3:], y, sigma)[0]
    torch.testing.assert_close(out[3].flatten(), whole, rtol=1e-9, atol=1e-9)
    one_hot = torch.nn.functional.one_hot(c.clamp(max=2), 3).double()
    torch.testing.assert_close(memdiff.GaussianDenoiser(y, labels)(x[:3], sigma, one_hot[:3]),
                               out[:3], rtol=0, atol=0)


def test_gaussian_denoiser_samples_through_the_edm_sampler():
    """D_G drops into edm_sampler: its samples are finite and lie near the data's span."""
    y = DIGITS[0][:30]
    z = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    x = memdiff.edm_sampler(memdiff.GaussianDenoiser(y), z)
    assert x.shape == z.shape and torch.isfinite(x).all()

#----------------------------------------------------------------------------
# The loss's density of noise levels, which weights the probes.

@given(kind=KINDS)
def test_sigma_density_integrates_to_one_over_log_sigma(kind):
    """p(ln sigma) of each loss integrates to 1 over the noise levels that loss draws."""
    precond = memdiff.Precond(torch.nn.Identity(), kind)
    lo, hi = (1e-6, 1e6) if kind == 'edm' else (precond.sigma_min, precond.sigma_max)
    s = torch.logspace(math.log10(lo), math.log10(hi), 200_001, dtype=torch.float64)
    p = memdiff.sigma_density(precond, s)
    assert torch.trapezoid(p, s.log()).item() == pytest.approx(1.0, abs=1e-4)


def test_vp_sigma_density_integrates_to_one_for_any_epsilon_t():
    """With epsilon_t = 0.3 (not the default 1e-5), p(ln sigma) of the VP loss still integrates to
    1 over [sigma(epsilon_t), sigma(1)]: the 1 / (1 - epsilon_t) of t ~ U(epsilon_t, 1) is in it."""
    precond = memdiff.Precond(torch.nn.Identity(), 'vp', epsilon_t=0.3)
    s = torch.logspace(math.log10(precond.sigma_min), math.log10(precond.sigma_max), 100_001,
                       dtype=torch.float64)
    assert torch.trapezoid(memdiff.sigma_density(precond, s), s.log()).item() == pytest.approx(1.0, abs=1e-4)

@given(u=st.floats(0.01, 0.99), kind=KINDS)
def test_sigma_density_is_the_losses_own_draw(u, kind):
    """The cumulative of p(ln sigma) at the sigma a loss draws from a quantile u equals u."""
    precond = memdiff.Precond(torch.nn.Identity(), kind)
    if kind == 'edm':
        sigma = math.exp(-1.2 + 1.2 * math.sqrt(2) * torch.erfinv(torch.tensor(2 * u - 1)).item())
        lo = 1e-8
    elif kind == 'vp':                                      # t ~ U(eps_t, 1), drawn as 1 + u (eps_t - 1)
        sigma, lo = memdiff.vp_sigma(torch.tensor(1 + (1 - u) * (1e-5 - 1), dtype=torch.float64)
                                     ).item(), precond.sigma_min
    else:
        sigma, lo = 0.02 * (100 / 0.02) ** u, 0.02
    s = torch.logspace(math.log10(lo), math.log10(sigma), 50_001, dtype=torch.float64)
    assert torch.trapezoid(memdiff.sigma_density(precond, s), s.log()).item() == \
        pytest.approx(u, abs=1e-4)

#----------------------------------------------------------------------------
# Probes.

class AsPrecond:
    """A closed form with a preconditioning's attributes, so probe() can weight its noise levels."""
    kind, sigma_data, sigma_min, sigma_max = 'edm', 0.5, 0.0, math.inf

    def __init__(self, denoise):
        self.denoise = denoise

    def __call__(self, x, sigma, labels=None):
        return self.denoise(x, sigma, labels)


def probes_of(n, cfg=memdiff.EMMConfig()):
    y, c, _ = memdiff.training_set(*DIGITS, n, cfg)
    return memdiff.probe_set(*DIGITS, n, cfg), memdiff.OptimalDenoiser(y.double(), c), \
        memdiff.GaussianDenoiser(y, c)


@pytest.mark.parametrize('n', [16, 100])
def test_the_optimum_has_share_one_and_the_gaussian_share_zero(n):
    """Probing D* itself gives the optimum share 1 and D_G gives 0 (to D's float32 rounding)."""
    probes, optimum, gaussian = probes_of(n)
    for closed, share in ((optimum, 1.0), (gaussian, 0.0)):
        out = memdiff.probe(AsPrecond(closed), probes, optimum, gaussian)
        assert out['share'] == pytest.approx(share, abs=1e-6)


@pytest.mark.parametrize('kind', ['edm', 'vp', 've'])
def test_probe_losses_and_distances_equal_their_definitions(kind):
    """Per level: loss = lambda(sigma) ||D(y + sigma n) - y||^2 averaged over the training and the
    held-out probes, and the RMS distance per pixel to D* and to D_G on each side; the single
    numbers are the p(sigma)-weighted means, gap = held-out loss - training loss, and the share
    d_G / (d_* + d_G) of the training side."""
    probes, optimum, gaussian = probes_of(24)
    net = AsPrecond(lambda x, s, c: 0.7 * x)                 # a shrinkage: neither closed form
    ranges = memdiff.Precond(torch.nn.Identity(), kind)      # the kind's sigma range and constants
    for key in ('kind', 'sigma_min', 'sigma_max', 'beta_d', 'beta_min', 'epsilon_t'):
        setattr(net, key, getattr(ranges, key))
    out = memdiff.probe(net, probes, optimum, gaussian)
    lo, hi = memdiff.sigma_range(ranges)
    sigma = torch.logspace(math.log10(lo), math.log10(hi), memdiff.PROBE_SIGMAS, dtype=torch.float64)
    p = memdiff.sigma_density(net, sigma)
    w = (p / p.sum()).tolist()
    y, held = probes['y'].double(), probes['held']
    expected = {k: [] for k in ('loss_train', 'loss_held', 'dist_opt', 'dist_gauss', 'dist_opt_held',
                                'dist_gauss_held')}
    for k, s in enumerate(sigma.tolist()):
        x = y + s * probes['noise'][:, k].double()
        D = 0.7 * x
        lam = (s ** 2 + 0.25) / (s * 0.5) ** 2 if kind == 'edm' else 1 / s ** 2
        err = lam * ((D - y) ** 2).flatten(1).sum(1)
        for side, mask in (('_train', ~held), ('_held', held)):
            expected['loss' + side].append(err[mask].mean().item())
            suffix = '' if side == '_train' else side
            for name, closed in (('dist_opt', optimum), ('dist_gauss', gaussian)):
                expected[name + suffix].append(((D - closed(x, s))[mask] ** 2).mean().sqrt().item())
    for key, values in expected.items():
        assert out['probe'][key] == pytest.approx(values, rel=1e-6), key
    assert out['probe']['weight'] == pytest.approx(w)
    mean = {k: sum(a * b for a, b in zip(w, v)) for k, v in expected.items()}
    for key in ('loss_train', 'loss_held', 'dist_opt', 'dist_gauss'):
        assert out[key] == pytest.approx(mean[key])
    assert out['gap'] == pytest.approx(mean['loss_held'] - mean['loss_train'])
    assert out['share'] == pytest.approx(mean['dist_gauss'] / (mean['dist_opt'] + mean['dist_gauss']))
    assert 0 < out['share'] < 1


def test_probe_inputs_are_the_same_across_sizes_and_leave_the_training_set_out():
    """Held-out probes are the last images of each class, outside every training set that leaves
    them out, the same images and noise for |D| = 16 and 160; training probes are training images."""
    a, b = memdiff.probe_set(*DIGITS, 16, memdiff.EMMConfig()), \
        memdiff.probe_set(*DIGITS, 160, memdiff.EMMConfig())
    assert a['held'].sum() == b['held'].sum() == 70         # 7 of each of the 10 classes
    assert torch.equal(a['y'][a['held']], b['y'][b['held']])
    assert torch.equal(a['noise'][a['held']], b['noise'][b['held']])
    assert torch.equal(a['noise'][~a['held']], b['noise'][~b['held']][:16])
    for n, probes in ((16, a), (160, b)):
        y = memdiff.training_set(*DIGITS, n, memdiff.EMMConfig())[0].flatten(1)
        held = probes['y'][probes['held']].flatten(1)
        mine = probes['y'][~probes['held']].flatten(1)
        assert (torch.cdist(held, y).min(1).values > 0).all()   # no held-out image is trained on
        assert (torch.cdist(mine, y).min(1).values == 0).all()
    labels = DIGITS[1]
    for c in range(10):
        members = torch.nonzero(labels == c).flatten()
        assert torch.equal(memdiff.held_out(labels, 16, 64)[7 * c:7 * c + 7], members[-7:])


def test_conditional_probes_use_the_training_labels_and_true_classes_when_labels_are_true():
    """Under 'true' labels the held-out probes carry their own class; under 'unique' they carry
    classes drawn in [0, |D|) as the sampler draws them."""
    probes = memdiff.probe_set(*DIGITS, 20, memdiff.EMMConfig(labels='true'))
    held = probes['held']
    idx = memdiff.held_out(DIGITS[1], 20, memdiff.PROBE_IMAGES)
    assert torch.equal(probes['labels'][held], DIGITS[1][idx])
    unique = memdiff.probe_set(*DIGITS, 20, memdiff.EMMConfig(labels='unique'))
    assert torch.equal(unique['labels'][~unique['held']], torch.arange(20))
    assert unique['labels'][unique['held']].max() < 20


@pytest.mark.slow
def test_a_trained_networks_probe_records_every_level_and_stays_between_the_closed_forms():
    """measure() records the probe at every snapshot of a trained network: a share in [0, 1] and
    finite losses at each of PROBE_SIGMAS levels over the sampler's range."""
    cfg = memdiff.EMMConfig(model_channels=8, samples=8,
                            train=memdiff.TrainConfig(train_steps=20, batch=8, snapshots=2))
    snaps = [s for s, _, _ in memdiff.measure(*DIGITS, 16, cfg)]
    assert len(snaps) == 2
    for s in snaps:
        assert 0 <= s['share'] <= 1 and s['gap'] == s['loss_held'] - s['loss_train']
        assert len(s['probe']['sigma']) == memdiff.PROBE_SIGMAS
        assert s["probe"]["sigma"][0] == pytest.approx(0.002) and s["probe"]["sigma"][-1] == pytest.approx(80)


def test_measure_probes_the_network_against_the_optimum_then_the_gaussian_of_its_training_set(
        monkeypatch):
    """The path from measure() to probe(): the EMA network, then D* and D_G of the same training
    set, in that order (swapped, every share would read 1 - share)."""
    calls = []
    monkeypatch.setattr(memdiff, 'probe', lambda *args: calls.append(args) or {})
    cfg = memdiff.EMMConfig(model_channels=8, samples=2,
                            train=memdiff.TrainConfig(train_steps=1, batch=4, snapshots=1))
    [(snapshot, _, _)] = list(memdiff.measure(*DIGITS, 16, cfg))
    (net, _, optimum, gaussian), = calls
    y = memdiff.training_set(*DIGITS, 16, cfg)[0]
    assert isinstance(net, memdiff.Precond)
    assert isinstance(optimum, memdiff.OptimalDenoiser) and isinstance(gaussian, memdiff.GaussianDenoiser)
    assert torch.equal(optimum.y, y.double().flatten(1)) and torch.equal(gaussian.y, y.double().flatten(1))
