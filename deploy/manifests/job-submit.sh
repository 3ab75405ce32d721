#!/usr/bin/env bash
# Deploy moemesh onto a running Ray cluster with `ray job submit`, then print its status.
#   RAY_ADDRESS=http://head:8265 MODEL=/models/mixtral deploy/manifests/job-submit.sh
set -euo pipefail
: "${RAY_ADDRESS:?set RAY_ADDRESS to the Ray dashboard, e.g. http://head:8265}"
MODEL="${MODEL:-tiny-mixtral}"
ray job submit --address "$RAY_ADDRESS" --runtime-env-json '{"pip": ["moemesh[ray]"]}' -- \
  moemesh up --address auto --model "$MODEL" --port 50051
ray job submit --address "$RAY_ADDRESS" -- moemesh status --address auto
