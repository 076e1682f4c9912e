#!/usr/bin/env bash
# Follow the job's log on one worker or on all of them (each line led by the worker's host name).
set -euo pipefail
USAGE="Usage: launch/logs.sh --name NAME [options]

Print the last 100 lines of ~/bert-jax-run/job.log and follow it (Ctrl-C stops
following; the job goes on).

Example: launch/logs.sh --name bert-v4 --zone us-central2-b --worker all"
OPTIONS=(name zone project worker)
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "$0")/common.sh"

parse_args "$@"
require NAME
tpus tpu-vm ssh "$NAME" --worker="$WORKER" \
  --command "tail -n 100 -F $REMOTE_DIR/job.log | sed -u \"s/^/\$(hostname): /\""
