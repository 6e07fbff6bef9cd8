"""Ghost forwards: logits of whole token sequences outside any session, for an agent's GhostModel
(HF-style code whose work runs here). The forward borrows KV blocks from the pool and gives them
back before the next command; the logits go to a segment per connection, replaced by its next
forward and freed when the connection closes.
"""
import torch

from djinnd.engine.commands import EngineError
from djinnd.memory.activations import ActivationSegment, QuotaExceeded, SegmentQuota, SegmentTable
from djinnd.session import Session
from libdjinn.protocol import ErrorCode


class GhostForwards:
    def __init__(self, runner, pool, max_model_len: int, max_tokens: int, quota: SegmentQuota | None = None):
        self.runner, self.pool, self.max_model_len, self.max_tokens = runner, pool, max_model_len, max_tokens
        self.quota = quota
        self.segments = SegmentTable()      # connection id -> its last forward's logits

    def run(self, owner: int, rows: list[list[int]]) -> dict:
        """rows [B][T] token ids -> descriptor of float32 logits [B, T, vocab] in shared memory."""
        self._check(rows)
        self.release(owner)                    # replaced: its bytes no longer count
        if self.quota:
            try:
                self.quota.require(owner, len(rows) * len(rows[0]) * self.runner.model.args.vocab_size * 4)
            except QuotaExceeded as e:
                raise EngineError(ErrorCode.LIMIT, f"forward: {e}") from None
        tables = [self.pool.allocate(self.pool.blocks_for(len(r))) for r in rows]
        try:
            logits = self._logits([Session(0, owner, 0, tokens=list(r), block_table=t) for r, t in zip(rows, tables)])
            return self._publish(owner, logits.view(len(rows), len(rows[0]), -1))
        finally:
            for t in tables:
                self.pool.free(t)

    def _check(self, rows: list[list[int]]):
        vocab, total = self.runner.model.args.vocab_size, sum(len(r) for r in rows)
        if any(not 0 <= t < vocab for r in rows for t in r):
            raise EngineError(ErrorCode.BAD_REQUEST,
                             f"forward: input_ids hold a token outside the vocabulary (0..{vocab - 1})")
        if len(rows[0]) > self.max_model_len or total > self.max_tokens:
            raise EngineError(ErrorCode.CONTEXT_OVERFLOW, f"forward: {len(rows)} x {len(rows[0])} tokens; the limit is "
                             f"{self.max_model_len} per row and {self.max_tokens} in all")
        need = sum(self.pool.blocks_for(len(r)) for r in rows)
        if not self.pool.can_allocate(need):
            raise EngineError(ErrorCode.NO_CAPACITY, f"forward: {total} tokens need {need} KV blocks; "
                             f"{self.pool.num_free} of {self.pool.num_blocks} are free now (retry, or send fewer)")

    @torch.inference_mode()
    def _logits(self, sessions: list[Session]) -> torch.Tensor:
        h, _ = self.runner.forward([(s, len(s.tokens)) for s in sessions])
        return self.runner.logits(h)

    def _publish(self, owner: int, logits: torch.Tensor) -> dict:
        segment = ActivationSegment(logits.shape, torch.float32, self.quota, owner, share="read")
        segment.write(logits)                  # device -> shared memory (synchronizes before the blocks go back)
        self.segments.put(owner, segment)
        return segment.descriptor()

    def release(self, owner: int):
        self.segments.release(owner)

    def close(self):
        self.segments.close()
