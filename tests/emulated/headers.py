"""Where the CUDA headers the emulated build needs are: the include directories of a CUDA toolkit
(CUDA_HOME, /usr/local/cuda) or of NVIDIA's pip wheels (nvidia-cuda-runtime, nvidia-cuda-crt,
nvidia-cuda-cccl), whichever first holds all of REQUIRED.

    python tests/emulated/headers.py           prints them, one per line; exits 1 if none
    python tests/emulated/headers.py --wheels  prints the pip requirements of the wheels
"""
import glob
import os
import sys

# what the .cu files and the emulator include, and what those include in turn
REQUIRED = ("cuda_runtime_api.h", "cuda_runtime.h", "cuda_bf16.h", "cuda_fp16.h",
            "crt/host_defines.h", "nv/target")

# the wheels that hold them, at the CUDA version of the toolkit seen here (13.0)
WHEELS = ("nvidia-cuda-runtime==13.0.96", "nvidia-cuda-crt==13.0.88", "nvidia-cuda-cccl==13.0.85")


def _roots():
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            yield os.path.join(home, "include")
    try:
        import nvidia  # namespace package of NVIDIA's wheels
        for base in nvidia.__path__:
            yield from sorted(glob.glob(os.path.join(base, "*", "include")))
    except ImportError:
        pass


def find():
    """The include directories (a root and its cccl/), or None."""
    for root in _roots():
        dirs = [d for d in (root, os.path.join(root, "cccl")) if os.path.isdir(d)]
        if all(any(os.path.exists(os.path.join(d, h)) for d in dirs) for h in REQUIRED):
            return dirs
    return None


if __name__ == "__main__":
    if sys.argv[1:] == ["--wheels"]:
        print(" ".join(WHEELS))
        sys.exit(0)
    found = find()
    if found is None:
        sys.exit(1)
    print("\n".join(found))
