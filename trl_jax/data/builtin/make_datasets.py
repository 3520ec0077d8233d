"""Deterministic generator of the tiny builtin datasets (run: `python -m trl_jax.data.builtin.make_datasets`).

* `arithmetic_sft.jsonl`: `messages` (user asks a small digit task: "What is a+b?" with single digits, "Repeat
  4821", "Reverse 4821" or "What comes after 37?"; the assistant answers), plus an exact `answer` column. The
  tasks are chosen so that a tiny model trained from scratch on a CPU in a minute or two generalises to the
  held-out split (copying and reversing through attention, increments through digit rules). Train/test splits: `arithmetic_sft.jsonl` / `arithmetic_sft_test.jsonl`.
* `arithmetic_preference.jsonl`: `prompt` / `chosen` / `rejected` (conversational); chosen is the right answer,
  rejected an off-by-a-few wrong one. `arithmetic_preference_test.jsonl`: the same for the held-out problems.
* `arithmetic_prompts.jsonl`: `prompt` (conversational) and `answer` (exact-match string) for GRPO.
"""

from __future__ import annotations

import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
OPS = ("+", "-", "*")


def _problem(rng: random.Random) -> tuple[str, str]:
    kind = rng.choice(("add", "repeat", "reverse", "next"))
    if kind == "add":
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return f"What is {a}+{b}?", str(a + b)
    if kind == "next":
        a = rng.randint(0, 98)
        return f"What comes after {a}?", str(a + 1)
    digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 5)))
    if kind == "repeat":
        return f"Repeat {digits}", digits
    return f"Reverse {digits}", digits[::-1]


def _wrong(rng: random.Random, answer: str) -> str:
    if len(answer) >= 3 and rng.random() < 0.5:  # a digit string: swap two positions or change one digit
        i = rng.randrange(len(answer))
        return answer[:i] + str((int(answer[i]) + rng.randint(1, 9)) % 10) + answer[i + 1:]
    delta = rng.choice([-3, -2, -1, 1, 2, 3, 10])
    return str(max(int(answer) + delta, 0) if int(answer) + delta != int(answer) else int(answer) + 1)


def _write(name: str, rows: list[dict]) -> None:
    with open(os.path.join(HERE, name), "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def make_all(n_train: int = 2000, n_test: int = 200, seed: int = 1234) -> None:
    rng = random.Random(seed)
    seen: set[str] = set()
    problems = []
    while len(problems) < n_train + n_test:
        q, a = _problem(rng)
        if q not in seen:
            seen.add(q)
            problems.append((q, a))
    train, test = problems[:n_train], problems[n_train:]

    def sft_row(q, a):
        return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], "answer": a}

    _write("arithmetic_sft.jsonl", [sft_row(q, a) for q, a in train])
    _write("arithmetic_sft_test.jsonl", [sft_row(q, a) for q, a in test])
    def pref_rows(problems):
        rows = []
        for q, a in problems:
            wrong = _wrong(rng, a)
            if wrong == a:
                wrong = str(int(a) + 1)
            rows.append({
                "prompt": [{"role": "user", "content": q}],
                "chosen": [{"role": "assistant", "content": a}],
                "rejected": [{"role": "assistant", "content": wrong}],
            })
        return rows

    _write("arithmetic_preference.jsonl", pref_rows(train))
    _write("arithmetic_preference_test.jsonl", pref_rows(test))  # drawn after the train pairs: those stay as they were
    _write("arithmetic_prompts.jsonl", [{"prompt": [{"role": "user", "content": q}], "answer": a} for q, a in train])
    _write("arithmetic_prompts_test.jsonl",
           [{"prompt": [{"role": "user", "content": q}], "answer": a} for q, a in test])


if __name__ == "__main__":
    make_all()
