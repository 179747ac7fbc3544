"""Register ``cxrcae_vgg_cae`` with timm without importing timm (or torch) during ``import cxrcae``.

If timm is already imported, the model is registered now. Otherwise a finder on ``sys.meta_path`` waits for
``import timm`` to finish and registers right after it, then removes itself. Importing this module costs
microseconds, so ``cxrcae --help`` stays fast.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings

_MODULE = "cxrcae.models.timm"


def register() -> bool:
    """Import cxrcae.models.timm (which registers the model); a broken timm only warns."""
    if _MODULE in sys.modules:
        return True
    try:
        __import__(_MODULE)
    except Exception as exc:  # never let an incompatible timm break the user's own `import timm`
        warnings.warn(f"cxrcae: could not register cxrcae_vgg_cae with timm ({exc})", stacklevel=2)
        return False
    return True


class _LoaderWrapper(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        register()

    def __getattr__(self, name):  # get_resource_reader, is_package, ... stay the real loader's
        return getattr(self._loader, name)


class TimmFinder(importlib.abc.MetaPathFinder):
    """Wraps timm's own loader so registration runs once timm's ``__init__`` has completed."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "timm":
            return None
        uninstall()  # one shot; also keeps find_spec below from finding us again
        spec = importlib.util.find_spec("timm")
        if spec is None or spec.loader is None:
            return None
        spec.loader = _LoaderWrapper(spec.loader)
        return spec


def uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, TimmFinder)]


def install() -> None:
    """Idempotent: register now if timm is loaded, else wait for it."""
    if "timm" in sys.modules and hasattr(sys.modules["timm"], "create_model"):
        register()
    elif not any(isinstance(f, TimmFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, TimmFinder())


install()
