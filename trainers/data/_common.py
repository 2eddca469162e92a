"""Shared pieces of the data package: the sample contract, the bad-input policy, seeding, file access.

A sample is a plain dict::

    {"segments": [{"text": str, "supervise": bool}, ...],   # joined in order; one "<image>" marker per image
     "images": [PIL.Image.Image (RGB), ...],
     "image_masks": [np.ndarray (H, W) bool | None, ...] | None,
     "source": str}

Bad input (missing / corrupt images, too many images, over-long text, masks of the wrong shape, malformed
records) never crashes deep inside the model: every reader, the packer and the collator take
``on_error="skip"`` (drop the record, count it in ``obj.skipped[reason]`` and log a warning carrying the count)
or ``on_error="raise"`` (a `DataError`, a `ValueError`, naming the file / record and the problem). Records that a
sampling rule of the original removes on purpose (MMC4 documents without images, half of the single-image ones,
LLaVA text-only items, ...) are not errors: they are counted in ``obj.dropped[rule]`` without a warning.
"""

from __future__ import annotations

import glob
import io
import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import fsspec
import numpy as np
import PIL.Image
from transformers.utils import logging

from ...modeling.prompts import IMAGE_MARKER

logger = logging.get_logger("deem.trainers.data")  # transformers' logging, one name for the readers

ON_ERROR = ("skip", "raise")
SKIP_REASONS = ("missing_image", "corrupt_image", "too_many_images", "too_long", "mask_mismatch", "bad_record")
_WARN_FIRST = 10  # warnings for the first N skips of a reason, then at every power of two


class DataError(ValueError):
    """A bad record with ``on_error="raise"``: the message names the file / record, the problem and the reason."""

    def __init__(self, message: str, reason: str = "bad_record"):
        super().__init__(message)
        self.reason = reason


class BadSample(Exception):
    """Raised inside the package for a bad record; turned into a skip or a `DataError` by `ErrorPolicy`."""

    def __init__(self, reason: str, message: str):
        if reason not in SKIP_REASONS:
            raise AssertionError(f"unknown skip reason {reason!r}")
        super().__init__(message)
        self.reason = reason
        self.message = message


class ErrorPolicy:
    """``skipped`` (bad input, by reason) and ``dropped`` (sampling rules, by rule) counters plus the policy."""

    def _init_policy(self, on_error: str) -> None:
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.on_error = on_error
        self._skipped: Counter = Counter()
        self._dropped: Counter = Counter()

    def _children(self) -> tuple:
        """Wrapped data sets whose counters are added to this one's."""
        return ()

    @property
    def skipped(self) -> Counter:
        """Bad records skipped, by reason (this object's and its wrapped sources', in this process)."""
        total = Counter(self._skipped)
        for child in self._children():
            total.update(getattr(child, "skipped", {}))
        return total

    @property
    def dropped(self) -> Counter:
        """Records removed by a sampling rule, by rule (this object's and its wrapped sources')."""
        total = Counter(self._dropped)
        for child in self._children():
            total.update(getattr(child, "dropped", {}))
        return total

    def _report(self, bad: BadSample, where: str) -> None:
        """Skip (count + warn) or raise `DataError` for `bad` found at `where` (file and record)."""
        message = f"{where}: {bad.message}" if where else bad.message
        if self.on_error == "raise":
            raise DataError(f"{message} [{bad.reason}]", bad.reason) from bad
        self._skipped[bad.reason] += 1
        n = self._skipped[bad.reason]
        if n <= _WARN_FIRST or n & (n - 1) == 0:
            logger.warning(
                "%s skipped %s [%s]; %d skipped for this reason, %d in total (this process)",
                type(self).__name__,
                message,
                bad.reason,
                n,
                sum(self._skipped.values()),
            )


# ---------------------------------------------------------------- samples


def make_sample(segments, images=(), image_masks=None, source: str = "unknown") -> dict:
    """Build a sample dict; ``segments`` may be a string (one supervised segment) or (text, supervise) pairs."""
    if isinstance(segments, str):
        segments = [(segments, True)]
    segs = [s if isinstance(s, dict) else {"text": s[0], "supervise": bool(s[1])} for s in segments]
    return {
        "segments": segs,
        "images": list(images),
        "image_masks": None if image_masks is None else list(image_masks),
        "source": source,
    }


def sample_text(sample: dict) -> str:
    return "".join(seg["text"] for seg in sample["segments"])


def validate_sample(sample, max_images: int | None = None) -> None:
    """Raise `BadSample` unless `sample` follows the contract (markers = images, masks match their images)."""
    if not isinstance(sample, dict) or "segments" not in sample or "images" not in sample:
        raise BadSample("bad_record", f"not a sample dict with 'segments' and 'images': {type(sample).__name__}")
    segments = sample["segments"]
    if not isinstance(segments, (list, tuple)) or not segments:
        raise BadSample("bad_record", "a sample needs a non-empty list of segments")
    for seg in segments:
        if not (isinstance(seg, dict) and isinstance(seg.get("text"), str) and isinstance(seg.get("supervise"), bool)):
            raise BadSample("bad_record", f"a segment must be {{'text': str, 'supervise': bool}}, got {seg!r:.120}")
    images = sample["images"]
    if not isinstance(images, (list, tuple)):
        raise BadSample("bad_record", f"'images' must be a list, got {type(images).__name__}")
    n_markers = sample_text(sample).count(IMAGE_MARKER)
    if n_markers != len(images):
        raise BadSample("bad_record", f"the text has {n_markers} {IMAGE_MARKER} markers but {len(images)} images")
    if max_images is not None and len(images) > max_images:
        raise BadSample("too_many_images", f"{len(images)} images, more than the limit of {max_images}")
    for i, image in enumerate(images):
        if not isinstance(image, PIL.Image.Image):
            raise BadSample("bad_record", f"image {i} is a {type(image).__name__}, expected a PIL image")
    masks = sample.get("image_masks")
    if masks is None:
        return
    if not isinstance(masks, (list, tuple)) or len(masks) != len(images):
        raise BadSample("mask_mismatch", f"{len(masks)} image masks for {len(images)} images")
    for i, (mask, image) in enumerate(zip(masks, images)):
        if mask is None:
            continue
        shape = np.shape(mask)
        if len(shape) != 2 or shape != (image.height, image.width):
            raise BadSample(
                "mask_mismatch", f"mask {i} has shape {shape} but its image is (H, W) = {(image.height, image.width)}"
            )


# ---------------------------------------------------------------- images


def decode_image(data: bytes, where: str) -> PIL.Image.Image:
    """Decode and fully load image bytes as RGB; `BadSample("corrupt_image")` when that fails."""
    try:
        with PIL.Image.open(io.BytesIO(data)) as image:
            image.load()
            rgb = image.convert("RGB")
    except (OSError, SyntaxError, ValueError, EOFError, PIL.Image.DecompressionBombError) as err:
        raise BadSample("corrupt_image", f"cannot decode image {where}: {err}") from None
    if rgb.width < 1 or rgb.height < 1:
        raise BadSample("corrupt_image", f"image {where} is empty")
    return rgb


def read_file_bytes(path: str | os.PathLike) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise BadSample("missing_image", f"image file {path} does not exist") from None
    except OSError as err:
        raise BadSample("missing_image", f"cannot read image file {path}: {err}") from None


def expand_paths(spec, suffixes: tuple[str, ...]) -> list[str]:
    """A path, a directory (its files with one of `suffixes`, sorted, recursively), a glob, or a list of those."""
    if isinstance(spec, (str, os.PathLike)):
        spec = [spec]
    out: list[str] = []
    for item in spec:
        item = str(item)
        path = Path(item)
        if path.is_dir():
            out += sorted(str(p) for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(suffixes))
        elif any(ch in item for ch in "*?["):
            out += sorted(glob.glob(item, recursive=True))
        elif path.is_file():
            out.append(item)
        else:
            raise FileNotFoundError(f"no such file or directory: {item}")
    if not out:
        raise FileNotFoundError(f"no files ending in {suffixes} found in {spec}")
    return out


# jsonl suffixes the readers take (fsspec infers the compression of the compressed ones; .zip: its jsonl members)
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.bz2", ".jsonl.xz")


def iter_text_lines(path: str) -> Iterator[str]:
    """Lines of a .jsonl, .jsonl.gz or every .jsonl member of a .zip (the MMC4 release ships zipped jsonl).

    Read through fsspec: compression inferred from the suffix (gzip, bz2, xz, zstd, ...), zip members through its
    zip filesystem (members in sorted name order)."""
    if path.lower().endswith(".zip"):
        archive = fsspec.filesystem("zip", fo=path)
        try:
            for name in sorted(archive.find("")):
                with archive.open(name, "rt", encoding="utf-8") as member:
                    yield from member
        finally:
            archive.close()
    else:
        with fsspec.open(path, "rt", compression="infer", encoding="utf-8") as f:
            yield from f


def load_json_file(path) -> object:
    """One JSON document (plain or compressed: the compression is inferred from the suffix), through fsspec."""
    with fsspec.open(str(path), "rt", compression="infer", encoding="utf-8") as f:
        return json.load(f)


# ---------------------------------------------------------------- seeding


def make_rng(*keys: int) -> np.random.Generator:
    """A numpy Generator determined by non-negative integer keys (seed, epoch, shard, record, ...)."""
    return np.random.default_rng([int(k) % (1 << 63) for k in keys])


# ---------------------------------------------------------------- token lengths

_DUMMY_PIXEL = np.zeros((1, 1, 3), dtype=np.uint8)


def tokenize_text(processor, text: str) -> list[int]:
    """Token ids the processor gives `text` (with ``<s>``), without processing any image.

    `BadSample("bad_record")` when the processor rejects the text (e.g. a raw ``<|sniffer|>`` in it)."""
    n = text.count(IMAGE_MARKER)
    try:
        out = processor(
            text=text,
            images=[_DUMMY_PIXEL] * n if n else None,
            padding=False,
            return_tensors=None,
            size=1,
            return_decoder_view=False,
            do_flip=False,
            do_center_crop=False,
        )
    except (ValueError, TypeError) as err:
        raise BadSample("bad_record", f"the processor rejects the text: {err}") from None
    return list(out["input_ids"][0])
