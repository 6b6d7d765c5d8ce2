// What the CUDA-emulation tests (emu_test.cpp, emu_mla_test.cpp, emu_scan_test.cpp) share: the
// check counters, expect(), typed flat buffers (fp32/fp16/bf16) and the argument-check helper.
// Include after cuda_emu.h and ../../cpu/convert.h; define EMU_SEED first for the tests' rng.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#ifndef EMU_SEED
#define EMU_SEED 1
#endif

static std::mt19937_64 rng(EMU_SEED);
static int failures = 0, checks = 0;

static void expect(bool ok, const std::string& what) {
  ++checks;
  if (!ok) {
    ++failures;
    std::printf("FAIL %s\n", what.c_str());
  }
}

static int esize(int dt) { return dt == fastlayers::kF32 ? 4 : 2; }

// f(...) throws std::invalid_argument (an entry point's argument check).
template <class F>
static bool throws_invalid(F&& f) {
  try {
    f();
  } catch (const std::invalid_argument&) {
    return true;
  }
  return false;
}

// A flat tensor of one dtype (16 bytes of slack at the end), read and written as float.
struct Buf {
  int dt = fastlayers::kF32;
  std::vector<uint8_t> b;
  Buf(int dt_, int64_t n) : dt(dt_), b(size_t(n * esize(dt_) + 16), 0) {}
  void* p() { return b.data(); }
  int64_t n() const { return (int64_t(b.size()) - 16) / esize(dt); }
  float get(int64_t i) const {
    if (dt == fastlayers::kF32) {
      float f;
      std::memcpy(&f, b.data() + 4 * i, 4);
      return f;
    }
    uint16_t s;
    std::memcpy(&s, b.data() + 2 * i, 2);
    return dt == fastlayers::kBF16 ? fastlayers::cpu::bf16_to_f32(s) : emu_f16_bits_to_f32(s);
  }
  void set(int64_t i, float v) {
    if (dt == fastlayers::kF32) {
      std::memcpy(b.data() + 4 * i, &v, 4);
      return;
    }
    const uint16_t s = dt == fastlayers::kBF16 ? fastlayers::cpu::f32_to_bf16(v) : uint16_t(emu_f32_to_f16_bits(v));
    std::memcpy(b.data() + 2 * i, &s, 2);
  }
  void random(float mean = 0.f, float sd = 1.f) {
    std::normal_distribution<float> d(mean, sd);
    for (int64_t i = 0; i < n(); ++i) set(i, d(rng));
  }
  void poison() {
    for (int64_t i = 0; i < n(); ++i) set(i, NAN);
  }
  fastlayers::View4 view(int64_t s0, int64_t s1, int64_t s2, int64_t s3 = 0) {
    return fastlayers::View4{b.data(), dt, {s0, s1, s2, s3}};
  }
};
