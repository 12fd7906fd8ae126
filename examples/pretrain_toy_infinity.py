"""Pretrains a toy Infinity on the procedural toy world (toy_infinity/world.py), on CPU, from scratch.

One run, in order: render every view of every object pretraining shows (6528 images); train a SentencePiece tokenizer
on its captions and build a small random T5 encoder; train a BSQ-VAE; encode every image to VAE
features once; train the Infinity transformer on them with the package's training objective,
and the T5 encoder with it, drawing a fresh object and caption for every sample; save the
pipeline in half precision and render a preview grid through InfinityPipeline.from_pretrained.
Every --checkpointing_steps of either stage, the whole state (text encoder, VAE, transformer,
optimizer, random generators) goes to --checkpoint_dir; --resume continues from it and ends with the
weights an uninterrupted run ends with.

    python examples/pretrain_toy_infinity.py            # 38 minutes on 2 CPU cores (2268 s measured)
    python examples/pretrain_toy_infinity.py --resume   # after an interruption
    python examples/pretrain_toy_infinity.py --steps 1600 --vae_bits 8 --out /tmp/toy-b8   # what buys sharpness
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from infinity_t2i.config import InfinityConfig, VAEConfig
from infinity_t2i.grids import labelled_grid
from infinity_t2i.multiscale import residual_quantize
from infinity_t2i.pipeline import InfinityPipeline, load_text_encoder
from infinity_t2i.resolution import get_schedule
from infinity_t2i.text import encode_prompt
from infinity_t2i.training import bitwise_loss, make_training_inputs
from infinity_t2i.transformer import InfinityTransformer
from infinity_t2i.vae import BSQVAE
from toy_infinity import world as toy_world
from toy_infinity.tiny import T5_WIDTH, write_text_encoder

EXAMPLES = os.path.dirname(os.path.abspath(__file__))

VOCAB_SIZE = 160  # BPE pieces: every caption word but one ends up a single piece


def vae_config(bits: int) -> VAEConfig:
    return VAEConfig(
        codebook_dim=bits,
        patch_size=4,
        # 48 channels, not 32: GroupNorm has 32 (or 24) groups, and with one channel per group a flat
        # background normalises to zero, so the VAE cannot tell a red background from a blue one.
        base_channels=48,
        encoder_ch_mult=(1, 1),
        decoder_ch_mult=(1, 1, 1),
        num_res_blocks=0,
    )


def transformer_config(width: int, depth: int, bits: int) -> InfinityConfig:
    # heads of 32 channels, as at the default width of 128; block_chunks only names state-dict keys
    return InfinityConfig(
        embed_dim=width,
        depth=depth,
        num_heads=width // 32,
        mlp_ratio=4.0,
        block_chunks=2 if depth % 2 == 0 else 1,
        text_channels=T5_WIDTH,
        text_maxlen=64,
        codebook_dim=bits,
    )


PREVIEW_PROMPTS = [
    "a photo of a red circle in the snow",
    "a photo of a blue square on sand",
    "a photo of a green triangle at night",
    "a photo of a yellow cross in the sky",
    "a photo of a white diamond on bricks",
    "a photo of a large pink circle",
    "a photo of a small black square on grass",
    "a photo of a circle",
    "a photo of a red thing",
    "a photo of a thing at night",
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Pretrain the toy Infinity (tokenizer, T5, BSQ-VAE, transformer) on CPU.")
    p.add_argument("--out", default=os.path.join(EXAMPLES, "toy-infinity"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corpus_size", type=int, default=5000, help="captions the tokenizer is trained on")
    p.add_argument("--vae_steps", type=int, default=600)
    p.add_argument("--vae_batch_size", type=int, default=8)
    p.add_argument("--vae_lr", type=float, default=3e-3)
    p.add_argument("--commitment", type=float, default=0.25, help="weight of |features - sg(quantized)|^2")
    p.add_argument("--steps", type=int, default=3200, help="transformer steps")
    p.add_argument("--width", type=int, default=128, help="transformer width (a multiple of 32)")
    p.add_argument("--depth", type=int, default=4, help="transformer blocks")
    p.add_argument("--vae_bits", type=int, default=16, help="bits per VAE token (BSQ codebook dimension)")
    p.add_argument(
        "--tokens_per_step", type=int, default=6144, help="batch size x sequence length of a transformer step"
    )
    p.add_argument("--full_rate", type=float, default=0.3, help="share of the steps that train all scales")
    p.add_argument(
        "--min_scales", type=int, default=3, help="the other steps train the first k scales, k uniform from here"
    )
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument(
        "--cond_drop_rate", type=float, default=0.1, help="prompt dropout, so that CFG has an unconditional model"
    )
    p.add_argument("--self_correction", type=float, default=0.1, help="bitwise self-correction strength")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--device", default="cpu", help="cuda trains in minutes for experiments; the committed model is trained on CPU"
    )
    p.add_argument("--preview", default=os.path.join(tempfile.gettempdir(), "toy-infinity-preview.png"))
    p.add_argument("--no_preview", action="store_true", help="Skip the preview grid.")
    p.add_argument("--checkpoint_dir", default=os.path.join("outputs", "pretrain-toy-infinity"))
    p.add_argument("--checkpointing_steps", type=int, default=100, help="Save the state every N steps of a stage.")
    p.add_argument("--resume", action="store_true", help="Continue from --checkpoint_dir.")
    args = p.parse_args(argv)
    if args.width % 32:
        p.error(f"--width {args.width}: must be a multiple of 32 (heads of 32 channels)")
    return args


def images_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> (N, 3, H, W) uint8 (kept small; batches become [-1, 1] floats on use)."""
    return torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).contiguous()


class World:
    """Every object of the toy world, rendered once, and the pretraining distribution over them."""

    def __init__(self, seed: int):
        self.objects = toy_world.pretraining_objects()
        self.index = {obj: i for i, obj in enumerate(self.objects)}
        self.pixels = images_to_tensor([toy_world.render(obj) for obj in self.objects])
        self.rng = np.random.default_rng(seed)

    def sample(self, n: int) -> tuple[torch.Tensor, list[str]]:
        """Indices of n objects drawn as in pretraining, and a fresh caption for each."""
        objects = [toy_world.sample_object(self.rng, pretraining=True) for _ in range(n)]
        return torch.tensor([self.index[obj] for obj in objects]), [
            toy_world.describe(obj, self.rng) for obj in objects
        ]


def to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.float().div(127.5).sub(1)


def lr_at(step: int, total: int, peak: float) -> float:
    """Linear warm-up over the first 5% of steps, then cosine decay to 10% of the peak."""
    warmup = max(1, total // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def own_copy(tensor: torch.Tensor) -> torch.Tensor:
    """On the CPU, contiguous and unshared, as safetensors stores tensors (the VAE has an aliased buffer)."""
    return tensor.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)


class Checkpoint:
    """The state at the end of a step of a stage ("vae" or "transformer"): every module's weights,
    the stage's optimizer and the random generators' states as safetensors; the stage, the step, the
    optimizer's settings and the world's numpy generator as JSON. Written to a temporary folder and
    renamed, so that an interruption leaves the last complete state. The tokenizer and T5 config
    live beside it (`text_encoder/`, written once)."""

    def __init__(self, directory: str, every: int):
        self.directory, self.every = directory, every
        self.state_dir = os.path.join(directory, "state")
        self.text_encoder_dir = os.path.join(directory, "text_encoder")

    def remove(self) -> None:
        for folder in (self.state_dir, self.state_dir + ".old", self.state_dir + ".tmp", self.text_encoder_dir):
            shutil.rmtree(folder, ignore_errors=True)

    def load(self) -> dict | None:
        """The last complete state, or None: `state/`, else the copy a save cut between its
        renames left (`state.old/`, or a finished `state.tmp/`)."""
        for folder in (self.state_dir, self.state_dir + ".old", self.state_dir + ".tmp"):
            if os.path.isfile(os.path.join(folder, "state.json")):
                with open(os.path.join(folder, "state.json")) as f:
                    meta = json.load(f)
                return {**meta, "tensors": load_file(os.path.join(folder, "state.safetensors"))}
        return None

    def maybe_save(
        self, stage: str, step: int, total: int, modules: dict, optimizer, world: World, generator, run_args: dict
    ) -> None:
        """After step `step` (0-based) of `total`: every `every` steps and after the last."""
        if (step + 1) % self.every and step + 1 != total:
            return
        tensors = {f"{name}.{k}": own_copy(v) for name, m in modules.items() for k, v in m.state_dict().items()}
        optimizer_state = optimizer.state_dict()
        for index, values in optimizer_state["state"].items():
            tensors.update({f"optimizer.{index}.{k}": own_copy(v) for k, v in values.items()})
        tensors["generator"] = generator.get_state()
        tensors["global_rng"] = torch.get_rng_state()  # the transformer is initialised from it after the VAE
        meta = {
            "stage": stage,
            "step": step + 1,
            "param_groups": optimizer_state["param_groups"],
            "world_rng": world.rng.bit_generator.state,
            "args": run_args,
        }
        tmp, old = self.state_dir + ".tmp", self.state_dir + ".old"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        save_file(tensors, os.path.join(tmp, "state.safetensors"))
        with open(os.path.join(tmp, "state.json"), "w") as f:  # written last: its presence means complete
            json.dump(meta, f)
        shutil.rmtree(old, ignore_errors=True)
        if os.path.isdir(self.state_dir):
            os.replace(self.state_dir, old)  # a complete state exists at every moment
        os.replace(tmp, self.state_dir)
        shutil.rmtree(old, ignore_errors=True)


def run_args(args) -> dict:
    """The arguments a resumed run must share with the run it continues (not where files go)."""
    where = {"out", "threads", "device", "preview", "no_preview", "checkpoint_dir", "checkpointing_steps", "resume"}
    return {k: v for k, v in vars(args).items() if k not in where}


def restore(state: dict | None, stage: str, modules: dict, optimizer, world: World, generator) -> int:
    """Puts a checkpoint of this stage back in place; returns the step to continue from (0 if
    there is none)."""
    if state is None or state["stage"] != stage:
        return 0
    for name, module in modules.items():
        prefix = f"{name}."
        module.load_state_dict({k[len(prefix) :]: v for k, v in state["tensors"].items() if k.startswith(prefix)})
    per_param: dict[int, dict] = {}
    for key, value in state["tensors"].items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            per_param.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": state["param_groups"]})
    world.rng.bit_generator.state = state["world_rng"]
    generator.set_state(state["tensors"]["generator"])
    torch.set_rng_state(state["tensors"]["global_rng"])
    return state["step"]


def quantize_with_straight_through(features: torch.Tensor, grids) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-scale residual bit quantization with a straight-through gradient: the decoder sees
    the quantized codes, the encoder gets the decoder's gradient as if there were no quantizer.
    Returns (decoder input, commitment loss)."""
    quantized = residual_quantize(features.detach(), grids).summed_codes
    commitment = F.mse_loss(features, quantized)
    return features + (quantized - features).detach(), commitment


def train_vae(vae: BSQVAE, world: World, grids, args, checkpoint: Checkpoint, state, generator) -> None:
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, betas=(0.9, 0.95), weight_decay=0.0)
    start = restore(state, "vae", {"vae": vae}, optimizer, world, generator)
    bar = tqdm(range(start, args.vae_steps), desc="VAE", unit="step", initial=start, total=args.vae_steps)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.vae_steps, args.vae_lr)
        batch = to_unit_range(world.pixels[world.sample(args.vae_batch_size)[0]]).to(args.device)
        decoder_input, commitment = quantize_with_straight_through(vae.encoder(batch), grids)
        reconstruction = vae.decoder(decoder_input)
        l1 = (reconstruction - batch).abs().mean()
        loss = l1 + F.mse_loss(reconstruction, batch) + args.commitment * commitment
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        bar.set_postfix(l1=f"{l1.item():.4f}", commit=f"{commitment.item():.4f}")
        checkpoint.maybe_save("vae", step, args.vae_steps, {"vae": vae}, optimizer, world, generator, run_args(args))
    vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_images(vae: BSQVAE, pixels: torch.Tensor, device: str, batch_size: int = 256) -> torch.Tensor:
    batches = [to_unit_range(pixels[i : i + batch_size]).to(device) for i in range(0, len(pixels), batch_size)]
    return torch.cat([vae.encode(batch) for batch in batches])


def train_transformer(
    transformer: InfinityTransformer,
    tokenizer,
    text_encoder,
    features: torch.Tensor,
    world: World,
    schedule,
    args,
    generator,
    checkpoint: Checkpoint,
    state,
    vae: BSQVAE,
) -> None:
    transformer.train()
    text_encoder.train().requires_grad_(True)
    decay = [p for n, p in transformer.named_parameters() if p.ndim >= 2 and "cfg_uncond" not in n]
    no_decay = [p for n, p in transformer.named_parameters() if not (p.ndim >= 2 and "cfg_uncond" not in n)]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": 0.05},
            {"params": no_decay, "weight_decay": 0.0},
            {"params": list(text_encoder.parameters()), "weight_decay": 0.0},  # spare embedding rows stay as built
        ],
        lr=args.lr,
        betas=(0.9, 0.97),
    )
    modules = {"transformer": transformer, "text_encoder": text_encoder, "vae": vae}
    start = restore(state, "transformer", modules, optimizer, world, generator)
    bar = tqdm(range(start, args.steps), desc="transformer", unit="step", initial=start, total=args.steps)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr)
        # Attention is block-causal, so the first k scales of a sequence are computed exactly as
        # in the full one. Most steps train only the first k scales, with as many more images as
        # the shorter sequence allows: the coarse scales decide what is drawn (a mistake there is
        # never undone) and they are cheap, while the 400 tokens of the two finest scales cost
        # 80% of a full step and only sharpen edges.
        if torch.rand((), generator=generator) < args.full_rate:
            num_scales = len(schedule)
        else:
            num_scales = int(torch.randint(args.min_scales, len(schedule), (), generator=generator))
        steps_schedule = schedule.prefix(num_scales)
        n = steps_schedule.total_len
        idx, captions = world.sample(max(1, args.tokens_per_step // n))
        batch_text = encode_prompt(tokenizer, text_encoder, captions)
        inputs = make_training_inputs(features[idx], schedule, False, args.self_correction, generator=generator)
        logits = transformer(
            batch_text,
            inputs.x_tokens[:, : n - 1],
            steps_schedule,
            cond_drop_rate=args.cond_drop_rate,
            generator=generator,
        )
        # Reweighting by scale gives the few coarse tokens a weight comparable to the many fine ones.
        loss = bitwise_loss(logits, inputs.labels[:, :n], steps_schedule, reweight_by_scale=True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], 1.0)
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        checkpoint.maybe_save("transformer", step, args.steps, modules, optimizer, world, generator, run_args(args))
    transformer.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)


def save_half_precision(pipe: InfinityPipeline, directory: str) -> None:
    """Stores the weights in float16 (the loader casts them back to the model's dtype)."""
    for module in (pipe.transformer, pipe.vae, pipe.text_encoder):
        module.half()
    pipe.save_pretrained(directory)
    for module in (pipe.transformer, pipe.vae, pipe.text_encoder):
        module.float()


def save_preview(directory: str, path: str, seed: int) -> None:
    """Four samples per preview prompt, one row each, from the saved folder."""
    pipe = InfinityPipeline.from_pretrained(directory)
    rows = [pipe(prompt, num_images_per_prompt=4, pn=toy_world.PN, seed=seed).images for prompt in PREVIEW_PROMPTS]
    labelled_grid(rows, row_labels=PREVIEW_PROMPTS, column_labels=[f"seed {seed + i}" for i in range(4)]).save(path)


def main(argv=None):
    args = parse_args(argv)
    start = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    schedule = get_schedule(1.0, toy_world.PN)

    world = World(args.seed)
    print(
        f"rendered the {len(world.objects)} objects of the toy world at {toy_world.IMAGE_SIZE}x{toy_world.IMAGE_SIZE}"
    )
    checkpoint = Checkpoint(args.checkpoint_dir, args.checkpointing_steps)
    state = checkpoint.load()
    if args.resume and state is None:
        raise SystemExit(f"error: no checkpoint in {args.checkpoint_dir} to resume; run without --resume")
    if state is not None and not args.resume:
        raise SystemExit(
            f"error: {args.checkpoint_dir} holds a run stopped at {state['stage']} step {state['step']}; pass --resume "
            "to continue it, or remove the folder (or pass another --checkpoint_dir) to start again"
        )
    if state is not None and state["args"] != run_args(args):
        changed = sorted(k for k in run_args(args) if state["args"].get(k) != run_args(args)[k])
        raise SystemExit(f"error: --resume with other settings than the stopped run ({', '.join(changed)})")
    if state is None:
        checkpoint.remove()  # a text encoder written by a run stopped before its first state
        # BPE: unigram stops at single letters on a corpus of 30 distinct words.
        corpus = toy_world.caption_corpus(args.corpus_size, args.seed)
        write_text_encoder(checkpoint.text_encoder_dir, corpus, VOCAB_SIZE, "bpe", args.seed)
    else:
        print(f"resuming the {state['stage']} stage after step {state['step']} from {args.checkpoint_dir}")
    tokenizer, text_encoder = load_text_encoder(checkpoint.text_encoder_dir, torch.float32, args.device)

    vae = BSQVAE(vae_config(args.vae_bits)).to(args.device)
    if state is not None and state["stage"] == "transformer":  # the VAE was finished before
        vae.load_state_dict({k[4:]: v for k, v in state["tensors"].items() if k.startswith("vae.")})
        vae.eval().requires_grad_(False)
    else:
        train_vae(vae, world, schedule.vae_grids(False), args, checkpoint, state, generator)
    features = encode_images(vae, world.pixels, args.device)

    transformer = InfinityTransformer(transformer_config(args.width, args.depth, args.vae_bits)).to(args.device)
    train_transformer(
        transformer, tokenizer, text_encoder, features, world, schedule, args, generator, checkpoint, state, vae
    )

    pipe = InfinityPipeline(transformer.cpu(), vae.cpu(), tokenizer, text_encoder.cpu())
    save_half_precision(pipe, args.out)
    checkpoint.remove()  # the run is complete: --out holds what it made
    if not args.no_preview:
        save_preview(args.out, args.preview, args.seed)
    print(f"saved {args.out}; {time.time() - start:.0f}s in all")


if __name__ == "__main__":
    main()
