"""DEEM training: the HF ``Trainer`` / TRL ``SFTTrainer`` for the paper's three stages (``deem.trainers``).

``DeemTrainer`` + ``DeemTrainingArguments`` (stage presets, loss mix, optimizer groups, per-component loss logging,
atomic checkpoints), ``DeemSFTTrainer`` + ``DeemSFTConfig`` (TRL, conversation data; imported on first use),
LoRA / QLoRA helpers, and the CLI ``python -m deem.trainers --stage N --config cfg.yaml``. Data readers and the
collator are in ``deem.trainers.data``.
"""

from .trainer import (
    LORA_TARGETS,
    OPTIMIZER_GROUPS,
    STAGE_DEFAULTS,
    STAGE_LOSS_WEIGHTS,
    STAGE_LR_SCALE,
    DeemConversationCollator,
    DeemTrainer,
    DeemTrainerMixin,
    DeemTrainingArguments,
    SyntheticCollator,
    SyntheticInterleavedDataset,
    build_param_groups,
    collate_interleaved,
    deem_lora_config,
    describe_param_groups,
    load_for_qlora,
    lora_target_modules,
    optimizer_group_of,
    qlora_quantization_config,
)


def __getattr__(name: str):
    if name in ("DeemSFTConfig", "DeemSFTTrainer"):  # importing trl costs seconds: only when asked for
        from . import sft

        return getattr(sft, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "LORA_TARGETS",
    "OPTIMIZER_GROUPS",
    "STAGE_DEFAULTS",
    "STAGE_LOSS_WEIGHTS",
    "STAGE_LR_SCALE",
    "DeemConversationCollator",
    "DeemSFTConfig",
    "DeemSFTTrainer",
    "DeemTrainer",
    "DeemTrainerMixin",
    "DeemTrainingArguments",
    "SyntheticCollator",
    "SyntheticInterleavedDataset",
    "build_param_groups",
    "collate_interleaved",
    "deem_lora_config",
    "describe_param_groups",
    "load_for_qlora",
    "lora_target_modules",
    "optimizer_group_of",
    "qlora_quantization_config",
]
