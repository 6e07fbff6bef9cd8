"""The streaming detokenizer: its deltas add up to the full decode, and each token decodes only a
few ids (the old one decoded the whole output again for every token)."""
import pytest

from djinnd.server.text import Detokenizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from djinnd.model.loader import embedded_model_dir
    return AutoTokenizer.from_pretrained(embedded_model_dir())


class CountingTokenizer:
    def __init__(self, tokenizer):
        self.tokenizer, self.longest = tokenizer, 0

    def decode(self, ids, **kw):
        self.longest = max(self.longest, len(ids))
        return self.tokenizer.decode(ids, **kw)


TEXT = ("Streaming text: Ünïcødé, emoji 🤖🚀, CJK 日本語のテキスト, dashes — and ellipses… "
        "  odd   spacing\n\nand new lines. ") * 8


def test_deltas_add_up_to_the_full_decode_with_bounded_work(tokenizer):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    counting = CountingTokenizer(tokenizer)
    detok = Detokenizer(counting)
    streamed = "".join(detok.push(i) for i in ids)
    assert streamed == tokenizer.decode(ids, skip_special_tokens=True)
    assert len(ids) > 200 and counting.longest <= 8
