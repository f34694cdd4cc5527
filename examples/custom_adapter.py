"""Wrap your own PyTorch VAE for selfconsist with one small class.

Run it:  python examples/custom_adapter.py [--steps 300] [--workdir DIR]

Any VAE works once it can say: how to encode (a diagonal Gaussian), how to
decode (the mean), which modules are the encoder and the decoder, its shapes,
and how to save itself back. Here the model is a plain ``nn.Module`` stored as
a safetensors state dict; selfconsist never sees anything but the adapter.

From the command line the same class is used with
``selfconsist tune my_vae.safetensors --adapter examples/custom_adapter.py:TinyVAEAdapter``.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

import selfconsist
from selfconsist.adapters import DiagonalGaussian, VAEAdapter
from selfconsist.tune import TuneConfig


class TinyVAE(nn.Module):
    """Someone's own VAE: 8×8 images, 8-d latent, not built by selfconsist."""

    def __init__(self, latent: int = 8) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 2 * latent))
        self.dec = nn.Sequential(nn.Linear(latent, 128), nn.Tanh(), nn.Linear(128, 64), nn.Sigmoid())

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean, logvar = self.enc(x).chunk(2, dim=1)
        return mean, logvar

    def decode(self, z: Tensor) -> Tensor:
        return self.dec(z).view(-1, 1, 8, 8)


class TinyVAEAdapter(VAEAdapter):
    """The whole adapter: shapes, encode, decode, modules, save (and load for the CLI)."""

    name = "tiny-vae"
    likelihood = "gaussian"
    obs_var = 0.05

    def __init__(self, model: TinyVAE) -> None:
        super().__init__()
        self.model = model

    @classmethod
    def load(cls, path: Path, options: object = None) -> TinyVAEAdapter:
        # ``options`` is a selfconsist.adapters.LoadOptions; this adapter reads none of its
        # fields (its ``load_options`` is empty), so the registry refuses any that is set.
        model = TinyVAE()
        model.load_state_dict(load_file(str(path)))  # safetensors: no code runs on load
        vae = cls(model)
        vae.source.path = Path(path)
        return vae

    latent_shape = (8,)
    data_shape = (1, 8, 8)

    def encode(self, x: Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(*self.model.encode(x))

    def decode(self, z: Tensor) -> Tensor:
        return self.model.decode(z)

    def encoder_modules(self) -> list[nn.Module]:
        return [self.model.enc]

    def decoder_modules(self) -> list[nn.Module]:
        return [self.model.dec]

    def save(self, path: str | Path, metadata: Mapping[str, str] | None = None) -> None:
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, str(path), metadata=dict(metadata or {}))


def train_tiny(steps: int = 1500, seed: int = 0) -> TinyVAE:
    """A quick ordinary VAE on scikit-learn's digits, so there is something to tune."""
    from selfconsist.data import load_digits

    torch.manual_seed(seed)
    x = load_digits().x
    model = TinyVAE()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(steps):
        xb = x[torch.randint(len(x), (64,))]
        mean, logvar = model.encode(xb)
        z = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar)
        rec = ((model.decode(z) - xb) ** 2).flatten(1).sum(1) / (2 * 0.05)
        kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(1)
        loss = (rec + kl).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300, help="tuning steps")
    ap.add_argument("--workdir", type=Path, default=None, help="where to write the models")
    args = ap.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp())
    workdir.mkdir(parents=True, exist_ok=True)

    base = workdir / "tiny_vae.safetensors"
    TinyVAEAdapter(train_tiny()).save(base)
    vae = TinyVAEAdapter.load(base)
    result = selfconsist.tune(vae, TuneConfig(steps=args.steps, device="cpu", eval_samples=512),
                              out=workdir / "tiny_vae.tuned.safetensors", overwrite=True, progress=False)
    for key in ("sample_roundtrip_mse", "consistency_kl", "latent_roundtrip_corr"):
        print(f"{key}: {result.before[key]['value']:.5f} -> {result.after[key]['value']:.5f}")
    print(f"wrote {result.out}")


if __name__ == "__main__":
    main()
