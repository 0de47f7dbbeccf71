r"""Where each cell of the annotation grid is centred in the image, measured from the network.

The paper's figures (Xu et al. 2015, Sec. 5.4) read cell ``(r, c)`` of an ``H x W`` grid as a
uniform tile of the image. A convolutional feature map is laid on its input less simply: with
padding and striding, feature ``j`` of a backbone's output is centred on input coordinate

    u_j = s j + o          (pixel ``i`` spans ``[i, i + 1)``)

for a stride ``s`` and an offset ``o`` fixed by every layer's kernel, stride and padding. VGG and
the shapes CNN (``3 x 3`` convolutions padded by one, ``2 x 2`` pooling) have ``o = s / 2``: the
uniform tiles. ResNet's padded stride-2 layers give ``o = 0.5`` (feature ``j`` on pixel
``32 j``, half a cell, 15.5 pixels, left of and above its tile's centre), EfficientNet-Lite's
TensorFlow "same" padding ``o = 31.5`` (15.5 pixels right of and below it, at 224 x 224).

The encoder then pools the ``h'`` features of an axis to ``H`` cells
(:class:`~captioner.encoders.pooling.GridPool`): cell ``i`` takes the span
``[i h' / H, (i + 1) h' / H)`` of the map, in feature units where feature ``j`` spans
``[j, j + 1)``, and the backbone lays feature coordinate ``f`` on input coordinate
``s (f - 1/2) + o``. Cell ``i`` of an ``S``-pixel input therefore spans

    [s (i h' / H - 1/2) + o,  s ((i + 1) h' / H - 1/2) + o)           (:func:`cell_edges`)

the uniform tiles ``[i S / H, (i + 1) S / H)`` scaled by ``s h' / S`` (1 where the map covers
the input exactly) and shifted by ``o - s / 2`` (ResNets: 15.5 pixels up and left; cells then
reach partly outside the image). Adaptive pooling averages whole features, so where ``H`` does
not divide ``h'`` a cell's features are centred up to half a feature from its span's centre;
where ``H > h'`` neighbouring cells repeat one feature and split its span between them.

``s`` and ``o`` are *measured* (:func:`axis_geometry`), not tabulated: in a copy of the backbone
made linear with positive weights (activations removed, max-pooling replaced by average pooling
of the same window, every weight and normalisation scale taken in absolute value, no biases, in
float64), fed a positive input so that every value stays positive (an activation or a gate
called as a function then passes the gradient on: a gate's global mean reaches every pixel),
the input pixels feature ``j`` depends on are exactly the support of its gradient,
``[s j + o - R/2, s j + o + R/2)`` for a receptive field of ``R`` pixels; two neighbouring
features unclipped by the border give ``s`` and ``o``. This works for any backbone made of
convolutions and local pooling (the registered ones and builders of one's own); a network with
a global operation (squeeze-and-excitation, self-attention) in its body depends on every pixel,
and :func:`axis_geometry` returns ``None``.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn


ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus)
"""Element-wise modules a linearised copy drops (classes named ``*Swish`` are dropped too)."""

GROWTH = 128
"""The probe input grows by multiples of this (keeping the parity of the first seven
halvings, which "same" padding depends on) until a feature's receptive field fits in it."""

MAX_PROBE = 4096
"""The largest probe side tried (ResNet-152's receptive field is about 1,200 pixels)."""


def linearised(body: nn.Module, thin: bool = True) -> nn.Module:
    """A float64 copy of ``body`` whose output is linear in its input with positive weights
    (module docstring): the support of a feature's gradient is then its whole receptive
    field, without cancellations or underflow.

    With ``thin`` every convolution keeps its kernel size, stride, padding and dilation but
    maps one channel to one (weights of ones; normalisation layers dropped), which is a
    thousand times cheaper and reaches the same pixels; it takes ``(1, 1, h, w)`` inputs and
    fits networks whose layers are convolutions, pooling and additions (a channel
    concatenation or a linear layer in the body does not: use ``thin=False``).
    """
    memo: dict[int, torch.Tensor] = {}
    if thin:  # the weights are replaced or dropped: not copied (ResNet-101: 170 MB)
        memo.update({id(t): nn.Parameter(torch.empty(0), requires_grad=False)
                     for t in body.parameters()})
        memo.update({id(t): torch.empty(0) for t in body.buffers()})
    probe = nn.Sequential(copy.deepcopy(body, memo)).to("cpu", torch.float64).eval()  # the
    # root layer replaced too; on the CPU whatever the body's device (the probe's input is)
    for module in probe.modules():
        for name, child in list(module.named_children()):
            if isinstance(child, ACTIVATIONS) or type(child).__name__.endswith("Swish"):
                setattr(module, name, nn.Identity())
            elif isinstance(child, nn.MaxPool2d):
                setattr(module, name, nn.AvgPool2d(child.kernel_size, child.stride,
                                                   child.padding, child.ceil_mode))
            elif thin and isinstance(child, nn.modules.batchnorm._NormBase):
                setattr(module, name, nn.Identity())
    with torch.no_grad():
        for module in probe.modules():
            if thin and isinstance(module, nn.Conv2d):  # in place: subclasses keep forward
                module.in_channels = module.out_channels = module.groups = 1
                module.weight = nn.Parameter(torch.ones(1, 1, *module.kernel_size,
                                                        dtype=torch.float64))
                module.bias = None
                continue
            weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
            if isinstance(weight, torch.Tensor):
                weight.abs_()
            if isinstance(bias, torch.Tensor):
                bias.zero_()
            var = getattr(module, "running_var", None)
            if isinstance(var, torch.Tensor):
                var.abs_()
                module.running_mean.zero_()
    for p in probe.parameters():
        p.requires_grad_(False)
    probe.channels = 1 if thin else 3
    return probe


def _support(probe: nn.Module, side: int, other: int, axis: int,
             features: int) -> tuple[int, list[tuple[int, int]]]:
    """Output size ``n`` along ``axis`` and, for features ``j`` and ``j + 1`` of it with
    ``j = n // 2 - 1``, the first and last input pixel their gradients reach, for a probe input
    ``side`` long on ``axis`` (``(-1, -1)``: no such feature)."""
    shape = [1, probe.channels, other, other]
    shape[2 + axis] = side
    x = torch.ones(shape, dtype=torch.float64, requires_grad=True)  # positive everywhere
    y = probe(x)  # (1, C, h', w')
    n = y.shape[2 + axis]
    j = max(n // 2 - 1, 0)
    spans = []
    for k in (j, j + 1)[:features]:
        if k >= n:
            spans.append((-1, -1))
            continue
        (grad,) = torch.autograd.grad(y.select(2 + axis, k).sum(), x, retain_graph=True)
        reach = grad.abs().sum(dim=[d for d in range(4) if d != 2 + axis]) > 0  # (side,)
        where = torch.nonzero(reach).flatten()
        spans.append((int(where[0]), int(where[-1])) if len(where) else (-1, -1))
    return n, spans


def working_probe(body: nn.Module, size: tuple[int, int]) -> nn.Module:
    """:func:`linearised` ``body``: the thin copy, or the full one where the thin one does not
    run on a ``size`` input (channels concatenated, a linear or group-normalisation layer)."""
    probe = linearised(body)
    try:
        _support(probe, size[0], size[1], 0, 0)
    except (RuntimeError, ValueError):
        probe = linearised(body, thin=False)
    return probe


def axis_geometry(body: nn.Module, size: int, axis: int, other: int = 64,
                  probe: nn.Module | None = None) -> tuple[float, float] | None:
    """``(s, o)``: feature ``j`` of ``body``'s output along ``axis`` (0: rows, 1: columns), for
    inputs ``size`` pixels long on that axis, is centred on input coordinate ``s j + o``.

    Args:
        body: the backbone, ``(1, 3, h, w) -> (1, D, h', w')``.
        size: the input's side along ``axis`` (the probe keeps its residue modulo
            :data:`GROWTH`, so size-dependent "same" padding is measured as it is used).
        axis: ``0`` for rows (``y``), ``1`` for columns (``x``).
        other: the probe's side along the other axis.
        probe: :func:`linearised` ``body``, when already made (else a thin one, or a full
            one where the thin one does not run).

    Returns:
        ``(s, o)`` in input pixels, or ``None`` when no feature's receptive field fits in a
        probe of :data:`MAX_PROBE` pixels (a global operation in the body).
    """
    if probe is None:
        probe = working_probe(body, (size, other) if axis == 0 else (other, size))
    side, grow = size, GROWTH
    with torch.enable_grad():
        while side <= MAX_PROBE:
            n, ((a0, b0), (a1, b1)) = _support(probe, side, other, axis, 2)
            j = max(n // 2 - 1, 0)
            if min(a0, a1) > 0 and max(b0, b1) < side - 1:  # both receptive fields inside
                c0, c1 = (a0 + b0 + 1) / 2, (a1 + b1 + 1) / 2  # pixel i spans [i, i + 1)
                return c1 - c0, c0 - (c1 - c0) * j
            side += grow
            grow *= 2
    return None


def cell_edges(stride: float, offset: float, size: int, features: int, cells: int) -> np.ndarray:
    """``(cells + 1,)`` normalised boundaries (``-1`` to ``1`` across ``size`` input pixels) of the
    ``cells`` cells pooled from ``features`` features centred on ``stride j + offset``
    (module docstring)."""
    span = np.arange(cells + 1) * features / cells  # (cells + 1,) in feature units
    pixels = stride * (span - 0.5) + offset  # (cells + 1,) input coordinates
    return 2.0 * pixels / size - 1.0


def grid_cell_edges(body: nn.Module, body_input: tuple[int, int], pool_input: tuple[int, int],
                    grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Boundaries of the cells of an ``H x W`` grid pooled from ``body``'s output, laid on the
    body's input at their receptive fields' centres (module docstring).

    Args:
        body: the backbone.
        body_input: ``(h, w)`` of the body's input in pixels.
        pool_input: ``(h', w')`` of the map the grid is pooled from (the body's output).
        grid: ``(H, W)``.

    Returns:
        ``(ys (H + 1,), xs (W + 1,))`` normalised (``-1`` to ``1`` across the body's input).

    Raises:
        ValueError: the pooled map is not the body's output (a stage changed its size), or a
            receptive field does not fit in the largest probe (a global operation).
    """
    probe = working_probe(body, body_input)
    edges = []
    for axis in (0, 1):
        other = body_input[1 - axis]
        features = _support(probe, body_input[axis], other, axis, 0)[0]
        if features != pool_input[axis]:
            raise ValueError(f"the grid is pooled from a map of {pool_input[axis]} "
                             f"{'rows' if axis == 0 else 'columns'}, but the backbone gives "
                             f"{features}: a stage changed the map's size")
        geometry = axis_geometry(body, body_input[axis], axis, probe=probe)
        if geometry is None:
            raise ValueError(f"no receptive field of the backbone fits in {MAX_PROBE} pixels "
                             "(a global operation in its body?)")
        edges.append(cell_edges(*geometry, body_input[axis], features, grid[axis]))
    return edges[0], edges[1]
