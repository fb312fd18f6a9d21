#!/usr/bin/env bash
# benchmarks/gpu.py on a lent GPU machine that reaches no package registry, in one call.
#
# 1. Here (a machine with the project's venv and PyPI):
#      bash benchmarks/gpu_check.sh prepare
#    writes .gpu_site/site.tar.xz (42 MB, git-ignored): the packages the GPU image lacks or holds at another version
#    (lerobot, bitsandbytes, av, transformers, ...), at the venv's exact versions, for CPython 3.12 on x86-64;
#    bitsandbytes keeps only its CUDA 13 libraries (the image's torch is +cu130), so the whole travels under 64 MiB.
# 2. On the GPU machine, from the repository root, with .gpu_site carried along:
#      bash benchmarks/gpu_check.sh device [gpu.py arguments, e.g. --families pi05 --deadline 300]
#    unpacks the packages into /tmp/vla_site, checks the imports, prints the card, and runs benchmarks/gpu.py
#    (hard deadline 450 s) into $OUT (or outputs/gpu): gpu.json, gpu.md and gpu.log.
#    With the device tool: command "bash benchmarks/gpu_check.sh device", carry [".gpu_site"], timeout_s 560.
#    (`GPU_PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh device --tiny` rehearses it on a CPU.)
set -euo pipefail
cd "$(dirname "$0")/.."

# What benchmarks/gpu.py and recipes/sft.py import that the GPU image ('cuda', python3 3.12 with torch 2.11+cu130)
# lacks, or holds at a version outside pyproject.toml's pins (transformers 5.17, tokenizers 0.23.2 there) or
# datasets' (fsspec). The rest (torch, numpy, pandas, pyarrow, timm, safetensors, huggingface_hub, ...) is the image's.
PACKAGES=(
    lerobot bitsandbytes av transformers tokenizers peft accelerate trl datasets fsspec draccus mergedeep toml
    termcolor gymnasium farama-notifications dill multiprocess
)
ARCHIVE=.gpu_site/site.tar.xz

prepare() {
    local python=${PYTHON:-.venv/bin/python} work pins
    work=$(mktemp -d)
    trap 'rm -rf "$work"' RETURN
    pins=$("$python" - "${PACKAGES[@]}" <<'EOF'
import sys
from importlib.metadata import version

print(" ".join(f"{name}=={version(name)}" for name in sys.argv[1:]))
EOF
)
    echo "packages: $pins"
    # shellcheck disable=SC2086  # one argument per pin
    "$python" -m pip install --quiet --no-deps --no-compile --only-binary=:all: --target "$work/site" \
        --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any $pins
    # bitsandbytes ships a library per CUDA and ROCm release: keep the CUDA 13 ones (and the CPU one).
    find "$work/site/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name '*_cuda13*' ! -name '*_cpu*' -delete
    rm -rf "$work/site/bin"  # console scripts whose first line names this machine's python
    mkdir -p "$(dirname "$ARCHIVE")"
    tar -C "$work/site" -cf - . | xz -T0 -9 >"$ARCHIVE"
    du -h "$ARCHIVE"
}

device() {
    local site=/tmp/vla_site out=${OUT:-outputs/gpu} python=${GPU_PYTHON:-python3}
    [[ -f $ARCHIVE ]] || { echo "error: $ARCHIVE is missing: run 'bash benchmarks/gpu_check.sh prepare' first, and carry .gpu_site" >&2; exit 2; }
    mkdir -p "$site" "$out"
    "$python" -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='data')" "$ARCHIVE" "$site"
    export PYTHONPATH="$site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    "$python" -c "import torch, transformers, peft, bitsandbytes, lerobot, av, trl, vla_recipes
print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__,
      '| bitsandbytes', bitsandbytes.__version__, '| lerobot', lerobot.__version__, '| cuda', torch.cuda.is_available())"
    set +e
    "$python" benchmarks/gpu.py --out "$out" "$@" 2>&1 | tee "$out/gpu.log"
    local status=${PIPESTATUS[0]}
    set -e
    return "$status"
}

case "${1:-}" in
    prepare) prepare ;;
    device) shift; device "$@" ;;
    *) echo "usage: bash benchmarks/gpu_check.sh prepare | device [gpu.py arguments]" >&2; exit 2 ;;
esac
