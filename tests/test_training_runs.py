"""A training run on the tiny models, end to end: exact accumulation, a folder that belongs to one
run, resumes that continue only that run, and every failure in one line with nothing lost."""

import errno
import json
import os
import shutil

import numpy as np
import pytest
import torch
from helpers import draw_concept, run_script_expecting_error
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_train_textual_inversion import (
    PLACEHOLDER,
    SCRIPT,
    launch_two_processes,
    run,
    scalars,
    train_args,
    write_batch_recorder,
)

import train_textual_inversion_infinity as train


def with_repeats(argv: list, repeats: int) -> list:
    argv = list(argv)
    argv[argv.index("--repeats") + 1] = str(repeats)
    return argv


def run_argv(argv: list) -> None:
    train.main(train.parse_args(argv))


def folder_bytes(folder) -> dict:
    """Every file below `folder` (but the lock) and its bytes."""
    return {
        os.path.relpath(os.path.join(root, name), folder): open(os.path.join(root, name), "rb").read()
        for root, _, names in os.walk(folder)
        for name in names
        if name != train.LOCK_NAME
    }


def final_embedding(out) -> tuple[torch.Tensor, str]:
    with safe_open(str(out / "learned_embeds.safetensors"), "pt") as f:
        return f.get_tensor(f.metadata()["placeholder_token"]), f.metadata()["step"]


# ---- exact accumulation and seeding (issue 24) --------------------------------------------------


def test_an_optimisation_step_never_spans_two_epochs(tiny_pipeline_dir, concept_dir, tmp_path):
    # 3 batches an epoch, 2 per step: steps of 2 and 1 batches, 2 steps an epoch; before, the
    # accumulation ran across epochs and the run ended at step 3
    out = tmp_path / "out"
    argv = train_args(
        tiny_pipeline_dir, concept_dir, out, "--gradient_accumulation_steps", "2", "--max_train_steps", "4"
    )
    run_argv(with_repeats(argv, 1))
    assert final_embedding(out)[1] == "4" and len(scalars(out, "loss")) == 4


def test_the_logged_loss_is_the_mean_over_the_steps_batches(tiny_pipeline_dir, concept_dir, tmp_path, monkeypatch):
    # before: the last batch's loss alone, which jumps with the batch when shapes or images differ
    losses = iter([1.0, 3.0] * 3)

    def known_loss(args, indices, data, pipe, concept, learned, *rest):
        return (learned.weight * 0).sum() + next(losses)

    monkeypatch.setattr(train, "training_loss", known_loss)
    out = tmp_path / "out"
    run_argv(
        train_args(tiny_pipeline_dir, concept_dir, out, "--gradient_accumulation_steps", "2", "--max_train_steps", "3")
    )
    assert scalars(out, "loss") == [2.0, 2.0, 2.0]


def test_a_resume_inside_a_partial_epoch_ends_where_the_uninterrupted_run_ends(
    tiny_pipeline_dir, concept_dir, tmp_path
):
    # 15 batches an epoch, 4 per step: steps of 4, 4, 4 and 3 batches; before, the accumulation ran
    # on across epochs, the run ended early and a resume from checkpoint-5 ended elsewhere
    common = ("--gradient_accumulation_steps", "4", "--checkpointing_steps", "5", "--learning_rate", "0.05")
    full, part = tmp_path / "full", tmp_path / "part"
    run_argv(with_repeats(train_args(tiny_pipeline_dir, concept_dir, full, "--max_train_steps", "7", *common), 5))
    run_argv(with_repeats(train_args(tiny_pipeline_dir, concept_dir, part, "--max_train_steps", "5", *common), 5))
    resume = train_args(tiny_pipeline_dir, concept_dir, part, "--max_train_steps", "7", *common)
    run_argv(with_repeats([*resume, "--resume_from_checkpoint", "latest"], 5))
    vectors, step = final_embedding(full)
    assert step == "7" and final_embedding(part)[1] == "7"
    assert torch.equal(final_embedding(part)[0], vectors)


@pytest.mark.slow
def test_two_processes_without_a_seed_share_one_and_resume_exactly(tiny_pipeline_dir, concept_dir, tmp_path):
    """Two CPU processes (gloo), no --seed, accumulation 2 over 3 batches per process: every image
    once an epoch, equal steps, and stop-and-resume equal to an uninterrupted run."""
    wrapper = write_batch_recorder(tmp_path / "record_batches.py")
    record = tmp_path / "record"
    record.mkdir()
    common = ["--gradient_accumulation_steps", "2", "--checkpointing_steps", "2", "--learning_rate", "0.05"]

    def argv(out, steps, *extra):
        args = with_repeats(train_args(tiny_pipeline_dir, concept_dir, out, "--max_train_steps", steps, *common), 2)
        k = args.index("--seed")
        return args[:k] + args[k + 2 :] + list(extra)  # no --seed

    part, full = tmp_path / "part", tmp_path / "full"
    result = launch_two_processes(wrapper, [*argv(part, "2"), record], 29581)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((record / f"batches_{r}_0.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 3  # 6 batches of one image, 3 (odd) per process
    assert sorted(i for batches in ranks for batch in batches for i in batch) == list(range(6))  # each once
    assert final_embedding(part)[1] == "2"
    seed = json.loads((part / train.RUN_RECORD_NAME).read_text())["seed"]
    result = launch_two_processes(SCRIPT, argv(part, "4", "--resume_from_checkpoint", "latest"), 29583)
    assert result.returncode == 0, result.stderr[-3000:]
    result = launch_two_processes(SCRIPT, argv(full, "4", "--seed", seed), 29585)
    assert result.returncode == 0, result.stderr[-3000:]
    assert final_embedding(part)[1] == final_embedding(full)[1] == "4"
    assert torch.equal(final_embedding(part)[0], final_embedding(full)[0])
    # the checkpoint was made by two processes: one cannot continue it
    result = launch_two_processes(SCRIPT, argv(part, "6", "--resume_from_checkpoint", "latest"), 29587)
    assert result.returncode == 0
    err = run_script_expecting_error(SCRIPT, argv(part, "8", "--resume_from_checkpoint", "latest"), None)
    assert "lacks random_states_1.pkl" not in err and "--num_processes 2, this run has --num_processes 1" in err


def test_the_hub_repo_is_created_before_any_model_loads(tiny_pipeline_dir, concept_dir, tmp_path, monkeypatch):
    def offline(**kwargs):  # what the hub client raises without network
        raise ConnectionError("[Errno -3] Temporary failure in name resolution\nmore detail")

    def never(*args, **kwargs):
        raise AssertionError("a model was loaded before the hub repo was made")

    monkeypatch.setattr(train, "create_repo", offline)
    monkeypatch.setattr(train.InfinityPipeline, "from_pretrained", never)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        train.cli(train_args(tiny_pipeline_dir, concept_dir, out, "--push_to_hub", "--hub_token", "hf_secret"))
    message = str(exit_info.value.code)
    assert message.startswith("error: --push_to_hub: could not create the hub repo out (ConnectionError: [Errno -3]")
    assert "\n" not in message and "hf_secret" not in message and not out.exists()


# ---- a run owns its folder (issue 25) -----------------------------------------------------------


@pytest.fixture
def other_concept(tmp_path):
    folder = tmp_path / "other"
    folder.mkdir()
    for i in range(3):
        draw_concept(folder / f"other_{i}.png", size=(80, 96), shift=3 + i)
    return folder


def test_a_used_folder_is_refused_and_overwrite_leaves_only_the_new_run(
    tiny_pipeline_dir, concept_dir, other_concept, tmp_path, capsys
):
    out = tmp_path / "out"
    run(
        tiny_pipeline_dir, concept_dir, out, "--max_train_steps", "2", "--checkpointing_steps", "1", "--save_steps", "1"
    )
    first = folder_bytes(out)
    second = [*train_args(tiny_pipeline_dir, other_concept, out, "--max_train_steps", "2", "--checkpointing_steps", "2",
                          "--checkpoints_total_limit", "1", "--save_steps", "100"),
              "--placeholder_token", "<other>"]  # fmt: skip
    err = run_script_expecting_error(SCRIPT, second, capsys)
    assert f"holds the results of {PLACEHOLDER}" in err and "--overwrite_output_dir" in err
    err = run_script_expecting_error(SCRIPT, [*second, "--resume_from_checkpoint", "latest"], capsys)
    assert f"made with --placeholder_token {PLACEHOLDER}" in err and "this run has --placeholder_token <other>" in err
    assert folder_bytes(out) == first  # the first run untouched, byte for byte

    run_argv([*second, "--overwrite_output_dir"])
    record = json.loads((out / train.RUN_RECORD_NAME).read_text())
    assert record["placeholder_token"] == "<other>"
    assert sorted(n for n in os.listdir(out) if n.startswith(("checkpoint", "learned_embeds"))) == [
        "checkpoint-2",
        "learned_embeds.safetensors",
    ]
    assert train.checkpoint_run(str(out / "checkpoint-2"))["run_id"] == record["run_id"]
    assert final_embedding(out)[0].shape[0] == 8 and "<other>" in (out / "README.md").read_text()


def test_the_users_own_files_in_the_output_folder_are_kept(tiny_pipeline_dir, concept_dir, tmp_path, capsys):
    # before: the model card replaced the user's README.md, and --overwrite_output_dir deleted
    # their logs/, validation/ and *.tmp files from a folder no run had used
    out = tmp_path / "out"
    mine = {"logs/server.log": "mine", "validation/notes.txt": "mine", "data.tmp": "mine", "README.md": "# my project"}
    for name, text in mine.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    argv = train_args(tiny_pipeline_dir, concept_dir, out, "--max_train_steps", "1")
    for extra in ([], ["--overwrite_output_dir"]):
        err = run_script_expecting_error(SCRIPT, [*argv, *extra], capsys)
        assert "holds a README.md but no run.json" in err, err
    assert folder_bytes(out) == {name: text.encode() for name, text in mine.items()}
    (out / "README.md").unlink()
    run_argv([*argv, "--overwrite_output_dir"])
    assert all((out / name).read_text() == text for name, text in mine.items() if name != "README.md")
    assert "<blob>" in (out / "README.md").read_text()  # the card, now that the folder holds a run


def test_pruning_keeps_another_runs_checkpoints(tmp_path):
    for step, run_id in ((1, "theirs"), (2, "mine"), (3, "mine")):
        (tmp_path / f"checkpoint-{step}").mkdir()
        save_file({"x": torch.zeros(1)}, tmp_path / f"checkpoint-{step}" / train.STEP_RNG_NAME, {"run_id": run_id})
    train.prune_checkpoints(str(tmp_path), 1, "mine")
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1", "checkpoint-3"]


def test_a_second_run_into_a_busy_folder_is_refused(tiny_pipeline_dir, concept_dir, tmp_path, capsys):
    import fcntl

    out = tmp_path / "out"
    out.mkdir()
    with open(out / train.LOCK_NAME, "a+") as lock:  # a run is writing there
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        err = run_script_expecting_error(SCRIPT, train_args(tiny_pipeline_dir, concept_dir, out), capsys)
    assert "another training run is writing to" in err
    assert os.listdir(out) == [train.LOCK_NAME]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--initializer_token", "cat"], "--initializer_token dog, this run has --initializer_token cat"),
        (["--aspect_ratio", "nearest"], "--aspect_ratio square, this run has --aspect_ratio nearest"),
        (["--seed", "1"], "--seed 0, this run has --seed 1"),
        (["--adam_beta2", "0.99"], "--adam_beta2 0.999, this run has --adam_beta2 0.99"),
        (["--max_grad_norm", "0.5"], "--max_grad_norm 1.0, this run has --max_grad_norm 0.5"),
        (["OTHER_DATA"], "was made with training data "),
    ],
)
def test_a_resume_with_other_settings_is_refused(
    tiny_pipeline_dir, concept_dir, other_concept, tmp_path, capsys, extra, message
):
    out = tmp_path / "out"
    run(tiny_pipeline_dir, concept_dir, out, "--max_train_steps", "2", "--checkpointing_steps", "2")
    before = folder_bytes(out)
    argv = train_args(
        tiny_pipeline_dir, concept_dir, out, "--max_train_steps", "4", "--resume_from_checkpoint", "latest"
    )
    if extra == ["OTHER_DATA"]:
        argv[argv.index("--train_data_dir") + 1], extra = str(other_concept), []
    err = run_script_expecting_error(SCRIPT, argv + extra, capsys)
    assert message in err and "checkpoint-2" in err, err
    assert folder_bytes(out) == before


def test_a_decaying_schedule_resumes_only_to_its_own_length(tiny_pipeline_dir, concept_dir, tmp_path, capsys):
    # before: a cosine run of 2 steps resumed to 4 went on along the 4-step curve, matching neither run
    # (a constant learning rate may still be extended: the partial-epoch test above)
    out = tmp_path / "out"
    cosine = ("--lr_scheduler", "cosine", "--checkpointing_steps", "2")
    run(tiny_pipeline_dir, concept_dir, out, "--max_train_steps", "2", *cosine)
    resume = ("--max_train_steps", "4", "--resume_from_checkpoint", "latest", *cosine)
    err = run_script_expecting_error(SCRIPT, train_args(tiny_pipeline_dir, concept_dir, out, *resume), capsys)
    assert "--max_train_steps 2, this run has --max_train_steps 4" in err, err


def test_a_run_recorded_before_a_flag_existed_resumes_only_as_it_ran(tiny_pipeline_dir, concept_dir, tmp_path):
    out = tmp_path / "out"
    run(tiny_pipeline_dir, concept_dir, out, "--max_train_steps", "1")
    today = json.loads((out / train.RUN_RECORD_NAME).read_text())
    older = {k: v for k, v in today.items() if k not in ("vector_layout", "prior_scales", "prior_weight", "ema_decay")}
    # it ran without the prior and the average, today's defaults have them
    with pytest.raises(
        train.UsageError, match="--prior_weight 0.0 --ema_decay 0.0, this run has --prior_weight 1.0 --ema_decay 0.95"
    ):
        train.check_recipe("checkpoint-2", older, today)
    as_it_ran = today | {"prior_weight": "0.0", "ema_decay": "0.0"}
    train.check_recipe("checkpoint-2", older, as_it_ran)
    with pytest.raises(train.UsageError, match="--vector_layout shared, this run has --vector_layout per_scale"):
        train.check_recipe("checkpoint-2", older, as_it_ran | {"vector_layout": "per_scale"})
    train.check_recipe("a new run", {}, today)  # a new run has no record to keep


def test_the_saved_embedding_is_the_moving_average_of_the_steps_vectors(tiny_pipeline_dir, concept_dir, tmp_path):
    # the same run twice: without the average, saving every step's vectors; with decay 0.5
    raw, averaged = tmp_path / "raw", tmp_path / "averaged"
    common = ("--max_train_steps", "4", "--learning_rate", "0.1")
    run(tiny_pipeline_dir, concept_dir, raw, *common, "--ema_decay", "0", "--save_steps", "1")
    run(tiny_pipeline_dir, concept_dir, averaged, *common, "--ema_decay", "0.5")
    steps = torch.stack([load_file(raw / f"learned_embeds-steps-{i}.safetensors")[PLACEHOLDER] for i in range(1, 5)])
    weights = torch.tensor([0.5**3, 0.5**2, 0.5, 1.0])[:, None, None]
    average = (weights * steps).sum(0) / weights.sum()  # held norms: its direction at their norm
    average = torch.nn.functional.normalize(average, dim=-1) * steps[-1].norm(dim=-1, keepdim=True)
    vectors, step = final_embedding(averaged)
    assert step == "4" and torch.allclose(vectors, average, atol=1e-5)
    assert torch.equal(final_embedding(raw)[0], steps[-1]) and not torch.allclose(vectors, steps[-1], atol=1e-3)


def test_a_run_stopped_before_its_first_checkpoint_resumes_with_its_seed(tiny_pipeline_dir, concept_dir, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    run(tiny_pipeline_dir, concept_dir, full, "--max_train_steps", "3", "--seed", "5")
    run(tiny_pipeline_dir, concept_dir, part, "--max_train_steps", "3", "--seed", "5", "--checkpointing_steps", "100")
    (part / "learned_embeds.safetensors").unlink()  # as if killed before the end
    argv = train_args(
        tiny_pipeline_dir, concept_dir, part, "--max_train_steps", "3", "--resume_from_checkpoint", "latest"
    )
    k = argv.index("--seed")
    run_argv(argv[:k] + argv[k + 2 :])  # no --seed: the run's own, from run.json
    assert torch.equal(final_embedding(part)[0], final_embedding(full)[0])


# ---- non-finite values never reach the last good embedding (issue 25) ---------------------------


def test_vectors_that_turn_nan_stop_the_run_and_no_checkpoint_holds_them(
    tiny_pipeline_dir, concept_dir, tmp_path, monkeypatch
):
    real_project, calls = train.LearnedVectors.project_, []

    def nan_after_step_2(self):
        real_project(self)
        calls.append(1)
        if len(calls) == 2:
            self.weight.data.fill_(float("nan"))

    monkeypatch.setattr(train.LearnedVectors, "project_", nan_after_step_2)
    out = tmp_path / "out"
    common = ("--checkpointing_steps", "1", "--save_steps", "1", "--learning_rate", "0.1")
    with pytest.raises(train.UsageError, match="the vectors became non-finite at step 2"):
        run(tiny_pipeline_dir, concept_dir, out, "--max_train_steps", "4", *common)
    vectors, step = final_embedding(out)
    assert step == "1" and torch.isfinite(vectors).all()
    assert torch.equal(vectors, load_file(out / "learned_embeds-steps-1.safetensors")[PLACEHOLDER])
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint")) == ["checkpoint-1"]
    monkeypatch.undo()
    run(tiny_pipeline_dir, concept_dir, out, "--max_train_steps", "4", *common, "--resume_from_checkpoint", "latest")
    vectors, step = final_embedding(out)
    assert step == "4" and torch.isfinite(vectors).all()


def test_non_finite_vectors_are_never_written(tmp_path):
    args = train.parse_args(train_args("model", "data", tmp_path, "--ti_mode", "input"))
    concept = train.ConceptTokens(PLACEHOLDER, [PLACEHOLDER], [5], torch.zeros(1, 4), None, 1.0)
    learned = train.LearnedVectors([5], torch.ones(1, 4))
    path = tmp_path / "learned_embeds.safetensors"
    train.save_embedding(str(path), args, concept, learned, {}, 1)
    good = path.read_bytes()
    learned.weight.data.fill_(float("nan"))
    with pytest.raises(train.UsageError, match="are not finite"):
        train.save_embedding(str(path), args, concept, learned, {}, 2)
    assert path.read_bytes() == good


# ---- every bad value in one line, nothing written (issue 25) ------------------------------------


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--max_grad_norm", "-1", "--max_grad_norm must be a positive number, got -1.0"),
        ("--max_grad_norm", "0", "--max_grad_norm must be a positive number"),
        ("--max_grad_norm", "nan", "--max_grad_norm must be a positive number, got nan"),
        ("--checkpoints_total_limit", "0", "--checkpoints_total_limit must be at least 1, got 0"),
        ("--checkpoints_total_limit", "-1", "--checkpoints_total_limit must be at least 1"),
        ("--self_correction_strength", "5", "--self_correction_strength must be in [0, 1], got 5.0"),
        ("--self_correction_strength", "nan", "--self_correction_strength must be in [0, 1]"),
        ("--max_train_steps", "-5", "--max_train_steps must be at least 1, got -5"),
        ("--adam_beta1", "1.5", "--adam_beta1 must be in [0, 1), got 1.5"),
        ("--adam_beta2", "1", "--adam_beta2 must be in [0, 1)"),
        ("--adam_epsilon", "-1", "--adam_epsilon must be a positive number"),
        ("--adam_weight_decay", "-1", "--adam_weight_decay must be a number of at least 0"),
        ("--adam_weight_decay", "inf", "--adam_weight_decay must be a number of at least 0"),
        ("--dataloader_num_workers", "-1", "--dataloader_num_workers must be at least 0"),
        ("--num_vectors", "600", "--num_vectors must be between 1 and 64, got 600"),
        ("--seed", "-1", "--seed must be between 0 and 4294967295, got -1"),
        ("--seed", str(2**32), "--seed must be between 0 and 4294967295"),
        ("--seed", str(2**63 - 1), "--seed must be between 0 and 4294967295"),
        ("--lr_warmup_steps", "-1", "--lr_warmup_steps must be at least 0"),
        ("--lr_num_cycles", "0", "--lr_num_cycles must be at least 1"),
        ("--num_train_epochs", "0", "--num_train_epochs must be at least 1"),
        ("--self_correction_scales", "-1", "--self_correction_scales must be at least 0"),
        ("--prior_scales", "-1", "--prior_scales must be at least 0, got -1"),
        ("--prior_weight", "1.5", "--prior_weight must be in [0, 1], got 1.5"),
        ("--prior_scales", "5", "--prior_scales 5 covers all 5 trained scales"),  # before: trained nothing
        ("--lr_warmup_steps", "3", "needs a schedule with a warmup"),  # before: ignored under the constant rate
        ("--ema_decay", "1", "--ema_decay must be in [0, 1), got 1.0"),
        ("--ema_decay", "-0.5", "--ema_decay must be in [0, 1)"),
        ("--overwrite_output_dir", "--resume_from_checkpoint=latest", "give one of them"),
    ],
)
def test_every_number_is_range_checked_at_parse_time(concept_dir, tmp_path, capsys, flag, value, message):
    out = tmp_path / "out"
    err = run_script_expecting_error(SCRIPT, [*train_args("no-model", concept_dir, out), flag, value], capsys)
    assert message in err, err
    assert not out.exists()


def write_metadata(folder, *lines: str) -> None:
    (folder / "metadata.jsonl").write_text("".join(line + "\n" for line in lines))


@pytest.mark.parametrize(
    "case, message",
    [
        ("null", "line 1: expected an object with a string file_name and a string text"),
        ("number", "line 1: expected an object with a string file_name and a string text"),
        ("file_name_number", "line 1: expected an object with a string file_name and a string text"),
        ("array", "line 1: expected an object with a string file_name and a string text"),
        ("twice", "captions blob_0.png twice (lines 1 and 2); keep one line"),
        ("long_caption", "Infinity reads; shorten it"),
        ("long_prompt", "Infinity reads; shorten it"),
        ("nan_tiff", "holds non-finite pixel values"),
    ],
)
def test_bad_data_is_refused_in_one_line(tiny_pipeline_dir, concept_dir, tmp_path, capsys, case, message):
    long_text = "a photo of a " + "very " * 600 + PLACEHOLDER
    extra = []
    if case == "null":
        write_metadata(concept_dir, '{"file_name": "blob_0.png", "text": null}')
    elif case == "number":
        write_metadata(concept_dir, '{"file_name": "blob_0.png", "text": 42}')
    elif case == "file_name_number":
        write_metadata(concept_dir, f'{{"file_name": 5, "text": "a {PLACEHOLDER}"}}')
    elif case == "array":
        write_metadata(concept_dir, f'["blob_0.png", "a {PLACEHOLDER}"]')
    elif case == "twice":
        line = f'{{"file_name": "blob_0.png", "text": "a {PLACEHOLDER}"}}'
        write_metadata(concept_dir, line, line.replace("a <", "the <"))
    elif case == "long_caption":
        write_metadata(concept_dir, json.dumps({"file_name": "blob_0.png", "text": long_text}))
    elif case == "long_prompt":
        extra = ["--validation_prompt", long_text]
    elif case == "nan_tiff":
        pixels = np.full((40, 40), np.nan, dtype=np.float32)
        Image.fromarray(pixels, mode="F").save(concept_dir / "nan.tif")
    out = tmp_path / "out"
    err = run_script_expecting_error(SCRIPT, train_args(tiny_pipeline_dir, concept_dir, out, *extra), capsys)
    assert message in err, err
    assert not out.exists()


# ---- checkpoints whose files changed, and what a resume keeps (issue 25) ------------------------


@pytest.mark.parametrize("damage", ["flip optimizer.bin", "swap scheduler.bin", "strip step_rng"])
def test_a_checkpoint_changed_after_it_was_written_is_refused(tiny_pipeline_dir, concept_dir, tmp_path, capsys, damage):
    import zipfile

    out = tmp_path / "out"
    run(tiny_pipeline_dir, concept_dir, out, "--max_train_steps", "2", "--checkpointing_steps", "2")
    checkpoint = out / "checkpoint-2"
    if damage == "flip optimizer.bin":
        data = bytearray((checkpoint / "optimizer.bin").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (checkpoint / "optimizer.bin").write_bytes(bytes(data))
        assert zipfile.is_zipfile(checkpoint / "optimizer.bin")  # still looks whole
        message = "optimizer.bin has changed since it was written"
    elif damage == "swap scheduler.bin":
        shutil.copy(checkpoint / "optimizer.bin", checkpoint / "scheduler.bin")
        message = "scheduler.bin has changed since it was written"
    else:
        save_file(load_file(checkpoint / train.STEP_RNG_NAME), checkpoint / train.STEP_RNG_NAME)  # no metadata
        message = "step_rng.safetensors has no run record"
    before = folder_bytes(out)
    argv = train_args(
        tiny_pipeline_dir, concept_dir, out, "--max_train_steps", "4", "--resume_from_checkpoint", "latest"
    )
    err = run_script_expecting_error(SCRIPT, argv, capsys)
    assert message in err, err
    assert folder_bytes(out) == before


def test_a_checkpoint_under_another_name_resumes_and_a_finished_run_keeps_its_card(
    tiny_pipeline_dir, concept_dir, tmp_path
):
    out = tmp_path / "out"
    common = ("--checkpointing_steps", "2", "--validation_steps", "2", "--num_validation_images", "1",
              "--validation_prompt", f"a {PLACEHOLDER}")  # fmt: skip
    run(tiny_pipeline_dir, concept_dir, out, "--max_train_steps", "2", *common)
    card = (out / "README.md").read_text()
    assert "validation/step-000002.png" in card
    backup = tmp_path / "backup"
    shutil.copytree(out / "checkpoint-2", backup)
    run(tiny_pipeline_dir, concept_dir, out, "--max_train_steps", "2", *common, "--resume_from_checkpoint", str(backup))
    assert (out / "README.md").read_text() == card  # the finished run's card, grid and all
    assert final_embedding(out)[1] == "2"


def test_a_full_disk_and_ctrl_c_end_in_one_line_that_says_how_to_go_on(
    tiny_pipeline_dir, concept_dir, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    argv = train_args(tiny_pipeline_dir, concept_dir, out, "--max_train_steps", "4", "--checkpointing_steps", "2")
    real_save = train.save_learned_embeds

    def disk_full(path, concept):
        if path.endswith(train.LEARNED_EMBEDS_NAME):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(path, concept)

    monkeypatch.setattr(train, "save_learned_embeds", disk_full)
    with pytest.raises(SystemExit) as exit_info:
        train.cli(argv)
    message = exit_info.value.code
    assert message.startswith("error: could not write ") and "No space left on device" in message
    assert "the last complete checkpoint is " in message and "checkpoint-4" in message and "\n" not in message
    monkeypatch.undo()

    calls = []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_loss(*args)

    real_loss = train.training_loss
    monkeypatch.setattr(train, "training_loss", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        train.cli([*argv, "--overwrite_output_dir"])
    message = exit_info.value.code
    assert message.startswith("error: interrupted; the last complete checkpoint is ") and "checkpoint-2" in message
    monkeypatch.undo()
    train.cli([*argv, "--resume_from_checkpoint", "latest"])
    assert final_embedding(out)[1] == "4"


# ---- validation that fits the card (issue 24) ---------------------------------------------------


def test_validation_draws_one_image_at_a_time_and_output_mode_never_runs_t5_again(
    tiny_pipeline_dir, concept_dir, tmp_path, monkeypatch
):
    from transformers import T5EncoderModel

    t5_calls, batches = [], []
    real_t5, real_pipe = T5EncoderModel.forward, train.InfinityPipeline.__call__

    def counting_t5(self, *args, **kwargs):
        t5_calls.append(1)
        return real_t5(self, *args, **kwargs)

    def recording_pipe(self, prompt, *args, **kwargs):
        batches.append(len(prompt))
        return real_pipe(self, prompt, *args, **kwargs)

    monkeypatch.setattr(T5EncoderModel, "forward", counting_t5)
    monkeypatch.setattr(train.InfinityPipeline, "__call__", recording_pipe)
    out = tmp_path / "out"
    run(tiny_pipeline_dir, concept_dir, out, "--max_train_steps", "2", "--validation_steps", "1",
        "--num_validation_images", "3", "--validation_prompt", f"a {PLACEHOLDER} on grass")  # fmt: skip
    # T5 ran once for the initializer's start, then once per caption: 14 templates and the prompt
    assert len(t5_calls) == 1 + len(train.TEMPLATES["object"]) + 1
    assert batches == [1] * 3 * 3  # 3 validations (steps 0, 1, 2) x 3 images, one at a time
