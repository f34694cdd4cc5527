"""Adapters: how selfconsist sees a VAE, and the registry that picks one for a checkpoint.

The registry maps a name to an adapter class. Each class's ``sniff(path)`` looks
at a checkpoint (headers, file names, config.json, never unpickling anything)
and says whether it loads it; :func:`load` asks each in order. Third-party
adapters register with :func:`register_adapter` or are named on the command line
as ``path/to/file.py:ClassName``.

Every load passes through :func:`load`, which checks two things no adapter has to: that
each :class:`LoadOptions` field set applies to the chosen adapter (its ``load_options``), and
that the loaded weights are finite.

Adapter modules for optional packages (diffusers, pythae) import those packages
lazily, inside ``load``, so the registry itself stays cheap to import.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, SelfconsistError
from .base import DiagonalGaussian, Prior, SourceInfo, VAEAdapter, check_finite_weights
from .options import COMMON, LoadOptions, option_label

__all__ = [
    "DiagonalGaussian",
    "LoadOptions",
    "Prior",
    "SourceInfo",
    "VAEAdapter",
    "available_adapters",
    "check_finite_weights",
    "check_options",
    "get_adapter_class",
    "load",
    "register_adapter",
]

# name -> "module:Class" (imported on first use) or the class itself.
_REGISTRY: dict[str, str | type[VAEAdapter]] = {
    "builtin": "selfconsist.adapters.builtin:BuiltinVAE",
    "diffusers": "selfconsist.adapters.diffusers:DiffusersVAE",
    "pythae": "selfconsist.adapters.pythae:PythaeVAE",
}


def register_adapter(cls: type[VAEAdapter], name: str | None = None) -> type[VAEAdapter]:
    """Register an adapter class (usable as a decorator). Later registrations sniff first."""
    key = name or cls.name
    if not key:
        raise ValueError("an adapter needs a name")
    _REGISTRY[key] = cls
    # Move to the end of the dict: detect() tries entries last-first, so user adapters win
    # over built-in guesses.
    _REGISTRY.update({key: _REGISTRY.pop(key)})
    return cls


def available_adapters() -> list[str]:
    return list(_REGISTRY)


def _resolve(entry: str | type[VAEAdapter]) -> type[VAEAdapter]:
    if isinstance(entry, str):
        mod, _, cls = entry.partition(":")
        return getattr(importlib.import_module(mod), cls)
    return entry


def _load_from_file(spec: str) -> type[VAEAdapter]:
    """``path/to/file.py:ClassName`` → the class (this runs the user's own file)."""
    file, _, cls_name = spec.rpartition(":")
    path = Path(file)
    if not cls_name or not path.suffix == ".py":
        raise SelfconsistError(f"bad --adapter {spec!r}; expected NAME or path/to/file.py:ClassName")
    if not path.is_file():
        raise SelfconsistError(f"--adapter {spec!r}: {path} does not exist")
    mod_name = f"selfconsist_user_adapter_{abs(hash(path.resolve()))}"
    module_spec = importlib.util.spec_from_file_location(mod_name, path)
    if module_spec is None or module_spec.loader is None:
        raise SelfconsistError(f"--adapter {spec!r}: cannot import {path}")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[mod_name] = module
    module_spec.loader.exec_module(module)
    cls = getattr(module, cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, VAEAdapter)):
        raise SelfconsistError(
            f"--adapter {spec!r}: {path} has no VAEAdapter subclass named {cls_name!r}"
        )
    return cls


def get_adapter_class(spec: str) -> type[VAEAdapter]:
    """An adapter class from a registry name or ``path/to/file.py:ClassName``."""
    if spec in _REGISTRY:
        return _resolve(_REGISTRY[spec])
    if ":" in spec and spec.rpartition(":")[0].endswith(".py"):
        return _load_from_file(spec)
    raise SelfconsistError(
        f"unknown adapter {spec!r}; choose one of {available_adapters()} "
        "or give path/to/file.py:ClassName"
    )


def detect(path: Path) -> type[VAEAdapter]:
    """The first registered adapter whose ``sniff`` accepts ``path``."""
    if path.is_file() and path.suffix == ".safetensors":
        from ..io import read_safetensors_header

        read_safetensors_header(path)  # a corrupt or truncated file gets its own clear error
    for entry in reversed(list(_REGISTRY.values())):
        cls = _resolve(entry)
        if cls.sniff(path):
            return cls
    hint = ""
    if path.suffix == ".safetensors":
        hint = " (a .safetensors file without selfconsist's header: pass --adapter)"
    raise CheckpointError(
        f"{path}: no adapter recognises this checkpoint{hint}; known adapters: "
        f"{available_adapters()}"
    )


def check_options(cls: type[VAEAdapter], options: LoadOptions) -> None:
    """Refuse, in one line, a set option that ``cls`` does not take, naming the adapters that do."""
    for name in options.given():
        if name in COMMON or name in cls.load_options:
            continue
        takers = [key for key, entry in _REGISTRY.items() if name in _resolve(entry).load_options]
        raise SelfconsistError(
            f"{option_label(name)} does not apply to {cls.name or cls.__name__} models "
            f"(it applies to: {', '.join(takers) or 'no registered adapter'})")


def load(path: str | Path, adapter: str | None = None, options: LoadOptions | None = None,
         **kwargs: Any) -> VAEAdapter:
    """Load a VAE checkpoint and return its adapter.

    ``adapter`` forces one (a registry name or ``file.py:Class``); otherwise the
    registry picks by inspecting the checkpoint. ``options`` (or keywords naming
    :class:`LoadOptions` fields, e.g. ``trust_remote_code=True``) go to the adapter's
    ``load``; one it does not take is refused, and so is a model with NaN or Inf weights.
    """
    path = Path(path)
    opts = LoadOptions.from_kwargs(kwargs, options)  # a bad value fails before anything is read
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    cls = get_adapter_class(adapter) if adapter else detect(path)
    check_options(cls, opts)
    vae = cls.load(path, options=opts)
    check_finite_weights(vae, path)
    return vae
