"""Collators of already-tokenised rows and of conversations (`collate_interleaved`, `DeemConversationCollator`,
`SyntheticCollator`), and the generated `SyntheticInterleavedDataset` for smoke tests and tiny configs."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers.utils import logging

from ..modeling.sequence_deem import pad_rows
from .presets import _seed_for

logger = logging.get_logger(__name__)

# ---------------------------------------------------------------------------------------------------------- collators


def collate_interleaved(features: list[dict], pad_token_id: int, label_pad_id: int = -100) -> dict[str, torch.Tensor]:
    """Right-pad tokenised rows and concatenate their images (row-major).

    Each feature: ``input_ids`` [L] (list or tensor), optional ``labels`` [L], ``pixel_values`` [n,3,S,S],
    ``pixel_values_decoder`` [n,3,D,D], ``image_masks`` [n,1,S,S] (n may be 0). Returns model-ready tensors with
    ``attention_mask`` and ``num_images``."""
    input_ids, attention_mask = pad_rows([f["input_ids"] for f in features], pad_token_id)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if any("labels" in f for f in features):
        labels = [f.get("labels", f["input_ids"]) for f in features]
        batch["labels"] = pad_rows(labels, label_pad_id, width=input_ids.shape[1])[0]
    counts = [0 if f.get("pixel_values") is None else len(f["pixel_values"]) for f in features]
    batch["num_images"] = torch.tensor(counts, dtype=torch.long)
    for key in ("pixel_values", "pixel_values_decoder", "image_masks"):
        parts = [torch.as_tensor(f[key]) for f in features if f.get(key) is not None and len(f[key])]
        if parts:
            batch[key] = torch.cat(parts)
    return batch


class DeemConversationCollator:
    """Conversations -> DEEM batches with loss on the assistant answers only (DEEM's chat template, §3.4).

    Rows: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str | [{"type": "text", "text": ...},
    {"type": "image"}]}], "images": [PIL | array, ...]}``. The whole conversation is rendered once with the
    processor's chat template and encoded once (``<s>`` + text, images expanded). For assistant turn k the
    supervised tokens are those of ``render(messages[:k+1])`` past its common prefix with
    ``render(messages[:k]) + " ## ASSISTANT:"`` (the generation prompt), i.e. the answer and its ``</s>``, which
    ends a tokenisation segment, so the spans line up with the full encoding.
    """

    def __init__(self, processor, max_length: int | None = None):
        self.processor = processor
        self.max_length = max_length

    def _render(self, messages, add_generation_prompt=False) -> str:
        return self.processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)

    def _ids(self, text: str, n_images: int) -> list[int]:
        # images only matter for the placeholder expansion; encode with dummy images to count tokens exactly
        out = self.processor(
            text=text,
            images=[np.zeros((2, 2, 3), dtype=np.uint8)] * n_images if n_images else None,
            return_tensors=None,
            padding=False,
        )
        return list(out["input_ids"][0])

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        texts, images, labels_rows = [], [], []
        for feature in features:
            messages = feature["messages"]
            row_images = feature.get("images") or ([feature["image"]] if feature.get("image") is not None else [])
            full = self._render(messages)
            full_ids = self._ids(full, len(row_images))
            labels = [-100] * len(full_ids)
            for k, message in enumerate(messages):
                if message["role"] != "assistant":
                    continue
                n_img = _count_images(messages[: k + 1], self.processor.image_marker)
                turn_ids = self._ids(self._render(messages[: k + 1]), n_img)
                prompt_ids = self._ids(self._render(messages[:k], add_generation_prompt=True), n_img)
                start = _common_prefix(prompt_ids, turn_ids)
                for pos in range(start, min(len(turn_ids), len(full_ids))):
                    labels[pos] = full_ids[pos]
            texts.append(full)
            images.append(list(row_images))
            labels_rows.append(labels)
        flat_images = [img for row in images for img in row]
        enc = self.processor(
            text=texts,
            images=flat_images or None,
            padding=True,
            padding_side="right",
            max_length=self.max_length,
            truncation=self.max_length is not None,
        )
        length = enc["input_ids"].shape[1]
        labels = torch.full((len(texts), length), -100, dtype=torch.long)
        for i, row in enumerate(labels_rows):
            row = row[:length]
            labels[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        labels[enc["attention_mask"] == 0] = -100
        batch = {k: v for k, v in enc.items()}
        batch["labels"] = labels
        return batch


def _count_images(messages, marker: str) -> int:
    n = 0
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            n += content.count(marker)
        else:
            n += sum(1 for item in content if item.get("type") == "image") + sum(
                item.get("text", "").count(marker) for item in content if item.get("type") == "text"
            )
    return n


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# --------------------------------------------------------------------------------------------------- synthetic data


class SyntheticInterleavedDataset(torch.utils.data.Dataset):
    """Deterministic generated interleaved documents for smoke tests and the tiny config.

    Sample i (a function of ``seed`` and i only): ``<s>`` text ``<soi><img>*Q`` text [``<soi><img>*Q`` text]
    ``</s>`` with 1-``max_images`` images. Text ids are drawn from a small per-dataset "phrase book" so there is
    something to learn; images are smooth random colour fields (encoder and decoder views of the same picture).
    With ``sft=True`` rows are ``<s>`` prompt ``<soi><img>*Q`` question answer ``</s>`` with labels only on the
    answer and ``</s>`` (stage 2-3 style).
    """

    def __init__(
        self,
        config,
        num_samples: int = 32,
        seed: int = 0,
        max_images: int = 2,
        text_length: tuple[int, int] = (3, 8),
        sft: bool = False,
    ):
        self.config = config
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.max_images = int(max_images)
        self.text_length = tuple(text_length)
        self.sft = sft
        g = torch.Generator().manual_seed(self.seed)
        lo, hi = 3, max(4, config.original_vocab_size - 2)
        self.phrases = [
            torch.randint(
                lo,
                hi,
                (int(torch.randint(self.text_length[0], self.text_length[1] + 1, (1,), generator=g)),),
                generator=g,
            ).tolist()
            for _ in range(8)
        ]

    def __len__(self) -> int:
        return self.num_samples

    def _image(self, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        base = torch.rand(1, 3, 4, 4, generator=g)
        vis = cfg.vision_config.image_size
        enc = F.interpolate(base, size=(vis, vis), mode="bilinear", align_corners=False)[0].clamp(0, 1)
        dec = None
        if cfg.diffusion_config is not None:
            side = cfg.diffusion_config.image_size
            dec = F.interpolate(base, size=(side, side), mode="bilinear", align_corners=False)[0].clamp(0, 1)
        return enc, dec

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        cfg = self.config
        g = torch.Generator().manual_seed(_seed_for(self.seed, index) % (2**63))
        image_run = [cfg.soi_token_id] + [cfg.image_token_id] * cfg.num_image_tokens
        pick = lambda: self.phrases[int(torch.randint(0, len(self.phrases), (1,), generator=g))]  # noqa: E731
        n_images = 1 if self.sft else int(torch.randint(1, self.max_images + 1, (1,), generator=g))
        ids, labels = [cfg.bos_token_id], None
        if self.sft:
            ids += pick() + image_run + pick()
            answer = pick() + [cfg.eos_token_id]
            labels = [-100] * len(ids) + answer
            ids += answer
        else:
            for k in range(n_images):
                if k > 0 or bool(torch.rand(1, generator=g) < 0.5):
                    ids += pick()
                ids += image_run
            ids += pick() + [cfg.eos_token_id]
        views = [self._image(g) for _ in range(n_images)]
        sample = {"input_ids": ids, "pixel_values": torch.stack([v[0] for v in views])}
        if views[0][1] is not None:
            sample["pixel_values_decoder"] = torch.stack([v[1] for v in views])
        if labels is not None:
            sample["labels"] = labels
        return sample


class SyntheticCollator:
    """[`collate_interleaved`] with the model config's pad id (a picklable callable for DataLoader workers)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features):
        return collate_interleaved(features, self.pad_token_id)
