/* y = x @ W^T (+ bias) on weights packed in one of shoal's formats: float32, float16, bfloat16, or integer
 * quants (8 or 4 bits) with a scale s, and optionally an offset m, per group of k: w = s*q + m (float32, or
 * float16 where that holds them exactly).
 *
 * Float formats: every output element is one FMA chain over k in ascending order. Quant formats: for each
 * group in ascending order, the FMA chain of x * q over the group, then acc = s * that + acc and acc =
 * m * (sum of x over the group) + acc. Either way a fixed order per element, on values taken from registers,
 * so a row's result depends on nothing but that row: not on how many rows run with it, where it sits, how
 * many threads run, or which instruction set (AVX-512, AVX2 or portable C) this file was built for.
 *
 * Layout: output columns in panels of 16, [panels][...][16], the panel count padded to a multiple of 4. Per
 * panel, float formats hold [k][16] values; q8 holds [k][16] int8; q4 holds [k/2][16] bytes whose low nibble
 * is k = 2i and high nibble k = 2i + 1. q5 and q6 hold q4's nibbles and, in `high`, the bits above them:
 * [k/8][16] bytes for q5 (bit j of byte t: k = 8t + j), [k/4][16] for q6 (bits 2j, 2j + 1: k = 4t + j);
 * their value is (nibble | high << 4) - zero, q4's nibble - zero: exact small integers made in registers.
 * Scales and offsets: [panels][k / group][16].
 * A thread takes units of panels (two on AVX-512, one otherwise; twice that for 1-3 rows) and runs each tile
 * of rows over all of k.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "simd_math.h"

#define PANEL 16

/* ---- one panel of 16 columns as vectors ---- */
#if defined(__AVX512F__)
#define UNIT 2
#define FLOAT_ROWS 8
#define QUANT_ROWS 6
typedef struct {
    __m512 v;
} pv;
static inline pv pv_zero(void) { return (pv){_mm512_setzero_ps()}; }
static inline pv pv_fma(float x, pv w, pv acc) { return (pv){_mm512_fmadd_ps(_mm512_set1_ps(x), w.v, acc.v)}; }
static inline pv pv_f32(const float *p) { return (pv){_mm512_loadu_ps(p)}; }
static inline void pv_store(float *p, pv a) { _mm512_storeu_ps(p, a.v); }
static inline pv pv_f16(const uint16_t *p) { return (pv){_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p))}; }
static inline pv pv_bf16(const uint16_t *p) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return (pv){_mm512_castsi512_ps(_mm512_slli_epi32(wide, 16))};
}
static inline pv pv_q8(const int8_t *p) {
    return (pv){_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)))};
}
static inline pv pv_fmav(pv a, pv b, pv acc) { return (pv){_mm512_fmadd_ps(a.v, b.v, acc.v)}; }
static inline pv pv_mul(pv a, pv b) { return (pv){_mm512_mul_ps(a.v, b.v)}; }
static inline void pv_q4(const uint8_t *p, int zero, pv *even, pv *odd) {
    const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)), z = _mm512_set1_epi32(zero);
    even->v = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(bytes, _mm512_set1_epi32(15)), z));
    odd->v = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(bytes, 4), z));
}
/* pv_qh: the values at k = 2i and 2i + 1 of q5/q6 from their nibble byte and their byte of high bits h, whose
 * `bits` bits per value (1 or 2) for k = 2i start at `shift`. */
typedef struct {
    __m512i v;
} hv;
static inline hv hv_load(const uint8_t *p) { return (hv){_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p))}; }
static inline __m512i qh_value(__m512i nibble, hv h, int shift, int mask, int zero) {
    const __m512i high = _mm512_and_si512(_mm512_srli_epi32(h.v, shift), _mm512_set1_epi32(mask));
    return _mm512_sub_epi32(_mm512_or_si512(nibble, _mm512_slli_epi32(high, 4)), _mm512_set1_epi32(zero));
}
static inline void pv_qh(const uint8_t *p, hv h, int shift, int bits, int zero, pv *even, pv *odd) {
    const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    const int mask = (1 << bits) - 1;
    even->v = _mm512_cvtepi32_ps(qh_value(_mm512_and_si512(bytes, _mm512_set1_epi32(15)), h, shift, mask, zero));
    odd->v = _mm512_cvtepi32_ps(qh_value(_mm512_srli_epi32(bytes, 4), h, shift + bits, mask, zero));
}
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define UNIT 1
#define FLOAT_ROWS 4
#define QUANT_ROWS 3
typedef struct {
    __m256 a, b;
} pv;
static inline pv pv_zero(void) { return (pv){_mm256_setzero_ps(), _mm256_setzero_ps()}; }
static inline pv pv_fma(float x, pv w, pv acc) {
    const __m256 b = _mm256_set1_ps(x);
    return (pv){_mm256_fmadd_ps(b, w.a, acc.a), _mm256_fmadd_ps(b, w.b, acc.b)};
}
static inline pv pv_f32(const float *p) { return (pv){_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
static inline void pv_store(float *p, pv x) {
    _mm256_storeu_ps(p, x.a);
    _mm256_storeu_ps(p + 8, x.b);
}
static inline pv pv_f16(const uint16_t *p) {
    return (pv){_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)),
                _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 8)))};
}
static inline __m256 bf16x8(const uint16_t *p) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
static inline pv pv_bf16(const uint16_t *p) { return (pv){bf16x8(p), bf16x8(p + 8)}; }
static inline __m256 i8x8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
static inline pv pv_q8(const int8_t *p) { return (pv){i8x8(p), i8x8(p + 8)}; }
static inline pv pv_fmav(pv x, pv y, pv acc) { return (pv){_mm256_fmadd_ps(x.a, y.a, acc.a), _mm256_fmadd_ps(x.b, y.b, acc.b)}; }
static inline pv pv_mul(pv x, pv y) { return (pv){_mm256_mul_ps(x.a, y.a), _mm256_mul_ps(x.b, y.b)}; }
static inline void q4x8(const uint8_t *p, int zero, __m256 *even, __m256 *odd) {
    const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)), z = _mm256_set1_epi32(zero);
    *even = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(bytes, _mm256_set1_epi32(15)), z));
    *odd = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(bytes, 4), z));
}
static inline void pv_q4(const uint8_t *p, int zero, pv *even, pv *odd) {
    q4x8(p, zero, &even->a, &odd->a);
    q4x8(p + 8, zero, &even->b, &odd->b);
}
typedef struct {
    __m256i a, b;
} hv;
static inline __m256i u8x8(const uint8_t *p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)); }
static inline hv hv_load(const uint8_t *p) { return (hv){u8x8(p), u8x8(p + 8)}; }
static inline __m256 qh_value(__m256i nibble, __m256i h, int shift, int mask, int zero) {
    const __m256i high = _mm256_and_si256(_mm256_srli_epi32(h, shift), _mm256_set1_epi32(mask));
    const __m256i q = _mm256_or_si256(nibble, _mm256_slli_epi32(high, 4));
    return _mm256_cvtepi32_ps(_mm256_sub_epi32(q, _mm256_set1_epi32(zero)));
}
static inline void qhx8(const uint8_t *p, __m256i h, int shift, int bits, int zero, __m256 *even, __m256 *odd) {
    const __m256i bytes = u8x8(p);
    const int mask = (1 << bits) - 1;
    *even = qh_value(_mm256_and_si256(bytes, _mm256_set1_epi32(15)), h, shift, mask, zero);
    *odd = qh_value(_mm256_srli_epi32(bytes, 4), h, shift + bits, mask, zero);
}
static inline void pv_qh(const uint8_t *p, hv h, int shift, int bits, int zero, pv *even, pv *odd) {
    qhx8(p, h.a, shift, bits, zero, &even->a, &odd->a);
    qhx8(p + 8, h.b, shift, bits, zero, &even->b, &odd->b);
}
#else /* portable C: the same operations one lane at a time */
#define UNIT 1
#define FLOAT_ROWS 4
#define QUANT_ROWS 4
typedef struct {
    float v[PANEL];
} pv;
#define LANES for (int l = 0; l < PANEL; l++)
static inline pv pv_zero(void) { return (pv){{0}}; }
static inline pv pv_fma(float x, pv w, pv acc) {
    LANES acc.v[l] = fmaf(x, w.v[l], acc.v[l]);
    return acc;
}
static inline pv pv_f32(const float *p) {
    pv r;
    memcpy(r.v, p, sizeof r.v);
    return r;
}
static inline void pv_store(float *p, pv a) { memcpy(p, a.v, sizeof a.v); }
static inline pv pv_f16(const uint16_t *p) {
    pv r;
    LANES r.v[l] = half_to_float(p[l]);
    return r;
}
static inline pv pv_bf16(const uint16_t *p) {
    pv r;
    LANES {
        const uint32_t bits = (uint32_t)p[l] << 16;
        memcpy(&r.v[l], &bits, 4);
    }
    return r;
}
static inline pv pv_q8(const int8_t *p) {
    pv r;
    LANES r.v[l] = (float)p[l];
    return r;
}
static inline pv pv_fmav(pv a, pv b, pv acc) {
    LANES acc.v[l] = fmaf(a.v[l], b.v[l], acc.v[l]);
    return acc;
}
static inline pv pv_mul(pv a, pv b) {
    LANES a.v[l] = a.v[l] * b.v[l];
    return a;
}
static inline void pv_q4(const uint8_t *p, int zero, pv *even, pv *odd) {
    LANES {
        even->v[l] = (float)((p[l] & 15) - zero);
        odd->v[l] = (float)((p[l] >> 4) - zero);
    }
}
typedef struct {
    uint8_t v[PANEL];
} hv;
static inline hv hv_load(const uint8_t *p) {
    hv r;
    memcpy(r.v, p, sizeof r.v);
    return r;
}
static inline void pv_qh(const uint8_t *p, hv h, int shift, int bits, int zero, pv *even, pv *odd) {
    const int mask = (1 << bits) - 1;
    LANES {
        even->v[l] = (float)(((p[l] & 15) | (((h.v[l] >> shift) & mask) << 4)) - zero);
        odd->v[l] = (float)(((p[l] >> 4) | (((h.v[l] >> (shift + bits)) & mask) << 4)) - zero);
    }
}
#endif

/* The scale (or offset) vector of 16 columns at `at` (and their super-scales at `super_at`): stored, in its
 * precision, or made of its factors, super * sub (one float32 product, as gguf computes it). */
static inline pv scale_at(const struct packed_weight *w, const void *base, const uint16_t *supers, int64_t at,
                          int64_t super_at) {
    if (w->factored) return pv_mul(pv_f16(supers + super_at), pv_q8((const int8_t *)base + at));
    return w->half_scales ? pv_f16((const uint16_t *)base + at) : pv_f32((const float *)base + at);
}

static inline float scale_value(const struct packed_weight *w, const void *base, const uint16_t *supers,
                                int64_t col, int64_t i) {
    const int64_t p = col / PANEL, lane = col % PANEL, g = i / w->group;
    const int64_t at = (p * (w->k / w->group) + g) * PANEL + lane;
    if (w->factored) {
        const float super = half_to_float(supers[(p * (w->k / 256) + g * w->group / 256) * PANEL + lane]);
        return super * (float)((const int8_t *)base)[at];
    }
    return w->half_scales ? half_to_float(((const uint16_t *)base)[at]) : ((const float *)base)[at];
}

#define UNROLL _Pragma("GCC unroll 16")

/* One k step for all R rows: ACC[r][u] += x[r][I] * W[u]. */
#define FMA_ROWS(ACC, R, U, W, I)                                                                \
    UNROLL for (int r = 0; r < R; r++) {                                                         \
        const float xv = a[r * lda + (I)];                                                       \
        UNROLL for (int u = 0; u < U; u++) ACC[r][u] = pv_fma(xv, W[u], ACC[r][u]);              \
    }

#define ZEROS(ACC, R, U) \
    pv ACC[R][U];        \
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int u = 0; u < U; u++) ACC[r][u] = pv_zero();

#define TILE_EPILOGUE(R, U) \
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int u = 0; u < U; u++) pv_store(out + (r * U + u) * PANEL, c[r][u]);

/* The tile of R rows (x rows a, a + lda, ...) against the U panels starting at panel p; out is
 * [R][U * PANEL]. One function per format so the inner loop holds no branch on it. Float formats: one
 * FMA chain over k per element. */
#define DEFINE_FLOAT_TILE(NAME, R, SUF, U, TYPE, LOAD)                                                       \
    static void NAME##_##R##SUF(const float *a, int64_t lda, const struct packed_weight *w, int64_t p, int64_t k, \
                           const float *xsum, float *out) {                                                  \
        (void)xsum;                                                                                          \
        ZEROS(c, R, U)                                                                                          \
        const TYPE *base = (const TYPE *)w->quants + p * k * PANEL;                                          \
        for (int64_t i = 0; i < k; i++) {                                                                    \
            pv wv[U];                                                                                        \
            UNROLL for (int u = 0; u < U; u++) wv[u] = LOAD(base + (u * k + i) * PANEL);                  \
            FMA_ROWS(c, R, U, wv, i)                                                                            \
        }                                                                                                    \
        TILE_EPILOGUE(R, U)                                                                                  \
    }

/* Quant formats, group by group: b = the FMA chain of x * q over the group (q as exact small floats), then
 * c = s * b + c and, with offsets, c = m * sum(x over the group) + c. The same chain of group sums in
 * ascending order for every element, whatever the tile. xsum: [R][groups], each row's group sums of x. */
#define GROUP_END(R, U, HAS_MIN)                                                                      \
    UNROLL for (int u = 0; u < U; u++) {                                                           \
        const int64_t at = ((p + u) * groups + g) * PANEL;                                            \
        const int64_t super_at = ((p + u) * (k / 256) + g * group / 256) * PANEL;                     \
        const pv s = scale_at(w, w->scales, w->super_scales, at, super_at);                           \
        UNROLL for (int r = 0; r < R; r++) c[r][u] = pv_fmav(s, b[r][u], c[r][u]);                    \
        if (HAS_MIN) {                                                                                \
            const pv m = scale_at(w, w->mins, w->super_mins, at, super_at);                           \
            UNROLL for (int r = 0; r < R; r++) c[r][u] = pv_fma(xsum[r * groups + g], m, c[r][u]);    \
        }                                                                                             \
    }

#define DEFINE_Q8_TILE(NAME, R, SUF, U, HAS_MIN)                                                             \
    static void NAME##_##R##SUF(const float *a, int64_t lda, const struct packed_weight *w, int64_t p, int64_t k, \
                           const float *xsum, float *out) {                                                  \
        ZEROS(c, R, U)                                                                                          \
        const int64_t group = w->group, groups = k / group;                                                  \
        const int8_t *base = (const int8_t *)w->quants + p * k * PANEL;                                      \
        for (int64_t g = 0; g < groups; g++) {                                                               \
            ZEROS(b, R, U)                                                                                      \
            for (int64_t i = g * group; i < (g + 1) * group; i++) {                                          \
                pv q[U];                                                                                     \
                UNROLL for (int u = 0; u < U; u++) q[u] = pv_q8(base + (u * k + i) * PANEL);              \
                FMA_ROWS(b, R, U, q, i)                                                                         \
            }                                                                                                \
            GROUP_END(R, U, HAS_MIN)                                                                            \
        }                                                                                                    \
        TILE_EPILOGUE(R, U)                                                                                  \
    }

#define DEFINE_Q4_TILE(NAME, R, SUF, U, HAS_MIN)                                                             \
    static void NAME##_##R##SUF(const float *a, int64_t lda, const struct packed_weight *w, int64_t p, int64_t k, \
                           const float *xsum, float *out) {                                                  \
        ZEROS(c, R, U)                                                                                          \
        const int64_t group = w->group, groups = k / group, half = k / 2;                                    \
        const int zero = HAS_MIN ? 0 : w->zero; /* offsets or a zero, never both: 0 folds the subtraction away */ \
        const uint8_t *base = (const uint8_t *)w->quants + p * half * PANEL;                                 \
        for (int64_t g = 0; g < groups; g++) {                                                               \
            ZEROS(b, R, U)                                                                                      \
            for (int64_t i = g * group; i < (g + 1) * group; i += 2) {                                       \
                pv even[U], odd[U];                                                                          \
                UNROLL for (int u = 0; u < U; u++) pv_q4(base + (u * half + i / 2) * PANEL, zero, &even[u], &odd[u]); \
                FMA_ROWS(b, R, U, even, i)                                                                      \
                FMA_ROWS(b, R, U, odd, i + 1)                                                                   \
            }                                                                                                \
            GROUP_END(R, U, HAS_MIN)                                                                            \
        }                                                                                                    \
        TILE_EPILOGUE(R, U)                                                                                  \
    }

/* q5 and q6 (BITS): q4's nibbles, and one byte of high bits per column for every 8 / BITS values of k. */
#define DEFINE_QH_TILE(NAME, R, SUF, U, HAS_MIN, BITS)                                                       \
    static void NAME##_##R##SUF(const float *a, int64_t lda, const struct packed_weight *w, int64_t p, int64_t k, \
                           const float *xsum, float *out) {                                                  \
        ZEROS(c, R, U)                                                                                          \
        enum { HIGH = BITS - 4, PER = 8 / HIGH }; /* high bits per value, values per byte of them */         \
        const int64_t group = w->group, groups = k / group, half = k / 2, chunks = k / PER;                  \
        const int zero = HAS_MIN ? 0 : w->zero; /* offsets or a zero, never both: 0 folds the subtraction away */ \
        const uint8_t *base = (const uint8_t *)w->quants + p * half * PANEL;                                 \
        const uint8_t *highs = (const uint8_t *)w->high + p * chunks * PANEL;                                \
        for (int64_t g = 0; g < groups; g++) {                                                               \
            ZEROS(b, R, U)                                                                                      \
            for (int64_t i = g * group; i < (g + 1) * group; i += PER) {                                     \
                hv h[U];                                                                                     \
                UNROLL for (int u = 0; u < U; u++) h[u] = hv_load(highs + (u * chunks + i / PER) * PANEL);   \
                UNROLL for (int j = 0; j < PER; j += 2) {                                                    \
                    pv even[U], odd[U];                                                                      \
                    UNROLL for (int u = 0; u < U; u++)                                                       \
                        pv_qh(base + (u * half + (i + j) / 2) * PANEL, h[u], j * HIGH, HIGH, zero, &even[u], &odd[u]); \
                    FMA_ROWS(b, R, U, even, i + j)                                                              \
                    FMA_ROWS(b, R, U, odd, i + j + 1)                                                           \
                }                                                                                            \
            }                                                                                                \
            GROUP_END(R, U, HAS_MIN)                                                                            \
        }                                                                                                    \
        TILE_EPILOGUE(R, U)                                                                                  \
    }

/* Narrow tiles (UNIT panels, up to FLOAT_ROWS / QUANT_ROWS rows) for batches of 4 rows and more; wide tiles
 * (2 * UNIT panels, up to 3 rows) for fewer, where independent chains over more panels hide FMA latency. */
#define WIDE (2 * UNIT)
#define TILES_OF(X, NAME, ...)                                                                                   \
    X(NAME, 1, n, UNIT, __VA_ARGS__) X(NAME, 2, n, UNIT, __VA_ARGS__) X(NAME, 3, n, UNIT, __VA_ARGS__)           \
    X(NAME, 4, n, UNIT, __VA_ARGS__) X(NAME, 5, n, UNIT, __VA_ARGS__) X(NAME, 6, n, UNIT, __VA_ARGS__)           \
    X(NAME, 7, n, UNIT, __VA_ARGS__) X(NAME, 8, n, UNIT, __VA_ARGS__) X(NAME, 1, w, WIDE, __VA_ARGS__)           \
    X(NAME, 2, w, WIDE, __VA_ARGS__) X(NAME, 3, w, WIDE, __VA_ARGS__)
TILES_OF(DEFINE_FLOAT_TILE, f32, float, pv_f32)
TILES_OF(DEFINE_FLOAT_TILE, f16, uint16_t, pv_f16)
TILES_OF(DEFINE_FLOAT_TILE, bf16, uint16_t, pv_bf16)
TILES_OF(DEFINE_Q8_TILE, q8, 0)
TILES_OF(DEFINE_Q8_TILE, q8m, 1)
TILES_OF(DEFINE_Q4_TILE, q4, 0)
TILES_OF(DEFINE_Q4_TILE, q4m, 1)
TILES_OF(DEFINE_QH_TILE, q5, 0, 5)
TILES_OF(DEFINE_QH_TILE, q5m, 1, 5)
TILES_OF(DEFINE_QH_TILE, q6, 0, 6)
TILES_OF(DEFINE_QH_TILE, q6m, 1, 6)

typedef void (*tile_fn)(const float *, int64_t, const struct packed_weight *, int64_t, int64_t, const float *, float *);
#define NARROW_TABLE(N) {N##_1n, N##_2n, N##_3n, N##_4n, N##_5n, N##_6n, N##_7n, N##_8n}
#define WIDE_TABLE(N) {N##_1w, N##_2w, N##_3w}
#define ALL_FORMATS(T) {T(f32), T(f16), T(bf16), T(q8), T(q8m), T(q4), T(q4m), T(q5), T(q5m), T(q6), T(q6m)}
static const tile_fn NARROW_TILES[11][8] = ALL_FORMATS(NARROW_TABLE);
static const tile_fn WIDE_TILES[11][3] = ALL_FORMATS(WIDE_TABLE);
#define WIDE_ROWS 3

static int format_index(const struct packed_weight *w) {
    return w->format < FMT_Q8 ? w->format : FMT_Q8 + 2 * (w->format - FMT_Q8) + (w->has_min != 0);
}

/* Writes rows row..row+rows of the tile into y (row stride ldy; adds them to y when accumulate), for the
 * columns of panels p..p+panels that the part has (n). Each element: y + (chain + bias), as torch's
 * `y + linear(x)`. */
static void store(float *y, int64_t ldy, int64_t n, int64_t row, int rows, int64_t p, int panels, const float *tile,
                  const float *bias, int accumulate) {
    const int64_t col0 = p * PANEL, col1 = (p + panels) * PANEL < n ? (p + panels) * PANEL : n;
    for (int r = 0; r < rows; r++)
        for (int64_t col = col0; col < col1; col++) {
            const float v = tile[r * panels * PANEL + col - col0] + (bias ? bias[col] : 0.0f);
            float *o = y + (row + r) * ldy + col;
            *o = accumulate ? *o + v : v;
        }
}

/* Rows are taken in blocks that stay in cache while every unit passes over them. */
#define ROW_BLOCK 64

static int64_t groups_of(const struct packed_weight *w) { return w->format < FMT_Q8 ? 0 : w->k / w->group; }

int64_t weight_columns(const struct packed_weight *w) {
    int64_t n = 0;
    for (; w; w = w->next) n += w->n;
    return n;
}

/* xsum floats gemm_body needs for m rows: each part's group sums of x, part after part. */
int64_t xsum_size(const struct packed_weight *w, int64_t m) {
    int64_t size = 0;
    for (; w; w = w->next) size += w->has_min ? m * groups_of(w) : 0;
    return size;
}

static int64_t units_of(const struct packed_weight *w, int panels) {
    return ((w->n + PANEL - 1) / PANEL + panels - 1) / panels;
}

/* The parts of w (matrices of different formats stacked along n, such as q/k/v) run as one matrix: one pass
 * over all their units, each unit with its own part's tiles. */
void gemm_body(const float *x, int64_t m, const struct packed_weight *w, float *y, int accumulate, float *xsum) {
    const int64_t k = w->k, ldy = weight_columns(w);
    const int wide = m <= WIDE_ROWS;
    const int panels = wide ? WIDE : UNIT;
    int64_t units = 0;
    for (const struct packed_weight *part = w; part; part = part->next) units += units_of(part, panels);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < m; r++) { /* each row's sum of x over each group, in ascending k (for offsets) */
        float *sums = xsum;
        for (const struct packed_weight *part = w; part; part = part->next) {
            if (!part->has_min) continue;
            const int64_t groups = groups_of(part);
            for (int64_t g = 0; g < groups; g++) {
                float total = 0.0f;
                for (int64_t i = g * part->group; i < (g + 1) * part->group; i++) total += x[r * k + i];
                sums[r * groups + g] = total;
            }
            sums += m * groups;
        }
    }
    float tile[(FLOAT_ROWS > 2 * WIDE_ROWS ? FLOAT_ROWS : 2 * WIDE_ROWS) * UNIT * PANEL];
    for (int64_t row0 = 0; row0 < m; row0 += ROW_BLOCK) {
        const int64_t row1 = row0 + ROW_BLOCK < m ? row0 + ROW_BLOCK : m;
#pragma omp for schedule(static)
        for (int64_t unit = 0; unit < units; unit++) {
            const struct packed_weight *part = w;
            int64_t local = unit, column = 0;
            const float *sums = xsum;
            while (local >= units_of(part, panels)) {
                local -= units_of(part, panels);
                column += part->n;
                sums += part->has_min ? m * groups_of(part) : 0;
                part = part->next;
            }
            const int64_t groups = groups_of(part);
            const tile_fn *tiles = wide ? WIDE_TILES[format_index(part)] : NARROW_TILES[format_index(part)];
            const int max_rows = wide ? WIDE_ROWS : part->format < FMT_Q8 ? FLOAT_ROWS : QUANT_ROWS;
            for (int64_t row = row0; row < row1;) {
                const int rows = row1 - row < max_rows ? (int)(row1 - row) : max_rows;
                tiles[rows - 1](x + row * k, k, part, local * panels, k, part->has_min ? sums + row * groups : NULL,
                                tile);
                store(y + column, ldy, part->n, row, rows, local * panels, panels, tile, part->bias, accumulate);
                row += rows;
            }
        }
    }
}

void gemm(const float *x, int64_t m, const struct packed_weight *w, float *y, int accumulate, int num_threads) {
    const int64_t size = xsum_size(w, m);
    float *xsum = size ? malloc(sizeof(float) * size) : NULL;
#pragma omp parallel num_threads(num_threads)
    gemm_body(x, m, w, y, accumulate, xsum);
    free(xsum);
}

/* One weight of column `col` at k index i: s * q + m, gguf's dequantized value. */
static float weight_at(const struct packed_weight *w, int64_t k, int64_t col, int64_t i) {
    const int64_t p = col / PANEL, lane = col % PANEL;
    if (w->format == FMT_F32) return ((const float *)w->quants)[(p * k + i) * PANEL + lane];
    if (w->format == FMT_F16) return half_to_float(((const uint16_t *)w->quants)[(p * k + i) * PANEL + lane]);
    if (w->format == FMT_BF16) {
        const uint32_t bits = (uint32_t)((const uint16_t *)w->quants)[(p * k + i) * PANEL + lane] << 16;
        float v;
        memcpy(&v, &bits, 4);
        return v;
    }
    float q;
    if (w->format == FMT_Q8) {
        q = (float)((const int8_t *)w->quants)[(p * k + i) * PANEL + lane];
    } else {
        const uint8_t byte = ((const uint8_t *)w->quants)[(p * (k / 2) + i / 2) * PANEL + lane];
        int value = (i % 2) ? byte >> 4 : byte & 15;
        if (w->format != FMT_Q4) {
            const int bits = w->format == FMT_Q5 ? 1 : 2, per = 8 / bits; /* high bits per value */
            const uint8_t high = ((const uint8_t *)w->high)[(p * (k / per) + i / per) * PANEL + lane];
            value |= ((high >> (i % per * bits)) & ((1 << bits) - 1)) << 4;
        }
        q = (float)(value - w->zero);
    }
    const float v = q * scale_value(w, w->scales, w->super_scales, col, i);
    return w->has_min ? v + scale_value(w, w->mins, w->super_mins, col, i) : v;
}

/* out[r] = column ids[r] of the packed matrix (an embedding lookup in the lm_head's packed table). */
void gather_columns(const struct packed_weight *w, const int64_t *ids, int64_t count, float *out) {
    const int64_t k = w->k;
    for (int64_t r = 0; r < count; r++) {
        const struct packed_weight *part = w;
        int64_t col = ids[r];
        while (col >= part->n) col -= part->n, part = part->next;
        for (int64_t i = 0; i < k; i++) out[r * k + i] = weight_at(part, k, col, i);
    }
}
