"""The diffusers adapter: building the model, its priors, and writing it back byte for byte.

Adapter for the VAEs of latent-diffusion models, through the ``diffusers`` library. Finding
and reading the files is :mod:`~selfconsist.adapters.diffusers_files`' job, a single file's
config :mod:`~selfconsist.adapters.diffusers_config`'s, and every key rename and reshape
between the LDM and diffusers layouts :mod:`~selfconsist.adapters.ldm_convert`'s.

Three input forms, each written back in the same form:

1. **a diffusers folder**: ``config.json`` + ``diffusion_pytorch_model[.VARIANT].safetensors``
   (possibly sharded with an index), or a pipeline folder (``model_index.json``), whose
   ``vae/`` subfolder is used. Output: a folder with the same ``config.json`` and one
   ``diffusion_pytorch_model[.VARIANT].safetensors``.
2. **a single file** in the original CompVis/LDM key layout (ComfyUI, A1111), e.g.
   ``vae-ft-mse-840000-ema-pruned.safetensors``, ``sdxl_vae.safetensors``, FLUX's
   ``ae.safetensors``, or a full SD checkpoint whose VAE sits under ``first_stage_model.``.
   The architecture is inferred from the tensor shapes (no network, no diffusers config
   download); the latent statistics come from the published VAE the architecture and the
   file name point to (:data:`~selfconsist.adapters.diffusers_config.KNOWN_VAES`), or from the
   ``model_type`` / ``scaling_factor`` / ``shift_factor`` / ``config`` load options. Output:
   one ``.safetensors`` with the input's key names, dtypes, extra keys and header metadata.
3. **a Hub repo id**: resolved to a local folder by :mod:`selfconsist.hub`; loaded as (1).

In every output only encoder tensors (``encoder.*``, ``quant_conv.*``) differ from the
input; every other tensor is written from the input file byte for byte.

Model: q(z|x) = N(mean, exp(logvar)) from ``latent_dist`` (diffusers clamps logvar to
[−30, 20]); g(z) = ``decode(z).sample``; data in [−1, 1]; Gaussian likelihood with
observation variance ``obs_var`` (default 0.1, see :data:`DEFAULT_OBS_VAR`).

Load options (:class:`~selfconsist.adapters.options.LoadOptions` fields, listed in
:attr:`DiffusersVAE.load_options`): ``image_size`` (int or "HxW"; default the config's ``sample_size`` capped to 256),
``obs_var``, ``variant`` (e.g. "fp16"), ``gradient_checkpointing`` (None = on when the
model is moved to CUDA; True/"all", "encoder", False), ``tiling``, ``slicing``,
``model_type`` (sd, sdxl, sd3, flux), ``scaling_factor``, ``shift_factor``, ``config``
(a config.json for a single file), ``norm_num_groups`` (single files; default 32),
``repo_id`` / ``revision`` (recorded in ``source``), ``trust_remote_code`` (allows reading
legacy pickled ``.bin`` weights with ``torch.load(weights_only=True)``).

diffusers is imported lazily (inside ``load``): ``sniff`` reads only JSON and safetensors
headers.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..errors import CheckpointError, SelfconsistError, UnsupportedModelError
from ..io import META_PREFIX, read_safetensors_header, save_safetensors
from . import ldm_convert
from .base import DiagonalGaussian, Prior, VAEAdapter
from .diffusers_config import MAX_DEFAULT_IMAGE_SIZE, override_stats, refusal, single_file_config
from .diffusers_files import (
    WEIGHTS_NAME,
    dtype_name,
    file_stat,
    hub_origin,
    read_tensors,
    vae_folder,
    weight_files,
)
from .options import LoadOptions

#: Observation variance v of the Gaussian likelihood, in the [−1, 1] data units of these
#: models. The published VAEs reconstruct with a mean squared error of roughly 0.005–0.02 per
#: element in these units, but were trained with a KL weight of ~1e−6, i.e. with no
#: meaningful v at all. v = 0.1 puts the reconstruction term on the same footing as the KL
#: and coupling terms (about 48 data elements per latent element for an 8× VAE with
#: 4 channels, each contributing ~err²/(2v) ≈ 0.05 nats), so neither swamps the other.
#: Override with ``obs_var=`` at load time or ``--obs-var`` in ``selfconsist tune``.
DEFAULT_OBS_VAR = 0.1
FORMAT_FOLDER = "diffusers-folder"
FORMAT_SINGLE = "single-file"

# ---------------------------------------------------------------------------------------------
# Building the diffusers model
# ---------------------------------------------------------------------------------------------


@contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """Silence diffusers' info/warning logs (unused config keys and the like) while loading."""
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        yield
    finally:
        dlogging.set_verbosity(level)


def _import_diffusers():
    try:
        import diffusers
    except ImportError:
        raise SelfconsistError(
            "this model needs the diffusers library: pip install 'selfconsist[diffusers]'") from None
    return diffusers


def build_model(config: Mapping[str, Any], tensors: Mapping[str, Tensor] | None = None,
                where: str = "model") -> nn.Module:
    """A diffusers autoencoder from its config, with ``tensors`` (model keys) loaded in fp32.

    Built on the meta device and filled by assignment, so a large VAE is not first
    initialised at random. Raises :class:`CheckpointError` when the tensors do not fit.
    """
    diffusers = _import_diffusers()
    name = config.get("_class_name", "AutoencoderKL")
    why = refusal(name)
    if why is not None:
        raise UnsupportedModelError(f"{where}: {why}")
    klass = getattr(diffusers, name)
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    with _quiet_diffusers():
        if tensors is None:
            return klass.from_config(cfg).eval()
        try:
            with torch.device("meta"):
                model = klass.from_config(cfg)
        except Exception as e:  # noqa: BLE001 - any failure here is a bad config
            raise CheckpointError(f"{where}: cannot build {name} from its config ({e})") from None
    expected = model.state_dict()
    state: dict[str, Tensor] = {}
    for k, t in tensors.items():
        if k not in expected:
            raise CheckpointError(f"{where}: tensor {k} does not belong to the {name} its config "
                                  "describes; is the config the one for these weights?")
        fitted = ldm_convert.to_model_shape(t, expected[k].shape)
        if fitted is None:
            raise CheckpointError(f"{where}: tensor {k} has shape {tuple(t.shape)}, the config "
                                  f"needs {tuple(expected[k].shape)}")
        state[k] = fitted.float() if fitted.is_floating_point() else fitted
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{where}: {len(missing)} tensors the config needs are missing "
                              f"(first: {missing[0]}); is the config the one for these weights?")
    model.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:  # a buffer that is not in the state dict: build normally instead
        with _quiet_diffusers():
            model = klass.from_config(cfg)
        model.load_state_dict(state, strict=True)
    return model.float().eval()


def _parse_size(value: Any, factor: int) -> tuple[int, int]:
    if isinstance(value, str):
        parts = re.split(r"[x×,]", value.lower().strip())
        try:
            value = [int(p) for p in parts if p]
        except ValueError:
            raise SelfconsistError(f"--image-size {value!r}: give N or HxW, e.g. 256 or 256x384") from None
    if isinstance(value, int):
        value = (value, value)
    value = tuple(int(v) for v in value)
    if len(value) == 1:
        value = value * 2
    if len(value) != 2 or min(value) <= 0 or any(v % factor for v in value):
        raise SelfconsistError(f"--image-size {value}: sides must be positive multiples of the "
                               f"VAE's downsampling factor {factor}")
    return value  # type: ignore[return-value]


def _default_size(sample_size: Any, factor: int) -> tuple[int, int]:
    if isinstance(sample_size, (list, tuple)):
        h, w = int(sample_size[0]), int(sample_size[-1])
    else:
        h = w = int(sample_size or MAX_DEFAULT_IMAGE_SIZE)
    cap = max(factor, MAX_DEFAULT_IMAGE_SIZE // factor * factor)
    h, w = (max(factor, min(s, cap) // factor * factor) for s in (h, w))
    return h, w


def latent_statistics(cfg: Any, where: str = "model") -> tuple[Tensor, Tensor, str]:
    r"""(mean, std, description) of the ``diffusion`` prior, shaped (C or 1, 1, 1), on the CPU.

    Diffusion pipelines generate scaled latents ẑ ≈ N(0, I) and decode
    raw = ẑ / scaling_factor + shift_factor, or, when the config has per-channel
    ``latents_mean`` / ``latents_std`` (SDXL-style pipelines),
    raw = ẑ · latents_std / scaling_factor + latents_mean. The decoder's typical inputs
    therefore follow N(shift, (1/scaling)²), resp. N(mean_c, (std_c/scaling)²) per channel.
    Raises :class:`CheckpointError` for statistics that describe no such prior.
    """
    c = int(cfg.latent_channels)
    scale = getattr(cfg, "scaling_factor", None)
    scale = 1.0 if scale is None else float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise CheckpointError(f"{where}: config scaling_factor {scale:g} must be a positive number; fix the "
                              "config or pass scaling_factor")
    lm, ls = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if lm is not None and ls is not None:
        try:
            mean = torch.tensor([float(v) for v in lm], dtype=torch.float32)
            std = torch.tensor([float(v) for v in ls], dtype=torch.float32)
        except (TypeError, ValueError):
            raise CheckpointError(f"{where}: config latents_mean / latents_std must be lists of numbers") from None
        if mean.numel() != c or std.numel() != c:
            raise CheckpointError(f"{where}: config latents_mean / latents_std have {mean.numel()} / "
                                  f"{std.numel()} entries for {c} latent channels")
        if not (bool(torch.isfinite(mean).all()) and bool((std > 0).all())
                and bool(torch.isfinite(std).all())):
            raise CheckpointError(f"{where}: config latents_std must be positive and latents_mean finite")
        desc = (f"N(latents_mean, (latents_std/{scale:g})²) per channel: pipelines decode "
                f"raw = ẑ·latents_std/{scale:g} + latents_mean")
        return mean.reshape(c, 1, 1), std.reshape(c, 1, 1) / scale, desc
    shift = getattr(cfg, "shift_factor", None)
    shift = 0.0 if shift is None else float(shift)
    if not math.isfinite(shift):
        raise CheckpointError(f"{where}: config shift_factor {shift} must be a finite number")
    desc = (f"N({shift:g}, (1/{scale:g})²): pipelines decode raw = ẑ/{scale:g}"
            + (f" + {shift:g}" if shift else ""))
    return torch.full((1, 1, 1), shift), torch.full((1, 1, 1), 1.0 / scale), desc


# ---------------------------------------------------------------------------------------------
# The adapter
# ---------------------------------------------------------------------------------------------


class DiffusersVAE(VAEAdapter):
    """A diffusers ``AutoencoderKL`` / ``AsymmetricAutoencoderKL`` seen by selfconsist."""

    name = "diffusers"
    likelihood = "gaussian"
    #: Chosen by the cycle sweep on the SD-class testbed (docs/latent-diffusion.md,
    #: ``examples/ldm/cycle_results.md``), 100 held-out photo crops. Data-free: the cycle
    #: objective (pixel idempotence) on prior draws refined twice through the frozen base and
    #: moved 0–3 cycles by the current encoder (the loop's own iterates), with a strong anchor
    #: on noisy decoded samples: single pass +0.31 dB, dB lost over 10 cycles −6%, latent shift
    #: 0.031 std (without the iterates: +0.28 dB, −4%, 0.035). Weaker anchors cost 0.9–1.4 dB;
    #: the previous default (AVAE, anchor 1) made cycles 6% worse. Each refined draw serves
    #: about 2 batches (a pool): 1.17× a step, and on two seeds +0.28/+0.29 dB, −6%/−7%,
    #: 0.031/0.029 std against fresh draws' +0.31/+0.30, −6%/−6%, 0.031/0.030; reused 4 times,
    #: 1.17× a step, but seed 1 lost 2 points (docs/latent-diffusion.md, fifth wave).
    tune_defaults: ClassVar[dict[str, Any]] = {
        "objective": "cycle", "cycle_space": "pixel", "prior_refine": 2, "refine_reuse": 2,
        "cycle_depth": 3, "anchor": 10.0, "lr": 3e-4, "steps": 1000, "batch_size": 8}
    #: With ``--images`` of the user's kind the same settings apply (no ``tune_defaults_images``:
    #: the refinement is dropped, z₀ = the images' base posteriors, and the anchor is on those
    #: images): single pass +0.02 dB, dB lost −10%, shift 0.014 std at 1000 steps (without the
    #: iterates: +0.06 dB, −8%, 0.014).
    load_options = frozenset({
        "image_size", "obs_var", "variant", "gradient_checkpointing", "tiling", "slicing",
        "model_type", "scaling_factor", "shift_factor", "config", "norm_num_groups", "repo_id",
        "revision"})

    def __init__(self, model: nn.Module, *, image_size: Any = None,
                 obs_var: float | None = None, where: str = "model") -> None:
        super().__init__()
        self.model = model.eval()
        cfg = dict(model.config)
        self.class_name: str = type(model).__name__
        widths = cfg.get("down_block_out_channels") or cfg["block_out_channels"]
        self.downsample_factor = 2 ** (len(widths) - 1)
        self.image_size = (_parse_size(image_size, self.downsample_factor) if image_size is not None
                           else _default_size(cfg.get("sample_size"), self.downsample_factor))
        self.obs_var = float(obs_var) if obs_var is not None else DEFAULT_OBS_VAR
        if self.obs_var <= 0:
            raise SelfconsistError("--obs-var must be positive")
        latent_statistics(model.config, where)  # bad statistics fail at load, not mid-tune
        self.metadata: dict[str, str] = {}
        self.gradient_checkpointing: bool | str | None = None
        self.config_source = "config.json"
        self.source.format = FORMAT_FOLDER
        # Where save() rereads the untouched tensors from; empty for an in-memory model.
        self._files: list[Path] = []
        self._file_stats: list[tuple[int, int]] = []
        self._key_map: dict[str, str] = {}  # file key -> model key
        self._pickled = False
        self._config_bytes: bytes | None = None
        self._weights_file = f"{WEIGHTS_NAME}.safetensors"
        self._prior_cache: tuple[torch.device, dict[str, Prior]] | None = None

    # --- construction ------------------------------------------------------------------------
    @classmethod
    def from_model(cls, model: nn.Module, options: LoadOptions | None = None,
                   **kwargs: Any) -> DiffusersVAE:
        """Wrap an in-memory diffusers model (``save`` then writes a diffusers folder in fp32).

        The adapter holds an fp32 **copy**: tuning (which casts to fp32, freezes the decoder and
        switches modes) never touches the caller's model, whatever its dtype. ``options`` (or
        keywords naming its fields) as for :meth:`load`.
        """
        opts = LoadOptions.from_kwargs(kwargs, options)
        why = refusal(type(model).__name__)
        if why is not None:
            raise UnsupportedModelError(why)
        model = copy.deepcopy(model).float()
        overrides = {k: v for k, v in override_stats(dict(model.config), opts).items()
                     if k in ("scaling_factor", "shift_factor") and v != model.config.get(k)}
        if overrides:  # on the copy only
            model.register_to_config(**overrides)
        vae = cls(model, image_size=opts.image_size, obs_var=opts.obs_var)
        vae._apply_options(opts)
        return vae

    @classmethod
    def sniff(cls, path: Path) -> bool:
        path = Path(path)
        if path.is_dir():
            # A broken config.json beside diffusers weights is claimed too, so load names it.
            return vae_folder(path) is not None or (
                (path / "config.json").is_file() and any(path.glob(f"{WEIGHTS_NAME}*")))
        if path.is_file() and path.suffix == ".safetensors":
            try:
                header = read_safetensors_header(path)
            except CheckpointError:
                return False
            return ldm_convert.detect_layout(k for k in header if k != "__metadata__") is not None
        return False

    @classmethod
    def format_of(cls, path: Path) -> str:
        return FORMAT_FOLDER if Path(path).is_dir() else FORMAT_SINGLE

    @classmethod
    def load(cls, path: Path, options: LoadOptions | None = None) -> DiffusersVAE:
        path = Path(path)
        opts = options or LoadOptions()
        if path.is_dir():
            vae = cls._load_folder(path, opts)
        elif path.is_file() and path.suffix == ".safetensors":
            vae = cls._load_single_file(path, opts)
        else:
            raise CheckpointError(f"{path}: expected a diffusers model folder, a pipeline folder "
                                  "or a .safetensors VAE file")
        repo_id, revision = hub_origin(path)
        vae.source.repo_id = opts.repo_id or repo_id
        vae.source.revision = opts.revision or revision
        vae._apply_options(opts)
        return vae

    @classmethod
    def _load_folder(cls, path: Path, opts: LoadOptions) -> DiffusersVAE:
        folder = vae_folder(path)
        if folder is None and (path / "config.json").is_file():
            raise CheckpointError(f"{path / 'config.json'}: not a diffusers config (unreadable JSON, "
                                  "or no _class_name)")
        if folder is None:
            raise CheckpointError(f"{path}: no diffusers config.json (with _class_name) here or "
                                  "in a vae/ subfolder of a pipeline")
        config_bytes = (folder / "config.json").read_bytes()
        config = json.loads(config_bytes)
        why = refusal(config.get("_class_name"))
        if why is not None:
            raise UnsupportedModelError(f"{folder}: {why}")
        wf = weight_files(folder, opts.variant, opts.trust_remote_code)
        tensors, meta = read_tensors(wf.files, pickled=wf.pickled)
        key_map = ldm_convert.file_to_model_keys(list(tensors), "diffusers", "")
        config = override_stats(config, opts)
        model = build_model(config, {key_map[k]: t for k, t in tensors.items() if k in key_map},
                            where=str(folder))
        vae = cls(model, image_size=_size_or_recorded(opts, meta), obs_var=opts.obs_var,
                  where=str(folder))
        vae._remember_files(wf.files, key_map, pickled=wf.pickled)
        vae._config_bytes = config_bytes if config == json.loads(config_bytes) else (
            json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
        dot = f".{wf.variant}" if wf.variant else ""
        vae._weights_file = f"{WEIGHTS_NAME}{dot}.safetensors"
        vae.metadata = meta
        # The folder actually read: for a pipeline that is vae/, so the input hash that tune
        # records covers the VAE and not the whole pipeline's gigabytes.
        vae.source.path = folder
        vae.source.format = FORMAT_FOLDER
        vae.source.extra.update({"class": vae.class_name, "variant": wf.variant,
                                 "subfolder": "vae" if folder != path else None,
                                 "pipeline": str(path) if folder != path else None,
                                 "dtype": dtype_name(tensors)})
        return vae

    @classmethod
    def _load_single_file(cls, path: Path, opts: LoadOptions) -> DiffusersVAE:
        header = read_safetensors_header(path)
        meta = dict(header.get("__metadata__") or {})
        keys = [k for k in header if k != "__metadata__"]
        found = ldm_convert.detect_layout(keys)
        if found is None:
            raise CheckpointError(f"{path}: no Stable-Diffusion-style VAE tensors (encoder.conv_in, "
                                  "encoder.down…) in this file")
        layout, prefix = found
        key_map = ldm_convert.file_to_model_keys(keys, layout, prefix)
        config, source = single_file_config(path, header, layout, prefix, meta, opts)
        config = override_stats(config, opts)
        tensors, _ = read_tensors([path], only=set(key_map))
        model = build_model(config, {key_map[k]: t for k, t in tensors.items()}, where=str(path))
        vae = cls(model, image_size=_size_or_recorded(opts, meta), obs_var=opts.obs_var,
                  where=str(path))
        vae._remember_files([path], key_map)
        vae.config_source = source
        vae.metadata = meta
        vae.source.path = path
        vae.source.format = FORMAT_SINGLE
        vae.source.extra.update({"class": vae.class_name, "layout": layout, "prefix": prefix,
                                 "dtype": dtype_name(tensors), "config_source": source})
        return vae

    def _remember_files(self, files: list[Path], key_map: dict[str, str], pickled: bool = False) -> None:
        self._files = list(files)
        self._file_stats = [file_stat(f) for f in files]
        self._key_map = dict(key_map)
        self._pickled = pickled

    def _apply_options(self, opts: LoadOptions) -> None:
        self.gradient_checkpointing = opts.gradient_checkpointing
        if opts.tiling:
            self.enable_tiling()
        if opts.slicing:
            self.enable_slicing()
        self._set_checkpointing(self.device)

    # --- memory ------------------------------------------------------------------------------
    def enable_tiling(self, enabled: bool = True) -> None:
        """Encode and decode large images tile by tile (diffusers' tiling; AutoencoderKL only).
        Tiles are ``sample_size`` pixels, so images at or below it are not tiled."""
        if not hasattr(self.model, "use_tiling"):
            raise SelfconsistError(f"{self.class_name} does not support tiling")
        self.model.use_tiling = enabled

    def enable_slicing(self, enabled: bool = True) -> None:
        """Encode and decode a batch one image at a time (less memory, same results)."""
        if not hasattr(self.model, "use_slicing"):
            raise SelfconsistError(f"{self.class_name} does not support slicing")
        self.model.use_slicing = enabled

    def _set_checkpointing(self, device: torch.device) -> None:
        """Gradient checkpointing: recompute block activations in the backward pass.

        ``None`` (auto) turns it on for the encoder and decoder when the model runs on CUDA,
        where activations of 256×256 images dominate memory; ``"encoder"`` limits it to the
        encoder; False turns it off. The decoder is frozen, but with λ_rec > 0 the gradient
        flows back through it, so its activations count too.
        """
        mode = self.gradient_checkpointing
        if mode is None:
            mode = "all" if device.type == "cuda" else False
        if mode is True:
            mode = "all"
        if mode not in (False, "all", "encoder"):
            raise SelfconsistError(f"gradient_checkpointing must be true, false, 'encoder' or 'all', "
                                   f"got {mode!r}")
        if not getattr(self.model, "_supports_gradient_checkpointing", False):
            return
        if mode:
            self.model.enable_gradient_checkpointing()
            if mode == "encoder":
                for m in self.model.decoder.modules():
                    if hasattr(m, "gradient_checkpointing"):
                        m.gradient_checkpointing = False
        elif self.model.is_gradient_checkpointing:
            self.model.disable_gradient_checkpointing()

    @property
    def checkpointing(self) -> dict[str, bool]:
        """Whether gradient checkpointing is on, for the encoder and the decoder."""
        def on(module: nn.Module) -> bool:
            return any(getattr(m, "gradient_checkpointing", False) for m in module.modules())
        return {"encoder": on(self.model.encoder), "decoder": on(self.model.decoder)}

    def to(self, device: torch.device | str) -> DiffusersVAE:
        device = torch.device(device)
        self.model.to(device)
        self._set_checkpointing(device)
        return self

    # --- protocol ----------------------------------------------------------------------------
    @property
    def latent_shape(self) -> tuple[int, ...]:
        h, w = self.image_size
        f = self.downsample_factor
        return (int(self.model.config.latent_channels), h // f, w // f)

    @property
    def data_shape(self) -> tuple[int, ...]:
        return (int(self.model.config.in_channels), *self.image_size)

    @property
    def data_range(self) -> tuple[float, float]:
        return (-1.0, 1.0)

    def encode(self, x: Tensor) -> DiagonalGaussian:
        dist = self.model.encode(x).latent_dist  # logvar already clamped to [−30, 20]
        return DiagonalGaussian(dist.mean, dist.logvar)

    def decode(self, z: Tensor) -> Tensor:
        return self.model.decode(z).sample

    def encoder_modules(self) -> list[nn.Module]:
        mods = [self.model.encoder]
        if getattr(self.model, "quant_conv", None) is not None:
            mods.append(self.model.quant_conv)
        return mods

    def decoder_modules(self) -> list[nn.Module]:
        mods = [self.model.decoder]
        if getattr(self.model, "post_quant_conv", None) is not None:
            mods.append(self.model.post_quant_conv)
        return mods

    def checkpoint_tensors(self) -> Iterator[tuple[str, Tensor]]:
        """The model's tensors by their key in the file read (an LDM single file's keys differ
        from the model's), or by model key for an in-memory model."""
        file_key = {mk: fk for fk, mk in self._key_map.items()}
        for k, t in self.model.state_dict().items():
            yield file_key.get(k, k), t

    def priors(self) -> dict[str, Prior]:
        """``diffusion`` (default) and ``nominal``; see :func:`latent_statistics`."""
        dev = self.device
        if self._prior_cache is not None and self._prior_cache[0] == dev:
            return self._prior_cache[1]
        mean, std, desc = latent_statistics(self.model.config)
        out = {
            "diffusion": Prior(mean.to(dev), std.to(dev), "diffusion", desc),
            "nominal": Prior(torch.zeros(1, 1, 1, device=dev), torch.ones(1, 1, 1, device=dev),
                             "nominal", "N(0, I): the VAE's own training prior"),
        }
        self._prior_cache = (dev, out)
        return out

    # --- saving ------------------------------------------------------------------------------
    def _encoder_model_keys(self) -> set[str]:
        keys: set[str] = set()
        for attr in ("encoder", "quant_conv"):
            mod = getattr(self.model, attr, None)
            if mod is not None:
                keys |= {f"{attr}.{k}" for k in mod.state_dict()}
        return keys

    def output_tensors(self) -> dict[str, Tensor]:
        """The tensors to write: the input file's keys, shapes and dtypes, with the encoder's
        tensors taken from the (tuned) model and every other tensor reread from the input."""
        state = self.model.state_dict()
        if not self._files:  # an in-memory model: plain diffusers keys
            return {k: v.detach().to("cpu") for k, v in state.items()}
        for f, st in zip(self._files, self._file_stats, strict=True):
            if not f.is_file() or file_stat(f) != st:
                raise SelfconsistError(f"{f} changed or vanished since it was loaded; load the "
                                       "model again before saving")
        enc = self._encoder_model_keys()
        original, _ = read_tensors(self._files, pickled=self._pickled)
        out: dict[str, Tensor] = {}
        written: set[str] = set()
        for k, t in original.items():
            mk = self._key_map.get(k)
            if mk in enc:
                out[k] = ldm_convert.to_file_layout(state[mk].detach().to("cpu"), t)
                written.add(mk)
            else:
                out[k] = t
        if written != enc:  # a guard on our promise: every tuned tensor reaches the file
            raise RuntimeError(f"encoder tensors missing from the output: {sorted(enc - written)[:3]}")
        return out

    def save(self, path: str | Path, metadata: Mapping[str, str] | None = None) -> None:
        """Write the model in the form it came in (see the module docstring)."""
        path = Path(path)
        meta = dict(self.metadata)
        meta.update(metadata or {})
        meta[META_PREFIX + "format"] = self.source.format
        # The size it was tuned (and is evaluated) at: a reload uses it unless told otherwise.
        meta[META_PREFIX + "image_size"] = json.dumps(list(self.image_size))
        tensors = self.output_tensors()
        if self.source.format == FORMAT_SINGLE:
            # So a reload finds the same latent statistics without guessing from the file name.
            cfg = {k: v for k, v in dict(self.model.config).items() if not k.startswith("_")}
            meta[META_PREFIX + "diffusers_config"] = json.dumps(
                {"_class_name": self.class_name, **cfg}, sort_keys=True, default=list)
            path.parent.mkdir(parents=True, exist_ok=True)
            save_safetensors(tensors, path, meta)
            return
        path.mkdir(parents=True, exist_ok=True)
        config_bytes = self._config_bytes
        if config_bytes is None:
            config_bytes = self.model.to_json_string().encode()
        (path / "config.json").write_bytes(config_bytes)
        save_safetensors(tensors, path / self._weights_file, meta)

    # --- reporting ---------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        cfg = self.model.config
        widths = list(getattr(cfg, "down_block_out_channels", None) or cfg.block_out_channels)
        layers = getattr(cfg, "layers_per_down_block", None) or cfg.layers_per_block
        info: dict[str, Any] = {
            "architecture": f"{self.class_name}: blocks {widths} × {layers} layers, "
                            f"{self.downsample_factor}× downsampling, "
                            f"{cfg.latent_channels} latent channels",
            "format": self.source.format + (f" (variant {self.source.extra['variant']})"
                                            if self.source.extra.get("variant") else ""),
            "likelihood": f"gaussian (v={self.obs_var:g})",
            "scaling_factor": getattr(cfg, "scaling_factor", None),
            "shift_factor": getattr(cfg, "shift_factor", None),
            "image_size": list(self.image_size),
            "config_source": self.config_source,
        }
        if "dtype" in self.source.extra:
            info["dtype"] = self.source.extra["dtype"]
        if self.source.repo_id:
            info["repo_id"] = self.source.repo_id
        return info


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _size_or_recorded(opts: LoadOptions, meta: Mapping[str, str]) -> Any:
    """The ``image_size`` option, else the size an earlier selfconsist run recorded (None: the
    config's default)."""
    if opts.image_size is not None:
        return opts.image_size
    try:
        size = json.loads(meta.get(META_PREFIX + "image_size", "null"))
    except json.JSONDecodeError:
        return None
    ok = isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size)
    return size if ok else None
