"""The README's quick start works as pasted (its ```python blocks run in order)."""

from __future__ import annotations

from pathlib import Path

from tests.test_docs import code_blocks

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_quick_start_runs() -> None:
    blocks = [src for _, src, skipped in code_blocks(README.read_text()) if not skipped]
    assert blocks, "README.md has no python block"
    namespace: dict = {"__name__": "__readme__"}
    for src in blocks:
        exec(compile(src, str(README), "exec"), namespace)
    model, predictor = namespace["model"], namespace["predictor"]
    assert not predictor.attached
    assert not any("head" in key for key in model.state_dict())
