"""StepBudget: how many prompt tokens a step may feed while sessions are decoding, so that the step,
and with it every decoding session's time per output token, stays near max_step_ms while long
prompts arrive (stall-free batching). Learned from the engine's own timings: a step that feeds n
prompt tokens beside the decoding rows takes about base_s + n * token_s, a line fitted by
recency-weighted least squares over the last steps (base_s holds the decoding rows and the step's
fixed cost: a mixed step runs eagerly where a decode step replays a CUDA graph). A time per token
alone, time / n, overstates small chunks when that fixed cost is large and reaches the chunk that
fills the step only slowly, steps over budget on the way. A line needs chunks of different sizes:
when the recent ones are alike and the last step was under budget, the next tries GROWTH times
more; no chunk goes past GROWTH times the largest measured, nor past the last one when that step
ran over budget (the line is wrong there, e.g. still fitted to steps from before a change in
cost). A step feeds at least min_tokens, so prompts always progress."""
from collections import deque

WINDOW = 32        # recent steps the line is fitted to
DECAY = 0.9        # a step's weight in the fit, per step of age
GROWTH = 1.25      # how far past the measured chunks a step goes
SPREAD = 0.05      # chunk sizes' spread (std / mean) needed to tell the slope from the fixed cost
FLOOR = 0.5        # the least slope, as a share of a prefill's own time per token (the same FLOPs)


class StepBudget:
    def __init__(self, max_step_ms: float, min_tokens: int = 32, smoothing: float = 0.3):
        self.max_step_s = max_step_ms / 1e3          # 0: no budget, max_tokens every step
        self.min_tokens = min_tokens
        self.smoothing = smoothing
        self.decode_s: float | None = None          # seconds of a decode step
        self.token_s: float | None = None           # seconds per prompt token of a prefill on its own
        self.steps: deque[tuple[int, float]] = deque(maxlen=WINDOW)   # (prompt tokens, seconds) beside decoding
        self.line: tuple[float, float] | None = None    # (base_s, seconds per token) fitted to self.steps

    def observe_prefill(self, num_tokens: int, seconds: float):
        """A prefill forward with no decoding rows in it."""
        if num_tokens > 0:
            self.token_s = self._mix(self.token_s, seconds / num_tokens)

    def observe_decode(self, seconds: float):
        self.decode_s = self._mix(self.decode_s, seconds)

    def observe_step(self, num_tokens: int, seconds: float):
        """A whole step that fed num_tokens prompt tokens beside decoding rows (one mixed forward, or
        a prefill forward and a decode forward): what the decoding sessions waited for."""
        if num_tokens > 0:
            self.steps.append((num_tokens, seconds))
            self.line = self._fit()

    def tokens(self, decoding: bool, max_tokens: int) -> int:
        """Prompt tokens this step may feed: all max_tokens when nobody decodes (nobody waits on the
        step) or nothing is measured yet; else what fits in max_step_ms beside the decode."""
        if not decoding or self.max_step_s <= 0:
            return max_tokens
        base_s, per_token_s = self.line or self._per_token()
        if per_token_s is None:
            return max_tokens
        n = (self.max_step_s - base_s) / per_token_s if per_token_s > 0 else float("inf")
        if self.steps:
            last_n, last_s = self.steps[-1]
            if self.line is None and last_s < self.max_step_s:
                n = max(n, GROWTH * last_n)     # alike chunks: a larger one shows the slope
            n = min(n, GROWTH * max(k for k, _ in self.steps), last_n if last_s > self.max_step_s else n)
        return min(max_tokens, max(self.min_tokens, round(n)))

    def _per_token(self) -> tuple[float, float | None]:
        """Without a line: the decode step, and the rest of the recent steps' time spread over their
        tokens (until a step beside decoding rows is timed, a prefill's own time per token)."""
        if not self.steps:
            return (self.decode_s, self.token_s) if self.decode_s is not None else (0.0, None)
        base_s, w = self.decode_s or 0.0, self._weights()
        rest = sum(wi * (s - base_s) for wi, (_, s) in zip(w, self.steps))
        return base_s, max(0.0, rest) / sum(wi * n for wi, (n, _) in zip(w, self.steps))

    def _fit(self) -> tuple[float, float] | None:
        """Weighted least squares of seconds on tokens; None when the chunks are too alike. A negative
        base is taken as a line through 0."""
        w, steps = self._weights(), self.steps
        total = sum(w)
        mean_n = sum(wi * n for wi, (n, _) in zip(w, steps)) / total
        mean_s = sum(wi * s for wi, (_, s) in zip(w, steps)) / total
        var_n = sum(wi * (n - mean_n) ** 2 for wi, (n, _) in zip(w, steps)) / total
        if len(steps) < 2 or var_n < (SPREAD * mean_n) ** 2:
            return None
        slope = sum(wi * (n - mean_n) * (s - mean_s) for wi, (n, s) in zip(w, steps)) / total / var_n
        slope = max(slope, FLOOR * (self.token_s or 0.0))   # noise on a narrow spread can flatten it
        if mean_s - slope * mean_n < 0:
            squares = sum(wi * n * n for wi, (n, _) in zip(w, steps))
            return 0.0, sum(wi * n * s for wi, (n, s) in zip(w, steps)) / squares
        return mean_s - slope * mean_n, slope

    def _weights(self) -> list[float]:
        return [DECAY ** age for age in range(len(self.steps) - 1, -1, -1)]

    def _mix(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.smoothing * (new - old)

    def status(self) -> dict:
        ms = lambda s: None if s is None else round(s * 1e3, 3)   # noqa: E731
        base_s, per_token_s = self.line or (None, None)
        return {"max_step_ms": self.max_step_s * 1e3, "decode_step_ms": ms(self.decode_s),
                "prompt_token_ms": ms(self.token_s), "step_base_ms": ms(base_s), "step_token_ms": ms(per_token_s),
                "recent_steps": [[n, ms(s)] for n, s in list(self.steps)[-8:]]}   # (prompt tokens, ms)
