// The AVX-512 kernels (x86-64-v4): 16 lanes.
#include "isa_prelude.h"
#if FSCE_CPU_X86_ISAS
#pragma GCC target("arch=x86-64-v4")
#include "vec_avx512.h"
#include "row_kernels.h"

FSCE_DEFINE_ISA_KERNELS(avx512)
#endif
