"""Tokenise once: samples -> token ids + which tokens are supervised, in ONE batched tokenizer call.

`encode_samples(processor, samples)` gives each sample the ids the `DeemProcessor` gives its joined text
(``<s>`` first, every ``<image>`` -> ``<|startofimage|>`` + N placeholders, the text between special tokens /
image markers tokenised piece by piece with the same stripping rules) and a per-token ``supervised`` flag taken
from the segment the token's last character lies in (a token that merges text across a segment boundary belongs
to the later segment, as the prefix-agreement rule before it). The segment boundaries come from the fast
tokenizer's character offsets of that one call, so no prefix is tokenised again. The packer and the collator read
these ids (``sample["input_ids"]`` / ``sample["supervised"]``) instead of tokenising the text again; labels are
then `deem.modeling.sequence_deem.default_labels(..., supervised=...)`, the one place the §4.1 rules live.
"""

from __future__ import annotations

import bisect

from ...modeling.processing_deem import IMAGE_TOKEN, SOI_TOKEN
from ...modeling.prompts import IMAGE_MARKER
from ._common import BadSample

ENCODED_KEYS = ("input_ids", "supervised")


def _pieces(processor, text: str) -> list[tuple]:
    """The processor's split of `text` with character spans: ("text", str, start) | ("id", int, start) |
    ("image", None, start), in order (the stripping next to markers / ref / box tokens as the processor's)."""
    for raw in (SOI_TOKEN, IMAGE_TOKEN):
        if raw in text:
            raise BadSample("bad_record", f"the text contains the raw token {raw}; write '{IMAGE_MARKER}' instead")
    parts = processor._split_pattern.split(text)
    stripped_tokens = processor._stripped_tokens
    items, pos = [], 0
    for i, part in enumerate(parts):
        start, pos = pos, pos + len(part)
        if i % 2:
            value = processor._special_ids[part]
            items.append(("image", None, start) if value is None else ("id", value, start))
            continue
        if i > 0 and parts[i - 1] in stripped_tokens:
            lead = len(part) - len(part.lstrip())
            part, start = part[lead:], start + lead
        if i + 1 < len(parts) and parts[i + 1] in stripped_tokens:
            part = part.rstrip()
        if part:
            items.append(("text", part, start))
    return items


def encode_texts(processor, texts: list[str], boundaries: list[list[int]] | None = None):
    """Ids of each text (as ``processor(text=...)["input_ids"]``) and, with `boundaries` (per text, the end
    character of each segment), each token's segment index. One tokenizer call for all texts."""
    tok = processor.tokenizer
    split = [_pieces(processor, t) for t in texts]
    pieces = [item[1] for items in split for item in items if item[0] == "text"]
    want_offsets = boundaries is not None
    if pieces:
        if want_offsets and not getattr(tok, "is_fast", False):
            raise ValueError("segment labels need a fast (tokenizers-backed) tokenizer for character offsets")
        enc = tok(pieces, add_special_tokens=False, return_offsets_mapping=want_offsets)
        piece_ids = iter(enc["input_ids"])
        piece_offsets = iter(enc["offset_mapping"]) if want_offsets else None
    image_run = [processor.soi_token_id] + [processor.image_token_id] * processor.num_image_tokens
    bos = tok.bos_token_id
    out = []
    for n, items in enumerate(split):
        ids = [bos] if bos is not None else []
        chars = [0] * len(ids)
        for kind, value, start in items:
            if kind == "text":
                new = next(piece_ids)
                ids += new
                if want_offsets:
                    chars += [start + (e - 1 if e > s else s) for s, e in next(piece_offsets)]
            elif kind == "id":
                ids.append(value)
                chars.append(start)
            else:
                ids += image_run
                chars += [start] * len(image_run)
        if want_offsets:
            ends = boundaries[n]
            segment = [min(bisect.bisect_right(ends, c), len(ends) - 1) for c in chars]
            out.append((ids, segment))
        else:
            out.append((ids, None))
    return out


def encode_samples(processor, samples: list[dict]) -> list[dict]:
    """Add ``input_ids`` and ``supervised`` (lists, one entry per token) to each sample that lacks them, in place,
    with one tokenizer call for all of them; returns the samples. Samples must pass `validate_sample` first."""
    todo = [s for s in samples if "input_ids" not in s]
    if not todo:
        return samples
    texts, boundaries, flags = [], [], []
    for sample in todo:
        ends, total, sup = [], 0, []
        for seg in sample["segments"]:
            total += len(seg["text"])
            ends.append(total)
            sup.append(seg["supervise"])
        texts.append("".join(seg["text"] for seg in sample["segments"]))
        boundaries.append(ends)
        flags.append(sup)
    uniform = [all(f) or not any(f) for f in flags]
    offsets_needed = not all(uniform)  # character offsets only for samples that mix supervised and prompt text
    encoded = encode_texts(processor, texts, boundaries if offsets_needed else None)
    for sample, (ids, segment), sup, same in zip(todo, encoded, flags, uniform):
        sample["input_ids"] = ids
        sample["supervised"] = [sup[0]] * len(ids) if same else [sup[k] for k in segment]
    return samples


def strip_encoding(sample: dict) -> dict:
    """A copy of `sample` without the cached encoding (when its text is changed)."""
    return {k: v for k, v in sample.items() if k not in ENCODED_KEYS}
