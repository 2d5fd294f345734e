/* y = x @ W^T (+ bias) on prepacked weights, where every output element is one FMA chain over k in
 * ascending order. So a row's result never depends on how many rows are computed with it, where it sits,
 * or how many threads run: batch-invariant by construction, for any M (no padding needed).
 *
 * Packed weights: panels of 16 output columns, [N/16][K][16], zero-padded past N. A thread takes panels
 * two at a time; every tile of rows runs the whole k range against them with its accumulators in registers.
 */
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#define PANEL 16

/* The panels a thread needs next, brought into cache one line at a time while it computes the current ones.
 * The lines are spread evenly over all of a pair's passes: fetching them in bursts was measured slower. */
struct prefetch {
    const char *next, *end;
    int every, countdown; /* one line every `every` k steps */
};

void pack_weight_f32(const float *w, int64_t n, int64_t k, float *packed) {
    const int64_t panels = (n + PANEL - 1) / PANEL;
    memset(packed, 0, sizeof(float) * panels * k * PANEL);
    for (int64_t col = 0; col < n; col++) {
        float *p = packed + (col / PANEL) * k * PANEL + col % PANEL;
        for (int64_t i = 0; i < k; i++) p[i * PANEL] = w[col * k + i];
    }
}

/* tile_RxP: R rows of x against P panels (b, then b + k * PANEL); out is [R][P * PANEL]. The accumulators
 * (2 * R * P vectors) stay in registers for the whole k range. */
#if defined(__AVX2__) && defined(__FMA__)
/* Fixed-count loops unrolled early, so GCC keeps the accumulator array in registers. */
#define UNROLL _Pragma("GCC unroll 16")
#define DEFINE_TILE(R, P)                                                                                        \
    static void tile_##R##x##P(const float *a, int64_t lda, const float *b, int64_t k, float *out,               \
                               struct prefetch *pf) {                                                            \
        __m256 c[R][2 * P];                                                                                      \
        const char *next = pf->next, *end = pf->end;                                                             \
        int countdown = pf->countdown;                                                                           \
        UNROLL for (int r = 0; r < R; r++) UNROLL for (int j = 0; j < 2 * P; j++) c[r][j] = _mm256_setzero_ps(); \
        for (int64_t i = 0; i < k; i++) {                                                                        \
            if (--countdown == 0) {                                                                              \
                countdown = pf->every;                                                                           \
                if (next < end) {                                                                                \
                    _mm_prefetch(next, _MM_HINT_T0);                                                             \
                    next += 64;                                                                                  \
                }                                                                                                \
            }                                                                                                    \
            UNROLL for (int r = 0; r < R; r++) {                                                                 \
                const __m256 x = _mm256_broadcast_ss(a + r * lda + i);                                           \
                UNROLL for (int p = 0; p < P; p++) {                                                             \
                    const float *bp = b + p * k * PANEL + i * PANEL;                                             \
                    c[r][2 * p] = _mm256_fmadd_ps(x, _mm256_loadu_ps(bp), c[r][2 * p]);                          \
                    c[r][2 * p + 1] = _mm256_fmadd_ps(x, _mm256_loadu_ps(bp + 8), c[r][2 * p + 1]);              \
                }                                                                                                \
            }                                                                                                    \
        }                                                                                                        \
        UNROLL for (int r = 0; r < R; r++) UNROLL for (int j = 0; j < 2 * P; j++)                                \
            _mm256_storeu_ps(out + r * P * PANEL + j * 8, c[r][j]);                                              \
        pf->next = next;                                                                                         \
        pf->countdown = countdown;                                                                               \
    }
#else
#define DEFINE_TILE(R, P)                                                                                 \
    static void tile_##R##x##P(const float *a, int64_t lda, const float *b, int64_t k, float *out,        \
                               struct prefetch *pf) {                                                     \
        (void)pf;                                                                                         \
        for (int r = 0; r < R; r++)                                                                       \
            for (int j = 0; j < P * PANEL; j++) {                                                         \
                const float *bp = b + (j / PANEL) * k * PANEL + j % PANEL;                                \
                float acc = 0.0f;                                                                         \
                for (int64_t i = 0; i < k; i++) acc = __builtin_fmaf(a[r * lda + i], bp[i * PANEL], acc); \
                out[r * P * PANEL + j] = acc;                                                             \
            }                                                                                             \
    }
#endif

DEFINE_TILE(6, 1)
DEFINE_TILE(4, 1)
DEFINE_TILE(3, 2)
DEFINE_TILE(2, 2)
DEFINE_TILE(1, 2)
DEFINE_TILE(1, 1)

typedef void (*tile_fn)(const float *, int64_t, const float *, int64_t, float *, struct prefetch *);

/* Writes rows row..row+rows of the tile into y (adds them to y when accumulate), for the columns of panels
 * p..p+panels that exist. */
static void store(float *y, int64_t n, int64_t row, int64_t rows, int64_t p, int panels, const float *tile,
                  const float *bias, int accumulate) {
    const int64_t col0 = p * PANEL, col1 = (p + panels) * PANEL < n ? (p + panels) * PANEL : n;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t col = col0; col < col1; col++) {
            const float v = tile[r * panels * PANEL + col - col0] + (bias ? bias[col] : 0.0f);
            float *out = y + (row + r) * n + col;
            *out = accumulate ? *out + v : v;
        }
}

/* Rows are taken in blocks that stay in cache while every panel passes over them. */
#define ROW_BLOCK 60
#define ROWS 6

/* Rows per tile, from how many rows are left: 6 while at least 6 remain, then 4, 3 + 2, or 3, 2, 1
 * (measured on a 2-core Zen 3: the two-panel tiles keep small remainders near memory speed). */
static int tile_rows(int64_t left) { return left >= 6 ? 6 : left == 5 ? 3 : (int)left; }

/* 6 and 4 rows take one panel at a time (two passes over k per pair); fewer rows take both panels at once. */
static int single_panel(int rows) { return rows == 6 || rows == 4; }

/* `rows` rows against panel p (and p + 1 when two). Single-panel tiles take the pair one panel at a time,
 * two-panel tiles both at once; the last odd panel runs row by row. */
static void run_tile(const float *x, int64_t k, const float *packed, int64_t n, int64_t p, int two, int64_t row,
                     int rows, const float *bias, float *y, int accumulate, struct prefetch *pf) {
    float tile[ROWS * 2 * PANEL];
    const float *b = packed + p * k * PANEL;
    const float *a = x + row * k;
    if (single_panel(rows)) {
        const tile_fn fn = rows == 6 ? tile_6x1 : tile_4x1;
        for (int q = 0; q <= two; q++) {
            fn(a, k, b + q * k * PANEL, k, tile, pf);
            store(y, n, row, rows, p + q, 1, tile, bias, accumulate);
        }
    } else if (!two) {
        for (int r = 0; r < rows; r++) {
            tile_1x1(a + r * k, k, b, k, tile, pf);
            store(y, n, row + r, 1, p, 1, tile, bias, accumulate);
        }
    } else {
        const tile_fn fn = rows == 3 ? tile_3x2 : rows == 2 ? tile_2x2 : tile_1x2;
        fn(a, k, b, k, tile, pf);
        store(y, n, row, rows, p, 2, tile, bias, accumulate);
    }
}

static void panel_pair(const float *x, int64_t row0, int64_t row1, int64_t k, const float *packed, int64_t n,
                       int64_t panels, int64_t p, const float *bias, float *y, int accumulate) {
    int passes = 0; /* over the k range: a single-panel tile makes two, one per panel */
    for (int64_t row = row0; row < row1;) {
        const int rows = tile_rows(row1 - row);
        passes += single_panel(rows) ? 2 : 1;
        row += rows;
    }
    /* A single pass streams at memory speed already: only several passes leave time to fetch ahead. */
    const int64_t next = p + 2 < panels ? p + 2 : panels, end = passes < 2 ? next : p + 4 < panels ? p + 4 : panels;
    /* 2k lines over passes * k steps, but at most one line every 2 steps (measured: faster still) */
    const int every = passes / 2 > 2 ? passes / 2 : 2;
    struct prefetch pf = {(const char *)(packed + next * k * PANEL), (const char *)(packed + end * k * PANEL),
                          every, every};
    for (int64_t row = row0; row < row1;) {
        const int rows = tile_rows(row1 - row);
        run_tile(x, k, packed, n, p, p + 1 < panels, row, rows, bias, y, accumulate, &pf);
        row += rows;
    }
}

/* accumulate: y += x @ W^T (+ bias), each element y + (its chain + bias), as torch's `y + linear(x)`. */
void gemm_f32(const float *x, int64_t m, int64_t k, const float *packed, int64_t n, const float *bias, float *y,
              int accumulate, int num_threads) {
    const int64_t panels = (n + PANEL - 1) / PANEL;
    const int64_t pairs = (panels + 1) / 2;
#pragma omp parallel num_threads(num_threads)
    for (int64_t row0 = 0; row0 < m; row0 += ROW_BLOCK) {
        const int64_t row1 = row0 + ROW_BLOCK < m ? row0 + ROW_BLOCK : m;
#pragma omp for schedule(static)
        for (int64_t pair = 0; pair < pairs; pair++)
            panel_pair(x, row0, row1, k, packed, n, panels, 2 * pair, bias, y, accumulate);
    }
}
