"""Publishing a tuned model: the bundle (model, eval run, card) and its upload.

See :func:`push` for what OUTDIR holds and what lands in the repo.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._version import __version__
from ..adapters.base import SourceInfo
from ..errors import CheckpointError, SelfconsistError
from ..runtime import log
from .common import _hub_error, _network_error, scrub
from .pull import FOLDER_MARKERS, check_repo_id, is_repo_ref, parse_repo_ref, read_front_matter, resolve

EVAL_FILES = ("*.json", "*.md", "*.png", "*.svg", "*.csv")
_SKIP = ("*.state.pt", ".*")  # resumable states and hidden files never leave the machine


@dataclass
class Bundle:
    """What one push uploads: the tuned model, its eval run, an existing card."""

    model: Path  # a .safetensors file or a model folder
    eval_dir: Path | None = None  # metrics.json, report.md, figures
    card: Path | None = None  # an existing README.md to update rather than replace
    eval_files: list[Path] | None = None  # explicit eval files (loose in OUTDIR)

    @property
    def is_folder(self) -> bool:
        return self.model.is_dir()


def _skipped(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in _SKIP)


def _is_model_folder(path: Path) -> bool:
    return path.is_dir() and (any((path / m).is_file() for m in FOLDER_MARKERS)
                              or any(path.glob("*.safetensors")))


def find_bundle(outdir: str | Path, eval_dir: str | Path | None = None) -> Bundle:
    """Read OUTDIR (see ``selfconsist push --help``) into a :class:`Bundle`.

    OUTDIR is one of:

    * a ``.safetensors`` file (the tuned model alone);
    * a model folder itself (``config.json``/``model_config.json`` at its top);
    * a folder holding exactly one tuned model (a ``.safetensors`` file or a model folder),
      optionally an eval folder (``eval/``, or any one subfolder with a ``metrics.json``;
      loose ``metrics.json``/``report.md``/``*.png`` at the top also count) and optionally
      a ``README.md`` to update.
    """
    outdir = Path(outdir)
    if not outdir.exists():
        raise SelfconsistError(f"{outdir}: no such file or folder")
    ev = Path(eval_dir) if eval_dir is not None else None
    if ev is not None and not (ev / "metrics.json").is_file():
        raise SelfconsistError(f"--eval {ev}: no metrics.json there (run selfconsist eval --out {ev})")
    if outdir.is_file():
        if outdir.suffix != ".safetensors":
            raise SelfconsistError(f"{outdir}: push a .safetensors file, a model folder or an OUTDIR")
        return Bundle(model=outdir, eval_dir=ev)
    card = outdir / "README.md" if (outdir / "README.md").is_file() else None
    children = [p for p in sorted(outdir.iterdir()) if not _skipped(p.name)]
    eval_dirs = [p for p in children if p.is_dir() and (p / "metrics.json").is_file()]
    if ev is None and eval_dirs:
        named = [p for p in eval_dirs if p.name == "eval"]
        if len(named) == 1 or len(eval_dirs) == 1:
            ev = (named or eval_dirs)[0]
        else:
            raise SelfconsistError(f"{outdir}: several eval folders {[p.name for p in eval_dirs]}; "
                                   "keep one or pass --eval DIR")
    if any((outdir / m).is_file() for m in FOLDER_MARKERS):  # OUTDIR is the model folder
        return Bundle(model=outdir, eval_dir=ev, card=card)
    models = [p for p in children if p != ev and p not in eval_dirs
              and ((p.is_file() and p.suffix == ".safetensors") or _is_model_folder(p))]
    if not models:
        raise SelfconsistError(f"{outdir}: no tuned model in it; expected one .safetensors file or "
                               "one model folder (see selfconsist push --help)")
    if len(models) > 1:
        raise SelfconsistError(f"{outdir}: several models {[p.name for p in models]}; keep one per OUTDIR")
    loose = None
    if ev is None and (outdir / "metrics.json").is_file():
        loose = [p for p in children if p.is_file() and p.name != "README.md"
                 and any(fnmatch.fnmatchcase(p.name, pat) for pat in EVAL_FILES)]
    if card is None and models[0].is_dir() and (models[0] / "README.md").is_file():
        card = models[0] / "README.md"
    return Bundle(model=models[0], eval_dir=ev, card=card, eval_files=loose)


def model_files(bundle: Bundle) -> dict[str, Path]:
    """Repo path → local file for the model: a file goes to the root under its own name, a
    folder's contents go to the root (so ``from_pretrained("owner/name")`` works)."""
    if not bundle.is_folder:
        return {bundle.model.name: bundle.model}
    out: dict[str, Path] = {}
    for p in sorted(bundle.model.rglob("*")):
        rel = p.relative_to(bundle.model)
        if not p.is_file() or any(_skipped(part) for part in rel.parts):
            continue
        if bundle.eval_dir is not None and bundle.eval_dir.resolve() in p.resolve().parents:
            continue
        if rel.as_posix() == "README.md":
            continue  # the card is rebuilt from it, never uploaded twice
        out[rel.as_posix()] = p
    return out


def eval_files(bundle: Bundle) -> dict[str, Path]:
    """Repo path (under ``eval/``) → local file for the eval run."""
    files = bundle.eval_files or []
    if bundle.eval_dir is not None:
        files = [p for p in sorted(bundle.eval_dir.iterdir()) if p.is_file() and not _skipped(p.name)
                 and any(fnmatch.fnmatchcase(p.name, pat) for pat in EVAL_FILES)]
    return {f"eval/{p.name}": p for p in files}


def read_model_metadata(model: Path) -> dict[str, str]:
    """``selfconsist.*`` metadata of a tuned model: the safetensors header of a file, or of
    the weight files in a folder (merged), plus a ``selfconsist.json`` there if any."""
    from ..io import META_PREFIX, read_safetensors_header

    files = [model] if model.is_file() else sorted(model.glob("*.safetensors"))
    meta: dict[str, str] = {}
    for f in files:
        try:
            header = read_safetensors_header(f)
        except CheckpointError:
            continue
        meta.update({k: v for k, v in (header.get("__metadata__") or {}).items()
                     if k.startswith(META_PREFIX)})
    side = model / "selfconsist.json" if model.is_dir() else None
    if side is not None and side.is_file():
        try:
            extra = json.loads(side.read_text())
            meta.update({k if k.startswith(META_PREFIX) else META_PREFIX + k:
                         v if isinstance(v, str) else json.dumps(v) for k, v in extra.items()})
        except (OSError, json.JSONDecodeError):
            pass
    return meta


def _json_field(meta: Mapping[str, str], key: str) -> Any:
    raw = meta.get("selfconsist." + key)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _base_from_meta(meta: Mapping[str, str]) -> SourceInfo:
    """The base model's origin, from ``selfconsist.source`` or the tune command's MODEL."""
    src = _json_field(meta, "source")
    if isinstance(src, dict):
        return SourceInfo(repo_id=src.get("repo_id"), revision=src.get("revision"),
                          license=src.get("license"))
    cmd = meta.get("selfconsist.command") or ""
    import shlex

    try:
        words = shlex.split(cmd)
    except ValueError:
        words = []
    if words[:2] == ["selfconsist", "tune"]:
        # The first positional argument; options taking a value are skipped with their value.
        i = 2
        while i < len(words):
            w = words[i]
            if w.startswith("-"):
                i += 1 if ("=" in w or w in TUNE_FLAGS) else 2
                continue
            if is_repo_ref(w):
                rev = None
                if "--revision" in words[:-1]:
                    rev = words[words.index("--revision") + 1]
                return SourceInfo(repo_id=parse_repo_ref(w).repo_id, revision=rev)
            break
    return SourceInfo()


#: The options of ``selfconsist tune`` that take no value, and the global flags. The hub sits
#: below the CLI and cannot import it; ``tests/test_hub.py`` holds this set equal to what the
#: tune command itself declares, so the two cannot drift apart.
TUNE_FLAGS = frozenset({
    "--trust-remote-code", "--sample-noise", "--no-sample-noise", "--resume", "--overwrite",
    "--print-config", "--private", "--enable-tiling",
    "--debug", "--quiet", "-q", "--verbose", "-v", "--help", "-h"})


def _cached_license(repo_id: str, revision: str | None) -> str | None:
    """The license in a repo's README front matter, if the card is in the local cache
    (no network: the base model was usually just downloaded by ``tune``)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        path = try_to_load_from_cache(repo_id, "README.md", revision=revision)
    except Exception:  # noqa: BLE001 - a cache we cannot read just means "unknown"
        return None
    if not isinstance(path, str):
        return None
    lic = read_front_matter(Path(path)).get("license")
    return str(lic) if lic else None


@dataclass
class PushResult:
    repo_id: str
    files: list[str]  # repo paths
    folder: Path | None = None  # the dry-run folder
    commit_url: str | None = None
    pr_url: str | None = None


def plan_upload(bundle: Bundle, repo_id: str, *, existing_card: str | None = None,
                base: SourceInfo | None = None, command: str | None = None,
                license: str | None = None) -> dict[str, Path | bytes]:
    """Repo path → content (a local file or bytes) for everything a push sends.

    ``base`` overrides the base model's origin read from the checkpoint's metadata;
    ``command`` overrides the recorded ``selfconsist tune`` command line; ``license`` is the
    uploader's choice (the card then does not call it the base model's).
    """
    from .. import modelcard

    check_repo_id(repo_id)
    meta = read_model_metadata(bundle.model)
    recorded = _base_from_meta(meta)
    base = base or SourceInfo()
    base = SourceInfo(repo_id=base.repo_id or recorded.repo_id,
                      revision=base.revision or recorded.revision,
                      license=base.license or recorded.license, extra=dict(base.extra))
    if base.repo_id and not base.license:
        base.license = _cached_license(base.repo_id, base.revision)
    files: dict[str, Path | bytes] = dict(model_files(bundle))
    evals = eval_files(bundle)
    files.update(evals)
    metrics = None
    if "eval/metrics.json" in evals:
        try:
            metrics = json.loads(evals["eval/metrics.json"].read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SelfconsistError(f"{evals['eval/metrics.json']}: unreadable metrics.json ({e})") from None
    info = modelcard.CardInfo(
        repo_id=repo_id,
        model_files=sorted(k for k in files if not k.startswith("eval/")),
        model_kind=modelcard.model_kind(bundle.model, meta),
        base_model=base.repo_id,
        base_revision=base.revision,
        license=license or base.license,
        license_given=license is not None,
        license_extra={} if license else {k: v for k, v in base.extra.items()
                                          if k in ("license_name", "license_link")},
        eval_metrics=metrics,
        figures=sorted(k for k in evals if k.endswith((".png", ".svg"))),
        checkpoint_metrics=_json_field(meta, "metrics"),
        tune_config=_json_field(meta, "tune_config"),
        command=scrub(command or meta.get("selfconsist.command") or "") or None,
        version=meta.get("selfconsist.version"),
        input_sha256=meta.get("selfconsist.input_sha256") or None,
        diffusers_class=modelcard.diffusers_class(bundle.model),
    )
    card = modelcard.update_card(existing_card, modelcard.render_section(info),
                                 modelcard.front_matter(info))
    files["README.md"] = scrub(card).encode("utf-8")
    return files


def write_plan(files: Mapping[str, Path | bytes], folder: Path) -> None:
    """Materialise an upload plan as a folder of copies.

    Copies, not hard links: a link shares the file's mode and bytes, so the permission fix-up
    of :func:`~selfconsist.io.atomic_output`, or an edit in the preview, would change the
    user's tuned model.
    """
    for rel, src in files.items():
        dest = folder / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(src, bytes):
            dest.write_bytes(src)
        else:
            shutil.copyfile(src, dest)


def _existing_remote_card(api: Any, repo_id: str, revision: str | None, token: str | None) -> str | None:
    """The repo's current README.md (None when it has none yet)."""
    from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError

    try:
        path = api.hf_hub_download(repo_id, "README.md", revision=revision, token=token)
    except (EntryNotFoundError, RevisionNotFoundError):
        return None
    return Path(path).read_text(encoding="utf-8")


def push_bundle(bundle: Bundle, repo_id: str, *, private: bool = False, revision: str | None = None,
                create_pr: bool = False, dry_run: bool = False, dry_run_dir: str | Path | None = None,
                overwrite: bool = False, base: SourceInfo | None = None, command: str | None = None,
                commit_message: str | None = None, commit_description: str | None = None,
                token: str | None = None, license: str | None = None) -> PushResult:
    """Upload a :class:`Bundle` to ``repo_id`` (creating the repo, and the branch for
    ``revision``, if needed) in one commit; or, with ``dry_run``, only write the folder
    that would be uploaded and contact nothing."""
    from huggingface_hub.errors import HfHubHTTPError

    existing = bundle.card.read_text(encoding="utf-8") if bundle.card is not None else None
    if dry_run:
        files = plan_upload(bundle, repo_id, existing_card=existing, base=base, command=command,
                            license=license)
        if dry_run_dir is None:
            folder = Path(tempfile.mkdtemp(prefix="selfconsist-push-"))
            write_plan(files, folder)
        else:
            from ..io import atomic_output

            folder = Path(dry_run_dir)
            with atomic_output(folder, overwrite=overwrite) as tmp:
                write_plan(files, tmp)
        return PushResult(repo_id=repo_id, files=sorted(files), folder=folder)

    from huggingface_hub import CommitOperationAdd, HfApi

    plan_upload(bundle, repo_id, existing_card=existing, base=base, command=command,
                license=license)  # fail early
    api = HfApi(token=token, library_name="selfconsist", library_version=__version__)
    try:
        api.create_repo(repo_id, private=True if private else None, exist_ok=True, repo_type="model")
        if revision and not create_pr and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        if existing is None:
            existing = _existing_remote_card(api, repo_id, revision, token)
        files = plan_upload(bundle, repo_id, existing_card=existing, base=base, command=command,
                            license=license)
        ops = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=src if isinstance(src, bytes)
                                  else str(src)) for rel, src in files.items()]
        info = api.create_commit(
            repo_id, ops, revision=revision, create_pr=create_pr,
            commit_message=commit_message or "selfconsist: upload self-consistent tuned model",
            commit_description=commit_description or f"Uploaded with selfconsist {__version__}.")
    except (HfHubHTTPError, _network_error()) as e:
        raise _hub_error(f"cannot push to {repo_id}", e) from None
    return PushResult(repo_id=repo_id, files=sorted(files), commit_url=str(info.commit_url),
                      pr_url=str(info.pr_url) if info.pr_url else None)


def push(outdir: str | Path, repo_id: str, *, eval_dir: str | Path | None = None,
         **kwargs: Any) -> PushResult:
    """Push OUTDIR (see :func:`find_bundle`) to ``repo_id``; keyword arguments as
    :func:`push_bundle`. The repo gets the model (a file at the root, or a folder's
    contents at the root), ``eval/`` (metrics.json, report.md, figures) and README.md."""
    return push_bundle(find_bundle(outdir, eval_dir), repo_id, **kwargs)


def push_after_tune(tuned_path: str | Path, base_model_arg: str, repo_id: str, *,
                    private: bool = False, revision: str | None = None, create_pr: bool = False,
                    command: str, base_revision: str | None = None, evaluate: bool = True,
                    eval_data: str | None = None, eval_options: Mapping[str, Any] | None = None,
                    adapter: str | None = None, trust_remote_code: bool = False,
                    load_options: Mapping[str, Any] | None = None, dry_run: bool = False,
                    dry_run_dir: str | Path | None = None, overwrite: bool = False,
                    token: str | None = None) -> PushResult:
    """``tune … --push-to-hub``: evaluate base vs tuned, then push the tuned model, the eval
    run and the card in one commit.

    ``command`` is the exact ``selfconsist tune`` command line for the card;
    ``base_model_arg`` is the MODEL the tune started from (a path or a repo id), loaded with
    ``load_options`` (e.g. ``image_size``; a ``revision`` there counts as ``base_revision``).
    """
    tuned_path = Path(tuned_path)
    load_options = dict(load_options or {})
    base_revision = load_options.pop("revision", None) or base_revision
    if not tuned_path.exists():
        raise SelfconsistError(f"{tuned_path}: no tuned model to push")
    base = SourceInfo()
    if is_repo_ref(base_model_arg):
        ref = parse_repo_ref(base_model_arg)
        base.repo_id = ref.repo_id
        try:  # the base is in the cache already (tune just loaded it): no download here
            res = resolve(base_model_arg, revision=base_revision, trust_remote_code=trust_remote_code,
                          token=token)
            base = res.source()
        except SelfconsistError:
            base.revision = base_revision
    with tempfile.TemporaryDirectory(prefix="selfconsist-eval-") as tmp:
        eval_dir = _run_eval(base_model_arg, tuned_path, Path(tmp) / "eval", data=eval_data,
                             options=eval_options, adapter=adapter,
                             trust_remote_code=trust_remote_code, revision=base_revision,
                             load_options=load_options) \
            if evaluate else None
        bundle = Bundle(model=tuned_path, eval_dir=eval_dir)
        return push_bundle(bundle, repo_id, private=private, revision=revision, create_pr=create_pr,
                           dry_run=dry_run, dry_run_dir=dry_run_dir, overwrite=overwrite, base=base,
                           command=command, token=token)


def _run_eval(base_model_arg: str, tuned_path: Path, out: Path, *, data: str | None,
              options: Mapping[str, Any] | None, adapter: str | None, trust_remote_code: bool,
              revision: str | None, load_options: Mapping[str, Any] | None = None) -> Path | None:
    """Evaluate base vs tuned into ``out`` with :func:`selfconsist.evaluate.evaluate`
    (``options`` are :class:`~selfconsist.evaluate.EvalConfig` fields, a None one meaning
    "not given", as for the eval CLI); None when it wrote
    no metrics.json (the card then shows the checkpoint's before/after numbers)."""
    from ..evaluate import EvalConfig, evaluate
    from ..loading import load_model

    # Load the base ourselves so --revision applies (it is in the cache: tune just read it).
    opts = dict(load_options or {})
    base = load_model(base_model_arg, adapter, trust_remote_code, revision=revision, **opts)
    tuned = load_model(str(tuned_path), adapter, trust_remote_code, **opts)
    log.info("evaluating base vs tuned for the model card …")
    evaluate(base, tuned, data=data, out=out, config=EvalConfig.resolve(**dict(options or {})),
             name="base", compare_name="tuned", progress=False)
    return out if (out / "metrics.json").is_file() else None
