"""trl_jax.rewards against trl.rewards (TRL 1.16) on identical inputs."""

from __future__ import annotations

import threading

import pytest
import trl.rewards as trl_rewards

import trl_jax.rewards as R

math_verify = pytest.importorskip("math_verify")  # in the `test` extra; the fallback is tested below without it

CASES = [  # (completion, gold answer)
    (r"The answer is \boxed{\frac{63}{400}}", r"\frac{63}{400}"),
    (r"\boxed{0.1575}", r"\frac{63}{400}"),
    (r"So $0.1575$.", r"\frac{63}{400}"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{3}"),
    ("42", "42"),
    (r"\boxed{42}", "42"),
    ("The final answer is $42$", "42"),
    (r"\boxed{1 + x^2}", "x^2 + 1"),
    ("no", r"\text{no}"),
    (r"\boxed{\frac{1}{2}}", "0.5"),
    (r"\boxed{\sqrt 2}", r"$\sqrt{2}$"),
    ("<think>maybe \\boxed{4}</think> \\boxed{3}", "3"),
    ("<think>\\boxed{3}, never closed", "3"),
]
TEXTS = [c for c, _ in CASES]
SOLUTIONS = [s for _, s in CASES]


def _conv(texts):
    return [[{"role": "assistant", "content": t}] for t in texts]


def test_accuracy_reward_matches_trl_math_verify():
    expected = trl_rewards.accuracy_reward(_conv(TEXTS), SOLUTIONS)
    assert R.accuracy_reward(_conv(TEXTS), solution=SOLUTIONS) == expected
    assert R.accuracy_reward(TEXTS, answer=SOLUTIONS) == expected  # plain-string completions, `answer` column
    assert expected[0] == 1.0 and expected[1] == 1.0 and expected[2] == 0.0  # LaTeX-aware, not string match
    assert None in expected  # an unparseable gold answer skips the example


def test_accuracy_reward_log_extra_matches_trl():
    ours, theirs = {}, {}
    R.accuracy_reward(_conv(TEXTS), solution=SOLUTIONS, log_extra=lambda k, v: ours.__setitem__(k, v))
    trl_rewards.accuracy_reward(_conv(TEXTS), SOLUTIONS, log_extra=lambda k, v: theirs.__setitem__(k, v))
    assert ours == theirs and set(ours) == {"solution", "gold_parsed", "answer_parsed"}


def test_accuracy_reward_in_a_thread_matches_trl():
    results = {}

    def run():
        results["ours"] = R.accuracy_reward(_conv(TEXTS[:4]), solution=SOLUTIONS[:4])
        results["trl"] = trl_rewards.accuracy_reward(_conv(TEXTS[:4]), SOLUTIONS[:4])

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert results["ours"] == results["trl"]


@pytest.mark.parametrize("delims", [None, ["</think>"], ["</reasoning>", "</think>"]])
def test_reasoning_accuracy_reward_matches_trl(delims):
    texts = TEXTS + ["<think>a</think>b</think> \\boxed{3}", "</reasoning>\\boxed{3}</think>\\boxed{4}"]
    sols = SOLUTIONS + ["3", "3"]
    expected = trl_rewards.reasoning_accuracy_reward(_conv(texts), sols, reasoning_delimiters=delims)
    assert R.reasoning_accuracy_reward(_conv(texts), solution=sols, reasoning_delimiters=delims) == expected
    assert 0.0 in expected and 1.0 in expected


@pytest.mark.parametrize("kw", [dict(max_len=10), dict(max_len=4, min_value_wrong=-2.0, max_value_wrong=-0.1,
                                                           min_value_correct=0.2, max_value_correct=3.0)])
def test_cosine_scaled_reward_matches_trl(kw):
    ids = [[1] * n for n in (0, 1, 3, 5, 7, 10, 12, 4, 9, 2, 6, 8, 11)]
    ours = R.get_cosine_scaled_reward(**kw)
    theirs = trl_rewards.get_cosine_scaled_reward(**kw)
    expected = theirs(_conv(TEXTS), SOLUTIONS, ids)
    assert ours(_conv(TEXTS), solution=SOLUTIONS, completion_ids=ids) == expected
    assert ours.__name__ == theirs.__name__


@pytest.mark.parametrize("ngram_size, max_penalty", [(3, -1.0), (2, -0.5), (1, -2.0), (5, 0.0)])
def test_repetition_penalty_matches_trl(ngram_size, max_penalty):
    ids = [[1, 2, 3, 4], [5, 5, 5, 5, 5], [], [1, 2], [1, 2, 1, 2, 1, 2, 3], [7] * 12, [1, 2, 3, 1, 2, 3, 1, 2, 3]]
    ours = R.get_repetition_penalty_reward(ngram_size, max_penalty)
    theirs = trl_rewards.get_repetition_penalty_reward(ngram_size, max_penalty)
    assert ours(completion_ids=ids) == theirs(completion_ids=ids)
    assert ours.__name__ == theirs.__name__
    with pytest.raises(ValueError, match="should not be positive"):
        R.get_repetition_penalty_reward(2, 0.5)


@pytest.mark.parametrize("lmax, cache", [(8, 4), (10, 0), (6, 6), (100, 20)])
def test_soft_overlong_punishment_matches_trl(lmax, cache):
    ids = [[1] * n for n in (0, 1, 3, 4, 5, 6, 7, 8, 9, 12, 80, 90, 100, 101)]
    assert R.get_soft_overlong_punishment(lmax, cache)(completion_ids=ids) == \
        trl_rewards.get_soft_overlong_punishment(lmax, cache)(completion_ids=ids)


def test_think_format_reward_matches_trl():
    texts = ["<think>\nreason\n</think>\n42", "<think>a</think><think>b</think>x", "no think", "<think>open"]
    assert R.think_format_reward(_conv(texts)) == trl_rewards.think_format_reward(_conv(texts))


def test_every_trl_reward_has_a_counterpart():
    import trl.rewards

    for name in trl.rewards._import_structure.values():
        for fn in name:
            assert hasattr(R, fn), fn
    from trl.scripts import grpo as trl_grpo_script
    import inspect

    src = inspect.getsource(trl_grpo_script)
    for name in ("accuracy_reward", "reasoning_accuracy_reward", "think_format_reward", "get_soft_overlong_punishment"):
        assert f'"{name}"' in src and name in R.REWARD_FUNCS


def test_fallback_without_math_verify_is_exact_match(monkeypatch):
    monkeypatch.setattr(R, "is_math_verify_available", lambda: False)
    assert R.accuracy_reward(["7", " 7\n", "8", "<think>x</think>7", r"\boxed{7}"], answer=["7"] * 5) == \
        [1.0, 1.0, 0.0, 1.0, 0.0]
    assert R.accuracy_reward(["1"], answer=[None]) == [None]
    assert R.reasoning_accuracy_reward(["<think>a</think> 7", "7", "<think>a</think>8"], answer=["7"] * 3) == \
        [1.0, 0.0, 0.0]
    cosine = R.get_cosine_scaled_reward(max_len=10)
    assert cosine(["7", "8"], answer=["7", "7"], completion_ids=[[1] * 5, [1] * 5]) == pytest.approx([0.75, -0.75])


def test_exact_and_digit_match_rewards():
    assert R.exact_match_reward(["7", " 7\n", "8", "<think>x</think>7"], answer=["7"] * 4) == [1.0, 1.0, 0.0, 1.0]
    assert R.exact_match_reward([[{"content": "12"}]], solution=["12"]) == [1.0]
    got = R.digit_match_reward(["1234", "1243", "12345", "", "9", "<think>x</think> 1234", "1"],
                               answer=["1234", "1234", "1234", "12", "1", "1234", None])
    assert got == [1.0, 0.5, 0.8, 0.0, 0.0, 1.0, None]
    with pytest.raises(ValueError, match="`answer` or `solution` column"):
        R.digit_match_reward(["1"])
    assert R.resolve_reward_funcs(["digit_match_reward", "exact_match_reward"]) == [R.digit_match_reward,
                                                                                   R.exact_match_reward]


def test_positional_calls_as_in_trl_docstrings():
    sols = [r"\frac{1}{3}", r"\frac{1}{3}"]
    comps = [[{"content": r"\boxed{\frac{1}{3}}"}], [{"content": r"\boxed{\frac{1}{2}}"}]]
    assert R.accuracy_reward(comps, sols) == trl_rewards.accuracy_reward(comps, sols) == [1.0, 0.0]
    ids = [[1] * 50, [1] * 50]
    assert R.get_cosine_scaled_reward(max_len=100)(comps, sols, ids) == \
        trl_rewards.get_cosine_scaled_reward(max_len=100)(comps, sols, ids) == [0.75, -0.75]
    think = [[{"content": r"<think>r</think> \boxed{\frac{1}{3}}"}], [{"content": r"<think>\boxed{\frac{1}{3}}"}]]
    assert R.reasoning_accuracy_reward(think, sols, ["</think>"]) == \
        trl_rewards.reasoning_accuracy_reward(think, sols, ["</think>"]) == [1.0, 0.0]
    # a dataset with both columns: TRL's functions read `solution`
    assert R.accuracy_reward([r"\boxed{2}"], solution=["2"], answer=["3"]) == [1.0]
    assert R.exact_match_reward(["3"], solution=["2"], answer=["3"]) == [1.0]
