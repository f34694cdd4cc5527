"""Checkpoint IO helpers: atomic writes, hashing, safetensors headers, resumable state."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import CheckpointError, SelfconsistError
from .runtime import log

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
    temporary path). The result is fsynced (files, then folders) before the rename, and an
    existing folder is renamed aside first and removed only after the new one is in place, so
    at every moment ``path`` is either the complete old output or the complete new one. A full
    disk ends in one :class:`SelfconsistError` with nothing left behind.
    """
    import shutil

    path = Path(path)
    if path.exists() and not overwrite:
        raise SelfconsistError(f"{path} exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp / path.name
    try:
        try:
            yield target
            if not target.exists():
                raise RuntimeError(f"nothing was written to {target}")
            _normal_permissions(target)
            _fsync_tree(target)
        except Exception as e:
            if is_disk_full(e):
                raise SelfconsistError(f"no space left on the device while writing {path}; "
                                       "nothing was written: free some space and run again") from None
            raise
        aside = tmp / (path.name + ".old")
        if path.is_dir() and not path.is_symlink():
            if not _exchange(target, path):  # atomic swap where the kernel offers it, else:
                os.replace(path, aside)  # same folder: atomic, and the old output still exists
                try:
                    os.replace(target, path)
                except BaseException:
                    os.replace(aside, path)
                    raise
        else:
            os.replace(target, path)
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported.

    With it, replacing a folder has no moment at all without OUT; without it, the fallback
    renames the old folder aside first, so OUT is missing only between two renames and the old
    one is never deleted before the new one is in place.
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    ok = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
    return ok


def is_disk_full(e: BaseException) -> bool:
    """Whether ``e`` reports a full disk or quota (errno, or the text safetensors/torch give)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return "No space left on device" in text or "os error 28" in text or "Disk quota" in text


def _fsync_dir(path: Path) -> None:
    """fsync a folder so a rename inside it survives a power cut (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EBADF):  # some filesystems can't fsync folders
            raise
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """fsync every file under ``path`` (or ``path`` itself), then the folders, deepest first."""
    if path.is_file():
        with open(path, "rb+") as fh:
            os.fsync(fh.fileno())
        return
    dirs = [path]
    for p in sorted(path.rglob("*")):
        if p.is_file() and not p.is_symlink():
            with open(p, "rb+") as fh:
                os.fsync(fh.fileno())
        elif p.is_dir():
            dirs.append(p)
    for d in reversed(dirs):
        _fsync_dir(d)


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
        _fsync_dir(path.parent)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, Exception) and is_disk_full(e):
            raise SelfconsistError(f"no space left on the device while saving {path}; the previous "
                                   "state is intact: free some space and run again with --resume") from None
        raise


def load_state(path: str | Path, config: str | None = None, added: Mapping[str, Any] | None = None,
               precision: str | None = None) -> dict[str, Any]:
    """Load a resumable state written by :func:`atomic_torch_save` (weights only: no code runs).

    With ``config`` (the run's settings as :func:`json_meta`), refuse a state written by a run
    with other settings: resuming it would silently mix two experiments. ``added`` names
    settings introduced since older states were written, with the value those runs had
    (``{"precision": "fp32"}``), so such a state still resumes. With ``precision`` (what this
    run resolved to), refuse a state whose run computed in another one (``--precision auto``
    on another machine or device): its optimiser state would not continue the same run.
    """
    path = Path(path)
    if not path.exists():
        raise SelfconsistError(f"{path}: no state to resume from (the run stopped before its "
                               "first save); run again without --resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here means a bad state file
        raise CheckpointError(f"{path}: cannot read resumable state ({e})") from None
    if config is not None and not _same_config(state.get("config"), config, added or {}):
        raise SelfconsistError(f"{path} was written by a run with other settings; "
                               "resume with the same options or start afresh")
    ran = state.get("precision")  # None: a state from before it was recorded
    if precision is not None and ran is not None and ran != precision:
        raise SelfconsistError(f"{path} was written by a run in {ran}, and this one would run in "
                               f"{precision}; resume with --precision {ran} where it runs, or start afresh")
    return state


def _same_config(saved: Any, config: str, added: Mapping[str, Any]) -> bool:
    """Whether a state's saved settings are ``config``, counting a setting missing from an older
    state as its ``added`` value."""
    if saved == config:
        return True
    if not added or not isinstance(saved, str):
        return False
    try:
        old, new = json.loads(saved), json.loads(config)
    except ValueError:
        return False
    return isinstance(old, dict) and {**added, **old} == new


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


def lock_path_for(out: str | Path) -> Path:
    """The lock file a run writing ``out`` holds beside it."""
    out = Path(out)
    return out.with_name(out.name + ".lock")


def _pid_alive(pid: Any) -> bool:
    """Whether ``pid`` runs on this host; anything odd counts as alive (never steal a lock)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _lock_owner(lock: Path) -> dict[str, Any] | None:
    try:
        info = json.loads(lock.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


@contextmanager
def output_lock(out: str | Path) -> Iterator[Path]:
    """Hold ``OUT.lock`` (pid, host, start time, command) while a run writes ``out``.

    A second run for the same ``out`` refuses with one line naming the first. A lock left by a
    killed run (its pid is gone on this host) is taken over with a note on stderr. The lock is
    written whole to a temporary file and hard-linked into place, so it is created atomically
    (like ``O_CREAT|O_EXCL``) and never seen half-written; it is removed on every exit path.
    """
    import socket
    import time

    out = Path(out)
    lock = lock_path_for(out)
    made_parent = not out.parent.exists()
    out.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
          "command": " ".join(["selfconsist", *sys.argv[1:]])}
    fd, tmp = tempfile.mkstemp(prefix=f".{lock.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(me, fh)
        for _ in range(3):
            try:
                os.link(tmp, lock)
                break
            except FileExistsError:
                owner = _lock_owner(lock)
                if owner is None:
                    raise SelfconsistError(f"{lock} exists but is unreadable; if no other run is "
                                           f"writing {out}, remove it and run again") from None
                if owner.get("host") == me["host"] and not _pid_alive(owner.get("pid")):
                    log.warning(f"note: taking over the stale lock {lock} of a run that is gone "
                                f"(pid {owner.get('pid')}, started {owner.get('started')})")
                    lock.unlink(missing_ok=True)
                    continue
                raise SelfconsistError(
                    f"{out} is being written by another run (pid {owner.get('pid')} on "
                    f"{owner.get('host')}, started {owner.get('started')}: {owner.get('command')}); "
                    f"wait for it, or remove {lock} if that run is gone") from None
        else:
            raise SelfconsistError(f"cannot take the lock {lock}; run again")
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        if made_parent:
            _rmdir_if_empty(out.parent)
        raise
    Path(tmp).unlink(missing_ok=True)
    try:
        yield lock
    finally:
        if (_lock_owner(lock) or {}).get("pid") == me["pid"]:
            lock.unlink(missing_ok=True)
        if made_parent:
            _rmdir_if_empty(out.parent)


def _rmdir_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


def locks_output(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a run function taking ``out``: hold :func:`output_lock` for it while it runs."""
    import functools
    import inspect

    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        out = sig.bind(*args, **kwargs).arguments.get("out")
        from .distributed import is_main_process

        if out is None or not is_main_process():  # torchrun: rank 0 alone writes OUT
            return fn(*args, **kwargs)
        with output_lock(out):
            return fn(*args, **kwargs)

    return wrapper
