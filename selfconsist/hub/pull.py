"""Pulling a model from the Hugging Face Hub: ``owner/name[:subfolder]`` → local files.

Resolution goes through huggingface_hub's cache, so ``HF_HOME``, ``HF_HUB_CACHE``,
``HF_HUB_OFFLINE`` and ``HF_TOKEN`` behave as everywhere else in the ecosystem. Only
the files an adapter reads are fetched: ``*.json``, ``*.safetensors`` and pythae's
``model.pt`` (a weights-only state dict), plus the root ``README.md`` for the license.
Pickles (``*.bin``, ``*.ckpt``, ``*.pkl``, ``*.pth``) and code (``*.py``) are fetched
only with ``trust_remote_code``.
"""

from __future__ import annotations

import fnmatch
import glob
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from .._version import __version__
from ..adapters.base import SourceInfo
from ..errors import CheckpointError, SelfconsistError
from ..runtime import log
from .common import _hub_error, _network_error

SAFE_PATTERNS = ("*.json", "*.safetensors", "model.pt")
#: Pickles and code: fetched only with ``trust_remote_code``.
TRUSTED_PATTERNS = ("*.bin", "*.ckpt", "*.pkl", "*.pt", "*.pth", "*.py")
#: File names that mark a folder model (diffusers, pythae).
FOLDER_MARKERS = ("config.json", "model_config.json")

#: Suffixes of model files: a name ending in one of them is a local path, never a Hub id.
#: (Hub repo names may contain dots, e.g. ``stable-diffusion-3.5-large``, so only these count.)
MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".pkl", ".json", ".npz", ".npy")

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")

@dataclass(frozen=True)
class RepoRef:
    """``owner/name[:subfolder]``: a model repo and where in it the model lives."""

    repo_id: str
    subfolder: str = ""

    def __str__(self) -> str:
        return f"{self.repo_id}:{self.subfolder}" if self.subfolder else self.repo_id


def check_repo_id(repo_id: str, option: str = "--repo-id") -> str:
    """``repo_id`` if it reads as owner/name, else a one-line error (before any slow work)."""
    if not _REPO_ID.match(repo_id) or ".." in repo_id:
        raise SelfconsistError(f"{option} {repo_id!r}: expected a Hub repo id owner/name")
    return repo_id


def is_path_like(model: str) -> bool:
    """True when ``model`` is meant as a local path, existing or not.

    A mistyped path must fail as a missing file, not as a Hub lookup: anything that exists,
    starts with ``.``, ``/`` or ``~``, contains a backslash, ends in a model-file suffix, or
    whose parent folder exists locally is a path.
    """
    if model.startswith((".", "/", "~")) or "\\" in model:
        return True
    head = model.split(":", 1)[0]
    p = Path(model)
    if p.exists() or head.lower().endswith(MODEL_SUFFIXES):
        return True
    parent = Path(head).parent
    return str(parent) not in ("", ".") and parent.is_dir()


def is_repo_ref(model: str) -> bool:
    """True when ``model`` reads as ``owner/name[:subfolder]`` and is not a local path."""
    if is_path_like(model):
        return False
    repo_id = model.split(":", 1)[0]
    return bool(_REPO_ID.match(repo_id))


def parse_repo_ref(model: str) -> RepoRef:
    """Split ``owner/name[:subfolder]``; the subfolder may also name one file (``:vae.safetensors``)."""
    repo_id, _, sub = model.partition(":")
    if not _REPO_ID.match(repo_id) or ".." in repo_id:
        raise SelfconsistError(
            f"{model!r} is neither an existing path nor a Hub repo id of the form owner/name[:subfolder]"
        )
    sub = sub.strip("/")
    if any(part in ("", "..") for part in sub.split("/")) and sub:
        raise SelfconsistError(f"{model!r}: bad subfolder {sub!r}")
    return RepoRef(repo_id, sub)


@dataclass
class Resolved:
    """A Hub model resolved to local files in the huggingface_hub cache."""

    path: Path  # the folder or file to hand to the adapter registry
    repo_id: str
    subfolder: str
    revision: str | None  # what was asked for (branch, tag or commit); None = main
    commit: str | None  # the commit the cached snapshot belongs to
    license: str | None
    card: dict[str, Any] = field(default_factory=dict)  # the repo README's front matter

    def source(self) -> SourceInfo:
        extra: dict[str, Any] = {"subfolder": self.subfolder} if self.subfolder else {}
        if self.revision and self.revision != self.commit:
            extra["requested_revision"] = self.revision
        for key in ("license_name", "license_link"):
            if key in self.card:
                extra[key] = self.card[key]
        return SourceInfo(path=self.path, repo_id=self.repo_id, revision=self.commit or self.revision,
                          license=self.license, extra=extra)


# path → what it was resolved from, so load_model can fill in vae.source afterwards.
_RESOLVED: dict[str, Resolved] = {}


def _patterns(trust_remote_code: bool) -> tuple[str, ...]:
    return SAFE_PATTERNS + (TRUSTED_PATTERNS if trust_remote_code else ())


def select_files(files: Iterable[str], subfolder: str, trust_remote_code: bool = False) -> list[str]:
    """The repo files an adapter needs for the model in ``subfolder`` (``""``: the root).

    Only files directly in that folder (no deeper), matching the safe patterns (plus
    pickles and code with ``trust_remote_code``). A precision/EMA variant
    ``name.fp16.safetensors`` is skipped when ``name.safetensors`` is there too: adapters
    load the plain file, so the variant would be a wasted download. A subfolder that
    names a file selects just that file.
    """
    files = list(files)
    pats = _patterns(trust_remote_code)
    if subfolder and subfolder in files:  # one named file: the same trust rule applies
        name = PurePosixPath(subfolder).name
        return [subfolder] if any(fnmatch.fnmatchcase(name, p) for p in pats) else []
    prefix = f"{subfolder}/" if subfolder else ""
    chosen = [f for f in files if f.startswith(prefix) and "/" not in f[len(prefix):]
              and any(fnmatch.fnmatchcase(f[len(prefix):], p) for p in pats)]
    names = set(chosen)

    def is_variant(f: str) -> bool:
        p = PurePosixPath(f)
        stem = p.name[: -len(p.suffix)] if p.suffix else p.name
        base, dot, _ = stem.rpartition(".")
        return bool(dot) and str(p.with_name(base + p.suffix)) in names

    return [f for f in chosen if not is_variant(f)]


def default_subfolder(files: Iterable[str]) -> str:
    """For a diffusion *pipeline* repo (``model_index.json`` at the root and no model
    there), the autoencoder lives in ``vae/``: use it rather than fetch the whole pipeline."""
    files = set(files)
    if "model_index.json" in files and not any(m in files for m in FOLDER_MARKERS) \
            and "vae/config.json" in files:
        return "vae"
    return ""


def _model_path(folder: Path, ref: RepoRef, shown: str) -> Path:
    """The file or folder the adapter loads, inside a resolved snapshot."""
    path = folder / ref.subfolder if ref.subfolder else folder
    if not path.exists():
        raise CheckpointError(f"{shown}: {ref.subfolder!r} is not in the repo (or not in the cached "
                              "snapshot); check the part after ':'")
    if path.is_file():
        return path
    if any((path / m).is_file() for m in FOLDER_MARKERS):
        return path
    weights = sorted(path.glob("*.safetensors"))
    if len(weights) == 1:  # a single-file model (e.g. a selfconsist built-in checkpoint)
        return weights[0]
    present = sorted(p.name for p in path.iterdir())[:8]
    what = "several .safetensors files" if weights else f"files {present}"
    raise CheckpointError(f"{shown}: no single model found in the repo ({what}); name it as "
                          "owner/name:subfolder or owner/name:file.safetensors")


def read_front_matter(readme: Path) -> dict[str, Any]:
    """The YAML front matter of a model card (empty when absent or unreadable)."""
    from huggingface_hub import metadata_load

    try:
        front = metadata_load(readme)
    except Exception:  # noqa: BLE001 - bad YAML, bad encoding: a card we cannot read says nothing
        return {}
    return front if isinstance(front, dict) else {}


def _list_remote(ref: RepoRef, revision: str | None, token: str | None) -> list[str] | None:
    """The repo's file list, or None when offline / the Hub is unreachable (use the cache)."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if constants.is_offline_mode():
        return None
    api = HfApi(token=token, library_name="selfconsist", library_version=__version__)
    try:
        return api.list_repo_files(ref.repo_id, revision=revision)
    except (OfflineModeIsEnabled, _network_error()):
        return None
    except HfHubHTTPError as e:
        if e.response is not None and e.response.status_code >= 500:
            return None  # Hub down: the cache may still have it
        raise _hub_error(f"cannot read {ref.repo_id} from the Hub", e) from None


def resolve(model: str, *, revision: str | None = None, trust_remote_code: bool = False,
            token: str | None = None) -> Resolved:
    """Resolve ``owner/name[:subfolder]`` to local files through huggingface_hub's cache.

    Online: list the repo, download only :func:`select_files` (plus ``README.md``).
    Offline (``HF_HUB_OFFLINE=1``, or the Hub unreachable): use the cached snapshot for
    ``revision``, or fail with one line saying how to get it.
    """
    from huggingface_hub.utils import logging as hf_logging

    # huggingface_hub logs each failed request as a warning; our error is the one line users
    # see. Quiet only for this call: the user's own logging level is restored afterwards.
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return _resolve(model, revision=revision, trust_remote_code=trust_remote_code, token=token)
    finally:
        hf_logging.set_verbosity(level)


def _resolve(model: str, *, revision: str | None, trust_remote_code: bool,
             token: str | None) -> Resolved:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    ref = parse_repo_ref(model)
    files = _list_remote(ref, revision, token)
    if files is not None:
        if not ref.subfolder and (sub := default_subfolder(files)):
            log.warning(f"{ref.repo_id} is a pipeline; using its autoencoder in {sub}/ "
                        f"(name another part as {ref.repo_id}:SUBFOLDER)")
            ref = RepoRef(ref.repo_id, sub)
        wanted = select_files(files, ref.subfolder, trust_remote_code)
        if not wanted:
            extra = "" if trust_remote_code else " (pickled weights need --trust-remote-code)"
            if ref.subfolder in files:
                raise CheckpointError(f"{ref}: selfconsist does not read {ref.subfolder}{extra}")
            where = f"{ref.subfolder}/" if ref.subfolder else "the repo root"
            raise CheckpointError(f"{ref}: no model files in {where}{extra}")
        # Exact names (escaped): the Hub's own patterns let '*' cross folders.
        allow = [glob.escape(f) for f in wanted] + (["README.md"] if "README.md" in files else [])
    else:
        allow = []  # offline: only locate the cached snapshot; _model_path checks what is there
    try:
        # Once we know we are offline, say so: a custom HTTP client may not enforce it.
        folder = Path(snapshot_download(ref.repo_id, revision=revision, allow_patterns=allow,
                                        local_files_only=files is None, token=token,
                                        library_name="selfconsist", library_version=__version__))
    except LocalEntryNotFoundError:
        why = ("HF_HUB_OFFLINE is set" if constants.is_offline_mode()
               else "the Hub cannot be reached")
        rev = f" at revision {revision!r}" if revision else ""
        raise CheckpointError(
            f"{ref.repo_id}{rev} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) "
            f"and {why}; download it once online (unset HF_HUB_OFFLINE) or pass a local path"
        ) from None
    except (HfHubHTTPError, _network_error()) as e:
        raise _hub_error(f"cannot download {ref.repo_id}", e) from None
    if files is None and not ref.subfolder:  # offline: the same pipeline rule, on the cached files
        cached = [p.relative_to(folder).as_posix() for p in folder.glob("*")] + \
                 [p.relative_to(folder).as_posix() for p in folder.glob("*/*")]
        if sub := default_subfolder(cached):
            log.warning(f"{ref.repo_id} is a pipeline; using its autoencoder in {sub}/")
            ref = RepoRef(ref.repo_id, sub)
    path = _model_path(folder, ref, str(ref))
    front = read_front_matter(folder / "README.md") if (folder / "README.md").is_file() else {}
    lic = front.get("license")
    res = Resolved(path=path, repo_id=ref.repo_id, subfolder=ref.subfolder, revision=revision,
                   commit=folder.name if re.fullmatch(r"[0-9a-f]{40}", folder.name) else None,
                   license=str(lic) if lic else None, card=front)
    _RESOLVED[str(path)] = res
    return res


def resolve_model(model: str, *, revision: str | None = None, trust_remote_code: bool = False,
                  token: str | None = None) -> Path:
    """Local path of a Hub model (``owner/name[:subfolder]``), downloading what is missing."""
    return resolve(model, revision=revision, trust_remote_code=trust_remote_code, token=token).path


def source_info(path: str | Path) -> SourceInfo | None:
    """Where a path returned by :func:`resolve_model` came from (None for other paths)."""
    res = _RESOLVED.get(str(path))
    return res.source() if res is not None else None


def attach_source(vae: Any, path: str | Path) -> None:
    """Fill ``vae.source`` with the Hub origin of ``path`` (keeps what the adapter set)."""
    info = source_info(path)
    src = getattr(vae, "source", None)
    if info is None or src is None:
        return
    src.repo_id, src.revision, src.license = info.repo_id, info.revision, info.license
    src.extra = {**info.extra, **(src.extra or {})}
    if src.path is None:
        src.path = info.path
