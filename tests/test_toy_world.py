"""The toy world (toy_infinity, examples/): a deterministic renderer of varied views, concepts that pretraining
never shows or never names, the committed toy Infinity, the fidelity recogniser, and textual inversion that learns."""

import glob
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
from safetensors.torch import load_file

from infinity_t2i.pipeline import InfinityPipeline
from toy_infinity import world as toy_world
from toy_infinity.fidelity import (
    PROMPT_TEMPLATE,
    before_and_after,
    concept_images,
    generate,
    other_objects,
    train_concept,
)
from toy_infinity.recogniser import FidelityScorer

EXAMPLES = os.path.join(ROOT, "examples")
TOY_MODEL = os.path.join(EXAMPLES, "toy-infinity")
CONCEPTS = os.path.join(EXAMPLES, "concepts")
# The fidelity test: the demo's textual inversion (200 steps), 32 images of each prompt.
NUM_IMAGES = 32
MARGIN = 0.1


@pytest.fixture(scope="module")
def toy_pipe():
    return InfinityPipeline.from_pretrained(TOY_MODEL)


def pixels(images):
    return np.stack([np.asarray(im) for im in images])


def test_renderer_is_deterministic_for_a_seed():
    images_a, captions_a, _ = toy_world.pretraining_examples(12, seed=3)
    images_b, captions_b, _ = toy_world.pretraining_examples(12, seed=3)
    images_c, captions_c, _ = toy_world.pretraining_examples(12, seed=4)
    assert np.array_equal(pixels(images_a), pixels(images_b)) and captions_a == captions_b
    assert not np.array_equal(pixels(images_a), pixels(images_c)) and captions_a != captions_c
    concept = toy_world.HELD_OUT_CONCEPTS["pink-cross"]
    assert np.array_equal(
        pixels(toy_world.render_concept_images(concept, 3, 9)), pixels(toy_world.render_concept_images(concept, 3, 9))
    )
    assert images_a[0].size == (toy_world.IMAGE_SIZE, toy_world.IMAGE_SIZE)


def test_nameable_concepts_never_appear_in_pretraining_and_unnamed_kinds_are_never_named():
    _, captions, objects = toy_world.pretraining_examples(3000, seed=0)
    assert set(objects) <= set(toy_world.pretraining_objects())
    words = {w for caption in captions for w in caption.split()}
    assert set(toy_world.COLOURS) <= words and set(toy_world.NAMED_KINDS) <= words
    assert toy_world.GENERIC_KIND_WORD in words and not set(toy_world.UNNAMED_KINDS) & words
    concepts = toy_world.HELD_OUT_CONCEPTS.values()
    assert sum(c.nameable for c in concepts) >= 2 and sum(not c.nameable for c in concepts) >= 2
    for concept in concepts:
        shown = sum((o.kind, o.colour) == (concept.kind, concept.colour) for o in objects)
        if concept.nameable:  # a new pairing of a kind and a colour pretraining shows often
            assert shown == 0 and not any(f"{concept.colour} {concept.kind}" in caption for caption in captions)
            assert sum(o.kind == concept.kind for o in objects) > 150
            assert sum(o.colour == concept.colour for o in objects) > 200
        else:  # drawn, but only ever called a thing
            assert shown > 10 and concept.description == f"{concept.colour} {toy_world.GENERIC_KIND_WORD}"


def test_a_concepts_images_are_different_views_none_of_them_in_pretraining():
    for i, concept in enumerate(toy_world.HELD_OUT_CONCEPTS.values()):
        rng = np.random.default_rng(i)
        objects = [toy_world.sample_object(rng, kind=concept.kind, colour=concept.colour) for _ in range(8)]
        assert all(o.view >= toy_world.VIEWS_PER_OBJECT for o in objects)  # pretraining shows views 0..7
        images = pixels([toy_world.render(o) for o in objects])
        assert len({im.tobytes() for im in images}) == 8
        # the same object and background in another view moves pixels, not just a few at the edge
        same = [toy_world.ToyObject(concept.kind, concept.colour, "grass", "large", view) for view in (0, 1, 2)]
        views = pixels([toy_world.render(o) for o in same]).astype(int)
        assert (np.abs(views[1:] - views[0]).max(-1) > 60).mean() > 0.03


def test_committed_concepts_have_images_at_the_model_size_and_an_initializer_word(toy_pipe):
    with open(os.path.join(CONCEPTS, "concepts.json")) as f:
        metadata = json.load(f)
    assert set(metadata) == set(toy_world.HELD_OUT_CONCEPTS)
    for name, entry in metadata.items():
        images = concept_images(CONCEPTS, name)
        assert 5 <= len(images) <= 10
        assert all(im.size == (toy_world.IMAGE_SIZE, toy_world.IMAGE_SIZE) for im in images)
        pieces = toy_pipe.tokenizer.tokenize(entry["initializer"])  # several pieces start from their mean
        assert toy_pipe.tokenizer.unk_token not in pieces
        assert entry["placeholder_token"] not in toy_pipe.tokenizer.get_vocab()
        concept = toy_world.HELD_OUT_CONCEPTS[name]
        assert entry["words_prompt"] == concept.words_prompt and entry["nameable"] == concept.nameable


def test_concept_folders_of_any_kind_and_colour(tmp_path, monkeypatch, capsys):
    """`python -m toy_infinity.world --concept KIND:COLOUR` writes folders the benchmark and the
    training helper read back through concepts.json; the default writes the held-out concepts."""
    out = tmp_path / "more"
    argv = ["world.py", "--out", str(out), "--images_per_concept", "3", "--concept", "triangle:green"]
    monkeypatch.setattr("sys.argv", [*argv, "--concept", "moon:yellow"])
    toy_world.main()
    concepts = toy_world.read_concepts(str(out))
    assert list(concepts) == ["green-triangle", "yellow-moon"]
    assert (concepts["yellow-moon"].kind, concepts["yellow-moon"].colour) == ("moon", "yellow")
    assert concepts["yellow-moon"].words_prompt == "a photo of a yellow thing"
    assert len(concept_images(str(out), "green-triangle")) == 3
    monkeypatch.setattr("sys.argv", ["world.py", "--out", str(out), "--concept", "star:mauve"])
    with pytest.raises(SystemExit):
        toy_world.main()
    assert "'star:mauve': give KIND:COLOUR" in capsys.readouterr().err
    assert list(toy_world.read_concepts(CONCEPTS)) == list(toy_world.HELD_OUT_CONCEPTS)


def test_a_concept_is_found_by_its_folder_name():
    """The benchmarks read a learned concept's kind and colour from its placeholder, <COLOUR-KIND>."""
    assert toy_world.concept_named("pink-cross") == toy_world.HELD_OUT_CONCEPTS["pink-cross"]
    moon = toy_world.concept_named("yellow-moon")
    assert (moon.kind, moon.colour, moon.words_prompt) == ("moon", "yellow", "a photo of a yellow thing")
    for name in ("yellow-moon-2", "mauve-moon", "moon"):
        with pytest.raises(ValueError, match="names no concept of the toy world"):
            toy_world.concept_named(name)


def test_concept_folders_of_one_size_hold_the_same_objects(tmp_path, monkeypatch):
    """--size draws every image of a set at one size and changes nothing else: each image of the
    set without it is its small or its large version, and the two versions differ."""
    sets = {}
    for size in (None, "small", "large"):
        out = tmp_path / str(size)
        argv = ["world.py", "--out", str(out), "--images_per_concept", "6", "--seed", "21000"]
        monkeypatch.setattr("sys.argv", [*argv, "--concept", "cross:pink"] + (["--size", size] if size else []))
        toy_world.main()
        sets[size] = pixels(concept_images(str(out), "pink-cross"))
    for mixed, small, large in zip(sets[None], sets["small"], sets["large"]):
        assert not np.array_equal(small, large)
        assert np.array_equal(mixed, small) or np.array_equal(mixed, large)
    assert not np.array_equal(sets[None], sets["small"]) and not np.array_equal(sets[None], sets["large"])


def test_the_concept_loss_benchmark_reads_the_concepts_of_its_folder(tmp_path, monkeypatch, capsys):
    """bench_toy_concept_loss.py --concepts_dir takes the concept (and its words) from that folder's
    concepts.json, as bench_toy_fidelity.py does, not from the held-out list."""
    out = tmp_path / "more"
    world_argv = ["world.py", "--out", str(out), "--images_per_concept", "2", "--concept", "triangle:green"]
    monkeypatch.setattr("sys.argv", world_argv)
    toy_world.main()
    capsys.readouterr()
    bench = load_benchmark("bench_toy_concept_loss")
    argv = ["bench", "--concepts_dir", str(out), "--num_fresh", "2", "--threads", "1"]
    monkeypatch.setattr("sys.argv", [*argv, "--concept", "green-triangle"])
    bench.main()
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == [
        "<green-triangle>: loss (as training weights it) and each scale's mean loss (1x1 2x2 4x4 6x6 8x8 12x12 16x16)",
        "a photo of a green triangle",
    ]
    for line, images in zip(lines[2:4], ("training images", "fresh renders")):
        name, numbers = line[:18].strip(), [float(v) for v in line[18:].split()]
        assert name == images and len(numbers) == 8 and all(0 < v < 1 for v in numbers)
    monkeypatch.setattr("sys.argv", [*argv, "--concept", "pink-cross"])
    with pytest.raises(SystemExit, match="--concept pink-cross: not in .*; it has \\['green-triangle'\\]"):
        bench.main()


def load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_the_fidelity_benchmark_renders_fresh_sets_per_render_seed_and_judges_the_bar(tmp_path, monkeypatch):
    """bench_toy_fidelity.py --fresh KIND:COLOUR --render_seeds A B: one image set per render seed, the
    images `python -m toy_infinity.world --seed A` writes; the bar as the owners set it."""
    bench = load_benchmark("bench_toy_fidelity")
    argv = ["bench", "--output_dir", str(tmp_path / "out"), "--fresh", "cross:pink", "--fresh", "heart:yellow"]
    monkeypatch.setattr("sys.argv", [*argv, "--render_seeds", "7000", "9000"])
    folders = bench.image_sets(bench.parse_args())
    assert [os.path.basename(f) for f in folders] == ["render-7000", "render-9000"]
    # concept i is rendered from seed + i, so the same folder with another list would mix image sets
    monkeypatch.setattr("sys.argv", [*argv[:3], "--fresh", "heart:yellow", "--fresh", "cross:pink"])
    with pytest.raises(SystemExit, match="holds pink-cross, yellow-heart, rendered in that order; give --fresh in"):
        bench.image_sets(bench.parse_args())
    monkeypatch.setattr("sys.argv", ["world.py", "--out", str(tmp_path / "cli"), "--seed", "9000"]
                        + ["--concept", "cross:pink", "--concept", "heart:yellow"])  # fmt: skip
    toy_world.main()
    for name in ("pink-cross", "yellow-heart"):
        fresh, cli = concept_images(folders[1], name), concept_images(str(tmp_path / "cli"), name)
        assert len(fresh) == 8 and all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(fresh, cli))
        assert not np.array_equal(np.asarray(fresh[0]), np.asarray(concept_images(folders[0], name)[0]))

    cross, heart = toy_world.concept_spec("cross:pink"), toy_world.concept_spec("heart:yellow")
    kept = [0.95, 1.0, 0.92]
    assert bench.meets_the_bar(cross, 0.87, [0.86, 0.84, 0.86], kept)  # mean 0.853 >= 0.85
    assert not bench.meets_the_bar(cross, 0.87, [0.80, 0.90, 0.83], kept)  # mean 0.843 < 0.87 - 0.02
    assert not bench.meets_the_bar(cross, 0.87, [0.76, 0.95, 0.95], kept)  # worst 0.10 below
    assert bench.meets_the_bar(heart, 0.24, [0.61, 0.60, 0.62], kept)
    assert not bench.meets_the_bar(heart, 0.24, [0.95, 0.55, 0.35], kept)  # mean 0.62, worst 0.35
    assert not bench.meets_the_bar(heart, 0.24, [0.7, 0.7, 0.7], [0.95, 0.89, 1.0])  # the background lost once


def test_the_benchmarks_suite_is_the_committed_sets_and_the_renders_of_the_tables(tmp_path, monkeypatch):
    """--suite: the committed concepts and SUITE's image sets, the fresh ones the very images of
    --fresh ... --render_seeds 7000 9000, on which docs/recipe-choices.md's tables were measured."""
    bench = load_benchmark("bench_toy_fidelity")
    monkeypatch.setattr("sys.argv", ["bench", "--output_dir", str(tmp_path / "suite"), "--suite"])
    folders = bench.image_sets(bench.parse_args())
    assert folders[0] == CONCEPTS and [os.path.basename(f) for f in folders[1:]] == list(bench.SUITE)
    names = [list(toy_world.read_concepts(f)) for f in folders]
    assert sum(map(len, names)) == 26 and names[2] == ["yellow-heart", "green-star", "pink-cross", "purple-triangle"]
    monkeypatch.setattr("sys.argv", ["bench", "--output_dir", str(tmp_path / "fresh"), "--render_seeds", "7000"]
                        + [arg for spec in bench.FRESH_KINDS for arg in ("--fresh", spec)])  # fmt: skip
    (fresh,) = bench.image_sets(bench.parse_args())
    for name in names[2]:
        ours, theirs = concept_images(folders[2], name), concept_images(fresh, name)
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(ours, theirs))


def test_the_fidelity_benchmark_scores_the_same_in_parallel_jobs_and_summarises_the_rows(tmp_path):
    """--jobs 2 runs each concept in a single-threaded process of its own: the same scores as one at
    a time (single-threaded too), merged into one results.json; the bar table ends with the mean,
    the mean worst run and the mean gap between runs."""
    bench = os.path.join(ROOT, "benchmarks", "bench_toy_fidelity.py")
    results, tables = {}, {}
    for jobs in ("1", "2"):
        out = tmp_path / f"jobs-{jobs}"
        command = [sys.executable, bench, "--concept", "pink-cross", "--concept", "blue-heart", "--seeds", "0", "1",
                   "--setting", "quick=--max_train_steps 2", "--num_images", "1",
                   "--output_dir", str(out), "--jobs", jobs]  # fmt: skip
        env = os.environ | {"OMP_NUM_THREADS": "1"}
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        results[jobs] = json.loads((out / "results.json").read_text())
        tables[jobs] = done.stdout[done.stdout.index("The bar") :]
    assert sorted(results["2"]) == ["blue-heart", "pink-cross"]
    for entry in (*results["1"].values(), *results["2"].values()):
        for run in entry["runs"]["quick"].values():
            del run["train_seconds"]
    assert results["1"] == results["2"]
    assert tables["1"] == tables["2"].replace(str(tmp_path / "jobs-2"), str(tmp_path / "jobs-1"))
    runs = [
        [sum(run["plain"]) / len(run["plain"]) for run in e["runs"]["quick"].values()] for e in results["1"].values()
    ]
    summary = next(line for line in tables["1"].splitlines() if line.startswith("| **mean; mean worst run"))
    expected = [
        sum(sum(r) / 2 for r in runs) / 2,
        sum(min(r) for r in runs) / 2,
        sum(max(r) - min(r) for r in runs) / 2,
    ]
    assert summary.split("|")[4].strip() == "; ".join(f"{x:.3f}" for x in expected)


def test_a_failing_job_of_the_benchmark_keeps_the_others_runs(tmp_path):
    """--jobs: an image set whose runs fail (here: no images) is named with its log, and the other
    sets' scores still reach results.json."""
    good, broken = tmp_path / "good", tmp_path / "broken"
    for folder, name in ((good, "pink-cross"), (broken, "blue-heart")):
        folder.mkdir()
        entry = json.loads((Path(CONCEPTS) / "concepts.json").read_text())[name]
        (folder / "concepts.json").write_text(json.dumps({name: entry}))
    os.symlink(os.path.join(CONCEPTS, "pink-cross"), good / "pink-cross")
    (broken / "blue-heart").mkdir()
    out = tmp_path / "out"
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_toy_fidelity.py"), "--jobs", "2",
               "--concepts_dir", str(good), "--concepts_dir", str(broken), "--seeds", "0", "--num_images", "1",
               "--setting", "quick=--max_train_steps 2", "--output_dir", str(out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    assert done.returncode != 0 and "broken/blue-heart failed; its log: " in done.stderr, done.stderr[-3000:]
    assert list(json.loads((out / "results.json").read_text())) == ["good/pink-cross"]


def test_committed_toy_model_loads_and_generates_images_of_the_trained_size(toy_pipe):
    assert toy_pipe.token_stride * toy_pipe.schedule(1.0, "0.06M").grids[-1][0] == toy_world.IMAGE_SIZE
    images = toy_pipe("a photo of a red circle in the snow", num_images_per_prompt=2, pn="0.06M", seed=0).images
    assert [im.size for im in images] == [(toy_world.IMAGE_SIZE, toy_world.IMAGE_SIZE)] * 2
    weights = sum(os.path.getsize(p) for p in glob.glob(os.path.join(TOY_MODEL, "**", "*"), recursive=True))
    assert weights < 10 * 2**20


def test_fidelity_ranks_a_concepts_own_images_above_other_objects():
    scorer = FidelityScorer()
    for i, concept in enumerate(toy_world.HELD_OUT_CONCEPTS.values()):
        own = scorer.score(concept_images(CONCEPTS, concept.name), concept)
        others = scorer.score(other_objects(concept, 40, seed=100 + i), concept)
        assert own.min() > others.max()
        assert own.mean() > 0.9 and others.mean() < 0.05
        # the right kind in a named colour, or the right colour on another kind, is not the concept
        other_colour = next(c for c in toy_world.COLOURS if c != concept.colour)
        other_kind = next(k for k in toy_world.KINDS if k != concept.kind)
        for kind, colour in ((concept.kind, other_colour), (other_kind, concept.colour)):
            lookalike = toy_world.HeldOutConcept("lookalike", kind, colour)
            assert scorer.score(toy_world.render_concept_images(lookalike, 8, seed=i), concept).max() < 0.5


def test_the_learned_token_beats_the_best_words(tmp_path):
    """The main job for real, with the training script's default recipe and the demo's concept: the
    script learns <blue-heart> from its 8 images on the toy Infinity, starting from the best words
    ("blue thing"); "a photo of a <blue-heart>" then shows a blue heart far more often than those
    words, "a photo of a blue thing" (same sampling seeds)."""
    name = "blue-heart"
    concept = toy_world.HELD_OUT_CONCEPTS[name]
    embedding = train_concept(TOY_MODEL, CONCEPTS, name, str(tmp_path / name))
    assert os.path.isfile(os.path.join(embedding, "learned_embeds.safetensors"))
    words, after = before_and_after(TOY_MODEL, embedding, name, num_images=NUM_IMAGES, seed=0)
    assert PROMPT_TEMPLATE.format(concept.initializer) == concept.words_prompt  # the start is the words
    scorer = FidelityScorer()
    words, after = (scorer.score(images, name) for images in (words, after))
    # Measured on these 32 sampling seeds (benchmarks/bench_toy_fidelity.py): words 0.094, learned
    # token 0.763 at training seed 0; over 3 training seeds the worst is 0.747. The margin sits well
    # below the measured gain, yet fails when learning fails: the token starts as the words.
    assert after.mean() - words.mean() > 3 * MARGIN, (words.tolist(), after.tolist())


@pytest.fixture
def pretrain(monkeypatch):
    """examples/pretrain_toy_infinity.py as a module, on an eighth of the world (one view per object)."""
    monkeypatch.setattr(toy_world, "VIEWS_PER_OBJECT", 1)
    spec = importlib.util.spec_from_file_location("pretrain", os.path.join(EXAMPLES, "pretrain_toy_infinity.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


QUICK_PRETRAINING = ["--vae_steps", "4", "--steps", "4", "--checkpointing_steps", "2", "--corpus_size", "300",
                     "--tokens_per_step", "600", "--threads", "1", "--no_preview"]  # fmt: skip


def test_pretraining_sizes_flags_shape_the_saved_model(tmp_path, pretrain):
    """--width, --depth and --vae_bits (the sharpness measurements of the README) reach the files."""
    out = tmp_path / "model"
    sizes = ["--width", "64", "--depth", "3", "--vae_bits", "12"]
    pretrain.main([*QUICK_PRETRAINING, *sizes, "--out", str(out), "--checkpoint_dir", str(tmp_path / "ckpt")])
    pipe = InfinityPipeline.from_pretrained(str(out))
    config = pipe.transformer.config
    assert (config.embed_dim, config.depth, config.codebook_dim) == (64, 3, 12)
    assert pipe.vae.config.codebook_dim == 12
    (image,) = generate(pipe, "a photo of a red circle", 1, seed=0)
    assert image.size == (toy_world.IMAGE_SIZE, toy_world.IMAGE_SIZE)
    with pytest.raises(SystemExit):  # before anything is rendered
        pretrain.parse_args(["--width", "100"])


def test_pretraining_resumed_after_interruptions_ends_with_the_uninterrupted_weights(tmp_path, monkeypatch, pretrain):
    """A few steps of each stage; stopped once in the VAE stage and once in the transformer stage."""
    pretrain.main(
        [*QUICK_PRETRAINING, "--out", str(tmp_path / "full"), "--checkpoint_dir", str(tmp_path / "ckpt-full")]
    )

    save = pretrain.Checkpoint.maybe_save

    def stop_after(stage_to_stop):
        def maybe_save(self, stage, step, *args):
            save(self, stage, step, *args)
            if stage == stage_to_stop and step + 1 == 2:
                raise KeyboardInterrupt

        return maybe_save

    argv = [*QUICK_PRETRAINING, "--out", str(tmp_path / "resumed"), "--checkpoint_dir", str(tmp_path / "ckpt")]
    for stage in ("vae", "transformer"):
        monkeypatch.setattr(pretrain.Checkpoint, "maybe_save", stop_after(stage))
        with pytest.raises(KeyboardInterrupt):
            pretrain.main(argv + (["--resume"] if stage == "transformer" else []))
    monkeypatch.setattr(pretrain.Checkpoint, "maybe_save", save)
    with pytest.raises(SystemExit, match="holds a run stopped at transformer step 2; pass --resume"):
        pretrain.main(argv)  # nothing is lost by forgetting --resume
    with pytest.raises(SystemExit, match=r"other settings than the stopped run \(steps\)"):
        pretrain.main([*argv, "--resume", "--steps", "5"])
    pretrain.main([*argv, "--resume"])
    assert not os.listdir(tmp_path / "ckpt")  # a finished run leaves no state behind
    for name in ("transformer.safetensors", "vae.safetensors", "text_encoder/model.safetensors"):
        full, resumed = load_file(tmp_path / "full" / name), load_file(tmp_path / "resumed" / name)
        assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full), name


def test_the_recogniser_names_kind_colour_and_background_of_fresh_renders():
    """Held-out renders (seeds neither pretraining, the concepts nor the recogniser's training use)."""
    from toy_infinity.recogniser import labels_of

    rng = np.random.default_rng(424_242)
    objects = [toy_world.sample_object(rng) for _ in range(200)]
    probabilities = FidelityScorer().probabilities([toy_world.render(o) for o in objects])
    for attribute, labels in labels_of(objects).items():
        accuracy = (probabilities[attribute].argmax(-1) == labels).float().mean().item()
        assert accuracy >= 0.98, (attribute, accuracy)
