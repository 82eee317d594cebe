"""Verifiable rewards for math reasoning, in the reward-function signature of TRL's [`~trl.GRPOTrainer`].

Every function here takes `completions` (plain strings, or conversational lists of messages whose last message holds
the answer) plus the dataset columns as keyword arguments, and returns one float per completion, or `None` where the
row cannot be scored (TRL turns `None` into NaN, which its reward aggregation ignores).

    >>> from trl_hpt.rewards import get_reward_funcs
    >>> trainer = HPTTrainer(model, reward_funcs=get_reward_funcs(["math_verify"]), ...)

Equivalence is decided by math-verify (`parse` + `verify`), as in TRL's [`~trl.rewards.accuracy_reward`] and in the
paper's verifier, with the same thread-aware timeouts. TRL's function is not called as is because, on reasoning
traces and on the shipped benchmarks, it (1) merges every `\\boxed{}` of a completion into one set, so an intermediate
box makes a right final answer wrong; (2) rejects brace-less LaTeX such as `\\frac12` or `\\sqrt2` in predictions,
while MATH-500's own gold answers are written `\\frac43`; (3) parses bare gold answers such as `-2,1`, `2516_8` or
`\\left( 3, \\frac{\\pi}{2} \\right)` as the wrong value; (4) accepts conversational completions only. Here the last
box is extracted first, and both sides are parsed as one boxed answer with the same math-verify configuration.
"""

import cmath
import functools
import importlib
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any


__all__ = [
    "BOXED_INSTRUCTION",
    "REWARD_FUNCS",
    "exact_match_reward",
    "extract_boxed",
    "extract_final_answer",
    "format_reward",
    "get_reward_funcs",
    "math_verify_reward",
]

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
"""The instruction that asks for a boxed final answer (Qwen2.5-Math's, used by LUFFY, HPT and their evaluations)."""

# Answers longer than this are not handed to sympy: off the main thread math-verify runs without timeouts, and long
# expressions are where sympy can stall. No benchmark answer shipped with the package comes close.
MAX_ANSWER_CHARS = 1000
# Seconds math-verify may spend parsing one answer / comparing two, in the main thread (the values TRL uses).
PARSING_TIMEOUT = 10
VERIFY_TIMEOUT = 5

_BOX_MACRO_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_UNESCAPED_DOLLAR_RE = re.compile(r"(?<!\\)\$")
_BARE_POINT_RE = re.compile(r"(?<=\d)\.(?![\d.])")
_SCI_NUMBER_RE = re.compile(r"([-+]?(?:\d+\.?\d*|\.\d+))[eE]([-+]?\d+)")
# "The final answer is X", "Answer: X", "**Answer:** X": the explicit answer statements we accept without a box.
_ANSWER_LINE_RE = re.compile(r"(?i)\b(?:final\s+answer|answer)\b\s*(?:is\s*:?|:)\s*(?P<answer>[^\n]+)")
_TEXT_MACRO_RE = re.compile(r"\\(?:text|textbf|textrm|textit|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_CHOICE_GOLD_RE = re.compile(r"\(?\s*([A-J])\s*\)?\.?")
_CHOICE_PRED_RE = re.compile(r"(?i:option|choice)?\s*\(?\s*([A-J])\s*\)?(?=$|[\s.:,;)\]])")


def extract_boxed(text: str) -> str | None:
    r"""
    Returns the content of the last `\boxed{...}` (or `\fbox{...}`) in `text`.

    Braces are matched with nesting, and escaped braces (`\{`, `\}`) do not count, so `\boxed{\frac{1}{2}}` gives
    `\frac{1}{2}` and `\boxed{\{1, 2\}}` gives `\{1, 2\}`. The unbraced form `\boxed 5` gives `5`. When the last box is
    left unclosed (a generation cut off mid-answer) the result is `None` rather than an earlier box, since an earlier
    box is usually an intermediate result, not the answer the model settled on.

    Args:
        text (`str`):
            Text to search, typically a full model completion.

    Returns:
        `str` or `None`: The stripped content of the last box (possibly the empty string for `\boxed{}`), or `None` if
        `text` has no complete box.

    Example:

    ```python
    >>> extract_boxed(r"First \boxed{3}, then \boxed{\frac{1}{2}}.")
    '\\frac{1}{2}'
    ```
    """
    if not isinstance(text, str):
        return None
    macros = list(_BOX_MACRO_RE.finditer(text))
    if not macros:
        return None
    start = macros[-1].end()
    while start < len(text) and text[start].isspace():
        start += 1
    if start >= len(text):
        return None
    if text[start] != "{":
        # `\boxed 5`: the argument is a single token, up to the next space or math delimiter.
        match = re.match(r"[^\s$]+", text[start:])
        return match.group(0) if match else None
    depth = 0
    i = start
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2  # skip the escaped character, so `\{` and `\}` never change the depth
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i].strip()
        i += 1
    return None


def extract_final_answer(text: str) -> str | None:
    r"""
    Extracts the final answer of a completion, as [`math_verify_reward`] sees it.

    The last `\boxed{}` answer wins (see [`extract_boxed`]). Without a box, the last explicit answer statement is used
    (`The final answer is X`, `Answer: X`, `**Answer:** X`, up to the end of its line). There is deliberately no
    fallback to "the last number in the text": it would reward a model for an intermediate value it never committed
    to, and the evaluation prompt asks for a box anyway.

    Args:
        text (`str`):
            Model completion.

    Returns:
        `str` or `None`: The normalised answer (math delimiters `$` and a trailing period removed, `4.5e33` written as
        `4.5\times10^{33}`), or `None` when there is none.
    """
    if not isinstance(text, str):
        return None
    boxed = extract_boxed(text)
    if boxed is None:
        matches = list(_ANSWER_LINE_RE.finditer(text))
        if not matches:
            return None
        # Markdown emphasis around the statement (`**Answer:** 5`) is not part of the answer.
        boxed = matches[-1].group("answer").strip().strip("*").strip()
    answer = _normalize_answer(boxed)
    return answer or None


def _normalize_answer(answer: str) -> str:
    answer = _UNESCAPED_DOLLAR_RE.sub("", answer).strip()
    for opening, closing in ((r"\(", r"\)"), (r"\[", r"\]")):
        if answer.startswith(opening) and answer.endswith(closing):
            answer = answer[len(opening) : -len(closing)].strip()
    answer = answer.rstrip(". ").strip()
    # A number written with a bare trailing point (`-1./3`, as in some Minerva answers) is just that number.
    answer = _BARE_POINT_RE.sub("", answer)
    # math-verify reads `4.5e33` as 4.5 * e * 33 (Euler's e); Minerva's gold answers are written that way.
    match = _SCI_NUMBER_RE.fullmatch(answer)
    if match:
        answer = f"{match.group(1)}\\times10^{{{int(match.group(2))}}}"
    return answer


def _normalize_gold(solution: Any) -> str | None:
    if solution is None:
        return None
    if isinstance(solution, (list, tuple)):
        # Datasets sometimes store several acceptable answers; the first is the canonical one.
        solution = solution[0] if solution else None
        if solution is None:
            return None
    if isinstance(solution, float) and solution != solution:  # NaN from a pandas-backed dataset
        return None
    text = str(solution).strip()
    boxed = extract_boxed(text)
    if boxed is not None:
        text = boxed
    text = _normalize_answer(text)
    return text or None


def _choice_letter(answer: str, gold: bool) -> str | None:
    """Returns the multiple-choice letter an answer names (`D`, `(D)`, `\\text{(D)}`, `D. 42`), else `None`.

    Letters are upper case only: in GPQA's prompts lower-case `a)` ... `d)` label statements, not options.
    """
    text = _TEXT_MACRO_RE.sub(r"\1", answer).replace("$", "").strip()
    if gold:
        match = _CHOICE_GOLD_RE.fullmatch(text)
    else:
        match = _CHOICE_PRED_RE.match(text)
    return match.group(1) if match else None


def _completion_text(completion: Any) -> str:
    """The text of a completion: a string, or the `content` of the last message of a conversation."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    if isinstance(completion, (list, tuple)) and completion:
        message = completion[-1]
        content = message.get("content") if isinstance(message, dict) else message
        if isinstance(content, str):
            return content
        if isinstance(content, (list, tuple)):  # multimodal content: a list of typed parts
            return "".join(
                part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text"
            )
    return ""


def _timeouts() -> tuple[int | None, int | None]:
    """math-verify's (parse, verify) timeouts: they rely on `signal.alarm`, which only works in the main thread."""
    if threading.current_thread() is threading.main_thread():
        return PARSING_TIMEOUT, VERIFY_TIMEOUT
    return None, None


@functools.lru_cache(maxsize=4096)
def _parse_answer(answer: str, parsing_timeout: int | None) -> tuple:
    """Parses one answer, written as a single box so that gold and prediction go through the same extraction.

    Cached because the trainer scores a group of completions against the same gold answer.
    """
    from math_verify import LatexExtractionConfig, parse

    # Only the box is read (no unanchored fallback, first match only): with math-verify's defaults, a box that fails to
    # parse falls through to any loose number or fraction inside it, e.g. `\\frac{1}{3} E_{1}+\\frac{2}{3} E_{2}` -> 2/3.
    # What cannot be parsed stays a string, compared verbatim.
    return tuple(
        parse(
            f"\\boxed{{{answer}}}",
            extraction_config=[LatexExtractionConfig(boxed_match_priority=0, try_extract_without_anchor=False)],
            extraction_mode="first_match",
            parsing_timeout=parsing_timeout,
        )
    )


def _math_equal(answer: str | None, gold: str) -> float | None:
    """1.0 / 0.0 whether `answer` equals `gold` according to math-verify; see `math_verify_reward` for `None`."""
    from math_verify import verify

    parsing_timeout, verify_timeout = _timeouts()
    gold_parsed = _parse_answer(gold, parsing_timeout)
    if not gold_parsed or isinstance(gold_parsed[0], str):
        # math-verify could only keep the gold answer as text. A verbatim match is still a sure success, but anything
        # else may be an equivalent form nobody can check, so the row is left out rather than scored wrong.
        if answer is not None and "".join(answer.split()) == "".join(gold.split()):
            return 1.0
        return None
    if answer is None or len(answer) > MAX_ANSWER_CHARS:
        return 0.0
    answer_parsed = _parse_answer(answer, parsing_timeout)
    if not answer_parsed:
        return 0.0
    # verify() is not symmetric (assignments such as `x = 5` are unwrapped on the prediction side): gold goes first.
    if not verify(list(gold_parsed), list(answer_parsed), timeout_seconds=verify_timeout):
        return 0.0
    return 0.0 if _tiny_numbers_differ(gold_parsed[0], answer_parsed[0]) else 1.0


def _plain_number(expr: Any) -> complex | None:
    """The value of a sympy number built from a few numeric powers and products, else `None`.

    Anything with a symbolic or large exponent is refused, because evaluating e.g. a power tower never returns.
    """
    import sympy

    if not isinstance(expr, sympy.Expr) or not expr.is_number or expr.count_ops() > 20:
        return None
    for power in expr.atoms(sympy.Pow):
        if not power.exp.is_Number or abs(power.exp) > 1000:
            return None
    try:
        return complex(sympy.N(expr, 20))
    except (TypeError, ValueError, ArithmeticError):
        return None


def _tiny_numbers_differ(gold: Any, answer: Any) -> bool:
    """Whether two numbers that math-verify called equal differ by more than 0.01% of their size.

    math-verify compares numbers with an absolute tolerance (floats rounded to 6 decimals, differences below ~1e-15
    chopped), so any two small quantities look equal: `2.88e-19` = `3.88e-19`, `1e-7` = `2e-7`. Minerva's answers are
    full of such physical constants. This check can only turn a match into a mismatch, and only where the absolute
    difference is below 1e-6, so math-verify's intended leniencies (`1/3` = `0.333333`, `9%` = `9`) are untouched.
    """
    a, b = _plain_number(gold), _plain_number(answer)
    if a is None or b is None:
        return False
    return abs(a - b) < 1e-6 and not cmath.isclose(a, b, rel_tol=1e-4, abs_tol=0.0)


def math_verify_reward(
    completions: Sequence[Any], solution: Sequence[Any] | None = None, **kwargs
) -> list[float | None]:
    r"""
    Binary correctness reward: 1.0 when the final answer of a completion is mathematically equivalent to the gold
    answer, 0.0 otherwise, `None` when the gold answer itself cannot be parsed.

    The final answer is the last `\boxed{}` (or `\fbox{}`) of the completion, or, without one, its last explicit
    `Answer: ...` / `The final answer is ...` statement (see [`extract_final_answer`]). Gold answers may be given
    bare (`34`, `\frac{1}{2}`, `$(2,4)$`, `4.5e33`) or boxed. Equivalence is decided by math-verify's `parse` and
    `verify`, called here directly with the timeouts TRL's [`~trl.rewards.accuracy_reward`] uses, not through that
    function (the module docstring says where it differs): both sides are parsed as one boxed answer, so `0.5`,
    `\frac{1}{2}` and `\dfrac12` are all equal to `1/2`, sets compare unordered and units in `\text{}` are ignored.
    Two numbers math-verify calls equal (its tolerance is absolute) still score 0.0 when they are less than `1e-6`
    apart but differ by more than 0.01%, as small physical constants do.

    Multiple-choice gold answers (a single upper-case letter such as GPQA's `D`, or MATH's `\text{(C)}`) are compared
    by letter instead: `\boxed{D}`, `\boxed{(D)}` and `\boxed{\text{D. 42}}` all count as `D`. math-verify would
    otherwise lower-case the letters, and GPQA prompts use lower-case letters for something else.

    Args:
        completions (`list[str]` or `list[list[dict[str, str]]]`):
            Completions, as plain strings or as conversations (the last message's `content` is scored).
        solution (`list[str]`, *optional*):
            Gold answers, one per completion. When absent, the `answer` column (passed by the trainer as a keyword
            argument) is used instead.
        **kwargs:
            Other dataset columns and trainer arguments; `log_extra`, when the trainer provides it, receives the
            extracted answers for the completions table.

    Returns:
        `list[float | None]`: One reward per completion. Garbage completions score 0.0; the function never raises on
        model output. A missing gold answer, or one math-verify cannot parse into a mathematical object (e.g.
        `np.arcsin(10/13)`), gives `None` unless the completion's answer matches it verbatim (then 1.0), so that a
        broken row neither counts as a failure nor shifts group baselines.

    Example:

    ```python
    >>> math_verify_reward([r"... so the answer is \boxed{\frac{1}{2}}", r"\boxed{3}"], solution=["0.5", "4"])
    [1.0, 0.0]
    ```
    """
    if solution is None:
        solution = kwargs.get("answer")
    if solution is None:
        raise ValueError(
            "math_verify_reward needs the gold answers: pass `solution=[...]`, or give the dataset a `solution` "
            "(or `answer`) column."
        )
    if len(solution) != len(completions):
        raise ValueError(f"Got {len(completions)} completions but {len(solution)} gold answers.")

    rewards: list[float | None] = []
    extracted: list[str] = []
    for completion, gold_raw in zip(completions, solution):
        gold = _normalize_gold(gold_raw)
        answer = None
        try:
            answer = extract_final_answer(_completion_text(completion))
            if gold is None:
                reward = None
            elif (letter := _choice_letter(gold, gold=True)) is not None:
                reward = float(answer is not None and _choice_letter(answer, gold=False) == letter)
            else:
                reward = _math_equal(answer, gold)
        except Exception:
            # A reward must never crash a training step because of what a model wrote.
            reward = None if gold is None else 0.0
        rewards.append(reward)
        extracted.append("[none]" if answer is None else answer)

    log_extra = kwargs.get("log_extra")
    if callable(log_extra):
        log_extra("extracted_answer", extracted)
    return rewards


def format_reward(completions: Sequence[Any], **kwargs) -> list[float]:
    r"""
    Format reward: 1.0 when the completion states a final answer in a non-empty `\boxed{...}` (or `\fbox{...}`),
    0.0 otherwise.

    Only the last box is looked at, so a completion whose last box is left unclosed (cut off by the length limit)
    scores 0.0 even if an earlier box was complete. Correctness is not checked: pair it with [`math_verify_reward`].

    Args:
        completions (`list[str]` or `list[list[dict[str, str]]]`):
            Completions, as plain strings or as conversations (the last message's `content` is checked).
        **kwargs:
            Dataset columns and trainer arguments, unused.

    Returns:
        `list[float]`: One reward per completion.
    """
    return [float(bool(extract_boxed(_completion_text(completion)))) for completion in completions]


def exact_match_reward(completions: Sequence[Any], solution: Sequence[Any], **kwargs) -> list[float]:
    """
    1.0 when the completion, stripped, is exactly the solution (stripped), else 0.0: the verifier of toy tasks such as
    the demo's sums, and of tests.

    Args:
        completions (`list[str]` or `list[list[dict[str, str]]]`):
            Completions, as plain strings or as conversations (the last message's `content` is compared).
        solution (`list`):
            The expected answers, one per completion.

    Returns:
        `list[float]`: One reward per completion.
    """
    return [float(_completion_text(c).strip() == str(s).strip()) for c, s in zip(completions, solution)]


REWARD_FUNCS: dict[str, Callable[..., list[float | None]]] = {
    "math_verify": math_verify_reward,
    "accuracy": math_verify_reward,
    "format": format_reward,
}
"""Reward functions by name, for configuration files and the command line."""


def get_reward_funcs(
    names: str | Sequence[str], registry: Mapping[str, Callable] | None = None
) -> list[Callable[..., list[float | None]]]:
    """
    Looks reward functions up by name in [`REWARD_FUNCS`], or imports them from dotted paths.

    Args:
        names (`str` or `list[str]`):
            Reward names, e.g. `["math_verify", "format"]` (case, and `-` versus `_`, do not matter), or dotted import
            paths such as `my_module.my_reward`.
        registry (`Mapping[str, Callable]`, *optional*):
            The names to look up, with keys written in lower case and `_`; defaults to [`REWARD_FUNCS`].

    Returns:
        `list[Callable]`: The reward functions, in the order given.

    Raises:
        `ValueError`: If a name is neither known nor a dotted path; the message lists the valid names.
    """
    registry = REWARD_FUNCS if registry is None else registry
    if isinstance(names, str):
        names = [names]
    funcs = []
    for name in names:
        key = str(name).strip().lower().replace("-", "_")
        if key in registry:
            funcs.append(registry[key])
        elif "." in str(name):
            module_name, attribute = str(name).rsplit(".", 1)
            funcs.append(getattr(importlib.import_module(module_name), attribute))
        else:
            raise ValueError(
                f"Unknown reward function {name!r}. Valid names: {', '.join(sorted(registry))}; or a dotted import "
                "path such as `my_module.my_reward`."
            )
    return funcs
