"""Scaling out: torchrun with several processes, and the paper preset on the CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import memdiff

ROOT = Path(__file__).resolve().parents[1]
TINY = ['--train-steps', '4', '--samples', '24', '--snapshots', '2', '--model-channels', '8',
        '--batch', '8']

def run(args, tmp_path, nproc=None, script=ROOT / 'run_emm.py'):
    """Run script (under torchrun with nproc processes) and return the CompletedProcess."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get('PYTHONPATH')]))
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=path)   # scripts in tmp_path too
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--standalone',
                f'--nproc_per_node={nproc}'] if nproc else [sys.executable]
    return subprocess.run(launcher + [str(script), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)

@pytest.mark.slow
def test_torchrun_two_processes_writes_one_record_with_world_size_2(tmp_path):
    """Under torchrun (gloo, 2 CPU processes) training, sampling and scoring run and rank 0 records."""
    out = tmp_path / 'ddp'
    r = run([*TINY, '--sizes', '16,24', '--outdir', str(out)], tmp_path, nproc=2)
    assert r.returncode == 0, r.stderr[-2000:]
    record = json.loads((out / 'results.json').read_text())
    assert [p['world_size'] for p in record['points']] == [2, 2]
    assert [p['size'] for p in record['points']] == [16, 24]
    assert all(len(p['snapshots']) == 2 for p in record['points'])
    assert r.stdout.count('EMM at') == 1                    # only rank 0 prints the table

@pytest.mark.slow
def test_torchrun_optimum_matches_single_process(tmp_path):
    """Sampling and the neighbour search split across ranks leave the optimum's record unchanged."""
    args = ['--arch', 'optimum', '--samples', '30', '--sizes', '16,40']
    one, two = tmp_path / 'one', tmp_path / 'two'
    for outdir, nproc in (one, None), (two, 2):
        r = run([*args, '--outdir', str(outdir)], tmp_path, nproc)
        assert r.returncode == 0, r.stderr[-2000:]
    r1, r2 = (json.loads((d / 'results.json').read_text()) for d in (one, two))
    assert [p['snapshots'] for p in r1['points']] == [p['snapshots'] for p in r2['points']]

# Scores each batch of samples under torchrun, counting the rows each rank's own search is given.
SPLIT_SCORE = """
import sys, torch, memdiff
import run_emm
_, rank, _ = run_emm.init_distributed('cpu')
searched, nearest = [], memdiff.nearest_distinct
memdiff.nearest_distinct = lambda x, *a: searched.append(len(x)) or nearest(x, *a)
data = torch.load(sys.argv[1])
out = [(s, d['d1'] / d['d2']) for s, d in (memdiff.score(x, data['y']) for x in data['batches'])]
torch.save(dict(out=out, searched=searched), f'{sys.argv[2]}.{rank}')
run_emm.close_distributed()
"""

@pytest.mark.slow
def test_split_score_gives_every_rank_the_single_process_ratios(tmp_path):
    """Two ranks search their rows [rank::2] only; both get the single-process d1/d2 and ratio."""
    y = memdiff.load_dataset('digits')[0][:40]
    g = torch.Generator().manual_seed(0)
    # Training images plus noise growing from none: the first rows are memorized, the last are not.
    batches = [(y[:n] + torch.linspace(0, 1, n)[:, None, None, None]
                * torch.randn(n, *y.shape[1:], generator=g)).clamp(-1, 1) for n in (7, 2, 1)]
    torch.save(dict(y=y, batches=batches), tmp_path / 'in.pt')
    (tmp_path / 'split_score.py').write_text(SPLIT_SCORE)
    r = run([str(tmp_path / 'in.pt'), str(tmp_path / 'out')], tmp_path, nproc=2,
            script=tmp_path / 'split_score.py')
    assert r.returncode == 0, r.stderr[-2000:]
    expected = [memdiff.memorization_scores(memdiff.quantize_uint8(x), y) for x in batches]
    assert 0 < expected[0][1].sum() < 7                     # the 7 rows hold both kinds
    for rank, rows in enumerate([[4, 1, 1], [3, 1, 0]]):   # 7, 2 and 1 samples split in two
        got = torch.load(tmp_path / f'out.{rank}')
        assert got['searched'] == rows
        for (s, ratios), (ratio, mask) in zip(got['out'], expected):
            assert torch.equal(ratios, ratio)
            k, n = int(mask.sum()), len(mask)
            assert s == dict(ratio=k / n, ci=list(memdiff.wilson_interval(k, n)))

@pytest.mark.slow
def test_paper_preset_builds_and_takes_a_training_step_on_cpu():
    """The study's 32x32 DDPM++ (VP, dropout 0.13) builds at 35,125,251 parameters and trains a step."""
    cfg = memdiff.EMMConfig(model_channels=128, channel_mult=(2, 2, 2), num_blocks=2,
                            attn_resolutions=(16,), dropout=0.13, train=memdiff.TrainConfig(
                                precond='vp', lr=2e-4, batch=2, train_steps=1, snapshots=1))
    precond = memdiff.build_network(cfg, (3, 32, 32), 0)
    assert sum(p.numel() for p in precond.parameters()) == 35_125_251
    y = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    before = [p.detach().clone() for p in precond.parameters()]
    (step, ema, _), = list(memdiff.train(precond, y, None, cfg.train))
    assert step == 1
    changed = sum(not torch.equal(a, b) for a, b in zip(before, precond.parameters()))
    assert changed > 0.9 * len(before)                      # Adam moves (almost) every tensor
    assert all(torch.isfinite(p).all() for p in ema.parameters())

def test_paper_preset_dry_run_reports_the_study_cost(tmp_path):
    """--preset paper sets the study's network, VP precond, batch 512 and 40k-epoch duration."""
    r = run(['--dry-run', '--preset', 'paper', '--resolution', '8', '--sizes', '16:1000'], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert '"precond": "vp"' in r.stdout and '"batch": 512' in r.stdout
    assert '78,125 training steps' in r.stdout              # 40,000 epochs of 1,000 images / 512

def test_explicit_steps_and_snapshots_replace_the_paper_presets_epochs(tmp_path):
    """--preset paper --train-steps 300 --snapshots 1 trains 300 steps with one snapshot, not 40k epochs."""
    r = run(['--dry-run', '--preset', 'paper', '--resolution', '8', '--sizes', '16:1000',
             '--train-steps', '300', '--snapshots', '1'], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert '"epochs": null' in r.stdout and '"snapshot_images": null' in r.stdout
    assert '300 training steps of batch 512' in r.stdout and '1 snapshot(s)' in r.stdout

@pytest.fixture(scope='module')
def cifar_like(tmp_path_factory):
    """A CIFAR-shaped .npz (200 uint8 images 32x32x3, 10 classes)."""
    path = tmp_path_factory.mktemp('data') / 'cifar_like.npz'
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (200, 32, 32, 3), generator=g, dtype=torch.uint8).numpy()
    import numpy as np
    np.savez(path, images=images, labels=np.arange(200) % 10)
    return path

@pytest.mark.parametrize('resolution, arch, attn, precond, embedding, params', [
    (32, 'ddpmpp', 16, 'vp', 'positional', '35,125,251'),
    (16, 'ddpmpp', 8, 'vp', 'positional', '35,125,251'),
    (8, 'ddpmpp', 4, 'vp', 'positional', '35,125,251'),
    (32, 'ncsnpp', 16, 've', 'fourier', '35,788,035'),
])
def test_paper_preset_follows_the_architecture_and_resolution(tmp_path, cifar_like, resolution, arch,
                                                               attn, precond, embedding, params):
    """As the study's scripts: attention at half the resolution (the same network at 32, 16 and 8),
    NCSN++ with VE and the Fourier embedding; mode2 EMA, whole kimg, seed 1024."""
    r = run(['--dry-run', '--preset', 'paper', '--data', str(cifar_like), '--resolution',
             str(resolution), '--arch', arch, '--sizes', '16:100'], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    config = json.loads(r.stdout[:r.stdout.index('\ndata:')])
    assert config['attn_resolutions'] is None                # half the side, as every run
    with torch.device('meta'):
        net = memdiff.build_network(memdiff.EMMConfig(**{k: config[k] for k in (
            'model_channels', 'channel_mult', 'num_blocks', 'arch', 'embedding')}),
            (3, resolution, resolution), 0).net
    assert net.embedding == embedding
    assert [n for n, m in net.named_modules() if getattr(m, 'attention', False)][0].split(
        '.')[1].startswith(f'{attn}_')
    assert config['train']['precond'] == precond and config['train']['ema_mode'] == 'mode2'
    assert config['train']['whole_kimg'] and config['seed'] == 1024
    assert f'network: {params} parameters' in r.stdout

@pytest.mark.slow
def test_torchrun_score_samples_a_ve_network_over_its_clamped_range(tmp_path):
    """--score under torchrun with 2 processes: a VE network's samples (--save-samples) are those of
    edm_sampler called directly with the study's clamp [0.02, 80], image for image (uint8)."""
    torch.manual_seed(0)
    net = memdiff.UNet(8, 1, 1, model_channels=8, channel_mult=(1, 2), attn_resolutions=(4,))
    with torch.no_grad():
        for q in net.parameters():                          # away from EDM's near-zero init
            q.copy_(torch.randn(q.shape) / max(1, q[0].numel()) ** 0.5)
    precond = memdiff.Precond(net, 've').eval()
    memdiff.save_network(precond, tmp_path / 'net.pt')
    r = run(['--score', str(tmp_path / 'net.pt'), '--sizes', '32', '--samples', '7',
             '--save-samples', '--outdir', str(tmp_path / 'out'), '--device', 'cpu'], tmp_path,
            nproc=2)
    assert r.returncode == 0, r.stderr[-2000:]
    import numpy as np
    saved = np.load(tmp_path / 'out' / 'samples_net.npz')['samples']
    z, _ = memdiff.study_latents(range(7), (1, 8, 8), 0, torch.device('cpu'))
    torch.set_num_threads(1)
    direct = memdiff.edm_sampler(lambda *a: precond(*a), z, sigma_min=0.02, sigma_max=80)
    wide = memdiff.edm_sampler(lambda *a: precond(*a), z)
    to_hwc = lambda x: memdiff.to_uint8(x).permute(0, 2, 3, 1).numpy()
    # A rank evaluates the network on 4 or 3 rows, not 7: float rounding may move a pixel a level.
    assert np.abs(saved.astype(int) - to_hwc(direct).astype(int)).max() <= 1
    assert np.abs(saved.astype(int) - to_hwc(wide).astype(int)).max() > 1
