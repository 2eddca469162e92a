"""DEEM: an interleaved image-text model whose diffusion decoder also checks its image encoder.

One [`PreTrainedModel`] owns every weight: the CLIP-ConvNeXt image encoder and its perceiver
(``image_encoder``), the LLaMA decoder with gated multi-scale deformable cross-attention (``language_model``),
the text head with its trainable rows for the new tokens (``lm_head``), the learnable ``<|startofimage|>``
vector (``soi_embedding``), the context projection + decoder perceiver + learned null condition that turn LLM
states into a UNet condition, and Stable Diffusion's ``unet`` / ``vae`` with the UNet side network
(``unet_side``). Section numbers (§) refer to ``reference/original-deem.md``.
"""

import contextlib
import queue
import threading
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel, TextIteratorStreamer
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)
from transformers.utils import ModelOutput, logging

from .compat import ATTENTION_CACHE_KW, CACHE_FIELD, MASK_CACHE_KW, model_output_class, pop_cache_kwarg
from .configuration_deem import DeemConfig
from .mmfs import DeemGatedCrossAttention, DeemUNetSideNetwork, unet_forward_with_side
from .pos_embed import sincos_1d
from .vision import DeemImageEncoder, DeemPerceiver

logger = logging.get_logger(__name__)


@dataclass
class DiffusionDraws:
    """Random draws of one diffusion loss branch, for reproducible research and parity checks.

    Any field left ``None`` is sampled. ``latent_noise``: [N,4,h,w] eps of the VAE posterior sample;
    ``noise``: [N,4,h,w] diffusion noise (the regression target); ``timesteps``: [N] integers in
    [0, num_train_timesteps) *before* the CSR remapping; ``null_condition``: [N] bool, which images get the
    learned null condition (NIP only).
    """

    latent_noise: torch.Tensor | None = None
    noise: torch.Tensor | None = None
    timesteps: torch.Tensor | None = None
    null_condition: torch.Tensor | None = None


DeemOutput = model_output_class(
    "DeemOutput",
    __name__,
    """Output of [`DeemForInterleavedGeneration.forward`].

    ``loss`` = w_ntp·loss_ntp + w_nip·loss_nip + w_csr·loss_csr over the components that ran (a component is
    ``None`` when its weight is 0 or its inputs are absent). ``logits``: [B,L,V]. ``cache``: the LLM's ``Cache``
    (the field is named as the installed transformers names it: ``cache`` from 5.24 on, ``past_key_values``
    before). ``image_embeds``: [N,Q,H] image tokens given to the LLM. ``image_features``: the four multi-scale
    encoder maps [N,E,h,w]. ``last_hidden_state``: [B,L,H] final-norm LLM states (the image decoder's context).
    """,
    [
        ("loss", torch.FloatTensor | None),
        ("loss_ntp", torch.FloatTensor | None),
        ("loss_nip", torch.FloatTensor | None),
        ("loss_csr", torch.FloatTensor | None),
        ("logits", torch.FloatTensor | None),
        ("cache", Cache | None),
        ("hidden_states", tuple[torch.FloatTensor, ...] | None),
        ("last_hidden_state", torch.FloatTensor | None),
        ("image_embeds", torch.FloatTensor | None),
        ("image_features", tuple[torch.FloatTensor, ...] | None),
    ],
)


@dataclass
class DeemGenerateOutput(ModelOutput):
    """Output of interleaved [`DeemForInterleavedGeneration.generate`].

    ``sequences`` [B, T]: prompt + generated ids; every drawn image appears as ``<|startofimage|>`` followed by
    its placeholders (padding inside a row, where other rows drew an image, has ``attention_mask`` 0).
    ``attention_mask`` [B, T]. ``images``: per row, the drawn images as [3, D, D] tensors in [0, 1], in order.
    ``scores`` / ``logits`` (with ``output_scores`` / ``output_logits``): per generated text token [B, V], the
    processed and the raw next-token scores.
    """

    sequences: torch.LongTensor | None = None
    attention_mask: torch.LongTensor | None = None
    images: list[list[torch.Tensor]] | None = None
    scores: tuple[torch.FloatTensor, ...] | None = None
    logits: tuple[torch.FloatTensor, ...] | None = None


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

    def __init__(self, tokenizer, skip_prompt: bool = False, timeout: float | None = None, poll_interval: float = 0.05, **decode_kwargs):
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


class DeemDecoderLayer(GradientCheckpointingLayer):
    """LLaMA decoder layer with an optional gated MMFS cross-attention between self-attention and MLP (§2.5)."""

    def __init__(self, config: DeemConfig, layer_idx: int):
        super().__init__()
        text = config.text_config
        self.self_attn = LlamaAttention(text, layer_idx)
        self.mlp = LlamaMLP(text)
        self.input_layernorm = LlamaRMSNorm(text.hidden_size, eps=text.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(text.hidden_size, eps=text.rms_norm_eps)
        has_xattn = layer_idx % config.cross_attention_config.frequency == 0
        self.cross_attn = DeemGatedCrossAttention.from_config(config) if has_xattn else None
        self.cross_index = layer_idx // config.cross_attention_config.frequency if has_xattn else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        vision_states: torch.Tensor | None = None,
        cross_attention_mask: torch.Tensor | None = None,
        vision_spatial_shapes: list[tuple[int, int]] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **{ATTENTION_CACHE_KW: cache},
            **kwargs,
        )
        hidden_states = residual + hidden_states
        if self.cross_attn is not None and vision_states is not None:
            projected = vision_states.dim() == 5  # [B, K, N, S, E]: per cross-attention layer, already projected
            states = vision_states[:, self.cross_index] if projected else vision_states
            hidden_states = hidden_states + self.cross_attn(hidden_states, states, cross_attention_mask, spatial_shapes=vision_spatial_shapes, vision_states_projected=projected)
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + hidden_states


class DeemTextModel(nn.Module):
    """Embeddings, decoder layers and final norm of the LLM; names follow ``LlamaModel`` so Vicuna weights map 1:1."""

    def __init__(self, config: DeemConfig):
        super().__init__()
        text = config.text_config
        self.config = text
        self.embed_tokens = nn.Embedding(text.vocab_size, text.hidden_size)
        self.layers = nn.ModuleList([DeemDecoderLayer(config, i) for i in range(text.num_hidden_layers)])
        self.norm = LlamaRMSNorm(text.hidden_size, eps=text.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=text)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor,
        cache: Cache | None,
        use_cache: bool,
        vision_states: torch.Tensor | None,
        cross_attention_mask: torch.Tensor | None,
        vision_spatial_shapes: list[tuple[int, int]] | None = None,
        output_hidden_states: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{MASK_CACHE_KW: cache},
        )
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids=position_ids)
        hidden_states = inputs_embeds
        all_hidden = () if output_hidden_states else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden += (hidden_states,)
            hidden_states = layer(
                hidden_states,
                attention_mask=causal_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                vision_states=vision_states,
                cross_attention_mask=cross_attention_mask,
                vision_spatial_shapes=vision_spatial_shapes,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden += (hidden_states,)
        return hidden_states, all_hidden


class DeemTextHead(nn.Module):
    """Text head (§2.7): ``base`` Linear(H, V) frozen in every stage, plus ``new_tokens`` Linear(H, V - V0)
    added onto the logits of the tokens DEEM adds (ids >= ``original_vocab_size``)."""

    def __init__(self, config: DeemConfig):
        super().__init__()
        hidden, vocab = config.text_config.hidden_size, config.text_config.vocab_size
        self.original_vocab_size = config.original_vocab_size
        self.new_token_logit_init = config.new_token_logit_init
        self.base = nn.Linear(hidden, vocab, bias=True)
        self.new_tokens = nn.Linear(hidden, vocab - config.original_vocab_size, bias=True)

    def reset_new_token_rows(self):
        """Original init: new rows of ``base`` 0 with bias -100; ``new_tokens`` weight 0, bias 100 + init logit."""
        with torch.no_grad():
            self.base.weight[self.original_vocab_size :].zero_()
            self.base.bias.zero_()
            self.base.bias[self.original_vocab_size :] = -100.0
            self.new_tokens.weight.zero_()
            self.new_tokens.bias.fill_(100.0 + self.new_token_logit_init)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = self.base(hidden_states)
        cut = self.original_vocab_size
        return torch.cat([logits[..., :cut], logits[..., cut:] + self.new_tokens(hidden_states)], dim=-1)


class DeemPreTrainedModel(PreTrainedModel):
    config: DeemConfig
    config_class = DeemConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["DeemDecoderLayer", "DeemImageEncoder", "DeemPerceiver", "UNet2DConditionModel", "DeemUNetSideNetwork", "AutoencoderKL"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _keep_in_fp32_modules_strict = ["vae"]  # the VAE encodes in fp32 (§2.9), under fp16 and bf16 alike
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    _tied_weights_keys = {}

    @classmethod
    def from_pretrained(cls, *args, strict: bool = True, **kwargs):
        """``PreTrainedModel.from_pretrained``; with ``strict`` (default) weights that do not fit the config
        (missing, unexpected or wrongly shaped keys) raise a ``ValueError`` naming every such key instead of
        being silently re-initialised or dropped."""
        want_info = kwargs.pop("output_loading_info", False)
        if strict:
            kwargs.setdefault("ignore_mismatched_sizes", True)  # collect them here and report all at once
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        if strict:
            problems = []
            for key, label in (("missing_keys", "missing from the checkpoint"), ("unexpected_keys", "not in the model"), ("mismatched_keys", "with the wrong shape")):
                keys = info.get(key) or []
                if keys:
                    names = sorted(k if isinstance(k, str) else f"{k[0]} (checkpoint {tuple(k[1])} vs model {tuple(k[2])})" for k in keys)
                    problems.append(f"{len(names)} key(s) {label}: {', '.join(names)}")
            if problems:
                raise ValueError(f"weights at {args[0] if args else kwargs.get('pretrained_model_name_or_path')} do not match the DeemConfig: " + "; ".join(problems) + " (pass strict=False to load anyway)")
        return (model, info) if want_info else model

    def _initialize_weights(self, module, is_custom_code: bool = False):
        """Like transformers', but skip a module only when all of its (recursive) tensors were loaded: the
        custom-code shortcut treats a module without direct parameters as initialised, which would skip the init
        of the deformable attention, the text head and the LLaMA blocks in ``_init_weights``."""
        if getattr(module, "_is_hf_initialized", False):
            return
        tensors = [*module.parameters(), *(b for b in module.buffers() if b is not None)]
        if tensors and all(getattr(t, "_is_hf_initialized", False) for t in tensors):
            module._is_hf_initialized = True
            return
        self._init_weights(module)
        module._is_hf_initialized = True

    def _init_weights(self, module):
        """Initialise as the original does (§2.11): LLM Linear/Embedding normal(initializer_range), perceivers
        their own scheme, deformable attention its own reset, everything else PyTorch's default."""
        text_std = self.config.text_config.initializer_range
        if isinstance(module, DeemGatedCrossAttention):
            # HF init of the new LLM blocks, then the deformable attention's own reset, gate 0 (§2.11)
            for child in module.modules():
                if isinstance(child, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(child.weight, std=text_std)
                    if getattr(child, "bias", None) is not None:
                        nn.init.zeros_(child.bias)
                elif isinstance(child, LlamaRMSNorm):
                    nn.init.ones_(child.weight)
            module.attn._reset_parameters()
            nn.init.zeros_(module.gate)
        elif hasattr(module, "_reset_parameters"):
            module._reset_parameters()
        elif isinstance(module, (LlamaAttention, LlamaMLP)):
            for child in module.children():
                if isinstance(child, nn.Linear):
                    nn.init.normal_(child.weight, std=text_std)
                    if child.bias is not None:
                        nn.init.zeros_(child.bias)
        elif isinstance(module, DeemTextModel):
            nn.init.normal_(module.embed_tokens.weight, std=text_std)
        elif isinstance(module, DeemTextHead):
            nn.init.normal_(module.base.weight, std=text_std)
            module.reset_new_token_rows()
        elif isinstance(module, LlamaRMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, LlamaRotaryEmbedding):
            inv_freq, _ = module.compute_default_rope_parameters(module.config)
            module.inv_freq.copy_(inv_freq)
            module.original_inv_freq.copy_(inv_freq)
        elif isinstance(module, DeemForInterleavedGeneration):
            nn.init.zeros_(module.soi_embedding)
            if module.null_condition is not None:
                nn.init.normal_(module.null_condition, std=self.config.initializer_range)
        elif hasattr(module, "reset_parameters") and not isinstance(module, PreTrainedModel):
            module.reset_parameters()


class DeemForInterleavedGeneration(DeemPreTrainedModel, GenerationMixin):
    """DEEM for interleaved image-text modelling: text logits, and the next-image (NIP) and consistency (CSR)
    diffusion losses in training."""

    def __init__(self, config: DeemConfig):
        super().__init__(config)
        # PreTrainedModel resolves the attention implementation on the top config only; hand it to the sub-configs
        # (the LLM's causal mask and attention read it from text_config).
        config._attn_implementation = config._attn_implementation
        text = config.text_config
        self.image_encoder = DeemImageEncoder(config)
        self.language_model = DeemTextModel(config)
        self.lm_head = DeemTextHead(config)
        self.soi_embedding = nn.Parameter(torch.zeros(1, text.hidden_size))
        self.context_proj = nn.Linear(text.hidden_size, text.hidden_size)
        self.decoder_perceiver = DeemPerceiver(config.decoder_perceiver_config)
        if config.diffusion_config is not None:
            from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

            dcfg = config.diffusion_config
            self.unet = UNet2DConditionModel.from_config(dcfg.unet)
            self.vae = AutoencoderKL.from_config(dcfg.vae)
            self.unet_side = DeemUNetSideNetwork(dcfg, config.image_embed_dim)
            self.null_condition = nn.Parameter(torch.zeros(1, config.decoder_perceiver_config.num_queries, dcfg.unet["cross_attention_dim"]))
            self.noise_scheduler = DDPMScheduler.from_config(dcfg.scheduler)
            self.vae.requires_grad_(False)
        else:
            self.unet = self.vae = self.unet_side = self.null_condition = self.noise_scheduler = None
        self.post_init()

    # ``push_to_hub`` writes README.md with this callable (save_directory, config, repo_id, num_parameters=...) when
    # set; the ``deem`` package sets it to ``deem.hub.write_model_card``. Copies of these files loaded with
    # trust_remote_code, without that package, keep transformers' generic card.
    model_card_writer = None

    def _upload_modified_files(self, working_dir, repo_id, *args, **kwargs):
        if self.model_card_writer is not None:
            type(self).model_card_writer(working_dir, self.config, repo_id, num_parameters=self.num_parameters())
        return super()._upload_modified_files(working_dir, repo_id, *args, **kwargs)

    # ------------------------------------------------------------------ embeddings / heads

    def get_input_embeddings(self):
        return self.language_model.embed_tokens

    def set_input_embeddings(self, value):
        self.language_model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head.base

    @property
    def has_diffusion(self) -> bool:
        return self.unet is not None

    # ------------------------------------------------------------------ input checks

    def _check_inputs(self, input_ids, attention_mask, pixel_values, pixel_values_decoder, image_masks, num_images, labels, past_len=0, images_encoded=False):
        cfg = self.config
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
        max_len = cfg.text_config.max_position_embeddings
        total = past_len + input_ids.shape[1]
        if total > max_len:
            raise ValueError(f"sequence length {total} exceeds the model's maximum of {max_len} tokens")
        if attention_mask is not None and tuple(attention_mask.shape) != (input_ids.shape[0], total):
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids shape {tuple(input_ids.shape)} (+ {past_len} cached tokens)")
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} does not match input_ids shape {tuple(input_ids.shape)}")
        runs = _image_runs(input_ids, cfg.image_token_id)
        bad = [(b, s, n) for b, s, n in runs if n != cfg.num_image_tokens]
        if bad:
            b, s, n = bad[0]
            raise ValueError(f"row {b}: image placeholder run at position {s} has {n} tokens, expected {cfg.num_image_tokens} per image")
        for b, s, _ in runs:
            if s == 0 or input_ids[b, s - 1] != cfg.soi_token_id:
                raise ValueError(f"row {b}: image placeholders at position {s} are not preceded by the <|startofimage|> token")
        per_row = torch.zeros(input_ids.shape[0], dtype=torch.long)
        for b, _, _ in runs:
            per_row[b] += 1
        n_images = int(per_row.sum())
        n_given = 0 if pixel_values is None else pixel_values.shape[0]
        if n_images != n_given and not images_encoded:
            raise ValueError(f"input_ids hold {n_images} image(s) (placeholder runs) but {n_given} image(s) were given in pixel_values")
        if num_images is not None and not torch.equal(torch.as_tensor(num_images).cpu().long(), per_row):
            raise ValueError(f"num_images {torch.as_tensor(num_images).tolist()} does not match the images found per row {per_row.tolist()}")
        if pixel_values_decoder is not None:
            if pixel_values is None or pixel_values_decoder.shape[0] != pixel_values.shape[0]:
                raise ValueError("pixel_values_decoder must hold one decoder view per image in pixel_values")
            if pixel_values_decoder.dim() != 4 or pixel_values_decoder.shape[1] != 3:
                raise ValueError(f"pixel_values_decoder must be [N,3,H,W], got shape {tuple(pixel_values_decoder.shape)}")
            if not pixel_values_decoder.is_floating_point():
                raise TypeError(f"pixel_values_decoder must be a floating tensor in [0,1], got {pixel_values_decoder.dtype}")
            side = cfg.diffusion_config.image_size if cfg.diffusion_config is not None else None
            if side is not None and tuple(pixel_values_decoder.shape[-2:]) != (side, side):
                raise ValueError(f"pixel_values_decoder must be {side}x{side}, got {tuple(pixel_values_decoder.shape[-2:])}")
        if image_masks is not None and pixel_values is not None and image_masks.shape[0] != pixel_values.shape[0]:
            raise ValueError(f"image_masks has {image_masks.shape[0]} masks for {pixel_values.shape[0]} images")
        return runs, per_row

    # ------------------------------------------------------------------ multimodal inputs

    def get_image_features(self, pixel_values: torch.Tensor, image_masks: torch.Tensor | None = None):
        """Encode images: returns the image encoder output (``llm_embeds`` [N,Q,H], multi-scale maps, ...)."""
        return self.image_encoder(pixel_values, image_masks)

    @staticmethod
    def _rows_image_embeds(image_embeds: torch.Tensor, per_row: torch.Tensor) -> torch.Tensor | None:
        """Per-row image tokens [B,N_max,Q,H] -> the images ``input_ids`` holds, row-major [N,Q,H] (``None`` if none)."""
        if image_embeds.dim() != 4 or image_embeds.shape[0] != per_row.shape[0]:
            raise ValueError(f"image_embeds must be [batch, images per row, tokens, hidden] with batch {per_row.shape[0]}, got shape {tuple(image_embeds.shape)}")
        if int(per_row.sum()) == 0:
            return None
        if int(per_row.max()) > image_embeds.shape[1]:
            raise ValueError(f"input_ids hold up to {int(per_row.max())} image(s) per row but image_embeds has {image_embeds.shape[1]}")
        return torch.cat([image_embeds[b, : int(n)] for b, n in enumerate(per_row.tolist())])

    @staticmethod
    def _pad_image_embeds(llm_embeds: torch.Tensor, per_row: torch.Tensor) -> torch.Tensor:
        """Row-major image tokens [N,Q,H] -> per row [B,N_max,Q,H] (zeros where a row has fewer images)."""
        n_max = max(int(per_row.max()), 1) if per_row.numel() else 1
        out = llm_embeds.new_zeros(per_row.shape[0], n_max, *llm_embeds.shape[1:])
        for b, chunk in enumerate(llm_embeds.split(per_row.tolist())):
            out[b, : chunk.shape[0]] = chunk
        return out

    def _embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with placeholder rows replaced by image tokens (row-major) and ``soi_embedding``
        added at every ``<|startofimage|>`` (§1.2 step 3)."""
        embeds = self.language_model.embed_tokens(input_ids)
        if image_embeds is not None and image_embeds.numel():
            slots = (input_ids == self.config.image_token_id).unsqueeze(-1)
            embeds = embeds.masked_scatter(slots, image_embeds.to(embeds.dtype).reshape(-1, embeds.shape[-1]))
        is_soi = (input_ids == self.config.soi_token_id).unsqueeze(-1).to(embeds.dtype)
        return embeds + is_soi * self.soi_embedding.to(embeds.dtype)

    def _image_memory(self, enc, runs, per_row, batch: int):
        """What the LLM's cross-attention reads: (vision_states [B,N_max,S,E], their level shapes, image_starts
        [B,N_max] = absolute position of each image's first placeholder, -1 where a row has fewer images)."""
        levels = self.config.cross_attention_config.feature_levels
        states = self._vision_states(enc.multiscale_features, per_row, batch)
        shapes = [tuple(enc.multiscale_features[level].shape[-2:]) for level in levels]
        return states, shapes, _image_start_table(runs, batch, states.shape[1], states.device)

    def project_vision_states(self, vision_states: torch.Tensor) -> torch.Tensor:
        """[B,N,S,E] -> [B,K,N,S,E]: each of the K cross-attention layers' normalised value projection, so cached
        decoding does not redo it every step (``forward`` accepts either form as ``vision_states``)."""
        layers = [layer.cross_attn for layer in self.language_model.layers if layer.cross_attn is not None]
        return torch.stack([xattn.project_vision_states(vision_states) for xattn in layers], dim=1)

    def _vision_states(self, maps: list[torch.Tensor], per_row: torch.Tensor, batch: int) -> torch.Tensor:
        """[B, N_max, S, E]: the cross-attention levels of each image, flattened and concatenated (§2.5)."""
        levels = self.config.cross_attention_config.feature_levels
        flat = torch.cat([maps[level].flatten(2).transpose(1, 2) for level in levels], dim=1)  # [N,S,E]
        n_max = max(int(per_row.max()), 1) if per_row.numel() else 1
        out = flat.new_zeros(batch, n_max, flat.shape[1], flat.shape[2])
        row = torch.repeat_interleave(torch.arange(batch), per_row)
        col = torch.cat([torch.arange(int(n)) for n in per_row]) if len(row) else row
        out[row, col] = flat
        return out

    def _context_features(self, hidden: torch.Tensor, image_rows, soi_pos, starts):
        """Reversed LLM context of each image, projected + 1-D positions, and its mask (§2.8).

        ``hidden`` [B,L,H]; for image i the span ``starts[i] .. soi_pos[i]`` of row ``image_rows[i]``.
        Returns ([N, L_max, H], [N, L_max])."""
        lengths = soi_pos - starts + 1
        l_max = int(lengths.max())
        offs = torch.arange(l_max, device=hidden.device)
        idx = soi_pos[:, None] - offs[None, :]  # index 0 = the soi token, then backwards
        valid = offs[None, :] < lengths[:, None]
        ctx = hidden[image_rows[:, None], idx.clamp(min=0)] * valid[..., None].to(hidden.dtype)
        ctx = self.context_proj(ctx)
        ctx = ctx + sincos_1d(offs.float(), hidden.shape[-1]).to(ctx)[None]
        return ctx, valid.long()

    # ------------------------------------------------------------------ diffusion losses

    def _encode_latents(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """VAE posterior (mean, std) of decoder views in [0,1] -> latents space; frozen, fp32, no grad."""
        with torch.no_grad():
            x = images.to(device=self.vae.device, dtype=self.vae.dtype) * 2 - 1
            moments = torch.cat([self.vae.encode(chunk).latent_dist.parameters for chunk in x.split(32)])
        mean, logvar = moments.chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        return mean, std

    def _denoising_loss(self, posterior, condition, side_features, side_mask, draws: DiffusionDraws, timestep_map, generator):
        """Per-element epsilon MSE [N,4,h,w] (fp32) of the UNet + side network on noised latents (§2.9)."""
        mean, std = posterior
        n = mean.shape[0]
        sched = self.noise_scheduler
        eps = draws.latent_noise if draws.latent_noise is not None else torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        latents = (mean + std * eps.to(mean)) * self.vae.config.scaling_factor
        noise = draws.noise if draws.noise is not None else torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        noise = noise.to(latents)
        t = draws.timesteps
        if t is None:
            t = torch.randint(0, sched.config.num_train_timesteps, (n,), generator=generator, device=latents.device)
        t = timestep_map(t.to(latents.device)).long()
        noisy = sched.add_noise(latents, noise, t)
        unet_dtype = self.unet.dtype
        pred = unet_forward_with_side(
            self.unet,
            self.unet_side,
            noisy.to(unet_dtype),
            t,
            condition.to(unet_dtype),
            side_features=[f.to(unet_dtype) for f in side_features],
            side_mask=side_mask,
        )
        return (pred.float() - noise.float()) ** 2

    def csr_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """CSR timestep remap ``round((t - T/2) * scale + T/2)`` (T=1000, scale 0.6: [0,1000) -> [200,799])."""
        half = self.noise_scheduler.config.num_train_timesteps / 2
        return torch.round((t.double() - half) * self.config.csr_timestep_scale + half).long()

    def _loss_csr(self, enc, posterior, draws, generator):
        """Consistency semantic regularisation (§4.3): reconstruct each image from the encoder's own tokens."""
        condition = self.image_encoder.diffusion_condition(enc.perceiver_output)
        n = condition.shape[0]
        side = [f[:, None] for f in enc.region_features]
        side_mask = torch.ones(n, 1, device=condition.device, dtype=condition.dtype)
        loss_map = self._denoising_loss(posterior, condition, side, side_mask, draws, self.csr_timesteps, generator)
        if enc.latent_mask is None:
            return loss_map.mean()
        m = enc.latent_mask.to(loss_map.dtype)
        scale = m[0].numel() / (m.sum(dim=(1, 2, 3), keepdim=True) + 1e-8)  # mean inside each image's region
        return (loss_map * m * scale).mean()

    def _loss_nip(self, hidden, enc, image_rows, soi_pos, starts, posterior, draws, generator):
        """Next-image prediction (§4.2): images whose context is longer than ``<s><soi>`` are denoised from the
        decoder perceiver's reading of the LLM context; mean over all images' elements as the original."""
        n = soi_pos.shape[0]
        lengths = soi_pos - starts + 1
        keep = lengths > 2
        if not bool(keep.any()):
            return hidden.new_zeros((), dtype=torch.float32)
        sel = keep.nonzero().squeeze(1)
        ctx, ctx_mask = self._context_features(hidden, image_rows[sel], soi_pos[sel], starts[sel])
        condition = self.decoder_perceiver(ctx, ctx_mask)
        null = draws.null_condition
        if null is None:
            null = torch.rand(n, generator=generator, device=condition.device) < self.config.cfg_dropout_prob
        null = null.to(condition.device).reshape(n)[sel]
        condition = torch.where(null[:, None, None], self.null_condition.to(condition.dtype), condition)
        side, side_mask = self._previous_image_features(enc.multiscale_features, image_rows, soi_pos, starts)
        side = [f[sel] for f in side]
        sub = DiffusionDraws(
            latent_noise=None if draws.latent_noise is None else draws.latent_noise[sel.to(draws.latent_noise.device)],
            noise=None if draws.noise is None else draws.noise[sel.to(draws.noise.device)],
            timesteps=None if draws.timesteps is None else draws.timesteps[sel.to(draws.timesteps.device)],
        )
        posterior = tuple(p[sel.to(p.device)] for p in posterior)
        loss_map = self._denoising_loss(posterior, condition, side, side_mask[sel], sub, lambda t: t, generator)
        return loss_map.sum() / (n * loss_map[0].numel())

    @staticmethod
    def _previous_image_features(maps, image_rows, soi_pos, starts):
        """Side features for NIP (§2.8): image i gets the maps of image i-1 when that image is in the same row
        and inside image i's document; zeros and mask 0 otherwise. Returns (list of 4 [N,1,E,h,w], [N,1])."""
        n = image_rows.shape[0]
        prev_ok = torch.zeros(n, dtype=torch.bool, device=image_rows.device)
        if n > 1:
            prev_ok[1:] = (image_rows[1:] == image_rows[:-1]) & (soi_pos[:-1] >= starts[1:])
        feats = []
        for m in maps:
            shifted = torch.cat([torch.zeros_like(m[:1]), m[:-1]], dim=0)
            feats.append((shifted * prev_ok[:, None, None, None].to(m.dtype))[:, None])
        return feats, prev_ok[:, None].to(maps[0].dtype)

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        pixel_values_decoder: torch.FloatTensor | None = None,
        image_masks: torch.FloatTensor | None = None,
        num_images: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        loss_ntp_weight: float | None = None,
        loss_nip_weight: float | None = None,
        loss_csr_weight: float | None = None,
        return_loss: bool | None = None,
        csr_draws: DiffusionDraws | None = None,
        nip_draws: DiffusionDraws | None = None,
        generator: torch.Generator | None = None,
        logits_to_keep: int = 0,
        num_items_in_batch: int | torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        vision_states: torch.FloatTensor | None = None,
        vision_spatial_shapes: list[tuple[int, int]] | None = None,
        image_starts: torch.LongTensor | None = None,
        cross_attention_mask: torch.Tensor | None = None,
        image_embeds: torch.FloatTensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> DeemOutput:
        r"""
        input_ids [B,L]: text with ``<|startofimage|>`` + ``num_image_tokens`` placeholders per image.
        pixel_values [N,3,S,S] in [0,1]: encoder views, row-major image order. pixel_values_decoder [N,3,D,D] in
        [0,1]: decoder views (for NIP / CSR). image_masks [N,1,S,S]: region masks (1 inside). num_images [B]:
        images per row (checked against the placeholders). labels [B,L]: next-token targets (-100 ignored;
        derived from input_ids by the rules of §4.1 when absent). ``loss_*_weight``: per-call loss weights (a
        weight of 0 skips that branch). ``return_loss``: default True in training mode or when labels are given.
        ``csr_draws`` / ``nip_draws``: given random draws (see [`DiffusionDraws`]); ``generator`` for the rest.

        Cached decoding (what ``generate`` passes): ``inputs_embeds`` [B,L,H] instead of ``input_ids`` for the
        prompt, and the image memory computed once from the prompt's images: ``vision_states`` [B,N,S,E] with
        ``vision_spatial_shapes``, ``image_starts`` [B,N] (absolute position of each image's first placeholder,
        -1 for none) and the new tokens' ``cross_attention_mask`` [B,L,N]; ``image_embeds`` [B,N,Q,H]: each row's
        encoded image tokens, scattered into the placeholders that ``input_ids`` holds (a cached step without
        placeholders does not use them). ``cache`` (``past_key_values`` on transformers < 5.24): a ``Cache``.
        """
        cfg = self.config
        if input_ids is None and inputs_embeds is None:
            raise ValueError("input_ids (or inputs_embeds) are required")
        cache = pop_cache_kwarg(cache, past_key_values, kwargs)
        past_len = cache.get_seq_length() if cache is not None else 0
        if input_ids is not None:
            runs, per_row = self._check_inputs(
                input_ids, attention_mask, pixel_values, pixel_values_decoder, image_masks, num_images, labels, past_len,
                images_encoded=pixel_values is None and (vision_states is not None or image_embeds is not None),
            )
            if image_embeds is not None and pixel_values is None:
                image_embeds = self._rows_image_embeds(image_embeds, per_row)
        elif pixel_values is not None or labels is not None:
            raise ValueError("pixel_values and labels need input_ids (the placeholders say where the images go)")
        if return_loss is None:
            return_loss = self.training or labels is not None
        w_ntp = cfg.loss_ntp_weight if loss_ntp_weight is None else loss_ntp_weight
        w_nip = cfg.loss_nip_weight if loss_nip_weight is None else loss_nip_weight
        w_csr = cfg.loss_csr_weight if loss_csr_weight is None else loss_csr_weight
        want_diffusion = return_loss and (w_nip > 0 or w_csr > 0) and pixel_values is not None
        if want_diffusion and (not self.has_diffusion or pixel_values_decoder is None):
            if self.training:
                missing = "diffusion weights (this model was built without diffusion_config)" if not self.has_diffusion else "pixel_values_decoder"
                raise ValueError(f"training with loss_nip_weight={w_nip} / loss_csr_weight={w_csr} needs {missing}; set those weights to 0 to train text only")
            want_diffusion = False

        enc = None
        if pixel_values is not None:
            image_embeds = None
        if pixel_values is not None and pixel_values.shape[0] > 0:
            enc = self.image_encoder(pixel_values, image_masks)
            image_embeds = enc.llm_embeds
            vision_states, vision_spatial_shapes, image_starts = self._image_memory(enc, runs, per_row, input_ids.shape[0])
            cross_attention_mask = None
        if vision_states is not None and cross_attention_mask is None:
            if input_ids is None or image_starts is None or past_len:
                raise ValueError("cached decoding with vision_states needs the new tokens' cross_attention_mask (generate() passes it)")
            cross_attention_mask = cross_attention_visibility(input_ids, image_starts, cfg.bos_token_id)
        if cross_attention_mask is not None and vision_states is not None:
            cross_attention_mask = cross_attention_mask.to(vision_states.dtype)

        if inputs_embeds is None:
            inputs_embeds = self._embed(input_ids, image_embeds)
        batch, length = inputs_embeds.shape[:2]
        if use_cache and cache is None:
            cache = DynamicCache(config=cfg.text_config)
        if position_ids is None:  # as LlamaModel: consecutive positions (RoPE makes left padding harmless)
            position_ids = torch.arange(past_len, past_len + length, device=inputs_embeds.device)[None].expand(batch, -1)
        hidden, all_hidden = self.language_model(
            inputs_embeds,
            attention_mask,
            position_ids,
            cache,
            bool(use_cache),
            vision_states,
            cross_attention_mask,
            vision_spatial_shapes=vision_spatial_shapes,
            output_hidden_states=bool(output_hidden_states),
            **kwargs,
        )
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)

        loss_ntp = loss_nip = loss_csr = None
        if return_loss and w_ntp > 0 and input_ids is not None:
            if labels is None:
                labels = default_labels(input_ids, attention_mask, cfg)
            labels = labels.masked_fill(input_ids == cfg.image_token_id, -100)
            loss_ntp = next_token_loss(logits, labels, num_items_in_batch)
        if want_diffusion:
            posterior = self._encode_latents(pixel_values_decoder)
            if w_csr > 0:
                loss_csr = self._loss_csr(enc, posterior, csr_draws or DiffusionDraws(), generator)
            if w_nip > 0:
                image_rows, soi_pos, starts = _image_context_spans(runs, input_ids, attention_mask, cfg.bos_token_id)
                loss_nip = self._loss_nip(hidden, enc, image_rows, soi_pos, starts, posterior, nip_draws or DiffusionDraws(), generator)
        loss = None
        parts = [(w_ntp, loss_ntp), (w_nip, loss_nip), (w_csr, loss_csr)]
        if any(p is not None for _, p in parts):
            loss = sum(w * p for w, p in parts if p is not None)
        return DeemOutput(
            loss=loss,
            loss_ntp=loss_ntp,
            loss_nip=loss_nip,
            loss_csr=loss_csr,
            logits=logits,
            hidden_states=all_hidden,
            last_hidden_state=hidden,
            image_embeds=image_embeds,
            image_features=tuple(enc.multiscale_features) if enc is not None else None,
            **{CACHE_FIELD: cache if use_cache else None},
        )

    # ------------------------------------------------------------------ generation

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
        soi: str = "stop",
        **kwargs,
    ):
        """Text generation with the stock ``GenerationMixin`` (greedy, sampling, beam search, ``GenerationConfig``,
        ``Cache`` objects). The prompt's images are encoded once; their cross-attention memory is reused at every
        step. ``soi``: what ``<|startofimage|>`` does — ``"stop"`` (ends the row, like the original's
        ``generate_texts``), ``"suppress"`` (never generated) or ``"draw"``: interleaved generation, where a row
        that emits it gets an image drawn by the diffusion decoder from its context, encoded and appended, and
        goes on writing (see ``_generate_interleaved``). Image placeholders are never generated.
        ``pixel_values_decoder`` is accepted (processor output) and unused here."""
        cfg = self.config
        if soi not in ("stop", "suppress", "draw"):
            raise ValueError(f"soi must be 'draw', 'stop' or 'suppress', got {soi!r}")
        if input_ids is None:
            raise ValueError("generate needs input_ids (use the processor)")
        max_new = kwargs.get("max_new_tokens") or (kwargs.get("generation_config") or self.generation_config).max_new_tokens
        limit = cfg.text_config.max_position_embeddings
        if max_new is not None and input_ids.shape[1] + max_new > limit:
            raise ValueError(f"prompt length {input_ids.shape[1]} + max_new_tokens {max_new} exceeds the model's maximum of {limit} tokens")
        runs, per_row = self._check_inputs(input_ids, attention_mask, pixel_values, None, image_masks, num_images, None)
        if soi == "draw":
            return self._generate_interleaved(input_ids, attention_mask, pixel_values, image_masks, runs, per_row, **kwargs)
        if pixel_values is not None and pixel_values.shape[0] > 0:
            enc = self.image_encoder(pixel_values.to(self.dtype), image_masks)
            states, shapes, starts = self._image_memory(enc, runs, per_row, input_ids.shape[0])
            # the image tokens travel per row (beam search / num_return_sequences expand them like every batch
            # input); each forward scatters them into the placeholders it is given (all of them without a cache)
            kwargs.update(image_embeds=self._pad_image_embeds(enc.llm_embeds, per_row), vision_states=self.project_vision_states(states), vision_spatial_shapes=shapes, image_starts=starts)
        suppress = [cfg.image_token_id] + ([cfg.soi_token_id] if soi == "suppress" else [])
        kwargs["suppress_tokens"] = sorted(set(list(kwargs.get("suppress_tokens") or []) + suppress))
        if soi == "stop" and "eos_token_id" not in kwargs:
            eos = self.generation_config.eos_token_id
            eos = list(eos) if isinstance(eos, (list, tuple)) else [eos if eos is not None else cfg.eos_token_id]
            kwargs["eos_token_id"] = eos + [cfg.soi_token_id]
        return super().generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    @torch.no_grad()
    def score_options(self, input_ids, options, attention_mask=None, pixel_values=None, image_masks=None, num_images=None):
        """Log-likelihood of each answer option after each prompt (how yes/no and multiple-choice benchmarks are
        scored, §5.3). ``input_ids`` [B,L] left-padded prompts (with their images); ``options``: token-id lists
        (without ``<s>``), the same for every row. Returns [B, num_options]: the summed log-probabilities of the
        option tokens. Every image is encoded once per row (the original encoded only a mini-batch's first, B18)."""
        cfg = self.config
        batch, n_opt = input_ids.shape[0], len(options)
        width = max(len(o) for o in options)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        rows, masks, targets = [], [], []
        for b in range(batch):
            for opt in options:
                ids = torch.tensor(list(opt) + [cfg.pad_token_id] * (width - len(opt)), device=input_ids.device)
                rows.append(torch.cat([input_ids[b], ids]))
                masks.append(torch.cat([attention_mask[b], (torch.arange(width, device=ids.device) < len(opt)).long()]))
                targets.append(len(opt))
        ids, mask = torch.stack(rows), torch.stack(masks)
        pixels = image_masks_rep = counts = None
        if pixel_values is not None:
            _, per_row = self._check_inputs(input_ids, attention_mask, pixel_values, None, image_masks, num_images, None)
            groups = list(pixel_values.split(per_row.tolist()))
            pixels = torch.cat([g for g in groups for _ in range(n_opt)])
            if image_masks is not None:
                mgroups = list(image_masks.split(per_row.tolist()))
                image_masks_rep = torch.cat([g for g in mgroups for _ in range(n_opt)])
            counts = per_row.repeat_interleave(n_opt)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_masks=image_masks_rep, num_images=counts, position_ids=position_ids, return_loss=False).logits
        logprobs = logits[:, input_ids.shape[1] - 1 : -1].float().log_softmax(-1)
        option_ids = ids[:, input_ids.shape[1] :]
        picked = logprobs.gather(-1, option_ids[..., None]).squeeze(-1)
        valid = torch.arange(width, device=ids.device)[None] < torch.tensor(targets, device=ids.device)[:, None]
        return (picked * valid).sum(-1).view(batch, n_opt)

    @torch.no_grad()
    def perception_consistency(self, pixel_values, pixel_values_decoder, image_masks=None, timesteps=(200, 350, 500, 650, 799), seed: int = 0):
        """How well the image encoder's reading of each image lets the diffusion decoder reconstruct it: the CSR
        loss (§4.3) per image, averaged over fixed ``timesteps`` (after the CSR remapping) with noise seeded by
        ``seed``. Lower is better; a high value flags an input the encoder misperceives or that is out of
        distribution. ``pixel_values`` [N,3,S,S], ``pixel_values_decoder`` [N,3,D,D] in [0,1] -> [N]."""
        if not self.has_diffusion:
            raise ValueError("perception_consistency needs the diffusion decoder (this model has no diffusion weights)")
        enc = self.image_encoder(pixel_values.to(self.dtype), image_masks)
        posterior = self._encode_latents(pixel_values_decoder)
        condition = self.image_encoder.diffusion_condition(enc.perceiver_output)
        side = [f[:, None] for f in enc.region_features]
        side_mask = torch.ones(condition.shape[0], 1, device=condition.device, dtype=condition.dtype)
        generator = torch.Generator(device=posterior[0].device).manual_seed(seed)
        per_image = []
        for t in timesteps:
            n = condition.shape[0]
            draws = DiffusionDraws(
                latent_noise=torch.randn(posterior[0].shape, generator=generator, device=posterior[0].device),
                noise=torch.randn(posterior[0].shape, generator=generator, device=posterior[0].device),
                timesteps=torch.full((n,), int(t), device=posterior[0].device),
            )
            loss_map = self._denoising_loss(posterior, condition, side, side_mask, draws, lambda x: x, None)
            if enc.latent_mask is not None:
                m = enc.latent_mask.to(loss_map.dtype)
                loss_map = loss_map * m * (m[0].numel() / (m.sum(dim=(1, 2, 3), keepdim=True) + 1e-8))
            per_image.append(loss_map.flatten(1).mean(1))
        return torch.stack(per_image).mean(0)

    @contextlib.contextmanager
    def test_time_adaptation(self, pixel_values, pixel_values_decoder, image_masks=None, steps: int = 5, lr: float = 4e-6, samples: int = 5, seed: int = 0):
        """Adapt the image encoder to the given images with ``steps`` AdamW steps on the CSR loss (the diffusion
        model as the encoder's eyes, §5.4: ``samples`` evenly spaced timesteps per image, seeded), use it inside
        the ``with`` block, and restore every encoder weight bitwise afterwards. UNet, VAE and side network are
        not changed (the original's disabled version also moved the diffusion model, B8)."""
        if not self.has_diffusion:
            raise ValueError("test-time adaptation needs the diffusion decoder (this model has no diffusion weights)")
        saved = {k: v.detach().clone() for k, v in self.image_encoder.state_dict().items()}
        flags = {n: p.requires_grad for n, p in self.named_parameters()}
        was_training = self.training
        try:
            self.requires_grad_(False)
            params = [p for p in self.image_encoder.parameters() if p.is_floating_point()]
            for p in params:
                p.requires_grad_(True)
            optimizer = torch.optim.AdamW(params, lr=lr)
            generator = torch.Generator(device=pixel_values.device).manual_seed(seed)
            spacing = self.noise_scheduler.config.num_train_timesteps // samples
            with torch.enable_grad():
                for _ in range(steps):
                    start = int(torch.randint(0, spacing, (1,), generator=generator))
                    enc = self.image_encoder(pixel_values.to(self.dtype), image_masks)
                    posterior = self._encode_latents(pixel_values_decoder)
                    losses = []
                    for k in range(samples):
                        n = pixel_values.shape[0]
                        draws = DiffusionDraws(timesteps=torch.full((n,), start + k * spacing, device=pixel_values.device))
                        losses.append(self._loss_csr(enc, posterior, draws, generator))
                    optimizer.zero_grad()
                    torch.stack(losses).mean().backward()
                    optimizer.step()
            self.requires_grad_(False)
            self.train(was_training)
            yield self
        finally:
            self.image_encoder.load_state_dict(saved)
            for n, p in self.named_parameters():
                p.requires_grad_(flags[n])
                p.grad = None
            self.train(was_training)

    @torch.no_grad()
    def generate_images(self, input_ids, attention_mask=None, pixel_values=None, image_masks=None, num_images=None, **kwargs):
        """Text-to-image (and image-conditioned image generation): each prompt row gets ``<|startofimage|>``
        appended and one image drawn from its context. Left-padded prompts; ``kwargs`` as in interleaved
        ``generate`` (``num_inference_steps``, ``guidance_scale``, ``generator``, ...). Returns a list of
        [3,D,D] tensors in [0,1], one per row."""
        cfg = self.config
        soi = torch.full((input_ids.shape[0], 1), cfg.soi_token_id, dtype=input_ids.dtype, device=input_ids.device)
        ids = torch.cat([input_ids, soi], 1)
        mask = torch.cat([attention_mask if attention_mask is not None else torch.ones_like(input_ids), torch.ones_like(soi)], 1)
        kwargs.setdefault("max_new_tokens", 0)
        out = self.generate(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, image_masks=image_masks, num_images=num_images, soi="draw", **kwargs)
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
        max_new_tokens: int = 64,
        max_new_images: int = 4,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 3.5,
        height: int | None = None,
        width: int | None = None,
        logits_processor=None,
        streamer=None,
        use_cache: bool = True,
        output_scores: bool = False,
        output_logits: bool = False,
        **unused,
    ) -> DeemGenerateOutput:
        """Write text and draw images in one loop, for a batch (left padding), rows drawing at different steps.

        When a row emits ``<|startofimage|>``: its context (nearest ``<s>`` .. soi, §2.8) conditions the diffusion
        pipeline (previous image of the document as side features), the new image is encoded like an input image
        and its ``num_image_tokens`` embeddings are fed to that row (other rows get masked padding in that step),
        then decoding goes on. ``generator``: one per row (a list) makes each row independent of the others; a
        single generator drives the whole batch. ``max_new_images`` per row; then ``<|startofimage|>`` is
        suppressed for that row. Sampling: ``do_sample``, ``temperature``, ``top_k``, ``top_p``;
        ``logits_processor`` (a ``LogitsProcessorList``) runs first. ``height`` / ``width``: size of the drawn
        images (default the decoder resolution; they are resized to the encoder's to be read back). ``streamer``: ``put(ids)`` /
        ``put_image(row, image)`` / ``end()``."""
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        cfg = self.config
        if unused.pop("num_beams", 1) != 1:
            raise ValueError("interleaved generation (soi='draw') supports greedy and sampling, not beam search")
        unused.pop("generation_config", None)
        unused.pop("suppress_tokens", None)
        unused.pop("return_dict_in_generate", None)  # the interleaved output is always a DeemGenerateOutput
        if unused:
            raise TypeError(f"unexpected arguments for interleaved generation: {sorted(unused)}")
        batch, q = input_ids.shape[0], cfg.num_image_tokens
        limit = cfg.text_config.max_position_embeddings
        worst = input_ids.shape[1] + max_new_tokens + max_new_images * q
        if worst > limit:
            raise ValueError(f"prompt {input_ids.shape[1]} + max_new_tokens {max_new_tokens} + {max_new_images} image(s) x {q} tokens = {worst} exceeds the model's maximum of {limit} tokens")
        capacity = cfg.cross_attention_config.max_num_images
        most = int(per_row.max()) if per_row.numel() else 0
        if most + max_new_images > capacity:
            raise ValueError(f"a row may hold at most {capacity} images (cross_attention_config.max_num_images): {most} in the prompt + max_new_images {max_new_images} is too many")
        eos = eos_token_id if eos_token_id is not None else self.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, (list, tuple)) else [eos if eos is not None else cfg.eos_token_id])
        pad = cfg.pad_token_id if pad_token_id is None else pad_token_id
        gens = generator if isinstance(generator, (list, tuple)) else [generator] * batch
        if len(gens) != batch:
            raise ValueError(f"got {len(gens)} generators for {batch} rows")
        warpers = LogitsProcessorList(list(logits_processor or []))
        if do_sample:
            if temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(temperature))
            if top_k:
                warpers.append(TopKLogitsWarper(top_k))
            if top_p is not None and top_p < 1.0:
                warpers.append(TopPLogitsWarper(top_p))
        device = input_ids.device
        ids = input_ids.clone()
        mask = attention_mask.clone() if attention_mask is not None else torch.ones_like(ids)

        # per-row image memory: (first placeholder position, the four maps) of every image so far
        memory: list[list[tuple[int, list[torch.Tensor]]]] = [[] for _ in range(batch)]
        embeds = self.language_model.embed_tokens(ids)
        if pixel_values is not None and pixel_values.shape[0] > 0:
            enc = self.image_encoder(pixel_values.to(self.dtype), image_masks)
            embeds = self._embed(ids, enc.llm_embeds)
            for i, (b, start, _) in enumerate(runs):
                memory[b].append((start, [m[i] for m in enc.multiscale_features]))
        else:
            embeds = self._embed(ids, None)
        drawn: list[list[torch.Tensor]] = [[] for _ in range(batch)]
        cache = DynamicCache(config=cfg.text_config)
        hidden_history = []
        pipe = self.image_pipeline() if self.has_diffusion else None

        cached = {}
        seq_embeds = []  # without a cache, every step runs the whole sequence so far

        def step(chunk_embeds):
            key = tuple(len(m) for m in memory)  # the memory only grows: rebuild and re-project when an image is added
            if key not in cached:
                vision, shapes, starts = self._memory_tensors(memory, batch, device)
                cached.clear()
                cached[key] = (self.project_vision_states(vision) if vision is not None else None, shapes, starts)
            vision, shapes, starts = cached[key]
            if not use_cache:
                seq_embeds.append(chunk_embeds)
                chunk_embeds = torch.cat(seq_embeds, 1)
            new = chunk_embeds.shape[1]
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)[:, -new:]
            xmask = cross_attention_visibility(ids, starts, cfg.bos_token_id)[:, -new:] if vision is not None else None
            out = self(
                inputs_embeds=chunk_embeds, attention_mask=mask, position_ids=positions, cache=cache if use_cache else None, use_cache=use_cache,
                vision_states=vision, vision_spatial_shapes=shapes, image_starts=starts, cross_attention_mask=xmask, return_loss=False,
            )
            if not use_cache:
                hidden_history.clear()
            hidden_history.append(out.last_hidden_state)
            return out.logits[:, -1].float()

        if streamer is not None:
            streamer.put(ids.cpu())
        logits = step(embeds)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        pending = (ids[:, -1] == cfg.soi_token_id) & (mask[:, -1] == 1)  # a prompt that ends in <|startofimage|>
        if bool(pending.any()):
            if pipe is None:
                raise ValueError("the prompt asks for an image (<|startofimage|>) but the model has no diffusion weights")
            rows = pending.nonzero().squeeze(1)
            chunk, fill, chunk_mask = self._draw_images(pipe, rows, ids, mask, memory, drawn, torch.cat(hidden_history, 1), gens, (num_inference_steps, guidance_scale, height, width), streamer)
            ids, mask = torch.cat([ids, fill], 1), torch.cat([mask, chunk_mask], 1)
            image_logits = step(chunk)
            logits[rows] = image_logits[rows]
        all_scores, all_logits = [], []
        for _ in range(max_new_tokens):
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
            logits = step(self._embed(token[:, None], None))
            draw = (token == cfg.soi_token_id) & ~finished
            if bool(draw.any()):
                if pipe is None:
                    raise ValueError("the model emitted <|startofimage|> but has no diffusion weights; use soi='stop' or 'suppress' for text only")
                rows = draw.nonzero().squeeze(1)
                chunk, fill, chunk_mask = self._draw_images(pipe, rows, ids, mask, memory, drawn, torch.cat(hidden_history, 1), gens, (num_inference_steps, guidance_scale, height, width), streamer)
                ids, mask = torch.cat([ids, fill], 1), torch.cat([mask, chunk_mask], 1)
                image_logits = step(chunk)
                logits[rows] = image_logits[rows]
            if bool(finished.all()):
                break
        if streamer is not None:
            streamer.end()
        return DeemGenerateOutput(
            sequences=ids, attention_mask=mask, images=drawn,
            scores=tuple(all_scores) if output_scores else None, logits=tuple(all_logits) if output_logits else None,
        )

    def _memory_tensors(self, memory, batch, device):
        """Per-row image memory -> (vision_states [B,N,S,E], level shapes, image_starts [B,N]) or Nones."""
        n_max = max(len(m) for m in memory)
        if n_max == 0:
            return None, None, None
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
        return states, shapes, starts

    def _draw_images(self, pipe, rows, ids, mask, memory, drawn, hidden, gens, sampling, streamer):
        """Draw one image for each row in ``rows`` (which just fed ``<|startofimage|>``): condition on its context,
        sample with the previous image of the document as side features, encode the result. Appends to ``memory``
        and ``drawn``; returns the next chunk: embeddings [B,Q,H], ids [B,Q] and attention mask [B,Q] (masked
        padding for the other rows)."""
        cfg = self.config
        device = ids.device
        pos = torch.arange(ids.shape[1], device=device)
        conds, sides, side_masks = [], [], []
        for b in rows.tolist():
            bos = int(torch.where(ids[b] == cfg.bos_token_id, pos, torch.full_like(pos, -1)).max())
            start = max(bos, int(mask[b].argmax()))
            keep = (mask[b, start:] == 1).nonzero().squeeze(1) + start  # skip padding from other rows' images
            n = keep.shape[0]
            zero = torch.zeros(1, dtype=torch.long, device=device)
            ctx, ctx_mask = self._context_features(hidden[b, keep][None], zero, torch.tensor([n - 1], device=device), zero)
            conds.append(self.decoder_perceiver(ctx, ctx_mask))
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
            prompt_embeds=cond, side_features=side, side_mask=side_mask, num_inference_steps=steps, guidance_scale=guidance,
            height=height, width=width, generator=gen, output_type="pt",
        ).images
        size = cfg.vision_config.image_size
        view = F.interpolate(pictures.float(), size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        enc = self.image_encoder(view.to(self.dtype), None)
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
        return [torch.zeros(e, side // 2 ** (level + 2), side // 2 ** (level + 2), device=device, dtype=self.dtype) for level in range(4)]

    def prepare_inputs_for_generation(self, input_ids, inputs_embeds=None, vision_states=None, image_starts=None, **kwargs):
        inputs = super().prepare_inputs_for_generation(input_ids, inputs_embeds=inputs_embeds, vision_states=vision_states, image_starts=image_starts, **kwargs)
        new = inputs["inputs_embeds"].shape[1] if inputs.get("inputs_embeds") is not None else inputs["input_ids"].shape[1]
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            # positions count real tokens, so right-padded prompts continue correctly (as the original's cascade
            # wrapper does); the stock update only adds 1 to the last prompt position.
            positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
            inputs["position_ids"] = positions[:, -new:]
        if vision_states is not None:
            # visibility of the new tokens, from the whole sequence so far (documents may have started earlier)
            inputs["cross_attention_mask"] = cross_attention_visibility(input_ids, image_starts, self.config.bos_token_id)[:, -new:]
        return inputs

    # ------------------------------------------------------------------ training stages / accounting

    def component_parameters(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Parameters grouped by component (each parameter in exactly one group)."""
        groups = {name: [] for name in COMPONENTS}
        for name, param in self.named_parameters():
            groups[_component_of(name)].append((name, param))
        return groups

    def set_training_stage(self, stage: int) -> "DeemForInterleavedGeneration":
        """Freeze / unfreeze as the paper's stage ``stage`` (1, 2 or 3; §1.4, §4.4) and return self."""
        if stage not in STAGE_TRAINABLE:
            raise ValueError(f"stage must be 1, 2 or 3, got {stage!r}")
        trainable = STAGE_TRAINABLE[stage]
        for group, params in self.component_parameters().items():
            for _, p in params:
                p.requires_grad_(group in trainable)
        return self

    def parameter_table(self, stage: int | None = None) -> list[dict]:
        """Rows ``{component, total, trainable}`` (+ a ``total`` row); with ``stage`` the trainable column is
        that stage preset's, without it the model's current ``requires_grad`` state."""
        trainable_groups = STAGE_TRAINABLE[stage] if stage is not None else None
        rows = []
        for group, params in self.component_parameters().items():
            total = sum(p.numel() for _, p in params)
            if trainable_groups is None:
                train = sum(p.numel() for _, p in params if p.requires_grad)
            else:
                train = total if group in trainable_groups else 0
            rows.append({"component": group, "total": total, "trainable": train})
        rows.append({"component": "total", "total": sum(r["total"] for r in rows), "trainable": sum(r["trainable"] for r in rows)})
        return rows


# ---------------------------------------------------------------------- components and stage presets

COMPONENTS = (
    "image encoder",
    "encoder adapters",
    "encoder perceiver",
    "decoder perceiver",
    "LLM",
    "cross-attention",
    "text head (base)",
    "text head (new tokens)",
    "UNet",
    "UNet side network",
    "VAE",
    "image decoder",
    "soi embedding",
)

# §4.4: what trains in each stage. "image decoder" = context projection + learned null condition; stage 3 has
# no diffusion losses, so the whole image-generation side stays frozen there.
STAGE_TRAINABLE = {
    1: {"image encoder", "encoder adapters", "encoder perceiver", "decoder perceiver", "image decoder", "cross-attention", "text head (new tokens)", "UNet side network", "soi embedding"},
    2: {"encoder adapters", "encoder perceiver", "decoder perceiver", "image decoder", "LLM", "cross-attention", "text head (new tokens)", "UNet side network", "soi embedding"},
    3: {"encoder adapters", "encoder perceiver", "LLM", "cross-attention", "text head (new tokens)", "soi embedding"},
}


def _component_of(name: str) -> str:
    if name.startswith("image_encoder."):
        if name.startswith("image_encoder.backbone.trunk."):
            return "image encoder"
        if name.startswith("image_encoder.backbone."):
            return "encoder adapters"
        return "encoder perceiver"
    if name.startswith("language_model."):
        return "cross-attention" if ".cross_attn." in name else "LLM"
    if name.startswith("lm_head.base."):
        return "text head (base)"
    if name.startswith("lm_head."):
        return "text head (new tokens)"
    if name.startswith("decoder_perceiver."):
        return "decoder perceiver"
    for prefix, group in (("unet_side.", "UNet side network"), ("unet.", "UNet"), ("vae.", "VAE"), ("context_proj.", "image decoder")):
        if name.startswith(prefix):
            return group
    if name == "null_condition":
        return "image decoder"
    if name == "soi_embedding":
        return "soi embedding"
    raise ValueError(f"parameter {name!r} belongs to no component")


# ---------------------------------------------------------------------- sequence layout helpers


def _image_runs(input_ids: torch.Tensor, image_token_id: int) -> list[tuple[int, int, int]]:
    """(row, start, length) of every run of image placeholders, in row-major order."""
    is_img = input_ids == image_token_id
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


def cross_attention_visibility(input_ids: torch.Tensor, image_starts: torch.Tensor, bos_token_id: int, offset: int = 0) -> torch.Tensor:
    """[B, L, N] bool: token l sees image n iff start_n <= l and start_n > nearest ``<s>`` at or before l (§2.5).

    ``image_starts`` [B,N] absolute positions of the images' first placeholders (-1: no image); ``offset``:
    absolute position of ``input_ids[:, 0]`` (cached decoding)."""
    pos = torch.arange(input_ids.shape[1], device=input_ids.device) + offset
    bos_at = torch.where(input_ids == bos_token_id, pos[None], torch.full_like(input_ids, -1))
    nearest_bos = torch.cummax(bos_at, dim=1).values  # [B,L]
    starts = image_starts[:, None, :]
    return (starts >= 0) & (starts <= pos[None, :, None]) & (starts > nearest_bos[..., None])


def _image_context_spans(runs, input_ids, attention_mask, bos_token_id):
    """Per image: row, position of its ``<|startofimage|>``, and the first context position (the nearest
    ``<s>`` before the soi, or the first real token of the row). Returns three [N] long tensors."""
    device = input_ids.device
    rows = torch.tensor([b for b, _, _ in runs], dtype=torch.long, device=device)
    soi = torch.tensor([s - 1 for _, s, _ in runs], dtype=torch.long, device=device)
    pos = torch.arange(input_ids.shape[1], device=device)
    first_real = torch.zeros(input_ids.shape[0], dtype=torch.long, device=device)
    if attention_mask is not None:
        first_real = attention_mask.long().argmax(dim=1)
    bos_at = torch.where(input_ids == bos_token_id, pos[None], torch.full_like(input_ids, -1))
    nearest_bos = torch.cummax(bos_at, dim=1).values[rows, soi]
    starts = torch.maximum(nearest_bos, first_real[rows])
    return rows, soi, starts


def default_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, config: DeemConfig) -> torch.Tensor:
    """Next-token targets by the rules of §4.1 (unshifted, HF convention): ignore padding (``attention_mask`` 0,
    or the pad id when no mask is given), image placeholders, ``<s>``, and a ``<|startofimage|>`` that
    directly follows ``<s>`` (an image opening a document is not predicted)."""
    labels = input_ids.clone()
    ignore = (input_ids == config.image_token_id) | (input_ids == config.bos_token_id)
    ignore |= (attention_mask == 0) if attention_mask is not None else (input_ids == config.pad_token_id)
    prev = F.pad(input_ids[:, :-1], (1, 0), value=-1)
    ignore |= (input_ids == config.soi_token_id) & (prev == config.bos_token_id)
    return labels.masked_fill(ignore, -100)


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


DeemConfig.register_for_auto_class()
DeemForInterleavedGeneration.register_for_auto_class("AutoModel")

__all__ = ["DeemForInterleavedGeneration", "DeemPreTrainedModel", "DeemOutput", "DeemGenerateOutput", "DeemStreamer", "DiffusionDraws"]
