"""Writes an Infinity-2B-shaped model with random weights (blocks in bfloat16) and a
flan-T5-XL-shaped encoder, with the toy world's tokenizer, in the folder layout that
--pretrained_model_name_or_path reads: the training and inference scripts then run end to end at
full size on a machine that cannot download the real weights (benchmarks/device_check.sh).

    python benchmarks/save_random_model.py --out /tmp/infinity-2b-random --device cuda
    python benchmarks/save_random_model.py --out /tmp/tiny-random --model tiny --device cpu   # the dry run
"""

from __future__ import annotations

import argparse
import os

import torch
from bench_train_step import flan_t5_xl_config
from transformers import AutoTokenizer, T5Config, T5EncoderModel

from infinity_t2i.config import MODEL_PRESETS
from infinity_t2i.pipeline import InfinityPipeline
from infinity_t2i.transformer import InfinityTransformer
from infinity_t2i.vae import BSQVAE
from toy_infinity.tiny import T5_WIDTH, tiny_configs

TOY_TOKENIZER = os.path.join(os.path.dirname(__file__), "..", "examples", "toy-infinity", "text_encoder")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="The model folder to write.")
    parser.add_argument("--model", default="infinity_2b", choices=[*sorted(MODEL_PRESETS), "tiny"])
    parser.add_argument("--device", default="cuda", help="Where the random weights are drawn (fast on a GPU).")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.model == "tiny":  # the tests' shapes, for the dry run on a CPU
        configs = tiny_configs()
        t5_config = T5Config(vocab_size=32128, d_model=T5_WIDTH, d_kv=32, d_ff=256, num_layers=2, num_heads=4)
    else:
        configs, t5_config = (MODEL_PRESETS[args.model].transformer, MODEL_PRESETS[args.model].vae), flan_t5_xl_config()
    with torch.device(args.device):
        transformer = InfinityTransformer(configs[0]).set_block_dtype(torch.bfloat16)
        vae = BSQVAE(configs[1])
        text_encoder = T5EncoderModel(t5_config).half()  # loaded as float16 on a GPU, as the scripts do
    tokenizer = AutoTokenizer.from_pretrained(TOY_TOKENIZER, legacy=True)  # words of the toy concepts
    InfinityPipeline(transformer, vae, tokenizer, text_encoder).save_pretrained(args.out)
    size = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(args.out) for f in files)
    print(f"wrote a random {args.model} model and its T5 to {args.out} ({size / 2**30:.2f} GiB)")


if __name__ == "__main__":
    main()
