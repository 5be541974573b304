"""Tests of the evaluation metrics (``vlmoe.evaluation``): COCO caption metrics and the official VQA accuracy.

Every expected value is worked out by hand in the comments (or written as the closed-form expression of the
COCO / VQA formulas), never "is finite". The distributed test spawns 2 gloo processes and checks that the metrics
are bit-identical to a single-process run with the data split unevenly (and one rank holding no data at all).
"""

from __future__ import annotations

import json
import math
import socket
import warnings
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from vlmoe.evaluation import (
    CaptionExactMatch,
    CaptionMetrics,
    CIDErD,
    CocoBLEU,
    CocoROUGEL,
    VQAAccuracy,
    VQAExactMatch,
    VQAMetrics,
    coco_tokenize,
    compute_caption_metrics,
    compute_vqa_metrics,
    normalize_caption,
    normalize_vqa_answer,
    ptb_tokenize,
    vqa_accuracy,
)
from vlmoe.evaluation.caption_metrics import bleu_stats, cider_d, corpus_bleu, rouge_l
from vlmoe.evaluation.vqa_metrics import process_digit_article, process_punctuation

TINY, SMALL = 1e-15, 1e-9  # pycocoevalcap's BLEU smoothing constants

# ---------------------------------------------------------------------------------------------------------------
# Tokenisation (COCO PTBTokenizer conventions)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A man riding a horse.", "a man riding a horse"),  # lowercase, final period removed
        ("Two dogs, playing!", "two dogs playing"),  # , and ! are punctuation tokens
        ("The man's hat", "the man 's hat"),  # clitic split off, kept
        ("I don't know", "i do n't know"),  # n't split off
        ("He cannot go", "he can not go"),
        ("It\u2019s a \u201cquoted\u201d word", "it 's a quoted word"),  # curly quotes -> `` '' (removed)
        ('He said "hi"...', "he said hi"),  # quotes and ellipsis removed
        ("well--known; a - b", "well known a b"),  # -- and - and ; removed
        ("a t-shirt (red)", "a t-shirt -lrb- red -rrb-"),  # -lowerCase after escaping: -LRB- not removed
        ("1,000 people, 3.5 inches", "1,000 people 3.5 inches"),  # numbers stay whole
        ("Mr. Smith on Main St.", "mr. smith on main st."),  # abbreviations keep their period
        ("the U.S. flag", "the u.s. flag"),
        ("a grey colour", "a grey colour"),  # British spellings kept, as the 3.4.1 jar keeps them
        ("and/or 3*4", "and/or 3 * 4"),  # / and * not escaped; * split off
        ("gonna wanna gotta", "gon na wan na got ta"),
        ("at 5 p.m", "at 5 p.m"),  # an acronym without its final period stays whole
        ("a [red] <b>box</b> #tag @user", "a -lsb- red -rsb- <b> box </b> #tag @user"),
        ("a \u00bd cup", "a 1/2 cup"),
        ("wow?!", "wow ?!"),  # "?!" is one token and not in the removal list
    ],
)
def test_coco_tokenize(text: str, expected: str) -> None:
    assert coco_tokenize(text) == expected


def test_ptb_tokenize_keeps_punctuation_tokens() -> None:
    assert ptb_tokenize("A dog, a cat.") == ["a", "dog", ",", "a", "cat", "."]
    assert ptb_tokenize("A dog.", lowercase=False) == ["A", "dog", "."]


def test_normalize_caption() -> None:
    assert normalize_caption("  A dog's   BALL, red! ") == "a dogs ball red"


# ---------------------------------------------------------------------------------------------------------------
# BLEU (corpus level, "closest" reference length, tiny/small constants)
# ---------------------------------------------------------------------------------------------------------------
# Image 1: cand "a man riding a horse" (5 words); refs "a man rides a horse on the beach" (8), "a man on a horse" (5).
#   closest ref length 5. Clipped matches: 1-grams a x2, man, horse = 4 of 5; 2-grams "a man", "a horse" = 2 of 4;
#   3-grams 0 of 3; 4-grams 0 of 2.
# Image 2: cand "two dogs" (2); refs "two dogs play" (3), "dogs" (1): |3-2| = |1-2| -> tie, the shorter (1) wins.
#   1-grams 2 of 2, 2-grams 1 of 1, no 3-/4-grams.
# Corpus: correct (6, 3, 0, 0), guess (7, 5, 3, 2), testlen 7 > reflen 6 -> no brevity penalty.
CANDS = ["a man riding a horse", "two dogs"]
REFS = [["a man rides a horse on the beach", "a man on a horse"], ["two dogs play", "dogs"]]
_P = [(6 + TINY) / (7 + SMALL), (3 + TINY) / (5 + SMALL), TINY / (3 + SMALL), TINY / (2 + SMALL)]
BLEU_EXPECTED = [math.prod(_P[: k + 1]) ** (1 / (k + 1)) for k in range(4)]
# Raw versions of the same captions: tokenisation must bring them back to CANDS / REFS.
RAW_CANDS = ["A man riding a horse.", "Two dogs!"]
RAW_REFS = [["A man rides a horse on the beach.", "A man, on a horse."], ["Two dogs play.", "Dogs"]]


def test_bleu_hand_worked() -> None:
    assert bleu_stats(CANDS[0], REFS[0]) == [5, 5, 5, 4, 3, 2, 4, 2, 0, 0]
    assert bleu_stats(CANDS[1], REFS[1]) == [2, 1, 2, 1, 0, 0, 2, 1, 0, 0]
    bleus = corpus_bleu([bleu_stats(c, r) for c, r in zip(CANDS, REFS)])
    assert bleus == pytest.approx(BLEU_EXPECTED, rel=1e-12)
    assert bleus[0] == pytest.approx(6 / 7, rel=1e-9)
    assert bleus[1] == pytest.approx(math.sqrt(6 / 7 * 3 / 5), rel=1e-9)
    assert 0 < bleus[3] < 1e-7  # no 3-/4-gram match: tiny but not 0 (torchmetrics' BLEUScore gives 0)


def test_bleu_brevity_penalty() -> None:
    # "the cat sat" vs "the cat sat on the mat": p1 = p2 = p3 = 1, no 4-gram -> (0 + 1e-15) / (0 + 1e-9) = 1e-6;
    # ratio = 3/6 -> BP = exp(1 - 2) = 1/e.  BLEU-4 = (1e-6) ** 0.25 / e = 0.0316.. / e.
    metric = CocoBLEU(tokenize=False)
    metric.update(["the cat sat"], [["the cat sat on the mat"]])
    out = metric.compute()
    ratio = (3 + TINY) / (6 + SMALL)
    bp = math.exp(1 - 1 / ratio)
    p = [(3 + TINY) / (3 + SMALL), (2 + TINY) / (2 + SMALL), (1 + TINY) / (1 + SMALL), TINY / SMALL]
    for k in range(4):
        assert out[f"bleu_{k + 1}"].item() == pytest.approx(math.prod(p[: k + 1]) ** (1 / (k + 1)) * bp, rel=1e-12)
    assert out["bleu_1"].item() == pytest.approx(math.exp(-1), rel=1e-8)
    assert out["bleu_4"].item() == pytest.approx(1e-6**0.25 * math.exp(-1), rel=1e-8)


# ---------------------------------------------------------------------------------------------------------------
# ROUGE-L (beta 1.2, max precision and max recall over references)
# ---------------------------------------------------------------------------------------------------------------
def test_rouge_l_hand_worked() -> None:
    # Image 1: LCS with both refs is "a man a horse" (4): P = 4/5 for both, R = 4/8 and 4/5 -> P = R = 0.8 -> F = 0.8.
    assert rouge_l(CANDS[0], REFS[0]) == pytest.approx(0.8, abs=1e-15)
    # Image 2: ref1 LCS 2 -> P = 1, R = 2/3; ref2 LCS 1 -> P = 1/2, R = 1. max P = 1 (ref1), max R = 1 (ref2):
    # F = 1 although no reference matches (COCO quirk).
    assert rouge_l(CANDS[1], REFS[1]) == 1.0
    # Different P and R: cand "a b c d" vs ref "a b": P = 2/4, R = 1 -> F = 2.44 * 0.5 / (1 + 1.44 * 0.5).
    assert rouge_l("a b c d", ["a b"]) == pytest.approx(2.44 * 0.5 / 1.72, rel=1e-12)
    assert rouge_l("x y", ["a b"]) == 0.0
    metric = CocoROUGEL(tokenize=False)
    metric.update(CANDS, REFS)
    assert metric.compute().item() == pytest.approx(0.9, abs=1e-15)  # mean over images


# ---------------------------------------------------------------------------------------------------------------
# CIDEr-D
# ---------------------------------------------------------------------------------------------------------------
def test_cider_d_single_image_is_zero() -> None:
    # N = 1: idf = log(1) - log(max(1, df = 1)) = 0 for every reference n-gram, so even a perfect caption scores 0.
    assert cider_d(["a cat"], [["a cat"]]) == [0.0]


def test_cider_d_hand_worked() -> None:
    # N = 2 images, L = log 2.  df: "a" 2 (idf 0), "cat", "a cat", "dog", "a dog" 1 (idf L).
    # Image 1, "a cat" vs "a cat": n=1 vectors (a: 0, cat: L) -> cosine 1; n=2 ("a cat": L) -> 1; no 3-/4-grams -> 0.
    #   equal bigram counts -> penalty 1.  score = mean(1, 1, 0, 0) / 1 ref * 10 = 5.
    # Image 2, "a dog dog" vs "a dog": n=1 cand (a: 0, dog: 2L) norm 2L, ref (dog: L) norm L,
    #   clipped dot min(2L, L) * L = L^2 -> 1/2.  n=2 cand ("a dog": L, "dog dog": L (df 0 -> log(max(1, 0)) = 0))
    #   norm sqrt(2) L, ref ("a dog": L) -> L^2 / (sqrt(2) L^2) = 1/sqrt(2).  n=3: ref vector empty -> 0.
    #   bigram counts 2 vs 1 -> delta 1 -> penalty exp(-1 / 72).  score = (1/2 + 1/sqrt(2)) / 4 * exp(-1/72) * 10.
    image2 = (0.5 + 1 / math.sqrt(2)) / 4 * math.exp(-1 / 72) * 10
    scores = cider_d(["a cat", "a dog dog"], [["a cat"], ["a dog"]])
    assert scores == pytest.approx([5.0, image2], rel=1e-12)
    metric = CIDErD()
    metric.update(["A cat.", "A dog, dog!"], [["a cat"], "A dog"])  # tokenised to the same strings
    assert metric.compute().item() == pytest.approx((5.0 + image2) / 2, rel=1e-12)  # = 3.98807...


def test_cider_d_averages_references() -> None:
    # N = 2.  df: "a" 2, "dog" 2, "a dog" 2 (both images have a reference "a dog") -> idf 0; "cat", "a cat" -> L.
    # Image 1 "a cat": vs "a cat" -> (1, 1, 0, 0); vs "a dog" -> all reference weights 0 -> (0, 0, 0, 0).
    #   sum over refs (1, 1, 0, 0) -> mean over n 0.5 -> / 2 refs -> x10 = 2.5.
    # Image 2 "a dog": every n-gram has idf 0 -> 0.  Corpus CIDEr-D = 1.25.
    metric = CIDErD(tokenize=False)
    metric.update(["a cat", "a dog"], [["a cat", "a dog"], ["a dog"]])
    assert metric.compute().item() == pytest.approx(1.25, rel=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Caption exact match and the convenience function
# ---------------------------------------------------------------------------------------------------------------
def test_caption_exact_match() -> None:
    metric = CaptionExactMatch()
    metric.update(["A dog, running!", "a cat", "two  dogs"], [["a dog running"], ["a red cat"], ["Two dogs."]])
    assert metric.compute().item() == pytest.approx(2 / 3, abs=1e-15)


def test_compute_caption_metrics_keys_and_values() -> None:
    out = compute_caption_metrics(RAW_CANDS, RAW_REFS)
    assert list(out) == ["bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider_d", "exact_match", "num_images"]
    assert [out[f"bleu_{k + 1}"] for k in range(4)] == pytest.approx(BLEU_EXPECTED, rel=1e-12)
    assert out["rouge_l"] == pytest.approx(0.9, abs=1e-15)
    assert out["exact_match"] == 0.0
    assert out["num_images"] == 2 and isinstance(out["num_images"], int)
    # CIDEr-D by hand, N = 2, L = log 2.  The two images' references share no word, so every reference n-gram has
    # df 1 (idf L), and candidate n-grams absent from the references have df 0 (idf L too): every weight is tf * L.
    # Image 2, "two dogs": vs "two dogs play": n=1 cand (two, dogs: L each) norm sqrt(2) L, ref (two, dogs, play)
    #   norm sqrt(3) L -> 2 L^2 / (sqrt(6) L^2) = 2/sqrt(6); n=2 cand ("two dogs") vs ref ("two dogs", "dogs play")
    #   -> 1/sqrt(2); bigrams 1 vs 2 -> exp(-1/72).  vs "dogs": n=1 L^2 / (sqrt(2) L * L) = 1/sqrt(2), n=2 0
    #   (ref has no bigram), bigrams 1 vs 0 -> exp(-1/72).
    image2 = ((2 / math.sqrt(6) + 1 / math.sqrt(2)) + 1 / math.sqrt(2)) * math.exp(-1 / 72) / 4 / 2 * 10
    # Image 1, "a man riding a horse" (a: 2L, man: L, riding: L (df 0), horse: L; norm sqrt(7) L) against
    #   ref1 "a man rides a horse on the beach" (a 2L, man, rides, horse, on, the, beach L; norm sqrt(10) L) and
    #   ref2 "a man on a horse" (a 2L, man, on, horse L; norm sqrt(7) L).  n=1 dots: ref1 4+1+1 = 6, ref2 6.
    #   n=2 cand bigrams (a man, man riding, riding a, a horse: L each, norm 2L); ref1 7 distinct bigrams (norm
    #   sqrt(7) L), shared "a man", "a horse" -> 2; ref2 4 bigrams (norm 2L), shared 2.  n>=3: nothing shared.
    #   Bigram counts: cand 4, ref1 7 (delta -3), ref2 4 (delta 0).
    pen1 = math.exp(-9 / 72)
    ref1 = (6 / (math.sqrt(7) * math.sqrt(10)) + 2 / (2 * math.sqrt(7))) * pen1
    ref2 = 6 / 7 + 2 / 4
    image1 = (ref1 + ref2) / 4 / 2 * 10
    assert out["cider_d"] == pytest.approx((image1 + image2) / 2, rel=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# VQA accuracy (official vqaEval.py semantics)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("hot-dog", "hot dog"),  # "-" not next to a space -> replaced by a space
        ("yes!", "yes "),
        ("what ? no", "what  no"),  # "?" next to a space -> deleted
        ("1,000", "1000"),  # digit,digit anywhere -> every mark deleted
        ("u.s.a.", "usa"),  # periods not before a digit deleted
        ("3.5", "3.5"),
        ("a/b (c)", "a b c "),  # "/" -> space; "(" follows a space -> deleted; ")" -> space
    ],
)
def test_process_punctuation(text: str, expected: str) -> None:
    assert process_punctuation(text) == expected


def test_process_digit_article() -> None:
    assert process_digit_article("The TWO dogs") == "2 dogs"
    assert process_digit_article("none") == "0"
    assert process_digit_article("an apple isnt   a pear") == "apple isn't pear"
    assert process_digit_article("dont") == "don't"
    assert normalize_vqa_answer(" Two\tdogs.\n") == "2 dogs"


def test_period_strip_limit_quirk() -> None:
    # vqaEval.py passes re.UNICODE (32) positionally as ``count``: only the first 32 periods are deleted.
    assert process_punctuation("." * 40) == "." * 8


@pytest.mark.parametrize(
    ("pred", "answers", "expected"),
    [
        # 3 of 10 humans: leaving out a matching human leaves 2 matches (2/3), else 3 (1) -> (3*2/3 + 7*1)/10 = 0.9
        ("red", ["red"] * 3 + ["blue"] * 7, 0.9),
        ("Red.", ["red"] * 3 + ["blue"] * 7, 0.9),  # humans disagree -> prediction normalised
        # 2 of 10: (2 * 1/3 + 8 * 2/3) / 10 = 0.6 ; 1 of 10: (1 * 0 + 9 * 1/3) / 10 = 0.3 ; 0 of 10: 0
        ("red", ["red"] * 2 + ["blue"] * 8, 0.6),
        ("red", ["red"] + ["blue"] * 9, 0.3),
        ("green", ["red"] * 3 + ["blue"] * 7, 0.0),
        ("blue", ["red"] * 3 + ["blue"] * 7, 1.0),  # 7 matches: >= 3 in every 9-subset
        # unanimous humans -> nothing is normalised (official quirk)
        ("2", ["2"] * 10, 1.0),
        ("two", ["2"] * 10, 0.0),
        ("Yes", ["yes"] * 10, 0.0),
        (" yes\n", ["yes"] * 10, 1.0),  # only \n, \t and outer spaces are cleaned
        # split humans: "two"/"2" normalise to "2" -> 8 of 10 match "Two." -> 1.0 ; "3": 2 of 10 -> 0.6
        ("Two.", ["two"] * 4 + ["2"] * 4 + ["3"] * 2, 1.0),
        ("3", ["two"] * 4 + ["2"] * 4 + ["3"] * 2, 0.6),
        # articles: "the dog", "dog" -> "dog": 3 of 10 -> 0.9
        ("A dog", ["the dog"] * 2 + ["dog"] + ["cat"] * 7, 0.9),
        # contractions: "dont know" -> "don't know": 3 of 10 -> 0.9
        ("dont know", ["dont know"] * 2 + ["don't know"] + ["no"] * 7, 0.9),
        # punctuation inside answers: "hot-dog" -> "hot dog"
        ("hot dog", ["hot-dog"] * 3 + ["pizza"] * 7, 0.9),
    ],
)
def test_vqa_accuracy(pred: str, answers: list[str], expected: float) -> None:
    assert vqa_accuracy(pred, answers) == pytest.approx(expected, abs=1e-15)


def test_vqa_metrics_with_types() -> None:
    preds = ["red", "two", "A dog", "no"]
    targets = [["red"] * 3 + ["blue"] * 7, ["2"] * 10, ["the dog"] * 2 + ["dog"] + ["cat"] * 7, ["yes"] * 10]
    types = ["what color", "how many", "what animal", "is this"]
    out = compute_vqa_metrics(preds, targets, types)
    # accuracies 0.9, 0.0 (unanimous quirk), 0.9, 0.0 -> mean 0.45
    assert out["vqa_accuracy"] == pytest.approx(0.45, abs=1e-15)
    # exact match vs the most common normalised answer: "blue" no; "2" yes (always normalised); "cat" no; "yes" no.
    assert out["exact_match"] == 0.25
    assert out["num_questions"] == 4
    assert out["vqa_accuracy_by_type"] == pytest.approx(
        {"how many": 0.0, "is this": 0.0, "what animal": 0.9, "what color": 0.9}, abs=1e-15
    )
    assert "vqa_accuracy_by_type" not in compute_vqa_metrics(preds, targets)
    accuracy, exact = VQAAccuracy(), VQAExactMatch()
    accuracy.update(preds, targets)
    exact.update(preds, targets)
    assert accuracy.compute().item() == pytest.approx(0.45, abs=1e-15)
    assert exact.compute().item() == 0.25


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        VQAMetrics().update(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError, match="at least one"):
        vqa_accuracy("a", [])
    with pytest.raises(TypeError):
        CaptionMetrics().update("a cat", [["a cat"]])
    with pytest.raises(ValueError, match="question_types"):
        VQAMetrics().update(["a"], [["a"]], ["t1", "t2"])


# ---------------------------------------------------------------------------------------------------------------
# State handling: merge_state, reset, device moves; 1 process vs 2 processes
# ---------------------------------------------------------------------------------------------------------------
CORPUS_CANDS = [
    "A man riding a horse.", "Two dogs!", "A red bus on the street.", "A cat sleeping on a grey couch.",
    "A plate of food.", "A man riding a wave on a surfboard.", "Two giraffes standing in a field.",
    "A clock on a tower.", "A dog catching a frisbee.",
]  # fmt: skip
CORPUS_REFS = [
    RAW_REFS[0], RAW_REFS[1], ["A red double-decker bus.", "A bus driving down a street."],
    ["A cat asleep on the couch.", "A grey cat on a sofa.", "a cat"], ["A plate of food."],
    ["A surfer riding a wave.", "A man on a surfboard riding a wave."], ["Giraffes in a field.", "Two giraffes."],
    ["A clock tower.", "The clock on the tower shows 10:30."], ["A dog jumps for a frisbee.", "Dog, frisbee."],
]  # fmt: skip
VQA_PREDS = ["red", "two", "A dog", "no", "yes", "2", "blue", "Hot-dog", "none", "the cat"]
VQA_TARGETS = [
    ["red"] * 3 + ["blue"] * 7, ["2"] * 10, ["the dog"] * 2 + ["dog"] + ["cat"] * 7, ["yes"] * 10,
    ["yes"] * 9 + ["no"], ["two"] * 4 + ["2"] * 4 + ["3"] * 2, ["blue"] * 2 + ["red"] * 8,
    ["hot dog"] * 5 + ["pizza"] * 5, ["0"] * 6 + ["1"] * 4, ["cat"] * 1 + ["dog"] * 9,
]  # fmt: skip
VQA_TYPES = ["what color", "how many", "what", "is this", "is this", "how many", "what color", "what", "how many",
             "what"]  # fmt: skip


def _all_metrics() -> dict[str, object]:
    return {
        "captions": CaptionMetrics(),
        "bleu": CocoBLEU(),
        "rouge": CocoROUGEL(),
        "cider": CIDErD(),
        "exact": CaptionExactMatch(),
        "vqa": VQAMetrics(),
        "vqa_acc": VQAAccuracy(),
        "cider_rank0_only": CIDErD(),
    }


def _update(metrics: dict, caption_idx: list[int], vqa_idx: list[int], rank0: bool) -> None:
    for chunk in (caption_idx[:2], caption_idx[2:]):  # several update calls
        cands, refs = [CORPUS_CANDS[i] for i in chunk], [CORPUS_REFS[i] for i in chunk]
        for name in ("captions", "bleu", "rouge", "cider", "exact"):
            metrics[name].update(cands, refs)
    preds, targets, types = ([seq[i] for i in vqa_idx] for seq in (VQA_PREDS, VQA_TARGETS, VQA_TYPES))
    metrics["vqa"].update(preds, targets, types)
    metrics["vqa_acc"].update(preds, targets)
    if rank0:
        metrics["cider_rank0_only"].update(CORPUS_CANDS, CORPUS_REFS)


def _results(metrics: dict) -> dict:
    out = {}
    for name, metric in metrics.items():
        value = metric.compute()
        out[name] = _to_python(value)
    return out


def _to_python(value: object) -> object:
    if isinstance(value, dict):
        return {k: _to_python(v) for k, v in value.items()}
    return value.item()


def _single_process_results() -> dict:
    metrics = _all_metrics()
    _update(metrics, list(range(len(CORPUS_CANDS))), list(range(len(VQA_PREDS))), rank0=True)
    return _results(metrics)


# Uneven, interleaved split between the ranks.
_CAPTION_SPLIT = {0: [0, 3, 4, 8], 1: [1, 2, 5, 6, 7]}
_VQA_SPLIT = {0: [9, 0, 5], 1: [1, 2, 3, 4, 6, 7, 8]}


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        warnings.simplefilter("ignore")  # "compute before update" on the rank without data
        metrics = _all_metrics()
        _update(metrics, _CAPTION_SPLIT[rank], _VQA_SPLIT[rank], rank0=rank == 0)
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(_results(metrics), f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_one_vs_two_processes(tmp_path: Path) -> None:
    expected = json.loads(json.dumps(_single_process_results()))  # same float round trip as the workers
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got == expected  # bit-identical, on both ranks
    assert expected["captions"]["num_images"] == 9 and expected["vqa"]["num_questions"] == 10
    assert expected["cider_rank0_only"] == expected["cider"] == expected["captions"]["cider_d"]
    assert expected["vqa_acc"] == expected["vqa"]["vqa_accuracy"]


def test_merge_state_reset_and_device_moves() -> None:
    full = CaptionMetrics()
    full.update(CORPUS_CANDS, CORPUS_REFS)
    first, second = CaptionMetrics(), CaptionMetrics()
    first.update(CORPUS_CANDS[:4], CORPUS_REFS[:4])
    second.update(CORPUS_CANDS[4:], CORPUS_REFS[4:])
    first.merge_state(second)
    first = first.to("cpu").double()  # object states are left alone by device/dtype moves
    assert _to_python(first.compute()) == _to_python(full.compute())
    first.reset()
    assert first.candidates == [] and first.references == [] and first.exact == []
    on_cpu = CaptionMetrics(compute_on_cpu=True)
    on_cpu.update(CORPUS_CANDS, CORPUS_REFS)
    assert _to_python(on_cpu.compute()) == _to_python(full.compute())
    vqa = VQAMetrics()
    batch_value = vqa(VQA_PREDS[:3], VQA_TARGETS[:3])  # forward: batch value, and the state accumulates
    vqa.update(VQA_PREDS[3:], VQA_TARGETS[3:])
    assert batch_value["num_questions"].item() == 3
    assert vqa.compute()["vqa_accuracy"].item() == compute_vqa_metrics(VQA_PREDS, VQA_TARGETS)["vqa_accuracy"]
