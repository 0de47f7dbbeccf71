"""Spatial Transformer stage (Jaderberg et al., "Spatial Transformer Networks", NeurIPS 2015).

A spatial transformer warps its input with a transformation predicted from the input itself, so a
network can learn to undo rotation, scale and translation, or to attend to (crop and zoom into) a
region. Its three differentiable parts (Section 3):

1. *Localisation network* (Section 3.1): ``theta = f_loc(U)`` regresses the parameters of a
   transformation family from the input feature map ``U`` of shape ``(B, C, h, w)``.
2. *Grid generator* (Section 3.2): for each output pixel ``(x^t_i, y^t_i)`` of the regular grid
   ``G`` (normalised coordinates in ``[-1, 1]``, ``x`` across the width, ``y`` down the height),
   the source coordinates are (Eq. 1)::

       (x^s_i, y^s_i)^T = A_theta (x^t_i, y^t_i, 1)^T,   A_theta in R^{2 x 3}

3. *Sampler* (Section 3.3): bilinear interpolation of ``U`` at the source coordinates (Eq. 5)::

       V^c_i = sum_n sum_m U^c_nm max(0, 1 - |u_i - m|) max(0, 1 - |v_i - n|)

   where Eq. 5's kernel reads the source point in pixel units: ``u_i = ((x^s_i + 1) w - 1) / 2``
   and ``v_i = ((y^s_i + 1) h - 1) / 2`` (``m``, ``n`` the pixel columns and rows)

   (``F.affine_grid`` + ``F.grid_sample`` with ``align_corners=False``; zero padding outside;
   under deterministic algorithms :func:`captioner.encoders.sampler.bilinear_sample`, the same
   sum with a deterministic backward).

Transformation families (the paper's constrained transformations, Sections 3.2 and 4.1)::

    affine       (6)  A = [a, b, tx; c, d, ty]
    attention    (3)  A = [s, 0, tx; 0, s, ty]                        isotropic scale + translation
    similarity   (4)  A = [s cos r, -s sin r, tx; s sin r, s cos r, ty]
    translation  (2)  A = [1, 0, tx; 0, 1, ty]

On a map that is not square (``h != w``) the normalised coordinates stretch the axes by
``w / 2`` and ``h / 2`` pixels, so a rotation ``r`` of ``similarity`` (or ``affine``) is rigid
only on square maps, as in the paper's experiments: in pixels it is rotated and sheared
(:func:`theta_parameters` reads ``r`` in normalised units too). Captioning inputs are square
by default (``image_size: S``).

``A`` maps *output* coordinates to *input* coordinates, so ``s < 1`` zooms in (the output shows
a region of side ``s`` of the input) and ``tx > 0`` moves the content left by ``tx * w / 2``
pixels. The last localisation layer has zero weights and the identity parameters as its bias,
so the stage starts as the exact identity (a no-op when inserted into a pretrained network).

Shapes use the package symbols with ``C`` channels and ``h x w`` the map at the stage's place.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from captioner.encoders.pooling import GridPool
from captioner.encoders.sampler import bilinear_sample
from captioner.encoders.stages import EncoderStage

Transform = Literal["affine", "attention", "similarity", "translation"]

NUM_PARAMS: dict[str, int] = {"affine": 6, "attention": 3, "similarity": 4, "translation": 2}
"""Number of regressed parameters of each transformation family."""

IDENTITY_PARAMS: dict[str, tuple[float, ...]] = {
    "affine": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),  # a, b, tx, c, d, ty (row-major A)
    "attention": (1.0, 0.0, 0.0),  # s, tx, ty
    "similarity": (1.0, 0.0, 0.0, 0.0),  # s, r (radians), tx, ty
    "translation": (0.0, 0.0),  # tx, ty
}
"""Parameters of the identity transform in each family (the localisation net's initial output)."""

_PARAM_NAMES: dict[str, tuple[str, ...]] = {
    "affine": ("a", "b", "tx", "c", "d", "ty"),
    "attention": ("s", "tx", "ty"),
    "similarity": ("s", "r", "tx", "ty"),
    "translation": ("tx", "ty"),
}


def params_to_theta(params: torch.Tensor, transform: Transform) -> torch.Tensor:
    """Map a family's parameters to the affine matrix ``A_theta``.

    Args:
        params: ``(..., P)`` with ``P = NUM_PARAMS[transform]``, ordered as in
            :data:`IDENTITY_PARAMS`.
        transform: the transformation family.

    Returns:
        ``(..., 2, 3)`` matrices mapping output to input normalised coordinates.
    """
    if params.shape[-1] != NUM_PARAMS[transform]:
        raise ValueError(
            f"{transform} takes {NUM_PARAMS[transform]} parameters, got {params.shape[-1]}"
        )
    zero, one = torch.zeros_like(params[..., 0]), torch.ones_like(params[..., 0])
    if transform == "affine":
        return params.unflatten(-1, (2, 3))
    if transform == "attention":
        s, tx, ty = params.unbind(-1)
        rows = [s, zero, tx, zero, s, ty]
    elif transform == "similarity":
        s, r, tx, ty = params.unbind(-1)
        cos, sin = s * torch.cos(r), s * torch.sin(r)
        rows = [cos, -sin, tx, sin, cos, ty]
    elif transform == "translation":
        tx, ty = params.unbind(-1)
        rows = [one, zero, tx, zero, one, ty]
    else:
        raise ValueError(f"unknown transform {transform!r}; valid: {', '.join(NUM_PARAMS)}")
    return torch.stack(rows, -1).unflatten(-1, (2, 3))  # (..., 2, 3)


def compose_thetas(theta: torch.Tensor) -> torch.Tensor:
    """The single transform equal to warping with ``theta[:, 0]``, then ``theta[:, 1]``, ...

    Warping ``U`` with ``A_1`` and the result with ``A_2`` samples ``U`` at ``A_1 [A_2 p; 1]``,
    so the composite is the homogeneous product ``A_1 A_2 ... A_n``.

    Args:
        theta: ``(B, n, 2, 3)`` transforms in the order they are applied.

    Returns:
        ``(B, 2, 3)``.
    """
    bottom = theta.new_tensor([0.0, 0.0, 1.0]).expand(*theta.shape[:-2], 1, 3)
    homogeneous = torch.cat([theta, bottom], -2)  # (B, n, 3, 3)
    total = homogeneous[:, 0]
    for k in range(1, theta.shape[1]):
        total = total @ homogeneous[:, k]
    return total[:, :2]


def warp(x: torch.Tensor, theta: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Grid generator + bilinear sampler: ``V = U(A_theta G)``.

    The grid and the sampling are computed in float64 and the result cast back: in float32 the
    normalised coordinates are off by about ``w * 6e-8`` pixels, so an identity warp of a
    224-pixel image would differ from its input by ~3e-5; in float64 it is exact.

    Args:
        x: ``U``, ``(B, C, h, w)``.
        theta: ``A_theta``, ``(B, 2, 3)``.
        size: output ``(h', w')``; default ``(h, w)``.

    Returns:
        ``V``, ``(B, C, h', w')``.
    """
    b, c, h, w = x.shape
    h_out, w_out = size or (h, w)
    wide = precise_dtype(x.device)
    grid = F.affine_grid(theta.to(wide), [b, c, h_out, w_out], align_corners=False)
    # grid: (B, h', w', 2) source (x, y) of each output pixel
    if torch.are_deterministic_algorithms_enabled() and torch.is_grad_enabled():
        out = bilinear_sample(x.to(wide), grid)  # (B, C, h', w'); grid_sample's CUDA backward
        return out.to(x.dtype)  # has no deterministic implementation
    out = F.grid_sample(x.to(wide), grid, mode="bilinear", padding_mode="zeros",
                        align_corners=False)
    return out.to(x.dtype)


def precise_dtype(device: torch.device) -> torch.dtype:
    """float64 where the device has it (the sampling grid's coordinates keep their last bits
    on large maps), float32 on Apple's MPS, which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


class HeatmapLocalisation(nn.Module):
    r"""Localisation network that *points*: the translation is the expected position under a
    predicted heat map (a spatial soft-argmax, the integral regression of Sun et al., "Integral
    Human Pose Regression", ECCV 2018); the other parameters are regressed from pooled features.

    With features ``F = trunk(U)`` ``(B, c, h_f, w_f)`` (two 3x3 conv + leaky ReLU layers, a
    2x2 max-pool between), one heat map per transformer ``k``::

        p^k_ij = softmax_ij(v_k^T F_{c(i, j)} + b_k),   t^k_x = sum_ij p^k_ij x_j,   t^k_y = sum_ij p^k_ij y_i

    over the pixels ``(i, j)`` of the input ``U`` ``(h, w)``, each given the logit of the feature
    cell ``c(i, j)`` that pools it (so a cell is placed where its pixels are, also when the 2x2
    pool's last cell covers a single row or column of an odd-sized map), with
    ``x_j = (2 j + 1) / w - 1`` and ``y_i = (2 i + 1) / h - 1`` the pixel centres in the
    sampler's normalised coordinates (``align_corners=False``), and the remaining parameters
    (scale, rotation or the linear part of ``A``) ``W mean_ij F_ij + b``. ``v_k, b_k, W`` start
    at zero and ``b`` at the identity's parameters, so the map starts uniform, ``t = 0`` and the
    transform is the identity. Because the heat map comes from convolutions, a detector that
    learns to fire on the object at one place fires on it everywhere: the translation need not
    be learnt position by position by a fully connected layer, as with ``conv``/``fc``.

    Args:
        in_channels: ``C``.
        hidden: ``c``, channels of the trunk.
        transform: the family; it must have a translation (all four have).
        count: ``n``, transformers predicted at once.
        negative_slope: of the trunk's leaky ReLUs. With plain ReLUs (``0``) and Adam at
            3e-3, one of two distorted-shapes runs lost the whole trunk within the first
            epoch (every unit off, so the transform stayed the identity; a likely cause is
            that the scale regression reads the trunk's mean, so moving every feature one way
            changes ``s``). ``0.1`` keeps a gradient through every unit
            (docs/stn_experiment.md).

    Shapes: ``U`` ``(B, C, h, w)`` -> ``(B, n P)``, parameters ordered as in
    :data:`IDENTITY_PARAMS`.
    """

    def __init__(self, in_channels: int, hidden: int, transform: Transform, count: int,
                 negative_slope: float = 0.1) -> None:
        super().__init__()
        self.transform = transform
        self.trunk = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1),
            nn.LeakyReLU(negative_slope, inplace=True),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.LeakyReLU(negative_slope, inplace=True),
        )
        self.heat = nn.Conv2d(hidden, count, 1)  # v_k, b_k
        nn.init.zeros_(self.heat.weight)
        nn.init.zeros_(self.heat.bias)
        names = _PARAM_NAMES[transform]
        self._translation = [names.index("tx"), names.index("ty")]
        self._others = [i for i in range(len(names)) if i not in self._translation]
        self.regress: nn.Linear | None = None  # W, b (none for "translation")
        if self._others:
            self.regress = nn.Linear(hidden, count * len(self._others))
            nn.init.zeros_(self.regress.weight)
            with torch.no_grad():
                identity = torch.tensor(IDENTITY_PARAMS[transform])
                self.regress.bias.copy_(identity[self._others].repeat(count))

    def heatmap(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``p`` ``(B, n, h, w)`` over the input's pixels (each map sums to 1; a feature cell's
        logit spread over the pixels it pools) and the features' mean ``(B, c)``."""
        features = self.trunk(x)  # (B, c, h_f, w_f)
        logits = self.heat(features)  # (B, n, h_f, w_f)
        (h, w), (h_f, w_f) = x.shape[-2:], logits.shape[-2:]
        rows = torch.arange(h, device=x.device) // -(-h // h_f)  # (h,) the cell pooling row i
        cols = torch.arange(w, device=x.device) // -(-w // w_f)  # (w,)
        pixel_logits = logits[:, :, rows][:, :, :, cols]  # (B, n, h, w)
        p = torch.softmax(pixel_logits.flatten(2), -1).view_as(pixel_logits)  # (B, n, h, w)
        return p, features.mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, pooled = self.heatmap(x)  # (B, n, h, w), (B, c)
        b, n, h, w = p.shape
        # marginals and sums in float64 (float32 on MPS), so that a uniform map gives t = 0 to
        # ~1e-17 (the exact identity; float32 column sums differ in their last bit on large maps)
        wide = precise_dtype(x.device)
        pd = p.to(wide)
        xs = (2 * torch.arange(w, device=x.device, dtype=wide) + 1) / w - 1  # (w,)
        ys = (2 * torch.arange(h, device=x.device, dtype=wide) + 1) / h - 1  # (h,)
        tx = (pd.sum(2) * xs).sum(-1).to(p.dtype)  # (B, n)
        ty = (pd.sum(3) * ys).sum(-1).to(p.dtype)  # (B, n)
        others = None if self.regress is None else self.regress(pooled).view(b, n, -1)
        # under CUDA autocast the softmax is float32 while the linear layer is float16
        dtype = p.dtype if others is None else torch.promote_types(p.dtype, others.dtype)
        params = torch.empty(b, n, len(_PARAM_NAMES[self.transform]), dtype=dtype,
                             device=x.device)  # (B, n, P)
        params[..., self._translation] = torch.stack([tx, ty], -1).to(dtype)
        if others is not None:
            params[..., self._others] = others.to(dtype)  # (B, n, P - 2)
        return params.flatten(1)  # (B, n P)


def _localisation_net(
    kind: str, in_channels: int, hidden: int, pool: int, transform: Transform, count: int
) -> nn.Module:
    """``f_loc``: ``(B, C, h, w) -> (B, count * P)``, initialised to the identity parameters.

    ``conv``: two 3x3 conv + ReLU layers (a 2x2 max-pool between), adaptive average pooling to
    ``pool x pool`` (so any ``h x w`` works, even 1 x 1), one hidden fully connected layer.
    ``fc``: adaptive average pooling of the input to ``pool x pool`` and two hidden fully
    connected layers (the paper's FCN localisation, on a fixed-size view of the input).
    ``heatmap``: :class:`HeatmapLocalisation` (``pool`` unused).
    """
    if kind == "heatmap":
        return HeatmapLocalisation(in_channels, hidden, transform, count)
    if kind == "conv":
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, hidden, 3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(inplace=True),
            GridPool(pool), nn.Flatten(),
            nn.Linear(hidden * pool * pool, hidden), nn.ReLU(inplace=True),
        ]
    elif kind == "fc":
        layers = [
            GridPool(pool), nn.Flatten(),
            nn.Linear(in_channels * pool * pool, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
        ]
    else:
        raise ValueError(f"unknown localisation {kind!r}; valid: conv, fc")
    regress = nn.Linear(hidden, count * NUM_PARAMS[transform])
    nn.init.zeros_(regress.weight)
    with torch.no_grad():
        regress.bias.copy_(torch.tensor(IDENTITY_PARAMS[transform] * count))
    return nn.Sequential(*layers, regress)


class SpatialTransformer(EncoderStage):
    """Spatial transformer stage (Jaderberg et al. 2015, Section 3; see the module docstring).

    ``num_transformers = n > 1`` runs several transformers (Section 4.3, the bird experiments):

    * ``combine="concat"``: one localisation network predicts ``n`` transforms of the same input
      and the ``n`` warped maps are concatenated on channels, ``C' = n * C``. Only allowed at
      ``"output"`` (elsewhere the next backbone block expects ``C`` channels).
    * ``combine="sequence"``: ``n`` transformers applied in turn, each with its own localisation
      network looking at the previous one's output (``C' = C``); the composite transform is
      :func:`compose_thetas` of :attr:`last_theta`.

    Args:
        where: ``"input"`` (the normalised image), a backbone block name or ``"output"``.
        transform: transformation family: ``affine``, ``attention``, ``similarity`` or
            ``translation``.
        localization: localisation network: ``conv`` (small conv net), ``fc`` (fully
            connected layers) or ``heatmap`` (conv net whose translation is the expected
            position under a predicted heat map: :class:`HeatmapLocalisation`).
        loc_hidden: channels / units of the localisation network's hidden layers.
        loc_pool: side of the adaptive average pooling in the localisation network.
        output_size: ``(h', w')`` (or one int for a square) of the warped output; ``None`` keeps
            ``h x w``. With ``attention`` this is the paper's crop-and-zoom.
        num_transformers: ``n``, transformers in parallel or in sequence.
        combine: ``concat`` or ``sequence`` (see above).
        in_channels: ``C``; build at once (direct use). ``ImageEncoder`` builds stages itself.

    Attributes:
        last_theta: ``(B, n, 2, 3)`` matrices of the last forward pass (detached), for
            visualisation (:func:`captioner.visualize.plot_stn`).
    """

    def __init__(
        self,
        where: str = "input",
        transform: Transform = "affine",
        localization: Literal["conv", "fc", "heatmap"] = "conv",
        loc_hidden: int = 32,
        loc_pool: int = 8,
        output_size: int | tuple[int, int] | None = None,
        num_transformers: int = 1,
        combine: Literal["concat", "sequence"] = "concat",
        in_channels: int | None = None,
    ) -> None:
        super().__init__(where, in_channels)
        if transform not in NUM_PARAMS:
            raise ValueError(f"unknown transform {transform!r}; valid: {', '.join(NUM_PARAMS)}")
        if localization not in ("conv", "fc", "heatmap"):
            raise ValueError(f"unknown localization {localization!r}; valid: conv, fc, heatmap")
        if combine not in ("concat", "sequence"):
            raise ValueError(f"unknown combine {combine!r}; valid: concat, sequence")
        if num_transformers < 1:
            raise ValueError(f"num_transformers must be >= 1, got {num_transformers}")
        if loc_hidden < 1 or loc_pool < 1:  # loc_pool 0 would ignore the input entirely
            raise ValueError(f"loc_hidden and loc_pool must be >= 1, got {loc_hidden} and "
                             f"{loc_pool}")
        if combine == "concat" and num_transformers > 1 and where != "output":
            raise ValueError(
                f"{num_transformers} transformers concatenated on channels give "
                f"{num_transformers} x C channels, which only a stage at 'output' may produce "
                f"(this one is at {where!r}); use combine='sequence' or where='output'"
            )
        self.transform = transform
        self.localization = localization
        self.loc_hidden = loc_hidden
        self.loc_pool = loc_pool
        if isinstance(output_size, int):
            output_size = (output_size, output_size)
        self.output_size: tuple[int, int] | None = tuple(output_size) if output_size else None
        self.num_transformers = num_transformers
        self.combine = combine
        self.last_theta: torch.Tensor | None = None
        self._build_pending()

    def _build(self, in_channels: int) -> int:
        n = self.num_transformers
        nets, per_net = (1, n) if self.combine == "concat" else (n, 1)
        self.localisation = nn.ModuleList(
            _localisation_net(self.localization, in_channels, self.loc_hidden, self.loc_pool,
                              self.transform, per_net)
            for _ in range(nets)
        )
        return in_channels * n if self.combine == "concat" else in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Warp ``U`` ``(B, C, h, w)`` -> ``V`` ``(B, C', h', w')``; sets :attr:`last_theta`."""
        self._check_built()
        b = x.shape[0]
        p = NUM_PARAMS[self.transform]
        if self.combine == "concat":
            params = self.localisation[0](x).view(b, self.num_transformers, p)  # (B, n, P)
            theta = params_to_theta(params, self.transform)  # (B, n, 2, 3)
            out = torch.cat([warp(x, theta[:, k], self.output_size)
                             for k in range(self.num_transformers)], 1)  # (B, n * C, h', w')
        else:
            thetas, out = [], x
            for net in self.localisation:
                step = params_to_theta(net(out), self.transform)  # (B, 2, 3)
                out = warp(out, step, self.output_size)  # (B, C, h', w')
                thetas.append(step)
            theta = torch.stack(thetas, 1)  # (B, n, 2, 3)
        self.last_theta = theta.detach()
        return out

    def input_theta(self) -> torch.Tensor:
        """Transforms from the output grid to this stage's input, ``(B, n', 2, 3)``.

        ``n' = n`` for ``concat``; ``n' = 1`` (the composite) for ``sequence``.
        """
        if self.last_theta is None:
            raise RuntimeError("no forward pass yet: last_theta is empty")
        if self.combine == "sequence":
            return compose_thetas(self.last_theta).unsqueeze(1)
        return self.last_theta

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, transform={self.transform!r}, "
                f"localization={self.localization!r}, output_size={self.output_size}, "
                f"num_transformers={self.num_transformers}, combine={self.combine!r}")


def theta_parameters(theta: torch.Tensor) -> dict[str, torch.Tensor]:
    """Read scale, rotation and translation off affine matrices (for reports), in normalised
    coordinates (on a non-square map the pixel rotation differs: module docstring).

    Args:
        theta: ``(..., 2, 3)``.

    Returns:
        ``{"scale": sqrt|det A|, "rotation_deg": atan2(A_10 - A_01, A_00 + A_11) in degrees,
        "tx": A_02, "ty": A_12}``, each of shape ``(...)``.
    """
    a = theta[..., :2, :2]
    det = a[..., 0, 0] * a[..., 1, 1] - a[..., 0, 1] * a[..., 1, 0]
    angle = torch.atan2(a[..., 1, 0] - a[..., 0, 1], a[..., 0, 0] + a[..., 1, 1])
    return {"scale": det.abs().sqrt(), "rotation_deg": angle * 180.0 / math.pi,
            "tx": theta[..., 0, 2], "ty": theta[..., 1, 2]}


__all__ = [
    "IDENTITY_PARAMS",
    "NUM_PARAMS",
    "SpatialTransformer",
    "compose_thetas",
    "params_to_theta",
    "theta_parameters",
    "warp",
]
