#!/usr/bin/env bash
# The whole test suite in its own virtual environment (.venv-test), pytest arguments passed through
# (e.g. bash scripts/test.sh -m "not slow" for the quick subset).
#
# Tests marked `services` need the service stack (scripts/stack.sh: PostgreSQL 15, S3, mlflow server). If it is
# not up, this script starts it and stops it at the end; where it cannot start (no root to install PostgreSQL),
# those tests are skipped, unless MLLM_REQUIRE_SERVICES=1 (CI) makes that a failure. MLLM_STACK=0: never start it.
# Tests marked `gpu` skip without CUDA. The default suite runs first; the chaos drill (`chaos`, random kills on the
# service stack, several minutes) runs after it, unless pytest arguments were given.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/venv.sh .venv-test test,services
export MLLM_STACK_DIR=${MLLM_STACK_DIR:-/tmp/mllm-stack}
started=0
if [ "${MLLM_STACK:-1}" != 0 ] && ! MLLM_STACK_VENV=.venv-test bash scripts/stack.sh status >/dev/null 2>&1; then
  if MLLM_STACK_VENV=.venv-test bash scripts/stack.sh up; then
    started=1
  elif [ "${MLLM_REQUIRE_SERVICES:-0}" = 1 ]; then
    echo "test.sh: the service stack did not start and MLLM_REQUIRE_SERVICES=1" >&2
    exit 1
  else
    echo "test.sh: the service stack did not start; services tests will be skipped" >&2
  fi
fi
if [ "$started" = 1 ]; then
  trap 'MLLM_STACK_VENV=.venv-test bash scripts/stack.sh down' EXIT
fi
if [ -f "$MLLM_STACK_DIR/env" ] && MLLM_STACK_VENV=.venv-test bash scripts/stack.sh status >/dev/null 2>&1; then
  set -a
  # shellcheck disable=SC1091
  source "$MLLM_STACK_DIR/env"
  set +a
fi
if [ $# -gt 0 ]; then
  .venv-test/bin/python -m pytest "$@"
else
  .venv-test/bin/python -m pytest -m "not chaos"
  .venv-test/bin/python -m pytest -m chaos
fi
