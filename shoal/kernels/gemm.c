/* y = x @ W^T (+ bias) on weights packed in one of shoal's formats: float32, float16, bfloat16, or integer
 * quants (8 to 2 bits) with a scale s, and optionally an offset m, per group of k: w = s*q + m (float32, or
 * float16 where that holds them exactly).
 *
 * Float formats: every output element is one FMA chain over k in ascending order. Quant formats: for each
 * group in ascending order, the FMA chain of x * q over the group, then acc = s * that + acc and acc =
 * m * (sum of x over the group) + acc. Either way a fixed order per element, on values taken from registers,
 * so a row's result depends on nothing but that row: not on how many rows run with it, where it sits, how
 * many threads run, or which instruction set (AVX-512, AVX2 or portable C) this file was built for.
 *
 * Layout: output columns in panels of 16, [panels][...][16], the panel count padded to a multiple of 4. Per
 * panel, float formats hold [k][16] values; q8 holds [k][16] int8; q4 holds [k/8][16][4] bytes: of column c,
 * byte j's low nibble is k = 8t + j and its high nibble k = 8t + 4 + j (so that 64 bytes are two of the int8
 * path's [16 columns][4 k] blocks, and in float a column's 8 values are fields of one 32-bit lane). q5 and q6
 * hold q4's nibbles and, in `high`, the bits above them in the same [16][4] order: [k/32][16][4] bytes for q5
 * (bit s of byte j: k = 32t + 4s + j), [k/16][16][4] for q6 (bits 2s, 2s + 1: k = 16t + 4s + j); their value
 * is (nibble | high << 4) - zero, q4's nibble - zero: exact small integers made in registers.
 * q2 holds [k/4][16] bytes of four 2-bit values (bits 2j, 2j + 1 of byte t: k = 4t + j); q3 adds q5's plane
 * of one high bit: (q2 value | high << 2) - zero.
 * Scales and offsets: [panels][k / group][16].
 * Parts flagged int8_x run on x quantized to int8 instead (gemm_int8.c), with the same layouts.
 * A thread takes units of panels (two on AVX-512, one otherwise; twice that for 1-3 rows) and runs each tile
 * of rows over all of k.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "panel.h"

/* The tile of R rows (x rows a, a + lda, ...) against the U panels starting at panel p; out is
 * [R][U * PANEL]. One function per format so the inner loop holds no branch on it. Float formats: one
 * FMA chain over k per element. */
#define DEFINE_FLOAT_TILE(NAME, R, SUF, U, TYPE, LOAD)                                                       \
    static void NAME##_##R##SUF(const float *a, int64_t lda, const struct packed_weight *w, int64_t p, int64_t k, \
                           const float *xsum, float *out) {                                                  \
        (void)xsum;                                                                                          \
        ZEROS(c, R, U)                                                                                          \
        const TYPE *base = (const TYPE *)w->quants + p * k * PANEL;                                          \
        for (int64_t i = 0; i < k; i++) {                                                                    \
            pv wv[U];                                                                                        \
            if (U > UNIT && i % (64 / (sizeof(TYPE) * PANEL)) == 0) UNROLL for (int u = 0; u < U; u++) PREFETCH(base + (u * k + i) * PANEL); \
            UNROLL for (int u = 0; u < U; u++) wv[u] = LOAD(base + (u * k + i) * PANEL);                  \
            FMA_ROWS(c, R, U, wv, i)                                                                            \
        }                                                                                                    \
        TILE_EPILOGUE(R, U)                                                                                  \
    }

/* Quant formats, group by group: b = the FMA chain of x * q over the group (q as exact small floats), then
 * c = s * b + c and, with offsets, c = m * sum(x over the group) + c. The same chain of group sums in
 * ascending order for every element, whatever the tile. xsum: [R][groups], each row's group sums of x. */
#define GROUP_END(R, U, HAS_MIN)                                                                      \
    UNROLL for (int u = 0; u < U; u++) {                                                           \
        const int64_t at = ((p + u) * groups + g) * PANEL;                                            \
        const pv s = group_scale(w, 0, at, supers[u][0]);                                             \
        UNROLL for (int r = 0; r < R; r++) c[r][u] = pv_fmav(s, b[r][u], c[r][u]);                    \
        if (HAS_MIN) {                                                                                \
            const pv m = group_scale(w, 1, at, supers[u][1]);                                         \
            UNROLL for (int r = 0; r < R; r++) c[r][u] = pv_fma(xsum[r * groups + g], m, c[r][u]);    \
        }                                                                                             \
    }

#define DEFINE_Q8_TILE(NAME, R, SUF, U, HAS_MIN)                                                             \
    static void NAME##_##R##SUF(const float *a, int64_t lda, const struct packed_weight *w, int64_t p, int64_t k, \
                           const float *xsum, float *out) {                                                  \
        ZEROS(c, R, U)                                                                                          \
        const int64_t group = w->group, groups = k / group;                                                  \
        const int8_t *base = (const int8_t *)w->quants + p * k * PANEL;                                      \
        for (int64_t g0 = 0; g0 < groups; g0 += groups_per_super(w)) {                                      \
          LOAD_SUPERS(supers, U, HAS_MIN, g0)                                                                \
          for (int64_t g = g0; g < g0 + groups_per_super(w); g++) {                                         \
            ZEROS(b, R, U)                                                                                      \
            for (int64_t i = g * group; i < (g + 1) * group; i++) {                                          \
                pv q[U];                                                                                     \
                if (U > UNIT && i % 4 == 0) UNROLL for (int u = 0; u < U; u++) PREFETCH(base + (u * k + i) * PANEL);\
                UNROLL for (int u = 0; u < U; u++) q[u] = pv_q8(base + (u * k + i) * PANEL);              \
                FMA_ROWS(b, R, U, q, i)                                                                         \
            }                                                                                                \
            GROUP_END(R, U, HAS_MIN)                                                                            \
          }                                                                                                  \
        }                                                                                                    \
        TILE_EPILOGUE(R, U)                                                                                  \
    }

/* Where value e of a run of 8 k sits in its column's lane of q4's nibbles; where value e of a run of 4 * 8 / bits
 * sits in its lane of q5/q6's high bits. */
#define NIBBLE_AT(e) (8 * ((e) % 4) + 4 * ((e) / 4))
#define HIGH_AT(e, bits) (8 * ((e) % 4) + (bits) * ((e) / 4))

#define DEFINE_Q4_TILE(NAME, R, SUF, U, HAS_MIN)                                                             \
    static void NAME##_##R##SUF(const float *a, int64_t lda, const struct packed_weight *w, int64_t p, int64_t k, \
                           const float *xsum, float *out) {                                                  \
        ZEROS(c, R, U)                                                                                          \
        const int64_t group = w->group, groups = k / group, half = k / 2;                                    \
        const int zero = HAS_MIN ? 0 : w->zero; /* offsets or a zero, never both: 0 folds the subtraction away */ \
        const uint8_t *base = (const uint8_t *)w->quants + p * half * PANEL;                                 \
        for (int64_t g0 = 0; g0 < groups; g0 += groups_per_super(w)) {                                      \
          LOAD_SUPERS(supers, U, HAS_MIN, g0)                                                                \
          for (int64_t g = g0; g < g0 + groups_per_super(w); g++) {                                         \
            ZEROS(b, R, U)                                                                                      \
            for (int64_t i = g * group; i < (g + 1) * group; i += 8) {                                       \
                lv v[U];                                                                                     \
                if (U > UNIT) UNROLL for (int u = 0; u < U; u++) PREFETCH(base + (u * half + i / 2) * PANEL); \
                UNROLL for (int u = 0; u < U; u++) v[u] = lv_load(base + (u * half + i / 2) * PANEL);       \
                UNROLL for (int e = 0; e < 8; e++) {                                                         \
                    pv q[U];                                                                                 \
                    UNROLL for (int u = 0; u < U; u++) q[u] = pv_field(v[u], NIBBLE_AT(e), v[u], 0, 0, zero); \
                    FMA_ROWS(b, R, U, q, i + e)                                                                 \
                }                                                                                            \
            }                                                                                                \
            GROUP_END(R, U, HAS_MIN)                                                                            \
          }                                                                                                  \
        }                                                                                                    \
        TILE_EPILOGUE(R, U)                                                                                  \
    }

/* q5 and q6 (BITS): q4's nibbles, and the bits above them: 64 bytes for every 4 * PER values of k. */
#define DEFINE_QH_TILE(NAME, R, SUF, U, HAS_MIN, BITS)                                                       \
    static void NAME##_##R##SUF(const float *a, int64_t lda, const struct packed_weight *w, int64_t p, int64_t k, \
                           const float *xsum, float *out) {                                                  \
        ZEROS(c, R, U)                                                                                          \
        enum { HIGH = BITS - 4, PER = 8 / HIGH }; /* high bits per value, values per byte of them */         \
        const int64_t group = w->group, groups = k / group, half = k / 2, chunks = k / PER;                  \
        const int zero = HAS_MIN ? 0 : w->zero; /* offsets or a zero, never both: 0 folds the subtraction away */ \
        const uint8_t *base = (const uint8_t *)w->quants + p * half * PANEL;                                 \
        const uint8_t *highs = (const uint8_t *)w->high + p * chunks * PANEL;                                \
        for (int64_t g0 = 0; g0 < groups; g0 += groups_per_super(w)) {                                      \
          LOAD_SUPERS(supers, U, HAS_MIN, g0)                                                                \
          for (int64_t g = g0; g < g0 + groups_per_super(w); g++) {                                         \
            ZEROS(b, R, U)                                                                                      \
            for (int64_t i = g * group; i < (g + 1) * group; i += 4 * PER) {                                 \
                lv h[U];                                                                                     \
                if (U > UNIT) UNROLL for (int u = 0; u < U; u++) PREFETCH(highs + (u * chunks + i / PER) * PANEL); \
                UNROLL for (int u = 0; u < U; u++) h[u] = lv_load(highs + (u * chunks + i / PER) * PANEL);   \
                UNROLL for (int o = 0; o < 4 * PER; o += 8) {                                                \
                    lv v[U];                                                                                 \
                    if (U > UNIT) UNROLL for (int u = 0; u < U; u++) PREFETCH(base + (u * half + (i + o) / 2) * PANEL); \
                    UNROLL for (int u = 0; u < U; u++) v[u] = lv_load(base + (u * half + (i + o) / 2) * PANEL); \
                    UNROLL for (int e = 0; e < 8; e++) {                                                     \
                        pv q[U];                                                                             \
                        UNROLL for (int u = 0; u < U; u++)                                                   \
                            q[u] = pv_field(v[u], NIBBLE_AT(e), h[u], HIGH_AT(o + e, HIGH), HIGH, zero);      \
                        FMA_ROWS(b, R, U, q, i + o + e)                                                         \
                    }                                                                                        \
                }                                                                                            \
            }                                                                                                \
            GROUP_END(R, U, HAS_MIN)                                                                            \
          }                                                                                                  \
        }                                                                                                    \
        TILE_EPILOGUE(R, U)                                                                                  \
    }

/* q2 and q3 (BITS): a byte of four 2-bit values per column for every 4 values of k, and for q3 a byte of high
 * bits for every 8. */
#define DEFINE_Q23_TILE(NAME, R, SUF, U, HAS_MIN, BITS)                                                      \
    static void NAME##_##R##SUF(const float *a, int64_t lda, const struct packed_weight *w, int64_t p, int64_t k, \
                           const float *xsum, float *out) {                                                  \
        ZEROS(c, R, U)                                                                                       \
        const int64_t group = w->group, groups = k / group, quarter = k / 4, eighth = k / 8;                 \
        const int zero = HAS_MIN ? 0 : w->zero; /* offsets or a zero, never both: 0 folds the subtraction away */ \
        const uint8_t *base = (const uint8_t *)w->quants + p * quarter * PANEL;                              \
        const uint8_t *highs = (const uint8_t *)w->high + p * eighth * PANEL;                                \
        for (int64_t g0 = 0; g0 < groups; g0 += groups_per_super(w)) {                                      \
          LOAD_SUPERS(supers, U, HAS_MIN, g0)                                                                \
          for (int64_t g = g0; g < g0 + groups_per_super(w); g++) {                                         \
            ZEROS(b, R, U)                                                                                   \
            for (int64_t i = g * group; i < (g + 1) * group; i += 4) {                                       \
                hv low[U], high[U];                                                                          \
                if (U > UNIT && i % 16 == 0) UNROLL for (int u = 0; u < U; u++) {                           \
                    PREFETCH(base + (u * quarter + i / 4) * PANEL);                                          \
                    if (BITS == 3) PREFETCH(highs + (u * eighth + i / 8) * PANEL);                           \
                }                                                                                            \
                UNROLL for (int u = 0; u < U; u++) {                                                         \
                    low[u] = hv_load(base + (u * quarter + i / 4) * PANEL);                                  \
                    high[u] = BITS == 3 ? hv_load(highs + (u * eighth + i / 8) * PANEL) : low[u];            \
                }                                                                                            \
                UNROLL for (int j = 0; j < 4; j++) {                                                         \
                    pv v[U];                                                                                 \
                    UNROLL for (int u = 0; u < U; u++) v[u] = pv_q23(low[u], j, high[u], (int)(i % 8) + j, BITS == 3, zero); \
                    FMA_ROWS(b, R, U, v, i + j)                                                              \
                }                                                                                            \
            }                                                                                                \
            GROUP_END(R, U, HAS_MIN)                                                                         \
          }                                                                                                  \
        }                                                                                                    \
        TILE_EPILOGUE(R, U)                                                                                  \
    }

TILES_OF(DEFINE_FLOAT_TILE, f32, float, pv_f32)
TILES_OF(DEFINE_FLOAT_TILE, f16, uint16_t, pv_f16)
TILES_OF(DEFINE_FLOAT_TILE, bf16, uint16_t, pv_bf16)
TILES_OF(DEFINE_Q8_TILE, q8, 0)
TILES_OF(DEFINE_Q8_TILE, q8m, 1)
TILES_OF(DEFINE_Q4_TILE, q4, 0)
TILES_OF(DEFINE_Q4_TILE, q4m, 1)
TILES_OF(DEFINE_QH_TILE, q5, 0, 5)
TILES_OF(DEFINE_QH_TILE, q5m, 1, 5)
TILES_OF(DEFINE_QH_TILE, q6, 0, 6)
TILES_OF(DEFINE_QH_TILE, q6m, 1, 6)
TILES_OF(DEFINE_Q23_TILE, q2, 0, 2)
TILES_OF(DEFINE_Q23_TILE, q2m, 1, 2)
TILES_OF(DEFINE_Q23_TILE, q3, 0, 3)
TILES_OF(DEFINE_Q23_TILE, q3m, 1, 3)

typedef void (*tile_fn)(const float *, int64_t, const struct packed_weight *, int64_t, int64_t, const float *, float *);
#define ALL_FORMATS(T) \
    {T(f32), T(f16), T(bf16), T(q8), T(q8m), T(q4), T(q4m), T(q5), T(q5m), T(q6), T(q6m), T(q2), T(q2m), T(q3), T(q3m)}
static const tile_fn NARROW_TILES[15][8] = ALL_FORMATS(NARROW_TABLE);
static const tile_fn WIDE_TILES[15][3] = ALL_FORMATS(WIDE_TABLE);

static int format_index(const struct packed_weight *w) {
    return w->format < FMT_Q8 ? w->format : FMT_Q8 + 2 * (w->format - FMT_Q8) + (w->has_min != 0);
}

/* Writes rows row..row+rows of the tile into y (row stride ldy; adds them to y when accumulate), for the
 * columns of panels p..p+panels that the part has (n). Each element: y + (chain + bias), as torch's
 * `y + linear(x)`. */
static void store(float *y, int64_t ldy, int64_t n, int64_t row, int rows, int64_t p, int panels, const float *tile,
                  const float *bias, int accumulate) {
    const int64_t col0 = p * PANEL, col1 = (p + panels) * PANEL < n ? (p + panels) * PANEL : n;
    for (int r = 0; r < rows; r++)
        for (int64_t col = col0; col < col1; col++) {
            const float v = tile[r * panels * PANEL + col - col0] + (bias ? bias[col] : 0.0f);
            float *o = y + (row + r) * ldy + col;
            *o = accumulate ? *o + v : v;
        }
}

/* Rows are taken in blocks that stay in cache while every unit passes over them, each unit's weights read from
 * memory once a block. The AMX build's tile products share each decoded superblock among more rows (2 threads,
 * 4096 x 4096 at 256-512 rows: Q6_K 1.3-1.5x, Q4_K 1.3x faster than blocks of 64): ROW_BLOCK at any k. The other
 * builds take as many rows as keep x within ROW_BLOCK_BYTES of L2, 64 to ROW_BLOCK (Xeon, 512 rows against
 * blocks of 64: 12288 x 4096 Q6_K 1.09x, Q4_K 1.05x on the AVX2 build, 1.10x on the AVX-512 one; 4096 x 12288,
 * 84 rows a block, 1.00-1.03x). */
#define ROW_BLOCK 256
#define ROW_BLOCK_BYTES (1 << 20)
static int64_t row_block(int64_t k) {
#if defined(__AMX_INT8__)
    return (void)k, ROW_BLOCK;
#else
    const int64_t rows = ROW_BLOCK_BYTES / k / 4 * 4;
    return rows < 64 ? 64 : rows > ROW_BLOCK ? ROW_BLOCK : rows;
#endif
}

static int64_t groups_of(const struct packed_weight *w) { return w->format < FMT_Q8 ? 0 : w->k / w->group; }

int64_t weight_columns(const struct packed_weight *w) {
    int64_t n = 0;
    for (; w; w = w->next) n += w->n;
    return n;
}

static int uses_int8(const struct packed_weight *w) {
    return w->int8_x && w->format >= FMT_Q8 && w->k % int8_block(w) == 0 && (w->group == 16 || w->group == 32) &&
           int8_tiles_for(w);
}

/* Whether a part of w takes x in int8 in blocks of `block` k (int8_block). */
static int any_int8(const struct packed_weight *w, int64_t block) {
    for (; w; w = w->next)
        if (uses_int8(w) && int8_block(w) == block) return 1;
    return 0;
}

/* Whether a part of w in blocks of `block` takes x + 128 at m rows (int8_takes_biased). */
static int any_biased(const struct packed_weight *w, int64_t block, int64_t m) {
    for (; w; w = w->next)
        if (uses_int8(w) && int8_block(w) == block && int8_takes_biased(w, m)) return 1;
    return 0;
}

static int64_t sums_size(const struct packed_weight *w, int64_t m) {
    int64_t size = 0;
    for (; w; w = w->next) size += w->has_min ? m * groups_of(w) : 0;
    return size;
}

static const int64_t INT8_BLOCKS[2] = {INT8_BLOCK, INT8_SUPER_BLOCK};

/* Floats of x in int8 in blocks of `block`: its values, scales, sums and their pairs (gemm_int8.c). */
static int64_t int8_rows_size(int64_t m, int64_t k, int64_t block) {
    return m * k / 4 + m * k / block + m * k / 16 + int8_pairs_size(m, k) + (int8_tiles_size(m, k, block) + 3) / 4 +
           (int8_biased_size(m, k, block) + 3) / 4;
}

/* xsum floats gemm_body needs for m rows: each part's group sums of x, part after part, then x in int8 in
 * each block size a part takes it in. */
int64_t xsum_size(const struct packed_weight *w, int64_t m) {
    int64_t size = sums_size(w, m);
    for (int b = 0; b < 2; b++) size += any_int8(w, INT8_BLOCKS[b]) ? int8_rows_size(m, w->k, INT8_BLOCKS[b]) : 0;
    return size;
}

static struct int8_rows int8_rows_in(float *scratch, int64_t m, int64_t k, int64_t block) {
    int8_t *q = (int8_t *)scratch;
    float *d = scratch + m * k / 4;
    int32_t *sums = (int32_t *)(d + m * k / block), *pairs = int8_pairs_size(m, k) ? sums + m * k / 16 : NULL;
    float *after_pairs = (float *)(sums + m * k / 16 + int8_pairs_size(m, k));
    int8_t *tiles = int8_tiles_size(m, k, block) ? (int8_t *)after_pairs : NULL;
    int8_t *biased = int8_biased_size(m, k, block) ? (int8_t *)(after_pairs + (int8_tiles_size(m, k, block) + 3) / 4) : NULL;
    return (struct int8_rows){q, d, sums, {pairs, pairs ? pairs + m * k / 32 : NULL}, k, block, tiles, biased};
}

static int64_t units_of(const struct packed_weight *w, int panels) {
    return ((w->n + PANEL - 1) / PANEL + panels - 1) / panels;
}

/* The parts of w (matrices of different formats stacked along n, such as q/k/v) run as one matrix: one pass
 * over all their units, each unit with its own part's tiles. */
void gemm_body(const float *x, int64_t m, const struct packed_weight *w, float *y, int accumulate, float *xsum) {
    const int64_t k = w->k, ldy = weight_columns(w);
    const int wide = m <= WIDE_ROWS;
    const int panels = wide ? WIDE : UNIT;
    int64_t units = 0;
    for (const struct packed_weight *part = w; part; part = part->next) units += units_of(part, panels);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < m; r++) { /* each row's sum of x over each group, in ascending k (for offsets) */
        float *sums = xsum;
        for (const struct packed_weight *part = w; part; part = part->next) {
            if (!part->has_min) continue;
            const int64_t groups = groups_of(part);
            for (int64_t g = 0; g < groups && !uses_int8(part); g++) {
                float total = 0.0f;
                for (int64_t i = g * part->group; i < (g + 1) * part->group; i++) total += x[r * k + i];
                sums[r * groups + g] = total;
            }
            sums += m * groups;
        }
    }
    struct int8_rows xq[2] = {{0}}; /* x in int8 in each of INT8_BLOCKS, where a part takes it so */
    float *free_scratch = xsum + sums_size(w, m);
    for (int b = 0; b < 2; b++) {
        if (!any_int8(w, INT8_BLOCKS[b])) continue;
        xq[b] = int8_rows_in(free_scratch, m, k, INT8_BLOCKS[b]);
        if (!any_biased(w, INT8_BLOCKS[b], m)) xq[b].biased = NULL;
        free_scratch += int8_rows_size(m, k, INT8_BLOCKS[b]);
        quantize_rows_body(x, m, &xq[b]);
    }
    float tile[(FLOAT_ROWS > 2 * WIDE_ROWS ? FLOAT_ROWS : 2 * WIDE_ROWS) * UNIT * PANEL];
    const int64_t rows_per_block = row_block(k);
    for (int64_t row0 = 0; row0 < m; row0 += rows_per_block) {
        const int64_t row1 = row0 + rows_per_block < m ? row0 + rows_per_block : m;
#pragma omp for schedule(static)
        for (int64_t unit = 0; unit < units; unit++) {
            const struct packed_weight *part = w;
            int64_t local = unit, column = 0;
            const float *sums = xsum;
            while (local >= units_of(part, panels)) {
                local -= units_of(part, panels);
                column += part->n;
                sums += part->has_min ? m * groups_of(part) : 0;
                part = part->next;
            }
            const int64_t groups = groups_of(part);
            const tile_fn *tiles = wide ? WIDE_TILES[format_index(part)] : NARROW_TILES[format_index(part)];
            const struct int8_rows *part_xq = uses_int8(part) ? &xq[int8_block(part) == INT8_BLOCKS[1]] : NULL;
            const int max_rows = wide ? WIDE_ROWS : part_xq ? int8_rows_for(part) : part->format < FMT_Q8 ? FLOAT_ROWS : QUANT_ROWS;
            if (part_xq && !wide && int8_decodes(part, row1 - row0)) {
                float block[ROW_BLOCK * UNIT * PANEL];
                int8_decoded_unit(part_xq, row0, row1 - row0, part, local * panels, block);
                store(y + column, ldy, part->n, row0, (int)(row1 - row0), local * panels, panels, block, part->bias,
                      accumulate);
                continue;
            }
            for (int64_t row = row0; row < row1;) {
                const int rows = row1 - row < max_rows ? (int)(row1 - row) : max_rows;
                if (part_xq)
                    int8_tile(part_xq, row, rows, wide, part, local * panels, tile);
                else
                    tiles[rows - 1](x + row * k, k, part, local * panels, k, part->has_min ? sums + row * groups : NULL,
                                    tile);
                store(y + column, ldy, part->n, row, rows, local * panels, panels, tile, part->bias, accumulate);
                row += rows;
            }
        }
    }
}

void gemm(const float *x, int64_t m, const struct packed_weight *w, float *y, int accumulate, int num_threads) {
    const int64_t size = xsum_size(w, m);
    float *xsum = size ? malloc(sizeof(float) * size) : NULL;
#pragma omp parallel num_threads(num_threads)
    gemm_body(x, m, w, y, accumulate, xsum);
    free(xsum);
}

/* One weight of column `col` at k index i: s * q + m, gguf's dequantized value. */
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
    } else if (w->format == FMT_Q2 || w->format == FMT_Q3) {
        const uint8_t *low = (const uint8_t *)w->quants, *high = (const uint8_t *)w->high;
        int value = (low[(p * (k / 4) + i / 4) * PANEL + lane] >> (2 * (i % 4))) & 3;
        if (w->format == FMT_Q3) value |= ((high[(p * (k / 8) + i / 8) * PANEL + lane] >> (i % 8)) & 1) << 2;
        q = (float)(value - w->zero);
    } else {
        const uint8_t byte = ((const uint8_t *)w->quants)[(p * (k / 2) + i / 8 * 4) * PANEL + 4 * lane + i % 4];
        int value = (byte >> NIBBLE_AT(i % 8) % 8) & 15;
        if (w->format != FMT_Q4) {
            const int bits = w->format == FMT_Q5 ? 1 : 2, per = 8 / bits, span = 4 * per; /* high bits per value */
            const uint8_t high = ((const uint8_t *)w->high)[(p * (k / per) + i / span * 4) * PANEL + 4 * lane + i % 4];
            value |= ((high >> (HIGH_AT(i % span, bits) % 8)) & ((1 << bits) - 1)) << 4;
        }
        q = (float)(value - w->zero);
    }
    const float v = q * scale_value(w, 0, col, i);
    return w->has_min ? v + scale_value(w, 1, col, i) : v;
}

/* out[r] = column ids[r] of the packed matrix (an embedding lookup in the lm_head's packed table). */
void gather_columns(const struct packed_weight *w, const int64_t *ids, int64_t count, float *out) {
    const int64_t k = w->k;
    for (int64_t r = 0; r < count; r++) {
        const struct packed_weight *part = w;
        int64_t col = ids[r];
        while (col >= part->n) col -= part->n, part = part->next;
        for (int64_t i = 0; i < k; i++) out[r * k + i] = weight_at(part, k, col, i);
    }
}
