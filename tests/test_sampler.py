"""Greedy sampling's two-pass argmax gives torch.argmax's answer, the first of equal maxima, whether
the maxima sit in one piece of the vocabulary or in several."""
import torch

from djinnd.engine.sampler import first_argmax


def test_two_pass_argmax_is_the_first_maximum():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 128256, generator=g)
    logits[1, [5000, 90000]] = 50.0             # ties in different pieces: the first wins
    logits[2, [7, 9]] = 50.0                    # ties inside one piece
    logits[3, -1] = 50.0                        # the last token
    logits[4] = 1.0                             # all equal: token 0
    assert first_argmax(logits).tolist() == logits.argmax(dim=-1).tolist()
    assert first_argmax(logits)[:5].tolist() == [logits[0].argmax().item(), 5000, 7, 128255, 0]
    odd = torch.randn(3, 1001, generator=g)      # no power of two divides it: one pass
    assert first_argmax(odd).tolist() == odd.argmax(dim=-1).tolist()
