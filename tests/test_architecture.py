"""The released architectures, built on the meta device, against the official state-dict manifests;
the dynamic-resolution tables and RoPE positions against the official tables."""

import json
import os

import pytest
import torch
from conftest import FIXTURES

from infinity_t2i.config import MODEL_PRESETS, InfinityConfig
from infinity_t2i.resolution import H_DIV_W_TEMPLATES, TEMPLATE_GRIDS, get_schedule, nearest_template
from infinity_t2i.rope import rope_table
from infinity_t2i.transformer import InfinityTransformer
from infinity_t2i.vae import BSQVAE

MANIFESTS = os.path.join(FIXTURES, "manifests")


def manifest_entries(name):
    with open(os.path.join(MANIFESTS, f"{name}.json")) as f:
        return [(e["name"], e["shape"], e["dtype"]) for e in json.load(f)["state_dict"]]


def state_entries(module):
    return [(k, list(t.shape), str(t.dtype).removeprefix("torch.")) for k, t in module.state_dict().items()]


@pytest.mark.parametrize(
    "model_type,transformer_manifest,vae_manifest",
    [("infinity_2b", "infinity_2b", "vae_d32"), ("infinity_8b", "infinity_8b", "vae_d14_patchify")],
)
def test_state_dict_equals_official_manifest(model_type, transformer_manifest, vae_manifest):
    preset = MODEL_PRESETS[model_type]
    with torch.device("meta"):
        transformer = InfinityTransformer(preset.transformer)
        vae = BSQVAE(preset.vae)
    assert state_entries(transformer) == manifest_entries(transformer_manifest)
    assert state_entries(vae) == manifest_entries(vae_manifest)


def test_parameter_counts_match_the_released_models():
    with torch.device("meta"):
        two_b = InfinityTransformer(MODEL_PRESETS["infinity_2b"].transformer)
        eight_b = InfinityTransformer(MODEL_PRESETS["infinity_8b"].transformer)
    assert sum(p.numel() for p in two_b.parameters()) == 2_204_564_032
    assert sum(p.numel() for p in eight_b.parameters()) == 8_375_791_824


def test_rope_positions_of_every_template_match_the_official_tables():
    with open(os.path.join(MANIFESTS, "rope_positions_hd128.json")) as f:
        official = json.load(f)
    inv_freq = torch.tensor(official["inv_freq"])
    for key, ratio in official["ratios"].items():
        schedule = get_schedule(float(key), "1M")
        assert list(schedule.rope_grid) == ratio["reference_grid"], key
        assert [list(g) for g in schedule.grids] == [[s["h"], s["w"]] for s in ratio["scales"]], key
        table = rope_table(schedule, 128)  # 2, L, 64
        angles = torch.atan2(table[1], table[0])
        rows = torch.cat([torch.tensor(s["row_pos"]).repeat_interleave(s["w"]) for s in ratio["scales"]]).float()
        cols = torch.cat([torch.tensor(s["col_pos"]).repeat(s["h"]) for s in ratio["scales"]]).float()
        # pair 13 of each half turns by position * inv_freq[13] < pi, so the angle gives the position
        assert torch.allclose(angles[:, 13], rows * inv_freq[13], atol=1e-4), key
        assert torch.allclose(angles[:, 32 + 13], cols * inv_freq[13], atol=1e-4), key


@pytest.mark.parametrize(
    "template,pn,pixels,length",
    [
        (1.0, "0.06M", (256, 256), 521),
        (1.0, "0.25M", (512, 512), 2521),
        (1.0, "1M", (1024, 1024), 10521),
        (1.25, "1M", (1120, 896), 10774),
        (0.8, "0.25M", (448, 560), 2814),
        (0.666, "1M", (832, 1248), 10997),
        (2.0, "1M", (1440, 720), 11269),
        (0.333, "0.06M", (144, 432), 509),
    ],
)
def test_schedule_tables(template, pn, pixels, length):
    schedule = get_schedule(template, pn)
    assert schedule.image_size() == pixels
    assert schedule.total_len == length
    assert get_schedule(template, "1M").grids[: len(schedule)] == schedule.grids  # pn schedules are prefixes


def test_nearest_template():
    assert len(H_DIV_W_TEMPLATES) == 15 and set(TEMPLATE_GRIDS) == set(H_DIV_W_TEMPLATES)
    assert nearest_template(1.0) == 1.0
    assert nearest_template(1080 / 1920) == 0.571
    assert nearest_template(3 / 2) == 1.5 and nearest_template(2 / 3) == 0.666
    assert nearest_template(10.0) == 3.0
    with pytest.raises(ValueError, match="positive"):
        nearest_template(0)
    with pytest.raises(ValueError, match="pn must be one of"):
        get_schedule(1.0, "2M")


def test_config_rejects_inconsistent_shapes():
    with pytest.raises(ValueError, match="block_chunks"):
        InfinityConfig(depth=6, block_chunks=4)
    with pytest.raises(ValueError, match="multiple of 4"):
        InfinityConfig(embed_dim=60, num_heads=2)
