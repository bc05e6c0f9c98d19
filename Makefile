# wlidd — every target creates or refreshes the virtualenv it needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv demo test lint pytest bench soak clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: venv
	$(VENV)/bin/wlidd demo $(DEMO_ARGS)

lint: venv
	$(VENV)/bin/ruff check wlidd tests bench
	$(VENV)/bin/ruff format --check wlidd tests bench
	$(VENV)/bin/mypy --strict wlidd

pytest: venv
	$(PY) -m pytest $(PYTEST_ARGS)

test: lint pytest

bench: venv
	-$(PY) bench/rotation_latency.py
	-$(PY) bench/token_serve.py
	-$(PY) bench/fleet.py
	-$(PY) bench/mtls_handshake.py

soak: venv
	$(PY) -m pytest -m soak -s $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache *.egg-info
