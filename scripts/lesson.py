"""The test paths of one lesson, for the contributors' fast loop: ``make lesson LESSON=41``.

Prints, one per line: the lesson's notebook, its exercise checks, the tests of every library module the notebook
imports (``attnlib.sparse.radial`` -> ``tests/sparse/test_radial.py``) and of every kernel it imports
(``kernels.block_sparse`` -> ``tests/kernels/test_block_sparse_kernel.py``). Paths that do not exist are left out.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# library modules whose tests are not named after them
TEST_OF = {"core": "core/test_attention", "online": "core/test_online", "masks": "core/test_masks",
           "modules": "core/test_modules", "tools.plotting": "tools/test_plotting_widgets",
           "tools.widgets": "tools/test_plotting_widgets"}


def library_modules(source: str) -> set[str]:
    """The library modules (below ``attnlib``) a notebook's source uses, by dotted path or by top-level name."""
    import attnlib

    used = {f"{part}.{module}" for part, module in re.findall(r"attnlib\.([a-z]+)\.([a-z_]+)", source)}
    used |= set(re.findall(r"attnlib\.(core|masks|online|modules)\b", source))
    names = [n for group in re.findall(r"from attnlib import \(?([A-Za-z_, ]+)", source) for n in group.split(",")]
    names += re.findall(r"\battnlib\.([A-Za-z_]+)\(", source)  # import attnlib; attnlib.attention(...)
    for name in (n.strip() for n in names):
        value = getattr(attnlib, name, None)
        module = getattr(value, "__module__", None) or getattr(value, "__name__", "")
        if module.startswith("attnlib."):
            used.add(module.removeprefix("attnlib."))
    return used


def kernel_modules(source: str) -> set[str]:
    """The kernel modules a notebook's source uses (``kernels.flash``, ``from kernels import flash_attention``)."""
    import kernels

    used = set()
    for name in re.findall(r"kernels\.([a-z_]+)", source) + [
            n.strip() for names in re.findall(r"from kernels import ([A-Za-z_, ]+)", source) for n in names.split(",")]:
        if name in kernels._SUBMODULES:
            used.add(name)
        elif name in kernels._EXPORTS and not kernels._EXPORTS[name].startswith("_"):
            used.add(kernels._EXPORTS[name])
    return used


def lesson_paths(lesson: str, root: Path = ROOT) -> list[str]:
    notebooks = sorted((root / "notebooks").glob(f"{lesson}_*.ipynb"))
    if not notebooks:
        known = sorted(p.name[:2] for p in (root / "notebooks").glob("[0-9][0-9]_*.ipynb"))
        raise SystemExit(f"lesson: no notebook notebooks/{lesson}_*.ipynb; lessons: {', '.join(known)}")
    notebook = notebooks[0]
    source = notebook.read_text()
    paths = [notebook, *sorted((root / "tests" / "exercises").glob(f"test_{lesson}_*.py"))]
    for module in sorted(library_modules(source)):
        test = TEST_OF.get(module) or "/".join(module.split(".")[:-1] + ["test_" + module.split(".")[-1]])
        paths.append(root / "tests" / f"{test}.py")
    for module in sorted(kernel_modules(source)):
        paths.append(root / "tests" / "kernels" / f"test_{module}_kernel.py")
    seen = []
    for path in paths:
        if path.exists() and path not in seen:
            seen.append(path)
    return [str(path.relative_to(root)) for path in seen]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("lesson", help="the lesson's number, e.g. 41")
    args = parser.parse_args(argv)
    print("\n".join(lesson_paths(args.lesson)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
