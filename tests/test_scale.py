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
TINY = ['--steps', '4', '--samples', '24', '--sampler-steps', '3', '--snapshots', '2',
        '--channels', '8', '--batch', '8', '--workers', '1']

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
    assert record['world_size'] == 2
    assert [p['size'] for p in record['points']] == [16, 24]
    assert all(len(p['snapshots']) == 2 for p in record['points'])
    assert r.stdout.count('EMM at') == 1                    # only rank 0 prints the table

@pytest.mark.slow
def test_torchrun_optimum_matches_single_process(tmp_path):
    """Sampling and the neighbour search split across ranks leave the optimum's record unchanged."""
    args = ['--optimum', '--samples', '30', '--sampler-steps', '4', '--sizes', '16,40']
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
searched, scores = [], memdiff.memorization_scores
memdiff.memorization_scores = lambda x, *a: searched.append(len(x)) or scores(x, *a)
data = torch.load(sys.argv[1])
out = [memdiff.score(x, data['y']) for x in data['batches']]
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
    cfg = memdiff.EMMConfig(channels=128, channel_mult=(2, 2, 2), blocks=2, attn=(16,),
                            dropout=0.13, train=memdiff.TrainConfig(precond='vp', lr=2e-4, batch=2,
                                                                    steps=1, snapshots=1))
    precond = memdiff.build_network(cfg, (3, 32, 32), 0)
    assert sum(p.numel() for p in precond.parameters()) == 35_125_251
    y = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    before = [p.detach().clone() for p in precond.parameters()]
    (step, ema), = list(memdiff.train(precond, y, None, cfg.train))
    assert step == 1
    changed = sum(not torch.equal(a, b) for a, b in zip(before, precond.parameters()))
    assert changed > 0.9 * len(before)                      # Adam moves (almost) every tensor
    assert all(torch.isfinite(p).all() for p in ema.parameters())

def test_paper_preset_dry_run_reports_the_study_cost(tmp_path):
    """--preset paper sets the study's network, VP precond, batch 512 and 40k-epoch duration."""
    r = run(['--dry-run', '--preset', 'paper', '--resolution', '8', '--max-size', '1000'], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert '"precond": "vp"' in r.stdout and '"batch": 512' in r.stdout
    assert '78,125 training steps' in r.stdout              # 40,000 epochs of 1,000 images / 512

def test_explicit_steps_and_snapshots_replace_the_paper_presets_epochs(tmp_path):
    """--preset paper --steps 300 --snapshots 1 trains 300 steps with one snapshot, not 40k epochs."""
    r = run(['--dry-run', '--preset', 'paper', '--resolution', '8', '--max-size', '1000',
             '--steps', '300', '--snapshots', '1'], tmp_path)
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
             str(resolution), '--arch', arch, '--max-size', '100'], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    config = json.loads(r.stdout[:r.stdout.index('\ndata:')])
    assert config['attn'] == [attn] and config['embedding'] == embedding
    assert config['train']['precond'] == precond and config['train']['ema_mode'] == 'mode2'
    assert config['train']['whole_kimg'] and config['seed'] == 1024
    assert f'network: {params} parameters' in r.stdout
