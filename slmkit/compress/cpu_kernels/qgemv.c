/* Integer GEMV for int4 and int8 weights against a few activation rows (decode-sized inputs), in the style of
 * llama.cpp's Q4 x Q8 and Q8 x Q8 dot products. (The int8 kernel, at the end, shares the activation side.)
 *
 * Each activation row is quantized per block of 32 columns to int8 with one fp32 scale (symmetric,
 * round to nearest, d = max|x| / 127). For output row n and block b the 4-bit codes q (unsigned) meet the
 * int8 activations in an integer dot product, and the group's zero point z enters through the block's
 * activation sum:
 *
 *     y[m, n] = sum_b s[n, g(b)] * d[m, b] * (sum_{j in b} q[n, j] * xq[m, j]  -  z[n, g(b)] * sum_{j in b} xq[m, j])
 *
 * which is the dequantized weight (q - z) s times the rounded activations d * xq, exactly, in exact
 * arithmetic: the only approximation is the 8-bit rounding of x (plus fp32 accumulation).
 *
 * The zero-point term is summed per group first: Z[m, g] = sum_{b in g} d[m, b] * xsum[m, b], and
 * y[m, n] -= sum_g (s z)[n, g] * Z[m, g] (sz is precomputed, padded to a multiple of 8 with zeros).
 *
 * Weight layout (prepared once in Python): per output row, per block of 32 input columns, 16 bytes; byte i
 * holds column i in its low nibble and column i + 16 in its high nibble. Loading two consecutive blocks as
 * one 256-bit vector, `& 0x0F` gives columns 0..15 of both blocks (one per 128-bit lane) and `>> 4` gives
 * columns 16..31; the activations of a block pair are stored in the same order (b[0:16], b+1[0:16],
 * b[16:32], b+1[16:32]), so two `maddubs` (u8 x s8 -> i16 pairs; 15 * 127 * 2 < 32767 cannot saturate)
 * and one `madd` with ones give per-lane i32 sums: lanes 0..3 belong to block b, 4..7 to block b + 1.
 *
 * Scales: `scale` holds one fp32 per `bps` blocks (blocks per scale entry). When bps is even a block
 * pair never straddles two scales, and the pair's float sums are accumulated per scale entry and scaled
 * once; when bps is 1 (group 32, or groups of an odd number of blocks, expanded per block in Python) each
 * pair builds its two-scale vector.
 *
 * Dispatch: the AVX2 + FMA functions are compiled with a target attribute and only called when the CPU
 * reports both (and the caller allows it); everything else runs the portable scalar code, so the library
 * loads and runs on any x86-64 (or other) CPU. Threads: OpenMP over output rows, `nthreads` from torch.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) || defined(__i386__)
#define SLM_X86 1
#include <immintrin.h>
#endif

#define QK 32

/* Per-thread workspace for the quantized activations, grown as needed (never shrunk). */
static __thread void *ws_ptr = NULL;
static __thread size_t ws_cap = 0;

static void *workspace(size_t bytes) {
    if (bytes > ws_cap) {
        free(ws_ptr);
        ws_ptr = NULL;
        ws_cap = 0;
        if (posix_memalign(&ws_ptr, 64, bytes) != 0) return NULL;
        ws_cap = bytes;
    }
    return ws_ptr;
}

/* Activation workspace layout, per input row m (row stride `row_bytes`):
 *   xq:  nb * 32 int8, block pairs interleaved as described above (a last unpaired block in natural order)
 *   dx:  one 8-float vector per pair ([d_b x4, d_b+1 x4]) and, for an odd nb, 8 more floats [d_last x8]
 *   db:  nb floats, the per-block scales (scalar path)
 *   xs:  nb int32, the per-block sums of xq (scalar path)
 *   Z:   gp floats (groups padded to a multiple of 8), the zero-point sums per group */
typedef struct {
    int8_t *xq;
    float *dx;
    float *db;
    int32_t *xs;
    float *Z;
} act_row;

static size_t align64(size_t n) { return (n + 63) & ~(size_t)63; }

static size_t act_row_bytes(int nb, int gp) {
    int nvec = (nb + 1) / 2;
    return align64((size_t)nb * QK) + align64((size_t)nvec * 8 * sizeof(float)) + align64((size_t)nb * sizeof(float))
           + align64((size_t)nb * sizeof(int32_t)) + align64((size_t)gp * sizeof(float));
}

static act_row act_at(char *base, size_t row_bytes, int m, int nb) {
    act_row r;
    char *p = base + (size_t)m * row_bytes;
    int nvec = (nb + 1) / 2;
    r.xq = (int8_t *)p; p += align64((size_t)nb * QK);
    r.dx = (float *)p; p += align64((size_t)nvec * 8 * sizeof(float));
    r.db = (float *)p; p += align64((size_t)nb * sizeof(float));
    r.xs = (int32_t *)p; p += align64((size_t)nb * sizeof(int32_t));
    r.Z = (float *)p;
    return r;
}

/* Position of column c (0..31) of block b in the interleaved activation layout. */
static inline size_t xq_index(int b, int c, int nb) {
    int pair = b / 2;
    if (2 * pair + 1 >= nb) return (size_t)b * QK + c;  /* unpaired last block: natural order */
    int lane = b & 1, half = c >= 16;
    return (size_t)pair * 64 + half * 32 + lane * 16 + (c & 15);
}

/* Quantize one activation row (scalar; also fills every field the AVX2 path reads). */
static void quantize_row_scalar(const float *x, act_row r, int k, int nb, int bpg, int gp) {
    for (int b = 0; b < nb; b++) {
        const float *xb = x + (size_t)b * QK;
        float amax = 0.0f;
        for (int c = 0; c < QK; c++) {
            float a = fabsf(xb[c]);
            amax = a > amax ? a : amax;
        }
        float d = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        int32_t sum = 0;
        for (int c = 0; c < QK; c++) {
            int v = (int)nearbyintf(xb[c] * inv);
            v = v > 127 ? 127 : (v < -127 ? -127 : v);
            r.xq[xq_index(b, c, nb)] = (int8_t)v;
            sum += v;
        }
        r.db[b] = d;
        r.xs[b] = sum;
        float *dv = r.dx + (size_t)(b / 2) * 8;
        if ((b & 1) == 0 && b + 1 == nb) {
            for (int i = 0; i < 8; i++) dv[i] = d;
        } else {
            for (int i = 0; i < 4; i++) dv[(b & 1) * 4 + i] = d;
        }
    }
    int groups = nb / bpg;
    for (int g = 0; g < gp; g++) {
        float z = 0.0f;
        if (g < groups)
            for (int b = g * bpg; b < (g + 1) * bpg; b++) z += r.db[b] * (float)r.xs[b];
        r.Z[g] = z;
    }
    (void)k;
}

/* Scalar kernel: output rows [n0, n1). */
static void q4_rows_scalar(const uint8_t *w, const float *scale, const float *sz, const float *bias, char *acts,
                           size_t row_bytes, float *y, int m_rows, int n_out, int nb, int bps, int gp, int bpg,
                           int n0, int n1) {
    (void)bpg;
    for (int n = n0; n < n1; n++) {
        const uint8_t *wn = w + (size_t)n * nb * 16;
        const float *sn = scale + (size_t)n * (nb / bps);
        const float *szn = sz + (size_t)n * gp;
        for (int m = 0; m < m_rows; m++) {
            act_row r = act_at(acts, row_bytes, m, nb);
            float acc = 0.0f;
            for (int b = 0; b < nb; b++) {
                const uint8_t *wb = wn + (size_t)b * 16;
                int32_t isum = 0;
                for (int i = 0; i < 16; i++) {
                    isum += (int32_t)(wb[i] & 15) * r.xq[xq_index(b, i, nb)];
                    isum += (int32_t)(wb[i] >> 4) * r.xq[xq_index(b, i + 16, nb)];
                }
                acc += sn[b / bps] * r.db[b] * (float)isum;
            }
            for (int g = 0; g < gp; g++) acc -= szn[g] * r.Z[g];
            y[(size_t)m * n_out + n] = acc + (bias ? bias[n] : 0.0f);
        }
    }
}

/* ---- int8 weights (one scale per output row): the same activation blocks, weights stored in the same
 * interleaved order as the activations, so position i of a row's weights meets position i of the activations.
 * y[m, n] = s[n] * sum_b d[m, b] * sum_{j in b} w[n, j] * xq[m, j]. */

/* The block of interleaved position i (see xq_index). */
static inline int q8_block_of(size_t i, int nb) {
    int pair = (int)(i / 64);
    if (2 * pair + 1 >= nb) return (int)(i / QK);
    return 2 * pair + (int)((i % 32) / 16);
}

static void q8_rows_scalar(const int8_t *w, const float *scale, const float *bias, char *acts, size_t row_bytes,
                           float *y, int m_rows, int n_out, int nb, int n0, int n1) {
    size_t k = (size_t)nb * QK;
    for (int n = n0; n < n1; n++) {
        const int8_t *wn = w + (size_t)n * k;
        for (int m = 0; m < m_rows; m++) {
            act_row r = act_at(acts, row_bytes, m, nb);
            float acc = 0.0f;
            int32_t isum = 0;
            int cur = q8_block_of(0, nb);
            for (size_t i = 0; i < k; i++) {
                int b = q8_block_of(i, nb);
                if (b != cur) {
                    acc += r.db[cur] * (float)isum;
                    isum = 0;
                    cur = b;
                }
                isum += (int32_t)wn[i] * r.xq[i];
            }
            acc += r.db[cur] * (float)isum;
            y[(size_t)m * n_out + n] = scale[n] * acc + (bias ? bias[n] : 0.0f);
        }
    }
}

#ifdef SLM_X86
#define AVX2 __attribute__((target("avx2,fma")))

AVX2 static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Quantize one activation row with AVX2 (same arithmetic as the scalar version: x * (127 / max|x|),
 * rounded to nearest even). */
AVX2 static void quantize_row_avx2(const float *x, act_row r, int nb, int bpg, int gp) {
    const __m256 signbit = _mm256_set1_ps(-0.0f);
    for (int b = 0; b < nb; b++) {
        const float *xb = x + (size_t)b * QK;
        __m256 v0 = _mm256_loadu_ps(xb), v1 = _mm256_loadu_ps(xb + 8);
        __m256 v2 = _mm256_loadu_ps(xb + 16), v3 = _mm256_loadu_ps(xb + 24);
        __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(signbit, v0), _mm256_andnot_ps(signbit, v1)),
                                  _mm256_max_ps(_mm256_andnot_ps(signbit, v2), _mm256_andnot_ps(signbit, v3)));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        float amax = _mm_cvtss_f32(m4);
        float d = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        __m256 vi = _mm256_set1_ps(inv);
        __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v0, vi), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v1, vi), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v2, vi), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v3, vi), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        /* block sum of the codes */
        __m256i s = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
        /* pack to int8 in column order: packs works per 128-bit lane, the permute restores the order */
        __m256i p01 = _mm256_packs_epi32(i0, i1), p23 = _mm256_packs_epi32(i2, i3);
        __m256i p = _mm256_packs_epi16(p01, p23);
        p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        __m128i lo = _mm256_castsi256_si128(p), hi = _mm256_extracti128_si256(p, 1);  /* cols 0..15, 16..31 */
        int pair = b / 2;
        if (2 * pair + 1 >= nb) {
            _mm256_storeu_si256((__m256i *)(r.xq + (size_t)b * QK), p);
        } else {
            int8_t *dst = r.xq + (size_t)pair * 64 + (b & 1) * 16;
            _mm_storeu_si128((__m128i *)dst, lo);
            _mm_storeu_si128((__m128i *)(dst + 32), hi);
        }
        r.db[b] = d;
        r.xs[b] = _mm_cvtsi128_si32(s4);
        float *dv = r.dx + (size_t)pair * 8;
        if ((b & 1) == 0 && b + 1 == nb) {
            _mm256_storeu_ps(dv, _mm256_set1_ps(d));
        } else {
            _mm_storeu_ps(dv + (b & 1) * 4, _mm_set1_ps(d));
        }
    }
    int groups = nb / bpg;
    for (int g = 0; g < gp; g++) {
        float z = 0.0f;
        if (g < groups)
            for (int b = g * bpg; b < (g + 1) * bpg; b++) z += r.db[b] * (float)r.xs[b];
        r.Z[g] = z;
    }
}

/* i32 block-pair sums (lanes 0..3: block b, 4..7: block b + 1) of weights `w` (32 bytes) with activations. */
#define PAIR_DOT(lo, hi, xp) \
    _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_load_si256((const __m256i *)(xp))), \
                                       _mm256_maddubs_epi16(hi, _mm256_load_si256((const __m256i *)((xp) + 32)))), ones)

/* MT activation rows against NR consecutive output rows (MT * NR <= 4). MT and NR are constants at every call
 * site, so the loops over them unroll and the MT * NR accumulators stay in registers; several accumulators also
 * keep several independent FMA chains in flight, which is what a single row (decode at batch 1) needs. */
AVX2 static inline __attribute__((always_inline)) void q4_tile_avx2(
        const uint8_t *w0, size_t wstride, const float *s0, size_t sstride, const float *sz0, size_t szstride,
        act_row *r, float out[4][4], const int MT, const int NR, int nb, int bps, int gp) {
    const __m256i mask = _mm256_set1_epi8(0x0F);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[4][4];
    for (int t = 0; t < MT; t++)
        for (int u = 0; u < NR; u++) acc[t][u] = _mm256_setzero_ps();
    int npairs = nb / 2;
    if (bps % 2 == 0) {
        /* a scale covers bps / 2 whole pairs: sum d * isum per scale entry, then scale once */
        int pps = bps / 2, ns = nb / bps;
        for (int e = 0; e < ns; e++) {
            __m256 part[4][4];
            for (int t = 0; t < MT; t++)
                for (int u = 0; u < NR; u++) part[t][u] = _mm256_setzero_ps();
            for (int p = e * pps; p < (e + 1) * pps; p++) {
                __m256 dx[4];
                for (int t = 0; t < MT; t++) dx[t] = _mm256_load_ps(r[t].dx + (size_t)p * 8);
                for (int u = 0; u < NR; u++) {
                    __m256i wv = _mm256_loadu_si256((const __m256i *)(w0 + u * wstride + (size_t)p * 32));
                    __m256i lo = _mm256_and_si256(wv, mask);
                    __m256i hi = _mm256_and_si256(_mm256_srli_epi16(wv, 4), mask);
                    for (int t = 0; t < MT; t++) {
                        __m256i isum = PAIR_DOT(lo, hi, r[t].xq + (size_t)p * 64);
                        part[t][u] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), dx[t], part[t][u]);
                    }
                }
            }
            for (int u = 0; u < NR; u++) {
                __m256 sv = _mm256_broadcast_ss(s0 + u * sstride + e);
                for (int t = 0; t < MT; t++) acc[t][u] = _mm256_fmadd_ps(part[t][u], sv, acc[t][u]);
            }
        }
    } else {
        /* one scale per block (bps == 1): a pair's two scales spread over the two lanes */
        const __m256i spread = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
        for (int p = 0; p < npairs; p++) {
            __m256 dx[4];
            for (int t = 0; t < MT; t++) dx[t] = _mm256_load_ps(r[t].dx + (size_t)p * 8);
            for (int u = 0; u < NR; u++) {
                __m256i wv = _mm256_loadu_si256((const __m256i *)(w0 + u * wstride + (size_t)p * 32));
                __m256i lo = _mm256_and_si256(wv, mask);
                __m256i hi = _mm256_and_si256(_mm256_srli_epi16(wv, 4), mask);
                __m256 sv = _mm256_permutevar8x32_ps(
                    _mm256_castps128_ps256(_mm_castpd_ps(_mm_load_sd((const double *)(s0 + u * sstride + 2 * p)))), spread);
                for (int t = 0; t < MT; t++) {
                    __m256i isum = PAIR_DOT(lo, hi, r[t].xq + (size_t)p * 64);
                    acc[t][u] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(sv, dx[t]), acc[t][u]);
                }
            }
        }
        if (nb & 1) {
            /* the last, unpaired block: 16 bytes, activations in natural order, d in all 8 lanes */
            int b = nb - 1;
            for (int u = 0; u < NR; u++) {
                __m128i w16 = _mm_loadu_si128((const __m128i *)(w0 + u * wstride + (size_t)b * 16));
                __m256i wv = _mm256_and_si256(
                    _mm256_inserti128_si256(_mm256_castsi128_si256(w16), _mm_srli_epi16(w16, 4), 1), mask);
                __m256 sv = _mm256_broadcast_ss(s0 + u * sstride + b);
                for (int t = 0; t < MT; t++) {
                    __m256i isum = _mm256_madd_epi16(
                        _mm256_maddubs_epi16(wv, _mm256_load_si256((const __m256i *)(r[t].xq + (size_t)b * QK))), ones);
                    __m256 f = _mm256_mul_ps(sv, _mm256_load_ps(r[t].dx + (size_t)(b / 2) * 8));
                    acc[t][u] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), f, acc[t][u]);
                }
            }
        }
    }
    /* zero points: acc -= sz[n, :] * Z[m, :] (both zero-padded to gp, a multiple of 8) */
    for (int g = 0; g < gp; g += 8) {
        for (int u = 0; u < NR; u++) {
            __m256 s = _mm256_loadu_ps(sz0 + u * szstride + g);
            for (int t = 0; t < MT; t++) acc[t][u] = _mm256_fnmadd_ps(s, _mm256_load_ps(r[t].Z + g), acc[t][u]);
        }
    }
    for (int t = 0; t < MT; t++)
        for (int u = 0; u < NR; u++) out[t][u] = hsum8(acc[t][u]);
}

#define TILE(MT_, NR_) q4_tile_avx2(w + (size_t)n * wstride, wstride, scale + (size_t)n * ns, ns, sz + (size_t)n * gp, \
                                    gp, r, out, MT_, NR_, nb, bps, gp)

AVX2 static void q4_rows_avx2(const uint8_t *w, const float *scale, const float *sz, const float *bias, char *acts,
                              size_t row_bytes, float *y, int m_rows, int n_out, int nb, int bps, int gp, int n0, int n1) {
    size_t ns = (size_t)(nb / bps), wstride = (size_t)nb * 16;
    for (int m0 = 0; m0 < m_rows; m0 += 4) {
        int mt = m_rows - m0 < 4 ? m_rows - m0 : 4;
        int nr = 4 / mt;  /* output rows per tile: four accumulators in all */
        act_row r[4];
        for (int t = 0; t < mt; t++) r[t] = act_at(acts, row_bytes, m0 + t, nb);
        for (int n = n0; n < n1;) {
            float out[4][4] = {{0}};
            int u_n = n + nr <= n1 ? nr : 1;
            if (u_n == 1) {
                switch (mt) {
                    case 1: TILE(1, 1); break;
                    case 2: TILE(2, 1); break;
                    case 3: TILE(3, 1); break;
                    default: TILE(4, 1); break;
                }
            } else {
                switch (mt) {
                    case 1: TILE(1, 4); break;
                    case 2: TILE(2, 2); break;
                    case 3: TILE(3, 1); break;
                    default: TILE(4, 1); break;
                }
            }
            for (int u = 0; u < u_n; u++) {
                float bn = bias ? bias[n + u] : 0.0f;
                for (int t = 0; t < mt; t++) y[(size_t)(m0 + t) * n_out + n + u] = out[t][u] + bn;
            }
            n += u_n;
        }
    }
}

/* int8 x int8 with AVX2: maddubs needs one unsigned operand, so |w| meets x with w's sign moved onto it
 * (`sign`); |w| <= 128 and |x| <= 127 keep each i16 pair sum below 32767. */
AVX2 static inline __attribute__((always_inline)) __m256i q8_dot32(__m256i w, __m256i x, __m256i ones) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w)), ones);
}

AVX2 static inline __attribute__((always_inline)) void q8_tile_avx2(
        const int8_t *w0, size_t wstride, act_row *r, float out[4][4], const int MT, const int NR, int nb) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[4][4];
    for (int t = 0; t < MT; t++)
        for (int u = 0; u < NR; u++) acc[t][u] = _mm256_setzero_ps();
    int npairs = nb / 2;
    for (int p = 0; p < npairs; p++) {
        __m256 dx[4];
        for (int t = 0; t < MT; t++) dx[t] = _mm256_load_ps(r[t].dx + (size_t)p * 8);
        for (int u = 0; u < NR; u++) {
            const int8_t *wp = w0 + u * wstride + (size_t)p * 64;
            __m256i wl = _mm256_loadu_si256((const __m256i *)wp), wh = _mm256_loadu_si256((const __m256i *)(wp + 32));
            for (int t = 0; t < MT; t++) {
                const int8_t *xp = r[t].xq + (size_t)p * 64;
                __m256i isum = _mm256_add_epi32(q8_dot32(wl, _mm256_load_si256((const __m256i *)xp), ones),
                                                q8_dot32(wh, _mm256_load_si256((const __m256i *)(xp + 32)), ones));
                acc[t][u] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), dx[t], acc[t][u]);
            }
        }
    }
    if (nb & 1) {
        int b = nb - 1;
        for (int u = 0; u < NR; u++) {
            __m256i wv = _mm256_loadu_si256((const __m256i *)(w0 + u * wstride + (size_t)b * QK));
            for (int t = 0; t < MT; t++) {
                __m256i isum = q8_dot32(wv, _mm256_load_si256((const __m256i *)(r[t].xq + (size_t)b * QK)), ones);
                acc[t][u] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_load_ps(r[t].dx + (size_t)(b / 2) * 8), acc[t][u]);
            }
        }
    }
    for (int t = 0; t < MT; t++)
        for (int u = 0; u < NR; u++) out[t][u] = hsum8(acc[t][u]);
}

#define TILE8(MT_, NR_) q8_tile_avx2(w + (size_t)n * wstride, wstride, r, out, MT_, NR_, nb)

AVX2 static void q8_rows_avx2(const int8_t *w, const float *scale, const float *bias, char *acts, size_t row_bytes,
                              float *y, int m_rows, int n_out, int nb, int n0, int n1) {
    size_t wstride = (size_t)nb * QK;
    for (int m0 = 0; m0 < m_rows; m0 += 4) {
        int mt = m_rows - m0 < 4 ? m_rows - m0 : 4;
        int nr = 4 / mt;
        act_row r[4];
        for (int t = 0; t < mt; t++) r[t] = act_at(acts, row_bytes, m0 + t, nb);
        for (int n = n0; n < n1;) {
            float out[4][4] = {{0}};
            int u_n = n + nr <= n1 ? nr : 1;
            if (u_n == 1) {
                switch (mt) {
                    case 1: TILE8(1, 1); break;
                    case 2: TILE8(2, 1); break;
                    case 3: TILE8(3, 1); break;
                    default: TILE8(4, 1); break;
                }
            } else {
                switch (mt) {
                    case 1: TILE8(1, 4); break;
                    case 2: TILE8(2, 2); break;
                    case 3: TILE8(3, 1); break;
                    default: TILE8(4, 1); break;
                }
            }
            for (int u = 0; u < u_n; u++) {
                float bn = bias ? bias[n + u] : 0.0f;
                for (int t = 0; t < mt; t++) y[(size_t)(m0 + t) * n_out + n + u] = scale[n + u] * out[t][u] + bn;
            }
            n += u_n;
        }
    }
}
#endif /* SLM_X86 */

/* 1 when the AVX2 + FMA kernels can run on this CPU, else 0. */
int slm_cpu_has_avx2(void) {
#ifdef SLM_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return 0;
#endif
}

/* Quantize the activation rows into the per-thread workspace; NULL when it cannot be allocated. */
static char *quantize_acts(const float *x, int m_rows, int k, int bpg, int gp, int use_avx2, size_t *row_bytes) {
    int nb = k / QK;
    *row_bytes = act_row_bytes(nb, gp);
    char *acts = (char *)workspace(*row_bytes * (size_t)m_rows);
    if (!acts) return NULL;
    for (int m = 0; m < m_rows; m++) {
        act_row r = act_at(acts, *row_bytes, m, nb);
#ifdef SLM_X86
        if (use_avx2) {
            quantize_row_avx2(x + (size_t)m * k, r, nb, bpg, gp);
            continue;
        }
#endif
        quantize_row_scalar(x + (size_t)m * k, r, k, nb, bpg, gp);
    }
    return acts;
}

/* Threads and chunks of output rows: a few chunks per thread, taken dynamically, so a thread slowed by other
 * load takes fewer; one thread when the layer is too small to pay for a parallel region. */
static int split_rows(int n_out, int k, int nthreads, int *nt_out) {
    int nt = nthreads < 1 ? 1 : nthreads;
    if (nt > 1 && (long)n_out * k < 64 * 1024) nt = 1;
    int nchunks = nt == 1 ? 1 : 4 * nt;
    int chunk = (n_out + nchunks - 1) / nchunks;
    *nt_out = nt;
    return (chunk + 7) & ~7;
}

static int resolve_avx2(int use_avx2) {
#ifdef SLM_X86
    return use_avx2 && slm_cpu_has_avx2();
#else
    (void)use_avx2;
    return 0;
#endif
}

/* y (m_rows, n_out) = x (m_rows, k) @ W^T (+ bias), int4 W. Returns 0, or -1 when the workspace cannot be
 * allocated.
 *   w:     (n_out, k / 32, 16) uint8, the layout described at the top
 *   scale: (n_out, k / 32 / bps) fp32
 *   sz:    (n_out, gp) fp32, scale * zero per group, zero-padded to gp (a multiple of 8)
 *   bpg:   blocks per zero-point group;  use_avx2: 0 forces the scalar code */
int slm_q4_gemv(const float *x, const uint8_t *w, const float *scale, const float *sz, const float *bias, float *y,
                int m_rows, int k, int n_out, int bps, int bpg, int gp, int nthreads, int use_avx2) {
    int nb = k / QK, nt;
    size_t row_bytes;
    use_avx2 = resolve_avx2(use_avx2);
    char *acts = quantize_acts(x, m_rows, k, bpg, gp, use_avx2, &row_bytes);
    if (!acts) return -1;
    int chunk = split_rows(n_out, k, nthreads, &nt);
    int nchunks = (n_out + chunk - 1) / chunk;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1) if (nt > 1)
    for (int c = 0; c < nchunks; c++) {
        int n0 = c * chunk, n1 = n0 + chunk < n_out ? n0 + chunk : n_out;
#ifdef SLM_X86
        if (use_avx2) {
            q4_rows_avx2(w, scale, sz, bias, acts, row_bytes, y, m_rows, n_out, nb, bps, gp, n0, n1);
            continue;
        }
#endif
        q4_rows_scalar(w, scale, sz, bias, acts, row_bytes, y, m_rows, n_out, nb, bps, gp, bpg, n0, n1);
    }
    return 0;
}

/* The same for int8 W: w (n_out, k) int8 in the interleaved block-pair order, scale (n_out,) fp32. */
int slm_q8_gemv(const float *x, const int8_t *w, const float *scale, const float *bias, float *y,
                int m_rows, int k, int n_out, int nthreads, int use_avx2) {
    int nb = k / QK, nt;
    size_t row_bytes;
    use_avx2 = resolve_avx2(use_avx2);
    char *acts = quantize_acts(x, m_rows, k, nb, 0, use_avx2, &row_bytes);
    if (!acts) return -1;
    int chunk = split_rows(n_out, k, nthreads, &nt);
    int nchunks = (n_out + chunk - 1) / chunk;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1) if (nt > 1)
    for (int c = 0; c < nchunks; c++) {
        int n0 = c * chunk, n1 = n0 + chunk < n_out ? n0 + chunk : n_out;
#ifdef SLM_X86
        if (use_avx2) {
            q8_rows_avx2(w, scale, bias, acts, row_bytes, y, m_rows, n_out, nb, n0, n1);
            continue;
        }
#endif
        q8_rows_scalar(w, scale, bias, acts, row_bytes, y, m_rows, n_out, nb, n0, n1);
    }
    return 0;
}
