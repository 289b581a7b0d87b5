"""Training (section 8): durations, snapshots, the study's lr and EMA schedules, data order, the loop."""

import copy
import os
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import memdiff

# Strategies. Bounds are small for speed.
SEEDS = st.integers(0, 2**31 - 1)
DURATION_SIZES = st.integers(1, 100_000)
EPOCHS = st.floats(0.01, 1000.0)
BATCHES = st.integers(1, 1024)
SNAPSHOT_COUNTS = st.integers(1, 20)
TOTAL_STEPS = st.integers(1, 5000)
SNAPSHOT_IMAGES = st.integers(1, 100_000)
STUDY_SIZES = st.sampled_from([500, 1000, 5000])           # the sizes the study trained most
STUDY_BATCHES = st.sampled_from([128, 512])
MODES = st.sampled_from(['mode1', 'mode2', 'mode3', 'mode4'])

#----------------------------------------------------------------------------
# Durations and snapshots

@given(DURATION_SIZES, EPOCHS, BATCHES)
def test_total_steps_in_epochs_scale_with_size(n, epochs, batch):
    """In epochs mode the step count is ceil(epochs * n / batch): non-decreasing in n, at least 1."""
    cfg = memdiff.TrainConfig(epochs=epochs, batch=batch)
    total = cfg.total_steps(n)
    assert total == max(1, math.ceil(epochs * n / batch))
    assert cfg.total_steps(2 * n) >= total
    assert cfg.total_steps(2 * n) <= 2 * total


@given(DURATION_SIZES, TOTAL_STEPS)
def test_total_steps_without_epochs_ignore_size(n, steps):
    """In steps mode the duration is the fixed step count, whatever the training-set size."""
    assert memdiff.TrainConfig(train_steps=steps).total_steps(n) == steps


@given(TOTAL_STEPS, SNAPSHOT_COUNTS)
def test_snapshot_steps_are_ascending_unique_and_end_at_the_final_step(steps, snapshots):
    """Snapshot steps ascend strictly within [1, total], end at the final step, and number at most
    the snapshots asked for."""
    cfg = memdiff.TrainConfig(train_steps=steps, snapshots=snapshots)
    snaps = cfg.snapshot_steps(10)
    assert snaps == sorted(set(snaps))
    assert snaps[-1] == steps and snaps[0] >= 1
    assert 1 <= len(snaps) <= snapshots


def edm_tick_snapshots(total_steps, batch, tick_images=50_000, snapshot_ticks=50):
    """Snapshot steps of EDM's training loop, simulated step by step (tick 0 not scored)."""
    steps, nimg, tick, tick_start = [], 0, 0, 0
    for step in range(1, total_steps + 1):
        nimg += batch
        done = step == total_steps
        if not done and tick != 0 and nimg < tick_start + tick_images:
            continue
        if done or tick % snapshot_ticks == 0:
            steps.append(step)
        tick, tick_start = tick + 1, nimg
    return steps[1:]                                        # the study never scores tick 0


@given(st.integers(1, 3000), STUDY_BATCHES)
def test_snapshot_images_follow_edm_ticks(n, batch):
    """With the study's 2.5M images, snapshots fall where EDM's 50-tick loop writes them."""
    cfg = memdiff.TrainConfig(epochs=400.0, batch=batch, snapshot_images=2_500_000)
    total = cfg.total_steps(n)
    assert cfg.snapshot_steps(n) == (edm_tick_snapshots(total, batch) or [total])


@given(st.integers(1, 2000), st.floats(0.01, 100.0), BATCHES, SNAPSHOT_IMAGES)  # <= 2e5 steps
def test_snapshot_steps_by_images_are_evenly_spaced_after_the_first_step(n, epochs, batch, images):
    """With snapshot_images, the snapshots before the final one are one tick past a whole multiple
    of the interval, as EDM's first tick ends after one step."""
    cfg = memdiff.TrainConfig(epochs=epochs, batch=batch, snapshot_images=images)
    snaps, total = cfg.snapshot_steps(n), cfg.total_steps(n)
    assert snaps == sorted(set(snaps)) and snaps[-1] == total
    if len(snaps) > 1:
        every = snaps[0] - 1
        assert every >= math.ceil(min(images, 50_000) / batch)
        assert all((s - 1) % every == 0 and s < total for s in snaps[:-1])

#----------------------------------------------------------------------------
# The study's schedules, against the formulas of its train.py and training_loop.py

def study_lr(nimg, n, lr=2e-4):
    """lr * min(nimg / (1000 floor(n/5)), 1) (lr_rampup_kimg = int(n / 5))."""
    return lr * min(nimg / max(1000 * int(n / 5), 1e-8), 1)


def study_beta(nimg, n, batch, mode, final=0.99929):
    """The study's EMA beta after the step taken at nimg images (ema_halflife_kimg = int(0.5 n/50))."""
    h = max(min(1000 * int(0.5 * n / 50), 0.05 * nimg), 1e-8)
    ratio = 50_000 / n
    return {'mode1': 0.5 ** (batch / h), 'mode2': 0.5 ** (512 / h / ratio),
            'mode3': 0.5 ** (batch / 500_000),
            'mode4': final / 0.5 ** (batch / 500_000) * 0.5 ** (batch / h / ratio)}[mode]


def study_config(batch, mode='mode2'):
    return memdiff.TrainConfig(lr=2e-4, batch=batch, epochs=40000.0, lr_rampup=200.0,
                               ema_mode=mode, ema_halflife=10.0, whole_kimg=True)


@given(STUDY_SIZES, STUDY_BATCHES, MODES, st.integers(0, 20_000))
def test_lr_and_ema_sequences_equal_the_studys_formulas(n, batch, mode, step):
    """At the study's sizes and batches, every step's lr and EMA beta are the study's."""
    cfg = study_config(batch, mode)
    nimg = step * batch
    assert cfg.lr_at(nimg, n) == pytest.approx(study_lr(nimg, n), rel=1e-12, abs=0)
    assert cfg.ema_beta_at(nimg, n) == pytest.approx(study_beta(nimg, n, batch, mode), rel=1e-12)


@given(STUDY_SIZES, STUDY_BATCHES)
def test_mode2_beta_after_rampup_is_the_same_for_every_size_and_batch(n, batch):
    """mode2 after ramp-up: beta = 0.5^(512/500,000) = 0.99929 per step, a ~977-step half-life."""
    beta = study_config(batch).ema_beta_at(10**9, n)
    assert beta == pytest.approx(0.5 ** (512 / 500_000), rel=1e-12)
    assert math.log(0.5) / math.log(beta) == pytest.approx(976.5625)


def test_first_step_has_zero_lr_and_copies_the_network_into_the_ema():
    """nimg counts the images seen before the step: the first step has lr 0 and EMA beta 0."""
    cfg = study_config(512)
    assert cfg.lr_at(0, 1000) == 0 and cfg.ema_beta_at(0, 1000) == 0


@given(st.integers(0, 10_000), STUDY_BATCHES)
def test_without_rampup_every_step_has_the_full_lr(step, batch):
    """lr_rampup_epochs = 0 means no ramp-up: the first step too runs at the full learning rate."""
    assert memdiff.TrainConfig(lr=3e-3, batch=batch).lr_at(step * batch, 100) == 3e-3


def test_fixed_ema_beta_is_constant_and_unknown_mode_is_an_error():
    """'fixed' returns ema_beta at every step; an unknown mode is a ValueError naming it."""
    cfg = memdiff.TrainConfig(ema_mode='fixed', ema_beta=0.9)
    assert {cfg.ema_beta_at(k * 64, 100) for k in range(5)} == {0.9}
    with pytest.raises(ValueError, match='mode9'):
        memdiff.TrainConfig(ema_mode='mode9').ema_beta_at(0, 10)


@given(st.integers(1, 300), SEEDS)
def test_data_order_is_numpys_seeded_shuffle(n, seed):
    """The data order is a permutation, and the one EDM's sampler draws (RandomState(seed).shuffle)."""
    import numpy as np
    order = np.arange(n)
    np.random.RandomState(seed).shuffle(order)
    assert memdiff.data_order(n, seed).tolist() == order.tolist()

#----------------------------------------------------------------------------
# The training loop (tiny: 8 channels, one level, batch 8, a handful of steps)

TINY_TRAIN = memdiff.TrainConfig(train_steps=6, batch=8, snapshots=3)


def tiny_network(dropout=0.0, init_seed=0, precond='edm'):
    torch.manual_seed(init_seed)
    cfg = memdiff.EMMConfig(model_channels=8, channel_mult=(1,), attn_resolutions=(), dropout=dropout)
    cfg.train.precond = precond
    return memdiff.build_network(cfg, (1, 8, 8), 0)


def tiny_images(n=8):
    images, labels = memdiff.load_dataset('digits')
    return images[:n].clone()


def snapshots_of(precond, images, cfg, seed, checkpoint=None, stop_after=None, global_seed=0):
    """[(step, EMA state dict copy)] from train(); stop after that many snapshots (an interrupt).
    With checkpoint (a path), the run resumes from the state saved there, and saves each
    snapshot's state() there once the snapshot is handed back, as run_emm does.
    torch's global seed is set first, as measure() does, so dropout masks are seeded too."""
    torch.manual_seed(global_seed)
    resume = torch.load(checkpoint, weights_only=True) if checkpoint and os.path.exists(checkpoint) \
        else None
    out = []
    for step, ema, state in memdiff.train(precond, images, None, cfg, seed=seed, resume=resume):
        out.append((step, {k: v.clone() for k, v in ema.state_dict().items()}))
        if stop_after is not None and len(out) == stop_after:
            break
        if checkpoint:
            torch.save(state(), checkpoint)
    return out


def max_difference(a, b):
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


class SeenImages:
    """A loss that records the clean images of every batch (for the data order)."""
    def __init__(self, loss):
        self.loss, self.batches = loss, []

    def __call__(self, denoise, y, *args, **kwargs):
        self.batches.append(y.detach().clone())
        return self.loss(denoise, y, *args, **kwargs)


@pytest.mark.parametrize('n, batch', [(8, 4), (6, 4), (3, 8)])
def test_every_image_is_seen_once_per_epoch_in_one_repeated_order(monkeypatch, n, batch):
    """The batches walk one permutation of the set, repeated: each image once per epoch (a set
    smaller than the batch appears several times in one batch, as in the study)."""
    spy = SeenImages(memdiff.LOSSES['edm'])
    monkeypatch.setitem(memdiff.LOSSES, 'edm', spy)
    y = tiny_images(n)
    cfg = memdiff.TrainConfig(train_steps=3 * n, batch=batch, snapshots=1)
    list(memdiff.train(tiny_network(), y, None, cfg, seed=3))
    flat = y.flatten(1)
    seen = [int((flat == row).all(1).nonzero()[0]) for b in spy.batches for row in b.flatten(1)]
    order = memdiff.data_order(n, 3).tolist()
    assert seen == [order[k % n] for k in range(len(seen))]
    for epoch in range(len(seen) // n):
        assert sorted(seen[epoch * n:(epoch + 1) * n]) == list(range(n))


def test_loss_constants_come_from_the_preconditioning(monkeypatch):
    """train() weights the loss with the sigma_data (VP: beta, VE: sigma range) of the precond it trains."""
    calls = []
    monkeypatch.setitem(memdiff.LOSSES, 'edm', lambda *a, **k: calls.append(k) or
                        memdiff.edm_loss(*a, **k))
    precond = tiny_network()
    precond.sigma_data = 1.0
    list(memdiff.train(precond, tiny_images(4), None, memdiff.TrainConfig(train_steps=1, batch=4), seed=0))
    assert calls[0]['sigma_data'] == 1.0


@pytest.mark.parametrize('mode', ['mode1', 'mode2', 'fixed'])
def test_each_step_updates_the_ema_and_lr_by_their_formulas(monkeypatch, mode):
    """After every step, ema = beta ema + (1 - beta) net with the formula's beta, and the optimizer
    ran at the ramped learning rate."""
    lrs, original_step = [], torch.optim.Adam.step

    def step(self, *args, **kwargs):
        lrs.append(self.param_groups[0]['lr'])
        return original_step(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.Adam, 'step', step)
    n = 8
    cfg = memdiff.TrainConfig(train_steps=5, batch=4, snapshots=5, lr=1e-2, lr_rampup=1.5,
                              ema_mode=mode, ema_halflife=0.5, ema_rampup=0.5,
                              ema_beta=0.7)
    precond = tiny_network()
    ema_prev = {k: v.clone() for k, v in precond.state_dict().items()}
    for k, (step_no, ema, _) in enumerate(memdiff.train(precond, tiny_images(n), None, cfg, seed=0)):
        nimg = k * cfg.batch
        beta = cfg.ema_beta_at(nimg, n)
        net = precond.state_dict()
        for name, value in ema.state_dict().items():
            if name in dict(precond.named_parameters()):
                expected = beta * ema_prev[name] + (1 - beta) * net[name]
                assert torch.allclose(value, expected, rtol=1e-6, atol=1e-7), (step_no, name)
        ema_prev = {k: v.clone() for k, v in ema.state_dict().items()}
        assert lrs[k] == pytest.approx(1e-2 * min(nimg / (1.5 * n), 1))
    assert len(lrs) == 5


def test_a_non_finite_loss_stops_training_with_the_step(monkeypatch):
    """A NaN loss is a ValueError naming the step, raised before the snapshot is handed out."""
    calls = []

    def nan_at_three(denoise, y, *args, **kwargs):
        calls.append(1)
        loss = memdiff.edm_loss(denoise, y, *args, **kwargs)
        return loss * (math.nan if len(calls) == 3 else 1)
    monkeypatch.setitem(memdiff.LOSSES, 'edm', nan_at_three)
    cfg = memdiff.TrainConfig(train_steps=5, batch=4, snapshots=1)
    with pytest.raises(ValueError, match='step 3 of 5'):
        list(memdiff.train(tiny_network(), tiny_images(4), None, cfg, seed=0))


def test_fused_adam_follows_the_plain_adam_trajectory(monkeypatch):
    """The fused optimizer memdiff uses gives plain Adam's weights to float32 rounding."""
    y, net = tiny_images(), tiny_network()
    cfg = memdiff.TrainConfig(train_steps=10, batch=8, snapshots=10, ema_mode='fixed', ema_beta=0.0)
    fused = snapshots_of(copy.deepcopy(net), y, cfg, seed=2)
    plain_adam = torch.optim.Adam
    monkeypatch.setattr(torch.optim, 'Adam', lambda *a, fused=None, **k: plain_adam(*a, **k))
    plain = snapshots_of(copy.deepcopy(net), y, cfg, seed=2)
    assert [s for s, _ in fused] == [s for s, _ in plain]
    for (_, a), (_, b) in zip(fused, plain):
        assert max_difference(a, b) < 1e-5


def test_train_yields_ema_at_every_snapshot_step():
    """train() yields (step, EMA network) exactly at the configured snapshot steps."""
    y = tiny_images()
    snaps = snapshots_of(tiny_network(), y, TINY_TRAIN, seed=0)
    assert [s for s, _ in snaps] == TINY_TRAIN.snapshot_steps(len(y))


def test_train_reports_progress_after_every_step_up_to_the_total():
    """progress('train', step, total) follows every optimizer step: step = 1..total, total fixed."""
    seen = []
    for _ in memdiff.train(tiny_network(), tiny_images(), cfg=TINY_TRAIN,
                           progress=lambda *event: seen.append(event)):
        pass
    total = TINY_TRAIN.total_steps(8)
    assert seen == [('train', step, total) for step in range(1, total + 1)]


def test_train_same_seed_gives_identical_ema():
    """Two runs from the same initial network and seed end with bit-identical EMA weights."""
    y, net = tiny_images(), tiny_network()
    a = snapshots_of(copy.deepcopy(net), y, TINY_TRAIN, seed=5)
    b = snapshots_of(copy.deepcopy(net), y, TINY_TRAIN, seed=5)
    c = snapshots_of(copy.deepcopy(net), y, TINY_TRAIN, seed=6)
    for (sa, ea), (sb, eb) in zip(a, b):
        assert sa == sb and max_difference(ea, eb) == 0
    assert max_difference(a[-1][1], c[-1][1]) > 0               # the seed matters


def check_resume_is_exact(tmp_path, dropout):
    y, net = tiny_images(), tiny_network(dropout)
    whole = snapshots_of(copy.deepcopy(net), y, TINY_TRAIN, seed=1)
    ckpt = str(tmp_path / 'state.pt')
    # Stopped while the second snapshot is in the caller's hands: only the first is saved (a
    # snapshot's state is saved once the caller asks for the next one), so the second is redone.
    first = snapshots_of(copy.deepcopy(net), y, TINY_TRAIN, seed=1, checkpoint=ckpt, stop_after=2)
    # A new process: a differently initialised network, the state comes from the checkpoint.
    rest = snapshots_of(tiny_network(dropout, init_seed=99), y, TINY_TRAIN, seed=1, checkpoint=ckpt)
    assert [s for s, _ in first] == [s for s, _ in whole][:2]
    assert [s for s, _ in rest] == [s for s, _ in whole][1:]
    assert max_difference(first[1][1], rest[0][1]) == 0.0
    resumed = first[:1] + rest
    diffs = [max_difference(a, b) for (_, a), (_, b) in zip(whole, resumed)]
    assert diffs == [0.0] * len(whole), f'max |EMA difference| per snapshot: {diffs}'


def test_train_resume_after_interrupt_is_exact(tmp_path):
    """Stopping during a snapshot and resuming from the checkpoint gives the EMA weights of an
    uninterrupted run, bit for bit."""
    check_resume_is_exact(tmp_path, dropout=0.0)


def test_train_resume_after_interrupt_is_exact_with_dropout(tmp_path):
    """With dropout (the paper preset uses 0.13) resuming is exact too."""
    check_resume_is_exact(tmp_path, dropout=0.5)


@given(TOTAL_STEPS, SNAPSHOT_COUNTS)
def test_log_snapshot_steps_increase_strictly_and_end_at_the_budget(steps, snapshots):
    """Log spacing: strictly increasing integer steps in [1, total], at most the count asked for,
    the last one final, the first near 1% of the budget, and successive ratios geometric."""
    cfg = memdiff.TrainConfig(train_steps=steps, snapshots=snapshots, snapshot_spacing='log')
    snaps = cfg.snapshot_steps(10)
    assert all(isinstance(s, int) for s in snaps)
    assert all(a < b for a, b in zip(snaps, snaps[1:]))
    assert snaps[-1] == steps and snaps[0] >= 1
    assert 1 <= len(snaps) <= snapshots
    if snapshots >= 2:
        assert snaps[0] == max(1, round(steps / 100))


def test_log_snapshot_steps_by_hand_and_images_take_precedence():
    """3000 steps in 3 log-spaced snapshots: 30, 300, 3000; snapshot_images still wins."""
    assert memdiff.TrainConfig(train_steps=3000, snapshots=3,
                               snapshot_spacing='log').snapshot_steps(10) == [30, 300, 3000]
    by_images = memdiff.TrainConfig(train_steps=3000, batch=64, snapshot_images=64_000)
    log = memdiff.TrainConfig(train_steps=3000, batch=64, snapshot_images=64_000, snapshot_spacing='log')
    assert log.snapshot_steps(10) == by_images.snapshot_steps(10)
    with pytest.raises(ValueError, match='snapshot_spacing'):
        memdiff.TrainConfig(snapshot_spacing='cubic').snapshot_steps(10)


#----------------------------------------------------------------------------
# The optimizer step by hand (Adam's betas and eps, weight decay, the NaN/inf gradient rule), and
# the documented defaults.

def adam_by_hand(params, grads, lrs, weight_decay, betas=(0.9, 0.999), eps=1e-8):
    """Plain Adam (torch's L2 weight decay added to the gradient), float64, over the recorded grads."""
    b1, b2 = betas
    p = [q.double().clone() for q in params]
    m = [torch.zeros_like(q) for q in p]
    v = [torch.zeros_like(q) for q in p]
    for t, (g_t, lr) in enumerate(zip(grads, lrs), start=1):
        for j in range(len(p)):
            g = g_t[j].double() + weight_decay * p[j]
            m[j] = b1 * m[j] + (1 - b1) * g
            v[j] = b2 * v[j] + (1 - b2) * g * g
            p[j] = p[j] - lr * (m[j] / (1 - b1 ** t)) / ((v[j] / (1 - b2 ** t)).sqrt() + eps)
    return p


@pytest.mark.parametrize('weight_decay', [0.0, 0.3])
def test_training_steps_are_adam_by_hand_with_the_edm_gradient_rule(monkeypatch, weight_decay):
    """Four steps of train() equal Adam(0.9, 0.999, 1e-8) by hand at the ramped lr, with weight decay,
    on gradients where NaN became 0 and +-inf became +-1e5 before the step."""
    grads, original_step = [], torch.optim.Adam.step

    def step(self, *args, **kwargs):
        grads.append([p.grad.clone() for p in self.param_groups[0]['params']])
        return original_step(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.Adam, 'step', step)
    n = 8
    cfg = memdiff.TrainConfig(train_steps=4, batch=4, snapshots=1, lr=3e-3, lr_rampup=1.0,
                              weight_decay=weight_decay, ema_mode='fixed', ema_beta=0.0)
    precond = tiny_network()
    params = [p for p in precond.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    j = next(i for i, p in enumerate(params) if p.dim() == 1 and len(p) > 3)   # a bias
    bad = torch.tensor([math.nan, math.inf, -math.inf])
    params[j].register_hook(lambda g: torch.cat([bad, g[3:]]))  # non-finite gradients every step
    (_, ema, _), = list(memdiff.train(precond, tiny_images(n), None, cfg, seed=0))
    assert len(grads) == 4
    for g in grads:
        assert g[j][:3].tolist() == [0.0, 1e5, -1e5]
    lrs = [3e-3 * min(k * 4 / n, 1) for k in range(4)]
    expected = adam_by_hand(start, grads, lrs, weight_decay)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach().double(), e, rtol=1e-5, atol=1e-7)
    for p, e in zip(ema.parameters(), params):                # ema_beta 0: the EMA is the net
        assert torch.equal(p, e.detach())


def test_sgd_step_is_momentum_sgd_by_hand(monkeypatch):
    """optimizer='sgd' is SGD with momentum 0.9 (and weight decay) at the ramped lr."""
    grads, original_step = [], torch.optim.SGD.step

    def step(self, *args, **kwargs):
        grads.append([p.grad.clone() for p in self.param_groups[0]['params']])
        return original_step(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.SGD, 'step', step)
    cfg = memdiff.TrainConfig(optimizer='sgd', train_steps=3, batch=4, snapshots=1, lr=1e-2,
                              weight_decay=0.1, lr_rampup=0.5)
    precond = tiny_network()
    params = [p for p in precond.parameters() if p.requires_grad]
    p = [q.detach().double().clone() for q in params]
    list(memdiff.train(precond, tiny_images(8), None, cfg, seed=1))
    buf = [None] * len(p)
    for k, g_k in enumerate(grads):
        lr = 1e-2 * min(k * 4 / 4, 1)
        for j in range(len(p)):
            g = g_k[j].double() + 0.1 * p[j]
            buf[j] = g if buf[j] is None else 0.9 * buf[j] + g
            p[j] = p[j] - lr * buf[j]
    for q, e in zip(params, p):
        torch.testing.assert_close(q.detach().double(), e, rtol=1e-5, atol=1e-7)


def test_train_config_defaults_are_the_documented_ones():
    """TrainConfig's defaults: the README's CPU digits setting, EDM's EMA ramp-up, the study's mode4 beta."""
    cfg = memdiff.TrainConfig()
    assert (cfg.precond, cfg.optimizer, cfg.lr, cfg.batch, cfg.weight_decay, cfg.train_steps) == \
        ('edm', 'adam', 1e-3, 64, 0.0, 1500)
    assert (cfg.epochs, cfg.lr_rampup, cfg.ema_mode, cfg.ema_halflife) == (None, 0.0, 'mode1', 10.0)
    assert (cfg.ema_rampup, cfg.ema_beta, cfg.whole_kimg, cfg.snapshots, cfg.snapshot_spacing,
            cfg.snapshot_images) == (0.05, 0.99929, False, 3, 'linear', None)
    assert (memdiff.REF_IMAGES, memdiff.REF_BATCH, memdiff.REF_HALFLIFE) == (50_000, 512, 500_000)


@given(STUDY_SIZES, st.integers(0, 5000), st.floats(0.0, 0.2), st.floats(0.5, 20.0))
def test_ema_rampup_and_halflife_reach_every_mode(n, step, rampup, halflife):
    """ema_rampup and ema_halflife_epochs enter beta as h = min(halflife n, rampup nimg) (no rounding)."""
    for mode in ['mode1', 'mode2', 'mode4']:
        cfg = memdiff.TrainConfig(batch=64, ema_mode=mode, ema_rampup=rampup,
                                  ema_halflife=halflife, ema_beta=0.999)
        nimg = step * 64
        h = halflife * n if not rampup else min(halflife * n, rampup * nimg)
        h = max(h, 1e-8)
        expected = {'mode1': 0.5 ** (64 / h), 'mode2': 0.5 ** (512 / (h * 50_000 / n)),
                    'mode4': 0.999 / 0.5 ** (64 / 500_000) * 0.5 ** (64 / (h * 50_000 / n))}[mode]
        assert cfg.ema_beta_at(nimg, n) == pytest.approx(expected, rel=1e-12)


@given(st.integers(100, 3000), STUDY_BATCHES, st.sampled_from([1, 2, 5]))
def test_snapshot_images_in_whole_ticks_follow_edm_ticks(n, batch, ticks):
    """A snapshot every k ticks (k x 50k images) falls where EDM's loop with snapshot_ticks=k writes it."""
    cfg = memdiff.TrainConfig(epochs=200.0, batch=batch, snapshot_images=ticks * 50_000)
    total = cfg.total_steps(n)
    assert cfg.snapshot_steps(n) == (edm_tick_snapshots(total, batch, snapshot_ticks=ticks) or [total])


def test_a_tampered_resume_state_is_read_weights_only_and_runs_nothing(tmp_path, hostile):
    """run_emm reads a size's saved training state with weights_only=True: a pickled command is
    refused with a ValueError naming the file, never run."""
    import run_emm
    exploit, marker = hostile
    (tmp_path / 'work').mkdir()
    torch.save(dict(state=dict(net=exploit)), tmp_path / 'work' / 'n16.pt')
    cfg = memdiff.EMMConfig(model_channels=8, train=memdiff.TrainConfig(train_steps=2, batch=4,
                                                                       snapshots=1), samples=4)
    with pytest.raises(ValueError, match='n16.pt'):
        run_emm.measure_size(cfg, memdiff.load_dataset('digits'), 16, tmp_path,
                             torch.device('cpu'), lambda *a: None)
    assert not marker.exists()
