"""`evaluate`: one benchmark end to end -- check everything, load the model, generate / score in left-padded
batches (resumable JSONL, accelerate shards), merge on rank 0, score, write results.json + results.md."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from transformers.utils import logging

from .formats import DataError, atomic_write
from .tasks import GENERATION_OPTIONS, Task, get_task, load_samples

logger = logging.get_logger(__name__)

__all__ = ["ANSWER_MODES", "evaluate", "format_results_table"]

ANSWER_MODES = ("generate", "score", "both")
DTYPES = ("float32", "bfloat16", "float16")
PREDICTIONS = "predictions.jsonl"
RUN_FILE = "run.json"
# what each family reports first (the model card's evaluation table)
HEADLINE = {
    "pope": ("accuracy", "f1"),
    "robustvqa": ("accuracy",),
    "mmvp": ("pair_accuracy",),
    "vqa": ("accuracy",),
    "gqa": ("accuracy",),
    "vizwiz": ("accuracy",),
    "caption": ("cider", "bleu_4", "meteor", "rouge_l"),
    "paragraph": ("cider", "bleu_4", "meteor"),
    "refcoco": ("cider", "meteor"),
    "fid": ("fid",),
}


# ------------------------------------------------------------------------------------------------------ checks
def _check_int(value, what: str, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return value


def resolve_options(task: Task, task_options: dict, max_new_tokens) -> tuple[dict, dict]:
    """(generation settings, task options): the paper's defaults with the caller's changes; unknown names raise."""
    generation = dict(task.generation)
    options = dict(task.options)
    allowed = set(task.options) | (set(GENERATION_OPTIONS) if task.family != "fid" else set())
    unknown = sorted(set(task_options) - allowed)
    if unknown:
        raise ValueError(f"task {task.name} has no option(s) {unknown}; its options are {sorted(allowed)}")
    for name, value in task_options.items():
        (generation if name in GENERATION_OPTIONS else options)[name] = value
    if max_new_tokens is not None:
        if task.family == "fid":
            raise ValueError("max_new_tokens does not apply to t2i-fid (it draws images)")
        generation["max_new_tokens"] = max_new_tokens
    for name in ("num_beams", "max_new_tokens"):
        if name in generation:
            _check_int(generation[name], name)
    if "min_new_tokens" in generation:
        value = generation["min_new_tokens"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"min_new_tokens must be a non-negative integer, got {value!r}")
        generation["min_new_tokens"] = min(value, generation["max_new_tokens"])
    for name in ("length_penalty", "repetition_penalty"):
        if name in generation and (
            isinstance(generation[name], bool) or not isinstance(generation[name], (int, float))
        ):
            raise ValueError(f"{name} must be a number, got {generation[name]!r}")
    if task.family == "pope" and options["parser"] not in ("pope", "lmms-eval"):
        raise ValueError(f"parser must be 'pope' (POPE's script) or 'lmms-eval', got {options['parser']!r}")
    for name in ("meteor", "spice"):
        if name in options and not isinstance(options[name], bool):
            raise ValueError(f"{name} must be true or false, got {options[name]!r}")
    if task.family == "fid":
        _check_int(options["samples_per_prompt"], "samples_per_prompt")
        _check_int(options["num_inference_steps"], "num_inference_steps")
        if options["inception_weights"] is None and options["feature_extractor"] is None:
            raise ValueError(
                "t2i-fid needs inception_weights=PATH (torch-fidelity's pt_inception-2015-12-05 weights; nothing is "
                "downloaded) or feature_extractor='module:callable'"
            )
        if options["inception_weights"] is not None and not Path(options["inception_weights"]).is_file():
            raise FileNotFoundError(f"inception_weights {options['inception_weights']} is not a file")
        if options["clip_scorer"] is not None and not Path(options["clip_scorer"]).is_dir():
            raise FileNotFoundError(f"clip_scorer {options['clip_scorer']} is not a directory (a CLIP model dir)")
        if options["samples_per_prompt"] > 1 and options["clip_scorer"] is None:
            raise ValueError("samples_per_prompt > 1 needs clip_scorer=DIR to pick one image per prompt")
    return generation, options


def _distributed_state(device):
    """accelerate's state under `accelerate launch` / torchrun (WORLD_SIZE > 1), else None. On CPU (no CUDA, or
    ``device="cpu"``) the processes meet over gloo."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    from accelerate import PartialState

    cpu = not torch.cuda.is_available() or (device is not None and str(device).startswith("cpu"))
    return PartialState(cpu=cpu)


def _resolve_device(device, state):
    import torch

    if state is not None:
        return state.device
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r} is not a torch device ({err})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} asked for, but CUDA is not available")
    return device


def _resolve_dtype(dtype):
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return getattr(torch, dtype)


def _load_model(model, processor, device, dtype):
    from ..modeling.modeling_deem import DeemForInterleavedGeneration
    from ..modeling.processing_deem import DeemProcessor

    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model {path} is not a saved model directory (no config.json)")
        loaded = DeemForInterleavedGeneration.from_pretrained(path, dtype=dtype)
        if processor is None:
            processor = DeemProcessor.from_pretrained(path)
        name = str(path)
    else:
        if not callable(getattr(model, "generate", None)) or not callable(getattr(model, "score_options", None)):
            raise TypeError(f"model must be a model directory or a DeemForInterleavedGeneration, got {type(model)}")
        if processor is None:
            raise ValueError("a loaded model needs processor= (its DeemProcessor)")
        loaded = model.to(dtype) if dtype is not None else model
        name = getattr(model, "name_or_path", None) or type(model).__name__
    if hasattr(processor, "check_model_config"):
        processor.check_model_config(loaded.config)
    return loaded.to(device).eval(), processor, name


def _fingerprint(generation: dict, answer_mode: str, task: Task, options: dict) -> dict:
    keep = {k: v for k, v in options.items() if k not in ("parser", "meteor", "spice", "references")}
    return {"task": task.name, "answer_mode": answer_mode, "generation": generation, "options": keep}


def _prepare_out(out: Path, fingerprint: dict, rank0: bool) -> None:
    """Refuse a folder holding another task's (or other settings') predictions; record ours in run.json."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} exists and is not a directory")
    run_file = out / RUN_FILE
    if run_file.is_file():
        try:
            previous = json.loads(run_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise DataError(f"{run_file} is not valid JSON; remove it or use another --out") from None
        if previous.get("task") != fingerprint["task"]:
            raise DataError(
                f"--out {out} holds predictions of task {previous.get('task')!r}, not {fingerprint['task']!r}; "
                "use another --out"
            )
        if previous != fingerprint:
            changed = sorted(k for k in fingerprint if previous.get(k) != fingerprint[k])
            raise DataError(
                f"--out {out} holds {fingerprint['task']} predictions made with other settings ({', '.join(changed)}:"
                f" {[previous.get(k) for k in changed]} vs {[fingerprint[k] for k in changed]}); use another --out "
                "or remove it"
            )
    elif (out / PREDICTIONS).exists():
        raise DataError(f"--out {out} holds {PREDICTIONS} but no {RUN_FILE}: not a deem evaluate folder")
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
        if not run_file.is_file():
            atomic_write(run_file, json.dumps(fingerprint, indent=1).encode("utf-8"))


def _read_predictions(path: Path) -> dict:
    """{id: record} of a predictions JSONL; a torn last line (an interrupted write) is dropped with a warning."""
    done = {}
    if not path.is_file():
        return done
    lines = path.read_text(encoding="utf-8").split("\n")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if n >= len(lines) - 1:
                logger.warning(f"{path}: the last line is incomplete (an interrupted write); it is redone")
                continue
            raise DataError(f"{path} line {n} is not JSON; the predictions file is damaged") from None
        if not isinstance(record, dict) or "id" not in record:
            raise DataError(f"{path} line {n} is not a prediction record")
        done[str(record["id"])] = record
    return done


class _Appender:
    """Appends records to a JSONL, one line per record, flushed as they come (a torn final line is the only
    damage an interruption can do, and it is redone on resume)."""

    def __init__(self, path: Path):
        if path.is_file():
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):  # a torn last line: cut it off before appending
                path.write_bytes(data[: data.rfind(b"\n") + 1])
        self.file = open(path, "a", encoding="utf-8")

    def write(self, records):
        for r in records:
            self.file.write(json.dumps(r, ensure_ascii=False) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self):
        self.file.close()


# ------------------------------------------------------------------------------------------------------ model work
def _open_images(paths):
    import PIL.Image

    out = []
    for p in paths:
        try:
            with PIL.Image.open(p) as im:
                im.load()
                out.append(im.copy())
        except (OSError, ValueError) as err:
            raise DataError(f"cannot read image {p}: {err}") from None
    return out


def _decode_mask(rle):
    from pycocotools import mask as mask_utils

    return mask_utils.decode(rle).astype(bool)


def _encode(processor, batch, device, dtype):
    texts = [s["prompt"] for s in batch]
    images = [_open_images(s["images"]) for s in batch]
    kwargs = {}
    if any(s["masks"] is not None for s in batch):
        kwargs["image_masks"] = [
            [None if m is None else _decode_mask(m) for m in (s["masks"] or [None] * len(s["images"]))] for s in batch
        ]
    enc = processor(text=texts, images=images, padding_side="left", return_tensors="pt", **kwargs)
    inputs = {k: enc[k].to(device) for k in ("input_ids", "attention_mask", "num_images") if k in enc}
    for k in ("pixel_values", "image_masks"):
        if k in enc:
            inputs[k] = enc[k].to(device=device, dtype=dtype)
    return inputs


def _generate(model, processor, inputs, generation):
    if generation.get("num_beams", 1) == 1:  # a beam-search setting (transformers warns about it otherwise)
        generation = {k: v for k, v in generation.items() if k != "length_penalty"}
    out = model.generate(**inputs, soi="stop", do_sample=False, pad_token_id=model.config.pad_token_id, **generation)
    new = out[:, inputs["input_ids"].shape[1] :]
    return [t.strip() for t in processor.batch_decode(new, skip_special_tokens=True)]


def option_ids(processor, options):
    ids = [processor.tokenizer(o, add_special_tokens=False)["input_ids"] for o in options]
    if any(not i for i in ids):
        raise ValueError(f"an answer option tokenises to nothing: {options}")
    return ids


def _score(model, inputs, ids):
    keep = {k: inputs[k] for k in ("attention_mask", "pixel_values", "image_masks", "num_images") if k in inputs}
    scores = model.score_options(inputs["input_ids"], ids, **keep)
    return scores.float().cpu().tolist()


def _run_text(model, processor, shard, appender, batch_size, answer_mode, generation, device, dtype, progress):
    for start in range(0, len(shard), batch_size):
        batch = shard[start : start + batch_size]
        inputs = _encode(processor, batch, device, dtype)
        records = [{"id": s["id"]} for s in batch]
        if answer_mode in ("generate", "both"):
            for r, text in zip(records, _generate(model, processor, inputs, generation)):
                r["prediction"] = text
        if answer_mode in ("score", "both"):
            ids = option_ids(processor, batch[0]["options"])
            for r, row in zip(records, _score(model, inputs, ids)):
                r["option_scores"] = row
                r["choice"] = max(range(len(row)), key=row.__getitem__)
        appender.write(records)
        progress.update(len(batch))


# ------------------------------------------------------------------------------------------------------ scoring
def _pct(x: float) -> float:
    return 100.0 * x


def score_records(task: Task, samples: list[dict], records: dict, answer_mode: str, options: dict) -> dict:
    """Metric values per answer mode (percentages, as the paper's tables; FID as it is)."""
    from . import metrics, parsers

    modes = ("generate", "score") if answer_mode == "both" else (answer_mode,)
    out = {}
    for mode in modes:

        def answer(s, r, parse):
            if mode == "generate":
                return parse(r["prediction"])
            return ["yes", "no"][r["choice"]] if task.closed and s["options"] == [" yes", " no"] else "ab"[r["choice"]]

        recs = [records[s["id"]] for s in samples]
        fam = task.family
        if fam == "pope":
            parse = parsers.POPE_PARSERS[options["parser"]]
            preds = [answer(s, r, parse) for s, r in zip(samples, recs)]
            protocol = options["parser"] if mode == "generate" else "pope"
            values = metrics.pope_metrics(preds, [s["target"] for s in samples], protocol)
            out[mode] = {k: _pct(v) for k, v in values.items()}
        elif fam == "robustvqa":
            preds = [answer(s, r, parsers.deem_yes_no) for s, r in zip(samples, recs)]
            out[mode] = {"accuracy": _pct(metrics.yes_no_accuracy(preds, [s["target"] for s in samples]))}
        elif fam == "mmvp":
            correct = {}
            for s, r in zip(samples, recs):
                pred = answer(s, r, lambda t, s=s: parsers.mmvp_choice(t, s["choices"]))
                correct[int(s["id"])] = pred == s["target"]
            pair, n_pairs = metrics.mmvp_pair_accuracy(correct)
            out[mode] = {
                "pair_accuracy": _pct(pair),
                "question_accuracy": _pct(sum(correct.values()) / len(correct)),
                "num_pairs": n_pairs,
            }
        elif fam in ("vqa", "vizwiz"):
            accs = [
                metrics.vqa_accuracy(parsers.first_line(r["prediction"]), s["target"]) for s, r in zip(samples, recs)
            ]
            out[mode] = {"accuracy": _pct(sum(accs) / len(accs))}
        elif fam == "gqa":
            accs = [
                metrics.exact_match(parsers.first_line(r["prediction"]), s["target"]) for s, r in zip(samples, recs)
            ]
            out[mode] = {"accuracy": _pct(sum(accs) / len(accs))}
        elif fam in ("caption", "paragraph", "refcoco"):
            refs = {s["id"]: s["target"] for s in samples}
            preds = {s["id"]: r["prediction"] for s, r in zip(samples, recs)}
            values = metrics.caption_metrics(refs, preds, meteor=options["meteor"], spice=options["spice"])
            absent = values.pop("absent", None)
            out[mode] = {k: _pct(v) for k, v in values.items()}
            if absent:
                out[mode]["absent"] = absent
    return out


# ------------------------------------------------------------------------------------------------------ output
def format_results_table(results: dict) -> str:
    """results.json -> a markdown table (benchmark, mode, metric, value)."""
    lines = [
        f"# {results['benchmark']} ({results['task']})",
        "",
        f"Model: `{results['model']}`; samples: {results['num_samples']}; protocol: {results['protocol']}",
        "",
        "| Benchmark | Mode | Metric | Value |",
        "|---|---|---|---:|",
    ]
    for mode, values in results["metrics"].items():
        for name, value in values.items():
            if name == "absent":
                continue
            shown = f"{value:.2f}" if isinstance(value, float) else str(value)
            lines.append(f"| {results['benchmark']} | {mode} | {name} | {shown} |")
        for name, why in (values.get("absent") or {}).items():
            lines.append(f"| {results['benchmark']} | {mode} | {name} | absent: {why} |")
    return "\n".join(lines) + "\n"


def _revision(model) -> str | None:
    return getattr(getattr(model, "config", None), "_commit_hash", None)


def _merge(out: Path, samples: list[dict], world: int) -> dict:
    """predictions.jsonl + the ranks' parts -> one predictions.jsonl in sample order (temp file + rename)."""
    records = _read_predictions(out / PREDICTIONS)
    parts = sorted(out.glob("predictions.rank*.jsonl"))
    for part in parts:
        records.update(_read_predictions(part))
    ordered = [records[s["id"]] for s in samples if s["id"] in records]
    extra = [r for k, r in records.items() if k not in {s["id"] for s in samples}]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered + extra)
    atomic_write(out / PREDICTIONS, text.encode("utf-8"))
    for part in parts:
        part.unlink()
    return records


def evaluate(
    task: str,
    data,
    images,
    model,
    out=None,
    *,
    processor=None,
    batch_size: int = 8,
    limit: int | None = None,
    answer_mode: str = "generate",
    device=None,
    dtype=None,
    max_new_tokens: int | None = None,
    **task_options,
) -> dict:
    """Run benchmark ``task`` (see `TASKS`) on ``data`` / ``images`` with ``model``; returns results.json's content.

    Task options (``**task_options``): the generation settings ``num_beams``, ``max_new_tokens``,
    ``min_new_tokens``, ``length_penalty``, ``repetition_penalty`` (defaults: the original's eval settings), and per
    task: ``parser`` (POPE: "pope" or "lmms-eval"), ``meteor`` / ``spice`` (captions), ``split`` / ``references``
    (RefCOCO), ``split_file`` (Image2Paragraph), ``inception_weights`` / ``feature_extractor`` /
    ``samples_per_prompt`` / ``clip_scorer`` / ``num_inference_steps`` / ``guidance_scale`` / ``seed`` (t2i-fid).
    Every argument, record and image file is checked before the model is loaded."""
    spec = get_task(task)
    batch_size = _check_int(batch_size, "batch_size")
    limit = _check_int(limit, "limit", allow_none=True)
    if answer_mode not in ANSWER_MODES:
        raise ValueError(f"answer_mode must be one of {', '.join(ANSWER_MODES)}, got {answer_mode!r}")
    if answer_mode != "generate" and not spec.closed:
        raise ValueError(f"task {spec.name} is open-ended: answer_mode must be 'generate' (no options to score)")
    generation, options = resolve_options(spec, task_options, max_new_tokens)
    torch_dtype = _resolve_dtype(dtype)
    if isinstance(model, (str, os.PathLike)) and not (Path(model) / "config.json").is_file():
        raise FileNotFoundError(f"model {model} is not a saved model directory (no config.json)")
    state = _distributed_state(device)
    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    device = _resolve_device(device, state)
    samples = load_samples(spec, data, images, options)
    if limit is not None:
        samples = samples[:limit]
    if out is None and world > 1:
        raise ValueError("several processes need out= (the folder where the ranks' predictions meet)")
    scratch = None
    if out is None:
        scratch = tempfile.mkdtemp(prefix="deem-evaluate-")
        out = scratch
    out = Path(out)
    fingerprint = _fingerprint(generation, answer_mode, spec, options)
    _prepare_out(out, fingerprint, rank == 0)
    if state is not None:
        state.wait_for_everyone()
    loaded, processor, model_name = _load_model(model, processor, device, torch_dtype)
    try:
        done = _read_predictions(out / PREDICTIONS)
        for part in out.glob("predictions.rank*.jsonl"):  # an interrupted multi-process run
            done.update(_read_predictions(part))
        pending = [s for s in samples if s["id"] not in done]
        shard = pending[rank::world]
        if state is not None:  # every rank has read what is done before any rank writes
            state.wait_for_everyone()
        if done:
            logger.info(f"{spec.name}: {len(samples) - len(pending)} of {len(samples)} samples already done in {out}")
        target = out / (PREDICTIONS if world == 1 else f"predictions.rank{rank}.jsonl")
        progress = logging.tqdm(
            total=len(shard),
            desc=f"{spec.name} (rank {rank})" if world > 1 else spec.name,
            disable=rank != 0 or not shard,
        )
        appender = _Appender(target)
        try:
            if spec.family == "fid":
                from .fid import run_fid_generation

                run_fid_generation(loaded, processor, shard, appender, out, batch_size, options, device, progress)
            else:
                _run_text(
                    loaded,
                    processor,
                    shard,
                    appender,
                    batch_size,
                    answer_mode,
                    generation,
                    device,
                    torch_dtype or loaded.dtype,
                    progress,
                )
        finally:
            appender.close()
            progress.close()
        if state is not None:
            state.wait_for_everyone()
        results = None
        if rank == 0:
            records = _merge(out, samples, world) if world > 1 else _read_predictions(out / PREDICTIONS)
            missing = [s["id"] for s in samples if s["id"] not in records]
            if missing:
                raise RuntimeError(f"{len(missing)} samples have no prediction after the run (e.g. {missing[:3]})")
            if spec.family == "fid":
                from .fid import score_fid

                metrics = {"generate": score_fid(samples, records, out, options, device)}
            else:
                metrics = score_records(spec, samples, records, answer_mode, options)
            results = {
                "task": spec.name,
                "benchmark": spec.benchmark,
                "split": spec.split,
                "protocol": spec.protocol,
                "headline": list(HEADLINE[spec.family]),
                "scale": "percent" if spec.family != "fid" else "FID",
                "metrics": metrics,
                "num_samples": len(samples),
                "model": model_name,
                "revision": _revision(loaded),
                "settings": {
                    "answer_mode": answer_mode,
                    "generation": generation,
                    "options": {k: v for k, v in options.items()},
                    "batch_size": batch_size,
                    "limit": limit,
                    "num_processes": world,
                    "device": str(device),
                    "dtype": str(loaded.dtype).removeprefix("torch."),
                    "data": str(data),
                    "data_sha256": _sha256(data),
                },
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            }
            if scratch is None:
                atomic_write(out / "results.json", json.dumps(results, indent=1).encode("utf-8"))
                atomic_write(out / "results.md", format_results_table(results).encode("utf-8"))
        if state is not None:
            state.wait_for_everyone()
            if results is None:
                results = json.loads((out / "results.json").read_text(encoding="utf-8"))
        return results
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _sha256(path) -> str | None:
    path = Path(path)
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
