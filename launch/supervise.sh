#!/usr/bin/env bash
# Keep a run going on a slice that can be preempted: create, set up and start; when the slice is
# lost, recreate it and resume from the newest checkpoint in the run directory; stop when done.
set -euo pipefail
USAGE="Usage: launch/supervise.sh --name NAME --accelerator-type TYPE --run-dir gs://... \\
         [options] -- pretrain|finetune ARGS...

Every --poll seconds, read the slice's state (gcloud compute tpus tpu-vm describe):
  missing              create it (launch/create.sh)
  READY, no job        set it up and start the job (launch/setup.sh, launch/run.sh);
                       every start after the first adds --resume
  READY, job running   wait
  READY, job ended     done if --run-dir holds --done-file; a job that failed
                       (exit status 1-127) stops the supervisor and keeps the slice;
                       one that was killed or lost is started again with --resume
  PREEMPTED, TERMINATED (or the queued resource SUSPENDED, FAILED)
                       delete it, create it again, and go on as above
  anything else        (CREATING, WAITING_FOR_RESOURCES, ...) wait
--dry-run prints the gcloud commands of each of these steps.

Example: launch/supervise.sh --name bert-v4 --zone us-central2-b --accelerator-type v4-32 \\
           --spot --run-dir gs://my-bucket/runs/base --copy runs/tokenizer --delete -- \\
           pretrain --config configs/bert-base-cased-phase1.yaml --tokenizer runs/tokenizer"
OPTIONS=(name zone project accelerator-type version spot preemptible queued copy run-dir resume
         poll max-restarts done-file delete)
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "$0")/common.sh"

# One field of the slice's description (GROUP is tpu-vm or queued-resources), MISSING when it
# does not exist, UNKNOWN when gcloud cannot say.
describe() {  # GROUP FORMAT
  local out err status=0
  err=$(mktemp)
  out=$(QUIET=1 tpus "$1" describe "$NAME" --format="$2" 2>"$err") || status=$?
  if ((status == 0)); then
    echo "${out:-UNKNOWN}"
  elif grep -q NOT_FOUND "$err"; then
    echo MISSING
  else
    sed 's/^/  /' "$err" >&2
    echo UNKNOWN
  fi
  rm -f "$err"
}

slice_state() {  # the node's state; while a queued resource is not ACTIVE, the queued resource's
  local state
  if ((QUEUED)); then
    state=$(describe queued-resources 'value(state.state)')
    if [[ $state != ACTIVE ]] && ! ((DRY_RUN)); then echo "$state"; return; fi
  fi
  describe tpu-vm 'value(state)'
}

# Each worker answers `job-running`, `job-exit STATUS` or `job-none` (no job, or its process
# vanished); the sum is RUNNING, FAILED (some exit status 1-127), ENDED, or UNKNOWN (no answer).
job_status() {
  local out word code running=0
  out=$(QUIET=1 on_workers "cd $REMOTE_DIR 2>/dev/null || { echo job-none; exit 0; }
if [ -f job.exit ]; then echo \"job-exit \$(cat job.exit)\"
elif kill -0 \"\$(cat job.pid 2>/dev/null)\" 2>/dev/null; then echo job-running
else echo job-none; fi") || { echo UNKNOWN; return; }
  while read -r word code; do
    if [[ $word == job-exit && $code =~ ^[0-9]+$ ]] && ((code > 0 && code < 128)); then
      echo FAILED; return
    fi
    if [[ $word == job-running ]]; then running=1; fi
  done <<<"$out"
  if ((running)); then echo RUNNING; else echo ENDED; fi
}

run_finished() {
  QUIET=1 run_gcloud storage ls "$RUN_DIR/$DONE_FILE" >/dev/null 2>&1
}

plan() {  # --dry-run: each step's commands
  echo "# every ${POLL} s: the slice's state, and when READY the job's on every worker"
  slice_state >/dev/null
  job_status >/dev/null
  echo "# missing: create it"
  create_slice
  echo "# READY and no job: set up every worker and start the job"
  setup_workers
  start_job "$RESUME"
  echo "# the job ended: the run is done if this finds the marker"
  run_finished || true
  echo "# PREEMPTED or TERMINATED: recreate, set up and resume"
  delete_slice
  create_slice
  setup_workers
  start_job 1
  if ((DELETE)); then
    echo "# done: delete the slice"
    delete_slice
  fi
}

supervise() {
  local state job="" seen="" starts=0 resume=$RESUME
  while true; do
    state=$(slice_state)
    if [[ $state == READY ]]; then job=$(job_status); else job=""; fi
    if [[ "$state $job" != "$seen" ]]; then log "slice $NAME: $state${job:+, job $job}"; fi
    seen="$state $job"
    case $state/$job in
      READY/FAILED)
        die "the job failed (launch/logs.sh --name $NAME --worker all shows why); slice kept" ;;
      READY/ENDED)
        if run_finished; then
          log "done: $RUN_DIR/$DONE_FILE exists"
          break
        fi
        starts=$((starts + 1))
        ((starts <= MAX_RESTARTS + 1)) || die "gave up after $((starts - 1)) starts (--max-restarts)"
        if setup_workers && start_job "$resume"; then
          resume=1
        else
          log "setting up or starting failed; trying again"
        fi ;;
      PREEMPTED/* | TERMINATED/* | SUSPENDING/* | SUSPENDED/* | FAILED/* | MISSING/*)
        if [[ $state != MISSING ]] && ! delete_slice; then
          log "deleting failed; trying again"
        elif ! create_slice; then
          ((starts > 0)) || die "could not create the slice"
          log "creating failed (no capacity?); trying again"
        fi ;;
    esac
    sleep "$POLL"
  done
  if ((DELETE)); then delete_slice; fi
}

parse_args "$@"
require NAME ACCELERATOR_TYPE
check_tier
check_command
[[ $RUN_DIR == gs://* ]] || die "--run-dir must be on Cloud Storage (gs://...) to outlive the slice"
if ((DRY_RUN)); then plan; else supervise; fi
