"""PrefixCache: full KV blocks known by their content, so sessions whose prompts start alike share them.

A block's key hashes its parent's key and its own tokens, from a root that names who may share
(one uid, one gid, or everyone), so equal keys mean equal tokens from position 0 within one scope,
and a session never maps another scope's KV. A known block lives on the device (reference-counted
by the pool; cached when nobody holds it) and/or as one host-arena block, kept while a swapped-out
session needs it back. Only full blocks whose K/V are all written become known, so nothing ever
writes into one: new tokens go to the session's own tail blocks; a prompt that diverges inside a
block feeds that block in a fresh one, and a session that cuts its history inside a known block
gets a copy of it before it writes (copy-on-write).
"""
import hashlib
from array import array
from dataclasses import dataclass

from djinnd.session import KVPlace, Session

SCOPES = ("user", "group", "all", "off")


def root_key(scope: str, uid: int, gid: int) -> bytes | None:
    """The key a session's chain starts from; None: it shares nothing."""
    if scope == "off":
        return None
    who = {"user": f"uid:{uid}", "group": f"gid:{gid}", "all": "all"}[scope]
    return hashlib.blake2b(who.encode(), digest_size=16).digest()


def block_key(parent: bytes, tokens) -> bytes:
    """128-bit keys: a collision would hand one prompt another's KV, so no 64-bit hash()."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


@dataclass
class KnownBlock:
    key: bytes
    device: int | None = None     # the pool block holding it
    host: int | None = None       # the host-arena block holding a copy
    num_swapped: int = 0          # swapped-out sessions that need it back
    filling: object = None        # the copy in that last filled its device block (sharers wait for it)


class PrefixCache:
    def __init__(self, pool, scope: str):
        self.pool, self.scope, self.block_size = pool, scope, pool.block_size
        self.known: dict[bytes, KnownBlock] = {}
        self.by_device: dict[int, KnownBlock] = {}
        self.num_query_tokens = 0     # prompt tokens looked up at admission
        self.num_hit_tokens = 0       # of those, found in known blocks
        self.spills: list[int] = []   # device blocks it holds until the pager copies them to the host
        pool.on_reclaim, pool.keeps = self._reclaimed, self._keeps

    # ---- lookups ------------------------------------------------------------------------------
    def _key(self, s: Session, i: int) -> bytes:
        """Key of s's i-th full block of tokens. Hashed once per session and block: a prompt waiting
        for room is looked up every step, and its tokens only grow between cuts (Session.cut_tokens)."""
        keys, bs = s.token_keys, self.block_size
        while len(keys) <= i:
            n = len(keys)
            keys.append(((n + 1) * bs, block_key(keys[-1][1] if keys else s.prefix_root, s.tokens[n * bs:(n + 1) * bs])))
        return keys[i][1]

    def lookup(self, s: Session) -> list[KnownBlock]:
        """Known blocks that continue s's history: its next full blocks of tokens to feed, all but
        the last token (its logits are the request's first token). Only from a block boundary."""
        bs, start = self.block_size, len(s.block_keys)
        if s.prefix_root is None or s.num_cached != start * bs or len(s.block_table) != start:
            return []
        found = []
        for i in range(start, (len(s.tokens) - 1) // bs):
            block = self.known.get(self._key(s, i))
            if block is None:
                break
            found.append(block)
        return found

    def num_held(self, blocks: list[KnownBlock]) -> int:
        """Of these, the ones a session holds on the device now: sharing them takes no room."""
        return sum(1 for b in blocks if b.device is not None and self.pool.refs[b.device] > 0)

    def swapped(self, s: Session) -> list[KnownBlock]:
        return [self.known[k] for k in s.block_keys]

    # ---- taking blocks -------------------------------------------------------------------------
    def pin(self, blocks: list[KnownBlock]) -> list[int | None]:
        """A reference on each one on the device (before an allocation could reclaim it); None for
        those only on the host."""
        for b in blocks:
            if b.device is not None:
                self.pool.share(b.device)
        return [b.device for b in blocks]

    def fill(self, blocks: list[KnownBlock], slots: list[int | None], new: list[int]) -> list[tuple[int, int]]:
        """Place the ones only on the host in the device blocks `new`: (host, device) copies to make."""
        copies, new = [], iter(new)
        for i, b in enumerate(blocks):
            if slots[i] is None:
                slots[i] = next(new)
                self._place(b, slots[i])
                copies.append((b.host, slots[i]))
        return copies

    def _place(self, b: KnownBlock, block: int):
        b.device = block
        self.by_device[block] = b
        self.pool.known.add(block)

    def may_detach(self, block: int) -> bool:
        """It can leave the cache without losing KV a swapped-out session needs."""
        b = self.by_device.get(block)
        return b is None or b.num_swapped == 0 or b.host is not None

    def detach(self, block: int):
        """A block leaves the cache at once rather than when reclaimed (a prefetch takes it)."""
        if block in self.by_device:
            self.pool.known.discard(block)
            self._reclaimed(block)

    def _keeps(self, block: int) -> bool:
        """The last holder let go of a block that swapped-out sessions need and that has no host
        copy: the cache holds it until the pager has copied it (see spills)."""
        b = self.by_device[block]
        if b.num_swapped and b.host is None:
            self.spills.append(block)
            return True
        return False

    def _reclaimed(self, block: int):
        b = self.by_device.pop(block)
        b.device = None
        if b.host is None:
            del self.known[b.key]

    # ---- learning blocks -----------------------------------------------------------------------
    def register(self, s: Session, may_move: bool):
        """Make s's full, written blocks known. A block whose content another block already holds
        (two sessions fed the same prefix at once) is swapped for that one when `may_move` (s is
        out of the batch, nothing copies into its blocks); otherwise registering stops there."""
        if s.prefix_root is None or s.kv is not KVPlace.DEVICE:
            return
        for i in range(len(s.block_keys), min(s.num_cached // self.block_size, len(s.block_table))):
            key = self._key(s, i)
            b = self.known.setdefault(key, KnownBlock(key))
            own = s.block_table[i]
            if b.device is None:
                self._place(b, own)
            elif b.device != own:
                if not may_move:
                    return
                self.pool.share(b.device)
                self.pool.free([own])
                s.block_table[i] = b.device
            s.block_keys.append(key)

    def cut(self, s: Session) -> list[bytes]:
        """s's history was cut to num_cached tokens: it lets go of the known blocks past them and
        keeps the one they end inside (copied before s writes into it). Returns the keys let go."""
        keep = -(-s.num_cached // self.block_size)
        gone = s.block_keys[keep:]
        del s.block_keys[keep:]
        return gone

    # ---- paging --------------------------------------------------------------------------------
    def uncopied(self, s: Session) -> list[int]:
        """Positions of s's known blocks that only s holds and that have no host copy: evicting s
        copies those; the others stay on the device with the sessions that hold them."""
        return [i for i, b in enumerate(self.swapped(s)) if b.host is None and self.pool.refs[b.device] == 1]

    def swapped_out(self, s: Session, copied: list[int], host_blocks: list[int]):
        """s's KV left the device; its known blocks at positions `copied` are copied to host_blocks."""
        for i, h in zip(copied, host_blocks):
            self.known[s.block_keys[i]].host = h
        for b in self.swapped(s):
            b.num_swapped += 1

    def unswap(self, keys: list[bytes]) -> list[int]:
        """A swapped-out session no longer needs these; returns host blocks nobody needs now."""
        freed = []
        for k in keys:
            b = self.known[k]
            b.num_swapped -= 1
            if b.num_swapped == 0 and b.host is not None:
                freed.append(b.host)
                b.host = None
                if b.device is None:
                    del self.known[k]
        return freed

    def check_integrity(self):
        """Each known block is where its entry says; a swapped session's blocks have a host copy."""
        assert set(self.by_device) == self.pool.known, "the pool and the cache disagree on known blocks"
        for b in self.known.values():
            assert b.device is not None or b.host is not None, "an entry holds no KV"
            assert b.device is None or self.by_device[b.device] is b, "an entry's device block maps elsewhere"
            assert b.num_swapped == 0 or b.host is not None or (b.device is not None and self.pool.refs[b.device]), \
                "a block a swapped session needs is neither on the host nor held on the device"

    # ---- reporting -----------------------------------------------------------------------------
    def status(self) -> dict:
        return {"prefix_sharing": self.scope, "known_blocks": len(self.known),
                "known_on_host": sum(1 for b in self.known.values() if b.host is not None),
                "hit_tokens": self.num_hit_tokens, "query_tokens": self.num_query_tokens,
                "hit_rate": self.num_hit_tokens / self.num_query_tokens if self.num_query_tokens else 0.0}
