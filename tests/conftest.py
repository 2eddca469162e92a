"""Shared test fixtures: tiny configs and models built in-process (no downloads)."""

import os
import sys
from pathlib import Path

import pytest
import torch

THREADS = max(1, min(2, os.cpu_count() or 1))
torch.set_num_threads(THREADS)


@pytest.fixture(autouse=True)
def _restore_threads():
    """Every test starts with the same thread count (some pin one thread for exact comparisons), so results that
    depend on how float reductions are split never depend on the order tests ran in."""
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(THREADS)


REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("DEEM_FIXTURES", REPO.parent / "shared" / "fixtures"))


# accelerate's own launcher with two real processes; on CPU it needs --multi_gpu to use torch.distributed (gloo),
# plain --cpu --num_processes 2 goes to its MPI launcher and starts one process
ACCELERATE_TWO_PROCESSES = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--multi_gpu",
    "--num_processes",
    "2",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
]


def write_original_configs(parity_a_dir: Path, root: Path) -> dict:
    """Fixture A's configs as a user has them next to an original checkpoint: the YAML's model section
    (``pretrain.yaml``), a LLaMA dir (``llm/config.json``) and an SD dir (unet / vae / scheduler configs)."""
    import json

    import yaml

    configs = json.loads((parity_a_dir / "configs.json").read_text())
    (root / "pretrain.yaml").write_text(yaml.safe_dump({"model": configs["model_config"]}))
    (root / "llm").mkdir()
    (root / "llm" / "config.json").write_text(json.dumps(configs["llama_config"]))
    sd = configs["stable_diffusion"]
    for sub, name in (("unet", "config.json"), ("vae", "config.json"), ("scheduler", "scheduler_config.json")):
        (root / "sd" / sub).mkdir(parents=True)
        (root / "sd" / sub / name).write_text(json.dumps(sd[f"{sub}/{name}"]))
    return configs


@pytest.fixture(scope="session")
def parity_a_dir():
    path = FIXTURES / "parity_a"
    if not path.is_dir():  # a missing fixture is a failure, never a skip
        pytest.fail(f"parity fixture not found at {path} (set DEEM_FIXTURES to the folder holding parity_a)")
    return path


def tiny_config(**overrides):
    from deem import DeemConfig

    return DeemConfig.tiny(**overrides)


def tiny_model(seed: int = 0, **overrides):
    from deem import DeemForInterleavedGeneration
    from deem.trainers.cli import visible_init

    torch.manual_seed(seed)
    model = DeemForInterleavedGeneration(tiny_config(**overrides))
    visible_init(model)  # non-zero gates, soi vector and side-network weights so every path is visible
    return model.eval()


def tiny_batch(config, seed: int = 0, rows=((2, 1)), pad_side="right"):
    """Two rows: row 0 = <s> t t <soi><img>*Q t t <soi><img>*Q t </s>; row 1 = <s><soi><img>*Q t t t </s> + pads."""
    g = torch.Generator().manual_seed(seed)
    q, soi, img = config.num_image_tokens, config.soi_token_id, config.image_token_id
    bos, eos, pad = config.bos_token_id, config.eos_token_id, config.pad_token_id

    def text(n):
        return torch.randint(3, config.original_vocab_size - 2, (n,), generator=g).tolist()

    row0 = [bos] + text(2) + [soi] + [img] * q + text(2) + [soi] + [img] * q + text(1) + [eos]
    row1 = [bos, soi] + [img] * q + text(3) + [eos]
    length = max(len(row0), len(row1))
    ids, mask = [], []
    for row in (row0, row1):
        n_pad = length - len(row)
        if pad_side == "right":
            ids.append(row + [pad] * n_pad)
            mask.append([1] * len(row) + [0] * n_pad)
        else:
            ids.append([pad] * n_pad + row)
            mask.append([0] * n_pad + [1] * len(row))
    vis = config.vision_config.image_size
    dec = config.diffusion_config.image_size if config.diffusion_config is not None else None
    batch = {
        "input_ids": torch.tensor(ids),
        "attention_mask": torch.tensor(mask),
        "pixel_values": torch.rand(3, 3, vis, vis, generator=g),
        "num_images": torch.tensor([2, 1]),
    }
    if dec is not None:
        batch["pixel_values_decoder"] = torch.rand(3, 3, dec, dec, generator=g)
    return batch
