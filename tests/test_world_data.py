"""The built-in world (deem.world): scene graphs, the renderer and its detector, and the data written in the real
formats and read back through the project's own readers."""

import json
import random
import tarfile

import numpy as np
import pytest

from deem.world import scenes as S
from deem.world.formats import WorldSizes, write_world_data

TINY = WorldSizes(
    mmc4_docs=6,
    pairs=8,
    llava_images=5,
    grounding_images=4,
    referring_images=4,
    pope_images=5,
    robust_images=6,
    caption_images=3,
    region_images=2,
    draw_prompts=4,
    stories=2,
    pairs_per_shard=5,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_world_data(tmp_path_factory.mktemp("world") / "data", TINY, seed=0)


def test_detector_reads_back_what_the_renderer_drew():
    rng = random.Random(0)
    hits = 0
    for i in range(60):
        scene = S.random_scene(rng, 1)
        found = S.detect(S.render(scene, 32))
        obj = scene.objects[0]
        hits += bool(found) and (found[0]["colour"], found[0]["shape"]) == (obj.colour, obj.shape)
    assert hits >= 54, hits  # >= 90 % exact on single objects (the scorer's ceiling for drawn images)
    # an empty canvas has no object; a two-object scene gives two, with the right colours
    assert S.detect(np.full((32, 32, 3), 225, np.uint8)) == []
    two = S.Scene((S.Obj("square", "red", "big", "left"), S.Obj("circle", "blue", "big", "right")))
    assert sorted((d["colour"], d["shape"]) for d in S.detect(S.render(two, 32))) == [
        ("blue", "circle"),
        ("red", "square"),
    ]


def test_scene_graphs_decide_the_language():
    scene = S.Scene((S.Obj("triangle", "green", "small", "left", "down"), S.Obj("circle", "red", "big", "right")))
    assert S.caption(scene) == "a small green triangle pointing down and a big red circle."
    assert S.short_caption(scene) == "a green triangle and a red circle"
    for question, answer in S.scene_questions(scene, random.Random(1), 8):
        if question.startswith("Is there"):
            words = question[len("Is there ") :].split()
            colour, shape = words[-5], words[-4]
            assert answer == ("yes" if scene.has(shape, colour) else "no"), question
        elif question.startswith("How many"):
            assert answer == "two"
    with pytest.raises(ValueError, match="share a slot"):
        S.Scene((S.Obj("circle", "red", slot="left"), S.Obj("square", "red", slot="left")))
    changed, sentence = S.change_scene(scene, random.Random(3))
    assert changed != scene and sentence.startswith("Then")
    # out-of-distribution renditions differ from the training rendition
    plain = np.asarray(S.render(scene, 32)).astype(int)
    for style in S.OOD_STYLES:
        assert np.abs(np.asarray(S.render(scene, 32, style)).astype(int) - plain).mean() > 1, style


def test_world_files_are_in_the_real_formats(world):
    doc = json.loads((world / "mmc4" / "docs.jsonl").read_text().splitlines()[0])
    assert set(doc) >= {"text_list", "image_info"} and doc["image_info"][0]["matched_text_index"] == 0
    with tarfile.open(next((world / "pairs").glob("*.tar"))) as tar:
        names = tar.getnames()
    assert names[0].endswith(".png") and names[1].endswith(".json") and names[0][:-4] == names[1][:-5]
    llava = json.loads((world / "llava" / "llava.json").read_text())
    assert llava[0]["conversations"][0]["value"].startswith("<image>\n")
    assert {t["from"] for t in llava[0]["conversations"]} == {"human", "gpt"}
    refs = json.loads((world / "referring" / "refs.json").read_text())
    from pycocotools import mask as mask_utils

    ann = refs["annotations"][0]
    assert isinstance(ann["segmentation"]["counts"], str) and mask_utils.decode(ann["segmentation"]).sum() > 4
    pope = [json.loads(x) for x in (world / "eval" / "pope" / "world_pope_adversarial.jsonl").read_text().splitlines()]
    labels = [r["label"] for r in pope]
    assert labels.count("yes") == labels.count("no") and set(pope[0]) == {"question_id", "image", "text", "label"}
    ood = [json.loads(x) for x in (world / "eval" / "robustvqa" / "world_robustvqa_ood.jsonl").read_text().splitlines()]
    assert {r["style"] for r in ood} <= set(S.OOD_STYLES) and len({r["style"] for r in ood}) > 1
    graphs = [json.loads(x) for x in (world / "scenes.jsonl").read_text().splitlines()]
    assert len(graphs) > 40 and all(1 <= len(g["objects"]) <= 3 for g in graphs)


def test_grounding_set_pairs_every_record_with_its_described_copy(world):
    """Stage 2's yes/no warm-up: single-object scenes, the true shape asked twice and two others, every record once
    plain and once with the scene's description before each question; the answers follow the scene graph."""
    records = json.loads((world / "llava" / "grounding.json").read_text())
    graphs = {g["file"]: g for g in map(json.loads, (world / "scenes.jsonl").read_text().splitlines())}
    assert len(records) == 2 * TINY.grounding_images
    for plain, described in zip(records[::2], records[1::2]):
        assert described["id"] == plain["id"] + "-described" and described["image"] == plain["image"]
        (obj,) = graphs[f"llava/images/{plain['image']}"]["objects"]
        description = f"a {obj['size']} {obj['colour']} {obj['shape']}."
        answers = [t["value"] for t in plain["conversations"][1::2]]
        assert sorted(answers) == ["no", "no", "yes", "yes"]
        for q, a, dq, da in zip(
            plain["conversations"][0::2],
            answers,
            described["conversations"][0::2],
            described["conversations"][1::2],
        ):
            question = q["value"].removeprefix("<image>\n")
            shape = question.split()[2]
            assert a == ("yes" if shape == obj["shape"] else "no"), question
            assert dq["value"].removeprefix("<image>\n") == description + " " + question
            assert da["value"] == a
        assert plain["conversations"][0]["value"].startswith("<image>\n")
        assert described["conversations"][0]["value"].startswith("<image>\n")


def test_world_files_read_back_through_the_project_readers(world):
    from deem.trainers.data import read_llava, read_mmc4, read_pairs, read_referring

    docs = list(read_mmc4(str(world / "mmc4" / "docs.jsonl"), str(world / "mmc4" / "images"), on_error="raise"))
    assert docs and all(d["images"] and d["segments"][0]["text"].count("<image>") == len(d["images"]) for d in docs)
    assert any("Then the" in d["segments"][0]["text"] for d in docs)
    pairs = list(read_pairs(str(world / "pairs"), on_error="raise", text_drop_prob=0.0))
    assert len(pairs) == TINY.pairs and all(len(p["images"]) == 1 for p in pairs)
    grounding = read_llava(str(world / "llava" / "grounding.json"), str(world / "llava" / "images"), on_error="raise")
    assert len(grounding) == 2 * 4 * TINY.grounding_images and len(grounding[0]["images"]) == 1
    qa = read_llava(str(world / "llava" / "llava.json"), str(world / "llava" / "images"), on_error="raise")
    sample = qa[0]
    answers = [s["text"] for s in sample["segments"] if s["supervise"]]
    assert answers and answers[0].strip().removesuffix("</s>") in {"yes", "no", "one", "two", "three"} | set(
        S.COLOURS
    ) | {a for a in answers[0:1]}
    ref = read_referring(str(world / "referring" / "refs.json"), str(world / "referring" / "images"), on_error="raise")
    sample = ref[0]
    assert len(sample["images"]) == 1 + len(sample["image_masks"]) - 1 and sample["image_masks"][1].sum() > 4
    assert any(s["supervise"] and s["text"].strip().startswith("a ") for s in sample["segments"])


def test_world_command_refuses_bad_input_before_any_work(tmp_path, capsys):
    from deem.cli import main

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "keep.txt").write_text("the user's file")
    for argv, message in (
        (["world", "--out", str(a_file)], "exists and is not a directory"),
        (["world", "--out", str(stranger)], "not a world run"),
        (["world", "--out", str(tmp_path / "new"), "--device", "tpu"], "expected cpu, cuda"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err.splitlines()
        assert exit_info.value.code == 1 and len(err) == 1 and err[0].startswith("deem world: error: "), err
        assert message in err[0], err
    with pytest.raises(SystemExit) as exit_info:
        main(["world", "--seed", "-1"])
    assert exit_info.value.code == 2
    assert a_file.read_text() == "x" and (stranger / "keep.txt").read_text() == "the user's file"
    assert not (tmp_path / "new").exists()
