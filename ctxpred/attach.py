"""Attach context-prediction losses to named layers of any model, through forward hooks.

```python
predictor = ctxpred.attach(unet, {"up_blocks.1": loss_a, "up_blocks.2": loss_b})
eps_hat = unet(x_t, t).sample                   # hooks capture the two block outputs
loss = mse(eps_hat, eps) + predictor.loss(target=x0)
loss.backward()                                 # grads reach the backbone and the heads
```

Contract:

* names are those of ``model.named_modules()`` (``str``, not ``''``, the model itself); a wrong
  name raises with the closest matches; attach before ``torch.compile`` (a compiled wrapper is
  refused, and code compiled before the hooks existed never runs them);
* outputs are captured **without detaching**, so the context loss trains the backbone; a capture
  that cannot carry gradient to a training model raises (a layer run under
  ``checkpoint(..., use_reentrant=True)``) or warns once (a forward under ``no_grad``);
* a capture is released by :meth:`ContextPredictor.loss` / :meth:`~ContextPredictor.losses`, and
  overwritten by the next forward of the model (a forward without a loss does not accumulate);
  a hooked module that runs twice in one forward raises;
* capturing is armed by a forward pre-hook on ``model`` itself and closed by its forward hook, so
  the recomputation of a checkpointed block during backward captures nothing;
* one ``target`` tensor goes to every layer whose neighborhood needs one (pixels, latents, ids);
  a feature-context layer takes none. A ``{layer: target}`` mapping may only name attached
  layers;
* :attr:`ContextPredictor.heads` holds only the heads (optimize it with the model): the model's
  ``state_dict`` is untouched, and a ``copy.deepcopy(model)`` (EMA) gets inert hooks that
  reference no head. Heads that no optimizer steps are noticed (their parameters' version
  counters, read every :attr:`ContextPredictor.optimizer_check_interval` training calls) and
  warned about once. The predictor itself refuses to be copied or pickled (a copy could never
  capture);
* :meth:`ContextPredictor.remove` (or leaving the ``with`` block) removes every hook.

With DDP, wrap :meth:`ContextPredictor.training_module` (the model and the heads in one module)
instead of the bare model, so that the heads' gradients are averaged across ranks too; call the
wrapper for the forward and ``predictor.loss(...)`` as usual (a forward that bypasses it while
``torch.distributed`` is initialized warns once). Every head takes part in every step, so
``find_unused_parameters`` can stay ``False``. Lazy heads (``in_channels=None``) must be
materialized first (:meth:`ContextPredictor.initialize`).

Example:
    >>> import torch, ctxpred
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 3, 1))
    >>> loss = ctxpred.ContextPredictionLoss(ctxpred.PixelNeighborhood(),
    ...                                      ctxpred.GaussianSamplingHead(3, 8))
    >>> predictor = ctxpred.attach(model, {"1": loss})  # the SiLU's output, (B, 8, H, W)
    >>> x0 = torch.randn(2, 3, 8, 8)
    >>> denoised = model(x0)  # the hook captures the layer output
    >>> predictor.loss(target=x0).shape
    torch.Size([])
    >>> predictor.remove()  # for sampling: the model is exactly as before
"""

from __future__ import annotations

import dataclasses
import difflib
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ctxpred._checks import needs_target, warn_user
from ctxpred.errors import CtxpredError, ValueRangeError
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
    if isinstance(output, Tensor) and not callable(selector):
        raise CaptureError(
            f"layer {name!r} returns a Tensor {tuple(output.shape)}, but its selector "
            f"{selector!r} would index into it (an int picks a batch element): drop the "
            f"selector for this layer, or pass a callable"
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


_MODEL_START, _MODEL_END = "<model forward>", "<model forward end>"


class _Hook:
    """Forward (pre-)hook bound weakly to its predictor; copies (deepcopy, pickle) are inert.

    ``name`` is a layer name, or :data:`_MODEL_START` / :data:`_MODEL_END` for the model's own
    pre- and post-hook (which arm the capture and close it).
    """

    def __init__(self, predictor: ContextPredictor | None, name: str) -> None:
        self._ref = None if predictor is None else weakref.ref(predictor)
        self.name = name

    def __call__(self, module: nn.Module, args: Any, output: Any = None) -> None:
        predictor = None if self._ref is None else self._ref()
        if predictor is None:
            return None
        if self.name == _MODEL_START:
            predictor._arm()
        elif self.name == _MODEL_END:
            predictor._in_forward = False
        else:
            predictor._capture(self.name, output)
        return None

    def __deepcopy__(self, memo: dict) -> _Hook:
        return _Hook(None, self.name)

    def __reduce__(self) -> tuple:
        return (_Hook, (None, self.name))


_WRAPPED_FLAG = "_ctxpred_forward_in_wrapper"
_LOSS_STATE = ("anchor_rms",)  # loss buffers a training checkpoint keeps (ModelWithHeads)


class ModelWithHeads(nn.Module):
    """``model`` and ``heads`` in one module (forward = ``model``'s), e.g. to wrap in DDP.

    DDP synchronizes the gradients of every parameter of the module it wraps; heads outside the
    DDP module would train differently on each rank. The model's own ``state_dict`` stays clean:
    this wrapper's keys are ``model.*`` and ``heads.*`` (a training checkpoint). Attributes the
    wrapper does not have come from the model (``save_pretrained``, ``config``, ...), so
    ``wrapper.save_pretrained(path)`` saves the model alone; ``wrapper.model`` is the model.

    The losses' own state, the feature-context scale anchor (``anchor_rms``), is saved and loaded
    with them as ``losses.<layer>.anchor_rms`` once it is set (at a feature-context loss's first
    call; losses that take no anchor have none): the losses are not children, whose heads would
    be listed twice. A checkpoint without those keys leaves the anchors as they are.

    Args:
        model: the hooked model.
        heads: the predictor's heads (:attr:`ContextPredictor.heads`).
        losses: the predictor's losses (:attr:`ContextPredictor.loss_modules`), whose state
            goes into the checkpoint.

    Example:
        >>> import ctxpred
        >>> heads = nn.ModuleDict({"mid": ctxpred.GaussianSamplingHead(3, 8)})
        >>> wrapper = ModelWithHeads(nn.Linear(4, 4), heads)  # predictor.training_module()
        >>> sorted({key.split(".")[0] for key in wrapper.state_dict()}), wrapper.in_features
        (['heads', 'model'], 4)
    """

    def __init__(self, model: nn.Module, heads: nn.Module,
                 losses: Mapping[str, nn.Module] | None = None) -> None:
        super().__init__()
        self.model = model
        self.heads = heads
        object.__setattr__(self, "_losses", {
            name.replace(".", "/"): loss for name, loss in (losses or {}).items()})

    def _loss_buffers(self, held_only: bool = False) -> Iterator[tuple[str, Tensor]]:
        """The losses' checkpointed buffers; ``held_only``: those holding a value (an anchor is
        NaN until the first call, and stays NaN in a loss that takes no anchor)."""
        for name, loss in self._losses.items():
            for key in _LOSS_STATE:
                buffer = loss._buffers.get(key)
                if buffer is not None and not (held_only and bool(torch.isnan(buffer).all())):
                    yield f"losses.{name}.{key}", buffer

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for key, buffer in self._loss_buffers(held_only=True):
            destination[prefix + key] = buffer if keep_vars else buffer.detach()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        with torch.no_grad():
            for key, buffer in self._loss_buffers():
                if prefix + key in state_dict:  # consumed here, so not "unexpected" below
                    buffer.copy_(state_dict.pop(prefix + key))
        super()._load_from_state_dict(state_dict, prefix, *args)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """``model(*args, **kwargs)``, with the predictor's hooks told that the heads run
        inside the same module (what DDP needs; see the class docstring)."""
        # tells the predictor's hooks that this forward runs with the heads in one module (DDP)
        object.__setattr__(self.heads, _WRAPPED_FLAG, True)
        try:
            return self.model(*args, **kwargs)
        finally:
            object.__setattr__(self.heads, _WRAPPED_FLAG, False)

    def __getattr__(self, name: str) -> Any:
        """Attributes that are not the wrapper's come from the model (``save_pretrained``,
        ``config``, ``dtype``, ...); ``state_dict()`` and ``parameters()`` stay the wrapper's
        (model and heads)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in {"model", "heads"} or name.startswith("__"):
                raise
            return getattr(super().__getattr__("model"), name)


class ContextPredictor:
    """Hooks, captured outputs and heads of :func:`attach` (the contract: :mod:`ctxpred.attach`).

    Built by :func:`attach`, which takes the same arguments.

    Args:
        model: the model to hook, any ``nn.Module``; only forward hooks are added to it.
        losses: ``{name in model.named_modules(): ContextPredictionLoss}``, one per hooked layer.
        selectors: how to pick the tensor from a layer output that is not a tensor (see
            :func:`attach`); ``None`` when every hooked layer returns a tensor.

    Attributes:
        model: the hooked model.
        loss_modules: ``{layer name: ContextPredictionLoss}``.
        heads: ``nn.ModuleDict`` of the heads only, keyed by layer name with ``.`` -> ``/``.
        last_losses: detached per-layer values of the last :meth:`loss` / :meth:`losses` call.

    Example:
        >>> import torch, ctxpred
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 3, 1))
        >>> predictor = ctxpred.attach(model, {"1": ctxpred.ContextPredictionLoss(
        ...     ctxpred.PixelNeighborhood(), ctxpred.GaussianSamplingHead(3, 8))})
        >>> optimizer = torch.optim.Adam(predictor.training_module().parameters())
        >>> x0 = torch.randn(2, 3, 8, 8)  # the clean images, (B, C, H, W)
        >>> loss = ((model(x0) - x0) ** 2).mean() + predictor.loss(target=x0)
        >>> loss.backward(); optimizer.step()
        >>> sorted(predictor.last_losses), predictor.attached
        (['1'], True)
        >>> predictor.remove(); predictor.attached
        False
    """

    #: every this many :meth:`losses` calls with gradients on, the heads' parameters must have
    #: changed (an optimizer step) since the previous check, else a warning (once).
    optimizer_check_interval: int = 50

    def __init__(
        self,
        model: nn.Module,
        losses: Mapping[str, ContextPredictionLoss],
        selectors: Mapping[str, Selector] | Selector | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueRangeError(f"model must be an nn.Module, got {type(model).__name__}")
        if type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod"):
            raise ValueRangeError(
                "attach() got a torch.compile'd module: attach to the model before compiling "
                "(predictor = attach(model, ...); model = torch.compile(model)); code compiled "
                "before the hooks exist never runs them"
            )
        if not isinstance(losses, Mapping):
            raise ValueRangeError(
                f"losses must be a mapping {{layer name: ContextPredictionLoss}}, got "
                f"{type(losses).__name__}; e.g. attach(model, {{'mid_block': loss}})"
            )
        if not losses:
            raise ValueRangeError("losses must map at least one layer name to a loss")
        first_of: dict[int, str] = {}
        for name, loss in losses.items():
            if id(loss) in first_of:
                raise ValueRangeError(
                    f"layers {first_of[id(loss)]!r} and {name!r} share one loss object: each "
                    f"layer needs its own ContextPredictionLoss (one object holds one layer's "
                    f"name, scale anchor and head); build one per layer"
                )
            first_of[id(loss)] = name
        modules = dict(model.named_modules())
        for name, loss in losses.items():
            if not isinstance(name, str):
                raise ValueRangeError(
                    f"layer names must be str, the names of model.named_modules(), got "
                    f"{type(name).__name__} {name!r}"
                )
            if name == "":
                raise ValueRangeError(
                    "the name '' is the root module, the model itself: its output is the "
                    "model's prediction, not a representation to hook; name a submodule from "
                    "model.named_modules()"
                )
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
            unknown = sorted(set(selectors) - set(losses), key=str)
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
        self._in_forward = False
        self._forwards = 0
        self._grad_at_forward = True
        self._forward_wrapped = False
        self._capture_grad: dict[str, bool] = {}
        self._warned: set[str] = set()
        self._loss_calls = 0
        self._head_versions: int | None = None
        self._handles = [model.register_forward_pre_hook(_Hook(self, _MODEL_START)),
                         model.register_forward_hook(_Hook(self, _MODEL_END))]
        for name in losses:
            self._handles.append(modules[name].register_forward_hook(_Hook(self, name)))

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise CaptureError(
            "a ContextPredictor cannot be copied or pickled: its hooks live on the original "
            "model, so a copy would never capture. Save the heads (predictor.heads.state_dict(), "
            "or training_module().state_dict() for model and heads) and call attach() again on "
            "the loaded model"
        )

    # -- hooks --------------------------------------------------------------------------------
    def _arm(self) -> None:
        self._captured.clear()
        self._capture_grad.clear()
        self._armed = True
        self._in_forward = True
        self._forwards += 1
        self._grad_at_forward = torch.is_grad_enabled()
        self._forward_wrapped = bool(getattr(self.heads, _WRAPPED_FLAG, False)) or (
            "ddp" not in self._warned and self._inside_ddp_with_heads())

    def _inside_ddp_with_heads(self) -> bool:
        """Whether this forward runs inside a DDP module that holds the heads (a wrapper of the
        user's own); only looked at while torch.distributed is initialized."""
        distributed = torch.distributed
        if not (distributed.is_available() and distributed.is_initialized()):
            return False
        active = getattr(nn.parallel.DistributedDataParallel, "_active_ddp_module", None)
        if active is None:
            return False
        first = next(self.heads.parameters(), None)
        return first is not None and any(p is first for p in active.module.parameters())

    def _capture(self, name: str, output: Any) -> None:
        if not (self._armed and self._in_forward):
            return  # e.g. a checkpointed block recomputed during backward
        if name in self._captured:
            raise CaptureError(
                f"layer {name!r} ran 2 times in one forward of the model (a module shared by "
                f"several places, e.g. one activation module reused): its captures would "
                f"overwrite each other; hook a module that runs once per forward"
            )
        features = _select(output, self._selectors.get(name), name)
        loss = self.loss_modules[name]
        if (loss.head.in_channels is not None and features.dim() >= 3
                and features.is_floating_point()):  # fail at the forward
            channels = loss.layout(features).channels
            loss.head.check_in_channels(
                channels, f"layer {name!r} outputs {channels} channels, shape "
                f"{tuple(features.shape)}")
        self._captured[name] = features
        self._capture_grad[name] = torch.is_grad_enabled()

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
        self._capture_grad.clear()
        self._armed = False

    # -- checks -------------------------------------------------------------------------------
    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warn_user(message)

    def _missing_error(self, missing: list[str]) -> CaptureError:
        head = f"no captured output for layers {missing}"
        compiled_hint = (
            "code compiled by torch.compile before attach() does not run hooks added later "
            "(this includes code compiled for another instance of the same model class): "
            "attach first, then compile, or call torch._dynamo.reset() after attach()"
        )
        if not self.attached:
            return CaptureError(
                f"{head}: the hooks were removed (predictor.remove() or the end of its with "
                f"block); call ctxpred.attach() again to train with context prediction"
            )
        if self._forwards == 0:
            return CaptureError(
                f"{head}: no forward of the model ran through the hooks since attach(). Likely "
                f"causes: (1) the forward ran on a copy of the model (deepcopy, EMA), whose "
                f"hooks are inert, or on a torch.compile wrapper made before attach(): "
                f"{compiled_hint}; (2) no forward ran yet: run the model forward before each "
                f"loss()"
            )
        if self._armed and len(missing) == len(self.loss_modules):
            return CaptureError(
                f"{head}: the model ran but none of the hooked layers did. Likely cause: "
                f"{compiled_hint}. Otherwise check that forward() calls these layers"
            )
        if self._armed:
            return CaptureError(
                f"{head}: these layers did not run during the model's last forward although "
                f"the model did; check that forward() calls them (a branch not taken, a module "
                f"defined but unused)"
            )
        return CaptureError(
            f"{head}: run the model forward (with the hooks attached) before each loss(); "
            f"captures are consumed by loss()/losses()"
        )

    def _check_gradient_path(self, name: str, features: Tensor) -> None:
        """A capture without gradient while training: the loss would train only the head."""
        if (features.requires_grad or not features.is_floating_point()
                or not torch.is_grad_enabled() or not self.model.training
                or not any(p.requires_grad for p in self.model.parameters())):
            return
        if self._grad_at_forward and not self._capture_grad.get(name, True):
            raise CaptureError(
                f"layer {name!r} ran with gradients disabled inside the model's forward (e.g. "
                f"torch.utils.checkpoint.checkpoint(..., use_reentrant=True) around it), so "
                f"its output carries no gradient and the context loss would train only the "
                f"head: use checkpoint(..., use_reentrant=False) (diffusers: the default of "
                f"enable_gradient_checkpointing() in recent versions)"
            )
        self._warn_once(
            f"no-grad:{name}",
            f"layer {name!r}: the captured output carries no gradient (forward under "
            f"torch.no_grad()/inference_mode(), or every parameter below the layer frozen), so "
            f"the context loss trains only the head, not the model; run the training forward "
            f"with gradients on (warned once)",
        )

    def _check_distributed(self) -> None:
        if "ddp" in self._warned or self._forward_wrapped:
            return
        distributed = torch.distributed
        if not (distributed.is_available() and distributed.is_initialized()):
            return
        self._warn_once(
            "ddp",
            "torch.distributed is initialized but the model's forward did not run through "
            "predictor.training_module(): heads outside the DDP/FSDP-wrapped module are not "
            "synchronized and drift apart across ranks; wrap "
            "DistributedDataParallel(predictor.training_module()) instead of the bare model "
            "(warned once)",
        )

    def _check_heads_train(self) -> None:
        """Every ``optimizer_check_interval`` training calls: did an optimizer step the heads?"""
        if "optimizer" in self._warned or not torch.is_grad_enabled():
            return
        self._loss_calls += 1
        if (self._loss_calls - 1) % self.optimizer_check_interval:
            return  # checks at calls 1, 1 + N, 1 + 2N, ...
        params = [p for p in self.heads.parameters()
                  if p.requires_grad and not isinstance(p, nn.parameter.UninitializedParameter)]
        if not params:
            return
        version = sum(p._version for p in params)
        if self._head_versions is not None and version == self._head_versions:
            self._warn_once(
                "optimizer",
                f"the context heads' parameters have not changed in the last "
                f"{self.optimizer_check_interval} training calls of loss(): the heads are "
                f"probably not in the optimizer; build it from predictor.training_module()"
                f".parameters() (model and heads) or add predictor.parameters() (warned once)",
            )
        self._head_versions = version

    def _check_targets(self, target: Any) -> None:
        if isinstance(target, Mapping):
            unknown = [key for key in target if key not in self.loss_modules]
            if unknown:
                names = [n for n in self.loss_modules]
                details = []
                for key in unknown:
                    if isinstance(key, str) and key.replace("/", ".") in self.loss_modules:
                        details.append(f"{key!r} (did you mean {key.replace('/', '.')!r}?)")
                        continue
                    close = difflib.get_close_matches(str(key), names, n=3, cutoff=0.5)
                    details.append(f"{key!r}" + (f" (close: {close})" if close else ""))
                raise ValueRangeError(
                    f"the target mapping names layers that are not attached: "
                    f"{', '.join(details)}; attached layers: {names}"
                )
        elif target is not None and not any(
                _needs_target(loss) for loss in self.loss_modules.values()):
            raise ValueRangeError(
                f"a target was given but every attached layer {list(self.loss_modules)} predicts "
                f"its own features (feature context) and takes no target; call loss() without "
                f"target, or pass {{layer: tensor}} to give a layer an explicit one"
            )

    # -- losses -------------------------------------------------------------------------------
    def _target_for(self, name: str, target: Any) -> Tensor | None:
        if isinstance(target, Mapping):
            return target.get(name)
        if not _needs_target(self.loss_modules[name]):
            return None  # a feature-context layer: one target means the clean signal
        return target

    def losses(
        self,
        target: Tensor | Mapping[str, Tensor] | None = None,
        generator: torch.Generator | None = None,
        sample_weight: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Per-layer weighted losses ``{name: scalar}``; releases the captured outputs.

        ``target`` is one tensor (the clean signal, for every layer that needs a target; a
        feature-context layer takes none), a ``{name: tensor}`` mapping (its keys must be
        attached layers), or ``None``. ``generator`` (optional) drives every random choice of
        the step (query-point subsets, the heads' sampling noise) instead of the global RNG,
        for reproducible or resumable training. ``sample_weight``
        (optional) ``(B,)`` weights each sample's loss before the batch mean, in every layer
        (e.g. by diffusion timestep; see :func:`ctxpred.loss.reduce_context_loss`).
        """
        missing = [name for name in self.loss_modules if name not in self._captured]
        if missing:
            error = self._missing_error(missing)
            self.release()
            raise error
        out = {}
        try:
            self._check_targets(target)
            self._check_distributed()
            if not torch.is_grad_enabled() and self.model.training and any(
                    f.requires_grad for f in self._captured.values()):
                self._warn_once(
                    "loss-no-grad",
                    "loss() runs with gradients disabled (torch.no_grad()) after a training-mode "
                    "forward that tracked gradients: this context loss cannot train the model or "
                    "the heads; call loss() outside no_grad in the training step (or put the "
                    "model in eval() for validation) (warned once)",
                )
            for name, loss in self.loss_modules.items():
                features = self._captured[name]
                self._check_gradient_path(name, features)
                try:
                    out[name] = loss(
                        features, self._target_for(name, target), generator,
                        sample_weight=sample_weight,
                    )
                except CtxpredError as err:
                    if f"{name!r}" in str(err):
                        raise
                    raise type(err)(f"layer {name!r}: {err}") from err
        finally:
            self.release()
        self._check_heads_train()
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
        return ModelWithHeads(self.model, self.heads, self.loss_modules)

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


def _needs_target(loss: ContextPredictionLoss) -> bool:
    """Whether the loss's neighborhood reads a target (pixels, latents, ids), not the features."""
    return needs_target(loss.neighborhood)


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
