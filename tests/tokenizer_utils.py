"""A small, real LLaMA-style tokenizer for offline tests.

`build_test_tokenizer()` trains a byte-fallback BPE (the model family of the LLaMA / Vicuna tokenizer:
"▁" word prefix, `<unk>`=0, `<s>`=1, `</s>`=2, byte pieces `<0x00>`..`<0xFF>` = 3..258) on the sentences
below and wraps it as a transformers `LlamaTokenizer` (the tokenizers-backed class, alias
`LlamaTokenizerFast`). Training runs once per process (cached, well under a second); every call returns a
fresh tokenizer object, so tests may add tokens to it freely.
"""

import functools
import itertools
import json

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaTokenizer

_SENTENCES = """\
You are a helpful assistant.
Based on the image, please answer the question.
Please provide an accurate answer within one word.
When the provided information is insufficient, respond with 'Unanswerable'.
Could you provide a short description of the image?
Please describe the image in detail.
The image depicts a busy street with cars and people.
please reconstruct the complete image from the description and the image to be filled in
Is there a dog in the image? Please anwser yes or no
Is a zebra the main object in this image? Please answer yes or no.
Provide a short description for this region.
caption: a man riding a horse on the beach. question: what color is the horse? answer: brown.
A photo of a cat sitting on a wooden table next to a cup of coffee.
A photo of two children playing football in a green park.
The answer is yes.
The answer is no.
What is the man holding in his left hand?
How many birds are flying over the lake?
Where is the red car parked?
Which animal is sleeping under the tree?
Describe the picture in one sentence.
Generate an image that matches the following text.
Draw a picture of a mountain covered with snow at sunset.
A small boat floats on a calm blue river under a cloudy sky.
An old woman reads a newspaper on a bench in the morning.
The kitchen has white cabinets, a stainless steel fridge and a large window.
Three zebras graze in the savanna while a giraffe watches them.
A young girl in a yellow raincoat jumps into a puddle.
The train arrives at the station at eight o'clock in the evening.
Diffusion models serve as the eyes of large language models for image perception.
Interleaved image and text documents teach the model to read and to draw.
The quick brown fox jumps over the lazy dog.
Numbers like 1, 2, 3, 10, 42, 100 and 2048 appear in text too.
"""

_SUBJECTS = ["a dog", "the cat", "two people", "a red bus", "an airplane", "the chef", "a small bird", "the girl"]
_VERBS = ["is standing near", "is looking at", "walks toward", "sits beside", "is painted on", "flies over"]
_OBJECTS = [
    "a tall building.",
    "the river.",
    "a wooden fence.",
    "the snowy hill.",
    "a crowded market.",
    "an empty road.",
    "the green field.",
]


def _corpus() -> list[str]:
    """About 370 sentences: the fixed ones above plus subject-verb-object combinations."""
    lines = _SENTENCES.splitlines()
    lines += [f"{s} {v} {o}" for s, v, o in itertools.product(_SUBJECTS, _VERBS, _OBJECTS)]
    lines += [f"## USER: {line} \n ## ASSISTANT: The answer is" for line in lines[:30]]
    return lines


@functools.cache
def _trained_vocab_and_merges(vocab_size: int) -> tuple[str, tuple]:
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = tuple(tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"])
    return json.dumps(model["vocab"]), merges


def build_test_tokenizer(vocab_size: int = 1000) -> LlamaTokenizer:
    """A fresh LLaMA-style BPE tokenizer (`<unk>`=0, `<s>`=1, `</s>`=2, bos added by default, no pad)."""
    vocab_json, merges = _trained_vocab_and_merges(vocab_size)
    return LlamaTokenizer(
        vocab=json.loads(vocab_json), merges=list(merges), legacy=True, add_bos_token=True, add_eos_token=False
    )
