// AVX-512 build of the BCE-with-logits CPU kernels; the ISA preamble must come before every include.
#if defined(__x86_64__) || defined(_M_X64)
#include "isa_avx512.h"
#include "binary_cross_entropy_kernel.h"
#endif
