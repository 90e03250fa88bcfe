"""The core is a library apart: it imports none of the application's dependencies.

Captum itself imports matplotlib and tqdm when ``captum.attr`` is imported, so
"not in ``sys.modules``" is checked relative to what Captum brings: importing
the core must add none of the heavy modules, and no import of one of them may
start in a file of the core (checked with an import hook), nor be written in
one, lazily or not (checked on the source).
"""

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

import captum_pattern

PACKAGE = Path(captum_pattern.__file__).parent
HEAVY = ("matplotlib", "sklearn", "scipy", "tqdm", "PIL", "torchvision")
#: the application's modules (the ``demo`` extra); every other module is core
APPLICATION = ("cli", "compare", "demo", "images", "visualization", "zoo", "__main__")


def _core_modules() -> list[str]:
    """Every module of the package but the application's, found on disk (new ones count)."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent == PACKAGE and path.stem in APPLICATION:
            continue
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


CORE = tuple(_core_modules())

# runs in a fresh interpreter: records who imports each heavy module first
PROBE = """
import importlib, json, sys, traceback
HEAVY, CORE, PACKAGE = {heavy!r}, {core!r}, {package!r}

class Recorder:
    def __init__(self):
        self.importers = {{}}
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in HEAVY and top not in self.importers:
            frames = [f.filename for f in traceback.extract_stack()[:-1]]
            outside = [f for f in frames if "importlib" not in f and "<frozen" not in f]
            self.importers[top] = outside[-1] if outside else "?"
        return None

recorder = Recorder()
sys.meta_path.insert(0, recorder)
import captum.attr, captum.log  # what Captum itself brings
from_captum = sorted(m for m in HEAVY if m in sys.modules)
for module in CORE:
    importlib.import_module(module)
after_core = sorted(m for m in HEAVY if m in sys.modules)
print(json.dumps({{"from_captum": from_captum, "after_core": after_core,
                   "importers": recorder.importers}}))
"""


def test_importing_the_core_loads_no_application_dependency():
    probe = PROBE.format(heavy=HEAVY, core=CORE, package=str(PACKAGE))
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        cwd=PACKAGE.parent,
    )
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["after_core"] == report["from_captum"], report
    from_core = {m: f for m, f in report["importers"].items() if f.startswith(str(PACKAGE))}
    assert not from_core, f"the core imports {from_core}"
    assert "scipy" not in report["after_core"] and "sklearn" not in report["after_core"]
    assert "torchvision" not in report["after_core"]


def _imported_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.partition(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.partition(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module":
            names |= {a.value.partition(".")[0] for a in node.args if isinstance(a, ast.Constant)}
    return names


def _core_files() -> list[Path]:
    return [Path(importlib.util.find_spec(m).origin) for m in CORE]


@pytest.mark.parametrize("path", _core_files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_core_source_names_no_application_dependency(path):
    """Also lazy imports inside functions: no code path of the core reaches them."""
    assert not _imported_names(path) & set(HEAVY)


def test_the_core_list_is_found_on_disk():
    assert {"captum_pattern", "captum_pattern.fitter", "captum_pattern.metrics"} <= set(CORE)
    assert "captum_pattern.metrics.signal_quality" in CORE and "captum_pattern.cli" not in CORE


def test_visualization_leaves_the_matplotlib_backend_alone():
    probe = (
        "import matplotlib; matplotlib.use('svg'); "
        "import captum_pattern.visualization, captum_pattern.demo, captum_pattern.cli; "
        "print(matplotlib.get_backend())"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        cwd=PACKAGE.parent,
    )
    assert done.stdout.strip() == "svg"
