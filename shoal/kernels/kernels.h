/* What shoal's C kernels share: the packed-weight descriptor, the KV-cache element types, and the bodies of
 * each kernel. A body runs inside an OpenMP parallel region that its caller opened (its loops are orphaned
 * `omp for`s, each ending in a barrier), so a whole decoder layer runs in one region (layer.c); each kernel's
 * own entry point opens a region around its body. */
#ifndef SHOAL_KERNELS_H
#define SHOAL_KERNELS_H
#include <stdint.h>

enum format { FMT_F32 = 0, FMT_F16 = 1, FMT_BF16 = 2, FMT_Q8 = 3, FMT_Q4 = 4, FMT_Q5 = 5, FMT_Q6 = 6, FMT_Q2 = 7, FMT_Q3 = 8 };
enum { FACTORS_4BIT = 2 };
enum kv_type { KV_F32 = 0, KV_F16 = 1, KV_BF16 = 2 };
enum activation { ACT_SILU = 0, ACT_GELU_TANH = 1 }; /* of a gated MLP: act(gate) * up */

struct packed_weight {
    int32_t format;
    int32_t group;       /* k values per scale (quant formats) */
    int32_t has_min;     /* an offset is added after scaling */
    int32_t half_scales; /* scales and offsets are stored as float16 (when that holds them exactly) */
    int32_t zero;        /* q2 to q6 without offsets: subtracted from each value, in integers */
    int32_t factored;    /* scales and offsets are factors of supers (K-quants): super * sub; the factors int8, or
                            FACTORS_4BIT: a byte per group, the scale's factor in its low nibble, the offset's above */
    int32_t int8_x;      /* x is quantized to int8 for this part (gemm_int8.c): integer dot products */
    const void *quants;
    const void *scales;
    const void *mins;
    const void *high;    /* q5, q6 (q3): each value's bits above its low nibble (its low 2 bits) */
    const uint16_t *super_scales, *super_mins; /* factored: float16, one per 256 values of k */
    const float *bias;
    int64_t n, k;                      /* this part's columns */
    const struct packed_weight *next; /* the next part: more columns, stacked along n, in their own format */
};

int64_t weight_columns(const struct packed_weight *w); /* all its parts' */
int64_t xsum_size(const struct packed_weight *w, int64_t m);
/* x quantized per row in blocks of `block` k (32, or a superblock's 256 for factored parts, as llama.cpp's Q8_0
 * and Q8_K): q = round(x / d), d = max|x| / 127; sums: q's sums per 16 k. */
enum { INT8_BLOCK = 32, INT8_SUPER_BLOCK = 256 }; /* the two blocks */
struct int8_rows {
    int8_t *q;     /* [m][k] */
    float *d;      /* [m][k / block] */
    int32_t *sums; /* [m][k / 16] */
    int32_t *pairs[2]; /* [m][k / 32], [m][k / 64]: the sums of q of groups g and g + 1 of 16 (32) k, from even g,
                        * as the low and high int16 of a word; the AVX2 build's (the madd operand of offsets and
                        * zeros), NULL in the others */
    int64_t k, block;
    int8_t *tiles;  /* the AMX build's, blocks of 256 from 32 rows: q as [m / 16, rounded up][k / 64][16][64] */
    int8_t *biased; /* the AVX2 build's, blocks of 256: q + 128 as unsigned bytes [m][k] (the decoded tiles' x) */
};
/* Bytes of `tiles` and of `biased` for m rows (0 where there is none); int32s of `pairs` (0 where the build has
 * none). */
int64_t int8_tiles_size(int64_t m, int64_t k, int64_t block);
int64_t int8_biased_size(int64_t m, int64_t k, int64_t block);
int64_t int8_pairs_size(int64_t m, int64_t k);
void quantize_rows_body(const float *x, int64_t m, struct int8_rows *xq);
/* The block (32 or 256) an int8_x part takes x in; whether gemm_int8.c has tiles for its format; their rows. */
int64_t int8_block(const struct packed_weight *w);
int int8_tiles_for(const struct packed_weight *w);
int int8_rows_for(const struct packed_weight *w);
/* The tile of `rows` rows from `row` against the panels from p (units of `wide` ? 2 * UNIT : UNIT panels) of an
 * int8_x part; out as gemm.c's tiles. */
void int8_tile(const struct int8_rows *xq, int64_t row, int rows, int wide, const struct packed_weight *w, int64_t p,
               float *out);
/* Prefill: whether `rows` rows of an int8_x part take int8_decoded_unit, which runs rows row0.. against one narrow
 * unit (UNIT panels from p) of it, each superblock of the unit decoded to bytes once for all of them instead of once
 * per tile: the tiles' bits, out [rows][UNIT][PANEL]. */
int int8_decodes(const struct packed_weight *w, int64_t rows);
/* Whether its decoded tiles take int8_rows' biased (filled only where a part does). */
int int8_takes_biased(const struct packed_weight *w, int64_t rows);
void int8_decoded_unit(const struct int8_rows *xq, int64_t row0, int64_t rows, const struct packed_weight *w,
                       int64_t p, float *out);
/* xsum: scratch of xsum_size(w, m) floats. */
void gemm_body(const float *x, int64_t m, const struct packed_weight *w, float *y, int accumulate, float *xsum);
void rms_norm_body(const float *x, int64_t rows, int64_t dim, const float *weight, float eps, float *out);
void head_norm_body(float *qkv, int64_t rows, int64_t num_heads, int64_t num_kv_heads, int64_t D,
                    const float *q_norm, const float *k_norm, float eps);
void rope_store_body(float *qkv, int64_t rows, int64_t num_heads, int64_t num_kv_heads, int64_t D,
                     const float *cos, const float *sin, void *k_cache, void *v_cache, int kv_type,
                     const int64_t *slots, int64_t block_size);
void gated_mul_body(const float *gate_up, int64_t rows, int64_t inter, int activation, float *out);
void attention_body(const float *q, int64_t q_stride, const void *k_cache, const void *v_cache, int kv_type,
                    float *out, const int64_t *row_table_offset, const int64_t *tables, const int64_t *positions,
                    int64_t num_rows, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                    int64_t block_size, int64_t window, float scale);
/* A mixture of experts' MLPs (experts.c): per expert, its fused gate/up and its down projection. */
struct expert_group {
    const struct packed_weight *const *gate_up; /* [experts] */
    const struct packed_weight *const *down;    /* [experts] */
    int64_t num_experts, hidden, inter;
    int32_t activation;
};
int64_t expert_group_scratch(const struct expert_group *g, int64_t most, int64_t assignments, int num_threads);
void expert_group_body(const struct expert_group *g, const float *x, const int64_t *rows, const float *weights,
                       const int64_t *starts, int64_t most, float *out, float *scratch);
int64_t route_tokens(const float *logits, int64_t tokens, int64_t experts, int64_t top_k, int normalize,
                     int64_t *rows, float *weights, int64_t *starts);
#endif
