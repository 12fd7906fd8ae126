"""Finding, reading and strictly loading checkpoints, from a local folder or the Hugging Face hub.

Nothing is unpickled: `.pth`/`.bin` files go through `torch.load(weights_only=True)`, which only
rebuilds tensors and plain containers, and `.safetensors` files are read directly. Models are
built on the `meta` device and the checkpoint tensors are assigned into them, so a 2B model never
exists twice in memory.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Iterable

import torch
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors
from torch import nn

from .files import atomic_write

SHARD_INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# Constant buffers a checkpoint may leave out: the all-zero K biases and the VAE's bit weights.
OPTIONAL_SUFFIXES = ("zero_k_bias", "lfq.mask")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or that does not fit the model."""


class ModelFilesNotFound(FileNotFoundError):
    """A model file that is neither on disk nor reachable on the hub."""


def looks_like_a_path(name: str) -> bool:
    """A local path, never a hub repo id (owner/name): absolute, relative with ./ or ../, or ~."""
    return name.startswith(("/", "./", "../", "~", ".\\")) or os.path.isabs(name) or name.count("/") > 1


def resolve_model_file(name_or_path: str, filename: str, revision: str | None = None) -> str:
    """Local path of `filename` (a file, or a folder of shards) in a local folder or hub repo."""
    if looks_like_a_path(name_or_path) and not os.path.isdir(name_or_path):
        raise ModelFilesNotFound(f"{name_or_path} is not a folder; pass a model folder or a hub repo id (owner/name)")
    if os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, filename)
        if not os.path.exists(path):
            raise ModelFilesNotFound(f"{path} does not exist: put {filename} from the model repo into {name_or_path}")
        return path
    try:
        from huggingface_hub import hf_hub_download, snapshot_download

        if os.path.splitext(filename)[1]:
            return hf_hub_download(name_or_path, filename, revision=revision)
        root = snapshot_download(name_or_path, revision=revision, allow_patterns=[f"{filename}/*"])
        return os.path.join(root, filename)
    except Exception as e:  # offline, unknown repo, missing file, no network: all end the same way
        raise ModelFilesNotFound(
            f"could not get {filename} from {name_or_path!r} ({type(e).__name__}); "
            f"download it from https://huggingface.co/{name_or_path} into a folder DIR as DIR/{filename} "
            f"and pass DIR instead of {name_or_path!r}"
        ) from e


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` or `.pth`/`.bin` file, or of a folder of shards with an index."""
    if os.path.isdir(path):
        index = next((os.path.join(path, n) for n in SHARD_INDEX_NAMES if os.path.exists(os.path.join(path, n))), None)
        if index is None:
            raise CheckpointError(f"{path} is a folder without {' or '.join(SHARD_INDEX_NAMES)}")
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(read_state_dict(os.path.join(path, shard)))
        return state
    if not os.path.exists(path):
        raise CheckpointError(f"{path} does not exist")
    try:
        if path.endswith(".safetensors"):
            return load_safetensors(path)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # mmap needs the zip format; the legacy format loads without it
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e):  # an object the weights-only unpickler refuses, in either torch.save format
            raise CheckpointError(
                f"{path} holds pickled objects other than tensors, which are not loaded (weights_only=True); "
                "save only the state dict, e.g. torch.save(ckpt['trainer']['gpt_fsdp'], 'weights.pth')"
            ) from e
        raise CheckpointError(
            f"{path} is not a readable checkpoint (neither a torch.save archive nor safetensors); download it again"
        ) from e
    except Exception as e:  # truncated archives, and junk bytes the unpickler trips over in many ways
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({type(e).__name__}: {e}); download it again"
        ) from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


def _names(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > limit else shown


def load_into(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Strictly assigns `state` to `model` (which may live on the meta device): every key used,
    none missing, none unexpected, shapes equal. Tensors take the dtype the model has there."""
    expected = model.state_dict()
    state = dict(state)
    for key, ref in expected.items():
        if key not in state and key.endswith(OPTIONAL_SUFFIXES):
            default = (
                torch.zeros(ref.shape) if key.endswith("zero_k_bias") else 2 ** torch.arange(ref.shape[0] - 1, -1, -1)
            )
            state[key] = default
    missing = expected.keys() - state.keys()
    unexpected = state.keys() - expected.keys()
    mismatched = [k for k in expected.keys() & state.keys() if tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"missing keys: {_names(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {_names(unexpected)}")
        if mismatched:
            shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in sorted(mismatched)[:8]]
            problems.append(f"shape mismatches (checkpoint vs model): {'; '.join(shapes)}")
        raise CheckpointError(f"{what} does not fit this architecture: " + " | ".join(problems))
    for key, ref in expected.items():
        if state[key].dtype.is_floating_point and state[key].dtype != ref.dtype:
            state[key] = state[key].to(ref.dtype)
    model.load_state_dict(state, strict=True, assign=True)


def vae_state_dict(raw: dict[str, torch.Tensor], model_keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """The weights of an official VAE file: under "vae", with convs and norms named either
    plainly (`encoder.conv_in.weight`) or as in the model (`encoder.conv_in.conv.weight`)."""
    if "vae" in raw and isinstance(raw["vae"], dict):
        raw = raw["vae"]
    model_keys = set(model_keys)
    out = {}
    for key, value in raw.items():
        if key not in model_keys:
            stem, _, leaf = key.rpartition(".")
            for wrapped in (f"{stem}.conv.{leaf}", f"{stem}.norm.{leaf}"):
                if wrapped in model_keys:
                    key = wrapped
                    break
        out[key] = value
    return out


def save_state_dict(module: nn.Module, path: str) -> None:
    """Writes a module's tensors as safetensors, atomically (a temporary file, then a rename).
    A tensor reachable under two names (the VAE's `quantize` alias) is written once; the loader
    restores such constant buffers."""
    state, seen = {}, set()
    for key, value in module.state_dict().items():
        if value.data_ptr() in seen:
            continue
        seen.add(value.data_ptr())
        state[key] = value.detach().contiguous()
    with atomic_write(path) as tmp:
        save_safetensors(state, tmp)
