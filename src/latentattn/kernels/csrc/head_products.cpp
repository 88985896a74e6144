// Per-head products for a few rows (decode steps, short chunks) on CPU:
//   y[m, h, :] = x[m, h, :] · W[h]          (W[h]: [K, N] — the query absorbs W_UK: q_lat = q_nope · W_UK)
//   y[m, h, :] = x[m, h, :] · W[h]ᵀ + b[h]  (W[h]: [N, K] — the output absorbs W_UV: o = o_lat · W_UVᵀ;
//                                           with H = 1, a linear layer's projection)
// With one or a few rows these are matrix-vector products, bound by reading the weights: each weight
// row is read once, in place (strided views such as w_ukv's are fine; fp32, bf16 or fp64), converted
// in registers and used for every row; the (head, output range) units are split across threads.
//
// Notation: M rows (B·T), H heads, K reduction width, N output width, L vector lanes.
// Plain C ABI, called through ctypes; the caller validates every argument.

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "vectors.h"

namespace {

typedef uint16_t HalfWidthBits __attribute__((vector_size(VECTOR_BYTES / 2)));

enum WeightKind : int32_t { SAME = 0, BF16 = 1 };
constexpr int SCALED_ROWS = 2, SCALED_VECTORS = 8;  // `rows`: a block of outputs held in registers
constexpr int DOT_ROWS = 4, DOT_WEIGHTS = 4;         // `dots`: a block of dot products in registers
constexpr int64_t DOT_UNIT = 32;                     // `dots`: weight rows per unit of work

// L weights from p, in the accumulation type A.
template <typename A, WeightKind W> inline Vec<A> load_weights(const void* p) {
  if constexpr (W == SAME) {
    return load(static_cast<const A*>(p));
  } else {  // bf16 → fp32, as bf16_to_float
    HalfWidthBits bits;
    std::memcpy(&bits, p, sizeof bits);
    const Vec<uint32_t> wide = __builtin_convertvector(bits, Vec<uint32_t>) << 16;
    Vec<A> out;
    std::memcpy(&out, &wide, sizeof out);
    return out;
  }
}
template <typename A, WeightKind W> inline A load_weight(const void* p) {
  if constexpr (W == SAME) {
    return *static_cast<const A*>(p);
  } else {
    return A(bf16_to_float(*static_cast<const uint16_t*>(p)));
  }
}

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
  static constexpr int L = VECTOR_BYTES / sizeof(A);
  static constexpr int64_t ELEMENT = W == SAME ? sizeof(A) : 2;
  static constexpr int64_t UNIT_COLUMNS = SCALED_VECTORS * L;  // `rows`: outputs per unit of work
  using V = Vec<A>;

 public:
  explicit HeadProducts(const HeadProductArgs& args)
      : a(args), x(static_cast<const A*>(args.x)), y(static_cast<A*>(args.y)),
        w(static_cast<const char*>(args.w)), bias(static_cast<const char*>(args.bias)),
        unit_width(args.transposed ? DOT_UNIT : UNIT_COLUMNS), units_per_head((args.width + unit_width - 1) / unit_width) {}

  // Units of work — a head's outputs n0..n0+unit_width-1 for every row — split across threads.
  void run() const {
    const int64_t units = a.heads * units_per_head;
#pragma omp parallel for num_threads(std::max<int64_t>(1, std::min<int64_t>(a.threads, units))) schedule(static)
    for (int64_t unit = 0; unit < units; ++unit) {
      const int64_t h = unit / units_per_head, begin = unit % units_per_head * unit_width;
      const int64_t end = std::min(begin + unit_width, a.width);
      a.transposed ? dots(h, begin, end) : rows(h, begin, end);
    }
  }

 private:
  const HeadProductArgs& a;
  const A* x;
  A* y;
  const char* w;
  const char* bias;
  const int64_t unit_width, units_per_head;

  const A* x_row(int64_t m, int64_t h) const { return x + (m * a.heads + h) * a.reduce; }
  A* y_row(int64_t m, int64_t h) const { return y + (m * a.heads + h) * a.width; }
  const char* weights(int64_t h, int64_t i) const { return w + (h * a.head_stride + i * a.row_stride) * ELEMENT; }
  A bias_of(int64_t h, int64_t n) const { return bias ? load_weight<A, W>(bias + (h * a.width + n) * ELEMENT) : A(0); }

  // y[m, h, n] for n in [begin, end) = Σ_k x[m, h, k] · W[h, k, n]: blocks of SCALED_ROWS rows ×
  // SCALED_VECTORS vectors of outputs held in registers while k runs down the weight rows.
  void rows(int64_t h, int64_t begin, int64_t end) const {
    for (int64_t first = 0; first < a.rows; first += SCALED_ROWS) {
      const int count = int(std::min<int64_t>(SCALED_ROWS, a.rows - first));
      int64_t n = begin;
      if (end - begin == UNIT_COLUMNS) {
        V acc[SCALED_ROWS][SCALED_VECTORS] = {};
        for (int64_t k = 0; k < a.reduce; ++k) {
          const char* row = weights(h, k) + n * ELEMENT;
          A scales[SCALED_ROWS];
          for (int i = 0; i < count; ++i) scales[i] = x_row(first + i, h)[k];
          for (int j = 0; j < SCALED_VECTORS; ++j) {
            const V weight = load_weights<A, W>(row + j * L * ELEMENT);
            for (int i = 0; i < count; ++i) acc[i][j] += scales[i] * weight;
          }
        }
        for (int i = 0; i < count; ++i)
          for (int j = 0; j < SCALED_VECTORS; ++j) store(y_row(first + i, h) + n + j * L, acc[i][j]);
        n = end;
      }
      for (; n < end; ++n)  // a unit short of a full block (the last of a head)
        for (int i = 0; i < count; ++i) {
          A sum = 0;
          for (int64_t k = 0; k < a.reduce; ++k)
            sum += x_row(first + i, h)[k] * load_weight<A, W>(weights(h, k) + n * ELEMENT);
          y_row(first + i, h)[n] = sum;
        }
      for (int i = 0; i < count; ++i)
        for (n = begin; bias && n < end; ++n) y_row(first + i, h)[n] += bias_of(h, n);
    }
  }

  // y[m, h, n] for n in [begin, end) = Σ_k x[m, h, k] · W[h, n, k]: blocks of up to DOT_ROWS rows of x
  // × DOT_WEIGHTS weight rows, their dot products accumulated in registers as k runs along both.
  void dots(int64_t h, int64_t begin, int64_t end) const {
    for (int64_t n = begin; n < end; n += DOT_WEIGHTS) {
      const char* row[DOT_WEIGHTS];  // a block short of weight rows repeats its last one
      for (int j = 0; j < DOT_WEIGHTS; ++j) row[j] = weights(h, std::min(n + j, end - 1));
      const int weights_here = int(std::min<int64_t>(DOT_WEIGHTS, end - n));
      int64_t first = 0;
      for (; first + DOT_ROWS <= a.rows; first += DOT_ROWS) dot_block<DOT_ROWS>(h, n, weights_here, row, first);
      switch (a.rows - first) {  // the rows past the last full block
        case 3: dot_block<3>(h, n, weights_here, row, first); break;
        case 2: dot_block<2>(h, n, weights_here, row, first); break;
        case 1: dot_block<1>(h, n, weights_here, row, first); break;
        default: break;
      }
    }
  }

  template <int ROWS>
  void dot_block(int64_t h, int64_t n, int weights_here, const char* const row[DOT_WEIGHTS], int64_t first) const {
    static_assert(ROWS <= DOT_ROWS);
    const A* in[ROWS];
    for (int i = 0; i < ROWS; ++i) in[i] = x_row(first + i, h);
    V acc[ROWS][DOT_WEIGHTS] = {};
    int64_t k = 0;
    for (; k + L <= a.reduce; k += L) {
      V weight[DOT_WEIGHTS];
      for (int j = 0; j < DOT_WEIGHTS; ++j) weight[j] = load_weights<A, W>(row[j] + k * ELEMENT);
      for (int i = 0; i < ROWS; ++i) {
        const V value = load(in[i] + k);
        for (int j = 0; j < DOT_WEIGHTS; ++j) acc[i][j] += value * weight[j];
      }
    }
    for (int i = 0; i < ROWS; ++i)
      for (int j = 0; j < weights_here; ++j) {
        A sum = bias_of(h, n + j) + sum_lanes<A>(acc[i][j]);
        for (int64_t tail = k; tail < a.reduce; ++tail) sum += in[i][tail] * load_weight<A, W>(row[j] + tail * ELEMENT);
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
