/* A whole Llama-family decoder layer in one call and one OpenMP parallel region: RMSNorm, the fused q/k/v
 * projection, (Qwen3's q/k norms), rotary embedding with the KV write, paged attention, the output projection
 * added to x, RMSNorm, then the MLP added to x: the fused gate/up projection, SiLU * up and the down
 * projection, or a mixture of experts (the router's projection, its choice, the experts' weighted outputs,
 * experts.c). The same kernel bodies as the separate calls, in the same order, so the same bits; what it saves
 * is a dozen Python calls and thread wake-ups per layer. x [rows, hidden] is updated in place. */
#include <stdint.h>

#include "kernels.h"

struct decoder_layer {
    struct packed_weight qkv, o, gate_up, down; /* gate_up, down: unused where `experts` */
    const float *input_norm, *post_norm, *q_norm, *k_norm; /* q_norm, k_norm: NULL unless Qwen3 */
    int64_t num_heads, num_kv_heads, head_dim, window;
    float eps, scale;
    const struct packed_weight *router; /* a mixture of experts in place of the MLP, where `experts` */
    const struct expert_group *experts;
    int64_t top_k;
    int32_t normalize;
};

struct step {
    const float *cos, *sin; /* [rows, head_dim] */
    const int64_t *slots, *row_table_offset, *tables, *positions;
    int64_t rows, block_size;
    int32_t kv_type;
};

/* A mixture of experts' share of the scratch, for `rows` rows: the router's choice (its int64 arrays first,
 * where the scratch is 8-byte aligned), its logits, the experts' summed output and their own scratch, sized for
 * the most assignments one expert can have, one per row. */
struct moe_scratch {
    int64_t *rows, *starts;
    float *weights, *logits, *out, *experts;
};

static int64_t moe_floats(const struct decoder_layer *L, int64_t rows, int num_threads) {
    if (!L->experts) return 0;
    const int64_t assignments = rows * L->top_k, experts = L->experts->num_experts;
    return 2 * assignments + 2 * (experts + 1) + assignments + rows * experts + rows * L->experts->hidden +
           expert_group_scratch(L->experts, rows, assignments, num_threads);
}

static struct moe_scratch moe_scratch_in(const struct decoder_layer *L, int64_t rows, float *scratch) {
    const int64_t assignments = rows * L->top_k, experts = L->experts->num_experts;
    struct moe_scratch m;
    m.rows = (int64_t *)scratch;
    m.starts = m.rows + assignments;
    m.weights = (float *)(m.starts + experts + 1);
    m.logits = m.weights + assignments;
    m.out = m.logits + rows * experts;
    m.experts = m.out + rows * L->experts->hidden;
    return m;
}

/* scratch: floats for the layer's intermediates, decoder_layer_scratch() of them. */
int64_t decoder_layer_scratch(const struct decoder_layer *L, int64_t rows, int num_threads) {
    const int64_t hidden = weight_columns(&L->o), qkv = weight_columns(&L->qkv), inter = L->down.k;
    int64_t sums = L->experts ? xsum_size(L->router, rows) : 0;
    const struct packed_weight *all[] = {&L->qkv, &L->o, &L->gate_up, &L->down};
    for (int i = 0; i < 4; i++) sums = xsum_size(all[i], rows) > sums ? xsum_size(all[i], rows) : sums;
    return moe_floats(L, rows, num_threads) + rows * (hidden + qkv + L->num_heads * L->head_dim + 3 * inter) +
           sums;
}

/* x += the experts' weighted outputs for h, by the current team; most: shared by the team. */
static void add_experts(const struct decoder_layer *L, float *x, const float *h, int64_t t, float *xsum,
                        struct moe_scratch *m, int64_t *most) {
    const int64_t hidden = L->experts->hidden, experts = L->experts->num_experts;
    gemm_body(h, t, L->router, m->logits, 0, xsum);
#pragma omp single
    *most = route_tokens(m->logits, t, experts, L->top_k, L->normalize, m->rows, m->weights, m->starts);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < t * hidden; i++) m->out[i] = 0.0f;
    expert_group_body(L->experts, h, m->rows, m->weights, m->starts, *most, m->out, m->experts);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < t * hidden; i++) x[i] += m->out[i];
}

void decoder_layer_f32(const struct decoder_layer *L, float *x, const struct step *s, void *k_cache, void *v_cache,
                       float *scratch, int num_threads) {
    const int64_t t = s->rows, hidden = weight_columns(&L->o), inter = L->down.k, D = L->head_dim;
    const int64_t qkv_n = weight_columns(&L->qkv);
    struct moe_scratch moe = {0};
    if (L->experts) moe = moe_scratch_in(L, t, scratch);
    float *h = scratch + moe_floats(L, t, num_threads), *qkv = h + t * hidden, *attn = qkv + t * qkv_n;
    float *gate_up = attn + t * L->num_heads * D, *act = gate_up + t * 2 * inter, *xsum = act + t * inter;
    int64_t most = 0;
#pragma omp parallel num_threads(num_threads)
    {
        rms_norm_body(x, t, hidden, L->input_norm, L->eps, h);
        gemm_body(h, t, &L->qkv, qkv, 0, xsum);
        if (L->q_norm) head_norm_body(qkv, t, L->num_heads, L->num_kv_heads, D, L->q_norm, L->k_norm, L->eps);
        rope_store_body(qkv, t, L->num_heads, L->num_kv_heads, D, s->cos, s->sin, k_cache, v_cache, s->kv_type,
                        s->slots, s->block_size);
        attention_body(qkv, qkv_n, k_cache, v_cache, s->kv_type, attn, s->row_table_offset, s->tables,
                       s->positions, t, L->num_heads, L->num_kv_heads, D, s->block_size, L->window, L->scale);
        gemm_body(attn, t, &L->o, x, 1, xsum);
        rms_norm_body(x, t, hidden, L->post_norm, L->eps, h);
        if (L->experts) {
            add_experts(L, x, h, t, xsum, &moe, &most);
        } else {
            gemm_body(h, t, &L->gate_up, gate_up, 0, xsum);
            gated_mul_body(gate_up, t, inter, ACT_SILU, act);
            gemm_body(act, t, &L->down, x, 1, xsum);
        }
    }
}
