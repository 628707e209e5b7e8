"""Built-in synthetic Alpaca-format data: small tasks with exact answers, deterministic by seed.

Used when no --data is given, and to train the presets' local tokenizer. The tasks are regular
enough that a tiny randomly initialised model's loss clearly falls within a few dozen steps.
"""

from __future__ import annotations

import random

WORDS = ["apple", "river", "stone", "cloud", "garden", "candle", "mirror", "forest", "window", "ladder", "pepper", "marble", "rocket", "silver", "velvet", "harbor", "pencil", "meadow", "copper", "lantern", "puzzle", "engine", "orange", "tiger", "violin", "basket", "falcon", "island", "jacket", "kettle", "lemon", "magnet", "needle", "ocean", "planet", "quartz"]

UNITS = (  # (from, to, factor)
    ("meters", "centimeters", 100),
    ("kilometers", "meters", 1000),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("kilograms", "grams", 1000),
    ("liters", "milliliters", 1000),
)


def _arithmetic(rng: random.Random) -> dict[str, str]:
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    op = rng.choice("+-*")
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return {"instruction": "Compute the result of the expression.", "input": f"{a} {op} {b}", "output": str(value)}


def _sort_numbers(rng: random.Random) -> dict[str, str]:
    xs = [rng.randint(0, 99) for _ in range(rng.randint(3, 8))]
    return {
        "instruction": "Sort the numbers in ascending order.",
        "input": ", ".join(map(str, xs)),
        "output": ", ".join(map(str, sorted(xs))),
    }


def _reverse_word(rng: random.Random) -> dict[str, str]:
    w = rng.choice(WORDS)
    return {"instruction": f"Write the word {w} backwards.", "input": "", "output": w[::-1]}


def _convert_units(rng: random.Random) -> dict[str, str]:
    src, dst, factor = rng.choice(UNITS)
    n = rng.randint(1, 50)
    return {
        "instruction": f"Convert {n} {src} to {dst}.",
        "input": "",
        "output": f"{n} {src} is {n * factor} {dst}.",
    }


def _count_letters(rng: random.Random) -> dict[str, str]:
    w = rng.choice(WORDS)
    letter = rng.choice(w)
    return {
        "instruction": f"How many times does the letter '{letter}' appear in the word?",
        "input": w,
        "output": str(w.count(letter)),
    }


def _list_words(rng: random.Random) -> dict[str, str]:
    ws = rng.sample(WORDS, rng.randint(2, 5))
    return {
        "instruction": "Sort these words alphabetically.",
        "input": " ".join(ws),
        "output": " ".join(sorted(ws)),
    }


TASKS = (_arithmetic, _sort_numbers, _reverse_word, _convert_units, _count_letters, _list_words)


def synthetic_records(n: int, seed: int = 0) -> list[dict[str, str]]:
    """`n` Alpaca-format records (instruction, input, output), the same for the same seed."""
    rng = random.Random(seed)
    return [rng.choice(TASKS)(rng) for _ in range(n)]
