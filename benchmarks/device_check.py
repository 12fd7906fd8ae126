"""The GPU check: one table of what a textual-inversion step and a generated image cost on this
device, for the Infinity-2B architecture with random weights (bf16 blocks, flan-T5-XL shapes).

For each resolution: the no-grad forward of one training example (T5 + transformer + loss), then
the TI step (forward, backward, AdamW on the learned vector) in each --ti_mode, with and without
--gradient_checkpointing: seconds (median), peak allocated memory, and the step / forward ratio.
Then seconds per generated image (CFG 3, VAE decode). Random weights: time and memory do not
depend on them.

    bash benchmarks/device_check.sh              # on the GPU machine (about 5 minutes on an H200)
    bash benchmarks/device_check.sh --dry-run    # the same code, tiny model on the CPU (CI)
"""

from __future__ import annotations

import argparse

import torch
from bench_sampling import build as build_for_sampling
from bench_sampling import time_generation
from bench_train_step import Setup, build, gib, measure

from infinity_t2i.config import MODEL_PRESETS
from toy_infinity.tiny import tiny_configs


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="infinity_2b", choices=["infinity_2b", "tiny"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--pn", nargs="+", default=["0.25M", "1M"], help="Training resolutions.")
    parser.add_argument("--sampling_pn", default="1M", help="Resolution of the generation row.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed runs per cell (the median is reported).")
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device here; run `bash benchmarks/device_check.sh --dry-run` on a CPU")
    torch.manual_seed(0)
    dtype = torch.bfloat16 if cuda else torch.float32
    name = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    memory_kind = "peak allocated" if cuda else "saved for backward"
    models = build(args.model, args.device, dtype)
    text_encoder, transformer = models[1], models[2]
    rows = []
    for pn in args.pn:
        setup = Setup(*models, pn, args.device)
        transformer.gradient_checkpointing = False
        forward, _ = measure(setup.forward, args.device, args.repeats)
        for ti_mode, step in (("output", setup.ours_output_mode), ("input", setup.ours)):
            # as the training script: output mode moves T5 off the GPU once the captions are encoded
            text_encoder.to("cpu" if ti_mode == "output" else args.device)
            if cuda:
                torch.cuda.empty_cache()
            for checkpointing in (False, True):
                transformer.gradient_checkpointing = checkpointing
                try:
                    seconds, memory = measure(step, args.device, args.repeats)
                except torch.cuda.OutOfMemoryError:  # a smaller GPU: the row says so, the others still run
                    seconds, memory = float("nan"), float("nan")
                    setup.optimizer.zero_grad(set_to_none=True)
                    torch.cuda.empty_cache()
                rows.append({"pn": pn, "tokens": setup.schedule.total_len, "ti_mode": ti_mode,
                             "checkpointing": checkpointing, "seconds": seconds, "memory": memory,
                             "ratio": seconds / forward, "forward": forward})  # fmt: skip
        transformer.gradient_checkpointing = False
        del setup
    del models, text_encoder, transformer
    if cuda:
        torch.cuda.empty_cache()

    if args.model == "infinity_2b":
        preset = MODEL_PRESETS["infinity_2b"]
        configs = (preset.transformer, preset.vae)
    else:
        configs = tiny_configs()
    generator_models = build_for_sampling(*configs, torch.device(args.device), dtype)
    sampling = time_generation(*generator_models, args.sampling_pn, torch.device(args.device), 1, args.repeats, 1, 3.0)

    print(f"\n{args.model} (random weights, blocks in {str(dtype).removeprefix('torch.')}) on {name}")
    print(f"TI step, batch 1; memory = {memory_kind} (weights on the device included); ratio = step / no-grad forward")
    print("| pn | tokens | --ti_mode | --gradient_checkpointing | step (s) | memory | step / forward |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['pn']} | {r['tokens']} | {r['ti_mode']} | {'yes' if r['checkpointing'] else 'no'} | "
              f"{r['seconds']:.3f} | {gib(r['memory']) if r['memory'] == r['memory'] else 'out of memory'} | "
              f"{r['ratio']:.2f}x |")  # fmt: skip
    peak = f", peak {sampling['peak_gib']:.1f} GiB" if sampling["peak_gib"] is not None else ""
    print(
        f"Generation at {args.sampling_pn} ({sampling['image']}, CFG 3, VAE decode, T5 not timed): "
        f"{sampling['s_per_image']:.3f} s per image (median of {args.repeats}){peak}"
    )
    return rows


if __name__ == "__main__":
    main()
