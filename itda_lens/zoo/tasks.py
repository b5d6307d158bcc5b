"""The zoo corpus's task table: which books of the King James Bible form each class of the
binary probing tasks (:mod:`itda_lens.probing`)."""

from __future__ import annotations

from itda_lens.zoo.corpus import EPISTLES as LETTERS
from itda_lens.zoo.corpus import HELDOUT_BOOKS

LAW = ("Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy")
HISTORY = (
    "Joshua",
    "Judges",
    "1 Samuel",
    "2 Samuel",
    "1 Kings",
    "2 Kings",
    "1 Chronicles",
    "2 Chronicles",
    "Ezra",
    "Nehemiah",
    "Esther",
)
POETRY = ("Job", "Psalms", "Proverbs", "Song of Solomon")
PROPHETS = (
    "Isaiah",
    "Jeremiah",
    "Lamentations",
    "Ezekiel",
    "Daniel",
    "Hosea",
    "Amos",
    "Obadiah",
    "Jonah",
    "Micah",
    "Nahum",
    "Habakkuk",
    "Zephaniah",
    "Haggai",
    "Zechariah",
    "Malachi",
)
GOSPELS_ACTS = ("Matthew", "Luke", "John", "Acts")
#: the letters of the training split (Galatians and Jude are held out) and Revelation
EPISTLES = (*(b for b in LETTERS if b not in HELDOUT_BOOKS), "Revelation")
OLD = LAW + HISTORY + POETRY + PROPHETS
#: task name -> (books of class 0, books of class 1)
TASKS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "old_vs_new_testament": (OLD, GOSPELS_ACTS + EPISTLES),
    "law_vs_prophets": (LAW, PROPHETS),
    "poetry_vs_history": (POETRY, HISTORY),
    "gospels_vs_epistles": (GOSPELS_ACTS, EPISTLES),
}
