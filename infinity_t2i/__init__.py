"""A clean-room, checkpoint-compatible PyTorch implementation of Infinity (FoundationVision),
the bitwise autoregressive text-to-image model, for textual inversion."""

from .config import MODEL_PRESETS, InfinityConfig, ModelPreset, VAEConfig
from .loading import CheckpointError, ModelFilesNotFound
from .pipeline import InfinityPipeline, InfinityPipelineOutput
from .resolution import ScaleSchedule, get_schedule, nearest_template
from .sampling import SamplingSettings, sample
from .text import TextCondition, encode_prompt
from .training import bitwise_loss, make_training_inputs
from .transformer import InfinityTransformer
from .vae import BSQVAE

__all__ = [
    "BSQVAE",
    "MODEL_PRESETS",
    "CheckpointError",
    "InfinityConfig",
    "InfinityPipeline",
    "InfinityPipelineOutput",
    "InfinityTransformer",
    "ModelFilesNotFound",
    "ModelPreset",
    "SamplingSettings",
    "ScaleSchedule",
    "TextCondition",
    "VAEConfig",
    "bitwise_loss",
    "encode_prompt",
    "get_schedule",
    "make_training_inputs",
    "nearest_template",
    "sample",
]
