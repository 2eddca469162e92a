"""The `deem` command line on good input: help without heavy imports, exit statuses and one-line errors from the
real entry point, --debug tracebacks, `deem train` (where it writes, a processor that AutoProcessor loads, cleanup
after a failure) and `deem convert` taking the encoder resolution from the original's YAML."""

import json
import os
import subprocess
import sys
import time

import pytest
import yaml
from conftest import REPO

from deem.cli import main

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
HEAVY = ("torch", "transformers", "diffusers", "safetensors", "timm", "open_clip", "huggingface_hub")


def _mode_defaults():
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask, 0o666 & ~mask


# ------------------------------------------------------------------------------------------------- help, imports

HELP_SCRIPT = """
import json, sys, time
start = time.perf_counter()
import deem
from deem.cli import main
helps = {}
for argv in (["--help"], ["demo", "--help"], ["params", "--help"], ["assemble", "--help"], ["convert", "--help"],
             ["train", "--help"]):
    try:
        main(argv)
    except SystemExit as exit:
        helps[" ".join(argv)] = exit.code
try:
    main(["convert", "--checkpoint", "x"])
except SystemExit as exit:
    helps["usage error"] = exit.code
seconds = time.perf_counter() - start
heavy = sorted(m for m in %r if m in sys.modules)
print("RESULT" + json.dumps({"helps": helps, "heavy": heavy, "seconds": seconds, "names": sorted(deem.__all__)}))
""" % (HEAVY,)


def test_help_answers_at_once_without_importing_torch():
    """`deem --help`, every `deem <command> --help` and a usage error in a fresh process: torch, transformers and the
    other heavy libraries are never imported (the public names of `deem` load lazily)."""
    proc = subprocess.run(
        [sys.executable, "-c", HELP_SCRIPT], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT"))[6:])
    assert result["heavy"] == [], result
    assert result["helps"] == {
        "--help": 0,
        "demo --help": 0,
        "params --help": 0,
        "assemble --help": 0,
        "convert --help": 0,
        "train --help": 0,
        "usage error": 2,
    }
    assert "DeemForInterleavedGeneration" in result["names"] and "DeemProcessor" in result["names"]
    assert "--image-size" in proc.stdout and "--resume_from_checkpoint" in proc.stdout and "--overwrite" in proc.stdout
    assert result["seconds"] < 5, result  # well under a second on an idle machine; no torch import (~4 s) in it


def test_entry_point_help_is_fast_and_imports_no_torch():
    """`python -X importtime -m deem --help`: what the process imports, and how long it takes."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "deem", "--help"],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    seconds = time.perf_counter() - start
    assert proc.returncode == 0 and proc.stdout.startswith("usage: deem"), proc.stderr[-2000:]
    imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if "|" in line}
    assert "deem" in imported and not imported & set(HEAVY), sorted(imported & set(HEAVY))
    assert seconds < 5, seconds


def test_entry_point_exit_status_and_one_line_errors(tmp_path):
    """The real `python -m deem` process: a usage error exits 2, a failure 1, each with one line on stderr."""
    usage = subprocess.run(
        [sys.executable, "-m", "deem", "train", "--stage", "7"], cwd=tmp_path, env=ENV, capture_output=True, text=True
    )
    assert usage.returncode == 2
    assert usage.stderr.splitlines() == [
        "deem train: error: argument --stage: invalid choice: 7 (choose from 1, 2, 3) (see 'deem train --help')"
    ]
    failure = subprocess.run(
        [sys.executable, "-m", "deem", "train", "--config", "nope.yaml", "--stage", "1"],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert failure.returncode == 1, failure.stderr[-2000:]
    lines = failure.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("deem train: error: --config nope.yaml: no such file"), lines
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------- errors, --debug


def test_debug_prints_the_traceback_then_the_line(tmp_path, capsys):
    missing = str(tmp_path / "missing.yaml")
    for argv in (["--debug", "train", "--config", missing, "--stage", "1"], ["train", "--config", missing, "--debug"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 1
        err = capsys.readouterr().err.splitlines()
        assert err[0] == "Traceback (most recent call last):" and any("resolve_config_path" in line for line in err)
        assert err[-1].startswith(f"deem train: error: --config {missing}: no such file"), err[-1]
    with pytest.raises(SystemExit):
        main(["train", "--config", missing, "--stage", "1"])
    assert "Traceback" not in capsys.readouterr().err


def test_unexpected_errors_are_one_line_naming_their_type(monkeypatch, capsys):
    import deem.cli

    def broken(args):
        raise RuntimeError("the kernel said no\nsecond line")

    monkeypatch.setitem(deem.cli.COMMANDS, "demo", broken)
    with pytest.raises(SystemExit) as exit_info:
        main(["demo"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.splitlines() == [
        "deem demo: error: RuntimeError: the kernel said no second line (run with --debug for the traceback)"
    ]
    monkeypatch.setitem(deem.cli.COMMANDS, "world", broken)
    with pytest.raises(SystemExit):
        main([])  # plain `deem` is the main command, `deem world`
    assert capsys.readouterr().err.startswith("deem world: error: RuntimeError: the kernel said no")


def test_main_command_options_without_the_command_name(monkeypatch, capsys):
    """`python -m deem --out DIR --quick --seed 3` is `deem world --out DIR --quick --seed 3` (the issue's main command
    takes its options bare); a first word that is no command is still named as one."""
    import deem.cli

    seen = []
    monkeypatch.setitem(deem.cli.COMMANDS, "world", lambda args: seen.append(args))
    assert main(["--out", "some/dir", "--quick", "--seed", "3"]) == 0
    assert seen[-1].command == "world" and str(seen[-1].out) == "some/dir" and seen[-1].quick and seen[-1].seed == 3
    assert main(["--debug", "--quick"]) == 0 and seen[-1].command == "world" and seen[-1].debug
    assert main(["--out=other", "--device", "cpu"]) == 0 and str(seen[-1].out) == "other"
    with pytest.raises(SystemExit) as exit_info:
        main(["--quick", "--bogus"])
    assert exit_info.value.code == 2 and "deem world: error: unrecognized arguments: --bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # an option the main command does not have is the top level's error
        main(["--colour"])
    assert exit_info.value.code == 2 and capsys.readouterr().err.startswith("deem: error: unrecognized arguments")
    with pytest.raises(SystemExit) as exit_info:
        main(["nonsense", "--quick"])
    assert exit_info.value.code == 2 and "invalid choice: 'nonsense'" in capsys.readouterr().err


def test_public_names_load_lazily_and_keep_the_card_hook():
    import deem
    from deem.hub import write_model_card

    for name in deem.__all__:
        assert getattr(deem, name) is not None and name in dir(deem)
    assert deem.DeemForInterleavedGeneration.model_card_writer is write_model_card
    with pytest.raises(AttributeError, match="has no attribute 'DeemTokenizer'"):
        deem.DeemTokenizer  # noqa: B018


# ------------------------------------------------------------------------------------------------------- train


def _train(tmp_path, out, *extra):
    return main(
        ["train", "--config", "tiny", "--stage", "1", "--output_dir", str(out), "--set", "training.max_steps=1", *extra]
    )


def test_train_prints_its_folder_and_saves_a_processor_that_auto_processor_loads(tmp_path, capsys):
    from transformers import AutoConfig, AutoProcessor

    out = tmp_path / "run"
    assert _train(tmp_path, out) == 0
    printed = capsys.readouterr().out
    assert f"deem train: stage 1, writing to {out.resolve()}" in printed
    assert f"deem train: saved the model and processor to {out.resolve()}" in printed
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    config = AutoConfig.from_pretrained(out, trust_remote_code=True)
    assert type(processor).__name__ == "DeemProcessor"
    assert processor.num_image_tokens == config.num_image_tokens
    assert (processor.soi_token_id, processor.image_token_id) == (config.soi_token_id, config.image_token_id)
    assert processor.image_processor.size == config.vision_config.image_size
    assert len(processor.tokenizer) == config.text_config.vocab_size
    ids = processor.tokenizer("A cat, 3 dogs; é!").input_ids
    assert ids[0] == config.bos_token_id and processor.tokenizer.unk_token_id in ids  # é is <unk>, never dropped
    assert max(ids) < config.original_vocab_size
    dir_mode, file_mode = _mode_defaults()
    assert out.stat().st_mode & 0o777 == dir_mode
    assert (out / "model.safetensors").stat().st_mode & 0o777 == file_mode  # safetensors writes 0600


def test_failed_train_removes_the_folder_it_created(tmp_path, monkeypatch, capsys):
    from deem.trainers.trainer import DeemTrainer

    def crash(self, **kwargs):
        os.makedirs(self.args.output_dir, exist_ok=True)
        open(os.path.join(self.args.output_dir, "events.log"), "w").close()
        raise RuntimeError("out of memory")

    monkeypatch.setattr(DeemTrainer, "train", crash)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        _train(tmp_path, out)
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.splitlines() == [
        "deem train: error: RuntimeError: out of memory (run with --debug for the traceback)"
    ]
    assert not out.exists()

    # a folder that was there before the run is the user's: never removed
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        _train(tmp_path, out)
    assert sorted(p.name for p in out.iterdir()) == ["events.log", "notes.txt"]
    capsys.readouterr()

    # a run that saved a checkpoint keeps it, and says so
    def crash_after_a_checkpoint(self, **kwargs):
        os.makedirs(os.path.join(self.args.output_dir, "checkpoint-1"))
        raise RuntimeError("killed at step 2")

    monkeypatch.setattr(DeemTrainer, "train", crash_after_a_checkpoint)
    kept = tmp_path / "kept"
    with pytest.raises(SystemExit):
        _train(tmp_path, kept)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and f"the checkpoints in {kept} are kept: resume with --resume_from_checkpoint" in err[0]
    assert (kept / "checkpoint-1").is_dir()


def test_dry_run_writes_nothing(tmp_path, capsys):
    out = tmp_path / "dry"
    assert _train(tmp_path, out, "--dry_run") == 0
    assert "optimizer groups:" in capsys.readouterr().out
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------- convert

ORIGINAL_YAML = """\
# the original's layout: the encoder resolution lives in the data transforms (YAML anchors and aliases)
model:
{model}
data:
  train:
    name: random_mix
    datasets:
    - name: laion_wds
      transform: &train_transform
        aug_type: 'dual_numpy'
        resolution: &image_size 64
        resolution2: &image_size_dec 64
    - name: mmc4_wds
      transform: *train_transform
  val:
  - name: coco_karpathy
    transform:
      aug_type: 'numpy'
      resolution: *image_size
"""


def test_convert_reads_the_image_size_from_the_yaml(parity_a_dir, tmp_path, capsys):
    import shutil

    from deem.conversion.convert_original import yaml_image_sizes

    configs = json.loads((parity_a_dir / "configs.json").read_text())
    model = yaml.safe_dump(configs["model_config"]).replace("\n", "\n  ")
    (tmp_path / "pretrain.yaml").write_text(ORIGINAL_YAML.format(model="  " + model.rstrip()))
    doc = yaml.safe_load((tmp_path / "pretrain.yaml").read_text())
    assert sorted({size for _, size in yaml_image_sizes(doc)}) == [64]
    assert [where for where, _ in yaml_image_sizes(doc)][:2] == [
        "data.train.datasets[0].transform.resolution",
        "data.train.datasets[1].transform.resolution",
    ]
    (tmp_path / "llm").mkdir()
    (tmp_path / "llm" / "config.json").write_text(json.dumps(configs["llama_config"]))
    for sub, name in (("unet", "config.json"), ("vae", "config.json"), ("scheduler", "scheduler_config.json")):
        (tmp_path / "sd" / sub).mkdir(parents=True)
        (tmp_path / "sd" / sub / name).write_text(json.dumps(configs["stable_diffusion"][f"{sub}/{name}"]))
    shutil.copy(parity_a_dir / "original_state_dict.safetensors", tmp_path / "model.safetensors")
    out = tmp_path / "outputs" / "deem-tiny"  # a parent folder that does not exist yet
    argv = ["convert", "--checkpoint", str(tmp_path / "model.safetensors"), "--config", str(tmp_path / "pretrain.yaml")]
    argv += ["--llm", str(tmp_path / "llm"), "--sd", str(tmp_path / "sd"), "--out", str(out)]
    assert main(argv + ["--verify", str(parity_a_dir)]) == 0  # no --image-size: 64 comes from the YAML
    printed = capsys.readouterr().out
    assert "at 64 px" in printed and f"verified against {parity_a_dir}" in printed and f"wrote {out}" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["vision_config"]["image_size"] == 64
    assert sorted(p.name for p in out.parent.iterdir()) == ["deem-tiny"]  # no temporary folder beside it
    dir_mode, file_mode = _mode_defaults()
    assert out.stat().st_mode & 0o777 == dir_mode  # not mkdtemp's 0700
    assert all(p.stat().st_mode & 0o777 == file_mode for p in out.iterdir() if p.is_file())

    # the same size given explicitly agrees; an existing empty folder is filled
    again = tmp_path / "again"
    again.mkdir()
    argv[-1] = str(again)
    assert main(argv + ["--image-size", "64"]) == 0
    assert json.loads((again / "config.json").read_text())["vision_config"]["image_size"] == 64
