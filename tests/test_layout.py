"""The package's shape: exported names stay functions whatever is imported; the import graph has no cycle."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

import cxrcae

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = [
    "cxrcae",
    "cxrcae.io",
    "cxrcae.data",
    "cxrcae.models",
    "cxrcae.hub",
    "cxrcae.train",
    "cxrcae.fetch",
    "cxrcae.bench",
]


def _import_every_module() -> None:
    for info in pkgutil.walk_packages(cxrcae.__path__, "cxrcae."):
        importlib.import_module(info.name)


@pytest.mark.parametrize("name", [n for n in cxrcae.__all__ if n != "__version__"])
def test_top_level_names_survive_importing_every_submodule(name):
    # the old bug: `from cxrcae.evaluate import X` replaced the function cxrcae.evaluate with a module
    _import_every_module()
    value = getattr(cxrcae, name)
    assert not isinstance(value, types.ModuleType), f"cxrcae.{name} is a module, not the exported {name}"
    assert callable(value)


@pytest.mark.parametrize("package", PACKAGES)
def test_no_exported_name_is_shadowed_by_a_submodule(package):
    _import_every_module()
    module = importlib.import_module(package)
    for name in getattr(module, "__all__", []):
        if name == "__version__":
            continue
        assert not isinstance(getattr(module, name), types.ModuleType), f"{package}.{name} is a module"


def test_the_documented_call_works_in_a_fresh_interpreter():
    code = (
        "import cxrcae.eval.evaluation, cxrcae.infer.prediction, cxrcae; "
        "print(callable(cxrcae.evaluate), callable(cxrcae.predict))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True"]


def test_import_graph_has_no_cycles_or_hidden_imports():
    res = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "check_imports.py"), str(ROOT / "src")],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_check_imports_finds_a_cycle_hidden_in_a_function(tmp_path):
    pkg = tmp_path / "cxrcae"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from cxrcae.b import g\n\ndef f():\n    return g()\n")
    (pkg / "b.py").write_text("def g():\n    from cxrcae.a import f\n    return f\n")
    res = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "check_imports.py"), str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 1
    assert "import cycle: cxrcae.a <-> cxrcae.b" in res.stdout
    assert "import inside a function in cxrcae.b" in res.stdout


def test_light_imports_do_not_load_torch():
    # reading manifests, decoding images and fetching datasets must not pay for torch (nor --help)
    code = (
        "import sys, cxrcae, cxrcae.data, cxrcae.io, cxrcae.fetch, cxrcae.paths; "
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    code = "import sys, cxrcae.data; cxrcae.data.XrayDataset; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"  # the lazy re-export still delivers the Dataset
