/* BiGLA on the CPU: both scans as token-by-token recurrences, float32, threads over (batch, head).
 *
 * ViG (Liao et al., AAAI 2025, Sec. 3.2): the forward scan S_t = diag(a_t) S_{t-1} + k_t v_t^T and the
 * backward one S_t = diag(a_t) S_{t+1} + k_t v_t^T (a_t = exp(log decay), per key channel),
 * o_t = scale/2 * q_t^T (S^f_t + S^b_t). Written in scan order s (t = s forward, T-1-s backward) both
 * are S_s = diag(a_s) S_{s-1} + k_s v_s^T: one routine serves both, walking the tokens in either order
 * (no flipped copies). The [K, V] state stays in the L1 cache, vectorised over V.
 *
 * The state is kept as S = diag(D) U: a float64 scale D per key channel carries the decays (D <- D a), the
 * float32 rows U only add k_s v_s^T / D. So a decay within an ulp of 1 is not lost (a float32 state
 * multiplied by a = exp(-2e-8) would keep it unchanged: 1.6e-4 error after 8k such tokens), and a step
 * costs two fused multiply-adds per element (update, readout). Where D would fall below 2^-20 it is
 * folded into its row (U <- D U, D = 1), so the rows stay within 2^20 of the terms they sum.
 *
 * Backward, per scan: dq_s = c S_s do_s (c = scale/2, a pass in scan order, recomputing S), then in
 * reverse scan order R_s = c q_s do_s^T + diag(a_{s+1}) R_{s+1} (the gradient of S_s, kept the same
 * way), dk_s = R_s v_s, dv_s = R_s^T k_s, and the log decays' gradient
 * dla_r = sum_{s >= r} (q_s * dq_s - k_s * dk_s) per channel (the scan's own dq and dk; float64 sums).
 *
 * Tensors are [B, T, H, D] with unit stride in D; the inputs take any (b, t, h) strides (in elements),
 * the outputs are contiguous. The decays a come in float64, formed by the caller over the whole tensor
 * (vectorised; per token they would cost more than the state updates).
 */
#include <stdlib.h>
#include <string.h>

#define RENORM 0x1p-20

typedef struct {
    const float *q, *k, *v, *dout;
    const double *a[2];
    float *o, *dq, *dk, *dv, *dg[2];
    long B, T, H, K, V;
    long st[6][3]; /* (b, t, h) strides of q, k, v, a forward, a backward, do */
    float c;
} job_t;

#define ROW(x, i, b, t, h) ((x) + (b) * J->st[i][0] + (t) * J->st[i][1] + (h) * J->st[i][2])
#define OUT(x, b, t, h, D) ((x) + (((b) * J->T + (t)) * J->H + (h)) * (D))

static long token(const job_t *J, int scan, long s) { return scan ? J->T - 1 - s : s; }

/* One step of S = diag(D) U, S <- diag(a) S + x y^T, as per-channel coefficients: row i of U becomes
 * f_i U_i + u_i y. Mostly f = 1, u = x / D with D <- D a; where D a falls below RENORM, f = D a, u = x and
 * D <- 1. Then w_i = wscale_i D_i, the factor of a readout of row i (float64 scalars, vectorised over K). */
static void coefficients(long K, double *restrict D, const double *restrict a, const float *restrict x, float xs,
                         const float *restrict wscale, float ws, float *restrict f, float *restrict u,
                         float *restrict w) {
    for (long i = 0; i < K; i++) {
        double d = D[i] * a[i];
        int fold = d < RENORM;
        double nd = fold ? 1.0 : d;
        f[i] = fold ? (float)d : 1.0f;
        u[i] = (float)((double)(xs * x[i]) / nd);
        D[i] = nd;
        w[i] = (float)(ws * wscale[i] * nd);
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

static void reset(float *S, double *D, long K, long V) {
    memset(S, 0, sizeof(float) * K * V);
    for (long i = 0; i < K; i++) D[i] = 1.0;
}

static inline __attribute__((always_inline)) void forward_task(const job_t *J, long b, long h, float *S, double *D,
                                                                float *co, const long V) {
    const long K = J->K;
    float *f = co, *u = co + K, *w = co + 2 * K;
    for (int scan = 0; scan < 2; scan++) {
        reset(S, D, K, V);
        for (long s = 0; s < J->T; s++) {
            long t = token(J, scan, s);
            const float *vv = ROW(J->v, 2, b, t, h);
            coefficients(K, D, ROW(J->a[scan], 3 + scan, b, t, h), ROW(J->k, 1, b, t, h), 1.0f,
                         ROW(J->q, 0, b, t, h), J->c, f, u, w);
            float acc[V]; /* a local: with V constant, kept in registers across the rows */
            for (long j = 0; j < V; j++) acc[j] = 0.0f;
            for (long i = 0; i < K; i++) {
                float *restrict row = S + i * V;
                advance(row, V, f[i], u[i], vv, NULL, w[i], acc);
            }
            float *out = OUT(J->o, b, t, h, V);
            for (long j = 0; j < V; j++) out[j] = scan ? out[j] + acc[j] : acc[j];
        }
    }
}

/* one scan's gradients for task (b, h): dq, dk, dv accumulated (assigned by scan 0), dg[scan] written */
static inline __attribute__((always_inline)) void backward_scan(const job_t *J, int scan, long b, long h, float *S,
                                                                 double *D, float *co, float *dqs, double *gacc,
                                                                 const long V) {
    const long K = J->K, T = J->T;
    float *f = co, *u = co + K, *w = co + 2 * K, *dks = co + 3 * K, *ones = co + 4 * K;
    for (long i = 0; i < K; i++) ones[i] = 1.0f;
    reset(S, D, K, V);
    for (long s = 0; s < T; s++) { /* the states again; dq_s = c S_s do_s */
        long t = token(J, scan, s);
        const float *vv = ROW(J->v, 2, b, t, h), *dd = ROW(J->dout, 5, b, t, h);
        coefficients(K, D, ROW(J->a[scan], 3 + scan, b, t, h), ROW(J->k, 1, b, t, h), 1.0f, ones, J->c, f, u, w);
        float *dq = dqs + s * K;
        for (long i = 0; i < K; i++) {
            float *restrict row = S + i * V;
            dq[i] = w[i] * advance(row, V, f[i], u[i], vv, dd, 0.0f, NULL);
        }
        float *out = OUT(J->dq, b, t, h, K);
        for (long i = 0; i < K; i++) out[i] = scan ? out[i] + dq[i] : dq[i];
    }
    reset(S, D, K, V); /* now R, the gradient of the state, in reverse scan order */
    for (long i = 0; i < K; i++) gacc[i] = 0.0;
    const double *a_next = NULL; /* the decays between this token and the one after it in scan order */
    double *a_one = gacc + K;
    for (long i = 0; i < K; i++) a_one[i] = 1.0;
    for (long s = T - 1; s >= 0; s--) {
        long t = token(J, scan, s);
        const float *qq = ROW(J->q, 0, b, t, h), *kk = ROW(J->k, 1, b, t, h), *vv = ROW(J->v, 2, b, t, h);
        const float *dd = ROW(J->dout, 5, b, t, h);
        coefficients(K, D, a_next ? a_next : a_one, qq, J->c, kk, 1.0f, f, u, w); /* w = D k */
        float dvs[V]; /* a local, as the forward's sums */
        for (long j = 0; j < V; j++) dvs[j] = 0.0f;
        for (long i = 0; i < K; i++) {
            float *restrict row = S + i * V;
            dks[i] = (float)D[i] * advance(row, V, f[i], u[i], dd, vv, w[i], dvs);
        }
        float *dk = OUT(J->dk, b, t, h, K), *dv = OUT(J->dv, b, t, h, V), *dg = OUT(J->dg[scan], b, t, h, K);
        const float *dq = dqs + s * K;
        for (long i = 0; i < K; i++) {
            dk[i] = scan ? dk[i] + dks[i] : dks[i];
            gacc[i] += (double)qq[i] * dq[i] - (double)kk[i] * dks[i];
            dg[i] = (float)gacc[i];
        }
        for (long j = 0; j < V; j++) dv[j] = scan ? dv[j] + dvs[j] : dvs[j];
        a_next = ROW(J->a[scan], 3 + scan, b, t, h);
    }
}

/* the (batch, head) tasks [first, last) of one thread, for V values per head; 0 on success */
static inline __attribute__((always_inline)) int run_tasks_v(const job_t *J, long first, long last, const long V) {
    const long K = J->K;
    int backward = J->dout != NULL;
    float *S = malloc(sizeof(float) * (K * V + 5 * K + (backward ? J->T * K : 0)));
    double *D = malloc(sizeof(double) * 3 * K);
    int failed = !S || !D;
    float *co = S + K * V, *dqs = co + 5 * K;
    double *gacc = D + K;
    for (long task = first; task < last && !failed; task++) {
        long b = task / J->H, h = task % J->H;
        if (backward) {
            backward_scan(J, 0, b, h, S, D, co, dqs, gacc, V);
            backward_scan(J, 1, b, h, S, D, co, dqs, gacc, V);
        } else {
            forward_task(J, b, h, S, D, co, V);
        }
    }
    free(S);
    free(D);
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

static void setup(job_t *J, const float *q, const float *k, const float *v, const double *af, const double *ab,
                  long B, long T, long H, long K, long V, const long *strides, float half_scale) {
    memset(J, 0, sizeof(*J));
    J->q = q; J->k = k; J->v = v; J->a[0] = af; J->a[1] = ab;
    J->B = B; J->T = T; J->H = H; J->K = K; J->V = V;
    memcpy(J->st, strides, sizeof(J->st));
    J->c = half_scale;
}

/* o [B, T, H, V]; strides: 6 x (b, t, h) for q, k, v, af, ab, (unused); returns 0 on success */
int bigla_fwd_f32(const float *q, const float *k, const float *v, const double *af, const double *ab, float *o,
                  long B, long T, long H, long K, long V, const long *strides, float half_scale, int nthreads) {
    job_t J;
    setup(&J, q, k, v, af, ab, B, T, H, K, V, strides, half_scale);
    J.o = o;
    return run_threads(&J, nthreads);
}

/* dq, dk, dlaf, dlab [B, T, H, K], dv [B, T, H, V]; strides: 6 x (b, t, h) for q, k, v, af, ab, do */
int bigla_bwd_f32(const float *q, const float *k, const float *v, const double *af, const double *ab,
                  const float *dout, float *dq, float *dk, float *dv, float *dlaf, float *dlab,
                  long B, long T, long H, long K, long V, const long *strides, float half_scale, int nthreads) {
    job_t J;
    setup(&J, q, k, v, af, ab, B, T, H, K, V, strides, half_scale);
    J.dout = dout; J.dq = dq; J.dk = dk; J.dv = dv; J.dg[0] = dlaf; J.dg[1] = dlab;
    return run_threads(&J, nthreads);
}
