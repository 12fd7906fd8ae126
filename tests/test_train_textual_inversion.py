"""train_textual_inversion_infinity.py on a tiny Infinity + tiny T5, on CPU."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT
from helpers import draw_concept, run_script_expecting_error
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import train_textual_inversion_infinity as train
from infinity_t2i.pipeline import InfinityPipeline
from toy_infinity.tiny import build_tiny_clip

SCRIPT = os.path.join(ROOT, "train_textual_inversion_infinity.py")
PLACEHOLDER = "<blob>"


def train_args(model_dir, data_dir, output_dir, *extra):
    return [
        "--pretrained_model_name_or_path", str(model_dir),
        "--train_data_dir", str(data_dir),
        "--placeholder_token", PLACEHOLDER,
        "--initializer_token", "dog",
        "--output_dir", str(output_dir),
        "--pn", "0.06M",
        "--repeats", "2",
        "--seed", "0",
        *extra,
    ]  # fmt: skip


def run(model_dir, data_dir, output_dir, *extra):
    train.main(train.parse_args(train_args(model_dir, data_dir, output_dir, *extra)))


def scalars(output_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = os.path.join(output_dir, "logs", "textual_inversion_infinity")
    acc = EventAccumulator(logs, size_guidance={"scalars": 0})
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)]


def test_accelerate_launch_writes_every_output(tiny_pipeline_dir, concept_dir, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", SCRIPT,
           *train_args(tiny_pipeline_dir, concept_dir, out, "--max_train_steps", "4", "--save_steps", "2",
                       "--checkpointing_steps", "2", "--validation_steps", "2", "--num_validation_images", "2",
                       "--validation_prompt", f"a photo of a {PLACEHOLDER}",
                       "--validation_prompt", f"a {PLACEHOLDER} on the beach")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    files = set(os.listdir(out))
    assert {"learned_embeds.safetensors", "learned_embeds-steps-2.safetensors", "learned_embeds-steps-4.safetensors",
            "token_identifier.txt", "type_of_concept.txt", "README.md", "checkpoint-2", "checkpoint-4",
            "validation", "logs"} <= files  # fmt: skip
    assert not [f for f in files if f.endswith(".tmp")]
    with safe_open(out / "learned_embeds.safetensors", "pt") as f:
        # the default output mode: 8 learned output vectors and the fixed T5 input rows ("dog" is one piece)
        assert list(f.keys()) == [PLACEHOLDER, PLACEHOLDER + ".t5_input"]
        assert f.get_tensor(PLACEHOLDER).shape == (8, 128)
        meta = f.metadata()
    assert json.loads(meta["tokens"]) == [PLACEHOLDER] + [f"{PLACEHOLDER}_{i}" for i in range(1, 8)]
    assert meta["initializer_token"] == "dog" and meta["step"] == "4"
    # a local model by its folder's name and fingerprint: no path reaches the file, the card or the hub
    assert meta["base_model"] == os.path.basename(tiny_pipeline_dir) and meta["learnable_property"] == "object"
    assert meta["text_encoder"] == "text_encoder"  # the folder's own
    assert meta["base_model_fingerprint"] == InfinityPipeline.from_pretrained(str(tiny_pipeline_dir)).fingerprint()
    assert not any(str(tmp_path.parent) in value for value in meta.values())
    assert (out / "token_identifier.txt").read_text() == PLACEHOLDER
    assert (out / "type_of_concept.txt").read_text() == "object"
    assert meta["model_type"] == "custom" and meta["ti_mode"] == "output"  # the folder's config, not --model_type
    card = (out / "README.md").read_text()
    assert "textual-inversion" in card and PLACEHOLDER in card and "validation/step-000004.png" in card
    # a local base model is no hub link, and the card says what this model is
    assert "base_model:" not in card and str(tmp_path.parent) not in card
    assert "Infinity (custom)" in card and "(8, 128)" in card and "2048" not in card and "--model_type" not in card
    # the token in code spans (as bare <blob> a Markdown renderer takes it for a tag and shows nothing), the
    # file's two entries, and the command naming the folder as path/to/, not as a bare name that exists nowhere
    assert f"# Textual inversion: `{PLACEHOLDER}` for" in card and f"**`{PLACEHOLDER}`**" in card
    assert f'"{PLACEHOLDER}": (8, 128), "{PLACEHOLDER}.t5_input": (8, 128)' in card
    assert "--learned_embeds path/to/out " in card
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(out / "learned_embeds.safetensors").st_mode & 0o777 == 0o666 & ~umask  # not safetensors' 0600
    grids = sorted(os.listdir(out / "validation"))
    assert grids == ["step-000000.png", "step-000002.png", "step-000004.png"]
    grid = Image.open(out / "validation" / grids[-1])  # 2 prompts x 2 images at 0.06M, labelled
    assert grid.width > 2 * 256 and grid.height > 2 * 256
    assert [len(scalars(out, tag)) for tag in ("loss", "vector_norm", "vocab_mean_norm")] == [4, 4, 4]
    assert {"model.safetensors", "optimizer.bin", "scheduler.bin", "step_rng.safetensors"} <= set(
        os.listdir(out / "checkpoint-4")
    )


def test_validation_scores_the_concept_with_a_clip_model(concept_dir, tmp_path):
    """On the toy model, with a tiny random CLIP: the two similarities at steps 0 and 2, in
    tensorboard and in the model card."""
    clip = build_tiny_clip(str(tmp_path / "clip"))
    out = tmp_path / "out"
    toy = os.path.join(ROOT, "examples", "toy-infinity")
    run(toy, os.path.join(ROOT, "examples", "concepts", "pink-cross"), out, "--initializer_token", "cross",
        "--max_train_steps", "2", "--validation_steps", "2", "--num_validation_images", "2",
        "--validation_prompt", f"a photo of a {PLACEHOLDER}", "--validation_similarity_model", clip)  # fmt: skip
    to_training, to_prompt = scalars(out, "similarity/image_to_training"), scalars(out, "similarity/prompt_to_image")
    assert len(to_training) == len(to_prompt) == 2
    assert all(-1 <= v <= 1 for v in to_training + to_prompt)
    card = (out / "README.md").read_text()
    scores = f"Concept scores at step 2 (clip): validation images to the training images {to_training[-1]:.3f}"
    assert scores in card and str(tmp_path) not in card
    assert f"to their prompt {to_prompt[-1]:.3f}" in card


def test_frozen_weights_stay_bit_identical_and_only_the_new_row_changes(
    tiny_pipeline_dir, concept_dir, tmp_path, monkeypatch
):
    loaded = {}
    original = InfinityPipeline.from_pretrained.__func__

    def capture(cls, *a, **k):
        pipe = original(cls, *a, **k)
        loaded["pipe"] = pipe
        loaded["before"] = {
            name: {k: v.clone() for k, v in getattr(pipe, name).state_dict().items()}
            for name in ("text_encoder", "transformer", "vae")
        }
        return pipe

    monkeypatch.setattr(InfinityPipeline, "from_pretrained", classmethod(capture))
    run(tiny_pipeline_dir, concept_dir, tmp_path / "out", "--max_train_steps", "3",
        "--validation_prompt", f"a {PLACEHOLDER}", "--validation_steps", "3", "--num_validation_images", "1",
        "--learning_rate", "0.1", "--ti_mode", "input")  # fmt: skip
    pipe, before = loaded["pipe"], loaded["before"]
    placeholder_id = pipe.tokenizer.convert_tokens_to_ids(PLACEHOLDER)
    for name in ("transformer", "vae"):
        after = getattr(pipe, name).state_dict()
        assert all(torch.equal(after[k], v) for k, v in before[name].items()), name
        assert all(not p.requires_grad and p.grad is None for p in getattr(pipe, name).parameters())
    after = pipe.text_encoder.state_dict()
    learned = load_file(tmp_path / "out" / "learned_embeds.safetensors")[PLACEHOLDER]
    for key, value in before["text_encoder"].items():
        if key in ("shared.weight", "encoder.embed_tokens.weight"):
            others = torch.arange(value.shape[0]) != placeholder_id
            assert torch.equal(after[key][others], value[others]), key  # every other row untouched
            assert torch.equal(after[key][placeholder_id], learned[0])  # validation wrote the learned row
        else:
            assert torch.equal(after[key], value), key
    dog = pipe.tokenizer.convert_tokens_to_ids("\u2581dog")
    assert not torch.equal(learned[0], before["text_encoder"]["shared.weight"][dog])  # it moved from its start


def test_loss_falls_on_a_fixed_set(tiny_pipeline_dir, tmp_path):
    data = tmp_path / "captioned"
    data.mkdir()
    for i in range(2):
        draw_concept(data / f"b{i}.png", shift=i)
    (data / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": f"b{i}.png", "text": f"a photo of a {PLACEHOLDER}"}) + "\n" for i in range(2))
    )
    out = tmp_path / "out"
    run(tiny_pipeline_dir, data, out, "--max_train_steps", "30", "--train_batch_size", "2", "--learning_rate", "0.05",
        "--no-reweight_loss_by_scale", "--checkpointing_steps", "1000", "--save_steps", "1000")  # fmt: skip
    losses = scalars(out, "loss")
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.005, losses


def test_resumed_run_ends_with_the_uninterrupted_embedding(tiny_pipeline_dir, concept_dir, tmp_path):
    common = ("--checkpointing_steps", "3", "--save_steps", "1000", "--random_flip",
              "--self_correction_strength", "0.3", "--gradient_accumulation_steps", "2",
              "--learning_rate", "0.05")  # fmt: skip
    run(tiny_pipeline_dir, concept_dir, tmp_path / "full", "--max_train_steps", "5", *common)
    run(
        tiny_pipeline_dir, concept_dir, tmp_path / "part", "--max_train_steps", "3", *common
    )  # stops after checkpoint-3
    run(
        tiny_pipeline_dir,
        concept_dir,
        tmp_path / "part",
        "--max_train_steps",
        "5",
        "--resume_from_checkpoint",
        "latest",
        *common,
    )
    full = load_file(tmp_path / "full" / "learned_embeds.safetensors")[PLACEHOLDER]
    resumed = load_file(tmp_path / "part" / "learned_embeds.safetensors")[PLACEHOLDER]
    at_step_3 = next(iter(load_file(tmp_path / "full" / "checkpoint-3" / "model.safetensors").values()))
    assert torch.equal(resumed, full)
    assert not torch.equal(at_step_3, full)  # steps 4 and 5 did change the vectors


def test_a_resume_without_seed_continues_with_the_runs_seed_and_takes_diffusers_relative_form(
    tiny_pipeline_dir, concept_dir, tmp_path
):
    common = ("--checkpointing_steps", "3", "--save_steps", "1000", "--learning_rate", "0.05")
    run(tiny_pipeline_dir, concept_dir, tmp_path / "full", "--max_train_steps", "6", "--seed", "7", *common)
    run(tiny_pipeline_dir, concept_dir, tmp_path / "part", "--max_train_steps", "3", "--seed", "7", *common)
    argv = train_args(
        tiny_pipeline_dir,
        concept_dir,
        tmp_path / "part",
        "--max_train_steps",
        "6",
        "--resume_from_checkpoint",
        "checkpoint-3",
        *common,
    )
    k = argv.index("--seed")
    train.main(train.parse_args(argv[:k] + argv[k + 2 :]))  # no --seed at all
    full = load_file(tmp_path / "full" / "learned_embeds.safetensors")[PLACEHOLDER]
    assert torch.equal(load_file(tmp_path / "part" / "learned_embeds.safetensors")[PLACEHOLDER], full)


@pytest.mark.parametrize(
    "damage,extra,message",
    [
        ("delete optimizer.bin", [], "lacks optimizer.bin"),
        ("truncate random_states_0.pkl", [], "random_states_0.pkl is truncated or damaged"),
        ("truncate model.safetensors", [], "model.safetensors is truncated or damaged"),
        ("", ["--num_vectors", "5"], "made with --num_vectors 8, this run has --num_vectors 5"),
        # a recipe flag changed, or its default did since the checkpoint was written
        ("", ["--train_scales", "all"], "made with --train_scales half, this run has --train_scales all; pass the"),
        (
            "",
            ["--learning_rate", "0.1", "--random_flip"],
            "with --random_flip False --learning_rate 0.02, this run has --random_flip True --learning_rate 0.1;",
        ),
    ],
)
def test_a_broken_or_foreign_checkpoint_is_refused_in_one_line(
    tiny_pipeline_dir, concept_dir, tmp_path, capsys, damage, extra, message
):
    out = tmp_path / "out"
    run(tiny_pipeline_dir, concept_dir, out, "--max_train_steps", "2", "--checkpointing_steps", "2")
    checkpoint = out / "checkpoint-2"
    if damage:
        action, name = damage.split()
        if action == "delete":
            (checkpoint / name).unlink()
        else:
            data = (checkpoint / name).read_bytes()
            (checkpoint / name).write_bytes(data[: len(data) // 2])
    final = (out / "learned_embeds.safetensors").read_bytes()
    argv = train_args(
        tiny_pipeline_dir, concept_dir, out, "--max_train_steps", "4", "--resume_from_checkpoint", "latest", *extra
    )
    err = run_script_expecting_error(SCRIPT, argv, capsys)
    assert message in err and "checkpoint" in err, err
    assert (out / "learned_embeds.safetensors").read_bytes() == final  # nothing overwritten


def test_checkpoints_are_pruned_to_the_limit(tiny_pipeline_dir, concept_dir, tmp_path):
    out = tmp_path / "out"
    run(tiny_pipeline_dir, concept_dir, out, "--max_train_steps", "6", "--checkpointing_steps", "2",
        "--checkpoints_total_limit", "2")  # fmt: skip
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint")) == ["checkpoint-4", "checkpoint-6"]


def test_a_crash_while_writing_a_checkpoint_keeps_the_previous_one(
    tiny_pipeline_dir, concept_dir, tmp_path, monkeypatch
):
    real_save = train.save_checkpoint

    def killed_at_step_4(accelerator, output_dir, step, *rest):
        if step == 4:
            raise KeyboardInterrupt("killed while writing checkpoint-4")
        real_save(accelerator, output_dir, step, *rest)

    monkeypatch.setattr(train, "save_checkpoint", killed_at_step_4)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run(tiny_pipeline_dir, concept_dir, out, "--max_train_steps", "6", "--checkpointing_steps", "2",
            "--checkpoints_total_limit", "1")  # fmt: skip
    assert [d for d in os.listdir(out) if d.startswith("checkpoint")] == ["checkpoint-2"]


def test_resuming_a_finished_run_changes_nothing(tiny_pipeline_dir, concept_dir, tmp_path):
    out = tmp_path / "out"
    run(
        tiny_pipeline_dir,
        concept_dir,
        out,
        "--max_train_steps",
        "4",
        "--checkpointing_steps",
        "2",
        "--learning_rate",
        "0.1",
    )
    final = load_file(out / "learned_embeds.safetensors")[PLACEHOLDER]
    run(tiny_pipeline_dir, concept_dir, out, "--max_train_steps", "4", "--checkpointing_steps", "2",
        "--learning_rate", "0.1", "--resume_from_checkpoint", "latest")  # fmt: skip
    with safe_open(out / "learned_embeds.safetensors", "pt") as f:
        assert torch.equal(f.get_tensor(PLACEHOLDER), final) and f.metadata()["step"] == "4"
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint")) == ["checkpoint-2", "checkpoint-4"]


def test_multi_vector_concept_with_sidecar_captions(tiny_pipeline_dir, tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        draw_concept(data / f"b{i}.png", shift=i)
        (data / f"b{i}.txt").write_text(f"a close-up photo of a {PLACEHOLDER}, dog")
    seen = []
    real_encode = train.encode_prompt

    def spy(tokenizer, text_encoder, prompts, embed_tokens=None):
        from infinity_t2i.text import tokenize

        seen.append((prompts, tokenize(tokenizer, prompts)[0]))
        return real_encode(tokenizer, text_encoder, prompts, embed_tokens)

    monkeypatch.setattr(train, "encode_prompt", spy)
    out = tmp_path / "out"
    run(tiny_pipeline_dir, data, out, "--num_vectors", "3", "--max_train_steps", "2", "--ti_mode", "input")
    vectors = load_file(out / "learned_embeds.safetensors")[PLACEHOLDER]
    assert vectors.shape == (3, 128)
    with safe_open(out / "learned_embeds.safetensors", "pt") as f:
        assert json.loads(f.metadata()["tokens"]) == [PLACEHOLDER, f"{PLACEHOLDER}_1", f"{PLACEHOLDER}_2"]
    prompts, ids = seen[0]
    assert prompts == [f"a close-up photo of a {PLACEHOLDER} {PLACEHOLDER}_1 {PLACEHOLDER}_2, dog"]
    pipe = InfinityPipeline.from_pretrained(tiny_pipeline_dir)
    n = len(pipe.tokenizer)
    ids = ids[0].tolist()
    k = ids.index(n)
    assert ids[k : k + 3] == [n, n + 1, n + 2]  # the three tokens in order
    assert pipe.tokenizer.convert_ids_to_tokens(ids[k + 3]) == ","  # no stray word-boundary piece


def test_push_to_hub_uploads_only_the_shareable_files(tiny_pipeline_dir, concept_dir, tmp_path, monkeypatch):
    calls = {}
    monkeypatch.setattr(
        train,
        "create_repo",
        lambda repo_id, exist_ok, token: calls.setdefault("create", type("R", (), {"repo_id": f"me/{repo_id}"})()),
    )
    monkeypatch.setattr(train, "upload_folder", lambda **kw: calls.setdefault("upload", kw))
    run(tiny_pipeline_dir, concept_dir, tmp_path / "my-blob-ti", "--max_train_steps", "2", "--checkpointing_steps", "1",
        "--push_to_hub", "--validation_prompt", f"a {PLACEHOLDER}", "--num_validation_images", "1")  # fmt: skip
    upload = calls["upload"]
    assert upload["repo_id"] == "me/my-blob-ti"
    patterns = upload["allow_patterns"]
    assert set(patterns) == {
        "learned_embeds.safetensors",
        "token_identifier.txt",
        "type_of_concept.txt",
        "README.md",
        "validation/step-000000.png",
    }
    assert all(os.path.exists(os.path.join(upload["folder_path"], p)) for p in patterns)


def test_the_hub_token_never_reaches_disk(tiny_pipeline_dir, concept_dir, tmp_path, monkeypatch):
    secret = "hf_secret_token_123"
    monkeypatch.setattr(
        train, "create_repo", lambda repo_id, exist_ok, token: type("R", (), {"repo_id": f"me/{repo_id}"})()
    )
    monkeypatch.setattr(train, "upload_folder", lambda **kw: None)
    out = tmp_path / "out"
    run(
        tiny_pipeline_dir,
        concept_dir,
        out,
        "--max_train_steps",
        "2",
        "--checkpointing_steps",
        "1",
        "--push_to_hub",
        "--hub_token",
        secret,
    )
    files = [os.path.join(d, f) for d, _, names in os.walk(out) for f in names]
    assert any("hparams" in f or "events" in f for f in files)  # the tracker wrote its config
    assert not [f for f in files if secret.encode() in Path(f).read_bytes()]


def test_image_modes_are_converted_to_rgb():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert train.to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    grey16 = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert train.to_rgb(grey16).getpixel((0, 0)) == (255, 255, 255)
    dark16 = Image.fromarray(np.full((4, 4), 200, dtype=np.uint16))  # 16-bit near black, not 8-bit light grey
    assert train.to_rgb(dark16).getpixel((0, 0)) == (0, 0, 0)
    unit_float = Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32), mode="F")  # floats from 0 to 1
    assert train.to_rgb(unit_float).getpixel((0, 0)) == (127, 127, 127)
    assert train.to_rgb(Image.new("CMYK", (4, 4), (0, 0, 0, 0))).mode == "RGB"
    assert train.to_rgb(Image.new("L", (4, 4), 128)).getpixel((0, 0)) == (128, 128, 128)
    assert train.resize_to(Image.new("RGB", (300, 200)), (128, 128), center_crop=True).size == (128, 128)


def test_unusual_images_train(tiny_pipeline_dir, tmp_path, caplog):
    data = tmp_path / "mixed"
    data.mkdir()
    draw_concept(data / "grey.png", mode="L")
    draw_concept(data / "alpha.png", mode="RGBA")
    draw_concept(data / "cmyk.jpg", mode="CMYK")
    draw_concept(data / "small.webp", size=(40, 30))
    Image.fromarray((np.random.rand(50, 60) * 65535).astype(np.uint16)).save(data / "deep.png")
    run(tiny_pipeline_dir, data, tmp_path / "out", "--max_train_steps", "1", "--aspect_ratio", "nearest")
    assert os.path.exists(tmp_path / "out" / "learned_embeds.safetensors")
    assert "smaller than the training size" in caplog.text


@pytest.mark.parametrize(
    "case,extra,message",
    [
        ("missing", [], "is not a folder"),
        ("empty", [], "holds no images"),
        ("corrupt", [], "cannot read image"),
        ("uncaptioned", [], "does not contain <blob>"),
        ("ok", ["--placeholder_token", "</s>"], "already in the tokenizer's vocabulary"),
        ("ok", ["--initializer_token", "日本"], "unknown to the tokenizer"),
        ("ok", ["--mixed_precision", "fp16"], "blocks run in bfloat16"),
        ("ok", ["--resume_from_checkpoint", "nowhere"], "does not exist"),
        ("ok", ["--report_to", "nowhere"], "invalid choice: 'nowhere'"),
        pytest.param(  # before: trained with a warning of accelerate's and logged nothing
            "ok",
            ["--report_to", "wandb"],
            "--report_to wandb needs its package: pip install wandb",
            marks=pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed"),
        ),
        ("ok", ["--num_validation_images", "0"], "--num_validation_images must be at least 1"),
        ("ok", ["--learning_rate", "nan"], "--learning_rate must be a positive number"),
        ("ok", ["--placeholder_token", "my dog"], "must be one word without spaces"),
        ("ok", ["--placeholder_token", "irc"], "bare word that would match inside other words; mark it, e.g. <irc>"),
        ("ok", ["--aspect_ratio", "nearest", "--prior_scales", "4"], "covers all 4 trained scales"),  # 3:4 has 4
        ("ok", ["--validation_prompt", "a photo of a dog"], "'a photo of a dog' does not contain <blob>; add it"),
        ("ok", ["--validation_prompt", "a <blob>:0.5"], "give it without the weight"),
        ("latin1", [], "is not UTF-8 text"),
        ("stray_metadata", [], "names gone.png, not an image in"),
        ("ok", ["--output_dir", "OUTPUT_IS_A_FILE"], "is a file, not a folder; choose another folder"),
        ("ok", ["--num_vectors", "0"], "--num_vectors must be between 1 and 64, got 0"),
        ("ok", ["--train_batch_size", "0"], "--train_batch_size must be at least 1"),
        ("ok", ["--train_scales", "1"], "--train_scales must be at least 2"),
        ("ok", ["--learning_rate", "-1"], "--learning_rate must be a positive number"),
        ("ok", ["--ti_mode", "middle"], "invalid choice: 'middle'"),
        ("ok", ["--text_encoder_dtype", "int8"], "invalid choice: 'int8'"),
        ("ok", ["--validation_similarity_model", "./no-clip"], "give a --validation_prompt too"),
        (
            "ok",
            ["--validation_similarity_model", "./no-clip", "--validation_prompt", "a <blob>"],
            "./no-clip does not exist",
        ),
        (
            "ok",
            ["--validation_similarity_model", "T5_FOLDER", "--validation_prompt", "a <blob>"],
            "is a t5 model; pass a CLIP",
        ),
    ],
)
def test_bad_input_fails_with_one_line_and_writes_nothing(tiny_pipeline_dir, tmp_path, capsys, case, extra, message):
    data = tmp_path / case
    if case != "missing":
        data.mkdir()
    if case == "corrupt":
        draw_concept(data / "fine.png")
        (data / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    if case in ("uncaptioned", "ok"):
        draw_concept(data / "fine.png")
    if case == "uncaptioned":
        (data / "fine.txt").write_text("a photo of a dog")
    if case == "stray_metadata":
        draw_concept(data / "fine.png")
        (data / "metadata.jsonl").write_text(
            '{"file_name": "fine.png", "text": "a <blob>"}\n{"file_name": "gone.png", "text": "a <blob>"}\n'
        )
    if case == "latin1":
        draw_concept(data / "fine.png")
        (data / "fine.txt").write_bytes("a <blob> in a café".encode("latin-1"))
    out = tmp_path / "out"
    if "OUTPUT_IS_A_FILE" in extra:
        (tmp_path / "a-file").write_text("not a folder")
        extra = [str(tmp_path / "a-file") if a == "OUTPUT_IS_A_FILE" else a for a in extra]
    extra = [os.path.join(tiny_pipeline_dir, "text_encoder") if a == "T5_FOLDER" else a for a in extra]
    argv = train_args(tiny_pipeline_dir, data, out, "--max_train_steps", "1") + extra
    err = run_script_expecting_error(SCRIPT, argv, capsys)
    assert message in err, err
    if case == "corrupt":
        assert "broken.jpg" in err
    if "--resume_from_checkpoint" not in extra:
        assert not out.exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--placeholder_token", "</s>"], "already in the tokenizer's vocabulary"),
        (["--initializer_token", "日本"], "unknown to the tokenizer"),
    ],
)
def test_the_concepts_words_are_checked_before_any_model_loads(
    tiny_pipeline_dir, tmp_path, capsys, monkeypatch, extra, message
):
    def load(*args, **kwargs):  # minutes on Infinity-2B and flan-T5-XL
        raise AssertionError("the models were loaded before the words were checked")

    monkeypatch.setattr(InfinityPipeline, "from_pretrained", load)
    data = tmp_path / "data"
    data.mkdir()
    draw_concept(data / "fine.png")
    err = run_script_expecting_error(SCRIPT, train_args(tiny_pipeline_dir, data, tmp_path / "out", *extra), capsys)
    assert message in err, err


def test_captions_with_a_byte_order_mark_and_macos_metadata_files_are_read(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    draw_concept(data / "fine.png")
    (data / "._fine.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # what macOS copies beside an image
    (data / "._fine.txt").write_bytes(b"\x00\x05\x16\x07\xff AppleDouble")  # and beside a caption
    caption = f"a photo of a {PLACEHOLDER} in the garden"
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": "fine.png", "text": caption}) + "\n", "utf-8-sig")
    examples = train.read_examples(train.parse_args(train_args("no-model", data, tmp_path / "out")))
    assert [(name, text) for name, _, text in examples] == [("fine.png", caption)]


def test_a_run_recorded_with_a_warmup_under_the_constant_schedule_may_resume(tmp_path):
    # a new run is refused that warmup (the constant schedule ignores it); a run recorded with it resumes as it ran
    argv = train_args("no-model", tmp_path, tmp_path / "out", "--lr_warmup_steps", "3")
    assert train.parse_args([*argv, "--resume_from_checkpoint", "latest"]).lr_warmup_steps == 3


def test_a_dataset_without_the_caption_column_asked_for_is_refused(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    draw_concept(data / "fine.png")
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": "fine.png", "text": f"a {PLACEHOLDER}"}) + "\n")
    argv = train_args("no-model", data, tmp_path / "out", "--caption_column", "captoin")
    argv[argv.index("--train_data_dir")] = "--dataset_name"
    with pytest.raises(train.UsageError, match="dataset has no column 'captoin'"):
        train.read_examples(train.parse_args(argv))


def test_report_to_none_writes_no_logs(tiny_pipeline_dir, concept_dir, tmp_path):
    out = tmp_path / "out"
    run(tiny_pipeline_dir, concept_dir, out, "--max_train_steps", "1", "--report_to", "none")
    assert (out / "learned_embeds.safetensors").exists() and not (out / "logs").exists()


def test_a_launch_whose_world_size_accelerate_does_not_run_is_refused(
    tiny_pipeline_dir, concept_dir, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as `accelerate launch --multi_gpu` sets it on a CPU machine
    out = tmp_path / "out"
    err = run_script_expecting_error(
        SCRIPT, train_args(tiny_pipeline_dir, concept_dir, out, "--max_train_steps", "1"), capsys
    )
    assert "2 processes were launched but accelerate runs 1" in err and "ACCELERATE_USE_CPU=1" in err
    assert not out.exists()


def test_nan_loss_stops_and_keeps_the_last_good_embedding(tiny_pipeline_dir, concept_dir, tmp_path, monkeypatch):
    calls = []

    def loss_that_breaks_at_step_3(*args):
        calls.append(1)
        loss = train_bitwise_loss(*args)
        return loss * float("nan") if len(calls) == 3 else loss

    train_bitwise_loss = train.bitwise_loss
    monkeypatch.setattr(train, "bitwise_loss", loss_that_breaks_at_step_3)
    out = tmp_path / "out"
    with pytest.raises(train.UsageError, match="the loss became non-finite at step 2"):
        run(
            tiny_pipeline_dir,
            concept_dir,
            out,
            "--max_train_steps",
            "10",
            "--save_steps",
            "1",
            "--learning_rate",
            "0.1",
        )
    kept = load_file(out / "learned_embeds.safetensors")[PLACEHOLDER]
    # step 3 saw the vectors after two updates and failed; step 2's (after one update) were good
    assert torch.equal(kept, load_file(out / "learned_embeds-steps-1.safetensors")[PLACEHOLDER])
    assert not torch.equal(kept, load_file(out / "learned_embeds-steps-2.safetensors")[PLACEHOLDER])
    with safe_open(out / "learned_embeds.safetensors", "pt") as f:
        assert f.metadata()["step"] == "1"  # labelled with the step whose vectors it holds


def test_train_scales_trains_the_coarse_scales_only(tiny_pipeline_dir, concept_dir, tmp_path, monkeypatch):
    lengths = []
    real_loss = train.bitwise_loss

    def spy(logits, labels, schedule, reweight, prior, prior_weight):
        lengths.append((logits.shape[1], labels.shape[1], schedule.total_len, prior.shape[1]))
        return real_loss(logits, labels, schedule, reweight, prior, prior_weight)

    monkeypatch.setattr(train, "bitwise_loss", spy)
    run(tiny_pipeline_dir, concept_dir, tmp_path / "out", "--max_train_steps", "2", "--train_scales", "3")
    assert lengths == [(21, 21, 21, 1)] * 2  # 1 + 2x2 + 4x4 tokens of the first three scales; the prior: the 1x1
    lengths.clear()
    run(tiny_pipeline_dir, concept_dir, tmp_path / "default", "--max_train_steps", "1")
    assert lengths == [(121, 121, 121, 1)]  # by default the scales up to 8x8, half of 0.06M's 16x16
    lengths.clear()
    run(tiny_pipeline_dir, concept_dir, tmp_path / "all", "--max_train_steps", "1", "--train_scales", "all")
    assert lengths == [(521, 521, 521, 1)]


def launch_two_processes(script, argv, port: int) -> subprocess.CompletedProcess:
    """`script argv` in two CPU processes (DDP over gloo), as torchrun starts them. A wrapper
    script in a temporary folder imports the training script from the repository (PYTHONPATH)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
        str(script),
        *map(str, argv),
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, check=False)


def test_two_processes_train_one_embedding(tiny_pipeline_dir, concept_dir, tmp_path):
    """DDP over two CPU processes (gloo): the main process alone writes, checkpoints hold the
    random state of both processes."""
    out = tmp_path / "out"
    result = launch_two_processes(
        SCRIPT,
        train_args(tiny_pipeline_dir, concept_dir, out, "--max_train_steps", "2", "--checkpointing_steps", "2"),
        29571,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("DistributedType.MULTI_CPU") == 2
    assert {"random_states_0.pkl", "random_states_1.pkl", "step_rng.safetensors"} <= set(
        os.listdir(out / "checkpoint-2")
    )
    rng = load_file(out / "checkpoint-2" / "step_rng.safetensors")
    assert set(rng) == {"process_0", "process_1"} and not torch.equal(rng["process_0"], rng["process_1"])
    assert load_file(out / "learned_embeds.safetensors")[PLACEHOLDER].shape == (8, 128)  # output mode: 8 vectors


def test_fp16_from_the_accelerate_config_is_refused_too(tiny_pipeline_dir, concept_dir, tmp_path, capsys, monkeypatch):
    from accelerate.state import AcceleratorState

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # what `accelerate launch` sets from a config file
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        err = run_script_expecting_error(
            SCRIPT, train_args(tiny_pipeline_dir, concept_dir, tmp_path / "out", "--max_train_steps", "1"), capsys
        )
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert "mixed precision fp16 (from your accelerate config) is refused" in err
    assert not (tmp_path / "out").exists()


def test_gif_and_tiff_images_are_read_and_subfolders_are_named(tiny_pipeline_dir, tmp_path, caplog):
    data = tmp_path / "data"
    (data / "more").mkdir(parents=True)
    draw_concept(data / "a.gif")
    draw_concept(data / "b.tif")
    draw_concept(data / "more" / "c.png")
    args = train.parse_args(train_args(tiny_pipeline_dir, data, tmp_path / "out"))
    with caplog.at_level("WARNING"):
        examples = train.read_examples(args)
    assert [name for name, _, _ in examples] == ["a.gif", "b.tif"] and all(
        image.mode == "RGB" for _, image, _ in examples
    )
    assert "subfolders are not read (more)" in caplog.text


def test_a_nan_on_one_process_stops_both_and_the_main_one_keeps_the_embedding(tiny_pipeline_dir, concept_dir, tmp_path):
    """Two CPU processes (gloo); only process 1 sees a NaN loss, at its second step."""
    wrapper = tmp_path / "nan_on_rank_1.py"
    wrapper.write_text(
        "import os, sys\n"
        "import train_textual_inversion_infinity as train\n"
        "real, calls = train.bitwise_loss, []\n"
        "def loss(*args):\n"
        "    calls.append(1)\n"
        "    value = real(*args)\n"
        "    return value * float('nan') if os.environ['RANK'] == '1' and len(calls) == 2 else value\n"
        "train.bitwise_loss = loss\n"
        "try:\n"
        "    train.main(train.parse_args(sys.argv[1:]))\n"
        "except train.BAD_INPUT as e:\n"
        "    sys.exit(f'error: {e}')\n"
    )
    out = tmp_path / "out"
    result = launch_two_processes(
        wrapper, train_args(tiny_pipeline_dir, concept_dir, out, "--max_train_steps", "4", "--save_steps", "1"), 29573
    )
    assert result.returncode != 0 and result.stderr.count("the loss became non-finite at step 1") == 2, result.stderr[
        -3000:
    ]
    # the vectors after one update gave a NaN on process 1: the last ones good everywhere are the start
    with safe_open(out / "learned_embeds.safetensors", "pt") as f:
        assert f.metadata()["step"] == "0"
        assert not torch.equal(
            f.get_tensor(PLACEHOLDER), load_file(out / "learned_embeds-steps-1.safetensors")[PLACEHOLDER]
        )


def write_batch_recorder(path):
    """A wrapper of the training script whose processes write each epoch's batches (indices) to
    the folder given as its last argument, as batches_{rank}_{epoch}.json."""
    path.write_text(
        "import json, os, sys\n"
        "import train_textual_inversion_infinity as train\n"
        "real_iter = train.SameShapeBatchSampler.__iter__\n"
        "def recording_iter(self):\n"
        "    batches = list(real_iter(self))\n"
        "    with open(os.path.join(sys.argv[-1], f\"batches_{os.environ['RANK']}_{self.epoch}.json\"), 'w') as f:\n"
        "        json.dump(batches, f)\n"
        "    return iter(batches)\n"
        "train.SameShapeBatchSampler.__iter__ = recording_iter\n"
        "train.main(train.parse_args(sys.argv[1:-1]))\n"
    )
    return path


def test_two_processes_share_same_shape_batches_and_see_every_image(tiny_pipeline_dir, tmp_path):
    """Batch 2 over two processes with images of two aspect ratios: every batch holds one shape,
    every image is seen in the epoch, and both processes run the same number of steps."""
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        draw_concept(data / f"wide_{i}.png", size=(96, 64), shift=i)
        draw_concept(data / f"tall_{i}.png", size=(64, 96), shift=i)
    wrapper = write_batch_recorder(tmp_path / "record_batches.py")
    out = tmp_path / "out"
    record = tmp_path / "record"
    record.mkdir()
    common = [
        "--train_batch_size",
        "2",
        "--aspect_ratio",
        "nearest",
        "--checkpointing_steps",
        "2",
        "--learning_rate",
        "0.05",
    ]
    argv = train_args(tiny_pipeline_dir, data, out, "--max_train_steps", "2", *common)
    argv[argv.index("--repeats") + 1] = "1"
    result = launch_two_processes(wrapper, [*argv, record], 29575)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((record / f"batches_{r}_0.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 2  # 6 images: 2 shapes x (2 + 1) -> 4 batches, 2 each
    names = sorted(os.listdir(data))  # the script reads them sorted
    seen = [names[i].split("_")[0] for batches in ranks for batch in batches for i in batch]
    assert all(len({names[i].split("_")[0] for i in batch}) == 1 for batches in ranks for batch in batches)
    assert sorted(i for batches in ranks for batch in batches for i in batch) == list(range(6)) and len(seen) == 6
    assert load_file(out / "learned_embeds.safetensors")[PLACEHOLDER].shape == (8, 128)

    # stopped after step 2 and resumed to step 4, it ends where an uninterrupted run ends
    assert (
        launch_two_processes(
            SCRIPT, [*argv, "--max_train_steps", "4", "--resume_from_checkpoint", "latest"], 29577
        ).returncode
        == 0
    )
    full = tmp_path / "full"
    full_argv = train_args(tiny_pipeline_dir, data, full, "--max_train_steps", "4", *common)
    full_argv[full_argv.index("--repeats") + 1] = "1"
    assert launch_two_processes(SCRIPT, full_argv, 29579).returncode == 0
    resumed = load_file(out / "learned_embeds.safetensors")[PLACEHOLDER]
    assert torch.equal(resumed, load_file(full / "learned_embeds.safetensors")[PLACEHOLDER])
