"""`djinnd` command line: a YAML file, then one flag per config key, generated from the dataclasses."""
import argparse
import logging
import os
import sys

from djinnd import preflight
from djinnd.config import ConfigError, leaf_fields, load_config
from djinnd.preflight import StartupError
from libdjinn.paths import default_socket_path


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="djinnd", description="Djinn daemon: one resident model, many agents.")
    p.add_argument("--config", help="YAML config file (sections model, memory, engine, server)")
    p.add_argument("--log-level", default="WARNING")
    for key, (section, f) in leaf_fields().items():
        kind = f.type if isinstance(f.type, type) else str
        p.add_argument(f"--{key.replace('_', '-')}", dest=key, default=None,
                       type=(lambda v: v.lower() in ("1", "true", "yes")) if kind is bool else kind,
                       help=f"{section}.{key} (default {f.default!r})")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    overrides = {k: v for k, v in vars(args).items() if k in leaf_fields() and v is not None}
    try:
        config = load_config(args.config, overrides)
    except (ConfigError, OSError) as e:
        print(f"djinnd: {e}", file=sys.stderr)
        return 2
    path = config.server.socket or default_socket_path()
    inherited = os.environ.get("LISTEN_PID") == str(os.getpid()) and bool(os.environ.get("LISTEN_FDS"))
    try:
        preflight.check_all(config, path, inherited)    # before torch: a mistake shows in a moment
        from djinnd import daemon
        return daemon.run(config, path)
    except (StartupError, ConfigError) as e:   # ConfigError here: a value that only the model shows is wrong
        print(f"djinnd: {e}", file=sys.stderr)
        return 2
