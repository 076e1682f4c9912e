#!/usr/bin/env bash
# Delete a TPU slice (its queued resource too with --queued); its workers' disks go with it.
set -euo pipefail
USAGE="Usage: launch/delete.sh --name NAME [options]

Delete the slice without asking (gcloud ... delete --quiet). The run directory on
Cloud Storage stays; the logs on the workers go.

Example: launch/delete.sh --name bert-v4 --zone us-central2-b"
OPTIONS=(name zone project queued)
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "$0")/common.sh"

parse_args "$@"
require NAME
delete_slice
