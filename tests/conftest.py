"""Shared fixtures: a real djinnd process on a private socket, and HF transformers as the reference."""
import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Daemon:
    def __init__(self, socket_path: str, proc: subprocess.Popen, log_path: str):
        self.socket, self.proc, self.log_path = socket_path, proc, log_path

    def log(self) -> str:
        with open(self.log_path) as fh:
            return fh.read()

    def alive(self) -> bool:
        return self.proc.poll() is None


def start_daemon(tmp_path, *flags, timeout=180, entry=("-m", "djinnd"), **popen) -> Daemon:
    sock = str(tmp_path / "run" / "djinnd.sock")
    log_path = str(tmp_path / "djinnd.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, *entry, "--socket", sock, "--device", "cpu", *flags],
                                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, **popen)
    daemon = Daemon(sock, proc, log_path)
    deadline = time.time() + timeout
    while "djinnd: ready" not in daemon.log():
        if not daemon.alive() or time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"djinnd did not start:\n{daemon.log()}")
        time.sleep(0.1)
    return daemon


def stop_daemon(daemon: Daemon):
    daemon.proc.terminate()
    try:
        daemon.proc.wait(10)
    except subprocess.TimeoutExpired:
        daemon.proc.kill()


@pytest.fixture(scope="module")
def tiny_daemon(tmp_path_factory):
    d = start_daemon(tmp_path_factory.mktemp("tiny"), "--model", "random:tiny", "--kv-cache-mb", "4")
    yield d
    stop_daemon(d)


def hf_reference(model):
    """HF transformers' model of the same family holding the same weights as our model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from djinnd.model.llama import hf_state_dict
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**model.args.to_hf()))
    hf.load_state_dict(hf_state_dict(model), strict=False)
    hf.tie_weights()
    return hf.eval()


def hf_greedy(hf, prompt_ids: list[int], max_new_tokens: int, ignore_eos=True) -> list[int]:
    kwargs = {"min_new_tokens": max_new_tokens} if ignore_eos else {}
    with torch.no_grad():
        device = next(hf.parameters()).device
        out = hf.generate(torch.tensor([prompt_ids], device=device), max_new_tokens=max_new_tokens, do_sample=False,
                          attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long, device=device), **kwargs)
    return out[0, len(prompt_ids):].tolist()


def random_prompts(vocab: int, lengths, seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def decode_while_prompts_arrive(client, short: list[list[int]], late: list[list[int]], params) -> list[list[int]]:
    """Sessions decode the `short` prompts; once decoding has started, the `late` ones arrive (fed in
    chunks beside the decoding rows). Every request's tokens, in that order."""
    pending = [client.submit(client.open(), p, params=params) for p in short]
    pending[0].put(pending[0].get(timeout=300))                 # decoding has started
    pending += [client.submit(client.open(), p, params=params) for p in late]
    return [client.done(e)[0].tokens for e in pending]


def require_triton_interpreter(compiled_elsewhere: str):
    """Skip the calling test module where Triton is missing, and on CUDA machines, where the compiled
    kernels are tested instead (`compiled_elsewhere` says where)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed", allow_module_level=True)
    if torch.cuda.is_available():
        pytest.skip(compiled_elsewhere, allow_module_level=True)


def run_interpreted(code: str, *args: str, timeout: int = 300):
    """Run `code` in a child process under Triton's interpreter (chosen when Triton is imported, so
    not in this one); what it printed last, read as JSON."""
    done = subprocess.run([sys.executable, "-c", code, *args], env={**os.environ, "TRITON_INTERPRET": "1"},
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])
