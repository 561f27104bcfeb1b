// MedAsk's CPU kernels for the static decode step: a matrix product of float32 activations with
// weights kept in 4 bits (q4_linear: GPTQ's own values, one scale and offset per group of inputs) or
// in float16 (f16_linear: the LM head as the checkpoint stores it). In these two activations stay float32: the
// weights are widened in registers (AVX2, FMA, F16C), so the 4-bit kernel computes the checkpoint's
// dequantized weights exactly, with none of the int4 reference kernel's bfloat16 rounding of its input.
//
// Why our own: at a few rows, a small model's step is bound by the work around each matrix product
// (FBGEMM quantizes and packs its input and is reached through a Python operator from a compiled
// graph; the int4 kernel casts to bfloat16 and back), not by the arithmetic. These are C++ operators:
// a row tile reads each weight once and keeps its sums in registers. Many rows are arithmetic-bound,
// where FBGEMM's packed GEMMs win; the choice is timed at start (app.engine.layers).
//
// i8_linear multiplies 8-bit weights (one scale per output, as FBGEMM's int8 packs the LM head) by the
// same 8-bit activations: ggml's Q8_0 x Q8_0 dot with the sign trick (|w| times x with w's sign).
//
// q4q8_linear is the same 4-bit weights times activations rounded to 8 bits, one scale per row and group
// (ggml's Q4 x Q8 dot, with one activation scale per group of weights, 128 inputs here, where ggml keeps
// one per 32): integer pair products (maddubs) summed over a group, then one float multiply-add per group. It changes the
// arithmetic, so it is chosen only after the start-up check that admits 8-bit activations.
//
// Integer products on VNNI: where the CPU has AVX-512 VNNI (with VL), q4q8_linear and i8_linear sum the byte
// products of tiles of 2-4 rows with one vpdpbusd per 32 inputs instead of maddubs, madd and add. Each int32
// lane sums the same four byte products either way (every sum is exact: no int16 saturation is reachable on
// these ranges), so the outputs are bit for bit the AVX2 path's; use_vnni switches it off (tests compare the
// two, benchmarks time them).
//
// 4-bit layout (ggml's Q4_0 block order): inputs in blocks of 32; block b of output o is 16 bytes,
// byte j holding input 32b+j in its low nibble and input 32b+16+j in its high nibble.
// w[o, i] = q[o, i] * scale[o, g] + offset[o, g], g = i / group.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>

namespace {

constexpr int kTile = 4;  // rows whose sums stay in registers while a weight block is read once

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// the offsets' share of a 4-bit output, one explicit fused multiply-add per group in order: the same
// rounding in every kernel, whatever instructions the compiler may use for its loop in each
inline float plus_offsets(float out, const float* offset, const float* xsum, int64_t G) {
  for (int64_t g = 0; g < G; ++g) out = std::fma(offset[g], xsum[g], out);
  return out;
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
    y[r * N + o] = plus_offsets(hsum(total[r]), offset + o * G, xsum + r * G, G);
  }
}

// Activations on 8 bits: xq[r, i] * xd[r, g] ~ x[r, i] (per row and group, the largest magnitude on 127)
void quantize_rows(const float* x, int64_t M, int64_t K, int64_t group, int8_t* xq, float* xd) {
  const int64_t G = K / group;
  for (int64_t r = 0; r < M; ++r)
    for (int64_t g = 0; g < G; ++g) {
      const float* v = x + r * K + g * group;
      float amax = 0.f;
      for (int64_t i = 0; i < group; ++i) amax = std::max(amax, std::fabs(v[i]));
      const float d = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
      xd[r * G + g] = d;
      int8_t* q = xq + r * K + g * group;
      for (int64_t i = 0; i < group; ++i) q[i] = static_cast<int8_t>(std::nearbyint(v[i] * inv));
    }
}

// pair products of 4-bit values (0..15) and 8-bit activations (|xq| <= 127) are at most 3810: eight
// 32-input blocks sum to at most 30480, inside int16, before they are widened
constexpr int kBlocksInInt16 = 8;

// shared by the AVX2 and VNNI paths of the 8-bit kernels (inlined into both): a block's 32 4-bit weights as
// bytes in input order (inputs b..b+15 in the low nibbles, b+16..b+31 in the high), a group's integer sums
// scaled into the float totals, a row's output
inline __m256i q4_bytes(const uint8_t* block) {
  const __m128i low = _mm_set1_epi8(0x0F);
  const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block));
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), low), _mm_and_si128(q, low));
}

template <int R>
inline void add_group(__m256 (&total)[R], const __m256i (&acc)[R], float wscale, const float* xd, int64_t G) {
  for (int r = 0; r < R; ++r)
    total[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r]), _mm256_set1_ps(wscale * xd[r * G]), total[r]);
}

template <int R>
inline void q4_outputs(const __m256 (&total)[R], const float* offset, const float* xsum, int64_t G, float* y,
                       int64_t N, int64_t o) {
  for (int r = 0; r < R; ++r) y[r * N + o] = plus_offsets(hsum(total[r]), offset + o * G, xsum + r * G, G);
}

template <int R>
void q4q8_rows(const int8_t* xq, const float* xd, int64_t K, const uint8_t* w, const float* scale,
               const float* offset, const float* xsum, int64_t G, int64_t group, float* y, int64_t N, int64_t o) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 total[R];
  for (int r = 0; r < R; ++r) total[r] = _mm256_setzero_ps();
  const uint8_t* row = w + o * (K / 2);
  for (int64_t g = 0; g < G; ++g) {
    __m256i acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_si256();
    for (int64_t start = g * group; start < (g + 1) * group; start += 32 * kBlocksInInt16) {
      const int64_t stop = std::min<int64_t>((g + 1) * group, start + 32 * kBlocksInInt16);
      __m256i part[R];
      for (int r = 0; r < R; ++r) part[r] = _mm256_setzero_si256();
      for (int64_t b = start; b < stop; b += 32) {
        const __m256i ws = q4_bytes(row + b / 2);
        for (int r = 0; r < R; ++r)
          part[r] = _mm256_add_epi16(
              part[r], _mm256_maddubs_epi16(ws, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + r * K + b))));
      }
      for (int r = 0; r < R; ++r) acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(part[r], ones));
    }
    add_group<R>(total, acc, scale[o * G + g], xd + g, G);
  }
  q4_outputs<R>(total, offset, xsum, G, y, N, o);
}

// a pair of 8-bit products is at most 2 * 127 * 127 = 32258: each block is widened to int32 at once
template <int R>
void i8_rows(const int8_t* xq, const float* xd, int64_t K, const int8_t* w, const float* wscale, int64_t G,
             int64_t group, float* y, int64_t N, int64_t o) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 total[R];
  for (int r = 0; r < R; ++r) total[r] = _mm256_setzero_ps();
  const int8_t* row = w + o * K;
  for (int64_t g = 0; g < G; ++g) {
    __m256i acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_si256();
    for (int64_t b = g * group; b < (g + 1) * group; b += 32) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + b));
      const __m256i magnitude = _mm256_abs_epi8(wv);  // unsigned, as maddubs needs; the sign moves to x
      for (int r = 0; r < R; ++r) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + r * K + b));
        const __m256i pairs = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(xv, wv));
        acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(pairs, ones));
      }
    }
    add_group<R>(total, acc, 1.f, xd + g, G);
  }
  for (int r = 0; r < R; ++r) y[r * N + o] = hsum(total[r]) * wscale[o];
}

#define MEDASK_VNNI __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")))

// Tiles of 2-4 rows only. At one row the AVX2 path measured faster on an AMD EPYC (Zen 4) with VNNI: 0.67-0.92x
// for vpdpbusd on the default model's shapes, with one accumulator or four (where 4-16 rows measured 1.04-1.16x):
// a row's few blocks per output leave the work around the dot products, not the products, deciding.
// vpdpbusd's latency (4-5 cycles) on one accumulator would leave the units idle at two rows: C independent
// chains per row, joined by integer adds (exact, so the lanes' sums are the AVX2 path's)
constexpr int chains(int R) { return R <= 2 ? 2 : 1; }

// blocks of 32 inputs from begin to end, chain c taking every C-th: C at a time in an unrolled body (so each
// accumulator stays in a register), the rest on chain 0
template <int C, typename F>
__attribute__((always_inline)) inline void over_blocks(int64_t begin, int64_t end, F&& block) {
  int64_t b = begin;
  for (; b + 32 * C <= end; b += 32 * C)
    for (int c = 0; c < C; ++c) block(b + 32 * c, c);
  for (; b < end; b += 32) block(b, 0);
}

template <int R, int C>
inline auto joined(const __m256i (&acc)[R][C]) {
  struct {
    __m256i v[R];
  } out;
  for (int r = 0; r < R; ++r) {
    out.v[r] = acc[r][0];
    for (int c = 1; c < C; ++c) out.v[r] = _mm256_add_epi32(out.v[r], acc[r][c]);
  }
  return out;
}

// q4q8_rows with vpdpbusd: 4-bit values (unsigned) times 8-bit activations (signed), four products an int32 lane
template <int R>
MEDASK_VNNI void q4q8_rows_vnni(const int8_t* xq, const float* xd, int64_t K, const uint8_t* w, const float* scale,
                                const float* offset, const float* xsum, int64_t G, int64_t group, float* y, int64_t N,
                                int64_t o) {
  constexpr int C = chains(R);
  __m256 total[R] = {};
  const uint8_t* row = w + o * (K / 2);
  for (int64_t g = 0; g < G; ++g) {
    __m256i acc[R][C] = {};
    const auto block = [&](int64_t b, int c) MEDASK_VNNI {
      const __m256i ws = q4_bytes(row + b / 2);
      for (int r = 0; r < R; ++r)
        acc[r][c] =
            _mm256_dpbusd_epi32(acc[r][c], ws, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + r * K + b)));
    };
    over_blocks<C>(g * group, (g + 1) * group, block);
    add_group<R>(total, joined<R, C>(acc).v, scale[o * G + g], xd + g, G);
  }
  q4_outputs<R>(total, offset, xsum, G, y, N, o);
}

// i8_rows with vpdpbusd: |w| (unsigned) times x negated where w < 0 (AVX-512 has no sign_epi8: a masked subtract)
template <int R>
MEDASK_VNNI void i8_rows_vnni(const int8_t* xq, const float* xd, int64_t K, const int8_t* w, const float* wscale,
                              int64_t G, int64_t group, float* y, int64_t N, int64_t o) {
  const __m256i zero = _mm256_setzero_si256();
  constexpr int C = chains(R);
  __m256 total[R] = {};
  const int8_t* row = w + o * K;
  for (int64_t g = 0; g < G; ++g) {
    __m256i acc[R][C] = {};
    const auto block = [&](int64_t b, int c) MEDASK_VNNI {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + b));
      const __m256i magnitude = _mm256_abs_epi8(wv);
      const __mmask32 negative = _mm256_movepi8_mask(wv);
      for (int r = 0; r < R; ++r) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + r * K + b));
        acc[r][c] = _mm256_dpbusd_epi32(acc[r][c], magnitude, _mm256_mask_sub_epi8(xv, negative, zero, xv));
      }
    };
    over_blocks<C>(g * group, (g + 1) * group, block);
    add_group<R>(total, joined<R, C>(acc).v, 1.f, xd + g, G);
  }
  for (int r = 0; r < R; ++r) y[r * N + o] = hsum(total[r]) * wscale[o];
}

// whether the integer kernels take the VNNI path: on where the CPU has it, until use_vnni says otherwise
bool vnni_present() {
  return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512bw");
}
std::atomic<bool> vnni_on{vnni_present()};

// use_vnni(mode): 1 on (where present), 0 off, -1 unchanged; whether the VNNI path is on now
bool use_vnni(int64_t mode) {
  if (mode >= 0) vnni_on = mode == 1 && vnni_present();
  return vnni_on;
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

struct Dims {
  int64_t M, K, N, G;
};

// x (rows, in) float32, made contiguous; in divided into groups of a multiple of 32 inputs
Dims rows_and_groups(const at::Tensor& x, const at::Tensor& w, int64_t in, int64_t group) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x: (rows, in) float32");
  TORCH_CHECK(x.size(1) == in && w.is_contiguous(), "w: (out, in), contiguous");
  TORCH_CHECK(group % 32 == 0 && in % group == 0, "group: a multiple of 32 dividing in");
  return {x.size(0), in, w.size(0), in / group};
}

Dims four_bit(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, const at::Tensor& offset,
              int64_t group) {
  TORCH_CHECK(w.scalar_type() == at::kByte, "w: (out, in/2) uint8");
  const Dims d = rows_and_groups(x, w, w.size(1) * 2, group);
  TORCH_CHECK(scale.size(0) == d.N && scale.size(1) == d.G && offset.sizes() == scale.sizes(),
              "scale, offset: (out, groups)");
  return d;
}

// 8-bit activations per row and group, for the kernels of integer products
struct Rounded {
  at::Tensor q, step;
};

Rounded rounded(const at::Tensor& x, const Dims& d, int64_t group) {
  Rounded r{at::empty({d.M, d.K}, x.options().dtype(at::kChar)), at::empty({d.M, d.G}, x.options())};
  quantize_rows(x.data_ptr<float>(), d.M, d.K, group, r.q.data_ptr<int8_t>(), r.step.data_ptr<float>());
  return r;
}

at::Tensor q4_linear(const at::Tensor& x_, const at::Tensor& w, const at::Tensor& scale,
                     const at::Tensor& offset, int64_t group) {
  const at::Tensor x = x_.contiguous();
  const auto [M, K, N, G] = four_bit(x, w, scale, offset, group);
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

at::Tensor q4q8_linear(const at::Tensor& x_, const at::Tensor& w, const at::Tensor& scale,
                       const at::Tensor& offset, int64_t group) {
  const at::Tensor x = x_.contiguous();
  const Dims d = four_bit(x, w, scale, offset, group);
  const auto [M, K, N, G] = d;
  at::Tensor y = at::empty({M, N}, x.options());
  at::Tensor xsum = x.view({M, G, group}).sum(-1).contiguous();  // the offsets' share, from the exact input
  const Rounded xr8 = rounded(x, d, group);
  const int8_t* qp = xr8.q.data_ptr<int8_t>();
  const float *dp = xr8.step.data_ptr<float>(), *sp = xsum.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const float *sc = scale.data_ptr<float>(), *of = offset.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const bool vnni = vnni_on;
  over_tiles(M, N, [&](int64_t m, int64_t rows, int64_t o) {
    const int8_t* qr = qp + m * K;
    const float *dr = dp + m * G, *sr = sp + m * G;
    float* yr = yp + m * N;
    if (vnni && rows > 1) {  // one row: the AVX2 path measured faster (above)
      switch (rows) {
        case 4: q4q8_rows_vnni<4>(qr, dr, K, wp, sc, of, sr, G, group, yr, N, o); break;
        case 3: q4q8_rows_vnni<3>(qr, dr, K, wp, sc, of, sr, G, group, yr, N, o); break;
        default: q4q8_rows_vnni<2>(qr, dr, K, wp, sc, of, sr, G, group, yr, N, o);
      }
      return;
    }
    switch (rows) {
      case 4: q4q8_rows<4>(qr, dr, K, wp, sc, of, sr, G, group, yr, N, o); break;
      case 3: q4q8_rows<3>(qr, dr, K, wp, sc, of, sr, G, group, yr, N, o); break;
      case 2: q4q8_rows<2>(qr, dr, K, wp, sc, of, sr, G, group, yr, N, o); break;
      default: q4q8_rows<1>(qr, dr, K, wp, sc, of, sr, G, group, yr, N, o);
    }
  });
  return y;
}

at::Tensor i8_linear(const at::Tensor& x_, const at::Tensor& w, const at::Tensor& scale, int64_t group) {
  const at::Tensor x = x_.contiguous();
  TORCH_CHECK(w.scalar_type() == at::kChar, "w: (out, in) int8");
  const Dims d = rows_and_groups(x, w, w.size(1), group);
  const auto [M, K, N, G] = d;
  TORCH_CHECK(scale.numel() == N && scale.scalar_type() == at::kFloat, "scale: (out,) float32");
  at::Tensor y = at::empty({M, N}, x.options());
  const Rounded xr8 = rounded(x, d, group);
  const int8_t *qp = xr8.q.data_ptr<int8_t>(), *wp = w.data_ptr<int8_t>();
  const float *dp = xr8.step.data_ptr<float>(), *sc = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const bool vnni = vnni_on;
  over_tiles(M, N, [&](int64_t m, int64_t rows, int64_t o) {
    const int8_t* qr = qp + m * K;
    const float* dr = dp + m * G;
    float* yr = yp + m * N;
    if (vnni && rows > 1) {  // one row: the AVX2 path measured faster (above)
      switch (rows) {
        case 4: i8_rows_vnni<4>(qr, dr, K, wp, sc, G, group, yr, N, o); break;
        case 3: i8_rows_vnni<3>(qr, dr, K, wp, sc, G, group, yr, N, o); break;
        default: i8_rows_vnni<2>(qr, dr, K, wp, sc, G, group, yr, N, o);
      }
      return;
    }
    switch (rows) {
      case 4: i8_rows<4>(qr, dr, K, wp, sc, G, group, yr, N, o); break;
      case 3: i8_rows<3>(qr, dr, K, wp, sc, G, group, yr, N, o); break;
      case 2: i8_rows<2>(qr, dr, K, wp, sc, G, group, yr, N, o); break;
      default: i8_rows<1>(qr, dr, K, wp, sc, G, group, yr, N, o);
    }
  });
  return y;
}

at::Tensor f16_linear(const at::Tensor& x_, const at::Tensor& w) {
  const at::Tensor x = x_.contiguous();
  TORCH_CHECK(w.scalar_type() == at::kHalf, "w: (out, in) float16");
  const auto [M, K, N, G] = rows_and_groups(x, w, w.size(1), 32);
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
  m.def("q4q8_linear(Tensor x, Tensor w, Tensor scale, Tensor offset, int group) -> Tensor");
  m.def("i8_linear(Tensor x, Tensor w, Tensor scale, int group) -> Tensor");
  m.def("f16_linear(Tensor x, Tensor w) -> Tensor");
  m.def("use_vnni(int mode) -> bool", &use_vnni);  // no tensor: one kernel for every dispatch key
}

TORCH_LIBRARY_IMPL(medask_native, CPU, m) {
  m.impl("q4_linear", &q4_linear);
  m.impl("q4q8_linear", &q4q8_linear);
  m.impl("i8_linear", &i8_linear);
  m.impl("f16_linear", &f16_linear);
}
