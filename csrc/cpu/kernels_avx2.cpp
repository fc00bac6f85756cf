// The AVX2 kernels (x86-64-v3: AVX2, FMA, F16C): 8 lanes.
#include "isa_prelude.h"
#if FSCE_CPU_X86_ISAS
#pragma GCC target("arch=x86-64-v3")
#include "vec_avx2.h"
#include "row_kernels.h"

FSCE_DEFINE_ISA_KERNELS(avx2)
#endif
