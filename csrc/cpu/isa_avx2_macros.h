// The macros that -mavx -mavx2 -mfma -mf16c would define and GCC's target pragma does not (sleef.h
// and at::vec test them). Included by isa_avx2.h and isa_avx512.h right after their pragma.
#pragma once
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
