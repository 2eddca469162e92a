"""DEEM processor: interleaved text with ``<image>`` markers plus images -> model inputs (reference §3).

Token layout of one row: ``<s>`` then the text, where every ``<image>`` marker becomes ``<|startofimage|>``
followed by ``num_image_tokens`` ``<|sniffer|>`` placeholders (77 in the paper; no end-of-image token). Images
are matched to markers in row-major order. As the original (slow, legacy LLaMA tokenizer of transformers 4.31)
did, whitespace next to an image marker or a ``<ref>``/``</ref>``/``<box>``/``</box>`` token is dropped, and
every text segment between special tokens is tokenised on its own (so it gets the SentencePiece "▁" dummy
prefix whatever the tokenizer's ``legacy`` setting). ``<s>``, ``</s>`` and ``<unk>`` written in the text become
their ids without whitespace stripping (they were ``AddedToken(lstrip=False, rstrip=False)`` in the original).
"""

import re

import numpy as np
import PIL.Image
import torch
from transformers import AutoTokenizer, PretrainedConfig
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin
from transformers.utils import logging

from .image_processing_deem import DeemImageProcessor
from .prompts import IMAGE_MARKER, SYSTEM_PROMPT

logger = logging.get_logger(__name__)

SOI_TOKEN = "<|startofimage|>"
IMAGE_TOKEN = "<|sniffer|>"
REF_START_TOKEN, REF_END_TOKEN, BOX_START_TOKEN, BOX_END_TOKEN = "<ref>", "</ref>", "<box>", "</box>"
DEEM_SPECIAL_TOKENS = (SOI_TOKEN, IMAGE_TOKEN, REF_START_TOKEN, REF_END_TOKEN, BOX_START_TOKEN, BOX_END_TOKEN)
VICUNA_VOCAB_SIZE = 32000
VICUNA_PAD_TOKEN_ID = 31999

# DEEM SFT conversation (§3.4): "{system} ## USER: {user}\n ## ASSISTANT: {assistant}</s> ## USER: ...".
CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for item in content -%}"
    "{%- if item['type'] == 'image' -%}{{- '" + IMAGE_MARKER + "' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = render(messages[0]['content']) | string -%}{%- set turns = messages[1:] -%}"
    "{%- if not system.endswith('\\n') -%}{%- set system = system + '\\n\\n' -%}{%- endif -%}"
    "{%- else -%}{%- set system = " + repr(SYSTEM_PROMPT) + " -%}{%- set turns = messages -%}"
    "{%- endif -%}"
    "{{- system -}}"
    "{%- for message in turns -%}"
    "{%- if message['role'] == 'user' -%}{{- ' ## USER: ' + render(message['content']) + '\\n' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- ' ## ASSISTANT: ' + render(message['content']) + (eos_token if eos_token is defined else '</s>') -}}"
    "{%- else -%}{{- raise_exception('DEEM chat roles are system, user and assistant, got ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- ' ## ASSISTANT:' -}}{%- endif -%}"
)


def prepare_tokenizer(tokenizer):
    """Make a LLaMA-style tokenizer DEEM-ready, in place; returns it.

    Adds ``<|startofimage|>``, ``<|sniffer|>``, ``<ref>``, ``</ref>``, ``<box>``, ``</box>`` as extra special
    tokens in that order (ids 32000..32005 for the 32000-piece Vicuna vocab; tokens already present are kept).
    Pad: for a 32000-piece base vocab (Vicuna), id 31999 as in the original (an ordinary piece, bug B16);
    otherwise, only if the tokenizer has no pad token, its unk token (else its eos token).
    Resize the model's embeddings to ``len(tokenizer)`` afterwards.
    """
    vocab = tokenizer.get_vocab()
    missing = [token for token in DEEM_SPECIAL_TOKENS if token not in vocab]
    if missing:
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    if tokenizer.vocab_size == VICUNA_VOCAB_SIZE:
        tokenizer.pad_token_id = VICUNA_PAD_TOKEN_ID
    elif tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    return tokenizer


def _to_id_lists(sequences) -> list[list[int]]:
    if isinstance(sequences, (torch.Tensor, np.ndarray)):
        sequences = sequences.tolist()
    return [seq.tolist() if isinstance(seq, (torch.Tensor, np.ndarray)) else list(seq) for seq in sequences]


def _is_single_image(x) -> bool:
    return isinstance(x, (PIL.Image.Image, str)) or (isinstance(x, (np.ndarray, torch.Tensor)) and x.ndim <= 3)


def _flat(x) -> list:
    return [x] if x is None or _is_single_image(x) else list(x)


def _is_nested(x) -> bool:
    return isinstance(x, (list, tuple)) and any(isinstance(item, (list, tuple)) for item in x)


class DeemProcessor(ProcessorMixin):
    r"""
    Wraps a `DeemImageProcessor` and a LLaMA-style tokenizer (prepared with `prepare_tokenizer`).

    Args:
        image_processor (`DeemImageProcessor`): builds the encoder / decoder views and masks.
        tokenizer: a LLaMA / Vicuna tokenizer that already holds the DEEM special tokens.
        num_image_tokens (`int`, defaults to 77): `<|sniffer|>` placeholders per image.
        chat_template (`str`, *optional*): Jinja template; defaults to DEEM's SFT conversation format.

    Token ids are read from the tokenizer, never hard-coded: `soi_token_id` (`<|startofimage|>`), `image_token_id`
    (`<|sniffer|>`), `ref_start_token_id`, `ref_end_token_id`, `box_start_token_id`, `box_end_token_id` are
    exposed here; bos / eos / pad are the tokenizer's own.
    """

    image_marker = IMAGE_MARKER
    prepare_tokenizer = staticmethod(prepare_tokenizer)

    def __init__(self, image_processor, tokenizer, num_image_tokens: int = 77, chat_template: str | None = None):
        if num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
        vocab = tokenizer.get_vocab()
        missing = [token for token in DEEM_SPECIAL_TOKENS if token not in vocab]
        if missing:
            raise ValueError(
                f"the tokenizer lacks the DEEM special tokens {missing}; call "
                "DeemProcessor.prepare_tokenizer(tokenizer) first (and resize the model's embeddings to len(tokenizer))"
            )
        self.num_image_tokens = num_image_tokens
        (
            self.soi_token_id,
            self.image_token_id,
            self.ref_start_token_id,
            self.ref_end_token_id,
            self.box_start_token_id,
            self.box_end_token_id,
        ) = (vocab[t] for t in DEEM_SPECIAL_TOKENS)
        # text -> ids: whitespace is stripped next to the marker and the ref/box tokens, not next to <s> </s> <unk>
        self._stripped_tokens = (IMAGE_MARKER, *DEEM_SPECIAL_TOKENS[2:])
        named = [t for t in (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) if t]
        self._special_ids = {t: vocab[t] for t in named + list(DEEM_SPECIAL_TOKENS[2:])} | {IMAGE_MARKER: None}
        alternatives = sorted(self._special_ids, key=len, reverse=True)
        self._split_pattern = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")
        super().__init__(image_processor, tokenizer, chat_template=chat_template or CHAT_TEMPLATE)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "pixel_values_decoder", "image_masks", "num_images"]

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        """Image processor from `processor_config.json` (or `preprocessor_config.json`), tokenizer via AutoTokenizer."""
        subfolder = kwargs.pop("subfolder", "")
        config = (processor_dict or {}).get("image_processor")
        if isinstance(config, dict):
            image_processor = DeemImageProcessor.from_dict(config)
        else:
            image_processor = DeemImageProcessor.from_pretrained(
                pretrained_model_name_or_path, subfolder=subfolder, **kwargs
            )
        # the tokenizer class comes from tokenizer_config.json; handing AutoTokenizer a neutral config keeps it from
        # reading config.json through AutoConfig, which would ask to run this very package's code as remote code
        # and warn that a `deem` config is not a plain one
        kwargs.pop("trust_remote_code", None)
        kwargs.setdefault("config", PretrainedConfig())
        tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        return [image_processor, tokenizer]

    # ------------------------------------------------------------------ encoding

    def _segment(self, text: str, row: int) -> list:
        """Split one text into text pieces (str), special-token ids (int) and image markers (None)."""
        for raw in (SOI_TOKEN, IMAGE_TOKEN):
            if raw in text:
                raise ValueError(f"text {row} contains the raw token {raw}; write '{IMAGE_MARKER}' where an image goes")
        parts = self._split_pattern.split(text)
        items = []
        for i, part in enumerate(parts):
            if i % 2:
                items.append(self._special_ids[part])
                continue
            if i > 0 and parts[i - 1] in self._stripped_tokens:
                part = part.lstrip()
            if i + 1 < len(parts) and parts[i + 1] in self._stripped_tokens:
                part = part.rstrip()
            if part:
                items.append(part)
        return items

    @staticmethod
    def _group(images, counts: list[int], what: str) -> list[list]:
        """Per-row lists of images (or masks) matching the per-row marker counts."""
        if images is None:
            images = []
        if _is_nested(images):
            if len(images) != len(counts):
                raise ValueError(f"{what}s are given per row for {len(images)} rows but there are {len(counts)} texts")
            rows = [_flat(row) for row in images]
            for i, (row, count) in enumerate(zip(rows, counts, strict=True)):
                if len(row) != count:
                    raise ValueError(f"row {i} has {count} {IMAGE_MARKER} markers but {len(row)} {what}s")
            return rows
        flat = [] if isinstance(images, (list, tuple)) and not images else _flat(images)
        if len(flat) != sum(counts):
            raise ValueError(
                f"the text has {sum(counts)} {IMAGE_MARKER} markers in total (per row: {counts}) "
                f"but {len(flat)} {what}s were given"
            )
        starts = np.cumsum([0] + counts)
        return [flat[a:b] for a, b in zip(starts[:-1], starts[1:], strict=True)]

    def __call__(
        self,
        text: str | list[str] | None = None,
        images=None,
        image_masks=None,
        padding: bool | str = True,
        padding_side: str | None = None,
        max_length: int | None = None,
        truncation: bool = False,
        add_eos: bool = False,
        add_special_tokens: bool = True,
        return_tensors: str | None = "pt",
        generator: torch.Generator | int | None = None,
        videos=None,
        audio=None,
        **images_kwargs,
    ) -> BatchFeature:
        r"""
        Encode B texts with `<image>` markers and their images.

        Args:
            text: one string or B strings; write `<image>` where each image goes.
            images: a flat list (matched to the markers of all rows in order) or B per-row lists of images
                (PIL, path, numpy/torch HWC or CHW, uint8 or float in [0, 1]).
            image_masks: same structure as `images`; each entry `None` (whole image) or an (H, W) region mask.
            padding: `True`/"longest", "max_length" or `False`; `padding_side`: "right" or "left"
                (default: the tokenizer's).
            max_length / truncation: rows longer than `max_length` raise unless `truncation=True`, which cuts the
                row on the right; a cut never splits an image: it moves before that image's `<|startofimage|>`,
                and every image past the cut is dropped with a warning.
            add_eos: append `</s>` to every row; add_special_tokens: prepend `<s>` (default `True`).
            generator: `torch.Generator` or int seed for the image processor's random flips.
            **images_kwargs: passed to `DeemImageProcessor.preprocess` (e.g. `do_center_crop`, `do_flip`).

        Returns:
            `BatchFeature` with `input_ids` / `attention_mask` [B, L], `num_images` int64 [B], and when any image
            is kept `pixel_values` [N, 3, S, S], `pixel_values_decoder` [N, 3, D, D] and, if `image_masks` was
            given, `image_masks` [N, 1, S, S] (N = total images, row-major order).
        """
        if videos is not None or audio is not None:
            raise ValueError("DEEM takes text and images only (got videos or audio)")
        if text is None:
            if images is None:
                raise ValueError("give text, images, or both")
            flat_images = [x for row in images for x in _flat(row)] if _is_nested(images) else images
            flat_masks = [x for row in image_masks for x in _flat(row)] if _is_nested(image_masks) else image_masks
            return self.image_processor(
                flat_images, image_masks=flat_masks, generator=generator, return_tensors=return_tensors, **images_kwargs
            )
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError("text must be a string or a non-empty list of strings")

        rows = [self._segment(t, i) for i, t in enumerate(texts)]
        counts = [sum(item is None for item in row) for row in rows]
        row_images = self._group(images, counts, "image")
        row_masks = self._group(image_masks, counts, "image mask") if image_masks is not None else None

        pieces = [item for row in rows for item in row if isinstance(item, str)]
        piece_ids = iter(self.tokenizer(pieces, add_special_tokens=False)["input_ids"] if pieces else [])
        image_run = [self.soi_token_id] + [self.image_token_id] * self.num_image_tokens
        bos = [self.tokenizer.bos_token_id] if add_special_tokens and self.tokenizer.bos_token_id is not None else []

        all_ids, kept_images, kept_masks = [], [], []
        for i, row in enumerate(rows):
            ids, starts = list(bos), []
            for item in row:
                if item is None:
                    starts.append(len(ids))
                    ids += image_run
                else:
                    ids += next(piece_ids) if isinstance(item, str) else [item]
            if add_eos:
                ids.append(self.tokenizer.eos_token_id)
            n_kept = len(starts)
            if max_length is not None and len(ids) > max_length:
                if not truncation:
                    raise ValueError(
                        f"row {i} has {len(ids)} tokens, more than max_length={max_length}; "
                        "pass truncation=True or a larger max_length"
                    )
                cut = max_length
                n_kept = sum(start + len(image_run) <= cut for start in starts)
                if n_kept < len(starts):
                    cut = min(cut, starts[n_kept])
                    logger.warning(
                        f"row {i}: truncating to {max_length} tokens drops {len(starts) - n_kept} image(s); "
                        f"the row is cut at {cut}, before the first image that does not fit whole"
                    )
                ids = ids[:cut]
            all_ids.append(ids)
            kept_images += row_images[i][:n_kept]
            kept_masks += row_masks[i][:n_kept] if row_masks is not None else []
            counts[i] = n_kept

        data = self._pad(all_ids, padding, padding_side, max_length, return_tensors)
        data["num_images"] = np.array(counts, dtype=np.int64)
        if kept_images:
            data.update(
                self.image_processor(
                    kept_images,
                    image_masks=kept_masks if row_masks is not None else None,
                    generator=generator,
                    return_tensors=return_tensors,
                    **images_kwargs,
                )
            )
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _pad(self, all_ids, padding, padding_side, max_length, return_tensors) -> dict:
        lengths = [len(ids) for ids in all_ids]
        if padding in (True, "longest"):
            target = max(lengths)
        elif padding == "max_length":
            if max_length is None:
                raise ValueError("padding='max_length' needs max_length")
            target = max_length
        elif padding in (False, "do_not_pad"):
            if return_tensors is not None and len(set(lengths)) > 1:
                raise ValueError(f"rows have different lengths {lengths}; pass padding=True to return tensors")
            target = None
        else:
            raise ValueError(f"padding must be True, 'longest', 'max_length' or False, got {padding!r}")
        side = padding_side or self.tokenizer.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        pad_id = self.tokenizer.pad_token_id
        if target is not None and pad_id is None and any(n < target for n in lengths):
            raise ValueError("the tokenizer has no pad token; call DeemProcessor.prepare_tokenizer(tokenizer)")
        input_ids, attention_mask = [], []
        for ids in all_ids:
            n_pad = 0 if target is None else target - len(ids)
            pad, ones = [pad_id] * n_pad, [1] * len(ids)
            input_ids.append(pad + ids if side == "left" else ids + pad)
            attention_mask.append([0] * n_pad + ones if side == "left" else ones + [0] * n_pad)
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    # ------------------------------------------------------------------ decoding

    def _drop_image_runs(self, sequences) -> list[list[int]]:
        image_ids = {self.soi_token_id, self.image_token_id}
        return [[t for t in seq if t not in image_ids] for seq in _to_id_lists(sequences)]

    def batch_decode(self, sequences, skip_special_tokens: bool = True, keep_image_tokens: bool = False, **kwargs):
        """Decode [B, L] ids. Image runs (`<|startofimage|>` + placeholders) are removed unless
        `keep_image_tokens`; other special tokens are removed with `skip_special_tokens` (default `True`)."""
        if not keep_image_tokens:
            sequences = self._drop_image_runs(sequences)
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)

    def decode(self, token_ids, skip_special_tokens: bool = True, keep_image_tokens: bool = False, **kwargs) -> str:
        """Decode one sequence [L]; see `batch_decode`."""
        return self.batch_decode([token_ids], skip_special_tokens, keep_image_tokens, **kwargs)[0]

    def decode_interleaved(self, token_ids, skip_special_tokens: bool = True, **kwargs) -> list:
        """Segments of a sequence [L]: decoded text pieces and "<image>" for each image (a `<|startofimage|>`
        with its placeholders). A batch [B, L] gives one list per row. Empty text pieces are left out."""
        ids = token_ids.tolist() if isinstance(token_ids, (torch.Tensor, np.ndarray)) else list(token_ids)
        if ids and np.ndim(ids[0]) > 0:
            return [self.decode_interleaved(row, skip_special_tokens, **kwargs) for row in ids]
        segments, text = [], []

        def flush():
            piece = self.tokenizer.decode(text, skip_special_tokens=skip_special_tokens, **kwargs) if text else ""
            if piece:
                segments.append(piece)
            text.clear()

        for token in map(int, ids):
            if token == self.soi_token_id:
                flush()
                segments.append(IMAGE_MARKER)
            elif token != self.image_token_id:
                text.append(token)
        flush()
        return segments

    def post_process_interleaved(self, outputs, prompt_length: int = 0, output_type: str = "pil") -> list[list]:
        """Interleaved ``generate(soi="draw")`` output -> per row a list of text pieces (str) and images, in
        order. ``prompt_length``: leading columns to skip (the prompt, ``input_ids.shape[1]``). Drawn images are
        matched in order to the generated ``<|startofimage|>`` tokens; an image of the kept prompt part (no
        drawn picture) stays the "<image>" marker. ``output_type``: "pil" or "pt"."""
        rows = []
        for b, sequence in enumerate(outputs.sequences):
            keep = (
                outputs.attention_mask[b].bool()
                if getattr(outputs, "attention_mask", None) is not None
                else torch.ones_like(sequence, dtype=torch.bool)
            )
            keep[:prompt_length] = False
            segments = self.decode_interleaved(sequence[keep])
            drawn = list(outputs.images[b]) if outputs.images is not None else []
            n_prompt_images = segments.count(IMAGE_MARKER) - len(drawn)
            out, seen = [], 0
            for piece in segments:
                if piece == IMAGE_MARKER:
                    seen += 1
                    if seen > n_prompt_images:
                        image = drawn[seen - n_prompt_images - 1]
                        piece = (
                            self.image_processor.postprocess(image[None], output_type="pil")[0]
                            if output_type == "pil"
                            else image
                        )
                out.append(piece)
            rows.append(out)
        return rows


DeemProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["CHAT_TEMPLATE", "DEEM_SPECIAL_TOKENS", "DeemProcessor", "prepare_tokenizer"]
