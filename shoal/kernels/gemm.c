/* y = x @ W^T (+ bias) on weights packed in one of shoal's formats: float32, float16, bfloat16, or integer
 * quants (8 or 4 bits) with a float32 scale, and optionally a float32 offset, per group of k.
 *
 * Every output element is one FMA chain over k in ascending order, starting from 0, on weights dequantized in
 * registers exactly as gguf's dequantize computes them (scale * q, then + offset: separate roundings). So a
 * row's result depends on nothing but that row: not on how many rows run with it, where it sits, how many
 * threads run, or which instruction set (AVX-512, AVX2 or portable C) this file was built for.
 *
 * Layout: output columns in panels of 16, [panels][...][16], the panel count padded to an even number. Per
 * panel, float formats hold [k][16] values; q8 holds [k][16] int8; q4 holds [k/2][16] bytes whose low nibble
 * is k = 2i and high nibble k = 2i + 1 (value = nibble - zero). Scales and offsets: [panels][k / group][16].
 * A thread takes a unit of panels (two on AVX-512, one otherwise) and runs each tile of rows over all of k.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "simd_math.h"

#define PANEL 16

enum format { FMT_F32 = 0, FMT_F16 = 1, FMT_BF16 = 2, FMT_Q8 = 3, FMT_Q4 = 4 };

struct packed_weight {
    int32_t format;
    int32_t group;   /* k values per scale (quant formats) */
    int32_t zero;    /* subtracted from each q4 nibble before scaling */
    int32_t has_min; /* an offset is added after scaling */
    const void *quants;
    const float *scales;
    const float *mins;
};

/* ---- one panel of 16 columns as vectors ---- */
#if defined(__AVX512F__)
#define UNIT 2
#define MAX_ROWS 8
typedef struct {
    __m512 v;
} pv;
static inline pv pv_zero(void) { return (pv){_mm512_setzero_ps()}; }
static inline pv pv_fma(float x, pv w, pv acc) { return (pv){_mm512_fmadd_ps(_mm512_set1_ps(x), w.v, acc.v)}; }
static inline pv pv_mul(pv a, pv b) { return (pv){_mm512_mul_ps(a.v, b.v)}; }
static inline pv pv_add(pv a, pv b) { return (pv){_mm512_add_ps(a.v, b.v)}; }
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
static inline void pv_q4(const uint8_t *p, int zero, pv *even, pv *odd) {
    const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    const __m512i z = _mm512_set1_epi32(zero), mask = _mm512_set1_epi32(15);
    even->v = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(bytes, mask), z));
    odd->v = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(bytes, 4), z));
}
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define UNIT 1
#define MAX_ROWS 4
typedef struct {
    __m256 a, b;
} pv;
static inline pv pv_zero(void) { return (pv){_mm256_setzero_ps(), _mm256_setzero_ps()}; }
static inline pv pv_fma(float x, pv w, pv acc) {
    const __m256 b = _mm256_set1_ps(x);
    return (pv){_mm256_fmadd_ps(b, w.a, acc.a), _mm256_fmadd_ps(b, w.b, acc.b)};
}
static inline pv pv_mul(pv x, pv y) { return (pv){_mm256_mul_ps(x.a, y.a), _mm256_mul_ps(x.b, y.b)}; }
static inline pv pv_add(pv x, pv y) { return (pv){_mm256_add_ps(x.a, y.a), _mm256_add_ps(x.b, y.b)}; }
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
static inline void q4x8(const uint8_t *p, __m256i z, __m256 *even, __m256 *odd) {
    const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    *even = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(bytes, _mm256_set1_epi32(15)), z));
    *odd = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(bytes, 4), z));
}
static inline void pv_q4(const uint8_t *p, int zero, pv *even, pv *odd) {
    const __m256i z = _mm256_set1_epi32(zero);
    q4x8(p, z, &even->a, &odd->a);
    q4x8(p + 8, z, &even->b, &odd->b);
}
#else /* portable C: the same operations one lane at a time */
#define UNIT 1
#define MAX_ROWS 4
typedef struct {
    float v[PANEL];
} pv;
#define LANES for (int l = 0; l < PANEL; l++)
static inline pv pv_zero(void) { return (pv){{0}}; }
static inline pv pv_fma(float x, pv w, pv acc) {
    LANES acc.v[l] = fmaf(x, w.v[l], acc.v[l]);
    return acc;
}
static inline pv pv_mul(pv a, pv b) {
    LANES a.v[l] *= b.v[l];
    return a;
}
static inline pv pv_add(pv a, pv b) {
    LANES a.v[l] += b.v[l];
    return a;
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
static inline void pv_q4(const uint8_t *p, int zero, pv *even, pv *odd) {
    LANES {
        even->v[l] = (float)((p[l] & 15) - zero);
        odd->v[l] = (float)((p[l] >> 4) - zero);
    }
}
#endif

#define UNROLL _Pragma("GCC unroll 16")

/* Element-wise dequantization of one k step: scale, then offset (two roundings, as gguf's numpy code). */
#define SCALED(HAS_MIN, q, s, m) ((HAS_MIN) ? pv_add(pv_mul(q, s), m) : pv_mul(q, s))

/* The tile of R rows (x rows a, a + lda, ...) against the UNIT panels starting at panel p; out is
 * [R][UNIT * PANEL]. One function per format so the inner loop holds no branch on it. */
#define FMA_ROWS(R, W, I)                                                      \
    UNROLL for (int r = 0; r < R; r++) {                                       \
        const float xv = a[r * lda + (I)];                                     \
        UNROLL for (int u = 0; u < UNIT; u++) c[r][u] = pv_fma(xv, W[u], c[r][u]); \
    }

#define TILE_PROLOGUE(R)                                                                  \
    pv c[R][UNIT];                                                                        \
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int u = 0; u < UNIT; u++) c[r][u] = pv_zero();

#define TILE_EPILOGUE(R) \
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int u = 0; u < UNIT; u++) pv_store(out + (r * UNIT + u) * PANEL, c[r][u]);

#define DEFINE_FLOAT_TILE(NAME, R, TYPE, LOAD)                                                               \
    static void NAME##_##R(const float *a, int64_t lda, const struct packed_weight *w, int64_t p, int64_t k, \
                           float *out) {                                                                     \
        TILE_PROLOGUE(R)                                                                                     \
        const TYPE *base = (const TYPE *)w->quants + p * k * PANEL;                                          \
        for (int64_t i = 0; i < k; i++) {                                                                    \
            pv wv[UNIT];                                                                                     \
            UNROLL for (int u = 0; u < UNIT; u++) wv[u] = LOAD(base + (u * k + i) * PANEL);                  \
            FMA_ROWS(R, wv, i)                                                                               \
        }                                                                                                    \
        TILE_EPILOGUE(R)                                                                                     \
    }

/* Group by group: load the scales (and offsets) of the unit's panels, then dequantize each k step once for
 * all R rows. q8 takes one k step at a time, q4 two (one byte holds both). */
#define GROUP_SCALES(HAS_MIN)                                                                      \
    pv s[UNIT], m[UNIT];                                                                    \
    UNROLL for (int u = 0; u < UNIT; u++) {                                                 \
        const int64_t at = ((p + u) * groups + g) * PANEL;                                  \
        s[u] = pv_f32(w->scales + at);                                                      \
        m[u] = HAS_MIN ? pv_f32(w->mins + at) : pv_zero();                                  \
    }

#define DEFINE_Q8_TILE(NAME, R, HAS_MIN)                                                                       \
    static void NAME##_##R(const float *a, int64_t lda, const struct packed_weight *w, int64_t p, int64_t k,     \
                       float *out) {                                                                          \
        TILE_PROLOGUE(R)                                                                                      \
        const int64_t group = w->group, groups = k / group;                                                   \
        const int8_t *base = (const int8_t *)w->quants + p * k * PANEL;                                       \
        for (int64_t g = 0; g < groups; g++) {                                                                \
            GROUP_SCALES(HAS_MIN)                                                                                \
            for (int64_t i = g * group; i < (g + 1) * group; i++) {                                           \
                pv wv[UNIT];                                                                                  \
                UNROLL for (int u = 0; u < UNIT; u++) wv[u] = SCALED(HAS_MIN, pv_q8(base + (u * k + i) * PANEL), s[u], m[u]); \
                FMA_ROWS(R, wv, i)                                                                            \
            }                                                                                                 \
        }                                                                                                     \
        TILE_EPILOGUE(R)                                                                                      \
    }

#define DEFINE_Q4_TILE(NAME, R, HAS_MIN)                                                                       \
    static void NAME##_##R(const float *a, int64_t lda, const struct packed_weight *w, int64_t p, int64_t k,     \
                       float *out) {                                                                          \
        TILE_PROLOGUE(R)                                                                                      \
        const int64_t group = w->group, groups = k / group, half = k / 2;                                     \
        const uint8_t *base = (const uint8_t *)w->quants + p * half * PANEL;                                  \
        const int zero = w->zero;                                                                             \
        for (int64_t g = 0; g < groups; g++) {                                                                \
            GROUP_SCALES(HAS_MIN)                                                                                \
            for (int64_t i = g * group; i < (g + 1) * group; i += 2) {                                        \
                pv even[UNIT], odd[UNIT];                                                                     \
                UNROLL for (int u = 0; u < UNIT; u++) {                                                       \
                    pv_q4(base + (u * half + i / 2) * PANEL, zero, &even[u], &odd[u]);                        \
                    even[u] = SCALED(HAS_MIN, even[u], s[u], m[u]);                                          \
                    odd[u] = SCALED(HAS_MIN, odd[u], s[u], m[u]);                                            \
                }                                                                                             \
                FMA_ROWS(R, even, i)                                                                          \
                FMA_ROWS(R, odd, i + 1)                                                                       \
            }                                                                                                 \
        }                                                                                                     \
        TILE_EPILOGUE(R)                                                                                      \
    }

#define FOR_EACH_ROWS(X) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8)
#define F32_TILE(R) DEFINE_FLOAT_TILE(f32, R, float, pv_f32)
#define F16_TILE(R) DEFINE_FLOAT_TILE(f16, R, uint16_t, pv_f16)
#define BF16_TILE(R) DEFINE_FLOAT_TILE(bf16, R, uint16_t, pv_bf16)
FOR_EACH_ROWS(F32_TILE)
FOR_EACH_ROWS(F16_TILE)
FOR_EACH_ROWS(BF16_TILE)
#define Q8_TILE(R) DEFINE_Q8_TILE(q8, R, 0)
#define Q8M_TILE(R) DEFINE_Q8_TILE(q8m, R, 1)
#define Q4_TILE(R) DEFINE_Q4_TILE(q4, R, 0)
#define Q4M_TILE(R) DEFINE_Q4_TILE(q4m, R, 1)
FOR_EACH_ROWS(Q8_TILE)
FOR_EACH_ROWS(Q8M_TILE)
FOR_EACH_ROWS(Q4_TILE)
FOR_EACH_ROWS(Q4M_TILE)

typedef void (*tile_fn)(const float *, int64_t, const struct packed_weight *, int64_t, int64_t, float *);
#define TILE_TABLE(NAME) {NAME##_1, NAME##_2, NAME##_3, NAME##_4, NAME##_5, NAME##_6, NAME##_7, NAME##_8}
static const tile_fn TILES[7][8] = {TILE_TABLE(f32), TILE_TABLE(f16),  TILE_TABLE(bf16), TILE_TABLE(q8),
                                    TILE_TABLE(q8m), TILE_TABLE(q4), TILE_TABLE(q4m)};

static const tile_fn *tiles_for(const struct packed_weight *w) {
    return TILES[w->format < FMT_Q8 ? w->format : FMT_Q8 + 2 * (w->format - FMT_Q8) + (w->has_min != 0)];
}

/* Writes rows row..row+rows of the tile into y (adds them to y when accumulate), for the unit's columns that
 * exist. Each element: y + (chain + bias), as torch's `y + linear(x)`. */
static void store(float *y, int64_t n, int64_t row, int rows, int64_t p, const float *tile, const float *bias,
                  int accumulate) {
    const int64_t col0 = p * PANEL, col1 = (p + UNIT) * PANEL < n ? (p + UNIT) * PANEL : n;
    for (int r = 0; r < rows; r++)
        for (int64_t col = col0; col < col1; col++) {
            const float v = tile[r * UNIT * PANEL + col - col0] + (bias ? bias[col] : 0.0f);
            float *o = y + (row + r) * n + col;
            *o = accumulate ? *o + v : v;
        }
}

/* Rows are taken in blocks that stay in cache while every unit passes over them. */
#define ROW_BLOCK 64

void gemm(const float *x, int64_t m, int64_t k, const struct packed_weight *w, int64_t n, const float *bias, float *y,
          int accumulate, int num_threads) {
    const int64_t units = ((n + PANEL - 1) / PANEL + UNIT - 1) / UNIT;
    const tile_fn *tiles = tiles_for(w);
#pragma omp parallel num_threads(num_threads)
    {
        float tile[MAX_ROWS * UNIT * PANEL];
        for (int64_t row0 = 0; row0 < m; row0 += ROW_BLOCK) {
            const int64_t row1 = row0 + ROW_BLOCK < m ? row0 + ROW_BLOCK : m;
#pragma omp for schedule(static)
            for (int64_t unit = 0; unit < units; unit++) {
                for (int64_t row = row0; row < row1;) {
                    const int rows = row1 - row < MAX_ROWS ? (int)(row1 - row) : MAX_ROWS;
                    tiles[rows - 1](x + row * k, k, w, unit * UNIT, k, tile);
                    store(y, n, row, rows, unit * UNIT, tile, bias, accumulate);
                    row += rows;
                }
            }
        }
    }
}

/* One weight of column `col` at k index i, dequantized as the tiles do it. */
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
        q = (float)(((i % 2) ? byte >> 4 : byte & 15) - w->zero);
    }
    const int64_t at = (p * (k / w->group) + i / w->group) * PANEL + lane;
    const float v = q * w->scales[at];
    return w->has_min ? v + w->mins[at] : v;
}

/* out[r] = column ids[r] of the packed matrix (an embedding lookup in the lm_head's packed table). */
void gather_columns(const struct packed_weight *w, int64_t k, const int64_t *ids, int64_t count, float *out) {
    for (int64_t r = 0; r < count; r++)
        for (int64_t i = 0; i < k; i++) out[r * k + i] = weight_at(w, k, ids[r], i);
}
