#!/usr/bin/env bash
# Install this checkout with jax[tpu] on every worker of a slice and copy configs/ there.
set -euo pipefail
USAGE="Usage: launch/setup.sh --name NAME [options]

On every worker (--worker=all): copy this checkout's package and configs/ (and each
--copy PATH) to ~/bert-jax-run, then install it with jax[tpu] in a Python 3.11 venv
made by uv (~/bert-jax-run/venv). Safe to repeat: it refreshes the code.

Example: launch/setup.sh --name bert-v4 --zone us-central2-b --copy runs/tokenizer"
OPTIONS=(name zone project copy)
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "$0")/common.sh"

parse_args "$@"
require NAME
setup_workers
