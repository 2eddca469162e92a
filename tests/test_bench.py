"""deem.bench: every benchmark runs once at its smallest size and reports the issue's rows; the GPU script runs on
CPU at the tiny size; the memory child reports peak RSS; the fast paths it measures equal the slow ones."""

import json
import math
import subprocess
import sys

import pytest
import torch


@pytest.fixture(scope="module")
def smoke():
    from deem.bench.suite import run_suite

    return run_suite(("pipeline", "train", "decode", "interleaved"), ("tiny",), rounds=1, threads=1, smoke=True)


def test_every_row_of_the_table_is_reported(smoke, tmp_path):
    from deem.bench.suite import NOT_MEASURABLE, to_markdown, write_reports

    measures = [r["measure"] for r in smoke["rows"]]
    for needle in (
        "side network removed / diffusers StableDiffusionPipeline",
        "no previous image / side network removed",
        "with a previous image / stock",
        "full / without CSR",
        "stage-1 step, ours / the original's",
        "text-only step, ours / the original's",
        "with the prompt's images",
        "LlamaForCausalLM.generate",
        "interleaved generate(soi='draw')",
    ):
        assert sum(needle in m for m in measures) == 1, needle
    for r in smoke["rows"]:
        if r["reference"] == NOT_MEASURABLE:
            assert r["stats"] is None
        else:
            s = r["stats"]
            assert s["rounds"] == 1 and math.isfinite(s["median"]) and s["median"] > 0
            assert s["min"] <= s["median"] <= s["max"]
    env = smoke["environment"]
    assert env["threads"] == 1 and len(env["load_1m_5m_15m"]) == 3
    json_path, md_path = write_reports(smoke, tmp_path / "out")
    assert json.loads(json_path.read_text())["rows"] == json.loads(json.dumps(smoke["rows"]))
    md = md_path.read_text()
    assert md == to_markdown(smoke) and md.count("\n| ") == len(smoke["rows"]) + 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["bench.json", "bench.md"]  # no temp files left


def test_memory_child_reports_peak_rss():
    from deem.bench.suite import _memory_child

    r = _memory_child("tiny", "no_csr", 1)
    assert r["variant"] == "no_csr" and r["peak_rss_mib"] > 10 and r["before_step_mib"] > 10
    assert r["step_mib"] >= 0 and isinstance(r["step_peak_measured"], bool)


def test_llama_on_the_same_weights_computes_our_logits():
    """The stock path of the decode benchmark holds our weights: without image inputs (and with the head's zero
    bias on the original vocabulary) LlamaForCausalLM gives our logits there."""
    from deem.bench.suite import build_model, llama_on_same_weights

    model = build_model("tiny")
    with torch.no_grad():
        model.lm_head.base.bias.zero_()
    llama = llama_on_same_weights(model)
    cfg = model.config
    ids = torch.randint(3, cfg.original_vocab_size - 2, (2, 6), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = cfg.bos_token_id
    with torch.no_grad():
        ours = model(input_ids=ids, return_loss=False).logits[..., : cfg.original_vocab_size]
        ref = llama(input_ids=ids).logits[..., : cfg.original_vocab_size]
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_gpu_script_runs_on_cpu_at_tiny_size():
    from deem.bench.gpu import run, to_markdown

    result = run(size="tiny", device="cpu", batch=1, steps=1, new_tokens=2, repeats=1)
    names = [m for m, _ in result["rows"]]
    assert len(names) == 6 and any("without CSR" in n for n in names) and any("tok/s" in v for _, v in result["rows"])
    assert result["parameters"] > 0 and "| measure | value |" in to_markdown(result)


def test_cli_bench_rejects_bad_arguments():
    for bad in (["--sizes", "huge"], ["--benchmarks", "pipeline,nope"], ["--rounds", "0"]):
        done = subprocess.run(
            [sys.executable, "-m", "deem", "bench", *bad], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 2 and done.stderr.startswith("deem bench: error:") and not done.stdout
