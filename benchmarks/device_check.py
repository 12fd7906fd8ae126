"""The GPU check: one table of what a textual-inversion step and a generated image cost on this
device, for the Infinity-2B architecture with random weights (bf16 blocks, flan-T5-XL shapes).

For each resolution: the no-grad forward of one training example (T5 + transformer + loss), then
the TI step (forward, backward, AdamW on the learned vector) in each --ti_mode, and output mode with
a vector per scale (--vector_layout per_scale, the row "per_scale"), with and without
--gradient_checkpointing: seconds (median), peak allocated memory, and the step / forward ratio.
Then seconds per generated image (CFG 3, VAE decode). Random weights: time and memory do not
depend on them.

    bash benchmarks/device_check.sh              # on the GPU machine (258 s on an H200)
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


def out_of_memory_guard(fn, *args):
    """fn(*args), or None when the device runs out of memory (a smaller GPU): the table says so
    and the other cells still run."""
    try:
        return fn(*args)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device here; run `bash benchmarks/device_check.sh --dry-run` on a CPU")
    torch.manual_seed(0)
    dtype = torch.bfloat16 if cuda else torch.float32
    name = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    memory_kind = "peak allocated" if cuda else "saved for backward"
    # rows are printed as they are measured, so that a run stopped by its time limit still reports
    print(f"\n{args.model} (random weights, blocks in {str(dtype).removeprefix('torch.')}) on {name}")
    print(f"TI step, batch 1; memory = {memory_kind} (weights on the device included); ratio = step / no-grad forward")
    print("| pn | tokens | --ti_mode | --gradient_checkpointing | step (s) | memory | step / forward |")
    print("|---|---|---|---|---|---|---|", flush=True)
    models = build(args.model, args.device, dtype)
    text_encoder, transformer = models[1], models[2]
    rows = []
    for pn in args.pn:
        text_encoder.to(args.device)
        setup = out_of_memory_guard(Setup, *models, pn, args.device)
        transformer.gradient_checkpointing = False
        forward = out_of_memory_guard(measure, setup.forward, args.device, args.repeats) if setup else None
        for ti_mode in ("output", "per_scale", "input"):  # per_scale: output mode, --vector_layout per_scale
            # as the training script: output mode moves T5 off the GPU once the captions are encoded
            text_encoder.to(args.device if ti_mode == "input" else "cpu")
            if cuda:
                torch.cuda.empty_cache()
            for checkpointing in (False, True):
                transformer.gradient_checkpointing = checkpointing
                steps = {"output": "ours_output_mode", "per_scale": "ours_per_scale", "input": "ours"}
                step = getattr(setup, steps[ti_mode]) if setup else None
                result = out_of_memory_guard(measure, step, args.device, args.repeats) if step else None
                if result is None and setup is not None:
                    setup.optimizer.zero_grad(set_to_none=True)
                row = {"pn": pn, "ti_mode": ti_mode, "checkpointing": checkpointing, "seconds": None, "memory": None}
                if result is not None:
                    row.update(seconds=result[0], memory=result[1])
                rows.append(row)
                tokens = setup.schedule.total_len if setup else "-"
                cells = ("out of memory", "-", "-") if result is None else (
                    f"{result[0]:.3f}", gib(result[1]), f"{result[0] / forward[0]:.2f}x" if forward else "-"
                )  # fmt: skip
                print(f"| {pn} | {tokens} | {ti_mode} | {'yes' if checkpointing else 'no'} | {' | '.join(cells)} |",
                      flush=True)  # fmt: skip
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
    device = torch.device(args.device)
    generator_models = build_for_sampling(*configs, device, dtype)
    sampling = out_of_memory_guard(
        time_generation, *generator_models, args.sampling_pn, device, 1, args.repeats, 1, 3.0
    )
    if sampling is None:
        print(f"Generation at {args.sampling_pn}: out of memory")
        return rows
    peak = f", peak {sampling['peak_gib']:.1f} GiB" if sampling["peak_gib"] is not None else ""
    print(
        f"Generation at {args.sampling_pn} ({sampling['image']}, CFG 3, VAE decode, T5 not timed): "
        f"{sampling['s_per_image']:.3f} s per image (median of {args.repeats}){peak}"
    )
    return rows


if __name__ == "__main__":
    main()
