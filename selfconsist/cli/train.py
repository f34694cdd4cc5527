"""``selfconsist train``: train a built-in VAE from scratch (VAE or AVAE objective)."""

from __future__ import annotations

from pathlib import Path

import typer

from ._app import app


@app.command()
def train(
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the .safetensors checkpoint."),
    model: str = typer.Option("mlp", "--model", help="Architecture: mlp (the paper's 4×200) or conv."),
    data: str = typer.Option("digits", "--data",
                             help="digits, mnist:PATH, colormnist:PATH, a .npy/.npz file or an image folder."),
    objective: str = typer.Option("vae", "--objective", help="vae (plain ELBO) or avae (ELBO + coupling C(x))."),
    rho: float = typer.Option(0.975, "--rho", help="Coupling strength ρ in (0, 1) for --objective avae."),
    steps: int = typer.Option(3000, "--steps", help="Optimiser steps."),
    batch_size: int = typer.Option(64, "--batch-size", help="Mini-batch size."),
    lr: float = typer.Option(1e-3, "--lr", help="Adam learning rate."),
    seed: int = typer.Option(0, "--seed", help="Seed for initialisation and mini-batches."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda or auto."),
    latent_dim: int = typer.Option(64, "--latent-dim", help="Latent size."),
    hidden: int = typer.Option(200, "--hidden", help="Hidden width."),
    depth: int = typer.Option(4, "--depth", help="Hidden layers per side (mlp)."),
    obs_var: float = typer.Option(0.05, "--obs-var", help="Gaussian observation variance v."),
    likelihood: str = typer.Option("gaussian", "--likelihood", help="gaussian or bernoulli."),
    n_train: int | None = typer.Option(None, "--n-train", help="Use only the first N items (e.g. 8000)."),
    save_every: int = typer.Option(500, "--save-every", help="Save a resumable state every N steps."),
    init: str = typer.Option("haiku", "--init",
                             help="Weight init: haiku (truncated normal, std 1/√fan_in, zero biases; "
                             "trains better) or torch (PyTorch's layer defaults, the old init)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from OUT.state.pt."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUT."),
) -> None:
    """Train a built-in VAE from scratch and write one .safetensors with its config in the header."""
    from ..train import TrainConfig
    from ..train import train as run

    cfg = TrainConfig(model=model, data=data, objective=objective, rho=rho, steps=steps,
                      batch_size=batch_size, lr=lr, seed=seed, device=device, latent_dim=latent_dim,
                      hidden=hidden, depth=depth, obs_var=obs_var, likelihood=likelihood,
                      n_train=n_train, save_every=save_every, init=init)
    run(cfg, out, resume=resume, overwrite=overwrite, progress=True)
    typer.echo(str(out))
