"""A diffusers VAE's config: which classes selfconsist supports, and a single file's config.

The policy: :func:`refusal` says why a model class cannot be tuned (deterministic
autoencoders, video and audio VAEs), from its name alone.

A ComfyUI/A1111 VAE file carries weights and no config. :func:`single_file_config` takes one
from, in order: the ``config`` load option, the config an earlier selfconsist run recorded in
the header, a ``config.json`` beside a diffusers-layout file, or the architecture read off the
tensor shapes (:func:`infer_config`) with the latent statistics of the published VAE it matches
(:data:`KNOWN_VAES`; ``model_type`` picks one, otherwise the file name hints at one). The
scaling factor is not in the tensors, so a guess is said on stderr.

Nothing here imports diffusers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, SelfconsistError
from ..io import META_PREFIX
from ..runtime import log
from .diffusers_files import read_json
from .ldm_convert import num_blocks
from .options import LoadOptions

#: Largest default tuning image side: the config's sample_size (often 512–1024) capped here so
#: tuning fits a small GPU. Latents are fully convolutional, so what the encoder learns at
#: 256×256 carries over to larger images.
MAX_DEFAULT_IMAGE_SIZE = 256

# ---------------------------------------------------------------------------------------------
# Which classes are supported
# ---------------------------------------------------------------------------------------------

SUPPORTED = ("AutoencoderKL", "AsymmetricAutoencoderKL")
_SUPPORTED_TEXT = ("AutoencoderKL and AsymmetricAutoencoderKL (the image VAEs of SD 1.x/2.x, "
                   "SDXL, SD3 and FLUX.1)")
# Autoencoders whose encoder returns a point, not a distribution.
DETERMINISTIC = ("AutoencoderTiny", "AutoencoderDC", "VQModel", "AutoencoderRAE")
# Video and audio VAEs, and image VAEs with other architectures: diagonal-Gaussian encoders,
# but other shapes (frames, waveforms), decode signatures and latent statistics.
OTHER_KL = (
    "AutoencoderKLTemporalDecoder", "AutoencoderKLCogVideoX", "AutoencoderKLMochi",
    "AutoencoderKLLTXVideo", "AutoencoderKLLTX2Video", "AutoencoderKLLTX2Audio",
    "AutoencoderKLHunyuanVideo", "AutoencoderKLHunyuanVideo15", "AutoencoderKLWan",
    "AutoencoderKLAllegro", "AutoencoderKLCosmos", "AutoencoderKLMagvit", "AutoencoderOobleck",
    "AutoencoderKLQwenImage", "AutoencoderKLFlux2", "AutoencoderKLHunyuanImage",
    "AutoencoderKLHunyuanImageRefiner", "ConsistencyDecoderVAE",
)


def refusal(class_name: str | None) -> str | None:
    """Why selfconsist cannot tune a diffusers model class (None when it can)."""
    if class_name in SUPPORTED:
        return None
    if class_name in DETERMINISTIC:
        return (f"{class_name} is a deterministic autoencoder: its encoder returns a single "
                "latent, not a posterior q(z|x), so there is no posterior to make self-consistent; "
                f"selfconsist supports {_SUPPORTED_TEXT}")
    if class_name in OTHER_KL or (class_name or "").startswith("AutoencoderKL"):
        return (f"{class_name} is not supported (video, audio and other-architecture VAEs are "
                f"not wired up yet); selfconsist's diffusers adapter supports {_SUPPORTED_TEXT}")
    return (f"{class_name or 'this model'} is not a VAE selfconsist can tune; point at the VAE "
            f"(a pipeline's vae/ folder); supported classes: {_SUPPORTED_TEXT}")


# ---------------------------------------------------------------------------------------------
# Inferring an AutoencoderKL config from tensor shapes
# ---------------------------------------------------------------------------------------------


@dataclass
class KnownVAE:
    """A published VAE architecture and the latent statistics its diffusion models assume.

    ``hints`` are looked for in the tokens of the checkpoint's file name when several known VAEs
    share one architecture (SD 1.x and SDXL; SD3 and FLUX.1): the scaling factor is not in the
    tensors. A hint matches a whole word of the name only (see :func:`_tokens`).
    """

    name: str
    description: str
    latent_channels: int
    block_out_channels: tuple[int, ...]
    use_quant_conv: bool
    config: dict[str, Any]
    hints: tuple[str, ...] = ()
    default: bool = False  # the pick for this architecture when no hint matches
    extra: dict[str, Any] = field(default_factory=dict)


# Published values (the diffusers configs of the respective model repositories).
KNOWN_VAES: tuple[KnownVAE, ...] = (
    KnownVAE("sd", "Stable Diffusion 1.x/2.x VAE (kl-f8)", 4, (128, 256, 512, 512), True,
             {"scaling_factor": 0.18215, "shift_factor": None, "sample_size": 512},
             hints=("sd15", "sd1", "sd2", "sd21", "ft", "mse", "ema", "840000", "560000"),
             default=True),
    KnownVAE("sdxl", "Stable Diffusion XL VAE", 4, (128, 256, 512, 512), True,
             {"scaling_factor": 0.13025, "shift_factor": None, "sample_size": 1024},
             hints=("sdxl", "xl", "pony", "illustrious")),
    KnownVAE("sd3", "Stable Diffusion 3 / 3.5 VAE (16 channels)", 16, (128, 256, 512, 512), False,
             {"scaling_factor": 1.5305, "shift_factor": 0.0609, "sample_size": 1024},
             hints=("sd3", "sd35", "sd3.5", "stable-diffusion-3", "stable_diffusion_3")),
    KnownVAE("flux", "FLUX.1 VAE (16 channels)", 16, (128, 256, 512, 512), False,
             {"scaling_factor": 0.3611, "shift_factor": 0.1159, "sample_size": 1024},
             hints=("flux", "=ae"), default=True),
)


def known_vae(name: str) -> KnownVAE:
    for k in KNOWN_VAES:
        if k.name == name:
            return k
    raise KeyError(name)


def _tokens(file_name: str) -> set[str]:
    """The whole words of a file name, for hint matching.

    Words are split at anything but letters, digits and dots, at camelCase humps, and at
    letter→digit and digit→letter changes (``ponyDiffusionV6XL`` → pony, diffusion, v, 6, xl),
    with each letters-then-digits run kept too (``flux1``, ``sd15``) and the whole stem. Hints
    match whole words only, so ``ema`` is not found in ``cinematic`` nor ``ft`` in ``softedge``.
    """
    stem = file_name
    for suffix in (".safetensors",):
        stem = stem.removesuffix(suffix)
    coarse = [t for t in re.split(r"[^A-Za-z0-9.]+", stem) if t]
    toks = {stem.lower()} | {t.lower() for t in coarse}
    for t in coarse:
        humps = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", t).lower().split()
        for h in humps:
            toks |= set(re.findall(r"[a-z]+|[0-9]+", h)) | set(re.findall(r"[a-z]+[0-9]+", h))
            toks |= set(re.findall(r"[a-z]+[0-9]+(?:\.[0-9]+)?", h))
    return toks


def match_known(config: Mapping[str, Any], file_name: str = "") -> tuple[KnownVAE | None, str]:
    """The known VAE for an inferred architecture, and how it was chosen: ``"hint"`` (the file
    name says), ``"default"`` (the architecture's usual pick; the file name says nothing) or
    ``"none"``."""
    cands = [k for k in KNOWN_VAES
             if k.latent_channels == config["latent_channels"]
             and tuple(k.block_out_channels) == tuple(config["block_out_channels"])
             and k.use_quant_conv == config["use_quant_conv"]
             and config.get("layers_per_block") == 2 and config.get("in_channels") == 3]
    if not cands:
        return None, "none"
    toks = _tokens(file_name)

    def hit(h: str) -> bool:
        return h.lstrip("=") in toks

    # The longest matching hint wins, so "sdxl" beats the short hints of a plain SD VAE.
    scored = sorted(((max((len(h.lstrip("=")) for h in k.hints if hit(h)), default=0), k)
                     for k in cands), key=lambda s: -s[0])
    if scored[0][0] > 0:
        return scored[0][1], "hint"
    for k in cands:
        if k.default:
            return k, "default"
    return cands[0], "default"


def infer_config(shapes: Mapping[str, Sequence[int]], layout: str, prefix: str = "",
                 norm_num_groups: int = 32) -> dict[str, Any]:
    """An ``AutoencoderKL`` config (the architecture part) from tensor shapes alone.

    * block widths: output channels of each encoder down block's first resnet;
    * layers per block: resnets in the first encoder down block;
    * latent channels: half the encoder's ``conv_out`` channels (it emits mean and log-variance);
    * image channels: ``encoder.conv_in`` input and ``decoder.conv_out`` output channels;
    * ``quant_conv`` / ``post_quant_conv`` / mid-block attention: present or not.

    GroupNorm group counts leave no trace in the tensors: ``norm_num_groups`` (32 in every
    published SD-style VAE) is taken as given. Raises ``ValueError`` when the shapes do not
    describe such a VAE.
    """
    s = {k[len(prefix):]: tuple(v) for k, v in shapes.items() if k.startswith(prefix)}
    if layout == "ldm":
        n = num_blocks(s, r"encoder\.down\.(\d+)\.")
        widths = [s.get(f"encoder.down.{i}.block.0.conv2.weight", (0,))[0] for i in range(n)]
        layers = num_blocks(s, r"encoder\.down\.0\.block\.(\d+)\.")
        n_dec = num_blocks(s, r"decoder\.up\.(\d+)\.")
        dec_layers = num_blocks(s, r"decoder\.up\.0\.block\.(\d+)\.")
        attn = "encoder.mid.attn_1.q.weight" in s
    elif layout == "diffusers":
        n = num_blocks(s, r"encoder\.down_blocks\.(\d+)\.")
        widths = [s.get(f"encoder.down_blocks.{i}.resnets.0.conv2.weight", (0,))[0]
                  for i in range(n)]
        layers = num_blocks(s, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")
        n_dec = num_blocks(s, r"decoder\.up_blocks\.(\d+)\.")
        dec_layers = num_blocks(s, r"decoder\.up_blocks\.0\.resnets\.(\d+)\.")
        attn = any(k.startswith("encoder.mid_block.attentions.0.") for k in s)
    else:
        raise ValueError(f"unknown layout {layout!r}")
    try:
        conv_in, conv_out = s["encoder.conv_in.weight"], s["encoder.conv_out.weight"]
        dec_out = s["decoder.conv_out.weight"]
    except KeyError as e:
        raise ValueError(f"missing tensor {prefix}{e.args[0]}") from None
    if n == 0 or 0 in widths or layers == 0:
        raise ValueError("no encoder down blocks found")
    if n_dec != n or dec_layers != layers + 1:
        raise ValueError(f"encoder has {n} blocks × {layers} layers but decoder has {n_dec} "
                         f"blocks × {dec_layers} layers (expected {n} × {layers + 1})")
    if conv_out[0] % 2:
        raise ValueError("encoder.conv_out has an odd channel count; not a diagonal-Gaussian encoder")
    bad = [w for w in widths if w % norm_num_groups]
    if bad:
        raise ValueError(f"block widths {widths} are not divisible by norm_num_groups={norm_num_groups}")
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": int(conv_in[1]),
        "out_channels": int(dec_out[0]),
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": [int(w) for w in widths],
        "layers_per_block": int(layers),
        "act_fn": "silu",
        "latent_channels": int(conv_out[0] // 2),
        "norm_num_groups": int(norm_num_groups),
        "use_quant_conv": "quant_conv.weight" in s,
        "use_post_quant_conv": "post_quant_conv.weight" in s,
        "mid_block_add_attention": bool(attn),
    }


# ---------------------------------------------------------------------------------------------
# The config of one file
# ---------------------------------------------------------------------------------------------


def _note(message: str) -> None:
    """One line on stderr (results go to stdout) for a guess the user may want to correct."""
    log.warning(f"note: {message}")


def override_stats(config: dict[str, Any], opts: LoadOptions) -> dict[str, Any]:
    """``config`` with the ``scaling_factor`` / ``shift_factor`` options written in."""
    config = dict(config)
    if opts.scaling_factor is not None:
        if opts.scaling_factor <= 0:
            raise SelfconsistError("scaling_factor must be positive")
        config["scaling_factor"] = float(opts.scaling_factor)
    if opts.shift_factor is not None:
        config["shift_factor"] = float(opts.shift_factor)
    return config


def single_file_config(path: Path, header: Mapping[str, Any], layout: str, prefix: str,
                       meta: Mapping[str, str], opts: LoadOptions) -> tuple[dict[str, Any], str]:
    """The model config of a single-file checkpoint and where it came from.

    In order: the ``config`` option; a config recorded by an earlier selfconsist run; a
    ``config.json`` beside a diffusers-layout file; the ``model_type`` option; inference from
    the tensor shapes plus the statistics of the matching published VAE.
    """
    if opts.config is not None:
        if isinstance(opts.config, dict):
            return dict(opts.config), "config option"
        cfg = read_json(Path(opts.config))
        if cfg is None:
            raise SelfconsistError(f"config {opts.config}: not a readable JSON object")
        return cfg, f"config option ({opts.config})"
    recorded = meta.get(META_PREFIX + "diffusers_config")
    if recorded:
        try:
            return json.loads(recorded), "recorded by selfconsist"
        except json.JSONDecodeError:
            pass
    if layout == "diffusers":
        cfg = read_json(path.parent / "config.json")
        if cfg is not None and cfg.get("_class_name") in SUPPORTED:
            return cfg, "config.json beside the file"
    shapes = {k: v["shape"] for k, v in header.items() if k != "__metadata__"}
    try:
        cfg = infer_config(shapes, layout, prefix, opts.norm_num_groups)
    except ValueError as e:
        raise CheckpointError(f"{path}: cannot infer the VAE architecture from its tensors ({e}); "
                              "pass a diffusers config.json as the config option") from None
    if opts.model_type is not None:
        try:
            known = known_vae(opts.model_type)
        except KeyError:
            names = [k.name for k in KNOWN_VAES]
            raise SelfconsistError(f"model_type {opts.model_type!r}: choose one of {names}") from None
        how = "model_type option"
    else:
        known, how = match_known(cfg, path.name)
    if known is None:
        cfg["sample_size"] = MAX_DEFAULT_IMAGE_SIZE
        if opts.scaling_factor is None:
            _note(f"{path.name}: not a VAE architecture selfconsist knows, so its latent scaling "
                  "factor is unknown; the diffusion prior uses diffusers' default 0.18215 "
                  "(choose with --scaling-factor / --shift-factor or --config)")
        return cfg, "inferred from tensors"
    if how == "default" and opts.scaling_factor is None and any(
            k.name != known.name and k.latent_channels == known.latent_channels
            for k in KNOWN_VAES):
        _note(f"{path.name}: the file name does not say which model this VAE belongs to; "
              f"assuming the latent statistics of {known.description} (choose with --model-type, "
              "--scaling-factor or --config)")
    elif how == "hint" and opts.scaling_factor is None:
        _note(f"{path.name}: latent statistics of {known.description} guessed from the file name "
              "(choose with --model-type, --scaling-factor or --config)")
    cfg.update(known.config)
    return cfg, f"inferred from tensors; statistics of {known.name} ({how})"
