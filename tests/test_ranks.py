"""Two ranks in one process group, without torchrun: gloo processes spawned by the test itself.

What only a process group runs: DDP's averaging of the gradients, each rank's noise stream in the
saved state, the samples and d1/d2 gathered across ranks, and the sampler's noise range on every rank. Seconds, so not marked slow, and
tests/mutate.py's spawned processes import the mutant too.
"""

from pathlib import Path

import torch

import memdiff
from test_training import tiny_images, tiny_network


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]

DDP_TRAIN = memdiff.TrainConfig(train_steps=4, batch=8, snapshots=2)

class RangeDenoiser(memdiff.GaussianDenoiser):
    """A closed-form denoiser declaring VE's noise range, recording the sigmas it is called with."""
    sigma_min, sigma_max = 0.02, 100.0

    def __call__(self, x, sigma, labels=None):
        self.calls = getattr(self, 'calls', []) + [float(sigma)]
        return super().__call__(x, sigma, labels)

def _ddp_worker(rank, world, port, tmp):
    """One rank: train the tiny network saving its state, sample 5 seeds and score them; sample a
    denoiser of VE's range with a progress bar."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank,
                                         world_size=world)
    try:
        y = tiny_images(12)
        precond = tiny_network()
        for step, ema, state in memdiff.train(precond, y, None, DDP_TRAIN, seed=3):
            state = state()                                 # every rank: it gathers the streams
            if rank == 0:
                torch.save(state, Path(tmp) / 'state.pt')
        x, _ = memdiff.generate(ema, 5, (1, 8, 8), 0, torch.device('cpu'), num_steps=3)
        point, per_sample = memdiff.score(x, y)
        ve = RangeDenoiser(y)
        x_ve, _ = memdiff.generate(ve, 5, (1, 8, 8), 0, torch.device('cpu'), num_steps=4,
                                   progress=lambda *a: None)
        torch.save(dict(net=precond.state_dict(), ema=ema.state_dict(), x=x, point=point,
                        d1_d2=per_sample['d1'] / per_sample['d2'], ve=x_ve, sigmas=ve.calls),
                   Path(tmp) / f'rank{rank}.pt')
    finally:
        torch.distributed.destroy_process_group()

def test_two_ranks_average_gradients_keep_distinct_noise_and_gather_one_process_samples(tmp_path):
    """Under a 2-rank gloo group: DDP keeps both ranks' weights identical (each rank saw other
    images and noise), the checkpoint holds each rank's own noise stream, and the gathered samples
    and d1/d2 (5 seeds: an odd split) equal one process's from the same EMA network (the samples to
    float rounding: a rank evaluates the network on 3 or 2 rows instead of 5)."""
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f'rank{r}.pt') for r in (0, 1))
    for key in 'net', 'ema':
        assert all(torch.equal(r0[key][k], r1[key][k]) for k in r0[key]), key
    rng = torch.load(tmp_path / 'state.pt')['rng']
    assert len(rng) == 2 and not torch.equal(rng[0]['noise'], rng[1]['noise'])
    # The ranks' noise differs from one process's (rank 1 draws its own stream), so the weights do.
    one = tiny_network()
    y = tiny_images(12)
    *_, (_, ema, _) = memdiff.train(one, y, None, DDP_TRAIN, seed=3)
    assert any(not torch.equal(one.state_dict()[k], r0['net'][k]) for k in r0['net'])
    ema.load_state_dict(r0['ema'])
    x, _ = memdiff.generate(ema, 5, (1, 8, 8), 0, torch.device('cpu'), num_steps=3)
    point, per_sample = memdiff.score(x, y)
    for r in r0, r1:
        assert torch.allclose(r['x'], x, rtol=0, atol=1e-5)
        assert torch.equal(r['d1_d2'], per_sample['d1'] / per_sample['d2']) and r['point'] == point
    # The sampler's range reaches every rank: VE's clamp [0.02, 80], as the study's sampler.
    t_steps = memdiff.edm_sigma_steps(4, 0.02, 80)
    z, _ = memdiff.study_latents(range(5), (1, 8, 8), 0, torch.device('cpu'))
    direct = memdiff.edm_sampler(memdiff.GaussianDenoiser(y), z, num_steps=4, sigma_min=0.02,
                                 sigma_max=80)
    for r in r0, r1:
        assert max(r['sigmas']) == t_steps[0] and min(r['sigmas']) == t_steps[3]
        assert torch.equal(memdiff.to_uint8(r['ve']), memdiff.to_uint8(direct))
