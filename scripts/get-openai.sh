#!/usr/bin/env bash
# A Python with the official `openai` client, for the test that drives `qadapt-run serve` with it
# (tools/openai_check.py): a venv under target/openai-venv, made once, its python's path printed.
#
#   export QADAPT_OPENAI_PYTHON=$(bash scripts/get-openai.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${OPENAI_VERSION:-3.57.0}
VENV=target/openai-venv
if ! "$VENV/bin/python" -c "import openai, sys; sys.exit(openai.__version__ != '$VERSION')" 2>/dev/null; then
    command -v python3 >/dev/null || { apt-get update -qq && apt-get install -y -qq python3 python3-venv >/dev/null; }
    python3 -m venv "$VENV" >&2 || { apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null && python3 -m venv "$VENV" >&2; }
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "openai==$VERSION" >&2
fi
echo "$PWD/$VENV/bin/python"
