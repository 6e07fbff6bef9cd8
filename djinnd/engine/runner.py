"""Runner: executes the scheduler's plan on the model. Two paths: prefill (chunks of new tokens,
metadata built per step) and decode (persistent DecodeBatch rows, CUDA graphs on GPU). Breakpoint
forwards use the prefill path one segment of layers at a time. Sampling happens on the device;
the host reads only the new token ids.
"""
import random

import torch

from djinnd.engine.decode_batch import DecodeBatch
from djinnd.engine.graphs import DecodeGraphs
from djinnd.engine.sampler import sample
from djinnd.model.attention import ForwardContext, build_prefill_metadata, prefill_attention
from djinnd.session import Session


class Runner:
    def __init__(self, model, pool, device, max_num_seqs: int, max_model_len: int,
                 attention: str = "auto", cuda_graphs: bool = True):
        self.model, self.pool, self.device = model, pool, device
        self.batch = DecodeBatch(max_num_seqs, pool.blocks_for(max_model_len), pool.scratch_block, device)
        self.decoder = DecodeGraphs(model, pool, self.batch, device, attention, cuda_graphs)
        self.seeds: dict[int, int] = {}                # session id -> its request's sampling seed
        self.is_cuda = torch.device(device).type == "cuda"
        self.host_ids = torch.zeros(max_num_seqs, dtype=torch.int64, pin_memory=self.is_cuda)

    # ---- prefill ---------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, chunks: list[tuple[Session, int]], start: int = 0, stop: int | None = None, hidden=None):
        """Layers [start, stop) over each session's next n uncached tokens; `hidden` [T, hidden_size]
        continues a forward paused after layer start - 1. Returns hidden states and metadata."""
        meta = build_prefill_metadata([n for _, n in chunks], [s.num_cached + n for s, n in chunks],
                                      [s.block_table for s, _ in chunks], self.pool.block_size, self.device)
        if hidden is None:
            ids = [t for s, n in chunks for t in s.tokens[s.num_cached:s.num_cached + n]]
            hidden = self.model.embed(torch.tensor(ids).to(self.device, non_blocking=True))
        cos, sin = self.model.rope(meta.positions, hidden.dtype)
        ctx = ForwardContext(cos, sin, lambda q, k, v, kc, vc: prefill_attention(q, k, v, kc, vc, meta),
                             self.decoder.fused)
        return self.model.run_layers(hidden, ctx, self.pool.k, self.pool.v, start, stop), meta

    @torch.inference_mode()
    def prefill(self, chunks: list[tuple[Session, int]]) -> list[int | None]:
        """Feed each session its chunk; a session whose prompt is now all cached gets its next token."""
        h, meta = self.forward(chunks)
        done = [i for i, (s, n) in enumerate(chunks) if n == s.num_new_tokens]
        tokens = [None] * len(chunks)
        if done:
            last = meta.last_token_index[torch.tensor(done, device=meta.last_token_index.device)]
            for i, token in zip(done, self._sample([chunks[i][0] for i in done], h[last])):
                tokens[i] = token
        for s, n in chunks:
            s.num_cached += n
        return tokens

    @torch.inference_mode()
    def sample_next(self, sessions: list[Session], h, meta) -> list[int]:
        """After a full forward of `sessions`' uncached tails: mark them cached, sample one token each."""
        tokens = self._sample(sessions, h[meta.last_token_index])
        for s in sessions:
            s.num_cached = len(s.tokens)
        return tokens

    def _sample(self, sessions: list[Session], h) -> list[int]:
        params = [s.request.params for s in sessions]
        to = dict(device=self.device)
        return sample(self.model.logits(h), torch.tensor([p.temperature for p in params], **to),
                      torch.tensor([p.top_p for p in params], **to),
                      torch.tensor([self.seed(s) for s in sessions], dtype=torch.int64, **to),
                      torch.tensor([len(s.tokens) for s in sessions], **to),
                      any(p.temperature > 0 for p in params), any(p.top_p < 1 for p in params)).tolist()

    # ---- decode ----------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, sessions: list[Session]) -> list[tuple[Session, int]]:
        """One token for every session (each has exactly one uncached token: its last)."""
        for s in sessions:
            self.seed(s)
        self.batch.sync(sessions, self.seeds)
        n, rows = self.batch.num_rows, list(self.batch.sessions)
        num_blocks = None if self.decoder.kernel else self.pool.blocks_for(max(len(s.tokens) for s in rows))
        logits = self.decoder.run(n, num_blocks)
        ids = self.batch.sampling.sample(logits, self.batch.positions[:n], n)
        self.batch.input_ids[:n] = ids
        for s in rows:
            s.num_cached = len(s.tokens)
        return list(zip(rows, self._read(ids)))

    def _read(self, ids) -> list[int]:
        """The step's one host read. Waiting on an event releases the GIL, so the server's loop
        keeps streaming tokens to clients while the GPU works."""
        n = ids.shape[0]
        self.host_ids[:n].copy_(ids, non_blocking=True)
        if self.is_cuda:
            done = torch.cuda.Event()
            done.record()
            done.synchronize()
        return self.host_ids[:n].tolist()

    def seed(self, s: Session) -> int:
        if s.id not in self.seeds:
            p = s.request.params
            self.seeds[s.id] = (p.seed if p.seed is not None else random.getrandbits(62)) & ((1 << 62) - 1)
        return self.seeds[s.id]

    def forget(self, session_id: int):
        """A request ended: its row goes, and the next request starts from its own seed."""
        self.seeds.pop(session_id, None)
        self.batch.remove(session_id)
