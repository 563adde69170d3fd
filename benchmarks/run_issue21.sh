#!/usr/bin/env bash
# Issue 21 on one H200 (about 8 minutes): tune the bf16 and nf4 GEMV kernels for this card into a shipped table,
# then decode bf16 / fp16 / nf4 fast, nf4 generate(), the per-projection table and nf4 at 32K under a 12 GiB cap.
# Usage (repo root, bitsandbytes on PYTHONPATH, e.g. pip install --target /tmp/site bitsandbytes*.whl):
#   PYTHONPATH=/tmp/site:$PWD bash benchmarks/run_issue21.sh
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
CKPT=${CKPT:-/tmp/glm9b}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, triton, transformers, bitsandbytes; print(torch.__version__, triton.__version__, transformers.__version__, bitsandbytes.__version__)"
time python3 -c "from glmkit.bench import build_random_checkpoint as b; b('$CKPT')" || exit 1
echo "=== gemv_tune (bf16, nf4; fp16 takes bf16's shapes)"
time python3 benchmarks/gemv_tune.py --kernels bf16,nf4 --write-table glmkit/assets/gemv_tuned_h200.json --skip-decode \
  --name gemv_tune_h200 || echo "gemv_tune FAILED: nf4_decode runs with the default shapes"
echo "=== nf4_decode"
time python3 benchmarks/nf4_decode.py --checkpoint "$CKPT"
