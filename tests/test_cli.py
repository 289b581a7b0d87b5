"""The command line run_emm.py: its options and help, the output folder (config.json, one record per
size, results.json/.csv, PNGs, work/), resuming, several processes sharing a folder, sweeps, dry
runs, --export, --save-samples and clear one-line errors."""

import fcntl
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import types
import zipfile
from pathlib import Path

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import memdiff
import run_emm

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
# Tiny settings (seconds on two cores): a trained 8-channel network, 4 steps of batch 8, 2 snapshots
# of 16 samples; or the closed-form optimum, which needs no training.
TINY = ['--train-steps', '4', '--samples', '16', '--snapshots', '2', '--model-channels', '8',
        '--batch', '8']
OPTIMUM = ['--arch', 'optimum', '--samples', '20']
# What every snapshot of a trained size records at least: its ratio and the probe's diagnostics,
# each also per noise level in 'probe'.
SNAPSHOT_KEYS = {'step', 'ratio', 'ci', 'share', 'loss_train', 'loss_held', 'gap', 'probe'}
PROBE_KEYS = {'sigma', 'weight', 'loss_train', 'loss_held', 'dist_opt', 'dist_gauss'}
GROUPS = ['Data options:', 'Network options:', 'Training options:', 'Evaluation options:',
          'Run options:']


def invoke(*args):
    """Run the command in-process; output holds stdout and stderr."""
    return CliRunner().invoke(run_emm.main, [str(a) for a in args])


def record(outdir):
    return json.loads((Path(outdir) / 'results.json').read_text())


def point(outdir, n):
    """The record of one finished size, OUTDIR/n<size>.json."""
    return json.loads((Path(outdir) / f'n{n}.json').read_text())


def assert_clean_error(result, *words):
    """A non-zero exit with one 'Error: ...' line (the last one) and no traceback."""
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        f'unhandled {result.exception!r}'
    assert 'Traceback' not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines and lines[-1].startswith('Error: '), result.output
    assert sum('Error' in line for line in lines) == 1, result.output
    for word in words:
        assert word.lower() in lines[-1].lower(), result.output


def files_of(folder):
    """{relative path: bytes} of every file under folder."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob('*'))
            if p.is_file()}


def is_table_header(line):
    return line.split()[:2] == ['|D|', 'ratio']


def table_header(output):
    """The column names of the printed table (the line '|D|  ratio  ...')."""
    line = next(line for line in output.splitlines() if is_table_header(line))
    return [c.strip() for c in line.split('  ') if c.strip()]


def table_sizes(output):
    """The sizes of the printed table's rows."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if is_table_header(line))
    rows = []
    for line in lines[start + 1:]:
        if not line.strip():
            break
        rows.append(int(line.split()[0]))
    return rows


@pytest.fixture
def count_measures(monkeypatch):
    """The sizes memdiff.measure is called with (the original still runs)."""
    sizes, original = [], memdiff.measure

    def counting(images, labels, n, *args, **kwargs):
        sizes.append(n)
        yield from original(images, labels, n, *args, **kwargs)
    monkeypatch.setattr(memdiff, 'measure', counting)
    return sizes


@pytest.fixture
def count_samplings(monkeypatch):
    """One entry per memdiff.generate call: the snapshots a run scores (the original still runs)."""
    calls, original = [], memdiff.generate

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)
    monkeypatch.setattr(memdiff, 'generate', counting)
    return calls


@pytest.fixture(scope='module')
def trained_run(tmp_path_factory):
    """(folder, result) of one tiny trained run on sizes 16 and 24, shared by the tests below."""
    out = tmp_path_factory.mktemp('trained') / 'run'
    result = invoke(*TINY, '--sizes', '16,24', '--outdir', out)
    assert result.exit_code == 0, result.output
    return out, result

#----------------------------------------------------------------------------
# Help and options

@pytest.mark.slow
def test_help_exits_zero_and_ends_with_examples():
    """`python run_emm.py --help` exits 0 and its help ends with an 'Examples:' block of commands."""
    out = subprocess.run([sys.executable, 'run_emm.py', '--help'], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert out.returncode == 0, out.stderr
    last = out.stdout.rstrip().split('\n\n')[-1].strip().splitlines()
    assert last[0] == 'Examples:'
    assert len(last) > 1 and all(line.split()[0] in ('python', 'torchrun') for line in last[1:])


def test_help_lists_the_five_option_groups_and_at_most_35_options():
    """--help lists every option under one of the five groups, in order, 35 options at most."""
    result = invoke('--help')
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert [line for line in lines if line in GROUPS] == GROUPS
    first = lines.index(GROUPS[0])
    end = next(i for i, line in enumerate(lines) if line.strip() == 'Examples:')
    shown = [line for line in lines[first:end] if line.startswith('  -')]
    options = [p for p in run_emm.main.params if isinstance(p, click.Option)]
    assert len(shown) == len(options) + 1 <= 35                 # + --help
    for name in ('--train-steps', '--model-channels', '--num-blocks', '--arch', '--snapshots',
                 '--sizes', '--ema', '--save-samples', '--force'):
        assert any(line.split()[0].rstrip(',') == name for line in shown), name
    spellings = {p.name: p.opts for p in options if len(p.opts) > 1}
    assert spellings == {'train_steps': ['--train-steps', '--steps']}    # the one short spelling
    for gone in ('--channels', '--blocks', '--optimum', '--min-size', '--max-size',
                 '--ema-mode', '--ema-beta', '--sampler-steps', '--workers', '--attn',
                 '--channel-mult', '--amp', '--tf32', '--snapshot-images', '--whole-kimg',
                 '--optimizer', '--lr-rampup', '--snapshot-spacing'):
        assert not any(line.split()[0].rstrip(',') == gone for line in shown), gone


def dry_config(output):
    """The configuration a dry run prints (the JSON object before the cost)."""
    return json.loads(output[output.index('{'):output.index('\n}') + 2])


@pytest.mark.parametrize('args, expected', [
    (['--train-steps', '7'], {('train', 'train_steps'): 7}),
    (['--model-channels', '8', '--num-blocks', '2'], {('model_channels',): 8, ('num_blocks',): 2}),
    (['--arch', 'optimum'], {('arch',): 'optimum'}),
    (['--arch', 'ncsnpp', '--precond', 've'], {('arch',): 'ncsnpp', ('train', 'precond'): 've'}),
    (['--snapshots', '5:log'], {('train', 'snapshots'): 5, ('train', 'snapshot_spacing'): 'log'}),
    (['--snapshots', '4'], {('train', 'snapshots'): 4, ('train', 'snapshot_spacing'): 'linear'}),
    (['--ema', 'mode1:3'], {('train', 'ema_mode'): 'mode1', ('train', 'ema_halflife'): 3.0}),
    (['--ema', 'mode2:2.5'], {('train', 'ema_mode'): 'mode2', ('train', 'ema_halflife'): 2.5}),
    (['--ema', 'mode3'], {('train', 'ema_mode'): 'mode3'}),
    (['--ema', 'mode4:0.5'], {('train', 'ema_mode'): 'mode4', ('train', 'ema_beta'): 0.5}),
    (['--ema', 'fixed:0.9'], {('train', 'ema_mode'): 'fixed', ('train', 'ema_beta'): 0.9}),
    (['--skips', '1,0,1,1'], {('skips',): [1, 0, 1, 1]}),
])
def test_options_reach_the_configuration_under_their_new_names(args, expected):
    """Each renamed or merged option sets its EMMConfig / TrainConfig field (dry run)."""
    result = invoke('--dry-run', *args)
    assert result.exit_code == 0, result.output
    config = dry_config(result.output)
    for keys, value in expected.items():
        got = config
        for k in keys:
            got = got[k]
        assert got == value, (keys, got)
    cfg = memdiff.EMMConfig(**{k: v for k, v in config.items() if k != 'train'},
                            train=memdiff.TrainConfig(**config['train']))
    assert cfg.optimum == (config['arch'] == 'optimum')

#----------------------------------------------------------------------------
# The output folder of a trained run

def test_record_holds_every_size_snapshot_probe_configuration_and_version(trained_run):
    """A trained run writes config.json, n<size>.json, results.json/.csv, PNGs; clears work/."""
    out, result = trained_run
    rec = record(out)
    assert set(rec) == {'emm', 'crossing', 'threshold', 'tau', 'points', 'config'}
    assert rec['threshold'] == 0.9 and rec['tau'] is None        # no size reaches 0.9
    assert json.loads((out / 'config.json').read_text()) == rec['config']
    assert rec['config']['train']['train_steps'] == 4 and rec['config']['model_channels'] == 8
    assert rec['config']['arch'] == 'ddpmpp' and rec['config']['train']['batch'] == 8
    steps = memdiff.TrainConfig(train_steps=4, snapshots=2).snapshot_steps(16)
    assert [p['size'] for p in rec['points']] == [16, 24]
    for p in rec['points']:
        assert p == point(out, p['size'])
        assert p['world_size'] == 1 and p['versions']['torch'] == torch.__version__
        assert set(p['versions']) >= {'python', 'torch', 'numpy'}
        low, high = p['ci']
        assert 0 <= low <= p['ratio'] <= high <= 1
        assert [s['step'] for s in p['snapshots']] == steps
        for s in p['snapshots']:
            assert set(s) >= SNAPSHOT_KEYS and len(s['ci']) == 2
            assert not {'optimum_agreement', 'ratio_study', 'duplicates'} & set(s)
            assert set(s['probe']) >= PROBE_KEYS
            assert all(len(v) == memdiff.PROBE_SIGMAS for v in s['probe'].values())
            assert sum(s['probe']['weight']) == pytest.approx(1)
            assert s['probe']['sigma'] == sorted(s['probe']['sigma'])
            assert s['probe']['sigma'][0] == pytest.approx(0.002)
            assert s['probe']['sigma'][-1] == pytest.approx(80)
            assert 0 <= s['share'] <= 1
            assert s['gap'] == pytest.approx(s['loss_held'] - s['loss_train'])
        best = next(s for s in p['snapshots'] if s['step'] == p['best_step'])
        assert (p['share'], p['gap']) == (best['share'], best['gap'])
        assert (p['tau_mem'], p['tau_bracket']) == memdiff.tau_mem(p['snapshots'])
        assert p['ratio'] == max(s['ratio'] for s in p['snapshots'])
        k = round(p['ratio'] * 16)
        assert p['ci'] == pytest.approx(list(memdiff.wilson_interval(k, 16)))
        assert {k: v for k, v in p.items() if k not in ('world_size', 'versions')} == \
            memdiff.best_point(p['size'], p['snapshots'], 0.9)
    assert rec == {**rec, **memdiff.summarize(rec['points'], 0.9)}
    rows = (out / 'results.csv').read_text().splitlines()
    assert rows[0].startswith('size,ratio,ci_low,ci_high')
    assert {'best_step', 'tau_mem', 'share', 'gap'} <= set(rows[0].split(','))
    assert [int(r.split(',')[0]) for r in rows[1:]] == [16, 24]
    for n in (16, 24):
        assert (out / f'samples_n{n}.png').read_bytes().startswith(PNG_SIGNATURE)
    assert sorted(p.name for p in (out / 'work').iterdir() if not p.name.endswith('.lock')) == []
    assert not list(out.glob('*.npz'))                         # only with --save-samples
    assert 'EMM' in result.output and '|D|' in result.output


def test_results_csv_has_only_columns_the_points_can_fill(trained_run):
    """results.csv has the interval, study and training columns (no removed field), row = point."""
    out, _ = trained_run
    header, *rows = (out / 'results.csv').read_text().splitlines()
    assert header.split(',') == ['size', 'ratio', 'ci_low', 'ci_high', 'ratio_study', 'best_step',
                                 'tau_mem', 'share', 'gap']
    for row, p in zip(rows, record(out)['points']):
        cells = dict(zip(header.split(','), row.split(',')))
        assert int(cells['size']) == p['size'] and int(cells['best_step']) == p['best_step']
        assert float(cells['ratio']) == pytest.approx(p['ratio'], rel=1e-3, abs=1e-4)
        assert float(cells['share']) == pytest.approx(p['share'], rel=1e-3)
        assert float(cells['ci_high']) == pytest.approx(p['ci'][1], rel=1e-3)
        assert cells['ratio_study'] == ''                  # no duplicates among the digits
        assert cells['tau_mem'] == '' if p['tau_mem'] is None else \
            float(cells['tau_mem']) == pytest.approx(p['tau_mem'], rel=1e-3)


def test_trained_table_has_training_columns_and_optimum_table_has_none(trained_run, tmp_path):
    """A trained table has best step, tau_mem, share and gap columns; the optimum's has none."""
    _, trained = trained_run
    assert table_header(trained.output) == ['|D|', 'ratio', '95% CI', 'best step', 'tau_mem',
                                            'share', 'gap', 'memorizes']
    assert table_sizes(trained.output) == [16, 24]
    out = tmp_path / 'run'
    result = invoke(*OPTIMUM, '--sizes', '16', '--outdir', out)
    assert result.exit_code == 0, result.output
    assert table_header(result.output) == ['|D|', 'ratio', '95% CI', 'memorizes']
    header = (out / 'results.csv').read_text().splitlines()[0].split(',')
    assert not {'best_step', 'tau_mem', 'share', 'gap'} & set(header)


def test_without_a_terminal_no_progress_bars_are_printed(trained_run):
    """Output that is not a terminal (a log file) gets no progress lines."""
    _, result = trained_run
    for line in result.output.splitlines():
        assert not line.strip().startswith(('train', 'sample')), line
        assert '[#' not in line and '[-' not in line, line


def test_png_grid_decodes_to_samples_beside_both_neighbours(tmp_path):
    """samples_n<size>.png: rows of 4 (sample, NN1, NN2) triples, memorized ones framed red."""
    import PIL.Image as Image                               # a dependency of memdiff
    out = tmp_path / 'run'
    assert invoke(*OPTIMUM, '--sizes', '16', '--outdir', out).exit_code == 0
    with Image.open(out / 'samples_n16.png') as im:
        im.load()
        # 20 samples -> 5 rows of 4 triples; each 8x8 image enlarged 8x in a 3-pixel frame, 8 pixels
        # between triples, 12 for the d1/d2 caption.
        assert im.mode == 'RGB' and im.size == (4 * (3 * 70 + 8), 5 * (70 + 12))
        assert im.getpixel((0, 0)) == (220, 30, 30)          # the first sample's frame
        assert im.getpixel((70, 0)) == (200, 200, 200)       # its nearest neighbour's frame


def test_sample_grid_marks_only_memorized_samples():
    """A sample far from every training image has a grey frame, a copy of one a red frame."""
    y = memdiff.training_set(*memdiff.load_dataset('digits'), 16, memdiff.EMMConfig())[0]
    x = torch.stack([y[3], torch.zeros_like(y[0])])
    grid = run_emm.sample_grid(x, y, columns=2)
    assert grid.getpixel((0, 0)) == (220, 30, 30)
    assert grid.getpixel((3 * 70 + 8, 0)) == (200, 200, 200)

#----------------------------------------------------------------------------
# Memorization over training time: the law in the record, the table and memorization.png

def synthetic_points(samples=100):
    """Three sizes whose ratios reach 0.9 at tau = 40 |D| (log-linear), with share and gap."""
    points = []
    for n in (16, 32, 64):
        snaps = []
        for step in (30, 100, 300, 1000, 3000, 10000):
            ratio = min(1.0, max(0.0, 0.9 + 0.2 * np.log(step / (40 * n))))
            k = round(ratio * samples)
            snaps.append(dict(step=step, ratio=k / samples, share=ratio, gap=1 - ratio,
                              ci=list(memdiff.wilson_interval(k, samples))))
        points.append(memdiff.best_point(n, snaps))
    return points


def synthetic_folder(folder, samples=100):
    """An output folder holding the synthetic points as size records -> its configuration."""
    (folder / 'work').mkdir(parents=True, exist_ok=True)
    for p in synthetic_points(samples):
        (folder / f"n{p['size']}.json").write_text(json.dumps(p))
    return memdiff.EMMConfig(samples=samples)


def test_record_holds_the_tau_law_and_the_table_prints_it(tmp_path, capsys):
    """results.json holds the tau law fitted over tau_mem, the CSV tau_mem, the table the law."""
    cfg = synthetic_folder(tmp_path)
    rec = run_emm.combine(tmp_path, cfg)
    law = record(tmp_path)['tau']
    assert law == rec['tau']
    assert set(law) >= {'exponent', 'ci', 'prefactor', 'sizes'} and law['sizes'] == [16, 32, 64]
    points = record(tmp_path)['points']
    assert law['exponent'] == pytest.approx(
        memdiff.fit_power_law([16, 32, 64], [p['tau_mem'] for p in points])[1])
    assert 0.7 < law['exponent'] < 1.3 and law['ci'][0] <= law['exponent'] <= law['ci'][1]
    assert all(p['tau_bracket'] is not None for p in points)
    assert run_emm.combine(tmp_path, cfg)['tau'] == law          # its bootstrap is seeded
    header = (tmp_path / 'results.csv').read_text().splitlines()[0].split(',')
    assert 'tau_mem' in header
    run_emm.print_table(dict(rec, search='grid'), cfg)
    out = capsys.readouterr().out
    assert 'tau_mem' in table_header(out) and f"|D|^{law['exponent']:.2f}" in out
    assert 'over |D| = 16, 32, 64' in out


def figures_made(monkeypatch):
    """The figures plot_memorization makes (matplotlib.pyplot.subplots spied on)."""
    import matplotlib.pyplot as plt
    figures, original = [], plt.subplots

    def spy(*args, **kwargs):
        fig, axes = original(*args, **kwargs)
        figures.append(fig)
        return fig, axes
    monkeypatch.setattr(plt, 'subplots', spy)
    return figures


def test_memorization_png_has_one_panel_for_the_optimum_and_four_for_trained_networks(
        tmp_path, monkeypatch):
    """memorization.png has one panel for the optimum, four for a trained record."""
    pytest.importorskip('matplotlib')
    figures = figures_made(monkeypatch)
    out = tmp_path / 'run'
    result = invoke(*OPTIMUM, '--sizes', '16,24', '--outdir', out)
    assert result.exit_code == 0, result.output
    assert (out / 'memorization.png').read_bytes().startswith(PNG_SIGNATURE)
    assert len(figures) == 1 and len(figures[0].axes) == 1
    law = tmp_path / 'law'
    cfg = synthetic_folder(law)
    run_emm.plot_memorization(law / 'law.png', run_emm.combine(law, cfg), 0.9, trained=True)
    assert (law / 'law.png').read_bytes().startswith(PNG_SIGNATURE)
    assert len(figures) == 2 and len(figures[1].axes) == 4


def test_trained_run_writes_a_four_panel_memorization_png(trained_run):
    """A trained run's memorization.png is the four-panel figure (wider than one panel)."""
    pytest.importorskip('matplotlib')
    import PIL.Image as Image
    out, _ = trained_run
    with Image.open(out / 'memorization.png') as im:
        assert im.size[0] > 3 * im.size[1]                   # 18 x 4 inches


def test_without_matplotlib_the_run_says_so_in_one_line(tmp_path, monkeypatch):
    """No matplotlib: one line says memorization.png needs it, and the run still succeeds."""
    def missing(*args):
        raise ImportError('No module named matplotlib')
    monkeypatch.setattr(run_emm, 'plot_memorization', missing)
    out = tmp_path / 'run'
    result = invoke(*OPTIMUM, '--sizes', '16', '--outdir', out)
    assert result.exit_code == 0, result.output
    assert sum('needs matplotlib' in line for line in result.output.splitlines()) == 1
    assert not (out / 'memorization.png').exists()
    assert [p['size'] for p in record(out)['points']] == [16]


def test_log_snapshots_reach_the_configuration_and_the_record(tmp_path):
    """--snapshots 3:log is in the configuration and scores a trained size at steps 1, 2 and 4."""
    out = tmp_path / 'run'
    result = invoke(*OPTIMUM, '--snapshots', '3:log', '--sizes', '16', '--outdir', out)
    assert result.exit_code == 0, result.output
    train = record(out)['config']['train']
    assert (train['snapshot_spacing'], train['snapshots']) == ('log', 3)
    out = tmp_path / 'trained'
    result = invoke(*TINY, '--snapshots', '3:log', '--sizes', '16', '--outdir', out)
    assert result.exit_code == 0, result.output
    log = memdiff.TrainConfig(train_steps=4, snapshots=3, snapshot_spacing='log')
    steps = log.snapshot_steps(16)
    assert steps == [1, 2, 4]
    assert [s['step'] for s in point(out, 16)['snapshots']] == steps

#----------------------------------------------------------------------------
# The optimum and the label modes

def test_optimum_memorizes_every_size(tmp_path):
    """The closed-form optimum memorizes at least 99% of its samples at every size."""
    out = tmp_path / 'run'
    result = invoke('--arch', 'optimum', '--samples', '50', '--sizes', '20,40', '--outdir', out)
    assert result.exit_code == 0, result.output
    points = record(out)['points']
    assert [p['size'] for p in points] == [20, 40]
    assert all(p['ratio'] >= 0.99 for p in points)
    assert all([s['step'] for s in p['snapshots']] == [0] for p in points)
    assert record(out)['tau'] is None                            # the optimum is not trained


@pytest.mark.parametrize('labels', ['none', 'true', 'random:3', 'unique'])
def test_every_label_mode_runs_end_to_end(tmp_path, labels):
    """Each label mode runs on the digits and the (conditional) optimum memorizes its samples."""
    out = tmp_path / 'run'
    result = invoke(*OPTIMUM, '--labels', labels, '--sizes', '20', '--outdir', out)
    assert result.exit_code == 0, result.output
    assert record(out)['config']['labels'] == labels
    assert record(out)['points'][0]['ratio'] >= 0.99


@pytest.mark.slow
def test_true_labels_train_a_conditional_network(tmp_path):
    """--labels true trains a network with one label input per class of the subset."""
    out = tmp_path / 'run'
    result = invoke(*TINY, '--labels', 'true', '--sizes', '20', '--outdir', out)
    assert result.exit_code == 0, result.output
    assert len(record(out)['points'][0]['snapshots']) == 2


def test_optimum_search_ends_above_range(tmp_path):
    """Searching 16:64 with the optimum doubles up to 64: EMM 64, no crossing, 'above range'."""
    out = tmp_path / 'run'
    result = invoke(*OPTIMUM, '--sizes', '16:64', '--outdir', out)
    assert result.exit_code == 0, result.output
    rec = record(out)
    assert rec['emm'] == 64 and rec['crossing'] is None
    assert [p['size'] for p in rec['points']] == [16, 32, 64]
    assert 'EMM at 90%: 64' in result.output and 'above range' in result.output


def test_optimum_search_up_to_the_default_max_size_completes(tmp_path):
    """Searching from 1024 to the default top (1,728 of the digits) ends 'above range'."""
    out = tmp_path / 'run'
    result = invoke('--arch', 'optimum', '--samples', '8', '--sizes', '1024:', '--outdir', out)
    assert result.exit_code == 0, result.output
    assert 'above range' in result.output
    assert [p['size'] for p in record(out)['points']] == [1024, 1728]
    assert record(out)['emm'] == 1728


def duplicated_npz(tmp_path):
    """12 uint8 images 1x8x8 in two classes of 6, the first two identical."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 1, 8, 8), dtype=np.uint8)
    images[1] = images[0]
    path = tmp_path / 'dup.npz'
    np.savez(path, images=images, labels=np.repeat([0, 1], 6))
    return path


def test_duplicated_training_images_are_counted_and_scored_both_ways(tmp_path):
    """Duplicated training images: ratio_study and duplicates = 2 recorded, one line says so."""
    out = tmp_path / 'run'
    result = invoke(*OPTIMUM, '--data', duplicated_npz(tmp_path), '--sizes', '10', '--outdir', out)
    assert result.exit_code == 0, result.output
    p = record(out)['points'][0]
    assert p['size'] == 10
    for s in p['snapshots']:
        assert {'ratio', 'ratio_study'} <= set(s) and s['duplicates'] == 2
        assert s['ratio_study'] <= s['ratio']        # a copy of the duplicate counts in ratio only
    assert p['ratio_study'] == p['snapshots'][0]['ratio_study']
    lines = [line for line in result.output.splitlines() if 'exact duplicates' in line]
    assert len(lines) == 1 and '2 training images' in lines[0]
    assert 'study' in table_header(result.output)
    header, row = (out / 'results.csv').read_text().splitlines()
    assert row.split(',')[header.split(',').index('ratio_study')] == f"{p['ratio_study']:.4g}"


def test_a_point_of_a_duplicated_training_set_carries_duplicates(tmp_path):
    """The record of a size whose training set holds duplicates carries duplicates = 2."""
    out = tmp_path / 'run'
    assert invoke(*OPTIMUM, '--data', duplicated_npz(tmp_path), '--sizes', '10',
                  '--outdir', out).exit_code == 0
    assert point(out, 10)['duplicates'] == 2

#----------------------------------------------------------------------------
# --save-samples

def check_saved_samples(path, y, samples, classes):
    """Check one --save-samples .npz against the training set y -> its arrays."""
    with np.load(path) as z:
        saved = {k: z[k] for k in z.files}
    C, H, W = y.shape[1:]
    assert set(saved) == {'samples', 'seeds', 'd1', 'd2', 'd1_d2', 'nearest'} | \
        ({'classes'} if classes else set())
    assert saved['samples'].dtype == np.uint8 and saved['samples'].shape == (samples, H, W, C)
    assert np.array_equal(saved['seeds'], np.arange(samples))
    for k in ('d1', 'd2', 'd1_d2'):
        assert saved[k].shape == (samples,) and np.issubdtype(saved[k].dtype, np.floating)
    assert np.array_equal(saved['d1_d2'], saved['d1'] / saved['d2'])
    assert saved['nearest'].shape == (samples, 2)
    assert np.issubdtype(saved['nearest'].dtype, np.integer)
    assert ((0 <= saved['nearest']) & (saved['nearest'] < len(y))).all()
    assert (saved['nearest'][:, 0] != saved['nearest'][:, 1]).all()
    pixels = torch.from_numpy(saved['samples']).permute(0, 3, 1, 2).float() / 127.5 - 1
    x = memdiff.quantize_uint8(pixels)
    assert torch.equal(x, pixels)                                # already on the 8-bit grid
    flat, ref = x.flatten(1), y.flatten(1)
    for j, d in ((0, 'd1'), (1, 'd2')):
        dist = torch.linalg.vector_norm(flat - ref[torch.from_numpy(saved['nearest'][:, j])], dim=1)
        assert np.allclose(dist.numpy(), saved[d], rtol=1e-5, atol=1e-6), d
    nearest = torch.cdist(flat.double(), ref.double()).min(1).values
    assert np.allclose(nearest.numpy(), saved['d1'], rtol=1e-5, atol=1e-6)
    assert (saved['d1'] <= saved['d2']).all()
    return saved


def test_save_samples_writes_each_snapshot_with_its_distances_and_nearest_images(tmp_path):
    """--save-samples writes one .npz per snapshot whose d1, d2 and nearest match its samples."""
    out = tmp_path / 'run'
    result = invoke(*TINY, '--sizes', '16', '--save-samples', '--outdir', out)
    assert result.exit_code == 0, result.output
    cfg = memdiff.EMMConfig()
    y = memdiff.training_set(*memdiff.load_dataset('digits'), 16, cfg)[0]
    snapshots = point(out, 16)['snapshots']
    assert sorted(p.name for p in out.glob('*.npz')) == \
        sorted(f"samples_n16_step{s['step']}.npz" for s in snapshots)
    for s in snapshots:
        saved = check_saved_samples(out / f"samples_n16_step{s['step']}.npz", y, 16, classes=False)
        assert (saved['d1_d2'] < 1 / 3).mean() == s['ratio']


def test_save_samples_of_a_conditional_optimum_holds_the_classes(tmp_path):
    """With --labels true the .npz also holds each sample's class (the study's seeds draw them)."""
    out = tmp_path / 'run'
    result = invoke(*OPTIMUM, '--labels', 'true', '--sizes', '20', '--save-samples',
                    '--outdir', out)
    assert result.exit_code == 0, result.output
    cfg = memdiff.EMMConfig(labels='true')
    y, _, label_dim = memdiff.training_set(*memdiff.load_dataset('digits'), 20, cfg)
    saved = check_saved_samples(out / 'samples_n20_step0.npz', y, 20, classes=True)
    _, classes = memdiff.study_latents(range(20), (1, 8, 8), label_dim, torch.device('cpu'))
    assert np.array_equal(saved['classes'], classes.numpy())

#----------------------------------------------------------------------------
# Resuming

def test_rerun_with_more_sizes_measures_only_the_new_size(tmp_path, count_measures):
    """Rerunning with an extra size in the same folder measures only that size."""
    out = tmp_path / 'run'
    assert invoke(*OPTIMUM, '--sizes', '16,24', '--outdir', out).exit_code == 0
    assert count_measures == [16, 24]
    first = record(out)['points']
    result = invoke(*OPTIMUM, '--sizes', '16,24,32', '--outdir', out)
    assert result.exit_code == 0, result.output
    assert count_measures == [16, 24, 32]
    assert table_sizes(result.output) == [16, 24, 32]
    points = record(out)['points']
    assert [p['size'] for p in points] == [16, 24, 32] and points[:2] == first
    assert len((out / 'results.csv').read_text().splitlines()) == 1 + 3


def interrupt_on_second_size(monkeypatch):
    """memdiff.measure raises KeyboardInterrupt as a second size starts (once) -> sizes asked."""
    original, calls = memdiff.measure, []

    def interrupted(images, labels, n, *args, **kwargs):
        calls.append(n)
        if len(calls) == 2:
            raise KeyboardInterrupt
        yield from original(images, labels, n, *args, **kwargs)
    monkeypatch.setattr(memdiff, 'measure', interrupted)
    return calls


def test_interrupted_run_keeps_finished_sizes_and_resumes(tmp_path, monkeypatch):
    """Ctrl-C on the second size keeps the first one's record; the rerun measures the rest."""
    out = tmp_path / 'run'
    calls = interrupt_on_second_size(monkeypatch)
    result = invoke(*OPTIMUM, '--sizes', '16,24', '--outdir', out)
    assert_clean_error(result, 'interrupted')
    assert point(out, 16)['size'] == 16 and not (out / 'n24.json').exists()
    result = invoke(*OPTIMUM, '--sizes', '16,24', '--outdir', out)
    assert result.exit_code == 0, result.output
    assert calls == [16, 24, 24]
    assert [p['size'] for p in record(out)['points']] == [16, 24]


def test_results_json_holds_every_finished_size_after_an_interrupt(tmp_path, monkeypatch):
    """Ctrl-C on the second size: results.json already holds the first size's point."""
    out = tmp_path / 'run'
    interrupt_on_second_size(monkeypatch)
    assert_clean_error(invoke(*OPTIMUM, '--sizes', '16,24', '--outdir', out), 'interrupted')
    assert [p['size'] for p in record(out)['points']] == [16]


def interrupt_sampling(monkeypatch, at):
    """memdiff.generate raises KeyboardInterrupt on its call number `at` (once)."""
    original, calls = memdiff.generate, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == at:
            raise KeyboardInterrupt
        return original(*args, **kwargs)
    monkeypatch.setattr(memdiff, 'generate', interrupted)


@pytest.mark.slow
@pytest.mark.parametrize('at', [1, 2, 3])
def test_interrupt_while_sampling_then_rerun_scores_only_the_missing_snapshots(
        tmp_path, monkeypatch, at):
    """Ctrl-C while sampling: the rerun scores only the missing snapshots, as a fresh run would."""
    out, args = tmp_path / 'run', [*TINY, '--snapshots', '3', '--sizes', '16']
    with monkeypatch.context() as m:
        interrupt_sampling(m, at)
        assert_clean_error(invoke(*args, '--outdir', out), 'interrupted')
    work = out / 'work'
    scored = torch.load(work / 'n16.pt', weights_only=True)['snapshots'] if at > 1 else []
    assert len(scored) == at - 1 and (work / 'n16.pt').exists() == (at > 1)
    with monkeypatch.context() as m:
        sampled = []
        original = memdiff.generate
        m.setattr(memdiff, 'generate', lambda *a, **k: sampled.append(1) or original(*a, **k))
        result = invoke(*args, '--outdir', out)
    assert result.exit_code == 0, result.output
    assert len(sampled) == 3 - len(scored)
    steps = memdiff.TrainConfig(train_steps=4, snapshots=3).snapshot_steps(16)
    resumed = point(out, 16)
    assert [s['step'] for s in resumed['snapshots']] == steps
    assert resumed['snapshots'][:len(scored)] == scored
    assert sorted(p.name for p in work.iterdir() if not p.name.endswith('.lock')) == []
    fresh = tmp_path / 'fresh'
    assert invoke(*args, '--outdir', fresh).exit_code == 0
    assert resumed == point(fresh, 16)
    assert (out / 'samples_n16.png').read_bytes() == (fresh / 'samples_n16.png').read_bytes()


def interrupt_writing_the_resume_file(monkeypatch):
    """Ctrl-C inside the first write of work/n<size>.pt, before its rename (once)."""
    original = run_emm.atomic_write

    def interrupted(path, data):
        if Path(path).name == 'n16.pt' and not interrupted.fired:
            interrupted.fired = True
            raise KeyboardInterrupt
        return original(path, data)
    interrupted.fired = False
    monkeypatch.setattr(run_emm, 'atomic_write', interrupted)


@pytest.mark.slow
def test_a_snapshot_is_recorded_with_its_training_state_in_one_write(tmp_path, monkeypatch,
                                                                     count_samplings):
    """Ctrl-C while the first snapshot's resume file is written leaves no resume file (the scored
    snapshot and its training state are one atomic file, so neither exists without the other); the
    rerun samples each snapshot once and gives the uninterrupted record."""
    out = tmp_path / 'run'
    with monkeypatch.context() as m:
        interrupt_writing_the_resume_file(m)
        assert_clean_error(invoke(*TINY, '--sizes', '16', '--outdir', out), 'interrupted')
    assert sorted(p.name for p in (out / 'work').iterdir() if not p.name.endswith('.lock')) == []
    count_samplings.clear()
    assert invoke(*TINY, '--sizes', '16', '--outdir', out).exit_code == 0
    assert len(count_samplings) == 2
    fresh = tmp_path / 'fresh'
    assert invoke(*TINY, '--sizes', '16', '--outdir', fresh).exit_code == 0
    assert point(out, 16) == point(fresh, 16)

#----------------------------------------------------------------------------
# Existing output folders

def test_different_configuration_is_refused_and_folder_untouched(tmp_path):
    """A different configuration in a used folder is a one-line error; no file changes."""
    out = tmp_path / 'run'
    assert invoke(*OPTIMUM, '--sizes', '16', '--outdir', out).exit_code == 0
    before = files_of(out)
    result = invoke(*OPTIMUM, '--sizes', '16', '--seed', '1', '--outdir', out)
    assert_clean_error(result, 'different configuration', 'seed', 'config.json')
    assert files_of(out) == before


def test_different_configuration_after_an_interrupted_first_size_is_refused(tmp_path, monkeypatch):
    """Another configuration on an interrupted first size's folder is refused; work/ is kept."""
    out = tmp_path / 'run'
    with monkeypatch.context() as m:
        interrupt_sampling(m, 2)                             # after snapshot 1 of 2 is scored
        assert_clean_error(invoke(*TINY, '--sizes', '16', '--outdir', out), 'interrupted')
    assert (out / 'config.json').exists() and not (out / 'n16.json').exists()
    assert (out / 'work' / 'n16.pt').exists()
    before = files_of(out)
    for change in (['--seed', '1'], ['--model-channels', '16']):
        assert_clean_error(invoke(*TINY, *change, '--sizes', '16', '--outdir', out),
                           'different configuration')
    assert files_of(out) == before


CORRUPT_RECORDS = [
    pytest.param('config.json', 'not json', id='config-not-json'),
    pytest.param('n16.json', 'not json', id='size-record-not-json'),
    pytest.param('n16.json', '{}', id='size-record-not-a-point'),
    pytest.param('n16.json', '[1, 2]', id='size-record-a-list'),
]


@pytest.mark.parametrize('name, text', CORRUPT_RECORDS)
def test_corrupt_record_is_refused_and_left_untouched(tmp_path, name, text):
    """An unreadable config.json or n<size>.json is a one-line error naming it, left as it was."""
    out = tmp_path / 'run'
    assert invoke(*OPTIMUM, '--sizes', '16', '--outdir', out).exit_code == 0
    (out / name).write_text(text)
    assert_clean_error(invoke(*OPTIMUM, '--sizes', '16', '--outdir', out), name)
    assert (out / name).read_text() == text


def test_a_corrupt_results_json_is_rebuilt_from_the_size_records(tmp_path, count_measures):
    """results.json is derived: a corrupt one is rebuilt from n<size>.json; nothing is measured."""
    out = tmp_path / 'run'
    assert invoke(*OPTIMUM, '--sizes', '16', '--outdir', out).exit_code == 0
    good = record(out)
    (out / 'results.json').write_text('not json')
    assert invoke(*OPTIMUM, '--sizes', '16', '--outdir', out).exit_code == 0
    assert count_measures == [16] and record(out) == good


def interrupted_before_the_record(tmp_path, monkeypatch):
    """A trained size interrupted after its last snapshot, as its n16.json is written -> folder."""
    out, original = tmp_path / 'run', run_emm.atomic_write

    def interrupted(path, data):
        if Path(path).name == 'n16.json':
            raise KeyboardInterrupt
        return original(path, data)
    with monkeypatch.context() as m:
        m.setattr(run_emm, 'atomic_write', interrupted)
        assert_clean_error(invoke(*TINY, '--sizes', '16', '--outdir', out), 'interrupted')
    work = out / 'work'
    assert 'n16.pt' in {p.name for p in work.iterdir()}
    return out


@pytest.mark.parametrize('name, content', [
    pytest.param('n16.pt', b'not a torch file', id='resume-garbage'),
    pytest.param('n16.pt', 'hostile', id='resume-runs-a-command'),
])
def test_corrupt_work_file_is_refused_with_one_line(tmp_path, monkeypatch, hostile, name, content):
    """An unreadable work/ file is a one-line error naming it, and it is left as it was."""
    out = interrupted_before_the_record(tmp_path, monkeypatch)
    path = out / 'work' / name
    if content == 'hostile':
        torch.save(hostile[0], path)
        content = path.read_bytes()
    else:
        path.write_bytes(content)
    result = invoke(*TINY, '--sizes', '16', '--outdir', out)
    assert not hostile[1].exists()
    assert_clean_error(result, name)
    assert path.read_bytes() == content


@pytest.mark.parametrize('name', ['n16.pt'])
def test_a_work_file_that_would_run_a_command_is_refused_without_running_it(tmp_path, monkeypatch,
                                                                           hostile, name):
    """A work/ file whose unpickling would run a command: the rerun fails, never running it."""
    out = interrupted_before_the_record(tmp_path, monkeypatch)
    torch.save(hostile[0], out / 'work' / name)
    result = invoke(*TINY, '--sizes', '16', '--outdir', out)
    assert result.exit_code != 0 and not hostile[1].exists()
    assert not (out / 'n16.json').exists()


def test_interrupted_before_the_record_resumes_without_training(tmp_path, monkeypatch,
                                                                 count_samplings):
    """Interrupted before its record: the rerun samples nothing, writes it and clears work/."""
    out = interrupted_before_the_record(tmp_path, monkeypatch)
    count_samplings.clear()
    result = invoke(*TINY, '--sizes', '16', '--outdir', out)
    assert result.exit_code == 0, result.output
    assert count_samplings == []
    assert [s['step'] for s in point(out, 16)['snapshots']] == [2, 4]
    assert sorted(p.name for p in (out / 'work').iterdir() if not p.name.endswith('.lock')) == []


def test_outdir_that_is_a_file_is_a_one_line_error(tmp_path):
    """--outdir naming an existing file: one 'Error:' line naming it, the file untouched."""
    path = tmp_path / 'results.txt'
    path.write_text('mine')
    assert_clean_error(invoke(*OPTIMUM, '--sizes', '16', '--outdir', path), str(path), 'is a file')
    assert path.read_text() == 'mine' and [p.name for p in tmp_path.iterdir()] == ['results.txt']


@pytest.mark.parametrize('make_args', [
    pytest.param(lambda f: [*OPTIMUM, '--sizes', '16', '--outdir', f / 'sub'],
                 id='outdir-below-file'),
    pytest.param(lambda f: [*OPTIMUM, '--sizes', '16', '--sweep', 'labels=none,unique',
                            '--outdir', f], id='sweep-outdir-is-file'),
    pytest.param(lambda f: ['--sizes', '16', '--export', f / 'set.zip'], id='export-below-file',),
])
def test_a_path_below_a_file_is_a_one_line_error(tmp_path, make_args):
    """An output path below an existing file is a one-line error; the file is untouched."""
    path = tmp_path / 'results.txt'
    path.write_text('mine')
    assert_clean_error(invoke(*make_args(path)), 'results.txt')
    assert path.read_text() == 'mine' and [p.name for p in tmp_path.iterdir()] == ['results.txt']


def test_a_new_folders_configuration_is_written_under_its_lock(tmp_path, monkeypatch):
    """open_folder writes config.json holding work/config.lock, so of two configurations opening one
    new folder at once the second waits, then finds the first one's and is refused."""
    import fcntl
    out = tmp_path / 'run'
    original, held = run_emm.atomic_write, []

    def observed(path, data):
        if Path(path).name == 'config.json':
            with open(out / 'work' / 'config.lock', 'a') as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    held.append(False)
                except BlockingIOError:
                    held.append(True)
        return original(path, data)
    monkeypatch.setattr(run_emm, 'atomic_write', observed)
    run_emm.open_folder(out, memdiff.EMMConfig(seed=0))
    assert held == [True]
    with pytest.raises(ValueError, match='different configuration'):
        run_emm.open_folder(out, memdiff.EMMConfig(seed=1))


def test_default_outdir_depends_only_on_the_configuration(tmp_path, monkeypatch):
    """Without --outdir, each configuration (only) gets its own runs/emm-<hash> folder."""
    monkeypatch.chdir(tmp_path)
    for args in ([], ['--device', 'cpu', '--tolerance', '0.5'], ['--seed', '1']):
        assert invoke(*OPTIMUM, '--sizes', '16', *args).exit_code == 0
    folders = sorted(p.name for p in (tmp_path / 'runs').iterdir())
    assert len(folders) == 2 and all(f.startswith('emm-') for f in folders)
    for f in folders:
        cfg = json.loads((tmp_path / 'runs' / f / 'config.json').read_text())
        cfg = memdiff.EMMConfig(**{k: v for k, v in cfg.items() if k != 'train'},
                                train=memdiff.TrainConfig(**cfg['train']))
        assert f == 'emm-' + run_emm.config_hash(cfg)

#----------------------------------------------------------------------------
# Several processes on one folder

def child_env():
    """One OpenMP thread (as the tests' own torch), unbuffered output to read it as it comes."""
    return dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')


class Child:
    """`python run_emm.py ARGS` started in the repository root; its output collected as it comes."""

    def __init__(self, *args):
        self.proc = subprocess.Popen([sys.executable, 'run_emm.py', *map(str, args)], cwd=ROOT,
                                     env=child_env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines = []
        self.reader = threading.Thread(target=self.read, daemon=True)
        self.reader.start()

    def read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self):
        return ''.join(self.lines)

    def wait(self, timeout=600):
        """Exit code, once the process has ended and its output is read."""
        code = self.proc.wait(timeout)
        self.reader.join(timeout)
        return code

    def kill(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        return self.wait()


def wait_for(condition, what, timeout=600, children=()):
    """Poll condition() every 5 ms until it holds; fail if a child ends or time runs out first."""
    end = time.monotonic() + timeout
    while not condition():
        for c in children:
            assert c.proc.poll() is None, f'ended before {what}:\n{c.output}'
        assert time.monotonic() < end, f'timed out waiting for {what}'
        time.sleep(0.005)


@pytest.fixture
def children():
    """Children started by a test, killed if the test ends before they do."""
    started = []
    yield started
    for c in started:
        c.kill()


@pytest.mark.slow
def test_two_processes_on_different_sizes_of_one_folder_share_their_records(
        tmp_path, children, count_measures):
    """Two processes on sizes 16 and 24 of one folder succeed; a rerun measures neither."""
    out = tmp_path / 'run'
    children += [Child(*TINY, '--sizes', n, '--outdir', out) for n in (16, 24)]
    for c in children:
        assert c.wait() == 0, c.output
    assert [p['size'] for p in record(out)['points']] == [16, 24]
    result = invoke(*TINY, '--sizes', '16,24', '--outdir', out)
    assert result.exit_code == 0, result.output
    assert count_measures == []
    assert table_sizes(result.output) == [16, 24]
    assert record(out)['points'] == [point(out, n) for n in (16, 24)]


@pytest.mark.slow
def test_killed_process_resumes_to_the_record_of_an_uninterrupted_run(tmp_path, children,
                                                                      count_samplings):
    """A SIGKILLed process's size resumes to exactly the record of an uninterrupted run."""
    args = ['--train-steps', '80', '--snapshots', '4', '--samples', '8', '--model-channels', '8',
            '--batch', '8']
    out, ref = tmp_path / 'run', tmp_path / 'ref'
    other, victim, reference = (Child(*args, '--sizes', n, '--outdir', d)
                                for n, d in ((16, out), (24, out), (24, ref)))
    children += [other, victim, reference]
    work = out / 'work'
    # The snapshot is written before its training state: wait for both, so that the kill lands
    # after a state exists (a kill between the two writes trains again from step 0; see
    # test_interrupt_between_a_snapshot_and_its_state_does_not_rescore_the_snapshot).
    wait_for(lambda: (work / 'n24.pt').exists(), 'the first state of |D| = 24',
             children=[victim])
    assert victim.kill() == -signal.SIGKILL
    assert not (out / 'n24.json').exists()
    assert other.wait() == 0, other.output
    assert reference.wait() == 0, reference.output
    resumed_from = torch.load(work / 'n24.pt', weights_only=True)['state']['step']
    total = memdiff.TrainConfig(train_steps=80, snapshots=4).snapshot_steps(24)
    count_samplings.clear()
    result = invoke(*args, '--sizes', '24', '--outdir', out)
    assert result.exit_code == 0, result.output
    assert len(count_samplings) == len([s for s in total if s > resumed_from]) < len(total)
    assert point(out, 24) == point(ref, 24)
    assert [s['step'] for s in point(out, 24)['snapshots']] == total
    assert [p['size'] for p in record(out)['points']] == [16, 24]
    assert next(p for p in record(out)['points'] if p['size'] == 24) == record(ref)['points'][0]


@pytest.mark.slow
def test_a_process_waits_for_a_size_another_is_measuring_and_reads_its_record(tmp_path, children):
    """A process needing a size another is measuring waits, then reads its record."""
    out = tmp_path / 'run'
    args = [*TINY, '--train-steps', 40, '--snapshots', 1, '--sizes', 16, '--outdir', out]
    a = Child(*args)
    children.append(a)
    wait_for(lambda: '|D| = 16: training' in a.output, 'A to take the lock', children=[a])
    # A is paused while it holds the lock, so that B surely finds it taken however slowly B starts.
    a.proc.send_signal(signal.SIGSTOP)
    try:
        with open(out / 'work' / 'n16.lock', 'a') as probe, pytest.raises(BlockingIOError):
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        b = Child(*args)
        children.append(b)
        wait_for(lambda: 'another process is measuring it; waiting' in b.output,
                 'B to wait for A', children=[b])
        assert not (out / 'n16.json').exists()
    finally:
        a.proc.send_signal(signal.SIGCONT)
    assert a.wait() == 0, a.output
    assert b.wait() == 0, b.output
    assert '|D| = 16: another process is measuring it; waiting' in b.output
    assert not any('training' in line for line in b.output.splitlines()), b.output
    assert table_sizes(b.output) == table_sizes(a.output) == [16]
    assert [p['size'] for p in record(out)['points']] == [16]

#----------------------------------------------------------------------------
# The sampler's noise range on the search path

class Terminal(io.StringIO):
    """A stderr that says it is a terminal (progress bars are drawn into it)."""
    def isatty(self):
        return True


@pytest.mark.parametrize('precond, expected', [('ve', (0.02, 80)), ('edm', (0.002, 80))])
def test_sampler_of_a_trained_network_stays_in_its_noise_range_with_progress_bars(
        tmp_path, monkeypatch, precond, expected):
    """With progress bars, a VE network samples over [0.02, 80], an EDM one over [0.002, 80]."""
    ranges, original = [], memdiff.edm_sampler

    def recording(denoise, latents, class_labels=None, num_steps=18, sigma_min=0.002,
                  sigma_max=80, *args, **kwargs):
        ranges.append((sigma_min, sigma_max))
        ranges.append(memdiff.sigma_range(denoise, sigma_min, sigma_max))  # what it samples over
        return original(denoise, latents, class_labels, num_steps, sigma_min, sigma_max,
                        *args, **kwargs)
    monkeypatch.setattr(memdiff, 'edm_sampler', recording)
    terminal = Terminal()
    monkeypatch.setattr(run_emm, 'sys', types.SimpleNamespace(**{**vars(sys), 'stderr': terminal}))
    out = tmp_path / 'run'
    result = invoke(*TINY, '--precond', precond, '--sizes', '16', '--outdir', out)
    assert result.exit_code == 0, result.output
    assert 'sample' in terminal.getvalue() and 'train' in terminal.getvalue()  # bars were shown
    assert len(ranges) == 2 * 2                                  # two snapshots
    assert all(r == pytest.approx(expected) for r in ranges), ranges

#----------------------------------------------------------------------------
# Bad input: one line, no traceback

def opt(*args):
    """The optimum on one size (16): fast when an error is, wrongly, not raised."""
    return [*OPTIMUM, '--sizes', '16', *args]


def trained(*args):
    return [*TINY, '--sizes', '16', *args]


def npz(tmp_path, name, **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def nan_images(tmp_path):
    images = np.zeros((20, 1, 8, 8), np.float32)
    images[3, 0, 2, 2] = np.nan
    return opt('--data', npz(tmp_path, 'nan.npz', images=images))


def rank2_images(tmp_path):
    return opt('--data', npz(tmp_path, 'flat.npz', images=np.zeros((20, 64), np.uint8)))


def short_labels(tmp_path):
    images = np.zeros((20, 1, 8, 8), np.uint8)
    return opt('--data', npz(tmp_path, 'short.npz', images=images, labels=np.arange(19)))


def text_file(tmp_path):
    (tmp_path / 'images.txt').write_text('1 2 3\n')
    return opt('--data', tmp_path / 'images.txt')


def true_labels_without_labels(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (20, 1, 8, 8), dtype=np.uint8)
    return opt('--data', npz(tmp_path, 'nolabels.npz', images=images), '--labels', 'true')


def broken(tmp_path):
    """A file named .npz that is not a zip."""
    path = tmp_path / 'broken.npz'
    path.write_bytes(b'this is not a zip archive')
    return path


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason='needs a machine without CUDA')

BAD_INPUTS = [
    pytest.param(lambda t: opt('--data', t / 'missing.npz'), ['missing.npz'], id='missing-file'),
    pytest.param(text_file, ['format'], id='unknown-format'),
    pytest.param(lambda t: opt('--data', 'mnist'), ['mnist'], id='unknown-data-set'),
    pytest.param(nan_images, ['nan'], id='npz-nan-pixels'),
    pytest.param(rank2_images, ['flat.npz', '(20, 64)'], id='npz-rank-2'),
    pytest.param(short_labels, ['labels'], id='npz-label-length'),
    pytest.param(true_labels_without_labels, ['labels'], id='true-labels-without-labels'),
    pytest.param(lambda t: opt('--sizes', '5000'), ['5000'], id='size-above-data-set'),
    pytest.param(lambda t: opt('--sizes', '16:5000'), ['5000'], id='max-size-above-data-set'),
    pytest.param(lambda t: opt('--sizes', '16,x'), ['--sizes'], id='sizes-not-numbers'),
    pytest.param(lambda t: opt('--sizes', '0'), ['--sizes'], id='sizes-zero'),
    pytest.param(lambda t: opt('--sizes', '16,,32'), ['--sizes'], id='sizes-empty-entry'),
    pytest.param(lambda t: opt('--sizes', '64:32'), ['64', '32'], id='min-above-max'),
    pytest.param(lambda t: opt('--labels', 'random:0'), ['random'], id='random-zero-classes'),
    pytest.param(lambda t: opt('--labels', 'bogus'), ['bogus'], id='unknown-label-mode'),
    pytest.param(lambda t: opt('--lr', '0'), ['--lr'], id='lr-zero'),
    pytest.param(lambda t: opt('--lr', '-1'), ['--lr'], id='lr-negative'),
    pytest.param(lambda t: opt('--batch', '0'), ['--batch'], id='batch-zero'),
    pytest.param(lambda t: opt('--train-steps', '0'), ['--train-steps'], id='train-steps-zero'),
    pytest.param(lambda t: opt('--snapshots', '0'), ['--snapshots'], id='snapshots-zero'),
    pytest.param(lambda t: opt('--snapshots', '3:lin'), ['--snapshots'],
                 id='snapshots-bad-spacing'),
    pytest.param(lambda t: opt('--ema', 'bogus'), ['--ema'], id='ema-unknown-mode'),
    pytest.param(lambda t: opt('--ema', 'mode1'), ['--ema'], id='ema-half-life-missing'),
    pytest.param(lambda t: opt('--ema', 'mode4:2'), ['--ema'], id='ema-beta-above-one'),
    pytest.param(lambda t: opt('--arch', 'unet'), ['--arch'], id='arch-unknown'),
    pytest.param(lambda t: opt('--model-channels', '2'), ['--model-channels'],
                 id='model-channels-below-4'),
    pytest.param(lambda t: trained('--model-channels', '6'), ['multiple of 4'],
                 id='model-channels-not-multiple-of-4'),
    pytest.param(lambda t: opt('--num-blocks', '0'), ['--num-blocks'], id='num-blocks-zero'),
    pytest.param(lambda t: opt('--dropout', '1'), ['--dropout'], id='dropout-one'),
    pytest.param(lambda t: opt('--threshold', '2'), ['--threshold'], id='threshold-above-one'),
    pytest.param(lambda t: opt('--resolution', '9'), ['resolution'], id='resolution-above-image'),
    pytest.param(lambda t: opt('--resolution', '3'), ['power of two'], id='resolution-not-power-of-2'),
    pytest.param(lambda t: opt('--data', broken(t)), ['broken.npz', 'not a valid .npz'],
                 id='npz-not-a-zip'),
    pytest.param(lambda t: opt('--score', t / 'nothing'), ['nothing'], id='score-missing'),
    pytest.param(lambda t: trained('--skips', '1,0'), ['skips'], id='skips-wrong-length'),
    pytest.param(lambda t: opt('--skips', '1,2'), ['--skips'], id='skips-not-0-or-1'),
    pytest.param(lambda t: opt('--classes', '11'), ['classes'], id='too-many-classes'),
    pytest.param(lambda t: opt('--sweep', 'bogus=1'), ['bogus'], id='sweep-unknown-factor'),
    pytest.param(lambda t: opt('--sweep', 'sizes=16,24'), ['sizes'], id='sweep-of-sizes'),
    pytest.param(lambda t: opt('--sweep', 'labels='), ['--sweep', 'labels='],
                 id='sweep-without-values'),
    pytest.param(lambda t: opt('--sweep', '=none,true'), ['--sweep', '=none,true'],
                 id='sweep-without-option'),
    pytest.param(lambda t: opt('--device', 'bogus'), ['device'], id='device-unknown'),
    pytest.param(lambda t: opt('--device', 'cuda'), ['cuda'], id='device-cuda-missing',
                 marks=NO_CUDA),
]


@pytest.mark.parametrize('make_args, words', BAD_INPUTS)
def test_bad_input_is_a_one_line_error(tmp_path, make_args, words):
    """Bad input exits non-zero with one 'Error: ...' line naming the problem; writes no record."""
    out = tmp_path / 'run'
    assert_clean_error(invoke(*make_args(tmp_path), '--outdir', out), *words)
    assert not (out / 'results.json').exists() and not list(out.glob('n*.json'))


@pytest.mark.parametrize('sizes', ['0', '16,,32'])
def test_sizes_zero_or_an_empty_entry_is_a_usage_error(tmp_path, sizes):
    """--sizes 0 and --sizes 16,,32 are refused by click itself: exit code 2, naming --sizes."""
    out = tmp_path / 'run'
    result = invoke(*OPTIMUM, '--sizes', sizes, '--outdir', out)
    assert result.exit_code == 2, result.output
    assert_clean_error(result, '--sizes', sizes)
    assert 'Usage:' in result.output and not out.exists()


@pytest.mark.parametrize('args', [
    ['--sizes', '16:5000'],
    ['--device', 'bogus'],
    ['--sizes', '64:32'],
])
def test_a_refused_run_writes_no_output_folder(tmp_path, args):
    """Input refused before anything runs leaves no output folder behind."""
    out = tmp_path / 'run'
    assert_clean_error(invoke(*OPTIMUM, *args, '--outdir', out))
    assert not out.exists()


@pytest.mark.parametrize('sweep', [
    'labels=none,bogus',
    'resolution=8,9',
    'resolution=8,3',
    'model-channels=8,6',
    'ema=mode1:10;mode9',
    'skips=1,1,1,1;1,0',
])
def test_sweep_values_are_checked_before_anything_runs(tmp_path, count_measures, sweep):
    """A bad value anywhere in a sweep is an error before the first value is measured."""
    out = tmp_path / 'sweep'
    assert_clean_error(invoke(*TINY, '--sizes', '16', '--sweep', sweep, '--outdir', out))
    assert count_measures == [] and not out.exists()


def test_lr_1000_stops_with_one_line_naming_the_step_and_records_no_ratio(tmp_path):
    """A learning rate that blows the loss up is an error naming the step, not a ratio of 0.000."""
    out = tmp_path / 'run'
    result = invoke(*TINY, '--sizes', '16', '--train-steps', '20', '--snapshots', '1', '--lr',
                    '1000', '--outdir', out)
    assert_clean_error(result, 'diverged', 'step')
    assert not (out / 'n16.json').exists() and not (out / 'results.json').exists()


def test_a_diverging_size_leaves_the_finished_sizes_intact(tmp_path, monkeypatch):
    """NaN in the second size's training keeps the first size's record whole."""
    calls, edm_loss = [], memdiff.LOSSES['edm']

    def nan_after_the_first_size(*args, **kwargs):
        calls.append(1)
        return edm_loss(*args, **kwargs) * (float('nan') if len(calls) > 4 else 1)
    monkeypatch.setitem(memdiff.LOSSES, 'edm', nan_after_the_first_size)
    out = tmp_path / 'run'
    assert_clean_error(invoke(*TINY, '--sizes', '16,24', '--outdir', out), 'diverged', '|D| = 24')
    assert len(point(out, 16)['snapshots']) == 2 and not (out / 'n24.json').exists()

#----------------------------------------------------------------------------
# --export

def test_export_refuses_an_existing_file_unless_forced(tmp_path):
    """--export refuses an existing file (one line, file untouched) unless --force."""
    path = tmp_path / 'set.zip'
    path.write_bytes(b'mine')
    assert_clean_error(invoke('--sizes', '16', '--export', path), 'exists', '--force')
    assert path.read_bytes() == b'mine'
    result = invoke('--sizes', '16', '--export', path, '--force')
    assert result.exit_code == 0, result.output
    with zipfile.ZipFile(path) as z:
        assert len(z.namelist()) == 16 + 1 and z.namelist()[-1] == 'dataset.json'
    assert [p.name for p in tmp_path.iterdir()] == ['set.zip']


def test_export_never_replaces_a_folder(tmp_path):
    """--export naming a folder is a one-line error, even with --force; the folder is untouched."""
    folder = tmp_path / 'set.zip'
    folder.mkdir()
    (folder / 'keep').write_text('mine')
    for force in ([], ['--force']):
        assert_clean_error(invoke('--sizes', '16', '--export', folder, *force), '--export',
                           'set.zip')
    assert [p.name for p in folder.iterdir()] == ['keep']

#----------------------------------------------------------------------------
# Dry run and sweeps

def test_dry_run_prints_parameters_and_cost_and_writes_nothing(tmp_path, monkeypatch):
    """--dry-run prints the parameter count and the cost in network evaluations; writes nothing."""
    monkeypatch.chdir(tmp_path)
    result = invoke('--dry-run', '--outdir', tmp_path / 'run')
    assert result.exit_code == 0, result.output
    assert 'parameters' in result.output and 'network evaluations' in result.output
    assert list(tmp_path.iterdir()) == []


def test_dry_run_of_the_optimum_prints_its_sampling_cost(tmp_path, monkeypatch):
    """--dry-run --arch optimum prints the cost of sampling the closed form; writes nothing."""
    monkeypatch.chdir(tmp_path)
    result = invoke('--dry-run', *OPTIMUM, '--sizes', '64')
    assert result.exit_code == 0, result.output
    assert 'cost of |D| = 64' in result.output and 'closed-form optimum' in result.output
    assert 'parameters' not in result.output and list(tmp_path.iterdir()) == []


def network_size(output):
    line = next(line for line in output.splitlines() if line.endswith(' parameters'))
    return int(line.split()[-2].replace(',', ''))


def test_dry_run_paper_preset_runs_on_digits():
    """--dry-run --preset paper --resolution 8 builds the preset's ~34M-parameter net on 8x8 input."""
    result = invoke('--dry-run', '--preset', 'paper', '--resolution', '8')
    assert result.exit_code == 0, result.output
    assert 30e6 < network_size(result.output) < 36e6
    config = dry_config(result.output)
    assert config['train']['precond'] == 'vp' and config['model_channels'] == 128
    assert config['train']['ema_mode'] == 'mode2' and config['train']['whole_kimg'] is True


def test_dry_run_explicit_options_override_the_preset():
    """Options given on the command line win over the preset's values."""
    result = invoke('--dry-run', '--preset', 'paper', '--resolution', '8', '--model-channels', '16',
                    '--lr', '0.001', '--ema', 'fixed:0.5', '--snapshots', '4:log')
    assert result.exit_code == 0, result.output
    config = dry_config(result.output)
    assert config['model_channels'] == 16 and config['train']['lr'] == 0.001
    assert config['train']['batch'] == 512 and config['train']['precond'] == 'vp'
    assert (config['train']['ema_mode'], config['train']['ema_beta']) == ('fixed', 0.5)
    assert config['train']['snapshot_images'] is None
    assert (config['train']['snapshots'], config['train']['snapshot_spacing']) == (4, 'log')


def test_steps_is_train_steps_and_replaces_the_presets_epochs():
    """--steps N is --train-steps N: the same configuration, the preset's epochs dropped by both."""
    configs = [dry_config(invoke('--dry-run', '--preset', 'paper', flag, '50').output)
               for flag in ('--steps', '--train-steps')]
    assert configs[0] == configs[1]
    assert (configs[0]['train']['train_steps'], configs[0]['train']['epochs']) == (50, None)

def test_sweep_writes_table_files_and_reuses_records(tmp_path, count_measures):
    """A sweep writes sweep-<option>.csv/.json and a folder per value; a rerun measures nothing."""
    out = tmp_path / 'sweep'
    args = ['--sweep', 'labels=none,unique', *OPTIMUM, '--sizes', '16,32', '--outdir', out]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert count_measures == [16, 32, 16, 32]
    for value in ('none', 'unique'):
        rec = record(out / f'labels={value}')
        assert rec['config']['labels'] == value
        assert [p['size'] for p in rec['points']] == [16, 32]
    rows = (out / 'sweep-labels.csv').read_text().splitlines()
    assert rows[0].split(',') == ['labels', 'EMM', 'crossing', 'n=16', 'n=32']
    assert [r.split(',')[0] for r in rows[1:]] == ['none', 'unique']
    table = json.loads((out / 'sweep-labels.json').read_text())
    assert [v['value'] for v in table] == ['none', 'unique']
    for v in table:
        rec = record(out / f"labels={v['value']}")
        assert (v['emm'], v['crossing']) == (rec['emm'], rec['crossing'])
        assert v['points'] == [{k: p[k] for k in ('size', 'ratio', 'ci')} for p in rec['points']]
    before = (out / 'sweep-labels.json').read_text()
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert count_measures == [16, 32, 16, 32]
    assert (out / 'sweep-labels.json').read_text() == before
