// Portable vector types (GCC/Clang vector extensions) sized to the widest registers this build
// targets, shared by the kernels: Vec<T> holds LANES<T> values of T; load/store copy unaligned;
// sum_lanes adds a vector's lanes; bf16_to_float widens one bf16 value; in_register pins a loaded value.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
constexpr int VECTOR_BYTES = 64;
#elif defined(__AVX2__)
constexpr int VECTOR_BYTES = 32;
#else
constexpr int VECTOR_BYTES = 16;
#endif

namespace {

template <typename T> struct VecOf { typedef T type __attribute__((vector_size(VECTOR_BYTES))); };
template <typename T> using Vec = typename VecOf<T>::type;
template <typename T> constexpr int LANES = VECTOR_BYTES / sizeof(T);

template <typename T> inline Vec<T> load(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <typename T> inline void store(T* p, Vec<T> v) { std::memcpy(p, &v, sizeof v); }

// The sum of v's lanes, pairwise (log2(lanes) dependent adds instead of one chain through every lane).
template <typename T> inline T sum_lanes(Vec<T> v) {
  T lanes[LANES<T>];
  std::memcpy(lanes, &v, sizeof v);
  for (int width = LANES<T> / 2; width > 0; width /= 2)
    for (int i = 0; i < width; ++i) lanes[i] += lanes[i + width];
  return lanes[0];
}

// Keeps v in a register from here on: compilers otherwise fold its load into every instruction that
// uses it, loading the same data once per use, which slows loops bound by loads (GCC; up to 1.6×).
template <typename T> inline void in_register(T& v) {
#if defined(__x86_64__) || defined(__i386__)
  asm("" : "+v"(v));
#elif defined(__aarch64__)
  asm("" : "+w"(v));
#endif
}

// A bf16 value (its bits) as fp32: the bits shifted to the upper half.
inline float bf16_to_float(uint16_t bits) {
  const uint32_t wide = uint32_t(bits) << 16;
  float value;
  std::memcpy(&value, &wide, sizeof value);
  return value;
}

}  // namespace
