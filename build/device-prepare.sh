#!/usr/bin/env bash
# Here (no GPU): prepares what a device call carries in .device/ (git-ignored, under the 64 MiB
# limit): the tests and benchmarks published self-contained into one folder (the .NET runtime
# travels once), referencing plain TorchSharp so libtorch comes from the GPU host's PyTorch, and
# the peer programs from ../shared/peers. Then run on the device (see CONTRIBUTING.md):
#   bash build/device-run.sh [tests] [bench] [peers]      with carry [".device"]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
rm -rf .device && mkdir -p .device/app
for project in tests/FlashAttn.Tests benchmarks/FlashAttn.Benchmarks; do
  dotnet publish "$project" -c Release -r linux-x64 --self-contained -p:FlashAttnTorch=cuda \
    -p:DebugType=none -o .device/app -v:q -nologo
done
# The CPU-only libflashattn published with them is replaced there by the CUDA build
# (FLASHATTN_NATIVE_PATH); drop it so a mistake cannot load it silently.
find .device/app -name libflashattn.so -delete
tar -C .device -cJf .device/app.tar.xz app
rm -rf .device/app
if [ -d ../shared/peers ]; then cp -r ../shared/peers .device/peers; fi
# The device tool sends the tracked tree plus carried paths; keep the whole under 64 MiB.
du -sh .device
# Restore the CPU flavour's assets so local builds and tests work as before.
dotnet restore tests/FlashAttn.Tests -v:q >/dev/null
dotnet restore benchmarks/FlashAttn.Benchmarks -v:q >/dev/null
