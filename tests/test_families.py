"""Model families as users bring them: folders that transformers itself wrote (save_pretrained, tiny
configs, seeded random weights with random biases and norms) load in djinnd and give HF's greedy
tokens and, in fp32, HF's logits; what djinnd cannot serve is refused in one line naming the key."""
import json
import subprocess
import sys

import pytest
import torch

import libdjinn
from conftest import ROOT, random_prompts, start_daemon, stop_daemon
from djinnd.config import load_config
from djinnd.daemon import build_engine
from djinnd.engine.local import LocalClient
from djinnd.session import Session

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
FAMILIES = {     # name -> (model_type, config keys); prompts run past 32 positions, so scaling matters
    "llama3": ("llama", dict(rope_theta=500000.0, rope_scaling=LLAMA3_ROPE, tie_word_embeddings=True)),
    "llama-yarn": ("llama", dict(rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                               "original_max_position_embeddings": 64})),
    "llama-linear": ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "llama-bias": ("llama", dict(attention_bias=True)),
    "qwen2": ("qwen2", dict(rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)),
    "qwen3": ("qwen3", dict(rope_theta=1000000.0, rms_norm_eps=1e-6)),
    "mistral": ("mistral", dict(sliding_window=128)),
}


def save_hf_folder(folder, model_type: str, keys: dict, seed: int = 0, shard: str | None = None):
    """transformers builds and saves the model; weights N(0, 1/fan_in), norms around 1, biases 0.1-ish."""
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.for_model(model_type, **{**TINY, **keys})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5)
    model.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    return model.eval()


def our_logits(engine, ids: list[int]) -> torch.Tensor:
    """Logits of every position of `ids` through the engine's runner (fresh blocks, fp32)."""
    blocks = engine.pool.allocate(engine.pool.blocks_for(len(ids)))
    try:
        h, _ = engine.runner.forward([(Session(0, 0, 0, tokens=list(ids), block_table=blocks), len(ids))])
        return engine.runner.model.logits(h)
    finally:
        engine.pool.free(blocks)


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    model_type, keys = FAMILIES[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    hf = save_hf_folder(folder, model_type, keys, shard="300KB" if request.param == "qwen2" else None)
    engine = build_engine(load_config(None, {"model": str(folder), "device": "cpu", "kv_cache_mb": 16.0}))
    yield request.param, folder, hf, engine
    engine.stop()


def test_logits_match_hf_in_fp32(family):
    name, _, hf, engine = family
    [ids] = random_prompts(512, [70], seed=3)
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0].float()
    ours = our_logits(engine, ids)
    assert torch.allclose(ours, expected, atol=1e-4, rtol=0), f"{name}: max |diff| {(ours - expected).abs().max()}"


def test_greedy_tokens_match_hf_generate(family):
    name, _, hf, engine = family
    engine.start()
    client = LocalClient(engine)
    prompts = random_prompts(512, [45, 9], seed=4)         # 45 > the scaled ropes' original 32 positions
    pending = [client.submit(client.open(), p, 16) for p in prompts]
    for prompt, events in zip(prompts, pending):
        assert client.done(events)[0].tokens == hf_greedy(hf, prompt, 16), name


def test_sharded_checkpoint_loads_from_its_index(tmp_path):
    save_hf_folder(tmp_path, "qwen2", {}, shard="300KB")
    with open(tmp_path / "model.safetensors.index.json") as fh:
        shards = set(json.load(fh)["weight_map"].values())
    assert len(shards) > 1
    engine = build_engine(load_config(None, {"model": str(tmp_path), "device": "cpu", "kv_cache_mb": 4.0}))
    assert engine.loaded.model.args.qkv_bias and engine.max_model_len == 256


@pytest.mark.parametrize("change, named", [
    ({"model_type": "gemma2"}, "model_type = 'gemma2'"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type 'dynamic'"),
    ({"quantization_config": {"quant_method": "awq"}}, "quantization_config (quant_method 'awq')"),
    ({"use_sliding_window": True, "sliding_window": 64}, "use_sliding_window = true"),
    ({"num_experts": 8}, "num_experts"),
    ({"hidden_act": "gelu"}, "hidden_act = 'gelu'"),
])
def test_unsupported_config_is_refused_in_one_line_before_loading(tmp_path, change, named):
    save_hf_folder(tmp_path, "qwen2", {})
    config = json.loads((tmp_path / "config.json").read_text())
    if change.get("rope_scaling"):
        config.pop("rope_parameters", None)
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    proc = subprocess.run([sys.executable, "-m", "djinnd", "--model", str(tmp_path), "--device", "cpu",
                           "--socket", str(tmp_path / "s.sock")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0] and str(tmp_path) in lines[0], proc.stderr


def test_daemon_serves_a_qwen3_folder_and_hf_model_is_qwen3(tmp_path):
    """Through a real daemon: HF's tokens, and hf_model() builds Qwen3ForCausalLM on the shared weights."""
    hf = save_hf_folder(tmp_path / "qwen3", "qwen3", FAMILIES["qwen3"][1], seed=5)
    daemon = start_daemon(tmp_path, "--model", str(tmp_path / "qwen3"), "--kv-cache-mb", "8")
    try:
        djinn = libdjinn.connect(daemon.socket)
        [prompt] = random_prompts(512, [40], seed=6)
        reply = djinn.session().generate(prompt_ids=prompt, max_new_tokens=12, ignore_eos=True)
        assert reply.tokens == hf_greedy(hf, prompt, 12)
        attached = djinn.hf_model()
        assert type(attached).__name__ == "Qwen3ForCausalLM"
        with torch.no_grad():
            ids = torch.tensor([prompt])
            assert torch.allclose(attached(ids).logits, hf(ids).logits, atol=1e-5)
        djinn.close()
    finally:
        stop_daemon(daemon)


@pytest.mark.parametrize("name", ["qwen2", "qwen3"])
def test_paging_and_weight_streaming_keep_hf_tokens_on_each_family(tmp_path, name):
    """A pool too small for every session (KV swapped out and back) and a weight budget too small for
    the model (layers streamed, biases and QK-norms resident) give HF's tokens."""
    model_type, keys = FAMILIES[name]
    hf = save_hf_folder(tmp_path, model_type, keys, seed=8)
    engine = build_engine(load_config(None, {"model": str(tmp_path), "device": "cpu", "kv_cache_mb": 0.11,
                                             "host_arena_mb": 4.0, "weights_budget_mb": 0.7,
                                             "prefetch_depth": 1}))
    assert engine.loaded.model.streamer is not None and engine.pool.num_blocks <= 8
    engine.start()
    client = LocalClient(engine)
    firsts, seconds = random_prompts(512, [20] * 4, seed=9), random_prompts(512, [6] * 4, seed=10)
    sessions = [client.open() for _ in firsts]
    turn1 = [client.done(e)[0].tokens for e in [client.submit(s, p, 8) for s, p in zip(sessions, firsts)]]
    turn2 = [client.done(e)[0].tokens for e in [client.submit(s, p, 8) for s, p in zip(sessions, seconds)]]
    swaps = engine.metrics.counters.get("swaps_out", 0) + engine.metrics.counters.get("kv_drops_device", 0)
    engine.stop()
    assert swaps > 0, engine.metrics.counters
    for first, out1, second, out2 in zip(firsts, turn1, seconds, turn2):
        assert out1 == hf_greedy(hf, first, 8)
        assert out2 == hf_greedy(hf, first + out1 + second, 8)
