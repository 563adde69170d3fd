#!/usr/bin/env bash
# The one-GPU measurement session: builds the random GLM-4-9B checkpoint once, then runs each script in
# its own process. Usage (on the GPU machine, from the repo root): bash benchmarks/run_1gpu.sh
# e.g. SCRIPTS="gemv_tune decode profile_step gemv_accuracy" ARGS= bash benchmarks/run_1gpu.sh (gemv_tune.py --write-table
# rewrites glmkit/assets/gemv_tuned.json for the card it runs on)
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
CKPT=${CKPT:-/tmp/glm9b}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers, accelerate, bitsandbytes; print(torch.__version__, transformers.__version__, accelerate.__version__, bitsandbytes.__version__)"
time python3 -c "from glmkit.models import build_random_checkpoint as b; b('$CKPT')"
for script in ${SCRIPTS:-oom_demo monitor_check planner_accuracy}; do
  echo "=== $script"; time python3 benchmarks/$script.py --checkpoint "$CKPT" ${ARGS:-}
done
