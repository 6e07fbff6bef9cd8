"""Next-token choice: greedy, or seeded temperature/top-p sampling with one generator per session."""
import torch

from djinnd.session import SamplingParams


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list) -> list[int]:
    """logits [B, vocab] float32; greedy rows take argmax, the rest draw from their own generator."""
    greedy = logits.argmax(dim=-1).tolist()
    out = []
    for i, p in enumerate(params):
        if p.temperature <= 0:
            out.append(greedy[i])
            continue
        probs = torch.softmax(logits[i] / p.temperature, dim=-1).cpu()
        if p.top_p < 1.0:
            probs = _top_p(probs, p.top_p)
        out.append(int(torch.multinomial(probs, 1, generator=generators[i])))
    return out


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_probs, order = probs.sort(descending=True)
    keep = sorted_probs.cumsum(0) - sorted_probs < top_p   # always keeps the most likely token
    filtered = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return filtered / filtered.sum()
