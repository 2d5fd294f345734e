/* Paged attention on CPU: a task is a KV head's query heads for one row, or for a block of a prefill's rows
 * that read each key and value once for all of them.
 *
 * Every query attends to keys 0..position in ascending order with the same chains of sums, whichever task
 * and tile computes it, so its result depends only on its own query, keys and position: the same bits whether
 * it is a decode row, part of a prefill chunk, or recomputed after preemption, whatever else is in the batch
 * and however many threads run.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "simd_math.h"

/* A cache's element `i` as float32 (exact for every type), for the portable path. */
static inline float kv_at(const void *cache, int kv_type, int64_t i) {
    if (kv_type == KV_F32) return ((const float *)cache)[i];
    const uint16_t h = ((const uint16_t *)cache)[i];
    return kv_type == KV_F16 ? half_to_float(h) : bf16_to_float(h);
}

static inline size_t kv_bytes(int kv_type) { return kv_type == KV_F32 ? 4 : 2; }

/* Where key j's row of head kvh starts, in elements, j in block b; the whole of a block is B consecutive rows. */
static inline int64_t kv_row_in(const int64_t *table, int64_t kvh, int64_t num_kv_heads, int64_t B, int64_t D,
                                int64_t b, int64_t j) {
    return ((table[b] * num_kv_heads + kvh) * B + j - b * B) * D;
}
static inline int64_t kv_row(const int64_t *table, int64_t kvh, int64_t num_kv_heads, int64_t B, int64_t D, int64_t j) {
    return kv_row_in(table, kvh, num_kv_heads, B, D, j / B, j);
}

/* Block b's rows of head kvh (the hardware prefetchers stop at its page's end), fetched into L2 a block
 * ahead of use. Changes no value. */
static inline void prefetch_block(const void *cache, int kv_type, const int64_t *table, int64_t b, int64_t kvh,
                                  int64_t num_kv_heads, int64_t B, int64_t D) {
    const uint8_t *start = (const uint8_t *)cache + kv_row(table, kvh, num_kv_heads, B, D, b * B) * kv_bytes(kv_type);
    for (size_t at = 0; at < B * D * kv_bytes(kv_type); at += 64) __builtin_prefetch(start + at, 0, 2);
}

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define SIMD_ATTENTION 1
/* 8 consecutive elements from i as float32, each cache type widened exactly in registers. */
static inline __m256 load8(const void *cache, int kv_type, int64_t i) {
    if (kv_type == KV_F32) return _mm256_loadu_ps((const float *)cache + i);
    const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)cache + i));
    if (kv_type == KV_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* The attention vector `av`: QV queries' 8 lanes side by side (AVX-512: 2 queries a vector, AVX2: 1), so
 * that each lane runs the same chain whichever build. SCORE_VECTORS query vectors x 4 keys are a score tile. */
#if defined(__AVX512F__)
typedef __m512 av;
#define QV 2
#define SCORE_VECTORS 4
#define WEIGHT_WIDTH 16
#define WEIGHT_CHUNK 4 /* vectors of d in a weighted-sum tile of 4 queries: 16 accumulators */
static inline av av_load(const float *p) { return _mm512_loadu_ps(p); }
static inline av av_mul(av a, av b) { return _mm512_mul_ps(a, b); }
static inline av av_fma(av a, av b, av c) { return _mm512_fmadd_ps(a, b, c); }
static inline av av_set1(float v) { return _mm512_set1_ps(v); }
static inline void av_store(float *p, av v) { _mm512_storeu_ps(p, v); }
static inline av key_both(const void *cache, int kv_type, int64_t i) { /* key's 8 elements in both halves */
    if (kv_type == KV_F32) return _mm512_broadcast_f32x8(_mm256_loadu_ps((const float *)cache + i));
    const __m256i h = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)((const uint16_t *)cache + i)));
    if (kv_type == KV_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
static inline av load16(const void *cache, int kv_type, int64_t i) {
    if (kv_type == KV_F32) return _mm512_loadu_ps((const float *)cache + i);
    const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)cache + i));
    if (kv_type == KV_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#define load_weighted load16
static inline av hadd(av a, av b) { /* per 128 bits: a0 + a1, a2 + a3, b0 + b1, b2 + b3 (as vhaddps) */
    return _mm512_add_ps(_mm512_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0)), _mm512_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1)));
}
/* h: per 128 bits, 4 keys' sums of lanes 0-3 then 4-7 of each query; the two added, scaled, stored. */
static inline void store_scores(av h, float scale, float *s0, float *s1) {
    const av sum = _mm512_mul_ps(_mm512_add_ps(h, _mm512_shuffle_f32x4(h, h, _MM_SHUFFLE(2, 3, 0, 1))), av_set1(scale));
    _mm_storeu_ps(s0, _mm512_castps512_ps128(sum));
    if (s1) _mm_storeu_ps(s1, _mm512_extractf32x4_ps(sum, 2));
}
#else
typedef __m256 av;
#define QV 1
/* 3 query vectors x 4 keys and 4 queries x 3 vectors of d: 12 chains of fused multiply-adds, enough to hide their
 * latency (2 x 4 and 4 x 2 had 8; Xeon, AVX2 build, 512 rows after 1,536 keys: 1.2-1.3x with the spans below) */
#define SCORE_VECTORS 3
#define WEIGHT_WIDTH 8
#define WEIGHT_CHUNK 3
static inline av av_load(const float *p) { return _mm256_loadu_ps(p); }
static inline av av_mul(av a, av b) { return _mm256_mul_ps(a, b); }
static inline av av_fma(av a, av b, av c) { return _mm256_fmadd_ps(a, b, c); }
static inline av av_set1(float v) { return _mm256_set1_ps(v); }
static inline void av_store(float *p, av v) { _mm256_storeu_ps(p, v); }
#define key_both load8
#define load_weighted load8
static inline av hadd(av a, av b) { return _mm256_hadd_ps(a, b); }
static inline void store_scores(av h, float scale, float *s0, float *s1) {
    (void)s1;
    const __m128 sum = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    _mm_storeu_ps(s0, _mm_mul_ps(sum, _mm_set1_ps(scale)));
}
#endif
#endif

/* In place: s[0..len) -> softmax(s), with a fixed order of operations for a given len. */
static void softmax(float *s, int64_t len) {
    float m = s[0];
    int64_t j = 0;
#if defined(__AVX2__) && defined(__FMA__)
    /* the max in 32 lanes (vmaxps(a, b) is a > b ? a : b, as below); exp(s - m) is the same for m = -0 or 0 */
    __m256 most[4] = {_mm256_set1_ps(m), _mm256_set1_ps(m), _mm256_set1_ps(m), _mm256_set1_ps(m)};
    for (; j + 32 <= len; j += 32)
        for (int t = 0; t < 4; t++) most[t] = _mm256_max_ps(_mm256_loadu_ps(s + j + 8 * t), most[t]);
    float lanes[8];
    for (int t = 0; t < 4; t++) {
        _mm256_storeu_ps(lanes, most[t]);
        for (int i = 0; i < 8; i++) m = lanes[i] > m ? lanes[i] : m;
    }
#endif
    for (; j < len; j++) m = s[j] > m ? s[j] : m;
    j = 0;
    float total = 0.0f;
#if defined(__AVX2__) && defined(__FMA__)
    const __m256 mv = _mm256_set1_ps(m);
    __m256 acc = _mm256_setzero_ps();
    for (; j + 8 <= len; j += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv));
        _mm256_storeu_ps(s + j, e);
        acc = _mm256_add_ps(acc, e);
    }
    _mm256_storeu_ps(lanes, acc);
    for (int i = 0; i < 8; i++) total += lanes[i];
#endif
    for (; j < len; j++) {
        s[j] = expf(s[j] - m);
        total += s[j];
    }
    const float inv = 1.0f / total;
    for (j = 0; j < len; j++) s[j] *= inv;
}

/* One KV head's cache, as a task reads it. */
struct kv_head {
    const void *k, *v;
    int type;
    const int64_t *table;
    int64_t kvh, num_kv_heads, B, D;
};

static inline int64_t key_at(const struct kv_head *kv, int64_t j) {
    return kv_row(kv->table, kv->kvh, kv->num_kv_heads, kv->B, kv->D, j);
}
static inline int64_t key_in(const struct kv_head *kv, int64_t b, int64_t j) {
    return kv_row_in(kv->table, kv->kvh, kv->num_kv_heads, kv->B, kv->D, b, j);
}

/* A task's queries: rows r0..r0 + nr - 1 (one sequence's consecutive positions, or one row) and query heads
 * h0..h0 + nh - 1 of one KV head, n = nr * nh; query i is row r0 + i / nh, head h0 + i % nh. Its score for key
 * j is kept at s[i * width + j - base], base a multiple of 8 at or below every query's first key. */
struct queries {
    const float *q;
    float *out;
    const int64_t *positions;
    int64_t q_stride, num_heads, r0, h0, nh, n, window, base, width;
    float *s;
};

static inline int64_t query_hi(const struct queries *t, int64_t i) { return t->positions[t->r0 + i / t->nh] + 1; }
static inline int64_t query_lo(const struct queries *t, int64_t i) {
    const int64_t hi = query_hi(t, i);
    return t->window > 0 && hi > t->window ? hi - t->window : 0;
}
static inline const float *query_of(const struct queries *t, int64_t i, int64_t D) {
    return t->q + (t->r0 + i / t->nh) * t->q_stride + (t->h0 + i % t->nh) * D;
}
static inline float *out_of(const struct queries *t, int64_t i, int64_t D) {
    return t->out + ((t->r0 + i / t->nh) * t->num_heads + t->h0 + i % t->nh) * D;
}
/* Query i's probabilities, indexed by key. */
static inline float *probs_of(const struct queries *t, int64_t i) { return t->s + i * t->width - t->base; }

/* Portable: each score one sequential chain over head_dim; each output value one chain of fused multiply-adds
 * over the keys, as the vectors' (the same bits whatever the path). */
static void scores_plain(const struct queries *t, const struct kv_head *kv, float scale) {
    for (int64_t i = 0; i < t->n; i++) {
        const float *q = query_of(t, i, kv->D);
        for (int64_t j = query_lo(t, i); j < query_hi(t, i); j++) {
            const int64_t at = key_at(kv, j);
            float acc = 0.0f;
            for (int64_t d = 0; d < kv->D; d++) acc += q[d] * kv_at(kv->k, kv->type, at + d);
            probs_of(t, i)[j] = acc * scale;
        }
    }
}

static void weighted_plain(const struct queries *t, const struct kv_head *kv) {
    for (int64_t i = 0; i < t->n; i++) {
        float *o = out_of(t, i, kv->D);
        const float *p = probs_of(t, i);
        memset(o, 0, sizeof(float) * kv->D);
        for (int64_t j = query_lo(t, i); j < query_hi(t, i); j++) {
            const int64_t at = key_at(kv, j);
            for (int64_t d = 0; d < kv->D; d++) o[d] = fmaf(p[j], kv_at(kv->v, kv->type, at + d), o[d]);
        }
    }
}

#ifdef SIMD_ATTENTION
/* Scores of NV query vectors (packed: qp[v][D / 8][8 * QV]) x 4 keys from element `at` (stride D), as
 * 8-lane chains over head_dim, then each key's lanes summed in the tree of vhaddps: ((l0 + l1) + (l2 + l3)) +
 * ((l4 + l5) + (l6 + l7)). s: query q0's scores of the 4 keys; the next query's a row (width) on. */
#define SCORE_TILE(NV)                                                                                           \
    static inline void score_tile_##NV(const float *qp, const void *cache, int kv_type, int64_t at, int64_t D,  \
                                       float scale, float *s, int64_t width, int64_t queries) {                 \
        av a[NV][4];                                                                                             \
        for (int t = 0; t < 4; t++) {                                                                            \
            const av k = key_both(cache, kv_type, at + t * D);                                                   \
            for (int v = 0; v < NV; v++) a[v][t] = av_mul(av_load(qp + v * D * QV), k);                         \
        }                                                                                                        \
        for (int64_t d = 8; d < D; d += 8)                                                                       \
            for (int t = 0; t < 4; t++) {                                                                        \
                const av k = key_both(cache, kv_type, at + t * D + d);                                           \
                for (int v = 0; v < NV; v++) a[v][t] = av_fma(av_load(qp + (v * D + d) * QV), k, a[v][t]);      \
            }                                                                                                    \
        for (int v = 0; v < NV; v++) {                                                                           \
            const av h = hadd(hadd(a[v][0], a[v][1]), hadd(a[v][2], a[v][3]));                                   \
            store_scores(h, scale, s + v * QV * width, v * QV + 1 < queries ? s + (v * QV + 1) * width : NULL);  \
        }                                                                                                        \
    }
SCORE_TILE(1)
SCORE_TILE(2)
SCORE_TILE(3)
SCORE_TILE(4)

/* One query vector x 8 keys: the same chains and tree (a decode row's heads one by one: more keys a tile). */
static inline void score_tile_8keys(const float *qp, const void *cache, int kv_type, int64_t at, int64_t D,
                                    float scale, float *s, int64_t width, int64_t queries) {
    av a[8];
    for (int t = 0; t < 8; t++) a[t] = av_mul(av_load(qp), key_both(cache, kv_type, at + t * D));
    for (int64_t d = 8; d < D; d += 8) {
        const av q = av_load(qp + d * QV);
        for (int t = 0; t < 8; t++) a[t] = av_fma(q, key_both(cache, kv_type, at + t * D + d), a[t]);
    }
    for (int t = 0; t < 8; t += 4)
        store_scores(hadd(hadd(a[t], a[t + 1]), hadd(a[t + 2], a[t + 3])), scale, s + t, queries > 1 ? s + width + t : NULL);
}

/* nv (at most SCORE_VECTORS) vectors' tile, the 8-key one where they are all the task's (`only`);
 * kv_type a constant in each call, so that the loads specialise. */
__attribute__((always_inline)) static inline void score_tiles(int only, int64_t nv, const float *qp,
                                                              const void *cache, int kv_type, int64_t at, int64_t D,
                                                              float scale, float *s, int64_t width, int64_t queries) {
    if (only) score_tile_8keys(qp, cache, kv_type, at, D, scale, s, width, queries);
    else if (nv == 1) score_tile_1(qp, cache, kv_type, at, D, scale, s, width, queries);
    else if (nv == 2) score_tile_2(qp, cache, kv_type, at, D, scale, s, width, queries);
    else if (nv == 3) score_tile_3(qp, cache, kv_type, at, D, scale, s, width, queries);
    else score_tile_4(qp, cache, kv_type, at, D, scale, s, width, queries);
}

/* Every query's scores for keys base..(its last key), 4 keys a tile, 8 for a single query vector (base a
 * multiple of 8 and B of 8: a tile never leaves its block); keys outside a query's range are computed too and
 * never read. */
static void scores_simd(const struct queries *t, const struct kv_head *kv, float scale) {
    const int64_t D = kv->D, vectors = (t->n + QV - 1) / QV, top = query_hi(t, t->n - 1);
    float *qp = malloc(sizeof(float) * vectors * QV * D); /* query pairs' 8 k side by side (AVX-512) */
    for (int64_t v = 0; v < vectors; v++)
        for (int64_t d = 0; d < D; d += 8)
            for (int h = 0; h < QV; h++) {
                float *to = qp + (v * D + d) * QV + 8 * h;
                if (v * QV + h < t->n) memcpy(to, query_of(t, v * QV + h, D) + d, sizeof(float) * 8);
                else memset(to, 0, sizeof(float) * 8);
            }
    for (int64_t b = t->base / kv->B; b * kv->B < top; b++) {
        if ((b + 1) * kv->B < top) prefetch_block(kv->k, kv->type, kv->table, b + 1, kv->kvh, kv->num_kv_heads, kv->B, D);
        const int64_t first = b * kv->B > t->base ? b * kv->B : t->base, end = (b + 1) * kv->B < top ? (b + 1) * kv->B : top;
        for (int64_t j = first; j < end; j += vectors == 1 ? 8 : 4) {
            const int64_t at = key_in(kv, b, j);
            for (int64_t v = 0; v < vectors; v += SCORE_VECTORS) {
                const int64_t nv = vectors - v < SCORE_VECTORS ? vectors - v : SCORE_VECTORS;
                float *s = t->s + v * QV * t->width + j - t->base;
                const float *q = qp + v * QV * D;
                const int64_t left = t->n - v * QV, only = vectors == 1;
                if (kv->type == KV_F32) score_tiles(only, nv, q, kv->k, KV_F32, at, D, scale, s, t->width, left);
                else if (kv->type == KV_F16) score_tiles(only, nv, q, kv->k, KV_F16, at, D, scale, s, t->width, left);
                else score_tiles(only, nv, q, kv->k, KV_BF16, at, D, scale, s, t->width, left);
            }
        }
    }
    free(qp);
}

/* o[i][d0..d0 + NW * WEIGHT_WIDTH) += p[i][j] * v_j over keys j = j0..j1-1 in ascending order for NQ queries
 * at once (each value its own chain, whatever the vector width). */
#define WEIGHT_TILE(NQ, NW) WEIGHT_TILE_(NQ, NW) /* NW expanded first */
#define WEIGHT_TILE_(NQ, NW)                                                                                     \
    static inline void weight_tile_##NQ##_##NW(float *const *o, const float *const *p, const struct kv_head *kv, \
                                               int kv_type, int64_t d0, int64_t j0, int64_t j1) {                \
        av a[NQ][NW];                                                                                            \
        for (int i = 0; i < NQ; i++)                                                                             \
            for (int w = 0; w < NW; w++) a[i][w] = av_load(o[i] + d0 + w * WEIGHT_WIDTH);                        \
        for (int64_t b = j0 / kv->B; b * kv->B < j1; b++) {                                                      \
            const int64_t first = b * kv->B > j0 ? b * kv->B : j0, end = (b + 1) * kv->B < j1 ? (b + 1) * kv->B : j1; \
            int64_t at = key_in(kv, b, first) + d0;                                                               \
            for (int64_t j = first; j < end; j++, at += kv->D) {                                                 \
                av v[NW];                                                                                        \
                for (int w = 0; w < NW; w++) v[w] = load_weighted(kv->v, kv_type, at + w * WEIGHT_WIDTH);         \
                for (int i = 0; i < NQ; i++) {                                                                   \
                    const av pj = av_set1(p[i][j]);                                                              \
                    for (int w = 0; w < NW; w++) a[i][w] = av_fma(pj, v[w], a[i][w]);                            \
                }                                                                                                \
            }                                                                                                    \
        }                                                                                                        \
        for (int i = 0; i < NQ; i++)                                                                             \
            for (int w = 0; w < NW; w++) av_store(o[i] + d0 + w * WEIGHT_WIDTH, a[i][w]);                        \
    }
#define WEIGHT_TILES(NQ) WEIGHT_TILE(NQ, WEIGHT_CHUNK) WEIGHT_TILE(NQ, 1)
WEIGHT_TILE(1, 8)
WEIGHT_TILES(1)
WEIGHT_TILES(2)
WEIGHT_TILES(3)
WEIGHT_TILES(4)
#define WEIGHT_QUERIES 4

/* Keys j0..j1-1 into nq (1-4) queries' outputs, all of head_dim: chunks of 8 vectors for a single query, of
 * WEIGHT_CHUNK, then one. */
static void weight_keys(float *const *o, const float *const *p, int64_t nq, const struct kv_head *kv, int64_t j0, int64_t j1) {
#define WEIGHT_CALL(NQ, NW, TYPE) WEIGHT_CALL_(NQ, NW, TYPE)
#define WEIGHT_CALL_(NQ, NW, TYPE) weight_tile_##NQ##_##NW(o, p, kv, TYPE, d0, j0, j1)
#define WEIGHT_BY_QUERIES(NW, TYPE)                                                                             \
    (nq == 1 ? WEIGHT_CALL(1, NW, TYPE) : nq == 2 ? WEIGHT_CALL(2, NW, TYPE) : nq == 3 ? WEIGHT_CALL(3, NW, TYPE) \
                                                                                    : WEIGHT_CALL(4, NW, TYPE))
    if (j0 >= j1) return;
    int64_t d0 = 0;
    for (; nq == 1 && d0 + 8 * WEIGHT_WIDTH <= kv->D; d0 += 8 * WEIGHT_WIDTH) {
        if (kv->type == KV_F32) WEIGHT_CALL(1, 8, KV_F32);
        else if (kv->type == KV_F16) WEIGHT_CALL(1, 8, KV_F16);
        else WEIGHT_CALL(1, 8, KV_BF16);
    }
    for (; d0 + WEIGHT_CHUNK * WEIGHT_WIDTH <= kv->D; d0 += WEIGHT_CHUNK * WEIGHT_WIDTH) {
        if (kv->type == KV_F32) WEIGHT_BY_QUERIES(WEIGHT_CHUNK, KV_F32);
        else if (kv->type == KV_F16) WEIGHT_BY_QUERIES(WEIGHT_CHUNK, KV_F16);
        else WEIGHT_BY_QUERIES(WEIGHT_CHUNK, KV_BF16);
    }
    for (; d0 < kv->D; d0 += WEIGHT_WIDTH) {
        if (kv->type == KV_F32) WEIGHT_BY_QUERIES(1, KV_F32);
        else if (kv->type == KV_F16) WEIGHT_BY_QUERIES(1, KV_F16);
        else WEIGHT_BY_QUERIES(1, KV_BF16);
    }
#undef WEIGHT_BY_QUERIES
#undef WEIGHT_CALL
#undef WEIGHT_CALL_
}

/* Keys a..b-1 clipped to the span j0..j1-1. */
static inline void weight_span(float *const *o, const float *const *p, int64_t nq, const struct kv_head *kv,
                               int64_t a, int64_t b, int64_t j0, int64_t j1) {
    weight_keys(o, p, nq, kv, a > j0 ? a : j0, b < j1 ? b : j1);
}

/* Spans of WEIGHT_SPAN keys, whose values stay in L1 while every query takes them; in a span, queries
 * WEIGHT_QUERIES at a time: the keys all of them see together, each query's own keys before and after alone.
 * Each output value still takes its keys in ascending order. */
#define WEIGHT_SPAN 64
static void weighted_simd(const struct queries *t, const struct kv_head *kv) {
    for (int64_t i = 0; i < t->n; i++) memset(out_of(t, i, kv->D), 0, sizeof(float) * kv->D);
    const int64_t top = query_hi(t, t->n - 1);
    for (int64_t j0 = t->base; j0 < top; j0 += WEIGHT_SPAN) {
        const int64_t j1 = j0 + WEIGHT_SPAN < top ? j0 + WEIGHT_SPAN : top;
        for (int64_t i0 = 0; i0 < t->n; i0 += WEIGHT_QUERIES) {
            const int64_t nq = t->n - i0 < WEIGHT_QUERIES ? t->n - i0 : WEIGHT_QUERIES;
            float *o[WEIGHT_QUERIES];
            const float *p[WEIGHT_QUERIES];
            int64_t lo = 0, hi = INT64_MAX;
            for (int64_t i = 0; i < nq; i++) {
                o[i] = out_of(t, i0 + i, kv->D), p[i] = probs_of(t, i0 + i);
                lo = query_lo(t, i0 + i) > lo ? query_lo(t, i0 + i) : lo;
                hi = query_hi(t, i0 + i) < hi ? query_hi(t, i0 + i) : hi;
            }
            if (lo >= hi) { /* nothing in common (a window shorter than the rows): each alone */
                for (int64_t i = 0; i < nq; i++) weight_span(o + i, p + i, 1, kv, query_lo(t, i0 + i), query_hi(t, i0 + i), j0, j1);
                continue;
            }
            for (int64_t i = 0; i < nq; i++) weight_span(o + i, p + i, 1, kv, query_lo(t, i0 + i), lo, j0, j1);
            weight_span(o, p, nq, kv, lo, hi, j0, j1);
            for (int64_t i = 0; i < nq; i++) weight_span(o + i, p + i, 1, kv, hi, query_hi(t, i0 + i), j0, j1);
        }
    }
}
#endif

/* Rows of a task: consecutive positions of one sequence, at most `most`; a padding row (position < 0) alone. */
static int64_t row_blocks(const int64_t *row_table_offset, const int64_t *positions, int64_t num_rows, int64_t most,
                          int64_t *starts) {
    int64_t n = 0;
    for (int64_t r = 0; r < num_rows; r++) {
        const int joins = n > 0 && r - starts[n - 1] < most && positions[r - 1] >= 0 &&
                          positions[r] == positions[r - 1] + 1 && row_table_offset[r] == row_table_offset[r - 1];
        if (!joins) starts[n++] = r;
    }
    starts[n] = num_rows;
    return n;
}

#define TASK_QUERIES 64 /* queries a task takes (its rows x the KV head's query heads), at most */

/* q: rows of q_stride floats whose first num_heads * head_dim are the query heads; out: [rows, heads, D].
 * window > 0: a row at position p sees only keys p - window + 1..p (sliding-window attention). A 16-bit
 * cache's values are widened to float32 as they are read (exactly), so every cache type takes the same
 * arithmetic. A task is a KV head's query heads for a block of a sequence's consecutive rows (a prefill: their
 * keys and values are read once for all), or for one row; with fewer tasks than 4 per thread (a decode step of
 * few rows) a task takes one query head, so that every thread has work. Each query's scores, softmax and
 * weighted sum are computed as if it were alone, in the same order: the same bits in any task. */
void attention_body(const float *q, int64_t q_stride, const void *k_cache, const void *v_cache, int kv_type,
                    float *out, const int64_t *row_table_offset, const int64_t *tables, const int64_t *positions,
                    int64_t num_rows, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                    int64_t block_size, int64_t window, float scale) {
    const int64_t group = num_heads / num_kv_heads, D = head_dim;
    int64_t *starts = malloc(sizeof(int64_t) * (num_rows + 1));
    const int64_t most = group < TASK_QUERIES ? TASK_QUERIES / group : 1;
    const int64_t blocks = row_blocks(row_table_offset, positions, num_rows, most, starts);
    const int few = blocks * num_kv_heads < 4 * omp_get_num_threads();
    const int64_t heads = few ? 1 : group, per_block = num_heads / heads; /* query heads a task takes */
#ifdef SIMD_ATTENTION
    const int simd_scores = D % 8 == 0 && block_size % 8 == 0, simd_weights = D % WEIGHT_WIDTH == 0;
#endif
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < blocks * per_block; task++) {
        const int64_t b = task / per_block, r0 = starts[b], nr = starts[b + 1] - r0, h0 = task % per_block * heads;
        struct queries t = {.q = q, .out = out, .positions = positions, .q_stride = q_stride, .num_heads = num_heads,
                            .r0 = r0, .h0 = h0, .nh = heads, .n = nr * heads, .window = window};
        if (positions[r0] < 0) {
            memset(out_of(&t, 0, D), 0, sizeof(float) * heads * D);
            continue;
        }
        const struct kv_head kv = {.k = k_cache, .v = v_cache, .type = kv_type, .table = tables + row_table_offset[r0],
                                   .kvh = h0 / group, .num_kv_heads = num_kv_heads, .B = block_size, .D = D};
        t.base = query_lo(&t, 0) - query_lo(&t, 0) % 8;
        t.width = (query_hi(&t, t.n - 1) - t.base + 7) / 8 * 8;
        t.s = malloc(sizeof(float) * t.n * t.width);
#ifdef SIMD_ATTENTION
        if (simd_scores) scores_simd(&t, &kv, scale);
        else
#endif
            scores_plain(&t, &kv, scale);
        for (int64_t i = 0; i < t.n; i++) softmax(probs_of(&t, i) + query_lo(&t, i), query_hi(&t, i) - query_lo(&t, i));
#ifdef SIMD_ATTENTION
        if (simd_weights) weighted_simd(&t, &kv);
        else
#endif
            weighted_plain(&t, &kv);
        free(t.s);
    }
    free(starts);
}

#define PARALLEL_MIN_TASKS 4 /* fewer (row, query head) pairs run on one thread */

void attention_f32(const float *q, int64_t q_stride, const void *k_cache, const void *v_cache, int kv_type,
                   float *out, const int64_t *row_table_offset, const int64_t *tables, const int64_t *positions,
                   int64_t num_rows, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                   int64_t window, float scale, int num_threads) {
#pragma omp parallel num_threads(num_threads) if (num_rows * num_heads >= PARALLEL_MIN_TASKS)
    attention_body(q, q_stride, k_cache, v_cache, kv_type, out, row_table_offset, tables, positions, num_rows,
                   num_heads, num_kv_heads, head_dim, block_size, window, scale);
}
