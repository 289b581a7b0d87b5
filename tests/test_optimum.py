"""The empirical optimum D*: exactness, limits, symmetries, and the headline: it replicates its data."""

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import memdiff

# Strategies. Bounds are small for speed.
SEEDS = st.integers(0, 2**31 - 1)
TRAIN_SIZES = st.integers(1, 12)
BATCHES = st.integers(1, 4)
SHAPES = st.sampled_from([(1, 2, 2), (1, 3, 3), (2, 2, 2), (3, 2, 1)])
SIGMAS = st.floats(math.log(0.05), math.log(20)).map(math.exp)   # log-uniform
NUM_CLASSES = st.integers(1, 4)
SCALES = st.floats(0.1, 10)
HEADLINE_SIZES = st.integers(2, 64)
HEADLINE_SHAPES = st.sampled_from([(1, 4, 4), (1, 8, 8)])
MIN_SEPARATION = 0.5                                        # L2 between any two training images


def draw(seed, *shape, dtype=torch.float64):
    """Uniform values in [-1, 1] from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)


def brute_optimum(x, y, sigma, labels=None, classes=None):
    """D*(x; sigma) in float64 from explicit pairwise differences and a plain softmax."""
    x64, y64 = x.flatten(1).double(), y.flatten(1).double()
    d2 = ((x64[:, None, :] - y64[None, :, :]) ** 2).sum(-1)            # [B, N]
    sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1)
    logits = -d2 / (2 * sigma ** 2)
    if classes is not None:
        logits = logits.masked_fill(classes[:, None] != labels[None, :], -math.inf)
    return (logits.softmax(1) @ y64).reshape(x.shape)


def balanced_labels(seed, n, num_classes):
    """n labels covering every one of num_classes classes, in a seeded random order."""
    g = torch.Generator().manual_seed(seed)
    return (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]


def separated_images(seed, n, shape):
    """n images in [-1, 1], or None when two lie closer than MIN_SEPARATION."""
    images = draw(seed, n, *shape, dtype=torch.float32)
    flat = images.flatten(1).double()
    d = torch.cdist(flat, flat) + torch.eye(n) * 1e9
    return images if d.min() >= MIN_SEPARATION else None


def nearest_gap(x, y):
    """Smallest gap between the squared distances to the nearest and second-nearest image [B]."""
    d2 = ((x.flatten(1)[:, None] - y.flatten(1)[None]) ** 2).sum(-1).double().sort(1).values
    return (d2[:, 1] - d2[:, 0]).min().item() if d2.shape[1] > 1 else math.inf


#----------------------------------------------------------------------------
# Exactness against float64 brute force.

@pytest.mark.parametrize('sigma_form', ['float', 'vector', 'column'])
@given(n=TRAIN_SIZES, b=BATCHES, shape=SHAPES, sigma=SIGMAS, seed=SEEDS)
def test_optimum_equals_float64_brute_force(sigma_form, n, b, shape, sigma, seed):
    """D* equals softmax(-||x - y_i||^2 / 2 sigma^2)-weighted images, sigma as float, [B] or [B,1,1,1]."""
    y, x = draw(seed, n, *shape), 1.5 * draw(seed + 1, b, *shape)
    sigmas = sigma * torch.linspace(1, 2, b, dtype=torch.float64)        # one sigma per sample
    arg = {'float': sigma, 'vector': sigmas, 'column': sigmas.reshape(b, *[1] * len(shape))}
    expected = brute_optimum(x, y, sigma if sigma_form == 'float' else sigmas)
    out = memdiff.OptimalDenoiser(y)(x, arg[sigma_form])
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-9)


@given(n=TRAIN_SIZES, b=BATCHES, shape=SHAPES, num_classes=NUM_CLASSES, sigma=SIGMAS, seed=SEEDS)
def test_conditional_optimum_equals_brute_force_over_its_class(n, b, shape, num_classes, sigma, seed):
    """With labels, D* sums only over training images of the sample's class (one-hot or int)."""
    assume(n >= num_classes)
    y, x = draw(seed, n, *shape), 1.5 * draw(seed + 1, b, *shape)
    labels = balanced_labels(seed, n, num_classes)
    classes = torch.randint(num_classes, (b,), generator=torch.Generator().manual_seed(seed + 2))
    optimum = memdiff.OptimalDenoiser(y, labels)
    expected = brute_optimum(x, y, sigma, labels, classes)
    one_hot = torch.nn.functional.one_hot(classes, num_classes).float()
    torch.testing.assert_close(optimum(x, sigma, one_hot), expected, rtol=0, atol=1e-9)
    torch.testing.assert_close(optimum(x, sigma, classes), expected, rtol=0, atol=1e-9)
    torch.testing.assert_close(optimum(x, sigma, None), brute_optimum(x, y, sigma), rtol=0, atol=1e-9)


def test_conditional_optimum_of_a_class_without_images_is_the_unconditional_optimum():
    """A sample whose class has no training image gets the unconditional optimum (the rule for empty
    random classes); the other samples keep their class's optimum, and unseen() marks the first."""
    y = draw(0, 4, 1, 2, 2)
    labels = torch.tensor([0, 2, 0, 2])
    optimum = memdiff.OptimalDenoiser(y, labels)
    x, classes = y[:3] + 0.3, torch.tensor([0, 1, 2])
    got = optimum(x, 0.7, torch.eye(3)[classes])
    torch.testing.assert_close(got[1:2], brute_optimum(x[1:2], y, 0.7), rtol=0, atol=1e-9)
    torch.testing.assert_close(got[[0, 2]], brute_optimum(x[[0, 2]], y, 0.7, labels, classes[[0, 2]]),
                               rtol=0, atol=1e-9)
    assert optimum.unseen(classes).tolist() == [False, True, False]
    torch.testing.assert_close(optimum(x, 0.7, classes), got, rtol=0, atol=0)


#----------------------------------------------------------------------------
# Limits.

@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@given(n=TRAIN_SIZES, b=BATCHES, shape=SHAPES, seed=SEEDS)
def test_optimum_tends_to_nearest_neighbour_as_sigma_goes_to_zero(dtype, n, b, shape, seed):
    """At sigma = 0 D* is exactly the nearest training image (no NaN); at sigma = 1e-4 it is close."""
    y, x = draw(seed, n, *shape, dtype=dtype), 1.5 * draw(seed + 1, b, *shape, dtype=dtype)
    assume(nearest_gap(x, y) > 1e-3)                        # no near-ties between two neighbours
    d2 = ((x.double().flatten(1)[:, None] - y.double().flatten(1)[None]) ** 2).sum(-1)
    nearest = y[d2.argmin(1)]
    optimum = memdiff.OptimalDenoiser(y)
    assert torch.equal(optimum(x, 0.0), nearest)
    assert torch.equal(optimum(x, torch.zeros(b)), nearest)
    torch.testing.assert_close(optimum(x, 1e-4), nearest, rtol=0, atol=1e-6)


@given(n=TRAIN_SIZES, b=BATCHES, shape=SHAPES, seed=SEEDS)
def test_optimum_tends_to_the_mean_as_sigma_grows(n, b, shape, seed):
    """At sigma = 1e6 D* is the mean of the training set, whatever x is."""
    y, x = draw(seed, n, *shape), 1.5 * draw(seed + 1, b, *shape)
    out = memdiff.OptimalDenoiser(y)(x, 1e6)
    torch.testing.assert_close(out, y.mean(0).expand_as(x), rtol=0, atol=1e-9)


@given(b=BATCHES, shape=SHAPES, sigma=st.sampled_from([0.0, 1e-3, 1.0, 1e6]), seed=SEEDS)
def test_optimum_of_one_image_returns_it(b, shape, sigma, seed):
    """With N = 1, D*(x; sigma) = y_1 for every x and sigma."""
    y, x = draw(seed, 1, *shape), 10 * draw(seed + 1, b, *shape)
    assert torch.equal(memdiff.OptimalDenoiser(y)(x, sigma), y.expand_as(x))


@given(n=TRAIN_SIZES, b=BATCHES, shape=SHAPES, sigma=SIGMAS, seed=SEEDS)
def test_unique_labels_make_the_optimum_return_the_labelled_image(n, b, shape, sigma, seed):
    """With one class per image, the conditional optimum returns the image of the given label."""
    y, x = draw(seed, n, *shape), 1.5 * draw(seed + 1, b, *shape)
    labels, label_dim = memdiff.assign_labels(torch.zeros(n, dtype=torch.long), 'unique')
    which = torch.randint(n, (b,), generator=torch.Generator().manual_seed(seed + 2))
    one_hot = torch.nn.functional.one_hot(which, label_dim).float()
    out = memdiff.OptimalDenoiser(y, labels)(x, sigma, one_hot)
    torch.testing.assert_close(out, y[which], rtol=0, atol=1e-12)


#----------------------------------------------------------------------------
# Symmetries and implementation invariances.

@given(n=TRAIN_SIZES, b=BATCHES, shape=SHAPES, sigma=SIGMAS, seed=SEEDS)
def test_optimum_is_invariant_to_permuting_the_training_set(n, b, shape, sigma, seed):
    """Reordering the training images (and their labels) does not change D*."""
    y, x = draw(seed, n, *shape), 1.5 * draw(seed + 1, b, *shape)
    labels = balanced_labels(seed, n, 2) if n >= 2 else None
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 2))
    onehot = None if labels is None else torch.eye(2)[torch.arange(b) % 2]
    for classes in [None, onehot]:
        a = memdiff.OptimalDenoiser(y, labels)(x, sigma, classes)
        p = memdiff.OptimalDenoiser(y[perm], None if labels is None else labels[perm])(x, sigma, classes)
        torch.testing.assert_close(p, a, rtol=0, atol=1e-12)


@given(n=TRAIN_SIZES, b=BATCHES, shape=SHAPES, sigma=SIGMAS, scale=SCALES, seed=SEEDS)
def test_optimum_is_equivariant_to_shift_and_scale(n, b, shape, sigma, scale, seed):
    """With data a y + b, input a x + b and noise a sigma, the optimum is a D*(x; sigma) + b."""
    y, x = draw(seed, n, *shape), 1.5 * draw(seed + 1, b, *shape)
    shift = 3 * draw(seed + 2, *shape)                      # one offset per pixel, shared by all
    base = memdiff.OptimalDenoiser(y)(x, sigma)
    moved = memdiff.OptimalDenoiser(scale * y + shift)(scale * x + shift, scale * sigma)
    torch.testing.assert_close(moved, scale * base + shift, rtol=0, atol=1e-9 * (scale + 3))


@given(n=TRAIN_SIZES, b=BATCHES, shape=SHAPES, sigma=st.one_of(st.just(0.0), SIGMAS), seed=SEEDS)
def test_optimum_does_not_depend_on_the_chunk_size(n, b, shape, sigma, seed):
    """Chunks of 1, 3 or N images (online softmax) give the one-pass result, with or without labels."""
    y, x = draw(seed, n, *shape), 1.5 * draw(seed + 1, b, *shape)
    labels = balanced_labels(seed, n, 2) if n >= 2 else torch.zeros(n, dtype=torch.long)
    classes = torch.eye(2)[torch.arange(b) % 2] if n >= 2 else torch.eye(1).expand(b, 1)
    for c in [None, classes]:
        whole = memdiff.OptimalDenoiser(y, labels)(x, sigma, c)
        for chunk in [1, 3, n]:
            part = memdiff.OptimalDenoiser(y, labels, chunk=chunk)(x, sigma, c)
            torch.testing.assert_close(part, whole, rtol=0, atol=1e-12)


@given(n=TRAIN_SIZES, shape=SHAPES, sigma=SIGMAS, step=st.floats(1e-3, 1.0), seed=SEEDS)
def test_optimum_minimises_the_posterior_weighted_loss(n, shape, sigma, step, seed):
    """For fixed x, sum_i w_i ||D - y_i||^2 is least at D* and grows by exactly ||delta||^2."""
    y, x = draw(seed, n, *shape), 1.5 * draw(seed + 1, 1, *shape)
    d2 = ((x.flatten(1) - y.flatten(1)) ** 2).sum(1)
    w = torch.softmax(-d2 / (2 * sigma ** 2), 0)            # posterior over training images [N]
    loss = lambda D: (w * ((D.flatten(1) - y.flatten(1)) ** 2).sum(1)).sum()
    best = memdiff.OptimalDenoiser(y)(x, sigma)
    delta = step * draw(seed + 2, 1, *shape)
    assert loss(best + delta) > loss(best)
    torch.testing.assert_close(loss(best + delta) - loss(best), (delta ** 2).sum(), rtol=1e-6, atol=1e-12)


#----------------------------------------------------------------------------
# The headline: sampling the optimum replicates the training data [1, sec. 3].

@given(n=HEADLINE_SIZES, shape=HEADLINE_SHAPES, seed=SEEDS)
def test_optimum_samples_are_all_memorized(n, shape, seed):
    """Heun sampling with the unconditional optimum lands every sample on a training image."""
    y = separated_images(seed, n, shape)
    assume(y is not None)
    latents = torch.randn(8, *shape, generator=torch.Generator().manual_seed(seed + 1))
    samples = memdiff.edm_sampler(memdiff.OptimalDenoiser(y), latents, num_steps=18)
    assert memdiff.memorization_ratio(samples, y) == 1.0
    distances, _ = memdiff.nearest_neighbors(samples, y, k=1)
    assert distances.max() < 1e-4


@given(n=HEADLINE_SIZES, shape=HEADLINE_SHAPES, num_classes=NUM_CLASSES, seed=SEEDS)
def test_conditional_optimum_samples_land_in_their_own_class(n, shape, num_classes, seed):
    """Class-conditional sampling of the optimum lands each sample on a training image of its class."""
    assume(n >= num_classes)
    y = separated_images(seed, n, shape)
    assume(y is not None)
    labels = balanced_labels(seed, n, num_classes)
    g = torch.Generator().manual_seed(seed + 1)
    classes = torch.randint(num_classes, (8,), generator=g)
    latents = torch.randn(8, *shape, generator=g)
    samples = memdiff.edm_sampler(memdiff.OptimalDenoiser(y, labels), latents,
                                  torch.nn.functional.one_hot(classes, num_classes).float())
    assert memdiff.memorization_ratio(samples, y) == 1.0
    for sample, c in zip(samples, classes):
        own = y[labels == c].flatten(1)
        assert (own - sample.flatten()).norm(dim=1).min() < 1e-4


@given(n=HEADLINE_SIZES, shape=HEADLINE_SHAPES, seed=SEEDS)
def test_unique_label_samples_are_their_labelled_images(n, shape, seed):
    """With one unique label per image, the optimum's sample for label i is training image i."""
    y = separated_images(seed, n, shape)
    assume(y is not None)
    labels, label_dim = memdiff.assign_labels(torch.zeros(n, dtype=torch.long), 'unique')
    g = torch.Generator().manual_seed(seed + 1)
    which = torch.randint(n, (8,), generator=g)
    latents = torch.randn(8, *shape, generator=g)
    samples = memdiff.edm_sampler(memdiff.OptimalDenoiser(y, labels), latents,
                                  torch.nn.functional.one_hot(which, label_dim).float())
    torch.testing.assert_close(samples, y[which], rtol=0, atol=1e-4)


def test_optimum_memorizes_the_real_digits():
    """On 200 class-balanced digits, every one of 64 optimum samples is memorized."""
    images, labels = memdiff.load_dataset('digits')
    y = images[memdiff.balanced_subset(labels, 200)]
    latents = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    samples = memdiff.edm_sampler(memdiff.OptimalDenoiser(y), latents)
    assert memdiff.memorization_ratio(samples, y) == 1.0
    assert memdiff.memorization_ratio(memdiff.quantize_uint8(samples), y) == 1.0
