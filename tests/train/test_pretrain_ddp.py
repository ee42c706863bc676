"""SimCLR across devices: two real processes (gloo on CPU; no GPU here) gather each other's
embeddings as SimCLRModule.training_step does, and after DDP's gradient averaging every
process holds the gradient of NT-Xent over the whole batch, as if one device had seen it.

The gather is Lightning's own (`LightningModule.all_gather(sync_grads=True)` calls
lightning_fabric's `_all_gather_ddp_if_available`); the averaging is what DDP does to the
parameters' gradients after backward.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning_fabric.utilities.distributed import _all_gather_ddp_if_available

from drseg.train.losses import nt_xent
from drseg.train.pretrain import gathered_views
from tests.ports import free_ports

WORLD = 2
N_PER_DEVICE = 3
TEMPERATURE = 0.2


def _views() -> tuple[torch.nn.Linear, torch.Tensor]:
    """A tiny "encoder" and each device's [first views; second views] inputs."""
    torch.manual_seed(0)
    encoder = torch.nn.Linear(8, 4)
    inputs = torch.randn(WORLD, 2 * N_PER_DEVICE, 8)
    return encoder, inputs


def _device(rank: int, port: int, out: Path) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    encoder, inputs = _views()
    z = encoder(inputs[rank])
    gathered = _all_gather_ddp_if_available(z, sync_grads=True)
    z1, z2 = gathered_views(gathered, N_PER_DEVICE)
    nt_xent(z1, z2, TEMPERATURE).backward()
    for parameter in encoder.parameters():
        assert parameter.grad is not None
        dist.all_reduce(parameter.grad)
        parameter.grad /= WORLD
    torch.save([p.grad for p in encoder.parameters()], out / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_gathered_negatives_give_the_whole_batch_gradient(tmp_path: Path) -> None:
    mp.spawn(_device, args=(free_ports(1)[0], tmp_path), nprocs=WORLD, join=True)
    encoder, inputs = _views()
    # One device, the whole batch: first views of every device, then their partners.
    z = encoder(inputs)
    z1 = z[:, :N_PER_DEVICE].reshape(-1, 4)
    z2 = z[:, N_PER_DEVICE:].reshape(-1, 4)
    nt_xent(z1, z2, TEMPERATURE).backward()
    expected = [p.grad for p in encoder.parameters()]
    for rank in range(WORLD):
        grads = torch.load(tmp_path / f"rank{rank}.pt")
        for got, want in zip(grads, expected, strict=True):
            assert want is not None
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
