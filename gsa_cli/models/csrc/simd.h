// What both kernels of this folder share: SIMD vector types, aligned buffers, and the choice of an
// instruction set at run time (axial.cpp says how the variants are built).
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>
#include <utility>

namespace gsa_simd {

#define GSA_INLINE inline __attribute__((always_inline))

#if defined(__x86_64__) || defined(__i386__)
#define GSA_X86 1
#define GSA_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx2,fma")))
#define GSA_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define GSA_X86 0
#endif

// GCC/Clang vector types: element-wise arithmetic, a scalar operand broadcast. may_alias, as the
// intrinsics' own types, since the buffers are typed as scalars.
template <typename T, int Bytes>
struct VecType;
template <>
struct VecType<float, 16> {
  typedef float type __attribute__((vector_size(16), may_alias));
};
template <>
struct VecType<float, 32> {
  typedef float type __attribute__((vector_size(32), may_alias));
};
template <>
struct VecType<float, 64> {
  typedef float type __attribute__((vector_size(64), may_alias));
};
template <>
struct VecType<double, 16> {
  typedef double type __attribute__((vector_size(16), may_alias));
};
template <>
struct VecType<double, 32> {
  typedef double type __attribute__((vector_size(32), may_alias));
};
template <>
struct VecType<double, 64> {
  typedef double type __attribute__((vector_size(64), may_alias));
};

template <class V, typename T>
GSA_INLINE V load(const T* p) {
  return *reinterpret_cast<const V*>(p);
}

template <class V, typename T>
GSA_INLINE void store(T* p, V v) {
  *reinterpret_cast<V*>(p) = v;
}

// Unaligned loads and stores (a tensor's rows): the compiler emits one vector move.
template <class V, typename T>
GSA_INLINE V loadu(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <class V, typename T>
GSA_INLINE void storeu(T* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}

// In-register transpose of an N x N block (N vectors of N elements): rows[i][j] becomes rows[j][i].
// Bit by bit of the index: the pass for bit b swaps bit b of the row index with bit b of the element
// index, one two-source shuffle per output vector (vpermt2ps on AVX-512); log2(N) passes of N shuffles.
// Where the compiler lacks __builtin_shufflevector (GCC before 12), GSA_HAS_SHUFFLE is 0 and callers
// copy element by element.
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define GSA_HAS_SHUFFLE 1
#endif
#endif
#ifndef GSA_HAS_SHUFFLE
#define GSA_HAS_SHUFFLE 0
#endif

#if GSA_HAS_SHUFFLE
// Element j of the result: from the first vector where bit `Bit` of j equals `High`'s, else from the
// second, the two vectors' elements of bit `Bit` exchanged.
template <int N, int Bit, bool High, class V, size_t... J>
GSA_INLINE V exchange(V x, V y, std::index_sequence<J...>) {
  constexpr int step = 1 << Bit;
  return __builtin_shufflevector(
      x, y, (High ? (((J >> Bit) & 1) ? N + J : J + step) : (((J >> Bit) & 1) ? N + J - step : J))...);
}

template <class V, int N, int Bit = 0>
GSA_INLINE void transpose(V* rows) {
  if constexpr ((1 << Bit) < N) {
    constexpr int step = 1 << Bit;
    for (int i = 0; i < N; ++i) {
      if (i & step) continue;
      V x = rows[i], y = rows[i + step];
      rows[i] = exchange<N, Bit, false>(x, y, std::make_index_sequence<N>{});
      rows[i + step] = exchange<N, Bit, true>(x, y, std::make_index_sequence<N>{});
    }
    transpose<V, N, Bit + 1>(rows);
  }
}
#endif

// A 64-byte aligned scratch buffer.
template <typename T>
struct Buffer {
  T* data = nullptr;
  explicit Buffer(int64_t n) {
    size_t bytes = (static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(T) + 63) / 64 * 64;
    data = static_cast<T*>(std::aligned_alloc(64, bytes));
    if (data == nullptr) throw std::bad_alloc();
  }
  ~Buffer() { std::free(data); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
};

enum class Isa { baseline, avx2, avx512 };

// The best variant this CPU runs, at most `requested` ("avx512", "avx2" or anything else: baseline).
inline Isa pick_isa(const std::string& requested) {
#if GSA_X86
  __builtin_cpu_init();
  bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl");
  if (requested == "avx512" && avx512) return Isa::avx512;
  if ((requested == "avx512" || requested == "avx2") && avx2) return Isa::avx2;
#else
  (void)requested;
#endif
  return Isa::baseline;
}

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "baseline";
  }
}

// visit((S*)nullptr) for the storage type S of `type` (float, double, bfloat16 or float16): how the
// kernels pick the instantiation of a copy function for a tensor's dtype.
template <class Visit>
decltype(auto) visit_dtype(at::ScalarType type, const char* op, Visit&& visit) {
  switch (type) {
    case at::kFloat: return visit(static_cast<float*>(nullptr));
    case at::kDouble: return visit(static_cast<double*>(nullptr));
    case at::kBFloat16: return visit(static_cast<c10::BFloat16*>(nullptr));
    case at::kHalf: return visit(static_cast<c10::Half*>(nullptr));
    default: TORCH_CHECK(false, op, ": unsupported dtype ", type);
  }
}

}  // namespace gsa_simd
