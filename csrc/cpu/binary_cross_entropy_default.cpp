// Baseline build of the BCE-with-logits CPU kernels (no ISA extension beyond the compiler's default).
#define CPU_CAPABILITY DEFAULT
#include "binary_cross_entropy_kernel.h"
