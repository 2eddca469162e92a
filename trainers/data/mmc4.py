"""MMC4 interleaved documents (reference §6.2) as a streaming source.

Input: jsonl documents (``.jsonl``, ``.jsonl.gz`` / ``.bz2`` / ``.xz`` or ``.zip`` archives of jsonl, as MMC4
ships them; a directory or glob of those; read line by line through fsspec) with ``text_list`` (sentences) and
``image_info`` (``image_name``, ``matched_text_index``, ``matched_sim``); images in a folder or in tar shards
(`ImageStore`). Not through `datasets`' json loader: a document that does not fit the Arrow schema (or one bad
line) must be one skipped record naming its file and line, not a failed file.

Per document, as the original:
1. keep the images with ``matched_sim >= sim_threshold`` (0.24) whose file exists; the file is ``image_name``
   itself or, the original's convention, its first 12 characters + ".jpg";
2. no image left -> drop the document (``dropped["no_images"]``);
3. shuffle the images and keep (load) at most ``max_images`` (6) of them, then restore sentence order;
4. single-image documents are dropped with probability 0.5 (``dropped["single_image"]``);
5. each image goes right before (p = 0.5) or right after its matched sentence; sentences are joined with single
   spaces, no space next to an image marker, and ``</s>`` is appended (the processor adds ``<s>``).
The result is one supervised segment. Differences: images whose files are missing or corrupt are dropped one by
one (as the original) but also counted in ``skipped`` with a warning (``on_error="raise"`` raises on the first);
``subsample_images=False`` makes a document with more than ``max_images`` usable images bad input
("too_many_images") instead of subsampling it.
"""

from __future__ import annotations

import json
import math

from ...modeling.prompts import EOS, IMAGE_MARKER
from ._common import JSONL_SUFFIXES, BadSample, expand_paths, make_sample
from .images import ImageStore
from .sources import StreamingSource

MMC4_SIM_THRESHOLD = 0.24
MMC4_MAX_IMAGES = 6


def mmc4_image_names(image_name: str) -> list[str]:
    """Candidate files of an MMC4 ``image_name``: the exact name, then its first 12 characters + ".jpg"."""
    return list(dict.fromkeys([image_name, image_name[:12] + ".jpg"]))


def join_interleaved(items: list[str]) -> str:
    """Join text pieces with single spaces; `IMAGE_MARKER` items are attached without spaces."""
    out, prev_text = [], False
    for item in items:
        if item == IMAGE_MARKER:
            out.append(item)
            prev_text = False
            continue
        item = item.strip()
        if item:
            out.append((" " if prev_text else "") + item)
            prev_text = True
    return "".join(out)


class MMC4Dataset(StreamingSource):
    """Streaming MMC4 reader; see the module docstring. Shards are the jsonl files (one unit per file)."""

    def __init__(
        self,
        documents,
        images,
        *,
        sim_threshold: float = MMC4_SIM_THRESHOLD,
        max_images: int = MMC4_MAX_IMAGES,
        subsample_images: bool = True,
        image_before_prob: float = 0.5,
        single_image_drop_prob: float = 0.5,
        name: str = "mmc4",
        **kwargs,
    ):
        super().__init__(max_images=max_images, **kwargs)
        self.files = expand_paths(documents, (*JSONL_SUFFIXES, ".zip"))
        self.store = images if isinstance(images, ImageStore) else ImageStore(images)
        self.sim_threshold = float(sim_threshold)
        self.subsample_images = subsample_images
        self.image_before_prob = float(image_before_prob)
        self.single_image_drop_prob = float(single_image_drop_prob)
        self.name = name
        self._init_stream()

    def _units(self) -> list:
        return list(self.files)

    def _iter_unit(self, path):
        yield from self._lines(path)

    @staticmethod
    def _parse(line: str) -> tuple[list[str], list[tuple[int, int, str, float]]]:
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as err:
            raise BadSample("bad_record", f"not valid JSON ({err})") from None
        if not isinstance(doc, dict):
            raise BadSample("bad_record", "a document must be a JSON object")
        texts, infos = doc.get("text_list"), doc.get("image_info", [])
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise BadSample("bad_record", "'text_list' must be a list of strings")
        if not isinstance(infos, list):
            raise BadSample("bad_record", "'image_info' must be a list")
        images = []
        for k, info in enumerate(infos):
            name = info.get("image_name") if isinstance(info, dict) else None
            index = info.get("matched_text_index") if isinstance(info, dict) else None
            sim = info.get("matched_sim") if isinstance(info, dict) else None
            if not isinstance(name, str) or not name:
                raise BadSample("bad_record", f"image_info[{k}] has no 'image_name'")
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(texts):
                raise BadSample(
                    "bad_record", f"image_info[{k}] ({name}): matched_text_index {index!r} is not in [0, {len(texts)})"
                )
            if isinstance(sim, bool) or not isinstance(sim, (int, float)) or not math.isfinite(sim):
                raise BadSample("bad_record", f"image_info[{k}] ({name}): matched_sim {sim!r} is not a number")
            images.append((index, k, name, float(sim)))
        return texts, images

    def _build(self, line, rng, where):
        texts, infos = self._parse(line)
        candidates = []
        for index, k, name, sim in infos:
            if sim < self.sim_threshold:
                continue
            names = mmc4_image_names(name)
            if self.store.find(names) is None:
                self._report(BadSample("missing_image", f"image file {' or '.join(names)} not found"), where)
                continue
            candidates.append((index, k, names))
        if not candidates:
            self._dropped["no_images"] += 1
            return None
        if len(candidates) > self.max_images and not self.subsample_images:
            raise BadSample(
                "too_many_images", f"{len(candidates)} usable images, more than max_images={self.max_images}"
            )
        kept = []
        for j in rng.permutation(len(candidates)):
            if len(kept) == self.max_images:
                break
            index, k, names = candidates[j]
            try:
                image, _ = self.store.load(names)
            except BadSample as bad:
                self._report(bad, where)
                continue
            kept.append((index, k, image))
        if not kept:
            self._dropped["no_images"] += 1
            return None
        if len(kept) == 1 and rng.random() < self.single_image_drop_prob:
            self._dropped["single_image"] += 1
            return None
        kept.sort(key=lambda item: item[:2])
        before = rng.random(len(kept)) < self.image_before_prob
        items, images = [], []
        for i, sentence in enumerate(texts):
            mine = [(image, b) for (index, _, image), b in zip(kept, before) if index == i]
            for image, b in mine:
                if b:
                    items.append(IMAGE_MARKER)
                    images.append(image)
            items.append(sentence)
            for image, b in mine:
                if not b:
                    items.append(IMAGE_MARKER)
                    images.append(image)
        return make_sample(join_interleaved(items) + EOS, images, source=self.name)


def read_mmc4(jsonl_or_dir, images_dir_or_tar, **kwargs) -> MMC4Dataset:
    """MMC4 documents -> a streaming `MMC4Dataset` of pretraining samples (one supervised segment each).

    Args:
        jsonl_or_dir: a jsonl / jsonl.gz / zip file, a directory or glob of them, or a list.
        images_dir_or_tar: an image folder, a tar file, a list / glob of tar files, or a folder of tars.
        sim_threshold (0.24), max_images (6), subsample_images (True), image_before_prob (0.5),
        single_image_drop_prob (0.5), name ("mmc4"), and the `StreamingSource` args (seed, shuffle, split,
        shard_by_rank, rank, world_size, on_error, processor, max_length).
    """
    return MMC4Dataset(jsonl_or_dir, images_dir_or_tar, **kwargs)
