#!/usr/bin/env bash
# One call on a GPU machine that runs every CUDA path and measures the GPU bars.
#
#   scripts/gpu_check.sh OUTDIR             # on the GPU machine: about 9 minutes, by its own guards
#   scripts/gpu_check.sh --dry-run OUTDIR   # the steps on this CPU: tiny model, data, budgets
#
# The dry run runs every step at toy scale but two: the cuda tests are collected and all skipped
# (no GPU), and bench_compile is not run; gpu_check.json gives each step a status (passed, failed
# or skipped) and says why one was skipped.
#
# Steps, each under `timeout`, each with its log:
#   inputs    imports, a CUDA device, the prepared experiment=gpu data: exits within seconds if not
#   matmul    the measured bf16 8192³ matmul ceiling, beside the 989 TFLOP/s datasheet peak
#   train     experiment=gpu de→en for its 6-minute budget (the cuda tests run beside it: they
#             are correctness checks, and the GPU has room for both)
#   cuda      pytest -m cuda (tests/test_cuda.py)
#   evaluate  the averaged checkpoint on test2016, beam 5 (sentences/s and cased BLEU)
#   bench     scripts/bench_train.py: ours vs torch.nn.Transformer, bf16, model=base and big,
#             then model=big under torch.compile: tokens/s, ratio, step time, memory, MFU
# OUTDIR receives gpu_check.json (every figure, torch/CUDA versions, GPU name), gpu_check.log (all
# step logs) and train.log; checkpoints and other bulk stay in a work folder under $TMPDIR.
#
# On the GPU machine (see the device notes): carry the checkout with data/cache (prepare the
# experiment=gpu cache on the CPU first) and the wheels (hydra-core, omegaconf, sacremoses, spaCy),
# install them with pip --target and put them and src/ on PYTHONPATH; PYTHON defaults to python3.
set -uo pipefail

dry=0
if [[ "${1:-}" == "--dry-run" ]]; then
  dry=1
  shift
fi
out="${1:?usage: scripts/gpu_check.sh [--dry-run] OUTDIR}"
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
steps="$work/steps.jsonl"
: > "$steps"
export PYTHONUNBUFFERED=1

record() {  # name rc seconds
  printf '{"step": "%s", "status": "%s", "rc": %d, "seconds": %d}\n' \
    "$1" "$([[ $2 == 0 ]] && echo passed || echo failed)" "$2" "$3" >> "$steps"
  echo "$(date +%T) $1: exit $2 after $3 s"
}

skip() {  # name reason: a step this call does not run, recorded as such
  printf '{"step": "%s", "status": "skipped", "reason": "%s"}\n' "$1" "$2" >> "$steps"
  echo "$(date +%T) $1: skipped ($2)"
}

step() {  # name limit-seconds command...: run with a time guard, log to $work/<name>.log
  local name=$1 limit=$2 started=$SECONDS rc
  shift 2
  timeout --kill-after=15 "$limit" "$@" > "$work/$name.log" 2>&1
  rc=$?
  record "$name" "$rc" $((SECONDS - started))
  return "$rc"
}

finish() {
  "$py" scripts/gpu_check.py report "$work" > "$work/report.log" 2>&1
  local rc=$?
  cp "$work/gpu_check.json" "$out/" 2>/dev/null
  for log in "$work"/*.log; do
    printf '\n===== %s =====\n' "$(basename "$log")"
    tail -c 200000 "$log"
  done > "$out/gpu_check.log"
  cp "$work/result/gpu-check/train.log" "$out/train.log" 2>/dev/null
  echo "$(date +%T) report: $out/gpu_check.json ($(tail -1 "$work/report.log"))"
  exit "$rc"
}

flag=()
[[ $dry == 1 ]] && flag=(--dry-run)
if ! step inputs 60 "$py" scripts/gpu_check.py inputs "$work" "${flag[@]}"; then
  cat "$work/inputs.log" >&2
  finish
fi
step matmul 60 "$py" scripts/gpu_check.py matmul "$work" "${flag[@]}"

run=(run_name=gpu-check "saved_dir=$work/saved" "result_dir=$work/result" trainer.progress=false)
if [[ $dry == 1 ]]; then
  "$py" scripts/gpu_check.py corpus "$work" > /dev/null
  c="$work/corpus"
  data=(data=custom data.src=en data.tgt=de "data.root=$work/data"
    "data.train=[$c/train.src,$c/train.tgt]" "data.valid=[$c/valid.src,$c/valid.tgt]"
    "data.test=[$c/test.src,$c/test.tgt]" data.vocab_size=40 data.max_tokens=400)
  train_args=(experiment=gpu model=tiny "${data[@]}" trainer.device=cpu trainer.max_time=0.25 trainer.max_epochs=1
    optim.warmup_steps=20 model.dropout=0.1 "${run[@]}")
  eval_split=test
  train_limit=120
  bench=(--device cpu --models tiny --max-tokens 256 --steps 2 --warmup 1 --no-amp)
else
  train_args=(experiment=gpu "${run[@]}")
  eval_split=test2016
  train_limit=420
  bench=(--device cuda --models base,big --max-tokens 16384 --steps 20 --warmup 3 --amp)
fi

# The cuda tests beside the training run (see the header); waited for before the benchmarks.
(
  started=$SECONDS
  timeout --kill-after=15 360 "$py" -m pytest -m cuda tests/test_cuda.py -q -rs \
    -p no:cacheprovider --junitxml="$work/cuda_tests.xml" > "$work/cuda.log" 2>&1
  record cuda $? $((SECONDS - started))
) &
tests=$!

step train "$train_limit" "$py" scripts/train.py "${train_args[@]}"
if [[ -f "$work/saved/gpu-check/averaged.pt" ]]; then
  checkpoint="$work/saved/gpu-check/averaged.pt"
else
  checkpoint="$work/saved/gpu-check/best.pt"
fi
step evaluate 90 "$py" scripts/evaluate.py "checkpoint=$checkpoint" "split=$eval_split" \
  decode=beam "result_dir=$work/result"
mkdir -p "$work/eval"
cp "$work"/result/gpu-check/eval/*.json "$work/eval/" 2>/dev/null
mkdir -p "$work/train"
cp "$work/result/gpu-check/metrics.csv" "$work/train/" 2>/dev/null
wait "$tests"

step bench_eager 120 "$py" scripts/bench_train.py "${bench[@]}" --json "$work/bench_eager.json"
if [[ $dry == 1 ]]; then
  skip bench_compile "inductor compiles for minutes on a CPU"
else
  step bench_compile 150 "$py" scripts/bench_train.py --device cuda --models big --max-tokens 16384 \
    --steps 20 --warmup 5 --amp --compile --json "$work/bench_compile.json"
fi
finish
