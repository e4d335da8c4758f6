#!/usr/bin/env bash
# fastcell demo: the whole pipeline on a synthetic BBBC021-shaped screen, end to end.
#
#   make demo                 # or: bash scripts/demo.sh [OUT_DIR]   (default: demo/)
#
# synth -> shard -> train (SimCLR) -> embed (SimCLR, random-init and hand-crafted baselines)
# -> eval (NSC / NSCB / drop after TVN) -> compare. Sized for a 2-core CPU (16 minutes after setup);
# with an NVIDIA GPU, train and embed use it without being told. Every step resumes: rerun the
# same command after an interruption and finished work is kept.
set -euo pipefail

OUT=${1:-demo}
FASTCELL=${FASTCELL:-$(dirname "$0")/../.venv/bin/fastcell}
command -v "$FASTCELL" >/dev/null || FASTCELL=fastcell

# Training budget: three passes over the ~12k demo cells on a CPU; more on a GPU, where it is cheap.
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    TRAIN_OPTS=(--epochs 30 --batch-size 512)
else
    TRAIN_OPTS=(--epochs 3 --batch-size 128)
fi

step() { printf '\n== %s\n' "$*"; }

step "1/6 synth: a BBBC021-shaped screen (real design, synthetic pixels)"
"$FASTCELL" synth "$OUT/screen" --workers 2

step "2/6 shard: nuclei detection, illumination correction, each plate referenced to its DMSO, 48-px crops"
"$FASTCELL" shard "$OUT/screen" "$OUT/shards" --crop 48 --scaling plate-dmso --workers 2
"$FASTCELL" info "$OUT/shards" --montage "$OUT/shards/montage.png"

step "3/6 train: SimCLR, ResNet-18 (recipe: configs/synthetic-screen.yaml)"
"$FASTCELL" train "$OUT/shards" --out "$OUT/run" --resume --config "$(dirname "$0")/../configs/synthetic-screen.yaml" \
    --checkpoint-every 25 "${TRAIN_OPTS[@]}"

step "4/6 embed: SimCLR encoder, random-init encoder, hand-crafted features"
"$FASTCELL" embed "$OUT/run" "$OUT/shards" --out "$OUT/emb/simclr"
"$FASTCELL" embed none "$OUT/shards" --random-init --arch resnet18 --out "$OUT/emb/random-init"
"$FASTCELL" embed none "$OUT/shards" --handcrafted --out "$OUT/emb/handcrafted"

step "5/6 eval: wells -> TVN on DMSO -> treatments -> 1-NN MoA (NSC, NSCB)"
for rep in simclr random-init handcrafted; do
    "$FASTCELL" eval "$OUT/emb/$rep" --post tvn --out "$OUT/reports/$rep"
done

step "6/6 compare"
"$FASTCELL" compare simclr="$OUT/reports/simclr" random-init="$OUT/reports/random-init" \
    handcrafted="$OUT/reports/handcrafted" --out "$OUT/reports"
printf '\nReports: %s/reports/comparison.md and %s/reports/*/report.md\n' "$OUT" "$OUT"
