"""Original (uni_interleaved) key names -> ours, for the MMFS modules (§7.2, §7.5 of the reference).

* ``visual_tokenizer.encoder.mmfs_module.<suffix>`` -> [`DeemUNetSideNetwork`] keys (``rename_side_network_key``).
* ``mm_decoder.layers.<i>.llama_cross_attn.<suffix>`` -> [`DeemGatedCrossAttention`] keys
  (``rename_cross_attention_key``).
* ``visual_tokenizer.encoder.unet.*`` / ``.vae.*`` keep their names: they are diffusers
  ``UNet2DConditionModel`` / ``AutoencoderKL`` state dicts as they are.

The original MMFS carries ``ignore_token``, a frozen all-zero parameter that only multiplies the null sink; it
is dropped (``None``) after ``check_ignore_tokens`` has confirmed it is all zeros.
"""

import re

import torch

SIDE_NETWORK_PREFIX = "visual_tokenizer.encoder.mmfs_module."
UNET_PREFIX = "visual_tokenizer.encoder.unet."
VAE_PREFIX = "visual_tokenizer.encoder.vae."
CROSS_ATTENTION_RE = re.compile(r"^mm_decoder\.layers\.(\d+)\.llama_cross_attn\.(.+)$")

_ATTN_PARAMS = (
    "sampling_offsets",
    "dynamic_offset_mask",
    "attention_weights",
    "value_proj",
    "output_proj",
    "query_relpos",
)


def _rename_attn(suffix: str) -> str | None:
    """``<param>.<weight|bias>`` inside an original MMFS module -> ours (same names), ``ignore_token`` -> None."""
    if suffix == "ignore_token":
        return None
    name = suffix.split(".", 1)[0]
    if name not in _ATTN_PARAMS:
        raise KeyError(f"unknown MMFS parameter {suffix!r}")
    return suffix


def rename_side_network_key(suffix: str) -> str | None:
    """Key under ``visual_tokenizer.encoder.mmfs_module.`` -> [`DeemUNetSideNetwork`] key, or None to drop.

    ``mmfs_down_blocks.{k}.X`` -> ``down_blocks.{k}.X``, ``mmfs_mid_block.X`` -> ``mid_block.X``; inside a block
    ``mmfs.*`` -> ``attn.*``; ``query_norm``, ``feat_norm``, ``pos_embed``, ``conv`` keep their names."""
    match = re.match(r"^(?:mmfs_down_blocks\.(\d+)|mmfs_mid_block)\.(.+)$", suffix)
    if match is None:
        raise KeyError(f"unknown side-network key {suffix!r}")
    block = f"down_blocks.{match.group(1)}" if match.group(1) is not None else "mid_block"
    rest = match.group(2)
    if rest.startswith("mmfs."):
        renamed = _rename_attn(rest[len("mmfs.") :])
        return None if renamed is None else f"{block}.attn.{renamed}"
    head = rest.split(".", 1)[0]
    if head not in ("query_norm", "feat_norm", "pos_embed", "conv"):
        raise KeyError(f"unknown side-network key {suffix!r}")
    return f"{block}.{rest}"


def rename_cross_attention_key(suffix: str) -> str | None:
    """Key under ``llama_cross_attn.`` -> [`DeemGatedCrossAttention`] key, or None to drop.

    ``gate`` -> ``gate``, ``norm1.weight`` -> ``norm_query.weight`` (hidden states), ``norm2.weight`` ->
    ``norm_value.weight`` (vision states), ``attn.X`` -> ``attn.X`` (``attn.ignore_token`` dropped)."""
    if suffix == "gate":
        return "gate"
    if suffix.startswith("norm1."):
        return "norm_query." + suffix[len("norm1.") :]
    if suffix.startswith("norm2."):
        return "norm_value." + suffix[len("norm2.") :]
    if suffix.startswith("attn."):
        renamed = _rename_attn(suffix[len("attn.") :])
        return None if renamed is None else "attn." + renamed
    raise KeyError(f"unknown cross-attention key {suffix!r}")


def check_ignore_tokens(state_dict: dict) -> list[str]:
    """Raise ``ValueError`` if any original ``*ignore_token`` tensor is not all zeros; return their names.

    Dropping them is exact only because they are zeros (they multiply the null sink of the softmax)."""
    names = [k for k in state_dict if k.endswith("ignore_token")]
    bad = [k for k in names if torch.count_nonzero(state_dict[k]) > 0]
    if bad:
        raise ValueError(f"ignore_token is not all zeros in {bad}; these checkpoints cannot be converted exactly")
    return names


def convert_side_network_state_dict(original: dict, prefix: str = SIDE_NETWORK_PREFIX) -> dict:
    """Original full state dict -> [`DeemUNetSideNetwork`] state dict (ignore_tokens checked and dropped)."""
    sub = {k[len(prefix) :]: v for k, v in original.items() if k.startswith(prefix)}
    check_ignore_tokens(sub)
    out = {}
    for key, value in sub.items():
        new = rename_side_network_key(key)
        if new is not None:
            out[new] = value
    return out


def convert_cross_attention_state_dicts(original: dict) -> dict[int, dict]:
    """Original full state dict -> {layer index: [`DeemGatedCrossAttention`] state dict}."""
    found: dict[int, dict] = {}
    for key, value in original.items():
        match = CROSS_ATTENTION_RE.match(key)
        if match is None:
            continue
        layer, suffix = int(match.group(1)), match.group(2)
        if suffix.endswith("ignore_token"):
            check_ignore_tokens({key: value})
        new = rename_cross_attention_key(suffix)
        if new is not None:
            found.setdefault(layer, {})[new] = value
    return found


def extract_prefixed(original: dict, prefix: str) -> dict:
    """Sub-state-dict under ``prefix`` with the prefix removed (e.g. ``UNET_PREFIX`` -> diffusers UNet keys)."""
    return {k[len(prefix) :]: v for k, v in original.items() if k.startswith(prefix)}


def original_side_base_spatial_shapes(unet_config: dict, image_size: int) -> list[int]:
    """``side_base_spatial_shapes`` that reproduce the original MMFSNet for any UNet (down blocks, then mid).

    The original hard-codes SD-2.1's skip layout (three skips per resolution, 64 -> 8) divided by
    ``downsample_factor = 512 // image_size``: skip k gets ``(64 // df) // 2 ** min(k // 3, 3)``, the mid block
    ``(64 // df) // 8``, whatever the UNet really is (and ``side_spatial_shapes`` stays ``(64, 32, 16, 8)``).
    For SD-2.1 at 512 px this equals the true skip resolutions; for smaller UNets it does not."""
    from ..modeling.mmfs import unet_skip_layout

    df = 512 // image_size
    top = 64 // df
    num_skips = len(unet_skip_layout(unet_config, 1)[0])
    return [top // 2 ** min(k // 3, 3) for k in range(num_skips)] + [max(top // 8, 1)]


__all__ = [
    "SIDE_NETWORK_PREFIX",
    "UNET_PREFIX",
    "VAE_PREFIX",
    "rename_side_network_key",
    "rename_cross_attention_key",
    "check_ignore_tokens",
    "convert_side_network_state_dict",
    "convert_cross_attention_state_dicts",
    "extract_prefixed",
    "original_side_base_spatial_shapes",
]
