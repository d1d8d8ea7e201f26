// GSA's content branch (shared/spec/GSA.md 1.1) as one fused CPU kernel, forward and backward.
//
// For every image and head, queries q and keys k (d channels at N positions) and values v (c channels):
//
//     K[i, n]       = exp(k[i, n]) / sum_n' exp(k[i, n'])     (each key channel softmaxed over positions)
//     context[i, j] = sum_n K[i, n] v[j, n]                   (d x c)
//     out[j, n]     = sum_i context[i, j] q[i, n]
//
// and backward, with g = d loss / d out:
//
//     grad_context[i, j] = sum_n q[i, n] g[j, n]
//     grad_q[i, n]       = sum_j context[i, j] g[j, n]
//     grad_v[j, n]       = sum_i grad_context[i, j] K[i, n]
//     grad_K[i, n]       = sum_j grad_context[i, j] v[j, n]
//     grad_k[i, n]       = K[i, n] (grad_K[i, n] - sum_n' K[i, n'] grad_K[i, n'])
//
// How: one work item is one (image, head). Its rows are copied, whatever their strides and dtype, into
// small buffers in the compute type (float, or double for float64 inputs), padded with zeros to whole
// SIMD vectors, so that every product above is a loop of vector multiply-adds over the positions; the
// softmax (with a vectorised exp for float) and the d x c matrices are formed in cache, and nothing of
// the activations' size is written but the results. Backward forms the softmax and the context again.
// at::parallel_for runs over the items. The loops are compiled for each instruction set as in axial.cpp.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "simd.h"

namespace {

using namespace gsa_simd;

// One instruction set's vector over the positions.
template <typename T, int VBytes>
struct Simd {
  using scalar = T;
  using vec = typename VecType<T, VBytes>::type;
  typedef int32_t ivec __attribute__((vector_size(VBytes / sizeof(T) * 4)));
  static constexpr int VW = VBytes / static_cast<int>(sizeof(T));
};

// exp of a float vector: Cephes' expf (range reduction by ln 2, a degree-5 polynomial; about 1 ulp),
// its input clamped to [-87, 88] (below, a softmax's weight is 0 to float precision anyway).
template <class C>
GSA_INLINE typename C::vec exp_float(typename C::vec x) {
  using V = typename C::vec;
  using I = typename C::ivec;
  const V lo = V{} - 87.0f, hi = V{} + 88.0f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  V fx = x * 1.44269504088896341f + 0.5f;
  I n = __builtin_convertvector(fx, I);  // towards zero: one too high where fx < 0 is not whole
  V fn = __builtin_convertvector(n, V);
  n += (fn > fx);  // a true comparison is -1
  fn = __builtin_convertvector(n, V);
  V r = x - fn * 0.693359375f + fn * 2.12194440e-4f;
  V p = V{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  V y = p * r * r + r + 1.0f;
  I bits = (n + 127) << 23;
  return y * reinterpret_cast<V&>(bits);
}

// n rounded up to whole vectors: a row's length in the buffers (its padding zero).
template <class C>
GSA_INLINE int64_t padded(int64_t n) {
  return (n + C::VW - 1) / C::VW * C::VW;
}

// The sum of a vector's lanes: halves added until four lanes are left (a shuffle and an add per
// halving, where adding the lanes one by one cost as much as the products it ends, on short rows).
template <class C>
GSA_INLINE typename C::scalar hsum(typename C::vec v) {
  using T = typename C::scalar;
  if constexpr (sizeof(typename C::vec) > 16) {
    using Half = typename VecType<T, sizeof(typename C::vec) / 2>::type;
    const T* lanes = reinterpret_cast<const T*>(&v);
    return hsum<Simd<T, sizeof(Half)>>(loadu<Half>(lanes) + loadu<Half>(lanes + C::VW / 2));
  } else {
    T sum = 0;
    for (int l = 0; l < C::VW; ++l) sum += v[l];
    return sum;
  }
}

// Each of `rows` rows of `row` (Np long, N of them real) softmaxed in place; the padding stays zero.
template <class C>
GSA_INLINE void softmax_rows(typename C::scalar* row, int64_t rows, int64_t N, int64_t Np) {
  using V = typename C::vec;
  using T = typename C::scalar;
  constexpr int VW = C::VW;
  for (int64_t i = 0; i < rows; ++i, row += Np) {
    V tops = V{} - std::numeric_limits<T>::infinity();
    int64_t whole = N / VW * VW;
    for (int64_t n = 0; n < whole; n += VW) {
      V x = load<V>(row + n);
      tops = x > tops ? x : tops;
    }
    T top = -std::numeric_limits<T>::infinity();
    for (int l = 0; l < VW; ++l) top = std::max(top, tops[l]);
    for (int64_t n = whole; n < N; ++n) top = std::max(top, row[n]);
    if constexpr (std::is_same_v<T, float>) {
      for (int64_t n = 0; n < Np; n += VW) store(row + n, exp_float<C>(load<V>(row + n) - top));
      for (int64_t n = N; n < Np; ++n) row[n] = T(0);
    } else {
      for (int64_t n = 0; n < N; ++n) row[n] = std::exp(row[n] - top);
    }
    V sums = V{};
    for (int64_t n = 0; n < Np; n += VW) sums += load<V>(row + n);
    const T scale = T(1) / hsum<C>(sums);
    for (int64_t n = 0; n < Np; n += VW) store(row + n, load<V>(row + n) * scale);
  }
}

// out[i * nb + j] = sum_n a[i][n] * b[j][n] for i < na, j < nb, rows Np long. Long rows: vectors over the
// positions, IR x JR dot products at a time, each summed across its lanes at the end. Short rows (where
// those sums would cost more than the products): b transposed into bt [Np][nbp] (nbp: nb padded to whole
// vectors), vectors over j, IR rows by JV vectors at a time.
template <class C, int IR, int JR>
GSA_INLINE void dot_tile(const typename C::scalar* a, const typename C::scalar* b, int64_t Np, int64_t nb,
                         int64_t i0, int64_t j0, typename C::scalar* out) {
  using V = typename C::vec;
  V acc[IR][JR];
  for (int r = 0; r < IR; ++r)
    for (int s = 0; s < JR; ++s) acc[r][s] = V{};
  for (int64_t n = 0; n < Np; n += C::VW) {
    V bv[JR];
    for (int s = 0; s < JR; ++s) bv[s] = load<V>(b + (j0 + s) * Np + n);
    for (int r = 0; r < IR; ++r) {
      V av = load<V>(a + (i0 + r) * Np + n);
      for (int s = 0; s < JR; ++s) acc[r][s] += av * bv[s];
    }
  }
  for (int r = 0; r < IR; ++r)
    for (int s = 0; s < JR; ++s) out[(i0 + r) * nb + j0 + s] = hsum<C>(acc[r][s]);
}

template <class C, int IR, int JV>
GSA_INLINE void dot_tile_t(const typename C::scalar* a, const typename C::scalar* bt, int64_t N, int64_t Np,
                           int64_t nb, int64_t nbp, int64_t i0, int64_t jv0, typename C::scalar* out) {
  using V = typename C::vec;
  using T = typename C::scalar;
  constexpr int VW = C::VW;
  V acc[IR][JV];
  for (int r = 0; r < IR; ++r)
    for (int v = 0; v < JV; ++v) acc[r][v] = V{};
  for (int64_t n = 0; n < N; ++n) {
    V bv[JV];
    for (int v = 0; v < JV; ++v) bv[v] = load<V>(bt + n * nbp + (jv0 + v) * VW);
    for (int r = 0; r < IR; ++r) {
      T ab = a[(i0 + r) * Np + n];
      for (int v = 0; v < JV; ++v) acc[r][v] += ab * bv[v];
    }
  }
  for (int r = 0; r < IR; ++r)
    for (int v = 0; v < JV; ++v)
      for (int l = 0; l < VW && (jv0 + v) * VW + l < nb; ++l) out[(i0 + r) * nb + (jv0 + v) * VW + l] = acc[r][v][l];
}

// Whether dot_rows transposes b (short rows); bt then needs Np * nbp elements.
template <class C>
GSA_INLINE bool transposes(int64_t Np) {
  return Np < 8 * C::VW;
}

template <class C>
GSA_INLINE void dot_rows(const typename C::scalar* a, int64_t na, const typename C::scalar* b, int64_t nb,
                         int64_t N, int64_t Np, typename C::scalar* bt, typename C::scalar* out) {
  using T = typename C::scalar;
  if (transposes<C>(Np)) {
    const int64_t nbp = padded<C>(nb), vectors = nbp / C::VW;
#if GSA_HAS_SHUFFLE
    // VW x VW blocks transposed in registers; the rows past nb zero.
    using V = typename C::vec;
    constexpr int VW = C::VW;
    for (int64_t n0 = 0; n0 < N; n0 += VW) {
      for (int64_t j0 = 0; j0 < nbp; j0 += VW) {
        V block[VW];
        for (int t = 0; t < VW; ++t) block[t] = j0 + t < nb ? load<V>(b + (j0 + t) * Np + n0) : V{};
        transpose<V, VW>(block);
        for (int t = 0; t < VW && n0 + t < N; ++t) store(bt + (n0 + t) * nbp + j0, block[t]);
      }
    }
#else
    for (int64_t n = 0; n < N; ++n) {
      T* row = bt + n * nbp;
      for (int64_t j = 0; j < nb; ++j) row[j] = b[j * Np + n];
      for (int64_t j = nb; j < nbp; ++j) row[j] = T(0);
    }
#endif
    int64_t i0 = 0;
    for (; i0 + 4 <= na; i0 += 4) {
      int64_t v0 = 0;
      for (; v0 + 2 <= vectors; v0 += 2) dot_tile_t<C, 4, 2>(a, bt, N, Np, nb, nbp, i0, v0, out);
      for (; v0 < vectors; ++v0) dot_tile_t<C, 4, 1>(a, bt, N, Np, nb, nbp, i0, v0, out);
    }
    for (; i0 < na; ++i0)
      for (int64_t v0 = 0; v0 < vectors; ++v0) dot_tile_t<C, 1, 1>(a, bt, N, Np, nb, nbp, i0, v0, out);
    return;
  }
  constexpr int IR = sizeof(typename C::vec) == 64 ? 4 : 2;  // AVX-512's 32 registers hold 4 x 4 sums
  int64_t i0 = 0;
  for (; i0 + IR <= na; i0 += IR) {
    int64_t j0 = 0;
    for (; j0 + 4 <= nb; j0 += 4) dot_tile<C, IR, 4>(a, b, Np, nb, i0, j0, out);
    for (; j0 < nb; ++j0) dot_tile<C, IR, 1>(a, b, Np, nb, i0, j0, out);
  }
  for (; i0 < na; ++i0) {
    int64_t j0 = 0;
    for (; j0 + 4 <= nb; j0 += 4) dot_tile<C, 1, 4>(a, b, Np, nb, i0, j0, out);
    for (; j0 < nb; ++j0) dot_tile<C, 1, 1>(a, b, Np, nb, i0, j0, out);
  }
}

// out[j][n] = sum_i w[i * si + j * sj] * a[i][n] for j < nout, i < na, rows Np long: JR rows by NR
// vectors at a time.
template <class C, int JR, int NR>
GSA_INLINE void combine_tile(const typename C::scalar* w, int64_t si, int64_t sj, const typename C::scalar* a,
                             int64_t na, int64_t Np, int64_t j0, int64_t n0, typename C::scalar* out) {
  using V = typename C::vec;
  constexpr int VW = C::VW;
  V acc[JR][NR];
  for (int s = 0; s < JR; ++s)
    for (int t = 0; t < NR; ++t) acc[s][t] = V{};
  for (int64_t i = 0; i < na; ++i) {
    V av[NR];
    for (int t = 0; t < NR; ++t) av[t] = load<V>(a + i * Np + n0 + t * VW);
    for (int s = 0; s < JR; ++s) {
      typename C::scalar ws = w[i * si + (j0 + s) * sj];
      for (int t = 0; t < NR; ++t) acc[s][t] += av[t] * ws;
    }
  }
  for (int s = 0; s < JR; ++s)
    for (int t = 0; t < NR; ++t) store(out + (j0 + s) * Np + n0 + t * VW, acc[s][t]);
}

template <class C, int JR>
GSA_INLINE void combine_columns(const typename C::scalar* w, int64_t si, int64_t sj, const typename C::scalar* a,
                                int64_t na, int64_t Np, int64_t j0, typename C::scalar* out) {
  int64_t n0 = 0;
  for (; n0 + 3 * C::VW <= Np; n0 += 3 * C::VW) combine_tile<C, JR, 3>(w, si, sj, a, na, Np, j0, n0, out);
  for (; n0 < Np; n0 += C::VW) combine_tile<C, JR, 1>(w, si, sj, a, na, Np, j0, n0, out);
}

template <class C>
GSA_INLINE void combine_rows(const typename C::scalar* w, int64_t si, int64_t sj, const typename C::scalar* a,
                             int64_t na, int64_t nout, int64_t Np, typename C::scalar* out) {
  int64_t j0 = 0;
  for (; j0 + 4 <= nout; j0 += 4) combine_columns<C, 4>(w, si, sj, a, na, Np, j0, out);
  for (; j0 < nout; ++j0) combine_columns<C, 1>(w, si, sj, a, na, Np, j0, out);
}

// ---------------------------------------------------------------------------------------------------
// Operands: a (B, h, channels, N) tensor of any strides and floating dtype, copied row by row.

struct Operand {
  void* data;
  int64_t batch, head, channel, pos;
};

Operand operand_of(const at::Tensor& t) {
  return {const_cast<void*>(t.const_data_ptr()), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

template <typename T>
using PackFn = void (*)(const Operand&, int64_t, int64_t, int64_t, int64_t, int64_t, T*);
template <typename T>
using UnpackFn = void (*)(const T*, const Operand&, int64_t, int64_t, int64_t, int64_t, int64_t);

// rows [channels][Np] of image b, head h; positions past N zero.
template <typename S, typename T>
void pack(const Operand& o, int64_t b, int64_t h, int64_t channels, int64_t N, int64_t Np, T* dst) {
  const S* base = static_cast<const S*>(o.data) + b * o.batch + h * o.head;
  for (int64_t ch = 0; ch < channels; ++ch, dst += Np) {
    const S* src = base + ch * o.channel;
    if (o.pos == 1) {
      for (int64_t n = 0; n < N; ++n) dst[n] = static_cast<T>(src[n]);
    } else {
      for (int64_t n = 0; n < N; ++n) dst[n] = static_cast<T>(src[n * o.pos]);
    }
    for (int64_t n = N; n < Np; ++n) dst[n] = T(0);
  }
}

template <typename S, typename T>
void unpack(const T* src, const Operand& o, int64_t b, int64_t h, int64_t channels, int64_t N, int64_t Np) {
  S* base = static_cast<S*>(o.data) + b * o.batch + h * o.head;
  for (int64_t ch = 0; ch < channels; ++ch, src += Np) {
    S* dst = base + ch * o.channel;
    for (int64_t n = 0; n < N; ++n) dst[n * o.pos] = static_cast<S>(src[n]);
  }
}

template <typename T>
PackFn<T> pack_for(at::ScalarType type) {
  return visit_dtype(type, "gsa native content attention",
                     [](auto* s) -> PackFn<T> { return pack<std::remove_pointer_t<decltype(s)>, T>; });
}

template <typename T>
UnpackFn<T> unpack_for(at::ScalarType type) {
  return visit_dtype(type, "gsa native content attention",
                     [](auto* s) -> UnpackFn<T> { return unpack<std::remove_pointer_t<decltype(s)>, T>; });
}

struct Sizes {
  int64_t batch, heads, d, c, N;
};

// Everything one call's work items read and write; grads not needed have a null data pointer.
template <typename T>
struct Args {
  Sizes s;
  Operand grad, queries, keys, values, out, grad_queries, grad_keys, grad_values;
  PackFn<T> pack_grad, pack_queries, pack_keys, pack_values;
  UnpackFn<T> unpack_out, unpack_grad_queries, unpack_grad_keys, unpack_grad_values;
};

// The transposed rows dot_rows needs (the values', or the gradient's: c of them), where it transposes.
template <class C>
int64_t transposed_size(const Sizes& s) {
  const int64_t Np = padded<C>(s.N);
  return transposes<C>(Np) ? Np * padded<C>(s.c) : 0;
}

template <class C>
GSA_INLINE void forward_range(const Args<typename C::scalar>& args, int64_t begin, int64_t end) {
  using T = typename C::scalar;
  const Sizes& s = args.s;
  const int64_t Np = padded<C>(s.N);
  Buffer<T> k(s.d * Np), v(s.c * Np), q(s.d * Np), out(s.c * Np), context(s.d * s.c), bt(transposed_size<C>(s));
  for (int64_t item = begin; item < end; ++item) {
    int64_t b = item / s.heads, h = item % s.heads;
    args.pack_keys(args.keys, b, h, s.d, s.N, Np, k.data);
    softmax_rows<C>(k.data, s.d, s.N, Np);
    args.pack_values(args.values, b, h, s.c, s.N, Np, v.data);
    dot_rows<C>(k.data, s.d, v.data, s.c, s.N, Np, bt.data, context.data);  // [i][j]
    args.pack_queries(args.queries, b, h, s.d, s.N, Np, q.data);
    combine_rows<C>(context.data, s.c, 1, q.data, s.d, s.c, Np, out.data);
    args.unpack_out(out.data, args.out, b, h, s.c, s.N, Np);
  }
}

template <class C>
GSA_INLINE void backward_range(const Args<typename C::scalar>& args, int64_t begin, int64_t end) {
  using T = typename C::scalar;
  using V = typename C::vec;
  const Sizes& s = args.s;
  const int64_t Np = padded<C>(s.N);
  const bool need_q = args.grad_queries.data != nullptr, need_k = args.grad_keys.data != nullptr;
  const bool need_v = args.grad_values.data != nullptr;
  Buffer<T> g(s.c * Np), q(s.d * Np), k(s.d * Np), v(s.c * Np), out(std::max(s.d, s.c) * Np);
  Buffer<T> context(s.d * s.c), grad_context(s.d * s.c), bt(transposed_size<C>(s));
  for (int64_t item = begin; item < end; ++item) {
    int64_t b = item / s.heads, h = item % s.heads;
    args.pack_grad(args.grad, b, h, s.c, s.N, Np, g.data);
    args.pack_keys(args.keys, b, h, s.d, s.N, Np, k.data);
    softmax_rows<C>(k.data, s.d, s.N, Np);
    if (need_q || need_k) args.pack_values(args.values, b, h, s.c, s.N, Np, v.data);
    if (need_q) {
      dot_rows<C>(k.data, s.d, v.data, s.c, s.N, Np, bt.data, context.data);               // [i][j]
      combine_rows<C>(context.data, 1, s.c, g.data, s.c, s.d, Np, out.data);  // sum_j context[i][j] g[j]
      args.unpack_grad_queries(out.data, args.grad_queries, b, h, s.d, s.N, Np);
    }
    if (!(need_k || need_v)) continue;
    args.pack_queries(args.queries, b, h, s.d, s.N, Np, q.data);
    dot_rows<C>(q.data, s.d, g.data, s.c, s.N, Np, bt.data, grad_context.data);  // [i][j]
    if (need_v) {
      combine_rows<C>(grad_context.data, s.c, 1, k.data, s.d, s.c, Np, out.data);  // sum_i gc[i][j] K[i]
      args.unpack_grad_values(out.data, args.grad_values, b, h, s.c, s.N, Np);
    }
    if (need_k) {
      combine_rows<C>(grad_context.data, 1, s.c, v.data, s.c, s.d, Np, out.data);  // grad_K[i]
      for (int64_t i = 0; i < s.d; ++i) {
        T* gk = out.data + i * Np;
        const T* ki = k.data + i * Np;
        V dots = V{};
        for (int64_t n = 0; n < Np; n += C::VW) dots += load<V>(ki + n) * load<V>(gk + n);
        const T dot = hsum<C>(dots);
        for (int64_t n = 0; n < Np; n += C::VW) store(gk + n, load<V>(ki + n) * (load<V>(gk + n) - dot));
      }
      args.unpack_grad_keys(out.data, args.grad_keys, b, h, s.d, s.N, Np);
    }
  }
}

template <typename T>
using RangeFn = void (*)(const Args<T>&, int64_t, int64_t);

#define GSA_CONTENT_VARIANT(NAME, BYTES, ATTRIBUTES)                                            \
  template <typename T>                                                                         \
  ATTRIBUTES void forward_##NAME(const Args<T>& args, int64_t begin, int64_t end) {             \
    forward_range<Simd<T, BYTES>>(args, begin, end);                                            \
  }                                                                                             \
  template <typename T>                                                                         \
  ATTRIBUTES void backward_##NAME(const Args<T>& args, int64_t begin, int64_t end) {            \
    backward_range<Simd<T, BYTES>>(args, begin, end);                                           \
  }

GSA_CONTENT_VARIANT(baseline, 16, )
#if GSA_X86
GSA_CONTENT_VARIANT(avx2, 32, GSA_TARGET_AVX2)
GSA_CONTENT_VARIANT(avx512, 64, GSA_TARGET_AVX512)
#endif

template <typename T>
RangeFn<T> range_fn(Isa isa, bool backward) {
#if GSA_X86
  if (isa == Isa::avx512) return backward ? backward_avx512<T> : forward_avx512<T>;
  if (isa == Isa::avx2) return backward ? backward_avx2<T> : forward_avx2<T>;
#endif
  return backward ? backward_baseline<T> : forward_baseline<T>;
}

// ---------------------------------------------------------------------------------------------------
// The operators.

Sizes check_inputs(const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& values) {
  TORCH_CHECK(queries.dim() == 4 && keys.dim() == 4 && values.dim() == 4,
              "gsa native content attention: queries, keys (B, h, d, N) and values (B, h, c, N)");
  for (const at::Tensor* t : {&queries, &keys, &values}) {
    TORCH_CHECK(t->device().is_cpu(), "gsa native content attention runs on the CPU only");
    TORCH_CHECK(at::isFloatingType(t->scalar_type()), "gsa native content attention: floating inputs only");
  }
  TORCH_CHECK(keys.sizes() == queries.sizes(), "gsa native content attention: keys ", keys.sizes(),
              " do not match queries ", queries.sizes());
  TORCH_CHECK(values.size(0) == queries.size(0) && values.size(1) == queries.size(1) &&
                  values.size(3) == queries.size(3),
              "gsa native content attention: values ", values.sizes(), " do not match queries ", queries.sizes());
  return {queries.size(0), queries.size(1), queries.size(2), values.size(2), queries.size(3)};
}

// Items per parallel chunk: at least ~128 Ki multiply-adds each (a small call runs on one thread).
int64_t grain_size(const Sizes& s) {
  int64_t per_item = std::max<int64_t>(1, s.N * s.d * s.c * 2);
  return std::max<int64_t>(1, (int64_t{1} << 17) / per_item);
}

template <typename T>
void run(const Args<T>& args, Isa isa, bool backward) {
  RangeFn<T> fn = range_fn<T>(isa, backward);
  at::parallel_for(0, args.s.batch * args.s.heads, grain_size(args.s), [&](int64_t begin, int64_t end) {
    fn(args, begin, end);
  });
}

template <typename T>
Args<T> args_of(const Sizes& s, const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& values) {
  Args<T> args{};
  args.s = s;
  args.queries = operand_of(queries);
  args.keys = operand_of(keys);
  args.values = operand_of(values);
  args.pack_queries = pack_for<T>(queries.scalar_type());
  args.pack_keys = pack_for<T>(keys.scalar_type());
  args.pack_values = pack_for<T>(values.scalar_type());
  return args;
}

at::Tensor content_forward(const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& values,
                           const std::string& requested) {
  Sizes s = check_inputs(queries, keys, values);
  at::Tensor out = at::empty({s.batch, s.heads, s.c, s.N}, values.options());
  if (out.numel() == 0) return out;
  Isa isa = pick_isa(requested);
  if (queries.scalar_type() == at::kDouble) {
    Args<double> args = args_of<double>(s, queries, keys, values);
    args.out = operand_of(out);
    args.unpack_out = unpack_for<double>(out.scalar_type());
    run(args, isa, false);
  } else {
    Args<float> args = args_of<float>(s, queries, keys, values);
    args.out = operand_of(out);
    args.unpack_out = unpack_for<float>(out.scalar_type());
    run(args, isa, false);
  }
  return out;
}

template <typename T>
void run_backward(const Sizes& s, const at::Tensor& grad, const at::Tensor& queries, const at::Tensor& keys,
                  const at::Tensor& values, const at::Tensor* gq, const at::Tensor* gk, const at::Tensor* gv, Isa isa) {
  Args<T> args = args_of<T>(s, queries, keys, values);
  args.grad = operand_of(grad);
  args.pack_grad = pack_for<T>(grad.scalar_type());
  if (gq != nullptr) {
    args.grad_queries = operand_of(*gq);
    args.unpack_grad_queries = unpack_for<T>(gq->scalar_type());
  }
  if (gk != nullptr) {
    args.grad_keys = operand_of(*gk);
    args.unpack_grad_keys = unpack_for<T>(gk->scalar_type());
  }
  if (gv != nullptr) {
    args.grad_values = operand_of(*gv);
    args.unpack_grad_values = unpack_for<T>(gv->scalar_type());
  }
  run(args, isa, true);
}

// The backward storing the gradients into given tensors of the inputs' sizes (any strides; empty where
// not needed): the module's fused backward writes them into its projection's gradient.
void content_backward_into(const at::Tensor& grad, const at::Tensor& queries, const at::Tensor& keys,
                           const at::Tensor& values, const at::Tensor& grad_queries, const at::Tensor& grad_keys,
                           const at::Tensor& grad_values, const std::string& requested) {
  Sizes s = check_inputs(queries, keys, values);
  TORCH_CHECK(grad.sizes() == values.sizes(), "gsa native content attention: the gradient ", grad.sizes(),
              " does not match the values ", values.sizes());
  TORCH_CHECK(grad.device().is_cpu() && at::isFloatingType(grad.scalar_type()),
              "gsa native content attention: a floating CPU gradient");
  const at::Tensor* inputs[3] = {&queries, &keys, &values};
  const at::Tensor* outs[3] = {&grad_queries, &grad_keys, &grad_values};
  const at::Tensor* wanted[3] = {nullptr, nullptr, nullptr};
  for (int i = 0; i < 3; ++i) {
    if (outs[i]->numel() == 0) continue;
    TORCH_CHECK(outs[i]->sizes() == inputs[i]->sizes() && outs[i]->scalar_type() == inputs[i]->scalar_type() &&
                    outs[i]->device().is_cpu(),
                "gsa native content attention: a gradient ", outs[i]->sizes(), " does not match its input ",
                inputs[i]->sizes());
    wanted[i] = outs[i];
  }
  if (s.batch * s.heads == 0 || s.N == 0) {
    for (const at::Tensor* t : wanted)
      if (t != nullptr) t->zero_();
    return;
  }
  if (wanted[0] == nullptr && wanted[1] == nullptr && wanted[2] == nullptr) return;
  Isa isa = pick_isa(requested);
  if (queries.scalar_type() == at::kDouble) {
    run_backward<double>(s, grad, queries, keys, values, wanted[0], wanted[1], wanted[2], isa);
  } else {
    run_backward<float>(s, grad, queries, keys, values, wanted[0], wanted[1], wanted[2], isa);
  }
}

std::vector<at::Tensor> content_backward(const at::Tensor& grad, const at::Tensor& queries, const at::Tensor& keys,
                                         const at::Tensor& values, bool need_q, bool need_k, bool need_v,
                                         const std::string& requested) {
  at::Tensor gq = need_q ? at::empty(queries.sizes(), queries.options()) : queries.new_empty({0});
  at::Tensor gk = need_k ? at::empty(keys.sizes(), keys.options()) : keys.new_empty({0});
  at::Tensor gv = need_v ? at::empty(values.sizes(), values.options()) : values.new_empty({0});
  content_backward_into(grad, queries, keys, values, gq, gk, gv, requested);
  return {gq, gk, gv};
}

}  // namespace

// Private operators: the public one, with its fake implementation and autograd, is
// torch.ops.gsa.content_attention (gsa_cli/models/gsa_native.py), which calls these on the CPU.
TORCH_LIBRARY_FRAGMENT(gsa_native, m) {
  m.def("content_forward(Tensor queries, Tensor keys, Tensor values, str isa) -> Tensor", &content_forward);
  m.def(
      "content_backward(Tensor grad, Tensor queries, Tensor keys, Tensor values, bool need_queries, "
      "bool need_keys, bool need_values, str isa) -> Tensor[]",
      &content_backward);
  m.def(
      "content_backward_into(Tensor grad, Tensor queries, Tensor keys, Tensor values, Tensor(a!) grad_queries, "
      "Tensor(b!) grad_keys, Tensor(c!) grad_values, str isa) -> ()",
      &content_backward_into);
}
