# The README's two commands: `make demo` (the main job) and `make test`.
# Both run the idempotent set-up first.
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test test-unit test-kernel bench bench-tpm lint typecheck clean

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

bench: setup
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
