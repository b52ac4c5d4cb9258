#!/usr/bin/env bash
# The search's two servers on the head node: PostgreSQL (the Optuna study and MLflow's backend
# store) and an MLflow tracking server that stores artifacts itself and serves them over HTTP.
#
#   configs/cluster/head_services.sh start    # idempotent: starts what is not running
#   configs/cluster/head_services.sh stop
#   configs/cluster/head_services.sh status   # exit 0 when both answer
#   configs/cluster/head_services.sh start postgres   # or mlflow: one of them
#
# Settings, from the environment (credentials only from there, never from a file in the repo):
#   PGPASSWORD              password of the database role (required; set on the first start)
#   EQLV2_SERVICES_DIR      database cluster, logs and pid files (default ~/eqlv2-services, as
#                           root /var/lib/eqlv2-services); the head's own disk, not NFS
#   EQLV2_BIND              the address both servers listen on (default 127.0.0.1). On a cluster
#                           whose trials run on other nodes: the head's private address, behind a
#                           firewall / security group that admits the cluster's nodes only.
#                           Never 0.0.0.0.
#   EQLV2_PG_PORT           default 5432
#   EQLV2_MLFLOW_PORT       default 5000
#   EQLV2_DB_USER           database role owning both databases (default eqlv2)
#   EQLV2_MLFLOW_ARTIFACTS  artifact store: a shared folder or s3://bucket/prefix
#                           (default $EQLV2_SERVICES_DIR/mlflow-artifacts)
#   EQLV2_MLFLOW_APP        set to basic-auth to require MLflow users (see the README)
#
# The databases are named optuna and mlflow; the search then takes
#   --optuna-storage postgresql://$EQLV2_DB_USER@$EQLV2_BIND:$EQLV2_PG_PORT/optuna
#   --mlflow-uri http://$EQLV2_BIND:$EQLV2_MLFLOW_PORT
# with PGPASSWORD in its environment (libpq reads it; the URL stays free of secrets).
#
# PostgreSQL refuses to run as root: as root, its processes run as the system user postgres
# (created by Debian's postgresql package), otherwise as the calling user.
set -euo pipefail

if [[ "$(id -u)" == 0 ]]; then DEFAULT_DIR=/var/lib/eqlv2-services; else DEFAULT_DIR="$HOME/eqlv2-services"; fi
DIR="${EQLV2_SERVICES_DIR:-$DEFAULT_DIR}"
BIND="${EQLV2_BIND:-127.0.0.1}"
PG_PORT="${EQLV2_PG_PORT:-5432}"
MLFLOW_PORT="${EQLV2_MLFLOW_PORT:-5000}"
DB_USER="${EQLV2_DB_USER:-eqlv2}"
ARTIFACTS="${EQLV2_MLFLOW_ARTIFACTS:-$DIR/mlflow-artifacts}"
PGDATA="$DIR/pgdata"

fail() { echo "head_services.sh: $*" >&2; exit 2; }

[[ "$BIND" != "0.0.0.0" && "$BIND" != "::" && "$BIND" != "*" ]] ||
  fail "EQLV2_BIND=$BIND would listen on every interface; give the head's private address"

pg_bin() {
  local found
  found="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
  [[ -n "$found" ]] && { echo "$found"; return; }
  command -v initdb >/dev/null && { dirname "$(command -v initdb)"; return; }
  fail "PostgreSQL not found: run scripts/setup.sh as root (apt-get install postgresql)"
}
PG_BIN="$(pg_bin)"

# Runs a PostgreSQL binary as the user owning the database cluster.
as_pg() {
  if [[ "$(id -u)" == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

# SQL to the local server through its private Unix socket (trusted: only the owner can open it).
psql_admin() {
  as_pg "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$PGDATA" -p "$PG_PORT" -U postgres -d postgres "$@"
}

sql_literal() { printf "'%s'" "${1//\'/\'\'}"; }

pg_running() { as_pg "$PG_BIN/pg_ctl" status -D "$PGDATA" >/dev/null 2>&1; }

start_postgres() {
  [[ -n "${PGPASSWORD:-}" ]] || fail "set PGPASSWORD (the password of database role $DB_USER)"
  mkdir -p "$DIR"
  cd "$DIR"
  if [[ ! -f "$PGDATA/PG_VERSION" ]]; then
    mkdir -p "$PGDATA"
    [[ "$(id -u)" != 0 ]] || chown postgres: "$PGDATA"
    chmod 700 "$PGDATA"
    as_pg test -w "$PGDATA" || fail "$PGDATA: not writable by user postgres (a parent folder is private?)"
    as_pg "$PG_BIN/initdb" -D "$PGDATA" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
      -E UTF8 --no-instructions >"$DIR/initdb.log"
  fi
  if ! pg_running; then
    as_pg "$PG_BIN/pg_ctl" start -D "$PGDATA" -w -t 60 -l "$PGDATA/server.log" \
      -o "-p $PG_PORT -c listen_addresses=$BIND -c unix_socket_directories=$PGDATA -c unix_socket_permissions=0700"
  fi
  local role password
  role="$(psql_admin -tA -c "SELECT 1 FROM pg_roles WHERE rolname = $(sql_literal "$DB_USER")")"
  password="$(sql_literal "$PGPASSWORD")"
  # The password goes through stdin, never through a command line other users can read.
  if [[ "$role" != 1 ]]; then
    printf 'CREATE ROLE "%s" LOGIN PASSWORD %s;\n' "$DB_USER" "$password" | psql_admin
  fi
  for db in optuna mlflow; do
    if [[ "$(psql_admin -tA -c "SELECT 1 FROM pg_database WHERE datname = '$db'")" != 1 ]]; then
      psql_admin -c "CREATE DATABASE $db OWNER \"$DB_USER\""
    fi
  done
}

mlflow_up() {
  python -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=3)' \
    "http://$BIND:$MLFLOW_PORT/health" >/dev/null 2>&1
}

start_mlflow() {
  mlflow_up && return 0
  [[ -n "${PGPASSWORD:-}" ]] || fail "set PGPASSWORD (MLflow's backend store is database mlflow)"
  command -v mlflow >/dev/null || fail "mlflow not on PATH: activate the project's virtual environment"
  local app=()
  [[ -z "${EQLV2_MLFLOW_APP:-}" ]] || app=(--app-name "$EQLV2_MLFLOW_APP")
  # Its own session, so that stop ends the server's workers too. MLflow's job runner (GenAI jobs,
  # six worker processes and ~30 s of CPU at start) is off unless asked for.
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}" setsid mlflow server "${app[@]}" \
    --backend-store-uri "postgresql://$DB_USER@$BIND:$PG_PORT/mlflow" \
    --artifacts-destination "$ARTIFACTS" --host "$BIND" --port "$MLFLOW_PORT" --workers 1 \
    >"$DIR/mlflow.log" 2>&1 </dev/null &
  echo $! >"$DIR/mlflow.pid"
  local deadline=$((SECONDS + ${EQLV2_MLFLOW_START_TIMEOUT:-300}))
  while (( SECONDS < deadline )); do
    mlflow_up && return 0
    kill -0 "$(cat "$DIR/mlflow.pid")" 2>/dev/null || break
    sleep 1
  done
  tail -n 30 "$DIR/mlflow.log" >&2
  fail "the MLflow server did not come up on $BIND:$MLFLOW_PORT (log: $DIR/mlflow.log)"
}

stop_mlflow() {
  if [[ -f "$DIR/mlflow.pid" ]]; then
    local group
    group="$(cat "$DIR/mlflow.pid")"
    kill -- "-$group" 2>/dev/null || true
    for _ in $(seq 30); do kill -0 -- "-$group" 2>/dev/null || break; sleep 1; done
    kill -9 -- "-$group" 2>/dev/null || true
    rm -f "$DIR/mlflow.pid"
  fi
}

stop_postgres() {
  if [[ -f "$PGDATA/PG_VERSION" ]] && pg_running; then
    as_pg "$PG_BIN/pg_ctl" stop -D "$PGDATA" -m fast -w -t 60 >/dev/null
  fi
}

case "${1:-} ${2:-all}" in
  "start all") start_postgres; start_mlflow
               echo "PostgreSQL on $BIND:$PG_PORT (databases optuna, mlflow), MLflow on http://$BIND:$MLFLOW_PORT" ;;
  "start postgres") start_postgres; echo "PostgreSQL on $BIND:$PG_PORT (databases optuna, mlflow)" ;;
  "start mlflow") start_mlflow; echo "MLflow on http://$BIND:$MLFLOW_PORT" ;;
  "stop all") stop_mlflow; stop_postgres ;;
  "stop postgres") stop_postgres ;;
  "stop mlflow") stop_mlflow ;;
  "status all") pg_running && mlflow_up ;;
  *) fail "usage: $0 start|stop|status [all|postgres|mlflow]" ;;
esac
