// The emulation's built-in CUDA types (tools/cuda_emu/simt.h): dim3, the
// vector types, __half and __nv_bfloat16 with round-to-nearest-even, and
// the thread coordinates the scheduler sets.
#pragma once
#include <cstdint>
#include <cstring>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};

// Copies are member-wise: GCC's TSan leaves some whole-struct copies of
// small structs uninstrumented, which would hide a race on a vector load.
struct alignas(8) uint2 {
  unsigned x, y;
  uint2() = default;
  uint2(const uint2& o) : x(o.x), y(o.y) {}
  uint2& operator=(const uint2& o) {
    x = o.x, y = o.y;
    return *this;
  }
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
  uint4() = default;
  uint4(const uint4& o) : x(o.x), y(o.y), z(o.z), w(o.w) {}
  uint4& operator=(const uint4& o) {
    x = o.x, y = o.y, z = o.z, w = o.w;
    return *this;
  }
};

#define FSCE_EMU_HALF_TYPE(name)          \
  struct name {                           \
    uint16_t bits;                        \
    name() = default;                     \
    name(const name& o) : bits(o.bits) {} \
    name& operator=(const name& o) {      \
      bits = o.bits;                      \
      return *this;                       \
    }                                     \
  }
FSCE_EMU_HALF_TYPE(__half);
FSCE_EMU_HALF_TYPE(__nv_bfloat16);
#undef FSCE_EMU_HALF_TYPE

inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.bits, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float f) {  // _Float16 converts with round-to-nearest-even
  const _Float16 h = static_cast<_Float16>(f);
  __half out;
  std::memcpy(&out.bits, &h, 2);
  return out;
}
inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t u = static_cast<uint32_t>(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  __nv_bfloat16 out;
  if ((u & 0x7fffffffu) > 0x7f800000u)
    out.bits = static_cast<uint16_t>((u >> 16) | 0x40);  // a quiet nan
  else
    out.bits = static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
  return out;
}

inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
constexpr int warpSize = 32;
