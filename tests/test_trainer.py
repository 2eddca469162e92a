"""DeemTrainer / DeemSFTTrainer: stage presets, loss mix and logging, optimizer groups, LoRA, multi-process,
FSDP2, resume and crash-safe checkpoints, the CLI and its YAML configs. Tiny models, CPU only."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import REPO, tiny_config, tiny_model
from safetensors.torch import load_file

from deem.modeling.modeling_deem import COMPONENTS, STAGE_TRAINABLE
from deem.trainers.trainer import (
    DeemTrainer,
    DeemTrainingArguments,
    SyntheticCollator,
    SyntheticInterleavedDataset,
    build_param_groups,
    deem_lora_config,
    optimizer_group_of,
)

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO / "tests")}


def _args(tmp_path, stage, **kw):
    base = dict(
        output_dir=str(tmp_path),
        stage=stage,
        learning_rate=1e-2,
        max_steps=30,
        per_device_train_batch_size=2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        lr_scheduler_type="constant",
        log_level="error",
    )
    base.update(kw)
    return DeemTrainingArguments(**base)


def _dataset(model, stage, n=4, seed=0):
    return SyntheticInterleavedDataset(model.config, num_samples=n, seed=seed, sft=stage > 1)


def _train_logs(trainer):
    return [row for row in trainer.state.log_history if "loss" in row]


def _first_last(logs, key, k=5):
    values = [row[key] for row in logs]
    return float(np.mean(values[:k])), float(np.mean(values[-k:]))


def _state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ------------------------------------------------------------------------------------------------- stage presets


def test_stage_defaults_match_table_12(tmp_path):
    a1, a2, a3 = (
        DeemTrainingArguments(output_dir=str(tmp_path), stage=s, use_cpu=True, report_to="none") for s in (1, 2, 3)
    )
    assert (a1.learning_rate, a1.adam_beta1, a1.adam_beta2, a1.adam_epsilon) == (1e-4, 0.9, 0.995, 1e-6)
    for a in (a2, a3):
        assert (a.learning_rate, a.adam_beta1, a.adam_beta2, a.adam_epsilon) == (1e-5, 0.9, 0.999, 1e-8)
    assert a1.loss_weights == {"ntp": 1.0, "nip": 5.0, "csr": 5.0}
    assert a2.loss_weights == {"ntp": 1.0, "nip": 0.0, "csr": 5.0}
    assert a3.loss_weights == {"ntp": 1.0, "nip": 0.0, "csr": 0.0}
    assert a1.weight_decay == 0.05 and a1.lr_scheduler_type == "cosine" and a1.ddp_find_unused_parameters
    explicit = _args(tmp_path, 2, loss_nip_weight=1.0, adam_beta2=0.98, param_group_lr='{"llm": 3e-6}')
    assert explicit.loss_weights["nip"] == 1.0 and explicit.adam_beta2 == 0.98
    assert explicit.group_learning_rates()["llm"] == 3e-6
    with pytest.raises(ValueError, match="stage"):
        _args(tmp_path, 4)
    with pytest.raises(ValueError, match="unknown optimizer groups"):
        _args(tmp_path, 1, param_group_lr={"llama": 1e-6})


def _group_by_param(groups):
    out = {}
    for g in groups:
        for p in g["params"]:
            out[id(p)] = g
    return out


def test_optimizer_groups_stage1_and_2(tmp_path):
    from deem.modeling.modeling_deem import current_to_legacy_keys

    model = tiny_model()
    named = current_to_legacy_keys(dict(model.named_parameters()))  # the names below are the short (legacy) ones
    model.set_training_stage(1)
    g1 = _group_by_param(build_param_groups(model, _args(tmp_path, 1, learning_rate=None)))
    expect1 = {
        "language_model.layers.0.cross_attn.gate": (1e-4, 0.0, "cross_attn_gate"),
        "language_model.layers.0.cross_attn.attn.sampling_offsets.weight": (1e-5, 0.0, "sampling_offsets"),
        "unet_side.mid_block.attn.sampling_offsets.weight": (1e-5, 0.0, "sampling_offsets"),
        "language_model.layers.0.cross_attn.attn.value_proj.weight": (1e-4, 0.05, "cross_attn"),
        "language_model.layers.0.cross_attn.attn.value_proj.bias": (1e-4, 0.0, "cross_attn"),
        "language_model.layers.0.cross_attn.attn.output_proj.weight": (1e-4, 0.05, "cross_attn"),
        "language_model.layers.0.cross_attn.attn.output_proj.bias": (1e-4, 0.0, "cross_attn_output_bias"),
        "language_model.layers.0.cross_attn.norm_query.weight": (1e-4, 0.0, "cross_attn"),
        "language_model.layers.0.cross_attn.attn.query_relpos.weight": (1e-4, 0.0, "cross_attn"),
        "image_encoder.backbone.trunk.stages.0.blocks.0.mlp.fc1.weight": (2e-5, 0.05, "image_encoder_trunk"),
        "image_encoder.backbone.trunk.stages.0.blocks.0.norm.weight": (2e-5, 0.0, "image_encoder_trunk"),
        "image_encoder.perceiver.layers.0.mlp.fc1.weight": (1e-4, 0.05, "default"),
        "image_encoder.perceiver.queries": (1e-4, 0.0, "default"),
        "image_encoder.perceiver.layers.0.self_attention.q_norm.weight": (1e-4, 0.0, "default"),
        "soi_embedding": (1e-4, 0.0, "default"),
        "null_condition": (1e-4, 0.0, "nip_condition"),  # at the default rate unless overridden
        "unet_side.mid_block.attn.value_proj.weight": (1e-4, 0.05, "default"),
        "lm_head.new_tokens.weight": (1e-4, 0.05, "new_tokens"),  # the original's head_new: its default rate
    }
    for name, (lr, wd, group) in expect1.items():
        g = g1[id(named[name])]
        assert g["lr"] == pytest.approx(lr) and g["weight_decay"] == wd and g["name"].split("/")[0] == group, name
    # frozen parameters are in no group
    for name in (
        "language_model.layers.0.self_attn.q_proj.weight",
        "unet.conv_in.weight",
        "vae.encoder.conv_in.weight",
        "lm_head.base.weight",
    ):
        assert id(named[name]) not in g1, name
    assert build_param_groups(model, _args(tmp_path, 1))[0]["name"] == "default"  # the logged learning rate
    # the added tokens' output rows can get their own rate (the built-in world's stage 1 does)
    args = _args(tmp_path, 1, learning_rate=None, param_group_lr={"new_tokens": 5e-2})
    own = _group_by_param(build_param_groups(model, args))
    assert own[id(named["lm_head.new_tokens.weight"])]["lr"] == pytest.approx(5e-2)
    assert own[id(named["lm_head.new_tokens.bias"])]["lr"] == pytest.approx(5e-2)
    assert own[id(named["soi_embedding"])]["lr"] == pytest.approx(1e-4)
    # ... and the cross-attention's output bias can be held where it starts (the world's stage 1: 0)
    args = _args(tmp_path, 1, learning_rate=None, param_group_lr={"cross_attn_output_bias": 0.0})
    held = _group_by_param(build_param_groups(model, args))
    assert held[id(named["language_model.layers.0.cross_attn.attn.output_proj.bias"])]["lr"] == 0.0
    assert held[id(named["language_model.layers.0.cross_attn.attn.output_proj.weight"])]["lr"] == pytest.approx(1e-4)
    # ... and the NIP condition (decoder perceiver with its null condition, context projection) its own rate
    args = _args(tmp_path, 1, learning_rate=None, param_group_lr={"nip_condition": 3e-5})
    cond = _group_by_param(build_param_groups(model, args))
    assert cond[id(named["null_condition"])]["lr"] == pytest.approx(3e-5)
    perceiver = [n for n in named if "decoder_perceiver" in n and n != "null_condition"]
    assert perceiver and all(cond[id(named[n])]["lr"] == pytest.approx(3e-5) for n in perceiver)
    assert cond[id(named["image_encoder.perceiver.queries"])]["lr"] == pytest.approx(1e-4)

    model.set_training_stage(2)
    g2 = _group_by_param(build_param_groups(model, _args(tmp_path, 2, learning_rate=None)))
    expect2 = {
        "language_model.layers.1.self_attn.q_proj.weight": (1e-6, 0.0),  # the paper's LLM rate (not bug B2)
        "language_model.embed_tokens.weight": (1e-6, 0.0),
        "language_model.norm.weight": (1e-6, 0.0),
        "language_model.layers.0.cross_attn.gate": (5e-6, 0.0),
        "language_model.layers.0.cross_attn.attn.sampling_offsets.weight": (5e-6, 0.0),
        "unet_side.mid_block.attn.sampling_offsets.weight": (5e-6, 0.0),
        "language_model.layers.0.cross_attn.attn.value_proj.weight": (5e-6, 0.05),
        "language_model.layers.0.cross_attn.attn.output_proj.bias": (5e-6, 0.0),
        "image_encoder.perceiver.layers.0.mlp.fc1.weight": (1e-5, 0.05),
        "lm_head.new_tokens.weight": (1e-5, 0.05),
    }
    for name, (lr, wd) in expect2.items():
        g = g2[id(named[name])]
        assert g["lr"] == pytest.approx(lr) and g["weight_decay"] == wd, name
    assert id(named["image_encoder.backbone.trunk.stem.0.weight"]) not in g2  # frozen in stage 2
    assert (
        optimizer_group_of("base_model.model.language_model.layers.0.self_attn.q_proj.lora_A.default.weight") == "lora"
    )


# ------------------------------------------------------------------------------------------------ stage training


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_stage_trains_with_falling_losses(tmp_path, stage):
    torch.set_num_threads(1)
    model = tiny_model()
    before = _state(model)
    trainer = DeemTrainer(
        model,
        _args(tmp_path, stage),
        train_dataset=_dataset(model, stage),
        data_collator=SyntheticCollator(model.config.pad_token_id),
    )

    # trainable set == the stage table, per component
    trainable = STAGE_TRAINABLE[stage]
    for component, params in model.component_parameters().items():
        assert component in COMPONENTS
        assert all(p.requires_grad == (component in trainable) for _, p in params), component
    trainer.train()

    logs = _train_logs(trainer)
    assert len(logs) == 30
    present = {"loss_ntp"} | ({"loss_nip"} if stage == 1 else set()) | ({"loss_csr"} if stage < 3 else set())
    absent = {"loss_ntp", "loss_nip", "loss_csr"} - present
    for row in logs:
        assert present <= set(row) and not (absent & set(row)), row
        assert all(np.isfinite(row[k]) for k in present)
    w = trainer.args.loss_weights
    for row in logs:  # every micro-batch has every component here: loss == ntp + 5 nip + 5 csr
        total = sum(w[k[5:]] * row[k] for k in present)
        assert row["loss"] == pytest.approx(total, rel=1e-4)
    for key in ["loss", "loss_ntp"] + (["loss_csr"] if stage < 3 else []):
        first, last = _first_last(logs, key)
        assert last < first, (key, first, last)

    # frozen weights did not move, trainable ones did (by component)
    after = _state(model)
    no_loss_path = (
        set()
        if stage == 1
        else {"decoder perceiver", "image decoder"} | ({"UNet side network"} if stage == 3 else set())
    )
    for component, params in model.component_parameters().items():
        moved = [not torch.equal(before[n], after[n]) for n, _ in params]
        if component not in trainable:
            assert not any(moved), component
        elif component not in no_loss_path:  # trainable but without a loss term in this stage (NIP / CSR off)
            assert any(moved), component
    if stage == 3:  # evaluation goes through the same loss (and its fixed diffusion draws)
        metrics = trainer.evaluate(_dataset(model, stage, n=2, seed=5))
        assert np.isfinite(metrics["eval_loss"])


# ----------------------------------------------------------------------------------------------------------- LoRA


def test_lora_stage2_save_load_merge(tmp_path):
    from peft import PeftModel, get_peft_model

    torch.set_num_threads(1)
    config = deem_lora_config(["llm", "encoder_perceiver"], r=4, lora_alpha=8, lora_dropout=0.0)
    model = get_peft_model(tiny_model(), config)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    trainer = DeemTrainer(
        model,
        _args(tmp_path / "run", 2, max_steps=12),
        train_dataset=_dataset(model, 2),
        data_collator=SyntheticCollator(model.config.pad_token_id),
    )
    trainer.train()
    logs = _train_logs(trainer)
    assert all("loss_csr" in r and "loss_ntp" in r and "loss_nip" not in r for r in logs)
    assert _first_last(logs, "loss_ntp", 3)[1] < _first_last(logs, "loss_ntp", 3)[0]
    for n, p in model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base_before[n]), n
    moved = {n.split(".layers.")[0] for n, p in model.named_parameters() if "lora_B" in n and p.abs().sum() > 0}
    assert any("language_model" in n for n in moved) and any(
        "image_encoder.perceiver" in n for n in moved
    )  # CSR reaches the encoder adapters

    adapter_dir = tmp_path / "adapter"
    trainer.save_model(str(adapter_dir))
    assert (adapter_dir / "adapter_model.safetensors").is_file() and not (adapter_dir / "model.safetensors").exists()

    batch = SyntheticCollator(model.config.pad_token_id)([_dataset(model, 2)[i] for i in range(2)])
    batch = {k: v for k, v in batch.items() if k != "labels"}
    model.eval()
    with torch.no_grad():
        trained = model(**batch, return_loss=False).logits
        loaded = PeftModel.from_pretrained(tiny_model(), str(adapter_dir)).eval()
        from_disk = loaded(**batch, return_loss=False).logits
        merged = loaded.merge_and_unload().eval()
        merged_logits = merged(**batch, return_loss=False).logits
    assert torch.allclose(from_disk, trained, atol=1e-6)
    assert torch.allclose(merged_logits, trained, atol=1e-5)
    assert not any("lora_" in n for n, _ in merged.named_parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA (bitsandbytes 4-bit) needs a CUDA GPU")
def test_qlora_recipe(tmp_path):
    pytest.importorskip("bitsandbytes")
    from peft import get_peft_model

    from deem.trainers.trainer import load_for_qlora

    model = tiny_model()
    model.save_pretrained(tmp_path / "base")
    qmodel = get_peft_model(load_for_qlora(str(tmp_path / "base")), deem_lora_config(["llm"], r=4))
    assert any("4bit" in type(m).__name__ for m in qmodel.modules())
    args = _args(tmp_path / "run", 2, max_steps=3, use_cpu=False, bf16=True)
    trainer = DeemTrainer(
        qmodel, args, train_dataset=_dataset(model, 2), data_collator=SyntheticCollator(model.config.pad_token_id)
    )
    trainer.train()
    assert all(np.isfinite(r["loss"]) for r in _train_logs(trainer))


# ------------------------------------------------------------------------------------------------------------ TRL


def _real_tokenizer_setup():
    from tokenizer_utils import build_test_tokenizer

    from deem import DeemForInterleavedGeneration, DeemImageProcessor, DeemProcessor, prepare_tokenizer

    tok = prepare_tokenizer(build_test_tokenizer())
    proc = DeemProcessor(DeemImageProcessor(size=64, decoder_size=32), tok, num_image_tokens=4)
    text = tiny_config().text_config.to_dict()
    text.update(vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    config = tiny_config(
        text_config=text,
        original_vocab_size=tok.vocab_size,
        pad_token_id=tok.pad_token_id,
        soi_token_id=proc.soi_token_id,
        image_token_id=proc.image_token_id,
        ref_start_token_id=proc.ref_start_token_id,
        ref_end_token_id=proc.ref_end_token_id,
        box_start_token_id=proc.box_start_token_id,
        box_end_token_id=proc.box_end_token_id,
    )
    torch.manual_seed(0)
    return DeemForInterleavedGeneration(config), proc


def test_sft_trainer_trl_stage2(tmp_path):
    import datasets
    import PIL.Image

    from deem.trainers.trainer import DeemConversationCollator, DeemSFTConfig, DeemSFTTrainer

    torch.set_num_threads(1)
    model, proc = _real_tokenizer_setup()
    rng = np.random.default_rng(0)
    qa = [
        ("What is the man holding?", "The answer is yes."),
        ("Where is the red car parked?", "a dog is standing near the river."),
    ]
    rows = []
    for i in range(4):
        q, a = qa[i % 2]
        image = PIL.Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
        rows.append(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "Based on the image, please answer the question."},
                            {"type": "image"},
                            {"type": "text", "text": q},
                        ],
                    },
                    {"role": "assistant", "content": [{"type": "text", "text": a}]},
                ],
                "images": [image],
            }
        )
    dataset = datasets.Dataset.from_list(rows)

    # only the assistant answers (and their </s>) are supervised
    batch = DeemConversationCollator(proc, max_length=256)([dataset[0], dataset[1]])
    for i, (_, answer) in enumerate(qa):
        supervised = batch["labels"][i][batch["labels"][i] != -100]
        assert proc.tokenizer.decode(supervised) == answer + "</s>"
    assert batch["pixel_values"].shape == (2, 3, 64, 64) and batch["pixel_values_decoder"].shape == (2, 3, 32, 32)

    args = DeemSFTConfig(
        output_dir=str(tmp_path),
        stage=2,
        learning_rate=1e-2,
        max_steps=16,
        per_device_train_batch_size=2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        seed=0,
        disable_tqdm=True,
        lr_scheduler_type="constant",
        max_length=256,
        log_level="error",
    )
    assert args.loss_weights == {"ntp": 1.0, "nip": 0.0, "csr": 5.0} and args.adam_beta2 == 0.999
    trainer = DeemSFTTrainer(model, args, train_dataset=dataset, processing_class=proc)
    assert not any(p.requires_grad for p in model.image_encoder.backbone.trunk.parameters())  # stage 2 preset
    trainer.train()
    logs = _train_logs(trainer)
    assert all({"loss_ntp", "loss_csr", "mean_token_accuracy"} <= set(r) and "loss_nip" not in r for r in logs)
    first, last = _first_last(logs, "loss_ntp", 4)
    assert last < first


# ------------------------------------------------------------------------------------------------ resume / crash


def _resume_trainer(out, model=None):
    model = model or tiny_model()
    args = _args(
        out,
        1,
        max_steps=6,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=2,
        save_strategy="steps",
        save_steps=2,
        learning_rate=5e-3,
        lr_scheduler_type="cosine",
        warmup_steps=1,
    )
    return DeemTrainer(
        model,
        args,
        train_dataset=_dataset(model, 1, n=6, seed=3),
        data_collator=SyntheticCollator(model.config.pad_token_id),
    )


def test_resume_and_crash_during_save(tmp_path, monkeypatch):
    from transformers.trainer_utils import get_last_checkpoint

    torch.set_num_threads(1)
    full = _resume_trainer(tmp_path / "full")
    full.train()
    assert sorted(p.name for p in (tmp_path / "full").glob("checkpoint-*")) == [
        "checkpoint-2",
        "checkpoint-4",
        "checkpoint-6",
    ]
    assert not (tmp_path / "full" / ".staging").exists()

    # crash half-way through writing checkpoint-4 (model weights already written, RNG states / trainer state not)
    original = DeemTrainer._save_rng_state

    def crash(self, output_dir):
        if self.state.global_step == 4:
            raise RuntimeError("simulated crash during checkpoint save")
        return original(self, output_dir)

    monkeypatch.setattr(DeemTrainer, "_save_rng_state", crash)
    out = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        _resume_trainer(out).train()
    monkeypatch.undo()
    assert (out / ".staging" / "checkpoint-4" / "model.safetensors").is_file()  # the half-written one
    assert not (out / "checkpoint-4").exists()
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-2")

    resumed = _resume_trainer(out)
    resumed.train(resume_from_checkpoint=True)
    a, b = _train_logs(full), _train_logs(resumed)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        for key in ("loss", "loss_ntp", "loss_nip", "loss_csr", "learning_rate"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-6, abs=1e-7), (ra["step"], key)
    wa, wb = _state(full.model), _state(resumed.model)
    assert all(torch.allclose(wa[n], wb[n], atol=1e-7) for n in wa)
    assert not (out / ".staging").exists()


# ------------------------------------------------------------------------------------------- multiple processes


def _run(cmd, cwd, timeout=400):
    proc = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    """accelerate launch, 2 processes (gloo) at batch 2 per process == 1 process at batch 2 x accumulation 2."""
    from deem.trainers.cli import build_trainer, load_config

    sets = ["training.max_steps=4", "training.logging_steps=1", "training.warmup_steps=1"]
    two = tmp_path / "two"
    from conftest import ACCELERATE_TWO_PROCESSES

    cmd = ACCELERATE_TWO_PROCESSES + [
        "-m",
        "deem.trainers",
        "--stage",
        "1",
        "--config",
        "tiny",
        "--output_dir",
        str(two),
    ]
    for s in sets:
        cmd += ["--set", s]
    _run(cmd, cwd=tmp_path)

    torch.set_num_threads(1)
    one = build_trainer(
        load_config("tiny", sets + ["training.gradient_accumulation_steps=2"], stage=1), str(tmp_path / "one")
    )
    one.train()

    logs_two = [r for r in json.loads((two / "trainer_state.json").read_text())["log_history"] if "loss" in r]
    logs_one = _train_logs(one)
    assert [r["epoch"] for r in logs_two] == [0.5, 1.0, 1.5, 2.0]  # 8 samples / (2 processes x 2): really 2 processes
    assert len(logs_one) == len(logs_two) == 4
    for r1, r2 in zip(logs_one, logs_two):
        for key in ("loss", "loss_ntp", "loss_nip", "loss_csr", "grad_norm"):
            assert r2[key] == pytest.approx(r1[key], rel=1e-5, abs=1e-6), (r1["step"], key)
    weights = load_file(two / "model.safetensors")
    for name, p in one.model.named_parameters():
        assert torch.allclose(weights[name].float(), p.detach().float(), atol=1e-5), name


FSDP_SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, StateDictOptions
    from conftest import tiny_model
    from deem.trainers.trainer import (
        DeemTrainingArguments, SyntheticInterleavedDataset, SyntheticCollator, build_param_groups
    )
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = tiny_model().set_training_stage(1).train()
    units = [m for m in model.modules() if type(m).__name__ in set(sys.argv[2].split(","))]
    for unit in units:
        fully_shard(unit)
    fully_shard(model)
    args = DeemTrainingArguments(output_dir=sys.argv[1], stage=1, learning_rate=1.0, use_cpu=True)
    # SGD: Adam would amplify float noise in ~0 gradients
    opt = torch.optim.SGD(build_param_groups(model, args), lr=args.learning_rate)
    data = SyntheticInterleavedDataset(model.config, num_samples=8, seed=0)
    collate = SyntheticCollator(model.config.pad_token_id)
    losses = []
    for step in range(3):
        batch = collate([data[(4 * step + 2 * rank + i) % 8] for i in range(2)])
        out = model(**batch, generator=torch.Generator().manual_seed(100 * step + rank))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save({"units": len(units), "state": state}, sys.argv[1] + "/fsdp.pt")
    torch.save(losses, sys.argv[1] + f"/losses{rank}.pt")
    dist.destroy_process_group()
""")

FSDP_UNITS = (
    "DeemDecoderLayer,DeemPerceiver,DeemDecoderPerceiver,DeemUNetSideNetwork,CrossAttnDownBlock2D,DownBlock2D,"
    "UNetMidBlock2DCrossAttn,"
    "CrossAttnUpBlock2D,UpBlock2D"
)


@pytest.mark.slow
def test_fsdp2_cpu(tmp_path):
    """FSDP2 (torch fully_shard, gloo, 2 CPU processes) with the wrap units of trainers/accelerate/fsdp2.yaml and
    DeemTrainer's optimizer groups (per-group learning rates and weight decay, applied with SGD) == one unsharded
    process averaging the two micro-batches.

    Through the HF Trainer this cannot run on CPU: accelerate 1.15 only turns on FSDP for GPU-type processes
    (AcceleratorState maps a CPU run to MULTI_CPU and ignores the FSDP plugin, falling back to DDP)."""
    import yaml

    wrap = yaml.safe_load((REPO / "trainers" / "accelerate" / "fsdp2.yaml").read_text())["fsdp_config"][
        "fsdp_transformer_layer_cls_to_wrap"
    ]
    assert wrap == FSDP_UNITS
    script = tmp_path / "fsdp_run.py"
    script.write_text(FSDP_SCRIPT)
    _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(script),
            str(tmp_path),
            FSDP_UNITS,
        ],
        cwd=tmp_path,
    )
    result = torch.load(tmp_path / "fsdp.pt", weights_only=False)
    assert result["units"] == 12

    torch.set_num_threads(1)
    model = tiny_model().set_training_stage(1).train()
    args = DeemTrainingArguments(output_dir=str(tmp_path / "ref"), stage=1, learning_rate=1.0, use_cpu=True)
    opt = torch.optim.SGD(
        build_param_groups(model, args), lr=args.learning_rate
    )  # SGD: Adam would amplify float noise in ~0 gradients
    data = SyntheticInterleavedDataset(model.config, num_samples=8, seed=0)
    collate = SyntheticCollator(model.config.pad_token_id)
    for step in range(3):
        losses = []
        for rank in range(2):
            batch = collate([data[(4 * step + 2 * rank + i) % 8] for i in range(2)])
            out = model(**batch, generator=torch.Generator().manual_seed(100 * step + rank))
            (out.loss / 2).backward()
            losses.append(out.loss.item())
        opt.step()
        opt.zero_grad()
        for rank in range(2):
            assert torch.load(tmp_path / f"losses{rank}.pt")[step] == pytest.approx(losses[rank], rel=1e-5)
    for name, p in model.named_parameters():
        assert torch.allclose(result["state"][name].float(), p.detach(), atol=1e-5), name


# ------------------------------------------------------------------------------------------------------------ CLI


def test_cli_tiny_stage3_and_dry_run(tmp_path, capsys):
    from deem.trainers.cli import main

    torch.set_num_threads(1)
    main(["--config", "tiny", "--stage", "3", "--output_dir", str(tmp_path / "run"), "--set", "training.max_steps=2"])
    state = json.loads((tmp_path / "run" / "trainer_state.json").read_text())
    rows = [r for r in state["log_history"] if "loss" in r]
    assert len(rows) == 2 and all("loss_ntp" in r and "loss_csr" not in r for r in rows)
    assert (tmp_path / "run" / "model.safetensors").is_file()

    main(["--config", "tiny", "--stage", "1", "--output_dir", str(tmp_path / "dry"), "--dry_run"])
    plan = capsys.readouterr().out
    assert "1·NTP + 5·NIP + 5·CSR" in plan and "sampling_offsets/no_decay" in plan and "image_encoder_trunk" in plan
    with pytest.raises(ValueError, match="contradicts"):
        main(["--config", "stage1_7b", "--stage", "2", "--dry_run"])


@pytest.mark.parametrize(
    "name,stage,lr,betas,eps,batch,warmup,weights",
    [
        ("stage1_7b", 1, 1e-4, (0.9, 0.995), 1e-6, 4, 1000, {"ntp": 1.0, "nip": 5.0, "csr": 5.0}),
        ("stage2_7b", 2, 1e-5, (0.9, 0.999), 1e-8, 16, 500, {"ntp": 1.0, "nip": 0.0, "csr": 5.0}),
        ("stage3_7b", 3, 1e-5, (0.9, 0.999), 1e-8, 2, 500, {"ntp": 1.0, "nip": 0.0, "csr": 0.0}),
    ],
)
def test_7b_configs_follow_table_12(tmp_path, name, stage, lr, betas, eps, batch, warmup, weights):
    from deem.trainers.cli import load_config

    cfg = load_config(name)
    assert cfg["stage"] == stage
    training = dict(cfg["training"])
    assert training.pop("bf16") is True and training.pop("tf32") is True  # CUDA-only flags: checked, not built here
    training.update(output_dir=str(tmp_path), use_cpu=True, report_to="none", stage=stage)
    args = DeemTrainingArguments(**training)
    assert (args.learning_rate, (args.adam_beta1, args.adam_beta2), args.adam_epsilon) == (lr, betas, eps)
    assert (args.per_device_train_batch_size, args.max_steps, args.warmup_steps, args.weight_decay) == (
        batch,
        10000,
        warmup,
        0.05,
    )
    assert args.lr_scheduler_type == "cosine" and args.activation_checkpointing
    assert args.loss_weights == weights
    rates = args.group_learning_rates()
    if stage == 1:
        assert (rates["image_encoder_trunk"], rates["sampling_offsets"], rates["cross_attn_gate"]) == pytest.approx(
            (2e-5, 1e-5, 1e-4)
        )
    else:
        assert (rates["llm"], rates["cross_attn"], rates["default"]) == pytest.approx((1e-6, 5e-6, 1e-5))
    assert cfg["data"]["sources"] and all(
        s["type"] in ("mmc4", "pairs", "llava", "referring") for s in cfg["data"]["sources"].values()
    )


def test_cli_stage2_llava_data(tmp_path):
    """The CLI on real files: a saved tiny model + processor, LLaVA JSON + PNG images through deem.trainers.data
    (read_llava, DeemDataCollator), stage 2 (NTP + 5·CSR), then a resume from its checkpoint."""
    import PIL.Image
    import yaml

    from deem.trainers.cli import main

    torch.set_num_threads(1)
    model, proc = _real_tokenizer_setup()
    model.save_pretrained(tmp_path / "model")
    proc.save_pretrained(tmp_path / "model")
    (tmp_path / "images").mkdir()
    rng = np.random.default_rng(0)
    records = []
    for i, (q, a) in enumerate(
        [("What is the man holding?", "a red bus"), ("Where is the red car parked?", "the river")] * 2
    ):
        PIL.Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{i}.png")
        records.append(
            {
                "id": str(i),
                "image": f"{i}.png",
                "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}],
            }
        )
    (tmp_path / "llava.json").write_text(json.dumps(records))
    cfg = {
        "stage": 2,
        "model": {"path": str(tmp_path / "model")},
        "data": {
            "sources": {
                "llava": {
                    "type": "llava",
                    "path": str(tmp_path / "llava.json"),
                    "images": str(tmp_path / "images"),
                    "kwargs": {"use_datasets": False},
                }
            },
            "collator": {"max_length": 256, "train_transforms": False},
        },
        "training": {
            "max_steps": 4,
            "per_device_train_batch_size": 2,
            "learning_rate": 1e-2,
            "logging_steps": 1,
            "save_steps": 2,
            "report_to": "none",
            "use_cpu": True,
            "disable_tqdm": True,
            "seed": 0,
        },
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    main(["--config", str(tmp_path / "cfg.yaml"), "--output_dir", str(out)])
    rows = [r for r in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in r]
    assert len(rows) == 4 and all({"loss_ntp", "loss_csr"} <= set(r) and "loss_nip" not in r for r in rows)
    assert (
        (out / "checkpoint-2").is_dir() and (out / "checkpoint-4").is_dir() and (out / "processor_config.json").exists()
    )
    # more steps from the last checkpoint: the resumed run picks up at step 4
    main(
        [
            "--config",
            str(tmp_path / "cfg.yaml"),
            "--output_dir",
            str(out),
            "--resume_from_checkpoint",
            "--set",
            "training.max_steps=6",
        ]
    )
    steps = [r["step"] for r in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
