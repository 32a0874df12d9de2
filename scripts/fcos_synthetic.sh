#!/usr/bin/env bash
# The README's FCOS experiment: a teacher, then a student without and with distillation (same
# budget) on the synthetic COCO-format set. Prints each run's box AP table.
set -euo pipefail
BIN=${BIN:-target/release/skd-det}
OUT=${OUT:-runs/fcos_synthetic}
DATA=${DATA:-datasets/synthetic_coco}
SEED=${SEED:-0}
cargo build --release --bin skd-det
[ -d "$DATA" ] || "$BIN" synth coco --out "$DATA" --width 320 --height 240 --train-images 300 --val-images 48
"$BIN" train fcos --config configs/synthetic_fcos_teacher.json --data "$DATA" --run-dir "$OUT/teacher" \
  --set seed="$SEED" > "$OUT.teacher.txt"
"$BIN" train fcos --config configs/synthetic_fcos_student_baseline.json --data "$DATA" --run-dir "$OUT/baseline" \
  --set seed="$SEED" > "$OUT.baseline.txt"
"$BIN" train fcos --config configs/synthetic_fcos_student_skd.json --data "$DATA" --run-dir "$OUT/skd" \
  --teacher "$OUT/teacher/student.safetensors" --set seed="$SEED" > "$OUT.skd.txt"
for r in teacher baseline skd; do echo "== $r"; head -3 "$OUT.$r.txt"; done
