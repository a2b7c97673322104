#!/usr/bin/env bash
# Rendering check of deploy/helm/smtp-oauth-relay (helm itself is not in our registries):
# renders the chart with its defaults and each ci/*.yaml using render.py (exactly the template
# subset the chart uses), parses every document, checks the invariants (kinds, replicas and PDB,
# no secret in a ConfigMap, probes on the admin port, securityContext, metric names against
# src/metrics.rs) and, given the relay binary, that `config` accepts each rendered relay.toml.
#   deploy/helm/check.sh [target/debug/smtp-oauth-relay]
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! python3 -c 'import yaml' 2>/dev/null; then
  timeout 300 apt-get install -y -qq --no-install-recommends python3-yaml >/dev/null ||
    { timeout 300 apt-get update -qq && timeout 300 apt-get install -y -qq --no-install-recommends python3-yaml >/dev/null; }
fi
exec python3 deploy/helm/check.py "$@"
