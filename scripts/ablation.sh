#!/usr/bin/env bash
# The synthetic analogue of the paper's Table 1 (CVPR 2019): the same small student trained
# with labels only (baseline), + pixel-wise (PI), + pair-wise (PA), + holistic (HO), on the
# same budget, for several seeds, distilled from one small teacher; prints mean ± std mIoU.
#
#   scripts/ablation.sh                      # 3 seeds, the configs' iterations
#   SEEDS="0 1" ITERATIONS=200 scripts/ablation.sh
#
# Environment: DATA (synthetic set, made if absent), OUT (runs), SEEDS, ITERATIONS, TEACHER
# (a trained teacher's student.safetensors; trained from configs/synthetic_teacher.json if absent).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-datasets/synthetic}
OUT=${OUT:-runs/ablation}
SEEDS=${SEEDS:-"0 1 2"}
ITERATIONS=${ITERATIONS:-}
BIN=target/release/skd-seg

cargo build --release --bin skd-seg
mkdir -p "$OUT"
[ -d "$DATA/leftImg8bit/train" ] || $BIN synth cityscapes --out "$DATA" --train 300 --val 40 --size 128 256 --seed 0
TEACHER=${TEACHER:-$OUT/teacher/student.safetensors}
if [ ! -f "$TEACHER" ]; then
  $BIN train cityscapes --config configs/synthetic_teacher.json --data "$DATA" --run-dir "$OUT/teacher"
fi

miou() { $BIN eval --miou --checkpoint "$1" --data "$DATA" --json | sed -E 's/.*"miou":([-0-9.eE+]+).*/\1/'; }

results="$OUT/results.txt"
echo "teacher - $(miou "$TEACHER")" > "$results"
for seed in $SEEDS; do
  for row in baseline pi pi_pa pi_pa_ho; do
    run="$OUT/$row-seed$seed"
    case $row in
      baseline) args=(--config configs/synthetic_student_baseline.json) ;;
      pi) args=(--config configs/synthetic_student_skd.json --teacher "$TEACHER" --set distill.pair_wise=null --set distill.holistic=null) ;;
      pi_pa) args=(--config configs/synthetic_student_skd.json --teacher "$TEACHER" --set distill.holistic=null) ;;
      pi_pa_ho) args=(--config configs/synthetic_student_skd.json --teacher "$TEACHER") ;;
    esac
    if [ ! -f "$run/student.safetensors" ]; then
      rm -rf "$run"
      [ -n "$ITERATIONS" ] && args+=(--set "optim.iterations=$ITERATIONS")
      $BIN train cityscapes "${args[@]}" --data "$DATA" --set "seed=$seed" --run-dir "$run"
    fi
    echo "$row $seed $(miou "$run/student.safetensors")" | tee -a "$results"
  done
done

# mean ± sample std per row, in percent
awk '
  { n[$1]++; s[$1] += $3; q[$1] += $3 * $3; order[$1] = order[$1] ? order[$1] : ++k; name[k] = $1 }
  END {
    print "| row | runs | mIoU % (mean ± std) |"; print "|---|---|---|"
    for (i = 1; i <= k; i++) {
      r = name[i]; m = s[r] / n[r]
      sd = n[r] > 1 ? sqrt((q[r] - n[r] * m * m) / (n[r] - 1)) : 0
      printf "| %s | %d | %.2f ± %.2f |\n", r, n[r], 100 * m, 100 * sd
    }
  }' "$results"
