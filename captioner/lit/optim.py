"""The optimisers the training modules build: Adam (PyTorch's fused kernel where Lightning
allows it) and the paper's RMSProp.

Xu et al. (2015, Section 4.3): "For the Flickr8k dataset, we found that RMSProp worked best,
while for Flickr30k/MS COCO dataset we used the recently proposed Adam algorithm".
:func:`rmsprop` is the variant of the authors' code (arctic-captions ``optimizers.rmsprop``,
Graves 2013, Eqs. 38-41): centred second moment with decay 0.95, momentum 0.9 and 1e-4 added
under the square root; PyTorch's ``RMSprop(centered=True)`` adds its ``eps`` after the square
root instead, a negligible difference once the averages are warm.

``torch.optim.Adam`` updates parameters in a Python loop over tensors on CPU (its ``foreach``
default is for CUDA only): about ten elementwise passes per parameter tensor. ``fused=True`` runs
the same update (Kingma and Ba 2015, Algorithm 1, with PyTorch's ``weight_decay`` as an L2 term
added to the gradient) in one kernel per tensor: one optimiser step of the COCO-scale decoder
(22 M parameters, after a real backward) takes ~27 ms instead of ~115 ms on one CPU core. The
whole training pass is about 4 % faster (median of 30 alternating rounds on one core, 26 of them
faster: ``scripts/benchmark.py --ab loop_adam``, BENCHMARKS.md); three-repeat runs could not
tell the two apart. The results agree to float rounding (tests/lit/test_optim.py).

Fused Adam unscales gradients inside its step, so Lightning cannot clip the gradients of a run
with a gradient scaler (``16-mixed`` on CUDA): there the loop is used. Without a scaler
(``bf16-mixed``) the fused kernel stays, and the training modules clip its gradients themselves
(:meth:`captioner.lit.base.CaptionerModule.configure_gradient_clipping`), which Lightning's
mixed-precision plugin would refuse.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

import lightning as L
import torch

log = logging.getLogger(__name__)

#: devices with a fused Adam kernel that the training modules use
FUSED_DEVICES = ("cpu", "cuda")


def rmsprop(params: Iterable[torch.nn.Parameter] | list[dict[str, Any]], lr: float,
            weight_decay: float = 0.0) -> torch.optim.RMSprop:
    """``torch.optim.RMSprop`` as the authors' RMSProp (see the module docstring): decay 0.95,
    momentum 0.9, centred, ``eps`` 1e-4. arctic-captions used ``lr`` 1e-4 with it."""
    return torch.optim.RMSprop(list(params), lr=lr, alpha=0.95, eps=1e-4, momentum=0.9,
                               centered=True, weight_decay=weight_decay)


def adam(params: Iterable[torch.nn.Parameter] | list[dict[str, Any]], lr: float,
         weight_decay: float = 0.0, fused: bool = True,
         trainer: L.Trainer | None = None) -> torch.optim.Adam:
    """``torch.optim.Adam`` over ``params`` (parameters or parameter groups).

    Args:
        fused: use the fused kernel when every parameter is a floating point tensor on a
            device in :data:`FUSED_DEVICES` and ``trainer`` (if given) scales no gradients;
            ``False``: PyTorch's default per-tensor loop.
        trainer: the Lightning trainer that will step the optimiser.
    """
    groups = list(params)
    tensors = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
    if fused and scaler is not None:
        log.info("gradient scaler in use: Adam runs its per-tensor loop (Lightning cannot clip "
                 "gradients of a fused optimiser under a scaler)")
    use_fused = (fused and scaler is None and len(tensors) > 0
                 and all(p.is_floating_point() and p.device.type in FUSED_DEVICES
                         for p in tensors))
    return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay,
                            fused=True if use_fused else None)
