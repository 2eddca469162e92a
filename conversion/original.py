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
        kinds = sorted(
            f"{k}: checkpoint {converted[k].dtype} vs model {expected[k].dtype}"
            for k in set(converted) & set(expected)
            if converted[k].is_floating_point() != expected[k].is_floating_point()
        )
        if kinds:
            problems.append(f"{len(kinds)} dtype mismatch(es) (integer vs floating point): {'; '.join(kinds)}")
    if problems:
        raise ConversionError("cannot convert the original checkpoint: " + " | ".join(problems))
    return converted


CONVNEXT_BASE = {"depths": (3, 3, 27, 3), "dims": (128, 256, 512, 1024)}
# the model-section entries config_from_original reads, with what each must be
_POSITIVE_INTS = ("num_img_token", "image_embed_dim", "cross_attention_frequency", "txt_vocab_size")
_WEIGHTS = ("loss_txt_weight", "loss_img_weight", "loss_sniffer_weight")
_LLAMA_SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_model_section(mc, where: str = "model") -> None:
    """Raise ``ConversionError`` naming the first entry of the original's ``model:`` section that
    `config_from_original` cannot use (wrong type or range)."""

    def bad(key, expected, value):
        raise ConversionError(f"{where}.{key} must be {expected}, got {value!r}")

    if not isinstance(mc, dict):
        raise ConversionError(f"{where} must be a mapping, got {type(mc).__name__} {mc!r:.60}")
    for key in _POSITIVE_INTS:
        if key in mc and not (_is_int(mc[key]) and mc[key] > 0):
            bad(key, "a positive integer", mc[key])
    for key in _WEIGHTS:
        if key in mc and not (_is_number(mc[key]) and mc[key] >= 0):
            bad(key, "a number >= 0", mc[key])
    if "mask_align" in mc and not isinstance(mc["mask_align"], bool):
        bad("mask_align", "true or false", mc["mask_align"])
    shapes = mc.get("spatial_shapes")
    if shapes is not None and not (isinstance(shapes, list) and shapes and all(_is_int(s) and s > 0 for s in shapes)):
        bad("spatial_shapes", "a list of positive integers", shapes)
    vt = mc.get("visual_tokenizer_config")
    if vt is not None:
        if not isinstance(vt, dict):
            bad("visual_tokenizer_config", "a mapping", vt)
        if vt.get("perceiver_config") is not None and not isinstance(vt["perceiver_config"], dict):
            bad("visual_tokenizer_config.perceiver_config", "a mapping", vt["perceiver_config"])
    idc = mc.get("image_decoder_config")
    if idc is not None:
        if not isinstance(idc, dict):
            bad("image_decoder_config", "a mapping", idc)
        if idc.get("perceiver_config") is not None and not isinstance(idc["perceiver_config"], dict):
            bad("image_decoder_config.perceiver_config", "a mapping", idc["perceiver_config"])
        for key in ("seq_len", "embed_dim"):
            if key in idc and not (_is_int(idc[key]) and idc[key] > 0):
                bad(f"image_decoder_config.{key}", "a positive integer", idc[key])
        size = idc.get("image_size", 512)
        if not (_is_int(size) and 0 < size <= 512 and 512 % size == 0):
            bad(
                "image_decoder_config.image_size",
                "a divisor of 512 (the original scales its side network by 512 / size)",
                size,
            )
        if "uncond_prob" in idc and not (_is_number(idc["uncond_prob"]) and 0 <= idc["uncond_prob"] <= 1):
            bad("image_decoder_config.uncond_prob", "a probability in [0, 1]", idc["uncond_prob"])


def check_llama_config(llama_config, where: str = "the LLaMA config.json") -> None:
    """Raise ``ConversionError`` unless ``llama_config`` is a LLaMA config dict with its sizes."""
    if not isinstance(llama_config, dict):
        raise ConversionError(f"{where}: expected a JSON object, got {type(llama_config).__name__}")
    model_type = llama_config.get("model_type", "llama")
    if model_type != "llama":
        raise ConversionError(f"{where}: DEEM's language model is a LLaMA; this config has model_type {model_type!r}")
    missing = [k for k in _LLAMA_SIZES if k not in llama_config]
    if missing:
        raise ConversionError(f"{where}: missing {', '.join(missing)}")
    wrong = [f"{k}={llama_config[k]!r}" for k in _LLAMA_SIZES if not (_is_int(llama_config[k]) and llama_config[k] > 0)]
    if wrong:
        raise ConversionError(f"{where}: sizes must be positive integers, got {', '.join(wrong)}")


def config_from_original(
    model_config: dict,
    llama_config: dict,
    convnext: dict | None = None,
    unet: dict | None = None,
    vae: dict | None = None,
    scheduler: dict | None = None,
    image_size: int | None = None,
    side_spatial_shapes=None,
):
    """Build a ``DeemConfig`` from the original's ``model:`` YAML section and its component configs.

    ``model_config``: the ``model:`` section (``num_img_token``, ``image_embed_dim``, ``cross_attention_frequency``,
    ``spatial_shapes``, ``visual_tokenizer_config.perceiver_config``, ``image_decoder_config`` ...);
    ``llama_config``: the Vicuna ``config.json``; ``convnext``: trunk ``depths``/``dims`` (default convnext_base);
    ``unet`` / ``vae`` / ``scheduler``: the SD config dicts (``None``: no diffusion, as in stage-3 checkpoints);
    ``image_size`` (required): the encoder resolution the weights are used at (256 stage 1, 448 stages 2-3; set by
    the original's data transform, not its model config). Raises ``ConversionError`` for entries of the wrong type
    and for sizes that do not make a valid ``DeemConfig``.
    """
    from deem.modeling.configuration_deem import DeemConfig

    check_model_section(model_config)
    check_llama_config(llama_config)
    if not (_is_int(image_size) and image_size >= 32):
        raise ConversionError(
            f"image_size must be the encoder resolution, at least 32 px (256 for stage-1 checkpoints, 448 "
            f"for stages 2-3), got {image_size!r}"
        )
    mc = model_config
    embed = mc.get("image_embed_dim", 1024)
    num_tokens = mc.get("num_img_token", 64)
    trunk = convnext or CONVNEXT_BASE
    vt = mc.get("visual_tokenizer_config") or {}
    perc = dict(vt.get("perceiver_config") or {})
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
            frequency=mc.get("cross_attention_frequency", 4),
            spatial_shapes=list(mc.get("spatial_shapes") or [32, 16, 8]),
        ),
        image_embed_dim=embed,
        num_image_tokens=num_tokens,
        original_vocab_size=llama_config.get("vocab_size", 32000),
        loss_ntp_weight=mc.get("loss_txt_weight", 1.0),
        loss_nip_weight=mc.get("loss_img_weight", 5.0),
        loss_csr_weight=mc.get("loss_sniffer_weight", 5.0),
    )
    if idc is not None and unet is not None:
        dp = dict(idc.get("perceiver_config") or {})
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
        try:
            diffusion["side_base_spatial_shapes"] = original_side_base_spatial_shapes(unet, diffusion["image_size"])
        except (KeyError, TypeError, ValueError) as err:
            raise ConversionError(
                f"the UNet config does not describe a usable UNet ({type(err).__name__}: {err})"
            ) from err
        kwargs["diffusion_config"] = diffusion
    else:
        kwargs["use_diffusion"] = False
    try:
        return DeemConfig(**kwargs)
    except (TypeError, ValueError, KeyError) as err:
        raise ConversionError(f"the original's sizes do not make a valid DeemConfig: {err}") from err


def encoder_spatial_shapes(model_config: dict) -> list[int]:
    """The map sides the original's LLM cross-attention reads (``spatial_shapes``, default [32, 16, 8])."""
    return list(model_config.get("spatial_shapes") or [32, 16, 8])


def nonfinite_keys(state: dict) -> list[str]:
    """Keys of the floating-point tensors of ``state`` that hold NaN or +-inf."""
    return [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
