"""The mechanism registry: every attention mechanism of the course, by name.

A *mechanism* is a token mixer, an ``nn.Module`` that maps ``(batch, seq, dim) -> (batch, seq, dim)``.
Each lesson registers a factory for its mechanism together with a few properties, and the tiny
transformer (lesson 02) and the arena (lesson 80) build any of them by name::

    @register_mechanism("mha", paper=None, lesson="00", supports_causal=True,
                        summary="softmax multi-head attention")
    def _build(dim, num_heads, *, causal, **options):
        return MultiHeadAttention(dim, num_heads, causal=causal, **options)

    mixer = build_mechanism("mha", dim=64, num_heads=4, causal=True)
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from torch import nn

from ._checks import check_tokens

Factory = Callable[..., nn.Module]


@dataclass(frozen=True)
class Mechanism:
    """One registered mechanism and its properties.

    Attributes:
        name: the registry key.
        factory: ``factory(dim, num_heads, *, causal, **options) -> nn.Module`` (a token mixer).
        paper: the paper's id in the course (``"P05"``), or ``None`` for the foundations.
        lesson: the lesson that teaches it (``"13"``).
        supports_causal: whether it can run causally (needed for autoregressive tasks).
        summary: one line for tables and the arena.
    """

    name: str
    factory: Factory
    paper: str | None
    lesson: str
    supports_causal: bool
    summary: str


_REGISTRY: dict[str, Mechanism] = {}
_LOADED = False  # whether the library's mechanism modules were imported (see _load_builtin_mechanisms)


def register_mechanism(name: str, *, paper: str | None, lesson: str, supports_causal: bool, summary: str):
    """Decorator that registers ``factory`` under ``name``; registering a name twice is an error."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name: expected a non-empty string, got {name!r}")

    def decorator(factory: Factory) -> Factory:
        if name in _REGISTRY and _REGISTRY[name].factory is not factory:
            raise ValueError(f"name: a mechanism called {name!r} is already registered (lesson {_REGISTRY[name].lesson})")
        _REGISTRY[name] = Mechanism(name, factory, paper, lesson, supports_causal, summary)
        return factory

    return decorator


def get_mechanism(name: str) -> Mechanism:
    """The registered :class:`Mechanism` called ``name``."""
    _load_builtin_mechanisms()
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise KeyError(f"mechanism: no mechanism called {name!r}; registered: {known}")
    return _REGISTRY[name]


def list_mechanisms() -> list[Mechanism]:
    """Every registered mechanism, sorted by lesson then name."""
    _load_builtin_mechanisms()
    return sorted(_REGISTRY.values(), key=lambda m: (m.lesson, m.name))


def build_mechanism(name: str, dim: int, num_heads: int, *, causal: bool = False, **options) -> nn.Module:
    """Build the token mixer ``name`` for model width ``dim`` with ``num_heads`` heads.

    Every mixer built here checks its input the same way before it runs (:func:`attnlib._checks.check_tokens`): a floating
    ``(B, L, dim)`` tensor with at least one token, in the dtype of the mixer's parameters.
    """
    mechanism = get_mechanism(name)
    if not isinstance(causal, bool):  # "False" is truthy: a string here would silently build a causal mixer
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    if causal and not mechanism.supports_causal:
        raise ValueError(f"causal: mechanism {name!r} cannot run causally (lesson {mechanism.lesson})")
    module = mechanism.factory(dim, num_heads, causal=causal, **options)
    module.register_forward_pre_hook(partial(_check_tokens_hook, dim=dim), with_kwargs=True)
    return module


def _check_tokens_hook(module: nn.Module, args: tuple, kwargs: dict, *, dim: int) -> None:
    x = args[0] if args else kwargs.get("x")
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
    check_tokens(x, dim, dtype)


# sub-packages of attnlib that hold no mechanism
_NOT_MECHANISMS = ("tools",)


def mechanism_modules() -> list[str]:
    """The library's modules that may register mechanisms: every module of attnlib but the teaching tools and
    private helpers, found on disk (``pkgutil``), so that a new lesson's module needs no list."""
    import attnlib

    names = []
    for info in pkgutil.walk_packages(attnlib.__path__, "attnlib."):
        parts = info.name.split(".")
        if parts[1] in _NOT_MECHANISMS or parts[-1].startswith("_") or info.ispkg:
            continue
        names.append(info.name)
    return sorted(names)


def _load_builtin_mechanisms() -> None:
    # the library's own mechanisms register themselves when their modules are imported
    global _LOADED
    if not _LOADED:
        for name in mechanism_modules():
            importlib.import_module(name)
        _LOADED = True
