"""Benchmarks of memdiff, each against a baseline measured side by side in the same process.

    python tests/tools/bench.py [--quick]       (by hand; not part of the test suite)

Method: candidates run interleaved round by round and the minimum time of each is kept, so load on
a shared machine hits them alike; only ratios mean anything, never the absolute times. It prints:
  1. the optimum D* and the top-2 neighbour search against their one-matrix formulas (cdist,
     softmax, matmul over the whole training set), with GFLOP/s against a plain matmul, and the
     optimum without its denormal flush at CIFAR's d = 3072;
  2. the optimum's peak extra memory (a fresh process, peak RSS reset through /proc) against one
     B x N float32 matrix;
  3. the U-Net's training step as train() takes it (fused Adam, one foreach EMA pass, fused
     GroupNorm, attention and resampling) against a straightforward step of the same weights, in
     CPU time of this process, and the convolutions' share of it (torch's profiler): the floor no
     fusion of the rest can pass;
  4. the probes of one snapshot against sampling 1,000 images (the default snapshot), and both
     against a default size (1,500 training steps, 3 snapshots sampled and probed); --probes runs
     only this part.
Run the training rows with OMP_NUM_THREADS=1 on a busy machine (idle OpenMP threads spin).
"""

import argparse
import copy
import platform
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

ROOT = __import__('pathlib').Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import memdiff  # noqa: E402

def best_time(fn, repeat):
    """Minimum wall time of fn over repeat calls (the minimum is the least noisy estimate)."""
    fn()                                                    # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)

def paired(fns, repeat, seconds=1.0, clock=time.perf_counter):
    """Interleave the candidates round by round so that load on the machine hits them alike."""
    start = clock()
    for fn in fns:
        fn()
    # Millisecond calls get more rounds (about `seconds` in all): their minimum of a few is noisy.
    rounds = max(repeat, int(seconds / max(clock() - start, 1e-6)))
    times = [[] for _ in fns]
    for _ in range(rounds):
        for t, fn in zip(times, fns):
            start = clock()
            fn()
            t.append(clock() - start)
    return [min(t) for t in times]

# Baselines: the formulas written as one matrix over the whole training set.
def optimum_one_matrix(x, y, sigma):
    w = torch.softmax(-torch.cdist(x, y).square() / (2 * sigma ** 2), dim=1)  # [B, N]
    return w @ y

def top2_one_matrix(x, y):
    return torch.cdist(x, y).topk(2, dim=1, largest=False)

def plain_matmul(x, y, w):
    return (x @ y.T, w @ y)                                 # the 4 B N d flops of the optimum

def bench_optimum(N, d, B, repeat):
    g = torch.Generator().manual_seed(0)
    y, x = torch.rand(N, d, generator=g) * 2 - 1, torch.rand(B, d, generator=g) * 2 - 1
    w = torch.softmax(torch.randn(B, N, generator=g), 1)
    D = memdiff.OptimalDenoiser(y)
    t_ours, t_base, t_mm = paired([lambda: D(x, 1.0), lambda: optimum_one_matrix(x, y, 1.0),
                                   lambda: plain_matmul(x, y, w)], repeat)
    # The neighbours compute one product, x y^T: their matmul rate is that product's alone.
    t_nn, t_nn_base, t_xy = paired([lambda: memdiff.nearest_neighbors(x, y),
                                    lambda: top2_one_matrix(x, y), lambda: x @ y.T], repeat)
    flops = 4 * B * N * d
    return [(f'optimum (N={N}, d={d}, B={B})', t_ours, t_base, flops / t_ours / 1e9,
             flops / t_mm / 1e9),
            (f'top-2 neighbours (N={N}, d={d}, B={B})', t_nn, t_nn_base, flops / 2 / t_nn / 1e9,
             flops / 2 / t_xy / 1e9)]

def _status_kib(key):
    """A field of /proc/self/status in KiB (VmRSS, VmHWM)."""
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ':'))

def peak_memory_child(B, N, d, mode):
    """In a fresh process: peak RSS above the steady state (bytes) during one optimum call (Linux)."""
    y = torch.empty(N, d).uniform_(-1, 1)                   # in place: no temporary raises the peak
    x = torch.empty(B, d).uniform_(-1, 1)
    D = memdiff.OptimalDenoiser(y)
    D(x[:2], 1.0)                                           # allocate everything that is per-call
    with open('/proc/self/clear_refs', 'w') as f:           # reset the peak (VmHWM) to the RSS now
        f.write('5')
    before = _status_kib('VmRSS')
    _ = D(x, 1.0) if mode == 'ours' else optimum_one_matrix(x, y, 1.0)
    return (_status_kib('VmHWM') - before) * 1024

def peak_memory(B, N, d, mode):
    code = (f'import sys; sys.path.insert(0, {str(ROOT)!r}); '
            f'sys.path.insert(0, {str(__import__("pathlib").Path(__file__).parent)!r}); '
            f'import bench; print(bench.peak_memory_child({B}, {N}, {d}, {mode!r}))')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])

class ManualGroupNorm(torch.nn.Module):
    """GroupNorm written out (mean and variance per group): what the fused kernel replaces."""
    def __init__(self, gn):
        super().__init__()
        self.G, self.eps, self.weight, self.bias = gn.num_groups, gn.eps, gn.weight, gn.bias

    def forward(self, x):
        B, C, H, W = x.shape
        g = x.reshape(B, self.G, -1)
        g = (g - g.mean(-1, keepdim=True)) / (g.var(-1, unbiased=False, keepdim=True) + self.eps).sqrt()
        return g.reshape(B, C, H, W) * self.weight[:, None, None] + self.bias[:, None, None]

def manual_attention(q, k, v):
    """softmax(q k^T / sqrt(C)) v with explicit matrices."""
    w = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return w @ v

def unfuse(module):
    """The same network with hand-written equivalents of the fused operations."""
    for name, child in module.named_children():
        if isinstance(child, torch.nn.GroupNorm):
            setattr(module, name, ManualGroupNorm(child))
        else:
            if isinstance(child, memdiff.Resample):
                child.box = False                           # depthwise FIR conv, not pool/nearest
            unfuse(child)
    return module

def plain_adam(params, lr):
    """Adam's per-tensor loop (torch's single-tensor path, as EDM's loop runs it on a CPU)."""
    return torch.optim.Adam(params, lr=lr, foreach=False, fused=False)

def training_step(precond, y, fast, lr=1e-4, channels_last=False, nan_rule=True):
    """One training step as memdiff.train takes it (fast) or as a straightforward loop would: loss,
    backward, EDM's nan_to_num on the gradients, Adam, and the EMA of the weights -> step() -> loss."""
    ema = copy.deepcopy(precond).requires_grad_(False)
    params, ema_params = list(precond.parameters()), list(ema.parameters())
    opt = torch.optim.Adam(params, lr=lr, fused=True) if fast else plain_adam(params, lr)
    g = torch.Generator().manual_seed(0)
    if channels_last:
        y = y.contiguous(memory_format=torch.channels_last)

    def step():
        loss = memdiff.edm_loss(precond, y, generator=g).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if nan_rule:
            for p in params:
                torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
        opt.step()
        with torch.no_grad():
            if fast:
                torch._foreach_lerp_(ema_params, params, 1 - 0.999)
            else:                                           # EDM's loop: one tensor at a time
                for p_ema, p_net in zip(ema_params, params):
                    p_ema.copy_(p_net.detach().lerp(p_ema, 0.999))
        return loss.detach()
    return step

def with_manual_attention(fn):
    """fn run with attention as explicit softmax(q kT) v instead of the fused kernel."""
    sdpa = F.scaled_dot_product_attention

    def run():
        F.scaled_dot_product_attention = manual_attention
        try:
            return fn()
        finally:
            F.scaled_dot_product_attention = sdpa
    return run

def convolution_share(step, rounds=3):
    """Share of a step's CPU time spent inside convolutions (forward and backward), by the profiler.

    The profiler's cost per operator falls on the many small ones, so the share is if anything an
    underestimate of the convolutions' part of an unprofiled step."""
    from torch.profiler import ProfilerActivity, profile
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(rounds):
            step()
    events = prof.key_averages()
    conv = sum(e.self_cpu_time_total for e in events if e.key.startswith('aten::') and 'conv' in e.key)
    return conv / sum(e.self_cpu_time_total for e in events)

def unet_training(res, channels, mult, blocks, attn, batch, in_ch, repeat, levers=True):
    """Training steps of memdiff's U-Net against the unfused one, same weights, same loss, timed by
    CPU time over interleaved rounds -> dict of seconds per step (and sampler evaluations/s)."""
    cfg = memdiff.EMMConfig(model_channels=channels, channel_mult=mult, num_blocks=blocks,
                            attn_resolutions=attn)
    torch.manual_seed(0)
    fused = memdiff.build_network(cfg, (in_ch, res, res), 0)
    y = torch.rand(batch, in_ch, res, res, generator=torch.Generator().manual_seed(0)) * 2 - 1
    nets = dict(memdiff=fused, unfused=unfuse(copy.deepcopy(fused)))
    steps = dict(memdiff=training_step(nets['memdiff'], y, fast=True),
                 unfused=with_manual_attention(training_step(nets['unfused'], y, fast=False)))
    if levers:
        cl = copy.deepcopy(fused).to(memory_format=torch.channels_last)
        steps['channels-last'] = training_step(cl, y, fast=True, channels_last=True)
        steps['no nan_to_num'] = training_step(copy.deepcopy(fused), y, fast=True, nan_rule=False)
    # The same weights give the same loss, step after step, to float32 rounding.
    for _ in range(2):
        losses = {k: float(fn()) for k, fn in steps.items()}
        for k, v in losses.items():
            assert abs(v - losses['memdiff']) <= 1e-4 * abs(losses['memdiff']), (k, losses)
    times = dict(zip(steps, paired(list(steps.values()), repeat, clock=time.process_time)))
    times['conv share'] = convolution_share(steps['memdiff'])
    fused.eval()
    z = torch.randn(batch, in_ch, res, res)
    n = 4
    t_sample = best_time(lambda: memdiff.edm_sampler(fused, z, num_steps=n), max(1, repeat // 2))
    times['params'] = sum(p.numel() for p in fused.parameters())
    times['evals/s'] = batch * (2 * n - 1) / t_sample
    return times

def probe_cost(n=32, repeat=3):
    """CPU seconds of one snapshot's probes, of sampling 1,000 images and of a training step, at the
    digits default (size n, the network at initialisation)."""
    cfg = memdiff.EMMConfig()
    images, labels = memdiff.load_dataset('digits')
    y, c, _ = memdiff.training_set(images, labels, n, cfg)
    torch.manual_seed(0)
    net = memdiff.build_network(cfg, (1, 8, 8), 0).eval()
    optimum, gaussian = memdiff.OptimalDenoiser(y.double()), memdiff.GaussianDenoiser(y)
    probes = memdiff.probe_set(images, labels, n, cfg)
    cpu = torch.device('cpu')
    t_probe, t_sample = paired([
        lambda: memdiff.probe(net, probes, optimum, gaussian),
        lambda: memdiff.generate(net, 1000, (1, 8, 8), 0, cpu)], repeat, clock=time.process_time)
    step = training_step(memdiff.build_network(cfg, (1, 8, 8), 0), y[torch.arange(64) % n], True)
    t_step = paired([step], repeat, clock=time.process_time)[0]
    return t_probe, t_sample, t_step

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--quick', action='store_true', help='fewer repeats, smaller memory test')
    ap.add_argument('--probes', action='store_true', help='only the probes against sampling (4.)')
    args = ap.parse_args()
    repeat = 3 if args.quick else 7
    if args.probes:
        return report_probes(max(3, repeat // 2))
    print(f'# memdiff benchmarks, {time.strftime("%Y-%m-%d")}, {platform.processor() or platform.machine()}'
          f', {torch.get_num_threads()} threads, torch {torch.__version__}\n')
    print('| computation | memdiff (s) | one-matrix baseline (s) | time ratio | GFLOP/s | '
          'plain matmul GFLOP/s | rate vs matmul |')
    print('|---|---|---|---|---|---|---|')
    for N, d, B in [(1797, 64, 512), (5000, 3072, 128)]:
        for name, t, tb, gf, gm in bench_optimum(N, d, B, repeat):
            print(f'| {name} | {t:.4f} | {tb:.4f} | {t / tb:.2f}x | {gf:.1f} | {gm:.1f} | '
                  f'{gf / gm:.2f} |')

    g = torch.Generator().manual_seed(0)
    y, x = torch.rand(5000, 3072, generator=g) * 2 - 1, torch.rand(128, 3072, generator=g) * 2 - 1
    flush, no_flush = memdiff.OptimalDenoiser(y), memdiff.OptimalDenoiser(y)
    no_flush.log_tiny = -float('inf')                       # threshold_ then changes nothing
    t_flush, t_none = paired([lambda: flush(x, 1.0), lambda: no_flush(x, 1.0)], repeat)
    print(f'\nThe optimum at (N=5000, d=3072, B=128) without flushing sub-normal weights takes '
          f'{t_none / t_flush:.1f}x the time with it.')

    B, N, d = 2048, 20000 if not args.quick else 5000, 3072
    matrix = B * N * 4
    ours, base = peak_memory(B, N, d, 'ours'), peak_memory(B, N, d, 'base')
    print(f'\nPeak extra memory of the optimum, {B} queries over {N} images of {d} values: '
          f'memdiff {ours / 2**20:.0f} MiB = {ours / matrix:.2f} x one {B} x {N} float32 matrix '
          f'({matrix / 2**20:.0f} MiB); one-matrix baseline {base / 2**20:.0f} MiB '
          f'({base / matrix:.2f} x).')

    print('\nU-Net training steps (loss, backward, nan_to_num, Adam, EMA), CPU time per step:\n\n'
          '| U-Net | parameters | batch | memdiff ms | unfused ms | ratio | convolutions\' share | '
          'floor | channels-last | without nan_to_num | sampler evaluations/s |\n'
          '|---|---|---|---|---|---|---|---|---|---|---|')
    for name, spec in [('digits default (8x8x1, 16 ch, mult 1,2, 1 block, attn 4)',
                        (8, 16, (1, 2), 1, (4,), 64, 1)),
                       ('DDPM++ 32x32x3, 64 ch, mult 2,2,2, 2 blocks, attn 16',
                        (32, 64, (2, 2, 2), 2, (16,), 8, 3))]:
        t = unet_training(*spec, repeat=max(3, repeat // 2))
        m = t['memdiff']
        print(f"| {name} | {t['params']:,} | {spec[5]} | {m * 1e3:.1f} | {t['unfused'] * 1e3:.1f} | "
              f"{m / t['unfused']:.2f}x | {t['conv share']:.0%} | "
              f"{t['conv share'] * m / t['unfused']:.2f}x | {t['channels-last'] / m:.2f}x | "
              f"{t['no nan_to_num'] / m:.2f}x | {t['evals/s']:.0f} |")
    report_probes(max(3, repeat // 2))

def report_probes(repeat):
    t_probe, t_sample, t_step = probe_cost(repeat=repeat)
    size = 1500 * t_step + 3 * (t_sample + t_probe)
    print(f'\nProbes of one snapshot (digits default, |D| = 32): {t_probe:.2f} s of CPU time, '
          f'{t_probe / t_sample:.3f}x sampling 1,000 images ({t_sample:.1f} s); three snapshots\' '
          f'probes are {3 * t_probe / size:.1%} of a default size ({size:.0f} s: 1,500 steps of '
          f'{t_step * 1e3:.0f} ms, 3 snapshots sampled and probed).')

if __name__ == '__main__':
    main()
