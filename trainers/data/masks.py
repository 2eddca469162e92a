"""COCO segmentations -> binary masks through ``pycocotools.mask`` (what the original used), checked first.

- RLE: ``{"size": [h, w], "counts": [...] | "compressed string"}``. Runs alternate 0, 1, 0, ... starting with
  zeros, over the mask in column-major (Fortran) order. The compressed string is COCO's: each count is written in
  5-bit groups, low first, one character (value + 48) per group, bit 0x20 = more groups follow, bit 0x10 of the
  last group = sign; from the third count on, the value stored is the difference to the count two places back.
  ``pycocotools`` decodes; the counts are checked here before (it would decode a wrong sum silently).
- Polygons: a list of flat ``[x0, y0, x1, y1, ...]`` lists in pixel coordinates, rasterised by
  ``pycocotools.mask.frPyObjects`` and united (``merge``), bit for bit the original's masks. A 4-number list,
  which pycocotools would take as a box, is refused as a polygon.
"""

from __future__ import annotations

import numpy as np
from pycocotools import mask as coco_mask


class MaskError(ValueError):
    """A segmentation that cannot be decoded (bad counts, wrong size, degenerate polygon)."""


def rle_counts_from_string(counts: str | bytes) -> list[int]:
    """Decode COCO's compressed RLE string into run lengths."""
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    out: list[int] = []
    p, n = 0, len(counts)
    while p < n:
        value, shift, more = 0, 0, True
        while more:
            if p >= n:
                raise MaskError("compressed RLE string ends inside a count")
            c = ord(counts[p]) - 48
            if not 0 <= c < 64:
                raise MaskError(f"invalid character {counts[p]!r} in a compressed RLE string")
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            p += 1
            shift += 5
            if not more and c & 0x10:
                value |= -1 << shift
        if len(out) > 2:
            value += out[-2]
        out.append(value)
    return out


def rle_counts_to_string(counts: list[int]) -> str:
    """Encode run lengths as COCO's compressed RLE string (inverse of `rle_counts_from_string`)."""
    chars = []
    for i, count in enumerate(counts):
        x = int(count) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            if more:
                c |= 0x20
            chars.append(chr(c + 48))
    return "".join(chars)


def _rle_counts(rle) -> tuple[int, int, list[int]]:
    """(h, w, run lengths) of a COCO RLE dict, checked: size [h, w], non-negative counts summing to h * w."""
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise MaskError("an RLE segmentation needs 'size' and 'counts'")
    size = rle["size"]
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) and v >= 0 for v in size)):
        raise MaskError(f"RLE 'size' must be [height, width], got {size!r}")
    h, w = size
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        counts = rle_counts_from_string(counts)
    elif not isinstance(counts, (list, tuple)) or not all(type(c) is int for c in counts):
        raise MaskError("RLE 'counts' must be a list of ints or a compressed string")
    if any(c < 0 for c in counts):
        raise MaskError("RLE counts must be non-negative")
    if sum(counts) != h * w:
        raise MaskError(f"RLE counts sum to {sum(counts)} but size {h}x{w} has {h * w} pixels")
    return h, w, list(counts)


def decode_rle(rle: dict) -> np.ndarray:
    """COCO RLE dict -> bool mask (h, w), decoded by ``pycocotools.mask.decode``."""
    h, w, counts = _rle_counts(rle)
    if h * w == 0:
        return np.zeros((h, w), dtype=bool)
    raw = rle["counts"]
    if isinstance(raw, (list, tuple)):
        compact = coco_mask.frPyObjects({"size": [h, w], "counts": list(counts)}, h, w)
    else:
        compact = {"size": [h, w], "counts": raw.encode("ascii") if isinstance(raw, str) else raw}
    return coco_mask.decode(compact).astype(bool)


def encode_rle(mask: np.ndarray, compressed: bool = True) -> dict:
    """Bool mask (h, w) -> COCO RLE dict: compressed string counts (``pycocotools.mask.encode``) or a list of ints."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise MaskError(f"mask must be 2-D, got shape {mask.shape}")
    h, w = mask.shape
    if compressed and mask.size:
        rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
        return {"size": [h, w], "counts": rle["counts"].decode("ascii")}
    flat = mask.T.reshape(-1)
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    edges = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(edges).tolist() if flat.size else [0]
    if flat.size and flat[0]:
        runs = [0] + runs
    return {"size": [h, w], "counts": rle_counts_to_string(runs) if compressed else runs}


def polygons_to_mask(polygons, height: int, width: int) -> np.ndarray:
    """Union of polygons (flat x, y lists) -> bool mask (height, width), rasterised by pycocotools."""
    if not isinstance(polygons, (list, tuple)) or not polygons:
        raise MaskError("a polygon segmentation must be a non-empty list of coordinate lists")
    checked = []
    for poly in polygons:
        try:
            pts = np.asarray(poly, dtype=np.float64)
        except (TypeError, ValueError):
            raise MaskError("polygon coordinates must be numbers") from None
        if pts.ndim != 1 or pts.size < 6 or pts.size % 2 or not np.isfinite(pts).all():
            raise MaskError(f"a polygon needs at least 3 (x, y) points as a flat list, got {pts.size} numbers")
        checked.append(pts.tolist())
    if height * width == 0:
        return np.zeros((height, width), dtype=bool)
    return coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(checked, height, width))).astype(bool)


def segmentation_to_mask(segmentation, height: int, width: int) -> np.ndarray:
    """A COCO ``segmentation`` (polygon list, or RLE dict with list / string counts) -> bool mask.

    Polygons are drawn on a (height, width) canvas; an RLE must itself have size [height, width], else
    `MaskError`.
    """
    if isinstance(segmentation, dict):
        mask = decode_rle(segmentation)
        if mask.shape != (height, width):
            raise MaskError(f"RLE size {list(mask.shape)} does not match the image size [{height}, {width}]")
        return mask
    return polygons_to_mask(segmentation, height, width)
