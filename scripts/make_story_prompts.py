"""Write configs/data/story_prompts.jsonl: story openers for the stories260K RL demos.

    python scripts/make_story_prompts.py

Templates x names x places x things, in the TinyStories register the model was trained on,
sampled without replacement by a fixed-seed generator: the file is the same on every machine.
The train/held-out split is `data.val_size` rows chosen by `align.data.train_val_split` (a
content hash), so it is deterministic too.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

NAMES = ["Lily", "Tim", "Ben", "Sue", "Tom", "Mia", "Max", "Anna", "Sam", "Lucy", "Jack", "Sara"]
PLACES = ["park", "forest", "beach", "garden", "store", "school", "zoo", "farm", "lake", "playground"]
THINGS = ["dog", "cat", "bird", "bunny", "girl", "boy", "bear", "fish", "frog", "car"]
TEMPLATES = [
    "Once upon a time, there was a little {thing} named {name}.",
    "Once upon a time, there was a little",
    "One day, {name} went to the {place}",
    "One day, {name} went to the {place} with {pronoun} mom.",
    "{name} liked to play in the {place}. One day,",
    "It was a sunny day. {name} and {other} went to the {place}.",
    "Once upon a time, in a big {place}, there lived a {thing}.",
    "{name} had a little {thing}. Every day,",
    "{name} and {other} were friends. They",
    "One morning, {name} saw a {thing} in the {place}.",
]
PRONOUN = {"Lily": "her", "Sue": "her", "Mia": "her", "Anna": "her", "Lucy": "her", "Sara": "her"}


def story_openers(count: int = 160, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    seen, out = set(), []
    combos = list(itertools.product(TEMPLATES, NAMES, NAMES, PLACES, THINGS))
    rng.shuffle(combos)
    for template, name, other, place, thing in combos:
        if name == other:
            continue
        text = template.format(name=name, other=other, place=place, thing=thing, pronoun=PRONOUN.get(name, "his"))
        if text not in seen:
            seen.add(text)
            out.append(text)
        if len(out) == count:
            break
    return out


def main() -> None:
    path = Path(__file__).resolve().parents[1] / "configs" / "data" / "story_prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in story_openers()))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
