"""selfconsist: make a VAE's encoder consistent with its own decoder (AVAE, post hoc).

Python API::

    import selfconsist
    vae = selfconsist.load("model.safetensors")        # an adapter
    result = selfconsist.tune(vae, selfconsist.TuneConfig(steps=2000), out="tuned.safetensors")
    # tune changes ``vae`` in place (result.vae is vae), so compare the two files:
    selfconsist.evaluate("model.safetensors", compare="tuned.safetensors", data="digits", out="eval/")
"""

from __future__ import annotations

__version__ = "0.1.0"

# The functions share names with their modules (selfconsist.tune.tune, ...). Importing them
# here, eagerly, makes ``selfconsist.tune`` the function for good: Python only binds the
# submodule onto the package the first time the submodule loads, which is right here.
from .adapters import VAEAdapter, load, register_adapter  # noqa: E402
from .errors import SelfconsistError  # noqa: E402
from .evaluate import EvalConfig, evaluate  # noqa: E402
from .train import TrainConfig, train  # noqa: E402
from .tune import TuneConfig, TuneResult, tune  # noqa: E402

__all__ = ["EvalConfig", "SelfconsistError", "TrainConfig", "TuneConfig", "TuneResult", "VAEAdapter",
           "__version__", "evaluate", "load", "register_adapter", "train", "tune"]
