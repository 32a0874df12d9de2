#!/usr/bin/env bash
# skd vs the PyTorch twin (shared/reference/torch_bench.py), side by side on this machine, CPU.
# Needs `pip install torch numpy` for the twin. Prints one JSON line per run; pairs alternate so
# that both see the same machine load. With ROUNDS=N the four pairs run N times over and a
# summary follows: per case both speeds of every round, the ratios (skd / PyTorch img/s) with
# their median, and the largest peak memory of each side.
#
#   scripts/bench_cpu.sh [REFERENCE_DIR]     # default ../shared/reference
#   ROUNDS=5 scripts/bench_cpu.sh            # what README's table reports
set -euo pipefail
cd "$(dirname "$0")/.."
REF=${1:-../shared/reference}
THREADS=${THREADS:-$(nproc)}
ROUNDS=${ROUNDS:-1}
cargo build --release --bin skd-seg
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
skd() { target/release/skd-seg bench --json "$@" | tee -a "$LOG"; }
twin() { python3 "$REF/torch_bench.py" --device cpu --threads "$THREADS" "$@" | tee -a "$LOG"; }

for _ in $(seq "$ROUNDS"); do
  # (a) train step, teacher r18, student r18, 128x128, batch 2, pixel + pair
  skd --mode train --teacher r18 --size 128 128 --batch 2 --steps 10 --warmup 2 --terms pi,pa
  twin --mode train --teacher r18 --size 128 128 --batch 2 --steps 10 --warmup 2 --terms pi,pa
  # (b) inference, student r18, 256x512, batch 1
  skd --mode infer --size 256 512 --batch 1 --steps 10 --warmup 2
  twin --mode infer --size 256 512 --batch 1 --steps 10 --warmup 2
  # (c) the train step with the r101 teacher
  skd --mode train --teacher r101 --size 128 128 --batch 2 --steps 10 --warmup 2 --terms pi,pa
  twin --mode train --teacher r101 --size 128 128 --batch 2 --steps 10 --warmup 2 --terms pi,pa
  # (d) the full step with the discriminator, 512x512, batch 2, teacher r18
  skd --mode train --teacher r18 --size 512 512 --batch 2 --steps 2 --warmup 1 --terms pi,pa,ho
  twin --mode train --teacher r18 --size 512 512 --batch 2 --steps 2 --warmup 1 --terms pi,pa,ho
done

if [ "$ROUNDS" -gt 1 ]; then
  python3 - "$LOG" <<'EOF'
import json, statistics, sys
runs = [json.loads(line) for line in open(sys.argv[1]) if line.startswith("{")]
pairs = list(zip(runs[::2], runs[1::2]))
for case, name in enumerate("abcd"):
    rows = pairs[case::4]
    ratios = [s["img_per_s"] / t["img_per_s"] for s, t in rows]
    fmt = lambda xs, d: ", ".join(f"{x:.{d}f}" for x in xs)
    print(f"({name}) skd img/s {fmt([s['img_per_s'] for s, _ in rows], 3)} | PyTorch "
          f"{fmt([t['img_per_s'] for _, t in rows], 3)} | ratio {fmt(ratios, 2)} "
          f"(median {statistics.median(ratios):.2f}) | peak MB skd "
          f"{max(s['peak_mem_mb'] for s, _ in rows):.0f}, PyTorch "
          f"{max(t['peak_mem_mb'] for _, t in rows):.0f}")
EOF
fi
