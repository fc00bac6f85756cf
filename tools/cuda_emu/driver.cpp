// Runs a batch of cases through the real CUDA launchers (csrc/cuda/kernels.cu,
// compiled as host C++ over tools/cuda_emu/simt.h) and writes back every
// buffer. The cases come from tests/emulated.py, which fills each CEParams
// field as csrc/binding.cpp does and compares the results with float64
// PyTorch.
//
//   driver CASES OUT: reads CASES, writes OUT; prints per case "case I" to
//   stderr before it runs (a sanitizer report names the case it broke in),
//   and at the end the launches per kernel family and the device queries.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <stdexcept>
#include <string>
#include <vector>

#include "../../csrc/cuda/kernels.h"

namespace {

enum Op : int32_t { kForward = 0, kForwardInplace = 1, kBackward = 2, kScaleRows = 3 };

class Reader {
 public:
  explicit Reader(const char* path) : in_(path, std::ios::binary) {
    if (!in_) throw std::runtime_error(std::string("cannot read ") + path);
  }
  template <typename V>
  V get() {
    V v;
    in_.read(reinterpret_cast<char*>(&v), sizeof(V));
    if (!in_) throw std::runtime_error("truncated case file");
    return v;
  }
  void bytes(void* dst, uint64_t n) {
    in_.read(static_cast<char*>(dst), static_cast<std::streamsize>(n));
    if (!in_) throw std::runtime_error("truncated case file");
  }

 private:
  std::ifstream in_;
};

// A buffer of exactly its size (so that ASan sees an access past it),
// 256-byte aligned as cudaMalloc's are.
struct Buffer {
  void* data = nullptr;
  uint64_t size = 0;
  explicit Buffer(uint64_t n) : size(n) {
    if (posix_memalign(&data, 256, n > 0 ? n : 1) != 0) throw std::bad_alloc();
  }
  Buffer(Buffer&& o) noexcept : data(o.data), size(o.size) { o.data = nullptr; }
  Buffer(const Buffer&) = delete;
  ~Buffer() { std::free(data); }
};

struct Case {
  int32_t op = 0, device = 0;
  fsce::CEParams p{};
  std::vector<Buffer> buffers;
};

Case read_case(Reader& r) {
  Case c;
  fsce::CEParams& p = c.p;
  c.op = r.get<int32_t>();
  c.device = r.get<int32_t>();
  p.dtype = static_cast<fsce::DType>(r.get<int32_t>());
  p.target_prob_acc = r.get<int32_t>() != 0;
  for (int64_t* f : {&p.outer, &p.classes, &p.inner, &p.rows, &p.logits_outer_stride, &p.target_outer_stride,
                     &p.ignore_index, &p.class_offset, &p.total_classes, &p.grad_outer_stride,
                     &p.grad_output_stride})
    *f = r.get<int64_t>();
  for (double* f : {&p.label_smoothing, &p.logit_scale, &p.softcap}) *f = r.get<double>();
  // CEParams' pointers in the order tests/emulated.py writes them.
  // Each pointer: a buffer's index (or -1: null) and a byte offset into it.
  std::vector<std::pair<int32_t, int64_t>> at;
  for (int k = 0; k < 17; ++k) {
    const int32_t index = r.get<int32_t>();
    at.emplace_back(index, r.get<int64_t>());
  }
  const uint32_t n = r.get<uint32_t>();
  for (uint32_t b = 0; b < n; ++b) {
    c.buffers.emplace_back(r.get<uint64_t>());
    r.bytes(c.buffers.back().data, c.buffers.back().size);
  }
  const auto ptr = [&](int k) -> void* {
    const auto [index, offset] = at[k];
    if (index < 0) return nullptr;
    if (index >= static_cast<int32_t>(c.buffers.size())) throw std::runtime_error("bad buffer index");
    return static_cast<char*>(c.buffers[index].data) + offset;
  };
  p.logits = ptr(0);
  p.target_index = static_cast<const int64_t*>(ptr(1));
  p.target_prob = ptr(2);
  p.weight = ptr(3);
  p.weight_sum = ptr(4);
  p.loss = ptr(5);
  p.lse = ptr(6);
  p.pred = static_cast<int64_t*>(ptr(7));
  p.target_pred = static_cast<int64_t*>(ptr(8));
  p.grad = ptr(9);
  p.grad_output = ptr(10);
  p.grad_lse = ptr(11);
  p.grad_scale = ptr(12);
  p.lse_grad_scale = ptr(13);
  p.entropy = ptr(14);
  p.grad_entropy = ptr(15);
  p.row_weight = ptr(16);
  return c;
}

// Runs one case as the binding would; returns an error message or "".
std::string run_case(Case& c) {
  try {
    C10_CUDA_CHECK(cudaSetDevice(c.device));
    if (c.op == kForward || c.op == kForwardInplace) {
      const int64_t bytes = fsce::cuda::forward_workspace(c.p);
      if (bytes > 0) {
        c.buffers.emplace_back(static_cast<uint64_t>(bytes));
        std::memset(c.buffers.back().data, 0xff, bytes);  // poisoned, as a fresh workspace may be
        c.p.workspace = c.buffers.back().data;
      }
      fsce::cuda::forward(c.p, c.op == kForwardInplace, nullptr);
    } else if (c.op == kBackward) {
      fsce::cuda::backward(c.p, nullptr);
    } else if (c.op == kScaleRows) {
      fsce::cuda::scale_rows(c.p, nullptr);
    } else {
      return "unknown op " + std::to_string(c.op);
    }
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

void write(std::ofstream& out, const void* data, uint64_t n) {
  out.write(static_cast<const char*>(data), static_cast<std::streamsize>(n));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s CASES OUT\n", argv[0]);
    return 2;
  }
  Reader r(argv[1]);
  char magic[8];
  r.bytes(magic, 8);
  if (std::memcmp(magic, "FSCEEMU1", 8) != 0) throw std::runtime_error("not a case file");
  {
    auto& rt = fsce::emu::runtime();
    rt.devices.clear();
    const uint32_t n = r.get<uint32_t>();
    for (uint32_t d = 0; d < n; ++d) {
      const int32_t sm = r.get<int32_t>(), per_sm = r.get<int32_t>(), optin = r.get<int32_t>();
      rt.devices.push_back({sm, per_sm, optin});
    }
  }
  std::ofstream out(argv[2], std::ios::binary);
  const uint32_t cases = r.get<uint32_t>();
  write(out, &cases, 4);
  for (uint32_t i = 0; i < cases; ++i) {
    Case c = read_case(r);
    std::fprintf(stderr, "case %u\n", i);
    const std::string error = run_case(c);
    const uint32_t length = static_cast<uint32_t>(error.size());
    write(out, &length, 4);
    write(out, error.data(), length);
    const uint32_t n = static_cast<uint32_t>(c.buffers.size());
    write(out, &n, 4);
    for (const Buffer& b : c.buffers) {
      write(out, &b.size, 8);
      write(out, b.data, b.size);
    }
  }
  auto& rt = fsce::emu::runtime();
  for (const auto& [family, count] : rt.launches) std::printf("launch %s %lld\n", family.c_str(), static_cast<long long>(count));
  std::printf("queries device %lld function %lld\n", static_cast<long long>(rt.device_queries),
              static_cast<long long>(rt.function_queries));
  return out ? 0 : 1;
}
