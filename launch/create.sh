#!/usr/bin/env bash
# Create a Cloud TPU slice: a plain TPU VM or a queued resource, on demand, Spot or preemptible.
set -euo pipefail
USAGE="Usage: launch/create.sh --name NAME --accelerator-type TYPE [options]

Create a TPU slice (gcloud compute tpus tpu-vm create, or with --queued
gcloud compute tpus queued-resources create, which waits in a queue for capacity).

Example: launch/create.sh --name bert-v4 --zone us-central2-b --accelerator-type v4-32 --spot"
OPTIONS=(name zone project accelerator-type version spot preemptible queued)
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "$0")/common.sh"

parse_args "$@"
require NAME ACCELERATOR_TYPE
check_tier
create_slice
