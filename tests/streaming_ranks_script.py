"""Run under 2 processes: DeemTrainer over a streaming pairs reader; every rank writes the captions it trained on."""

import json
import sys

import torch

from deem.trainers import DeemTrainer
from deem.trainers.data import DeemDataCollator, read_pairs

# isort: split
# the test helpers after the package (this order is what the two-process run was verified with)
from test_trainer import _args, _real_tokenizer_setup

out, shards = sys.argv[1], sys.argv[2:]
model, processor = _real_tokenizer_setup()
collator = DeemDataCollator(processor, max_length=256, train_transforms=False, on_error="raise")
seen = []


def collate(samples):
    seen.extend(seg["text"] for s in samples for seg in s["segments"])
    return collator(samples)


dataset = read_pairs(shards, text_drop_prob=0.0, shuffle=False)
trainer = DeemTrainer(
    model,
    _args(out, 3, max_steps=2, per_device_train_batch_size=2, save_strategy="no"),
    train_dataset=dataset,
    data_collator=collate,
)
trainer.train()
rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
with open(f"{out}/seen{rank}.json", "w") as f:
    json.dump(seen, f)
