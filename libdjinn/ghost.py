"""GhostModel: an object shaped like an HF causal LM (`config`, `model(input_ids).logits`,
`model.generate(input_ids, ...)`) whose work runs in djinnd. This process needs no weights and no
CUDA context, so HF-style code swaps one line:

    model = AutoModelForCausalLM.from_pretrained(...)   ->   model = libdjinn.GhostModel(djinn)

Logits come back through a shared-memory segment and are copied out; `generate` runs one daemon
session per row (batched together there) and pads finished rows like HF.
"""
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from libdjinn.shm import MappedTensor

_forward_locks: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_SAMPLING = ("temperature", "top_p", "seed", "ignore_eos")


@dataclass
class GhostOutput:
    logits: object                # torch.Tensor [batch, tokens, vocab], float32, on CPU

    def __getitem__(self, key):
        return getattr(self, key)


class GhostModel:
    def __init__(self, conn):
        self.conn = conn
        reply = conn.request("model_config")
        self.label = reply["label"]
        self.config = _hf_config(reply["config"])
        _forward_locks.setdefault(conn, threading.Lock())

    @property
    def device(self):
        import torch
        return torch.device("cpu")

    def __call__(self, input_ids, attention_mask=None, **kwargs) -> GhostOutput:
        """Logits of every position, computed by the daemon's model: like HF's forward without a cache."""
        rows = _rows(input_ids, attention_mask)
        if kwargs:
            raise TypeError(f"GhostModel(): unsupported arguments {sorted(kwargs)}")
        with _forward_locks[self.conn]:   # a connection's logits segment is replaced by its next forward
            mapped = MappedTensor(self.conn.request("forward", input_ids=rows)["logits"])
            logits = mapped.torch().clone()
            mapped.close()
        return GhostOutput(logits)

    forward = __call__

    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 20, do_sample: bool = False,
                 min_new_tokens: int | None = None, pad_token_id: int | None = None, **kwargs):
        """HF-style generate: prompt + new tokens per row, [batch, prompt + longest], rows that stop
        early (EOS) padded with pad_token_id. Sampling: temperature, top_p, seed (no top_k)."""
        import torch
        rows = _rows(input_ids, attention_mask)
        unknown = set(kwargs) - set(_SAMPLING)
        if unknown:
            raise TypeError(f"GhostModel.generate: unsupported arguments {sorted(unknown)}")
        if min_new_tokens not in (None, 0, max_new_tokens):
            raise ValueError("GhostModel.generate: min_new_tokens must be 0 or equal to max_new_tokens")
        sampling = {"max_new_tokens": max_new_tokens, "ignore_eos": bool(min_new_tokens) or None, **kwargs}
        sampling["temperature"] = sampling.get("temperature", 1.0) if do_sample else 0.0
        with ThreadPoolExecutor(max_workers=min(len(rows), 32)) as pool:
            outs = list(pool.map(lambda r: self._generate_row(r, sampling), rows))
        pad = pad_token_id if pad_token_id is not None else _pad_id(self.config)
        width = max(len(o) for o in outs)
        return torch.tensor([r + o + [pad] * (width - len(o)) for r, o in zip(rows, outs)], dtype=torch.long)

    def _generate_row(self, prompt: list[int], sampling: dict) -> list[int]:
        session = self.conn.session()
        try:
            return session.generate(prompt_ids=prompt, **{k: v for k, v in sampling.items() if v is not None}).tokens
        finally:
            session.close()


def _rows(input_ids, attention_mask) -> list[list[int]]:
    """input_ids as a tensor, [ids] or [[ids], ...] -> list of rows; padding masks are refused."""
    rows = input_ids.tolist() if hasattr(input_ids, "tolist") else list(input_ids)
    rows = [rows] if rows and not isinstance(rows[0], list) else rows
    if attention_mask is not None:
        mask = attention_mask.tolist() if hasattr(attention_mask, "tolist") else attention_mask
        if any(not all(m) for m in ([mask] if mask and not isinstance(mask[0], list) else mask)):
            raise ValueError("GhostModel: padded batches are not supported; send rows of equal length, unpadded")
    if not rows or not all(rows) or len({len(r) for r in rows}) != 1:
        raise ValueError("GhostModel: input_ids must be non-empty rows of one length")
    return [[int(t) for t in r] for r in rows]


def _pad_id(config) -> int:
    pad = getattr(config, "pad_token_id", None)
    if pad is None:
        eos = getattr(config, "eos_token_id", None)
        pad = eos[0] if isinstance(eos, list) and eos else eos
    return pad if pad is not None else 0


def _hf_config(d: dict):
    """transformers.LlamaConfig when transformers is installed, else a plain namespace of the dict."""
    try:
        from transformers import LlamaConfig
    except ImportError:
        from types import SimpleNamespace
        return SimpleNamespace(**d)
    return LlamaConfig(**d)
