"""Final answers as people write them: the part of a math reward that reads, not grades.

`extract_answer` finds the answer a response commits to (`\\boxed{...}` wins, then "####
...", then "the answer is ...", else the last number written); `label_answer` reads a ground-truth
label the same way when it is written as a solution or in prose, and keeps it whole when it
already is an answer; `to_number` turns a written number into its exact value. Pure and
network-free: the reward service's math rule grades with them, and the launcher's preflight reads
a sample of labels with them before a run, so both agree on what a label says.
"""

from __future__ import annotations

import re
from fractions import Fraction

# A number as people write answers: optional sign, thousands groups or plain digits, decimals,
# an optional "/denominator".
_NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|-?\.\d+"
NUMBER_RE = re.compile(_NUMBER)
_ANSWER_IS_RE = re.compile(r"(?:final answer|answer)\s*(?:is|:)\s*:?\s*(.+)", re.IGNORECASE)
_FRAC_RE = re.compile(r"^(-?)\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}$")
_TEXT_RE = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\{([^{}]*)\}")


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
    numbers = NUMBER_RE.findall(response)
    return numbers[-1] if numbers else None


def _trim_sentence(text: str) -> str:
    return text.strip().rstrip(".").strip()


def strip_latex(s: str) -> str:
    s = s.strip().strip("$").strip()
    s = s.replace("\\$", "").replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("\\ ", "")
    s = s.replace("\\left", "").replace("\\right", "").replace("\\%", "%")
    s = re.sub(r"\^\{?\\circ\}?", "", s)
    s = _TEXT_RE.sub(r"\1", s)
    return s.strip()


def to_number(s: str) -> Fraction | None:
    """The exact value of a written number ("1,000", "-3/4", "\\frac{1}{2}", "2.50", "50%"); None if not one."""
    s = strip_latex(s).replace(" ", "").rstrip(".")
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
        numbers = NUMBER_RE.findall(answer)
        if numbers:
            return numbers[0]
    return answer
