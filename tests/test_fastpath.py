"""The fast CPU path: bf16 autocast where the CPU has bf16 units."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from selfconsist.runtime import autocast, cpu_bf16_flags, cpu_has_bf16


def test_bf16_flag_detection() -> None:
    assert cpu_bf16_flags("processor : 0\nflags\t\t: fpu avx512f avx512_bf16 sse\n")
    assert cpu_bf16_flags("flags : fpu amx_bf16 amx_tile\n")
    assert not cpu_bf16_flags("flags : fpu avx512f avx2\n")
    assert not cpu_bf16_flags("")


@pytest.mark.parametrize(("vendor", "flags", "faster"), [
    ("AuthenticAMD", "avx512f avx512_bf16", True),     # Zen 4/5: bf16 gemm 2-2.8x fp32
    ("GenuineIntel", "avx512f avx512_bf16", False),    # no AMX: bf16 gemm at half fp32's rate
    ("GenuineIntel", "avx512_bf16 amx_bf16 amx_tile", True),
    ("AuthenticAMD", "avx512f avx2", False),
])
def test_auto_takes_bf16_only_where_its_gemm_is_faster(vendor, flags, faster) -> None:
    from selfconsist.runtime import cpu_bf16_faster_flags

    assert cpu_bf16_faster_flags(f"vendor_id\t: {vendor}\nflags\t\t: fpu {flags}\n") is faster


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no bf16 units")
def test_cpu_bf16_autocast_runs_matmuls_in_bf16(digits_model) -> None:
    import selfconsist
    from selfconsist.tune import TuneConfig

    a = torch.randn(8, 8)
    with autocast(torch.device("cpu"), "bf16"):
        assert (a @ a).dtype == torch.bfloat16
    # bf16 tunes to where fp32 tunes. (Five steps at the built-in family's lr 1e-3 move the
    # round trip of this briefly trained model up by ~2× in both precisions, so "unchanged" is
    # no test.)
    after = {}
    for precision in ("fp32", "bf16"):
        res = selfconsist.tune(selfconsist.load(digits_model),
                               TuneConfig(steps=5, batch_size=16, device="cpu", precision=precision,
                                          eval_samples=64), progress=False)
        after[precision] = res.after["sample_roundtrip_mse"]["value"]
        assert res.after["sample_roundtrip_mse"]["value"] != res.before["sample_roundtrip_mse"]["value"]
    assert after["bf16"] == pytest.approx(after["fp32"], rel=0.05)


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no bf16 units")
def test_conv_fast_path_tunes_and_saves(tmp_path) -> None:
    """bf16 + channels_last + fused Adam on a conv VAE: OUT loads, decoder byte-identical."""
    import selfconsist
    from selfconsist.adapters.builtin import BuiltinVAE
    from selfconsist.models import ModelConfig
    from selfconsist.tune import TuneConfig

    vae = BuiltinVAE(ModelConfig(arch="conv", data_shape=(3, 16, 16), latent_dim=8, channels=(8, 16)))
    dec0 = [p.detach().clone() for p in vae.decoder_parameters()]
    enc0 = [p.detach().clone() for p in vae.encoder_parameters()]
    selfconsist.tune(vae, TuneConfig(steps=3, batch_size=4, device="cpu", precision="bf16",
                                     eval_samples=8), out=tmp_path / "t.safetensors", progress=False)
    back = selfconsist.load(tmp_path / "t.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(dec0, back.decoder_parameters(), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(enc0, back.encoder_parameters(), strict=True))


def test_auto_precision_follows_the_hardware(monkeypatch) -> None:
    from selfconsist import runtime
    from selfconsist.runtime import resolve_precision

    cpu = torch.device("cpu")
    assert resolve_precision(cpu, "fp32") == "fp32" and resolve_precision(cpu, "bf16") == "bf16"
    monkeypatch.setattr(runtime, "cpu_bf16_is_faster", lambda: True)
    assert resolve_precision(cpu, "auto") == "bf16"
    monkeypatch.setattr(runtime, "cpu_bf16_is_faster", lambda: False)
    assert resolve_precision(cpu, "auto") == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision(torch.device("cuda"), "auto") == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision(torch.device("cuda"), "auto") == "bf16"
    assert resolve_precision(torch.device("mps"), "auto") == "fp32"


def test_auto_precision_keeps_fp32_for_a_small_model_on_cpu(monkeypatch, tmp_path) -> None:
    """bf16 costs more than it saves on a CPU for a built-in MLP under the size limit (the
    bundled digits MLP), so ``auto`` keeps fp32 there; a bigger one gets bf16; GPUs and other
    models do not look."""
    from selfconsist import runtime
    from selfconsist.io import META_PREFIX, load_safetensors
    from selfconsist.runtime import CPU_BF16_MIN_ENCODER_PARAMS, resolve_precision

    cpu = torch.device("cpu")
    monkeypatch.setattr(runtime, "cpu_bf16_is_faster", lambda: True)
    assert resolve_precision(cpu, "auto", CPU_BF16_MIN_ENCODER_PARAMS - 1) == "fp32"
    assert resolve_precision(cpu, "auto", CPU_BF16_MIN_ENCODER_PARAMS) == "bf16"
    assert resolve_precision(cpu, "bf16", 10) == "bf16"  # asked for: runs as asked
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision(torch.device("cuda"), "auto", 10) == "bf16"

    # tune on the bundled example, whose encoder is under the limit: fp32 runs and is recorded
    # (without the rule it would resolve to bf16 here: cpu_bf16_is_faster is patched to True)
    import selfconsist
    from selfconsist.tune import TuneConfig

    vae = selfconsist.load(Path(__file__).resolve().parents[1] / "examples" / "digits_mlp_vae.safetensors")
    assert vae.num_parameters()[0] < CPU_BF16_MIN_ENCODER_PARAMS
    out = tmp_path / "t.safetensors"
    selfconsist.tune(vae, TuneConfig(steps=2, batch_size=4, device="cpu", precision="auto",
                                     eval_samples=8), out=out, progress=False)
    assert load_safetensors(out)[1][META_PREFIX + "precision"] == "fp32"

    # the limit was measured on MLPs: a small conv encoder is not held to it
    if cpu_has_bf16():
        from selfconsist.adapters.builtin import BuiltinVAE
        from selfconsist.models import ModelConfig

        conv = BuiltinVAE(ModelConfig(arch="conv", data_shape=(3, 16, 16), latent_dim=4, channels=(8, 16)))
        assert conv.num_parameters()[0] < CPU_BF16_MIN_ENCODER_PARAMS
        selfconsist.tune(conv, TuneConfig(steps=2, batch_size=4, device="cpu", precision="auto",
                                          eval_samples=8), out=tmp_path / "c.safetensors", progress=False)
        assert load_safetensors(tmp_path / "c.safetensors")[1][META_PREFIX + "precision"] == "bf16"


def test_adam_is_fused_on_cpu_in_every_precision() -> None:
    from selfconsist.runtime import adam

    p = torch.nn.Parameter(torch.ones(3))
    assert adam([p], 1e-3, torch.device("cpu")).defaults["fused"] is True
    assert adam([p], 1e-3, torch.device("mps")).defaults["fused"] is None


@pytest.mark.parametrize("has_bf16", [False, True])
def test_auto_precision_is_recorded_as_what_ran(tmp_path, monkeypatch, has_bf16) -> None:
    """``--precision auto``: OUT's metadata says which precision actually ran."""
    import selfconsist
    from selfconsist import runtime
    from selfconsist.adapters.builtin import BuiltinVAE
    from selfconsist.io import META_PREFIX, load_safetensors
    from selfconsist.models import ModelConfig
    from selfconsist.tune import TuneConfig

    if has_bf16 and not cpu_has_bf16():
        pytest.skip("this CPU has no bf16 units")
    monkeypatch.setattr(runtime, "cpu_bf16_is_faster", lambda: has_bf16)
    out = tmp_path / "t.safetensors"
    # big enough for auto to take bf16 on CPU (runtime.CPU_BF16_MIN_ENCODER_PARAMS)
    selfconsist.tune(BuiltinVAE(ModelConfig(data_shape=(1, 28, 28), latent_dim=4, hidden=160, depth=2)),
                     TuneConfig(steps=2, batch_size=8, device="cpu", precision="auto",
                                eval_samples=16), out=out, progress=False)
    _, meta = load_safetensors(out)
    assert meta[META_PREFIX + "precision"] == ("bf16" if has_bf16 else "fp32")
    assert '"precision": "auto"' in meta[META_PREFIX + "tune_config"]
