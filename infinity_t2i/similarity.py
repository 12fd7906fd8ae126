"""Concept scores for validation: how close generated images are to the training images (CLIP or
DINOv2 image embeddings) and, with CLIP, to their prompt. A number that says whether a concept is
being learned, beside the loss and the pictures; the tiny model of the tests and any CLIP or DINOv2
folder or hub id load the same way (safetensors weights only)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

SIMILARITY_MODEL_TYPES = ("clip", "dinov2")


def check_similarity_model(name_or_path: str) -> str:
    """Reads only the model's config (a folder's or a hub repo's config.json) and refuses a model
    that is neither CLIP nor DINOv2; returns its model type. Every process checks it before any
    model loads."""
    from transformers import AutoConfig

    try:
        model_type = AutoConfig.from_pretrained(name_or_path).model_type
    except (OSError, ValueError) as e:
        raise ValueError(
            f"cannot read the config of --validation_similarity_model {name_or_path} ({e}); pass a local "
            "folder or a hub id this machine can reach"
        ) from e
    if model_type not in SIMILARITY_MODEL_TYPES:
        raise ValueError(
            f"--validation_similarity_model {name_or_path} is a {model_type} model; pass a CLIP or "
            "DINOv2 model (e.g. openai/clip-vit-base-patch32, facebook/dinov2-small)"
        )
    return model_type


class ConceptSimilarity:
    def __init__(self, model, processor, model_type: str, device: torch.device | str = "cpu"):
        self.model, self.processor, self.model_type = model.eval().requires_grad_(False), processor, model_type
        self.device = torch.device(device)
        self.reference: torch.Tensor | None = None  # the training images' embeddings, N, D

    @classmethod
    def from_pretrained(cls, name_or_path: str, device: torch.device | str = "cpu") -> ConceptSimilarity:
        from transformers import AutoImageProcessor, AutoModel, AutoProcessor, CLIPModel

        model_type = check_similarity_model(name_or_path)
        if model_type == "clip":
            model = CLIPModel.from_pretrained(name_or_path, use_safetensors=True)
            processor = AutoProcessor.from_pretrained(name_or_path)
        else:
            model = AutoModel.from_pretrained(name_or_path, use_safetensors=True)
            processor = AutoImageProcessor.from_pretrained(name_or_path)
        return cls(model.to(device), processor, model_type, device)

    @property
    def has_text(self) -> bool:
        return self.model_type == "clip"

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:  # -> N, D, unit length
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        if self.model_type == "clip":
            features = self.model.get_image_features(pixel_values=pixels).pooler_output
        else:
            features = self.model(pixel_values=pixels).pooler_output  # the class token, layer-normed
        return F.normalize(features.float(), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:  # -> N, D, unit length
        tokens = self.processor(text=list(texts), return_tensors="pt", padding=True, truncation=True)
        tokens = {k: v.to(self.device) for k, v in tokens.items()}
        return F.normalize(self.model.get_text_features(**tokens).pooler_output.float(), dim=-1)

    def set_reference(self, images: Sequence[Image.Image]) -> None:
        self.reference = self.image_embeddings(images)

    def scores(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> dict[str, float]:
        """`images[i]` was generated from `prompts[i]`. The mean cosine similarity of every
        generated image to every training image, and (CLIP) of each image to its prompt."""
        if self.reference is None:
            raise RuntimeError("set_reference(training images) first")
        generated = self.image_embeddings(images)
        out = {"image_to_training": (generated @ self.reference.T).mean().item()}
        if self.has_text:
            out["prompt_to_image"] = (generated * self.text_embeddings(prompts)).sum(-1).mean().item()
        return out
