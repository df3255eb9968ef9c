// Baseline build of the CPU kernels (no ISA extension beyond the compiler's default).
#define CPU_CAPABILITY DEFAULT
#include "cross_entropy_kernel.h"
