#!/usr/bin/env bash
# The one script a GPU session runs (at most 10 minutes: 258 s on an H200):
#   1. the benchmark: TI step time and peak memory on the Infinity-2B architecture at 0.25M and 1M, each
#      --ti_mode, with and without --gradient_checkpointing, the step / forward ratio, seconds per image at 1M;
#   2. the scripts themselves on CUDA: a random Infinity-2B-shaped model (and flan-T5-XL-shaped encoder) saved
#      in the local-folder layout, train_textual_inversion_infinity.py under accelerate launch at 1M with bf16,
#      --gradient_checkpointing, a validation prompt and a checkpoint, resumed to the end, then
#      infer_textual_inversion.py on its output; each reports its peak GPU memory ("peak GPU memory").
#   bash benchmarks/device_check.sh            # needs CUDA
#   bash benchmarks/device_check.sh --dry-run  # the same code on tiny random models, CPU (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the packages of this tree, installed or not
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
if [[ "${1:-}" == "--dry-run" ]]; then
  python benchmarks/device_check.py --model tiny --device cpu --pn 0.06M --sampling_pn 0.06M --repeats 1
  python benchmarks/save_random_model.py --model tiny --device cpu --out "$work/model"
  model="$work/model" pn=0.06M precision=no limit=300
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  timeout 200 python benchmarks/device_check.py --model infinity_2b --device cuda --pn 0.25M 1M --sampling_pn 1M \
    --repeats 3 || echo "benchmark stopped (status $?); the script checks follow"
  timeout 90 python benchmarks/save_random_model.py --model infinity_2b --device cuda --out "$work/model"
  model="$work/model" pn=1M precision=bf16 limit=100
fi

echo; echo "== train_textual_inversion_infinity.py at $pn ($model), then resumed =="
train=(accelerate launch --num_processes 1 --num_machines 1 --mixed_precision "$precision" --dynamo_backend no
  train_textual_inversion_infinity.py --pretrained_model_name_or_path "$model"
  --train_data_dir examples/concepts/pink-cross --placeholder_token "<pink-cross>" --initializer_token cross
  --pn "$pn" --gradient_checkpointing --checkpointing_steps 2 --validation_prompt "a photo of a <pink-cross>"
  --validation_steps 2 --num_validation_images 2 --seed 0 --report_to none --output_dir "$work/ti")
start=$SECONDS
timeout "$limit" "${train[@]}" --max_train_steps 2 2>&1 | grep -E "peak GPU memory|error|Error" || true
timeout "$limit" "${train[@]}" --max_train_steps 4 --resume_from_checkpoint latest 2>&1 \
  | grep -E "Resuming|peak GPU memory|error|Error" || true
echo "training, both runs: $((SECONDS - start)) s; files: $(ls "$work/ti" | tr '\n' ' ')"
test -f "$work/ti/learned_embeds.safetensors" && test -f "$work/ti/checkpoint-4/model.safetensors"

echo; echo "== infer_textual_inversion.py at $pn on its output =="
start=$SECONDS
timeout "$limit" python infer_textual_inversion.py --pretrained_model_name_or_path "$model" \
  --learned_embeds "$work/ti" --prompt "a photo of a <pink-cross>" --pn "$pn" --num_images 2 --seed 0 \
  --output_dir "$work/images" 2>&1 | grep -E "peak GPU memory|wrote|error|Error" || true
echo "inference: $((SECONDS - start)) s; images: $(ls "$work/images" | tr '\n' ' ')"
test -n "$(ls "$work/images"/*seed0_1.png)"
