"""flan-T5 in the precision the official code runs it: float16 weights, FFN outputs in float32."""

import torch

import train_textual_inversion_infinity as train
from infinity_t2i.pipeline import InfinityPipeline, default_text_encoder_dtype, load_text_encoder
from infinity_t2i.text import encode_prompt


def test_float16_t5_keeps_its_ffn_outputs_in_float32_and_matches_float32_features(tiny_pipeline_dir):
    tokenizer, t5_half = load_text_encoder(f"{tiny_pipeline_dir}/text_encoder", torch.float16, "cpu")
    _, t5_full = load_text_encoder(f"{tiny_pipeline_dir}/text_encoder", torch.float32, "cpu")
    dtypes = {name: p.dtype for name, p in t5_half.named_parameters()}
    assert all(d == torch.float32 for n, d in dtypes.items() if n.endswith(".wo.weight")) and any(
        n.endswith(".wo.weight") for n in dtypes
    )
    assert all(d == torch.float16 for n, d in dtypes.items() if not n.endswith(".wo.weight"))
    prompts = ["a photo of a dog on the beach", "a cat"]
    with torch.no_grad():
        half, full = encode_prompt(tokenizer, t5_half, prompts), encode_prompt(tokenizer, t5_full, prompts)
    assert half.features.dtype == torch.float32 and torch.isfinite(half.features).all()
    scale = full.features[full.mask].pow(2).mean().sqrt()
    assert (half.features - full.features)[full.mask].abs().max() < 0.02 * scale


def test_default_text_encoder_precision_is_float16_on_a_gpu_and_float32_on_the_cpu(tiny_pipeline_dir):
    assert default_text_encoder_dtype("cuda:0") == torch.float16
    assert default_text_encoder_dtype("cpu") == torch.float32
    pipe = InfinityPipeline.from_pretrained(str(tiny_pipeline_dir), torch_dtype=torch.bfloat16)
    assert pipe.text_encoder.dtype == torch.float32  # T5 no longer follows the blocks' dtype
    assert pipe.transformer.blocks[0].ffn.fc1.weight.dtype == torch.bfloat16


def test_training_through_a_float16_t5(tiny_pipeline_dir, concept_dir, tmp_path):
    out = tmp_path / "out"
    train.main(train.parse_args([
        "--pretrained_model_name_or_path", str(tiny_pipeline_dir), "--train_data_dir", str(concept_dir),
        "--placeholder_token", "<blob>", "--initializer_token", "dog", "--output_dir", str(out), "--pn", "0.06M",
        "--repeats", "1", "--seed", "0", "--max_train_steps", "2", "--ti_mode", "input",
        "--text_encoder_dtype", "float16",
    ]))  # fmt: skip
    from infinity_t2i.textual_inversion import load_learned_embeds

    concept = load_learned_embeds(str(out))[0]
    assert torch.isfinite(concept.vectors).all() and concept.metadata["step"] == 2


def test_learned_input_vectors_enter_t5_in_its_dtype_under_mixed_precision(
    tiny_pipeline_dir, concept_dir, tmp_path, monkeypatch
):
    """accelerate returns float32 from the prepared module under bf16; inference writes the rows
    in T5's dtype, so training must feed T5 the same (bfloat16) vectors."""
    seen = []
    real_encode = train.encode_prompt

    def spy(tokenizer, text_encoder, prompts, embed_tokens=None):
        if embed_tokens is not None:
            ids = torch.tensor([[3, 4, len(tokenizer) - 1, 1]])
            seen.append((embed_tokens(ids).dtype, text_encoder.get_input_embeddings().weight.dtype))
        return real_encode(tokenizer, text_encoder, prompts, embed_tokens)

    monkeypatch.setattr(train, "encode_prompt", spy)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # the process's first Accelerator fixed "no"
    try:
        train.main(train.parse_args([
            "--pretrained_model_name_or_path", str(tiny_pipeline_dir), "--train_data_dir", str(concept_dir),
            "--placeholder_token", "<blob>", "--initializer_token", "dog", "--output_dir", str(tmp_path / "out"),
            "--pn", "0.06M",
            "--repeats", "1", "--seed", "0", "--max_train_steps", "1", "--ti_mode", "input",
            "--mixed_precision", "bf16", "--text_encoder_dtype", "bfloat16",
        ]))  # fmt: skip
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert seen and all(fed == rows == torch.bfloat16 for fed, rows in seen)


def test_gradient_checkpointing_trains_through_t5_without_its_dropout(
    tiny_pipeline_dir, concept_dir, tmp_path, monkeypatch
):
    """flan-T5-XL ships dropout_rate 0.1, which T5's attention applies itself in train mode."""
    import json
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_pipeline_dir, model)
    config_path = model / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "dropout_rate": 0.1}))
    differences = []
    real_encode = train.encode_prompt

    def encode_twice(tokenizer, text_encoder, prompts, embed_tokens=None):
        first = real_encode(tokenizer, text_encoder, prompts, embed_tokens)
        if embed_tokens is not None:
            with torch.no_grad():
                again = real_encode(tokenizer, text_encoder, prompts, embed_tokens)
            differences.append((first.features - again.features).abs().max().item())
        return first

    monkeypatch.setattr(train, "encode_prompt", encode_twice)
    train.main(
        train.parse_args(
            ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(concept_dir),
             "--placeholder_token", "<blob>",
             "--initializer_token", "dog", "--output_dir", str(tmp_path / "out"), "--pn", "0.06M", "--repeats", "2",
             "--seed", "0", "--max_train_steps", "2", "--ti_mode", "input", "--gradient_checkpointing"]
        )
    )  # fmt: skip
    assert differences == [0.0] * 4  # each step encodes twice: the captions with the token, and at its start
