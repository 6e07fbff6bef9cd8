"""StepBudget: how many prompt tokens a step may feed while sessions are decoding, so that the step,
and with it every decoding session's time per output token, stays near max_step_ms while long
prompts arrive (stall-free batching). Learned from the engine's own timings of the GPU's work: a
step that feeds chunks of n_i prompt tokens, each after p_i tokens of its prompt already cached,
beside the decoding rows takes about

    base_s + token_s * sum(n_i) + pair_s * sum(n_i * (p_i + n_i / 2))

(base_s: the decoding rows and the step's fixed cost; token_s: the linear layers per token; pair_s:
attention, per (query, key) pair over the chunk's prefix and itself, so a chunk late in a long
prompt costs more than one at its start), fitted by recency-weighted least squares with no term
below zero over the last steps. A fit needs chunks of different sizes to tell base_s from token_s:
while the recent ones are alike, base_s is a decode step's time, and the next chunk tries up to
GROWTH times more when the last step was under budget (no more than would fit if time grew in
proportion to tokens); while their prefixes are alike, pair_s is 0. No chunk goes past GROWTH
times the largest measured, nor past the last one when that step ran over budget (the fit is
wrong there, e.g. still fitted to steps from before a change in cost). Each prompt fed in a step
takes what fits at its own prefix. A step feeds at least min_tokens, so prompts always progress.

With mixed steps replayed from CUDA graphs, a step costs its chunk bucket (`sizes`) whatever it
feeds: a budget of 439 tokens would pay for 512 and feed 439. There a step feeds the largest bucket
within its budget, and growing goes to the next bucket rather than GROWTH times the last."""
import itertools
import math
from collections import deque

import numpy as np

WINDOW = 32        # recent steps the cost is fitted to
DECAY = 0.9        # a step's weight in the fit, per step of age
GROWTH = 1.25      # how far past the measured chunks a step goes
SPREAD = 0.05      # chunk sizes' spread (std / mean) needed to tell the fixed cost from the per-token one
FLOOR = 0.5        # the least time per token, as a share of the least a prefill on its own took (the same FLOPs)
RCOND = 1e-3       # terms this close to collinear over the recent steps are not told apart


class StepBudget:
    def __init__(self, max_step_ms: float, sizes: list[int] | None = None, min_tokens: int = 32,
                 smoothing: float = 0.3):
        self.max_step_s = max_step_ms / 1e3          # 0: no budget, max_tokens every step
        self.sizes = sizes                          # the mixed graphs' chunk buckets (None: any size)
        self.min_tokens = min_tokens
        self.smoothing = smoothing
        self.decode_s: float | None = None          # seconds of a decode step
        self.token_s: float | None = None           # seconds per prompt token of a prefill on its own
        self.least_token_s = 0.0                    # the least of those: a small prompt's is mostly fixed cost
        self.steps: deque[tuple[int, float, float]] = deque(maxlen=WINDOW)  # (tokens, pairs, seconds) beside decoding
        self.cost: tuple[float, float, float] | None = None   # (base_s, token_s, pair_s) fitted to self.steps
        self.alike = True                           # the recent chunks' sizes do not tell base_s from token_s

    def observe_prefill(self, num_tokens: int, seconds: float):
        """A prefill forward with no decoding rows in it."""
        if num_tokens > 0:
            self.token_s = self._mix(self.token_s, seconds / num_tokens)
            self.least_token_s = min(self.least_token_s or math.inf, seconds / num_tokens)

    def observe_decode(self, seconds: float):
        self.decode_s = self._mix(self.decode_s, seconds)

    def observe_step(self, chunks: list[tuple[int, int]], seconds: float):
        """A whole step that fed chunks of (prefix, n) prompt tokens (n tokens after prefix cached ones)
        beside decoding rows (one mixed forward, or a prefill and a decode): what decoding sessions waited for."""
        n = sum(k for _, k in chunks)
        if n > 0:
            self.steps.append((n, sum(_pairs(p, k) for p, k in chunks), seconds))
            self.cost = self._fit()

    def tokens(self, decoding: bool, max_tokens: int, prompts: list[tuple[int, int]] | None = None) -> int:
        """Prompt tokens this step may feed: all max_tokens when nobody decodes (nobody waits on the
        step) or nothing is measured yet; else what fits in max_step_ms beside the decode, fed to
        `prompts`, (prefix, tokens left) in the order the step feeds them (by default one prompt at 0)."""
        if not decoding or self.max_step_s <= 0:
            return max_tokens
        cost = self.cost or self._first_guess()
        if cost is None:
            return max_tokens
        n = min(max_tokens, self._fill(cost, prompts if prompts is not None else [(0, max_tokens)]))
        if self.steps:
            last_n, _, last_s = self.steps[-1]
            if self.alike and last_s < self.max_step_s:     # a larger chunk tells base_s from token_s
                n = max(n, min(self._larger(last_n), self.max_step_s / max(last_s, 1e-9) * last_n))
            n = min(n, self._larger(max(k for k, _, _ in self.steps)), last_n if last_s > self.max_step_s else n)
        return self._whole_bucket(min(max_tokens, max(self.min_tokens, round(n))), max_tokens)

    def _larger(self, n: int) -> float:
        """The most a step may try past n measured tokens."""
        return next((k for k in self.sizes if k > n), GROWTH * n) if self.sizes else GROWTH * n

    def _whole_bucket(self, n: int, max_tokens: int) -> int:
        """The largest bucket within n (the smallest when n is below it: it costs the same as less)."""
        if not self.sizes or n >= max_tokens:
            return n
        return max([k for k in self.sizes if k <= n], default=self.sizes[0])

    def _fill(self, cost: tuple[float, float, float], prompts: list[tuple[int, int]]) -> float:
        """Tokens that fit in the time left after base_s: each prompt in turn takes what fits at its prefix."""
        base_s, token_s, pair_s = cost
        left, n = self.max_step_s - base_s, 0
        for prefix, remaining in prompts:
            per_token = max(token_s + pair_s * prefix, FLOOR * self.least_token_s)   # its chunk's first token
            fits = _largest_chunk(left, per_token, pair_s)
            if fits < remaining:
                return n + fits
            n, left = n + remaining, left - remaining * (per_token + pair_s * remaining / 2)
        return n

    def _first_guess(self) -> tuple[float, float, float] | None:
        """Before any step beside decoding rows: a decode step, then twice a prefill's own time per
        token. Its fixed cost is not known yet, and one step over budget is every decoding session's
        worst time per token; a step under budget costs prefill a little and shows the cost."""
        return None if self.decode_s is None or self.token_s is None else (self.decode_s, 2 * self.token_s, 0.0)

    def _fit(self) -> tuple[float, float, float]:
        """(base_s, token_s, pair_s) over self.steps. While the chunks are alike, base_s is a decode
        step's; while their prefixes are alike (short prompts only), pair_s is 0: the curvature of
        n^2 / 2 alone is too weak to tell attention from noise or from a change in cost."""
        n, pairs, s = (np.array(c, dtype=float) for c in zip(*self.steps))
        w = DECAY ** np.arange(len(n) - 1, -1, -1.0)
        self.alike = len(n) < 2 or not _spread(n, w, np.average(n, weights=w))
        prefixes_vary = _spread(pairs / n - n / 2, w, np.average(n, weights=w))
        base_s = (self.decode_s or 0.0) if self.alike else 0.0
        base, token_s, pair_s = _nonnegative_fit([None if self.alike else np.ones_like(n), n,
                                                  pairs if prefixes_vary else None], s - base_s, w)
        return base_s + base, token_s, pair_s

    def _mix(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.smoothing * (new - old)

    def status(self) -> dict:
        ms = lambda s: None if s is None else round(s * 1e3, 3)   # noqa: E731
        base_s, per_token_s, pair_s = self.cost or (None, None, None)
        return {"max_step_ms": self.max_step_s * 1e3, "decode_step_ms": ms(self.decode_s),
                "prompt_token_ms": ms(self.token_s), "step_base_ms": ms(base_s), "step_token_ms": ms(per_token_s),
                "step_pair_ns": None if pair_s is None else round(pair_s * 1e9, 4),   # per (query, key) pair
                "recent_steps": [[n, round(pairs / n - n / 2), ms(s)]            # (prompt tokens, prefix, ms)
                                 for n, pairs, s in list(self.steps)[-8:]]}


def _pairs(prefix: int, n: int) -> float:
    """(query, key) pairs of attention of n prompt tokens after prefix cached ones (causal: n^2/2 among them)."""
    return n * (prefix + n / 2)


def _largest_chunk(seconds: float, per_token: float, pair_s: float) -> float:
    """The largest k with per_token * k + pair_s * k^2 / 2 <= seconds (the root written so pair_s may be 0)."""
    if seconds <= 0:
        return 0.0
    root = per_token + math.sqrt(per_token ** 2 + 2 * pair_s * seconds)
    return 2 * seconds / root if root > 0 else math.inf


def _spread(x, w, scale: float) -> bool:
    """x varies (weighted std) by at least SPREAD times scale."""
    return np.average((x - np.average(x, weights=w)) ** 2, weights=w) >= (SPREAD * scale) ** 2


def _nonnegative_fit(columns: list, y, w) -> list[float]:
    """Weighted least squares of y on the columns (None: left out, coefficient 0) with no coefficient
    below zero: the best fit over the subsets of the columns whose own fit has none (exact for three
    columns). A subset whose columns are near collinear is skipped: noise would split the time
    between them at random."""
    best, best_err = [0.0] * len(columns), math.inf
    root_w, present = np.sqrt(w), [i for i, c in enumerate(columns) if c is not None]
    for size in range(len(present), 0, -1):
        for subset in itertools.combinations(present, size):
            x = np.stack([columns[i] for i in subset], axis=1) * root_w[:, None]
            scale = np.linalg.norm(x, axis=0)
            coef, _, rank, _ = np.linalg.lstsq(x / scale, y * root_w, rcond=RCOND)
            coef = coef / scale
            err = float(np.sum((x @ coef - y * root_w) ** 2))
            if rank == size and (coef >= 0).all() and err < best_err * (1 - 1e-9):
                best, best_err = [0.0] * len(columns), err
                for i, c in zip(subset, coef):
                    best[i] = float(c)
        if best_err < math.inf and size == len(present):
            break           # the fit of all columns has none below zero: no subset fits better
    return best
