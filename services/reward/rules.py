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
"x+1", "Paris") is taken whole. Both extractions live in `slipstream.answers`, which the
launcher's preflight also reads labels with.

A wrong or missing answer scores 0.0. A missing *label* is not a wrong answer: it raises, and
the service reports that sample as failed.

slime's rule types, by the same names (what each expects of labels is tabled in docs/rewards.md):
- `deepscaler`: only the text after the reasoning (`</think>`, or `###Response`) counts, and it
  must hold a `\\boxed{}` answer; graded like `math` against the label (or any of a list of
  labels): 1.0 or 0.0. No `</think>`: 0.0.
- `dapo`: DAPO's math grading: the last "Answer: ..." line within the response's last 300
  characters, normalised, equal to the label: +1.0, else -1.0 (DAPO's `score`).
- `f1`: SQuAD-style token F1 between the response and the label (lower case, no punctuation, no
  articles), the best over a list of labels; yes/no/noanswer must match exactly.
"""

from __future__ import annotations

import logging
import math
import re
import string
import threading
from collections import Counter
from collections.abc import Callable
from fractions import Fraction
from typing import Any

from slipstream.answers import NUMBER_RE, extract_answer, extract_boxed, label_answer, strip_latex, to_number

log = logging.getLogger(__name__)

_REL_TOL = 1e-6
MATH_VERIFY_TIMEOUT_S = 5


def normalize(s: str) -> str:
    """A string answer for comparison: no LaTeX wrappers, case, spaces or trailing period."""
    s = strip_latex(s).lower()
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\s+", "", s).rstrip(".")
    return re.sub(r"^\(([a-z])\)$", r"\1", s)  # a multiple-choice "(B)" is "B"


def _numbers_equal(a: Fraction, b: Fraction) -> bool:
    return a == b or math.isclose(float(a), float(b), rel_tol=_REL_TOL, abs_tol=1e-12)


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
        numbers = NUMBER_RE.findall(answer)
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


def _labels(label: Any) -> list[str]:
    """A label, or a list of acceptable labels; ValueError if there is none."""
    labels = label if isinstance(label, list | tuple) else [label]
    labels = [str(x) for x in labels if x is not None and str(x).strip()]
    if not labels:
        raise ValueError("sample has no label to grade against")
    return labels


def deepscaler_reward(response: str, label: Any) -> float:
    """1.0 if the boxed answer after the reasoning equals a label, else 0.0 (slime's `deepscaler`)."""
    labels = _labels(label)
    if "</think>" in response:
        solution = response.split("</think>", 1)[1]
    elif "###Response" in response:
        solution = response.split("###Response", 1)[1]
    else:
        return 0.0
    answer = extract_boxed(solution)
    if answer is None:
        return 0.0
    return 1.0 if any(math_reward(f"\\boxed{{{answer}}}", x) for x in labels) else 0.0


_DAPO_ANSWER_RE = re.compile(r"(?i)Answer\s*:\s*([^\n]+)")
_DAPO_DROP = ["\\left", "\\right", "\\!", "\\,", "\\;", "\\$", "$", "\\%", "%", "dollars", "units", "degrees"]


def _dapo_normalize(s: str) -> str:
    s = s.split("=")[-1].strip()
    for token in _DAPO_DROP:
        s = s.replace(token, "")
    s = strip_latex(s).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\s+", "", s).rstrip(".")
    if s.replace(",", "").isdigit():
        s = s.replace(",", "")
    return s


def dapo_reward(response: str, label: Any) -> float:
    """+1.0 if the last "Answer: X" (in the last 300 characters) equals a label, else -1.0 (DAPO)."""
    labels = _labels(label)
    found = _DAPO_ANSWER_RE.findall(response[-300:])
    if not found:
        return -1.0
    pred = _dapo_normalize(found[-1])
    return 1.0 if any(pred == _dapo_normalize(x) for x in labels) else -1.0


def _f1_normalize(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _f1(prediction: str, truth: str) -> float:
    pred, gold = _f1_normalize(prediction), _f1_normalize(truth)
    special = ("yes", "no", "noanswer")
    if (pred in special or gold in special) and pred != gold:
        return 0.0
    p, g = pred.split(), gold.split()
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def f1_reward(response: str, label: Any) -> float:
    """Token F1 of the response against the label (the best over a list of labels)."""
    return max(_f1(response, x) for x in _labels(label))


RuleFn = Callable[[str, Any], float]
RULES: dict[str, RuleFn] = {
    "math": math_reward,
    "exact": exact_match,
    "deepscaler": deepscaler_reward,
    "dapo": dapo_reward,
    "f1": f1_reward,
}
