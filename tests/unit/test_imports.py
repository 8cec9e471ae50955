import subprocess
import sys


def test_core_packages_do_not_import_ray():
    # slides/, models/, ssl/ and store/ must stay usable without Ray (DESIGN.md).
    code = (
        "import sys, importlib, pkgutil, hipt_ray\n"
        "for pkg in ('slides', 'store', 'models', 'ssl', 'viz', 'console'):\n"
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
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.name}: {n}" for n in names if n.split(".")[:2] in (["hipt_ray", p] for p in above)]
    assert found == []
