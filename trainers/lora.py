"""LoRA / QLoRA helpers for DEEM (PEFT target groups, configs, the 4-bit loading recipe)."""

from __future__ import annotations

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

#: LoRA target groups (regexes over module names, relative to the DEEM model). ``llm`` = the LLaMA attention
#: projections (q/k/v/o), the usual choice; the others are optional extras.
LORA_TARGETS = {
    "llm": r"language_model\.layers\.\d+\.self_attn\.(?:q|k|v|o)_proj",
    "llm_mlp": r"language_model\.layers\.\d+\.mlp\.(?:gate|up|down)_proj",
    "cross_attn": r"language_model\.layers\.\d+\.cross_attn\.attn\.(?:value_proj|output_proj)",
    "encoder_perceiver": r"image_encoder\.perceiver\.layers\.\d+\.(?:self|cross)_attention\.(?:query|key|value|dense)",
    "decoder_perceiver": r"decoder_perceiver\.layers\.\d+\.(?:self|cross)_attention\.(?:query|key|value|dense)",
    "unet_side": r"unet_side\.(?:down_blocks\.\d+|mid_block)\.attn\.(?:value_proj|output_proj)",
}


def lora_target_modules(targets=("llm",)) -> str:
    """One regex (PEFT full-matches a string ``target_modules`` against module names) for the named groups of
    ``LORA_TARGETS``; a name that is not a group is used as a regex itself."""
    if isinstance(targets, str):
        targets = [targets]
    parts = [LORA_TARGETS.get(t, t) for t in targets]
    return r"(?:.*\.)?(?:" + "|".join(f"(?:{p})" for p in parts) + ")"


def deem_lora_config(targets=("llm",), r: int = 16, lora_alpha: int = 32, lora_dropout: float = 0.05, **kwargs):
    """``peft.LoraConfig`` for DEEM: LoRA on ``targets`` (groups of ``LORA_TARGETS``; default the LLM's q/k/v/o).

    Only adapter weights (and ``modules_to_save``) train. To train whole DEEM modules next to the adapters, name
    them in ``modules_to_save`` (module-name suffixes), e.g. ``["new_tokens"]`` for the new-token text head rows;
    they are saved with the adapter."""
    from peft import LoraConfig

    return LoraConfig(
        target_modules=lora_target_modules(targets), r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, **kwargs
    )


#: Modules kept in full precision by the QLoRA recipe: everything except the LLaMA decoder's own Linear layers.
QLORA_SKIP_MODULES = [
    "image_encoder",
    "lm_head",
    "soi_embedding",
    "context_proj",
    "decoder_perceiver",
    "unet",
    "vae",
    "unet_side",
    r"language_model\.layers\.\d+\.cross_attn",
]


def qlora_quantization_config(compute_dtype=torch.bfloat16):
    """``BitsAndBytesConfig`` of the QLoRA recipe: the LLM's Linear layers in 4-bit NF4 (double quantisation,
    ``compute_dtype`` matmuls); the image encoder, cross-attention, text head, diffusion side in full precision.

    Recipe (needs CUDA and ``bitsandbytes``)::

        model = DeemForInterleavedGeneration.from_pretrained(path, quantization_config=qlora_quantization_config(),
                                                             dtype=torch.bfloat16, device_map={"": 0})
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
        model = peft.get_peft_model(model, deem_lora_config(["llm"], r=64, lora_alpha=16))
        DeemTrainer(model, DeemTrainingArguments(stage=2, bf16=True, learning_rate=2e-4, optim="paged_adamw_8bit",
                                                 gradient_checkpointing=True, ...), ...).train()
    """
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=list(QLORA_SKIP_MODULES),
    )


def load_for_qlora(path, compute_dtype=torch.bfloat16, gradient_checkpointing: bool = True, **kwargs):
    """Load a DEEM checkpoint for QLoRA (see [`qlora_quantization_config`]): 4-bit LLM on GPU 0, prepared for
    k-bit training (norms / non-quantised weights in fp32, input gradients on). Raises without CUDA."""
    if not torch.cuda.is_available():
        raise RuntimeError("QLoRA needs a CUDA GPU (bitsandbytes 4-bit kernels)")
    from peft import prepare_model_for_kbit_training

    from deem import DeemForInterleavedGeneration

    model = DeemForInterleavedGeneration.from_pretrained(
        path,
        quantization_config=qlora_quantization_config(compute_dtype),
        dtype=compute_dtype,
        device_map={"": 0},
        **kwargs,
    )
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
