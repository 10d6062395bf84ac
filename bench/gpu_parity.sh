#!/usr/bin/env bash
# Wiki parity runs of both baselines (settings of the reference README) and one step at the real
# batch, on one GPU. Usage: bench/gpu_parity.sh OUT_DIR  (wiki dev shards in data/dev/)
set -uo pipefail
out=${1:?usage: bench/gpu_parity.sh OUT_DIR}
export PYTHONUNBUFFERED=1
common=(--train_files='data/dev/wiki_train_*.bin' --val_files='data/dev/wiki_val_*.bin' --val_tokens=2097152)
quiet() { grep -v -E '^step:[0-9]+/[0-9]+ train_time'; }
for s in ${SCRIPTS:-A M}; do
  python train_gpt_$s.py "${common[@]}" --batch_tokens=65536 --num_iterations=300 --val_loss_every=25 --log_dir="$out" 2>&1 | quiet
done
for s in ${REAL_BATCH:-}; do
  timeout 150 python train_gpt_$s.py "${common[@]}" --num_iterations=2 --val_tokens=524288 --log_dir="$out" 2>&1 | quiet
done
