#!/usr/bin/env bash
# The README's main job: install (scripts/env.sh), then train an ACN with the default MLP decoder
# on the embedded 5,000 MNIST digits for about three minutes and write reconstructions, daydreams,
# neighbours and metrics to runs/acn-default/. Extra arguments go to acn-train (see --help).
set -euo pipefail
# shellcheck disable=SC1091
source "$(dirname "$0")/env.sh" train
acn-train "$@"
