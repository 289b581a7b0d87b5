"""The EDM sampler: its noise levels, its calling convention, churn, and the ODE it solves."""

import math

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
