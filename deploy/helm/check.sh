#!/usr/bin/env bash
# Rendering check of deploy/helm/smtp-oauth-relay (helm itself is not in our registries):
# renders the chart with its defaults and each ci/*.yaml using render.py (exactly the template
# subset the chart uses), parses every document, checks the invariants (kinds, replicas and PDB,
# no secret in a ConfigMap, probes on the admin port, securityContext, metric names against
# src/metrics.rs) and, given the relay binary, that `config` accepts each rendered relay.toml.
#   deploy/helm/check.sh [target/debug/smtp-oauth-relay]
# Needs Debian's python3 (3.11: tomllib) with python3-yaml; installs python3-yaml if missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
py=/usr/bin/python3
if ! "$py" -c 'import yaml, tomllib' 2>/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  timeout 300 apt-get install -y -qq --no-install-recommends python3 python3-yaml >/dev/null 2>&1 ||
    { timeout 300 apt-get update -qq &&
      timeout 300 apt-get install -y -qq --no-install-recommends python3 python3-yaml >/dev/null; }
fi
# Go's text/template (helm's engine) as a cross-check of render.py, when a Go toolchain is here
# (Debian's golang-go; nothing is fetched: GOPROXY=off, standard library only).
go_bin=$(command -v go || ls /usr/lib/go-*/bin/go 2>/dev/null | sort -V | tail -n 1 || true)
go_args=()
if [ -n "$go_bin" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  (cd deploy/helm/gotemplate && GOPROXY=off GOFLAGS=-mod=mod GOCACHE="$tmp/cache" \
    "$go_bin" build -o "$tmp/gotemplate" .)
  go_args=(--go-render "$tmp/gotemplate")
else
  echo "go cross-check: skipped (no Go toolchain; apt-get install golang-go to run it)"
fi
"$py" deploy/helm/check.py "${go_args[@]}" "$@"
