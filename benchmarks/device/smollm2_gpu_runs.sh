# On the GPU machine, after `source benchmarks/device/smollm2_env.sh`: what needs SmolLM2 on a GPU, run in
# parallel on the one H200 (each job is small); logs and results tarred into $OUT/smollm2_gpu.tar.gz.
#   SEEDS   benchmarks/quality_qlora.py --device cuda (bf16 LoRA vs QLoRA: NF4 + DQ, bf16 compute), with the
#           deployments and the 8-bit optimizer run; SEEDS2 (optional) more seeds in a second process
#           (combine the two JSONs with `quality_qlora.py --combine`)
#   TRAIN=1 lora-train on the whole course dataset (the README's command) on the GPU
#   NB      which course notebooks' sources to run as scripts on the GPU (a glob; 09 has no GPU path and
#           needs fsrs, which the machine lacks)
SEEDS=${SEEDS-0 1 2}
SEEDS2=${SEEDS2-}
TRAIN=${TRAIN-1}
NB=${NB-0[0-8]}
LIMIT=${LIMIT:-520}
mkdir -p $OUT/gpu/nb
python3 -c "from lora_ref.models import load_smollm2; m, t = load_smollm2(); print('SmolLM2 ready:', type(m).__name__)" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/gpu/nvidia-smi.csv
python3 -m pip list 2>/dev/null | grep -i -E "^(torch|transformers|peft|triton|gguf|bitsandbytes) " > $OUT/gpu/versions.txt
if [ -n "$SEEDS" ]; then
    timeout $LIMIT python3 benchmarks/quality_qlora.py --device cuda --seeds $SEEDS --out $OUT/gpu/q1 > $OUT/gpu/quality_qlora.log 2>&1 &
fi
if [ -n "$SEEDS2" ]; then
    timeout $LIMIT python3 benchmarks/quality_qlora.py --device cuda --seeds $SEEDS2 --no-8bit --out $OUT/gpu/q2 > $OUT/gpu/quality_qlora2.log 2>&1 &
fi
if [ "$TRAIN" = 1 ]; then
    timeout $LIMIT python3 -c "from lora_ref.training import main; main(['--steps', '150', '--r', '16', '--alpha', '32', '--targets', 'all-linear', '--device', 'cuda', '--out', '$OUT/gpu/velora-lora'])" > $OUT/gpu/lora_train.log 2>&1 &
fi
for f in course_src/${NB}_*.py; do
    [ -e "$f" ] || continue
    n=$(basename $f .py)
    ( cd course_src && s=$SECONDS && timeout $LIMIT python3 $n.py; echo "exit $?, $((SECONDS - s)) s wall" ) > $OUT/gpu/nb/$n.log 2>&1 &
done
wait
rm -f $OUT/gpu/velora-lora/adapter_model.safetensors            # 19 MB; its metrics.json stays
for f in $OUT/gpu/nb/*.log; do [ -e "$f" ] && echo "$(basename $f): $(tail -1 $f)"; done
for f in $OUT/gpu/quality_qlora*.log; do [ -e "$f" ] && tr '\r' '\n' < $f | grep -E "held-out loss|seed|bar" | tail -20; done
tar -C $OUT -czf $OUT/smollm2_gpu.tar.gz gpu && rm -rf $OUT/gpu
