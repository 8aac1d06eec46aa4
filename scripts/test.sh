#!/usr/bin/env bash
# Set up and run every test: lint and types, the test suite (SQLite always; PostgreSQL too when a
# server answers on 127.0.0.1:5432, started here if it is installed but stopped), the main job
# (`pipeproof check`), the diagram drift check and the conformance kit against the reference
# server. Exits non-zero on the first failure. This is what CI runs (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --browser

pg_up() { command -v pg_isready >/dev/null 2>&1 && pg_isready -q -h 127.0.0.1 -p 5432; }
if ! pg_up && command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
  echo "test: starting the local PostgreSQL cluster" >&2
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n 1)" main start || true
  for _ in $(seq 1 20); do pg_up && break; sleep 0.5; done
fi
if [ -z "${PIPEPROOF_TEST_POSTGRES_URL:-}" ] && pg_up; then
  export PIPEPROOF_TEST_POSTGRES_URL="postgresql+asyncpg://postgres@127.0.0.1:5432/test"
fi
echo "test: PostgreSQL tests ${PIPEPROOF_TEST_POSTGRES_URL:+enabled (}${PIPEPROOF_TEST_POSTGRES_URL:-skipped: no server on 127.0.0.1:5432}${PIPEPROOF_TEST_POSTGRES_URL:+)}" >&2

echo "== ruff" >&2
.venv/bin/ruff check .
echo "== mypy --strict" >&2
.venv/bin/mypy
mkdir -p .artifacts
# Two targets: the fast one (the model, the protocol, the sans-I/O cores, the drawings: no
# sockets) first, so a broken unit fails in about a minute; then the slow one (servers, the
# conformance kit, kill -9). tests/conftest.py marks tests/impl and tests/conformance slow.
echo "== pytest (fast: -m 'not slow')" >&2
.venv/bin/pytest -q -p no:cacheprovider -m "not slow" "$@"
echo "== pytest (slow: -m slow)" >&2
.venv/bin/pytest -q -p no:cacheprovider -m slow "$@"
echo "== pipeproof check" >&2
.venv/bin/pipeproof check --quiet
echo "== pipeproof diagrams --check" >&2
.venv/bin/pipeproof diagrams --check
echo "== pipeproof conform --serve" >&2
.venv/bin/pipeproof conform --serve --junit .artifacts/conformance.xml
