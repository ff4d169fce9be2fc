#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <omp.h>
#include <string.h>

#include <immintrin.h>

#define ROWS 8 /* input rows a pass over the weights serves */

#if defined(__AVX2__)
static inline float hsum256(const __m256 v) { /* the sum of a vector's 8 lanes */
    const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
}
#endif

/* The dots of one weight row with M (<= ROWS) input rows: out[m] = sum_k xs[m, k] * lut[q(k)] * scale[k / block].
   The weights never leave registers: each block's 16-entry table is scaled once, each 16 bytes of codes become
   32 weights with two table lookups (the 16 high nibbles, then the 16 low ones; xs holds each input row permuted
   the same way). M is a constant where this is inlined, so the accumulators stay in registers. */
static inline __attribute__((always_inline)) void row_dots(const float *xs, const int M, int64_t K,
                                                           const uint8_t *row, const float *scale, int64_t block,
                                                           const float *lut, float *out) {
#if defined(__AVX512F__)
    __m512 high[ROWS], low[ROWS];
    for (int m = 0; m < M; m++) high[m] = low[m] = _mm512_setzero_ps();
    const __m512 table = _mm512_loadu_ps(lut);
    const __m512i nibble = _mm512_set1_epi32(15);
    for (int64_t start = 0, blk = 0; start < K; start += block, blk++) {
        const __m512 t = _mm512_mul_ps(table, _mm512_set1_ps(scale[blk]));
        for (int64_t c = start; c < start + block; c += 32) {
            const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + (c >> 1))));
            const __m512 wh = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), t);
            const __m512 wl = _mm512_permutexvar_ps(_mm512_and_si512(b, nibble), t);
            for (int m = 0; m < M; m++) {
                high[m] = _mm512_fmadd_ps(_mm512_loadu_ps(xs + m * K + c), wh, high[m]);
                low[m] = _mm512_fmadd_ps(_mm512_loadu_ps(xs + m * K + c + 16), wl, low[m]);
            }
        }
    }
    for (int m = 0; m < M; m++) out[m] = _mm512_reduce_add_ps(_mm512_add_ps(high[m], low[m]));
#elif defined(__AVX2__)
    __m256 acc[ROWS];
    for (int m = 0; m < M; m++) acc[m] = _mm256_setzero_ps();
    const __m256i seven = _mm256_set1_epi32(7), nibble = _mm256_set1_epi32(15);
    for (int64_t start = 0, blk = 0; start < K; start += block, blk++) {
        const __m256 s = _mm256_set1_ps(scale[blk]);
        const __m256 t0 = _mm256_mul_ps(_mm256_loadu_ps(lut), s), t1 = _mm256_mul_ps(_mm256_loadu_ps(lut + 8), s);
        for (int64_t c = start; c < start + block; c += 32) {
            for (int half = 0; half < 2; half++) {
                const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(row + (c >> 1) + 8 * half)));
                for (int part = 0; part < 2; part++) {
                    const __m256i idx = part ? _mm256_and_si256(b, nibble) : _mm256_srli_epi32(b, 4);
                    const __m256 upper = _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, seven));
                    const __m256 w = _mm256_blendv_ps(_mm256_permutevar8x32_ps(t0, idx),
                                                      _mm256_permutevar8x32_ps(t1, idx), upper);
                    const int64_t at = c + 16 * part + 8 * half;
                    for (int m = 0; m < M; m++) acc[m] = _mm256_fmadd_ps(_mm256_loadu_ps(xs + m * K + at), w, acc[m]);
                }
            }
        }
    }
    for (int m = 0; m < M; m++) {
        out[m] = hsum256(acc[m]);
    }
#else
    float acc[ROWS] = {0};
    for (int64_t start = 0, blk = 0; start < K; start += block, blk++) {
        float t[16];
        for (int j = 0; j < 16; j++) t[j] = lut[j] * scale[blk];
        for (int64_t c = start; c < start + block; c += 32)
            for (int j = 0; j < 16; j++) {
                const uint8_t q = row[(c >> 1) + j];
                for (int m = 0; m < M; m++)
                    acc[m] += xs[m * K + c + j] * t[q >> 4] + xs[m * K + c + 16 + j] * t[q & 15];
            }
    }
    for (int m = 0; m < M; m++) out[m] = acc[m];
#endif
}

/* out[j] = sum_k x[k] * float(W[j * K + k]) for COUNT (a constant where this is inlined, so the accumulators stay
   in registers) consecutive weight rows of float32 or int8. */
#define DEFINE_ROWS_DOT(NAME, T, LOAD512, LOAD256)                                                                 \
    static inline __attribute__((always_inline)) void NAME(const float *x, const T *W, int64_t K, const int COUNT,  \
                                                           float *out) {                                          \
        int64_t k = 0;                                                                                            \
        for (int j = 0; j < COUNT; j++) out[j] = 0.0f;                                                            \
        DOT_BODY(LOAD512, LOAD256)                                                                                \
        for (; k < K; k++)                                                                                        \
            for (int j = 0; j < COUNT; j++) out[j] += x[k] * (float)W[j * K + k];                                 \
    }
#if defined(__AVX512F__)
#define DOT_BODY(LOAD512, LOAD256)                                                                                 \
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};         \
    for (; k + 16 <= K; k += 16) {                                                                                \
        const __m512 xv = _mm512_loadu_ps(x + k);                                                                 \
        for (int j = 0; j < COUNT; j++) acc[j] = _mm512_fmadd_ps(xv, LOAD512(W + j * K + k), acc[j]);           \
    }                                                                                                             \
    for (int j = 0; j < COUNT; j++) out[j] = _mm512_reduce_add_ps(acc[j]);
#elif defined(__AVX2__)
#define DOT_BODY(LOAD512, LOAD256)                                                                                 \
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};         \
    for (; k + 8 <= K; k += 8) {                                                                                  \
        const __m256 xv = _mm256_loadu_ps(x + k);                                                                 \
        for (int j = 0; j < COUNT; j++) acc[j] = _mm256_fmadd_ps(xv, LOAD256(W + j * K + k), acc[j]);           \
    }                                                                                                             \
    for (int j = 0; j < COUNT; j++) out[j] = hsum256(acc[j]);
#else
#define DOT_BODY(LOAD512, LOAD256)
#endif
#define F32_512(p) _mm512_loadu_ps(p)
#define F32_256(p) _mm256_loadu_ps(p)
#define I8_512(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p))))
#define I8_256(p) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p))))
DEFINE_ROWS_DOT(f32_rows, float, F32_512, F32_256)
DEFINE_ROWS_DOT(i8_rows, int8_t, I8_512, I8_256)

/* the dots of rows [n0, n0 + count) of W with x, count <= 4: four streams in flight per core */
#define ROWS_DOT_SWITCH(FN, x, W, K, count, out)                                                                   \
    switch (count) {                                                                                              \
        case 4: FN(x, W, K, 4, out); break;                                                                       \
        case 3: FN(x, W, K, 3, out); break;                                                                       \
        case 2: FN(x, W, K, 2, out); break;                                                                       \
        default: FN(x, W, K, 1, out); break;                                                                      \
    }

/* ---------------------------------------------------------------------------------------------------------------
   One linear layer, described for the kernels: float32, NF4 or int8 weights, an optional bias and one LoRA. */

enum { KIND_F32 = 0, KIND_NF4 = 1, KIND_I8 = 2 };
#define TILE 4 /* weight rows one task computes: four streams in flight per core */

typedef struct {
    int64_t kind;
    int64_t K, N;         /* in and out features */
    const void *W;        /* F32: float [N, K]; NF4: two codes a byte [N, K / 2]; I8: int8 [N, K] */
    const float *scales;  /* NF4: a scale per block of `block` weights; I8: one per row */
    int64_t block;
    const float *lut;     /* NF4: the 16 code values */
    const float *bias;    /* [N] or NULL */
    /* LoRA slots (A NULL: none): input row m adds, for each entry e of first[m] <= e < first[m + 1],
       w[s] * (x_m A[s]) Bt[s]ᵀ with s = slot[e] (first NULL: every row has slot 0 alone, entry e = m) */
    const float *A;       /* [slots, K, r] */
    const float *Bt;      /* [slots, N, r]: B transposed (contiguous per output), the adapter's scale folded in */
    int64_t r;            /* the rank (zero-padded to the largest of the slots) */
    const float *w;       /* [slots] each slot's weight in its rows' mix */
    const int64_t *first; /* [M + 1] */
    const int64_t *slot;  /* [first[M]] */
} Linear;

/* xs: each row of x with every 32 values reordered as row_dots reads them (the 16 even, then the 16 odd) */
static void permute32(const float *x, int64_t M, int64_t K, float *xs) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t c = 0; c < K; c += 32)
            for (int j = 0; j < 16; j++) {
                xs[m * K + c + j] = x[m * K + c + 2 * j];
                xs[m * K + c + 16 + j] = x[m * K + c + 2 * j + 1];
            }
}

/* the LoRA entries of M input rows (see Linear) */
static inline int64_t entries(const Linear *L, int64_t M) { return L->first ? L->first[M] : M; }
static inline int64_t entry_slot(const Linear *L, int64_t e) { return L->slot ? L->slot[e] : 0; }

/* h[e, j] = w[s] * sum_k x[m, k] * A[s, k, j] for each LoRA entry e = (row m, slot s): the LoRAs' hidden rows,
   before any weight row is read */
static void lora_hidden(const Linear *L, const float *x, int64_t M, float *h) {
    const int64_t K = L->K, r = L->r;
    for (int64_t m = 0; m < M; m++)
        for (int64_t e = L->first ? L->first[m] : m; e < (L->first ? L->first[m + 1] : m + 1); e++) {
            const int64_t s = entry_slot(L, e);
            const float *A = L->A + s * K * r;
            float *he = h + e * r;
            for (int64_t j = 0; j < r; j++) he[j] = 0.0f;
            for (int64_t k = 0; k < K; k++) {
                const float xv = x[m * K + k];
                for (int64_t j = 0; j < r; j++) he[j] += xv * A[k * r + j];
            }
            for (int64_t j = 0; j < r; j++) he[j] *= L->w[s];
        }
}

/* Rows [n0, n0 + count) (count <= TILE) of y = x Wᵀ (+ bias) (+ h Btᵀ) for M input rows; y's rows are ys apart;
   add: y += instead of y =. x: the input rows; xs: the same permuted (NF4); h: the LoRA's hidden rows or NULL. */
static void linear_tile(const Linear *L, const float *x, const float *xs, const float *h, int64_t M, int64_t n0,
                        int count, float *y, int64_t ys, int add) {
    const int64_t K = L->K;
    float out[ROWS * TILE]; /* out[m * TILE + j] for the M rows of one pass */
    for (int64_t m0 = 0; m0 < M; m0 += ROWS) {
        const int64_t rows = M - m0 < ROWS ? M - m0 : ROWS;
        if (L->kind == KIND_NF4) {
            for (int j = 0; j < count; j++) {
                const uint8_t *row = (const uint8_t *)L->W + (n0 + j) * (K / 2);
                const float *scale = L->scales + (n0 + j) * (K / L->block);
                const float *xm = xs + m0 * K;
                float dots[ROWS] = {0};
                switch (rows) {
                    case 1: row_dots(xm, 1, K, row, scale, L->block, L->lut, dots); break;
                    case 2: row_dots(xm, 2, K, row, scale, L->block, L->lut, dots); break;
                    case 3: row_dots(xm, 3, K, row, scale, L->block, L->lut, dots); break;
                    case 4: row_dots(xm, 4, K, row, scale, L->block, L->lut, dots); break;
                    case 5: row_dots(xm, 5, K, row, scale, L->block, L->lut, dots); break;
                    case 6: row_dots(xm, 6, K, row, scale, L->block, L->lut, dots); break;
                    case 7: row_dots(xm, 7, K, row, scale, L->block, L->lut, dots); break;
                    default: row_dots(xm, 8, K, row, scale, L->block, L->lut, dots); break;
                }
                for (int64_t m = 0; m < rows; m++) out[m * TILE + j] = dots[m];
            }
        } else if (L->kind == KIND_I8) {
            const int8_t *W = (const int8_t *)L->W + n0 * K;
            for (int64_t m = 0; m < rows; m++) {
                ROWS_DOT_SWITCH(i8_rows, x + (m0 + m) * K, W, K, count, out + m * TILE)
                for (int j = 0; j < count; j++) out[m * TILE + j] *= L->scales[n0 + j];
            }
        } else {
            const float *W = (const float *)L->W + n0 * K;
            for (int64_t m = 0; m < rows; m++) ROWS_DOT_SWITCH(f32_rows, x + (m0 + m) * K, W, K, count, out + m * TILE)
        }
        for (int64_t m = 0; m < rows; m++)
            for (int j = 0; j < count; j++) {
                const int64_t n = n0 + j, row = m0 + m;
                float t = out[m * TILE + j] + (L->bias ? L->bias[n] : 0.0f);
                if (h)
                    for (int64_t e = L->first ? L->first[row] : row; e < (L->first ? L->first[row + 1] : row + 1);
                         e++) {
                        const float *he = h + e * L->r, *bn = L->Bt + (entry_slot(L, e) * L->N + n) * L->r;
                        for (int64_t i = 0; i < L->r; i++) t += he[i] * bn[i];
                    }
                y[row * ys + n] = add ? y[row * ys + n] + t : t;
            }
    }
}

/* The rows of up to four linear layers with the same input, their tiles split across the threads of the team
   (call from every thread of a parallel region). Layer i writes columns [at[i], at[i] + N_i) of y. */
static void linears(const Linear *const *Ls, int count, const float *x, const float *xs, float *const *hs,
                    int64_t M, float *y, const int64_t *at, int64_t ys, int add) {
    int64_t first[5] = {0}; /* the first tile of each layer */
    for (int i = 0; i < count; i++) first[i + 1] = first[i] + (Ls[i]->N + TILE - 1) / TILE;
    #pragma omp for schedule(static)
    for (int64_t t = 0; t < first[count]; t++) {
        int i = 0;
        while (t >= first[i + 1]) i++;
        const int64_t n0 = (t - first[i]) * TILE, left = Ls[i]->N - n0;
        linear_tile(Ls[i], x, xs, hs[i], M, n0, left < TILE ? (int)left : TILE, y + at[i], ys, add);
    }
}

/* One layer on M rows, from Python: y = x Wᵀ (+ bias) (+ the rows' LoRAs). 0, or -1 when out of memory. */
int linear(const Linear *L, const float *x, int64_t M, float *y) {
    float *xs = L->kind == KIND_NF4 ? (float *)malloc(M * L->K * sizeof(float)) : NULL;
    float *h = L->A ? (float *)malloc((entries(L, M) * L->r + 1) * sizeof(float)) : NULL;
    if ((L->kind == KIND_NF4 && !xs) || (L->A && !h)) {
        free(h);
        free(xs);
        return -1;
    }
    if (xs) permute32(x, M, L->K, xs);
    if (h) lora_hidden(L, x, M, h);
    const int64_t at = 0;
    #pragma omp parallel
    linears(&L, 1, x, xs, &h, M, y, &at, L->N, 0);
    free(h);
    free(xs);
    return 0;
}

/* W [N, K] = an NF4 layer's weights in float32 (code value times its block's scale), rows split across threads:
   for products of many rows (a prefill chunk, a saturated step), dequantized into a scratch buffer once per
   product, then one GEMM. */
void nf4_dequantize(const Linear *L, float *W) {
    const int64_t K = L->K, blocks = K / L->block;
    #pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < L->N; n++) {
        const uint8_t *row = (const uint8_t *)L->W + n * (K / 2);
        float *out = W + n * K;
        for (int64_t blk = 0; blk < blocks; blk++) {
            const float scale = L->scales[n * blocks + blk];
            const int64_t start = blk * L->block;
#if defined(__AVX512F__)
            const __m512 t = _mm512_mul_ps(_mm512_loadu_ps(L->lut), _mm512_set1_ps(scale));
            /* the high nibbles are the even weights, the low ones the odd: interleave them back */
            const __m512i first = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
            const __m512i second = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
            for (int64_t c = start; c < start + L->block; c += 32) {
                const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + (c >> 1))));
                const __m512 even = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), t);
                const __m512 odd = _mm512_permutexvar_ps(_mm512_and_si512(b, _mm512_set1_epi32(15)), t);
                _mm512_storeu_ps(out + c, _mm512_permutex2var_ps(even, first, odd));
                _mm512_storeu_ps(out + c + 16, _mm512_permutex2var_ps(even, second, odd));
            }
#else
            for (int64_t c = start; c < start + L->block; c += 2) {
                const uint8_t q = row[c >> 1];
                out[c] = L->lut[q >> 4] * scale;
                out[c + 1] = L->lut[q & 15] * scale;
            }
#endif
        }
    }
}

/* ---------------------------------------------------------------------------------------------------------------
   A whole decode step of a Llama-family decoder (RMSNorm, attention with rotary embeddings and grouped KV heads
   over the engine's slot cache, gated SiLU MLP), in one parallel region: the threads meet at a barrier after
   each product instead of returning to Python ~20 times per block. */

typedef struct {
    const float *input_norm, *post_norm;
    float eps;
    const float *q_norm, *k_norm; /* Qwen3: an RMSNorm over each head's query and key, or NULL */
    float qk_eps;
    Linear q, k, v, o, gate, up, down;
    float *keys, *values; /* this layer's slot cache: [slots, kv_heads, max_len, head_dim] */
    int64_t window;       /* a key k is seen from position p when p - window < k (0: every key) */
    float scaling;
} Block;

typedef struct {
    int64_t layers, hidden, heads, kv_heads, head_dim, inter, max_len;
    const float *final_norm;
    float final_eps;
    const Block *blocks;
} Decoder;

static void rms_norm(const float *x, const float *weight, float eps, int64_t n, float *out) {
    float sum = 0.0f;
    #pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; i++) sum += x[i] * x[i];
    const float inv = 1.0f / sqrtf(sum / (float)n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = x[i] * inv * weight[i];
}

/* x = rms_norm(hidden) row by row, then what the layers reading x need: its permutation (NF4), LoRA hiddens */
static void layer_inputs(const Linear *const *Ls, int count, const float *hidden, const float *norm, float eps,
                         int64_t M, int64_t K, float *x, float *xs, float *const *hs) {
    if (norm)
        for (int64_t m = 0; m < M; m++) rms_norm(hidden + m * K, norm, eps, K, x + m * K);
    int nf4 = 0;
    for (int i = 0; i < count; i++) {
        nf4 |= Ls[i]->kind == KIND_NF4;
        if (Ls[i]->A) lora_hidden(Ls[i], x, M, hs[i]);
    }
    if (nf4) permute32(x, M, K, xs);
}

/* x * cos + rotate_half(x) * sin over one head (rotate_half(x) = [-x[half:], x[:half]]) */
static void rotate(float *x, const float *cos, const float *sin, int64_t D) {
    const int64_t half = D / 2;
    for (int64_t i = 0; i < half; i++) {
        const float a = x[i], b = x[i + half];
        x[i] = a * cos[i] - b * sin[i];
        x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

/* One query head of one row over its slot's keys [lo, pos]: softmax(q Kᵀ · scaling) V into out */
static void attend_head(const float *q, const float *K, const float *V, int64_t lo, int64_t pos, int64_t D,
                        float scaling, float *scores, float *out) {
    float top = -INFINITY;
    for (int64_t t = lo; t <= pos; t++) {
        float s = 0.0f;
        #pragma omp simd reduction(+ : s)
        for (int64_t d = 0; d < D; d++) s += q[d] * K[t * D + d];
        scores[t - lo] = s * scaling;
        top = scores[t - lo] > top ? scores[t - lo] : top;
    }
    float sum = 0.0f;
    for (int64_t t = lo; t <= pos; t++) sum += (scores[t - lo] = expf(scores[t - lo] - top));
    for (int64_t d = 0; d < D; d++) out[d] = 0.0f;
    for (int64_t t = lo; t <= pos; t++) {
        const float p = scores[t - lo] / sum;
        #pragma omp simd
        for (int64_t d = 0; d < D; d++) out[d] += p * V[t * D + d];
    }
}

/* the floats the LoRA hidden rows of any one layer of a step of M rows take */
static int64_t lora_floats(const Decoder *dec, int64_t M) {
    int64_t most = 1;
    for (int64_t l = 0; l < dec->layers; l++) {
        const Block *b = dec->blocks + l;
        const Linear *all[7] = {&b->q, &b->k, &b->v, &b->o, &b->gate, &b->up, &b->down};
        for (int i = 0; i < 7; i++)
            if (all[i]->A && entries(all[i], M) * all[i]->r > most) most = entries(all[i], M) * all[i]->r;
    }
    return most;
}

/* hidden [M, hidden]: the embeddings of the step's M new tokens in, the final norm of the last layer's output
   out. cos, sin [M, head_dim]: the rotary embedding at each token's position; slots, positions [M]: where each
   token's key and value go (a token attends to its slot's positions up to its own). 0, or -1 (nothing done) when
   out of memory. */
int decode_step(const Decoder *dec, int64_t M, float *hidden, const float *cos, const float *sin,
                const int64_t *slots, const int64_t *positions) {
    const int64_t H = dec->hidden, heads = dec->heads, kvh = dec->kv_heads, D = dec->head_dim, I = dec->inter;
    const int64_t group = heads / kvh, width = (heads + 2 * kvh) * D, r = lora_floats(dec, M);
    const int64_t widest = H > I ? (H > heads * D ? H : heads * D) : (I > heads * D ? I : heads * D);
    const int threads = omp_get_max_threads();
    float *x = (float *)malloc(M * widest * sizeof(float)), *xs = (float *)malloc(M * widest * sizeof(float));
    float *qkv = (float *)malloc(M * width * sizeof(float)), *att = (float *)malloc(M * heads * D * sizeof(float));
    float *gu = (float *)malloc(M * 2 * I * sizeof(float)), *act = (float *)malloc(M * I * sizeof(float));
    float *hbuf = (float *)malloc(3 * r * sizeof(float)); /* the LoRA hidden rows of up to three layers */
    float *all_scores = (float *)malloc(threads * dec->max_len * sizeof(float)); /* a row of scores per thread */
    float *buffers[8] = {x, xs, qkv, att, gu, act, hbuf, all_scores};
    int failed = 0;
    for (int i = 0; i < 8; i++) failed |= buffers[i] == NULL;
    float *hs[3] = {hbuf, hbuf + r, hbuf + 2 * r};
    #pragma omp parallel if (!failed)
    if (!failed) {
        float *scores = all_scores + omp_get_thread_num() * dec->max_len;
        for (int64_t l = 0; l < dec->layers; l++) {
            const Block *b = dec->blocks + l;
            const Linear *qkv_layers[3] = {&b->q, &b->k, &b->v}, *o[1] = {&b->o}, *gate_up[2] = {&b->gate, &b->up};
            const Linear *down[1] = {&b->down};
            const int64_t qkv_at[3] = {0, heads * D, (heads + kvh) * D}, gu_at[2] = {0, I}, zero = 0;
            #pragma omp single
            layer_inputs(qkv_layers, 3, hidden, b->input_norm, b->eps, M, H, x, xs, hs);
            linears(qkv_layers, 3, x, xs, hs, M, qkv, qkv_at, width, 0);
            #pragma omp single
            for (int64_t m = 0; m < M; m++) { /* norms, rotation, and the new key and value into the slot */
                float *q = qkv + m * width, *k = q + heads * D, *v = k + kvh * D;
                for (int64_t i = 0; i < heads + kvh; i++) {
                    float *head = q + i * D;
                    const float *norm = i < heads ? b->q_norm : b->k_norm;
                    if (norm) rms_norm(head, norm, b->qk_eps, D, head);
                    rotate(head, cos + m * D, sin + m * D, D);
                }
                for (int64_t g = 0; g < kvh; g++) {
                    const int64_t at = ((slots[m] * kvh + g) * dec->max_len + positions[m]) * D;
                    memcpy(b->keys + at, k + g * D, D * sizeof(float));
                    memcpy(b->values + at, v + g * D, D * sizeof(float));
                }
            }
            #pragma omp for schedule(static)
            for (int64_t task = 0; task < M * heads; task++) {
                const int64_t m = task / heads, head = task % heads, g = head / group, pos = positions[m];
                const int64_t lo = b->window > 0 && pos - b->window + 1 > 0 ? pos - b->window + 1 : 0;
                const int64_t cache = (slots[m] * kvh + g) * dec->max_len * D;
                attend_head(qkv + m * width + head * D, b->keys + cache, b->values + cache, lo, pos, D, b->scaling,
                            scores, att + m * heads * D + head * D);
            }
            #pragma omp single
            layer_inputs(o, 1, att, NULL, 0.0f, M, heads * D, att, xs, hs);
            linears(o, 1, att, xs, hs, M, hidden, &zero, H, 1); /* hidden += o(att) */
            #pragma omp single
            layer_inputs(gate_up, 2, hidden, b->post_norm, b->eps, M, H, x, xs, hs);
            linears(gate_up, 2, x, xs, hs, M, gu, gu_at, 2 * I, 0);
            #pragma omp for collapse(2) schedule(static)
            for (int64_t m = 0; m < M; m++)
                for (int64_t n = 0; n < I; n++) {
                    const float g = gu[m * 2 * I + n];
                    act[m * I + n] = g / (1.0f + expf(-g)) * gu[m * 2 * I + I + n];
                }
            #pragma omp single
            layer_inputs(down, 1, act, NULL, 0.0f, M, I, act, xs, hs);
            linears(down, 1, act, xs, hs, M, hidden, &zero, H, 1); /* hidden += down(act) */
        }
    }
    if (!failed)
        for (int64_t m = 0; m < M; m++) rms_norm(hidden + m * H, dec->final_norm, dec->final_eps, H, hidden + m * H);
    for (int i = 0; i < 8; i++) free(buffers[i]);
    return failed ? -1 : 0;
}
