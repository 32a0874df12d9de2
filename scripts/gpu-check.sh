#!/usr/bin/env bash
# The device checks of the GPU build, in one go, on the GPU machine (issue #8): the goldens on the
# GPU, a short distillation run on synthetic data whose loss must fall, and the speed of the
# released protocol's step and of whole-image inference, skd and the PyTorch twin side by side.
#
#   scripts/gpu-check.sh BIN_DIR REF_DIR TEACHER OUT_DIR
#
# BIN_DIR holds skd-seg and skd-golden from scripts/cuda-build.sh; REF_DIR torch_bench.py and
# skd_ref.py (shared/reference); TEACHER a small teacher's student.safetensors for
# configs/synthetic_student_skd.json (e.g. runs/demo/teacher/ after `skd-seg demo`). Every result
# goes to OUT_DIR: one log per check and summary.txt. Each check has its own time limit
# (GOLDEN_S, TRAIN_S, BENCH_S, SKD_TRAIN_S, env), so one slow check cannot starve the others.
# GPU memory is sampled with nvidia-smi every 50 ms while each benchmark runs (device-wide used
# memory minus what was used before it started: CUDA context + allocations, for both frameworks).
# DEVICE=cpu (with the CPU binaries and BENCH_* sizes small) runs the script itself as a dry run.
set -u
[ $# -eq 4 ] || { sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 2; }
BIN=$(realpath "$1") REF=$(realpath "$2") TEACHER=$(realpath "$3") OUT=$(realpath "$4")
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
SUMMARY=$OUT/summary.txt
say() { echo "$*" | tee -a "$SUMMARY"; }

SP=$(python3 -c 'import site; print(site.getsitepackages()[0])')
export LD_LIBRARY_PATH=$(printf '%s:' "$SP"/nvidia/*/lib)${LD_LIBRARY_PATH:-}
say "gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader)"
say "torch: $(python3 -c 'import torch; print(torch.__version__, torch.version.cuda, torch.backends.cudnn.version())')"
missing=$(ldd "$BIN/skd-seg" | grep 'not found')
[ -z "$missing" ] || say "skd-seg: missing libraries: $missing"

# $1 = name, $2 = seconds, rest = command; output to $OUT/$name.log, GPU memory peak to the summary.
check() {
  local name=$1 secs=$2; shift 2
  local base start rc
  base=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 > "$OUT/$name.mem" 2>/dev/null &
  local sampler=$!
  start=$(date +%s%N)
  timeout "$secs" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null
  local peak
  peak=$(sort -n "$OUT/$name.mem" | tail -1)
  say "== $name: rc $rc, $(( ($(date +%s%N) - start) / 1000000 )) ms, GPU memory peak $((${peak:-0} - base)) MiB over $base MiB"
  grep -E '^\{|golden:|FAILED|Error|error|panicked' "$OUT/$name.log" | tail -5 | tee -a "$SUMMARY"
}

DEVICE=${DEVICE:-cuda}
export SKD_DEVICE=$DEVICE
# The penalty's double backward needs Candle's gradient graph (`cargo test` sets this from
# .cargo/config.toml; the test binary run by hand does not).
export CANDLE_GRAD_DO_NOT_DETACH=1
check golden "${GOLDEN_S:-150}" env SKD_GOLDEN_DIR=tests/golden "$BIN/skd-golden" --nocapture --test-threads 1
# cuDNN runs float convolutions in TF32 by default (so does PyTorch, cudnn.allow_tf32); the same
# goldens again in full f32, to tell rounding from bugs.
check golden_fp32 "${GOLDEN_S:-150}" env NVIDIA_TF32_OVERRIDE=0 SKD_GOLDEN_DIR=tests/golden "$BIN/skd-golden" --nocapture --test-threads 1

# A short distillation run with every term (pixel, pair, holistic with WGAN-GP) on the GPU.
DATA=$(mktemp -d)/synthetic
"$BIN/skd-seg" synth cityscapes --out "$DATA" --train 64 --val 8 --size 128 256 --seed 0 > "$OUT/synth.log" 2>&1
check train "${TRAIN_S:-150}" "$BIN/skd-seg" train cityscapes --config configs/synthetic_student_skd.json \
  --data "$DATA" --run-dir "$OUT/run" --teacher "$TEACHER" --set device=$DEVICE --set optim.iterations=${TRAIN_ITERS:-300}
if [ -f "$OUT/run/train.jsonl" ]; then
  cp "$OUT/run/train.jsonl" "$OUT/train.jsonl"
  python3 - "$OUT/train.jsonl" <<'EOF' | tee -a "$SUMMARY"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"total"' in l]
keys = ("total", "ce", "pixel_wise", "pair_wise", "holistic", "critic_loss")
for r in rows[:1] + rows[-1:]:
    print(f"  it {r['iteration']}: " + ", ".join(f"{k} {r[k]:.4f}" for k in keys if r.get(k) is not None)
          + f", step {r['step_s'] * 1e3:.1f} ms")
if len(rows) >= 4:
    n = min(5, len(rows) // 2)
    first, last = (sum(r["total"] for r in part) / n for part in (rows[:n], rows[-n:]))
    print(f"  mean total of the first {n} logs {first:.4f}, of the last {n} {last:.4f}: fell {last < first}")
EOF
fi
rm -rf "$OUT/run"

# Speed: the released protocol's step and whole-image inference, skd then the twin, same settings.
INFER=(--size ${INFER_SIZE:-1024 2048} --batch 1 --steps 10 --warmup 3)
TRAIN=(--size ${TRAIN_SIZE:-512 512} --batch ${TRAIN_BATCH:-8} --teacher r101)
TERMS=${TERMS:-pi,pa,ho}
check skd_infer "${BENCH_S:-120}" "$BIN/skd-seg" bench --mode infer --device "$DEVICE" "${INFER[@]}" --json
check torch_infer "${BENCH_S:-120}" python3 "$REF/torch_bench.py" --device "$DEVICE" --mode infer "${INFER[@]}"
check skd_infer_net "${BENCH_S:-120}" "$BIN/skd-seg" bench --mode infer --device "$DEVICE" "${INFER[@]}" --no-postprocess --json
check torch_infer_net "${BENCH_S:-120}" python3 "$REF/torch_bench.py" --device "$DEVICE" --mode infer "${INFER[@]}" --no-postprocess
check torch_train "${BENCH_S:-120}" python3 "$REF/torch_bench.py" --device "$DEVICE" "${TRAIN[@]}" --terms "$TERMS" --steps 10 --warmup 3
check skd_train "${SKD_TRAIN_S:-${BENCH_S:-120}}" "$BIN/skd-seg" bench --mode train --device "$DEVICE" "${TRAIN[@]}" \
  --terms "$TERMS" --steps "${SKD_TRAIN_STEPS:-3}" --warmup 1 --json
# The same step without the critic (no double backward), to see its share.
check torch_train_pi_pa "${BENCH_S:-120}" python3 "$REF/torch_bench.py" --device "$DEVICE" "${TRAIN[@]}" --terms pi,pa --steps 10 --warmup 3
check skd_train_pi_pa "${SKD_TRAIN_S:-${BENCH_S:-120}}" "$BIN/skd-seg" bench --mode train --device "$DEVICE" "${TRAIN[@]}" \
  --terms pi,pa --steps "${SKD_TRAIN_STEPS:-3}" --warmup 1 --json
say "done"
