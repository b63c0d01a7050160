#!/usr/bin/env bash
# Issue 14's GPU table, prepared so that a session lent a GPU spends its few device minutes measuring, not setting up.
#
#   bash benchmarks/gpu_issue14.sh fetch       # here, once (needs PyPI): the wheels the GPU machine lacks, into .whl/
#   bash benchmarks/gpu_issue14.sh eager       # on the GPU machine, carrying .whl: every variant, batch 1 and 4
#   bash benchmarks/gpu_issue14.sh compiled    # on the GPU machine, carrying .whl: torch.compile, batch 1
#   bash benchmarks/gpu_issue14.sh fp8         # on the GPU machine, carrying .whl: model.fp8_base's memory and time
#                                                (benchmarks/fp8_base.py; --family sdxl for SDXL's U-Net)
#   bash benchmarks/gpu_issue14.sh fused       # on the GPU machine, carrying .whl: optimizer.fused_backward_pass's
#                                                memory and time in native fine-tuning (benchmarks/fused_backward.py)
#
# The device tool runs each part as one call, e.g. run(command="bash benchmarks/gpu_issue14.sh eager",
# carry=[".whl"], timeout_s=420): the eager part is minutes of stepping; the compiled one compiles the U-Net once
# per variant (about a minute each on an H100, hence four variants; name others with --variants). Arguments after
# the part go to benchmarks/train_step.py and win over the script's own. Results: issue14-<part>.json and .txt in
# $OUT (the device tool's folder that comes back), else in gpu-results/. The GPU machine has PyTorch, accelerate,
# transformers and safetensors but not diffusers, LyCORIS or tomli-w; peft is carried too, so that its version is
# the one the CPU tables name.
set -euo pipefail

part=${1:?"usage: gpu_issue14.sh fetch|eager|compiled|fp8|fused [the benchmark's arguments]"}
shift
root=$(cd "$(dirname "$0")/.." && pwd)
# versions as in .ci/constraints.txt; the last three are what diffusers and LyCORIS need beyond the machine's packages
wheels=(diffusers==0.42.1 peft==0.21.2 lycoris-lora==4.1.3 tomli-w==1.2.0 importlib-metadata==10.2.0
        lazy-importer==0.1.0 toml==0.10.2)

if [[ $part == fetch ]]; then
    # pure-Python wheels; the platform tags only satisfy pip's --python-version check
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$root/.whl" "${wheels[@]}"
    exit 0
fi

bench=train_step.py
case $part in
    eager) part_args=(--batches 1,4 --rounds 3) ;;  # 30 timed steps per variant and batch: minutes in all
    compiled) part_args=(--compile --batches 1 --rounds 3 --variants floor,lorakit-lora,peft-lora,lorakit-locon) ;;
    fp8) bench=fp8_base.py; part_args=(--rounds 3) ;;  # the U-Net in bf16 and with its base in fp8: seconds
    fused) bench=fused_backward.py; part_args=(--steps 3) ;;  # SD1.5 natively, both variants: a minute
    *) echo "gpu_issue14.sh: unknown part '$part' (fetch, eager, compiled, fp8 or fused)" >&2; exit 2 ;;
esac

out=${OUT:-$root/gpu-results}
mkdir -p "$out"
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
if compgen -G "$root/.whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        "$root"/.whl/*.whl
fi
export PYTHONPATH=$site:$root${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1

log=$out/issue14-$part.txt
{
    echo "# benchmarks/gpu_issue14.sh $part $*"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "(no nvidia-smi)"
} > "$log"
python3 "$root/benchmarks/$bench" --device cuda --resolution 512 --dtype bf16 --width full "${part_args[@]}" \
    --json "$out/issue14-$part.json" "$@" 2>&1 | tee -a "$log"
