"""The lmms-eval model ``deem``: found through lmms-eval's entry-point group, run by lmms-eval's own CLI on a task
YAML of ours (``--include_path``) over local POPE files, with the same numbers as ``deem evaluate``."""

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import tomllib
import torch

from deem import evaluation as ev

REPO = Path(__file__).resolve().parents[1]
GROUP = "lmms_eval.models"


def _declared_entry_points() -> dict:
    table = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]
    return table[GROUP]


def test_pyproject_declares_the_lmms_eval_entry_point_and_extra():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["entry-points"][GROUP] == {"deem": "deem.evaluation.lmms_plugin:manifest"}
    assert any(req.startswith("lmms-eval") for req in project["optional-dependencies"]["eval"])


def _installed_entry_point() -> None:
    """lmms-eval finds `deem` through the installed metadata's entry point, as it will for a user: the editable
    install must carry the table declared in pyproject.toml (reinstall after changing it)."""
    installed = {ep.name: ep.value for ep in importlib.metadata.entry_points(group=GROUP)}
    assert installed.get("deem") == _declared_entry_points()["deem"], (
        f"installed entry points {installed} lack pyproject's; run pip install -e . again"
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from test_evaluation import long_tiny_model

    from deem.trainers.cli import tiny_processor

    root = tmp_path_factory.mktemp("lmms")
    model = long_tiny_model(seed=5)
    processor = tiny_processor(model.config)
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    rng = np.random.default_rng(1)
    for i in range(3):
        PIL.Image.fromarray((rng.random((30, 40, 3)) * 255).astype("uint8")).save(root / f"im{i}.jpg")
    ev.write_pope(
        [
            {"question_id": i, "image": f"im{i % 3}.jpg", "text": f"Is there a {w} in the image?", "label": lab}
            for i, (w, lab) in enumerate(
                zip(["dog", "cat", "car", "cup", "bus", "sun"], "yes no yes no no yes".split())
            )
        ],
        root / "coco_pope_random.json",
    )
    return root, model, processor


def _task_dir(root: Path) -> Path:
    inc = root / "tasks"
    inc.mkdir(exist_ok=True)
    (inc / "deem_pope_local.yaml").write_text(
        textwrap.dedent(
            f"""\
            task: deem_pope_local
            dataset_path: json
            dataset_kwargs:
              data_files:
                test: {root / "coco_pope_random.json"}
            test_split: test
            output_type: generate_until
            doc_to_visual: !function utils.doc_to_visual
            doc_to_text: !function utils.doc_to_text
            doc_to_target: label
            generation_kwargs:
              max_new_tokens: 3
              num_beams: 1
              do_sample: false
              temperature: 0
            process_results: !function utils.process_results
            metric_list:
            """
        )
        + "".join(
            f"  - metric: pope_{m}\n    aggregation: !function utils.pope_aggregate_{m}\n    higher_is_better: true\n"
            for m in ("accuracy", "precision", "recall", "f1_score", "yes_ratio")
        )
    )
    (inc / "utils.py").write_text(
        textwrap.dedent(
            f"""\
            # POPE's own file (JSON Lines: question_id, image, text, label) read by lmms-eval's local json loader;
            # scored by lmms-eval's POPE functions
            import PIL.Image
            from lmms_eval.tasks.pope.utils import (  # noqa: F401
                pope_aggregate_accuracy, pope_aggregate_f1_score, pope_aggregate_precision, pope_aggregate_recall,
                pope_aggregate_yes_ratio, pope_process_results,
            )

            IMAGES = {str(root)!r}


            def doc_to_visual(doc):
                with PIL.Image.open(IMAGES + "/" + doc["image"]) as im:
                    im.load()
                    return [im.copy()]


            def doc_to_text(doc, lmms_eval_specific_kwargs=None):
                return doc["text"]


            def process_results(doc, results):
                return pope_process_results(dict(doc, answer=doc["label"]), results)
            """
        )
    )
    return inc


@pytest.mark.slow  # subprocesses (each imports torch)
def test_lmms_eval_cli_runs_deem_and_matches_deem_evaluate(saved, tmp_path):
    root, model, processor = saved
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        HF_DATASETS_CACHE=str(tmp_path / "hf"),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    _installed_entry_point()
    cmd = [
        sys.executable, "-c", "from lmms_eval.cli.dispatch import main; main()",
        "--model", "deem", "--model_args", f"pretrained={root / 'model'},template=pope,device=cpu",
        "--tasks", "deem_pope_local", "--include_path", str(_task_dir(root)), "--batch_size", "2",
        "--output_path", str(tmp_path / "lmms_out"), "--log_samples",
    ]  # fmt: skip
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=280)
    assert run.returncode == 0, (run.stdout[-2000:], run.stderr[-4000:])
    found = sorted((tmp_path / "lmms_out").rglob("*_results.json"))
    assert found, f"no lmms-eval results under {tmp_path / 'lmms_out'}: {run.stderr[-2000:]}"
    lmms = json.loads(found[-1].read_text())["results"]["deem_pope_local"]
    ours = ev.evaluate(
        "pope-random",
        root / "coco_pope_random.json",
        root,
        model,
        tmp_path / "deem",
        processor=processor,
        batch_size=2,
        parser="lmms-eval",
        num_beams=1,
        max_new_tokens=3,
    )
    gen = ours["metrics"]["generate"]
    names = {"accuracy": "accuracy", "precision": "precision", "recall": "recall", "f1": "f1_score",
             "yes_ratio": "yes_ratio"}  # fmt: skip
    for mine, theirs in names.items():
        assert gen[mine] == pytest.approx(100 * lmms[f"pope_{theirs},none"]), mine
    # the same answers, one by one
    logged = [line for p in found[-1].parent.glob("*deem_pope_local*.jsonl") for line in p.read_text().splitlines()]
    samples = sorted(map(json.loads, logged), key=lambda s: s["doc_id"])
    predictions = [json.loads(line) for line in (tmp_path / "deem" / "predictions.jsonl").read_text().splitlines()]
    assert len(samples) == len(predictions) == 6
    answers = [s["filtered_resps"] if isinstance(s["filtered_resps"], str) else s["filtered_resps"][0] for s in samples]
    assert [a.strip() for a in answers] == [p["prediction"] for p in predictions]


def test_plugin_interface_in_process(saved):
    """loglikelihood equals score_options on the same prompt; generate_until cuts at `until`; multi-round runs
    the doc_to_text protocol."""
    from lmms_eval.api.instance import Instance
    from lmms_eval.models import get_model

    from deem.evaluation.lmms_plugin import DeemLMMS, manifest
    from deem.evaluation.runner import _encode, option_ids
    from deem.modeling.prompts import format_prompt

    root, model, processor = saved
    assert manifest().model_id == "deem" and manifest().simple_class_path.endswith("lmms_plugin.DeemLMMS")
    lm = DeemLMMS(pretrained=str(root / "model"), device="cpu", template="pope", batch_size=2)
    image = PIL.Image.open(root / "im0.jpg")
    docs = [{"q": "Is there a dog in the image?"}, {"q": "Is there a cat?"}]
    lm.task_dict = {"t": {"test": docs}}

    def visual(doc):
        return [image]

    def req(kind, args):
        return Instance(kind, args, idx=0, metadata={"task": "t", "doc_id": args[-3], "repeats": 1})

    reqs = [req("loglikelihood", (d["q"], " yes", visual, i, "t", "test")) for i, d in enumerate(docs)]
    got = lm.loglikelihood(reqs)
    prompt = format_prompt("pope", question=docs[0]["q"])
    inputs = _encode(processor, [{"prompt": prompt, "images": [root / "im0.jpg"], "masks": None}], "cpu", torch.float32)
    keep = {k: inputs[k] for k in ("attention_mask", "pixel_values", "num_images")}
    want = model.score_options(inputs["input_ids"], option_ids(processor, [" yes"]), **keep)
    assert got[0][0] == pytest.approx(float(want[0, 0]), rel=1e-4)
    assert isinstance(got[0][1], bool)
    gen = [req("generate_until", (d["q"], {"max_new_tokens": 4, "until": []}, visual, i, "t", "test"))
           for i, d in enumerate(docs)]  # fmt: skip
    texts = lm.generate_until(gen)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    if texts[0]:
        stop = texts[0][-1]
        until = req("generate_until", (docs[0]["q"], {"max_new_tokens": 4, "until": [stop]}, visual, 0, "t", "test"))
        cut = lm.generate_until([until])
        assert cut[0] == texts[0][: texts[0].index(stop)].strip()
    calls = []

    def doc_to_text(doc, previous_output=None, round_idx=None, previous_round_info=None):
        calls.append((round_idx, list(previous_output)))
        return [image], doc["q"] + " again?", round_idx >= 2, None, {"n": round_idx}

    multi = lm.generate_until_multi_round(
        [req("generate_until_multi_round", (docs[0]["q"], {"max_new_tokens": 2}, visual, doc_to_text, 0, "t", "test"))]
    )  # fmt: skip
    assert len(multi) == 1 and len(multi[0]) == 2 and [c[0] for c in calls] == [1, 2]
    assert calls[0][1] == [multi[0][0]] and calls[1][1] == list(multi[0])
    with pytest.raises(ValueError, match="template must be one of"):
        DeemLMMS(pretrained=str(root / "model"), template="nope")
    # lmms-eval's registry resolves `deem` to our class once the entry point is visible (installed metadata)
    _installed_entry_point()
    assert get_model("deem") is DeemLMMS
