/* A whole Llama-family decoder layer in one call and one OpenMP parallel region: RMSNorm, the fused q/k/v
 * projection, (Qwen3's q/k norms), rotary embedding with the KV write, paged attention, the output projection
 * added to x, RMSNorm, the fused gate/up projection, SiLU * up, and the down projection added to x. The same
 * kernel bodies as the separate calls, so the same bits; what it saves is a dozen Python calls and thread
 * wake-ups per layer. x [rows, hidden] is updated in place. */
#include <stdint.h>

#include "kernels.h"

struct decoder_layer {
    struct packed_weight qkv, o, gate_up, down;
    const float *input_norm, *post_norm, *q_norm, *k_norm; /* q_norm, k_norm: NULL unless Qwen3 */
    int64_t num_heads, num_kv_heads, head_dim, window;
    float eps, scale;
};

struct step {
    const float *cos, *sin; /* [rows, head_dim] */
    const int64_t *slots, *row_table_offset, *tables, *positions;
    int64_t rows, block_size;
    int32_t kv_type;
};

/* scratch: floats for the layer's intermediates, decoder_layer_scratch() of them. */
int64_t decoder_layer_scratch(const struct decoder_layer *L, int64_t rows) {
    const int64_t hidden = weight_columns(&L->o), qkv = weight_columns(&L->qkv), inter = L->down.k;
    int64_t sums = 0;
    const struct packed_weight *all[] = {&L->qkv, &L->o, &L->gate_up, &L->down};
    for (int i = 0; i < 4; i++) sums = xsum_size(all[i], rows) > sums ? xsum_size(all[i], rows) : sums;
    return rows * (hidden + qkv + L->num_heads * L->head_dim + 3 * inter) + sums;
}

void decoder_layer_f32(const struct decoder_layer *L, float *x, const struct step *s, void *k_cache, void *v_cache,
                       float *scratch, int num_threads) {
    const int64_t t = s->rows, hidden = weight_columns(&L->o), inter = L->down.k, D = L->head_dim;
    const int64_t qkv_n = weight_columns(&L->qkv);
    float *h = scratch, *qkv = h + t * hidden, *attn = qkv + t * qkv_n, *gate_up = attn + t * L->num_heads * D;
    float *act = gate_up + t * 2 * inter, *xsum = act + t * inter;
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
        gemm_body(h, t, &L->gate_up, gate_up, 0, xsum);
        gated_mul_body(gate_up, t, inter, ACT_SILU, act);
        gemm_body(act, t, &L->down, x, 1, xsum);
    }
}
