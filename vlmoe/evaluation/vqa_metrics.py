"""VQA metrics: the official VQAv2 accuracy (normalisation quirks included), exact match, per-question-type breakdown.

Source: the official VQA evaluation script, GT-Vision-Lab/VQA ``PythonEvaluationTools/vqaEvaluation/vqaEval.py``
(current master), re-implemented here.

Notable choices:
- Per question, as in ``VQAEval.evaluate``: every answer (prediction and human answers) has ``\\n`` and ``\\t``
  replaced by spaces and is stripped. Only when the human answers are **not unanimous** (more than one distinct
  string) are they, *and the prediction*, normalised with ``process_punctuation`` then ``process_digit_article``.
  So with ten identical human answers "2", the prediction "two" (or "2." or "Yes" against "yes") scores 0: a quirk
  of the official script, kept on purpose.
- Accuracy = mean over the human answers h_i of ``min(1, #{j != i : h_j == pred} / 3)`` (all 10-choose-9 subsets),
  so 3 matching humans out of 10 give 0.9. Reported as a fraction in [0, 1] (the official script reports percent,
  rounded to 2 decimals; we do not round).
- ``process_punctuation``: for each mark of the official list, the mark is deleted when the answer contains it next
  to a space (``"p "`` or ``" p"``) or when the answer contains a digit-comma-digit pattern anywhere; otherwise it
  is replaced by a space. Then periods not followed by a digit are deleted (the official regex
  ``(?!<=\\d)(\\.)(?!\\d)`` has a typo'd look-behind that never fires; ``re.UNICODE`` is passed positionally as the
  ``count`` argument, so at most 32 periods are deleted - both reproduced).
- ``process_digit_article``: lowercase, split on whitespace, number words "none"/"zero".."ten" -> digits, drop
  articles a/an/the, then the official contractions table (e.g. "dont" -> "don't"), join with single spaces.
- ``exact_match`` (our addition, not an official VQA number; a *majority-answer match*): the fully normalised
  prediction (always normalised, unlike the accuracy quirk) equals the most common fully normalised human answer
  (ties: the one that occurs first), i.e. VQAv2's ``multiple_choice_answer`` convention.
- Breakdowns as the official ``accPerQuestionType`` / ``accPerAnswerType``: mean accuracy over the questions of
  each question type (``vqa_accuracy_by_type``) and each answer type (``vqa_accuracy_by_answer_type``), counting
  only the questions that have a type; absent when no question has one.
- Per-question scores are Python floats kept in gathered object states; means use ``math.fsum``, so results are
  identical on any number of processes (the official script sums sequentially; differences are in the last bit).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from vlmoe.evaluation.metrics import GatheredStateMetric, fsum_mean, to_json_dict

__all__ = [
    "process_punctuation",
    "process_digit_article",
    "normalize_vqa_answer",
    "vqa_accuracy",
    "vqa_exact_match",
    "VQAAccuracy",
    "VQAExactMatch",
    "VQAMetrics",
    "compute_vqa_metrics",
]

# Data tables of vqaEval.py (punctuation marks, number words, articles, contractions).
_PUNCT: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)  # fmt: skip
_NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})
# "missing-apostrophe form -> contraction"; keys with capitals ("Im", "Ive", "Id've", "I'dve") are in the official
# table too but can never match, since answers are lower-cased first.
_CONTRACTIONS: dict[str, str] = dict(
    pair.split("=")
    for pair in (
        "aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've "
        "couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've "
        "hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd "
        "howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd itd've=it'd've "
        "it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't mightnt've=mightn't've "
        "mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've neednt=needn't notve=not've "
        "oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't "
        "shed've=she'd've she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't "
        "shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd somebodyd've=somebody'd've "
        "somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's someoned=someone'd "
        "someoned've=someone'd've someone'dve=someone'd've someonell=someone'll someones=someone's "
        "somethingd=something'd somethingd've=something'd've something'dve=something'd've "
        "somethingll=something'll thats=that's thered=there'd thered've=there'd've there'dve=there'd've "
        "therere=there're theres=there's theyd=they'd theyd've=they'd've they'dve=they'd've theyll=they'll "
        "theyre=they're theyve=they've twas='twas wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've "
        "werent=weren't whatll=what'll whatre=what're whats=what's whatve=what've whens=when's whered=where'd "
        "wheres=where's whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll whos=who's "
        "whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't "
        "wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll "
        "yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've "
        "you'dve=you'd've youll=you'll youre=you're youve=you've"
    ).split()
)
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")  # == the official "(?!<=\d)(\.)(?!\d)"
_MAX_PERIODS_STRIPPED = 32  # re.UNICODE passed as the positional ``count`` of Pattern.sub in vqaEval.py


def process_punctuation(text: str) -> str:
    """``VQAEval.processPunctuation``."""
    delete_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for mark in _PUNCT:
        if delete_all or (mark + " ") in text or (" " + mark) in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_MAX_PERIODS_STRIPPED)


def process_digit_article(text: str) -> str:
    """``VQAEval.processDigitArticle``."""
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words)


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_vqa_answer(text: str) -> str:
    """Full official normalisation (whitespace clean-up, punctuation, digits/articles/contractions)."""
    return process_digit_article(process_punctuation(_clean(text)))


def _as_answers(target: str | Sequence[str]) -> list[str]:
    answers = [target] if isinstance(target, str) else list(target)
    if not answers:
        raise ValueError("every question needs at least one human answer")
    return answers


def vqa_accuracy(pred: str, answers: str | Sequence[str]) -> float:
    """Official VQA accuracy of one prediction against its human answers, as a fraction in [0, 1]."""
    answers = [_clean(a) for a in _as_answers(answers)]
    pred = _clean(pred)
    if len(set(answers)) > 1:  # official quirk: normalise only when the humans disagree
        answers = [process_digit_article(process_punctuation(a)) for a in answers]
        pred = process_digit_article(process_punctuation(pred))
    per_subset = []
    for i in range(len(answers)):
        matches = sum(1 for j, answer in enumerate(answers) if j != i and answer == pred)
        per_subset.append(min(1, float(matches) / 3))
    return float(sum(per_subset)) / len(per_subset)


def vqa_exact_match(pred: str, answers: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals the most common normalised human answer, else 0.0."""
    normalized = [normalize_vqa_answer(a) for a in _as_answers(answers)]
    most_common = Counter(normalized).most_common(1)[0][0]  # ties: first occurrence (Counter keeps order)
    return float(normalize_vqa_answer(pred) == most_common)


def _check_inputs(
    preds: Sequence[str], targets: Sequence[str | Sequence[str]], question_types: Sequence[str | None] | None,
    answer_types: Sequence[str | None] | None = None,
) -> None:
    if isinstance(preds, str):
        raise TypeError("preds must be a sequence of answers, not a single string")
    if len(preds) != len(targets):
        raise ValueError(f"preds and targets differ in length: {len(preds)} != {len(targets)}")
    for name, types in (("question_types", question_types), ("answer_types", answer_types)):
        if types is not None and len(types) != len(preds):
            raise ValueError(f"{name} has length {len(types)}, expected {len(preds)}")


class _VQAMetric(GatheredStateMetric):
    """Base: per-question scores and (optional) question types as gathered object states."""

    higher_is_better = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_object_state("accuracy")
        self.add_object_state("exact")
        self.add_object_state("types")
        self.add_object_state("answer_types")

    def update(
        self,
        preds: Sequence[str],
        targets: Sequence[str | Sequence[str]],
        question_types: Sequence[str | None] | None = None,
        answer_types: Sequence[str | None] | None = None,
    ) -> None:
        """``targets[i]``: the human answers of question i (usually 10); ``question_types[i]`` and
        ``answer_types[i]``: its types (None or "" where it has none)."""
        _check_inputs(preds, targets, question_types, answer_types)
        self.accuracy.extend(vqa_accuracy(p, t) for p, t in zip(preds, targets))
        self.exact.extend(vqa_exact_match(p, t) for p, t in zip(preds, targets))
        self.types.extend(question_types if question_types is not None else [None] * len(preds))
        self.answer_types.extend(answer_types if answer_types is not None else [None] * len(preds))

    def _by_type(self, types: Sequence[str | None]) -> dict[str, float]:
        """Mean accuracy per type, over the questions that have one (as the official perQuestionType)."""
        groups: dict[str, list[float]] = {}
        for qtype, acc in zip(types, self.accuracy):
            if qtype:
                groups.setdefault(qtype, []).append(acc)
        return {qtype: fsum_mean(groups[qtype]) for qtype in sorted(groups, key=str)}


class VQAAccuracy(_VQAMetric):
    """Official VQAv2 accuracy (fraction in [0, 1]), mean over questions."""

    def compute(self) -> Tensor:
        return torch.tensor(fsum_mean(self.accuracy), dtype=torch.float64)


class VQAExactMatch(_VQAMetric):
    """Fraction of predictions equal to the most common human answer (both normalised)."""

    def compute(self) -> Tensor:
        return torch.tensor(fsum_mean(self.exact), dtype=torch.float64)


class VQAMetrics(_VQAMetric):
    """All VQA metrics; ``compute`` returns the ``metrics.json`` keys as tensors: ``vqa_accuracy``,
    ``exact_match`` (majority-answer match, float64), ``num_questions`` (int64) and, when some questions have
    types, ``vqa_accuracy_by_type`` / ``vqa_accuracy_by_answer_type`` ({type: float64 tensor})."""

    def compute(self) -> dict[str, Tensor | dict[str, Tensor]]:
        out: dict[str, Tensor | dict[str, Tensor]] = {
            "vqa_accuracy": torch.tensor(fsum_mean(self.accuracy), dtype=torch.float64),
            "exact_match": torch.tensor(fsum_mean(self.exact), dtype=torch.float64),
            "num_questions": torch.tensor(len(self.accuracy), dtype=torch.int64),
        }
        for key, types in (("vqa_accuracy_by_type", self.types), ("vqa_accuracy_by_answer_type", self.answer_types)):
            by_type = self._by_type(types)
            if by_type:
                out[key] = {k: torch.tensor(v, dtype=torch.float64) for k, v in by_type.items()}
        return out


def compute_vqa_metrics(
    preds: Sequence[str],
    targets: Sequence[str | Sequence[str]],
    question_types: Sequence[str | None] | None = None,
    answer_types: Sequence[str | None] | None = None,
) -> dict[str, float | int | dict[str, float]]:
    """VQA ``metrics.json`` dict for local data (never syncs across processes): ``vqa_accuracy``,
    ``exact_match`` (fractions), ``num_questions``, and ``vqa_accuracy_by_type`` (question type) /
    ``vqa_accuracy_by_answer_type`` when some questions have types."""
    metric = VQAMetrics(sync_on_compute=False)
    metric.update(preds, targets, question_types, answer_types)
    return to_json_dict(metric.compute())
