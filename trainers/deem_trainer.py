"""The ``Trainer`` subclass for the three DEEM stages: stage freezing, loss mix, per-group optimizer, per-step
diffusion generator, named loss-component metrics (`DeemTrainerMixin`, shared with the TRL subclass)."""

from __future__ import annotations

import torch
from transformers import Trainer
from transformers.utils import logging

from .checkpointing import AtomicCheckpointMixin
from .presets import (
    DeemArgumentsMixin,
    DeemTrainingArguments,
    _is_peft_model,
    _seed_for,
    build_param_groups,
    deem_base_model,
    describe_param_groups,
)

logger = logging.get_logger(__name__)


def _target_count(batch: dict, config, device=None) -> torch.Tensor:
    """Number of supervised next-token targets in one batch, counted exactly as the model's NTP loss does."""
    from deem.modeling.modeling_deem import default_labels

    input_ids = batch["input_ids"]
    labels = batch.get("labels")
    if labels is None:
        labels = default_labels(input_ids, batch.get("attention_mask"), config)
    labels = labels.masked_fill(input_ids == config.image_token_id, -100)
    return (labels[:, 1:] != -100).sum().to(device if device is not None else input_ids.device)


# ------------------------------------------------------------------------------------------------------------ trainer


class DeemTrainerMixin(AtomicCheckpointMixin):
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
        # named loss-component metrics of the logging window (as TRL's ``_metrics``): name -> [sum, count]
        self._loss_metrics: dict[str, torch.Tensor] = {}
        self._loss_metrics_since = None
        self._gen_step = -1
        self._gen_micro = 0
        self._eval_generator = None
        self._staging = False
        self._streaming_for_accelerate()

    @staticmethod
    def _apply_stage(model, args):
        if args.freeze_by_stage:
            if _is_peft_model(model):
                logger.info("PEFT model: trainable parameters are the adapter's (set_training_stage not applied)")
            else:
                deem_base_model(model).set_training_stage(args.stage)

    # ------------------------------------------------------------------ data

    def create_accelerator_and_postprocess(self):
        """The Trainer's accelerator, with ``dispatch_batches=False`` unless ``accelerator_config`` sets it.

        accelerate's default for an ``IterableDataset`` (our streaming data is a ``datasets.IterableDataset``) is
        to dispatch: rank 0 reads and collates the batches of every process and concatenates them, which fails on
        DEEM batches (padded per batch to different lengths, image lists) and makes rank 0 do all the reading.
        Without it, accelerate splits by process itself: ``dataset.shard(num_processes, process_index)`` when the
        dataset has at least as many shards as processes, else `IterableDatasetShard`."""
        config = self.args.accelerator_config
        if getattr(config, "dispatch_batches", False) is None:
            config.dispatch_batches = False
        return super().create_accelerator_and_postprocess()

    def _streaming_for_accelerate(self) -> None:
        """A ``deem.trainers.data`` stream split by node already (built with rank / world_size, or after the
        process group existed) is handed to accelerate without that split, since accelerate splits by process."""
        dataset = self.train_dataset
        split = getattr(dataset, "node_split", None)
        if split is None or self.args.world_size <= 1 or not hasattr(dataset, "without_node_split"):
            return
        if split != (self.args.process_index, self.args.world_size):
            logger.warning(
                f"the training data was split for (rank, world_size) = {split}, but this is process "
                f"{self.args.process_index} of {self.args.world_size}; accelerate splits it by process instead"
            )
        self.train_dataset = dataset.without_node_split()

    # ------------------------------------------------------------------ optimizer

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

    #: the loss components logged next to ``loss``, and how a window reduces them: "per_step" (the sum of the
    #: already step-normalised values / optimizer steps, for the NTP token mean) or "mean" (over the micro-batches
    #: of all processes where the branch ran). Subclasses may add names; every process reduces the same list.
    LOSS_METRICS = {"loss_ntp": "per_step", "loss_nip": "mean", "loss_csr": "mean"}

    def record_metric(self, name: str, value: torch.Tensor | float | None, device=None) -> None:
        """Add one micro-batch value of loss metric ``name`` (one of ``LOSS_METRICS``) to the window."""
        if name not in self.LOSS_METRICS:
            raise KeyError(f"unknown loss metric {name!r}; known: {sorted(self.LOSS_METRICS)}")
        if value is None:
            return
        if self._loss_metrics_since is None:
            self._loss_metrics_since = self.state.global_step
        acc = self._loss_metrics.get(name)
        if acc is None:
            acc = self._loss_metrics[name] = torch.zeros(2, dtype=torch.float64, device=device)
        with torch.no_grad():
            acc[0] += value.detach().double().to(acc.device) if torch.is_tensor(value) else float(value)
            acc[1] += 1.0

    def _record_components(self, ntp, nip, csr, device):
        for name, value in (("loss_ntp", ntp), ("loss_nip", nip), ("loss_csr", csr)):
            self.record_metric(name, value, device)

    def _reduce_components(self) -> dict[str, float]:
        """The window's loss metrics, reduced over processes (one collective, same names everywhere); resets them."""
        names = list(self.LOSS_METRICS)
        device = next((t.device for t in self._loss_metrics.values()), self.args.device)
        acc = torch.stack(
            [self._loss_metrics.get(n, torch.zeros(2, dtype=torch.float64, device=device)).to(device) for n in names]
        )
        if self.args.world_size > 1:
            acc = self.accelerator.reduce(acc.clone(), reduction="sum")
        since = self._loss_metrics_since if self._loss_metrics_since is not None else self.state.global_step
        steps = max(self.state.global_step - since, 1)
        logs = {}
        for name, (total, count) in zip(names, acc.tolist()):
            if count <= 0:
                continue
            if self.LOSS_METRICS[name] == "per_step":
                logs[name] = total / (steps * self.args.world_size)
            else:
                logs[name] = total / count
        self._loss_metrics = {}
        self._loss_metrics_since = self.state.global_step
        return logs

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add ``loss_ntp`` / ``loss_nip`` / ``loss_csr`` (gathered over processes) to every training log."""
        if "loss" in logs:
            logs.update(self._reduce_components())
        super().log(logs, start_time)

    def evaluate(self, *args, **kwargs):
        self._eval_generator = None  # every evaluation draws the same diffusion noise
        return super().evaluate(*args, **kwargs)


class DeemTrainer(DeemTrainerMixin, Trainer):
    """``transformers.Trainer`` for the three DEEM stages.

    - freezes / unfreezes by ``args.stage`` (``model.set_training_stage``; PEFT models keep their adapter's
      trainable set);
    - passes the stage's loss weights (``args.loss_weights``: stage 1 NTP + 5·NIP + 5·CSR, stage 2 NTP + 5·CSR,
      stage 3 NTP) and a per-micro-batch seeded ``generator`` to the model on every call;
    - ``create_optimizer``: per-group learning rates / weight decay ([`build_param_groups`]);
    - logs ``loss_ntp``, ``loss_nip``, ``loss_csr`` with ``loss`` (see [`DeemTrainerMixin`] for the normalisation);
    - writes checkpoints atomically;
    - streaming data (``deem.trainers.data``, a ``datasets.IterableDataset``) goes through the Trainer's own loader:
      accelerate splits it by process (``shard`` per process, datasets' shards), with ``dispatch_batches`` off by
      default (see `create_accelerator_and_postprocess`).
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
