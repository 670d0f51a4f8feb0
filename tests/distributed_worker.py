"""One rank of the distributed-fit tests (tests/test_distributed.py), launched by
``python -m torch.distributed.run --standalone --nproc-per-node 2``.

    distributed_worker.py MODE OUT

MODE ``fit`` fits the rank's shard of the batches, ``ddp`` does so with the model
wrapped in DistributedDataParallel, ``mismatch`` gives rank 1 another approximation,
``empty`` gives rank 1 no batch;
``online`` trains with online LAM on the rank's shard, ``online-same`` on all batches on
every rank, ``online-bad`` gives rank 1 a second batch with one label too few,
``online-unused`` trains :class:`TwoHeads` (a head the embedding does not use) on all
batches on every rank, ``online-bn`` a model with BatchNorm (:func:`bn_model`) on the
rank's shard.
Each rank writes what it got to ``OUT/rank<r>.pt`` (or its error to ``OUT/rank<r>.err``)
and calls ``posterior.save(OUT/posterior.safetensors)``. ``LAM_DIST_BACKEND=nccl`` runs
the ranks on the GPUs (rank r on ``cuda:r``; benchmarks/gpu_check.sh), gloo on the CPU
otherwise.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from lam_plugin import L2Normalize, LaplaceEmbedder


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3), L2Normalize())


class TwoHeads(nn.Module):
    """An embedding and a classifier head that the embedding does not use (its parameters
    get no gradient from online LAM's loss)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.Tanh())
        self.emb = nn.Linear(16, 3)
        self.cls = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.body(x)
        return {"embedding": self.emb(h), "logits": self.cls(h)}


def bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3), L2Normalize())


def online_model(mode: str) -> tuple[nn.Module, dict]:
    """The model and the LaplaceEmbedder settings of an online mode."""
    if mode == "online-unused":
        torch.manual_seed(0)
        return TwoHeads(), {**online_settings(), "output_key": "embedding"}
    if mode == "online-bn":
        return bn_model(), online_settings()
    return model(), online_settings()


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(12, 6, generator=g), torch.randint(0, 3, (12,), generator=g)) for _ in range(6)]


def settings() -> dict:
    return dict(subset="all", approx="pos", prior_precision="marglik", progress=False)


def main(mode: str, out: Path) -> None:
    backend = os.environ.get("LAM_DIST_BACKEND", "gloo")
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{rank}" if backend == "nccl" else "cpu")
    net = (online_model(mode)[0] if mode.startswith("online") else model()).to(device)
    if mode == "ddp":
        net = nn.parallel.DistributedDataParallel(net, device_ids=[rank] if device.type == "cuda" else None)
    kwargs = settings()
    if mode == "mismatch" and rank == 1:
        kwargs["approx"] = "fix"
    if mode.startswith("online"):
        online(net, rank, world, mode, out)
        return
    shard = [(x.to(device), y) for x, y in batches()[rank::world]]
    if mode == "empty" and rank == 1:
        shard = []  # this rank's loader yields nothing: every rank must fail, none wait
    try:
        posterior = LaplaceEmbedder(net, **kwargs).fit(shard)
    except ValueError as err:
        (out / f"rank{rank}.err").write_text(str(err))
        sys.exit(3)
    posterior.save(out / "posterior.safetensors")
    torch.save(
        {
            "curvature": posterior.curvature.cpu(),
            "prior": torch.tensor(float(posterior.prior_precision)),
            "n_data": posterior.stats.n_data,
            "pairs": (posterior.stats.n_positive, posterior.stats.n_negative_total),
            "names": posterior.param_names,
        },
        out / f"rank{rank}.pt",
    )
    dist.barrier()
    dist.destroy_process_group()


def online_settings() -> dict:
    return dict(subset="all", prior_precision=10.0, progress=False)


def online(net: nn.Module, rank: int, world: int, mode: str, out: Path) -> None:
    if rank == 1:  # another start: online LAM gives every rank rank 0's weights
        with torch.no_grad():
            for p in net.parameters():
                p.add_(1.0)
    data = batches() if mode in ("online-same", "online-unused") else batches()[rank::world]
    if mode == "online-bad" and rank == 1:
        data[1] = (data[1][0], data[1][1][:-1])  # its step fails on this rank alone: no rank may wait
    try:
        posterior = LaplaceEmbedder(net, **online_model(mode)[1]).fit_online(
            data, epochs=2, dataset_size=72, max_pairs=None
        )
    except ValueError as err:
        (out / f"rank{rank}.err").write_text(str(err))
        sys.exit(3)
    sample = posterior.sample(batches()[0][0], n=2, generator=torch.Generator().manual_seed(0))
    got = {"curvature": posterior.curvature, "weights": net.state_dict(), "sample": sample}
    torch.save(got, out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
