// The case files of the emulated CUDA drivers (driver.cpp, jsd_driver.cpp):
// reading cases and buffers, and writing results (tests/emulated.py writes
// and reads the other side).
#pragma once
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <new>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "runtime.h"

namespace fsce::emu {

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

inline void write(std::ofstream& out, const void* data, uint64_t n) {
  out.write(static_cast<const char*>(data), static_cast<std::streamsize>(n));
}

// A case's `count` pointers, each a buffer's index (or -1: null) and a byte
// offset into it, then its buffers (appended to `buffers`); -> the
// pointers' addresses.
inline std::vector<void*> read_pointers(Reader& r, int count, std::vector<Buffer>& buffers) {
  std::vector<std::pair<int32_t, int64_t>> at;
  for (int k = 0; k < count; ++k) {
    const int32_t index = r.get<int32_t>();
    at.emplace_back(index, r.get<int64_t>());
  }
  const uint32_t n = r.get<uint32_t>();
  for (uint32_t b = 0; b < n; ++b) {
    buffers.emplace_back(r.get<uint64_t>());
    r.bytes(buffers.back().data, buffers.back().size);
  }
  std::vector<void*> out;
  for (const auto& [index, offset] : at) {
    if (index >= static_cast<int32_t>(buffers.size())) throw std::runtime_error("bad buffer index");
    out.push_back(index < 0 ? nullptr : static_cast<char*>(buffers[index].data) + offset);
  }
  return out;
}

// Checks the magic and loads the emulated devices of the file's header.
inline void read_header(Reader& r) {
  char magic[8];
  r.bytes(magic, 8);
  if (std::memcmp(magic, "FSCEEMU1", 8) != 0) throw std::runtime_error("not a case file");
  auto& rt = runtime();
  rt.devices.clear();
  const uint32_t n = r.get<uint32_t>();
  for (uint32_t d = 0; d < n; ++d) {
    const int32_t sm = r.get<int32_t>(), per_sm = r.get<int32_t>(), optin = r.get<int32_t>();
    rt.devices.push_back({sm, per_sm, optin});
  }
}

// One case's result: its error message ("" for none), then every buffer.
inline void write_result(std::ofstream& out, const std::string& error, const std::vector<Buffer>& buffers) {
  const uint32_t length = static_cast<uint32_t>(error.size());
  write(out, &length, 4);
  write(out, error.data(), length);
  const uint32_t n = static_cast<uint32_t>(buffers.size());
  write(out, &n, 4);
  for (const Buffer& b : buffers) {
    write(out, &b.size, 8);
    write(out, b.data, b.size);
  }
}

// The launches per kernel family and the device queries, on stdout.
inline void print_counters() {
  auto& rt = runtime();
  for (const auto& [family, count] : rt.launches)
    std::printf("launch %s %lld\n", family.c_str(), static_cast<long long>(count));
  std::printf("queries device %lld function %lld\n", static_cast<long long>(rt.device_queries),
              static_cast<long long>(rt.function_queries));
}

// A driver's main: `prog CASES OUT`. Reads the header, then per case
// read_case(reader) -> a case with .buffers, prints "case I" to stderr (a
// sanitizer report names the case it broke in), runs launch(case) (an
// exception becomes the case's error message) and writes the result; at the
// end the counters.
template <typename ReadCase, typename Launch>
int drive(int argc, char** argv, ReadCase read_case, Launch launch) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s CASES OUT\n", argv[0]);
    return 2;
  }
  Reader r(argv[1]);
  read_header(r);
  std::ofstream out(argv[2], std::ios::binary);
  const uint32_t cases = r.get<uint32_t>();
  write(out, &cases, 4);
  for (uint32_t i = 0; i < cases; ++i) {
    auto c = read_case(r);
    std::fprintf(stderr, "case %u\n", i);
    std::string error;
    try {
      error = launch(c);
    } catch (const std::exception& e) {
      error = e.what();
    }
    write_result(out, error, c.buffers);
  }
  print_counters();
  return out ? 0 : 1;
}

}  // namespace fsce::emu
