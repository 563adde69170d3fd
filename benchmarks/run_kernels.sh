#!/usr/bin/env bash
# The decode kernels (bf16, fp16, 4-bit) on one H200, in two commands of about 4 and 6 minutes (each under a 10-minute limit):
#   PYTHONPATH=/tmp/site:$PWD bash benchmarks/run_kernels.sh tune    # bf16 + nf4 shapes -> glmkit/assets/gemv_tuned_h200.json
#   PYTHONPATH=/tmp/site:$PWD bash benchmarks/run_kernels.sh decode  # bf16/fp16/nf4 fast, nf4 generate(), projections, 32K@12GiB
#   PYTHONPATH=/tmp/site:$PWD:$PWD/benchmarks bash benchmarks/run_kernels.sh one  # the batch-1 4-bit CUDA kernel:
#     its rounding per projection (nf4_code_rounding.py, 30 s) and its launch shapes tuned (one_shapes_tune.py, 1 min)
# (bitsandbytes on PYTHONPATH, e.g. pip install --target /tmp/site bitsandbytes*.whl). Put the table that `tune` writes
# (also copied to $OUT) into glmkit/assets/ before `decode`, so the decode runs with the H200's shapes.
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
CKPT=${CKPT:-/tmp/glm9b}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, triton, transformers, bitsandbytes; print(torch.__version__, triton.__version__, transformers.__version__, bitsandbytes.__version__)" || exit 1
case "${1:-all}" in
  tune|all)
    echo "=== gemv_tune (bf16, nf4; fp16 takes bf16's shapes)"
    time python3 benchmarks/gemv_tune.py --kernels bf16,nf4 --write-table glmkit/assets/gemv_tuned_h200.json \
      --skip-decode --name gemv_tune_h200 || echo "gemv_tune FAILED: the decode runs with the default shapes";;&
  decode|all|one)
    time python3 -c "from glmkit.models import ensure_random_checkpoint as e; e('$CKPT')" || exit 1;;&
  decode|all)
    echo "=== nf4_decode"
    time python3 benchmarks/nf4_decode.py --checkpoint "$CKPT";;&
  one|all)
    echo "=== nf4_code_rounding, one_shapes_tune"
    time python3 benchmarks/nf4_code_rounding.py
    time python3 benchmarks/one_shapes_tune.py --checkpoint "$CKPT";;
esac
