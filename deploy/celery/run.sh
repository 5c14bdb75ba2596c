#!/usr/bin/env bash
# Start one role of the Celery deployment in the foreground (a process manager - systemd, a
# Procfile runner, supervisord - runs one per service and restarts it):
#
#   deploy/celery/run.sh webserver          # dagster-webserver on :3000
#   deploy/celery/run.sh daemon             # dagster-daemon: run queue, sensors, schedules, backfills,
#                                           # run monitoring and retries; exactly ONE per deployment
#   deploy/celery/run.sh worker NAME [N]    # a Celery run worker taking N runs at once (default 2);
#                                           # any number, on any hosts; NAME unique per host
#   deploy/celery/run.sh receiver PORT [N]  # a receiver with N processes; any number, behind any
#                                           # load balancer
#
# Every host needs the project installed (pip install -e '.[celery]'), this folder's dagster.yaml
# as $DAGSTER_HOME/dagster.yaml, and the environment that file names (DAGSTER_PG_URL,
# DAGSTER_CELERY_BROKER, DAGSTER_CELERY_BACKEND), plus SYNC_DATABASE_URL and the connections'
# credential variables wherever runs or receivers run.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
: "${DAGSTER_HOME:?set DAGSTER_HOME to a directory holding deploy/celery/dagster.yaml as dagster.yaml}"

role="${1:?usage: run.sh webserver|daemon|worker NAME [N]|receiver PORT [N]}"
case "$role" in
  webserver)
    exec dagster-webserver -h "${DAGSTER_WEBSERVER_HOST:-0.0.0.0}" -p "${DAGSTER_WEBSERVER_PORT:-3000}" \
      -w "$here/workspace.yaml" ;;
  daemon)
    # A backfill whose code location cannot be loaded for a moment (a code server restarting or
    # slow to answer) is retried by the daemon instead of failing for good with no run. Set
    # beforehand, even to "" (off), the environment's value wins.
    export DAGSTER_BACKFILL_RETRY_DEFINITION_CHANGED_ERROR="${DAGSTER_BACKFILL_RETRY_DEFINITION_CHANGED_ERROR-1}"
    exec dagster-daemon run -w "$here/workspace.yaml" ;;
  worker)
    name="${2:?worker NAME}"
    # The runs' own queue ("dagster"); -n NAME@hostname is what task states (and so the run
    # monitoring's debug info) name as the worker. The worker writes worker.yaml's broker and
    # backend URLs into $DAGSTER_HOME/dagster_celery/config/: keep that directory private.
    exec dagster-celery worker start -A dagster_celery.app -y "$here/worker.yaml" -n "$name" -q dagster \
      -- "--concurrency=${3:-2}" --without-gossip --without-mingle ;;
  receiver)
    exec sync-project receiver --host "${SYNC_RECEIVER_HOST:-0.0.0.0}" --port "${2:?receiver PORT}" \
      --workers "${3:-2}" --proxy-headers ;;
  *)
    echo "unknown role: $role" >&2; exit 2 ;;
esac
