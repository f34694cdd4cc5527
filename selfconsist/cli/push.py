"""``selfconsist push OUTDIR --repo-id owner/name``: upload a tuned model with its card."""

from __future__ import annotations

from pathlib import Path

import typer

from . import app

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
* README.md: YAML front matter (library_name, tags, base_model, license)
  and a section between <!-- selfconsist:start --> and
  <!-- selfconsist:end --> with the eval table, the figures, the exact
  tune command and how to load the model.

\b
An existing card (OUTDIR/README.md, else the repo's README.md) keeps all
text outside those markers; front-matter keys are merged (the card's own
values win, tags are united). The repo is created if needed (public
unless --private). Authentication: HF_TOKEN or `hf auth login`; the token
is never printed or written anywhere. --dry-run contacts nothing: it
writes the folder that would be uploaded and prints its path.
"""


@app.command("push", help=HELP)
def push(
    outdir: Path = typer.Argument(..., help="Tuned model file, model folder, or OUTDIR (see above)."),
    repo_id: str = typer.Option(..., "--repo-id", help="Target model repo, owner/name."),
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
    message: str | None = typer.Option(None, "--message", "-m", help="Commit message."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Upload nothing; write the folder that would be uploaded."),
    dry_run_dir: Path | None = typer.Option(
        None, "--dry-run-dir", help="Where --dry-run writes that folder (default: a new temporary folder)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --dry-run-dir."),
) -> None:
    from ..adapters.base import SourceInfo
    from ..hub import check_repo_id
    from ..hub import push as run

    if dry_run_dir is not None:
        dry_run = True
    if base_model is not None:
        from ..hub import parse_repo_ref

        base_model = parse_repo_ref(base_model).repo_id
    check_repo_id(repo_id)
    base = SourceInfo(repo_id=base_model, license=license_) if (base_model or license_) else None
    result = run(outdir, repo_id, eval_dir=eval_dir, private=private, revision=revision,
                 create_pr=create_pr, dry_run=dry_run, dry_run_dir=dry_run_dir, overwrite=overwrite,
                 base=base, commit_message=message)
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
