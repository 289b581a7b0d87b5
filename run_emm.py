"""Estimate the effective model memorization (EMM) of a diffusion model: python run_emm.py --help.

memdiff.py holds the science; this file is the run around it: the options and the study's preset,
one record and one lock per size (so several processes can measure sizes of one folder at once),
resume, the combined record, the PNG grids and plots, sweeps, the study's files (--export,
--score) and the torchrun process group.
"""

import contextlib
import dataclasses
import datetime
import fcntl
import functools
import hashlib
import io
import json
import os
import platform
import re
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
# durations rounded to whole kimg, a snapshot every 2.5M images, 10k samples per snapshot. NCSN++
# runs VE with the Fourier embedding. Attention sits at half the resolution, as in every run.
PAPER = dict(model_channels=128, channel_mult=(2, 2, 2), num_blocks=2, dropout=0.13, precond='vp',
             lr=2e-4, batch=512, epochs=40000.0, lr_rampup=200.0, ema_mode='mode2',
             ema_halflife=10.0, whole_kimg=True, snapshot_images=2_500_000, samples=10000, seed=1024)
NCSNPP = dict(precond='ve', embedding='fourier')
TRAIN_FIELDS = {f.name for f in dataclasses.fields(memdiff.TrainConfig)}
NUMBER, BETA = r'(\d+\.?\d*|\.\d+)(e-?\d+)?', r'(0(\.\d*)?|1(\.0*)?|\.\d+)'

#----------------------------------------------------------------------------
# Options: typed and checked at the edge, then turned into one EMMConfig by make_config.

class Option(click.Option):
    """An option of one --help group (Data, Network, Training, Evaluation, Run)."""
    def __init__(self, *decls, group='Run', **kwargs):
        super().__init__(*decls, show_default=True, **kwargs)
        self.group = group

class Command(click.Command):
    """--help lists the options under their groups, in the order they are declared."""
    def format_options(self, ctx, formatter):
        groups = {}
        for p in self.get_params(ctx):
            if p.get_help_record(ctx):
                groups.setdefault(getattr(p, 'group', 'Run'), []).append(p.get_help_record(ctx))
        for title, rows in groups.items():
            with formatter.section(f'{title} options'):
                formatter.write_dl(rows)

class Pattern(click.ParamType):
    """Text that matches a regular expression (a label mode, an EMA, sizes, ...)."""
    name = 'text'

    def __init__(self, regex, kind):
        self.regex, self.kind = regex, kind

    def convert(self, value, param, ctx):
        if re.fullmatch(self.regex, str(value)):
            return str(value)
        self.fail(f'{value!r} is not {self.kind}', param, ctx)

def option(group, *decls, **kwargs):
    return click.option(*decls, cls=Option, group=group, **kwargs)

def config_values(opts):
    """The EMMConfig and TrainConfig fields the options set, each under the option's own name."""
    names = ('data', 'resolution', 'classes', 'labels', 'arch', 'precond', 'model_channels',
             'num_blocks', 'embedding', 'dropout', 'lr', 'batch', 'weight_decay', 'train_steps',
             'epochs', 'samples', 'threshold', 'seed')
    v = {k: opts[k] for k in names}
    if opts['skips']:
        v['skips'] = tuple(int(s) for s in opts['skips'].split(','))
    mode, _, value = opts['ema'].partition(':')
    v['ema_mode'] = mode
    v.update(ema_beta=float(value) if mode in ('mode4', 'fixed') else None,
             ema_halflife=float(value) if mode in ('mode1', 'mode2') else None)
    count, _, spacing = opts['snapshots'].partition(':')
    v.update(snapshots=int(count), snapshot_spacing=spacing or 'linear')
    return v

def make_config(opts, given):
    """Options, and the preset for what the command line did not give -> memdiff.EMMConfig."""
    values = config_values(opts)
    if opts['preset'] == 'paper':
        preset = {**PAPER, **(NCSNPP if values['arch'] == 'ncsnpp' else {})}
        mine = {k for k in values if k in given}
        if 'ema' in given:
            mine |= {'ema_mode', 'ema_halflife', 'ema_beta'}
        if 'snapshots' in given:                            # they replace the preset's ticks,
            mine |= {'snapshots', 'snapshot_spacing', 'snapshot_images'}
        if 'train_steps' in given:                          # and steps its epochs
            mine.add('epochs')
        values.update({k: v for k, v in preset.items() if k not in mine})
    values = {k: v for k, v in values.items() if v is not None or k in ('epochs', 'resolution',
                                                                         'classes', 'embedding')}
    train = memdiff.TrainConfig(**{k: values.pop(k) for k in list(values) if k in TRAIN_FIELDS})
    cfg = memdiff.EMMConfig(**values, train=train)
    check_config(cfg)
    return cfg

def check_config(cfg):
    """Refuse a configuration the data set or the network cannot give, before anything runs."""
    images, labels = dataset(cfg.data, None, None)
    side = images.shape[-1]
    if cfg.labels == 'true' and labels is None:
        raise click.BadParameter(f"'true' needs a data set with labels, and {cfg.data} has none",
                                 param_hint='--labels')
    if cfg.resolution is not None and cfg.resolution > side:
        raise click.BadParameter(f'{cfg.resolution} is above the image size {side} of {cfg.data}',
                                 param_hint='--resolution')
    num_classes = 0 if labels is None else int(labels.max()) + 1
    if cfg.classes is not None and cfg.classes > num_classes:
        raise click.BadParameter(f'{cfg.data} has {num_classes} classes, not {cfg.classes}',
                                 param_hint='--classes')
    images = dataset(cfg.data, cfg.resolution, cfg.classes)[0]  # a resolution it cannot make
    if cfg.arch != 'optimum':                               # an impossible network fails here,
        with torch.device('meta'):                          # built without memory or time
            memdiff.build_network(cfg, tuple(images.shape[1:]), 0 if cfg.labels == 'none' else 2)

@functools.lru_cache(maxsize=1)
def stored(data):
    """The pixels of a data set as stored: read once per run."""
    return memdiff.read_dataset(data)

@functools.lru_cache(maxsize=4)
def dataset(data, resolution, classes):
    """The data set of a configuration (its classes, its resolution)."""
    return memdiff.prepare_dataset(*stored(data), resolution, classes, data)

def config_hash(cfg):
    """Short hash of the configuration: the default output folder of a run."""
    return hashlib.sha1(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:8]

#----------------------------------------------------------------------------
# Files. Every file is written whole or not at all. An output folder holds config.json, one record
# per finished size (n16.json), the combined results.json / results.csv, and in work/ the lock and
# the resume files of each size being measured.

def atomic_write(path, data):
    """Write data (str, bytes, or a function of a temporary path) to path via a rename."""
    tmp = Path(f'{path}.{os.getpid()}.tmp')                 # one per process: writers may race
    if callable(data):
        data(tmp)
    else:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)

def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f'{path}: not a readable memdiff record ({e}); move it away or choose '
                         'another output folder') from None

def versions():
    """Versions of the software a record was made with."""
    return dict(python=platform.python_version(), torch=torch.__version__, numpy=np.__version__)

@contextlib.contextmanager
def locked(path, wait_message=None):
    """Hold an exclusive lock on path (flock: the kernel frees it when its process dies)."""
    with open(path, 'a') as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if wait_message:
                click.echo(wait_message)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield

def open_folder(outdir, cfg):
    """The output folder of cfg: created with config.json, or checked against the one it holds."""
    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise ValueError(f'{outdir}: is a file, not a folder; choose another --outdir')
    (outdir / 'work').mkdir(parents=True, exist_ok=True)
    config, path = cfg.to_dict(), outdir / 'config.json'
    if not path.exists():
        atomic_write(path, json.dumps(config, indent=1))
    saved = read_json(path)
    if saved != config:
        keys = sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k))
        raise ValueError(f'{path}: holds a run with a different configuration (differs in: '
                         f'{", ".join(keys)}); choose another output folder')
    return outdir

def combine(outdir, cfg):
    """results.json and results.csv of every size recorded in outdir, sizes ascending."""
    with locked(Path(outdir) / 'work' / 'results.lock'):
        points = sorted((read_json(p) for p in Path(outdir).glob('n*.json')),
                        key=lambda p: p['size'])
        sampled = not cfg.optimum
        # The law's bootstrap is seeded here, once: the same points always give the same interval.
        tau = memdiff.tau_law(points, cfg.samples, cfg.threshold,
                              generator=torch.Generator().manual_seed(0)) if sampled else None
        record = dict(**memdiff.summarize(points, cfg.threshold), threshold=cfg.threshold, tau=tau,
                      points=points, config=cfg.to_dict())
        atomic_write(Path(outdir) / 'results.json', json.dumps(record, indent=1))
        keys = ['size', 'ratio', 'ratio_study'] + ['best_step', 'tau_mem', 'share', 'gap'] * sampled
        lines = [','.join(keys[:2] + ['ci_low', 'ci_high'] + keys[2:])]
        for p in points:
            cells = [p.get(k) for k in keys[:2]] + p['ci'] + [p.get(k) for k in keys[2:]]
            lines.append(','.join('' if c is None else f'{c:.4g}' if isinstance(c, float)
                                  else str(c) for c in cells))
        atomic_write(Path(outdir) / 'results.csv', '\n'.join(lines) + '\n')
    return record

def save_samples(path, detail, y):
    """The samples of one snapshot for analysis: uint8 [B,H,W,C] as the study saves them, their seeds
    and classes, d1, d2, d1/d2 and the indices of the two nearest training images."""
    pixels = memdiff.to_uint8(detail['samples']).permute(0, 2, 3, 1).cpu().numpy()
    arrays = dict(samples=pixels, seeds=np.arange(len(pixels)), d1=detail['d1'].cpu().numpy(),
                  d2=detail['d2'].cpu().numpy(), nearest=detail['index'].cpu().numpy())
    arrays['d1_d2'] = arrays['d1'] / arrays['d2']
    if detail['classes'] is not None:
        arrays['classes'] = detail['classes'].cpu().numpy()
    atomic_write(path, lambda tmp: np.savez(open(tmp, 'wb'), **arrays))

#----------------------------------------------------------------------------
# One size, and the search. A size is locked while one process measures it; a process that needs
# it meanwhile waits and then reads its record. Its work/ files make an interruption resume from
# the last scored snapshot, bit for bit.

def measure_size(cfg, data, n, outdir, device, log, save=False):
    """The point of size n: read from outdir, or measured there (resuming its work/ files)."""
    rank, world = memdiff.dist_info()
    record, work = outdir / f'n{n}.json', outdir / 'work'
    with locked(work / f'n{n}.lock', f'|D| = {n}: another process is measuring it; waiting') \
            if rank == 0 else contextlib.nullcontext():
        point = read_json(record) if rank == 0 and record.exists() else None
        if world > 1:                                       # every rank follows rank 0
            box = [point]
            torch.distributed.broadcast_object_list(box)
            point = box[0]
        if point is not None:
            return point
        log(f'|D| = {n}: ' + ('sampling the closed-form optimum' if cfg.optimum else
                              f'training {cfg.train.total_steps(n)} steps'))
        files = {k: work / f'n{n}.{k}' for k in ('snapshots.json', 'state.pt', 'best.pt')}
        done = read_json(files['snapshots.json']) if files['snapshots.json'].exists() else []
        try:
            resume = torch.load(files['state.pt'], map_location=device, weights_only=True) \
                if files['state.pt'].exists() else None
        except Exception as e:                              # torch raises several kinds here
            raise ValueError(f"{files['state.pt']}: not a readable training state ({e}); delete it "
                             'to train this size from the start') from None
        y = memdiff.training_set(*data, n, cfg)[0]
        if memdiff.duplicates(y):
            log(f'|D| = {n}: {memdiff.duplicates(y)} training images have exact duplicates: '
                "'ratio' counts a copy of one as memorized, 'ratio_study' does not (the study)")
        for snapshot, detail, state in memdiff.measure(*data, n, cfg, device, resume, progress_bar()):
            if snapshot['step'] in {s['step'] for s in done}:
                continue                                    # scored before an interruption
            if rank == 0:
                if all(snapshot['ratio'] > s['ratio'] for s in done):
                    atomic_write(files['best.pt'], lambda t: torch.save(detail['samples'][:64], t))
                if save:
                    save_samples(outdir / f"samples_n{n}_step{snapshot['step']}.npz", detail, y)
            done.append(snapshot)
            if rank == 0:                                   # the snapshot first, then the state
                atomic_write(files['snapshots.json'], json.dumps(done))
            if state is not None:
                state = state()                             # every rank: it gathers their streams
                if rank == 0:
                    atomic_write(files['state.pt'], lambda t: torch.save(state, t))
        point = dict(memdiff.best_point(n, done, cfg.threshold), world_size=world,
                     versions=versions())
        if rank == 0:
            best = torch.load(files['best.pt'], weights_only=True)
            atomic_write(outdir / f'samples_n{n}.png', lambda t: sample_grid(
                memdiff.quantize_uint8(best), y, cfg.mem_threshold).save(t, format='PNG'))
            atomic_write(record, json.dumps(point, indent=1))
            for f in files.values():
                f.unlink(missing_ok=True)
    log(f'|D| = {n}: memorization ratio {point["ratio"]:.3f} (95% CI {point["ci"][0]:.3f}-'
        f'{point["ci"][1]:.3f}' + (')' if cfg.optimum else f', best step {point["best_step"]})'))
    return point

def emm_search(cfg, outdir, data, sizes=slice(16, None), tolerance=0.35, device=torch.device('cpu'),
               log=print, save=False):
    """Measure a grid of sizes (a tuple), or search the range of a slice; record and resume in outdir."""
    images, labels = data
    top = memdiff.max_subset_size(labels if labels is not None else len(images))
    asked = list(sizes) if isinstance(sizes, tuple) else [sizes.start, sizes.stop or top]
    for n in asked:
        if n > top:
            raise ValueError(f'size {n} is impossible: the study\'s rule builds sets of at most {top} '
                             f'images from {cfg.data} ({len(images)} images)')
    rank, world = memdiff.dist_info()
    outdir = open_folder(outdir, cfg) if rank == 0 else Path(outdir)
    if world > 1:
        torch.distributed.barrier()                         # the folder exists for every rank

    def ratio_at(n):
        return measure_size(cfg, data, n, outdir, device, log, save)['ratio']

    if isinstance(sizes, tuple):
        for n in sizes:
            ratio_at(n)
        status = 'grid'
    else:
        if asked[0] > asked[1]:
            raise ValueError(f'the smallest size searched ({asked[0]}) is above the largest '
                             f'({asked[1]})')
        status = memdiff.find_emm(ratio_at, *asked, cfg.threshold, tolerance=tolerance)['status']
    if rank != 0:
        return None
    record = dict(combine(outdir, cfg), search=status)
    try:
        plot_memorization(outdir / 'memorization.png', record, cfg.threshold, not cfg.optimum)
    except ImportError:
        log("(memorization.png needs matplotlib: pip install 'memdiff[plot]')")
    return record

#----------------------------------------------------------------------------

@click.command(cls=Command, context_settings=dict(help_option_names=['-h', '--help'],
                                                  max_content_width=100), epilog="""\b
Examples:
  python run_emm.py                                  # EMM of a small DDPM++ on the digits (CPU, minutes)
  python run_emm.py --arch optimum                   # the closed-form optimum: memorizes every size
  python run_emm.py --labels unique --sizes 64,256   # one class per image, two sizes
  python run_emm.py --resolution 4 --model-channels 8  # lower data dimension, narrower network
  python run_emm.py --sweep model-channels=8,16,32   # one EMM search per value, side by side
  python run_emm.py --dry-run --preset paper --data cifar-10-python.tar.gz
  python run_emm.py --data cifar-10-python.tar.gz --labels random:10 --sizes 1000 --export set.zip
  torchrun --standalone --nproc_per_node=8 run_emm.py --preset paper --data cifar-10-python.tar.gz
""")
@option('Data', '--data', metavar='SPEC', default='digits',
        help="'digits' (bundled), a .npz, a CIFAR-10 python archive/folder, or a PNG zip.")
@option('Data', '--resolution', metavar='INT', type=click.IntRange(min=1), default=None,
        help='Down-sample to this resolution (Pillow LANCZOS on uint8, as the study).')
@option('Data', '--classes', metavar='INT', type=click.IntRange(min=1), default=None,
        help='Keep only the first C classes.')
@option('Data', '--labels', metavar='MODE', default='none',
        type=Pattern(r'none|true|unique|random:[1-9]\d*', 'none, true, random:C or unique'),
        help='Conditioning: none | true | random:C | unique.')
@option('Network', '--arch', type=click.Choice(['ddpmpp', 'ncsnpp', 'optimum']), default='ddpmpp',
        help='U-Net, or the closed-form optimal denoiser (no training).')
@option('Network', '--precond', type=click.Choice(['edm', 'vp', 've']), default='edm',
        help='Preconditioning and loss.')
@option('Network', '--model-channels', metavar='INT', type=click.IntRange(min=4), default=16,
        help='Width: channels at the first level (a multiple of 4).')
@option('Network', '--num-blocks', metavar='INT', type=click.IntRange(min=1), default=1,
        help='Depth: residual blocks per resolution.')
@option('Network', '--skips', metavar='LIST', default=None,
        type=Pattern(r'[01](,[01])*', 'comma-separated 0s and 1s'),
        help='One 0/1 per encoder skip connection, first = full resolution [all on].')
@option('Network', '--embedding', type=click.Choice(['positional', 'fourier']), default=None,
        help="Time embedding [the arch's own].")
@option('Network', '--dropout', metavar='FLOAT', type=click.FloatRange(0, 1, max_open=True),
        default=0.0, help='Dropout probability in the residual blocks.')
@option('Training', '--lr', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True),
        default=1e-3, help='Adam learning rate.')
@option('Training', '--batch', metavar='INT', type=click.IntRange(min=1), default=64,
        help='Global batch size.')
@option('Training', '--weight-decay', metavar='FLOAT', type=click.FloatRange(min=0), default=0.0,
        help='L2 weight decay inside Adam.')
@option('Training', '--ema', metavar='MODE', default='mode1:10',
        type=Pattern(rf'mode[12]:{NUMBER}|mode3|(mode4|fixed):{BETA}', 'mode1:H, mode2:H, mode3, '
                     'mode4:BETA or fixed:BETA (H in epochs, BETA in [0, 1])'),
        help="The study's EMA modes: mode1:H, mode2:H (half-life H epochs), mode3, mode4:BETA, "
             'fixed:BETA.')
@option('Training', '--train-steps', metavar='INT', type=click.IntRange(min=1), default=1500,
        help='Training steps per size (unless --epochs).')
@option('Training', '--epochs', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True),
        default=None, help='Training length in epochs of |D| instead of --train-steps.')
@option('Training', '--snapshots', metavar='N[:log]', default='3',
        type=Pattern(r'[1-9]\d*(:log)?', 'N or N:log with N >= 1'),
        help='EMA snapshots scored per size; N:log spaces them from 1% of the steps (tau_mem).')
@option('Evaluation', '--samples', metavar='INT', type=click.IntRange(min=1), default=1000,
        help='Generated samples per snapshot (seeds 0..N-1, as the study).')
@option('Evaluation', '--threshold', metavar='FLOAT', type=click.FloatRange(0, 1), default=0.9,
        help='1 - eps: the memorization ratio that counts as memorizing.')
@option('Evaluation', '--sizes', metavar='LIST|LO:HI', default='16:',
        type=Pattern(r'[1-9]\d*(,[1-9]\d*)*|[1-9]\d*:([1-9]\d*)?', 'sizes N,M,... or a range LO:HI'),
        help='Measure these sizes, or search LO:HI (HI: the largest set the data gives).')
@option('Evaluation', '--tolerance', metavar='FLOAT', type=click.FloatRange(min=0), default=0.35,
        help='Stop bisecting when the bracket is this narrow (relative).')
@option('Evaluation', '--save-samples', is_flag=True,
        help='Write each snapshot\'s samples, d1, d2 and nearest training images to an .npz.')
@option('Run', '--preset', type=click.Choice(['paper']), default=None,
        help="The study's CIFAR-10 configuration (explicit options still win).")
@option('Run', '--seed', metavar='INT', type=click.IntRange(min=0), default=0,
        help='Seed of training: initial weights, data order and noise.')
@option('Run', '--device', metavar='DEV', default='auto',
        help="'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:1'.")
@option('Run', '--outdir', metavar='DIR', default=None,
        help='Output folder [runs/emm-<hash of the configuration>]; reruns resume.')
@option('Run', '--dry-run', is_flag=True, help='Print the configuration and its cost, then stop.')
@option('Run', '--sweep', metavar='OPTION=V1,V2', default=None,
        help="One EMM search per value of an option, e.g. labels=none,true,unique (';' between "
             'values that hold commas).')
@option('Run', '--score', 'score_path', metavar='PKL|DIR', default=None,
        help="Score the study's network-snapshot-*.pkl (one, or a folder's) against the training "
             'set of --sizes N (default: all of --data), then stop.')
@option('Run', '--export', metavar='PATH.zip', default=None,
        help="Write the training set of --sizes N as the study's dataset tools would, then stop.")
@option('Run', '--force', is_flag=True, help='Let --export replace an existing file.')
@click.pass_context
def main(ctx, **opts):
    """Estimate the effective model memorization (EMM) of a diffusion model.

    EMM is the largest training-set size |D| at which the trained model still memorizes at least
    --threshold of its samples (Gu et al., TMLR 2025). Sizes are searched by doubling from the
    lower end of --sizes, then bisection. Each finished size is recorded in OUTDIR/n<size>.json
    and combined in OUTDIR/results.json; rerunning a command resumes it, and processes started
    on different sizes of one OUTDIR share its records.
    """
    given = {k for k in opts if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE}
    sizes = opts['sizes']
    opts['sizes'] = (slice(int(sizes.split(':')[0]), int(sizes.split(':')[1] or 0) or None)
                     if ':' in sizes else tuple(int(n) for n in sizes.split(',')))
    try:
        if opts['export']:
            return export_training_set(make_config(opts, given), opts['sizes'], opts['export'],
                                       opts['force'])
        device, rank, world = init_distributed(opts['device'])
        log = click.echo if rank == 0 else (lambda *a: None)
        if opts['score_path']:
            return score_snapshots(opts, device, log)
        runs = sweep_values(ctx, opts) if opts['sweep'] else [(None, opts)]
        configs = [(value, make_config(o, given | {opts['sweep'].split('=')[0].replace('-', '_')}
                                       if value else given)) for value, o in runs]
        if opts['dry_run']:
            for _, cfg in configs:
                dry_run(cfg, opts['sizes'])
            return close_distributed()
        factor = opts['sweep'] and opts['sweep'].split('=')[0]
        records = []
        for value, cfg in configs:
            outdir = opts['outdir'] or f'runs/emm-{config_hash(cfg)}'
            outdir = f'{outdir}/{factor}={value}' if factor and opts['outdir'] else outdir
            log(f'memdiff EMM search -> {outdir} (world size {world}, device {device})')
            record = emm_search(cfg, outdir, dataset(cfg.data, cfg.resolution, cfg.classes),
                                opts['sizes'], opts['tolerance'], device, log, opts['save_samples'])
            if rank == 0:
                print_table(record, cfg)
            records.append((value, record))
        if factor and rank == 0:
            write_sweep(opts['outdir'] or 'runs', factor, records)
        close_distributed()
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    except KeyboardInterrupt:
        raise click.ClickException('interrupted: rerun the same command to resume') from None

def init_distributed(device_name='auto'):
    """Join the torchrun process group when launched by torchrun -> (device, rank, world_size)."""
    if device_name == 'auto':
        device_name = 'cuda' if torch.cuda.is_available() else 'cpu'
    try:
        device = torch.device(device_name)
    except RuntimeError:
        raise ValueError(f"unknown device {device_name!r} (use 'cpu', 'cuda', 'cuda:N' or "
                         "'auto')") from None
    if device.type not in ('cpu', 'cuda'):
        raise ValueError(f"device {device_name!r} is not supported (use 'cpu' or 'cuda')")
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'device {device_name!r} asked for, but this machine has no CUDA GPU')
    if int(os.environ.get('WORLD_SIZE', '1')) > 1 and not torch.distributed.is_initialized():
        # A size another job is measuring may keep rank 0 waiting long: the group waits with it.
        torch.distributed.init_process_group('nccl' if device.type == 'cuda' else 'gloo',
                                             timeout=datetime.timedelta(days=7))
    if device.type == 'cuda' and device.index is None:
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', '0')))
        torch.cuda.set_device(device)
    return (device, *memdiff.dist_info())

def close_distributed():
    """Leave the torchrun process group once every rank is done (rank 0 may still be writing)."""
    # A process that exits with the group still open can abort in gloo's threads at shutdown.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()

def sweep_values(ctx, opts):
    """'--sweep option=v1,v2' -> [(value text, options with that value)], values typed by click."""
    factor, _, text = opts['sweep'].partition('=')
    name = factor.strip().replace('-', '_')
    params = {p.name: p for p in ctx.command.params}
    if name not in params or name in ('sweep', 'outdir', 'dry_run', 'preset', 'device', 'sizes',
                                      'score_path', 'export', 'force', 'save_samples'):
        raise click.BadParameter(f'unknown option {factor!r} (use one such as labels, resolution, '
                                 'model-channels, classes, skips, embedding, ema, batch)',
                                 param_hint='--sweep')
    values = [v.strip() for v in text.split(';' if ';' in text else ',') if v.strip()]
    if not values:
        raise click.BadParameter(f'no values for {factor!r}', param_hint='--sweep')
    p = params[name]
    return [(v, {**opts, name: v.lower() in ('1', 'true', 'yes', 'on') if p.is_flag
                 else p.type_cast_value(ctx, v)}) for v in values]

def dry_run(cfg, sizes):
    """Print the resolved configuration and the cost of one |D| point."""
    images, labels = dataset(cfg.data, cfg.resolution, cfg.classes)
    n = sizes[-1] if isinstance(sizes, tuple) else sizes.stop or min(len(images), 1000)
    _, _, label_dim = memdiff.training_set(images, labels, n, cfg)
    click.echo(json.dumps(cfg.to_dict(), indent=1))
    click.echo(f'data: {len(images)} images of shape {tuple(images.shape[1:])}')
    evals = f'{cfg.samples} samples x {2 * cfg.num_steps - 1} evaluations'
    if cfg.optimum:
        return click.echo(f'cost of |D| = {n}: {evals} of the closed-form optimum')
    with torch.device('meta'):
        params = sum(p.numel() for p in memdiff.build_network(
            cfg, tuple(images.shape[1:]), label_dim).parameters())
    steps, snaps = cfg.train.total_steps(n), len(cfg.train.snapshot_steps(n))
    click.echo(f'network: {params:,} parameters')
    click.echo(f'cost of |D| = {n}: {steps:,} training steps of batch {cfg.train.batch} '
               f'({steps * cfg.train.batch:,} images), {snaps} snapshot(s) x {evals} = '
               f'{snaps * cfg.samples * (2 * cfg.num_steps - 1):,} network evaluations')

#----------------------------------------------------------------------------
# The study's files: its training sets (--export) and its snapshots (--score).

def export_training_set(cfg, sizes, path, force=False):
    """Write the training set of size N (sizes = (N,)) to path as the study's dataset tools write it
    (dataset_utils/dataset_size.py and its variants): an uncompressed zip of uncompressed PNGs
    00000/img00000000.png.. in class-sorted order, then dataset.json {"labels": [[name, label]..]}."""
    if not path.lower().endswith('.zip'):
        raise click.BadParameter(f'{path!r} must end in .zip', param_hint='--export')
    if Path(path).exists() and not (force and Path(path).is_file()):
        raise click.BadParameter(f'{path} exists; give --force to replace it' if Path(path).is_file()
                                 else f'{path} is a folder', param_hint='--export')
    if not isinstance(sizes, tuple) or len(sizes) != 1:
        raise click.BadParameter('needs exactly one size, e.g. --sizes 1000', param_hint='--sizes')
    images, labels = dataset(cfg.data, cfg.resolution, cfg.classes)
    # With --labels none the study's files still carry the true labels (train.py --cond=0
    # ignores them).
    true = cfg.labels == 'none' and labels is not None
    y, c, _ = memdiff.training_set(images, labels, sizes[0],
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

def score_snapshots(opts, device, log):
    """Memorization ratio of each snapshot's samples (seeds 0..N-1) against the training set."""
    images, labels = dataset(opts['data'], opts['resolution'], opts['classes'])
    path, sizes = Path(opts['score_path']), opts['sizes']
    if isinstance(sizes, tuple) and len(sizes) != 1:
        raise click.BadParameter('--score takes one training-set size', param_hint='--sizes')
    if path.is_dir():
        files = sorted(path.glob('network-snapshot-*.pkl'))
        if not files:
            raise ValueError(f'{path}: holds no network-snapshot-*.pkl')
        files = files[1:] or files                          # as mem_ratio.py: not the first one
    elif path.is_file():
        files = [path]
    else:
        raise ValueError(f'{path}: no such file or folder')
    # The training set of size n by the study's rule, or the whole data set (the study's own zip).
    n = sizes[0] if isinstance(sizes, tuple) else len(images)
    y = (memdiff.training_set(images, labels, n, memdiff.EMMConfig())[0]
         if isinstance(sizes, tuple) else images).to(device)
    outdir = opts['outdir'] and Path(opts['outdir'])
    if outdir and memdiff.dist_info()[0] == 0:
        if outdir.exists() and not outdir.is_dir():
            raise ValueError(f'{outdir}: is a file, not a folder; choose another --outdir')
        outdir.mkdir(parents=True, exist_ok=True)
    if memdiff.duplicates(y):
        log(f"{memdiff.duplicates(y)} training images have exact duplicates: 'ratio' counts a copy "
            "of one as memorized, 'ratio_study' does not (the study)")
    rows = []
    for file in files:
        net = memdiff.load_network(file).to(device)
        shape = (net.net.in_channels, net.net.img_resolution, net.net.img_resolution)
        if shape != tuple(y.shape[1:]):
            raise ValueError(f'{file}: the network makes images of shape {shape}, the training set '
                             f'holds {tuple(y.shape[1:])}')
        x, c = memdiff.generate(net, opts['samples'], shape, net.label_dim, device,
                                progress=progress_bar())
        summary, scores = memdiff.score(x, y)
        rows.append(dict(snapshot=file.name, **summary))
        study = f', the study\'s rule {summary["ratio_study"]:.4f}' if 'ratio_study' in summary else ''
        log(f'{file.name}: memorization ratio {summary["ratio"]:.4f} (95% CI {summary["ci"][0]:.4f}-'
            f'{summary["ci"][1]:.4f}{study})')
        if opts['save_samples'] and outdir and memdiff.dist_info()[0] == 0:
            save_samples(outdir / f'samples_{file.stem}.npz', dict(samples=x, classes=c, **scores), y)
    best = max(rows, key=lambda r: r['ratio'])
    log(f'\nbest of {len(rows)}: {best["snapshot"]}, memorization ratio {best["ratio"]:.4f} '
        f'against |D| = {n} of {opts["data"]}')
    if outdir and memdiff.dist_info()[0] == 0:
        atomic_write(outdir / 'score.json', json.dumps(dict(
            size=n, data=opts['data'], samples=opts['samples'], best=best, snapshots=rows,
            versions=versions()), indent=1))
    close_distributed()

#----------------------------------------------------------------------------
# What the user sees: progress, the table, the pictures, the sweep.

class Progress:
    """click progress bars for training steps and sampling evaluations (on a terminal only)."""
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

def progress_bar():
    """Progress bars on rank 0 when stderr is a terminal (a log file gets none), else None."""
    return Progress() if memdiff.dist_info()[0] == 0 and sys.stderr.isatty() else None

def print_table(record, cfg):
    """The final table: one row per size, then the EMM and the onset law."""
    t = cfg.threshold
    columns = [('|D|', 7, lambda p: p['size']), ('ratio', 6, lambda p: f"{p['ratio']:.3f}"),
               ('95% CI', 13, lambda p: f"{p['ci'][0]:.3f}-{p['ci'][1]:.3f}")]
    if any('ratio_study' in p for p in record['points']):
        columns.append(('study', 6, lambda p: f"{p['ratio_study']:.3f}" if 'ratio_study' in p
                        else '-'))
    if not cfg.optimum:
        columns += [('best step', 9, lambda p: p['best_step']),
                    ('tau_mem', 8, lambda p: '-' if p['tau_mem'] is None else f"{p['tau_mem']:.0f}"),
                    ('share', 6, lambda p: '-' if p.get('share') is None else f"{p['share']:.3f}"),
                    ('gap', 7, lambda p: '-' if p.get('gap') is None else f"{p['gap']:.3f}")]
    columns.append(('memorizes', 9, lambda p: 'yes' if p['ratio'] >= t else 'no'))
    click.echo('\n' + '  '.join(f'{name:>{w}}' for name, w, _ in columns))
    for p in record['points']:
        click.echo('  '.join(f'{cell(p)!s:>{w}}' for _, w, cell in columns))
    crossing = f' (interpolated crossing {record["crossing"]:.0f})' if record['crossing'] else ''
    emm = record['emm'] if record['emm'] is not None else 'none (below the smallest size)'
    click.echo(f'\nEMM at {t:.0%}: {emm}{crossing}   [{record.get("search", "")}]')
    law = record.get('tau')
    if law is not None:
        ci = 'no interval' if law['ci'] is None else f"95% CI {law['ci'][0]:.2f}-{law['ci'][1]:.2f}"
        click.echo(f"tau_mem = {law['prefactor']:.3g} |D|^{law['exponent']:.2f} ({ci}) over "
                   f"|D| = {', '.join(str(n) for n in law['sizes'])}")

def sample_grid(samples, reference, mem_threshold=1/3, columns=4, scale=None):
    """PIL image: each sample beside its nearest and second-nearest training images, d1/d2 written
    under it, memorized samples (d1/d2 < mem_threshold) framed in red."""
    d, idx = memdiff.nearest_distinct(samples, reference)   # [B, 2], as the metric
    d1_d2 = (d[:, 0] / d[:, 1]).tolist()
    triples = memdiff.to_uint8(torch.stack([samples, reference[idx[:, 0]], reference[idx[:, 1]]], 1))
    B, _, C, H, W = triples.shape                           # [B, 3, C, H, W]
    scale = scale or max(1, 64 // H)                        # tiny images are enlarged to be seen
    side, frame, text = H * scale, 3, 12                    # pixels: image, frame, caption row
    cell_w, cell_h = 3 * (side + 2 * frame) + 8, side + 2 * frame + text
    grid = PIL.Image.new('RGB', (columns * cell_w, -(-B // columns) * cell_h), 'white')
    draw = PIL.ImageDraw.Draw(grid)
    for b in range(B):
        x0, y0 = b % columns * cell_w, b // columns * cell_h
        red = d1_d2[b] < mem_threshold
        for k in range(3):
            tile = triples[b, k].permute(1, 2, 0).numpy()
            tile = PIL.Image.fromarray(tile[:, :, 0] if C == 1 else tile).convert('RGB')
            x = x0 + k * (side + 2 * frame)
            draw.rectangle([x, y0, x + side + 2 * frame - 1, y0 + side + 2 * frame - 1],
                           fill=(220, 30, 30) if k == 0 and red else (200, 200, 200))
            grid.paste(tile.resize((W * scale, side), PIL.Image.NEAREST), (x + frame, y0 + frame))
        draw.text((x0 + 2, y0 + side + 2 * frame), f'{d1_d2[b]:.2f}',
                  fill=(220, 30, 30) if red else (0, 0, 0))
    return grid

def plot_memorization(path, record, threshold, trained=True):
    """The ratio against |D| (Wilson band, threshold, EMM); for trained networks also against the
    step and step / |D| (tau_mem marked), and the optimum share and held-out gap against step / |D|."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    points = sorted(record['points'], key=lambda p: p['size'])
    fig, axes = plt.subplots(1, 4 if trained else 1, figsize=(18 if trained else 5, 4), dpi=110,
                             squeeze=False)
    axes = axes[0]
    sizes = [p['size'] for p in points]
    axes[0].fill_between(sizes, [p['ci'][0] for p in points], [p['ci'][1] for p in points],
                         alpha=0.25, label='95% Wilson interval')
    axes[0].plot(sizes, [p['ratio'] for p in points], 'o-', label='best snapshot')
    if record.get('emm') is not None:
        axes[0].axvline(record['emm'], color='C3', ls=':', label=f"EMM = {record['emm']}")
    axes[0].set(xscale='log', xlabel='training-set size |D|', ylabel='memorization ratio',
                title='ratio against |D|')
    axes[0].set_xticks(sizes, [str(n) for n in sizes])
    axes[0].minorticks_off()
    for k, p in enumerate(points if trained else []):
        snaps = sorted(p['snapshots'], key=lambda s: s['step'])
        steps = [s['step'] for s in snaps]
        style = dict(color=f'C{k % 10}', ms=3)
        for ax, scale in ((axes[1], 1), (axes[2], p['size'])):
            ax.plot([s / scale for s in steps], [s['ratio'] for s in snaps], 'o-',
                    label=f"|D| = {p['size']}", **style)
            if p.get('tau_mem'):
                ax.plot(p['tau_mem'] / scale, threshold, 'x', color=style['color'], ms=8)
        axes[3].plot([s / p['size'] for s in steps], [s.get('share') for s in snaps], 'o-', **style,
                     label=f"share, |D| = {p['size']}")
        axes[3].plot([s / p['size'] for s in steps], [s.get('gap') for s in snaps], 's--', **style)
    if trained:
        axes[1].set(xlabel='training step', title='ratio against step (x: tau_mem)')
        axes[2].set(xlabel='training step / |D|', title='ratio against step / |D|')
        axes[3].set(xlabel='training step / |D|', title='optimum share (o-) and held-out gap (s--)')
        axes[3].axhline(0.5, color='k', ls=':', lw=0.8)
        for ax in axes[1:]:
            ax.set_xscale('log')
    for ax in axes[:3]:
        ax.axhline(threshold, color='k', ls='--', lw=0.8)
        ax.set(ylim=(-0.02, 1.02))
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format='png'))
    plt.close(fig)

def write_sweep(base, factor, records):
    """Side-by-side table of a sweep: printed, and written as sweep-<option>.json and .csv in base."""
    sizes = sorted({p['size'] for _, r in records for p in r['points']})
    header = [factor, 'EMM', 'crossing'] + [f'n={n}' for n in sizes]
    rows = []
    for value, r in records:
        at = {p['size']: p['ratio'] for p in r['points']}
        rows.append([value, '-' if r['emm'] is None else str(r['emm']),
                     '-' if r['crossing'] is None else f"{r['crossing']:.0f}"]
                    + [f'{at[n]:.3f}' if n in at else '' for n in sizes])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    for row in [header] + rows:
        click.echo('  '.join(c.rjust(w) for c, w in zip(row, widths)))
    Path(base).mkdir(parents=True, exist_ok=True)
    atomic_write(f'{base}/sweep-{factor}.csv', '\n'.join(','.join(r) for r in [header] + rows) + '\n')
    atomic_write(f'{base}/sweep-{factor}.json', json.dumps([dict(
        value=v, emm=r['emm'], crossing=r['crossing'],
        points=[{k: p[k] for k in ('size', 'ratio', 'ci')} for p in r['points']])
        for v, r in records], indent=1))

if __name__ == '__main__':
    main()
