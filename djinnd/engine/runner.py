"""Runner: turns scheduled sessions into one batched forward over the paged KV cache and samples."""
import torch

from djinnd.engine.sampler import sample
from djinnd.model.attention import build_metadata
from djinnd.session import Session


class Runner:
    def __init__(self, model, pool, device):
        self.model, self.pool, self.device = model, pool, device
        self._generators: dict[int, torch.Generator] = {}

    def prepare(self, sessions: list[Session]):
        """Input ids [T] (each session's uncached tail) and attention metadata for the batch."""
        ids, q_lens, ctx_lens = [], [], []
        for s in sessions:
            ids.extend(s.tokens[s.num_cached:])
            q_lens.append(s.num_new_tokens)
            ctx_lens.append(len(s.tokens))
        meta = build_metadata(q_lens, ctx_lens, [s.block_table for s in sessions],
                              self.pool.block_size, self.device)
        return torch.tensor(ids).to(self.device, non_blocking=True), meta

    def run(self, sessions: list[Session]) -> list[int]:
        """One forward for all sessions; marks their tokens cached and returns one new token each."""
        return self.sample_next(sessions, *self.forward(sessions))

    @torch.inference_mode()
    def forward(self, sessions: list[Session], start: int = 0, stop: int | None = None, hidden=None):
        """Decoder layers [start, stop) over the sessions' uncached tokens; `hidden` [T, hidden_size]
        continues a forward paused after layer start - 1. Returns hidden states and metadata."""
        input_ids, meta = self.prepare(sessions)
        h = self.model.embed(input_ids) if hidden is None else hidden
        h = self.model.run_layers(h, self.model.rope(meta, h.dtype), self.pool.k, self.pool.v, meta, start, stop)
        return h, meta

    @torch.inference_mode()
    def sample_next(self, sessions: list[Session], h, meta) -> list[int]:
        logits = self.model.logits(h, meta)
        for s in sessions:
            s.num_cached = len(s.tokens)
        return sample(logits, [s.request.params for s in sessions], [self.generator(s) for s in sessions])

    def generator(self, s: Session):
        p = s.request.params
        if p.temperature <= 0:
            return None
        if s.id not in self._generators:
            seed = p.seed if p.seed is not None else torch.seed()
            self._generators[s.id] = torch.Generator().manual_seed(seed)
        return self._generators[s.id]

    def forget(self, session_id: int):
        """A request ended: the next one on this session starts from its own seed."""
        self._generators.pop(session_id, None)
