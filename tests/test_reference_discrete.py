"""Tests of the discrete (token) reference model: tokenizers, mask-and-replace diffusion, the
transformer denoiser, training and the context-prediction wiring."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ctxpred.errors import CtxpredError, ShapeError, ValueRangeError
from reference_models.discrete.denoiser import TokenTransformer
from reference_models.discrete.diffusion import MaskAndReplaceDiffusion
from reference_models.discrete.tokenizers import (
    IntensityTokenizer,
    PatchKMeansTokenizer,
    load_tokenizer,
    save_tokenizer,
)

# ------------------------------------------------------------------ tokenizers


def test_intensity_tokenizer_exact_on_digits():
    from reference_models.data import load_dataset

    x = load_dataset("digits", "test", num_samples=50, image_size=8)
    tok = IntensityTokenizer(17)
    ids = tok.encode(x)
    assert ids.shape == (50, 8, 8) and ids.dtype == torch.long
    assert int(ids.min()) >= 0 and int(ids.max()) <= 16
    torch.testing.assert_close(tok.decode(ids), x, atol=1e-6, rtol=0)


@settings(max_examples=15, deadline=None)
@given(levels=st.integers(2, 40), seed=st.integers(0, 2**16))
def test_intensity_tokenizer_round_trip_error_is_half_a_level(levels, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(3, 1, 5, 7, generator=gen) * 2 - 1
    tok = IntensityTokenizer(levels)
    ids = tok.encode(x)
    assert int(ids.min()) >= 0 and int(ids.max()) < levels
    err = (tok.decode(ids) - x).abs().max()
    assert float(err) <= 1.0 / (levels - 1) + 1e-6  # half of the level spacing 2 / (levels - 1)
    assert torch.equal(tok.encode(tok.decode(ids)), ids)


@pytest.fixture(scope="module")
def texture_tokenizer():
    from reference_models.data import load_dataset

    x = load_dataset("textures", "train", num_samples=48, image_size=16, seed=1)
    return x, PatchKMeansTokenizer.fit(x, vocab_size=16, patch_size=4, seed=0)


def test_patch_kmeans_round_trip(texture_tokenizer):
    x, tok = texture_tokenizer
    ids = tok.encode(x)
    assert ids.shape == (48, 4, 4) and ids.dtype == torch.long
    assert int(ids.min()) >= 0 and int(ids.max()) < 16
    rec = tok.decode(ids)
    assert rec.shape == x.shape
    # encode picks the nearest centroid: brute-force oracle over the codebook
    patches = x.unfold(2, 4, 4).unfold(3, 4, 4).permute(0, 2, 3, 1, 4, 5).reshape(48, 4, 4, 16)
    dist = ((patches.unsqueeze(-2) - tok.codebook) ** 2).sum(-1)  # (B, h, w, V)
    chosen = dist.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    assert bool((chosen <= dist.min(-1).values + 1e-5).all())
    # the error is bounded by the one-centroid (mean patch) codebook's error
    mse = float(((rec - x) ** 2).mean())
    baseline = float(((patches - patches.reshape(-1, 16).mean(0)) ** 2).mean())
    assert mse < 0.7 * baseline
    assert torch.equal(tok.encode(rec), ids)  # decoding then encoding is the identity


def test_tokenizer_save_load(tmp_path, texture_tokenizer):
    x, tok = texture_tokenizer
    save_tokenizer(tok, tmp_path / "tok.pt")
    again = load_tokenizer(tmp_path / "tok.pt")
    assert isinstance(again, PatchKMeansTokenizer)
    assert torch.equal(again.encode(x), tok.encode(x))
    save_tokenizer(IntensityTokenizer(9, low=0.0, high=2.0), tmp_path / "int.pt")
    again = load_tokenizer(tmp_path / "int.pt")
    assert isinstance(again, IntensityTokenizer) and again.levels == 9 and again.high == 2.0
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_tokenizer_errors(texture_tokenizer):
    _, tok = texture_tokenizer
    with pytest.raises(ShapeError, match="divisible by patch_size=4"):
        tok.encode(torch.zeros(1, 1, 10, 12))
    with pytest.raises(ShapeError, match=r"\(B, 1, H, W\)"):
        tok.encode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueRangeError, match=r"\[0, 15\]"):
        tok.decode(torch.full((1, 2, 2), 16))
    with pytest.raises(CtxpredError):
        IntensityTokenizer(17).encode(torch.zeros(2, 8, 8))


# ------------------------------------------------------------------ forward process


@pytest.mark.parametrize("gamma_bar_T", [0.9, 0.99999])
def test_composed_steps_match_closed_form_marginal(gamma_bar_T):
    d = MaskAndReplaceDiffusion(5, 12, gamma_bar_T=gamma_bar_T)
    composed = torch.eye(6, dtype=torch.float64)
    for t in range(1, 13):
        step = d.transition_matrix(t)
        assert bool((step >= 0).all())
        torch.testing.assert_close(step.sum(1), torch.ones(6, dtype=torch.float64))
        composed = composed @ step
        # closed form: alpha_bar on the diagonal, beta_bar elsewhere, gamma_bar on the mask
        a, b, c = (float(d.alpha_bar[t]), float(d.beta_bar[t]), float(d.gamma_bar[t]))
        expected = torch.zeros(6, 6, dtype=torch.float64)
        expected[:5, :5] = a * torch.eye(5, dtype=torch.float64) + b
        expected[:5, 5] = c
        expected[5, 5] = 1
        torch.testing.assert_close(composed, expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(composed, d.transition_matrix(t, s=0), atol=1e-12, rtol=0)


def test_q_sample_frequencies_match_marginal():
    vocab, n = 4, 60000
    d = MaskAndReplaceDiffusion(vocab, 10, gamma_bar_T=0.7)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.full((1, n), 2)
    for t_step in (1, 4, 10):
        t = torch.tensor([t_step])
        xt = d.q_sample(x0, t, gen)
        freq = torch.bincount(xt[0], minlength=vocab + 1).double() / n
        probs = d.marginal(x0[:, :1], t)[0, 0].double()
        sigma = (probs * (1 - probs) / n).sqrt()
        assert bool(((freq - probs).abs() <= 5 * sigma + 1e-9).all()), (t_step, freq, probs)


def test_posterior_matches_bayes_rule_oracle():
    d = MaskAndReplaceDiffusion(5, 8, gamma_bar_T=0.8)
    gen = torch.Generator().manual_seed(3)
    for t, s in ((8, 7), (6, 3), (1, 0), (5, 0)):
        qts, qt0 = d.transition_matrix(t, s), d.transition_matrix(t, 0)
        qs0 = d.transition_matrix(s, 0) if s else torch.eye(6, dtype=torch.float64)
        xt = torch.arange(6).repeat(5).unsqueeze(0)  # every x_t, incl. the mask
        p0 = torch.softmax(3 * torch.randn(1, 30, 5, generator=gen), -1)
        got = d.posterior_log_probs(p0.log(), xt, torch.tensor([t]), torch.tensor([s])).exp()
        for pos in range(30):
            k = int(xt[0, pos])
            want = torch.zeros(6, dtype=torch.float64)
            for i in range(5):  # naive loop: sum_x0 q(x_s | x_t, x_0) p(x_0 | x_t)
                want += p0[0, pos, i].double() * qts[:, k] * qs0[i] / qt0[i, k]
            torch.testing.assert_close(got[0, pos].double(), want, atol=2e-6, rtol=1e-4,
                                       msg=lambda m, t=t, s=s, k=k: f"t={t} s={s} k={k} {m}")


def test_diffusion_input_errors():
    d = MaskAndReplaceDiffusion(5, 8)
    with pytest.raises(ShapeError, match=r"t must have shape \(B,\)"):
        d.q_sample(torch.zeros(2, 4, dtype=torch.long), torch.tensor([1]))
    with pytest.raises(CtxpredError):
        d.q_sample(torch.zeros(2, 4), torch.tensor([1, 1]))
    with pytest.raises(ValueRangeError, match="gamma_bar_T"):
        MaskAndReplaceDiffusion(5, 8, gamma_bar_T=1.5)
    with pytest.raises(ValueRangeError, match="schedule"):
        MaskAndReplaceDiffusion(5, 8, alpha_bar_T=0.5, gamma_bar_T=0.6)


# ------------------------------------------------------------------ model, objective, sampler


def _tiny(vocab: int = 7, grid: tuple[int, int] = (4, 4)) -> tuple[TokenTransformer,
                                                                     MaskAndReplaceDiffusion]:
    torch.manual_seed(0)
    return (TokenTransformer(vocab, grid, dim=32, depth=2, heads=2),
            MaskAndReplaceDiffusion(vocab, 20))


@pytest.mark.parametrize("objective", ["hybrid"])
def test_training_steps_decrease_loss_on_fixed_batch(objective):
    net, d = _tiny()
    d.objective = objective
    x0 = torch.randint(0, 7, (16, 16), generator=torch.Generator().manual_seed(1))
    t = torch.randint(1, 21, (16,), generator=torch.Generator().manual_seed(2))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        out = d.loss(net, x0, t, generator=torch.Generator().manual_seed(5))
        assert all(bool(torch.isfinite(v)) for v in out)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    assert losses[-1] < 0.8 * losses[0], losses


def test_vb_is_zero_for_a_perfect_denoiser():
    d = MaskAndReplaceDiffusion(6, 10)
    x0 = torch.randint(0, 6, (4, 9))
    perfect = lambda x_t, t: 50.0 * torch.nn.functional.one_hot(x0, 6).float()  # noqa: E731
    out = d.loss(perfect, x0)
    assert float(out.vb) < 1e-4 and float(out.ce) < 1e-4


def test_sampler_ids_are_valid():
    net, d = _tiny()
    for steps in (20, 5):
        ids = d.sample(net, 3, 16, num_steps=steps, generator=torch.Generator().manual_seed(0))
        assert ids.shape == (3, 16) and ids.dtype == torch.long
        assert int(ids.min()) >= 0 and int(ids.max()) < 7  # never the mask id


def test_sampler_recovers_a_deterministic_target():
    """A denoiser that always predicts the same x0 makes the sampler return exactly it."""
    d = MaskAndReplaceDiffusion(6, 10)
    target = torch.randint(0, 6, (1, 12))
    oracle = lambda x_t, t: 50.0 * torch.nn.functional.one_hot(  # noqa: E731
        target.expand(x_t.shape[0], -1), 6).float()
    ids = d.sample(oracle, 4, 12, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ids, target.expand(4, -1))


def test_denoiser_shapes_and_errors():
    net, _ = _tiny()
    x = torch.randint(0, 8, (2, 16))
    assert net(x, torch.tensor([1, 2])).shape == (2, 16, 7)
    assert net.features(x, torch.tensor([1, 2])).shape == (2, 16, 32)
    with pytest.raises(ShapeError, match="L=16"):
        net(torch.zeros(2, 15, dtype=torch.long), torch.tensor([1, 2]))
    with torch.no_grad():
        assert math.isfinite(float(net(x, torch.tensor([0, 20])).sum()))


# ------------------------------------------------------------------ context prediction, training


def test_context_loss_gradients_reach_the_transformer():
    from reference_models.discrete.training import DiscreteConfig, build_context_predictor

    net, d = _tiny(vocab=17)
    tok = IntensityTokenizer(17)
    config = DiscreteConfig(context=True, context_points=None, context_samples=4)
    predictor = build_context_predictor(net, tok, config)
    x0 = torch.randint(0, 17, (3, 16), generator=torch.Generator().manual_seed(0))
    d.loss(net, x0)  # the forward the hooks capture from
    ctx = predictor.loss(target=x0)
    assert ctx.ndim == 0 and bool(torch.isfinite(ctx)) and float(ctx.detach()) > 0
    ctx.backward()
    for name in ("token_embed.weight", "blocks.0.attn.in_proj_weight", "blocks.1.mlp.0.weight"):
        grad = dict(net.named_parameters())[name].grad
        assert grad is not None and float(grad.abs().sum()) > 0, name
    assert all(p.grad is not None for p in predictor.parameters())
    # the heads stay out of the model: state_dict unchanged, no hook left after remove()
    assert not any("head" in k for k in net.state_dict())
    predictor.remove()
    assert not net._forward_hooks and not net.norm._forward_hooks


def _tiny_config(**kw):
    from reference_models.discrete.training import DiscreteConfig

    base = dict(dataset="digits", train_samples=64, dim=16, depth=1, heads=2, batch_size=8,
                train_steps=4, num_steps=10, warmup=1, checkpoint_every=2, context=True,
                context_points=4, context_samples=2)
    base.update(kw)
    return DiscreteConfig(**base)


def test_train_resumes_exactly_from_an_atomic_checkpoint(tmp_path, monkeypatch):
    from reference_models.discrete.training import generate, train

    reference = train(_tiny_config(), progress=False)
    assert len(reference.history) == 4
    assert all(math.isfinite(r["loss"]) and r["context"] > 0 for r in reference.history)

    path = tmp_path / "run.pt"
    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def failing_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the run dies after the step-2 checkpoint
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", failing_step)
    with pytest.raises(KeyboardInterrupt):
        train(_tiny_config(), path, progress=False)
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    assert torch.load(path, weights_only=True)["step"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["run.pt"]  # no temporary file left

    resumed = train(_tiny_config(), path, progress=False)
    for key, value in reference.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, msg=key)
    with pytest.raises(ValueRangeError, match="another config"):
        train(_tiny_config(lr=0.5), path, progress=False)

    images = generate(resumed, 3, num_steps=4)
    assert images.shape == (3, 1, 8, 8) and float(images.abs().max()) <= 1.0


def test_quality_benchmark_section_lists_paired_runs():
    import argparse

    from benchmarks import quality
    from benchmarks.quality import PRESETS
    from reference_models.discrete.evaluate import QUALITY_PRESETS, quality_section

    args = argparse.Namespace(preset="smoke", datasets=["digits"], device="cpu",
                              no_progress=True)
    specs = quality_section(PRESETS["smoke"], args, quality)
    keys = sorted(spec.key for spec in specs)
    seeds = PRESETS["smoke"].seeds
    assert keys == sorted(f"digits/{v}/{s}" for v in ("baseline", "context") for s in seeds)
    assert {"smoke", "small", "cpu", "gpu"} <= set(QUALITY_PRESETS)
