"""All conversion between the two key layouts of a latent-diffusion VAE: names and shapes.

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
weights carry two trailing unit dimensions (:func:`to_model_shape` / :func:`to_file_layout`
reconcile those, so the adapter never reshapes by itself).

Nothing here imports diffusers: the adapter's ``sniff`` uses these functions on a
safetensors header alone. What the shapes say about the architecture is
:mod:`selfconsist.adapters.diffusers_config`'s job.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import Tensor

# Prefixes under which a VAE sits inside a bigger checkpoint ("" = a VAE-only file).
KNOWN_PREFIXES = ("", "first_stage_model.", "vae.")

_ATTN_LDM_TO_DIFF = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v",
                     "proj_out": "to_out.0"}
_ATTN_DIFF_TO_LDM = {v: k for k, v in _ATTN_LDM_TO_DIFF.items()}
# Names of older diffusers checkpoints' attention layers (diffusers < 0.14).
_ATTN_DEPRECATED = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}

_RESNET = r"(norm1|conv1|norm2|conv2|nin_shortcut)"
# The LDM attention projections stored as 1×1 convolutions (diffusers: linear layers).
_ATTN_LDM_WEIGHT = re.compile(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$")


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
        if _ATTN_LDM_WEIGHT.search(lk) and v.ndim == 2:
            v = v.reshape(*v.shape, 1, 1)
        out[lk] = v
    return out


def to_model_shape(tensor: Tensor, shape: Sequence[int]) -> Tensor | None:
    """``tensor`` from a file in the model's parameter ``shape``, or None when it cannot be.

    The layouts store the same numbers and disagree only in unit dimensions (LDM attention
    projections are (C, C, 1, 1) convolutions, diffusers' are (C, C) linear layers; older
    diffusers files have them as convolutions too), so a tensor with the right number of
    elements is reshaped and any other mismatch is a tensor of another model.
    """
    if tuple(tensor.shape) == tuple(shape):
        return tensor
    if tensor.numel() != math.prod(shape):
        return None
    return tensor.reshape(tuple(shape))


def to_file_layout(tensor: Tensor, original: Tensor) -> Tensor:
    """A (tuned) model tensor in the shape and dtype of the file tensor it came from, the
    inverse of :func:`to_model_shape`, so a saved file keeps its input's layout."""
    return tensor.reshape(original.shape).to(original.dtype)
