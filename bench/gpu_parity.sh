#!/usr/bin/env bash
# Seeded loss parity and the optimizer x architecture 2 x 2 on the wiki dev shards, one GPU:
#   our A and M, and each with the other's architecture, seeds 0-2 (sweep.py, 4 runs at a time);
#   then the published reference scripts A and M, seeds 0-2 (bench/reference.py, 2 at a time: each
#   holds ~35 GB, so they run after ours);
#   then the statistics (stats.py --against) and the 2 x 2 table and figure (bench/interaction.py).
# Usage: bench/gpu_parity.sh OUT_DIR REFERENCE_DIR
#   REFERENCE_DIR holds the published remix train_gpt_A.py and train_gpt_M.py (not in this repository);
#   the wiki dev shards are in data/dev/ (wiki_train_000001.bin, wiki_val_000000.bin).
# Settings of the reference parity runs: 300 steps of 65,536 tokens, validation over 2,097,152 tokens
# (here every 100 steps), the schedules scaled to 300 steps by the scripts themselves.
set -uo pipefail
out=${1:?usage: bench/gpu_parity.sh OUT_DIR REFERENCE_DIR}
ref=${2:?usage: bench/gpu_parity.sh OUT_DIR REFERENCE_DIR}
export PYTHONUNBUFFERED=1
train='data/dev/wiki_train_*.bin' val='data/dev/wiki_val_*.bin'
python sweep.py --seeds 0 1 2 --out "$out/ours" --jobs_per_gpu 4 \
    --run A --run M --run "A --tied_embed=false --logit_softcap=30" --run "M --tied_embed=true --logit_softcap=0" \
    -- "--train_files=$train" "--val_files=$val" --batch_tokens=65536 --num_iterations=300 --val_loss_every=100 \
    --val_tokens=2097152
for v in A M; do
    for seed in 0 1 2; do
        python bench/reference.py "$v" --script "$ref/train_gpt_$v.py" --steps 300 --train "$train" --val "$val" \
            --val_every 100 --val_tokens 2097152 --seed "$seed" --log_dir "$out/reference"
    done &
done
wait
# our runs of each baseline's own architecture (the config line is the only JSON in a log)
python stats.py $(grep -l '"tied_embed": true' "$out"/ours/A_*.txt) --against "$out"/reference/reference_A_*.txt
python stats.py $(grep -l '"tied_embed": false' "$out"/ours/M_*.txt) --against "$out"/reference/reference_M_*.txt
python bench/interaction.py "$out"/ours/*.txt -o "$out/arch_2x2.png"
