// Included first by the AVX-512 build of each CPU kernel file (*_avx512.cpp): F, BW, VL, DQ, the
// subset PyTorch's AVX512 capability uses. See isa_avx2.h for how a file picks its ISA.
#pragma once
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx,avx2,fma,f16c,bmi,bmi2,popcnt")
#include "isa_avx2_macros.h"
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#define CPU_CAPABILITY AVX512
// GCC's AVX-512 intrinsics start some vectors from _mm512_undefined_*(), which GCC 12 reports as
// used uninitialized wherever one is inlined: ~2,700 warnings a file, none of them ours. Silenced
// inside the intrinsics' header only (location-based), so a warning in our code still shows.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#define CPU_CAPABILITY_AVX512
