"""Estimate the effective model memorization (EMM) of a diffusion model: python run_emm.py --help.

memdiff.py holds the science; this file is the run around it: options and the study's preset, the
search ledger and its resume, the records (results.json, results.csv), the lock on an output
folder, the PNG grids and plots, sweeps, and the torchrun process group.
"""

import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import os
import pickle
import platform
import signal
import sys
import zipfile
from pathlib import Path

import click
import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch

import memdiff

# The study's CIFAR-10 run [Gu et al., sec. 3; sail-sg/DiffMemorize scripts/*.md]: DDPM++ with VP,
# 128 channels, dropout 0.13, Adam at 2e-4, batch 512, seed 1024, 40,000 epochs (2,000 Mimg at
# 50k), ramp-up 200 epochs (|D|/5 kimg), EMA mode2 with a half-life of 10 epochs (0.5 Mimg at 50k),
# durations rounded to whole kimg, a snapshot every 2.5M images, 10k samples per snapshot.
# Attention sits at half the resolution, and NCSN++ runs VE with the Fourier embedding.
PRESETS = {
    'paper': dict(arch='ddpmpp', channels=128, channel_mult=(2, 2, 2), blocks=2, dropout=0.13,
                  precond='vp', optimizer='adam', lr=2e-4, batch=512, weight_decay=0.0,
                  epochs=40000.0, lr_rampup=200.0, ema=10.0, ema_mode='mode2', whole_kimg=True,
                  snapshot_images=2_500_000, samples=10000, sampler_steps=18, seed=1024),
}
# Options that follow the architecture and the resolution under a preset unless given.
ARCH_DEFAULTS = {'ddpmpp': dict(precond='vp', embedding='positional'),
                 'ncsnpp': dict(precond='ve', embedding='fourier')}

#----------------------------------------------------------------------------
# Typed options: lists and label modes are parsed once, at the edge.

class IntList(click.ParamType):
    """'1,2,3' -> (1, 2, 3); '' -> ()."""
    name = 'list'

    def convert(self, value, param, ctx):
        if isinstance(value, (tuple, list)):
            return tuple(int(v) for v in value)
        try:
            return tuple(int(v) for v in str(value).split(',') if v.strip() != '')
        except ValueError:
            self.fail(f'expected comma-separated whole numbers, got {value!r}', param, ctx)

class LabelMode(click.ParamType):
    """none | true | random:C | unique."""
    name = 'mode'

    def convert(self, value, param, ctx):
        value = str(value)
        if value in ('none', 'true', 'unique'):
            return value
        C = value[len('random:'):] if value.startswith('random:') else ''
        if not (C.isdigit() and int(C) >= 1):
            self.fail(f"{value!r} is not a label mode (none, true, random:C with C >= 1, unique)",
                      param, ctx)
        return f'random:{int(C)}'

class Workers(click.ParamType):
    """A whole number >= 1, or 'auto' (-> 0, resolved once the device is known)."""
    name = 'workers'

    def convert(self, value, param, ctx):
        if str(value) == 'auto':
            return 0
        if str(value).isdigit() and int(value) >= 1:
            return int(value)
        self.fail(f"{value!r} is neither a whole number >= 1 nor 'auto'", param, ctx)

#----------------------------------------------------------------------------
# Files: every file is written whole or not at all.

def atomic_write(path, data):
    """Write data (str, bytes, or a function of a temporary path) to path via a rename."""
    tmp = Path(f'{path}.tmp')
    if callable(data):
        data(tmp)
    else:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)

def versions():
    """Versions of the software a record was made with."""
    return dict(python=platform.python_version(), torch=torch.__version__, numpy=np.__version__)

def read_record(outdir, config):
    """Points already measured in outdir/results.json for this configuration (a clear error otherwise)."""
    path = Path(outdir) / 'results.json'
    if not path.exists():
        return []
    try:
        record = json.loads(path.read_text())
        saved = record['config']
        points = record['points']
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f'{path}: not a readable memdiff record ({e}); move it away or choose '
                         'another output folder') from None
    if saved != config:
        diff = sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k))
        raise ValueError(f'{path}: holds a run with a different configuration (differs in: '
                         f'{", ".join(diff)}); choose another output folder')
    return points

def write_record(outdir, config, points, threshold, extra=None):
    """results.json and results.csv, sizes ascending."""
    points = sorted(points, key=lambda p: p['size'])
    # The law's bootstrap is seeded here, once: the same points always give the same interval.
    tau = memdiff.tau_law(points, config['samples'], threshold,
                          generator=torch.Generator().manual_seed(0))
    record = dict(**memdiff.summarize(points, threshold), threshold=threshold, tau=tau,
                  points=points, config=config, versions=versions(),
                  world_size=memdiff.dist_info()[1], **(extra or {}))
    atomic_write(Path(outdir) / 'results.json', json.dumps(record, indent=1))
    lines = ['size,ratio,ci_low,ci_high,best_step,tau_mem,optimum_agreement,snapshot_steps,'
             'snapshot_ratios']
    for p in points:
        steps = ' '.join(str(s['step']) for s in p['snapshots'])
        ratios = ' '.join(f"{s['ratio']:.4f}" for s in p['snapshots'])
        tau, agree = p.get('tau_mem'), p.get('optimum_agreement')
        lines.append(f"{p['size']},{p['ratio']:.4f},{p['ci'][0]:.4f},{p['ci'][1]:.4f},"
                     f"{p['best_step']},{'' if tau is None else f'{tau:.1f}'},"
                     f"{'' if agree is None else f'{agree:.4f}'},{steps},{ratios}")
    atomic_write(Path(outdir) / 'results.csv', '\n'.join(lines) + '\n')
    return record

def sample_grid(samples, reference, mem_threshold=1/3, columns=4, scale=None):
    """PIL image: each sample beside its nearest and second-nearest training images, d1/d2 written
    under it, memorized samples (d1/d2 < mem_threshold) framed in red."""
    d, idx = memdiff.nearest_neighbors(samples, reference, k=2)    # [B, 2]
    d1_d2 = (d[:, 0] / d[:, 1]).tolist()                   # as the metric, without deduplication
    triples = memdiff.to_uint8(torch.stack([samples, reference[idx[:, 0]], reference[idx[:, 1]]], 1))
    B, _, C, H, W = triples.shape                           # [B, 3, C, H, W]
    scale = scale or max(1, 64 // H)                        # tiny images are enlarged to be seen
    side, frame, text = H * scale, 3, 12                    # pixels: image, frame, caption row
    cell_w, cell_h = 3 * (side + 2 * frame) + 8, side + 2 * frame + text
    rows = -(-B // columns)
    grid = PIL.Image.new('RGB', (columns * cell_w, rows * cell_h), 'white')
    draw = PIL.ImageDraw.Draw(grid)
    for b in range(B):
        x0, y0 = b % columns * cell_w, b // columns * cell_h
        memorized = d1_d2[b] < mem_threshold
        for k in range(3):
            tile = triples[b, k].permute(1, 2, 0).numpy()
            tile = PIL.Image.fromarray(tile[:, :, 0] if C == 1 else tile).convert('RGB')
            tile = tile.resize((W * scale, side), PIL.Image.NEAREST)
            x = x0 + k * (side + 2 * frame)
            colour = (220, 30, 30) if k == 0 and memorized else (200, 200, 200)
            draw.rectangle([x, y0, x + side + 2 * frame - 1, y0 + side + 2 * frame - 1], fill=colour)
            grid.paste(tile, (x + frame, y0 + frame))
        draw.text((x0 + 2, y0 + side + 2 * frame), f'{d1_d2[b]:.2f}',
                  fill=(220, 30, 30) if memorized else (0, 0, 0))
    return grid

def write_png(path, image):
    """Write a PIL image, or a uint8 [H, W, C] tensor (C = 1 or 3), as a PNG."""
    picture = image
    if isinstance(image, torch.Tensor):
        array = image.numpy()
        picture = PIL.Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    atomic_write(path, lambda tmp: picture.save(tmp, format='PNG'))

#----------------------------------------------------------------------------
# The lock and the process group.

def _alive(pid):
    """Whether process pid exists (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                                 # alive, but another user's
        return True
    return True

@contextlib.contextmanager
def claim(outdir, owner=True):
    """Hold outdir/lock while a search writes there: two searches on one record would lose work."""
    path = Path(outdir) / 'lock'
    while owner:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            break
        except FileExistsError:
            try:
                pid = int(path.read_text() or 0)
            except (ValueError, FileNotFoundError):
                pid = 0
            if pid <= 0 or not _alive(pid):
                path.unlink(missing_ok=True)                # the stale lock of a killed run
                continue
            raise ValueError(f'{outdir}: in use by another run (process {pid}); wait for it or '
                             'choose another output folder') from None
    try:
        yield
    finally:
        if owner:
            path.unlink(missing_ok=True)

def init_distributed(device_name='auto'):
    """Join the torchrun process group when launched by torchrun -> (device, rank, world_size)."""
    if device_name == 'auto':
        device_name = 'cuda' if torch.cuda.is_available() else 'cpu'
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if world > 1 and not torch.distributed.is_initialized():
        backend = 'nccl' if device_name.startswith('cuda') else 'gloo'
        torch.distributed.init_process_group(backend)
    rank, world = memdiff.dist_info()
    try:
        device = torch.device(device_name)
    except RuntimeError:
        raise ValueError(f"unknown device {device_name!r} (use 'cpu', 'cuda', 'cuda:N' or "
                         "'auto')") from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'device {device_name!r} asked for, but this machine has no CUDA GPU')
    if device.type not in ('cpu', 'cuda'):
        raise ValueError(f"device {device_name!r} is not supported (use 'cpu' or 'cuda')")
    if device.type == 'cuda' and device.index is None:
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', '0')))
        torch.cuda.set_device(device)
    return device, rank, world

def close_distributed():
    """Leave the torchrun process group, once every rank is done (rank 0 may still be writing)."""
    # A process that exits with the group still open can abort in gloo's threads at shutdown.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()

#----------------------------------------------------------------------------
# The search ledger: every finished size is in results.json, every scored snapshot of an unfinished
# size in work/, so a rerun of the same command resumes where it stopped.

def measure_size(cfg, data, n, work, device=torch.device('cpu'), progress=None):
    """memdiff.measure with its ledger in work/ -> (point, samples of the best snapshot [B,C,H,W])."""
    rank = memdiff.dist_info()[0]
    files = {k: Path(work) / f'n{n}.{k}' for k in ('state.pt', 'snapshots.json', 'best.pt')}
    done = json.loads(files['snapshots.json'].read_text()) if files['snapshots.json'].exists() else []
    best = [torch.load(files['best.pt'], weights_only=True) if files['best.pt'].exists() else None]

    def on_snapshot(snapshot, x, y):
        # The best samples so far, then the snapshot: a rerun never scores a snapshot twice, and
        # never loses the samples of the best one.
        if all(snapshot['ratio'] > s['ratio'] for s in done):
            best[0] = x.cpu()
            if rank == 0:
                atomic_write(files['best.pt'], lambda tmp: torch.save(best[0], tmp))
        done.append(snapshot)
        if rank == 0:
            atomic_write(files['snapshots.json'], json.dumps(done))

    point = memdiff.measure(*data, n, cfg, device, checkpoint=files['state.pt'], done=list(done),
                            on_snapshot=on_snapshot, progress=progress)
    return point, best[0]

class _Ask(Exception):
    """Raised by a guessed ratio_at: the search would ask for this size next."""
    def __init__(self, n):
        super().__init__(n)
        self.n = n

def search_frontier(known, lo, hi, threshold=0.9, step=1, tolerance=0.0, limit=64, passes=None):
    """The first `limit` sizes find_emm may still ask for, given the ratios known {n: ratio},
    likeliest first: breadth-first over both outcomes of every size not yet known, the outcome
    passes(n) -> bool predicts first (passing when passes is None)."""
    out, queue = [], [{}]
    while queue and len(out) < limit:
        guess = queue.pop(0)

        def ratio_at(n):
            if n in guess:
                return guess[n]
            raise _Ask(n)
        try:
            memdiff.find_emm(ratio_at, lo, hi, threshold, step, tolerance, known)
        except _Ask as ask:
            if ask.n not in out:
                out.append(ask.n)
            # Passing is threshold itself, failing below it: both are outcomes find_emm can meet.
            outcomes = [{**guess, ask.n: threshold}, {**guess, ask.n: threshold - 1}]
            queue += outcomes if passes is None or passes(ask.n) else outcomes[::-1]
    return out

def onset_prediction(points, threshold, total_steps):
    """passes(n) -> bool from the onset law tau_mem = a n^b fitted to the points measured so far: a
    size passes when its predicted onset comes within its training, a n^b <= total_steps(n) (the
    default EMM is where the two meet: README, Memorization over training time). None until two
    sizes have a bracketed onset."""
    law = memdiff.tau_law(points, 1, threshold, replicates=0)  # the fit alone, no bootstrap
    if law is None:
        return None
    return lambda n: memdiff.tau_budget(law, n) <= total_steps(n)

def _worker(conn, run, n, threads):
    """A worker process: run(n, progress=...) -> (point, samples) on the CPU, sent back, or its
    error, after ('progress', kind, done, total) messages at each whole percent of each stage."""
    # Plain pickle, by value: the Pipe's own pickler would share tensors through file descriptors
    # that vanish with this process.
    torch.set_num_threads(threads)
    # Ctrl-C reaches the whole process group: the search stops its workers itself (Prefetch.close),
    # so a worker ignores it rather than print a traceback of its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    last = [None]

    def progress(kind, done, total):
        percent = (kind, 100 * done // max(total, 1))
        if percent != last[0]:
            last[0] = percent
            conn.send_bytes(pickle.dumps(('progress', kind, done, total)))
    try:
        result = run(n, progress=progress)
    except ValueError as e:
        result = e
    conn.send_bytes(pickle.dumps(('result', result)))
    conn.close()

class Prefetch:
    """ratio_at(n) for find_emm that measures the sizes the search may ask for next in worker
    processes, and hands each back when it is asked for, in the search's own order.

    run(n, progress) -> (point, samples) is measure_size with its arguments bound (picklable);
    progress(kind, done, total) is shown for the size the search waits for. Every random
    stream is seeded per size, so a worker computes the point a sequential run on `threads` threads
    would; which sizes are asked for, in which order, is find_emm's decision alone.
    frontier({n: point} measured so far) -> sizes still reachable, likeliest first; a running size
    no longer reachable is stopped (its work/ files stay, so a later search resumes it).
    """
    def __init__(self, run, workers, frontier, threads=1, progress=None):
        import multiprocessing
        self.ctx = multiprocessing.get_context('spawn')    # a fresh interpreter: no forked threads
        self.run, self.workers, self.frontier, self.threads = run, workers, frontier, threads
        self.progress = progress                            # shown for the size asked for only
        self.running, self.finished = {}, {}                # n -> (process, pipe); n -> result
        self.points = {}                                    # every size measured so far

    def _start(self, n):
        recv, send = self.ctx.Pipe(duplex=False)
        p = self.ctx.Process(target=_worker, daemon=True, args=(send, self.run, n, self.threads))
        p.start()
        send.close()
        self.running[n] = (p, recv)

    def _stop(self, n):
        p, recv = self.running.pop(n)
        p.terminate()
        p.join()
        recv.close()

    def _schedule(self, asked):
        """Stop what is unreachable, then fill idle workers: the asked size first, then the frontier."""
        reachable = self.frontier(dict(self.points))
        for n in [n for n in self.running if n not in reachable and n != asked]:
            self._stop(n)
        for n in [asked] + reachable:
            if len(self.running) >= self.workers:
                break
            if n not in self.running and n not in self.finished and n not in self.points:
                self._start(n)

    def __call__(self, n):
        """(point, samples) of size n, waiting for its worker."""
        import multiprocessing.connection
        self._schedule(n)
        while n not in self.finished:
            pipes = {recv: m for m, (_, recv) in self.running.items()}
            ended = False
            for recv in multiprocessing.connection.wait(list(pipes)):
                m = pipes[recv]
                try:
                    tag, *message = pickle.loads(recv.recv_bytes())
                    if tag == 'progress':
                        if m == n and self.progress is not None:
                            self.progress(*message)
                        continue
                    self.finished[m] = message[0]
                except EOFError:                            # died without a word (killed, OOM)
                    self.finished[m] = ValueError(f'|D| = {m}: the worker process died (exit code '
                                                  f'{self.running[m][0].exitcode}); rerun to resume')
                if not isinstance(self.finished[m], Exception):
                    self.points[m] = self.finished[m][0]
                self.running[m][0].join()
                self.running.pop(m)
                ended = True
            if ended:
                self._schedule(n)
        result = self.finished.pop(n)
        if isinstance(result, Exception):
            raise result
        return result

    def close(self):
        """Stop the workers still running (speculative sizes the search never asked for)."""
        for n in list(self.running):
            self._stop(n)

def default_workers(device, world, optimum=False):
    """--workers auto: one size per core, each with one thread, when training on the CPU in one
    process; sequential under torchrun, on a GPU, and for the closed-form optimum, whose sizes take
    less time than a worker takes to start (measured: README, Benchmarks)."""
    return max(1, os.cpu_count() or 1) if device.type == 'cpu' and world == 1 and not optimum else 1

def emm_search(cfg, outdir, data, sizes=None, lo=16, hi=None, step=1, tolerance=0.0,
               device=torch.device('cpu'), progress=None, log=print, workers=1):
    """Measure the sizes (or search [lo, hi]) of data = (images, labels); record and resume in outdir.

    With workers > 1 (CPU, one process), sizes the search may ask for next are measured in that many
    worker processes, one thread each; the sizes chosen and their points are a sequential run's.
    """
    images, labels = data
    if hi is None:                                          # the largest size every class can fill
        hi = memdiff.max_subset_size(labels if labels is not None else len(images))
    for n in list(sizes or []) + [lo, hi]:
        if not 1 <= n <= len(images):
            raise ValueError(f'size {n} is impossible: the data set {cfg.data} has {len(images)} '
                             'images')
    if not sizes and lo > hi:
        raise ValueError(f'the smallest size searched ({lo}) is above the largest ({hi})')
    config = cfg.to_dict()
    rank, world = memdiff.dist_info()
    if workers > 1 and (world > 1 or device.type != 'cpu'):
        raise ValueError('--workers above 1 runs sizes in parallel CPU processes; use it without '
                         'torchrun and on the CPU')
    outdir = Path(outdir)
    points = read_record(outdir, config)                    # before anything is written
    work = outdir / 'work'
    if rank == 0:
        work.mkdir(parents=True, exist_ok=True)
    with claim(outdir, rank == 0), contextlib.ExitStack() as stack:
        if rank == 0 and not points:                        # the configuration, before any work
            write_record(outdir, config, points, cfg.threshold)
        if world > 1:
            torch.distributed.barrier()
        if points:
            log(f'resuming: {len(points)} size(s) already measured in {outdir / "results.json"}')
        known = {p['size']: p['ratio'] for p in points}
        evaluate = functools.partial(measure_size, cfg, data, work=work, device=device,
                                     progress=progress)
        if workers > 1:
            if sizes:
                def frontier(done):
                    return [n for n in sizes if n not in known and n not in done]
            else:
                def frontier(done):
                    measured = {**{p['size']: p for p in points}, **done}
                    passes = onset_prediction(list(measured.values()), cfg.threshold,
                                              cfg.train.total_steps)
                    return search_frontier({n: p['ratio'] for n, p in measured.items()}, lo, hi,
                                           cfg.threshold, step, tolerance, passes=passes)
            evaluate = Prefetch(functools.partial(measure_size, cfg, data, work=work), workers,
                                frontier, progress=progress)
            stack.callback(evaluate.close)
            log(f'{workers} worker processes, one thread each')

        def ratio_at(n):
            log(f'|D| = {n}: ' + ('sampling the closed-form optimum' if cfg.optimum else
                                  f'training {cfg.train.total_steps(n)} steps'))
            point, x = evaluate(n)
            points.append(point)
            if rank == 0:
                write_record(outdir, config, points, cfg.threshold)
                y = memdiff.training_set(images, labels, n, cfg)[0]
                x = memdiff.quantize_uint8(x[:64])
                write_png(outdir / f'samples_n{n}.png', sample_grid(x, y, cfg.mem_threshold))
                (work / f'n{n}.state.pt').unlink(missing_ok=True)  # the record holds the result
            log(f'|D| = {n}: memorization ratio {point["ratio"]:.3f} (95% CI {point["ci"][0]:.3f}'
                f'-{point["ci"][1]:.3f}, best step {point["best_step"]})')
            return point['ratio']

        if sizes:
            for n in sizes:
                if n not in known:
                    known[n] = ratio_at(n)
            status = 'grid'
        else:
            status = memdiff.find_emm(ratio_at, lo, hi, cfg.threshold, step, tolerance,
                                      known)['status']
        # Rewritten at the end too, so a resumed run with nothing left to do still has it whole.
        if rank == 0:
            record = write_record(outdir, config, points, cfg.threshold, dict(search=status))
            try:
                plot_memorization(outdir / 'memorization.png', record, cfg.threshold)
            except ImportError:
                log("(memorization.png needs matplotlib: pip install 'memdiff[plot]')")
            return record
        return dict(**memdiff.summarize(points, cfg.threshold), points=points, search=status)

#----------------------------------------------------------------------------

@click.command(context_settings=dict(help_option_names=['-h', '--help'], max_content_width=100),
               epilog="""\b
Examples:
  python run_emm.py                                  # EMM of a small DDPM++ on the digits (CPU, minutes)
  python run_emm.py --optimum                        # the closed-form optimum: memorizes every size
  python run_emm.py --labels unique --sizes 64,256   # one class per image, two sizes
  python run_emm.py --resolution 4 --channels 8      # lower data dimension, narrower network
  python run_emm.py --workers 1                      # one size at a time, on every core
  python run_emm.py --dry-run --preset paper --data cifar-10-python.tar.gz
  python run_emm.py --data cifar-10-python.tar.gz --labels random:10 --sizes 1000 --export set.zip
  torchrun --standalone --nproc_per_node=8 run_emm.py --preset paper --data cifar-10-python.tar.gz
""")
# Data.
@click.option('--data', metavar='SPEC', default='digits', show_default=True,
              help="'digits' (bundled), a .npz, a CIFAR-10 python archive/folder, or a PNG zip.")
@click.option('--resolution', metavar='INT', type=click.IntRange(min=1), default=None,
              help="Down-sample to this resolution (Pillow LANCZOS on uint8, as the study).")
@click.option('--classes', metavar='INT', type=click.IntRange(min=1), default=None,
              help='Keep only the first C classes.')
@click.option('--labels', metavar='MODE', type=LabelMode(), default='none', show_default=True,
              help='Conditioning: none | true | random:C | unique.')
@click.option('--export', metavar='PATH.zip', default=None,
              help="Write the training set of the one --sizes N as the study's dataset tools "
                   'would (an EDM zip of PNGs with dataset.json), then stop.')
# Network.
@click.option('--arch', type=click.Choice(['ddpmpp', 'ncsnpp']), default='ddpmpp', show_default=True,
              help='U-Net architecture.')
@click.option('--precond', type=click.Choice(['edm', 'vp', 've']), default='edm', show_default=True,
              help='Preconditioning and loss.')
@click.option('--channels', metavar='INT', type=click.IntRange(min=4), default=16, show_default=True,
              help='Base width (model_channels).')
@click.option('--channel-mult', metavar='LIST', type=IntList(), default='1,2', show_default=True,
              help='Width multiplier per resolution level.')
@click.option('--blocks', metavar='INT', type=click.IntRange(min=1), default=1, show_default=True,
              help='Residual blocks per resolution.')
@click.option('--attn', metavar='LIST', type=IntList(), default='4', show_default=True,
              help="Resolutions with self-attention ('' for none).")
@click.option('--skips', metavar='LIST', type=IntList(), default=None,
              help='One 0/1 per encoder skip connection (default: all on).')
@click.option('--embedding', type=click.Choice(['positional', 'fourier']), default=None,
              help="Time embedding (default: the arch's own).")
@click.option('--dropout', metavar='FLOAT', type=click.FloatRange(0, 1, max_open=True), default=0.0,
              show_default=True, help='Dropout probability in the residual blocks.')
# Training.
@click.option('--optimizer', type=click.Choice(['adam', 'sgd']), default='adam', show_default=True,
              help='Adam (0.9, 0.999) or SGD with momentum 0.9.')
@click.option('--lr', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=1e-3,
              show_default=True, help='Learning rate.')
@click.option('--batch', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True,
              help='Global batch size.')
@click.option('--weight-decay', metavar='FLOAT', type=click.FloatRange(min=0), default=0.0,
              show_default=True, help='L2 weight decay inside the optimizer.')
@click.option('--ema', metavar='EPOCHS', type=click.FloatRange(min=0), default=10.0,
              show_default=True, help='EMA half-life in epochs of |D|.')
@click.option('--ema-mode', type=click.Choice(['mode1', 'mode2', 'mode3', 'mode4', 'fixed']),
              default=None, help="The study's EMA modes (default mode1, the half-life as given; "
                                 "'fixed' when --ema-beta is given).")
@click.option('--ema-beta', metavar='FLOAT', type=click.FloatRange(0, 1), default=None,
              help="Per-step EMA decay: constant with 'fixed', mode4's final value [0.99929].")
@click.option('--steps', metavar='INT', type=click.IntRange(min=1), default=1500, show_default=True,
              help='Training steps per size (unless --epochs).')
@click.option('--epochs', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=None,
              help='Training length in epochs of |D| instead of --steps.')
@click.option('--lr-rampup', metavar='EPOCHS', type=click.FloatRange(min=0), default=0.0,
              show_default=True, help='Linear learning-rate warm-up in epochs of |D|.')
@click.option('--whole-kimg', is_flag=True,
              help="Round ramp-up and EMA half-life down to whole kimg, as the study's train.py.")
@click.option('--snapshots', metavar='INT', type=click.IntRange(min=1), default=3, show_default=True,
              help='EMA snapshots evaluated per size (spaced by --snapshot-spacing).')
@click.option('--snapshot-images', metavar='INT', type=click.IntRange(min=1), default=None,
              help="Or one snapshot every so many images, in EDM's ticks of 50k images.")
@click.option('--snapshot-spacing', type=click.Choice(['linear', 'log']), default='linear',
              show_default=True, help='--snapshots evenly spaced, or geometrically from 1% of the '
                                      'steps to the end (for tau_mem).')
@click.option('--amp', is_flag=True, help='bf16 autocast for the network (the study ran fp32).')
@click.option('--tf32', is_flag=True, help='Allow TF32 matrix products on CUDA (off: fp32 as the study).')
# Evaluation and search.
@click.option('--samples', metavar='INT', type=click.IntRange(min=1), default=1000, show_default=True,
              help='Generated samples per snapshot (seeds 0..N-1, as the study).')
@click.option('--sampler-steps', metavar='INT', type=click.IntRange(min=2), default=18,
              show_default=True, help='Heun steps (2n-1 network evaluations).')
@click.option('--threshold', metavar='FLOAT', type=click.FloatRange(0, 1), default=0.9,
              show_default=True, help='Memorization ratio that counts as memorizing (1 - eps).')
@click.option('--sizes', metavar='LIST', type=IntList(), default=None,
              help='Measure these sizes instead of searching.')
@click.option('--min-size', metavar='INT', type=click.IntRange(min=1), default=16, show_default=True,
              help='Smallest size of the search (it doubles from here).')
@click.option('--max-size', metavar='INT', type=click.IntRange(min=1), default=None,
              help='Largest size searched (default: the data set).')
@click.option('--tolerance', metavar='FLOAT', type=click.FloatRange(min=0), default=0.35,
              show_default=True, help='Stop bisecting when the bracket is this narrow (relative).')
@click.option('--optimum', is_flag=True, help='Score the closed-form optimal denoiser instead.')
@click.option('--score', 'score_path', metavar='PKL|DIR', default=None,
              help="Score the study's network-snapshot-*.pkl (one, or the best of a folder's) "
                   'against the training set of --sizes N (default: all of --data), then stop.')
# Run.
@click.option('--preset', type=click.Choice(sorted(PRESETS)), default=None,
              help="The study's configuration (explicit options still win).")
@click.option('--seed', metavar='INT', type=click.IntRange(min=0), default=0, show_default=True,
              help='Seed of training: initial weights, data order and noise.')
@click.option('--device', metavar='DEV', default='auto', show_default=True,
              help="'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:1'.")
@click.option('--workers', metavar='N|auto', type=Workers(), default='auto', show_default=True,
              help='Measure sizes the search may ask for next in N CPU processes of one thread '
                   "each ('auto': one per core when training on the CPU, else 1); the sizes chosen "
                   'and their points are those of a sequential run on one thread.')
@click.option('--outdir', metavar='DIR', default=None,
              help='Output folder (default: runs/emm-<hash of the configuration>); reruns resume.')
@click.option('--dry-run', is_flag=True, help='Print the configuration and its cost, then stop.')
@click.option('--sweep', metavar='FACTOR=V1,V2', default=None,
              help="One EMM search per value of an option, e.g. labels=none,true,unique "
                   "(separate values by ';' when they hold commas).")
@click.pass_context
def main(ctx, **opts):
    """Estimate the effective model memorization (EMM) of a diffusion model.

    EMM is the largest training-set size |D| at which the trained model still memorizes at least
    --threshold of its samples (Gu et al., TMLR 2025). Sizes are searched by doubling from
    --min-size, then bisection; every finished size is recorded in OUTDIR/results.json, and rerunning
    the same command resumes an interrupted search.
    """
    given = {k for k in opts if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE}
    if opts['export']:
        try:
            if opts['preset']:
                apply_preset(opts, given)
            export_training_set(make_config(opts, given), opts['sizes'], opts['export'],
                                opts['sweep'])
        except ValueError as e:
            raise click.ClickException(str(e)) from None
        return
    try:
        if opts['preset']:
            apply_preset(opts, given)
        device, rank, world = init_distributed(opts['device'])
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = opts['tf32']
        if opts['score_path']:
            return score_snapshots(opts, device, rank)
        runs = sweep_values(ctx, opts) if opts['sweep'] else [(None, opts)]
        configs = [(value, make_config(o, given)) for value, o in runs]  # every value checked first
        if opts['dry_run']:
            for value, cfg in configs:
                dry_run(cfg, opts)
            close_distributed()
            return
        log = click.echo if rank == 0 else (lambda *a: None)
        # Each configuration's default folder is named by its hash, so sweeps and single runs share
        # (and resume) the records of identical configurations.
        factor = opts['sweep'].split('=')[0] if opts['sweep'] else None
        base = opts['outdir'] or (f'runs/sweep-{factor}-{config_hash(make_config(opts, given))}'
                                  if factor else f'runs/emm-{config_hash(configs[0][1])}')
        records = []
        for value, cfg in configs:
            outdir = (f'{base}/{factor}={value}' if opts['outdir'] else
                      f'runs/emm-{config_hash(cfg)}') if factor else base
            log(f'memdiff EMM search -> {outdir} (world size {world}, device {device})')
            record = emm_search(cfg, outdir, dataset(cfg.data, cfg.resolution, cfg.classes),
                                sizes=opts['sizes'], lo=opts['min_size'], hi=opts['max_size'],
                                tolerance=opts['tolerance'], device=device,
                                progress=Progress() if rank == 0 else None, log=log,
                                workers=opts['workers'] or default_workers(device, world, cfg.optimum))
            if rank == 0:
                print_table(record, cfg.threshold)
            records.append((value, record))
        if opts['sweep'] and rank == 0:
            write_sweep(base, factor, records, configs[0][1].threshold)
        close_distributed()
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    except KeyboardInterrupt:
        raise click.ClickException('interrupted: rerun the same command to resume') from None

def snapshot_files(path):
    """The snapshots to score: one file, or a folder's network-snapshot-*.pkl but the initial one."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ValueError(f'{path}: no such file or folder')
    files = sorted(path.glob('network-snapshot-*.pkl'))
    if not files:
        raise ValueError(f'{path}: holds no network-snapshot-*.pkl')
    return files[1:] or files                               # as mem_ratio.py: not the first one

def score_snapshots(opts, device, rank):
    """Memorization ratio of each snapshot's samples (seeds 0..N-1) against the training set."""
    images, labels = dataset(opts['data'], opts['resolution'], opts['classes'])
    if opts['sizes'] and len(opts['sizes']) != 1:
        raise click.BadParameter('--score takes one training-set size', param_hint='--sizes')
    files = snapshot_files(opts['score_path'])
    n = opts['sizes'][0] if opts['sizes'] else len(images)
    # The training set of size n by the study's rule, or the whole data set (the study's own zip).
    y = memdiff.training_set(images, labels, n, memdiff.EMMConfig())[0] if opts['sizes'] else images
    y = y.to(device)
    log = click.echo if rank == 0 else (lambda *a: None)
    rows = []
    for path in files:
        net = memdiff.load_network(path).to(device)
        shape = (net.net.in_channels, net.net.img_resolution, net.net.img_resolution)
        if shape != tuple(y.shape[1:]):
            raise ValueError(f'{path}: the network makes images of shape {shape}, the training set '
                             f'holds {tuple(y.shape[1:])}')
        x, _ = memdiff.generate(net, opts['samples'], shape, net.label_dim, device,
                                opts['sampler_steps'], progress=Progress() if rank == 0 else None)
        s, _ = memdiff.score(x, y)
        rows.append(dict(snapshot=path.name, **s))
        log(f'{path.name}: memorization ratio {s["ratio"]:.4f} (95% CI {s["ci"][0]:.4f}-'
            f'{s["ci"][1]:.4f})')
    best = max(rows, key=lambda r: r['ratio'])
    log(f'\nbest of {len(rows)}: {best["snapshot"]}, memorization ratio {best["ratio"]:.4f} '
        f'against |D| = {n} of {opts["data"]}')
    if opts['outdir'] and rank == 0:
        Path(opts['outdir']).mkdir(parents=True, exist_ok=True)
        atomic_write(Path(opts['outdir']) / 'score.json', json.dumps(dict(
            size=n, data=opts['data'], samples=opts['samples'], best=best, snapshots=rows,
            versions=versions()), indent=1))
    close_distributed()

def apply_preset(opts, given):
    """Fill the options not given on the command line from the preset (in place)."""
    preset = dict(PRESETS[opts['preset']])
    preset.update({k: v for k, v in ARCH_DEFAULTS[opts['arch']].items()})
    # An explicit --steps (--snapshots) replaces the preset's --epochs (--snapshot-images):
    # otherwise the preset's duration would silently win over the one asked for.
    skip = given | {alt for k, alt in (('steps', 'epochs'), ('snapshots', 'snapshot_images'))
                    if k in given}
    for k, v in preset.items():
        if k not in skip:
            opts[k] = v
    opts['preset_attn'] = 'attn' not in given               # attention moves with the resolution

def sweep_values(ctx, opts):
    """'--sweep factor=v1,v2' -> [(value text, options with that value)], values typed by click."""
    factor, _, text = opts['sweep'].partition('=')
    name = factor.strip().replace('-', '_')
    params = {p.name: p for p in ctx.command.params}
    if name not in params or name in ('sweep', 'outdir', 'dry_run', 'preset', 'device', 'sizes',
                                      'workers'):
        raise click.BadParameter(f'unknown factor {factor!r} (use an option name such as labels, '
                                 'resolution, channels, classes, skips, embedding, weight-decay, '
                                 'ema, batch)', param_hint='--sweep')
    values = [v.strip() for v in text.split(';' if ';' in text else ',') if v.strip()]
    if not values:
        raise click.BadParameter(f'no values for {factor!r}', param_hint='--sweep')
    runs = []
    for v in values:
        o = dict(opts)
        p = params[name]
        o[name] = v.lower() in ('1', 'true', 'yes', 'on') if p.is_flag else p.type_cast_value(ctx, v)
        runs.append((v, o))
    return runs

@functools.lru_cache(maxsize=1)
def stored(data):
    """The pixels of a data set as stored: read once per run."""
    return memdiff.read_dataset(data)

@functools.lru_cache(maxsize=4)
def dataset(data, resolution, classes):
    """The data set of a configuration (its classes, its resolution)."""
    return memdiff.prepare_dataset(*stored(data), resolution, classes, data)

def make_config(o, given=()):
    """Options -> memdiff.EMMConfig, checked against the data set (ValueError on impossible values)."""
    images, labels = dataset(o['data'], None, None)
    side = images.shape[-1]
    resolution = None if o['resolution'] in (None, side) else o['resolution']  # same data, same record
    attn = o['attn']
    if o.get('preset_attn'):                                # the study: attention at half the side
        attn = ((resolution or side) // 2,)
    ema_mode = o['ema_mode'] or ('fixed' if o['ema_beta'] is not None else 'mode1')
    train = memdiff.TrainConfig(
        precond=o['precond'], optimizer=o['optimizer'], lr=o['lr'], batch=o['batch'],
        weight_decay=o['weight_decay'], steps=o['steps'], epochs=o['epochs'],
        lr_rampup_epochs=o['lr_rampup'], ema_mode=ema_mode, ema_halflife_epochs=o['ema'],
        ema_beta=0.99929 if o['ema_beta'] is None else o['ema_beta'], whole_kimg=o['whole_kimg'],
        snapshots=o['snapshots'], snapshot_images=o['snapshot_images'],
        snapshot_spacing=o['snapshot_spacing'], amp=o['amp'])
    cfg = memdiff.EMMConfig(
        data=o['data'], resolution=resolution, classes=o['classes'], labels=o['labels'],
        arch=o['arch'], channels=o['channels'], channel_mult=o['channel_mult'], blocks=o['blocks'],
        attn=attn, skips=o['skips'] or None, embedding=o['embedding'], dropout=o['dropout'],
        train=train, samples=o['samples'], num_steps=o['sampler_steps'], threshold=o['threshold'],
        optimum=o['optimum'], seed=o['seed'])
    if not cfg.channel_mult:
        raise click.BadParameter('needs at least one level', param_hint='--channel-mult')
    if cfg.labels == 'true' and labels is None:
        raise click.BadParameter(f"'true' needs a data set with labels, and {cfg.data} has none",
                                 param_hint='--labels')
    if resolution is not None and resolution > side:
        raise click.BadParameter(f'{resolution} is above the image size {side} of {cfg.data}',
                                 param_hint='--resolution')
    num_classes = 0 if labels is None else int(labels.max()) + 1
    if cfg.classes is not None and cfg.classes > num_classes:
        raise click.BadParameter(f'{cfg.data} has {num_classes} classes, not {cfg.classes}',
                                 param_hint='--classes')
    dataset(cfg.data, cfg.resolution, cfg.classes)          # a resolution the study cannot make
    if not cfg.optimum:                                     # an impossible network fails here,
        with torch.device('meta'):                          # built without memory or time
            memdiff.build_network(cfg, (images.shape[1], resolution or side, resolution or side),
                                  0 if cfg.labels == 'none' else 2)
    return cfg

def config_hash(cfg):
    """Short hash of the configuration: the default output folder of a run."""
    return hashlib.sha1(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:8]

def dry_run(cfg, opts):
    """Print the resolved configuration and the cost of one |D| point."""
    images, labels = dataset(cfg.data, cfg.resolution, cfg.classes)
    n = opts['max_size'] or min(len(images), 1000)
    _, _, label_dim = memdiff.training_set(images, labels, n, cfg)
    with torch.device('meta'):
        net = memdiff.build_network(cfg, tuple(images.shape[1:]), label_dim)
    params = sum(p.numel() for p in net.parameters())
    steps = cfg.train.total_steps(n)
    snaps = len(cfg.train.snapshot_steps(n))
    evals = snaps * cfg.samples * (2 * cfg.num_steps - 1)
    optimum = '' if cfg.optimum else (f', and {cfg.samples} samples of the optimum for the '
                                      'agreement')
    click.echo(json.dumps(cfg.to_dict(), indent=1))
    click.echo(f'data: {len(images)} images of shape {tuple(images.shape[1:])}')
    click.echo(f'network: {params:,} parameters')
    click.echo(f'cost of |D| = {n}: {steps:,} training steps of batch {cfg.train.batch} '
               f'({steps * cfg.train.batch:,} images), {snaps} snapshot(s) x {cfg.samples} samples '
               f'x {2 * cfg.num_steps - 1} evaluations = {evals:,} network evaluations{optimum}')

#----------------------------------------------------------------------------
# What the user sees: progress, the table, the sweep.

class Progress:
    """click progress bars for training steps and sampling evaluations."""
    def __init__(self):
        self.bar, self.kind, self.done = None, None, 0

    def __call__(self, kind, done, total):
        if self.bar is None or kind != self.kind or done < self.done:
            self.close()
            self.bar = click.progressbar(length=total, label=f'  {kind:<7}', file=sys.stderr,
                                         show_pos=True, width=30)
            self.bar.__enter__()
            self.kind, self.done = kind, 0
        self.bar.update(done - self.done)
        self.done = done
        if done >= total:
            self.close()

    def close(self):
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None

def export_training_set(cfg, sizes, path, sweep=None):
    """Write the training set of size N (sizes = 'N') to path as the study's dataset tools write it
    (dataset_utils/dataset_size.py and its variants): an uncompressed zip of uncompressed PNGs
    00000/img00000000.png.. in class-sorted order, then dataset.json {"labels": [[name, label]..]}."""
    if not path.lower().endswith('.zip'):
        raise click.BadParameter(f'{path!r} must end in .zip', param_hint='--export')
    if sweep:
        raise click.BadParameter('exports one training set: drop --sweep', param_hint='--export')
    n = tuple(sizes or ())
    if len(n) != 1:
        raise click.BadParameter('needs exactly one size, e.g. --sizes 1000', param_hint='--sizes')
    images, labels = dataset(cfg.data, cfg.resolution, cfg.classes)
    # With --labels none the study's files still carry the true labels (train.py --cond=0
    # ignores them).
    true = cfg.labels == 'none' and labels is not None
    y, c, _ = memdiff.training_set(images, labels, n[0],
                                   dataclasses.replace(cfg, labels='true') if true else cfg)
    pixels = memdiff.to_uint8(y).permute(0, 2, 3, 1).numpy()          # [n, H, W, C] uint8
    if pixels.shape[-1] not in (1, 3):
        raise click.BadParameter(f'the study writes RGB or grayscale images, not {pixels.shape[-1]} '
                                 'channels', param_hint='--data')

    def write(tmp):
        with zipfile.ZipFile(tmp, 'w', compression=zipfile.ZIP_STORED) as z:
            entries = []
            for i, img in enumerate(pixels):
                name = f'{i // 1000:05d}/img{i:08d}.png'
                png = io.BytesIO()
                PIL.Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(
                    png, format='png', compress_level=0, optimize=False)
                z.writestr(name, png.getbuffer())
                entries.append([name, int(c[i])] if c is not None else None)
            z.writestr('dataset.json', json.dumps({'labels': entries if c is not None else None}))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)
    click.echo(f'wrote {len(pixels)} images of shape {tuple(y.shape[1:])} '
               f'({"no labels" if c is None else f"labels {cfg.labels}"}) to {path}')

def print_table(record, threshold):
    """The final table: size, ratio, 95% CI, best snapshot; then the EMM."""
    click.echo(f'\n{"|D|":>7}  {"ratio":>6}  {"95% CI":>13}  {"best step":>9}  {"tau_mem":>8}  '
               f'{"bracket":>13}  {"optimum":>7}  memorizes')
    for p in record['points']:
        mark = 'yes' if p['ratio'] >= threshold else 'no'
        tau, bracket, agree = p.get('tau_mem'), p.get('tau_bracket'), p.get('optimum_agreement')
        tau = '-' if tau is None else f'{tau:.0f}'
        bracket = '-' if bracket is None else f'{bracket[0]}-{bracket[1]}'
        agree = '-' if agree is None else f'{agree:.3f}'
        click.echo(f'{p["size"]:>7}  {p["ratio"]:>6.3f}  {p["ci"][0]:>6.3f}-{p["ci"][1]:<6.3f}  '
                   f'{p["best_step"]:>9}  {tau:>8}  {bracket:>13}  {agree:>7}  {mark}')
    crossing = f' (interpolated crossing {record["crossing"]:.0f})' if record['crossing'] else ''
    emm = record['emm'] if record['emm'] is not None else 'none (below the smallest size)'
    click.echo(f'\nEMM at {threshold:.0%}: {emm}{crossing}   [{record.get("search", "")}]')
    law = record.get('tau')
    if law is None:
        if any(p.get('tau_mem') for p in record['points']):
            click.echo('tau_mem law: needs two sizes whose onset a snapshot below the threshold brackets')
        return
    ci = 'no interval' if law['ci'] is None else f"95% CI {law['ci'][0]:.2f}-{law['ci'][1]:.2f}"
    click.echo(f"tau_mem = {law['prefactor']:.3g} |D|^{law['exponent']:.2f} ({ci}, parametric "
               f"bootstrap of {law['replicates']}) over |D| = "
               f"{', '.join(str(n) for n in law['sizes'])}")
    largest = max(p['size'] for p in record['points'])
    for n in (2 * largest, 4 * largest):
        click.echo(f'  |D| = {n} would reach {threshold:.0%} after about '
                   f'{memdiff.tau_budget(law, n):,.0f} steps')

def write_sweep(base, factor, records, threshold):
    """Side-by-side table of a sweep: printed, and written as sweep.json, sweep.csv and sweep.png."""
    sizes = sorted({p['size'] for _, r in records for p in r['points']})
    header = [factor, 'EMM', 'crossing'] + [f'n={n}' for n in sizes]
    rows = []
    for value, r in records:
        at = {p['size']: p['ratio'] for p in r['points']}
        rows.append([value, '-' if r['emm'] is None else str(r['emm']),
                     '-' if r['crossing'] is None else f"{r['crossing']:.0f}"]
                    + [f'{at[n]:.3f}' if n in at else '' for n in sizes])
    Path(base).mkdir(parents=True, exist_ok=True)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    click.echo('\n' + '  '.join(h.rjust(w) for h, w in zip(header, widths)))
    for row in rows:
        click.echo('  '.join(c.rjust(w) for c, w in zip(row, widths)))
    atomic_write(f'{base}/sweep.csv', '\n'.join(','.join(r) for r in [header] + rows) + '\n')
    atomic_write(f'{base}/sweep.json', json.dumps(dict(
        factor=factor, threshold=threshold, values=[dict(value=v, emm=r['emm'], crossing=r['crossing'],
        points=[dict(size=p['size'], ratio=p['ratio'], ci=p['ci']) for p in r['points']])
        for v, r in records]), indent=1))
    try:
        plot_sweep(f'{base}/sweep.png', factor, records, threshold)
    except ImportError:
        click.echo("(sweep.png needs matplotlib: pip install 'memdiff[plot]')")

def plot_sweep(path, factor, records, threshold):
    """Memorization ratio against |D| (log scale), one curve per value, the threshold dashed."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for value, r in records:
        pts = sorted((p['size'], p['ratio']) for p in r['points'])
        ax.plot([n for n, _ in pts], [q for _, q in pts], 'o-', label=f'{factor}={value}')
    ax.axhline(threshold, color='k', ls='--', lw=0.8)
    ax.set(xscale='log', xlabel='training-set size |D|', ylabel='memorization ratio',
           ylim=(-0.02, 1.02), title=f'EMM sweep over {factor}')
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format='png'))
    plt.close(fig)

def plot_memorization(path, record, threshold):
    """Three panels: ratio against |D| (Wilson band, threshold, EMM); against the training step,
    one line per size with tau_mem marked; against step / |D|, where tau_mem ~ |D| collapses them."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    points = sorted(record['points'], key=lambda p: p['size'])
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), dpi=110)
    ax = axes[0]
    sizes = [p['size'] for p in points]
    ax.fill_between(sizes, [p['ci'][0] for p in points], [p['ci'][1] for p in points],
                    alpha=0.25, label='95% Wilson interval')
    ax.plot(sizes, [p['ratio'] for p in points], 'o-', label='best snapshot')
    if record.get('emm') is not None:
        ax.axvline(record['emm'], color='C3', ls=':', label=f"EMM = {record['emm']}")
    ax.set(xscale='log', xlabel='training-set size |D|', ylabel='memorization ratio',
           title='ratio against |D|')
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.minorticks_off()
    for k, p in enumerate(points):
        steps = [s['step'] for s in sorted(p['snapshots'], key=lambda s: s['step'])]
        ratios = [s['ratio'] for s in sorted(p['snapshots'], key=lambda s: s['step'])]
        for ax, scale in ((axes[1], 1), (axes[2], p['size'])):
            x = [max(s, 1) / scale for s in steps]          # the optimum's step 0 on the axis
            ax.plot(x, ratios, 'o-', ms=3, color=f'C{k % 10}', label=f"|D| = {p['size']}")
            if p.get('tau_mem'):
                ax.plot(p['tau_mem'] / scale, threshold, 'x', color=f'C{k % 10}', ms=8)
    axes[0].plot([], [], 'k--', lw=0.8, label=f'threshold {threshold:g}')
    axes[1].set(xlabel='training step', title='ratio against step (x: tau_mem)')
    axes[2].set(xlabel='training step / |D|', title='ratio against step / |D|')
    for ax in axes:
        ax.axhline(threshold, color='k', ls='--', lw=0.8)
        ax.set(ylim=(-0.02, 1.02))
        ax.legend(fontsize=7)
    for ax in axes[1:]:
        ax.set_xscale('log')
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format='png'))
    plt.close(fig)

if __name__ == '__main__':
    main()
