"""Smoke tests of the continuous reference model (tiny sizes, a few steps)."""

from __future__ import annotations

import shutil

import pytest
import torch

from ctxpred.errors import CtxpredError
from reference_models.continuous import (
    ContextConfig,
    GaussianDiffusion,
    TrainConfig,
    Trainer,
    UNet,
    make_mask,
)
from reference_models.data import load_dataset

TINY = dict(dataset="digits", num_train_images=32, batch_size=4, base_channels=8,
            channel_mults=(1, 2), num_timesteps=20, log_every=2, checkpoint_every=2)


def _tiny(context: ContextConfig | None = None, **kw) -> TrainConfig:
    return TrainConfig(**{**TINY, **kw}, context=context)


@pytest.mark.parametrize("head", ["gaussian", "naive"])
def test_training_runs_with_context_and_heads_stay_outside(head: str) -> None:
    trainer = Trainer(_tiny(ContextConfig(head=head, points=16), steps=3))
    before = [p.detach().clone() for p in trainer.predictor.parameters()]
    history = trainer.train(progress=False)
    assert [h["step"] for h in history] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor([h["point_loss"], h["context_loss"]])).all()
               for h in history)
    assert all(h["context_loss"] > 0 for h in history)
    # the heads train, but are neither in the UNet's state_dict nor in the EMA copy
    after = list(trainer.predictor.parameters())
    assert any(not torch.equal(b, a) for b, a in zip(before, after))
    head_ids = {id(p) for p in after}
    assert not head_ids & {id(p) for p in trainer.model.parameters()}
    assert not head_ids & {id(p) for p in trainer.ema.parameters()}
    assert set(trainer.ema.model.state_dict()) == set(trainer.model.state_dict())
    assert not trainer.ema.model.up_blocks[1]._forward_hooks


def test_baseline_has_zero_context_loss() -> None:
    history = Trainer(_tiny(steps=2)).train(progress=False)
    assert [h["context_loss"] for h in history] == [0.0, 0.0]


def test_checkpoint_resume_gives_identical_continuation(tmp_path) -> None:
    cfg = _tiny(ContextConfig(points=8, strides=(1, 2)), steps=4, dropout=0.1)
    path = tmp_path / "run.pt"
    run = Trainer(cfg, checkpoint=path)
    run.train(steps=2, progress=False)
    shutil.copy(path, tmp_path / "at2.pt")
    run.train(progress=False)  # to step 4 without interruption
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temporary file

    resumed = Trainer(cfg, checkpoint=tmp_path / "at2.pt")
    assert resumed.step == 2
    resumed.train(progress=False)
    def losses(history):  # wall-clock times differ, the losses must not
        return [(h["step"], h["point_loss"], h["context_loss"]) for h in history]

    assert losses(resumed.history) == losses(run.history)
    for a, b in zip(run.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(run.predictor.parameters(), resumed.predictor.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(run.ema.parameters(), resumed.ema.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(CtxpredError, match="another config"):
        Trainer(_tiny(ContextConfig(points=8, strides=(1, 2)), steps=4, lr=1.0),
                checkpoint=tmp_path / "at2.pt")


def test_training_is_deterministic_with_a_seed() -> None:
    runs = [Trainer(_tiny(ContextConfig(points=8), steps=2, seed=5)) for _ in range(2)]
    histories = [r.train(progress=False) for r in runs]
    assert [h["point_loss"] for h in histories[0]] == [h["point_loss"] for h in histories[1]]
    assert [h["context_loss"] for h in histories[0]] == [h["context_loss"] for h in histories[1]]


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_prediction_parametrizations_invert(prediction: str) -> None:
    diffusion = GaussianDiffusion(num_timesteps=50, prediction=prediction)
    x0 = torch.rand(3, 1, 4, 4) * 1.8 - 0.9
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 20, 49])
    xt = diffusion.q_sample(x0, t, noise)
    x0_hat, eps_hat = diffusion.predict_x0_eps(diffusion.target(x0, t, noise), xt, t)
    torch.testing.assert_close(x0_hat, x0, atol=1e-3, rtol=0)
    torch.testing.assert_close(eps_hat[:2], noise[:2], atol=1e-3, rtol=0)


def test_samplers_shapes_and_range() -> None:
    diffusion = GaussianDiffusion(num_timesteps=20)
    net = UNet(1, 8, (1, 2)).eval()
    gen = torch.Generator().manual_seed(0)
    assert diffusion.timesteps(4) == [19, 13, 6, 0]
    for x in (diffusion.ddim_sample(net, (3, 1, 8, 8), num_steps=4, generator=gen),
              diffusion.ddpm_sample(net, (3, 1, 8, 8), generator=gen)):
        assert x.shape == (3, 1, 8, 8) and torch.isfinite(x).all()
        assert x.min() >= -1 and x.max() <= 1
    a = diffusion.ddim_sample(net, (2, 1, 8, 8), 3, generator=torch.Generator().manual_seed(1))
    b = diffusion.ddim_sample(net, (2, 1, 8, 8), 3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["center", "half", "strokes"])
def test_inpainting_keeps_the_known_region_exactly(kind: str) -> None:
    diffusion = GaussianDiffusion(num_timesteps=20)
    net = UNet(1, 8, (1, 2)).eval()
    gen = torch.Generator().manual_seed(0)
    known = load_dataset("digits", "test", num_samples=3)
    mask = make_mask(kind, 3, 16, generator=gen)
    assert mask.any() and (~mask).any()
    out = diffusion.inpaint(net, known, mask, num_steps=3, resample=2, generator=gen)
    assert out.shape == known.shape and out.min() >= -1 and out.max() <= 1
    assert torch.equal(out[mask.expand_as(out)], known[mask.expand_as(known)])
    assert not torch.equal(out, known)  # the hole was filled by the model, not copied


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(CtxpredError, match="divisible by 2"):
        UNet(1, 8, (1, 2))(torch.zeros(1, 1, 7, 7), torch.zeros(1))
    with pytest.raises(CtxpredError, match="unknown layers"):
        Trainer(_tiny(ContextConfig(layers=("up_blocks.9",))))
    with pytest.raises(CtxpredError, match="mask kind"):
        make_mask("circle", 1, 8)  # type: ignore[arg-type]


def test_context_loss_reaches_the_unet() -> None:
    """Same seed and data: only the context loss differs, so the UNets must drift apart."""
    runs = [Trainer(_tiny(ctx, steps=3, seed=1)) for ctx in (None, ContextConfig(points=16))]
    for run in runs:
        run.train(progress=False)
    decoder = [dict(r.model.up_blocks.named_parameters()) for r in runs]
    assert any(not torch.equal(decoder[0][k], decoder[1][k]) for k in decoder[0])


@pytest.mark.parametrize("module_name", [
    "reference_models.data", "reference_models.continuous.unet",
    "reference_models.continuous.diffusion", "reference_models.continuous.ema",
    "reference_models.continuous.train", "reference_models.metrics", "benchmarks.quality",
])
def test_docstring_examples_run(module_name: str) -> None:
    """The examples in these docstrings are documentation too (pytest collects only ctxpred/)."""
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module_name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_demo_trains_on_a_user_npy_and_reports_the_gradient_ratio(tmp_path, capsys) -> None:
    import json

    import numpy as np

    from reference_models import demo

    rng = np.random.default_rng(0)
    np.save(tmp_path / "mine.npy", rng.integers(0, 256, (24, 10, 12, 3), dtype=np.uint8))
    out = tmp_path / "out"
    argv = ["--data", str(tmp_path / "mine.npy"), "--image-size", "8", "--steps", "4",
            "--diagnostic-every", "2",
            "--batch-size", "2", "--base-channels", "8", "--samples", "4", "--sample-steps", "2",
            "--inpaint-images", "2", "--inpaint-steps", "2", "--resample", "1",
            "--context-points", "4", "--out", str(out), "--no-progress"]
    assert demo.main(argv) == 0
    printed = capsys.readouterr().out
    assert "gradient-norm ratio context/denoising" in printed
    rows = json.loads((out / "metrics.json").read_text())["rows"]
    assert rows["context"]["grad_ratio"] > 0 and "grad_ratio" not in rows["baseline"]
    assert (out / "loss_curves.png").exists() and (out / "samples.png").exists()
    with pytest.raises(CtxpredError, match="no such file"):
        demo.main(["--data", str(tmp_path / "missing"), "--out", str(out)])


def test_demo_defaults_are_the_trainers_recipe() -> None:
    """The demo trains the confirmed configuration: its context run's ContextConfig is the
    trainer's default, and every demo flag of it reaches the config."""
    from reference_models import demo

    configs = demo._configs(demo.parse_args([]))
    assert configs["baseline"].context is None
    assert configs["context"].context == ContextConfig()
    custom = demo._configs(demo.parse_args(
        ["--timestep-weighting", "cutoff", "--t-cutoff", "0.25", "--context-weight", "1",
         "--context-points", "8"]))["context"].context
    assert (custom.timestep_weighting, custom.t_cutoff, custom.weight, custom.points) == (
        "cutoff", 0.25, 1.0, 8)


@pytest.mark.parametrize("field, value", [("timestep_weighting", "SNR"), ("t_cutoff", 0.0),
                                          ("t_cutoff", 1.5), ("head", "gauss"),
                                          ("target", "pixel")])
def test_context_config_rejects_a_typo_when_built(field: str, value: object) -> None:
    with pytest.raises(CtxpredError, match=f"ContextConfig.{field} must"):
        ContextConfig(**{field: value})
