"""Estimate the effective model memorization (EMM) of a diffusion model: python run_emm.py --help."""

import functools
import hashlib
import io
import json
import os
import sys
import zipfile
from pathlib import Path

import click
import PIL.Image
import torch

import memdiff

# The study's CIFAR-10 configuration [Gu et al., sec. 3; SPEC §3]: DDPM++ with VP preconditioning,
# durations in epochs of |D| (ramp-up |D|/5 kimg = 200 epochs, EMA half-life 0.5|D|/50 kimg = 10
# epochs, 2000 Mimg-at-50k = 40,000 epochs), a snapshot every 2.5M images, 10k samples each.
PRESETS = {
    'paper': dict(arch='ddpmpp', channels=128, channel_mult=(2, 2, 2), blocks=2, attn=(16,),
                  dropout=0.13, embedding='positional', precond='vp', optimizer='adam', lr=2e-4,
                  batch=512, weight_decay=0.0, epochs=40000.0, lr_rampup=200.0, ema=10.0,
                  snapshot_images=2_500_000, samples=10000, sampler_steps=18, labels='none'),
}

def int_list(text, name):
    """'1,2,3' -> (1, 2, 3) with a clear error."""
    try:
        return tuple(int(v) for v in text.split(',') if v.strip() != '')
    except ValueError:
        raise click.BadParameter(f'expected comma-separated whole numbers, got {text!r}',
                                 param_hint=name) from None

#----------------------------------------------------------------------------

@click.command(context_settings=dict(help_option_names=['-h', '--help'], max_content_width=100),
               epilog="""\b
Examples:
  python run_emm.py                                  # EMM of a small DDPM++ on the digits (CPU, minutes)
  python run_emm.py --optimum                        # the closed-form optimum: memorizes every size
  python run_emm.py --labels unique --sizes 64,256   # one class per image, two sizes
  python run_emm.py --resolution 4 --channels 8      # lower data dimension, narrower network
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
@click.option('--labels', metavar='MODE', default='none', show_default=True,
              help='Conditioning: none | true | random:C | unique.')
@click.option('--export', metavar='PATH.zip', default=None,
              help="Write the training set of the one --sizes N as the study's dataset tools "
                   'would (an EDM zip of PNGs with dataset.json), then stop.')
# Network.
@click.option('--arch', type=click.Choice(['ddpmpp', 'ncsnpp']), default='ddpmpp', show_default=True)
@click.option('--precond', type=click.Choice(['edm', 'vp', 've']), default='edm', show_default=True)
@click.option('--channels', metavar='INT', type=click.IntRange(min=4), default=16, show_default=True,
              help='Base width (model_channels).')
@click.option('--channel-mult', metavar='LIST', default='1,2', show_default=True,
              help='Width multiplier per resolution level.')
@click.option('--blocks', metavar='INT', type=click.IntRange(min=1), default=1, show_default=True,
              help='Residual blocks per resolution.')
@click.option('--attn', metavar='LIST', default='4', show_default=True,
              help="Resolutions with self-attention ('' for none).")
@click.option('--skips', metavar='LIST', default=None,
              help='One 0/1 per encoder skip connection (default: all on).')
@click.option('--embedding', type=click.Choice(['positional', 'fourier']), default=None,
              help="Time embedding (default: the arch's own).")
@click.option('--dropout', metavar='FLOAT', type=click.FloatRange(0, 1, max_open=True), default=0.0,
              show_default=True)
# Training.
@click.option('--optimizer', type=click.Choice(['adam', 'sgd']), default='adam', show_default=True)
@click.option('--lr', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=1e-3,
              show_default=True)
@click.option('--batch', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--weight-decay', metavar='FLOAT', type=click.FloatRange(min=0), default=0.0,
              show_default=True)
@click.option('--ema', metavar='EPOCHS', type=click.FloatRange(min=0), default=10.0,
              show_default=True, help='EMA half-life in epochs of |D|.')
@click.option('--ema-beta', metavar='FLOAT', type=click.FloatRange(0, 1), default=None,
              help='Fixed per-step EMA decay instead of a half-life.')
@click.option('--steps', metavar='INT', type=click.IntRange(min=1), default=1500, show_default=True,
              help='Training steps per size (unless --epochs).')
@click.option('--epochs', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=None,
              help='Training length in epochs of |D| instead of --steps.')
@click.option('--lr-rampup', metavar='EPOCHS', type=click.FloatRange(min=0), default=0.0,
              show_default=True, help='Linear learning-rate warm-up in epochs of |D|.')
@click.option('--snapshots', metavar='INT', type=click.IntRange(min=1), default=3, show_default=True,
              help='Evenly spaced EMA snapshots evaluated per size.')
@click.option('--snapshot-images', metavar='INT', type=click.IntRange(min=1), default=None,
              help='Or one snapshot every so many training images.')
@click.option('--amp', is_flag=True, help='bf16 autocast for the network (the study ran fp32).')
@click.option('--tf32', is_flag=True, help='Allow TF32 matrix products on CUDA (off: fp32 as the study).')
# Evaluation and search.
@click.option('--samples', metavar='INT', type=click.IntRange(min=1), default=1000, show_default=True,
              help='Generated samples per snapshot.')
@click.option('--sampler-steps', metavar='INT', type=click.IntRange(min=2), default=18,
              show_default=True, help='Heun steps (2n-1 network evaluations).')
@click.option('--threshold', metavar='FLOAT', type=click.FloatRange(0, 1), default=0.9,
              show_default=True, help='Memorization ratio that counts as memorizing (1 - eps).')
@click.option('--sizes', metavar='LIST', default=None, help='Measure these sizes instead of searching.')
@click.option('--min-size', metavar='INT', type=click.IntRange(min=1), default=16, show_default=True)
@click.option('--max-size', metavar='INT', type=click.IntRange(min=1), default=None,
              help='Largest size searched (default: the data set).')
@click.option('--tolerance', metavar='FLOAT', type=click.FloatRange(min=0), default=0.35,
              show_default=True, help='Stop bisecting when the bracket is this narrow (relative).')
@click.option('--optimum', is_flag=True, help='Score the closed-form optimal denoiser instead.')
# Run.
@click.option('--preset', type=click.Choice(sorted(PRESETS)), default=None,
              help="The study's configuration (explicit options still win).")
@click.option('--seed', metavar='INT', type=click.IntRange(min=0), default=0, show_default=True)
@click.option('--device', metavar='DEV', default='cpu', show_default=True,
              help="'cpu', 'cuda', 'cuda:1' or 'auto'.")
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
    if opts['preset']:
        given = {k for k in opts
                 if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE}
        # An explicit --steps (--snapshots) replaces the preset's --epochs (--snapshot-images):
        # otherwise the preset's duration would silently win over the one asked for.
        given |= {alt for k, alt in (('steps', 'epochs'), ('snapshots', 'snapshot_images'))
                  if k in given}
        for k, v in PRESETS[opts['preset']].items():
            if k not in given:
                opts[k] = v
    if opts['export']:
        try:
            export_training_set(make_config(opts), opts['sizes'], opts['export'], opts['sweep'])
        except ValueError as e:
            raise click.ClickException(str(e)) from None
        return
    try:
        device, rank, world = memdiff.init_distributed(opts['device'])
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = opts['tf32']
        runs = sweep_values(ctx, opts) if opts['sweep'] else [(None, opts)]
        configs = [(value, make_config(o)) for value, o in runs]  # every value checked up front
        if opts['dry_run']:
            for value, cfg in configs:
                dry_run(cfg, opts)
            memdiff.close_distributed()
            return
        log = click.echo if rank == 0 else (lambda *a: None)
        # Each configuration's default folder is named by its hash, so sweeps and single runs share
        # (and resume) the records of identical configurations.
        factor = opts['sweep'].split('=')[0] if opts['sweep'] else None
        base = opts['outdir'] or (f'runs/sweep-{factor}-{config_hash(make_config(opts))}' if factor
                                  else f'runs/emm-{config_hash(configs[0][1])}')
        records = []
        for value, cfg in configs:
            outdir = (f'{base}/{factor}={value}' if opts['outdir'] else
                      f'runs/emm-{config_hash(cfg)}') if factor else base
            log(f'memdiff EMM search -> {outdir} (world size {world}, device {device})')
            record = memdiff.emm_search(
                cfg, outdir, sizes=int_list(opts['sizes'], '--sizes') if opts['sizes'] else None,
                lo=opts['min_size'], hi=opts['max_size'], tolerance=opts['tolerance'],
                device=device, progress=Progress() if rank == 0 else None, log=log)
            if rank == 0:
                print_table(record, cfg.threshold)
            records.append((value, record))
        if opts['sweep'] and rank == 0:
            write_sweep(base, factor, records, configs[0][1].threshold)
        memdiff.close_distributed()
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    except KeyboardInterrupt:
        raise click.ClickException('interrupted: rerun the same command to resume') from None

def sweep_values(ctx, opts):
    """'--sweep factor=v1,v2' -> [(value text, options with that value)], values typed by click."""
    factor, _, text = opts['sweep'].partition('=')
    name = factor.strip().replace('-', '_')
    params = {p.name: p for p in ctx.command.params}
    if name not in params or name in ('sweep', 'outdir', 'dry_run', 'preset', 'device', 'sizes'):
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
    memdiff.atomic_write_text(f'{base}/sweep.csv', '\n'.join(','.join(r) for r in [header] + rows)
                              + '\n')
    memdiff.atomic_write_text(f'{base}/sweep.json', json.dumps(dict(
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
    fig.savefig(f'{path}.tmp.png')
    plt.close(fig)
    import os
    os.replace(f'{path}.tmp.png', path)

def make_config(o):
    """Options -> memdiff.EMMConfig (raising ValueError / BadParameter on impossible values)."""
    train = memdiff.TrainConfig(
        precond=o['precond'], optimizer=o['optimizer'], lr=o['lr'], batch=o['batch'],
        weight_decay=o['weight_decay'], steps=o['steps'], epochs=o['epochs'],
        lr_rampup_epochs=o['lr_rampup'], ema_halflife_epochs=o['ema'], ema_beta=o['ema_beta'],
        snapshots=o['snapshots'], snapshot_images=o['snapshot_images'], amp=o['amp'])
    cfg = memdiff.EMMConfig(
        data=o['data'], resolution=o['resolution'], classes=o['classes'], labels=o['labels'],
        arch=o['arch'], channels=o['channels'],
        channel_mult=int_list(o['channel_mult'], '--channel-mult')
        if isinstance(o['channel_mult'], str) else tuple(o['channel_mult']),
        blocks=o['blocks'], attn=int_list(o['attn'], '--attn') if isinstance(o['attn'], str)
        else tuple(o['attn']),
        skips=int_list(o['skips'], '--skips') if o['skips'] else None, embedding=o['embedding'],
        dropout=o['dropout'], train=train, samples=o['samples'], num_steps=o['sampler_steps'],
        threshold=o['threshold'], optimum=o['optimum'], seed=o['seed'])
    N, side, num_classes = data_info(cfg.data)
    if cfg.labels == 'true' and not num_classes:
        raise click.BadParameter(f"'true' needs a data set with labels, and {cfg.data} has none",
                                 param_hint='--labels')
    if cfg.labels != 'true':
        memdiff.assign_labels(None, cfg.labels, n=1)         # an unknown label mode fails here
    if cfg.resolution is not None and side % cfg.resolution:
        raise click.BadParameter(f'{cfg.resolution} does not divide the image size {side} of '
                                 f'{cfg.data}', param_hint='--resolution')
    if cfg.classes is not None and cfg.classes > num_classes:
        raise click.BadParameter(f'{cfg.data} has {num_classes} classes, not {cfg.classes}',
                                 param_hint='--classes')
    if cfg.resolution == side:
        cfg.resolution = None                               # the same data: the same record
    if not cfg.channel_mult:
        raise click.BadParameter('needs at least one level', param_hint='--channel-mult')
    return cfg

@functools.lru_cache
def data_info(data):
    """(number of images, image side, number of classes) of a data set, loaded once per run."""
    images, labels = memdiff.load_dataset(data)
    return len(images), images.shape[-1], 0 if labels is None else int(labels.max()) + 1

def config_hash(cfg):
    """Short hash of the configuration: the default output folder of a run."""
    return hashlib.sha1(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:8]

def dry_run(cfg, opts):
    """Print the resolved configuration and the cost of one |D| point."""
    images, labels = memdiff.load_dataset(cfg.data, cfg.resolution, cfg.classes)
    n = opts['max_size'] or min(len(images), 1000)
    _, _, label_dim = memdiff.training_set(images, labels, n, cfg)
    net = memdiff.build_network(cfg, tuple(images.shape[1:]), label_dim)
    params = sum(p.numel() for p in net.parameters())
    steps = cfg.train.total_steps(n)
    snaps = len(cfg.train.snapshot_steps(n))
    evals = snaps * cfg.samples * (2 * cfg.num_steps - 1)
    click.echo(json.dumps(cfg.to_dict(), indent=1))
    click.echo(f'data: {len(images)} images of shape {tuple(images.shape[1:])}')
    click.echo(f'network: {params:,} parameters')
    click.echo(f'cost of |D| = {n}: {steps:,} training steps of batch {cfg.train.batch} '
               f'({steps * cfg.train.batch:,} images), {snaps} snapshot(s) x {cfg.samples} samples '
               f'x {2 * cfg.num_steps - 1} evaluations = {evals:,} network evaluations')

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
    n = int_list(sizes, '--sizes') if sizes else ()
    if len(n) != 1:
        raise click.BadParameter('needs exactly one size, e.g. --sizes 1000', param_hint='--sizes')
    images, labels = memdiff.load_dataset(cfg.data, cfg.resolution, cfg.classes)
    y, c, _ = memdiff.training_set(images, labels, n[0], cfg)
    if c is None and labels is not None:
        # With --labels none the study's files still carry the true labels (train.py --cond=0
        # ignores them).
        c = labels[memdiff.balanced_subset(labels, n[0])]
    pixels = memdiff.to_uint8(y).permute(0, 2, 3, 1).numpy()          # [n, H, W, C] uint8
    if pixels.shape[-1] not in (1, 3):
        raise click.BadParameter(f'the study writes RGB or grayscale images, not {pixels.shape[-1]} '
                                 'channels', param_hint='--data')
    entries = []
    tmp = f'{path}.tmp{os.getpid()}'
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(tmp, 'w', compression=zipfile.ZIP_STORED) as z:
        for i, img in enumerate(pixels):
            name = f'{i // 1000:05d}/img{i:08d}.png'
            png = io.BytesIO()
            PIL.Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(
                png, format='png', compress_level=0, optimize=False)
            z.writestr(name, png.getbuffer())
            entries.append([name, int(c[i])] if c is not None else None)
        z.writestr('dataset.json', json.dumps({'labels': entries if c is not None else None}))
    os.replace(tmp, path)
    click.echo(f'wrote {len(pixels)} images of shape {tuple(y.shape[1:])} '
               f'({"no labels" if c is None else f"labels {cfg.labels}"}) to {path}')

def print_table(record, threshold):
    """The final table: size, ratio, 95% CI, best snapshot; then the EMM."""
    click.echo(f'\n{"|D|":>7}  {"ratio":>6}  {"95% CI":>13}  {"best step":>9}  memorizes')
    for p in record['points']:
        mark = 'yes' if p['ratio'] >= threshold else 'no'
        click.echo(f'{p["size"]:>7}  {p["ratio"]:>6.3f}  {p["ci"][0]:>6.3f}-{p["ci"][1]:<6.3f}  '
                   f'{p["best_step"]:>9}  {mark}')
    crossing = f' (interpolated crossing {record["crossing"]:.0f})' if record['crossing'] else ''
    emm = record['emm'] if record['emm'] is not None else 'none (below the smallest size)'
    click.echo(f'\nEMM at {threshold:.0%}: {emm}{crossing}   [{record.get("search", "")}]')

if __name__ == '__main__':
    main()
