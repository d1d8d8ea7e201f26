// GSA's axial positional pass (shared/spec/GSA.md 1.2) as one fused CPU kernel, forward and backward.
//
// For every head, along the attended axis of length A (the column pass: the height; the row pass: the
// width), every query position a and key position i of one line m (a column, or a row, of one image):
//
//     logits[m, a, i] = sum_d queries[m, d, a] * pairs[a, d, i]         (no softmax, no scaling)
//     out[m, c, a]    = sum_i logits[m, a, i] * values[m, c, i]
//
// and backward, with g = d loss / d out:
//
//     grad_logits[m, a, i] = sum_c g[m, c, a] * values[m, c, i]
//     grad_values[m, c, i] = sum_a logits[m, a, i] * g[m, c, a]
//     grad_queries[m, d, a] = sum_i grad_logits[m, a, i] * pairs[a, d, i]
//     grad_pairs[a, d, i]  = sum_m queries[m, d, a] * grad_logits[m, a, i]
//
// How: the lines of a head are taken VW at a time (a "tile": VW lanes, one SIMD vector wide), copied
// into small lane-major buffers (channel, position, lane) in the compute type (float, or double for
// float64 inputs; bfloat16 and float16 inputs are computed in float), so that every product above is
// an elementwise vector operation over the lanes whatever the pass and the strides. Queries are taken
// QB at a time: their logits (QB x A vectors, a few KiB) are formed in cache and consumed at once by
// register-tiled loops, never stored whole; backward forms them again. The table gradient sums over
// the lanes, so it is vectorised over its channels instead, from a transposed copy of the queries,
// into one buffer per parallel chunk, summed at the end. at::parallel_for runs over (head, tile).
//
// One build serves every x86-64 CPU: the hot loops are compiled three times (AVX-512, AVX2+FMA, and
// the baseline instruction set) through GCC/Clang target attributes and the best one the CPU (and
// ATen's capability setting, passed from Python) allows is picked at run time; -march=native is not
// used, so a cache shared by machines of different CPUs stays correct. Elsewhere only the baseline.

// Light headers (ATen's tensor and the operator registry, not torch/extension.h): the build takes a
// quarter of the time. The operators are registered with the dispatcher (torch.ops.gsa_native.*).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <type_traits>
#include <vector>

#include "axial_copies.h"
#include "simd.h"

namespace {

using namespace gsa_simd;
using namespace gsa_axial;

constexpr int QB = 4;  // queries per block: their logits stay in cache between two products

// One instruction set's tiling. VBytes: the lane vector (a tile's width); WBytes: the vector over the
// table gradient's channels; CR x QB and QB x IR: register tiles (accumulators) of the products; PR:
// key positions per register tile of the table gradient.
template <typename T, int VBytes, int WBytes, int CR_, int IR_, int PR_>
struct Config {
  using scalar = T;
  using vec = typename VecType<T, VBytes>::type;
  using dvec = typename VecType<T, WBytes>::type;
  static constexpr int VW = VBytes / static_cast<int>(sizeof(T));
  static constexpr int VD = WBytes / static_cast<int>(sizeof(T));
  static constexpr int CR = CR_;
  static constexpr int IR = IR_;
  static constexpr int PR = PR_;
};

// 32 vector registers with AVX-512: 16 accumulators; 16 with AVX2 and SSE: 8.
template <typename T>
using Avx512 = Config<T, 64, 32, 4, 4, 8>;
template <typename T>
using Avx2 = Config<T, 32, 32, 2, 2, 8>;
template <typename T>
using Baseline = Config<T, 16, 16, 2, 2, 8>;

// ---------------------------------------------------------------------------------------------------
// The products of one block of QB queries a0..a0+QB-1 on one tile. Buffers (lane-major, VW lanes):
// queries q [d][Apad], values v, gradient grad, out, grad_values gv [c][Apad], grad_queries gq
// [d][Apad], logits and grad_logits [QB][A]; the head's table [Apad][A][d]; the transposed queries qt
// [Apad][VW][dpad] and the table gradient gp [Apad][A][dpad] (vectors over channels).

// logits[j][i] = sum_k table[a0 + j][i][k] * q[k][a0 + j], for keys i0..i0+IRn-1.
template <class C, int IRn>
GSA_INLINE void logits_tile(const typename C::scalar* q, const typename C::scalar* table, const Geometry& g,
                            int64_t a0, int64_t i0, typename C::scalar* logits) {
  using V = typename C::vec;
  using T = typename C::scalar;
  constexpr int VW = C::VW;
  V acc[QB][IRn];
  for (int j = 0; j < QB; ++j)
    for (int r = 0; r < IRn; ++r) acc[j][r] = V{};
  for (int64_t k = 0; k < g.d; ++k) {
    for (int j = 0; j < QB; ++j) {
      V qk = load<V>(q + (k * g.Apad + a0 + j) * VW);
      const T* row = table + ((a0 + j) * g.A + i0) * g.d + k;
      for (int r = 0; r < IRn; ++r) acc[j][r] += qk * row[r * g.d];
    }
  }
  for (int j = 0; j < QB; ++j)
    for (int r = 0; r < IRn; ++r) store(logits + (j * g.A + i0 + r) * VW, acc[j][r]);
}

template <class C>
GSA_INLINE void logits_block(const typename C::scalar* q, const typename C::scalar* table, const Geometry& g,
                             int64_t a0, typename C::scalar* logits) {
  int64_t i0 = 0;
  for (; i0 + C::IR <= g.A; i0 += C::IR) logits_tile<C, C::IR>(q, table, g, a0, i0, logits);
  for (; i0 < g.A; ++i0) logits_tile<C, 1>(q, table, g, a0, i0, logits);
}

// out[c][a0 + j] = sum_i v[c][i] * logits[j][i], for channels c0..c0+CRn-1.
template <class C, int CRn>
GSA_INLINE void out_tile(const typename C::scalar* v, const typename C::scalar* logits, const Geometry& g,
                         int64_t a0, int64_t c0, typename C::scalar* out) {
  using V = typename C::vec;
  constexpr int VW = C::VW;
  V acc[CRn][QB];
  for (int r = 0; r < CRn; ++r)
    for (int j = 0; j < QB; ++j) acc[r][j] = V{};
  for (int64_t i = 0; i < g.A; ++i) {
    V l[QB];
    for (int j = 0; j < QB; ++j) l[j] = load<V>(logits + (j * g.A + i) * VW);
    for (int r = 0; r < CRn; ++r) {
      V vi = load<V>(v + ((c0 + r) * g.Apad + i) * VW);
      for (int j = 0; j < QB; ++j) acc[r][j] += vi * l[j];
    }
  }
  for (int r = 0; r < CRn; ++r)
    for (int j = 0; j < QB; ++j) store(out + ((c0 + r) * g.Apad + a0 + j) * VW, acc[r][j]);
}

template <class C>
GSA_INLINE void out_block(const typename C::scalar* v, const typename C::scalar* logits, const Geometry& g,
                          int64_t a0, typename C::scalar* out) {
  int64_t c0 = 0;
  for (; c0 + C::CR <= g.c; c0 += C::CR) out_tile<C, C::CR>(v, logits, g, a0, c0, out);
  for (; c0 < g.c; ++c0) out_tile<C, 1>(v, logits, g, a0, c0, out);
}

// grad_logits[j][i] = sum_k grad[k][a0 + j] * v[k][i], for keys i0..i0+IRn-1.
template <class C, int IRn>
GSA_INLINE void grad_logits_tile(const typename C::scalar* grad, const typename C::scalar* v, const Geometry& g,
                                 int64_t a0, int64_t i0, typename C::scalar* gl) {
  using V = typename C::vec;
  constexpr int VW = C::VW;
  V acc[QB][IRn];
  for (int j = 0; j < QB; ++j)
    for (int r = 0; r < IRn; ++r) acc[j][r] = V{};
  for (int64_t k = 0; k < g.c; ++k) {
    V gk[QB];
    for (int j = 0; j < QB; ++j) gk[j] = load<V>(grad + (k * g.Apad + a0 + j) * VW);
    for (int r = 0; r < IRn; ++r) {
      V vk = load<V>(v + (k * g.Apad + i0 + r) * VW);
      for (int j = 0; j < QB; ++j) acc[j][r] += gk[j] * vk;
    }
  }
  for (int j = 0; j < QB; ++j)
    for (int r = 0; r < IRn; ++r) store(gl + (j * g.A + i0 + r) * VW, acc[j][r]);
}

template <class C>
GSA_INLINE void grad_logits_block(const typename C::scalar* grad, const typename C::scalar* v,
                                  const Geometry& g, int64_t a0, typename C::scalar* gl) {
  int64_t i0 = 0;
  for (; i0 + C::IR <= g.A; i0 += C::IR) grad_logits_tile<C, C::IR>(grad, v, g, a0, i0, gl);
  for (; i0 < g.A; ++i0) grad_logits_tile<C, 1>(grad, v, g, a0, i0, gl);
}

// gv[c][i] += sum_j logits[j][i] * grad[c][a0 + j], for channels c0..c0+CRn-1.
template <class C, int CRn>
GSA_INLINE void grad_values_tile(const typename C::scalar* grad, const typename C::scalar* logits,
                                 const Geometry& g, int64_t a0, int64_t c0, typename C::scalar* gv) {
  using V = typename C::vec;
  constexpr int VW = C::VW;
  V gr[CRn][QB];
  for (int r = 0; r < CRn; ++r)
    for (int j = 0; j < QB; ++j) gr[r][j] = load<V>(grad + ((c0 + r) * g.Apad + a0 + j) * VW);
  for (int64_t i = 0; i < g.A; ++i) {
    V l[QB];
    for (int j = 0; j < QB; ++j) l[j] = load<V>(logits + (j * g.A + i) * VW);
    for (int r = 0; r < CRn; ++r) {
      typename C::scalar* dst = gv + ((c0 + r) * g.Apad + i) * VW;
      V sum = load<V>(dst);
      for (int j = 0; j < QB; ++j) sum += gr[r][j] * l[j];
      store(dst, sum);
    }
  }
}

template <class C>
GSA_INLINE void grad_values_block(const typename C::scalar* grad, const typename C::scalar* logits,
                                  const Geometry& g, int64_t a0, typename C::scalar* gv) {
  int64_t c0 = 0;
  for (; c0 + C::CR <= g.c; c0 += C::CR) grad_values_tile<C, C::CR>(grad, logits, g, a0, c0, gv);
  for (; c0 < g.c; ++c0) grad_values_tile<C, 1>(grad, logits, g, a0, c0, gv);
}

// gq[k][a0 + j] = sum_i grad_logits[j][i] * table[a0 + j][i][k], for channels k0..k0+KRn-1.
template <class C, int KRn>
GSA_INLINE void grad_queries_tile(const typename C::scalar* gl, const typename C::scalar* table,
                                  const Geometry& g, int64_t a0, int64_t k0, typename C::scalar* gq) {
  using V = typename C::vec;
  using T = typename C::scalar;
  constexpr int VW = C::VW;
  V acc[QB][KRn];
  for (int j = 0; j < QB; ++j)
    for (int r = 0; r < KRn; ++r) acc[j][r] = V{};
  for (int64_t i = 0; i < g.A; ++i) {
    for (int j = 0; j < QB; ++j) {
      V l = load<V>(gl + (j * g.A + i) * VW);
      const T* row = table + ((a0 + j) * g.A + i) * g.d + k0;
      for (int r = 0; r < KRn; ++r) acc[j][r] += l * row[r];
    }
  }
  for (int j = 0; j < QB; ++j)
    for (int r = 0; r < KRn; ++r) store(gq + ((k0 + r) * g.Apad + a0 + j) * VW, acc[j][r]);
}

template <class C>
GSA_INLINE void grad_queries_block(const typename C::scalar* gl, const typename C::scalar* table,
                                   const Geometry& g, int64_t a0, typename C::scalar* gq) {
  int64_t k0 = 0;
  for (; k0 + C::IR <= g.d; k0 += C::IR) grad_queries_tile<C, C::IR>(gl, table, g, a0, k0, gq);
  for (; k0 < g.d; ++k0) grad_queries_tile<C, 1>(gl, table, g, a0, k0, gq);
}

// gp[a0 + j][i][k] += sum_lanes qt[a0 + j][lane][k] * grad_logits[j][i][lane], for keys i0..i0+PRn-1,
// vectorised over the channels k (dpad of them, zero past d).
template <class C, int PRn>
GSA_INLINE void grad_table_tile(const typename C::scalar* qt, const typename C::scalar* gl, const Geometry& g,
                                int64_t a0, int j, int64_t i0, typename C::scalar* gp) {
  using W = typename C::dvec;
  using T = typename C::scalar;
  constexpr int VW = C::VW;
  constexpr int VD = C::VD;
  const T* queries = qt + (a0 + j) * VW * g.dpad;
  const T* logits = gl + (j * g.A + i0) * VW;
  for (int64_t kv = 0; kv < g.dpad; kv += VD) {
    W acc[PRn];
    for (int r = 0; r < PRn; ++r) acc[r] = W{};
    for (int l = 0; l < VW; ++l) {
      W qv = load<W>(queries + l * g.dpad + kv);
      for (int r = 0; r < PRn; ++r) acc[r] += qv * logits[r * VW + l];
    }
    for (int r = 0; r < PRn; ++r) {
      T* dst = gp + ((a0 + j) * g.A + i0 + r) * g.dpad + kv;
      store(dst, load<W>(dst) + acc[r]);
    }
  }
}

template <class C>
GSA_INLINE void grad_table_block(const typename C::scalar* qt, const typename C::scalar* gl, const Geometry& g,
                                 int64_t a0, typename C::scalar* gp) {
  for (int j = 0; j < QB && a0 + j < g.A; ++j) {
    int64_t i0 = 0;
    for (; i0 + C::PR <= g.A; i0 += C::PR) grad_table_tile<C, C::PR>(qt, gl, g, a0, j, i0, gp);
    for (; i0 < g.A; ++i0) grad_table_tile<C, 1>(qt, gl, g, a0, j, i0, gp);
  }
}

// The queries [d][Apad][VW] transposed for the table gradient: qt [Apad][VW][dpad], zero past d. Where
// dpad is whole vectors, VW x VW blocks transposed in registers (element by element they took a fifth
// to a third of a short axis's backward, where d is large).
template <class C>
GSA_INLINE void transpose_queries(const typename C::scalar* q, const Geometry& g, typename C::scalar* qt) {
  using T = typename C::scalar;
  constexpr int VW = C::VW;
#if GSA_HAS_SHUFFLE
  using V = typename C::vec;
  if (g.dpad % VW == 0) {
    for (int64_t a = 0; a < g.Apad; ++a) {
      for (int64_t k0 = 0; k0 < g.dpad; k0 += VW) {
        V block[VW];
        for (int t = 0; t < VW; ++t) block[t] = k0 + t < g.d ? load<V>(q + ((k0 + t) * g.Apad + a) * VW) : V{};
        transpose<V, VW>(block);  // block[l]: lane l's channels k0...
        for (int l = 0; l < VW; ++l) storeu(qt + (a * VW + l) * g.dpad + k0, block[l]);
      }
    }
    return;
  }
#endif
  for (int64_t a = 0; a < g.Apad; ++a)
    for (int l = 0; l < VW; ++l) {
      T* row = qt + (a * VW + l) * g.dpad;
      for (int64_t k = 0; k < g.d; ++k) row[k] = q[(k * g.Apad + a) * VW + l];
      for (int64_t k = g.d; k < g.dpad; ++k) row[k] = T(0);
    }
}

// ---------------------------------------------------------------------------------------------------
// A range of (head, tile) work items.

template <typename T>
struct ForwardArgs {
  Geometry g;
  View queries, values, out;
  const T* table;  // [h][Apad][A][d]
  PackFn<T> pack_queries, pack_values;
  UnpackFn<T> unpack_out;
};

template <typename T>
struct BackwardArgs {
  Geometry g;
  View grad, queries, values, grad_queries, grad_values;
  const T* table;
  bool need_queries, need_values, need_table;
  PackFn<T> pack_grad, pack_queries, pack_values;
  UnpackFn<T> unpack_grad_queries, unpack_grad_values;
};

template <class C>
GSA_INLINE void forward_range(const ForwardArgs<typename C::scalar>& args, int64_t begin, int64_t end) {
  using T = typename C::scalar;
  constexpr int VW = C::VW;
  const Geometry& g = args.g;
  // VW to spare past the packed buffers: a column pass's copy stores whole vectors (axial_copies.h).
  Buffer<T> q(g.d * g.Apad * VW + VW), v(g.c * g.Apad * VW + VW), out(g.c * g.Apad * VW), logits(QB * g.A * VW);
  Lanes lanes;
  for (int64_t item = begin; item < end; ++item) {
    int64_t head = item / g.tiles;
    tile_lanes(g, item % g.tiles, VW, lanes);
    args.pack_queries(args.queries, head, lanes, g.d, g, q.data);
    args.pack_values(args.values, head, lanes, g.c, g, v.data);
    const T* table = args.table + head * g.Apad * g.A * g.d;
    for (int64_t a0 = 0; a0 < g.Apad; a0 += QB) {
      logits_block<C>(q.data, table, g, a0, logits.data);
      out_block<C>(v.data, logits.data, g, a0, out.data);
    }
    args.unpack_out(out.data, args.out, head, lanes, g.c, g);
  }
}

// gp: the table gradient of heads first_head... of this range, [head][Apad][A][dpad], accumulated.
template <class C>
GSA_INLINE void backward_range(const BackwardArgs<typename C::scalar>& args, int64_t begin, int64_t end,
                               int64_t first_head, typename C::scalar* gp) {
  using T = typename C::scalar;
  constexpr int VW = C::VW;
  const Geometry& g = args.g;
  const bool need_logits = args.need_values;                         // for grad_values
  const bool need_grad_logits = args.need_queries || args.need_table;  // for grad_queries, grad_table
  const int64_t plane = g.Apad * VW;
  Buffer<T> grad(g.c * plane + VW), q(g.d * plane + VW), v(g.c * plane + VW), gq(g.d * plane), gv(g.c * plane);
  Buffer<T> qt(g.Apad * VW * g.dpad), logits(QB * g.A * VW), gl(QB * g.A * VW);
  Lanes lanes;
  for (int64_t item = begin; item < end; ++item) {
    int64_t head = item / g.tiles;
    tile_lanes(g, item % g.tiles, VW, lanes);
    const T* table = args.table + head * g.Apad * g.A * g.d;
    T* head_gp = gp + (head - first_head) * g.Apad * g.A * g.dpad;
    args.pack_grad(args.grad, head, lanes, g.c, g, grad.data);
    if (need_logits || args.need_table) args.pack_queries(args.queries, head, lanes, g.d, g, q.data);
    if (need_grad_logits) args.pack_values(args.values, head, lanes, g.c, g, v.data);
    if (args.need_values) std::memset(gv.data, 0, sizeof(T) * g.c * plane);
    if (args.need_table) transpose_queries<C>(q.data, g, qt.data);
    for (int64_t a0 = 0; a0 < g.Apad; a0 += QB) {
      if (need_logits) {
        logits_block<C>(q.data, table, g, a0, logits.data);
        grad_values_block<C>(grad.data, logits.data, g, a0, gv.data);
      }
      if (need_grad_logits) {
        grad_logits_block<C>(grad.data, v.data, g, a0, gl.data);
        if (args.need_queries) grad_queries_block<C>(gl.data, table, g, a0, gq.data);
        if (args.need_table) grad_table_block<C>(qt.data, gl.data, g, a0, head_gp);
      }
    }
    if (args.need_queries) args.unpack_grad_queries(gq.data, args.grad_queries, head, lanes, g.d, g);
    if (args.need_values) args.unpack_grad_values(gv.data, args.grad_values, head, lanes, g.c, g);
  }
}

// The variants: each instruction set's loops in functions compiled for it.
template <typename T>
using ForwardFn = void (*)(const ForwardArgs<T>&, int64_t, int64_t);
template <typename T>
using BackwardFn = void (*)(const BackwardArgs<T>&, int64_t, int64_t, int64_t, T*);

#define GSA_VARIANT(NAME, CONFIG, ATTRIBUTES)                                                           \
  template <typename T>                                                                                 \
  ATTRIBUTES void forward_##NAME(const ForwardArgs<T>& args, int64_t begin, int64_t end) {              \
    forward_range<CONFIG<T>>(args, begin, end);                                                         \
  }                                                                                                     \
  template <typename T>                                                                                 \
  ATTRIBUTES void backward_##NAME(const BackwardArgs<T>& args, int64_t begin, int64_t end, int64_t first, \
                                  T* gp) {                                                              \
    backward_range<CONFIG<T>>(args, begin, end, first, gp);                                             \
  }                                                                                                     \
  template <typename T>                                                                                 \
  ATTRIBUTES void pack_##NAME(const View& v, int64_t head, const Lanes& lanes, int64_t channels,         \
                              const Geometry& g, T* dst) {                                              \
    pack_vectors<CONFIG<T>>(v, head, lanes, channels, g, dst);                                          \
  }                                                                                                     \
  template <typename T, bool ACC>                                                                       \
  ATTRIBUTES void unpack_##NAME(const T* src, const View& v, int64_t head, const Lanes& lanes,           \
                                int64_t channels, const Geometry& g) {                                  \
    unpack_vectors<CONFIG<T>, ACC>(src, v, head, lanes, channels, g);                                   \
  }

GSA_VARIANT(baseline, Baseline, )
#if GSA_X86
GSA_VARIANT(avx2, Avx2, GSA_TARGET_AVX2)
GSA_VARIANT(avx512, Avx512, GSA_TARGET_AVX512)
#endif


// Lanes per tile (the lane vector's width), and the table gradient's vector width, as in the Configs.
int lanes_of(Isa isa, bool is_double) {
  int bytes = isa == Isa::avx512 ? 64 : isa == Isa::avx2 ? 32 : 16;
  return bytes / (is_double ? 8 : 4);
}

int table_lanes_of(Isa isa, bool is_double) {
  int bytes = isa == Isa::baseline ? 16 : 32;
  return bytes / (is_double ? 8 : 4);
}

template <typename T>
ForwardFn<T> forward_fn(Isa isa) {
#if GSA_X86
  if (isa == Isa::avx512) return forward_avx512<T>;
  if (isa == Isa::avx2) return forward_avx2<T>;
#endif
  return forward_baseline<T>;
}

template <typename T>
BackwardFn<T> backward_fn(Isa isa) {
#if GSA_X86
  if (isa == Isa::avx512) return backward_avx512<T>;
  if (isa == Isa::avx2) return backward_avx2<T>;
#endif
  return backward_baseline<T>;
}

// The copies of a tensor (of dtype `type`, seen as `view`) to and from the buffers of the compute type
// T: by vectors where vector_pack and vector_unpack allow (axial_copies.h), else element by element.
template <typename T>
PackFn<T> pack_for(Isa isa, at::ScalarType type, const View& view, const Geometry& g) {
  if (type == c10::CppTypeToScalarType<T>::value && vector_pack(view, g)) {
#if GSA_X86
    if (isa == Isa::avx512) return pack_avx512<T>;
    if (isa == Isa::avx2) return pack_avx2<T>;
#endif
    return pack_baseline<T>;
  }
  return visit_dtype(type, "gsa native axial attention",
                     [](auto* s) -> PackFn<T> { return copy_in<std::remove_pointer_t<decltype(s)>, T>; });
}

template <typename T, bool ACC>
UnpackFn<T> unpack_for(Isa isa, at::ScalarType type, const View& view, const Geometry& g) {
  if (type == c10::CppTypeToScalarType<T>::value && vector_unpack(view, g)) {
#if GSA_X86
    if (isa == Isa::avx512) return unpack_avx512<T, ACC>;
    if (isa == Isa::avx2) return unpack_avx2<T, ACC>;
#endif
    return unpack_baseline<T, ACC>;
  }
  return visit_dtype(type, "gsa native axial attention",
                     [](auto* s) -> UnpackFn<T> { return copy_out<std::remove_pointer_t<decltype(s)>, T, ACC>; });
}

// Stores into the tensor, or (accumulate) adds to what it holds.
template <typename T>
UnpackFn<T> unpack_for(Isa isa, at::ScalarType type, const View& view, const Geometry& g, bool accumulate) {
  return accumulate ? unpack_for<T, true>(isa, type, view, g) : unpack_for<T, false>(isa, type, view, g);
}

// ---------------------------------------------------------------------------------------------------
// The operators.

void check_inputs(const at::Tensor& queries, const at::Tensor& values, const at::Tensor& pairs, int64_t dim) {
  TORCH_CHECK(dim == 3 || dim == 4, "gsa native axial attention: dim must be 3 (height) or 4 (width), got ", dim);
  TORCH_CHECK(queries.dim() == 5 && values.dim() == 5 && pairs.dim() == 4,
              "gsa native axial attention: queries and values (B, h, d, H, W), pairs (h, A, d, A)");
  for (const at::Tensor* t : {&queries, &values, &pairs}) {
    TORCH_CHECK(t->device().is_cpu(), "gsa native axial attention runs on the CPU only");
    TORCH_CHECK(at::isFloatingType(t->scalar_type()), "gsa native axial attention: floating inputs only");
  }
  int64_t length = queries.size(dim);
  TORCH_CHECK(values.size(0) == queries.size(0) && values.size(1) == queries.size(1) &&
                  values.size(3) == queries.size(3) && values.size(4) == queries.size(4),
              "gsa native axial attention: values ", values.sizes(), " do not match queries ", queries.sizes());
  TORCH_CHECK(pairs.size(0) == queries.size(1) && pairs.size(1) == length && pairs.size(2) == queries.size(2) &&
                  pairs.size(3) == length,
              "gsa native axial attention: pairs ", pairs.sizes(), " do not match queries ", queries.sizes());
}

// Work items per parallel chunk: at least ~128 Ki multiply-adds each, so that a small call (a
// gradient check, a tiny net) runs on one thread instead of paying for waking the others.
int64_t grain_size(const Geometry& g) {
  int64_t per_item = std::max<int64_t>(1, g.Apad * g.A * (g.d + g.c) * g.lanes);
  return std::max<int64_t>(1, (int64_t{1} << 17) / per_item);
}

Geometry geometry(const at::Tensor& queries, const at::Tensor& values, int64_t dim, int lanes, int table_lanes) {
  Geometry g;
  g.batch = queries.size(0);
  g.heads = queries.size(1);
  g.d = queries.size(2);
  g.c = values.size(2);
  g.A = queries.size(dim);
  g.O = queries.size(dim == 3 ? 4 : 3);
  g.Apad = (g.A + QB - 1) / QB * QB;
  g.M = g.batch * g.O;
  g.lanes = lanes;
  g.tiles = (g.M + lanes - 1) / lanes;
  g.dpad = (g.d + table_lanes - 1) / table_lanes * table_lanes;
  return g;
}

// The table laid out per query as [h][Apad][A][d] in the compute type, rows past A zero.
at::Tensor table_layout(const at::Tensor& pairs, const Geometry& g, at::ScalarType compute) {
  at::Tensor table = at::zeros({g.heads, g.Apad, g.A, g.d}, pairs.options().dtype(compute));
  table.narrow(1, 0, g.A).copy_(pairs.permute({0, 1, 3, 2}));
  return table;
}

at::ScalarType compute_type(const at::Tensor& queries) {
  return queries.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

template <typename T>
void run_forward(const at::Tensor& queries, const at::Tensor& values, const at::Tensor& table, at::Tensor& out,
                 const Geometry& g, int64_t dim, Isa isa) {
  const View q = view_of(queries, dim), v = view_of(values, dim), o = view_of(out, dim);
  ForwardArgs<T> args{g,
                      q,
                      v,
                      o,
                      table.const_data_ptr<T>(),
                      pack_for<T>(isa, queries.scalar_type(), q, g),
                      pack_for<T>(isa, values.scalar_type(), v, g),
                      unpack_for<T>(isa, out.scalar_type(), o, g, false)};
  ForwardFn<T> fn = forward_fn<T>(isa);
  at::parallel_for(0, g.heads * g.tiles, grain_size(g), [&](int64_t begin, int64_t end) {
    fn(args, begin, end);
  });
}

at::Tensor axial_forward(const at::Tensor& queries, const at::Tensor& values, const at::Tensor& pairs, int64_t dim,
                         const std::string& requested) {
  check_inputs(queries, values, pairs, dim);
  Isa isa = pick_isa(requested);
  at::ScalarType compute = compute_type(queries);
  bool is_double = compute == at::kDouble;
  Geometry g = geometry(queries, values, dim, lanes_of(isa, is_double), table_lanes_of(isa, is_double));
  at::Tensor out = at::empty({g.batch, g.heads, g.c, queries.size(3), queries.size(4)}, queries.options());
  if (out.numel() == 0) return out.zero_();
  at::Tensor table = table_layout(pairs, g, compute);
  if (is_double) {
    run_forward<double>(queries, values, table, out, g, dim, isa);
  } else {
    run_forward<float>(queries, values, table, out, g, dim, isa);
  }
  return out;
}

// Where a backward writes the queries' and values' gradients: tensors of their inputs' sizes (empty where
// not needed), stored into or (accumulate) added to.
struct Into {
  at::Tensor queries, values;
  bool accumulate_queries = false, accumulate_values = false;
};

template <typename T>
void run_backward(const at::Tensor& grad, const at::Tensor& queries, const at::Tensor& values,
                  const at::Tensor& table, const Into& into, at::Tensor& grad_table, const Geometry& g, int64_t dim,
                  bool need_p, Isa isa) {
  const at::Tensor &grad_queries = into.queries, &grad_values = into.values;
  const bool need_q = grad_queries.numel() > 0, need_v = grad_values.numel() > 0;
  const View gr = view_of(grad, dim), q = view_of(queries, dim), v = view_of(values, dim);
  const View gq = need_q ? view_of(grad_queries, dim) : View{}, gv = need_v ? view_of(grad_values, dim) : View{};
  BackwardArgs<T> args{g,
                       gr,
                       q,
                       v,
                       gq,
                       gv,
                       table.const_data_ptr<T>(),
                       need_q,
                       need_v,
                       need_p,
                       pack_for<T>(isa, grad.scalar_type(), gr, g),
                       pack_for<T>(isa, queries.scalar_type(), q, g),
                       pack_for<T>(isa, values.scalar_type(), v, g),
                       unpack_for<T>(isa, grad_queries.scalar_type(), gq, g, into.accumulate_queries),
                       unpack_for<T>(isa, grad_values.scalar_type(), gv, g, into.accumulate_values)};
  BackwardFn<T> fn = backward_fn<T>(isa);
  // Each chunk of work items sums its table gradient into a buffer of its own; the buffers are added
  // up in the chunks' order afterwards, so that the result does not depend on which thread ends first.
  struct Partial {
    int64_t begin, first_head, size;
    std::unique_ptr<Buffer<T>> sums;
  };
  std::mutex lock;
  std::vector<Partial> partials;
  const int64_t per_head = g.Apad * g.A * g.dpad;
  at::parallel_for(0, g.heads * g.tiles, grain_size(g), [&](int64_t begin, int64_t end) {
    int64_t first = begin / g.tiles, last = (end - 1) / g.tiles;
    int64_t size = need_p ? (last - first + 1) * per_head : 0;
    auto sums = std::make_unique<Buffer<T>>(size);
    std::memset(sums->data, 0, sizeof(T) * size);
    fn(args, begin, end, first, sums->data);
    if (need_p) {
      std::lock_guard<std::mutex> guard(lock);
      partials.push_back({begin, first, size, std::move(sums)});
    }
  });
  std::sort(partials.begin(), partials.end(), [](const Partial& x, const Partial& y) { return x.begin < y.begin; });
  for (const Partial& partial : partials) {
    T* dst = grad_table.data_ptr<T>() + partial.first_head * per_head;
    const T* src = partial.sums->data;
    for (int64_t n = 0; n < partial.size; ++n) dst[n] += src[n];
  }
}

// The backward into `into` (the queries' and values' gradients); returns the pairs' gradient (empty
// unless need_p).
at::Tensor backward_into(const at::Tensor& grad, const at::Tensor& queries, const at::Tensor& values,
                         const at::Tensor& pairs, int64_t dim, const Into& into, bool need_p,
                         const std::string& requested) {
  check_inputs(queries, values, pairs, dim);
  TORCH_CHECK(grad.sizes() == values.sizes(), "gsa native axial attention: the gradient ", grad.sizes(),
              " does not match the values ", values.sizes());
  TORCH_CHECK(grad.device().is_cpu() && at::isFloatingType(grad.scalar_type()),
              "gsa native axial attention: a floating CPU gradient");
  const bool need_q = into.queries.numel() > 0, need_v = into.values.numel() > 0;
  TORCH_CHECK(!need_q || (into.queries.sizes() == queries.sizes() && into.queries.device().is_cpu()),
              "gsa native axial attention: the queries' gradient ", into.queries.sizes(), " does not match ",
              queries.sizes());
  TORCH_CHECK(!need_v || (into.values.sizes() == values.sizes() && into.values.device().is_cpu()),
              "gsa native axial attention: the values' gradient ", into.values.sizes(), " does not match ",
              values.sizes());
  Isa isa = pick_isa(requested);
  at::ScalarType compute = compute_type(queries);
  bool is_double = compute == at::kDouble;
  Geometry g = geometry(queries, values, dim, lanes_of(isa, is_double), table_lanes_of(isa, is_double));
  at::Tensor grad_table = need_p ? at::zeros({g.heads, g.Apad, g.A, g.dpad}, pairs.options().dtype(compute))
                                 : pairs.new_empty({0});
  if (g.M == 0 || g.A == 0 || g.heads == 0) {
    if (need_q && !into.accumulate_queries) into.queries.zero_();
    if (need_v && !into.accumulate_values) into.values.zero_();
  } else if (need_q || need_v || need_p) {
    at::Tensor table = table_layout(pairs, g, compute);
    if (is_double) {
      run_backward<double>(grad, queries, values, table, into, grad_table, g, dim, need_p, isa);
    } else {
      run_backward<float>(grad, queries, values, table, into, grad_table, g, dim, need_p, isa);
    }
  }
  if (!need_p) return pairs.new_empty({0});
  // [h][Apad][A][dpad] -> (h, A, d, A), in the table's dtype.
  return grad_table.narrow(1, 0, g.A).narrow(3, 0, g.d).permute({0, 1, 3, 2}).to(pairs.scalar_type()).contiguous();
}

std::vector<at::Tensor> axial_backward(const at::Tensor& grad, const at::Tensor& queries, const at::Tensor& values,
                                       const at::Tensor& pairs, int64_t dim, bool need_q, bool need_v, bool need_p,
                                       const std::string& requested) {
  Into into{need_q ? at::empty(queries.sizes(), queries.options()) : queries.new_empty({0}),
            need_v ? at::empty(values.sizes(), values.options()) : values.new_empty({0})};
  at::Tensor grad_pairs = backward_into(grad, queries, values, pairs, dim, into, need_p, requested);
  return {into.queries, into.values, grad_pairs};
}

// The backward writing the queries' and values' gradients into given tensors (of any strides; empty
// where not needed), added to what they hold where asked: the module's fused backward sums the
// gradients of the queries (three uses) and values (two) where they are written.
at::Tensor axial_backward_into(const at::Tensor& grad, const at::Tensor& queries, const at::Tensor& values,
                               const at::Tensor& pairs, int64_t dim, const at::Tensor& grad_queries,
                               const at::Tensor& grad_values, bool accumulate_queries, bool accumulate_values,
                               bool need_p, const std::string& requested) {
  TORCH_CHECK(grad_queries.numel() == 0 || grad_queries.scalar_type() == queries.scalar_type(),
              "gsa native axial attention: the queries' gradient must have the queries' dtype");
  TORCH_CHECK(grad_values.numel() == 0 || grad_values.scalar_type() == values.scalar_type(),
              "gsa native axial attention: the values' gradient must have the values' dtype");
  Into into{grad_queries, grad_values, accumulate_queries, accumulate_values};
  return backward_into(grad, queries, values, pairs, dim, into, need_p, requested);
}

std::string variant(const std::string& requested) { return isa_name(pick_isa(requested)); }

}  // namespace

// Private operators: the public one, with its fake implementation and autograd, is
// torch.ops.gsa.axial_attention (gsa_cli/models/gsa_native.py), which calls these on the CPU.
TORCH_LIBRARY(gsa_native, m) {
  m.def("axial_forward(Tensor queries, Tensor values, Tensor pairs, int dim, str isa) -> Tensor", &axial_forward);
  m.def(
      "axial_backward(Tensor grad, Tensor queries, Tensor values, Tensor pairs, int dim, bool need_queries, "
      "bool need_values, bool need_pairs, str isa) -> Tensor[]",
      &axial_backward);
  m.def(
      "axial_backward_into(Tensor grad, Tensor queries, Tensor values, Tensor pairs, int dim, "
      "Tensor(a!) grad_queries, Tensor(b!) grad_values, bool accumulate_queries, bool accumulate_values, "
      "bool need_pairs, str isa) -> Tensor",
      &axial_backward_into);
  m.def("variant(str requested) -> str", &variant);
}
