"""Benchmark metrics. Caption metrics are pycocoevalcap's (PTB tokenisation, BLEU, METEOR, ROUGE-L, CIDEr, SPICE);
FID is torchmetrics' (Inception features from torch-fidelity)."""

from __future__ import annotations

import shutil
from pathlib import Path

from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = [
    "caption_metrics",
    "exact_match",
    "frechet_distance",
    "java_available",
    "mmvp_pair_accuracy",
    "pope_metrics",
    "vqa_accuracy",
    "yes_no_accuracy",
]


def _ratio(num: float, den: float) -> float:
    return float(num) / den if den else 0.0


def pope_metrics(predictions: list[str], labels: list[str], protocol: str = "pope") -> dict:
    """Accuracy, precision, recall, F1 and yes-ratio of parsed POPE answers against "yes"/"no" labels.

    ``protocol="pope"`` (POPE's script): every prediction is "yes" or "no"; yes-ratio = share of predicted "yes".
    ``protocol="lmms-eval"`` (lmms-eval's aggregations, kept as they are): a prediction that is neither word counts
    as wrong for accuracy, as neither a false positive nor a false negative, and its yes-ratio is the share of
    "yes" *labels*. A 0/0 ratio is 0 (as lmms-eval; POPE's script would divide by zero).
    """
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    if not labels:
        raise ValueError("no samples to score")
    pairs = list(zip(predictions, labels))
    tp = sum(p == "yes" and g == "yes" for p, g in pairs)
    fp = sum(p == "yes" and g == "no" for p, g in pairs)
    if protocol == "pope":
        fn = sum(p != "yes" and g == "yes" for p, g in pairs)
        yes_ratio = _ratio(sum(p == "yes" for p in predictions), len(predictions))
    elif protocol == "lmms-eval":
        fn = sum(p == "no" and g == "yes" for p, g in pairs)
        yes_ratio = _ratio(sum(g == "yes" for g in labels), sum(g in ("yes", "no") for g in labels))
    else:
        raise ValueError(f"unknown POPE protocol {protocol!r}; expected 'pope' or 'lmms-eval'")
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return {
        "accuracy": _ratio(sum(p == g for p, g in pairs), len(pairs)),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "yes_ratio": yes_ratio,
    }


def yes_no_accuracy(predictions: list[str], labels: list[str]) -> float:
    """Exact-match accuracy of parsed answers (RobustVQA: "yes" for the true class, "no" for the distractor)."""
    return _ratio(sum(p == g for p, g in zip(predictions, labels, strict=True)), len(labels))


def exact_match(prediction: str, answer: str) -> float:
    """GQA accuracy of one answer: exact match after lower-casing and stripping (and a final "." dropped)."""

    def norm(text: str) -> str:
        return text.strip().lower().rstrip(".").strip()

    return float(norm(prediction) == norm(answer))


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """The official VQA accuracy of one answer: for each of the (ten) human answers left out in turn,
    ``min(#matches among the others / 3, 1)``, averaged. The prediction is normalised (EvalAI's answer processing,
    what a submission to the evaluation server goes through); as in the official script, the human answers are
    normalised only when they disagree (the annotation files hold them already processed)."""
    from .parsers import vqa_normalize

    if not answers:
        raise ValueError("a VQA question needs at least one human answer")
    gts = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
    pred = vqa_normalize(prediction)
    if len(set(gts)) > 1:
        gts = [vqa_normalize(a) for a in gts]
    scores = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1 :]
        scores.append(min(1.0, sum(a == pred for a in others) / 3))
    return sum(scores) / len(scores)


def mmvp_pair_accuracy(correct: dict[int, bool]) -> tuple[float, int]:
    """MMVP: questions 2k-1 and 2k (1-based ``Index``) form a pair that counts only if both are right.
    Returns (accuracy, number of complete pairs)."""
    pairs = {}
    for index, ok in correct.items():
        pairs.setdefault((index - 1) // 2, []).append(ok)
    complete = [v for v in pairs.values() if len(v) == 2]
    if not complete:
        raise ValueError("MMVP needs complete question pairs (Index 2k-1 and 2k); none were scored")
    return _ratio(sum(all(v) for v in complete), len(complete)), len(complete)


def java_available() -> bool:
    return shutil.which("java") is not None


def _spice_models_present() -> bool:
    import pycocoevalcap.spice as spice

    lib = Path(spice.__file__).parent / "lib"
    return any(lib.glob("stanford-corenlp-*.jar"))


def caption_metrics(references: dict, predictions: dict, meteor: bool = True, spice: bool = True) -> dict:
    """pycocoevalcap's COCO caption metrics: ``references`` {id: [captions]}, ``predictions`` {id: caption}.

    Both are tokenised with PTBTokenizer (Stanford CoreNLP, Java). Returns BLEU-1..4, ROUGE-L, CIDEr, METEOR (Java)
    and SPICE (Java + Stanford CoreNLP models), and ``absent``: {metric: why} for what could not be computed (never
    a made-up value)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    if set(references) != set(predictions):
        raise ValueError("references and predictions must have the same ids")
    if not references:
        raise ValueError("no captions to score")
    if not java_available():
        raise RuntimeError("caption metrics need Java (pycocoevalcap's PTBTokenizer runs Stanford CoreNLP); no java")
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in references.items()})
    res = tokenizer.tokenize({k: [{"caption": v}] for k, v in predictions.items()})
    out: dict = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out.update({f"bleu_{i + 1}": float(b) for i, b in enumerate(bleu)})
    out["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    out["cider"] = float(Cider().compute_score(gts, res)[0])
    absent = {}
    if not meteor:
        absent["meteor"] = "disabled (meteor=False)"
    else:
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = Meteor()  # a Java process, ended when the scorer is deleted
        try:
            out["meteor"] = float(scorer.compute_score(gts, res)[0])
        finally:
            del scorer
    if not spice:
        absent["spice"] = "disabled (spice=False)"
    elif not _spice_models_present():
        absent["spice"] = (
            "absent: SPICE needs the Stanford CoreNLP models (pycocoevalcap/spice/get_stanford_models.py downloads "
            "them), which are not installed"
        )
    else:
        from pycocoevalcap.spice.spice import Spice

        out["spice"] = float(Spice().compute_score(gts, res)[0])
    if absent:
        out["absent"] = absent
    return out


def frechet_distance(real_features, fake_features) -> float:
    """FID between two feature sets [N, D] (float64 statistics, torchmetrics' Fréchet distance):
    ``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))`` with unbiased covariances."""
    import torch
    from torchmetrics.image.fid import _compute_fid

    real = torch.as_tensor(real_features, dtype=torch.float64)
    fake = torch.as_tensor(fake_features, dtype=torch.float64)
    for name, f in (("real", real), ("fake", fake)):
        if f.ndim != 2 or f.shape[0] < 2:
            raise ValueError(f"{name} features must be [N >= 2, D], got {tuple(f.shape)}")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sizes differ: {real.shape[1]} vs {fake.shape[1]}")
    return float(_compute_fid(real.mean(0), torch.cov(real.T), fake.mean(0), torch.cov(fake.T)))
