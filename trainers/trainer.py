"""Training DEEM with the Hugging Face ``Trainer``: the three paper stages, their loss mix and optimizer groups.

- [`DeemTrainingArguments`]: ``TrainingArguments`` + ``stage`` (1, 2, 3) and the loss weights λ. Unset values take
  the stage's defaults from the paper (Table 12) and the original configs (reference §1.4, §4.6).
- [`DeemTrainer`]: ``Trainer`` that freezes by stage, passes the stage's loss weights and a per-step diffusion
  ``generator`` to the model, builds the per-group optimizer (``create_optimizer``), logs ``loss_ntp`` /
  ``loss_nip`` / ``loss_csr`` next to ``loss`` and writes checkpoints atomically.
- [`DeemSFTTrainer`] / [`DeemSFTConfig`]: the same on top of ``trl.SFTTrainer`` for conversation data (stages 2-3).
- [`SyntheticInterleavedDataset`] + [`collate_interleaved`]: generated interleaved data for smoke tests and the
  tiny config.

Section numbers (§) refer to ``reference/original-deem.md``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
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
    ("cross_attn", r"(?:^|\.)language_model\.layers\.\d+\.cross_attn\."),
    ("unet", r"(?:^|\.)unet\."),
    ("image_encoder_trunk", r"(?:^|\.)image_encoder\.backbone\.trunk\."),
    ("llm", r"(?:^|\.)language_model\."),
)
OPTIMIZER_GROUPS = ("default",) + tuple(name for name, _ in OPTIMIZER_GROUP_PATTERNS)

#: Learning rate of each group as a multiple of ``learning_rate`` (the default group's). With the stage-default
#: ``learning_rate`` these are exactly §4.6 / Table 12: stage 1 (1e-4): gates 1e-4, sampling offsets 1e-5,
#: cross-attention 1e-4, UNet 1e-5, ConvNeXt trunk 2e-5; stages 2-3 (1e-5): the LLM 1e-6 (the paper's value; the
#: original's ``mmdecoder`` pattern matched nothing, bug B2), gates / offsets / cross-attention / trunk 5e-6,
#: UNet 1e-5. LoRA adapters train at ``learning_rate``.
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
    },
}
STAGE_LR_SCALE[3] = dict(STAGE_LR_SCALE[2])

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


def _target_count(batch: dict, config, device=None) -> torch.Tensor:
    """Number of supervised next-token targets in one batch, counted exactly as the model's NTP loss does."""
    from deem.modeling.modeling_deem import default_labels

    input_ids = batch["input_ids"]
    labels = batch.get("labels")
    if labels is None:
        labels = default_labels(input_ids, batch.get("attention_mask"), config)
    labels = labels.masked_fill(input_ids == config.image_token_id, -100)
    return (labels[:, 1:] != -100).sum().to(device if device is not None else input_ids.device)


def _seed_for(seed: int, index: int) -> int:
    return int(
        np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(index)])
        .generate_state(2, dtype=np.uint32)
        .view(np.uint64)[0]
        >> 1
    )


# ------------------------------------------------------------------------------------------------------------ trainer


class DeemTrainerMixin:
    """DEEM behaviour shared by [`DeemTrainer`] and [`DeemSFTTrainer`] (put before the Trainer class in the bases).

    Loss normalisation (what is back-propagated and logged per optimizer step):

    - ``loss_ntp``: a token mean over the *whole* accumulated global batch. ``get_batch_samples`` counts the
      supervised next-token targets of all micro-batches of the step (exactly as the model masks them: shifted
      labels, image placeholders, padding; ``default_labels`` rules when a batch has no ``labels``) and, with
      ``average_tokens_across_devices`` (default), sums the count over processes. Each micro-batch contributes
      ``sum CE / N_global``, multiplied by the number of processes because DDP averages gradients. So the step's
      NTP is identical for 1 process × 2 accumulation steps and 2 processes × 1, and does not depend on how tokens
      are split between micro-batches.
    - ``loss_nip`` / ``loss_csr``: per micro-batch means (over images and latent elements, as the original), each
      divided by the number of accumulation steps; DDP then averages over processes. The step's value is the mean
      over its micro-batches, the same as the original's per-GPU means averaged by DDP.
    - backward: ``w_ntp·NTP + w_nip·NIP + w_csr·CSR`` with these scalings (``loss_is_scaled_for_ga = True``); the
      logged ``loss`` is this objective averaged over the logging window.
    - logged components: ``loss_ntp`` is the window mean of the step values above; ``loss_nip`` / ``loss_csr`` are
      the mean over the micro-batches (of all processes) where that branch ran, and are absent when it never ran
      (weight 0, or no images). Values are gathered across processes before logging.
    """

    loss_is_scaled_for_ga = True

    def _deem_setup(self, model):
        self._deem_config = deem_base_model(model).config
        self._components = None  # [ntp_step_sum, nip_sum, nip_count, csr_sum, csr_count, ntp_seen]
        self._components_since = None
        self._gen_step = -1
        self._gen_micro = 0
        self._eval_generator = None
        self._staging = False

    @staticmethod
    def _apply_stage(model, args):
        if args.freeze_by_stage:
            if _is_peft_model(model):
                logger.info("PEFT model: trainable parameters are the adapter's (set_training_stage not applied)")
            else:
                deem_base_model(model).set_training_stage(args.stage)

    # ------------------------------------------------------------------ optimizer

    def get_train_dataloader(self):
        """Map-style data: the Trainer's own loader. Streaming data (``IterableDataset``): the ``deem.trainers.data``
        readers already give every (rank, worker) its own disjoint part, so the loader is prepared as for a
        single process — accelerate must not split or dispatch it a second time (each rank would then see only a
        fraction of its share)."""
        if not isinstance(self.train_dataset, torch.utils.data.IterableDataset):
            return super().get_train_dataloader()
        from accelerate.data_loader import prepare_data_loader

        loader = torch.utils.data.DataLoader(
            self.train_dataset,
            batch_size=self._train_batch_size,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )
        return prepare_data_loader(
            loader,
            device=self.accelerator.device,
            num_processes=1,
            process_index=0,
            put_on_device=True,
            dispatch_batches=False,
        )

    def create_optimizer(self, model=None):
        """AdamW (or ``args.optim``) over [`build_param_groups`]: per-group learning rates and weight decay."""
        opt_model = self.model if model is None else model
        if self.optimizer is None:
            groups = build_param_groups(opt_model, self.args)
            if self.optimizer_cls_and_kwargs is not None:
                optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
            else:
                optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            for key in ("params", "model", "optimizer_dict"):
                if key in optimizer_kwargs:
                    raise ValueError(
                        f"optim={self.args.optim!r} builds its own parameter list ({key}); DeemTrainer needs per-group "
                        "optimizers such as adamw_torch"
                    )
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
            for row in describe_param_groups(groups):
                logger.info(
                    f"optimizer group {row['name']}: lr {row['lr']:.3g}, weight decay {row['weight_decay']:g}, "
                    f"{row['parameters']:,} parameters"
                )
        return self.optimizer

    # ------------------------------------------------------------------ loss

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Collect the step's micro-batches and count their next-token targets (see the class docstring)."""
        batch_samples = []
        for _ in range(num_batches):
            try:
                batch_samples.append(next(epoch_iterator))
            except StopIteration:
                break
        num_items = None
        if batch_samples and self.args.loss_weights["ntp"] > 0 and all("input_ids" in b for b in batch_samples):
            num_items = sum(_target_count(b, self._deem_config, device) for b in batch_samples)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                num_items = self.accelerator.gather(num_items.to(device)).sum()
            num_items = num_items.to(device)
        return batch_samples, num_items

    def _diffusion_generator(self, device) -> torch.Generator | None:
        """Generator for this micro-batch's diffusion draws, seeded from (seed, global micro-batch index).

        The index ``(global_step · accumulation + micro) · processes + rank`` names the same data batch whether it
        runs as the second accumulation step of one process or on the second process, and it survives a resume."""
        if not self.args.seed_diffusion_per_step:
            return None
        step = self.state.global_step
        if step != self._gen_step:
            self._gen_step, self._gen_micro = step, 0
        index = (
            step * self.args.gradient_accumulation_steps + self._gen_micro
        ) * self.args.world_size + self.args.process_index
        self._gen_micro += 1
        generator = torch.Generator(device=device)
        generator.manual_seed(_seed_for(self.args.seed, index))
        return generator

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        w = self.args.loss_weights
        training = model.training
        device = inputs["input_ids"].device
        inputs = {k: v for k, v in inputs.items() if k not in ("loss_ntp_weight", "loss_nip_weight", "loss_csr_weight")}
        if training:
            generator = self._diffusion_generator(device)
        else:
            if self._eval_generator is None:
                self._eval_generator = torch.Generator(device=device).manual_seed(
                    _seed_for(self.args.seed, -1 & 0xFFFFFFFF)
                )
            generator = self._eval_generator
            num_items_in_batch = None
        outputs = model(
            **inputs,
            loss_ntp_weight=w["ntp"],
            loss_nip_weight=w["nip"],
            loss_csr_weight=w["csr"],
            generator=generator,
            num_items_in_batch=num_items_in_batch.clamp(min=1)
            if torch.is_tensor(num_items_in_batch)
            else num_items_in_batch,
            return_loss=True,
        )
        if not training:
            loss = outputs.loss if outputs.loss is not None else torch.zeros((), device=device)
            return (loss, outputs) if return_outputs else loss

        accumulation = max(int(getattr(self, "current_gradient_accumulation_steps", 1) or 1), 1)
        ntp = outputs.loss_ntp
        if ntp is not None:
            if num_items_in_batch is not None:
                scale = (
                    self.accelerator.num_processes
                    if (self.args.average_tokens_across_devices and self.args.world_size > 1)
                    else 1
                )
                ntp = ntp * scale
            else:
                ntp = ntp / accumulation
        loss = None
        for weight, value in ((w["ntp"], ntp), (w["nip"], outputs.loss_nip), (w["csr"], outputs.loss_csr)):
            if value is None:
                continue
            term = weight * (value if value is ntp else value / accumulation)
            loss = term if loss is None else loss + term
        if loss is None:  # nothing supervised in this micro-batch: a zero that still reaches every used parameter
            loss = outputs.logits.sum() * 0.0
        self._record_components(ntp, outputs.loss_nip, outputs.loss_csr, device)
        return (loss, outputs) if return_outputs else loss

    def _record_components(self, ntp, nip, csr, device):
        if self._components is None:
            self._components = torch.zeros(6, dtype=torch.float64, device=device)
            self._components_since = self.state.global_step
        acc = self._components
        with torch.no_grad():
            if ntp is not None:
                acc[0] += ntp.detach().double()
                acc[5] = 1.0
            if nip is not None:
                acc[1] += nip.detach().double()
                acc[2] += 1.0
            if csr is not None:
                acc[3] += csr.detach().double()
                acc[4] += 1.0

    def _reduce_components(self) -> dict[str, float]:
        if self._components is None:
            # this process saw no batch in the window; still take part in the collective
            device = self.args.device
            self._components = torch.zeros(6, dtype=torch.float64, device=device)
            self._components_since = self.state.global_step
        acc = self._components
        if self.args.world_size > 1:
            acc = self.accelerator.reduce(acc.clone(), reduction="sum")
        steps = max(self.state.global_step - self._components_since, 1)
        values = acc.tolist()
        logs = {}
        if values[5] > 0:
            logs["loss_ntp"] = values[0] / (steps * self.args.world_size)
        if values[2] > 0:
            logs["loss_nip"] = values[1] / values[2]
        if values[4] > 0:
            logs["loss_csr"] = values[3] / values[4]
        self._components.zero_()
        self._components_since = self.state.global_step
        return logs

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add ``loss_ntp`` / ``loss_nip`` / ``loss_csr`` (gathered over processes) to every training log."""
        if "loss" in logs:
            logs.update(self._reduce_components())
        super().log(logs, start_time)

    def evaluate(self, *args, **kwargs):
        self._eval_generator = None  # every evaluation draws the same diffusion noise
        return super().evaluate(*args, **kwargs)

    # ------------------------------------------------------------------ atomic checkpoints

    def _get_output_dir(self, trial):
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, ".staging") if self._staging else run_dir

    def _save_checkpoint(self, model, trial):
        """Write ``checkpoint-N`` into ``<output_dir>/.staging/`` and move it into place only once every file (model,
        optimizer, scheduler, RNG states of all processes, trainer state) is written. A crash mid-save leaves the
        previous ``checkpoint-*`` untouched and nothing named ``checkpoint-N``, so ``resume_from_checkpoint=True``
        (``get_last_checkpoint``) finds the last complete one. transformers itself writes in place (5.x)."""
        if not self.args.atomic_checkpoints:
            return super()._save_checkpoint(model, trial)
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging_root = os.path.join(run_dir, ".staging")
        staged, final = os.path.join(staging_root, name), os.path.join(run_dir, name)
        if self.args.should_save and os.path.isdir(staged):
            shutil.rmtree(staged)  # left over by an earlier crash
        self.accelerator.wait_for_everyone()
        limit, self.args.save_total_limit = self.args.save_total_limit, None  # rotate in run_dir below, not in staging
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = False
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            if self.state.best_model_checkpoint and os.path.dirname(
                os.path.abspath(self.state.best_model_checkpoint)
            ) == os.path.abspath(staging_root):
                self.state.best_model_checkpoint = os.path.join(
                    run_dir, os.path.basename(self.state.best_model_checkpoint)
                )
            if os.path.isdir(final):  # same step saved before (e.g. a resumed run re-saving): replace it
                old = final + ".old"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                os.replace(staged, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(staged, final)
            _fsync_dir(run_dir)
            shutil.rmtree(staging_root, ignore_errors=True)
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=False,
            )
        self.accelerator.wait_for_everyone()


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


class DeemTrainer(DeemTrainerMixin, Trainer):
    """``transformers.Trainer`` for the three DEEM stages.

    - freezes / unfreezes by ``args.stage`` (``model.set_training_stage``; PEFT models keep their adapter's
      trainable set);
    - passes the stage's loss weights (``args.loss_weights``: stage 1 NTP + 5·NIP + 5·CSR, stage 2 NTP + 5·CSR,
      stage 3 NTP) and a per-micro-batch seeded ``generator`` to the model on every call;
    - ``create_optimizer``: per-group learning rates / weight decay ([`build_param_groups`]);
    - logs ``loss_ntp``, ``loss_nip``, ``loss_csr`` with ``loss`` (see [`DeemTrainerMixin`] for the normalisation);
    - writes checkpoints atomically.
    """

    def __init__(self, model=None, args: DeemTrainingArguments | None = None, *pos, **kwargs):
        if args is None:
            args = DeemTrainingArguments(output_dir="deem_trainer_output")
        if not isinstance(args, DeemArgumentsMixin):
            raise TypeError("DeemTrainer needs DeemTrainingArguments (stage, loss weights, optimizer groups)")
        if model is None:
            raise ValueError("DeemTrainer needs a model")
        self._apply_stage(model, args)
        super().__init__(model, args, *pos, **kwargs)
        self._deem_setup(self.model)


# ------------------------------------------------------------------------------------------------ TRL (stages 2 - 3)

_SFT_CLASSES: dict = {}


def _sft_classes() -> dict:
    """Define [`DeemSFTConfig`] / [`DeemSFTTrainer`] on first use (importing trl costs seconds)."""
    if _SFT_CLASSES:
        return _SFT_CLASSES
    from trl import SFTConfig, SFTTrainer

    @dataclass
    class DeemSFTConfig(DeemArgumentsMixin, SFTConfig):
        """``trl.SFTConfig`` + the DEEM fields. Stage 2 by default (NTP + 5·CSR); TRL's bf16 / gradient
        checkpointing defaults are kept (set ``bf16=False`` and ``gradient_checkpointing=False`` on a CPU)."""

        stage: int = field(default=2, metadata={"help": "2 (image-text SFT, NTP + λ·CSR) or 3 (mask-text SFT, NTP)."})
        max_length: int | None = field(default=2048, metadata={"help": "Maximum tokens per row (the paper's 2048)."})

        def __post_init__(self):
            self._resolve_deem_defaults()
            super().__post_init__()

    class DeemSFTTrainer(DeemTrainerMixin, SFTTrainer):
        """``trl.SFTTrainer`` for DEEM's conversation stages (2 and 3), keeping the CSR term in stage 2.

        Data: a ``datasets.Dataset`` in TRL's conversational vision format, rows ``{"messages": [...], "images":
        [...]}`` (an ``{"type": "image"}`` content item where each image goes), or any rows your ``data_collator``
        understands (e.g. ``deem.trainers.data.DeemDataCollator`` samples). The default collator is
        [`DeemConversationCollator`]: DEEM's chat template, loss on the assistant answers (and their ``</s>``) only.

        What TRL does here: ``SFTConfig`` and its argument parsing, ``peft_config`` (``get_peft_model``), its
        vision-dataset handling (no tokenisation up front, rows handed to the collator on the fly), the
        ``mean_token_accuracy`` metric (computed here from the logits), model card and tags. What it cannot do for
        DEEM, so this class replaces it: (1) its ``DataCollatorForVisionLanguageModeling`` gets assistant-only labels
        from ``processor.apply_chat_template(..., return_assistant_tokens_mask=True)``, which needs
        ``{% generation %}`` markers in the chat template and a processor that returns ``offset_mapping`` /
        ``text_replacement_offsets``; DeemProcessor expands each image into ``<|startofimage|>`` + N placeholders
        and tokenises the text between special tokens piece by piece, so it has no character offsets, and the
        collator adds no ``<s>`` (``add_special_tokens=False``). Without ``assistant_only_loss`` it supervises the
        whole conversation. (2) ``SFTTrainer.compute_loss`` runs the model with ``fused_lm_head=True`` (trl's
        ``add_fused_lm_head``), which calls ``model.base_model(...)`` and reads ``last_hidden_state``, then scores
        with ``get_output_embeddings().weight`` alone; DEEM's ``base_model`` is the model itself, its output has
        logits, and its text head adds a second ``new_tokens`` matrix for the ids >= ``original_vocab_size`` (soi,
        ref, box), so those log-probabilities would be wrong; and there is no place for the diffusion (CSR) loss.
        ``compute_loss`` is therefore [`DeemTrainerMixin`]'s; TRL's patched forward stays inert
        (``fused_lm_head`` is never passed).
        """

        def __init__(
            self,
            model=None,
            args=None,
            data_collator=None,
            train_dataset=None,
            eval_dataset=None,
            processing_class=None,
            **kwargs,
        ):
            if args is None:
                args = DeemSFTConfig(output_dir="deem_sft_output")
            if not isinstance(args, DeemArgumentsMixin):
                raise TypeError("DeemSFTTrainer needs DeemSFTConfig (stage, loss weights, optimizer groups)")
            if isinstance(model, str):  # our own class loads our own checkpoints: no remote-code prompt
                from deem import DeemForInterleavedGeneration

                model = DeemForInterleavedGeneration.from_pretrained(model, **(args.model_init_kwargs or {}))
            if model is None:
                raise ValueError("DeemSFTTrainer needs a model")
            if processing_class is None:
                from deem import DeemProcessor

                processing_class = DeemProcessor.from_pretrained(model.config._name_or_path)
            if data_collator is None:
                data_collator = DeemConversationCollator(processing_class, max_length=args.max_length)
            if kwargs.get("peft_config") is None:
                self._apply_stage(model, args)
            args.dataset_kwargs = {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True}
            super().__init__(
                model=model,
                args=args,
                data_collator=data_collator,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                **kwargs,
            )
            self._deem_setup(self.model)

        def _set_signature_columns_if_needed(self):
            if self._signature_columns is None:
                self._signature_columns = [
                    "messages",
                    "images",
                    "image",
                    "segments",
                    "image_masks",
                    "input_ids",
                    "labels",
                ]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = DeemTrainerMixin.compute_loss(
                self, model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
            mode = "train" if model.training else "eval"
            labels = inputs.get("labels")
            if labels is not None and outputs.logits is not None:
                with torch.no_grad():
                    target = labels[:, 1:]
                    mask = (target != -100) & (inputs["input_ids"][:, 1:] != self._deem_config.image_token_id)
                    correct = (outputs.logits[:, :-1].argmax(-1) == target) & mask
                    counts = torch.stack([correct.sum(), mask.sum()]).double()
                    if self.args.world_size > 1:
                        counts = self.accelerator.reduce(counts, reduction="sum")
                    if counts[1] > 0:
                        self._metrics[mode]["mean_token_accuracy"].append((counts[0] / counts[1]).item())
            return (loss, outputs) if return_outputs else loss

    for cls in (DeemSFTConfig, DeemSFTTrainer):
        cls.__module__, cls.__qualname__ = __name__, cls.__name__  # picklable as deem.trainers.trainer.<name>
    _SFT_CLASSES.update(DeemSFTConfig=DeemSFTConfig, DeemSFTTrainer=DeemSFTTrainer)
    return _SFT_CLASSES


def __getattr__(name: str):
    if name in ("DeemSFTConfig", "DeemSFTTrainer"):
        return _sft_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------------------------------------------- PEFT

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


# ---------------------------------------------------------------------------------------------------------- collators


def collate_interleaved(features: list[dict], pad_token_id: int, label_pad_id: int = -100) -> dict[str, torch.Tensor]:
    """Right-pad tokenised rows and concatenate their images (row-major).

    Each feature: ``input_ids`` [L] (list or tensor), optional ``labels`` [L], ``pixel_values`` [n,3,S,S],
    ``pixel_values_decoder`` [n,3,D,D], ``image_masks`` [n,1,S,S] (n may be 0). Returns model-ready tensors with
    ``attention_mask`` and ``num_images``."""
    ids = [torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features]
    length = max(len(x) for x in ids)
    batch = {
        "input_ids": torch.stack([F.pad(x, (0, length - len(x)), value=pad_token_id) for x in ids]),
        "attention_mask": torch.stack([F.pad(torch.ones_like(x), (0, length - len(x)), value=0) for x in ids]),
    }
    if any("labels" in f for f in features):
        labels = [torch.as_tensor(f.get("labels", f["input_ids"]), dtype=torch.long) for f in features]
        batch["labels"] = torch.stack([F.pad(x, (0, length - len(x)), value=label_pad_id) for x in labels])
    counts = [0 if f.get("pixel_values") is None else len(f["pixel_values"]) for f in features]
    batch["num_images"] = torch.tensor(counts, dtype=torch.long)
    for key in ("pixel_values", "pixel_values_decoder", "image_masks"):
        parts = [torch.as_tensor(f[key]) for f in features if f.get(key) is not None and len(f[key])]
        if parts:
            batch[key] = torch.cat(parts)
    return batch


class DeemConversationCollator:
    """Conversations -> DEEM batches with loss on the assistant answers only (DEEM's chat template, §3.4).

    Rows: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str | [{"type": "text", "text": ...},
    {"type": "image"}]}], "images": [PIL | array, ...]}``. The whole conversation is rendered once with the
    processor's chat template and encoded once (``<s>`` + text, images expanded). For assistant turn k the
    supervised tokens are those of ``render(messages[:k+1])`` past its common prefix with
    ``render(messages[:k]) + " ## ASSISTANT:"`` (the generation prompt), i.e. the answer and its ``</s>``, which
    ends a tokenisation segment, so the spans line up with the full encoding.
    """

    def __init__(self, processor, max_length: int | None = None):
        self.processor = processor
        self.max_length = max_length

    def _render(self, messages, add_generation_prompt=False) -> str:
        return self.processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)

    def _ids(self, text: str, n_images: int) -> list[int]:
        # images only matter for the placeholder expansion; encode with dummy images to count tokens exactly
        out = self.processor(
            text=text,
            images=[np.zeros((2, 2, 3), dtype=np.uint8)] * n_images if n_images else None,
            return_tensors=None,
            padding=False,
        )
        return list(out["input_ids"][0])

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        texts, images, labels_rows = [], [], []
        for feature in features:
            messages = feature["messages"]
            row_images = feature.get("images") or ([feature["image"]] if feature.get("image") is not None else [])
            full = self._render(messages)
            full_ids = self._ids(full, len(row_images))
            labels = [-100] * len(full_ids)
            for k, message in enumerate(messages):
                if message["role"] != "assistant":
                    continue
                n_img = _count_images(messages[: k + 1], self.processor.image_marker)
                turn_ids = self._ids(self._render(messages[: k + 1]), n_img)
                prompt_ids = self._ids(self._render(messages[:k], add_generation_prompt=True), n_img)
                start = _common_prefix(prompt_ids, turn_ids)
                for pos in range(start, min(len(turn_ids), len(full_ids))):
                    labels[pos] = full_ids[pos]
            texts.append(full)
            images.append(list(row_images))
            labels_rows.append(labels)
        flat_images = [img for row in images for img in row]
        enc = self.processor(
            text=texts,
            images=flat_images or None,
            padding=True,
            padding_side="right",
            max_length=self.max_length,
            truncation=self.max_length is not None,
        )
        length = enc["input_ids"].shape[1]
        labels = torch.full((len(texts), length), -100, dtype=torch.long)
        for i, row in enumerate(labels_rows):
            row = row[:length]
            labels[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        labels[enc["attention_mask"] == 0] = -100
        batch = {k: v for k, v in enc.items()}
        batch["labels"] = labels
        return batch


def _count_images(messages, marker: str) -> int:
    n = 0
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            n += content.count(marker)
        else:
            n += sum(1 for item in content if item.get("type") == "image") + sum(
                item.get("text", "").count(marker) for item in content if item.get("type") == "text"
            )
    return n


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# --------------------------------------------------------------------------------------------------- synthetic data


class SyntheticInterleavedDataset(torch.utils.data.Dataset):
    """Deterministic generated interleaved documents for smoke tests and the tiny config.

    Sample i (a function of ``seed`` and i only): ``<s>`` text ``<soi><img>*Q`` text [``<soi><img>*Q`` text]
    ``</s>`` with 1-``max_images`` images. Text ids are drawn from a small per-dataset "phrase book" so there is
    something to learn; images are smooth random colour fields (encoder and decoder views of the same picture).
    With ``sft=True`` rows are ``<s>`` prompt ``<soi><img>*Q`` question answer ``</s>`` with labels only on the
    answer and ``</s>`` (stage 2-3 style).
    """

    def __init__(
        self,
        config,
        num_samples: int = 32,
        seed: int = 0,
        max_images: int = 2,
        text_length: tuple[int, int] = (3, 8),
        sft: bool = False,
    ):
        self.config = config
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.max_images = int(max_images)
        self.text_length = tuple(text_length)
        self.sft = sft
        g = torch.Generator().manual_seed(self.seed)
        lo, hi = 3, max(4, config.original_vocab_size - 2)
        self.phrases = [
            torch.randint(
                lo,
                hi,
                (int(torch.randint(self.text_length[0], self.text_length[1] + 1, (1,), generator=g)),),
                generator=g,
            ).tolist()
            for _ in range(8)
        ]

    def __len__(self) -> int:
        return self.num_samples

    def _image(self, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        base = torch.rand(1, 3, 4, 4, generator=g)
        vis = cfg.vision_config.image_size
        enc = F.interpolate(base, size=(vis, vis), mode="bilinear", align_corners=False)[0].clamp(0, 1)
        dec = None
        if cfg.diffusion_config is not None:
            side = cfg.diffusion_config.image_size
            dec = F.interpolate(base, size=(side, side), mode="bilinear", align_corners=False)[0].clamp(0, 1)
        return enc, dec

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        cfg = self.config
        g = torch.Generator().manual_seed(_seed_for(self.seed, index) % (2**63))
        image_run = [cfg.soi_token_id] + [cfg.image_token_id] * cfg.num_image_tokens
        pick = lambda: self.phrases[int(torch.randint(0, len(self.phrases), (1,), generator=g))]  # noqa: E731
        n_images = 1 if self.sft else int(torch.randint(1, self.max_images + 1, (1,), generator=g))
        ids, labels = [cfg.bos_token_id], None
        if self.sft:
            ids += pick() + image_run + pick()
            answer = pick() + [cfg.eos_token_id]
            labels = [-100] * len(ids) + answer
            ids += answer
        else:
            for k in range(n_images):
                if k > 0 or bool(torch.rand(1, generator=g) < 0.5):
                    ids += pick()
                ids += image_run
            ids += pick() + [cfg.eos_token_id]
        views = [self._image(g) for _ in range(n_images)]
        sample = {"input_ids": ids, "pixel_values": torch.stack([v[0] for v in views])}
        if views[0][1] is not None:
            sample["pixel_values_decoder"] = torch.stack([v[1] for v in views])
        if labels is not None:
            sample["labels"] = labels
        return sample


class SyntheticCollator:
    """[`collate_interleaved`] with the model config's pad id (a picklable callable for DataLoader workers)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features):
        return collate_interleaved(features, self.pad_token_id)


__all__ = [
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
    "STAGE_DEFAULTS",
    "STAGE_LOSS_WEIGHTS",
    "STAGE_LR_SCALE",
    "SyntheticCollator",
    "SyntheticInterleavedDataset",
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
