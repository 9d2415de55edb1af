"""SyncBatchNorm that keeps the MS-CAM's rules (issue 21): openaff.convert_sync_batchnorm, ContextSyncBatchNorm, a
2-process gloo run with a batch of one per process, and the training engine's --sync-bn conversion."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _nd_utils import randomize_nd

import openaff
from openaff.layers import ContextBatchNorm2d, ContextSyncBatchNorm, convert_sync_batchnorm, create_fusion
from openaff.layers.mscam import _branch_eval
from openaff.training import distributed


def _model(convert=None) -> torch.nn.Module:
    # An AFF whose global branch sees one value per channel and process, behind a plain BatchNorm; converted
    # first (the engine's CpuSyncBatchNorm is built in the default dtype), then the same random float64 values.
    torch.manual_seed(0)
    m = torch.nn.ModuleDict(dict(fuse=create_fusion("aff", 8, 2), norm=torch.nn.BatchNorm2d(8)))
    if convert is not None:
        m = convert(m)
    m = m.double()
    randomize_nd(m)
    return m


def _step(m, x, y, recompute=False):
    m["fuse"].recompute = recompute
    x = x.clone().requires_grad_()
    out = m["norm"](m["fuse"](x, y))
    out.square().sum().backward()
    return out.detach(), x.grad


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 8, 3, 3, generator=g, dtype=torch.float64), torch.randn(2, 8, 3, 3, generator=g,
                                                                                   dtype=torch.float64)


def _worker(rank: int, port: int, path: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        results = {}
        for recompute in (False, True):
            # What --sync-bn does on the CPU: ContextSyncBatchNorm in the MS-CAM, CpuSyncBatchNorm for the rest
            # (PyTorch's SyncBatchNorm runs on accelerators only).
            m = _model(lambda t: distributed.convert_sync_batchnorm(t, torch.device("cpu")))
            assert type(m["fuse"].mscam.global_att[2]) is ContextSyncBatchNorm
            m.train()
            x, y = _inputs()
            out, gx = _step(m, x[rank:rank + 1], y[rank:rank + 1], recompute)  # a batch of one per process
            results[recompute] = dict(out=out, gx=gx, state=m.state_dict(),
                                      grads={n: p.grad for n, p in m.named_parameters()})
        torch.save(results, f"{path}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_with_a_batch_of_one_each_are_one_batch_of_two(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    ref = _model().train()
    x, y = _inputs()
    out, gx = _step(ref, x, y)  # one process, the batch of two: what synchronised statistics must give
    for recompute in (False, True):
        got = [r[recompute] for r in ranks]
        torch.testing.assert_close(torch.cat([g["out"] for g in got]), out, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(torch.cat([g["gx"] for g in got]), gx, rtol=1e-12, atol=1e-12)
        for n, p in ref.named_parameters():  # DDP would average these; their sum is the batch's gradient
            torch.testing.assert_close(got[0]["grads"][n] + got[1]["grads"][n], p.grad, rtol=1e-11, atol=1e-12,
                                       msg=n)
        for k, v in ref.state_dict().items():  # running statistics updated once, from the batch of two
            for g in got:
                torch.testing.assert_close(g["state"][k], v, rtol=1e-12, atol=1e-12, msg=f"{k} {recompute}")


def test_conversion_keeps_the_rules_and_the_weights():
    m = _model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    weight = m["fuse"].mscam.global_att[2].weight
    converted = openaff.convert_sync_batchnorm(m)
    assert converted is m
    bns = {n: type(t) for n, t in m.named_modules() if isinstance(t, torch.nn.modules.batchnorm._BatchNorm)}
    assert bns.pop("norm") is torch.nn.SyncBatchNorm  # other BatchNorms: what PyTorch's conversion makes
    assert set(bns.values()) == {ContextSyncBatchNorm} and len(bns) == 4
    assert m["fuse"].mscam.global_att[2].weight is weight  # the same Parameter objects
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    # not an nn.SyncBatchNorm: DistributedDataParallel refuses those in a CPU model (gloo training)
    assert not isinstance(m["fuse"].mscam.global_att[2], torch.nn.SyncBatchNorm)
    # No process group: a ContextBatchNorm, so a batch of one trains (PyTorch's SyncBatchNorm raises here).
    m["norm"] = torch.nn.Identity()
    x, y = torch.randn(1, 8, 3, 3, dtype=torch.float64), torch.randn(1, 8, 3, 3, dtype=torch.float64)
    plain = _model()
    plain["norm"] = torch.nn.Identity()
    m.train(), plain.train()
    torch.testing.assert_close(m["fuse"](x, y), plain["fuse"](x, y), rtol=1e-12, atol=1e-12)
    # Evaluation: folded into the convolutions on the fly, as the unconverted MS-CAM.
    m.eval()
    assert _branch_eval(m["fuse"].mscam.global_att, x) is not None
    with torch.no_grad():
        plain.eval()
        torch.testing.assert_close(m["fuse"](x, y), plain["fuse"](x, y), rtol=1e-12, atol=1e-12)
    assert convert_sync_batchnorm(ContextBatchNorm2d(4)).__class__ is ContextSyncBatchNorm


def test_training_engine_sync_bn_uses_it():
    for device in ("cpu", "meta"):  # meta stands for an accelerator: nn.SyncBatchNorm for the other BatchNorms
        m = _model()
        distributed.convert_sync_batchnorm(m, torch.device(device))
        assert type(m["fuse"].mscam.local_att[1]) is ContextSyncBatchNorm
        assert type(m["norm"]) is (distributed.CpuSyncBatchNorm if device == "cpu" else torch.nn.SyncBatchNorm)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_synchronised_statistics_in_one_process_are_batchnorm(momentum):
    # synchronised_batch_norm with a group of one (gloo, this process) against BatchNorm: the formula's plumbing.
    from openaff.layers.sync_batchnorm import synchronised_batch_norm

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        ours, ref = torch.nn.BatchNorm3d(4, momentum=momentum).double(), torch.nn.BatchNorm3d(4, momentum=momentum)
        randomize_nd(ours)
        ref = ref.double()
        ref.load_state_dict(ours.state_dict())
        x = torch.randn(2, 4, 3, 2, 2, dtype=torch.float64)
        torch.testing.assert_close(synchronised_batch_norm(ours, x), ref(x), rtol=1e-12, atol=1e-12)
        for a, b in zip(ours.state_dict().values(), ref.state_dict().values(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    finally:
        dist.destroy_process_group()
