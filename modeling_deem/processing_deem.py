"""DEEM processor: interleaved text with ``<image>`` markers plus images -> model inputs (reference §3).

Token layout of one row: ``<s>`` then the text, where every ``<image>`` marker becomes ``<|startofimage|>``
followed by ``num_image_tokens`` ``<|sniffer|>`` placeholders (77 in the paper; no end-of-image token). Images
are matched to markers in row-major order. As the original (slow, legacy LLaMA tokenizer of transformers 4.31)
did, whitespace next to an image marker or a ``<ref>``/``</ref>``/``<box>``/``</box>`` token is dropped, and
every text segment between special tokens is tokenised on its own (so it gets the SentencePiece "▁" dummy
prefix whatever the tokenizer's ``legacy`` setting). ``<s>``, ``</s>`` and ``<unk>`` written in the text become
their ids without whitespace stripping (they were ``AddedToken(lstrip=False, rstrip=False)`` in the original).
"""

import json
import numbers
import os
import re

import numpy as np
import PIL.Image
import torch
from transformers import AutoTokenizer, PretrainedConfig
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin
from transformers.tokenization_utils_base import TruncationStrategy
from transformers.utils import PaddingStrategy, logging

from .image_processing_deem import DeemImageProcessor, check_bool, check_generator, check_return_tensors
from .prompts import IMAGE_MARKER, SYSTEM_PROMPT

logger = logging.get_logger(__name__)

SOI_TOKEN = "<|startofimage|>"
IMAGE_TOKEN = "<|sniffer|>"
REF_START_TOKEN, REF_END_TOKEN, BOX_START_TOKEN, BOX_END_TOKEN = "<ref>", "</ref>", "<box>", "</box>"
DEEM_SPECIAL_TOKENS = (SOI_TOKEN, IMAGE_TOKEN, REF_START_TOKEN, REF_END_TOKEN, BOX_START_TOKEN, BOX_END_TOKEN)
VICUNA_VOCAB_SIZE = 32000
VICUNA_PAD_TOKEN_ID = 31999
_DEEM_ID_NAMES = ("soi", "image", "ref_start", "ref_end", "box_start", "box_end")  # `<name>_token_id`, in order
# files holding a tokenizer's vocabulary (tokenizer_config.json alone is not a tokenizer)
TOKENIZER_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")

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


def _id_row(seq, row: int) -> list[int]:
    """One 1-D sequence of token ids (list / tuple / tensor / array of non-negative ints) as a list of ints."""
    if isinstance(seq, (torch.Tensor, np.ndarray)):
        if seq.ndim != 1:
            raise ValueError(f"token ids: row {row} must be 1-D, got shape {tuple(seq.shape)}")
        if isinstance(seq, torch.Tensor):
            is_int = not (seq.is_floating_point() or seq.is_complex() or seq.dtype == torch.bool)
        else:
            is_int = seq.dtype.kind in "iu"
        if not is_int:
            raise TypeError(f"token ids: row {row} has dtype {seq.dtype}; expected integers")
        seq = seq.tolist()
    elif not isinstance(seq, (list, tuple)):
        raise TypeError(f"token ids: row {row} must be a list or tensor of ints, got {type(seq).__name__}")
    for j, token in enumerate(seq):
        if isinstance(token, (bool, np.bool_)) or not isinstance(token, numbers.Integral):
            raise TypeError(f"token ids must be ints; row {row} holds {type(token).__name__} {token!r} at position {j}")
        if token < 0:
            raise ValueError(
                f"token ids must be >= 0; row {row} holds {token} at position {j} (labels? replace -100 by the pad id)"
            )
    return [int(t) for t in seq]


def _to_id_lists(sequences) -> list[list[int]]:
    """[B, L] ids (a 2-D tensor / array, or a list of 1-D sequences) as checked lists of ints."""
    if isinstance(sequences, (torch.Tensor, np.ndarray)):
        if sequences.ndim != 2:
            raise ValueError(f"token ids must be a batch [B, L], got shape {tuple(sequences.shape)}")
        return [_id_row(seq, i) for i, seq in enumerate(sequences)]
    if not isinstance(sequences, (list, tuple)):
        raise TypeError(f"token ids must be a list of sequences or a tensor [B, L], got {type(sequences).__name__}")
    return [_id_row(seq, i) for i, seq in enumerate(sequences)]


def _is_single_image(x) -> bool:
    return isinstance(x, (PIL.Image.Image, str)) or (isinstance(x, (np.ndarray, torch.Tensor)) and x.ndim <= 3)


def _is_batch_array(x) -> bool:
    return isinstance(x, (np.ndarray, torch.Tensor)) and x.ndim == 4


def _flat_entries(images, what: str) -> list:
    """`images` (None, one image, a 4-D batch or a flat list) as a flat list; `TypeError` for other shapes."""
    if images is None:
        return []
    if _is_single_image(images):
        return [images]
    if _is_batch_array(images):
        return list(images)
    if isinstance(images, (list, tuple)):
        return list(images)
    raise TypeError(
        f"{what} must be one image, a list of images or a list of per-row lists, got {type(images).__name__}"
    )


def _structure(images, what: str) -> tuple[list, list[int] | None]:
    """(flat list of entries, per-row lengths or None when `images` is not given per row)."""
    if isinstance(images, (list, tuple)) and images and all(isinstance(x, (list, tuple)) for x in images):
        rows = [list(row) for row in images]
        for r, row in enumerate(rows):
            for j, entry in enumerate(row):
                if isinstance(entry, (list, tuple)):
                    raise TypeError(
                        f"{what}[{r}][{j}] is a {type(entry).__name__}: {what} may be nested two levels deep at most "
                        "(a list of per-row lists of images)"
                    )
        return [entry for row in rows for entry in row], [len(row) for row in rows]
    flat = _flat_entries(images, what)
    lists = [j for j, entry in enumerate(flat) if isinstance(entry, (list, tuple))]
    if lists:
        raise TypeError(
            f"{what} mixes per-row lists (entries {lists[:5]}) and single entries; give either a flat list of "
            "images or one list per text row"
        )
    return flat, None


def _group(images, counts: list[int], what: str) -> list[list]:
    """Per-row lists of images (or masks) matching the per-row marker counts."""
    flat, lengths = _structure(images, f"{what}s")
    if lengths is not None:
        if len(lengths) != len(counts):
            raise ValueError(f"{what}s are given per row for {len(lengths)} rows but there are {len(counts)} texts")
        for i, (length, count) in enumerate(zip(lengths, counts, strict=True)):
            if length != count:
                raise ValueError(f"row {i} has {count} {IMAGE_MARKER} markers but {length} {what}s")
    elif len(flat) != sum(counts):
        raise ValueError(
            f"the text has {sum(counts)} {IMAGE_MARKER} markers in total (per row: {counts}) "
            f"but {len(flat)} {what}s were given"
        )
    starts = np.cumsum([0] + counts).tolist()
    return [flat[a:b] for a, b in zip(starts[:-1], starts[1:], strict=True)]


def _check_padding(padding) -> str | None:
    """True / "longest" -> "longest", "max_length", False / "do_not_pad" -> None."""
    if isinstance(padding, PaddingStrategy):
        padding = padding.value
    if isinstance(padding, (bool, np.bool_)):
        return "longest" if padding else None
    if isinstance(padding, str) and padding in ("longest", "max_length", "do_not_pad"):
        return None if padding == "do_not_pad" else padding
    message = f"padding must be True, 'longest', 'max_length' or False, got {padding!r}"
    raise (ValueError if isinstance(padding, str) else TypeError)(message)


def _check_truncation(truncation) -> bool:
    """True / "longest_first" / "only_first" -> True, False / "do_not_truncate" -> False."""
    if isinstance(truncation, TruncationStrategy):
        truncation = truncation.value
    if isinstance(truncation, (bool, np.bool_)):
        return bool(truncation)
    if isinstance(truncation, str) and truncation in ("longest_first", "only_first", "do_not_truncate"):
        return truncation != "do_not_truncate"
    message = f"truncation must be True or False (or 'longest_first' / 'do_not_truncate'), got {truncation!r}"
    raise (ValueError if isinstance(truncation, str) else TypeError)(message)


def _check_max_length(max_length) -> int | None:
    if max_length is None:
        return None
    if isinstance(max_length, (bool, np.bool_)) or not isinstance(max_length, numbers.Integral):
        raise TypeError(f"max_length must be a positive int or None, got {type(max_length).__name__} {max_length!r}")
    if max_length < 1:
        raise ValueError(f"max_length must be a positive int (at least 1 token), got {max_length}")
    return int(max_length)


def _special_ids_of(tokenizer) -> dict[str, int | None]:
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


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
    exposed here; bos / eos / pad are the tokenizer's own. `check_model_config(config)` raises when they (or the
    vocabulary size, or `num_image_tokens`) do not fit a model's config.
    """

    image_marker = IMAGE_MARKER
    prepare_tokenizer = staticmethod(prepare_tokenizer)

    def __init__(self, image_processor, tokenizer, num_image_tokens: int = 77, chat_template: str | None = None):
        if isinstance(num_image_tokens, (bool, np.bool_)) or not isinstance(num_image_tokens, numbers.Integral):
            raise TypeError(f"num_image_tokens must be an int >= 1, got {type(num_image_tokens).__name__}")
        if num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
        if not all(hasattr(image_processor, name) for name in ("resolve_options", "prepare", "build")):
            raise TypeError(f"image_processor must be a DeemImageProcessor, got {type(image_processor).__name__}")
        if not hasattr(tokenizer, "get_vocab") or not callable(tokenizer):
            raise TypeError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}")
        vocab = tokenizer.get_vocab()
        missing = [token for token in DEEM_SPECIAL_TOKENS if token not in vocab]
        if missing:
            raise ValueError(
                f"the tokenizer lacks the DEEM special tokens {missing}; call "
                "DeemProcessor.prepare_tokenizer(tokenizer) first (and resize the model's embeddings to len(tokenizer))"
            )
        special = set(tokenizer.all_special_tokens) | set(DEEM_SPECIAL_TOKENS)
        if all(token in special for token in vocab):
            raise ValueError(
                f"the tokenizer has no ordinary tokens: its {len(vocab)} tokens are all special ({sorted(vocab)[:9]}), "
                "so every text would encode to nothing; its vocabulary file (tokenizer.json or tokenizer.model) "
                "is missing or empty"
            )
        self.num_image_tokens = int(num_image_tokens)
        (
            self.soi_token_id,
            self.image_token_id,
            self.ref_start_token_id,
            self.ref_end_token_id,
            self.box_start_token_id,
            self.box_end_token_id,
        ) = (vocab[t] for t in DEEM_SPECIAL_TOKENS)
        deem_ids = [vocab[t] for t in DEEM_SPECIAL_TOKENS]
        named_ids = {k: v for k, v in _special_ids_of(tokenizer).items() if v is not None}
        if len(set(deem_ids)) < len(deem_ids) or set(deem_ids) & set(named_ids.values()):
            deem = dict(zip(DEEM_SPECIAL_TOKENS, deem_ids, strict=True))
            raise ValueError(
                f"the tokenizer's special ids collide: DEEM tokens {deem}, {named_ids}; each needs its own id"
            )
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

    # ------------------------------------------------------------------ loading and the model config

    @classmethod
    def _load_image_processor(cls, pretrained_model_name_or_path, processor_dict=None, subfolder="", **kwargs):
        """From `processor_config.json`'s nested entry, else `preprocessor_config.json`."""
        config = (processor_dict or {}).get("image_processor")
        if isinstance(config, dict):
            return DeemImageProcessor.from_dict(config)
        return DeemImageProcessor.from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)

    @classmethod
    def _load_tokenizer(cls, pretrained_model_name_or_path, subfolder="", **kwargs):
        folder = os.path.join(str(pretrained_model_name_or_path), subfolder or "")
        if os.path.isdir(folder) and not set(os.listdir(folder)) & set(TOKENIZER_VOCAB_FILES):
            raise ValueError(
                f"{folder} holds no tokenizer vocabulary: tokenizer.json is missing (nor is there any of "
                f"{list(TOKENIZER_VOCAB_FILES[1:])}); without it the tokenizer would encode every text as <s> alone. "
                "Save the processor with its tokenizer (processor.save_pretrained) or copy tokenizer.json there"
            )
        # the tokenizer class comes from tokenizer_config.json; handing AutoTokenizer a neutral config keeps it from
        # reading config.json through AutoConfig, which would ask to run this very package's code as remote code
        # and warn that a `deem` config is not a plain one
        kwargs.pop("trust_remote_code", None)
        kwargs.setdefault("config", PretrainedConfig())
        return AutoTokenizer.from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        """transformers < 5.25 loads the sub-processors here: the image processor, then the tokenizer."""
        return [
            cls._load_image_processor(pretrained_model_name_or_path, processor_dict, **kwargs),
            cls._load_tokenizer(pretrained_model_name_or_path, **kwargs),
        ]

    @classmethod
    def _resolve_subprocessors(cls, pretrained_model_name_or_path, processor_dict, **kwargs):
        """transformers >= 5.25 loads the sub-processors here (through the Auto classes, which would ask to run this
        package as remote code); ours load as on earlier releases. A sub-processor given as a keyword is used as it
        is, and only the other one is loaded."""
        kwargs.pop("return_unused_kwargs", None)
        given = {name: kwargs.pop(name, None) for name in ("image_processor", "tokenizer")}
        if given["image_processor"] is None:
            given["image_processor"] = cls._load_image_processor(
                pretrained_model_name_or_path, processor_dict, **kwargs
            )
        if given["tokenizer"] is None:
            given["tokenizer"] = cls._load_tokenizer(pretrained_model_name_or_path, **kwargs)
        return {**processor_dict, **given}, kwargs

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`ProcessorMixin.from_pretrained`; warns when a local folder's `config.json` (a DEEM model) does not fit the
        processor (see `check_model_config`)."""
        processor = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        config_file = os.path.join(str(pretrained_model_name_or_path), "config.json")
        if os.path.isfile(config_file):
            try:
                with open(config_file, encoding="utf-8") as f:
                    config = json.load(f)
            except (OSError, ValueError):
                config = None
            if isinstance(config, dict) and config.get("model_type") == "deem":
                problems = processor.model_config_mismatches(config)
                if problems:
                    logger.warning(
                        f"the processor in {pretrained_model_name_or_path} does not fit the model config next to it: "
                        + "; ".join(problems)
                    )
        return processor

    def model_config_mismatches(self, config) -> list[str]:
        """Every way this processor does not fit a DEEM model `config` (a `DeemConfig` or its dict); [] if none."""
        if isinstance(config, dict):
            text = config.get("text_config") or {}
            get = config.get
            vocab_size = text.get("vocab_size") if isinstance(text, dict) else None
        elif isinstance(config, PretrainedConfig):

            def get(name):
                return getattr(config, name, None)

            text = getattr(config, "text_config", None)
            vocab_size = getattr(text, "vocab_size", None) if text is not None else getattr(config, "vocab_size", None)
        else:
            raise TypeError(f"config must be a DeemConfig or its dict, got {type(config).__name__}")
        ours = {name + "_token_id": getattr(self, name + "_token_id") for name in _DEEM_ID_NAMES}
        ours |= _special_ids_of(self.tokenizer)
        problems = [
            f"{name}: tokenizer {value}, config {get(name)}"
            for name, value in ours.items()
            if get(name) is not None and get(name) != value
        ]
        if get("num_image_tokens") is not None and get("num_image_tokens") != self.num_image_tokens:
            problems.append(f"num_image_tokens: processor {self.num_image_tokens}, config {get('num_image_tokens')}")
        size = len(self.tokenizer)
        if vocab_size is not None and size > vocab_size:
            problems.append(
                f"the tokenizer has {size} tokens but the model's vocab_size is {vocab_size}: ids >= {vocab_size} "
                "have no embedding"
            )
        original = get("original_vocab_size")
        if original is not None and size < original + len(DEEM_SPECIAL_TOKENS):
            problems.append(
                f"the tokenizer has only {size} tokens but the model has {original} base tokens + "
                f"{len(DEEM_SPECIAL_TOKENS)} DEEM tokens: it is not the model's tokenizer (was its vocabulary file "
                "missing?)"
            )
        return problems

    def check_model_config(self, config) -> None:
        """Raise a `ValueError` naming every special-token id, vocabulary size or `num_image_tokens` of this
        processor that disagrees with the DEEM model `config` (a `DeemConfig` or its dict)."""
        problems = self.model_config_mismatches(config)
        if problems:
            raise ValueError("the processor does not fit the model config: " + "; ".join(problems))

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

    def _images_only(self, images, image_masks, generator, return_tensors, options) -> BatchFeature:
        if images is None:
            raise ValueError("give text, images, or both (got neither)")
        flat_images, _ = _structure(images, "images")
        if image_masks is not None:
            flat_masks, _ = _structure(image_masks, "image_masks")
            if len(flat_masks) != len(flat_images):
                raise ValueError(f"got {len(flat_masks)} image masks for {len(flat_images)} images; counts must match")
        else:
            flat_masks = None
        prepared, masks = self.image_processor.prepare(flat_images, flat_masks)
        return self.image_processor.build(prepared, masks, options, generator=generator, return_tensors=return_tensors)

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
                (PIL of any mode, path, numpy/torch HWC or CHW, uint8 / uint16 or float in [0, 1]; see
                `DeemImageProcessor`).
            image_masks: same structure as `images`; each entry `None` (whole image) or an (H, W) binary mask.
            padding: `True`/"longest", "max_length" or `False`; `padding_side`: "right" or "left"
                (default: the tokenizer's).
            max_length / truncation: rows longer than `max_length` (>= 1) raise unless `truncation=True`, which cuts
                the row on the right; a cut never splits an image: it moves before that image's
                `<|startofimage|>`, and every image past the cut is dropped with a warning. A cut that would leave
                a row empty raises.
            add_eos: append `</s>` to every row; add_special_tokens: prepend `<s>` (default `True`).
            generator: `torch.Generator` or int seed for the image processor's random flips.
            **images_kwargs: `DeemImageProcessor` options (`size`, `decoder_size`, `do_center_crop`, `do_flip`,
                `flip_prob`, `return_decoder_view`).

        Every argument is checked (and every image converted) before any text is tokenised or image resized;
        bad values raise `ValueError`, wrong types `TypeError`.

        Returns:
            `BatchFeature` with `input_ids` / `attention_mask` [B, L], `num_images` int64 [B], and when any image
            is kept `pixel_values` [N, 3, S, S], `pixel_values_decoder` [N, 3, D, D] and, if `image_masks` was
            given, `image_masks` [N, 1, S, S] (N = total images, row-major order).
        """
        if videos is not None or audio is not None:
            raise ValueError("DEEM takes text and images only (got videos or audio)")
        options = self.image_processor.resolve_options(**images_kwargs)
        generator = check_generator(generator)
        return_tensors = check_return_tensors(return_tensors)
        padding = _check_padding(padding)
        truncation = _check_truncation(truncation)
        max_length = _check_max_length(max_length)
        add_eos = check_bool(add_eos, "add_eos")
        add_special_tokens = check_bool(add_special_tokens, "add_special_tokens")
        side = self.tokenizer.padding_side if padding_side is None else padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        if padding == "max_length" and max_length is None:
            raise ValueError("padding='max_length' needs max_length")
        if add_eos and self.tokenizer.eos_token_id is None:
            raise ValueError("add_eos=True but the tokenizer has no eos token")
        if text is None:
            return self._images_only(images, image_masks, generator, return_tensors, options)

        if isinstance(text, str):
            texts = [text]
        elif isinstance(text, (list, tuple)):
            texts = list(text)
        else:
            raise TypeError(f"text must be a string or a non-empty list of strings, got {type(text).__name__}")
        if not texts:
            raise ValueError("text must be a string or a non-empty list of strings, got an empty list")
        wrong = [(i, type(t).__name__) for i, t in enumerate(texts) if not isinstance(t, str)]
        if wrong:
            raise TypeError(f"text must be a string or a non-empty list of strings; entries (index, type) {wrong[:5]}")

        rows = [self._segment(t, i) for i, t in enumerate(texts)]
        counts = [sum(item is None for item in row) for row in rows]
        row_images = _group(images, counts, "image")
        row_masks = _group(image_masks, counts, "image mask") if image_masks is not None else None
        flat_images = [image for row in row_images for image in row]
        flat_masks = [mask for row in row_masks for mask in row] if row_masks is not None else None
        prepared, masks = self.image_processor.prepare(flat_images, flat_masks) if flat_images else ([], None)

        pieces = [item for row in rows for item in row if isinstance(item, str)]
        piece_ids = iter(self.tokenizer(pieces, add_special_tokens=False)["input_ids"] if pieces else [])
        image_run = [self.soi_token_id] + [self.image_token_id] * self.num_image_tokens
        bos = [self.tokenizer.bos_token_id] if add_special_tokens and self.tokenizer.bos_token_id is not None else []

        all_ids, kept = [], []
        offset = 0
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
            if not ids:
                raise ValueError(
                    f"text {i} gives no tokens (empty text with add_special_tokens=False); every row needs a token"
                )
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
                if cut == 0:
                    raise ValueError(
                        f"row {i}: truncating to max_length={max_length} would leave no tokens (the row starts with an "
                        f"image, whose {len(image_run)}-token run does not fit); raise max_length"
                    )
                if n_kept < len(starts):
                    logger.warning(
                        f"row {i}: truncating to {max_length} tokens drops {len(starts) - n_kept} image(s); "
                        f"the row is cut at {cut}, before the first image that does not fit whole"
                    )
                ids = ids[:cut]
            all_ids.append(ids)
            kept += range(offset, offset + n_kept)
            offset += len(starts)
            counts[i] = n_kept

        data = self._pad(all_ids, padding, side, max_length, return_tensors)
        data["num_images"] = np.array(counts, dtype=np.int64)
        if kept:
            images_out = self.image_processor.build(
                [prepared[k] for k in kept],
                [masks[k] for k in kept] if masks is not None else None,
                options,
                generator=generator,
                return_tensors=return_tensors,
            )
            data.update(images_out)
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _pad(self, all_ids, padding, side, max_length, return_tensors) -> dict:
        lengths = [len(ids) for ids in all_ids]
        if padding == "longest":
            target = max(lengths)
        elif padding == "max_length":
            target = max_length
        else:
            if return_tensors is not None and len(set(lengths)) > 1:
                raise ValueError(f"rows have different lengths {lengths}; pass padding=True to return tensors")
            target = None
        pad_id = self.tokenizer.pad_token_id
        if target is not None and pad_id is None and any(n < target for n in lengths):
            raise ValueError("the tokenizer has no pad token; call DeemProcessor.prepare_tokenizer(tokenizer)")
        input_ids, attention_mask = [], []
        for ids in all_ids:
            n_pad = 0 if target is None else target - len(ids)
            pad, ones = [pad_id] * n_pad, [1] * len(ids)
            input_ids.append(pad + ids if side == "left" else ids + pad)
            attention_mask.append([0] * n_pad + ones if side == "left" else ones + [0] * n_pad)
        if return_tensors is not None:
            input_ids = np.array(input_ids, dtype=np.int64)
            attention_mask = np.array(attention_mask, dtype=np.int64)
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    # ------------------------------------------------------------------ decoding

    def batch_decode(self, sequences, skip_special_tokens: bool = True, keep_image_tokens: bool = False, **kwargs):
        """Decode [B, L] ids (non-negative ints). Image runs (`<|startofimage|>` + placeholders) are removed unless
        `keep_image_tokens`; other special tokens are removed with `skip_special_tokens` (default `True`)."""
        sequences = _to_id_lists(sequences)
        if not keep_image_tokens:
            image_ids = {self.soi_token_id, self.image_token_id}
            sequences = [[t for t in seq if t not in image_ids] for seq in sequences]
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)

    def decode(self, token_ids, skip_special_tokens: bool = True, keep_image_tokens: bool = False, **kwargs) -> str:
        """Decode one sequence [L]; see `batch_decode`."""
        return self.batch_decode([token_ids], skip_special_tokens, keep_image_tokens, **kwargs)[0]

    def decode_interleaved(self, token_ids, skip_special_tokens: bool = True, **kwargs) -> list:
        """Segments of a sequence [L]: decoded text pieces and "<image>" for each image (a `<|startofimage|>`
        with its placeholders). A batch [B, L] gives one list per row. Empty text pieces are left out."""
        if isinstance(token_ids, (torch.Tensor, np.ndarray)) and token_ids.ndim == 2:
            return [self.decode_interleaved(row, skip_special_tokens, **kwargs) for row in token_ids]
        if isinstance(token_ids, (list, tuple)) and token_ids and isinstance(token_ids[0], (list, tuple)):
            return [self.decode_interleaved(row, skip_special_tokens, **kwargs) for row in token_ids]
        if isinstance(token_ids, (list, tuple)) and token_ids and isinstance(token_ids[0], (torch.Tensor, np.ndarray)):
            return [self.decode_interleaved(row, skip_special_tokens, **kwargs) for row in token_ids]
        ids = _id_row(token_ids, 0)
        segments, text = [], []

        def flush():
            piece = self.tokenizer.decode(text, skip_special_tokens=skip_special_tokens, **kwargs) if text else ""
            if piece:
                segments.append(piece)
            text.clear()

        for token in ids:
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
