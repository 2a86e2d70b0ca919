"""A seeded generator of short documents of made-up facts with question/answer pairs (Doc-to-LoRA training and
its benchmark). Each document states four facts about each of ``n_entities`` made-up countries::

    The capital of Zorblat is Mivo. The national animal of Zorblat is the otter. Zorblat was founded in 1742. ...

Every question has multiple-choice candidates: the answer, the same fact of the document's other countries
(right kind, wrong country: a model that only learned which words the document contains cannot tell them apart)
and values from the pool that the document does not contain; so chance is 1/len(candidates).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

SYLLABLES = ["zor", "blat", "mi", "vo", "dren", "nic", "pas", "kel", "var", "tu", "lo", "quin", "sa", "bre", "fen",
             "dor", "ga", "lix", "mon", "pra", "ru", "sel", "tav", "ur", "wen", "yal", "ko", "nem", "os", "thal"]
ANIMALS = ["otter", "heron", "lynx", "badger", "falcon", "tortoise", "salmon", "moose", "gecko", "owl", "beaver",
           "crane", "viper", "walrus", "ibis", "jackal"]
EXPORTS = ["copper", "wool", "tea", "salt", "timber", "silk", "coffee", "tin", "rice", "glass", "marble", "cotton",
           "amber", "pepper", "iron", "honey"]
# relation: (statement, question)
RELATIONS = {
    "capital": ("The capital of {e} is {v}.", "What is the capital of {e}?"),
    "animal": ("The national animal of {e} is the {v}.", "What is the national animal of {e}?"),
    "year": ("{e} was founded in {v}.", "In which year was {e} founded?"),
    "export": ("The main export of {e} is {v}.", "What is the main export of {e}?"),
}


@dataclass
class QA:
    question: str
    answer: str
    candidates: list[str]  # the answer first
    relation: str


@dataclass
class Document:
    text: str
    entities: list[str]
    qa: list[QA] = field(default_factory=list)


def _word(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(parts)).capitalize()


def _values(rng: random.Random, relation: str, k: int, avoid: set[str]) -> list[str]:
    pool = {"animal": ANIMALS, "export": EXPORTS}.get(relation)
    if pool is not None and k > len(set(pool) - avoid):
        raise ValueError(f"{k} distinct '{relation}' values asked for; the pool has {len(set(pool) - avoid)} "
                         f"(at most {len(pool) - 2} countries per document with 2 outside values)")
    out: list[str] = []
    while len(out) < k:
        v = {"capital": lambda: _word(rng, 2), "animal": lambda: rng.choice(ANIMALS),
             "year": lambda: str(rng.randrange(1200, 1990)), "export": lambda: rng.choice(EXPORTS)}[relation]()
        if v not in avoid and v not in out:
            out.append(v)
    return out


def make_document(rng: random.Random, n_entities: int = 2, n_outside: int = 2) -> Document:
    """``n_entities`` countries, 4 facts each (sentences shuffled); questions on every fact."""
    names: list[str] = []
    while len(names) < n_entities:
        n = _word(rng, 3)
        if n not in names:
            names.append(n)
    facts = {r: _values(rng, r, n_entities, set(names)) for r in RELATIONS}
    sentences = [RELATIONS[r][0].format(e=e, v=facts[r][i]) for r in RELATIONS for i, e in enumerate(names)]
    rng.shuffle(sentences)
    doc = Document(" ".join(sentences), names)
    for r, (_, q) in RELATIONS.items():
        outside = _values(rng, r, n_outside, set(facts[r]) | set(names))
        for i, e in enumerate(names):
            others = [v for j, v in enumerate(facts[r]) if j != i]
            doc.qa.append(QA(q.format(e=e), facts[r][i], [facts[r][i], *others, *outside], r))
    return doc


def make_documents(n: int, seed: int = 0, n_entities: int = 2, n_outside: int = 2) -> list[Document]:
    rng = random.Random(seed)
    return [make_document(rng, n_entities, n_outside) for _ in range(n)]


def split_documents(n_train: int, n_test: int, seed: int = 0, n_entities: int = 2) -> tuple[list[Document], list[Document]]:
    """Disjoint train / held-out documents (different made-up countries and fact combinations; the held-out
    documents come from another seed stream, and any whose countries occur in training are dropped)."""
    train = make_documents(n_train, seed, n_entities)
    seen = {e for d in train for e in d.entities}
    test: list[Document] = []
    rng = random.Random(seed + 10_000)
    while len(test) < n_test:
        d = make_document(rng, n_entities)
        if not seen & set(d.entities):
            test.append(d)
    return train, test
