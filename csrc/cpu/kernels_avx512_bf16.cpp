// The AVX-512 bf16 kernels with AVX512-BF16: bf16 stores through
// vcvtneps2bf16 (see vec_avx512.h); loads need no conversion instruction.
#include "isa_prelude.h"
#if FSCE_CPU_X86_ISAS
#pragma GCC target("arch=x86-64-v4,avx512bf16")
#include "vec_avx512.h"
#include "row_kernels.h"

namespace fsce::cpu::avx512_bf16 {
const DTypeKernels bf16 = kernels_of<c10::BFloat16>();
}
#endif
