"""Answer parsers: generated text -> the answer a benchmark scores. Each protocol is named after its source.

* ``pope_original``: POPE's own evaluation script -- keep the first sentence (text before the first "."), drop
  commas, split on spaces; "No" / "no" / "not" among the words -> "no", anything else -> "yes".
* ``pope_lmms_eval``: lmms-eval's POPE task -- the lower-cased, stripped text itself (only an exact "yes" / "no"
  can be right).
* ``deem_yes_no``: DEEM's RobustVQA scorer (reference §6.6, our reading of its ``extract_answer``): the first line /
  clause, lower-cased, the text after the last "is " / "are " / "a " / "an " / "the " and before " of" / " or " /
  " and ", ":[]" removed.
* ``vqa_normalize``: the official VQA answer normalisation (EvalAI: punctuation, number words -> digits, articles
  dropped, contractions restored).
* ``mmvp_choice``: the option letter "a" / "b" of an MMVP answer ("(a)", "a)", "a", or the option's text).
"""

from __future__ import annotations

import re

__all__ = [
    "POPE_PARSERS",
    "deem_yes_no",
    "first_line",
    "mmvp_choice",
    "pope_lmms_eval",
    "pope_original",
    "vqa_normalize",
    "vqa_process_digit_article",
    "vqa_process_punctuation",
]


def first_line(text: str) -> str:
    return text.strip().split("\n")[0].strip()


def pope_original(text: str) -> str:
    """POPE's evaluate.py: "no" if the first sentence holds the word "No", "no" or "not", else "yes"."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_lmms_eval(text: str) -> str:
    """lmms-eval's ``pope_process_results``: ``results[0].lower().strip()``."""
    return text.lower().strip()


POPE_PARSERS = {"pope": pope_original, "lmms-eval": pope_lmms_eval}

_CLAUSE = re.compile(r"[.,;!?\n]")


def deem_yes_no(text: str) -> str:
    answer = _CLAUSE.split(text.strip().lower(), maxsplit=1)[0]
    for lead in ("is ", "are ", "a ", "an ", "the "):
        if lead in answer:
            answer = answer.rsplit(lead, 1)[1]
    for tail in (" of", " or ", " and "):
        if tail in answer:
            answer = answer.split(tail, 1)[0]
    return re.sub(r"[:\[\]]", "", answer).strip()


# ------------------------------------------------------------------------- the official VQA normalisation (EvalAI)
_CONTRACTIONS_TEXT = (
    "aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've "
    "couldnt've:couldn't've didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've "
    "hadn'tve:hadn't've hasnt:hasn't havent:haven't hed:he'd hed've:he'd've he'dve:he'd've hes:he's howd:how'd "
    "howll:how'll hows:how's Id've:I'd've I'dve:I'd've Im:I'm Ive:I've isnt:isn't itd:it'd itd've:it'd've "
    "it'dve:it'd've itll:it'll let's:let's maam:ma'am mightnt:mightn't mightnt've:mightn't've "
    "mightn'tve:mightn't've mightve:might've mustnt:mustn't mustve:must've neednt:needn't notve:not've "
    "oclock:o'clock oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at 'ow'sat:'ow's'at shant:shan't "
    "shed've:she'd've she'dve:she'd've she's:she's shouldve:should've shouldnt:shouldn't "
    "shouldnt've:shouldn't've shouldn'tve:shouldn't've somebody'd:somebodyd somebodyd've:somebody'd've "
    "somebody'dve:somebody'd've somebodyll:somebody'll somebodys:somebody's someoned:someone'd "
    "someoned've:someone'd've someone'dve:someone'd've someonell:someone'll someones:someone's "
    "somethingd:something'd somethingd've:something'd've something'dve:something'd've somethingll:something'll "
    "thats:that's thered:there'd thered've:there'd've there'dve:there'd've therere:there're theres:there's "
    "theyd:they'd theyd've:they'd've they'dve:they'd've theyll:they'll theyre:they're theyve:they've "
    "twas:'twas wasnt:wasn't wed've:we'd've we'dve:we'd've weve:we've werent:weren't whatll:what'll "
    "whatre:what're whats:what's whatve:what've whens:when's whered:where'd wheres:where's whereve:where've "
    "whod:who'd whod've:who'd've who'dve:who'd've wholl:who'll whos:who's whove:who've whyll:why'll "
    "whyre:why're whys:why's wont:won't wouldve:would've wouldnt:wouldn't wouldnt've:wouldn't've "
    "wouldn'tve:wouldn't've yall:y'all yall'll:y'all'll y'allll:y'all'll yall'd've:y'all'd've "
    "y'alld've:y'all'd've y'all'dve:y'all'd've youd:you'd youd've:you'd've you'dve:you'd've youll:you'll "
    "youre:you're youve:you've"
)
CONTRACTIONS = dict(pair.split(":", 1) for pair in _CONTRACTIONS_TEXT.split())
NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = ("a", "an", "the")
_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def vqa_process_punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def vqa_process_digit_article(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_normalize(text: str) -> str:
    """EvalAI's answer processing: whitespace, punctuation, then number words / articles / contractions."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return vqa_process_digit_article(vqa_process_punctuation(text))


_LETTER = re.compile(r"^\(?([ab])\)?(?:[\s.:,)]|$)")


def mmvp_choice(text: str, options: list[str] | None = None) -> str | None:
    """ "a" / "b" (or ``None`` when the answer names neither)."""
    answer = text.strip().lower()
    marked = [(answer.find(f"({letter})"), letter) for letter in "ab" if f"({letter})" in answer]
    if marked:
        return min(marked)[1]
    match = _LETTER.match(answer)
    if match:
        return match.group(1)
    if options:
        named = [letter for letter, option in zip("ab", options) if option.strip().lower() in answer]
        if len(named) == 1:
            return named[0]
    return None
