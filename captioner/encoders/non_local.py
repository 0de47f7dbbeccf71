"""Non-local block stage (Wang et al., "Non-local Neural Networks", CVPR 2018).

A non-local operation computes the response at a position as a weighted sum of the features at
*all* positions (space, time or space-time), a self-attention over the feature map (Section 3.1,
Eq. 1)::

    y_i = (1 / C(x)) sum_j f(x_i, x_j) g(x_j)

and the non-local *block* (Section 3.3, Eq. 6) wraps it in a residual connection::

    z_i = W_z y_i + x_i

``g``, ``theta``, ``phi`` and ``W_z`` are 1x1 (x1) convolutions; ``g``, ``theta``, ``phi`` map
``C`` channels to the bottleneck ``C_b = C // reduction`` (half by default) and ``W_z`` maps
back to ``C``. Pairwise functions (Section 3.2)::

    gaussian           f = exp(x_i^T x_j),                 C(x) = sum_j f   (softmax over j)
    embedded_gaussian  f = exp(theta(x_i)^T phi(x_j)),     C(x) = sum_j f   (softmax over j)
    dot_product        f = theta(x_i)^T phi(x_j),          C(x) = P_j
    concatenation      f = ReLU(w_f^T [theta(x_i); phi(x_j)]),  C(x) = P_j

where ``P_j`` is the number of positions ``j`` (after sub-sampling; ``P`` positions ``i``). With ``subsample`` a max-pool
follows ``phi`` and ``g`` (Section 3.3, "subsampling"): the attention is over ~1/4 of the
positions (spatial only for video, as in the paper's 3-D models). The concatenation's
``w_f^T [a; b] = w_1^T a + w_2^T b`` is evaluated for all pairs by broadcasting.

Identity at initialisation (Section 4.1): batch norm after ``W_z`` with its scale ``gamma``
initialised to zero (without batch norm, ``W_z`` itself is zero-initialised), so ``z = x`` and
the block can be inserted into a pretrained network.

The embeddings are linear maps, ``theta(x_i) = W_theta x_i``, ``phi(x_j) = W_phi x_j``,
``g(x_j) = W_g x_j`` (Section 3.2): 1x1 convolutions without bias, the default. The paper's
released code gives them biases; ``embedding_bias=True`` adds those that change the output
(zero-initialised), a larger family of functions:

* a bias ``b`` on ``theta`` adds ``b^T phi(x_j)``, which varies with ``j``: a learned prior over
  the attended positions, added for every pairwise function with ``theta``;
* under the softmax (``gaussian``, ``embedded_gaussian``) a bias on ``phi`` adds a constant over
  ``j`` and cancels, and a bias on ``g`` shifts ``y`` by a constant (the rows of ``f / C`` sum
  to 1) that ``W_z``'s bias or the batch norm's ``beta`` already supplies: neither gets one;
* without it (``dot_product``, ``concatenation``) the rows of ``f / C`` do not sum to 1, so
  biases on ``phi`` and ``g`` change ``y``: both get one.

So every parameter influences the output. ``W_z`` has a bias only without batch norm (whose
``beta`` is the shift).

The same implementation serves 1-D ``(B, C, P)`` sequences, 2-D ``(B, C, h, w)`` images and 3-D
``(B, C, F, h, w)`` videos of ``F`` frames: the ``P`` positions are the flattened trailing
dimensions ``*Z``. (``P``, ``Z`` and ``F`` are local to this module: the package's ``N`` is the
LSTM size and ``S`` the source length.)
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from captioner.encoders.stages import EncoderStage

Pairwise = Literal["gaussian", "embedded_gaussian", "dot_product", "concatenation"]
PAIRWISE: tuple[str, ...] = ("gaussian", "embedded_gaussian", "dot_product", "concatenation")

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_POOL = {1: (nn.MaxPool1d, 2), 2: (nn.MaxPool2d, 2), 3: (nn.MaxPool3d, (1, 2, 2))}


class NonLocalBlock(EncoderStage):
    """Non-local block ``z = W_z y + x`` (Wang et al. 2018, Eq. 1 and 6; see the module docstring).

    Maps ``(B, C, *Z)`` to the same shape, with ``Z`` one to three position dimensions
    (``dims``); ``P = prod(Z)`` positions attend to ``P_j`` positions (``P_j = P`` unless
    ``subsample``).

    Args:
        where: ``"output"``, a backbone block name (e.g. ``"layer3"``) or ``"input"``.
        pairwise: ``gaussian``, ``embedded_gaussian``, ``dot_product`` or ``concatenation``.
        reduction: bottleneck ``C_b = max(1, C // reduction)`` (the paper halves: ``2``).
        subsample: max-pool ``phi`` and ``g`` by 2 on each spatial dimension.
        dims: number of position dimensions: 1 (sequence), 2 (image), 3 (video ``F x h x w``).
        use_bn: batch norm after ``W_z`` (zero ``gamma``); otherwise ``W_z`` is zero-initialised.
        embedding_bias: biases on ``theta``, ``phi`` and ``g`` where they change the output, as
            in the released code (module docstring); the paper's maps have none.
        scale: (Embedded) Gaussian: divide the logits ``theta(x_i)^T phi(x_j)`` by
            ``sqrt(C_q)`` (``C_q`` = ``C_b``, or ``C`` for the Gaussian) before the softmax, as the
            released code can (``use_scale``) and scaled dot-product attention does; Eq. 2-3
            have no scale (the default). It keeps the logits of wide bottlenecks in range
            under 16-bit precision.
        in_channels: ``C``; build at once (direct use). ``ImageEncoder`` builds stages itself.
    """

    def __init__(
        self,
        where: str = "output",
        pairwise: Pairwise = "embedded_gaussian",
        reduction: int = 2,
        subsample: bool = False,
        dims: Literal[1, 2, 3] = 2,
        use_bn: bool = True,
        embedding_bias: bool = False,
        scale: bool = False,
        in_channels: int | None = None,
    ) -> None:
        super().__init__(where, in_channels)
        if pairwise not in PAIRWISE:
            raise ValueError(
                f"unknown pairwise function {pairwise!r}; valid: {', '.join(PAIRWISE)}")
        if dims not in _CONV:
            raise ValueError(f"dims must be 1, 2 or 3, got {dims}")
        if reduction < 1:
            raise ValueError(f"reduction must be >= 1, got {reduction}")
        self.pairwise = pairwise
        self.reduction = reduction
        self.subsample = subsample
        self.dims = dims
        self.use_bn = use_bn
        self.embedding_bias = embedding_bias
        if scale and pairwise not in ("gaussian", "embedded_gaussian"):
            raise ValueError(f"scale applies to the softmax of the (embedded) Gaussian, not to "
                             f"{pairwise} (normalised by C(x) = P_j)")
        self.scale = scale
        self._build_pending()

    def _build(self, in_channels: int) -> int:
        conv = _CONV[self.dims]
        inner = max(1, in_channels // self.reduction)
        self.inner_channels = inner
        embed = self.pairwise != "gaussian"  # the Gaussian uses x itself
        bias = self.embedding_bias
        softmax = self.pairwise in ("gaussian", "embedded_gaussian")  # phi's bias would cancel
        self.theta = conv(in_channels, inner, 1, bias=bias) if embed else None
        self.phi = conv(in_channels, inner, 1, bias=bias and not softmax) if embed else None
        self.g = conv(in_channels, inner, 1, bias=bias and not softmax)
        for layer in (self.theta, self.phi, self.g):
            if layer is not None and layer.bias is not None:
                nn.init.zeros_(layer.bias)  # as the released code
        if self.pairwise == "concatenation":
            self.w_f = nn.Linear(2 * inner, 1, bias=False)  # w_f^T [theta_i; phi_j]
        if self.subsample:
            pool, kernel = _POOL[self.dims]
            self.pool = pool(kernel, ceil_mode=True)  # ceil: odd and size-1 dims keep >= 1
        self.w_z = conv(inner, in_channels, 1, bias=not self.use_bn)
        if self.use_bn:
            self.bn = _BN[self.dims](in_channels)
            nn.init.zeros_(self.bn.weight)  # gamma = 0: the block starts as the identity
            nn.init.zeros_(self.bn.bias)
        else:
            nn.init.zeros_(self.w_z.weight)
            nn.init.zeros_(self.w_z.bias)
        return in_channels

    def _sub(self, t: torch.Tensor) -> torch.Tensor:
        return self.pool(t) if self.subsample else t

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised pairwise weights ``f(x_i, x_j) / C(x)``.

        Args:
            x: ``(B, C, *Z)``.

        Returns:
            ``(B, P, P_j)``; rows sum to 1 for the (embedded) Gaussian.
        """
        self._check_built()
        query = x if self.theta is None else self.theta(x)  # (B, C_q, *Z)
        key = self._sub(x if self.phi is None else self.phi(x))  # (B, C_q, *Z_j)
        q = query.flatten(2).transpose(1, 2)  # (B, P, C_q)
        k = key.flatten(2)  # (B, C_q, P_j)
        n_j = k.shape[-1]
        if self.pairwise in ("gaussian", "embedded_gaussian"):
            if self.scale:  # the released code's option: logits / sqrt(C_q), scaled before
                q = q * q.shape[-1] ** -0.5  # the product so that 16-bit q @ k stays in range
            return F.softmax(q @ k, dim=-1)  # (B, P, P_j)
        if self.pairwise == "dot_product":
            return (q @ k) / n_j  # (B, P, P_j)
        w_theta, w_phi = self.w_f.weight[0].split(self.inner_channels)  # (C_b,), (C_b,)
        scores = (q @ w_theta).unsqueeze(2) + (w_phi @ k).unsqueeze(1)  # (B, P, P_j)
        return F.relu(scores) / n_j

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *Z)`` -> ``z`` ``(B, C, *Z)``."""
        self._check_built()
        if x.dim() != 2 + self.dims or x.shape[1] != self.in_channels:
            raise ValueError(
                f"NonLocalBlock(dims={self.dims}) built for {self.in_channels} channels expects "
                f"(B, {self.in_channels}, {', '.join('Z' * self.dims)}), got {tuple(x.shape)}"
            )
        b, spatial = x.shape[0], x.shape[2:]
        f = self.attention(x)  # (B, P, P_j)
        v = self._sub(self.g(x)).flatten(2)  # (B, C_b, P_j)
        # y^T = g^T f^T: computed channels-first so y keeps x's memory layout (a transposed
        # layout would make the next convolutions pick other kernels: not bit-identical)
        y = (v @ f.transpose(1, 2)).view(b, self.inner_channels, *spatial)  # (B, C_b, *Z)
        wy = self.w_z(y)  # (B, C, *Z)
        if self.use_bn:
            wy = self.bn(wy)
        return wy + x

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, pairwise={self.pairwise!r}, reduction={self.reduction}, "
                f"subsample={self.subsample}, dims={self.dims}, use_bn={self.use_bn}, "
                f"embedding_bias={self.embedding_bias}, scale={self.scale}")


__all__ = ["PAIRWISE", "NonLocalBlock"]
