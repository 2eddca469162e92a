"""Transformers integration: save_pretrained / Auto classes with trust_remote_code in a fresh process, shards,
bf16, device_map, and clear errors for weights that do not fit the config."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import tiny_batch, tiny_model
from safetensors.torch import load_file, save_file
from tokenizer_utils import build_test_tokenizer


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from deem import DeemImageProcessor, DeemProcessor, prepare_tokenizer

    model = tiny_model(seed=7)
    tokenizer = prepare_tokenizer(build_test_tokenizer())
    processor = DeemProcessor(
        DeemImageProcessor(size=64, decoder_size=32), tokenizer, num_image_tokens=model.config.num_image_tokens
    )
    path = tmp_path_factory.mktemp("deem_tiny")
    model.save_pretrained(path, max_shard_size="300KB")
    processor.save_pretrained(path)
    batch = tiny_batch(model.config, seed=1)
    with torch.no_grad():
        logits = model(**batch, return_loss=False).logits
    torch.save({"batch": batch, "logits": logits}, path / "reference.pt")
    return path, model


def test_save_writes_shards_modeling_files_and_auto_map(saved):
    path, model = saved
    config = json.loads((path / "config.json").read_text())
    assert config["auto_map"]["AutoConfig"] == "configuration_deem.DeemConfig"
    assert config["auto_map"]["AutoModel"] == "modeling_deem.DeemForInterleavedGeneration"
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_deem.DeemForInterleavedGeneration"
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (path / "model.safetensors.index.json").exists()
    for name in (
        "modeling_deem.py",
        "configuration_deem.py",
        "vision.py",
        "mmfs.py",
        "pos_embed.py",
        "processing_deem.py",
        "image_processing_deem.py",
    ):
        assert (path / name).exists(), name
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(model.state_dict())
    processor_config = json.loads((path / "processor_config.json").read_text())
    assert processor_config["auto_map"]["AutoProcessor"].endswith("DeemProcessor")


FRESH = textwrap.dedent(
    """
    import sys, json, torch
    torch.set_num_threads(int(sys.argv[2]))  # the parent's, so that the float reductions split the same way
    sys.modules["deem"] = None  # the saved modeling files must not need this repository's package
    from transformers import AutoConfig, AutoModel, AutoProcessor
    path = sys.argv[1]
    ref = torch.load(path + "/reference.pt")
    config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    model = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    with torch.no_grad():
        logits = model(**ref["batch"], return_loss=False).logits
    out = {"config": type(config).__name__, "model": type(model).__name__, "processor": type(processor).__name__,
           "equal": bool(torch.equal(logits, ref["logits"])), "image_tokens": processor.num_image_tokens}
    bf16 = AutoModel.from_pretrained(path, trust_remote_code=True, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        b = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in ref["batch"].items()}
        lb = bf16(**b, return_loss=False).logits
    out["bf16_dtype"] = str(bf16.language_model.embed_tokens.weight.dtype)
    out["vae_dtype"] = str(bf16.vae.dtype)
    out["bf16_close"] = float((lb.float() - ref["logits"]).abs().max() / ref["logits"].abs().max())
    placed = AutoModel.from_pretrained(path, trust_remote_code=True, device_map="auto").eval()
    with torch.no_grad():
        out["device_map_equal"] = bool(torch.equal(placed(**ref["batch"], return_loss=False).logits, ref["logits"]))
    print("RESULT" + json.dumps(out))
    """
)


def test_fresh_process_auto_classes_reproduce_logits(saved):
    path, _ = saved
    threads = str(torch.get_num_threads())
    proc = subprocess.run(
        [sys.executable, "-c", FRESH, str(path), threads], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    out = json.loads(line[len("RESULT") :])
    assert (
        out["config"] == "DeemConfig"
        and out["model"] == "DeemForInterleavedGeneration"
        and out["processor"] == "DeemProcessor"
    )
    assert out["equal"], "fresh-process logits differ from the saving process"
    assert out["image_tokens"] == 4
    assert out["bf16_dtype"] == "torch.bfloat16" and out["vae_dtype"] == "torch.float32"
    assert out["bf16_close"] < 0.05
    assert out["device_map_equal"]


def test_in_process_round_trip_is_exact(saved):
    from deem import DeemForInterleavedGeneration

    path, model = saved
    loaded = DeemForInterleavedGeneration.from_pretrained(path).eval()
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_loading_weights_that_do_not_fit_the_config_names_the_keys(saved, tmp_path):
    """strict=True names every key that does not fit; its advice works when followed; the default follows the
    library's contract (missing weights initialised and reported)."""
    from deem import DeemForInterleavedGeneration

    path, model = saved
    bad = tmp_path / "bad"
    model.save_pretrained(bad)
    weights = load_file(bad / "model.safetensors")
    del weights["model.soi_embedding"]
    weights["lm_head.new_tokens.weight"] = torch.zeros(3, 3)
    weights["not_a_deem_key"] = torch.zeros(1)
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError) as err:
        DeemForInterleavedGeneration.from_pretrained(bad, strict=True)
    message = str(err.value)
    assert "model.soi_embedding" in message and "lm_head.new_tokens.weight" in message and "not_a_deem_key" in message
    assert "strict=False, ignore_mismatched_sizes=True" in message
    loaded, info = DeemForInterleavedGeneration.from_pretrained(
        bad, strict=False, ignore_mismatched_sizes=True, output_loading_info=True
    )
    assert "model.soi_embedding" in info["missing_keys"] and "not_a_deem_key" in info["unexpected_keys"]
    assert any(k[0] == "lm_head.new_tokens.weight" for k in info["mismatched_keys"])
    assert torch.all(loaded.model.soi_embedding == 0)  # initialised as the original does
    # without the mismatch the default load needs no option
    del weights["lm_head.new_tokens.weight"], weights["not_a_deem_key"]
    weights["lm_head.new_tokens.weight"] = model.lm_head.new_tokens.weight.detach().clone()
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    loaded, info = DeemForInterleavedGeneration.from_pretrained(bad, output_loading_info=True)
    assert info["missing_keys"] == {"model.soi_embedding"} or list(info["missing_keys"]) == ["model.soi_embedding"]


def test_checkpoints_from_before_the_split_still_load(saved, tmp_path):
    from deem import DeemForInterleavedGeneration
    from deem.modeling.modeling_deem import current_to_legacy_keys

    path, model = saved
    old = tmp_path / "old"
    model.save_pretrained(old)
    weights = current_to_legacy_keys(load_file(old / "model.safetensors"))
    assert (
        "image_encoder.perceiver.queries" in weights and "unet.conv_in.weight" in weights and "soi_embedding" in weights
    )
    save_file(weights, old / "model.safetensors", metadata={"format": "pt"})
    loaded = DeemForInterleavedGeneration.from_pretrained(old, strict=True)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name


def test_checkpoints_with_the_null_condition_on_the_image_decoder_still_load(saved, tmp_path):
    """Between the split and the pipeline rework the null condition was ``image_decoder.null_condition``."""
    from deem import DeemForInterleavedGeneration

    path, model = saved
    old = tmp_path / "mid"
    model.save_pretrained(old)
    weights = load_file(old / "model.safetensors")
    weights["image_decoder.null_condition"] = weights.pop("image_decoder.decoder_perceiver.null_condition")
    save_file(weights, old / "model.safetensors", metadata={"format": "pt"})
    loaded = DeemForInterleavedGeneration.from_pretrained(old, strict=True)
    assert torch.equal(loaded.image_decoder.null_condition, model.image_decoder.null_condition)
