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
        for (int64_t j = 0; j < len; j++) {
            const float *k = k_cache + ((table[j / block_size] * num_kv_heads + kvh) * block_size + j % block_size) * D;
            for (int64_t h = 0; h < group; h++) {
                const float *qv = qh + h * D;
                float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
                for (int64_t d = 0; d < D; d++) acc += qv[d] * k[d];
                scores[h * len + j] = acc * scale;
            }
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
        memset(o, 0, sizeof(float) * group * D);
        for (int64_t j = 0; j < len; j++) {
            const float *v = v_cache + ((table[j / block_size] * num_kv_heads + kvh) * block_size + j % block_size) * D;
            for (int64_t h = 0; h < group; h++) {
                const float p = scores[h * len + j];
                float *oh = o + h * D;
#pragma omp simd
                for (int64_t d = 0; d < D; d++) oh[d] += p * v[d];
            }
        }
        free(scores);
    }
}
