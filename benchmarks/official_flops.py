"""How much work the official code's train step does: XLA's count of the compiled step.

Compiles the authors' ``update_step`` (gradient of the negative ELBO and Adam, as
``avae/train.py`` builds it) for the side-by-side model (ColorMNIST MLP 4×200, latent 64,
batch 64, v 0.05, ρ 0.975) and prints, for the VAE and the AVAE, the number of matrix products
(``dot`` instructions) and XLA's FLOP count of the whole step. Compare with the products of
selfconsist's step in ``benchmarks/step_floor.py`` (``products``, ``gflop``): equal FLOPs mean
that the two codes do the same work, and a per-step ratio comes from how fast each runs it.

Runs in the official code's venv, not selfconsist's (it needs jax, dm-haiku and optax; see
``../shared/peer/README.md``):

    PYTHONPATH=../shared/peer /tmp/jaxvenv/bin/python benchmarks/official_flops.py
"""

from __future__ import annotations

import json
import re

import haiku as hk
import jax
import jax.numpy as jnp
import optax
from avae import decoders, encoders, vae


def compiled_step(model: str) -> jax.stages.Compiled:
    """The official update step (train.py's ``update_step``) for ``model`` ("vae"/"avae")."""

    def elbo(x: jnp.ndarray):
        net = vae.VAE(encoders.ColorMnistMLPEncoder(64), decoders.ColorMnistMLPDecoder(0.05), 0.975)
        return (net.vae_elbo if model == "vae" else net.avae_elbo)(x, hk.next_rng_key())

    f = hk.transform(elbo)
    x = jnp.zeros((64, 28, 28, 3), jnp.float32)  # the peer's data layout (NHWC)
    key = jax.random.PRNGKey(0)
    params = f.init(key, x)
    opt_init, opt_update = optax.chain(optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8),
                                       optax.scale(-1e-3))

    def loss(p, k, d):
        return -jnp.mean(f.apply(p, k, d).elbo)

    def step(p, k, d, s):
        updates, s = opt_update(jax.grad(loss)(p, k, d), s, p)
        return optax.apply_updates(p, updates), s

    return jax.jit(step).lower(params, key, x, opt_init(params)).compile()


def main() -> None:
    for model in ("vae", "avae"):
        compiled = compiled_step(model)
        dots = [ln for ln in compiled.as_text().splitlines() if re.search(r"=\s*\S+\s+dot\(", ln)]
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        print(json.dumps({"objective": model, "jax": jax.__version__, "dot_ops": len(dots),
                          "gflop_whole_step": round(cost["flops"] / 1e9, 3)}))


if __name__ == "__main__":
    main()
