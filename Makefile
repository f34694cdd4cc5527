# Two entry points: `make demo` (the main job on the bundled example) and `make test`.
# Both install into the active Python environment; set PY to pick another interpreter.
PY ?= python3
# This project's machines carry a local CPU build of torch 2.13.0; elsewhere any torch>=2.4 works.
TORCH ?= torch==2.13.0
EXTRAS ?= dev,diffusers,pythae

.PHONY: install demo test test-all lint example colormnist clean

install:
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"

# Tune the bundled digits VAE (committed in examples/) with no data, print before/after.
demo: install
	$(PY) -m selfconsist tune --out runs/demo.selfconsist.safetensors --overwrite

test: install
	$(PY) -m pytest -q -m "not gpu"

lint:
	$(PY) -m ruff check selfconsist tests examples benchmarks

# How examples/digits_mlp_vae.safetensors was made (seconds on a laptop CPU).
example:
	$(PY) -m selfconsist train --model mlp --data digits --objective vae --hidden 96 --depth 3 \
	  --latent-dim 16 --steps 3000 --batch-size 64 --lr 1e-3 --obs-var 0.05 --seed 0 \
	  --out examples/digits_mlp_vae.safetensors --overwrite

# The paper's comparison at small scale (needs the MNIST test-set IDX files).
MNIST ?= ../shared/data/mnist
colormnist:
	$(PY) examples/colormnist/run.py --mnist $(MNIST) --out runs/colormnist

clean:
	rm -rf runs .pytest_cache .ruff_cache
