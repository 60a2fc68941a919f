#!/usr/bin/env bash
# The scale-out stack on 127.0.0.1, throwaway: PostgreSQL 15 (tracking + Optuna databases), an S3-compatible
# server (moto) with a bucket, and `mlflow server` on PostgreSQL with S3 artifacts.
#
#   bash scripts/stack.sh up       # start everything, wait for health, write $MLLM_STACK_DIR/env
#   source /tmp/mllm-stack/env     # MLFLOW_TRACKING_URI, MLLM_OPTUNA_STORAGE, S3 endpoint and (test) keys
#   bash scripts/stack.sh status
#   bash scripts/stack.sh down     # stop what `up` started (process groups) and delete the data
#   bash scripts/stack.sh mlflow-stop | mlflow-start   # take the tracking server away and back (outage drills)
#   bash scripts/stack.sh pg-stop | pg-start           # PostgreSQL down and up again (same data)
#   bash scripts/stack.sh s3-pause | s3-resume         # S3 unreachable (its process stopped: requests hang) and back
#
# Real deployments use the same topology with a real PostgreSQL and S3: run `mlflow server
# --backend-store-uri postgresql+psycopg2://USER:PASSWORD@HOST/mlflow --artifacts-destination s3://BUCKET/mlflow`
# with AWS credentials (and MLFLOW_S3_ENDPOINT_URL for non-AWS S3) in that server's environment, and point
# mllm at it with tracking.tracking_uri: http://SERVER:5000 and search.storage: postgresql+psycopg2://...
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
DIR=${MLLM_STACK_DIR:-/tmp/mllm-stack}
PG_PORT=${MLLM_STACK_PG_PORT:-55432}
S3_PORT=${MLLM_STACK_S3_PORT:-55000}
MLFLOW_PORT=${MLLM_STACK_MLFLOW_PORT:-55500}
PG_USER=mllm
PG_PASSWORD=mllm-stack-secret   # a throwaway cluster on 127.0.0.1; never reused elsewhere
BUCKET=mllm-artifacts
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1
PG_BIN=$(ls -d /usr/lib/postgresql/15/bin 2>/dev/null || true)
# mlflow, moto, psycopg2, boto3: scripts/test.sh passes its own venv; later calls (mlflow-start) reuse up's choice
VENV=${MLLM_STACK_VENV:-$(cat "$DIR/venv" 2>/dev/null || echo .venv-services)}

as_postgres() {  # PostgreSQL refuses to run as root
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

start_group() {  # start_group NAME COMMAND...: own process group, pid file, log file
  local name=$1; shift
  setsid "$@" >"$DIR/$name.log" 2>&1 < /dev/null &
  echo $! >"$DIR/$name.pid"
}

wait_for() {  # wait_for WHAT SECONDS COMMAND...
  local what=$1 seconds=$2; shift 2
  for _ in $(seq "$seconds"); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 1
  done
  echo "stack: $what did not become healthy in ${seconds}s (see $DIR/*.log)" >&2
  return 1
}

install_postgres() {  # a fresh Debian machine has the client at most; the server comes from Debian's packages
  if [ -n "$PG_BIN" ]; then return 0; fi
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "stack: PostgreSQL 15 not found; install it (apt-get install postgresql-15) and rerun" >&2; exit 2
  fi
  echo "stack: installing PostgreSQL 15 (apt-get)"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15 >/dev/null
  PG_BIN=/usr/lib/postgresql/15/bin
}

start_mlflow() {
  # The database URI (with its password) goes through the environment, not the command line that `ps` shows.
  MLFLOW_BACKEND_STORE_URI="postgresql+psycopg2://$PG_USER:$PG_PASSWORD@127.0.0.1:$PG_PORT/mlflow" \
  MLFLOW_S3_ENDPOINT_URL="http://127.0.0.1:$S3_PORT" start_group mlflow "$VENV/bin/mlflow" server \
    --artifacts-destination "s3://$BUCKET/mlflow" --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 2
  wait_for "mlflow server" 120 curl -sf "http://127.0.0.1:$MLFLOW_PORT/health"
}

up() {
  # A start that fails half way stops whatever it had started (no stray servers, no half-made cluster).
  trap 'rc=$?; if [ $rc -ne 0 ]; then echo "stack: up failed; stopping what it started" >&2; down >/dev/null 2>&1; fi' EXIT
  install_postgres
  [ -n "${MLLM_STACK_VENV:-}" ] || bash scripts/venv.sh "$VENV" services
  mkdir -p "$DIR"
  chmod 777 "$DIR"
  if [ ! -f "$DIR/pg/PG_VERSION" ]; then
    echo "$PG_PASSWORD" >"$DIR/pgpass"
    chmod 644 "$DIR/pgpass"
    as_postgres "$PG_BIN/initdb" -D "$DIR/pg" -U "$PG_USER" --pwfile="$DIR/pgpass" --auth=scram-sha-256 >"$DIR/initdb.log"
    rm -f "$DIR/pgpass"
  fi
  pg_start
  export PGPASSWORD=$PG_PASSWORD
  for db in mlflow optuna; do
    psql -h 127.0.0.1 -p "$PG_PORT" -U "$PG_USER" -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname='$db'" \
      | grep -q 1 || psql -h 127.0.0.1 -p "$PG_PORT" -U "$PG_USER" -d postgres -qc "CREATE DATABASE $db"
  done
  start_group s3 "$VENV/bin/moto_server" -H 127.0.0.1 -p "$S3_PORT"
  wait_for "S3 (moto)" 60 curl -sf "http://127.0.0.1:$S3_PORT/moto-api/"
  "$VENV/bin/python" - <<EOF
import boto3
s3 = boto3.client("s3", endpoint_url="http://127.0.0.1:$S3_PORT")
if "$BUCKET" not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
    s3.create_bucket(Bucket="$BUCKET")
EOF
  start_mlflow
  cat >"$DIR/env" <<EOF
export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT
export MLLM_STACK_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT
export MLLM_OPTUNA_STORAGE=postgresql+psycopg2://$PG_USER:$PG_PASSWORD@127.0.0.1:$PG_PORT/optuna
export MLLM_STACK_S3_ENDPOINT=http://127.0.0.1:$S3_PORT
export MLLM_STACK_BUCKET=$BUCKET
export MLLM_STACK_DIR=$DIR
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1
export MLFLOW_S3_ENDPOINT_URL=http://127.0.0.1:$S3_PORT
EOF
  echo "$VENV" >"$DIR/venv"
  trap - EXIT
  echo "stack up: mlflow http://127.0.0.1:$MLFLOW_PORT (PostgreSQL :$PG_PORT, S3 :$S3_PORT bucket $BUCKET); source $DIR/env"
}

stop_group() {
  local pidfile="$DIR/$1.pid"
  [ -f "$pidfile" ] || return 0
  local pid; pid=$(cat "$pidfile")
  kill -TERM -- "-$pid" 2>/dev/null || true
  for _ in $(seq 20); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.5; done
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$pidfile"
}

down() {
  stop_group mlflow
  stop_group s3
  if [ -n "$PG_BIN" ] && [ -f "$DIR/pg/postmaster.pid" ]; then
    as_postgres "$PG_BIN/pg_ctl" -D "$DIR/pg" -m fast -w stop >/dev/null || true
  fi
  rm -rf "$DIR"
  echo "stack down"
}

status() {
  local ok=0
  if [ -n "$PG_BIN" ] && as_postgres "$PG_BIN/pg_ctl" -D "$DIR/pg" status >/dev/null 2>&1; then
    echo "postgresql: up (:$PG_PORT)"; else echo "postgresql: down"; ok=1; fi
  if curl -sf "http://127.0.0.1:$S3_PORT/moto-api/" >/dev/null 2>&1; then echo "s3: up (:$S3_PORT)"
  else echo "s3: down"; ok=1; fi
  if curl -sf "http://127.0.0.1:$MLFLOW_PORT/health" >/dev/null 2>&1; then echo "mlflow: up (:$MLFLOW_PORT)"
  else echo "mlflow: down"; ok=1; fi
  return $ok
}

pg_start() {
  as_postgres "$PG_BIN/pg_ctl" -D "$DIR/pg" -l "$DIR/pg/server.log" -w \
    -o "-p $PG_PORT -k $DIR -c listen_addresses=127.0.0.1 -c max_connections=300" start >/dev/null
}

signal_group() {  # signal_group NAME SIGNAL: moto keeps its data in memory, so S3 is paused, never restarted
  kill "-$2" -- "-$(cat "$DIR/$1.pid")"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  mlflow-stop) stop_group mlflow; echo "mlflow server stopped" ;;   # outage drills (tests/test_services.py)
  mlflow-start) start_mlflow; echo "mlflow server up" ;;
  pg-stop) as_postgres "$PG_BIN/pg_ctl" -D "$DIR/pg" -m fast -w stop >/dev/null; echo "postgresql stopped" ;;
  pg-start) pg_start; echo "postgresql up" ;;
  s3-pause) signal_group s3 STOP; echo "s3 paused" ;;
  s3-resume) signal_group s3 CONT; echo "s3 resumed" ;;
  *) echo "usage: scripts/stack.sh up|down|status|mlflow-stop|mlflow-start|pg-stop|pg-start|s3-pause|s3-resume" >&2
     exit 2 ;;
esac
