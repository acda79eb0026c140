#!/usr/bin/env bash
# Run the same command on every node, with NODE_RANK=0..NNODES-1 and MASTER_ADDR
# set to node 0's address. --output-dir must be on a file system every node sees
# (rank 0 writes checkpoints; every rank reads them on --resume).
set -euo pipefail
: "${NNODES:?number of nodes}" "${NODE_RANK:?this node's rank}" "${MASTER_ADDR:?address of node 0}"
torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "${NPROC:-8}" \
    --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" \
    -m mmptm.cli train "${CONFIG:-clip_base.yaml}" --output-dir "${OUTPUT_DIR:-runs/clip_base}" --resume "$@"
