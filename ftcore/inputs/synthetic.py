"""Built-in synthetic Alpaca-format data: small word tasks with exact answers, deterministic by
seed.

Two groups of task families:
- PRETRAIN_FAMILIES: what the `tiny-pretrained` preset learns while it is made (full-parameter
  training, ftcore.inputs.pretrain): spell a word backwards, in capitals, its first letter, its
  length, the first word of a list, a unit conversion. All over one fixed list of 36 words.
- FINETUNE_FAMILIES: held out of pretraining; the built-in fine-tune data. They reuse what the base
  knows under instructions it has never seen ("the last letter", "spell ... in reverse"), so a
  LoRA fine-tune has a measurable effect: exact-match accuracy of greedy answers goes from near 0
  to well above it.
Every family's answer is exact, so accuracy is an exact match of the generated tokens.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

Record = dict[str, str]

WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "garden",
    "candle",
    "mirror",
    "forest",
    "window",
    "ladder",
    "pepper",
    "marble",
    "rocket",
    "silver",
    "velvet",
    "harbor",
    "pencil",
    "meadow",
    "copper",
    "lantern",
    "puzzle",
    "engine",
    "orange",
    "tiger",
    "violin",
    "basket",
    "falcon",
    "island",
    "jacket",
    "kettle",
    "lemon",
    "magnet",
    "needle",
    "ocean",
    "planet",
    "quartz",
]

UNITS = (  # (from, to, factor): factors whose products are the number followed by zeros
    ("meters", "centimeters", 100),
    ("kilometers", "meters", 1000),
    ("kilograms", "grams", 1000),
    ("liters", "milliliters", 1000),
)


def _no_input(instruction: str, output: str) -> Record:
    return {"instruction": instruction, "input": "", "output": output}


# --- pretraining families


def backwards(rng: random.Random) -> Record:
    w = rng.choice(WORDS)
    return _no_input(f"Write the word {w} backwards.", w[::-1])


def capitals(rng: random.Random) -> Record:
    w = rng.choice(WORDS)
    return _no_input(f"Write the word {w} in capital letters.", w.upper())


def first_letter(rng: random.Random) -> Record:
    w = rng.choice(WORDS)
    return _no_input(f"What is the first letter of the word {w}?", w[0])


def word_length(rng: random.Random) -> Record:
    w = rng.choice(WORDS)
    return _no_input(f"How many letters does the word {w} have?", str(len(w)))


def first_word(rng: random.Random) -> Record:
    ws = rng.sample(WORDS, rng.randint(2, 5))
    return {
        "instruction": "Write the first word of the list.",
        "input": " ".join(ws),
        "output": ws[0],
    }


def convert_units(rng: random.Random) -> Record:
    src, dst, factor = rng.choice(UNITS)
    n = rng.randint(1, 50)
    return _no_input(f"Convert {n} {src} to {dst}.", f"{n} {src} is {n * factor} {dst}.")


# --- fine-tuning families (never seen in pretraining)


def last_letter(rng: random.Random) -> Record:
    w = rng.choice(WORDS)
    return _no_input(f"What is the last letter of the word {w}?", w[-1])


def spell_reversed(rng: random.Random) -> Record:
    w = rng.choice(WORDS)
    return _no_input(f"Spell {w} in reverse.", w[::-1])


Family = Callable[[random.Random], Record]
PRETRAIN_FAMILIES: tuple[Family, ...] = (
    backwards,
    capitals,
    first_letter,
    word_length,
    first_word,
    convert_units,
)
FINETUNE_FAMILIES: tuple[Family, ...] = (last_letter, spell_reversed)
ALL_FAMILIES = PRETRAIN_FAMILIES + FINETUNE_FAMILIES


def synthetic_records(
    n: int, seed: int = 0, families: Sequence[Family] = FINETUNE_FAMILIES
) -> list[Record]:
    """`n` Alpaca-format records drawn from `families` (default: the fine-tuning families, the
    built-in fine-tune data); the same for the same seed."""
    rng = random.Random(seed)
    return [rng.choice(families)(rng) for _ in range(n)]
