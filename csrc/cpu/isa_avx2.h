// Included first by the AVX2 build of each CPU kernel file (*_avx2.cpp). setup.py compiles every
// file with the same flags, so the ISA is chosen here: the target pragma, ahead of every other
// include, compiles all code of the including file (at::vec's AVX2 specializations included) for
// AVX2 + FMA. GCC's pragma does not define the macros that -mavx2 -mfma would, and sleef.h and
// at::vec test them, so they are defined by hand. The code runs only after dispatch.cpp has seen
// that the CPU supports it.
#pragma once
#pragma GCC target("avx,avx2,fma,f16c,bmi,bmi2,popcnt")
#include "isa_avx2_macros.h"
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
