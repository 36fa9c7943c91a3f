"""DistributedDataParallel: two gloo processes on the CPU give the gradients and census totals
of one process on the combined batch, under a preset, a census and the directional policy."""

from __future__ import annotations

import os
import socket

import pytest

torch = pytest.importorskip("torch")
dist = torch.distributed
if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

import torch.multiprocessing as mp  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
WORLD = 2


def _model():
    """Integer conv weights and inputs: exact zeros before the relu and ties in the max-pool."""
    import torch.nn as nn

    torch.manual_seed(0)  # the same initial weights in every process
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(3 * 3 * 3, 4), nn.ReLU(), nn.Linear(4, 2))
    model = model.double()
    with torch.no_grad():
        model[0].weight.copy_(torch.randint(-1, 2, model[0].weight.shape, generator=g))
        model[0].bias.zero_()
    return model


def _batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(-1, 2, (8, 1, 6, 6), generator=g).double()
    return x, torch.randint(0, 2, (8,), generator=g)


def _step(model, x, y, census_model):
    """One step under each mode; returns grads and census totals per mode."""
    import torch.nn.functional as F

    import kinkprop.torch as kpt

    out = {}
    for mode in ("jax", "directional"):
        model.zero_grad()
        with kpt.census(census_model) as c:
            if mode == "directional":
                scope = kpt.kink_policy("directional", model=model, seed=3)
            else:
                scope = kpt.kink_policy("jax", relu=1.0, max_pool2d="split")
            with scope:
                F.cross_entropy(model(x), y).backward()
            reading = c.read()
        grads = [p.grad.detach().clone() for p in census_model.parameters()]
        out[mode] = (grads, {k: (v.evaluated, v.hits, v.detail) for k, v in reading.sites.items()},
                     reading.world_size)
    return out


def _worker(rank, port, results):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from torch.nn.parallel import DistributedDataParallel as DDP

        inner = _model()
        model = DDP(inner)
        x, y = _batch()
        n = x.shape[0] // WORLD
        out = _step(model, x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n], model)
        results[rank] = {k: ([g.tolist() for g in v[0]], v[1], v[2]) for k, v in out.items()}
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_gloo_processes_match_one_process_on_the_combined_batch():
    model = _model()
    x, y = _batch()
    single = _step(model, x, y, model)
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        mp.start_processes(_worker, args=(_free_port(), results), nprocs=WORLD, join=True,
                           start_method="spawn")
        results = dict(results)
    for mode, (grads, census, world) in single.items():
        for rank in range(WORLD):
            r_grads, r_census, r_world = results[rank][mode]
            assert r_world == WORLD and world == 1
            for g, r in zip(grads, r_grads):
                torch.testing.assert_close(torch.tensor(r, dtype=g.dtype), g, rtol=0,
                                           atol=1e-12, msg=f"{mode} gradient, rank {rank}")
            assert r_census == census, (mode, rank)
        hits = sum(h for _, h, _ in census.values())
        assert hits > 0
