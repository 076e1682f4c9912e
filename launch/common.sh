# shellcheck shell=bash
# Shared by the launch/ scripts (sourced, never run): option parsing, the gcloud runner behind
# --dry-run, and the steps that both the one-job scripts and the supervisor take.
#
# A script sets USAGE (its first help lines) and OPTIONS (the options it takes, named as in
# HELP below), sources this file, then calls parse_args "$@".

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1  # setup.py, configs/, --copy: the checkout's
exec 3>&1  # --dry-run prints here, even from inside $(...)

REMOTE_DIR=bert-jax-run  # on every worker, under its home: the code, a venv, the job's log
PYTHON_VERSION=3.11      # what jax, flax and orbax need; TPU VM images ship 3.10, so uv brings it

declare -A HELP=(
  [name]="--name NAME              the slice (and its queued resource); required"
  [zone]="--zone ZONE              e.g. us-central2-b (default: gcloud's compute/zone)"
  [project]="--project PROJECT        (default: gcloud's core/project)"
  [accelerator-type]="--accelerator-type TYPE  e.g. v4-32, v5p-32, v5litepod-16 (16 chips each);
                           required"
  [version]="--version RUNTIME        TPU software version (default from the type:
                           v4 tpu-ubuntu2204-base, v5litepod v2-alpha-tpuv5-lite,
                           v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e)"
  [spot]="--spot                   a Spot slice: much cheaper, preempted at any time"
  [preemptible]="--preemptible            a preemptible slice (not with --queued)"
  [queued]="--queued                 request the slice as a queued resource (waits for capacity)"
  [copy]="--copy PATH              also copy PATH (relative to the checkout, e.g. a tokenizer) to
                           every worker, next to configs/ (always copied); repeatable"
  [run-dir]="--run-dir DIR            the run directory, passed as train.output_dir; required
                           (gs://BUCKET/runs/NAME: it must outlive the slice)"
  [resume]="--resume                 continue the run in --run-dir from its newest checkpoint"
  [worker]="--worker N|all           whose log: a worker number or all (default 0, process 0)"
  [poll]="--poll SECONDS           time between checks (default 60)"
  [max-restarts]="--max-restarts N         give up after the job was started N+1 times (default 20)"
  [done-file]="--done-file PATH         under --run-dir, the file that marks a finished run
                           (default hf/config.json: the HF export written last)"
  [delete]="--delete                 delete the slice once the run is done"
  [dry-run]="--dry-run                print the gcloud commands instead of running them"
)
FLAGS=" spot preemptible queued resume delete dry-run "  # options without a value

# shellcheck disable=SC2034  # some are read only by the scripts that source this file
{
  NAME="" ZONE="" PROJECT="" ACCELERATOR_TYPE="" VERSION="" RUN_DIR="" WORKER=0
  POLL=60 MAX_RESTARTS=20 DONE_FILE=hf/config.json
  SPOT=0 PREEMPTIBLE=0 QUEUED=0 RESUME=0 DELETE=0 DRY_RUN=0
  COPY=() COMMAND=()
}

die() {
  printf '%s: error: %s\n' "${0##*/}" "$*" >&2
  exit 1
}

log() {
  printf '[%s] %s\n' "$(date '+%F %T')" "$*" >&2
}

usage() {
  local opt
  printf '%s\n\nOptions:\n' "$USAGE"
  for opt in "${OPTIONS[@]}" dry-run; do printf '  %s\n' "${HELP[$opt]}"; done
  printf '  %-25sthis help\n' "-h, --help"
}

# Sets NAME, RUN_DIR, SPOT, ... from --name, --run-dir, --spot, ...; COMMAND from what follows --.
parse_args() {
  local opt var
  while (($#)); do
    case $1 in
      -h | --help) usage; exit 0 ;;
      --) shift; COMMAND=("$@"); break ;;
      --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
      --*)
        opt=${1#--} var=${1#--}; var=${var//-/_}; var=${var^^}
        [[ " ${OPTIONS[*]} dry-run " == *" $opt "* ]] || die "unknown option $1 (see --help)"
        if [[ $FLAGS == *" $opt "* ]]; then
          printf -v "$var" 1
        elif (($# < 2)) || [[ $2 == -* || -z $2 ]]; then
          die "$1 needs a value"
        elif [[ $opt == copy ]]; then
          COPY+=("${2%/}"); shift
        else
          printf -v "$var" '%s' "$2"; shift
        fi ;;
      *) die "unexpected argument '$1' (see --help)" ;;
    esac
    shift
  done
  [[ $POLL =~ ^[0-9]+([.][0-9]+)?$ ]] || die "--poll takes seconds, not '$POLL'"
  [[ $MAX_RESTARTS =~ ^[0-9]+$ ]] || die "--max-restarts takes a number, not '$MAX_RESTARTS'"
  [[ $WORKER =~ ^([0-9]+|all)$ ]] || die "--worker takes a worker number or all, not '$WORKER'"
  for opt in "${COPY[@]}"; do
    [[ $opt != /* && /$opt/ != */../* ]] || die "--copy takes a path in the checkout, not '$opt'"
    [[ -e $opt ]] || die "--copy: no such file or directory: $opt"
  done
}

require() {  # VAR...: each must have been given (as --var)
  local var opt
  for var; do
    opt=${var,,}; opt=${opt//_/-}
    [[ -n ${!var} ]] || die "--$opt is required (see --help)"
  done
}

check_tier() {
  if ((SPOT && PREEMPTIBLE)); then die "choose one of --spot and --preemptible"; fi
  if ((QUEUED && PREEMPTIBLE)); then die "queued resources take --spot, not --preemptible"; fi
}

check_command() {  # what follows --: a bert-jax training command
  require RUN_DIR
  case ${COMMAND[0]:-} in
    pretrain | finetune) ;;
    "") die "no command: end with -- pretrain|finetune ARGS (see --help)" ;;
    *) die "the command after -- is pretrain or finetune and its arguments, not '${COMMAND[0]}'" ;;
  esac
}

quote() {  # ARGS as one shell-ready line: plain words bare, the others in single quotes
  local arg words=()
  for arg; do
    if [[ $arg =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      words+=("$arg")
    else
      words+=("'${arg//\'/\'\\\'\'}'")
    fi
  done
  printf '%s\n' "${words[*]}"
}

# gcloud ARGS, echoed to stderr first (unless QUIET=1); with --dry-run only printed.
run_gcloud() {
  if ((DRY_RUN)); then
    quote gcloud "$@" >&3
    return 0
  fi
  if [[ ${QUIET:-0} != 1 ]]; then echo "+ $(quote gcloud "$@")" >&2; fi
  gcloud "$@"
}

tpus() {  # gcloud compute tpus ARGS in the zone and project given
  local where=()
  if [[ -n $ZONE ]]; then where+=("--zone=$ZONE"); fi
  if [[ -n $PROJECT ]]; then where+=("--project=$PROJECT"); fi
  run_gcloud compute tpus "$@" "${where[@]}"
}

on_workers() {  # SCRIPT: run the shell script on every worker of the slice
  tpus tpu-vm ssh "$NAME" --worker=all --command "$1"
}

create_slice() {
  local version=$VERSION tier=()
  if [[ -z $version ]]; then
    case $ACCELERATOR_TYPE in
      v4-*) version=tpu-ubuntu2204-base ;;
      v5litepod-*) version=v2-alpha-tpuv5-lite ;;
      v5p-*) version=v2-alpha-tpuv5 ;;
      v6e-*) version=v2-alpha-tpuv6e ;;
      *) die "no default --version for $ACCELERATOR_TYPE" \
        "(gcloud compute tpus tpu-vm versions list)" ;;
    esac
  fi
  if ((SPOT)); then tier=(--spot); fi
  if ((PREEMPTIBLE)); then tier=(--preemptible); fi
  if ((QUEUED)); then
    tpus queued-resources create "$NAME" --node-id="$NAME" --accelerator-type="$ACCELERATOR_TYPE" \
      --runtime-version="$version" "${tier[@]}"
  else
    tpus tpu-vm create "$NAME" --accelerator-type="$ACCELERATOR_TYPE" --version="$version" \
      "${tier[@]}"
  fi
}

delete_slice() {
  if ((QUEUED)); then
    tpus queued-resources delete "$NAME" --force --quiet
  else
    tpus tpu-vm delete "$NAME" --quiet
  fi
}

# Every worker gets this checkout's package (setup.py, README.md, bert_jax/) and configs/ plus
# --copy paths under ~/$REMOTE_DIR, then a Python $PYTHON_VERSION venv with it and jax[tpu].
# Each step returns on failure, so that the supervisor can retry (set -e is off inside `if`).
setup_workers() {
  local path copies=(configs) parents=("$REMOTE_DIR/src") parent
  for path in "${COPY[@]}"; do
    if [[ " ${copies[*]} " != *" $path "* ]]; then copies+=("$path"); fi
    if [[ $path == */* ]]; then parents+=("$REMOTE_DIR/${path%/*}"); fi
  done
  on_workers "rm -rf $REMOTE_DIR/src && mkdir -p $(quote "${parents[@]}")" || return
  tpus tpu-vm scp --recurse --worker=all setup.py README.md bert_jax "$NAME:$REMOTE_DIR/src/" ||
    return
  for path in "${copies[@]}"; do
    parent=$REMOTE_DIR
    if [[ $path == */* ]]; then parent+="/${path%/*}"; fi
    tpus tpu-vm scp --recurse --worker=all "$path" "$NAME:$parent/" || return
  done
  on_workers "cd $REMOTE_DIR \
&& { [ -x ~/.local/bin/uv ] || curl -LsSf https://astral.sh/uv/install.sh | sh; } \
&& { [ -x venv/bin/python ] || ~/.local/bin/uv venv --python $PYTHON_VERSION venv; } \
&& ~/.local/bin/uv pip install --python venv/bin/python --reinstall-package bert_jax \
'jax[tpu]' './src[gcs]'"
}

# Starts `bert-jax COMMAND --set train.output_dir=RUN_DIR --distributed [--resume]` on every
# worker, detached (nohup), appending to ~/$REMOTE_DIR/job.log there; job.pid holds the
# wrapper's process id and job.exit, once it ends, the command's exit status.
start_job() {  # RESUME (0 or 1)
  local argv=(venv/bin/bert-jax "${COMMAND[@]}" --set "train.output_dir=$RUN_DIR" --distributed)
  if (($1)); then argv+=(--resume); fi
  on_workers "cd $REMOTE_DIR || exit 1
if [ ! -f job.exit ] && kill -0 \"\$(cat job.pid 2>/dev/null)\" 2>/dev/null; then
  echo \"\$(hostname): a job is already running (launch/stop.sh stops it)\" >&2; exit 1
fi
rm -f job.exit
export PYTHONUNBUFFERED=1
nohup bash -c $(quote "$(quote "${argv[@]}"); echo \$? >job.exit") >>job.log 2>&1 </dev/null &
echo \$! >job.pid"
}
