/* What the GEMMs (gemm.c, gemm_int8.c) share: a panel of 16 output columns as vectors of the build's
 * instruction set, the scales of a group as one such vector, and the macros that make tiles of rows x panels. */
#ifndef SHOAL_PANEL_H
#define SHOAL_PANEL_H
#include <math.h>
#include <stdint.h>
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
static inline pv pv_set1(float x) { return (pv){_mm512_set1_ps(x)}; }
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
/* lv: 64 bytes as 16 lanes of 4, column c's 4 bytes in lane c (q4-q6's [16][4] layouts). pv_field: the
 * value whose nibble is at bit `shift` of its lane and, with `bits` > 0, whose bits above it are at bit
 * `high_shift` of h's lane, less zero, as floats. */
typedef struct {
    __m512i v;
} lv;
static inline lv lv_load(const uint8_t *p) { return (lv){_mm512_loadu_si512(p)}; }
static inline pv pv_field(lv v, int shift, lv h, int high_shift, int bits, int zero) {
    __m512i q = _mm512_and_si512(_mm512_srli_epi32(v.v, shift), _mm512_set1_epi32(15));
    if (bits) {
        const __m512i above = high_shift >= 4 ? _mm512_srli_epi32(h.v, high_shift - 4) : _mm512_slli_epi32(h.v, 4 - high_shift);
        q = _mm512_or_si512(q, _mm512_and_si512(above, _mm512_set1_epi32(((1 << bits) - 1) << 4)));
    }
    return (pv){_mm512_cvtepi32_ps(_mm512_sub_epi32(q, _mm512_set1_epi32(zero)))};
}
typedef struct {
    __m512i v;
} hv;
static inline hv hv_load(const uint8_t *p) { return (hv){_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p))}; }
static inline pv pv_nibble(hv h, int shift) {
    return (pv){_mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(h.v, shift), _mm512_set1_epi32(15)))};
}
/* pv_q23: the value at k = 4t + j of q2 (q3) from its byte of 2-bit values and (q3) its byte of high bits h,
 * whose bit for that k is `at`. */
static inline pv pv_q23(hv low, int j, hv h, int at, int has_high, int zero) {
    __m512i v = _mm512_and_si512(_mm512_srli_epi32(low.v, 2 * j), _mm512_set1_epi32(3));
    if (has_high) v = _mm512_or_si512(v, _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(h.v, at), _mm512_set1_epi32(1)), 2));
    return (pv){_mm512_cvtepi32_ps(_mm512_sub_epi32(v, _mm512_set1_epi32(zero)))};
}
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define UNIT 1
#define FLOAT_ROWS 4
#define QUANT_ROWS 4 /* 3 read the weights twice at 4 rows; 4 measured 1.1-1.5x at 4-64 (Xeon, AVX2 build) */
typedef struct {
    __m256 a, b;
} pv;
static inline pv pv_zero(void) { return (pv){_mm256_setzero_ps(), _mm256_setzero_ps()}; }
static inline pv pv_set1(float x) { return (pv){_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
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
typedef struct {
    __m256i a, b;
} lv;
static inline lv lv_load(const uint8_t *p) {
    return (lv){_mm256_loadu_si256((const __m256i *)p), _mm256_loadu_si256((const __m256i *)(p + 32))};
}
static inline __m256 field8(__m256i v, int shift, __m256i h, int high_shift, int bits, int zero) {
    __m256i q = _mm256_and_si256(_mm256_srli_epi32(v, shift), _mm256_set1_epi32(15));
    if (bits) {
        const __m256i above = high_shift >= 4 ? _mm256_srli_epi32(h, high_shift - 4) : _mm256_slli_epi32(h, 4 - high_shift);
        q = _mm256_or_si256(q, _mm256_and_si256(above, _mm256_set1_epi32(((1 << bits) - 1) << 4)));
    }
    return _mm256_cvtepi32_ps(_mm256_sub_epi32(q, _mm256_set1_epi32(zero)));
}
static inline pv pv_field(lv v, int shift, lv h, int high_shift, int bits, int zero) {
    return (pv){field8(v.a, shift, h.a, high_shift, bits, zero), field8(v.b, shift, h.b, high_shift, bits, zero)};
}
typedef struct {
    __m256i a, b;
} hv;
static inline __m256i u8x8(const uint8_t *p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)); }
static inline hv hv_load(const uint8_t *p) { return (hv){u8x8(p), u8x8(p + 8)}; }
static inline __m256 nibble8(__m256i h, int shift) {
    return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(h, shift), _mm256_set1_epi32(15)));
}
static inline pv pv_nibble(hv h, int shift) { return (pv){nibble8(h.a, shift), nibble8(h.b, shift)}; }
static inline __m256 q23x8(__m256i low, int j, __m256i h, int at, int has_high, int zero) {
    __m256i v = _mm256_and_si256(_mm256_srli_epi32(low, 2 * j), _mm256_set1_epi32(3));
    if (has_high) v = _mm256_or_si256(v, _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(h, at), _mm256_set1_epi32(1)), 2));
    return _mm256_cvtepi32_ps(_mm256_sub_epi32(v, _mm256_set1_epi32(zero)));
}
static inline pv pv_q23(hv low, int j, hv h, int at, int has_high, int zero) {
    return (pv){q23x8(low.a, j, h.a, at, has_high, zero), q23x8(low.b, j, h.b, at, has_high, zero)};
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
static inline pv pv_set1(float x) {
    pv r;
    LANES r.v[l] = x;
    return r;
}
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
typedef struct {
    uint32_t v[PANEL];
} lv;
static inline lv lv_load(const uint8_t *p) {
    lv r;
    LANES r.v[l] = (uint32_t)p[4 * l] | (uint32_t)p[4 * l + 1] << 8 | (uint32_t)p[4 * l + 2] << 16 | (uint32_t)p[4 * l + 3] << 24;
    return r;
}
static inline pv pv_field(lv v, int shift, lv h, int high_shift, int bits, int zero) {
    pv r;
    LANES {
        const uint32_t above = bits ? ((h.v[l] >> high_shift) & ((1u << bits) - 1)) << 4 : 0;
        r.v[l] = (float)((int32_t)(((v.v[l] >> shift) & 15) | above) - zero);
    }
    return r;
}
typedef struct {
    uint8_t v[PANEL];
} hv;
static inline hv hv_load(const uint8_t *p) {
    hv r;
    memcpy(r.v, p, sizeof r.v);
    return r;
}
static inline pv pv_nibble(hv h, int shift) {
    pv r;
    LANES r.v[l] = (float)((h.v[l] >> shift) & 15);
    return r;
}
static inline pv pv_q23(hv low, int j, hv h, int at, int has_high, int zero) {
    pv r;
    LANES r.v[l] = (float)((((low.v[l] >> (2 * j)) & 3) | (has_high ? ((h.v[l] >> at) & 1) << 2 : 0)) - zero);
    return r;
}
#endif

/* The super-scale (offsets: the super-offset) vector of 16 columns at `at`, float16 (factored parts). */
static inline pv super_at(const struct packed_weight *w, int offsets, int64_t at) {
    return pv_f16((offsets ? w->super_mins : w->super_scales) + at);
}
/* The scale (offsets: the offset) vector of 16 columns at `at`: stored, in its precision, or made of its factors,
 * super * sub (one float32 product, as gguf computes it), the super-scale passed in (loaded once for the groups of
 * a superblock; other parts ignore it); with FACTORS_4BIT, each byte of `scales` holds a group's scale factor (low
 * nibble) and offset factor. */
static inline pv group_scale(const struct packed_weight *w, int offsets, int64_t at, pv super) {
    if (w->factored == FACTORS_4BIT) return pv_mul(super, pv_nibble(hv_load((const uint8_t *)w->scales + at), offsets ? 4 : 0));
    const void *base = offsets ? w->mins : w->scales;
    if (w->factored) return pv_mul(super, pv_q8((const int8_t *)base + at));
    return w->half_scales ? pv_f16((const uint16_t *)base + at) : pv_f32((const float *)base + at);
}
/* The groups of k that share a super-scale: a superblock's in factored parts, else one. */
static inline int64_t groups_per_super(const struct packed_weight *w) { return w->factored ? 256 / w->group : 1; }
/* Each panel's super-scale and super-offset for the superblock of group g0 (factored parts). */
#define LOAD_SUPERS(SUPERS, U, HAS_MIN, g0)                                                     \
    pv SUPERS[U][2];                                                                            \
    UNROLL for (int u = 0; u < U; u++) {                                                        \
        const int64_t super = ((p + u) * (k / 256) + (g0) * group / 256) * PANEL;               \
        SUPERS[u][0] = w->factored ? super_at(w, 0, super) : pv_zero();                         \
        SUPERS[u][1] = w->factored && HAS_MIN ? super_at(w, 1, super) : pv_zero();              \
    }

static inline float scale_value(const struct packed_weight *w, int offsets, int64_t col, int64_t i) {
    const int64_t p = col / PANEL, lane = col % PANEL, g = i / w->group;
    const int64_t at = (p * (w->k / w->group) + g) * PANEL + lane;
    const void *base = offsets ? w->mins : w->scales;
    if (w->factored) {
        const uint16_t *supers = offsets ? w->super_mins : w->super_scales;
        const float super = half_to_float(supers[(p * (w->k / 256) + g * w->group / 256) * PANEL + lane]);
        if (w->factored == FACTORS_4BIT) return super * (float)((((const uint8_t *)w->scales)[at] >> (offsets ? 4 : 0)) & 15);
        return super * (float)((const int8_t *)base)[at];
    }
    return w->half_scales ? half_to_float(((const uint16_t *)base)[at]) : ((const float *)base)[at];
}

/* The weights' bytes PREFETCH_AHEAD on in the stream a load reads, fetched into L2 ahead of use, by the tiles of 1
 * to 3 rows (the wide ones, bound by memory): the hardware prefetchers stop at page boundaries and lose some of a
 * tile's streams. Measured on Zen 4, one row from memory, 2 threads: int8 Q4_K expert matrices +5-15%, Q6_K
 * +8-22%, float32 +10-17%; in the tiles of many rows it cost ~3%. Changes no value. */
#ifndef PREFETCH_AHEAD
#define PREFETCH_AHEAD 2048
#endif
#if defined(__GNUC__)
#define PREFETCH(address) (PREFETCH_AHEAD ? __builtin_prefetch((const uint8_t *)(address) + PREFETCH_AHEAD, 0, 2) : (void)0)
#else
#define PREFETCH(address) ((void)(address))
#endif

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

/* Narrow tiles (UNIT panels, up to FLOAT_ROWS / QUANT_ROWS rows) for batches of 4 rows and more; wide tiles
 * (2 * UNIT panels, up to 3 rows) for fewer, where independent chains over more panels hide FMA latency. */
#define WIDE (2 * UNIT)
#define TILES_OF(X, NAME, ...)                                                                                   \
    X(NAME, 1, n, UNIT, __VA_ARGS__) X(NAME, 2, n, UNIT, __VA_ARGS__) X(NAME, 3, n, UNIT, __VA_ARGS__)           \
    X(NAME, 4, n, UNIT, __VA_ARGS__) X(NAME, 5, n, UNIT, __VA_ARGS__) X(NAME, 6, n, UNIT, __VA_ARGS__)           \
    X(NAME, 7, n, UNIT, __VA_ARGS__) X(NAME, 8, n, UNIT, __VA_ARGS__) X(NAME, 1, w, WIDE, __VA_ARGS__)           \
    X(NAME, 2, w, WIDE, __VA_ARGS__) X(NAME, 3, w, WIDE, __VA_ARGS__)
#define WIDE_ROWS 3
/* The tiles TILES_OF made for one format, by row count: narrow, then wide. */
#define NARROW_TABLE(N) {N##_1n, N##_2n, N##_3n, N##_4n, N##_5n, N##_6n, N##_7n, N##_8n}
#define WIDE_TABLE(N) {N##_1w, N##_2w, N##_3w}
#endif
