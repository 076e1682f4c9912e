#!/usr/bin/env bash
# Stop the job on every worker: SIGTERM, on which bert-jax saves a checkpoint and exits.
set -euo pipefail
USAGE="Usage: launch/stop.sh --name NAME [options]

Send SIGTERM to the bert-jax process on every worker; it saves a checkpoint and
exits, so launch/run.sh --resume continues it. Stop a running supervisor first
(Ctrl-C), or it starts the job again.

Example: launch/stop.sh --name bert-v4 --zone us-central2-b"
OPTIONS=(name zone project)
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "$0")/common.sh"

parse_args "$@"
require NAME
on_workers "pkill -TERM -P \"\$(cat $REMOTE_DIR/job.pid 2>/dev/null)\" 2>/dev/null \
|| echo \"\$(hostname): no job running\""
