// Per-head products for a few rows (decode steps, short chunks) on CPU:
//   y[m, h, :] = x[m, h, :] · W[h]          (W[h]: [K, N] — the query absorbs W_UK: q_lat = q_nope · W_UK)
//   y[m, h, :] = x[m, h, :] · W[h]ᵀ + b[h]  (W[h]: [N, K] — the output absorbs W_UV: o = o_lat · W_UVᵀ;
//                                           with H = 1, a linear layer's projection)
// With one or a few rows these are matrix-vector products, bound by reading the weights: each weight
// row is read once, in place (strided views such as w_ukv's are fine; fp32, bf16 or fp64), widened in
// registers and used for every row. Each thread walks its share of the weights front to back and
// requests the rows it reads next into L2 ahead of use, a line per load: rows are a few KB, over
// before the hardware prefetcher has noticed them (requests into L1 measured 15-20% slower from memory:
// docs/bench/head_products.py).
//
// Notation: M rows (B·T), H heads, K reduction width, N output width, L vector lanes.
// Plain C ABI, called through ctypes; the caller validates every argument.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "vectors.h"

namespace {

enum WeightKind : int32_t { SAME = 0, BF16 = 1 };
constexpr int SUM_ROWS = 4;                   // `rows`: rows of x whose sums share one pass over the weights
constexpr int DOT_ROWS = 4, DOT_WEIGHTS = 4;  // `dots`: a block of dot products in registers
constexpr int64_t LINE = 64;                  // bytes per cache line
constexpr int64_t AHEAD = 8192;               // how far ahead weights are requested into L2 (bytes, at least)
constexpr int64_t MIN_BYTES_PER_THREAD = 16384;  // fewer weight bytes than this are not worth a thread

// Weights in loads of STEP: `load` gives PARTS vectors of the accumulation type A, part p's lane i
// holding weight PARTS·i + p of the load (`order` puts other data the same way). bf16 loads take 2L
// weights and split them into even and odd ones, each widened by one shift or mask (the bits in the
// upper half of an fp32): half the instructions of widening L at a time (measured: 1.6× faster).
template <typename A, WeightKind W> struct Weights {
  static constexpr int L = LANES<A>;
  static constexpr int PARTS = W == SAME ? 1 : 2;
  static constexpr int STEP = PARTS * L;
  static constexpr int64_t ELEMENT = W == SAME ? sizeof(A) : 2;
  using V = Vec<A>;

  static void load(const char* p, V parts[PARTS]) {
    if constexpr (W == SAME) {
      parts[0] = ::load(reinterpret_cast<const A*>(p));
    } else {
      Vec<uint32_t> bits = ::load(reinterpret_cast<const uint32_t*>(p));
      in_register(bits);  // one load for both halves
      const Vec<uint32_t> even = bits << 16, odd = bits & 0xFFFF0000u;
      std::memcpy(&parts[0], &even, sizeof even);
      std::memcpy(&parts[1], &odd, sizeof odd);
    }
  }
  static A one(const char* p) {
    if constexpr (W == SAME) return *reinterpret_cast<const A*>(p);
    else return A(bf16_to_float(*reinterpret_cast<const uint16_t*>(p)));
  }
  // out[s·STEP + p·L + i] = in[s·STEP + PARTS·i + p] for whole loads (`back`: the other way round);
  // the rest (n % STEP) copied.
  static void order(const A* in, int64_t n, A* out, bool back = false) {
    int64_t s = 0;
    for (; s + STEP <= n; s += STEP)
      for (int p = 0; p < PARTS; ++p)
        for (int i = 0; i < L; ++i) {
          const int64_t loaded = s + PARTS * i + p, ordered = s + p * L + i;
          if (back) out[loaded] = in[ordered];
          else out[ordered] = in[loaded];
        }
    std::copy(in + s, in + n, out + s);
  }
};

}  // namespace

extern "C" {

struct HeadProductArgs {
  int32_t double_precision;  // x, y in fp64 (weights fp64) instead of fp32
  int32_t weights;           // WeightKind: the accumulation type, or bf16
  int32_t transposed;        // W[h] is [N, K] (y = x · W[h]ᵀ) instead of [K, N]
  int64_t rows, heads, reduce, width;  // M, H, K, N
  const void* x;             // [M, H, K] contiguous
  const void* w;             // element (h, i, j) at w + h·head_stride + i·row_stride + j
  int64_t head_stride, row_stride;
  const void* bias;          // [H, N] contiguous, weights' type, added to y; or null
  void* y;                   // [M, H, N] contiguous
  int32_t threads;
};

}  // extern "C"

namespace {

template <typename A, WeightKind W> class HeadProducts {
  using Load = Weights<A, W>;
  using V = Vec<A>;
  static constexpr int PARTS = Load::PARTS, STEP = Load::STEP;
  static constexpr int64_t ELEMENT = Load::ELEMENT;

 public:
  explicit HeadProducts(const HeadProductArgs& args)
      : a(args), x(static_cast<const A*>(args.x)), y(static_cast<A*>(args.y)),
        w(static_cast<const char*>(args.w)), bias(static_cast<const char*>(args.bias)) {}

  void run() {
    if (a.rows == 0 || a.heads == 0 || a.width == 0) return;  // nothing to compute (y is empty)
    a.transposed ? run_dots() : run_rows();
  }

 private:
  const HeadProductArgs& a;
  const A* x;
  A* y;
  const char* w;
  const char* bias;
  std::vector<A> ordered;  // `dots`: x's rows in load order (bf16 weights)

  const A* x_row(int64_t m, int64_t h) const { return x + (m * a.heads + h) * a.reduce; }
  A* y_row(int64_t m, int64_t h) const { return y + (m * a.heads + h) * a.width; }
  const char* weights(int64_t h, int64_t i) const { return w + (h * a.head_stride + i * a.row_stride) * ELEMENT; }
  A bias_of(int64_t h, int64_t n) const { return bias ? Load::one(bias + (h * a.width + n) * ELEMENT) : A(0); }
  int threads_for(int64_t units, int64_t bytes) const {
    return int(std::max<int64_t>(1, std::min<int64_t>({a.threads, units, bytes / MIN_BYTES_PER_THREAD})));
  }

  // Transposed: the H·N weight rows, heads after one another, cut into one contiguous range per thread.
  void run_dots() {
    if (PARTS > 1) {
      ordered.resize(a.rows * a.heads * a.reduce);
      for (int64_t row = 0; row < a.rows * a.heads; ++row)
        Load::order(x + row * a.reduce, a.reduce, ordered.data() + row * a.reduce);
      x = ordered.data();
    }
    const int64_t total = a.heads * a.width;
    const int parts = threads_for(total, total * a.reduce * ELEMENT);
#pragma omp parallel for num_threads(parts) schedule(static, 1)
    for (int part = 0; part < parts; ++part) dots(total * part / parts, total * (part + 1) / parts);
  }

  // Not transposed: units of (head, output columns), each head's columns cut in as many parts as it
  // takes to give every thread work.
  void run_rows() const {
    const int64_t per_head = (a.threads + a.heads - 1) / a.heads;
    const int64_t columns = ((a.width + per_head - 1) / per_head + STEP - 1) / STEP * STEP;
    const int64_t per_head_units = (a.width + columns - 1) / columns, units = a.heads * per_head_units;
    const int parts = threads_for(units, a.heads * a.reduce * a.width * ELEMENT);
#pragma omp parallel num_threads(parts)
    {
      std::vector<A> sums(SUM_ROWS * columns);
#pragma omp for schedule(static)
      for (int64_t unit = 0; unit < units; ++unit) {
        const int64_t h = unit / per_head_units, begin = unit % per_head_units * columns;
        rows(h, begin, std::min(begin + columns, a.width), sums.data());
      }
    }
  }

  // y[m, h, n] for n in [begin, end) = Σ_k x[m, h, k] · W[h, k, n]: k runs down the head's weight rows,
  // reading each row's [begin, end) once for SUM_ROWS rows of x, whose sums stay in `sums` (L1, in
  // load order); the row `ahead` later is requested meanwhile.
  void rows(int64_t h, int64_t begin, int64_t end, A* sums) const {
    const int64_t width = end - begin, whole = width / STEP * STEP;
    const int64_t ahead = std::max<int64_t>(1, AHEAD / (width * ELEMENT));
    for (int64_t first = 0; first < a.rows; first += SUM_ROWS) {
      const int count = int(std::min<int64_t>(SUM_ROWS, a.rows - first));
      std::fill(sums, sums + count * width, A(0));
      for (int64_t k = 0; k < a.reduce; ++k) {
        const char* row = weights(h, k) + begin * ELEMENT;
        const char* next = weights(h, std::min(k + ahead, a.reduce - 1)) + begin * ELEMENT;
        A scales[SUM_ROWS];
        for (int i = 0; i < count; ++i) scales[i] = x_row(first + i, h)[k];
        for (int64_t n = 0; n < whole; n += STEP) {
          if (n * ELEMENT % LINE == 0) __builtin_prefetch(next + n * ELEMENT, 0, 2);
          V weight[PARTS];
          Load::load(row + n * ELEMENT, weight);
          for (int i = 0; i < count; ++i)
            for (int p = 0; p < PARTS; ++p) {
              A* sum = sums + i * width + n + p * LANES<A>;
              store(sum, load(sum) + scales[i] * weight[p]);
            }
        }
        for (int64_t n = whole; n < width; ++n)
          for (int i = 0; i < count; ++i) sums[i * width + n] += scales[i] * Load::one(row + n * ELEMENT);
      }
      for (int i = 0; i < count; ++i) {
        A* out = y_row(first + i, h) + begin;
        Load::order(sums + i * width, width, out, true);
        for (int64_t n = 0; n < width; ++n) out[n] += bias_of(h, begin + n);
      }
    }
  }

  // Weight rows [first, last) of the H·N (head h's row n is h·N + n), in blocks of DOT_WEIGHTS within
  // a head; the rows `ahead` later are requested meanwhile.
  void dots(int64_t first, int64_t last) const {
    const int64_t rows_ahead = (AHEAD / std::max<int64_t>(1, a.reduce * ELEMENT) + DOT_WEIGHTS - 1) / DOT_WEIGHTS;
    const int64_t ahead = std::max<int64_t>(1, rows_ahead) * DOT_WEIGHTS;
    for (int64_t r = first; r < last;) {
      const int64_t h = r / a.width, n = r % a.width;
      const int weights_here = int(std::min<int64_t>({DOT_WEIGHTS, last - r, a.width - n}));
      const char* row[DOT_WEIGHTS];  // a block short of weight rows repeats its last one
      const char* next[DOT_WEIGHTS];
      for (int j = 0; j < DOT_WEIGHTS; ++j) {
        row[j] = weights(h, n + std::min(j, weights_here - 1));
        const int64_t later = std::min(r + ahead + j, last - 1);
        next[j] = weights(later / a.width, later % a.width);
      }
      int64_t m = 0;
      for (; m + DOT_ROWS <= a.rows; m += DOT_ROWS) dot_block<DOT_ROWS>(h, n, weights_here, row, next, m);
      switch (a.rows - m) {  // the rows past the last full block
        case 3: dot_block<3>(h, n, weights_here, row, next, m); break;
        case 2: dot_block<2>(h, n, weights_here, row, next, m); break;
        case 1: dot_block<1>(h, n, weights_here, row, next, m); break;
        default: break;
      }
      r += weights_here;
    }
  }

  // y[first + i, h, n + j] = Σ_k x[first + i, h, k] · W[h, n + j, k] (x in load order); the first block
  // of x rows requests the `next` weight rows, a line per load.
  template <int ROWS>
  void dot_block(int64_t h, int64_t n, int weights_here, const char* const row[DOT_WEIGHTS],
                 const char* const next[DOT_WEIGHTS], int64_t first) const {
    static_assert(ROWS <= DOT_ROWS);
    const A* in[ROWS];
    for (int i = 0; i < ROWS; ++i) in[i] = x_row(first + i, h);
    V acc[ROWS][DOT_WEIGHTS] = {};
    int64_t k = 0;
    for (; k + STEP <= a.reduce; k += STEP) {
      if (first == 0 && k * ELEMENT % LINE == 0)
        for (int j = 0; j < DOT_WEIGHTS; ++j) __builtin_prefetch(next[j] + k * ELEMENT, 0, 2);
      V weight[DOT_WEIGHTS][PARTS];
      for (int j = 0; j < DOT_WEIGHTS; ++j) Load::load(row[j] + k * ELEMENT, weight[j]);
      for (int i = 0; i < ROWS; ++i)
        for (int p = 0; p < PARTS; ++p) {
          V value = load(in[i] + k + p * LANES<A>);
          in_register(value);  // one load for every weight row
          for (int j = 0; j < DOT_WEIGHTS; ++j) acc[i][j] += value * weight[j][p];
        }
    }
    for (int i = 0; i < ROWS; ++i)
      for (int j = 0; j < weights_here; ++j) {
        A sum = bias_of(h, n + j) + sum_lanes<A>(acc[i][j]);
        for (int64_t tail = k; tail < a.reduce; ++tail) sum += in[i][tail] * Load::one(row[j] + tail * ELEMENT);
        y_row(first + i, h)[n + j] = sum;
      }
  }
};

}  // namespace

extern "C" {

// Runs the products; returns 0, or -1 for a weight kind this build does not know.
int32_t head_products(const HeadProductArgs* args) {
  if (args->double_precision) {
    if (args->weights != SAME) return -1;
    HeadProducts<double, SAME>(*args).run();
  } else if (args->weights == SAME) {
    HeadProducts<float, SAME>(*args).run();
  } else if (args->weights == BF16) {
    HeadProducts<float, BF16>(*args).run();
  } else {
    return -1;
  }
  return 0;
}

}  // extern "C"
