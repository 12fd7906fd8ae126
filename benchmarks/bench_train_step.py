#!/usr/bin/env python
"""Cost of one textual-inversion step, as ratios measured in one run.

    python benchmarks/bench_train_step.py                       # tiny model on CPU
    python benchmarks/bench_train_step.py --model infinity_2b --pn 0.25M 1M --device cuda

    python benchmarks/bench_train_step.py --trace_memory --pn 0.25M 1M  # 2B memory, no GPU needed

For each pn it times a no-grad forward of the batch (T5 + transformer + loss), this project's TI
step in input mode (through T5), in output mode (cached T5 features, no T5) and in output mode
with a vector per scale (`--vector_layout per_scale`: a prefix forward per scale), and the naive
step (the whole T5 embedding matrix in AdamW, prompts padded to 512 tokens, the VAE re-encoding
the images every step, attention with a dense block-causal mask, no checkpointing), then the
levers one at a time. Memory is the CUDA peak on a GPU; on the CPU it is the bytes autograd saves
for the backward pass (the part of the peak the levers change).
Random weights: speed and memory do not depend on them. `--model infinity_2b` builds the full 2B
transformer and a flan-t5-xl-shaped encoder.

`--trace_memory` runs one TI step of the full Infinity-2B + flan-t5-xl shapes (bf16) on fake
tensors: nothing is computed or allocated, but every tensor an op creates is recorded until the
last reference to its storage (autograd's included) is gone, which gives the peak of live tensor
bytes a GPU would hold (before allocator overhead and the CUDA context).
"""

import argparse
import statistics
import tempfile
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import infinity_t2i.transformer as transformer_module
from infinity_t2i.config import MODEL_PRESETS
from infinity_t2i.resolution import get_schedule
from infinity_t2i.text import TextCondition, encode_prompt
from infinity_t2i.textual_inversion import LearnedVectors, add_placeholder_tokens
from infinity_t2i.training import bitwise_loss, make_training_inputs
from infinity_t2i.transformer import InfinityTransformer
from infinity_t2i.vae import BSQVAE

PROMPT = "a photo of a <concept> on the beach"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", choices=["tiny", "infinity_2b"])
    parser.add_argument("--pn", nargs="+", default=["0.06M", "0.25M"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median reported)")
    parser.add_argument("--trace_memory", action="store_true", help="trace the 2B step's peak memory on fake tensors")
    return parser.parse_args()


def flan_t5_xl_config():
    """The encoder shapes of google/flan-t5-xl (random weights are built from it)."""
    from transformers import T5Config

    return T5Config(
        vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_heads=32,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
    )  # fmt: skip


def build(model: str, device: str, dtype: torch.dtype):
    from transformers import AutoTokenizer, T5EncoderModel

    from toy_infinity.tiny import T5_WIDTH as TINY_T5_WIDTH
    from toy_infinity.tiny import build_tiny_models, build_tiny_text_encoder

    text_dir = build_tiny_text_encoder(tempfile.mkdtemp())  # its tokenizer serves both sizes
    tokenizer = AutoTokenizer.from_pretrained(text_dir, legacy=True)
    if model == "tiny":
        transformer, vae = build_tiny_models()
        text_encoder = T5EncoderModel.from_pretrained(text_dir)
        assert text_encoder.config.d_model == TINY_T5_WIDTH
    else:
        preset = MODEL_PRESETS[model]
        with torch.device(device):
            transformer = InfinityTransformer(preset.transformer)
            vae = BSQVAE(preset.vae)
            text_encoder = T5EncoderModel(flan_t5_xl_config())
    transformer.set_block_dtype(dtype).to(device).requires_grad_(False)
    text_encoder.to(device, dtype).eval().requires_grad_(False)
    vae.to(device).eval().requires_grad_(False)
    return tokenizer, text_encoder, transformer, vae


def masked_attention(q, k, v, scale_lengths):
    """The baseline: one SDPA call over all tokens with a dense (L, L) block-causal mask."""
    scale_of = torch.repeat_interleave(
        torch.arange(len(scale_lengths), device=q.device), torch.tensor(scale_lengths, device=q.device)
    )
    return F.scaled_dot_product_attention(q, k, v, attn_mask=scale_of[None, :] <= scale_of[:, None], scale=1.0)


@contextmanager
def attention(kind: str):
    original = transformer_module.block_causal_attention
    if kind == "masked":
        transformer_module.block_causal_attention = masked_attention
    try:
        yield
    finally:
        transformer_module.block_causal_attention = original


class Setup:
    """One image, one prompt with a learned placeholder, everything a step needs."""

    def __init__(self, tokenizer, text_encoder, transformer, vae, pn, device):
        self.tokenizer, self.text_encoder, self.transformer, self.vae = tokenizer, text_encoder, transformer, vae
        self.schedule = get_schedule(1.0, pn)
        stride = vae.config.patch_size * (2 if transformer.config.spatial_patchify else 1)
        height, width = self.schedule.image_size(stride)
        self.pixels = torch.rand(1, 3, height, width, device=device) * 2 - 1
        with torch.no_grad():
            self.features = vae.encode(self.pixels)
        if "<concept>" not in tokenizer.get_vocab():
            add_placeholder_tokens(tokenizer, ["<concept>"])
        self.token_id = tokenizer.convert_tokens_to_ids("<concept>")
        embedding = text_encoder.get_input_embeddings()
        if embedding.num_embeddings <= self.token_id:
            text_encoder.resize_token_embeddings(self.token_id + 1)
        self.learned = LearnedVectors([self.token_id], embedding.weight[:1].float().clone()).to(device)
        self.optimizer = torch.optim.AdamW(self.learned.parameters(), lr=1e-3)
        start = embedding.weight[:1].float().expand(len(self.schedule), -1, -1).clone()  # a set per scale
        self.learned_per_scale = LearnedVectors([self.token_id], start).to(device)
        self.optimizer_per_scale = torch.optim.AdamW(self.learned_per_scale.parameters(), lr=1e-3)
        self.device = device
        with torch.no_grad():  # output mode: the caption's T5 features, encoded once
            self.input_ids = torch.tensor([tokenizer(PROMPT).input_ids], device=device)
            self.cached = encode_prompt(tokenizer, text_encoder, [PROMPT])

    def loss(self, text: TextCondition, features: torch.Tensor) -> torch.Tensor:
        inputs = make_training_inputs(features, self.schedule, self.transformer.config.spatial_patchify)
        return bitwise_loss(self.transformer(text, inputs.x_tokens, self.schedule), inputs.labels, self.schedule, True)

    def encode(self) -> TextCondition:
        embedding = self.text_encoder.get_input_embeddings()
        return encode_prompt(
            self.tokenizer, self.text_encoder, [PROMPT], embed_tokens=lambda ids: self.learned(ids, embedding(ids))
        )

    @torch.no_grad()
    def forward(self):
        return self.loss(self.encode(), self.features)

    def ours(self):
        loss = self.loss(self.encode(), self.features)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def ours_output_mode(self):
        """--ti_mode output: the learned vector written over the cached T5 features, no T5 at all."""
        text = TextCondition(self.learned(self.input_ids, self.cached.features), self.cached.mask)
        self.loss(text, self.features).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def ours_per_scale(self):
        """--vector_layout per_scale: output mode with a vector for every scale."""
        rows = self.learned_per_scale(self.input_ids, self.cached.features)  # S, 1, Lt, C
        self.loss([TextCondition(r, self.cached.mask) for r in rows], self.features).backward()
        self.optimizer_per_scale.step()
        self.optimizer_per_scale.zero_grad(set_to_none=True)

    def naive(self):
        """Diffusers-style: the whole (trainable) embedding matrix in AdamW, other rows restored
        after the step; 512-token padding; the VAE encodes the image every step."""
        if not hasattr(self, "naive_optimizer"):
            weight = self.text_encoder.get_input_embeddings().weight
            self.naive_weight = weight.requires_grad_(True)
            self.naive_original = weight.detach().clone()
            self.naive_optimizer = torch.optim.AdamW([weight], lr=1e-3)
        with torch.no_grad():
            features = self.vae.encode(self.pixels)
        tokens = self.tokenizer(
            [PROMPT], padding="max_length", max_length=512, truncation=True, return_tensors="pt"
        ).to(self.device)
        hidden = self.text_encoder(
            input_ids=tokens.input_ids, attention_mask=tokens.attention_mask
        ).last_hidden_state.float()
        loss = self.loss(TextCondition(hidden, tokens.attention_mask), features)
        loss.backward()
        self.naive_optimizer.step()
        self.naive_optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            keep = torch.arange(self.naive_weight.shape[0], device=self.device) != self.token_id
            self.naive_weight[keep] = self.naive_original[keep]

    def end_naive(self):
        if hasattr(self, "naive_optimizer"):
            self.naive_weight.requires_grad_(False)
            del self.naive_optimizer


def measure(fn, device: str, repeats: int) -> tuple[float, float]:
    """Median seconds and memory (CUDA peak bytes, or bytes saved for backward on the CPU)."""
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    fn()  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        saved[0] = 0
        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    memory = torch.cuda.max_memory_allocated() if device.startswith("cuda") else saved[0]
    return statistics.median(times), memory


class LiveStorageBytes(TorchDispatchMode):
    """Peak bytes of the storages ops create, each counted until it is freed (also when only
    autograd still holds it). Storages that exist before (weights, inputs) are registered at 0."""

    def __init__(self, existing):
        super().__init__()
        self.storages, self.peak, self.ops = {}, 0, 0
        for tensor in existing:
            self._add(tensor, count=False)

    def _add(self, tensor, count=True):
        storage = tensor.untyped_storage()
        if storage._cdata not in self.storages:
            self.storages[storage._cdata] = (StorageWeakRef(storage), storage.nbytes() if count else 0)

    def live(self) -> int:
        for key in [k for k, (ref, _) in self.storages.items() if ref.expired()]:
            del self.storages[key]
        return sum(n for _, n in self.storages.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t)
        self.ops += 1
        if self.ops % 16 == 0:  # polling every op would be slow; the peak lasts longer than that
            self.peak = max(self.peak, self.live())
        return out


def trace_memory(pn: str, checkpointing: bool, ti_mode: str) -> tuple[int, int, int]:
    """(weight bytes, step peak bytes, tokens) of a TI step of the 2B shapes, on fake tensors. In
    output mode T5 is not on the device (the captions were encoded before the loop); `per_scale`
    is output mode with a vector for every scale (--vector_layout per_scale)."""
    from transformers import T5EncoderModel

    with torch.device("meta"):
        transformer = InfinityTransformer(MODEL_PRESETS["infinity_2b"].transformer).set_block_dtype(torch.bfloat16)
        t5 = T5EncoderModel(flan_t5_xl_config()).to(torch.bfloat16)
        vae = BSQVAE(MODEL_PRESETS["infinity_2b"].vae)
    transformer.requires_grad_(False).gradient_checkpointing = checkpointing
    t5.requires_grad_(False)
    with FakeTensorMode(allow_non_fake_inputs=True):
        transformer.to_empty(device="cpu")
        t5.to_empty(device="cpu")
        schedule = get_schedule(1.0, pn)
        on_device = (transformer, t5, vae) if ti_mode == "input" else (transformer, vae)
        weights = sum(t.numel() * t.element_size() for m in on_device for t in m.state_dict().values())
        token_id = 32100
        shape = (len(schedule), 1, 2048) if ti_mode == "per_scale" else (1, 2048)
        learned = LearnedVectors([token_id], torch.zeros(shape))
        optimizer = torch.optim.AdamW(learned.parameters(), lr=1e-3)
        input_ids = torch.tensor(
            [[3, 9, 1712, 13, 3, 9, token_id, 30, 8, 2608, 1]]
        )  # ~ "a photo of a <tok> on the beach"
        mask = torch.ones_like(input_ids)
        x_tokens = torch.randn(1, schedule.total_len - 1, 32)
        labels = torch.randint(0, 2, (1, schedule.total_len, 32))
        cached = torch.randn(1, input_ids.shape[1], 2048)  # output mode: the caption's T5 features
        existing = [
            *transformer.state_dict().values(),
            *t5.state_dict().values(),
            learned.weight,
            input_ids,
            mask,
            x_tokens,
            labels,
            cached,
        ]
        tracker = LiveStorageBytes(existing)
        with tracker:
            if ti_mode == "input":
                embeds = learned(input_ids, t5.get_input_embeddings()(input_ids))
                text = TextCondition(t5(inputs_embeds=embeds, attention_mask=mask).last_hidden_state.float(), mask)
            elif ti_mode == "output":
                text = TextCondition(learned(input_ids, cached), mask)
            else:
                text = [TextCondition(rows, mask) for rows in learned(input_ids, cached)]
            logits = transformer(text, x_tokens, schedule)
            bitwise_loss(logits, labels, schedule, True).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tracker.peak = max(tracker.peak, tracker.live())
    return weights, tracker.peak, schedule.total_len


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"


def main():
    args = parse_args()
    torch.manual_seed(0)
    if args.trace_memory:
        print("Infinity-2B + flan-t5-xl encoder (bf16) + BSQ-VAE (fp32), batch 1, traced on fake tensors")
        print(
            f"{'pn':>6} {'tokens':>6} | {'ti_mode':>9} | {'checkpointing':>13} | {'weights':>9} {'step peak':>10} "
            f"{'total':>9}"
        )
        for pn in args.pn:
            for ti_mode in ("input", "output", "per_scale"):
                for checkpointing in (False, True):
                    weights, peak, tokens = trace_memory(pn, checkpointing, ti_mode)
                    print(
                        f"{pn:>6} {tokens:>6} | {ti_mode:>9} | {checkpointing!s:>13} | {gib(weights):>9} "
                        f"{gib(peak):>10} {gib(weights + peak):>9}"
                    )
        return
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    models = build(args.model, args.device, dtype)
    memory_kind = "CUDA peak" if args.device.startswith("cuda") else "saved for backward"
    name = (
        torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    )
    print(f"model {args.model}, {name}, weights {str(dtype).removeprefix('torch.')}, memory = {memory_kind}")
    print(f"{'pn':>6} {'tokens':>6} | {'forward':>9} | {'TI step':>9} {'ratio':>6} {'memory':>10} | "
          f"{'output':>9} {'ratio':>6} {'memory':>10} | {'per_scale':>9} {'ratio':>6} {'memory':>10} | "
          f"{'naive step':>10} {'memory':>10} {'naive/ours':>10}")  # fmt: skip
    levers = []
    for pn in args.pn:
        setup = Setup(*models, pn, args.device)
        transformer = models[2]
        transformer.gradient_checkpointing = args.device.startswith("cuda")  # the memory lever GPUs need
        forward, _ = measure(setup.forward, args.device, args.repeats)
        ours, ours_mem = measure(setup.ours, args.device, args.repeats)
        output_mode, output_mem = measure(setup.ours_output_mode, args.device, args.repeats)
        per_scale, per_scale_mem = measure(setup.ours_per_scale, args.device, args.repeats)
        transformer.gradient_checkpointing = False
        with attention("masked"):
            naive, naive_mem = measure(setup.naive, args.device, args.repeats)
        setup.end_naive()
        print(f"{pn:>6} {setup.schedule.total_len:>6} | {forward:>8.3f}s | "
              f"{ours:>8.3f}s {ours / forward:>5.2f}x {gib(ours_mem):>10} | "
              f"{output_mode:>8.3f}s {output_mode / forward:>5.2f}x {gib(output_mem):>10} | "
              f"{per_scale:>8.3f}s {per_scale / forward:>5.2f}x {gib(per_scale_mem):>10} | "
              f"{naive:>9.3f}s {gib(naive_mem):>10} {naive / ours:>9.2f}x")  # fmt: skip
        # the levers, each against this project's step without it
        transformer.gradient_checkpointing = False
        plain, plain_mem = measure(setup.ours, args.device, args.repeats)
        with attention("masked"):
            masked, masked_mem = measure(setup.ours, args.device, args.repeats)
        transformer.gradient_checkpointing = True
        ckpt, ckpt_mem = measure(setup.ours, args.device, args.repeats)
        transformer.gradient_checkpointing = False
        levers.append((pn, plain, plain_mem, masked, masked_mem, ckpt, ckpt_mem))
    print("\nlevers (TI step; memory as above)")
    print(f"{'pn':>6} | {'per-scale attention':>22} | {'dense masked attention':>24} | {'+ block checkpointing':>24}")
    for pn, plain, plain_mem, masked, masked_mem, ckpt, ckpt_mem in levers:
        print(
            f"{pn:>6} | {plain:>8.3f}s {gib(plain_mem):>12} | {masked:>8.3f}s {gib(masked_mem):>14} | {ckpt:>8.3f}s "
            f"{gib(ckpt_mem):>14}"
        )


if __name__ == "__main__":
    main()
