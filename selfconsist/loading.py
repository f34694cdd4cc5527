"""One way to load a VAE: a path, a Hub id or an in-memory model → a :class:`VAEAdapter`.

The command line, :func:`selfconsist.load`, :func:`selfconsist.tune`, :func:`selfconsist.evaluate`
and the Hub push all load through :func:`load_model`, so they accept the same things:

* a :class:`VAEAdapter` (used as is);
* a local path (a ``.safetensors`` file, a diffusers or pythae folder);
* a Hub reference ``owner/name[:subfolder or :file]`` (``revision=`` picks a branch, tag or
  commit), resolved through huggingface_hub's cache by :mod:`selfconsist.hub.pull`;
* an in-memory diffusers ``AutoencoderKL`` / ``AsymmetricAutoencoderKL`` or a pythae model.
  The adapter wraps a **copy**: tuning never changes the caller's model, and
  :func:`native_like` hands the tuned copy back in the caller's dtype, device, train/eval
  mode and ``requires_grad`` flags.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from torch import nn

from .adapters import VAEAdapter, check_finite_weights, check_options
from .adapters import load as load_path
from .adapters.options import LoadOptions
from .errors import SelfconsistError
from .hub.pull import is_path_like

__all__ = ["LoadOptions", "as_adapter", "is_path_like", "load_model", "native_like"]


def _is_diffusers_model(obj: Any) -> bool:
    return type(obj).__module__.startswith("diffusers.") and hasattr(obj, "config")


def _is_pythae_model(obj: Any) -> bool:
    return type(obj).__module__.startswith("pythae.") and hasattr(obj, "model_config")


def as_adapter(model: Any, adapter: str | None = None, trust_remote_code: bool = False,
               **options: Any) -> VAEAdapter:
    """``model`` (an adapter, a path, a Hub id or an in-memory model) as an adapter.

    In-memory models are deep-copied first, so the caller's model keeps its dtype, device,
    mode and ``requires_grad`` flags whatever happens to the adapter.
    """
    if isinstance(model, VAEAdapter):
        return model
    if isinstance(model, (str, Path)):
        return load_model(model, adapter, trust_remote_code, **options)
    opts = LoadOptions.from_kwargs({**options, "trust_remote_code": trust_remote_code})
    vae: VAEAdapter
    if isinstance(model, nn.Module) and _is_diffusers_model(model):
        from .adapters.diffusers import DiffusersVAE

        check_options(DiffusersVAE, opts)
        vae = DiffusersVAE.from_model(model, opts)  # from_model copies
    elif isinstance(model, nn.Module) and _is_pythae_model(model):
        from .adapters.pythae import PythaeVAE

        check_options(PythaeVAE, opts)
        vae = PythaeVAE(copy.deepcopy(model), data_range=opts.data_range or (0.0, 1.0))
    else:
        raise SelfconsistError(
            f"cannot load a {type(model).__name__}: give a path, a Hub id owner/name, a diffusers "
            "AutoencoderKL/AsymmetricAutoencoderKL, a pythae model or a selfconsist VAEAdapter")
    check_finite_weights(vae, f"the {type(model).__name__} given")
    return vae


def load_model(model: Any, adapter: str | None = None, trust_remote_code: bool = False, *,
               revision: str | None = None, token: str | None = None, **options: Any) -> VAEAdapter:
    """Load ``model`` (see the module docstring) through the adapter registry.

    ``adapter`` forces an adapter (a registry name or ``file.py:Class``); ``options`` are
    :class:`LoadOptions` fields (e.g. ``image_size``, ``model_type``, ``scaling_factor``) for
    the adapter's ``load``, which refuses one that does not apply to it.
    """
    if not isinstance(model, (str, Path)):
        return as_adapter(model, adapter, trust_remote_code, **options)
    # A bad option fails here, before a Hub download.
    opts = LoadOptions.from_kwargs({**options, "trust_remote_code": trust_remote_code})
    from .hub.pull import attach_source, is_repo_ref, resolve_model

    text = str(model)
    from_hub = isinstance(model, str) and is_repo_ref(text)
    path = Path(text).expanduser()
    if from_hub:
        path = resolve_model(text, revision=revision, trust_remote_code=trust_remote_code,
                                  token=token)
    elif revision is not None:
        raise SelfconsistError(f"--revision {revision!r} applies to a Hub repo id; {text} is a "
                               "local path")
    vae = load_path(path, adapter=adapter, options=opts)
    if from_hub:  # record repo id, commit and license for metadata and model cards
        attach_source(vae, path)
    return vae


def native_like(vae: VAEAdapter, given: Any) -> Any:
    """The tuned model in the kind the caller gave: the adapter's (copied) network for an
    in-memory diffusers/pythae model, restored to ``given``'s dtype, device, train/eval mode
    and per-parameter ``requires_grad``; the adapter itself for anything else."""
    if isinstance(given, VAEAdapter) or not isinstance(given, nn.Module):
        return vae
    native = getattr(vae, "model", None)
    if not isinstance(native, nn.Module):
        return vae
    ref = next(iter(given.parameters()), None)
    if ref is not None:
        native.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
    flags = dict((n, p.requires_grad) for n, p in given.named_parameters())
    for n, p in native.named_parameters():
        p.requires_grad_(flags.get(n, True))
    native.train(given.training)
    return native
