# wlidd — every target creates or refreshes the virtualenv it needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv demo test lint pytest bench soak fuzz clean install proto

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: venv
	$(VENV)/bin/wlidd demo $(DEMO_ARGS)

lint: venv
	$(VENV)/bin/ruff check wlidd tests bench fuzz
	$(VENV)/bin/ruff format --check wlidd tests bench fuzz
	$(VENV)/bin/mypy --strict wlidd

pytest: venv
	$(PY) -m pytest $(PYTEST_ARGS)

test: lint pytest

# Every benchmark, then one table of all figures (also written to bench/RESULTS.md).
BENCH_RESULTS ?= $(CURDIR)/.bench-results.jsonl
bench: venv
	rm -f $(BENCH_RESULTS)
	-BENCH_RESULTS_FILE=$(BENCH_RESULTS) $(PY) bench/startup.py
	-BENCH_RESULTS_FILE=$(BENCH_RESULTS) $(PY) bench/idle.py
	-BENCH_RESULTS_FILE=$(BENCH_RESULTS) $(PY) bench/rotation_latency.py
	-BENCH_RESULTS_FILE=$(BENCH_RESULTS) $(PY) bench/sink_publish.py
	-BENCH_RESULTS_FILE=$(BENCH_RESULTS) $(PY) bench/token_serve.py
	-BENCH_RESULTS_FILE=$(BENCH_RESULTS) $(PY) bench/fleet.py
	-BENCH_RESULTS_FILE=$(BENCH_RESULTS) $(PY) bench/mtls_handshake.py
	-BENCH_RESULTS_FILE=$(BENCH_RESULTS) $(PY) bench/workload_api.py --raw
	-BENCH_RESULTS_FILE=$(BENCH_RESULTS) $(PY) bench/workload_api.py
	-$(PY) bench/report.py $(BENCH_RESULTS) --write bench/RESULTS.md

# Compressed soak: 64 clients, 5 s rotations of 10 s SVIDs, STS failing ~30 % (SOAK_SECONDS, default 300),
# then the rotation soak with damaged sets mixed in (pytest -m soak).
soak: venv
	$(PY) bench/soak.py
	$(PY) -m pytest -m soak -s --timeout=0 $(PYTEST_ARGS)

# Long fuzzing: the Hypothesis budgets × FUZZ_SCALE (HTTP input, SVID properties, and the hostile-user
# attacks: connection floods, HTTP/2 frames, random audiences and paths), then atheris for FUZZ_SECONDS.
FUZZ_SCALE   ?= 50
FUZZ_SECONDS ?= 300
fuzz: venv
	FUZZ_SCALE=$(FUZZ_SCALE) $(PY) -m pytest -q --timeout=7200 tests/test_fuzz.py tests/test_svid_properties.py \
		tests/test_fuzz_attacks.py
	mkdir -p .fuzz && cd .fuzz && ../$(PY) ../fuzz/atheris_credentials.py -max_total_time=$(FUZZ_SECONDS) -max_len=8192

clean:
	rm -rf $(VENV) .fuzz .mypy_cache .pytest_cache .ruff_cache *.egg-info

# make install [PREFIX=/opt/wlidd] [DESTDIR=] [SYSCONFDIR=/etc] [UNITDIR=/etc/systemd/system]
# wlidd in its own virtualenv under PREFIX, the systemd units, and the example config (never overwritten).
PREFIX     ?= /opt/wlidd
SYSCONFDIR ?= /etc
UNITDIR    ?= /etc/systemd/system

install:
	$(PYTHON) -m venv $(DESTDIR)$(PREFIX)
	$(DESTDIR)$(PREFIX)/bin/python -m pip install --quiet --upgrade pip
	$(DESTDIR)$(PREFIX)/bin/python -m pip install --quiet .
	# a staged (DESTDIR) venv must name its final location in its scripts
	if [ -n "$(DESTDIR)" ]; then for f in $(DESTDIR)$(PREFIX)/bin/*; do \
		if [ ! -L "$$f" ] && grep -qI "$(DESTDIR)" "$$f"; then sed -i "s|$(DESTDIR)$(PREFIX)|$(PREFIX)|g" "$$f"; fi; \
	done; fi
	install -d -m 0755 $(DESTDIR)$(UNITDIR) $(DESTDIR)$(PREFIX)/share/doc/wlidd $(DESTDIR)$(SYSCONFDIR)/wlidd
	sed "s|/opt/wlidd|$(PREFIX)|g; s|/etc/wlidd/|$(SYSCONFDIR)/wlidd/|g" systemd/wlidd.service > $(DESTDIR)$(UNITDIR)/wlidd.service
	install -m 0644 systemd/wlidd.socket $(DESTDIR)$(UNITDIR)/wlidd.socket
	chmod 0644 $(DESTDIR)$(UNITDIR)/wlidd.service
	install -m 0644 README.md $(DESTDIR)$(PREFIX)/share/doc/wlidd/README.md
	install -m 0644 etc/wlidd.toml $(DESTDIR)$(PREFIX)/share/doc/wlidd/wlidd.toml.example
	install -m 0644 etc/certificate_config.json $(DESTDIR)$(PREFIX)/share/doc/wlidd/certificate_config.json.example
	test -e $(DESTDIR)$(SYSCONFDIR)/wlidd/wlidd.toml || install -m 0644 etc/wlidd.toml $(DESTDIR)$(SYSCONFDIR)/wlidd/wlidd.toml

# Regenerate the checked-in protobuf modules of the SPIFFE Workload API from workload.proto.
proto: venv
	cd wlidd/workload_api && ../../$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. workload.proto
