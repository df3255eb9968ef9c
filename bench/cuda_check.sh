#!/usr/bin/env bash
# Compile every csrc/cuda/*.cu with nvcc for sm_80 and sm_90, or the architectures in
# CUDA_CHECK_ARCHS (CI gives "90": docs/development.md, "CI"), without torch (the .cu files
# include only CUDA headers, csrc/params.h and csrc/loss_math.h), print registers per kernel,
# and fail on any error or register spill. Device code only (--fatbin: no host object, which the
# emulated build compiles with the host compiler): 13% less work than a full compile. Each file
# and architecture is a job of its own (cicc + ptxas), as many at once as there are cores, the
# longest first, so that no long file runs alone at the end while the other core idles.
# Then check that every csrc/cuda/*.cpp glue file compiles (syntax and types) against the
# installed torch's headers and the CUDA toolkit's, which works with a CPU-only torch: its wheel
# ships the c10/cuda headers but not the generated cuda_cmake_macros.h, stubbed here.
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
read -r -a ARCHS <<<"${CUDA_CHECK_ARCHS:-80 90}"
# the files that take longest (cicc + ptxas per architecture on one idle core, 2026-12-08: rows
# ~284 s, lanes ~134 s, binary 88 s, of which ptxas is two thirds) first, the others in name order
LONGEST=(cross_entropy_rows.cu cross_entropy_lanes.cu binary_cross_entropy.cu)
ordered=()
for n in "${LONGEST[@]}"; do [ -f "csrc/cuda/$n" ] && ordered+=("csrc/cuda/$n"); done
for f in "${files[@]}"; do [[ " ${LONGEST[*]} " == *" $(basename "$f") "* ]] || ordered+=("$f"); done
jobs=$(nproc 2>/dev/null || echo 2)
compile() {  # file arch: the flags setup.py gives nvcc, and those torch.utils.cpp_extension adds
  local rc=0 name
  name=$(basename "$1").sm_$2
  "$nvcc" -std=c++20 -O3 -DWEIGHTED_LOSS_CUDA -Icsrc \
    -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
    -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr \
    -gencode "arch=compute_$2,code=sm_$2" -Xptxas -v --fatbin "$1" -o "$out/$name.fatbin" \
    >"$out/$name.log" 2>&1 || rc=$?
  echo "$rc" >"$out/$name.rc"
}
for f in "${ordered[@]}"; do
  for arch in "${ARCHS[@]}"; do
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do sleep 1; done
    compile "$f" "$arch" &
  done
done
wait
for f in "${files[@]}"; do
  for arch in "${ARCHS[@]}"; do
    name=$(basename "$f").sm_$arch
    log="$out/$name.log"
    if [ "$(cat "$out/$name.rc")" != 0 ]; then
      cat "$log"; echo "cuda-check: $f failed to compile for sm_$arch"; status=1; continue
    fi
    if ! grep -q "for 'sm_$arch'" "$log"; then
      cat "$log"; echo "cuda-check: no kernel of $f compiled for sm_$arch"; status=1
    fi
    awk -v f="$(basename "$f")" -v a="sm_$arch" '/Compiling entry|registers/ { print a " " f ": " $0 }' "$log"
    spills=$(awk '/Compiling entry/ { entry = $0 }
                  /bytes spill/ && !/ 0 bytes spill stores, 0 bytes spill loads/ { print entry; print }' "$log")
    if [ -n "$spills" ]; then
      echo "$spills"; echo "cuda-check: register spill in $f for sm_$arch"; status=1
    fi
  done
done

glue=(csrc/cuda/*.cpp)
if [ ${#glue[@]} -gt 0 ]; then
  if inc=$("$python" -c "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'include'))" 2>/dev/null); then
    pyinc=$("$python" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
    # the toolkit's headers: where nvcc says it lives (it may be a wrapper script), or CUDA_HOME
    bin=$("$nvcc" --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | grep -m1 -o "_HERE_=[^ ]*" | cut -d= -f2 || true)
    cudainc=""
    for d in "${bin:+$bin/..}" "${CUDA_HOME:-}" /usr/local/cuda; do
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
