r"""A linear map applied at every step of an unroll, whose weight gradient is one GEMM.

In the decoder's unroll the recurrent part of the LSTM input transform is, at each step ``t``,
``r_t = x_t W^T`` with ``x_t = [z_t; h_{t-1}]`` ``(B, D + N)`` and ``W = [W_z, U]``
``(4N, D + N)``. Autograd computes the weight gradient step by step,
``dW = sum_t g_t^T x_t`` with ``g_t = dLoss / dr_t`` ``(B, 4N)``: ``T`` outer products of inner
size ``B`` (32) that each write a full ``(4N, D + N)`` matrix (16 MB at COCO scale), memory bound.
:class:`UnrolledLinear` keeps ``(g_t, x_t)`` of every step and computes the same sum once,

    dW = G^T X,   G = [g_0; ...; g_{T-1}]  (T B, 4N),   X = [x_0; ...; x_{T-1}]  (T B, D + N),

an efficient GEMM with inner size ``T B``. The sum is exact; only the order of the floating point
additions differs from autograd's (relative differences ~1e-6 in fp32).

Why step 0's backward runs last: ``r_0`` feeds ``h_1``, which is part of ``x_1``, so the gradient
of ``r_0`` is complete only after the backward of step 1 has run, and so on by induction. The
autograd engine runs a node only when all of its incoming gradients are ready, so the node of
step 0 is the last of the unroll's nodes; it computes ``dW`` and returns it. The later steps
return ``None`` for the weight. Only first-order gradients are supported (no double backward).

A backward pass that does not reach step 0 (``torch.autograd.grad`` with respect to, say, the
word embeddings of later steps, a saliency probe; or a pass that raised) leaves its steps'
pairs behind; each pair is tagged with the backward pass (autograd's graph task) that stored it,
and step 0 sums only those of its own pass, so such a pass cannot leak into the next one's
``dW``.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from captioner.autocast import autocast_dtype


class _SummedWeightGrad(torch.autograd.Function):
    """``y = x W^T``; the weight gradient of all steps of one :class:`UnrolledLinear` at once."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, store: list, first: bool
                ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.store, ctx.first = store, first
        return x.mm(weight.t())  # (B, out)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_weight = None
        if ctx.needs_input_grad[1]:
            task = torch._C._current_graph_task_id()  # this backward pass
            ctx.store.append((task, grad, x))
            if ctx.first:  # the last node of the unroll to run: see the module docstring
                pairs = [(g, i) for k, g, i in ctx.store if k == task]  # stale passes dropped
                grads = torch.cat([g for g, _ in pairs])  # (T B, out)
                inputs = torch.cat([i for _, i in pairs])  # (T B, in)
                grad_weight = grads.t().mm(inputs)  # (out, in)
                ctx.store.clear()
        grad_x = grad.mm(weight) if ctx.needs_input_grad[0] else None  # (B, in)
        return grad_x, grad_weight, None, None


class UnrolledLinear:
    """``x_t -> x_t W^T`` for the steps ``t = 0, 1, ..`` of one unroll (no bias).

    Create one per forward pass and call it once per step, in step order; each call's output
    must feed the input of the next call (a recurrence), which is what makes the deferred weight
    gradient correct (module docstring). Without autograd (no grad mode, or ``weight`` frozen)
    it is a plain matmul.

    Under autocast the weight is cast to the autocast dtype once, at the first call, and every
    step multiplies in that dtype (as autocast's ``mm`` would; a float64 weight, which autocast
    leaves alone, is not cast). Autocast itself would cast the weight again at every step: it
    caches casts of leaf parameters only, and ``weight`` is usually a concatenation (a
    ``(2048, 2560)`` copy per step at COCO scale). The deferred weight gradient is then one
    GEMM in the autocast dtype, which flows back through the one cast to the float32
    parameters.

    Args:
        weight: ``(out, in)`` (the decoder's ``(4N, D + N)``), typically a contiguous
            concatenation of parameters.

    Example::

        w_rec = torch.cat([w_z, w_hh], dim=1)  # (4N, D + N)
        recurrent = UnrolledLinear(w_rec)
        for t in range(T):
            gates = word_gates[:, t] + recurrent(torch.cat([z, h], dim=1))  # (B, 4N)
    """

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight
        self._store: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._calls = 0
        self._cast: torch.Tensor | None = None  # the weight in the autocast dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in) -> (B, out)``."""
        if not torch.is_grad_enabled() or not self.weight.requires_grad:
            return x.mm(self.weight.t())
        weight, dtype = self.weight, autocast_dtype(self.weight)
        if dtype is not None:
            if self._cast is None or self._cast.dtype != dtype:
                self._cast = self.weight.to(dtype)  # once per unroll
            weight, x = self._cast, x.to(dtype)
        first = self._calls == 0
        self._calls += 1
        return _SummedWeightGrad.apply(x, weight, self._store, first)
