/* y = x @ W^T on integer weights (q2 to q8) with x quantized to int8: integer dot products, as
 * llama.cpp computes, for steps bound by compute (many rows, prefill). Chosen per part by its int8_x flag.
 *
 * Each row of x is quantized on its own, in blocks of 32 k (256 for factored parts): d = max|x| / 127,
 * q = round(x * 127 / max|x|) (ties to even), so a row's int8 values depend on that row only. Per group of the
 * weight, the dot product of the weights' integers with q is exact in int32 (in whatever order the instructions
 * add it), then acc = (s * d) * dot + acc and, with offsets, acc = m * (d * sum of q over the group) + acc (the
 * sum of x as quantized, so that the offset's share of the quantization error cancels as it does in the
 * weights), groups in ascending order: the same float operations in every build, so a row's bits depend on
 * nothing but that row.
 * Factored parts (K-quants: each group's scale super * sub, sub a small integer) go a superblock at a time, as
 * llama.cpp's Q8_K products do: one d for its 256 k, each group's dot times its sub in int32 (AVX2: in the madd
 * step, SCALED_GROUP), summed over the superblock (exact), then acc = (super * d) * that + acc, and with offsets
 * acc = (super offset * d) * (the sum of sub offset * sum of q over its groups; exact in float32, the terms
 * being small integers) + acc. That saves the per-group float work, which costs as much as the dots in one-row
 * products and Q6_K's groups of 16.
 *
 * The integer dot takes 4 consecutive k of 16 columns as bytes [16][4], 8 k at a time: q4-q6 are stored in
 * that order (gemm.c's layouts), so their bytes are a mask and shifts away; q8, q2 and q3 are transposed in
 * registers. Weights are the unsigned operand (their values before the zero, which is taken off as
 * zero * sum(q), the dot's starting value) against 4 bytes of q broadcast: AVX-512 VNNI's dpbusd (q8 offset
 * by 128 to be unsigned), AVX2's maddubs + madd (q8 through the sign of q instead: maddubs' 16-bit pair sums would overflow on
 * 255 * 127 * 2), or plain C.
 * In prefill (int8_decodes: DECODED_ROWS and more of Q6_K, Q5_K, Q3_K or Q2_K, and on AVX2 Q4_K) a tile would
 * unpack the same weights once per few rows: there each superblock of a unit is decoded to those bytes once, into
 * 8 KB that stay in L1, and every row of the row block runs against them (int8_decoded_unit): the same dots and
 * float steps, so the same bits; measured 1.2-1.4x faster on a Q6_K 12288 x 4096 at 32-512 rows (Zen 4). The AVX2
 * build's decoded tiles take the weights less their zero against x + 128 instead (DECODED_HALF): the same int32.
 */
#if defined(__AMX_INT8__)
#define _GNU_SOURCE /* syscall */
#endif
#include "panel.h"

#define SUM_BLOCK 16 /* k values per sum of q */
#define TILE_ROWS 16 /* rows of x in an AMX tile */
#define TILE_K 64    /* and their k */

/* Row r's 64 k from TILE_K * s in xq->tiles. */
static inline int8_t *tile_row(const struct int8_rows *xq, int64_t r, int64_t s) {
    return xq->tiles + ((r / TILE_ROWS * (xq->k / TILE_K) + s) * TILE_ROWS + r % TILE_ROWS) * TILE_K;
}

/* int8_rows' pairs: two sums of q (|sum| <= 32 * 127) as the low and high int16 of a word; the AVX2 build's. */
int64_t int8_pairs_size(int64_t m, int64_t k) {
#if defined(__AVX2__) && !defined(__AVX512F__)
    return m * k / 32 + m * k / 64;
#else
    return (void)m, (void)k, 0;
#endif
}
/* int8_rows' biased: the decoded tiles of parts with a zero take x + 128 (DECODED_HALF); the AVX2 build's. */
int64_t int8_biased_size(int64_t m, int64_t k, int64_t block) {
#if defined(__AVX2__) && !defined(__AVX512F__)
    return block == INT8_SUPER_BLOCK ? m * k : 0;
#else
    return (void)m, (void)k, (void)block, 0;
#endif
}
int int8_takes_biased(const struct packed_weight *w, int64_t rows) {
    return int8_biased_size(rows, w->k, int8_block(w)) && int8_decodes(w, rows) && !w->has_min;
}
static inline int32_t int16_pair(int32_t low, int32_t high) { return (int32_t)((uint32_t)(uint16_t)low | (uint32_t)high << 16); }

/* Row r of x into xq (see the top); restrict locals let gcc vectorize each loop. */
static void quantize_row(const float *restrict x, int64_t r, const struct int8_rows *xq) {
    const int64_t k = xq->k, block = xq->block, blocks = k / block;
    int8_t *restrict q = xq->q + r * k;
    for (int64_t b = 0; b < blocks; b++) {
        const float *restrict v = x + b * block;
        float lanes[8] = {0}, amax = 0.0f; /* fmaxf's max (NaNs skipped), in 8 lanes: a vector's */
        for (int64_t j = 0; j < block; j += 8)
            for (int t = 0; t < 8; t++) lanes[t] = fabsf(v[j + t]) > lanes[t] ? fabsf(v[j + t]) : lanes[t];
        for (int t = 0; t < 8; t++) amax = lanes[t] > amax ? lanes[t] : amax;
        const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        for (int64_t j = 0; j < block; j++) {
            const float t = nearbyintf(v[j] * inv);
            q[b * block + j] = (int8_t)(t >= -127.0f && t <= 127.0f ? t : t > 0.0f ? 127.0f : -127.0f);
        }
        xq->d[r * blocks + b] = amax / 127.0f;
    }
    int32_t *restrict sums = xq->sums + r * (k / SUM_BLOCK);
    for (int64_t h = 0; h < k / SUM_BLOCK; h++) {
        int32_t sum = 0;
        for (int j = 0; j < SUM_BLOCK; j++) sum += q[h * SUM_BLOCK + j];
        sums[h] = sum;
    }
    int32_t *restrict pairs = xq->pairs[0] ? xq->pairs[0] + r * (k / 32) : NULL;
    for (int64_t h = 0; pairs && h < k / 32; h++) pairs[h] = int16_pair(sums[2 * h], sums[2 * h + 1]);
    pairs = xq->pairs[1] ? xq->pairs[1] + r * (k / 64) : NULL;
    for (int64_t h = 0; pairs && h < k / 64; h++)
        pairs[h] = int16_pair(sums[4 * h] + sums[4 * h + 1], sums[4 * h + 2] + sums[4 * h + 3]);
    for (int64_t s = 0; xq->tiles && s < k / TILE_K; s++) memcpy(tile_row(xq, r, s), q + s * TILE_K, TILE_K);
    if (xq->biased) {
        int8_t *restrict biased = xq->biased + r * k;
        for (int64_t j = 0; j < k; j++) biased[j] = (int8_t)(q[j] ^ 0x80);
    }
}

void quantize_rows_body(const float *x, int64_t m, struct int8_rows *xq) {
    const int64_t k = xq->k, padded = xq->tiles ? (m + TILE_ROWS - 1) / TILE_ROWS * TILE_ROWS : m;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < padded; r++) {
        if (r >= m) { /* a tile's rows past m: zeros */
            for (int64_t s = 0; s < k / TILE_K; s++) memset(tile_row(xq, r, s), 0, TILE_K);
            continue;
        }
        quantize_row(x + r * k, r, xq);
    }
}

static inline int32_t four_bytes(const int8_t *x) {
    int32_t v;
    memcpy(&v, x, 4);
    return v;
}

/* iv: 16 int32 sums, one per column; bv: 4 k of 16 columns as bytes [16][4].
 * nibbles8: q4's 64 bytes of 8 k as two bvs (k..k+3 in the low nibbles, k+4..k+7 in the high ones);
 * add_high: each value's bits from bit `shift` (and `shift` + bits for out[1]) of its byte of high bits, above its
 * nibble (q5, q6: the 64 bytes of high bits at h hold them in the same [16][4] order). */
#if defined(__AVX512F__)
#ifndef __AVX512VNNI__
#error "the AVX-512 build uses AVX-512 VNNI"
#endif
typedef struct {
    __m512i v;
} iv;
typedef struct {
    __m512i v;
} bv;
#define Q8_ZERO 128
static inline iv iv_set1(int32_t v) { return (iv){_mm512_set1_epi32(v)}; }
static inline iv iv_dot(iv acc, bv w, const int8_t *x) {
    return (iv){_mm512_dpbusd_epi32(acc.v, w.v, _mm512_set1_epi32(four_bytes(x)))};
}
#define iv_dot_q8 iv_dot
static inline pv iv_float(iv acc) { return (pv){_mm512_cvtepi32_ps(acc.v)}; }
static inline iv iv_mul_add(iv acc, iv a, iv b) { return (iv){_mm512_add_epi32(acc.v, _mm512_mullo_epi32(a.v, b.v))}; }
static inline iv iv_bytes(__m128i bytes, int is_signed) {
    return (iv){is_signed ? _mm512_cvtepi8_epi32(bytes) : _mm512_cvtepu8_epi32(bytes)};
}
/* q8's 4 rows of 16 columns -> [16 columns][4 k]: lane c of 16 bytes gets [k][4 columns], then each lane is
 * transposed. */
static inline bv bv_q8(const int8_t *p) {
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    const __m128i transpose = _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    const __m512i by_lane = _mm512_permutexvar_epi32(order, _mm512_loadu_si512(p));
    return (bv){_mm512_xor_si512(_mm512_shuffle_epi8(by_lane, _mm512_broadcast_i32x4(transpose)),
                                 _mm512_set1_epi8((char)0x80))};
}
static inline void nibbles8(const uint8_t *p, bv *out) {
    const __m512i v = _mm512_loadu_si512(p), low = _mm512_set1_epi8(15);
    out[0].v = _mm512_and_si512(v, low);
    out[1].v = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
}
static inline void add_high(bv *out, const uint8_t *h, int shift, int bits) {
    const __m512i v = _mm512_loadu_si512(h), mask = _mm512_set1_epi8((char)(((1 << bits) - 1) << 4));
    for (int o = 0; o < 2; o++) { /* bits n.. of each byte to 4.. (per 16 bits: nothing crosses into the kept bits) */
        const int n = shift + o * bits;
        const __m512i moved = n >= 4 ? _mm512_srli_epi16(v, n - 4) : _mm512_slli_epi16(v, 4 - n);
        out[o].v = _mm512_ternarylogic_epi32(out[o].v, moved, mask, 0xF8); /* a | (b & c) */
    }
}
/* q2 (q3): each column's byte of four 2-bit values (and its high bits from `shift`) as its 4 bytes. */
static inline __m512i spread(__m512i byte, int step, int mask) { /* bits step*j.. of the byte -> byte j */
    const __m512i x = _mm512_or_si512(_mm512_or_si512(byte, _mm512_slli_epi32(byte, 8 - step)),
                                      _mm512_or_si512(_mm512_slli_epi32(byte, 16 - 2 * step), _mm512_slli_epi32(byte, 24 - 3 * step)));
    return _mm512_and_si512(x, _mm512_set1_epi32(mask * 0x01010101));
}
static inline bv bv_q23(const uint8_t *low, const uint8_t *high, int shift) {
    __m512i v = spread(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)low)), 2, 3);
    if (high) {
        const __m512i h = _mm512_srli_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)high)), shift);
        v = _mm512_or_si512(v, _mm512_slli_epi32(spread(h, 1, 1), 2));
    }
    return (bv){v};
}
#elif defined(__AVX2__)
/* Columns 0-3 and 8-11 in a, 4-7 and 12-15 in b (the order q8's byte transposition leaves them in). */
typedef struct {
    __m256i a, b;
} iv;
typedef struct {
    __m256i a, b;
} bv;
#define Q8_ZERO 0
static inline iv iv_set1(int32_t v) { return (iv){_mm256_set1_epi32(v), _mm256_set1_epi32(v)}; }
static inline __m256i dot8(__m256i acc, __m256i w, __m256i x) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)));
}
static inline iv iv_dot(iv acc, bv w, const int8_t *x) {
    const __m256i xv = _mm256_set1_epi32(four_bytes(x));
    return (iv){dot8(acc.a, w.a, xv), dot8(acc.b, w.b, xv)};
}
static inline iv iv_dot_q8(iv acc, bv w, const int8_t *x) { /* q8 signed: |w| times x with w's sign */
    const __m256i xv = _mm256_set1_epi32(four_bytes(x));
    return (iv){dot8(acc.a, _mm256_abs_epi8(w.a), _mm256_sign_epi8(xv, w.a)),
                dot8(acc.b, _mm256_abs_epi8(w.b), _mm256_sign_epi8(xv, w.b))};
}
static inline pv iv_float(iv acc) {
    return (pv){_mm256_cvtepi32_ps(_mm256_permute2x128_si256(acc.a, acc.b, 0x20)),
                _mm256_cvtepi32_ps(_mm256_permute2x128_si256(acc.a, acc.b, 0x31))};
}
static inline iv iv_mul_add(iv acc, iv x, iv y) {
    return (iv){_mm256_add_epi32(acc.a, _mm256_mullo_epi32(x.a, y.a)), _mm256_add_epi32(acc.b, _mm256_mullo_epi32(x.b, y.b))};
}
static inline iv iv_bytes(__m128i bytes, int is_signed) { /* 16 columns' bytes in iv's column order */
    const __m128i order = _mm_setr_epi8(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15);
    const __m128i ordered = _mm_shuffle_epi8(bytes, order), upper = _mm_unpackhi_epi64(ordered, ordered);
    return is_signed ? (iv){_mm256_cvtepi8_epi32(ordered), _mm256_cvtepi8_epi32(upper)}
                     : (iv){_mm256_cvtepu8_epi32(ordered), _mm256_cvtepu8_epi32(upper)};
}
/* x, y: lanes of 16 bytes (one k of 16 columns each), interleaved by vpermd into (x, y) pairs of 4 columns;
 * `joined` takes them to [k][4 columns] per lane, then each lane is transposed to [4 columns][4 k]. */
static inline __m256i lanes_transposed(__m256i v) {
    const __m256i transpose = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15, 0, 4, 8, 12,
                                               1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    return _mm256_shuffle_epi8(v, transpose);
}
static inline __m256i pair_columns(__m256i v) { return _mm256_permutevar8x32_epi32(v, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)); }
static inline bv bv_q8(const int8_t *p) { /* rows k, k + 1 in one vector, k + 2, k + 3 in the other */
    const __m256i x = pair_columns(_mm256_loadu_si256((const __m256i *)p));
    const __m256i y = pair_columns(_mm256_loadu_si256((const __m256i *)(p + 32)));
    return (bv){lanes_transposed(_mm256_unpacklo_epi64(x, y)), lanes_transposed(_mm256_unpackhi_epi64(x, y))};
}
static inline bv columns_in_order(const uint8_t *p) { /* 64 bytes [16][4] -> columns 0-3, 8-11; 4-7, 12-15 */
    const __m128i *q = (const __m128i *)p;
    return (bv){_mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128(q)), _mm_loadu_si128(q + 2), 1),
                _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128(q + 1)), _mm_loadu_si128(q + 3), 1)};
}
static inline void nibbles8(const uint8_t *p, bv *out) {
    const bv v = columns_in_order(p);
    const __m256i low = _mm256_set1_epi8(15);
    out[0] = (bv){_mm256_and_si256(v.a, low), _mm256_and_si256(v.b, low)};
    out[1] = (bv){_mm256_and_si256(_mm256_srli_epi16(v.a, 4), low), _mm256_and_si256(_mm256_srli_epi16(v.b, 4), low)};
}
static inline __m256i moved_to_4(__m256i v, int n) { return n >= 4 ? _mm256_srli_epi16(v, n - 4) : _mm256_slli_epi16(v, 4 - n); }
static inline void add_high(bv *out, const uint8_t *h, int shift, int bits) {
    const bv v = columns_in_order(h);
    const __m256i mask = _mm256_set1_epi8((char)(((1 << bits) - 1) << 4));
    for (int o = 0; o < 2; o++) {
        const int n = shift + o * bits;
        out[o].a = _mm256_or_si256(out[o].a, _mm256_and_si256(moved_to_4(v.a, n), mask));
        out[o].b = _mm256_or_si256(out[o].b, _mm256_and_si256(moved_to_4(v.b, n), mask));
    }
}
static inline __m256i spread(__m256i byte, int step, int mask) {
    const __m256i x = _mm256_or_si256(_mm256_or_si256(byte, _mm256_slli_epi32(byte, 8 - step)),
                                      _mm256_or_si256(_mm256_slli_epi32(byte, 16 - 2 * step), _mm256_slli_epi32(byte, 24 - 3 * step)));
    return _mm256_and_si256(x, _mm256_set1_epi32(mask * 0x01010101));
}
static inline void columns_a_b(const uint8_t *p, __m256i *a, __m256i *b) { /* bytes of columns 0-3, 8-11; 4-7, 12-15 */
    const __m128i order = _mm_setr_epi8(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15);
    const __m128i bytes = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)p), order);
    *a = _mm256_cvtepu8_epi32(bytes);
    *b = _mm256_cvtepu8_epi32(_mm_unpackhi_epi64(bytes, bytes));
}
static inline bv bv_q23(const uint8_t *low, const uint8_t *high, int shift) {
    __m256i a, b;
    columns_a_b(low, &a, &b);
    bv r = {spread(a, 2, 3), spread(b, 2, 3)};
    if (high) {
        columns_a_b(high, &a, &b);
        r.a = _mm256_or_si256(r.a, _mm256_slli_epi32(spread(_mm256_srli_epi32(a, shift), 1, 1), 2));
        r.b = _mm256_or_si256(r.b, _mm256_slli_epi32(spread(_mm256_srli_epi32(b, shift), 1, 1), 2));
    }
    return r;
}
#else /* portable C */
typedef struct {
    int32_t v[PANEL];
} iv;
typedef struct {
    int16_t v[PANEL][4];
} bv;
#define Q8_ZERO 0
static inline iv iv_set1(int32_t v) {
    iv r;
    LANES r.v[l] = v;
    return r;
}
static inline iv iv_dot(iv acc, bv w, const int8_t *x) {
    LANES for (int j = 0; j < 4; j++) acc.v[l] += w.v[l][j] * x[j];
    return acc;
}
#define iv_dot_q8 iv_dot
static inline pv iv_float(iv acc) {
    pv r;
    LANES r.v[l] = (float)acc.v[l];
    return r;
}
static inline iv iv_mul_add(iv acc, iv a, iv b) {
    LANES acc.v[l] += a.v[l] * b.v[l];
    return acc;
}
static inline bv bv_q8(const int8_t *p) {
    bv r;
    LANES for (int j = 0; j < 4; j++) r.v[l][j] = p[j * PANEL + l];
    return r;
}
static inline void nibbles8(const uint8_t *p, bv *out) {
    LANES for (int j = 0; j < 4; j++) {
        out[0].v[l][j] = (int16_t)(p[4 * l + j] & 15);
        out[1].v[l][j] = (int16_t)(p[4 * l + j] >> 4);
    }
}
static inline void add_high(bv *out, const uint8_t *h, int shift, int bits) {
    for (int o = 0; o < 2; o++)
        LANES for (int j = 0; j < 4; j++)
            out[o].v[l][j] |= (int16_t)(((h[4 * l + j] >> (shift + o * bits)) & ((1 << bits) - 1)) << 4);
}
static inline bv bv_q23(const uint8_t *low, const uint8_t *high, int shift) {
    bv r;
    LANES for (int j = 0; j < 4; j++)
        r.v[l][j] = (int16_t)(((low[l] >> (2 * j)) & 3) | (high ? ((high[l] >> (shift + j)) & 1) << 2 : 0));
    return r;
}
#endif

/* A factored part's sub-scales (offsets: sub-offsets) of 16 columns at `at`, as integers: int8, or with
 * FACTORS_4BIT the low (high) nibble of each byte. */
static inline iv iv_subs(const struct packed_weight *w, int offsets, int64_t at, int four_bit) {
    const int8_t *base = (const int8_t *)(offsets && !four_bit ? w->mins : w->scales) + at;
#if defined(__AVX2__)
    const __m128i bytes = _mm_loadu_si128((const __m128i *)base);
    if (!four_bit) return iv_bytes(bytes, 1);
    return iv_bytes(_mm_and_si128(offsets ? _mm_srli_epi16(bytes, 4) : bytes, _mm_set1_epi8(15)), 0);
#else
    iv r;
    LANES r.v[l] = four_bit ? ((uint8_t)base[l] >> (offsets ? 4 : 0)) & 15 : base[l];
    return r;
#endif
}

/* 8 k from i of the panel's 16 columns, per layout (see gemm.c), i being `at` k into a run of SPAN (q5 and q6:
 * a block of their high bits; `at` a constant, so that the shifts are), prefetching ahead where `ahead` (panel.h);
 * and the value each layout's integers are offset by. */
#define q8_SPAN 8
#define q4_SPAN 8
#define q5_SPAN 32
#define q6_SPAN 16
#define q2_SPAN 8
#define q3_SPAN 8
static inline void q4_load8(const struct packed_weight *w, int64_t panel, int64_t i, int at, int ahead, bv *out) {
    (void)at;
    const uint8_t *quants = (const uint8_t *)w->quants + (panel * (w->k / 2) + i / 2) * PANEL;
    if (ahead) PREFETCH(quants);
    nibbles8(quants, out);
}
static inline void qh_load8(const struct packed_weight *w, int64_t panel, int64_t i, int at, int ahead, bv *out, int bits) {
    const int high = bits - 4, per = 8 / high; /* high bits per value, values per byte */
    q4_load8(w, panel, i, at, ahead, out);
    const uint8_t *highs = (const uint8_t *)w->high + (panel * (w->k / per) + (i - at) / per) * PANEL;
    if (ahead && at == 0) PREFETCH(highs); /* 64 bytes of them per span */
    add_high(out, highs, at / 4 * high, high);
}
static inline void q5_load8(const struct packed_weight *w, int64_t panel, int64_t i, int at, int ahead, bv *out) { qh_load8(w, panel, i, at, ahead, out, 5); }
static inline void q6_load8(const struct packed_weight *w, int64_t panel, int64_t i, int at, int ahead, bv *out) { qh_load8(w, panel, i, at, ahead, out, 6); }
static inline bv q8_load(const struct packed_weight *w, int64_t panel, int64_t i, int ahead) {
    const int8_t *quants = (const int8_t *)w->quants + (panel * w->k + i) * PANEL;
    if (ahead) PREFETCH(quants);
    return bv_q8(quants);
}
static inline bv q2_load(const struct packed_weight *w, int64_t panel, int64_t i, int ahead) {
    const uint8_t *quants = (const uint8_t *)w->quants + (panel * (w->k / 4) + i / 4) * PANEL;
    if (ahead && i % 16 == 0) PREFETCH(quants);
    return bv_q23(quants, NULL, 0);
}
static inline bv q3_load(const struct packed_weight *w, int64_t panel, int64_t i, int ahead) {
    const uint8_t *high = (const uint8_t *)w->high + (panel * (w->k / 8) + i / 8) * PANEL;
    const uint8_t *quants = (const uint8_t *)w->quants + (panel * (w->k / 4) + i / 4) * PANEL;
    if (ahead && i % 16 == 0) PREFETCH(quants), PREFETCH(high);
    return bv_q23(quants, high, (int)(i % 8));
}
#define TWICE(KIND)                                                                                             \
    static inline void KIND##_load8(const struct packed_weight *w, int64_t panel, int64_t i, int at, int ahead, \
                                    bv *out) {                                                                  \
        (void)at;                                                                                               \
        out[0] = KIND##_load(w, panel, i, ahead);                                                               \
        out[1] = KIND##_load(w, panel, i + 4, ahead);                                                           \
    }
TWICE(q8)
TWICE(q2)
TWICE(q3)
#undef TWICE
static inline int q8_zero(const struct packed_weight *w, int has_min) { return (void)w, (void)has_min, Q8_ZERO; }
static inline int q4_zero(const struct packed_weight *w, int has_min) { return has_min ? 0 : w->zero; }
#define q2_zero q4_zero
#define q3_zero q4_zero
#define q5_zero q4_zero
#define q6_zero q4_zero
#define q2_dot iv_dot
#define q3_dot iv_dot
#define q4_dot iv_dot
#define q5_dot iv_dot
#define q6_dot iv_dot
#define q8_dot iv_dot_q8

/* Each row's sum of q over group g (for the zero and the offsets): groups are 16 or 32 k (uses_int8). */
#define GROUP_QSUMS(QSUM, R)                                                                                    \
    UNROLL for (int r = 0; r < R; r++) {                                                                        \
        const int32_t *sums = xq->sums + (row + r) * (k / 16) + g * group / 16;                                 \
        QSUM[r] = sums[0] + (group == 32 ? sums[1] : 0);                                                        \
    }

/* The integer dots of R rows x U panels over group g, less zero * sum(q): exact in int32. LOAD8(KIND, u, i, at,
 * ahead, out) gives panel p + u's 8 k from i: FROM_PACKED decodes them from w, FROM_DECODED reads them from `dec`,
 * the unit's superblock decoded once (int8_decoded_unit). The group's SPANS runs of KIND##_SPAN k go in a loop
 * (SPANS_LOOP empty) or unrolled (UNROLL): the AVX-512 build's decoded tiles unroll them (Q3_K and Q2_K have two
 * runs a group: 1.11-1.17x at 512 rows on Zen 4); the packed tiles, bound by reading the weights, gained nothing. */
#define FROM_PACKED(KIND, u, i, at, ahead, out) KIND##_load8(w, p + (u), i, at, ahead, out)
#define FROM_DECODED(KIND, u, i, at, ahead, out)                                                                \
    ((out)[0] = dec[((i) & (INT8_SUPER_BLOCK - 1)) >> 3][u][0], (out)[1] = dec[((i) & (INT8_SUPER_BLOCK - 1)) >> 3][u][1])
#define GROUP_DOTS(DOT, R, U, KIND, QSUM, LOAD8, SPANS, SPANS_LOOP)                                             \
    iv DOT[R][U];                                                                                               \
    UNROLL for (int r = 0; r < R; r++) {                                                                        \
        const iv start = iv_set1(-zero * QSUM[r]);                                                              \
        UNROLL for (int u = 0; u < U; u++) DOT[r][u] = start;                                                   \
    }                                                                                                           \
    SPANS_LOOP for (int64_t span = 0; span < (SPANS); span++) UNROLL for (int o = 0; o < KIND##_SPAN; o += 8) { \
        const int64_t i = g * group + span * KIND##_SPAN;                                                       \
        bv wv[U][2];                                                                                            \
        UNROLL for (int u = 0; u < U; u++) LOAD8(KIND, u, i + o, o, U > UNIT, wv[u]);                           \
        UNROLL for (int h = 0; h < 2; h++) UNROLL for (int r = 0; r < R; r++) UNROLL for (int u = 0; u < U; u++) \
            DOT[r][u] = KIND##_dot(DOT[r][u], wv[u][h], x + r * k + i + o + 4 * h);                             \
    }

/* Parts with a scale per group (blocks of 32), group by group: c = (s * d) * dot + c and, with offsets,
 * c = m * (d * sum(q)) + c. */
#define DEFINE_I8_TILE(NAME, R, SUF, U, HAS_MIN, KIND)                                                          \
    static void NAME##_##R##SUF(const struct int8_rows *xq, int64_t row, const struct packed_weight *w, int64_t p,  \
                                float *out) {                                                                   \
        const int64_t k = w->k, group = w->group, groups = k / group;                                           \
        const int zero = KIND##_zero(w, HAS_MIN);                                                               \
        const int8_t *x = xq->q + row * k;                                                                      \
        ZEROS(c, R, U)                                                                                          \
        for (int64_t g = 0; g < groups; g++) {                                                                  \
            int32_t qsum[R];                                                                                    \
            GROUP_QSUMS(qsum, R)                                                                                \
            GROUP_DOTS(dot, R, U, KIND, qsum, FROM_PACKED, group / KIND##_SPAN, )                               \
            UNROLL for (int u = 0; u < U; u++) {                                                                \
                const int64_t at = ((p + u) * groups + g) * PANEL;                                              \
                const pv s = group_scale(w, 0, at, pv_zero());                                                  \
                const pv m = HAS_MIN ? group_scale(w, 1, at, pv_zero()) : pv_zero();                            \
                UNROLL for (int r = 0; r < R; r++) {                                                            \
                    const float d = xq->d[(row + r) * (k / INT8_BLOCK) + g * group / INT8_BLOCK];               \
                    c[r][u] = pv_fmav(pv_mul(s, pv_set1(d)), iv_float(dot[r][u]), c[r][u]);                     \
                    if (HAS_MIN) c[r][u] = pv_fma(d * (float)qsum[r], m, c[r][u]);                              \
                }                                                                                               \
            }                                                                                                   \
        }                                                                                                       \
        TILE_EPILOGUE(R, U)                                                                                     \
    }

/* The K-quants' groups (formats.py) and whether their sub-scales are 4-bit pairs (Q2_K), as constants: a
 * factored part of another group takes no int8 tiles (int8_tiles_for). */
#define q4_KGROUP 32
#define q5_KGROUP 32
#define q6_KGROUP 16
#define q2_KGROUP 16
#define q3_KGROUP 16
#define q2_FOUR_BIT 1
#define q3_FOUR_BIT 0
#define q4_FOUR_BIT 0
#define q5_FOUR_BIT 0
#define q6_FOUR_BIT 0

#if defined(__AVX512F__)
#define DECODED_SPANS UNROLL
#else /* AVX2 (16 registers): Q3_K 0.95x unrolled; portable: its compile time */
#define DECODED_SPANS
#endif

/* A factored part's group g: each row's dots times the group's sub-scale, added to ACC (exact int32). Through
 * AVX2 the sub-scale goes into the madd that sums maddubs' pairs (scaled_dot8), as llama.cpp's AVX2 K-quant dots
 * do, and the zero's share is taken once a superblock (ZERO_SHARE); elsewhere the dots, started at
 * -zero * sum(q), are multiplied by it (iv_mul_add). The same integers either way. */
#if defined(__AVX2__) && !defined(__AVX512F__)
/* A group's 16 sub-scales (sv_subs), or two groups' sub-scales times the zero (sv_zero_pairs) or sub-offsets
 * (sv_offset_pairs), as 16-bit pairs in each column's 32-bit lane, in iv's column order: (sub, sub), or
 * (v of g, v of g + 1). */
typedef struct {
    __m256i a, b;
} sv;
static inline __m256i subs16(const struct packed_weight *w, int offsets, int64_t at, int four_bit) { /* as iv_subs */
    const __m128i bytes = _mm_loadu_si128((const __m128i *)((const int8_t *)(offsets && !four_bit ? w->mins : w->scales) + at));
    if (!four_bit) return _mm256_cvtepi8_epi16(bytes);
    return _mm256_cvtepu8_epi16(_mm_and_si128(offsets ? _mm_srli_epi16(bytes, 4) : bytes, _mm_set1_epi8(15)));
}
static inline sv sv_subs(const struct packed_weight *w, int64_t at, int four_bit) {
    const __m256i s = subs16(w, 0, at, four_bit);
    return (sv){_mm256_unpacklo_epi16(s, s), _mm256_unpackhi_epi16(s, s)};
}
static inline sv sv_pairs(__m256i s0, __m256i s1) { return (sv){_mm256_unpacklo_epi16(s0, s1), _mm256_unpackhi_epi16(s0, s1)}; }
static inline sv sv_zero_pairs(const struct packed_weight *w, int64_t at, int zero) { /* parts with a zero: int8 subs */
    const __m256i z = _mm256_set1_epi16((int16_t)zero);
    return sv_pairs(_mm256_mullo_epi16(subs16(w, 0, at, 0), z), _mm256_mullo_epi16(subs16(w, 0, at + PANEL, 0), z));
}
static inline sv sv_offset_pairs(const struct packed_weight *w, int64_t at, int four_bit) {
    return sv_pairs(subs16(w, 1, at, four_bit), subs16(w, 1, at + PANEL, four_bit));
}
/* 8 k: maddubs' pairs of both 4 k (unsigned u against signed s) summed in 16 bits. */
static inline __m256i pairs8(__m256i u0, __m256i s0, __m256i u1, __m256i s1) {
    return _mm256_add_epi16(_mm256_maddubs_epi16(u0, s0), _mm256_maddubs_epi16(u1, s1));
}
/* 8 k: acc + sub * pairs8. The weights' values are below 64 in factored parts, so two pairs sum to at most
 * 4 * 63 * 127 < 2^15: exact in 16 bits. */
static inline __m256i scaled8(__m256i acc, __m256i w0, __m256i w1, __m256i x0, __m256i x1, __m256i sub) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs8(w0, x0, w1, x1), sub));
}
static inline iv scaled_dot8(iv acc, const bv w[2], const int8_t *x, sv sub) {
    const __m256i x0 = _mm256_set1_epi32(four_bytes(x)), x1 = _mm256_set1_epi32(four_bytes(x + 4));
    return (iv){scaled8(acc.a, w[0].a, w[1].a, x0, x1, sub.a), scaled8(acc.b, w[0].b, w[1].b, x0, x1, sub.b)};
}
/* Row r's sums of q of the groups g and g + 1 (g even) as one word of int16s (int8_rows' pairs). */
#define SUM_PAIR(r, g) xq->pairs[group == 32][(row + (r)) * (k / (2 * group)) + (g) / 2]
/* Each column's pairs . (sum of q of g, of g + 1). */
static inline iv pair_dots(sv pairs, int32_t sum_pair) {
    const __m256i q = _mm256_set1_epi32(sum_pair);
    return (iv){_mm256_madd_epi16(pairs.a, q), _mm256_madd_epi16(pairs.b, q)};
}
#define SCALED_GROUP(ACC, R, U, KIND, QSUM, LOAD8, SPANS, SPANS_LOOP)                                            \
    {                                                                                                           \
        sv sub[U];                                                                                              \
        UNROLL for (int u = 0; u < U; u++) sub[u] = sv_subs(w, ((p + u) * groups + g) * PANEL, KIND##_FOUR_BIT); \
        SPANS_LOOP for (int64_t span = 0; span < (SPANS); span++) UNROLL for (int o = 0; o < KIND##_SPAN; o += 8) { \
            const int64_t i = g * group + span * KIND##_SPAN;                                                   \
            bv wv[U][2];                                                                                        \
            UNROLL for (int u = 0; u < U; u++) LOAD8(KIND, u, i + o, o, U > UNIT, wv[u]);                       \
            UNROLL for (int r = 0; r < R; r++) UNROLL for (int u = 0; u < U; u++)                               \
                ACC[r][u] = scaled_dot8(ACC[r][u], wv[u], x + r * k + i + o, sub[u]);                           \
        }                                                                                                       \
    }
/* Q4_K's group of 32 k, each half of the panel (8 columns) in turn: its values are below 16, so a 16-bit word
 * holds all 8 maddubs pairs of a column (at most 16 * 15 * 127 < 2^15), and one madd by the sub-scale takes them:
 * a quarter of SCALED_GROUP's madds and 32-bit adds. The steps of 8 k go in a loop, which keeps the rows' words in
 * registers (unrolled, gcc reorders them into spills: 0.75x). */
static inline void q4_half(const uint8_t *p, int half, __m256i *low, __m256i *high) { /* columns 0-3, 8-11 (4-7, 12-15) */
    const __m128i *q = (const __m128i *)p + half;
    const __m256i v = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128(q)), _mm_loadu_si128(q + 2), 1);
    *low = _mm256_and_si256(v, _mm256_set1_epi8(15));
    *high = _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(15));
}
static inline __m256i q4_pairs(__m256i low, __m256i high, const int8_t *x) { /* 8 k: 4 + 4 pairs a word */
    return pairs8(low, _mm256_set1_epi32(four_bytes(x)), high, _mm256_set1_epi32(four_bytes(x + 4)));
}
#define Q4_STEP(R, U, HALF, j, WORDS_OF)                                                                        \
    {                                                                                                           \
        const int64_t i = g * group + 8 * (j);                                                                  \
        const uint8_t *quants = (const uint8_t *)w->quants + ((p + u) * (k / 2) + i / 2) * PANEL;               \
        if (U > UNIT && HALF == 0) PREFETCH(quants);                                                            \
        __m256i low, high;                                                                                      \
        q4_half(quants, HALF, &low, &high);                                                                     \
        UNROLL for (int r = 0; r < R; r++) words[r] = WORDS_OF(r, q4_pairs(low, high, x + r * k + i));          \
    }
#define FIRST_WORDS(r, pairs) (pairs)
#define MORE_WORDS(r, pairs) _mm256_add_epi16(words[r], pairs)
#define Q4_HALF(ACC, R, U, HALF, FIELD, SUB)                                                                    \
    UNROLL for (int u = 0; u < U; u++) {                                                                        \
        __m256i words[R];                                                                                       \
        Q4_STEP(R, U, HALF, 0, FIRST_WORDS)                                                                     \
        _Pragma("GCC unroll 1") for (int j = 1; j < 4; j++) Q4_STEP(R, U, HALF, j, MORE_WORDS)                  \
        UNROLL for (int r = 0; r < R; r++)                                                                      \
            ACC[r][u].FIELD = _mm256_add_epi32(ACC[r][u].FIELD, _mm256_madd_epi16(words[r], SUB[u].FIELD));     \
    }
/* One row keeps SCALED_GROUP: bound by reading the weights, it measured 0.97x this way. */
#define q4_SCALED_GROUP(ACC, R, U, KIND, QSUM, LOAD8, SPANS, SPANS_LOOP)                                         \
    if (R == 1) SCALED_GROUP(ACC, R, U, KIND, QSUM, LOAD8, SPANS, SPANS_LOOP)                                   \
    else {                                                                                                      \
        sv sub[U];                                                                                              \
        UNROLL for (int u = 0; u < U; u++) sub[u] = sv_subs(w, ((p + u) * groups + g) * PANEL, 0);              \
        Q4_HALF(ACC, R, U, 0, a, sub)                                                                           \
        Q4_HALF(ACC, R, U, 1, b, sub)                                                                           \
    }
/* acc less zero * (each group's sub * sum of q), by pairs of groups: madd of (sub * zero) pairs and sum pairs. */
#define ZERO_SHARE(ACC, R, U, QSUM)                                                                             \
    if (zero) UNROLL for (int u = 0; u < U; u++) for (int64_t j = 0; j < per; j += 2) {                         \
            const sv pairs = sv_zero_pairs(w, ((p + u) * groups + g0 + j) * PANEL, zero);                       \
            UNROLL for (int r = 0; r < R; r++) {                                                                \
                const iv d = pair_dots(pairs, SUM_PAIR(r, g0 + j));                                             \
                ACC[r][u] = (iv){_mm256_sub_epi32(ACC[r][u].a, d.a), _mm256_sub_epi32(ACC[r][u].b, d.b)};       \
            }                                                                                                   \
        }
/* The superblocks' zeros and offsets take int8_rows' pairs of sums of q, not each group's (SUPER_QSUMS). */
#define SUPER_QSUMS(QSUM, R) (void)QSUM;
/* Each row's sum over the superblock's groups of sub-offset * sum of q, by pairs of groups: exact in int32
 * (|sum| <= 8 * 32 * 127 * 63 < 2^24), so its float is the float path's exact sum too. */
#define OFFSET_SUMS(OFFSETS, R, u, KIND, QSUM)                                                                  \
    {                                                                                                           \
        iv sums[R];                                                                                             \
        UNROLL for (int r = 0; r < R; r++) sums[r] = iv_set1(0);                                                \
        for (int64_t j = 0; j < per; j += 2) {                                                                  \
            const sv pairs = sv_offset_pairs(w, ((p + (u)) * groups + g0 + j) * PANEL, KIND##_FOUR_BIT);        \
            UNROLL for (int r = 0; r < R; r++) {                                                                \
                const iv d = pair_dots(pairs, SUM_PAIR(r, g0 + j));                                             \
                sums[r] = (iv){_mm256_add_epi32(sums[r].a, d.a), _mm256_add_epi32(sums[r].b, d.b)};             \
            }                                                                                                   \
        }                                                                                                       \
        UNROLL for (int r = 0; r < R; r++) OFFSETS[r] = iv_float(sums[r]);                                      \
    }
#else
#define SCALED_GROUP(ACC, R, U, KIND, QSUM, LOAD8, SPANS, SPANS_LOOP)                                            \
    {                                                                                                           \
        GROUP_DOTS(dot, R, U, KIND, QSUM, LOAD8, SPANS, SPANS_LOOP)                                             \
        UNROLL for (int u = 0; u < U; u++) {                                                                    \
            const iv sub = iv_subs(w, 0, ((p + u) * groups + g) * PANEL, KIND##_FOUR_BIT);                      \
            UNROLL for (int r = 0; r < R; r++) ACC[r][u] = iv_mul_add(ACC[r][u], dot[r][u], sub);               \
        }                                                                                                       \
    }
#define ZERO_SHARE(ACC, R, U, QSUM)
#define q4_SCALED_GROUP SCALED_GROUP
#define SUPER_QSUMS GROUP_QSUMS
#define OFFSET_SUMS(OFFSETS, R, u, KIND, QSUM)                                                                  \
    {                                                                                                           \
        UNROLL for (int r = 0; r < R; r++) OFFSETS[r] = pv_zero();                                              \
        for (int64_t j = 0; j < per; j++) {                                                                     \
            const pv sub = iv_float(iv_subs(w, 1, ((p + (u)) * groups + g0 + j) * PANEL, KIND##_FOUR_BIT));     \
            UNROLL for (int r = 0; r < R; r++) OFFSETS[r] = pv_fma((float)QSUM[j][r], sub, OFFSETS[r]);         \
        }                                                                                                       \
    }
#endif
#define q2_SCALED_GROUP SCALED_GROUP
#define q3_SCALED_GROUP SCALED_GROUP
#define q5_SCALED_GROUP SCALED_GROUP
#define q6_SCALED_GROUP SCALED_GROUP

/* A factored part's float step for a superblock of one row and panel (see the top): o = (super * d) * acc + o and,
 * with offsets, o = (super offset * d) * offsets + o. */
static inline void super_store(float *o, const pv supers[2], float d, iv acc, pv offsets, int has_min) {
    pv c = pv_fmav(pv_mul(supers[0], pv_set1(d)), iv_float(acc), pv_f32(o));
    if (has_min) c = pv_fmav(pv_mul(supers[1], pv_set1(d)), offsets, c);
    pv_store(o, c);
}

/* Factored parts: superblock g0 of R rows x U panels added to out (see the top). */
#define SUPERBLOCK(R, U, HAS_MIN, KIND, LOAD8, SPANS_LOOP)                                                      \
    {                                                                                                           \
        int32_t qsum[16][R]; /* per group of the superblock */                                                  \
        iv acc[R][U];                                                                                           \
        UNROLL for (int r = 0; r < R; r++) UNROLL for (int u = 0; u < U; u++) acc[r][u] = iv_set1(0);           \
        for (int64_t g = g0; g < g0 + per; g++) {                                                               \
            SUPER_QSUMS(qsum[g - g0], R)                                                                        \
            KIND##_SCALED_GROUP(acc, R, U, KIND, qsum[g - g0], LOAD8, KIND##_KGROUP / KIND##_SPAN, SPANS_LOOP)  \
        }                                                                                                       \
        ZERO_SHARE(acc, R, U, qsum)                                                                             \
        SUPER_STORE(acc, R, U, HAS_MIN, KIND, qsum)                                                             \
    }
/* The float steps of superblock g0 (super_store) for R rows x U panels of exact sums ACC; QSUM: each group's
 * sums of q (for the offsets). */
#define SUPER_STORE(ACC, R, U, HAS_MIN, KIND, QSUM)                                                             \
    {                                                                                                           \
        LOAD_SUPERS(supers, U, HAS_MIN, g0)                                                                     \
        UNROLL for (int u = 0; u < U; u++) {                                                                    \
            pv offsets[R];                                                                                      \
            if (HAS_MIN) OFFSET_SUMS(offsets, R, u, KIND, QSUM)                                                 \
            else UNROLL for (int r = 0; r < R; r++) offsets[r] = pv_zero();                                     \
            UNROLL for (int r = 0; r < R; r++) {                                                                \
                const float d = xq->d[(row + r) * (k / INT8_SUPER_BLOCK) + g0 / per];                           \
                super_store(out + (r * U + u) * PANEL, supers[u], d, ACC[r][u], offsets[r], HAS_MIN);           \
            }                                                                                                   \
        }                                                                                                       \
    }

/* Factored parts, superblock by superblock; c kept in out, touched once a superblock. */
#define DEFINE_I8_SUPER_TILE(NAME, R, SUF, U, HAS_MIN, KIND)                                                    \
    static void NAME##_##R##SUF(const struct int8_rows *xq, int64_t row, const struct packed_weight *w, int64_t p,  \
                                float *out) {                                                                   \
        const int64_t k = w->k, group = KIND##_KGROUP, groups = k / group, per = INT8_SUPER_BLOCK / group;      \
        const int zero = KIND##_zero(w, HAS_MIN);                                                               \
        const int8_t *x = xq->q + row * k;                                                                      \
        UNROLL for (int t = 0; t < R * U; t++) pv_store(out + t * PANEL, pv_zero());                            \
        for (int64_t g0 = 0; g0 < groups; g0 += per) SUPERBLOCK(R, U, HAS_MIN, KIND, FROM_PACKED, )             \
    }

/* A unit's superblock decoded once for all its rows (int8_decoded_unit): its bytes as the dots take them
 * (DECODE), and for the AVX2 build's tiles what they take besides (decoded_begin, decoded_step). */
typedef struct {
    bv w[INT8_SUPER_BLOCK / 8][UNIT][2];
#if defined(__AVX2__) && !defined(__AVX512F__)
    sv subs[INT8_SUPER_BLOCK / 16]; /* each group's sub-scales */
    iv start;                       /* each column's dots of 128 everywhere, negated */
#endif
} decoded;

#if defined(__AVX2__) && !defined(__AVX512F__)
/* The AVX2 build's decoded tiles: each half of the panel in turn, its rows' sums in registers, up to
 * DECODED_TILE_ROWS rows (the measured best on the Xeon), the sub-scales in the madd as in SCALED_GROUP. Parts with
 * a zero (Q6_K, Q3_K) take the weights less it (q - zero: -32..31 at most) as maddubs' signed operand, against
 * x + 128 (unsigned, 1..255), each row's dots starting from start = -(the dots of 128 everywhere):
 * (x + 128) . w - 128 . w = x . w, the same exact int32 with no share of the zero per row (ZERO_SHARE); two pairs
 * sum to at most 4 * 255 * 32 < 2^15 in 16 bits. x + 128 is made once a product (int8_rows' biased), not by each
 * tile for each superblock (Q6_K 1.04-1.10x at 8-512 rows, Q3_K 1.03-1.07x from 84, 4096 and 12288 k). Parts with
 * offsets take them as the packed tiles do. UNIT is 1.
 * Xeon, 4096 x 4096, 64-512 rows: Q6_K 1.17-1.22x, Q3_K 1.15-1.25x, Q5_K 1.04-1.07x faster than the packed tiles'
 * form (SUPERBLOCK from the decoded bytes, 4 rows); at 8 rows 0.95-1.04x. Q4_K's words sum a group's 4 steps
 * (WORD_STEPS): 1.06-1.10x its packed tiles from 20 rows. */
#define DECODED_TILE_ROWS 6
static inline __m256i decoded_pairs(const int8_t *x, __m256i w0, __m256i w1, int biased) {
    const __m256i x0 = _mm256_set1_epi32(four_bytes(x)), x1 = _mm256_set1_epi32(four_bytes(x + 4));
    return biased ? pairs8(x0, w0, x1, w1) : pairs8(w0, x0, w1, x1);
}
/* The 8-k steps whose pairs a 16-bit word sums before the madd by the sub-scale: Q4_K's 4 (a group; its values
 * are below 16: 16 * 15 * 127 < 2^15), the others' one (their 2 steps measured 0.85-0.93x). */
#define q2_WORD_STEPS 1
#define q3_WORD_STEPS 1
#define q4_WORD_STEPS 4
#define q5_WORD_STEPS 1
#define q6_WORD_STEPS 1
/* Half FIELD (a or b) of the R rows from XS[r] against the unit, added to ACC. A word of one step is taken by
 * its madd at once: holding all R words first spills (Q6_K 0.89-0.93x). */
#define DECODED_HALF(ACC, R, FIELD, XS, BIASED, STEPS)                                                         \
    {                                                                                                           \
        __m256i sums[R];                                                                                        \
        UNROLL for (int r = 0; r < R; r++) sums[r] = ACC[r][0].FIELD;                                           \
        for (int64_t s = 0; s < INT8_SUPER_BLOCK / 8; s += STEPS) {                                             \
            const __m256i sub = dec->subs[s * 8 / group].FIELD;                                                 \
            __m256i words[R];                                                                                   \
            UNROLL for (int r = 0; r < R; r++) {                                                                \
                words[r] = decoded_pairs(XS[r] + 8 * s, dec->w[s][0][0].FIELD, dec->w[s][0][1].FIELD, BIASED);  \
                if (STEPS == 1) sums[r] = _mm256_add_epi32(sums[r], _mm256_madd_epi16(words[r], sub));          \
            }                                                                                                   \
            if (STEPS > 1) {                                                                                    \
                _Pragma("GCC unroll 1") for (int64_t t = s + 1; t < s + STEPS; t++) UNROLL for (int r = 0; r < R; r++) \
                    words[r] = _mm256_add_epi16(words[r], decoded_pairs(XS[r] + 8 * t, dec->w[t][0][0].FIELD,  \
                                                                        dec->w[t][0][1].FIELD, BIASED));        \
                UNROLL for (int r = 0; r < R; r++) sums[r] = _mm256_add_epi32(sums[r], _mm256_madd_epi16(words[r], sub)); \
            }                                                                                                   \
        }                                                                                                       \
        UNROLL for (int r = 0; r < R; r++) ACC[r][0].FIELD = sums[r];                                           \
    }
/* As DECODE decodes a unit's superblock: each group's sub-scales and start first, then with a zero each step's
 * weights less it and their share of start. */
static inline void decoded_begin(decoded *dec, const struct packed_weight *w, int64_t p, int64_t g0, int64_t group, int four_bit) {
    for (int64_t g = 0; g < INT8_SUPER_BLOCK / group; g++) dec->subs[g] = sv_subs(w, (p * (w->k / group) + g0 + g) * PANEL, four_bit);
    dec->start = iv_set1(0);
}
static inline void decoded_step(decoded *dec, int64_t s, int64_t group, int zero) {
    if (!zero) return;
    const __m256i z = _mm256_set1_epi8((char)zero), bias = _mm256_set1_epi8((char)0x80); /* 128, unsigned */
    bv *v = dec->w[s][0];
    const sv *sub = &dec->subs[s * 8 / group];
    v[0] = (bv){_mm256_sub_epi8(v[0].a, z), _mm256_sub_epi8(v[0].b, z)};
    v[1] = (bv){_mm256_sub_epi8(v[1].a, z), _mm256_sub_epi8(v[1].b, z)};
    const __m256i a = pairs8(bias, v[0].a, bias, v[1].a), b = pairs8(bias, v[0].b, bias, v[1].b);
    dec->start = (iv){_mm256_sub_epi32(dec->start.a, _mm256_madd_epi16(a, sub->a)), _mm256_sub_epi32(dec->start.b, _mm256_madd_epi16(b, sub->b))};
}
#define DEFINE_I8_DECODED_TILE(NAME, R, HAS_MIN, KIND)                                                          \
    static void NAME##_##R##d(const struct int8_rows *xq, int64_t row, const struct packed_weight *w, int64_t p,   \
                              int64_t g0, const decoded *dec, float *out) {                                     \
        const int64_t k = w->k, group = KIND##_KGROUP, groups = k / group, per = INT8_SUPER_BLOCK / group;      \
        const int8_t *xs[R];                                                                                    \
        UNROLL for (int r = 0; r < R; r++) xs[r] = (HAS_MIN ? xq->q : xq->biased) + (row + r) * k + g0 * group; \
        iv acc[R][1];                                                                                           \
        UNROLL for (int r = 0; r < R; r++) acc[r][0] = dec->start;                                              \
        DECODED_HALF(acc, R, a, xs, !HAS_MIN, KIND##_WORD_STEPS)                                                \
        DECODED_HALF(acc, R, b, xs, !HAS_MIN, KIND##_WORD_STEPS)                                                \
        SUPER_STORE(acc, R, 1, HAS_MIN, KIND, )                                                                 \
    }
#else
/* The same as the packed tiles for one superblock from the unit's decoded bytes. */
#define DECODED_TILE_ROWS int8_rows_for(w)
static inline void decoded_begin(decoded *dec, const struct packed_weight *w, int64_t p, int64_t g0, int64_t group, int four_bit) {
    (void)dec, (void)w, (void)p, (void)g0, (void)group, (void)four_bit;
}
static inline void decoded_step(decoded *dec, int64_t s, int64_t group, int zero) { (void)dec, (void)s, (void)group, (void)zero; }
#define DEFINE_I8_DECODED_TILE(NAME, R, HAS_MIN, KIND)                                                          \
    static void NAME##_##R##d(const struct int8_rows *xq, int64_t row, const struct packed_weight *w, int64_t p,   \
                              int64_t g0, const decoded *decoded_unit, float *out) {                            \
        const int64_t k = w->k, group = KIND##_KGROUP, groups = k / group, per = INT8_SUPER_BLOCK / group;      \
        const int zero = KIND##_zero(w, HAS_MIN);                                                               \
        const int8_t *x = xq->q + row * k;                                                                      \
        const bv(*dec)[UNIT][2] = decoded_unit->w;                                                              \
        SUPERBLOCK(R, UNIT, HAS_MIN, KIND, FROM_DECODED, DECODED_SPANS)                                         \
    }
#endif

/* A unit's UNIT panels of superblock g0, decoded to bytes as the dots take them (and decoded_begin, decoded_step);
 * the loads fetch the next superblock's bytes ahead, while this one's tiles run (the hardware prefetchers have
 * stopped by then: Xeon, AVX2 build, 12288 x 4096 at 84-512 rows, Q6_K 1.04-1.08x, Q4_K 1.03-1.05x). */
#define DEFINE_DECODE(KIND)                                                                                     \
    static void KIND##_decode(const struct packed_weight *w, int64_t p, int64_t g0, decoded *dec) {             \
        const int64_t i0 = g0 * KIND##_KGROUP;                                                                  \
        decoded_begin(dec, w, p, g0, KIND##_KGROUP, KIND##_FOUR_BIT);                                           \
        for (int64_t i = i0; i < i0 + INT8_SUPER_BLOCK; i += KIND##_SPAN)                                       \
            UNROLL for (int o = 0; o < KIND##_SPAN; o += 8) UNROLL for (int u = 0; u < UNIT; u++) {             \
                KIND##_load8(w, p + u, i + o, o, 1, dec->w[(i - i0 + o) / 8][u]);                               \
                decoded_step(dec, (i - i0 + o) / 8, KIND##_KGROUP, w->has_min ? 0 : w->zero);                   \
            }                                                                                                   \
    }
#if !defined(__AMX_INT8__) /* which decodes to its own tiles (below) */
DEFINE_DECODE(q2)
DEFINE_DECODE(q3)
DEFINE_DECODE(q5)
DEFINE_DECODE(q6)
#endif

TILES_OF(DEFINE_I8_TILE, q8, 0, q8)
TILES_OF(DEFINE_I8_TILE, q8m, 1, q8)
TILES_OF(DEFINE_I8_TILE, q4, 0, q4)
TILES_OF(DEFINE_I8_TILE, q4m, 1, q4)
TILES_OF(DEFINE_I8_TILE, q5, 0, q5)
TILES_OF(DEFINE_I8_TILE, q5m, 1, q5)
TILES_OF(DEFINE_I8_TILE, q6, 0, q6)
TILES_OF(DEFINE_I8_TILE, q6m, 1, q6)
TILES_OF(DEFINE_I8_TILE, q2, 0, q2)
TILES_OF(DEFINE_I8_TILE, q2m, 1, q2)
TILES_OF(DEFINE_I8_TILE, q3, 0, q3)
TILES_OF(DEFINE_I8_TILE, q3m, 1, q3)
/* The K-quants: Q4_K, Q5_K (offsets), Q6_K, Q3_K (zeros), Q2_K (offsets, 4-bit factors). */
TILES_OF(DEFINE_I8_SUPER_TILE, k_q4m, 1, q4)
TILES_OF(DEFINE_I8_SUPER_TILE, k_q5m, 1, q5)
TILES_OF(DEFINE_I8_SUPER_TILE, k_q6, 0, q6)
TILES_OF(DEFINE_I8_SUPER_TILE, k_q2m, 1, q2)
TILES_OF(DEFINE_I8_SUPER_TILE, k_q3, 0, q3)

typedef void (*int8_tile_fn)(const struct int8_rows *, int64_t, const struct packed_weight *, int64_t, float *);
#define INT_FORMATS(T) {T(q8), T(q8m), T(q4), T(q4m), T(q5), T(q5m), T(q6), T(q6m), T(q2), T(q2m), T(q3), T(q3m)}
#define FACTORED_FORMATS(T) {{0}, {0}, {0}, T(k_q4m), {0}, T(k_q5m), T(k_q6), {0}, {0}, T(k_q2m), T(k_q3), {0}}
static const int8_tile_fn NARROW_INT8[2][12][8] = {INT_FORMATS(NARROW_TABLE), FACTORED_FORMATS(NARROW_TABLE)};
static const int8_tile_fn WIDE_INT8[2][12][3] = {INT_FORMATS(WIDE_TABLE), FACTORED_FORMATS(WIDE_TABLE)};

#define DECODED_OF(NAME, HAS_MIN, KIND)                                                                         \
    DEFINE_I8_DECODED_TILE(NAME, 1, HAS_MIN, KIND) DEFINE_I8_DECODED_TILE(NAME, 2, HAS_MIN, KIND)               \
    DEFINE_I8_DECODED_TILE(NAME, 3, HAS_MIN, KIND) DEFINE_I8_DECODED_TILE(NAME, 4, HAS_MIN, KIND)               \
    DEFINE_I8_DECODED_TILE(NAME, 5, HAS_MIN, KIND) DEFINE_I8_DECODED_TILE(NAME, 6, HAS_MIN, KIND)               \
    DEFINE_I8_DECODED_TILE(NAME, 7, HAS_MIN, KIND) DEFINE_I8_DECODED_TILE(NAME, 8, HAS_MIN, KIND)
#if !defined(__AMX_INT8__)
DECODED_OF(k_q5m, 1, q5)
DECODED_OF(k_q6, 0, q6)
DECODED_OF(k_q2m, 1, q2)
DECODED_OF(k_q3, 0, q3)
#if defined(__AVX2__) && !defined(__AVX512F__)
DEFINE_DECODE(q4)
DECODED_OF(k_q4m, 1, q4)
#define Q4_DECODED DECODED_TABLE(k_q4m)
#define Q4_DECODE q4_decode
#else /* the AVX-512 and portable builds: its bytes are a mask and a shift away, and decoding them ahead measured no
       * faster (Zen 4) */
#define Q4_DECODED {0}
#define Q4_DECODE 0
#endif
typedef void (*decoded_tile_fn)(const struct int8_rows *, int64_t, const struct packed_weight *, int64_t, int64_t,
                                const decoded *, float *);
typedef void (*decode_fn)(const struct packed_weight *, int64_t, int64_t, decoded *);
#define DECODED_TABLE(N) {N##_1d, N##_2d, N##_3d, N##_4d, N##_5d, N##_6d, N##_7d, N##_8d}
static const decoded_tile_fn DECODED_INT8[12][8] = {{0}, {0}, {0}, Q4_DECODED, {0}, DECODED_TABLE(k_q5m), DECODED_TABLE(k_q6), {0}, {0},
                                                   DECODED_TABLE(k_q2m), DECODED_TABLE(k_q3), {0}};
static const decode_fn DECODE[12] = {0, 0, 0, Q4_DECODE, 0, q5_decode, q6_decode, 0, 0, q2_decode, q3_decode, 0};
#endif

static int format_of(const struct packed_weight *w) { return 2 * (w->format - FMT_Q8) + (w->has_min != 0); }

int64_t int8_block(const struct packed_weight *w) { return w->factored ? INT8_SUPER_BLOCK : INT8_BLOCK; }

static const int8_t KGROUP[12] = {0, 0, 0, q4_KGROUP, 0, q5_KGROUP, q6_KGROUP, 0, 0, q2_KGROUP, q3_KGROUP, 0};
static const int8_t FOUR_BIT[12] = {0, 0, 0, q4_FOUR_BIT, 0, q5_FOUR_BIT, q6_FOUR_BIT, 0, 0, q2_FOUR_BIT, q3_FOUR_BIT, 0};

int int8_tiles_for(const struct packed_weight *w) {
    const int f = format_of(w);
    if (w->factored && (w->group != KGROUP[f] || (w->factored == FACTORS_4BIT) != FOUR_BIT[f])) return 0;
    return NARROW_INT8[w->factored != 0][f][0] != 0;
}

/* The rows of a narrow tile, per layout (as the tables), measured on Zen 4 at 16-512 rows: past these the
 * dots and their sums (R x U of each) no longer fit the 32 registers and spill once a group. With AVX2's 16
 * registers, 4 (AVX2 build, Xeon: Q6_K 1.05-1.16x over 3 once its sub-scales went into the madds), and Q4_K 6,
 * whose groups go half a panel at a time with only the rows' 16-bit sums in registers (1.02-1.09x over 4). */
#if defined(__AVX512F__)
static const int8_t INT8_ROWS[2][12] = {{4, 4, 4, 4, 6, 6, 8, 8, 8, 8, 8, 8}, {0, 0, 0, 4, 0, 6, 6, 0, 0, 8, 8, 0}};
#elif defined(__AVX2__)
static const int8_t INT8_ROWS[2][12] = {{4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4}, {0, 0, 0, 6, 0, 4, 4, 0, 0, 4, 4, 0}};
#else
static const int8_t INT8_ROWS[2][12] = {{4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4}, {0, 0, 0, 4, 0, 4, 4, 0, 0, 4, 4, 0}};
#endif

int int8_rows_for(const struct packed_weight *w) { return INT8_ROWS[w->factored != 0][format_of(w)]; }

void int8_tile(const struct int8_rows *xq, int64_t row, int rows, int wide, const struct packed_weight *w, int64_t p,
               float *out) {
    const int f = format_of(w), superblocks = w->factored != 0;
    (wide ? WIDE_INT8[superblocks][f] : NARROW_INT8[superblocks][f])[rows - 1](xq, row, w, p, out);
}

#if defined(__AMX_INT8__)
/* The AMX build (Intel, from Sapphire Rapids): a K-quant's superblock as tile products, 16 rows x 64 k x 16
 * columns an instruction. The dots of a superblock are summed with each group's sub-scale, so the sub-scale goes
 * into the weights: W = sub * (q - zero), whose 13 bits are split into two int8 tiles, W = hi * 64 + lo (lo in
 * 0..63), and acc = 64 * (x . hi) + x . lo: the same exact int32 as the dots' (|acc| < 2^28). With offsets, a
 * third tile holds each k's sub-offset, and x . that is the sum of sub-offset * sum of q over the groups, the
 * tiles' float sum of small integers, exactly. Then the same float steps (super_store): the same bits as every
 * build. Each superblock of a unit is decoded to those tiles once (16-24 KB) for all the unit's rows. */
#include <sys/syscall.h>
#include <unistd.h>

#define AMX_STEPS (INT8_SUPER_BLOCK / TILE_K) /* tile products a superblock (a weight tile: TILE_K / 4 rows) */
#define AMX_SPLIT 6 /* W = hi << AMX_SPLIT + lo */
#if UNIT != 2
#error "the AMX tiles are laid out for two panels a unit"
#endif

/* Linux hands out AMX's tile state only on request, per process (build.py's probe checks that it runs). */
__attribute__((constructor)) static void amx_permit(void) {
    syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */);
}

/* tmm0, tmm1: panel 0's sums of x . hi and x . lo; tmm2, tmm3: panel 1's; tmm4, tmm5: the panels' x . offsets;
 * tmm6: x; tmm7: a weight tile. All 16 rows: a tile's rows past m are zeros (quantize_rows_body). */
static void amx_configure(void) {
    struct {
        uint8_t palette, start_row, reserved[14];
        uint16_t bytes[16];
        uint8_t rows[16];
    } config = {.palette = 1};
    for (int t = 0; t < 8; t++) config.bytes[t] = 64, config.rows[t] = TILE_ROWS;
    _tile_loadconfig(&config);
}

/* A unit's superblock as weight tiles: [panel][step of 64 k][hi, lo, offsets][k / 4 of the step][16 columns][4 k]. */
typedef int8_t amx_weights[UNIT][AMX_STEPS][3][TILE_ROWS * 64];

/* Column 8 * half + t / 2's sub-scale in both 16-bit halves of lane t: the words of 8 columns' [4 k] bytes. */
static inline __m512i amx_sub_words(iv sub, int half) {
    const __m512i lane = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    const __m512i s = _mm512_permutexvar_epi32(_mm512_add_epi32(lane, _mm512_set1_epi32(8 * half)), sub.v);
    return _mm512_or_si512(_mm512_and_si512(s, _mm512_set1_epi32(0xFFFF)), _mm512_slli_epi32(s, 16));
}

/* 4 k of 16 columns, v ([16][4] bytes, before the zero), as their rows of the hi and lo tiles. */
static inline void amx_split(bv v, __m512i zero, const __m512i subs[2], int8_t *hi, int8_t *lo) {
    __m256i h[2], l[2];
    for (int half = 0; half < 2; half++) {
        const __m256i bytes = half ? _mm512_extracti64x4_epi64(v.v, 1) : _mm512_castsi512_si256(v.v);
        const __m512i scaled = _mm512_mullo_epi16(_mm512_sub_epi16(_mm512_cvtepu8_epi16(bytes), zero), subs[half]);
        h[half] = _mm512_cvtepi16_epi8(_mm512_srai_epi16(scaled, AMX_SPLIT));
        l[half] = _mm512_cvtepi16_epi8(_mm512_and_si512(scaled, _mm512_set1_epi16((1 << AMX_SPLIT) - 1)));
    }
    _mm512_store_si512(hi, _mm512_inserti64x4(_mm512_castsi256_si512(h[0]), h[1], 1));
    _mm512_store_si512(lo, _mm512_inserti64x4(_mm512_castsi256_si512(l[0]), l[1], 1));
}

/* A group's sub-offsets of 16 columns, each in the 4 bytes of a column, on the tiles' rows of its k from i. */
static inline void amx_offsets(iv subs, int64_t i, int64_t group, int8_t (*b)[3][TILE_ROWS * 64]) {
    const __m512i row = _mm512_mullo_epi32(subs.v, _mm512_set1_epi32(0x01010101));
    for (int64_t j = i; j < i + group; j += 4) _mm512_store_si512(b[j / TILE_K][2] + j % TILE_K / 4 * 64, row);
}

#define DEFINE_AMX_DECODE(KIND, HAS_MIN)                                                                        \
    static void KIND##_amx_decode(const struct packed_weight *w, int64_t p, int64_t g0, amx_weights b) {        \
        const int64_t group = KIND##_KGROUP, groups = w->k / group, per = INT8_SUPER_BLOCK / group;             \
        const __m512i zero = _mm512_set1_epi16((int16_t)KIND##_zero(w, HAS_MIN));                               \
        for (int u = 0; u < UNIT; u++)                                                                          \
            for (int64_t g = 0; g < per; g++) {                                                                 \
                const int64_t at = ((p + u) * groups + g0 + g) * PANEL;                                         \
                const iv sub = iv_subs(w, 0, at, KIND##_FOUR_BIT);                                              \
                const __m512i subs[2] = {amx_sub_words(sub, 0), amx_sub_words(sub, 1)};                         \
                if (HAS_MIN) amx_offsets(iv_subs(w, 1, at, KIND##_FOUR_BIT), g * group, group, b[u]);           \
                for (int64_t span = 0; span < group; span += KIND##_SPAN)                                       \
                    UNROLL for (int o = 0; o < KIND##_SPAN; o += 8) {                                           \
                        const int64_t i = g * group + span + o; /* k into the superblock */                     \
                        bv v[2];                                                                                \
                        KIND##_load8(w, p + u, g0 * group + i, o, 0, v);                                        \
                        UNROLL for (int h = 0; h < 2; h++) {                                                    \
                            const int64_t step = (i + 4 * h) / TILE_K, row = (i + 4 * h) % TILE_K / 4 * 64;     \
                            amx_split(v[h], zero, subs, b[u][step][0] + row, b[u][step][1] + row);              \
                        }                                                                                       \
                    }                                                                                           \
            }                                                                                                   \
    }
DEFINE_AMX_DECODE(q2, 1)
DEFINE_AMX_DECODE(q3, 0)
DEFINE_AMX_DECODE(q4, 1)
DEFINE_AMX_DECODE(q5, 1)
DEFINE_AMX_DECODE(q6, 0)
typedef void (*amx_decode_fn)(const struct packed_weight *, int64_t, int64_t, amx_weights);
static const amx_decode_fn AMX_DECODE[12] = {0, 0, 0, q4_amx_decode, 0, q5_amx_decode, q6_amx_decode, 0, 0,
                                             q2_amx_decode, q3_amx_decode, 0};

/* Step s of 64 k: x into tmm6, then its products with each weight tile, loaded in turn into tmm7 (rotating the
 * weights through more tiles, or x through two, measured no faster). */
#define AMX_PRODUCT(C, tile)                                                                                    \
    _tile_loadd(7, tile, 64);                                                                                   \
    _tile_dpbssd(C, 6, 7);
#define AMX_STEP(x, b, s)                                                                                       \
    _tile_loadd(6, x, TILE_K);                                                                                  \
    AMX_PRODUCT(0, (b)[0][s][0])                                                                                \
    AMX_PRODUCT(1, (b)[0][s][1])                                                                                \
    AMX_PRODUCT(2, (b)[1][s][0])                                                                                \
    AMX_PRODUCT(3, (b)[1][s][1])                                                                                \
    if (has_min) {                                                                                              \
        AMX_PRODUCT(4, (b)[0][s][2])                                                                            \
        AMX_PRODUCT(5, (b)[1][s][2])                                                                            \
    }

/* Superblock g0 of the tile of rows from `row` (its first `rows` kept) against the decoded unit, added to out. */
static void amx_superblock(const struct int8_rows *xq, int64_t row, int rows, const struct packed_weight *w,
                           int64_t p, int64_t g0, amx_weights b, float *out) {
    const int64_t k = w->k, group = w->group, per = INT8_SUPER_BLOCK / group;
    const int has_min = w->has_min != 0;
    const int8_t *x = tile_row(xq, row, g0 * group / TILE_K);
    int32_t sums[3][UNIT][TILE_ROWS][PANEL] __attribute__((aligned(64))); /* hi, lo, offsets */
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    if (has_min) {
        _tile_zero(4);
        _tile_zero(5);
    }
    for (int s = 0; s < AMX_STEPS; s++) {
        AMX_STEP(x + s * TILE_ROWS * TILE_K, b, s)
    }
    _tile_stored(0, sums[0][0], 64);
    _tile_stored(1, sums[1][0], 64);
    _tile_stored(2, sums[0][1], 64);
    _tile_stored(3, sums[1][1], 64);
    if (has_min) {
        _tile_stored(4, sums[2][0], 64);
        _tile_stored(5, sums[2][1], 64);
    }
    LOAD_SUPERS(supers, UNIT, has_min, g0)
    for (int r = 0; r < rows; r++) {
        const float d = xq->d[(row + r) * (k / INT8_SUPER_BLOCK) + g0 / per];
        for (int u = 0; u < UNIT; u++) {
            const __m512i hi = _mm512_load_si512(sums[0][u][r]), lo = _mm512_load_si512(sums[1][u][r]);
            const pv offsets = has_min ? iv_float((iv){_mm512_load_si512(sums[2][u][r])}) : pv_zero();
            super_store(out + (r * UNIT + u) * PANEL, supers[u], d,
                        (iv){_mm512_add_epi32(_mm512_slli_epi32(hi, AMX_SPLIT), lo)}, offsets, has_min);
        }
    }
}

/* From two tiles' rows up, a unit's rows all run in tiles against each superblock decoded once. */
#define AMX_FROM_ROWS (2 * TILE_ROWS)

int64_t int8_tiles_size(int64_t m, int64_t k, int64_t block) {
    return block == INT8_SUPER_BLOCK && m >= AMX_FROM_ROWS ? (m + TILE_ROWS - 1) / TILE_ROWS * TILE_ROWS * k : 0;
}

int int8_decodes(const struct packed_weight *w, int64_t rows) {
    return rows >= AMX_FROM_ROWS && w->factored && AMX_DECODE[format_of(w)] != 0;
}

void int8_decoded_unit(const struct int8_rows *xq, int64_t row0, int64_t rows, const struct packed_weight *w,
                       int64_t p, float *out) {
    const int64_t groups = w->k / w->group, per = groups_per_super(w);
    amx_weights b __attribute__((aligned(64)));
    amx_configure();
    memset(out, 0, sizeof(float) * rows * UNIT * PANEL);
    for (int64_t g0 = 0; g0 < groups; g0 += per) {
        AMX_DECODE[format_of(w)](w, p, g0, b);
        for (int64_t row = row0; row < row0 + rows; row += TILE_ROWS) {
            const int n = row0 + rows - row < TILE_ROWS ? (int)(row0 + rows - row) : TILE_ROWS;
            amx_superblock(xq, row, n, w, p, g0, b, out + (row - row0) * UNIT * PANEL);
        }
    }
    _tile_release();
}
#else
int64_t int8_tiles_size(int64_t m, int64_t k, int64_t block) { return (void)m, (void)k, (void)block, 0; }

/* Rows from which a unit's rows take the decoded tiles, measured on Zen 4 (2 threads, 12288 x 4096): at 24
 * rows and up Q6_K 1.06-1.37x, Q5_K 1.08-1.28x, Q3_K and Q2_K 1.1-1.5x faster; at 16 and fewer level or
 * slower, the decoding then shared by too few tiles. The AVX2 build shares it from 2 tiles of 4 rows: at 8-20
 * rows Q6_K 1.03-1.20x, Q5_K 1.04-1.17x, Q3_K 1.3-1.7x (Xeon, 4096 x 4096), level at 4-6; and Q4_K (that build
 * only) from 16: 1.01-1.04x at 16, 1.06-1.10x from 20 (4096 x 4096 and 12288), 0.88-0.98x at 8-12. */
#if defined(__AVX2__) && !defined(__AVX512F__)
static const int8_t DECODED_ROWS[12] = {0, 0, 0, 16, 0, 8, 8, 0, 0, 8, 8, 0};
#else
static const int8_t DECODED_ROWS[12] = {0, 0, 0, 24, 0, 24, 24, 0, 0, 24, 24, 0};
#endif
int int8_decodes(const struct packed_weight *w, int64_t rows) {
    const int f = format_of(w);
    return w->factored && DECODE[f] != 0 && rows >= DECODED_ROWS[f];
}

void int8_decoded_unit(const struct int8_rows *xq, int64_t row0, int64_t rows, const struct packed_weight *w,
                       int64_t p, float *out) {
    const int f = format_of(w), max_rows = DECODED_TILE_ROWS;
    const int64_t groups = w->k / w->group, per = groups_per_super(w);
    decoded dec __attribute__((aligned(64)));
    memset(out, 0, sizeof(float) * rows * UNIT * PANEL);
    for (int64_t g0 = 0; g0 < groups; g0 += per) {
        DECODE[f](w, p, g0, &dec);
        for (int64_t row = row0; row < row0 + rows;) { /* tiles of even rows: 8 as 4 + 4, not 6 + 2 */
            const int64_t left = row0 + rows - row, tiles = (left + max_rows - 1) / max_rows;
            const int n = (int)((left + tiles - 1) / tiles);
            DECODED_INT8[f][n - 1](xq, row, w, p, g0, &dec, out + (row - row0) * UNIT * PANEL);
            row += n;
        }
    }
}
#endif
