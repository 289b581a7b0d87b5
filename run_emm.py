"""Estimate the effective model memorization (EMM) of a diffusion model: python run_emm.py --help."""

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

# The study's CIFAR-10 run [Gu et al., sec. 3; sail-sg/DiffMemorize scripts/*.md], in epochs of |D|.
PAPER = dict(model_channels=128, channel_mult=(2, 2, 2), num_blocks=2, dropout=0.13, precond='vp',
             lr=2e-4, batch=512, epochs=40000.0, lr_rampup=200.0, ema_mode='mode2',
             ema_halflife=10.0, whole_kimg=True, snapshot_images=2_500_000, samples=10000, seed=1024)
NCSNPP = dict(PAPER, precond='ve', embedding='fourier')     # NCSN++: VE, the Fourier embedding
# The fields each option sets: given, it keeps the preset off them all (--train-steps its epochs).
SETS = dict(ema=('ema_mode', 'ema_halflife', 'ema_beta'), train_steps=('train_steps', 'epochs'),
            snapshots=('snapshots', 'snapshot_spacing', 'snapshot_images'))

#----------------------------------------------------------------------------
# Options: typed and checked at the edge, then turned into one EMMConfig by make_config.

class Option(click.Option):
    """An option of one --help group (Data, Network, Training, Evaluation, Run), default shown."""
    def __init__(self, *decls, group='Run', **kwargs):
        super().__init__(*decls, show_default=True, **kwargs)
        self.group = group

def option(group, *decls, **kwargs):
    return click.option(*decls, cls=Option, group=group, **kwargs)

class Command(click.Command):
    """--help lists the options under their five groups, in the order they are declared."""
    def format_options(self, ctx, formatter):
        shown = [(getattr(p, 'group', 'Run'), p.get_help_record(ctx)) for p in self.get_params(ctx)]
        for group in ('Data', 'Network', 'Training', 'Evaluation', 'Run'):
            with formatter.section(f'{group} options'):
                formatter.write_dl([record for g, record in shown if g == group and record])

class Pattern(click.ParamType):
    """Text that matches a regular expression (a label mode, an EMA, sizes, ...)."""
    name = 'text'
    def __init__(self, regex, kind):
        self.regex, self.kind = regex, kind
    def convert(self, value, param, ctx):
        if not re.fullmatch(self.regex, str(value)):
            self.fail(f'{value!r} is not {self.kind}', param, ctx)
        return str(value)

def make_config(opts, given):
    """Options (the preset where none was given) -> an EMMConfig its data and network allow."""
    fields = {f.name: c for c in (memdiff.EMMConfig, memdiff.TrainConfig) for f in dataclasses.fields(c)}
    v = {k: x for k, x in opts.items() if k in fields}      # options named after their fields
    v['skips'] = opts['skips'] and tuple(int(s) for s in opts['skips'].split(','))
    v['ema_mode'], _, value = opts['ema'].partition(':')
    if value:                                               # mode4 and fixed take a beta
        v['ema_beta' if v['ema_mode'] in ('mode4', 'fixed') else 'ema_halflife'] = float(value)
    count, _, spacing = opts['snapshots'].partition(':')
    v.update(snapshots=int(count), snapshot_spacing=spacing or 'linear')
    if opts['preset'] == 'paper':                           # the command line wins
        mine = {k for name in given for k in SETS.get(name, (name,))}
        v.update({k: x for k, x in (NCSNPP if v['arch'] == 'ncsnpp' else PAPER).items() if k not in mine})
    train = memdiff.TrainConfig(**{k: v.pop(k) for k in list(v) if fields[k] is memdiff.TrainConfig})
    cfg = memdiff.EMMConfig(**v, train=train)
    images, labels = dataset(cfg.data, cfg.resolution, cfg.classes)
    label_dim = memdiff.assign_labels(labels, cfg.labels, len(images))[1]
    if not cfg.optimum:
        with torch.device('meta'):
            memdiff.build_network(cfg, tuple(images.shape[1:]), label_dim)
    return cfg

dataset = functools.lru_cache(maxsize=4)(memdiff.load_dataset)    # each data set read once per run

def config_hash(cfg):
    """Short hash of the configuration: the default output folder of a run."""
    return hashlib.sha1(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:8]

#----------------------------------------------------------------------------
# Files, each written whole or not at all: config.json, n<size>.json, results.json/.csv and work/.
POINT = ('size', 'ratio', 'ci', 'snapshots')                # what a size's record holds at least
VERSIONS = dict(python=platform.python_version(), torch=torch.__version__, numpy=np.__version__)

def atomic_write(path, data):
    """Write data (text, or a function writing to a binary file) to path via a rename."""
    tmp = Path(f'{path}.{os.getpid()}.tmp')                 # one per process: writers may race
    with open(tmp, 'wb') as f:
        data(f) if callable(data) else f.write(data.encode())
    os.replace(tmp, path)

def read_json(path, keys=()):
    """A JSON object of an output folder, holding keys; else a one-line error naming the file."""
    try:
        record = json.loads(Path(path).read_text())
        if not isinstance(record, dict) or not set(keys) <= set(record):
            raise ValueError('not a JSON object' + (f' holding {", ".join(keys)}' if keys else ''))
    except (OSError, ValueError) as e:
        raise ValueError(f'{path}: not a readable memdiff record ({e}); move it away or choose '
                         'another output folder') from None
    return record

def folder(path):
    """path as an output folder: made where missing, refused where it is a file."""
    if path.exists() and not path.is_dir():
        raise ValueError(f'{path}: is a file, not a folder; choose another --outdir')
    path.mkdir(parents=True, exist_ok=True)
    return path

def locked(path, wait_message=None):
    """path opened under an exclusive flock, for a with: closing it or the process dying frees it."""
    f = open(path, 'a')
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        click.echo(wait_message) if wait_message else None
        fcntl.flock(f, fcntl.LOCK_EX)
    return f

def open_folder(outdir, cfg):
    """The output folder of cfg: created with config.json, or checked against the one it holds."""
    outdir = folder(Path(outdir))
    (outdir / 'work').mkdir(exist_ok=True)
    config, path = cfg.to_dict(), outdir / 'config.json'
    with locked(outdir / 'work' / 'config.lock'):          # two new runs: the first one's wins
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
    with locked(outdir / 'work' / 'results.lock'):
        points = sorted((read_json(p, POINT) for p in outdir.glob('n*.json')), key=lambda p: p['size'])
        tau = None if cfg.optimum else memdiff.tau_law(   # seeded: same points, same interval
            points, cfg.samples, cfg.threshold, generator=torch.Generator().manual_seed(0))
        record = dict(**memdiff.summarize(points, cfg.threshold), threshold=cfg.threshold, tau=tau,
                      points=points, config=cfg.to_dict())
        atomic_write(outdir / 'results.json', json.dumps(record, indent=1))
        keys = ['ratio_study'] + ['best_step', 'tau_mem', 'share', 'gap'] * (not cfg.optimum)
        rows = [[p['size'], p['ratio'], *p['ci']] + [p.get(k) for k in keys] for p in points]
        atomic_write(outdir / 'results.csv', '\n'.join(','.join(
            '' if c is None else f'{c:.4g}' if isinstance(c, float) else str(c) for c in row)
            for row in [['size', 'ratio', 'ci_low', 'ci_high'] + keys] + rows) + '\n')
    return record

def save_samples(path, detail):
    """Save a snapshot's uint8 samples [B,H,W,C], seeds, classes, d1, d2, d1/d2, nearest [B,2]."""
    a = {k: v.cpu().numpy() for k, v in detail.items() if v is not None}  # classes: conditional
    a.update(samples=memdiff.to_uint8(detail['samples']).permute(0, 2, 3, 1).cpu().numpy(),
             seeds=np.arange(len(a['d1'])), d1_d2=a['d1'] / a['d2'], nearest=a.pop('index'))
    atomic_write(path, lambda f: np.savez(f, **a))

def say_duplicates(y, log, prefix=''):
    """Say how many training images y holds exact copies of: the two ratios differ then."""
    if count := memdiff.duplicates(y):
        log(f"{prefix}{count} training images have exact duplicates: 'ratio' counts a copy of one "
            "as memorized, 'ratio_study' does not (the study)")

#----------------------------------------------------------------------------
# One size, and the search: a size is locked while measured; work/ resumes it bit for bit.

def measure_size(cfg, data, n, outdir, device, log, save=False):
    """The point of size n: read from outdir, or measured there (resuming from work/n<size>.pt)."""
    rank, world = memdiff.dist_info()
    record, resume = outdir / f'n{n}.json', outdir / 'work' / f'n{n}.pt'
    with locked(outdir / 'work' / f'n{n}.lock', f'|D| = {n}: another process is measuring it; '
                'waiting') if rank == 0 else contextlib.nullcontext():
        point = [read_json(record, POINT) if rank == 0 and record.exists() else None]
        if world > 1:                                       # every rank follows rank 0
            torch.distributed.broadcast_object_list(point)
        if point[0] is not None:
            return point[0]
        log(f'|D| = {n}: ' + ('sampling the closed-form optimum' if cfg.optimum else
                              f'training {cfg.train.total_steps(n)} steps'))
        try:  # the resume file: the snapshots so far, the best one's samples, the training state
            work = torch.load(resume, map_location=device, weights_only=True) if resume.exists() \
                else dict(snapshots=[], best=None, state=None)
            done, best = list(work['snapshots']), work['best']
        except Exception as e:                              # torch raises several kinds here
            raise ValueError(f'{resume}: not a readable resume file ({str(e).splitlines()[0]}); '
                             'delete it to measure this size from the start') from None
        y = memdiff.training_set(*data, n, cfg)[0]
        say_duplicates(y, log, f'|D| = {n}: ')
        for snap, detail, state in memdiff.measure(*data, n, cfg, device, work['state'], progress_bar()):
            if rank == 0 and save:
                save_samples(outdir / f"samples_n{n}_step{snap['step']}.npz", detail)
            if all(snap['ratio'] > s['ratio'] for s in done):
                best = detail['samples'][:64].cpu()
            done.append(snap)
            state = state and state()                       # every rank: it gathers their streams
            if rank == 0 and state:
                atomic_write(resume, lambda f: torch.save(dict(snapshots=done, best=best, state=state), f))
        point = dict(memdiff.best_point(n, done, cfg.threshold), world_size=world, versions=VERSIONS)
        if rank == 0:
            atomic_write(outdir / f'samples_n{n}.png', lambda f: sample_grid(
                memdiff.quantize_uint8(best), y, cfg.mem_threshold).save(f, format='PNG'))
            atomic_write(record, json.dumps(point, indent=1))
            resume.unlink(missing_ok=True)
            combine(outdir, cfg)
    log(f'|D| = {n}: memorization ratio {point["ratio"]:.3f} (95% CI {point["ci"][0]:.3f}-'
        f'{point["ci"][1]:.3f}' + (')' if cfg.optimum else f', best step {point["best_step"]})'))
    return point

def emm_search(cfg, outdir, sizes, tolerance, device, log, save=False):
    """Measure a grid of sizes (a tuple), or search the range of a slice; record and resume in outdir."""
    images, labels = data = dataset(cfg.data, cfg.resolution, cfg.classes)
    top = memdiff.max_subset_size(labels if labels is not None else len(images))
    asked = list(sizes) if isinstance(sizes, tuple) else [sizes.start, sizes.stop or top]
    if max(asked) > top:
        raise ValueError(f"size {max(asked)} is impossible: the study's rule builds sets of at most "
                         f'{top} images from {cfg.data} ({len(images)} images)')
    if isinstance(sizes, slice) and asked[0] > asked[1]:
        raise ValueError(f'the smallest size searched ({asked[0]}) is above the largest ({asked[1]})')
    rank, world = memdiff.dist_info()
    outdir = open_folder(outdir, cfg) if rank == 0 else Path(outdir)
    if world > 1:
        torch.distributed.barrier()                         # the folder exists for every rank
    ratio_at = lambda n: measure_size(cfg, data, n, outdir, device, log, save)['ratio']
    status = memdiff.find_emm(ratio_at, *asked, cfg.threshold, tolerance=tolerance)['status'] \
        if isinstance(sizes, slice) else [ratio_at(n) for n in sizes] and 'grid'
    if rank == 0:                                           # the other ranks return None
        record = dict(combine(outdir, cfg), search=status)
        try:
            plot_memorization(outdir / 'memorization.png', record, cfg.threshold, not cfg.optimum)
        except ImportError:
            log("(memorization.png needs matplotlib: pip install 'memdiff[plot]')")
        print_table(record, cfg)
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
        help="'digits' (bundled), a .npz, a CIFAR-10 python archive or folder, a PNG zip.")
@option('Data', '--resolution', metavar='INT', type=click.IntRange(min=1),
        help='Down-sample to this side (Pillow LANCZOS on uint8, as the study).')
@option('Data', '--classes', metavar='INT', type=click.IntRange(min=1), help='Keep the first C classes.')
@option('Data', '--labels', metavar='MODE', default='none', help='none | true | random:C | unique.',
        type=Pattern(r'none|true|unique|random:[1-9]\d*', 'none, true, random:C or unique'))
@option('Network', '--arch', type=click.Choice(['ddpmpp', 'ncsnpp', 'optimum']), default='ddpmpp',
        help='A U-Net, or the closed-form optimal denoiser.')
@option('Network', '--precond', type=click.Choice(['edm', 'vp', 've']), default='edm',
        help='Preconditioning and loss.')
@option('Network', '--model-channels', metavar='INT', type=click.IntRange(min=4), default=16,
        help='Width: channels of the first level.')
@option('Network', '--num-blocks', metavar='INT', type=click.IntRange(min=1), default=1,
        help='Depth: residual blocks per level.')
@option('Network', '--skips', metavar='LIST', type=Pattern(r'[01](,[01])*', '0s and 1s'),
        help='One 0/1 per encoder skip, the first at full resolution [all on].')
@option('Network', '--embedding', type=click.Choice(['positional', 'fourier']),
        help="Time embedding [the arch's own].")
@option('Network', '--dropout', metavar='FLOAT', type=click.FloatRange(0, 1, max_open=True),
        default=0.0, help='Dropout in the residual blocks.')
@option('Training', '--lr', metavar='FLOAT', type=click.FloatRange(0, min_open=True), default=1e-3,
        help='Adam learning rate.')
@option('Training', '--batch', metavar='INT', type=click.IntRange(min=1), default=64, help='Global batch.')
@option('Training', '--weight-decay', metavar='FLOAT', type=click.FloatRange(min=0), default=0.0,
        help='L2 weight decay inside Adam.')
@option('Training', '--ema', metavar='MODE', default='mode1:10', help="The study's EMA: mode1:H, "
        'mode2:H (half-life H epochs), mode3, mode4:BETA, fixed:BETA.', type=Pattern(
            r'mode[12]:(\d+\.?\d*|\.\d+)(e-?\d+)?|mode3|(mode4|fixed):(0(\.\d*)?|1(\.0*)?|\.\d+)',
            'mode1:H, mode2:H, mode3, mode4:BETA or fixed:BETA (H in epochs, BETA in [0, 1])'))
@option('Training', '--train-steps', '--steps', 'train_steps', metavar='INT', default=1500,
        type=click.IntRange(min=1), help='Training steps per size (unless --epochs).')
@option('Training', '--epochs', metavar='FLOAT', type=click.FloatRange(0, min_open=True),
        help='Training length in passes over |D| instead.')
@option('Training', '--snapshots', metavar='N[:log]', default='3', type=Pattern(
        r'[1-9]\d*(:log)?', 'N or N:log with N >= 1'), help='EMA snapshots scored per size; N:log '
        'spaces them from 1% of the steps.')
@option('Evaluation', '--samples', metavar='INT', type=click.IntRange(min=1), default=1000,
        help='Samples per snapshot (seeds 0..N-1, as the study).')
@option('Evaluation', '--threshold', metavar='FLOAT', type=click.FloatRange(0, 1), default=0.9,
        help='1 - eps: the ratio that counts as memorizing.')
@option('Evaluation', '--sizes', metavar='LIST|LO:HI', default='16:', help='Measure these sizes, '
        'or search LO:HI [HI: the largest set].', type=Pattern(
            r'[1-9]\d*(,[1-9]\d*)*|[1-9]\d*:([1-9]\d*)?', 'sizes N,M,... or a range LO:HI'))
@option('Evaluation', '--tolerance', metavar='FLOAT', type=click.FloatRange(min=0), default=0.35,
        help='Stop bisecting at a bracket this narrow (relative).')
@option('Evaluation', '--save-samples', is_flag=True,
        help='Write samples, d1, d2 and nearest training images per snapshot.')
@option('Run', '--preset', type=click.Choice(['paper']), help="The study's CIFAR-10 run.")
@option('Run', '--seed', metavar='INT', type=click.IntRange(min=0), default=0,
        help='Seed of weights, data order and noise.')
@option('Run', '--device', metavar='DEV', default='auto', help='auto | cpu | cuda | cuda:N.',
        type=Pattern(r'auto|(cpu|cuda)(:\d+)?', 'auto, cpu, cuda or cuda:N'))
@option('Run', '--outdir', metavar='DIR', help='Output folder [runs/emm-<config hash>].')
@option('Run', '--dry-run', is_flag=True, help='Print the configuration and its cost.')
@option('Run', '--sweep', metavar='OPTION=V1,V2', help="One search per value, e.g. labels=none,"
        "true (';' between values holding commas).")
@option('Run', '--score', 'score_path', metavar='PKL|DIR', help="Score the study's "
        'network-snapshot-*.pkl against the set of --sizes N [all of --data].')
@option('Run', '--export', metavar='PATH.zip', help="Write the set of --sizes N as the study's "
        'dataset tools.')
@option('Run', '--force', is_flag=True, help='Let --export replace a file.')
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
    lo, colon, hi = opts['sizes'].partition(':')                 # LO:HI, or N,M,... whole in lo
    opts['sizes'] = slice(int(lo), int(hi) if hi else None) if colon else tuple(map(int, lo.split(',')))
    try:
        if opts['export']:
            return export_zip(make_config(opts, given), opts['sizes'], opts['export'], opts['force'])
        device, rank, world = init_distributed(opts['device'])
        log = click.echo if rank == 0 else (lambda *a: None)
        if opts['score_path']:
            return score_snapshots(opts, device, log)
        factor = opts['sweep'] and opts['sweep'].split('=')[0].strip()
        configs = [(value, make_config(o, given | {factor.replace('-', '_')} if factor else given))
                   for value, o in (sweep_values(ctx, opts) if opts['sweep'] is not None else [(None, opts)])]
        records = []
        for value, cfg in configs:
            if opts['dry_run']:
                dry_run(cfg, opts['sizes'])
                continue
            outdir = opts['outdir'] or f'runs/emm-{config_hash(cfg)}'
            outdir = f'{outdir}/{factor}={value}' if factor and opts['outdir'] else outdir
            log(f'memdiff EMM search -> {outdir} (world size {world}, device {device})')
            records.append((value, emm_search(cfg, outdir, opts['sizes'], opts['tolerance'], device,
                                              log, opts['save_samples'])))
        if records and factor and rank == 0:
            write_sweep(folder(Path(opts['outdir'] or 'runs')), factor, records)
        close_distributed()
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:                                    # a path under a file, a full disk
        raise click.ClickException(f'{e.filename or ""}: {e.strerror or e}') from None
    except KeyboardInterrupt:
        raise click.ClickException('interrupted: rerun the same command to resume') from None

def init_distributed(device_name='auto'):
    """Join the torchrun process group when launched by torchrun -> (device, rank, world_size)."""
    device = torch.device(device_name.replace('auto', 'cuda' if torch.cuda.is_available() else 'cpu'))
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'device {device_name!r}: this machine has no CUDA GPU (use cpu)')
    if int(os.environ.get('WORLD_SIZE', '1')) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(   # rank 0 may wait long for a size another job holds
            'nccl' if device.type == 'cuda' else 'gloo', timeout=datetime.timedelta(days=7))
    if device.type == 'cuda' and device.index is None:
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', '0')))
        torch.cuda.set_device(device)
    return (device, *memdiff.dist_info())

def close_distributed():
    """Leave the torchrun process group once every rank is done (rank 0 may still be writing)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()       # left open, gloo's threads can abort at exit

def sweep_values(ctx, opts):
    """'--sweep option=v1,v2' -> [(value text, options with that value)], values typed by click."""
    factor, _, text = opts['sweep'].partition('=')
    name = factor.strip().replace('-', '_')
    params = {p.name: p for p in ctx.command.params if p.name == 'seed' or getattr(p, 'group', '')
              in ('Data', 'Network', 'Training', 'Evaluation') and p.name not in ('sizes', 'save_samples')}
    values = [v.strip() for v in text.split(';' if ';' in text else ',') if v.strip()]
    if name not in params or not values:
        raise click.BadParameter(f'{opts["sweep"]!r} is not OPTION=V1,V2 for an option of the data, '
                                 'network, training or evaluation (such as labels=none,true)',
                                 param_hint='--sweep')
    return [(v, {**opts, name: params[name].type_cast_value(ctx, v)}) for v in values]

def dry_run(cfg, sizes):
    """Print the resolved configuration and the cost of one |D| point."""
    images, labels = dataset(cfg.data, cfg.resolution, cfg.classes)
    top = memdiff.max_subset_size(labels if labels is not None else len(images))
    n = sizes[-1] if isinstance(sizes, tuple) else sizes.stop or min(top, 1000)
    label_dim = memdiff.training_set(images, labels, n, cfg)[2]
    evals = cfg.samples * (2 * cfg.num_steps - 1)
    click.echo(json.dumps(cfg.to_dict(), indent=1))
    click.echo(f'data: {len(images)} images of shape {tuple(images.shape[1:])}')
    if cfg.optimum:
        return click.echo(f'cost of |D| = {n}: {evals:,} evaluations of the closed-form optimum')
    with torch.device('meta'):
        net = memdiff.build_network(cfg, tuple(images.shape[1:]), label_dim)
    steps, snaps = cfg.train.total_steps(n), len(cfg.train.snapshot_steps(n))
    click.echo(f'network: {sum(p.numel() for p in net.parameters()):,} parameters')
    click.echo(f'cost of |D| = {n}: {steps:,} training steps of batch {cfg.train.batch} '
               f'({steps * cfg.train.batch:,} images), {snaps} snapshot(s) x {cfg.samples} samples '
               f'x {2 * cfg.num_steps - 1} evaluations = {snaps * evals:,} network evaluations')

#----------------------------------------------------------------------------
# The study's files: its training sets (--export) and its snapshots (--score).

def export_zip(cfg, sizes, path, force):
    """The set of size N (sizes = (N,)) -> path, as the study's dataset tools write it."""
    if not path.lower().endswith('.zip') or Path(path).is_dir():
        raise click.BadParameter(f'{path!r} must be a file ending in .zip', param_hint='--export')
    if Path(path).exists() and not force:
        raise click.BadParameter(f'{path} exists; give --force to replace it', param_hint='--export')
    if not isinstance(sizes, tuple) or len(sizes) != 1:
        raise click.BadParameter('needs exactly one size, e.g. --sizes 1000', param_hint='--sizes')
    images, labels = dataset(cfg.data, cfg.resolution, cfg.classes)
    # With --labels none the study's files still carry the true labels (train.py --cond=0 ignores them).
    y, c, _ = memdiff.training_set(images, labels, sizes[0], dataclasses.replace(
        cfg, labels='true' if cfg.labels == 'none' and labels is not None else cfg.labels))
    if y.shape[1] not in (1, 3):
        raise click.BadParameter(f'the study writes RGB or grayscale images, not {y.shape[1]} '
                                 'channels', param_hint='--data')
    # As dataset_utils/dataset_size.py: stored PNGs 00000/img00000000.png.. then dataset.json.
    names = [f'{i // 1000:05d}/img{i:08d}.png' for i in range(len(y))]

    def write(f):
        with zipfile.ZipFile(f, 'w', compression=zipfile.ZIP_STORED) as z:
            for name, img in zip(names, memdiff.to_uint8(y).permute(0, 2, 3, 1).squeeze(-1)):
                png = io.BytesIO()
                PIL.Image.fromarray(img.numpy()).save(png, format='png', compress_level=0)
                z.writestr(name, png.getbuffer())
            z.writestr('dataset.json', json.dumps({'labels': None if c is None else
                                                   [[m, int(k)] for m, k in zip(names, c)]}))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)
    click.echo(f'wrote {len(y)} images of shape {tuple(y.shape[1:])} '
               f'({"no labels" if c is None else f"labels {cfg.labels}"}) to {path}')

def score_snapshots(opts, device, log):
    """Memorization ratio of each snapshot's samples (seeds 0..N-1) against the training set."""
    images, labels = dataset(opts['data'], opts['resolution'], opts['classes'])
    path, sizes, rank = Path(opts['score_path']), opts['sizes'], memdiff.dist_info()[0]
    if isinstance(sizes, tuple) and len(sizes) != 1:
        raise click.BadParameter('--score takes one training-set size', param_hint='--sizes')
    files = sorted(path.glob('network-snapshot-*.pkl')) if path.is_dir() else [path] * path.exists()
    if not files:
        raise ValueError(f'{path}: no such file, or a folder without network-snapshot-*.pkl')
    y = (memdiff.training_set(images, labels, sizes[0], memdiff.EMMConfig())[0]  # the study's rule,
         if isinstance(sizes, tuple) else images).to(device)    # or all of --data (its own zip)
    outdir = opts['outdir'] and folder(Path(opts['outdir']))
    say_duplicates(y, log)
    rows = []
    for file in files[1:] or files:                         # as mem_ratio.py: not the first one
        net = memdiff.load_network(file).to(device)
        shape = (net.net.in_channels, net.net.img_resolution, net.net.img_resolution)
        if shape != tuple(y.shape[1:]):
            raise ValueError(f'{file}: the network makes images of shape {shape}, the training set '
                             f'holds {tuple(y.shape[1:])}')
        x, c = memdiff.generate(net, opts['samples'], shape, net.label_dim, device, progress=progress_bar())
        summary, scores = memdiff.score(x, y)
        rows.append(dict(snapshot=file.name, **summary))
        study = f", the study's rule {summary['ratio_study']:.4f}" if 'ratio_study' in summary else ''
        log(f'{file.name}: memorization ratio {summary["ratio"]:.4f} (95% CI {summary["ci"][0]:.4f}-'
            f'{summary["ci"][1]:.4f}{study})')
        if opts['save_samples'] and outdir and rank == 0:
            save_samples(outdir / f'samples_{file.stem}.npz', dict(samples=x, classes=c, **scores))
    best = max(rows, key=lambda r: r['ratio'])
    log(f'\nbest of {len(rows)}: {best["snapshot"]}, memorization ratio {best["ratio"]:.4f} '
        f'against |D| = {len(y)} of {opts["data"]}')
    if outdir and rank == 0:
        score = dict(size=len(y), data=opts['data'], samples=opts['samples'], best=best, snapshots=rows)
        atomic_write(outdir / 'score.json', json.dumps(dict(score, versions=VERSIONS), indent=1))
    close_distributed()

#----------------------------------------------------------------------------
# What the user sees: progress, the table, the pictures, the sweep.

class Progress:
    """click progress bars on stderr for training steps and sampling evaluations."""
    bar = None
    def __call__(self, kind, done, total):
        label = f'  {kind:<7}'
        if self.bar is None or self.bar.label != label or done < self.bar.pos:
            if self.bar:
                self.bar.render_finish()                    # the next bar starts a new line
            self.bar = click.progressbar(length=total, label=label, file=sys.stderr, show_pos=True, width=30)
        self.bar.update(done - self.bar.pos)
        if done >= total:
            self.bar = self.bar.render_finish()

def progress_bar():
    """Progress bars on rank 0 when stderr is a terminal (a log file gets none), else None."""
    return Progress() if memdiff.dist_info()[0] == 0 and sys.stderr.isatty() else None

def print_table(record, cfg):
    """The final table: one row per size, then the EMM and the onset law."""
    columns = [('|D|', 5, lambda p: p['size']), ('ratio', 6, lambda p: f"{p['ratio']:.3f}"),
               ('95% CI', 11, lambda p: f"{p['ci'][0]:.3f}-{p['ci'][1]:.3f}")]
    if any('ratio_study' in p for p in record['points']):
        columns.append(('study', 6, lambda p: f"{p.get('ratio_study', p['ratio']):.3f}"))
    if not cfg.optimum:
        fmt = lambda key, f: lambda p: '-' if p.get(key) is None else format(p[key], f)
        columns += [('best step', 9, fmt('best_step', 'd')), ('tau_mem', 7, fmt('tau_mem', '.0f')),
                    ('share', 6, fmt('share', '.3f')), ('gap', 7, fmt('gap', '.2f'))]
    columns.append(('memorizes', 9, lambda p: 'yes' if p['ratio'] >= cfg.threshold else 'no'))
    click.echo('\n' + '\n'.join('  '.join(f'{name if p is None else cell(p)!s:>{w}}'
                                          for name, w, cell in columns) for p in [None] + record['points']))
    crossing = f' (interpolated crossing {record["crossing"]:.0f})' if record['crossing'] else ''
    emm = record['emm'] if record['emm'] is not None else 'none (below the smallest size)'
    click.echo(f'\nEMM at {cfg.threshold:.0%}: {emm}{crossing}   [{record.get("search", "")}]')
    if law := record.get('tau'):
        ci = 'no interval' if law['ci'] is None else f"95% CI {law['ci'][0]:.2f}-{law['ci'][1]:.2f}"
        click.echo(f"tau_mem = {law['prefactor']:.3g} |D|^{law['exponent']:.2f} ({ci}) over "
                   f"|D| = {', '.join(str(n) for n in law['sizes'])}")

def sample_grid(samples, reference, mem_threshold=1/3, columns=4):
    """PIL image: samples beside their two nearest training images, d1/d2 below, red: memorized."""
    d, idx = memdiff.nearest_distinct(samples, reference)   # [B, 2], as the metric
    triples = memdiff.to_uint8(torch.stack([samples, reference[idx[:, 0]], reference[idx[:, 1]]], 1))
    scale = max(1, 64 // triples.shape[-1])                 # tiny images are enlarged to be seen
    triples = triples.repeat_interleave(scale, 3).repeat_interleave(scale, 4)  # [B, 3, C, H, W]
    tile = triples.shape[-1] + 2 * 3                        # an image in a 3-pixel frame; 8 pixels
    width, height = 3 * tile + 8, tile + 12                 # between triples, 12 for the caption
    grid = PIL.Image.new('RGB', (columns * width, -(-len(triples) // columns) * height), 'white')
    draw = PIL.ImageDraw.Draw(grid)
    for b, (triple, d1_d2) in enumerate(zip(triples, (d[:, 0] / d[:, 1]).tolist())):
        x, y, red = b % columns * width, b // columns * height, d1_d2 < mem_threshold
        for k, image in enumerate(triple.permute(0, 2, 3, 1).squeeze(-1).numpy()):
            frame = (220, 30, 30) if k == 0 and red else (200, 200, 200)
            draw.rectangle((x + k * tile, y, x + (k + 1) * tile - 1, y + tile - 1), fill=frame)
            grid.paste(PIL.Image.fromarray(image).convert('RGB'), (x + k * tile + 3, y + 3))
        draw.text((x + 2, y + tile), f'{d1_d2:.2f}', fill=(220, 30, 30) if red else (0, 0, 0))
    return grid

def plot_memorization(path, record, threshold, trained=True):
    """memorization.png: ratio against |D|; trained, against step and step / |D|, share and gap."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    points = sorted(record['points'], key=lambda p: p['size'])
    sizes = [p['size'] for p in points]
    fig, (axes,) = plt.subplots(1, 4 if trained else 1, figsize=(18 if trained else 5, 4), dpi=110,
                                squeeze=False)
    axes[0].fill_between(sizes, *zip(*(p['ci'] for p in points)), alpha=0.25, label='95% Wilson interval')
    axes[0].plot(sizes, [p['ratio'] for p in points], 'o-', label='best snapshot')
    if record.get('emm') is not None:
        axes[0].axvline(record['emm'], color='C3', ls=':', label=f"EMM = {record['emm']}")
    for k, p in enumerate(points if trained else []):
        snaps = sorted(p['snapshots'], key=lambda s: s['step'])
        style = dict(color=f'C{k % 10}', ms=3)
        for ax, scale in ((axes[1], 1), (axes[2], p['size'])):
            ax.plot([s['step'] / scale for s in snaps], [s['ratio'] for s in snaps], 'o-',
                    label=f"|D| = {p['size']}", **style)
            if p.get('tau_mem'):
                ax.plot(p['tau_mem'] / scale, threshold, 'x', color=style['color'], ms=8)
        for key, line, label in (('share', 'o-', f"|D| = {p['size']}"), ('gap', 's--', None)):
            pts = [(s['step'] / p['size'], s[key]) for s in snaps if s.get(key) is not None]
            axes[3].plot([x for x, _ in pts], [v for _, v in pts], line, label=label, **style)
    xlabels = ['training-set size |D|', 'training step'] + ['training step / |D|'] * 2
    titles = ['ratio against |D|', 'ratio against step (x: tau_mem)', 'ratio against step / |D|',
              'optimum share (o-), held-out gap (s--)']
    for k, (ax, x, title) in enumerate(zip(axes, xlabels, titles)):
        ax.set(xscale='log', xlabel=x, title=title)         # a log scale resets the ticks: set below
        ax.axhline(0.5 if k == 3 else threshold, color='k', ls='--', lw=0.8)
        ax.legend(fontsize=7)
    axes[0].set(ylabel='memorization ratio', xticks=sizes, xticklabels=[str(n) for n in sizes])
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format='png'))
    plt.close(fig)

def write_sweep(base, factor, records):
    """Side-by-side table of a sweep: printed, and written as sweep-<option>.json and .csv in base."""
    sizes = sorted({p['size'] for _, r in records for p in r['points']})
    rows = [[factor, 'EMM', 'crossing'] + [f'n={n}' for n in sizes]]
    for value, r in records:
        at = {p['size']: p['ratio'] for p in r['points']}
        rows.append([value, str(r['emm'] or '-'), f"{r['crossing']:.0f}" if r['crossing'] else '-']
                    + [f'{at[n]:.3f}' if n in at else '' for n in sizes])
    widths = [max(map(len, column)) for column in zip(*rows)]
    click.echo('\n' + '\n'.join('  '.join(c.rjust(w) for c, w in zip(row, widths)) for row in rows))
    atomic_write(base / f'sweep-{factor}.csv', '\n'.join(','.join(r) for r in rows) + '\n')
    atomic_write(base / f'sweep-{factor}.json', json.dumps([dict(
        value=v, emm=r['emm'], crossing=r['crossing'],
        points=[{k: p[k] for k in ('size', 'ratio', 'ci')} for p in r['points']])
        for v, r in records], indent=1))

if __name__ == '__main__':
    main()
