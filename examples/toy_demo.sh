#!/usr/bin/env bash
# The main job on the toy Infinity (examples/toy-infinity), on CPU in a few minutes:
#   1. textual inversion of <blue-heart> from the 8 images in examples/concepts/blue-heart
#      (a blue heart; the toy model has drawn hearts, but its captions only ever called them "thing",
#      so no words ask for one), starting from the best words, "blue thing",
#   2. inference: "a photo of a <blue-heart>" and "a photo of a <blue-heart> on grass", each beside
#      the same prompt with those words instead (--compare), same seeds.
# Outputs under outputs/toy-demo/ (or the folder given as the first argument); a rerun replaces them.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-outputs/toy-demo}"

accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  train_textual_inversion_infinity.py \
  --pretrained_model_name_or_path examples/toy-infinity \
  --train_data_dir examples/concepts/blue-heart \
  --placeholder_token "<blue-heart>" --initializer_token "blue thing" \
  --pn 0.06M --train_batch_size 4 --max_train_steps 200 \
  --validation_prompt "a photo of a <blue-heart>" --validation_steps 50 \
  --seed 0 --output_dir "$out/embedding" --overwrite_output_dir

python infer_textual_inversion.py \
  --pretrained_model_name_or_path examples/toy-infinity \
  --learned_embeds "$out/embedding" \
  --prompt "a photo of a <blue-heart>" --prompt "a photo of a <blue-heart> on grass" \
  --pn 0.06M --num_images 8 --seed 0 --compare \
  --output_dir "$out/images" --overwrite_output_dir

echo
echo "the token against the best words (left: <blue-heart>, right: \"blue thing\", same seeds): $out/images/a-photo-of-a-[blue-heart]*_compare.png"
echo "during training: $out/embedding/validation/"
