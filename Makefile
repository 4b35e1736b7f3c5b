# Two commands set everything up on a fresh Debian/Ubuntu machine:  `make demo`  and  `make test`.
# Both are idempotent: the venv is rebuilt only when pyproject.toml or the constraints change.
SHELL      := /bin/bash
VENV       ?= .venv
PY         := $(VENV)/bin/python
PIP        := $(PY) -m pip
EXTRAS     ?= dev
# Debian packages the offline benchmark is built from (tools/make_benchmark.py): fonts and colour emoji
# for rendered images, Fashion-MNIST, Asterisk voice prompts and flite for speech.
APT_PKGS   := fonts-dejavu-core fonts-liberation fonts-noto-core fonts-noto-color-emoji \
              dataset-fashion-mnist asterisk-core-sounds-en-wav flite
STAMP      := $(VENV)/.installed-$(EXTRAS)
export OMP_NUM_THREADS ?= 2
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup sysdeps venv lint format test demo clean

setup: sysdeps venv

sysdeps:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian packages:$$missing"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing) >/dev/null \
	  || { echo "error: apt-get could not install:$$missing" >&2; exit 1; }; \
	else \
	  echo "warning: missing Debian packages:$$missing (run: sudo apt-get install$$missing)" >&2; \
	fi

venv: $(STAMP)

$(STAMP): pyproject.toml constraints-cpu.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=24" -c constraints-cpu.txt
	$(PIP) install -q -c constraints-cpu.txt -e '.[$(EXTRAS)]'
	@$(PY) -c "import torch, sys; v = torch.__version__; print('torch', v); \
	  sys.exit(0 if torch.cuda.is_available() or v.startswith('2.13.0') else 'unexpected torch ' + v)"
	@rm -f $(VENV)/.installed-*; touch $@

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: setup lint
	$(PY) -m pytest -q

# The first end-to-end run: real Fashion-MNIST images from the Debian package -> captioned image
# shards -> tiny Self-Flow trained on the CPU for a few minutes -> a sample grid and a loss curve.
# Rerunning resumes (or, when the run is complete, only re-renders the outputs).
DEMO       ?= outputs/demo
DEMO_STEPS ?= 600
demo: setup
	@test -f $(DEMO)/media/.complete || { $(PY) tools/make_benchmark.py --task class --dataset fashion-mnist \
	  --n 6000 --seed 0 --out $(DEMO)/media --overwrite && touch $(DEMO)/media/.complete; }
	$(PY) tools/make_shards.py --input $(DEMO)/media --output $(DEMO)/shards
	$(PY) training/main.py --config configs/tiny.yaml data.shards=$(DEMO)/shards run.dir=$(DEMO)/run \
	  objective.name=self_flow train.max_steps=$(DEMO_STEPS)
	$(PY) tools/plot_metrics.py $(DEMO)/run --keys loss_gen rep_cos --out $(DEMO)/loss.png
	$(PY) inference/sample_image.py --ckpt $(DEMO)/run --prompts configs/prompts/fashion_mnist.txt \
	  --num 8 --out $(DEMO)/samples.png
	@echo "demo outputs: $(DEMO)/samples.png (samples), $(DEMO)/loss.png (loss curve), $(DEMO)/run (metrics, checkpoints)"

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
