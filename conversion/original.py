"""Original DEEM (``uni_interleaved.MMInterleaved``) state dict -> ``DeemForInterleavedGeneration`` keys.

Every original key is either mapped, or dropped for a stated reason (the unused open_clip projection head,
the second copy of the shared null embedding, the all-zero MMFS ``ignore_token``s); anything else is an error
that lists the keys. Key layout: ``reference/original-deem.md`` §7.
"""

import re

import torch

from deem.modeling.modeling_deem import legacy_to_current_keys

from .original_keys_diffusion import (
    original_side_base_spatial_shapes,
    rename_cross_attention_key,
    rename_side_network_key,
)
from .original_keys_vision import rename_image_encoder_key, rename_perceiver_key

NULL_ALIAS = "visual_tokenizer.neg_prompt_embeds"


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message lists every offending key."""


def rename_original_key(key: str) -> str | None:
    """One original key -> our key, ``None`` when the key is intentionally dropped, ``KeyError`` if unknown."""
    if key == "soi_token":
        return "soi_embedding"
    if key.startswith("context_feat_proj."):
        return "context_proj." + key[len("context_feat_proj.") :]
    if key == "image_decoder.neg_prompt_embeds":
        return "null_condition"
    if key == NULL_ALIAS:
        return None  # same tensor as image_decoder.neg_prompt_embeds (B17); checked equal in convert_state_dict
    if key.startswith("image_decoder.perceiver_resampler."):
        return "decoder_perceiver." + rename_perceiver_key(key[len("image_decoder.perceiver_resampler.") :])
    if key.startswith("text_decoder.head."):
        return "lm_head.base." + key[len("text_decoder.head.") :]
    if key.startswith("text_decoder.head_new."):
        return "lm_head.new_tokens." + key[len("text_decoder.head_new.") :]
    m = re.match(r"^mm_decoder\.layers\.(\d+)\.llama_cross_attn\.(.+)$", key)
    if m:
        sub = rename_cross_attention_key(m.group(2))
        return None if sub is None else f"language_model.layers.{m.group(1)}.cross_attn.{sub}"
    if key.startswith("mm_decoder."):
        return "language_model." + key[len("mm_decoder.") :]
    for prefix, target in (("visual_tokenizer.encoder.unet.", "unet."), ("visual_tokenizer.encoder.vae.", "vae.")):
        if key.startswith(prefix):
            return target + key[len(prefix) :]
    if key.startswith("visual_tokenizer.encoder.mmfs_module."):
        sub = rename_side_network_key(key[len("visual_tokenizer.encoder.mmfs_module.") :])
        return None if sub is None else "unet_side." + sub
    if key.startswith("visual_tokenizer."):
        sub = rename_image_encoder_key(key[len("visual_tokenizer.") :])
        return None if sub is None else "image_encoder." + sub
    raise KeyError(key)


def convert_state_dict(
    original: dict[str, torch.Tensor], expected: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Rename every key; with ``expected`` (a model's state dict) also check that every model key is filled
    with a tensor of the right shape. Raises ``ConversionError`` listing unknown / missing / mismatched keys."""
    converted, unknown, bad_drops = {}, [], []
    for key, tensor in original.items():
        try:
            new = rename_original_key(key)
        except KeyError:
            unknown.append(key)
            continue
        if new is None:
            if key.endswith("ignore_token") and tensor.abs().sum() != 0:
                bad_drops.append(f"{key} (expected all zeros)")
            continue
        converted[new] = tensor
    converted = legacy_to_current_keys(converted)  # the key names above are the layout's before the model split
    if NULL_ALIAS in original and "image_decoder.neg_prompt_embeds" in original:
        if not torch.equal(original[NULL_ALIAS], original["image_decoder.neg_prompt_embeds"]):
            bad_drops.append(
                f"{NULL_ALIAS} differs from image_decoder.neg_prompt_embeds (they are one parameter in the original)"
            )
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} unmapped key(s): {', '.join(sorted(unknown))}")
    if bad_drops:
        problems.append("; ".join(bad_drops))
    if expected is not None:
        missing = sorted(set(expected) - set(converted))
        extra = sorted(set(converted) - set(expected))
        shapes = sorted(
            f"{k}: checkpoint {tuple(converted[k].shape)} vs model {tuple(expected[k].shape)}"
            for k in set(converted) & set(expected)
            if converted[k].shape != expected[k].shape
        )
        if missing:
            problems.append(f"{len(missing)} model key(s) missing from the checkpoint: {', '.join(missing)}")
        if extra:
            problems.append(f"{len(extra)} converted key(s) the model does not have: {', '.join(extra)}")
        if shapes:
            problems.append(f"{len(shapes)} shape mismatch(es): {'; '.join(shapes)}")
    if problems:
        raise ConversionError("cannot convert the original checkpoint: " + " | ".join(problems))
    return converted


CONVNEXT_BASE = {"depths": (3, 3, 27, 3), "dims": (128, 256, 512, 1024)}


def config_from_original(
    model_config: dict,
    llama_config: dict,
    convnext: dict | None = None,
    unet: dict | None = None,
    vae: dict | None = None,
    scheduler: dict | None = None,
    image_size: int = 256,
    side_spatial_shapes=None,
):
    """Build a ``DeemConfig`` from the original's ``model:`` YAML section and its component configs.

    ``model_config``: the ``model:`` section (``num_img_token``, ``image_embed_dim``, ``cross_attention_frequency``,
    ``spatial_shapes``, ``visual_tokenizer_config.perceiver_config``, ``image_decoder_config`` ...);
    ``llama_config``: the Vicuna ``config.json``; ``convnext``: trunk ``depths``/``dims`` (default convnext_base);
    ``unet`` / ``vae`` / ``scheduler``: the SD config dicts (``None``: no diffusion, as in stage-3 checkpoints);
    ``image_size``: the encoder resolution the weights are used at (256 stage 1, 448 stages 2-3; set by the
    original's data transform, not its model config).
    """
    from deem.modeling.configuration_deem import DeemConfig

    mc = model_config
    embed = mc.get("image_embed_dim", 1024)
    num_tokens = mc.get("num_img_token", 64)
    trunk = convnext or CONVNEXT_BASE
    vt = mc.get("visual_tokenizer_config", {})
    perc = dict(vt.get("perceiver_config", {}))
    perc.setdefault("encoder_hidden_size", embed)
    idc = mc.get("image_decoder_config")
    text = dict(llama_config)
    text["vocab_size"] = mc.get("txt_vocab_size", 32006)
    text["pad_token_id"] = 31999
    for key in ("architectures", "transformers_version", "torch_dtype", "_name_or_path"):
        text.pop(key, None)
    kwargs = dict(
        vision_config=dict(
            depths=tuple(trunk["depths"]),
            dims=tuple(trunk["dims"]),
            embed_dim=embed,
            image_size=image_size,
            mask_align=mc.get("mask_align", False),
        ),
        perceiver_config=perc,
        text_config=text,
        cross_attention_config=dict(
            frequency=mc.get("cross_attention_frequency", 4), spatial_shapes=list(mc.get("spatial_shapes", [32, 16, 8]))
        ),
        image_embed_dim=embed,
        num_image_tokens=num_tokens,
        original_vocab_size=llama_config.get("vocab_size", 32000),
        loss_ntp_weight=mc.get("loss_txt_weight", 1.0),
        loss_nip_weight=mc.get("loss_img_weight", 5.0),
        loss_csr_weight=mc.get("loss_sniffer_weight", 5.0),
    )
    if idc is not None and unet is not None:
        dp = dict(idc.get("perceiver_config", {}))
        dp.setdefault("num_queries", idc.get("seq_len", 77))
        dp.setdefault("hidden_size", idc.get("embed_dim", 1024))
        dp.setdefault("encoder_hidden_size", llama_config["hidden_size"])
        dp.setdefault("qk_normalization", False)
        kwargs["decoder_perceiver_config"] = dp
        kwargs["cfg_dropout_prob"] = idc.get("uncond_prob", 0.1)
        clean = lambda d: {k: v for k, v in d.items() if not k.startswith("_")}  # noqa: E731
        diffusion = dict(
            unet=clean(unet), vae=clean(vae), scheduler=clean(scheduler or {}), image_size=idc.get("image_size", 512)
        )
        if side_spatial_shapes is not None:
            diffusion["side_spatial_shapes"] = tuple(side_spatial_shapes)
        diffusion["side_base_spatial_shapes"] = original_side_base_spatial_shapes(unet, diffusion["image_size"])
        kwargs["diffusion_config"] = diffusion
    else:
        kwargs["use_diffusion"] = False
    return DeemConfig(**kwargs)
