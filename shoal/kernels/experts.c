/* A mixture of experts' MLPs in one call and one OpenMP parallel region (or inside layer.c's, as the rest of a
 * fused layer): for each active expert, its rows of x gathered, the fused gate/up projection, act(gate) * up,
 * the down projection, and each row's weighted output added to out. The same kernel bodies as the separate
 * calls; what it saves is four Python calls and thread wake-ups per active expert (a Qwen3-30B-A3B layer has
 * 128 experts).
 *
 * Two ways to share the work, chosen by the step's size alone:
 * - few assignments (decode): each thread runs whole experts (their GEMMs on that one thread), into a buffer
 *   per assignment, then the buffers are added to the rows; no barrier per expert, and each thread streams
 *   whole matrices;
 * - many (prefill): the experts one after another, each GEMM's columns split among the threads.
 * Either way a GEMM gives a row the same bits whatever other rows it holds and however many threads run it,
 * and a row's weighted outputs are added in ascending expert order, so a row's result depends on that row
 * alone, whichever way ran it. */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "kernels.h"

#define EXPERT_PARALLEL_MAX 1024 /* assignments up to which each thread runs whole experts */

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

/* One thread's (or the team's) floats for m rows of one expert: gathered x, gate/up, activation, xsum. */
static int64_t working_floats(const struct expert_group *g, int64_t m) {
    return m * (g->hidden + 3 * g->inter) + xsum_floats(g, m);
}

/* scratch: floats for `assignments` assignments of which one expert has `most`. */
int64_t expert_group_scratch(const struct expert_group *g, int64_t most, int64_t assignments, int num_threads) {
    if (assignments <= EXPERT_PARALLEL_MAX) return num_threads * working_floats(g, most) + assignments * g->hidden;
    return working_floats(g, most) + most * g->hidden;
}

/* The expert's m rows of x from `first` through its MLP into y [m, hidden], by the current team. */
static void run_expert(const struct expert_group *g, int64_t e, const float *x, const int64_t *rows, int64_t first,
                       int64_t m, float *work, float *y) {
    const int64_t hidden = g->hidden, inter = g->inter;
    float *xe = work, *gate_up = xe + m * hidden, *act = gate_up + m * 2 * inter, *xsum = act + m * inter;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < m; i++)
        for (int64_t d = 0; d < hidden; d++) xe[i * hidden + d] = x[rows[first + i] * hidden + d];
    gemm_body(xe, m, g->gate_up[e], gate_up, 0, xsum);
    gated_mul_body(gate_up, m, inter, g->activation, act);
    gemm_body(act, m, g->down[e], y, 0, xsum);
}

/* out[rows[a]] += weights[a] * y[a] for the assignments first..first + m, by the current team. */
static void add_weighted(const int64_t *rows, const float *weights, int64_t first, int64_t m, const float *y,
                         int64_t hidden, float *out) {
#pragma omp for schedule(static)
    for (int64_t i = 0; i < m; i++) {
        float *o = out + rows[first + i] * hidden;
        const float w = weights[first + i], *yi = y + i * hidden;
        for (int64_t d = 0; d < hidden; d++) o[d] += yi[d] * w;
    }
}

/* rows [assignments]: the token row of each (token, expert) assignment, grouped by expert in ascending order;
 * starts [experts + 1]: where each expert's assignments begin; weights [assignments]: the router's weight of
 * each; most: the most assignments of one expert, at most what scratch was sized for (expert_group_scratch,
 * with the team's thread count). out [tokens, hidden] is added to. */
void expert_group_body(const struct expert_group *g, const float *x, const int64_t *rows, const float *weights,
                       const int64_t *starts, int64_t most, float *out, float *scratch) {
    const int64_t hidden = g->hidden, assignments = starts[g->num_experts];
    const int64_t work = working_floats(g, most);
    if (assignments > EXPERT_PARALLEL_MAX) {
        float *y = scratch + work;
        for (int64_t e = 0; e < g->num_experts; e++) {
            const int64_t m = starts[e + 1] - starts[e];
            if (m == 0) continue;
            run_expert(g, e, x, rows, starts[e], m, scratch, y);
            add_weighted(rows, weights, starts[e], m, y, hidden, out);
        }
        return;
    }
    float *y = scratch + omp_get_num_threads() * work; /* [assignments, hidden] */
    float *mine = scratch + omp_get_thread_num() * work;
#pragma omp for schedule(dynamic, 1)
    for (int64_t e = 0; e < g->num_experts; e++) {
        const int64_t m = starts[e + 1] - starts[e];
        if (m == 0) continue;
#pragma omp parallel num_threads(1) /* a team of this thread alone: the bodies' loops all run here */
        run_expert(g, e, x, rows, starts[e], m, mine, y + starts[e] * hidden);
    }
#pragma omp for schedule(static)
    for (int64_t d0 = 0; d0 < hidden; d0 += 16) { /* every row's assignments in ascending expert order */
        const int64_t d1 = d0 + 16 < hidden ? d0 + 16 : hidden;
        for (int64_t a = 0; a < assignments; a++) {
            float *o = out + rows[a] * hidden;
            const float w = weights[a], *ya = y + a * hidden;
            for (int64_t d = d0; d < d1; d++) o[d] += ya[d] * w;
        }
    }
}

void expert_group_f32(const struct expert_group *g, const float *x, const int64_t *rows, const float *weights,
                      const int64_t *starts, int64_t most, float *out, float *scratch, int num_threads) {
#pragma omp parallel num_threads(num_threads)
    expert_group_body(g, x, rows, weights, starts, most, out, scratch);
}

/* The router's choice, as transformers makes it: per token, softmax over the experts' logits, the top_k
 * (descending; of equal probabilities the lower index first), rescaled by their sum where `normalize`. Out as
 * expert_group_f32 takes it: the assignments grouped by expert in ascending order, tokens ascending within one
 * (rows, weights [tokens * top_k], starts [experts + 1]). Returns the most assignments any expert has. */
int64_t route_tokens(const float *logits, int64_t tokens, int64_t experts, int64_t top_k, int normalize,
                     int64_t *rows, float *weights, int64_t *starts) {
    float *probs = malloc(sizeof(float) * experts), *chosen_w = malloc(sizeof(float) * tokens * top_k);
    int64_t *chosen = malloc(sizeof(int64_t) * tokens * top_k);
    for (int64_t e = 0; e <= experts; e++) starts[e] = 0;
    for (int64_t t = 0; t < tokens; t++) {
        const float *l = logits + t * experts;
        float top = l[0], sum = 0.0f;
        for (int64_t e = 1; e < experts; e++) top = fmaxf(top, l[e]);
        for (int64_t e = 0; e < experts; e++) sum += probs[e] = expf(l[e] - top);
        for (int64_t e = 0; e < experts; e++) probs[e] /= sum;
        float kept = 0.0f;
        for (int64_t j = 0; j < top_k; j++) {
            int64_t best = -1;
            for (int64_t e = 0; e < experts; e++)
                if (probs[e] >= 0.0f && (best < 0 || probs[e] > probs[best])) best = e;
            chosen[t * top_k + j] = best;
            kept += chosen_w[t * top_k + j] = probs[best];
            probs[best] = -1.0f; /* taken */
            starts[best + 1]++;
        }
        if (normalize)
            for (int64_t j = 0; j < top_k; j++) chosen_w[t * top_k + j] /= kept;
    }
    int64_t most = 0;
    for (int64_t e = 0; e < experts; e++) {
        most = starts[e + 1] > most ? starts[e + 1] : most;
        starts[e + 1] += starts[e];
    }
    int64_t *next = malloc(sizeof(int64_t) * experts);
    for (int64_t e = 0; e < experts; e++) next[e] = starts[e];
    for (int64_t a = 0; a < tokens * top_k; a++) {
        const int64_t at = next[chosen[a]]++;
        rows[at] = a / top_k;
        weights[at] = chosen_w[a];
    }
    free(next);
    free(chosen);
    free(chosen_w);
    free(probs);
    return most;
}
