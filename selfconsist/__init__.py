"""selfconsist: make a VAE's encoder consistent with its own decoder (AVAE, post hoc).

Python API::

    import selfconsist
    vae = selfconsist.load("model.safetensors")        # an adapter
    tuned = selfconsist.tune(vae, selfconsist.TuneConfig(steps=2000), out="tuned.safetensors")
    report = selfconsist.evaluate(vae, compare=tuned, out="eval/")
"""

from __future__ import annotations

__version__ = "0.1.0"

from typing import TYPE_CHECKING, Any

from .adapters import VAEAdapter, load, register_adapter
from .errors import SelfconsistError

if TYPE_CHECKING:  # pragma: no cover
    from .train import TrainConfig, train
    from .tune import TuneConfig, tune

__all__ = ["SelfconsistError", "TrainConfig", "TuneConfig", "VAEAdapter", "__version__", "load",
           "register_adapter", "train", "tune", "evaluate"]

_LAZY = {
    "TrainConfig": "train", "train": "train",
    "TuneConfig": "tune", "tune": "tune",
    "evaluate": "evaluate", "EvalConfig": "evaluate",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(name)
