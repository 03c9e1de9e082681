# tailpy: every target sets up what it needs on a fresh Debian machine (root), then runs.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
APT_PACKAGES := iproute2 iputils-ping nftables conntrack iperf3 wireguard-go wireguard-tools procps postgresql ethtool \
	stun-client bind9-dnsutils dnsmasq-base dnsperf chromium chromium-driver
export PATH := $(HOME)/.cargo/bin:$(PATH)

.PHONY: all deps venv build wheel demo test test-rust test-py bench lint fmt clean

all: build

# System packages, only when one is missing (apt-get update first, as Debian needs).
deps:
	@missing=""; \
	for c in ip:iproute2 ping:iputils-ping nft:nftables conntrack:conntrack iperf3:iperf3 wireguard-go:wireguard-go wg:wireguard-tools pgrep:procps pg_lsclusters:postgresql ethtool:ethtool \
	  stun:stun-client dig:bind9-dnsutils dnsmasq:dnsmasq-base dnsperf:dnsperf chromium:chromium chromedriver:chromium-driver; do \
	  command -v $${c%%:*} >/dev/null 2>&1 || missing="$$missing $${c##*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@command -v cargo >/dev/null || { echo "cargo (Rust) is needed: install it with rustup"; exit 1; }

# The virtualenv with the pinned tools and dependencies (PostgreSQL's psycopg, the tailpy[postgres] extra,
# included): redone only when the pins change.
$(VENV)/.installed: requirements-dev.lock
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements-dev.lock
	touch $@

venv: $(VENV)/.installed

RUST_SOURCES := Cargo.toml Cargo.lock $(shell find rust -name '*.rs' -o -name Cargo.toml)

# Builds the Rust extension into the venv (editable install of the Python package, with the postgres
# extra), when a Rust source, pyproject.toml or the pins changed since the last build. Python sources need
# no rebuild: the install is editable.
$(VENV)/.built: $(VENV)/.installed pyproject.toml $(RUST_SOURCES)
	VIRTUAL_ENV=$(abspath $(VENV)) PIP_QUIET=1 $(VENV)/bin/maturin develop --release -q --extras postgres
	touch $@

build: deps venv $(VENV)/.built

# An abi3 wheel in dist/ (what cibuildwheel builds per platform; see [tool.cibuildwheel]).
wheel: venv
	$(VENV)/bin/maturin build --release --out dist

demo: build
	$(VENV)/bin/tailpy demo

test-rust: deps
	cargo test --workspace --release -q

# Tests run in parallel on PYTEST_WORKERS pytest-xdist workers: twice the cores, at least 4 (lab tests wait
# on timers much of the time, so more workers than cores pays; many more starve each other of CPU on a
# small machine). Tests of one xdist_group share a worker. PYTEST_WORKERS=0 runs them serially.
PYTEST_WORKERS ?= $(shell n=$$(nproc); echo $$(( n * 2 > 4 ? n * 2 : 4 )))
test-py: build
	$(VENV)/bin/pytest -q -n $(PYTEST_WORKERS) --dist loadgroup

test: test-rust test-py

# Every benchmark, full length (each one's --smoke runs in `make test`). A benchmark that cannot run on
# this machine (a peer tool missing) exits 77 with the reason: reported, not a failure. First,
# throughput.py --build-tools builds its pinned peers (newest wireguard-go, boringtun-cli) once into
# $TAILPY_BENCH_CACHE (default ~/.cache/tailpy/bench-tools); without Go or cargo, that row is skipped
# with the reason.
BENCHMARKS := throughput derp_relay connect_time magicdns embedded policy_compile
bench: build
	$(PY) benchmarks/throughput.py --build-tools
	@for b in $(BENCHMARKS); do \
	  echo "== benchmarks/$$b.py"; \
	  $(PY) benchmarks/$$b.py; rc=$$?; \
	  if [ $$rc -eq 77 ]; then echo "benchmarks/$$b.py skipped (see above)"; \
	  elif [ $$rc -ne 0 ]; then exit $$rc; fi; \
	done

lint: build
	$(VENV)/bin/ruff check python tests benchmarks examples
	$(VENV)/bin/ruff format --check python tests benchmarks examples
	$(VENV)/bin/mypy
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings

fmt: venv
	$(VENV)/bin/ruff format python tests benchmarks examples
	$(VENV)/bin/ruff check --fix python tests benchmarks examples
	cargo fmt --all

clean:
	rm -rf $(VENV) target dist
