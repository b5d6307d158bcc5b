"""The zoo corpus's task table: which books of the King James Bible form each class of the
binary probing tasks (:mod:`itda_lens.probing`)."""

from __future__ import annotations

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
EPISTLES = (
    "Romans",
    "1 Corinthians",
    "2 Corinthians",
    "Ephesians",
    "Philippians",
    "Colossians",
    "1 Thessalonians",
    "2 Thessalonians",
    "1 Timothy",
    "2 Timothy",
    "Titus",
    "Philemon",
    "Hebrews",
    "James",
    "1 Peter",
    "2 Peter",
    "1 John",
    "2 John",
    "3 John",
    "Revelation",
)
OLD = LAW + HISTORY + POETRY + PROPHETS
#: task name -> (books of class 0, books of class 1)
TASKS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "old_vs_new_testament": (OLD, GOSPELS_ACTS + EPISTLES),
    "law_vs_prophets": (LAW, PROPHETS),
    "poetry_vs_history": (POETRY, HISTORY),
    "gospels_vs_epistles": (GOSPELS_ACTS, EPISTLES),
}
