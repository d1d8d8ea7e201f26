// The axial kernel's copies (axial.cpp): between a pass's strided (B, h, channels, H, W) tensors and
// the lane-major buffers its products run on, [channel][Apad][VW]: VW lines of the map (a tile's
// lanes) side by side, so that every product is elementwise over the lanes whatever the pass and the
// strides. Included by axial.cpp alone; its functions are inlined into each instruction set's variant.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "simd.h"

namespace gsa_axial {

using namespace gsa_simd;

constexpr int MAX_LANES = 16;  // float in 64-byte vectors

// The sizes of one call. Positions are padded to Apad (a multiple of QB) along the query axis.
struct Geometry {
  int64_t batch, heads, d, c, A, O, Apad, M, lanes, tiles, dpad;
};

// A (B, h, channels, H, W) tensor as one pass sees it: strides of its batch, head, channel, attended
// position and line (the other axis).
struct View {
  void* data;
  int64_t batch, head, channel, pos, line;
  int64_t extent;  // elements from data to one past the last the tensor holds (a vector copy reads no further)
};

inline View view_of(const at::Tensor& t, int64_t dim) {
  int64_t other = dim == 3 ? 4 : 3;
  int64_t extent = t.numel() > 0 ? 1 : 0;
  for (int64_t d = 0; d < t.dim() && extent > 0; ++d) extent += (t.size(d) - 1) * t.stride(d);
  return {const_cast<void*>(t.const_data_ptr()), t.stride(0), t.stride(1), t.stride(2), t.stride(dim),
          t.stride(other), extent};
}

// The lines of one tile: batch index and position on the other axis of each lane.
struct Lanes {
  int n = 0;
  int64_t b[MAX_LANES];
  int64_t o[MAX_LANES];
};

inline void tile_lanes(const Geometry& g, int64_t tile, int lanes_per_tile, Lanes& lanes) {
  lanes.n = 0;
  for (int l = 0; l < lanes_per_tile; ++l) {
    int64_t m = tile * lanes_per_tile + l;
    if (m >= g.M) break;
    lanes.b[l] = m / g.O;
    lanes.o[l] = m % g.O;
    lanes.n = l + 1;
  }
}

// Copies between a strided tensor (any floating dtype S) and a lane-major buffer [channel][Apad][VW]
// of the compute type T; lanes past the tile's lines and positions past A are zero. The vector copies
// are compiled once per instruction set, inlined into axial.cpp's variants.
template <typename T>
using PackFn = void (*)(const View&, int64_t, const Lanes&, int64_t, const Geometry&, T*);
template <typename T>
using UnpackFn = void (*)(const T*, const View&, int64_t, const Lanes&, int64_t, const Geometry&);

// A tile's lanes as runs of lanes whose elements are adjacent in memory: on a column pass the lanes
// are a row of one image (unit stride), copied as vectors; on a row pass they are a map row apart,
// runs of one, each lane's positions adjacent instead: copied as VW x VW blocks transposed in
// registers.
struct Runs {
  int n = 0;
  int first[MAX_LANES];       // the run's first lane
  int length[MAX_LANES];      // its lanes
  int64_t offset[MAX_LANES];  // the element of its first lane, from the head's origin
};

inline Runs runs_of(const View& v, const Lanes& lanes) {
  Runs runs;
  for (int l = 0; l < lanes.n; ++l) {
    int64_t offset = lanes.b[l] * v.batch + lanes.o[l] * v.line;
    int last = runs.n - 1;
    if (last >= 0 && v.line == 1 && offset == runs.offset[last] + runs.length[last]) {
      ++runs.length[last];
      continue;
    }
    runs.first[runs.n] = l;
    runs.length[runs.n] = 1;
    runs.offset[runs.n] = offset;
    ++runs.n;
  }
  return runs;
}

// Element by element, any dtype and strides, compiled for the baseline instruction set: short axes,
// where a tile's lines are short runs and the map is in cache (compiled for AVX-512 these loops ran
// 1.2-1.3x slower there), half-precision tensors, channels-last layouts.
template <typename S, typename T>
void copy_in(const View& v, int64_t head, const Lanes& lanes, int64_t channels, const Geometry& g, T* dst) {
  const int64_t vw = g.lanes;
  const S* base = static_cast<const S*>(v.data) + head * v.head;
  const Runs runs = runs_of(v, lanes);
  for (int64_t ch = 0; ch < channels; ++ch) {
    const S* plane = base + ch * v.channel;
    T* rows = dst + ch * g.Apad * vw;
    if (runs.n == lanes.n) {
      // No two lanes adjacent (a row pass): lane by lane, reading along its positions.
      for (int l = 0; l < lanes.n; ++l) {
        const S* from = plane + runs.offset[l];
        for (int64_t a = 0; a < g.A; ++a) rows[a * vw + l] = static_cast<T>(from[a * v.pos]);
      }
    } else {
      for (int64_t a = 0; a < g.A; ++a) {
        for (int r = 0; r < runs.n; ++r) {
          const S* from = plane + a * v.pos + runs.offset[r];
          T* to = rows + a * vw + runs.first[r];
          for (int k = 0; k < runs.length[r]; ++k) to[k] = static_cast<T>(from[k]);
        }
      }
    }
    for (int64_t a = 0; a < g.Apad; ++a)
      for (int l = a < g.A ? lanes.n : 0; l < vw; ++l) rows[a * vw + l] = T(0);
  }
}

// An unpack stores a buffer into its tensor, or adds it to what the tensor holds (ACC): the gradient
// of an input used by several passes, summed where it is written (the module's fused backward).
template <bool ACC, typename S, typename T>
GSA_INLINE void put(S* to, T value) {
  *to = ACC ? static_cast<S>(static_cast<T>(*to) + value) : static_cast<S>(value);
}

template <typename S, typename T, bool ACC = false>
void copy_out(const T* src, const View& v, int64_t head, const Lanes& lanes, int64_t channels, const Geometry& g) {
  const int64_t vw = g.lanes;
  S* base = static_cast<S*>(v.data) + head * v.head;
  const Runs runs = runs_of(v, lanes);
  for (int64_t ch = 0; ch < channels; ++ch) {
    S* plane = base + ch * v.channel;
    const T* rows = src + ch * g.Apad * vw;
    if (runs.n == lanes.n) {
      for (int l = 0; l < lanes.n; ++l) {
        S* to = plane + runs.offset[l];
        for (int64_t a = 0; a < g.A; ++a) put<ACC>(to + a * v.pos, rows[a * vw + l]);
      }
      continue;
    }
    for (int64_t a = 0; a < g.A; ++a) {
      for (int r = 0; r < runs.n; ++r) {
        const T* from = rows + a * vw + runs.first[r];
        S* to = plane + a * v.pos + runs.offset[r];
        for (int k = 0; k < runs.length[r]; ++k) put<ACC>(to + k, from[k]);
      }
    }
  }
}

// The copies go by vectors in the compute type where a pass's lines or positions are adjacent in
// memory. A column pass (lanes adjacent) on LONG_AXIS positions and more: a tile that is one run moves
// as one vector per position. A row pass (each lane's positions adjacent) on half a vector of positions
// and more: VW positions of every lane at a time, loaded as vectors (a lane's positions), transposed in
// registers, stored as the buffer's rows (a position's lanes); on a short axis (fewer than VW) a load
// reads past the lane's positions, within the tensor, and what it read there is never stored. On long
// axes they ask ahead for what they read next, a map row apart: a stride the hardware prefetchers miss
// (measured at 56x56: these copies took as long as the products).
constexpr int LONG_AXIS = 16;
constexpr int PREFETCH_ROWS = 6;  // a column pass: rows ahead; a row pass: the next channel

// Half a vector of positions and more, on a row pass: below, a transpose costs more than the elements
// it moves (measured with 16 lanes: 1.1x the time at 7 positions, 1.7-1.9x at 4; 0.85-0.94x at 8).
inline bool transposes_rows(const View& v, const Geometry& g) {
  return GSA_HAS_SHUFFLE && v.line != 1 && v.pos == 1 && 2 * g.A >= g.lanes;
}

// Into the buffers: a column pass on any axis (a run shorter than a tile is stored as a whole vector
// too, over lanes and rows of the buffer written after it; the buffers have VW elements to spare).
inline bool vector_pack(const View& v, const Geometry& g) { return v.line == 1 || transposes_rows(v, g); }

// Out of them: a column pass on long axes only (a short run is stored element by element, since a
// whole vector would spill over another tile's elements of the tensor).
inline bool vector_unpack(const View& v, const Geometry& g) {
  return (v.line == 1 && g.A >= LONG_AXIS) || transposes_rows(v, g);
}

// A tile whose lanes are a map row apart and whose positions are adjacent: the in-register transpose.
inline bool transposed_tile(const View& v, const Runs& runs, const Lanes& lanes) {
  return GSA_HAS_SHUFFLE && runs.n == lanes.n && v.pos == 1;
}

#if GSA_HAS_SHUFFLE
template <class C>
GSA_INLINE void pack_transposed(const typename C::scalar* plane, const typename C::scalar* next,
                                const typename C::scalar* limit, const Runs& runs, const Geometry& g,
                                typename C::scalar* rows) {
  using V = typename C::vec;
  using T = typename C::scalar;
  constexpr int VW = C::VW;
  for (int64_t a0 = 0; a0 < g.A; a0 += VW) {
    const int64_t count = std::min<int64_t>(VW, g.A - a0);
    V block[VW];
    for (int l = 0; l < VW; ++l) {
      if (l >= runs.n) {
        block[l] = V{};
        continue;
      }
      const T* from = plane + runs.offset[l] + a0;
      if (count == VW || from + VW <= limit) {
        block[l] = loadu<V>(from);
      } else {
        alignas(64) T part[VW] = {};
        std::copy(from, from + count, part);
        block[l] = load<V>(part);
      }
      if (next != nullptr) __builtin_prefetch(next + runs.offset[l] + a0);
    }
    transpose<V, VW>(block);
    for (int64_t t = 0; t < count; ++t) store(rows + (a0 + t) * VW, block[t]);
  }
  for (int64_t a = g.A; a < g.Apad; ++a) store(rows + a * VW, V{});
}

// On a short axis (one block) a lane's whole vector is stored where what it spills over is the next
// lanes' positions, stored after it: `reach[l]`, the end of the lanes adjacent to lane l from it on.
// Adding (ACC), the vector's lanes past the axis are zero: what it spills over keeps its value.
template <class C, bool ACC>
GSA_INLINE void unpack_transposed(const typename C::scalar* rows, const Runs& runs, const int64_t* reach,
                                  const Geometry& g, typename C::scalar* plane) {
  using V = typename C::vec;
  using T = typename C::scalar;
  constexpr int VW = C::VW;
  for (int64_t a0 = 0; a0 < g.A; a0 += VW) {
    const int64_t count = std::min<int64_t>(VW, g.A - a0);
    V block[VW];
    for (int t = 0; t < VW; ++t) block[t] = t < count ? load<V>(rows + (a0 + t) * VW) : V{};
    transpose<V, VW>(block);
    for (int l = 0; l < runs.n; ++l) {
      T* to = plane + runs.offset[l] + a0;
      if (count == VW || (g.A < VW && runs.offset[l] + VW <= reach[l])) {
        storeu(to, ACC ? block[l] + loadu<V>(to) : block[l]);
      } else {
        alignas(64) T part[VW];
        store(part, block[l]);
        for (int64_t k = 0; k < count; ++k) put<ACC>(to + k, part[k]);
      }
    }
  }
}
#endif

template <class C>
GSA_INLINE void pack_runs(const typename C::scalar* plane, const typename C::scalar* limit, const View& v,
                          const Runs& runs, int lanes, const Geometry& g, typename C::scalar* rows) {
  using T = typename C::scalar;
  constexpr int VW = C::VW;
  const bool ahead = g.A >= LONG_AXIS;
  for (int64_t a = 0; a < g.A; ++a) {
    for (int r = 0; r < runs.n; ++r) {
      const T* from = plane + a * v.pos + runs.offset[r];
      if (ahead) {
        __builtin_prefetch(from + PREFETCH_ROWS * v.pos);
        __builtin_prefetch(from + PREFETCH_ROWS * v.pos + runs.length[r] - 1);
      }
      T* to = rows + a * VW + runs.first[r];
      if (runs.length[r] == VW) {
        store(to, loadu<typename C::vec>(from));
      } else if (from + VW <= limit) {
        storeu(to, loadu<typename C::vec>(from));  // the lanes past the run: written after, or zeroed
      } else {
        for (int k = 0; k < runs.length[r]; ++k) to[k] = from[k];
      }
    }
  }
  for (int64_t a = 0; a < g.Apad; ++a)
    for (int l = a < g.A ? lanes : 0; l < VW; ++l) rows[a * VW + l] = T(0);
}

template <class C, bool ACC>
GSA_INLINE void unpack_runs(const typename C::scalar* rows, const View& v, const Runs& runs, const Geometry& g,
                            typename C::scalar* plane) {
  constexpr int VW = C::VW;
  for (int64_t a = 0; a < g.A; ++a) {
    for (int r = 0; r < runs.n; ++r) {
      const typename C::scalar* from = rows + a * VW + runs.first[r];
      typename C::scalar* to = plane + a * v.pos + runs.offset[r];
      if (runs.length[r] == VW) {
        const typename C::vec value = load<typename C::vec>(from);
        storeu(to, ACC ? value + loadu<typename C::vec>(to) : value);
      } else {
        for (int k = 0; k < runs.length[r]; ++k) put<ACC>(to + k, from[k]);
      }
    }
  }
}

// One tile's channels, by vectors (vector_pack, vector_unpack hold; the tensor is in the compute type).
template <class C>
GSA_INLINE void pack_vectors(const View& v, int64_t head, const Lanes& lanes, int64_t channels, const Geometry& g,
                             typename C::scalar* dst) {
  using T = typename C::scalar;
  const Runs runs = runs_of(v, lanes);
  const T* base = static_cast<const T*>(v.data) + head * v.head;
  const T* limit = static_cast<const T*>(v.data) + v.extent;
  const bool transposed = transposed_tile(v, runs, lanes);
  for (int64_t ch = 0; ch < channels; ++ch) {
    const T* plane = base + ch * v.channel;
    T* rows = dst + ch * g.Apad * C::VW;
#if GSA_HAS_SHUFFLE
    if (transposed) {
      const T* next = g.A >= LONG_AXIS && ch + 1 < channels ? plane + v.channel : nullptr;
      pack_transposed<C>(plane, next, limit, runs, g, rows);
      continue;
    }
#endif
    pack_runs<C>(plane, limit, v, runs, lanes.n, g, rows);
  }
}

template <class C, bool ACC>
GSA_INLINE void unpack_vectors(const typename C::scalar* src, const View& v, int64_t head, const Lanes& lanes,
                               int64_t channels, const Geometry& g) {
  using T = typename C::scalar;
  const Runs runs = runs_of(v, lanes);
  T* base = static_cast<T*>(v.data) + head * v.head;
  const bool transposed = transposed_tile(v, runs, lanes);
  int64_t reach[MAX_LANES];
  for (int l = transposed ? runs.n - 1 : -1; l >= 0; --l) {
    const bool adjacent = l + 1 < runs.n && runs.offset[l + 1] == runs.offset[l] + g.A;
    reach[l] = adjacent ? reach[l + 1] : runs.offset[l] + g.A;
  }
  for (int64_t ch = 0; ch < channels; ++ch) {
    T* plane = base + ch * v.channel;
    const T* rows = src + ch * g.Apad * C::VW;
#if GSA_HAS_SHUFFLE
    if (transposed) {
      unpack_transposed<C, ACC>(rows, runs, reach, g, plane);
      continue;
    }
#endif
    unpack_runs<C, ACC>(rows, v, runs, g, plane);
  }
}

}  // namespace gsa_axial
