#!/usr/bin/env bash
# skd vs the PyTorch twin (shared/reference/torch_bench.py), side by side on this machine, CPU.
# Needs `pip install torch numpy` for the twin. Prints one JSON line per run; pairs alternate so
# that both see the same machine load.
#
#   scripts/bench_cpu.sh [REFERENCE_DIR]     # default ../shared/reference
set -euo pipefail
cd "$(dirname "$0")/.."
REF=${1:-../shared/reference}
THREADS=${THREADS:-$(nproc)}
cargo build --release --bin skd-seg
skd() { target/release/skd-seg bench --json "$@"; }
twin() { python3 "$REF/torch_bench.py" --device cpu --threads "$THREADS" "$@"; }

# (a) train step, teacher r18, student r18, 128x128, batch 2, pixel + pair
skd --mode train --teacher r18 --size 128 128 --batch 2 --steps 5 --warmup 2 --terms pi,pa
twin --mode train --teacher r18 --size 128 128 --batch 2 --steps 5 --warmup 2 --terms pi,pa
# (b) inference, student r18, 256x512, batch 1
skd --mode infer --size 256 512 --batch 1 --steps 5 --warmup 2
twin --mode infer --size 256 512 --batch 1 --steps 5 --warmup 2
# (c) the train step with the r101 teacher
skd --mode train --teacher r101 --size 128 128 --batch 2 --steps 5 --warmup 2 --terms pi,pa
twin --mode train --teacher r101 --size 128 128 --batch 2 --steps 5 --warmup 2 --terms pi,pa
# (d) the full step with the discriminator, 512x512, batch 2, teacher r18
skd --mode train --teacher r18 --size 512 512 --batch 2 --steps 2 --warmup 1 --terms pi,pa,ho
twin --mode train --teacher r18 --size 512 512 --batch 2 --steps 2 --warmup 1 --terms pi,pa,ho
