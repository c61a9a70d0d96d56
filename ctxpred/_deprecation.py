"""Deprecated names: a module-level ``__getattr__`` that warns and forwards (private).

A renamed or moved public name keeps working for one release::

    __getattr__ = deprecated_names(__name__, {"OldName": ("ctxpred.module", "NewName")})

``from module import OldName`` and ``module.OldName`` then emit a :class:`DeprecationWarning`
naming the replacement and return the new object.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["deprecated_names"]


def deprecated_names(
    module: str, moved: Mapping[str, tuple[str, str]]
) -> Callable[[str], Any]:
    """A module ``__getattr__`` resolving ``moved[name] = (new module, new name)`` with a warning.

    Example:
        >>> import warnings
        >>> get = deprecated_names("pkg", {"old": ("math", "pi")})
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     value = get("old")
        >>> round(value, 2), caught[0].category.__name__
        (3.14, 'DeprecationWarning')
    """
    table = dict(moved)

    def __getattr__(name: str) -> Any:
        if name not in table:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        target_module, target = table[name]
        warnings.warn(
            f"{module}.{name} is deprecated and will be removed in the next release; use "
            f"{target_module}.{target}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(target_module), target)

    return __getattr__
