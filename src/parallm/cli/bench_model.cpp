// parallm bench decode / bench prefill: model speed against the machine's own limits.
//  decode: tokens/s at batch 1 after a warm-up, weight bytes read per token, the memory read
//          bandwidth measured here with all threads, and the roofline ratio
//          (bytes per token x tokens/s) / bandwidth.
//  prefill: prompt tokens/s for a long prompt and the GFLOP/s reached, against OpenBLAS's own
//          sgemm GFLOP/s on f32 matrices of the same shapes.
#include <cblas.h>

#include <algorithm>
#include <cstdio>
#include <map>
#include <memory>
#include <vector>

#include "parallm/cli/command.h"
#include "parallm/cli/engine_flags.h"
#include "parallm/comm/stats.h"
#include "parallm/core/error.h"
#include "parallm/core/thread_pool.h"
#include "parallm/core/timer.h"
#include "parallm/engine/batch_generate.h"
#include "parallm/engine/generate.h"
#include "parallm/engine/stage_forward.h"
#include "parallm/kernels/cpu.h"
#include "parallm/kernels/matmul.h"
#include "parallm/model/weights.h"
#include "parallm/pipeline/simulator.h"
#include "parallm/plan/model_presets.h"

namespace parallm::cli {
namespace {

// "; matrices kept quantized: 135 q5_k, 21 q6_k" for a model file holding block-quantized matrices
// (the engine runs them as they are stored, whatever --dtype says), "" otherwise.
std::string quantized_matrices(const std::string& model) {
  ModelConfig c;
  const std::unique_ptr<WeightSource> src = open_model(model, &c);
  std::map<DType, int> n;
  for (const std::string& name : src->names()) {
    const DType t = src->info(name).dtype;
    if (is_block(t)) ++n[t];
  }
  std::string s;
  for (const auto& [t, k] : n) s += cat(s.empty() ? "" : ", ", k, " ", std::string(dtype_name(t)));
  return s.empty() ? s : "; matrices kept quantized: " + s;
}

struct DecodeOptions {
  EngineOptions engine;
  int tokens = 32, warmup = 4;
  int batch = 1, micro_batches = 0;
  double bandwidth_gbs = 0;  // 0: measure
};

// The machine's read bandwidth with every core: all ranks read the same number of bytes at once,
// each with its own threads (one process with all threads when there is one rank; under mpirun
// every process reads at the same time, as in decode). All the bytes are in when the slowest rank
// is done, so the machine's rate is ranks x the slowest rank's rate, not the sum of the rates (a
// rank that finishes early leaves the others the whole memory, and the sum would count that).
double machine_rate(const RankContext& ctx, double bytes_per_s) {
  float ns_per_byte = static_cast<float>(1e9 / bytes_per_s);
  ctx.world.all_reduce(&ns_per_byte, 1, comm::ReduceOp::Max);
  return ctx.world.size() * 1e9 / ns_per_byte;
}

constexpr int kProbeReads = 4;

// Batched / pipelined decode: B sequences through the pipeline for `tokens` steps.
void run_decode_batch(const DecodeOptions& o, RankContext& ctx) {
  std::vector<std::vector<int32_t>> prompts;
  for (int i = 0; i < o.batch; ++i)
    prompts.push_back({static_cast<int32_t>(ctx.config.bos_token_id),
                       static_cast<int32_t>((i * 131 + 7) % ctx.config.vocab_size)});
  BatchOptions bo;
  bo.max_tokens = 2;
  bo.ignore_eos = true;
  bo.micro_batches = o.micro_batches;
  bo.split_pp_hops = ctx.split_pp_hops;
  generate_batch(ctx.model, ctx.mesh, prompts, bo);  // warm-up
  bo.max_tokens = o.warmup + o.tokens + 1;
  ctx.mesh.tp().stats().reset();
  const comm::Group& moe = ctx.model.expert_group();  // --enable-expert-parallel: "ep_tp"
  const bool over_tp = ctx.model.experts_over_tp() && moe.size() > 1;
  if (over_tp) moe.stats().reset();
  ctx.world.barrier();  // every rank starts the timed run together
  BatchResult r = generate_batch(ctx.model, ctx.mesh, prompts, bo);
  // Decode starts when the prompt pass is done on its last stage (the latest end over ranks).
  float prefill_end = static_cast<float>(r.prefill_seconds);
  ctx.world.all_reduce(&prefill_end, 1, comm::ReduceOp::Max);
  const double decode_s = r.seconds - prefill_end;
  const int64_t steps = bo.max_tokens - 1;
  // (busy, wall, all-reduce time) of each rank in integer nanoseconds: busy and wall are one
  // clock's integers on one rank (BatchResult), so busy <= wall exactly and the bubble is in [0, 1].
  const int64_t mine[4] = {
      r.busy_ns, r.wall_ns,
      static_cast<int64_t>(ctx.mesh.tp().stats().get(comm::Kind::AllReduce).seconds * 1e9),
      over_tp ? static_cast<int64_t>(moe.stats().get(comm::Kind::AllReduce).seconds * 1e9) : 0};
  std::vector<int64_t> all(4 * ctx.world.size());
  ctx.world.all_gather(mine, all.data(), 4, DType::I64);
  // The compute roofline: every rank's multiply-add peak measured at once, summed. A step of B
  // sequences is 2 x active parameters x B FLOPs in the linear layers (attention scores add
  // 4 x layers x q_dim x context per sequence, under 1% at these lengths: not counted).
  ctx.world.barrier();
  float peak = static_cast<float>(kernels::measure_fma_peak(0.2));
  ctx.world.all_reduce(&peak, 1, comm::ReduceOp::Sum);
  if (!ctx.is_root()) return;
  const int P = ctx.mesh.pp_size(), M = r.micro_batches;
  double idle = 0, comm_s = 0, moe_s = 0;
  for (int s = 0; s < P; ++s) {
    const int64_t* v = &all[4 * ctx.mesh.global_rank(0, 0, s)];
    idle += v[1] > 0 ? 1.0 - static_cast<double>(v[0]) / static_cast<double>(v[1]) : 0.0;
    comm_s = std::max(comm_s, v[2] * 1e-9);
    moe_s = std::max(moe_s, v[3] * 1e-9);
  }
  std::printf(
      "bench decode: %s, tp %d x pp %d%s, batch %d in %d micro-batches, %d threads/rank%s\n",
      o.engine.model.c_str(), ctx.mesh.tp_size(), P,
      over_tp ? " (experts over tp: --enable-expert-parallel)" : "", o.batch, M,
      ThreadPool::current().size(), quantized_matrices(o.engine.model).c_str());
  std::printf("  tokens/s            %10.2f   (%d sequences x %lld steps)\n",
              o.batch * steps / decode_s, o.batch, static_cast<long long>(steps));
  std::printf("  ms/step (latency)   %10.2f\n", 1e3 * decode_s / steps);
  const double gflops =
      2.0 * plan::active_params_per_token(ctx.config) * o.batch * steps / decode_s / 1e9;
  std::printf("  GFLOP/s (linear)    %10.2f   (2 x %.3g active parameters x %d sequences per step)\n",
              gflops, plan::active_params_per_token(ctx.config), o.batch);
  std::printf("  FMA peak            %10.2f   GFLOP/s, all ranks, measured here: %.2f of it in use\n",
              peak / 1e9, gflops * 1e9 / peak);
  std::printf("  tp all-reduce time  %10.2f ms/step (%.1f%% of the run)\n",
              1e3 * comm_s / (steps + 1), 100.0 * comm_s / r.seconds);
  if (over_tp)
    std::printf("  moe all-reduce time %10.2f ms/step (%.1f%% of the run; group ep_tp)\n",
                1e3 * moe_s / (steps + 1), 100.0 * moe_s / r.seconds);
  std::printf("  bubble (measured)   %10.3f   (GPipe pass formula (p-1)/(m+p-1) = %.3f)\n",
              idle / P, pipeline::bubble_formula(pipeline::ScheduleKind::GPipe, P, M));
}

int run_decode(const DecodeOptions& o) {
  if (o.tokens < 1 || o.warmup < 0) fail("bench", "--tokens must be >= 1 and --warmup >= 0");
  if (o.batch < 1) fail("bench", "--batch must be >= 1, got ", o.batch);
  run_model(o.engine, [&](RankContext& ctx) {
    if (o.batch > 1 || ctx.mesh.pp_size() > 1 || o.micro_batches > 0)
      return run_decode_batch(o, ctx);
    // The roofline is measured beside every step, not once: on a shared machine the memory
    // bandwidth drifts by tens of percent from second to second. After each step every rank reads
    // a 256 MiB buffer at once, kProbeReads times (the read pattern that was fastest at start; the
    // best of the reads counts), and step i is judged against the mean of the probes just before
    // and just after it. The probes are not timed. The ratio against the best read at start (the
    // best of 27, at another moment) is printed beside it.
    std::unique_ptr<kernels::BandwidthProbe> probe;
    double start_bw = o.bandwidth_gbs * 1e9;
    if (o.bandwidth_gbs <= 0) {
      ctx.world.barrier();
      probe = std::make_unique<kernels::BandwidthProbe>(size_t{256} << 20, 3);
      start_bw = machine_rate(ctx, probe->best());
    }
    auto bandwidth_now = [&]() -> double {
      if (!probe) return start_bw;
      ctx.world.barrier();
      return machine_rate(ctx, probe->measure(kProbeReads));
    };
    float bytes = static_cast<float>(ctx.model.decode_bytes_per_token());
    // The whole model's bytes per token, as every rank reads them (EP ranks replicate attention).
    ctx.mesh.tp_ep().all_reduce(&bytes, 1, comm::ReduceOp::Sum);
    const comm::Group& ep = ctx.mesh.ep();
    // --enable-expert-parallel: the MoE all-reduce over the TP ranks' own group "ep_tp".
    const comm::Group& moe = ctx.model.expert_group();
    const bool over_tp = ctx.model.experts_over_tp() && moe.size() > 1;
    double ep_s = 0, ep_at_start = 0;  // the EP exchange: all-to-alls and the all-gather
    auto ep_seconds = [&] {
      if (over_tp) return moe.stats().get(comm::Kind::AllReduce).seconds;
      return ep.stats().get(comm::Kind::AllToAll).seconds +
             ep.stats().get(comm::Kind::AllGather).seconds;
    };
    std::vector<double> step_s, step_bw;                // timed steps only
    double step_start = 0, bw_before = 0, comm_s = 0;
    uint64_t reduces = 0, reduces_at_start = 0;
    double comm_at_start = 0;
    int calls = 0;
    GenerateOptions go;
    go.max_tokens = o.warmup + o.tokens + 1;
    go.ignore_eos = true;
    ctx.mesh.tp_ep().barrier();
    // on_token runs on every rank after each step; the first call follows the prefill.
    generate(ctx.model, ctx.tp, ctx.mesh.tp_ep(), {static_cast<int32_t>(ctx.config.bos_token_id)},
             go, [&](int32_t) {
      const double end = now_seconds();
      const bool timed = calls > o.warmup;
      if (timed) {
        step_s.push_back(end - step_start);
        reduces += ctx.tp.stats().count(comm::Kind::AllReduce) - reduces_at_start;
        comm_s += ctx.tp.stats().get(comm::Kind::AllReduce).seconds - comm_at_start;
        ep_s += ep_seconds() - ep_at_start;
      }
      const double bw = bandwidth_now();
      if (timed) step_bw.push_back((bw_before + bw) / 2);
      bw_before = bw;
      ++calls;
      reduces_at_start = ctx.tp.stats().count(comm::Kind::AllReduce);
      comm_at_start = ctx.tp.stats().get(comm::Kind::AllReduce).seconds;
      ep_at_start = ep_seconds();
      step_start = now_seconds();
    });
    double secs = 0, could_read = 0;
    std::vector<double> ratios;
    for (size_t i = 0; i < step_s.size(); ++i) {
      secs += step_s[i];
      could_read += step_s[i] * step_bw[i];
      ratios.push_back(bytes / step_s[i] / step_bw[i]);
    }
    std::sort(ratios.begin(), ratios.end());
    const double tps = o.tokens / secs;
    const double bw = could_read / secs;  // time-weighted mean of the probes
    if (!ctx.is_root()) return;
    std::printf("bench decode: %s, tp %d%s, %d threads/rank, dtype %s%s, simd %s\n",
                o.engine.model.c_str(), ctx.tp.size(),
                ep.size() > 1 ? cat(", ep ", ep.size()).c_str()
                : over_tp     ? " (experts over tp: --enable-expert-parallel)"
                              : "",
                ThreadPool::current().size(),
                std::string(dtype_name(resolve_weight_dtype(o.engine.dtype, ctx.config))).c_str(),
                quantized_matrices(o.engine.model).c_str(),
                kernels::simd_name(kernels::simd_level()).c_str());
    std::printf("  tokens/s            %10.2f   (%d tokens after %d warm-up)\n", tps, o.tokens,
                o.warmup);
    std::printf("  ms/token            %10.2f\n", 1e3 / tps);
    std::printf("  weight bytes/token  %10.1f MB\n", bytes / 1e6);
    std::printf("  achieved            %10.2f GB/s\n", bytes * tps / 1e9);
    if (probe)
      std::printf(
          "  read bandwidth      %10.2f GB/s (measured beside each step, all threads; %.2f at "
          "start)\n",
          bw / 1e9, start_bw / 1e9);
    else
      std::printf("  read bandwidth      %10.2f GB/s (given)\n", bw / 1e9);
    std::printf(
        "  roofline ratio      %10.3f   (bytes read / bytes the memory could deliver in the "
        "same time; per step: median %.3f, min %.3f, max %.3f)\n",
        bytes * o.tokens / could_read, ratios[ratios.size() / 2], ratios.front(), ratios.back());
    if (probe)
      std::printf(
          "  against the start   %10.3f   (the same bytes/s against the best read at start)\n",
          bytes * tps / start_bw);
    if (ctx.tp.size() > 1)
      std::printf(
          "  tp all-reduce       %10.3f ms/token (%.1f%% of decode), %.1f us each, %.1f per "
          "token\n",
          1e3 * comm_s / o.tokens, 100.0 * comm_s / secs,
          1e6 * comm_s / std::max<uint64_t>(reduces, 1), static_cast<double>(reduces) / o.tokens);
    if (over_tp)
      std::printf("  moe all-reduce      %10.3f ms/token (%.1f%% of decode; rank 0's, group "
                  "ep_tp)\n",
                  1e3 * ep_s / o.tokens, 100.0 * ep_s / secs);
    if (ep.size() > 1)
      std::printf("  ep all-to-all       %10.3f ms/token (%.1f%% of decode; rank 0's, with the "
                  "all-gather of outputs)\n",
                  1e3 * ep_s / o.tokens, 100.0 * ep_s / secs);
  });
  return 0;
}

struct PrefillOptions {
  EngineOptions engine;
  int prompt_len = 512;
};

// OpenBLAS's own multi-threaded sgemm on f32 matrices of the model's shapes: y[T,N] = x[T,K] W^T.
double openblas_gflops(const ModelConfig& c, int64_t T) {
  const int64_t H = c.hidden_size;
  const std::vector<std::pair<int64_t, int64_t>> shapes = {{c.q_dim() + 2 * c.kv_dim(), H},
                                                           {H, c.q_dim()},
                                                           {2 * c.intermediate_size, H},
                                                           {H, c.intermediate_size}};
  openblas_set_num_threads(ThreadPool::hardware_threads());
  double flops = 0, secs = 0;
  for (auto [N, K] : shapes) {
    std::vector<float> x(T * K, 0.01f), w(N * K, 0.02f), y(T * N);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, N, K, 1.0f, x.data(), K, w.data(), K,
                0.0f, y.data(), N);
    Timer t;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, N, K, 1.0f, x.data(), K, w.data(), K,
                0.0f, y.data(), N);
    secs += t.seconds();
    flops += 2.0 * T * N * K;
  }
  openblas_set_num_threads(1);
  return flops / secs / 1e9;
}

int run_prefill(const PrefillOptions& o) {
  if (o.prompt_len < 1) fail("bench", "--prompt-len must be >= 1, got ", o.prompt_len);
  run_model(o.engine, [&](RankContext& ctx) {
    const ModelConfig& c = ctx.config;
    if (o.prompt_len > c.max_position_embeddings)
      fail("bench", "--prompt-len ", o.prompt_len, " exceeds max_position_embeddings ",
           c.max_position_embeddings);
    std::vector<int32_t> ids(o.prompt_len);
    for (int i = 0; i < o.prompt_len; ++i)
      ids[i] = static_cast<int32_t>((i * 7919 + 3) % c.vocab_size);
    double secs = 0;
    if (ctx.mesh.pp_size() > 1) {
      // Through the stages: the engine's own prompt pass (one micro-batch, the activations sent
      // stage to stage), timed until the last stage has it, the latest end over ranks.
      BatchOptions bo;
      bo.max_tokens = 1;
      bo.ignore_eos = true;
      bo.micro_batches = 1;
      bo.split_pp_hops = ctx.split_pp_hops;
      generate_batch(ctx.model, ctx.mesh, {ids}, bo);  // warm-up
      ctx.world.barrier();
      const BatchResult r = generate_batch(ctx.model, ctx.mesh, {ids}, bo);
      float end = static_cast<float>(r.prefill_seconds);
      ctx.world.all_reduce(&end, 1, comm::ReduceOp::Max);
      secs = end;
    } else {
      StageForward fwd(ctx.model, 1, o.prompt_len, o.prompt_len);
      std::vector<float> x(static_cast<size_t>(o.prompt_len) * c.hidden_size);
      std::vector<float> logits(ctx.model.vocab_shard().size());
      auto once = [&] {
        fwd.embed(ids.data(), o.prompt_len, x.data());
        fwd.layers(x.data(), {SeqChunk{0, 0, o.prompt_len}});
        fwd.head(x.data() + (o.prompt_len - 1) * c.hidden_size, 1, logits.data());
      };
      once();  // warm-up
      ctx.tp.barrier();
      Timer t;
      once();
      ctx.tp.barrier();
      secs = t.seconds();
    }
    if (!ctx.is_root()) return;
    // FLOPs: 2 per weight per token in the layers, attention's QK^T and PV over the causal
    // triangle, and the LM head for the last token.
    const double T = o.prompt_len, H = c.hidden_size;
    const double layer_w =
        H * (c.q_dim() + 2 * c.kv_dim()) + c.q_dim() * H + 3 * H * c.intermediate_size;
    const double attn = 2.0 * 2.0 * c.q_dim() * T * (T + 1) / 2;
    const double flops = c.num_hidden_layers * (2 * T * layer_w + attn) + 2 * H * c.vocab_size;
    const double ours = flops / secs / 1e9;
    const double blas = openblas_gflops(c, o.prompt_len);
    std::printf("bench prefill: %s, tp %d x pp %d, %d threads/rank, prompt %d tokens%s\n",
                o.engine.model.c_str(), ctx.tp.size(), ctx.mesh.pp_size(),
                ThreadPool::current().size(), o.prompt_len,
                quantized_matrices(o.engine.model).c_str());
    std::printf("  prompt tokens/s     %10.1f\n", T / secs);
    std::printf("  ms/prompt           %10.2f\n", 1e3 * secs);
    std::printf("  GFLOP/s             %10.1f\n", ours);
    std::printf("  OpenBLAS sgemm      %10.1f GFLOP/s (f32, same shapes, all threads)\n", blas);
    std::printf("  ratio               %10.3f\n", ours / blas);
    // Which prefill kernels this CPU runs (kernels/matmul.h, kernels/quant_matmul.h).
    std::printf("  kernels             simd %s; bf16 %s; q8_0/q4_0 %s; q4_k/q5_k %s; q6_k %s\n",
                kernels::simd_name(kernels::simd_level()).c_str(),
                kernels::matmul_kernel(DType::BF16, o.prompt_len, 2).c_str(),
                kernels::matmul_kernel(DType::Q8_0, o.prompt_len, 32).c_str(),
                kernels::matmul_kernel(DType::Q4_K, o.prompt_len, 256).c_str(),
                kernels::matmul_kernel(DType::Q6_K, o.prompt_len, 256).c_str());
  });
  return 0;
}

[[maybe_unused]] const bool decode_registered = register_command(
    {"bench decode", "Decode tokens/s at batch 1 against the memory-bandwidth roofline",
     [](CLI::App& app) {
       auto o = std::make_shared<DecodeOptions>();
       add_engine_flags(app, o->engine);
       app.add_option("--ep", o->engine.ep,
                      "Expert-parallel ranks per TP rank (mixture-of-experts models; batch 1)")
           ->check(CLI::PositiveNumber);
       app.add_flag("--enable-expert-parallel", o->engine.enable_expert_parallel,
                    "Mixture of experts, vLLM's layout: whole experts placed over the --tp ranks "
                    "(attention and LM head TP-split; docs/moe.md)");
       app.add_option("--tokens", o->tokens, "Timed decode steps (default 32)");
       app.add_option("--warmup", o->warmup, "Untimed decode steps first (default 4)");
       app.add_option("--batch", o->batch, "Sequences decoded together (default 1)");
       app.add_option("--micro-batches", o->micro_batches, "Micro-batches (default: --pp)");
       app.add_option("--bandwidth", o->bandwidth_gbs,
                      "Use this read bandwidth (GB/s) instead of measuring");
       return [o] { return run_decode(*o); };
     }});

[[maybe_unused]] const bool prefill_registered = register_command(
    {"bench prefill", "Prompt tokens/s and GFLOP/s against OpenBLAS sgemm", [](CLI::App& app) {
       auto o = std::make_shared<PrefillOptions>();
       add_engine_flags(app, o->engine);
       app.add_option("--prompt-len", o->prompt_len, "Prompt tokens (default 512)");
       return [o] { return run_prefill(*o); };
     }});

}  // namespace
}  // namespace parallm::cli
