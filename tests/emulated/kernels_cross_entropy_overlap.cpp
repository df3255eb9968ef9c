// csrc/cuda/cross_entropy_overlap.cu as the host compiler builds it, to run in the emulator
// (tests/emulator/), in a namespace of its own beside a real CUDA build's.
#define WEIGHTED_LOSS_CUDA_NS emulated
#include "cuda/cross_entropy_overlap.cu"
