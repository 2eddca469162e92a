"""Referring / region data from COCO-style instance annotations (reference §3.4 "Mask SFT", §6.5).

Input: a COCO JSON (``images`` with ``id``, ``file_name``, ``height``, ``width``; ``annotations`` with ``image_id``,
``segmentation`` as polygons or RLE with list or compressed-string counts, optional ``category_id`` and
``caption``; ``categories`` with ``id`` and ``name``) and the image folder (or tar shards).

One sample per image (map-style `ReferringDataset`; `.streaming()` for a sharded stream): the image's regions
(at most ``max_regions`` = 15, a seeded random subset when there are more, as the original's limit) become image
copies as the original's referring collator makes them: the first ``<image>`` is the whole image with an
all-ones mask, then one copy per region with that region's binary mask. The conversation uses the mask-SFT roles
(``prompts.TEMPLATES["referring"]``: "## user: " / "## asistant: "), one turn per region; only the assistant
answers (each ending with ``</s>``) are supervised. Default turns: the first user turn introduces the regions
(``<image>\\nIn the image there are region1 <image>, region2 <image>. ``) and every turn asks
"What is region{k}?" (answer: the category name) or, when the annotation carries a ``caption``, "Please describe
region{k}." (answer: the caption). Pass ``turns_fn(regions, rng) -> [(question, answer), ...]`` to change that;
``regions`` are the annotation dicts in region order, each with an added ``category_name``.

Differences from the original: its exact referring header and question phrasing are not in the reference; it
supervises the "## user" prefix tokens, here only the answers are.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from ...modeling.prompts import EOS, IMAGE_MARKER, TEMPLATES
from ._common import BadSample, load_json_file
from .images import ImageStore
from .masks import MaskError, segmentation_to_mask
from .sources import MapSource

MAX_REGIONS = 15


def default_referring_turns(regions: list[dict], rng) -> list[tuple[str, str]]:
    intro = f"{IMAGE_MARKER}\nIn the image there are " + ", ".join(
        f"region{k} {IMAGE_MARKER}" for k in range(1, len(regions) + 1)
    )
    turns = []
    for k, region in enumerate(regions, 1):
        caption = region.get("caption")
        if isinstance(caption, str) and caption.strip():
            turns.append((f"Please describe region{k}.", caption.strip()))
        else:
            turns.append((f"What is region{k}?", str(region.get("category_name") or "object")))
    turns[0] = (intro + ". " + turns[0][0], turns[0][1])
    return turns


def conversation_segments(turns: list[tuple[str, str]], template: str = "referring") -> list[dict]:
    """Multi-turn SFT segments in a `prompts.TEMPLATES` layout: prompt parts unsupervised, answers supervised.

    Turn 1: ``f"{system} {user} {assistant}".strip()`` (as `format_prompt`), later turns
    ``f" {user} {assistant}".rstrip()``; each answer is ``f" {answer}</s>"``.
    """
    t = TEMPLATES[template]
    segments = []
    for i, (question, answer) in enumerate(turns):
        user = t.user.format(image=IMAGE_MARKER, question=question)
        prompt = f"{t.system} {user} {t.assistant}".strip() if i == 0 else f" {user} {t.assistant}".rstrip()
        segments.append({"text": prompt, "supervise": False})
        segments.append({"text": f" {answer}{EOS}", "supervise": True})
    return segments


class ReferringDataset(MapSource):
    """Map-style referring samples, one per annotated image; see the module docstring."""

    def __init__(
        self,
        coco_json,
        images,
        *,
        max_regions: int = MAX_REGIONS,
        turns_fn=None,
        name: str = "referring",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.path = str(coco_json)
        coco = load_json_file(coco_json)  # fsspec: plain or compressed; one dict, not rows, so not `datasets`
        if not isinstance(coco, dict) or not isinstance(coco.get("images"), list):
            raise ValueError(f"{coco_json}: not a COCO annotation file (no 'images' list)")
        categories = {c.get("id"): c.get("name") for c in coco.get("categories", []) if isinstance(c, dict)}
        by_image = defaultdict(list)
        for ann in coco.get("annotations", []):
            if isinstance(ann, dict) and "segmentation" in ann:
                by_image[ann.get("image_id")].append(dict(ann, category_name=categories.get(ann.get("category_id"))))
        self.entries = []
        for entry in coco["images"]:
            anns = by_image.get(entry.get("id")) if isinstance(entry, dict) else None
            if anns:
                self.entries.append((entry, anns))
            else:
                self._dropped["no_regions"] += 1
        self.store = images if isinstance(images, ImageStore) else ImageStore(images)
        self.max_regions = int(max_regions)
        self.turns_fn = turns_fn or default_referring_turns
        self.name = name

    def __len__(self) -> int:
        return len(self.entries)

    def _where(self, i: int) -> str:
        entry = self.entries[i][0]
        return f"{self.path}: image id {entry.get('id')} ({entry.get('file_name')})"

    def _build_item(self, i, rng):
        entry, anns = self.entries[i]
        file_name, height, width = entry.get("file_name"), entry.get("height"), entry.get("width")
        if not isinstance(file_name, str) or not all(isinstance(v, int) and v > 0 for v in (height, width)):
            raise BadSample("bad_record", "an image entry needs 'file_name', 'height' and 'width'")
        if len(anns) > self.max_regions:
            anns = [anns[j] for j in sorted(rng.choice(len(anns), self.max_regions, replace=False))]
        image, where = self.store.load(file_name)
        if (image.height, image.width) != (height, width):
            raise BadSample(
                "mask_mismatch",
                f"{where} is {image.height}x{image.width} (HxW) but the annotation says {height}x{width}",
            )
        masks, regions = [], []
        for ann in anns:
            try:
                mask = segmentation_to_mask(ann["segmentation"], height, width)
            except MaskError as err:
                reason = "mask_mismatch" if "size" in str(err) else "bad_record"
                raise BadSample(reason, f"annotation {ann.get('id')}: {err}") from None
            if not mask.any():
                self._dropped["empty_mask"] += 1
                continue
            masks.append(mask)
            regions.append(ann)
        if not regions:
            self._dropped["no_regions"] += 1
            return None
        segments = conversation_segments(self.turns_fn(regions, rng), "referring")
        images = [image] * (1 + len(regions))
        image_masks = [np.ones((height, width), dtype=bool)] + masks
        return {"segments": segments, "images": images, "image_masks": image_masks, "source": self.name}


def read_referring(coco_json, image_folder, *, streaming: bool = False, **kwargs):
    """COCO instances (RLE / polygon segmentations) -> referring SFT samples with region masks.

    Returns a map-style `ReferringDataset`, or its sharded streaming view with ``streaming=True``.
    kwargs: max_regions (15), turns_fn, name ("referring"), seed, on_error, max_images, processor, max_length;
    with streaming also the sharding args (shuffle, split, shard_by_rank, rank, world_size, ...).
    """
    stream_keys = ("shuffle", "shuffle_buffer", "split", "shard_by_rank", "rank", "world_size", "chunk_size")
    stream_kwargs = {k: kwargs.pop(k) for k in stream_keys if k in kwargs}
    dataset = ReferringDataset(coco_json, image_folder, **kwargs)
    return dataset.streaming(**stream_kwargs) if streaming else dataset
