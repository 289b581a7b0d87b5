"""Two ranks in one process group, without torchrun: gloo processes spawned by the test itself.

What only a process group runs: DDP's averaging of the gradients, each rank's noise stream in the
checkpoint, and the samples and d1/d2 gathered across ranks. Seconds, so not marked slow, and
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

DDP_TRAIN = memdiff.TrainConfig(steps=4, batch=8, snapshots=2)

def _ddp_worker(rank, world, port, tmp):
    """One rank: train the tiny network with a checkpoint, then sample 5 seeds and score them."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank,
                                         world_size=world)
    try:
        y = tiny_images(12)
        precond = tiny_network()
        for step, ema in memdiff.train(precond, y, None, DDP_TRAIN, seed=3,
                                       checkpoint=str(Path(tmp) / 'state.pt')):
            pass
        x, _ = memdiff.generate(ema, 5, (1, 8, 8), 0, torch.device('cpu'), num_steps=3)
        point, d1_d2 = memdiff.score(x, y)
        torch.save(dict(net=precond.state_dict(), ema=ema.state_dict(), x=x, point=point,
                        d1_d2=d1_d2), Path(tmp) / f'rank{rank}.pt')
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
    *_, (_, ema) = memdiff.train(one, y, None, DDP_TRAIN, seed=3)
    assert any(not torch.equal(one.state_dict()[k], r0['net'][k]) for k in r0['net'])
    ema.load_state_dict(r0['ema'])
    x, _ = memdiff.generate(ema, 5, (1, 8, 8), 0, torch.device('cpu'), num_steps=3)
    point, d1_d2 = memdiff.score(x, y)
    for r in r0, r1:
        assert torch.allclose(r['x'], x, rtol=0, atol=1e-5)
        assert torch.equal(r['d1_d2'], d1_d2) and r['point'] == point
