#!/usr/bin/env bash
# Compile every csrc/cuda/*.cu with nvcc for sm_80 and sm_90 (no torch needed: the .cu files
# include only CUDA headers and csrc/params.h), print registers per kernel, and fail on any error
# or register spill.
set -euo pipefail
nvcc="${1:-nvcc}"
cd "$(dirname "$0")/.."
shopt -s nullglob
files=(csrc/cuda/*.cu)
if [ ${#files[@]} -eq 0 ]; then
  echo "cuda-check: no .cu files in csrc/cuda yet; nothing to compile"
  exit 0
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
status=0
for f in "${files[@]}"; do
  for arch in 80 90; do
    log="$out/$(basename "$f").$arch.log"
    if ! "$nvcc" -std=c++17 -O3 -Icsrc -gencode "arch=compute_$arch,code=sm_$arch" \
        -Xptxas -v -c "$f" -o "$out/$(basename "$f").$arch.o" >"$log" 2>&1; then
      cat "$log"; echo "cuda-check: $f failed to compile for sm_$arch"; status=1; continue
    fi
    grep -E "Compiling entry|registers" "$log" | sed "s|^|sm_$arch $(basename "$f"): |"
    if grep -E "bytes spill (stores|loads)" "$log" | grep -vq " 0 bytes spill stores, 0 bytes spill loads"; then
      grep -E "spill" "$log"; echo "cuda-check: register spill in $f for sm_$arch"; status=1
    fi
  done
done
exit $status
