# On the GPU machine (the `device` tool, carry [".whl"]): issue 15's runs. .whl holds bitsandbytes 0.50.2 and
# liger-kernel 0.8.5 (benchmarks/README.md says how to fetch them). Logs and JSON under $OUT.
#   RUN70B=1   benchmarks/qlora_70b.py: Llama-2-70B built streamed vs the recipe (whole 16-bit model first)
#   STEP7B=1   benchmarks/qlora_step.py on the Llama-2-7B shape, every mode twice (REPEAT), profiled
#   DEQUANT=1  benchmarks/dequant_speed.py --sweep
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MPLBACKEND=Agg
mkdir -p $OUT/r
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee $OUT/r/nvidia-smi.csv
cd benchmarks
if [ "${RUN70B-1}" = 1 ]; then
    timeout ${LIMIT70B:-420} python3 qlora_70b.py --modes ${MODES70B:-stream_fast_8bit,stream_fast,stream_lora_ref,recipe} \
        --out $OUT/r 2>&1 | tee $OUT/r/qlora_70b.log
fi
if [ "${STEP7B-1}" = 1 ]; then
    timeout ${LIMIT7B:-480} python3 qlora_step.py --modes ${MODES7B:-recipe,recipe_liger,lora_ref,fast_norm,fast_compile} \
        --repeat ${REPEAT:-2} --profile ${PROFILE:-recipe,fast_norm,fast_compile} --out $OUT/r 2>&1 | tee $OUT/r/qlora_step.log
fi
if [ "${DEQUANT-0}" = 1 ]; then
    timeout ${LIMITDQ:-120} python3 dequant_speed.py --sweep --out $OUT/r 2>&1 | tee $OUT/r/dequant_speed.log
fi
ls -la $OUT/r
