r"""Closed-form :math:`W_2^2` between the moment-matched Gaussians of two weighted clouds.

With weighted means :math:`m_x, m_y` and (biased, weighted) covariances :math:`S_x, S_y`,

.. math::
    W_2^2 = \|m_x - m_y\|^2 + \operatorname{tr} S_x + \operatorname{tr} S_y
        - 2 \operatorname{tr}\big(S_x^{1/2} S_y S_x^{1/2}\big)^{1/2}

(the Bures metric). With :math:`S_x = P^\top P`, :math:`P = \operatorname{diag}(\sqrt a)(X - m_x)`
and likewise :math:`S_y = Q^\top Q`, the last trace is the nuclear norm :math:`\|P Q^\top\|_*` of an
``N x M`` matrix — so no ``D x D`` matrix square root is formed, it is cheap for few points in
high dimension, and its gradient stays finite for rank-deficient covariances (``N <= D``).
``covariance="diag"`` keeps only the variances: :math:`\|m_x - m_y\|^2 + \sum_d (\sigma_{x,d} -
\sigma_{y,d})^2`. It is a lower bound of the exact :math:`W_2^2` (a different, moment-only
distance).

Example:
    >>> import torch
    >>> x = torch.randn(3, 8, 2)
    >>> shifted = gaussian_wasserstein(x, x + torch.tensor([3.0, 4.0]))  # means 5 apart
    >>> torch.allclose(shifted, torch.full((3,), 25.0), atol=1e-3)
    True
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ctxpred.errors import ShapeError, ValueRangeError, check_floating
from ctxpred.wasserstein._validate import center, float32_core, prepare, restore
from ctxpred.wasserstein.base import EstimatorModule

__all__ = ["GaussianWasserstein", "gaussian_w2", "gaussian_wasserstein", "sqrtm_psd"]

Covariance = Literal["full", "diag"]


def _safe_sqrt(v: Tensor) -> Tensor:
    positive = v > 0
    return torch.where(positive, torch.where(positive, v, 1.0).sqrt(), torch.zeros_like(v))


def gaussian_wasserstein(
    x: Tensor,
    y: Tensor,
    x_weights: Tensor | None = None,
    y_weights: Tensor | None = None,
    *,
    covariance: Covariance = "full",
    check_finite: bool = True,
) -> Tensor:
    r"""Gaussian (Bures) :math:`W_2^2` between moment-matched clouds, batched.

    Args:
        x: ``(..., N, D)`` points.
        y: ``(..., M, D)`` points.
        x_weights: ``(..., N)`` non-negative weights (0 = masked out); ``None`` = uniform.
        y_weights: ``(..., M)`` same for ``y``.
        covariance: ``"full"`` (Bures) or ``"diag"`` (per-coordinate variances).
        check_finite: check for NaN/Inf points and negative weights (one host sync).

    Returns:
        ``(...)`` values in ``x``'s dtype; empty problems give 0.

    Example:
        >>> import torch
        >>> from ctxpred.wasserstein import gaussian_wasserstein
        >>> x = torch.tensor([[-1.0, 0.0], [1.0, 0.0]])
        >>> round(float(gaussian_wasserstein(x, 3.0 * x + 1.0)), 4)
        6.0
    """
    if covariance not in ("full", "diag"):
        raise ValueRangeError(f"covariance must be 'full' or 'diag', got {covariance!r}")
    prep = prepare(x, y, x_weights, y_weights, 2, check_finite)
    with float32_core(prep.x.device):
        xs, ys, a, b = prep.x, prep.y, prep.a, prep.b
        # translation invariant: moments of clouds centered on y's mean, so that points far
        # from the origin keep their spread in float32
        xs, ys = center(xs, ys, b)
        mx = (a.unsqueeze(-1) * xs).sum(-2)
        my = (b.unsqueeze(-1) * ys).sum(-2)
        xc, yc = xs - mx.unsqueeze(-2), ys - my.unsqueeze(-2)
        mean_term = (mx - my).pow(2).sum(-1)
        if covariance == "diag":
            sx = _safe_sqrt((a.unsqueeze(-1) * xc.pow(2)).sum(-2))
            sy = _safe_sqrt((b.unsqueeze(-1) * yc.pow(2)).sum(-2))
            values = mean_term + (sx - sy).pow(2).sum(-1)
        else:
            pm = _safe_sqrt(a).unsqueeze(-1) * xc
            qm = _safe_sqrt(b).unsqueeze(-1) * yc
            traces = pm.pow(2).sum((-1, -2)) + qm.pow(2).sum((-1, -2))
            # non-finite points (check_finite=False) leave `traces` NaN or inf, so the value
            # is; zeroed here they cannot make the SVD raise (CPU) instead
            cross = torch.matmul(pm, qm.transpose(-1, -2)).nan_to_num_(0.0, 0.0, 0.0)
            nuclear = torch.linalg.svdvals(cross).sum(-1)
            values = mean_term + (traces - 2.0 * nuclear).clamp_min(0.0)
    return restore(values, prep)


class _SqrtmPSD(torch.autograd.Function):
    """Square root of symmetric PSD matrices with a backward that is finite at repeated
    eigenvalues: in the eigenbasis, ``dS^{1/2}_{ij} = dS_{ij} / (s_i + s_j)``."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, mat: Tensor) -> Tensor:
        evals, evecs = torch.linalg.eigh(0.5 * (mat + mat.transpose(-1, -2)))
        roots = _safe_sqrt(evals)
        ctx.save_for_backward(roots, evecs)
        return (evecs * roots.unsqueeze(-2)) @ evecs.transpose(-1, -2)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> Tensor:
        roots, evecs = ctx.saved_tensors
        inner = evecs.transpose(-1, -2) @ grad @ evecs
        inner = 0.5 * (inner + inner.transpose(-1, -2))
        denom = roots.unsqueeze(-1) + roots.unsqueeze(-2)
        floor = torch.finfo(roots.dtype).eps * roots.amax(-1, keepdim=True).unsqueeze(-1)
        positive = denom > floor
        inner = torch.where(positive, inner / torch.where(positive, denom, 1.0), 0.0)
        return evecs @ inner @ evecs.transpose(-1, -2)


def sqrtm_psd(mat: Tensor) -> Tensor:
    r"""Principal square root of symmetric PSD matrices ``(..., D, D)`` (eigenvalues clamped at
    0), differentiable with a gradient that stays finite at repeated or zero eigenvalues.

    Example:
        >>> import torch
        >>> from ctxpred.wasserstein import sqrtm_psd
        >>> sqrtm_psd(torch.diag(torch.tensor([4.0, 9.0])))
        tensor([[2., 0.],
                [0., 3.]])
    """
    return _SqrtmPSD.apply(mat)


def gaussian_w2(mean_x: Tensor, cov_x: Tensor, mean_y: Tensor, cov_y: Tensor) -> Tensor:
    r""":math:`W_2^2` between Gaussians given by their moments, batched.

    .. math::
        W_2^2 = \|m_x - m_y\|^2 + \operatorname{tr}\Big(S_x + S_y
            - 2 \big(S_y^{1/2} S_x S_y^{1/2}\big)^{1/2}\Big)

    computed in float32 (float64 for float64 inputs) with :func:`sqrtm_psd`, whose gradient is
    finite for singular covariances (e.g. of fewer points than dimensions).

    Args:
        mean_x: ``(..., D)``.
        cov_x: ``(..., D, D)`` symmetric PSD.
        mean_y: ``(..., D)``.
        cov_y: ``(..., D, D)`` symmetric PSD.

    Returns:
        ``(...)`` in ``mean_x``'s dtype.

    Example:
        >>> import torch
        >>> from ctxpred.wasserstein import gaussian_w2
        >>> eye = torch.eye(2)
        >>> gaussian_w2(torch.zeros(2), eye, torch.ones(2), 4.0 * eye)
        tensor(4.)
    """
    check_floating(mean_x, "mean_x")
    check_floating(cov_x, "cov_x")
    check_floating(mean_y, "mean_y")
    check_floating(cov_y, "cov_y")
    d = mean_x.shape[-1]
    for name, t, want in (("mean_y", mean_y, 1), ("cov_x", cov_x, 2), ("cov_y", cov_y, 2)):
        if t.dim() < want or tuple(t.shape[t.dim() - want:]) != (d,) * want:
            raise ShapeError(
                f"{name} must end in {'(D,)' if want == 1 else '(D, D)'} with D={d} from "
                f"mean_x, got shape {tuple(t.shape)}"
            )
    out_dtype = mean_x.dtype
    compute = torch.float64 if out_dtype == torch.float64 else torch.float32
    with float32_core(mean_x.device):
        mx, my = mean_x.to(compute), mean_y.to(compute)
        sx, sy = cov_x.to(compute), cov_y.to(compute)
        root_y = sqrtm_psd(sy)
        cross = sqrtm_psd(root_y @ sx @ root_y)
        trace = torch.diagonal(sx + sy - 2.0 * cross, dim1=-2, dim2=-1).sum(-1)
        values = (mx - my).pow(2).sum(-1) + trace.clamp_min(0.0)
    return values.to(out_dtype)


class GaussianWasserstein(EstimatorModule):
    r"""Module form of :func:`gaussian_wasserstein`, its options fixed (no learnable parameters).

    Args:
        covariance: ``"full"`` (Bures term, computed as a nuclear norm — no ``D x D`` square
            root) or ``"diag"`` (per-coordinate variances only).
        check_finite: check for NaN/Inf points and negative weights (one host sync); ``False``
            in training loops.

    Shape:
        ``x (..., N, D)``, ``y (..., M, D)``, weights ``(..., N)`` / ``(..., M)`` -> ``(...)``.

    Example:
        >>> import torch
        >>> from ctxpred.wasserstein import GaussianWasserstein
        >>> x = torch.randn(4, 8, 3)
        >>> GaussianWasserstein()(x, x.flip(1)).abs().max() < 1e-5
        tensor(True)
    """

    function = staticmethod(gaussian_wasserstein)

    def __init__(self, covariance: Covariance = "full", check_finite: bool = True) -> None:
        super().__init__(covariance=covariance, check_finite=check_finite)
