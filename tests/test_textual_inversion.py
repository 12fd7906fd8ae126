"""Placeholder tokens in flan-T5: tokenization, spare rows, initialisation, swapping vectors in."""

import pytest
import torch
from safetensors import safe_open

from infinity_t2i.pipeline import load_text_encoder
from infinity_t2i.text import SPACE_PIECE, encode_prompt, tokenize
from infinity_t2i.textual_inversion import (
    OBJECT_TEMPLATES,
    STYLE_TEMPLATES,
    ConceptError,
    LearnedConcept,
    LearnedVectors,
    add_placeholder_tokens,
    ensure_embedding_rows,
    expand_placeholders,
    initializer_pieces,
    initializer_vectors,
    placeholder_tokens,
    save_learned_embeds,
    write_rows,
)


@pytest.fixture
def t5(tiny_pipeline_dir):
    return load_text_encoder(f"{tiny_pipeline_dir}/text_encoder", torch.float32, "cpu")


def test_placeholder_tokens_and_expansion():
    assert placeholder_tokens("<cat>", 1) == ["<cat>"]
    tokens = placeholder_tokens("<cat>", 3)
    assert tokens == ["<cat>", "<cat>_1", "<cat>_2"]
    assert (
        expand_placeholders("a <cat> and a <cat>, sleeping", {"<cat>": tokens})
        == "a <cat> <cat>_1 <cat>_2 and a <cat> <cat>_1 <cat>_2, sleeping"
    )
    # prompts name the placeholder only; its numbered tokens are never expanded again
    assert expand_placeholders("a <cat>_1", {"<cat>": tokens}) == "a <cat>_1"
    assert expand_placeholders("a <cat>", {"<cat>": ["<cat>"]}) == "a <cat>"


def test_known_words_are_refused(t5):
    tokenizer, _ = t5
    with pytest.raises(ConceptError, match="already in the tokenizer's vocabulary"):
        add_placeholder_tokens(tokenizer, ["dog"])
    with pytest.raises(ConceptError, match="one word without spaces"):
        add_placeholder_tokens(tokenizer, ["my dog"])
    add_placeholder_tokens(tokenizer, ["<mine>"])
    with pytest.raises(ConceptError, match="already in the tokenizer's vocabulary"):
        add_placeholder_tokens(tokenizer, ["<mine>"])


def test_new_tokens_take_spare_rows_and_the_matrix_never_shrinks(t5):
    tokenizer, text_encoder = t5
    rows = text_encoder.get_input_embeddings().num_embeddings
    vocab = len(tokenizer)
    assert rows == vocab + 28  # like flan-t5-xl: 32128 rows, 32100 tokens
    ids = add_placeholder_tokens(tokenizer, placeholder_tokens("<cat>", 4))
    assert ids == list(range(vocab, vocab + 4))
    ensure_embedding_rows(text_encoder, len(tokenizer))
    assert text_encoder.get_input_embeddings().num_embeddings == rows  # spare rows reused, not cut
    ensure_embedding_rows(text_encoder, rows + 5)
    assert text_encoder.get_input_embeddings().num_embeddings == rows + 5


def test_initializer_rule(t5):
    tokenizer, text_encoder = t5
    weight = text_encoder.get_input_embeddings().weight
    one = tokenizer.convert_tokens_to_ids(SPACE_PIECE + "dog")
    assert initializer_pieces(tokenizer, "dog") == [one]
    assert torch.equal(initializer_vectors(weight[[one]], 3), weight[one].expand(3, -1))
    pieces = initializer_pieces(tokenizer, "garden")
    assert len(pieces) > 1
    # one vector per piece, whatever is asked below that; more vectors cycle through the pieces
    assert torch.equal(initializer_vectors(weight[pieces], 1), weight[pieces])
    assert torch.equal(initializer_vectors(weight[pieces], len(pieces) + 1), weight[pieces + pieces[:1]])
    with pytest.raises(ConceptError, match="unknown to the tokenizer"):
        initializer_pieces(tokenizer, "日本")


@pytest.mark.parametrize("initializer", ["garden", "red garden"])
def test_a_multi_piece_initializer_starts_at_what_the_word_draws(t5, initializer):
    """The concept's tokens with the word's (or phrase's) piece vectors encode exactly as the words themselves."""
    tokenizer, text_encoder = t5
    embedding = text_encoder.get_input_embeddings()
    pieces = initializer_pieces(tokenizer, initializer)
    assert len(pieces) == len(tokenizer(initializer, add_special_tokens=False).input_ids) > 1
    start = initializer_vectors(embedding.weight[pieces], 1)
    tokens = placeholder_tokens("<plot>", start.shape[0])
    learned = LearnedVectors(add_placeholder_tokens(tokenizer, tokens), start)
    templates = ("a photo of a {}", "{}, at dawn")
    prompts = [expand_placeholders(t.format("<plot>"), {"<plot>": tokens}) for t in templates]
    with torch.no_grad():
        concept = encode_prompt(tokenizer, text_encoder, prompts, embed_tokens=lambda i: learned(i, embedding(i)))
        word = encode_prompt(tokenizer, text_encoder, [t.format(initializer) for t in templates])
    assert torch.equal(concept.mask, word.mask)
    assert torch.equal(concept.features, word.features)


def test_held_norm_vectors_keep_their_norms_and_turn_by_about_the_learning_rate():
    start = torch.randn(2, 64) * torch.tensor([[3.0], [0.5]])
    learned = LearnedVectors([5, 6], start, hold_norm=True)
    assert torch.allclose(learned.vectors, start, atol=1e-5)
    optimizer = torch.optim.AdamW(learned.parameters(), lr=0.02, weight_decay=0)
    target = torch.randn(2, 64)
    for _ in range(10):
        (learned.vectors * target).sum().neg().backward()
        optimizer.step()
        learned.project_()
        optimizer.zero_grad()
    vectors = learned.vectors.detach()
    assert torch.allclose(vectors.norm(dim=-1), start.norm(dim=-1), rtol=1e-5)  # norms held
    angle = torch.arccos(torch.nn.functional.cosine_similarity(vectors, start, dim=-1))
    assert ((angle > 0.05) & (angle < 0.3)).all(), angle  # ~0.02 rad per step for both scales
    assert torch.allclose(angle[0], angle[1], rtol=0.3)  # the step does not depend on the norm


@pytest.mark.parametrize("hold_norm", [False, True])
def test_the_saved_vectors_are_the_bias_corrected_moving_average_of_the_steps(hold_norm):
    torch.manual_seed(0)
    start = torch.randn(2, 16) * torch.tensor([[3.0], [0.5]])
    decay = 0.8
    learned = LearnedVectors([5, 6], start, hold_norm=hold_norm, ema_decay=decay)
    assert torch.allclose(learned.saved_vectors, learned.vectors, atol=1e-6)  # before any step: the start
    steps = []
    for step in range(1, 5):
        with torch.no_grad():
            learned.weight.add_(torch.randn_like(learned.weight))
        learned.project_()
        learned.update_ema_(step)
        steps.append(learned.vectors.detach().clone())
    weights = torch.tensor([decay ** (len(steps) - i) for i in range(1, len(steps) + 1)])
    average = (weights[:, None, None] * torch.stack(steps)).sum(0) / weights.sum()  # the start counts nothing
    if hold_norm:  # the average's direction at each vector's own norm
        average = torch.nn.functional.normalize(average, dim=-1) * start.norm(dim=-1, keepdim=True)
    assert torch.allclose(learned.saved_vectors, average, atol=1e-5)
    assert not torch.allclose(learned.saved_vectors, learned.vectors, atol=1e-3)
    assert "ema_weight" in learned.state_dict()  # checkpoints carry it
    plain = LearnedVectors([5, 6], start, hold_norm=hold_norm)
    assert "ema_weight" not in plain.state_dict() and plain.saved_vectors is not None
    plain.update_ema_(1)  # a no-op without a decay
    assert torch.equal(plain.saved_vectors, plain.vectors)


@pytest.mark.parametrize(
    "template", OBJECT_TEMPLATES + STYLE_TEMPLATES + ["{}, on a table.", "a {}: close up", "({}) in snow"]
)
def test_templated_prompts_tokenize_without_stray_boundary_pieces(t5, template):
    tokenizer, _ = t5
    tokens = placeholder_tokens("<cat>", 2)
    ids = add_placeholder_tokens(tokenizer, tokens)
    prompt = expand_placeholders(template.format("<cat>"), {"<cat>": tokens})
    got = tokenize(tokenizer, [prompt])[0][0].tolist()
    k = got.index(ids[0])
    assert got[k : k + 2] == ids  # both tokens, adjacent, once
    space = tokenizer.convert_tokens_to_ids(SPACE_PIECE)
    assert space not in (got[k - 1] if k else None, got[k + 2])
    # the text around the tokens tokenizes as it does around a word: before as a prefix on its
    # own, after as attached to the word (", on a table." -> ",", "\u2581on", ...)
    before, after = template.split("{}")
    assert got[:k] == tokenizer(before.rstrip(), add_special_tokens=False).input_ids
    word = tokenizer("dog" + after).input_ids
    assert word[0] == tokenizer.convert_tokens_to_ids(SPACE_PIECE + "dog") and got[k + 2 :] == word[1:]


def test_prompts_without_learned_tokens_tokenize_as_the_plain_tokenizer(t5):
    tokenizer, _ = t5
    prompts = ["a photo of a dog, sleeping.", "x"]
    plain = tokenizer(prompts, padding="longest", return_tensors="pt").input_ids
    add_placeholder_tokens(tokenizer, ["<cat>"])
    assert torch.equal(tokenize(tokenizer, prompts)[0], plain)


def test_swapped_in_vectors_equal_written_rows_and_padding_changes_nothing(t5):
    tokenizer, text_encoder = t5
    ids = add_placeholder_tokens(tokenizer, placeholder_tokens("<cat>", 2))
    ensure_embedding_rows(text_encoder, len(tokenizer))
    vectors = torch.randn(2, text_encoder.config.d_model)
    learned = LearnedVectors(ids, vectors)
    embedding = text_encoder.get_input_embeddings()
    prompts = ["a photo of a <cat> <cat>_1 on the beach", "a dog"]
    with torch.no_grad():
        swapped = encode_prompt(tokenizer, text_encoder, prompts, embed_tokens=lambda i: learned(i, embedding(i)))
        write_rows(text_encoder, ids, vectors)
        written = encode_prompt(tokenizer, text_encoder, prompts)
        input_ids, mask = tokenize(tokenizer, prompts)
        padded = torch.nn.functional.pad(input_ids, (0, 512 - input_ids.shape[1]), value=tokenizer.pad_token_id)
        full = text_encoder(
            input_ids=padded, attention_mask=torch.nn.functional.pad(mask, (0, 512 - mask.shape[1]))
        ).last_hidden_state
    assert torch.allclose(swapped.features, written.features, atol=1e-6)
    real = written.mask
    assert torch.allclose(written.features[real], full[:, : real.shape[1]][real], atol=1e-5)  # 512 padding: same rows


def test_only_the_learned_vectors_receive_gradients(t5):
    tokenizer, text_encoder = t5
    ids = add_placeholder_tokens(tokenizer, ["<cat>"])
    embedding = text_encoder.get_input_embeddings()
    learned = LearnedVectors(ids, torch.zeros(1, text_encoder.config.d_model))
    text = encode_prompt(tokenizer, text_encoder, ["a <cat>", "a dog"], embed_tokens=lambda i: learned(i, embedding(i)))
    text.features[text.mask].sum().backward()
    assert learned.weight.grad is not None and learned.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in text_encoder.parameters())


def test_a_saved_concept_is_the_same_bytes_every_time(tmp_path):
    # safetensors writes its metadata in hash order, which changes between writes: a concept saved
    # twice (or by a rerun with the same seed) differed byte for byte before the header was sorted
    metadata = {f"key_{i}": f"value {i}" for i in range(12)} | {"initializer_token": "chien ✓"}
    concept = LearnedConcept(
        "<c>", ["<c>", "<c>_1"], torch.randn(2, 8), metadata, mode="output", t5_input=torch.randn(2, 8)
    )
    paths = [tmp_path / f"{i}.safetensors" for i in range(4)]
    for path in paths:
        save_learned_embeds(str(path), concept)
    assert len({path.read_bytes() for path in paths}) == 1
    with safe_open(str(paths[0]), "pt") as f:
        assert torch.equal(f.get_tensor("<c>"), concept.vectors)
        assert f.metadata()["initializer_token"] == "chien ✓"
    header_size = int.from_bytes(paths[0].read_bytes()[:8], "little")
    assert header_size % 8 == 0
