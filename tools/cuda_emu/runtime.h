// The emulation's CUDA runtime subset (tools/cuda_emu/simt.h): errors,
// emulated devices and their attributes, each kernel's shared-memory
// opt-in, the counters the driver reports, and C10_CUDA_CHECK.
#pragma once
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "types.h"

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
};
struct CUstream_st;
using cudaStream_t = CUstream_st*;
enum cudaDeviceAttr : int {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaFuncAttribute : int { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
struct cudaFuncAttributes {
  size_t sharedSizeBytes, constSizeBytes, localSizeBytes;
  int maxThreadsPerBlock, numRegs, ptxVersion, binaryVersion, cacheModeCA, maxDynamicSharedSizeBytes;
};

namespace fsce::emu {

[[noreturn]] inline void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
inline void fail(const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  std::fprintf(stderr, "fsce-emu error: ");
  std::vfprintf(stderr, fmt, args);
  std::fprintf(stderr, " (block %u, thread %u)\n", blockIdx.x, threadIdx.x);
  va_end(args);
  std::fflush(stderr);
  std::_Exit(86);
}

struct Device {
  int sm_count, smem_per_sm, smem_per_block_optin;
};
constexpr Device kH100{132, 228 * 1024, 227 * 1024};
constexpr int kDefaultSmem = 48 * 1024;

// Process-wide state: the devices, each kernel's opt-in, and counters the
// driver reports (launches per kernel family, attribute queries).
struct Runtime {
  std::mutex m;
  std::vector<Device> devices{kH100};
  std::map<std::pair<int, const void*>, int> dynamic_smem_limit;
  std::map<std::string, int64_t> launches;
  int64_t device_queries = 0, function_queries = 0;
};
inline Runtime& runtime() {
  static Runtime r;
  return r;
}
inline thread_local int current_device = 0;
inline thread_local cudaError_t last_error = cudaSuccess;

inline int dynamic_smem_limit(const void* kernel) {
  Runtime& rt = runtime();
  std::lock_guard<std::mutex> lock(rt.m);
  const auto it = rt.dynamic_smem_limit.find({current_device, kernel});
  return it == rt.dynamic_smem_limit.end() ? kDefaultSmem : it->second;
}

}  // namespace fsce::emu

inline cudaError_t cudaGetDevice(int* device) {
  *device = fsce::emu::current_device;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int device) {
  auto& rt = fsce::emu::runtime();
  std::lock_guard<std::mutex> lock(rt.m);
  if (device < 0 || device >= static_cast<int>(rt.devices.size())) return cudaErrorInvalidDevice;
  fsce::emu::current_device = device;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  auto& rt = fsce::emu::runtime();
  std::lock_guard<std::mutex> lock(rt.m);
  if (device < 0 || device >= static_cast<int>(rt.devices.size())) return cudaErrorInvalidDevice;
  ++rt.device_queries;
  const fsce::emu::Device& d = rt.devices[device];
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = d.sm_count; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = d.smem_per_sm; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = d.smem_per_block_optin; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
// Static shared memory is not sized by the emulation (sharedSizeBytes = 0).
template <typename Kernel>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, Kernel) {
  auto& rt = fsce::emu::runtime();
  std::lock_guard<std::mutex> lock(rt.m);
  ++rt.function_queries;
  *attr = cudaFuncAttributes{};
  attr->maxThreadsPerBlock = 1024;
  return cudaSuccess;
}
template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel kernel, cudaFuncAttribute attr, int value) {
  auto& rt = fsce::emu::runtime();
  std::lock_guard<std::mutex> lock(rt.m);
  const int device = fsce::emu::current_device;
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      value > rt.devices[device].smem_per_block_optin)
    return cudaErrorInvalidValue;
  rt.dynamic_smem_limit[{device, reinterpret_cast<const void*>(kernel)}] = value;
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = fsce::emu::last_error;
  fsce::emu::last_error = cudaSuccess;
  return e;
}
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
  }
  return "unknown error";
}

#define C10_CUDA_CHECK(expr)                                                                   \
  do {                                                                                         \
    const cudaError_t fsce_emu_err = (expr);                                                   \
    if (fsce_emu_err != cudaSuccess)                                                           \
      throw std::runtime_error(std::string("CUDA error: ") + cudaGetErrorString(fsce_emu_err) + \
                               " at " __FILE__ ":" + std::to_string(__LINE__));                \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() C10_CUDA_CHECK(cudaGetLastError())
