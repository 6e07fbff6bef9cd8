"""Pager: moves sessions' KV between the device pool and the host arena as the policy says.

Called by the engine on phase signals and between steps (`tick`: prefetches that are due, lazy
eviction under the low-water mark), and by the scheduler when admission needs room or a swapped
session needs its KV back. Blocks a copy still reads or writes are freed only when the swapper
reports the copy finished.
"""
import time

from djinnd.memory import policies
from djinnd.memory.prefix_cache import PrefixCache
from djinnd.session import KVPlace, Phase, Session, SessionState

RETRY_S = 0.005     # a prefetch that found no room tries again this soon
FIRST_GUESS_BYTES_PER_S = 10e9   # copy-in speed until the first swap-in is measured


class Pager:
    def __init__(self, policy: str, pool, arena, swapper, prefetch_lead_s: float, low_water: float = 0.1,
                 learned_quantile: float = 0.2, prefix_sharing: str = "user"):
        self.policy, self.pool, self.arena, self.swapper = policy, pool, arena, swapper
        self.prefix = PrefixCache(pool, prefix_sharing)
        self.prefetch_lead_s = prefetch_lead_s
        self.low_water_blocks = int(low_water * pool.num_blocks)
        self.durations = policies.ToolDurations(learned_quantile)
        self.metrics = swapper.metrics
        self.in_bytes_per_s = FIRST_GUESS_BYTES_PER_S     # measured swap-ins, smoothed
        self.sessions: dict[int, Session] = {}

    # ---- signals ----------------------------------------------------------------------------
    def on_phase(self, s: Session, phase: Phase, expected_s: float | None, tool: str | None = None):
        now = time.monotonic()
        if phase is Phase.IO_WAIT:
            self._enter_tool(s, now, expected_s, tool)
        else:
            self._leave_tool(s, now)
        s.phase = phase
        if phase is Phase.ACTIVE and policies.prefetches(self.policy):
            self.prefetch(s, "active", due=now)

    def _enter_tool(self, s: Session, now: float, expected_s: float | None, tool: str | None):
        """The KV stays put: it leaves only when its room is wanted (see make_room, tick)."""
        estimate = expected_s if expected_s is not None else self.durations.estimate(s.id, tool)
        if expected_s is None and estimate is not None:
            self.metrics.inc("tool_durations_estimated")
        s.io_wait_since, s.tool, s.hinted = now, tool, expected_s is not None
        s.expected_back = None if estimate is None else now + estimate
        s.prefetch_at = None if estimate is None else now + max(0.0, estimate - self._lead_s(s))

    def _lead_s(self, s: Session) -> float:
        """How long before the return a prefetch starts: the configured lead plus the copy itself."""
        return self.prefetch_lead_s + self.pool.blocks_for(len(s.tokens)) * self.pool.block_bytes / self.in_bytes_per_s

    def _leave_tool(self, s: Session, now: float):
        if s.io_wait_since is not None:
            self.durations.observe(s.id, s.tool, now - s.io_wait_since)
        s.io_wait_since = s.expected_back = s.prefetch_at = s.tool = None
        s.hinted = False

    def tick(self) -> float | None:
        """Background work between steps, never a wait: start the prefetches that are due and keep
        free blocks above the low-water mark. Returns seconds until the next prefetch is due."""
        if not policies.prefetches(self.policy):
            return None
        now, soonest = time.monotonic(), None
        for s in sorted((s for s in self.sessions.values() if s.prefetch_at is not None and s.kv is KVPlace.HOST
                         and s.state is SessionState.IDLE), key=lambda s: s.prefetch_at):
            if s.prefetch_at > now:
                soonest = s.prefetch_at - now
                break
            if not self.prefetch(s, "prefetch"):
                soonest = RETRY_S
                if s.hinted:        # the ones due later could only take from sessions due later still
                    break
        self._evict_lazily(now)
        return soonest

    def _evict_lazily(self, now: float):
        short = self.low_water_blocks - self.pool.num_free - self.freeing()
        if short > 0:   # sessions due back soon stay: evicting them would only double the copies
            for s in policies.lazy_victims(self.sessions.values(), short, now + 4 * self.prefetch_lead_s):
                self.evict(s, "lazy", may_drop=False)    # room nobody asked for yet is not worth a recompute

    # ---- moves -------------------------------------------------------------------------------
    def evict(self, s: Session, cause: str, may_drop: bool = True, keep: Session | None = None) -> bool:
        """Move s's device KV to the host arena; with the arena full, drop what is cheapest to lose
        (may_drop; never `keep`'s). False: the KV stays where it is."""
        if not policies.evicts_by_copy(self.policy):
            self.drop_kv(s)
            return True
        if not self.arena.can_allocate(self._host_need(s)) and not (may_drop and self._host_room(s, keep)):
            return False
        if s.kv is KVPlace.DROPPED:
            return True
        return self._swap_out(s, cause)

    def _swap_out(self, s: Session, cause: str) -> bool:
        """One copy out: s's private blocks, and its shared blocks that have no host copy yet (the
        first sharer to leave copies them once; the others only let go of them). False: the arena
        cannot take them (dropping others' host KV may have freed the host copies s counted on)."""
        k, shared = len(s.block_keys), s.block_table[:len(s.block_keys)]
        copied = self.prefix.uncopied(s)
        if not self.arena.can_allocate(len(copied) + len(s.block_table) - k):
            return False
        hosts = [start + i for start, n in self._host_runs(len(copied)) for i in range(n)]
        private, runs = s.block_table[k:], self._host_runs(len(s.block_table) - k)
        self.prefix.swapped_out(s, copied, hosts)
        held = [shared[i] for i in copied]          # the copy reads them: let go once it is done
        if held or private:
            s.transfers.append(self.swapper.swap_out(s.id, held + private, [(h, 1) for h in hosts] + runs, cause))
            s.transfers[-1].free_device = private + held    # private first: a prefetch may take those
        kept_on_device = set(range(k)) - set(copied)
        self.pool.free([shared[i] for i in sorted(kept_on_device)])
        s.block_table, s.host_runs, s.kv = [], runs, KVPlace.HOST
        return True

    def _host_runs(self, n: int) -> list:
        return self.arena.allocate(n) if n else []

    def _host_need(self, s: Session) -> int:
        """Host blocks evicting s takes: its private blocks and its shared ones not on the host yet."""
        return len(s.block_table) - len(s.block_keys) + len(self.prefix.uncopied(s))

    def _frees(self, s: Session) -> int:
        """Device blocks evicting s sets free: those no other session holds."""
        return sum(1 for b in s.block_table if self.pool.refs[b] == 1)

    def _host_room(self, s: Session, keep: Session | None) -> bool:
        """The arena cannot take s's blocks: drop, cheapest to lose first, other sessions' host KV
        until it can, or s's own device KV if that is cheaper. False: nothing could go."""
        hosted = [v for v in self.sessions.values() if policies.droppable_from_host(v) and v is not keep]
        can_drop_s = s.state is not SessionState.PAUSED     # mid-forward KV cannot be rebuilt
        short, chosen = self._host_need(s) - self.arena.num_free, []
        for v in policies.drop_order(self.policy, hosted + [s], time.monotonic()):
            if v is s and can_drop_s:
                break
            if v is not s:
                chosen.append(v)
                short -= sum(length for _, length in v.host_runs)
                if short <= 0:
                    break
        if short > 0:
            if not can_drop_s:
                return False
            chosen = [s]
        for v in chosen:
            self.drop_kv(v)
        return True

    def drop_kv(self, s: Session):
        """Third tier: forget s's KV (device and host); its next request prefills the history again."""
        self.metrics.inc("kv_drops_host" if s.kv is KVPlace.HOST else "kv_drops_device")
        self.metrics.inc("kv_dropped_tokens", s.num_cached)
        self._free_after_copies(s, s.block_table, s.host_runs)
        self.forget_keys(s)
        s.block_table, s.host_runs, s.num_cached, s.kv = [], [], 0, KVPlace.DROPPED

    def restore_size(self, s: Session) -> int:
        """Free device blocks that bringing s's KV back takes: all but the shared ones held now."""
        shared = self.prefix.swapped(s)
        return sum(n for _, n in s.host_runs) + len(shared) - self.prefix.num_held(shared)

    def restore(self, s: Session, cause: str, taken=(), after=()) -> bool:
        """Bring s's swapped KV back. Its shared blocks still on the device are taken as they are
        (pinned before anything is allocated, so no allocation reclaims them); the rest is copied
        from the host arena into `taken` (blocks of victims whose copies out, `after`, go first)
        and blocks from the pool: restore_size(s) - len(taken) of them. False: fewer are free (a
        shared block was reclaimed since the caller counted), and nothing changed."""
        shared = self.prefix.swapped(s)
        slots = self.prefix.pin(shared)
        private = sum(n for _, n in s.host_runs)
        need = max(0, slots.count(None) + private - len(taken))
        if not self.pool.can_allocate(need):
            self.pool.free([b for b in slots if b is not None])
            return False
        self.wait_fills(s, shared)
        blocks = list(taken) + self.pool.allocate(need)
        copies = self.prefix.fill(shared, slots, blocks)
        blocks = blocks[len(copies):]
        free_host = s.host_runs + [(h, 1) for h in self.prefix.unswap(s.block_keys)]
        self.copy_in(s, [(h, 1) for h, _ in copies] + s.host_runs, [d for _, d in copies] + blocks[:private],
                      cause, after, free_host)
        s.host_runs, s.kv, s.block_table = [], KVPlace.DEVICE, slots + blocks
        return True

    def copy_in(self, s: Session, runs: list, blocks: list[int], cause: str, after=(), free_host=()):
        """One copy in for s; `free_host` is freed once it is done."""
        if not blocks:
            self._free_host_later(s, list(free_host))
            return
        t = self.swapper.swap_in(s.id, runs, blocks, cause, after=list(s.transfers) + list(after))
        t.free_host = list(free_host)
        s.transfers.append(t)
        for b in blocks:
            if b in self.prefix.by_device:
                self.prefix.by_device[b].filling = t    # sharers that come meanwhile wait for it too

    def wait_fills(self, s: Session, shared: list):
        """s's forward waits for copies in flight that fill shared blocks it takes."""
        for b in shared:
            if b.filling is not None and b.filling in self.swapper.in_flight and b.filling not in s.transfers:
                s.transfers.append(b.filling)

    def prefetch(self, s: Session, cause: str, due: float | None = None) -> bool:
        """Bring s's KV back before its request comes. Room comes from free blocks no queued request
        needs, then from sessions due back later than s (or idle ones), whose blocks it takes at once:
        the copy in waits for their copies out on the device, never on the host. It evicts nobody
        while queued requests wait for room (admission order decides who gets room next), nor for a
        return the daemon only guessed (a learned duration): evicting on a guess doubles the copies
        whenever the guess is early. False: no room."""
        if s.kv is not KVPlace.HOST or s.state is not SessionState.IDLE:
            return True
        n = self.restore_size(s)
        reserved = self._reserved()
        spare = max(0, min(n, self.pool.num_free - reserved))
        due = policies.returns_at(s) if due is None else due
        may_evict = reserved <= self.pool.num_free and (cause != "prefetch" or s.hinted)
        victims = policies.prefetch_victims(self.sessions.values(), s, n - spare, due) if may_evict else []
        taken, after = self._take_blocks(victims, n - spare, s)
        if spare + len(taken) < n or not self.restore(s, cause, taken, after):
            if after:
                after[-1].free_device += taken
            else:
                self.pool.free(taken)       # blocks of dropped victims only: nothing copies them
            self.metrics.inc("prefetches_deferred")
            return False
        s.prefetched = True
        return True

    def _take_blocks(self, victims: list[Session], n: int, s: Session) -> tuple[list[int], list]:
        """Evict victims for s, keeping up to n of their device blocks; the rest are freed as usual."""
        taken, after = [], []
        for v in victims:
            held, copies = self._frees(v), len(v.transfers)
            if self.evict(v, "prefetch_room", keep=s) and v.kv is KVPlace.DROPPED:   # its blocks are free now
                taken += self.pool.allocate(min(held, n - len(taken)))
            elif v.kv is KVPlace.HOST and len(v.transfers) > copies:
                t = v.transfers[-1]
                mine = [b for b in t.free_device if self.pool.refs[b] == 1][:n - len(taken)]   # the copy's alone
                for b in mine:
                    self.prefix.detach(b)       # a shared block nobody holds: its host copy is on the way
                taken, gone = taken + mine, set(mine)
                t.free_device = [b for b in t.free_device if b not in gone]
                after.append(t)
        return taken, after

    def _reserved(self) -> int:
        """Device blocks queued requests need: a prefetch never takes them (admission order stays)."""
        return sum(max(0, self.pool.blocks_for(len(s.tokens) + s.request.params.max_new_tokens) - len(s.block_table))
                   for s in self.sessions.values() if s.state is SessionState.WAITING and s.request)

    def make_room(self, num_blocks: int, admitting: Session) -> int:
        """Evict per policy toward num_blocks free device blocks for `admitting`; returns blocks set
        free or on the way."""
        freed, evicted = 0, True
        while freed < num_blocks and evicted:   # victims sharing blocks free them only together
            evicted = False
            for s in policies.victims(self.policy, self.sessions.values(), num_blocks - freed, exclude=admitting):
                n = self._frees(s)
                if self.evict(s, "pressure"):
                    freed, evicted = freed + n, True
        return freed

    # ---- bookkeeping -------------------------------------------------------------------------
    def poll(self):
        done = self.swapper.poll()
        for t in done:
            if t.direction == "in" and t.ms:
                self.in_bytes_per_s = 0.8 * self.in_bytes_per_s + 0.2 * t.nbytes / (t.ms / 1e3)
            self.pool.free(t.free_device)
            self.arena.free(t.free_host)
        if done:    # not only its own session: sharers that waited for a fill hold it too (wait_fills)
            gone = {id(t) for t in done}
            for s in self.sessions.values():
                if s.transfers:
                    s.transfers = [t for t in s.transfers if id(t) not in gone]
        self._spill()

    def _spill(self):
        """Shared blocks whose last device holder let go while swapped-out sessions need them get
        their one host copy now (then they are cached like the rest); a full arena keeps them held
        on the device until a later poll."""
        blocks, self.prefix.spills = self.prefix.spills, []
        needed = [b for b in blocks if self.prefix.by_device[b].num_swapped and self.prefix.by_device[b].host is None]
        self.pool.free([b for b in blocks if b not in set(needed)])
        if not needed or not self.arena.can_allocate(len(needed)):
            self.prefix.spills += needed
            return
        hosts = [start + i for start, n in self.arena.allocate(len(needed)) for i in range(n)]
        for b, h in zip(needed, hosts):
            self.prefix.by_device[b].host = h
        t = self.swapper.swap_out(-1, needed, [(h, 1) for h in hosts], "spill")
        t.free_device = needed          # the cache's hold ends once the copy is done

    def freeing(self) -> int:
        """Device blocks that copies in flight will set free."""
        return sum(self.pool.refs[b] == 1 for t in self.swapper.in_flight for b in t.free_device)

    def busy(self) -> bool:
        return bool(self.swapper.in_flight)

    def before_forward(self, batch: list[Session]):
        self.swapper.wait_before_compute([t for s in batch for t in s.transfers if t.direction == "in"])

    def release(self, s: Session):
        """Session gone: free its KV now, or when the copies that touch it finish."""
        self._free_after_copies(s, s.block_table, s.host_runs)
        self.forget_keys(s)
        s.block_table, s.host_runs = [], []
        self.sessions.pop(s.id, None)
        self.durations.forget(s.id)

    def truncate(self, s: Session, keep: int):
        """Cut an idle session's history to its first `keep` tokens and free the KV blocks past them.
        The K/V of the tokens kept does not depend on later ones, so it stays valid wherever it is."""
        if keep >= len(s.tokens):
            return
        s.cut_tokens(keep)
        s.num_cached = min(s.num_cached, keep)
        gone = self.prefix.cut(s)          # keeps the one it ends inside: copied before it is written
        n = self.pool.blocks_for(s.num_cached)
        if s.kv is KVPlace.HOST:
            s.host_runs, spare = split_runs(s.host_runs, n - len(s.block_keys))
            self._free_after_copies(s, [], spare)
            self._free_host_later(s, [(h, 1) for h in self.prefix.unswap(gone)])
            if not s.host_runs and not s.block_keys:
                s.kv = KVPlace.DEVICE      # nothing left to bring back
        else:
            spare, s.block_table = s.block_table[n:], s.block_table[:n]
            self._free_after_copies(s, spare, [])

    def forget_keys(self, s: Session):
        """s lets go of its shared blocks: a swapped session's claims on their host copies too."""
        if s.kv is KVPlace.HOST:
            self._free_host_later(s, [(h, 1) for h in self.prefix.unswap(s.block_keys)])
        s.block_keys = []

    def _free_host_later(self, s: Session, runs: list):
        """Host copies of shared blocks: any session's copy in may still read them, so they are
        freed after the last copy in flight (copies in run in order on one stream) and s's own."""
        copies_in = [t for t in self.swapper.in_flight if t.direction == "in"]
        if runs and copies_in and not (s.transfers and s.transfers[-1] is copies_in[-1]):
            copies_in[-1].free_host += runs
        else:
            self._free_after_copies(s, [], runs)

    def _free_after_copies(self, s: Session, blocks: list[int], runs: list):
        if s.transfers:     # a copy may still read or write them
            s.transfers[-1].free_device += blocks
            s.transfers[-1].free_host += runs
        else:
            self.pool.free(blocks)
            self.arena.free(runs)


def split_runs(runs: list, n: int) -> tuple[list, list]:
    """Host runs -> (runs of their first n blocks, runs of the rest)."""
    head, tail = [], []
    for start, length in runs:
        take = max(0, min(length, n))
        if take:
            head.append((start, take))
        if length > take:
            tail.append((start + take, length - take))
        n -= take
    return head, tail
