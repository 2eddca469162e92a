"""`DeemDataCollator`: samples -> a batch of tensors for ``model(**batch)``.

Per sample: the segments' texts are joined and encoded by the `DeemProcessor` (``<s>`` prepended, every
``<image>`` -> ``<|startofimage|>`` + N placeholders), its images become the encoder view ``pixel_values`` and the
decoder view ``pixel_values_decoder`` (and its region masks ``image_masks``) with ONE random horizontal flip per
image shared by both views and the mask when ``train_transforms`` (the original flipped the two views
independently, bug B5).

Tokens: a sample that carries ``input_ids`` / ``supervised`` (every packed row does: `PackedDataset` encoded it
once) is only padded and stacked; the others are encoded here, all of a batch in one tokenizer call
(`encode_samples`). Labels (unshifted, HF convention; the model shifts) come from one function,
`deem.modeling.sequence_deem.default_labels`: the §4.1 rules (-100 on padding, image placeholders, ``<s>``, and a
``<|startofimage|>`` right after ``<s>``), -100 on the tokens of unsupervised segments (a token that merges text
across a segment boundary belongs to the later segment), and, for the sources in ``no_image_no_loss_sources``
(the original's ``dataset_to_ignore_noimage_cond_loss``, default ``("laion_en", "laion_coco")``, §4.1 rule 2 /
§8.2 B3), -100 on text that no image of its own document precedes.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import torch

from ...modeling.sequence_deem import default_labels, pad_rows
from ._common import BadSample, DataError, ErrorPolicy, make_rng, validate_sample
from .encoding import encode_samples

#: the original's ``dataset_to_ignore_noimage_cond_loss`` (its pretraining configs; inert for mmc4 / blip, B3)
NO_IMAGE_NO_LOSS_SOURCES = ("laion_en", "laion_coco")


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
        no_image_no_loss_sources: source names whose rows get the "no image, no loss" rule (a sample's
            ``source``, or any part of a packed row's "a+b"); default the original's list.
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
        no_image_no_loss_sources=NO_IMAGE_NO_LOSS_SOURCES,
    ):
        self._init_policy(on_error)
        if isinstance(no_image_no_loss_sources, str):
            no_image_no_loss_sources = [no_image_no_loss_sources]
        self.no_image_no_loss_sources = frozenset(no_image_no_loss_sources or ())
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
        self._ids = SimpleNamespace(
            image_token_id=self.image_id, bos_token_id=self.bos_id, pad_token_id=self.pad_id, soi_token_id=self.soi_id
        )
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

    def no_image_no_loss(self, sample: dict) -> bool:
        """Whether `sample`'s source is one of ``no_image_no_loss_sources``."""
        return bool(self.no_image_no_loss_sources & set(str(sample.get("source", "")).split("+")))

    def labels_for(self, ids: list[int], sample: dict) -> list[int]:
        """Unshifted labels of one unpadded encoded row (``sample["supervised"]`` when it has one)."""
        row = torch.tensor([ids], dtype=torch.long)
        supervised = sample.get("supervised")
        sup = None if supervised is None else torch.tensor([supervised], dtype=torch.bool)
        return default_labels(row, None, self._ids, sup, self.no_image_no_loss(sample))[0].tolist()

    # ---------------------------------------------------------------- encoding

    def _check_encoded(self, sample: dict) -> None:
        validate_sample(sample, self.max_images)
        ids, sup = sample.get("input_ids"), sample.get("supervised")
        if ids is None:
            return
        if sup is None or len(sup) != len(ids):
            raise BadSample("bad_record", "a sample with 'input_ids' needs 'supervised' flags of the same length")
        if sum(1 for t in ids if t == self.soi_id) != len(sample["images"]):
            raise BadSample(
                "bad_record", f"'input_ids' hold a different number of images than the {len(sample['images'])} given"
            )
        if len(ids) > self.max_length:
            raise BadSample("too_long", f"{len(ids)} tokens, more than max_length={self.max_length}")

    def _images(self, sample: dict, with_masks: bool) -> dict:
        images = sample["images"]
        if not images:
            return {}
        masks = sample.get("image_masks")
        if with_masks and masks is None:
            masks = [None] * len(images)
        kwargs = {"do_flip": bool(self.train_transforms), "flip_prob": self.flip_prob}
        if self.center_crop is not None:
            kwargs["do_center_crop"] = self.center_crop
        if self.return_decoder_view is not None:
            kwargs["return_decoder_view"] = self.return_decoder_view
        try:
            return self.processor.image_processor(
                images,
                image_masks=[None if m is None else np.asarray(m) for m in masks] if with_masks else None,
                generator=self.generator(),
                return_tensors="pt",
                **kwargs,
            )
        except (ValueError, TypeError) as err:
            raise BadSample("mask_mismatch" if "mask" in str(err) else "bad_record", str(err)) from None

    def __call__(self, samples: list[dict]) -> dict:
        self.calls += 1
        samples = [s for s in samples if s is not None]

        def where(n, s):
            source = s.get("source", "?") if isinstance(s, dict) else "?"
            return f"collator: batch {self.calls}, sample {n} (source {source})"

        checked = []
        for n, sample in enumerate(samples):
            try:
                self._check_encoded(sample)
                checked.append((n, dict(sample)))
            except BadSample as bad:
                self._report(bad, where(n, sample))
        try:
            encode_samples(self.processor, [s for _, s in checked])
        except BadSample:  # a bad text: one by one, to name it
            for n, sample in checked:
                try:
                    encode_samples(self.processor, [sample])
                except BadSample as bad:
                    self._report(bad, where(n, sample))
        with_masks = any(s.get("image_masks") is not None for _, s in checked)
        rows = []
        for n, sample in checked:
            if "input_ids" not in sample:
                continue
            try:
                self._check_encoded(sample)
                rows.append((sample, self._images(sample, with_masks)))
            except BadSample as bad:
                self._report(bad, where(n, sample))
        if not rows:
            raise DataError(
                f"collator: every sample of batch {self.calls} ({len(samples)} given) was bad; skipped so far: "
                f"{dict(self.skipped)}",
                "bad_record",
            )
        input_ids, attention_mask = pad_rows([s["input_ids"] for s, _ in rows], self.pad_id, self.padding_side)
        supervised, _ = pad_rows([[int(f) for f in s["supervised"]] for s, _ in rows], 0, self.padding_side)
        rule = torch.tensor([self.no_image_no_loss(s) for s, _ in rows], dtype=torch.bool)
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": default_labels(input_ids, attention_mask, self._ids, supervised.bool(), rule),
            "num_images": torch.tensor([len(s["images"]) for s, _ in rows], dtype=torch.long),
        }
        for key in ("pixel_values", "pixel_values_decoder", "image_masks"):
            parts = [out[key] for _, out in rows if key in out]
            if parts:
                batch[key] = torch.cat(parts)
        return batch
