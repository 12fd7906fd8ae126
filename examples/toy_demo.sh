#!/usr/bin/env bash
# The main job on the toy Infinity (examples/toy-infinity), on CPU in a few minutes:
#   1. textual inversion of <pink-cross> from the 8 images in examples/concepts/pink-cross
#      (a pink cross; the toy model was pretrained on pink things and on crosses, never on a pink cross),
#   2. inference: "a photo of a <pink-cross>" and "a photo of a <pink-cross> on grass", each
#      beside the same prompt with the initializer word "cross" instead (--compare), same seeds.
# Outputs under outputs/toy-demo/ (or the folder given as the first argument).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-outputs/toy-demo}"

accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  train_textual_inversion_infinity.py \
  --pretrained_model_name_or_path examples/toy-infinity \
  --train_data_dir examples/concepts/pink-cross \
  --placeholder_token "<pink-cross>" --initializer_token cross \
  --pn 0.06M --train_batch_size 4 --max_train_steps 200 \
  --validation_prompt "a photo of a <pink-cross>" --validation_steps 50 \
  --seed 0 --output_dir "$out/embedding"

python infer_textual_inversion.py \
  --pretrained_model_name_or_path examples/toy-infinity \
  --learned_embeds "$out/embedding" \
  --prompt "a photo of a <pink-cross>" --prompt "a photo of a <pink-cross> on grass" \
  --pn 0.06M --num_images 8 --seed 0 --compare \
  --output_dir "$out/images"

echo
echo "before/after (left: <pink-cross>, right: \"cross\", same seeds): $out/images/*_compare.png"
echo "during training: $out/embedding/validation/"
