import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the package and the scripts live at the repository root
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

FIXTURES = os.path.join(ROOT, "tests", "fixtures")

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    from helpers import build_tiny_pipeline_dir

    return build_tiny_pipeline_dir(str(tmp_path_factory.mktemp("tiny-infinity")))
