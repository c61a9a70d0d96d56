r"""Thin adapters to POT and geomloss (the ``ot`` extra), as oracles and for users who want them.

Both return :math:`W_p^p` in ctxpred's convention (cost :math:`\|x - y\|^p`; geomloss's cost is
:math:`\|x-y\|^p / p`, which is multiplied back here), take the same ``(..., N, D)`` inputs and
weights, and give 0 for empty problems. They are *not* fast paths: POT runs one problem at a time
on the host; geomloss syncs the host for its global diameter.

Example:
    >>> import torch
    >>> from ctxpred.wasserstein import exact_wasserstein, pot_wasserstein
    >>> x, y = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    >>> torch.allclose(pot_wasserstein(x, y), exact_wasserstein(x, y), atol=1e-5)
    True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ctxpred.wasserstein._validate import _safe_power, prepare, restore, simplex_scale

__all__ = ["geomloss_wasserstein", "pot_wasserstein"]


def _require(module: str) -> Any:
    try:
        return __import__(module)
    except ImportError as err:
        package = {"ot": "pot"}.get(module, module)
        raise ImportError(
            f"method={'pot' if module == 'ot' else module!r} needs the optional package "
            f"{package!r}: pip install 'ctxpred[ot]' (or pip install {package})"
        ) from err


def pot_wasserstein(
    x: Tensor,
    y: Tensor,
    x_weights: Tensor | None = None,
    y_weights: Tensor | None = None,
    *,
    p: float = 2,
    reg: float | None = None,
    check_finite: bool = True,
) -> Tensor:
    r"""POT per problem: ``ot.emd2`` (exact) or, with ``reg``, ``ot.sinkhorn2`` (entropic).

    Differentiable through POT's torch backend. A Python loop over problems: slow, for checks.

    Args:
        x: ``(..., N, D)`` points.
        y: ``(..., M, D)`` points.
        x_weights: ``(..., N)`` non-negative weights; ``None`` = uniform.
        y_weights: ``(..., M)`` same for ``y``.
        p: cost exponent ``>= 1``.
        reg: entropic regularization (in cost units) for ``ot.sinkhorn2``; ``None`` = exact.
        check_finite: check for NaN/Inf points and negative weights (one host sync).

    Returns:
        ``(...)`` values :math:`W_p^p` in ``x``'s dtype.

    Example:
        >>> import torch
        >>> from ctxpred.wasserstein import pot_wasserstein
        >>> pot_wasserstein(torch.zeros(3, 2), torch.ones(3, 2))
        tensor(2.)
    """
    ot = _require("ot")
    prep = prepare(x, y, x_weights, y_weights, p, check_finite)
    nonempty = prep.nonempty.cpu().tolist()  # host: POT solves one problem at a time on the CPU
    values = []
    for k in range(prep.x.shape[0]):
        if not nonempty[k]:
            values.append(prep.x.new_zeros(()) * prep.x[k].sum())
            continue
        diff = prep.x[k].unsqueeze(1) - prep.y[k].unsqueeze(0)
        sq = diff.pow(2).sum(-1)
        cost = sq if p == 2 else _safe_power(sq, p / 2.0)
        a, b = prep.a[k], prep.b[k]
        # POT answers NaN costs with a finite value (and an "infeasible" warning): NaN instead,
        # as the batched estimators give (0 * cost is 0 for finite costs, NaN otherwise)
        poison = cost.sum() * 0.0
        if reg is None:
            scale = simplex_scale(cost)  # (absolute tolerances in the simplex)
            values.append(ot.emd2(a, b, cost / scale).reshape(()) * scale.reshape(()) + poison)
        else:
            values.append(ot.sinkhorn2(a, b, cost, reg) + poison)
    stacked = torch.stack(values) if values else prep.x.new_zeros(0)
    return restore(stacked.to(prep.x.dtype), prep)


def geomloss_wasserstein(
    x: Tensor,
    y: Tensor,
    x_weights: Tensor | None = None,
    y_weights: Tensor | None = None,
    *,
    p: float = 2,
    blur: float = 0.05,
    scaling: float = 0.5,
    debias: bool = True,
    backend: str = "tensorized",
    check_finite: bool = True,
) -> Tensor:
    r"""geomloss ``SamplesLoss("sinkhorn")``, batched, rescaled to the cost :math:`\|x-y\|^p`.

    Args:
        x: ``(..., N, D)`` points.
        y: ``(..., M, D)`` points.
        x_weights: ``(..., N)`` non-negative weights; ``None`` = uniform.
        y_weights: ``(..., M)`` same for ``y``.
        p: ``1`` or ``2`` (geomloss's choices).
        blur: geomloss's blur (data units).
        scaling: geomloss's epsilon-scaling factor.
        debias: Sinkhorn divergence (geomloss's default) or plain entropic OT.
        backend: geomloss backend (``"tensorized"`` needs no KeOps).
        check_finite: check for NaN/Inf points and negative weights (one host sync).

    Returns:
        ``(...)`` values in ``x``'s dtype.

    Example:
        >>> import torch
        >>> from ctxpred.wasserstein import geomloss_wasserstein
        >>> x = torch.randn(2, 5, 3)
        >>> geomloss_wasserstein(x, x).abs().max() < 1e-4
        tensor(True)
    """
    geomloss = _require("geomloss")
    prep = prepare(x, y, x_weights, y_weights, p, check_finite)
    a = torch.where(prep.nonempty.unsqueeze(-1), prep.a, 1.0 / prep.a.shape[-1])
    b = torch.where(prep.nonempty.unsqueeze(-1), prep.b, 1.0 / prep.b.shape[-1])
    loss = geomloss.SamplesLoss(
        "sinkhorn", p=p, blur=blur, scaling=scaling, debias=debias, backend=backend
    )
    values = float(p) * loss(a, prep.x, b, prep.y)
    return restore(values, prep)
