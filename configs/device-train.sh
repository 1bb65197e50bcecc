#!/bin/sh
# Stage 3 (configs/guided-gpu.toml) on a lent GPU machine as one job: build the dataset from carried
# videos and kept face tracks (no dlib needed), train for MINUTES, and leave the run's weights,
# trainer state and metrics in OUT. Run from the repository root:
#   sh configs/device-train.sh VIDEOS TRACKS OUT [MINUTES]
# The Python packages that machine lacks (PyAV, pydantic, pydantic-settings) must be importable
# already: models/kfgan-guided.md, "On a lent GPU", says how they travel.
set -eu
videos=$1 tracks=$2 out=$3 minutes=${4:-7}
config=runs/guided-gpu.toml
mkdir -p runs "$out"
sed "s#^videos = .*#videos = \"$videos\"#" configs/guided-gpu.toml > "$config"
python3 -m kfgan_daemon dataset build --config "$config" --tracks "$tracks"
# SIGTERM ends the run after its current step, with last.pt written; timeout then exits 124.
status=0
timeout -s TERM "$((minutes * 60))" python3 -m kfgan_daemon train --config "$config" || status=$?
[ "$status" -eq 0 ] || [ "$status" -eq 124 ]
for name in best.safetensors last.pt metrics.jsonl; do
  if [ -f "runs/guided-gpu/$name" ]; then cp "runs/guided-gpu/$name" "$out/"; fi
done
