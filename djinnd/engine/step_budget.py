"""StepBudget: how many prompt tokens a step may feed while sessions are decoding, so that the step,
and with it every decoding session's time per output token, stays near max_step_ms while long
prompts arrive (stall-free batching). Learned from the engine's own timings, smoothed: the time of
a decode step and the time per prompt token of a prefill (which follows the attention cost as a
prompt's prefix grows). A step feeds at least min_tokens, so prompts always progress."""


class StepBudget:
    def __init__(self, max_step_ms: float, min_tokens: int = 32, smoothing: float = 0.3):
        self.max_step_s = max_step_ms / 1e3          # 0: no budget, max_tokens every step
        self.min_tokens = min_tokens
        self.smoothing = smoothing
        self.decode_s: float | None = None          # seconds of a decode step
        self.token_s: float | None = None           # seconds per prompt token of a prefill

    def observe_prefill(self, num_tokens: int, seconds: float):
        if num_tokens > 0:
            self.token_s = self._mix(self.token_s, seconds / num_tokens)

    def observe_decode(self, seconds: float):
        self.decode_s = self._mix(self.decode_s, seconds)

    def tokens(self, decoding: bool, max_tokens: int) -> int:
        """Prompt tokens this step may feed: all max_tokens when nobody decodes (nobody waits on the
        step) or nothing is measured yet; else what fits in max_step_ms beside the decode."""
        if not decoding or self.max_step_s <= 0 or self.token_s is None or self.decode_s is None:
            return max_tokens
        room = (self.max_step_s - self.decode_s) / self.token_s
        return min(max_tokens, max(self.min_tokens, round(room)))

    def _mix(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.smoothing * (new - old)

    def status(self) -> dict:
        ms = lambda s: None if s is None else round(s * 1e3, 3)   # noqa: E731
        return {"max_step_ms": self.max_step_s * 1e3, "decode_step_ms": ms(self.decode_s),
                "prompt_token_ms": ms(self.token_s)}
