import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FIXTURES = os.path.join(ROOT, "tests", "fixtures")

# Tiny models gain nothing from a second thread, and on a busy 2-core machine OpenMP threads
# waiting for each other make them several times slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    from toy_infinity.tiny import build_tiny_pipeline_dir

    return build_tiny_pipeline_dir(str(tmp_path_factory.mktemp("tiny-infinity")))


@pytest.fixture
def concept_dir(tmp_path):
    """Three images of the tests' concept."""
    from helpers import draw_concept

    folder = tmp_path / "concept"
    folder.mkdir()
    for i in range(3):
        draw_concept(folder / f"blob_{i}.png", shift=i)
    return folder
