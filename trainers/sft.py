"""TRL's ``SFTTrainer`` for DEEM's conversation stages (2 and 3): `DeemSFTConfig`, `DeemSFTTrainer`, defined on
first use (importing trl costs seconds); ``deem.trainers`` imports this module only when they are asked for."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.utils import logging

from .collators import DeemConversationCollator
from .deem_trainer import DeemTrainerMixin
from .presets import DeemArgumentsMixin

logger = logging.get_logger(__name__)

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
        cls.__module__, cls.__qualname__ = __name__, cls.__name__  # picklable as deem.trainers.sft.<name>
    _SFT_CLASSES.update(DeemSFTConfig=DeemSFTConfig, DeemSFTTrainer=DeemSFTTrainer)
    return _SFT_CLASSES


def __getattr__(name: str):
    if name in ("DeemSFTConfig", "DeemSFTTrainer"):
        return _sft_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
