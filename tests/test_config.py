"""Config: YAML then flags; unknown keys and bad values are errors that name the key."""
import subprocess
import sys

import pytest

from djinnd.config import ConfigError, load_config


def write(tmp_path, text):
    path = tmp_path / "djinnd.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_then_yaml_then_flags(tmp_path):
    path = write(tmp_path, "memory:\n  kv_cache_mb: 64\n  block_size: 32\nmodel:\n  model: random:tiny\n")
    config = load_config(path, {"kv_cache_mb": 8})
    assert config.memory.kv_cache_mb == 8.0 and config.memory.block_size == 32
    assert config.model.model == "random:tiny" and config.engine.max_num_seqs == 64


@pytest.mark.parametrize("text, key", [
    ("memory:\n  kv_cache_gb: 1\n", "memory.kv_cache_gb"),
    ("engines:\n  device: cpu\n", "engines"),
    ("memory:\n  block_size: big\n", "memory.block_size"),
    ("memory:\n  block_size: 0\n", "block_size"),
    ("model:\n  dtype: float8\n", "dtype"),
    ("engine:\n  device: tpu\n", "device"),
    ("server:\n  socket_mode: '0999'\n", "socket_mode"),
])
def test_bad_yaml_names_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(write(tmp_path, text))


def test_unknown_override_names_the_key():
    with pytest.raises(ConfigError, match="'kv_cache_gb'"):
        load_config(None, {"kv_cache_gb": 1})


def test_djinnd_flag_with_bad_value_exits_with_a_message():
    out = subprocess.run([sys.executable, "-m", "djinnd", "--block-size", "-4"], capture_output=True, text=True)
    assert out.returncode == 2 and "block_size" in out.stderr


def test_shipped_example_config_is_the_defaults():
    import os
    from djinnd.config import Config
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "systemd", "djinnd.yaml")
    assert load_config(path) == Config()
