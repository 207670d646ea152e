/* One decode step of one Llama-family block (one new token per row), in one call: the step's Python work between
 * the products (norms, rotation, attention over the cache, the gated activation, the residual sums) becomes C, and
 * the products run on packed_gemm.c's kernels inside one OpenMP region. Built and loaded by
 * personaxis.compiled_gemm; used by personaxis.generation.fused_block (see its notes).
 *
 * The arithmetic is transformers' Llama block, operation by operation:
 *   x = w1 * (h * rsqrt(mean(h²) + eps1));  q|k|v = x · Wqkvᵀ;  q, k rotated: q * cos + rotate_half(q) * sin;
 *   k, v written at the cache's last position;  per query head: softmax(q · Kᵀ * scaling, masked) · V;
 *   m = h + a · Woᵀ;  x = w2 * (m * rsqrt(mean(m²) + eps2));  out = m + (silu(x · Wgᵀ) * (x · Wuᵀ)) · Wdᵀ.
 * The products equal packed_gemm's bit for bit (the same running sums). The norms' means, the attention's dot
 * products and sums and the exponentials (exp8: Cephes' expf, 8 at a time) are computed in another order or by
 * another exp than PyTorch's, so the block's output equals the module's up to float rounding (tests compare them). */
#include "packed_gemm.c"

#include <math.h>
#include <stdlib.h>

typedef struct {
    int hidden, heads, kv_heads, head_dim, intermediate, avx512;
    float eps_attention, eps_mlp, scaling;
    const float *attention_norm, *mlp_norm; /* [hidden] */
    const float *qkv, *o, *gate, *up, *down; /* packed as packed_gemm.c's [n / 16][k][16] */
} block_weights;

/* Inside the block's parallel region: this thread's share of y = x · wᵀ for rows of x, as packed_gemm computes it
 * (one row: pairs of blocks with AVX-512, or AVX2 tiles that prefetch the next block; several rows: each block's
 * tiles of rows). No barrier after it: the callers place them. */
static void product(int avx512, int rows, int n, int k_len, const float *x, const float *packed, float *y) {
    const int blocks = n / 16, pairs = (blocks + 1) / 2;
    const size_t block_floats = (size_t)k_len * 16;
    if (rows == 1) {
#pragma omp for schedule(static) nowait
        for (int p = 0; p < pairs; p++) {
            for (int j = 2 * p; j < 2 * p + 2 && j < blocks; j += avx512 ? 2 : 1) {
                const float *w = packed + (size_t)j * block_floats;
                if (avx512)
                    pair_avx512(blocks - j < 2 ? 1 : 2, k_len, x, w, y + (size_t)j * 16);
                else
                    tile_rows_avx2(1, k_len, x, w, j + 1 < blocks ? w + block_floats : NULL, y + (size_t)j * 16, 0);
            }
        }
        return;
    }
    const int tile_rows = avx512 ? 12 : 6;
    const tile_fn tile = avx512 ? tile_rows_avx512 : tile_rows_avx2;
#pragma omp for schedule(static) nowait
    for (int j = 0; j < blocks; j++) {
        const float *w = packed + (size_t)j * block_floats;
        const float *next = j + 1 < blocks ? w + block_floats : NULL;
        for (int i = 0; i < rows; i += tile_rows) {
            tile(rows - i < tile_rows ? rows - i : tile_rows, k_len, x + (size_t)i * k_len, w, i == 0 ? next : NULL,
                 y + (size_t)i * n + (size_t)j * 16, (size_t)n);
        }
    }
}

static float horizontal_sum(__m256 v) {
    __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    half = _mm_add_ps(half, _mm_movehl_ps(half, half));
    return _mm_cvtss_f32(_mm_add_ss(half, _mm_movehdup_ps(half)));
}

static float dot(const float *a, const float *b, int n) {
    __m256 sum = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) sum = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), sum);
    float total = horizontal_sum(sum);
    for (; i < n; i++) total += a[i] * b[i];
    return total;
}

/* e^x for 8 floats: Cephes' expf (x = n ln 2 + r, |r| <= ln 2 / 2, a degree-6 polynomial for e^r), about 1 ulp.
 * Below -87.3 it gives 0 (e^-inf is 0, as a masked score needs), above 88 infinity; NaN stays NaN. */
static __m256 exp8(__m256 x) {
    const __m256 low = _mm256_set1_ps(-87.33654f), high = _mm256_set1_ps(88.0f);
    const __m256 below = _mm256_cmp_ps(x, low, _CMP_LT_OQ), above = _mm256_cmp_ps(x, high, _CMP_GT_OQ);
    const __m256 v = _mm256_min_ps(_mm256_max_ps(x, low), high);
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(v, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), v);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
    const __m256i power = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    __m256 result = _mm256_andnot_ps(below, _mm256_mul_ps(p, _mm256_castsi256_ps(power)));
    result = _mm256_blendv_ps(result, _mm256_set1_ps(INFINITY), above);
    return _mm256_blendv_ps(result, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

static float exp1(float x) {
    float lanes[8];
    _mm256_storeu_ps(lanes, exp8(_mm256_set1_ps(x)));
    return lanes[0];
}

static void rms_norm(const float *h, const float *weight, float eps, int n, float *out) {
    float squares = 0.0f;
    for (int i = 0; i < n; i++) squares += h[i] * h[i];
    const float scale = 1.0f / sqrtf(squares / (float)n + eps);
    for (int i = 0; i < n; i++) out[i] = weight[i] * (h[i] * scale);
}

/* Rotation of one head in place: x * cos + rotate_half(x) * sin, where rotate_half(x) is x's halves swapped, the
 * first negated (sin_signed carries that sign). */
static void rotate(float *x, const float *cos_, const float *sin_signed, int dim) {
    const int half = dim / 2;
    for (int i = 0; i < half; i++) {
        const float a = x[i], b = x[i + half];
        x[i] = a * cos_[i] + b * sin_signed[i];
        x[i + half] = b * cos_[i + half] + a * sin_signed[i + half];
    }
}

/* Softmax of one head's scores in place: e^(s - max) / their sum (the exponentials of exp8). */
static void softmax(float *scores, int length) {
    float most = -INFINITY;
    for (int p = 0; p < length; p++) most = scores[p] > most ? scores[p] : most;
    const __m256 shift = _mm256_set1_ps(most);
    __m256 sums = _mm256_setzero_ps();
    int p = 0;
    for (; p + 8 <= length; p += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + p), shift));
        _mm256_storeu_ps(scores + p, e);
        sums = _mm256_add_ps(sums, e);
    }
    float total = horizontal_sum(sums);
    for (; p < length; p++) total += scores[p] = exp1(scores[p] - most);
    for (p = 0; p < length; p++) scores[p] /= total;
}

/* Attention of the `group` query heads that share one key/value head (queries and out: [group][head_dim]) over
 * positions [0, length), the new key and value already in the cache: each key and value is read once for the
 * group. scores: [group][length]. */
static void attend(const block_weights *b, int group, const float *queries, const float *keys, const float *values,
                   int length, const unsigned char *blocked, float *scores, float *out) {
    const int dim = b->head_dim;
    for (int p = 0; p < length; p++) {
        const float *key = keys + (size_t)p * dim;
        for (int t = 0; t < group; t++)
            scores[(size_t)t * length + p] = blocked[p] ? -INFINITY : dot(queries + (size_t)t * dim, key, dim) * b->scaling;
    }
    for (int t = 0; t < group; t++) softmax(scores + (size_t)t * length, length);
    for (size_t i = 0; i < (size_t)group * dim; i++) out[i] = 0.0f;
    for (int p = 0; p < length; p++) {
        const float *value = values + (size_t)p * dim;
        for (int t = 0; t < group; t++) {
            const float weight = scores[(size_t)t * length + p];
            float *o = out + (size_t)t * dim;
            for (int i = 0; i < dim; i++) o[i] += weight * value[i];
        }
    }
}

/* Inside the parallel region: gate = silu(gate) * up over n floats, split between the threads (silu(x) = x / (1 +
 * e^-x)). */
static void gated(float *gate, const float *up, size_t n) {
    const size_t vectors = n / 8;
#pragma omp for schedule(static) nowait
    for (size_t v = 0; v < vectors; v++) {
        const __m256 g = _mm256_loadu_ps(gate + 8 * v);
        const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
        const __m256 silu = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
        _mm256_storeu_ps(gate + 8 * v, _mm256_mul_ps(silu, _mm256_loadu_ps(up + 8 * v)));
    }
#pragma omp single nowait
    for (size_t i = 8 * vectors; i < n; i++) gate[i] = gate[i] / (1.0f + exp1(-gate[i])) * up[i];
}

/* The block for `rows` rows: hidden [rows][hidden] → out [rows][hidden]. keys/values: the layer's cache, row r's
 * head g's position p at r * row_stride + g * head_stride + p * head_dim, with room written up to length (the new
 * position, length - 1, is written here). blocked: [rows][length], nonzero where a row does not attend. cos,
 * sin_signed: [rows][head_dim]. Returns 0, or -1 when scratch memory could not be had (nothing written then). */
int decode_block(const block_weights *b, int rows, const float *hidden, float *out, const float *cos_,
                 const float *sin_signed, float *keys, float *values, long row_stride, long head_stride, int length,
                 const unsigned char *blocked, int threads) {
    const int n = b->hidden, dim = b->head_dim, heads = b->heads, kv = b->kv_heads, inner = b->intermediate;
    const int qkv_n = (heads + 2 * kv) * dim, group = heads / kv;
    const size_t per_row = (size_t)n * 3 + qkv_n + (size_t)heads * dim + (size_t)inner * 2 + (size_t)heads * length;
    float *scratch = malloc(per_row * rows * sizeof(float));
    if (!scratch) return -1;
    float *x = scratch, *mid = x + (size_t)rows * n, *sum = mid + (size_t)rows * n, *qkv = sum + (size_t)rows * n;
    float *attended = qkv + (size_t)rows * qkv_n, *gate = attended + (size_t)rows * heads * dim;
    float *up = gate + (size_t)rows * inner, *scores = up + (size_t)rows * inner;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int r = 0; r < rows; r++)
            rms_norm(hidden + (size_t)r * n, b->attention_norm, b->eps_attention, n, x + (size_t)r * n);
        product(b->avx512, rows, qkv_n, n, x, b->qkv, qkv);
#pragma omp barrier
#pragma omp for schedule(static)
        for (int r = 0; r < rows; r++) {
            float *heads_of_row = qkv + (size_t)r * qkv_n;
            for (int h = 0; h < heads + kv; h++)
                rotate(heads_of_row + (size_t)h * dim, cos_ + (size_t)r * dim, sin_signed + (size_t)r * dim, dim);
            for (int g = 0; g < kv; g++) {
                const size_t at = (size_t)r * row_stride + (size_t)g * head_stride + (size_t)(length - 1) * dim;
                for (int i = 0; i < dim; i++) {
                    keys[at + i] = heads_of_row[(size_t)(heads + g) * dim + i];
                    values[at + i] = heads_of_row[(size_t)(heads + kv + g) * dim + i];
                }
            }
        }
#pragma omp for schedule(static)
        for (int item = 0; item < rows * kv; item++) {
            const int r = item / kv, g = item % kv;
            const size_t cache = (size_t)r * row_stride + (size_t)g * head_stride, first = (size_t)item * group;
            attend(b, group, qkv + (size_t)r * qkv_n + (size_t)g * group * dim, keys + cache, values + cache, length,
                   blocked + (size_t)r * length, scores + first * length, attended + first * dim);
        }
        product(b->avx512, rows, n, heads * dim, attended, b->o, sum);
#pragma omp barrier
#pragma omp for schedule(static)
        for (int r = 0; r < rows; r++) {
            for (int i = 0; i < n; i++) mid[(size_t)r * n + i] = hidden[(size_t)r * n + i] + sum[(size_t)r * n + i];
            rms_norm(mid + (size_t)r * n, b->mlp_norm, b->eps_mlp, n, x + (size_t)r * n);
        }
        product(b->avx512, rows, inner, n, x, b->gate, gate);
        product(b->avx512, rows, inner, n, x, b->up, up);
#pragma omp barrier
        gated(gate, up, (size_t)rows * inner);
#pragma omp barrier
        product(b->avx512, rows, n, inner, gate, b->down, sum);
#pragma omp barrier
#pragma omp for schedule(static)
        for (size_t i = 0; i < (size_t)rows * n; i++) out[i] = mid[i] + sum[i];
    }
    free(scratch);
    return 0;
}
