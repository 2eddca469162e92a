"""Configuration of DEEM: a composite config whose defaults are the paper's 7B model.

Sub-configs: ``vision_config`` (CLIP-ConvNeXt image encoder + adapters), ``perceiver_config`` (encoder-side
resampler), ``text_config`` (LLaMA / Vicuna-7B), ``cross_attention_config`` (gated multi-scale deformable
cross-attention in the LLM), ``decoder_perceiver_config`` (resampler over the LLM context that conditions the
UNet) and ``diffusion_config`` (Stable Diffusion 2.1-base UNet / VAE / scheduler config dicts and the UNet's
multi-scale side network). ``diffusion_config=None`` builds a model without diffusion weights (stage 3).
"""

from transformers import AutoConfig, PretrainedConfig
from transformers.configuration_utils import SubConfigSpec

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Stable Diffusion 2.1-base, as in its public unet/vae/scheduler config files.
SD21_BASE_UNET = {
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "upcast_attention": False,
    "use_linear_projection": True,
}
SD21_BASE_VAE = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SD21_BASE_SCHEDULER = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "trained_betas": None,
}


class DeemVisionConfig(PretrainedConfig):
    r"""CLIP-ConvNeXt trunk (timm layout) + per-stage Linear adapters to ``embed_dim`` channels (§2.2.1).

    ``depths``/``dims``: ConvNeXt stages (convnext_base: 3,3,27,3 / 128,256,512,1024). ``embed_dim``: adapter
    output width (the model's image_embed_dim). ``image_size``: encoder resolution (256 in stage 1, 448 later).
    ``grid_size``: side of the fixed 2-D sin-cos table (+ cls row) added to the perceiver tokens and the maps.
    ``perceiver_level``: which of the four maps (0=c2 .. 3=c5) is flattened after the pooled token to form the
    perceiver input (c4). ``mask_align``: build the mask-pooling tokens of stage 3 (§2.4).
    """

    model_type = "deem_vision"
    base_config_key = "vision_config"

    backbone: str = "convnext_base"
    depths: list[int] | tuple[int, ...] = (3, 3, 27, 3)
    dims: list[int] | tuple[int, ...] = (128, 256, 512, 1024)
    ls_init_value: float = 1e-6
    drop_path_rate: float = 0.1
    embed_dim: int = 1024
    image_size: int = 256
    grid_size: int = 16
    layer_norm_eps: float = 1e-6
    perceiver_level: int = 2
    image_mean: list[float] | tuple[float, ...] = CLIP_MEAN
    image_std: list[float] | tuple[float, ...] = CLIP_STD
    mask_align: bool = False
    mask_size: int = 112


class DeemPerceiverConfig(PretrainedConfig):
    r"""Q-Former-style resampler: ``num_queries`` learned queries, self-attention in every layer, cross-attention
    to ``encoder_hidden_size``-wide inputs in layers ``i % cross_attention_frequency == 0`` (§2.3).
    ``qk_normalization``: per-head LayerNorm on queries and keys. Defaults: the encoder-side perceiver."""

    model_type = "deem_perceiver"
    base_config_key = "perceiver_config"

    num_queries: int = 77
    hidden_size: int = 768
    encoder_hidden_size: int = 1024
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    cross_attention_frequency: int = 2
    qk_normalization: bool = True
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    initializer_range: float = 0.02


class DeemDecoderPerceiverConfig(DeemPerceiverConfig):
    r"""The image decoder's resampler (§2.8): reads the LLM context (``encoder_hidden_size`` = the LLM width) into
    ``num_queries`` tokens of the UNet's cross-attention width. Its own sub-config, so it saves and loads on its
    own with these defaults (the 7B model's). ``null_condition``: whether it holds the learned null condition
    [1, Q, hidden_size] of classifier-free guidance (set by [`DeemConfig`]: exactly when there is a diffusion
    decoder)."""

    model_type = "deem_decoder_perceiver"
    base_config_key = "decoder_perceiver_config"

    num_queries: int = 77
    hidden_size: int = 1024
    encoder_hidden_size: int = 4096
    num_hidden_layers: int = 1
    num_attention_heads: int = 16
    intermediate_size: int = 3072
    cross_attention_frequency: int = 1
    qk_normalization: bool = False
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    null_condition: bool = True


class DeemCrossAttentionConfig(PretrainedConfig):
    r"""Gated multi-image multi-scale deformable cross-attention (MMFS) inserted in LLM layers
    ``i % frequency == 0`` (§2.5, §2.6). ``feature_levels``: which encoder maps feed it (c3, c4, c5);
    ``spatial_shapes``: their sides as the weights were trained with (``None``: derived from the encoder
    resolution); sampling displacements are ``offset * (spatial_shape / base_spatial_shape) / map_side``."""

    model_type = "deem_cross_attention"
    base_config_key = "cross_attention_config"

    frequency: int = 4
    num_heads: int = 16
    num_points: int = 8
    feature_levels: list[int] | tuple[int, ...] = (1, 2, 3)
    spatial_shapes: list[int] | tuple[int, ...] | None = None
    base_spatial_shape: int = 16
    max_num_images: int = 50
    offset_init_magnitude: float = 3.0


class DeemDiffusionConfig(PretrainedConfig):
    r"""Stable Diffusion parts as diffusers config dicts (``unet``, ``vae``, ``scheduler``; defaults SD-2.1-base)
    plus the UNet's multi-scale side network (MMFSNet, §2.9): one deformable cross-attention block per UNet skip
    sample and one after the mid block, reading the four encoder maps. ``side_spatial_shapes``: the map sides the
    side network's offsets are scaled for; ``side_base_spatial_shapes``: per block (the skips in order, then the
    mid block) the side its offsets are normalised by (``None``: each skip sample's own resolution, which is what
    the original's hard-coded list gives for SD-2.1 at 512 px); ``image_size``: decoder-view resolution."""

    model_type = "deem_diffusion"
    base_config_key = "diffusion_config"

    unet: dict | None = None
    vae: dict | None = None
    scheduler: dict | None = None
    image_size: int = 512
    side_attn_dim: int = 1024
    side_num_heads: int = 16
    side_num_points: int = 8
    side_spatial_shapes: list[int] | tuple[int, ...] = (64, 32, 16, 8)
    side_base_spatial_shapes: list[int] | tuple[int, ...] | None = None
    side_max_num_images: int = 10
    side_offset_init_magnitude: float = 1.0
    side_layer_norm_eps: float = 1e-6

    def __post_init__(self, **kwargs):
        self.unet = dict(SD21_BASE_UNET if self.unet is None else self.unet)
        self.vae = dict(SD21_BASE_VAE if self.vae is None else self.vae)
        self.scheduler = dict(SD21_BASE_SCHEDULER if self.scheduler is None else self.scheduler)
        super().__post_init__(**kwargs)

    @property
    def latent_size(self) -> int:
        return self.image_size // (2 ** (len(self.vae["block_out_channels"]) - 1))


VICUNA_7B = {
    "vocab_size": 32006,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 31999,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
}


class DeemConfig(PretrainedConfig):
    r"""Configuration of [`DeemForInterleavedGeneration`]. Every default is the paper's 7B stage-1 model.

    Token ids (§3.1): ``bos_token_id`` 1, ``eos_token_id`` 2, ``pad_token_id`` 31999, ``soi_token_id``
    (``<|startofimage|>``) 32000, ``image_token_id`` (the per-image placeholder) 32001, ``ref/box`` 32002-32005;
    the ids from ``original_vocab_size`` on get the trainable new-token head (§2.7). ``num_image_tokens``: LLM
    tokens per image (77). Loss weights: ``loss_ntp_weight`` 1, ``loss_nip_weight`` 5, ``loss_csr_weight`` 5;
    ``cfg_dropout_prob``: probability that an image's NIP condition is replaced by the learned null embedding.
    ``csr_timestep_scale``: CSR timesteps t are remapped to ``round((t - T/2) * scale + T/2)`` (§4.3).
    ``context_max_positions``: length of the 1-D sin-cos table added to the reversed LLM context (§2.8).
    ``nip_context_start``: where an image's decoder context starts, "nearest_bos" (the last ``<s>`` before its
    ``<|startofimage|>``: its own document in a packed row; default) or "row_start" (the row's first token, what the
    original computes without ``nearest_bos_idxs``: reproduces its NIP numbers on packed rows).
    """

    model_type = "deem"
    sub_configs_defaults = {
        "vision_config": DeemVisionConfig,
        "perceiver_config": DeemPerceiverConfig,
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama", init_kwargs=VICUNA_7B),
        "cross_attention_config": DeemCrossAttentionConfig,
        "decoder_perceiver_config": DeemDecoderPerceiverConfig,
        "diffusion_config": SubConfigSpec(config_class=DeemDiffusionConfig, optional=True),
    }

    vision_config: dict | PretrainedConfig | None = None
    perceiver_config: dict | PretrainedConfig | None = None
    text_config: dict | PretrainedConfig | None = None
    cross_attention_config: dict | PretrainedConfig | None = None
    decoder_perceiver_config: dict | PretrainedConfig | None = None
    diffusion_config: dict | PretrainedConfig | None = None
    use_diffusion: bool = True

    image_embed_dim: int = 1024
    num_image_tokens: int = 77
    original_vocab_size: int = 32000
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 31999
    soi_token_id: int = 32000
    image_token_id: int = 32001
    ref_start_token_id: int = 32002
    ref_end_token_id: int = 32003
    box_start_token_id: int = 32004
    box_end_token_id: int = 32005

    loss_ntp_weight: float = 1.0
    loss_nip_weight: float = 5.0
    loss_csr_weight: float = 5.0
    cfg_dropout_prob: float = 0.1
    csr_timestep_scale: float = 0.6
    context_max_positions: int = 2048
    nip_context_start: str = "nearest_bos"
    new_token_logit_init: float = -5.0
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if self.diffusion_config is None and self.use_diffusion:
            self.diffusion_config = {}
        if not self.use_diffusion:
            self.diffusion_config = None
        if self.nip_context_start not in ("nearest_bos", "row_start"):
            raise ValueError(
                f"DeemConfig: nip_context_start must be 'nearest_bos' or 'row_start', got {self.nip_context_start!r}"
            )
        super().__post_init__(**kwargs)
        self.decoder_perceiver_config.null_condition = self.diffusion_config is not None
        if self.cross_attention_config.spatial_shapes is None:
            side = self.vision_config.image_size
            self.cross_attention_config.spatial_shapes = [
                side // 2 ** (level + 2) for level in self.cross_attention_config.feature_levels
            ]
        self.validate_sizes()

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """As ``PretrainedConfig.from_dict``, but a config of another model type is refused (the library only warns,
        then builds a default-sized DEEM that matches nothing in the folder)."""
        found = config_dict.get("model_type") if isinstance(config_dict, dict) else None
        if found is not None and found != cls.model_type:
            raise ValueError(
                f"this folder holds a config with model_type {found!r}, which is not a DEEM model "
                f"(model_type {cls.model_type!r}); load it with its own class, or point to a DEEM checkpoint"
            )
        return super().from_dict(config_dict, **kwargs)

    @property
    def vocab_size(self) -> int:
        return self.text_config.vocab_size

    def validate_sizes(self):
        """Raise a ``ValueError`` naming the first pair of sizes that cannot work together."""
        checks = [
            (self.vision_config.embed_dim == self.image_embed_dim, "vision_config.embed_dim", "image_embed_dim"),
            (
                self.perceiver_config.num_queries == self.num_image_tokens,
                "perceiver_config.num_queries",
                "num_image_tokens",
            ),
            (
                self.perceiver_config.encoder_hidden_size == self.image_embed_dim,
                "perceiver_config.encoder_hidden_size",
                "image_embed_dim",
            ),
            (
                self.decoder_perceiver_config.encoder_hidden_size == self.text_config.hidden_size,
                "decoder_perceiver_config.encoder_hidden_size",
                "text_config.hidden_size",
            ),
            (self.text_config.vocab_size > self.box_end_token_id, "text_config.vocab_size", "the special token ids"),
            (
                self.text_config.vocab_size - self.original_vocab_size >= 0,
                "text_config.vocab_size",
                "original_vocab_size",
            ),
            (
                len(self.cross_attention_config.spatial_shapes) == len(self.cross_attention_config.feature_levels),
                "cross_attention_config.spatial_shapes",
                "cross_attention_config.feature_levels",
            ),
        ]
        if self.diffusion_config is not None:
            checks += [
                (
                    self.decoder_perceiver_config.hidden_size == self.diffusion_config.unet["cross_attention_dim"],
                    "decoder_perceiver_config.hidden_size",
                    "diffusion_config.unet['cross_attention_dim']",
                ),
            ]
        for ok, a, b in checks:
            if not ok:
                raise ValueError(f"DeemConfig: {a} does not fit {b}")
        for name in ("hidden_size",):
            if getattr(self.text_config, name) % self.cross_attention_config.num_heads:
                raise ValueError(
                    f"DeemConfig: text_config.{name} must be a multiple of cross_attention_config.num_heads"
                )
        if self.image_embed_dim % self.cross_attention_config.num_heads:
            raise ValueError("DeemConfig: image_embed_dim must be a multiple of cross_attention_config.num_heads")

    @classmethod
    def tiny(cls, **overrides) -> "DeemConfig":
        """A few-hundred-thousand-parameter model with every component, for tests and the CPU demo.

        Vocab 32006 with the real special ids would dominate the size, so the tiny model uses a 128-token vocab
        with the six DEEM tokens at 122..127 (``original_vocab_size`` 122, pad 121)."""
        kwargs = dict(
            vision_config=dict(
                depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), embed_dim=32, image_size=64, grid_size=4, drop_path_rate=0.0
            ),
            perceiver_config=dict(
                num_queries=4,
                hidden_size=32,
                encoder_hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=64,
                hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0,
            ),
            text_config=dict(
                vocab_size=128,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=4,
                num_attention_heads=4,
                num_key_value_heads=4,
                max_position_embeddings=256,
                rms_norm_eps=1e-5,
                bos_token_id=1,
                eos_token_id=2,
                pad_token_id=121,
                tie_word_embeddings=False,
            ),
            cross_attention_config=dict(
                frequency=2, num_heads=16, num_points=2, base_spatial_shape=4, max_num_images=8
            ),
            decoder_perceiver_config=dict(
                num_queries=4,
                hidden_size=32,
                encoder_hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=4,
                intermediate_size=64,
                cross_attention_frequency=1,
                qk_normalization=False,
                hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0,
            ),
            diffusion_config=dict(
                image_size=32,
                unet=dict(
                    SD21_BASE_UNET,
                    attention_head_dim=[2, 4],
                    block_out_channels=[16, 32],
                    cross_attention_dim=32,
                    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
                    layers_per_block=1,
                    norm_num_groups=8,
                    sample_size=8,
                ),
                vae=dict(
                    SD21_BASE_VAE,
                    block_out_channels=[8, 16, 16],
                    down_block_types=["DownEncoderBlock2D"] * 3,
                    up_block_types=["UpDecoderBlock2D"] * 3,
                    layers_per_block=1,
                    norm_num_groups=4,
                    sample_size=32,
                ),
                side_attn_dim=32,
                side_num_heads=4,
                side_num_points=2,
                side_spatial_shapes=(16, 8, 4, 2),
                side_max_num_images=4,
            ),
            image_embed_dim=32,
            num_image_tokens=4,
            original_vocab_size=122,
            pad_token_id=121,
            soi_token_id=122,
            image_token_id=123,
            ref_start_token_id=124,
            ref_end_token_id=125,
            box_start_token_id=126,
            box_end_token_id=127,
            context_max_positions=256,
        )
        kwargs.update(overrides)
        return cls(**kwargs)


__all__ = [
    "DeemConfig",
    "DeemVisionConfig",
    "DeemPerceiverConfig",
    "DeemDecoderPerceiverConfig",
    "DeemCrossAttentionConfig",
    "DeemDiffusionConfig",
]
