"""A short, prepared check of the GPU path, run by hand on a CUDA machine (not part of the suite).

Run:  python tests/tools/gpu_check.py [--steps 200] [--samples 1000] [--out DIR] [--parts 1234]
1. the optimum, the metric, the sampler and the paper U-Net give on CUDA what they give on the CPU;
2. the optimum and top-2 neighbours against their one-matrix baselines on the GPU, and the peak GPU
   memory of the optimum for 2,048 queries over 20,000 CIFAR-sized images;
3. the paper preset's network (batch 512): training images/s in fp32 (as the study) and TF32,
   and the sampler's network evaluations/s;
4. `run_emm.py --preset paper` end to end for a few hundred steps and one snapshot, on a 32x32x3
   data set made from the bundled digits (the GPU machine cannot download CIFAR-10).
"""

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import memdiff  # noqa: E402
from bench import optimum_one_matrix, plain_matmul, top2_one_matrix  # noqa: E402

cuda = torch.device('cuda')
SHAPES = [(1797, 64, 512), (5000, 3072, 128), (50000, 3072, 512)]  # (N, d, B)
MEMORY_SHAPE = (2048, 20000, 3072)                                 # (B, N, d)

def timed(fn, repeat=5):
    """Minimum CUDA wall time of fn over repeat calls, after one warm-up."""
    fn()
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return min(times)

def check(name, ok, detail=''):
    print(f'  {"ok  " if ok else "FAIL"} {name} {detail}', flush=True)
    return ok

def paper_config(**train):
    return memdiff.EMMConfig(arch='ddpmpp', model_channels=128, channel_mult=(2, 2, 2), num_blocks=2,
                             attn_resolutions=(16,), dropout=0.13, embedding='positional',
                             train=memdiff.TrainConfig(precond='vp', lr=2e-4, **train))

def same_on_cuda():
    """1. CUDA results against the CPU's."""
    print('1. CUDA against CPU', flush=True)
    g = torch.Generator().manual_seed(0)
    y = memdiff.load_dataset('digits')[0][:500].double()
    x = torch.randn(64, 1, 8, 8, generator=g, dtype=torch.float64)
    ok = True
    for sigma in (0.05, 0.5, 5.0):
        a = memdiff.OptimalDenoiser(y, chunk=128)(x, sigma)
        b = memdiff.OptimalDenoiser(y.to(cuda), chunk=128)(x.to(cuda), sigma).cpu()
        c = memdiff.OptimalDenoiser(y.float().to(cuda))(x.float().to(cuda), sigma).cpu()
        ok &= check(f'optimum at sigma={sigma}: float64 CUDA = CPU, float32 CUDA close',
                    torch.allclose(a, b, atol=1e-10) and torch.allclose(a.float(), c, atol=2e-3),
                    f'(max |diff| {float((a - b).abs().max()):.1e}, {float((a.float() - c).abs().max()):.1e})')
    # The same latents on both devices (a CUDA generator draws other numbers than a CPU one).
    z, _ = memdiff.study_latents(range(40), (1, 8, 8), 0, torch.device('cpu'))
    s = memdiff.edm_sampler(memdiff.OptimalDenoiser(y), z, num_steps=6)
    t = memdiff.edm_sampler(memdiff.OptimalDenoiser(y.to(cuda)), z.to(cuda), num_steps=6).cpu()
    ok &= check('optimum samples', torch.allclose(s, t, atol=1e-6))
    q = memdiff.quantize_uint8(s.float())
    ra, ma = memdiff.memorization_scores(q, y.float())
    rb, mb = memdiff.memorization_scores(q.to(cuda), y.float().to(cuda))
    ok &= check('memorization scores', torch.allclose(ra, rb.cpu(), atol=1e-5) and
                torch.equal(ma, mb.cpu()), f'(ratio {ma.float().mean():.3f})')
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = memdiff.build_network(paper_config(), (3, 32, 32), 0).eval()
    z = torch.randn(4, 3, 32, 32, generator=g)
    sig = torch.tensor([0.01, 0.3, 3.0, 80.0])
    with torch.no_grad():
        a = net(z, sig)
        b = net.to(cuda)(z.to(cuda), sig.to(cuda)).cpu()
    ok &= check('paper U-Net forward (fp32, TF32 off)', torch.allclose(a, b, atol=1e-4),
                f'(max |diff| {float((a - b).abs().max()):.1e})')
    return ok

def kernels(rows):
    """2. The optimum and the neighbours against the one-matrix baselines, and peak GPU memory."""
    print('2. optimum and neighbours on the GPU', flush=True)
    for N, d, B in SHAPES:
        g = torch.Generator(device=cuda).manual_seed(0)
        y = torch.rand(N, d, device=cuda, generator=g) * 2 - 1
        x = torch.rand(B, d, device=cuda, generator=g) * 2 - 1
        D = memdiff.OptimalDenoiser(y)
        t = timed(lambda: D(x, 1.0))
        tb = timed(lambda: optimum_one_matrix(x, y, 1.0))
        tn = timed(lambda: memdiff.nearest_neighbors(x, y))
        tnb = timed(lambda: top2_one_matrix(x, y))
        w = torch.softmax(torch.randn(B, N, device=cuda, generator=g), 1)
        tm, txy = timed(lambda: plain_matmul(x, y, w)), timed(lambda: x @ y.T)
        flops = 4 * B * N * d
        rows.append(f'| optimum (N={N}, d={d}, B={B}) | {t:.5f} | {tb:.5f} | {t / tb:.2f}x | '
                    f'{flops / t / 1e12:.1f} | {flops / tm / 1e12:.1f} |')
        rows.append(f'| top-2 neighbours (N={N}, d={d}, B={B}) | {tn:.5f} | {tnb:.5f} | '
                    f'{tn / tnb:.2f}x | {flops / 2 / tn / 1e12:.1f} | {flops / 2 / txy / 1e12:.1f} |')
        print('  ' + '\n  '.join(rows[-2:]), flush=True)
    B, N, d = MEMORY_SHAPE
    y = torch.rand(N, d, device=cuda) * 2 - 1
    x = torch.rand(B, d, device=cuda) * 2 - 1
    D = memdiff.OptimalDenoiser(y)
    peak = {}
    for name, fn in [('memdiff', lambda: D(x, 1.0)),
                     ('one-matrix', lambda: optimum_one_matrix(x, y, 1.0))]:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        peak[name] = (torch.cuda.max_memory_allocated() - before - out.numel() * 4) / (B * N * 4)
        del out
    line = (f'peak GPU memory of the optimum, {B} queries over {N} images of {d}, beyond inputs '
            f'and output: memdiff {peak["memdiff"]:.2f}x, one-matrix {peak["one-matrix"]:.2f}x one '
            f'{B} x {N} float32 matrix')
    print('  ' + line, flush=True)
    rows.append(line)

def throughput(rows, batch=512, steps=8, sample_batch=1000):
    """3. Training images/s of the paper network (fp32, TF32) and sampler evaluations/s."""
    print('3. paper network throughput', flush=True)
    y = torch.rand(batch, 3, 32, 32, device=cuda) * 2 - 1
    for mode in ('fp32', 'tf32'):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = mode == 'tf32'
        cfg = paper_config(batch=batch, train_steps=steps + 3, snapshots=1)
        torch.manual_seed(0)
        net = memdiff.build_network(cfg, (3, 32, 32), 0).to(cuda)
        marks = {}

        def progress(kind, step, total):
            if step in (3, total):                          # 3 warm-up steps, then the timed ones
                torch.cuda.synchronize()
                marks[step] = time.perf_counter()
        torch.cuda.reset_peak_memory_stats()
        for _ in memdiff.train(net, y, None, cfg.train, progress=progress):
            pass
        ips = steps * batch / (marks[steps + 3] - marks[3])
        mem = torch.cuda.max_memory_allocated() / 2 ** 30
        rows.append(f'| training, {mode}, batch {batch} | {ips:.0f} images/s | peak {mem:.1f} GiB |')
        print('  ' + rows[-1], flush=True)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    net.eval()
    z = torch.randn(sample_batch, 3, 32, 32, device=cuda)
    t = timed(lambda: memdiff.edm_sampler(net, z, num_steps=3), repeat=2)
    rows.append(f'| sampler, fp32, batch {sample_batch} | {sample_batch * 5 / t:.0f} network '
                'evaluations/s | |')
    print('  ' + rows[-1], flush=True)

def end_to_end(rows, steps, samples, out):
    """4. run_emm.py --preset paper on CUDA: a few hundred steps and one snapshot."""
    print('4. run_emm.py --preset paper end to end', flush=True)
    data = Path('/tmp/digits32.npz')
    images, labels = memdiff.load_dataset('digits')
    big = F.interpolate(images, scale_factor=4, mode='nearest').repeat(1, 3, 1, 1)  # [N,3,32,32]
    np.savez(data, images=memdiff.to_uint8(big).numpy(), labels=labels.numpy())
    outdir = Path('/tmp/paper')
    shutil.rmtree(outdir, ignore_errors=True)
    cmd = [sys.executable, str(ROOT / 'run_emm.py'), '--preset', 'paper', '--data', str(data),
           '--train-steps', str(steps), '--snapshots', '1', '--samples', str(samples), '--sizes',
           '1000', '--device', 'cuda', '--outdir', str(outdir)]
    print('  ' + ' '.join(cmd[1:]), flush=True)
    t = time.perf_counter()
    r = subprocess.run(cmd, text=True, capture_output=True)
    wall = time.perf_counter() - t
    print(r.stdout[-3000:], r.stderr[-1500:] if r.returncode else '', flush=True)
    if r.returncode == 0:
        rec = json.loads((outdir / 'results.json').read_text())
        p = rec['points'][0]
        rows.append(f'end to end: {steps} steps of batch 512 (fp32) and {samples} samples at '
                    f'|D| = 1000 in {wall:.0f} s; ratio {p["ratio"]:.3f}, world size '
                    f'{p["world_size"]}')
        print('  ' + rows[-1], flush=True)
        if out:
            for f in ('results.json', 'results.csv', 'samples_n1000.png'):
                shutil.copy(outdir / f, Path(out) / f)
    return r.returncode == 0

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--steps', type=int, default=200)
    ap.add_argument('--samples', type=int, default=1000)
    ap.add_argument('--out', default=None, help='folder for the table and the run record')
    ap.add_argument('--parts', default='1234', help='which of the checks 1-4 to run')
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit('gpu_check.py needs a CUDA GPU')
    print(f'# memdiff GPU check, {time.strftime("%Y-%m-%d")}, {torch.cuda.get_device_name()}, '
          f'torch {torch.__version__}', flush=True)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    rows, ok = [], True
    if '1' in args.parts:
        ok &= same_on_cuda()
    if '2' in args.parts:
        kernels(rows)
    if '3' in args.parts:
        throughput(rows)
    if '4' in args.parts:
        ok &= end_to_end(rows, args.steps, args.samples, args.out)
    print('\n' + '\n'.join(rows))
    if args.out:
        Path(args.out, 'gpu_check.md').write_text('\n'.join(rows) + '\n')
    sys.exit(0 if ok else 1)

if __name__ == '__main__':
    main()
