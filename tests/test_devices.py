"""What differs on a GPU or Apple's MPS, checked on the CPU: no tensor built from Python data in
per-step code (a host-to-device copy, i.e. a GPU sync, at every step), the search energies
formed whole off the CPU, a precision MPS has, and the same shuffle on every DDP rank."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from captioner.attention import AdditiveAttention, LocalAttention2d


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


def test_per_step_code_builds_no_tensor_from_python_data():
    """``lift_fresh`` is a tensor made from Python data (copied to the device): none in the
    2-D local attention's step (its centre was scaled by a tensor of the grid's sides) nor in
    a search's step (the banned tokens were indexed by a list)."""
    from captioner.search import _constrain

    torch.manual_seed(0)
    attention = LocalAttention2d(query_dim=7, key_dim=5, position_dim=6, grid_size=(3, 4))
    query, keys = torch.randn(3, 7), torch.randn(3, 12, 5)
    with _CountOps() as ops:
        attention.centre(query, keys)
        constrained = _constrain(torch.zeros(3, 9), 0, 3, end_id=2, banned=(0, 1))
    assert "lift_fresh" not in ops.names and "index_put_" not in ops.names, ops.names
    assert torch.isinf(constrained[:, :3]).all() and torch.isfinite(constrained[:, 3:]).all()


def test_search_energies_are_chunked_on_the_cpu_only(monkeypatch):
    """Chunks keep the hidden layer in a CPU's cache; on another device (``meta`` stands in for
    a GPU) they would only add kernel launches: formed whole there."""
    calls: list[int] = []
    original = AdditiveAttention.energies

    def counted(self, proj_keys, q):
        calls.append(proj_keys.shape[0])
        return original(self, proj_keys, q)

    monkeypatch.setattr(AdditiveAttention, "energies", counted)
    for device in ("cpu", "meta"):
        attention = AdditiveAttention(query_dim=7, key_dim=5, attention_dim=6,
                                      chunk_elements=2 * 12 * 6).to(device)
        keys = torch.randn(9, 12, 5, device=device)
        with torch.no_grad():
            attention(torch.randn(9, 7, device=device), keys,
                      proj_keys=attention.project_keys(keys))
        assert calls == ([2, 2, 2, 2, 1] if device == "cpu" else [9]), (device, calls)
        calls.clear()


def test_the_spatial_transformer_samples_in_a_precision_mps_has(monkeypatch):
    """float64 grids on CPU and CUDA; float32 on MPS (it has no float64), which samples the
    same image to float32 accuracy."""
    from captioner.encoders import stn

    assert stn.precise_dtype(torch.device("cpu")) == torch.float64
    assert stn.precise_dtype(torch.device("mps")) == torch.float32
    torch.manual_seed(0)
    x, theta = torch.rand(2, 3, 9, 11), torch.tensor([[[0.8, 0.1, 0.05], [-0.1, 0.9, -0.1]]] * 2)
    wide = stn.warp(x, theta)
    monkeypatch.setattr(stn, "precise_dtype", lambda device: torch.float32)
    torch.testing.assert_close(stn.warp(x, theta), wide, atol=1e-5, rtol=0)


def test_every_ddp_rank_shuffles_alike_without_a_seed(monkeypatch):
    """Without ``seed_everything`` each process's torch seed is random: under DDP the ranks'
    shards then overlapped (examples trained twice, others never). Several processes take 0,
    as Lightning's own sampler does; one process keeps its own seed."""
    from captioner.data.samplers import run_seed

    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    torch.manual_seed(1234)
    assert run_seed() == 1234
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 2)
    assert run_seed() == 0
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")
    assert run_seed() == 7
