// The CPU emulation stands in for this CUDA header (see tools/cuda_emu/simt.h).
#pragma once
#include "../simt.h"
