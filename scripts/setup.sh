#!/usr/bin/env bash
# Set up pipeproof from a clean clone: a virtualenv in .venv with the package (editable) and its
# test tools, plus the system programs it uses: graphviz's `dot` (diagrams), SPIN and a C compiler
# (`pipeproof check --engine spin`) and Chromium (the report's browser test). As root the programs
# are installed with apt; otherwise this says exactly what to install. Safe to run again: it only
# does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

want_browser=0
for arg in "$@"; do
  case "$arg" in
    --browser) want_browser=1 ;;
    *) echo "usage: scripts/setup.sh [--browser]" >&2; exit 2 ;;
  esac
done

missing=()
command -v dot >/dev/null 2>&1 || missing+=(graphviz)
command -v spin >/dev/null 2>&1 || missing+=(spin)
command -v gcc >/dev/null 2>&1 || missing+=(gcc)
if [ "$want_browser" = 1 ] && ! command -v chromium >/dev/null 2>&1; then missing+=(chromium); fi
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing ${missing[*]} with apt-get" >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "setup: missing system packages: ${missing[*]}" >&2
    echo "setup: install them with: sudo apt-get install ${missing[*]}" >&2
    echo "setup: (without graphviz, 'pipeproof diagrams' writes DOT sources only;" >&2
    echo "setup:  without spin and gcc, 'pipeproof check --engine spin' reports unknown)" >&2
  fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
# Strict editable mode: a tree of links under build/ that mypy can read (pyproject's
# mypy_path); run this again after adding a module.
.venv/bin/python -m pip install -q -e '.[test]' --config-settings editable_mode=strict
echo "setup: ready (.venv/bin/pipeproof)" >&2
