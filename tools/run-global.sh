#!/usr/bin/env bash
# `make run-global`: Redis, ratelimit-service and Envoy (envoy/global.yaml) on loopback; Ctrl-C
# stops all three.
set -euo pipefail
cd "$(dirname "$0")/.."
REDIS_PORT="${REDIS_PORT:-16379}"
work="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
# Ctrl-C (or a TERM) is how this is meant to end: stop everything and exit 0, so make does not
# report the processes' own exit codes (143) as an error.
trap 'cleanup; exit 0' INT TERM

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$work" >"$work/redis.log" 2>&1 &
pids+=($!)
target/debug/ratelimit-service --redis-url "redis://127.0.0.1:$REDIS_PORT" --redis-startup-wait-secs 10 \
  --grpc-addr 127.0.0.1:8081 --http-addr 127.0.0.1:8080 &
pids+=($!)
for _ in $(seq 100); do curl -sf localhost:8080/healthz >/dev/null && break; sleep 0.1; done

cat <<MSG

Redis on :$REDIS_PORT, ratelimit-service on :8081 (gRPC) and :8080 (/healthz, /metrics),
Envoy with ratelimit-wasm on http://localhost:10300 (admin :9904). Try, in another terminal:
  for i in \$(seq 7); do curl -s -o /dev/null -w '%{http_code}\n' -H 'x-api-key: alice' localhost:10300/; done
  curl -i -H 'x-api-key: alice' localhost:10300/
  curl -s localhost:8080/metrics | grep decisions
  curl -s localhost:9904/stats/prometheus | grep ratelimit_wasm_requests_total
Start a second Envoy on other ports and the limit is shared. Ctrl-C stops everything.

MSG
.venv/bin/envoy -c envoy/global.yaml --concurrency 2 --base-id 17 --log-level warn &
pids+=($!)
wait "${pids[-1]}"
