"""Words for the benches' generated prompts and replies (bench_ingest.py, otlp_spans.py): text
of the size and alphabet a support bot's calls carry, drawn from a seeded generator."""

from __future__ import annotations

import random

PROMPT_TEXT = (
    "summarise the customer ticket below and suggest a reply that is polite short and accurate "
    "include the order number refund policy shipping delay apology next steps escalate if the "
    "customer mentions legal action or a chargeback keep the answer under one hundred words"
)
REPLY_TEXT = (
    "thanks for reaching out we are sorry your order arrived late we have issued a partial "
    "refund to your card and upgraded shipping on your next order at no cost reply here if "
    "anything else is wrong and we will make it right"
)
PROMPT_WORDS = PROMPT_TEXT.split()
REPLY_WORDS = REPLY_TEXT.split()


def text(rng: random.Random, words: list[str], chars: int) -> str:
    """`chars` characters of words drawn from `words`."""
    out: list[str] = []
    size = 0
    while size < chars:
        word = rng.choice(words)
        out.append(word)
        size += len(word) + 1
    return " ".join(out)[:chars]
