// FBGEMM's dynamic int8 GEMM with each row's activations on their own scale (the ``int8`` kernel:
// app.engine.kernels._int8_rows), in C++: the same operations, so the same outputs bit for bit, without
// the eleven Python-dispatched torch calls around each product (1.0 of a 1-token prompt's 2.3 ms here) and
// without holding the interpreter lock in a compiled step. FBGEMM's packed weights are TorchScript objects:
// they are kept in a table here (keep_int8) and a product names its weight by index, an int a compiled
// graph can carry.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/quantized/PackedParams.h>

#include <immintrin.h>

#include <cmath>
#include <mutex>
#include <vector>

namespace {

std::mutex table_mutex;
std::vector<c10::intrusive_ptr<LinearPackedParamsBase>> table;

int64_t keep_int8(const c10::intrusive_ptr<LinearPackedParamsBase>& w) {
  std::lock_guard<std::mutex> lock(table_mutex);
  table.push_back(w);
  return static_cast<int64_t>(table.size()) - 1;
}

void drop_int8(int64_t index) {
  std::lock_guard<std::mutex> lock(table_mutex);
  TORCH_CHECK(index >= 0 && index < static_cast<int64_t>(table.size()), "no packed weight ", index);
  table[index].reset();
}

at::Tensor int8_rows(const at::Tensor& x_in, int64_t index, int64_t out_features) {
  c10::intrusive_ptr<LinearPackedParamsBase> w;
  {
    std::lock_guard<std::mutex> lock(table_mutex);
    TORCH_CHECK(index >= 0 && index < static_cast<int64_t>(table.size()) && table[index], "no packed weight ", index);
    w = table[index];
  }
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "int8_rows: x must be 2-D float32");
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.size(0), k = x.size(1);
  at::Tensor scale = at::empty({n, 1}, x.options());
  at::Tensor buf = at::empty({n + 1, k}, x.options());
  const float* xp = x.data_ptr<float>();
  float* sp = scale.data_ptr<float>();
  float* bp = buf.data_ptr<float>();
  // the largest magnitude of each row, then the row divided by it: a max and a division per element, exact
  // whatever their order, so vectors give the same floats as torch's abs, amax, clamp and div
  at::parallel_for(0, n, 8, [&](int64_t begin, int64_t end) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = xp + r * k;
      __m256 mv = _mm256_setzero_ps();
      int64_t j = 0;
      for (; j + 8 <= k; j += 8) mv = _mm256_max_ps(mv, _mm256_andnot_ps(sign, _mm256_loadu_ps(xr + j)));
      float lanes[8];
      _mm256_storeu_ps(lanes, mv);
      float m = 0.0f;
      for (float v : lanes) m = v > m ? v : m;
      for (; j < k; ++j) m = std::fabs(xr[j]) > m ? std::fabs(xr[j]) : m;
      const float s = m > 1e-12f ? m : 1e-12f;
      sp[r] = s;
      float* br = bp + r * k;
      const __m256 sv = _mm256_set1_ps(s);
      j = 0;
      for (; j + 8 <= k; j += 8) _mm256_storeu_ps(br + j, _mm256_div_ps(_mm256_loadu_ps(xr + j), sv));
      for (; j < k; ++j) br[j] = xr[j] / s;
    }
  });
  float* last = bp + n * k;
  for (int64_t j = 0; j < k; ++j) last[j] = 0.0f;
  last[0] = 1.0f;
  last[k - 1] = -1.0f;
  at::Tensor out = w->apply_dynamic(buf, /*reduce_range=*/true);
  TORCH_CHECK(out.size(1) == out_features, "int8_rows: ", out.size(1), " outputs, not ", out_features);
  return out.narrow(0, 0, n).mul(scale);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(medask_native, m) {
  m.def("keep_int8(__torch__.torch.classes.quantized.LinearPackedParamsBase w) -> int", &keep_int8);
  m.def("drop_int8(int index) -> ()", &drop_int8);
  m.def("int8_rows(Tensor x, int index, int out_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(medask_native, CPU, m) { m.impl("int8_rows", &int8_rows); }
