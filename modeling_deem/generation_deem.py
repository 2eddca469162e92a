"""Generation for DEEM: text on the stock ``GenerationMixin`` (the prompt's images encoded once, their
cross-attention memory reused at every step), interleaved text and images (``soi="draw"``), option scoring,
text-to-image, and a streamer of text pieces and images.

This file must not import ``modeling_deem`` (``modeling_deem`` imports it).
"""

import inspect
import queue
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import (
    GenerationConfig,
    GenerationMixin,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteriaList,
    TextIteratorStreamer,
)
from transformers.cache_utils import DynamicCache
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.utils import logging

from .compat import CACHE_FIELD
from .sequence_deem import (
    DeemImageMemory,
    check_sequence_inputs,
    check_token_ids,
    cross_attention_visibility,
    left_align,
    nearest_bos,
)

logger = logging.get_logger(__name__)

# generate() arguments that only interleaved drawing reads
_DRAW_ARGUMENTS = {"num_inference_steps", "guidance_scale", "max_new_images", "height", "width", "generator"}


@dataclass
class DeemGenerateOutput(GenerateDecoderOnlyOutput):
    """Output of interleaved generation (``soi="draw"``): transformers' ``GenerateDecoderOnlyOutput``
    (``sequences``; ``scores`` / ``logits`` / ``attentions`` / ``hidden_states`` with ``output_scores`` /
    ``output_logits`` / ``output_attentions`` / ``output_hidden_states``; the cache with ``use_cache``) plus the
    images.

    ``sequences`` [B, T]: prompt + generated ids; every drawn image appears as ``<|startofimage|>`` followed by
    its placeholders (padding inside a row, where other rows drew an image, has ``attention_mask`` 0).
    ``attention_mask`` [B, T]. ``images``: per row, the drawn images as [3, D, D] tensors in [0, 1], in order.
    ``attentions`` / ``hidden_states`` hold one entry per forward pass, as the library's: the prompt, then each
    generated token, plus one for each step in which images were drawn (their tokens are read in a pass of
    their own). Draw mode returns this object unless ``return_dict_in_generate=False`` is passed, which returns
    ``sequences`` alone (as every transformers model does) and drops the images.
    """

    attention_mask: torch.LongTensor | None = None
    images: list[list[torch.Tensor]] | None = None


class _GenerationFailed:
    """Queue item that carries the exception which ended ``generate`` early."""

    def __init__(self, error: BaseException):
        self.error = error


class DeemStreamer(TextIteratorStreamer):
    """Iterate over what ``generate`` produces, in order: text pieces (``str``) and, with ``soi="draw"``, each
    drawn image (``torch.Tensor`` [3,H,W] in [0,1]) as soon as it exists. Use it like ``TextIteratorStreamer``:
    run ``generate(..., streamer=streamer)`` in a thread and iterate in another. Batch size 1.

    It never waits forever: when ``generate`` fails, iterating raises that exception; when the generating thread
    ends without closing the stream (killed, or a ``generate`` that is not DEEM's), iterating raises a
    ``RuntimeError`` within ``poll_interval`` seconds; ``timeout`` (seconds without any new item) raises
    ``queue.Empty`` as in ``TextIteratorStreamer``."""

    def __init__(
        self,
        tokenizer,
        skip_prompt: bool = False,
        timeout: float | None = None,
        poll_interval: float = 0.05,
        **decode_kwargs,
    ):
        super().__init__(tokenizer, skip_prompt=skip_prompt, timeout=timeout, **decode_kwargs)
        self.poll_interval = poll_interval
        self._producer: threading.Thread | None = None

    def attach(self):
        """Called by ``generate`` in the thread that generates: that thread's end is watched while iterating."""
        self._producer = threading.current_thread()

    def fail(self, error: BaseException):
        """Called by ``generate`` when it fails: the consumer gets ``error`` raised instead of waiting."""
        self.text_queue.put(_GenerationFailed(error))

    def put(self, value):
        if self._producer is None:
            self.attach()
        super().put(value)

    def __next__(self):
        waited = 0.0
        while True:
            try:
                value = self.text_queue.get(timeout=self.poll_interval)
                break
            except queue.Empty:
                waited += self.poll_interval
                producer = self._producer
                if producer is not None and producer is not threading.current_thread() and not producer.is_alive():
                    # the producer may have closed the stream just before ending: look once more
                    try:
                        value = self.text_queue.get_nowait()
                        break
                    except queue.Empty:
                        raise RuntimeError("the generating thread ended without finishing the stream") from None
                if self.timeout is not None and waited >= self.timeout:
                    raise
        if isinstance(value, _GenerationFailed):
            raise value.error
        if value is self.stop_signal:
            raise StopIteration()
        return value

    def put_image(self, row: int, image: torch.Tensor):
        if row != 0:
            raise ValueError("DeemStreamer streams one row (batch size 1)")
        if self.token_cache:  # flush the text that precedes the image
            text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
            self.on_finalized_text(text[self.print_len :])
            self.token_cache, self.print_len = [], 0
        self.text_queue.put(image.detach().float().cpu(), timeout=self.timeout)


class TokenSuppression(LogitsProcessor):
    """Never generate ``token_ids``: one precomputed bias (-inf at those ids, 0 elsewhere) added to the scores.

    The same scores as transformers' ``SuppressTokensLogitsProcessor``, which builds a vocabulary-sized ``isin``
    mask at every step; the bias is built once per vocabulary size / device / dtype."""

    def __init__(self, token_ids):
        self.token_ids = sorted({int(t) for t in token_ids})
        self._bias = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        bias = self._bias
        if (
            bias is None
            or bias.shape[0] != scores.shape[-1]
            or bias.device != scores.device
            or bias.dtype != scores.dtype
        ):
            bias = torch.zeros(scores.shape[-1], device=scores.device, dtype=scores.dtype)
            bias[[t for t in self.token_ids if t < scores.shape[-1]]] = -float("inf")
            self._bias = bias
        return scores + bias


class _ProcessorList(LogitsProcessorList):
    """The library's ``LogitsProcessorList`` that reads each processor's ``__call__`` signature once per
    ``generate`` call instead of at every step (``inspect.signature`` is most of its per-step cost at small sizes);
    the same calls, in the same order, with the same error for a missing keyword."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        extra = self.__dict__.setdefault("_extra_arguments", {})
        for processor in self:
            names = extra.get(id(processor))
            if names is None:
                names = extra[id(processor)] = list(inspect.signature(processor.__call__).parameters)
            if len(names) > 2:
                if not all(name in kwargs for name in names[2:]):
                    raise ValueError(
                        f"Make sure that all the required parameters: {names} for "
                        f"{processor.__class__} are passed to the logits processor."
                    )
                scores = processor(input_ids, scores, **kwargs)
            else:
                scores = processor(input_ids, scores)
        return scores


class DeemGenerationMixin(GenerationMixin):
    """What ``DeemForInterleavedGeneration`` generates with; it reads ``self.model`` (``DeemModel``),
    ``self.image_decoder`` (``DeemImageDecoder``) and ``self.config``."""

    def generate(self, *args, **kwargs):
        """See ``_generate``. A streamer with ``fail`` (``DeemStreamer``) gets the exception if generation fails,
        so whoever iterates it is not left waiting."""
        streamer = kwargs.get("streamer")
        if hasattr(streamer, "attach"):
            streamer.attach()
        try:
            return self._generate(*args, **kwargs)
        except BaseException as error:
            if hasattr(streamer, "fail"):
                streamer.fail(error)
            raise

    @torch.no_grad()
    def _generate(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_masks: torch.FloatTensor | None = None,
        num_images: torch.LongTensor | None = None,
        pixel_values_decoder: torch.FloatTensor | None = None,
        soi: str | None = None,
        right_padding: str = "left_align",
        **kwargs,
    ):
        """Generation. ``soi``: what ``<|startofimage|>`` does —

        * ``"draw"``: interleaved generation, where a row that emits it gets an image drawn by the diffusion
          decoder from its context, encoded and appended, and goes on writing (see ``_generate_interleaved``);
          returns a [`DeemGenerateOutput`] with the images (``sequences`` alone with
          ``return_dict_in_generate=False``);
        * ``"stop"``: ends the row, like the original's ``generate_texts``; ``"suppress"``: never generated. Both
          are the stock ``GenerationMixin`` (greedy, sampling, beam search, assisted decoding, ``GenerationConfig``,
          ``Cache`` objects) and return what it returns;
        * ``None`` (default): ``"draw"`` when the model has diffusion weights and the images can reach the caller
          (``return_dict_in_generate=True``, or a streamer with ``put_image`` such as [`DeemStreamer`]) in greedy
          or sampled decoding, or when an argument only drawing reads is given (``num_inference_steps``,
          ``guidance_scale``, ``max_new_images``, ``height``, ``width``, ``generator``); else ``"stop"``. So a plain
          call returns the token ids as every transformers model does, and ``generate(**inputs,
          return_dict_in_generate=True).images`` holds the drawn images.

        The prompt's images are encoded once into one [`DeemImageMemory`], reused at every step. Image
        placeholders are never generated. ``pixel_values_decoder`` is accepted (processor output) and unused.

        Prompts padded on the right (what training collators produce) are left-aligned first, so every row
        continues exactly as it would alone (``right_padding="left_align"``, the default). ``right_padding=
        "continue"`` decodes after the padding instead, as the original's ``generate_texts`` does on a right-padded
        batch (its first new token is then read at a pad position); it exists to reproduce the original."""
        cfg = self.config
        if soi is None:
            soi = self._default_soi(input_ids, kwargs)
        if soi not in ("stop", "suppress", "draw"):
            raise ValueError(f"soi must be 'draw', 'stop', 'suppress' or None, got {soi!r}")
        if input_ids is None:
            if kwargs.get("inputs_embeds") is None:
                raise ValueError(
                    "generate needs input_ids (use the processor) or, for a text-only prompt, inputs_embeds"
                )
            if soi == "draw" or pixel_values is not None:
                raise ValueError(
                    "a prompt given as inputs_embeds is text only: pass input_ids for images or soi='draw'"
                )
            self._text_mode_kwargs(kwargs, soi)
            return super().generate(attention_mask=attention_mask, **kwargs)
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError(
                "give input_ids or inputs_embeds, not both (the image placeholders are read from input_ids)"
            )
        if right_padding not in ("left_align", "continue"):
            raise ValueError(f"right_padding must be 'left_align' or 'continue', got {right_padding!r}")
        if right_padding == "left_align":
            input_ids, attention_mask = left_align(input_ids, attention_mask, self.config.pad_token_id)
        max_new = (
            kwargs.get("max_new_tokens") or (kwargs.get("generation_config") or self.generation_config).max_new_tokens
        )
        limit = cfg.text_config.max_position_embeddings
        if max_new is not None and input_ids.shape[1] + max_new > limit:
            raise ValueError(
                f"prompt length {input_ids.shape[1]} + max_new_tokens {max_new} exceeds the model's "
                f"maximum of {limit} tokens"
            )
        # an assistant model (assisted decoding) gets the main model's encoded images, not pixels
        encoded = pixel_values is None and kwargs.get("image_memory") is not None
        runs, per_row = check_sequence_inputs(
            self.config, input_ids, attention_mask, pixel_values, image_masks, num_images, images_encoded=encoded
        )
        if soi == "draw":
            return self._generate_interleaved(
                input_ids, attention_mask, pixel_values, image_masks, runs, per_row, **kwargs
            )
        if pixel_values is not None and pixel_values.shape[0] > 0:
            if kwargs.get("image_memory") is not None:
                raise ValueError("give pixel_values or image_memory (the images already encoded), not both")
            enc = self.model.image_encoder(pixel_values.to(self.dtype), image_masks)
            # one object per batch, per row (beam search / num_return_sequences expand it like every batch input);
            # each forward scatters its image tokens into the placeholders it is given (all of them without a cache)
            memory = self.model.image_memory(enc, runs, per_row, input_ids.shape[0])
            kwargs["image_memory"] = self.model.project_image_memory(memory)
        self._text_mode_kwargs(kwargs, soi)
        return super().generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def _default_soi(self, input_ids, kwargs: dict) -> str:
        """``"draw"`` when this model can draw, the caller can receive the images and the decoding mode is one the
        interleaved loop runs; ``"stop"`` otherwise."""
        if not self.has_diffusion or kwargs.get("image_memory") is not None:
            return "stop"  # no diffusion weights, or an assistant given the main model's encoded images
        config = kwargs.get("generation_config") or self.generation_config
        asks_to_draw = sorted(set(kwargs) & _DRAW_ARGUMENTS)  # arguments only drawing reads: the caller means it
        receives = bool(kwargs.get("return_dict_in_generate", config.return_dict_in_generate)) or hasattr(
            kwargs.get("streamer"), "put_image"
        )
        if not receives and not asks_to_draw:
            return "stop"
        setting = lambda name: kwargs.get(name, getattr(config, name, None))  # noqa: E731
        other_modes = [
            name
            for name, used in (
                ("num_beams > 1", (setting("num_beams") or 1) > 1),
                ("assistant_model", kwargs.get("assistant_model") is not None),
                ("prompt_lookup_num_tokens", setting("prompt_lookup_num_tokens") is not None),
                ("cache_implementation", setting("cache_implementation") is not None),
                ("a given cache", any(kwargs.get(k) is not None for k in ("cache", "past_key_values"))),
                ("inputs_embeds", input_ids is None),
                ("custom_generate", kwargs.get("custom_generate") is not None),
            )
            if used
        ]
        if other_modes:
            logger.warning_once(
                f"generate() draws images in greedy or sampled decoding only; with {', '.join(other_modes)} "
                "<|startofimage|> ends the row (pass soi='stop' to say so, or soi='draw' with greedy / sampling)"
            )
            return "stop"
        if not asks_to_draw:
            # chosen by default, draw mode returns what the config says (the bare sequences when only a streamer
            # receives the images)
            kwargs.setdefault("return_dict_in_generate", bool(config.return_dict_in_generate))
        return "draw"

    def _text_mode_kwargs(self, kwargs: dict, soi: str):
        """Image placeholders are never generated; ``<|startofimage|>`` is suppressed or ends the row."""
        cfg = self.config
        suppress = [cfg.image_token_id] + ([cfg.soi_token_id] if soi == "suppress" else [])
        # a fixed bias (one add per step) rather than the library's per-step vocabulary isin; the caller's own
        # suppress_tokens still go to the library's processor
        processors = LogitsProcessorList(list(kwargs.get("logits_processor") or []))
        processors.append(TokenSuppression(suppress))
        kwargs["logits_processor"] = processors
        if soi == "stop":  # on top of the end-of-sequence ids in use (the caller's or the config's)
            eos = kwargs.get("eos_token_id")
            if eos is None:
                eos = (kwargs.get("generation_config") or self.generation_config).eos_token_id
            if isinstance(eos, torch.Tensor):
                eos = eos.tolist()
            eos = list(eos) if isinstance(eos, (list, tuple)) else [eos if eos is not None else cfg.eos_token_id]
            kwargs["eos_token_id"] = sorted(set(eos) | {cfg.soi_token_id})

    @torch.no_grad()
    def score_options(
        self, input_ids, options, attention_mask=None, pixel_values=None, image_masks=None, num_images=None
    ):
        """Log-likelihood of each answer option after each prompt (how yes/no and multiple-choice benchmarks are
        scored, §5.3). ``input_ids`` [B,L] left-padded prompts (with their images); ``options``: token-id lists
        (without ``<s>``), the same for every row. Returns [B, num_options]: the summed log-probabilities of the
        option tokens. Every image is encoded once per row (the original encoded only a mini-batch's first, B18)."""
        cfg = self.config
        check_token_ids(cfg, input_ids)
        if isinstance(options, torch.Tensor):
            options = options.tolist()
        if not isinstance(options, (list, tuple)) or not options:
            raise ValueError(f"options must be a non-empty list of token-id lists, got {options!r}")
        options = [o.tolist() if isinstance(o, torch.Tensor) else o for o in options]
        for i, option in enumerate(options):
            if not isinstance(option, (list, tuple)) or not option:
                raise ValueError(f"options[{i}] must be a non-empty list of token ids, got {option!r}")
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in option):
                raise TypeError(f"options[{i}] must hold integer token ids, got {option!r}")
            check_token_ids(cfg, torch.tensor(option), f"options[{i}]")
        options = [list(o) for o in options]
        batch, n_opt = input_ids.shape[0], len(options)
        width = max(len(o) for o in options)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        input_ids, attention_mask = left_align(input_ids, attention_mask, cfg.pad_token_id)
        rows, masks, targets = [], [], []
        for b in range(batch):
            for opt in options:
                ids = torch.tensor(list(opt) + [cfg.pad_token_id] * (width - len(opt)), device=input_ids.device)
                rows.append(torch.cat([input_ids[b], ids]))
                masks.append(torch.cat([attention_mask[b], (torch.arange(width, device=ids.device) < len(opt)).long()]))
                targets.append(len(opt))
        ids, mask = torch.stack(rows), torch.stack(masks)
        memory = None
        if pixel_values is not None:
            runs, per_row = check_sequence_inputs(
                self.config, input_ids, attention_mask, pixel_values, image_masks, num_images
            )
            if pixel_values.shape[0] > 0:  # each image encoded once, its memory shared by the row's option rows
                enc = self.model.image_encoder(pixel_values.to(self.dtype), image_masks)
                memory = self.model.image_memory(enc, runs, per_row, batch).repeat_interleave(n_opt)
                memory = self.model.project_image_memory(memory)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self(
            input_ids=ids, attention_mask=mask, image_memory=memory, position_ids=position_ids, return_loss=False
        ).logits
        logprobs = logits[:, input_ids.shape[1] - 1 : -1].float().log_softmax(-1)
        option_ids = ids[:, input_ids.shape[1] :]
        picked = logprobs.gather(-1, option_ids[..., None]).squeeze(-1)
        valid = torch.arange(width, device=ids.device)[None] < torch.tensor(targets, device=ids.device)[:, None]
        return (picked * valid).sum(-1).view(batch, n_opt)

    @torch.no_grad()
    def generate_images(
        self, input_ids, attention_mask=None, pixel_values=None, image_masks=None, num_images=None, **kwargs
    ):
        """Text-to-image (and image-conditioned image generation): each prompt row gets ``<|startofimage|>``
        appended and one image drawn from its context. Left-padded prompts; ``kwargs`` as in interleaved
        ``generate`` (``num_inference_steps``, ``guidance_scale``, ``generator``, ...). Returns a list of
        [3,D,D] tensors in [0,1], one per row."""
        cfg = self.config
        soi = torch.full((input_ids.shape[0], 1), cfg.soi_token_id, dtype=input_ids.dtype, device=input_ids.device)
        ids = torch.cat([input_ids, soi], 1)
        mask = torch.cat(
            [attention_mask if attention_mask is not None else torch.ones_like(input_ids), torch.ones_like(soi)], 1
        )
        kwargs.setdefault("max_new_tokens", 0)
        out = self.generate(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=pixel_values,
            image_masks=image_masks,
            num_images=num_images,
            soi="draw",
            **kwargs,
        )
        return [row[0] for row in out.images]

    def image_pipeline(self, scheduler=None):
        """A [`DeemImagePipeline`] over this model's own UNet, VAE, side network and conditioning modules."""
        from .pipeline_deem import DeemImagePipeline

        return DeemImagePipeline.from_model(self, scheduler=scheduler)

    @torch.no_grad()
    def _generate_interleaved(
        self,
        input_ids,
        attention_mask,
        pixel_values,
        image_masks,
        runs,
        per_row,
        max_new_images: int = 4,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 3.5,
        height: int | None = None,
        width: int | None = None,
        logits_processor=None,
        stopping_criteria=None,
        streamer=None,
        generation_config: GenerationConfig | None = None,
        **kwargs,
    ) -> DeemGenerateOutput:
        """Write text and draw images in one loop, for a batch (left padding), rows drawing at different steps.

        When a row emits ``<|startofimage|>``: its context (nearest ``<s>`` .. soi, §2.8) conditions the diffusion
        pipeline (previous image of the document as side features), the new image is encoded like an input image
        and its ``num_image_tokens`` embeddings are fed to that row (other rows get masked padding in that step),
        then decoding goes on. ``generator``: one per row (a list) makes each row independent of the others; a
        single generator drives the whole batch. ``max_new_images`` per row; then ``<|startofimage|>`` is
        suppressed for that row. ``height`` / ``width``: size of the drawn images (default the decoder
        resolution; they are resized to the encoder's to be read back). ``streamer``: ``put(ids)`` /
        ``put_image(row, image)`` / ``end()``.

        Decoding settings resolve as in ``GenerationMixin.generate``: ``generation_config`` (default the model's)
        updated by the keyword arguments (``max_new_tokens``, ``do_sample``, ``temperature``, ``top_k``,
        ``top_p``, ``repetition_penalty``, ``min_new_tokens``, ``eos_token_id``, ``num_return_sequences``,
        ``use_cache``, ``output_scores``, ``output_logits``, ...); the logits processors and stopping criteria are
        the library's own for that config, after the user's ``logits_processor`` / ``stopping_criteria``.
        ``max_new_tokens`` counts text tokens (image placeholders are not counted)."""
        cfg = self.config
        kwargs.pop("suppress_tokens", None)  # handled here: placeholders always, <|startofimage|> per row
        # the images travel in the output object: a dict unless the caller asks for the bare sequences
        return_dict = kwargs.pop("return_dict_in_generate", True)
        # the library's own resolution: call kwargs > generation_config > the model's > global defaults
        max_new_tokens = kwargs.pop("max_new_tokens", None)  # 0 is valid here (generate_images draws at once)
        generation_config, unknown = self._prepare_generation_config(generation_config, **kwargs)
        for name in ("output_attentions", "output_hidden_states"):  # the library also hands these to forward
            unknown.pop(name, None)
        if unknown:
            raise TypeError(f"unexpected arguments for interleaved generation (soi='draw'): {sorted(unknown)}")
        if generation_config.num_beams != 1:
            raise ValueError(
                "interleaved generation (soi='draw') supports greedy decoding and sampling, not beam search: pass "
                "soi='stop' or 'suppress' for beams"
            )
        if max_new_tokens is None:  # as GenerationMixin: max_new_tokens, else max_length counts the prompt too
            max_new_tokens = generation_config.max_new_tokens
            if max_new_tokens is None:
                max_new_tokens = max(int(generation_config.max_length) - input_ids.shape[1], 0)
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        self._check_draw_arguments(max_new_images, num_inference_steps, guidance_scale, height, width)
        do_sample, use_cache = bool(generation_config.do_sample), generation_config.use_cache is not False
        output_scores, output_logits = bool(generation_config.output_scores), bool(generation_config.output_logits)
        output_attentions = bool(generation_config.output_attentions)
        output_hidden_states = bool(generation_config.output_hidden_states)
        repeat = generation_config.num_return_sequences or 1
        if repeat > 1:
            input_ids, attention_mask, pixel_values, image_masks, per_row = _repeat_rows(
                input_ids, attention_mask, pixel_values, image_masks, per_row, repeat
            )
            runs = check_sequence_inputs(cfg, input_ids, attention_mask, pixel_values, image_masks)[0]
        batch, q = input_ids.shape[0], cfg.num_image_tokens
        limit = cfg.text_config.max_position_embeddings
        worst = input_ids.shape[1] + max_new_tokens + max_new_images * q
        if worst > limit:
            raise ValueError(
                f"prompt {input_ids.shape[1]} + max_new_tokens {max_new_tokens} + {max_new_images} image(s) x {q} "
                f"tokens = {worst} exceeds the model's maximum of {limit} tokens"
            )
        capacity = cfg.cross_attention_config.max_num_images
        most = int(per_row.max()) if per_row.numel() else 0
        if most + max_new_images > capacity:
            raise ValueError(
                f"a row may hold at most {capacity} images (cross_attention_config.max_num_images): {most} in the "
                f"prompt + max_new_images {max_new_images} is too many"
            )
        eos = generation_config.eos_token_id
        eos = set(eos if isinstance(eos, (list, tuple)) else [eos if eos is not None else cfg.eos_token_id])
        pad = cfg.pad_token_id if generation_config.pad_token_id is None else generation_config.pad_token_id
        gens = generator if isinstance(generator, (list, tuple)) else [generator] * batch
        if len(gens) != batch:
            raise ValueError(f"got {len(gens)} generators for {batch} rows (num_return_sequences={repeat} counts)")
        # the library's processors and criteria for this config; lengths are the model's limit (we count text tokens)
        generation_config.max_length = limit
        generation_config.max_new_tokens = None
        self._prepare_special_tokens(generation_config, True, device=input_ids.device)
        warpers = self._get_logits_processor(
            generation_config=generation_config,
            input_ids_seq_length=input_ids.shape[1],
            logits_processor=LogitsProcessorList(list(logits_processor or [])),
            device=input_ids.device,
            model_kwargs={"attention_mask": attention_mask},
        )
        criteria = self._get_stopping_criteria(
            generation_config=generation_config, stopping_criteria=StoppingCriteriaList(list(stopping_criteria or []))
        )
        device = input_ids.device
        ids = input_ids.clone()
        mask = attention_mask.clone() if attention_mask is not None else torch.ones_like(ids)

        # per-row image memory: (first placeholder position, the four maps) of every image so far
        memory: list[list[tuple[int, list[torch.Tensor]]]] = [[] for _ in range(batch)]
        embeds = self.model.language_model.embed_tokens(ids)
        if pixel_values is not None and pixel_values.shape[0] > 0:
            enc = self.model.image_encoder(pixel_values.to(self.dtype), image_masks)
            embeds = self.model.embed(ids, enc.llm_embeds)
            for i, (b, start, _) in enumerate(runs):
                memory[b].append((start, [m[i] for m in enc.multiscale_features]))
        else:
            embeds = self.model.embed(ids, None)
        drawn: list[list[torch.Tensor]] = [[] for _ in range(batch)]
        cache = DynamicCache(config=cfg.text_config)
        hidden_history = []
        pipe = self.image_pipeline() if self.has_diffusion else None
        if pipe is not None:  # no progress bar inside generate() (transformers shows none)
            pipe.set_progress_bar_config(disable=True)

        cached = {}
        seq_embeds = []  # without a cache, every step runs the whole sequence so far
        all_attentions, all_hidden = [], []

        def step(chunk_embeds):
            key = tuple(len(m) for m in memory)  # the memory only grows: rebuild and re-project when an image is added
            if key not in cached:
                built = self._memory_tensors(memory, batch, device)
                cached.clear()
                cached[key] = self.model.project_image_memory(built) if built is not None else None
            image_memory = cached[key]
            if not use_cache:
                seq_embeds.append(chunk_embeds)
                chunk_embeds = torch.cat(seq_embeds, 1)
            new = chunk_embeds.shape[1]
            positions = _token_positions(mask, new)
            xmask = None
            if image_memory is not None:
                xmask = cross_attention_visibility(ids, image_memory.image_starts, cfg.bos_token_id)[:, -new:]
            out = self(
                inputs_embeds=chunk_embeds,
                attention_mask=mask,
                position_ids=positions,
                cache=cache if use_cache else None,
                use_cache=use_cache,
                image_memory=image_memory,
                cross_attention_mask=xmask,
                return_loss=False,
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
            )
            if output_attentions:
                all_attentions.append(out.attentions)
            if output_hidden_states:
                all_hidden.append(out.hidden_states)
            if not use_cache:
                hidden_history.clear()
            hidden_history.append(out.last_hidden_state)
            return out.logits[:, -1].float()

        if streamer is not None:
            streamer.put(ids.cpu())
        logits = step(embeds)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        pending = (ids[:, -1] == cfg.soi_token_id) & (mask[:, -1] == 1)  # a prompt that ends in <|startofimage|>

        def draw_rows(rows_mask, why):
            """Draw for the rows that just fed <|startofimage|>: (ids, mask) with the image chunk, the chunk's
            embeddings to feed, and the rows."""
            if pipe is None:
                raise ValueError(why)
            rows = rows_mask.nonzero().squeeze(1)
            sampling = (num_inference_steps, guidance_scale, height, width)
            history = torch.cat(hidden_history, 1)
            chunk, fill, chunk_mask = self._draw_images(
                pipe, rows, ids, mask, memory, drawn, history, gens, sampling, streamer
            )
            new_ids, new_mask = torch.cat([ids, fill], 1), torch.cat([mask, chunk_mask], 1)
            return new_ids, new_mask, chunk, rows

        if bool(pending.any()):
            why = "the prompt asks for an image (<|startofimage|>) but the model has no diffusion weights"
            ids, mask, chunk, rows = draw_rows(pending, why)
            logits[rows] = step(chunk)[rows]
        all_scores, all_logits = [], []
        for step_index in range(max_new_tokens):
            if output_logits:
                all_logits.append(logits.clone())
            scores = warpers(ids, logits)
            scores[:, cfg.image_token_id] = -float("inf")
            for b in range(batch):
                if len(drawn[b]) >= max_new_images:
                    scores[b, cfg.soi_token_id] = -float("inf")
            if output_scores:
                all_scores.append(scores.clone())
            if do_sample:
                probs = scores.softmax(-1)
                token = torch.stack([torch.multinomial(probs[b], 1, generator=gens[b])[0] for b in range(batch)])
            else:
                token = scores.argmax(-1)
            token = torch.where(finished, torch.full_like(token, pad), token)
            ids = torch.cat([ids, token[:, None]], 1)
            mask = torch.cat([mask, (~finished).long()[:, None]], 1)
            if streamer is not None:
                streamer.put(token.cpu())
            finished |= torch.tensor([int(t) in eos for t in token.tolist()], device=device)
            if len(criteria):
                finished |= criteria(ids, scores).to(device)
            draw = (token == cfg.soi_token_id) & ~finished
            if not bool(draw.any()) and (bool(finished.all()) or step_index == max_new_tokens - 1):
                break  # as GenerationMixin: no forward pass after the last token
            logits = step(self.model.embed(token[:, None], None))
            if bool(draw.any()):
                why = "the model emitted <|startofimage|> but has no diffusion weights; use soi='stop' or 'suppress'"
                ids, mask, chunk, rows = draw_rows(draw, why + " for text only")
                logits[rows] = step(chunk)[rows]
        if streamer is not None:
            streamer.end()
        if not return_dict:
            count = sum(len(row) for row in drawn)
            if count and not hasattr(streamer, "put_image"):
                logger.warning(
                    f"{count} drawn image(s) dropped: return_dict_in_generate=False returns the sequences only "
                    "(pass return_dict_in_generate=True to get them in `.images`, or soi='stop' not to draw)"
                )
            return ids
        return DeemGenerateOutput(
            sequences=ids,
            attention_mask=mask,
            images=drawn,
            scores=tuple(all_scores) if output_scores else None,
            logits=tuple(all_logits) if output_logits else None,
            attentions=tuple(all_attentions) if output_attentions else None,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            **{CACHE_FIELD: cache if use_cache else None},
        )

    def _check_draw_arguments(self, max_new_images, num_inference_steps, guidance_scale, height, width):
        """The drawing settings, checked before any token is generated (not when the first image is due)."""
        integer = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
        if not integer(max_new_images) or max_new_images < 0:
            raise ValueError(f"max_new_images must be an integer >= 0, got {max_new_images!r}")
        if not integer(num_inference_steps) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
            raise TypeError(f"guidance_scale must be a number, got {type(guidance_scale).__name__}")
        if not (guidance_scale == guidance_scale and abs(guidance_scale) != float("inf")):
            raise ValueError(f"guidance_scale must be finite, got {guidance_scale!r}")
        if self.has_diffusion:
            factor = 2 ** (len(self.image_decoder.vae.config.block_out_channels) - 1)
            for name, value in (("height", height), ("width", width)):
                if value is not None and (not integer(value) or value <= 0 or value % factor):
                    raise ValueError(
                        f"{name} must be a positive multiple of the VAE scale factor {factor}, got {value!r}"
                    )

    def _memory_tensors(self, memory, batch, device) -> DeemImageMemory | None:
        """Per-row (first placeholder, four maps) lists -> the [`DeemImageMemory`] the cross-attention reads (its
        image tokens are fed as embeddings here, so it has none); ``None`` without images."""
        n_max = max(len(m) for m in memory)
        if n_max == 0:
            return None
        levels = self.config.cross_attention_config.feature_levels
        first = next(m for m in memory if m)[0][1]
        shapes = [tuple(first[level].shape[-2:]) for level in levels]
        flat = lambda maps: torch.cat([maps[level].flatten(1).transpose(0, 1) for level in levels], 0)  # noqa: E731
        s, e = flat(first).shape
        states = torch.zeros(batch, n_max, s, e, device=device, dtype=first[0].dtype)
        starts = torch.full((batch, n_max), -1, dtype=torch.long, device=device)
        for b, images in enumerate(memory):
            for n, (start, maps) in enumerate(images):
                states[b, n] = flat(maps)
                starts[b, n] = start
        return DeemImageMemory(vision_states=states, spatial_shapes=shapes, image_starts=starts)

    def _draw_images(self, pipe, rows, ids, mask, memory, drawn, hidden, gens, sampling, streamer):
        """Draw one image for each row in ``rows`` (which just fed ``<|startofimage|>``): condition on its context,
        sample with the previous image of the document as side features, encode the result. Appends to ``memory``
        and ``drawn``; returns the next chunk: embeddings [B,Q,H], ids [B,Q] and attention mask [B,Q] (masked
        padding for the other rows)."""
        cfg = self.config
        device = ids.device
        conds, sides, side_masks = [], [], []
        for b in rows.tolist():
            bos = int(nearest_bos(ids[b : b + 1], cfg.bos_token_id)[0, -1])
            if getattr(cfg, "nip_context_start", "nearest_bos") == "row_start":
                bos = -1  # the row's first real token, as the original without nearest_bos_idxs
            start = max(bos, int(mask[b].argmax()))
            keep = (mask[b, start:] == 1).nonzero().squeeze(1) + start  # skip padding from other rows' images
            n = keep.shape[0]
            zero = torch.zeros(1, dtype=torch.long, device=device)
            conds.append(
                self.image_decoder.condition(hidden[b, keep][None], zero, torch.tensor([n - 1], device=device), zero)
            )
            previous = [maps for first, maps in memory[b] if first > start]
            if previous:
                sides.append(previous[-1])
                side_masks.append(1.0)
            else:
                sides.append([torch.zeros_like(m) for m in self._map_templates(memory, device)])
                side_masks.append(0.0)
        cond = torch.cat(conds)
        side = [torch.stack([maps[level] for maps in sides]) for level in range(4)]
        side_mask = torch.tensor(side_masks, device=device, dtype=cond.dtype)
        gen = [gens[b] for b in rows.tolist()] if gens[0] is not None else None
        steps, guidance, height, width = sampling
        pictures = pipe(
            prompt_embeds=cond,
            side_features=side,
            side_mask=side_mask,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=height,
            width=width,
            generator=gen,
            output_type="pt",
        ).images
        size = cfg.vision_config.image_size
        view = F.interpolate(
            pictures.float(), size=(size, size), mode="bicubic", align_corners=False, antialias=True
        ).clamp(0, 1)
        enc = self.model.image_encoder(view.to(self.dtype), None)
        q = cfg.num_image_tokens
        chunk = torch.zeros(ids.shape[0], q, enc.llm_embeds.shape[-1], device=device, dtype=enc.llm_embeds.dtype)
        chunk[rows] = enc.llm_embeds
        fill = torch.full((ids.shape[0], q), cfg.pad_token_id, dtype=ids.dtype, device=device)
        fill[rows] = cfg.image_token_id
        chunk_mask = torch.zeros(ids.shape[0], q, dtype=mask.dtype, device=device)
        chunk_mask[rows] = 1
        for i, b in enumerate(rows.tolist()):
            memory[b].append((ids.shape[1], [m[i] for m in enc.multiscale_features]))
            drawn[b].append(pictures[i].float().cpu())
            if streamer is not None and hasattr(streamer, "put_image"):
                streamer.put_image(b, pictures[i])
        return chunk, fill, chunk_mask

    def _map_templates(self, memory, device):
        """Four zero maps [E,h,w] of the encoder's multi-scale shapes (for a document without a previous image)."""
        for images in memory:
            if images:
                return images[0][1]
        side, e = self.config.vision_config.image_size, self.config.image_embed_dim
        return [
            torch.zeros(e, side // 2 ** (level + 2), side // 2 ** (level + 2), device=device, dtype=self.dtype)
            for level in range(4)
        ]

    def _get_logits_processor(self, *args, **kwargs) -> LogitsProcessorList:
        """The library's processors, in a list that reads their signatures once (see `_ProcessorList`)."""
        return _ProcessorList(super()._get_logits_processor(*args, **kwargs))

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        """The library's expansion (beam search, ``num_return_sequences``), the image memory expanded with it."""
        memory = model_kwargs.pop("image_memory", None)
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        if memory is not None:
            model_kwargs["image_memory"] = memory.repeat_interleave(expand_size) if expand_size > 1 else memory
        return input_ids, model_kwargs

    def prepare_inputs_for_generation(self, input_ids, inputs_embeds=None, image_memory=None, **kwargs):
        inputs = super().prepare_inputs_for_generation(
            input_ids, inputs_embeds=inputs_embeds, image_memory=image_memory, **kwargs
        )
        new = (
            inputs["inputs_embeds"].shape[1]
            if inputs.get("inputs_embeds") is not None
            else inputs["input_ids"].shape[1]
        )
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            # positions count real tokens, so right-padded prompts continue correctly (as the original's cascade
            # wrapper does); the stock update only adds 1 to the last prompt position.
            inputs["position_ids"] = _token_positions(mask, new)
        if image_memory is not None:
            # visibility of the new tokens, from the whole sequence so far (documents may have started earlier)
            inputs["cross_attention_mask"] = cross_attention_visibility(
                input_ids, image_memory.image_starts, self.config.bos_token_id
            )[:, -new:]
        return inputs


def _token_positions(mask: torch.Tensor, new: int) -> torch.Tensor:
    """[B, new] positions of the last ``new`` tokens as the original's cascade wrapper numbers them: each token's
    index among its row's real tokens, 1 at a pad. Equal to ``(mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)[:,
    -new:]``, with the cumsum over the new columns only (one sum over the rest): a decoding step reads one column."""
    mask = mask.long()
    recent = mask[:, mask.shape[1] - new :]
    before = mask[:, : mask.shape[1] - new].sum(-1, keepdim=True)
    return (before + recent.cumsum(-1) - 1).masked_fill(recent == 0, 1)


def _repeat_rows(input_ids, attention_mask, pixel_values, image_masks, per_row, repeat: int):
    """Each row (and its images) ``repeat`` times in a row, as ``num_return_sequences`` does."""
    input_ids = input_ids.repeat_interleave(repeat, 0)
    attention_mask = attention_mask.repeat_interleave(repeat, 0) if attention_mask is not None else None
    counts = per_row.tolist()
    if pixel_values is not None:
        pixel_values = torch.cat([g for g in pixel_values.split(counts) for _ in range(repeat)])
    if image_masks is not None:
        image_masks = torch.cat([g for g in image_masks.split(counts) for _ in range(repeat)])
    return input_ids, attention_mask, pixel_values, image_masks, per_row.repeat_interleave(repeat)
