"""LLaVA instruction data (LLaVA-v1.5 mix665k JSON) -> DEEM SFT samples (reference §3.4, §6.5).

Records: ``{"id", "image": "coco/train2017/x.jpg" (or a list of paths; absent for text-only items),
"conversations": [{"from": "human", "value": "<image>\\nWhat ...?"}, {"from": "gpt", "value": "..."}, ...]}``.
The JSON is loaded into a `datasets.Dataset` (Arrow: one shared, memory-efficient copy for all DataLoader
workers; plain `json` when `datasets` cannot type the file) and indexed per sample.

``multi_turn="split"`` (default, the original): every human/gpt pair becomes its own sample with the image, in
the VQA SFT template (``prompts.TEMPLATES["vqa_sft"]``): prompt "{system} ## USER: Based on the image, please
answer the question. <image>{question}\\n ## ASSISTANT:  The answer is" (unsupervised), target " {answer}</s>"
(supervised); the ``<image>`` markers of the question are removed, as the original's converted data did.
``multi_turn="keep"``: one sample per record in the chat layout of `DeemProcessor`'s chat template
(" ## USER: {turn}\\n ## ASSISTANT: {answer}</s>" ...), ``<image>`` kept where the record has it (or put in front of
the first turn), every assistant answer supervised.
Text-only records are dropped (``dropped["text_only"]``) as the original's conversion script did, unless
``keep_text_only=True``.
"""

from __future__ import annotations

import numpy as np
from transformers.utils import logging

from ...modeling.prompts import EOS, IMAGE_MARKER, SYSTEM_PROMPT, format_prompt, sft_target
from ._common import BadSample, load_json_file
from .images import ImageStore
from .sources import MapSource

logger = logging.get_logger("deem.trainers.data")  # transformers' logging, one name for the readers
MULTI_TURN = ("split", "keep")
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def _load_records(path: str, use_datasets: bool, cache_dir: str | None = None):
    """The records of a LLaVA JSON list: `datasets`' json loader (Arrow; plain or compressed), else fsspec + json."""
    if use_datasets:
        try:
            import datasets

            return datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=cache_dir)
        except Exception as err:  # noqa: BLE001 - any typing / loading failure falls back to plain json
            logger.info("datasets could not load %s (%s); reading it with json", path, err)
    records = load_json_file(path)
    if not isinstance(records, list):
        raise ValueError(f"{path}: a LLaVA file is a JSON list of records")
    return records


def _turns(conversations) -> list[tuple[str, str]]:
    """(user text, assistant text) pairs; `BadSample` unless roles alternate user, assistant."""
    if not isinstance(conversations, list) or not conversations or len(conversations) % 2:
        raise BadSample("bad_record", "'conversations' must be a non-empty list of user/assistant pairs")
    pairs = []
    for k in range(0, len(conversations), 2):
        msgs = conversations[k : k + 2]
        roles = [_ROLES.get(m.get("from")) if isinstance(m, dict) else None for m in msgs]
        values = [m.get("value") if isinstance(m, dict) else None for m in msgs]
        if roles != ["user", "assistant"] or not all(isinstance(v, str) for v in values):
            raise BadSample("bad_record", f"turn {k // 2}: expected a human then a gpt message with string values")
        pairs.append((values[0], values[1]))
    return pairs


class LlavaDataset(MapSource):
    """Map-style LLaVA SFT samples; see the module docstring."""

    def __init__(
        self,
        json_path,
        images,
        *,
        multi_turn: str = "split",
        keep_text_only: bool = False,
        use_datasets: bool = True,
        cache_dir: str | None = None,
        name: str = "llava",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if multi_turn not in MULTI_TURN:
            raise ValueError(f"multi_turn must be one of {MULTI_TURN}, got {multi_turn!r}")
        self.path, self.multi_turn, self.keep_text_only, self.name = str(json_path), multi_turn, keep_text_only, name
        self.records = _load_records(json_path, use_datasets, cache_dir)
        self.store = images if isinstance(images, ImageStore) else ImageStore(images)
        columns = (
            (
                self.records["image"] if "image" in self.records.column_names else [None] * len(self.records),
                self.records["conversations"],
            )
            if not isinstance(self.records, list)
            else (
                [r.get("image") if isinstance(r, dict) else None for r in self.records],
                [r.get("conversations") if isinstance(r, dict) else None for r in self.records],
            )
        )
        record_idx, turn_idx = [], []
        for i, (image, conversations) in enumerate(zip(*columns)):
            if not image and not keep_text_only:
                self._dropped["text_only"] += 1
                continue
            n = max(1, len(conversations) // 2) if isinstance(conversations, list) and multi_turn == "split" else 1
            record_idx += [i] * n
            turn_idx += range(n) if multi_turn == "split" else [-1]
        self._record_idx = np.asarray(record_idx, dtype=np.int64)
        self._turn_idx = np.asarray(turn_idx, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._record_idx)

    def _where(self, i: int) -> str:
        r, t = int(self._record_idx[i]), int(self._turn_idx[i])
        return f"{self.path}: record {r}" + (f" turn {t}" if t >= 0 else "")

    def _build_item(self, i, rng):
        record = self.records[int(self._record_idx[i])]
        if not isinstance(record, dict):
            raise BadSample("bad_record", "a record must be a JSON object")
        turns = _turns(record.get("conversations"))
        paths = record.get("image")
        paths = [] if not paths else [paths] if isinstance(paths, str) else paths
        if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
            raise BadSample("bad_record", f"'image' must be a path or a list of paths, got {record.get('image')!r}")
        n_markers = sum(q.count(IMAGE_MARKER) + a.count(IMAGE_MARKER) for q, a in turns)
        if any(IMAGE_MARKER in a for _, a in turns):
            raise BadSample("bad_record", f"an answer contains {IMAGE_MARKER}")
        if n_markers > max(len(paths), 1):
            raise BadSample(
                "too_many_images" if len(paths) else "bad_record",
                f"{n_markers} {IMAGE_MARKER} markers for {len(paths)} image(s)",
            )
        images = [self.store.load(p)[0] for p in paths]
        if self.multi_turn == "split":
            question, answer = turns[int(self._turn_idx[i])]
            question = question.replace(IMAGE_MARKER, "").strip()
            prompt = format_prompt("vqa_sft", question=question)
            prompt = prompt.replace(IMAGE_MARKER, IMAGE_MARKER * len(images))
            segments = [
                {"text": prompt, "supervise": False},
                {"text": sft_target("vqa_sft", answer=answer.strip()), "supervise": True},
            ]
        else:
            if images and n_markers == 0:
                turns[0] = (IMAGE_MARKER * len(images) + "\n" + turns[0][0], turns[0][1])
            elif n_markers != len(images):
                raise BadSample("bad_record", f"{n_markers} {IMAGE_MARKER} markers for {len(images)} image(s)")
            segments = []
            for k, (question, answer) in enumerate(turns):
                head = SYSTEM_PROMPT if k == 0 else ""
                segments.append({"text": f"{head} ## USER: {question}\n ## ASSISTANT:", "supervise": False})
                segments.append({"text": f" {answer.strip()}{EOS}", "supervise": True})
        return {"segments": segments, "images": images, "image_masks": None, "source": self.name}


def read_llava(json_path, image_folder, *, streaming: bool = False, **kwargs):
    """LLaVA conversations JSON -> DEEM SFT samples: a map-style `LlavaDataset` (or its sharded streaming view).

    kwargs: multi_turn ("split" | "keep"), keep_text_only (False), use_datasets (True), cache_dir (the `datasets`
    cache for the Arrow copy; default: the HF datasets cache), name ("llava"), seed,
    on_error, max_images, processor, max_length; with streaming also the sharding args.
    """
    stream_keys = ("shuffle", "shuffle_buffer", "split", "shard_by_rank", "rank", "world_size", "chunk_size")
    stream_kwargs = {k: kwargs.pop(k) for k in stream_keys if k in kwargs}
    dataset = LlavaDataset(json_path, image_folder, **kwargs)
    return dataset.streaming(**stream_kwargs) if streaming else dataset
