#!/usr/bin/env bash
# Where a training step's time goes, on the GPU host (build/device-run.sh's `profile` step runs it):
#   bash build/step-profile.sh                 TRAIN_ARGS='key=value ...' adds or overrides train keys
# The ncu method of shared/notes/step-profile.md: `ncu --clock-control none --metrics gpu__time_duration.sum --csv`
# over `flashattn train ... trainer.max_steps=2` and `=4`; per kernel name the difference divided by 2 is one step
# (start-up, the final evaluation and the checkpoint cancel out). A third run without ncu (PROFILE_WALL_STEPS, 100)
# gives the wall time per step from step 30 on (tiered JIT has settled; logging every 10 steps, as a training run does,
# so that the host is not made to wait for the GPU at every step). build/step_profile.py aggregates: kernel time, launches and
# wall time per step, the host gap, tokens/s and the top kernels; $OUT/step-profile.tsv, the ncu CSVs beside it.
# Defaults: the note's configuration, GPT-2 124M as experiment=owt/gpt2s-flash on the embedded corpus in bf16, dropout
# 0, without accumulation (train.global_batch_size = datamodule.batch_size = 16: one optimizer step per micro-batch);
# TRAIN_ARGS='model.config.dropout=0.1' profiles the seed's dropout.
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-/tmp/flashattn-out}
mkdir -p "$OUT"
app=${FLASHATTN_APP:-$root/.device/app}
ncu=${NCU:-$(command -v ncu || echo /usr/local/cuda/bin/ncu)}
runs=${PROFILE_RUNS_DIR:-/tmp/flashattn-profile}
wall_steps=${PROFILE_WALL_STEPS:-100}

# TRAIN_ARGS come last: a key given twice takes its last value
args=(experiment=owt/gpt2s-flash datamodule.dataset=kjv datamodule.sources=embedded:kjv datamodule.val_ratio=0.01
      trainer.precision=bf16 model.config.dropout=0 datamodule.batch_size=16 train.global_batch_size=16
      trainer.log_every_n_steps=10 trainer.progress_bar=false)
# shellcheck disable=SC2206 # word splitting of the overrides is intended
args+=(${TRAIN_ARGS:-})

train() {  # train <run name> <max_steps> [command prefix...]: one run in a fresh folder, its log in $OUT
  local name=$1 steps=$2; shift 2
  rm -rf "${runs:?}/$name"
  DATA_DIR=${DATA_DIR:-/tmp/flashattn-data} "$@" "$app/flashattn" train "${args[@]}" \
    trainer.default_root_dir="$runs/$name" trainer.max_steps="$steps" >"$OUT/profile-$name.log" 2>&1
}

# the wall-time run first: it also prepares the token cache the ncu runs then find. nvidia-smi samples the SM clock and
# the power meanwhile: ncu below times each kernel alone, on a GPU that is not drawing a training step's power.
nvidia-smi --query-gpu=clocks.sm,clocks.max.sm,power.draw --format=csv,noheader,nounits -lms 500 >"$OUT/profile-clocks.csv" 2>/dev/null &
smi=$!
train wall "$wall_steps" || { kill "$smi"; tail -20 "$OUT/profile-wall.log"; echo "step profile: the training run failed"; exit 1; }
kill "$smi"
python3 - "$OUT/profile-clocks.csv" <<'PYEOF'
import statistics, sys
rows = [[float(v) for v in line.split(",")] for line in open(sys.argv[1]) if line.count(",") == 2 and "N/A" not in line]
busy = [r for r in rows if r[2] > 200]  # watts: while it trains, not while it loads the data or the model
if busy:
    print(f"wall-time run: SM clock while training {statistics.median(r[0] for r in busy):.0f} MHz (median of {len(busy)} "
          f"samples; max {busy[0][1]:.0f}), power {statistics.median(r[2] for r in busy):.0f} W")
PYEOF
rm -f "$OUT/profile-clocks.csv"
metrics=$(ls "$runs"/wall/*/metrics.jsonl 2>/dev/null | head -1)
[ -n "$metrics" ] || { echo "step profile: no metrics.jsonl under $runs/wall"; exit 1; }
cp "$metrics" "$OUT/profile-metrics.jsonl"
for steps in 2 4; do
  train "ncu$steps" "$steps" "$ncu" --clock-control none --metrics gpu__time_duration.sum --csv --print-units base \
    --target-processes all --log-file "$OUT/profile-ncu$steps.csv" ||
    { tail -20 "$OUT/profile-ncu$steps.log"; echo "step profile: ncu over max_steps=$steps failed"; exit 1; }
done
# PROFILE_WALL_ENVS='DOTNET_gcServer=1 | DOTNET_GCgen0size=0x4000000': the wall-time run again under each |-separated
# environment setting (runtime knobs, no rebuild), one line each beside the first run's: wall time a step, tokens/s and
# the .NET collections a step.
if [ -n "${PROFILE_WALL_ENVS:-}" ]; then
  python3 "$root/build/step_profile.py" --wall "$OUT/profile-metrics.jsonl" "(as set)"
  IFS='|' read -ra wall_envs <<< "$PROFILE_WALL_ENVS"
  n=0
  for setting in "${wall_envs[@]}"; do
    n=$((n + 1))
    # shellcheck disable=SC2086 # the setting's words are separate variables
    if train "wall$n" "$wall_steps" env $setting; then
      python3 "$root/build/step_profile.py" --wall "$(ls "$runs/wall$n"/*/metrics.jsonl | head -1)" "$(echo $setting)"
    else
      echo "step profile: the wall-time run under '$setting' failed"
    fi
  done
fi
# PROFILE_HOST_STEPS=N: one more run of N steps under EventPipe's sample profiler (every managed thread's stack each
# millisecond; native frames show as the managed method that called into them): $OUT/host.nettrace.xz, read here with
# build/host_profile.py. A separate run, so that the wall time above is not measured under the profiler.
if [ -n "${PROFILE_HOST_STEPS:-}" ]; then
  rm -f "$OUT/host.nettrace" "$OUT/host.nettrace.xz"
  train host "$PROFILE_HOST_STEPS" env DOTNET_EnableEventPipe=1 DOTNET_EventPipeOutputPath="$OUT/host.nettrace" \
    DOTNET_EventPipeConfig='Microsoft-DotNETCore-SampleProfiler:0:5,Microsoft-Windows-DotNETRuntime:0x4c14fccbd:5' ||
    echo "step profile: the traced run failed"
  cp "$(ls "$runs"/host/*/metrics.jsonl | head -1)" "$OUT/host-metrics.jsonl" 2>/dev/null
  xz -T0 -6 "$OUT/host.nettrace" && ls -la "$OUT/host.nettrace.xz"
fi
# PROFILE_TRACE_STEPS=N: one more run of N steps under build/cuda_trace.cpp's CUPTI trace, read by build/cuda_trace.py
# from step PROFILE_TRACE_SKIP (20) on and printed here: the GPU's idle time a step, split into waiting for the host and
# its own launch latency with the next work already queued; where the host made it wait; every synchronisation and the
# CUDA calls by time spent in them; how far ahead of the GPU the host launches; the kernels' time in the run itself. A
# separate run, so that the wall time above is not measured under the trace, which adds about a microsecond of host time
# to every CUDA call: its "waiting for the host" is an upper bound.
# shellcheck source=build/cuda-trace-lib.sh
source "$root/build/cuda-trace-lib.sh"
if [ -n "${PROFILE_TRACE_STEPS:-}" ]; then
  if trace_lib=$(cuda_trace_lib); then
    rm -f /tmp/flashattn-cuda-trace.tsv
    train trace "$PROFILE_TRACE_STEPS" env CUDA_INJECTION64_PATH="$trace_lib" CUDA_TRACE_FILE=/tmp/flashattn-cuda-trace.tsv ||
      { tail -5 "$OUT/profile-trace.log"; echo "step profile: the traced run failed"; }
    python3 "$root/build/cuda_trace.py" /tmp/flashattn-cuda-trace.tsv --skip "${PROFILE_TRACE_SKIP:-20}"
  else
    echo "step profile: the trace library did not build"
  fi
fi
grep -m1 "^attention:" "$OUT/profile-wall.log"
python3 "$root/build/step_profile.py" "$OUT/profile-ncu2.csv" 2 "$OUT/profile-ncu4.csv" 4 "$OUT/profile-metrics.jsonl" \
  "$OUT/step-profile.tsv" 25
