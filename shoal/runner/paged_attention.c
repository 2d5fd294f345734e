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
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

/* q . k over head_dim, in a fixed order (four interleaved chains, then a fixed tree), the same for every row. */
static inline float dot(const float *q, const float *k, int64_t D) {
#if defined(__AVX2__) && defined(__FMA__)
    if (D % 32 == 0) {
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 32) {
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(k + d), a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d + 8), _mm256_loadu_ps(k + d + 8), a1);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d + 16), _mm256_loadu_ps(k + d + 16), a2);
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d + 24), _mm256_loadu_ps(k + d + 24), a3);
        }
        const __m256 a = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        h = _mm_add_ss(h, _mm_movehdup_ps(h));
        return _mm_cvtss_f32(h);
    }
#endif
    float acc = 0.0f;
    for (int64_t d = 0; d < D; d++) acc += q[d] * k[d];
    return acc;
}

/* out = sum_j p[j] * v_j over keys in ascending order, each output value its own chain. */
static void weighted_sum(const float *p, int64_t len, const float *v_cache, const int64_t *table, int64_t kvh,
                         int64_t num_kv_heads, int64_t block_size, int64_t D, float *out) {
#define V_ROW(j) (v_cache + ((table[(j) / block_size] * num_kv_heads + kvh) * block_size + (j) % block_size) * D)
#if defined(__AVX2__) && defined(__FMA__)
    if (D % 32 == 0) {
        for (int64_t d0 = 0; d0 < D; d0 += 32) {
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
            for (int64_t b = 0, j = 0; j < len; b++) {
                const float *v = v_cache + (table[b] * num_kv_heads + kvh) * block_size * D + d0;
                const int64_t end = j + block_size < len ? j + block_size : len;
                for (; j < end; j++, v += D) {
                    const __m256 w = _mm256_set1_ps(p[j]);
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
    for (int64_t j = 0; j < len; j++) {
        const float *v = V_ROW(j);
        for (int64_t d = 0; d < D; d++) out[d] += p[j] * v[d];
    }
#undef V_ROW
}

void paged_attention_f32(const float *q, const float *k_cache, const float *v_cache, float *out,
                         const int64_t *row_table_offset, const int64_t *tables, const int64_t *positions,
                         int64_t num_rows, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                         int64_t block_size, float scale, int num_threads) {
    const int64_t group = num_heads / num_kv_heads;
    const int64_t D = head_dim;
#pragma omp parallel for schedule(dynamic, 4) num_threads(num_threads)
    for (int64_t task = 0; task < num_rows * num_kv_heads; task++) {
        const int64_t row = task / num_kv_heads, kvh = task % num_kv_heads;
        const int64_t pos = positions[row];
        float *o = out + (row * num_heads + kvh * group) * D;
        if (pos < 0) {
            memset(o, 0, sizeof(float) * group * D);
            continue;
        }
        const int64_t len = pos + 1;
        const int64_t *table = tables + row_table_offset[row];
        const float *qh = q + (row * num_heads + kvh * group) * D;
        float *scores = malloc(sizeof(float) * group * len);
        for (int64_t b = 0, j = 0; j < len; b++) {
            const float *k = k_cache + (table[b] * num_kv_heads + kvh) * block_size * D;
            const int64_t end = j + block_size < len ? j + block_size : len;
            for (; j < end; j++, k += D)
                for (int64_t h = 0; h < group; h++) scores[h * len + j] = dot(qh + h * D, k, D) * scale;
        }
        for (int64_t h = 0; h < group; h++) {
            float *s = scores + h * len;
            float m = s[0];
            for (int64_t j = 1; j < len; j++) m = s[j] > m ? s[j] : m;
            float total = 0.0f;
            for (int64_t j = 0; j < len; j++) {
                s[j] = expf(s[j] - m);
                total += s[j];
            }
            const float inv = 1.0f / total;
            for (int64_t j = 0; j < len; j++) s[j] *= inv;
        }
        for (int64_t h = 0; h < group; h++) weighted_sum(scores + h * len, len, v_cache, table, kvh, num_kv_heads,
                                                        block_size, D, o + h * D);
        free(scores);
    }
}
