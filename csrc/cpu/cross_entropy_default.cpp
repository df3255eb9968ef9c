// Baseline build of the cross-entropy CPU kernels (no ISA extension beyond the compiler's default).
#define CPU_CAPABILITY DEFAULT
#include "cross_entropy_kernel.h"
