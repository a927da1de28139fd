"""How the code is layered: the kernels stand alone, the benchmarks sit above, imports stay light, no circles.

``kernels`` imports torch and Triton only, ``attnlib`` may import ``kernels`` (never the reverse), and
``benchmarks`` may import both (neither imports it). Importing the library or the kernels loads no plotting or
widget package; those come on first use.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("attnlib", "kernels", "benchmarks")
HEAVY = ("matplotlib", "ipywidgets", "sklearn")


def loaded_after(code: str) -> set[str]:
    """Top-level packages in ``sys.modules`` after running ``code`` in a fresh interpreter."""
    script = f"import sys\n{code}\nimport json; print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout.splitlines()[-1]))


def test_kernels_load_neither_the_library_nor_plotting():
    import kernels

    names = ", ".join(kernels.__all__)
    loaded = loaded_after(f"import kernels\nfrom kernels import {names}")
    assert "triton" in loaded  # the kernels were really imported
    assert not loaded & {"attnlib", "benchmarks", *HEAVY}, loaded & {"attnlib", "benchmarks", *HEAVY}


def test_the_library_and_its_registry_load_no_plotting_widgets_or_triton():
    loaded = loaded_after("import attnlib\nassert len(attnlib.list_mechanisms()) > 20\n"
                          "m = attnlib.build_mechanism('radial', 32, 2)")
    assert not loaded & {"triton", *HEAVY}, loaded & {"triton", *HEAVY}


def test_plotting_loads_matplotlib_on_first_use():
    loaded = loaded_after("from attnlib.tools import plotting, widgets")
    assert "matplotlib" not in loaded and "ipywidgets" not in loaded
    assert "matplotlib" in loaded_after("from attnlib.tools.plotting import plot_mask; plot_mask([[True]])")


def _module_files(package: str) -> dict[str, Path]:
    modules = {}
    for path in (ROOT / package).rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    """Which of the course's modules each module imports (at the top or inside a function)."""
    modules = {name: path for package in PACKAGES for name, path in _module_files(package).items()}

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found = [known(alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                found = [known(base)] + [known(f"{base}.{alias.name}") for alias in node.names]
            else:
                continue
            # a module's own packages are already being imported when it runs: no edge to them
            targets |= {t for t in found if t and t != name and not name.startswith(t + ".")}
        graph[name] = targets
    return graph


def circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_circle():
    assert circles(import_graph()) == []


def test_the_circle_finder_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


@pytest.mark.parametrize("package, forbidden", [("kernels", ("attnlib", "benchmarks")), ("attnlib", ("benchmarks",))])
def test_layers_import_only_downwards(package, forbidden):
    offenders = {name: sorted(t for t in targets if t.split(".")[0] in forbidden)
                 for name, targets in import_graph().items() if name.split(".")[0] == package}
    assert not {name: t for name, t in offenders.items() if t}


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT)) for folder in ("exercises", "solutions", "tests")
                                        for p in (ROOT / folder).rglob("*.py") if "import triton" in p.read_text()))
def test_files_that_import_triton_can_be_imported_first(path):
    """Triton must be imported after kernels (which switches its interpreter on without a GPU): a linter that sorts
    imports would otherwise break a learner's exercise file when it is the first thing Python imports."""
    if path.startswith("tests"):
        module = path.removesuffix(".py").replace("/", ".")
        script = f"import importlib\nimportlib.import_module({module!r})"
    else:
        script = f"import runpy\nrunpy.run_path({path!r}, run_name='checked')"
    script += "\nimport kernels._runtime  # checks that Triton's interpreter was on before Triton came in"
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
