// What a kernels_<isa>.cpp includes before its `#pragma GCC target`: every
// header with inline functions of external linkage (the standard library,
// c10, params.h, row_math.h). Those keep the default target, so that the one
// copy the linker keeps of each runs on any CPU; only the kernels' own
// functions (internal linkage, included after the pragma) take the ISA.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>

#include "../params.h"
#include "../row_math.h"
#include "isa.h"

#if FSCE_CPU_X86_ISAS
#include <immintrin.h>
#endif
