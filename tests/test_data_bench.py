"""The data-throughput benchmark (`python -m deem.bench.data`) runs end to end on a tiny fixture and reports what
its note quotes: samples/s per worker count, and the tokenizer calls of reader -> packed rows (one per 64 docs)."""

import json
import math

from deem.bench import data as bench


def test_data_benchmark_runs_and_counts_tokenizer_calls(tmp_path):
    result = bench.run(
        24, 24, (0,), max_length=256, batch_size=2, image_size=32, encoder_size=32, decoder_size=32, root=tmp_path
    )
    (row,) = result["results"]
    assert row["workers"] == 0 and row["rows"] > 0 and row["images"] > 0 and row["source_samples_per_s"] > 0
    assert row["tokens"] <= row["rows"] * 256
    pack = result["pack_only"]
    assert pack["rows"] == row["rows"]  # the same rows with and without the collator
    # tokenised once: one batched call per 64 usable documents per source (MMC4 drops some single-image documents)
    assert 2 <= pack["tokenizer_calls"] <= 2 * math.ceil(24 / 64)
    assert pack["tokenizer_texts"] <= 24 * 12 + 24  # at most one piece per sentence / caption
    json.dumps(result)


def test_data_benchmark_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = ["--docs", "8", "--pairs", "8", "--workers", "0", "--max-length", "256", "--out", str(out)]
    assert bench.main([*argv, "--encoder-size", "32", "--decoder-size", "32", "--image-size", "32"]) == 0
    assert json.loads(out.read_text())["n_docs"] == 8 and "source samples/s" in capsys.readouterr().out
