"""The lmms-eval model ``deem``: ``lmms-eval --model deem --model_args pretrained=DIR[,template=pope,...]``.

Registered through lmms-eval's entry-point group ``lmms_eval.models`` (pyproject.toml:
``[project.entry-points."lmms_eval.models"] deem = "deem.evaluation.lmms_plugin:manifest"``), which lmms-eval's model
registry loads at import (``ModelRegistryV2.load_entrypoint_manifests``); the payload is a ``ModelManifest``.

Model args: ``pretrained`` (a saved model directory, required), ``device`` (default cuda if available),
``dtype`` (float32 / bfloat16 / float16), ``batch_size``, ``template``: how lmms-eval's context text becomes the
DEEM prompt --

* ``"chat"`` (default): the processor's chat template, one user turn with the document's images then the context,
  and the assistant prefix (``... ## USER: <image>{context}\\n ## ASSISTANT:``);
* a DEEM prompt kind of `deem.modeling.prompts` with a ``question`` field (``pope``, ``vqa``, ``vizwiz``): the
  paper's template with the context as the question -- what ``deem evaluate`` uses, so the numbers can match;
* ``"raw"``: the context as it is (``<image>`` markers are added in front for images it does not place).

``generate_until`` decodes greedily (or samples with ``do_sample``/``temperature > 0``) up to ``max_new_tokens``
(default 128) and cuts the text at the first ``until`` string; ``loglikelihood`` returns (sum of the continuation's
token log-probs, whether greedy decoding would produce it); ``generate_until_multi_round`` follows lmms-eval's
multi-round protocol (``doc_to_text(doc, previous_output=..., round_idx=..., previous_round_info=...)``).
"""

from __future__ import annotations

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = ["DeemLMMS", "manifest"]


def manifest() -> ModelManifest:
    """The entry point's payload: lmms-eval's model id ``deem`` -> `DeemLMMS`."""
    return ModelManifest(model_id="deem", simple_class_path="deem.evaluation.lmms_plugin.DeemLMMS")


def _bool(value) -> bool:
    if isinstance(value, str):
        if value.strip().lower() in ("1", "true", "yes"):
            return True
        if value.strip().lower() in ("0", "false", "no", ""):
            return False
        raise ValueError(f"expected a boolean, got {value!r}")
    return bool(value)


class DeemLMMS(lmms):
    """lmms-eval's ``lmms`` interface over a saved DEEM (see the module docstring for the model args)."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int | str = 1,
        template: str = "chat",
        max_new_tokens: int | str = 128,
        **kwargs,
    ) -> None:
        super().__init__()
        from ..modeling.prompts import TEMPLATES
        from .runner import _load_model, _resolve_device, _resolve_dtype

        if kwargs:
            logger.warning(f"deem lmms-eval model: ignoring unknown model args {sorted(kwargs)}")
        if template not in ("chat", "raw") and (
            template not in TEMPLATES or TEMPLATES[template].fields() != {"question"}
        ):
            usable = ["chat", "raw"] + [k for k, t in TEMPLATES.items() if t.fields() == {"question"}]
            raise ValueError(f"template must be one of {usable}, got {template!r}")
        self.template = template
        self.batch_size = int(batch_size)
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size!r}")
        self.max_new_tokens = int(max_new_tokens)
        self._dtype = _resolve_dtype(dtype)
        self._device = _resolve_device(device, None)
        self.model, self.processor, _ = _load_model(pretrained, None, self._device, self._dtype)

    # ---------------------------------------------------------------------------------------------- prompts
    def prompt(self, context: str, num_images: int) -> str:
        from ..modeling.prompts import IMAGE_MARKER, format_prompt

        placed = context.count(IMAGE_MARKER)
        if placed > num_images:
            raise ValueError(f"the context places {placed} images but the document gives {num_images}")
        missing = IMAGE_MARKER * (num_images - placed)
        if self.template == "raw":
            return missing + context
        if self.template == "chat":
            content = [{"type": "image"}] * (num_images - placed) + [{"type": "text", "text": context}]
            messages = [{"role": "user", "content": content}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        from ..modeling.prompts import TEMPLATES

        spec = TEMPLATES[self.template]
        own = (spec.user + spec.assistant).count("{image}")  # images the template places itself
        if num_images - placed < own:
            raise ValueError(f"template {self.template!r} shows {own} image(s); the document gives {num_images}")
        return format_prompt(self.template, question=IMAGE_MARKER * (num_images - placed - own) + context)

    def _visuals(self, doc_to_visual, task, split, doc_id) -> list:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        return [v for v in (visuals or []) if v is not None]

    def _inputs(self, prompts, images):
        """Left-padded batch, as ``deem evaluate`` encodes it."""
        enc = self.processor(
            text=prompts, images=images if any(images) else None, padding_side="left", return_tensors="pt"
        )
        out = {k: enc[k].to(self._device) for k in ("input_ids", "attention_mask", "num_images") if k in enc}
        if "pixel_values" in enc:
            out["pixel_values"] = enc["pixel_values"].to(self._device, self.model.dtype)
        return out

    def _generate(self, prompts, images, gen_kwargs: dict) -> list[str]:
        gen = dict(gen_kwargs or {})
        until = gen.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        kwargs = {"max_new_tokens": int(gen.pop("max_new_tokens", self.max_new_tokens))}
        temperature = float(gen.pop("temperature", 0) or 0)
        do_sample = _bool(gen.pop("do_sample", False)) or temperature > 0
        kwargs["do_sample"] = do_sample
        if do_sample:
            kwargs["temperature"] = temperature or 1.0
            if gen.get("top_p") is not None:
                kwargs["top_p"] = float(gen.pop("top_p"))
        gen.pop("top_p", None)
        for name in ("num_beams", "min_new_tokens"):
            if gen.get(name) is not None:
                kwargs[name] = int(gen.pop(name))
        for name in ("length_penalty", "repetition_penalty"):
            if gen.get(name) is not None:
                kwargs[name] = float(gen.pop(name))
        if gen:
            logger.warning_once(f"deem lmms-eval model: ignoring generation kwargs {sorted(gen)}")
        inputs = self._inputs(prompts, images)
        out = self.model.generate(**inputs, soi="stop", pad_token_id=self.model.config.pad_token_id, **kwargs)
        texts = self.processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        cut = []
        for text in texts:
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            cut.append(text.strip())
        return cut

    # ---------------------------------------------------------------------------------------------- interface
    def generate_until(self, requests: list[Instance]) -> list[str]:
        from transformers.utils.logging import tqdm

        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted((req.args[1] or {}).items())), []).append(i)
        progress = tqdm(total=len(requests), desc="deem generate_until", disable=self.rank != 0)
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                prompts, images = [], []
                for i in chunk:
                    context, gen_kwargs, doc_to_visual, doc_id, task, split = requests[i].args
                    visuals = self._visuals(doc_to_visual, task, split, doc_id)
                    prompts.append(self.prompt(context, len(visuals)))
                    images.append(visuals)
                for i, text in zip(chunk, self._generate(prompts, images, requests[chunk[0]].args[1])):
                    results[i] = text
                progress.update(len(chunk))
        progress.close()
        return results

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        import torch

        out = []
        for req in requests:
            context, target, doc_to_visual, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id]
            continuation = target if isinstance(target, str) else target(doc)
            visuals = self._visuals(doc_to_visual, task, split, doc_id)
            inputs = self._inputs([self.prompt(context, len(visuals))], [visuals])
            cont = self.processor.tokenizer(continuation, add_special_tokens=False)["input_ids"]
            if not cont:
                raise ValueError(f"the continuation {continuation!r} tokenises to nothing")
            ids = torch.cat([inputs["input_ids"], torch.tensor([cont], device=self._device)], 1)
            mask = torch.ones_like(ids)
            with torch.no_grad():
                logits = self.model(
                    input_ids=ids,
                    attention_mask=mask,
                    pixel_values=inputs.get("pixel_values"),
                    num_images=inputs.get("num_images"),
                    return_loss=False,
                ).logits
            logprobs = logits[0, -len(cont) - 1 : -1].float().log_softmax(-1)
            target_ids = torch.tensor(cont, device=logprobs.device)
            total = float(logprobs.gather(-1, target_ids[:, None]).sum())
            greedy = bool((logprobs.argmax(-1) == target_ids).all())
            out.append((total, greedy))
        return out

    def generate_until_multi_round(self, requests: list[Instance]) -> list:
        out = []
        for req in requests:
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id]
            visuals = self._visuals(doc_to_visual, task, split, doc_id)
            rounds, info, round_idx = [], None, 0
            while True:
                if round_idx:
                    visuals, context, terminal, _, info = doc_to_text(
                        doc, previous_output=list(rounds), round_idx=round_idx, previous_round_info=info
                    )
                    visuals = [v for v in (visuals or []) if v is not None]
                    if terminal:
                        break
                rounds.append(self._generate([self.prompt(context, len(visuals))], [visuals], gen_kwargs)[0])
                round_idx += 1
            out.append(tuple(rounds))
        return out
