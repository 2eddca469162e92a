"""deem.evaluation: metrics against hand-computed values / pycocoevalcap / scipy, every task end to end on a tiny
model with data written in the real formats, batching, resume, bad inputs."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import pytest
import torch

from deem import evaluation as ev
from deem.evaluation import metrics, parsers

# ------------------------------------------------------------------------------------------------ metrics by hand


def test_pope_metrics_by_hand_both_protocols():
    labels = ["yes", "yes", "yes", "no", "no", "no"]
    # POPE's parser turns every answer into yes/no
    raw = ["Yes, there is.", "No.", "There is not a dog. Yes", "yes", "no way", "I see nothing, no"]
    parsed = [parsers.pope_original(t) for t in raw]
    assert parsed == ["yes", "no", "no", "yes", "no", "no"]
    m = metrics.pope_metrics(parsed, labels, "pope")
    # TP 1, FN 2, FP 1, TN 2
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["precision"] == pytest.approx(1 / 2)
    assert m["recall"] == pytest.approx(1 / 3)
    assert m["f1"] == pytest.approx(2 * 0.5 * (1 / 3) / (0.5 + 1 / 3))
    assert m["yes_ratio"] == pytest.approx(2 / 6)
    # lmms-eval: exact words only; "maybe" is wrong but neither FP nor FN; yes-ratio of the labels
    lm = [parsers.pope_lmms_eval(t) for t in [" Yes ", "maybe", "no", "yes", "No", "yes."]]
    assert lm == ["yes", "maybe", "no", "yes", "no", "yes."]
    m = metrics.pope_metrics(lm, labels, "lmms-eval")
    assert m["accuracy"] == pytest.approx(2 / 6)  # 0: yes/yes, 4: no/no
    assert m["precision"] == pytest.approx(1 / 2)  # TP 1 (0), FP 1 (3)
    assert m["recall"] == pytest.approx(1 / 2)  # FN only for an explicit "no" (2)
    assert m["yes_ratio"] == pytest.approx(3 / 6)


def test_vqa_accuracy_and_normalisation_known_cases():
    ten = ["2"] * 2 + ["two"] * 1 + ["3"] * 7
    # answers differ -> normalised: "two" -> "2", so "2" matches 3 humans: leave-one-out min(k/3, 1)
    # leaving out one of the three "2"s -> 2/3 (3 such subsets), leaving out another answer -> 1 (7 subsets)
    assert metrics.vqa_accuracy("two", ten) == pytest.approx((3 * (2 / 3) + 7 * 1) / 10)
    assert metrics.vqa_accuracy("3", ten) == pytest.approx(1.0)
    assert metrics.vqa_accuracy("four", ten) == 0.0
    one = ["dog"] + ["cat"] * 9
    assert metrics.vqa_accuracy("dog", one) == pytest.approx(9 * (1 / 3) / 10)
    assert parsers.vqa_normalize("The Dog.") == "dog"
    assert parsers.vqa_normalize("an apple") == "apple"
    assert parsers.vqa_normalize("dont") == "don't"
    assert parsers.vqa_normalize("yes!") == "yes"
    assert parsers.vqa_normalize("1,000") == "1000"
    assert parsers.vqa_normalize("red/blue") == "red blue"
    assert parsers.vqa_normalize("3.5") == "3.5"
    assert parsers.vqa_normalize("none") == "0"
    # the prediction is always normalised; human answers only when they disagree (the official script's rule)
    assert metrics.vqa_accuracy("Yes.", ["yes"] * 10) == 1.0
    assert metrics.vqa_accuracy("two", ["two"] * 10) == 0.0  # "two" -> "2", the humans' "two" kept as written
    assert metrics.vqa_accuracy("two", ["two"] * 9 + ["2"]) == 1.0
    assert metrics.exact_match(" Yes.", "yes") == 1.0 and metrics.exact_match("no", "yes") == 0.0


def test_robustvqa_parser_mmvp_pairs_and_choices():
    assert parsers.deem_yes_no(" yes") == "yes"
    assert parsers.deem_yes_no("The answer is no, it is a cat") == "no"
    assert parsers.deem_yes_no("Yes.\nmore") == "yes"
    assert metrics.yes_no_accuracy(["yes", "no", "no"], ["yes", "yes", "no"]) == pytest.approx(2 / 3)
    assert parsers.mmvp_choice("(b) Closed") == "b"
    assert parsers.mmvp_choice("a") == "a"
    assert parsers.mmvp_choice("the door is open", ["Open", "Closed"]) == "a"
    assert parsers.mmvp_choice("no idea", ["Open", "Closed"]) is None
    # pairs (1,2) right, (3,4) half right, (5,6) right -> 2/3; a lone question 7 is not a pair
    acc, n = metrics.mmvp_pair_accuracy({1: True, 2: True, 3: True, 4: False, 5: True, 6: True, 7: True})
    assert (acc, n) == (pytest.approx(2 / 3), 3)


def test_fid_formula_matches_scipy():
    from scipy import linalg
    from torchmetrics.image.fid import FrechetInceptionDistance

    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(40, 6)), rng.normal(0.3, 1.4, size=(50, 6)) @ rng.normal(size=(6, 6))
    mu1, mu2 = real.mean(0), fake.mean(0)
    s1, s2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert metrics.frechet_distance(real, fake) == pytest.approx(expected, rel=1e-6)

    # torchmetrics' FID module over the same features (a feature extractor returning them) gives the same value
    class Lookup(torch.nn.Module):
        def forward(self, x):
            return x.float().flatten(1)[:, :6]

    fid = FrechetInceptionDistance(feature=Lookup(), input_img_size=(1, 1, 6))
    fid.update(torch.tensor(real)[:, None, None, :], real=True)
    fid.update(torch.tensor(fake)[:, None, None, :], real=False)
    assert float(fid.compute()) == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ValueError, match="N >= 2"):
        metrics.frechet_distance(real[:1], fake)


def test_caption_metrics_equal_pycocoevalcap():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    refs = {"1": ["A dog runs on the grass.", "a dog running"], "2": ["Two cats sleep on a bed."]}
    preds = {"1": "a dog is running", "2": "a cat sleeping on the bed"}
    ours = metrics.caption_metrics(refs, preds, meteor=False, spice=True)
    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
    res = tok.tokenize({k: [{"caption": v}] for k, v in preds.items()})
    assert ours["cider"] == pytest.approx(Cider().compute_score(gts, res)[0])
    assert ours["bleu_4"] == pytest.approx(Bleu(4).compute_score(gts, res)[0][3])
    assert ours["rouge_l"] == pytest.approx(Rouge().compute_score(gts, res)[0])
    assert "meteor" not in ours and ours["absent"]["meteor"].startswith("disabled")
    assert "spice" not in ours and "Stanford CoreNLP models" in ours["absent"]["spice"]  # never faked


# ------------------------------------------------------------------------------------------------ data sets


def long_tiny_model(seed=0):
    """The tiny model with 512 text positions: the paper's prompts are long for its one-character tokens."""
    from deem import DeemConfig, DeemForInterleavedGeneration
    from deem.trainers.cli import visible_init

    config = DeemConfig.tiny()
    config.text_config.max_position_embeddings = 512
    config.context_max_positions = 512
    torch.manual_seed(seed)
    model = DeemForInterleavedGeneration(config)
    visible_init(model)
    return model.eval()


def _image(path, seed):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray((rng.random((36, 44, 3)) * 255).astype("uint8")).save(path)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A tiny saved model and one tiny data set per task, in the real formats."""
    from deem.trainers.cli import tiny_processor

    root = tmp_path_factory.mktemp("bench")
    model = long_tiny_model(seed=3)
    processor = tiny_processor(model.config)
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    img = root / "images"
    coco = [f"COCO_val2014_{i:012d}.jpg" for i in range(4)]
    for i, name in enumerate(coco):
        _image(img / name, i)
    words = ["dog", "cat", "car", "tree", "cup", "bus"]
    pope = [
        {
            "question_id": i,
            "image": coco[i % 4],
            "text": f"Is there a {w} in the image?",
            "label": "yes" if i % 2 else "no",
        }
        for i, w in enumerate(words)
    ]
    ev.write_pope(pope, root / "coco_pope_random.json")
    for i in range(3):
        _image(img / "imagenet-a" / "n01498041" / f"{i}.jpg", 10 + i)
    ev.write_robustvqa(
        {
            "imagenet_a": [
                {
                    "file_name": f"imagenet-a/n01498041/{i}.jpg",
                    "gt_caption": "stingray",
                    "error_caption": "electric ray",
                }
                for i in range(3)
            ]
        },
        root / "robustvqa_test.json",
    )
    for i in range(1, 5):
        _image(img / "mmvp" / f"{i}.jpg", 20 + i)
    ev.write_mmvp(
        [
            {"index": i, "question": "Is the door open?", "options": ["Open", "Closed"], "answer": "ab"[i % 2]}
            for i in range(1, 5)
        ],
        root / "Questions.csv",
    )
    ev.write_vqa(
        [
            {"question_id": 10 + i, "image_id": i, "question": "What is it?", "answers": ["dog"] * 6 + ["cat"] * 4}
            for i in range(4)
        ],
        root / "vqav2",
    )
    ev.write_vqa(
        [{"question_id": 5, "image_id": 1, "question": "Color?", "answers": ["red"] * 10}], root / "okvqa", task="okvqa"
    )
    for i in range(2):
        _image(img / f"n{i}.jpg", 30 + i)
    ev.write_gqa(
        [{"question_id": f"q{i}", "image_id": f"n{i}", "question": "Left?", "answer": "yes"} for i in range(2)],
        root / "gqa.json",
    )
    ev.write_vizwiz([{"image": coco[0], "question": "What?", "answers": ["unanswerable"] * 10}], root / "vizwiz.json")
    ev.write_coco_captions(
        [{"image_id": i, "file_name": coco[i], "captions": ["a random picture", "noise in colors"]} for i in range(3)],
        root / "captions.json",
    )
    for i in (7, 8):
        _image(img / f"{i}.jpg", 40 + i)
    ev.write_paragraphs(
        [{"image_id": 7, "paragraph": "A picture of noise. It has colors."}, {"image_id": 8, "paragraph": "Noise."}],
        root / "paragraphs_v1.json",
        split_ids=[7],
        split_path=root / "test_split.json",
    )
    mask = np.zeros((36, 44), bool)
    mask[5:20, 10:30] = True
    ev.write_refcoco(
        [
            {
                "ref_id": r,
                "image_id": r,
                "file_name": coco[r],
                "height": 36,
                "width": 44,
                "mask": mask,
                "sentences": ["the left thing", "a thing"],
                "split": "val" if r < 2 else "train",
            }
            for r in range(3)
        ],
        root / "refcocog",
    )
    return {"root": root, "model": model, "processor": processor, "images": img}


TEXT_TASKS = {
    "pope-random": ("coco_pope_random.json", {}),
    "robustvqa-a": ("robustvqa_test.json", {}),
    "mmvp": ("Questions.csv", {}),
    "vqav2": ("vqav2", {}),
    "okvqa": ("okvqa", {}),
    "gqa": ("gqa.json", {}),
    "vizwiz": ("vizwiz.json", {}),
    "coco-caption": ("captions.json", {"meteor": False}),
    "image2paragraph": ("paragraphs_v1.json", {"meteor": False}),
    "refcocog-region-caption": ("refcocog", {}),  # METEOR (Java) computed here once
}


def _run(bench, task, out=None, **kw):
    data, options = TEXT_TASKS[task]
    images = bench["images"] / "mmvp" if task == "mmvp" else bench["images"]
    if task == "image2paragraph":
        options = dict(options, split_file=str(bench["root"] / "test_split.json"))
    kw.setdefault("num_beams", 1)
    kw.setdefault("max_new_tokens", 4 if task not in ("image2paragraph",) else 6)
    if task == "image2paragraph":
        kw.setdefault("min_new_tokens", 0)
    return ev.evaluate(
        task,
        bench["root"] / data,
        images,
        bench["model"],
        out,
        processor=bench["processor"],
        batch_size=4,
        **options,
        **kw,
    )


def _predictions(out):
    return {r["id"]: r for r in map(json.loads, (out / "predictions.jsonl").read_text().splitlines())}


@pytest.mark.parametrize("task", sorted(TEXT_TASKS))
def test_every_text_task_end_to_end(bench, task, tmp_path):
    """Each task runs on its tiny real-format data; the results equal the metric recomputed from the predictions."""
    closed = task in ("pope-random", "robustvqa-a", "mmvp")
    results = _run(bench, task, tmp_path, answer_mode="both" if closed else "generate")
    preds = _predictions(tmp_path)
    assert results["task"] == task and results["num_samples"] == len(preds)
    assert json.loads((tmp_path / "results.json").read_text())["metrics"] == results["metrics"]
    assert f"| {results['benchmark']} | generate |" in (tmp_path / "results.md").read_text()
    gen = results["metrics"]["generate"]
    texts = [p["prediction"] for p in preds.values()]
    if task == "pope-random":
        labels = {str(i): "yes" if i % 2 else "no" for i in range(6)}
        parsed = [parsers.pope_original(preds[k]["prediction"]) for k in labels]
        acc = sum(p == labels[k] for p, k in zip(parsed, labels)) / 6
        assert gen["accuracy"] == pytest.approx(100 * acc)
        assert gen["yes_ratio"] == pytest.approx(100 * parsed.count("yes") / 6)
        chosen = ["yes" if preds[k]["option_scores"][0] > preds[k]["option_scores"][1] else "no" for k in labels]
        assert results["metrics"]["score"]["accuracy"] == pytest.approx(
            100 * sum(c == labels[k] for c, k in zip(chosen, labels)) / 6
        )
    elif task == "robustvqa-a":
        assert len(preds) == 6 and set(preds) == {f"{i}-{a}" for i in range(3) for a in ("yes", "no")}
        right = sum(parsers.deem_yes_no(p["prediction"]) == k.split("-")[1] for k, p in preds.items())
        assert gen["accuracy"] == pytest.approx(100 * right / 6)
        right = sum(("yes", "no")[p["choice"]] == k.split("-")[1] for k, p in preds.items())
        assert results["metrics"]["score"]["accuracy"] == pytest.approx(100 * right / 6)
    elif task == "mmvp":
        assert gen["num_pairs"] == 2
        assert 0 <= gen["pair_accuracy"] <= gen["question_accuracy"] <= 100
    elif task in ("vqav2", "okvqa", "vizwiz"):
        answers = {"vqav2": ["dog"] * 6 + ["cat"] * 4, "okvqa": ["red"] * 10, "vizwiz": ["unanswerable"] * 10}[task]
        expected = np.mean([metrics.vqa_accuracy(parsers.first_line(t), answers) for t in texts])
        assert gen["accuracy"] == pytest.approx(100 * expected)
    elif task == "gqa":
        assert gen["accuracy"] == pytest.approx(100 * np.mean([metrics.exact_match(t, "yes") for t in texts]))
    else:
        n = {"coco-caption": 3, "image2paragraph": 1, "refcocog-region-caption": 2}[task]
        assert len(preds) == n
        refs = {
            "coco-caption": ["a random picture", "noise in colors"],
            "image2paragraph": ["A picture of noise. It has colors."],
            "refcocog-region-caption": ["the left thing", "a thing"],
        }[task]
        expected = metrics.caption_metrics(
            {k: refs for k in preds}, {k: p["prediction"] for k, p in preds.items()}, meteor=False
        )
        assert gen["cider"] == pytest.approx(100 * expected["cider"])
        if task == "refcocog-region-caption":  # the paper's Table 3 metrics: CIDEr and METEOR (Java, one run)
            assert 0.0 <= gen["meteor"] <= 100.0 and "meteor" not in gen.get("absent", {})
        else:
            assert gen["absent"]["meteor"].startswith("disabled")


def test_batched_left_padding_equals_one_by_one(bench, tmp_path):
    a = _run(bench, "pope-random", tmp_path / "b4", answer_mode="both")
    one = ev.evaluate(
        "pope-random",
        bench["root"] / "coco_pope_random.json",
        bench["images"],
        bench["model"],
        tmp_path / "b1",
        processor=bench["processor"],
        batch_size=1,
        answer_mode="both",
        num_beams=1,
        max_new_tokens=4,
    )
    assert a["metrics"] == one["metrics"]
    p4, p1 = _predictions(tmp_path / "b4"), _predictions(tmp_path / "b1")
    assert [p["prediction"] for p in p4.values()] == [p1[k]["prediction"] for k in p4]
    np.testing.assert_allclose(
        [p["option_scores"] for p in p4.values()], [p1[k]["option_scores"] for k in p4], rtol=1e-4, atol=1e-4
    )


def test_region_caption_uses_the_mask(bench, tmp_path):
    """The region prompt gives the processor two images, the second with the region mask (stage 3)."""
    from deem.evaluation.runner import _encode
    from deem.evaluation.tasks import get_task, load_samples

    spec = get_task("refcocog-region-caption")
    samples = load_samples(spec, bench["root"] / "refcocog", bench["images"], dict(spec.options))
    assert [s["id"] for s in samples] == ["0", "1"]  # only split "val"
    assert samples[0]["prompt"].count("<image>") == 2 and "<ref>region1</ref>" in samples[0]["prompt"]
    inputs = _encode(bench["processor"], samples[:1], "cpu", torch.float32)
    masks = inputs["image_masks"]
    assert masks.shape[0] == 2 and bool(masks[0].all()) and 0 < float(masks[1].mean()) < 1


def test_resume_skips_done_and_repairs_a_torn_line(bench, tmp_path):
    full = _run(bench, "vqav2", tmp_path / "full")
    out = tmp_path / "part"
    _run(bench, "vqav2", out, limit=2)
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 2
    (out / "predictions.jsonl").write_text(lines[0] + "\n" + lines[1][:7])  # an interrupted write
    resumed = _run(bench, "vqav2", out)
    assert resumed["metrics"] == full["metrics"] and resumed["num_samples"] == 4
    assert _predictions(out) == _predictions(tmp_path / "full")


def test_bad_inputs_fail_before_any_work(bench, tmp_path):
    root, images = bench["root"], bench["images"]

    def call(task="pope-random", data=root / "coco_pope_random.json", out=None, **kw):
        return ev.evaluate(task, data, images, bench["model"], out, processor=bench["processor"], **kw)

    with pytest.raises(ValueError, match="unknown task 'pope-r'"):
        call("pope-r")
    with pytest.raises(ValueError, match="does not exist"):
        call(data=root / "nope.json")
    with pytest.raises(ValueError, match="limit must be a positive integer"):
        call(limit=0)
    with pytest.raises(ValueError, match="answer_mode must be 'generate'"):
        call("vqav2", data=root / "vqav2", answer_mode="score")
    with pytest.raises(ValueError, match="has no option"):
        call(nmu_beams=2)
    with pytest.raises(ValueError, match="parser must be"):
        call(parser="mine")
    bad = root / "bad_pope.json"
    bad.write_text('{"question_id": 1, "image": "COCO_val2014_000000000000.jpg", "text": "Is it?", "label": "maybe"}\n')
    with pytest.raises(ev.DataError, match="record 0: label must be 'yes' or 'no'"):
        call(data=bad)
    bad.write_text('{"question_id": 1, "image": "missing.jpg", "text": "Is it?", "label": "yes"}\n')
    with pytest.raises(ev.DataError, match="1 image file"):
        call(data=bad)
    bad.write_text("{not json\n")
    with pytest.raises(ev.DataError, match="line 1 is not JSON"):
        call(data=bad)
    out = tmp_path / "out"
    _run(bench, "gqa", out)
    with pytest.raises(ev.DataError, match="holds predictions of task 'gqa'"):
        call(out=out)
    with pytest.raises(ev.DataError, match="other settings"):
        _run(bench, "gqa", out, max_new_tokens=5)
    with pytest.raises(ValueError, match="inception_weights"):
        ev.evaluate("t2i-fid", root / "captions.json", images, bench["model"], processor=bench["processor"])
    with pytest.raises(FileNotFoundError, match="inception_weights .* is not a file"):
        ev.evaluate("t2i-fid", root / "captions.json", images, bench["model"], inception_weights=str(root / "no.pth"))
    with pytest.raises(ValueError, match="needs clip_scorer"):
        ev.evaluate(
            "t2i-fid", root / "captions.json", images, bench["model"], feature_extractor="x:y", samples_per_prompt=2
        )
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        call(batch_size=0)
    with pytest.raises(ValueError, match="device 'gpu7'"):
        call(device="gpu7")


def test_robustvqa_converter(tmp_path):
    root = tmp_path / "imagenet-r"
    for wnid, n in (("n01443537", 2), ("n01484850", 1)):
        for i in range(n):
            _image(root / wnid / f"{i}.jpg", i)
    index = {"0": ["n01443537", "goldfish"], "1": ["n01484850", "great_white_shark"], "2": ["n01491361", "tiger_shark"]}
    (tmp_path / "index.json").write_text(json.dumps(index))
    wrong = {"n01443537/0.jpg": "tiger_shark", "n01484850/0.jpg": "goldfish"}
    out = ev.convert_imagenet_for_robustvqa(
        root, wrong, tmp_path / "index.json", "imagenet_r", tmp_path / "rv.json", underscores=False
    )
    blob = json.loads(out.read_text())
    assert blob == {
        "imagenet_r": [
            {"file_name": "imagenet-r/n01443537/0.jpg", "gt_caption": "goldfish", "error_caption": "tiger shark"},
            {"file_name": "imagenet-r/n01484850/0.jpg", "gt_caption": "great white shark", "error_caption": "goldfish"},
        ]
    }
    with pytest.raises(ev.DataError, match="its true class"):
        ev.convert_imagenet_for_robustvqa(
            root, {"n01443537/0.jpg": "goldfish"}, tmp_path / "index.json", "imagenet_r", tmp_path / "x.json"
        )


class TinyFeatures(torch.nn.Module):
    """A user feature extractor for FID (uint8 images -> 8 colour statistics)."""

    def forward(self, x):
        x = x.float() / 255
        return torch.cat([x.mean((2, 3)), x.std((2, 3)), x[:, :2, ::50, ::50].flatten(1)[:, :2]], 1)


def make_features():
    return TinyFeatures()


def test_t2i_fid_end_to_end_with_a_user_feature_extractor(bench, tmp_path):
    """The protocol end to end: images drawn by generate_images, saved, FID of torchmetrics on the user's feature
    module (the standard Inception needs weights that cannot be downloaded here), equal to the formula on the
    same features."""
    root = bench["root"]
    res = ev.evaluate(
        "t2i-fid",
        root / "captions.json",
        bench["images"],
        bench["model"],
        tmp_path,
        processor=bench["processor"],
        batch_size=2,
        feature_extractor="test_evaluation:make_features",
        num_inference_steps=2,
    )
    preds = _predictions(tmp_path)
    assert sorted(preds) == ["0", "1", "2"]
    drawn = [PIL.Image.open(tmp_path / p["image"]) for p in preds.values()]
    assert all(im.size == (32, 32) for im in drawn)
    from deem.evaluation.fid import _uint8

    real = [PIL.Image.open(bench["images"] / f"COCO_val2014_{i:012d}.jpg") for i in range(3)]
    feats = TinyFeatures()
    expected = metrics.frechet_distance(feats(_uint8(real, "cpu")).double(), feats(_uint8(drawn, "cpu")).double())
    assert res["metrics"]["generate"]["fid"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert math.isfinite(expected) and expected > 0


# ------------------------------------------------------------------------------------------------ CLI, processes


def _cli(bench, *args):
    return [
        sys.executable,
        "-m",
        "deem",
        "evaluate",
        "--model",
        str(bench["root"] / "model"),
        "--images",
        str(bench["images"]),
        "--option",
        "num_beams=1",
        "--max-new-tokens",
        "3",
        *args,
    ]


@pytest.fixture(scope="module")
def long_pope(bench):
    path = bench["root"] / "coco_pope_popular.json"
    ev.write_pope(
        [
            {
                "question_id": i,
                "image": f"COCO_val2014_{i % 4:012d}.jpg",
                "text": f"Is there a thing {i}?",
                "label": "yes" if i % 3 else "no",
            }
            for i in range(30)
        ],
        path,
    )
    return path


@pytest.mark.slow  # subprocesses (each imports torch)
def test_cli_interrupted_then_resumed_gives_the_same_results(bench, long_pope, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = tmp_path / "run"
    cmd = _cli(bench, "--task", "pope-popular", "--data", str(long_pope), "--batch-size", "1", "--out", str(out))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    preds = out / "predictions.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if preds.is_file() and len(preds.read_text().splitlines()) >= 3:
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.02)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "deem evaluate: error: interrupted" in err
    done = len(preds.read_text().splitlines())
    assert 3 <= done < 30 and not (out / "results.json").exists()
    # resumed (in this process, from the same model directory): the done samples are skipped
    resumed = ev.evaluate("pope-popular", long_pope, bench["images"], str(bench["root"] / "model"), out,
                          batch_size=1, num_beams=1, max_new_tokens=3)  # fmt: skip
    assert json.loads((out / "results.json").read_text()) == resumed
    straight = ev.evaluate(
        "pope-popular",
        long_pope,
        bench["images"],
        bench["model"],
        tmp_path / "straight",
        processor=bench["processor"],
        batch_size=1,
        num_beams=1,
        max_new_tokens=3,
    )
    assert resumed["metrics"] == straight["metrics"] and resumed["num_samples"] == 30
    assert _predictions(out) == _predictions(tmp_path / "straight")
    # usage errors answer at once (exit 2), before torch is imported
    bad = subprocess.run(_cli(bench, "--task", "pope-x", "--data", str(long_pope)), capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown --task 'pope-x'" in bad.stderr
    bad = subprocess.run(_cli(bench, "--task", "vqav2", "--data", "x", "--limit", "0"), capture_output=True, text=True)
    assert bad.returncode == 2 and "expected a positive integer" in bad.stderr


@pytest.mark.slow  # subprocesses (each imports torch)
def test_accelerate_two_processes_shard_and_merge(bench, long_pope, tmp_path):
    from conftest import ACCELERATE_TWO_PROCESSES

    out = tmp_path / "ddp"
    cmd = (
        ACCELERATE_TWO_PROCESSES
        + ["-m"]
        + _cli(
            bench,
            "--task",
            "pope-popular",
            "--data",
            str(long_pope),
            "--batch-size",
            "4",
            "--out",
            str(out),
            "--answer-mode",
            "both",
        )[2:]
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=280)
    assert run.returncode == 0, run.stderr[-3000:]
    merged = json.loads((out / "results.json").read_text())
    assert merged["settings"]["num_processes"] == 2
    assert run.stdout.count("| POPE-Popular | generate | accuracy |") == 1  # rank 0 reports
    assert not list(out.glob("predictions.rank*.jsonl"))
    single = ev.evaluate(
        "pope-popular",
        long_pope,
        bench["images"],
        bench["model"],
        tmp_path / "one",
        processor=bench["processor"],
        batch_size=4,
        answer_mode="both",
        num_beams=1,
        max_new_tokens=3,
    )
    assert merged["metrics"]["generate"] == single["metrics"]["generate"]
    assert merged["metrics"]["score"] == pytest.approx(single["metrics"]["score"])
    p2, p1 = _predictions(out), _predictions(tmp_path / "one")
    assert list(p2) == list(p1)  # merged in sample order
    assert [p["prediction"] for p in p2.values()] == [p["prediction"] for p in p1.values()]


def _tiny_clip(path):
    """A tiny random CLIP (transformers) with a character tokenizer: the reranking scorer of the paper's protocol."""
    import string

    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    path.mkdir(parents=True)
    chars = list(string.ascii_lowercase + string.digits + ".,'")
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
    end = vocab["<|endoftext|>"]
    text = dict(
        vocab_size=len(vocab),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=64,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=end,
        pad_token_id=end,
    )
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)  # fmt: skip
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8))
    model.save_pretrained(path)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(path)
    return model, CLIPProcessor.from_pretrained(path)


def test_t2i_fid_reranks_samples_with_a_clip_scorer(bench, tmp_path):
    clip, clip_processor = _tiny_clip(tmp_path / "clip")
    out = tmp_path / "out"
    res = ev.evaluate("t2i-fid", bench["root"] / "captions.json", bench["images"], bench["model"], out,
                      processor=bench["processor"], batch_size=3, feature_extractor="test_evaluation:make_features",
                      num_inference_steps=2, samples_per_prompt=2, clip_scorer=str(tmp_path / "clip"))  # fmt: skip
    assert res["metrics"]["generate"]["samples_per_prompt"] == 2
    for record in _predictions(out).values():
        assert len(record["clip_scores"]) == 2
        kept = PIL.Image.open(out / record["image"]).convert("RGB")
        with torch.no_grad():
            inputs = clip_processor(text=["a random picture"], images=[kept], return_tensors="pt", padding=True)
            score = clip(**inputs).logits_per_image[0, 0].item()
        assert score == pytest.approx(max(record["clip_scores"]), rel=1e-4, abs=1e-4)  # the best-rated draw is kept


def test_model_directory_in_bfloat16(bench, tmp_path):
    """A saved model directory (model + processor loaded from it) in another dtype; --limit takes the first N."""
    res = ev.evaluate("pope-random", bench["root"] / "coco_pope_random.json", bench["images"],
                      str(bench["root"] / "model"), tmp_path, dtype="bfloat16", limit=2, answer_mode="both",
                      num_beams=1, max_new_tokens=2)  # fmt: skip
    assert res["settings"]["dtype"] == "bfloat16" and res["num_samples"] == 2 and res["model"].endswith("model")
    assert list(_predictions(tmp_path)) == ["0", "1"]
    assert all(math.isfinite(x) for p in _predictions(tmp_path).values() for x in p["option_scores"])
