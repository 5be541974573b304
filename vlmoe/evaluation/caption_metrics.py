"""Caption metrics with the numbers of the COCO caption evaluation: BLEU-1..4, ROUGE-L, CIDEr-D, exact match.

Source: the COCO caption evaluation code (tylin/coco-caption, packaged as ``pycocoevalcap``: ``bleu/bleu_scorer.py``,
``rouge/rouge.py``, ``cider/cider_scorer.py``, ``tokenizer/ptbtokenizer.py``), re-implemented here; the scorers
reproduce its formulas and quirks, the tokenizer is a pure-Python port of the Java one it calls (held to
the jar by a parity test).

Notable choices:
- Tokenisation (``coco_tokenize``) reproduces ``PTBTokenizer``: the Stanford CoreNLP **3.4.1** jar that
  pycocoevalcap runs (``PTBTokenizer -preserveLines -lowerCase``), then removal of the punctuation tokens listed in
  ``PTB_PUNCTUATIONS``. ``ptb_tokenize`` is a longest-match scanner over the rules of that version's
  ``PTBLexer.flex``: clitics split (``dog's`` -> ``dog 's``, ``don't`` -> ``do n't``, ``cannot`` -> ``can not``,
  ``gonna`` -> ``gon na``), hyphenated words, numbers (``1,000``, ``3.5``), abbreviations and acronyms (``mr.``,
  ``u.s.``, ``p.m``) kept whole, SGML tags, ``#hashtags`` and ``@users`` kept whole, quotes mapped to `` ` `` /
  ``'`` forms, ellipses to ``...``, 3-4 hyphens to ``--``, ``( ) [ ] { }`` to ``-LRB-`` ... ``-RCB-``, ``<`` and
  ``>`` kept, fractions ``½`` -> ``1/2``. Unlike later CoreNLP releases, 3.4.1 (as pycocoevalcap runs it) neither
  Americanises spellings (``grey`` stays ``grey``) nor escapes ``/`` and ``*``. Characters outside the Basic
  Multilingual Plane (emoji) are deleted, as the jar deletes them. Each caption is scanned as one line of the
  jar's input file (followed by a newline); the jar scans all captions as one stream, and the only rules that
  look past a line's end add a ``.`` token after a sentence-final abbreviation, which the punctuation removal
  drops again (one known difference: the jar's last line, unlike the others, splits a final ``'90`` into
  ``' 90``). ``tests/test_caption_parity.py`` holds the result to the jar caption by caption. Because
  ``-lowerCase`` lower-cases tokens *after* escaping, ``(`` becomes ``-lrb-`` and is **not** removed by the
  (upper-case) ``-LRB-`` entry of the punctuation list, as in the COCO evaluation.
- BLEU (``bleu_scorer.py``, option ``"closest"``): corpus-level; n-gram counts clipped by the maximum count in
  any one reference; the effective reference length of a caption is the reference length closest to it (ties: the
  shorter); ``BLEU-n = (prod_k (correct_k + 1e-15) / (guess_k + 1e-9)) ** (1/n) * BP`` with
  ``BP = exp(1 - 1/ratio)`` when ``ratio = (testlen + 1e-15) / (reflen + 1e-9) < 1``. The ``tiny`` constant keeps
  BLEU-n small but non-zero when no n-gram matches (torchmetrics' ``BLEUScore`` returns 0 there, which is why it
  is not used).
- ROUGE-L (``rouge.py``): per caption, ``P = max_r LCS/len(cand)``, ``R = max_r LCS/len(ref)`` (the maxima may
  come from different references), ``F = (1 + b^2) P R / (R + b^2 P)`` with ``b = 1.2``; mean over images.
  torchmetrics' ``ROUGEScore`` uses ``b = 1`` and one reference at a time, so it is not used.
- CIDEr-D (``cider_scorer.py``, reported as "CIDEr" by the COCO server): n = 1..4; tf = raw n-gram count;
  ``idf = log(N_images) - log(max(1, df))`` with df = number of images whose references contain the n-gram;
  per n, ``sum_g min(v_c[g], v_r[g]) * v_r[g] / (|v_c| |v_r|)`` times ``exp(-delta^2 / (2 * 6^2))``; mean over n,
  mean over references, times 10; mean over images. Quirk kept: ``delta`` is the difference of the *bigram*
  counts (``len - 1``), not of the lengths. With a single image every reference n-gram has idf 0, so CIDEr-D is 0.
- Corpus statistics (df, N, BLEU counts) come from all samples seen by ``update`` on all processes: every
  sample counts as one image. Means use ``math.fsum``; this may differ from numpy's mean in the last bit.
- Exact match: the generated caption equals one of the references after ``normalize_caption`` (lowercase,
  delete Unicode punctuation characters, collapse whitespace).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from vlmoe.evaluation.metrics import GatheredStateMetric, fsum_mean, to_json_dict

__all__ = [
    "PTB_PUNCTUATIONS",
    "ptb_tokenize",
    "coco_tokenize",
    "normalize_caption",
    "caption_exact_match",
    "bleu_stats",
    "corpus_bleu",
    "rouge_l",
    "cider_d",
    "CocoBLEU",
    "CocoROUGEL",
    "CIDErD",
    "CaptionExactMatch",
    "CaptionMetrics",
    "compute_caption_metrics",
]

# Tokens removed after PTB tokenisation (pycocoevalcap/tokenizer/ptbtokenizer.py).
PTB_PUNCTUATIONS: frozenset[str] = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)

# ----------------------------------------------------------------------------------------------------------------
# PTB lexer (CoreNLP 3.4.1). Each rule: (token regex, trailing-context regex or None, action). Like JFlex, the rule
# with the longest match (token + trailing context) wins and ties go to the earlier rule; the trailing context is
# not consumed. An action maps the matched token text to the emitted tokens.
# ----------------------------------------------------------------------------------------------------------------
# Python's \w also holds numbers that are neither Java letters nor digits (superscripts, fractions, circled).
_OTHER_NUMBERS = "\u00b2\u00b3\u00b9\u00bc-\u00be\u2070-\u2089\u2150-\u2189\u2460-\u24ff\u2776-\u2793"
# WORD also takes modifier letters and combining marks (CoreNLP's list; these are its common ranges).
_LETTER = rf"(?:[^\W\d_{_OTHER_NUMBERS}]|[\u00ad\u0237-\u024f\u02c2-\u02c5\u02d2-\u02df\u02e5-\u02ff\u0300-\u036f])"
_ALNUM = rf"[^\W_{_OTHER_NUMBERS}]"
_APOS = "['\u0092\u2019]"
_APOS_ETC = "['\u0092\u2019\u0091\u2018\u201b]"
_HYPHEN = "[-_\u058a\u2010\u2011]"
_ACRO = r"[A-Za-z](?:\.[A-Za-z])+"
_SPACE = "[ \t\u00a0\u2000-\u200a\u3000]"
_ABBREV1 = (  # followed by a period: months, days, states, companies, numbers, post-titles
    r"(?:(?i:jan|feb|mar|apr|jun|jul|aug|sept?|oct|nov|dec|mon|tues?|wed|thu|thurs|fri|ala|ariz|calif|colo|conn"
    r"|dak|del|fla|ga|ind|kans?|ky|la|md|mich|minn|mo|mont|neb|nev|okla|pa|penn|tenn|tex|va|vt|wisc?|wyo|inc|cos?"
    r"|corp|pp?tys?|ltd|plc|bancorp|dept|bhd|assn|univ|intl|sys|nos?|prop|ph|tel|est|ext|sq|ft|jr|sr|bros"
    r"|(?:ed|ph)\.d|blvd|rd|esq|etc|al|seq)|A(?i:rk)|I(?i:ll)|M(?i:ass|iss)|O(?i:re)|W(?i:ash))"
)
_ABBREV4 = (  # titles and other abbreviations usually followed by a capitalised word
    r"(?:(?i:mrs?|ms|drs?|profs?|sens?|reps?|attys?|lt|col|gen|messrs|govs?|adm|rev|maj|sgt|cpl|pvt|mt|capt|ste?"
    r"|ave|pres|lieut|hon|brig|co?mdr|pfc|spc|supts?|det|vs|alex|wm|jos|cie|a\.k\.a|cf|treas|invt|elec|natl"
    r"|m[ft]g)|M(?i:iss)|" + _ACRO + r"|[A-Za-z])"
)
_THING_PART = rf"(?:[dDoOlL]{_APOS_ETC}{_ALNUM})?{_ALNUM}+"
_THING = rf"{_THING_PART}(?:{_HYPHEN}{_THING_PART})*"
_HTHING = rf"[A-Za-z0-9][A-Za-z0-9.,\u00ad]*(?:-(?:[A-Za-z0-9\u00ad]+|{_ACRO}\.))+"
_APOWORD = (
    rf"{_APOS}(?i:n){_APOS}?|[lLdDjJ]{_APOS}|(?i:dunkin|somethin|ol){_APOS}|{_APOS}(?i:em|till?|cause|[2-9]0s)"
    rf"|[A-HJ-XZn]{_APOS_ETC}{_LETTER}{{2,}}|{_LETTER}+[aeiouyAEIOUY]{_APOS_ETC}[aeiouA-Z]{_LETTER}*"
    r"|(?i:cont'd\.?|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l)"
)


def _latex_quotes(text: str, probably_left: bool) -> str:
    if probably_left:
        text = text.replace("&apos;", "`").replace("'", "`").replace("&quot;", "``").replace('"', "``")
    else:
        text = text.replace("&apos;", "'").replace("&quot;", "''").replace('"', "''")
    text = re.sub("[\u0091\u2018\u201b\u2039]", "`", text)
    text = re.sub("[\u0092\u2019\u203a]", "'", text)
    text = re.sub("[\u0093\u201c\u00ab]", "``", text)
    return re.sub("[\u0094\u201d\u00bb]", "''", text)


def _no_soft_hyphen(text: str) -> str:
    return text.replace("\u00ad", "")


def _same(text: str) -> list[str]:
    return [text]


def _const(token: str) -> Callable[[str], list[str]]:
    return lambda _text: [token]


def _fractions(text: str) -> list[str]:
    for char, value in (("\u00bc", "1/4"), ("\u00bd", "1/2"), ("\u00be", "3/4"), ("\u2153", "1/3"), ("\u2154", "2/3")):
        text = text.replace(char, value)
    return [text]


def _currency(text: str) -> list[str]:
    text = text.replace("\u00a2", "cents").replace("\u00a3", "#")
    return [re.sub("[\u0080\u00a4\u20a0\u20ac]", "$", text)]


def _phone(text: str) -> list[str]:
    return [text.replace(" ", "\u00a0").replace("(", "-LRB-").replace(")", "-RRB-")]


def _hyphens(text: str) -> list[str]:
    return ["--"] if 3 <= len(text) <= 4 else [text]


_Rule = tuple[re.Pattern[str], re.Pattern[str] | None, Callable[[str], list[str]]]


def _rule(token: str, action: Callable[[str], list[str]], trail: str | None = None) -> _Rule:
    return (re.compile(token), None if trail is None else re.compile(trail), action)


_RULES: tuple[_Rule, ...] = (
    _rule(r"(?i:cannot)", lambda t: [t[:3]]),  # "cannot" -> "can" + "not" (see _ptb_scan: only 3 chars consumed)
    _rule(r"(?i:gon|wan)", _same, trail=r"(?i:na)"),  # "gonna" -> "gon" + "na", as the 3.4.1 jar splits them
    _rule(r"(?i:got)", _same, trail=r"(?i:ta)"),
    _rule(r"(?i:gim|lem)", _same, trail=r"(?i:me)"),
    _rule(r"'(?i:t)", _same, trail=r"(?i:was)"),  # "'twas" -> "'t" + "was"
    _rule(r"</?[A-Za-z!][^>\s]*>", _same),  # SGML tag, kept whole
    _rule(r"#[^\W\d_]+", _same),  # hashtag
    _rule(r"@[A-Za-z_][A-Za-z0-9_]*", _same),  # @user
    _rule(_ACRO, _same, trail=r"\s"),  # p.m, e.g: an acronym without its final period
    _rule(r"&(?:MD|mdash|ndash);|[\u0096\u0097\u2013\u2014\u2015]", _const("--")),
    _rule(r"(?i:&amp;)", _const("&")),
    _rule(r"&(?:HT|TL|UR|LR|QC|QL|QR|odq|cdq|#[0-9]+);", _same),
    _rule(rf"{_LETTER}+", _same, trail=rf"{_APOS}(?:[msdMSD]|(?i:re|ve|ll))"),
    _rule(r"[A-Za-z\u00ad]*[A-MO-Za-mo-z]\u00ad*", lambda t: [_no_soft_hyphen(t)], trail=rf"[nN]{_APOS_ETC}[tT]"),
    _rule(rf"{_LETTER}+", lambda t: [_no_soft_hyphen(t)]),
    _rule(_APOWORD, _same),
    _rule(rf"[yY]{_APOS}", _same, trail=_LETTER),
    _rule(r"https?://[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},-]", _same),
    _rule(  # LIKELYURL; the class range ",-_" (0x2C-0x5F) is a quirk of the original
        r"(?:www\.(?:[^ \t\n\f\r\"<>|.!?(){},]+\.)+[a-zA-Z]{2,4}|(?:[^ \t\n\f\r\"`'<>|.!?(){}\x2c-\x5f$]+\.)+"
        r"(?:com|net|org|edu))(?:/[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},-])?",
        _same,
    ),
    _rule(r"[a-zA-Z0-9][^ \t\n\f\r\"<>|()\u00a0]*@(?:[^ \t\n\f\r\"<>|().\u00a0]+\.)+[a-zA-Z]{2,4}", _same),
    _rule(rf"{_APOS}(?:[msdMSD]|(?i:re|ve|ll))", lambda t: [_latex_quotes(t, False)], trail=r"[^A-Za-z]"),
    _rule(rf"[nN]{_APOS_ETC}[tT]", lambda t: [_latex_quotes(t, False)]),
    _rule(r"\d{1,2}[-/]\d{1,2}[-/]\d{2,4}", _same),
    _rule(r"[-+]?(?:\d*(?:[.:,\u00ad\u066b\u066c]\d+)+|\d+)", lambda t: [_no_soft_hyphen(t)]),
    _rule(r"(?:\d{1,4}[- \u00a0])?\d{1,4}(?:\\?/|\u2044)\d{1,4}", lambda t: [t.replace(" ", "\u00a0")]),
    _rule("[\u00bc\u00bd\u00be\u2153-\u215e]", _fractions),
    _rule(
        rf"(?i:-(?:RRB|LRB|RCB|LCB|RSB|LSB)-|C\.D\.s|pro-|anti-|S(?:&|&amp;)P-500|S(?:&|&amp;)Ls|Cap{_APOS}n"
        rf"|c{_APOS}est)",
        lambda t: [re.sub("(?i:&amp;)", "&", t)],
    ),
    _rule(r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}", _same),
    _rule(r"[A-Z]*\$|#", _same),
    _rule("[\u00a2-\u00a5\u0080\u20a0\u20ac\u060b\u0e3f\u20a4\uffe0\uffe1\uffe5\uffe6]", _currency),
    _rule(rf"{_ABBREV1}\.", _same),
    _rule(rf"{_ABBREV4}\.", _same),
    _rule(_ABBREV4, _same, trail=_SPACE),
    _rule(_ACRO, _same, trail=r"\s"),
    _rule(rf"{_APOS}[0-9][0-9]", _same, trail=r"\s"),
    _rule(rf"{_LETTER}+\.", lambda t: [_no_soft_hyphen(t)], trail=r"[,;:]"),
    _rule(r"(?:\([0-9]{3}\)[ \u00a0]?|[0-9]{3}[- \u00a0.])[0-9]{3}[- \u00a0.][0-9]{4}", _phone),
    _rule(r'"|&quot;', _const("``"), trail=r"[A-Za-z0-9$]"),
    _rule(r'"|&quot;', _const("''")),
    _rule(r"[+%&\u2030\u2031~^]", _same),
    _rule(r"\x7f|0x7f", lambda _t: []),  # deleted ("0x7f" literally, a quirk of the original)
    _rule(r"\[", _const("-LSB-")),
    _rule(r"\]", _const("-RSB-")),
    _rule(r"<|&lt;", _const("<")),
    _rule(r">|&gt;", _const(">")),
    _rule(r"\{", _const("-LCB-")),
    _rule(r"\}", _const("-RCB-")),
    _rule(r"\(", _const("-LRB-")),
    _rule(r"\)", _const("-RRB-")),
    _rule(r"-+", _hyphens),
    _rule("\\.{3,5}|(?:\\.[ \u00a0]){2,4}\\.|[\u0085\u2026]", _const("...")),
    _rule(r"@+|#+|_+", _same),
    _rule(r"\*+|(?:\\\*){1,3}", _same),
    _rule(r"[,;:]", _same),
    _rule(r"[?!]+", _same),
    _rule("[.\u00a1\u00bf\u037e\u0589\u061f\u06d4\u0700-\u0702\u07fa]", _same),
    _rule(r"=", _same),
    _rule(r"/", _same),
    _rule(rf"{_HTHING}\.", lambda t: [_no_soft_hyphen(t)], trail=r"[,;:]"),
    _rule(_HTHING, lambda t: [_no_soft_hyphen(t)]),
    _rule(rf"{_THING}\.", _same, trail=r"[,;:]"),
    _rule(_THING, _same),
    _rule(r"[A-Z]+(?:(?:[+&]|&amp;)[A-Z]+)+", lambda t: [t.replace("&amp;", "&")]),
    _rule(r"'", _const("`"), trail="[A-Za-z][^ \t\n\r\u00a0]"),
    _rule(rf"{_APOS}(?:[msdMSD]|(?i:re|ve|ll))", lambda t: [_latex_quotes(t, False)]),
    _rule(
        rf"{_APOS}|''|[`\u2018\u2019\u201a\u201b\u201c\u201d\u0091\u0092\u0093\u0094\u201e\u201f\u2039\u203a"
        r"\u00ab\u00bb]{1,2}",
        lambda t: [_latex_quotes(t, False)],
    ),
    _rule(
        "[|\\\\\u00a6\u00a7\u00a8\u00a9\u00ac\u00ae\u00af\u00b0-\u00ba\u00d7\u00f7\u0387\u2016\u2017\u2020-\u2023"
        "\u2030-\u2038\u203b\u203e-\u2042\u2044\u207a-\u207f\u208a-\u208e\u2100-\u214f\u2190-\u21ff"
        "\u2200-\u2bff\u3012\u30fb\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65]",
        _same,
    ),
)
_CANNOT_RULE = _RULES[0]
_FAST_WORD = re.compile(r"[A-Za-z]+(?=\s|$)")
_SPLIT_WORDS = frozenset(["cannot", "gonna", "wanna", "gotta", "gimme", "lemme"])
_SKIPPED = frozenset("\x00\u200b\u200e\u200f\ufeff")


def _ptb_scan(text: str) -> list[str]:
    tokens: list[str] = []
    pos, end = 0, len(text)
    while pos < end:
        char = text[pos]
        if char.isspace() or char in _SKIPPED:
            pos += 1
            continue
        fast = _FAST_WORD.match(text, pos)
        if fast is not None:  # plain ASCII word before a space: only WORD / "cannot" can apply
            word = fast.group()
            if word.lower() not in _SPLIT_WORDS:
                tokens.append(word)
                pos = fast.end()
                continue
        best: _Rule | None = None
        best_token, best_total = "", 0
        for rule in _RULES:
            token_re, trail_re, _action = rule
            match = token_re.match(text, pos)
            if match is None or match.end() == pos:
                continue
            total = match.end() - pos
            if trail_re is not None:
                trail = trail_re.match(text, match.end())
                if trail is None:
                    continue
                total += trail.end() - match.end()
            if total > best_total:
                best, best_token, best_total = rule, match.group(), total
        if best is None:  # untokenizable character: deleted, as with CoreNLP's default "firstDelete"
            pos += 1
            continue
        tokens.extend(best[2](best_token))
        pos += 3 if best is _CANNOT_RULE else len(best_token)
    return tokens


def ptb_tokenize(text: str, lowercase: bool = True) -> list[str]:
    """Stanford CoreNLP 3.4.1 ``PTBTokenizer`` on one line (``-lowerCase`` applied after escaping)."""
    tokens = _ptb_scan(text + "\n")  # scanned as a line of a file: "p.m" + newline is one token
    return [token.lower() for token in tokens] if lowercase else tokens


def coco_tokenize(text: str) -> str:
    """Tokenise one caption as the COCO caption evaluation does; returns space-joined tokens."""
    tokens = ptb_tokenize(text.replace("\n", " "), lowercase=True)
    return " ".join(token for token in tokens if token not in PTB_PUNCTUATIONS)


def normalize_caption(text: str) -> str:
    """Lowercase, delete punctuation characters (Unicode category P*), collapse whitespace (for exact match)."""
    text = "".join(char for char in text.lower() if not unicodedata.category(char).startswith("P"))
    return " ".join(text.split())


# ----------------------------------------------------------------------------------------------------------------
# Scorers on tokenised text (space-joined tokens), following pycocoevalcap.
# ----------------------------------------------------------------------------------------------------------------
def _ngram_counts(words: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    counts: Counter[tuple[str, ...]] = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i : i + k])] += 1
    return counts


def bleu_stats(candidate: str, references: Sequence[str], n: int = 4) -> list[int]:
    """Sufficient statistics of one caption: ``[testlen, reflen, guess_1..n, correct_1..n]``.

    ``reflen`` is the reference length closest to the candidate length (ties: the shorter), as BLEU "closest".
    """
    words = candidate.split()
    testlen = len(words)
    max_ref_counts: dict[tuple[str, ...], int] = {}
    ref_lens = []
    for reference in references:
        ref_words = reference.split()
        ref_lens.append(len(ref_words))
        for ngram, count in _ngram_counts(ref_words, n).items():
            max_ref_counts[ngram] = max(max_ref_counts.get(ngram, 0), count)
    reflen = min((abs(length - testlen), length) for length in ref_lens)[1]
    guess = [max(0, testlen - k) for k in range(n)]
    correct = [0] * n
    for ngram, count in _ngram_counts(words, n).items():
        correct[len(ngram) - 1] += min(max_ref_counts.get(ngram, 0), count)
    return [testlen, reflen, *guess, *correct]


def corpus_bleu(stats: Sequence[Sequence[int]], n: int = 4) -> list[float]:
    """Corpus BLEU-1..n from summed ``bleu_stats`` rows (COCO's tiny/small smoothing constants)."""
    tiny, small = 1e-15, 1e-9
    totals = [sum(column) for column in zip(*stats)] if stats else [0] * (2 + 2 * n)
    testlen, reflen, guess, correct = totals[0], totals[1], totals[2 : 2 + n], totals[2 + n : 2 + 2 * n]
    bleus, product = [], 1.0
    for k in range(n):
        product *= float(correct[k] + tiny) / (guess[k] + small)
        bleus.append(product ** (1.0 / (k + 1)))
    ratio = (testlen + tiny) / (reflen + small)
    if ratio < 1:
        bleus = [bleu * math.exp(1 - 1 / ratio) for bleu in bleus]
    return bleus


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for token_a in a:
        current = [0]
        for j, token_b in enumerate(b):
            current.append(previous[j] + 1 if token_a == token_b else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(candidate: str, references: Sequence[str], beta: float = 1.2) -> float:
    """COCO ROUGE-L of one caption: F-measure of the max precision and max recall over references."""
    cand_tokens = candidate.split(" ")  # split(" ") as in rouge.py: an empty caption is one empty token
    precisions, recalls = [], []
    for reference in references:
        ref_tokens = reference.split(" ")
        lcs = _lcs_length(ref_tokens, cand_tokens)
        precisions.append(lcs / float(len(cand_tokens)))
        recalls.append(lcs / float(len(ref_tokens)))
    p, r = max(precisions), max(recalls)
    if p == 0 or r == 0:
        return 0.0
    return ((1 + beta**2) * p * r) / float(r + beta**2 * p)


def cider_d(
    candidates: Sequence[str], references: Sequence[Sequence[str]], n: int = 4, sigma: float = 6.0
) -> list[float]:
    """Per-image CIDEr-D (COCO scale, x10); document frequencies come from ``references`` (the whole corpus)."""
    ref_counts = [[_ngram_counts(ref.split(), n) for ref in refs] for refs in references]
    doc_freq: Counter[tuple[str, ...]] = Counter()
    for counts_per_ref in ref_counts:
        doc_freq.update({ngram for counts in counts_per_ref for ngram in counts})
    log_num_images = math.log(float(len(references)))

    def to_vector(counts: Counter[tuple[str, ...]]) -> tuple[list[dict[tuple[str, ...], float]], list[float], int]:
        vec: list[dict[tuple[str, ...], float]] = [{} for _ in range(n)]
        norm = [0.0] * n
        num_bigrams = 0
        for ngram, term_freq in counts.items():
            k = len(ngram) - 1
            weight = float(term_freq) * (log_num_images - math.log(max(1.0, doc_freq[ngram])))
            vec[k][ngram] = weight
            norm[k] += weight**2
            if k == 1:  # the "length" used by the penalty counts bigrams (pycocoevalcap quirk)
                num_bigrams += term_freq
        return vec, [math.sqrt(value) for value in norm], num_bigrams

    def similarity(cand: tuple, ref: tuple) -> list[float]:
        (vec_c, norm_c, len_c), (vec_r, norm_r, len_r) = cand, ref
        penalty = math.e ** (-(float(len_c - len_r) ** 2) / (2 * sigma**2))
        values = []
        for k in range(n):
            value = 0.0
            for ngram, weight in vec_c[k].items():
                ref_weight = vec_r[k].get(ngram, 0.0)
                value += min(weight, ref_weight) * ref_weight  # clipped
            if norm_c[k] != 0 and norm_r[k] != 0:
                value /= norm_c[k] * norm_r[k]
            values.append(value * penalty)
        return values

    scores = []
    for candidate, counts_per_ref in zip(candidates, ref_counts):
        cand_vec = to_vector(_ngram_counts(candidate.split(), n))
        per_n = [0.0] * n
        for counts in counts_per_ref:
            per_n = [a + b for a, b in zip(per_n, similarity(cand_vec, to_vector(counts)))]
        score = sum(per_n) / n  # mean over n, then over references, then x10 (cider_scorer order)
        scores.append(score / len(counts_per_ref) * 10.0)
    return scores


# ----------------------------------------------------------------------------------------------------------------
# torchmetrics Metrics
# ----------------------------------------------------------------------------------------------------------------
def _check_inputs(preds: Sequence[str], targets: Sequence[str | Sequence[str]]) -> list[list[str]]:
    if isinstance(preds, str):
        raise TypeError("preds must be a sequence of captions, not a single string")
    if len(preds) != len(targets):
        raise ValueError(f"preds and targets differ in length: {len(preds)} != {len(targets)}")
    refs = [[target] if isinstance(target, str) else list(target) for target in targets]
    if any(len(r) == 0 for r in refs):
        raise ValueError("every caption needs at least one reference")
    return refs


class _CaptionMetric(GatheredStateMetric):
    """Base: tokenises captions in ``update`` (the COCO PTB tokenizer unless ``tokenize=False``)."""

    def __init__(self, tokenize: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tokenize = tokenize

    def _tokenized(self, preds: Sequence[str], refs: list[list[str]]) -> tuple[list[str], list[list[str]]]:
        if not self.tokenize:
            return list(preds), refs
        return [coco_tokenize(p) for p in preds], [[coco_tokenize(r) for r in rs] for rs in refs]


class CocoBLEU(_CaptionMetric):
    """Corpus BLEU-1..n as in the COCO caption evaluation; ``compute`` returns ``{"bleu_1": ..., ...}``.

    State: integer sufficient statistics (summed across processes), so the result is exact and order free.
    """

    higher_is_better = True

    def __init__(self, n_gram: int = 4, tokenize: bool = True, **kwargs: Any) -> None:
        super().__init__(tokenize=tokenize, **kwargs)
        self.n_gram = n_gram
        self.add_state("stats", default=torch.zeros(2 + 2 * n_gram, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, preds: Sequence[str], targets: Sequence[str | Sequence[str]]) -> None:
        cands, refs = self._tokenized(preds, _check_inputs(preds, targets))
        for cand, rs in zip(cands, refs):
            self.stats += torch.tensor(bleu_stats(cand, rs, self.n_gram), dtype=torch.int64, device=self.stats.device)

    def compute(self) -> dict[str, Tensor]:
        bleus = corpus_bleu([self.stats.tolist()], self.n_gram)
        return {f"bleu_{k + 1}": torch.tensor(b, dtype=torch.float64) for k, b in enumerate(bleus)}


class CocoROUGEL(_CaptionMetric):
    """COCO ROUGE-L (beta = 1.2, max precision / max recall over references), mean over images."""

    higher_is_better = True

    def __init__(self, beta: float = 1.2, tokenize: bool = True, **kwargs: Any) -> None:
        super().__init__(tokenize=tokenize, **kwargs)
        self.beta = beta
        self.add_object_state("scores")

    def update(self, preds: Sequence[str], targets: Sequence[str | Sequence[str]]) -> None:
        cands, refs = self._tokenized(preds, _check_inputs(preds, targets))
        self.scores.extend(rouge_l(c, rs, self.beta) for c, rs in zip(cands, refs))

    def compute(self) -> Tensor:
        return torch.tensor(fsum_mean(self.scores), dtype=torch.float64)


class CIDErD(_CaptionMetric):
    """CIDEr-D exactly as the COCO caption evaluation computes it (COCO scale, x10).

    The tokenised captions are kept and gathered from all processes, because the document frequencies and the
    number of images are corpus statistics.
    """

    higher_is_better = True

    def __init__(self, n_gram: int = 4, sigma: float = 6.0, tokenize: bool = True, **kwargs: Any) -> None:
        super().__init__(tokenize=tokenize, **kwargs)
        self.n_gram, self.sigma = n_gram, sigma
        self.add_object_state("candidates")
        self.add_object_state("references")

    def update(self, preds: Sequence[str], targets: Sequence[str | Sequence[str]]) -> None:
        cands, refs = self._tokenized(preds, _check_inputs(preds, targets))
        self.candidates.extend(cands)
        self.references.extend(refs)

    def compute(self) -> Tensor:
        if not self.candidates:
            return torch.tensor(0.0, dtype=torch.float64)
        scores = cider_d(self.candidates, self.references, self.n_gram, self.sigma)
        return torch.tensor(fsum_mean(scores), dtype=torch.float64)


class CaptionExactMatch(GatheredStateMetric):
    """Fraction of captions equal to one of their references after ``normalize_caption``."""

    higher_is_better = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("matches", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, preds: Sequence[str], targets: Sequence[str | Sequence[str]]) -> None:
        refs = _check_inputs(preds, targets)
        self.matches += sum(caption_exact_match(p, rs) for p, rs in zip(preds, refs))
        self.total += len(refs)

    def compute(self) -> Tensor:
        return self.matches.double() / self.total.clamp(min=1)


def caption_exact_match(pred: str, refs: Sequence[str]) -> bool:
    """The caption equals one of its references after ``normalize_caption`` (lowercase, no punctuation)."""
    return normalize_caption(pred) in {normalize_caption(r) for r in refs}


class CaptionMetrics(_CaptionMetric):
    """All caption metrics at once (one tokenisation); ``compute`` returns the ``metrics.json`` keys as tensors:
    ``bleu_1``..``bleu_4``, ``rouge_l``, ``cider_d``, ``exact_match`` (float64) and ``num_images`` (int64)."""

    higher_is_better = True

    def __init__(self, tokenize: bool = True, **kwargs: Any) -> None:
        super().__init__(tokenize=tokenize, **kwargs)
        self.add_object_state("candidates")
        self.add_object_state("references")
        self.add_object_state("exact")

    def update(self, preds: Sequence[str], targets: Sequence[str | Sequence[str]]) -> None:
        raw_refs = _check_inputs(preds, targets)
        cands, refs = self._tokenized(preds, raw_refs)
        self.candidates.extend(cands)
        self.references.extend(refs)
        self.exact.extend(caption_exact_match(p, rs) for p, rs in zip(preds, raw_refs))

    def compute(self) -> dict[str, Tensor]:
        cands, refs = self.candidates, self.references
        values: dict[str, float] = {}
        bleus = corpus_bleu([bleu_stats(c, rs) for c, rs in zip(cands, refs)])
        values.update({f"bleu_{k + 1}": b for k, b in enumerate(bleus)})
        values["rouge_l"] = fsum_mean(rouge_l(c, rs) for c, rs in zip(cands, refs))
        values["cider_d"] = fsum_mean(cider_d(cands, refs)) if cands else 0.0
        values["exact_match"] = fsum_mean(float(e) for e in self.exact)
        out = {key: torch.tensor(value, dtype=torch.float64) for key, value in values.items()}
        out["num_images"] = torch.tensor(len(cands), dtype=torch.int64)
        return out


def compute_caption_metrics(
    preds: Sequence[str], targets: Sequence[str | Sequence[str]], tokenize: bool = True
) -> dict[str, float | int]:
    """Caption ``metrics.json`` dict for local data (never syncs across processes): ``bleu_1``..``bleu_4``,
    ``rouge_l``, ``cider_d``, ``exact_match`` (fractions, CIDEr-D on the COCO x10 scale) and ``num_images``."""
    metric = CaptionMetrics(tokenize=tokenize, sync_on_compute=False)
    metric.update(preds, targets)
    return to_json_dict(metric.compute())
