"""``selfconsist push REPO_ID OUTDIR`` (as ``hf upload``): upload a tuned model with its card."""

from __future__ import annotations

from pathlib import Path

import typer

from ._app import app

HELP = """Upload a tuned model, its evaluation and a model card to the Hugging Face Hub.

\b
OUTDIR is one of:
* a tuned .safetensors file;
* a tuned model folder (diffusers or pythae: config.json or
  model_config.json at its top);
* a folder holding exactly one tuned model (a .safetensors file or a
  model folder), optionally an eval folder (eval/, as written by
  `selfconsist eval ... --out OUTDIR/eval`: metrics.json, report.md,
  *.png) and optionally a README.md to update.

\b
The repo receives, in one commit:
* the model: a file under its own name, or a folder's contents at the
  repo root;
* eval/metrics.json, eval/report.md and the figures;
* README.md: YAML front matter (library_name, tags, base_model, license,
  model-index with the eval metrics)
  and a section between <!-- selfconsist:start --> and
  <!-- selfconsist:end --> with the eval table, the figures, the exact
  tune command and how to load the model.

\b
An existing card (OUTDIR/README.md, else the repo's README.md) keeps all
text outside those markers; front-matter keys are merged (the card's own
values win, tags are united). The repo is created if needed (public
unless --private). Authentication: HF_TOKEN or `hf auth login`; the token
is never printed or written anywhere. --dry-run DIR contacts nothing: it
writes the folder that would be uploaded to DIR and prints its path.
"""


def split_targets(args: list[str], repo_id: str | None) -> tuple[Path, str]:
    """(OUTDIR, repo id) from the positional arguments: ``REPO_ID OUTDIR`` as in ``hf upload``,
    or ``OUTDIR`` with ``--repo-id``; ``OUTDIR REPO_ID`` is accepted when OUTDIR exists."""
    from ..errors import SelfconsistError

    if repo_id is not None:
        if len(args) != 1:
            raise SelfconsistError("with --repo-id, give exactly one OUTDIR")
        return Path(args[0]), repo_id
    if len(args) != 2:
        raise SelfconsistError("give REPO_ID and OUTDIR (as `hf upload REPO_ID PATH`), or OUTDIR "
                               "--repo-id REPO_ID")
    first, second = args
    if Path(first).exists() and not Path(second).exists():
        return Path(first), second
    return Path(second), first


@app.command("push", help=HELP)
def push(
    targets: list[str] = typer.Argument(..., metavar="REPO_ID OUTDIR",
                                        help="The target repo (owner/name), unless --repo-id is "
                                        "given, and the tuned model file, model folder or OUTDIR."),
    repo_id: str | None = typer.Option(None, "--repo-id", help="Target model repo, owner/name."),
    private: bool = typer.Option(False, "--private", help="Create the repo as private (if it is new)."),
    revision: str | None = typer.Option(
        None, "--revision", help="Branch to commit to (created if missing); with --create-pr, "
        "the branch the pull request targets."),
    create_pr: bool = typer.Option(False, "--create-pr", help="Open a pull request instead of committing."),
    eval_dir: Path | None = typer.Option(None, "--eval", help="Eval folder to include (default: found in OUTDIR)."),
    base_model: str | None = typer.Option(
        None, "--base-model", help="Base model repo id for the card (default: from the checkpoint's record)."),
    license_: str | None = typer.Option(
        None, "--license", help="License id for the card (default: the base model's, where known)."),
    message: str | None = typer.Option(None, "--commit-message", "--message", "-m",
                                       help="Commit message."),
    description: str | None = typer.Option(None, "--commit-description",
                                           help="Commit (or pull request) description."),
    token: str | None = typer.Option(
        None, "--token", help="Hub token (default: HF_TOKEN or `hf auth login`); never printed."),
    dry_run: Path | None = typer.Option(
        None, "--dry-run", metavar="DIR", help="Upload nothing; write the folder that would be "
        "uploaded to DIR."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --dry-run DIR."),
) -> None:
    from ..adapters.base import SourceInfo
    from ..hub import check_repo_id, parse_repo_ref
    from ..hub import push as run

    option = "--repo-id" if repo_id is not None else "REPO_ID"
    outdir, repo_id = split_targets(targets, repo_id)
    if base_model is not None:
        base_model = parse_repo_ref(base_model).repo_id
    check_repo_id(repo_id, option)
    base = SourceInfo(repo_id=base_model) if base_model else None
    result = run(outdir, repo_id, eval_dir=eval_dir, private=private, revision=revision,
                 create_pr=create_pr, dry_run=dry_run is not None, dry_run_dir=dry_run,
                 overwrite=overwrite, base=base, commit_message=message,
                 commit_description=description, token=token, license=license_)
    if result.folder is not None:
        typer.echo(f"dry run: the {len(result.files)} files that would go to {repo_id}:", err=True)
    else:
        typer.echo(f"pushed {len(result.files)} files to {repo_id}:", err=True)
    for f in result.files:
        typer.echo(f"  {f}", err=True)
    if result.folder is not None:
        typer.echo(str(result.folder))
    else:
        typer.echo(result.pr_url or result.commit_url or f"https://huggingface.co/{repo_id}")
