/* A mixture of experts' MLPs in one call and one OpenMP parallel region: for each active expert in ascending
 * order, its rows of x gathered, the fused gate/up projection, act(gate) * up, the down projection, and each
 * row's weighted output added to out. The same kernel bodies as the separate calls; what it saves is four
 * Python calls and thread wake-ups per active expert (a Qwen3-30B-A3B layer has 128 experts).
 *
 * A row meets its experts in ascending index order and each GEMM gives a row the same bits whatever other
 * rows it holds, so a row's result depends on that row alone. */
#include <stdint.h>

#include "kernels.h"

struct expert_group {
    const struct packed_weight *const *gate_up; /* [experts] */
    const struct packed_weight *const *down;    /* [experts] */
    int64_t num_experts, hidden, inter;
    int32_t activation;
};

/* The largest xsum scratch any expert's GEMMs need for m rows. */
static int64_t xsum_floats(const struct expert_group *g, int64_t m) {
    int64_t most = 0;
    for (int64_t e = 0; e < g->num_experts; e++) {
        const int64_t a = xsum_size(g->gate_up[e], m), b = xsum_size(g->down[e], m);
        most = a > most ? a : most;
        most = b > most ? b : most;
    }
    return most;
}

/* scratch: floats for up to m rows of one expert's intermediates. */
int64_t expert_group_scratch(const struct expert_group *g, int64_t m) {
    return m * (2 * g->hidden + 3 * g->inter) + xsum_floats(g, m);
}

/* rows [assignments]: the token row of each (token, expert) assignment, grouped by expert in ascending order;
 * starts [experts + 1]: where each expert's assignments begin; weights [assignments]: the router's weight of
 * each. out [tokens, hidden] is added to. */
void expert_group_f32(const struct expert_group *g, const float *x, const int64_t *rows, const float *weights,
                      const int64_t *starts, float *out, float *scratch, int num_threads) {
    const int64_t hidden = g->hidden, inter = g->inter;
    int64_t most = 0;
    for (int64_t e = 0; e < g->num_experts; e++)
        most = starts[e + 1] - starts[e] > most ? starts[e + 1] - starts[e] : most;
    float *xe = scratch, *gate_up = xe + most * hidden, *act = gate_up + most * 2 * inter;
    float *ye = act + most * inter, *xsum = ye + most * hidden;
#pragma omp parallel num_threads(num_threads)
    for (int64_t e = 0; e < g->num_experts; e++) {
        const int64_t first = starts[e], m = starts[e + 1] - starts[e];
        if (m == 0) continue;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < m; i++)
            for (int64_t d = 0; d < hidden; d++) xe[i * hidden + d] = x[rows[first + i] * hidden + d];
        gemm_body(xe, m, g->gate_up[e], gate_up, 0, xsum);
        gated_mul_body(gate_up, m, inter, g->activation, act);
        gemm_body(act, m, g->down[e], ye, 0, xsum);
#pragma omp for schedule(static)
        for (int64_t i = 0; i < m; i++) {
            float *o = out + rows[first + i] * hidden;
            const float w = weights[first + i], *y = ye + i * hidden;
            for (int64_t d = 0; d < hidden; d++) o[d] += y[d] * w;
        }
    }
}
