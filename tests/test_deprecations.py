"""Names of the 0.1 release that moved or were renamed keep working for one release, with a
DeprecationWarning that names the replacement."""

from __future__ import annotations

import importlib

import pytest

OLD_TO_NEW = [
    ("ctxpred", "CategoricalPrediction", "ctxpred.heads", "CategoricalPrediction"),
    ("ctxpred", "MomentPrediction", "ctxpred.heads", "MomentPrediction"),
    ("ctxpred", "ModelWithHeads", "ctxpred.attach", "ModelWithHeads"),
    ("ctxpred", "ContextLossTerms", "ctxpred.loss", "ContextLossTerms"),
    ("ctxpred", "Neighborhood", "ctxpred.neighborhoods", "Neighbors"),
    ("ctxpred", "MultiStrideNeighborhood", "ctxpred.neighborhoods", "FeatureNeighborhood"),
    ("ctxpred", "ExactWasserstein", "ctxpred.wasserstein", "ExactWasserstein"),
    ("ctxpred", "GaussianWasserstein", "ctxpred.wasserstein", "GaussianWasserstein"),
    ("ctxpred", "SinkhornWasserstein", "ctxpred.wasserstein", "SinkhornWasserstein"),
    ("ctxpred", "SlicedWasserstein", "ctxpred.wasserstein", "SlicedWasserstein"),
    ("ctxpred.neighborhoods", "Neighborhood", "ctxpred.neighborhoods", "Neighbors"),
    ("ctxpred.neighborhoods", "MultiStrideNeighborhood", "ctxpred.neighborhoods",
     "FeatureNeighborhood"),
    ("ctxpred.functional", "group_by_stride", "ctxpred.loss", "group_by_stride"),
    ("ctxpred.functional", "resize_target", "ctxpred._layout", "resize_target"),
    ("ctxpred.loss", "resize_target", "ctxpred._layout", "resize_target"),
    ("ctxpred.loss", "resolve_estimator", "ctxpred.wasserstein", "resolve_estimator"),
    ("ctxpred.loss", "sample_divergence", "ctxpred.heads", "sample_divergence"),
    ("ctxpred.loss", "naive_divergence", "ctxpred.heads", "naive_divergence"),
    ("ctxpred.loss", "moment_divergence", "ctxpred.heads", "moment_divergence"),
    ("ctxpred.loss", "categorical_divergence", "ctxpred.heads", "categorical_divergence"),
]


@pytest.mark.parametrize(("module", "old", "new_module", "new"), OLD_TO_NEW,
                         ids=[f"{m}.{o}" for m, o, _, _ in OLD_TO_NEW])
def test_old_name_warns_and_resolves_to_the_new_object(module, old, new_module, new):
    mod = importlib.import_module(module)
    with pytest.warns(DeprecationWarning, match=rf"{module}\.{old} is deprecated.*{new}"):
        obj = getattr(mod, old)
    assert obj is getattr(importlib.import_module(new_module), new)
    assert old not in getattr(mod, "__all__", ())


def test_unknown_names_still_raise_attribute_error():
    import ctxpred

    with pytest.raises(AttributeError, match="no attribute 'NoSuchThing'"):
        ctxpred.NoSuchThing  # noqa: B018
