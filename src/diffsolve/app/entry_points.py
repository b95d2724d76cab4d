"""Python entry points as models: ``path/to/file.py:NAME`` or ``package.module:NAME``.

``NAME()`` (no arguments) returns a :class:`diffsolve.ModelWrapper` with its
``data_shape``; everything else — the network, its weights, the schedule, the prediction
type and the time map — is the user's code. The run fingerprint covers the file's bytes and
the network's parameters (:func:`~diffsolve.ode.model.network_fingerprint`).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

from diffsolve.ode.model import ModelWrapper

#: ``file.py:NAME`` or ``package.module:NAME`` (NAME a Python identifier).
ENTRY_POINT = re.compile(r"^(?P<target>.+?):(?P<name>[A-Za-z_][A-Za-z0-9_]*)$")


def is_entry_point(spec: str) -> bool:
    """Whether ``spec`` names an entry point rather than a demo or a folder."""
    match = ENTRY_POINT.match(spec)
    if match is None:
        return False
    target = match["target"]
    return target.endswith(".py") or re.fullmatch(r"[A-Za-z_][\w.]*", target) is not None


def _import_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise ValueError(f"--model {path}: no such file")
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    name = f"diffsolve_entry_{path.stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"--model {path}: cannot import it as a Python file")
    module = importlib.util.module_from_spec(spec)
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)  # its own helpers beside it import as they would when run
    try:
        sys.modules[name] = module
        spec.loader.exec_module(module)
    except Exception as err:
        sys.modules.pop(name, None)
        raise ValueError(
            f"--model {path}: importing it failed: {type(err).__name__}: {err}"
        ) from None
    finally:
        sys.path.remove(folder)
    return module


def load_entry_point(spec: str) -> tuple[ModelWrapper, Path | None]:
    """Call the entry point ``spec`` and check what it returns; also the module's file."""
    match = ENTRY_POINT.match(spec)
    if match is None:
        raise ValueError(f"--model {spec!r}: an entry point is FILE.py:NAME or module:NAME")
    target, name = match["target"], match["name"]
    if target.endswith(".py"):
        module = _import_file(Path(target))
    else:
        try:
            module = importlib.import_module(target)
        except Exception as err:
            raise ValueError(
                f"--model {spec}: cannot import {target} ({type(err).__name__}: {err})"
            ) from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ValueError(f"--model {spec}: {target} has no callable {name!r}")
    try:
        model = factory()
    except Exception as err:
        raise ValueError(f"--model {spec}: {name}() failed: {type(err).__name__}: {err}") from None
    if not isinstance(model, ModelWrapper):
        raise ValueError(
            f"--model {spec}: {name}() returned {type(model).__name__}; it must return a "
            "diffsolve.ModelWrapper(network, schedule, prediction, time_input, data_shape=...)"
        )
    file = getattr(module, "__file__", None)
    return model, Path(file) if file else None
