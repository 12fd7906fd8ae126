"""Checkpoint reading and strict loading, and InfinityPipeline.from_pretrained on a local folder."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from infinity_t2i.config import MODEL_CONFIG_NAME
from infinity_t2i.loading import (
    CheckpointError,
    ModelFilesNotFound,
    load_into,
    read_state_dict,
    resolve_model_file,
    vae_state_dict,
)
from infinity_t2i.pipeline import InfinityPipeline, load_transformer, load_vae, resolve_preset
from infinity_t2i.resolution import get_schedule
from infinity_t2i.transformer import InfinityTransformer
from toy_infinity.tiny import build_tiny_models


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_models(seed=0)


def fresh_meta_transformer(config):
    with torch.device("meta"):
        return InfinityTransformer(config)


def test_corrupt_and_truncated_files_fail_clearly(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(bytes(range(256)) * 16)  # starts with pickle opcodes, is no checkpoint
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        read_state_dict(str(junk))
    good = tmp_path / "good.pth"
    torch.save({"w": torch.ones(1000)}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        read_state_dict(str(truncated))
    bad_safetensors = tmp_path / "bad.safetensors"
    bad_safetensors.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        read_state_dict(str(bad_safetensors))
    with pytest.raises(CheckpointError, match="does not exist"):
        read_state_dict(str(tmp_path / "absent.pth"))


class WritesAFile:
    """Unpickling this would create a file: the loader must refuse before that happens."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_code_is_never_executed(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pth"
    for zip_format in (True, False):  # the legacy format was called unreadable, "download it again"
        torch.save({"weight": torch.ones(2), "payload": WritesAFile(str(marker))}, path,
                   _use_new_zipfile_serialization=zip_format)  # fmt: skip
        with pytest.raises(CheckpointError, match="holds pickled objects other than tensors.*weights_only=True"):
            read_state_dict(str(path))
        assert not marker.exists()


def test_mismatched_keys_and_shapes_are_named(tiny):
    model, _ = tiny
    state = dict(model.state_dict())
    state.pop("head.bias")
    state["head.extra"] = torch.zeros(1)
    state["word_embed.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError) as err:
        load_into(fresh_meta_transformer(model.config), state, "ckpt.pth")
    message = str(err.value)
    assert "ckpt.pth" in message and "missing keys: head.bias" in message and "unexpected keys: head.extra" in message
    assert "word_embed.weight (3, 3) vs (64, 8)" in message and "\n" not in message


def test_strict_load_assigns_every_tensor_and_restores_constant_buffers(tiny):
    model, _ = tiny
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("zero_k_bias")}
    meta = fresh_meta_transformer(model.config)
    load_into(meta, state, "ckpt")
    assert not any(t.is_meta for t in meta.state_dict().values())
    for key, value in model.state_dict().items():
        assert torch.equal(meta.state_dict()[key], value), key


def test_block_dtype_is_applied_while_loading(tiny, tmp_path):
    model, _ = tiny
    path = tmp_path / "transformer.safetensors"
    save_file(model.state_dict(), path)
    preset = type("P", (), {"transformer": model.config})()
    loaded = load_transformer(str(path), preset, torch.bfloat16, "cpu")
    assert loaded.blocks[0].ffn.fc1.weight.dtype == torch.bfloat16
    assert loaded.head.weight.dtype == torch.float32 and loaded.cfg_uncond.dtype == torch.float32


def test_official_vae_file_with_plain_names_loads(tiny, tmp_path):
    _, vae = tiny
    plain = {
        k.replace(".conv.weight", ".weight")
        .replace(".conv.bias", ".bias")
        .replace(".norm.weight", ".weight")
        .replace(".norm.bias", ".bias"): v
        for k, v in vae.state_dict().items()
        if "lfq" not in k
    }
    assert "encoder.conv_in.weight" in plain and "encoder.down.0.block.0.norm1.weight" in plain
    path = tmp_path / "vae.pth"
    torch.save({"vae": plain}, path)
    preset = type("P", (), {"vae": vae.config})()
    loaded = load_vae(str(path), preset, "cpu")
    for key, value in vae.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_a_vae_file_given_as_transformer_is_rejected(tiny, tmp_path):
    model, vae = tiny
    path = tmp_path / "vae.safetensors"
    save_file({k: v.clone() for k, v in vae.state_dict().items()}, path)
    with pytest.raises(CheckpointError, match="does not fit this architecture"):
        load_into(fresh_meta_transformer(model.config), read_state_dict(str(path)), str(path))


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_sharded_folder(tiny, tmp_path, fmt):
    model, _ = tiny
    state = model.state_dict()
    keys = list(state)
    shards = {f"model-0000{i + 1}-of-00002.{fmt}": keys[i::2] for i in range(2)}
    weight_map = {}
    for name, shard_keys in shards.items():
        part = {k: state[k].clone() for k in shard_keys}
        save_file(part, tmp_path / name) if fmt == "safetensors" else torch.save(part, tmp_path / name)
        weight_map.update({k: name for k in shard_keys})
    index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    (tmp_path / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    loaded = read_state_dict(str(tmp_path))
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


def test_missing_files_say_where_to_put_them(tmp_path, monkeypatch):
    with pytest.raises(ModelFilesNotFound, match="put infinity_2b_reg.pth from the model repo into"):
        resolve_model_file(str(tmp_path), "infinity_2b_reg.pth")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelFilesNotFound, match="DIR/infinity_vae_d32reg.pth"):
        resolve_model_file("FoundationVision/Infinity", "infinity_vae_d32reg.pth")
    with pytest.raises(ModelFilesNotFound, match="DIR/infinity_8b_weights"):
        resolve_model_file("FoundationVision/Infinity", "infinity_8b_weights")


def test_unknown_model_type(tmp_path):
    with pytest.raises(ValueError, match="infinity_2b"):
        resolve_preset(str(tmp_path), "infinity_3b")
    assert resolve_preset(str(tmp_path), "infinity_8b").transformer.spatial_patchify


def test_vae_state_dict_unwraps_the_official_container():
    raw = {"vae": {"encoder.conv_in.weight": torch.ones(1)}, "ema": {}}
    assert list(vae_state_dict(raw, ["encoder.conv_in.conv.weight"])) == ["encoder.conv_in.conv.weight"]


def test_pipeline_from_a_local_folder(tiny_pipeline_dir):
    assert os.path.exists(os.path.join(tiny_pipeline_dir, MODEL_CONFIG_NAME))
    pipe = InfinityPipeline.from_pretrained(tiny_pipeline_dir)
    schedule = get_schedule(1.0, "0.06M").prefix(5)
    out = pipe(["a photo of a dog", "a cat"], schedule=schedule, seed=3, return_bits=True, num_images_per_prompt=2)
    assert len(out.images) == 4 and all(im.mode == "RGB" and im.size == (128, 128) for im in out.images)
    assert [tuple(b.shape) for b in out.bits] == [(4, h, w, 8) for h, w in schedule.grids]
    again = pipe(["a photo of a dog", "a cat"], schedule=schedule, seed=3, num_images_per_prompt=2)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(out.images, again.images))
    single = pipe("a photo of a dog", schedule=schedule, seed=3).images[0]
    negative = pipe("a photo of a dog", negative_prompt="a cat", schedule=schedule, seed=3).images[0]
    assert not np.array_equal(np.asarray(negative), np.asarray(single))
    # diffusers' guidance_scale is cfg; a misspelt setting names the settings there are
    cfg5 = pipe("a photo of a dog", schedule=schedule, seed=3, cfg=5).images[0]
    guidance5 = pipe("a photo of a dog", schedule=schedule, seed=3, guidance_scale=5).images[0]
    assert np.array_equal(np.asarray(cfg5), np.asarray(guidance5)) and not np.array_equal(
        np.asarray(cfg5), np.asarray(single)
    )
    with pytest.raises(
        TypeError, match="unknown sampling setting.s. temperature; the settings are cfg .guidance_scale."
    ):
        pipe("a photo of a dog", schedule=schedule, temperature=0.5)
    # what no sampler can draw with is refused in words (before: ZeroDivisionError, IndexError, or images drawn
    # with top_p 2); the scripts' flags keep to narrower ranges
    for settings, message in [
        ({"tau": 0}, "tau must be positive"),
        ({"tau": [1.0, 1.0, 0.0, 1.0, 1.0]}, "tau must be positive"),
        ({"cfg": float("nan")}, "cfg must be finite"),
        ({"top_k": -1}, "top_k must be at least 0"),
        ({"top_p": 2}, "top_p must be in"),
    ]:
        with pytest.raises(ValueError, match=message):
            pipe("a photo of a dog", schedule=schedule, seed=3, **settings)
    for prompts, num_images in [([], 1), ("a photo of a dog", 0)]:
        with pytest.raises(ValueError, match="give at least one prompt and one image per prompt"):
            pipe(prompts, schedule=schedule, seed=3, num_images_per_prompt=num_images)


def test_model_folder_errors_point_at_the_folder(tiny_pipeline_dir, tmp_path):
    """A missing local folder is no hub id; a text-encoder folder without weights or tokenizer
    files says which files are missing, not a hub URL or the initializer word."""
    import shutil

    from infinity_t2i.loading import ModelFilesNotFound
    from infinity_t2i.pipeline import InfinityPipeline, load_text_encoder

    with pytest.raises(ModelFilesNotFound, match="is not a folder; pass a model folder or a hub repo id") as e:
        InfinityPipeline.from_pretrained(str(tmp_path / "nowhere"))
    assert "huggingface.co" not in str(e.value)
    with pytest.raises(ModelFilesNotFound, match="does not exist"):
        load_text_encoder(str(tmp_path / "no-t5"), torch.float32, "cpu")
    no_weights = tmp_path / "no-weights"
    shutil.copytree(f"{tiny_pipeline_dir}/text_encoder", no_weights)
    for f in no_weights.glob("model*.safetensors"):
        f.unlink()
    with pytest.raises(ModelFilesNotFound, match="holds no complete flan-T5 encoder") as e:
        load_text_encoder(str(no_weights), torch.float32, "cpu")
    assert "huggingface.co" not in str(e.value)
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(f"{tiny_pipeline_dir}/text_encoder", no_tokenizer)
    for f in no_tokenizer.iterdir():
        if f.name in ("spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            f.unlink()
    with pytest.raises(ModelFilesNotFound, match="has no tokenizer files"):
        load_text_encoder(str(no_tokenizer), torch.float32, "cpu")


def test_saved_model_files_are_readable_like_any_file(tiny_pipeline_dir):
    """safetensors writes 0600; a saved model folder is shared like any other file."""
    umask = os.umask(0)
    os.umask(umask)
    for name in ("transformer.safetensors", "vae.safetensors", "infinity_config.json"):
        assert os.stat(os.path.join(tiny_pipeline_dir, name)).st_mode & 0o777 == 0o666 & ~umask, name


def test_the_fingerprint_names_the_model_not_its_folder_or_dtype(tiny_pipeline_dir, tmp_path):
    pipe = InfinityPipeline.from_pretrained(tiny_pipeline_dir)
    moved = tmp_path / "renamed"
    pipe.save_pretrained(str(moved))
    assert InfinityPipeline.from_pretrained(str(moved), torch_dtype=torch.bfloat16).fingerprint() == pipe.fingerprint()
    with torch.no_grad():
        pipe.transformer.head.weight[0, 0] += 1e-3  # another model with the same architecture
    assert InfinityPipeline.fingerprint(pipe) != InfinityPipeline.from_pretrained(str(moved)).fingerprint()
