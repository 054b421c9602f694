#!/usr/bin/env bash
# Here (Debian 12, no GPU): unpacks Debian trixie's CUDA 12.4 compiler into /opt/cuda124 without installing it,
# so that sm_90a code (wgmma, setmaxnreg, TMA) compiles and disassembles locally; bookworm's CUDA 11.8 stops at sm_90.
# Then: /opt/cuda124/usr/lib/nvidia-cuda-toolkit/bin/nvcc -ccbin g++-12 -gencode=arch=compute_90a,code=sm_90a ...
#       /opt/cuda124/usr/bin/cuobjdump --dump-sass x.o | grep HGMMA
# The GPU host builds with its own nvcc 13.0; this is for compile checks and SASS reading only.
set -euo pipefail
R=${CUDA12_ROOT:-/opt/cuda124}
nvcc=$R/usr/lib/nvidia-cuda-toolkit/bin/nvcc
if [ -x "$nvcc" ]; then echo "$nvcc"; exit 0; fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists" "$work/cache/archives/partial" "$work/debs"
echo "deb http://deb.debian.org/debian trixie main contrib non-free" > "$work/sources.list"
o=(-o "Dir::Etc::SourceList=$work/sources.list" -o Dir::Etc::SourceParts=/dev/null -o "Dir::State::Lists=$work/lists"
   -o "Dir::Cache=$work/cache")
apt-get "${o[@]}" update -qq
(cd "$work/debs" && apt-get "${o[@]}" download nvidia-cuda-toolkit nvidia-cuda-dev libnvvm4 libcudart12 libcu++-dev)
mkdir -p "$R"
for f in "$work"/debs/*.deb; do dpkg -x "$f" "$R"; done
# Debian's profile points at /usr; point it at the unpacked tree instead. The package's nvcc.profile is a link to
# /etc/nvcc.profile: replace the link, never write through it (that rewrote the system CUDA 11.8's profile, whose
# nvcc then compiled against CUDA 12.4's headers and linked both libcudart_static).
rm -f "$R/usr/lib/nvidia-cuda-toolkit/bin/nvcc.profile"
cat > "$R/usr/lib/nvidia-cuda-toolkit/bin/nvcc.profile" <<PROFILE
NVVMIR_LIBRARY_DIR = $R/usr/lib/nvidia-cuda-toolkit/libdevice
PATH		+= $R/usr/lib/nvidia-cuda-toolkit/bin:$R/usr/bin:
INCLUDES	+= "-I$R/usr/include" \$(_SPACE_)
LIBRARIES	=+ \$(_SPACE_) -L$R/usr/lib/x86_64-linux-gnu/stubs -L$R/usr/lib/x86_64-linux-gnu
PROFILE
echo "$nvcc"
