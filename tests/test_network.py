"""The U-Net (parameter counts, shapes, skip switches, labels), preconditioning and the losses."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import memdiff

# Strategies. Bounds are small for speed.
SEEDS = st.integers(0, 2**31 - 1)
SIGMAS = st.floats(math.log(0.002), math.log(80)).map(math.exp)    # the sampler's range, log-uniform
VP_TIMES = st.floats(1e-5, 1.0)
KINDS = st.sampled_from(['edm', 'vp', 've'])
TINY_CONFIGS = st.fixed_dictionaries({
    'img_resolution': st.sampled_from([8, 16]),
    'in_channels': st.integers(1, 3),
    'out_channels': st.integers(1, 3),
    'label_dim': st.integers(0, 3),
    'model_channels': st.sampled_from([8, 16]),
    'channel_mult': st.lists(st.integers(1, 3), min_size=1, max_size=3).map(tuple),
    'num_blocks': st.integers(1, 2),
    'attn_levels': st.sets(st.integers(0, 2), max_size=2),
    'arch': st.sampled_from(['ddpmpp', 'ncsnpp']),
    'embedding': st.sampled_from([None, 'positional', 'fourier']),   # no parameters either way
})


def tiny_unet(**overrides):
    """A small DDPM++ for 8x8x1 images (the digits default of the README, width 16)."""
    kwargs = dict(img_resolution=8, in_channels=1, out_channels=1, model_channels=16,
                  channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,), dropout=0.0)
    kwargs.update(overrides)
    return memdiff.UNet(**kwargs)


def perturb(net, seed):
    """Overwrite every parameter with seeded noise, so that no output layer starts near zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            torch.nn.init.normal_(p, 0.0, 1 / math.sqrt(fan_in), generator=g)
    return net.eval()


def num_params(net):
    return sum(p.numel() for p in net.parameters())


def expected_num_params(img_resolution, in_channels, out_channels, label_dim=0, model_channels=128,
                        channel_mult=(2, 2, 2), num_blocks=2, attn_resolutions=(16,), arch='ddpmpp'):
    """Parameter count of the DDPM++ architecture written out layer by layer (independent of memdiff)."""
    conv = lambda cin, cout, k: cin * cout * k * k + cout
    linear = lambda cin, cout: cin * cout + cout
    norm = lambda c: 2 * c
    emb = 4 * model_channels

    def block(cin, cout, attention=False, resample=False):
        n = norm(cin) + conv(cin, cout, 3) + linear(emb, cout) + norm(cout) + conv(cout, cout, 3)
        if cin != cout or resample:
            n += conv(cin, cout, 1)
        if attention:
            n += norm(cout) + conv(cout, 3 * cout, 1) + conv(cout, cout, 1)
        return n

    noise = model_channels * (1 if arch == 'ddpmpp' else 2)
    total = linear(noise, emb) + linear(emb, emb) + (linear(label_dim, noise) if label_dim else 0)
    skips, c, caux = [], in_channels, in_channels
    for level, mult in enumerate(channel_mult):                 # encoder
        res = img_resolution >> level
        if level == 0:
            total += conv(c, model_channels, 3)
            c = model_channels
        else:
            total += block(c, c, resample=True)
            if arch == 'ncsnpp':                                # residual path of the input image
                total += conv(caux, c, 3)
                caux = c
        skips.append(c)
        for _ in range(num_blocks):
            total += block(c, model_channels * mult, attention=res in attn_resolutions)
            c = model_channels * mult
            skips.append(c)
    for level, mult in reversed(list(enumerate(channel_mult))):  # decoder
        res = img_resolution >> level
        if level == len(channel_mult) - 1:
            total += block(c, c, attention=True) + block(c, c)
        else:
            total += block(c, c, resample=True)
        for idx in range(num_blocks + 1):
            attention = idx == num_blocks and res in attn_resolutions
            total += block(c + skips.pop(), model_channels * mult, attention=attention)
            c = model_channels * mult
    return total + norm(c) + conv(c, out_channels, 3)


#----------------------------------------------------------------------------
# The U-Net.

@pytest.mark.parametrize('overrides, count', [
    ({}, 35_125_251),
    ({'num_blocks': 4}, 55_732_739),
    ({'label_dim': 10}, 35_126_659),
    ({'arch': 'ncsnpp'}, 35_788_035),
], ids=['ddpmpp', 'ddpmpp-4-blocks', 'ddpmpp-10-labels', 'ncsnpp'])
def test_unet_has_the_study_parameter_counts(overrides, count):
    """The study's 32x32x3 networks have exactly the published parameter counts."""
    assert expected_num_params(32, 3, 3, **overrides) == count    # the reference itself is right
    assert num_params(memdiff.UNet(32, 3, 3, **overrides)) == count


@given(config=TINY_CONFIGS, seed=SEEDS)
def test_unet_parameter_count_and_shape_follow_the_architecture(config, seed):
    """Any small configuration has the layer-by-layer parameter count and maps [B,C,H,W] to [B,C',H,W]."""
    config = dict(config)
    levels = config.pop('attn_levels')
    config['attn_resolutions'] = tuple(config['img_resolution'] >> l for l in sorted(levels))
    net = memdiff.UNet(**config, dropout=0.0)
    del config['embedding']
    assert num_params(net) == expected_num_params(**config)
    g = torch.Generator().manual_seed(seed)
    r, B = config['img_resolution'], 2
    x = torch.randn(B, config['in_channels'], r, r, generator=g)
    labels = None
    if config['label_dim']:
        labels = torch.eye(config['label_dim'])[torch.randint(config['label_dim'], (B,), generator=g)]
    out = net.eval()(x, torch.randn(B, generator=g), labels)
    assert out.shape == (B, config['out_channels'], r, r) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize('arch', ['ddpmpp', 'ncsnpp'])
@pytest.mark.parametrize('resolution', [8, 16, 32])
def test_unet_output_has_input_resolution(arch, resolution):
    """Both architectures map [B, 3, r, r] to [B, 2, r, r] at r = 8, 16 and 32."""
    net = tiny_unet(img_resolution=resolution, in_channels=3, out_channels=2, arch=arch,
                    attn_resolutions=(resolution // 2,))
    x = torch.randn(2, 3, resolution, resolution, generator=torch.Generator().manual_seed(0))
    out = perturb(net, 0)(x, torch.tensor([0.3, -1.2]))
    assert out.shape == (2, 2, resolution, resolution)
    assert torch.isfinite(out).all()


SKIP_SWITCHES = st.lists(st.integers(0, 1), min_size=4, max_size=4).filter(lambda s: 0 in s)


@given(skips=SKIP_SWITCHES, seed=SEEDS)
def test_disabling_skips_keeps_parameters_and_changes_output(skips, seed):
    """Switching skips off leaves the parameter count alone but changes the output; all on = None."""
    g = torch.Generator().manual_seed(seed)
    x, c_noise = torch.randn(2, 1, 8, 8, generator=g), torch.randn(2, generator=g)
    full = perturb(tiny_unet(), seed)
    all_on = perturb(tiny_unet(skips=[1, 1, 1, 1]), seed)
    ablated = perturb(tiny_unet(skips=skips), seed)         # 4 skips: len((1, 2)) * (1 + 1)
    assert num_params(ablated) == num_params(full)
    with torch.no_grad():
        reference = full(x, c_noise)
        torch.testing.assert_close(all_on(x, c_noise), reference)
        assert (ablated(x, c_noise) - reference).abs().max() > 1e-3


@pytest.mark.parametrize('skips', [[1, 1, 1], [1] * 5, [], [1] * 9])
def test_wrong_number_of_skip_switches_raises(skips):
    """A skips list whose length is not len(channel_mult) * (num_blocks + 1) raises ValueError."""
    with pytest.raises(ValueError):
        tiny_unet(skips=skips)


@given(seed=SEEDS)
def test_class_labels_change_the_output(seed):
    """Different one-hot labels give different outputs; no labels equals the all-zero label."""
    g = torch.Generator().manual_seed(seed)
    net = perturb(tiny_unet(label_dim=3), seed)
    x, c_noise = torch.randn(2, 1, 8, 8, generator=g), torch.randn(2, generator=g)
    eye = torch.eye(3)
    with torch.no_grad():
        out0, out1 = net(x, c_noise, eye[[0, 0]]), net(x, c_noise, eye[[1, 2]])
        assert (out0 - out1).abs().max() > 1e-3
        torch.testing.assert_close(net(x, c_noise, None), net(x, c_noise, torch.zeros(2, 3)))


def test_eval_mode_is_deterministic_and_train_mode_drops_out():
    """With dropout, eval() gives identical outputs on repeated calls; train() does not."""
    net = perturb(tiny_unet(dropout=0.5), 0)
    g = torch.Generator().manual_seed(1)
    x, c_noise = torch.randn(2, 1, 8, 8, generator=g), torch.randn(2, generator=g)
    with torch.no_grad():
        assert torch.equal(net.eval()(x, c_noise), net(x, c_noise))
        net.train()
        torch.manual_seed(0)                                # dropout draws from the global RNG
        assert not torch.equal(net(x, c_noise), net(x, c_noise))


#----------------------------------------------------------------------------
# Preconditioning.

def expected_coefficients(kind, sigma, sigma_data=0.5, beta_d=19.9, beta_min=0.1):
    """(c_skip, c_out, c_in, c_noise) of EDM Table 1 in float64 Python arithmetic."""
    if kind == 'edm':
        s2 = sigma ** 2 + sigma_data ** 2
        return (sigma_data ** 2 / s2, sigma * sigma_data / math.sqrt(s2), 1 / math.sqrt(s2),
                math.log(sigma) / 4)
    if kind == 'vp':
        # t solves beta_d t^2 / 2 + beta_min t = ln(1 + sigma^2), the positive root.
        t = (math.sqrt(beta_min ** 2 + 2 * beta_d * math.log1p(sigma ** 2)) - beta_min) / beta_d
        return 1.0, -sigma, 1 / math.sqrt(sigma ** 2 + 1), 999 * t
    return 1.0, sigma, 1.0, math.log(sigma / 2)


@given(kind=KINDS, sigma=SIGMAS)
def test_precond_coefficients_match_the_formulas(kind, sigma):
    """coefficients(sigma) equals the EDM, VP and VE formulas evaluated in float64."""
    precond = memdiff.Precond(tiny_unet(), kind=kind)
    got = precond.coefficients(torch.tensor([sigma], dtype=torch.float64))
    for name, value, expected in zip(['c_skip', 'c_out', 'c_in', 'c_noise'], got,
                                     expected_coefficients(kind, sigma)):
        # c_noise is a float32 network input; 1e-3 is a millionth of VP's 0..999 range.
        atol = 1e-3 if name == 'c_noise' else 0.0
        assert math.isclose(float(value.reshape(-1)[0]), expected, rel_tol=1e-5, abs_tol=atol), name


@given(t=VP_TIMES)
def test_vp_sigma_and_its_inverse_agree(t):
    """vp_sigma is sqrt(exp(beta_d t^2/2 + beta_min t) - 1) and vp_sigma_inv undoes it."""
    sigma = memdiff.vp_sigma(torch.tensor(t, dtype=torch.float64))
    assert math.isclose(float(sigma), math.sqrt(math.expm1(19.9 * t * t / 2 + 0.1 * t)), rel_tol=1e-9)
    assert math.isclose(float(memdiff.vp_sigma_inv(sigma)), t, rel_tol=1e-6)


@given(kind=KINDS, sigma=SIGMAS, seed=SEEDS)
def test_precond_composes_skip_and_scaled_network(kind, sigma, seed):
    """Precond(x; sigma) = c_skip x + c_out F(c_in x; c_noise) for every kind, sigma as float or tensor."""
    g = torch.Generator().manual_seed(seed)
    net = perturb(tiny_unet(label_dim=2), seed)
    precond = memdiff.Precond(net, kind=kind)
    x = torch.randn(3, 1, 8, 8, generator=g) * (sigma + 0.5)
    labels = torch.eye(2)[[0, 1, 1]]
    c_skip, c_out, c_in, c_noise = expected_coefficients(kind, sigma)
    with torch.no_grad():
        expected = c_skip * x + c_out * net(c_in * x, torch.full((3,), c_noise), labels)
        for sigma_arg in [sigma, torch.full((3,), sigma), torch.full((3, 1, 1, 1), sigma)]:
            out = precond(x, sigma_arg, labels)
            assert out.dtype == torch.float32 and out.shape == x.shape
            torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4 * (1 + sigma))


@pytest.mark.parametrize('kind', ['edm', 'vp', 've'])
def test_precond_tends_to_identity_as_sigma_goes_to_zero(kind):
    """D(x; sigma) -> x as sigma -> 0, with a network whose output is far from zero."""
    precond = memdiff.Precond(perturb(tiny_unet(), 0), kind=kind)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        errors = [(precond(x, s) - x).abs().max().item() for s in [1e-1, 1e-3, 1e-5]]
    assert errors[0] > 1e-3                                   # the network does contribute
    assert errors[1] < errors[0] and errors[2] < 1e-3


#----------------------------------------------------------------------------
# Losses.

def recording_denoiser(calls, scale=0.3):
    """A denoiser D(x) = scale * x that records (x, sigma, labels) for each call."""
    def denoise(x, sigma, class_labels=None):
        calls.append((x.clone(), sigma.clone(), class_labels))
        return scale * x
    return denoise


def expected_weight(kind, sigma):
    return (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2 if kind == 'edm' else 1 / sigma ** 2


@given(kind=KINDS, seed=SEEDS)
def test_loss_is_weighted_squared_error_per_sample(kind, seed):
    """loss[b] = lambda(sigma_b) * sum over pixels of (D(y_b + n_b; sigma_b) - y_b)^2, shape [B], >= 0."""
    y = torch.rand(4, 1, 4, 4, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    calls = []
    labels = torch.eye(3)[[0, 1, 2, 0]]
    loss = memdiff.LOSSES[kind](recording_denoiser(calls), y, labels,
                                generator=torch.Generator().manual_seed(seed))
    assert loss.shape == (4,) and torch.isfinite(loss).all() and (loss >= 0).all()
    (x, sigma, seen_labels), = calls
    assert sigma.shape == (4, 1, 1, 1) and seen_labels is labels
    expected = expected_weight(kind, sigma.double()) * (0.3 * x.double() - y.double()) ** 2
    torch.testing.assert_close(loss.double(), expected.flatten(1).sum(1), rtol=1e-4, atol=1e-6)


@given(kind=KINDS, seed=SEEDS)
def test_loss_adds_sigma_times_the_generators_next_normal_draw(kind, seed):
    """The denoiser sees y + sigma * eps, eps the generator's normal draw after the sigma draw."""
    y = torch.rand(4, 1, 4, 4, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    calls = []
    memdiff.LOSSES[kind](recording_denoiser(calls), y, generator=torch.Generator().manual_seed(seed))
    (x, sigma, _), = calls
    g = torch.Generator().manual_seed(seed)
    (torch.randn if kind == 'edm' else torch.rand)([4, 1, 1, 1], generator=g)  # the sigma draw
    torch.testing.assert_close(x, y + sigma * torch.randn(y.shape, generator=g))

@pytest.mark.parametrize('kind', ['edm', 'vp', 've'])
def test_loss_draws_noise_levels_from_the_documented_distribution(kind):
    """The noise n = x - y has variance sigma^2 and sigma follows the loss's own distribution."""
    y = torch.zeros(2000, 1, 2, 2)
    calls = []
    memdiff.LOSSES[kind](recording_denoiser(calls), y, generator=torch.Generator().manual_seed(0))
    (x, sigma, _), = calls
    assert torch.isclose(((x / sigma) ** 2).mean(), torch.tensor(1.0), atol=0.1)   # 8,000 draws
    log_sigma = sigma.double().log().flatten()
    if kind == 'edm':                                       # ln sigma ~ N(-1.2, 1.2^2)
        assert abs(log_sigma.mean() + 1.2) < 0.15 and abs(log_sigma.std() - 1.2) < 0.15
    elif kind == 'vp':                                      # t ~ U(1e-5, 1)
        t = memdiff.vp_sigma_inv(sigma.double().flatten())
        assert t.min() >= 1e-5 - 1e-9 and t.max() <= 1 + 1e-9
        assert abs(t.mean() - 0.5) < 0.05
    else:                                                   # ln sigma ~ U(ln 0.02, ln 100)
        lo, hi = math.log(0.02), math.log(100)
        assert log_sigma.min() >= lo - 1e-6 and log_sigma.max() <= hi + 1e-6
        assert abs(log_sigma.mean() - (lo + hi) / 2) < 0.2


@given(kind=KINDS, seed=SEEDS)
def test_loss_is_a_deterministic_function_of_the_generator_seed(kind, seed):
    """The same generator seed gives the same losses; another seed gives other losses."""
    y = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    denoise = lambda x, sigma, labels: 0.5 * x
    loss = lambda s: memdiff.LOSSES[kind](denoise, y, generator=torch.Generator().manual_seed(s))
    assert torch.equal(loss(seed), loss(seed))
    assert not torch.equal(loss(seed), loss(seed + 1))


@given(kind=KINDS, seed=SEEDS)
def test_loss_of_the_optimum_of_one_image_is_zero(kind, seed):
    """On a one-image data set the optimal denoiser returns that image, so the loss vanishes."""
    image = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    optimum = memdiff.OptimalDenoiser(image * 2 - 1)
    loss = memdiff.LOSSES[kind](optimum, (image * 2 - 1).expand(3, -1, -1, -1),
                                generator=torch.Generator().manual_seed(seed))
    assert loss.shape == (3,) and loss.abs().max() < 1e-12


#----------------------------------------------------------------------------
# NCSN++'s residual input path and class labels given as indices.

@pytest.mark.parametrize('arch', ['ddpmpp', 'ncsnpp'])
def test_state_dict_holds_the_parameters_and_the_frequencies_only(arch):
    """The FIR filters are fixed by the taps, so they are no state: a network file holds the
    parameters and the embedding's frequencies (random for Fourier), nothing else."""
    net = tiny_unet(arch=arch)
    assert set(net.state_dict()) == {name for name, _ in net.named_parameters()} | {'freqs'}

def test_ncsnpp_aux_path_is_edm_fused_down_conv():
    """The aux conv equals EDM's fused down conv: pad 2, conv, [1,3,3,1] FIR stride 2, bias last."""
    net = perturb(tiny_unet(img_resolution=16, in_channels=3, arch='ncsnpp'), 0)
    aux = net.aux['8']
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    w, b = aux.weight.detach(), aux.bias.detach()             # [16, 3, 3, 3], [16]
    taps = torch.tensor([1., 3., 3., 1.])
    fir = (taps.outer(taps) / taps.sum() ** 2).expand(16, 1, 4, 4)
    h = torch.nn.functional.conv2d(torch.nn.functional.pad(x, [2, 2, 2, 2]), w)  # [2,16,18,18]
    expected = torch.nn.functional.conv2d(h, fir, stride=2, groups=16) + b[:, None, None]
    with torch.no_grad():
        got = aux(x)
    assert got.shape == (2, 16, 8, 8)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # Conv-then-resample (padding each step with zeros) is not the same at the borders.
    plain = torch.nn.functional.conv2d(x, w, b, padding=1)
    unfused = torch.nn.functional.conv2d(plain, fir, stride=2, padding=1, groups=16)
    border = (unfused - expected).abs()
    assert border[..., 1:-1, 1:-1].max() < 1e-5 and border.max() > 1e-2


@given(seed=SEEDS, arch=st.sampled_from(['ddpmpp', 'ncsnpp']))
def test_class_indices_equal_one_hot_rows(seed, arch):
    """class_labels as int64 indices [B] give the output of the one-hot rows [B, L], in UNet and Precond."""
    g = torch.Generator().manual_seed(seed)
    net = perturb(tiny_unet(label_dim=5, arch=arch), seed)
    x, c_noise = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, generator=g)
    idx = torch.randint(5, (4,), generator=g)
    rows = torch.nn.functional.one_hot(idx, 5).float()
    with torch.no_grad():
        torch.testing.assert_close(net(x, c_noise, idx), net(x, c_noise, rows), rtol=1e-6, atol=1e-6)
        precond = memdiff.Precond(net, kind='vp')
        torch.testing.assert_close(precond(x, 0.7, idx), precond(x, 0.7, rows), rtol=1e-6, atol=1e-6)


def test_class_indices_out_of_range_raise():
    """An index outside [0, label_dim) is an error, not a silently wrapped negative index."""
    net = tiny_unet(label_dim=3).eval()
    x = torch.zeros(2, 1, 8, 8)
    for idx in ([0, 3], [-1, 0]):
        with pytest.raises(ValueError, match='class indices'):
            net(x, torch.zeros(2), torch.tensor(idx))


def largest_fresh_allocation(fn):
    """Run fn and return the largest storage (bytes) that any torch op allocated on the way."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Watch(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves(
                (args, kwargs)) if isinstance(a, torch.Tensor)}
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                    Watch.largest = max(Watch.largest, t.untyped_storage().nbytes())  # not a view
            return out

    with Watch():
        fn()
    return Watch.largest


def test_class_indices_never_build_a_one_hot(monkeypatch):
    """With 50,000 unique labels and indices, no tensor of B x label_dim elements is ever allocated."""
    B, L = 4, 50_000
    net = tiny_unet(label_dim=L).eval()
    x, c_noise = torch.zeros(B, 1, 8, 8), torch.zeros(B)
    idx = torch.tensor([0, 17, 49_999, 123])
    with torch.no_grad():
        rows = torch.nn.functional.one_hot(idx, L).float()
        # The watch does see a one-hot: the float path allocates rows * sqrt(L), [B, L] floats.
        assert largest_fresh_allocation(lambda: net(x, c_noise, rows)) >= B * L * 4
        monkeypatch.setattr(torch.nn.functional, 'one_hot', None)   # calling it would fail
        largest = largest_fresh_allocation(lambda: memdiff.Precond(net, 'vp')(x, 1.0, idx))
    assert largest < B * L                                     # even a bool one-hot is B * L bytes

#----------------------------------------------------------------------------
# The U-Net's values against a forward pass rebuilt by hand from EDM's networks.py (SongUNet),
# reading only the weights of memdiff's layers (the formulas, group counts, eps, factors and order
# are the test's own).
# Every weight is randomized first: EDM's init scales some layers to ~1e-5, which would hide a bug.

Fn = torch.nn.functional
BLOCK_CASES = st.sampled_from([        # (cin, cout, up, down, attention, taps)
    (8, 8, False, False, False, (1, 1)), (8, 8, False, False, True, (1, 1)),
    (8, 16, False, False, True, (1, 1)), (16, 8, False, False, False, (1, 1)),
    (8, 8, False, True, False, (1, 1)), (8, 8, True, False, True, (1, 1)),
    (8, 12, False, True, True, (1, 3, 3, 1)), (12, 8, True, False, False, (1, 3, 3, 1))])
UNET_CASES = st.fixed_dictionaries({   # 8x8 or 16x16 images, 8 channels: fast and every path taken
    'img_resolution': st.sampled_from([8, 16]),
    'in_channels': st.integers(1, 3),
    'out_channels': st.integers(1, 3),
    'label_dim': st.sampled_from([0, 3]),
    'model_channels': st.sampled_from([8, 12]),
    'channel_mult': st.sampled_from([(1, 2), (2, 1, 2)]),
    'num_blocks': st.integers(1, 2),
    'attn_levels': st.sets(st.integers(0, 2), max_size=2),
    'arch': st.sampled_from(['ddpmpp', 'ncsnpp']),
    'embedding': st.sampled_from([None, 'positional', 'fourier']),
    'drop_skips': st.sets(st.integers(0, 8), max_size=3),
})


def ref_norm(layer, x):
    """EDM's GroupNorm: min(32, C // 4) groups, eps 1e-6, the layer's affine weight and bias."""
    C = x.shape[1]
    assert layer.num_groups == min(32, C // 4) and layer.eps == 1e-6
    return Fn.group_norm(x, min(32, C // 4), layer.weight, layer.bias, eps=1e-6)


def ref_conv(layer, x):
    """A 'same' convolution (padding k // 2) with the layer's weight and bias."""
    k = layer.weight.shape[-1]
    return Fn.conv2d(x, layer.weight, layer.bias, padding=k // 2)


def ref_linear(layer, x):
    return x @ layer.weight.T + layer.bias


def ref_resample(x, mode, taps):
    """EDM's resampling: depthwise FIR outer(taps) / sum(taps)^2, stride 2, padding (taps - 1) // 2;
    up: 4x the filter, transposed. Written with convolutions for every taps, [1, 1] included."""
    t = torch.tensor(taps, dtype=x.dtype)
    C, pad = x.shape[1], (len(taps) - 1) // 2
    f = (t.outer(t) / t.sum() ** 2).expand(C, 1, len(taps), len(taps))
    if mode == 'down':
        return Fn.conv2d(x, f, stride=2, padding=pad, groups=C)
    return Fn.conv_transpose2d(x, 4 * f, stride=2, padding=pad, groups=C)


def ref_attention(block, x):
    """One head: q, k, v = the qkv conv of GN(x) split in three channel chunks [q; k; v],
    softmax over keys of q^T k / sqrt(C), projected, added to x, times sqrt(1/2)."""
    B, C, H, W = x.shape
    qkv = ref_conv(block.qkv, ref_norm(block.norm2, x)).reshape(B, 3 * C, H * W)
    q, k, v = qkv[:, :C], qkv[:, C:2 * C], qkv[:, 2 * C:]            # [B, C, HW] each
    w = torch.softmax(torch.einsum('bci,bcj->bij', q, k) / math.sqrt(C), dim=2)  # [B, HW, HW]
    a = torch.einsum('bij,bcj->bci', w, v).reshape(B, C, H, W)
    return (ref_conv(block.proj, a) + x) * math.sqrt(0.5)


def ref_block(block, x, emb, cin, cout, up=False, down=False, attention=False, taps=(1, 1)):
    """EDM's UNetBlock by hand; also checks that memdiff built the layers the case needs."""
    resample = (lambda t: ref_resample(t, 'up' if up else 'down', taps)) if up or down else None
    assert (block.skip is not None) == (cin != cout or up or down)
    assert hasattr(block, 'qkv') == attention
    h = Fn.silu(ref_norm(block.norm0, x))
    h = ref_conv(block.conv0, resample(h) if resample else h)
    h = h + ref_linear(block.affine, emb)[:, :, None, None]
    h = ref_conv(block.conv1, Fn.silu(ref_norm(block.norm1, h)))    # dropout: eval mode
    skip = x
    if block.skip is not None:
        skip = ref_conv(block.skip, resample(x) if resample else x)
    x = (h + skip) * math.sqrt(0.5)
    return ref_attention(block, x) if attention else x


def ref_embedding(net, c_noise, class_labels, arch, embedding, model_channels, label_dim):
    """EDM's noise (and label) mapping -> e [B, 4 model_channels]."""
    K = model_channels * (1 if arch == 'ddpmpp' else 2) // 2
    if embedding == 'positional':
        freqs = (1 / 10000) ** (torch.arange(K, dtype=torch.float64) / (K - 1))
        arg = c_noise.double()[:, None] * freqs[None]
    else:                                                     # the net's N(0, 16^2) frequencies
        assert net.freqs.shape == (K,)
        arg = 2 * math.pi * c_noise.double()[:, None] * net.freqs.double()[None]
    emb = torch.cat([arg.sin(), arg.cos()], dim=1).float()    # [cos, sin] with halves swapped
    if label_dim:
        onehot = class_labels if class_labels is not None else torch.zeros(len(c_noise), label_dim)
        emb = emb + ref_linear(net.map_label, onehot * math.sqrt(label_dim))
    return Fn.silu(ref_linear(net.map_layer1, Fn.silu(ref_linear(net.map_layer0, emb))))


def ref_unet(net, x, c_noise, class_labels, img_resolution, in_channels, model_channels,
             channel_mult, num_blocks, attn_resolutions, arch, embedding, label_dim, skips):
    """EDM's whole SongUNet by hand: encoder, skip stack, decoder, NCSN++'s aux path."""
    taps = (1, 1) if arch == 'ddpmpp' else (1, 3, 3, 1)
    emb = ref_embedding(net, c_noise, class_labels, arch, embedding, model_channels, label_dim)
    stack, aux, c = [], x, in_channels
    for level, mult in enumerate(channel_mult):
        r = img_resolution >> level
        if level == 0:
            x = ref_conv(net.enc[f'{r}_conv'], x)
        else:
            x = ref_block(net.enc[f'{r}_down'], x, emb, c, c, down=True, taps=taps)
            if arch == 'ncsnpp':                              # fused conv, then FIR stride 2
                layer = net.aux[f'{r}']
                h = Fn.conv2d(aux, layer.weight, padding=1 + (len(taps) - 1) // 2)
                t = torch.tensor(taps, dtype=h.dtype)
                f = (t.outer(t) / t.sum() ** 2).expand(h.shape[1], 1, len(taps), len(taps))
                h = Fn.conv2d(h, f, stride=2, groups=h.shape[1])  # no padding: fused
                x = aux = (x + h + layer.bias[:, None, None]) / math.sqrt(2)
        c = model_channels if level == 0 else c
        stack.append(x)
        for i in range(num_blocks):
            cout = model_channels * mult
            x = ref_block(net.enc[f'{r}_block{i}'], x, emb, c, cout,
                          attention=r in attn_resolutions, taps=taps)
            c = cout
            stack.append(x)
    stack = [s if on else torch.zeros_like(s) for s, on in zip(stack, skips)]
    for level, mult in reversed(list(enumerate(channel_mult))):
        r = img_resolution >> level
        if level == len(channel_mult) - 1:
            x = ref_block(net.dec[f'{r}_in0'], x, emb, c, c, attention=True, taps=taps)
            x = ref_block(net.dec[f'{r}_in1'], x, emb, c, c, taps=taps)
        else:
            x = ref_block(net.dec[f'{r}_up'], x, emb, c, c, up=True, taps=taps)
        for i in range(num_blocks + 1):
            x = torch.cat([x, stack.pop()], dim=1)            # [features, skip]
            cout = model_channels * mult
            x = ref_block(net.dec[f'{r}_block{i}'], x, emb, x.shape[1], cout,
                          attention=i == num_blocks and r in attn_resolutions, taps=taps)
            c = cout
    assert not stack
    return ref_conv(net.out_conv, Fn.silu(ref_norm(net.out_norm, x)))


@given(case=BLOCK_CASES, seed=SEEDS)
def test_block_equals_edms_formulas_by_hand(case, seed):
    """Block(x, e) = ((conv1(SiLU(GN(conv0(resample(SiLU(GN x))) + A e))) + skip) / sqrt 2 [-> attention]."""
    cin, cout, up, down, attention, taps = case
    g = torch.Generator().manual_seed(seed)
    block = memdiff.Block(cin, cout, 12, up=up, down=down, attention=attention, taps=taps)
    perturb(block, seed)
    x, emb = torch.randn(2, cin, 8, 8, generator=g), torch.randn(2, 12, generator=g)
    with torch.no_grad():
        got, expected = block(x, emb), ref_block(block, x, emb, cin, cout, up, down, attention, taps)
    assert got.shape == (2, cout, *[16 if up else 4 if down else 8] * 2)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@given(case=UNET_CASES, seed=SEEDS)
def test_unet_equals_edms_forward_by_hand(case, seed):
    """The whole DDPM++ / NCSN++ U-Net (labels, attention, skip switches) equals EDM's SongUNet
    written by hand."""
    case = dict(case)
    res = case['img_resolution']
    attn = tuple(res >> level for level in case.pop('attn_levels'))
    drop = case.pop('drop_skips')
    num_skips = len(case['channel_mult']) * (case['num_blocks'] + 1)
    skips = [0 if i in drop else 1 for i in range(num_skips)]
    net = perturb(memdiff.UNet(**case, attn_resolutions=attn, dropout=0.0, skips=skips), seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, case['in_channels'], res, res, generator=g)
    c_noise = torch.randn(2, generator=g) * 2
    labels = torch.eye(3)[torch.randint(3, (2,), generator=g)] if case['label_dim'] else None
    embedding = case['embedding'] or ('positional' if case['arch'] == 'ddpmpp' else 'fourier')
    kwargs = {k: case[k] for k in ['img_resolution', 'in_channels', 'model_channels',
                                   'channel_mult', 'num_blocks', 'arch', 'label_dim']}
    with torch.no_grad():
        got = net(x, c_noise, labels)
        expected = ref_unet(net, x, c_noise, labels, attn_resolutions=attn, embedding=embedding,
                            skips=skips, **kwargs)
        if case['label_dim']:                                 # no labels: the all-zero label row
            torch.testing.assert_close(net(x, c_noise), ref_unet(
                net, x, c_noise, None, attn_resolutions=attn, embedding=embedding, skips=skips,
                **kwargs), rtol=1e-4, atol=1e-4)
    assert got.shape == (2, case['out_channels'], res, res)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * (1 + expected.abs().max()))


def test_unet_noise_frequencies_are_the_specs():
    """Positional: (1/10000)^(k/(K-1)); Fourier: a fixed N(0, 16^2) draw of K = channels/2 (NCSN++: x2)."""
    torch.manual_seed(0)
    pos = tiny_unet(model_channels=32)
    K = 16
    torch.testing.assert_close(pos.freqs.double(), (1 / 10000) ** (torch.arange(K) / (K - 1)).double(),
                               rtol=1e-6, atol=0)
    torch.manual_seed(1)
    four = tiny_unet(model_channels=256, arch='ncsnpp')
    assert four.freqs.shape == (256,)                          # 2 * 256 / 2
    torch.manual_seed(1)                                       # the network's first draw
    assert torch.equal(four.freqs, torch.randn(256) * 16)


#----------------------------------------------------------------------------
# Every documented default is the paper's, and every constant reaches the formulas when varied.

def defaults(fn):
    import inspect
    return {k: p.default for k, p in inspect.signature(fn).parameters.items()
            if p.default is not inspect.Parameter.empty}


# EDM's SongUNet initialises every layer xavier-uniform times a gain, biases at zero: `init_zero`
# (1e-5) for each block's second conv, the attention projection and the output conv, so every block
# starts near the identity; `init_attn` (sqrt 0.2) for q, k, v; 1 for the rest.
EDM_GAINS = {'conv1': 1e-5, 'proj': 1e-5, 'out_conv': 1e-5, 'qkv': math.sqrt(0.2)}


@pytest.mark.parametrize('arch', ['ddpmpp', 'ncsnpp'])
def test_initial_weights_follow_edms_xavier_gains_and_zero_biases(arch):
    """Every conv and linear layer's initial weights lie within gain * sqrt(6 / (fan_in + fan_out))
    and reach at least half of it (the uniform's edge), with EDM's gain per layer; biases are 0."""
    torch.manual_seed(0)
    precond = memdiff.build_network(memdiff.EMMConfig(arch=arch), (1, 8, 8), 3)
    layers = [(name, m) for name, m in precond.named_modules()
              if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert {name.split('.')[-1] for name, _ in layers} >= set(EDM_GAINS)
    for name, m in layers:
        w = m.weight
        receptive = w[0, 0].numel()
        bound = EDM_GAINS.get(name.split('.')[-1], 1.0) * math.sqrt(
            6 / ((w.shape[0] + w.shape[1]) * receptive))
        assert 0.5 * bound < w.abs().max().item() <= bound * (1 + 1e-6), name
        assert not m.bias.any(), name


def test_network_precond_and_loss_defaults_are_the_papers():
    """The papers' defaults: UNet's DDPM++ defaults, EDM/VP constants, P_mean, P_std, the VE range."""
    assert defaults(memdiff.UNet) == dict(
        label_dim=0, model_channels=128, channel_mult=(2, 2, 2), num_blocks=2,
        attn_resolutions=(16,), dropout=0.13, arch='ddpmpp', embedding=None, skips=None)
    assert defaults(memdiff.Precond) == dict(kind='edm', sigma_data=0.5, beta_d=19.9, beta_min=0.1,
                                             M=1000, epsilon_t=1e-5, sigma_min=None, sigma_max=None)
    assert defaults(memdiff.edm_loss) == dict(class_labels=None, P_mean=-1.2, P_std=1.2,
                                              sigma_data=0.5, generator=None)
    assert defaults(memdiff.vp_loss) == dict(class_labels=None, beta_d=19.9, beta_min=0.1,
                                             epsilon_t=1e-5, generator=None)
    assert defaults(memdiff.ve_loss) == dict(class_labels=None, sigma_min=0.02, sigma_max=100,
                                             generator=None)
    assert defaults(memdiff.vp_sigma) == defaults(memdiff.vp_sigma_inv) == dict(beta_d=19.9,
                                                                               beta_min=0.1)
    vp, ve, edm = (memdiff.Precond(tiny_unet(), k) for k in ['vp', 've', 'edm'])
    assert (ve.sigma_min, ve.sigma_max) == (0.02, 100.0) and (edm.sigma_min, edm.sigma_max) == \
        (0.0, math.inf)
    # sigma(epsilon_t) rounded in float32, as EDM computes it (exp(1e-6) - 1 loses digits there).
    f32 = lambda t, bd=19.9, bm=0.1: math.sqrt(float(torch.tensor(bd / 2 * t * t + bm * t).exp()) - 1)
    assert vp.sigma_min == pytest.approx(f32(1e-5), rel=1e-6)
    assert vp.sigma_max == pytest.approx(math.sqrt(math.expm1(19.9 / 2 + 0.1)), rel=1e-6)


PRECOND_CONSTANTS = st.fixed_dictionaries({
    'sigma_data': st.floats(0.1, 2.0), 'beta_d': st.floats(5.0, 30.0), 'beta_min': st.floats(0.01, 1.0),
    'M': st.integers(10, 2000), 'epsilon_t': st.floats(1e-6, 1e-2)})


@given(kind=KINDS, sigma=SIGMAS, constants=PRECOND_CONSTANTS)
def test_precond_constants_reach_the_coefficients_and_the_range(kind, sigma, constants):
    """Precond(sigma_data, beta_d, beta_min, M, epsilon_t) uses them: coefficients and VP's range."""
    c = constants
    precond = memdiff.Precond(tiny_unet(), kind=kind, **c)
    got = precond.coefficients(torch.tensor([sigma], dtype=torch.float64))
    expected = list(expected_coefficients(kind, sigma, c['sigma_data'], c['beta_d'], c['beta_min']))
    if kind == 'vp':
        expected[3] = expected[3] / 999 * (c['M'] - 1)
    for name, value, e in zip(['c_skip', 'c_out', 'c_in', 'c_noise'], got, expected):
        atol = 1e-3 if name == 'c_noise' else 0.0
        assert math.isclose(float(value.reshape(-1)[0]), e, rel_tol=1e-5, abs_tol=atol), name
    if kind == 'vp':
        s = lambda t: math.sqrt(math.expm1(c['beta_d'] * t * t / 2 + c['beta_min'] * t))
        f32 = torch.tensor(c['beta_d'] / 2 * c['epsilon_t'] ** 2 + c['beta_min'] * c['epsilon_t'])
        assert precond.sigma_min == pytest.approx(math.sqrt(float(f32.exp()) - 1), rel=1e-3)
        assert precond.sigma_max == pytest.approx(s(1.0), rel=1e-5)
        assert precond.loss_constants() == dict(beta_d=c['beta_d'], beta_min=c['beta_min'],
                                                epsilon_t=c['epsilon_t'])
    elif kind == 'edm':
        assert precond.loss_constants() == dict(sigma_data=c['sigma_data'])
    lo, hi = sorted([0.01 + c['beta_min'], 10 + c['beta_d']])
    ranged = memdiff.Precond(tiny_unet(), kind=kind, sigma_min=lo, sigma_max=hi)
    assert (ranged.sigma_min, ranged.sigma_max) == (lo, hi)
    if kind == 've':
        assert ranged.loss_constants() == dict(sigma_min=lo, sigma_max=hi)


LOSS_CONSTANTS = {
    'edm': st.fixed_dictionaries({'P_mean': st.floats(-2.0, 1.0), 'P_std': st.floats(0.3, 2.0),
                                  'sigma_data': st.floats(0.2, 2.0)}),
    'vp': st.fixed_dictionaries({'beta_d': st.floats(5.0, 30.0), 'beta_min': st.floats(0.01, 1.0),
                                 'epsilon_t': st.floats(1e-4, 0.3)}),
    've': st.fixed_dictionaries({'sigma_min': st.floats(0.005, 0.5), 'sigma_max': st.floats(5.0, 200.0)}),
}


@pytest.mark.parametrize('kind', ['edm', 'vp', 've'])
@given(data=st.data())
def test_loss_constants_set_the_weight_and_the_noise_distribution(kind, data):
    """Each loss's constants reach lambda(sigma) and the law of sigma (4,000 draws; defaults too)."""
    c = data.draw(st.one_of(st.just({}), LOSS_CONSTANTS[kind]), label='constants')
    y = torch.zeros(4000, 1, 1, 1) + 0.25
    calls = []
    loss = memdiff.LOSSES[kind](recording_denoiser(calls, 0.0), y, **c,
                                generator=torch.Generator().manual_seed(1))
    (x, sigma, _), = calls
    s = sigma.double().flatten()
    if kind == 'edm':
        sd = c.get('sigma_data', 0.5)
        weight = (s ** 2 + sd ** 2) / (s * sd) ** 2
        z = (s.log() - c.get('P_mean', -1.2)) / c.get('P_std', 1.2)   # should be N(0, 1)
        assert abs(z.mean()) < 0.1 and abs(z.std() - 1) < 0.1
    elif kind == 'vp':
        bd, bm, et = c.get('beta_d', 19.9), c.get('beta_min', 0.1), c.get('epsilon_t', 1e-5)
        weight = 1 / s ** 2
        t = memdiff.vp_sigma_inv(s, bd, bm)                   # U(epsilon_t, 1)
        assert t.min() >= et * (1 - 1e-4) - 1e-7 and t.max() <= 1 + 1e-6
        assert abs(t.mean() - (1 + et) / 2) < 0.03 and abs(t.std() - (1 - et) / math.sqrt(12)) < 0.03
    else:
        lo, hi = math.log(c.get('sigma_min', 0.02)), math.log(c.get('sigma_max', 100))
        weight = 1 / s ** 2
        u = (s.log() - lo) / (hi - lo)                        # U(0, 1)
        assert u.min() >= -1e-6 and u.max() <= 1 + 1e-6 and abs(u.mean() - 0.5) < 0.03
    torch.testing.assert_close(loss.double(), weight * 0.25 ** 2, rtol=1e-4, atol=0)


@pytest.mark.parametrize('model_channels, ok', [(4, True), (8, True), (12, True), (0, False),
                                                (2, False), (6, False), (-4, False)])
def test_model_channels_are_positive_multiples_of_four(model_channels, ok):
    """model_channels must be a positive multiple of 4 (GroupNorm's C // 4 groups); 4 itself works."""
    build = lambda: tiny_unet(model_channels=model_channels, attn_resolutions=())
    if ok:
        net = build().eval()
        with torch.no_grad():
            assert net(torch.zeros(1, 1, 8, 8), torch.zeros(1)).shape == (1, 1, 8, 8)
    else:
        with pytest.raises(ValueError, match='model_channels'):
            build()


def test_one_noise_label_for_the_batch_equals_one_per_sample():
    """A single c_noise (the sampler's scalar sigma) is broadcast to every sample of the batch, for
    any channel count: the output equals the one given the same label per sample."""
    torch.manual_seed(0)
    net = memdiff.UNet(8, 3, 3, model_channels=8, channel_mult=(1, 2), attn_resolutions=(4,)).eval()
    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        one, each = net(x, torch.tensor([0.3])), net(x, torch.full([5], 0.3))
    torch.testing.assert_close(one, each, rtol=1e-6, atol=1e-6)
