"""Pictures a person can read, and the concept scores of validation."""

import numpy as np
import pytest
from PIL import Image

from infinity_t2i.grids import labelled_grid
from infinity_t2i.similarity import ConceptSimilarity, check_similarity_model
from toy_infinity.tiny import build_tiny_clip, build_tiny_dinov2


def flat(colour, size=64):
    return Image.new("RGB", (size, size), colour)


def test_small_images_are_upscaled_and_labels_sit_above_and_beside_them():
    rows = [[flat("red"), flat("blue")], [flat("green"), flat("black")]]
    plain = labelled_grid(rows)
    labelled = labelled_grid(rows, row_labels=["first prompt", "second"], column_labels=["<tok>", "word"], title="t")
    gap = 4
    assert plain.size == (2 * 256 + gap, 2 * 256 + gap)  # 64 px -> x4, nearest
    pixels = np.asarray(plain)
    assert (pixels[:256, :256] == (255, 0, 0)).all() and (pixels[260:, 260:] == (0, 0, 0)).all()
    extra_w, extra_h = labelled.width - plain.width, labelled.height - plain.height
    assert extra_w > 0 and extra_h > 0  # a label column and a title + header band
    ink = np.asarray(labelled).min(axis=2) < 128
    assert ink[:extra_h, :].any() and ink[extra_h:, :extra_w].any()  # text drawn in both bands
    assert (np.asarray(labelled)[extra_h : extra_h + 256, extra_w : extra_w + 256] == (255, 0, 0)).all()


def test_large_images_keep_their_size():
    assert labelled_grid([[flat("red", 300)]]).size == (300, 300)


def test_row_labels_of_large_images_are_never_covered():
    """At 1024 px the font is large; a 10-digit seed (a random --seed) still shows whole."""
    grid = np.asarray(labelled_grid([[flat("red", 1024)]], row_labels=["seed 1234567890"]))
    left = grid.shape[1] - 1024
    ink = np.nonzero((grid[:, :left].min(axis=2) < 128).any(axis=0))[0]
    assert left > 0 and ink.size and ink.max() < left - 4  # the label ends inside its own column
    assert (grid[:, left:] == (255, 0, 0)).all()


@pytest.mark.parametrize("builder", [build_tiny_clip, build_tiny_dinov2])
def test_similarity_is_highest_for_the_training_images_themselves(builder, tmp_path):
    scorer = ConceptSimilarity.from_pretrained(builder(str(tmp_path / "model")))
    training = [flat("red"), flat((200, 30, 30))]
    scorer.set_reference(training)
    own = scorer.scores(training, ["a red thing"] * 2)
    other = scorer.scores([flat((20, 200, 240)), flat((240, 240, 240))], ["a red thing"] * 2)
    assert own["image_to_training"] > other["image_to_training"]
    assert own["image_to_training"] == pytest.approx(float((scorer.reference @ scorer.reference.T).mean()), abs=1e-6)
    assert ("prompt_to_image" in own) == (builder is build_tiny_clip)


def test_a_model_that_is_neither_clip_nor_dinov2_is_refused_from_its_config(tiny_pipeline_dir):
    with pytest.raises(ValueError, match="is a t5 model; pass a CLIP or DINOv2 model"):
        check_similarity_model(f"{tiny_pipeline_dir}/text_encoder")
