// MedAsk's CPU kernels for the static decode step: a matrix product of float32 activations with
// weights kept in 4 bits (q4_linear: GPTQ's own values, one scale and offset per group of inputs) or
// in float16 (f16_linear: the LM head as the checkpoint stores it). Activations stay float32: the
// weights are widened in registers (AVX2, FMA, F16C), so the 4-bit kernel computes the checkpoint's
// dequantized weights exactly, with none of the int4 reference kernel's bfloat16 rounding of its input.
//
// Why our own: at a few rows, a small model's step is bound by the work around each matrix product
// (FBGEMM quantizes and packs its input and is reached through a Python operator from a compiled
// graph; the int4 kernel casts to bfloat16 and back), not by the arithmetic. These are C++ operators:
// a row tile reads each weight once and keeps its sums in registers. Many rows are arithmetic-bound,
// where FBGEMM's packed GEMMs win; the choice is timed at start (app.engine.layers).
//
// 4-bit layout (ggml's Q4_0 block order): inputs in blocks of 32; block b of output o is 16 bytes,
// byte j holding input 32b+j in its low nibble and input 32b+16+j in its high nibble.
// w[o, i] = q[o, i] * scale[o, g] + offset[o, g], g = i / group.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

namespace {

constexpr int kTile = 4;  // rows whose sums stay in registers while a weight block is read once

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline __m256 widen_u8(__m128i bytes) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes)); }

// C independent sums per row (C * R <= 8): an FMA's latency is 4 cycles, so one chain per row
// would leave the units idle at one or two rows
template <int R>
void q4_rows(const float* x, int64_t K, const uint8_t* w, const float* scale, const float* offset,
             const float* xsum, int64_t G, int64_t group, float* y, int64_t N, int64_t o) {
  constexpr int C = R == 1 ? 4 : 2;
  const __m128i low = _mm_set1_epi8(0x0F);
  __m256 total[R];
  for (int r = 0; r < R; ++r) total[r] = _mm256_setzero_ps();
  const uint8_t* row = w + o * (K / 2);
  for (int64_t g = 0; g < G; ++g) {
    __m256 acc[R][C];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
    for (int64_t b = g * group; b < (g + 1) * group; b += 32) {
      __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b / 2));
      __m128i lo = _mm_and_si128(q, low), hi = _mm_and_si128(_mm_srli_epi16(q, 4), low);
      __m256 ws[4] = {widen_u8(lo), widen_u8(_mm_srli_si128(lo, 8)), widen_u8(hi), widen_u8(_mm_srli_si128(hi, 8))};
      for (int r = 0; r < R; ++r) {
        const float* xr = x + r * K + b;
        for (int j = 0; j < 4; ++j) acc[r][j % C] = _mm256_fmadd_ps(ws[j], _mm256_loadu_ps(xr + 8 * j), acc[r][j % C]);
      }
    }
    __m256 s = _mm256_set1_ps(scale[o * G + g]);
    for (int r = 0; r < R; ++r) {
      __m256 sum = acc[r][0];
      for (int c = 1; c < C; ++c) sum = _mm256_add_ps(sum, acc[r][c]);
      total[r] = _mm256_fmadd_ps(sum, s, total[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float out = hsum(total[r]);
    for (int64_t g = 0; g < G; ++g) out += offset[o * G + g] * xsum[r * G + g];
    y[r * N + o] = out;
  }
}

template <int R>
void f16_rows(const float* x, int64_t K, const at::Half* w, float* y, int64_t N, int64_t o) {
  constexpr int C = R == 1 ? 4 : 2;
  __m256 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  const __m128i* row = reinterpret_cast<const __m128i*>(w + o * K);
  for (int64_t k = 0; k < K; k += 32) {
    __m256 ws[4];
    for (int j = 0; j < 4; ++j) ws[j] = _mm256_cvtph_ps(_mm_loadu_si128(row + k / 8 + j));
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < 4; ++j)
        acc[r][j % C] = _mm256_fmadd_ps(ws[j], _mm256_loadu_ps(x + r * K + k + 8 * j), acc[r][j % C]);
  }
  for (int r = 0; r < R; ++r) {
    __m256 sum = acc[r][0];
    for (int c = 1; c < C; ++c) sum = _mm256_add_ps(sum, acc[r][c]);
    y[r * N + o] = hsum(sum);
  }
}

// rows in tiles of kTile (the last tile narrower), outputs split across threads
template <typename F>
void over_tiles(int64_t M, int64_t N, F&& body) {
  // a thread takes at least 64 outputs: below that the pool's wake-up costs more than it saves
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t m = 0; m < M; m += kTile) {
      const int64_t rows = std::min<int64_t>(kTile, M - m);
      for (int64_t o = begin; o < end; ++o) body(m, rows, o);
    }
  });
}

at::Tensor q4_linear(const at::Tensor& x_, const at::Tensor& w, const at::Tensor& scale,
                     const at::Tensor& offset, int64_t group) {
  TORCH_CHECK(x_.dim() == 2 && x_.scalar_type() == at::kFloat, "x: (rows, in) float32");
  const at::Tensor x = x_.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), G = K / group;
  TORCH_CHECK(w.scalar_type() == at::kByte && w.size(1) * 2 == K && w.is_contiguous(), "w: (out, in/2) uint8");
  TORCH_CHECK(group % 32 == 0 && K % group == 0, "group: a multiple of 32 dividing in");
  TORCH_CHECK(scale.size(0) == N && scale.size(1) == G && offset.sizes() == scale.sizes(), "scale, offset: (out, groups)");
  at::Tensor y = at::empty({M, N}, x.options());
  at::Tensor xsum = x.view({M, G, group}).sum(-1).contiguous();  // (rows, groups): the offsets' share
  const float* xp = x.data_ptr<float>();
  const float* sp = xsum.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const float *sc = scale.data_ptr<float>(), *of = offset.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  over_tiles(M, N, [&](int64_t m, int64_t rows, int64_t o) {
    const float *xr = xp + m * K, *sr = sp + m * G;
    float* yr = yp + m * N;
    switch (rows) {
      case 4: q4_rows<4>(xr, K, wp, sc, of, sr, G, group, yr, N, o); break;
      case 3: q4_rows<3>(xr, K, wp, sc, of, sr, G, group, yr, N, o); break;
      case 2: q4_rows<2>(xr, K, wp, sc, of, sr, G, group, yr, N, o); break;
      default: q4_rows<1>(xr, K, wp, sc, of, sr, G, group, yr, N, o);
    }
  });
  return y;
}

at::Tensor f16_linear(const at::Tensor& x_, const at::Tensor& w) {
  TORCH_CHECK(x_.dim() == 2 && x_.scalar_type() == at::kFloat, "x: (rows, in) float32");
  const at::Tensor x = x_.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(w.scalar_type() == at::kHalf && w.size(1) == K && w.is_contiguous(), "w: (out, in) float16");
  TORCH_CHECK(K % 32 == 0, "in: a multiple of 32");
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const at::Half* wp = w.data_ptr<at::Half>();
  float* yp = y.data_ptr<float>();
  over_tiles(M, N, [&](int64_t m, int64_t rows, int64_t o) {
    const float* xr = xp + m * K;
    float* yr = yp + m * N;
    switch (rows) {
      case 4: f16_rows<4>(xr, K, wp, yr, N, o); break;
      case 3: f16_rows<3>(xr, K, wp, yr, N, o); break;
      case 2: f16_rows<2>(xr, K, wp, yr, N, o); break;
      default: f16_rows<1>(xr, K, wp, yr, N, o);
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(medask_native, m) {
  m.def("q4_linear(Tensor x, Tensor w, Tensor scale, Tensor offset, int group) -> Tensor");
  m.def("f16_linear(Tensor x, Tensor w) -> Tensor");
}

TORCH_LIBRARY_IMPL(medask_native, CPU, m) {
  m.impl("q4_linear", &q4_linear);
  m.impl("f16_linear", &f16_linear);
}
