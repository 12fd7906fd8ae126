"""How far flan-T5-XL encoder features drift from float32 under float16 and bfloat16.

    python benchmarks/bench_t5_precision.py                      # both scales, 24 layers (~6 min on 2 CPU cores)
    python benchmarks/bench_t5_precision.py --num_layers 6 --scale realistic   # quick look
    python benchmarks/bench_t5_precision.py --scale realistic --grad_scale 1e-3 1e-4 1e-5 1e-6   # underflow

No weights can be downloaded here, so the encoder is a flan-t5-xl-shaped `T5EncoderModel` (d_model 2048, d_ff 5120,
24 layers, 32 heads of 64, gated-gelu, vocab 32128) with random weights, run on six prompts of 3 to 60 tokens (random
ids, EOS last). Each precision gets the same float32 input embeddings (a float32 leaf, as the learned token vectors of
textual inversion are) cast to the encoder's embedding dtype, and is compared with float32 on the real tokens:

    fp32                        the reference;
    fp16 (HF, wo fp32)          `from_pretrained(dtype=torch.float16)`: what the official Infinity code runs.
                                transformers keeps the FFN output projections `wo` in float32
                                (`T5PreTrainedModel._keep_in_fp32_modules == ["wo"]`); the float32 model is saved with
                                `save_pretrained` and reloaded that way, and the dtypes are checked;
    fp16 + autocast bf16        the same weights called under `torch.autocast(device, bfloat16)` (official CLI);
    bf16                        every weight bfloat16;
    fp16, wo fp16 too           the fp16 model after `wo.half()`, to show what keeping `wo` in float32 prevents.

Columns: max / mean / 99.9th percentile of |feature - fp32 feature| (features = `last_hidden_state.float()`),
max |diff| over the fp32 features' RMS, non-finite features, how many blocks had a residual-stream value over the
float16 max 65504 (forward hooks on each attention and FFN sub-layer, so values are seen before T5's float16 clamp;
`output_hidden_states` would only show the clamped block outputs), the largest |residual stream| and |FFN activation|
(the `wo` input, which is float16 in the fp16 model), and for the gradient of sum(features * R) (R fixed, random) with
respect to the float32 input embeddings its relative L2 error against float32 and whether it is finite.

Weight scales (`--scale`):

default    transformers' own T5 init (embeddings std 1, projections ~ fan_in ** -0.5): the residual stream stays
           around 10, far from anything float16 cannot hold. Not what a trained T5 v1.1 / flan-T5 looks like.
realistic  the default init rescaled so the activations match what has been reported for trained T5 v1.1-family
           encoders (flan-t5-xl is fine-tuned from T5 v1.1 LM-adapted XL, same architecture):
  - embeddings std 11.6: t5-v1_1-small's trained embedding std is 11.64 (Birch-san's measurement in
    huggingface/transformers PR #26441); the default init gives 1.
  - FFN gate / up projections: outputs with std 8 and 50, so their maxima are ~37 and ~240 like the float16 overflow
    report for google/mt5-small (T5 v1.1 architecture) in transformers' debugging docs (`DebugUnderflowOverflow`:
    wi_0 out 37.0, wi_1 out 237, wo input 9.74e3, wo output 6.27e4 in encoder block 2).
  - a few residual "outlier" channels: T5 v1.1 XL needs its residual and FFN output scaled by 1/2 at encoder layer 1
    and by another 1/4 at layer 5 to stay inside float16 (NovelAI/t5, nai_t5/checkpoint_info.py,
    `enc_ffn_out_scale_dict`), i.e. FFN writes above 65504 at layer 1 and above 131008 at layer 5. Here 4 hidden
    units of the FFN of layer 1, and 4 of layer 5, each get one large `wo` weight into one of 4 fixed residual
    channels, sized so the writes peak at 1e5 (layer 1) and 2e5 (layer 5).
  - ordinary FFN and attention writes of std 1000 and 300, which with the outliers give a residual stream whose RMS
    grows to ~5e3 and whose max is ~2e5 from layer 5 on, like the debug dump in transformers PR #10956 (T5/mT5
    under AMP: min/max -2.77e5 / 2.75e5, variance 5.45e7, i.e. std 7.4e3). The outlier channels dominate each
    token's RMS, so their final features reach ~40 while the feature RMS is 1: the largest differences sit there.
  The linear maps are rescaled by forward hooks during one float32 calibration pass on the benchmark prompts (a
  layer's gain is set from its measured output before the next layer runs); attention q/k, the relative position
  bias and the RMSNorm weights keep the default init. Why HF keeps `wo` in float32: transformers issue #20287
  (flan-t5-xxl), T5 was trained with bfloat16 activations (google-research/text-to-text-transfer-transformer #539).

Gradient magnitude (`--grad_scale S ...`): R has unit RMS, so the default gradient at T5's output is of order 1 and
nothing underflows. Textual inversion's real loss sends back much less (d loss / d feature RMS 1.3e-4 to 3.3e-4
measured on the toy model, estimated 1e-5 to 3e-5 for Infinity-2B: docs/hardware.md), and the float16 model holds
the gradient in float16 at its output, inside every attention and FFN sub-layer and at its input, where float16
flushes values below 2**-25 ~ 3e-8 to zero and keeps fewer digits below its smallest normal 2**-14 ~ 6.1e-5. Each S
re-runs the backward of the same forward with R * S, in every precision (float32 too, the reference at that S), and
prints a second table: the input gradient's relative L2 error against float32, the fraction of its entries that are
exactly zero where float32's are not, the fraction of attention-output gradients (the `o` projection's output,
float16 in the fp16 models) that are exactly zero, and the same with a loss scale: R * S * 2**k before the backward
and the gradient divided by 2**k after (exact, a power of two). `--loss_scale` picks k: `auto` brings the gradient
at T5's output back to unit RMS, k = round(-log2(S * rms(R))) (what a per-step scale computed from the incoming
gradient would do); a number is a static scale, e.g. 65536 (= GradScaler's initial 2**16). Each S adds a backward
per precision and loss scale (a few seconds each at 24 layers; the 12 S of docs/hardware.md took 30 minutes on 2
shared CPU cores).

For scale: on the real T5 v1.1 XXL encoder, NovelAI/t5's README measures |diff| to float32 of 5e-5 (median) to
6.5e-4 (99.99th percentile) for HF fp16 and 6e-4 to 8e-3 for pure bf16.

The float32 model lives while its reference runs, then one low-precision copy at a time (peak RSS ~11 GB for 24 layers;
the fp16 reload goes through a temporary directory of ~5 GB that is deleted afterwards).
"""

import argparse
import contextlib
import gc
import math
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import T5Config, T5EncoderModel
from transformers.utils import logging as hf_logging

FP16_MAX = torch.finfo(torch.float16).max
EOS_ID, PAD_ID, FIRST_ID, LAST_ID = 1, 0, 2, 32000
PROMPT_LENGTHS = (3, 9, 17, 28, 44, 60)  # tokens, EOS included

# "realistic" activation targets (sources in the module docstring)
EMBED_STD = 11.6
WI0_OUT_STD = 8.0
WI1_OUT_STD = 50.0
ATTN_OUT_STD = 300.0
FFN_OUT_STD = 1000.0
NUM_OUTLIER_CHANNELS = 4
OUTLIER_WRITES = {1: 1.0e5, 5: 2.0e5}  # layer -> max |FFN output| in the outlier channels


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_layers", type=int, default=24, help="encoder blocks (flan-t5-xl: 24)")
    parser.add_argument("--scale", default="both", choices=["default", "realistic", "both"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument(
        "--grad_scale",
        type=float,
        nargs="+",
        default=[],
        help="also backpropagate R * S for each S (the RMS of d loss / d feature), e.g. 1e-4 1e-6 1e-8",
    )
    parser.add_argument(
        "--loss_scale",
        nargs="+",
        default=["auto"],
        help="with --grad_scale: loss scales to try, 'auto' (back to unit RMS) or a number (a power of two)",
    )
    args = parser.parse_args()
    if any(not (s > 0 and math.isfinite(s)) for s in args.grad_scale):
        parser.error("--grad_scale takes positive finite numbers")
    for value in args.loss_scale:
        if value != "auto" and not (_float_or_none(value) or 0) > 0:
            parser.error(f"--loss_scale {value}: 'auto' or a positive number")
    return args


def _float_or_none(value: str) -> float | None:
    try:
        result = float(value)
    except ValueError:
        return None
    return result if math.isfinite(result) else None


def flan_t5_xl_config(num_layers: int) -> T5Config:
    return T5Config(
        vocab_size=32128,
        d_model=2048,
        d_kv=64,
        d_ff=5120,
        num_layers=num_layers,
        num_heads=32,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
    )


def random_prompts(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, L) padded with PAD_ID and the real-token mask (B, L)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.full((len(PROMPT_LENGTHS), max(PROMPT_LENGTHS)), PAD_ID, dtype=torch.long)
    for row, length in enumerate(PROMPT_LENGTHS):
        ids[row, : length - 1] = torch.randint(FIRST_ID, LAST_ID, (length - 1,), generator=gen)
        ids[row, length - 1] = EOS_ID
    mask = torch.arange(ids.shape[1])[None, :] < torch.tensor(PROMPT_LENGTHS)[:, None]
    return ids, mask


# ---------------------------------------------------------------------------------------------- realistic scales


@torch.no_grad()
def calibrate_realistic(model: T5EncoderModel, ids: torch.Tensor, mask: torch.Tensor, seed: int) -> None:
    """Rescales the default-initialised float32 model in place to the activation targets above."""
    gen = torch.Generator().manual_seed(seed)
    mask = mask.to(model.device)
    d_model = model.config.d_model
    outliers = torch.randperm(d_model, generator=gen)[:NUM_OUTLIER_CHANNELS].to(model.device)
    ordinary = torch.ones(d_model, dtype=torch.bool, device=model.device)
    ordinary[outliers] = False
    model.shared.weight.mul_(EMBED_STD / model.shared.weight.std())

    def set_std(target, columns=None):
        def hook(module, args, output):
            real = output[mask]
            gain = target / (real if columns is None else real[:, columns]).std()
            module.weight.mul_(gain)
            return output * gain

        return hook

    def wo_hook(layer):
        def hook(module, args, output):
            set_std(FFN_OUT_STD, ordinary)(module, args, output)
            if layer in OUTLIER_WRITES:  # one "massive" hidden unit per outlier channel, scaled to the target max
                hidden = args[0][mask]
                units = torch.randperm(hidden.shape[-1], generator=gen)[:NUM_OUTLIER_CHANNELS].to(hidden.device)
                module.weight[outliers, units] = OUTLIER_WRITES[layer] / hidden[:, units].abs().amax(0)
            return F.linear(args[0], module.weight)

        return hook

    handles = []
    for layer, block in enumerate(model.encoder.block):
        ffn = block.layer[-1].DenseReluDense
        handles += [
            block.layer[0].SelfAttention.o.register_forward_hook(set_std(ATTN_OUT_STD)),
            ffn.wi_0.register_forward_hook(set_std(WI0_OUT_STD)),
            ffn.wi_1.register_forward_hook(set_std(WI1_OUT_STD)),
            ffn.wo.register_forward_hook(wo_hook(layer)),
        ]
    model(input_ids=ids.to(model.device), attention_mask=mask.long())
    for handle in handles:
        handle.remove()


# ---------------------------------------------------------------------------------------------- one run


@dataclass
class Run:
    features: torch.Tensor  # (N real tokens, C) float32
    grad: torch.Tensor  # (N, C) float32, d sum(features * R) / d inputs_embeds
    residual_max: list[float]  # per block, largest |residual stream| after its attention or FFN (before any clamp)
    residual_rms: list[float]  # per block, RMS of its output (before any clamp)
    ffn_act_max: float  # largest |wo input|
    residual_dtypes: set
    # with --grad_scale, per (S, loss scale or None): the input gradient of sum(features * R * S) divided by the
    # loss scale, with that factor; and the fraction of attention-output gradient entries (real tokens) that are 0
    scaled_grads: dict = None
    attn_zero_fraction: dict = None


class ActivationProbe:
    """Forward hooks recording per-block residual-stream maxima and the FFN activation maximum on real tokens."""

    def __init__(self, model: T5EncoderModel, mask: torch.Tensor):
        self.mask = mask
        self.residual_max = [0.0] * len(model.encoder.block)
        self.residual_rms = [0.0] * len(model.encoder.block)
        self.ffn_act_max = 0.0
        self.dtypes = set()
        self.handles = []
        for layer, block in enumerate(model.encoder.block):
            for sublayer in block.layer:
                self.handles.append(sublayer.register_forward_hook(self._residual_hook(layer)))
            self.handles.append(block.layer[-1].DenseReluDense.wo.register_forward_pre_hook(self._ffn_hook))

    def _absmax(self, x: torch.Tensor) -> float:
        return x.detach()[self.mask].float().abs().max().item()  # inf or nan if any is

    def _residual_hook(self, layer):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            self.dtypes.add(str(hidden.dtype).removeprefix("torch."))
            value = self._absmax(hidden)
            self.residual_max[layer] = value if math.isnan(value) else max(self.residual_max[layer], value)
            self.residual_rms[layer] = hidden.detach()[self.mask].float().pow(2).mean().sqrt().item()  # FFN runs last

        return hook

    def _ffn_hook(self, module, args):
        value = self._absmax(args[0])
        self.ffn_act_max = value if math.isnan(value) else max(self.ffn_act_max, value)

    def remove(self):
        for handle in self.handles:
            handle.remove()


class AttentionGradProbe:
    """Backward hooks counting exactly-zero entries of the gradient at each attention output projection's output
    (real tokens): float16 in the fp16 models, where the gradient flushes to zero first."""

    def __init__(self, model: T5EncoderModel, mask: torch.Tensor):
        self.mask = mask
        self.zeros = self.total = 0
        self.handles = [
            block.layer[0].SelfAttention.o.register_full_backward_pre_hook(self._hook) for block in model.encoder.block
        ]

    def _hook(self, module, grad_output):
        grad = grad_output[0].detach()[self.mask]
        self.zeros += (grad == 0).sum().item()
        self.total += grad.numel()

    def take(self) -> float:
        fraction = self.zeros / max(self.total, 1)
        self.zeros = self.total = 0
        return fraction

    def remove(self):
        for handle in self.handles:
            handle.remove()


def loss_scale_factor(loss_scale: str | None, grad_rms: float) -> float:
    """A power of two: 1 without a loss scale; 'auto' brings a gradient of RMS grad_rms to about 1."""
    if loss_scale is None:
        return 1.0
    if loss_scale == "auto":
        return 2.0 ** round(-math.log2(grad_rms))
    return float(loss_scale)


def run_encoder(model, inputs32, mask, readout, autocast_dtype=None, grad_scales=(), loss_scales=()) -> Run:
    """Features, and the gradient of sum(features * readout) with respect to the float32 input embeddings (and of
    sum(features * readout * S) for each S of grad_scales, plain and under each of loss_scales)."""
    model.requires_grad_(False)
    probe = ActivationProbe(model, mask)
    sweep = [(scale, loss_scale) for scale in grad_scales for loss_scale in (None, *loss_scales)]
    attention_probe = AttentionGradProbe(model, mask) if sweep else None
    leaf = inputs32.clone().requires_grad_(True)
    embed_dtype = model.get_input_embeddings().weight.dtype
    if autocast_dtype is None:
        context = contextlib.nullcontext()
    else:
        context = torch.autocast(inputs32.device.type, dtype=autocast_dtype)
    with context:
        out = model(inputs_embeds=leaf.to(embed_dtype), attention_mask=mask.long())
    features = out.last_hidden_state.float()
    (features * readout)[mask].sum().backward(retain_graph=bool(sweep))
    probe.remove()
    grad = leaf.grad[mask].cpu()
    scaled_grads, attn_zero_fraction = {}, {}
    if sweep:
        attention_probe.take()
        readout_rms = readout[mask].pow(2).mean().sqrt().item()
        for i, (scale, loss_scale) in enumerate(sweep):
            factor = loss_scale_factor(loss_scale, scale * readout_rms)
            leaf.grad = None
            (features * (readout * (scale * factor)))[mask].sum().backward(retain_graph=i + 1 < len(sweep))
            scaled_grads[scale, loss_scale] = (leaf.grad[mask].cpu() / factor, factor)
            attn_zero_fraction[scale, loss_scale] = attention_probe.take()
        attention_probe.remove()
    return Run(
        features=features.detach()[mask].cpu(),
        grad=grad,
        residual_max=probe.residual_max,
        residual_rms=probe.residual_rms,
        ffn_act_max=probe.ffn_act_max,
        residual_dtypes=probe.dtypes,
        scaled_grads=scaled_grads,
        attn_zero_fraction=attn_zero_fraction,
    )


def check_dtypes(model: T5EncoderModel, expected_wo: torch.dtype, expected_rest: torch.dtype) -> None:
    for name, param in model.named_parameters():
        expected = expected_wo if name.endswith("DenseReluDense.wo.weight") else expected_rest
        if param.dtype != expected:
            raise RuntimeError(f"{name} is {param.dtype}, expected {expected}")


def collect_garbage() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- one scale


def bench_scale(args, scale: str) -> tuple[dict[str, Run], dict[str, float]]:
    device = torch.device(args.device)
    config = flan_t5_xl_config(args.num_layers)
    torch.manual_seed(args.seed)
    model = T5EncoderModel(config).eval().to(device)
    ids, mask = random_prompts(args.seed)
    ids, mask = ids.to(device), mask.to(device)
    if scale == "realistic":
        calibrate_realistic(model, ids, mask, seed=args.seed + 1)
    with torch.no_grad():
        inputs32 = model.get_input_embeddings()(ids)
    gen = torch.Generator().manual_seed(args.seed + 3)
    readout = torch.randn(inputs32.shape, generator=gen).to(device)  # R

    sweep = {"grad_scales": args.grad_scale, "loss_scales": args.loss_scale}
    runs = {"fp32 (reference)": run_encoder(model, inputs32, mask, readout, grad_scales=args.grad_scale)}
    info = {
        "embedding row norm": model.shared.weight.norm(dim=-1).mean().item(),
        "fp32 feature RMS": runs["fp32 (reference)"].features.pow(2).mean().sqrt().item(),
        "fp32 grad RMS": runs["fp32 (reference)"].grad.pow(2).mean().sqrt().item(),
    }
    with tempfile.TemporaryDirectory(prefix="bench_t5_precision_") as tmp:
        model.save_pretrained(tmp)
        del model
        collect_garbage()

        model = T5EncoderModel.from_pretrained(tmp, dtype=torch.float16).eval().to(device)
        check_dtypes(model, torch.float32, torch.float16)  # what from_pretrained(dtype=float16) gives flan-T5
        runs["fp16 (HF, wo fp32)"] = run_encoder(model, inputs32, mask, readout, **sweep)
        runs["fp16 + autocast bf16"] = run_encoder(
            model, inputs32, mask, readout, autocast_dtype=torch.bfloat16, **sweep
        )
        for block in model.encoder.block:
            block.layer[-1].DenseReluDense.wo.half()
        check_dtypes(model, torch.float16, torch.float16)
        fp16_everywhere = run_encoder(model, inputs32, mask, readout, **sweep)
        del model
        collect_garbage()

        model = T5EncoderModel.from_pretrained(tmp, dtype=torch.bfloat16).eval().to(device)
        model.to(torch.bfloat16)  # in case a transformers version keeps wo in float32 for bfloat16 too
        check_dtypes(model, torch.bfloat16, torch.bfloat16)
        runs["bf16"] = run_encoder(model, inputs32, mask, readout, **sweep)
        del model
        collect_garbage()
    runs["fp16, wo fp16 too"] = fp16_everywhere
    return runs, info


# ---------------------------------------------------------------------------------------------- report


def fmt(value: float) -> str:
    if math.isnan(value) or math.isinf(value):
        return str(value)
    return f"{value:.2e}" if value != 0 else "0"


def table_row(scale: str, name: str, run: Run, ref: Run) -> str:
    diff = (run.features - ref.features).abs()
    ref_rms = ref.features.pow(2).mean().sqrt()
    bad_features = (~torch.isfinite(run.features)).sum().item()
    over = sum(1 for value in run.residual_max if not value <= FP16_MAX)  # nan counts as over
    grad_error = ((run.grad - ref.grad).norm() / ref.grad.norm()).item()
    grad_finite = torch.isfinite(run.grad).all().item()
    cells = [
        scale,
        name,
        fmt(diff.max().item()),
        fmt(diff.mean().item()),
        fmt(torch.quantile(diff.flatten(), 0.999).item()),
        fmt((diff.max() / ref_rms).item()),
        f"yes ({bad_features})" if bad_features else "no",
        f"{over}/{len(run.residual_max)}",
        fmt(max(run.residual_max, key=lambda v: math.inf if math.isnan(v) else v)),
        fmt(run.ffn_act_max),
        fmt(grad_error),
        "yes" if grad_finite else "no",
    ]
    return "| " + " | ".join(cells) + " |"


FP16_MIN_NORMAL = torch.finfo(torch.float16).tiny  # 2**-14


def scaled_rows(scale_name: str, name: str, run: Run, ref: Run) -> list[str]:
    """One row per (S, loss scale): the input gradient of sum(features * R * S) against float32's at the same S."""
    rows = []
    for scale, loss_scale in run.scaled_grads:
        (grad, factor), (ref_grad, _) = run.scaled_grads[scale, loss_scale], ref.scaled_grads[scale, None]
        finite = torch.isfinite(grad).all().item()
        error = ((grad - ref_grad).norm() / ref_grad.norm()).item()
        lost = ((grad == 0) & (ref_grad != 0)).float().mean().item()
        ref_rms = ref_grad.pow(2).mean().sqrt().item()
        below_normal = (ref_grad.abs() < FP16_MIN_NORMAL).float().mean().item()
        ls_label = "none" if loss_scale is None else f"{loss_scale} (2^{round(math.log2(factor))})"
        cells = [
            scale_name,
            name,
            fmt(scale),
            fmt(ref_rms),
            f"{below_normal:.1%}",
            ls_label,
            fmt(error),
            f"{lost:.1%}",
            f"{run.attn_zero_fraction[scale, loss_scale]:.1%}",
            "yes" if finite else "no",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def main():
    args = parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    scales = ["default", "realistic"] if args.scale == "both" else [args.scale]
    start = time.time()
    rows, sweep_rows = [], []
    for scale in scales:
        scale_start = time.time()
        runs, info = bench_scale(args, scale)
        ref = runs["fp32 (reference)"]
        print(
            f"[{scale}] embedding row norm {info['embedding row norm']:.3g}, fp32 feature RMS "
            f"{info['fp32 feature RMS']:.3g}, fp32 input-gradient RMS {info['fp32 grad RMS']:.3g}, "
            f"max |fp32 FFN activation| {ref.ffn_act_max:.3g}"
        )
        print(f"[{scale}] fp32 max |residual stream| per block: " + ", ".join(f"{v:.3g}" for v in ref.residual_max))
        print(f"[{scale}] fp32 residual stream RMS per block: " + ", ".join(f"{v:.3g}" for v in ref.residual_rms))
        for name, run in runs.items():
            print(f"[{scale}] {name}: residual stream dtypes {sorted(run.residual_dtypes)}")
        print(f"[{scale}] {time.time() - scale_start:.0f} s\n")
        rows += [table_row(scale, name, run, ref) for name, run in runs.items()]
        for name, run in runs.items():
            sweep_rows += scaled_rows(scale, name, run, ref)

    header = [
        "scale",
        "precision",
        "max abs diff",
        "mean abs diff",
        "p99.9 abs diff",
        "max diff / fp32 RMS",
        "inf/NaN in features",
        "layers over fp16 max",
        "max abs residual",
        "max abs FFN act",
        "grad rel. error",
        "grad finite",
    ]
    print(
        f"flan-t5-xl-shaped encoder, {args.num_layers} layers, prompts of {list(PROMPT_LENGTHS)} tokens, "
        f"{args.device}, torch {torch.__version__}\n"
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    print("\n".join(rows))
    if sweep_rows:
        header = [
            "scale",
            "precision",
            "S (d loss / d feature RMS)",
            "fp32 input-grad RMS",
            "fp32 input grads < 6.1e-5",
            "loss scale",
            "input-grad rel. error",
            "input grads zeroed",
            "attn-output grads zeroed",
            "finite",
        ]
        print("\ninput gradient of sum(features * R * S), against float32 at the same S:\n")
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        print("\n".join(sweep_rows))
    print(f"\ntotal {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
