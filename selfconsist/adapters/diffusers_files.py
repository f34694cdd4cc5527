"""Finding and reading a diffusers VAE's files: folders, pipelines, variants, shards, single files.

Which files hold the weights (:func:`weight_files`: a variant, a sharded index, legacy
pickled ``.bin``), where the VAE of a pipeline is (:func:`vae_folder`), which Hub repo a
cached path came from (:func:`hub_origin`), and the tensors and header metadata they hold
(:func:`read_tensors`). Nothing here imports diffusers, and nothing is unpickled unless the
caller trusts the folder.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import CheckpointError
from ..io import read_safetensors_header

WEIGHTS_NAME = "diffusion_pytorch_model"


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``, or None when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def vae_folder(path: Path) -> Path | None:
    """The folder holding the VAE's ``config.json``: ``path`` itself for a model folder, its
    ``vae/`` for a pipeline folder (``model_index.json``); None if neither."""
    if not path.is_dir():
        return None
    cfg = read_json(path / "config.json")
    if cfg is not None and "_class_name" in cfg:
        return path
    if (path / "model_index.json").is_file():
        vae = path / "vae"
        cfg = read_json(vae / "config.json")
        if cfg is not None and "_class_name" in cfg:
            return vae
    return None


def hub_origin(path: Path) -> tuple[str | None, str | None]:
    """(repo_id, revision) for a path inside a Hugging Face cache snapshot
    (``…/models--ORG--NAME/snapshots/REV/…``), else (None, None)."""
    parts = path.absolute().parts
    for i, part in enumerate(parts[:-2]):
        if part.startswith("models--") and parts[i + 1] == "snapshots":
            return part[len("models--"):].replace("--", "/", 1), parts[i + 2]
    return None, None


@dataclass
class WeightFiles:
    """The files one set of weights is spread over, their variant, and whether they are pickles."""

    files: list[Path]
    variant: str | None
    pickled: bool = False


def weight_files(folder: Path, variant: str | None, trust_remote_code: bool) -> WeightFiles:
    """The weight files of a diffusers model folder.

    Picks, in order: the requested variant; plain ``diffusion_pytorch_model.safetensors``
    (or its sharded index); the only (or alphabetically first) variant present.
    """
    def found(v: str | None) -> list[Path] | None:
        dot = f".{v}" if v else ""
        single = folder / f"{WEIGHTS_NAME}{dot}.safetensors"
        if single.is_file():
            return [single]
        index = folder / f"{WEIGHTS_NAME}.safetensors.index{dot}.json"
        if index.is_file():
            data = read_json(index)
            if data is None or not isinstance(data.get("weight_map"), dict):
                raise CheckpointError(f"{index}: corrupt shard index")
            shards = sorted(set(data["weight_map"].values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise CheckpointError(f"{folder}: shard {missing[0]} named in {index.name} is missing")
            return [folder / s for s in shards]
        return None

    if variant is not None:
        files = found(variant)
        if files is None:
            raise CheckpointError(f"{folder}: no weights for variant {variant!r} "
                                  f"({WEIGHTS_NAME}.{variant}.safetensors)")
        return WeightFiles(files, variant)
    files = found(None)
    if files is not None:
        return WeightFiles(files, None)
    variants = sorted({m.group(1) for p in folder.iterdir()
                       if (m := re.fullmatch(re.escape(WEIGHTS_NAME) +
                                             r"\.([A-Za-z0-9_]+)(-\d+-of-\d+)?\.safetensors", p.name))
                       } | {m.group(1) for p in folder.iterdir()
                            if (m := re.fullmatch(re.escape(WEIGHTS_NAME) +
                                                  r"\.safetensors\.index\.([A-Za-z0-9_]+)\.json", p.name))})
    for v in variants:
        files = found(v)
        if files is not None:
            return WeightFiles(files, v)
    bins = sorted(folder.glob(f"{WEIGHTS_NAME}*.bin"))
    if bins:
        if not trust_remote_code:
            raise CheckpointError(
                f"{folder}: only pickled weights ({bins[0].name}); convert them to safetensors, "
                "or pass --trust-remote-code to read them (torch.load with weights_only=True)")
        m = re.fullmatch(re.escape(WEIGHTS_NAME) + r"(?:\.([A-Za-z0-9_]+))?\.bin", bins[0].name)
        return WeightFiles([bins[0]], m.group(1) if m else None, pickled=True)
    raise CheckpointError(f"{folder}: no {WEIGHTS_NAME}.safetensors (nor a sharded or variant "
                          "version) next to config.json")


def read_tensors(files: list[Path], only: set[str] | None = None,
                 pickled: bool = False) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors (all, or the keys in ``only``) and the first file's header metadata."""
    if pickled:
        try:
            sd = torch.load(files[0], map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure means a bad file
            raise CheckpointError(f"{files[0]}: cannot read ({e})") from None
        return {k: v for k, v in sd.items() if only is None or k in only}, {}
    from safetensors import safe_open

    tensors: dict[str, Tensor] = {}
    meta: dict[str, str] = {}
    for i, f in enumerate(files):
        header = read_safetensors_header(f)
        if i == 0:
            meta = dict(header.get("__metadata__") or {})
        try:
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    if only is None or k in only:
                        tensors[k] = fh.get_tensor(k)
        except Exception as e:  # noqa: BLE001 - safetensors' error class differs across versions
            raise CheckpointError(f"{f}: cannot read safetensors file ({e})") from None
    return tensors, meta


def file_stat(path: Path) -> tuple[int, int]:
    """(size, mtime) of a file, so a save can tell the input changed since it was read."""
    st = path.stat()
    return (st.st_size, st.st_mtime_ns)


def dtype_name(tensors: Mapping[str, Tensor]) -> str:
    """The floating dtypes of a checkpoint's tensors, e.g. ``float16`` or ``bfloat16/float32``."""
    names = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()
                    if t.is_floating_point()})
    return "/".join(names) or "none"
