#!/usr/bin/env bash
# Compile every csrc/cuda/*.cu with nvcc for sm_80 and sm_90 (no torch needed: the .cu files
# include only CUDA headers and csrc/params.h), print registers per kernel, and fail on any error
# or register spill. Each file is compiled once for both architectures, device code only
# (--fatbin: the front end parses the whole file, host code included, and cicc + ptxas run per
# architecture; no host object, whose code the emulated build compiles with the host compiler):
# 13% less work than a full compile per architecture. Then check that every csrc/cuda/*.cpp glue
# file compiles (syntax and types) against the installed torch's headers and the CUDA toolkit's,
# which works with a CPU-only torch: its wheel ships the c10/cuda headers but not the generated
# cuda_cmake_macros.h, stubbed here.
set -euo pipefail
nvcc="${1:-nvcc}"
python="${PYTHON:-python3}"
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
ARCHS=(80 90)
# every file compiles as its own job, as many at once as there are cores
jobs=$(nproc 2>/dev/null || echo 2)
compile() {  # file: the flags setup.py gives nvcc, and those torch.utils.cpp_extension adds
  local rc=0 name gencode=()
  name=$(basename "$1")
  for arch in "${ARCHS[@]}"; do gencode+=(-gencode "arch=compute_$arch,code=sm_$arch"); done
  "$nvcc" -std=c++20 -O3 -DWEIGHTED_LOSS_CUDA -Icsrc \
    -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
    -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr \
    "${gencode[@]}" -Xptxas -v --fatbin "$1" -o "$out/$name.fatbin" >"$out/$name.log" 2>&1 || rc=$?
  echo "$rc" >"$out/$name.rc"
}
for f in "${files[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do sleep 1; done
  compile "$f" &
done
wait
for f in "${files[@]}"; do
  name=$(basename "$f")
  log="$out/$name.log"
  if [ "$(cat "$out/$name.rc")" != 0 ]; then
    cat "$log"; echo "cuda-check: $f failed to compile"; status=1; continue
  fi
  # ptxas reports each kernel ("Compiling entry function '...' for 'sm_XY'") before its
  # registers: each line is labelled with the architecture of the entry above it
  awk -v f="$name" '/Compiling entry/ { match($0, /for .sm_[0-9]+./); arch = substr($0, RSTART + 5, RLENGTH - 6) }
                    /Compiling entry|registers/ { print arch " " f ": " $0 }' "$log"
  for arch in "${ARCHS[@]}"; do
    if ! grep -q "for 'sm_$arch'" "$log"; then
      cat "$log"; echo "cuda-check: no kernel of $f compiled for sm_$arch"; status=1
    fi
  done
  spills=$(awk '/Compiling entry/ { entry = $0 }
                /bytes spill/ && !/ 0 bytes spill stores, 0 bytes spill loads/ { print entry; print }' "$log")
  if [ -n "$spills" ]; then
    echo "$spills"; echo "cuda-check: register spill in $f"; status=1
  fi
done

glue=(csrc/cuda/*.cpp)
if [ ${#glue[@]} -gt 0 ]; then
  if inc=$("$python" -c "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'include'))" 2>/dev/null); then
    pyinc=$("$python" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
    # the toolkit's headers: where nvcc says it lives (it may be a wrapper script), or CUDA_HOME
    top=$("$nvcc" --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | grep -m1 -o "_TOP_=[^ ]*" | cut -d= -f2 || true)
    cudainc=""
    for d in "$top/.." "${CUDA_HOME:-}" /usr/local/cuda; do
      if [ -n "$d" ] && [ -f "$d/include/cuda_runtime.h" ]; then cudainc="$d/include"; break; fi
    done
    mkdir -p "$out/stub/c10/cuda/impl"
    [ -f "$inc/c10/cuda/impl/cuda_cmake_macros.h" ] || : > "$out/stub/c10/cuda/impl/cuda_cmake_macros.h"
    if [ -z "$cudainc" ]; then
      echo "cuda-check: no CUDA toolkit headers found; glue files not checked"; glue=()
    fi
    for f in "${glue[@]}"; do
      if ! g++ -std=c++20 -fsyntax-only -DWEIGHTED_LOSS_CUDA -I"$out/stub" -I"$inc" \
          -I"$inc/torch/csrc/api/include" -I"$pyinc" -I"$cudainc" -Icsrc "$f" 2>"$out/glue.log"; then
        cat "$out/glue.log"; echo "cuda-check: glue $f does not compile"; status=1
      else
        echo "glue $(basename "$f"): compiles against torch $("$python" -c 'import torch; print(torch.__version__)')"
      fi
    done
  else
    echo "cuda-check: torch is not importable; glue files not checked"
  fi
fi
exit $status
