"""Every slip a new user makes either works (and equals an oracle) or stops them early and clearly.

Issue 13. One row per misuse: the scenarios 1-14 of the issue, then others found by using the
public API as a newcomer would. A row's outcome is one of

* ``works``: the scenario function runs and checks its result against an oracle itself, and no
  ``UserWarning`` is raised from ctxpred;
* ``raises``: a :class:`ctxpred.CtxpredError` subclass whose message matches (names the argument
  and the fix);
* ``warns``: a ``UserWarning`` whose message matches (only where the issue allows a warning).

Only the public API is used (``ctxpred.*``, ``ContextPredictor`` methods, the loss's ``terms``),
so the table survives internal refactors. Each scenario takes the ``device`` of the run (see the
root ``conftest.py``); rows that cannot run on a device skip there.
"""

from __future__ import annotations

import copy
import gc
import os
import pickle
import warnings
from collections.abc import Callable
from typing import ClassVar, NamedTuple

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

import ctxpred
from ctxpred import (
    CaptureError,
    ContextPredictionLoss,
    CtxpredError,
    DTypeError,
    GaussianSamplingHead,
    NaiveHead,
    PixelNeighborhood,
    ShapeError,
    TokenNeighborhood,
    ValueRangeError,
)

# The feature-context extractor (stop-gradient on the layer's own features); renamed in the
# architecture refactor, with the old name kept as a deprecated alias.
FeatureNeighborhood = (ctxpred.FeatureNeighborhood if hasattr(ctxpred, "FeatureNeighborhood")
                       else ctxpred.MultiStrideNeighborhood)



# -- a small backbone and losses ----------------------------------------------------------------
class Net(nn.Module):
    """in (3) -> inp (8) -> mid (8) -> out (3); ``checkpointing`` wraps ``mid`` (a block)."""

    def __init__(self, checkpointing: str | None = None) -> None:
        super().__init__()
        self.checkpointing = checkpointing
        self.inp = nn.Conv2d(3, 8, 3, padding=1)
        self.mid = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.SiLU())
        self.out = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        if self.checkpointing == "reentrant":
            h = checkpoint(self.mid, h, use_reentrant=True)
        elif self.checkpointing == "non_reentrant":
            h = checkpoint(self.mid, h, use_reentrant=False)
        else:
            h = self.mid(h)
        return self.out(h)


def pixel_loss(out_channels: int = 3, in_channels: int | None = 8, **kw) -> ContextPredictionLoss:
    return ContextPredictionLoss(
        PixelNeighborhood(strides=(1, 2)),
        GaussianSamplingHead(out_channels, in_channels, num_samples=4, num_strides=2), **kw)


def naive_loss(out_channels: int = 3, in_channels: int = 8, **kw) -> ContextPredictionLoss:
    """Deterministic head: a loss whose value an oracle can recompute exactly."""
    return ContextPredictionLoss(
        PixelNeighborhood(strides=(1,)), NaiveHead(out_channels, 8, in_channels), **kw)


def feature_loss(channels: int = 8) -> ContextPredictionLoss:
    return ContextPredictionLoss(
        FeatureNeighborhood(strides=(1,)), GaussianSamplingHead(channels, channels, num_samples=4))


def images(device: torch.device, batch: int = 2, size: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g).to(device)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def net(device: torch.device, seed: int = 0, **kw) -> Net:
    torch.manual_seed(seed)
    return Net(**kw).to(device)


def grads(module: nn.Module) -> torch.Tensor:
    return torch.cat([torch.zeros_like(p).flatten() if p.grad is None else p.grad.flatten()
                      for p in module.parameters()])


# -- 1. a pixel/token layer without a target, a misspelled target key ----------------------------
def s01_pixel_layer_without_target(device):
    # out_channels == the layer's 8 channels: today this silently predicts its own features.
    model, x = net(device), images(device)
    predictor = ctxpred.attach(model, {"mid": pixel_loss(out_channels=8).to(device)})
    model(x)
    predictor.loss()


def s01_token_layer_without_target(device):
    loss = ContextPredictionLoss(
        TokenNeighborhood(strides=(1,), codebook=torch.randn(5, 8)),
        GaussianSamplingHead(8, 8, num_samples=4)).to(device)
    loss(torch.randn(2, 8, 4, 4, device=device))


def s01_misspelled_target_key(device):
    model, x = net(device), images(device)
    predictor = ctxpred.attach(model, {"mid": pixel_loss(out_channels=8).to(device)})
    model(x)
    predictor.loss({"mdi": x})


def s01_target_key_of_a_layer_not_attached(device):
    model, x = net(device), images(device)
    predictor = ctxpred.attach(model, {"mid": pixel_loss().to(device)})
    model(x)
    predictor.loss({"mid": x, "inp": x})


def s01_mapping_misses_a_pixel_layer(device):
    model, x = net(device), images(device)
    predictor = ctxpred.attach(model, {"mid": pixel_loss(out_channels=8).to(device),
                                       "inp": pixel_loss().to(device)})
    model(x)
    predictor.loss({"inp": x})


# -- 2. NaN / Inf in the target --------------------------------------------------------------------
def _nan_target(device, value):
    model, x = net(device), images(device)
    predictor = ctxpred.attach(model, {"mid": pixel_loss().to(device)})
    model(x)
    bad = x.clone()
    bad[1, 2, 3, 4] = value
    predictor.loss(bad)


def s02_nan_target(device):
    _skip_on_cuda(device, "an async device assert would poison the CUDA context of the run")
    _nan_target(device, float("nan"))


def s02_inf_target(device):
    _skip_on_cuda(device, "an async device assert would poison the CUDA context of the run")
    _nan_target(device, float("inf"))


def s02_finite_check_opt_out(device):
    loss = pixel_loss(check_finite=False).to(device)
    target = images(device)
    target[0, 0, 0, 0] = float("nan")
    assert torch.isnan(loss(torch.randn(2, 8, 8, 8, device=device), target))


# -- 3. gradient checkpointing, no-grad captures ---------------------------------------------------
def s03_reentrant_checkpoint_inside_the_block(device):
    # the hooked conv runs inside checkpoint(..., use_reentrant=True), i.e. under no_grad
    model, x = net(device, checkpointing="reentrant"), images(device)
    predictor = ctxpred.attach(model, {"mid.0": pixel_loss().to(device)})
    model(x)
    predictor.loss(x)


def s03_reentrant_checkpoint_of_the_hooked_block_itself(device):
    # the hooked module is the checkpointed function: its output is the checkpoint's output,
    # which carries gradient; the model's gradients equal those without checkpointing.
    got = []
    for mode in (None, "reentrant"):
        model, x = net(device, checkpointing=mode), images(device)
        loss = pixel_loss().to(device)
        torch.manual_seed(1)
        loss.head.load_state_dict(pixel_loss().head.state_dict())
        predictor = ctxpred.attach(model, {"mid": loss})
        model(x)
        predictor.loss(x, generator=gen(2)).backward()
        assert predictor.captured == {}
        got.append(grads(model))
    torch.testing.assert_close(got[0], got[1])
    assert got[0].abs().sum() > 0


def s03_training_forward_under_no_grad_then_loss(device):
    model, x = net(device), images(device)
    predictor = ctxpred.attach(model, {"mid": pixel_loss().to(device)})
    with torch.no_grad():
        model(x)
    predictor.loss(x)


def s03_training_forward_under_inference_mode_then_loss(device):
    model, x = net(device), images(device)
    predictor = ctxpred.attach(model, {"mid": pixel_loss().to(device)})
    with torch.inference_mode():
        model(x)
    predictor.loss(x)


def s03_validation_under_no_grad(device):
    model, x = net(device), images(device)
    predictor = ctxpred.attach(model, {"mid": naive_loss().to(device)})
    with torch.no_grad():
        model(x)
        value = predictor.loss(x)
    reference = naive_loss().to(device)
    reference.load_state_dict(predictor.loss_modules["mid"].state_dict())
    torch.testing.assert_close(value, reference(model.mid(model.inp(x)), x).detach())


# -- 4. DDP around the model only ------------------------------------------------------------------
def _ddp_step(device, tmp_path, wrap_training_module):
    import torch.distributed as dist

    if device.type != "cpu":
        pytest.skip("the gloo process group of this row runs on CPU")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")

    def train():
        model, x = net(device), images(device)
        predictor = ctxpred.attach(model, {"mid": pixel_loss().to(device)})
        wrapped = predictor.training_module() if wrap_training_module else model
        ddp = nn.parallel.DistributedDataParallel(wrapped)
        for _ in range(2):
            out = ddp(x)
            (((out - x) ** 2).mean() + predictor.loss(x)).backward()

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        train()
        gc.collect()  # free DDP's reducer while its process group is alive
    finally:
        dist.destroy_process_group()


def s04_ddp_wraps_only_the_model(device, tmp_path):
    _ddp_step(device, tmp_path, wrap_training_module=False)


def s04_ddp_wraps_the_training_module(device, tmp_path):
    _ddp_step(device, tmp_path, wrap_training_module=True)


def s04_ddp_warning_comes_once(device, tmp_path):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _ddp_step(device, tmp_path, wrap_training_module=False)  # two steps
    hits = [w for w in record if "training_module()" in str(w.message)]
    assert len(hits) == 1, [str(w.message) for w in record]


# -- 5. heads left out of the optimizer ------------------------------------------------------------
def _train(device, params_of, steps):
    model, x = net(device), images(device, size=4)
    predictor = ctxpred.attach(model, {"mid": naive_loss(points=2).to(device)})
    opt = torch.optim.SGD(params_of(model, predictor), lr=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        out = model(x)
        (((out - x) ** 2).mean() + predictor.loss(x)).backward()
        opt.step()
    return predictor


def s05_heads_left_out_of_the_optimizer(device):
    _train(device, lambda model, predictor: model.parameters(), steps=60)


def s05_heads_left_out_warns_once(device):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _train(device, lambda model, predictor: model.parameters(), steps=160)
    hits = [w for w in record if "optimizer" in str(w.message)]
    assert len(hits) == 1, [str(w.message) for w in record]


def s05_heads_in_the_optimizer(device):
    _train(device, lambda model, predictor: predictor.training_module().parameters(), steps=60)


# -- 6. a target upsampled, or resized with another aspect ratio ----------------------------------
def s06_target_smaller_than_the_layer_grid(device):
    model, x = net(device), images(device)
    predictor = ctxpred.attach(model, {"mid": pixel_loss().to(device)})
    model(x)
    predictor.loss(images(device, size=4))


def s06_upsampling_warning_comes_once(device):
    model, x = net(device), images(device)
    predictor = ctxpred.attach(model, {"mid": pixel_loss().to(device)})
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            model(x)
            predictor.loss(images(device, size=4))
    hits = [w for w in record if "upsampled" in str(w.message)]
    assert len(hits) == 1, [str(w.message) for w in record]
    assert hits[0].filename == __file__  # points at the user's line, not into the library


def s06_target_with_another_aspect_ratio(device):
    model, x = net(device), images(device)
    predictor = ctxpred.attach(model, {"mid": pixel_loss().to(device)})
    model(x)
    predictor.loss(torch.randn(2, 3, 16, 32, device=device))


def s06_transposed_target_on_a_small_layer_grid(device):
    # a 4 x 3 layer grid takes a 24 x 32 image only transposed; it used to pass the aspect check,
    # which allowed each layer size a whole cell of rounding
    loss = pixel_loss().to(device)
    loss(torch.randn(2, 8, 4, 3, device=device), torch.randn(2, 3, 24, 32, device=device))


def s06_target_downsampled_by_area(device):
    # oracle: a 2x area resize is a 2x2 average pool
    loss = naive_loss().to(device)
    feats, big = torch.randn(2, 8, 4, 4, device=device), images(device)
    torch.testing.assert_close(loss(feats, big), loss(feats, F.avg_pool2d(big, 2)))


# -- 7. a bfloat16 model with float32 heads --------------------------------------------------------
def s07_bf16_model_float32_heads(device):
    model, x = net(device).to(torch.bfloat16), images(device)
    loss = naive_loss().to(device)
    predictor = ctxpred.attach(model, {"mid": loss})
    model(x.bfloat16())
    features = predictor.captured["mid"]
    value = predictor.loss(x)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, loss(features.float(), x))
    value.backward()
    assert model.inp.weight.grad.dtype == torch.bfloat16
    assert torch.isfinite(model.inp.weight.grad).all() and model.inp.weight.grad.abs().sum() > 0


def s07_float64_heads_float32_model(device):
    model, x = net(device), images(device)
    loss = naive_loss().to(device)
    predictor = ctxpred.attach(model, {"mid": loss})
    predictor.to(torch.float64)
    model(x)
    features = predictor.captured["mid"]
    value = predictor.loss(x)
    torch.testing.assert_close(value, loss(features.double(), x.double()))


# -- 8. a uint8 image target -----------------------------------------------------------------------
def s08_uint8_image_target(device):
    model, x = net(device), images(device)
    predictor = ctxpred.attach(model, {"mid": pixel_loss().to(device)})
    model(x)
    predictor.loss((x * 60 + 128).clamp(0, 255).to(torch.uint8))


def s08_bool_target(device):
    model, x = net(device), images(device)
    predictor = ctxpred.attach(model, {"mid": pixel_loss().to(device)})
    model(x)
    predictor.loss(x > 0)


# -- 9. a channels-last (B, H, W, C) target --------------------------------------------------------
def s09_channels_last_layout_target(device):
    model, x = net(device), images(device)
    predictor = ctxpred.attach(model, {"mid": pixel_loss().to(device)})
    model(x)
    predictor.loss(x.permute(0, 2, 3, 1))


def s09_channels_last_memory_format_works(device):
    # a channels_last *memory format* is still (B, C, H, W): same value as contiguous
    loss = naive_loss().to(device)
    feats, target = torch.randn(2, 8, 8, 8, device=device), images(device)
    torch.testing.assert_close(
        loss(feats.to(memory_format=torch.channels_last),
             target.to(memory_format=torch.channels_last)),
        loss(feats, target))


# -- 10. one target while a feature-context layer is attached --------------------------------------
def s10_single_target_with_a_feature_layer(device):
    model, x = net(device), images(device)
    predictor = ctxpred.attach(model, {"inp": naive_loss().to(device),
                                       "mid": feature_loss().to(device)})
    model(x)
    single = predictor.losses(x, generator=gen(3))
    model(x)
    mapped = predictor.losses({"inp": x}, generator=gen(3))
    assert set(single) == {"inp", "mid"}
    for name in single:
        torch.testing.assert_close(single[name], mapped[name])


def s10_single_target_with_only_feature_layers(device):
    model, x = net(device), images(device)
    predictor = ctxpred.attach(model, {"mid": feature_loss().to(device)})
    model(x)
    predictor.loss(x)


# -- 11. 1-D, 2-D, 3-D conv maps and token sequences, by an explicit layout ------------------------
def _naive_1d_oracle(loss, feats, target):
    """Naive loop: stride-1 neighbors i-1, i+1 of a (B, C, L) target, head read at point i."""
    head = loss.head
    batch, _, length = feats.shape
    total = 0.0
    for b in range(batch):
        per_point = []
        for i in range(length):
            pred = head(feats[b, :, i].reshape(1, 1, -1))[0, 0, 0]  # (K_s=2, C)
            errs = [((pred[k] - target[b, :, j]) ** 2).sum()
                    for k, j in enumerate((i - 1, i + 1)) if 0 <= j < length]
            per_point.append(sum(errs) / len(errs))
        total = total + sum(per_point) / length
    return loss.weight * total / batch


def s11_conv1d_map_with_layout(device):
    loss = ContextPredictionLoss(PixelNeighborhood(strides=(1,)), NaiveHead(3, 2, 8),
                                 layout="channels_first").to(device)
    feats, target = torch.randn(2, 8, 7, device=device), torch.randn(2, 3, 7, device=device)
    torch.testing.assert_close(loss(feats, target), _naive_1d_oracle(loss, feats, target))


def s11_conv1d_map_without_layout(device):
    loss = ContextPredictionLoss(PixelNeighborhood(strides=(1,)), NaiveHead(3, 2, 8)).to(device)
    loss(torch.randn(2, 8, 7, device=device), torch.randn(2, 3, 7, device=device))


def s11_conv1d_map_with_grid_shape(device):
    loss = ContextPredictionLoss(PixelNeighborhood(strides=(1,)), NaiveHead(3, 2, 8),
                                 grid_shape=(7,)).to(device)
    loss(torch.randn(2, 8, 7, device=device), torch.randn(2, 3, 7, device=device))


def s11_token_sequence_1d_with_layout(device):
    loss = ContextPredictionLoss(PixelNeighborhood(strides=(1,)), NaiveHead(3, 2, 8),
                                 layout="tokens").to(device)
    feats, target = torch.randn(2, 8, 7, device=device), torch.randn(2, 3, 7, device=device)
    torch.testing.assert_close(loss(feats.transpose(1, 2), target),
                               _naive_1d_oracle(loss, feats, target))


def s11_conv3d_map_equals_its_token_sequence(device):
    feats, target = torch.randn(2, 8, 3, 4, 4, device=device), torch.randn(
        2, 3, 3, 4, 4, device=device)
    head = NaiveHead(3, 26, 8)
    cf = ContextPredictionLoss(PixelNeighborhood(strides=(1,)), head).to(device)
    tokens = ContextPredictionLoss(PixelNeighborhood(strides=(1,)), head,
                                   grid_shape=(3, 4, 4)).to(device)
    torch.testing.assert_close(tokens(feats.flatten(2).transpose(1, 2), target),
                               cf(feats, target))


# -- 12. attach() with an int key, a list, or the root module --------------------------------------
def s12_int_layer_name(device):
    ctxpred.attach(net(device), {0: pixel_loss()})


def s12_list_instead_of_a_dict(device):
    ctxpred.attach(net(device), [pixel_loss()])


def s12_root_module(device):
    ctxpred.attach(net(device), {"": pixel_loss()})


# -- 13. compiling before attaching ----------------------------------------------------------------
def s13_compiled_before_attach(device):
    torch._dynamo.reset()  # compiled code is shared by every instance of a class
    model, x = net(device), images(device)
    compiled = torch.compile(model, backend="eager")
    compiled(x)
    predictor = ctxpred.attach(model, {"mid": pixel_loss().to(device)})
    compiled(x)
    predictor.loss(x)


def s13_attach_to_the_compiled_wrapper(device):
    torch._dynamo.reset()
    compiled = torch.compile(net(device), backend="eager")
    ctxpred.attach(compiled, {"mid": pixel_loss().to(device)})


def s13_compiled_after_attach(device):
    torch._dynamo.reset()  # compiled code is shared by every instance of a class
    values, model_grads = [], []
    for compile_it in (False, True):
        model, x = net(device), images(device)
        loss = naive_loss().to(device)
        torch.manual_seed(5)
        loss.head.load_state_dict(naive_loss().head.state_dict())
        predictor = ctxpred.attach(model, {"mid": loss})
        run = torch.compile(model, backend="eager") if compile_it else model
        run(x)
        value = predictor.loss(x)
        value.backward()
        values.append(value.detach())
        model_grads.append(grads(model))
    torch.testing.assert_close(values[0], values[1])
    torch.testing.assert_close(model_grads[0], model_grads[1])


# -- 14. copies of the predictor, training_module() forwarding -----------------------------------
def s14_deepcopy_of_the_predictor(device):
    copy.deepcopy(ctxpred.attach(net(device), {"mid": pixel_loss().to(device)}))


def s14_pickle_of_the_predictor(device):
    pickle.dumps(ctxpred.attach(net(device), {"mid": pixel_loss().to(device)}))


def s14_training_module_forwards_save_pretrained(device, tmp_path):
    class Pretrained(Net):
        config: ClassVar[dict] = {"channels": 8}

        def save_pretrained(self, path):
            torch.save(self.state_dict(), os.path.join(path, "model.pt"))

    torch.manual_seed(0)
    model = Pretrained().to(device)
    wrapper = ctxpred.attach(model, {"mid": pixel_loss().to(device)}).training_module()
    wrapper.save_pretrained(tmp_path)
    saved = torch.load(tmp_path / "model.pt")
    assert list(saved) == list(model.state_dict())  # the model only: no head in it
    assert wrapper.config == {"channels": 8}
    assert {k.split(".")[0] for k in wrapper.state_dict()} == {"model", "heads"}


def s14_ema_copy_of_the_model(device):
    model, x = net(device), images(device)
    predictor = ctxpred.attach(model, {"mid": pixel_loss().to(device)})
    ema = copy.deepcopy(model)
    torch.testing.assert_close(ema(x), model(x))
    captured = predictor.captured["mid"]
    ema(x)  # the copy's hooks are inert: the model's capture stays
    assert predictor.captured["mid"] is captured
    assert not {id(p) for p in predictor.parameters()} & {id(p) for p in ema.parameters()}


# -- others: devices, dtypes, ranks, layers, generators ------------------------------------------
def _skip_on_cuda(device, why):
    if device.type == "cuda":
        pytest.skip(why)


def _skip_on_cpu(device, why):
    if device.type == "cpu":
        pytest.skip(why)


def x01_heads_on_another_device_than_the_features(device):
    loss = pixel_loss()  # heads stay on the CPU; the features live elsewhere
    loss(torch.randn(2, 8, 4, 4, device="meta"), torch.randn(2, 3, 4, 4, device="meta"))


def x02_target_on_another_device_than_the_features(device):
    pixel_loss().to(device)(torch.randn(2, 8, 4, 4, device=device),
                            torch.randn(2, 3, 4, 4, device="meta"))


def x03_cpu_generator_with_a_loss_on_the_device(device):
    _skip_on_cpu(device, "needs a second device type")
    loss = pixel_loss(points=4).to(device)
    feats, target = torch.randn(2, 8, 4, 4, device=device), images(device, size=4)
    torch.testing.assert_close(loss(feats, target, torch.Generator().manual_seed(0)),
                               loss(feats, target, torch.Generator().manual_seed(0)))


def x04_unbatched_target(device):
    model, x = net(device), images(device, batch=3)
    predictor = ctxpred.attach(model, {"mid": pixel_loss().to(device)})
    model(x)
    predictor.loss(x[0])


def x05_module_called_twice_per_forward(device):
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
            self.act, self.out = nn.SiLU(), nn.Conv2d(8, 3, 1)

        def forward(self, x):
            return self.out(self.act(self.b(self.act(self.a(x)))))

    model, x = Shared().to(device), images(device)
    predictor = ctxpred.attach(model, {"act": pixel_loss().to(device)})
    model(x)
    predictor.loss(x)


def x06_layer_that_does_not_run(device):
    model, x = net(device), images(device)
    model.unused = nn.Conv2d(8, 8, 1).to(device)
    predictor = ctxpred.attach(model, {"unused": pixel_loss().to(device)})
    model(x)
    predictor.loss(x)


def x06_some_layers_do_not_run(device):
    model, x = net(device), images(device)
    model.unused = nn.Conv2d(8, 8, 1).to(device)
    predictor = ctxpred.attach(model, {"unused": pixel_loss().to(device),
                                       "mid": pixel_loss().to(device)})
    model(x)
    predictor.loss(x)


def x07_loss_after_remove(device):
    model, x = net(device), images(device)
    predictor = ctxpred.attach(model, {"mid": pixel_loss().to(device)})
    predictor.remove()
    model(x)
    predictor.loss(x)


def x08_float64_target_float32_features(device):
    loss = naive_loss().to(device)
    feats, target = torch.randn(2, 8, 4, 4, device=device), images(device, size=4)
    value = loss(feats, target.double())
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, loss(feats, target))


def x09_bf16_autocast_close_to_float32(device):
    loss = naive_loss().to(device)
    feats, target = torch.randn(2, 8, 4, 4, device=device), images(device, size=4)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        value = loss(feats, target)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, loss(feats, target), rtol=3e-2, atol=1e-2)


def x10_target_list(device):
    model, x = net(device), images(device)
    predictor = ctxpred.attach(model, {"mid": pixel_loss().to(device)})
    model(x)
    predictor.loss([x])


def x11_selector_for_an_unknown_layer(device):
    ctxpred.attach(net(device), {"mid": pixel_loss()}, selectors={"mdi": 0})


def x12_integer_layer_output(device):
    model, x = net(device), images(device)
    predictor = ctxpred.attach(model, {"mid": pixel_loss().to(device)},
                               selectors={"mid": lambda out: (out * 10).long()})
    model(x)
    predictor.loss(x)


def x13_loss_twice_after_one_forward(device):
    model, x = net(device), images(device)
    predictor = ctxpred.attach(model, {"mid": pixel_loss().to(device)})
    model(x)
    predictor.loss(x)
    predictor.loss(x)


def x14_target_with_the_wrong_channel_count(device):
    model, x = net(device), images(device)
    predictor = ctxpred.attach(model, {"mid": pixel_loss().to(device)})
    model(x)
    predictor.loss(torch.randn(2, 4, 8, 8, device=device))


def x15_token_ids_outside_the_vocabulary(device):
    _skip_on_cuda(device, "an async device assert would poison the CUDA context of the run")
    loss = ContextPredictionLoss(TokenNeighborhood(strides=(1,)),
                                 ctxpred.CategoricalHead(5, 8)).to(device)
    loss(torch.randn(2, 8, 4, 4, device=device), torch.full((2, 4, 4), 7, device=device))


def x16_negative_token_ids(device):
    _skip_on_cuda(device, "an async device assert would poison the CUDA context of the run")
    loss = ContextPredictionLoss(TokenNeighborhood(strides=(1,)),
                                 ctxpred.CategoricalHead(5, 8)).to(device)
    loss(torch.randn(2, 8, 4, 4, device=device), torch.full((2, 4, 4), -1, device=device))


def x17_optimizer_built_while_the_heads_are_lazy(device):
    # a lazy head materializes in place on the first loss: the optimizer built before holds it
    model, x = net(device), images(device)
    loss = ContextPredictionLoss(PixelNeighborhood(strides=(1,)), NaiveHead(3, 8)).to(device)
    predictor = ctxpred.attach(model, {"mid": loss})
    opt = torch.optim.SGD(predictor.parameters(), lr=0.5)
    model(x)
    predictor.loss(x).backward()
    before = [p.detach().clone() for p in predictor.parameters()]
    opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, predictor.parameters()))


def x18_int_selector_on_a_tensor_output(device):
    model, x = net(device), images(device)
    predictor = ctxpred.attach(model, {"mid": pixel_loss().to(device)}, selectors=0)
    model(x)
    predictor.loss(x)


def x19_seed_instead_of_a_generator(device):
    model, x = net(device), images(device)
    predictor = ctxpred.attach(model, {"mid": pixel_loss().to(device)})
    model(x)
    predictor.loss(x, generator=0)


def x20_ddp_around_a_wrapper_of_your_own(device, tmp_path):
    # the user's own module holding model and heads, inside DDP: the heads are synced, no warning
    import torch.distributed as dist

    if device.type != "cpu":
        pytest.skip("the gloo process group of this row runs on CPU")

    class Both(nn.Module):
        def __init__(self, model, heads):
            super().__init__()
            self.model, self.heads = model, heads

        def forward(self, x):
            return self.model(x)

    def train():
        model, x = net(device), images(device)
        predictor = ctxpred.attach(model, {"mid": pixel_loss().to(device)})
        ddp = nn.parallel.DistributedDataParallel(Both(model, predictor.heads))
        out = ddp(x)
        (((out - x) ** 2).mean() + predictor.loss(x)).backward()

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        train()
        gc.collect()
    finally:
        dist.destroy_process_group()


def x21_loss_under_no_grad_after_a_training_forward(device):
    model, x = net(device), images(device)
    predictor = ctxpred.attach(model, {"mid": pixel_loss().to(device)})
    out = model(x)
    with torch.no_grad():
        context = predictor.loss(x)
    (((out - x) ** 2).mean() + context).backward()


# -- the table ------------------------------------------------------------------------------------
class Outcome(NamedTuple):
    kind: str  # "works" | "raises" | "warns"
    error: type[BaseException] | None = None
    match: str | None = None


WORKS = Outcome("works")


def raises(error: type[BaseException], match: str) -> Outcome:
    return Outcome("raises", error, match)


def warns(match: str) -> Outcome:
    return Outcome("warns", UserWarning, match)


def row(scenario: Callable, outcome: Outcome):
    return pytest.param(scenario, outcome, id=scenario.__name__)


ROWS = [
    # 1
    row(s01_pixel_layer_without_target, raises(ValueRangeError, r"'mid'.*needs a target")),
    row(s01_token_layer_without_target, raises(ValueRangeError, r"needs a target")),
    row(s01_misspelled_target_key, raises(ValueRangeError, r"'mdi'.*'mid'")),
    row(s01_target_key_of_a_layer_not_attached,
        raises(ValueRangeError, r"not attached: 'inp'")),
    row(s01_mapping_misses_a_pixel_layer, raises(ValueRangeError, r"'mid'.*needs a target")),
    # 2
    row(s02_nan_target, raises(ValueRangeError, r"NaN or Inf.*check_finite=False")),
    row(s02_inf_target, raises(ValueRangeError, r"NaN or Inf")),
    row(s02_finite_check_opt_out, WORKS),
    # 3
    row(s03_reentrant_checkpoint_inside_the_block, raises(CaptureError, r"use_reentrant=False")),
    row(s03_reentrant_checkpoint_of_the_hooked_block_itself, WORKS),
    row(s03_training_forward_under_no_grad_then_loss, warns(r"'mid'.*no gradient")),
    row(s03_training_forward_under_inference_mode_then_loss, warns(r"'mid'.*no gradient")),
    row(s03_validation_under_no_grad, WORKS),
    # 4
    row(s04_ddp_wraps_only_the_model, warns(r"training_module\(\)")),
    row(s04_ddp_wraps_the_training_module, WORKS),
    row(s04_ddp_warning_comes_once, WORKS),
    # 5
    row(s05_heads_left_out_of_the_optimizer, warns(r"heads.*optimizer")),
    row(s05_heads_left_out_warns_once, WORKS),
    row(s05_heads_in_the_optimizer, WORKS),
    # 6
    row(s06_target_smaller_than_the_layer_grid, warns(r"upsampl")),
    row(s06_upsampling_warning_comes_once, WORKS),
    row(s06_target_with_another_aspect_ratio, raises(ShapeError, r"aspect ratio")),
    row(s06_transposed_target_on_a_small_layer_grid, raises(ShapeError, r"aspect ratio")),
    row(s06_target_downsampled_by_area, WORKS),
    # 7
    row(s07_bf16_model_float32_heads, WORKS),
    row(s07_float64_heads_float32_model, WORKS),
    # 8
    row(s08_uint8_image_target, raises(DTypeError, r"uint8.*float")),
    row(s08_bool_target, raises(DTypeError, r"bool.*float")),
    # 9
    row(s09_channels_last_layout_target, raises(ShapeError, r"channels-last.*permute")),
    row(s09_channels_last_memory_format_works, WORKS),
    # 10
    row(s10_single_target_with_a_feature_layer, WORKS),
    row(s10_single_target_with_only_feature_layers, raises(ValueRangeError, r"takes no target")),
    # 11
    row(s11_conv1d_map_with_layout, WORKS),
    row(s11_conv1d_map_without_layout, raises(ShapeError, r"layout='channels_first'")),
    row(s11_conv1d_map_with_grid_shape, raises(ShapeError, r"layout='channels_first'")),
    row(s11_token_sequence_1d_with_layout, WORKS),
    row(s11_conv3d_map_equals_its_token_sequence, WORKS),
    # 12
    row(s12_int_layer_name, raises(ValueRangeError, r"layer names must be str.*0")),
    row(s12_list_instead_of_a_dict, raises(ValueRangeError, r"mapping.*list")),
    row(s12_root_module, raises(ValueRangeError, r"root module")),
    # 13
    row(s13_compiled_before_attach, raises(CaptureError, r"torch.compile before attach")),
    row(s13_attach_to_the_compiled_wrapper, raises(ValueRangeError, r"before compiling")),
    row(s13_compiled_after_attach, WORKS),
    # 14
    row(s14_deepcopy_of_the_predictor, raises(CaptureError, r"cannot be copied")),
    row(s14_pickle_of_the_predictor, raises(CaptureError, r"cannot be copied")),
    row(s14_training_module_forwards_save_pretrained, WORKS),
    row(s14_ema_copy_of_the_model, WORKS),
    # others
    row(x01_heads_on_another_device_than_the_features,
        raises(ValueRangeError, r"head's parameters are on cpu.*predictor\.to\('meta'\)")),
    row(x02_target_on_another_device_than_the_features,
        raises(ValueRangeError, r"target is on meta.*target\.to\(")),
    row(x03_cpu_generator_with_a_loss_on_the_device, WORKS),
    row(x04_unbatched_target, raises(ShapeError, r"batch")),
    row(x05_module_called_twice_per_forward, raises(CaptureError, r"'act' ran 2 times")),
    row(x06_layer_that_does_not_run, raises(CaptureError, r"'unused'.*none of the hooked layers")),
    row(x06_some_layers_do_not_run, raises(CaptureError, r"'unused'.*did not run")),
    row(x07_loss_after_remove, raises(CaptureError, r"remove\(\)")),
    row(x08_float64_target_float32_features, WORKS),
    row(x09_bf16_autocast_close_to_float32, WORKS),
    row(x10_target_list, raises(DTypeError, r"target must be a Tensor")),
    row(x11_selector_for_an_unknown_layer, raises(ValueRangeError, r"'mdi'")),
    row(x12_integer_layer_output, raises(DTypeError, r"floating-point")),
    row(x13_loss_twice_after_one_forward, raises(CaptureError, r"consumed")),
    row(x14_target_with_the_wrong_channel_count, raises(ShapeError, r"out_channels")),
    row(x15_token_ids_outside_the_vocabulary, raises(ValueRangeError, r"\[0, 5\)")),
    row(x16_negative_token_ids, raises(ValueRangeError, r"\[0, 5\)")),
    row(x17_optimizer_built_while_the_heads_are_lazy, WORKS),
    row(x18_int_selector_on_a_tensor_output, raises(CaptureError, r"'mid' returns a Tensor")),
    row(x19_seed_instead_of_a_generator, raises(ValueRangeError, r"torch.Generator or None")),
    row(x20_ddp_around_a_wrapper_of_your_own, WORKS),
    row(x21_loss_under_no_grad_after_a_training_forward, warns(r"gradients disabled")),
]


def _ctxpred_user_warnings(record) -> list[str]:
    """UserWarnings other than torch's own (those point into torch's files)."""
    return [str(w.message) for w in record
            if issubclass(w.category, UserWarning)
            and not issubclass(w.category, DeprecationWarning)
            and f"{os.sep}torch{os.sep}" not in w.filename]


@pytest.mark.parametrize(("scenario", "outcome"), ROWS)
def test_misuse(scenario, outcome, device, tmp_path):
    kwargs = {"tmp_path": tmp_path} if "tmp_path" in scenario.__code__.co_varnames else {}
    if outcome.kind == "raises":
        with pytest.raises(outcome.error, match=outcome.match) as info:
            scenario(device, **kwargs)
        assert isinstance(info.value, CtxpredError)
    elif outcome.kind == "warns":
        with pytest.warns(UserWarning, match=outcome.match):
            scenario(device, **kwargs)
    else:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            scenario(device, **kwargs)
        assert not _ctxpred_user_warnings(record)
