/* BiGLA on the CPU: both scans as token-by-token recurrences, float32, threads over (batch, head).
 *
 * ViG (Liao et al., AAAI 2025, Sec. 3.2): the forward scan S_t = diag(a_t) S_{t-1} + k_t v_t^T and the
 * backward one S_t = diag(a_t) S_{t+1} + k_t v_t^T (a_t = exp(log decay), per key channel),
 * o_t = scale/2 * q_t^T (S^f_t + S^b_t). Written in scan order s (t = s forward, T-1-s backward) both
 * are S_s = diag(a_s) S_{s-1} + k_s v_s^T: one routine serves both, walking the tokens in either order
 * (no flipped copies). The [K, V] state stays in the L1 cache, vectorised over V; each pass over its rows
 * serves two consecutive tokens.
 *
 * The state is kept as S = diag(D) U: a scale D per key channel carries the decays, as L = log D in float64
 * (L <- L + log a), the float32 rows U only add k_s v_s^T / D. So a decay within an ulp of 1 is not lost (a
 * float32 state multiplied by a = exp(-2e-8) would keep it unchanged: 1.6e-4 error after 8k such tokens), and
 * a step costs two fused multiply-adds per element (update, readout). Where D would fall below 2^-20 it is
 * folded into its row (U <- D U, L = 0), so the rows stay within 2^20 of the terms they sum.
 *
 * Backward, per scan: dq_s = c S_s do_s (c = scale/2, a pass in scan order, recomputing S and keeping each
 * token's log decays for the next pass, [T, K] float64 per thread; for ViG's K = 32 the state is kept transposed
 * in this pass, so that S_s do_s is a sum of rows, not a dot product per row), then in
 * reverse scan order R_s = c q_s do_s^T + diag(a_{s+1}) R_{s+1} (the gradient of S_s, kept the same
 * way), dk_s = R_s v_s (dot products per row, their lanes summed LANES rows at a time by a shuffle tree),
 * dv_s = R_s^T k_s, and the log decays' gradient
 * dla_r = sum_{s >= r} (q_s * dq_s - k_s * dk_s) per channel (the scan's own dq and dk; float64 sums).
 * Both took ViG-T's layer's backward (batch 8 at 224, a 2-core Xeon with AVX-512) from 1.82 to 1.65 ms, medians
 * of 8 rounds alternating with the kernel before them (benchmarks/results/cpu_kernels_source_ab.json).
 *
 * Inference (bigla_fwd_f32 given x): the second scan applies ViG's locality mix to each token's output as soon as
 * it is whole (cpu_math.h: mix_row_f), in place, while the row is in the cache: BiGLA + the mix as one pass.
 *
 * Tensors are [B, T, H, D] with unit stride in D; the inputs take any (b, t, h) strides (in elements),
 * the outputs are contiguous. The gates are log decays, or (gnorm > 0) gate logits z with log decays
 * logsigmoid(z) / gnorm, whose gradient the backward then returns. Per token, the log decays are formed in
 * float32 (exp_f, log1p_f: their relative precision is all the products need), summed into L in float64 (a
 * decay within 1e-10 of 1 must still move it), and D = exp(L) formed in float32 from L's float32 part and
 * the remainder: polynomials the compiler vectorises over K (a libm call per element would cost more than the
 * state update). Against decays exp(log decay) in float64 multiplied into a float64 D (and a float64 division
 * per channel), this took 7-13% off the forward and 5-10% off the backward on a 2-core AMD EPYC (ViG-T's
 * layer, batch 8 at 224), the errors against float64 unchanged.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_math.h" /* exp_f */

#define LOG_RENORM (-13.862943611198906) /* log(2^-20) */

typedef struct {
    const float *q, *k, *v, *g[2], *dout;
    float *o, *dq, *dk, *dv, *dg[2];
    long B, T, H, K, V;
    long st[8][3]; /* (b, t, h) strides of q, k, v, gf, gb, do, and the mix's x, z */
    float c, gnorm; /* gnorm > 0: the gates are logits */
    const float *mx, *mz, *w_o, *w_l; /* the locality mix of the output (mx != NULL): x, z [B, T, H * V] */
    float eps;
    int act;
} job_t;

#define ROW(x, i, b, t, h) ((x) + (b) * J->st[i][0] + (t) * J->st[i][1] + (h) * J->st[i][2])
#define OUT(x, b, t, h, D) ((x) + (((b) * J->T + (t)) * J->H + (h)) * (D))

static long token(const job_t *J, int scan, long s) { return scan ? J->T - 1 - s : s; }

#define AHEAD 8 /* tokens between a row's prefetch and its use */

/* Ask the cache for the rows of scan step s (q, k, v, the scan's gate, and do in the backward), AHEAD steps
 * before they are read: a task walks its tokens H * D floats apart, a stride the hardware prefetcher left to
 * a load's latency (perf on a 2-core AVX2 EPYC: 15% of the forward's samples on one input load; the prefetch
 * took 15% off ViG-T's layer's forward). Steps outside [0, T) are skipped. */
static inline void prefetch_step(const job_t *J, int scan, long b, long h, long s) {
    if (s < 0 || s >= J->T) return;
    long t = token(J, scan, s);
    const float *rows[5] = {ROW(J->q, 0, b, t, h), ROW(J->k, 1, b, t, h), ROW(J->g[scan], 3 + scan, b, t, h),
                            ROW(J->v, 2, b, t, h), J->dout ? ROW(J->dout, 5, b, t, h) : NULL};
    for (int r = 0; r < 5 && rows[r]; r++)
        for (long i = 0; i < (r < 3 ? J->K : J->V); i += 16) __builtin_prefetch(rows[r] + i);
    if (scan && J->mx) /* the locality mix's rows, read when the second scan finishes the token */
        for (long i = 0; i < J->V; i += 16) {
            __builtin_prefetch(ROW(J->mx, 6, b, t, h) + i);
            __builtin_prefetch(ROW(J->mz, 7, b, t, h) + i);
        }
}

/* log(1 + t) for t in [0, 1], float32, to an ulp or two: 2 atanh(f) with f = t / (2 + t) (exact identity,
 * no rounding of 1 + t), |f| <= 1/3, series to f^15 */
static inline float log1p_f(float t) {
    float f = t / (2.0f + t), f2 = f * f, p = 1.0f / 15.0f;
    for (int k = 13; k >= 1; k -= 2) p = p * f2 + 1.0f / k;
    return 2.0f * f * p;
}

/* a token's log decays: logsigmoid(z) / gnorm = (min(z, 0) - log1p(exp(-|z|))) / gnorm of logits, formed
 * in float32 (their relative precision is what the decays need; their sums are float64 below), or the log
 * decays as given */
static inline void log_decays(const job_t *J, const float *restrict g, double *restrict la) {
    const float inv = J->gnorm > 0 ? 1.0f / J->gnorm : 1.0f;
    for (long i = 0; i < J->K; i++) {
        float z = g[i];
        la[i] = J->gnorm > 0 ? ((z < 0 ? z : 0.0f) - log1p_f(exp_f(-__builtin_fabsf(z)))) * inv : z;
    }
}

/* d(log decay) / d(gate) of a token's gates: sigmoid(-z) / gnorm for logits (float32), else 1 */
static inline void gate_slopes(const job_t *J, const float *restrict g, double *restrict slope) {
    const float inv = J->gnorm > 0 ? 1.0f / J->gnorm : 1.0f;
    for (long i = 0; i < J->K; i++) {
        float z = g[i], t = exp_f(-__builtin_fabsf(z));
        slope[i] = J->gnorm > 0 ? (z < 0 ? 1.0f : t) / (1.0f + t) * inv : 1.0f;
    }
}

/* One step of S = diag(D) U, S <- diag(a) S + x y^T, as per-channel coefficients from the log decays la = log a:
 * row i of U becomes f_i U_i + u_i y. L = log D is carried in float64 (L <- L + la: a decay within an ulp of 1
 * still moves it), D = exp(L) formed from it in float32 each token (from L's float32 part and the remainder:
 * a few ulp): mostly f = 1, u = x / D; where L falls below log(RENORM), f = D, u = x and L <- 0. Then
 * w_i = wscale_i D_i, the factor of a readout of row i; Dout (if given) gets D. */
static void coefficients(long K, double *restrict L, const double *restrict la, const float *restrict x, float xs,
                         const float *restrict wscale, float ws, float *restrict f, float *restrict u,
                         float *restrict w, float *restrict Dout) {
    for (long i = 0; i < K; i++) {
        double l = L[i] + la[i];
        int fold = l < LOG_RENORM;
        float lh = (float)l;
        float d = lh < -87.3f ? 0.0f : exp_f(lh) * (1.0f + (float)(l - (double)lh)); /* 0 also for l = -inf */
        f[i] = fold ? d : 1.0f;
        float dn = fold ? 1.0f : d;
        u[i] = xs * x[i] / dn;
        L[i] = fold ? 0.0 : l;
        w[i] = ws * wscale[i] * dn;
        if (Dout) Dout[i] = dn;
    }
}

/* row <- f row + u y; then, where given, acc += w row and the result's dot product with z (returned): one
 * pass over the row (inlined: the absent parts compile away) */
static inline __attribute__((always_inline)) float advance(float *restrict row, long V, float f, float u,
                                                           const float *restrict y, const float *restrict z,
                                                           float w, float *restrict acc) {
    float dot = 0.0f;
    if (f == 1.0f) {
        for (long j = 0; j < V; j++) {
            float r = row[j] + u * y[j];
            row[j] = r;
            if (z) dot += r * z[j];
            if (acc) acc[j] += w * r;
        }
    } else {
        for (long j = 0; j < V; j++) {
            float r = f * row[j] + u * y[j];
            row[j] = r;
            if (z) dot += r * z[j];
            if (acc) acc[j] += w * r;
        }
    }
    return dot;
}

/* One token's pass over the state's rows: row i becomes f_i row_i + u_i y; where given, acc = sum_i w_i row_i
 * (written, not added to) and dots[i] = <row_i, z>. */
typedef struct {
    const float *f, *u, *w, *y, *z;
    float *acc, *dots;
    float *lanes; /* with dots: K * LANES floats of scratch, each row's products before their lanes are summed */
} step_t;

/* The passes of n (1 or 2) consecutive tokens over all K rows, for V = 64 (ViG's heads): each row is loaded and
 * stored once for all n (the row loop was bound by the L1 loads and stores of the state: two tokens per pass
 * took 4-15% off the forward in A/Bs, the backward's passes unchanged); n is a constant at each call, so the
 * loops over the tokens unroll. A row is NC vectors of the machine's own width (GCC vector extensions: 16 lanes with
 * AVX-512, else 8): a 64-byte vector type on a machine without 512-bit registers is lowered through the stack piece
 * by piece (perf on a 2-core AVX2 EPYC: the loop bound by those stores and reloads; 8-lane vectors took ViG-T's
 * layer from 15.3 to 3.8 ms forward, 27.7 to 8.9 ms backward). The rows are walked in column blocks of NB
 * vectors, a pass over all K rows per block: the forward takes blocks of FWD_NB (16 lanes: the whole row, which
 * its two tokens' sums and values and the row then hold in 20 of the 32 registers; 8 lanes: blocks of 2, 10
 * of the 16 registers: blocks of 4 spilled, and took 7% more time than 2 on a 2-core AVX2 EPYC, whole rows
 * a quarter more), the backward whole rows (each row's dot products formed once, their lanes kept for
 * tree_sums: blocks of 4 were 20% slower there). Which of a step's outputs a call forms (ACC: acc; DOTS: dots)
 * is a constant at each call, so that the row loop tests neither (8% off the backward, 3% off the forward on that
 * EPYC), and a pass in which no row folds its scale (all f = 1, the usual case) runs a copy of the loop without the
 * test of f (a further 17% off the forward, 8% off the backward there). Bitwise the same as n passes. */
#if defined(__AVX512F__)
#define LANES 16
#else
#define LANES 8
#endif
#define NC (64 / LANES) /* native vectors per 64-value row */
#define FWD_NB (LANES == 16 ? NC : 2) /* the forward's column block, in vectors */
typedef float vecf __attribute__((vector_size(4 * LANES)));

static inline vecf loadv(const float *p) {
    vecf x;
    memcpy(&x, p, sizeof x);
    return x;
}

static inline void storev(float *p, vecf x) { memcpy(p, &x, sizeof x); }

static inline float hsumv(vecf x) {
    float s = 0.0f;
    for (int j = 0; j < LANES; j++) s += x[j];
    return s;
}

/* The sums of the lanes of LANES vectors x[0 .. LANES - 1], in order, as one vector: a tree of lane shuffles (each
 * level adds the two halves of every block of two vectors into one, the blocks halving: LANES - 1 shuffle pairs and
 * adds for LANES sums, against log2(LANES) each per sum apart: the backward's dot products of a state's rows with a
 * token's values spent most of their time in those separate sums under perf), the vectors taken in bit-reversed
 * order so that the sums come out in order. */
#if defined(__clang__) || __GNUC__ >= 12
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else /* GCC before 12 (Ubuntu 22.04's 11): the same with the indices as a vector */
typedef int veci __attribute__((vector_size(4 * LANES)));
#define SHUFFLE(a, b, ...) __builtin_shuffle(a, b, (veci){__VA_ARGS__})
#endif
#define HALVES(a, b, k) (SHUFFLE(a, b, HALF_LO##k) + SHUFFLE(a, b, HALF_HI##k))
#if LANES == 16
#define HALF_LO8 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23
#define HALF_HI8 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31
#define HALF_LO4 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27
#define HALF_HI4 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31
#define HALF_LO2 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29
#define HALF_HI2 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31
#define HALF_LO1 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30
#define HALF_HI1 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31
static const int BITREV[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};

static inline vecf tree_sums(const vecf *x) {
    vecf a[8], b[4], c[2];
    for (int i = 0; i < 8; i++) a[i] = HALVES(x[BITREV[2 * i]], x[BITREV[2 * i + 1]], 8);
    for (int i = 0; i < 4; i++) b[i] = HALVES(a[2 * i], a[2 * i + 1], 4);
    for (int i = 0; i < 2; i++) c[i] = HALVES(b[2 * i], b[2 * i + 1], 2);
    return HALVES(c[0], c[1], 1);
}
#else
#define HALF_LO4 0, 1, 2, 3, 8, 9, 10, 11
#define HALF_HI4 4, 5, 6, 7, 12, 13, 14, 15
#define HALF_LO2 0, 1, 8, 9, 4, 5, 12, 13
#define HALF_HI2 2, 3, 10, 11, 6, 7, 14, 15
#define HALF_LO1 0, 8, 2, 10, 4, 12, 6, 14
#define HALF_HI1 1, 9, 3, 11, 5, 13, 7, 15
static const int BITREV[8] = {0, 4, 2, 6, 1, 5, 3, 7};

static inline vecf tree_sums(const vecf *x) {
    vecf a[4], b[2];
    for (int i = 0; i < 4; i++) a[i] = HALVES(x[BITREV[2 * i]], x[BITREV[2 * i + 1]], 4);
    for (int i = 0; i < 2; i++) b[i] = HALVES(a[2 * i], a[2 * i + 1], 2);
    return HALVES(b[0], b[1], 1);
}
#endif

/* the backward's lanes scratch of token p (0, 1; 2: the end of both) in a thread's buffer co, after the coefficients,
 * dks and ones (11 K) */
#define LANES_OF(co, K, p) ((co) + 11 * (K) + (p) * (K) * LANES)

static inline __attribute__((always_inline)) void rows64(float *restrict S, long K, const step_t *P, const int n,
                                                         const int NB, const int ACC, const int DOTS, const int FOLD) {
    for (int blk = 0; blk < NC / NB; blk++) {
        const long c0 = blk * NB * LANES; /* this block's first column */
        vecf y[2][NC], z[2][NC], a[2][NC]; /* NB of NC used: NB is a constant at every call */
        for (int p = 0; p < n; p++)
            for (int c = 0; c < NB; c++) {
                y[p][c] = loadv(P[p].y + c0 + LANES * c);
                z[p][c] = DOTS ? loadv(P[p].z + c0 + LANES * c) : (vecf){0};
                a[p][c] = (vecf){0};
            }
        for (long i = 0; i < K; i++) {
            float *row = S + i * 64 + c0;
            vecf r[NC];
            for (int c = 0; c < NB; c++) r[c] = loadv(row + LANES * c);
            for (int p = 0; p < n; p++) {
                const float fi = P[p].f[i], ui = P[p].u[i];
                if (FOLD && fi != 1.0f)
                    for (int c = 0; c < NB; c++) r[c] *= fi;
                for (int c = 0; c < NB; c++) r[c] += ui * y[p][c];
                if (ACC) {
                    const float wi = P[p].w[i];
                    for (int c = 0; c < NB; c++) a[p][c] += wi * r[c];
                }
                if (DOTS) {
                    vecf d = r[0] * z[p][0];
                    for (int c = 1; c < NB; c++) d += r[c] * z[p][c];
                    float *lanes = P[p].lanes + i * LANES;
                    storev(lanes, blk ? loadv(lanes) + d : d);
                }
            }
            for (int c = 0; c < NB; c++) storev(row + LANES * c, r[c]);
        }
        for (int p = 0; p < n; p++)
            if (ACC)
                for (int c = 0; c < NB; c++) storev(P[p].acc + c0 + LANES * c, a[p][c]);
    }
    if (DOTS) /* the rows' sums, LANES at a time */
        for (int p = 0; p < n; p++) {
            long i = 0;
            for (; i + LANES <= K; i += LANES) {
                vecf x[LANES];
                for (int j = 0; j < LANES; j++) x[j] = loadv(P[p].lanes + (i + j) * LANES);
                storev(P[p].dots + i, tree_sums(x));
            }
            for (; i < K; i++) P[p].dots[i] = hsumv(loadv(P[p].lanes + i * LANES));
        }
}

/* whether any of a step's K row factors f is not 1 (a row folds its scale in: rare) */
static inline int folds(const float *restrict f, long K) {
    int any = 0;
    for (long i = 0; i < K; i++) any |= f[i] != 1.0f;
    return any;
}

/* rows64 with the row factors' test compiled away where no row of the n steps folds (the usual pass) */
static inline __attribute__((always_inline)) void advance_rows64(float *restrict S, long K, const step_t *P,
                                                                 const int n, const int NB, const int ACC,
                                                                 const int DOTS) {
    if (folds(P[0].f, K) || (n > 1 && folds(P[1].f, K)))
        rows64(S, K, P, n, NB, ACC, DOTS, 1);
    else
        rows64(S, K, P, n, NB, ACC, DOTS, 0);
}

/* The backward's first pass (dq_s = c D (U do_s)) for K = 32 over the transposed state: row j of ST holds column j
 * of U, 32 floats, so a token's readout U do_s is the sum of the rows scaled by do_s[j], accumulated in registers
 * over the V rows, where U's rows needed a horizontal sum each (the dot products of rows64: the shuffles and scalar
 * stores of those sums were the backward's hottest instructions under perf). Row j becomes f * row_j + y_j u (f,
 * u: vectors over the K channels, the same products per element as rows64's), then acc += z_j row_j, for n (1 or
 * 2) consecutive tokens per pass; P[p].dots gets acc. FOLD: whether a row factor may differ from 1. */
static inline __attribute__((always_inline)) void rows_t32(float *restrict ST, long V, const step_t *P, const int n,
                                                           const int FOLD) {
    enum { NK = 32 / LANES };
    vecf u[2][NK], f[2][NK], acc[2][NK];
    for (int p = 0; p < n; p++)
        for (int c = 0; c < NK; c++) {
            u[p][c] = loadv(P[p].u + LANES * c);
            f[p][c] = FOLD ? loadv(P[p].f + LANES * c) : (vecf){0};
            acc[p][c] = (vecf){0};
        }
    for (long j = 0; j < V; j++) {
        float *row = ST + j * 32;
        vecf r[NK];
        for (int c = 0; c < NK; c++) r[c] = loadv(row + LANES * c);
        for (int p = 0; p < n; p++) {
            const float yj = P[p].y[j], zj = P[p].z[j];
            for (int c = 0; c < NK; c++) {
                if (FOLD) r[c] *= f[p][c];
                r[c] += yj * u[p][c];
                acc[p][c] += zj * r[c];
            }
        }
        for (int c = 0; c < NK; c++) storev(row + LANES * c, r[c]);
    }
    for (int p = 0; p < n; p++)
        for (int c = 0; c < NK; c++) storev(P[p].dots + LANES * c, acc[p][c]);
}

/* The passes of n consecutive tokens over all K rows: V = 64 through advance_rows64's registers (in column blocks
 * of NB vectors; ACC, DOTS: whether the steps have acc and dots, constants at each call), other V token by
 * token, row by row. */
static inline __attribute__((always_inline)) void advance_rows(float *restrict S, long K, long V, const step_t *P,
                                                               const int n, const int NB, const int ACC,
                                                               const int DOTS) {
    if (V == 64) {
        advance_rows64(S, K, P, n, NB, ACC, DOTS);
        return;
    }
    for (int p = 0; p < n; p++) {
        if (P[p].acc)
            for (long j = 0; j < V; j++) P[p].acc[j] = 0.0f;
        for (long i = 0; i < K; i++) {
            float dot = advance(S + i * V, V, P[p].f[i], P[p].u[i], P[p].y, P[p].z, P[p].acc ? P[p].w[i] : 0.0f,
                                P[p].acc);
            if (P[p].dots) P[p].dots[i] = dot;
        }
    }
}

static void reset(float *S, double *L, long K, long V) {
    memset(S, 0, sizeof(float) * K * V);
    for (long i = 0; i < K; i++) L[i] = 0.0; /* D = 1 */
}

/* Tokens s .. s + n - 1 of one forward scan: their coefficients (L carried from one to the next), one pass
 * over the rows, the outputs (assigned by scan 0, added to by scan 1) */
static inline __attribute__((always_inline)) void forward_steps(const job_t *J, int scan, long b, long h, long s,
                                                                 float *S, double *L, double *la, float *co,
                                                                 const long V, const int n) {
    const long K = J->K;
    long t[2];
    float acc[2][V];
    step_t P[2];
    for (int p = 0; p < n; p++) {
        prefetch_step(J, scan, b, h, s + p + AHEAD);
        t[p] = token(J, scan, s + p);
        float *f = co + 3 * K * p; /* f, u, w */
        log_decays(J, ROW(J->g[scan], 3 + scan, b, t[p], h), la);
        coefficients(K, L, la, ROW(J->k, 1, b, t[p], h), 1.0f, ROW(J->q, 0, b, t[p], h), J->c, f, f + K, f + 2 * K,
                     NULL);
        P[p] = (step_t){f, f + K, f + 2 * K, ROW(J->v, 2, b, t[p], h), NULL, acc[p], NULL};
    }
    advance_rows(S, K, V, P, n, FWD_NB, 1, 0);
    for (int p = 0; p < n; p++) {
        float *out = OUT(J->o, b, t[p], h, V);
        for (long j = 0; j < V; j++) out[j] = scan ? out[j] + acc[p][j] : acc[p][j];
        if (scan && J->mx) /* the token's output is whole: the locality mix in place, while the row is in cache */
            mix_row_f(out, ROW(J->mx, 6, b, t[p], h), ROW(J->mz, 7, b, t[p], h), J->w_o, J->w_l, out, V, J->eps,
                      J->act);
    }
}

static inline __attribute__((always_inline)) void forward_task(const job_t *J, long b, long h, float *S, double *L,
                                                                double *la, float *co, const long V) {
    for (int scan = 0; scan < 2; scan++) {
        reset(S, L, J->K, V);
        long s = 0;
        for (; s + 1 < J->T; s += 2) forward_steps(J, scan, b, h, s, S, L, la, co, V, 2);
        if (s < J->T) forward_steps(J, scan, b, h, s, S, L, la, co, V, 1);
    }
}

/* The backward's first pass over tokens s .. s + n - 1 of a scan: the states again, dq_s = c S_s do_s
 * (accumulated into dq, assigned by scan 0, and kept in dqs), each token's log decays kept in decs for the
 * reverse pass */
static inline __attribute__((always_inline)) void dq_steps(const job_t *J, int scan, long b, long h, long s, float *S,
                                                            double *L, float *co, const float *ones, float *dqs,
                                                            double *decs, const long V, const int n) {
    const long K = J->K;
    long t[2];
    step_t P[2];
    for (int p = 0; p < n; p++) {
        prefetch_step(J, scan, b, h, s + p + AHEAD);
        t[p] = token(J, scan, s + p);
        float *f = co + 3 * K * p; /* f, u, w = c D */
        double *as = decs + (s + p) * K;
        log_decays(J, ROW(J->g[scan], 3 + scan, b, t[p], h), as);
        coefficients(K, L, as, ROW(J->k, 1, b, t[p], h), 1.0f, ones, J->c, f, f + K, f + 2 * K, NULL);
        P[p] = (step_t){f, f + K, NULL, ROW(J->v, 2, b, t[p], h), ROW(J->dout, 5, b, t[p], h), NULL,
                        dqs + (s + p) * K, LANES_OF(co, K, p)};
    }
    if (K == 32) { /* ViG's heads: the state transposed (rows_t32) */
        if (folds(P[0].f, K) || (n > 1 && folds(P[1].f, K)))
            rows_t32(S, V, P, n, 1);
        else
            rows_t32(S, V, P, n, 0);
    } else {
        advance_rows(S, K, V, P, n, NC, 0, 1);
    }
    for (int p = 0; p < n; p++) {
        float *dq = dqs + (s + p) * K, *out = OUT(J->dq, b, t[p], h, K);
        const float *w = co + 3 * K * p + 2 * K;
        for (long i = 0; i < K; i++) dq[i] *= w[i];
        for (long i = 0; i < K; i++) out[i] = scan ? out[i] + dq[i] : dq[i];
    }
}

/* The reverse pass over tokens s, s - 1, ..., s - n + 1 of a scan: R_s = c q_s do_s^T + diag(a_{s+1}) R_{s+1}
 * (kept as diag(D) U like the state), dk_s = R_s v_s, dv_s = R_s^T k_s, the log decays' gradient
 * (gacc: its running sum) and the gates'; dk, dv accumulated (assigned by scan 0), dg[scan] written */
static inline __attribute__((always_inline)) void dkv_steps(const job_t *J, int scan, long b, long h, long s, float *S,
                                                             double *L, const double *none, float *co, float *dks,
                                                             const float *dqs, double *gacc, double *slope,
                                                             const double *decs, const long V, const int n) {
    const long K = J->K;
    long t[2];
    float dvs[2][V];
    step_t P[2];
    for (int p = 0; p < n; p++) {
        long sp = s - p;
        prefetch_step(J, scan, b, h, sp - AHEAD);
        t[p] = token(J, scan, sp);
        float *f = co + 4 * K * p; /* f, u, w = D k, and D itself */
        const double *an = sp + 1 < J->T ? decs + (sp + 1) * K : none; /* the log decays between sp and sp + 1 */
        coefficients(K, L, an, ROW(J->q, 0, b, t[p], h), J->c, ROW(J->k, 1, b, t[p], h), 1.0f, f, f + K, f + 2 * K,
                     f + 3 * K);
        P[p] = (step_t){f, f + K, f + 2 * K, ROW(J->dout, 5, b, t[p], h), ROW(J->v, 2, b, t[p], h), dvs[p],
                        dks + K * p, LANES_OF(co, K, p)};
    }
    advance_rows(S, K, V, P, n, NC, 1, 1);
    for (int p = 0; p < n; p++) {
        long sp = s - p;
        const float *qq = ROW(J->q, 0, b, t[p], h), *kk = ROW(J->k, 1, b, t[p], h), *Dp = co + 4 * K * p + 3 * K;
        const float *dq = dqs + sp * K, *dkp = dks + K * p;
        float *dk = OUT(J->dk, b, t[p], h, K), *dv = OUT(J->dv, b, t[p], h, V), *dg = OUT(J->dg[scan], b, t[p], h, K);
        gate_slopes(J, ROW(J->g[scan], 3 + scan, b, t[p], h), slope);
#pragma omp simd /* the outputs alias none of the inputs: vectorised (GCC kept it scalar, ~8% of the backward) */
        for (long i = 0; i < K; i++) {
            float dki = dkp[i] * Dp[i];
            dk[i] = scan ? dk[i] + dki : dki;
            gacc[i] += (double)qq[i] * dq[i] - (double)kk[i] * dki;
            dg[i] = (float)(gacc[i] * slope[i]);
        }
        for (long j = 0; j < V; j++) dv[j] = scan ? dv[j] + dvs[p][j] : dvs[p][j];
    }
}

/* one scan's gradients for task (b, h) */
static inline __attribute__((always_inline)) void backward_scan(const job_t *J, int scan, long b, long h, float *S,
                                                                 double *L, double *la, float *co, float *dqs,
                                                                 double *gacc, double *decs, const long V) {
    const long K = J->K, T = J->T;
    float *dks = co + 8 * K, *ones = dks + 2 * K;
    double *slope = gacc + K;
    for (long i = 0; i < K; i++) ones[i] = 1.0f;
    reset(S, L, K, V);
    long s = 0;
    for (; s + 1 < T; s += 2) dq_steps(J, scan, b, h, s, S, L, co, ones, dqs, decs, V, 2);
    if (s < T) dq_steps(J, scan, b, h, s, S, L, co, ones, dqs, decs, V, 1);
    reset(S, L, K, V); /* now R, the gradient of the state, in reverse scan order */
    for (long i = 0; i < K; i++) {
        gacc[i] = 0.0;
        la[i] = 0.0; /* no decay after the last token */
    }
    for (s = T - 1; s >= 1; s -= 2) dkv_steps(J, scan, b, h, s, S, L, la, co, dks, dqs, gacc, slope, decs, V, 2);
    if (s == 0) dkv_steps(J, scan, b, h, s, S, L, la, co, dks, dqs, gacc, slope, decs, V, 1);
}

/* the (batch, head) tasks [first, last) of one thread, for V values per head; 0 on success */
static inline __attribute__((always_inline)) int run_tasks_v(const job_t *J, long first, long last, const long V) {
    const long K = J->K;
    int backward = J->dout != NULL;
    /* S: the state (K V), then co: two tokens' coefficients (8 K), dks (2 K), ones (K), and in the backward two
     * tokens' dot products lane by lane (2 K LANES) and dqs (T K) */
    float *S = malloc(sizeof(float) * (K * V + 11 * K + (backward ? 2 * K * LANES + J->T * K : 0)));
    double *L = malloc(sizeof(double) * (4 * K + (backward ? J->T * K : 0)));
    int failed = !S || !L;
    float *co = S + K * V, *dqs = LANES_OF(co, K, 2);
    double *la = L + K, *gacc = la + K; /* la: a token's log decays; gacc + K: the slopes; then the backward's
                                         * log decays, [T, K] */
    double *decs = gacc + 2 * K;
    for (long task = first; task < last && !failed; task++) {
        long b = task / J->H, h = task % J->H;
        if (backward) {
            backward_scan(J, 0, b, h, S, L, la, co, dqs, gacc, decs, V);
            backward_scan(J, 1, b, h, S, L, la, co, dqs, gacc, decs, V);
        } else {
            forward_task(J, b, h, S, L, la, co, V);
        }
    }
    free(S);
    free(L);
    return failed;
}

/* ViG's 64 values per head as a constant (the loops over V unrolled, their sums kept in registers) */
static int run_tasks(const job_t *J, long first, long last) {
    return J->V == 64 ? run_tasks_v(J, first, last, 64) : run_tasks_v(J, first, last, J->V);
}

/* the B*H tasks in contiguous blocks over nthreads OpenMP threads. Built with -fopenmp, this library
 * links libgomp.so.1 by name, which resolves to the copy PyTorch has loaded: one thread pool, whose
 * threads PyTorch's own ops have just left spinning for work (a second runtime's threads would
 * compete with them for the cores). */
static int run_threads(const job_t *J, int nthreads) {
    long tasks = J->B * J->H;
    if (nthreads > tasks) nthreads = (int)(tasks > 0 ? tasks : 1);
    int failed = 0;
#pragma omp parallel for num_threads(nthreads) schedule(static) reduction(| : failed)
    for (int i = 0; i < nthreads; i++)
        failed |= run_tasks(J, tasks * i / nthreads, tasks * (i + 1) / nthreads);
    return failed;
}

static void setup(job_t *J, const float *q, const float *k, const float *v, const float *gf, const float *gb,
                  long B, long T, long H, long K, long V, const long *strides, float half_scale, float gnorm) {
    memset(J, 0, sizeof(*J));
    J->q = q; J->k = k; J->v = v; J->g[0] = gf; J->g[1] = gb;
    J->B = B; J->T = T; J->H = H; J->K = K; J->V = V;
    memcpy(J->st, strides, sizeof(J->st));
    J->c = half_scale;
    J->gnorm = gnorm;
}

/* o [B, T, H, V]; strides: 8 x (b, t, h) for q, k, v, gf, gb, (unused), x, z; with x != NULL, o is ViG's locality
 * mix of BiGLA's output with x and z ([B, T, H * V] as (b, t, h) strides, unit stride within a head), w_o, w_l
 * ([V]), eps and act (SiLU); returns 0 on success */
int bigla_fwd_f32(const float *q, const float *k, const float *v, const float *gf, const float *gb, float *o,
                  long B, long T, long H, long K, long V, const long *strides, float half_scale, float gnorm,
                  int nthreads, const float *x, const float *z, const float *w_o, const float *w_l, float eps,
                  int act) {
    job_t J;
    setup(&J, q, k, v, gf, gb, B, T, H, K, V, strides, half_scale, gnorm);
    J.o = o;
    J.mx = x; J.mz = z; J.w_o = w_o; J.w_l = w_l; J.eps = eps; J.act = act;
    return run_threads(&J, nthreads);
}

/* dq, dk, dgf, dgb [B, T, H, K], dv [B, T, H, V] (dgf, dgb: of the gates as given, logits or log decays);
 * strides: 6 x (b, t, h) for q, k, v, gf, gb, do */
int bigla_bwd_f32(const float *q, const float *k, const float *v, const float *gf, const float *gb,
                  const float *dout, float *dq, float *dk, float *dv, float *dgf, float *dgb,
                  long B, long T, long H, long K, long V, const long *strides, float half_scale, float gnorm,
                  int nthreads) {
    job_t J;
    setup(&J, q, k, v, gf, gb, B, T, H, K, V, strides, half_scale, gnorm);
    J.dout = dout; J.dq = dq; J.dk = dk; J.dv = dv; J.dg[0] = dgf; J.dg[1] = dgb;
    return run_threads(&J, nthreads);
}
