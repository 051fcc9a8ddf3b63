/* Native kernels of the els-audit score engine (compiled on first use by _native.py).
 *
 * els_softmax_sums: the softmax sums of one (tile, level) step of the nested pass
 * (_nested.py), in one read of the logits instead of four torch passes (subtract the
 * running maximum, clamp, exp2, weighted sum).  Columns r are query pixels, rows j nodes:
 *
 *   part[c, r] = sum_j vals[c, j] * 2**min(max(S[j, r] - m[r], lo), 127)
 *
 * S (n, R) with row stride ldS, m (R,), vals (nc, n) with row stride ldv, part (nc, R)
 * contiguous.  (A variant that also added the parents' logits, replacing the row gather
 * and the GEMM's accumulate, ran slower: bench/README.md.)
 *
 * 2**x is computed as 2**n * 2**f with n = rint(x), f = x - n in [-1/2, 1/2] and 2**f by its
 * Taylor series to degree 7 (truncation < 4e-9 relative; measured in float32 over [-126, 127]
 * against float64: < 6e-8 relative, tests/machines/test_native.py).
 *
 * Threads: OpenMP over blocks of columns; linked against the libgomp that torch has loaded
 * (same soname), so torch and these kernels share one thread pool.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>
#ifdef __AVX__
#include <immintrin.h>
#endif

#ifndef BLOCK
#define BLOCK 128   /* columns per work item (64 and 256 measured no faster) */
#endif
#define MAX_NC 8    /* centre channels + 1 */

/* e**f for |f| <= ln(2) / 2 by Horner's rule on its Taylor series to degree 7; K(c) makes a
 * constant of the type at hand (scalar, or vector in v8_exp2) */
#define EXP_TAYLOR7(p, f, K)                                                               \
    do {                                                                                  \
        (p) = K(1.0f / 5040.0f);                                                          \
        (p) = (p) * (f) + K(1.0f / 720.0f);                                               \
        (p) = (p) * (f) + K(1.0f / 120.0f);                                               \
        (p) = (p) * (f) + K(1.0f / 24.0f);                                                \
        (p) = (p) * (f) + K(1.0f / 6.0f);                                                 \
        (p) = (p) * (f) + K(0.5f);                                                        \
        (p) = (p) * (f) + K(1.0f);                                                        \
        (p) = (p) * (f) + K(1.0f);                                                        \
    } while (0)
#define SCALAR(c) (c)

static inline float exp2_f32(float x) {
    float n = __builtin_rintf(x);
    float f = (x - n) * 0.693147180559945309f;   /* 2**(x-n) = e**f */
    float p;
    EXP_TAYLOR7(p, f, SCALAR);
    int32_t bits = ((int32_t)n + 127) << 23;     /* 2**n, n in [-126, 127] */
    float s;
    memcpy(&s, &bits, sizeof s);
    return p * s;
}

int els_native_abi(void) { return 4; }

/* The column-block body for a compile-time channel count NC (so that the loop over r, with
 * its NC accumulators, vectorises). */
static inline __attribute__((always_inline)) void
sums_block(const int NC, const float *S, int64_t n, int64_t ldS, const float *mb, const float *vals,
           int64_t ldv, float lo, int64_t w, float *part, int64_t R) {
    float acc[MAX_NC][BLOCK];
    for (int c = 0; c < NC; c++)
        for (int64_t r = 0; r < BLOCK; r++) acc[c][r] = 0.0f;
    for (int64_t j = 0; j < n; j++) {
        const float *row = S + j * ldS;
        float v[MAX_NC];
        for (int c = 0; c < NC; c++) v[c] = vals[c * ldv + j];
        #pragma omp simd
        for (int64_t r = 0; r < w; r++) {
            float d = row[r] - mb[r];
            d = d < lo ? lo : d;
            d = d > 127.0f ? 127.0f : d;
            const float e = exp2_f32(d);
            for (int c = 0; c < NC; c++) acc[c][r] += v[c] * e;
        }
    }
    for (int c = 0; c < NC; c++) memcpy(part + c * R, acc[c], (size_t)w * sizeof(float));
}

int els_softmax_sums(const float *S, int64_t n, int64_t R, int64_t ldS, const float *m,
                     const float *vals, int64_t nc, int64_t ldv, float lo, float *part, int nthreads) {
    if (nc < 1 || nc > MAX_NC || n < 0 || R < 0) return 1;
    const int64_t nblocks = (R + BLOCK - 1) / BLOCK;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t b = 0; b < nblocks; b++) {
        const int64_t r0 = b * BLOCK;
        const int64_t w = R - r0 < BLOCK ? R - r0 : BLOCK;
        const float *Sb = S + r0, *mb = m + r0;
        float *pb = part + r0;
        switch (nc) {
            case 1: sums_block(1, Sb, n, ldS, mb, vals, ldv, lo, w, pb, R); break;
            case 2: sums_block(2, Sb, n, ldS, mb, vals, ldv, lo, w, pb, R); break;
            case 3: sums_block(3, Sb, n, ldS, mb, vals, ldv, lo, w, pb, R); break;
            case 4: sums_block(4, Sb, n, ldS, mb, vals, ldv, lo, w, pb, R); break;
            case 5: sums_block(5, Sb, n, ldS, mb, vals, ldv, lo, w, pb, R); break;
            case 6: sums_block(6, Sb, n, ldS, mb, vals, ldv, lo, w, pb, R); break;
            case 7: sums_block(7, Sb, n, ldS, mb, vals, ldv, lo, w, pb, R); break;
            default: sums_block(8, Sb, n, ldS, mb, vals, ldv, lo, w, pb, R); break;   /* nc == MAX_NC */
        }
    }
    return 0;
}

/* els_softmax_sums_rows: the same sums for the single-k kernel (_engine.py), whose logit
 * tiles are (rows, keys) with keys contiguous:
 *
 *   part[r, c] = sum_j vals[c, j] * 2**min(max(L[r, j] - m[r], lo), 127)
 *
 * L (R, n) with row stride ldL, m (R,), vals (nc, n) with row stride ldv, part (R, nc)
 * contiguous.  Threads over rows; each row is reduced by 8-lane partial sums.
 */
int els_softmax_sums_rows(const float *L, int64_t R, int64_t n, int64_t ldL, const float *m,
                          const float *vals, int64_t nc, int64_t ldv, float lo, float *part, int nthreads) {
    if (nc < 1 || nc > MAX_NC || n < 0 || R < 0) return 1;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < R; r++) {
        const float *row = L + r * ldL;
        const float mr = m[r];
        float acc[MAX_NC][8];
        float e[BLOCK];
        for (int64_t c = 0; c < nc; c++)
            for (int l = 0; l < 8; l++) acc[c][l] = 0.0f;
        for (int64_t j0 = 0; j0 < n; j0 += BLOCK) {
            const int64_t w = n - j0 < BLOCK ? n - j0 : BLOCK;
            #pragma omp simd
            for (int64_t j = 0; j < w; j++) {
                float d = row[j0 + j] - mr;
                d = d < lo ? lo : d;
                d = d > 127.0f ? 127.0f : d;
                e[j] = exp2_f32(d);
            }
            for (int64_t c = 0; c < nc; c++) {
                const float *v = vals + c * ldv + j0;
                int64_t j = 0;
                for (; j + 8 <= w; j += 8)
                    for (int l = 0; l < 8; l++) acc[c][l] += v[j + l] * e[j + l];
                for (; j < w; j++) acc[c][j & 7] += v[j] * e[j];
            }
        }
        for (int64_t c = 0; c < nc; c++) {
            float s = 0.0f;
            for (int l = 0; l < 8; l++) s += acc[c][l];
            part[r * nc + c] = s;
        }
    }
    return 0;
}

/* els_decode_rows: kept tree rows stored as palette codes (_nested.py) back to engine rows:
 *
 *   out[j, c] = palette[codes[j, c]] - mu[c]   (c < ring),   out[j, ring + i] = extra[j, i]  (i < 2)
 *
 * codes (n, ring) uint8 with row stride ldc, extra (n, 2) with row stride lde, out (n, ring + 2)
 * contiguous.  The same float32 operations as decoding in torch, so the same bits.
 */
int els_decode_rows(const uint8_t *codes, int64_t n, int64_t ring, int64_t ldc, const float *palette,
                    const float *mu, const float *extra, int64_t lde, float *out, int nthreads) {
    if (n < 0 || ring < 0) return 1;
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (n * ring > (1 << 16))
    for (int64_t j = 0; j < n; j++) {
        const uint8_t *cj = codes + j * ldc;
        float *oj = out + j * (ring + 2);
        for (int64_t c = 0; c < ring; c++) oj[c] = palette[cj[c]] - mu[c];
        oj[ring] = extra[j * lde];
        oj[ring + 1] = extra[j * lde + 1];
    }
    return 0;
}

/* els_nested_tile: one tile of the nested pass (_nested.py), all its levels, fused.
 *
 * Per level i (k_1 < k_2 < ...) and query row r, the base-2 logit of node j is
 *
 *   S_i[j, r] = S_(i-1)[par_i[j], r] + sum_d K_i[j, d] Q_i[d, r]
 *
 * (its parent's logit plus the GEMM over the ring's columns and the two bias columns), and
 * each level keeps an online softmax per row: a running maximum m_i[r] and the sums
 *
 *   acc_i[c, r] = sum over nodes j counted so far of vals_i[c, j] * 2**(S_i[j, r] - m_i[r]).
 *
 * The torch path (_nested.py) writes every level's (nodes, rows) logit tile to memory and
 * reads it back three times (parent gather, GEMM accumulate, softmax); here a worker takes
 * a block of rows (WB micro-columns of 16 rows), walks the tile's levels keeping only the
 * previous level's logits of its rows (in its scratch, cache-resident), and computes the
 * logits in registers (4 nodes x 16 rows), followed at once by their exp2 and sums.  A level
 * whose key rows are mostly zero (under SPARSE_BELOW nonzero: images with a background,
 * shifted by it) multiplies only the nonzero entries (1 node x 64 rows in registers).  Key
 * rows come as floats or as byte codes decoded here.  The single-k engine (_engine.py) calls
 * this with one level per key chunk, its log2 multiplicities as the level's bias.
 * Each tile's sums are kept apart and added at its end (one float32 accumulator over the
 * whole dictionary lost ~1e-5).
 *
 * Softmax: the running maximum is raised only when a logit exceeds it by more than `slack`
 * bits (sums then stay below 2**slack * nodes, far from float32 overflow), and the row's
 * sums are rescaled then; a micro-tile whose logits all lie more than -skip bits below the
 * running maximum adds nothing (each weight < 2**skip, all keys together below float
 * rounding: _engine.skip_threshold) and is not exponentiated.  Weights below 2**lo are
 * clamped to 2**lo as in els_softmax_sums.
 *
 * Diagnostics (levels given best/best_j/t1, the single-k engine's): per row the largest
 * per-entry logit S - bias and its key (the first on ties: nodes in order, strictly greater
 * only; micro-tiles skipped as negligible cannot hold it), and the entropy's
 * t1 = sum 2**(S - m) (S - m), kept relative to m as acc is (a tile's part apart, rescaled
 * with P when m rises: t1 <- scale (t1 + (m_old - m_new) z_old), z the `ones` row of the
 * sums).  t1 loses precision to float32 rounding of (S - m) when m lags the true maximum:
 * the caller passes a small slack then.
 *
 * Rows: level i computes rows [0, rows_i) rounded up to 16 (rows_i non-increasing in i); the
 * caller pads Q, m and acc (and the diagnostics' arrays) to that width and ignores the extra
 * rows.
 * Returns 0, or a code > 0 for bad arguments (nothing written).
 */
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

typedef struct {           /* one level of a tile; every field 8 bytes (filled from an int64 array) */
    const float *K;        /* (n, D) key rows [ring - mu, ||ring - mu||^2, dbias], row stride ldK */
    int64_t ldK, D, n;
    const int32_t *par;    /* (n,) parent index into the previous level's nodes of this tile (level 0: unused) */
    const float *Q;        /* (D, >= rows rounded up to 16) query columns [q' a/b^2 log2e; coef_sq; 1] */
    int64_t ldQ;
    int64_t own0;          /* nodes own0..n-1 are counted in this tile's softmax */
    int64_t want;          /* 0: the level only feeds the next one */
    int64_t rows;          /* active query rows */
    const float *vals;     /* (nc, n) centres and ones, row stride ldv */
    int64_t ldv;
    float *m;              /* (>= rows rounded up to 16) running maxima, updated */
    float *acc;            /* (nc, ldacc) sums, updated */
    int64_t ldacc;
    /* byte-coded key rows (K NULL): row j is [palette[codes[j, :]] - mu, extra[j, 0], extra[j, 1]] */
    const uint8_t *codes;  /* (n, D - 2), row stride ldc */
    int64_t ldc;
    const float *palette;  /* (256,) */
    const float *mu;       /* (D - 2,) */
    const float *extra;    /* (n, 2), row stride lde */
    int64_t lde;
    const float *bias;     /* optional (n,): added to each node's logit (single-k dictionaries' log2 counts) */
    float *top;            /* optional (>= rows rounded up to 16): the rows' true running maxima, updated, for
                            * the float64 refinement's records (-inf: record this row; +inf: never) */
    /* optional diagnostics (single-k engine), per row (>= rows rounded up to 16), updated: */
    float *best;           /* the largest per-entry logit S - bias seen (-inf at first) ... */
    int64_t *best_j;       /* ... and its key, key0 + node (the first such node on ties) */
    int64_t key0;
    float *t1;             /* sum over nodes of 2**(S - m) (S - m), relative to m as acc is */
    int64_t ones;          /* with t1: the row of vals that holds ones (acc's normaliser) */
} els_level_t;

/* The float64 refinement's records (_engine.Float64Refinement), one buffer per thread: every
 * owned node whose float32 logit s lies within `bits` of its row's true running maximum
 * (top, updated with every logit; the softmax's m can lag it by `slack`) is appended as
 * (level, row, node, bits of s), s exactly as summed.  A key within `bits` of the row's final
 * maximum was within `bits` of every earlier maximum, so it is recorded.  A full buffer drops
 * the records that fell below their rows' maxima since (its rows belong to this thread's
 * work items of this call, so their maxima are its own); if over half stays full, the
 * buffer gives up (overflow) and the caller falls back. */
typedef struct {
    int32_t *buf;          /* (cap, 4) */
    int64_t cap, n;
    int overflow;
    float bits;
    const els_level_t *lv; /* the call's levels (for pruning) */
} rec_t;

static void rec_prune(rec_t *rb) {
    int64_t kept = 0;
    for (int64_t i = 0; i < rb->n; i++) {
        int32_t *e = rb->buf + 4 * i;
        float s;
        memcpy(&s, e + 3, sizeof s);
        if (s >= rb->lv[e[0]].top[e[1]] - rb->bits) {
            memmove(rb->buf + 4 * kept, e, 4 * sizeof(int32_t));
            kept++;
        }
    }
    rb->n = kept;
}

static void rec_push(rec_t *rb, int level, int64_t row, int64_t j, float s) {
    if (rb->overflow) return;
    if (rb->n == rb->cap) {
        rec_prune(rb);
        if (2 * rb->n > rb->cap) {
            rb->overflow = 1;
            return;
        }
    }
    int32_t *e = rb->buf + 4 * rb->n++;
    e[0] = level;
    e[1] = (int32_t)row;
    e[2] = (int32_t)j;
    memcpy(e + 3, &s, sizeof s);
}

#define MW 16              /* rows per micro-column: two 8-lane vectors */

static inline v8f v8_ld(const float *p) { v8f v; memcpy(&v, p, sizeof v); return v; }
static inline void v8_st(float *p, v8f v) { memcpy(p, &v, sizeof v); }
static inline v8f v8_splat(float x) { v8f v = {x, x, x, x, x, x, x, x}; return v; }
static inline v8f v8_sel(v8i m, v8f a, v8f b) { return (v8f)(((v8i)a & m) | ((v8i)b & ~m)); }
static inline v8f v8_max(v8f a, v8f b) { return v8_sel(a > b, a, b); }
static inline v8f v8_min(v8f a, v8f b) { return v8_sel(a < b, a, b); }
static inline int v8_any(v8i m) {
#ifdef __AVX__
    return _mm256_movemask_ps((__m256)m) != 0;
#else
    int any = 0;
    for (int l = 0; l < 8; l++) any |= m[l] != 0;
    return any;
#endif
}

/* 2**x for x in [-126, 127], as exp2_f32 (rounding by the 1.5 * 2**23 trick: exact for |x| < 2**22) */
static inline v8f v8_exp2(v8f x) {
    const v8f magic = v8_splat(12582912.0f);
    v8f n = (x + magic) - magic;
    v8f f = (x - n) * v8_splat(0.693147180559945309f);
    v8f p;
    EXP_TAYLOR7(p, f, v8_splat);
    v8i e = (__builtin_convertvector(n, v8i) + 127) << 23;
    return p * (v8f)e;
}

/* Logits of the NQ nodes j.. (dense key rows) over micro-columns [ub0, ue) of a worker's
 * block: S = K Q, then the parent's logit added (as addmm adds its product), into Scur. */
static inline __attribute__((always_inline)) void
logits_dense(const int NQ, const els_level_t *L, const float *K, int64_t ldK, int first, int64_t j,
             const float *Sprev, float *Scur, int64_t ub0, int64_t ue, int64_t WB) {
    const float *Kq[4];
    _Pragma("GCC unroll 4")
    for (int q = 0; q < NQ; q++) Kq[q] = K + (j + q) * ldK;
    const int64_t D = L->D;
    for (int64_t u = ub0; u < ue; u++) {
        const int64_t ul = u - ub0;
        v8f s[4][2];
        _Pragma("GCC unroll 4")
        for (int q = 0; q < NQ; q++) s[q][0] = s[q][1] = v8_splat(0.0f);
        const float *Qc = L->Q + u * MW;
        for (int64_t d = 0; d < D; d++, Qc += L->ldQ) {
            const v8f q0 = v8_ld(Qc), q1 = v8_ld(Qc + 8);
            _Pragma("GCC unroll 4")
            for (int q = 0; q < NQ; q++) {
                const v8f kb = v8_splat(Kq[q][d]);
                s[q][0] += kb * q0;
                s[q][1] += kb * q1;
            }
        }
        _Pragma("GCC unroll 4")
        for (int q = 0; q < NQ; q++) {
            if (!first) {
                const float *p = Sprev + ((int64_t)L->par[j + q] * WB + ul) * MW;
                s[q][0] += v8_ld(p);
                s[q][1] += v8_ld(p + 8);
            }
            if (L->bias) {
                const v8f bj = v8_splat(L->bias[j + q]);
                s[q][0] += bj;
                s[q][1] += bj;
            }
            float *o = Scur + ((j + q) * WB + ul) * MW;
            v8_st(o, s[q][0]);
            v8_st(o + 8, s[q][1]);
        }
    }
}

/* Sparse key rows (most ring pixels equal to the shift, so exactly zero): node j's `cnt`
 * nonzero entries (column idx, value), NU micro-columns from u, in registers. */
static inline __attribute__((always_inline)) void
logits_sparse_chunk(const int NU, const els_level_t *L, int first, int64_t j, const uint16_t *idx,
                    const float *val, int64_t cnt, const float *Sprev, float *Scur, int64_t u, int64_t ub0,
                    int64_t WB) {
    v8f s[8];
    _Pragma("GCC unroll 8")
    for (int w = 0; w < 2 * NU; w++) s[w] = v8_splat(0.0f);
    const float *Qu = L->Q + u * MW;
    for (int64_t e = 0; e < cnt; e++) {
        const float *Qd = Qu + (int64_t)idx[e] * L->ldQ;
        const v8f v = v8_splat(val[e]);
        _Pragma("GCC unroll 8")
        for (int w = 0; w < 2 * NU; w++) s[w] += v * v8_ld(Qd + 8 * w);
    }
    if (!first) {
        const float *p = Sprev + ((int64_t)L->par[j] * WB + u - ub0) * MW;
        _Pragma("GCC unroll 8")
        for (int w = 0; w < 2 * NU; w++) s[w] += v8_ld(p + 8 * w);
    }
    if (L->bias) {
        const v8f bj = v8_splat(L->bias[j]);
        _Pragma("GCC unroll 8")
        for (int w = 0; w < 2 * NU; w++) s[w] += bj;
    }
    float *o = Scur + (j * WB + u - ub0) * MW;
    _Pragma("GCC unroll 8")
    for (int w = 0; w < 2 * NU; w++) v8_st(o + 8 * w, s[w]);
}

static void logits_sparse(const els_level_t *L, int first, int64_t j, const uint16_t *idx, const float *val,
                          int64_t cnt, const float *Sprev, float *Scur, int64_t ub0, int64_t ue, int64_t WB) {
    int64_t u = ub0;
    for (; ue - u >= 4; u += 4) logits_sparse_chunk(4, L, first, j, idx, val, cnt, Sprev, Scur, u, ub0, WB);
    switch (ue - u) {
        case 3: logits_sparse_chunk(3, L, first, j, idx, val, cnt, Sprev, Scur, u, ub0, WB); break;
        case 2: logits_sparse_chunk(2, L, first, j, idx, val, cnt, Sprev, Scur, u, ub0, WB); break;
        case 1: logits_sparse_chunk(1, L, first, j, idx, val, cnt, Sprev, Scur, u, ub0, WB); break;
        default: break;
    }
}

/* The refinement's records among NQ nodes j.. at 8 rows from r (logits s): raise the rows'
 * true maxima, then record the logits within rb->bits of them (rows below L->rows only). */
static inline __attribute__((always_inline)) void
record_nodes(const int NQ, const els_level_t *L, int64_t j, const v8f *s, int64_t r, rec_t *rb, int level) {
    float *tp = L->top + r;
    v8f tv = v8_ld(tp), smax = s[0];
    _Pragma("GCC unroll 4")
    for (int q = 1; q < NQ; q++) smax = v8_max(smax, s[q]);
    if (v8_any(smax > tv)) {
        tv = v8_max(tv, smax);
        v8_st(tp, tv);
    }
    const v8f thr = tv - v8_splat(rb->bits);
    _Pragma("GCC unroll 4")
    for (int q = 0; q < NQ; q++) {
        const v8i hit = s[q] >= thr;
        if (!v8_any(hit)) continue;
        for (int l = 0; l < 8; l++)
            if (hit[l] && r + l < L->rows) rec_push(rb, level, r + l, j + q, s[q][l]);
    }
}

/* The diagnostics' best entries among NQ nodes j.. at 8 rows from r (logits s): the largest
 * per-entry logit s - bias and its key; strictly greater only, nodes in order, so the first
 * of equal entries stays (as the torch path). */
static inline __attribute__((always_inline)) void
best_nodes(const int NQ, const els_level_t *L, int64_t j, const v8f *s, int64_t r) {
    float *bp = L->best + r;
    v8f e[4], emax = v8_splat(-INFINITY);
    _Pragma("GCC unroll 4")
    for (int q = 0; q < NQ; q++) {
        e[q] = L->bias ? s[q] - v8_splat(L->bias[j + q]) : s[q];
        emax = v8_max(emax, e[q]);
    }
    if (!v8_any(emax > v8_ld(bp))) return;                 /* rare once the maxima settle */
    for (int l = 0; l < 8; l++)
        for (int q = 0; q < NQ; q++)
            if (e[q][l] > bp[l]) {
                bp[l] = e[q][l];
                L->best_j[r + l] = L->key0 + j + q;
            }
}

/* A worker's scratch for the tile's sums: P (nc <= MAX_NC rows of WB * MW), then the
 * diagnostics' t1 of the tile (WB * MW). */
#define T1_OF(P, WB) ((P) + MAX_NC * (WB) * MW)

/* The online softmax of the NQ nodes j.. (logits in Scur) into the tile's sums P (and with
 * diagnostics, t1 into T1_OF(P) and the best entries into L->best, L->best_j). */
static inline __attribute__((always_inline)) void
softmax_nodes(const int NQ, const els_level_t *L, int64_t j, const float *Scur, float *P, int64_t ub0, int64_t ue,
              int64_t WB, int64_t nc, float lo, float skip, float slack, rec_t *rb, int level) {
    float *PT = T1_OF(P, WB);
    for (int64_t u = ub0; u < ue; u++) {
        const int64_t ul = u - ub0, r = u * MW;
        _Pragma("GCC unroll 2")
        for (int h = 0; h < 2; h++) {
            float *mp = L->m + r + 8 * h;
            v8f s[4], mv = v8_ld(mp), d[4], dmax = v8_splat(-INFINITY);
            _Pragma("GCC unroll 4")
            for (int q = 0; q < NQ; q++) {
                s[q] = v8_ld(Scur + ((j + q) * WB + ul) * MW + 8 * h);
                d[q] = s[q] - mv;
                dmax = v8_max(dmax, d[q]);
            }
            if (L->top) record_nodes(NQ, L, j, s, r + 8 * h, rb, level);
            const v8i raise = dmax > v8_splat(slack);
            if (v8_any(raise)) {               /* rare once the maxima settle */
                v8f smax = s[0];
                _Pragma("GCC unroll 4")
                for (int q = 1; q < NQ; q++) smax = v8_max(smax, s[q]);
                const v8f mnew = v8_sel(raise, smax, mv);
                const v8f scale = v8_exp2(v8_min(v8_max(mv - mnew, v8_splat(lo)), v8_splat(0.0f)));
                if (L->t1) {
                    /* t1 relative to the new maximum: scale (t1 + (m_old - m_new) z_old), for the
                     * sums so far and this tile's apart, each with its own z (none yet: 0, as
                     * m_old may be -inf) */
                    const v8f delta = v8_sel(raise, mv - mnew, v8_splat(0.0f)), zero = v8_splat(0.0f);
                    float *tp = L->t1 + r + 8 * h, *ptp = PT + ul * MW + 8 * h;
                    const v8f za = v8_ld(L->acc + L->ones * L->ldacc + r + 8 * h);
                    const v8f zp = v8_ld(P + (L->ones * WB + ul) * MW + 8 * h);
                    v8_st(tp, (v8_ld(tp) + v8_sel(za > zero, delta * za, zero)) * scale);
                    v8_st(ptp, (v8_ld(ptp) + v8_sel(zp > zero, delta * zp, zero)) * scale);
                }
                for (int64_t c = 0; c < nc; c++) {
                    float *ap = L->acc + c * L->ldacc + r + 8 * h, *pp = P + (c * WB + ul) * MW + 8 * h;
                    v8_st(ap, v8_ld(ap) * scale);
                    v8_st(pp, v8_ld(pp) * scale);
                }
                v8_st(mp, mnew);
                mv = mnew;
                dmax = v8_splat(-INFINITY);
                _Pragma("GCC unroll 4")
                for (int q = 0; q < NQ; q++) {
                    d[q] = s[q] - mv;
                    dmax = v8_max(dmax, d[q]);
                }
            }
            /* negligible micro-tile; with diagnostics too: the best entry's logit is at least
             * the final maximum less log2(keys) (its key's count), above any skipped one's */
            if (!v8_any(dmax >= v8_splat(skip))) continue;
            if (L->best) best_nodes(NQ, L, j, s, r + 8 * h);
            v8f e[4];
            _Pragma("GCC unroll 4")
            for (int q = 0; q < NQ; q++) {
                d[q] = v8_min(v8_max(d[q], v8_splat(lo)), v8_splat(127.0f));
                e[q] = v8_exp2(d[q]);
            }
            if (L->t1) {
                float *ptp = PT + ul * MW + 8 * h;
                v8f a = v8_ld(ptp);
                _Pragma("GCC unroll 4")
                for (int q = 0; q < NQ; q++) a += e[q] * d[q];
                v8_st(ptp, a);
            }
            for (int64_t c = 0; c < nc; c++) {
                float *pp = P + (c * WB + ul) * MW + 8 * h;
                v8f a = v8_ld(pp);
                _Pragma("GCC unroll 4")
                for (int q = 0; q < NQ; q++) a += v8_splat(L->vals[c * L->ldv + j + q]) * e[q];
                v8_st(pp, a);
            }
        }
    }
}

typedef struct {           /* a level's key rows as nonzero entries (sparse levels) */
    int sparse;
    const float *K;        /* dense key rows, row stride ldK (decoded here for byte-coded rows) */
    int64_t ldK;
    float *val;            /* (n, D): node j's entries at j * D */
    uint16_t *idx;
    int32_t *cnt;          /* (n,) */
} csr_t;

/* Nodes [j0, j1) of level L: logits, and with `own` their softmax. */
static void nested_range(const els_level_t *L, const csr_t *Z, int first, int64_t j0, int64_t j1,
                         const float *Sprev, float *Scur, float *P, int64_t ub0, int64_t ue, int64_t WB, int own,
                         int64_t nc, float lo, float skip, float slack, rec_t *rb, int level) {
    for (int64_t j = j0; j < j1; j += 4) {
        const int nq = j1 - j < 4 ? (int)(j1 - j) : 4;
        if (Z->sparse) {
            for (int q = 0; q < nq; q++)
                logits_sparse(L, first, j + q, Z->idx + (j + q) * L->D, Z->val + (j + q) * L->D, Z->cnt[j + q],
                              Sprev, Scur, ub0, ue, WB);
        } else if (nq == 4) {
            if (first) logits_dense(4, L, Z->K, Z->ldK, 1, j, Sprev, Scur, ub0, ue, WB);
            else logits_dense(4, L, Z->K, Z->ldK, 0, j, Sprev, Scur, ub0, ue, WB);
        } else {
            for (int q = 0; q < nq; q++) {
                if (first) logits_dense(1, L, Z->K, Z->ldK, 1, j + q, Sprev, Scur, ub0, ue, WB);
                else logits_dense(1, L, Z->K, Z->ldK, 0, j + q, Sprev, Scur, ub0, ue, WB);
            }
        }
        if (!own) continue;
        if (nq == 4) softmax_nodes(4, L, j, Scur, P, ub0, ue, WB, nc, lo, skip, slack, rb, level);
        else
            for (int q = 0; q < nq; q++)
                softmax_nodes(1, L, j + q, Scur, P, ub0, ue, WB, nc, lo, skip, slack, rb, level);
    }
}

#define MAX_LEVELS 64
#define SPARSE_BELOW 0.6   /* a level runs sparse when fewer of its key entries are nonzero */

/* csr: float32 scratch of at least sum over levels of n * (ceil(D / 2) + D + 1) floats, plus
 * n * D more for byte-coded levels (capacity csr_floats); scratch: per thread
 * (2 * largest n + MAX_NC) * WB * 16 floats, (2 * largest n + MAX_NC + 1) * WB * 16 when a
 * level has t1.  Levels with `top` record into rec (per thread
 * rec_cap records of 4 int32, see rec_t); rec_n[t] receives thread t's count, or -1 where its
 * buffer overflowed (the sums are still right; the records are not all there). */
int els_nested_tile(const els_level_t *lv, int64_t nlev, int64_t nc, float lo, float skip, float slack,
                    int64_t WB, float *scratch, int64_t scratch_per_thread, float *csr, int64_t csr_floats,
                    int32_t *rec, int64_t rec_cap, int64_t *rec_n, float rec_bits, int nthreads) {
    if (nlev < 1 || nlev > MAX_LEVELS || nc < 1 || nc > MAX_NC || WB < 1 || nthreads < 1 || !(slack > 0.0f) ||
        slack > 64.0f)
        return 1;
    int diag = 0;
    for (int64_t i = 0; i < nlev; i++) {
        if (lv[i].top && (!rec || !rec_n || rec_cap < 2 || !(rec_bits >= 0.0f) || lv[i].rows > INT32_MAX ||
                          lv[i].n > INT32_MAX))
            return 7;
        if ((lv[i].best != NULL) != (lv[i].best_j != NULL) || (lv[i].t1 && (lv[i].ones < 0 || lv[i].ones >= nc)))
            return 8;
        diag |= lv[i].t1 != NULL;
    }
    int64_t nmax = 0, need = 0;
    csr_t Z[MAX_LEVELS];
    for (int64_t i = 0; i < nlev; i++) {
        const els_level_t *L = lv + i;
        const int coded = L->K == NULL;
        if (L->n < 0 || L->D < 1 || L->D > 65535 || L->own0 < 0 || L->own0 > L->n || L->rows < 0 ||
            (!coded && L->ldK < L->D) ||
            (coded && (L->D < 2 || L->ldc < L->D - 2 || L->lde < 2 || !L->codes || !L->palette || !L->mu || !L->extra)))
            return 2;
        if (i > 0 && L->rows > lv[i - 1].rows) return 3;
        if (i > 0) {
            if (L->par == NULL && L->n > 0) return 4;
            for (int64_t j = 0; j < L->n; j++)
                if (L->par[j] < 0 || L->par[j] >= lv[i - 1].n) return 4;
        }
        if (L->n > nmax) nmax = L->n;
        Z[i].val = csr + need;
        Z[i].idx = (uint16_t *)(csr + need + L->n * L->D);
        Z[i].cnt = (int32_t *)(csr + need + L->n * L->D + (L->n * L->D + 1) / 2);
        need += L->n * L->D + (L->n * L->D + 1) / 2 + L->n;
        Z[i].K = coded ? csr + need : L->K;
        Z[i].ldK = coded ? L->D : L->ldK;
        need += coded ? L->n * L->D : 0;
    }
    if ((2 * nmax + MAX_NC + diag) * WB * MW > scratch_per_thread) return 5;
    if (need > csr_floats) return 6;
    const int64_t U0 = (lv[0].rows + MW - 1) / MW, items = (U0 + WB - 1) / WB;
    #pragma omp parallel num_threads(nthreads)
    {
        const int tid = omp_get_thread_num();
        rec_t rb = {rec ? rec + 4 * rec_cap * tid : NULL, rec_cap, 0, 0, rec_bits, lv};
        /* key rows to nonzero entries, every level (one read of the rows) */
        for (int64_t i = 0; i < nlev; i++) {
            const els_level_t *L = lv + i;
            #pragma omp for schedule(static)
            for (int64_t j = 0; j < L->n; j++) {
                const float *k = Z[i].K + j * Z[i].ldK;
                if (L->K == NULL) {                             /* decode a byte-coded row */
                    float *kd = (float *)k;
                    const uint8_t *cj = L->codes + j * L->ldc;
                    for (int64_t d = 0; d < L->D - 2; d++) kd[d] = L->palette[cj[d]] - L->mu[d];
                    kd[L->D - 2] = L->extra[j * L->lde];
                    kd[L->D - 1] = L->extra[j * L->lde + 1];
                }
                float *v = Z[i].val + j * L->D;
                uint16_t *x = Z[i].idx + j * L->D;
                int32_t c = 0;
                for (int64_t d = 0; d < L->D; d++) {            /* branch-free: zeros are overwritten */
                    v[c] = k[d];
                    x[c] = (uint16_t)d;
                    c += k[d] != 0.0f;
                }
                Z[i].cnt[j] = c;
            }
        }
        #pragma omp single
        for (int64_t i = 0; i < nlev; i++) {
            int64_t nnz = 0;
            for (int64_t j = 0; j < lv[i].n; j++) nnz += Z[i].cnt[j];
            Z[i].sparse = (double)nnz < SPARSE_BELOW * (double)(lv[i].n * lv[i].D);
        }
        #pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < items; item++) {
            float *buf[2];
            buf[0] = scratch + (int64_t)tid * scratch_per_thread;
            buf[1] = buf[0] + nmax * WB * MW;
            float *P = buf[1] + nmax * WB * MW;          /* this tile's sums of the level (nc, WB, MW) */
            const int64_t ub0 = item * WB;
            for (int64_t i = 0; i < nlev; i++) {
                const els_level_t *L = lv + i;
                const int64_t Ui = (L->rows + MW - 1) / MW;
                const int64_t ue = ub0 + WB < Ui ? ub0 + WB : Ui;
                if (ue <= ub0 || L->n == 0) break;
                const float *Sprev = buf[(i + 1) & 1];
                float *Scur = buf[i & 1];
                const int first = i == 0, last = i == nlev - 1;
                const int64_t own0 = L->want ? L->own0 : L->n;
                /* nodes before own0 only feed the next level (none at the last) */
                if (!last)
                    nested_range(L, Z + i, first, 0, own0, Sprev, Scur, P, ub0, ue, WB, 0, nc, lo, skip, slack, &rb,
                                 (int)i);
                if (own0 == L->n) continue;
                /* the tile's sums apart, added at the end (as the torch path does: float32 sums
                 * over a whole dictionary in one accumulator lose ~1e-5) */
                memset(P, 0, (size_t)(nc * WB * MW) * sizeof(float));
                if (L->t1) memset(T1_OF(P, WB), 0, (size_t)(WB * MW) * sizeof(float));
                nested_range(L, Z + i, first, own0, L->n, Sprev, Scur, P, ub0, ue, WB, 1, nc, lo, skip, slack, &rb,
                             (int)i);
                for (int64_t c = 0; c < nc; c++)
                    for (int64_t u = ub0; u < ue; u++) {
                        float *ap = L->acc + c * L->ldacc + u * MW;
                        const float *pp = P + (c * WB + u - ub0) * MW;
                        for (int l = 0; l < MW; l++) ap[l] += pp[l];
                    }
                if (L->t1)
                    for (int64_t u = ub0; u < ue; u++) {
                        float *tp = L->t1 + u * MW;
                        const float *pp = T1_OF(P, WB) + (u - ub0) * MW;
                        for (int l = 0; l < MW; l++) tp[l] += pp[l];
                    }
            }
        }
        if (rec_n) rec_n[tid] = rb.overflow ? -1 : rb.n;
    }
    return 0;
}

/* els_key_hash_f32 / _f64: the deduplication's hash of every key of one group (_dictionary.py,
 * _hash_dedup), read straight from the padded images instead of gathered into (keys, K) rows.
 *
 * Key q in [start, end) is image q / npos at position q % npos; its row is the C*k runs of k
 * elements at x[img * img_stride + pos_base[pos] + row_off[i] + dx] (i < nrows = C*k, the
 * unfold order).  Per key
 *
 *   h[q - start] = sum_d row[d] * R[d]        (float64; four partial sums by d mod 4, added
 *                                              in a fixed order: the same bits for equal rows)
 *
 * and colsum (nthreads, K, zeroed by the caller: OpenMP may start fewer threads) receives each
 * thread's float64 column sums of its keys' rows (the caller adds the threads' rows in order).
 * Threads over keys, static schedule. */
#define KEY_HASH(NAME, T)                                                                   \
int NAME(const T *x, int64_t img_stride, const int64_t *pos_base, int64_t npos, const int64_t *row_off,     \
         int64_t nrows, int64_t k, const double *R, int64_t start, int64_t end, double *h, double *colsum,  \
         int nthreads) {                                                                    \
    if (npos < 1 || nrows < 1 || k < 1 || end < start || start < 0) return 1;              \
    const int64_t K = nrows * k;                                                            \
    _Pragma("omp parallel num_threads(nthreads)")                                           \
    {                                                                                       \
        double *cs = colsum + (int64_t)omp_get_thread_num() * K;                            \
        _Pragma("omp for schedule(static)")                                                 \
        for (int64_t q = start; q < end; q++) {                                             \
            const T *b = x + (q / npos) * img_stride + pos_base[q % npos];                  \
            double s[4] = {0.0, 0.0, 0.0, 0.0};                                             \
            int64_t d = 0;                                                                  \
            for (int64_t i = 0; i < nrows; i++) {                                           \
                const T *p = b + row_off[i];                                                \
                for (int64_t dx = 0; dx < k; dx++, d++) {                                   \
                    const double v = (double)p[dx];                                         \
                    s[d & 3] += v * R[d];                                                   \
                    cs[d] += v;                                                             \
                }                                                                           \
            }                                                                               \
            h[q - start] = (s[0] + s[1]) + (s[2] + s[3]);                                   \
        }                                                                                   \
    }                                                                                       \
    return 0;                                                                               \
}
KEY_HASH(els_key_hash_f32, float)
KEY_HASH(els_key_hash_f64, double)

/* els_key_verify_f32 / _f64: after grouping keys by hash, check that every key q in
 * [start, end) equals its group's representative rep[inv[q]] element for element (the
 * same layout as els_key_hash).  Returns the number of keys that differ (0: the
 * deduplication is exact), or -1 for bad arguments. */
#define KEY_VERIFY(NAME, T)                                                                 \
int64_t NAME(const T *x, int64_t img_stride, const int64_t *pos_base, int64_t npos, const int64_t *row_off, \
             int64_t nrows, int64_t k, const int64_t *rep, const int64_t *inv, int64_t start, int64_t end,  \
             int nthreads) {                                                                \
    if (npos < 1 || nrows < 1 || k < 1 || end < start || start < 0) return -1;             \
    int64_t bad = 0;                                                                        \
    _Pragma("omp parallel for num_threads(nthreads) schedule(static) reduction(+:bad)")     \
    for (int64_t q = start; q < end; q++) {                                                 \
        const int64_t o = rep[inv[q - start]];                                              \
        if (o == q) continue;                                                               \
        const T *a = x + (q / npos) * img_stride + pos_base[q % npos];                      \
        const T *b = x + (o / npos) * img_stride + pos_base[o % npos];                      \
        int diff = 0;                                                                       \
        for (int64_t i = 0; i < nrows && !diff; i++)                                        \
            for (int64_t dx = 0; dx < k; dx++) diff |= a[row_off[i] + dx] != b[row_off[i] + dx];  \
        bad += diff;                                                                        \
    }                                                                                       \
    return bad;                                                                             \
}
KEY_VERIFY(els_key_verify_f32, float)
KEY_VERIFY(els_key_verify_f64, double)

/* els_exact_logits_f32 / _f64: the float64 refinement's logits (_engine.exact_logits) of n
 * (query row, key) records, the key read where it lies in the images:
 *
 *   out[i] = log2(e) (||q' ||^2 - ||q - a p||^2) / (2 b^2) + log2c[i],   q' = q - a mu,
 *
 * q = w * q_rows[qrow[i], :K] (row stride ldq), p = w * x[kbase[i] + off[d]] (d < K), a and b
 * the row's (a[qrow[i]], b[qrow[i]]), w an optional column scale (NULL: ones).  As in torch,
 * the products with w are rounded to T; the rest is float64 (equal to torch's to float64
 * rounding: the order of the sums and fused multiply-adds differ).  Threads over records. */
#define EXACT_LOGITS(NAME, T)                                                               \
int NAME(const T *q, int64_t ldq, const int64_t *qrow, const T *x, const int64_t *kbase, const int64_t *off, \
         int64_t K, const T *mu, const T *w, const double *a, const double *b, const double *log2c, int64_t n, \
         double *out, int nthreads) {                                                      \
    if (K < 1 || n < 0 || ldq < K) return 1;                                                \
    _Pragma("omp parallel for num_threads(nthreads) schedule(static) if (n * K > (1 << 16))") \
    for (int64_t i = 0; i < n; i++) {                                                       \
        const T *qr = q + qrow[i] * ldq;                                                    \
        const T *p = x + kbase[i];                                                          \
        const double ai = a[qrow[i]], bi = b[qrow[i]];                                      \
        double sq = 0.0, sd = 0.0;                                                          \
        for (int64_t d = 0; d < K; d++) {                                                   \
            const double qv = w ? (double)(T)(qr[d] * w[d]) : (double)qr[d];                \
            const double mv = w ? (double)(T)(mu[d] * w[d]) : (double)mu[d];                \
            const double pv = w ? (double)(T)(p[off[d]] * w[d]) : (double)p[off[d]];        \
            const double c = qv - ai * mv, e = qv - ai * pv;                                \
            sq += c * c;                                                                    \
            sd += e * e;                                                                    \
        }                                                                                   \
        out[i] = 1.4426950408889634 * (sq - sd) / (2.0 * bi * bi) + log2c[i];               \
    }                                                                                       \
    return 0;                                                                               \
}
EXACT_LOGITS(els_exact_logits_f32, float)
EXACT_LOGITS(els_exact_logits_f64, double)
