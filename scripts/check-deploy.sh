#!/usr/bin/env bash
# Validates deploy/ (tools/check_deploy.py): the Kubernetes manifests against the Kubernetes schemas
# with kubernetes-validate (PyPI, in a venv under target/deploy-venv, made once), their consistency,
# and the Containerfile's rules.
#
#   bash scripts/check-deploy.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${KUBERNETES_VALIDATE_VERSION:-1.37.0}
VENV=target/deploy-venv
if ! "$VENV/bin/kubernetes-validate" --version 2>/dev/null | grep -qx "$VERSION"; then
    command -v python3 >/dev/null || { apt-get update -qq && apt-get install -y -qq python3 python3-venv >/dev/null; }
    python3 -m venv "$VENV" >&2 || { apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null && python3 -m venv "$VENV" >&2; }
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "kubernetes-validate==$VERSION" >&2
fi
PATH="$PWD/$VENV/bin:$PATH" "$VENV/bin/python" tools/check_deploy.py deploy
