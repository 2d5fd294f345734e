/* Paged attention on CPU, one (query row, KV head) per task.
 *
 * Every row attends to keys 0..position in ascending order with sequential sums, so its result depends
 * only on its own query, keys and position: the same bits whether it is a decode row, part of a prefill
 * chunk, or recomputed after preemption, whatever else is in the batch and however many threads run.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "simd_math.h"

#if defined(__AVX2__) && defined(__FMA__)
/* Scores of 8 consecutive keys (stride D) against q: each key's dot product is one FMA chain over head_dim
 * in 8 lanes, then the same fixed tree of lane sums; lane j of the result is key j's score. */
static inline __m256 dot8(const float *q, const float *k, int64_t D) {
    __m256 a[8];
    for (int j = 0; j < 8; j++) a[j] = _mm256_mul_ps(_mm256_loadu_ps(q), _mm256_loadu_ps(k + j * D));
    for (int64_t d = 8; d < D; d += 8) {
        const __m256 qd = _mm256_loadu_ps(q + d);
        for (int j = 0; j < 8; j++) a[j] = _mm256_fmadd_ps(qd, _mm256_loadu_ps(k + j * D + d), a[j]);
    }
    const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

#endif

/* q . k over head_dim, one sequential chain (the portable path). */
static inline float dot(const float *q, const float *k, int64_t D) {
    float acc = 0.0f;
    for (int64_t d = 0; d < D; d++) acc += q[d] * k[d];
    return acc;
}

/* scores[h * n + j - lo] = scale * q_h . k_j for the group's heads and keys j = lo..hi-1 (n = hi - lo), in
 * ascending key order. Keys go 8 at a time from a multiple of 8 when blocks hold a multiple of 8; a group may
 * read keys outside the range inside its block (those lanes are dropped). */
static void scores_for(const float *qh, int64_t group, const float *k_cache, const int64_t *table, int64_t kvh,
                       int64_t num_kv_heads, int64_t block_size, int64_t D, int64_t lo, int64_t hi, float scale,
                       float *scores) {
    const int64_t n = hi - lo;
#define K_ROW(j) (k_cache + ((table[(j) / block_size] * num_kv_heads + kvh) * block_size + (j) % block_size) * D)
#if defined(__AVX2__) && defined(__FMA__)
    if (D % 8 == 0 && block_size % 8 == 0) {
        const __m256 s = _mm256_set1_ps(scale);
        float lanes[8];
        for (int64_t j = lo - lo % 8; j < hi; j += 8) {
            const int64_t first = j < lo ? lo - j : 0, last = hi - j < 8 ? hi - j : 8; /* lanes kept */
            for (int64_t h = 0; h < group; h++) {
                const __m256 v = _mm256_mul_ps(dot8(qh + h * D, K_ROW(j), D), s);
                if (first == 0 && last == 8) {
                    _mm256_storeu_ps(scores + h * n + j - lo, v);
                } else {
                    _mm256_storeu_ps(lanes, v);
                    memcpy(scores + h * n + j + first - lo, lanes + first, sizeof(float) * (last - first));
                }
            }
        }
        return;
    }
#endif
    for (int64_t j = lo; j < hi; j++)
        for (int64_t h = 0; h < group; h++) scores[h * n + j - lo] = dot(qh + h * D, K_ROW(j), D) * scale;
#undef K_ROW
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
static void weighted_sum(const float *p, int64_t lo, int64_t hi, const float *v_cache, const int64_t *table,
                         int64_t kvh, int64_t num_kv_heads, int64_t block_size, int64_t D, float *out) {
#define V_ROW(j) (v_cache + ((table[(j) / block_size] * num_kv_heads + kvh) * block_size + (j) % block_size) * D)
#if defined(__AVX2__) && defined(__FMA__)
    if (D % 32 == 0) {
        for (int64_t d0 = 0; d0 < D; d0 += 32) {
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
            for (int64_t j = lo; j < hi;) {
                const float *v = V_ROW(j) + d0;
                const int64_t block_end = (j / block_size + 1) * block_size, end = block_end < hi ? block_end : hi;
                for (; j < end; j++, v += D) {
                    const __m256 w = _mm256_set1_ps(p[j - lo]);
                    a0 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v), a0);
                    a1 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 8), a1);
                    a2 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 16), a2);
                    a3 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 24), a3);
                }
            }
            _mm256_storeu_ps(out + d0, a0);
            _mm256_storeu_ps(out + d0 + 8, a1);
            _mm256_storeu_ps(out + d0 + 16, a2);
            _mm256_storeu_ps(out + d0 + 24, a3);
        }
        return;
    }
#endif
    memset(out, 0, sizeof(float) * D);
    for (int64_t j = lo; j < hi; j++) {
        const float *v = V_ROW(j);
        for (int64_t d = 0; d < D; d++) out[d] += p[j - lo] * v[d];
    }
#undef V_ROW
}

/* The KV of keys 0..hi-1 of one KV head, from a 16-bit cache into a float32 copy laid out as a cache of one
 * head with blocks 0, 1, ... (the table `identity`), so the float32 code reads it as it reads a float32 cache. */
static void widen_kv(const void *cache, int kv_type, const int64_t *table, int64_t kvh, int64_t num_kv_heads,
                     int64_t block_size, int64_t D, int64_t hi, float *out) {
    const uint16_t *c = cache;
    for (int64_t j = 0; j < hi; j++) {
        const uint16_t *src = c + ((table[j / block_size] * num_kv_heads + kvh) * block_size + j % block_size) * D;
        float *dst = out + j * D;
        if (kv_type == KV_F16)
            for (int64_t d = 0; d < D; d++) dst[d] = half_to_float(src[d]);
        else
            for (int64_t d = 0; d < D; d++) dst[d] = bf16_to_float(src[d]);
    }
}

/* q: rows of q_stride floats whose first num_heads * head_dim are the query heads; out: [rows, heads, D].
 * window > 0: a row at position p sees only keys p - window + 1..p (sliding-window attention). A 16-bit
 * cache is widened to float32 first (exactly), so every cache type takes the same arithmetic. */
void attention_body(const float *q, int64_t q_stride, const void *k_cache, const void *v_cache, int kv_type,
                    float *out, const int64_t *row_table_offset, const int64_t *tables, const int64_t *positions,
                    int64_t num_rows, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                    int64_t block_size, int64_t window, float scale) {
    const int64_t group = num_heads / num_kv_heads;
    const int64_t D = head_dim;
#pragma omp for schedule(dynamic, 4)
    for (int64_t task = 0; task < num_rows * num_kv_heads; task++) {
        const int64_t row = task / num_kv_heads, kvh = task % num_kv_heads;
        const int64_t pos = positions[row];
        float *o = out + (row * num_heads + kvh * group) * D;
        if (pos < 0) {
            memset(o, 0, sizeof(float) * group * D);
            continue;
        }
        const int64_t hi = pos + 1, lo = window > 0 && hi > window ? hi - window : 0, len = hi - lo;
        const int64_t *table = tables + row_table_offset[row];
        const float *qh = q + row * q_stride + kvh * group * D;
        float *scores = malloc(sizeof(float) * group * len);
        const float *keys = k_cache, *values = v_cache;
        float *wide = NULL;
        int64_t *identity = NULL, heads = num_kv_heads, head = kvh;
        if (kv_type != KV_F32) {
            const int64_t blocks = (hi + block_size - 1) / block_size;
            wide = malloc(sizeof(float) * 2 * blocks * block_size * D);
            identity = malloc(sizeof(int64_t) * blocks);
            for (int64_t b = 0; b < blocks; b++) identity[b] = b;
            widen_kv(k_cache, kv_type, table, kvh, num_kv_heads, block_size, D, hi, wide);
            widen_kv(v_cache, kv_type, table, kvh, num_kv_heads, block_size, D, hi, wide + blocks * block_size * D);
            keys = wide, values = wide + blocks * block_size * D, table = identity, heads = 1, head = 0;
        }
        scores_for(qh, group, keys, table, head, heads, block_size, D, lo, hi, scale, scores);
        for (int64_t h = 0; h < group; h++) softmax(scores + h * len, len);
        for (int64_t h = 0; h < group; h++)
            weighted_sum(scores + h * len, lo, hi, values, table, head, heads, block_size, D, o + h * D);
        free(scores);
        free(wide);
        free(identity);
    }
}

#define PARALLEL_MIN_TASKS 4 /* fewer (row, KV head) tasks run on one thread */

void attention_f32(const float *q, int64_t q_stride, const void *k_cache, const void *v_cache, int kv_type,
                   float *out, const int64_t *row_table_offset, const int64_t *tables, const int64_t *positions,
                   int64_t num_rows, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                   int64_t window, float scale, int num_threads) {
#pragma omp parallel num_threads(num_threads) if (num_rows * num_kv_heads >= PARALLEL_MIN_TASKS)
    attention_body(q, q_stride, k_cache, v_cache, kv_type, out, row_table_offset, tables, positions, num_rows,
                   num_heads, num_kv_heads, head_dim, block_size, window, scale);
}
