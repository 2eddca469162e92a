"""DEEM image encoder (reference §2.2-§2.4): CLIP-ConvNeXt "sniffer" with per-stage adapters, fixed 2-D sin-cos
positions, the Q-Former-style perceiver resampler and the mask-aware region extractor.

Shapes use N images, E = ``vision_config.embed_dim`` (the model's image_embed_dim), Q perceiver queries, Hp the
perceiver width. Multi-scale maps c2..c5 have strides 4, 8, 16, 32.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm, LayerNorm2d
from timm.models.convnext import ConvNeXt
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from .configuration_deem import DeemConfig, DeemPerceiverConfig, DeemVisionConfig
from .pos_embed import resize_table, sincos_2d
from .sequence_deem import check_pixel_layout, check_pixels

__all__ = [
    "DeemConvNextBackbone",
    "DeemPerceiver",
    "DeemPerceiverBody",
    "DeemRegionExtractor",
    "DeemImageEncoder",
    "DeemImageEncoderOutput",
]

STRIDE = 32  # total downsampling of the ConvNeXt trunk; input sides must be at least this


# --------------------------------------------------------------------------------------------------------------------
# ConvNeXt backbone ("sniffer")
# --------------------------------------------------------------------------------------------------------------------


class DeemConvNextBackbone(nn.Module):
    """timm ConvNeXt trunk + Linear adapters to ``embed_dim`` (§2.2.1).

    ``trunk`` is a plain ``timm.models.convnext.ConvNeXt`` (``num_classes=0``) whose state-dict names equal the
    open_clip checkpoint's ``visual.trunk.*``. ``adapters[i]`` maps stage ``i``'s output channel-wise to ``embed_dim``
    (c2..c5); ``pooled_adapter`` maps the trunk's pooled vector (avg pool -> ``head.norm`` LayerNorm2d -> flatten).
    """

    def __init__(self, config: DeemVisionConfig):
        super().__init__()
        self.config = config
        dims = tuple(config.dims)
        if len(dims) != 4 or len(tuple(config.depths)) != 4:
            raise ValueError(f"DeemConvNextBackbone needs 4 stages, got depths={config.depths} dims={config.dims}")
        self.trunk = ConvNeXt(
            depths=tuple(config.depths),
            dims=dims,
            ls_init_value=config.ls_init_value,
            drop_path_rate=config.drop_path_rate,
            num_classes=0,
        )
        self.adapters = nn.ModuleList(nn.Linear(dim, config.embed_dim) for dim in dims)
        self.pooled_adapter = nn.Linear(dims[-1], config.embed_dim)

    def forward(self, pixel_values: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """[N,3,H,W] CLIP-normalised -> (4 maps [N,E,H/4,W/4] .. [N,E,H/32,W/32], pooled [N,E])."""
        x = self.trunk.stem(pixel_values)
        maps = []
        for stage, adapter in zip(self.trunk.stages, self.adapters):
            x = stage(x)
            maps.append(adapter(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
        pooled = self.pooled_adapter(self.trunk.forward_head(self.trunk.norm_pre(x)))
        return maps, pooled

    @torch.no_grad()
    def reset_parameters(self):
        """Fresh init as the original: timm ConvNeXt init for the trunk, PyTorch default Linear for the adapters."""
        for module in self.trunk.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, LayerNorm, LayerNorm2d)):
                init.ones_(module.weight)
                init.zeros_(module.bias)
            gamma = getattr(module, "gamma", None)
            if isinstance(gamma, nn.Parameter) and self.config.ls_init_value is not None:
                init.constant_(gamma, self.config.ls_init_value)
        for adapter in [*self.adapters, self.pooled_adapter]:
            adapter.reset_parameters()


# --------------------------------------------------------------------------------------------------------------------
# Perceiver resampler (Q-Former query path with optional qk-norm)
# --------------------------------------------------------------------------------------------------------------------


def _additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[N,S] 1 = keep -> [N,1,1,S] additive (0 / finfo.min), the BERT/Blip2 convention."""
    mask = mask.to(dtype)[:, None, None, :]
    return (1.0 - mask) * torch.finfo(dtype).min


class DeemPerceiverAttention(nn.Module):
    """Multi-head (self or cross) attention + ``dense`` -> dropout -> post-residual ``layer_norm``."""

    def __init__(self, config: DeemPerceiverConfig, is_cross_attention: bool = False):
        super().__init__()
        hidden = config.hidden_size
        if hidden % config.num_attention_heads:
            raise ValueError(
                f"perceiver hidden_size {hidden} is not a multiple of num_attention_heads {config.num_attention_heads}"
            )
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = hidden // self.num_heads
        kv_width = config.encoder_hidden_size if is_cross_attention else hidden
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_width, hidden)
        self.value = nn.Linear(kv_width, hidden)
        if config.qk_normalization:
            self.q_norm = nn.LayerNorm(self.head_dim, eps=config.layer_norm_eps)
            self.k_norm = nn.LayerNorm(self.head_dim, eps=config.layer_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.attention_dropout = config.attention_probs_dropout_prob
        self.dense = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.layer_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:2], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_value_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[N,Q,H] queries, optional [N,S,Ce] keys/values (else self-attention), additive [N,1,1,S] -> [N,Q,H]."""
        source = hidden_states if key_value_states is None else key_value_states
        query = self._heads(self.query(hidden_states))
        key = self._heads(self.key(source))
        value = self._heads(self.value(source))
        if self.q_norm is not None:
            query = self.q_norm(query)
            key = self.k_norm(key)
        dropout = self.attention_dropout if self.training else 0.0
        if self.config._attn_implementation == "eager":
            # bit-identical to the original (scores / sqrt(d) + mask -> softmax -> dropout)
            scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(self.head_dim)
            if attention_mask is not None:
                scores = scores + attention_mask
            probs = F.dropout(scores.softmax(dim=-1), p=dropout, training=self.training)
            context = torch.matmul(probs, value)
        else:
            context = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=1.0 / math.sqrt(self.head_dim)
            )
        context = context.transpose(1, 2).reshape(hidden_states.shape)
        return self.layer_norm(self.dropout(self.dense(context)) + hidden_states)


class DeemPerceiverMLP(nn.Module):
    """Query FFN: ``fc1`` -> act -> ``fc2`` -> dropout -> post-residual ``layer_norm``."""

    def __init__(self, config: DeemPerceiverConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[N,Q,H] -> [N,Q,H]."""
        return self.layer_norm(self.dropout(self.fc2(self.act(self.fc1(hidden_states)))) + hidden_states)


class DeemPerceiverLayer(GradientCheckpointingLayer):
    """Self-attention, optional cross-attention to the encoder states, query FFN."""

    def __init__(self, config: DeemPerceiverConfig, has_cross_attention: bool):
        super().__init__()
        self.self_attention = DeemPerceiverAttention(config)
        self.cross_attention = DeemPerceiverAttention(config, is_cross_attention=True) if has_cross_attention else None
        self.mlp = DeemPerceiverMLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[N,Q,H], [N,S,Ce], additive [N,1,1,S] or None -> [N,Q,H]."""
        hidden_states = self.self_attention(hidden_states)
        if self.cross_attention is not None:
            hidden_states = self.cross_attention(hidden_states, encoder_hidden_states, encoder_attention_mask)
        return self.mlp(hidden_states)


class DeemPerceiverBody:
    """The resampler itself (layers, init, forward), shared by the encoder's [`DeemPerceiver`] (a plain module)
    and the image decoder's ``DeemDecoderPerceiver`` (a model of its own that also saves and loads alone)."""

    def _build_perceiver(self, config: DeemPerceiverConfig):
        self.queries = nn.Parameter(torch.empty(1, config.num_queries, config.hidden_size))
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.layers = nn.ModuleList(
            DeemPerceiverLayer(config, has_cross_attention=i % config.cross_attention_frequency == 0)
            for i in range(config.num_hidden_layers)
        )

    @torch.no_grad()
    def reset_parameters(self):
        """Blip2 init: Linear normal(initializer_range) / zero bias, LayerNorm 1/0,
        queries normal(initializer_range)."""
        std = self.config.initializer_range
        init.normal_(self.queries, mean=0.0, std=std)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                init.normal_(module.weight, mean=0.0, std=std)
                init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                init.ones_(module.weight)
                init.zeros_(module.bias)

    def forward(
        self, encoder_hidden_states: torch.Tensor, encoder_attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[N,S,Ce] (+ optional [N,S] mask, 1 = attend) -> [N,Q,H]."""
        if not isinstance(encoder_hidden_states, torch.Tensor) or encoder_hidden_states.dim() != 3:
            got = tuple(encoder_hidden_states.shape) if isinstance(encoder_hidden_states, torch.Tensor) else None
            raise ValueError(f"encoder_hidden_states must be [N, S, C], got shape {got}")
        if encoder_hidden_states.shape[-1] != self.config.encoder_hidden_size:
            raise ValueError(
                f"encoder_hidden_states width {encoder_hidden_states.shape[-1]} does not match the perceiver's "
                f"encoder_hidden_size {self.config.encoder_hidden_size}"
            )
        batch = encoder_hidden_states.shape[0]
        hidden_states = self.queries.to(encoder_hidden_states.dtype).expand(batch, -1, -1)
        hidden_states = self.dropout(self.input_layernorm(hidden_states))
        additive = None
        if encoder_attention_mask is not None:
            if encoder_attention_mask.shape != encoder_hidden_states.shape[:2]:
                raise ValueError(
                    f"encoder_attention_mask must be [N, S] = {tuple(encoder_hidden_states.shape[:2])}, "
                    f"got {tuple(encoder_attention_mask.shape)}"
                )
            additive = _additive_mask(encoder_attention_mask, hidden_states.dtype)
        for layer in self.layers:
            hidden_states = layer(hidden_states, encoder_hidden_states, additive)
        return hidden_states


class DeemPerceiver(DeemPerceiverBody, nn.Module):
    """Q-Former-style resampler (§2.3): ``num_queries`` learned queries read ``encoder_hidden_states``.

    Same math as the query path of transformers 4.31 ``Blip2QFormerModel`` (post-LN BERT layers), with optional
    per-head LayerNorm on queries/keys (``qk_normalization``). Cross-attention in layers ``i % freq == 0``.
    Attention runs through torch SDPA (fp32 difference to the original ~4e-7) unless
    ``config._attn_implementation == "eager"`` (bit-identical to the original on CPU).
    """

    def __init__(self, config: DeemPerceiverConfig):
        nn.Module.__init__(self)
        self.config = config
        self._build_perceiver(config)
        self.reset_parameters()


# --------------------------------------------------------------------------------------------------------------------
# Region extractor (MaskPooling)
# --------------------------------------------------------------------------------------------------------------------


class DeemMaskMLP(nn.Module):
    """``layers``: Linear(in -> E) -> ReLU -> Linear(E -> E) -> ReLU -> Linear(E -> E)."""

    def __init__(self, in_features: int, width: int):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(in_features, width), nn.Linear(width, width), nn.Linear(width, width)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N,in] -> [N,E]."""
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class DeemRegionExtractor(nn.Module):
    """Mask-aware feature extraction (the original's MaskPooling, §2.4).

    Masks are [N,1,H,W] at encoder resolution; they are resized bilinearly (align_corners False) to the feature grid
    and binarised with ``> 0``, so a cell that only partly overlaps the region counts as inside. With
    ``config.mask_align`` it owns ``mask_linear`` (mask_size² -> E -> E -> E) and ``mask_feat_linear`` (E -> E) and
    ``forward`` gives 5 region tokens.
    """

    def __init__(self, config: DeemVisionConfig):
        super().__init__()
        self.mask_size = config.mask_size
        self.mask_align = config.mask_align
        if config.mask_align:
            self.mask_linear = DeemMaskMLP(config.mask_size**2, config.embed_dim)
            self.mask_feat_linear = nn.Linear(config.embed_dim, config.embed_dim)

    @staticmethod
    def binarize(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """[N,1,H,W] -> bool [N,1,h,w]: bilinear resize to ``size`` (if it differs), then ``> 0``."""
        mask = mask.float()
        if tuple(mask.shape[-2:]) != tuple(size):
            mask = F.interpolate(mask, size=size, mode="bilinear", align_corners=False)
        return mask > 0

    def mask_features(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [N,C,h,w] (or tokens [N,h*w,C], square grid) * binarised mask -> same shape as x."""
        if x.dim() == 4:
            return x * self.binarize(mask, x.shape[-2:]).to(x.dtype)
        if x.dim() == 3:
            side = math.isqrt(x.shape[1])
            if side * side != x.shape[1]:
                raise ValueError(f"token input needs a square grid, got {x.shape[1]} tokens")
            keep = self.binarize(mask, (side, side)).flatten(2).transpose(1, 2)  # [N, h*w, 1]
            return x * keep.to(x.dtype)
        raise ValueError(f"mask_features expects [N,C,h,w] or [N,L,C], got shape {tuple(x.shape)}")

    def pooled(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Masked average: [N,C,h,w] -> [N,C] = sum over the region / (region cells + 1e-8)."""
        keep = self.binarize(mask, x.shape[-2:]).to(x.dtype)
        total = (x * keep).sum(dim=(2, 3))
        count = keep.sum(dim=(2, 3))
        return total / (count + 1e-8)

    def forward(self, maps: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """4 maps [N,E,h,w], mask [N,1,H,W] -> [N,5,E] ordered (c2, c3, c4, c5, shape token)."""
        if not self.mask_align:
            raise RuntimeError("DeemRegionExtractor.forward needs vision_config.mask_align=True")
        tokens = [self.mask_feat_linear(self.pooled(feature, mask)) for feature in maps]
        shape = mask.float()
        if tuple(shape.shape[-2:]) != (self.mask_size, self.mask_size):
            shape = F.interpolate(shape, size=(self.mask_size, self.mask_size), mode="bilinear", align_corners=False)
        dtype = self.mask_feat_linear.weight.dtype
        tokens.append(self.mask_linear(shape.flatten(1).to(dtype)))
        return torch.stack(tokens, dim=1)

    @torch.no_grad()
    def reset_parameters(self):
        """PyTorch default Linear init (as the original)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.reset_parameters()


# --------------------------------------------------------------------------------------------------------------------
# Full image encoder (VisualTokenizer without the diffusion part)
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class DeemImageEncoderOutput(ModelOutput):
    """Output of [`DeemImageEncoder`].

    llm_embeds: [N,Q,H_text] image tokens for the LLM (``proj_to_llm`` of the perceiver output).
    perceiver_output: [N,Q,Hp] perceiver last hidden state (feed ``diffusion_condition`` for the CSR condition).
    multiscale_features: 4 x [N,E,h,w] adapter maps c2..c5 + 2-D sin-cos positions, not masked (LLM / NIP MMFS).
    region_features: 4 x [N,E,h,w] the same maps x binarised region mask (CSR MMFS side input); the very same tensor
        objects as ``multiscale_features`` when no mask was given.
    perceiver_input: [N,(5+)1+h4*w4,E] tokens the perceiver read (``post_ln`` output; mask tokens first with
        mask_align).
    latent_mask: bool [N,1,h_lat,w_lat] region mask at the diffusion latent resolution (CSR weighting); ``None`` when
        no mask was given or the model has no diffusion part.
    """

    llm_embeds: torch.Tensor | None = None
    perceiver_output: torch.Tensor | None = None
    multiscale_features: list[torch.Tensor] | None = None
    region_features: list[torch.Tensor] | None = None
    perceiver_input: torch.Tensor | None = None
    latent_mask: torch.Tensor | None = None


class DeemImageEncoder(nn.Module):
    """Image -> LLM image tokens + multi-scale maps (§2.2.3 steps 1, 3-11, 14; the SD-side CSR lives elsewhere).

    Input sides: the configured ``image_size`` or any other square size of at least 32 px (the maps are
    floor(side / 4), / 8, / 16, / 32, as the trunk's strided convolutions give them); the sin-cos table
    (``grid_size``² cells + cls row, a persistent buffer so converted checkpoints carry their exact table) is
    bicubically resized to each grid like the original's ``get_abs_pos``.

    ``proj_to_diffusion`` maps to the diffusion conditioning width: the UNet ``cross_attention_dim`` when the config
    has a diffusion part (equal to ``decoder_perceiver_config.hidden_size``, checked by the config), else
    ``decoder_perceiver_config.hidden_size``.

    With ``mask_align`` the 5 region tokens are pooled from the position-augmented maps (``multiscale_features``)
    and put before the cls token; no mask means the whole image (an all-ones mask), as in the original.
    """

    def __init__(self, config: DeemConfig):
        super().__init__()
        vision = config.vision_config
        self.config = config
        self.vision_config = vision
        embed_dim = vision.embed_dim
        self.register_buffer("clip_mean", torch.tensor(vision.image_mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("clip_std", torch.tensor(vision.image_std, dtype=torch.float32).view(1, 3, 1, 1))
        self.backbone = DeemConvNextBackbone(vision)
        self.register_buffer("pos_embed", sincos_2d(vision.grid_size, embed_dim, cls_row=True))
        self.pos_proj = nn.Linear(embed_dim, embed_dim)
        self.pos_ln = nn.LayerNorm(embed_dim, eps=vision.layer_norm_eps)
        self.post_ln = nn.LayerNorm(embed_dim, eps=vision.layer_norm_eps)
        self.region_extractor = DeemRegionExtractor(vision)
        self.perceiver = DeemPerceiver(config.perceiver_config)
        perceiver_hidden = config.perceiver_config.hidden_size
        if config.diffusion_config is not None:
            diffusion_width = config.diffusion_config.unet["cross_attention_dim"]
        else:
            diffusion_width = config.decoder_perceiver_config.hidden_size
        self.proj_to_llm = nn.Linear(perceiver_hidden, config.text_config.hidden_size)
        self.proj_to_diffusion = nn.Linear(perceiver_hidden, diffusion_width)
        self._init_projections()

    @torch.no_grad()
    def _init_projections(self):
        for proj in (self.proj_to_llm, self.proj_to_diffusion):
            init.normal_(proj.weight, mean=0.0, std=1e-3)
            init.zeros_(proj.bias)

    @torch.no_grad()
    def reset_parameters(self):
        """Re-run the original's init on the whole encoder (buffers recomputed from the config)."""
        vision = self.vision_config
        init.copy_(self.clip_mean, torch.tensor(vision.image_mean, dtype=torch.float32).view(1, 3, 1, 1))
        init.copy_(self.clip_std, torch.tensor(vision.image_std, dtype=torch.float32).view(1, 3, 1, 1))
        init.copy_(self.pos_embed, sincos_2d(vision.grid_size, vision.embed_dim, cls_row=True))
        self.backbone.reset_parameters()
        for module in (self.pos_proj, self.pos_ln, self.post_ln):
            module.reset_parameters()
        self.region_extractor.reset_parameters()
        self.perceiver.reset_parameters()
        self._init_projections()

    # ---------------------------------------------------------------- validation

    def _check_inputs(self, pixel_values, image_masks):
        tracing = torch.compiler.is_compiling()
        (check_pixel_layout if tracing else check_pixels)(pixel_values, "pixel_values")
        height, width = pixel_values.shape[-2:]
        if height != width or height < STRIDE:
            # any square side the trunk can reduce to a 1x1 last map (the original runs 48 px: maps 12, 6, 3, 1)
            raise ValueError(
                f"pixel_values must be square images of at least {STRIDE}x{STRIDE} px (this model was configured for "
                f"{self.vision_config.image_size}x{self.vision_config.image_size}), got {height}x{width}"
            )
        if image_masks is None:
            return
        if not isinstance(image_masks, torch.Tensor):
            raise TypeError(f"image_masks must be a torch.Tensor or None, got {type(image_masks).__name__}")
        expected = (pixel_values.shape[0], 1, height, width)
        if tuple(image_masks.shape) != expected:
            raise ValueError(f"image_masks must have shape [N, 1, H, W] = {expected}, got {tuple(image_masks.shape)}")
        (check_pixel_layout if tracing else check_pixels)(image_masks, "image_masks", channels=1)  # soft: mask > 0

    # ---------------------------------------------------------------- forward

    def _map_positions(self, height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
        """Grid part of the table resized to h*w cells -> [1,E,h,w]."""
        table = resize_table(self.pos_embed[1:], height * width)
        return table.view(height, width, -1).permute(2, 0, 1).unsqueeze(0).to(dtype)

    def forward(self, pixel_values: torch.Tensor, image_masks: torch.Tensor | None = None) -> DeemImageEncoderOutput:
        """pixel_values [N,3,H,W] in [0,1]; image_masks [N,1,H,W] (1 = region) or None (whole image)."""
        self._check_inputs(pixel_values, image_masks)
        dtype = self.pos_proj.weight.dtype
        pixel_values = pixel_values.to(dtype)
        pixel_values = (pixel_values - self.clip_mean.to(dtype)) / self.clip_std.to(dtype)

        maps, pooled = self.backbone(pixel_values)
        level = maps[self.vision_config.perceiver_level]
        tokens = torch.cat([pooled[:, None], level.flatten(2).transpose(1, 2)], dim=1)

        multiscale = [feature + self._map_positions(*feature.shape[-2:], feature.dtype) for feature in maps]

        tokens = self.pos_ln(self.pos_proj(tokens)) + resize_table(self.pos_embed, tokens.shape[1]).to(tokens.dtype)
        if image_masks is not None:
            tokens = torch.cat([tokens[:, :1], self.region_extractor.mask_features(tokens[:, 1:], image_masks)], dim=1)
        tokens = self.post_ln(tokens)
        if self.vision_config.mask_align:
            masks = image_masks
            if masks is None:
                masks = pixel_values.new_ones(pixel_values.shape[0], 1, *pixel_values.shape[-2:])
            tokens = torch.cat([self.region_extractor(multiscale, masks).to(tokens.dtype), tokens], dim=1)

        perceiver_output = self.perceiver(tokens)

        latent_mask = None
        if image_masks is None:
            region = multiscale
        else:
            region = [self.region_extractor.mask_features(feature, image_masks) for feature in multiscale]
            if self.config.diffusion_config is not None:
                side = self.config.diffusion_config.latent_size
                latent_mask = self.region_extractor.binarize(image_masks, (side, side))

        return DeemImageEncoderOutput(
            llm_embeds=self.proj_to_llm(perceiver_output),
            perceiver_output=perceiver_output,
            multiscale_features=multiscale,
            region_features=region,
            perceiver_input=tokens,
            latent_mask=latent_mask,
        )

    def diffusion_condition(self, perceiver_output: torch.Tensor) -> torch.Tensor:
        """[N,Q,Hp] -> [N,Q,D] UNet conditioning of the consistency (CSR) path (original ``proj_i``)."""
        return self.proj_to_diffusion(perceiver_output)
