"""Model card and Hub upload for DEEM checkpoints.

``render_model_card`` fills ``hub_card.md`` (a ``string.Template``: ``${name}`` placeholders, ``$$`` for a literal
dollar) with the model's configuration, the repo id, the YAML metadata (built with ``huggingface_hub.ModelCardData``
so the Hub reads it: license, ``library_name: transformers``, ``pipeline_tag: image-text-to-text``, tags,
``base_model``, ``model-index``) and an evaluation table.

``push_model`` pushes a model, its processor and the rendered card to one repo and revision in a single commit (what
``model.push_to_hub`` + ``processor.push_to_hub`` upload, plus README.md, minus stale weight shards).
``write_model_card`` is the hook for ``DeemForInterleavedGeneration._upload_modified_files``, so that
``model.push_to_hub`` itself ships the card.

Evaluation results (``results=`` / ``results_json=``), one of:

* ``{"VQAv2": 68.2, "POPE": 86.8}``: benchmark -> score (a row dict instead of a score is accepted too);
* a list of rows ``{"benchmark": "VQAv2", "score": 68.2, "metric": "accuracy", "split": "test-dev",
  "dataset": "HuggingFaceM4/VQAv2", "task": "visual-question-answering", "notes": "...", "source_url": "..."}``;
  only ``benchmark`` and ``score`` (alias ``value``) are required; ``metric`` defaults to ``"accuracy"``, ``task``
  to ``"image-text-to-text"``, ``dataset`` (the Hub dataset id used in ``model-index``) to a slug of the
  benchmark name;
* either of the above under a ``"results"`` key (e.g. an evaluation script's JSON file);
* a ``deem evaluate`` results.json (``{"task", "benchmark", "metrics", "headline", ...}``; its headline metrics
  become rows, see `evaluation_rows`), a list of them, or a folder holding them (every ``results.json`` under it);
* a path to such a JSON file, or the JSON text itself.

Scores are shown as given (numbers or strings such as ``"68.2 / 70.1"``); NaN / inf scores are refused.

Arguments are checked before anything is written or sent: a repo id that the Hub would refuse, a missing
``save_directory``, a results file that does not exist or is not JSON, a bad ``max_shard_size`` ... raise a
``ValueError`` (``FileNotFoundError`` / ``NotADirectoryError`` for paths) naming the argument.
"""

from __future__ import annotations

import json
import math
import os
import re
import string
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData

__all__ = [
    "CARD_MARKER",
    "check_repo_id",
    "DEFAULT_BASE_MODELS",
    "DEFAULT_TAGS",
    "evaluation_rows",
    "normalize_results",
    "push_model",
    "render_model_card",
    "results_from_card",
    "template_path",
    "write_model_card",
]

DEFAULT_BASE_MODELS = ("lmsys/vicuna-7b-v1.5", "stabilityai/stable-diffusion-2-1-base")
DEFAULT_TAGS = ("deem", "multimodal", "interleaved", "diffusion", "custom_code")
DEFAULT_TASK = "image-text-to-text"
# Written into every rendered card: `write_model_card` re-renders cards that carry it and keeps hand-written ones.
CARD_MARKER = "<!-- deem-transformers model card: rendered by deem.hub.render_model_card from hub_card.md -->"
# Cards that transformers / huggingface_hub write by default (replaced by the DEEM card).
_DEFAULT_CARD_SIGNS = (
    "This is the model card of a 🤗 transformers model that has been pushed on the Hub",
    "<!-- Provide a quick summary of what the model is/does. -->",
)
_ROW_KEYS = {"benchmark", "score", "value", "metric", "split", "dataset", "task", "notes", "source_url"}
_SHARD_SIZE = re.compile(r"(\d+(?:\.\d+)?)(TB|GB|MB|KB)")


def check_repo_id(repo_id, what: str = "repo_id") -> str:
    """``repo_id`` if the Hub accepts it (``name`` or ``namespace/name``), else a ``ValueError`` saying why."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(repo_id, str):
        raise ValueError(f"{what} must be a string 'name' or 'namespace/name', got {type(repo_id).__name__}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"{what} {repo_id!r} is not a valid Hub repo id: {err}") from None
    return repo_id


def _check_str(value, what: str, optional: bool = True) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")


def _check_base_models(base_model) -> None:
    if base_model is None:
        return
    items = [base_model] if isinstance(base_model, str) else base_model
    if not isinstance(items, (list, tuple)) or not items:
        raise ValueError(f"base_model must be a Hub id or a non-empty list of them, got {base_model!r}")
    for item in items:
        check_repo_id(item, "base_model")


def _check_tags(tags) -> None:
    if tags is None:
        return
    if (
        isinstance(tags, str)
        or not isinstance(tags, (list, tuple))
        or not all(isinstance(t, str) and t.strip() for t in tags)
    ):
        raise ValueError(f"tags must be a list of non-empty strings, got {tags!r}")


def _check_shard_size(size) -> None:
    match = _SHARD_SIZE.fullmatch(size.strip()) if isinstance(size, str) else None
    ok = (isinstance(size, int) and not isinstance(size, bool) and size > 0) or (
        match is not None and float(match.group(1)) > 0
    )
    if not ok:
        raise ValueError(f"max_shard_size must be a positive number of bytes or a size like '5GB', got {size!r}")


def _check_num_parameters(num_parameters) -> None:
    if num_parameters is not None and (
        isinstance(num_parameters, bool) or not isinstance(num_parameters, int) or num_parameters < 0
    ):
        raise ValueError(f"num_parameters must be a non-negative integer, got {num_parameters!r}")


def template_path() -> Path:
    """``hub_card.md``: next to this module when packaged, else at the repository root (source / editable)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "hub_card.md", here.parent / "hub_card.md"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        "hub_card.md (the model-card template) was not found next to deem/hub.py nor at the repository root; "
        "install deem-transformers from a source checkout or pass template=..."
    )


# ---------------------------------------------------------------------------------------------------- results
def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "benchmark"


def _is_evaluation(results) -> bool:
    return isinstance(results, dict) and {"task", "benchmark", "metrics"} <= set(results)


_MODE_NAMES = {"generate": None, "score": "option scoring"}


def evaluation_rows(results: dict) -> list[dict]:
    """The card rows of one ``deem evaluate`` results.json: its headline metrics (``headline``) per answer mode,
    rounded to 2 decimals (percentages; FID as it is); metrics reported absent are left out."""
    metrics = results.get("metrics")
    if not isinstance(metrics, dict) or not metrics:
        raise ValueError(f"results of {results.get('task')!r}: 'metrics' must be a non-empty dict of answer modes")
    headline = results.get("headline") or []
    settings = results.get("settings") or {}
    task = "text-to-image" if results.get("task") == "t2i-fid" else DEFAULT_TASK
    rows = []
    for mode, values in metrics.items():
        if not isinstance(values, dict):
            raise ValueError(f"results of {results['task']!r}: metrics[{mode!r}] must be a dict")
        names = [n for n in headline if n in values] or [
            n for n, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        suffix = _MODE_NAMES.get(mode, mode)
        for name in names:
            value = values[name]
            rows.append(
                {
                    "benchmark": results["benchmark"],
                    "score": round(float(value), 2),
                    "metric": f"{name} ({suffix})" if suffix else name,
                    "split": results.get("split"),
                    "task": task,
                    "notes": f"deem evaluate --task {results['task']}, {results.get('num_samples')} samples"
                    + (f", {settings['answer_mode']}" if settings.get("answer_mode") == "both" else ""),
                }
            )
    return rows


def normalize_results(results: Any) -> list[dict]:
    """Any accepted results format (see the module docstring) -> a list of canonical rows
    ``{benchmark, score, metric, split, dataset, task, notes, source_url}`` (missing optional fields are ``None``)."""
    if results is None:
        return []
    if isinstance(results, os.PathLike) or (isinstance(results, str) and not results.lstrip().startswith(("{", "["))):
        path = Path(results)
        if path.is_dir():  # a folder of `deem evaluate` outputs: every results.json under it
            found = sorted(path.rglob("results.json"))
            if not found:
                raise FileNotFoundError(f"results: the folder {path} holds no results.json (deem evaluate's output)")
            return [row for file in found for row in normalize_results(file)]
        if not path.is_file():
            raise FileNotFoundError(f"results: {str(results)!r} is neither JSON text nor an existing JSON file")
        try:
            return normalize_results(json.loads(path.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"results: {path} is not valid JSON ({err})") from None
    if isinstance(results, str):
        try:
            return normalize_results(json.loads(results))
        except json.JSONDecodeError as err:
            raise ValueError(f"results: not valid JSON text ({err})") from None
    if _is_evaluation(results):
        results = evaluation_rows(results)
    elif isinstance(results, (list, tuple)) and any(_is_evaluation(r) for r in results):
        results = [row for r in results for row in (evaluation_rows(r) if _is_evaluation(r) else [r])]
    if isinstance(results, dict) and isinstance(results.get("results"), (dict, list)):
        results = results["results"]
    if isinstance(results, dict):
        rows = [
            dict(value, benchmark=key) if isinstance(value, dict) else {"benchmark": key, "score": value}
            for key, value in results.items()
        ]
    elif isinstance(results, (list, tuple)):
        rows = list(results)
    else:
        raise TypeError(
            f"results must be a dict, a list of rows, a JSON string or a path, got {type(results).__name__}"
        )
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise TypeError(f"results row {i} must be a dict, got {type(row).__name__}")
        unknown = set(row) - _ROW_KEYS
        if unknown:
            raise ValueError(f"results row {i}: unknown keys {sorted(unknown)} (allowed: {sorted(_ROW_KEYS)})")
        benchmark = row.get("benchmark")
        if not isinstance(benchmark, str) or not benchmark.strip():
            raise ValueError(f"results row {i}: 'benchmark' must be a non-empty string")
        score = row.get("score", row.get("value"))
        if score is None or isinstance(score, bool) or not isinstance(score, (int, float, str)):
            raise ValueError(f"results row {i} ({benchmark}): 'score' must be a number or a string, got {score!r}")
        if isinstance(score, float) and not math.isfinite(score):
            raise ValueError(f"results row {i} ({benchmark}): 'score' must be a finite number, got {score!r}")
        if isinstance(score, str) and not score.strip():
            raise ValueError(f"results row {i} ({benchmark}): 'score' is an empty string")
        out.append(
            {
                "benchmark": benchmark.strip(),
                "score": score,
                "metric": row.get("metric") or "accuracy",
                "split": row.get("split"),
                "dataset": row.get("dataset"),
                "task": row.get("task") or DEFAULT_TASK,
                "notes": row.get("notes"),
                "source_url": row.get("source_url"),
            }
        )
    return out


def _eval_results(rows: list[dict]) -> list[EvalResult]:
    return [
        EvalResult(
            task_type=r["task"],
            dataset_type=r["dataset"] or _slug(r["benchmark"]),
            dataset_name=r["benchmark"],
            metric_type=r["metric"],
            metric_value=r["score"],
            dataset_split=r["split"],
            source_url=r["source_url"],
            source_name="source" if r["source_url"] else None,
        )
        for r in rows
    ]


def results_from_card(text: str) -> list[dict]:
    """The evaluation rows stored in a card's ``model-index`` metadata (``[]`` if none or unreadable)."""
    try:
        data = ModelCard(text, ignore_metadata_errors=True).data
    except Exception:  # noqa: BLE001 - a malformed card simply has no readable results
        return []
    rows = []
    for r in getattr(data, "eval_results", None) or []:
        rows.append(
            {
                "benchmark": r.dataset_name,
                "score": r.metric_value,
                "metric": r.metric_type,
                "split": r.dataset_split,
                "dataset": r.dataset_type if r.dataset_type != _slug(r.dataset_name) else None,
                "task": r.task_type,
                "notes": None,
                "source_url": r.source_url,
            }
        )
    return rows


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        value = f"{value:.6g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _evaluation_section(rows: list[dict]) -> str:
    if not rows:
        return "No evaluation results were published with this checkpoint."
    columns = [("Benchmark", "benchmark")]
    if any(r["split"] for r in rows):
        columns.append(("Split", "split"))
    columns += [("Metric", "metric"), ("Score", "score")]
    if any(r["notes"] for r in rows):
        columns.append(("Notes", "notes"))
    lines = ["| " + " | ".join(title for title, _ in columns) + " |"]
    lines.append("|" + "|".join("---:" if key == "score" else "---" for _, key in columns) + "|")
    for r in rows:
        lines.append("| " + " | ".join(_cell(r[key]) for _, key in columns) + " |")
    return "\n".join(lines) + "\n\nThe same scores are in this card's `model-index` metadata."


# ------------------------------------------------------------------------------------------------------ card
def _get(config, dotted: str, default=None):
    obj = config
    for part in dotted.split("."):
        if obj is None:
            return default
        obj = obj.get(part) if isinstance(obj, dict) else getattr(obj, part, None)
    return default if obj is None else obj


def _human(n: int | None) -> str:
    if n is None:
        return "see `model.num_parameters()`"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit} ({n:,})"
    return f"{n:,}"


def render_model_card(
    model_config,
    repo_id: str,
    results_json=None,
    base_model=None,
    license: str = "apache-2.0",
    *,
    num_parameters: int | None = None,
    tags=None,
    template: str | os.PathLike | None = None,
) -> str:
    """The README.md text for a DEEM checkpoint.

    Args:
        model_config: the model's `DeemConfig` (or its ``to_dict()``).
        repo_id: ``namespace/name`` used in the usage snippets and as the ``model-index`` name.
        results_json: evaluation results in any format of `normalize_results`, or ``None``.
        base_model: Hub id or list of ids (default: Vicuna-7B v1.5 and Stable Diffusion 2.1-base).
        license: SPDX-like Hub license id.
        num_parameters: shown in the overview table (``model.num_parameters()``).
        tags: extra tags, added after the DEEM ones.
        template: another template file (default `template_path()`).
    """
    check_repo_id(repo_id)
    _check_str(license, "license", optional=False)
    _check_base_models(base_model)
    _check_tags(tags)
    _check_num_parameters(num_parameters)
    if model_config is None:
        raise ValueError("model_config must be the model's DeemConfig (or its to_dict()), got None")
    template_file = Path(template) if template is not None else template_path()
    if not template_file.is_file():
        raise FileNotFoundError(f"template: {template_file} is not a file")
    rows = normalize_results(results_json)
    bases = [base_model] if isinstance(base_model, str) else list(base_model or DEFAULT_BASE_MODELS)
    all_tags = list(DEFAULT_TAGS) + [t for t in (tags or []) if t not in DEFAULT_TAGS]
    model_name = repo_id.rstrip("/").split("/")[-1]
    card_data = ModelCardData(
        language=["en"],
        license=license,
        library_name="transformers",
        pipeline_tag=DEFAULT_TASK,
        tags=all_tags,
        base_model=bases,
        model_name=model_name if rows else None,
        eval_results=_eval_results(rows) or None,
    )
    diffusion = _get(model_config, "diffusion_config")
    if diffusion is None:
        diffusion_text = "none (a text-output checkpoint without diffusion weights)"
    else:
        size = _get(diffusion, "image_size", 512)
        diffusion_text = (
            f"Stable Diffusion UNet + VAE at {size}×{size} px, conditioned on the language model's context; also "
            "checks every input image's encoding (L_CSR)"
        )
    loss_weight = _get(model_config, "loss_nip_weight", 5.0)
    values = {
        "card_data": card_data.to_yaml().strip(),
        "marker": CARD_MARKER,
        "model_name": model_name,
        "repo_id": repo_id,
        "num_parameters": _human(num_parameters),
        "text_layers": _get(model_config, "text_config.num_hidden_layers", "?"),
        "text_hidden_size": _get(model_config, "text_config.hidden_size", "?"),
        "vocab_size": _get(model_config, "text_config.vocab_size", "?"),
        "vision_backbone": f"CLIP-ConvNeXt (`{_get(model_config, 'vision_config.backbone', 'convnext_base')}`)",
        "encoder_resolution": _get(model_config, "vision_config.image_size", "?"),
        "num_image_tokens": _get(model_config, "num_image_tokens", 77),
        "cross_attention_frequency": _get(model_config, "cross_attention_config.frequency", "?"),
        "diffusion": diffusion_text,
        "base_models": ", ".join(f"[{b}](https://huggingface.co/{b})" for b in bases),
        "loss_weight": f"{loss_weight:g}" if isinstance(loss_weight, (int, float)) else loss_weight,
        "evaluation": _evaluation_section(rows),
    }
    text = template_file.read_text(encoding="utf-8")
    try:
        return string.Template(text).substitute(values)
    except KeyError as err:
        raise ValueError(
            f"template {template_file}: unknown placeholder ${{{err.args[0]}}} (known: {', '.join(sorted(values))})"
        ) from None
    except ValueError as err:
        raise ValueError(f"template {template_file}: {err} (write $$ for a literal dollar)") from None


def _is_replaceable(text: str | None) -> bool:
    return not text or not text.strip() or CARD_MARKER in text or any(sign in text for sign in _DEFAULT_CARD_SIGNS)


def _card_settings(text: str | None) -> dict:
    """license / base_model / tags / results of an existing card (only what a DEEM card would carry over)."""
    if not text:
        return {}
    try:
        data = ModelCard(text, ignore_metadata_errors=True).data.to_dict()
    except Exception:  # noqa: BLE001
        return {}
    out = {"tags": [t for t in data.get("tags") or [] if isinstance(t, str)]}
    if CARD_MARKER in text:
        out.update(license=data.get("license"), base_model=data.get("base_model"), results=results_from_card(text))
    return out


def _merged_card(existing: str | None, model_config, repo_id, results, base_model, license, num_parameters) -> str:
    carried = _card_settings(existing)
    return render_model_card(
        model_config,
        repo_id,
        results if results is not None else carried.get("results") or None,
        base_model=base_model or carried.get("base_model"),
        license=license or carried.get("license") or "apache-2.0",
        num_parameters=num_parameters,
        tags=carried.get("tags"),
    )


def write_model_card(
    save_directory: str | os.PathLike,
    model_config,
    repo_id: str,
    results=None,
    *,
    base_model=None,
    license: str | None = None,
    num_parameters: int | None = None,
    overwrite: bool = False,
) -> Path | None:
    """Write the DEEM card to ``save_directory/README.md``; returns its path, or ``None`` if a hand-written card
    is kept.

    An existing README.md (the card transformers fetched from the repo, or its default card) is replaced when it is
    transformers' / huggingface_hub's default card or an earlier DEEM card, whose license, base models and
    evaluation results are carried over unless given here; any other card is kept unless ``overwrite=True``. Tags
    of the existing card (e.g. from ``push_to_hub(tags=...)``) are kept.
    """
    folder = Path(save_directory)
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else "is not a directory"
        raise NotADirectoryError(f"save_directory {folder} {what}")
    check_repo_id(repo_id)
    readme = folder / "README.md"
    if readme.exists() and not readme.is_file():
        raise IsADirectoryError(f"{readme} is not a file")
    existing = readme.read_text(encoding="utf-8") if readme.is_file() else None
    if not overwrite and not _is_replaceable(existing):
        return None
    readme.write_text(
        _merged_card(existing, model_config, repo_id, results, base_model, license, num_parameters), encoding="utf-8"
    )
    return readme


# ------------------------------------------------------------------------------------------------------ push
_WEIGHT_FILE = re.compile(
    r"(model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)|(model\.safetensors|pytorch_model\.bin)\.index\.json"
)


def push_model(
    model,
    processor,
    repo_id: str,
    results=None,
    revision: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str = "Upload DEEM model",
    *,
    max_shard_size: int | str = "5GB",
    base_model=None,
    license: str | None = None,
    create_pr: bool = False,
    commit_description: str | None = None,
    update_card: bool = True,
):
    """Push ``model`` + ``processor`` + the DEEM model card to ``repo_id`` at ``revision`` in one commit.

    Does what ``model.push_to_hub`` and ``processor.push_to_hub`` do (create the repo if needed, create the
    ``revision`` branch from main if needed, ``save_pretrained`` into a temporary folder, ``create_commit``; the client
    skips files whose content the revision already has) but in a single commit that also

    * writes README.md from ``hub_card.md`` (``results`` fill the evaluation table and ``model-index``; an existing
      DEEM card's results, license and base models are kept unless given; ``update_card=False`` leaves README.md
      alone), and
    * deletes the revision's weight files that the new checkpoint does not have (``push_to_hub`` leaves them: pushing
      with another ``max_shard_size`` would keep stale shards next to the new ones).

    The folder holds what ``push_to_hub`` uploads: safetensors shards + index, config.json (with ``auto_map``),
    generation_config.json, the modeling files, processor / image processor / tokenizer files.
    Returns the ``CommitInfo`` (``oid``: the new head of ``revision``; ``pr_revision`` with ``create_pr=True``).
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    check_repo_id(repo_id)
    if not callable(getattr(model, "save_pretrained", None)) or not hasattr(model, "config"):
        raise ValueError(
            f"model must be a PreTrainedModel (with save_pretrained and config), got {type(model).__name__}"
        )
    if processor is not None and not callable(getattr(processor, "save_pretrained", None)):
        raise ValueError(f"processor must have save_pretrained (or be None), got {type(processor).__name__}")
    _check_str(revision, "revision")
    _check_str(commit_message, "commit_message", optional=False)
    _check_str(license, "license")
    _check_base_models(base_model)
    _check_shard_size(max_shard_size)
    if results is not None:
        normalize_results(results)  # a bad results file fails here, before anything is pushed

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and not revision.startswith("refs/pr/"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    remote_files = set(api.list_repo_files(repo_id, revision=revision))
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        if processor is not None:
            processor.save_pretrained(tmp)
        if update_card:
            existing = _remote_text(api, repo_id, "README.md", revision) if "README.md" in remote_files else None
            card = _merged_card(existing, model.config, repo_id, results, base_model, license, model.num_parameters())
            Path(tmp, "README.md").write_text(card, encoding="utf-8")
        local = sorted(p.relative_to(tmp).as_posix() for p in Path(tmp).rglob("*") if p.is_file())
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(Path(tmp, name))) for name in local]
        operations += [
            CommitOperationDelete(path_in_repo=name)
            for name in sorted(remote_files - set(local))
            if _WEIGHT_FILE.fullmatch(name)
        ]
        return api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message,
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
        )


def _remote_text(api: HfApi, repo_id: str, filename: str, revision: str | None) -> str | None:
    from huggingface_hub.errors import EntryNotFoundError

    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = api.hf_hub_download(repo_id, filename, revision=revision, local_dir=tmp)
        except EntryNotFoundError:
            return None
        return Path(path).read_text(encoding="utf-8")
