"""Model cards for pushed models: render selfconsist's section, merge it into an existing card.

A card is ``---`` YAML front matter ``---`` followed by markdown. selfconsist owns only
the text between :data:`START` and :data:`END`; everything else the user wrote is kept
byte for byte. Front matter is merged key by key: the user's scalar values win, lists
(``tags``) are united, and keys we know and the card lacks are added; our ``model-index``
entry (huggingface_hub's :class:`~huggingface_hub.EvalResult` format) replaces the one
of the same name, as its numbers are from this push.

huggingface_hub's card classes build the ``model-index`` (:class:`ModelCardData`) and read
a repo's card (:func:`huggingface_hub.metadata_load`). Splitting and re-joining the text
stays hand-written here: ``ModelCard`` re-serialises the whole front matter, which would
lose the user's comments, key order and formatting, and it silently drops a
``model-index`` it cannot parse.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .report import render_table

START = "<!-- selfconsist:start -->"
END = "<!-- selfconsist:end -->"
TAGS = ["selfconsist", "vae", "self-consistency", "avae"]
PAPER = "https://arxiv.org/abs/2012.03715"

_FRONT = re.compile(r"\A---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|\Z)", re.DOTALL)


# ------------------------------------------------------------------------------------------
# front matter
# ------------------------------------------------------------------------------------------
def split_front_matter(text: str) -> tuple[dict[str, Any], str, str | None]:
    """(front matter as a dict, the body, the raw front-matter block or None)."""
    import yaml

    m = _FRONT.match(text)
    if not m:
        return {}, text, None
    try:
        front = yaml.safe_load(m.group(1)) or {}
    except yaml.YAMLError:
        front = {}
    if not isinstance(front, dict):
        front = {}
    return front, text[m.end():], m.group(0)


def merge_front_matter(existing: dict[str, Any], ours: dict[str, Any]) -> dict[str, Any]:
    """Existing keys keep their values (lists gain our new items); missing keys are added."""
    merged = dict(existing)
    for key, value in ours.items():
        if value is None or value == [] or value == "":
            continue
        if key == "model-index" and isinstance(value, list):
            mine = {e.get("name") for e in value if isinstance(e, dict)}
            kept = [e for e in (existing.get(key) or []) if not (isinstance(e, dict)
                                                                  and e.get("name") in mine)]
            merged[key] = kept + value
            continue
        old = merged.get(key)
        if old is None:
            merged[key] = value
        elif isinstance(old, list) and isinstance(value, list):
            merged[key] = old + [v for v in value if v not in old]
        elif isinstance(old, str) and isinstance(value, list):  # `tags: vae` → a list
            merged[key] = [old] + [v for v in value if v != old]
    return merged


def _dump(front: dict[str, Any]) -> str:
    from huggingface_hub.utils import yaml_dump  # the YAML flavour the Hub's own cards use

    return "---\n" + yaml_dump(front, sort_keys=False).rstrip("\n") + "\n---\n"


def replace_section(body: str, section: str) -> str:
    """``body`` with the text between the markers replaced by ``section`` (which carries its
    own markers); without markers, ``section`` is appended after the user's text."""
    section = section.strip("\n")
    start, end = body.find(START), body.find(END)
    if start != -1 and end > start:
        return body[:start] + section + body[end + len(END):]
    if not body.strip():
        return section + "\n"
    return body.rstrip("\n") + "\n\n" + section + "\n"


def update_card(existing: str | None, section: str, front: dict[str, Any]) -> str:
    """The new README: ``existing`` (or nothing) with our section and front matter merged in."""
    old_front, body, raw = split_front_matter(existing or "")
    merged = merge_front_matter(old_front, front)
    # An unchanged front matter is kept verbatim (comments and formatting included).
    head = raw if raw is not None and merged == old_front else _dump(merged)
    if not head.endswith("\n"):
        head += "\n"
    body = replace_section(body, section)
    return head + ("" if body.startswith("\n") or raw is not None else "\n") + body


# ------------------------------------------------------------------------------------------
# what the card says
# ------------------------------------------------------------------------------------------
@dataclass
class CardInfo:
    repo_id: str
    model_files: list[str] = field(default_factory=list)
    model_kind: str = "builtin"  # builtin | diffusers | ldm-single-file | pythae | safetensors | folder
    base_model: str | None = None
    base_revision: str | None = None
    license: str | None = None
    license_given: bool = False  # True: chosen with --license; False: the base model's
    license_extra: dict[str, Any] = field(default_factory=dict)
    eval_metrics: dict[str, Any] | None = None  # selfconsist eval's metrics.json
    figures: list[str] = field(default_factory=list)  # repo paths
    checkpoint_metrics: Any = None  # {"before": …, "after": …} from the tuned file's header
    tune_config: Any = None
    command: str | None = None
    version: str | None = None
    input_sha256: str | None = None
    diffusers_class: str | None = None


#: The card kind of each (adapter name, ``source.format``) the registry reports; anything
#: else gets the generic card of a file or folder.
CARD_KINDS = {
    ("builtin", "builtin"): "builtin",
    ("pythae", "pythae"): "pythae",
    ("diffusers", "diffusers-folder"): "diffusers",
    ("diffusers", "single-file"): "ldm-single-file",
}


def model_kind(model: Path, meta: dict[str, str] | None = None) -> str:
    """What kind of checkpoint ``model`` is, for the loading instructions.

    Asked of the adapter registry (the adapter that would load it and the format it would
    report), so the card and ``selfconsist.load`` never disagree on what a file is. ``meta``
    is unused and kept for callers that pass the header they read.
    """
    from .adapters import detect
    from .errors import SelfconsistError

    try:
        cls = detect(model)
        kind = CARD_KINDS.get((cls.name, cls.format_of(model)))
    except SelfconsistError:
        kind = None
    return kind or ("safetensors" if model.is_file() else "folder")


def diffusers_class(model: Path) -> str | None:
    """``_class_name`` of a diffusers folder's config.json (e.g. AutoencoderKL)."""
    cfg = model / "config.json" if model.is_dir() else None
    if cfg is None or not cfg.is_file():
        return None
    try:
        name = json.loads(cfg.read_text()).get("_class_name")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return name if isinstance(name, str) and name.isidentifier() else None


def front_matter(info: CardInfo) -> dict[str, Any]:
    """The keys selfconsist contributes to the card's YAML front matter."""
    # library_name decides the Hub's "use this model" snippet: a diffusers folder loads with
    # diffusers itself, anything else through selfconsist.
    library = "diffusers" if info.model_kind == "diffusers" else "selfconsist"
    front: dict[str, Any] = {"library_name": library, "tags": list(TAGS)}
    if info.model_kind == "diffusers":
        front["tags"].append("diffusers")
    if info.base_model:
        front["base_model"] = info.base_model
        front["base_model_relation"] = "finetune"
    if info.license:
        front["license"] = info.license
        front.update({k: v for k, v in info.license_extra.items() if v})
    results = eval_results(info)
    if results:
        from huggingface_hub import ModelCardData

        name = info.repo_id.split("/", 1)[-1]
        front["model-index"] = ModelCardData(model_name=name, eval_results=results).to_dict()["model-index"]
    return front


def _dataset(metrics: dict[str, Any]) -> str:
    """A short dataset name for ``model-index``: the data spec's kind (``digits``, ``mnist``),
    never a local path; ``prior-samples`` for a data-free run."""
    data = metrics.get("data") if isinstance(metrics, dict) else None
    spec = str((data or {}).get("spec") or "") if isinstance(data, dict) else ""
    if not spec:
        return "prior-samples"
    kind = spec.split(":", 1)[0]  # "mnist:PATH" → mnist; a file or folder spec → custom
    return kind if kind.isidentifier() else "custom"


def eval_results(info: CardInfo) -> list[Any]:
    """The pushed model's numbers from the eval run as huggingface_hub ``EvalResult``s (the
    ``tuned`` column, else the last model in metrics.json); empty without an eval run."""
    from huggingface_hub import EvalResult

    m = info.eval_metrics
    models = m.get("models") if isinstance(m, dict) else None
    if not isinstance(models, dict) or not models:
        return []
    col = models.get("tuned") if "tuned" in models else list(models.values())[-1]
    dataset = _dataset(m)
    out = []
    for metric, entry in (col or {}).items():
        value = entry.get("value") if isinstance(entry, dict) else entry
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
            out.append(EvalResult(task_type="image-feature-extraction", task_name="VAE self-consistency",
                                  dataset_type=dataset, dataset_name=dataset, metric_type=metric,
                                  metric_value=float(value)))
    return out


def _fmt(entry: Any) -> str:
    if isinstance(entry, dict) and "value" in entry:
        v, s = entry.get("value"), entry.get("stderr")
        if isinstance(v, (int, float)):
            return f"{v:.4g} ± {s:.2g}" if isinstance(s, (int, float)) else f"{v:.4g}"
        return str(v)
    if isinstance(entry, float):
        return f"{entry:.4g}"
    return "–" if entry is None else str(entry)


def metrics_table(columns: dict[str, dict[str, Any]]) -> str:
    """A markdown table, one row per metric and one column per model (``value ± stderr``).

    ``columns`` maps a model name to ``{metric: {"value", "stderr"}}``; this is the
    ``models`` part of ``selfconsist eval``'s metrics.json.
    """
    names = list(columns)
    metrics: list[str] = []
    for cols in columns.values():
        metrics += [k for k in cols if k not in metrics]
    lines = ["| metric | " + " | ".join(names) + " |",
             "|---|" + "---:|" * len(names)]
    for m in metrics:
        lines.append(f"| {m} | " + " | ".join(_fmt(columns[n].get(m)) for n in names) + " |")
    return "\n".join(lines)


def _eval_table(metrics: dict[str, Any]) -> str:
    """The eval run's table: the one report.md shows (:func:`selfconsist.report.render_table`)."""
    models = metrics.get("models") if isinstance(metrics, dict) else None
    if not isinstance(models, dict) or not models:
        return "_metrics.json holds no models_"
    try:
        return render_table(metrics).strip()
    except (KeyError, TypeError, AttributeError, ValueError):
        return metrics_table(models)  # a metrics.json from another version: the plain table


#: The real-image figures a latent-diffusion user reads first, in the card's order.
REAL_IMAGE_ROWS = (
    ("image_psnr", "single-pass PSNR (dB), per-image mean"),
    ("image_ssim", "single-pass SSIM, per-image mean"),
    ("cycle_psnr@", "PSNR (dB) after {k} encode → decode cycles, vs the original"),
    ("cycle_db_lost", "dB lost from cycle 1 to cycle {k}"),
    ("latent_shift", "latent shift of real images (base-latent std units)"),
    ("latent_decode_psnr", "PSNR (dB) of g(μ_tuned(x)) vs g(μ_base(x))"),
)


def real_image_section(metrics: Any) -> list[str]:
    """Markdown lines on real images (selfconsist eval with image data): single-pass quality,
    cycle degradation at the largest K, the latent shift against the base model and eval's
    warnings; empty when the eval run measured none of them."""
    models = metrics.get("models") if isinstance(metrics, dict) else None
    if not isinstance(models, dict) or not models:
        return []
    names = list(models)
    keys = [k for m in models.values() if isinstance(m, dict) for k in m]
    ks = [int(k.split("@", 1)[1]) for k in keys
          if k.startswith("cycle_psnr@") and k.split("@", 1)[1].isdigit()]
    if not ks:
        return []
    k = max(ks)
    rows = []
    for key, label in REAL_IMAGE_ROWS:
        key = f"{key}{k}" if key.endswith("@") else key
        if any(isinstance(models[n], dict) and key in models[n] for n in names):
            rows.append(f"| {label.format(k=k)} | "
                        + " | ".join(_fmt(models[n].get(key)) if isinstance(models[n], dict)
                                     else "–" for n in names) + " |")
    out = ["### Real images", "",
           "Measured on held-out real images: each image goes through encode → decode "
           f"{k} times (x_k = g(μ(x_(k−1))), clipped), and every PSNR is against the original "
           "image, averaged per image (± one standard error). The latent shift says how far the "
           "encoder moved the latents a diffusion model trained on the base VAE expects.", "",
           "| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names), *rows, ""]
    for w in metrics.get("warnings") or []:
        out += [f"> **Warning:** {w}", ""]
    return out


def _load_snippet(info: CardInfo) -> str:
    rid = info.repo_id
    if info.model_kind == "diffusers":
        cls = info.diffusers_class or "AutoencoderKL"
        return (f"```python\nfrom diffusers import {cls}\n\nvae = {cls}.from_pretrained(\"{rid}\")\n```\n\n"
                "It is a drop-in replacement for the base model's autoencoder (same decoder, "
                "same config).")
    if info.model_kind == "ldm-single-file" and info.model_files:
        fname = next((f for f in info.model_files if f.endswith(".safetensors")), info.model_files[0])
        return ("```python\nfrom diffusers import AutoencoderKL\nfrom huggingface_hub import "
                f"hf_hub_download\n\nvae = AutoencoderKL.from_single_file(hf_hub_download(\"{rid}\", "
                f"\"{fname}\"))\n```\n\n"
                "A single file in the layout of the file it was tuned from (same key names, "
                "dtypes and decoder), so it replaces that file wherever it was used: ComfyUI and "
                "A1111 load it from their VAE folder. For an SDXL, SD3 or FLUX VAE, give diffusers "
                "the base pipeline's config (`config=\"<pipeline repo>\", subfolder=\"vae\"`) so "
                "that the latent scaling factor is the right one.")
    if info.model_kind == "pythae":
        return (f"```python\nfrom pythae.models import AutoModel\n\n"
                f"model = AutoModel.load_from_hf_hub(\"{rid}\")\n```\n\n"
                "pythae unpickles the architecture of custom models: load only repos you trust.")
    if info.model_kind in ("builtin", "safetensors") and info.model_files:
        fname = next((f for f in info.model_files if f.endswith(".safetensors")), info.model_files[0])
        return ("```python\nfrom huggingface_hub import hf_hub_download\nimport selfconsist\n\n"
                f"vae = selfconsist.load(hf_hub_download(\"{rid}\", \"{fname}\"))\n"
                "q = vae.encode(x)        # q.mean, q.logvar\nx_hat = vae.decode(q.mean)\n```")
    return f"```bash\nselfconsist info {rid}\n```"


def render_section(info: CardInfo) -> str:
    """selfconsist's part of the card, between the markers."""
    title = info.repo_id.split("/", 1)[1]
    base = (f"[{info.base_model}](https://huggingface.co/{info.base_model})" if info.base_model
            else "a pretrained VAE")
    if info.base_model and info.base_revision:
        base += f" (revision `{info.base_revision[:12]}`)"
    out = [START, f"# {title}", "",
           f"This is {base} with its **encoder fine-tuned for self-consistency** by "
           "selfconsist, post hoc and without data: "
           f"the AVAE objective ([Cemgil et al., 2020]({PAPER})) on the model's own samples. "
           "The decoder is unchanged, bit for bit; the encoder is trained so that re-encoding "
           "a decoded latent lands close to where it started (the paper reports that this "
           "also makes encoders more robust to small input perturbations; the evaluation "
           "below measures it for this model).", ""]
    if info.license and info.license_given:
        out += [f"License: `{info.license}`, as chosen by the uploader.", ""]
    elif info.license:
        out += [f"License: `{info.license}`, carried over from the base model.", ""]

    out += ["## Evaluation", ""]
    figures = list(info.figures)
    if info.eval_metrics is not None:
        real = real_image_section(info.eval_metrics)
        if real:
            out += real
            cycles = [f for f in figures if Path(f).name == "cycles.png"]
            for fig in cycles:
                out += [f"![cycles]({fig})", ""]
                figures.remove(fig)
            out += ["### All metrics", ""]
        out += [_eval_table(info.eval_metrics), ""]
        cfg = info.eval_metrics.get("config") if isinstance(info.eval_metrics, dict) else None
        if cfg:
            out += ["<details><summary>evaluation settings</summary>", "", "```json",
                    json.dumps(cfg, indent=2, sort_keys=True, default=str), "```", "", "</details>",
                    ""]
        out += ["Full report: [eval/report.md](eval/report.md); numbers: "
                "[eval/metrics.json](eval/metrics.json).", ""]
    elif isinstance(info.checkpoint_metrics, dict) and {"before", "after"} <= set(info.checkpoint_metrics):
        out += ["Data-free metrics on prior samples, recorded by the tuning run "
                "(no `selfconsist eval` run was pushed):", "",
                metrics_table({"before": info.checkpoint_metrics["before"],
                               "after": info.checkpoint_metrics["after"]}), ""]
    else:
        out += ["No evaluation was pushed with this model; run `selfconsist eval` to measure it.", ""]
    for fig in figures:
        out += [f"![{Path(fig).stem}]({fig})", ""]

    out += ["## How it was made", ""]
    if info.command:
        out += ["```bash", info.command, "```", ""]
    if info.tune_config:
        out += ["<details><summary>tuning settings</summary>", "", "```json",
                json.dumps(info.tune_config, indent=2, sort_keys=True, default=str), "```", "",
                "</details>", ""]
    facts = []
    if info.version:
        facts.append(f"selfconsist {info.version}")
    if info.input_sha256:
        facts.append(f"input SHA-256 `{info.input_sha256}`")
    if facts:
        out += ["Made with " + "; ".join(facts) + ".", ""]
    if not (info.command or info.tune_config or facts):
        out += ["The checkpoint carries no tuning record.", ""]

    out += ["## How to load", "", _load_snippet(info), "",
            "Or with selfconsist's command line:", "",
            f"```bash\nselfconsist info {info.repo_id}\n"
            f"selfconsist eval {info.base_model or 'BASE_MODEL'} --compare {info.repo_id} --out eval/\n```",
            "", END]
    return "\n".join(out)
