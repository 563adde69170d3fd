#!/usr/bin/env bash
# The two-GPU measurement session (the multi-GPU issue), each script in its own process.
# Usage on a 2-GPU machine, from the repo root: bash benchmarks/run_2gpu.sh   (STEPS="links maps" to pick)
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
CKPT=${CKPT:-/tmp/glm9b}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
nvidia-smi topo -m
python3 -m glmkit.cli env
python3 -c "from glmkit.models import ensure_random_checkpoint as e; e('$CKPT')"
for step in ${STEPS:-links maps tp server}; do
  echo "=== $step"
  case $step in
    links) time python3 benchmarks/gpu_links.py ;;                                   # run 4
    maps) time python3 benchmarks/two_gpu.py --checkpoint "$CKPT" ;;                 # runs 1 and 2
    tp) time python3 benchmarks/tensor_parallel.py --checkpoint "$CKPT" ;;           # run 3
    server) time python3 benchmarks/server_load.py --checkpoint "$CKPT" --device-map 20,20 \
              --name server_load_2gpu ;;                                             # run 5
    tpserve) time python3 benchmarks/server_tp.py --checkpoint "$CKPT" --name server_tp_2gpu ;;  # serve --tp 2
  esac
done
