"""On CUDA: every family through the GPU path (Triton kernels, CUDA graphs) against transformers on the
same weights. fp32 folders (tiny, save_pretrained): logits within 1e-3 and greedy tokens equal. bf16
presets in real shapes (random weights): prefill logits within a stated tolerance of HF's, and every
token the graphed decode picks is HF's argmax or within that tolerance of it (near-ties may flip)."""
import pytest
import torch

from conftest import random_prompts
from djinnd.config import load_config
from djinnd.daemon import build_engine
from djinnd.engine.local import LocalClient
from djinnd.model.llama import hf_state_dict
from test_families import FAMILIES, our_logits, save_hf_folder

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

BF16_TOLERANCE = 0.05     # |our logit - HF's| relative to the largest |logit| of that position


def shared_hf(model):
    """The family's transformers model holding our weights (no copy), rotary tables on the device."""
    from transformers import AutoConfig, AutoModelForCausalLM
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**model.args.to_hf()))
    hf.load_state_dict(hf_state_dict(model), strict=False, assign=True)
    hf.tie_weights()
    with torch.device(model.lm_head.weight.device):
        hf.model.rotary_emb = type(hf.model.rotary_emb)(hf.config)
    return hf.eval()


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_folder_fp32_on_cuda(tmp_path, name):
    model_type, keys = FAMILIES[name]
    hf = save_hf_folder(tmp_path, model_type, keys).cuda()
    engine = build_engine(load_config(None, {"model": str(tmp_path), "device": "cuda", "dtype": "float32",
                                             "kv_cache_mb": 64.0}))
    [ids] = random_prompts(512, [70], seed=3)
    with torch.no_grad():
        expected = hf(torch.tensor([ids], device="cuda")).logits[0].float()
    assert (our_logits(engine, ids) - expected).abs().max() < 1e-3
    engine.start()
    client = LocalClient(engine)
    prompts = random_prompts(512, [45, 9, 33], seed=4)
    pending = [client.submit(client.open(), p, 16) for p in prompts]
    outs = [client.done(e)[0].tokens for e in pending]
    engine.stop()
    for prompt, out in zip(prompts, outs):
        assert out == _hf_greedy_cuda(hf, prompt, 16)


def _hf_greedy_cuda(hf, prompt, n):
    with torch.no_grad():
        ids = torch.tensor([prompt], device="cuda")
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("preset", ["llama-3.2-1b", "llama-3.1-8b", "qwen2.5-7b", "qwen3-8b"])
def test_preset_bf16_logits_against_hf(preset):
    engine = build_engine(load_config(None, {"model": f"random:{preset}", "device": "cuda", "kv_cache_mb": 4096.0}))
    model = engine.loaded.model
    assert model.lm_head.weight.dtype == torch.bfloat16       # auto: the family's checkpoint dtype
    hf = shared_hf(model)
    vocab = model.args.vocab_size
    [prompt] = random_prompts(vocab, [300], seed=7)
    with torch.no_grad():
        expected = hf(torch.tensor([prompt], device="cuda")).logits[0].float()
    ours = our_logits(engine, prompt)
    rel = ((ours - expected).abs().max(-1).values / expected.abs().max(-1).values).max().item()
    agree = (ours.argmax(-1) == expected.argmax(-1)).float().mean().item()
    # decode through the graphs and the paged kernel, then check each pick against HF on the whole text
    engine.start()
    client = LocalClient(engine)
    tokens = client.done(client.submit(client.open(), prompt, 32))[0].tokens
    engine.stop()
    with torch.no_grad():
        full = hf(torch.tensor([prompt + tokens], device="cuda")).logits[0, len(prompt) - 1:-1].float()
    picked = full.gather(1, torch.tensor(tokens, device="cuda")[:, None])[:, 0]
    gap = ((full.max(-1).values - picked) / full.abs().max(-1).values).max().item()
    print(f"\n{preset}: prefill max rel |diff| {rel:.4f}, argmax agree {agree:.3f}; decode worst rel gap {gap:.4f}")
    assert rel < BF16_TOLERANCE and agree > 0.9 and gap < BF16_TOLERANCE
    del engine, hf, model
    torch.cuda.empty_cache()
