"""DEEM: an interleaved image-text model whose diffusion decoder also checks its image encoder.

One [`PreTrainedModel`] owns every weight, split along the paper's parts as transformers' multimodal models are:

- [`DeemModel`] (``model``): the CLIP-ConvNeXt image encoder and its perceiver (``model.image_encoder``,
  ``vision.py``), the LLaMA decoder with gated multi-scale deformable cross-attention (``model.language_model``,
  this file + ``mmfs.py``) and the learnable ``<|startofimage|>`` vector (``model.soi_embedding``);
- [`DeemTextHead`] (``lm_head``): the frozen base rows plus the trainable rows of the tokens DEEM adds;
- [`DeemImageDecoder`] (``image_decoder``, ``image_decoder_deem.py``): context projection, decoder perceiver,
  learned null condition, Stable Diffusion's UNet / VAE with the UNet side network, and the denoising loss of
  L_NIP and L_CSR;
- [`DeemForInterleavedGeneration`] = the three, with the losses and generation (``generation_deem.py``).

The sequence rules (placeholder runs, visibility, labels) live in ``sequence_deem.py``. Section numbers (§) refer
to ``reference/original-deem.md``.
"""

import contextlib
import dataclasses
import importlib
import inspect
import re

import torch
import torch.nn as nn
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)
from transformers.utils import logging

from .compat import ATTENTION_CACHE_KW, CACHE_FIELD, MASK_CACHE_KW, model_output_class, pop_cache_kwarg
from .configuration_deem import DeemConfig
from .generation_deem import DeemGenerateOutput, DeemGenerationMixin, DeemStreamer
from .image_decoder_deem import (
    DeemDecoderPerceiver,
    DeemImageDecoder,
    DiffusionDraws,
    check_draws,
    initialize_unless_loaded,
)
from .mmfs import DeemGatedCrossAttention
from .sequence_deem import (
    DeemImageMemory,
    _describe,
    _image_context_spans,
    _image_runs,
    _image_start_table,
    check_pixels,
    check_sequence_inputs,
    check_token_ids,
    cross_attention_visibility,
    default_labels,
    next_token_loss,
    pad_per_row,
    unpad_per_row,
)
from .vision import DeemImageEncoder

logger = logging.get_logger(__name__)

DeemOutput = model_output_class(
    "DeemOutput",
    __name__,
    """Output of [`DeemForInterleavedGeneration.forward`].

    ``loss`` = w_ntp·loss_ntp + w_nip·loss_nip + w_csr·loss_csr over the components that ran (a component is
    ``None`` when its weight is 0 or its inputs are absent). ``logits``: [B,L,V]. ``cache``: the LLM's ``Cache``
    (the field is named as the installed transformers names it: ``cache`` from 5.24 on, ``past_key_values``
    before). ``hidden_states`` / ``attentions``: per layer, with ``output_hidden_states`` / ``output_attentions``.
    ``image_embeds``: [N,Q,H] image tokens given to the LLM. ``image_features``: the four multi-scale
    encoder maps [N,E,h,w]. ``last_hidden_state``: [B,L,H] final-norm LLM states (the image decoder's context).
    ``cross_attentions``: with ``output_attentions``, per cross-attention layer (when images are read) the
    deformable attention's sampling weights [B, heads, L, n_img, levels, points] (softmax over images x levels x
    points and a null sink, so a row sums to at most 1).
    """,
    [
        ("loss", torch.FloatTensor | None),
        ("loss_ntp", torch.FloatTensor | None),
        ("loss_nip", torch.FloatTensor | None),
        ("loss_csr", torch.FloatTensor | None),
        ("logits", torch.FloatTensor | None),
        ("cache", Cache | None),
        ("hidden_states", tuple[torch.FloatTensor, ...] | None),
        ("attentions", tuple[torch.FloatTensor, ...] | None),
        ("last_hidden_state", torch.FloatTensor | None),
        ("image_embeds", torch.FloatTensor | None),
        ("image_features", tuple[torch.FloatTensor, ...] | None),
        ("cross_attentions", tuple[torch.FloatTensor, ...] | None),
    ],
)


DeemModelOutputWithPast = model_output_class(
    "DeemModelOutputWithPast",
    __name__,
    """Output of [`DeemModel.forward`]: ``last_hidden_state`` [B,L,H] (final norm), ``cache``, ``hidden_states`` /
    ``attentions`` per layer when asked, the prompt images' ``image_embeds`` [N,Q,H], ``image_features`` (the four
    multi-scale maps [N,E,h,w]) and the whole ``image_encoder_output`` (what the diffusion losses read);
    ``cross_attentions`` as in [`DeemOutput`].""",
    [
        ("last_hidden_state", torch.FloatTensor | None),
        ("cache", Cache | None),
        ("hidden_states", tuple[torch.FloatTensor, ...] | None),
        ("attentions", tuple[torch.FloatTensor, ...] | None),
        ("image_embeds", torch.FloatTensor | None),
        ("image_features", tuple[torch.FloatTensor, ...] | None),
        ("image_encoder_output", object),
        ("cross_attentions", tuple[torch.FloatTensor, ...] | None),
    ],
)


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
        vision_states: torch.Tensor | None = None,
        cross_attention_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        vision_spatial_shapes: list[tuple[int, int]] | None = None,
        vision_states_projected: bool = False,
        output_attentions: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        residual = hidden_states
        hidden_states, attn_weights = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **{ATTENTION_CACHE_KW: cache},
            **kwargs,
        )
        hidden_states = residual + hidden_states
        cross_weights = None
        if self.cross_attn is not None and vision_states is not None:
            # projected: [B, K, N, S, E], each cross-attention layer's own projection (DeemImageMemory.projected)
            states = vision_states[:, self.cross_index] if vision_states_projected else vision_states
            update = self.cross_attn(
                hidden_states,
                states,
                cross_attention_mask,
                spatial_shapes=vision_spatial_shapes,
                vision_states_projected=vision_states_projected,
                output_attentions=output_attentions,
            )
            if output_attentions:
                update, cross_weights = update
            hidden_states = hidden_states + update
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + hidden_states, attn_weights, cross_weights


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
        output_attentions: bool = False,
        vision_states_projected: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None, tuple[torch.Tensor, ...] | None]:
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
        all_attentions = () if output_attentions else None
        all_cross = () if output_attentions and vision_states is not None else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden += (hidden_states,)
            # tensors that carry gradients go positionally: reentrant checkpointing re-attaches only those
            hidden_states, attn_weights, cross_weights = layer(
                hidden_states,
                vision_states,
                cross_attention_mask,
                attention_mask=causal_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                vision_spatial_shapes=vision_spatial_shapes,
                vision_states_projected=vision_states_projected,
                output_attentions=output_attentions,
                **kwargs,
            )
            if output_attentions:
                all_attentions += (attn_weights,)
                if all_cross is not None and layer.cross_attn is not None:
                    all_cross += (cross_weights,)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden += (hidden_states,)
        return hidden_states, all_hidden, all_attentions, all_cross


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

    def set_base(self, base: nn.Linear):
        """Use ``base`` as the base rows; the new-token head is resized to its vocabulary."""
        if not isinstance(base, nn.Linear) or base.bias is None:
            raise TypeError("the DEEM text head's base rows must be an nn.Linear with a bias")
        self.base = base
        self._resize_new_tokens(base.out_features)

    def resize(self, vocab: int):
        """Grow or shrink to ``vocab`` ids (>= ``original_vocab_size``); kept rows keep their weights, added rows
        start as the original initialises new tokens; each part keeps its ``requires_grad``."""
        if vocab < self.original_vocab_size:
            raise ValueError(
                f"the vocabulary cannot shrink below original_vocab_size={self.original_vocab_size}, got {vocab}"
            )
        old = self.base
        base = nn.Linear(old.in_features, vocab, bias=True, device=old.weight.device, dtype=old.weight.dtype)
        keep = min(vocab, old.out_features)
        with torch.no_grad():
            base.weight.zero_()
            base.bias.fill_(-100.0)
            base.bias[: self.original_vocab_size] = 0.0
            base.weight[:keep] = old.weight[:keep]
            base.bias[:keep] = old.bias[:keep]
        base.weight.requires_grad_(old.weight.requires_grad)
        base.bias.requires_grad_(old.bias.requires_grad)
        self.base = base
        self._resize_new_tokens(vocab)

    def _resize_new_tokens(self, vocab: int):
        old = self.new_tokens
        rows = vocab - self.original_vocab_size
        if rows < 0:
            raise ValueError(
                f"the base rows hold {vocab} ids, fewer than original_vocab_size={self.original_vocab_size}"
            )
        if rows == old.out_features:
            return
        new = nn.Linear(old.in_features, rows, bias=True, device=old.weight.device, dtype=old.weight.dtype)
        keep = min(rows, old.out_features)
        with torch.no_grad():
            new.weight.zero_()
            new.bias.fill_(100.0 + self.new_token_logit_init)
            new.weight[:keep] = old.weight[:keep]
            new.bias[:keep] = old.bias[:keep]
        new.weight.requires_grad_(old.weight.requires_grad)
        new.bias.requires_grad_(old.bias.requires_grad)
        self.new_tokens = new

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = self.base(hidden_states)
        # in place on the new rows (the linear's backward does not read its output): no copy of the whole logits;
        # narrow + add_ is one view and one add, where `logits[..., v0:] += x` also writes the slice back onto itself
        logits.narrow(-1, self.original_vocab_size, logits.shape[-1] - self.original_vocab_size).add_(
            self.new_tokens(hidden_states)
        )
        return logits


def check_decoder_views(config: DeemConfig, pixel_values, pixel_values_decoder):
    """The decoder views of the diffusion losses: one [3,D,D] float view per image, D the decoder resolution."""
    if pixel_values is not None and not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
    if pixel_values_decoder is None:
        return
    check_pixels(pixel_values_decoder, "pixel_values_decoder")
    if pixel_values is None or pixel_values_decoder.shape[0] != pixel_values.shape[0]:
        given = "no pixel_values" if pixel_values is None else f"{pixel_values.shape[0]} image(s) in pixel_values"
        raise ValueError(
            f"pixel_values_decoder must hold one decoder view per image: {pixel_values_decoder.shape[0]} view(s) for "
            f"{given}"
        )
    side = config.diffusion_config.image_size if config.diffusion_config is not None else None
    if side is not None and tuple(pixel_values_decoder.shape[-2:]) != (side, side):
        raise ValueError(f"pixel_values_decoder must be {side}x{side}, got {tuple(pixel_values_decoder.shape[-2:])}")


def _as_dtype(pixels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Floating pixels in the model's dtype; anything else is left for the image encoder to refuse."""
    return pixels.to(dtype) if pixels.is_floating_point() else pixels


def is_tracing() -> bool:
    """Under ``torch.compile`` / ``torch.export`` the data-dependent input checks are skipped (they run eagerly)."""
    return torch.compiler.is_compiling()


# checkpoints saved before the split into model / lm_head / image_decoder: (old prefix or name, current one)
LEGACY_KEY_PREFIXES = (
    ("image_encoder.", "model.image_encoder."),
    ("language_model.", "model.language_model."),
    ("soi_embedding", "model.soi_embedding"),
    ("context_proj.", "image_decoder.context_proj."),
    ("decoder_perceiver.", "image_decoder.decoder_perceiver."),
    ("unet.", "image_decoder.unet."),
    ("unet_side.", "image_decoder.unet_side."),
    ("vae.", "image_decoder.vae."),
    # the learned null condition: a parameter of the image decoder, now of its decoder perceiver
    ("null_condition", "image_decoder.decoder_perceiver.null_condition"),
    ("image_decoder.null_condition", "image_decoder.decoder_perceiver.null_condition"),
)
# the same as ``from_pretrained(key_mapping=...)`` regexes (anchored: current keys never match)
LEGACY_KEY_MAPPING = {
    "^" + re.escape(old) + ("" if old.endswith(".") else "$"): new for old, new in LEGACY_KEY_PREFIXES
}


def _rename(key: str, pairs) -> str:
    for old, new in pairs:  # whole keys before prefixes (a key may also start with a renamed prefix)
        if key == old and not old.endswith("."):
            return new
    for old, new in pairs:
        if old.endswith(".") and key.startswith(old):
            return new + key[len(old) :]
    return key


def legacy_to_current_keys(state: dict) -> dict:
    """A state dict in the layout before the split -> the current layout (keys already current are kept)."""
    return {_rename(key, LEGACY_KEY_PREFIXES): value for key, value in state.items()}


def current_to_legacy_keys(state: dict) -> dict:
    """The current layout -> the layout before the split (what the original-key tables are written against)."""
    pairs = [(new, old) for old, new in LEGACY_KEY_PREFIXES if not old.startswith("image_decoder.")]
    return {_rename(key, pairs): value for key, value in state.items()}


class DeemPreTrainedModel(PreTrainedModel):
    config: DeemConfig
    config_class = DeemConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = [
        "DeemDecoderLayer",
        "DeemImageEncoder",
        "DeemPerceiver",
        "DeemDecoderPerceiver",
        "UNet2DConditionModel",
        "DeemUNetSideNetwork",
        "AutoencoderKL",
    ]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    # the VAE encodes in fp32 (§2.9) under fp16 and bf16 alike; the CLIP mean/std and the fixed sin-cos position
    # tables stay fp32 buffers wherever they live
    _keep_in_fp32_modules_strict = ["vae"]
    _keep_in_fp32_modules = ["vae", "clip_mean", "clip_std", "pos_embed"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    _tied_weights_keys = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # generate() reads forward's parameters through inspect.signature several times per call and, for remote code
        # (this model's usual form), once per decoding step; a signature stored on the function is not re-parsed
        forward = cls.__dict__.get("forward")
        if inspect.isfunction(forward):
            forward.__signature__ = inspect.signature(forward)

    @classmethod
    def from_pretrained(cls, *args, strict: bool = False, **kwargs):
        """``PreTrainedModel.from_pretrained`` with the library's loading contract (missing weights are
        initialised and reported through ``output_loading_info`` and the usual warning). ``strict=True`` raises a
        ``ValueError`` naming every missing, unexpected or wrongly shaped key instead. Checkpoints written before
        the model was split into ``model`` / ``lm_head`` / ``image_decoder`` load through a key mapping."""
        if cls is not DeemModel:
            kwargs.setdefault("key_mapping", dict(LEGACY_KEY_MAPPING))
        if "torch_dtype" in kwargs and "dtype" not in kwargs:
            kwargs["dtype"] = kwargs.pop("torch_dtype")
        per_part = kwargs.get("dtype") if isinstance(kwargs.get("dtype"), dict) else None
        if per_part is not None:
            unknown = sorted(set(per_part) - {"", "default"} - set(DeemConfig.sub_configs))
            if unknown:
                raise ValueError(
                    f"dtype keys {unknown} are not sub-configs of DeemConfig; use '' (the rest) and "
                    f"{sorted(DeemConfig.sub_configs)}"
                )
            kwargs["dtype"] = per_part.get("", per_part.get("default", torch.float32))
        want_info = kwargs.pop("output_loading_info", False)
        if strict:
            kwargs.setdefault("ignore_mismatched_sizes", True)  # collect them here and report all at once
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        if strict:
            problems = []
            for key, label in (
                ("missing_keys", "missing from the checkpoint"),
                ("unexpected_keys", "not in the model"),
                ("mismatched_keys", "with the wrong shape"),
            ):
                keys = info.get(key) or []
                if keys:
                    names = sorted(
                        k if isinstance(k, str) else f"{k[0]} (checkpoint {tuple(k[1])} vs model {tuple(k[2])})"
                        for k in keys
                    )
                    problems.append(f"{len(names)} key(s) {label}: {', '.join(names)}")
            if problems:
                advice = "strict=False, ignore_mismatched_sizes=True" if info.get("mismatched_keys") else "strict=False"
                where = args[0] if args else kwargs.get("pretrained_model_name_or_path")
                raise ValueError(
                    f"weights at {where} do not match the DeemConfig: "
                    + "; ".join(problems)
                    + f" (pass {advice} to load anyway)"
                )
        if per_part is not None:
            model._cast_sub_models(per_part)
        return (model, info) if want_info else model

    def _sub_model_modules(self) -> list[tuple[str, list[nn.Module]]]:
        """(sub-config, the modules it describes), general before specific (later entries override earlier)."""
        base = self if isinstance(self, DeemModel) else self.model
        parts = [
            ("perceiver_config", [base.image_encoder]),
            ("vision_config", [base.image_encoder.backbone]),
            ("text_config", [base.language_model] + ([self.lm_head] if hasattr(self, "lm_head") else [])),
            (
                "cross_attention_config",
                [layer.cross_attn for layer in base.language_model.layers if layer.cross_attn is not None],
            ),
        ]
        decoder = getattr(self, "image_decoder", None)
        if decoder is not None:
            parts += [
                ("decoder_perceiver_config", [decoder.decoder_perceiver]),
                ("diffusion_config", [m for m in (decoder.unet, decoder.unet_side) if m is not None]),
            ]
        return parts

    def _cast_sub_models(self, dtypes: dict):
        """Cast each sub-model to its dtype in ``dtypes`` (sub-config name -> dtype); fp32 buffers and the VAE
        stay fp32."""
        keep = set(self._keep_in_fp32_modules or [])
        rest = dtypes.get("", dtypes.get("default", torch.float32))
        for key, modules in self._sub_model_modules():  # a part not named gets the rest's dtype
            for module in modules:
                module.to(dtypes.get(key, rest))
        for name, buffer in self.named_buffers():
            if buffer.is_floating_point() and keep & set(name.split(".")):
                buffer.data = buffer.data.float()
        for name, module in self.named_modules():
            if name.split(".")[-1] in (self._keep_in_fp32_modules_strict or []):
                module.float()

    def _set_gradient_checkpointing(self, enable: bool = True, *args, **kwargs):
        """transformers' switch for every ``GradientCheckpointingLayer`` (LLM, perceivers) and diffusers block, plus
        the ConvNeXt trunk's stages (timm's own checkpointing), as the original checkpoints the encoder too."""
        super()._set_gradient_checkpointing(enable, *args, **kwargs)
        for module in self.modules():
            if isinstance(module, DeemImageEncoder):
                module.backbone.trunk.set_grad_checkpointing(enable)

    def _hand_down_attn_implementation(self):
        """PreTrainedModel resolves the attention implementation on the top config; sub-configs that have none get
        it (the LLM's causal mask and attention read it from ``text_config``), those given their own keep it."""
        config = self.config
        for key in config.sub_configs:
            sub = getattr(config, key, None)
            if sub is not None and getattr(sub, "_attn_implementation", None) is None:
                sub._attn_implementation = config._attn_implementation

    def _initialize_weights(self, module, is_custom_code: bool = False):
        """Like transformers', but skip a module only when all of its (recursive) tensors were loaded: the
        custom-code shortcut treats a module without direct parameters as initialised, which would skip the init
        of the deformable attention, the text head and the LLaMA blocks in ``_init_weights``."""
        initialize_unless_loaded(self, module)

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
        elif isinstance(module, DeemModel):
            nn.init.zeros_(module.soi_embedding)
        elif hasattr(module, "reset_parameters") and not isinstance(module, PreTrainedModel):
            module.reset_parameters()


class DeemModel(DeemPreTrainedModel):
    """The image encoder (ConvNeXt + adapters + perceiver, ``image_encoder``), the LLM with its gated
    cross-attention (``language_model``) and the learnable ``<|startofimage|>`` vector (``soi_embedding``):
    token and image inputs -> final-norm hidden states and the cache. No head."""

    # tensor parallelism of the LLM as LLaMA's own plan (tp_plan="auto"); the image side and the gated
    # cross-attention stay replicated
    _tp_plan = {
        "language_model.layers.*.self_attn.q_proj": "colwise",
        "language_model.layers.*.self_attn.k_proj": "colwise",
        "language_model.layers.*.self_attn.v_proj": "colwise",
        "language_model.layers.*.self_attn.o_proj": "rowwise",
        "language_model.layers.*.mlp.gate_proj": "colwise",
        "language_model.layers.*.mlp.up_proj": "colwise",
        "language_model.layers.*.mlp.down_proj": "rowwise",
    }

    def __init__(self, config: DeemConfig):
        super().__init__(config)
        self._hand_down_attn_implementation()
        self.image_encoder = DeemImageEncoder(config)
        self.language_model = DeemTextModel(config)
        self.soi_embedding = nn.Parameter(torch.zeros(1, config.text_config.hidden_size))
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.embed_tokens

    def set_input_embeddings(self, value):
        self.language_model.embed_tokens = value

    def get_decoder(self):
        return self.language_model

    def set_decoder(self, decoder):
        self.language_model = decoder

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        image_masks: torch.Tensor | None = None,
        return_dict: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ):
        """Encode images [N,3,S,S] in [0,1]: a ``DeemImageEncoderOutput`` whose ``last_hidden_state`` [N,Q,H] are
        the image tokens the LLM reads (also ``llm_embeds``), ``pooler_output`` the perceiver output, and
        ``hidden_states`` (with ``output_hidden_states``) the four multi-scale maps; a tuple with
        ``return_dict=False``."""
        out = self.image_encoder(_as_dtype(pixel_values, self.dtype), image_masks)
        out.last_hidden_state = out.llm_embeds
        out.pooler_output = out.perceiver_output
        if output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states:
            out.hidden_states = tuple(out.multiscale_features)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return out if return_dict else out.to_tuple()

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with placeholder rows replaced by image tokens [N,Q,H] (row-major) and
        ``soi_embedding`` added at every ``<|startofimage|>`` (§1.2 step 3)."""
        embeds = self.language_model.embed_tokens(input_ids)
        if image_embeds is not None and image_embeds.numel():
            slots = (input_ids == self.config.image_token_id).unsqueeze(-1)
            embeds = embeds.masked_scatter(slots, image_embeds.to(embeds.dtype).reshape(-1, embeds.shape[-1]))
        is_soi = input_ids == self.config.soi_token_id
        if not torch.is_grad_enabled() and not is_tracing() and not bool(is_soi.any()):
            # inference without <|startofimage|> (every text decoding step): adding 0 changes nothing; with
            # gradients the add stays, so soi_embedding gets its (zero) gradient in every batch as the original's
            return embeds
        return embeds + is_soi.unsqueeze(-1).to(embeds.dtype) * self.soi_embedding.to(embeds.dtype)

    def image_memory(self, enc, runs, per_row, batch: int) -> DeemImageMemory:
        """The [`DeemImageMemory`] of encoded images ``enc`` (one per placeholder run ``runs``, ``per_row`` of them
        in each of the ``batch`` rows): the cross-attention's vision states [B,N_max,S,E] with their level shapes,
        the first placeholder position of each image [B,N_max] (-1 where a row has fewer) and the image tokens
        [B,N_max,Q,H]."""
        levels = self.config.cross_attention_config.feature_levels
        maps = enc.multiscale_features
        flat = torch.cat([maps[level].flatten(2).transpose(1, 2) for level in levels], dim=1)  # [N,S,E]
        states = pad_per_row(flat, per_row)
        shapes = [tuple(maps[level].shape[-2:]) for level in levels]
        return DeemImageMemory(
            vision_states=states,
            spatial_shapes=shapes,
            image_starts=_image_start_table(runs, batch, states.shape[1], states.device),
            image_embeds=pad_per_row(enc.llm_embeds, per_row),
        )

    def _check_devices(self, **inputs):
        """Inputs hold data (not the meta device) and, on a model that lives on one device, sit on that device."""
        spread = getattr(self, "hf_device_map", None) is not None  # accelerate places the inputs itself
        device = self.language_model.embed_tokens.weight.device
        for name, value in inputs.items():
            if not isinstance(value, torch.Tensor):
                continue
            if value.device.type == "meta":
                raise ValueError(f"{name} is on the meta device (a tensor without data); give real tensors")
            if not spread and device.type != "meta" and value.device != device:
                raise ValueError(
                    f"{name} is on {value.device} but the model is on {device}: move the inputs with .to(model.device)"
                )

    def project_vision_states(self, vision_states: torch.Tensor) -> torch.Tensor:
        """[B,N,S,E] -> [B,K,N,S,E]: each of the K cross-attention layers' normalised value projection."""
        layers = [layer.cross_attn for layer in self.language_model.layers if layer.cross_attn is not None]
        return torch.stack([xattn.project_vision_states(vision_states) for xattn in layers], dim=1)

    def project_image_memory(self, memory: DeemImageMemory) -> DeemImageMemory:
        """``memory`` with this model's per-layer projection of its vision states, so that cached decoding does not
        redo it at every step."""
        return dataclasses.replace(
            memory, projected=self.project_vision_states(memory.vision_states), projected_by=id(self)
        )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_masks: torch.FloatTensor | None = None,
        num_images: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        image_memory: DeemImageMemory | None = None,
        cross_attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ):
        r"""
        input_ids [B,L]: text with ``<|startofimage|>`` + ``num_image_tokens`` placeholders per image.
        pixel_values [N,3,S,S] in [0,1]: one image per placeholder run, row-major. image_masks [N,1,S,S]: region
        masks. num_images [B]: images per row (checked). ``inputs_embeds`` [B,L,H]: used as given (text only; no
        image tokens are scattered into them). ``cache`` (``past_key_values`` before transformers 5.24).

        Cached decoding (what ``generate`` passes): ``image_memory``, the [`DeemImageMemory`] of the batch's images
        computed once (its image tokens are scattered into the placeholders ``input_ids`` holds, its vision states
        read by the cross-attention), and the new tokens' ``cross_attention_mask`` [B,L,N] (derived from
        ``input_ids`` when absent and nothing is cached).
        """
        cfg = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if inputs_embeds is not None and not is_tracing():
            if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.dim() != 3:
                raise ValueError(
                    f"inputs_embeds must be a [batch, seq_len, hidden] tensor, got {_describe(inputs_embeds)}"
                )
            if inputs_embeds.shape[0] == 0 or inputs_embeds.shape[-1] != cfg.text_config.hidden_size:
                raise ValueError(
                    f"inputs_embeds must be [batch >= 1, seq_len, {cfg.text_config.hidden_size}], got shape "
                    f"{tuple(inputs_embeds.shape)}"
                )
        if not is_tracing():
            self._check_devices(
                input_ids=input_ids,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                pixel_values=pixel_values,
                image_masks=image_masks,
                position_ids=position_ids,
            )
        cache = pop_cache_kwarg(cache, past_key_values, kwargs)
        output_attentions = output_attentions if output_attentions is not None else cfg.output_attentions
        output_hidden_states = output_hidden_states if output_hidden_states is not None else cfg.output_hidden_states
        return_dict = return_dict if return_dict is not None else cfg.return_dict
        if use_cache is None:
            use_cache = bool(getattr(cfg.text_config, "use_cache", True)) and not self.training
        if output_attentions and cfg.text_config._attn_implementation not in (None, "eager"):
            raise ValueError(
                "output_attentions=True needs the eager attention, but the LLM uses "
                f"{cfg.text_config._attn_implementation!r}: "
                "load with attn_implementation='eager' (or {'text_config': 'eager'})"
            )
        past_len = cache.get_seq_length() if cache is not None else 0
        runs = per_row = None
        # the input checks are data-dependent: under compile/export they are skipped for the text path only
        if image_memory is not None:
            if not isinstance(image_memory, DeemImageMemory):
                raise ValueError(f"image_memory must be a DeemImageMemory, got {type(image_memory).__name__}")
            if pixel_values is not None:
                raise ValueError("give pixel_values or image_memory (the images already encoded), not both")
            rows = (input_ids if input_ids is not None else inputs_embeds).shape[0]
            if image_memory.batch_size != rows:
                raise ValueError(f"image_memory holds {image_memory.batch_size} rows, the batch has {rows}")
        if input_ids is not None and (pixel_values is not None or image_memory is not None or not is_tracing()):
            runs, per_row = check_sequence_inputs(
                cfg,
                input_ids,
                attention_mask,
                pixel_values,
                image_masks,
                num_images,
                past_len,
                images_encoded=image_memory is not None,
            )
        elif input_ids is None and pixel_values is not None:
            raise ValueError("pixel_values need input_ids (the placeholders say where the images go)")

        enc = image_embeds = None
        memory = image_memory
        if pixel_values is not None:
            if pixel_values.shape[0] > 0:
                enc = self.image_encoder(_as_dtype(pixel_values, self.dtype), image_masks)
                image_embeds = enc.llm_embeds
                memory = self.image_memory(enc, runs, per_row, input_ids.shape[0])
                cross_attention_mask = None
        elif memory is not None and memory.image_embeds is not None and per_row is not None:
            image_embeds = unpad_per_row(memory.image_embeds, per_row)
        vision_states, projected = memory.states_for(self) if memory is not None else (None, False)
        if vision_states is not None and cross_attention_mask is None:
            if input_ids is None or past_len:
                raise ValueError(
                    "cached decoding with an image_memory needs the new tokens' cross_attention_mask "
                    "(generate() passes it)"
                )
            cross_attention_mask = cross_attention_visibility(input_ids, memory.image_starts, cfg.bos_token_id)
        if cross_attention_mask is not None and vision_states is not None:
            cross_attention_mask = cross_attention_mask.to(vision_states.dtype)

        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, image_embeds)
        batch, length = inputs_embeds.shape[:2]
        if use_cache and cache is None:
            cache = DynamicCache(config=cfg.text_config)
        if position_ids is None:  # as LlamaModel: consecutive positions (RoPE makes left padding harmless)
            position_ids = torch.arange(past_len, past_len + length, device=inputs_embeds.device)[None].expand(
                batch, -1
            )
        hidden, all_hidden, all_attentions, all_cross = self.language_model(
            inputs_embeds,
            attention_mask,
            position_ids,
            cache,
            bool(use_cache),
            vision_states,
            cross_attention_mask,
            vision_spatial_shapes=memory.spatial_shapes if memory is not None else None,
            output_hidden_states=bool(output_hidden_states),
            output_attentions=bool(output_attentions),
            vision_states_projected=projected,
            **kwargs,
        )
        out = DeemModelOutputWithPast(
            last_hidden_state=hidden,
            hidden_states=all_hidden,
            attentions=all_attentions,
            image_embeds=image_embeds if enc is not None else None,
            image_features=tuple(enc.multiscale_features) if enc is not None else None,
            image_encoder_output=enc,
            cross_attentions=all_cross,
            **{CACHE_FIELD: cache if use_cache else None},
        )
        return out if return_dict else out.to_tuple()


class DeemForInterleavedGeneration(DeemPreTrainedModel, DeemGenerationMixin):
    """DEEM for interleaved image-text modelling = ``model`` ([`DeemModel`]) + ``lm_head`` ([`DeemTextHead`]) +
    ``image_decoder`` ([`DeemImageDecoder`]): text logits, and in training the next-image (NIP) and consistency
    (CSR) diffusion losses; ``generate`` writes text and draws images."""

    output_modalities = ("image", "text")

    def __init__(self, config: DeemConfig):
        super().__init__(config)
        self._hand_down_attn_implementation()
        self.model = DeemModel(config)
        self.lm_head = DeemTextHead(config)
        self.image_decoder = DeemImageDecoder(config)
        self.post_init()
        # saved checkpoints load through AutoModel (register_for_auto_class below) and the task class
        auto_map = dict(getattr(config, "auto_map", None) or {})
        auto_map.setdefault(
            "AutoModelForImageTextToText", f"{type(self).__module__.split('.')[-1]}.{type(self).__name__}"
        )
        config.auto_map = auto_map

    # ``push_to_hub`` writes README.md with this callable (save_directory, config, repo_id, num_parameters=...) when
    # set; the ``deem`` package sets it to ``deem.hub.write_model_card``. Copies of these files loaded with
    # trust_remote_code, without that package, keep transformers' generic card.
    model_card_writer = None

    def _upload_modified_files(self, working_dir, repo_id, *args, **kwargs):
        writer = type(self).model_card_writer
        if writer is None and __name__.startswith("deem."):  # the package's own class, however it was imported
            # through importlib: the copies of this file loaded with trust_remote_code must not require `deem`
            writer = importlib.import_module("deem.hub").write_model_card
        if writer is not None:
            writer(working_dir, self.config, repo_id, num_parameters=self.num_parameters())
        return super()._upload_modified_files(working_dir, repo_id, *args, **kwargs)

    # ------------------------------------------------------------------ parts

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head.base

    def set_output_embeddings(self, new_embeddings: nn.Linear):
        """Replace the base rows of the text head; the trainable new-token rows follow its vocabulary size."""
        self.lm_head.set_base(new_embeddings)

    def get_decoder(self):
        return self.model.get_decoder()

    def set_decoder(self, decoder):
        self.model.set_decoder(decoder)

    def get_image_features(self, pixel_values: torch.Tensor, image_masks: torch.Tensor | None = None, **kwargs):
        return self.model.get_image_features(pixel_values, image_masks, **kwargs)

    def resize_token_embeddings(
        self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None, mean_resizing: bool = True
    ):
        """Resize the input embeddings (transformers' resizing) and the DEEM text head: the base rows keep their
        weights, rows from ``original_vocab_size`` on stay in the trainable new-token head, added rows start as the
        original initialises new tokens (logit ``new_token_logit_init``); frozen / trainable flags are kept."""
        embeddings = self.get_input_embeddings()
        trainable = embeddings.weight.requires_grad
        resized = self._get_resized_embeddings(embeddings, new_num_tokens, pad_to_multiple_of, mean_resizing)
        resized.weight.requires_grad_(trainable)
        self.set_input_embeddings(resized)
        vocab = resized.weight.shape[0]
        self.lm_head.resize(vocab)
        self.config.text_config.vocab_size = vocab
        return resized

    # shortcuts to the parts, as they were before the split (read-only)
    image_encoder = property(lambda self: self.model.image_encoder)
    language_model = property(lambda self: self.model.language_model)
    soi_embedding = property(lambda self: self.model.soi_embedding)
    context_proj = property(lambda self: self.image_decoder.context_proj)
    decoder_perceiver = property(lambda self: self.image_decoder.decoder_perceiver)
    unet = property(lambda self: self.image_decoder.unet)
    vae = property(lambda self: self.image_decoder.vae)
    unet_side = property(lambda self: self.image_decoder.unet_side)
    null_condition = property(lambda self: self.image_decoder.null_condition)
    noise_scheduler = property(lambda self: self.image_decoder.noise_scheduler)

    @property
    def has_diffusion(self) -> bool:
        return self.image_decoder.has_diffusion

    def csr_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        return self.image_decoder.csr_timesteps(t)

    def project_vision_states(self, vision_states: torch.Tensor) -> torch.Tensor:
        return self.model.project_vision_states(vision_states)

    def project_image_memory(self, memory: DeemImageMemory) -> DeemImageMemory:
        return self.model.project_image_memory(memory)

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
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        loss_ntp_weight: float | None = None,
        loss_nip_weight: float | None = None,
        loss_csr_weight: float | None = None,
        return_loss: bool | None = None,
        csr_draws: DiffusionDraws | None = None,
        nip_draws: DiffusionDraws | None = None,
        generator: torch.Generator | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        num_items_in_batch: int | torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        image_memory: DeemImageMemory | None = None,
        cross_attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ):
        r"""
        Inputs as [`DeemModel.forward`], plus: pixel_values_decoder [N,3,D,D] in [0,1]: decoder views (for NIP /
        CSR). labels [B,L]: next-token targets (-100 ignored; derived from input_ids by the rules of §4.1 when
        absent). ``loss_*_weight``: per-call loss weights (a weight of 0 skips that branch). ``return_loss``:
        default True in training mode or when labels are given. ``csr_draws`` / ``nip_draws``: given random draws
        (see [`DiffusionDraws`]); ``generator`` for the rest. ``logits_to_keep``: logits of the last N positions
        only (0: all).
        """
        cfg = self.config
        return_dict = return_dict if return_dict is not None else cfg.return_dict
        if input_ids is not None:
            if labels is not None and (not isinstance(labels, torch.Tensor) or labels.shape != input_ids.shape):
                got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
                raise ValueError(f"labels shape {got} does not match input_ids shape {tuple(input_ids.shape)}")
            if labels is not None:
                check_token_ids(cfg, labels, "labels", allow_ignore=True)
        elif labels is not None:
            raise ValueError("labels need input_ids")
        for name, value in (
            ("loss_ntp_weight", loss_ntp_weight),
            ("loss_nip_weight", loss_nip_weight),
            ("loss_csr_weight", loss_csr_weight),
        ):
            if value is not None and not (isinstance(value, (int, float)) and value >= 0 and value == value):
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if return_loss is None:
            return_loss = self.training or labels is not None
        w_ntp = cfg.loss_ntp_weight if loss_ntp_weight is None else loss_ntp_weight
        w_nip = cfg.loss_nip_weight if loss_nip_weight is None else loss_nip_weight
        w_csr = cfg.loss_csr_weight if loss_csr_weight is None else loss_csr_weight
        check_decoder_views(cfg, pixel_values, pixel_values_decoder)
        want_diffusion = (
            return_loss and (w_nip > 0 or w_csr > 0) and pixel_values is not None and pixel_values.shape[0] > 0
        )
        if want_diffusion and (not self.has_diffusion or pixel_values_decoder is None):
            if self.training:
                missing = (
                    "diffusion weights (this model was built without diffusion_config)"
                    if not self.has_diffusion
                    else "pixel_values_decoder"
                )
                raise ValueError(
                    f"training with loss_nip_weight={w_nip} / loss_csr_weight={w_csr} needs {missing}; set those "
                    "weights to 0 to train text only"
                )
            want_diffusion = False
        if want_diffusion:  # given draws must fit these images before any work
            n = pixel_values.shape[0]
            latent = self.config.diffusion_config.latent_size
            latent_shape = (self.image_decoder.unet.config.in_channels, latent, latent)
            steps = self.noise_scheduler.config.num_train_timesteps
            for name, draws in (("csr_draws", csr_draws), ("nip_draws", nip_draws)):
                if draws is not None:
                    check_draws(draws, name, n, latent_shape, steps)

        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            image_masks=image_masks,
            num_images=num_images,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            inputs_embeds=inputs_embeds,
            image_memory=image_memory,
            cross_attention_mask=cross_attention_mask,
            past_key_values=past_key_values,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep  # 0: all
        logits = self.lm_head(hidden[:, keep])

        loss_ntp = loss_nip = loss_csr = None
        if return_loss and w_ntp > 0 and input_ids is not None:
            if labels is None:
                labels = default_labels(input_ids, attention_mask, cfg)
            labels = labels.masked_fill(input_ids == cfg.image_token_id, -100)
            loss_ntp = next_token_loss(logits, labels, num_items_in_batch)
        if want_diffusion:
            enc = outputs.image_encoder_output
            decoder = self.image_decoder
            posterior = decoder.encode_latents(pixel_values_decoder)
            csr = nip = None  # the branches' denoising inputs, drawn in this order (CSR, then NIP)
            if w_csr > 0:
                condition = self.model.image_encoder.diffusion_condition(enc.perceiver_output)
                csr = decoder.csr_branch(
                    condition, enc.region_features, posterior, csr_draws or DiffusionDraws(), generator
                )
            if w_nip > 0:
                runs = _image_runs(input_ids, cfg.image_token_id)
                image_rows, soi_pos, starts = _image_context_spans(
                    runs, input_ids, attention_mask, cfg.bos_token_id, getattr(cfg, "nip_context_start", "nearest_bos")
                )
                nip = decoder.nip_branch(
                    hidden,
                    enc.multiscale_features,
                    image_rows,
                    soi_pos,
                    starts,
                    posterior,
                    nip_draws or DiffusionDraws(),
                    generator,
                )
            # both branches in one UNet + side-network call
            maps = iter(decoder.denoise([b for b in (csr, nip) if b is not None]))
            if csr is not None:
                loss_csr = decoder.csr_reduce(next(maps), enc.latent_mask)
            if w_nip > 0:
                loss_nip = (
                    decoder.nip_reduce(next(maps), soi_pos.shape[0])
                    if nip is not None
                    else hidden.new_zeros((), dtype=torch.float32)
                )
        loss = None
        parts = [(w_ntp, loss_ntp), (w_nip, loss_nip), (w_csr, loss_csr)]
        if any(p is not None for _, p in parts):
            loss = sum(w * p for w, p in parts if p is not None)
        out = DeemOutput(
            loss=loss,
            loss_ntp=loss_ntp,
            loss_nip=loss_nip,
            loss_csr=loss_csr,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            last_hidden_state=hidden,
            image_embeds=outputs.image_embeds,
            image_features=outputs.image_features,
            cross_attentions=outputs.cross_attentions,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
        )
        return out if return_dict else out.to_tuple()

    # ------------------------------------------------------------------ the diffusion decoder as the encoder's eyes

    @torch.no_grad()
    def perception_consistency(
        self, pixel_values, pixel_values_decoder, image_masks=None, timesteps=(200, 350, 500, 650, 799), seed: int = 0
    ):
        """How well the image encoder's reading of each image lets the diffusion decoder reconstruct it: the CSR
        loss (§4.3) per image, averaged over fixed ``timesteps`` (after the CSR remapping) with noise seeded by
        ``seed``. Lower is better; a high value flags an input the encoder misperceives or that is out of
        distribution. ``pixel_values`` [N,3,S,S], ``pixel_values_decoder`` [N,3,D,D] in [0,1] -> [N]."""
        if not self.has_diffusion:
            raise ValueError("perception_consistency needs the diffusion decoder (this model has no diffusion weights)")
        self._check_eyes_inputs("perception_consistency", pixel_values, pixel_values_decoder, image_masks)
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = list(timesteps) if isinstance(timesteps, (list, tuple, range)) else timesteps
        if not isinstance(timesteps, list) or not timesteps:
            raise ValueError(f"timesteps must be a non-empty list of integers in [0, {steps}), got {timesteps!r}")
        for t in timesteps:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < steps:
                raise ValueError(f"timesteps must be integers in [0, {steps}), got {t!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        enc = self.model.image_encoder(pixel_values.to(self.dtype), image_masks)
        posterior = self.image_decoder.encode_latents(pixel_values_decoder)
        condition = self.model.image_encoder.diffusion_condition(enc.perceiver_output)
        generator = torch.Generator(device=posterior[0].device).manual_seed(seed)
        per_image = []
        for t in timesteps:
            n = condition.shape[0]
            draws = DiffusionDraws(
                latent_noise=torch.randn(posterior[0].shape, generator=generator, device=posterior[0].device),
                noise=torch.randn(posterior[0].shape, generator=generator, device=posterior[0].device),
                timesteps=torch.full((n,), int(t), device=posterior[0].device),
            )
            per_image.append(
                self.image_decoder.loss_csr(
                    condition,
                    enc.region_features,
                    enc.latent_mask,
                    posterior,
                    draws,
                    None,
                    timestep_map=lambda x: x,
                    per_image=True,
                )
            )
        return torch.stack(per_image).mean(0)

    def _check_eyes_inputs(self, caller: str, pixel_values, pixel_values_decoder, image_masks):
        """One encoder view and one decoder view per image, in [0, 1], at the decoder's resolution."""
        check_pixels(pixel_values, "pixel_values")
        if pixel_values.shape[0] == 0:
            raise ValueError(f"{caller} needs at least one image, got an empty pixel_values")
        if pixel_values_decoder is None:
            raise ValueError(f"{caller} needs pixel_values_decoder (one decoder view per image)")
        check_decoder_views(self.config, pixel_values, pixel_values_decoder)
        if image_masks is not None:
            check_pixels(image_masks, "image_masks", channels=1)

    @contextlib.contextmanager
    def test_time_adaptation(
        self,
        pixel_values,
        pixel_values_decoder,
        image_masks=None,
        steps: int = 5,
        lr: float = 4e-6,
        samples: int = 5,
        seed: int = 0,
    ):
        """Adapt the image encoder to the given images with ``steps`` AdamW steps on the CSR loss (the diffusion
        model as the encoder's eyes, §5.4: ``samples`` evenly spaced timesteps per image, seeded), use it inside
        the ``with`` block, and restore every encoder weight bitwise afterwards. UNet, VAE and side network are
        not changed (the original's disabled version also moved the diffusion model, B8)."""
        if not self.has_diffusion:
            raise ValueError("test-time adaptation needs the diffusion decoder (this model has no diffusion weights)")
        self._check_eyes_inputs("test_time_adaptation", pixel_values, pixel_values_decoder, image_masks)
        total = self.noise_scheduler.config.num_train_timesteps
        for name, value, low in (("steps", steps, 0), ("samples", samples, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if samples > total:
            raise ValueError(f"samples must be at most the scheduler's {total} timesteps, got {samples}")
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0 or lr != lr or lr == float("inf"):
            raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
        saved = {k: v.detach().clone() for k, v in self.model.image_encoder.state_dict().items()}
        flags = {n: p.requires_grad for n, p in self.named_parameters()}
        was_training = self.training
        try:
            self.requires_grad_(False)
            params = [p for p in self.model.image_encoder.parameters() if p.is_floating_point()]
            for p in params:
                p.requires_grad_(True)
            optimizer = torch.optim.AdamW(params, lr=lr)
            generator = torch.Generator(device=pixel_values.device).manual_seed(seed)
            spacing = self.noise_scheduler.config.num_train_timesteps // samples
            with torch.enable_grad():
                for _ in range(steps):
                    start = int(torch.randint(0, spacing, (1,), generator=generator))
                    enc = self.model.image_encoder(pixel_values.to(self.dtype), image_masks)
                    posterior = self.image_decoder.encode_latents(pixel_values_decoder)
                    condition = self.model.image_encoder.diffusion_condition(enc.perceiver_output)
                    losses = []
                    for k in range(samples):
                        n = pixel_values.shape[0]
                        draws = DiffusionDraws(
                            timesteps=torch.full((n,), start + k * spacing, device=pixel_values.device)
                        )
                        losses.append(
                            self.image_decoder.loss_csr(
                                condition, enc.region_features, enc.latent_mask, posterior, draws, generator
                            )
                        )
                    optimizer.zero_grad()
                    torch.stack(losses).mean().backward()
                    optimizer.step()
            self.requires_grad_(False)
            self.train(was_training)
            yield self
        finally:
            self.model.image_encoder.load_state_dict(saved)
            for n, p in self.named_parameters():
                p.requires_grad_(flags[n])
                p.grad = None
            self.train(was_training)

    # ------------------------------------------------------------------ training stages / accounting

    def component_modules(self) -> list[tuple[str, list]]:
        """(component, its modules / parameters), most specific first: a parameter belongs to the first component
        whose modules hold it (so the ConvNeXt trunk is claimed before the adapters around it, each
        cross-attention block before the LLM it sits in, ``lm_head.new_tokens`` before the base rows)."""
        model, head, decoder = self.model, self.lm_head, self.image_decoder
        encoder = model.image_encoder
        optional = lambda *items: [m for m in items if m is not None]  # noqa: E731
        return [
            ("image encoder", [encoder.backbone.trunk]),
            ("encoder adapters", [encoder.backbone]),
            ("encoder perceiver", [encoder]),
            (
                "cross-attention",
                [layer.cross_attn for layer in model.language_model.layers if layer.cross_attn is not None],
            ),
            ("LLM", [model.language_model]),
            ("text head (new tokens)", [head.new_tokens]),
            ("text head (base)", [head.base]),
            ("image decoder", optional(decoder.null_condition)),  # held by the decoder perceiver, trained as before
            ("decoder perceiver", [decoder.decoder_perceiver]),
            ("UNet side network", optional(decoder.unet_side)),
            ("UNet", optional(decoder.unet)),
            ("VAE", optional(decoder.vae)),
            ("image decoder", [decoder]),
            ("soi embedding", [model.soi_embedding]),
        ]

    def component_parameters(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Parameters grouped by component (each parameter in exactly one group, in ``COMPONENTS`` order)."""
        owner = {}
        for component, parts in self.component_modules():
            for part in parts:
                for param in [part] if isinstance(part, nn.Parameter) else part.parameters():
                    owner.setdefault(id(param), component)
        groups = {name: [] for name in COMPONENTS}
        for name, param in self.named_parameters():
            if id(param) not in owner:
                raise ValueError(f"parameter {name!r} belongs to no component")
            groups[owner[id(param)]].append((name, param))
        return groups

    def component_of(self, module: nn.Module) -> str:
        """The component a module's parameters belong to (its first parameter's)."""
        first = next(module.parameters(), None)
        if first is None:
            raise ValueError(f"{type(module).__name__} has no parameters")
        for component, params in self.component_parameters().items():
            if any(p is first for _, p in params):
                return component
        raise ValueError(f"{type(module).__name__} is not part of this model")

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
        rows.append(
            {
                "component": "total",
                "total": sum(r["total"] for r in rows),
                "trainable": sum(r["trainable"] for r in rows),
            }
        )
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
    1: {
        "image encoder",
        "encoder adapters",
        "encoder perceiver",
        "decoder perceiver",
        "image decoder",
        "cross-attention",
        "text head (new tokens)",
        "UNet side network",
        "soi embedding",
    },
    2: {
        "encoder adapters",
        "encoder perceiver",
        "decoder perceiver",
        "image decoder",
        "LLM",
        "cross-attention",
        "text head (new tokens)",
        "UNet side network",
        "soi embedding",
    },
    3: {"encoder adapters", "encoder perceiver", "LLM", "cross-attention", "text head (new tokens)", "soi embedding"},
}


DeemConfig.register_for_auto_class()
DeemForInterleavedGeneration.register_for_auto_class("AutoModel")  # + AutoModelForImageTextToText in auto_map

__all__ = [
    "DeemForInterleavedGeneration",
    "DeemGenerateOutput",
    "DeemDecoderPerceiver",
    "DeemImageDecoder",
    "DeemImageMemory",
    "DeemModel",
    "DeemModelOutputWithPast",
    "DeemOutput",
    "DeemPreTrainedModel",
    "DeemStreamer",
    "DiffusionDraws",
]
