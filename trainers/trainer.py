"""Training DEEM with the Hugging Face ``Trainer`` (re-exports; one module per concern):

- `deem.trainers.presets`: stage presets (paper Table 12), `DeemTrainingArguments`, optimizer groups;
- `deem.trainers.deem_trainer`: `DeemTrainerMixin` (loss mix, named loss metrics, per-step diffusion generator,
  per-group optimizer) and `DeemTrainer`;
- `deem.trainers.checkpointing`: atomic ``checkpoint-N`` writes;
- `deem.trainers.sft`: `DeemSFTConfig` / `DeemSFTTrainer` on TRL, imported on first use;
- `deem.trainers.lora`: LoRA / QLoRA helpers;
- `deem.trainers.collators`: collators of tokenised rows / conversations and `SyntheticInterleavedDataset`.

Section numbers (§) refer to ``reference/original-deem.md``.
"""

from .checkpointing import AtomicCheckpointMixin
from .collators import (
    DeemConversationCollator,
    SyntheticCollator,
    SyntheticInterleavedDataset,
    collate_interleaved,
)
from .deem_trainer import DeemTrainer, DeemTrainerMixin, _target_count
from .lora import (
    LORA_TARGETS,
    QLORA_SKIP_MODULES,
    deem_lora_config,
    load_for_qlora,
    lora_target_modules,
    qlora_quantization_config,
)
from .presets import (
    OPTIMIZER_GROUP_PATTERNS,
    OPTIMIZER_GROUPS,
    STAGE_DEFAULTS,
    STAGE_LOSS_WEIGHTS,
    STAGE_LR_SCALE,
    STAGE_ZERO_DECAY_GROUPS,
    STAGES,
    DeemArgumentsMixin,
    DeemTrainingArguments,
    _seed_for,
    build_param_groups,
    deem_base_model,
    describe_param_groups,
    optimizer_group_of,
)


def __getattr__(name: str):
    if name in ("DeemSFTConfig", "DeemSFTTrainer"):  # importing trl costs seconds: only when asked for
        from . import sft

        return getattr(sft, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AtomicCheckpointMixin",
    "DeemArgumentsMixin",
    "DeemConversationCollator",
    "DeemSFTConfig",  # noqa: F822
    "DeemSFTTrainer",  # noqa: F822
    "DeemTrainer",
    "DeemTrainerMixin",
    "DeemTrainingArguments",
    "LORA_TARGETS",
    "QLORA_SKIP_MODULES",
    "OPTIMIZER_GROUPS",
    "OPTIMIZER_GROUP_PATTERNS",
    "STAGES",
    "STAGE_DEFAULTS",
    "STAGE_LOSS_WEIGHTS",
    "STAGE_LR_SCALE",
    "STAGE_ZERO_DECAY_GROUPS",
    "SyntheticCollator",
    "SyntheticInterleavedDataset",
    "_seed_for",
    "_target_count",
    "build_param_groups",
    "collate_interleaved",
    "deem_base_model",
    "deem_lora_config",
    "describe_param_groups",
    "load_for_qlora",
    "lora_target_modules",
    "optimizer_group_of",
    "qlora_quantization_config",
]
