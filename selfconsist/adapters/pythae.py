"""Adapter for `pythae <https://github.com/clementchadebec/benchmark_VAE>`_ model folders.

A pythae model is a folder written by ``model.save(dir)`` (or ``final_model/`` of a
``TrainingPipeline`` run) holding

* ``model_config.json``: the config, whose ``name`` says the model (``"VAEConfig"``, …);
* ``environment.json``: the Python version that wrote it;
* ``model.pt``: ``torch.save({"model_state_dict": …})``, plain tensors;
* ``encoder.pkl`` / ``decoder.pkl`` (and ``discriminator.pkl`` for VAEGAN and
  Adversarial_AE): cloudpickled modules, only when the model uses custom networks.

Mapping to the adapter protocol
-------------------------------
* q(z|x): the encoder's ``embedding`` is the mean μ(x), its ``log_covariance`` the
  log-variance log σ²(x) (pythae samples z = μ + ε·exp(½·log_covariance)).
* g(z): the decoder's ``reconstruction``.
* Prior: N(0, I), the only prior of every supported model.
* Likelihood, from ``model_config.reconstruction_loss``:

  - ``"mse"``: pythae's loss is ``0.5 · Σ (x − g(z))²`` per item (``F.mse_loss(…,
    reduction="none").sum(-1)`` times 0.5). That equals −log N(x; g(z), v·I) up to a
    constant when ‖x − g‖²/(2v) = ½‖x − g‖², i.e. **v = 1**; pythae's own ``get_nll``
    states the same ("decoding distribution is assumed unit variance N(mu, I)"). So
    ``likelihood = "gaussian"``, ``obs_var = 1``. BetaVAE's loss ½‖x − g‖² + β·KL is β
    times that of a plain VAE with v = β, so a BetaVAE gets ``obs_var = β`` (exact). The
    other models' extra weights (capacity, total correlation, MMD, importance weights) are
    not a reweighting of the KL and keep v = 1. v = 1 is a weak likelihood for data in
    [0, 1]: tuning then leans on the consistency term; ``--obs-var`` overrides v.
  - ``"bce"``: ``F.binary_cross_entropy(…).sum(-1)``, the Bernoulli log-likelihood:
    ``likelihood = "bernoulli"``.
  - MSSSIM_VAE (MS-SSIM loss) and VAEGAN (loss on discriminator features) have no
    pixel likelihood; their ``reconstruction_loss`` field (default ``"mse"``) is used as
    a pixel-space surrogate, and :meth:`PythaeVAE.describe` says so.
* ``data_shape`` is ``input_dim``, ``latent_shape`` is ``(latent_dim,)``.
* ``data_range`` is (0, 1): pythae's usual convention (its default decoders end in a
  sigmoid and ``bce`` needs targets in [0, 1]). Pass ``data_range=(lo, hi)`` to
  :class:`PythaeVAE` for models trained on other ranges.

Supported: models whose encoder is a diagonal Gaussian and whose prior is N(0, I)
(:data:`SUPPORTED`). Also Adversarial_AE with ``deterministic_posterior = false``: its
encoder is the same diagonal Gaussian and its aggregate posterior is pushed towards
N(0, I) by the discriminator, so the AVAE objective applies unchanged; with a
deterministic posterior it is refused like the plain AE. Everything else is refused
with the reason (:data:`UNSUPPORTED`).

Security: ``model.pt`` is read with ``torch.load(weights_only=True)``. Default
networks are rebuilt from the config by pythae's own classes, so no code from the
folder runs. Custom networks are pickles; they are unpickled only with
``trust_remote_code=True`` (CLI ``--trust-remote-code``), checked before anything
else in the folder is read beyond the JSON config.

Writing back: :meth:`PythaeVAE.save` writes a folder that
``pythae.models.AutoModel.load_from_folder`` loads: the input's files copied byte for
byte (config, environment, ``decoder.pkl``, …), a new ``model.pt``, a re-pickled
``encoder.pkl`` when the encoder is custom, and ``model.safetensors`` with the same
tensors and selfconsist's metadata in its header.
"""

from __future__ import annotations

import inspect
import io
import json
import re
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import CheckpointError, SelfconsistError, UnsupportedModelError
from ..io import META_PREFIX, read_safetensors_header, save_safetensors
from .base import DiagonalGaussian, VAEAdapter
from .options import LoadOptions

FORMAT = "pythae"
CONFIG_FILE = "model_config.json"
WEIGHTS_FILE = "model.pt"
ENV_FILE = "environment.json"
SAFETENSORS_FILE = "model.safetensors"
INSTALL_HINT = "install it with: pip install 'selfconsist[pythae]'"

#: config name → model class name, for the models selfconsist tunes.
SUPPORTED: dict[str, str] = {
    "VAEConfig": "VAE",
    "BetaVAEConfig": "BetaVAE",
    "DisentangledBetaVAEConfig": "DisentangledBetaVAE",
    "BetaTCVAEConfig": "BetaTCVAE",
    "FactorVAEConfig": "FactorVAE",
    "INFOVAE_MMD_Config": "INFOVAE_MMD",
    "IWAEConfig": "IWAE",
    "MIWAEConfig": "MIWAE",
    "PIWAEConfig": "PIWAE",
    "CIWAEConfig": "CIWAE",
    "MSSSIM_VAEConfig": "MSSSIM_VAE",
    "VAEGANConfig": "VAEGAN",
    "Adversarial_AE_Config": "Adversarial_AE",  # only with deterministic_posterior = false
}

_DETERMINISTIC = "its encoder is deterministic (no posterior variance to make consistent)"
_FLOW = "its posterior is a normalising flow on top of the Gaussian, not a diagonal Gaussian"
_NOT_AE = "it is a density model (normalising flow), not an autoencoder"
#: config name → why selfconsist cannot tune it.
UNSUPPORTED: dict[str, str] = {
    "AEConfig": _DETERMINISTIC,
    "WAE_MMD_Config": _DETERMINISTIC,
    "RAE_L2_Config": _DETERMINISTIC,
    "RAE_GP_Config": _DETERMINISTIC,
    "VQVAEConfig": "its latents are discrete codebook entries, not a Gaussian",
    "VAMPConfig": "its prior is a VampPrior (a mixture of posteriors), not N(0, I)",
    "SVAEConfig": "its posterior is a von Mises-Fisher on the hypersphere, not a Gaussian",
    "PoincareVAEConfig": "its latent space is hyperbolic (Poincaré ball), not Euclidean N(0, I)",
    "VAE_IAF_Config": _FLOW,
    "VAE_LinNF_Config": _FLOW,
    "HVAEConfig": "its posterior is refined by Hamiltonian dynamics, not a diagonal Gaussian",
    "RHVAEConfig": "its posterior is refined by Riemannian Hamiltonian dynamics and its prior "
    "depends on a learned metric",
    "MAFConfig": _NOT_AE,
    "IAFConfig": _NOT_AE,
    "PlanarFlowConfig": _NOT_AE,
    "RadialFlowConfig": _NOT_AE,
    "MADEConfig": _NOT_AE,
    "PixelCNNConfig": _NOT_AE,
}

_SUPPORTED_LIST = ", ".join(v for v in SUPPORTED.values() if v != "Adversarial_AE")
_SUPPORTED_HINT = (f"supported pythae models: {_SUPPORTED_LIST} "
                   "(and Adversarial_AE with a stochastic posterior)")


class TrustRemoteCodeError(CheckpointError):
    """The checkpoint holds pickled code, and the user has not said they trust it."""


# --- reading the folder without running anything --------------------------------------------

def _resolve_folder(path: Path) -> Path | None:
    """The pythae model folder ``path`` names, or None.

    Accepts the folder itself, a ``TrainingPipeline`` run folder (its ``final_model/``),
    or the ``model.safetensors`` selfconsist wrote into such a folder.
    """
    if path.is_file() and path.suffix == ".safetensors":
        try:
            meta = read_safetensors_header(path).get("__metadata__") or {}
        except CheckpointError:
            return None
        return path.parent if meta.get(META_PREFIX + "format") == FORMAT else None
    if not path.is_dir():
        return None
    if (path / CONFIG_FILE).is_file():
        return path
    if (path / "final_model" / CONFIG_FILE).is_file():
        return path / "final_model"
    return None


def read_config(folder: Path) -> dict[str, Any]:
    """``model_config.json`` as a dict (plain JSON: nothing is executed)."""
    file = folder / CONFIG_FILE
    try:
        if file.stat().st_size > 10_000_000:
            raise CheckpointError(f"{file}: too large for a pythae model config")
        cfg = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: cannot read the pythae model config ({e})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("name"), str):
        raise CheckpointError(f"{file}: not a pythae model config (no 'name' entry)")
    return cfg


def check_supported(cfg: Mapping[str, Any], where: Path | str) -> str:
    """The pythae model class name for ``cfg``, or :class:`UnsupportedModelError` saying why."""
    name = cfg["name"]
    if name in UNSUPPORTED:
        model = name.removesuffix("Config").rstrip("_")
        raise UnsupportedModelError(
            f"{where}: pythae {model} cannot be tuned: {UNSUPPORTED[name]}; selfconsist needs a "
            f"diagonal-Gaussian encoder and an N(0, I) prior ({_SUPPORTED_HINT})"
        )
    if name not in SUPPORTED:
        raise CheckpointError(
            f"{where}: unknown pythae model config {name!r}; {_SUPPORTED_HINT}"
        )
    if name == "Adversarial_AE_Config" and cfg.get("deterministic_posterior", False):
        raise UnsupportedModelError(
            f"{where}: pythae Adversarial_AE with deterministic_posterior=true cannot be tuned: "
            f"{_DETERMINISTIC} ({_SUPPORTED_HINT})"
        )
    return SUPPORTED[name]


def mse_obs_var(cfg: Mapping[str, Any]) -> float:
    """Gaussian observation variance v equivalent to pythae's ``mse`` reconstruction loss.

    pythae's per-item loss is ½‖x − g(z)‖² + w·KL. Dividing by w gives
    ‖x − g(z)‖²/(2w) + KL = −log N(x; g(z), w·I) + KL + const, so v = w: v = 1 for the plain
    VAE and every model whose KL weight is 1, v = β for BetaVAE (exact). Models whose extra
    terms are not a reweighting of the KL (capacity, TC, MMD, IWAE bounds) keep v = 1.
    """
    if cfg["name"] == "BetaVAEConfig":
        return float(cfg.get("beta", 1.0))
    return 1.0


def pickled_parts(cfg: Mapping[str, Any]) -> list[str]:
    """The pickle files pythae needs to rebuild this model (custom networks only)."""
    parts = []
    if not cfg.get("uses_default_encoder", True):
        parts.append("encoder.pkl")
    if not cfg.get("uses_default_decoder", True):
        parts.append("decoder.pkl")
    # FactorVAE's discriminator is always rebuilt by pythae; VAEGAN's and AAE's may be custom.
    if cfg["name"] in ("VAEGANConfig", "Adversarial_AE_Config") and not cfg.get(
        "uses_default_discriminator", True
    ):
        parts.append("discriminator.pkl")
    return parts


def _import_pythae() -> Any:
    try:
        import pythae.models
    except ImportError as e:
        raise SelfconsistError(f"loading pythae models needs pythae ({e}); {INSTALL_HINT}") from None
    return pythae.models


def _reason(err: BaseException, n: int = 2) -> str:
    """The first ``n`` informative lines of an exception's message, as one line. Header lines
    ("Error(s) in loading state_dict for VAE:", "1 validation error for VAEConfig") say
    nothing the caller's message does not, so they are skipped."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    body = [ln for ln in lines if not ln.endswith(":") and not re.match(r"\d+ validation errors? for ", ln)]
    text = ": ".join((body or lines or [type(err).__name__])[:n])
    return text if len(text) <= 300 else text[:297] + "..."


def _unpickle(file: Path) -> nn.Module:
    """Unpickle one of pythae's module pickles. Runs code from the file: trusted callers only."""
    from pythae.models.base.base_utils import CPU_Unpickler

    try:
        with open(file, "rb") as fh:
            return CPU_Unpickler(fh).load()
    except Exception as e:  # noqa: BLE001 - any failure here means a bad or foreign pickle
        raise CheckpointError(f"{file}: cannot unpickle ({type(e).__name__}: {e})") from None


def _dump_module(module: nn.Module) -> bytes:
    """Pickle a custom network the way pythae's ``save`` does (cloudpickle, module by value)."""
    import cloudpickle

    owner = inspect.getmodule(module)
    if owner is not None and owner.__name__ in sys.modules:
        try:
            cloudpickle.register_pickle_by_value(owner)
        except ValueError:  # not registrable (e.g. a dynamic module): cloudpickle copes by itself
            pass
    buf = io.BytesIO()
    cloudpickle.dump(module, buf)
    return buf.getvalue()


# --- the adapter -----------------------------------------------------------------------------

class PythaeVAE(VAEAdapter):
    """A pythae VAE (diagonal-Gaussian encoder, N(0, I) prior) seen through the protocol.

    Wrap a model in memory with ``PythaeVAE(model)``, or load a folder with
    ``selfconsist.load(folder)`` / :meth:`load`.
    """

    name = "pythae"
    load_options = frozenset({"data_range"})

    def __init__(self, model: nn.Module, folder: Path | None = None,
                 data_range: tuple[float, float] = (0.0, 1.0)) -> None:
        super().__init__()
        cfg = model.model_config
        cfg_dict = {"name": cfg.name, **{k: v for k, v in cfg.to_dict().items() if k != "name"}}
        self.model_class = check_supported(cfg_dict, type(model).__name__)
        self.model = model
        self.model.eval()  # dropout / batch-norm statistics as trained, unless tune says otherwise
        self.folder = folder
        self._data_range = (float(data_range[0]), float(data_range[1]))
        loss = getattr(cfg, "reconstruction_loss", "mse")
        if loss == "bce":
            self.likelihood = "bernoulli"
        elif loss == "mse":
            self.likelihood, self.obs_var = "gaussian", mse_obs_var(cfg_dict)
        else:
            raise UnsupportedModelError(f"pythae reconstruction_loss {loss!r} is neither mse nor bce")
        self.metadata: dict[str, str] = {}  # selfconsist metadata of an earlier tune, carried on
        self._extra_blob: dict[str, Any] = {}  # other entries of model.pt, written back as read
        self.source.format = FORMAT
        self.source.path = folder
        self._check_outputs()

    # --- discovery ---
    @classmethod
    def sniff(cls, path: Path) -> bool:
        """A folder with a pythae ``model_config.json`` (JSON only: never imports pythae)."""
        folder = _resolve_folder(Path(path))
        if folder is None:  # a missing model.pt is claimed too: load then says it is missing
            return False
        try:
            name = read_config(folder)["name"]
        except CheckpointError:
            # Only pythae writes model_config.json: claim a broken one so that load names it.
            return True
        # Unsupported pythae models are claimed too, so that load says why they are refused.
        return name in SUPPORTED or name in UNSUPPORTED

    @classmethod
    def format_of(cls, path: Path) -> str:
        return FORMAT

    @classmethod
    def load(cls, path: Path, options: LoadOptions | None = None) -> PythaeVAE:
        """Load a pythae folder. ``trust_remote_code=True`` allows unpickling custom networks;
        ``data_range=(lo, hi)`` overrides the (0, 1) default."""
        opts = options or LoadOptions()
        path = Path(path)
        folder = _resolve_folder(path)
        if folder is None:
            raise CheckpointError(f"{path}: not a pythae model folder (no {CONFIG_FILE})")
        cfg = read_config(folder)
        model_class = check_supported(cfg, folder)
        weights = folder / WEIGHTS_FILE
        if not weights.is_file():
            raise CheckpointError(f"{folder}: no {WEIGHTS_FILE} (the weights of a pythae model)")
        # The trust check comes before anything but the JSON config is read.
        pickles = pickled_parts(cfg)
        if pickles and not opts.trust_remote_code:
            raise TrustRemoteCodeError(
                f"{folder}: this pythae model has custom networks stored as pickles "
                f"({', '.join(pickles)}), and unpickling runs code from the folder; if you trust "
                "its source, pass --trust-remote-code (Python: trust_remote_code=True)"
            )
        for p in pickles:
            if not (folder / p).is_file():
                raise CheckpointError(f"{folder}: the config says the model needs {p}, which is missing")

        models = _import_pythae()
        try:
            blob = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure here means a bad weights file
            # torch's own message advises weights_only=False, which is exactly what we refuse.
            why = ("it holds pickled objects other than tensors, or is not a torch file"
                   if "weights only load failed" in str(e).lower() else _reason(e).split(". ")[0])
            raise CheckpointError(f"{weights}: cannot read as plain tensors ({why})") from None
        if not isinstance(blob, dict) or not isinstance(blob.get("model_state_dict"), Mapping):
            raise CheckpointError(f"{weights}: no 'model_state_dict' (not a pythae model.pt)")

        config_cls = getattr(models, cfg["name"])
        try:
            config = config_cls.from_dict({k: v for k, v in cfg.items() if k != "name"})
        except Exception as e:  # noqa: BLE001 - pydantic ValidationError or TypeError
            raise CheckpointError(f"{folder / CONFIG_FILE}: invalid {cfg['name']} ({_reason(e)})") from None

        parts = {p.removesuffix(".pkl"): _unpickle(folder / p) for p in pickles}
        try:
            model = getattr(models, model_class)(config, **parts)
        except Exception as e:  # noqa: BLE001 - e.g. BadInheritanceError for a foreign pickle
            raise CheckpointError(f"{folder}: pythae cannot build {model_class} ({e})") from None
        try:
            model.load_state_dict(blob["model_state_dict"])
        except RuntimeError as e:
            raise CheckpointError(f"{weights}: weights do not match {CONFIG_FILE} ({_reason(e, 1)})") from None

        vae = cls(model, folder=folder, data_range=opts.data_range or (0.0, 1.0))
        vae._extra_blob = {k: v for k, v in blob.items() if k != "model_state_dict"}
        st = folder / SAFETENSORS_FILE
        if st.is_file():
            try:
                meta = read_safetensors_header(st).get("__metadata__") or {}
            except CheckpointError:
                meta = {}
            vae.metadata = {k: v for k, v in meta.items() if k.startswith(META_PREFIX)}
        return vae

    # --- protocol ---
    @property
    def config(self) -> Any:
        return self.model.model_config

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (int(self.config.latent_dim),)

    @property
    def data_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.config.input_dim)

    @property
    def data_range(self) -> tuple[float, float]:
        return self._data_range

    def encode(self, x: Tensor) -> DiagonalGaussian:
        out = self.model.encoder(x)
        return DiagonalGaussian(out["embedding"], out["log_covariance"])

    def decode(self, z: Tensor) -> Tensor:
        # Custom decoders may return flat images; the protocol wants (B, *data_shape).
        return self.model.decoder(z)["reconstruction"].reshape(z.shape[0], *self.data_shape)

    def encoder_modules(self) -> list[nn.Module]:
        return [self.model.encoder]

    def decoder_modules(self) -> list[nn.Module]:
        return [self.model.decoder]

    def _check_outputs(self) -> None:
        """Run the networks once on dummy input so a mismatched custom network fails at load."""
        x = torch.zeros(2, *self.data_shape, device=self.device)
        try:
            with torch.no_grad():
                out = self.model.encoder(x)
                if "embedding" not in out or "log_covariance" not in out:
                    raise UnsupportedModelError(
                        f"pythae {self.model_class}: the encoder returns no 'log_covariance', so "
                        f"it is not a diagonal Gaussian ({_SUPPORTED_HINT})"
                    )
                mean, logvar = out["embedding"], out["log_covariance"]
                want = (2, *self.latent_shape)
                if tuple(mean.shape) != want or tuple(logvar.shape) != want:
                    raise CheckpointError(
                        f"pythae {self.model_class}: the encoder returns shapes "
                        f"{tuple(mean.shape)} / {tuple(logvar.shape)}, expected {want}"
                    )
                rec = self.model.decoder(mean)["reconstruction"]
        except SelfconsistError:
            raise
        except Exception as e:  # noqa: BLE001 - a custom network that does not fit its config
            raise CheckpointError(
                f"pythae {self.model_class}: the networks do not run on input_dim "
                f"{self.data_shape} ({type(e).__name__}: {e})"
            ) from None
        if rec.numel() != 2 * int(torch.tensor(self.data_shape).prod()):
            raise CheckpointError(
                f"pythae {self.model_class}: the decoder returns {tuple(rec.shape)}, which does "
                f"not hold inputs of shape {self.data_shape}"
            )

    # --- writing back ---
    def state_tensors(self) -> dict[str, Tensor]:
        """The model's state dict on the CPU, in pythae's key order."""
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def save(self, path: str | Path, metadata: Mapping[str, str] | None = None) -> None:
        """Write a pythae folder that ``AutoModel.load_from_folder`` loads, plus
        ``model.safetensors`` (same tensors, selfconsist metadata in the header)."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        cfg = self.config
        custom_encoder = not cfg.uses_default_encoder
        written = {WEIGHTS_FILE, SAFETENSORS_FILE} | ({"encoder.pkl"} if custom_encoder else set())
        if self.folder is not None:
            # Config, environment, training config, decoder/discriminator pickles: byte for byte.
            for f in sorted(self.folder.iterdir()):
                if f.is_file() and f.name not in written:
                    shutil.copyfile(f, out / f.name)
            for need in (CONFIG_FILE, *pickled_parts(read_config(out))):
                if need != "encoder.pkl" and not (out / need).is_file():
                    raise SelfconsistError(f"{self.folder / need} disappeared before saving")
        else:  # a model built in memory: write what pythae's own save would
            cfg.save_json(str(out), "model_config")
            (out / ENV_FILE).write_text(json.dumps(
                {"name": "EnvironmentConfig",
                 "python_version": f"{sys.version_info[0]}.{sys.version_info[1]}"}))
            for part in ("decoder", "discriminator"):
                if not getattr(cfg, f"uses_default_{part}", True) and hasattr(self.model, part):
                    (out / f"{part}.pkl").write_bytes(_dump_module(getattr(self.model, part)))
        if custom_encoder:  # the tuned encoder; pythae overrides its weights from model.pt anyway
            enc = self.model.encoder
            device = self.device
            enc.to("cpu")
            try:
                (out / "encoder.pkl").write_bytes(_dump_module(enc))
            finally:
                enc.to(device)

        state = self.state_tensors()
        blob = dict(self._extra_blob)
        blob["model_state_dict"] = state
        torch.save(blob, out / WEIGHTS_FILE)

        meta = dict(self.metadata)
        meta.update(metadata or {})
        meta[META_PREFIX + "format"] = FORMAT
        meta[META_PREFIX + "pythae_model"] = self.model_class
        meta[META_PREFIX + "config"] = (out / CONFIG_FILE).read_text(encoding="utf-8")
        save_safetensors(state, out / SAFETENSORS_FILE, meta)

    def describe(self) -> dict[str, Any]:
        cfg = self.config
        enc = "default MLP" if cfg.uses_default_encoder else "custom (pickled)"
        dec = "default MLP" if cfg.uses_default_decoder else "custom (pickled)"
        loss = getattr(cfg, "reconstruction_loss", "mse")
        lik = (f"gaussian (v={self.obs_var:g}: pythae's mse loss is 0.5·Σ(x−g)² per unit of KL "
               "weight)" if self.likelihood == "gaussian" else "bernoulli (pythae's bce loss)")
        if self.model_class in ("MSSSIM_VAE", "VAEGAN"):
            lik += (f"; surrogate: {self.model_class} is trained on another reconstruction loss, "
                    f"reconstruction_loss={loss!r} picks the pixel likelihood used here")
        return {"architecture": f"pythae {self.model_class}: {enc} encoder, {dec} decoder",
                "likelihood": lik}
