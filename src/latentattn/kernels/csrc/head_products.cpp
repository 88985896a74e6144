// Per-head products of absorbed MLA decode on CPU, for a few query rows (decode steps, short chunks):
//   y[m, h, :] = x[m, h, :] · W[h]      (W[h]: [K, N] — the query absorbs W_UK: q_lat = q_nope · W_UK)
//   y[m, h, :] = x[m, h, :] · W[h]ᵀ     (W[h]: [N, K] — the output absorbs W_UV: o = o_lat · W_UVᵀ)
// With one or a few rows these are matrix-vector products: each weight row is read once, in place
// (the strided views of w_ukv, fp32, bf16 or fp64), converted in registers and used for every row,
// with the heads split across threads. torch's batched GEMMs copy the strided bf16 weights first and
// run slowly with one column.
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
constexpr int ROW_BLOCK = 8;  // rows of x sharing one pass over the weights (`dots`)
constexpr int SCALED_ROWS = 2, SCALED_VECTORS = 8;  // `rows`: a block of outputs held in registers

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
  void* y;                   // [M, H, N] contiguous
  int32_t threads;
};

}  // extern "C"

namespace {

template <typename A, WeightKind W> class HeadProducts {
  static constexpr int L = VECTOR_BYTES / sizeof(A);
  static constexpr int64_t ELEMENT = W == SAME ? sizeof(A) : 2;
  using V = Vec<A>;

 public:
  explicit HeadProducts(const HeadProductArgs& args)
      : a(args), x(static_cast<const A*>(args.x)), y(static_cast<A*>(args.y)),
        w(static_cast<const char*>(args.w)) {}

  void run() const {
#pragma omp parallel for num_threads(std::max(1, std::min<int>(a.threads, int(a.heads)))) schedule(static)
    for (int64_t h = 0; h < a.heads; ++h) a.transposed ? dots(h) : rows(h);
  }

 private:
  const HeadProductArgs& a;
  const A* x;
  A* y;
  const char* w;

  const A* x_row(int64_t m, int64_t h) const { return x + (m * a.heads + h) * a.reduce; }
  A* y_row(int64_t m, int64_t h) const { return y + (m * a.heads + h) * a.width; }
  const char* weights(int64_t h, int64_t i) const { return w + (h * a.head_stride + i * a.row_stride) * ELEMENT; }

  // y[m, h, :] = Σ_k x[m, h, k] · W[h, k, :], in blocks of SCALED_ROWS output rows × SCALED_VECTORS
  // vectors of columns held in registers while k runs down the weight rows.
  void rows(int64_t h) const {
    for (int64_t first = 0; first < a.rows; first += SCALED_ROWS) {
      const int count = int(std::min<int64_t>(SCALED_ROWS, a.rows - first));
      int64_t n = 0;
      for (; n + SCALED_VECTORS * L <= a.width; n += SCALED_VECTORS * L) {
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
      }
      for (; n < a.width; ++n)  // columns past the last full block
        for (int i = 0; i < count; ++i) {
          A sum = 0;
          for (int64_t k = 0; k < a.reduce; ++k)
            sum += x_row(first + i, h)[k] * load_weight<A, W>(weights(h, k) + n * ELEMENT);
          y_row(first + i, h)[n] = sum;
        }
    }
  }

  // y[m, h, n] = Σ_k x[m, h, k] · W[h, n, k]: one dot product per (row, weight row).
  void dots(int64_t h) const {
    for (int64_t n = 0; n < a.width; ++n) {
      const char* row = weights(h, n);
      for (int64_t first = 0; first < a.rows; first += ROW_BLOCK) {
        const int count = int(std::min<int64_t>(ROW_BLOCK, a.rows - first));
        V acc[ROW_BLOCK] = {};
        int64_t k = 0;
        for (; k + L <= a.reduce; k += L) {
          const V weight = load_weights<A, W>(row + k * ELEMENT);
          for (int i = 0; i < count; ++i) acc[i] += load(x_row(first + i, h) + k) * weight;
        }
        for (int i = 0; i < count; ++i) {
          A sum = 0;
          for (int lane = 0; lane < L; ++lane) sum += acc[i][lane];
          for (int64_t tail = k; tail < a.reduce; ++tail)
            sum += x_row(first + i, h)[tail] * load_weight<A, W>(row + tail * ELEMENT);
          y_row(first + i, h)[n] = sum;
        }
      }
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
