"""`DeemDataCollator`: samples -> a batch of tensors for ``model(**batch)``.

Per sample: the segments' texts are joined and encoded by the `DeemProcessor` (``<s>`` prepended, every
``<image>`` -> ``<|startofimage|>`` + N placeholders), its images become the encoder view ``pixel_values`` and the
decoder view ``pixel_values_decoder`` (and its region masks ``image_masks``) with ONE random horizontal flip per
image shared by both views and the mask when ``train_transforms`` (the original flipped the two views
independently, bug B5).

Labels (unshifted, HF convention; the model shifts): the rules of §4.1 as `default_labels`: -100 on padding,
image placeholders, ``<s>``, and a ``<|startofimage|>`` right after ``<s>``; then -100 on every token of the
unsupervised segments. A segment boundary inside text is placed where the tokenisation of the text before it
stops agreeing with the tokenisation of the whole row (the original tokenised the prompt alone and took its
length); a token that merges text across the boundary counts as supervised.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ._common import BadSample, DataError, ErrorPolicy, make_rng, sample_text, tokenize_text, validate_sample


class DeemDataCollator(ErrorPolicy):
    """Collate DEEM samples (see `deem.trainers.data`) into model inputs.

    Args:
        processor: a `DeemProcessor`.
        max_length: rows longer than this are bad input ("too_long").
        padding_side: "right" (training, the original) or "left".
        train_transforms: random horizontal flip (p = `flip_prob`), shared by the encoder view, the decoder view
            and the mask of an image. Set False for the SFT stages (the original's sft_vqa / sft_referring
            configs flip nothing: answers may talk about left and right).
        seed: seeds the flips (mixed with the rank and DataLoader worker); None uses torch's global generator.
        on_error: "skip" (drop the sample from the batch, count it in `skipped`, warn) or "raise" (`DataError`).
        center_crop: the §6.1 centre-crop resize (stage-1 pretraining: True); None keeps the image processor's
            setting.
        max_images: samples with more images are bad input ("too_many_images").
        return_decoder_view: None keeps the image processor's setting.
    Returns a dict: input_ids, attention_mask, labels [B, L]; num_images [B]; pixel_values [N, 3, S, S] and
    pixel_values_decoder [N, 3, D, D] when the batch has images; image_masks [N, 1, S, S] when any sample has
    masks (all ones for images without). Raises `DataError` when every sample of a batch is bad.
    """

    def __init__(
        self,
        processor,
        max_length: int = 2048,
        padding_side: str = "right",
        train_transforms: bool = True,
        seed: int | None = None,
        on_error: str = "skip",
        *,
        center_crop: bool | None = None,
        flip_prob: float = 0.5,
        max_images: int | None = None,
        return_decoder_view: bool | None = None,
    ):
        self._init_policy(on_error)
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.processor, self.max_length, self.padding_side = processor, int(max_length), padding_side
        self.train_transforms, self.seed, self.center_crop = train_transforms, seed, center_crop
        self.flip_prob, self.max_images, self.return_decoder_view = float(flip_prob), max_images, return_decoder_view
        tok = processor.tokenizer
        self.bos_id, self.pad_id = tok.bos_token_id, tok.pad_token_id
        if self.pad_id is None:
            raise ValueError("the tokenizer has no pad token; call deem.prepare_tokenizer(tokenizer)")
        self.soi_id, self.image_id = processor.soi_token_id, processor.image_token_id
        self._generator, self._generator_pid = None, None
        self.calls = 0

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_generator"], state["_generator_pid"] = None, None
        return state

    def generator(self) -> torch.Generator | None:
        """The flip generator of this process / worker (seeded from (seed, rank, worker)); None without a seed."""
        if self.seed is None:
            return None
        if self._generator is None or self._generator_pid != os.getpid():
            info = torch.utils.data.get_worker_info()
            worker = info.id if info is not None else 0
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
            rank = torch.distributed.get_rank() if distributed else 0
            seed = int(make_rng(self.seed, rank, worker).integers(1 << 62))
            self._generator, self._generator_pid = torch.Generator().manual_seed(seed), os.getpid()
        return self._generator

    # ---------------------------------------------------------------- labels

    def labels_for(self, ids: list[int], sample: dict) -> list[int]:
        """Unshifted labels of one unpadded row: §4.1 rules, then -100 on unsupervised segments."""
        labels = list(ids)
        for t, tok in enumerate(ids):
            prev = ids[t - 1] if t > 0 else None
            if tok in (self.image_id, self.bos_id) or (tok == self.soi_id and prev == self.bos_id):
                labels[t] = -100
        merged = []
        for seg in sample["segments"]:
            if merged and merged[-1][1] == seg["supervise"]:
                merged[-1][0] += seg["text"]
            else:
                merged.append([seg["text"], seg["supervise"]])
        if all(sup for _, sup in merged):
            return labels
        start, prefix = 0, ""
        for k, (text, sup) in enumerate(merged):
            if k + 1 < len(merged):
                prefix += text
                before = tokenize_text(self.processor, prefix)
                end = 0
                while end < min(len(before), len(ids)) and before[end] == ids[end]:
                    end += 1
            else:
                end = len(ids)
            if not sup:
                labels[start:end] = [-100] * (end - start)
            start = max(start, end)
        return labels

    # ---------------------------------------------------------------- encoding

    def _encode(self, sample: dict, with_masks: bool) -> dict:
        validate_sample(sample, self.max_images)
        text = sample_text(sample)
        ids = tokenize_text(self.processor, text)
        if len(ids) > self.max_length:
            raise BadSample("too_long", f"{len(ids)} tokens, more than max_length={self.max_length}")
        images = sample["images"]
        row = {"ids": ids, "labels": self.labels_for(ids, sample), "num_images": len(images)}
        if images:
            masks = sample.get("image_masks")
            if with_masks and masks is None:
                masks = [None] * len(images)
            kwargs = {"do_flip": bool(self.train_transforms), "flip_prob": self.flip_prob}
            if self.center_crop is not None:
                kwargs["do_center_crop"] = self.center_crop
            if self.return_decoder_view is not None:
                kwargs["return_decoder_view"] = self.return_decoder_view
            try:
                out = self.processor.image_processor(
                    images,
                    image_masks=[None if m is None else np.asarray(m) for m in masks] if with_masks else None,
                    generator=self.generator(),
                    return_tensors="pt",
                    **kwargs,
                )
            except (ValueError, TypeError) as err:
                raise BadSample("mask_mismatch" if "mask" in str(err) else "bad_record", str(err)) from None
            row.update(out)
        return row

    def __call__(self, samples: list[dict]) -> dict:
        self.calls += 1
        samples = [s for s in samples if s is not None]
        with_masks = any(isinstance(s, dict) and s.get("image_masks") is not None for s in samples)
        rows = []
        for n, sample in enumerate(samples):
            try:
                rows.append(self._encode(sample, with_masks))
            except BadSample as bad:
                source = sample.get("source", "?") if isinstance(sample, dict) else "?"
                self._report(bad, f"collator: batch {self.calls}, sample {n} (source {source})")
        if not rows:
            raise DataError(
                f"collator: every sample of batch {self.calls} ({len(samples)} given) was bad; skipped so far: "
                f"{dict(self.skipped)}",
                "bad_record",
            )
        width = max(len(r["ids"]) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["ids"])
            cols = slice(0, n) if self.padding_side == "right" else slice(width - n, width)
            input_ids[i, cols] = torch.tensor(r["ids"], dtype=torch.long)
            attention_mask[i, cols] = 1
            labels[i, cols] = torch.tensor(r["labels"], dtype=torch.long)
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "num_images": torch.tensor([r["num_images"] for r in rows], dtype=torch.long),
        }
        for key in ("pixel_values", "pixel_values_decoder", "image_masks"):
            parts = [r[key] for r in rows if key in r]
            if parts:
                batch[key] = torch.cat(parts)
        return batch
