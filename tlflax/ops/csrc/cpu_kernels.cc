// CPU kernels for the ops XLA's CPU backend runs slowly, called through the XLA FFI.
//
// Depthwise convolution (forward, input gradient, weight gradient) and max pooling
// (forward with the argmax tap, backward as a scatter of dy onto it), all NHWC
// float32, row-major. XLA lowers a depthwise convolution's weight gradient to a
// dense C x C convolution and its max pool gradient to select-and-scatter; both
// are several times torch's oneDNN kernels on CPU (benchmarks/README.md).
//
// Every kernel splits its work into a fixed number of items that do not depend on
// the thread count, and each item writes only its own outputs; partial sums are
// added in item order. So results are bit-identical run to run and on machines
// with different thread counts. The items run on XLA's intra-op thread pool, the
// same threads as the rest of the step; the calling thread takes items too, so a
// busy pool cannot deadlock a kernel.
//
// The channel loops are written for the compiler to vectorize. On x86-64 each
// hot row function is compiled three times, for AVX-512 (x86-64-v4), AVX2+FMA
// (x86-64-v3) and baseline x86-64, each with register tiles sized for that
// ISA's register file: a tile of 6 x 4 sixteen-float accumulators fits AVX-512's
// 32 zmm registers but is 48 of AVX2's 16 ymm registers, and a single build with
// one tile shape for every ISA (target_clones, until 2026-12) spilled it to the
// stack on every multiply-add: 10-20x slower than XLA on CPUs without AVX-512.
// The level is chosen at load time (the best the CPU has) and can be lowered
// (`set_isa`, `TLFLAX_CPU_ISA`), so every level is tested and timed on any
// machine that has the top one. AVX2 and AVX-512 give bit-identical results:
// every output sums its terms in the same order with the same fused
// multiply-adds, whatever the tile shape; baseline (no FMA) differs by rounding.

#include <Python.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define TLFLAX_X86 1
#define TLFLAX_TARGET_AVX512 __attribute__((target("arch=x86-64-v4")))
#define TLFLAX_TARGET_AVX2 __attribute__((target("arch=x86-64-v3")))
#else
#define TLFLAX_TARGET_AVX512
#define TLFLAX_TARGET_AVX2
#endif
#define TLFLAX_INLINE inline __attribute__((always_inline))

namespace {

// ISA levels, lowest first. kIsaNames is what Python sees (`isa()`, `set_isa`).
enum IsaLevel : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };
const char* const kIsaNames[] = {"baseline", "avx2", "avx512"};

int SupportedIsa() {
#ifdef TLFLAX_X86
  if (__builtin_cpu_supports("x86-64-v4")) return kAvx512;
  if (__builtin_cpu_supports("x86-64-v3")) return kAvx2;
#endif
  return kBaseline;
}

std::atomic<int> g_isa{SupportedIsa()};  // The level the kernels run at.

// Each level computes on vectors of its register width. (GCC lowers a vector wider
// than the target's registers through the stack and general registers, not as
// pairs of registers: a 16-float vector under AVX2 ran 8x slower than under AVX-512.)
typedef float Vec16 __attribute__((vector_size(64)));
typedef float Vec8 __attribute__((vector_size(32)));
typedef float Vec4 __attribute__((vector_size(16)));
constexpr int64_t kChannelMultiple = 16;  // Conv output channels: a multiple of every width.

template <typename V>
TLFLAX_INLINE V Load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V>
TLFLAX_INLINE void Store(float* p, V v) { std::memcpy(p, &v, sizeof(V)); }

// Vector type and tile shapes per level. V holds kW floats, one register. Conv
// tiles: kMr pixels (forward) or input channels (weight gradient) times kNv
// vectors of output channels, so kMr * kNv accumulators + kNv loads + 1 broadcast
// stay within the register file (AVX-512: 24 + 4 + 1 of 32 zmm; AVX2 and
// baseline: 12 + 2 + 1 of 16 ymm / xmm). kDot: accumulators of the depthwise
// channel loops.
struct Avx512Tiles {
  using V = Vec16;
  static constexpr int kW = 16, kMr = 6, kNv = 4, kDot = 4;
};
struct Avx2Tiles {
  using V = Vec8;
  static constexpr int kW = 8, kMr = 6, kNv = 2, kDot = 4;
};
struct BaselineTiles {
  using V = Vec4;
  static constexpr int kW = 4, kMr = 6, kNv = 2, kDot = 4;
};
constexpr int kMaxMr = 6;  // The largest kMr: buffer sizes and the dW channel split.

// Calls f(std::integral_constant<int, k>) for a runtime k in [1, N], so a tile
// loop with a compile-time size serves the edges too.
template <int N, typename F>
TLFLAX_INLINE void WithCount(int k, const F& f) {
  if constexpr (N > 1) {
    if (k < N) return WithCount<N - 1>(k, f);
  }
  f(std::integral_constant<int, N>{});
}

// Runs body(i) for i in [0, n) on the pool and the calling thread.
template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, const Body& body) {
  int64_t threads = std::min<int64_t>(pool.num_threads(), n);
  if (threads <= 1) {
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  const Body* bodyp = &body;
  // A task that starts after all items are taken returns without touching body,
  // so body may go out of scope once every item is done.
  auto run = [state, n, bodyp]() {
    for (int64_t i; (i = state->next.fetch_add(1)) < n;) {
      (*bodyp)(i);
      if (state->done.fetch_add(1) + 1 == n) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->cv.notify_all();
      }
    }
  };
  for (int64_t t = 1; t < threads; ++t) {
    auto task = run;
    pool.Schedule(std::move(task));
  }
  run();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == n; });
}

// Geometry of a 2-D window op on NHWC tensors: input (n, h, w, c), output
// (n, oh, ow, c), window (kh, kw) at strides (sh, sw), top/left padding (pt, pl),
// tap dilation (dh, dw).
struct Geometry {
  int64_t n, h, w, c, oh, ow, kh, kw, sh, sw, pt, pl, dh, dw;
  int64_t InRow(int64_t o, int64_t i) const { return o * sh - pt + i * dh; }
  int64_t InCol(int64_t o, int64_t j) const { return o * sw - pl + j * dw; }
};

struct ConvGeometry {
  Geometry g;  // g.c is the input channels.
  int64_t co;
};

// One ISA level's compiled row functions, called per work item by the handlers
// (defined at the end of this namespace, once per level).
struct RowKernels {
  int w, nv;  // Floats per vector; vectors of output channels per conv tile.
  void (*depthwise_forward_row)(const Geometry&, const float*, const float*, float*, int64_t,
                                int64_t);
  void (*depthwise_input_grad_row)(const Geometry&, const float*, const float*, float*,
                                   int64_t, int64_t);
  void (*depthwise_weight_grad_row)(const Geometry&, const float*, const float*, float*,
                                    int64_t, int64_t);
  void (*conv_weight_grad_rows)(const ConvGeometry&, const float*, const float*, float*,
                                int64_t, int64_t, int64_t, int64_t);
  void (*conv_forward_pixels)(const ConvGeometry&, const float*, const float*, float*, int64_t,
                              int64_t, int64_t, int, int64_t, int64_t, bool);
};
const RowKernels& ActiveRows();


// out[0:cn] = sum over taps t of a[t][0:cn] * b[t][0:cn]. Channels go in blocks
// of T::kDot vectors held in registers across all taps, then one vector, then one
// channel at a time.
template <typename T>
TLFLAX_INLINE void TapsDot(const float* const* a, const float* const* b, int64_t taps,
                           int64_t cn, float* out) {
  using V = typename T::V;
  constexpr int D = T::kDot, W = T::kW;
  int64_t c = 0;
  for (; c + D * W <= cn; c += D * W) {
    V s[D] = {};
    for (int64_t t = 0; t < taps; ++t) {
      for (int v = 0; v < D; ++v) s[v] += Load<V>(a[t] + c + v * W) * Load<V>(b[t] + c + v * W);
    }
    for (int v = 0; v < D; ++v) Store(out + c + v * W, s[v]);
  }
  for (; c + W <= cn; c += W) {
    V s = {};
    for (int64_t t = 0; t < taps; ++t) s += Load<V>(a[t] + c) * Load<V>(b[t] + c);
    Store(out + c, s);
  }
  for (; c < cn; ++c) {
    float s = 0.0f;
    for (int64_t t = 0; t < taps; ++t) s += a[t][c] * b[t][c];
    out[c] = s;
  }
}

// out[0:cn] += sum over `len` pixels p of x[p * xstep + (0:cn)] * y[p * cn + (0:cn)].
template <typename T>
TLFLAX_INLINE void RowDot(const float* x, int64_t xstep, const float* y, int64_t len,
                          int64_t cn, float* out) {
  using V = typename T::V;
  constexpr int D = T::kDot, W = T::kW;
  int64_t c = 0;
  for (; c + D * W <= cn; c += D * W) {
    V s[D] = {};
    for (int64_t p = 0; p < len; ++p) {
      const float* a = x + p * xstep + c;
      const float* b = y + p * cn + c;
      for (int v = 0; v < D; ++v) s[v] += Load<V>(a + v * W) * Load<V>(b + v * W);
    }
    for (int v = 0; v < D; ++v) Store(out + c + v * W, Load<V>(out + c + v * W) + s[v]);
  }
  for (; c + W <= cn; c += W) {
    V s = {};
    for (int64_t p = 0; p < len; ++p) s += Load<V>(x + p * xstep + c) * Load<V>(y + p * cn + c);
    Store(out + c, Load<V>(out + c) + s);
  }
  for (; c < cn; ++c) {
    float s = 0.0f;
    for (int64_t p = 0; p < len; ++p) s += x[p * xstep + c] * y[p * cn + c];
    out[c] += s;
  }
}

constexpr int64_t kMaxTaps = 49;

// One output row of the depthwise forward: y[b, r, :, :].
template <typename T>
TLFLAX_INLINE void DepthwiseForwardRow(const Geometry& g, const float* x, const float* k, float* y, int64_t b,
                         int64_t r) {
  const float* xs[kMaxTaps];
  const float* ks[kMaxTaps];
  for (int64_t q = 0; q < g.ow; ++q) {
    int64_t taps = 0;
    for (int64_t i = 0; i < g.kh; ++i) {
      const int64_t ih = g.InRow(r, i);
      if (ih < 0 || ih >= g.h) continue;
      for (int64_t j = 0; j < g.kw; ++j) {
        const int64_t iw = g.InCol(q, j);
        if (iw < 0 || iw >= g.w) continue;
        xs[taps] = x + ((b * g.h + ih) * g.w + iw) * g.c;
        ks[taps++] = k + (i * g.kw + j) * g.c;
      }
    }
    TapsDot<T>(xs, ks, taps, g.c, y + ((b * g.oh + r) * g.ow + q) * g.c);
  }
}

// One input row of the depthwise input gradient: dx[b, r, :, :]. Input pixel
// (r, q) receives dy[o, p] * k[i, j] wherever o*sh - pt + i*dh == r, likewise q.
template <typename T>
TLFLAX_INLINE void DepthwiseInputGradRow(const Geometry& g, const float* dy, const float* k, float* dx,
                           int64_t b, int64_t r) {
  const float* ds[kMaxTaps];
  const float* ks[kMaxTaps];
  for (int64_t q = 0; q < g.w; ++q) {
    int64_t taps = 0;
    for (int64_t i = 0; i < g.kh; ++i) {
      const int64_t num_h = r + g.pt - i * g.dh;
      if (num_h < 0 || num_h % g.sh) continue;
      const int64_t o = num_h / g.sh;
      if (o >= g.oh) continue;
      for (int64_t j = 0; j < g.kw; ++j) {
        const int64_t num_w = q + g.pl - j * g.dw;
        if (num_w < 0 || num_w % g.sw) continue;
        const int64_t p = num_w / g.sw;
        if (p >= g.ow) continue;
        ds[taps] = dy + ((b * g.oh + o) * g.ow + p) * g.c;
        ks[taps++] = k + (i * g.kw + j) * g.c;
      }
    }
    TapsDot<T>(ds, ks, taps, g.c, dx + ((b * g.h + r) * g.w + q) * g.c);
  }
}

// Adds one output row's contribution to the depthwise weight gradient:
// acc[i, j, :] += sum over p of x[b, r*sh - pt + i*dh, p*sw - pl + j*dw, :] * dy[b, r, p, :].
template <typename T>
TLFLAX_INLINE void DepthwiseWeightGradRow(const Geometry& g, const float* x, const float* dy, float* acc,
                            int64_t b, int64_t r) {
  const float* dyrow = dy + (b * g.oh + r) * g.ow * g.c;
  for (int64_t i = 0; i < g.kh; ++i) {
    const int64_t ih = g.InRow(r, i);
    if (ih < 0 || ih >= g.h) continue;
    for (int64_t j = 0; j < g.kw; ++j) {
      // Output columns p whose input column p*sw - pl + j*dw lies in [0, w).
      const int64_t off = j * g.dw - g.pl;
      const int64_t first = off >= 0 ? 0 : (-off + g.sw - 1) / g.sw;
      const int64_t last = std::min(g.ow - 1, (g.w - 1 - off) / g.sw);
      if (g.w - 1 - off < 0 || last < first) continue;
      const float* xs = x + ((b * g.h + ih) * g.w + first * g.sw + off) * g.c;
      RowDot<T>(xs, g.sw * g.c, dyrow + first * g.c, last - first + 1, g.c,
             acc + (i * g.kw + j) * g.c);
    }
  }
}

Geometry MakeGeometry(ffi::Span<const int64_t> in, ffi::Span<const int64_t> out, int64_t kh,
                      int64_t kw, int64_t sh, int64_t sw, int64_t pt, int64_t pl, int64_t dh,
                      int64_t dw) {
  return Geometry{in[0], in[1], in[2], in[3], out[1], out[2], kh, kw, sh, sw, pt, pl, dh, dw};
}

ffi::Error CheckTaps(int64_t kh, int64_t kw) {
  if (kh * kw > kMaxTaps || kh < 1 || kw < 1) {
    return ffi::Error::InvalidArgument("tlflax depthwise kernel: at most 7x7 taps supported");
  }
  return ffi::Error::Success();
}

ffi::Error DepthwiseForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                ffi::Buffer<ffi::F32> k, ffi::ResultBuffer<ffi::F32> y,
                                int64_t sh, int64_t sw, int64_t pt, int64_t pl, int64_t dh,
                                int64_t dw) {
  auto kd = k.dimensions();
  if (auto e = CheckTaps(kd[0], kd[1]); e.failure()) return e;
  const Geometry g = MakeGeometry(x.dimensions(), y->dimensions(), kd[0], kd[1], sh, sw, pt, pl,
                                  dh, dw);
  const float* xp = x.typed_data();
  const float* kp = k.typed_data();
  float* yp = y->typed_data();
  auto row = ActiveRows().depthwise_forward_row;
  ParallelFor(pool, g.n * g.oh, [&](int64_t t) { row(g, xp, kp, yp, t / g.oh, t % g.oh); });
  return ffi::Error::Success();
}

ffi::Error DepthwiseInputGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy,
                                  ffi::Buffer<ffi::F32> k, ffi::ResultBuffer<ffi::F32> dx,
                                  int64_t sh, int64_t sw, int64_t pt, int64_t pl, int64_t dh,
                                  int64_t dw) {
  auto kd = k.dimensions();
  if (auto e = CheckTaps(kd[0], kd[1]); e.failure()) return e;
  const Geometry g = MakeGeometry(dx->dimensions(), dy.dimensions(), kd[0], kd[1], sh, sw, pt,
                                  pl, dh, dw);
  const float* dyp = dy.typed_data();
  const float* kp = k.typed_data();
  float* dxp = dx->typed_data();
  auto row = ActiveRows().depthwise_input_grad_row;
  ParallelFor(pool, g.n * g.h, [&](int64_t t) { row(g, dyp, kp, dxp, t / g.h, t % g.h); });
  return ffi::Error::Success();
}

// The weight gradient sums over every output pixel. The (n, oh) rows are split
// into kWeightGradParts contiguous parts, each summed into its own buffer; the
// parts are then added in order, so the result does not depend on scheduling.
constexpr int64_t kWeightGradParts = 32;

ffi::Error DepthwiseWeightGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                   ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dk,
                                   int64_t sh, int64_t sw, int64_t pt, int64_t pl, int64_t dh,
                                   int64_t dw) {
  auto kd = dk->dimensions();
  if (auto e = CheckTaps(kd[0], kd[1]); e.failure()) return e;
  const Geometry g = MakeGeometry(x.dimensions(), dy.dimensions(), kd[0], kd[1], sh, sw, pt, pl,
                                  dh, dw);
  const int64_t rows = g.n * g.oh;
  const int64_t parts = std::max<int64_t>(1, std::min(rows, kWeightGradParts));
  const int64_t size = g.kh * g.kw * g.c;
  std::vector<float> partial(parts * size, 0.0f);
  const float* xp = x.typed_data();
  const float* dyp = dy.typed_data();
  auto row = ActiveRows().depthwise_weight_grad_row;
  ParallelFor(pool, parts, [&](int64_t part) {
    float* acc = partial.data() + part * size;
    for (int64_t t = rows * part / parts; t < rows * (part + 1) / parts; ++t) {
      row(g, xp, dyp, acc, t / g.oh, t % g.oh);
    }
  });
  float* out = dk->typed_data();
  std::memcpy(out, partial.data(), size * sizeof(float));
  for (int64_t part = 1; part < parts; ++part) {
    const float* src = partial.data() + part * size;
    for (int64_t e = 0; e < size; ++e) out[e] += src[e];
  }
  return ffi::Error::Success();
}

// Weight gradient of a dense (ungrouped) NHWC/HWIO convolution with a k x k kernel:
//   dw[i, j, a, b] = sum over output pixels p of x[p's input pixel for tap (i, j), a] * dy[p, b],
// a product over the long pixel axis into a small (ci x co) matrix per tap. XLA
// computes it as a convolution that needs both operands transposed first; here it
// is register-tiled outer products straight from the NHWC rows: kMr input
// channels (broadcast) times kNv vectors of output channels per tile,
// accumulated over a chunk of output rows that stays in L2 cache.

// One contiguous run of output pixels for one kernel tap.
struct Segment {
  const float* x;  // The input pixel the first output pixel reads, at channel 0.
  const float* dy;  // The first output pixel's gradient, at channel 0.
  int64_t len;
};

template <typename T, int MR, int NV>
TLFLAX_INLINE void WeightGradTile(const Segment* segs, int64_t nsegs,
                                                          int64_t xstep, int64_t co,
                                                          int64_t a0, int64_t b0, float* out) {
  using V = typename T::V;
  constexpr int W = T::kW;
  V acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = Load<V>(out + m * co + v * W);
  for (int64_t s = 0; s < nsegs; ++s) {
    const float* xp = segs[s].x + a0;
    const float* dp = segs[s].dy + b0;
    for (int64_t p = 0; p < segs[s].len; ++p, xp += xstep, dp += co) {
      V d[NV];
      for (int v = 0; v < NV; ++v) d[v] = Load<V>(dp + v * W);
      for (int m = 0; m < MR; ++m) {
        const float xm = xp[m];
        for (int v = 0; v < NV; ++v) acc[m][v] += d[v] * xm;
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) Store(out + m * co + v * W, acc[m][v]);
}

template <typename T, int MR>
TLFLAX_INLINE void WeightGradTiles(const Segment* segs, int64_t nsegs, int64_t xstep,
                                   int64_t co, int64_t a0, float* out) {
  int64_t b0 = 0;
  for (; b0 + T::kNv * T::kW <= co; b0 += T::kNv * T::kW)
    WeightGradTile<T, MR, T::kNv>(segs, nsegs, xstep, co, a0, b0, out + a0 * co + b0);
  if (const int rest = static_cast<int>((co - b0) / T::kW); rest > 0) {
    WithCount<T::kNv>(rest, [&](auto nv) __attribute__((always_inline)) {
      WeightGradTile<T, MR, decltype(nv)::value>(segs, nsegs, xstep, co, a0, b0,
                                              out + a0 * co + b0);
    });
  }
}

// Adds output rows [r0, r1) (flattened (n, oh)) into acc (kh * kw * ci * co floats),
// for input channels [a_lo, a_hi) only.
template <typename T>
TLFLAX_INLINE void ConvWeightGradRows(const ConvGeometry& cg, const float* x, const float* dy,
                                      float* acc, int64_t r0, int64_t r1, int64_t a_lo,
                                      int64_t a_hi) {
  const Geometry& g = cg.g;
  const int64_t ci = g.c, co = cg.co;
  std::vector<Segment> segs(r1 - r0);
  for (int64_t i = 0; i < g.kh; ++i) {
    for (int64_t j = 0; j < g.kw; ++j) {
      const int64_t off = j * g.dw - g.pl;  // Input column of output column 0 for tap j.
      const int64_t first = off >= 0 ? 0 : (-off + g.sw - 1) / g.sw;
      const int64_t last = g.w - 1 - off < 0 ? -1 : std::min(g.ow - 1, (g.w - 1 - off) / g.sw);
      if (last < first) continue;
      int64_t nsegs = 0;
      for (int64_t t = r0; t < r1; ++t) {
        const int64_t b = t / g.oh, r = t % g.oh, ih = g.InRow(r, i);
        if (ih < 0 || ih >= g.h) continue;
        segs[nsegs++] = Segment{x + ((b * g.h + ih) * g.w + first * g.sw + off) * ci,
                                dy + ((b * g.oh + r) * g.ow + first) * co, last - first + 1};
      }
      if (nsegs == 0) continue;
      float* out = acc + (i * g.kw + j) * ci * co;
      const int64_t xstep = g.sw * ci;
      int64_t a0 = a_lo;
      for (; a0 + T::kMr <= a_hi; a0 += T::kMr)
        WeightGradTiles<T, T::kMr>(segs.data(), nsegs, xstep, co, a0, out);
      if (const int rest = static_cast<int>(a_hi - a0); rest > 0) {
        WithCount<T::kMr>(rest, [&](auto mr) __attribute__((always_inline)) {
          WeightGradTiles<T, decltype(mr)::value>(segs.data(), nsegs, xstep, co, a0, out);
        });
      }
    }
  }
}

// Work split. A small dW (early layers: many pixels, few channels) is split by
// output rows, each part summing into its own copy, added in order at the end. A
// large dW (late layers: few pixels, many channels) is split by input channels
// instead: each part owns its slice of dW outright, no copies, nothing to add.
// Either way a chunk of rows whose input and gradient fit in L2 is swept by every
// tile before the next chunk. Both depend only on the shapes: results do not
// depend on the thread count.
constexpr int64_t kSplitRowsMaxBytes = 2 << 20;
constexpr int64_t kMaxParts = 16;
constexpr int64_t kChunkBytes = 512 << 10;  // 256 KiB to 1 MiB measured alike.

ffi::Error ConvWeightGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                              ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dw,
                              int64_t sh, int64_t sw, int64_t pt, int64_t pl, int64_t dh,
                              int64_t dwl) {
  auto wd = dw->dimensions();  // (kh, kw, ci, co)
  const ConvGeometry cg{MakeGeometry(x.dimensions(), dy.dimensions(), wd[0], wd[1], sh, sw, pt,
                                     pl, dh, dwl),
                        wd[3]};
  const Geometry& g = cg.g;
  if (wd[2] != g.c || dy.dimensions()[3] != cg.co || cg.co % kChannelMultiple != 0) {
    return ffi::Error::InvalidArgument(
        "tlflax conv weight gradient: shapes disagree, or output channels not a multiple of 16");
  }
  const int64_t rows = g.n * g.oh;
  const int64_t size = g.kh * g.kw * g.c * cg.co;
  const int64_t row_bytes = g.ow * (g.c * g.sw + cg.co) * 4;
  const int64_t chunk = std::max<int64_t>(1, kChunkBytes / std::max<int64_t>(1, row_bytes));
  float* out = dw->typed_data();
  const float* xp = x.typed_data();
  const float* dyp = dy.typed_data();
  auto rows_fn = ActiveRows().conv_weight_grad_rows;
  if (size * 4 > kSplitRowsMaxBytes) {
    const int64_t blocks = (g.c + kMaxMr - 1) / kMaxMr;
    const int64_t parts = std::min(blocks, kMaxParts);
    std::fill(out, out + size, 0.0f);
    ParallelFor(pool, parts, [&](int64_t part) {
      const int64_t a_lo = kMaxMr * (blocks * part / parts);
      const int64_t a_hi = std::min(g.c, kMaxMr * (blocks * (part + 1) / parts));
      for (int64_t r = 0; r < rows; r += chunk) {
        rows_fn(cg, xp, dyp, out, r, std::min(rows, r + chunk), a_lo, a_hi);
      }
    });
    return ffi::Error::Success();
  }
  const int64_t parts = std::max<int64_t>(1, std::min(rows, kMaxParts));
  std::vector<float> extra((parts - 1) * size);
  ParallelFor(pool, parts, [&](int64_t part) {
    float* acc = part == 0 ? out : extra.data() + (part - 1) * size;
    std::fill(acc, acc + size, 0.0f);
    const int64_t end = rows * (part + 1) / parts;
    for (int64_t r = rows * part / parts; r < end; r += chunk) {
      rows_fn(cg, xp, dyp, acc, r, std::min(end, r + chunk), 0, g.c);
    }
  });
  if (parts > 1) {  // Sum the parts in order, in slices across the pool.
    const int64_t slices = std::min<int64_t>(16, size);
    ParallelFor(pool, slices, [&](int64_t s) {
      const int64_t lo = size * s / slices, hi = size * (s + 1) / slices;
      for (int64_t part = 1; part < parts; ++part) {
        const float* src = extra.data() + (part - 1) * size;
        for (int64_t e = lo; e < hi; ++e) out[e] += src[e];
      }
    });
  }
  return ffi::Error::Success();
}

// Forward of a dense NHWC/HWIO convolution (k x k, output channels a multiple of 16):
//   y[p, b] = sum over taps (i, j) and input channels a of x[p's input pixel for (i, j), a] * w[i, j, a, b],
// a GEMM with the im2col matrix never formed. A tile is kMr consecutive output
// pixels (flattened over n, oh, ow, so a tile may span rows) times kNv vectors of
// output channels, held in registers across a block of kKc input channels for every tap.
// A tap that falls outside the input for some pixel of the tile reads a row of
// zeros for that pixel; a tap outside for all of them is skipped. The weight block
// (taps x kKc x 64) stays in L2 while a group of tiles runs through it. With
// flipped, transposed weights the same kernel is a stride-1 input gradient.

constexpr int64_t kKc = 64;  // Input channels per weight block.
constexpr int64_t kGroupPixels = 96;  // Output pixels per work item.
alignas(64) const float kZeros[kKc] = {};

// xs holds T::kMr pointers per tap (one per pixel of a full tile).
template <typename T, int MR, int NV>
TLFLAX_INLINE void ConvTile(const float* const* xs, const float* const* ws, int64_t taps,
                            int64_t kc, int64_t co, float* y, bool zero) {
  using V = typename T::V;
  constexpr int W = T::kW;
  V acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = zero ? V{} : Load<V>(y + m * co + v * W);
  for (int64_t t = 0; t < taps; ++t) {
    const float* const* xp = xs + t * T::kMr;
    const float* wp = ws[t];
    for (int64_t a = 0; a < kc; ++a, wp += co) {
      V wv[NV];
      for (int v = 0; v < NV; ++v) wv[v] = Load<V>(wp + v * W);
      for (int m = 0; m < MR; ++m) {
        const float xm = xp[m][a];
        for (int v = 0; v < NV; ++v) acc[m][v] += wv[v] * xm;
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) Store(y + m * co + v * W, acc[m][v]);
}

// Output pixels [p0, p1) (flattened (n, oh, ow)), channels [b0, b0 + 16 * nv), input
// channels [a0, a0 + kc); adds to y unless `zero` (the first input block).
template <typename T>
TLFLAX_INLINE void ConvForwardPixels(const ConvGeometry& cg, const float* x, const float* w,
                                     float* y, int64_t p0, int64_t p1, int64_t b0, int nv,
                                     int64_t a0, int64_t kc, bool zero) {
  constexpr int kMr = T::kMr;
  const Geometry& g = cg.g;
  const int64_t ci = g.c, co = cg.co;
  const float* xs[kMaxTaps * kMr];
  const float* ws[kMaxTaps];
  int64_t img[kMr], row[kMr], col[kMr];
  for (int64_t p = p0; p < p1; p += kMr) {
    const int mr = static_cast<int>(std::min<int64_t>(kMr, p1 - p));
    for (int m = 0; m < mr; ++m) {
      img[m] = (p + m) / (g.oh * g.ow);
      row[m] = (p + m) / g.ow % g.oh;
      col[m] = (p + m) % g.ow;
    }
    int64_t taps = 0;
    for (int64_t i = 0; i < g.kh; ++i) {
      for (int64_t j = 0; j < g.kw; ++j) {
        bool any = false;
        for (int m = 0; m < mr; ++m) {
          const int64_t ih = g.InRow(row[m], i), iw = g.InCol(col[m], j);
          const bool inside = ih >= 0 && ih < g.h && iw >= 0 && iw < g.w;
          xs[taps * kMr + m] = inside ? x + ((img[m] * g.h + ih) * g.w + iw) * ci + a0 : kZeros;
          any |= inside;
        }
        if (!any) continue;
        ws[taps++] = w + ((i * g.kw + j) * ci + a0) * co + b0;
      }
    }
    float* yp = y + p * co + b0;
    // The lambdas are always_inline: the tiles must compile into this level's row function.
    WithCount<T::kNv>(nv, [&](auto nvc) __attribute__((always_inline)) {
      WithCount<kMr>(mr, [&](auto mrc) __attribute__((always_inline)) {
        ConvTile<T, decltype(mrc)::value, decltype(nvc)::value>(xs, ws, taps, kc, co, yp, zero);
      });
    });
  }
}

ffi::Error ConvForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                           ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y, int64_t sh,
                           int64_t sw, int64_t pt, int64_t pl, int64_t dh, int64_t dwl) {
  auto wd = w.dimensions();  // (kh, kw, ci, co)
  const ConvGeometry cg{MakeGeometry(x.dimensions(), y->dimensions(), wd[0], wd[1], sh, sw, pt,
                                     pl, dh, dwl),
                        wd[3]};
  const Geometry& g = cg.g;
  if (wd[2] != g.c || y->dimensions()[3] != cg.co || cg.co % kChannelMultiple != 0 ||
      g.kh * g.kw > kMaxTaps) {
    return ffi::Error::InvalidArgument(
        "tlflax conv forward: shapes disagree, output channels not a multiple of 16, or "
        "more than 7x7 taps");
  }
  const int64_t pixels = g.n * g.oh * g.ow;
  const int64_t groups = (pixels + kGroupPixels - 1) / kGroupPixels;
  const RowKernels& k = ActiveRows();
  const int64_t block = k.nv * k.w;  // Output channels per work item.
  const int64_t cblocks = (cg.co + block - 1) / block;
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  ParallelFor(pool, groups * cblocks, [&](int64_t item) {
    const int64_t p0 = (item / cblocks) * kGroupPixels, b0 = (item % cblocks) * block;
    const int nv = static_cast<int>(std::min<int64_t>(k.nv, (cg.co - b0) / k.w));
    for (int64_t a0 = 0; a0 < g.c; a0 += kKc) {
      k.conv_forward_pixels(cg, xp, wp, yp, p0, std::min(pixels, p0 + kGroupPixels), b0, nv,
                            a0, std::min(kKc, g.c - a0), a0 == 0);
    }
  });
  return ffi::Error::Success();
}

// Max pooling over (kh, kw) windows, padding counted as -inf. Writes the max and,
// when `index` is given, the window tap (i * kw + j) it came from: the first
// maximum in row-major tap order, or the first NaN (which propagates, as in lax).
// A window with no tap inside the input gets index 255 (no input to credit).
//
// The compare-and-blend loops are written with AVX-512 or AVX2 intrinsics, by the
// active level: GCC lowers generic vector compares for the baseline ISA even in
// functions built for a higher one, which made them scalar (8x slower than lax).
// Baseline, and the last channels short of a vector, use plain loops.

// Max (and argmax tap) over the n taps of 16 channels starting at each taps[t].
template <bool kIndex>
inline __attribute__((always_inline)) void MaxTapsScalar(const float* const* taps,
                                                         const int32_t* ids, int64_t n,
                                                         int64_t c0, int64_t c1, float* best,
                                                         uint8_t* index) {
  for (int64_t c = c0; c < c1; ++c) {
    float m = taps[0][c];
    int32_t id = ids[0];
    for (int64_t t = 1; t < n; ++t) {
      const float v = taps[t][c];
      if (m == m && (v > m || v != v)) {  // Larger or NaN, unless the max is already NaN.
        m = v;
        id = ids[t];
      }
    }
    best[c] = m;
    if (kIndex) index[c] = static_cast<uint8_t>(id);
  }
}

#ifdef TLFLAX_X86
template <bool kIndex>
__attribute__((target("avx512f"))) int64_t MaxTapsAvx512(const float* const* taps,
                                                         const int32_t* ids, int64_t n,
                                                         int64_t channels, float* best,
                                                         uint8_t* index) {
  int64_t c = 0;
  for (; c + 16 <= channels; c += 16) {
    __m512 m = _mm512_loadu_ps(taps[0] + c);
    __m512i id = _mm512_set1_epi32(ids[0]);
    for (int64_t t = 1; t < n; ++t) {
      const __m512 v = _mm512_loadu_ps(taps[t] + c);
      const __mmask16 take = _mm512_cmp_ps_mask(m, m, _CMP_ORD_Q) &
                             (_mm512_cmp_ps_mask(v, m, _CMP_GT_OQ) |
                              _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q));
      m = _mm512_mask_blend_ps(take, m, v);
      if (kIndex) id = _mm512_mask_blend_epi32(take, id, _mm512_set1_epi32(ids[t]));
    }
    _mm512_storeu_ps(best + c, m);
    if (kIndex) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(index + c), _mm512_cvtepi32_epi8(id));
    }
  }
  return c;
}

// dst[c] += src[c] where index[c] == tap, for 16-channel blocks; returns channels done.
__attribute__((target("avx512f"))) int64_t AddWhereAvx512(float* dst, const float* src,
                                                          const uint8_t* index, int32_t tap,
                                                          int64_t channels) {
  int64_t c = 0;
  const __m512i want = _mm512_set1_epi32(tap);
  for (; c + 16 <= channels; c += 16) {
    const __m512i ids = _mm512_cvtepu8_epi32(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(index + c)));
    const __mmask16 hit = _mm512_cmpeq_epi32_mask(ids, want);
    _mm512_storeu_ps(dst + c, _mm512_mask_add_ps(_mm512_loadu_ps(dst + c), hit,
                                                 _mm512_loadu_ps(dst + c),
                                                 _mm512_loadu_ps(src + c)));
  }
  return c;
}

// The same with AVX2, 8 channels at a time.
template <bool kIndex>
__attribute__((target("avx2"))) int64_t MaxTapsAvx2(const float* const* taps,
                                                     const int32_t* ids, int64_t n,
                                                     int64_t channels, float* best,
                                                     uint8_t* index) {
  int64_t c = 0;
  for (; c + 8 <= channels; c += 8) {
    __m256 m = _mm256_loadu_ps(taps[0] + c);
    __m256i id = _mm256_set1_epi32(ids[0]);
    for (int64_t t = 1; t < n; ++t) {
      const __m256 v = _mm256_loadu_ps(taps[t] + c);
      const __m256 take = _mm256_and_ps(
          _mm256_cmp_ps(m, m, _CMP_ORD_Q),
          _mm256_or_ps(_mm256_cmp_ps(v, m, _CMP_GT_OQ), _mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
      m = _mm256_blendv_ps(m, v, take);
      if (kIndex) {
        id = _mm256_castps_si256(_mm256_blendv_ps(
            _mm256_castsi256_ps(id), _mm256_castsi256_ps(_mm256_set1_epi32(ids[t])), take));
      }
    }
    _mm256_storeu_ps(best + c, m);
    if (kIndex) {
      alignas(32) int32_t lanes[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), id);
      for (int l = 0; l < 8; ++l) index[c + l] = static_cast<uint8_t>(lanes[l]);
    }
  }
  return c;
}

__attribute__((target("avx2"))) int64_t AddWhereAvx2(float* dst, const float* src,
                                                     const uint8_t* index, int32_t tap,
                                                     int64_t channels) {
  int64_t c = 0;
  const __m256i want = _mm256_set1_epi32(tap);
  for (; c + 8 <= channels; c += 8) {
    const __m256i ids = _mm256_cvtepu8_epi32(
        _mm_loadl_epi64(reinterpret_cast<const __m128i*>(index + c)));
    const __m256 hit = _mm256_castsi256_ps(_mm256_cmpeq_epi32(ids, want));
    _mm256_storeu_ps(dst + c, _mm256_add_ps(_mm256_loadu_ps(dst + c),
                                            _mm256_and_ps(hit, _mm256_loadu_ps(src + c))));
  }
  return c;
}
#endif

template <bool kIndex>
void MaxPoolRow(const Geometry& g, const float* x, float* y, uint8_t* index, int64_t b,
                int64_t r) {
  const float* taps[255];
  int32_t ids[255];
  for (int64_t q = 0; q < g.ow; ++q) {
    int64_t n = 0;
    for (int64_t i = 0; i < g.kh; ++i) {
      const int64_t ih = g.InRow(r, i);
      if (ih < 0 || ih >= g.h) continue;
      for (int64_t j = 0; j < g.kw; ++j) {
        const int64_t iw = g.InCol(q, j);
        if (iw < 0 || iw >= g.w) continue;
        taps[n] = x + ((b * g.h + ih) * g.w + iw) * g.c;
        ids[n++] = static_cast<int32_t>(i * g.kw + j);
      }
    }
    const int64_t o = ((b * g.oh + r) * g.ow + q) * g.c;
    uint8_t* ip = kIndex ? index + o : nullptr;
    if (n == 0) {  // Only padding: -inf, and no input to credit.
      std::fill(y + o, y + o + g.c, -std::numeric_limits<float>::infinity());
      if (kIndex) std::fill(ip, ip + g.c, uint8_t{255});
      continue;
    }
    int64_t done = 0;
#ifdef TLFLAX_X86
    const int isa = g_isa.load(std::memory_order_relaxed);
    if (isa >= kAvx512) {
      done = MaxTapsAvx512<kIndex>(taps, ids, n, g.c, y + o, ip);
    } else if (isa >= kAvx2) {
      done = MaxTapsAvx2<kIndex>(taps, ids, n, g.c, y + o, ip);
    }
#endif
    MaxTapsScalar<kIndex>(taps, ids, n, done, g.c, y + o, ip);
  }
}

template <bool kIndex>
ffi::Error MaxPool(ffi::ThreadPool& pool, const float* x, ffi::Span<const int64_t> in,
                   float* y, ffi::Span<const int64_t> out, uint8_t* index, int64_t kh,
                   int64_t kw, int64_t sh, int64_t sw, int64_t pt, int64_t pl) {
  if (kh * kw > 255 || kh < 1 || kw < 1) {
    return ffi::Error::InvalidArgument("tlflax max pool: window larger than 255 taps");
  }
  const Geometry g = MakeGeometry(in, out, kh, kw, sh, sw, pt, pl, 1, 1);
  ParallelFor(pool, g.n * g.oh,
              [&](int64_t t) { MaxPoolRow<kIndex>(g, x, y, index, t / g.oh, t % g.oh); });
  return ffi::Error::Success();
}

ffi::Error MaxPoolImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                       ffi::ResultBuffer<ffi::F32> y, int64_t kh, int64_t kw, int64_t sh,
                       int64_t sw, int64_t pt, int64_t pl) {
  return MaxPool<false>(pool, x.typed_data(), x.dimensions(), y->typed_data(), y->dimensions(),
                        nullptr, kh, kw, sh, sw, pt, pl);
}

ffi::Error MaxPoolWithIndexImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::U8> index,
                                int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t pt,
                                int64_t pl) {
  return MaxPool<true>(pool, x.typed_data(), x.dimensions(), y->typed_data(), y->dimensions(),
                       index->typed_data(), kh, kw, sh, sw, pt, pl);
}

// dx for one image: each output's dy added onto its argmax tap, one pass per
// (output pixel, tap) over the channels.
void MaxPoolGradImage(const Geometry& g, const float* dy, const uint8_t* index, float* dx,
                      int64_t b) {
  float* img = dx + b * g.h * g.w * g.c;
  std::fill(img, img + g.h * g.w * g.c, 0.0f);
  for (int64_t r = 0; r < g.oh; ++r) {
    for (int64_t q = 0; q < g.ow; ++q) {
      const int64_t o = ((b * g.oh + r) * g.ow + q) * g.c;
      for (int64_t i = 0; i < g.kh; ++i) {
        const int64_t ih = g.InRow(r, i);
        if (ih < 0 || ih >= g.h) continue;
        for (int64_t j = 0; j < g.kw; ++j) {
          const int64_t iw = g.InCol(q, j);
          if (iw < 0 || iw >= g.w) continue;
          const int32_t tap = static_cast<int32_t>(i * g.kw + j);
          float* in = img + (ih * g.w + iw) * g.c;
          int64_t c = 0;
#ifdef TLFLAX_X86
          const int isa = g_isa.load(std::memory_order_relaxed);
          if (isa >= kAvx512) {
            c = AddWhereAvx512(in, dy + o, index + o, tap, g.c);
          } else if (isa >= kAvx2) {
            c = AddWhereAvx2(in, dy + o, index + o, tap, g.c);
          }
#endif
          for (; c < g.c; ++c) {
            if (index[o + c] == tap) in[c] += dy[o + c];
          }
        }
      }
    }
  }
}

ffi::Error MaxPoolGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy,
                           ffi::Buffer<ffi::U8> index, ffi::ResultBuffer<ffi::F32> dx,
                           int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t pt,
                           int64_t pl) {
  const Geometry g = MakeGeometry(dx->dimensions(), dy.dimensions(), kh, kw, sh, sw, pt, pl, 1, 1);
  const float* dyp = dy.typed_data();
  const uint8_t* ip = index.typed_data();
  float* dxp = dx->typed_data();
  ParallelFor(pool, g.n, [&](int64_t b) { MaxPoolGradImage(g, dyp, ip, dxp, b); });
  return ffi::Error::Success();
}

// One level's row functions: the templates above inlined into functions built
// for that level's ISA (the target attribute applies to what is inlined).
#define TLFLAX_ROW_KERNELS(TILES, ATTR)                                                      \
  ATTR void DepthwiseForwardRow_##TILES(const Geometry& g, const float* a, const float* b,   \
                                        float* out, int64_t n, int64_t r) {                  \
    DepthwiseForwardRow<TILES>(g, a, b, out, n, r);                                          \
  }                                                                                          \
  ATTR void DepthwiseInputGradRow_##TILES(const Geometry& g, const float* a, const float* b, \
                                          float* out, int64_t n, int64_t r) {                \
    DepthwiseInputGradRow<TILES>(g, a, b, out, n, r);                                        \
  }                                                                                          \
  ATTR void DepthwiseWeightGradRow_##TILES(const Geometry& g, const float* a,                \
                                           const float* b, float* out, int64_t n,            \
                                           int64_t r) {                                      \
    DepthwiseWeightGradRow<TILES>(g, a, b, out, n, r);                                       \
  }                                                                                          \
  ATTR void ConvWeightGradRows_##TILES(const ConvGeometry& cg, const float* a,               \
                                       const float* b, float* out, int64_t r0, int64_t r1,   \
                                       int64_t lo, int64_t hi) {                             \
    ConvWeightGradRows<TILES>(cg, a, b, out, r0, r1, lo, hi);                                \
  }                                                                                          \
  ATTR void ConvForwardPixels_##TILES(const ConvGeometry& cg, const float* a, const float* b, \
                                      float* out, int64_t p0, int64_t p1, int64_t b0, int nv, \
                                      int64_t a0, int64_t kc, bool zero) {                   \
    ConvForwardPixels<TILES>(cg, a, b, out, p0, p1, b0, nv, a0, kc, zero);                   \
  }                                                                                          \
  const RowKernels kRows_##TILES = {TILES::kW,                                               \
                                    TILES::kNv,                                              \
                                    &DepthwiseForwardRow_##TILES,                            \
                                    &DepthwiseInputGradRow_##TILES,                          \
                                    &DepthwiseWeightGradRow_##TILES,                         \
                                    &ConvWeightGradRows_##TILES,                             \
                                    &ConvForwardPixels_##TILES};

TLFLAX_ROW_KERNELS(Avx512Tiles, TLFLAX_TARGET_AVX512)
TLFLAX_ROW_KERNELS(Avx2Tiles, TLFLAX_TARGET_AVX2)
TLFLAX_ROW_KERNELS(BaselineTiles, )

const RowKernels& ActiveRows() {
  switch (g_isa.load(std::memory_order_relaxed)) {
    case kAvx512: return kRows_Avx512Tiles;
    case kAvx2: return kRows_Avx2Tiles;
    default: return kRows_BaselineTiles;
  }
}

}  // namespace

#define TLFLAX_CONV_ATTRS                                                              \
  .Attr<int64_t>("stride_h").Attr<int64_t>("stride_w").Attr<int64_t>("pad_top")        \
      .Attr<int64_t>("pad_left").Attr<int64_t>("dilation_h").Attr<int64_t>("dilation_w")
#define TLFLAX_POOL_ATTRS                                                              \
  .Attr<int64_t>("window_h").Attr<int64_t>("window_w").Attr<int64_t>("stride_h")       \
      .Attr<int64_t>("stride_w").Attr<int64_t>("pad_top").Attr<int64_t>("pad_left")

// The convolution kernels share one signature: two float32 operands, one float32
// result, the convolution attributes.
#define TLFLAX_CONV_HANDLER(symbol, impl)                                               \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(symbol, impl,                                           \
                                ffi::Ffi::Bind()                                        \
                                    .Ctx<ffi::ThreadPool>()                             \
                                    .Arg<ffi::Buffer<ffi::F32>>()                       \
                                    .Arg<ffi::Buffer<ffi::F32>>()                       \
                                    .Ret<ffi::Buffer<ffi::F32>>() TLFLAX_CONV_ATTRS)

TLFLAX_CONV_HANDLER(TlflaxDepthwiseForward, DepthwiseForwardImpl);
TLFLAX_CONV_HANDLER(TlflaxDepthwiseInputGrad, DepthwiseInputGradImpl);
TLFLAX_CONV_HANDLER(TlflaxDepthwiseWeightGrad, DepthwiseWeightGradImpl);
TLFLAX_CONV_HANDLER(TlflaxConvForward, ConvForwardImpl);
TLFLAX_CONV_HANDLER(TlflaxConvWeightGrad, ConvWeightGradImpl);
XLA_FFI_DEFINE_HANDLER_SYMBOL(TlflaxMaxPool, MaxPoolImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() TLFLAX_POOL_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(TlflaxMaxPoolWithIndex, MaxPoolWithIndexImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::U8>>() TLFLAX_POOL_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(TlflaxMaxPoolGrad, MaxPoolGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() TLFLAX_POOL_ATTRS);

// The Python module: `targets()` maps each FFI target name to its handler capsule.
namespace {

PyObject* Targets(PyObject*, PyObject*) {
  struct Entry {
    const char* name;
    void* handler;
  };
  const Entry entries[] = {
      {"tlflax_depthwise_forward", reinterpret_cast<void*>(TlflaxDepthwiseForward)},
      {"tlflax_depthwise_input_grad", reinterpret_cast<void*>(TlflaxDepthwiseInputGrad)},
      {"tlflax_depthwise_weight_grad", reinterpret_cast<void*>(TlflaxDepthwiseWeightGrad)},
      {"tlflax_conv_forward", reinterpret_cast<void*>(TlflaxConvForward)},
      {"tlflax_conv_weight_grad", reinterpret_cast<void*>(TlflaxConvWeightGrad)},
      {"tlflax_max_pool", reinterpret_cast<void*>(TlflaxMaxPool)},
      {"tlflax_max_pool_with_index", reinterpret_cast<void*>(TlflaxMaxPoolWithIndex)},
      {"tlflax_max_pool_grad", reinterpret_cast<void*>(TlflaxMaxPoolGrad)},
  };
  PyObject* dict = PyDict_New();
  if (dict == nullptr) return nullptr;
  for (const Entry& e : entries) {
    PyObject* capsule = PyCapsule_New(e.handler, nullptr, nullptr);
    if (capsule == nullptr || PyDict_SetItemString(dict, e.name, capsule) != 0) {
      Py_XDECREF(capsule);
      Py_DECREF(dict);
      return nullptr;
    }
    Py_DECREF(capsule);
  }
  return dict;
}

PyObject* Isa(PyObject*, PyObject*) { return PyUnicode_FromString(kIsaNames[g_isa.load()]); }

PyObject* SupportedIsaName(PyObject*, PyObject*) {
  return PyUnicode_FromString(kIsaNames[SupportedIsa()]);
}

// set_isa(name): run the kernels at a level at most the CPU's (for tests and benchmarks).
PyObject* SetIsa(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  for (int level = kBaseline; level <= kAvx512; ++level) {
    if (std::strcmp(name, kIsaNames[level]) != 0) continue;
    if (level > SupportedIsa()) {
      PyErr_Format(PyExc_ValueError, "ISA level %s is above this CPU's (%s)", name,
                   kIsaNames[SupportedIsa()]);
      return nullptr;
    }
    g_isa.store(level);
    Py_RETURN_NONE;
  }
  PyErr_Format(PyExc_ValueError, "unknown ISA level %s; expected baseline, avx2 or avx512",
               name);
  return nullptr;
}

PyMethodDef kMethods[] = {
    {"targets", Targets, METH_NOARGS, "FFI target name -> XLA FFI handler capsule."},
    {"isa", Isa, METH_NOARGS, "The ISA level the kernels run at."},
    {"supported_isa", SupportedIsaName, METH_NOARGS, "The highest ISA level this CPU runs."},
    {"set_isa", SetIsa, METH_O, "Runs the kernels at a level at most supported_isa()."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_cpu_kernels",
                       "tlflax's XLA FFI CPU kernels (see tlflax/ops/kernels.py).", -1, kMethods};

}  // namespace

PyMODINIT_FUNC PyInit__cpu_kernels() { return PyModule_Create(&kModule); }
