#!/usr/bin/env bash
# Start the same bert-jax command on every worker of a slice, detached, with a log per worker.
set -euo pipefail
USAGE="Usage: launch/run.sh --name NAME --run-dir DIR [options] -- pretrain|finetune ARGS...

On every worker, start in the background (nohup; it survives the ssh session)
  bert-jax ARGS... --set train.output_dir=DIR --distributed [--resume]
in ~/bert-jax-run (so configs/... paths work), logging to ~/bert-jax-run/job.log
there. launch/logs.sh follows the logs, launch/stop.sh stops the job.

Example: launch/run.sh --name bert-v4 --run-dir gs://my-bucket/runs/base -- \\
           pretrain --config configs/bert-base-cased-phase1.yaml --tokenizer runs/tokenizer"
OPTIONS=(name zone project run-dir resume)
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "$0")/common.sh"

parse_args "$@"
require NAME
check_command
start_job "$RESUME"
