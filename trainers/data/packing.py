"""Packing documents into rows of at most ``max_length`` tokens (reference §6.4, simplified).

Each document (a sample) is ``<s> ... </s>``. The packer encodes every document once (`encode_samples`: token
ids + supervised flags, one batched tokenizer call per ``encode_batch`` documents, images not processed) and packs
on those ids: a row is the concatenation of its documents' ids (each opening with its own ``<s>``). Rows carry
``input_ids`` / ``supervised`` (what the collator pads, no tokenisation there) and, for reading, the same row as
text ``segments`` (the second and later documents after a literal ``<s>``; the processor gives that text the same
ids, since it tokenises the text between special tokens / image markers piece by piece).

Rules:
- A document is cut only right before an image (its ``<|startofimage|>``), never inside an image's
  placeholders, and text is never cut: the pieces between cuts are the document's "atoms" (the text before
  the first image, then each image with the text after it).
- ``split_to_fill=True`` (default, like the original's buffer that cuts at 2048): a row is filled atom by atom;
  when the next atom does not fit, the row is closed and the document continues in the next row (which starts
  with ``<s>`` and, usually, that image: as the first element of its row it gets no text loss on its
  ``<|startofimage|>`` and no NIP loss, the model's rule). ``split_to_fill=False``: a document that fits in a row
  is never split; it starts a new row when the current one is too full; only longer documents are split.
- ``max_images`` (default 15, the original's limit per row; None: no limit) closes a row before it would exceed
  that many images. Keep it below the model's ``cross_attention_config.max_num_images`` (50; 8 in tiny configs).
- Rows without any image are dropped when ``drop_text_only`` (pretraining; ``dropped["text_only_row"]``).
- A document with an atom that cannot fit in a row by itself (too much text between two images, or around an
  image) is bad input ("too_long"): skipped and counted, or `DataError` with ``on_error="raise"``.
Differences from the original: no mid-text cuts (it cut at exactly 2048 and could drop the trailing image's
placeholders back into the buffer); every row starts with ``<s>``; the "few-shot" pair grouping (a no-op
there, bug B4) is not reproduced.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from ...modeling.prompts import IMAGE_MARKER
from ._common import BadSample, ErrorPolicy, validate_sample
from ._iterable import DeemIterableDataset, ExamplesWrapper
from .encoding import encode_samples
from .sources import MapSource, SampleList

BOS_TEXT = "<s>"
MAX_IMAGES_PER_ROW = 15  # the original's max_num_images_per_seq; the model needs < cross_attention max_num_images


def _atoms(sample: dict, processor) -> list[dict]:
    """Split an encoded sample before each image: [{"pieces": [(text, sup)], "ids", "sup", "images", "masks",
    "length"}]; the first atom is the text after ``<s>`` up to the first image (its ``<s>`` is the row's)."""
    ids, sup = sample["input_ids"], sample["supervised"]
    soi = [p for p, t in enumerate(ids) if t == processor.soi_token_id]
    bounds = [1] + soi + [len(ids)]
    masks = sample.get("image_masks")
    atoms = []
    for k in range(len(bounds) - 1):
        a, b = bounds[k], bounds[k + 1]
        atoms.append(
            {
                "pieces": [],
                "ids": ids[a:b],
                "sup": sup[a:b],
                "images": [sample["images"][k - 1]] if k else [],
                "masks": [masks[k - 1] if masks is not None else None] if k else [],
                "length": b - a,
            }
        )
    k = 0
    for seg in sample["segments"]:
        parts = seg["text"].split(IMAGE_MARKER)
        for j, part in enumerate(parts):
            if j > 0:
                k += 1
                atoms[k]["pieces"].append((IMAGE_MARKER, seg["supervise"]))
            if part:
                atoms[k]["pieces"].append((part, seg["supervise"]))
    if atoms[0]["length"] == 0 and len(atoms) > 1:  # the document opens with an image
        first = atoms.pop(0)
        atoms[0]["pieces"] = first["pieces"] + atoms[0]["pieces"]
    return atoms


class _Row:
    def __init__(self, bos_id: int):
        self.pieces, self.images, self.masks, self.sources, self.length = [], [], [], [], 0
        self.ids, self.sup, self.bos_id = [], [], bos_id

    def add(self, atom: dict, opens_document: bool) -> None:
        if opens_document or not self.pieces:
            if self.pieces:
                self.pieces.append((BOS_TEXT, False))
            self.ids.append(self.bos_id)
            self.sup.append(False)
            self.length += 1
        self.pieces += atom["pieces"]
        self.ids += atom["ids"]
        self.sup += atom["sup"]
        self.images += atom["images"]
        self.masks += atom["masks"]
        self.length += atom["length"]

    def cost(self, atom: dict, opens_document: bool) -> int:
        return atom["length"] + (1 if opens_document or not self.pieces else 0)

    def sample(self) -> dict:
        segments = []
        for text, sup in self.pieces:
            if segments and segments[-1]["supervise"] == sup:
                segments[-1]["text"] += text
            else:
                segments.append({"text": text, "supervise": sup})
        masks = None if all(m is None for m in self.masks) else list(self.masks)
        sources = list(dict.fromkeys(self.sources))
        return {
            "segments": segments,
            "images": list(self.images),
            "image_masks": masks,
            "source": "+".join(sources),
            "input_ids": list(self.ids),
            "supervised": list(self.sup),
        }


class SamplePacker(ErrorPolicy):
    """Packs a stream of samples into rows; see the module docstring. `pack(samples)` yields packed samples."""

    def __init__(
        self,
        processor,
        max_length: int = 2048,
        *,
        max_images: int | None = MAX_IMAGES_PER_ROW,
        drop_text_only: bool = True,
        split_to_fill: bool = True,
        on_error: str = "skip",
        encode_batch: int = 64,
    ):
        self._init_policy(on_error)
        if encode_batch < 1:
            raise ValueError(f"encode_batch must be >= 1, got {encode_batch}")
        self.encode_batch = int(encode_batch)
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        self.processor, self.max_length, self.max_images = processor, int(max_length), max_images
        self.drop_text_only, self.split_to_fill = drop_text_only, split_to_fill

    def _fits(self, row: _Row, atom: dict, opens: bool) -> bool:
        if row.length + row.cost(atom, opens) > self.max_length:
            return False
        return self.max_images is None or len(row.images) + len(atom["images"]) <= self.max_images

    def _close(self, row: _Row):
        if not row.pieces:
            return None
        if self.drop_text_only and not row.images:
            self._dropped["text_only_row"] += 1
            return None
        return row.sample()

    def _encoded(self, samples: Iterable[dict]) -> Iterator[tuple[dict, str]]:
        """Validated samples with their ids, encoded ``encode_batch`` at a time (one tokenizer call each)."""
        chunk = []

        def flush():
            try:
                encode_samples(self.processor, [sample for sample, _ in chunk])
            except BadSample:  # one bad text: encode one by one to find it
                for sample, where in chunk:
                    try:
                        encode_samples(self.processor, [sample])
                    except BadSample as bad:
                        self._report(bad, where)
            for sample, where in chunk:
                if "input_ids" in sample:
                    yield sample, where
            chunk.clear()

        for n, sample in enumerate(samples):
            if sample is None:
                continue
            where = f"packing: sample {n} (source {sample.get('source', '?') if isinstance(sample, dict) else '?'})"
            try:
                validate_sample(sample)
            except BadSample as bad:
                self._report(bad, where)
                continue
            chunk.append((dict(sample), where))
            if len(chunk) >= self.encode_batch:
                yield from flush()
        yield from flush()

    def pack(self, samples: Iterable[dict]) -> Iterator[dict]:
        bos = self.processor.tokenizer.bos_token_id
        row = _Row(bos)
        for sample, where in self._encoded(samples):
            try:
                atoms = _atoms(sample, self.processor)
                for atom in atoms:
                    if atom["length"] + 1 > self.max_length:
                        raise BadSample(
                            "too_long",
                            f"{atom['length'] + 1} tokens between two image boundaries, more than "
                            f"max_length={self.max_length} (a document is only cut before an image)",
                        )
                    if self.max_images is not None and len(atom["images"]) > self.max_images:
                        raise BadSample("too_many_images", f"more than max_images={self.max_images} images")
            except BadSample as bad:
                self._report(bad, where)
                continue
            whole = 1 + sum(a["length"] for a in atoms)
            doc = {"length": whole, "images": [i for a in atoms for i in a["images"]]}
            if (
                not self.split_to_fill
                and whole <= self.max_length
                and (self.max_images is None or len(doc["images"]) <= self.max_images)
            ):
                if not self._fits(row, {"length": whole - 1, "images": doc["images"]}, True):
                    out = self._close(row)
                    if out is not None:
                        yield out
                    row = _Row(bos)
                for k, atom in enumerate(atoms):
                    row.add(atom, k == 0)
                row.sources.append(sample.get("source", "unknown"))
                continue
            for k, atom in enumerate(atoms):
                opens = k == 0
                if not self._fits(row, atom, opens):
                    if row.pieces and not opens:  # cut before this image: no trailing space before the cut
                        text, sup = row.pieces[-1]
                        row.pieces[-1] = (text.rstrip(), sup)
                    out = self._close(row)
                    if out is not None:
                        yield out
                    row = _Row(bos)
                row.add(atom, opens)
                if sample.get("source") not in row.sources:
                    row.sources.append(sample.get("source", "unknown"))
        out = self._close(row)
        if out is not None:
            yield out


def pack_samples(
    samples: Iterable[dict],
    processor,
    max_length: int = 2048,
    *,
    max_images: int | None = MAX_IMAGES_PER_ROW,
    drop_text_only: bool = True,
    split_to_fill: bool = True,
    on_error: str = "skip",
    encode_batch: int = 64,
) -> Iterator[dict]:
    """Pack `samples` into rows of at most `max_length` tokens (generator); see the module docstring."""
    packer = SamplePacker(
        processor,
        max_length,
        max_images=max_images,
        drop_text_only=drop_text_only,
        split_to_fill=split_to_fill,
        on_error=on_error,
        encode_batch=encode_batch,
    )
    yield from packer.pack(samples)


class PackedExamples(ExamplesWrapper):
    """The packer over a source's examples iterable (rows close where the wrapped stream ends: per worker)."""

    def __init__(self, ex_iterable, packer: SamplePacker):
        super().__init__(ex_iterable)
        self.packer = packer

    def _like(self, ex_iterable) -> PackedExamples:
        return PackedExamples(ex_iterable, self.packer)

    def __iter__(self):
        for n, row in enumerate(self.packer.pack(example for _, example in self.ex_iterable)):
            yield n, row


def as_stream(source, what: str) -> DeemIterableDataset:
    """`source` as one of this package's `datasets.IterableDataset`s: readers and views as they are, a map-style
    reader through its `streaming()` view, a list of samples as a `SampleList` (in order)."""
    if isinstance(source, DeemIterableDataset):
        return source
    if isinstance(source, MapSource):
        return source.streaming()
    if isinstance(source, (list, tuple)):
        return SampleList(list(source), shuffle=False)
    raise TypeError(
        f"{what} needs a deem.trainers.data streaming source (a reader, a StreamingView / SampleList, a PackedDataset"
        f" or a MixedDataset), a map-style reader, or a list of samples; got {type(source).__name__}"
    )


class PackedDataset(DeemIterableDataset, SamplePacker):
    """A streaming source packed into rows, as a `datasets.IterableDataset` (the source's shards are this one's:
    ranks and DataLoader workers split them, then each packs its own part).

    `skipped` / `dropped` add the packer's counters to the source's; `set_epoch` is passed on.
    """

    def __init__(self, source, processor, max_length: int = 2048, **kwargs):
        SamplePacker.__init__(self, processor, max_length, **kwargs)
        self.source = as_stream(source, "PackedDataset")
        self._init_iterable(PackedExamples(self.source._ex_iterable, self), self.source._distributed)

    def _children(self) -> tuple:
        return (self.source,)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.source.set_epoch(epoch)
