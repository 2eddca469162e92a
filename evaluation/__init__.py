"""The paper's benchmarks with their protocols (`deem evaluate`), metrics from kept libraries, the lmms-eval plugin.

``evaluate(task, data, images, model, out=None, *, processor=None, batch_size=8, limit=None, answer_mode="generate",
device=None, dtype=None, max_new_tokens=None, **task_options) -> dict`` runs one benchmark and returns the
``results.json`` content; ``deem evaluate --task NAME --data PATH --images DIR --model DIR [--out DIR]`` is the same
from the command line. ``model`` is a saved model directory (model + processor) or a loaded
``DeemForInterleavedGeneration`` (then ``processor=`` is required). ``TASKS`` lists the task names.

Answer modes: ``"generate"`` (the paper's: generate, then parse the text), ``"score"`` (closed-form tasks only:
the option with the highest ``model.score_options`` log-likelihood), ``"both"`` (each reported under its own key).

Out folder (``out``): ``predictions.jsonl`` (one JSON record per sample, appended as they are made; a rerun skips
the ids already there, so an interrupted run resumes), ``run.json`` (task and the settings that shape predictions:
a rerun with another task or other settings into the same folder is refused), ``results.json`` and ``results.md``
(written through a temporary file and renamed). Under ``accelerate launch`` each rank takes every
``world_size``-th pending sample, writes ``predictions.rank<R>.jsonl``, and rank 0 merges and scores.

``results.json``: ``{"task", "benchmark", "protocol", "metrics": {"generate": {...}, "score": {...}},
"num_samples", "model", "revision", "settings", "created"}``; ``deem.hub`` turns it into the model card's evaluation
table and ``model-index`` (``deem.hub.normalize_results`` accepts it, a list of them, or their paths).

lmms-eval: ``lmms-eval --model deem --model_args pretrained=DIR[,template=pope] --tasks ...`` runs the lmms-eval
model of `deem.evaluation.lmms_plugin`, registered through lmms-eval's entry-point group ``lmms_eval.models``
(installed with the package; ``pip install "deem-transformers[eval]"`` brings lmms-eval).

Data formats (``--data`` / ``--images``); ``write_<format>(records, path)`` writes each from Python records, so
tests and ``deem.world`` build data sets in the real layout:

* ``pope-random|popular|adversarial`` -- POPE's ``coco_pope_<split>.json``: JSON Lines, one object per line
  ``{"question_id": 1, "image": "COCO_val2014_000000016631.jpg", "text": "Is there a person in the image?",
  "label": "yes"}``; ``image`` is relative to ``--images``. ``write_pope(records, path)``.
* ``robustvqa-a|r|v`` -- DEEM's ``robustvqa_test.json``: ``{"imagenet_a": [...], "imagenet_r": [...],
  "imagenet_v2": [...]}``, each record ``{"file_name": "imagenet-a/n01498041/0.jpg", "gt_caption": "stingray",
  "error_caption": "electric ray"}`` (two questions per image: the true class answers "yes", the strongest wrong
  class "no"). ``write_robustvqa({"imagenet_a": records, ...}, path)``; ``convert_imagenet_for_robustvqa`` builds
  it from an ImageNet-A/R/V2 folder (``<wnid>/<file>``), a class index and a list of wrong labels.
* ``mmvp`` -- MMVP's ``Questions.csv`` (columns ``Index,Question,Options,Correct Answer``; options written
  ``"(a) Open (b) Closed"``, answer ``"(a)"``), images ``<Index>.jpg`` in ``--images`` ("MMVP Images"); questions
  2k-1 and 2k form a pair. ``write_mmvp(records, path)`` with records ``{"index", "question", "options": [a, b],
  "answer": "a"|"b"}``.
* ``vqav2`` / ``okvqa`` -- the official VQA layout: ``--data`` is a folder (or the questions file) holding one
  ``*questions*.json`` (``{"data_subtype": "val2014", "questions": [{"question_id", "image_id", "question"}]}``)
  and one ``*annotations*.json`` (``{"annotations": [{"question_id", "image_id", "answers": [{"answer",
  "answer_confidence", "answer_id"}] x 10, "multiple_choice_answer", "answer_type", "question_type"}]}``); images
  ``COCO_<data_subtype>_<image_id:012d>.jpg``. ``write_vqa(records, folder, task="vqav2")`` with records
  ``{"question_id", "image_id", "question", "answers": [10 strings]}``.
* ``gqa`` -- GQA's ``testdev_balanced_questions.json``: ``{qid: {"imageId": "n161313", "question", "answer"}}``,
  images ``<imageId>.jpg``. ``write_gqa(records, path)`` (records ``{"question_id", "image_id", "question",
  "answer"}``).
* ``vizwiz`` -- VizWiz's ``val.json``: ``[{"image": "VizWiz_val_00000000.jpg", "question", "answers": [{"answer",
  "answer_confidence"}] x 10, "answerable", "answer_type"}]``. ``write_vizwiz(records, path)`` (records
  ``{"image", "question", "answers": [10 strings]}``).
* ``coco-caption`` -- COCO caption annotations (``captions_val2014.json`` or the Karpathy test split in that
  format): ``{"images": [{"id", "file_name"}], "annotations": [{"id", "image_id", "caption"}]}``.
  ``write_coco_captions(records, path)`` with records ``{"image_id", "file_name", "captions": [...]}``.
* ``image2paragraph`` -- Stanford paragraphs ``paragraphs_v1.json``: ``[{"image_id", "paragraph", "url"}]``,
  images ``<image_id>.jpg``; ``split_file=test_split.json`` (a list of image ids) selects the split.
  ``write_paragraphs(records, path, split_ids=None, split_path=None)``.
* ``refcocog-region-caption`` / ``refcoco-region-caption`` / ``refcoco+-region-caption`` -- the refer layout:
  ``--data`` is the data set folder holding ``refs(umd).p`` (refcocog; ``refs(unc).p`` for refcoco/refcoco+) and
  ``instances.json`` (COCO instances with segmentations), images ``file_name`` of ``instances.json``; option
  ``split`` (default "val"); the prompt is stage 3's mask prompt (whole image, then the region as a masked image).
  ``write_refcoco(records, folder, dataset="refcocog")`` with records ``{"ref_id", "image_id", "file_name",
  "height", "width", "mask": HxW bool array, "sentences": [...], "split"}``.
* ``t2i-fid`` -- COCO caption annotations as above (the first caption of each image is the prompt), the
  reference images in ``--images``; FID with the standard Inception (torch-fidelity weights from
  ``inception_weights=PATH``; nothing is downloaded) or a user feature extractor (``feature_extractor=
  "module:callable"``); ``samples_per_prompt`` and ``clip_scorer=DIR`` (CLIP reranking) are the paper's options.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "TASKS": ".tasks",
    "get_task": ".tasks",
    "evaluate": ".runner",
    "format_results_table": ".runner",
    "write_pope": ".formats",
    "write_robustvqa": ".formats",
    "write_mmvp": ".formats",
    "write_vqa": ".formats",
    "write_gqa": ".formats",
    "write_vizwiz": ".formats",
    "write_coco_captions": ".formats",
    "write_paragraphs": ".formats",
    "write_refcoco": ".formats",
    "convert_imagenet_for_robustvqa": ".formats",
    "DataError": ".formats",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
