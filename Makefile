# Two commands do everything from a clean clone (see README):
#   make run    - the main job on the default task (digits)
#   make test   - lint, format check, layer contracts (import-linter) and the test suite (pytest exits 5, a failure, when it
#                 collects no test)
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
# The CPU build of PyTorch; override e.g. TORCH_SPEC="torch" for a CUDA machine.
TORCH_SPEC ?= torch==2.13.0

.PHONY: run test bench lint clean policy policy-curriculum

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

run: $(VENV)/.installed
	$(VENV)/bin/esper grow

test: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -n 2 --dist loadgroup

# The policy shipped in src/esper/tamiyo/trained/digits.safetensors (see bench/RESULTS.md).
policy: $(VENV)/.installed
	rm -rf policies/digits
	$(VENV)/bin/esper train-policy --baseline paired --updates 50 --budget-minutes 58 --out policies/digits
	cp policies/digits/policy.safetensors src/esper/tamiyo/trained/digits.safetensors

# The policy trained on examples/curriculum.toml (wine and iris held out), shipped beside it in
# src/esper/tamiyo/trained/curriculum.safetensors (see bench/RESULTS.md): about 63 minutes here.
policy-curriculum: $(VENV)/.installed
	rm -rf policies/curriculum
	$(VENV)/bin/esper train-policy --config examples/curriculum.toml --baseline paired --updates 50 --budget-minutes 62
	cp policies/curriculum/policy.safetensors src/esper/tamiyo/trained/curriculum.safetensors

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
