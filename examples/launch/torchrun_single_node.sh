#!/usr/bin/env bash
# Data-parallel training on one machine: one process per GPU (or, without GPUs,
# CPU processes over gloo). The global batch is nproc x data.train.batch_size.
set -euo pipefail
NPROC=${NPROC:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
torchrun --standalone --nproc_per_node "$NPROC" -m mmptm.cli train "${CONFIG:-clip_base.yaml}" \
    --output-dir "${OUTPUT_DIR:-runs/clip_base}" --resume "$@"
