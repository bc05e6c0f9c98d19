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
	$(VENV)/bin/ruff check wlidd tests bench fuzz contrib
	$(VENV)/bin/ruff format --check wlidd tests bench fuzz contrib
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
	-BENCH_RESULTS_FILE=$(BENCH_RESULTS) $(PY) bench/sds.py
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
#              [INSTALL_PYTHON=/usr/bin/python3] [ALLOW_HIDDEN_PYTHON=1]
# wlidd in its own virtualenv under PREFIX, the systemd units, and the example config (never overwritten).
# The virtualenv links to its interpreter, so it is built on the system one (PYTHON=... on the command
# line also picks it); one the unit cannot see (ProtectHome= hides /home, /root; PrivateTmp= /tmp) is
# refused unless ALLOW_HIDDEN_PYTHON=1. Nothing installed names DESTDIR or this checkout: scripts and
# pyvenv.cfg name PREFIX, bytecode is compiled for PREFIX (packaging/venv_tool.py, which checks it).
PREFIX     ?= /opt/wlidd
SYSCONFDIR ?= /etc
UNITDIR    ?= /etc/systemd/system
INSTALL_PYTHON ?= $(if $(filter command line,$(origin PYTHON)),$(PYTHON),/usr/bin/python3)
VENV_STAGE  = $(abspath $(DESTDIR)$(PREFIX))

install:
	$(INSTALL_PYTHON) packaging/venv_tool.py check-interpreter --unit systemd/wlidd.service \
		$(if $(ALLOW_HIDDEN_PYTHON),--allow-hidden)
	$(INSTALL_PYTHON) packaging/venv_tool.py prepare $(VENV_STAGE)
	$(INSTALL_PYTHON) -m venv --clear $(VENV_STAGE)
	PYTHONDONTWRITEBYTECODE=1 $(VENV_STAGE)/bin/python -m pip install --quiet --no-compile --upgrade pip
	PYTHONDONTWRITEBYTECODE=1 $(VENV_STAGE)/bin/python -m pip install --quiet --no-compile .
	$(INSTALL_PYTHON) packaging/venv_tool.py finish $(VENV_STAGE) $(PREFIX) --forbid $(CURDIR)
	install -d -m 0755 $(DESTDIR)$(UNITDIR) $(DESTDIR)$(PREFIX)/share/doc/wlidd $(DESTDIR)$(SYSCONFDIR)/wlidd
	sed "s|/opt/wlidd|$(PREFIX)|g; s|/etc/wlidd/|$(SYSCONFDIR)/wlidd/|g" systemd/wlidd.service > $(DESTDIR)$(UNITDIR)/wlidd.service
	install -m 0644 systemd/wlidd.socket $(DESTDIR)$(UNITDIR)/wlidd.socket
	chmod 0644 $(DESTDIR)$(UNITDIR)/wlidd.service
	install -m 0644 README.md $(DESTDIR)$(PREFIX)/share/doc/wlidd/README.md
	install -m 0644 etc/wlidd.toml $(DESTDIR)$(PREFIX)/share/doc/wlidd/wlidd.toml.example
	install -m 0644 etc/certificate_config.json $(DESTDIR)$(PREFIX)/share/doc/wlidd/certificate_config.json.example
	test -e $(DESTDIR)$(SYSCONFDIR)/wlidd/wlidd.toml || install -m 0644 etc/wlidd.toml $(DESTDIR)$(SYSCONFDIR)/wlidd/wlidd.toml

# make deb [DEB_PYTHON=/usr/bin/python3]: build/deb/wlidd_<version>_<arch>.deb, wlidd in its own virtualenv in
# /opt/wlidd (dh-virtualenv, debian/), built on DEB_PYTHON in a clean copy of the sources under DEB_DIR.
# Needs: apt-get install dh-virtualenv debhelper dpkg-dev build-essential python3-venv (and PyPI).
DEB_PYTHON ?= /usr/bin/python3
DEB_DIR    ?= build/deb

.PHONY: deb
deb:
	@for tool in dpkg-buildpackage dpkg-parsechangelog dh dh_virtualenv; do command -v $$tool >/dev/null || { \
		echo "make deb needs $$tool: apt-get install dh-virtualenv debhelper dpkg-dev build-essential python3-venv" >&2; \
		exit 2; }; done
	@version=$$(sed -n 's/^__version__ = "\(.*\)"$$/\1/p' wlidd/__init__.py); \
	project=$$(sed -n 's/^version = "\(.*\)"$$/\1/p' pyproject.toml); \
	changelog=$$(dpkg-parsechangelog -l debian/changelog -S Version); \
	if [ "$$version" != "$$project" ] || [ "$$version" != "$$changelog" ]; then \
		echo "versions differ: wlidd/__init__.py $$version, pyproject.toml $$project, debian/changelog $$changelog;" \
			"add a debian/changelog entry for the new version" >&2; exit 2; fi
	rm -rf $(DEB_DIR) && mkdir -p $(DEB_DIR)/wlidd
	tar -c --exclude=__pycache__ --exclude='*.pyc' pyproject.toml README.md wlidd etc systemd debian packaging \
		| tar -x -C $(DEB_DIR)/wlidd
	cd $(DEB_DIR)/wlidd && WLIDD_DEB_PYTHON=$(DEB_PYTHON) dpkg-buildpackage -b -us -uc
	@ls -l $(DEB_DIR)/*.deb

# Regenerate the checked-in protobuf modules of the SPIFFE Workload API from workload.proto.
proto: venv
	cd wlidd/workload_api && ../../$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. workload.proto

# make image [IMAGE=wlidd:<version>] [CONTAINER=docker|podman] [IMAGE_BUILD_ARGS='--build-arg RUNTIME_IMAGE=…']
# Needs its two base images (debian:bookworm-slim, gcr.io/distroless/python3-debian12:nonroot) or mirrors of
# them, and PyPI for the dependencies. The context is the repository; the allowlist beside the Containerfile
# lets only pyproject.toml, README.md and wlidd/ in (podman reads it through --ignorefile).
IMAGE_VERSION ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE         ?= wlidd:$(IMAGE_VERSION)
CONTAINER     ?= docker

.PHONY: image
image:
	$(CONTAINER) build -f contrib/container/Containerfile -t $(IMAGE) \
		$(if $(findstring podman,$(CONTAINER)),--ignorefile contrib/container/Containerfile.dockerignore) \
		$(IMAGE_BUILD_ARGS) .
