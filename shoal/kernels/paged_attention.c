/* Paged attention on CPU, one (query row, KV head) per task.
 *
 * Every row attends to keys 0..position in ascending order with sequential sums, so its result depends
 * only on its own query, keys and position: the same bits whether it is a decode row, part of a prefill
 * chunk, or recomputed after preemption, whatever else is in the batch and however many threads run.
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

/* Where key j's row of head kvh starts, in elements; the whole of j's block is B consecutive rows. */
static inline int64_t kv_row(const int64_t *table, int64_t kvh, int64_t num_kv_heads, int64_t B, int64_t D, int64_t j) {
    return ((table[j / B] * num_kv_heads + kvh) * B + j % B) * D;
}

/* Block b's rows of head kvh (the hardware prefetchers stop at its page's end), fetched into L2 a block
 * ahead of use. Changes no value. */
static inline void prefetch_block(const void *cache, int kv_type, const int64_t *table, int64_t b, int64_t kvh,
                                  int64_t num_kv_heads, int64_t B, int64_t D) {
    const uint8_t *start = (const uint8_t *)cache + kv_row(table, kvh, num_kv_heads, B, D, b * B) * kv_bytes(kv_type);
    for (size_t at = 0; at < B * D * kv_bytes(kv_type); at += 64) __builtin_prefetch(start + at, 0, 2);
}

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
/* 8 consecutive elements from i as float32, each cache type widened exactly in registers. */
static inline __m256 load8(const void *cache, int kv_type, int64_t i) {
    if (kv_type == KV_F32) return _mm256_loadu_ps((const float *)cache + i);
    const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)cache + i));
    if (kv_type == KV_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* Scores of 8 consecutive keys (rows from element `at`, stride D) against q: each key's dot product is one
 * FMA chain over head_dim in 8 lanes, then the same fixed tree of lane sums; lane j of the result is key j's
 * score. */
static inline __m256 dot8(const float *q, const void *cache, int kv_type, int64_t at, int64_t D) {
    __m256 a[8];
    for (int j = 0; j < 8; j++) a[j] = _mm256_mul_ps(_mm256_loadu_ps(q), load8(cache, kv_type, at + j * D));
    for (int64_t d = 8; d < D; d += 8) {
        const __m256 qd = _mm256_loadu_ps(q + d);
        for (int j = 0; j < 8; j++) a[j] = _mm256_fmadd_ps(qd, load8(cache, kv_type, at + j * D + d), a[j]);
    }
    const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

/* Keys 8 at a time from a multiple of 8, block by block (B a multiple of 8: a run of 8 never leaves its
 * block); the group's heads take each run in turn. A run may hold keys outside lo..hi-1 (those lanes are
 * dropped). */
static inline void scores_simd(const float *qh, int64_t group, const void *k_cache, int kv_type, const int64_t *table,
                               int64_t kvh, int64_t num_kv_heads, int64_t B, int64_t D, int64_t lo, int64_t hi,
                               float scale, float *scores) {
    const int64_t n = hi - lo;
    const __m256 s = _mm256_set1_ps(scale);
    float lanes[8];
    for (int64_t b = lo / B; b * B < hi; b++) {
        if ((b + 1) * B < hi) prefetch_block(k_cache, kv_type, table, b + 1, kvh, num_kv_heads, B, D);
        const int64_t first_key = b * B > lo - lo % 8 ? b * B : lo - lo % 8, end = (b + 1) * B < hi ? (b + 1) * B : hi;
        const int64_t block_at = kv_row(table, kvh, num_kv_heads, B, D, b * B);
        for (int64_t j = first_key; j < end; j += 8) {
            const int64_t first = j < lo ? lo - j : 0, last = hi - j < 8 ? hi - j : 8; /* lanes kept */
            for (int64_t h = 0; h < group; h++) {
                const __m256 v = _mm256_mul_ps(dot8(qh + h * D, k_cache, kv_type, block_at + (j - b * B) * D, D), s);
                if (first == 0 && last == 8) {
                    _mm256_storeu_ps(scores + h * n + j - lo, v);
                } else {
                    _mm256_storeu_ps(lanes, v);
                    memcpy(scores + h * n + j + first - lo, lanes + first, sizeof(float) * (last - first));
                }
            }
        }
    }
}

/* out[d0..d0 + 8 * C) of the weighted sum: C chains of 8 lanes, each over the keys in ascending order. */
#define WEIGHTED_CHUNK(C)                                                                                        \
    {                                                                                                            \
        __m256 a[C];                                                                                             \
        for (int c = 0; c < C; c++) a[c] = _mm256_setzero_ps();                                                  \
        for (int64_t b = lo / B; b * B < hi; b++) {                                                              \
            if (d0 == 0 && (b + 1) * B < hi) prefetch_block(v_cache, kv_type, table, b + 1, kvh, num_kv_heads, B, D); \
            const int64_t first_key = b * B > lo ? b * B : lo, end = (b + 1) * B < hi ? (b + 1) * B : hi;       \
            int64_t at = kv_row(table, kvh, num_kv_heads, B, D, first_key) + d0;                                 \
            for (int64_t j = first_key; j < end; j++, at += D) {                                                 \
                const __m256 w = _mm256_set1_ps(p[j - lo]);                                                      \
                for (int c = 0; c < C; c++) a[c] = _mm256_fmadd_ps(w, load8(v_cache, kv_type, at + 8 * c), a[c]); \
            }                                                                                                    \
        }                                                                                                        \
        for (int c = 0; c < C; c++) _mm256_storeu_ps(out + d0 + 8 * c, a[c]);                                   \
    }

/* out = sum of p[j - lo] * v_j over keys j = lo..hi-1 in ascending order, each output value its own chain:
 * 64 values at a time (8 chains in flight), then 32. */
static inline void weighted_sum_simd(const float *p, int64_t lo, int64_t hi, const void *v_cache, int kv_type,
                                     const int64_t *table, int64_t kvh, int64_t num_kv_heads, int64_t B, int64_t D,
                                     float *out) {
    int64_t d0 = 0;
    for (; d0 + 64 <= D; d0 += 64) WEIGHTED_CHUNK(8)
    for (; d0 < D; d0 += 32) WEIGHTED_CHUNK(4)
}
#undef WEIGHTED_CHUNK
#define SIMD_ATTENTION 1
#endif

/* scores[h * n + j - lo] = scale * q_h . k_j for the group's heads and keys j = lo..hi-1 (n = hi - lo), in
 * ascending key order: with AVX2, 8 keys a vector (D and B multiples of 8), else one sequential chain per
 * key. */
static void scores_for(const float *qh, int64_t group, const void *k_cache, int kv_type, const int64_t *table,
                       int64_t kvh, int64_t num_kv_heads, int64_t B, int64_t D, int64_t lo, int64_t hi, float scale,
                       float *scores) {
    const int64_t n = hi - lo;
#ifdef SIMD_ATTENTION
    if (D % 8 == 0 && B % 8 == 0) { /* kv_type a constant in each call: the loads specialise */
        if (kv_type == KV_F32) scores_simd(qh, group, k_cache, KV_F32, table, kvh, num_kv_heads, B, D, lo, hi, scale, scores);
        if (kv_type == KV_F16) scores_simd(qh, group, k_cache, KV_F16, table, kvh, num_kv_heads, B, D, lo, hi, scale, scores);
        if (kv_type == KV_BF16) scores_simd(qh, group, k_cache, KV_BF16, table, kvh, num_kv_heads, B, D, lo, hi, scale, scores);
        return;
    }
#endif
    for (int64_t j = lo; j < hi; j++)
        for (int64_t h = 0; h < group; h++) {
            const int64_t at = kv_row(table, kvh, num_kv_heads, B, D, j);
            float acc = 0.0f;
            for (int64_t d = 0; d < D; d++) acc += qh[h * D + d] * kv_at(k_cache, kv_type, at + d);
            scores[h * n + j - lo] = acc * scale;
        }
}

/* In place: s[0..len) -> softmax(s), with a fixed order of operations for a given len. */
static void softmax(float *s, int64_t len) {
    float m = s[0];
    for (int64_t j = 1; j < len; j++) m = s[j] > m ? s[j] : m;
    int64_t j = 0;
    float total = 0.0f;
#if defined(__AVX2__) && defined(__FMA__)
    const __m256 mv = _mm256_set1_ps(m);
    __m256 acc = _mm256_setzero_ps();
    for (; j + 8 <= len; j += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv));
        _mm256_storeu_ps(s + j, e);
        acc = _mm256_add_ps(acc, e);
    }
    float lanes[8];
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

/* out = sum of p[j - lo] * v_j over keys j = lo..hi-1 in ascending order, each output value its own chain. */
static void weighted_sum(const float *p, int64_t lo, int64_t hi, const void *v_cache, int kv_type, const int64_t *table,
                         int64_t kvh, int64_t num_kv_heads, int64_t B, int64_t D, float *out) {
#ifdef SIMD_ATTENTION
    if (D % 32 == 0) {
        if (kv_type == KV_F32) weighted_sum_simd(p, lo, hi, v_cache, KV_F32, table, kvh, num_kv_heads, B, D, out);
        if (kv_type == KV_F16) weighted_sum_simd(p, lo, hi, v_cache, KV_F16, table, kvh, num_kv_heads, B, D, out);
        if (kv_type == KV_BF16) weighted_sum_simd(p, lo, hi, v_cache, KV_BF16, table, kvh, num_kv_heads, B, D, out);
        return;
    }
#endif
    memset(out, 0, sizeof(float) * D);
    for (int64_t j = lo; j < hi; j++) {
        const int64_t at = kv_row(table, kvh, num_kv_heads, B, D, j);
        for (int64_t d = 0; d < D; d++) out[d] += p[j - lo] * kv_at(v_cache, kv_type, at + d);
    }
}

/* q: rows of q_stride floats whose first num_heads * head_dim are the query heads; out: [rows, heads, D].
 * window > 0: a row at position p sees only keys p - window + 1..p (sliding-window attention). A 16-bit
 * cache's values are widened to float32 as they are read (exactly), so every cache type takes the same
 * arithmetic. A task is a (row, KV head) and its group of query heads, whose keys and values it reads once;
 * with fewer such tasks than 4 per thread (a decode step of few rows) a task is one query head, so that
 * every thread has work. Each head's result is computed alone either way: the same bits. */
void attention_body(const float *q, int64_t q_stride, const void *k_cache, const void *v_cache, int kv_type,
                    float *out, const int64_t *row_table_offset, const int64_t *tables, const int64_t *positions,
                    int64_t num_rows, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                    int64_t block_size, int64_t window, float scale) {
    const int64_t group = num_heads / num_kv_heads, D = head_dim;
    const int few = num_rows * num_kv_heads < 4 * omp_get_num_threads();
    const int64_t heads = few ? 1 : group, tasks = num_rows * num_heads / heads; /* query heads a task takes */
#pragma omp for schedule(dynamic, few ? 1 : 4)
    for (int64_t task = 0; task < tasks; task++) {
        const int64_t row = task / (num_heads / heads), head = task % (num_heads / heads) * heads;
        const int64_t kvh = head / group, pos = positions[row];
        float *o = out + (row * num_heads + head) * D;
        if (pos < 0) {
            memset(o, 0, sizeof(float) * heads * D);
            continue;
        }
        const int64_t hi = pos + 1, lo = window > 0 && hi > window ? hi - window : 0, len = hi - lo;
        const int64_t *table = tables + row_table_offset[row];
        const float *qh = q + row * q_stride + head * D;
        float *scores = malloc(sizeof(float) * heads * len);
        scores_for(qh, heads, k_cache, kv_type, table, kvh, num_kv_heads, block_size, D, lo, hi, scale, scores);
        for (int64_t h = 0; h < heads; h++) softmax(scores + h * len, len);
        for (int64_t h = 0; h < heads; h++)
            weighted_sum(scores + h * len, lo, hi, v_cache, kv_type, table, kvh, num_kv_heads, block_size, D, o + h * D);
        free(scores);
    }
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
