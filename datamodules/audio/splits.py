"""Which audio files go to train, val and test: splits are made by file, never inside one."""

import re

import numpy as np

from datamodules.base import SPLITS


def assign_splits(
    names: list[str],
    split: tuple[float, float, float],
    seed: int,
    test_pattern: str | None = None,
    val_pattern: str | None = None,
) -> dict[str, list[str]]:
    """Give each file name to exactly one of train / val / test.

    ``test_pattern`` claims the names it matches (``re.search``) for test; ``val_pattern`` then
    claims the remaining names it matches for val. A split with a pattern ignores its ``split``
    fraction. The n names left are shuffled (seeded by ``seed``) and shared among the splits without a
    pattern in proportion to their fractions: val and test take ``max(1, round(n * share))`` names
    each, share = their fraction / the sum of the fractions of the splits without a pattern (none for
    a fraction of 0); train takes the rest. So with ``test_pattern`` and ``split=(0.9, 0.1, 0.0)``,
    val is 10 % of the files the pattern leaves; with the default ``(0.9, 0.05, 0.05)``, 0.05 / 0.95.

    Returns ``{split: names}``, each list in the order of ``names``. Raises ValueError if a split
    would get no file.
    """
    patterns = {"test": test_pattern, "val": val_pattern}  # test first: it wins a name both match
    claimed: dict[str, str] = {}  # name -> split
    for s, pattern in patterns.items():
        if pattern is not None:
            matches = [n for n in names if n not in claimed and re.search(pattern, n)]
            if not matches:
                raise ValueError(
                    f"{s}_pattern '{pattern}' matches none of the {len(names) - len(claimed)} file names "
                    f"left to it (e.g. {names[0]!r}): give a {s}_pattern that matches some, or split by "
                    f"fractions with --data.{s}_pattern null --data.split [0.9, 0.05, 0.05]"
                )
            claimed.update((n, s) for n in matches)

    rest = [n for n in names if n not in claimed]
    free = {s: f for s, f in zip(SPLITS, split) if patterns.get(s) is None}  # splits shared out by fraction
    total = sum(free.values())
    order = np.random.default_rng(seed).permutation(len(rest))
    start = 0
    for s in ("val", "test"):
        if s not in free:
            continue
        if free[s] == 0:
            raise ValueError(f"the {s} split gets no files: give it a positive fraction in split, or a {s}_pattern")
        count = max(1, round(len(rest) * free[s] / total))
        claimed.update((rest[i], s) for i in order[start : start + count])
        start += count
    claimed.update((rest[i], "train") for i in order[start:])
    assignment = {s: [n for n in names if claimed[n] == s] for s in SPLITS}
    if not assignment["train"]:
        counts = ", ".join(f"{len(assignment[s])} {s}" for s in ("val", "test"))
        raise ValueError(
            f"no file is left for the train split ({len(names)} files: {counts}): use more files or smaller "
            f"val / test shares"
        )
    return assignment
