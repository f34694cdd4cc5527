"""Hub integration, offline: a local Hub cache built by hand, and HfApi with only its HTTP
transport replaced (httpx2.MockTransport behind huggingface_hub.set_client_factory)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import constants, set_client_factory
from huggingface_hub.utils._http import default_client_factory

from selfconsist import hub, modelcard
from selfconsist.errors import SelfconsistError

# A distinctive fake token: no output, file, card or request body may ever contain it.
FAKE_TOKEN = "hf_selfconsistFAKEtokenZq7Xk2Lp9Wm4Rt8Yv3Bn"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


# ------------------------------------------------------------------------------------------
# fixtures and helpers
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A built-in MLP VAE trained 50 steps on digits, with a tune-like record in its header."""
    from safetensors.torch import load_file, save_file

    from selfconsist.train import TrainConfig, train

    d = tmp_path_factory.mktemp("tiny")
    raw = d / "raw.safetensors"
    train(TrainConfig(data="digits", steps=50, device="cpu"), raw, progress=False)
    # Add what `selfconsist tune` records, so the card has something to show.
    from selfconsist.io import read_safetensors_header

    meta = dict(read_safetensors_header(raw)["__metadata__"])
    meta["selfconsist.command"] = "selfconsist tune owner/base --steps 50 --rho 0.9 --device cpu"
    meta["selfconsist.tune_config"] = json.dumps({"rho": 0.9, "steps": 50})
    meta["selfconsist.metrics"] = json.dumps({
        "before": {"sample_roundtrip_mse": {"value": 0.04, "stderr": 0.001}},
        "after": {"sample_roundtrip_mse": {"value": 0.02, "stderr": 0.001}}})
    out = d / "tuned.safetensors"
    save_file(load_file(str(raw)), str(out), metadata=meta)
    return out


@pytest.fixture
def hf_home(tmp_path, monkeypatch) -> Path:
    """An empty HF_HOME, offline; huggingface_hub's import-time constants patched to match."""
    home = tmp_path / "hf_home"
    (home / "hub").mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return home


def cache_repo(home: Path, repo_id: str, files: dict[str, bytes | Path], *,
               commit: str = COMMIT, refs: tuple[str, ...] = ("main",)) -> Path:
    """Lay out ``repo_id`` in the Hub cache the way huggingface_hub does (refs → snapshot)."""
    repo = home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    for rel, content in files.items():
        dest = snap / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(content.read_bytes() if isinstance(content, Path) else content)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)  # no newline: the cache reads it verbatim
    return snap


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    full.update({"OMP_NUM_THREADS": "1", "COLUMNS": "200", **env})
    return subprocess.run([sys.executable, "-m", "selfconsist", *args], capture_output=True,
                          text=True, env=full, timeout=300)


def no_token_in(*texts: str | bytes) -> bool:
    return all(FAKE_TOKEN not in (t.decode("utf-8", "replace") if isinstance(t, bytes) else t)
               for t in texts)


def tree_texts(folder: Path) -> list[bytes]:
    return [p.read_bytes() for p in folder.rglob("*") if p.is_file()]


class FakeHub:
    """The Hub's HTTP API as far as create_repo / create_commit / downloads use it.

    Only the transport is fake: huggingface_hub builds every request itself, so what is
    recorded here is exactly what would go over the wire.
    """

    def __init__(self, files: dict[str, bytes] | None = None, status: dict[str, int] | None = None):
        self.files = dict(files or {})  # the repo's current contents
        self.status = status or {}  # path fragment → forced HTTP status
        self.requests: list[httpx2.Request] = []
        self.bodies: list[bytes] = []
        self.commits: list[dict] = []
        self.created: list[dict] = []

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(request)
        body = request.read()
        self.bodies.append(body)
        path, method = request.url.path, request.method
        for frag, code in self.status.items():
            if frag in path:
                return httpx2.Response(code, json={"error": "forced"})
        if method == "POST" and path == "/api/repos/create":
            self.created.append(json.loads(body))
            return httpx2.Response(200, json={"url": "https://huggingface.co/me/tuned"})
        if path == "/api/validate-yaml":
            return httpx2.Response(200, json={})
        if "/branch/" in path:
            return httpx2.Response(200, json={})
        if "/preupload/" in path:
            wanted = json.loads(body)["files"]
            return httpx2.Response(200, json={"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in wanted]})
        if "/commit/" in path:
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            files = {item["value"]["path"]: base64.b64decode(item["value"]["content"])
                     for item in lines if item["key"] == "file"}
            self.commits.append({"path": path, "params": dict(request.url.params),
                                 "header": lines[0]["value"], "files": files,
                                 "other": [i for i in lines[1:] if i["key"] != "file"]})
            return httpx2.Response(200, json={
                "commitUrl": f"https://huggingface.co/me/tuned/commit/{COMMIT}",
                "commitOid": COMMIT, "pullRequestUrl": "https://huggingface.co/me/tuned/discussions/1"})
        if path.startswith("/api/models/") and "/revision/" in path:
            repo = path[len("/api/models/"):].split("/revision/")[0]
            return httpx2.Response(200, json={"id": repo, "sha": COMMIT, "private": False})
        if path.startswith("/api/models/") and "/tree/" in path:
            return httpx2.Response(200, json=[
                {"type": "file", "path": p, "size": len(c), "oid": hashlib.sha1(c).hexdigest()}
                for p, c in sorted(self.files.items())])
        if "/resolve/" in path:
            rel = path.split("/resolve/", 1)[1].split("/", 1)[1]
            if rel not in self.files:
                return httpx2.Response(404, headers={"X-Error-Code": "EntryNotFound"},
                                       json={"error": "Entry not found"})
            data = self.files[rel]
            headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                       "Content-Length": str(len(data))}
            return httpx2.Response(200, headers=headers, content=b"" if method == "HEAD" else data)
        return httpx2.Response(500, json={"error": f"unexpected {method} {path}"})

    def paths(self) -> list[str]:
        return [f"{r.method} {r.url.path}" for r in self.requests]


def assert_token_only_in_auth_header(fake: FakeHub) -> None:
    """Requests to the repo carry the token as a Bearer header; no URL or body carries it."""
    repo_requests = [r for r in fake.requests if "/me/" in r.url.path or "/owner/" in r.url.path
                     or r.url.path == "/api/repos/create"]
    assert repo_requests
    for r in repo_requests:
        assert r.headers.get("authorization") == f"Bearer {FAKE_TOKEN}", (r.method, r.url.path)
    assert no_token_in(*fake.bodies, *[str(r.url) for r in fake.requests])


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """Route huggingface_hub's HTTP client through a :class:`FakeHub` (online mode, with an
    empty cache of its own)."""
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    fake = FakeHub()
    set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(fake)))
    yield fake
    set_client_factory(default_client_factory)


def run_main(*args: str) -> int:
    from selfconsist.cli import main

    try:
        main(list(args))
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def make_outdir(tmp_path: Path, model: Path, readme: str | None = None) -> Path:
    out = tmp_path / "OUTDIR"
    (out / "eval").mkdir(parents=True)
    (out / "tuned.safetensors").write_bytes(model.read_bytes())
    (out / "tuned.safetensors.state.pt").write_bytes(b"resumable state: never uploaded")
    (out / "eval" / "metrics.json").write_text(json.dumps({
        "models": {"base": {"consistency_kl": {"value": 1.5, "stderr": 0.1}},
                   "tuned": {"consistency_kl": {"value": 0.25, "stderr": 0.02}}},
        "config": {"n": 256}, "versions": {"selfconsist": "0.1.0"}}))
    (out / "eval" / "report.md").write_text("# report\n![drift](drift.png)\n")
    (out / "eval" / "drift.png").write_bytes(b"\x89PNG\r\n\x1a\nfake")
    if readme is not None:
        (out / "README.md").write_text(readme)
    return out


# ------------------------------------------------------------------------------------------
# pulling
# ------------------------------------------------------------------------------------------
def test_python_load_resolves_hub_ids(hf_home, tiny_model):
    import selfconsist

    cache_repo(hf_home, "owner/name", {"model.safetensors": tiny_model,
                                       "README.md": b"---\nlicense: mit\n---\n"})
    vae = selfconsist.load("owner/name")  # was "no such file or folder"
    assert vae.source.repo_id == "owner/name" and vae.source.revision == COMMIT
    assert vae.source.license == "mit"
    assert selfconsist.load("owner/name:model.safetensors", revision="main").source.repo_id == "owner/name"


def test_select_files_fetches_only_what_adapters_read():
    files = ["README.md", "config.json", "diffusion_pytorch_model.safetensors",
             "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.bin",
             "model.ckpt", "encoder.pkl", "model.pt", "model_config.json", "vae/config.json",
             "vae/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.safetensors"]
    safe = hub.select_files(files, "")
    assert safe == ["config.json", "diffusion_pytorch_model.safetensors", "model.pt",
                    "model_config.json"]
    trusted = hub.select_files(files, "", trust_remote_code=True)
    assert {"diffusion_pytorch_model.bin", "model.ckpt", "encoder.pkl"} <= set(trusted)
    assert hub.select_files(files, "vae") == ["vae/config.json",
                                              "vae/diffusion_pytorch_model.safetensors"]
    assert hub.select_files(files, "vae/config.json") == ["vae/config.json"]
    assert hub.default_subfolder(["model_index.json", "vae/config.json", "unet/config.json"]) == "vae"
    assert hub.default_subfolder(files) == ""
    assert hub.parse_repo_ref("owner/name:vae") == hub.RepoRef("owner/name", "vae")
    with pytest.raises(SelfconsistError):
        hub.parse_repo_ref("not a repo")


def test_resolve_from_offline_cache(hf_home, tiny_model):
    cache_repo(hf_home, "owner/name", {
        "model/tuned.safetensors": tiny_model,
        "README.md": b"---\nlicense: mit\ntags: [vae]\n---\n# a model\n"}, refs=("main", "v1"))
    res = hub.resolve("owner/name:model", revision="v1")
    snap = hf_home / "hub" / "models--owner--name" / "snapshots" / COMMIT
    # A folder without a config holding one .safetensors resolves to that file.
    assert res.path == snap / "model" / "tuned.safetensors"
    assert res.commit == COMMIT and res.license == "mit"
    src = hub.source_info(res.path)
    assert (src.repo_id, src.revision, src.license) == ("owner/name", COMMIT, "mit")
    assert src.extra == {"subfolder": "model", "requested_revision": "v1"}

    # load_model attaches the Hub origin to the adapter.
    from selfconsist.loading import load_model

    vae = load_model("owner/name:model", None)
    assert vae.source.repo_id == "owner/name" and vae.source.license == "mit"
    assert vae.source.revision == COMMIT and vae.source.format == "builtin"

    with pytest.raises(SelfconsistError, match="not in the local Hugging Face cache"):
        hub.resolve("owner/name", revision="nope")
    with pytest.raises(SelfconsistError, match="'missing' is not in the repo"):
        hub.resolve("owner/name:missing")


def test_info_loads_cached_repo_in_subprocess(tmp_path, tiny_model):
    home = tmp_path / "hf"
    cache_repo(home, "owner/name", {"tuned.safetensors": tiny_model, "README.md": b"# no card data\n"})
    env = {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_TOKEN": FAKE_TOKEN}
    r = cli("info", "owner/name", "--json", env=env)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["adapter"] == "builtin" and info["latent_shape"] == [64]
    assert info["data_shape"] == [1, 8, 8]
    assert no_token_in(r.stdout, r.stderr)

    # Not cached + offline: one clear line, exit code 2, no traceback, no token.
    r = cli("info", "owner/absent", env=env)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert "owner/absent" in lines[0] and "not in the local Hugging Face cache" in lines[0]
    assert "HF_HUB_OFFLINE" in lines[0] and "Traceback" not in r.stderr
    assert no_token_in(r.stdout, r.stderr)


def test_online_download_fetches_only_allowed_files(fake_hub, tiny_model):
    weights = tiny_model.read_bytes()
    fake_hub.files.update({
        "README.md": b"---\nlicense: apache-2.0\n---\n",
        "model_index.json": b"{}",
        "vae/config.json": b'{"_class_name": "AutoencoderKL"}',
        "vae/diffusion_pytorch_model.safetensors": weights,
        "vae/diffusion_pytorch_model.fp16.safetensors": b"variant",
        "vae/diffusion_pytorch_model.bin": b"pickle: never fetched",
        "unet/diffusion_pytorch_model.safetensors": b"unet: never fetched"})
    res = hub.resolve("owner/pipe")  # a pipeline repo: the vae/ subfolder is picked
    assert res.path.name == "vae" and res.license == "apache-2.0" and res.commit == COMMIT
    got = sorted(p.relative_to(res.path.parent).as_posix()
                 for p in res.path.parent.rglob("*") if p.is_file())
    assert got == ["README.md", "vae/config.json", "vae/diffusion_pytorch_model.safetensors"]
    assert (res.path / "diffusion_pytorch_model.safetensors").read_bytes() == weights
    fetched = [p for p in fake_hub.paths() if "/resolve/" in p]
    assert not any(x in p for p in fetched for x in (".bin", "unet", "fp16"))
    assert_token_only_in_auth_header(fake_hub)


# ------------------------------------------------------------------------------------------
# model cards
# ------------------------------------------------------------------------------------------
USER_CARD = """---
license: mit
tags:
- my-tag
custom: kept
---
# My model

Text the user wrote before.

<!-- selfconsist:start -->
old generated text
<!-- selfconsist:end -->

## Citation
The user's own closing words.
"""


def test_card_update_keeps_user_text_and_replaces_only_our_section():
    info = modelcard.CardInfo(repo_id="me/tuned", model_files=["tuned.safetensors"],
                              base_model="owner/base", license="apache-2.0",
                              command="selfconsist tune owner/base --steps 50")
    new = modelcard.update_card(USER_CARD, modelcard.render_section(info),
                                modelcard.front_matter(info))
    before, _, rest = USER_CARD.partition(modelcard.START)
    _, _, after = rest.partition(modelcard.END)
    body_before = before.split("---\n", 2)[2]
    assert body_before in new and new.endswith(after)  # user text byte for byte
    assert "old generated text" not in new
    assert new.count(modelcard.START) == 1 and new.count(modelcard.END) == 1
    assert "selfconsist tune owner/base --steps 50" in new
    front, _, _ = modelcard.split_front_matter(new)
    assert front["license"] == "mit"  # the user's value wins
    assert front["custom"] == "kept" and front["tags"][0] == "my-tag"
    assert {"vae", "self-consistency"} <= set(front["tags"])
    assert front["library_name"] == "selfconsist" and front["base_model"] == "owner/base"
    # Updating again changes nothing: the section is replaced, not appended.
    assert modelcard.update_card(new, modelcard.render_section(info), modelcard.front_matter(info)) == new

    # A card without markers keeps its text and gains the section at the end.
    plain = "# Hand-written\n\nSome words.\n"
    merged = modelcard.update_card(plain, modelcard.render_section(info), modelcard.front_matter(info))
    assert merged.startswith("---\n") and "# Hand-written\n\nSome words.\n" in merged
    assert merged.index("Some words.") < merged.index(modelcard.START)


# ------------------------------------------------------------------------------------------
# pushing
# ------------------------------------------------------------------------------------------
def test_push_sends_model_eval_and_card_through_hfapi(tmp_path, fake_hub, tiny_model, capsys):
    out = make_outdir(tmp_path, tiny_model)
    code = run_main("push", str(out), "--repo-id", "me/tuned", "--private", "--license", "apache-2.0")
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.strip() == f"https://huggingface.co/me/tuned/commit/{COMMIT}"
    assert fake_hub.created == [{"name": "tuned", "organization": "me", "visibility": "private",
                                 "type": "model"}]
    (commit,) = fake_hub.commits
    assert commit["path"] == "/api/models/me/tuned/commit/main" and commit["params"] == {}
    files = commit["files"]
    assert sorted(files) == ["README.md", "eval/drift.png", "eval/metrics.json", "eval/report.md",
                             "tuned.safetensors"]  # no .state.pt
    assert files["tuned.safetensors"] == tiny_model.read_bytes()
    card = files["README.md"].decode()
    front, body, _ = modelcard.split_front_matter(card)
    assert front["library_name"] == "selfconsist" and front["license"] == "apache-2.0"
    assert front["base_model"] == "owner/base"  # from the recorded tune command
    assert {"vae", "self-consistency"} <= set(front["tags"])
    assert "consistency_kl" in body and "0.25 ± 0.02" in body  # the eval table
    assert "![drift](eval/drift.png)" in body
    assert "selfconsist tune owner/base --steps 50 --rho 0.9 --device cpu" in body
    assert 'hf_hub_download("me/tuned", "tuned.safetensors")' in body
    # --license was given: the card must not claim it came from the base model
    assert "License: `apache-2.0`, as chosen by the uploader." in body and "carried over" not in body
    assert "pip install" not in card and "pypi.org" not in card  # not published on an index
    (entry,) = front["model-index"]  # the eval numbers, in huggingface_hub's EvalResult format
    assert entry["name"] == "tuned"
    (result,) = entry["results"]
    assert result["dataset"]["name"] == "prior-samples"
    assert {"type": "consistency_kl", "value": 0.25} in [
        {k: m[k] for k in ("type", "value")} for m in result["metrics"]]
    assert_token_only_in_auth_header(fake_hub)
    assert no_token_in(captured.out, captured.err)


def test_push_updates_existing_repo_card_as_pull_request(tmp_path, fake_hub, tiny_model, capsys):
    fake_hub.files["README.md"] = USER_CARD.encode()
    out = make_outdir(tmp_path, tiny_model)
    code = run_main("push", str(out), "--repo-id", "me/tuned", "--create-pr")
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.strip() == "https://huggingface.co/me/tuned/discussions/1"
    (commit,) = fake_hub.commits
    assert commit["params"] == {"create_pr": "1"}
    card = commit["files"]["README.md"].decode()
    assert "Text the user wrote before." in card and card.endswith("The user's own closing words.\n")
    assert "old generated text" not in card and "consistency_kl" in card
    front, _, _ = modelcard.split_front_matter(card)
    assert front["license"] == "mit" and front["custom"] == "kept"


def test_push_error_is_one_line_without_token(tmp_path, fake_hub, tiny_model, capsys):
    fake_hub.status["/api/repos/create"] = 401
    out = make_outdir(tmp_path, tiny_model)
    code = run_main("push", str(out), "--repo-id", "me/tuned")
    captured = capsys.readouterr()
    assert code == 2 and not fake_hub.commits
    assert len(captured.err.strip().splitlines()) == 1 and "HF_TOKEN" in captured.err
    assert no_token_in(captured.out, captured.err)


def test_dry_run_writes_the_folder_and_contacts_nothing(tmp_path, tiny_model):
    out = make_outdir(tmp_path, tiny_model, readme="# Mine\n\nKeep me.\n")
    dest = tmp_path / "preview"
    # HF_HUB_OFFLINE=1: any network access would fail the run.
    # The base model's card is in the cache (tune downloaded it): its license is carried over.
    cache_repo(tmp_path / "hf", "owner/base", {"README.md": b"---\nlicense: bsd-3-clause\n---\n"})
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_TOKEN": FAKE_TOKEN}
    # hf upload's order (REPO_ID first); --dry-run DIR writes exactly where it is told
    r = cli("push", "me/tuned", str(out), "--dry-run", str(dest), env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(dest)
    got = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert got == ["README.md", "eval/drift.png", "eval/metrics.json", "eval/report.md",
                   "tuned.safetensors"]
    card = (dest / "README.md").read_text()
    assert card.startswith("---\n") and "# Mine\n\nKeep me.\n" in card and modelcard.START in card
    front, _, _ = modelcard.split_front_matter(card)
    assert front["base_model"] == "owner/base" and front["license"] == "bsd-3-clause"
    assert (out / "README.md").read_text() == "# Mine\n\nKeep me.\n"  # OUTDIR untouched
    assert no_token_in(r.stdout, r.stderr, *tree_texts(dest))


def test_push_after_tune_assembles_card_from_cached_base(tmp_path, hf_home, tiny_model):
    cache_repo(hf_home, "owner/base", {"base.safetensors": tiny_model,
                                       "README.md": b"---\nlicense: openrail\n---\n"})
    dest = tmp_path / "bundle"
    cmd = f"selfconsist tune owner/base --steps 50 --push-to-hub me/tuned --oops {FAKE_TOKEN}"
    res = hub.push_after_tune(tiny_model, "owner/base", "me/tuned", command=cmd, evaluate=False,
                              dry_run=True, dry_run_dir=dest)
    assert res.folder == dest and "tuned.safetensors" in res.files
    card = (dest / "README.md").read_text()
    front, body, _ = modelcard.split_front_matter(card)
    assert front["base_model"] == "owner/base" and front["license"] == "openrail"
    assert "selfconsist tune owner/base --steps 50 --push-to-hub me/tuned" in body
    assert f"revision `{COMMIT[:12]}`" in body
    # No eval run pushed: the card falls back to the checkpoint's before/after numbers.
    assert "| sample_roundtrip_mse | 0.04 ± 0.001 | 0.02 ± 0.001 |" in body
    assert no_token_in(*tree_texts(dest))  # even a token pasted into the command is masked


def test_push_after_tune_runs_the_eval(tmp_path, hf_home, tiny_model):
    pytest.importorskip("selfconsist.evaluate")
    cache_repo(hf_home, "owner/base", {"base.safetensors": tiny_model})
    dest = tmp_path / "bundle"
    res = hub.push_after_tune(tiny_model, "owner/base", "me/tuned", command="selfconsist tune x",
                              eval_options={"samples": 32, "pgd_steps": 2, "bootstrap": 10,
                                            "device": "cpu", "figures": False},
                              dry_run=True, dry_run_dir=dest)
    assert {"eval/metrics.json", "eval/report.md"} <= set(res.files)
    metrics = json.loads((dest / "eval" / "metrics.json").read_text())
    assert set(metrics["models"]) == {"base", "tuned"}
    card = (dest / "README.md").read_text()
    kl = metrics["models"]["tuned"]["consistency_kl"]["value"]
    assert "`consistency_kl`" in card and f"{kl:.4g}" in card


def test_outdir_layouts(tmp_path, tiny_model):
    folder = tmp_path / "diffusers_out"
    (folder / "vae").mkdir(parents=True)
    (folder / "vae" / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    (folder / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(tiny_model.read_bytes())
    b = hub.find_bundle(folder)
    assert b.model == folder / "vae" and b.eval_dir is None
    files = hub.plan_upload(b, "me/vae")
    assert sorted(files) == ["README.md", "config.json", "diffusion_pytorch_model.safetensors"]
    assert "AutoencoderKL.from_pretrained(\"me/vae\")" in files["README.md"].decode()
    (folder / "other.safetensors").write_bytes(b"x")
    with pytest.raises(SelfconsistError, match="several models"):
        hub.find_bundle(folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SelfconsistError, match="no tuned model"):
        hub.find_bundle(tmp_path / "empty")


def test_tune_push_to_hub_tunes_evaluates_and_pushes(tmp_path, fake_hub, tiny_model, capsys,
                                                     monkeypatch):
    out = tmp_path / "tuned_again.safetensors"
    args = ["tune", str(tiny_model), "--out", str(out), "--steps", "3", "--batch-size", "8",
            "--eval-samples", "16", "--device", "cpu", "-q", "--push-to-hub", "me/tuned"]
    monkeypatch.setattr(sys, "argv", ["selfconsist", *args])  # tune records the command from argv
    code = run_main(*args)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.strip().splitlines()[-1] == f"https://huggingface.co/me/tuned/commit/{COMMIT}"
    (commit,) = fake_hub.commits
    files = commit["files"]
    assert files["tuned_again.safetensors"] == out.read_bytes()
    assert {"eval/metrics.json", "eval/report.md", "README.md"} <= set(files)
    assert set(json.loads(files["eval/metrics.json"])["models"]) == {"base", "tuned"}
    card = files["README.md"].decode()
    assert f"selfconsist tune {tiny_model} --out {out} --steps 3" in card  # the exact command
    assert "--push-to-hub me/tuned" in card
    assert no_token_in(captured.out, captured.err, *fake_hub.bodies)


def test_bad_push_repo_id_fails_before_tuning(tmp_path, tiny_model, capsys):
    out = tmp_path / "never.safetensors"
    code = run_main("tune", str(tiny_model), "--out", str(out), "--steps", "3", "--device", "cpu",
                    "--push-to-hub", "not-a-repo-id")
    assert code == 2 and not out.exists()
    assert "--push-to-hub 'not-a-repo-id'" in capsys.readouterr().err


def test_push_to_branch_creates_it_and_commits_there(tmp_path, fake_hub, tiny_model, capsys):
    out = make_outdir(tmp_path, tiny_model)
    code = run_main("push", str(out / "tuned.safetensors"), "--repo-id", "me/tuned",
                    "--revision", "dev", "-m", "try a branch")
    assert code == 0, capsys.readouterr().err
    assert "POST /api/models/me/tuned/branch/dev" in fake_hub.paths()
    (commit,) = fake_hub.commits
    assert commit["path"] == "/api/models/me/tuned/commit/dev" and commit["header"]["summary"] == "try a branch"
    assert sorted(commit["files"]) == ["README.md", "tuned.safetensors"]  # a bare file: no eval
    assert fake_hub.created[0].get("visibility") is None  # public unless --private


def test_a_file_named_after_the_colon_obeys_the_trust_rule():
    # owner/name:model.ckpt must not fetch a pickle without --trust-remote-code.
    files = ["model.ckpt", "vae/encoder.pkl", "vae/run.py", "ae.safetensors"]
    assert hub.select_files(files, "model.ckpt") == []
    assert hub.select_files(files, "vae/encoder.pkl") == []
    assert hub.select_files(files, "vae/run.py") == []
    assert hub.select_files(files, "model.ckpt", trust_remote_code=True) == ["model.ckpt"]
    assert hub.select_files(files, "ae.safetensors") == ["ae.safetensors"]


def test_network_failure_during_push_is_one_line(tmp_path, fake_hub, tiny_model, capsys):
    def unreachable(request: httpx2.Request) -> httpx2.Response:
        raise httpx2.ReadError("connection reset by peer", request=request)

    set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(unreachable)))
    out = make_outdir(tmp_path, tiny_model)
    code = run_main("push", str(out), "--repo-id", "me/tuned")
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert len(captured.err.strip().splitlines()) == 1 and "me/tuned" in captured.err
    assert no_token_in(captured.out, captured.err)


def test_dry_run_leaves_the_model_files_as_they_were(tmp_path, tiny_model):
    out = make_outdir(tmp_path, tiny_model)
    model = out / "tuned.safetensors"
    model.chmod(0o600)  # a private file must stay private
    before = model.read_bytes()
    hub.push(out, "me/tuned", dry_run=True, dry_run_dir=tmp_path / "preview")
    assert (model.stat().st_mode & 0o777) == 0o600
    assert model.read_bytes() == before
    # The preview is a copy: editing it cannot reach the tuned model.
    (tmp_path / "preview" / "tuned.safetensors").write_bytes(b"edited")
    assert model.read_bytes() == before


def test_tune_flags_are_the_tune_commands_own():
    """publish.TUNE_FLAGS mirrors `selfconsist tune`'s value-free options (the hub cannot import
    the CLI): every flag of the command, both spellings, and the global ones."""
    from typer.main import get_command

    from selfconsist.cli import GLOBAL_FLAGS, _register, app
    from selfconsist.hub.publish import TUNE_FLAGS

    _register()
    declared = set(GLOBAL_FLAGS) | {"-h", "--help"}
    for p in get_command(app).commands["tune"].params:
        if getattr(p, "is_flag", False) or getattr(p, "count", False):
            declared |= set(p.opts) | set(p.secondary_opts)
    assert set(TUNE_FLAGS) == declared


@pytest.mark.parametrize("command,repo,revision", [
    ("selfconsist tune --gradient-checkpointing off owner/base", "owner/base", None),
    ("selfconsist tune --print-config --enable-tiling --no-sample-noise owner/base --steps 5", "owner/base", None),
    ("selfconsist tune --steps 50 --rho=0.9 owner/base --revision abc", "owner/base", "abc"),
    ("selfconsist tune ./local.safetensors --steps 5", None, None),
])
def test_base_model_read_from_a_recorded_command(command, repo, revision):
    """Checkpoints from before `selfconsist.source` existed name their base only in the recorded
    command: options with a value are skipped with it, flags alone (`publish.TUNE_FLAGS`)."""
    from selfconsist.hub.publish import _base_from_meta

    src = _base_from_meta({"selfconsist.command": command})
    assert (src.repo_id, src.revision) == (repo, revision)
