"""Original (uni_interleaved) -> deem key renaming for the image encoder and the perceiver resamplers.

``rename_image_encoder_key`` takes a key with the ``visual_tokenizer.`` prefix removed and returns the matching
``DeemImageEncoder`` state-dict key (relative to the encoder), or ``None`` for keys that are dropped (the unused
open_clip projection head ``sniffer.vision_model.visual.head.mlp.*``). The SD part (``encoder.*``) and
``neg_prompt_embeds`` are not handled here and raise ``KeyError`` like any unknown key.

``rename_perceiver_key`` takes a key with the ``perceiver_resampler.`` prefix removed and returns the matching
``DeemPerceiver`` key; it serves both ``visual_tokenizer.perceiver_resampler.*`` and
``image_decoder.perceiver_resampler.*``.
"""

import re

__all__ = ["rename_image_encoder_key", "rename_perceiver_key", "DROPPED_IMAGE_ENCODER_PREFIXES"]

# original sub-module name inside a Q-Former layer -> ours
_PERCEIVER_LAYER_RULES = [
    (r"attention\.attention\.(query|key|value|q_norm|k_norm)\.", r"self_attention.\1."),
    (r"attention\.output\.dense\.", "self_attention.dense."),
    (r"attention\.output\.LayerNorm\.", "self_attention.layer_norm."),
    (r"crossattention\.attention\.(query|key|value|q_norm|k_norm)\.", r"cross_attention.\1."),
    (r"crossattention\.output\.dense\.", "cross_attention.dense."),
    (r"crossattention\.output\.LayerNorm\.", "cross_attention.layer_norm."),
    (r"intermediate_query\.dense\.", "mlp.fc1."),
    (r"output_query\.dense\.", "mlp.fc2."),
    (r"output_query\.LayerNorm\.", "mlp.layer_norm."),
]
_LAYER_RE = re.compile(r"^blip2qformer\.encoder\.layer\.(\d+)\.(.+)$")
_PARAM_RE = re.compile(r"^(weight|bias)$")

DROPPED_IMAGE_ENCODER_PREFIXES = ("sniffer.vision_model.visual.head.mlp.",)


def rename_perceiver_key(suffix: str) -> str:
    """``queries`` / ``blip2qformer.*`` (after ``perceiver_resampler.``) -> ``DeemPerceiver`` key."""
    if suffix == "queries":
        return "queries"
    if suffix.startswith("blip2qformer.layernorm."):
        param = suffix[len("blip2qformer.layernorm.") :]
        if _PARAM_RE.match(param):
            return f"input_layernorm.{param}"
    match = _LAYER_RE.match(suffix)
    if match:
        index, rest = match.groups()
        for pattern, replacement in _PERCEIVER_LAYER_RULES:
            if re.fullmatch(pattern + r"(weight|bias)", rest):
                return f"layers.{index}." + re.sub("^" + pattern, replacement, rest)
    raise KeyError(f"unknown original perceiver key: perceiver_resampler.{suffix}")


_SNIFFER = "sniffer.vision_model."
_DIRECT = {
    "clip_mean": "clip_mean",
    "clip_std": "clip_std",
    "pos_embed": "pos_embed",
}
_MODULES = {
    "pos_proj": "pos_proj",
    "pos_ln": "pos_ln",
    "post_ln": "post_ln",
    "proj_t": "proj_to_llm",
    "proj_i": "proj_to_diffusion",
    "feature_extractor.mask_feat_linear": "region_extractor.mask_feat_linear",
    "feature_extractor.mask_linear.layers.0": "region_extractor.mask_linear.layers.0",
    "feature_extractor.mask_linear.layers.1": "region_extractor.mask_linear.layers.1",
    "feature_extractor.mask_linear.layers.2": "region_extractor.mask_linear.layers.2",
    _SNIFFER + "adapter_c2": "backbone.adapters.0",
    _SNIFFER + "adapter_c3": "backbone.adapters.1",
    _SNIFFER + "adapter_c4": "backbone.adapters.2",
    _SNIFFER + "adapter_c5": "backbone.adapters.3",
    _SNIFFER + "adapter_cls": "backbone.pooled_adapter",
}


def rename_image_encoder_key(suffix: str) -> str | None:
    """Key after ``visual_tokenizer.`` -> ``DeemImageEncoder`` key, ``None`` to drop; ``KeyError`` if unknown."""
    if suffix in _DIRECT:
        return _DIRECT[suffix]
    if suffix.startswith(DROPPED_IMAGE_ENCODER_PREFIXES):
        return None
    if suffix.startswith("perceiver_resampler."):
        return "perceiver." + rename_perceiver_key(suffix[len("perceiver_resampler.") :])
    trunk = _SNIFFER + "visual.trunk."
    if suffix.startswith(trunk):
        # timm 1.0 keeps the 0.9 names (stem.*, stages.{i}.downsample.*, stages.{i}.blocks.{j}.{conv_dw,norm,
        # mlp.fc1,mlp.fc2,gamma}, head.norm.*), so the trunk maps one to one.
        return "backbone.trunk." + suffix[len(trunk) :]
    module, _, param = suffix.rpartition(".")
    if module in _MODULES and _PARAM_RE.match(param):
        return f"{_MODULES[module]}.{param}"
    raise KeyError(f"unknown original image-encoder key: visual_tokenizer.{suffix}")
