"""A battery of malformed inputs and faults, run against the CLI the way a user would.

Every case asserts: the exit code, exactly one stderr line, no traceback, the input's bytes
unchanged, no OUT or temporary file left behind, and that no pickled code ran (a marker file
that unpickling would create). The CLI runs in-process for speed (``main`` as ``python -m
selfconsist`` calls it); a few cases also go through a real subprocess.

Then seeded fuzzing of a safetensors file: single-byte flips and truncations, each of which
must end in a clean :class:`SelfconsistError` or a correct load.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import random
import re
import socket
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import selfconsist
from selfconsist.errors import SelfconsistError

from .conftest import run_cli

QUICK_TUNE = ["--steps", "2", "--batch-size", "4", "--eval-samples", "8", "--device", "cpu", "-q"]
QUICK_TRAIN = ["--steps", "2", "--batch-size", "4", "--device", "cpu", "-q", "--latent-dim", "4",
               "--hidden", "8", "--depth", "1"]


class _WritesMarker:
    """Unpickling this creates the marker file: it stands for any code a pickle can run."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _evil_pickle(marker: Path) -> bytes:
    return pickle.dumps({"model_state_dict": _WritesMarker(marker)}, protocol=2)


def _header(n: int, header: bytes) -> bytes:
    return struct.pack("<Q", n) + header


# --- inputs, built once per module ------------------------------------------------------------
@pytest.fixture(scope="module")
def inputs(tmp_path_factory, digits_model) -> dict[str, Path]:
    """Every malformed input, in one folder whose bytes must never change."""
    d = tmp_path_factory.mktemp("bad_inputs")
    marker = d.parent / f"{d.name}-PWNED"  # outside d, so creating it would not alter the inputs
    good = digits_model.read_bytes()
    p: dict[str, Path] = {"good": d / "good.safetensors", "marker": marker}
    p["good"].write_bytes(good)

    def put(name: str, data: bytes) -> Path:
        p[name] = d / name
        p[name].parent.mkdir(parents=True, exist_ok=True)
        p[name].write_bytes(data)
        return p[name]

    (n,) = struct.unpack("<Q", good[:8])
    header = json.loads(good[8:8 + n])
    put("empty.safetensors", b"")
    put("short.safetensors", good[:5])
    put("trunc.safetensors", good[: len(good) - 100])
    put("huge_n.safetensors", struct.pack("<Q", 2**63) + good[8:])
    put("not_json.safetensors", _header(12, b"{not json!!}") + b"\0" * 16)
    put("list_header.safetensors", _header(2, b"[]"))
    put("text.safetensors", b"hello, I am not a model\n")
    bad_cfg = dict(header)
    bad_cfg["__metadata__"] = {**header["__metadata__"], "selfconsist.config": "{broken"}
    raw = json.dumps(bad_cfg).encode()
    put("bad_config.safetensors", _header(len(raw), raw) + good[8 + n:])
    wrong = dict(header)
    wrong["__metadata__"] = {**header["__metadata__"], "selfconsist.config": json.dumps(
        {**json.loads(header["__metadata__"]["selfconsist.config"]), "latent_dim": 7})}
    raw = json.dumps(wrong).encode()
    put("wrong_shapes.safetensors", _header(len(raw), raw) + good[8 + n:])
    nan_var = dict(header)
    nan_var["__metadata__"] = {**header["__metadata__"], "selfconsist.config": json.dumps(
        {**json.loads(header["__metadata__"]["selfconsist.config"]), "obs_var": float("nan")})}
    raw = json.dumps(nan_var).encode()
    put("nan_obs_var.safetensors", _header(len(raw), raw) + good[8 + n:])
    lying = dict(header)
    key = next(k for k in header if k != "__metadata__")
    lying[key] = {**header[key], "data_offsets": [0, 10**9]}
    raw = json.dumps(lying).encode()
    put("lying_offsets.safetensors", _header(len(raw), raw) + good[8 + n:])
    plain = d / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    p["plain.safetensors"] = plain
    p["folder_empty"] = d / "folder_empty"
    p["folder_empty"].mkdir()

    # pickles that would create the marker if anything unpickled them without weights_only
    put("evil.pt", _evil_pickle(marker))
    put("evil_latents.pt", _evil_pickle(marker))
    # diffusers: folder and single file
    from diffusers import AutoencoderKL

    from selfconsist.adapters import ldm_keys

    torch.manual_seed(0)
    kl = AutoencoderKL(block_out_channels=(32,), down_block_types=("DownEncoderBlock2D",),
                       up_block_types=("UpDecoderBlock2D",), layers_per_block=1,
                       norm_num_groups=32, sample_size=16, latent_channels=4).eval()
    kl.save_pretrained(d / "dif_ok")
    cfg_text = (d / "dif_ok" / "config.json").read_text()
    weights = (d / "dif_ok" / "diffusion_pytorch_model.safetensors").read_bytes()
    put("dif_garbage_cfg/config.json", b"{this is not json")
    put("dif_garbage_cfg/diffusion_pytorch_model.safetensors", weights)
    put("dif_no_weights/config.json", cfg_text.encode())
    put("dif_trunc/config.json", cfg_text.encode())
    put("dif_trunc/diffusion_pytorch_model.safetensors", weights[: len(weights) // 2])
    cfg = json.loads(cfg_text)
    put("dif_shape/config.json", json.dumps({**cfg, "latent_channels": 8}).encode())
    put("dif_shape/diffusion_pytorch_model.safetensors", weights)
    put("dif_pickle/config.json", cfg_text.encode())
    put("dif_pickle/diffusion_pytorch_model.bin", _evil_pickle(marker))
    put("dif_unet/config.json", json.dumps({"_class_name": "UNet2DConditionModel"}).encode())
    put("dif_pipe/model_index.json", json.dumps({"_class_name": "StableDiffusionPipeline",
                                                  "vae": ["diffusers", "AutoencoderKL"]}).encode())
    sd = {k: v.contiguous() for k, v in ldm_keys.ldm_state_dict(kl.state_dict()).items()}
    save_file(sd, str(d / "ldm.safetensors"))
    ldm = (d / "ldm.safetensors").read_bytes()
    (d / "ldm.safetensors").unlink()
    put("ldm_trunc.safetensors", ldm[: len(ldm) - 1000])
    half = dict(sd)
    half.pop(next(k for k in sd if "encoder" in k and k.endswith("weight")))
    save_file(half, str(d / "ldm_missing.safetensors"))
    p["ldm_missing.safetensors"] = d / "ldm_missing.safetensors"
    # pythae
    from pythae.models import VAE, VAEConfig

    torch.manual_seed(0)
    VAE(VAEConfig(input_dim=(1, 8, 8), latent_dim=4, reconstruction_loss="mse")).save(
        str(d / "pyt_ok"))
    files = {f.name: f.read_bytes() for f in (d / "pyt_ok").iterdir()}
    for name in ("pyt_no_model", "pyt_bad_cfg", "pyt_evil_pt", "pyt_evil_enc", "pyt_ae"):
        for f, data in files.items():
            put(f"{name}/{f}", data)
    (d / "pyt_no_model" / "model.pt").unlink()
    put("pyt_bad_cfg/model_config.json", b'{"name": "VAE", "latent_dim": ')
    put("pyt_evil_pt/model.pt", _evil_pickle(marker))
    enc_cfg = json.loads(files["model_config.json"])
    put("pyt_evil_enc/model_config.json", json.dumps({**enc_cfg, "uses_default_encoder": False}).encode())
    put("pyt_evil_enc/encoder.pkl", pickle.dumps(_WritesMarker(marker), protocol=2))
    put("pyt_ae/model_config.json", json.dumps({**enc_cfg, "name": "AEConfig"}).encode())
    # data and latents
    np.save(d / "data_1d.npy", np.zeros(10, np.float32))
    p["data_1d.npy"] = d / "data_1d.npy"
    np.save(d / "data_obj.npy", np.array([_WritesMarker(marker)], dtype=object), allow_pickle=True)
    p["data_obj.npy"] = d / "data_obj.npy"
    np.save(d / "data_empty.npy", np.zeros((0, 1, 8, 8), np.float32))
    p["data_empty.npy"] = d / "data_empty.npy"
    np.save(d / "lat_shape.npy", np.zeros((5, 3), np.float32))
    p["lat_shape.npy"] = d / "lat_shape.npy"
    # resumable states: garbage, and a pickle that runs code
    put("states/garbage.safetensors.state.pt", b"PK\x03\x04 not a zip at all")
    put("states/evil.safetensors.state.pt", _evil_pickle(marker))
    # a diffusers folder to use as push input, and an eval folder that is not one
    put("push_not_model/readme.txt", b"nothing to see")
    p.update({f.name: f for f in d.iterdir() if f.is_dir()})
    return p


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(root.rglob("*")):
        h.update(str(f.relative_to(root)).encode())
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()


def _cli(capsys, args: list[str]) -> tuple[int, str, str]:
    from selfconsist.cli import main

    code = 0
    try:
        main(args)
    except SystemExit as e:
        code = int(e.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# (args, expected exit code, a word the error line must contain). {X} is inputs["X"];
# {out} is a fresh output folder's file; {outdir} is that folder.
CASES = [
    # info: broken safetensors files and folders
    (["info", "{outdir}/missing.safetensors"], 2, "no such"),
    (["info", "{empty.safetensors}"], 2, "truncated"),
    (["info", "{short.safetensors}"], 2, "truncated"),
    (["info", "{trunc.safetensors}"], 2, "truncated"),
    (["info", "{huge_n.safetensors}"], 2, "corrupt"),
    (["info", "{not_json.safetensors}"], 2, "corrupt"),
    (["info", "{list_header.safetensors}"], 2, "safetensors"),
    (["info", "{text.safetensors}"], 2, "safetensors"),
    (["info", "{bad_config.safetensors}"], 2, "config"),
    (["info", "{wrong_shapes.safetensors}"], 2, "do not match"),
    (["info", "{nan_obs_var.safetensors}"], 2, "corrupt model config"),
    (["info", "{lying_offsets.safetensors}"], 2, "truncated"),
    (["info", "{plain.safetensors}"], 2, "--adapter"),
    (["info", "{folder_empty}"], 2, "folder_empty"),
    (["info", "{good}", "--adapter", "nope"], 2, "unknown adapter"),
    (["info", "{evil.pt}"], 2, "evil.pt"),
    # diffusers folders and single files
    (["info", "{dif_garbage_cfg}"], 2, "config.json"),
    (["info", "{dif_no_weights}"], 2, "diffusion_pytorch_model"),
    (["info", "{dif_trunc}"], 2, "truncated"),
    (["info", "{dif_shape}"], 2, "shape"),
    (["info", "{dif_pickle}"], 2, "--trust-remote-code"),
    (["info", "{dif_unet}"], 2, "UNet2DConditionModel"),
    (["info", "{dif_pipe}"], 2, "no adapter recognises"),
    (["info", "{ldm_trunc.safetensors}"], 2, "truncated"),
    (["info", "{ldm_missing.safetensors}"], 2, "ldm_missing"),
    # pythae folders
    (["info", "{pyt_no_model}"], 2, "model.pt"),
    (["info", "{pyt_bad_cfg}"], 2, "model_config.json"),
    (["info", "{pyt_evil_pt}"], 2, "model.pt"),
    (["info", "{pyt_evil_enc}"], 2, "--trust-remote-code"),
    (["info", "{pyt_ae}"], 2, "deterministic"),
    # train: non-finite numbers, bad data, resume, locks
    (["train", "-o", "{out}", "--lr", "nan"], 2, "--lr must be a finite number"),
    (["train", "-o", "{out}", "--obs-var", "inf"], 2, "--obs-var must be a finite number"),
    (["train", "-o", "{out}", "--rho", "-inf", "--objective", "avae"], 2, "--rho"),
    (["train", "-o", "{out}", "--data", "{outdir}/nothing.npy"], 2, "no such"),
    (["train", "-o", "{out}", "--data", "{data_1d.npy}", *QUICK_TRAIN], 2, "data_1d.npy"),
    (["train", "-o", "{out}", "--data", "{data_obj.npy}", *QUICK_TRAIN], 2, "data_obj.npy"),
    (["train", "-o", "{out}", "--data", "{data_empty.npy}", *QUICK_TRAIN], 2, "data_empty.npy"),
    (["train", "-o", "{out}", "--resume", *QUICK_TRAIN], 2, "without --resume"),
    (["train", "-o", "{out}", "--precision", "fp16", *QUICK_TRAIN], 2, "--precision must be one of"),
    # tune: non-finite numbers, bad latents, bad states, locks, the input as output
    (["tune", "{good}", "-o", "{out}", "--lr", "nan"], 2, "--lr must be a finite number"),
    (["tune", "{good}", "-o", "{out}", "--lambda-rec", "-inf"], 2, "--lambda-rec must be a finite"),
    (["tune", "{good}", "-o", "{out}", "--obs-var", "nan"], 2, "--obs-var must be a finite number"),
    (["tune", "{good}", "-o", "{out}", "--rho", "inf"], 2, "--rho"),
    (["tune", "{good}", "-o", "{out}", "--latents", "{lat_shape.npy}", *QUICK_TUNE], 2, "lat_shape"),
    (["tune", "{good}", "-o", "{out}", "--latents", "{evil_latents.pt}", *QUICK_TUNE], 2,
     "evil_latents"),
    (["tune", "{good}", "-o", "{out}", "--resume", *QUICK_TUNE], 2, "without --resume"),
    (["tune", "{good}", "-o", "{good}", "--overwrite", *QUICK_TUNE], 2, "input"),
    (["tune", "{trunc.safetensors}", "-o", "{out}", *QUICK_TUNE], 2, "truncated"),
    (["tune", "{dif_pickle}", "-o", "{out}", *QUICK_TUNE], 2, "--trust-remote-code"),
    (["tune", "{pyt_evil_enc}", "-o", "{out}", *QUICK_TUNE], 2, "--trust-remote-code"),
    # eval
    (["eval", "{good}", "-o", "{outdir}/ev", "--rho", "nan"], 2, "--rho must be a finite number"),
    (["eval", "{good}", "-o", "{outdir}/ev", "--eps", "inf"], 2, "--eps"),
    (["eval", "{good}", "-o", "{outdir}/ev", "--probe-train-fraction", "nan"], 2,
     "--probe-train-fraction"),
    (["eval", "{trunc.safetensors}", "-o", "{outdir}/ev"], 2, "truncated"),
    (["eval", "{good}", "-o", "{outdir}/ev", "--data", "{data_obj.npy}"], 2, "data_obj.npy"),
    # push (offline: everything here must fail before any network use)
    (["push", "{outdir}/nothing", "--repo-id", "me/x", "--dry-run", "{outdir}/dry"], 2, "nothing"),
    (["push", "{good}", "--repo-id", "not a repo id", "--dry-run", "{outdir}/dry"], 2, "repo"),
    (["push", "{push_not_model}", "--repo-id", "me/x", "--dry-run", "{outdir}/dry"], 2, "push_not_model"),
    # usage errors (click's own): one line too, naming the help to read
    (["tune", "{good}", "-o", "{out}", "--nope"], 2, "No such option: --nope; see 'selfconsist tune -h'"),
    (["train", "-o", "{out}", "--steps", "abc"], 2, "'--steps'"),
    (["eval", "{good}"], 2, "Missing option '--out'"),
    (["info"], 2, "Missing argument"),
]


def _format(args: list[str], inputs: dict[str, Path], outdir: Path) -> list[str]:
    names = {k: str(v) for k, v in inputs.items()} | {"out": str(outdir / "o.safetensors"),
                                                        "outdir": str(outdir)}
    return [re.sub(r"\{([^{}]+)\}", lambda m: names[m.group(1)], a) for a in args]


def _check(code: int, out: str, err: str, expected: int, needle: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == expected, (code, out, err)
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("Error:"), err
    assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize("args,code,needle", CASES, ids=[" ".join(c[0][:3]) for c in CASES])
def test_bad_input_one_line_nothing_left(inputs, tmp_path, capsys, monkeypatch, args, code, needle):
    root = inputs["good"].parent
    before = _tree_digest(root)
    outdir = tmp_path / "outdir"
    outdir.mkdir()
    monkeypatch.chdir(outdir)  # the CLI's default outputs land in outdir too
    got = _cli(capsys, _format(args, inputs, outdir))
    _check(*got, code, needle)
    assert _tree_digest(root) == before, "an input was modified"
    assert sorted(os.listdir(outdir)) == [], f"left behind: {os.listdir(outdir)}"
    assert not inputs["marker"].exists(), "pickled code ran"


def test_usage_errors_outside_commands_are_one_line_too(capsys):
    _check(*_cli(capsys, ["bogus"]), 2, "No such command 'bogus'; see 'selfconsist -h'")
    _check(*_cli(capsys, ["-q"]), 2, "Missing command")
    code, out, err = _cli(capsys, [])  # no arguments at all: the help, once, on stdout
    assert code == 2 and err == "" and out.count("Usage: selfconsist") == 1, (code, out, err)
    code, out, err = _cli(capsys, ["tune", "-h"])
    assert code == 0 and out.count("Usage: selfconsist tune") == 1 and err == "", (code, err)


def test_battery_has_forty_cases():
    assert len(CASES) >= 40
    assert {c[0][0] for c in CASES} == {"info", "train", "tune", "eval", "push"}


def _case(*words: str) -> tuple:
    return next(c for c in CASES if all(w in c[0] for w in words))


@pytest.mark.parametrize("args,code,needle", [_case("info", "{trunc.safetensors}"),
                                              _case("train", "--lr"), _case("tune", "--resume")],
                         ids=["info-trunc", "train-nan", "tune-resume"])
def test_some_cases_through_a_real_process(inputs, tmp_path, args, code, needle):
    outdir = tmp_path / "outdir"
    outdir.mkdir()
    r = run_cli(*_format(args, inputs, outdir), cwd=outdir)
    _check(r.returncode, r.stdout, r.stderr, code, needle)
    assert os.listdir(outdir) == []


# --- existing OUT, resume states, locks -------------------------------------------------------
def test_existing_out_and_bad_states_are_left_alone(inputs, tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"precious")
    code, o, e = _cli(capsys, ["tune", str(inputs["good"]), "-o", str(out), *QUICK_TUNE])
    _check(code, o, e, 2, "--overwrite")
    code, o, e = _cli(capsys, ["train", "-o", str(out), *QUICK_TRAIN])
    _check(code, o, e, 2, "--overwrite")
    assert out.read_bytes() == b"precious"
    for state in ("garbage", "evil"):
        src = inputs[f"states/{state}.safetensors.state.pt"]
        out = tmp_path / f"{state}.safetensors"
        (tmp_path / src.name).write_bytes(src.read_bytes())
        code, o, e = _cli(capsys, ["tune", str(inputs["good"]), "-o", str(out), "--resume",
                                   *QUICK_TUNE])
        _check(code, o, e, 2, "state")
        assert (tmp_path / src.name).read_bytes() == src.read_bytes()
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            ["o.safetensors", *[f"{s}.safetensors.state.pt" for s in ("garbage", "evil")
                                if (tmp_path / f"{s}.safetensors.state.pt").exists()]])
    assert not inputs["marker"].exists()


@pytest.mark.parametrize("command", ["train", "tune"])
def test_a_second_run_refuses_naming_the_first(inputs, tmp_path, capsys, command):
    out = tmp_path / "o.safetensors"
    lock = tmp_path / "o.safetensors.lock"
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                "started": "2026-01-01 00:00:00", "command": "selfconsist first"}))
    args = (["train", "-o", str(out), *QUICK_TRAIN] if command == "train"
            else ["tune", str(inputs["good"]), "-o", str(out), *QUICK_TUNE])
    code, o, e = _cli(capsys, args)
    _check(code, o, e, 2, f"pid {os.getpid()}")
    assert "selfconsist first" in e and "being written by another run" in e
    assert lock.exists() and not out.exists()  # the other run's lock stays


def test_stale_lock_is_taken_over_and_released(inputs, tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    lock = tmp_path / "o.safetensors.lock"
    dead = 2**22 + 12345  # above pid_max's default: no such process
    lock.write_text(json.dumps({"pid": dead, "host": socket.gethostname(),
                                "started": "2026-01-01 00:00:00", "command": "selfconsist old"}))
    code, o, e = _cli(capsys, ["train", "-o", str(out), *QUICK_TRAIN])
    assert code == 0, e
    assert "stale lock" in e and str(dead) in e
    assert out.is_file() and not lock.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.safetensors"]


def test_non_finite_settings_refused_by_the_library(digits_model):
    from selfconsist.evaluate import EvalConfig
    from selfconsist.train import TrainConfig
    from selfconsist.tune import TuneConfig

    for bad in (float("nan"), float("inf"), -float("inf")):
        for make in (lambda v: TuneConfig(lr=v), lambda v: TuneConfig(obs_var=v),
                     lambda v: TrainConfig(obs_var=v), lambda v: EvalConfig(eps=(0.1, v)),
                     lambda v: selfconsist.load(digits_model, scaling_factor=v),
                     lambda v: selfconsist.load(digits_model, data_range=(0.0, v))):
            with pytest.raises(SelfconsistError, match="must be a finite number"):
                make(bad)


def test_lock_is_released_on_errors_and_unreadable_locks_refused(tmp_path):
    from selfconsist.io import lock_path_for, output_lock

    out = tmp_path / "sub" / "o.safetensors"
    with pytest.raises(ZeroDivisionError), output_lock(out):
        assert lock_path_for(out).is_file()
        info = json.loads(lock_path_for(out).read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        1 / 0  # noqa: B018
    assert not (tmp_path / "sub").exists()  # the folder it made for OUT is gone again
    out.parent.mkdir()
    lock_path_for(out).write_text("")
    with pytest.raises(SelfconsistError, match="unreadable"), output_lock(out):
        pass
    # an odd pid is never taken for a dead one: refuse rather than steal a live run's lock
    lock_path_for(out).write_text(json.dumps({"pid": "12x", "host": socket.gethostname()}))
    with pytest.raises(SelfconsistError, match="being written by another run"), output_lock(out):
        pass
    assert lock_path_for(out).exists()


# --- a full disk ------------------------------------------------------------------------------
def _fake_enospc(monkeypatch, after: int = 0) -> None:
    """Make the (after+1)-th and every later os.fsync fail as a full disk does."""
    real, calls = os.fsync, [0]

    def fsync(fd: int) -> None:
        calls[0] += 1
        if calls[0] > after:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_full_disk_writing_out_leaves_nothing(inputs, tmp_path, capsys, monkeypatch):
    out = tmp_path / "o.safetensors"
    _fake_enospc(monkeypatch)
    code, o, e = _cli(capsys, ["tune", str(inputs["good"]), "-o", str(out), *QUICK_TUNE])
    _check(code, o, e, 2, "no space left")
    assert os.listdir(tmp_path) == []


def test_full_disk_while_writing_the_model_file(inputs, tmp_path, capsys, monkeypatch):
    """safetensors reports a full disk as its own error text; still one line, nothing left."""
    import safetensors.torch

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise safetensors.SafetensorError("Error while serializing: IoError(Os { code: 28, "
                                          "kind: StorageFull, message: \"No space left on device\" })")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "o.safetensors"
    code, o, e = _cli(capsys, ["train", "-o", str(out), *QUICK_TRAIN])
    _check(code, o, e, 2, "no space left")
    assert os.listdir(tmp_path) == []


def test_full_disk_writing_the_state_keeps_the_previous_state(inputs, tmp_path, capsys, monkeypatch):
    out = tmp_path / "o.safetensors"
    state = tmp_path / "o.safetensors.state.pt"
    # the first state save succeeds (one fsync for the file; the folder's fsync fails: that is
    # after the rename, so the state is complete), the second fails mid-way
    real = os.fsync
    calls = [0]

    def fsync(fd: int) -> None:
        calls[0] += 1
        if calls[0] > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    args = ["train", "-o", str(out), *QUICK_TRAIN, "--steps", "6", "--save-every", "2"]
    code, o, e = _cli(capsys, args)
    _check(code, o, e, 2, "previous state is intact")
    assert torch.load(state, weights_only=True)["step"] == 2
    assert sorted(os.listdir(tmp_path)) == ["o.safetensors.state.pt"]
    monkeypatch.setattr(os, "fsync", real)
    code, o, e = _cli(capsys, [*args, "--resume"])
    assert code == 0, e
    assert out.is_file() and not state.exists()


# --- durability of --overwrite ----------------------------------------------------------------
@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-aside"])
def test_overwrite_of_a_folder_keeps_the_old_one_until_the_new_one_is_in(tmp_path, monkeypatch,
                                                                         exchange):
    from selfconsist import io

    out = tmp_path / "model"
    out.mkdir()
    (out / "old.txt").write_text("old")
    if not exchange:
        monkeypatch.setattr(io, "_exchange", lambda a, b: False)
    real, events = os.replace, []

    def replace(src, dst):
        events.append((Path(src).name, Path(dst).name, out.exists()))
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    removed = []
    real_rmtree = __import__("shutil").rmtree
    monkeypatch.setattr("shutil.rmtree", lambda p, **k: (removed.append(
        sorted(x.name for x in Path(p).iterdir()) if Path(p).exists() else []), real_rmtree(p, **k)))
    with io.atomic_output(out, overwrite=True) as tmp:
        tmp.mkdir()
        (tmp / "new.txt").write_text("new")
    # renameat2 swaps them with no moment without OUT (no os.replace at all); where the kernel
    # or filesystem lacks it, the old one goes aside (while OUT exists), then the new one comes in
    assert events in (([], [("model", "model.old", True), ("model", "model", False)]) if exchange
                      else ([("model", "model.old", True), ("model", "model", False)],))
    assert removed and removed[-1] in (["model"], ["model.old"])  # the old one, deleted last
    assert (out / "new.txt").read_text() == "new" and not (out / "old.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_overwrite_failure_puts_the_old_folder_back(tmp_path, monkeypatch):
    from selfconsist import io
    from selfconsist.io import atomic_output

    monkeypatch.setattr(io, "_exchange", lambda a, b: False)

    out = tmp_path / "model"
    out.mkdir()
    (out / "old.txt").write_text("old")
    real = os.replace

    def replace(src, dst):
        if Path(src).name == "model" and Path(dst) == out:  # the new one going in
            raise OSError(errno.EIO, "I/O error")
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError), atomic_output(out, overwrite=True) as tmp:
        tmp.mkdir()
        (tmp / "new.txt").write_text("new")
    assert (out / "old.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# --- safetensors header fuzzing ---------------------------------------------------------------
@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> bytes:
    """A tiny built-in checkpoint (a few KB), so a few hundred mutations load in seconds."""
    from selfconsist.adapters.builtin import new_model
    from selfconsist.models import ModelConfig

    path = tmp_path_factory.mktemp("fuzz") / "tiny.safetensors"
    new_model(ModelConfig(latent_dim=2, hidden=4, depth=1), seed=0).save(path)
    return path.read_bytes()


def _mutations(good: bytes, seed: int = 14, flips: int = 300, cuts: int = 100):
    """Seeded single-byte flips (mostly in the length prefix and JSON header) and truncations."""
    rng = random.Random(seed)
    (n,) = struct.unpack("<Q", good[:8])
    for i in range(flips):
        pos = rng.randrange(8 + n) if i % 10 else rng.randrange(len(good))
        data = bytearray(good)
        data[pos] ^= 1 << rng.randrange(8) if i % 3 else rng.randrange(1, 256)
        yield f"flip@{pos}", bytes(data)
    for _ in range(cuts):
        yield "cut", good[: rng.randrange(len(good))]


def test_fuzzed_safetensors_fail_cleanly_or_load(tmp_path, small_model):
    path = tmp_path / "m.safetensors"
    outcomes = {"error": 0, "loaded": 0}
    for what, data in _mutations(small_model):
        path.write_bytes(data)
        try:
            vae = selfconsist.load(path)
        except SelfconsistError as e:
            assert str(e).strip() and "\n" not in str(e).strip(), (what, str(e))
            outcomes["error"] += 1
        else:
            z = vae.encode(torch.rand(2, *vae.data_shape)).mean
            assert z.shape == (2, *vae.latent_shape), what
            outcomes["loaded"] += 1
        assert path.read_bytes() == data  # the loader never writes
    assert outcomes["error"] > 100 and sum(outcomes.values()) == 400


def test_some_fuzzed_files_through_the_cli(tmp_path, small_model, capsys):
    muts = list(_mutations(small_model, seed=99, flips=30, cuts=10))
    for what, data in muts[::5]:
        path = tmp_path / "m.safetensors"
        path.write_bytes(data)
        code, out, err = _cli(capsys, ["info", str(path), "--json"])
        assert code in (0, 2), (what, err)
        assert "Traceback" not in err
        if code == 2:
            assert len(err.strip().splitlines()) == 1, (what, err)
