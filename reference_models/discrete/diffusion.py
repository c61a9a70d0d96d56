r"""Mask-and-replace discrete diffusion (VQ-Diffusion) over token grids, and its absorbing case.

States: the ``V`` token ids ``0..V-1`` plus one ``[MASK]`` state with id ``V``. One forward step
``t-1 -> t`` keeps a token with probability :math:`\alpha_t`, replaces it by a uniformly drawn id
with probability :math:`V\beta_t` (each id :math:`\beta_t`), and masks it with probability
:math:`\gamma_t`; ``[MASK]`` is absorbing:

.. math::
    Q_t = \alpha_t I + \beta_t \mathbf{1}\mathbf{1}^\top \ \text{(on the ids)},\qquad
    q(x_t = \text{MASK} \mid x_{t-1} \ne \text{MASK}) = \gamma_t,
    \qquad \alpha_t + V\beta_t + \gamma_t = 1.

Composing steps keeps the same form, with the closed-form marginal (one token, :math:`x_0 = i`)

.. math::
    q(x_t = j \mid x_0 = i) = \bar\alpha_t [j = i] + \bar\beta_t\ (j < V),\qquad
    q(x_t = \text{MASK} \mid x_0) = \bar\gamma_t,

:math:`\bar\alpha_t = \prod_{s \le t}\alpha_s`, :math:`1 - \bar\gamma_t = \prod_{s\le t}
(1 - \gamma_s)`, :math:`V\bar\beta_t = 1 - \bar\alpha_t - \bar\gamma_t`. As in VQ-Diffusion the
schedule is given by the cumulative values, linear in ``t`` from ``(alpha_bar_1, gamma_bar_1)``
to ``(alpha_bar_T, gamma_bar_T)``; the per-step values follow by division. ``gamma_bar_T`` close to
``1 - alpha_bar_T`` gives (almost) the absorbing-state (masked) diffusion; a smaller one keeps a
share ``1 - alpha_bar_T - gamma_bar_T`` of uniform replacement at ``t = T``.

The denoiser predicts :math:`p_\theta(x_0 \mid x_t)`; the reverse step marginalizes the posterior

.. math::
    p_\theta(x_s \mid x_t) = \sum_{x_0} q(x_s \mid x_t, x_0)\, p_\theta(x_0 \mid x_t)
    = q(x_t \mid x_s) \sum_{x_0} q(x_s \mid x_0)\,
      \frac{p_\theta(x_0 \mid x_t)}{q(x_t \mid x_0)}

for any ``s < t`` (``s = t - 1`` in training, larger jumps for fast sampling). All of it runs in
log space, float32, with categories on the **last** axis: log-probabilities are ``(B, L, V + 1)``.

Objective (:meth:`MaskAndReplaceDiffusion.loss`): the variational bound term
:math:`\mathrm{KL}(q(x_{t-1}\mid x_t, x_0)\,\|\,p_\theta(x_{t-1}\mid x_t))` for ``t > 1`` and
:math:`-\log p_\theta(x_0 \mid x_1)` for ``t = 1`` (``t`` uniform), plus ``ce_weight`` times the
auxiliary cross-entropy :math:`-\log p_\theta(x_0 \mid x_t)` (VQ-Diffusion's auxiliary loss),
averaged over tokens.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctxpred.errors import ShapeError, ValueRangeError, check_integer

__all__ = ["DiffusionLoss", "MaskAndReplaceDiffusion"]

_TINY = 1e-30
Objective = Literal["hybrid", "vb", "ce"]


def _log(x: Tensor) -> Tensor:
    return torch.log(x.clamp_min(_TINY))


class DiffusionLoss(NamedTuple):
    """Loss terms of one batch (scalars, with gradients).

    Attributes:
        loss: the optimized total ``vb + ce_weight * ce`` (or one of them, per ``objective``).
        vb: the variational-bound term, per token.
        ce: the auxiliary cross-entropy :math:`-\\log p_\\theta(x_0 \\mid x_t)`, per token.
    """

    loss: Tensor
    vb: Tensor
    ce: Tensor


class MaskAndReplaceDiffusion(nn.Module):
    r"""The VQ-Diffusion forward process, posterior, objective and sampler (no parameters).

    Args:
        vocab_size: ``V`` token ids (the mask id is ``V``).
        num_steps: ``T``.
        alpha_bar_1, alpha_bar_T: cumulative keep probability at ``t = 1`` and ``t = T``.
        gamma_bar_1, gamma_bar_T: cumulative mask probability at ``t = 1`` and ``t = T``.
            VQ-Diffusion's defaults are ``(0.99999, 0.000009)`` and ``(0.000009, 0.99999)``
            (practically absorbing); the default here keeps 10% uniform replacement at ``T``.
        objective: ``"hybrid"`` (vb + ce_weight * ce), ``"vb"`` or ``"ce"``.
        ce_weight: weight of the auxiliary cross-entropy in ``"hybrid"``.

    Buffers ``alpha_bar``, ``gamma_bar``, ``beta_bar`` have shape ``(T + 1,)`` and include
    ``t = 0`` (``alpha_bar[0] = 1``).

    Example:
        >>> diff = MaskAndReplaceDiffusion(vocab_size=17, num_steps=10)
        >>> x0 = torch.randint(0, 17, (2, 64))
        >>> xt = diff.q_sample(x0, torch.tensor([1, 10]))
        >>> xt.shape, bool((xt <= 17).all())
        (torch.Size([2, 64]), True)
        >>> float(diff.marginal(x0, torch.tensor([3, 3])).sum(-1).mean())
        1.0
    """

    alpha_bar: Tensor
    gamma_bar: Tensor
    beta_bar: Tensor

    def __init__(
        self,
        vocab_size: int,
        num_steps: int = 100,
        *,
        alpha_bar_1: float = 0.99999,
        alpha_bar_T: float = 0.000009,
        gamma_bar_1: float = 0.000009,
        gamma_bar_T: float = 0.9,
        objective: Objective = "hybrid",
        ce_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if vocab_size < 2:
            raise ValueRangeError(f"vocab_size must be >= 2, got {vocab_size}")
        if num_steps < 1:
            raise ValueRangeError(f"num_steps must be >= 1, got {num_steps}")
        if objective not in ("hybrid", "vb", "ce"):
            raise ValueRangeError(f"objective must be 'hybrid', 'vb' or 'ce', got {objective!r}")
        for name, v in (("alpha_bar_1", alpha_bar_1), ("alpha_bar_T", alpha_bar_T),
                        ("gamma_bar_1", gamma_bar_1), ("gamma_bar_T", gamma_bar_T)):
            if not 0.0 < v < 1.0:
                raise ValueRangeError(f"{name} must be in (0, 1), got {v}")
        self.vocab_size, self.num_steps = int(vocab_size), int(num_steps)
        self.mask_id = self.vocab_size
        self.objective, self.ce_weight = objective, float(ce_weight)
        frac = torch.linspace(0.0, 1.0, num_steps, dtype=torch.float64)
        att = alpha_bar_1 + frac * (alpha_bar_T - alpha_bar_1)
        ctt = gamma_bar_1 + frac * (gamma_bar_T - gamma_bar_1)
        att = torch.cat([torch.ones(1, dtype=torch.float64), att])
        ctt = torch.cat([torch.zeros(1, dtype=torch.float64), ctt])
        bt_step = self._step_values(att[:-1], ctt[:-1], att[1:], ctt[1:])[1]
        if (bt_step < -1e-12).any() or (att[1:] > att[:-1]).any() or (ctt[1:] < ctt[:-1]).any():
            raise ValueRangeError(
                "the schedule must have alpha_bar decreasing, gamma_bar increasing and every "
                f"step's replace probability >= 0; got alpha_bar {alpha_bar_1}->{alpha_bar_T}, "
                f"gamma_bar {gamma_bar_1}->{gamma_bar_T}"
            )
        self.register_buffer("alpha_bar", att.float(), persistent=False)
        self.register_buffer("gamma_bar", ctt.float(), persistent=False)
        self.register_buffer(
            "beta_bar", ((1.0 - att - ctt) / vocab_size).clamp_min(0.0).float(), persistent=False
        )
        # float64 copies: per-step values are ratios / differences of values close to 0 and 1,
        # which float32 would get wrong by ~1% (they are only ever indexed by (B,) steps).
        self.register_buffer("_att64", att, persistent=False)
        self.register_buffer("_ctt64", ctt, persistent=False)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> nn.Module:
        # keep the float64 schedule copies in float64 under .half() / .to(dtype)
        att, ctt = self._att64, self._ctt64
        out = super()._apply(fn, recurse)
        self._att64 = att.to(self.alpha_bar.device)
        self._ctt64 = ctt.to(self.alpha_bar.device)
        return out

    def _step_values(
        self, att_s: Tensor, ctt_s: Tensor, att_t: Tensor, ctt_t: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(alpha, beta, gamma)`` of the transition ``s -> t`` from cumulative values."""
        alpha = att_t / att_s
        gamma = 1.0 - (1.0 - ctt_t) / (1.0 - ctt_s)
        beta = (1.0 - alpha - gamma) / self.vocab_size
        return alpha, beta, gamma

    def transition_matrix(self, t: int, s: int | None = None) -> Tensor:
        r"""The ``(V+1, V+1)`` float64 matrix ``M[i, j] = q(x_t = j | x_s = i)``.

        ``s = None`` means ``t - 1`` (one step); ``s = 0`` gives the closed-form marginal.
        Rows sum to one; the mask row is one-hot on the mask.

        Example:
            >>> d = MaskAndReplaceDiffusion(4, 5)
            >>> m = d.transition_matrix(1) @ d.transition_matrix(2)
            >>> bool(torch.allclose(m, d.transition_matrix(2, s=0)))
            True
        """
        s = t - 1 if s is None else s
        if not 0 <= s < t <= self.num_steps:
            raise ValueRangeError(f"need 0 <= s < t <= T={self.num_steps}, got s={s}, t={t}")
        att, ctt = self._att64.cpu(), self._ctt64.cpu()
        a, b, c = self._step_values(att[s], ctt[s], att[t], ctt[t])
        v = self.vocab_size
        m = torch.zeros(v + 1, v + 1, dtype=torch.float64)
        m[:v, :v] = a * torch.eye(v, dtype=torch.float64) + b
        m[:v, v] = c
        m[v, v] = 1.0
        return m

    # ---------------------------------------------------------------- forward process
    def _check_tokens(self, x: Tensor, t: Tensor, name: str) -> None:
        check_integer(x, name)
        check_integer(t, "t")
        if x.dim() != 2:
            raise ShapeError(f"{name} must be token ids (B, L), got shape {tuple(x.shape)}")
        if t.shape != (x.shape[0],):
            raise ShapeError(
                f"t must have shape (B,) = ({x.shape[0]},), got {tuple(t.shape)}"
            )

    def marginal(self, x0: Tensor, t: Tensor) -> Tensor:
        """Closed-form ``q(x_t | x_0)`` as probabilities ``(B, L, V + 1)``.

        Args:
            x0: clean ids ``(B, L)``.
            t: steps ``(B,)`` in ``0..T``.
        """
        self._check_tokens(x0, t, "x0")
        a = self.alpha_bar[t].view(-1, 1, 1)
        b = self.beta_bar[t].view(-1, 1, 1)
        c = self.gamma_bar[t].view(-1, 1, 1)
        onehot = F.one_hot(x0, self.vocab_size).to(a.dtype)
        probs = a * onehot + b
        return torch.cat([probs, c.expand(*x0.shape, 1)], dim=-1)

    def q_sample(self, x0: Tensor, t: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``x_t ~ q(x_t | x_0)``, ids ``(B, L)`` in ``0..V`` (``V`` = mask).

        Example:
            >>> d = MaskAndReplaceDiffusion(3, 10)
            >>> d.q_sample(torch.zeros(1, 4, dtype=torch.long), torch.tensor([0])).tolist()
            [[0, 0, 0, 0]]
        """
        self._check_tokens(x0, t, "x0")
        u = torch.rand(x0.shape, generator=generator, device=x0.device)
        rand_ids = torch.randint(0, self.vocab_size, x0.shape, generator=generator,
                                 device=x0.device)
        a = self.alpha_bar[t].unsqueeze(1)
        c = self.gamma_bar[t].unsqueeze(1)
        out = torch.where(u < c + a, x0, rand_ids)
        return torch.where(u < c, torch.full_like(x0, self.mask_id), out)

    # ---------------------------------------------------------------- reverse process
    def posterior_log_probs(
        self, log_p0: Tensor, x_t: Tensor, t: Tensor, s: Tensor | None = None
    ) -> Tensor:
        r"""``log p(x_s | x_t)`` for ``p(x_0 | x_t) = exp(log_p0)``, ``(B, L, V + 1)``.

        With a one-hot ``log_p0`` (log of a one-hot, i.e. 0 / very negative) this is the true
        posterior ``q(x_s | x_t, x_0)``.

        Args:
            log_p0: log-probabilities over the ``V`` ids, ``(B, L, V)`` (need not be
                normalized; it is normalized here).
            x_t: current ids ``(B, L)`` in ``0..V``.
            t: current steps ``(B,)`` in ``1..T``.
            s: target steps ``(B,)`` with ``0 <= s < t`` (default ``t - 1``).
        """
        self._check_tokens(x_t, t, "x_t")
        v = self.vocab_size
        if log_p0.shape != (*x_t.shape, v):
            raise ShapeError(
                f"log_p0 must be (B, L, V) = {(*x_t.shape, v)}, got {tuple(log_p0.shape)}"
            )
        s = t - 1 if s is None else s
        log_p0 = torch.log_softmax(log_p0.float(), dim=-1)
        is_mask = (x_t == self.mask_id).unsqueeze(-1)  # (B, L, 1)
        xt_ids = x_t.clamp(max=v - 1)
        onehot_t = F.one_hot(xt_ids, v).float()  # (B, L, V)

        def col(buf: Tensor, step: Tensor) -> Tensor:
            return buf[step].view(-1, 1, 1)

        # q(x_t | x_0) as a function of x_0, (B, L, V)
        q_t = torch.where(
            is_mask,
            col(self.gamma_bar, t).expand_as(onehot_t),
            col(self.alpha_bar, t) * onehot_t + col(self.beta_bar, t),
        )
        log_w = log_p0 - _log(q_t)
        w = torch.softmax(log_w, dim=-1)  # normalized per position (constants cancel below)
        # sum_x0 q(x_s | x_0) w(x0): ids then mask, (B, L, V + 1)
        m_ids = col(self.alpha_bar, s) * w + col(self.beta_bar, s)
        m_mask = col(self.gamma_bar, s).expand(*x_t.shape, 1)
        log_m = _log(torch.cat([m_ids, m_mask], dim=-1))
        # q(x_t | x_s) as a function of x_s, (B, L, V + 1)
        a, b, c = (v.float() for v in self._step_values(
            col(self._att64, s), col(self._ctt64, s), col(self._att64, t), col(self._ctt64, t)
        ))
        b = b.clamp_min(0.0)
        ids_part = torch.where(is_mask, c.expand_as(onehot_t), a * onehot_t + b)
        mask_part = torch.where(is_mask, torch.ones_like(is_mask, dtype=a.dtype),
                                torch.zeros_like(is_mask, dtype=a.dtype))
        log_step = _log(torch.cat([ids_part, mask_part], dim=-1))
        out = log_m + log_step
        return out - torch.logsumexp(out, dim=-1, keepdim=True)

    def loss(
        self,
        denoiser: Callable[[Tensor, Tensor], Tensor],
        x0: Tensor,
        t: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> DiffusionLoss:
        """Training objective on clean ids ``x0`` ``(B, L)``.

        ``denoiser(x_t (B, L) long, t (B,) long) -> logits (B, L, V)`` of ``p(x_0 | x_t)``.
        ``t`` defaults to uniform draws in ``1..T``. No host synchronization.
        """
        check_integer(x0, "x0")
        if x0.dim() != 2:
            raise ShapeError(f"x0 must be token ids (B, L), got shape {tuple(x0.shape)}")
        batch = x0.shape[0]
        if t is None:
            t = torch.randint(1, self.num_steps + 1, (batch,), generator=generator,
                              device=x0.device)
        x_t = self.q_sample(x0, t, generator)
        logits = denoiser(x_t, t)
        if logits.shape != (*x0.shape, self.vocab_size):
            raise ShapeError(
                f"denoiser must return logits (B, L, V) = {(*x0.shape, self.vocab_size)}, "
                f"got {tuple(logits.shape)}"
            )
        log_p0 = torch.log_softmax(logits.float(), dim=-1)
        ce = F.nll_loss(log_p0.reshape(-1, self.vocab_size), x0.reshape(-1))
        log_model = self.posterior_log_probs(log_p0, x_t, t)
        log_true = self.posterior_log_probs(_log(F.one_hot(x0, self.vocab_size).float()), x_t, t)
        kl = (log_true.exp() * (log_true - log_model)).sum(-1)  # (B, L)
        nll = -log_model.gather(-1, x0.unsqueeze(-1)).squeeze(-1)  # -log p(x_0 | x_1) at t = 1
        vb = torch.where((t == 1).unsqueeze(1), nll, kl).mean()
        if self.objective == "vb":
            total = vb
        elif self.objective == "ce":
            total = ce
        else:
            total = vb + self.ce_weight * ce
        return DiffusionLoss(total, vb, ce)

    @torch.no_grad()
    def sample(
        self,
        denoiser: Callable[[Tensor, Tensor], Tensor],
        num_samples: int,
        seq_len: int,
        *,
        num_steps: int | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        temperature: float = 1.0,
    ) -> Tensor:
        r"""Ancestral sampling ``x_T -> x_0``; returns ids ``(num_samples, seq_len)`` in ``0..V-1``.

        ``x_T`` is drawn from the ``t = T`` marginal under a uniform prior on ``x_0`` (mask with
        probability :math:`\bar\gamma_T`, otherwise a uniform id). With ``num_steps < T`` the
        chain visits evenly spaced steps and uses the jump posterior ``q(x_s | x_t, x_0)``.
        The final step excludes the mask state.
        """
        steps = self.num_steps if num_steps is None else int(num_steps)
        if not 1 <= steps <= self.num_steps:
            raise ValueRangeError(f"num_steps must be in [1, {self.num_steps}], got {steps}")
        if temperature <= 0:
            raise ValueRangeError(f"temperature must be > 0, got {temperature}")
        shape = (num_samples, seq_len)
        u = torch.rand(shape, generator=generator, device=device)
        x = torch.randint(0, self.vocab_size, shape, generator=generator, device=device)
        x = torch.where(u < self.gamma_bar[self.num_steps].to(device),
                        torch.full_like(x, self.mask_id), x)
        times = torch.linspace(self.num_steps, 0, steps + 1).round().long().tolist()
        for t_now, t_next in itertools.pairwise(times):
            t = torch.full((num_samples,), t_now, dtype=torch.long, device=device)
            s = torch.full((num_samples,), t_next, dtype=torch.long, device=device)
            logits = denoiser(x, t).float() / temperature
            log_post = self.posterior_log_probs(logits, x, t, s)
            if t_next == 0:
                log_post = log_post[..., : self.vocab_size]
            # Gumbel-max: argmax(log p + G), G = -log(E), E ~ Exp(1)
            expo = torch.empty_like(log_post).exponential_(generator=generator)
            x = (log_post - torch.log(expo.clamp_min(1e-30))).argmax(-1)
        return x
