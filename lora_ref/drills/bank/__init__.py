"""The static question bank: every item, checked on import.

Items are Python data (one module per theme) so that a typo is an import error and the bank ships with
the package without package-data configuration. Generated questions live in ``..generators``.
"""
from __future__ import annotations

from ..items import TOPICS, Item, validate_item
from . import bugs, lora_math, peft_family, practice, qlora, variants

ITEMS: tuple[Item, ...] = tuple(lora_math.ITEMS + qlora.ITEMS + peft_family.ITEMS + practice.ITEMS + bugs.ITEMS
                                + variants.ITEMS)


def _index(items: tuple[Item, ...]) -> dict[str, Item]:
    index: dict[str, Item] = {}
    for item in items:
        validate_item(item)
        if item.id in index:
            raise ValueError(f"duplicate bank item id {item.id!r}")
        index[item.id] = item
    return index


BY_ID = _index(ITEMS)


def get_item(item_id: str) -> Item:
    """The bank item with this id; KeyError lists close ids when it does not exist."""
    try:
        return BY_ID[item_id]
    except KeyError:
        near = [i for i in BY_ID if item_id.split(".")[0] in i][:8]
        raise KeyError(f"no bank item {item_id!r}" + (f"; similar: {near}" if near else "")) from None


def items(topic: str | None = None, kind: str | None = None) -> list[Item]:
    """Bank items, optionally filtered by topic and kind (both validated)."""
    if topic is not None and topic not in TOPICS:
        raise ValueError(f"unknown topic {topic!r}; expected one of {sorted(TOPICS)}")
    return [i for i in ITEMS if (topic is None or i.topic == topic) and (kind is None or i.kind == kind)]
