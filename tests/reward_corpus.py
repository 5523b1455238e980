"""The reward test corpus: equivalent forms, answers that must fail, adversarial inputs and seeded random pairs.

Each case has the expected score under ``math_verify`` and under ``hendrycks_math`` (the published MATH string
check, which rejects many equivalent forms), and, where it matters, the expected math-verify outcome. The huge
inputs are built in code, not stored.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from fractions import Fraction

from dsrl_fast.reward import MAX_ANSWER_CHARS, Outcome

__all__ = ["CASES", "Case"]


@dataclass(frozen=True)
class Case:
    """One response/reference pair and its expected scores."""

    kind: str  # "equivalent" | "must_fail" | "adversarial" | "random"
    name: str
    response: str
    reference: str
    math_verify: float
    hendrycks: float
    outcome: Outcome | None = None  # the expected math-verify outcome, where asserted


_HEX_TO_DIGITS = str.maketrans("abcdef", "012345")


def digits(n: int, seed: int) -> str:
    """``n`` pseudo-random decimal digits (seeded), first digit nonzero."""
    text = random.Random(seed).randbytes((n + 1) // 2).hex().translate(_HEX_TO_DIGITS)[:n]
    return text if text[0] != "0" else "1" + text[1:]


def box(answer: str) -> str:
    return f"Let me compute. The answer is $\\boxed{{{answer}}}$."


def _equivalent() -> list[Case]:
    pairs = [  # (answer, reference, hendrycks score)
        ("0.5", "\\frac{1}{2}", 1.0),  # the published check maps exactly "0.5" to \frac{1}{2}
        ("\\frac12", "0.5", 1.0),
        ("1/2", "\\dfrac{1}{2}", 1.0),
        ("\\tfrac{3}{4}", "0.75", 0.0),
        ("\\frac{6}{8}", "\\frac{3}{4}", 0.0),
        ("-\\frac{1}{2}", "-0.5", 0.0),
        ("\\frac{-1}{2}", "-\\frac12", 0.0),
        ("27", "27.0", 0.0),
        ("27.000", "27", 0.0),
        ("-0.50", "-.5", 0.0),
        ("+5", "5", 0.0),
        ("1.50", "1.5", 0.0),
        ("2\\sqrt{2}", "\\sqrt{8}", 0.0),
        ("\\sqrt2", "\\sqrt{2}", 1.0),
        ("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2", 0.0),
        ("\\frac{\\sqrt{3}}{3}", "\\frac{1}{\\sqrt{3}}", 0.0),
        ("x^2+2x+1", "(x+1)^2", 0.0),
        ("2x+2", "2(x+1)", 0.0),
        ("\\frac{1}{2n+2}", "\\frac{1}{2 n+2}", 1.0),
        ("(1, 2)", "(1,2)", 1.0),
        ("\\{2, 1\\}", "\\{1,2\\}", 0.0),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "\\left( 3, \\frac{\\pi}{2} \\right)", 1.0),
        ("[0, 1)", "[0,1)", 1.0),
        ("(-\\infty, 3]", "(-\\infty,3]", 1.0),
        ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", 1.0),
        ("50\\%", "50", 1.0),
        ("30^\\circ", "30", 1.0),
        ("x = 3", "3", 1.0),
        ("5 \\text{ cm}", "5", 1.0),
        ("\\$5", "5", 1.0),
        ("2\\pi", "2 \\pi", 1.0),
        ("\\infty", "\\infty", 1.0),
        ("\\text{Evelyn}", "\\text{Evelyn}", 1.0),
        ("2\\times 3", "6", 0.0),
        ("1,000", "1000", 0.0),
        ("$\\frac{1}{2}$", "\\frac12", 0.0),  # the published check keeps a bare $
        ("\\dfrac{7}{3}", "\\frac{7}{3}", 1.0),
        ("0.3333333", "\\frac{1}{3}", 0.0),  # math-verify rounds to 6 decimals by design
        ("e", "2.718281828", 0.0),
        # Unicode forms (rewritten as LaTeX before both checks)
        ("½", "\\frac{1}{2}", 1.0),
        ("¾", "0.75", 0.0),
        ("√2", "\\sqrt{2}", 1.0),
        ("2√3", "2\\sqrt{3}", 1.0),
        ("√(x+1)", "\\sqrt{x+1}", 1.0),
        ("−3", "-3", 1.0),
        ("2×3", "2\\times 3", 1.0),
        ("3π", "3\\pi", 1.0),
        ("x²+1", "x^2+1", 0.0),  # x^{2} vs x^2: the published check compares strings
        ("５", "5", 1.0),
        ("x\u00a0=\u00a03", "3", 1.0),
    ]
    cases = [Case("equivalent", f"eq{i}: {a!r} vs {r!r}", box(a), r, 1.0, h) for i, (a, r, h) in enumerate(pairs)]
    big = digits(50_000, seed=7)
    cases += [
        Case("equivalent", "brace-less \\boxed 5", "so $\\boxed 5$ done", "5", 1.0, 1.0),
        Case("equivalent", "last of two boxes", box("3") + " wait, actually " + box("4"), "4", 1.0, 1.0),
        Case("equivalent", "nested box", "\\boxed{\\boxed{3}}", "3", 1.0, 1.0),
        Case("equivalent", "50,000-digit equal integers (exact fast path)", box(big), big, 1.0, 1.0, Outcome.CORRECT),
        Case("equivalent", "50,000-digit equal, trailing .0", box(big + ".0"), big, 1.0, 0.0, Outcome.CORRECT),
    ]
    return cases


def _must_fail() -> list[Case]:
    pairs = [
        ("0.51", "\\frac{1}{2}"),
        ("28", "27.0"),
        ("(2, 1)", "(1,2)"),
        ("x^2+1", "(x+1)^2"),
        ("-3", "3"),
        ("3", "-3"),
        ("0.33", "\\frac13"),
        ("\\sqrt{2}", "1.414"),
        ("[0,1]", "(0,1)"),
        ("\\{1,2\\}", "\\{1,2,3\\}"),
        ("2x", "2y"),
        ("5\\%", "0.05"),
        ("\\frac{1}{0}", "0"),
        ("1.0000001", "1"),
        ("10^{30}", "10^{30}+1"),
        ("a", "b"),
        # the fast path's old float comparisons (all scored 1.0 before)
        ("9007199254740993", "9007199254740992"),
        ("12345678901234567890", "12345678901234567891"),
        ("1" + "0" * 30, "1" + "0" * 29 + "1"),  # 10^30 vs 10^30 + 1
        ("1" + "0" * 400, "2" + "0" * 400),  # both inf as floats
        ("0." + "0" * 400 + "1", "0"),
        ("-0." + "0" * 400 + "1", "0"),
    ]
    cases = [Case("must_fail", f"fail{i}: {a[:30]!r} vs {r[:30]!r}", box(a), r, 0.0, 0.0) for i, (a, r) in
             enumerate(pairs)]
    million = digits(999_999, seed=11)
    cases += [
        Case("must_fail", "no box", "The answer is 27.", "27", 0.0, 0.0, Outcome.NO_ANSWER),
        Case("must_fail", "unclosed box", "\\boxed{27", "27", 0.0, 0.0, Outcome.NO_ANSWER),
        Case("must_fail", "empty box", "\\boxed{}", "1", 0.0, 0.0, Outcome.NO_ANSWER),
        Case("must_fail", "blank box", "\\boxed{  }", "1", 0.0, 0.0, Outcome.NO_ANSWER),
        Case("must_fail", "truncated last box after a right one", box("27") + " so \\boxed{2", "27", 0.0, 0.0,
             Outcome.NO_ANSWER),
        Case("must_fail", "right box then a wrong last box", box("27") + " hmm " + box("28"), "27", 0.0, 0.0),
        Case("must_fail", "\\boxedx is not a box", "\\boxedx{27}", "27", 0.0, 0.0, Outcome.NO_ANSWER),
        Case("must_fail", "unbalanced \\boxed12}", "\\boxed12}", "12", 0.0, 0.0, Outcome.NO_ANSWER),
        Case("must_fail", "brace-less \\boxed12 without a space", "so \\boxed12", "12", 0.0, 0.0, Outcome.NO_ANSWER),
        Case("must_fail", "\\fbox (the authors' rule reads \\boxed only)", "\\fbox{12}", "12", 0.0, 0.0,
             Outcome.NO_ANSWER),
        Case("must_fail", "1,000,000-digit numbers differing in the last digit", box("1" + million),
             "1" + million[:-1] + str((int(million[-1]) + 1) % 10), 0.0, 0.0, Outcome.NO_ANSWER),
        Case("must_fail", f"equal numbers over the {MAX_ANSWER_CHARS:,}-character answer cap", box("1" + million),
             "1" + million, 0.0, 0.0, Outcome.NO_ANSWER),
    ]
    return cases


def _adversarial() -> list[Case]:
    five_mb = "x " * 2_500_000
    return [
        Case("adversarial", "5 MB response, right final box", five_mb + box("42"), "42", 1.0, 1.0, Outcome.CORRECT),
        Case("adversarial", "5 MB of open braces", "\\boxed{" + "{" * 5_000_000, "1", 0.0, 0.0, Outcome.NO_ANSWER),
        Case("adversarial", "5 MB of boxes", "\\boxed{1}" * 550_000 + "\\boxed{2}", "2", 1.0, 1.0),
        Case("adversarial", "5 MB of backslashes", "\\boxed{" + "\\" * 5_000_000 + "}", "1", 0.0, 0.0),
        Case("adversarial", "power tower 9^9^9", box("9^{9^{9}}"), "1", 0.0, 0.0, Outcome.TIMEOUT),
        Case("adversarial", "500 nested parentheses", box("(" * 500 + "1" + ")" * 500), "1", 0.0, 0.0,
             Outcome.TIMEOUT),
        Case("adversarial", "300 nested braces", box("{" * 300 + "1" + "}" * 300), "1", 0.0, 0.0, Outcome.TIMEOUT),
        Case("adversarial", "symbolic tower", box("x^{x^{x^{x^{x}}}}"), "y", 0.0, 0.0),
        Case("adversarial", "\\input", box("\\input{/etc/passwd}"), "1", 0.0, 0.0),
        Case("adversarial", "NUL and control characters", box("\x00\x01\x1b[2J"), "0", 0.0, 0.0),
        Case("adversarial", "zero-width space inside a number", box("2\u200b7"), "27", 1.0, 1.0),
        Case("adversarial", "right-to-left mark", box("\u202e72"), "27", 0.0, 0.0),
        Case("adversarial", "lone surrogate", box("\ud800"), "1", 0.0, 0.0),
        Case("adversarial", "escaped brace soup", box("\\{\\}\\{"), "1", 0.0, 0.0),
        Case("adversarial", "unbalanced \\left(", box("\\left("), "1", 0.0, 0.0),
        Case("adversarial", "\\frac with empty arguments", "\\boxed{\\frac{}{}}", "1", 0.0, 0.0),
        Case("adversarial", "\\sqrt{}", "\\boxed{\\sqrt{}}", "2", 0.0, 0.0),
        Case("adversarial", "dangling \\frac", box("\\frac"), "\\frac", 1.0, 1.0),
        Case("adversarial", "answer at exactly the cap", box("7" * MAX_ANSWER_CHARS), "7" * MAX_ANSWER_CHARS,
             1.0, 1.0, Outcome.CORRECT),
        Case("adversarial", "exponent notation is not exact-decimal", box("1e400"), "2e400", 0.0, 0.0),
        Case("adversarial", "NaN text", box("nan"), "nan", 1.0, 1.0),
    ]


def _random(n: int = 80, seed: int = 1234) -> list[Case]:
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        p, q = rng.randint(-99, 99), rng.choice([2, 4, 5, 8, 10, 16, 20, 25])
        value = Fraction(p, q)
        frac = f"\\frac{{{p}}}{{{q}}}"
        decimal = format(value.numerator / value.denominator, ".10f").rstrip("0").rstrip(".")
        assert Fraction(decimal) == value  # these denominators give terminating decimals
        kind = i % 4
        if kind == 0:  # a fraction and its exact decimal
            cases.append(Case("random", f"rand{i}: {frac} = {decimal}", box(decimal), frac, 1.0,
                              float(decimal == "0.5" and frac == "\\frac{1}{2}")))
        elif kind == 1:  # a different fraction
            other = Fraction(p + rng.choice([-1, 1]), q)
            text = f"\\frac{{{other.numerator * 3}}}{{{other.denominator * 3}}}"
            cases.append(Case("random", f"rand{i}: {text} != {frac}", box(text), frac, 0.0, 0.0))
        elif kind == 2:  # integers, equal or off by one
            a = rng.randint(-10**30, 10**30)
            b = a + rng.choice([0, 1, -1])
            cases.append(Case("random", f"rand{i}: {a} vs {b}", box(str(a)), str(b), float(a == b), float(a == b)))
        else:  # the same fraction scaled
            k = rng.randint(2, 9)
            text = f"\\frac{{{p * k}}}{{{q * k}}}"
            cases.append(Case("random", f"rand{i}: {text} = {frac}", box(text), frac, 1.0, 0.0))
    return cases


CASES: list[Case] = _equivalent() + _must_fail() + _adversarial() + _random()
