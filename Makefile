# The two commands (see README.md):
#   make run    the whole plane on this machine (NODES=2: two nodes, each with its own underlay)
#   make test   the test suite
# Both install whatever is missing first, idempotently: Debian packages, the
# venv, buf, and the generated API.

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
BUF := .tools/node_modules/.bin/buf
BUF_VERSION := 1.75.0
# The web console's libraries (gateway/webui.py serves them), pinned; the stamp names the versions.
UI_LIBS := @xterm/xterm@6.0.0 @novnc/novnc@1.7.0
UI_LIBS_STAMP := .tools/node_modules/.ui-libs-$(subst /,_,$(subst @,,$(subst $(eval) ,-,$(UI_LIBS))))
PROTOS := $(shell find protos third_party -name '*.proto') buf.yaml
STATE_DIR ?= ./.sf-state
GRPC_PORT ?= 13001
REST_PORT ?= 13000
NODES ?= 1
PYTEST_ARGS ?=
GUEST_DIR ?= build/guest
GUEST_SRC := $(shell find guest/build-image.sh guest/efi.sh guest/syslinux.cfg guest/grub.cfg guest/initramfs guest/agent)

.PHONY: run test deps gen schema-check guest-image debian-image clean

run: deps gen guest-image
	$(VENV)/bin/sf-up --state-dir $(STATE_DIR) --grpc-port $(GRPC_PORT) --rest-port $(REST_PORT) --nodes $(NODES)

test: deps gen schema-check guest-image debian-image
	$(PY) -m pytest $(PYTEST_ARGS)

deps: .stamps/system .stamps/venv .stamps/sfclient .stamps/sfagent $(BUF) $(UI_LIBS_STAMP)

.stamps/system: tools/install-system.sh
	bash tools/install-system.sh
	@mkdir -p .stamps && touch $@

# The generated package must exist before the editable install maps it.
.stamps/venv: pyproject.toml .stamps/system
	test -x $(PY) || python3 -m venv $(VENV)
	mkdir -p shakenfist && touch shakenfist/__init__.py
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	@mkdir -p .stamps && touch $@

# The real sf-client 0.8.3, in a venv of its own: it is what users run, and its
# dependencies must not mix with ours.
.stamps/sfclient: .stamps/system
	test -x .venv-sfclient/bin/python || python3 -m venv .venv-sfclient
	.venv-sfclient/bin/pip install -q --disable-pip-version-check shakenfist-client==0.8.3
	@mkdir -p .stamps && touch $@

# The real shakenfist-agent 1.0.1 (it needs protobuf < 6): the compatibility
# test runs its message handler against our host side.
.stamps/sfagent: .stamps/system
	test -x .venv-sfagent/bin/python || python3 -m venv .venv-sfagent
	.venv-sfagent/bin/pip install -q --disable-pip-version-check shakenfist-agent==1.0.1
	@mkdir -p .stamps && touch $@

$(BUF): .stamps/system
	npm install --prefix .tools --no-audit --no-fund --loglevel=error @bufbuild/buf@$(BUF_VERSION)
	test -x $(BUF) && touch $(BUF)

$(UI_LIBS_STAMP): $(BUF)
	npm install --prefix .tools --no-audit --no-fund --loglevel=error $(UI_LIBS)
	touch $@

gen: shakenfist/descriptors.binpb

shakenfist/descriptors.binpb: $(PROTOS) tools/gen.py .stamps/venv
	$(PY) tools/gen.py

# The test guest: a BIOS-bootable disk with a Debian cloud kernel and busybox
# (guest/README.md). build-image.sh checks freshness per step, so a rerun is cheap.
guest-image: $(GUEST_DIR)/sftest.qcow2

$(GUEST_DIR)/sftest.qcow2: $(GUEST_SRC) .stamps/system
	bash guest/build-image.sh $(GUEST_DIR)

# The real distribution guest: Debian 12 with cloud-init and shakenfist-agent 0.7.0
# (guest/debian/build-debian.sh, about 90 s cold; content-addressed, so a rerun is free).
debian-image: $(GUEST_DIR)/debian-sftest.qcow2

$(GUEST_DIR)/debian-sftest.qcow2: guest/debian/build-debian.sh guest/efi.sh $(shell find guest/debian/files -type f) .stamps/system
	bash guest/debian/build-debian.sh $(GUEST_DIR)

schema-check: $(BUF)
	BUF=$(BUF) bash tools/check-schema.sh

clean:
	rm -rf shakenfist .stamps build

# Benchmarks (bench/README.md): ratios against baselines measured in the same run.
# Not part of the test suite. BENCH_ARGS='--quick' for a smoke run, '--only P1,P3' for some.
BENCH_ARGS ?=
.PHONY: bench
bench: deps gen guest-image
	$(PY) bench/run.py $(BENCH_ARGS)
