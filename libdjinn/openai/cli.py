"""`djinn-openai`: serve the OpenAI API in front of a running djinnd."""
import argparse
import dataclasses
import logging

from libdjinn.openai.front import Front, FrontConfig


def parse_args(argv=None) -> tuple[argparse.Namespace, FrontConfig]:
    p = argparse.ArgumentParser(prog="djinn-openai", description=__doc__)
    p.add_argument("--listen", default="127.0.0.1:8000", help="HOST:PORT to serve HTTP on")
    for f in dataclasses.fields(FrontConfig):
        kind = float if f.type in (float, "float") else int if f.type in (int, "int") else str
        p.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=f.default,
                       help=f"default: {f.default}")
    args = p.parse_args(argv)
    if args.max_conversations < 1 or args.conversation_ttl_s <= 0 or args.default_max_tokens < 1:
        p.error("--max-conversations, --conversation-ttl-s and --default-max-tokens must be positive")
    config = FrontConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(FrontConfig)})
    return args, config


def main(argv=None):
    import uvicorn

    from libdjinn.openai.app import create_app
    args, config = parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    logging.basicConfig(level=logging.INFO, format="djinn-openai: %(message)s")
    print(f"djinn-openai: serving http://{host or '127.0.0.1'}:{port}/v1 (model {config.model_name!r})", flush=True)
    uvicorn.run(create_app(Front(config)), host=host or "127.0.0.1", port=int(port), log_level="warning",
                timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()
