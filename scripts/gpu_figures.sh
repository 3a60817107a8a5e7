#!/usr/bin/env bash
# Reproduces the GPU figures quoted in docs/ on one CUDA GPU (H200 for the committed numbers).
# Usage, from the repository root:  scripts/gpu_figures.sh [OUTDIR] [STEP ...]
# Exits with 1 where a figure regressed against docs/results beyond its noise band (lit-xf bench compare).
# Steps (default: all): correctness tutorial causal packing train runs curves gputests fa4
# (fa4 needs flash-attn-4 installed: pip install -e ".[gpu,fa4]"; the other steps then use it via auto too)
set -uo pipefail
OUT=${1:-gpu_results}; shift || true
STEPS=${*:-correctness tutorial causal packing train runs curves gputests fa4}
PY=${PYTHON:-python3}
CLI="$PY -m lit_xf.cli"
BENCH="$PY -m lit_xf.bench"
mkdir -p "$OUT"
run() {  # run NAME CMD...: log to $OUT/NAME.log, print the command, its exit code and its last table
  local name=$1; shift
  echo "== $name: $*"
  local t0=$SECONDS
  timeout "${LIMIT:-300}" "$@" > "$OUT/$name.log" 2>&1
  echo "   rc=$? in $((SECONDS - t0)) s"
}
has() { [[ " $STEPS " == *" $1 "* ]]; }

has correctness && run correctness $BENCH correctness --dtypes fp16,bf16 --out "$OUT"
has correctness && run correctness_h6 $BENCH correctness --dtypes bf16 --heads 6 --kernels sdpa,xformers,flex --out "$OUT" --name correctness_h6
has tutorial && run tutorial $BENCH attention --seq-lens 512,1024,2048,4096,8192,16384 --out "$OUT" --name tutorial
if has causal; then
  for bm in 16:1024 4:4096 1:16384; do
    run "causal_${bm#*:}" $BENCH attention --heads 16 --head-dim 128 --dtype bf16 --causal --batch "${bm%:*}" \
      --seq-lens "${bm#*:}" --reps 20 --out "$OUT" --name "causal_${bm#*:}"
    run "causal_gqa_${bm#*:}" $BENCH attention --heads 16 --kv-heads 4 --head-dim 128 --dtype bf16 --causal \
      --batch "${bm%:*}" --seq-lens "${bm#*:}" --kernels sdpa,xformers,flex,auto --reps 20 --out "$OUT" \
      --name "causal_gqa_${bm#*:}"
  done
  run causal_alibi $BENCH attention --heads 16 --head-dim 128 --dtype bf16 --causal --batch 4 --seq-lens 4096 \
    --alibi --kernels sdpa,xformers,flex,auto --reps 20 --out "$OUT" --name causal_alibi
fi
if has packing; then
  P="packing --heads 16 --head-dim 128 --kernels sdpa,xformers,flex,auto --out $OUT"
  run pack_mha $BENCH $P --name pack_mha
  run pack_gqa $BENCH $P --kv-heads 4 --name pack_gqa
  run pack_alibi $BENCH $P --alibi --name pack_alibi
  run pack_alibi_gqa $BENCH $P --alibi --kv-heads 4 --name pack_alibi_gqa
fi
# GPT-2 shapes: timed after the first epoch's short last batch (it compiles once more); the plain
# loops (+rows) attend across documents like a hand-written nanoGPT loop.
# The 124M figures before docs' "32 rows per step" ran the config with 16 rows per step.
C124="--config configs/gpt2_124m.yaml --batch-size 16"
GPT2_VARIANTS=lit_xf,lit_xf+compile,loop+compile,loop+compile+fused,loop+rows+compile_model,loop+rows+compile
has train && run train_counting $BENCH train --config configs/counting.yaml --out "$OUT" --name train_counting \
  --repeats 5 --variants loop,loop+cudagraphs,lightning,lit_xf,lightning+cudagraphs,lit_xf+cudagraphs
# monitors on vs off, the same TensorBoard logger on both sides (docs/benchmarks.md §5)
has train && run monitors_overhead_counting_abba $BENCH train --config configs/counting.yaml --steps 400 \
  --warmup-steps 100 --repeats 10 --hook-us --variants lightning+cudagraphs+tb,lit_xf+cudagraphs --out "$OUT" \
  --name monitors_overhead_counting_abba
has train && run monitors_overhead_default_abba $BENCH train --config configs/default.yaml --steps 300 \
  --warmup-steps 100 --repeats 8 --hook-us --variants lightning+tb,lit_xf --out "$OUT" --name monitors_overhead_default_abba
has train && run monitors_each_counting_abba $BENCH train --config configs/counting.yaml --steps 400 --warmup-steps 100 \
  --repeats 6 --out "$OUT" --name monitors_each_counting_abba --variants lightning+cudagraphs+tb,lightning+cudagraphs+memory+tb,\
lightning+cudagraphs+timer+noprofile+tb,lightning+cudagraphs+throughput+tb,lit_xf+cudagraphs,lightning+cudagraphs
has train && run cuda_events_cost $PY scripts/cuda_events_cost.py "$OUT/cuda_events_between_launches.json"
has train && run train_gpt2 $BENCH train --config configs/gpt2_small.yaml --steps 270 --warmup-steps 75 --out "$OUT" \
  --name train_gpt2 --variants $GPT2_VARIANTS
has train && run train_gpt2_124m $BENCH train $C124 --steps 120 --warmup-steps 40 \
  --repeats 2 --profile-steps 30:34 --out "$OUT" --name train_gpt2_124m --variants $GPT2_VARIANTS
# 200 steps eager against compiled (loss curves) beside the plain loop
has train && run train_gpt2_124m_eager_vs_compiled_200 $BENCH train $C124 --steps 200 \
  --warmup-steps 50 --out "$OUT" --name train_gpt2_124m_eager_vs_compiled_200 \
  --variants lit_xf,lit_xf+compile,loop+rows+compile_model
if has runs; then
  for cfg in counting fortunes_padded fortunes_packed default; do
    extra=()
    [[ $cfg == counting ]] && extra=(--model.arch.attention xformers)
    run "fit_$cfg" $CLI fit --config "configs/$cfg.yaml" "${extra[@]}" --trainer.enable_progress_bar false \
      --trainer.logger.init_args.save_dir "$OUT/runs"
  done
fi
has curves && run curves $BENCH curves "$OUT"/runs/fortunes_padded/version_0 "$OUT"/runs/fortunes_packed/version_0 \
  --out "$OUT" --name padded_vs_packed
has gputests && run gputests $PY -m pytest -q -m gpu -p no:cacheprovider tests
if has fa4 && $PY -c "import lit_xf.attention as a, sys; sys.exit(a.fa4_problem() is not None)"; then
  run correctness_fa4 $BENCH correctness --dtypes fp16,bf16 --kernels fa4,xformers --out "$OUT" --name correctness_fa4
  run pack_fa4 $BENCH packing --heads 16 --head-dim 128 --kernels xformers,fa4,auto --out "$OUT" --name pack_fa4
  run pack_fa4_gqa $BENCH packing --heads 16 --kv-heads 4 --head-dim 128 --kernels xformers,fa4,auto --out "$OUT" \
    --name pack_fa4_gqa
  run causal_fa4 $BENCH attention --heads 16 --head-dim 128 --dtype bf16 --causal --batch 1 --seq-lens 16384 \
    --kernels sdpa,fa4,auto --reps 20 --out "$OUT" --name causal_fa4
  # short documents (gpt2_124m's BPE fortunes average 34 tokens): ~35k tokens in one packed row
  for dm in 2048:16 1024:32 512:64 256:128 128:256; do
    run "pack_short_docs_${dm#*:}" $BENCH packing --modes packed --max-len 2048 --heads 12 --head-dim 64 \
      --kernels fa4:grouped,fa4:per_document,fa4,flex,xformers --docs "${dm%:*}" --mean-len "${dm#*:}" --reps 20 \
      --out "$OUT" --name "pack_short_docs_${dm#*:}"
  done
  # sliding window (docs/attention.md): every kernel against float64 naive, then time per kernel
  run correctness_window $BENCH correctness --dtypes fp16,bf16 --kernels sdpa,xformers,flex,fa4 --window 16 \
    --out "$OUT" --name correctness_window
  run causal_window $BENCH attention --heads 16 --head-dim 128 --dtype bf16 --causal --batch 1 --seq-lens 16384 \
    --window 1024 --kernels sdpa,xformers,flex,fa4,auto --reps 20 --out "$OUT" --name causal_window
  run pack_window $BENCH packing --heads 16 --head-dim 128 --kernels xformers,flex,fa4,auto --window 256 \
    --out "$OUT" --name pack_window
  run causal_window_2048 $BENCH attention --heads 12 --head-dim 64 --dtype bf16 --causal --batch 16 --seq-lens 2048 \
    --window 256 --kernels sdpa,xformers,flex,fa4,auto --reps 20 --out "$OUT" --name causal_window_2048
  run pack_window_1024 $BENCH packing --modes packed --heads 16 --head-dim 128 --kernels xformers,flex,fa4,auto \
    --window 1024 --reps 20 --out "$OUT" --name pack_window_1024
  if has runs; then  # the 124M config with a 64-token window: fa4 (auto) and xformers
    for k in auto xformers; do
      run "fit_gpt2_124m_w64_$k" $CLI fit --config configs/gpt2_124m.yaml --trainer.max_steps 80 \
        --model.arch.attention_window 64 --model.arch.attention "$k" --trainer.enable_progress_bar false \
        --trainer.logger.init_args.save_dir "$OUT/runs" --trainer.logger.init_args.name "gpt2_124m_w64_$k"
    done
  fi
  run pack_fa4_plans $BENCH packing --modes packed --heads 16 --head-dim 128 \
    --kernels fa4,fa4:per_document,fa4:grouped,xformers --out "$OUT" --name pack_fa4_plans
  has train && run train_gpt2_124m_cudagraphs $BENCH train $C124 --steps 120 \
    --warmup-steps 40 --out "$OUT" --name train_gpt2_124m_cudagraphs --variants lit_xf+cudagraphs,loop+cudagraphs
  # the same job with the plan forced (auto takes block-sparse here), and the grouped plan to compare
  has train && run train_gpt2_124m_block_sparse $BENCH train $C124 --steps 120 \
    --warmup-steps 40 --repeats 2 --attention fa4:block_sparse --profile-steps 30:34 --out "$OUT" \
    --name train_gpt2_124m_block_sparse --variants lit_xf+compile,loop+compile+fused,loop+rows+compile_model
  has train && run train_gpt2_124m_grouped $BENCH train $C124 --steps 120 \
    --warmup-steps 40 --repeats 2 --attention fa4:grouped --out "$OUT" \
    --name train_gpt2_124m_grouped --variants lit_xf+compile,loop+rows+compile_model
  run fa4_block_sparse_plans $PY scripts/fa4_block_sparse_probe.py "$OUT/fa4_block_sparse_plans.json"
  run lm_head_loss $PY scripts/lm_head_loss_probe.py "$OUT/lm_head_loss.json"
  has train && run train_gpt2_124m_flex $BENCH train $C124 --steps 120 --warmup-steps 40 \
    --attention flex --out "$OUT" --name train_gpt2_124m_flex --variants lit_xf+compile,lit_xf+compile_model,loop+compile
  # concatenated rows (the plain loop's data): auto (fa4 here), sdpa forced; causal rows per call, GPU time alone
  has train && run train_gpt2_124m_concat_auto $BENCH train $C124 --batch-mode concat \
    --steps 120 --warmup-steps 40 --repeats 2 --profile-steps 30:34 --out "$OUT" --name train_gpt2_124m_concat_auto \
    --variants lit_xf+compile,loop+compile+fused,loop+rows+compile_model
  has train && run train_gpt2_124m_concat_sdpa $BENCH train $C124 --batch-mode concat \
    --attention sdpa --steps 120 --warmup-steps 40 --profile-steps 30:34 --out "$OUT" \
    --name train_gpt2_124m_concat_sdpa --variants lit_xf+compile,loop+rows+compile_model
  for c in 16:12:64:1024 16:16:128:1024 8:16:128:2048 16:12:64:2048 4:16:128:4096; do
    IFS=: read -r b h k t <<<"$c"
    run "causal_gpu_ms_${t}x${b}_h${h}k${k}" $BENCH attention --dtype bf16 --causal --kernels sdpa,fa4,auto \
      --batch "$b" --heads "$h" --head-dim "$k" --seq-lens "$t" --out "$OUT" --name "causal_gpu_ms_${t}x${b}_h${h}k${k}"
  done
  # levers measured and not adopted (docs/benchmarks.md): Inductor max-autotune; quack's fused GELU GEMMs
  # (quack-kernels comes with flash-attn-4 and must sit in a site-packages directory); CUDA graphs on concat rows
  T124="$C124 --steps 100 --warmup-steps 40 --profile-steps 30:34 --out $OUT"
  has train && TORCHINDUCTOR_MAX_AUTOTUNE=1 LIMIT=600 run train_gpt2_124m_max_autotune_on $BENCH train $T124 \
    --steps 120 --name train_gpt2_124m_max_autotune_on --variants lit_xf+compile,loop+rows+compile_model
  run gelu_mlp_quack $PY scripts/gelu_mlp_probe.py "$OUT/gelu_mlp_quack.json"
  for mode in packed concat; do
    att=(); [[ $mode == concat ]] && att=(--attention fa4)  # packed: the config's auto (fa4 here)
    has train && run "train_gpt2_124m_quack_mlp_$mode" $BENCH train $T124 --mlp-kernel quack \
      --batch-mode $mode "${att[@]}" --name "train_gpt2_124m_quack_mlp_$mode" --variants lit_xf+compile
    has train && run "train_gpt2_124m_torch_mlp_$mode" $BENCH train $T124 --batch-mode $mode "${att[@]}" \
      --name "train_gpt2_124m_torch_mlp_$mode" --variants lit_xf+compile,loop+rows+compile_model
  done
  has train && run train_gpt2_124m_quack_mlp_concat_cudagraphs $BENCH train $T124 --mlp-kernel quack \
    --batch-mode concat --attention fa4 --name train_gpt2_124m_quack_mlp_concat_cudagraphs --variants lit_xf+cudagraphs
  has train && run train_gpt2_124m_torch_mlp_concat_cudagraphs $BENCH train $T124 --batch-mode concat --attention fa4 \
    --name train_gpt2_124m_torch_mlp_concat_cudagraphs --variants lit_xf+cudagraphs,loop+rows+compile_model
  # mlp_kernel (docs/benchmarks.md, "quack's GELU MLP as an option"): separate processes on one machine;
  # GPU clocks and power sampled alongside
  nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,clocks_event_reasons.active \
    --format=csv,noheader -lms 250 >"$OUT/h200_clocks_power.csv" 2>&1 &
  SMI=$!
  T124="$C124 --steps 120 --warmup-steps 40 --profile-steps 30:34 --out $OUT"
  has train && run train_gpt2_124m_mlp_auto $BENCH train $T124 --mlp-kernel auto \
    --name train_gpt2_124m_mlp_auto --variants lit_xf+compile,loop+rows+compile_model
  has train && run train_gpt2_124m_mlp_torch $BENCH train $T124 --mlp-kernel torch \
    --name train_gpt2_124m_mlp_torch --variants lit_xf+compile
  has train && TORCHINDUCTOR_MAX_AUTOTUNE_GEMM=1 LIMIT=600 run train_gpt2_124m_max_autotune_gemm $BENCH train $T124 \
    --name train_gpt2_124m_max_autotune_gemm --variants lit_xf+compile
  has train && run train_gpt2_124m_quack_mlp_packed_cudagraphs $BENCH train $T124 --mlp-kernel quack \
    --name train_gpt2_124m_quack_mlp_packed_cudagraphs --variants lit_xf+cudagraphs,lit_xf+compile
  kill $SMI
  # the config as shipped, 32 rows per step (docs/benchmarks.md, "32 rows per step"), and a user's run of it
  has train && run train_gpt2_124m_b32 $BENCH train --config configs/gpt2_124m.yaml --steps 120 --warmup-steps 40 \
    --repeats 2 --profile-steps 30:34 --out "$OUT" --name train_gpt2_124m_b32 --variants lit_xf+compile,loop+rows+compile_model
  has runs && run fit_gpt2_124m $CLI fit --config configs/gpt2_124m.yaml --trainer.enable_progress_bar false \
    --trainer.logger.init_args.save_dir "$OUT/runs"
fi
# every figure of this rerun against the committed results: exit 1 where one regressed beyond its band
echo "== compare: $BENCH compare $OUT --against docs/results"
$BENCH compare "$OUT" --against docs/results
