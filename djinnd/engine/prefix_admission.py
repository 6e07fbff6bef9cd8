"""The prefix cache at admission and at the end of a request (the scheduler's side of shared KV):
a prompt takes the known blocks it starts with, a session that cut its history inside a known
block writes into a copy, and a finished request's full blocks become known. Moves between the
device and the host stay in the pager."""
from djinnd.session import KVPlace, Session


def shared_held(pager, s: Session) -> int:
    """Blocks admitting s shares with sessions holding them now: they take no room."""
    return pager.prefix.num_held(pager.prefix.swapped(s) if s.kv is KVPlace.HOST else pager.prefix.lookup(s))


def attach_prefix(pager, s: Session):
    """Admission of a request with uncached history: it takes every known block of its prompt
    (held ones shared, cached ones revived, ones only on the host copied back) and feeds only
    the rest."""
    if s.prefix_root is None:
        return
    pager.prefix.num_query_tokens += s.num_new_tokens
    found = take_known(pager, s, "prefix")
    s.request.num_cached = s.num_cached
    pager.prefix.num_hit_tokens += found * pager.pool.block_size


def take_known(pager, s: Session, cause: str) -> int:
    """s takes the known blocks its uncached history starts with (see attach_prefix); returns how many."""
    found = pager.prefix.lookup(s)
    slots = pager.prefix.pin(found)
    pager.wait_fills(s, found)
    copies = pager.prefix.fill(found, slots, pager.pool.allocate(slots.count(None)))
    pager.copy_in(s, [(h, 1) for h, _ in copies], [d for _, d in copies], cause)
    s.block_table += slots
    s.block_keys += [b.key for b in found]
    s.num_cached += len(found) * pager.pool.block_size
    return len(found)


def settle(pager, s: Session):
    """A request ended: s lets go of known blocks past its history (a cancelled request cut it),
    and its full blocks become known, duplicates merged."""
    pager.prefix.cut(s)
    pager.prefix.register(s, may_move=not s.transfers)


def copy_on_write(pager, s: Session):
    """Admission: s writes from num_cached on. Known blocks from there (its history was cut
    inside one) become its own: taken out of the cache when nobody else holds them, else
    replaced by fresh blocks (counted by blocks_needed), the one the history ends inside copied."""
    first = s.num_cached // pager.pool.block_size
    for i in range(first, len(s.block_keys)):
        block = s.block_table[i]
        if pager.pool.refs[block] == 1 and pager.prefix.may_detach(block):
            pager.prefix.detach(block)
            continue
        s.block_table[i] = pager.pool.allocate(1)[0]
        if i * pager.pool.block_size < s.num_cached:
            pager.swapper.wait_before_compute([t for t in s.transfers if t.direction == "in"])
            pager.pool.copy_block(block, s.block_table[i])
        pager.pool.free([block])
    del s.block_keys[first:]
