// MedAsk's decode attention over a float16 KV cache: each running row's one new query against its slot's
// keys and values, read in float16 and widened in registers (F16C), float32 arithmetic throughout.
//
// Why our own: at a decode step the attention reads every cached key and value once, and at 16 rows of a
// few hundred positions those bytes (not the arithmetic) set its time: torch's CPU flash attention on a
// float32 cache took as long as every matrix product of the step together (issue 28). Storing the cache in
// float16 halves the bytes, as llama.cpp's default cache does, but torch's attention on float16 or
// bfloat16 tensors is 3-6x slower than on float32 on a CPU without native half arithmetic. Here a row
// reads its own positions only (0..pos, not the length rounded up for the compiled graph).
//
// q (rows, heads, dim) float32; keys, values (slots, kv_heads, context, dim) float16, row r in slot r;
// pos (rows,) int64: row r attends positions 0..pos[r]. Query heads share a key/value head in groups
// (grouped-query attention) as the model's own attention does.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <cmath>
#include <vector>

namespace {

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// e^x for x <= 0 (scores less their largest), 8 at a time: Cephes' expf polynomial (relative error about
// 2e-7); below -87 the result is about 1e-38, as good as 0 beside the largest score's 1
inline __m256 exp_ps(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // x - n ln 2, ln 2 in two parts
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(two_n));
}

inline __m256 load_half8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// one query head against `length` keys and values (each `C` * 8 wide, contiguous by position)
template <int C>
void attend_one(const float* q, const at::Half* keys, const at::Half* values, int64_t length, float scale,
                float* scores, float* out) {
  constexpr int D = C * 8;
  __m256 qv[C];
  for (int c = 0; c < C; ++c) qv[c] = _mm256_mul_ps(_mm256_loadu_ps(q + 8 * c), _mm256_set1_ps(scale));
  float top = -INFINITY;
  for (int64_t j = 0; j < length; ++j) {
    const at::Half* k = keys + j * D;
    __m256 a = _mm256_mul_ps(qv[0], load_half8(k));
    __m256 b = C > 1 ? _mm256_mul_ps(qv[1], load_half8(k + 8)) : _mm256_setzero_ps();
    for (int c = 2; c < C; c += 2) {
      a = _mm256_fmadd_ps(qv[c], load_half8(k + 8 * c), a);
      if (c + 1 < C) b = _mm256_fmadd_ps(qv[c + 1], load_half8(k + 8 * (c + 1)), b);
    }
    const float s = hsum8(_mm256_add_ps(a, b));
    scores[j] = s;
    top = s > top ? s : top;
  }
  // softmax's numerator, and its sum
  __m256 total = _mm256_setzero_ps();
  const __m256 shift = _mm256_set1_ps(top);
  int64_t j = 0;
  for (; j + 8 <= length; j += 8) {
    const __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(scores + j), shift));
    _mm256_storeu_ps(scores + j, e);
    total = _mm256_add_ps(total, e);
  }
  float sum = hsum8(total);
  for (; j < length; ++j) {
    scores[j] = std::exp(scores[j] - top);
    sum += scores[j];
  }
  __m256 acc[C];
  for (int c = 0; c < C; ++c) acc[c] = _mm256_setzero_ps();
  for (int64_t p = 0; p < length; ++p) {
    const __m256 w = _mm256_set1_ps(scores[p]);
    const at::Half* v = values + p * D;
    for (int c = 0; c < C; ++c) acc[c] = _mm256_fmadd_ps(w, load_half8(v + 8 * c), acc[c]);
  }
  const __m256 inv = _mm256_set1_ps(1.0f / sum);
  for (int c = 0; c < C; ++c) _mm256_storeu_ps(out + 8 * c, _mm256_mul_ps(acc[c], inv));
}

at::Tensor decode_attention(const at::Tensor& q_, const at::Tensor& keys, const at::Tensor& values,
                            const at::Tensor& pos_, double scale) {
  const at::Tensor q = q_.contiguous();
  const at::Tensor pos = pos_.contiguous();
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat, "q: (rows, heads, dim) float32");
  TORCH_CHECK(keys.dim() == 4 && keys.scalar_type() == at::kHalf && keys.is_contiguous(),
              "keys: (slots, kv_heads, context, dim) float16, contiguous");
  TORCH_CHECK(values.sizes() == keys.sizes() && values.scalar_type() == at::kHalf && values.is_contiguous(),
              "values: as keys");
  TORCH_CHECK(pos.dim() == 1 && pos.scalar_type() == at::kLong && pos.size(0) == q.size(0), "pos: (rows,) int64");
  const int64_t rows = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t kv_heads = keys.size(1), context = keys.size(2);
  TORCH_CHECK(rows <= keys.size(0) && keys.size(3) == dim && heads % kv_heads == 0, "q and the cache disagree");
  TORCH_CHECK(dim == 32 || dim == 64 || dim == 128, "dim: 32, 64 or 128");
  const int64_t* pp = pos.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) TORCH_CHECK(pp[r] >= 0 && pp[r] < context, "pos: within the context");
  at::Tensor out = at::empty_like(q);
  const float* qp = q.data_ptr<float>();
  const at::Half *kp = keys.data_ptr<at::Half>(), *vp = values.data_ptr<at::Half>();
  float* op = out.data_ptr<float>();
  const int64_t group = heads / kv_heads;
  const float s = static_cast<float>(scale);
  at::parallel_for(0, rows * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(context);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r = t / heads, h = t % heads;
      const int64_t base = ((r * kv_heads) + h / group) * context * dim;
      const float* qh = qp + t * dim;
      float* oh = op + t * dim;
      const int64_t length = pp[r] + 1;
      switch (dim) {
        case 32: attend_one<4>(qh, kp + base, vp + base, length, s, scores.data(), oh); break;
        case 64: attend_one<8>(qh, kp + base, vp + base, length, s, scores.data(), oh); break;
        default: attend_one<16>(qh, kp + base, vp + base, length, s, scores.data(), oh);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(medask_native, m) {
  m.def("decode_attention(Tensor q, Tensor keys, Tensor values, Tensor pos, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(medask_native, CPU, m) { m.impl("decode_attention", &decode_attention); }
