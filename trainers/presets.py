"""Stage presets (paper Table 12, reference §1.4 / §4.6), DEEM training arguments and optimizer groups."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import numpy as np
import torch.nn as nn
from transformers import TrainingArguments
from transformers.utils import logging

logger = logging.get_logger(__name__)

STAGES = (1, 2, 3)

# ----------------------------------------------------------------------------------------------------------- defaults

#: Paper Table 12 / reference §1.4: default-group learning rate, AdamW (beta2, eps), per stage.
STAGE_DEFAULTS = {
    1: {"learning_rate": 1e-4, "adam_beta1": 0.9, "adam_beta2": 0.995, "adam_epsilon": 1e-6},
    2: {"learning_rate": 1e-5, "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8},
    3: {"learning_rate": 1e-5, "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8},
}

#: Stage loss formulas: stage 1 ``NTP + λ·NIP + λ·CSR``, stage 2 ``NTP + λ·CSR``, stage 3 ``NTP`` (λ = 5).
#: A weight of 0 makes the model skip that branch entirely.
STAGE_LOSS_WEIGHTS = {
    1: {"ntp": 1.0, "nip": 5.0, "csr": 5.0},
    2: {"ntp": 1.0, "nip": 0.0, "csr": 5.0},
    3: {"ntp": 1.0, "nip": 0.0, "csr": 0.0},
}

#: Optimizer groups, first match wins (regex searched in the parameter name, so PEFT / DDP / FSDP prefixes such as
#: ``base_model.model.`` or ``_fsdp_wrapped_module.`` do not matter). Unmatched parameters are in ``default``.
OPTIMIZER_GROUP_PATTERNS = (
    ("lora", r"(?:^|\.)lora_(?:A|B|embedding_A|embedding_B|magnitude_vector)(?:\.|$)"),
    ("cross_attn_gate", r"(?:^|\.)cross_attn\.gate$"),
    ("sampling_offsets", r"(?:^|\.)sampling_offsets\."),
    # the LLM cross-attention's output bias: added (x tanh(gate)) to every token of a batch that holds images, also to
    # tokens that see none, and absent when a batch has no image (text-only generation); at the stage rates of
    # ``cross_attn``, its own group so that a recipe can hold it at 0 (the built-in world's stage 1 does)
    ("cross_attn_output_bias", r"(?:^|\.)language_model\.layers\.\d+\.cross_attn\.attn\.output_proj\.bias$"),
    ("cross_attn", r"(?:^|\.)language_model\.layers\.\d+\.cross_attn\."),
    ("unet", r"(?:^|\.)unet\."),
    # what turns the LLM context into the UNet condition for L_NIP (the image decoder's perceiver, with its null
    # condition, and the context projection): in the default group's rates unless a recipe overrides it
    ("nip_condition", r"(?:^|\.)image_decoder\.(?:decoder_perceiver|context_proj)\."),
    ("image_encoder_trunk", r"(?:^|\.)image_encoder\.backbone\.trunk\."),
    ("llm", r"(?:^|\.)language_model\."),
    # the output rows of the added tokens (<|startofimage|>, ...; the original's head_new, in its default group)
    ("new_tokens", r"(?:^|\.)lm_head\.new_tokens\."),
)
OPTIMIZER_GROUPS = ("default",) + tuple(name for name, _ in OPTIMIZER_GROUP_PATTERNS)

#: Learning rate of each group as a multiple of ``learning_rate`` (the default group's). With the stage-default
#: ``learning_rate`` these are exactly §4.6 / Table 12: stage 1 (1e-4): gates 1e-4, sampling offsets 1e-5,
#: cross-attention 1e-4, UNet 1e-5, ConvNeXt trunk 2e-5; stages 2-3 (1e-5): the LLM 1e-6 (the paper's value; the
#: original's ``mmdecoder`` pattern matched nothing, bug B2), gates / offsets / cross-attention / trunk 5e-6,
#: UNet 1e-5. LoRA adapters and the added tokens' output rows (``new_tokens``, the original's ``head_new`` in its
#: default group) train at ``learning_rate``.
STAGE_LR_SCALE = {
    1: {
        "default": 1.0,
        "lora": 1.0,
        "cross_attn_gate": 1.0,
        "sampling_offsets": 0.1,
        "cross_attn": 1.0,
        "unet": 0.1,
        "image_encoder_trunk": 0.2,
        "llm": 1.0,
        "new_tokens": 1.0,
    },
    2: {
        "default": 1.0,
        "lora": 1.0,
        "cross_attn_gate": 0.5,
        "sampling_offsets": 0.5,
        "cross_attn": 0.5,
        "unet": 1.0,
        "image_encoder_trunk": 0.5,
        "llm": 0.1,
        "new_tokens": 1.0,
    },
}
STAGE_LR_SCALE[3] = dict(STAGE_LR_SCALE[2])
# derived groups, unless a recipe overrides them: the output bias at the cross-attention's rates, the NIP condition at
# the default group's
for _scales in STAGE_LR_SCALE.values():
    _scales["cross_attn_output_bias"] = _scales["cross_attn"]
    _scales["nip_condition"] = _scales["default"]

#: Groups whose weight decay is 0 whatever ``weight_decay`` is (§4.6: gates and offsets in every stage; the SFT
#: configs' LLM group).
STAGE_ZERO_DECAY_GROUPS = {
    1: {"cross_attn_gate", "sampling_offsets"},
    2: {"cross_attn_gate", "sampling_offsets", "llm"},
}
STAGE_ZERO_DECAY_GROUPS[3] = set(STAGE_ZERO_DECAY_GROUPS[2])

# parameters that never get weight decay, in any group: biases, norms, embedding tables and learned query/vector
# parameters (the soi vector, the null condition, perceiver queries) and the cross-attention gates
_NO_DECAY_NAMES = re.compile(r"(?:^|\.)(?:soi_embedding|null_condition|queries|gate)$")


def _is_norm(module: nn.Module) -> bool:
    return (
        isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase))
        or "norm" in type(module).__name__.lower()
    )


def _no_weight_decay(module: nn.Module, local_name: str, full_name: str) -> bool:
    return (
        local_name.endswith("bias")
        or _is_norm(module)
        or isinstance(module, nn.Embedding)
        or bool(_NO_DECAY_NAMES.search(full_name))
    )


def optimizer_group_of(name: str) -> str:
    """Name of the optimizer group of parameter ``name`` (see ``OPTIMIZER_GROUP_PATTERNS``)."""
    for group, pattern in OPTIMIZER_GROUP_PATTERNS:
        if re.search(pattern, name):
            return group
    return "default"


# ---------------------------------------------------------------------------------------------------------- arguments


@dataclass
class DeemArgumentsMixin:
    """DEEM fields shared by [`DeemTrainingArguments`] and [`DeemSFTConfig`]. ``None`` = the stage's default."""

    stage: int = field(
        default=1, metadata={"help": "Training stage: 1 alignment pre-training, 2 image-text SFT, 3 mask-text SFT."}
    )
    loss_ntp_weight: float = field(default=1.0, metadata={"help": "Weight of the next-token loss."})
    loss_nip_weight: float | None = field(
        default=None, metadata={"help": "λ of the next-image loss (default 5 in stage 1, 0 = off in stages 2-3)."}
    )
    loss_csr_weight: float | None = field(
        default=None, metadata={"help": "λ of the consistency loss (default 5 in stages 1-2, 0 = off in stage 3)."}
    )
    learning_rate: float | None = field(
        default=None,
        metadata={"help": "Default-group learning rate (1e-4 in stage 1, 1e-5 later); other groups scale with it."},
    )
    adam_beta2: float | None = field(default=None, metadata={"help": "AdamW beta2 (0.995 in stage 1, 0.999 later)."})
    adam_epsilon: float | None = field(default=None, metadata={"help": "AdamW epsilon (1e-6 in stage 1, 1e-8 later)."})
    weight_decay: float = field(
        default=0.05, metadata={"help": "AdamW weight decay (never on biases, norms, embeddings, gates)."}
    )
    lr_scheduler_type: str = field(
        default="cosine", metadata={"help": "Learning-rate schedule (cosine in every stage)."}
    )
    param_group_lr: dict | str | None = field(
        default=None,
        metadata={
            "help": "Absolute learning rates for optimizer groups, overriding the stage scales, "
            "e.g. '{\"llm\": 2e-6}'. Groups: " + ", ".join(OPTIMIZER_GROUPS)
        },
    )
    freeze_by_stage: bool = field(
        default=True,
        metadata={"help": "Call model.set_training_stage(stage) (not for PEFT models, whose adapters decide)."},
    )
    seed_diffusion_per_step: bool = field(
        default=True,
        metadata={"help": "Pass the model a generator seeded from (seed, micro-batch index) for the diffusion draws."},
    )
    atomic_checkpoints: bool = field(
        default=True, metadata={"help": "Write checkpoint-N in a staging folder and rename it when complete."}
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep every column: DEEM collators read raw columns."}
    )
    ddp_find_unused_parameters: bool | None = field(
        default=None, metadata={"help": "Default True: NIP / CSR branches can skip per batch."}
    )

    def _resolve_deem_defaults(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage must be 1, 2 or 3, got {self.stage!r}")
        defaults = STAGE_DEFAULTS[self.stage]
        for key in ("learning_rate", "adam_beta2", "adam_epsilon"):
            if getattr(self, key) is None:
                setattr(self, key, defaults[key])
        if self.loss_nip_weight is None:
            self.loss_nip_weight = STAGE_LOSS_WEIGHTS[self.stage]["nip"]
        if self.loss_csr_weight is None:
            self.loss_csr_weight = STAGE_LOSS_WEIGHTS[self.stage]["csr"]
        if isinstance(self.param_group_lr, str):
            self.param_group_lr = json.loads(self.param_group_lr) if self.param_group_lr.strip() else None
        unknown = set(self.param_group_lr or {}) - set(OPTIMIZER_GROUPS)
        if unknown:
            raise ValueError(
                f"param_group_lr names unknown optimizer groups {sorted(unknown)}; groups are {list(OPTIMIZER_GROUPS)}"
            )
        if self.ddp_find_unused_parameters is None:
            self.ddp_find_unused_parameters = True

    @property
    def loss_weights(self) -> dict[str, float]:
        """The per-call loss weights given to the model: ``{"ntp", "nip", "csr"}``."""
        return {
            "ntp": float(self.loss_ntp_weight),
            "nip": float(self.loss_nip_weight),
            "csr": float(self.loss_csr_weight),
        }

    def group_learning_rates(self) -> dict[str, float]:
        """Absolute learning rate of every optimizer group for this stage (overrides applied)."""
        rates = {g: self.learning_rate * s for g, s in STAGE_LR_SCALE[self.stage].items()}
        rates.update({k: float(v) for k, v in (self.param_group_lr or {}).items()})
        return rates


@dataclass
class DeemTrainingArguments(DeemArgumentsMixin, TrainingArguments):
    """``TrainingArguments`` for DEEM. Unset ``learning_rate`` / ``adam_beta2`` / ``adam_epsilon`` / loss weights
    take the defaults of ``stage`` (paper Table 12): stage 1 lr 1e-4, betas (0.9, 0.995), eps 1e-6, loss NTP +
    5·NIP + 5·CSR; stage 2 lr 1e-5, (0.9, 0.999), 1e-8, NTP + 5·CSR; stage 3 as 2 with NTP only. Weight decay 0.05
    and a cosine schedule by default."""

    def __post_init__(self):
        self._resolve_deem_defaults()
        super().__post_init__()


# ----------------------------------------------------------------------------------------------------------- helpers


def deem_base_model(model: nn.Module) -> nn.Module:
    """The [`DeemForInterleavedGeneration`] inside DDP / PEFT / compile wrappers."""
    seen = 0
    while seen < 8:
        seen += 1
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()
        else:
            break
    return model


def _is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return isinstance(model, PeftModel)


def build_param_groups(model: nn.Module, args: DeemArgumentsMixin) -> list[dict]:
    """AdamW parameter groups of the trainable parameters of ``model`` for ``args.stage``.

    Each group of ``OPTIMIZER_GROUPS`` splits into a decayed and a non-decayed part (biases, norms, embeddings,
    gates and learned query/vector parameters never decay). Every returned dict carries ``params``, ``lr``,
    ``weight_decay`` and ``name`` (e.g. ``"cross_attn"``, ``"cross_attn/no_decay"``); the default group comes first
    (its learning rate is the one the Trainer logs). Empty groups are left out.
    """
    rates = args.group_learning_rates()
    zero_decay = STAGE_ZERO_DECAY_GROUPS[args.stage]
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    seen = set()
    for module_name, module in model.named_modules():
        for local_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            full = f"{module_name}.{local_name}" if module_name else local_name
            group = optimizer_group_of(full)
            decay = group not in zero_decay and not _no_weight_decay(module, local_name, full)
            buckets.setdefault((group, decay), []).append(param)
    groups = []
    for group in OPTIMIZER_GROUPS:
        for decay in (True, False):
            params = buckets.get((group, decay))
            if params:
                groups.append(
                    {
                        "params": params,
                        "lr": rates[group],
                        "weight_decay": args.weight_decay if decay else 0.0,
                        "name": group if decay else f"{group}/no_decay",
                    }
                )
    return groups


def describe_param_groups(groups: list[dict]) -> list[dict]:
    """Rows ``{name, lr, weight_decay, tensors, parameters}`` of optimizer param groups (for logs and reports)."""
    return [
        {
            "name": g.get("name", str(i)),
            "lr": g["lr"],
            "weight_decay": g["weight_decay"],
            "tensors": len(g["params"]),
            "parameters": sum(p.numel() for p in g["params"]),
        }
        for i, g in enumerate(groups)
    ]


def _seed_for(seed: int, index: int) -> int:
    return int(
        np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(index)])
        .generate_state(2, dtype=np.uint32)
        .view(np.uint64)[0]
        >> 1
    )
