"""DEEM's SFT and evaluation prompt templates (reference §3.4), as data.

The strings are the original code's, character for character, including its whitespace quirks (two spaces after
"ASSISTANT:" in SFT targets, " \\n" vs "\\n" line ends, the " \\n\\n" system variant of some eval sets) and typos
("anwser", role "asistant"): those are the prompts that produced the paper's numbers, and they differ from the
paper's Figure 8. A prompt is ``f"{system} {user} {assistant}".strip()``, with every image written as the
``<image>`` marker that `DeemProcessor` expands to ``<|startofimage|>`` + N ``<|sniffer|>`` (whitespace next to
a marker is dropped there, as the original tokenizer did).

Not available (absent from the reference): the 17 caption instructions and 53 reconstruction instructions sampled
by the caption SFT data sets (pass your own `instruction`), and the exact header of the referring conversations
(``referring`` below uses the documented "## user: " / "## asistant: " roles with the common system text).
"""

import string
from dataclasses import dataclass

IMAGE_MARKER = "<image>"
SYSTEM_PROMPT = "You are a helpful assistant.\n\n"
SYSTEM_PROMPT_EVAL = "You are a helpful assistant. \n\n"  # caption, image2paragraph and text->image eval sets
EOS = "</s>"


@dataclass(frozen=True)
class PromptTemplate:
    """One template: ``system``, ``user`` turn and ``assistant`` prefix; ``target`` is the SFT text that follows
    the prompt (loss is taken on it). Fields are ``str.format`` names; ``{image}`` becomes the ``<image>`` marker."""

    system: str
    user: str
    assistant: str
    target: str | None = None

    def fields(self) -> set[str]:
        parts = (self.user, self.assistant, self.target or "")
        return {name for part in parts for _, name, _, _ in string.Formatter().parse(part) if name} - {"image"}


_VQA_USER = "## USER: Based on the image, please answer the question. {image}"
_ONE_WORD = " Please provide an accurate answer within one word.\n"

TEMPLATES: dict[str, PromptTemplate] = {
    # Stage II SFT (ui/custom_datasets/train/vqa_datasets.py, pairs_datasets.py)
    "vqa_sft": PromptTemplate(
        SYSTEM_PROMPT, _VQA_USER + "{question}\n", "## ASSISTANT:  The answer is", " {answer}" + EOS
    ),
    "caption_sft": PromptTemplate(
        SYSTEM_PROMPT, "## USER: {image}{instruction} \n", "## ASSISTANT:  A photo of", " {caption}" + EOS
    ),
    "text2image_sft": PromptTemplate(
        SYSTEM_PROMPT, "## USER: {instruction}{caption} \n", "## ASSISTANT: ", " {image}" + EOS
    ),
    # Evaluation (ui/custom_datasets/eval/*, ui/configs/eval/*)
    "vqa": PromptTemplate(SYSTEM_PROMPT, _VQA_USER + "{question}" + _ONE_WORD, "## ASSISTANT: The answer is"),
    "vizwiz": PromptTemplate(
        SYSTEM_PROMPT,
        _VQA_USER
        + "{question} When the provided information is insufficient, respond with 'Unanswerable'."
        + _ONE_WORD,
        "## ASSISTANT: The answer is",
    ),
    "caption": PromptTemplate(
        SYSTEM_PROMPT_EVAL,
        "## USER: {image} Could you provide a short description of the image? \n",
        "## ASSISTANT: A photo of",
    ),
    "image2paragraph": PromptTemplate(
        SYSTEM_PROMPT_EVAL,
        "## USER: {image} Please describe the image in detail. \n",
        "## ASSISTANT: The image depicts ",
    ),
    # the original then appends " {image}": the image the model generates from the prompt
    "text2image": PromptTemplate(
        SYSTEM_PROMPT_EVAL,
        "## USER: please reconstruct the complete image from the description and the image to be filled in "
        "{caption} \n",
        "## ASSISTANT: ",
    ),
    "robustvqa": PromptTemplate(
        SYSTEM_PROMPT,
        _VQA_USER + "Is {label} the main object in this image? Please anwser yes or no \n",
        "## ASSISTANT: The answer is",
    ),
    "pope": PromptTemplate(
        SYSTEM_PROMPT, _VQA_USER + "{question} Please anwser yes or no \n", "## ASSISTANT: The answer is"
    ),
    # Stage III mask SFT / referring eval: one <image> per <mask>, the first one being the whole image.
    "referring": PromptTemplate(SYSTEM_PROMPT, "## user: {question}\n", "## asistant: "),
}
PROMPT_KINDS = tuple(TEMPLATES)


def _template(kind: str) -> PromptTemplate:
    if not isinstance(kind, str):
        raise TypeError(f"prompt kind must be a string (one of {', '.join(PROMPT_KINDS)}), got {type(kind).__name__}")
    if kind not in TEMPLATES:
        raise ValueError(f"unknown prompt kind {kind!r}; expected one of {', '.join(PROMPT_KINDS)}")
    return TEMPLATES[kind]


def _check_fields(kind: str, fields: dict) -> None:
    """Fields are strings, and each one is used by `kind` (a misspelt name would otherwise vanish silently)."""
    wrong = {name: type(value).__name__ for name, value in fields.items() if not isinstance(value, str)}
    if wrong:
        raise TypeError(f"prompt {kind!r}: fields must be strings, got {wrong}")
    unknown = sorted(set(fields) - _template(kind).fields())
    if unknown:
        expected = sorted(_template(kind).fields())
        raise ValueError(f"prompt {kind!r} has no field(s) {unknown}; its fields are {expected}")


def _fill(kind: str, text: str, fields: dict) -> str:
    try:
        return text.format(image=IMAGE_MARKER, **fields)
    except KeyError as err:
        raise ValueError(f"prompt {kind!r} needs the field(s) {sorted(_template(kind).fields())}") from err


def format_prompt(kind: str, **fields) -> str:
    """The prompt text of `kind` (see `PROMPT_KINDS`), e.g. ``format_prompt("vqa", question="What is it?")``.

    Returns ``f"{system} {user} {assistant}".strip()`` with ``<image>`` markers; generation continues from its end.
    """
    template = _template(kind)
    _check_fields(kind, fields)
    user, assistant = _fill(kind, template.user, fields), _fill(kind, template.assistant, fields)
    return f"{template.system} {user} {assistant}".strip()


def sft_target(kind: str, **fields) -> str:
    """The SFT target appended to `format_prompt(kind, ...)`, e.g. ``" yes</s>"`` for ``vqa_sft`` (answer="yes")."""
    template = _template(kind)
    if template.target is None:
        raise ValueError(f"prompt {kind!r} is an evaluation prompt and has no SFT target")
    _check_fields(kind, fields)
    return _fill(kind, template.target, fields)


def format_visdial(
    caption: str, history: list[tuple[str, str]], question: str, skip_previous_round: bool = False
) -> str:
    """VisDial option-scoring context (score each option's log-probs after it, options without ``<s>``).

    `history`: the (question, answer) rounds before `question`. The original's loop stops one round early, dropping
    the round right before the asked one (bug B23); `skip_previous_round=True` reproduces that.
    """
    for name, value in (("caption", caption), ("question", question)):
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a string, got {type(value).__name__}")
    if not isinstance(history, (list, tuple)):
        raise TypeError(f"history must be a list of (question, answer) pairs, got {type(history).__name__}")
    for k, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise TypeError(f"history[{k}] must be a (question, answer) pair of strings, got {pair!r}")
    rounds = history[:-1] if skip_previous_round else history
    text = f"{SYSTEM_PROMPT}  ## USER: {IMAGE_MARKER} caption: {caption}. "
    text += "".join(f"question: {q}? answer: {a}. " for q, a in rounds)
    return text + f"question: {question}? \n ## ASSISTANT: the answer is"


__all__ = [
    "EOS",
    "IMAGE_MARKER",
    "PROMPT_KINDS",
    "SYSTEM_PROMPT",
    "SYSTEM_PROMPT_EVAL",
    "TEMPLATES",
    "PromptTemplate",
    "format_prompt",
    "format_visdial",
    "sft_target",
]
