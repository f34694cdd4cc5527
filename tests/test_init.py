"""Built-in initialisation: haiku's truncated normal (default) and torch's (``--init torch``)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from selfconsist.adapters.builtin import new_model
from selfconsist.errors import SelfconsistError
from selfconsist.models import ModelConfig, build, fan_in, init_weights

from .conftest import run_cli

# The std of a standard normal truncated to [−2, 2]: the draw's std is this times σ.
TRUNC_STD = math.sqrt(1 - 4 * math.exp(-2) / math.sqrt(2 * math.pi) / math.erf(2 / math.sqrt(2)))


@pytest.mark.parametrize("layer, n_in", [
    (nn.Linear(400, 300), 400),
    (nn.Conv2d(16, 64, 4, stride=2, padding=1), 16 * 4 * 4),
    (nn.ConvTranspose2d(64, 16, 4, stride=2, padding=1), 64 * 4 * 4),
])
def test_truncated_normal_statistics(layer: nn.Module, n_in: int) -> None:
    torch.manual_seed(0)
    assert fan_in(layer) == n_in
    init_weights(layer)
    w, sigma = layer.weight.detach().flatten(), 1 / math.sqrt(n_in)
    assert w.abs().max() <= 2 * sigma + 1e-7  # truncated at 2σ
    assert w.abs().max() > 1.9 * sigma  # … and not narrower
    assert w.std().item() == pytest.approx(TRUNC_STD * sigma, rel=0.03)
    assert abs(w.mean().item()) < 4 * sigma / math.sqrt(w.numel())
    assert torch.count_nonzero(layer.bias) == 0


def test_haiku_is_the_default_and_torch_restores_the_old_init() -> None:
    cfg = ModelConfig(data_shape=(1, 8, 8), latent_dim=8, hidden=32, depth=2)
    haiku = new_model(cfg, seed=3)
    assert all(torch.count_nonzero(m.bias) == 0 for m in haiku.encoder.modules()
               if isinstance(m, nn.Linear))
    old = new_model(cfg, seed=3, init="torch")
    torch.manual_seed(3)
    enc, dec = build(cfg, init="torch")  # the construction the old new_model ran
    for a, b in zip(old.encoder.parameters(), enc.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(old.decoder.parameters(), dec.parameters(), strict=True):
        assert torch.equal(a, b)
    assert any(torch.count_nonzero(m.bias) > 0 for m in old.encoder.modules()
               if isinstance(m, nn.Linear))
    again = new_model(cfg, seed=3)  # seeded: the same draw
    assert all(torch.equal(a, b) for a, b in zip(haiku.encoder.parameters(),
                                                    again.encoder.parameters(), strict=True))
    with pytest.raises(SelfconsistError, match="--init"):
        build(cfg, init="xavier")


def test_conv_model_layers_are_all_initialised() -> None:
    cfg = ModelConfig(arch="conv", data_shape=(3, 16, 16), latent_dim=8, channels=(8, 16))
    vae = new_model(cfg, seed=0)
    layers = [m for part in (vae.encoder, vae.decoder) for m in part.modules()
              if isinstance(m, nn.Linear | nn.Conv2d | nn.ConvTranspose2d)]
    assert any(isinstance(m, nn.ConvTranspose2d) for m in layers)
    for m in layers:
        assert torch.count_nonzero(m.bias) == 0
        assert m.weight.abs().max() <= 2 / math.sqrt(fan_in(m)) + 1e-7


@pytest.mark.parametrize("init", ["haiku", "torch"])
def test_train_init_option_reaches_the_model(tmp_path, init: str) -> None:
    """``train --init``: after one Adam step (each parameter moves by ≈ lr) the biases still
    tell the inits apart; the choice is recorded in OUT's train config."""
    from selfconsist.io import META_PREFIX, load_safetensors

    out = tmp_path / "m.safetensors"
    r = run_cli("train", "--out", str(out), "--steps", "1", "--lr", "1e-3", "--latent-dim", "4",
                "--hidden", "32", "--depth", "2", "--init", init, "--quiet")
    assert r.returncode == 0, r.stderr
    tensors, meta = load_safetensors(out)
    assert json.loads(meta[META_PREFIX + "train_config"])["init"] == init
    biggest = max(v.abs().max().item() for k, v in tensors.items() if k.endswith(".bias"))
    if init == "haiku":
        assert biggest <= 1.01e-3
    else:
        assert biggest > 1e-2


def test_bad_init_is_one_line() -> None:
    r = run_cli("train", "--out", "never.safetensors", "--init", "xavier")
    assert r.returncode == 2
    assert "--init must be one of" in r.stderr
    assert len([ln for ln in r.stderr.splitlines() if ln.strip()]) == 1


def test_onednn_linear_matches_the_default_gemm_in_value_and_gradient() -> None:
    """Built-in models' fp32 CPU linear layers on oneDNN (forward, ∂x, ∂W, ∂b) agree with
    PyTorch's default gemm to float32 precision; switched off, the default path runs."""
    from selfconsist import models

    torch.manual_seed(0)
    layer = models.Linear(300, 200)
    x = torch.randn(64, 300, requires_grad=True)  # 3.8 M multiply-adds: on oneDNN
    out = {}
    was = models.ONEDNN_LINEAR["on"]
    try:
        for on in (False, True):
            models.use_onednn_linear(on)
            x.grad = layer.weight.grad = layer.bias.grad = None
            y = layer(x)
            (y * torch.linspace(-1, 1, 200)).pow(2).sum().backward()
            out[on] = [t.detach().clone() for t in (y, x.grad, layer.weight.grad, layer.bias.grad)]
    finally:
        models.use_onednn_linear(was)
    for a, b in zip(out[False], out[True], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * float(a.abs().max()))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast keeps nn.Linear's own path
        assert layer(x).dtype == torch.bfloat16
    assert type(layer(x).grad_fn).__name__ == "_OneDNNLinearFnBackward" or not was
    assert type(layer(x[:8]).grad_fn).__name__ == "AddmmBackward0"  # too small for oneDNN


@pytest.mark.parametrize(("vendor", "family", "capability", "onednn"), [
    ("AuthenticAMD", 26, "AVX512", True),    # Zen 5: full-width AVX-512, MKL runs AVX2 on it
    ("AuthenticAMD", 25, "AVX512", False),   # Zen 4: 256-bit units, MKL as fast
    ("AuthenticAMD", 26, "AVX2", False),
    ("GenuineIntel", 6, "AVX512", False),    # MKL's own AVX-512 kernels
    (None, None, "AVX512", False),           # no /proc/cpuinfo
])
def test_onednn_is_chosen_only_on_full_width_avx512_amd_cpus(monkeypatch, vendor, family,
                                                             capability, onednn) -> None:
    from selfconsist import models, runtime

    text = None if vendor is None else f"vendor_id\t: {vendor}\ncpu family\t: {family}\nmodel\t\t: 17\n"
    monkeypatch.setattr(runtime, "_cpuinfo", lambda: text)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert runtime.cpu_vendor() == (vendor or "")
    assert runtime.cpu_family() == family
    assert models._onednn_is_faster() is onednn
