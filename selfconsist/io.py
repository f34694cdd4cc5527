"""Checkpoint IO helpers: atomic writes, hashing, safetensors headers, resumable state."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import CheckpointError, SelfconsistError

# safetensors stores metadata as str→str; we keep ours under one prefix.
META_PREFIX = "selfconsist."


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file, or of every file under a folder (sorted by relative path)."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    return h.hexdigest()


def read_safetensors_header(path: str | Path) -> dict[str, Any]:
    """Parse the JSON header of a ``.safetensors`` file without reading tensors.

    Raises :class:`CheckpointError` for a missing, truncated or corrupt file.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated or not a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100_000_000:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors header")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header")
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
                  default=0)
    except (KeyError, TypeError, IndexError, ValueError):
        raise CheckpointError(f"{path}: corrupt safetensors header (bad tensor entry)") from None
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path}: truncated: header promises {8 + n + end} bytes, file has {size}"
        )
    return header


def load_safetensors(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, with clear errors for bad files."""
    from safetensors.torch import load_file

    header = read_safetensors_header(path)
    try:
        tensors = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors' error class differs across versions
        raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from None
    return tensors, dict(header.get("__metadata__") or {})


def save_safetensors(tensors: Mapping[str, Tensor], path: str | Path, metadata: Mapping[str, str]) -> None:
    """Write tensors to safetensors, de-aliasing shared storage and making them contiguous."""
    from safetensors.torch import save_file

    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    save_file(clean, str(path), metadata={str(k): str(v) for k, v in metadata.items()})


@contextmanager
def atomic_output(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds.

    A crash or error leaves no half-written ``path``. An existing ``path`` is refused unless
    ``overwrite``. Works for files and folders (the block creates whatever it wants at the
    temporary path).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise SelfconsistError(f"{path} exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        if not target.exists():
            raise RuntimeError(f"nothing was written to {target}")
        _normal_permissions(target)
        if path.is_dir() and not path.is_symlink():
            import shutil

            shutil.rmtree(path)
        os.replace(target, path)
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def _normal_permissions(path: Path) -> None:
    """Temporary files are private (0600); give the result the usual umask-based mode."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file, fsync, then rename: a kill never leaves a torn state."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_state(path: str | Path, config: str | None = None) -> dict[str, Any]:
    """Load a resumable state written by :func:`atomic_torch_save` (weights only: no code runs).

    With ``config`` (the run's settings as :func:`json_meta`), refuse a state written by a run
    with other settings: resuming it would silently mix two experiments.
    """
    path = Path(path)
    if not path.exists():
        raise SelfconsistError(f"{path}: no state to resume from")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here means a bad state file
        raise CheckpointError(f"{path}: cannot read resumable state ({e})") from None
    if config is not None and state.get("config") != config:
        raise SelfconsistError(f"{path} was written by a run with other settings; "
                               "resume with the same options or start afresh")
    return state


def rng_state(generator: torch.Generator) -> dict[str, Tensor]:
    """Everything random a run depends on, so resuming replays the same stream."""
    state = {"generator": generator.get_state(), "torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(generator: torch.Generator, state: Mapping[str, Tensor]) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch_cuda"])


def json_meta(obj: Any) -> str:
    """JSON for a metadata value: sorted keys, no NaN surprises."""
    return json.dumps(obj, sort_keys=True, default=str)


def state_path_for(out: str | Path) -> Path:
    """Where a run writing ``out`` keeps its resumable state."""
    out = Path(out)
    return out.with_name(out.name + ".state.pt")


ProgressFn = Callable[[int, dict[str, float]], None]
