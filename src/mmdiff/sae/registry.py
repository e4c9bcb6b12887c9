"""Registry of SAE architectures: a new architecture is one file with one decorated class.

The idea is SAELens's `register_sae_class`: a name in `cfg.json` ("topk", "jumprelu", ...) maps to
the class that implements it, so loaders never grow an if-chain over architectures.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from mmdiff.errors import SAEError

if TYPE_CHECKING:
    from mmdiff.sae.base import SAE

_REGISTRY: dict[str, type[SAE]] = {}

T = TypeVar("T", bound="type[SAE]")


def register_sae_class(name: str) -> Callable[[T], T]:
    """Class decorator: make `name` (as written in SAEConfig.architecture) build this class."""

    def decorate(cls: T) -> T:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise SAEError(
                f"SAE architecture {name!r} is already registered to {_REGISTRY[name].__name__}; "
                f"cannot register {cls.__name__} under the same name: pick another name."
            )
        cls.architecture = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def get_sae_class(name: str) -> type[SAE]:
    """The class registered for architecture `name`; SAEError naming the known ones otherwise."""
    _ensure_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise SAEError(
            f"unknown SAE architecture {name!r}; known: {sorted(_REGISTRY)}. "
            "Register a new one with @register_sae_class(name) in its own file."
        ) from None


def registered_architectures() -> list[str]:
    """Names of every registered architecture, sorted."""
    _ensure_builtins()
    return sorted(_REGISTRY)


def _ensure_builtins() -> None:
    # Importing the package registers the built-in architectures (one file each).
    import mmdiff.sae.batchtopk
    import mmdiff.sae.jumprelu
    import mmdiff.sae.relu
    import mmdiff.sae.topk  # noqa: F401
