import subprocess
import sys


def test_core_packages_do_not_import_ray():
    # slides/, models/, ssl/ and store/ must stay usable without Ray (DESIGN.md).
    code = (
        "import sys, importlib, pkgutil, hipt_ray\n"
        "for pkg in ('slides', 'store', 'models', 'ssl', 'viz', 'console', 'slide_ref'):\n"
        "    m = importlib.import_module('hipt_ray.' + pkg)  # a package that cannot be imported fails the test\n"
        "    for info in pkgutil.walk_packages(getattr(m, '__path__', []), m.__name__ + '.'):\n"
        "        importlib.import_module(info.name)\n"
        "bad = sorted(n for n in sys.modules if n == 'ray' or n.startswith('ray.'))\n"
        "print(len(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0", out.stdout + out.stderr


def test_viz_imports_nothing_above_it():
    # viz/ draws; the stages that decide what to draw (heads, explain, tune, …) import it, never
    # the other way round (a cycle heads ↔ viz once made both hard to change).
    import ast
    from pathlib import Path

    import hipt_ray

    above = ("heads", "explain", "tune", "embed", "tile", "train", "cli", "demo", "data")
    found = []
    for path in sorted((Path(hipt_ray.__file__).parent / "viz").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            found += [f"{path.name}: {n}" for n in names if n.split(".")[:2] in (["hipt_ray", p] for p in above)]
    assert found == []


def _project_imports(path) -> list[str]:
    """Every ``hipt_ray…`` module a file imports, at the top or inside a function."""
    import ast

    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.append(node.module or "")
        elif isinstance(node, ast.ImportFrom):  # relative: resolved against hipt_ray/<package>/
            base = ["hipt_ray", path.parent.name][: max(0, 3 - node.level)]
            names.append(".".join(base + ([node.module] if node.module else [])))
    return [n for n in names if n == "hipt_ray" or n.startswith("hipt_ray.")]


def test_slides_and_store_do_not_import_each_other():
    # slides/ opens files, store/ knows the tables; what both need of a slide (its reference
    # and version rule) lives below them in hipt_ray.slide_ref. An import either way tied the
    # two together (tiler → store.commit, store.tables → slides.reader).
    from pathlib import Path

    import hipt_ray

    root = Path(hipt_ray.__file__).parent
    found = [
        f"{pkg}/{path.name}: {name}"
        for pkg, other in (("slides", "store"), ("store", "slides"))
        for path in sorted((root / pkg).glob("*.py"))
        for name in _project_imports(path)
        if name.split(".")[:2] == ["hipt_ray", other]
    ]
    assert found == []


def test_the_import_check_sees_imports_inside_functions(tmp_path):
    # the check above must not pass because it misses a lazy import (the old store → slides one was)
    bad = tmp_path / "store" / "x.py"
    bad.parent.mkdir()
    bad.write_text(
        "def f():\n    from hipt_ray.slides.reader import Slide\n    from .tables import Store\n"
        "    from ..slides import tiler\n"
    )
    assert _project_imports(bad) == ["hipt_ray.slides.reader", "hipt_ray.store.tables", "hipt_ray.slides"]
