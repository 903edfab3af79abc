"""Answer extraction and comparison, one function per protocol the paper's tables use.

A model's generation is free text; each benchmark family has a fixed way of reading the answer out of it:

- arithmetic (GSM8K, SVAMP, MAWPS): the number after the last "The answer is", else the last number in the
  text (MetaMath and LLM-Adapters both score this way), compared numerically;
- MATH: the last ``\\boxed{...}`` (braces balanced), else the text after "The answer is", compared after
  the usual LaTeX normalisation (``\\dfrac`` → ``\\frac``, units, ``\\left``/``\\right``, spaces ...);
- AQuA: the option letter, preferring an explicit "answer is (C)" over a letter met by chance;
- commonsense (LLM-Adapters): the first of the task's answer words ("solution1", "answer3", "true") in the text.
"""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_ANSWER_IS = re.compile(r"the answer is\s*:?\s*", re.IGNORECASE)


def _after_answer_marker(text: str) -> str:
    """The text after the last "The answer is" (MetaMath's marker), or all of it when there is none."""
    matches = list(_ANSWER_IS.finditer(text))
    return text[matches[-1].end() :] if matches else text


def last_number(text: str) -> str | None:
    """The answer number of a worked solution: the first number after the last "The answer is" when the
    text has that marker, else the last number anywhere. Thousands separators are dropped ("1,000" → "1000");
    a trailing period is not part of a number. None when the text holds no number."""
    tail = _after_answer_marker(text)
    numbers = _NUMBER.findall(tail)
    if not numbers:
        return None
    chosen = numbers[0] if tail is not text else numbers[-1]
    return chosen.replace(",", "")


def to_number(text: str | None) -> float | None:
    """A number from "42", "-3.5", "1,000", "3/4" or "$1,234.50"; None if it is not one."""
    if text is None:
        return None
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        if "/" in cleaned:
            numerator, denominator = cleaned.split("/", 1)
            return float(numerator) / float(denominator)
        return float(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def numbers_match(prediction: str | None, reference: str | float | None, *, tolerance: float = 1e-4) -> bool:
    """Numeric equality with a small tolerance (LLM-Adapters accepts |pred - ref| ≤ 1e-3 absolute; we use
    1e-4 relative to the reference, at least 1e-4 absolute), so "18.0" matches "18" and 0.333 does not match 1/3."""
    predicted = to_number(prediction)
    expected = reference if isinstance(reference, float) else to_number(None if reference is None else str(reference))
    if predicted is None or expected is None:
        return False
    return abs(predicted - expected) <= tolerance * max(1.0, abs(expected))


def gsm8k_reference(answer: str) -> str:
    """GSM8K's gold number: what follows "####" in its worked answer (the whole text when there is none)."""
    return answer.rsplit("####", 1)[-1].strip().replace(",", "")


def boxed_answer(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` or ``\\fbox{...}`` (nested braces kept), else the text after
    the last "The answer is" up to the end of its line; None when neither is there."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start >= 0:
        opening = text.find("{", start)
        if opening >= 0:
            depth = 0
            for position in range(opening, len(text)):
                if text[position] == "{":
                    depth += 1
                elif text[position] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[opening + 1 : position]
        else:  # "\boxed 5"
            match = re.match(r"\\(?:boxed|fbox)\s+(\S+)", text[start:])
            if match:
                return match.group(1)
    if _ANSWER_IS.search(text):
        return _after_answer_marker(text).split("\n", 1)[0].strip().rstrip(".").strip("$ ")
    return None


def math_reference(solution: str) -> str:
    """MATH's gold answer: the last boxed expression of the reference solution."""
    answer = boxed_answer(solution)
    return answer if answer is not None else solution.strip()


def normalize_math(answer: str) -> str:
    """A LaTeX answer in a canonical spelling, so that equal answers written differently compare equal.

    Follows the normalisation of Hendrycks et al.'s MATH scorer (written here from its description):
    spaces, ``\\left``/``\\right``, ``\\!``, dollar signs, degree marks, ``\\text{units}`` and a leading
    "x =" are removed; ``\\dfrac``/``\\tfrac`` become ``\\frac``; ``\\frac12`` and ``1/2`` become
    ``\\frac{1}{2}``; ``0.5`` keeps its leading zero (".5" gains one); a trailing ".0" and period go.
    """
    text = answer.strip()
    text = text.replace("\n", "").replace("\\!", "")
    text = re.sub(r"\\text\{\s*[a-zA-Z ]*\}$", "", text.strip())  # trailing units
    text = re.sub(r"\\(?:text|mbox|mathrm)\{([^{}]*)\}", r"\1", text)
    text = text.replace("\\left", "").replace("\\right", "")
    text = text.replace("^{\\circ}", "").replace("^\\circ", "").replace("°", "")
    text = text.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    text = text.replace("dfrac", "frac").replace("tfrac", "frac")
    text = text.replace(" .", " 0.").replace("{.", "{0.")
    if text.startswith("."):
        text = "0" + text
    if re.fullmatch(r"[a-zA-Z]\s*=\s*.+", text):  # "x = 5" → "5"
        text = text.split("=", 1)[1]
    text = text.replace(" ", "")
    text = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", text)
    text = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", text)
    text = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", text)
    text = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", text)
    if re.fullmatch(r"-?\d+/\d+", text):
        numerator, denominator = text.split("/")
        text = f"\\frac{{{numerator}}}{{{denominator}}}"
    text = text.rstrip(".")
    if re.fullmatch(r"-?\d+\.0+", text):
        text = text.split(".")[0]
    return text


def math_answers_match(prediction: str | None, reference: str) -> bool:
    """Equal after `normalize_math`, or numerically equal when both are plain numbers."""
    if prediction is None:
        return False
    left, right = normalize_math(prediction), normalize_math(reference)
    if left == right:
        return True
    return numbers_match(left, right) if to_number(left) is not None and to_number(right) is not None else False


_OPTION_PATTERNS = (
    re.compile(r"answer(?: choice)? is\s*:?\s*\(?([A-E])\b"),
    re.compile(r"answer\s*:\s*\(?([A-E])\b", re.IGNORECASE),
    re.compile(r"\(([A-E])\)"),
    re.compile(r"(?<![A-Za-z'])([A-E])(?![A-Za-z'])"),
)


def option_letter(text: str, letters: str = "ABCDE") -> str | None:
    """The chosen option of a multiple-choice answer (AQuA): "answer is (C)" or "Answer: C" first (the last
    such statement), then a parenthesised "(C)", then a capital letter standing alone; None if none.

    LLM-Adapters takes the first capital A-E anywhere, which counts "A train leaves..." as option A; we read
    explicit statements first and only then a standalone letter, the last one (conclusions come last)."""
    for pattern in _OPTION_PATTERNS:
        found = [letter for letter in pattern.findall(text) if letter in letters]
        if found:
            return found[-1]
    return None


# LLM-Adapters' answer words for each commonsense task (its test files' `answer` column uses them).
COMMONSENSE_LABELS: dict[str, tuple[str, ...]] = {
    "boolq": ("true", "false"),
    "piqa": ("solution1", "solution2"),
    "siqa": ("answer1", "answer2", "answer3"),
    "hellaswag": ("ending1", "ending2", "ending3", "ending4"),
    "winogrande": ("option1", "option2"),
    "arc-e": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "arc-c": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "obqa": ("answer1", "answer2", "answer3", "answer4"),
}


def commonsense_answer(text: str, labels: tuple[str, ...]) -> str | None:
    """The first of ``labels`` that appears in the generation (LLM-Adapters' protocol), case-insensitive and
    whole-word, so "answer1" is not read out of "answer10"; None when the model named none."""
    pattern = re.compile(r"\b(" + "|".join(re.escape(label) for label in labels) + r")\b", re.IGNORECASE)
    match = pattern.search(text)
    return match.group(1).lower() if match else None
