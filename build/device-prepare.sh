#!/usr/bin/env bash
# Here (no GPU): prepares what a device call carries in .device/ (git-ignored, under the 64 MiB
# limit): the tests, benchmarks and the `flashattn` CLI published self-contained into one folder
# (the .NET runtime travels once), referencing plain TorchSharp so libtorch comes from the GPU
# host's PyTorch; the package check (build/package-check: FlashAttn.TorchSharp and FlashAttn.Models
# packed and added to a fresh console project with `dotnet add package`) with the packed nupkg; and
# the peer programs from ../shared/peers. Then run on the device (see CONTRIBUTING.md):
#   bash build/device-run.sh [tests] [bench] [memory] [peers] [train] [package]   with carry [".device"]
# PREPARE_OLD=<commit> adds that commit's `flashattn` CLI and benchmarks (.device/app-old, in the same archive: the
# runtime's files are stored once) and its source tree (.device/old-src.tar.xz, whose libflashattn the device builds)
# for device-run.sh's losscurve step, which trains with both CLIs, and its bench-old step, which runs that commit's
# benchmarks beside this checkout's (GptBenchmarks before and after a change, in one call).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
rm -rf .device && mkdir -p .device/app
for project in tests/FlashAttn.Tests benchmarks/FlashAttn.Benchmarks FlashAttn.Cli; do
  dotnet publish "$project" -c Release -r linux-x64 --self-contained -p:FlashAttnTorch=cuda \
    -p:DebugType=none -o .device/app -v:q -nologo
done
# The CPU-only libflashattn published with them is replaced there by the CUDA build
# (FLASHATTN_NATIVE_PATH); drop it so a mistake cannot load it silently.
find .device/app -name libflashattn.so -delete
if [ -n "${PREPARE_OLD:-}" ]; then
  old=$(mktemp -d)
  git archive --format=tar "$PREPARE_OLD" | tar -x -C "$old"
  git archive --format=tar "$PREPARE_OLD" | xz -T0 > .device/old-src.tar.xz
  for project in FlashAttn.Cli benchmarks/FlashAttn.Benchmarks; do
    dotnet publish "$old/$project" -c Release -r linux-x64 --self-contained -p:FlashAttnTorch=cuda \
      -p:DebugType=none -o .device/app-old -v:q -nologo
  done
  find .device/app-old -name libflashattn.so -delete
  rm -rf "$old"
  for f in .device/app-old/*; do
    b=.device/app/$(basename "$f")
    if [ -f "$b" ] && cmp -s "$f" "$b"; then ln -f "$b" "$f"; fi
  done
fi

# What a user gets from `dotnet add package` (no dotnet on the GPU host, so the project is made and
# published here; the device swaps the CUDA build into the nupkg and into the published folder, as
# `dotnet pack` with a CUDA build in artifacts/native/ would have packed it).
work=$(mktemp -d)
version=0.0.0-device.$(date -u +%Y%m%d%H%M%S)
for project in FlashAttn.Managed FlashAttn.Models; do
  dotnet pack "$project" -c Release -o "$work/feed" -p:Version="$version" -v:q -nologo
done
dotnet new console -o "$work/PackageCheck" --framework net10.0 >/dev/null
printf '%s\n' '<?xml version="1.0" encoding="utf-8"?>' '<configuration>' '  <packageSources>' '    <clear />' \
  '    <add key="nuget.org" value="https://api.nuget.org/v3/index.json" />' \
  "    <add key=\"local\" value=\"$work/feed\" />" '  </packageSources>' '</configuration>' > "$work/PackageCheck/NuGet.config"
(cd "$work/PackageCheck" && dotnet add package TorchSharp --version 0.107.0 >/dev/null &&
  dotnet add package FlashAttn.TorchSharp --version "$version" >/dev/null &&
  dotnet add package FlashAttn.Models --version "$version" >/dev/null)
cp build/package-check/Program.cs "$work/PackageCheck/Program.cs"
dotnet publish "$work/PackageCheck" -c Release -r linux-x64 --self-contained -p:DebugType=none -o .device/consumer -v:q -nologo
cp "$work/feed/FlashAttn.TorchSharp.$version.nupkg" .device/
rm -rf "$work" "$HOME/.nuget/packages/flashattn.torchsharp/$version" "$HOME/.nuget/packages/flashattn.models/$version"
# The runtime and TorchSharp are the same files as in app/: hard links, which tar stores once.
for f in .device/consumer/*; do
  b=.device/app/$(basename "$f")
  if [ -f "$b" ] && cmp -s "$f" "$b"; then ln -f "$b" "$f"; fi
done
tar -C .device -cJf .device/app.tar.xz app consumer $([ -d .device/app-old ] && echo app-old)
rm -rf .device/app .device/consumer .device/app-old
if [ -d ../shared/peers ]; then cp -r ../shared/peers .device/peers; fi
# The device tool sends the tracked tree plus carried paths; keep the whole under 64 MiB.
du -sh .device
# Restore the CPU flavour's assets so local builds and tests work as before.
dotnet restore tests/FlashAttn.Tests -v:q >/dev/null
dotnet restore benchmarks/FlashAttn.Benchmarks -v:q >/dev/null
