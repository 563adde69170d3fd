#!/usr/bin/env bash
# The two-GPU measurement runs, each script in its own process, each step under a time limit so the next still runs.
# Usage on a 2-GPU machine, from the repo root: bash benchmarks/run_2gpu.sh   (STEPS="maps tp" to pick; LIMIT=seconds)
# Steps marked "one GPU" run on cuda:1 in the background ("attention") or on cuda:0 ("planner").
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # no NVLink multicast
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
CKPT=${CKPT:-/tmp/glm9b}
LIMIT=${LIMIT:-900}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "from glmkit.models import ensure_random_checkpoint as e; e('$CKPT')"
for step in ${STEPS:-links maps tp server tpserve hop}; do
  echo "=== $step $(date +%T)"
  case $step in
    links) timeout "$LIMIT" python3 benchmarks/gpu_links.py ;;
    attention) CUDA_VISIBLE_DEVICES=1 timeout "$LIMIT" python3 benchmarks/attention_share.py > /tmp/attention.log 2>&1 &
               echo "attention_share.py runs on the second GPU in the background (/tmp/attention.log)" ;;
    planner) for a in expandable default; do
               timeout "$LIMIT" python3 benchmarks/planner_accuracy.py --checkpoint "$CKPT" --precisions bf16 \
                 --contexts 65536 131072 --batches 1 --no-speed --allocator $a --name planner_accuracy_long_$a
             done ;;
    maps) timeout "$LIMIT" python3 benchmarks/two_gpu.py --checkpoint "$CKPT" ;;
    tp) timeout "$LIMIT" python3 benchmarks/tensor_parallel.py --checkpoint "$CKPT" ;;
    server) timeout "$LIMIT" python3 benchmarks/server_load.py --checkpoint "$CKPT" --device-map 20,20 --plain \
              --clients 1 16 --ttft-samples 5 --long-tokens 500 --name server_load_2gpu ;;
    tpserve) timeout "$LIMIT" python3 benchmarks/server_tp.py --checkpoint "$CKPT" --servers tp2 split one \
               --clients 1 4 16 64 --seconds 8 --name server_tp_2gpu ;;
    hop) timeout "$LIMIT" python3 benchmarks/two_gpu_fast.py --batches 1 --hop host --name two_gpu_fast_host_hop ;;
    wait) wait; cat /tmp/attention.log 2>/dev/null | tail -5 ;;
  esac
done
wait
