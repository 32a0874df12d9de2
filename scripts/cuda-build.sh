#!/usr/bin/env bash
# Builds the CUDA binaries (`cargo build --release --features cuda,cudnn`) on a machine WITHOUT a
# GPU or a CUDA install, for a GPU machine with NVIDIA driver 580 (CUDA 13.0) and a PyTorch cu130
# environment (H100/H200: compute capability 9.0). The default build and CI stay CPU-only.
#
#   scripts/cuda-build.sh               # fetch the toolchain (once), build, print how to run
#   scripts/cuda-build.sh --fetch-only  # only fetch + unpack the toolchain and make the libcuda stub
#   nice -n 19 scripts/cuda-build.sh    # on a busy machine
#
# What it does:
#  1. downloads the CUDA 13.0 wheels pinned below from the Python package index into the cache
#     (once) and unpacks them with pip: nvcc/cicc/ptxas, headers, libcudart, libcublas(Lt),
#     libcurand, libnvrtc, libcudnn;
#  2. makes a libcuda stub (soname libcuda.so.1; every cu* entry point returns
#     CUDA_ERROR_STUB_LIBRARY) to satisfy the linker, and unversioned .so links for the others;
#  3. checks that nvcc compiles a kernel to PTX for the target architecture;
#  4. builds with candle-kernels' nvcc (PTX for CUDA_COMPUTE_CAP) and cudarc's dynamic linking,
#     into its own target directory, so the CPU `target/` is untouched.
# The binaries need libcuda.so.1 (the driver), libcublas.so.13, libcublasLt.so.13,
# libcurand.so.10, libcudart.so.13 and libcudnn.so.9 on the loader path to start at all.
#
# Environment:
#   SKD_CUDA_CACHE    wheels, toolkit and stub (default: ${XDG_CACHE_HOME:-~/.cache}/skd-cuda)
#   CARGO_TARGET_DIR  build directory (default: target-cuda/ in the repo, git-ignored)
#   CUDA_COMPUTE_CAP  GPU architecture for the kernels (default: 90 = H100/H200, sm_90a)
#   CUDAFORGE_THREADS parallel nvcc jobs (default: the number of cores)
#   SKD_CUDA_FEATURES cargo features (default: cuda,cudnn)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

# The toolkit must not be newer than the GPU machine's driver: driver 580 = CUDA 13.0, and the PTX
# of nvcc 13.1+ (ISA > 9.0) does not load there. cuBLAS/cuRAND/cuDNN only need the same sonames
# as the GPU machine's libraries (.so.13/.so.10/.so.9); the oldest 13.0-era ones are linked, so
# every symbol the binary asks for exists in the newer ones there.
WHEELS=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
  nvidia-cuda-nvrtc==13.0.88
  nvidia-cublas==13.0.0.19
  nvidia-curand==10.4.0.35
  nvidia-cudnn-cu13==9.13.0.50
)
EXPECT_NVCC="release 13.0"
EXPECT_PTX=".version 9.0"

CACHE=${SKD_CUDA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/skd-cuda}
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target-cuda}
CAP=${CUDA_COMPUTE_CAP:-90}
FEATURES=${SKD_CUDA_FEATURES:-cuda,cudnn}
THREADS=${CUDAFORGE_THREADS:-$(nproc)}
FETCH_ONLY=0
case "${1:-}" in
  --fetch-only) FETCH_ONLY=1 ;;
  "") ;;
  -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  *) echo "cuda-build: unknown argument '$1' (use --fetch-only or --help)" >&2; exit 2 ;;
esac

die() { echo "cuda-build: error: $*" >&2; exit 1; }
step() { echo "cuda-build: $*" >&2; }

for tool in python3 gcc cargo readelf; do
  command -v "$tool" >/dev/null || die "'$tool' not found on PATH (needed to fetch the wheels / build the stub / build)"
done
python3 -m pip --version >/dev/null 2>&1 || die "python3 has no pip (needed to download and unpack the CUDA wheels)"
[ "$(uname -m)" = x86_64 ] || die "only x86_64 Linux is supported (the pinned wheels are x86_64)"

# One toolkit folder per pin set, so changing a pin never mixes versions.
KEY=$(printf '%s\n' "${WHEELS[@]}" | sha256sum | cut -c1-12)
WHEEL_DIR=$CACHE/wheels
TK=$CACHE/toolkit-$KEY          # pip --target root: nvidia/cu13/{bin,include,lib,nvvm}, nvidia/cudnn/lib
C=$TK/nvidia/cu13
LINK=$TK/link                   # unversioned .so links + libcuda stub, for the linker only
STUB=$TK/stub                   # libcuda.so.1 stub, to start the binary on a machine without a driver
mkdir -p "$CACHE" "$WHEEL_DIR"

# 1. wheels -> toolkit (skipped when the toolkit of this pin set is complete)
if [ ! -f "$TK/.complete" ]; then
  missing=()
  for w in "${WHEELS[@]}"; do
    name=${w%%==*}; ver=${w##*==}
    ls "$WHEEL_DIR"/"${name//-/_}"-"$ver"-*.whl >/dev/null 2>&1 || missing+=("$w")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    step "downloading ${#missing[@]} wheel(s) into $WHEEL_DIR (about 1.5 GB the first time): ${missing[*]}"
    python3 -m pip download --no-deps --only-binary=:all: -d "$WHEEL_DIR" "${missing[@]}" \
      || die "pip download failed (network to the Python package index? the pins exist?): ${missing[*]}"
  fi
  files=()
  for w in "${WHEELS[@]}"; do
    name=${w%%==*}; ver=${w##*==}
    f=$(ls "$WHEEL_DIR"/"${name//-/_}"-"$ver"-*.whl 2>/dev/null | head -1)
    [ -n "$f" ] || die "wheel $w not in $WHEEL_DIR after the download"
    files+=("$f")
  done
  step "unpacking the wheels into $TK"
  rm -rf "$TK"
  # pip keeps the executable bits of nvcc, cicc, ptxas, ...
  python3 -m pip install --quiet --no-index --no-deps --no-compile --disable-pip-version-check --root-user-action=ignore \
    --target "$TK" "${files[@]}" || die "pip could not unpack the wheels into $TK"
  for f in bin/nvcc nvvm/bin/cicc bin/ptxas include/cuda_runtime.h include/nv/target; do
    [ -e "$C/$f" ] || die "the unpacked toolkit lacks $C/$f"
  done

  # 2. link dir: libX.so -> libX.so.N for the linker (the wheels ship only versioned files)
  mkdir -p "$LINK" "$STUB"
  for pat in "$C"/lib/lib{cudart,cublas,cublasLt,curand,nvrtc}.so.* "$TK"/nvidia/cudnn/lib/libcudnn.so.*; do
    for so in $pat; do
      [ -f "$so" ] || continue
      base=${so##*/}; base=${base%%.so.*}.so
      [ -e "$LINK/$base" ] || ln -s "$so" "$LINK/$base"
    done
  done
  for lib in cudart cublas cublasLt curand nvrtc cudnn; do
    [ -e "$LINK/lib$lib.so" ] || die "no lib$lib.so.* in the unpacked wheels"
  done

  # libcuda stub: every cu* function of cudarc's driver bindings, returning 34
  # (CUDA_ERROR_STUB_LIBRARY), so a binary that starts with it reports an error instead of crashing;
  # cuGetErrorName/String succeed with a message that says what happened.
  CUDARC=$(cargo metadata --format-version 1 --features "$FEATURES" --manifest-path "$REPO/Cargo.toml" |
    python3 -c 'import json,sys,os; m=json.load(sys.stdin); print(next(os.path.dirname(p["manifest_path"]) for p in m["packages"] if p["name"]=="cudarc"))') \
    || die "cargo metadata could not locate the cudarc sources"
  names=$(grep -oE '^pub unsafe fn cu[A-Za-z0-9_]+' "$CUDARC/src/driver/sys/mod.rs" | sed 's/^pub unsafe fn //' | sort -u)
  [ "$(echo "$names" | wc -l)" -gt 100 ] || die "found too few cu* functions in $CUDARC/src/driver/sys/mod.rs"
  {
    echo '/* libcuda stub made by scripts/cuda-build.sh: link-time only; no NVIDIA driver here */'
    echo 'static const char *msg = "no NVIDIA driver: this libcuda.so.1 is the link-time stub of scripts/cuda-build.sh";'
    echo 'int cuGetErrorName(int e, const char **s) { *s = "CUDA_ERROR_STUB_LIBRARY"; return 0; }'
    echo 'int cuGetErrorString(int e, const char **s) { *s = msg; return 0; }'
    echo "$names" | grep -vx 'cuGetErrorName\|cuGetErrorString' | sed 's/.*/int &(void) { return 34; }/'
  } > "$TK/libcuda-stub.c"
  gcc -shared -fPIC -O1 -Wl,-soname,libcuda.so.1 -o "$STUB/libcuda.so.1" "$TK/libcuda-stub.c" \
    || die "gcc could not build the libcuda stub"
  ln -sf "$STUB/libcuda.so.1" "$LINK/libcuda.so"

  # 3. nvcc smoke test: one kernel to PTX for the target architecture
  printf '__global__ void k(float *x) { x[threadIdx.x] += 1.0f; }\n' > "$TK/smoke.cu"
  PATH=$C/bin:$PATH "$C/bin/nvcc" --version | grep -q "$EXPECT_NVCC" || die "nvcc is not '$EXPECT_NVCC'"
  arch=compute_$CAP; [ "$CAP" = 90 ] && arch=compute_90a
  PATH=$C/bin:$PATH "$C/bin/nvcc" -ptx -arch="$arch" -o "$TK/smoke.ptx" "$TK/smoke.cu" \
    || die "nvcc could not compile a test kernel for $arch (see above)"
  grep -q "^$EXPECT_PTX" "$TK/smoke.ptx" || die "nvcc emitted $(grep -m1 '^.version' "$TK/smoke.ptx"), not $EXPECT_PTX"
  touch "$TK/.complete"
fi
step "toolkit: $C ($("$C/bin/nvcc" --version | grep -o 'release [0-9.]*'), PTX ${EXPECT_PTX#.version } for compute capability $CAP)"
[ "$FETCH_ONLY" = 1 ] && { step "--fetch-only: done"; exit 0; }

# 4. the build
step "building --release --features $FEATURES into $TARGET_DIR ($THREADS nvcc job(s); cold: tens of minutes on 2 cores)"
start=$(date +%s)
PATH=$C/bin:$PATH CUDA_HOME=$C CUDA_COMPUTE_CAP=$CAP CUDAFORGE_THREADS=$THREADS \
  LIBRARY_PATH=$LINK${LIBRARY_PATH:+:$LIBRARY_PATH} CARGO_TARGET_DIR=$TARGET_DIR \
  cargo build --release --features "$FEATURES" --bins --test golden --manifest-path "$REPO/Cargo.toml" \
  || die "cargo build failed (see above); the toolkit is in $C, the link dir is $LINK"
# The golden test binary, under a fixed name: on the GPU machine
# `SKD_DEVICE=cuda SKD_GOLDEN_DIR=tests/golden ./skd-golden --nocapture` runs every golden there.
GOLDEN=$(ls -t "$TARGET_DIR"/release/deps/golden-* 2>/dev/null | grep -v '\.d$' | head -1)
[ -x "$GOLDEN" ] || die "no golden test binary in $TARGET_DIR/release/deps after the build"
cp "$GOLDEN" "$TARGET_DIR/release/skd-golden"
secs=$(( $(date +%s) - start ))

BINS=()
for b in skd-seg skd-det; do
  [ -x "$TARGET_DIR/release/$b" ] || die "no $TARGET_DIR/release/$b after the build"
  BINS+=("$TARGET_DIR/release/$b")
done
readelf -d "${BINS[0]}" | grep -q 'libcuda.so.1' || die "${BINS[0]} does not link libcuda.so.1: built without CUDA?"

# The binaries in one archive (PTX/SASS compress about 4x), small enough to carry to a GPU machine.
TARBALL=$TARGET_DIR/skd-cuda-bins.tar.gz
tar -czf "$TARBALL" -C "$TARGET_DIR/release" skd-seg skd-det skd-golden || die "could not write $TARBALL"

LOCAL_LD="$STUB:$C/lib:$TK/nvidia/cudnn/lib"
cat <<EOF

cuda-build: built in $((secs / 60)) min $((secs % 60)) s:
$(for b in "${BINS[@]}"; do echo "  $b ($(du -h "$b" | cut -f1))"; done)
  $TARGET_DIR/release/skd-golden (the golden test)
  $TARBALL ($(du -h "$TARBALL" | cut -f1), all three; unpack with tar -xzf)
  needs: $(readelf -d "${BINS[0]}" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' | tr '\n' ' ')

On the GPU machine (driver >= 580, PyTorch with CUDA 13 in python3), point the loader at
PyTorch's CUDA libraries (libcuda.so.1 comes from the driver):
  SP=\$(python3 -c 'import site; print(site.getsitepackages()[0])')
  export LD_LIBRARY_PATH=\$(printf '%s:' "\$SP"/nvidia/*/lib)\$LD_LIBRARY_PATH
  ./skd-seg bench --mode infer --device cuda --size 512 1024 --batch 1 --steps 5
(check with: ldd ./skd-seg | grep 'not found'). Do not put the stub below on that path.

Here, without a driver, the binaries start only with the stub and the wheels' libraries:
  LD_LIBRARY_PATH=$LOCAL_LD ${BINS[0]} info --model pspnet-r18
EOF
