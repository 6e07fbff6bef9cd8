"""Runner: executes the scheduler's plan on the model. Two paths: prefill (chunks of new tokens,
metadata built per step) and decode (persistent DecodeBatch rows, CUDA graphs on GPU). Breakpoint
forwards use the prefill path one segment of layers at a time. Sampling happens on the device;
the host reads only the new token ids.
"""
import random
from dataclasses import dataclass

import torch

from djinnd.engine.decode_batch import DecodeBatch
from djinnd.engine.graphs import DecodeGraphs
from djinnd.engine.interventions import Interventions
from djinnd.engine.sampler import sample
from djinnd.engine.to_device import to_device
from djinnd.model.attention import ForwardContext, build_prefill_metadata, prefill_attention
from djinnd.session import Session, SessionState


@dataclass
class LaunchedStep:
    rows: list[Session]
    requests: list            # each row's request at launch: a token for an ended request is dropped
    host_ids: torch.Tensor    # pinned, filled by the step's copy
    done: object              # CUDA event after the copy, None on CPU
    captured: tuple | None = None   # (each row's Active, layers, staged [layers, n, hidden], positions), host


class Runner:
    def __init__(self, model, pool, device, max_num_seqs: int, max_model_len: int,
                 attention: str = "auto", cuda_graphs: bool = True):
        self.model, self.pool, self.device = model, pool, device
        self.interventions = Interventions(model.args.hidden_size, model.model.embed_tokens.weight.dtype, device)
        self.batch = DecodeBatch(max_num_seqs, pool.blocks_for(max_model_len), pool.scratch_block, device,
                                 self.interventions, model.args.num_layers)
        self.decoder = DecodeGraphs(model, pool, self.batch, device, attention, cuda_graphs)
        self.seeds: dict[int, int] = {}                # session id -> its request's sampling seed
        self.is_cuda = torch.device(device).type == "cuda"
        self.host_ids = torch.zeros(2, max_num_seqs, dtype=torch.int64, pin_memory=self.is_cuda)  # double-buffered
        self._flip = 0
        self.in_flight: LaunchedStep | None = None     # a decode step whose tokens the host has not read
        self.mixed_graphs = None                       # mixed steps' CUDA graphs (capture_mixed)
        self._layer_indexes: dict[tuple, torch.Tensor] = {}
        self.mirror = getattr(model, "mirror", None)    # tensor parallelism: the other ranks (engine/tp_mirror.py)

    def capture_mixed(self, max_tokens: int):
        """Graphs for mixed steps, where decode steps have graphs and both paged kernels run."""
        d = self.decoder
        if d.graphs and d.kernel and d.prefill_kernel and self.mirror is None and self.model.streamer is None:
            from djinnd.engine.mixed_graphs import MixedGraphs     # imports Triton: CUDA machines only
            num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count
            self.mixed_graphs = MixedGraphs(d, max_tokens, num_sms)
            self.mixed_graphs.capture()

    def chunk_sizes(self) -> list[int] | None:
        """Prompt tokens per step that the mixed steps' graphs hold (None: mixed steps run eagerly)."""
        return self.mixed_graphs.token_sizes if self.mixed_graphs else None

    # ---- prefill ---------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, chunks: list[tuple[Session, int]], start: int = 0, stop: int | None = None, hidden=None,
                after=None):
        """Layers [start, stop) over each session's next n uncached tokens; `hidden` [T, hidden_size]
        continues a forward paused after layer start - 1. after(i, h): see run_layers; by default the
        sessions' steering and capture. Returns hidden states and metadata."""
        meta = build_prefill_metadata([n for _, n in chunks], [s.num_cached + n for s, n in chunks],
                                      [s.block_table for s, _ in chunks], self.pool.block_size, self.device)
        after = after or self.interventions.prefill_hook(chunks)
        if self.mirror is not None:
            after = self.mirror.prefill(meta, chunks, hidden, start, stop, after)
        if hidden is None:
            ids = [t for s, n in chunks for t in s.tokens[s.num_cached:s.num_cached + n]]
            hidden = self.model.embed(torch.tensor(ids).to(self.device, non_blocking=True))
        cos, sin = self.model.rope(meta.positions, hidden.dtype)
        kernel = self.decoder.prefill_kernel
        attend = lambda q, k, v, kc, vc: prefill_attention(q, k, v, kc, vc, meta, kernel)  # noqa: E731
        ctx = ForwardContext(cos, sin, meta.slot_mapping, attend, self.decoder.fused)
        return self.model.run_layers(hidden, ctx, self.pool.k, self.pool.v, start, stop, after), meta

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

    def logits(self, h):
        """Logits [N, vocab] of hidden states after the last layer (every rank gathers its vocabulary shard)."""
        if self.mirror is not None:
            self.mirror.logits(h)
        return self.model.logits(h)

    def _sample(self, sessions: list[Session], h) -> list[int]:
        return self.sample_ids(sessions, h).tolist()

    def sample_ids(self, sessions: list[Session], h) -> torch.Tensor:
        """Each session's next id from its hidden state, on the device (nothing waits for it)."""
        params, device = [s.request.params for s in sessions], self.device
        return sample(self.logits(h), to_device([p.temperature for p in params], device),
                      to_device([p.top_p for p in params], device),
                      to_device([self.seed(s) for s in sessions], device, torch.int64),
                      to_device([len(s.tokens) for s in sessions], device),
                      any(p.temperature > 0 for p in params), any(p.top_p < 1 for p in params))

    # ---- decode ----------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, sessions: list[Session], pipelined: bool = False) -> list[tuple[Session, int]]:
        """Launch one decode step for `sessions` (each has one uncached token: its last). Returns the
        tokens of the step launched before it, if any, and, unless `pipelined`, of this one too.
        Pipelined, the host appends a step's tokens while the GPU already runs the next; the step
        in flight may compute one token past a request's end, which is dropped (its K/V lands in
        blocks the request still holds)."""
        launched = self._launch(sessions) if sessions else None
        previous, self.in_flight = self.in_flight, launched
        tokens = self._collect(previous) if previous else []
        if not pipelined and self.in_flight:
            tokens += self._collect(self.in_flight)
            self.in_flight = None
        return tokens

    def _launch(self, sessions: list[Session]) -> "LaunchedStep":
        for s in sessions:
            self.seed(s)
        self.batch.sync(sessions, self.seeds)
        n, rows = self.batch.num_rows, list(self.batch.sessions)
        bound = None if self.decoder.kernel else self.pool.blocks_for(max(len(s.tokens) for s in rows) + 1)
        mode = self.interventions.mode(rows)
        logits = self.decoder.run(n, bound, mode)
        captured = self._stage_capture(rows) if mode == "capture" else None
        return self.sample_rows(rows, logits, captured)

    def sample_rows(self, rows: list[Session], logits, captured: tuple | None = None) -> "LaunchedStep":
        """Sample the decode rows' next ids on the device, feed them back as the rows' next input,
        and copy them to the host behind the step (an event marks the copy)."""
        n = len(rows)
        ids = self.batch.sampling.sample(logits, self.batch.positions[:n], n)
        self.batch.input_ids[:n] = ids
        host = self.host_ids[self._flip][:n]
        self._flip ^= 1
        host.copy_(ids, non_blocking=True)
        done = torch.cuda.Event() if self.is_cuda else None
        if done is not None:
            done.record()
        return LaunchedStep(rows, [s.request for s in rows], host, done, captured)

    def _stage_capture(self, rows: list[Session]) -> tuple:
        """Copy the captured layers' staged rows and the rows' positions to the host, behind the step."""
        layers, n = self.interventions.capture_layers(rows), len(rows)
        staged = self.batch.stage[:, :n].index_select(0, self._layer_index(tuple(layers)))
        host = torch.empty(staged.shape, dtype=staged.dtype, pin_memory=self.is_cuda)
        positions = torch.empty(n, dtype=torch.int64, pin_memory=self.is_cuda)
        host.copy_(staged, non_blocking=True)
        positions.copy_(self.batch.positions[:n], non_blocking=True)
        return [self.interventions.of(s.id) for s in rows], layers, host, positions

    def _layer_index(self, layers: tuple) -> torch.Tensor:
        """A device index of layers, made once: a host-to-device copy per step would wait for the GPU."""
        if layers not in self._layer_indexes:
            self._layer_indexes[layers] = torch.tensor(layers, device=self.batch.stage.device)
        return self._layer_indexes[layers]

    def _collect(self, step: "LaunchedStep") -> list[tuple[Session, int]]:
        """Wait for a launched step (an event wait releases the GIL, so the server keeps streaming)
        and hand out its tokens to the sessions still on the same request (their captured rows first)."""
        if step.done is not None:
            step.done.synchronize()
        if step.captured is not None:
            actives, layers, staged, positions = step.captured
            self.interventions.write_decode(step.rows, actives, layers, staged, positions)
        out = []
        for s, request, token in zip(step.rows, step.requests, step.host_ids.tolist()):
            if s.request is request and s.state is SessionState.RUNNING:
                s.num_cached = len(s.tokens)
                out.append((s, token))
        return out

    def seed(self, s: Session) -> int:
        if s.id not in self.seeds:
            p = s.request.params
            self.seeds[s.id] = (p.seed if p.seed is not None else random.getrandbits(62)) & ((1 << 62) - 1)
        return self.seeds[s.id]

    def forget(self, session_id: int):
        """A request ended: its row goes, and the next request starts from its own seed."""
        self.seeds.pop(session_id, None)
        self.batch.remove(session_id)
        self.interventions.end(session_id)
