// Fused absorbed-MLA decode on CPU: softmax(q · kvᵀ · scale) · kv[:, :V] in one pass over the
// cached rows [c_KV | k_pe], flash-decoding style.
//
// Notation: B batch, T new tokens (query positions), H heads, M = T·H query rows per sequence,
// W = C + R row width, V value width (the first V columns of a row), L vector lanes, G scale groups.
// GQA/MQA caches keep values apart from keys: then V-wide value rows come from their own storage.
//
// Each sequence's visible keys are cut into contiguous segments, at most one per thread and
// sequence, so the threads split the context (and the batch) evenly. A segment is walked in tiles of
// TILE rows: the tile's rows are located (contiguous or paged) and, where needed, converted into a
// small per-thread scratch; then for every chunk of L query rows the tile is scored, folded into a
// running max and sum (online softmax) and accumulated into the segment's output while it is still
// in the core's cache, so each row is read from memory once; the rows two tiles ahead are fetched
// meanwhile (Lookahead). Segments are merged at the end.
//
// Query rows sit in vector lanes, so a score is a broadcast key element times L query rows, and
// outputs are kept transposed ([V][L] per chunk). Two tile engines:
// - FmaEngine: fp32 (fp64) FMAs on rows converted to the accumulation type (in place for fp32/fp64
//   storage; bf16 and 8-bit rows are converted, 8-bit ones scaled, into the scratch).
// - DotEngine (AVX512-BF16, bf16 queries): bf16 dot products with fp32 accumulation. Scores pair
//   adjacent columns (q and keys are exact in bf16; 8-bit values too, their scales applied per
//   group to the partial sums); values pair adjacent keys, with the probabilities (times the
//   group's scale) rounded to bf16, as FlashAttention-style GPU kernels do.
// Plain C ABI, called through ctypes; the caller validates every argument.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "vectors.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define LATENT_DOT_ENGINE 1
#endif

namespace {

constexpr int64_t MIN_KEYS_PER_THREAD = 256;  // fewer keys than this are not worth a thread
constexpr int VALUE_BLOCK = VECTOR_BYTES == 64 ? 8 : 4;  // output columns kept in registers

template <typename A> using IntOf = std::conditional_t<sizeof(A) == 4, int32_t, int64_t>;

// exp(x) for x <= 0 (softmax arguments): 2^k · exp(r), k = round(x / ln 2), |r| <= ln 2 / 2, exp(r) by
// its Taylor series (error below one ulp); arguments whose exp is below the smallest normal give 0.
inline Vec<float> vexp(Vec<float> x) {
  using I = Vec<int32_t>;
  const Vec<float> k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const Vec<float> r = (x - k * 0.693145751953125f) - k * 1.42860682030941723212e-6f;
  Vec<float> p = r * (1.0f / 5040) + 1.0f / 720;
  for (float c : {1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = p * r + c;
  const I bits = (__builtin_convertvector(k, I) + 127) << 23;
  Vec<float> two_k;
  std::memcpy(&two_k, &bits, sizeof bits);
  return x < -87.0f ? Vec<float>{} : p * two_k;
}
inline Vec<double> vexp(Vec<double> x) {
  using I = Vec<int64_t>;
  const Vec<double> k = (x * 1.4426950408889634074 + 6755399441055744.0) - 6755399441055744.0;
  const Vec<double> r = (x - k * 6.93147180369123816490e-01) - k * 1.90821492927058770002e-10;
  Vec<double> p = r * (1.0 / 6227020800.0) + 1.0 / 479001600.0;
  for (double c : {1.0 / 39916800, 1.0 / 3628800, 1.0 / 362880, 1.0 / 40320, 1.0 / 5040, 1.0 / 720,
                   1.0 / 120, 1.0 / 24, 1.0 / 6, 0.5, 1.0, 1.0})
    p = p * r + c;
  const I bits = (__builtin_convertvector(k, I) + 1023) << 52;
  Vec<double> two_k;
  std::memcpy(&two_k, &bits, sizeof bits);
  return x < -708.0 ? Vec<double>{} : p * two_k;
}

// e4m3fn S.EEEE.MMM (bias 7, no infinities, S.1111.111 is NaN) → fp32: exponent + 120, mantissa << 20;
// subnormals (E = 0) are M · 2^-9. Selects by masks, so loops over bytes vectorize.
inline float fp8_e4m3_to_float(uint8_t byte) {
  const uint32_t magnitude = byte & 0x7F;
  const uint32_t subnormal = __builtin_bit_cast(uint32_t, float(int32_t(magnitude)) * 0x1p-9f);
  const uint32_t normal = (magnitude << 20) + (120u << 23);
  const uint32_t is_subnormal = -uint32_t(magnitude < 8), is_nan = -uint32_t(magnitude == 0x7F);
  uint32_t bits = (subnormal & is_subnormal) | (normal & ~is_subnormal);
  bits = (0x7FC00000u & is_nan) | (bits & ~is_nan);
  return __builtin_bit_cast(float, bits | uint32_t(byte & 0x80) << 24);
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define LATENT_FP8_VECTORS 1
// 16 e4m3fn values → fp32, times `scale`: as fp16 S.EEEEE.MMMMMMMMMM the bits S.0EEEE.MMM0000000 are
// the value · 2^-8 (fp16's exponent bias is 15, e4m3's 7; subnormals land on fp16 subnormals alike),
// widened by vcvtph2ps and scaled by 2^8 · scale; S.1111.111 becomes NaN.
inline __m512 fp8_e4m3_to_float16(const uint8_t* in, float scale) {
  const __m256i x = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in)));
  const __m256i magnitude = _mm256_and_si256(x, _mm256_set1_epi16(0x7F));
  const __m256i half = _mm256_or_si256(_mm256_slli_epi16(magnitude, 7),
                                       _mm256_slli_epi16(_mm256_and_si256(x, _mm256_set1_epi16(0x80)), 8));
  const __m512 value = _mm512_mul_ps(_mm512_cvtph_ps(half), _mm512_set1_ps(256.0f * scale));
  const __mmask16 nan = _mm256_cmpeq_epi16_mask(magnitude, _mm256_set1_epi16(0x7F));
  return _mm512_mask_mov_ps(value, nan, _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN()));
}
#endif

enum StorageKind : int32_t { SAME = 0, BF16 = 1, INT8 = 2, FP8_E4M3 = 3 };

}  // namespace

extern "C" {

// One stored component: row `offset` of block `block` starts at data + block·block_stride +
// offset·row_stride (elements). Contiguous caches: block = sequence, offset = position; paged: block
// = block_table[b][position / block_size], offset = position % block_size.
struct Component {
  const void* data;
  int64_t block_stride;
  int64_t row_stride;
};

struct DecodeArgs {
  int32_t double_precision;  // accumulate (and take q, write out) in fp64 instead of fp32
  int32_t storage;           // StorageKind
  int32_t bf16_queries;      // q holds bf16 values (exact in fp32): the bf16 dot-product engine may run
  int64_t batch, n_tokens, heads, width, value_width;
  int64_t latent_width;      // 8-bit storage: quantized columns C (then W - C bf16 k_pe columns)
  int64_t group_size;        // 8-bit storage: values per fp32 scale
  int64_t n_keys;            // keys at positions >= n_keys are never read
  int64_t block_size;        // 0: contiguous storage; else rows per block of a paged pool
  const int64_t* block_table;  // [B, table_stride] when paged
  int64_t table_stride;
  const int64_t* lengths;    // [B] keys cached before the T queries: query t sees keys < lengths + t + 1
  const void* q;             // [B, T, H, W] contiguous, fp32 or fp64
  void* out;                 // [B, T, H, V] contiguous, fp32 or fp64
  Component kv;              // SAME / BF16: the rows; 8-bit: the quantized c_KV
  Component scales;          // 8-bit: fp32 [.., C / group_size]
  Component k_pe;            // 8-bit: bf16 [.., W - C]
  Component values;          // value rows [.., V] stored apart (same layout and type as kv), or null:
                             // the values are the first V columns of the key rows
  double scale;
  int32_t threads;
};

}  // extern "C"

namespace {

// Where row `position` of sequence `b` lives in each stored component.
struct RowLocator {
  struct Place {
    int64_t block, offset;
  };
  const DecodeArgs& a;

  Place operator()(int64_t b, int64_t position) const {
    if (a.block_size == 0) return {b, position};
    return {a.block_table[b * a.table_stride + position / a.block_size], position % a.block_size};
  }
  template <typename T> const T* at(const Component& c, Place place) const {
    return static_cast<const T*>(c.data) + place.block * c.block_stride + place.offset * c.row_stride;
  }
};

// The cache lines of the rows a few tiles ahead, requested one per step of the current tile's inner
// loop (line k of every row, then line k + 1). The hardware prefetcher stops at page boundaries, and
// requesting a whole tile at once overflows the core's miss buffers: without this, the first touch of
// a row waits on memory (measured: a fifth of the time at 16K context, one thread).
class Lookahead {
 public:
  static constexpr int64_t LINE = 64;

  Lookahead(const DecodeArgs& a, int64_t accumulation_bytes) : locate{a} {
    const bool quantized = a.storage == INT8 || a.storage == FP8_E4M3;
    const int64_t element = a.storage == BF16 ? 2 : quantized ? 1 : accumulation_bytes;
    add(a.kv, element, quantized ? a.latent_width : a.width);
    if (quantized) {
      add(a.scales, sizeof(float), a.latent_width / a.group_size);
      add(a.k_pe, 2, a.width - a.latent_width);
    }
    add(a.values, element, a.value_width);
  }

  // From now on, request the lines of rows start..stop-1 (at most MAX_ROWS) of sequence b.
  void plan(int64_t b, int64_t start, int64_t stop) {
    n_rows = current = offset = longest = 0;
    for (int64_t position = start; position < stop && n_rows + n_parts <= MAX_ROWS; ++position) {
      const auto place = locate(b, position);
      for (int i = 0; i < n_parts; ++i) {
        const Part& part = parts[i];
        const char* row = part.data + place.block * part.block_stride + place.offset * part.row_stride;
        rows[n_rows++] = {row, part.row_bytes};
        longest = std::max(longest, part.row_bytes);
      }
    }
  }

  // Request the next line, if any is left: line k of every row, then line k + 1.
  void step() {
    if (offset >= longest) return;
    if (offset < rows[current].bytes) __builtin_prefetch(rows[current].data + offset, 0, 3);
    if (++current == n_rows) {
      current = 0;
      offset += LINE;
    }
  }

 private:
  static constexpr int MAX_ROWS = 4 * 32;  // components × rows of the largest tile
  struct Part {
    const char* data;
    int64_t block_stride, row_stride, row_bytes;  // in bytes
  };
  struct Row {
    const char* data;
    int64_t bytes;
  };
  const RowLocator locate;
  Part parts[4];
  int n_parts = 0;
  Row rows[MAX_ROWS];
  int n_rows = 0, current = 0;
  int64_t offset = 0, longest = 0;

  void add(const Component& c, int64_t element, int64_t columns) {
    if (c.data != nullptr)
      parts[n_parts++] = {static_cast<const char*>(c.data), c.block_stride * element, c.row_stride * element,
                          columns * element};
  }
};

// fp32/fp64 FMAs over rows in the accumulation type A.
template <typename A, StorageKind S> class FmaEngine {
 public:
  static constexpr int TILE = 8;
  static constexpr int L = LANES<A>;
  static constexpr int STEP_EVERY = std::max<int>(1, Lookahead::LINE / (TILE * sizeof(A)));  // columns
  using V = Vec<A>;

  struct Scratch {
    const A* rows[TILE];
    const A* values[TILE];  // the key rows themselves unless values are stored apart
    std::vector<A> converted;
  };

  FmaEngine(const DecodeArgs& args, int64_t chunks) : a(args), locate{args}, chunks(chunks) {
    // Queries transposed to [W, L] per chunk of L rows (padding rows are zero).
    const int64_t rows = a.n_tokens * a.heads;
    const A* q = static_cast<const A*>(a.q);
    queries.assign(a.batch * chunks * a.width * L, A(0));
    for (int64_t b = 0; b < a.batch; ++b)
      for (int64_t row = 0; row < rows; ++row) {
        A* packed = &queries[((b * chunks + row / L) * a.width) * L + row % L];
        for (int64_t w = 0; w < a.width; ++w) packed[w * L] = q[(b * rows + row) * a.width + w];
      }
  }

  Scratch scratch() const { return {{}, {}, std::vector<A>(S == SAME ? 0 : TILE * (a.width + a.value_width))}; }

  // Locate (and convert) rows start..stop-1 of sequence b; missing rows repeat the first one.
  void load_tile(int64_t b, int64_t start, int64_t stop, Scratch& s) const {
    for (int j = 0; j < TILE; ++j) {
      const bool real = start + j < stop;
      s.rows[j] = real ? row(b, start + j, s, j) : s.rows[0];
      s.values[j] = a.values.data == nullptr ? s.rows[j] : real ? value_row(b, start + j, s, j) : s.values[0];
    }
  }

  // scores[j] = tile row j · the chunk's query rows (one lane per query row).
  void score(int64_t b, int64_t chunk, const Scratch& s, Lookahead& ahead, V scores[TILE]) const {
    const A* packed = &queries[(b * chunks + chunk) * a.width * L];
    V acc[TILE] = {};
    for (int64_t w = 0; w < a.width; ++w) {
      if (w % STEP_EVERY == 0) ahead.step();
      const V query = load(packed + w * L);
#pragma GCC unroll 8
      for (int j = 0; j < TILE; ++j) acc[j] += s.rows[j][w] * query;
    }
    for (int j = 0; j < TILE; ++j) scores[j] = acc[j];
  }

  // out[c] = out[c] · correction + Σ_j probs[j] · row_j[c] for c < V.
  template <bool RESCALE>
  void accumulate(const Scratch& s, const V probs[TILE], V correction, A* out) const {
    int64_t c = 0;
    for (; c + VALUE_BLOCK <= a.value_width; c += VALUE_BLOCK) {
      V acc[VALUE_BLOCK];
      for (int i = 0; i < VALUE_BLOCK; ++i) acc[i] = RESCALE ? load(out + (c + i) * L) * correction
                                                             : load(out + (c + i) * L);
#pragma GCC unroll 8
      for (int j = 0; j < TILE; ++j)
#pragma GCC unroll 8
        for (int i = 0; i < VALUE_BLOCK; ++i) acc[i] += s.values[j][c + i] * probs[j];
      for (int i = 0; i < VALUE_BLOCK; ++i) store(out + (c + i) * L, acc[i]);
    }
    for (; c < a.value_width; ++c) {
      V acc = RESCALE ? load(out + c * L) * correction : load(out + c * L);
      for (int j = 0; j < TILE; ++j) acc += s.values[j][c] * probs[j];
      store(out + c * L, acc);
    }
  }

 private:
  const DecodeArgs& a;
  const RowLocator locate;
  const int64_t chunks;
  std::vector<A> queries;  // [B, chunks, W, L]

  const A* row(int64_t b, int64_t position, Scratch& s, int j) const {
    const auto place = locate(b, position);
    if constexpr (S == SAME) {
      return locate.template at<A>(a.kv, place);
    } else {
      A* out = s.converted.data() + j * a.width;
      if constexpr (S == BF16) {
        const uint16_t* in = locate.template at<uint16_t>(a.kv, place);
        for (int64_t w = 0; w < a.width; ++w) out[w] = A(bf16_to_float(in[w]));
      } else {
        const uint8_t* in = locate.template at<uint8_t>(a.kv, place);
        const float* scales = locate.template at<float>(a.scales, place);
        for (int64_t g = 0; g < a.latent_width / a.group_size; ++g) {
          const A group_scale = A(scales[g]);
          int64_t c = g * a.group_size;
#ifdef LATENT_FP8_VECTORS
          if constexpr (S == FP8_E4M3 && std::is_same_v<A, float>)
            for (; c + 16 <= (g + 1) * a.group_size; c += 16)
              _mm512_storeu_ps(out + c, fp8_e4m3_to_float16(in + c, group_scale));
#endif
          for (; c < (g + 1) * a.group_size; ++c) {
            const A value = S == INT8 ? A(int8_t(in[c])) : A(fp8_e4m3_to_float(in[c]));
            out[c] = value * group_scale;
          }
        }
        const uint16_t* k_pe = locate.template at<uint16_t>(a.k_pe, place);
        for (int64_t r = a.latent_width; r < a.width; ++r) out[r] = A(bf16_to_float(k_pe[r - a.latent_width]));
      }
      return out;
    }
  }

  const A* value_row(int64_t b, int64_t position, Scratch& s, int j) const {  // SAME or BF16 storage
    const auto place = locate(b, position);
    if constexpr (S == SAME) {
      return locate.template at<A>(a.values, place);
    } else {
      A* out = s.converted.data() + TILE * a.width + j * a.value_width;
      const uint16_t* in = locate.template at<uint16_t>(a.values, place);
      for (int64_t c = 0; c < a.value_width; ++c) out[c] = A(bf16_to_float(in[c]));
      return out;
    }
  }
};

#ifdef LATENT_DOT_ENGINE
// bf16 dot products (vdpbf16ps) with fp32 accumulation; needs bf16 queries and even column counts.
template <StorageKind S> class DotEngine {
 public:
  // 32 rows per tile: with 16, the output columns are loaded and stored twice as often (20-30% slower).
  static constexpr int TILE = 32;
  static constexpr int PAIRS = TILE / 2;            // key pairs of a tile (values)
  static constexpr int GROUP = S == BF16 ? 16 : 8;  // keys scored together (8-bit: and their partial sums)
  static constexpr int L = 16;
  using V = Vec<float>;

  static bool serves(const DecodeArgs& a) {
    const bool even = a.width % 2 == 0 && a.latent_width % 2 == 0 && a.group_size % 2 == 0;
    return !a.double_precision && a.bf16_queries && even;
  }

  struct Scratch {
    const uint16_t* rows[TILE];    // bf16 bits of each row
    const float* scales[TILE];     // 8-bit: each row's group scales
    std::vector<uint16_t> converted;  // 8-bit rows as bf16 (unscaled), [TILE, W]
    std::vector<uint32_t> pairs;      // [PAIRS, V rounded up to 32]: rows 2i and 2i+1 interleaved
  };

  DotEngine(const DecodeArgs& args, int64_t chunks)
      : a(args), locate{args}, chunks(chunks), scaled(S == BF16 ? 0 : args.latent_width),
        groups(S == BF16 ? 0 : args.latent_width / args.group_size),
        padded_values((args.value_width + 31) / 32 * 32) {
    // Query rows as bf16 pairs of adjacent columns, [W / 2, L] per chunk (padding rows are zero).
    const int64_t rows = a.n_tokens * a.heads;
    const float* q = static_cast<const float*>(a.q);
    queries.assign(a.batch * chunks * (a.width / 2) * L, 0);
    for (int64_t b = 0; b < a.batch; ++b)
      for (int64_t row = 0; row < rows; ++row) {
        uint32_t* packed = &queries[((b * chunks + row / L) * (a.width / 2)) * L + row % L];
        const float* in = q + (b * rows + row) * a.width;
        for (int64_t w = 0; w < a.width; w += 2) packed[w / 2 * L] = bits(in[w]) >> 16 | (bits(in[w + 1]) & 0xFFFF0000u);
      }
  }

  Scratch scratch() const {
    return {{}, {}, std::vector<uint16_t>(S == BF16 ? 0 : TILE * a.width),
            std::vector<uint32_t>(PAIRS * padded_values)};
  }

  void load_tile(int64_t b, int64_t start, int64_t stop, Scratch& s) const {
    for (int j = 0; j < TILE; ++j) {
      if (start + j >= stop) {
        s.rows[j] = s.rows[0];
        s.scales[j] = s.scales[0];
        continue;
      }
      const auto place = locate(b, start + j);
      if constexpr (S == BF16) {
        s.rows[j] = locate.template at<uint16_t>(a.kv, place);
      } else {
        uint16_t* out = s.converted.data() + j * a.width;
        convert(locate.template at<uint8_t>(a.kv, place), out);
        std::memcpy(out + a.latent_width, locate.template at<uint16_t>(a.k_pe, place),
                    (a.width - a.latent_width) * sizeof(uint16_t));
        s.rows[j] = out;
        s.scales[j] = locate.template at<float>(a.scales, place);
      }
    }
    const uint16_t* values[TILE];
    for (int j = 0; j < TILE; ++j)
      values[j] = a.values.data == nullptr ? s.rows[j]
                                           : locate.template at<uint16_t>(a.values, locate(b, std::min(start + j, stop - 1)));
    for (int i = 0; i < PAIRS; ++i) interleave(values[2 * i], values[2 * i + 1], &s.pairs[i * padded_values]);
  }

  void score(int64_t b, int64_t chunk, const Scratch& s, Lookahead& ahead, V scores[TILE]) const {
    const uint32_t* packed = &queries[(b * chunks + chunk) * (a.width / 2) * L];
    for (int first = 0; first < TILE; first += GROUP) {
      __m512 acc[GROUP];
      for (int j = 0; j < GROUP; ++j) acc[j] = _mm512_setzero_ps();
      for (int64_t g = 0; g < groups; ++g) {  // 8-bit columns: Σ_g scale_g · (q_g · c_g)
        __m512 part[GROUP];
        for (int j = 0; j < GROUP; ++j) part[j] = _mm512_setzero_ps();
        dot(packed, s.rows + first, g * a.group_size, (g + 1) * a.group_size, ahead, part);
        for (int j = 0; j < GROUP; ++j) acc[j] = _mm512_fmadd_ps(part[j], _mm512_set1_ps(s.scales[first + j][g]), acc[j]);
      }
      dot(packed, s.rows + first, scaled, a.width, ahead, acc);
      for (int j = 0; j < GROUP; ++j) scores[first + j] = acc[j];
    }
  }

  template <bool RESCALE>
  void accumulate(const Scratch& s, const V probs[TILE], V correction, float* out) const {
    for (int64_t g = 0; g <= groups; ++g) {  // groups of scaled columns, then the rest
      const int64_t begin = std::min(g * a.group_size, a.value_width);
      const int64_t end = g < groups ? std::min((g + 1) * a.group_size, a.value_width) : a.value_width;
      if (begin >= end) continue;
      __m512i pairs[PAIRS];  // per lane: (bf16(p_2i · scale), bf16(p_2i+1 · scale))
      for (int i = 0; i < PAIRS; ++i) {
        V even = probs[2 * i], odd = probs[2 * i + 1];
        if (g < groups) {
          even *= s.scales[2 * i][g];
          odd *= s.scales[2 * i + 1][g];
        }
        const __m512i low = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(even));
        const __m512i high = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(odd));
        pairs[i] = _mm512_or_si512(low, _mm512_slli_epi32(high, 16));
      }
      columns<RESCALE>(s, pairs, correction, out, begin, end);
    }
  }

 private:
  const DecodeArgs& a;
  const RowLocator locate;
  const int64_t chunks, scaled, groups, padded_values;
  std::vector<uint32_t> queries;  // [B, chunks, W / 2, L]

  static uint32_t bits(float value) {
    uint32_t out;
    std::memcpy(&out, &value, sizeof out);
    return out;
  }
  // acc + each lane's bf16 pair of `x` dotted with the pair at `pair`, broadcast by the instruction's
  // memory operand ({1to16}); compilers emit a vpbroadcastd per product instead (5-10% slower on Zen 4).
  static __m512 dot_broadcast(__m512 acc, __m512bh x, const void* pair) {
    asm("vdpbf16ps %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(x), "m"(*static_cast<const int32_t*>(pair)));
    return acc;
  }

  // acc[j] += Σ_{w in [begin, end)} q[w] · rows[j][w], two columns per instruction.
  void dot(const uint32_t* packed, const uint16_t* const* rows, int64_t begin, int64_t end, Lookahead& ahead,
           __m512 acc[GROUP]) const {
    const uint16_t* row[GROUP];
    for (int j = 0; j < GROUP; ++j) row[j] = rows[j] + begin;
    const uint32_t* query_pairs = packed + begin / 2 * L;
    for (int64_t n = (end - begin) / 2; n > 0; --n, query_pairs += L) {
      ahead.step();
      const __m512bh query = (__m512bh)_mm512_loadu_si512(query_pairs);
#pragma GCC unroll 16
      for (int j = 0; j < GROUP; ++j) {
        acc[j] = dot_broadcast(acc[j], query, row[j]);
        row[j] += 2;
      }
    }
  }

  // out[c] = out[c] · correction + Σ_i pairs[i] · (row_2i[c], row_2i+1[c]) for c in [begin, end).
  template <bool RESCALE>
  void columns(const Scratch& s, const __m512i pairs[PAIRS], V correction, float* out, int64_t begin,
               int64_t end) const {
    auto value = [&](int i, int64_t c) { return &s.pairs[i * padded_values + c]; };
    int64_t c = begin;
    for (; c + VALUE_BLOCK <= end; c += VALUE_BLOCK) {
      __m512 acc[VALUE_BLOCK];
      for (int k = 0; k < VALUE_BLOCK; ++k) {
        acc[k] = _mm512_loadu_ps(out + (c + k) * L);
        if (RESCALE) acc[k] = _mm512_mul_ps(acc[k], correction);
      }
#pragma GCC unroll 16
      for (int i = 0; i < PAIRS; ++i)
#pragma GCC unroll 8
        for (int k = 0; k < VALUE_BLOCK; ++k) acc[k] = dot_broadcast(acc[k], (__m512bh)pairs[i], value(i, c + k));
      for (int k = 0; k < VALUE_BLOCK; ++k) _mm512_storeu_ps(out + (c + k) * L, acc[k]);
    }
    for (; c < end; ++c) {
      __m512 acc = _mm512_loadu_ps(out + c * L);
      if (RESCALE) acc = _mm512_mul_ps(acc, correction);
      for (int i = 0; i < PAIRS; ++i) acc = dot_broadcast(acc, (__m512bh)pairs[i], value(i, c));
      _mm512_storeu_ps(out + c * L, acc);
    }
  }

  // pairs[c] = even[c] | odd[c] << 16 for c < V (32 columns per step).
  void interleave(const uint16_t* even, const uint16_t* odd, uint32_t* pairs) const {
    const __m512i low = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39,
                                         7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i high = _mm512_add_epi16(low, _mm512_set1_epi16(16));
    for (int64_t c = 0; c < a.value_width; c += 32) {
      const __mmask32 mask = a.value_width - c >= 32 ? ~__mmask32(0) : (__mmask32(1) << (a.value_width - c)) - 1;
      const __m512i x = _mm512_maskz_loadu_epi16(mask, even + c), y = _mm512_maskz_loadu_epi16(mask, odd + c);
      _mm512_storeu_si512(pairs + c, _mm512_permutex2var_epi16(x, low, y));
      _mm512_storeu_si512(pairs + c + 16, _mm512_permutex2var_epi16(x, high, y));
    }
  }

  // The C quantized values of a row as bf16 (exact: int8 and e4m3 fit bf16), 32 at a time.
  void convert(const uint8_t* in, uint16_t* out) const {
    for (int64_t c = 0; c < a.latent_width; c += 32) {
      const __mmask32 mask = a.latent_width - c >= 32 ? ~__mmask32(0) : (__mmask32(1) << (a.latent_width - c)) - 1;
      const __m256i bytes = _mm256_maskz_loadu_epi8(mask, in + c);
      __m512i converted;
      if constexpr (S == INT8) {
        const __m512 low = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(bytes)));
        const __m512 high = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(bytes, 1)));
        converted = (__m512i)_mm512_cvtne2ps_pbh(high, low);
      } else {  // e4m3fn S.EEEE.MMM → bf16 S.EEEEEEEE.MMMMMMM: exponent + 120, mantissa << 4
        const __m512i x = _mm512_cvtepu8_epi16(bytes);
        const __m512i magnitude = _mm512_and_si512(x, _mm512_set1_epi16(0x7F));
        __m512i y = _mm512_add_epi16(_mm512_slli_epi16(magnitude, 4), _mm512_set1_epi16(120 << 7));
        // subnormals (exponent 0): M · 2^-9, looked up by M; NaN (magnitude 0x7F) stays NaN
        const __m512i subnormals = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                                    0, 0, 0, 0, 0, 0x3C60, 0x3C40, 0x3C20, 0x3C00, 0x3BC0,
                                                    0x3B80, 0x3B00, 0);
        y = _mm512_mask_permutexvar_epi16(y, _mm512_cmplt_epu16_mask(magnitude, _mm512_set1_epi16(8)),
                                          magnitude, subnormals);
        y = _mm512_mask_mov_epi16(y, _mm512_cmpeq_epi16_mask(magnitude, _mm512_set1_epi16(0x7F)),
                                  _mm512_set1_epi16(0x7FC0));
        converted = _mm512_or_si512(y, _mm512_slli_epi16(_mm512_and_si512(x, _mm512_set1_epi16(0x80)), 8));
      }
      _mm512_mask_storeu_epi16(out + c, mask, converted);
    }
  }
};
#endif

struct Segment {
  int64_t sequence, start, stop;
  int part;
};

// Plans the segments, runs the engine over them with an online softmax, merges the partial results.
template <typename A, typename Engine> class Decoder {
  static constexpr int L = Engine::L, TILE = Engine::TILE;
  static constexpr int64_t AHEAD_TILES = 2;  // how far ahead `Lookahead` fetches rows
  using V = Vec<A>;
  using I = IntOf<A>;
  using VI = Vec<I>;

 public:
  explicit Decoder(const DecodeArgs& args)
      : a(args), rows(args.n_tokens * args.heads), chunks((rows + L - 1) / L), engine(args, chunks) {}

  void run() {
    plan();
    limits.assign(a.batch * chunks * L, 0);
    for (int64_t b = 0; b < a.batch; ++b)
      for (int64_t row = 0; row < chunks * L; ++row)  // padding rows see every key
        limits[b * chunks * L + row] = I(row < rows ? std::min(a.lengths[b] + row / a.heads + 1, a.n_keys) : visible(b));
    partial_out.assign(segments.size() * chunks * a.value_width * L, A(0));
    partial_max.assign(segments.size() * chunks * L, -std::numeric_limits<A>::infinity());
    partial_sum.assign(segments.size() * chunks * L, A(0));
#pragma omp parallel for num_threads(parts) schedule(static, 1)
    for (int part = 0; part < parts; ++part) {
      auto scratch = engine.scratch();
      Lookahead ahead(a, sizeof(A));
      for (size_t i = 0; i < segments.size(); ++i)
        if (segments[i].part == part) attend(i, scratch, ahead);
    }
#pragma omp parallel for num_threads(std::min<int64_t>(parts, a.batch)) schedule(static)
    for (int64_t b = 0; b < a.batch; ++b) merge(b);
  }

 private:
  const DecodeArgs& a;
  const int64_t rows, chunks;
  const Engine engine;
  int parts = 1;
  std::vector<Segment> segments;
  std::vector<int64_t> first_segment;       // [B + 1]
  std::vector<I> limits;                    // [B, chunks, L]: keys visible to each query row
  std::vector<A> partial_out;               // [segments, chunks, V, L]
  std::vector<A> partial_max, partial_sum;  // [segments, chunks, L]

  int64_t visible(int64_t b) const { return std::min(a.lengths[b] + a.n_tokens, a.n_keys); }

  // Cut the concatenated visible keys of all sequences into `parts` equal ranges, and those at
  // sequence boundaries into segments.
  void plan() {
    int64_t total = 0;
    for (int64_t b = 0; b < a.batch; ++b) total += visible(b);
    const int64_t wanted = (total + MIN_KEYS_PER_THREAD - 1) / MIN_KEYS_PER_THREAD;
    parts = int(std::max<int64_t>(1, std::min<int64_t>(std::max(a.threads, 1), wanted)));
    first_segment.assign(a.batch + 1, 0);
    int64_t offset = 0, longest = 0;
    int part = 0;
    for (int64_t b = 0; b < a.batch; ++b) {
      first_segment[b] = int64_t(segments.size());
      const int64_t n = visible(b);
      for (int64_t start = 0; start < n;) {
        while (offset + start >= (part + 1) * total / parts) ++part;
        const int64_t stop = std::min(n, (part + 1) * total / parts - offset);
        segments.push_back({b, start, stop, part});
        start = stop;
      }
      offset += n;
    }
    first_segment[a.batch] = int64_t(segments.size());
  }

  // Online softmax over segment `index`, tile by tile, for every chunk of query rows.
  void attend(size_t index, typename Engine::Scratch& scratch, Lookahead& ahead) {
    const Segment& segment = segments[index];
    const int64_t b = segment.sequence;
    const A minus_infinity = -std::numeric_limits<A>::infinity();
    for (int64_t start = segment.start; start < segment.stop; start += TILE) {
      const int64_t ahead_start = std::min(start + AHEAD_TILES * TILE, segment.stop);
      ahead.plan(b, ahead_start, std::min(ahead_start + TILE, segment.stop));
      engine.load_tile(b, start, segment.stop, scratch);
      for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        const int64_t state = int64_t(index) * chunks + chunk;
        V scores[TILE];
        engine.score(b, chunk, scratch, ahead, scores);
        const VI limit = load(&limits[(b * chunks + chunk) * L]);
        const V old_max = load(&partial_max[state * L]);
        V new_max = old_max;
        for (int j = 0; j < TILE; ++j) {  // rows past the segment, or a query's causal limit: -inf
          const I position = start + j < segment.stop ? I(start + j) : std::numeric_limits<I>::max();
          scores[j] = (VI{} + position) < limit ? scores[j] * A(a.scale) : V{} + minus_infinity;
          new_max = scores[j] > new_max ? scores[j] : new_max;
        }
        const V shift = new_max == minus_infinity ? V{} : new_max;  // no key seen yet: stay at 0
        const V correction = vexp(old_max - shift);
        V sum = load(&partial_sum[state * L]) * correction;
        for (int j = 0; j < TILE; ++j) {
          scores[j] = vexp(scores[j] - shift);
          sum += scores[j];
        }
        store(&partial_sum[state * L], sum);
        store(&partial_max[state * L], new_max);
        A* out = &partial_out[state * a.value_width * L];
        bool changed = false;
        for (int lane = 0; lane < L; ++lane) changed |= new_max[lane] != old_max[lane];
        if (changed)
          engine.template accumulate<true>(scratch, scores, correction, out);
        else
          engine.template accumulate<false>(scratch, scores, correction, out);
      }
    }
  }

  // out[b] = Σ_segments out_i · exp(max_i − max) / Σ_segments sum_i · exp(max_i − max).
  void merge(int64_t b) {
    A* out = static_cast<A*>(a.out) + b * rows * a.value_width;
    for (int64_t row = 0; row < rows; ++row) {
      const int64_t chunk = row / L, lane = row % L;
      A max = -std::numeric_limits<A>::infinity();
      for (int64_t i = first_segment[b]; i < first_segment[b + 1]; ++i)
        max = std::max(max, partial_max[(i * chunks + chunk) * L + lane]);
      A* target = out + row * a.value_width;
      std::fill(target, target + a.value_width, A(0));
      A sum = 0;
      for (int64_t i = first_segment[b]; i < first_segment[b + 1]; ++i) {
        const int64_t state = i * chunks + chunk;
        if (partial_max[state * L + lane] == -std::numeric_limits<A>::infinity()) continue;
        const A weight = std::exp(partial_max[state * L + lane] - max);
        sum += weight * partial_sum[state * L + lane];
        const A* source = &partial_out[state * a.value_width * L + lane];
        for (int64_t c = 0; c < a.value_width; ++c) target[c] += weight * source[c * L];
      }
      for (int64_t c = 0; c < a.value_width; ++c) target[c] /= sum;
    }
  }
};

template <typename A, StorageKind S> const char* run(const DecodeArgs& args) {
#ifdef LATENT_DOT_ENGINE
  if constexpr (std::is_same_v<A, float> && S != SAME) {
    if (DotEngine<S>::serves(args)) {
      Decoder<float, DotEngine<S>>(args).run();
      return "bf16-dot";
    }
  }
#endif
  Decoder<A, FmaEngine<A, S>>(args).run();
  return "fma";
}

template <typename A> const char* dispatch(const DecodeArgs& args) {
  switch (args.storage) {
    case BF16: return run<A, BF16>(args);
    case INT8: return run<A, INT8>(args);
    case FP8_E4M3: return run<A, FP8_E4M3>(args);
    default: return run<A, SAME>(args);
  }
}

}  // namespace

extern "C" {

// Runs the kernel; returns the engine that ran ("fma" or "bf16-dot"), or null for bad arguments.
const char* latent_decode(const DecodeArgs* args) {
  if (args->storage < SAME || args->storage > FP8_E4M3) return nullptr;
  return args->double_precision ? dispatch<double>(*args) : dispatch<float>(*args);
}

// The vector instructions this build uses.
const char* latent_decode_isa() {
#ifdef LATENT_DOT_ENGINE
  return "avx512+bf16";
#else
  return VECTOR_BYTES == 64 ? "avx512" : VECTOR_BYTES == 32 ? "avx2" : "generic";
#endif
}

}  // extern "C"
