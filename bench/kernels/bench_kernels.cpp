// Kernel benchmarks: GEMV bandwidth against the machine's read bandwidth (the decode roofline),
// a whole TinyLlama-1.1B decode step of matmuls, and 512-token prefill sgemm GFLOP/s against
// OpenBLAS's own threaded sgemm on f32 weights.
//
//   bench_kernels [--threads N] [--bw-bytes BYTES] [--no-gemv] [--no-model] [--no-prefill]
//                 [--quant]
//                 [--crossover]
//
// Weights are random and, for the GEMV, several copies of each matrix are used in turn so that the
// bytes read exceed the last-level cache: every weight comes from DRAM, as in a real decode.
#include <cblas.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "parallm/core/thread_pool.h"
#include "parallm/core/timer.h"
#include "parallm/kernels/cpu.h"
#include "parallm/kernels/matmul.h"
#include "parallm/kernels/quant_matmul.h"

using namespace parallm;

namespace {

struct Shape2 {
  const char* name;
  int64_t N, K;
};

// TinyLlama-1.1B: hidden 2048, 32 heads of 64, 4 KV heads, FFN 5632, vocab 32000, 22 layers.
const Shape2 kShapes[] = {{"q/o [2048,2048]", 2048, 2048},
                          {"k/v [256,2048]", 256, 2048},
                          {"gate/up [5632,2048]", 5632, 2048},
                          {"down [2048,5632]", 2048, 5632},
                          {"lm_head [32000,2048]", 32000, 2048}};

Tensor random_weight(DType dtype, int64_t N, int64_t K, uint32_t seed) {
  Tensor w = Tensor::empty(dtype, {N, K});
  // Fill in parallel (first touch by the pool's threads, as a loader would).
  std::vector<float> row(static_cast<size_t>(K));
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> d(-0.05f, 0.05f);
  for (auto& v : row) v = d(rng);
  const size_t row_bytes = dtype_bytes(dtype, K);  // block dtypes: whole blocks per row
  std::vector<char> conv(row_bytes);
  convert(row.data(), DType::F32, conv.data(), dtype, static_cast<size_t>(K));
  ThreadPool::current().parallel_for(N, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n)
      std::memcpy(static_cast<char*>(w.raw()) + static_cast<size_t>(n) * row_bytes, conv.data(),
                  conv.size());
  });
  return w;
}

// Bytes/s of the GEMV (T tokens) at one shape, reading `copies` distinct weights in turn.
double gemv_bandwidth(DType dtype, const Shape2& s, size_t target_bytes, int64_t T, int reps) {
  const size_t bytes = static_cast<size_t>(s.N * s.K) * dtype_size(dtype);
  const size_t copies = std::max<size_t>(2, (target_bytes + bytes - 1) / bytes);
  std::vector<Tensor> ws;
  for (size_t c = 0; c < copies; ++c) ws.push_back(random_weight(dtype, s.N, s.K, 1 + c));
  std::vector<float> x(static_cast<size_t>(T * s.K), 0.01f), y(static_cast<size_t>(T * s.N));
  for (const Tensor& w : ws) kernels::matmul(x.data(), T, w, y.data());  // warm-up
  double best = 1e300;
  for (int r = 0; r < reps; ++r) {
    Timer t;
    for (const Tensor& w : ws) kernels::matmul(x.data(), T, w, y.data());
    best = std::min(best, t.seconds());
  }
  return static_cast<double>(bytes * copies) / best;
}

struct Layer {
  Tensor q, k, v, o, gate, up, down;
};

// One decode token of TinyLlama-1.1B's matmuls (22 layers + lm_head) in `dtype`: tokens/s and
// weight bytes per token.
void model_decode(DType dtype, int reps, double* tokens_per_s, double* weight_bytes) {
  const int64_t H = 2048, F = 5632, KV = 256, V = 32000;
  std::vector<Layer> layers;
  uint32_t seed = 100;
  for (int l = 0; l < 22; ++l)
    layers.push_back(Layer{random_weight(dtype, H, H, seed++), random_weight(dtype, KV, H, seed++),
                           random_weight(dtype, KV, H, seed++), random_weight(dtype, H, H, seed++),
                           random_weight(dtype, F, H, seed++), random_weight(dtype, F, H, seed++),
                           random_weight(dtype, H, F, seed++)});
  const Tensor head = random_weight(dtype, V, H, seed++);
  size_t bytes = head.nbytes();
  for (const Layer& l : layers)
    bytes += l.q.nbytes() + l.k.nbytes() + l.v.nbytes() + l.o.nbytes() + l.gate.nbytes() +
             l.up.nbytes() + l.down.nbytes();
  std::vector<float> x(H, 0.01f), q(H), k(KV), v(KV), g(F), u(F), logits(V);
  auto step = [&] {
    for (const Layer& l : layers) {
      kernels::matmul(x.data(), 1, l.q, q.data());
      kernels::matmul(x.data(), 1, l.k, k.data());
      kernels::matmul(x.data(), 1, l.v, v.data());
      kernels::matmul(q.data(), 1, l.o, x.data(), true);
      kernels::matmul(x.data(), 1, l.gate, g.data());
      kernels::matmul(x.data(), 1, l.up, u.data());
      kernels::matmul(g.data(), 1, l.down, x.data(), true);
      std::fill(x.begin(), x.end(), 0.01f);
    }
    kernels::matmul(x.data(), 1, head, logits.data());
  };
  step();
  double best = 1e300;
  for (int r = 0; r < reps; ++r) {
    Timer t;
    step();
    best = std::min(best, t.seconds());
  }
  *tokens_per_s = 1.0 / best;
  *weight_bytes = static_cast<double>(bytes);
}

void prefill(const Shape2& s, int64_t T, int threads, int reps) {
  std::vector<float> x(static_cast<size_t>(T * s.K));
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> d(-1, 1);
  for (auto& v : x) v = d(rng);
  std::vector<float> y(static_cast<size_t>(T * s.N));
  const double flops = 2.0 * T * s.N * s.K;
  auto time_best = [&](auto&& fn) {
    fn();
    double best = 1e300;
    for (int r = 0; r < reps; ++r) {
      Timer t;
      fn();
      best = std::min(best, t.seconds());
    }
    return flops / best / 1e9;
  };
  const Tensor wf = random_weight(DType::F32, s.N, s.K, 7);
  const Tensor wb = wf.to(DType::BF16);
  const double ours_f32 = time_best([&] { kernels::matmul(x.data(), T, wf, y.data()); });
  const double ours_bf16 = time_best([&] { kernels::matmul(x.data(), T, wb, y.data()); });
  // OpenBLAS's own threading on the whole f32 weight; then back to 1 thread for our calls.
  openblas_set_num_threads(threads);
  const double blas = time_best([&] {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(T), static_cast<int>(s.N),
                static_cast<int>(s.K), 1.0f, x.data(), static_cast<int>(s.K), wf.data<float>(),
                static_cast<int>(s.K), 0.0f, y.data(), static_cast<int>(s.N));
  });
  openblas_set_num_threads(1);
  std::printf(
      "%-22s T=%lld  openblas f32 %7.1f GFLOP/s | ours f32 %7.1f (%.2fx) | ours bf16 "
      "%7.1f (%.2fx)\n",
      s.name, static_cast<long long>(T), blas, ours_f32, ours_f32 / blas, ours_bf16,
      ours_bf16 / blas);
}

}  // namespace

int main(int argc, char** argv) {
  int threads = ThreadPool::hardware_threads();
  size_t bw_bytes = size_t{1} << 30;
  bool do_prefill = true, do_model = true, do_gemv = true, crossover = false, quant = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--threads" && i + 1 < argc) {
      threads = std::stoi(argv[++i]);
    } else if (a == "--bw-bytes" && i + 1 < argc) {
      bw_bytes = std::stoull(argv[++i]);
    } else if (a == "--no-prefill") {
      do_prefill = false;
    } else if (a == "--no-gemv") {
      do_gemv = false;
    } else if (a == "--no-model") {
      do_model = false;
    } else if (a == "--crossover") {
      crossover = true;
    } else if (a == "--quant") {
      quant = true;  // the decode step also at Q8_0 and Q4_0 (kernels/quant_matmul.h)
    } else {
      std::fprintf(stderr, "bench_kernels: unknown argument %s\n", a.c_str());
      return 1;
    }
  }
  ThreadPool pool(threads);
  ScopedPool scoped(pool);
  openblas_set_num_threads(1);
  std::printf("threads %d, simd %s (cpu supports %s)\n", threads,
              kernels::simd_name(kernels::simd_level()).c_str(),
              kernels::simd_name(kernels::cpu_simd_level()).c_str());
  // The roofline is the best of a bandwidth measurement before and after the GEMV runs (so a
  // burst of load from other processes during one of them does not flatter the ratios).
  double bw = kernels::measure_read_bandwidth(bw_bytes, 5);
  std::printf("read bandwidth (%zu MiB buffer, best of 5 reps x 11 read patterns): %.2f GB/s\n",
              bw_bytes >> 20, bw / 1e9);

  const size_t target = size_t{512} << 20;  // bytes of distinct weights per measurement
  struct Row {
    const char* name;
    double bf16, f32;
  };
  std::vector<Row> rows;
  for (const Shape2& s : kShapes)
    if (do_gemv)
      rows.push_back({s.name, gemv_bandwidth(DType::BF16, s, target, 1, 5),
                      gemv_bandwidth(DType::F32, s, target, 1, 5)});
  std::vector<std::pair<int64_t, double>> cross;
  if (crossover)
    for (int64_t T : {1, 2, 4, 8, 16, 32, 48, 63, 64, 96})
      cross.push_back({T, gemv_bandwidth(DType::BF16, kShapes[0], target, T, 3)});
  double tps = 0, model_bytes = 0;
  if (do_model) model_decode(DType::BF16, 5, &tps, &model_bytes);
  std::vector<std::pair<DType, std::pair<double, double>>> quant_rows;
  if (do_model && quant)
    for (DType t : {DType::Q8_0, DType::Q4_0}) {
      double qt = 0, qb = 0;
      model_decode(t, 5, &qt, &qb);
      quant_rows.push_back({t, {qt, qb}});
    }
  const double bw2 = kernels::measure_read_bandwidth(bw_bytes, 5);
  std::printf("read bandwidth again: %.2f GB/s; roofline = the larger\n\n", bw2 / 1e9);
  bw = std::max(bw, bw2);

  std::printf(
      "GEMV, T=1, weights from DRAM (%zu MiB of copies per shape), GB/s and fraction of "
      "roofline:\n",
      target >> 20);
  for (const Row& r : rows)
    std::printf("  %-22s bf16 %6.2f GB/s (%.3f)   f32 %6.2f GB/s (%.3f)\n", r.name, r.bf16 / 1e9,
                r.bf16 / bw, r.f32 / 1e9, r.f32 / bw);
  if (!cross.empty()) {
    std::printf(
        "\nGEMV with T tokens, bf16 [2048,2048] (GEMV below T=64, sgemm from T=64): weight GB/s "
        "per call\n");
    for (auto [T, b] : cross)
      std::printf("  T=%-3lld %6.2f GB/s  %.1f GFLOP/s\n", static_cast<long long>(T), b / 1e9,
                  b / 2 * 2 * T / 1e9);
  }
  if (do_model)
    std::printf(
        "\nbf16 TinyLlama-1.1B decode step (22 layers x 7 matmuls + lm_head, matmuls only): "
        "%.1f MB of weights, %.2f ms/token = %.2f tok/s, %.2f GB/s = %.3f of roofline\n",
        model_bytes / 1e6, 1e3 / tps, tps, model_bytes * tps / 1e9, model_bytes * tps / bw);
  for (const auto& [t, r] : quant_rows)
    std::printf("%s TinyLlama-1.1B decode step (%s, activations Q8_0): %.1f MB of weights, "
                "%.2f ms/token = %.2f tok/s (%.2fx bf16), %.2f GB/s = %.3f of roofline\n",
                std::string(dtype_name(t)).c_str(),
                kernels::quant_path_name(kernels::quant_path()).c_str(), r.second / 1e6,
                1e3 / r.first, r.first, r.first / tps, r.second * r.first / 1e9,
                r.second * r.first / bw);
  if (do_prefill) {
    std::printf("\nprefill sgemm, T=512 (GFLOP/s; ratio to OpenBLAS's own %d-thread sgemm):\n",
                threads);
    for (const Shape2& s : kShapes) prefill(s, 512, threads, 3);
  }
  return 0;
}
