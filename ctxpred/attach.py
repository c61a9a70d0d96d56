"""Attach context-prediction losses to named layers of any model, through forward hooks.

::

    predictor = ctxpred.attach(unet, {"up_blocks.1": loss_a, "up_blocks.2": loss_b})
    eps_hat = unet(x_t, t).sample                   # hooks capture the two block outputs
    loss = mse(eps_hat, eps) + predictor.loss(target=x0)
    loss.backward()                                  # grads reach the backbone and the heads

Contract:

* names are those of ``model.named_modules()``; a wrong name raises with the closest matches;
* outputs are captured **without detaching**, so the context loss trains the backbone;
* a capture is released by :meth:`ContextPredictor.loss` / :meth:`~ContextPredictor.losses`, and
  overwritten by the next forward of the model (a forward without a loss does not accumulate);
* capturing is armed by a forward pre-hook on ``model`` itself, so the recomputation of a
  checkpointed block during backward (``use_reentrant=False``) captures nothing;
* :attr:`ContextPredictor.heads` holds only the heads (optimize it with the model): the model's
  ``state_dict`` is untouched, and a ``copy.deepcopy(model)`` (EMA) gets inert hooks that
  reference no head;
* :meth:`ContextPredictor.remove` (or leaving the ``with`` block) removes every hook.

With DDP, wrap :meth:`ContextPredictor.training_module` (the model and the heads in one module)
instead of the bare model, so that the heads' gradients are averaged across ranks too; call the
wrapper for the forward and ``predictor.loss(...)`` as usual. Every head takes part in every
step, so ``find_unused_parameters`` can stay ``False``. Lazy heads (``in_channels=None``) must be
materialized first (:meth:`ContextPredictor.initialize`).
"""

from __future__ import annotations

import dataclasses
import difflib
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ctxpred.errors import CtxpredError, ShapeError, ValueRangeError
from ctxpred.loss import ContextPredictionLoss

__all__ = ["CaptureError", "ContextPredictor", "ModelWithHeads", "attach"]

Selector = Callable[[Any], Tensor] | int | str


class CaptureError(CtxpredError, RuntimeError):
    """A hooked layer produced nothing usable (no forward since the last loss, or no tensor)."""


def _select(output: Any, selector: Selector | None, name: str) -> Tensor:
    if selector is None:
        if isinstance(output, Tensor):
            return output
        raise CaptureError(
            f"layer {name!r} returned {type(output).__name__}, not a Tensor; pass "
            f"selectors={{{name!r}: ...}} to attach: an index for tuples (e.g. 0), an attribute "
            f"or key name for dataclasses/dicts (e.g. 'sample'), or a callable"
        )
    if callable(selector):
        picked = selector(output)
    elif isinstance(selector, int) and not isinstance(selector, bool):
        picked = output[selector]
    elif isinstance(selector, str):
        if isinstance(output, Mapping):
            picked = output[selector]
        elif dataclasses.is_dataclass(output) or hasattr(output, selector):
            picked = getattr(output, selector)
        else:
            raise CaptureError(
                f"selector {selector!r} for layer {name!r} names no field of "
                f"{type(output).__name__}"
            )
    else:
        raise ValueRangeError(
            f"selector for layer {name!r} must be an int, a str or a callable, got {selector!r}"
        )
    if not isinstance(picked, Tensor):
        raise CaptureError(
            f"the selector of layer {name!r} picked {type(picked).__name__}, not a Tensor"
        )
    return picked


class _Hook:
    """Forward (pre-)hook bound weakly to its predictor; copies (deepcopy, pickle) are inert."""

    def __init__(self, predictor: ContextPredictor | None, name: str | None) -> None:
        self._ref = None if predictor is None else weakref.ref(predictor)
        self.name = name

    def __call__(self, module: nn.Module, args: Any, output: Any = None) -> None:
        predictor = None if self._ref is None else self._ref()
        if predictor is None:
            return None
        if self.name is None:
            predictor._arm()
        else:
            predictor._capture(self.name, output)
        return None

    def __deepcopy__(self, memo: dict) -> _Hook:
        return _Hook(None, self.name)

    def __reduce__(self) -> tuple:
        return (_Hook, (None, self.name))


class ModelWithHeads(nn.Module):
    """``model`` and ``heads`` in one module (forward = ``model``'s), e.g. to wrap in DDP.

    DDP synchronizes the gradients of every parameter of the module it wraps; heads outside the
    DDP module would train differently on each rank. The model's own ``state_dict`` stays clean:
    this wrapper's keys are ``model.*`` and ``heads.*``.
    """

    def __init__(self, model: nn.Module, heads: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.heads = heads

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)


class ContextPredictor:
    """Hooks, captured outputs and heads of :func:`attach` (see the module docstring).

    Attributes:
        model: the hooked model.
        loss_modules: ``{layer name: ContextPredictionLoss}``.
        heads: ``nn.ModuleDict`` of the heads only, keyed by layer name with ``.`` -> ``/``.
        last_losses: detached per-layer values of the last :meth:`loss` / :meth:`losses` call.
    """

    def __init__(
        self,
        model: nn.Module,
        losses: Mapping[str, ContextPredictionLoss],
        selectors: Mapping[str, Selector] | Selector | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueRangeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not losses:
            raise ValueRangeError("losses must map at least one layer name to a loss")
        modules = dict(model.named_modules())
        for name, loss in losses.items():
            if name not in modules:
                close = difflib.get_close_matches(name, [n for n in modules if n], n=5,
                                                  cutoff=0.5)
                hint = f"; close matches: {close}" if close else ""
                raise ValueRangeError(
                    f"{type(model).__name__} has no submodule named {name!r}{hint} "
                    f"(names as in model.named_modules())"
                )
            if not isinstance(loss, ContextPredictionLoss):
                raise ValueRangeError(
                    f"the loss for {name!r} must be a ContextPredictionLoss, got "
                    f"{type(loss).__name__}"
                )
            loss.name = f"layer {name!r}"
        if isinstance(selectors, Mapping):
            unknown = sorted(set(selectors) - set(losses))
            if unknown:
                raise ValueRangeError(
                    f"selectors name layers without a loss: {unknown}; layers: {list(losses)}"
                )
            self._selectors = dict(selectors)
        else:
            self._selectors = dict.fromkeys(losses, selectors)
        self.model = model
        self.loss_modules: dict[str, ContextPredictionLoss] = dict(losses)
        self.heads = nn.ModuleDict(
            {name.replace(".", "/"): loss.head for name, loss in losses.items()}
        )
        self.last_losses: dict[str, Tensor] = {}
        self._captured: dict[str, Tensor] = {}
        self._armed = False
        self._handles = [model.register_forward_pre_hook(_Hook(self, None))]
        for name in losses:
            self._handles.append(modules[name].register_forward_hook(_Hook(self, name)))

    # -- hooks --------------------------------------------------------------------------------
    def _arm(self) -> None:
        self._captured.clear()
        self._armed = True

    def _capture(self, name: str, output: Any) -> None:
        if not self._armed:
            return
        features = _select(output, self._selectors.get(name), name)
        loss = self.loss_modules[name]
        expected = loss.head.in_channels
        if expected is not None and features.dim() >= 3:
            channels = loss.layout(features).channels
            if channels != expected:
                raise ShapeError(
                    f"layer {name!r} outputs {channels} channels (shape "
                    f"{tuple(features.shape)}) but its {type(loss.head).__name__} expects "
                    f"in_channels={expected}"
                )
        self._captured[name] = features

    @property
    def attached(self) -> bool:
        """``True`` until :meth:`remove`."""
        return bool(self._handles)

    @property
    def captured(self) -> dict[str, Tensor]:
        """The outputs captured since the model's last forward and not yet consumed."""
        return dict(self._captured)

    def release(self) -> None:
        """Drop captured outputs and stop capturing until the model's next forward."""
        self._captured.clear()
        self._armed = False

    # -- losses -------------------------------------------------------------------------------
    def _target_for(self, name: str, target: Any) -> Tensor | None:
        if isinstance(target, Mapping):
            return target.get(name)
        return target

    def losses(
        self,
        target: Tensor | Mapping[str, Tensor] | None = None,
        generator: torch.Generator | None = None,
        sample_weight: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Per-layer weighted losses ``{name: scalar}``; releases the captured outputs.

        ``target`` is one tensor for every layer, a ``{name: tensor}`` mapping, or ``None`` (each
        layer's own features). ``generator`` (optional) drives every random choice of the step
        (query-point subsets, the heads' sampling noise) instead of the global RNG, for
        reproducible or resumable training. ``sample_weight`` (optional) ``(B,)`` weights each
        sample's loss before the batch mean, in every layer (e.g. by diffusion timestep; see
        :func:`ctxpred.loss.reduce_context_loss`).
        """
        missing = [name for name in self.loss_modules if name not in self._captured]
        if missing:
            self.release()
            raise CaptureError(
                f"no captured output for layers {missing}: run the model forward (with the "
                f"hooks attached) before each loss(); captures are consumed by loss()/losses()"
            )
        out = {}
        try:
            for name, loss in self.loss_modules.items():
                try:
                    out[name] = loss(
                        self._captured[name], self._target_for(name, target), generator,
                        sample_weight=sample_weight,
                    )
                except CtxpredError as err:
                    if f"{name!r}" in str(err):
                        raise
                    raise type(err)(f"layer {name!r}: {err}") from err
        finally:
            self.release()
        self.last_losses = {name: value.detach() for name, value in out.items()}
        return out

    def loss(
        self,
        target: Tensor | Mapping[str, Tensor] | None = None,
        generator: torch.Generator | None = None,
        sample_weight: Tensor | None = None,
    ) -> Tensor:
        """Sum of the per-layer losses (each already weighted by its ``weight``); see
        :meth:`losses` for ``target``, ``generator`` and ``sample_weight``."""
        return torch.stack(
            list(self.losses(target, generator, sample_weight=sample_weight).values())
        ).sum()

    @torch.no_grad()
    def initialize(self, *args: Any, **kwargs: Any) -> ContextPredictor:
        """Run ``model(*args, **kwargs)`` once without grad to materialize lazy heads.

        Call it before building the optimizer when a head has ``in_channels=None``.
        """
        self.model(*args, **kwargs)
        try:
            for name, loss in self.loss_modules.items():
                if name not in self._captured:
                    raise CaptureError(f"layer {name!r} did not run in model(*args, **kwargs)")
                loss.initialize(self._captured[name])
        finally:
            self.release()
        return self

    # -- plumbing -----------------------------------------------------------------------------
    def parameters(self) -> Iterator[nn.Parameter]:
        """The heads' parameters (for the optimizer)."""
        return self.heads.parameters()

    def to(self, *args: Any, **kwargs: Any) -> ContextPredictor:
        """Move every loss module (heads, codebooks, stride weights) like ``nn.Module.to``."""
        for loss in self.loss_modules.values():
            loss.to(*args, **kwargs)
        return self

    def training_module(self) -> ModelWithHeads:
        """``ModelWithHeads(model, heads)``: wrap this in DDP so head gradients are synced."""
        return ModelWithHeads(self.model, self.heads)

    def remove(self) -> None:
        """Remove every hook and drop captures; the model is then exactly as before attach."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.release()

    def __enter__(self) -> ContextPredictor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "attached" if self.attached else "removed"
        return f"ContextPredictor({state}, layers={list(self.loss_modules)})"


def attach(
    model: nn.Module,
    losses: Mapping[str, ContextPredictionLoss],
    *,
    selectors: Mapping[str, Selector] | Selector | None = None,
) -> ContextPredictor:
    """Hook ``losses`` onto the named submodules of ``model``.

    Args:
        model: any ``nn.Module`` (UNet, DiT, ...). It is not modified apart from the hooks.
        losses: ``{name in model.named_modules(): ContextPredictionLoss}``.
        selectors: how to pick the tensor from a layer output that is not a tensor: one for all
            layers or ``{name: selector}``; an ``int`` (tuple index), a ``str`` (attribute or key)
            or a callable ``output -> Tensor``.

    Returns:
        :class:`ContextPredictor` (also a context manager that removes the hooks on exit).

    Raises:
        ValueRangeError: unknown layer name (with close matches), or a non-loss value.
        CaptureError: at the model's forward, a layer output that is not a tensor and no selector.

    Example:
        >>> import torch, ctxpred
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 3, 1))
        >>> loss_fn = ctxpred.ContextPredictionLoss(
        ...     ctxpred.PixelNeighborhood(strides=(1, 2)),
        ...     ctxpred.GaussianSamplingHead(out_channels=3, in_channels=8, num_strides=2))
        >>> x = torch.randn(2, 3, 8, 8)
        >>> with ctxpred.attach(model, {"1": loss_fn}) as predictor:
        ...     out = model(x)
        ...     total = ((out - x) ** 2).mean() + 0.1 * predictor.loss(target=x)
        ...     total.backward()
        >>> model[0].weight.grad is not None, sorted(predictor.heads.keys())
        (True, ['1'])
    """
    return ContextPredictor(model, losses, selectors)
