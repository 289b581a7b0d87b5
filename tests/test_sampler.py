"""The EDM sampler: its noise levels, its calling convention, churn, and the ODE it solves."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import memdiff

# Strategies. Bounds are small for speed.
SEEDS = st.integers(0, 2**31 - 1)
NUM_STEPS = st.integers(2, 64)
SIGMA_MINS = st.floats(1e-3, 1.0)
SIGMA_MAXS = st.floats(2.0, 100.0)
RHOS = st.floats(1.0, 10.0)
BATCHES = st.integers(1, 4)
DATA_STDS = st.floats(0.2, 2.0)                             # s of the Gaussian N(mu, s^2 I)
SHAPES = st.sampled_from([(3,), (1, 2, 2), (2, 3, 1)])


def gaussian_denoiser(mu, s):
    """The optimal denoiser of N(mu, s^2 I): D(x; sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu)."""
    def denoise(x, sigma, class_labels=None):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *[1] * (x.dim() - 1))
        return mu + s ** 2 / (s ** 2 + sigma ** 2) * (x - mu)
    return denoise


def recording(denoise, calls):
    """Wrap a denoiser so that each call's (x, sigma, labels) is appended to calls."""
    def wrapped(x, sigma, class_labels=None):
        calls.append((x.clone(), torch.as_tensor(sigma).clone(), class_labels))
        return denoise(x, sigma, class_labels)
    return wrapped


#----------------------------------------------------------------------------
# Noise levels.

@given(num_steps=NUM_STEPS, sigma_min=SIGMA_MINS, sigma_max=SIGMA_MAXS, rho=RHOS)
def test_sigma_steps_follow_the_rho_schedule(num_steps, sigma_min, sigma_max, rho):
    """t_i = (s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho, then 0; strictly decreasing."""
    t = memdiff.edm_sigma_steps(num_steps, sigma_min, sigma_max, rho)
    assert t.dtype == torch.float64 and t.shape == (num_steps + 1,)
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    expected = [(a + i / (num_steps - 1) * (b - a)) ** rho for i in range(num_steps)] + [0.0]
    # a + (b - a) cancels: relative error up to rho eps (sigma_max / sigma_min)^(1/rho) ~ 2e-11.
    torch.testing.assert_close(t, torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=0)
    assert math.isclose(t[0].item(), sigma_max, rel_tol=1e-12)
    assert math.isclose(t[-2].item(), sigma_min, rel_tol=1e-9)
    assert t[-1].item() == 0.0
    assert (t[1:] < t[:-1]).all()


#----------------------------------------------------------------------------
# Calling convention.

@given(num_steps=st.integers(2, 20), b=BATCHES, seed=SEEDS)
def test_sampler_calls_denoiser_at_each_level_in_float64(num_steps, b, seed):
    """The Heun sampler makes 2n - 1 float64 calls: t_0, then t_i twice for i = 1..n-1, x_0 = z t_0."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(b, 1, 2, 2, generator=g)
    labels = torch.eye(3)[torch.arange(b) % 3]
    calls = []
    denoise = recording(gaussian_denoiser(torch.zeros(1, 2, 2, dtype=torch.float64), 0.5), calls)
    samples = memdiff.edm_sampler(denoise, latents, labels, num_steps=num_steps)
    assert samples.shape == latents.shape and samples.dtype == latents.dtype
    assert len(calls) == 2 * num_steps - 1
    t = memdiff.edm_sigma_steps(num_steps)
    expected_sigmas = [t[0]] + [t[i] for i in range(1, num_steps) for _ in range(2)]
    for (x, sigma, seen), expected in zip(calls, expected_sigmas):
        assert x.dtype == torch.float64 and x.shape == latents.shape
        assert sigma.dtype == torch.float64 and sigma.numel() in (1, b)
        torch.testing.assert_close(sigma.reshape(-1), expected.expand(sigma.numel()), rtol=1e-12, atol=0)
        assert seen is labels
    torch.testing.assert_close(calls[0][0], latents.double() * 80, rtol=1e-12, atol=0)


@given(b=BATCHES, seed=SEEDS)
def test_sampler_keeps_latent_dtype_and_is_deterministic_without_churn(b, seed):
    """Without churn the result ignores the generator; float64 latents give float64 samples."""
    latents = torch.randn(b, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    denoise = gaussian_denoiser(torch.zeros(3, dtype=torch.float64), 1.0)
    run = lambda s: memdiff.edm_sampler(denoise, latents, num_steps=6,
                                        generator=torch.Generator().manual_seed(s))
    out = run(seed)
    assert out.dtype == torch.float64
    assert torch.equal(out, run(seed + 1))


#----------------------------------------------------------------------------
# Churn.

@given(b=BATCHES, seed=SEEDS)
def test_churn_is_reproducible_and_uses_the_generator(b, seed):
    """With S_churn > 0, the same generator seed repeats the samples and another seed changes them."""
    latents = torch.randn(b, 3, generator=torch.Generator().manual_seed(seed))
    denoise = gaussian_denoiser(torch.zeros(3, dtype=torch.float64), 1.0)
    run = lambda s, churn=10.0: memdiff.edm_sampler(
        denoise, latents, num_steps=8, S_churn=churn, generator=torch.Generator().manual_seed(s))
    out = run(seed)
    assert torch.isfinite(out).all()
    assert torch.equal(out, run(seed))
    assert not torch.equal(out, run(seed + 1))
    assert not torch.equal(out, run(seed, churn=0.0))


def test_churn_raises_noise_levels_only_inside_s_min_s_max():
    """With churn, the Euler evaluations see t_hat = (1 + gamma) t_i > t_i only for S_min <= t_i <= S_max."""
    num_steps, churn = 8, 2.0
    gamma = min(churn / num_steps, math.sqrt(2) - 1)
    t = memdiff.edm_sigma_steps(num_steps)
    calls = []
    denoise = recording(gaussian_denoiser(torch.zeros(3, dtype=torch.float64), 1.0), calls)
    memdiff.edm_sampler(denoise, torch.zeros(2, 3), num_steps=num_steps, S_churn=churn,
                        S_min=0.05, S_max=10.0, generator=torch.Generator().manual_seed(0))
    euler = calls[0::2]                                     # the first call of each step
    assert len(euler) == num_steps
    for i, (_, sigma, _) in enumerate(euler):
        boost = gamma if 0.05 <= t[i] <= 10.0 else 0.0
        torch.testing.assert_close(sigma.reshape(-1)[0], t[i] * (1 + boost), rtol=1e-12, atol=0)


#----------------------------------------------------------------------------
# The probability-flow ODE of Gaussian data.

def gaussian_endpoint(mu, s, latents, sigma_max=80.0):
    """Exact ODE solution at sigma = 0 from x_0 = z sigma_max: mu + (x_0 - mu) s / sqrt(s^2 + sigma_max^2)."""
    return mu + (latents.double() * sigma_max - mu) * s / math.sqrt(s ** 2 + sigma_max ** 2)


@given(b=BATCHES, shape=SHAPES, s=DATA_STDS, seed=SEEDS)
def test_sampler_solves_the_gaussian_probability_flow_ode(b, shape, s, seed):
    """For N(mu, s^2 I) data the Heun error is small and falls second-order: 8 -> 32 -> 128 steps."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1
    latents = torch.randn(b, *shape, generator=g, dtype=torch.float64)
    exact = gaussian_endpoint(mu, s, latents)
    denoise = gaussian_denoiser(mu, s)
    errors = [(memdiff.edm_sampler(denoise, latents, num_steps=n) - exact).abs().max().item()
              for n in [8, 32, 128]]
    scale = (exact - mu).abs().max().item()
    # Heun shrinks the error about 16x per 4x steps here; Euler alone would only manage 4x.
    assert errors[0] > 8 * errors[1] and errors[1] > 8 * errors[2]
    assert errors[2] < 5e-3 * scale


def test_sampler_with_the_paper_settings_lands_near_the_gaussian_endpoint():
    """With the paper's 18 steps the sampler is within 5% of the exact endpoint for N(0.3, 1)."""
    latents = torch.randn(256, 4, generator=torch.Generator().manual_seed(0))
    exact = gaussian_endpoint(torch.tensor(0.3, dtype=torch.float64), 1.0, latents)
    out = memdiff.edm_sampler(gaussian_denoiser(0.3, 1.0), latents)
    rel = ((out.double() - exact).norm() / (exact - 0.3).norm()).item()
    assert rel < 0.05


#----------------------------------------------------------------------------
# Every parameter reaches the loop, and the defaults are the paper's: against Heun written out.

def heun_by_hand(denoise, latents, labels, num_steps, sigma_min, sigma_max, rho, S_churn, S_min,
                 S_max, S_noise, generator):
    """EDM's Algorithm 2 in float64 Python-level steps, independent of memdiff's sigma schedule."""
    n = num_steps
    t = [(sigma_max ** (1 / rho) + i / (n - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho)))
         ** rho for i in range(n)] + [0.0]
    x = latents.double() * t[0]
    for i in range(n):
        gamma = min(S_churn / n, math.sqrt(2) - 1) if S_min <= t[i] <= S_max else 0.0
        t_hat = t[i] * (1 + gamma)
        if gamma > 0:
            eps = torch.randn(x.shape, generator=generator, dtype=torch.float64)
            x = x + math.sqrt(t_hat ** 2 - t[i] ** 2) * S_noise * eps
        d = (x - denoise(x, torch.tensor(t_hat, dtype=torch.float64), labels)) / t_hat
        x_next = x + (t[i + 1] - t_hat) * d
        if i < n - 1:
            d2 = (x_next - denoise(x_next, torch.tensor(t[i + 1], dtype=torch.float64), labels)) \
                / t[i + 1]
            x_next = x + (t[i + 1] - t_hat) * (d + d2) / 2
        x = x_next
    return x


PAPER_SAMPLER = dict(num_steps=18, sigma_min=0.002, sigma_max=80, rho=7, S_churn=0, S_min=0,
                     S_max=float('inf'), S_noise=1)
SAMPLER_SETTINGS = st.fixed_dictionaries({
    'num_steps': st.integers(2, 12), 'sigma_min': st.floats(0.005, 0.5),
    'sigma_max': st.floats(2.0, 60.0), 'rho': st.floats(1.5, 9.0), 'S_churn': st.floats(0.0, 8.0),
    'S_min': st.floats(0.0, 1.0), 'S_max': st.floats(1.0, 50.0), 'S_noise': st.floats(0.5, 1.5)})


def labelled_denoiser():
    """A nonlinear denoiser that uses the labels: D = tanh(x) * (1 + label) * sigma / (1 + sigma)."""
    def denoise(x, sigma, labels):
        s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *[1] * (x.dim() - 1))
        scale = 1 + labels.argmax(1).to(x.dtype).reshape(-1, *[1] * (x.dim() - 1))
        return torch.tanh(x) * scale * s / (1 + s)
    return denoise


@given(settings=SAMPLER_SETTINGS, seed=SEEDS)
def test_sampler_equals_heun_by_hand_for_any_settings(settings, seed):
    """edm_sampler(num_steps, sigma_min, sigma_max, rho, S_churn, S_min, S_max, S_noise) is Alg. 2."""
    latents = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(seed))
    labels = torch.eye(3)[[2, 0, 1]]
    got = memdiff.edm_sampler(labelled_denoiser(), latents, labels, **settings,
                              generator=torch.Generator().manual_seed(seed + 1))
    expected = heun_by_hand(labelled_denoiser(), latents, labels, **settings,
                            generator=torch.Generator().manual_seed(seed + 1))
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_sampler_defaults_are_the_papers():
    """Called with defaults, the sampler is Heun with 18 steps, sigma in [0.002, 80], rho 7, no churn."""
    latents = torch.randn(2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels = torch.eye(3)[[1, 2]]
    got = memdiff.edm_sampler(labelled_denoiser(), latents, labels)
    expected = heun_by_hand(labelled_denoiser(), latents, labels, **PAPER_SAMPLER, generator=None)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(memdiff.edm_sigma_steps(), torch.tensor(
        [(80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7 for i in range(18)]
        + [0.0], dtype=torch.float64), rtol=1e-12, atol=0)


def test_churn_with_the_default_range_and_noise_applies_at_every_level():
    """S_churn alone: the defaults S_min = 0, S_max = inf, S_noise = 1 churn at every step, as EDM."""
    latents = torch.randn(2, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    labels = torch.eye(3)[[0, 2]]
    got = memdiff.edm_sampler(labelled_denoiser(), latents, labels, num_steps=6, S_churn=4,
                              generator=torch.Generator().manual_seed(2))
    expected = heun_by_hand(labelled_denoiser(), latents, labels, **{
        **PAPER_SAMPLER, 'num_steps': 6, 'S_churn': 4}, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize('declared, expected', [
    ((0.02, 100.0), (0.02, 80.0)), ((0.0, 10.0), (0.002, 10.0)), ((0.01, 50.0), (0.01, 50.0))])
def test_sampler_clamps_its_range_to_the_denoisers(declared, expected):
    """sigma_min, sigma_max are clamped into the denoiser's declared [sigma_min, sigma_max]."""
    calls = []
    base = recording(gaussian_denoiser(torch.zeros(3, dtype=torch.float64), 1.0), calls)

    class Declared:
        sigma_min, sigma_max = declared

        def __call__(self, x, sigma, labels=None):
            return base(x, sigma, labels)
    memdiff.edm_sampler(Declared(), torch.zeros(1, 3), num_steps=5)
    sigmas = [float(c[1].reshape(-1)[0]) for c in calls]
    assert math.isclose(sigmas[0], expected[1], rel_tol=1e-12)
    assert math.isclose(sigmas[-1], expected[0], rel_tol=1e-9)
