"""Entity tagging schemes: IOB1, IOB2 and BIOES tags, and conversion between them.

Datasets come in one scheme (the original CoNLL-2003 files in IOB1, most others in IOB2) while
a model is trained in another, so tags are converted when read. Every conversion goes through
IOB2: B-X opens every entity, I-X continues it. An I-X that does not continue an X entity
(IOB1's entity start, or a stray I in IOB2) opens one, as conlleval and seqeval read it.
`load_token_classification` converts the tags it reads; the trainer needs nothing here.
"""

from __future__ import annotations

from typing import Callable

from bert_jax.errors import BertJaxError

SCHEMES = {"IOB1": "BI", "IOB2": "BI", "BIOES": "BIES"}  # the prefixes each scheme uses


def _check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise BertJaxError(f"unknown tagging scheme {scheme!r} (known: {', '.join(SCHEMES)})")
    return scheme


def _split_tag(tag: str, scheme: str, where: str) -> tuple[str, str]:
    """("B", "PER") for "B-PER", ("O", "") for "O"; an error naming `where` for a tag the
    scheme does not have."""
    if tag == "O":
        return "O", ""
    prefix, dash, entity = tag.partition("-")
    if not dash or not entity or prefix not in SCHEMES[scheme]:
        raise BertJaxError(f"{where}: tag {tag!r} is not an {scheme} tag "
                           f"(O or {'/'.join(SCHEMES[scheme])}-TYPE)")
    return prefix, entity


def convert_tags(tags: list[str], source: str, target: str,
                 where: Callable[[int], str] = lambda index: f"token {index + 1}") -> list[str]:
    """One sentence's `tags` from scheme `source` to scheme `target` (IOB2 or BIOES);
    `where(index)` places a tag that `source` does not have in the error."""
    if _check_scheme(target) == "IOB1":
        raise BertJaxError("IOB1 is read, not written: train in IOB2 or BIOES")
    iob2, inside = [], ""  # inside: the type of the entity the previous tag leaves open
    for index, tag in enumerate(tags):
        prefix, entity = _split_tag(tag, _check_scheme(source), where(index))
        opens = prefix in "BS" or (prefix in "IE" and entity != inside)
        iob2.append(("B" if opens else prefix if prefix == "O" else "I", entity))
        inside = entity if prefix in "BI" else ""
    if target == "BIOES":
        ends = [i + 1 == len(iob2) or iob2[i + 1] != ("I", entity)
                for i, (_, entity) in enumerate(iob2)]
        iob2 = [({"B": "S", "I": "E"}[prefix] if end and prefix != "O" else prefix, entity)
                for (prefix, entity), end in zip(iob2, ends)]
    return [prefix if prefix == "O" else f"{prefix}-{entity}" for prefix, entity in iob2]
