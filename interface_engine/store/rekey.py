"""Sealing stored contents again with the active data key: the work behind `keys rotate`.

Rows are taken in id order in short transactions, and a value is replaced only if
it is still the one that was read, so the engine can go on writing meanwhile. The
rows are the progress: after a crash the next run finds what is left by itself.
Values stored in clear (before the store was encrypted) are sealed the same way.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import sqlalchemy as sa
from sqlalchemy import func, or_, select, update

from .schema import attempts, deliveries, messages
from .store import Store, StoreError, write_transaction

#: Every sealed content: (table, column, the column naming its key).
PLACES = ((messages, "raw", "raw_key"), (deliveries, "output", "output_key"),
          (deliveries, "response", "response_key"), (attempts, "response", "response_key"))
#: What a key id of None counts under in `usage`: values stored in clear.
CLEAR = "(in clear)"


@dataclass
class Tally:
    resealed: int = 0
    #: values that could not be opened, first few as "place of row id: why"
    unreadable: list[str] = field(default_factory=list)
    unreadable_count: int = 0


def usage(store: Store) -> Counter:
    """How many stored values each data key seals (CLEAR: values in clear)."""
    counts: Counter = Counter()
    with store._connect() as conn:
        for table, column, key_column in PLACES:
            key = table.c[key_column]
            rows = conn.execute(select(key, func.count()).where(_content(table, column))
                                .group_by(key))
            for key_id, n in rows:
                counts[key_id if key_id is not None else CLEAR] += n
    return counts


def reseal(store: Store, *, batch: int = 500,
           progress: Callable[[str, int], None] | None = None) -> Tally:
    """One pass over every sealed content: what is not under the active key is sealed under it."""
    tally = Tally()
    for table, column, key_column in PLACES:
        place, after = f"{table.name}.{column}", 0
        key, value = table.c[key_column], table.c[column]
        compare_and_set = (update(table).where(table.c.id == sa.bindparam("rid"),
                                               value == sa.bindparam("old"),
                                               key.is_not_distinct_from(sa.bindparam("old_key")))
                           .values({column: sa.bindparam("new"), key_column: sa.bindparam("new_key")}))
        while True:
            active = store.cipher.active
            with store._connect() as conn, write_transaction(conn):
                rows = conn.execute(select(table.c.id, value, key)
                                    .where(table.c.id > after, _content(table, column),
                                           or_(key.is_(None), key != active))
                                    .order_by(table.c.id).limit(batch)).all()
                if not rows:
                    break
                changes = []
                for row_id, old, old_key in rows:
                    try:
                        plain = store.open(old, old_key, place, row_id)
                    except StoreError as e:
                        tally.unreadable_count += 1
                        if len(tally.unreadable) < 5:
                            tally.unreadable.append(str(e))
                        continue
                    new, new_key = store.seal(plain, place, row_id)
                    changes.append({"rid": row_id, "old": old, "old_key": old_key, "new": new,
                                    "new_key": new_key})
                if changes:
                    conn.execute(compare_and_set, changes)
            after = rows[-1][0]
            tally.resealed += len(changes)
            if progress:
                progress(place, len(changes))
    return tally


def _content(table: sa.Table, column: str):
    """A value to seal: present and not emptied by retention."""
    value = table.c[column]
    return sa.and_(value.is_not(None), func.length(value) > 0)
