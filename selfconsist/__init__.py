"""selfconsist: make a VAE's encoder consistent with its own decoder (AVAE, post hoc).

Python API::

    import selfconsist
    vae = selfconsist.load("stabilityai/sd-vae-ft-mse")   # a path, a Hub id or a model → adapter
    result = selfconsist.tune(vae, selfconsist.TuneConfig(steps=2000), out="tuned.safetensors")
    # an adapter is tuned in place (result.vae is vae), so compare the two files:
    selfconsist.evaluate("model.safetensors", compare="tuned.safetensors", data="digits", out="eval/")

    tuned = selfconsist.tune(autoencoder_kl).model   # a diffusers model: tuned on a copy

``selfconsist.train``, ``selfconsist.tune`` and ``selfconsist.evaluate`` are the *modules*
(``import selfconsist.train`` works as anywhere in Python); calling one runs the function
of the same name (``selfconsist.tune(...)`` is ``selfconsist.tune.tune(...)``). Importing
selfconsist changes no global state.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from ._version import __version__
from .adapters import VAEAdapter, register_adapter
from .errors import SelfconsistError
from .evaluate import EvalConfig
from .loading import LoadOptions, load_model
from .train import TrainConfig
from .tune import TuneConfig, TuneResult


class _CallableModule(types.ModuleType):
    """A module that, called, runs its function of the same name. The functions share names
    with their modules, and binding the function on the package would hide the module from
    ``import selfconsist.train``; making the module callable keeps both working."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self, self.__name__.rpartition(".")[2])(*args, **kwargs)


for _name in ("evaluate", "train", "tune"):
    sys.modules[f"{__name__}.{_name}"].__class__ = _CallableModule
del _name

from . import evaluate, train, tune  # noqa: E402  (the callable modules, explicitly)


def load(model: Any, adapter: str | None = None, *, revision: str | None = None,
         trust_remote_code: bool = False, token: str | None = None, **options: Any) -> VAEAdapter:
    """Load a VAE as an adapter: a path, a Hub id ``owner/name[:subfolder or :file]``
    (``revision`` picks a branch, tag or commit), a diffusers ``AutoencoderKL`` /
    ``AsymmetricAutoencoderKL``, a pythae model or an adapter. ``options`` are
    :class:`LoadOptions` fields (``image_size``, ``model_type``, ``scaling_factor``, ``config``,
    …); one the model's adapter does not take is refused, and so is a model whose weights hold
    NaN or Inf. An in-memory model is copied, never changed."""
    return load_model(model, adapter, trust_remote_code, revision=revision, token=token, **options)


__all__ = ["EvalConfig", "LoadOptions", "SelfconsistError", "TrainConfig", "TuneConfig", "TuneResult",
           "VAEAdapter", "__version__", "evaluate", "load", "register_adapter", "train", "tune"]
