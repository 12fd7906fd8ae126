"""The two places a concept can live (input embeddings or T5's output features), end to end:
what training changes, what a saved file gives at inference, and both modes in one prompt."""

import numpy as np
import pytest
import torch
from PIL import Image

import train_textual_inversion_infinity as train
from infinity_t2i.loading import CheckpointError
from infinity_t2i.pipeline import InfinityPipeline
from infinity_t2i.resolution import get_schedule
from infinity_t2i.text import encode_prompt, tokenize
from infinity_t2i.textual_inversion import (
    LEARNED_EMBEDS_NAME,
    OBJECT_TEMPLATES,
    LearnedConcept,
    add_placeholder_tokens,
    apply_concepts,
    ensure_embedding_rows,
    initializer_pieces,
    load_learned_embeds,
    save_learned_embeds,
    scaled_vectors,
    write_rows,
)

PLACEHOLDER = "<blob>"


def state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("mode,batch_size,layout", [("output", 2, "shared"), ("input", 1, "shared"),
                                                    ("output", 2, "per_scale")])  # fmt: skip
def test_training_changes_only_the_learned_rows_and_a_saved_file_gives_its_exact_conditioning(
    mode, batch_size, layout, tiny_pipeline_dir, concept_dir, tmp_path, monkeypatch
):
    loaded, conditions = [], []  # the run's pipeline; the text condition of every training forward
    from_pretrained = InfinityPipeline.from_pretrained.__func__

    def load_and_watch(cls, *a, **k):
        pipe = from_pretrained(cls, *a, **k)
        # the training forwards only: the prior's forward runs without gradients
        pipe.transformer.register_forward_pre_hook(
            lambda module, inputs: conditions.append(inputs[0]) if torch.is_grad_enabled() else None
        )
        loaded.append(pipe)
        return pipe

    monkeypatch.setattr(InfinityPipeline, "from_pretrained", classmethod(load_and_watch))
    out = tmp_path / "out"
    train.main(train.parse_args([
        "--pretrained_model_name_or_path", str(tiny_pipeline_dir), "--train_data_dir", str(concept_dir),
        "--placeholder_token", PLACEHOLDER, "--initializer_token", "garden", "--output_dir", str(out),
        "--pn", "0.06M", "--repeats", "2", "--seed", "0", "--ti_mode", mode, "--train_batch_size", str(batch_size),
        "--max_train_steps", "3", "--save_steps", "1", "--learning_rate", "0.2", "--vector_layout", layout,
        "--ema_decay", "0",  # each file then holds the very vectors the next forward reads
    ]))  # fmt: skip
    monkeypatch.undo()
    pipe, fresh = loaded[0], InfinityPipeline.from_pretrained(str(tiny_pipeline_dir))
    assert len(conditions) == 3

    # Every weight is the one on disk, except the T5 input rows of the concept's tokens.
    for name in ("transformer", "vae", "text_encoder"):
        mine, theirs = state(getattr(pipe, name)), state(getattr(fresh, name))
        assert mine.keys() == theirs.keys()
        for key in mine:
            if key.endswith("embed_tokens.weight") or key == "shared.weight":
                continue
            assert torch.equal(mine[key], theirs[key]), f"{name}.{key} changed"
    concept = load_learned_embeds(str(out))[0]
    pieces = initializer_pieces(fresh.tokenizer, "garden")
    assert len(pieces) > 1 and concept.mode == mode  # at least one vector per piece, and the mode's default
    assert len(concept.tokens) == max(len(pieces), train.DEFAULT_NUM_VECTORS[mode if layout == "shared" else layout])
    assert concept.num_scales == (5 if layout == "per_scale" else 1)  # the trained scales of 0.06M
    ids = pipe.tokenizer.convert_tokens_to_ids(concept.tokens)
    rows, fresh_rows = pipe.text_encoder.get_input_embeddings().weight, fresh.text_encoder.get_input_embeddings().weight
    others = torch.ones(rows.shape[0], dtype=torch.bool)
    others[ids] = False
    assert torch.equal(rows[others], fresh_rows[others])
    if mode == "output":  # T5 reads the initializer's pieces at the concept's tokens, never trained
        assert torch.equal(rows[ids], concept.t5_input)
        cycled = [pieces[i % len(pieces)] for i in range(len(concept.tokens))]  # vector i starts at piece i mod k
        assert torch.equal(concept.t5_input, fresh_rows[cycled])

    # Forward k ran on the vectors saved after k updates; a fresh pipeline that loads that file
    # encodes each training caption (any template) to exactly the rows training used.
    for k in (1, 2):
        pipe_k = InfinityPipeline.from_pretrained(str(tiny_pipeline_dir))
        concepts = load_learned_embeds(str(out / f"learned_embeds-steps-{k}.safetensors"))
        pipe_k.load_textual_inversion(concepts)
        with torch.no_grad():
            encoded = [pipe_k.encode_prompt([t.format(PLACEHOLDER)]) for t in OBJECT_TEMPLATES]
        # per scale: the file gives each scale's condition as training had it
        for scale, used in enumerate(conditions[k] if layout == "per_scale" else [conditions[k]]):
            at_scale = [e[scale] if layout == "per_scale" else e for e in encoded]
            for b in range(used.batch_size):
                row = used.features[b, used.mask[b]].detach()
                assert any(e.features.shape[1] == row.shape[0] and torch.equal(e.features[0], row) for e in at_scale), (
                    f"step {k} caption {b} scale {scale}"
                )
        if layout == "per_scale":  # the sets moved apart: every scale has its own
            assert not torch.equal(concepts[0].vectors[0], concepts[0].vectors[-1])


@pytest.mark.parametrize("mode,layout", [("output", "shared"), ("input", "shared"), ("output", "per_scale")])
def test_the_prior_is_the_model_reading_the_concept_at_its_start(
    mode, layout, tiny_pipeline_dir, concept_dir, tmp_path, monkeypatch
):
    # The prior is a forward of its own over the coarse scales with the concept's starting vectors:
    # at the first step, when the vectors are still there, it is the training forward's first logits.
    seen, real_loss = [], train.bitwise_loss

    def spy(logits, labels, schedule, reweight, prior, prior_weight):
        seen.append((logits.detach(), prior))
        return real_loss(logits, labels, schedule, reweight, prior, prior_weight)

    monkeypatch.setattr(train, "bitwise_loss", spy)
    train.main(train.parse_args([
        "--pretrained_model_name_or_path", str(tiny_pipeline_dir), "--train_data_dir", str(concept_dir),
        "--placeholder_token", PLACEHOLDER, "--initializer_token", "garden", "--output_dir", str(tmp_path / "out"),
        "--pn", "0.06M", "--seed", "0", "--ti_mode", mode, "--vector_layout", layout, "--train_batch_size", "2",
        "--max_train_steps", "2", "--learning_rate", "0.2", "--prior_scales", "2", "--prior_weight", "0.5",
    ]))  # fmt: skip
    (first, first_prior), (second, second_prior) = seen
    assert first_prior.shape[1] == 5 and not first_prior.requires_grad  # the 1x1 and 2x2 scales, frozen
    torch.testing.assert_close(first_prior, first[:, :5], rtol=0, atol=1e-5)
    assert (second_prior - second[:, :5]).abs().max() > 1e-3  # the token moved, its prior did not


def test_input_and_output_concepts_in_one_prompt_with_weights(tiny_pipeline_dir, tmp_path):
    pipe = InfinityPipeline.from_pretrained(str(tiny_pipeline_dir))
    width = pipe.text_encoder.config.d_model
    g = torch.Generator().manual_seed(0)
    as_input = LearnedConcept("<in>", ["<in>"], torch.randn(1, width, generator=g), {"initializer_token": "dog"})
    as_output = LearnedConcept("<out>", ["<out>", "<out>_1"], torch.randn(2, width, generator=g),
                               {"initializer_token": "cat"}, mode="output",
                               t5_input=torch.randn(2, width, generator=g))  # fmt: skip
    files = []
    for c in (as_input, as_output):
        files.append(str(tmp_path / f"{c.placeholder.strip('<>')}.safetensors"))
        save_learned_embeds(files[-1], c)
    concepts = [c for f in files for c in load_learned_embeds(f)]
    assert [c.mode for c in concepts] == ["input", "output"]
    ids = apply_concepts(pipe.tokenizer, pipe.text_encoder, concepts)
    prompt = "a <in> next to a <out> <out>_1 in the snow"

    # expected by hand: T5 reads <in>'s vectors and <out>'s fixed rows; <out>'s features are its vectors
    reference = InfinityPipeline.from_pretrained(str(tiny_pipeline_dir))
    ref_ids = add_placeholder_tokens(reference.tokenizer, ["<in>", "<out>", "<out>_1"])
    ensure_embedding_rows(reference.text_encoder, len(reference.tokenizer))
    write_rows(reference.text_encoder, ref_ids, torch.cat([as_input.vectors, as_output.t5_input]))
    with torch.no_grad():
        t5_own = encode_prompt(reference.tokenizer, reference.text_encoder, [prompt]).features[0]
        got = pipe.encode_prompt([prompt]).features[0]
    input_ids = tokenize(pipe.tokenizer, [prompt])[0][0]
    at_out = torch.stack([(input_ids == i).nonzero()[0, 0] for i in ids["<out>"]])
    expected = t5_own.clone()
    expected[at_out] = as_output.vectors
    assert torch.equal(got, expected)

    # <out>:w mixes the concept with T5's own feature there (the initializer's, in context);
    # <in>:w scales the input vectors
    weights = {"<out>": 0.25, "<in>": 0.5}
    with scaled_vectors(pipe.text_encoder, {c.placeholder: c for c in concepts}, ids, weights), torch.no_grad():
        weighted = pipe.encode_prompt([prompt]).features[0]
    write_rows(reference.text_encoder, ref_ids[:1], 0.5 * as_input.vectors)
    with torch.no_grad():
        t5_half = encode_prompt(reference.tokenizer, reference.text_encoder, [prompt]).features[0]
    assert torch.allclose(weighted[at_out], 0.25 * as_output.vectors + 0.75 * t5_half[at_out], atol=1e-6)
    others = torch.ones(len(input_ids), dtype=torch.bool)
    others[at_out] = False
    assert torch.equal(weighted[others], t5_half[others])
    with torch.no_grad():  # and back to the concept as loaded after the block
        assert torch.equal(pipe.encode_prompt([prompt]).features[0], got)


def test_an_output_mode_file_needs_its_t5_input_rows(tmp_path):
    from safetensors.torch import save_file

    path = str(tmp_path / LEARNED_EMBEDS_NAME)
    save_file({"<x>": torch.zeros(1, 8)}, path, metadata={"ti_mode": "output", "tokens": '["<x>"]'})
    with pytest.raises(CheckpointError, match=r"needs <x>\.t5_input"):
        load_learned_embeds(path)
    save_file({"<x>": torch.zeros(1, 8)}, path, metadata={"ti_mode": "sideways"})
    with pytest.raises(CheckpointError, match="unknown ti_mode"):
        load_learned_embeds(path)


def test_a_file_without_its_metadata_keeps_its_mode_and_a_changed_one_is_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(0)
    concept = LearnedConcept("<x>", ["<x>", "<x>_1"], torch.randn(2, 8, generator=g), {}, mode="output",
                             t5_input=torch.randn(2, 8, generator=g))  # fmt: skip
    path = str(tmp_path / LEARNED_EMBEDS_NAME)
    save_learned_embeds(path, concept)
    tensors = load_file(path)
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    # a copy without metadata (re-saved, or a .bin): before, it loaded as input mode and drew otherwise
    save_file(tensors, str(tmp_path / "bare.safetensors"))
    (bare,) = load_learned_embeds(str(tmp_path / "bare.safetensors"))
    assert bare.mode == "output" and torch.equal(bare.t5_input, concept.t5_input)

    def changed(**entries) -> str:
        changed_path = str(tmp_path / "changed.safetensors")
        save_file({**tensors, **entries}, changed_path, metadata=metadata)
        return changed_path

    nan_rows = concept.t5_input.clone()
    nan_rows[0, 0] = float("nan")  # before: loaded, and the sampler failed on NaN probabilities
    with pytest.raises(CheckpointError, match=r"<x>\.t5_input holds non-finite values"):
        load_learned_embeds(changed(**{"<x>.t5_input": nan_rows}))
    with pytest.raises(CheckpointError, match=r"where its metadata names '<x>' alone"):  # before: a second concept
        load_learned_embeds(changed(**{"<y>": torch.randn(1, 8), "<y>.t5_input": torch.randn(1, 8)}))
    with pytest.raises(CheckpointError, match=r"<z>\.t5_input belongs to no output-mode embedding"):  # before: dropped
        load_learned_embeds(changed(**{"<z>.t5_input": torch.randn(1, 8)}))
    with pytest.raises(CheckpointError, match=r"<x>\.t5_input is not a floating-point tensor"):
        load_learned_embeds(changed(**{"<x>.t5_input": torch.ones(2, 8, dtype=torch.int64)}))
    # a placeholder that reads as JSON ("[1]") names the file's one concept as well
    odd = LearnedConcept("[1]", ["[1]"], torch.randn(1, 8, generator=g), {}, mode="output", t5_input=torch.randn(1, 8))
    save_learned_embeds(str(tmp_path / "odd.safetensors"), odd)
    assert [c.placeholder for c in load_learned_embeds(str(tmp_path / "odd.safetensors"))] == ["[1]"]


def test_per_scale_vectors_start_where_the_shared_set_starts(tiny_pipeline_dir, concept_dir, tmp_path):
    # at step 0 every scale's set is the shared set: the validation images are the same, bit for bit
    grids = {}
    for layout in ("shared", "per_scale"):
        out = tmp_path / layout
        train.main(train.parse_args([
            "--pretrained_model_name_or_path", str(tiny_pipeline_dir), "--train_data_dir", str(concept_dir),
            "--placeholder_token", PLACEHOLDER, "--initializer_token", "dog", "--output_dir", str(out),
            "--pn", "0.06M", "--seed", "0", "--max_train_steps", "1", "--num_vectors", "2", "--vector_layout", layout,
            "--validation_prompt", f"a photo of a {PLACEHOLDER}", "--num_validation_images", "2",
        ]))  # fmt: skip
        grids[layout] = np.asarray(Image.open(out / "validation" / "step-000000.png"))
    assert np.array_equal(grids["shared"], grids["per_scale"])


def test_a_per_scale_concept_beside_a_shared_one_and_prompts_without_them(tiny_pipeline_dir):
    base = InfinityPipeline.from_pretrained(str(tiny_pipeline_dir))
    pipe = InfinityPipeline.from_pretrained(str(tiny_pipeline_dir))
    width = pipe.text_encoder.config.d_model
    g = torch.Generator().manual_seed(0)
    per_scale = LearnedConcept("<ps>", ["<ps>"], torch.randn(3, 1, width, generator=g), {"layout": "per_scale"},
                               mode="output", t5_input=torch.randn(1, width, generator=g))  # fmt: skip
    shared = LearnedConcept("<sh>", ["<sh>"], torch.randn(1, width, generator=g), mode="output",
                            t5_input=torch.randn(1, width, generator=g))  # fmt: skip
    pipe.load_textual_inversion([per_scale, shared])
    schedule = get_schedule(1.0, "0.06M").prefix(4)
    with torch.no_grad():
        texts = pipe.encode_prompt(["a <ps>:0.5 and a <sh> on grass"])
        plain = pipe.encode_prompt(["a dog on grass"])
        assert len(texts) == 3 and len(plain) == 3  # a condition per set of <ps>; the sampler reuses the last
        assert all(torch.equal(p.features, base.encode_prompt(["a dog on grass"]).features) for p in plain)
        assert torch.equal(texts[0].features[:, 3:], texts[2].features[:, 3:])  # <sh> and the words: every scale
        assert not torch.equal(texts[0].features[0, 1], texts[2].features[0, 1])  # <ps>: its scale's set
        # at weight 0.5, <ps> is half its scale's vector, half T5's own feature there
        assert torch.allclose(texts[1].features[0, 1] * 2 - per_scale.vectors[1, 0], texts[2].features[0, 1] * 2
                              - per_scale.vectors[2, 0], atol=1e-5)  # fmt: skip
        images = pipe("a dog on grass", seed=0, schedule=schedule).images
        expected = base("a dog on grass", seed=0, schedule=schedule).images
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, expected))
