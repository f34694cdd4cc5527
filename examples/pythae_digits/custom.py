"""The custom adapter of ``examples/custom_adapter.py`` at the defaults, with the v its author
declared (0.05, the v it was trained with) and with v = 1 (an author who left the protocol's
default), each also with ``--obs-var-ratio 0`` (v as declared) and the advice that run gives.

    python examples/pythae_digits/custom.py --out runs/custom

Round trips are tune's own before/after figures (same prior draws before and after).
Writes ``custom.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import custom_adapter  # noqa: E402
from run import advised_options  # noqa: E402

import selfconsist  # noqa: E402
from selfconsist.tune import TuneConfig  # noqa: E402


class UnitVarianceAdapter(custom_adapter.TinyVAEAdapter):
    """The same model, with the protocol's default v = 1 (its author did not set it)."""

    name = "tiny-vae-v1"
    obs_var = 1.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/custom"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    model = custom_adapter.train_tiny()
    lines = ["| adapter v | run | v used | round trip before → after (per pixel) | × | advice |",
             "|---|---|---|---|---|---|"]
    for cls in (custom_adapter.TinyVAEAdapter, UnitVarianceAdapter):
        runs = [("defaults", {}), ("--obs-var-ratio 0", {"obs_var_ratio": 0.0})]
        while runs:
            name, over = runs.pop(0)
            vae = cls(custom_adapter.TinyVAE())
            vae.model.load_state_dict(model.state_dict())
            res = selfconsist.tune(vae, TuneConfig(device="cpu", **over), progress=False, advise=False)
            b, a = (res.before["sample_roundtrip_mse"]["value"], res.after["sample_roundtrip_mse"]["value"])
            lines.append(f"| {cls.obs_var:g} | {name} | {res.obs_var:.3g} | {b:.5f} → {a:.5f} | "
                         f"×{a / b:.3f} | {res.advice or '–'} |")
            print(lines[-1], flush=True)
            if res.advice and "advised" not in name:  # followed once
                opts = advised_options(res.advice)
                runs.insert(0, (f"{name} + advised {opts}", {**over, **opts}))
    (args.out / "custom.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
