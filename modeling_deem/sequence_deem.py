"""DEEM's sequence rules (reference §2.5, §2.8, §4.1), one implementation each: where the image placeholder runs
are, which images a token may see (its document starts at the nearest ``<s>``), where each image's decoder
context starts, which tokens are supervised, and the next-token loss."""

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from .configuration_deem import DeemConfig


@dataclass
class DeemImageMemory:
    """The images of a batch as the LLM reads them, computed once (by ``DeemModel.image_memory``) and reused at
    every decoding step: ``generate`` passes it to ``forward`` as ``image_memory``.

    ``vision_states`` [B, N, S, E]: each row's images as the gated cross-attention reads them (the flattened
    multi-scale maps, zeros past a row's images); ``spatial_shapes``: the (h, w) of those levels;
    ``image_starts`` [B, N]: absolute position of each image's first placeholder (-1 where a row has fewer images);
    ``image_embeds`` [B, N, Q, H]: each row's image tokens, scattered into the placeholders of the ``input_ids``
    a forward is given (``None`` when they are embedded already); ``projected`` [B, K, N, S, E]: the value
    projection of ``vision_states`` by each of the K cross-attention layers of the model ``projected_by`` (an
    ``id``), made once by ``DeemModel.project_image_memory`` so that decoding does not redo it; another model (an
    assistant) reads ``vision_states`` instead.
    """

    vision_states: torch.Tensor
    spatial_shapes: list[tuple[int, int]]
    image_starts: torch.Tensor
    image_embeds: torch.Tensor | None = None
    projected: torch.Tensor | None = None
    projected_by: int | None = None

    @property
    def batch_size(self) -> int:
        return self.image_starts.shape[0]

    def _map(self, fn) -> "DeemImageMemory":
        keep = lambda t: None if t is None else fn(t)  # noqa: E731
        return replace(
            self,
            vision_states=fn(self.vision_states),
            image_starts=fn(self.image_starts),
            image_embeds=keep(self.image_embeds),
            projected=keep(self.projected),
        )

    def repeat_interleave(self, repeats: int) -> "DeemImageMemory":
        """Each row ``repeats`` times in a row (beam search, ``num_return_sequences``)."""
        return self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def select(self, rows: torch.Tensor) -> "DeemImageMemory":
        """The memory of ``rows`` only."""
        return self._map(lambda t: t[rows.to(t.device)])

    def states_for(self, model) -> tuple[torch.Tensor, bool]:
        """(what ``model``'s cross-attention layers read, whether it is already projected per layer)."""
        if self.projected is not None and self.projected_by == id(model):
            return self.projected, True
        return self.vision_states, False


def _image_runs(input_ids: torch.Tensor, image_token_id: int) -> list[tuple[int, int, int]]:
    """(row, start, length) of every run of image placeholders, in row-major order."""
    is_img = input_ids == image_token_id
    if not bool(is_img.any()):  # decoding steps and text-only batches: no run scan
        return []
    prev = F.pad(is_img[:, :-1], (1, 0), value=False)
    nxt = F.pad(is_img[:, 1:], (0, 1), value=False)
    starts = (is_img & ~prev).nonzero().tolist()
    ends = (is_img & ~nxt).nonzero().tolist()
    return [(b, s, e - s + 1) for (b, s), (_, e) in zip(starts, ends)]


def _image_start_table(runs, batch: int, n_max: int, device) -> torch.Tensor:
    """[B, N_max] position of each image's first placeholder, -1 where a row has fewer images."""
    table = torch.full((batch, n_max), -1, dtype=torch.long)
    count = [0] * batch
    for b, s, _ in runs:
        table[b, count[b]] = s
        count[b] += 1
    return table.to(device)


def cross_attention_visibility(
    input_ids: torch.Tensor, image_starts: torch.Tensor, bos_token_id: int, offset: int = 0
) -> torch.Tensor:
    """[B, L, N] bool: token l sees image n iff start_n <= l and start_n > nearest ``<s>`` at or before l (§2.5).

    ``image_starts`` [B,N] absolute positions of the images' first placeholders (-1: no image); ``offset``:
    absolute position of ``input_ids[:, 0]`` (cached decoding)."""
    pos = torch.arange(input_ids.shape[1], device=input_ids.device) + offset
    document = nearest_bos(input_ids, bos_token_id, offset)  # [B,L]
    starts = image_starts[:, None, :]
    return (starts >= 0) & (starts <= pos[None, :, None]) & (starts > document[..., None])


NIP_CONTEXT_STARTS = ("nearest_bos", "row_start")


def _image_context_spans(runs, input_ids, attention_mask, bos_token_id, context_start: str = "nearest_bos"):
    """Per image: row, position of its ``<|startofimage|>``, and the first context position. ``context_start``
    "nearest_bos" (default): the nearest ``<s>`` before the soi (the image's own document), or the first real token
    of the row; "row_start": the first real token of the row, what the original computes when it is not given
    ``nearest_bos_idxs`` (§2.8), so that packed rows reproduce its NIP numbers. Returns three [N] long tensors."""
    if context_start not in NIP_CONTEXT_STARTS:
        raise ValueError(f"context_start must be one of {NIP_CONTEXT_STARTS}, got {context_start!r}")
    device = input_ids.device
    rows = torch.tensor([b for b, _, _ in runs], dtype=torch.long, device=device)
    soi = torch.tensor([s - 1 for _, s, _ in runs], dtype=torch.long, device=device)
    first_real = torch.zeros(input_ids.shape[0], dtype=torch.long, device=device)
    if attention_mask is not None:
        first_real = attention_mask.long().argmax(dim=1)
    if context_start == "row_start":
        return rows, soi, first_real[rows]
    nearest = nearest_bos(input_ids, bos_token_id)[rows, soi]
    return rows, soi, torch.maximum(nearest, first_real[rows])


def last_position(input_ids: torch.Tensor, token_id: int, offset: int = 0) -> torch.Tensor:
    """[B, L] absolute position of the last ``token_id`` at or before each token (-1 where there is none);
    ``offset``: absolute position of ``input_ids[:, 0]``."""
    pos = torch.arange(input_ids.shape[1], device=input_ids.device) + offset
    at = torch.where(input_ids == token_id, pos[None], torch.full_like(input_ids, -1))
    return torch.cummax(at, dim=1).values


def nearest_bos(input_ids: torch.Tensor, bos_token_id: int, offset: int = 0) -> torch.Tensor:
    """[B, L] position of the nearest ``<s>`` at or before each token (-1: none): where its document starts (§2.5)."""
    return last_position(input_ids, bos_token_id, offset)


def image_conditioned(input_ids: torch.Tensor, bos_token_id: int, soi_token_id: int) -> torch.Tensor:
    """[B, L] bool: an image of the token's own document starts at or before it (the last ``<|startofimage|>`` at
    or before the token comes after the last ``<s>`` at or before it), §4.1 rule 2."""
    last_soi = last_position(input_ids, soi_token_id)
    last_bos = last_position(input_ids, bos_token_id)
    return (last_soi >= 0) & (last_soi > last_bos)


def default_labels(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    config: DeemConfig,
    supervised: torch.Tensor | None = None,
    no_image_no_loss=None,
) -> torch.Tensor:
    """Next-token targets by the rules of §4.1 (unshifted, HF convention), the one implementation the model, the
    collators and the trainer's token count use: ignore padding (``attention_mask`` 0, or the pad id when no mask
    is given), image placeholders, ``<s>``, and a ``<|startofimage|>`` that directly follows ``<s>`` (an image
    opening a document is not predicted).

    ``supervised`` [B, L] bool (optional): tokens of unsupervised segments (SFT prompts) are ignored too.
    ``no_image_no_loss`` (bool, or [B] bool per row; optional): the original's rule for the sources in
    ``dataset_to_ignore_noimage_cond_loss`` (§4.1 rule 2): a token with no image of its own document at or before
    it is ignored."""
    labels = input_ids.clone()
    ignore = (input_ids == config.image_token_id) | (input_ids == config.bos_token_id)
    ignore |= (attention_mask == 0) if attention_mask is not None else (input_ids == config.pad_token_id)
    prev = F.pad(input_ids[:, :-1], (1, 0), value=-1)
    ignore |= (input_ids == config.soi_token_id) & (prev == config.bos_token_id)
    if supervised is not None:
        ignore |= ~supervised.to(device=input_ids.device, dtype=torch.bool)
    if no_image_no_loss is not None and bool(torch.as_tensor(no_image_no_loss).any()):
        rows = torch.as_tensor(no_image_no_loss, dtype=torch.bool, device=input_ids.device).reshape(-1, 1)
        ignore |= rows & ~image_conditioned(input_ids, config.bos_token_id, config.soi_token_id)
    return labels.masked_fill(ignore, -100)


def pad_rows(rows, pad_value: int, side: str = "right", width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Variable-length rows (lists / 1-D tensors of ints) -> ([B, W] long padded with ``pad_value``, [B, W] long
    attention mask), padded on the ``side`` ("right" for training, "left" for decoding); W = the longest row or
    ``width``. The one padding rule of the collators."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    rows = [torch.as_tensor(r, dtype=torch.long).reshape(-1) for r in rows]
    width = max((len(r) for r in rows), default=0) if width is None else int(width)
    out = torch.full((len(rows), width), pad_value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r)
        cols = slice(0, n) if side == "right" else slice(width - n, width)
        out[i, cols] = r
        mask[i, cols] = 1
    return out, mask


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Cross-entropy of logits[:, :-1] against labels[:, 1:] in fp32; mean over supervised targets, or sum /
    ``num_items_in_batch`` (gradient accumulation)."""
    shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1).to(shift_logits.device)
    if num_items_in_batch is None:
        if not bool((shift_labels != -100).any()):
            return shift_logits.sum() * 0.0
        return F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
    total = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
    return total / torch.as_tensor(num_items_in_batch, device=total.device, dtype=total.dtype)


def _describe(x) -> str:
    return f"shape {tuple(x.shape)}, dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__


def check_token_ids(config: DeemConfig, ids, name: str = "input_ids", allow_ignore: bool = False) -> None:
    """Integer ids the model can embed: 0 <= id < vocab (``-100`` too with ``allow_ignore``, for labels)."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(ids).__name__}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
    if ids.device.type == "meta":
        raise ValueError(f"{name} is on the meta device (a tensor without data); give real tensors")
    if ids.numel() == 0:
        return
    vocab = config.text_config.vocab_size
    values = ids[ids != -100] if allow_ignore else ids
    if values.numel() == 0:
        return
    low, high = (int(v) for v in torch.aminmax(values))  # one pass, one read-back
    if low < 0 or high >= vocab:
        allowed = f"[0, {vocab})" + (" or -100 (ignored)" if allow_ignore else "")
        bad = low if low < 0 else high
        raise ValueError(f"{name} holds id {bad}, outside the model's vocabulary {allowed}")


def check_pixel_layout(pixels, name: str, channels: int = 3) -> None:
    """A float [N, C, H, W] tensor with data (type, device, shape and dtype only: no pass over the values)."""
    if not isinstance(pixels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(pixels).__name__}")
    if pixels.device.type == "meta":
        raise ValueError(f"{name} is on the meta device (a tensor without data); give real tensors")
    if pixels.dim() != 4:
        raise ValueError(f"{name} must be a 4-D [N, {channels}, H, W] tensor, got shape {tuple(pixels.shape)}")
    if pixels.shape[1] != channels:
        raise ValueError(
            f"{name} must have {channels} channel(s), got {pixels.shape[1]} ({channels} channels expected, shape "
            f"{tuple(pixels.shape)})"
        )
    if not pixels.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor in [0, 1], got dtype {pixels.dtype} (divide 0-255 images by 255 "
            "or use the processor)"
        )


def check_pixels(pixels, name: str, channels: int = 3) -> None:
    """A float [N, C, H, W] image batch with finite values in [0, 1] (the model normalises them itself)."""
    check_pixel_layout(pixels, name, channels)
    if pixels.numel() == 0:
        return
    if not bool(torch.isfinite(pixels).all()):
        raise ValueError(f"{name} holds NaN or infinite values")
    low, high = float(pixels.min()), float(pixels.max())
    if low < -1e-4 or high > 1 + 1e-4:
        if low < -1e-4:
            hint = " (already normalised? give [0, 1] pixels, the model normalises them itself)"
        else:
            hint = " (0-255 data: divide by 255)" if high > 1.5 else ""
        raise ValueError(f"{name} must be in [0, 1], got values from {low:.4g} to {high:.4g}{hint}")


def check_sequence_inputs(
    config: DeemConfig,
    input_ids,
    attention_mask=None,
    pixel_values=None,
    image_masks=None,
    num_images=None,
    past_len: int = 0,
    images_encoded: bool = False,
):
    """Check what the LLM side reads, before any work; returns (image runs, images per row [B]).

    ``images_encoded``: the images come already encoded (``image_embeds`` / ``vision_states``), so no
    ``pixel_values`` are expected for the placeholders."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    for name, value in (
        ("input_ids", input_ids),
        ("attention_mask", attention_mask),
        ("pixel_values", pixel_values),
        ("image_masks", image_masks),
        ("num_images", num_images),
    ):
        if isinstance(value, torch.Tensor) and value.device.type == "meta":
            raise ValueError(f"{name} is on the meta device (a tensor without data); give real tensors")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
    if input_ids.shape[0] == 0 or (input_ids.shape[1] == 0 and past_len == 0):
        raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}): give at least one token per row")
    check_token_ids(config, input_ids)
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"attention_mask must be a torch.Tensor or None, got {type(attention_mask).__name__}")
        if attention_mask.dim() not in (2, 4):
            raise ValueError(
                "attention_mask must be [batch, seq_len] (or a 4-D additive mask), got shape "
                f"{tuple(attention_mask.shape)}"
            )
        # decoding steps get the library's own masks: the value scan runs once, on the whole mask
        if attention_mask.dim() == 2 and attention_mask.numel() and past_len == 0:
            if attention_mask.is_floating_point() and not bool(torch.isfinite(attention_mask).all()):
                raise ValueError("attention_mask holds NaN or infinite values")
            if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
                raise ValueError("a 2-D attention_mask must hold 0 (padding) and 1 (token) only")
    # their values are the image encoder's to check (it reads them first): one pass over the pixels
    if pixel_values is not None:
        check_pixel_layout(pixel_values, "pixel_values")
    if image_masks is not None:
        check_pixel_layout(image_masks, "image_masks", channels=1)
    max_len = config.text_config.max_position_embeddings
    total = past_len + input_ids.shape[1]
    if total > max_len:
        raise ValueError(f"sequence length {total} exceeds the model's maximum of {max_len} tokens")
    if (
        attention_mask is not None
        and attention_mask.dim() == 2
        and tuple(attention_mask.shape) != (input_ids.shape[0], total)
    ):
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids shape "
            f"{tuple(input_ids.shape)} (+ {past_len} cached tokens)"
        )
    runs = _image_runs(input_ids, config.image_token_id)
    bad = [(b, s, n) for b, s, n in runs if n != config.num_image_tokens]
    if bad:
        b, s, n = bad[0]
        raise ValueError(
            f"row {b}: image placeholder run at position {s} has {n} tokens, expected "
            f"{config.num_image_tokens} per image"
        )
    for b, s, _ in runs:
        if s == 0 or input_ids[b, s - 1] != config.soi_token_id:
            raise ValueError(
                f"row {b}: image placeholders at position {s} are not preceded by the <|startofimage|> token"
            )
    per_row = torch.zeros(input_ids.shape[0], dtype=torch.long)
    for b, _, _ in runs:
        per_row[b] += 1
    n_images = int(per_row.sum())
    n_given = 0 if pixel_values is None else pixel_values.shape[0]
    if n_images != n_given and not images_encoded:
        raise ValueError(
            f"input_ids hold {n_images} image(s) (placeholder runs) but {n_given} image(s) were given in pixel_values"
        )
    if num_images is not None and not isinstance(num_images, (torch.Tensor, list, tuple)):
        raise TypeError(f"num_images must be a tensor or list of per-row counts, got {type(num_images).__name__}")
    if num_images is not None and torch.as_tensor(num_images).is_floating_point():
        raise TypeError(f"num_images must hold integer counts, got {_describe(torch.as_tensor(num_images))}")
    if num_images is not None and tuple(torch.as_tensor(num_images).shape) not in ((input_ids.shape[0],),):
        raise ValueError(
            f"num_images must hold one count per row ({input_ids.shape[0]}), "
            f"got {_describe(torch.as_tensor(num_images))}"
        )
    if num_images is not None and not torch.equal(torch.as_tensor(num_images).cpu().long(), per_row):
        raise ValueError(
            f"num_images {torch.as_tensor(num_images).tolist()} does not match the images found per "
            f"row {per_row.tolist()}"
        )
    if image_masks is not None and pixel_values is not None and image_masks.shape[0] != pixel_values.shape[0]:
        raise ValueError(f"image_masks has {image_masks.shape[0]} masks for {pixel_values.shape[0]} images")
    return runs, per_row


def pad_per_row(items: torch.Tensor, per_row: torch.Tensor) -> torch.Tensor:
    """Row-major per-image tensors [N,...] -> per row [B,N_max,...] (zeros where a row has fewer images)."""
    n_max = max(int(per_row.max()), 1) if per_row.numel() else 1
    out = items.new_zeros(per_row.shape[0], n_max, *items.shape[1:])
    for b, chunk in enumerate(items.split(per_row.tolist())):
        out[b, : chunk.shape[0]] = chunk
    return out


def unpad_per_row(items: torch.Tensor, per_row: torch.Tensor, name: str = "image_embeds") -> torch.Tensor | None:
    """Per row [B,N_max,...] -> the row-major images [N,...] that ``per_row`` counts (``None`` if there are none)."""
    if items.dim() < 2 or items.shape[0] != per_row.shape[0]:
        raise ValueError(
            f"{name} must be [batch, images per row, ...] with batch {per_row.shape[0]}, got shape {tuple(items.shape)}"
        )
    if int(per_row.sum()) == 0:
        return None
    if int(per_row.max()) > items.shape[1]:
        raise ValueError(f"input_ids hold up to {int(per_row.max())} image(s) per row but {name} has {items.shape[1]}")
    return torch.cat([items[b, : int(n)] for b, n in enumerate(per_row.tolist())])


def left_align(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, pad_token_id: int):
    """Prompts padded on the right (or anywhere) -> the same rows padded on the left, what decoding appends to
    (each row's real tokens keep their order, so its images keep theirs). Rows already left-aligned are returned
    as they are."""
    if attention_mask is None or attention_mask.dim() != 2:
        return input_ids, attention_mask
    mask = attention_mask.to(torch.long)
    length = mask.shape[1]
    real = mask.sum(1)
    aligned = torch.arange(length, device=mask.device)[None] >= (length - real)[:, None]
    if torch.equal(mask.bool(), aligned):
        return input_ids, attention_mask
    # stable sort: padding first, then the real tokens in their order
    order = torch.argsort(mask, dim=1, stable=True)
    ids = torch.gather(input_ids, 1, order).masked_fill(~aligned, pad_token_id)
    return ids, aligned.to(attention_mask.dtype)
