# Two commands set everything up on a fresh Debian/Ubuntu machine:  `make demo`  and  `make test`.
# Both are idempotent: the venv is rebuilt only when pyproject.toml or the constraints change.
SHELL      := /bin/bash
VENV       ?= .venv
PY         := $(VENV)/bin/python
PIP        := $(PY) -m pip
EXTRAS     ?= dev
# Debian packages the project uses: fonts for text-rendered images, Fashion-MNIST for the demo
# and the class-conditional benchmark (later issues add espeak-ng, tesseract, ...).
APT_PKGS   := fonts-dejavu-core dataset-fashion-mnist
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

# Until the sampling demo exists, the smallest end-to-end path: size the tiny preset, then push a
# synthetic text + video + audio clip through tokenizers -> joint transformer -> back to media.
demo: setup
	$(PY) tools/model_info.py configs/tiny.yaml
	$(PY) tools/smoke_forward.py --config configs/tiny.yaml

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
