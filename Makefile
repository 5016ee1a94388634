# Fresh machine: `make demo` (the main job) and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

$(VENV)/.installed: setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m fastdrag demo --out demo.png

# One thread by default: with two cores shared, torch's OpenMP threads spin against each other (10x slowdowns seen).
# The browser tests (tests/test_ui_browser.py) drive Debian's chromium; install it when missing and root (CI).
CHROMIUM ?= /usr/bin/chromium
browser:
	@test -x $(CHROMIUM) || { if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else echo "make: $(CHROMIUM) missing (sudo apt-get install chromium); the browser tests will skip"; fi; }

test: $(VENV)/.installed browser
	TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q tests

# The web UI on the built-in tiny model (random weights); MODEL=runwayml/stable-diffusion-v1-5 for real edits.
MODEL ?= tiny
ui: $(VENV)/.installed
	$(PY) -m fastdrag ui --model $(MODEL)

bench: $(VENV)/.installed
	$(PY) -m benchmarks.latency

# The suite under the GPU image's versions (constraints-gpu-image.txt), on the CPU; not part of CI (~4 GB).
GPU_IMAGE_PYTHON ?= python3.12
GPU_IMAGE_VENV   ?= .venv-gpu-image
$(GPU_IMAGE_VENV)/.installed: setup.py constraints-gpu-image.txt
	$(GPU_IMAGE_PYTHON) -m venv $(GPU_IMAGE_VENV)
	$(GPU_IMAGE_VENV)/bin/python -m pip install -q --upgrade pip
	$(GPU_IMAGE_VENV)/bin/python -m pip install -q -c constraints-gpu-image.txt -e '.[test]'
	touch $@

test-gpu-image: $(GPU_IMAGE_VENV)/.installed browser
	TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(GPU_IMAGE_VENV)/bin/python -m pytest -q tests

.PHONY: install demo test bench test-gpu-image ui browser
