// AVX2 build of the cross-entropy CPU kernels; the ISA preamble must come before every include.
#if defined(__x86_64__) || defined(_M_X64)
#include "isa_avx2.h"
#include "cross_entropy_kernel.h"
#endif
