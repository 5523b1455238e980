"""Answer normalization and the exact fast path shared by the rewards.

- :func:`normalize_unicode` rewrites Unicode math into the LaTeX the checkers read (``½`` → ``\\frac{1}{2}``,
  ``√2`` → ``\\sqrt{2}``, ``−`` U+2212 → ``-``, ``×`` → ``\\times``, ``x²`` → ``x^{2}``), drops invisible
  format characters (zero-width spaces, direction marks), then applies NFKC (full-width digits and letters,
  non-breaking spaces).
- :func:`canonical_decimal` writes a plain decimal number in one canonical form, as text: numbers are compared
  exactly, never through float (``9007199254740993`` ≠ ``9007199254740992``; two million-digit numbers differ in
  their last digit; ``0.000…01`` ≠ ``0``).
- :func:`answers_match_fast` is string equality after light normalization, or equal plain decimals.
"""

from __future__ import annotations

import re
import unicodedata

from dsrl_fast.reward.base import check_batch
from dsrl_fast.reward.extract import extract_boxed

__all__ = [
    "answers_match_fast",
    "canonical_decimal",
    "exact_match_reward",
    "normalize_answer",
    "normalize_unicode",
]


def _vulgar_fractions() -> dict[str, str]:
    table = {}
    for code in [*range(0xBC, 0xBF), *range(0x2150, 0x215F), 0x2189]:
        ch = chr(code)
        parts = unicodedata.decomposition(ch).split()  # '<fraction> 0031 2044 0032'
        if len(parts) == 4 and parts[0] == "<fraction>" and parts[2] == "2044":
            table[ch] = f"\\frac{{{chr(int(parts[1], 16))}}}{{{chr(int(parts[3], 16))}}}"
    return table


_SUPERSCRIPTS = "⁰¹²³⁴⁵⁶⁷⁸⁹⁺⁻"
_SUBSCRIPTS = "₀₁₂₃₄₅₆₇₈₉₊₋"
_SCRIPT_PLAIN = "0123456789+-"
_SIMPLE = str.maketrans({
    **_vulgar_fractions(),
    "\u2212": "-", "\u2012": "-", "\u2013": "-", "\ufe63": "-", "\uff0d": "-",  # minus and dashes
    "\u00d7": "\\times ", "\u22c5": "\\cdot ", "\u00b7": "\\cdot ", "\u2219": "\\cdot ", "\u00f7": "\\div ",
    "\u03c0": "\\pi ", "\u221e": "\\infty ", "\u2264": "\\le ", "\u2265": "\\ge ", "\u2260": "\\ne ",
    "\u00b1": "\\pm ", "\u2213": "\\mp ", "\u00b0": "^\\circ ", "\u2220": "\\angle ", "\u2208": "\\in ",
    "\u222a": "\\cup ", "\u2229": "\\cap ", "\u2205": "\\emptyset ", "\u2192": "\\to ", "\u2032": "'",
})
_SCRIPT_RUN_RE = re.compile(f"[{_SUPERSCRIPTS}]+|[{_SUBSCRIPTS}]+")
_ROOT_RE = re.compile(r"([√∛∜])\s*(\((?:[^()]*)\)|\d+(?:\.\d+)?|\\[A-Za-z]+|[A-Za-z])?")
_ROOT_INDEX = {"√": "", "∛": "[3]", "∜": "[4]"}


def _script(m: re.Match[str]) -> str:
    run = m.group()
    table = _SUPERSCRIPTS if run[0] in _SUPERSCRIPTS else _SUBSCRIPTS
    plain = "".join(_SCRIPT_PLAIN[table.index(c)] for c in run)
    return ("^{" if table is _SUPERSCRIPTS else "_{") + plain + "}"


def _root(m: re.Match[str]) -> str:
    radicand = m.group(2)
    head = "\\sqrt" + _ROOT_INDEX[m.group(1)]
    if radicand is None:
        return head
    if radicand.startswith("("):
        radicand = radicand[1:-1]
    return f"{head}{{{radicand}}}"


def normalize_unicode(text: str) -> str:
    """``text`` with Unicode math symbols written as LaTeX, format characters (category Cf) dropped, then
    NFKC-normalized; ASCII text is returned as is."""
    if text.isascii():
        return text
    text = _SCRIPT_RUN_RE.sub(_script, text.translate(_SIMPLE))
    text = _ROOT_RE.sub(_root, text)
    text = "".join(c for c in text if unicodedata.category(c) != "Cf")  # invisible format characters
    return unicodedata.normalize("NFKC", text)


UNESCAPED_DOLLAR_RE = re.compile(r"(?<!\\)\$")
_SPACING_RE = re.compile(r"\\(?:left|right)(?![A-Za-z])|\\[!,;: ]")
_DECIMAL_RE = re.compile(r"([-+]?)(\d*)(?:\.(\d*))?", re.ASCII)


def normalize_answer(answer: str) -> str:
    """Light normalization: Unicode as LaTeX; no ``$``, spacing commands or whitespace;
    ``\\dfrac``/``\\tfrac`` become ``\\frac``; percent signs (MATH writes ``50\\%`` for the reference ``50``)
    and a trailing period are dropped."""
    s = UNESCAPED_DOLLAR_RE.sub("", normalize_unicode(answer))
    s = _SPACING_RE.sub("", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\%", "").replace("%", "")
    return "".join(s.split()).rstrip(".")


def canonical_decimal(text: str) -> str | None:
    """``text`` as a canonical plain decimal (``-007.50`` → ``-7.5``, ``-0.0`` → ``0``, ``.5`` → ``0.5``), or
    None when it is not one (exponents, fractions, thousands separators and anything else are not plain)."""
    m = _DECIMAL_RE.fullmatch(text)
    if m is None:
        return None
    sign, whole, frac = m.group(1), m.group(2), m.group(3) or ""
    if not whole and not frac:
        return None
    whole, frac = whole.lstrip("0") or "0", frac.rstrip("0")
    if whole == "0" and not frac:
        return "0"
    return ("-" if sign == "-" else "") + whole + ("." + frac if frac else "")


def answers_match_fast(answer: str, reference: str) -> bool:
    """Equal after :func:`normalize_answer`, or equal plain decimals compared exactly (``27`` vs ``27.0``)."""
    a, r = normalize_answer(answer), normalize_answer(reference)
    if a == r:
        return bool(a)
    ca, cr = canonical_decimal(a), canonical_decimal(r)
    return ca is not None and ca == cr


def exact_match_reward(responses: list[str], references: list[str]) -> list[float]:
    """1.0 where the last boxed answer matches the reference by :func:`answers_match_fast`."""
    check_batch(responses, references)
    scores = []
    for response, reference in zip(responses, references, strict=True):
        answer = extract_boxed(response)
        scores.append(float(answer is not None and answers_match_fast(answer, reference)))
    return scores
