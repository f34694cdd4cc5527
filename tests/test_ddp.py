"""Multi-process tuning (``torchrun … -m selfconsist tune``): 2 gloo processes on CPU.

Each worker is a real process with torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT) that calls :func:`selfconsist.tune`. To compare 2 × 64 with 1 × 128 on the
*same* z₀ and reparameterisation noise, a test hook in the worker replaces each step's z₀ and
ε by rows of a fixed per-step table: rank r takes rows [64r, 64r + 64), the single process all
128. Everything else (gradient averaging, rank-0-only measuring and writing, the resumable
state) is the code ``selfconsist tune`` runs.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from selfconsist.adapters.builtin import new_model
from selfconsist.distributed import DistContext, env_world, rank_seed, teardown
from selfconsist.errors import SelfconsistError
from selfconsist.models import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
STEPS, GLOBAL_BATCH, LATENT = 4, 128, 4
# sample_noise off: the hook below replaces z₀ and ε on every rank; the observation noise of
# --sample-noise (the built-in family's default) is another per-rank draw it does not replace.
TUNE = dict(steps=STEPS, lr=1e-3, device="cpu", save_every=2, eval_samples=16, seed=0,
            sample_noise=False)

WORKER = r'''
import json, os, shutil, signal, sys
args = json.loads(sys.argv[1])
import torch
torch.set_num_threads(1)
import selfconsist
import selfconsist.objective as O
import selfconsist.tune as T
import selfconsist.posthoc as P
from selfconsist.distributed import teardown
from selfconsist.errors import Interrupted

noise = torch.load(args["noise"])
rank, b = int(os.environ.get("RANK", "0")), args["batch"]
rows = slice(rank * b, (rank + 1) * b)
real, step = P.posthoc_terms, [args["start"]]

def scripted(vae, z0, cfg, obs_var, gen, *rest):  # the test hook: this step's z0 and eps rows
    s = step[0]
    step[0] += 1
    if s == args["signal_at"] and rank == 1:  # SIGTERM to one rank only, in the middle of a step
        os.kill(os.getpid(), signal.SIGTERM)
    if not args["script"]:
        return real(vae, z0, cfg, obs_var, gen, *rest)
    if s == args["keep_state_at"] and rank == 0:  # the state of step s, as a run cut here leaves it
        from selfconsist.io import state_path_for
        shutil.copy(state_path_for(args["out"]), args["keep_state_as"])
    eps, orig = noise["eps"][s, rows], O.reparameterize
    O.reparameterize = lambda m, lv, g=None: m + torch.exp(0.5 * lv) * eps
    try:
        return real(vae, noise["z"][s, rows], cfg, obs_var, gen, *rest)
    finally:
        O.reparameterize = orig

P.posthoc_terms = scripted
import selfconsist.mlp_step as M
M.ENABLED["on"] = False  # the built-in MLP's hand-derived step does not call posthoc_terms
cfg = T.TuneConfig(batch_size=b, **args["tune"])
try:
    selfconsist.tune(args["model"], cfg, out=args["out"], resume=args["resume"], progress=False)
except Interrupted as e:
    teardown()
    print(json.dumps({"rank": rank, "step": e.step}))
    sys.exit(e.exit_code)
except BaseException:
    teardown()
    raise
teardown(wait_for_peers=True)  # as the CLI leaves a run that ended normally
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_workers(tmp: Path, world: int, out: Path, *, start: int = 0, resume: bool = False,
                  keep_state_at: int = -1, keep_state_as: Path | None = None,
                  script: bool = True, signal_at: int = -1) -> list[subprocess.Popen]:
    """Start ``world`` worker processes as torchrun would."""
    worker = tmp / "worker.py"
    args = {"noise": str(tmp / "noise.pt"), "model": str(tmp / "base.safetensors"), "out": str(out),
            "batch": GLOBAL_BATCH // world, "start": start, "resume": resume,
            "keep_state_at": keep_state_at, "keep_state_as": str(keep_state_as),
            "script": script, "signal_at": signal_at,
            "tune": TUNE}
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        if world > 1:
            env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                       LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                       GLOO_SOCKET_IFNAME="lo")
        procs.append(subprocess.Popen([sys.executable, str(worker), json.dumps(args)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def wait(procs: list[subprocess.Popen], expect: int = 0) -> list[int]:
    """The workers' exit codes (their output printed when one is not ``expect``)."""
    codes = []
    try:
        for p in procs:
            out_text, _ = p.communicate(timeout=120)
            codes.append(p.returncode)
            if p.returncode != expect:
                print(out_text)
    finally:
        for p in procs:  # a hung gloo peer must not outlive the test
            if p.poll() is None:
                p.kill()
    return codes


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The base model, a 1 × 128 run, and a 2 × 64 run whose state at step 2 is kept as the
    state a run cut there leaves (``cut``'s)."""
    tmp = tmp_path_factory.mktemp("ddp")
    vae = new_model(ModelConfig(data_shape=(1, 8, 8), latent_dim=LATENT, hidden=32, depth=2), seed=0)
    vae.save(tmp / "base.safetensors")
    gen = torch.Generator().manual_seed(123)
    torch.save({"z": torch.randn(STEPS, GLOBAL_BATCH, LATENT, generator=gen),
                "eps": torch.randn(STEPS, GLOBAL_BATCH, LATENT, generator=gen)}, tmp / "noise.pt")
    (tmp / "worker.py").write_text(WORKER)
    from selfconsist.io import state_path_for

    # Independent runs, started together to keep the test short.
    one = start_workers(tmp, 1, tmp / "one.safetensors")
    two = start_workers(tmp, 2, tmp / "two.safetensors", keep_state_at=2,
                        keep_state_as=state_path_for(tmp / "cut.safetensors"))
    sig = start_workers(tmp, 2, tmp / "sig.safetensors", script=False, signal_at=2)
    assert (wait(one), wait(two), wait(sig, 143)) == ([0], [0, 0], [143, 143])
    return {"tmp": tmp, "base": tmp / "base.safetensors", "one": tmp / "one.safetensors",
            "two": tmp / "two.safetensors", "cut": tmp / "cut.safetensors",
            "sig": tmp / "sig.safetensors"}


def split(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    t = load_file(str(path))
    return ({k: v for k, v in t.items() if k.startswith("encoder.")},
            {k: v for k, v in t.items() if not k.startswith("encoder.")})


def test_two_by_64_matches_one_by_128(runs) -> None:
    enc0, dec0 = split(runs["base"])
    enc1, dec1 = split(runs["one"])
    enc2, dec2 = split(runs["two"])
    assert enc0 and dec0
    moved = sum((enc1[k] - enc0[k]).norm() ** 2 for k in enc0) ** 0.5
    gap = sum((enc2[k] - enc1[k]).norm() ** 2 for k in enc0) ** 0.5
    assert moved > 1e-3  # the encoder did move: the comparison is not vacuous
    assert gap < 1e-4 * moved, (float(gap), float(moved))
    print(f"2x64 vs 1x128: |Δ| {float(gap):.3g}, moved {float(moved):.3g}")
    for k in dec0:  # decoder byte-identical to the input in both outputs
        assert torch.equal(dec1[k], dec0[k]) and torch.equal(dec2[k], dec0[k]), k


def test_rank0_writes_a_loadable_output(runs) -> None:
    import selfconsist
    from selfconsist.io import META_PREFIX, load_safetensors

    _, meta = load_safetensors(runs["two"])
    assert meta[META_PREFIX + "world_size"] == "2"
    assert json.loads(meta[META_PREFIX + "metrics"])["after"]  # rank 0 measured
    vae = selfconsist.load(runs["two"])
    assert vae.latent_shape == (LATENT,)
    from selfconsist.cli.info import describe, render_info

    info = describe(vae)  # `selfconsist info` shows how the run ran
    assert info["world_size"] == 2 and info["precision"] == "fp32"
    assert "processes" in render_info("two", info)
    left = sorted(p.name for p in runs["tmp"].iterdir() if p.name.startswith("two"))
    assert left == ["two.safetensors"]  # no lock or state left behind by any rank


def test_resume_refuses_another_world_size(runs) -> None:
    from selfconsist.io import state_path_for

    state = state_path_for(runs["cut"])
    assert state.exists() and not runs["cut"].exists()
    assert torch.load(state, weights_only=False)["world_size"] == 2
    import selfconsist
    from selfconsist.tune import TuneConfig

    cfg = TuneConfig(batch_size=GLOBAL_BATCH // 2, **TUNE)  # as the 2-process run, in 1 process
    with pytest.raises(SelfconsistError) as err:
        selfconsist.tune(str(runs["base"]), cfg, out=runs["cut"], resume=True, progress=False)
    msg = str(err.value)
    assert "2-process run" in msg and "--nproc-per-node 2" in msg and "not 1" in msg
    assert "\n" not in msg  # one line for the CLI
    assert state.exists()  # the refusal keeps the state for the right resume


def test_resume_under_the_same_world_size_matches(runs) -> None:
    assert wait(start_workers(runs["tmp"], 2, runs["cut"], start=2, resume=True)) == [0, 0]
    enc_full, _ = split(runs["two"])
    enc_res, dec_res = split(runs["cut"])
    _, dec0 = split(runs["base"])
    for k in enc_full:
        assert torch.equal(enc_res[k], enc_full[k]), k
    for k in dec0:
        assert torch.equal(dec_res[k], dec0[k]), k


def test_single_process_context_is_a_no_op(monkeypatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert env_world() == (0, 1, 0)
    ctx = DistContext()
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    ctx.average_gradients([p])
    assert torch.equal(p.grad, torch.full((3,), 2.0))
    assert ctx.gather("x") == ["x"] and ctx.is_main and not ctx.active
    assert rank_seed(7, 0) == 7 and rank_seed(7, 1) == 7 + 2**32
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(SelfconsistError, match="RANK=2"):
        env_world()


def test_a_signal_to_one_rank_stops_both_after_the_same_step(runs) -> None:
    """SIGTERM to rank 1 during step 2: both ranks exit 143 after step 2 with one state saved,
    holding each rank's own generator (the ranks draw different z₀ streams)."""
    from selfconsist.io import state_path_for

    state = torch.load(state_path_for(runs["sig"]), weights_only=False)
    assert not runs["sig"].exists()
    assert state["step"] == 3 and state["world_size"] == 2
    r0, r1 = state["rng_ranks"]
    assert not torch.equal(r0["generator"], r1["generator"])


def test_teardown_after_a_normal_end_waits_then_leaves(monkeypatch) -> None:
    """A one-process gloo group: the barrier passes at once and the group is destroyed."""
    import torch.distributed as dist

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    waited = []
    real = dist.monitored_barrier
    monkeypatch.setattr(dist, "monitored_barrier", lambda **kw: waited.append(kw) or real(**kw))
    teardown(wait_for_peers=True)
    assert not dist.is_initialized() and len(waited) == 1
    teardown(wait_for_peers=True)  # no group: a no-op
