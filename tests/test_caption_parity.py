"""The pure-Python caption metrics equal pycocoevalcap 1.2 run with its Stanford PTB jar (Java).

The caption set mixes what real captions hold: British and American spellings, slashes, asterisks, brackets,
hyphens, numbers, apostrophes and quotes, abbreviations, non-ASCII letters and symbols, empty candidates and
images with a single reference. Tokens are compared caption by caption, then every metric per image and at
corpus level, to 1e-6. The test needs Java and the ``coco`` extra (``pip install 'vlmoe[coco]'``); ``.ci/run``
installs both, so in CI it runs; elsewhere it is skipped with the reason.
"""

from __future__ import annotations

import random
import shutil

import pytest

from vlmoe.evaluation.caption_metrics import (
    bleu_stats,
    cider_d,
    coco_tokenize,
    compute_caption_metrics,
    corpus_bleu,
    rouge_l,
)

pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="needs Java for pycocoevalcap's PTB jar")
pycocoevalcap = pytest.importorskip("pycocoevalcap", reason="needs the coco extra: pip install 'vlmoe[coco]'")

from pycocoevalcap.bleu.bleu import Bleu  # noqa: E402
from pycocoevalcap.cider.cider import Cider  # noqa: E402
from pycocoevalcap.rouge.rouge import Rouge  # noqa: E402
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer  # noqa: E402

TOLERANCE = 1e-6

SUBJECTS = [
    "A man", "a woman", "Two dogs", "The grey cat", "A gray cat", "A colourful kite", "A colorful kite", "children",
    "A person's bike", "Several people", "A black-and-white photo of a train", "The U.S. flag", "Mr. Smith",
    "A 3-year-old girl", "the kids'", "A café owner", "Zoë", "A naïve artist", "The travelling salesman",
    "a harbour boat", "A neighbour's dog", "An elderly lady (in red)", "A [blurry] picture", "a programme host",
    "A 1,000-piece puzzle", "The centre court", "Women's team", "A man/woman", "an e-mail", "A ½ eaten pizza",
    "A 12.5 inch pizza", "Fish & chips", 'A "smart" car', "A 'vintage' car", "The theatre", "A dog—happy",
    "a kerb-side stall", "The O'Brien's pub", "A 10% discount sign", "The 1990s car", "A $5 bill", "A £10 note",
    "A €20 note", "A sign reading *STOP*", "a cat... sleeping", "A rock 'n' roll band", "A jack-o'-lantern",
    "A t-shirt", "A c/o sign", "An A.M. show", "A 2×4 board", "The man’s hat", "a “big” hat", "Some 80's cars",
]
VERBS = [
    "is sitting on", "rides", "stands next to", "is gonna jump over", "wanna play with", "has gotta catch",
    "looks at", "can't reach", "won't eat", "is holding", "cannot see", "walks past", "lays on", "is traveling to",
    "is travelling to", "favours", "favors", "is labelled as", "realises", "is parked near", "'s near", "isn't near",
]
OBJECTS = [
    "a couch.", "the bed", "a red frisbee!", "a grey wall?", "the kerb.", "the curb", "a colour TV;",
    "the centre of the room:", "a table at 5 p.m", "a table at 5 p.m.", "a <b>bold</b> sign", "#hashtag sign",
    "@user's phone", "a 4x4 truck", "a 1/2 sandwich", "a 3*4 grid", "a sign (that says 'open')", "the U.K.",
    "a pizza... yum", "a box [sic]", "a hot-dog stand", "the 9/11 memorial", "an ol' barn",
    "a plate of spaghetti & meatballs",
    "the sea - calm", "some snow -- lots", "a $1.50 coffee", "a 20-30 year old man", "a street in São Paulo",
    "a crêpe", "a piñata", "them!!", "the www.example.com site", "3:45 clock", "a 24/7 store", "a U-turn",
    "a dvd/cd player", "a grey/black cat", "the pitcher’s mound", "a ~5 ft tall statue", "a no. 5 jersey",
    "a Mt. Everest poster", "a ★ sticker", "a sign that says \"I ♥ NY\"", "the 'twas sign", "a -- b", "etc.",
]


def _caption(rng: random.Random) -> str:
    return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"


def _caption_set(num_images: int = 200, seed: int = 0) -> tuple[list[str], list[list[str]]]:
    """Candidates and references: 1-5 references per image (a fifth of the images have one), some candidates
    empty, some copied from a reference with British and American spellings swapped."""
    rng = random.Random(seed)
    preds, refs = [], []
    for i in range(num_images):
        references = [_caption(rng) for _ in range(1 if i % 5 == 0 else rng.randint(2, 5))]
        if i % 17 == 3:
            pred = ""
        elif i % 3 == 0:
            pred = references[0].replace("grey", "gray").replace("colour", "color").replace("travelling", "traveling")
        else:
            pred = _caption(rng)
        preds.append(pred)
        refs.append(references)
    return preds, refs


def _official(preds: list[str], refs: list[list[str]]) -> tuple[dict, dict, dict, dict]:
    """pycocoevalcap as COCOEvalCap runs it: tokenise references and candidates, then each scorer."""
    gts = PTBTokenizer().tokenize({i: [{"caption": r} for r in rs] for i, rs in enumerate(refs)})
    res = PTBTokenizer().tokenize({i: [{"caption": p}] for i, p in enumerate(preds)})
    corpus, per_image = {}, {}
    bleus, bleu_lists = Bleu(4).compute_score(gts, res, verbose=0)
    for k in range(4):
        corpus[f"bleu_{k + 1}"], per_image[f"bleu_{k + 1}"] = bleus[k], list(bleu_lists[k])
    corpus["rouge_l"], rouge_list = Rouge().compute_score(gts, res)
    corpus["cider_d"], cider_list = Cider().compute_score(gts, res)
    per_image["rouge_l"], per_image["cider_d"] = list(rouge_list), list(cider_list)
    return gts, res, corpus, per_image


@pytest.fixture(scope="module")
def caption_set() -> tuple[list[str], list[list[str]], dict, dict, dict, dict]:
    preds, refs = _caption_set()
    preds[:2], refs[:2] = ["a gray cat on a couch", "a dog on a bed"], [["A grey cat on a couch."], ["A dog on a bed."]]
    return (preds, refs, *_official(preds, refs))


def test_tokens_equal_the_jar(caption_set) -> None:
    preds, refs, gts, res, _, _ = caption_set
    for i, (pred, references) in enumerate(zip(preds, refs)):
        assert coco_tokenize(pred) == res[i][0], pred
        assert [coco_tokenize(r) for r in references] == gts[i], references


def test_per_image_scores_equal_pycocoevalcap(caption_set) -> None:
    preds, refs, _, _, _, official = caption_set
    cands = [coco_tokenize(p) for p in preds]
    tokenized_refs = [[coco_tokenize(r) for r in rs] for rs in refs]
    ours = {"rouge_l": [rouge_l(c, rs) for c, rs in zip(cands, tokenized_refs)],
            "cider_d": cider_d(cands, tokenized_refs)}
    bleus = [corpus_bleu([bleu_stats(c, rs)]) for c, rs in zip(cands, tokenized_refs)]
    ours.update({f"bleu_{k + 1}": [b[k] for b in bleus] for k in range(4)})
    for key, values in official.items():
        assert ours[key] == pytest.approx(values, abs=TOLERANCE), key


def test_corpus_scores_equal_pycocoevalcap(caption_set) -> None:
    preds, refs, _, _, official, _ = caption_set
    ours = compute_caption_metrics(preds, refs)
    assert {key: ours[key] for key in official} == pytest.approx(official, abs=TOLERANCE)


def test_minimal_case_from_issue_14() -> None:
    """grey (reference) vs gray (candidate): the official figures B1 0.9091, B4 0.7419, ROUGE-L 0.9167, CIDEr 7.5."""
    preds, refs = ["a gray cat on a couch", "a dog on a bed"], [["A grey cat on a couch."], ["A dog on a bed."]]
    _, _, official, _ = _official(preds, refs)
    ours = compute_caption_metrics(preds, refs)
    assert official["bleu_1"] == pytest.approx(10 / 11) and official["cider_d"] == pytest.approx(7.5)
    assert {key: ours[key] for key in official} == pytest.approx(official, abs=TOLERANCE)
