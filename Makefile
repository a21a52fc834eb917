# `make demo` and `make test` each create .venv and install everything on a fresh machine.
# CUDA users: make demo TORCH_SPEC="torch==2.13.0" TORCH_PIP_ARGS="--index-url <your CUDA wheel index>"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
DEMO_OUT ?= demo-out
PYTEST_ARGS ?=
# test reference for the FID InceptionV3 (tests/evaluation/test_inception.py); installed with --no-deps
# because its requirements pull torchvision, which synthmed does not use
TORCH_FIDELITY_SPEC ?= torch-fidelity==0.4.0
# test reference for LPIPS (tests/evaluation/test_lpips.py), and the source of its linear-head weights;
# --no-deps for the same reason (the test stands in for torchvision)
LPIPS_SPEC ?= lpips==0.1.4
STAMP := $(VENV)/.synthmed-installed

.PHONY: demo demo-quick test test-e2e test-slow clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(VENV)/bin/python -m pip install -q -e ".[test]"
	$(VENV)/bin/python -m pip install -q --no-deps "$(TORCH_FIDELITY_SPEC)"
	$(VENV)/bin/python -m pip install -q --no-deps "$(LPIPS_SPEC)"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/synthmed demo --out $(DEMO_OUT)

demo-quick: $(STAMP)
	$(VENV)/bin/synthmed demo --quick --out $(DEMO_OUT)-quick

# test: everything but the e2e marker (experiment --quick studies, the second quick demo, benchmark smoke runs);
# test-e2e: those; test-slow: the whole suite, the tests marked slow included. CI (.ci/run) runs test, then test-e2e.
# pytest exits 5 when it selects no test (PYTEST_ARGS naming files without e2e tests, say): test-e2e says so and passes.
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "not e2e" $(PYTEST_ARGS)

test-e2e: $(STAMP)
	rc=0; $(VENV)/bin/python -m pytest -q -m e2e $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "test-e2e: no test selected (pytest exit 5), nothing to run"; rc=0; fi; exit $$rc

test-slow: $(STAMP)
	$(VENV)/bin/python -m pytest -q --runslow $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(DEMO_OUT) $(DEMO_OUT)-quick
