# The README's two commands: `make demo` (the main job) and `make test`.
# Both run the idempotent set-up first.
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test test-unit test-kernel test-hardening bench bench-datapath bench-tpm lint typecheck clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/bin/ztnet demo

test: setup
	$(PY) -m pytest tests -q $(PYTEST_ARGS)

test-unit: setup
	$(PY) -m pytest tests/unit -q $(PYTEST_ARGS)

test-kernel: setup
	$(PY) -m pytest tests/kernel -q $(PYTEST_ARGS)

# The hardening suite with its figures (faults survived, escape attempts, inputs fuzzed,
# packets leaked, records lost): >= 100,000 generated inputs, every fault, the 200-stream
# soak. `make test` runs the same tests with a small example count and no soak.
HARDENING_EXAMPLES ?= 16000
HARDENING_TESTS := tests/hardening tests/kernel/test_enforcement.py tests/kernel/test_flows.py tests/kernel/test_flow_upload.py \
	tests/kernel/test_controller_e2e.py $(wildcard tests/kernel/test_hostile_agents.py)
test-hardening: setup
	HARDENING_EXAMPLES=$(HARDENING_EXAMPLES) HARDENING_SOAK=1 HARDENING_FULL=1 \
		$(PY) -m pytest $(HARDENING_TESTS) -q -p no:cacheprovider $(PYTEST_ARGS)

# The head-to-head benchmark users read (20-30 min): writes every sample, the plot and the
# generated section of docs/performance.md. `make test` runs its --smoke mode.
bench: setup
	$(PY) -m benchmarks.headtohead --out docs/perf/headtohead.json \
		--plot docs/perf/headtohead.png --doc docs/performance.md

bench-datapath: setup
	$(PY) -m benchmarks.datapath

# TPM-bound enrollment and renewal against swtpm (docs/controller.md, "TPM-bound hosts")
bench-tpm: setup
	$(PY) -m benchmarks.tpm

lint: setup
	$(VENV)/bin/ruff check ztnet tests benchmarks
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache

# ztnet across real VMs (root; minutes): builds or reuses the offline box, brings up the
# Vagrant topology, runs the end-to-end checks, destroys the VMs. See vagrant/README.md.
.PHONY: test-vagrant
test-vagrant:
	bash vagrant/run-e2e.sh
