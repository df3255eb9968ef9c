// The CUDA kernels of BCE with logits as the host compiler builds them, to run in the emulator
// (../emulator/), in a namespace of their own beside a real CUDA build's.
#define WEIGHTED_LOSS_CUDA_NS emulated
#include "../binary_cross_entropy.cu"
