"""Each stage trains a tiny model for 30 steps with DeemTrainer on data written in the real formats and read by
deem.trainers.data: stage 1 on MMC4 (jsonl + image folder) mixed 2:1 with webdataset pair tars, stage 2 on LLaVA
JSON, stage 3 on COCO referring data (RLE + polygon masks)."""

import itertools
import json

import numpy as np
import pytest
import torch
from test_data import image_bytes, mmc4_doc, write_coco, write_jsonl, write_pair_tars
from test_trainer import _args, _first_last, _real_tokenizer_setup, _train_logs


def _materialise(dataset, n):
    """A fixed list of samples from a (streaming) reader: the Trainer then shuffles and resumes it as usual."""
    samples = list(itertools.islice(iter(dataset), n))
    assert len(samples) == n, f"the reader gave only {len(samples)} samples"
    return samples


def _stage1_data(tmp_path):
    from deem.trainers.data import MixedDataset, read_mmc4, read_pairs

    (tmp_path / "mmc4_images").mkdir()
    docs = []
    for d in range(6):
        names = [f"doc{d}_img{i}.jpg" for i in range(2)]
        for i, name in enumerate(names):
            (tmp_path / "mmc4_images" / name).write_bytes(image_bytes(40, 40, (40 * d, 100 + 50 * i, 30)))
        docs.append(mmc4_doc(4, [(names[0], 0, 0.3), (names[1], 2, 0.3)]))
    mmc4 = read_mmc4(
        write_jsonl(tmp_path / "docs.jsonl", docs), tmp_path / "mmc4_images", single_image_drop_prob=0.0, seed=1
    )
    (tmp_path / "pairs").mkdir()
    pairs = read_pairs(write_pair_tars(tmp_path / "pairs", 2, 4), text_drop_prob=0.0, seed=2)
    return _materialise(MixedDataset({"mmc4": mmc4, "pairs": pairs}, seed=3, stopping="cycle"), 12)


def _stage2_data(tmp_path):
    from deem.trainers.data import read_llava

    (tmp_path / "llava_images").mkdir()
    records = []
    qa = [
        ("What is the man holding?", "A red cup."),
        ("Where is the car parked?", "On the street."),
        ("What color is the sky?", "Blue."),
    ]
    for i, (q, a) in enumerate(qa * 2):
        (tmp_path / "llava_images" / f"{i}.jpg").write_bytes(image_bytes(48, 40, (60 * i % 256, 90, 200)))
        records.append(
            {
                "id": str(i),
                "image": f"{i}.jpg",
                "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}],
            }
        )
    (tmp_path / "llava.json").write_text(json.dumps(records))
    return list(read_llava(tmp_path / "llava.json", tmp_path / "llava_images", use_datasets=False))


def _stage3_data(tmp_path):
    from deem.trainers.data import read_referring

    path, _ = write_coco(tmp_path, width=32, height=24)
    return list(read_referring(path, tmp_path / "imgs"))


@pytest.mark.parametrize("stage, build", [(1, _stage1_data), (2, _stage2_data), (3, _stage3_data)])
def test_stage_trains_on_real_format_data(tmp_path, stage, build):
    from deem.modeling.modeling_deem import STAGE_TRAINABLE
    from deem.trainers import DeemTrainer
    from deem.trainers.data import DeemDataCollator

    torch.set_num_threads(1)
    model, processor = _real_tokenizer_setup()
    samples = build(tmp_path)
    if stage == 1:
        assert {s["source"] for s in samples} == {"mmc4", "pairs"}
    if stage == 3:
        assert all(s["image_masks"] is not None for s in samples)
    collator = DeemDataCollator(processor, max_length=256, train_transforms=stage == 1, seed=0, on_error="raise")
    trainer = DeemTrainer(model, _args(tmp_path / "out", stage), train_dataset=samples, data_collator=collator)
    for component, params in model.component_parameters().items():
        assert all(p.requires_grad == (component in STAGE_TRAINABLE[stage]) for _, p in params), component
    trainer.train()
    logs = _train_logs(trainer)
    assert len(logs) == 30
    present = {"loss_ntp"} | ({"loss_csr"} if stage < 3 else set())
    for row in logs:
        assert present <= set(row) and all(np.isfinite(row[k]) for k in present), row
        assert stage == 1 or "loss_nip" not in row
    if stage == 1:
        assert any("loss_nip" in row for row in logs)  # images after text in MMC4 documents get NIP
    first, last = _first_last(logs, "loss_ntp")
    assert last < first, (first, last)


@pytest.mark.slow
def test_streaming_reader_under_two_processes_reads_each_sample_once(tmp_path):
    """2 processes x batch 2 x 2 steps over 8 streamed pairs: the ranks together train on every pair exactly once
    (the Trainer's own loader: accelerate gives each process one of the reader's 2 tar shards, no dispatch)."""
    import os
    import subprocess
    from pathlib import Path

    (tmp_path / "pairs").mkdir()
    shards = write_pair_tars(tmp_path / "pairs", 2, 4)
    here = Path(__file__).parent
    from conftest import ACCELERATE_TWO_PROCESSES

    cmd = ACCELERATE_TWO_PROCESSES + [
        str(here / "streaming_ranks_script.py"),
        str(tmp_path / "out"),
        *shards,
    ]
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(here), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1"
    )
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    seen = [json.loads((tmp_path / "out" / f"seen{r}.json").read_text()) for r in (0, 1)]
    captions = lambda texts: sorted(t for t in texts if "caption number" in t)  # noqa: E731
    assert len(captions(seen[0])) == len(captions(seen[1])) == 4
    assert not set(captions(seen[0])) & set(captions(seen[1]))
    assert len(captions(seen[0] + seen[1])) == 8


def test_streaming_reader_through_the_trainers_own_loader(tmp_path):
    """No loader override: the Trainer's `get_train_dataloader` (accelerate) reads a streaming reader, with
    ``dispatch_batches`` off unless the arguments ask for it."""
    from transformers import Trainer

    from deem.trainers import DeemTrainer
    from deem.trainers.data import DeemDataCollator, read_pairs

    assert DeemTrainer.get_train_dataloader is Trainer.get_train_dataloader
    model, processor = _real_tokenizer_setup()
    (tmp_path / "pairs").mkdir()
    shards = write_pair_tars(tmp_path / "pairs", 2, 3)
    collator = DeemDataCollator(processor, max_length=256, train_transforms=False)
    dataset = read_pairs(shards, text_drop_prob=0.0, seed=0)
    trainer = DeemTrainer(model, _args(tmp_path / "out", 1, max_steps=2), train_dataset=dataset, data_collator=collator)
    assert trainer.accelerator.dispatch_batches is False and trainer.train_dataset is dataset
    batches = list(trainer.get_train_dataloader())
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 2]
    asked = _args(tmp_path / "out2", 1, max_steps=2, accelerator_config={"dispatch_batches": True})
    trainer = DeemTrainer(model, asked, train_dataset=dataset, data_collator=collator)
    assert trainer.accelerator.dispatch_batches is True
