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
// The channel loops are written for the compiler to vectorize; on x86-64 each
// hot function is compiled for AVX-512, AVX2+FMA and baseline, chosen at load
// time (target_clones), so a build on one machine runs on another.

#include <Python.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define TLFLAX_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define TLFLAX_CLONES
#endif

namespace {

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

// 16 floats: one AVX-512 register, two AVX2 ones; the compiler splits it per target.
typedef float Vec __attribute__((vector_size(64)));
constexpr int64_t kLanes = 16;

inline Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(Vec));
  return v;
}

inline void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof(Vec)); }

// out[0:cn] = sum over taps t of a[t][0:cn] * b[t][0:cn]. Channels go in blocks
// of 64 held in four registers across all taps, then 16, then one at a time.
TLFLAX_CLONES void TapsDot(const float* const* a, const float* const* b, int64_t taps,
                           int64_t cn, float* out) {
  int64_t c = 0;
  for (; c + 4 * kLanes <= cn; c += 4 * kLanes) {
    Vec s0 = {}, s1 = {}, s2 = {}, s3 = {};
    for (int64_t t = 0; t < taps; ++t) {
      const float* x = a[t] + c;
      const float* y = b[t] + c;
      s0 += Load(x) * Load(y);
      s1 += Load(x + kLanes) * Load(y + kLanes);
      s2 += Load(x + 2 * kLanes) * Load(y + 2 * kLanes);
      s3 += Load(x + 3 * kLanes) * Load(y + 3 * kLanes);
    }
    Store(out + c, s0);
    Store(out + c + kLanes, s1);
    Store(out + c + 2 * kLanes, s2);
    Store(out + c + 3 * kLanes, s3);
  }
  for (; c + kLanes <= cn; c += kLanes) {
    Vec s = {};
    for (int64_t t = 0; t < taps; ++t) s += Load(a[t] + c) * Load(b[t] + c);
    Store(out + c, s);
  }
  for (; c < cn; ++c) {
    float s = 0.0f;
    for (int64_t t = 0; t < taps; ++t) s += a[t][c] * b[t][c];
    out[c] = s;
  }
}

// out[0:cn] += sum over `len` pixels p of x[p * xstep + (0:cn)] * y[p * cn + (0:cn)].
TLFLAX_CLONES void RowDot(const float* x, int64_t xstep, const float* y, int64_t len,
                          int64_t cn, float* out) {
  int64_t c = 0;
  for (; c + 4 * kLanes <= cn; c += 4 * kLanes) {
    Vec s0 = {}, s1 = {}, s2 = {}, s3 = {};
    for (int64_t p = 0; p < len; ++p) {
      const float* a = x + p * xstep + c;
      const float* b = y + p * cn + c;
      s0 += Load(a) * Load(b);
      s1 += Load(a + kLanes) * Load(b + kLanes);
      s2 += Load(a + 2 * kLanes) * Load(b + 2 * kLanes);
      s3 += Load(a + 3 * kLanes) * Load(b + 3 * kLanes);
    }
    Store(out + c, Load(out + c) + s0);
    Store(out + c + kLanes, Load(out + c + kLanes) + s1);
    Store(out + c + 2 * kLanes, Load(out + c + 2 * kLanes) + s2);
    Store(out + c + 3 * kLanes, Load(out + c + 3 * kLanes) + s3);
  }
  for (; c + kLanes <= cn; c += kLanes) {
    Vec s = {};
    for (int64_t p = 0; p < len; ++p) s += Load(x + p * xstep + c) * Load(y + p * cn + c);
    Store(out + c, Load(out + c) + s);
  }
  for (; c < cn; ++c) {
    float s = 0.0f;
    for (int64_t p = 0; p < len; ++p) s += x[p * xstep + c] * y[p * cn + c];
    out[c] += s;
  }
}

constexpr int64_t kMaxTaps = 49;

// One output row of the depthwise forward: y[b, r, :, :].
void DepthwiseForwardRow(const Geometry& g, const float* x, const float* k, float* y, int64_t b,
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
    TapsDot(xs, ks, taps, g.c, y + ((b * g.oh + r) * g.ow + q) * g.c);
  }
}

// One input row of the depthwise input gradient: dx[b, r, :, :]. Input pixel
// (r, q) receives dy[o, p] * k[i, j] wherever o*sh - pt + i*dh == r, likewise q.
void DepthwiseInputGradRow(const Geometry& g, const float* dy, const float* k, float* dx,
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
    TapsDot(ds, ks, taps, g.c, dx + ((b * g.h + r) * g.w + q) * g.c);
  }
}

// Adds one output row's contribution to the depthwise weight gradient:
// acc[i, j, :] += sum over p of x[b, r*sh - pt + i*dh, p*sw - pl + j*dw, :] * dy[b, r, p, :].
void DepthwiseWeightGradRow(const Geometry& g, const float* x, const float* dy, float* acc,
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
      RowDot(xs, g.sw * g.c, dyrow + first * g.c, last - first + 1, g.c,
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
  ParallelFor(pool, g.n * g.oh,
              [&](int64_t t) { DepthwiseForwardRow(g, xp, kp, yp, t / g.oh, t % g.oh); });
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
  ParallelFor(pool, g.n * g.h,
              [&](int64_t t) { DepthwiseInputGradRow(g, dyp, kp, dxp, t / g.h, t % g.h); });
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
  ParallelFor(pool, parts, [&](int64_t part) {
    float* acc = partial.data() + part * size;
    for (int64_t t = rows * part / parts; t < rows * (part + 1) / parts; ++t) {
      DepthwiseWeightGradRow(g, xp, dyp, acc, t / g.oh, t % g.oh);
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
// channels (broadcast) times up to 64 output channels (four vectors) per tile,
// accumulated over a chunk of output rows that stays in L2 cache.

// One contiguous run of output pixels for one kernel tap.
struct Segment {
  const float* x;  // The input pixel the first output pixel reads, at channel 0.
  const float* dy;  // The first output pixel's gradient, at channel 0.
  int64_t len;
};

constexpr int kMr = 6;  // Input channels per tile: 6 x 4 accumulators + 4 loads + 1 broadcast.

template <int MR, int NV>
inline __attribute__((always_inline)) void WeightGradTile(const Segment* segs, int64_t nsegs,
                                                          int64_t xstep, int64_t co,
                                                          int64_t a0, int64_t b0, float* out) {
  Vec acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = Load(out + m * co + v * kLanes);
  for (int64_t s = 0; s < nsegs; ++s) {
    const float* xp = segs[s].x + a0;
    const float* dp = segs[s].dy + b0;
    for (int64_t p = 0; p < segs[s].len; ++p, xp += xstep, dp += co) {
      Vec d[NV];
      for (int v = 0; v < NV; ++v) d[v] = Load(dp + v * kLanes);
      for (int m = 0; m < MR; ++m) {
        const float xm = xp[m];
        for (int v = 0; v < NV; ++v) acc[m][v] += d[v] * xm;
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) Store(out + m * co + v * kLanes, acc[m][v]);
}

template <int MR>
inline __attribute__((always_inline)) void WeightGradTiles(const Segment* segs, int64_t nsegs,
                                                           int64_t xstep, int64_t co,
                                                           int64_t a0, float* out) {
  int64_t b0 = 0;
  for (; b0 + 4 * kLanes <= co; b0 += 4 * kLanes)
    WeightGradTile<MR, 4>(segs, nsegs, xstep, co, a0, b0, out + a0 * co + b0);
  switch ((co - b0) / kLanes) {
    case 3: WeightGradTile<MR, 3>(segs, nsegs, xstep, co, a0, b0, out + a0 * co + b0); break;
    case 2: WeightGradTile<MR, 2>(segs, nsegs, xstep, co, a0, b0, out + a0 * co + b0); break;
    case 1: WeightGradTile<MR, 1>(segs, nsegs, xstep, co, a0, b0, out + a0 * co + b0); break;
    default: break;
  }
}

struct ConvGeometry {
  Geometry g;  // g.c is the input channels.
  int64_t co;
};

// Adds output rows [r0, r1) (flattened (n, oh)) into acc (kh * kw * ci * co floats),
// for input channels [a_lo, a_hi) only.
TLFLAX_CLONES void ConvWeightGradRows(const ConvGeometry& cg, const float* x, const float* dy,
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
      for (; a0 + kMr <= a_hi; a0 += kMr)
        WeightGradTiles<kMr>(segs.data(), nsegs, xstep, co, a0, out);
      switch (a_hi - a0) {
        case 5: WeightGradTiles<5>(segs.data(), nsegs, xstep, co, a0, out); break;
        case 4: WeightGradTiles<4>(segs.data(), nsegs, xstep, co, a0, out); break;
        case 3: WeightGradTiles<3>(segs.data(), nsegs, xstep, co, a0, out); break;
        case 2: WeightGradTiles<2>(segs.data(), nsegs, xstep, co, a0, out); break;
        case 1: WeightGradTiles<1>(segs.data(), nsegs, xstep, co, a0, out); break;
        default: break;
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
  if (wd[2] != g.c || dy.dimensions()[3] != cg.co || cg.co % kLanes != 0) {
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
  if (size * 4 > kSplitRowsMaxBytes) {
    const int64_t blocks = (g.c + kMr - 1) / kMr;
    const int64_t parts = std::min(blocks, kMaxParts);
    std::fill(out, out + size, 0.0f);
    ParallelFor(pool, parts, [&](int64_t part) {
      const int64_t a_lo = kMr * (blocks * part / parts);
      const int64_t a_hi = std::min(g.c, kMr * (blocks * (part + 1) / parts));
      for (int64_t r = 0; r < rows; r += chunk) {
        ConvWeightGradRows(cg, xp, dyp, out, r, std::min(rows, r + chunk), a_lo, a_hi);
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
      ConvWeightGradRows(cg, xp, dyp, acc, r, std::min(end, r + chunk), 0, g.c);
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
// pixels (flattened over n, oh, ow, so a tile may span rows) times up to 64 output
// channels, held in registers across a block of kKc input channels for every tap.
// A tap that falls outside the input for some pixel of the tile reads a row of
// zeros for that pixel; a tap outside for all of them is skipped. The weight block
// (taps x kKc x 64) stays in L2 while a group of tiles runs through it. With
// flipped, transposed weights the same kernel is a stride-1 input gradient.

constexpr int64_t kKc = 64;  // Input channels per weight block.
constexpr int64_t kGroupPixels = 96;  // Output pixels per work item.
alignas(64) const float kZeros[kKc] = {};

template <int MR, int NV>
inline __attribute__((always_inline)) void ConvTile(const float* const* xs,
                                                    const float* const* ws, int64_t taps,
                                                    int64_t kc, int64_t co, float* y,
                                                    bool zero) {
  Vec acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = zero ? Vec{} : Load(y + m * co + v * kLanes);
  for (int64_t t = 0; t < taps; ++t) {
    const float* const* xp = xs + t * kMr;
    const float* wp = ws[t];
    for (int64_t a = 0; a < kc; ++a, wp += co) {
      Vec wv[NV];
      for (int v = 0; v < NV; ++v) wv[v] = Load(wp + v * kLanes);
      for (int m = 0; m < MR; ++m) {
        const float xm = xp[m][a];
        for (int v = 0; v < NV; ++v) acc[m][v] += wv[v] * xm;
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) Store(y + m * co + v * kLanes, acc[m][v]);
}

template <int NV>
inline __attribute__((always_inline)) void ConvTileMr(int mr, const float* const* xs,
                                                      const float* const* ws, int64_t taps,
                                                      int64_t kc, int64_t co, float* y,
                                                      bool zero) {
  switch (mr) {
    case 6: ConvTile<6, NV>(xs, ws, taps, kc, co, y, zero); break;
    case 5: ConvTile<5, NV>(xs, ws, taps, kc, co, y, zero); break;
    case 4: ConvTile<4, NV>(xs, ws, taps, kc, co, y, zero); break;
    case 3: ConvTile<3, NV>(xs, ws, taps, kc, co, y, zero); break;
    case 2: ConvTile<2, NV>(xs, ws, taps, kc, co, y, zero); break;
    default: ConvTile<1, NV>(xs, ws, taps, kc, co, y, zero); break;
  }
}

// Output pixels [p0, p1) (flattened (n, oh, ow)), channels [b0, b0 + 16 * nv), input
// channels [a0, a0 + kc); adds to y unless `zero` (the first input block).
TLFLAX_CLONES void ConvForwardPixels(const ConvGeometry& cg, const float* x, const float* w,
                                     float* y, int64_t p0, int64_t p1, int64_t b0, int nv,
                                     int64_t a0, int64_t kc, bool zero) {
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
    // Dispatched here, not in a helper lambda: the tiles must inline into this
    // function's per-ISA clones.
    switch (nv) {
      case 4: ConvTileMr<4>(mr, xs, ws, taps, kc, co, yp, zero); break;
      case 3: ConvTileMr<3>(mr, xs, ws, taps, kc, co, yp, zero); break;
      case 2: ConvTileMr<2>(mr, xs, ws, taps, kc, co, yp, zero); break;
      default: ConvTileMr<1>(mr, xs, ws, taps, kc, co, yp, zero); break;
    }
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
  if (wd[2] != g.c || y->dimensions()[3] != cg.co || cg.co % kLanes != 0 ||
      g.kh * g.kw > kMaxTaps) {
    return ffi::Error::InvalidArgument(
        "tlflax conv forward: shapes disagree, output channels not a multiple of 16, or "
        "more than 7x7 taps");
  }
  const int64_t pixels = g.n * g.oh * g.ow;
  const int64_t groups = (pixels + kGroupPixels - 1) / kGroupPixels;
  const int64_t cblocks = (cg.co + 4 * kLanes - 1) / (4 * kLanes);
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  ParallelFor(pool, groups * cblocks, [&](int64_t item) {
    const int64_t p0 = (item / cblocks) * kGroupPixels, b0 = (item % cblocks) * 4 * kLanes;
    const int nv = static_cast<int>(std::min<int64_t>(4, (cg.co - b0) / kLanes));
    for (int64_t a0 = 0; a0 < g.c; a0 += kKc) {
      ConvForwardPixels(cg, xp, wp, yp, p0, std::min(pixels, p0 + kGroupPixels), b0, nv, a0,
                        std::min(kKc, g.c - a0), a0 == 0);
    }
  });
  return ffi::Error::Success();
}

// Max pooling over (kh, kw) windows, padding counted as -inf. Writes the max and,
// when `index` is given, the window tap (i * kw + j) it came from: the first
// maximum in row-major tap order, or the first NaN (which propagates, as in lax).
// A window with no tap inside the input gets index 255 (no input to credit).
//
// The compare-and-blend loops are written with AVX-512 intrinsics where the CPU
// has them: GCC lowers vector compares for the baseline ISA even inside
// target_clones clones, which made them scalar (8x slower than lax). Elsewhere,
// and for the last channels short of 16, plain loops.

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

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define TLFLAX_AVX512 1
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

bool HasAvx512() {
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
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
#ifdef TLFLAX_AVX512
    if (HasAvx512()) done = MaxTapsAvx512<kIndex>(taps, ids, n, g.c, y + o, ip);
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
#ifdef TLFLAX_AVX512
          if (HasAvx512()) c = AddWhereAvx512(in, dy + o, index + o, tap, g.c);
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

PyMethodDef kMethods[] = {
    {"targets", Targets, METH_NOARGS, "FFI target name -> XLA FFI handler capsule."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_cpu_kernels",
                       "tlflax's XLA FFI CPU kernels (see tlflax/ops/kernels.py).", -1, kMethods};

}  // namespace

PyMODINIT_FUNC PyInit__cpu_kernels() { return PyModule_Create(&kModule); }
