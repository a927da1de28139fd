"""Tools for exercise checkers that tell a learner *what* is wrong, not only that something is.

A checker is a plain function ``check_xxx(fn)`` that calls the learner's ``fn`` on a few inputs and
raises ``AssertionError`` with a message a learner can act on. Use :func:`call` to run the learner's
code (a stub's ``NotImplementedError`` becomes "not implemented yet" plus its hint) and
:func:`expect_close` to compare, giving it the *likely mistakes* as alternative answers: when the
learner's output matches one of them, the message names that mistake.

Exercise files are named like the lesson notebooks (``exercises/00_attention_from_scratch.py``); as a
Python module name cannot start with a digit, they are loaded by path with :func:`load_lesson`.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def load_lesson(folder: str, lesson: str):
    """Import ``<folder>/<lesson>.py`` (``folder`` is ``"exercises"`` or ``"solutions"``) as a module."""
    path = ROOT / folder / f"{lesson}.py"
    if not path.exists():
        raise FileNotFoundError(f"lesson: no file {folder}/{lesson}.py")
    name = f"course_{folder}_{lesson}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def call(fn: Callable, *args, **kwargs):
    """Run the learner's ``fn``; a stub still raising ``NotImplementedError`` fails with its hint."""
    try:
        return fn(*args, **kwargs)
    except NotImplementedError as error:
        hint = f" Hint: {error}" if str(error) else ""
        raise AssertionError(f"{fn.__name__}() is not implemented yet.{hint}") from None


def expect_shape(got, shape: Sequence[int], what: str) -> None:
    """Fail with "wrong shape" if ``got`` is not a tensor of ``shape``."""
    if not isinstance(got, torch.Tensor):
        raise AssertionError(f"{what}: expected a torch.Tensor, got {type(got).__name__}")
    if tuple(got.shape) != tuple(shape):
        raise AssertionError(f"{what}: wrong shape, expected {tuple(shape)}, got {tuple(got.shape)}")


def expect_close(got, want: torch.Tensor, what: str, *, mistakes: dict[str, torch.Tensor] | None = None,
                 atol: float = 1e-5, rtol: float = 1e-4) -> None:
    """Fail unless ``got`` matches ``want``; name the mistake if ``got`` matches one of ``mistakes``.

    ``mistakes`` maps a description ("the 1/sqrt(d) scale is missing") to what a function with that
    mistake returns on the same input.
    """
    expect_shape(got, want.shape, what)
    got_f, want_f = got.detach().double(), want.detach().double()
    if torch.isnan(got_f).any() and not torch.isnan(want_f).any():
        rows = torch.isnan(got_f).flatten(0, -2).any(-1).nonzero().flatten().tolist() if got_f.dim() > 1 else []
        where = f" (in rows {rows[:5]})" if rows else ""
        raise AssertionError(f"{what}: contains NaN{where}; expected finite numbers. "
                             "A row where every entry is masked must give zeros, not 0/0.")
    if torch.allclose(got_f, want_f, atol=atol, rtol=rtol):
        return
    for description, wrong in (mistakes or {}).items():
        if wrong.shape == got.shape and torch.allclose(got_f, wrong.detach().double(), atol=atol, rtol=rtol):
            raise AssertionError(f"{what}: wrong values; it looks like {description}.")
    err = (got_f - want_f).abs()
    index = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
    raise AssertionError(
        f"{what}: wrong values; largest error {err.max().item():.3g} at index {index} "
        f"(got {got_f[index].item():.5g}, expected {want_f[index].item():.5g})."
    )
