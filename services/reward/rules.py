"""Built-in rule rewards: is the final answer right?

`math_reward` grades a free-form solution against a ground-truth answer the way math RL
recipes do: find the final answer (`\\boxed{...}` wins, then "the answer is ..."/"#### ...",
else the last number written), then compare it with the label as a number when both sides
parse (so "1,000", "1000.0" and "1000" agree, and "\\frac{3}{4}" equals "0.75"), else as a
normalised string. When both of those say no and LaTeX is involved, `math_verify` (symbolic
equivalence) gets the last word, so "\\sqrt{2}/2" and "\\frac{\\sqrt2}{2}" agree.

The label goes through the same extraction when it is written as a solution or in prose
(`label_answer`: "The answer is 19.", "The sum is 19" and "\\boxed{19}" all grade as 19), so a
label and a response saying the same thing agree; a label that already is an answer ("19",
"x+1", "Paris") is taken whole.

A wrong or missing answer scores 0.0. A missing *label* is not a wrong answer: it raises, and
the service reports that sample as failed.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Callable
from fractions import Fraction

log = logging.getLogger(__name__)

# A number as people write answers: optional sign, thousands groups or plain digits, decimals,
# an optional "/denominator".
_NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|-?\.\d+"
_NUMBER_RE = re.compile(_NUMBER)
_ANSWER_IS_RE = re.compile(r"(?:final answer|answer)\s*(?:is|:)\s*:?\s*(.+)", re.IGNORECASE)
_FRAC_RE = re.compile(r"^(-?)\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}$")
_TEXT_RE = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\{([^{}]*)\}")
_REL_TOL = 1e-6
MATH_VERIFY_TIMEOUT_S = 5


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`), braces balanced; None if absent."""
    start, command = max((text.rfind(c), c) for c in ("\\boxed", "\\fbox"))
    if start < 0:
        return None
    rest = text[start + len(command) :]
    if not rest.lstrip().startswith("{"):
        # "\boxed 5": the argument is the next token.
        words = rest.split()
        return words[0].rstrip(".$") if words else None
    i = start + len(command) + rest.index("{")
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None  # unbalanced: the response was cut off inside the box


def extract_answer(response: str) -> str | None:
    """The final answer a response commits to, as written; None if it commits to nothing."""
    boxed = extract_boxed(response)
    if boxed is not None:
        return boxed.strip()
    for marker in ("####",):
        if marker in response:
            tail = response.rsplit(marker, 1)[1].strip().split("\n", 1)[0]
            if tail:
                return _trim_sentence(tail)
    said = list(_ANSWER_IS_RE.finditer(response))
    if said:
        return _trim_sentence(said[-1].group(1).split("\n", 1)[0])
    numbers = _NUMBER_RE.findall(response)
    return numbers[-1] if numbers else None


def _trim_sentence(text: str) -> str:
    return text.strip().rstrip(".").strip()


def _strip_latex(s: str) -> str:
    s = s.strip().strip("$").strip()
    s = s.replace("\\$", "").replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("\\ ", "")
    s = s.replace("\\left", "").replace("\\right", "").replace("\\%", "%")
    s = re.sub(r"\^\{?\\circ\}?", "", s)
    s = _TEXT_RE.sub(r"\1", s)
    return s.strip()


def to_number(s: str) -> Fraction | None:
    """The exact value of a written number ("1,000", "-3/4", "\\frac{1}{2}", "2.50", "50%"); None if not one."""
    s = _strip_latex(s).replace(" ", "").rstrip(".")
    if s.endswith("%"):
        s = s[:-1]
    m = _FRAC_RE.match(s)
    if m:
        s = f"{m.group(1)}{m.group(2)}/{m.group(3)}"
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
        s = s.replace(",", "")
    if not re.fullmatch(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?(?:/\d+)?", s):
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def normalize(s: str) -> str:
    """A string answer for comparison: no LaTeX wrappers, case, spaces or trailing period."""
    s = _strip_latex(s).lower()
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\s+", "", s).rstrip(".")
    return re.sub(r"^\(([a-z])\)$", r"\1", s)  # a multiple-choice "(B)" is "B"


def _numbers_equal(a: Fraction, b: Fraction) -> bool:
    return a == b or math.isclose(float(a), float(b), rel_tol=_REL_TOL, abs_tol=1e-12)


# A label written as a sentence: two or more whitespace-separated tokens, one of them a word
# ("The sum is 19", "19 apples"). "x + 1", "(B)", "3/4" and LaTeX ("\\frac{1}{2}") are answers already.
_WORD_RE = re.compile(r"(?:^|\s)[A-Za-z]{2,}[.,;:!?]?(?=\s|$)")


def label_answer(label: str) -> str | None:
    """The answer a ground-truth label states, found the way a response's is; None if none.

    A label that already is an answer ("19", "\\frac{3}{4}", "x+1", "(B)", "Paris", "New York")
    is itself. One written as a solution or in prose goes through `extract_answer`, the response's
    own extraction ("... #### 72", "\\boxed{72}", "The answer is 19.", "The sum is 19" and "19
    apples" all state 19), so a prose label grades like the same prose in a response. None: a
    sentence in which the rule finds no answer ("The capital is Paris"); `math_reward` then
    compares the whole label, and preflight warns.
    """
    text = label.strip()
    solution = "\\boxed" in text or "\\fbox" in text or "####" in text
    prose = "\\" not in text and len(text.split()) > 1 and bool(_WORD_RE.search(text))
    if not (solution or prose):
        return text
    answer = extract_answer(text)
    if answer is None:
        return None if len(text.split()) > 3 else text  # "New York" is an answer; a sentence is not
    if extract_boxed(text) is None and _WORD_RE.search(answer) and "\\" not in answer:
        # "The answer is 19 apples." -> "19 apples": the number it states, as for a response.
        numbers = _NUMBER_RE.findall(answer)
        if numbers:
            return numbers[0]
    return answer


def _math_verify_equal(answer: str, label: str) -> bool:
    from math_verify import parse, verify

    # math_verify's timeouts use SIGALRM, which only the main thread may set.
    main = threading.current_thread() is threading.main_thread()
    timeout = MATH_VERIFY_TIMEOUT_S if main else None
    wrap = (lambda x: x) if "$" in answer or "\\(" in answer else (lambda x: f"${x}$")
    gold = parse(wrap(label) if "$" not in label else label, parsing_timeout=timeout)
    pred = parse(wrap(answer), parsing_timeout=timeout)
    if not gold or not pred:
        return False
    return bool(verify(gold, pred, timeout_seconds=timeout))


def math_reward(response: str, label: str, use_math_verify: bool = True) -> float:
    """1.0 if the response's final answer equals `label`, else 0.0."""
    if label is None or not str(label).strip():
        raise ValueError("sample has no label to grade against")
    label = label_answer(str(label)) or str(label).strip()
    answer = extract_answer(response)
    if answer is None:
        if not response.strip():
            return 0.0
        answer = response  # no number, no marker: the whole response is the answer ("Paris")
    want = to_number(label)
    got = to_number(answer)
    if want is not None and got is None and "\\" not in answer:
        # "The answer is 42 apples": grade the number the sentence states (LaTeX such as
        # "\\sqrt{4}" is left whole for math_verify).
        numbers = _NUMBER_RE.findall(answer)
        got = to_number(numbers[0]) if numbers else None
    if want is not None and got is not None:
        return 1.0 if _numbers_equal(want, got) else 0.0
    if normalize(answer) == normalize(label):
        return 1.0
    if use_math_verify:
        try:
            return 1.0 if _math_verify_equal(answer, label) else 0.0
        except Exception as e:  # noqa: BLE001 - a symbolic-parse failure means "not shown equal"
            log.debug("math_verify could not compare %r with %r: %s", answer, label, e)
    return 0.0


def warm_up() -> None:
    """Import math_verify (sympy, ~0.5 s) now rather than inside the first request."""
    import math_verify  # noqa: F401


def exact_match(response: str, label: str) -> float:
    """1.0 if the response is the label (surrounding whitespace ignored), else 0.0."""
    if label is None:
        raise ValueError("sample has no label to compare with")
    return 1.0 if response.strip() == str(label).strip() else 0.0


RuleFn = Callable[[str, str], float]
RULES: dict[str, RuleFn] = {"math": math_reward, "exact": exact_match}
