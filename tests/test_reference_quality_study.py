"""The paired quality study: statistics against scipy, pairing of the arms, resume logic."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import multiprocessing
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from benchmarks import quality
from benchmarks.paired import holm, paired_comparison
from reference_models.continuous import ContextConfig, TrainConfig, Trainer

finite = st.floats(-100, 100, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(finite, finite), min_size=2, max_size=12),
       st.sampled_from([0.8, 0.9, 0.95, 0.99]))
def test_paired_comparison_matches_scipy_ttest_rel(pairs, confidence) -> None:
    base = [b for b, _ in pairs]
    var = [v for _, v in pairs]
    diffs = [v - b for b, v in pairs]
    spread = max(diffs) - min(diffs)
    if spread <= 1e-6 * max(1.0, max(abs(d) for d in diffs)):
        return  # zero variance: scipy gives nan (tested below)
    r = paired_comparison(base, var, confidence)
    ref = stats.ttest_rel(var, base)
    ci = ref.confidence_interval(confidence)
    assert r.n == len(pairs)
    assert r.mean_diff == pytest.approx(sum(diffs) / len(diffs), abs=1e-9)
    assert r.p_value == pytest.approx(ref.pvalue, rel=1e-6, abs=1e-12)
    assert r.ci_low == pytest.approx(ci.low, rel=1e-6, abs=1e-9)
    assert r.ci_high == pytest.approx(ci.high, rel=1e-6, abs=1e-9)
    assert r.baseline_mean == pytest.approx(sum(base) / len(base))


def test_paired_comparison_edge_cases() -> None:
    one = paired_comparison([1.0], [0.5])
    assert one.mean_diff == -0.5 and math.isnan(one.ci_low) and math.isnan(one.p_value)
    const = paired_comparison([1.0, 2.0, 3.0], [0.5, 1.5, 2.5])
    assert const.ci_low == const.ci_high == pytest.approx(-0.5) and math.isnan(const.p_value)
    assert const.relative()[0] == pytest.approx(-0.25)
    # the pairing matters: the unpaired spread is large, the paired differences are tight
    tight = paired_comparison([1.0, 5.0, 9.0], [0.9, 4.9, 8.85])
    assert tight.ci_high < 0 and tight.p_value < 0.05
    with pytest.raises(ValueError, match="equal lengths"):
        paired_comparison([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="empty"):
        paired_comparison([], [])
    with pytest.raises(ValueError, match="finite"):
        paired_comparison([1.0, float("nan")], [1.0, 2.0])
    with pytest.raises(ValueError, match="confidence"):
        paired_comparison([1.0, 2.0], [1.0, 2.5], confidence=95)


def _holm_oracle(ps: list[float]) -> list[float]:
    """Holm by its step-down definition: reject H_(i) at level a iff every p_(j) <= a/(m-j+1)
    for j <= i; the adjusted p is the smallest such a."""
    m = len(ps)
    order = sorted(range(m), key=lambda i: ps[i])
    out = [0.0] * m
    for rank, i in enumerate(order):
        out[i] = min(1.0, max((m - j) * ps[order[j]] for j in range(rank + 1)))
    return out


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=6))
def test_holm_matches_step_down_definition(ps) -> None:
    assert holm(ps) == pytest.approx(_holm_oracle(ps), abs=1e-9)


def test_holm_ignores_nan() -> None:
    out = holm([0.02, math.nan, 0.04])
    assert out[0] == pytest.approx(0.04) and math.isnan(out[1]) and out[2] == pytest.approx(0.04)


# -- pairing: same init, same data order, same noise in every arm ---------------------------------
_TINY = dict(dataset="digits", num_train_images=32, batch_size=4, base_channels=8,
             channel_mults=(1, 2), num_timesteps=20, log_every=1, steps=2)


def test_arms_of_a_seed_share_init_data_order_and_noise() -> None:
    ctx = ContextConfig(points=8, weight=1.0)
    arms = [Trainer(TrainConfig(**_TINY, seed=3, context=c)) for c in (None, ctx)]
    other = Trainer(TrainConfig(**_TINY, seed=4))
    a, b = arms
    sa, sb, so = (t.model.state_dict() for t in (a, b, other))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], so[k]) for k in sa)  # the seed does change the init
    assert torch.equal(a.data, b.data)
    # the first batch, its timesteps and noise are identical, and consume the same draws
    states = [t.generator.get_state() for t in arms]
    xa, xb = a._batch(), b._batch()
    ta, tb = a._draw(xa), b._draw(xb)
    assert torch.equal(xa, xb) and torch.equal(ta[0], tb[0]) and torch.equal(ta[1], tb[1])
    assert not torch.equal(xa, other._batch())
    for t, s in zip(arms, states):
        t.generator.set_state(s)
    # a full step (context loss, its own randomness) leaves the data generator in step
    for t in arms:
        t.train_step()
    assert torch.equal(a.generator.get_state(), b.generator.get_state())
    assert torch.equal(a._batch(), b._batch())


def test_trainer_draws_what_diffusion_loss_draws() -> None:
    """The explicit draws reproduce GaussianDiffusion.loss's own (old runs stay comparable)."""
    t = Trainer(TrainConfig(**_TINY, seed=1))
    x0 = t.data[:4]
    state = t.generator.get_state()
    steps, noise = t._draw(x0)
    model = t.model.eval()
    explicit = t.diffusion.loss(model, x0, t=steps, noise=noise)
    t.generator.set_state(state)
    implicit = t.diffusion.loss(model, x0, generator=t.generator)
    assert torch.equal(explicit, implicit)


def test_gradient_ratio_matches_manual_gradients() -> None:
    t = Trainer(TrainConfig(**_TINY, context=ContextConfig(points=8)))
    h1 = torch.randn(2, 3, 4, 4, requires_grad=True)
    h2 = torch.randn(2, 5, 2, 2, requires_grad=True)
    a1, a2, b1 = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 2, 2), torch.randn(2, 3, 4, 4)
    point = (h1 * a1).sum() + (h2 * a2).sum()
    context = (h1 * b1).sum()  # no gradient at h2
    expected = b1.norm() / torch.cat([a1.flatten(), a2.flatten()]).norm()
    ratio = t.gradient_ratio(point, context, [h1, h2])
    assert ratio == pytest.approx(float(expected), rel=1e-5)
    assert t.gradient_ratio(point, 3 * context, [h1, h2]) == pytest.approx(3 * float(expected),
                                                                           rel=1e-5)


def test_gradient_ratio_is_logged_every_n_steps() -> None:
    cfg = TrainConfig(**{**_TINY, "steps": 4}, diagnostic_every=2,
                      context=ContextConfig(points=8))
    history = Trainer(cfg).train(progress=False)
    measured = [h["step"] for h in history if math.isfinite(h["grad_ratio"])]
    assert measured == [2, 4]
    assert all(h["grad_ratio"] > 0 for h in history if h["step"] in measured)
    base = Trainer(TrainConfig(**_TINY)).train(progress=False)
    assert all(math.isnan(h["grad_ratio"]) for h in base)


# -- the study's runs and their resume logic -------------------------------------------------------
def _args(**kw) -> argparse.Namespace:
    base = dict(variants=None, seeds=None, steps=None, datasets=None, device="cpu",
                no_progress=True)
    return argparse.Namespace(**{**base, **kw})


def test_study_runs_are_declared_and_fingerprinted() -> None:
    stage = quality.STAGES["sweep"]
    runs = quality.study_runs(stage, _args(datasets=["textures"], seeds=[0, 1]))
    assert [r.key for r in runs[:3]] == ["textures/baseline/0", "textures/baseline/1",
                                         "textures/px-l0.1/0"]
    assert {r.variant for r in runs} == set(stage.variants)
    by_key = {r.key: r for r in runs}
    spec = by_key["textures/px-l1/1"].spec
    assert spec["train"]["context"]["weight"] == 1.0 and spec["train"]["seed"] == 1
    assert "device" not in spec["train"] and "context" not in by_key[
        "textures/baseline/0"].spec["train"]
    # a run's spec depends on everything but the seed only through the config
    assert by_key["textures/px-l1/0"].spec["train"]["steps"] == stage.preset.steps
    with pytest.raises(SystemExit, match="needs --variants"):
        quality.study_runs(quality.STAGES["confirm"], _args())
    with pytest.raises(SystemExit, match="unknown variants"):
        quality.study_runs(quality.STAGES["confirm"], _args(variants=["nope"]))
    confirm = quality.study_runs(quality.STAGES["confirm"], _args(variants=["px-l1"]))
    assert len(confirm) == 2 * 2 * 10  # 2 datasets x (baseline + px-l1) x 10 seeds
    # the replication uses fresh seeds only, with the confirm stage's protocol
    replicate = quality.study_runs(quality.STAGES["replicate"], _args())
    assert {r.seed for r in replicate} == set(range(10, 30))
    assert {r.seed for r in replicate}.isdisjoint(r.seed for r in confirm)
    assert {r.variant for r in replicate} == {"baseline", "px-l0.3-q16"}
    assert replicate[0].spec["eval"] == confirm[0].spec["eval"]
    again = quality.study_runs(quality.STAGES["replicate-weighted"], _args())
    assert {r.seed for r in again} == set(range(30, 40))
    assert {r.seed for r in again}.isdisjoint({r.seed for r in confirm + replicate})
    assert [r.variant for r in again][::10] == ["baseline", "px-l0.3-snr", "px-l0.3-tcut"]
    assert again[0].spec["eval"] == confirm[0].spec["eval"]


def test_exact_default_stage_reuses_only_identical_runs() -> None:
    stage = quality.STAGES["exact-default"]
    runs = quality.study_runs(stage, _args())
    assert {r.variant for r in runs} == {"baseline", "px-l0.3-snr", "px-l0.3-snr-exact"}
    assert {r.seed for r in runs} == set(range(30, 40))
    source = {r.key: r for r in quality.study_runs(quality.STAGES["replicate-weighted"],
                                                   _args())}
    exact = next(r for r in runs if r.variant == "px-l0.3-snr-exact")
    assert exact.spec["train"]["context"]["estimator"] == "exact"
    # the arms it reuses are the very runs of replicate-weighted (same spec, key for key)
    shared = [r for r in runs if r.variant != "px-l0.3-snr-exact"]
    assert all(source[r.key].spec == r.spec for r in shared)
    study = {"replicate-weighted": {r.key: {"spec": r.spec, "metrics": {"swd": 1.0}}
                                    for r in source.values()}}
    changed = shared[0].key
    study["replicate-weighted"][changed]["spec"] = {"other": 1}  # another protocol: not reused
    copied = quality.reuse_runs(runs, study)
    assert len(copied) == len(shared) - 1 and f"exact-default/{changed}" not in copied
    assert all(study["exact-default"][r.key]["reused_from"] == "replicate-weighted"
               for r in shared if r.key != changed)
    assert exact.key not in study["exact-default"]
    assert quality.reuse_runs(runs, study) == []  # idempotent


def test_fresh_exact_stage_runs_every_arm_on_seeds_no_other_stage_used() -> None:
    stage = quality.STAGES["exact-default-fresh"]
    runs = quality.study_runs(stage, _args())
    assert not stage.reuse and stage.versus == (("px-l0.3-snr-exact", "px-l0.3-snr"),)
    assert {r.variant for r in runs} == {"baseline", "px-l0.3-snr", "px-l0.3-snr-exact"}
    assert len(runs) == 30 and {r.seed for r in runs} == set(range(40, 50))
    used = {seed for name, other in quality.STAGES.items() if name != stage.name
            for seed in other.seeds}
    assert used.isdisjoint(range(40, 50))
    exact = {r.seed: r for r in runs if r.variant == "px-l0.3-snr-exact"}
    sinkhorn = {r.seed: r for r in runs if r.variant == "px-l0.3-snr"}
    # the two arms differ in the estimator only
    for seed, run in exact.items():
        a, b = run.spec["train"]["context"], sinkhorn[seed].spec["train"]["context"]
        assert a.pop("estimator") == "exact" and b.pop("estimator", None) != "exact"
        assert a == b


def test_noninferiority_stage_runs_two_arms_on_unused_seeds_and_judges_by_its_margin() -> None:
    stage = quality.STAGES["exact-noninferior"]
    runs = quality.study_runs(stage, _args())
    assert not stage.baseline and stage.margin == 10.0 and not stage.reuse
    assert {r.variant for r in runs} == {"px-l0.3-snr", "px-l0.3-snr-exact"}  # no baseline arm
    assert len(runs) == 40 and {r.seed for r in runs} == set(range(50, 70))
    used = {seed for name, other in quality.STAGES.items() if name != stage.name
            for seed in other.seeds}
    assert used.isdisjoint(range(50, 70))
    # the table: no baseline comparison (and so no verdict), the head to head with the margin
    rec = lambda v: {"metrics": {"swd": v, "neighbor": v}}  # noqa: E731
    sinkhorn = [1.0, 2.0, 3.0, 4.0, 5.0]
    close = [1.01, 1.98, 3.02, 4.0, 5.01]  # upper bound a few % above 0
    far = [1.3, 2.1, 3.5, 4.1, 5.9]  # upper bound far above +10%
    records = {f"t/s/{k}": rec(v) for k, v in enumerate(sinkhorn)}
    records.update({f"t/e/{k}": rec(v) for k, v in enumerate(close)})
    records.update({f"t/f/{k}": rec(v) for k, v in enumerate(far)})
    table = quality.study_table("h2h", records)
    assert "No baseline arm" in table and "verdict" not in table
    text = quality.head_to_head(records, (("e", "s"), ("f", "s")), margin=10.0)
    rows = {line.split(" |")[0]: line for line in text.splitlines() if line.startswith("| e")
            or line.startswith("| f")}
    assert rows["| e - s"].endswith("| yes |") and rows["| f - s"].endswith("| no |")
    assert "non-inferior = every upper bound below +10%" in text
    assert "non-inferior" not in quality.head_to_head(records, (("e", "s"),))


def test_compact_spec_ignores_fields_left_at_their_default() -> None:
    frozen = quality.FINGERPRINT_DEFAULTS["ContextConfig"]
    cfg = TrainConfig(seed=2, context=ContextConfig(weight=0.5, points=frozen["points"],
                                                    timestep_weighting="none"))
    assert quality._compact(cfg) == {"seed": 2, "context": {"weight": 0.5}}


def test_every_stored_run_matches_the_current_code() -> None:
    """The committed study stays resumable: each stored run's fingerprint equals the spec the
    current code declares for it (a changed class default or variant would orphan or, worse,
    silently re-pair stored runs)."""
    study = quality.load_study(quality.STUDY_FILE)
    assert study, "docs/results/quality_study.json is missing"
    checked = 0
    for name, records in study.items():
        if name.startswith("_") or name not in quality.STAGES:
            continue
        keys = [k.rsplit("/", 2) for k in records]
        args = _args(datasets=sorted({d for d, _, _ in keys}),
                     variants=sorted({v for _, v, _ in keys} - {"baseline"}) or None,
                     seeds=sorted({int(s) for _, _, s in keys}))
        runs = [r for r in quality.study_runs(quality.STAGES[name], args) if r.key in records]
        assert len(runs) == len(records), name
        assert quality.pending_runs(runs, records) == []
        checked += len(runs)
    assert checked >= 100


def _fake_runs(calls: list[str], fail_at: str | None = None) -> list[quality.StudyRun]:
    runs = []
    for variant, seed in itertools.product(("baseline", "v"), (0, 1)):
        key = f"d/{variant}/{seed}"

        def run(key: str = key, seed: int = seed, variant: str = variant) -> dict:
            if key == fail_at:
                raise RuntimeError("killed")
            calls.append(key)
            return {"swd": 1.0 + seed - 0.1 * (variant == "v"), "neighbor": 2.0 + seed}

        runs.append(quality.StudyRun("sweep", "d", variant, seed, {"v": variant}, run))
    return runs


def test_study_resumes_after_an_interruption(tmp_path) -> None:
    path = tmp_path / "study.json"
    calls: list[str] = []
    with pytest.raises(RuntimeError, match="killed"):
        quality.run_study(_fake_runs(calls, fail_at="d/v/0"), path, log=lambda _: None)
    assert calls == ["d/baseline/0", "d/baseline/1"]
    stored = json.loads(path.read_text())
    assert sorted(stored["sweep"]) == ["d/baseline/0", "d/baseline/1"]
    assert stored["sweep"]["d/baseline/1"]["metrics"] == {"swd": 2.0, "neighbor": 3.0}
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes
    calls.clear()
    assert quality.run_study(_fake_runs(calls), path, log=lambda _: None) == 2
    assert calls == ["d/v/0", "d/v/1"]  # only the missing runs
    calls.clear()
    assert quality.run_study(_fake_runs(calls), path, log=lambda _: None) == 0 and not calls
    # a stored run with another protocol is never reused silently
    changed = _fake_runs(calls)
    changed[0] = dataclasses.replace(changed[0], spec={"v": "other"})
    with pytest.raises(SystemExit, match="another spec"):
        quality.run_study(changed, path, log=lambda _: None)
    # --max-minutes stops between runs
    path2 = tmp_path / "s2.json"
    assert quality.run_study(_fake_runs(calls), path2, max_minutes=0.0,
                             log=lambda _: None) == 0
    table = quality.study_table("sweep", json.loads(path.read_text())["sweep"])
    row = next(line for line in table.splitlines() if line.startswith("| v | 2 |"))
    assert "-10.0%" in row or "-6.7%" in row  # swd: -0.1 on baselines 1 and 2 (mean 1.5)


def _write_many(path: str, dataset: str, count: int, executed: str | None = None,
                reverse: bool = False) -> None:
    def run(seed: int) -> dict:
        if executed is not None:
            with open(executed, "a") as f:
                f.write(f"{seed}\n")
            time.sleep(0.01)
        return {"swd": float(seed)}

    seeds = range(count)[::-1] if reverse else range(count)
    runs = [quality.StudyRun("sweep", dataset, "baseline", seed, {},
                             lambda seed=seed: run(seed)) for seed in seeds]
    quality.run_study(runs, Path(path), log=lambda _: None)


def test_two_processes_split_one_stage_without_running_anything_twice(tmp_path) -> None:
    """Two processes given the same runs (one from each end): every run is made exactly once,
    the claims of the other live process are respected, and nothing is left claimed."""
    path, executed = tmp_path / "study.json", tmp_path / "executed.txt"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_many, args=(str(path), "d", 40, str(executed), rev))
             for rev in (False, True)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
        assert proc.exitcode == 0
    assert sorted(int(x) for x in executed.read_text().split()) == list(range(40))
    assert len(json.loads(path.read_text())["sweep"]) == 40
    assert json.loads((tmp_path / ".study.json.claims").read_text()) == {}


def test_a_claim_of_a_dead_process_is_taken_over(tmp_path) -> None:
    path = tmp_path / "study.json"
    proc = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(0,))
    proc.start()
    proc.join()
    (tmp_path / ".study.json.claims").write_text(json.dumps({"sweep/d/baseline/0": proc.pid}))
    calls: list[str] = []
    assert quality.run_study(_fake_runs(calls), path, log=lambda _: None) == 4
    assert calls[0] == "d/baseline/0"


def test_two_study_processes_on_one_file_keep_every_run(tmp_path) -> None:
    """Two processes (e.g. one per dataset, one per core) store runs into one study file: the
    locked read-modify-write keeps all of them (without the lock, records are lost)."""
    path = tmp_path / "study.json"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_many, args=(str(path), name, 150)) for name in "ab"]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
        assert proc.exitcode == 0
    stored = json.loads(path.read_text())["sweep"]
    assert sorted(stored) == sorted(f"{d}/baseline/{s}" for d in "ab" for s in range(150))
    assert not list(tmp_path.glob(".*tmp"))


def test_study_stage_runs_end_to_end_on_a_tiny_preset(tmp_path, monkeypatch) -> None:
    smoke = dataclasses.replace(quality.PRESETS["smoke"], steps=2, samples=4, inpaint_images=2)
    monkeypatch.setitem(quality.STAGES, "tiny", quality.Stage(
        "tiny", smoke, (0, 1), ("digits",), ("px-l1",), "test"))
    out = tmp_path / "q.json"
    argv = ["--stage", "tiny", "--study-file", str(out), "--no-progress"]
    assert quality.main(argv) == 0
    stored = json.loads(out.read_text())
    assert sorted(stored["tiny"]) == ["digits/baseline/0", "digits/baseline/1",
                                      "digits/px-l1/0", "digits/px-l1/1"]
    assert set(stored["tiny"]["digits/px-l1/0"]["metrics"]) >= {"swd", "neighbor",
                                                                "fd_digits", "context_loss"}
    md = out.with_suffix(".md").read_text()
    assert "--stage tiny" in md and "| px-l1 | 2 |" in md


def test_quality_benchmark_runs_on_a_user_folder(tmp_path) -> None:
    import numpy as np
    from PIL import Image

    folder = tmp_path / "pics"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (9, 11), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "res"
    assert quality.main(["--data", str(folder), "--image-size", "8", "--preset", "smoke",
                         "--variants", "baseline", "--out", str(out), "--no-progress"]) == 0
    stored = json.loads((out / "quality_continuous_smoke.json").read_text())
    assert sorted(stored) == ["pics/baseline/0", "pics/baseline/1", "pics/real-vs-real/0"]
    with pytest.raises(ValueError, match="no image files"):
        quality.main(["--data", str(tmp_path / "res"), "--preset", "smoke", "--out", str(out)])


@pytest.mark.parametrize("mode", ["snr", "cutoff"])
def test_timestep_weights_have_mean_one_and_reach_the_loss(mode) -> None:
    cfg = TrainConfig(**_TINY, context=ContextConfig(points=8, timestep_weighting=mode,
                                                     t_cutoff=0.3))
    trainer = Trainer(cfg)
    all_t = torch.arange(cfg.num_timesteps)
    w = trainer.context_sample_weight(all_t)
    assert w.shape == (cfg.num_timesteps,) and float(w.mean()) == pytest.approx(1.0, rel=1e-5)
    assert bool((w[:-1] >= w[1:]).all())  # less weight at higher noise
    if mode == "cutoff":
        kept = int(0.3 * cfg.num_timesteps)  # t < 0.3 T
        assert w[:kept].tolist() == pytest.approx([cfg.num_timesteps / kept] * kept)
        assert w[kept:].tolist() == [0.0] * (cfg.num_timesteps - kept)
    history = trainer.train(progress=False)
    assert all(math.isfinite(h["context_loss"]) for h in history)
    unweighted = ContextConfig(timestep_weighting="none")
    assert Trainer(TrainConfig(**_TINY, context=unweighted)).context_sample_weight(all_t) is None


def test_feature_target_trains_and_predicts_the_layer_channels() -> None:
    cfg = TrainConfig(**_TINY, context=ContextConfig(points=8, target="features"))
    trainer = Trainer(cfg)
    heads = {n: m.head for n, m in trainer.predictor.loss_modules.items()}
    channels = trainer.model.decoder_channels()
    assert all(h.out_channels == channels[n] for n, h in heads.items())
    history = trainer.train(progress=False)
    assert all(math.isfinite(h["context_loss"]) and h["context_loss"] > 0 for h in history)


def test_verdict_applies_the_declared_rule() -> None:
    from benchmarks.paired import PairedComparison

    def comp(low: float, high: float) -> PairedComparison:
        return PairedComparison(n=10, mean_diff=(low + high) / 2, ci_low=low, ci_high=high,
                                p_value=0.01, baseline_mean=1.0)

    below, above, across = comp(-0.3, -0.1), comp(0.1, 0.3), comp(-0.1, 0.1)
    assert quality.verdict([below, across], [0.02, 0.9]) == "helps"
    assert quality.verdict([below, across], [0.06, 0.9]) == "no effect shown"  # Holm p too big
    assert quality.verdict([above, across], [0.02, 0.9]) == "hurts"
    assert quality.verdict([below, above], [0.02, 0.02]) == "mixed"
    # an interval above 0 that misses significance after Holm still vetoes "helps"
    assert quality.verdict([below, above], [0.02, 0.2]) == "no effect shown"
    assert quality.verdict([None, across], [math.nan, 0.9]) == "no effect shown"
    # the confirm table shows it, the sweep's does not
    recs = {f"t/{v}/{s}": {"metrics": {"swd": b + s + 0.01 * s * s, "neighbor": b + s}}
            for v, b in (("baseline", 1.0), ("v", 0.5)) for s in range(4)}
    recs["t/v/1"]["metrics"]["neighbor"] += 0.02
    assert "| helps |" in quality.study_table("confirm", recs)
    assert "verdict" not in quality.study_table("sweep", recs)


# -- the discrete model's stage --------------------------------------------------------------------
def test_discrete_stage_is_declared_and_fingerprinted() -> None:
    stage = quality.STAGES["discrete"]
    runs = quality.study_runs(stage, _args())
    assert len(runs) == 2 * 2 * 5  # digits and textures x (baseline, tok-l0.1) x 5 paired seeds
    assert {r.seed for r in runs} == set(range(5)) and stage.model == "discrete"
    by_key = {r.key: r for r in runs}
    base, ctx = by_key["digits/baseline/3"].spec, by_key["digits/tok-l0.1/3"].spec
    assert base["model"] == ctx["model"] == "discrete"
    assert base["eval"] == ctx["eval"] == {"samples": 256, "sample_steps": 50}
    # the arms differ in the context switch only (and lambda, which is the model's default)
    assert {k: v for k, v in ctx["train"].items() if k != "context"} == base["train"]
    assert ctx["train"]["context"] is True and "context" not in base["train"]
    assert base["train"]["train_steps"] == 600 and base["train"]["seed"] == 3
    with pytest.raises(SystemExit, match="unknown variants"):
        quality.study_runs(stage, _args(variants=["px-l0.3"]))
    with pytest.raises(SystemExit, match="runs the discrete model"):
        quality.main(["--stage", "discrete", "--model", "continuous", "--table-only"])


def test_discrete_arms_of_a_seed_share_init_data_order_and_noise() -> None:
    """With lr = 0 the weights stay at their init: equal weights and equal per-step diffusion
    losses in both arms mean the same init, the same batches and the same diffusion noise."""
    from reference_models.discrete.training import DiscreteConfig, train

    tiny = dict(dataset="digits", train_steps=4, batch_size=8, dim=16, depth=1, heads=2,
                lr=0.0, warmup=1, checkpoint_every=10**9, seed=5)
    base = train(DiscreteConfig(**tiny), progress=False)
    ctx = train(DiscreteConfig(**tiny, context=True), progress=False)
    other = train(DiscreteConfig(**{**tiny, "seed": 6}), progress=False)
    for (name, a), b in zip(base.model.state_dict().items(), ctx.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert [h["loss"] for h in base.history] == [h["loss"] for h in ctx.history]
    assert [h["loss"] for h in base.history] != [h["loss"] for h in other.history]
    assert all(h["context"] > 0 for h in ctx.history)


def test_discrete_stage_runs_end_to_end_on_a_tiny_preset(tmp_path, monkeypatch) -> None:
    from reference_models.discrete import evaluate

    tiny = dataclasses.replace(quality.PRESETS["smoke"], steps=2, batch_size=4, samples=4,
                               sample_steps=2)
    monkeypatch.setitem(quality.STAGES, "tinyd", quality.Stage(
        "tinyd", tiny, (0, 1), ("digits",), ("tok-l0.1",), "test", model="discrete"))
    monkeypatch.setitem(evaluate.QUALITY_PRESETS, "small",
                        {**evaluate.QUALITY_PRESETS["small"], "dim": 16, "depth": 1})
    out = tmp_path / "q.json"
    assert quality.main(["--stage", "tinyd", "--study-file", str(out), "--no-progress"]) == 0
    stored = json.loads(out.read_text())["tinyd"]
    assert sorted(stored) == ["digits/baseline/0", "digits/baseline/1",
                              "digits/tok-l0.1/0", "digits/tok-l0.1/1"]
    assert stored["digits/tok-l0.1/1"]["spec"]["train"]["dim"] == 16
    assert set(stored["digits/tok-l0.1/0"]["metrics"]) >= {"swd", "neighbor", "fd_digits",
                                                           "context_loss", "point_loss"}
    assert "context_loss" not in stored["digits/baseline/0"]["metrics"]
    md = out.with_suffix(".md").read_text()
    assert "| tok-l0.1 | 2 |" in md and "verdict" in md
