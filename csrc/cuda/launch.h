// Kernel launches and dynamic shared memory, spelled for nvcc and for the
// CPU emulation (tools/cuda_emu/simt.h), which compiles kernels.cu as host
// C++ so that CI runs every kernel under sanitizers. The kernel goes in
// parentheses, FSCE_LAUNCH((k<T, N>), grid, block, smem, stream)(args...),
// so that its template arguments stay one macro argument.
#pragma once

#if defined(__CUDACC__)
#define FSCE_LAUNCH(kernel, grid, block, smem, stream) kernel<<<grid, block, smem, stream>>>
#define FSCE_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#else
#define FSCE_LAUNCH(kernel, grid, block, smem, stream) \
  ::fsce::emu::Launcher(#kernel, kernel, grid, block, smem, stream)
#define FSCE_DYNAMIC_SHARED(type, name) type* const name = ::fsce::emu::dynamic_shared<type>()
#endif
