"""Language identification data from the gettext catalogs Debian installs: Swedish (sv),
Norwegian Bokmål (nb) and Danish (da) translations, and English (en), the catalogs' msgids.

    python examples/language_id/make_data.py --out runs/language_id/data

writes `train.jsonl`, `validation.jsonl` and `test.jsonl` (one {"text", "label", "domain"}
object a line), `pretrain_train.txt` (the train split only, one text a line, a blank line
between catalogs: `prepare-data`'s documents), `pretrain_validation.txt` (the same for the
validation split, for held-out MLM loss) and `stats.json`.

How the examples are chosen, and why:
- Only catalog domains (source files, e.g. `glib20`) translated into all three languages, so
  each language is seen on the same software's messages and the topic tells nothing.
- Each line of a message is an example; lines with fewer than `--min-words` words once
  printf / brace / shell formats and markup are removed are dropped (format-only strings,
  single names such as most of the `iso_*` catalogs).
- Splits are by domain (about 80/10/10, see `split_domains`), so no catalog is seen in
  two splits; a text (case-folded) occurring in several domains stays
  only in its highest split in the order train > validation > test, so no test text is seen
  in training, and a text found under two languages (e.g. an untranslated copy of the msgid)
  is dropped.
- English is counted once per msgid, however many catalogs translate it.
- Each split is then balanced: every language down-sampled to the smallest one's count, so
  the majority-class accuracy is 25% and per-language accuracies are comparable.
"""

from __future__ import annotations

import argparse
import collections
import gettext
import json
import random
import re
import sys
from pathlib import Path

from bert_jax.errors import BertJaxError
from bert_jax.files import atomic_directory

TRANSLATIONS = ("sv", "nb", "da")
LABELS = ("sv", "nb", "da", "en")
SPLITS = ("train", "validation", "test")  # the order a text shared by splits is kept in
# printf (%s, %-10.3lu, %1$s, %<PRIu64>), brace ({0}, {name}), shell (${HOME}) formats, markup.
FORMATS = re.compile(r"%(\d+\$)?[-+ #0'I]*[\d*]*(\.[\d*]+)?(hh|ll|[hlLqjzt])?[a-zA-Z%]"
                     r"|%<\w+>|\$?\{[^}]*\}|<[^>]*>|&\w+;")
WORD = re.compile(r"[^\W\d_]{2,}")  # two or more letters


def read_catalog(path: Path) -> list[tuple[str, str]]:
    """(msgid, translation) pairs of a .mo file; plural forms each give a pair, message
    contexts are dropped."""
    with path.open("rb") as f:
        catalog = gettext.GNUTranslations(f)._catalog  # the module has no public listing
    pairs = []
    for key, translation in catalog.items():
        msgid = key[0] if isinstance(key, tuple) else key
        if msgid:  # "" is the header
            pairs.append((msgid.split("\x04")[-1], translation))
    return pairs


def example_lines(message: str, min_words: int) -> list[str]:
    """The lines of a message worth classifying, whitespace collapsed."""
    lines = (" ".join(line.split()) for line in message.splitlines())
    return [line for line in lines if len(WORD.findall(FORMATS.sub(" ", line))) >= min_words]


def read_locales(locale_dir: Path, min_words: int, domains: list[str] | None
                 ) -> tuple[dict[str, dict[str, set[str]]], list[str]]:
    """domain -> label -> texts, for the domains every translation language has (or the
    `domains` asked for), and the catalogs that could not be read."""
    found = [{p.stem for p in (locale_dir / lang / "LC_MESSAGES").glob("*.mo")}
             for lang in TRANSLATIONS]
    common = sorted(set.intersection(*found))
    if domains:
        missing = sorted(set(domains) - set(common))
        if missing:
            raise BertJaxError(f"{locale_dir}: no {', '.join(TRANSLATIONS)} catalogs for "
                               f"domain {missing[0]!r}")
        common = sorted(domains)
    if len(common) < len(SPLITS):
        raise BertJaxError(f"{locale_dir}: {len(common)} domains translated into "
                           f"{', '.join(TRANSLATIONS)}; at least {len(SPLITS)} are needed")
    texts: dict[str, dict[str, set[str]]] = {d: collections.defaultdict(set) for d in common}
    unreadable = []
    for domain in common:
        for lang in TRANSLATIONS:
            path = locale_dir / lang / "LC_MESSAGES" / f"{domain}.mo"
            try:
                pairs = read_catalog(path)
            except (OSError, UnicodeDecodeError) as err:  # e.g. a Latin-1 header
                unreadable.append(f"{path}: {err}")
                continue
            for msgid, translation in pairs:
                texts[domain]["en"].update(example_lines(msgid, min_words))
                texts[domain][lang].update(example_lines(translation, min_words))
    return texts, unreadable


def split_domains(texts: dict[str, dict[str, set[str]]], seed: int, held_out: float
                  ) -> dict[str, str]:
    """domain -> split: in a seeded order, each domain goes to the split furthest below its
    share (`held_out` for validation and test each, the rest train) of the texts counted in
    each domain's rarest language, as balancing keeps about that many of every language."""
    sizes = {d: min(len(by_label[label]) for label in LABELS) for d, by_label in texts.items()}
    order = sorted(sizes)
    random.Random(seed).shuffle(order)
    share = {"train": 1 - 2 * held_out, "validation": held_out, "test": held_out}
    total, assignment, filled = sum(sizes.values()), {}, collections.Counter()
    for domain in order:
        split = max(SPLITS, key=lambda s: share[s] * total - filled[s])
        assignment[domain], filled[split] = split, filled[split] + sizes[domain]
    if set(assignment.values()) != set(SPLITS):
        raise BertJaxError("too few domains to fill train, validation and test; add domains")
    return assignment


def build_splits(texts: dict[str, dict[str, set[str]]], assignment: dict[str, str], seed: int
                 ) -> dict[str, list[dict[str, str]]]:
    """Deduplicated, unambiguous, balanced examples of each split, in a seeded order."""
    labels_of = collections.defaultdict(set)  # case-folded text -> labels
    home = {}  # case-folded text -> (split rank, domain, text, label) where it is kept
    for domain, by_label in sorted(texts.items()):
        rank = SPLITS.index(assignment[domain])
        for label, lines in by_label.items():
            for text in sorted(lines):
                key = text.casefold()
                labels_of[key].add(label)
                home[key] = min(home.get(key, (rank, domain, text, label)),
                                (rank, domain, text, label))
    by_split = {s: collections.defaultdict(list) for s in SPLITS}
    for key, (rank, domain, text, label) in sorted(home.items()):
        if len(labels_of[key]) == 1:
            by_split[SPLITS[rank]][label].append({"text": text, "label": label, "domain": domain})
    rng = random.Random(seed)
    splits = {}
    for split, by_label in by_split.items():
        smallest = min(len(by_label[label]) for label in LABELS)
        if smallest == 0:
            raise BertJaxError(f"the {split} split lacks a language ({split} domains: "
                               f"{', '.join(d for d, s in assignment.items() if s == split)})")
        examples = [x for label in LABELS for x in rng.sample(by_label[label], smallest)]
        rng.shuffle(examples)
        splits[split] = examples
    return splits


def pretraining_corpus(examples: list[dict[str, str]]) -> str:
    """One text a line, one document (blank-line separated) per domain and language."""
    documents = collections.defaultdict(list)
    for x in sorted(examples, key=lambda x: (x["domain"], x["label"], x["text"])):
        documents[x["domain"], x["label"]].append(x["text"])
    return "\n\n".join("\n".join(lines) for lines in documents.values()) + "\n"


def make_data(locale_dir: str | Path, out: str | Path, *, min_words: int = 3, seed: int = 0,
              held_out: float = 0.1, domains: list[str] | None = None,
              overwrite: bool = False) -> dict:
    """Write the splits, the pretraining corpora and `stats.json` to `out`; returns the stats."""
    locale_dir = Path(locale_dir)
    texts, unreadable = read_locales(locale_dir, min_words, domains)
    assignment = split_domains(texts, seed, held_out)
    splits = build_splits(texts, assignment, seed)
    stats = {"locale_dir": str(locale_dir), "min_words": min_words, "seed": seed,
             "held_out": held_out,
             "examples": {s: dict(collections.Counter(x["label"] for x in xs))
                          for s, xs in splits.items()},
             "domains": {s: sorted(d for d, a in assignment.items() if a == s) for s in SPLITS},
             "unreadable_catalogs": unreadable}
    with atomic_directory(out, overwrite=overwrite) as staging:
        for split, examples in splits.items():
            with (staging / f"{split}.jsonl").open("w", encoding="utf-8") as f:
                f.writelines(json.dumps(x, ensure_ascii=False) + "\n" for x in examples)
        for split in ("train", "validation"):
            (staging / f"pretrain_{split}.txt").write_text(pretraining_corpus(splits[split]),
                                                           encoding="utf-8")
        (staging / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def summary(stats: dict) -> str:
    """Examples per split and language, and the catalogs skipped."""
    return "\n".join([f"skipped {problem}" for problem in stats["unreadable_catalogs"]] + [
        f"{split}: {len(stats['domains'][split])} domains, examples per language "
        f"{stats['examples'][split]}" for split in SPLITS])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory (written atomically)")
    parser.add_argument("--locale-dir", default="/usr/share/locale")
    parser.add_argument("--domains", nargs="+", help="only these catalog domains (default: "
                        "every domain translated into sv, nb and da)")
    parser.add_argument("--min-words", type=int, default=3)
    parser.add_argument("--held-out", type=float, default=0.1,
                        help="share of the texts for each of validation and test, counted "
                        "in each domain's rarest language (default 0.1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args(argv)
    try:
        stats = make_data(args.locale_dir, args.out, min_words=args.min_words, seed=args.seed,
                          held_out=args.held_out, domains=args.domains, overwrite=args.overwrite)
    except BertJaxError as err:
        print(f"make_data: error: {err}", file=sys.stderr)
        return 1
    print(summary(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
