/* y = x @ W^T (+ bias) on prepacked weights, where every output element is one FMA chain over k in
 * ascending order. So a row's result never depends on how many rows are computed with it, where it sits,
 * or how many threads run: batch-invariant by construction, for any M (no padding needed).
 *
 * Packed weights: panels of 16 output columns, [N/16][K][16], zero-padded past N.
 */
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#define PANEL 16

void pack_weight_f32(const float *w, int64_t n, int64_t k, float *packed) {
    const int64_t panels = (n + PANEL - 1) / PANEL;
    memset(packed, 0, sizeof(float) * panels * k * PANEL);
    for (int64_t col = 0; col < n; col++) {
        float *p = packed + (col / PANEL) * k * PANEL + col % PANEL;
        for (int64_t i = 0; i < k; i++) p[i * PANEL] = w[col * k + i];
    }
}

#if defined(__AVX2__) && defined(__FMA__)
#define ROWS 6
static void tile6(const float *a, int64_t lda, const float *b, int64_t k, float out[ROWS][PANEL]) {
    __m256 c[ROWS][2];
    for (int r = 0; r < ROWS; r++) c[r][0] = c[r][1] = _mm256_setzero_ps();
    for (int64_t i = 0; i < k; i++) {
        const __m256 b0 = _mm256_loadu_ps(b + i * PANEL), b1 = _mm256_loadu_ps(b + i * PANEL + 8);
        for (int r = 0; r < ROWS; r++) {
            const __m256 x = _mm256_broadcast_ss(a + r * lda + i);
            c[r][0] = _mm256_fmadd_ps(x, b0, c[r][0]);
            c[r][1] = _mm256_fmadd_ps(x, b1, c[r][1]);
        }
    }
    for (int r = 0; r < ROWS; r++) {
        _mm256_storeu_ps(out[r], c[r][0]);
        _mm256_storeu_ps(out[r] + 8, c[r][1]);
    }
}

static void tile4(const float *a, int64_t lda, const float *b, int64_t k, float out[ROWS][PANEL]) {
    __m256 c[4][2];
    for (int r = 0; r < 4; r++) c[r][0] = c[r][1] = _mm256_setzero_ps();
    for (int64_t i = 0; i < k; i++) {
        const __m256 b0 = _mm256_loadu_ps(b + i * PANEL), b1 = _mm256_loadu_ps(b + i * PANEL + 8);
        for (int r = 0; r < 4; r++) {
            const __m256 x = _mm256_broadcast_ss(a + r * lda + i);
            c[r][0] = _mm256_fmadd_ps(x, b0, c[r][0]);
            c[r][1] = _mm256_fmadd_ps(x, b1, c[r][1]);
        }
    }
    for (int r = 0; r < 4; r++) {
        _mm256_storeu_ps(out[r], c[r][0]);
        _mm256_storeu_ps(out[r] + 8, c[r][1]);
    }
}

static void tile1(const float *a, const float *b, int64_t k, float out[PANEL]) {
    __m256 c0 = _mm256_setzero_ps(), c1 = _mm256_setzero_ps();
    for (int64_t i = 0; i < k; i++) {
        const __m256 x = _mm256_broadcast_ss(a + i);
        c0 = _mm256_fmadd_ps(x, _mm256_loadu_ps(b + i * PANEL), c0);
        c1 = _mm256_fmadd_ps(x, _mm256_loadu_ps(b + i * PANEL + 8), c1);
    }
    _mm256_storeu_ps(out, c0); _mm256_storeu_ps(out + 8, c1);
}

/* One row against two panels: four independent FMA chains instead of two. */
static void tile1x2(const float *a, const float *b, const float *b2, int64_t k, float out[PANEL], float out2[PANEL]) {
    __m256 c0 = _mm256_setzero_ps(), c1 = _mm256_setzero_ps(), c2 = _mm256_setzero_ps(), c3 = _mm256_setzero_ps();
    for (int64_t i = 0; i < k; i++) {
        const __m256 x = _mm256_broadcast_ss(a + i);
        c0 = _mm256_fmadd_ps(x, _mm256_loadu_ps(b + i * PANEL), c0);
        c1 = _mm256_fmadd_ps(x, _mm256_loadu_ps(b + i * PANEL + 8), c1);
        c2 = _mm256_fmadd_ps(x, _mm256_loadu_ps(b2 + i * PANEL), c2);
        c3 = _mm256_fmadd_ps(x, _mm256_loadu_ps(b2 + i * PANEL + 8), c3);
    }
    _mm256_storeu_ps(out, c0); _mm256_storeu_ps(out + 8, c1);
    _mm256_storeu_ps(out2, c2); _mm256_storeu_ps(out2 + 8, c3);
}
#else
static void tile1(const float *a, const float *b, int64_t k, float out[PANEL]) {
    for (int j = 0; j < PANEL; j++) out[j] = 0.0f;
    for (int64_t i = 0; i < k; i++)
        for (int j = 0; j < PANEL; j++) out[j] = __builtin_fmaf(a[i], b[i * PANEL + j], out[j]);
}

#define ROWS 6
static void tile6(const float *a, int64_t lda, const float *b, int64_t k, float out[ROWS][PANEL]) {
    for (int r = 0; r < ROWS; r++) tile1(a + r * lda, b, k, out[r]);
}

static void tile4(const float *a, int64_t lda, const float *b, int64_t k, float out[ROWS][PANEL]) {
    for (int r = 0; r < 4; r++) tile1(a + r * lda, b, k, out[r]);
}

static void tile1x2(const float *a, const float *b, const float *b2, int64_t k, float out[PANEL], float out2[PANEL]) {
    tile1(a, b, k, out);
    tile1(a, b2, k, out2);
}
#endif

static void store(float *y, int64_t ldy, int64_t n, int64_t col0, const float *tile, const float *bias) {
    const int64_t cols = n - col0 < PANEL ? n - col0 : PANEL;
    for (int64_t j = 0; j < cols; j++) y[j] = tile[j] + (bias ? bias[col0 + j] : 0.0f);
    (void)ldy;
}

/* Rows are taken in blocks that stay in cache while every panel passes over them. */
#define ROW_BLOCK 60

static void panel_pair(const float *x, int64_t row0, int64_t row1, int64_t k, const float *packed, int64_t n,
                       int64_t panels, int64_t p, const float *bias, float *y) {
    const float *b = packed + p * k * PANEL;
    const int two = p + 1 < panels;
    const float *b2 = b + k * PANEL;
    float tile[ROWS][PANEL], tile2[PANEL];
    int64_t row = row0;
    for (; row + ROWS <= row1; row += ROWS) {
        for (int q = 0; q <= two; q++) {
            tile6(x + row * k, k, q ? b2 : b, k, tile);
            for (int r = 0; r < ROWS; r++) store(y + (row + r) * n + (p + q) * PANEL, n, n, (p + q) * PANEL, tile[r], bias);
        }
    }
    if (row + 4 <= row1) {
        for (int q = 0; q <= two; q++) {
            tile4(x + row * k, k, q ? b2 : b, k, tile);
            for (int r = 0; r < 4; r++) store(y + (row + r) * n + (p + q) * PANEL, n, n, (p + q) * PANEL, tile[r], bias);
        }
        row += 4;
    }
    for (; row < row1; row++) {
        if (two) {
            tile1x2(x + row * k, b, b2, k, tile[0], tile2);
            store(y + row * n + (p + 1) * PANEL, n, n, (p + 1) * PANEL, tile2, bias);
        } else {
            tile1(x + row * k, b, k, tile[0]);
        }
        store(y + row * n + p * PANEL, n, n, p * PANEL, tile[0], bias);
    }
}

void gemm_f32(const float *x, int64_t m, int64_t k, const float *packed, int64_t n, const float *bias, float *y,
              int num_threads) {
    const int64_t panels = (n + PANEL - 1) / PANEL;
    const int64_t pairs = (panels + 1) / 2;
#pragma omp parallel num_threads(num_threads)
    for (int64_t row0 = 0; row0 < m; row0 += ROW_BLOCK) {
        const int64_t row1 = row0 + ROW_BLOCK < m ? row0 + ROW_BLOCK : m;
#pragma omp for schedule(static)
        for (int64_t pair = 0; pair < pairs; pair++) panel_pair(x, row0, row1, k, packed, n, panels, 2 * pair, bias, y);
    }
}
