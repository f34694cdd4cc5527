"""Key layouts of latent-diffusion VAE checkpoints, and configs inferred from tensors.

Stable Diffusion's VAE ships in two key layouts:

* the **original** (CompVis / LDM) layout that ComfyUI and A1111 read, e.g.
  ``encoder.down.0.block.1.conv1.weight``, ``decoder.up.3.upsample.conv.weight``,
  ``encoder.mid.attn_1.q.weight`` (attention projections stored as 1×1 convolutions),
  optionally under a prefix such as ``first_stage_model.`` (a full SD checkpoint) or
  ``vae.``;
* the **diffusers** layout of ``AutoencoderKL``, e.g.
  ``encoder.down_blocks.0.resnets.1.conv1.weight``, ``decoder.up_blocks.0.upsamplers.0.conv.weight``,
  ``encoder.mid_block.attentions.0.to_q.weight`` (linear layers).

The two differ in names only, apart from three facts: the decoder's up blocks are
numbered in opposite orders (LDM ``up.i`` is diffusers ``up_blocks.{n−1−i}``), LDM calls
the resnet shortcut ``nin_shortcut`` (diffusers ``conv_shortcut``), and LDM attention
weights carry two trailing unit dimensions. Shapes are reconciled by the caller, which
knows the model's parameter shapes.

Nothing here imports diffusers: the adapter's ``sniff`` uses these functions on a
safetensors header alone.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# Prefixes under which a VAE sits inside a bigger checkpoint ("" = a VAE-only file).
KNOWN_PREFIXES = ("", "first_stage_model.", "vae.")

_ATTN_LDM_TO_DIFF = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v",
                     "proj_out": "to_out.0"}
_ATTN_DIFF_TO_LDM = {v: k for k, v in _ATTN_LDM_TO_DIFF.items()}
# Names of older diffusers checkpoints' attention layers (diffusers < 0.14).
_ATTN_DEPRECATED = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}

_RESNET = r"(norm1|conv1|norm2|conv2|nin_shortcut)"


def find_prefix(keys: Iterable[str]) -> str | None:
    """The prefix p under which ``p + "encoder.conv_in.weight"`` and ``p + "decoder.conv_in.weight"``
    both exist, or None when the keys hold no VAE. Known prefixes first, then any other."""
    keyset = set(keys)
    for p in KNOWN_PREFIXES:
        if p + "encoder.conv_in.weight" in keyset and p + "decoder.conv_in.weight" in keyset:
            return p
    for k in keyset:
        if k.endswith("encoder.conv_in.weight"):
            p = k[: -len("encoder.conv_in.weight")]
            if (p == "" or p.endswith(".")) and p + "decoder.conv_in.weight" in keyset:
                return p
    return None


def detect_layout(keys: Iterable[str]) -> tuple[str, str] | None:
    """``("ldm", prefix)`` or ``("diffusers", prefix)`` for a checkpoint holding an SD-style VAE;
    None otherwise (e.g. selfconsist's built-in VAEs, which also use ``encoder.*`` keys)."""
    keyset = set(keys)
    p = find_prefix(keyset)
    if p is None:
        return None
    if p + "encoder.down.0.block.0.conv1.weight" in keyset:
        return ("ldm", p)
    if p + "encoder.down_blocks.0.resnets.0.conv1.weight" in keyset:
        return ("diffusers", p)
    return None


def num_blocks(keys: Iterable[str], pattern: str) -> int:
    """How many distinct block indices match ``pattern`` (a regex with one group)."""
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in keys if (m := rx.match(k))}
    return max(found) + 1 if found else 0


def ldm_to_diffusers_key(key: str, n_up: int) -> str | None:
    """The diffusers name of an (unprefixed) LDM VAE key, or None for a key that is not a VAE
    tensor. ``n_up`` is the decoder's number of up blocks (LDM numbers them in reverse)."""
    if m := re.fullmatch(r"(quant_conv|post_quant_conv)\.(weight|bias)", key):
        return key
    m = re.fullmatch(r"(encoder|decoder)\.(.+)", key)
    if not m:
        return None
    part, rest = m.groups()
    if m2 := re.fullmatch(r"(conv_in|conv_out)\.(weight|bias)", rest):
        return key
    if m2 := re.fullmatch(r"norm_out\.(weight|bias)", rest):
        return f"{part}.conv_norm_out.{m2.group(1)}"
    if m2 := re.fullmatch(r"mid\.block_([12])\." + _RESNET + r"\.(weight|bias)", rest):
        name = "conv_shortcut" if m2.group(2) == "nin_shortcut" else m2.group(2)
        return f"{part}.mid_block.resnets.{int(m2.group(1)) - 1}.{name}.{m2.group(3)}"
    if m2 := re.fullmatch(r"mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)", rest):
        return f"{part}.mid_block.attentions.0.{_ATTN_LDM_TO_DIFF[m2.group(1)]}.{m2.group(2)}"
    if part == "encoder":
        if m2 := re.fullmatch(r"down\.(\d+)\.block\.(\d+)\." + _RESNET + r"\.(weight|bias)", rest):
            i, j, name, wb = m2.groups()
            name = "conv_shortcut" if name == "nin_shortcut" else name
            return f"encoder.down_blocks.{i}.resnets.{j}.{name}.{wb}"
        if m2 := re.fullmatch(r"down\.(\d+)\.downsample\.conv\.(weight|bias)", rest):
            return f"encoder.down_blocks.{m2.group(1)}.downsamplers.0.conv.{m2.group(2)}"
    else:
        if m2 := re.fullmatch(r"up\.(\d+)\.block\.(\d+)\." + _RESNET + r"\.(weight|bias)", rest):
            i, j, name, wb = m2.groups()
            name = "conv_shortcut" if name == "nin_shortcut" else name
            return f"decoder.up_blocks.{n_up - 1 - int(i)}.resnets.{j}.{name}.{wb}"
        if m2 := re.fullmatch(r"up\.(\d+)\.upsample\.conv\.(weight|bias)", rest):
            return f"decoder.up_blocks.{n_up - 1 - int(m2.group(1))}.upsamplers.0.conv.{m2.group(2)}"
    return None


def diffusers_to_ldm_key(key: str, n_up: int) -> str:
    """The LDM name of a diffusers ``AutoencoderKL`` key (the inverse of
    :func:`ldm_to_diffusers_key`); raises ``KeyError`` for a key with no LDM name."""
    if re.fullmatch(r"(quant_conv|post_quant_conv)\.(weight|bias)", key):
        return key
    m = re.fullmatch(r"(encoder|decoder)\.(.+)", key)
    if not m:
        raise KeyError(key)
    part, rest = m.groups()
    if re.fullmatch(r"(conv_in|conv_out)\.(weight|bias)", rest):
        return key
    if m2 := re.fullmatch(r"conv_norm_out\.(weight|bias)", rest):
        return f"{part}.norm_out.{m2.group(1)}"
    res = r"(norm1|conv1|norm2|conv2|conv_shortcut)"
    if m2 := re.fullmatch(r"mid_block\.resnets\.([01])\." + res + r"\.(weight|bias)", rest):
        name = "nin_shortcut" if m2.group(2) == "conv_shortcut" else m2.group(2)
        return f"{part}.mid.block_{int(m2.group(1)) + 1}.{name}.{m2.group(3)}"
    if m2 := re.fullmatch(r"mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)",
                          rest):
        return f"{part}.mid.attn_1.{_ATTN_DIFF_TO_LDM[m2.group(1)]}.{m2.group(2)}"
    if part == "encoder":
        if m2 := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\." + res + r"\.(weight|bias)", rest):
            i, j, name, wb = m2.groups()
            name = "nin_shortcut" if name == "conv_shortcut" else name
            return f"encoder.down.{i}.block.{j}.{name}.{wb}"
        if m2 := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)", rest):
            return f"encoder.down.{m2.group(1)}.downsample.conv.{m2.group(2)}"
    else:
        if m2 := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\." + res + r"\.(weight|bias)", rest):
            i, j, name, wb = m2.groups()
            name = "nin_shortcut" if name == "conv_shortcut" else name
            return f"decoder.up.{n_up - 1 - int(i)}.block.{j}.{name}.{wb}"
        if m2 := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)", rest):
            return f"decoder.up.{n_up - 1 - int(m2.group(1))}.upsample.conv.{m2.group(2)}"
    raise KeyError(key)


def diffusers_key_alias(key: str) -> str:
    """Map the attention names of older diffusers checkpoints (``query``, ``key``, ``value``,
    ``proj_attn``) to today's (``to_q``, ``to_k``, ``to_v``, ``to_out.0``); other keys unchanged."""
    m = re.fullmatch(r"(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)", key)
    if m:
        return f"{m.group(1)}.{_ATTN_DEPRECATED[m.group(2)]}.{m.group(3)}"
    return key


def file_to_model_keys(keys: Sequence[str], layout: str, prefix: str) -> dict[str, str]:
    """file key → diffusers model key for every VAE tensor of a checkpoint; other keys are absent
    (they are "extra" keys, written back untouched)."""
    inner = [k[len(prefix):] for k in keys if k.startswith(prefix)]
    out: dict[str, str] = {}
    if layout == "ldm":
        n_up = num_blocks(inner, r"decoder\.up\.(\d+)\.")
        for k in keys:
            if k.startswith(prefix) and (mk := ldm_to_diffusers_key(k[len(prefix):], n_up)):
                out[k] = mk
    elif layout == "diffusers":
        vae_part = re.compile(r"(encoder|decoder|quant_conv|post_quant_conv)\.")
        for k in keys:
            if k.startswith(prefix) and vae_part.match(k[len(prefix):]):
                out[k] = diffusers_key_alias(k[len(prefix):])
    else:
        raise ValueError(f"unknown layout {layout!r}")
    return out


def ldm_state_dict(diffusers_state: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers ``AutoencoderKL`` state dict in the LDM layout: renamed, and attention
    projection weights reshaped to 1×1 convolutions (C, C) → (C, C, 1, 1), as the original
    checkpoints store them."""
    n_up = num_blocks(diffusers_state, r"decoder\.up_blocks\.(\d+)\.")
    out: dict[str, Any] = {}
    for k, v in diffusers_state.items():
        lk = diffusers_to_ldm_key(k, n_up)
        if re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", lk) and v.ndim == 2:
            v = v.reshape(*v.shape, 1, 1)
        out[lk] = v
    return out


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
