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
