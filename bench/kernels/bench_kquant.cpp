// Q4_K / Q5_K / Q6_K decode GEMV: the integer kernels (kernels/quant_matmul.h) against the f32
// baseline they replaced (quant_matmul_dequant: each row dequantized, f32 dot product), T = 1, on a
// [5632, 2048] weight (TinyLlama's MLP up/gate shape), and Q4_0's integer kernel for scale. Random
// valid blocks; best of the repeats.
// --repack: instead, Q4_0, Q8_0, Q4_K, Q5_K and Q6_K in the plain layout against the repacked one
// (kernels::repack_quant_weight) at TinyLlama's shapes, T = 1 and 4, weights rotated over copies
// of >= 64 MiB (from DRAM, not the cache), the two measured alternately rep by rep.
// --gemm: instead, Q8_0, Q4_0, Q4_K, Q5_K and Q6_K prefill (T = 512 and --tokens T) at TinyLlama's
// shapes, weights repacked as the loader does: the int8 GEMM of this CPU's path against dequantize
// + OpenBLAS sgemm (what the plain path runs), alternately rep by rep, best of the repeats, in
// GFLOP/s.
//
//   bench_kquant [--threads N] [--reps R] [--repack | --gemm [--tokens T]]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "parallm/core/thread_pool.h"
#include "parallm/kernels/quant_matmul.h"

using namespace parallm;

namespace {

Tensor random_weight(DType t, int64_t N, int64_t K) {
  Tensor w = Tensor::empty(t, {N, K});
  std::mt19937 rng(1);
  auto* p = static_cast<uint8_t*>(w.raw());
  for (size_t i = 0; i < w.nbytes(); ++i) p[i] = static_cast<uint8_t>(rng());
  const uint16_t d = f32_to_f16(0.01f);
  for (int64_t b = 0; b < N * K / 256; ++b) {
    uint8_t* blk = p + b * dtype_size(t);
    if (t == DType::Q4_K || t == DType::Q5_K) {
      std::memcpy(blk, &d, 2);
      std::memcpy(blk + 2, &d, 2);
    } else {
      std::memcpy(blk + 208, &d, 2);
    }
  }
  return w;
}

template <class F>
double best_ms(int reps, F&& f) {
  f();
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    const auto t1 = std::chrono::steady_clock::now();
    best = std::min(best, std::chrono::duration<double, std::milli>(t1 - t0).count());
  }
  return best;
}

}  // namespace

// Plain vs repacked Q4_0 / Q8_0 GEMV (--repack).
void bench_repack(int threads, int reps) {
  struct Shape {
    int64_t N, K;
  };
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::printf("plain vs repacked GEMV, %d thread(s), path %s, best of %d alternating reps\n",
              threads, kernels::quant_path_name(kernels::quant_path()).c_str(), reps);
  for (DType t : {DType::Q4_0, DType::Q8_0, DType::Q4_K, DType::Q5_K, DType::Q6_K})
    for (Shape sh : {Shape{2048, 2048}, Shape{5632, 2048}, Shape{2048, 5632}}) {
      std::vector<float> wf(static_cast<size_t>(sh.N * sh.K));
      for (float& v : wf) v = u(rng);
      Tensor f = Tensor::empty(DType::F32, {sh.N, sh.K});
      std::memcpy(f.raw(), wf.data(), wf.size() * 4);
      const Tensor w0 = f.to(t);
      const size_t copies = std::max<size_t>(2, (size_t{64} << 20) / w0.nbytes() + 1);
      std::vector<Tensor> plain, packed;
      for (size_t c = 0; c < copies; ++c) {
        plain.push_back(w0.contiguous());
        packed.push_back(kernels::repack_quant_weight(plain.back()));
      }
      for (int64_t T : {1, 4}) {
        std::vector<float> x(static_cast<size_t>(T * sh.K)), y(static_cast<size_t>(T * sh.N));
        for (float& v : x) v = u(rng);
        size_t i = 0, j = 0;
        double best_old = 1e30, best_new = 1e30;
        auto once = [&](const std::vector<Tensor>& ws, size_t& k) {
          const auto t0 = std::chrono::steady_clock::now();
          kernels::quant_matmul(x.data(), T, ws[k++ % ws.size()], y.data());
          return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0)
              .count();
        };
        once(plain, i);
        once(packed, j);
        for (int r = 0; r < reps; ++r) {
          best_old = std::min(best_old, once(plain, i));
          best_new = std::min(best_new, once(packed, j));
        }
        const double gb = static_cast<double>(w0.nbytes()) / 1e6,
                     gf = 2.0 * static_cast<double>(sh.N * sh.K * T) / 1e6;
        std::printf("  %s [%5lld, %5lld] T=%lld: plain %.3f ms (%5.2f GB/s, %6.2f GFLOP/s)  "
                    "repacked %.3f ms (%5.2f GB/s, %6.2f GFLOP/s)  %.2fx\n",
                    std::string(dtype_name(t)).c_str(), static_cast<long long>(sh.N),
                    static_cast<long long>(sh.K), static_cast<long long>(T), best_old,
                    gb / best_old, gf / best_old, best_new, gb / best_new, gf / best_new,
                    best_old / best_new);
      }
    }
}

// The int8 GEMM against dequantize + sgemm (--gemm).
void bench_gemm(int threads, int reps, int64_t T) {
  const kernels::QuantPath path = kernels::quant_path();
  std::printf("prefill GEMM, %d thread(s), T = %lld, path %s, best of %d\n", threads,
              static_cast<long long>(T), kernels::quant_path_name(path).c_str(), reps);
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> x(static_cast<size_t>(T * 5632));
  for (float& v : x) v = u(rng);
  for (DType t : {DType::Q8_0, DType::Q4_0, DType::Q4_K, DType::Q5_K, DType::Q6_K}) {
    for (auto [N, K] : {std::pair<int64_t, int64_t>{2048, 2048}, {5632, 2048}, {2048, 5632}}) {
      std::vector<float> wf(static_cast<size_t>(N * K));
      for (float& v : wf) v = u(rng);
      Tensor f = Tensor::empty(DType::F32, {N, K});
      std::memcpy(f.raw(), wf.data(), wf.size() * 4);
      const Tensor w = kernels::repack_quant_weight(f.to(t));
      std::vector<float> y(static_cast<size_t>(T * N));
      double best_gemm = 1e30, best_sgemm = 1e30;
      auto time = [&](kernels::QuantPath p) {
        const auto t0 = std::chrono::steady_clock::now();
        kernels::quant_matmul(x.data(), T, w, y.data(), false, p);
        return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0)
            .count();
      };
      time(path);
      time(kernels::QuantPath::Scalar);
      for (int r = 0; r < reps; ++r) {
        best_gemm = std::min(best_gemm, time(path));
        best_sgemm = std::min(best_sgemm, time(kernels::QuantPath::Scalar));
      }
      const double gf = 2.0 * static_cast<double>(N * K * T) / 1e6;
      std::printf(
          "  %s [%5lld, %5lld]: %s %.2f ms (%6.1f GFLOP/s), %s %.2f ms (%6.1f GFLOP/s): "
          "%.2fx\n",
          std::string(dtype_name(t)).c_str(), static_cast<long long>(N), static_cast<long long>(K),
          kernels::quant_matmul_kernel(t, T, path).c_str(), best_gemm, gf / best_gemm,
          kernels::quant_matmul_kernel(t, T, kernels::QuantPath::Scalar).c_str(), best_sgemm,
          gf / best_sgemm, best_sgemm / best_gemm);
    }
  }
}

int main(int argc, char** argv) {
  int threads = 1, reps = 20;
  int64_t tokens = 512;
  bool repack = false, gemm = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--threads" && i + 1 < argc) {
      threads = std::stoi(argv[++i]);
    } else if (a == "--reps" && i + 1 < argc) {
      reps = std::stoi(argv[++i]);
    } else if (a == "--repack") {
      repack = true;
    } else if (a == "--gemm") {
      gemm = true;
    } else if (a == "--tokens" && i + 1 < argc) {
      tokens = std::stoll(argv[++i]);
    } else {
      std::fprintf(
          stderr,
          "usage: bench_kquant [--threads N] [--reps R] [--repack | --gemm [--tokens T]]\n");
      return 2;
    }
  }
  ThreadPool pool(threads);
  ScopedPool scoped(pool);
  if (repack) {
    bench_repack(threads, reps);
    return 0;
  }
  if (gemm) {
    bench_gemm(threads, reps, tokens);
    return 0;
  }
  const int64_t N = 5632, K = 2048;
  std::vector<float> x(K), y(N);
  std::mt19937 rng(2);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (float& v : x) v = u(rng);
  const kernels::QuantPath path = kernels::quant_path();
  for (DType t : {DType::Q4_K, DType::Q5_K, DType::Q6_K}) {
    const Tensor w = random_weight(t, N, K);
    const double old_ms =
        best_ms(reps, [&] { kernels::quant_matmul_dequant(x.data(), 1, w, y.data()); });
    const double new_ms = best_ms(reps, [&] { kernels::quant_matmul(x.data(), 1, w, y.data()); });
    // T = 2 (batched decoding: the 2-token tile), the same token twice.
    std::vector<float> x2(x), y2(2 * N);
    x2.insert(x2.end(), x.begin(), x.end());
    const double two_ms =
        best_ms(reps, [&] { kernels::quant_matmul(x2.data(), 2, w, y2.data()); });
    std::printf("%s [%lld, %lld] T=1, %d thread(s): dequant-f32 %.3f ms, %s %.3f ms (%.2fx), "
                "%.2f GB/s of weights; T=2 %.3f ms per token\n",
                std::string(dtype_name(t)).c_str(), static_cast<long long>(N),
                static_cast<long long>(K), threads, old_ms,
                kernels::quant_matmul_kernel(t, 1, path).c_str(), new_ms, old_ms / new_ms,
                static_cast<double>(w.nbytes()) / new_ms / 1e6, two_ms / 2);
  }
  // For scale: Q4_0 (32-value blocks, integer kernel since before) on the same shape.
  {
    std::vector<float> wf(static_cast<size_t>(N * K));
    for (float& v : wf) v = u(rng);
    Tensor f = Tensor::empty(DType::F32, {N, K});
    std::memcpy(f.raw(), wf.data(), wf.size() * 4);
    const Tensor w = f.to(DType::Q4_0);
    const double ms = best_ms(reps, [&] { kernels::quant_matmul(x.data(), 1, w, y.data()); });
    std::printf("q4_0 [%lld, %lld] T=1, %d thread(s): %s %.3f ms, %.2f GB/s of weights\n",
                static_cast<long long>(N), static_cast<long long>(K), threads,
                kernels::quant_matmul_kernel(DType::Q4_0, 1, path).c_str(), ms,
                static_cast<double>(w.nbytes()) / ms / 1e6);
  }
  return 0;
}
