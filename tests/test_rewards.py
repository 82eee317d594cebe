import json
import random
import re
import threading
from pathlib import Path

import pytest

import trl_hpt
from trl_hpt.rewards import (
    PARSING_TIMEOUT,
    REWARD_FUNCS,
    _choice_letter,
    _normalize_gold,
    _parse_answer,
    extract_boxed,
    extract_final_answer,
    format_reward,
    get_reward_funcs,
    math_verify_reward,
)


DATA_DIR = Path(trl_hpt.__file__).parent / "benchmarks_data"
BENCHMARK_FILES = sorted(DATA_DIR.glob("*.json"))
# Rows per benchmark in the fast test; the slow test covers every row.
SAMPLE_SIZE = 40


def _golds(path: Path) -> list:
    return [row["answer"] for row in json.loads(path.read_text(encoding="utf-8"))]


def _sample(golds: list, size: int = SAMPLE_SIZE) -> list:
    return random.Random(0).sample(golds, min(size, len(golds)))


def _wrong_answer(gold) -> str:
    """A near miss: another option letter, the number plus one, or the gold with its first digit changed."""
    normalized = _normalize_gold(gold)
    letter = _choice_letter(normalized, gold=True)
    if letter is not None:
        return "A" if letter != "A" else "B"
    if re.fullmatch(r"-?\d+", normalized):
        return str(int(normalized) + 1)
    if re.fullmatch(r"-?\d*\.\d+", normalized):
        return repr(float(normalized) + 1)
    digit = re.search(r"\d", normalized)
    if digit:
        return normalized[: digit.start()] + str((int(digit.group()) + 1) % 10) + normalized[digit.end() :]
    return f"-({normalized})"


def _is_math(gold) -> bool:
    """Whether the gold answer is a choice letter or parses into a sympy object (not just kept as text)."""
    normalized = _normalize_gold(gold)
    if normalized is None:
        return False
    if _choice_letter(normalized, gold=True) is not None:
        return True
    parsed = _parse_answer(normalized, PARSING_TIMEOUT)
    return bool(parsed) and not isinstance(parsed[0], str)


def _check_benchmark(path: Path, golds: list, min_parse_rate: float):
    parse_rate = sum(_is_math(g) for g in golds) / len(golds)
    print(f"{path.stem}: {parse_rate:.1%} of {len(golds)} gold answers parse")
    assert parse_rate >= min_parse_rate

    right = [f"Let me think step by step... so the answer is \\boxed{{{_normalize_gold(g)}}}" for g in golds]
    rewards = math_verify_reward(right, golds)
    # A gold answer math-verify keeps as text is matched verbatim, so the right answer still scores 1.0.
    failures = [(g, r) for g, r in zip(golds, rewards) if r != 1.0]
    assert not failures, f"{path.stem}: right answers not verified: {failures[:5]}"

    wrong = [f"... so the answer is \\boxed{{{_wrong_answer(g)}}}" for g in golds]
    rewards = math_verify_reward(wrong, golds)
    accepted = [(g, _wrong_answer(g)) for g, r in zip(golds, rewards) if r == 1.0]
    assert not accepted, f"{path.stem}: wrong answers accepted: {accepted[:5]}"


def test_all_benchmarks_shipped():
    assert [p.stem for p in BENCHMARK_FILES] == sorted(
        ["AIME24", "AIME25", "AMC23", "GPQA", "MATH-500", "Minerva", "Olympiad-Bench"]
    )
    assert (DATA_DIR / "ATTRIBUTION.md").is_file()


@pytest.mark.parametrize("path", BENCHMARK_FILES, ids=lambda p: p.stem)
def test_benchmark_answers_verify(path):
    _check_benchmark(path, _sample(_golds(path)), min_parse_rate=0.9)


@pytest.mark.slow
@pytest.mark.parametrize("path", BENCHMARK_FILES, ids=lambda p: p.stem)
def test_benchmark_answers_verify_all_rows(path):
    _check_benchmark(path, _golds(path), min_parse_rate=0.95)


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"\boxed{5}", "5"),
        (r"first \boxed{3}, finally \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
        (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{3}}{2}"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        (r"\fbox{42}", "42"),
        (r"\boxed 7 is it", "7"),
        (r"\boxed {5}", "5"),
        (r"\boxed{ 7 }", "7"),
        (r"\boxed{ x^{2} }", "x^{2}"),
        (r"\boxed{}", ""),
        (r"\boxed{3} and then \boxed{4", None),  # the last box is cut off
        ("no box at all", None),
        (r"\boxedx{3}", None),
        ("", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_extract_final_answer():
    assert extract_final_answer(r"so $x = \boxed{4.5e33}$.") == r"4.5\times10^{33}"
    assert extract_final_answer("Reasoning.\n**Final Answer:** $\\frac{1}{2}$.") == r"\frac{1}{2}"
    assert extract_final_answer("The answer is (D).") == "(D)"
    # No fallback to the last number of the text.
    assert extract_final_answer("We get 3, then 4, then 12.") is None


def test_math_verify_reward_equivalent_forms():
    completions = [
        r"\boxed{\frac{1}{2}}",
        r"\boxed{0.5}",
        r"\boxed{\dfrac12}",
        r"\boxed{\frac{2}{4}}",
        r"\boxed{\frac{1}{3}}",
    ]
    assert math_verify_reward(completions, ["1/2"] * 5) == [1.0, 1.0, 1.0, 1.0, 0.0]


def test_math_verify_reward_gold_formats():
    # Bare, boxed, dollar-delimited, scientific notation, tuples and sets.
    golds = ["34", r"\boxed{34}", "$\\frac{1}{2 n+2}$", "4.5e33", r"\left( 3, \frac{\pi}{2} \right)", "-2,1"]
    completions = [
        r"\boxed{34}",
        r"\boxed{34}",
        r"\boxed{\frac{1}{2n+2}}",
        r"\boxed{4.5 \times 10^{33}}",
        r"\boxed{(3, \pi/2)}",
        r"\boxed{1, -2}",
    ]
    assert math_verify_reward(completions, golds) == [1.0] * len(golds)


def test_math_verify_reward_last_box_wins():
    text = r"A first guess is \boxed{3}. Wait, that is wrong. Redoing it: the answer is \boxed{5}."
    assert math_verify_reward([text, text], ["5", "3"]) == [1.0, 0.0]


def test_math_verify_reward_nested_braces():
    text = r"Thus \boxed{\frac{\sqrt{2}}{\sqrt{8}}}"
    assert math_verify_reward([text], [r"\frac{1}{2}"]) == [1.0]


def test_math_verify_reward_small_numbers_compared_relatively():
    # math-verify alone calls any two tiny quantities equal.
    completions = [r"\boxed{3.88 \times 10^{-19}}", r"\boxed{2.88\times10^{-19}}", r"\boxed{0.0000002}"]
    assert math_verify_reward(completions, ["2.88e-19", "2.88e-19", "1e-7"]) == [0.0, 1.0, 0.0]


def test_math_verify_reward_conversational():
    completions = [
        [{"role": "assistant", "content": r"It is \boxed{12}."}],
        [
            {"role": "assistant", "content": r"draft: \boxed{12}"},
            {"role": "assistant", "content": r"final: \boxed{13}"},
        ],
        [{"role": "assistant", "content": [{"type": "text", "text": r"\boxed{12}"}]}],
    ]
    assert math_verify_reward(completions, solution=["12", "12", "12"]) == [1.0, 0.0, 1.0]


def test_math_verify_reward_answer_column_and_fallback_line():
    completions = ["Some work.\nAnswer: 7", "The final answer is $7$.", "so it is 7"]
    assert math_verify_reward(completions, answer=["7", "7", "7"]) == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="gold answers"):
        math_verify_reward(completions)
    with pytest.raises(ValueError, match="3 completions but 2"):
        math_verify_reward(completions, ["7", "7"])


def test_math_verify_reward_multiple_choice():
    completions = [
        r"\boxed{D}",
        r"\boxed{(D)}",
        r"\boxed{\text{D. 5 g/cm^3}}",
        r"\boxed{d}",
        r"\boxed{C}",
        "Answer: D",
    ]
    assert math_verify_reward(completions, ["D"] * 6) == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    assert math_verify_reward([r"\boxed{C}", r"\boxed{\text{(C)}}"], [r"\text{(C)}"] * 2) == [1.0, 1.0]


def test_math_verify_reward_unparsable_gold():
    completions = [r"\boxed{5}", r"\boxed{5}", r"\boxed{5}", r"\boxed{np.arcsin(10/13)}", r"\boxed{5}"]
    golds = [None, "", r"\boxed{}", "np.arcsin(10/13)", "np.arcsin(10/13)"]
    # Unverifiable rows give None, except a verbatim match of a gold kept as text.
    assert math_verify_reward(completions, golds) == [None, None, None, 1.0, None]


@pytest.mark.parametrize(
    "completion",
    [
        None,
        123,
        "",
        "}}}{{{ \\boxed{",
        "\\boxed{\\frac{",
        "\\boxed{" + "{" * 500,
        "\\boxed{1/0}",
        "\\boxed{" + "x" * 5000 + "}",
        "\\boxed{\u00e9\u00e8\u4e2d}",
        [{"role": "assistant", "content": None}],
        [],
        {"content": 5},
        "\\boxed{9^{9^{9^{9}}}}",
    ],
)
def test_math_verify_reward_garbage_scores_zero(completion):
    assert math_verify_reward([completion], ["5"]) == [0.0]


def test_math_verify_reward_outside_main_thread():
    # signal-based timeouts raise off the main thread: they must be switched off there, not crash the reward.
    results = {}

    def work():
        results["rewards"] = math_verify_reward([r"\boxed{\frac{1}{2}}", r"\boxed{3}"], ["0.5", "4"])

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=60)
    assert results["rewards"] == [1.0, 0.0]


def test_math_verify_reward_logs_extracted_answers():
    logged = {}
    math_verify_reward(
        [r"\boxed{1}", "nothing"], ["1", "1"], log_extra=lambda name, values: logged.update({name: values})
    )
    assert logged == {"extracted_answer": ["1", "[none]"]}


def test_format_reward():
    completions = [
        r"so \boxed{3}",
        "no answer",
        r"\boxed{}",
        r"\boxed{3",
        [{"role": "assistant", "content": r"\fbox{x}"}],
    ]
    assert format_reward(completions) == [1.0, 0.0, 0.0, 0.0, 1.0]


def test_reward_registry():
    assert REWARD_FUNCS["math_verify"] is math_verify_reward
    assert REWARD_FUNCS["accuracy"] is math_verify_reward
    assert REWARD_FUNCS["format"] is format_reward
    assert get_reward_funcs(["math_verify", "Format"]) == [math_verify_reward, format_reward]
    assert get_reward_funcs("math-verify") == [math_verify_reward]
    with pytest.raises(ValueError, match="accuracy, format, math_verify"):
        get_reward_funcs(["math_verify", "bleu"])
