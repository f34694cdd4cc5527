"""Shared fixtures: tiny built-in models trained in-process on scikit-learn digits."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits_model(tmp_path_factory) -> Path:
    """A 4×200 MLP VAE trained 200 steps on digits (a few seconds)."""
    from selfconsist.train import TrainConfig, train

    path = tmp_path_factory.mktemp("models") / "digits.safetensors"
    train(TrainConfig(data="digits", steps=200, device="cpu", latent_dim=16), path, progress=False)
    return path


def run_cli(*args: str, env: dict | None = None, cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    """Run the real ``selfconsist`` CLI in a subprocess."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "selfconsist", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=600)


@pytest.fixture(autouse=True)
def _restore_selfconsist_logger():
    """In-process CLI runs configure the ``selfconsist`` logger (--quiet sets its level); put it
    back after every test so that no test depends on the order the suite runs in."""
    import logging

    logger = logging.getLogger("selfconsist")
    saved = (logger.level, list(logger.handlers), logger.propagate)
    yield
    logger.setLevel(saved[0])
    logger.handlers[:] = saved[1]
    logger.propagate = saved[2]
