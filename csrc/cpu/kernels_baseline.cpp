// The baseline kernels, for any x86-64 (SSE2) or other CPU: 8 lanes.
#include "isa_prelude.h"
#include "vec_baseline.h"
#include "row_kernels.h"

FSCE_DEFINE_ISA_KERNELS(baseline)
