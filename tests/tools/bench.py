"""Benchmarks of memdiff against one-matrix baselines, measured side by side in one process.

Run by hand (not part of the test suite):  python tests/bench.py [--quick]
Prints a table of time ratios against each baseline (below 1.0 is faster than the baseline),
achieved GFLOP/s against a plain matmul of the same shapes, the peak memory of the optimum, and the
U-Net's training step against a straightforward one with each speed lever's effect and its floor
(the convolutions' time alone, which both share, against the straightforward step). Ratios, not
absolute times, are the targets: the machine is shared. The training steps are timed in CPU time
of this process, which does not count the time the machine gives other jobs; run them with
OMP_NUM_THREADS=1 on a busy machine (idle OpenMP threads spin and are counted).
"""

import argparse
import copy
import platform
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, str(__import__('pathlib').Path(__file__).resolve().parents[1]))
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

def top2_steps(N=1797, d=64, B=512, seconds=2.0):
    """The steps of memdiff's top-2 search timed one by one: (name, seconds), the product x y^T first."""
    g = torch.Generator().manual_seed(0)
    y, x = torch.rand(N, d, generator=g) * 2 - 1, torch.rand(B, d, generator=g) * 2 - 1
    minus_2x, y_sq = -2 * x, torch.linalg.vector_norm(y, dim=1).square_()
    d2 = torch.mm(minus_2x, y.T).add_(y_sq)
    nb = N // 8                                             # the 8 strided blocks of _smallest
    i, work = memdiff._smallest(d2, 2)[1], d2.clone()       # work: a matrix to add to
    steps = {'the product x yT (the baseline of the rate)': lambda: x @ y.T,
             'the whole search (nearest_neighbors)': lambda: memdiff.nearest_neighbors(x, y),
             '-2x and the norms ||y||^2': lambda: (-2 * x, torch.linalg.vector_norm(y, dim=1).square_()),
             'the product -2x yT': lambda: torch.mm(minus_2x, y.T),
             'adding ||y||^2 in place': lambda: work.add_(y_sq),
             'selecting the 2 smallest (_smallest)': lambda: memdiff._smallest(d2, 2),
             '  of which the block minima (one amin)':
                 lambda: d2.as_strided((B, 8, nb), (N, nb, 1)).amin(1),
             'exact distances of the 2 winners, sorted':
                 lambda: torch.linalg.vector_norm(x[:, None] - y[i], dim=2).sort(dim=1),
             'cdist + topk (the baseline of the time)': lambda: top2_one_matrix(x, y)}
    return list(zip(steps, paired(list(steps.values()), 7, seconds)))

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
    code = (f'import sys; sys.path.insert(0, {str(memdiff.DATA_DIR.parent)!r}); '
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
    cfg = memdiff.EMMConfig(model_channels=channels, channel_mult=mult, num_blocks=blocks, attn=attn)
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

def sampling_batches(batches=(250, 1000, 4000), num=4000, repeat=3):
    """CPU seconds per sample of generate()'s network evaluations at each batch size (digits default)."""
    cfg = memdiff.EMMConfig()
    torch.manual_seed(0)
    net = memdiff.build_network(cfg, (1, 8, 8), 0).eval()
    z = torch.randn(num, 1, 8, 8)
    sigma = torch.full([], 2.0)

    def run(b):
        def call():
            with torch.no_grad():
                for s in range(0, num, b):
                    net(z[s:s + b], sigma)
        return call
    return dict(zip(batches, (t / num for t in paired([run(b) for b in batches], repeat,
                                                       clock=time.process_time))))

def compiled_training(steps=1500, repeat=5):
    """torch.compile of the digits network's training step: (compile seconds, compiled / eager step,
    end-to-end ratio of `steps` steps including the compile), or None without a working compiler."""
    cfg = memdiff.EMMConfig()
    torch.manual_seed(0)
    net = memdiff.build_network(cfg, (1, 8, 8), 0)
    y = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    other = copy.deepcopy(net)
    eager, compiled = _step_through(net, net, y), _step_through(torch.compile(other), other, y)
    try:
        from torch._inductor import config as inductor
        inductor.force_disable_caches = True                # a cold compile, as a fresh run's
        start = time.process_time()
        compiled()                                          # the first call compiles
        t_compile = time.process_time() - start
    except Exception as e:                                  # no C compiler, no backend: skip
        print(f'(torch.compile unavailable: {type(e).__name__})')
        return None
    t_eager, t_comp = paired([eager, compiled], repeat, clock=time.process_time)
    return t_compile, t_comp / t_eager, (t_compile + steps * t_comp) / (steps * t_eager)

def _step_through(model, precond, y):
    """A fast training step whose loss calls model (a compiled wrapper of precond)."""
    params = list(precond.parameters())
    opt = torch.optim.Adam(params, lr=1e-4, fused=True)
    g = torch.Generator().manual_seed(0)

    def step():
        loss = memdiff.edm_loss(model, y, generator=g, **precond.loss_constants()).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--quick', action='store_true', help='fewer repeats, smaller memory test')
    args = ap.parse_args()
    repeat = 3 if args.quick else 7
    print(f'# memdiff benchmarks, {time.strftime("%Y-%m-%d")}, {platform.processor() or platform.machine()}'
          f', {torch.get_num_threads()} threads, torch {torch.__version__}\n')
    print('| computation | memdiff (s) | one-matrix baseline (s) | time ratio | GFLOP/s | '
          'plain matmul GFLOP/s | rate vs matmul |')
    print('|---|---|---|---|---|---|---|')
    for N, d, B in [(1797, 64, 512), (5000, 3072, 128)]:
        for name, t, tb, gf, gm in bench_optimum(N, d, B, repeat):
            print(f'| {name} | {t:.4f} | {tb:.4f} | {t / tb:.2f}x | {gf:.1f} | {gm:.1f} | '
                  f'{gf / gm:.2f} |')

    steps = top2_steps()
    print('\nThe top-2 search at (N=1797, d=64, B=512), step by step:\n\n| step | ms | x the product |'
          '\n|---|---|---|')
    for name, t in steps:
        print(f'| {name} | {t * 1e3:.3f} | {t / steps[0][1]:.2f} |')

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

    per_sample = sampling_batches(repeat=max(3, repeat // 2))
    base = per_sample[1000]
    print('\nSampling batch (digits default), CPU time per network evaluation of one sample, against '
          'the default 1000: ' + ', '.join(f'{b}: {t / base:.2f}x' for b, t in per_sample.items()))

    if not args.quick:
        out = compiled_training()
        if out is not None:
            t_compile, ratio, end_to_end = out
            print(f'\ntorch.compile, digits default: compiling took {t_compile:.0f} s of CPU time; '
                  f'a compiled step takes {ratio:.2f}x an eager one; 1,500 steps with the compile '
                  f'take {end_to_end:.2f}x eager.')

if __name__ == '__main__':
    main()
