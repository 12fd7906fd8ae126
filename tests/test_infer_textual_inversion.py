"""infer_textual_inversion.py on a tiny Infinity + tiny T5, on CPU.

To stay fast, the scripts render (and the training script trains on) a 3-scale prefix of the
0.06M schedule: 64x64 images."""

import argparse
import json
import os

import numpy as np
import pytest
import torch
from conftest import ROOT
from helpers import run_script_expecting_error
from PIL import Image, ImageDraw
from safetensors.torch import save_file

import infer_textual_inversion as infer
import infinity_t2i.pipeline as pipeline_module
import train_textual_inversion_infinity as train
from infinity_t2i.grids import labelled_grid
from infinity_t2i.pipeline import InfinityPipeline, generate_images
from infinity_t2i.resolution import get_schedule
from infinity_t2i.text import SPACE_PIECE, tokenize
from infinity_t2i.textual_inversion import (
    ConceptError,
    LearnedConcept,
    Placeholders,
    apply_concepts,
    expand_placeholders,
    load_learned_embeds,
    save_learned_embeds,
)

PLACEHOLDER = "<blob>"
SCRIPT = os.path.join(ROOT, "infer_textual_inversion.py")
WIDTH = 128  # the tiny T5's embedding size
real_get_schedule = get_schedule


def trimmed(h_div_w=1.0, pn="0.06M"):
    return real_get_schedule(h_div_w, pn).prefix(3)


@pytest.fixture
def fast(monkeypatch):
    """The script renders the first 3 scales of its schedule (the script has no flag for that)."""
    monkeypatch.setattr(infer, "get_schedule", trimmed)


@pytest.fixture(scope="module")
def trained(tiny_pipeline_dir, tmp_path_factory):
    """One step of the training script (input mode; output mode: test_ti_modes.py), with its
    validation of 2 images at the end."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "get_schedule", trimmed)
        return _train(tiny_pipeline_dir, tmp_path_factory)


def _train(tiny_pipeline_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("blob-images")
    for i in range(2):
        image = Image.new("RGB", (96, 80), (40 + 20 * i, 110, 190))
        ImageDraw.Draw(image).ellipse((10, 12, 84, 70), fill=(240, 90, 30))
        image.save(data / f"blob_{i}.png")
    out = tmp_path_factory.mktemp("blob-ti")
    train.main(train.parse_args([
        "--pretrained_model_name_or_path", str(tiny_pipeline_dir), "--train_data_dir", str(data),
        "--placeholder_token", PLACEHOLDER, "--initializer_token", "dog", "--output_dir", str(out),
        "--pn", "0.06M", "--repeats", "1", "--seed", "0", "--max_train_steps", "1", "--learning_rate", "0.5",
        "--ti_mode", "input",
        "--validation_prompt", f"a photo of a {PLACEHOLDER}", "--validation_steps", "1", "--num_validation_images", "2",
        "--checkpointing_steps", "1000", "--save_steps", "1000",
    ]))  # fmt: skip
    return out


def forbid_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(InfinityPipeline, "from_pretrained", refuse)


@pytest.fixture
def no_model_loads(monkeypatch):
    """Bad input that can be told without the model is refused before it loads."""
    forbid_model_loads(monkeypatch)


def write_concept(path, placeholder, num_vectors, seed=0, width=WIDTH, **metadata):
    vectors = torch.randn(num_vectors, width, generator=torch.Generator().manual_seed(seed))
    tokens = [placeholder] + [f"{placeholder}_{i}" for i in range(1, num_vectors)]
    save_learned_embeds(
        str(path),
        LearnedConcept(placeholder, tokens, vectors, {"initializer_token": "cat", "model_type": "custom", **metadata}),
    )
    return vectors


def infer_args(model_dir, embeds, output_dir, *extra):
    embeds = [embeds] if isinstance(embeds, (str, os.PathLike)) else embeds
    return [
        "--pretrained_model_name_or_path", str(model_dir),
        *[a for e in embeds for a in ("--learned_embeds", str(e))],
        "--output_dir", str(output_dir),
        "--pn", "0.06M",
        "--seed", "0",
        "--num_images", "1",
        *extra,
    ]  # fmt: skip


def run(model_dir, embeds, output_dir, *extra):
    return infer.main(infer.parse_args(infer_args(model_dir, embeds, output_dir, *extra)))


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def same(a, b):
    return np.array_equal(np.asarray(a), np.asarray(b))


def within_a_level(a, b):
    """The same bits drawn in other batches: batched float arithmetic may round a pixel one level apart."""
    return np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max() <= 1


# ---------------------------------------------------------------------------------------------
# Prompt encoding
# ---------------------------------------------------------------------------------------------


def test_trained_embedding_swaps_in_only_at_the_placeholder(trained, tiny_pipeline_dir):
    base = InfinityPipeline.from_pretrained(tiny_pipeline_dir)
    pipe = InfinityPipeline.from_pretrained(tiny_pipeline_dir)
    (concept,) = load_learned_embeds(str(trained))  # the folder the training script wrote
    assert (
        concept.tokens == [PLACEHOLDER]
        and concept.metadata["initializer_token"] == "dog"
        and concept.metadata["step"] == 1
    )
    ids = apply_concepts(pipe.tokenizer, pipe.text_encoder, [concept])
    assert ids == {PLACEHOLDER: [len(base.tokenizer)]}

    prompt, reference = f"a photo of a {PLACEHOLDER} on the beach", "a photo of a dog on the beach"
    learned_ids, mask = tokenize(pipe.tokenizer, [prompt])
    dog_ids, dog_mask = tokenize(base.tokenizer, [reference])
    assert learned_ids.shape == dog_ids.shape and torch.equal(mask, dog_mask)
    (k,) = torch.nonzero(learned_ids[0] != dog_ids[0]).flatten().tolist()  # one position differs
    assert learned_ids[0, k] == ids[PLACEHOLDER][0] and dog_ids[0, k] == base.tokenizer.convert_tokens_to_ids(
        SPACE_PIECE + "dog"
    )

    # the T5 input: the base model's rows everywhere, the learned vector at the placeholder
    embeds = base.text_encoder.get_input_embeddings()(dog_ids)
    embeds[0, k] = concept.vectors[0]
    assert torch.equal(pipe.text_encoder.get_input_embeddings()(learned_ids), embeds)
    expected = base.text_encoder(inputs_embeds=embeds, attention_mask=dog_mask).last_hidden_state
    features = pipe.encode_prompt([prompt]).features
    assert torch.equal(features, expected)
    assert not torch.equal(features, base.encode_prompt([reference]).features)  # training moved it away from "dog"

    # prompts without the token: bit-identical T5 features, alone and in a batch of other lengths
    others = ["a photo of a dog", "a cat on the beach, <b> blob", "a close-up photo of a small dog in the garden"]
    for batch in ([others[0]], others):
        a, b = pipe.encode_prompt(batch), base.encode_prompt(batch)
        assert torch.equal(a.features, b.features) and torch.equal(a.mask, b.mask)
    rows, base_rows = pipe.text_encoder.get_input_embeddings().weight, base.text_encoder.get_input_embeddings().weight
    untouched = torch.arange(rows.shape[0]) != ids[PLACEHOLDER][0]
    assert rows.shape == base_rows.shape and torch.equal(rows[untouched], base_rows[untouched])


def test_multi_vector_expansion_and_two_embeddings(trained, tiny_pipeline_dir, tmp_path):
    duo = write_concept(tmp_path / "duo.safetensors", "<duo>", 3)
    pipe = InfinityPipeline.from_pretrained(tiny_pipeline_dir)
    concepts = load_learned_embeds(str(trained)) + load_learned_embeds(str(tmp_path / "duo.safetensors"))
    ids = apply_concepts(pipe.tokenizer, pipe.text_encoder, concepts)
    n = len(pipe.tokenizer) - 4
    assert ids == {PLACEHOLDER: [n], "<duo>": [n + 1, n + 2, n + 3]}
    encoded = expand_placeholders(f"a {PLACEHOLDER} and a <duo>, dog", {c.placeholder: c.tokens for c in concepts})
    assert encoded == f"a {PLACEHOLDER} and a <duo> <duo>_1 <duo>_2, dog"
    input_ids = tokenize(pipe.tokenizer, [encoded])[0][0].tolist()
    k = input_ids.index(n + 1)
    assert (
        input_ids[k : k + 3] == [n + 1, n + 2, n + 3] and pipe.tokenizer.convert_ids_to_tokens(input_ids[k + 3]) == ","
    )
    embedding = pipe.text_encoder.get_input_embeddings()
    assert torch.equal(embedding(torch.tensor(input_ids[k : k + 3])), duo)
    assert torch.equal(embedding(torch.tensor([n]))[0], concepts[0].vectors[0])


@pytest.mark.usefixtures("fast")
def test_two_embeddings_in_one_run_and_the_per_token_scale(trained, tiny_pipeline_dir, tmp_path, monkeypatch):
    duo = write_concept(tmp_path / "duo.safetensors", "<duo>", 3)
    seen = []  # what T5 encodes, and the embedding rows it reads
    original = pipeline_module.encode_prompt

    def spy(tokenizer, text_encoder, prompts, *args, **kwargs):
        rows = text_encoder.get_input_embeddings().weight
        seen.append((list(prompts), rows[-28:].clone()))  # the spare rows hold the learned tokens
        return original(tokenizer, text_encoder, prompts, *args, **kwargs)

    monkeypatch.setattr(pipeline_module, "encode_prompt", spy)
    settings = run(tiny_pipeline_dir, [trained, tmp_path / "duo.safetensors"], tmp_path / "out", "--cfg", "1",
                   "--prompt", f"a {PLACEHOLDER} and a <duo>:0.5, dog",
                   "--prompt", f"a <duo> on a {PLACEHOLDER}")  # fmt: skip
    first, second = settings["prompts"]
    assert first["encoded_prompt"] == f"a {PLACEHOLDER} and a <duo> <duo>_1 <duo>_2, dog" and first["scales"] == {
        "<duo>": 0.5
    }
    assert second["encoded_prompt"] == f"a <duo> <duo>_1 <duo>_2 on a {PLACEHOLDER}" and second["scales"] == {}
    assert first["concepts"] == [PLACEHOLDER, "<duo>"]
    assert [e["placeholder"] for e in settings["embeddings"]] == [PLACEHOLDER, "<duo>"]
    assert settings["embeddings"][1]["tokens"] == ["<duo>", "<duo>_1", "<duo>_2"]
    (p1, rows1), (p2, rows2) = seen  # cfg 1: one encoding per prompt
    assert p1 == [first["encoded_prompt"]] and p2 == [second["encoded_prompt"]]
    blob = load_learned_embeds(str(trained))[0].vectors
    assert torch.equal(rows1[:4], torch.cat([blob, 0.5 * duo]))  # <duo> scaled for the first prompt only
    assert torch.equal(rows2[:4], torch.cat([blob, duo]))


def test_token_scales_are_parsed_per_prompt():
    parse = Placeholders([PLACEHOLDER]).take_weights
    assert parse(f"a {PLACEHOLDER}:0.8 dog") == (f"a {PLACEHOLDER} dog", {PLACEHOLDER: 0.8})
    assert parse(f"a {PLACEHOLDER}:2.") == (f"a {PLACEHOLDER}.", {PLACEHOLDER: 2.0})
    assert parse(f"{PLACEHOLDER}: a dog") == (f"{PLACEHOLDER}: a dog", {})
    assert parse(f"a {PLACEHOLDER}:-.5 and {PLACEHOLDER}:-0.5")[1] == {PLACEHOLDER: -0.5}
    with pytest.raises(ConceptError, match="two weights"):
        parse(f"a {PLACEHOLDER}:0.5 and a {PLACEHOLDER}:2")


def test_diffusers_and_a1111_files_load(tiny_pipeline_dir, tmp_path):
    vector = torch.randn(WIDTH)
    save_file({"<cat-toy>": vector}, tmp_path / "diffusers.safetensors")
    torch.save({"<cat-toy>": vector.clone()}, tmp_path / "learned_embeds.bin")
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(torch.randn(2, WIDTH))},
                "name": "kitty", "step": 100, "sd_checkpoint_name": "sd15"}, tmp_path / "kitty.pt")  # fmt: skip
    save_file({"emb_params": torch.randn(1, WIDTH)}, tmp_path / "puppy.safetensors")
    (diffusers,) = load_learned_embeds(str(tmp_path / "diffusers.safetensors"))
    (pickled,) = load_learned_embeds(str(tmp_path / "learned_embeds.bin"))
    (a1111,) = load_learned_embeds(str(tmp_path / "kitty.pt"))
    (a1111_st,) = load_learned_embeds(str(tmp_path / "puppy.safetensors"))
    (renamed,) = load_learned_embeds(str(tmp_path / "kitty.pt"), token="<tabby>")
    assert (
        diffusers.placeholder == "<cat-toy>"
        and diffusers.tokens == ["<cat-toy>"]
        and torch.equal(diffusers.vectors, vector[None])
    )
    assert torch.equal(pickled.vectors, diffusers.vectors)
    assert a1111.tokens == ["<kitty>", "<kitty>_1"] and a1111.metadata == {
        "format": "a1111",
        "name": "kitty",
        "step": 100,
        "sd_checkpoint_name": "sd15",
    }
    assert a1111_st.tokens == ["<puppy>"]
    assert renamed.tokens == ["<tabby>", "<tabby>_1"] and torch.equal(renamed.vectors, a1111.vectors)
    pipe = InfinityPipeline.from_pretrained(tiny_pipeline_dir)
    ids = apply_concepts(pipe.tokenizer, pipe.text_encoder, [diffusers, a1111, a1111_st])
    assert [len(v) for v in ids.values()] == [1, 2, 1]


# ---------------------------------------------------------------------------------------------
# The script
# ---------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("fast")
def test_images_equal_the_training_scripts_validation(trained, tiny_pipeline_dir, tmp_path):
    """Same generation code, same vectors, same batches: inference redraws the last validation
    grid exactly. Validation draws one image at a time, so inference does too here: batched float
    math may differ in the last bits on some CPUs (seen: 48 pixels one level apart in a batch of 2)."""
    out = tmp_path / "out"
    prompt = f"a photo of a {PLACEHOLDER}"
    run(tiny_pipeline_dir, trained, out, "--prompt", prompt, "--num_images", "2", "--batch_size", "1")
    images = [Image.open(out / f"a-photo-of-a-[blob]_seed0_{i}.png") for i in range(2)]
    assert [im.size for im in images] == [(64, 64)] * 2
    labels = {"row_labels": [f"a photo of a {PLACEHOLDER}"], "column_labels": ["seed 0", "seed 1"]}
    expected = labelled_grid([images], **labels, title=f"{PLACEHOLDER}, step 1")
    assert np.array_equal(pixels(trained / "validation" / "step-000001.png"), np.asarray(expected))


@pytest.mark.usefixtures("fast")
def test_same_seed_same_images_other_seed_different(trained, tiny_pipeline_dir, tmp_path):
    prompt = ("--prompt", f"a photo of a {PLACEHOLDER}", "--num_images", "2")
    for name, batch_size in (("a", "2"), ("again", "2"), ("b", "1")):
        run(tiny_pipeline_dir, trained, tmp_path / name, *prompt, "--batch_size", batch_size)
    run(
        tiny_pipeline_dir,
        trained,
        tmp_path / "c",
        "--prompt",
        f"a photo of a {PLACEHOLDER}",
        "--seed",
        "1",
        "--batch_size",
        "1",
    )

    def images(name, seed=0, n=2):
        return [pixels(tmp_path / name / f"a-photo-of-a-[blob]_seed{seed}_{i}.png").astype(int) for i in range(n)]

    a, again, b, (c,) = images("a"), images("again"), images("b"), images("c", seed=1, n=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, again))  # same seed, same images
    # another batch size draws the same bits; batched float arithmetic may round a pixel apart
    assert all(within_a_level(x, y) for x, y in zip(a, b))
    assert np.array_equal(c, b[1])  # image i is drawn with seed + i
    assert np.abs(c - b[0]).mean() > 5  # another seed, another image


@pytest.mark.parametrize(
    "prompt, name",
    [
        ("a photo of a <blue-heart>", "a-photo-of-a-[blue-heart]"),
        ("a photo of a blue heart", "a-photo-of-a-blue-heart"),  # the words keep their own name
        ("<blue-heart>:0.5 on grass, <pc>x", "[blue-heart]-0-5-on-grass-[pc-x]"),
        ("<pc> and <pc>x", "[pc]-and-[pc-x]"),  # the longer placeholder is not split by the shorter
        ("a [tag] <pc>", "a-tag-[pc]"),  # brackets in the words are not a token's
    ],
)
def test_file_names_keep_the_learned_token_visible(prompt, name):
    assert infer.slugify(prompt, ["<pc>", "<blue-heart>", "<pc>x"]) == name


def test_a_prompt_file_saved_with_a_byte_order_mark_reads_as_its_prompts(tmp_path):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text(f"{PLACEHOLDER} in a garden\na {PLACEHOLDER}\n", encoding="utf-8-sig")  # Windows Notepad
    args = argparse.Namespace(prompt=None, prompt_file=str(prompt_file))
    assert infer.read_prompts(args) == [f"{PLACEHOLDER} in a garden", f"a {PLACEHOLDER}"]


@pytest.mark.usefixtures("fast")
def test_files_grids_and_settings_are_written(trained, tiny_pipeline_dir, tmp_path, capsys):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text(f"\n{PLACEHOLDER} in a garden\n\n")
    out = tmp_path / "out"
    run(tiny_pipeline_dir, trained, out, "--prompt", f"A photo of a {PLACEHOLDER} on the beach",
        "--prompt_file", str(prompt_file), "--num_images", "3", "--batch_size", "2", "--h_div_w", "0.52",
        "--compare", "--negative_prompt", "blurry")  # fmt: skip
    captured = capsys.readouterr()
    slugs = ["a-photo-of-a-[blob]-on-the-beach", "[blob]-in-a-garden"]
    expected = {f"{s}_seed0_{i}.png" for s in slugs for i in range(3)} | {
        f"{s}_{kind}.png" for s in slugs for kind in ("grid", "compare")
    }
    assert set(os.listdir(out)) == expected | {"settings.json"}
    size = (64, 32)  # (w, h): h/w 0.52 -> the 1:2 template, 3 scales
    assert Image.open(out / f"{slugs[0]}_seed0_0.png").size == size
    images = [Image.open(out / f"{slugs[0]}_seed0_{i}.png") for i in range(3)]
    prompt = f"A photo of a {PLACEHOLDER} on the beach"
    grid = pixels(out / f"{slugs[0]}_grid.png")  # the 3 images in one row, upscaled 4x, titled
    assert np.array_equal(grid, np.asarray(labelled_grid([images], title=f"{prompt} (seeds 0-2, row by row)")))
    # a row per seed: the learned token's image under its prompt, the word's beside it under "... blob ..."
    compare = pixels(out / f"{slugs[0]}_compare.png")
    labels = {"row_labels": ["seed 0", "seed 1", "seed 2"], "column_labels": [prompt, "A photo of a dog on the beach"]}
    learned_column = np.asarray(labelled_grid([[im, im] for im in images], **labels))
    assert compare.shape == learned_column.shape
    left = compare.shape[1] - 4 * size[0]  # all but the last column (cells are 4 x 64 wide)
    assert np.array_equal(compare[:, :left], learned_column[:, :left])
    assert not np.array_equal(compare[:, left:], learned_column[:, left:])
    settings = json.loads((out / "settings.json").read_text())
    assert settings["args"]["num_images"] == 3 and settings["args"]["seed"] == 0 and settings["args"]["compare"]
    assert settings["h_div_w_template"] == 0.5 and settings["image_size"] == [32, 64] and settings["dtype"] == "float32"
    assert settings["sampling"] == {
        "cfg": 3.0,
        "tau": 1.0,
        "top_k": 900,
        "top_p": 0.97,
        "cfg_insertion_layer": 0,
        "bit_sampling": settings["sampling"]["bit_sampling"],
    }
    (embedding,) = settings["embeddings"]
    assert os.path.basename(embedding["metadata"]["base_model"]) == os.path.basename(tiny_pipeline_dir)
    assert embedding["metadata"]["initializer_token"] == "dog"
    assert embedding["file"] == str(trained / "learned_embeds.safetensors") and embedding["tokens"] == [PLACEHOLDER]
    first = settings["prompts"][0]
    assert first["images"] == [f"{slugs[0]}_seed0_{i}.png" for i in range(3)] and first["seeds"] == [0, 1, 2]
    assert first["compare_prompt"] == "A photo of a dog on the beach" and first["negative_prompt"] == "blurry"
    assert settings["prompts"][1]["prompt"] == f"{PLACEHOLDER} in a garden"
    assert "Images: 100%" in captured.err and "12/12" in captured.err  # 2 prompts x 3 images, twice with --compare
    summary = captured.out.strip().splitlines()[-1]
    assert "6 image(s) of 2 prompt(s)" in summary and "2 comparison grid(s)" in summary and str(out) in summary


@pytest.mark.usefixtures("fast")
def test_a_prompt_without_learned_tokens_renders_as_the_base_model(trained, tiny_pipeline_dir, tmp_path, caplog):
    out = tmp_path / "out"
    run(tiny_pipeline_dir, trained, out, "--prompt", "a photo of a dog", "--num_images", "2")
    assert "names none of the loaded tokens" in caplog.text
    base = InfinityPipeline.from_pretrained(tiny_pipeline_dir)
    expected = generate_images(base, "a photo of a dog", 2, seed=0, schedule=trimmed())
    assert all(same(pixels(out / f"a-photo-of-a-dog_seed0_{i}.png"), e) for i, e in enumerate(expected))


@pytest.mark.usefixtures("fast")
def test_compare_needs_an_initializer_and_force_accepts_another_model_type(tiny_pipeline_dir, tmp_path, caplog):
    save_file({"<cat-toy>": torch.randn(WIDTH)}, tmp_path / "diffusers.safetensors")  # no metadata
    write_concept(tmp_path / "big.safetensors", "<big>", 1, model_type="infinity_8b")
    out = tmp_path / "out"
    settings = run(tiny_pipeline_dir, [tmp_path / "diffusers.safetensors", tmp_path / "big.safetensors"], out,
                   "--compare", "--force", "--dtype", "bfloat16",
                   "--prompt", "a <cat-toy>", "--prompt", "a <big>")  # fmt: skip
    assert "<cat-toy>" in caplog.text and "records no initializer_token" in caplog.text
    assert "using it anyway" in caplog.text and "infinity_8b" in caplog.text
    assert not os.path.exists(out / "a-[cat-toy]_compare.png") and os.path.exists(out / "a-[big]_compare.png")
    assert settings["dtype"] == "bfloat16" and settings["prompts"][1]["compare_prompt"] == "a cat"


@pytest.mark.parametrize(
    "case,extra,message",
    [
        ("clip", [], "has vectors of size 768, but the text encoder's embeddings have size 128"),
        ("8b", [], "was trained for model_type infinity_8b (this run: custom); load that model, or pass --force"),
        (
            "hub-names",
            ["--text_encoder_name_or_path", "google/flan-t5-xl"],
            "text_encoder google/t5-v1_1-xl (this run: google/flan-t5-xl)",
        ),
        (
            "hub-names",
            ["--pretrained_model_name_or_path", "someone/infinity-finetune"],
            "base_model FoundationVision/Infinity (this run: someone/infinity-finetune)",
        ),
        (
            "ok",
            ["--token", "dog"],
            "'dog' is already in the tokenizer's vocabulary; load it under a new name with --token",
        ),
        ("twice", [], "is loaded twice"),
        ("missing", [], "does not exist"),
        ("empty-dir", [], "is a folder without learned_embeds.safetensors"),
        ("offline", [], "could not get learned_embeds.safetensors from 'user/my-dog-ti'"),
        ("pickle", [], "holds pickled objects other than tensors and is refused"),
        ("ok", ["--prompt_file", "nowhere.txt"], "cannot read --prompt_file nowhere.txt"),
        ("ok", ["--prompt", "a <ok>:1 and <ok>:2"], "two weights"),
        ("ok", ["--token", "a", "--token", "b"], "2 --token for 1 --learned_embeds"),
        ("output-is-a-file", [], "--output_dir: "),
        pytest.param(
            "ok",
            ["--device", "cuda"],
            "CUDA is not available",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine"),
        ),
    ],
)
def test_bad_input_fails_with_one_line_and_writes_nothing(
    tiny_pipeline_dir, tmp_path, capsys, monkeypatch, case, extra, message
):
    embeds = tmp_path / "embeds.safetensors"
    if case == "clip":
        save_file({"<sd-cat>": torch.randn(1, 768)}, embeds)
    elif case == "8b":
        write_concept(embeds, "<big>", 1, model_type="infinity_8b")
    elif case == "hub-names":
        write_concept(embeds, "<hub>", 1, base_model="FoundationVision/Infinity", text_encoder="google/t5-v1_1-xl")
    elif case in ("ok", "twice"):
        write_concept(embeds, "<ok>", 1)
    elif case == "empty-dir":
        embeds = tmp_path / "empty"
        embeds.mkdir()
    elif case == "offline":
        import huggingface_hub.constants

        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        embeds = "user/my-dog-ti"
    elif case == "pickle":
        embeds = tmp_path / "embedding.pt"
        torch.save({"string_to_param": {"*": torch.randn(1, WIDTH)}, "args": argparse.Namespace(lr=1)}, embeds)
    if case != "clip":  # all but the vectors' width can be told before the model loads (the tokens: by the tokenizer)
        forbid_model_loads(monkeypatch)
    out = tmp_path / "out"
    if case == "output-is-a-file":  # refused before the model loads, not after the images are made
        write_concept(embeds, "<ok>", 1)
        out = tmp_path / "a-file"
        out.write_text("not a folder")
        message = f"--output_dir: {out} is a file, not a folder; choose another folder"
    argv = infer_args(tiny_pipeline_dir, [embeds] * (2 if case == "twice" else 1), out, "--prompt", "a <ok>") + extra
    err = run_script_expecting_error(SCRIPT, argv, capsys)
    assert message in err, err
    if case == "offline":
        assert "DIR/learned_embeds.safetensors" in err
    if case == "output-is-a-file":
        assert out.read_text() == "not a folder"
    else:
        assert not out.exists()


@pytest.mark.parametrize(
    "case,extra,message",
    [
        ("other-model", [], "was trained for another base model (tiny-infinity, fingerprint 0123456789abcdef; this "),
        ("ok", ["--prompt", "a <ok>:1e3"], "<ok>:1e3 in 'a <ok>:1e3' is out of range; write a weight as <ok>:0.8"),
        ("ok", ["--prompt", "a <ok>:abc"], "<ok>:abc in 'a <ok>:abc' is not a weight; write a weight as <ok>:0.8, a "),
        ("ok", ["--prompt", "a <ok>:1e999 dog"], "<ok>:1e999 in 'a <ok>:1e999 dog' is out of range"),
        (
            "ok",
            ["--prompt", "a <ok>:" + "9" * 400],
            "is out of range; write a weight as <ok>:0.8, a number from -1 to 2",
        ),
        ("ok", ["--prompt", "a <ok>:nan"], "<ok>:nan in 'a <ok>:nan' is not a weight"),
        ("ok", ["--prompt", "a <ok>:-1.5"], "<ok>:-1.5 in 'a <ok>:-1.5' is out of range"),
        ("ok", ["--prompt", "a <ok>:0.5.5"], "<ok>:0.5.5 in 'a <ok>:0.5.5' is not a weight"),
        ("ok", ["--negative_prompt", "<ok>:3"], "<ok>:3 in '<ok>:3' is out of range"),
        ("latin-1", [], "is not UTF-8 text (line 2 holds the byte 0xe9); save it as UTF-8"),
        (
            "ok",
            ["--pretrained_model_name_or_path", "./nope"],
            "--pretrained_model_name_or_path ./nope: the folder does ",
        ),
        (
            "ok",
            ["--pretrained_model_name_or_path", "nope"],
            "--pretrained_model_name_or_path nope: the folder does not",
        ),
        (
            "ok",
            ["--cfg_insertion_layer", "-99"],
            "--cfg_insertion_layer -99: this model has 4 blocks; give 0 (guidance ",
        ),
        ("ok", ["--cfg_insertion_layer", "-4"], "or -1 to -3 (on the hidden states after block depth-k)"),
        ("earlier-run", [], "already holds settings.json and 2 more file(s) this run writes, from an earlier run; "),
    ],
)
def test_more_bad_input_fails_with_one_line_and_writes_nothing(
    tiny_pipeline_dir, tmp_path, capsys, monkeypatch, case, extra, message
):
    embeds, out, argv_extra = tmp_path / "embeds.safetensors", tmp_path / "out", []
    write_concept(embeds, "<ok>", 2, base_model="tiny-infinity")
    if case == "other-model":  # another local model: its folder name says nothing, its fingerprint does
        write_concept(embeds, "<ok>", 1, base_model="tiny-infinity", base_model_fingerprint="0123456789abcdef")
    else:
        forbid_model_loads(monkeypatch)  # refused before the model loads
    if case == "latin-1":
        (tmp_path / "prompts.txt").write_bytes("a <ok>\na <ok> caf\xe9\n".encode("latin-1"))
        argv_extra = ["--prompt_file", tmp_path / "prompts.txt"]
    before = {}
    if case == "earlier-run":
        out.mkdir()
        for name in ("settings.json", "a-[ok]_seed0_0.png", "a-[ok]_grid.png", "notes.txt"):
            (out / name).write_text(name)
        before = {p.name: p.read_text() for p in out.iterdir()}
        message += "choose another folder, or pass --overwrite_output_dir to replace them"
    argv = infer_args(tiny_pipeline_dir, embeds, out, "--prompt", "a <ok>", *argv_extra) + extra
    err = run_script_expecting_error(SCRIPT, argv, capsys)
    assert message in err, err
    if case == "other-model":
        assert err.endswith("; load that model, or pass --force to use the embedding anyway"), err
    assert ({p.name: p.read_text() for p in out.iterdir()} == before) if before else not out.exists()


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--num_images", "0"),
        ("--num_images", "10001"),
        ("--batch_size", "0"),
        ("--batch_size", "1025"),
        ("--seed", str(2**64)),
        ("--seed", "-1"),
        ("--h_div_w", "0"),
        ("--h_div_w", "nan"),
        ("--h_div_w", "inf"),
        ("--cfg", "nan"),
        ("--cfg", "-1"),
        ("--cfg", "1e9"),
        ("--tau", "0"),
        ("--tau", "nan"),
        ("--tau", "1e-300"),
        ("--top_k", "-1"),
        ("--top_k", str(2**31)),
        ("--top_p", "1.5"),
        ("--top_p", "nan"),
        ("--cfg_insertion_layer", "5"),
    ],
)
def test_every_numeric_flag_is_checked_against_its_range(
    tiny_pipeline_dir, tmp_path, capsys, no_model_loads, flag, value
):
    write_concept(tmp_path / "embeds.safetensors", "<ok>", 1)
    out = tmp_path / "out"
    argv = infer_args(tiny_pipeline_dir, tmp_path / "embeds.safetensors", out, "--prompt", "a <ok>") + [flag, value]
    err = run_script_expecting_error(SCRIPT, argv, capsys)
    name = flag.removeprefix("--")
    assert f"error: {flag} must be " in err and infer.allowed(name) in err and ", got " in err, err
    assert not out.exists()


@pytest.mark.parametrize("device", ["foo", "cuda:99", "meta"])
def test_a_device_that_is_not_there_is_one_line(tiny_pipeline_dir, tmp_path, capsys, no_model_loads, device):
    write_concept(tmp_path / "embeds.safetensors", "<ok>", 1)
    argv = infer_args(tiny_pipeline_dir, tmp_path / "embeds.safetensors", tmp_path / "out", "--prompt", "a <ok>")
    err = run_script_expecting_error(SCRIPT, [*argv, "--device", device], capsys)
    assert f"error: --device {device}: " in err and "cpu" in err, err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Weights, placeholders and file names
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt, text, weights",
    [
        ("a <pc>:2e-1 dog", "a <pc> dog", {"<pc>": 0.2}),
        ("a <pc>:+1.5, dog", "a <pc>, dog", {"<pc>": 1.5}),
        ("a <pc>:1.", "a <pc>.", {"<pc>": 1.0}),  # the sentence's full stop stays
        ("a <pc>:-1 and <pc>x:.5", "a <pc> and <pc>x", {"<pc>": -1.0, "<pc>x": 0.5}),
        ("a <pc>x:2 and a <pc>", "a <pc>x and a <pc>", {"<pc>x": 2.0}),
        ("<pc>: a dog", "<pc>: a dog", {}),  # a colon and a space: text
        ("<pc>:-) and <pc>:...", "<pc>:-) and <pc>:...", {}),  # no digit or letter: text
    ],
)
def test_weights_are_numbers_in_range_after_whole_placeholders(prompt, text, weights):
    assert Placeholders(["<pc>", "<pc>x"]).take_weights(prompt) == (text, weights)


def test_placeholders_that_start_alike_are_matched_whole():
    tokens = {"<pc>": ["<pc>", "<pc>_1"], "<pc>x": ["<pc>x"], "<a>": ["<a>", "<a>_1", "<a>_2"]}
    placeholders = Placeholders(tokens)
    assert placeholders.expand("a <pc>x, a <pc> and <pc>xy") == "a <pc>x, a <pc> <pc>_1 and <pc>xy"
    assert placeholders.expand("<a> <a>_1 <a>_2 and <a>") == "<a> <a>_1 <a>_2 and <a> <a>_1 <a>_2"  # expands once
    assert placeholders.named("a <pc>x") == ["<pc>x"] and placeholders.named("<pc>x <pc>") == ["<pc>", "<pc>x"]
    assert placeholders.replace("a <pc>x by a <pc>", {"<pc>": "cat", "<pc>x": "dog"}) == "a dog by a cat"


@pytest.mark.usefixtures("fast")
def test_placeholders_that_are_prefixes_of_each_other_both_work(tiny_pipeline_dir, tmp_path):
    """`<pc>x` keeps its own vector beside a two-vector `<pc>`: its image is the one drawn with
    `<pc>x` alone loaded (T5 sees vectors, not token ids)."""
    write_concept(tmp_path / "pc.safetensors", "<pc>", 2, seed=1)
    write_concept(tmp_path / "pcx.safetensors", "<pc>x", 1, seed=2, initializer_token="dog")
    both, alone, prompt = tmp_path / "both", tmp_path / "alone", "a <pc>x on grass"
    settings = run(tiny_pipeline_dir, [tmp_path / "pc.safetensors", tmp_path / "pcx.safetensors"], both,
                   "--prompt", prompt, "--prompt", "a <pc>:0.5 by a <pc>x", "--compare")  # fmt: skip
    run(tiny_pipeline_dir, tmp_path / "pcx.safetensors", alone, "--prompt", prompt)
    first, second = settings["prompts"]
    assert first["encoded_prompt"] == prompt and first["concepts"] == ["<pc>x"]
    assert first["compare_prompt"] == "a dog on grass"
    assert second["encoded_prompt"] == "a <pc> <pc>_1 by a <pc>x" and second["scales"] == {"<pc>": 0.5}
    assert second["compare_prompt"] == "a cat by a dog"
    name = "a-[pc-x]-on-grass_seed0_0.png"
    assert same(pixels(both / name), pixels(alone / name))


def test_file_names_are_unique_per_prompt_whatever_the_order():
    prompts = ["a dog", "A dog!", "a dog 2", "a <pc> dog", "a <PC> dog"]
    stems = infer.file_stems(prompts, ["<pc>", "<PC>"])
    assert len(set(stems.values())) == len(prompts)
    assert stems["a dog 2"] == "a-dog-2" and stems["a <pc> dog"].startswith("a-[pc]-dog-")
    assert stems["a dog"] != "a-dog" and stems["a dog"].startswith("a-dog-")  # both "a dog"s carry a hash
    assert infer.file_stems(prompts[::-1], ["<pc>", "<PC>"]) == stems  # whatever the order


@pytest.mark.usefixtures("fast")
def test_prompts_with_one_slug_keep_their_own_images_and_names(tiny_pipeline_dir, tmp_path):
    write_concept(tmp_path / "ok.safetensors", "<ok>", 1)
    prompts, embeds = ["a <ok>", "A <ok>!", "a <ok>"], tmp_path / "ok.safetensors"  # one given twice
    first_run = run(tiny_pipeline_dir, embeds, tmp_path / "one", *[a for p in prompts for a in ("--prompt", p)])
    reversed_run = run(
        tiny_pipeline_dir, embeds, tmp_path / "two", *[a for p in prompts[::-1] for a in ("--prompt", p)]
    )
    names = {r["prompt"]: r["images"] for r in first_run["prompts"]}
    assert len(first_run["prompts"]) == 2 and len(os.listdir(tmp_path / "one")) == 2 * 2 + 1  # rendered once
    assert names["a <ok>"] != names["A <ok>!"]
    assert {r["prompt"]: r["images"] for r in reversed_run["prompts"]} == names  # a prompt's name is its own
    for prompt in names:  # and so is its image
        run(tiny_pipeline_dir, embeds, tmp_path / f"alone-{len(prompt)}", "--prompt", prompt)
        (image,) = [n for n in os.listdir(tmp_path / f"alone-{len(prompt)}") if n.endswith("_0.png")]
        assert same(pixels(tmp_path / "one" / names[prompt][0]), pixels(tmp_path / f"alone-{len(prompt)}" / image))


@pytest.mark.usefixtures("fast")
def test_a_second_run_into_the_folder_is_refused_unless_told(tiny_pipeline_dir, tmp_path, capsys, monkeypatch):
    write_concept(tmp_path / "ok.safetensors", "<ok>", 1)
    out, embeds = tmp_path / "out", tmp_path / "ok.safetensors"
    run(tiny_pipeline_dir, embeds, out, "--prompt", "a <ok>")
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    with monkeypatch.context() as patch:  # refused before the model loads
        forbid_model_loads(patch)
        argv = infer_args(tiny_pipeline_dir, embeds, out, "--prompt", "a <ok> in the snow", "--seed", "5")
        err = run_script_expecting_error(SCRIPT, argv, capsys)
    assert "already holds settings.json, from an earlier run" in err and "--overwrite_output_dir" in err, err
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    run(tiny_pipeline_dir, embeds, out, "--prompt", "a <ok> in the snow", "--overwrite_output_dir")
    assert json.loads((out / "settings.json").read_text())["prompts"][0]["prompt"] == "a <ok> in the snow"


@pytest.mark.usefixtures("fast")
def test_the_base_models_fingerprint_decides_and_force_accepts_another(tiny_pipeline_dir, tmp_path, caplog):
    fingerprint = InfinityPipeline.from_pretrained(tiny_pipeline_dir).fingerprint()
    write_concept(
        tmp_path / "mine.safetensors", "<mine>", 1, base_model="elsewhere", base_model_fingerprint=fingerprint
    )
    write_concept(tmp_path / "other.safetensors", "<other>", 1, base_model_fingerprint="0123456789abcdef")
    # a file with the model's fingerprint loads whatever its base_model says, even another hub id
    write_concept(tmp_path / "hub.safetensors", "<hub>", 1, base_model="someone/x", base_model_fingerprint=fingerprint)
    files = [tmp_path / f"{n}.safetensors" for n in ("mine", "hub", "other")]
    settings = run(tiny_pipeline_dir, files, tmp_path / "out", "--prompt", "a <other>", "--force")
    assert "another base model (fingerprint 0123456789abcdef" in caplog.text and "using it anyway" in caplog.text
    assert "<mine>" not in caplog.text and "<hub>" not in caplog.text
    assert settings["base_model_fingerprint"] == fingerprint
    pipe = InfinityPipeline.from_pretrained(tiny_pipeline_dir)
    with pytest.raises(ConceptError, match="pass force=True to use the embedding anyway"):
        pipe.load_textual_inversion(files[2])
    assert pipe.load_textual_inversion(files[0]) == ["<mine>"]


# ---------------------------------------------------------------------------------------------
# The Python API: load_textual_inversion / unload_textual_inversion
# ---------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("fast")
def test_load_textual_inversion_draws_the_scripts_images(trained, tiny_pipeline_dir, tmp_path):
    prompt = f"a photo of a {PLACEHOLDER}:0.7 on the beach"
    run(tiny_pipeline_dir, trained, tmp_path / "out", "--prompt", prompt, "--num_images", "2")
    files = [pixels(tmp_path / "out" / f"a-photo-of-a-[blob]-0-7-on-the-beach_seed0_{i}.png") for i in range(2)]
    pipe = InfinityPipeline.from_pretrained(tiny_pipeline_dir)
    assert pipe.load_textual_inversion(trained) == [PLACEHOLDER]
    assert all(same(a, b) for a, b in zip(generate_images(pipe, prompt, 2, seed=0, schedule=trimmed()), files))
    assert within_a_level(pipe(prompt, seed=1, schedule=trimmed()).images[0], files[1])  # alone, not in a batch


def test_a_placeholder_in_a_prompt_gets_all_its_vectors(tiny_pipeline_dir, tmp_path):
    write_concept(tmp_path / "duo.safetensors", "<duo>", 3)
    pipe = InfinityPipeline.from_pretrained(tiny_pipeline_dir)
    pipe.load_textual_inversion(tmp_path / "duo.safetensors")
    old = InfinityPipeline.from_pretrained(tiny_pipeline_dir)  # before: apply_concepts, prompts as written
    apply_concepts(old.tokenizer, old.text_encoder, load_learned_embeds(str(tmp_path / "duo.safetensors")))
    prompt, written_out = "a <duo> on grass", "a <duo> <duo>_1 <duo>_2 on grass"
    ids = tokenize(pipe.tokenizer, [pipe.parse_prompt(prompt)[0]])[0][0].tolist()
    assert all(i in ids for i in pipe.tokenizer.convert_tokens_to_ids(["<duo>", "<duo>_1", "<duo>_2"]))
    with torch.no_grad():
        features = pipe.encode_prompt([prompt]).features
        assert torch.equal(features, old.encode_prompt([written_out]).features)
        assert torch.equal(pipe.encode_prompt([written_out]).features, features)  # written out: the same
        assert not torch.equal(features[:, :3], old.encode_prompt([prompt]).features[:, :3])  # one vector of three
    image = pipe(prompt, seed=0, schedule=trimmed()).images[0]
    assert same(image, old(written_out, seed=0, schedule=trimmed()).images[0])
    assert not same(image, old(prompt, seed=0, schedule=trimmed()).images[0])


def output_concept(placeholder="<out>", num_vectors=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = [placeholder] + [f"{placeholder}_{i}" for i in range(1, num_vectors)]
    return LearnedConcept(placeholder, tokens, torch.randn(num_vectors, WIDTH, generator=g),
                          {"initializer_token": "cat"}, mode="output",
                          t5_input=torch.randn(num_vectors, WIDTH, generator=g))  # fmt: skip


def test_output_rows_reach_t5s_output_with_return_dict_false(tiny_pipeline_dir):
    pipe = InfinityPipeline.from_pretrained(tiny_pipeline_dir)
    concept = output_concept()
    apply_concepts(pipe.tokenizer, pipe.text_encoder, [concept])
    input_ids, mask = tokenize(pipe.tokenizer, ["a <out> <out>_1 in the snow"])
    with torch.no_grad():
        as_output = pipe.text_encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
        (as_tuple, *_) = pipe.text_encoder(input_ids=input_ids, attention_mask=mask, return_dict=False)
    assert torch.equal(as_tuple, as_output)
    at = [input_ids[0].tolist().index(i) for i in pipe.tokenizer.convert_tokens_to_ids(concept.tokens)]
    assert torch.equal(as_tuple[0, at], concept.vectors)


@pytest.mark.usefixtures("fast")
def test_unload_gives_back_the_base_model_bit_for_bit(trained, tiny_pipeline_dir, tmp_path):
    many = write_concept(tmp_path / "many.safetensors", "<many>", 30)  # more tokens than the 28 spare rows
    save_learned_embeds(str(tmp_path / "out.safetensors"), output_concept())
    base, pipe = (
        InfinityPipeline.from_pretrained(tiny_pipeline_dir),
        InfinityPipeline.from_pretrained(tiny_pipeline_dir),
    )
    prompts = ["a photo of a dog", f"a {PLACEHOLDER} by a <out>:0.5 and a <many>"]  # after unload, only words

    def draw(p, prompt):
        return p(prompt, seed=0, schedule=trimmed()).images[0]

    pipe.load_textual_inversion(trained)
    pipe.load_textual_inversion(tmp_path / "many.safetensors", weight=0.5)
    pipe.load_textual_inversion(tmp_path / "out.safetensors", token="<out>")
    with torch.no_grad():
        many_ids = pipe.tokenizer.convert_tokens_to_ids(["<many>"])
        assert torch.equal(pipe.text_encoder.get_input_embeddings()(torch.tensor(many_ids)), 0.5 * many[:1])
    assert not same(draw(pipe, prompts[1]), draw(base, prompts[1]))
    with pytest.raises(ConceptError, match=r"'<blob>' is already loaded .*unload it first"):
        pipe.load_textual_inversion(trained)
    with pytest.raises(ConceptError, match="weight 3 is out of range; give a number from -1 to 2"):
        pipe.load_textual_inversion(trained, token="<again>", weight=3)

    pipe.unload_textual_inversion()
    for prompt in prompts:
        assert same(draw(pipe, prompt), draw(base, prompt)), prompt
    with torch.no_grad():
        assert torch.equal(pipe.encode_prompt(prompts).features, base.encode_prompt(prompts).features)
    rows, base_rows = pipe.text_encoder.get_input_embeddings().weight, base.text_encoder.get_input_embeddings().weight
    assert len(pipe.tokenizer) == len(base.tokenizer) and torch.equal(rows, base_rows)

    # loaded again after unloading; unloading one concept keeps the other as loaded alone
    pipe.load_textual_inversion(trained)
    pipe.load_textual_inversion(tmp_path / "out.safetensors")
    pipe.unload_textual_inversion(PLACEHOLDER)
    alone = InfinityPipeline.from_pretrained(tiny_pipeline_dir)
    alone.load_textual_inversion(tmp_path / "out.safetensors")
    assert same(draw(pipe, prompts[1]), draw(alone, prompts[1]))
