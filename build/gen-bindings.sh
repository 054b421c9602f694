#!/usr/bin/env bash
# Regenerates FlashAttn.Managed/Native/NativeMethods.*.g.cs from FlashAttn.Native/include/flashattn.h.
# With --check it writes nothing and exits 1 when the checked-in files are out of date.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
dotnet run --project build/BindingsGen -c Release -- FlashAttn.Native/include/flashattn.h FlashAttn.Managed/Native "$@"
