"""The evidence's pairing: for one seed, the baseline arm and a context arm of the reference
trainers start from the same weights and see the same batches and diffusion noise; only the
context term differs (a weight-0 feature-context arm ends bit-identical to the baseline).
Tiny runs (a few steps, width 8)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import benchmarks.quality as quality
import reference_models.discrete.training as discrete
from reference_models.continuous import Trainer
from reference_models.discrete.diffusion import MaskAndReplaceDiffusion

TINY = quality.Preset(steps=4, batch_size=4, base_channels=8, lr=1e-3, samples=8,
                      sample_steps=2, seeds=(0,), ablation_seeds=(0,), context_points=8,
                      inpaint_images=4, inpaint_steps=2, resample=1)


_ORIGINAL = (Trainer._batch, Trainer._draw)


def _continuous_run(context, monkeypatch, dropout=0.0):
    """Initial weights, the per-step draws (x0, t, noise) and the final weights of one run."""
    draws: list[torch.Tensor] = []
    batch, draw = _ORIGINAL  # not an earlier run's recording wrappers

    def recorded_batch(self):
        x0 = batch(self)
        draws.append(x0.clone())
        return x0

    def recorded_draw(self, x0):
        out = draw(self, x0)
        draws.extend(t.clone() for t in out)
        return out

    monkeypatch.setattr(Trainer, "_batch", recorded_batch)
    monkeypatch.setattr(Trainer, "_draw", recorded_draw)
    config = quality._train_config(TINY, "textures", 3, context, "cpu", None)
    trainer = Trainer(dataclasses.replace(config, dropout=dropout))
    init = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train(progress=False)
    if trainer.predictor is not None:
        trainer.predictor.remove()
    return init, draws, trainer.model.state_dict()


def test_continuous_arms_share_init_batches_and_noise(monkeypatch):
    variants = quality.study_variants()
    base_init, base_draws, base_final = _continuous_run(None, monkeypatch)
    for context in (variants["px-l0.3-snr"],
                    dataclasses.replace(variants["feat-l0.3"], weight=0.0)):
        init, draws, final = _continuous_run(context, monkeypatch)
        assert all(torch.equal(init[k], base_init[k]) for k in base_init)
        assert len(draws) == len(base_draws) == 3 * TINY.steps
        assert all(torch.equal(a, b) for a, b in zip(draws, base_draws))
        if context.weight == 0.0:  # nothing else differs: the same trained weights
            assert all(torch.equal(final[k], base_final[k]) for k in base_final)
        else:
            assert any(not torch.equal(final[k], base_final[k]) for k in base_final)


@pytest.mark.parametrize("corruption_on_the_global_rng", [False, True])
def test_discrete_arms_share_init_batches_and_corruption(monkeypatch,
                                                         corruption_on_the_global_rng):
    """The corruption noise (x_t) comes from a generator of the trainer's own on every device.
    On accelerators it came from the global RNG, which ctxpred's query points and Gumbel noise
    also draw from, so a context arm saw other x_t than its baseline from the second step on.
    The second case replays that old path on the CPU (the trainer's generator ignored) to show
    that this comparison sees such a break."""
    draws: list[tuple[torch.Tensor, ...]] = []
    q_sample, loss = MaskAndReplaceDiffusion.q_sample, MaskAndReplaceDiffusion.loss

    def recorded(self, x0, t, generator=None):
        xt = q_sample(self, x0, t, generator)
        draws.append((x0.clone(), t.clone(), xt.clone()))
        return xt

    monkeypatch.setattr(MaskAndReplaceDiffusion, "q_sample", recorded)
    if corruption_on_the_global_rng:
        monkeypatch.setattr(MaskAndReplaceDiffusion, "loss",
                            lambda self, m, x0, t=None, generator=None: loss(self, m, x0, t))
    base = discrete.DiscreteConfig(dataset="digits", seed=4, train_steps=4, batch_size=8, dim=16,
                                   depth=1, heads=2, checkpoint_every=10**9, vocab_size=16,
                                   tokenizer_samples=256)
    tokenizer = discrete.build_tokenizer(base)
    runs = []
    for arm in ({}, {"context": True, "context_weight": 0.1}):
        draws.clear()
        torch.manual_seed(0)
        discrete.train(dataclasses.replace(base, **arm), tokenizer=tokenizer, progress=False)
        runs.append(list(draws))
    same = [all(torch.equal(a, b) for a, b in zip(p, q)) for p, q in zip(*runs)]
    if corruption_on_the_global_rng:  # the old accelerator path: unpaired after step 1
        assert same[0] and not all(same)
    else:
        assert len(same) == 4 and all(same)


def test_context_draws_leave_the_dropout_masks_alone(monkeypatch):
    """With dropout, the context term's draws (query points, head noise) used to come from the
    stream the dropout masks come from, so a context arm's later masks differed from its
    baseline's (a weight-0 arm ended 2.6e-4 away, the size of a real effect)."""
    variants = quality.study_variants()
    _, base_draws, base_final = _continuous_run(None, monkeypatch, dropout=0.1)
    _, draws, final = _continuous_run(dataclasses.replace(variants["feat-l0.3"], weight=0.0),
                                      monkeypatch, dropout=0.1)
    assert all(torch.equal(a, b) for a, b in zip(draws, base_draws))
    assert all(torch.equal(final[k], base_final[k]) for k in base_final)
