"""DDP with 2 CPU processes (gloo): every head is used every step and its gradients are synced."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

pytestmark = pytest.mark.slow

WORLD = 2
STEPS = 2


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(3, 8, 3, padding=1)
        self.dec = nn.Conv2d(8, 8, 3, padding=1)
        self.out = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        return self.out(torch.nn.functional.silu(self.dec(torch.nn.functional.silu(self.enc(x)))))


def _worker(rank: int, store_path: str, out_dir: str) -> None:
    import ctxpred

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank,
                            world_size=WORLD)
    try:
        torch.manual_seed(0)  # same initial weights on every rank (DDP also broadcasts them)
        model = _Net()
        losses = {
            name: ctxpred.ContextPredictionLoss(
                ctxpred.PixelNeighborhood(strides=(1, 2)),
                ctxpred.GaussianSamplingHead(3, 8, num_samples=4, num_strides=2), points=16)
            for name in ("enc", "dec")
        }
        # feature context: its scale anchor is taken at the first call, on each rank's own data
        losses["out"] = ctxpred.ContextPredictionLoss(
            ctxpred.FeatureNeighborhood(strides=(1,)),
            ctxpred.GaussianSamplingHead(3, 3, num_samples=4), points=16)
        predictor = ctxpred.attach(model, losses)
        ddp = nn.parallel.DistributedDataParallel(predictor.training_module())
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(100 + rank)  # different data on each rank
        for _ in range(STEPS):
            x = torch.randn(2, 3, 8, 8, generator=g)
            opt.zero_grad()
            out = ddp(x)
            loss = ((out - x) ** 2).mean() + predictor.loss(target=x)
            loss.backward()
            opt.step()
        grads = {n: p.grad.clone() for n, p in ddp.module.named_parameters()}
        torch.save({"grads": grads, "weights": ddp.module.state_dict(),
                    "anchor": losses["out"].anchor_rms.clone()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_cpu_processes_sync_backbone_and_heads(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    names = set(ranks[0]["grads"])
    assert any(n.startswith("heads.") for n in names) and any(n.startswith("model.") for n in names)
    for name in names:
        g0, g1 = ranks[0]["grads"][name], ranks[1]["grads"][name]
        assert g0.abs().sum() > 0, name  # every parameter, heads included, got a gradient
        torch.testing.assert_close(g0, g1, msg=f"gradient of {name} differs across ranks")
    for name, w in ranks[0]["weights"].items():
        torch.testing.assert_close(w, ranks[1]["weights"][name])
    # one scale anchor for all ranks (the mean of their first batches' RMS), not one per rank
    assert torch.isfinite(ranks[0]["anchor"])
    assert torch.equal(ranks[0]["anchor"], ranks[1]["anchor"])
