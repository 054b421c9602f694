#!/usr/bin/env bash
# On the GPU host (the device tool, after build/device-prepare.sh here):
#   bash build/device-run.sh [tests] [onestage] [variants] [package] [train] [profile] [ops] [attnpeer] [attnncu]
#   [attnsrc] [bench]
#   [bench-old] [memory] [peermemory] [peers] [sanitize] [losscurve]   (default: tests bench)
#   BENCH_FILTER='*Rotary*' and TEST_FILTER='FullyQualifiedName~Rotary' narrow the runs;
#   bench-old (after `PREPARE_OLD=<commit> build/device-prepare.sh`) runs the same BENCH_FILTER through that commit's
#   benchmarks on its own libflashattn: with bench, before and after in one call (bench-old.tsv beside bench.tsv, and
#   the median times side by side at the end), e.g. BENCH_FILTER='*GptBenchmarks*' ... bench bench-old;
#   FLASHATTN_CUDA_ARCHS=90a builds for the H100 alone (half the compile time of the shipped 80;90a).
# Builds the CUDA flavour of libflashattn, runs every test (category Cuda included) with libtorch
# from the host's PyTorch, the BenchmarkDotNet suite, and optionally the PyTorch peers and
# compute-sanitizer; full logs go to $OUT, a short summary is printed last.
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
OUT=${OUT:-/tmp/flashattn-out}
mkdir -p "$OUT"
steps=${*:-tests bench}
want() { [[ " $steps " == *" $1 "* ]]; }
summary=()

gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)
echo "# $(date -u +%F) GPU: $gpu; nvcc: $(nvcc --version | tail -1)" | tee "$OUT/env.txt"

# Always passed: CMake caches the setting, and a warm machine's build folder would keep the last call's.
archs=${FLASHATTN_CUDA_ARCHS:-80;90a}
start=$SECONDS
if FLASHATTN_CUDA=ON FLASHATTN_NATIVE_BUILD_DIR=/tmp/flashattn-native FLASHATTN_NATIVE_OUT=/tmp/flashattn-lib \
     build/native.sh "-DFLASHATTN_CUDA_ARCHS=$archs" >"$OUT/native-build.log" 2>&1; then
  summary+=("native CUDA build: ok ($((SECONDS - start)) s)")
else
  tail -30 "$OUT/native-build.log"; echo "native CUDA build FAILED"; exit 1
fi
grep -E "spill|error" "$OUT/native-build.log" | grep -v " 0 bytes spill" | head -5

export FLASHATTN_NATIVE_PATH=/tmp/flashattn-lib/libflashattn.so
FLASHATTN_TORCH_LIB=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export FLASHATTN_TORCH_LIB LD_LIBRARY_PATH=$FLASHATTN_TORCH_LIB:${LD_LIBRARY_PATH:-}
export TESTINGPLATFORM_TELEMETRY_OPTOUT=1 DOTNET_CLI_TELEMETRY_OPTOUT=1
# A .NET process that dies of a signal (a segmentation fault in native code: one `flashattn train` in run H35, not
# reproduced since) leaves .NET's crash report, every thread's native and managed frames, as
# /tmp/flashattn-crash/dump-<pid>.crashreport.json; the reports come back in $OUT, the (large) dumps stay here.
crash=/tmp/flashattn-crash
mkdir -p "$crash"
export DOTNET_DbgEnableMiniDump=1 DOTNET_DbgMiniDumpType=1 DOTNET_EnableCrashReport=1 DOTNET_DbgMiniDumpName=$crash/dump-%p
# Unpacked inside the checkout: the bindings tests find the header by walking up to global.json.
app=$root/.device/app
rm -rf "$app" && tar -C "$root/.device" -xJf .device/app.tar.xz

# The libflashattn of the commit build/device-prepare.sh was given as PREPARE_OLD (.device/app-old's: the ABI moved since),
# built from .device/old-src.tar.xz once per call for the steps that run that commit (losscurve, bench-old); its tree
# stays in /tmp/flashattn-old-src, where they run (its CLI reads configs/experiment from the working directory).
old_lib=/tmp/flashattn-lib-old/libflashattn.so
old_ready=""
old_native() {
  [ -n "$old_ready" ] && return 0
  old_why="no .device/app-old (build/device-prepare.sh with PREPARE_OLD=<commit>)"
  [ -d .device/app-old ] && [ -f .device/old-src.tar.xz ] || return 1
  rm -rf /tmp/flashattn-old-src && mkdir -p /tmp/flashattn-old-src && tar -C /tmp/flashattn-old-src -xJf .device/old-src.tar.xz
  old_why="its native build FAILED (old-native-build.log)"
  FLASHATTN_CUDA=ON FLASHATTN_NATIVE_BUILD_DIR=/tmp/flashattn-native-old FLASHATTN_NATIVE_OUT="$(dirname "$old_lib")" \
    /tmp/flashattn-old-src/build/native.sh "-DFLASHATTN_CUDA_ARCHS=$archs" >"$OUT/old-native-build.log" 2>&1 || return 1
  rm -f "$OUT/old-native-build.log" # kept when it failed: a call brings back 8 files at most
  old_ready=1
}

# again_under <settings> <name> <stderr file, or - for the tsv> <command...>: the command again under each |-separated
# environment setting (OPS_ENVS, ATTNPEER_ENVS: runtime switches, no rebuild), stdout to $OUT/<name>-<n>.tsv.
again_under() {
  local settings=$1 name=$2 err=$3 n=0 setting rc list
  shift 3
  [ -n "$settings" ] || return 0
  IFS='|' read -ra list <<< "$settings"
  for setting in "${list[@]}"; do
    n=$((n + 1))
    # shellcheck disable=SC2086 # the setting's words are separate variables
    if [ "$err" = - ]; then env $setting "$@" >"$OUT/$name-$n.tsv" 2>&1; else env $setting "$@" >"$OUT/$name-$n.tsv" 2>>"$err"; fi
    rc=$?
    summary+=("$(basename "$1") under '$(echo $setting)': rc $rc ($name-$n.tsv)")
  done
}

if want tests; then
  start=$SECONDS
  "$app"/FlashAttn.Tests ${TEST_FILTER:+--filter "$TEST_FILTER"} >"$OUT/tests.log" 2>&1
  rc=$?
  # each failure with its message (the lines up to the stack trace), printed again at the end
  grep -A4 "^failed " "$OUT/tests.log" | grep -v "^    at \|^--$" | head -60 > "$OUT/failures.txt"
  counts=$(grep -A5 "Test run summary" "$OUT/tests.log" | tr -s ' \n' ' ')
  summary+=("tests (rc $rc, $((SECONDS - start)) s): $counts")
fi

if want onestage; then
  # The attention tests again with the backward held to one Q/dO stage: the A100's path at d64, d128
  # and d192+, which an H100 (two stages fit at every head dim) never takes otherwise.
  start=$SECONDS
  FLASHATTN_BWD_MAX_STAGES=1 "$app"/FlashAttn.Tests --filter \
    "FullyQualifiedName~FlashAttentionCudaTests&(Name~_d64_|Name~_d128_|Name~_d192_|Name~_d256_|Name~Dropout|Name~Deterministic)" \
    >"$OUT/onestage.log" 2>&1
  rc=$?
  grep -A4 "^failed " "$OUT/onestage.log" | grep -v "^    at \|^--$" | head -30 >> "$OUT/failures.txt"
  summary+=("one-stage backward tests (rc $rc, $((SECONDS - start)) s): $(grep -A5 "Test run summary" "$OUT/onestage.log" | tr -s ' \n' ' ')")
fi

if want variants; then
  # The norm tests again under each kernel variant the launchers' tables may not pick (FLASHATTN_NORM_VARIANT forces
  # one for every size; ops_bench times them).
  start=$SECONDS
  rc=0
  variants=$(/tmp/flashattn-native/FlashAttn.Native/ops_bench --variants) || variants=""
  [ -n "$variants" ] || { rc=1; echo "[norm variants] ops_bench --variants listed none" >> "$OUT/failures.txt"; }
  for v in $variants; do
    FLASHATTN_NORM_VARIANT=$v "$app"/FlashAttn.Tests --filter "FullyQualifiedName~NormCudaTests" >"$OUT/variant-norm-$v.log" 2>&1 || rc=$?
    grep -A4 "^failed " "$OUT/variant-norm-$v.log" | grep -v "^    at \|^--$" | sed "s/^/[norm $v] /" | head -20 >> "$OUT/failures.txt"
  done
  # the cross-entropy tests with the training loss's forward + backward as two kernels, which the default's one leaves out
  FLASHATTN_CE_FUSED=0 "$app"/FlashAttn.Tests --filter "FullyQualifiedName~CrossEntropyCudaTests" >"$OUT/variant-ce-two.log" 2>&1 || rc=$?
  grep -A4 "^failed " "$OUT/variant-ce-two.log" | grep -v "^    at \|^--$" | sed "s/^/[ce two kernels] /" | head -20 >> "$OUT/failures.txt"
  summary+=("norm tests under every variant, cross-entropy with two kernels (rc $rc, $((SECONDS - start)) s): $(grep -h "failed:" "$OUT"/variant-*.log | tr -s ' \n' ' ')")
fi

if want sanitize; then
  # memcheck (every launch checked for bad accesses) over the rotary Cuda tests at s97: a few seconds; other ops
  # need their own filter here (memcheck instruments every memory access: keep the cases small).
  compute-sanitizer --tool memcheck --error-exitcode 9 "$app"/FlashAttn.Tests \
    --filter "FullyQualifiedName~RotaryCudaTests&Name~s97" >"$OUT/sanitize.log" 2>&1
  summary+=("compute-sanitizer memcheck: rc $? ($(grep -c 'Invalid' "$OUT/sanitize.log") invalid accesses)")
fi

if want package; then
  # The nupkg packed here with the CUDA build swapped in (what `dotnet pack` packs when handed one),
  # its library extracted into the published consumer as a restore would, then the consumer run.
  nupkg=$(ls .device/FlashAttn.TorchSharp.*.nupkg)
  python3 - "$nupkg" /tmp/flashattn-lib/libflashattn.so /tmp/FlashAttn.TorchSharp.cuda.nupkg "$root/.device/consumer" \
    >"$OUT/package.log" 2>&1 <<'PYEOF'
import sys, zipfile
src, lib, dst, consumer = sys.argv[1:]
entry = "runtimes/linux-x64/native/libflashattn.so"
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
    for item in zin.infolist():
        zout.writestr(item, open(lib, "rb").read() if item.filename == entry else zin.read(item.filename))
with zipfile.ZipFile(dst) as z:
    names = z.namelist()
    print("nupkg entries:", ", ".join(n for n in names if not n.startswith(("_rels/", "package/", "[Content"))))
    assert entry in names, entry
    open(consumer + "/libflashattn.so", "wb").write(z.read(entry))
PYEOF
  packed=$(cuobjdump --list-elf /tmp/flashattn-lib/libflashattn.so | grep -o 'sm_[0-9]*a\?' | sort -u | tr '\n' ' ')
  echo "architectures in the packed library: $packed" >>"$OUT/package.log"
  env -u FLASHATTN_NATIVE_PATH "$root/.device/consumer/PackageCheck" >>"$OUT/package.log" 2>&1
  rc=$?
  # the shipped package holds both; a build narrowed by FLASHATTN_CUDA_ARCHS does not count as the package check
  [[ "$packed" == *"sm_80 "* && "$packed" == *"sm_90a "* ]] || { rc=9; echo "package check: sm_80 and sm_90a expected, got: $packed" >>"$OUT/package.log"; }
  summary+=("package check: rc $rc (architectures $packed)")
fi

if want train; then
  # The seed's experiment with every fusion on, on a corpus prepared there (the embedded one: no
  # OpenWebText on the device); TRAIN_ARGS adds or overrides keys (experiment=owt/gpt2m-flash picks another size: the
  # last value of a key wins). Several runs in one call: TRAIN_ARGS='set 1 | set 2' trains once per |-separated set, in
  # order, each logged to train-N.log and metrics-N.jsonl. Each run starts from an empty runs folder (a machine still
  # warm from an earlier call holds that call's runs), as each call measures a fresh run. Each run stops after
  # TRAIN_MAX_STEPS steps (100 unless set; a trainer.max_steps in the set wins): the experiments' own 400,000 would
  # run until the call's limit and return nothing (run H54).
  IFS='|' read -ra train_sets <<< "${TRAIN_ARGS:-}"
  [ ${#train_sets[@]} -gt 0 ] || train_sets=("")
  for i in "${!train_sets[@]}"; do
    tag=""; [ ${#train_sets[@]} -gt 1 ] && tag="-$((i + 1))"
    rm -rf /tmp/flashattn-runs
    # shellcheck disable=SC2086 # word splitting of the overrides is intended
    DATA_DIR=/tmp/flashattn-data "$app"/flashattn train experiment=owt/gpt2s-flash datamodule.dataset=kjv \
      datamodule.sources=embedded:kjv datamodule.val_ratio=0.01 trainer.default_root_dir=/tmp/flashattn-runs \
      trainer.max_steps="${TRAIN_MAX_STEPS:-100}" ${train_sets[$i]} >"$OUT/train$tag.log" 2>&1
    summary+=("train$tag: rc $? (${train_sets[$i]:-the experiment}): $(grep -h '^done:' "$OUT/train$tag.log" | cut -d';' -f1)")
    cp /tmp/flashattn-runs/*/metrics.jsonl "$OUT/metrics$tag.jsonl" 2>/dev/null
  done
fi

if want losscurve; then
  # The loss curve of issue 16's check, "training unchanged": GPT-2 124M (owt/gpt2s-flash, bf16, dropout 0, 8
  # micro-batches of 16 a step, warm-up 20 steps of the 200) on the embedded corpus, trained by this checkout's CLI and by
  # the CLI of the commit build/device-prepare.sh was given as PREPARE_OLD (.device/app-old, with that commit's own
  # libflashattn built here from .device/old-src.tar.xz: the ABI moved since), same arguments, same seed:
  # $OUT/curve-new.jsonl and curve-old.jsonl, drawn into one PNG here by build/loss_curves.py. CURVES='new' or 'old'
  # runs one of them.
  curve_args=(experiment=owt/gpt2s-flash datamodule.dataset=kjv datamodule.sources=embedded:kjv datamodule.val_ratio=0.01
    trainer.precision=bf16 model.config.dropout=0 datamodule.batch_size=16 train.global_batch_size=128
    train.scheduler.warmup_steps=20 train.scheduler.num_training_steps=200 trainer.max_steps=200
    trainer.log_every_n_steps=1 trainer.progress_bar=false)
  for which in ${CURVES:-new old}; do
    start=$SECONDS
    rm -rf "/tmp/flashattn-curves/$which"
    if [ "$which" = old ]; then
      old_native || { summary+=("losscurve old: $old_why"); continue; }
      (cd /tmp/flashattn-old-src && FLASHATTN_NATIVE_PATH=$old_lib DATA_DIR=/tmp/flashattn-data-old \
        "$root/.device/app-old/flashattn" train "${curve_args[@]}" trainer.default_root_dir=/tmp/flashattn-curves/old) \
        >"$OUT/curve-old.log" 2>&1
    else
      DATA_DIR=/tmp/flashattn-data "$app"/flashattn train "${curve_args[@]}" trainer.default_root_dir=/tmp/flashattn-curves/new \
        >"$OUT/curve-new.log" 2>&1
    fi
    summary+=("losscurve $which: rc $? ($((SECONDS - start)) s): $(grep -h '^done:' "$OUT/curve-$which.log" | cut -d';' -f1)")
    cp /tmp/flashattn-curves/"$which"/*/metrics.jsonl "$OUT/curve-$which.jsonl" 2>/dev/null
  done
fi

if want profile; then
  # Kernel time, launches and wall time of one training step, and its top kernels (build/step-profile.sh: ncu over
  # trainer.max_steps=2 and =4; TRAIN_ARGS as for train): $OUT/step-profile.tsv
  start=$SECONDS
  OUT=$OUT bash build/step-profile.sh >"$OUT/profile.log" 2>&1
  summary+=("step profile: rc $? ($((SECONDS - start)) s)")
fi

if want attnpeer; then
  # Issue 17's bar in one step: our attention (flash_selftest --bench-peer, the default Hopper variants, both
  # directions) at the shapes of the PyTorch peer's attention part, and the peer itself (its cuDNN rows are the bar),
  # in the same call: attnpeer.tsv.
  # Each half's status: the group's own would be the peer's grep, hiding a failed --bench-peer.
  # ATTNPEER_ENVS='FLASHATTN_HOPPER_FWD_VARIANT=persistent2 | ...': our side again under each |-separated setting, in the same
  # call (attnpeer-<n>.tsv).
  /tmp/flashattn-native/FlashAttn.Native/flash_selftest --bench-peer >"$OUT/attnpeer.tsv" 2>&1
  rc=$?
  again_under "${ATTNPEER_ENVS:-}" attnpeer - /tmp/flashattn-native/FlashAttn.Native/flash_selftest --bench-peer
  peer_rc=skipped
  if [ -f .device/peers/pytorch_baselines.py ]; then
    python3 .device/peers/pytorch_baselines.py attn 2>&1 | grep cudnn >>"$OUT/attnpeer.tsv"
    peer_rc=$?
    # the GPT-2 training shape, which the shared peer does not time
    python3 build/attn_peer_gpt2.py >>"$OUT/attnpeer.tsv" 2>&1 || peer_rc="$peer_rc, GPT-2 row failed"
  fi
  summary+=("attnpeer: flash_selftest --bench-peer rc $rc, peer's cudnn rows rc $peer_rc")
fi

if want attnncu; then
  # ncu of the Hopper forward at one of --bench-peer-fwd's shapes (ATTN_NCU='D causal S', default '128 0 16384') under
  # each |-separated setting of ATTNNCU_ENVS (default: the default variant), e.g.
  # ATTNNCU_ENVS='FLASHATTN_HOPPER_FWD_VARIANT=persistent | FLASHATTN_HOPPER_FWD_VARIANT=overlap': attnncu.txt, the
  # report of a timed launch past the first three (the path's child process makes one call).
  read -r ncu_d ncu_causal ncu_s <<< "${ATTN_NCU:-128 0 16384}"
  IFS='|' read -ra ncu_settings <<< "${ATTNNCU_ENVS:- }"
  for setting in "${ncu_settings[@]}"; do
    echo "== ${setting// /}" >>"$OUT/attnncu.txt"
    # shellcheck disable=SC2086 # the setting's words are separate variables
    env $setting timeout 150 ncu --kernel-name regex:flash_fwd_hopper --launch-skip 3 --launch-count 1 \
      --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section Occupancy \
      --section WarpStateStats --section LaunchStats --metrics lts__t_sector_hit_rate.pct \
      /tmp/flashattn-native/FlashAttn.Native/flash_selftest --bench-peer-fwd "$ncu_d" "$ncu_causal" "$ncu_s" \
      >>"$OUT/attnncu.txt" 2>&1
    summary+=("attnncu '${setting// /}' (d$ncu_d causal $ncu_causal S $ncu_s): rc $?")
  done
  # ATTNNCU_CUDNN=1: the same sections of cuDNN's forward at GPT-2's shape (PyTorch SDPA, build/attn_peer_gpt2.py), a
  # launch past the first three of its kind, beside ours at ATTN_NCU='64 1 1024'. The regex takes a kernel whose name
  # says attention or forward-propagation; the report names the kernel that was caught.
  if [ "${ATTNNCU_CUDNN:-0}" = 1 ]; then
    echo "== cudnn (PyTorch SDPA) GPT-2 B16 S1024 H12 d64 causal" >>"$OUT/attnncu.txt"
    timeout 200 ncu --kernel-name regex:'(?i)(sdpa|fprop|fmha|flash|attention)' --launch-skip 3 --launch-count 1 \
      --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section Occupancy \
      --section WarpStateStats --section LaunchStats --metrics lts__t_sector_hit_rate.pct \
      python3 build/attn_peer_gpt2.py --fwd-calls 6 >>"$OUT/attnncu.txt" 2>&1
    summary+=("attnncu cudnn (GPT-2's shape): rc $?")
  fi
fi

if want attnsrc; then
  # ncu's source view of the Hopper forward at ATTN_NCU's shape (default GPT-2's, '64 1 1024'), under each
  # |-separated setting of ATTNNCU_ENVS: `--set full --import-source yes` of a launch past the first three, its
  # source page by SASS row (attnsrc-<n>.csv), and build/ncu_regions.py's split of the warps' stall samples into
  # the tile's start, its key loop and its end (attnsrc.txt). The build keeps -lineinfo.
  read -r src_d src_causal src_s <<< "${ATTN_NCU:-64 1 1024}"
  IFS='|' read -ra src_settings <<< "${ATTNNCU_ENVS:- }"
  n=0
  for setting in "${src_settings[@]}"; do
    n=$((n + 1))
    echo "== ${setting// /} (d$src_d causal $src_causal S $src_s)" >>"$OUT/attnsrc.txt"
    # shellcheck disable=SC2086 # the setting's words are separate variables
    env $setting timeout 200 ncu --set full --import-source yes --kernel-name regex:flash_fwd_hopper --launch-skip 3 \
      --launch-count 1 -f -o "/tmp/attnsrc-$n" /tmp/flashattn-native/FlashAttn.Native/flash_selftest --bench-peer-fwd \
      "$src_d" "$src_causal" "$src_s" >"$OUT/attnsrc-$n.log" 2>&1
    rc=$?
    ncu -i "/tmp/attnsrc-$n.ncu-rep" --page source --csv --print-source sass >"$OUT/attnsrc-$n.csv" 2>>"$OUT/attnsrc-$n.log"
    python3 build/ncu_regions.py "$OUT/attnsrc-$n.csv" >>"$OUT/attnsrc.txt" 2>&1
    summary+=("attnsrc '${setting// /}' (d$src_d causal $src_causal S $src_s): ncu rc $rc, regions rc $?")
  done
  # ATTNSRC_CUDNN=1: the same of cuDNN's forward at GPT-2's shape (PyTorch SDPA, build/attn_peer_gpt2.py; the kernel
  # regex as attnncu's), attnsrc-cudnn.csv and its split below ours in attnsrc.txt: which of a tile's parts cuDNN's
  # warps wait in, beside ours at ATTN_NCU='64 1 1024'.
  if [ "${ATTNSRC_CUDNN:-0}" = 1 ]; then
    echo "== cudnn (PyTorch SDPA) GPT-2 B16 S1024 H12 d64 causal" >>"$OUT/attnsrc.txt"
    timeout 200 ncu --set full --import-source yes --kernel-name regex:'(?i)(sdpa|fprop|fmha|flash|attention)' \
      --launch-skip 3 --launch-count 1 -f -o /tmp/attnsrc-cudnn python3 build/attn_peer_gpt2.py --fwd-calls 6 \
      >"$OUT/attnsrc-cudnn.log" 2>&1
    rc=$?
    ncu -i /tmp/attnsrc-cudnn.ncu-rep --page source --csv --print-source sass >"$OUT/attnsrc-cudnn.csv" \
      2>>"$OUT/attnsrc-cudnn.log"
    python3 build/ncu_regions.py "$OUT/attnsrc-cudnn.csv" >>"$OUT/attnsrc.txt" 2>&1
    summary+=("attnsrc cudnn (GPT-2's shape): ncu rc $rc, regions rc $?")
  fi
fi

if want ops; then
  # The memory-bound kernels against a copy of the same bytes, natively (no .NET), every kernel variant (one
  # child process each, FLASHATTN_NORM_VARIANT, interleaved; every sample after an L2 flush: norm/NOTES.md,
  # "Measurement"); OPS_NCU='op size' adds an ncu report
  # (memory and occupancy sections) of that case's kernels under the variant of the environment (default: the
  # launchers' table), e.g. OPS_NCU='norm_fwd 8192' FLASHATTN_NORM_VARIANT=rows32. OPS_ONLY='norm_fwdbwd' times that
  # op alone; OPS_ENVS='FLASHATTN_NORM_VARIANT=rowsca | ...' times it again under each |-separated setting (ops-<n>.tsv).
  # shellcheck disable=SC2086 # OPS_ONLY is one word
  /tmp/flashattn-native/FlashAttn.Native/ops_bench ${OPS_ONLY:-} >"$OUT/ops.tsv" 2>"$OUT/ops.err"
  summary+=("ops_bench: rc $?")
  # shellcheck disable=SC2086 # OPS_ONLY is one word
  again_under "${OPS_ENVS:-}" ops "$OUT/ops.err" /tmp/flashattn-native/FlashAttn.Native/ops_bench ${OPS_ONLY:-}
  if [ -n "${OPS_NCU:-}" ]; then
    # OPS_NCU_OPTS adds options (e.g. '--print-details all': the warp stall reasons behind WarpStateStats' summary)
    # shellcheck disable=SC2086
    ncu --clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
      --section LaunchStats --section WarpStateStats --section SchedulerStats -k 'regex:norm|cross|rotary' \
      ${OPS_NCU_OPTS:-} --launch-skip 6 --launch-count 4 /tmp/flashattn-native/FlashAttn.Native/ops_bench --here $OPS_NCU \
      >"$OUT/ops-ncu.txt" 2>&1
    summary+=("ops ncu ($OPS_NCU): rc $?")
  fi
  if [ -n "${OPS_TRACE:-}" ]; then
    # OPS_TRACE='op size': that case's samples (the op's calls and its floor's copies, each after its L2 flush) under
    # build/cuda_trace.cpp's CUPTI trace, read by build/cuda_trace.py with each flush as a step: every kernel's duration
    # in the run and the gaps between them (a backward and its finalize: the GPU's launch latency between the two).
    # shellcheck source=build/cuda-trace-lib.sh
    source "$root/build/cuda-trace-lib.sh"
    if trace_lib=$(cuda_trace_lib 2>"$OUT/ops-trace.txt"); then
      rm -f /tmp/flashattn-ops-trace.tsv
      # shellcheck disable=SC2086 # OPS_TRACE is two words
      CUDA_INJECTION64_PATH=$trace_lib CUDA_TRACE_FILE=/tmp/flashattn-ops-trace.tsv \
        /tmp/flashattn-native/FlashAttn.Native/ops_bench --here $OPS_TRACE >>"$OUT/ops-trace.txt" 2>&1
      python3 "$root/build/cuda_trace.py" /tmp/flashattn-ops-trace.tsv --marker flush_l2 --skip 2 >>"$OUT/ops-trace.txt" 2>&1
      summary+=("ops trace ($OPS_TRACE): rc $?")
    else
      summary+=("ops trace ($OPS_TRACE): the trace library did not build (ops-trace.txt)")
    fi
  fi
fi

if want bench; then
  # BENCH_FILTER may hold several globs separated by spaces: split, never expanded against files.
  set -f; "$app"/FlashAttn.Benchmarks --filter ${BENCH_FILTER:-*} >"$OUT/bench.log" 2>&1; rc=$?; set +f
  summary+=("benchmarks: rc $rc, $(sed -n '/Benchmarks with issues:/,/^$/p' "$OUT/bench.log" | grep -c 'Job-') with issues")
  sed -n '/# results/,$p' "$OUT/bench.log" > "$OUT/bench.tsv"
fi

if want bench-old; then
  # The same cases through the PREPARE_OLD commit's benchmarks and library, right after this checkout's (bench): the
  # before/after of a change in one call, on one machine. Outputs: bench-old.log and bench-old.tsv (with tests and bench,
  # the call's 8 files).
  if old_native; then
    set -f
    (cd /tmp/flashattn-old-src && FLASHATTN_NATIVE_PATH=$old_lib "$root/.device/app-old/FlashAttn.Benchmarks" --filter ${BENCH_FILTER:-*}) \
      >"$OUT/bench-old.log" 2>&1
    rc=$?; set +f
    summary+=("benchmarks of the old commit: rc $rc, $(sed -n '/Benchmarks with issues:/,/^$/p' "$OUT/bench-old.log" | grep -c 'Job-') with issues")
    sed -n '/# results/,$p' "$OUT/bench-old.log" > "$OUT/bench-old.tsv"
  else
    summary+=("bench-old: $old_why")
  fi
fi

if want memory; then
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$app"/FlashAttn.Benchmarks --memory >"$OUT/memory.tsv" 2>"$OUT/memory.err"
  summary+=("memory: rc $?")
fi

# the peer's GPT-2 peak memory by memory's method (NVML, no caching allocator: build/peer_memory.py), PEERS' gpt parts
if want peermemory && [ -f .device/peers/pytorch_baselines.py ]; then
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 PYTHONUNBUFFERED=1 python3 build/peer_memory.py .device/peers/pytorch_baselines.py \
    "${PEERS:-gpt}" 2>"$OUT/peer-memory.err" | grep "peak mem" >"$OUT/peer-memory.tsv"
  summary+=("peermemory: rc ${PIPESTATUS[0]}")
fi

if want peers && [ -f .device/peers/pytorch_baselines.py ]; then
  PYTHONUNBUFFERED=1 python3 .device/peers/pytorch_baselines.py "${PEERS:-ops}" >"$OUT/peers.tsv" 2>"$OUT/peers.err"
  summary+=("peers: rc $?")
fi

echo
[ -f "$OUT/ops.tsv" ] && cat "$OUT/ops.tsv"
[ -f "$OUT/attnpeer.tsv" ] && cat "$OUT/attnpeer.tsv"
[ -f "$OUT/bench.tsv" ] && cat "$OUT/bench.tsv"
# each case both steps timed: old and new median, new / old (above 1: slower now)
[ -s "$OUT/bench-old.tsv" ] && [ -f "$OUT/bench.tsv" ] && awk -F'\t' 'NR == FNR { if ($4 == "ms") old[$2] = $3; next }
  $4 == "ms" && ($2 in old) { printf "old-new\t%s\t%s -> %s ms\t%.3f\n", $2, old[$2], $3, $3 / old[$2] }' "$OUT/bench-old.tsv" "$OUT/bench.tsv"
[ -f "$OUT/memory.tsv" ] && grep "^bench" "$OUT/memory.tsv"
[ -f "$OUT/peers.tsv" ] && cat "$OUT/peers.tsv"
[ -f "$OUT/peer-memory.tsv" ] && sed 's/^/NVML /' "$OUT/peer-memory.tsv"
[ -f "$OUT/package.log" ] && grep -v "^nupkg entries" "$OUT/package.log"
[ -f "$OUT/train.log" ] && tail -25 "$OUT/train.log"
for f in "$OUT"/train-*.log; do [ -f "$f" ] && { echo "== $f"; tail -6 "$f"; }; done
[ -f "$OUT/profile.log" ] && head -40 "$OUT/profile.log"
for f in "$crash"/*.crashreport.json; do [ -f "$f" ] && { cp "$f" "$OUT/"; echo "crash report: $OUT/$(basename "$f")"; }; done
# last, so that a long table cannot push it out of the tail a caller sees
echo "== failures"
[ -f "$OUT/failures.txt" ] && cat "$OUT/failures.txt"
echo "== summary"
printf '%s\n' "${summary[@]}"
