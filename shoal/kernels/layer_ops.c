/* The element-wise parts of a decoder layer: RMSNorm (of rows, or of each q/k head), rotary embedding fused
 * with the KV-cache write, and SiLU(gate) * up. Each row is computed on its own in a fixed order, so a row's
 * result does not depend on the batch. */
#include <math.h>
#include <stdint.h>

#include "kernels.h"
#include "simd_math.h"

#define PARALLEL_MIN_FLOATS 65536 /* smaller inputs run on one thread: waking the others costs more */

/* out = weight * (x * 1 / sqrt(mean(x^2) + eps)), in that order of operations (as transformers). */
static void rms_norm_row(const float *xr, int64_t dim, const float *weight, float eps, float *o) {
    float total = 0.0f;
    int64_t d = 0;
#if defined(__AVX2__) && defined(__FMA__)
    __m256 acc = _mm256_setzero_ps();
    for (; d + 8 <= dim; d += 8) {
        const __m256 v = _mm256_loadu_ps(xr + d);
        acc = _mm256_fmadd_ps(v, v, acc);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, acc);
    for (int i = 0; i < 8; i++) total += lanes[i];
#endif
    for (; d < dim; d++) total += xr[d] * xr[d];
    const float inv = 1.0f / sqrtf(total / (float)dim + eps);
    for (d = 0; d < dim; d++) o[d] = weight[d] * (xr[d] * inv);
}

void rms_norm_body(const float *x, int64_t rows, int64_t dim, const float *weight, float eps, float *out) {
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; r++) rms_norm_row(x + r * dim, dim, weight, eps, out + r * dim);
}

void rms_norm_f32(const float *x, int64_t rows, int64_t dim, const float *weight, float eps, float *out,
                  int num_threads) {
#pragma omp parallel num_threads(num_threads) if (rows * dim >= PARALLEL_MIN_FLOATS)
    rms_norm_body(x, rows, dim, weight, eps, out);
}

/* Qwen3's q and k norms: RMSNorm of each q head (weight q_norm) and each k head (k_norm), in place. */
void head_norm_body(float *qkv, int64_t rows, int64_t num_heads, int64_t num_kv_heads, int64_t D,
                    const float *q_norm, const float *k_norm, float eps) {
    const int64_t stride = (num_heads + 2 * num_kv_heads) * D;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; r++)
        for (int64_t h = 0; h < num_heads + num_kv_heads; h++) {
            float *head = qkv + r * stride + h * D;
            rms_norm_row(head, D, h < num_heads ? q_norm : k_norm, eps, head);
        }
}

void head_norm_f32(float *qkv, int64_t rows, int64_t num_heads, int64_t num_kv_heads, int64_t D, const float *q_norm,
                   const float *k_norm, float eps, int num_threads) {
#pragma omp parallel num_threads(num_threads) if (rows * (num_heads + num_kv_heads) * D >= PARALLEL_MIN_FLOATS)
    head_norm_body(qkv, rows, num_heads, num_kv_heads, D, q_norm, k_norm, eps);
}

/* Rotates one head in place, Hugging Face's rotate-half convention: x * cos + rotate_half(x) * sin. */
static void rotate(float *x, const float *cos, const float *sin, int64_t D) {
    const int64_t half = D / 2;
    for (int64_t i = 0; i < half; i++) {
        const float a = x[i], b = x[i + half];
        x[i] = a * cos[i] + -b * sin[i];
        x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

/* D values into a cache row of the given element type (16-bit types rounded to nearest even). */
static void store_kv(void *cache, int64_t at, const float *src, int64_t D, int kv_type) {
    if (kv_type == KV_F32) {
        for (int64_t d = 0; d < D; d++) ((float *)cache)[at + d] = src[d];
    } else if (kv_type == KV_F16) {
        for (int64_t d = 0; d < D; d++) ((uint16_t *)cache)[at + d] = float_to_half(src[d]);
    } else {
        for (int64_t d = 0; d < D; d++) ((uint16_t *)cache)[at + d] = float_to_bf16(src[d]);
    }
}

/* qkv: [rows, (H + 2 * Hkv) * D] as the fused projection gives it. Rotates the q and k heads in place with
 * cos, sin [rows, D], then writes k and v to their slot (block * block_size + offset) in the caches
 * [blocks, Hkv, block_size, D]. */
void rope_store_body(float *qkv, int64_t rows, int64_t num_heads, int64_t num_kv_heads, int64_t D,
                     const float *cos, const float *sin, void *k_cache, void *v_cache, int kv_type,
                     const int64_t *slots, int64_t block_size) {
    const int64_t stride = (num_heads + 2 * num_kv_heads) * D;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        float *row = qkv + r * stride;
        const float *c = cos + r * D, *s = sin + r * D;
        for (int64_t h = 0; h < num_heads + num_kv_heads; h++) rotate(row + h * D, c, s, D);
        const int64_t block = slots[r] / block_size, offset = slots[r] % block_size;
        for (int64_t h = 0; h < num_kv_heads; h++) {
            const int64_t at = ((block * num_kv_heads + h) * block_size + offset) * D;
            store_kv(k_cache, at, row + (num_heads + h) * D, D, kv_type);
            store_kv(v_cache, at, row + (num_heads + num_kv_heads + h) * D, D, kv_type);
        }
    }
}

void rope_store_f32(float *qkv, int64_t rows, int64_t num_heads, int64_t num_kv_heads, int64_t D, const float *cos,
                    const float *sin, void *k_cache, void *v_cache, int kv_type, const int64_t *slots,
                    int64_t block_size, int num_threads) {
#pragma omp parallel num_threads(num_threads) if (rows * (num_heads + 2 * num_kv_heads) * D >= PARALLEL_MIN_FLOATS)
    rope_store_body(qkv, rows, num_heads, num_kv_heads, D, cos, sin, k_cache, v_cache, kv_type, slots, block_size);
}

/* out[i] = gate[i] / (1 + e^-gate[i]) * up[i]. */
static void silu_mul_row(const float *g, const float *u, int64_t inter, float *o) {
    int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
    const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
    for (; i + 8 <= inter; i += 8) {
        const __m256 x = _mm256_loadu_ps(g + i);
        const __m256 silu = _mm256_div_ps(x, _mm256_add_ps(one, exp8(_mm256_sub_ps(zero, x))));
        _mm256_storeu_ps(o + i, _mm256_mul_ps(silu, _mm256_loadu_ps(u + i)));
    }
#endif
    for (; i < inter; i++) o[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

/* out[i] = gelu(gate[i]) * up[i], GELU's tanh form (Gemma's GeGLU):
 * 0.5 * g * (1 + tanh(sqrt(2 / pi) * (g + 0.044715 * g^3))), tanh(y) taken as 1 - 2 / (e^(2y) + 1). */
static void gelu_tanh_mul_row(const float *g, const float *u, int64_t inter, float *o) {
    const float c = 0.7978845608028654f, a = 0.044715f;
    int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
    const __m256 one = _mm256_set1_ps(1.0f), two = _mm256_set1_ps(2.0f), half = _mm256_set1_ps(0.5f);
    const __m256 vc = _mm256_set1_ps(c), va = _mm256_set1_ps(a);
    for (; i + 8 <= inter; i += 8) {
        const __m256 x = _mm256_loadu_ps(g + i);
        const __m256 cube = _mm256_mul_ps(x, _mm256_mul_ps(x, x));
        const __m256 inner = _mm256_mul_ps(vc, _mm256_add_ps(x, _mm256_mul_ps(va, cube)));
        const __m256 e = exp8(_mm256_mul_ps(two, inner));
        const __m256 tanh = _mm256_sub_ps(one, _mm256_div_ps(two, _mm256_add_ps(e, one)));
        const __m256 gelu = _mm256_mul_ps(_mm256_mul_ps(half, x), _mm256_add_ps(one, tanh));
        _mm256_storeu_ps(o + i, _mm256_mul_ps(gelu, _mm256_loadu_ps(u + i)));
    }
#endif
    for (; i < inter; i++) {
        const float x = g[i], inner = c * (x + a * (x * (x * x)));
        const float tanh = 1.0f - 2.0f / (expf(2.0f * inner) + 1.0f);
        o[i] = 0.5f * x * (1.0f + tanh) * u[i];
    }
}

/* gate_up: [rows, 2 * inter] (gate, then up); out: [rows, inter] = act(gate) * up. */
void gated_mul_body(const float *gate_up, int64_t rows, int64_t inter, int activation, float *out) {
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *g = gate_up + r * 2 * inter;
        if (activation == ACT_GELU_TANH)
            gelu_tanh_mul_row(g, g + inter, inter, out + r * inter);
        else
            silu_mul_row(g, g + inter, inter, out + r * inter);
    }
}

void gated_mul_f32(const float *gate_up, int64_t rows, int64_t inter, int activation, float *out, int num_threads) {
#pragma omp parallel num_threads(num_threads) if (rows * inter >= PARALLEL_MIN_FLOATS)
    gated_mul_body(gate_up, rows, inter, activation, out);
}
