"""What a generate request must satisfy before it is queued, each failure an error naming the problem;
and how the request finds its session's KV."""
from djinnd.engine import aborts
from djinnd.engine import commands as cmd
from djinnd.engine.breakpoints import check_layers
from djinnd.engine.commands import EngineError
from djinnd.session import KVPlace, Session, SessionState
from libdjinn.protocol import ErrorCode


def check_generate(engine, s: Session, c: cmd.Generate) -> int:
    """Raise EngineError for a request s cannot take; else the history tokens it keeps."""
    if s.state is not SessionState.IDLE:
        raise EngineError(ErrorCode.BUSY, f"session {s.id} already has a request in flight")
    keep = kept_history(s, c.keep_tokens)
    total, limit, pool = keep + len(c.prompt_ids) + c.params.max_new_tokens, engine.max_model_len, engine.pool
    if total > limit:
        raise EngineError(ErrorCode.CONTEXT_OVERFLOW, f"session {s.id}: {keep} tokens of history "
                          f"+ {len(c.prompt_ids)} prompt + {c.params.max_new_tokens} new = {total} "
                          f"> the model's context of {limit}")
    if pool.blocks_for(total) > pool.num_blocks:
        raise EngineError(ErrorCode.NO_CAPACITY, f"session {s.id}: {total} tokens need "
                          f"{pool.blocks_for(total)} KV blocks; the pool has {pool.num_blocks}")
    args = engine.loaded.model.args
    if any(not 0 <= t < args.vocab_size for t in c.prompt_ids):
        raise EngineError(ErrorCode.BAD_REQUEST, "prompt_ids holds a token outside the vocabulary")
    bad_layers = check_layers(c.params.breakpoints, args.num_layers)
    if bad_layers:
        raise EngineError(ErrorCode.BAD_REQUEST, bad_layers)
    if c.params.breakpoints and (why := aborts.pause_limit_reached(engine, c.owner)):
        raise EngineError(ErrorCode.LIMIT, why)
    return keep


def kept_history(s: Session, keep_tokens: int | None) -> int:
    """How much of an idle session's history a request keeps (keep_tokens: cut it there first)."""
    if keep_tokens is None:
        return len(s.tokens)
    if not 0 <= keep_tokens <= len(s.tokens):
        raise EngineError(ErrorCode.BAD_REQUEST, f"session {s.id}: keep_tokens must be in [0, {len(s.tokens)}] "
                          f"(the tokens it holds), got {keep_tokens}")
    return keep_tokens


def kv_state(s: Session) -> str:
    """How a request found its session's KV: the resume path it will take."""
    if s.kv is KVPlace.HOST:
        return "swapped"
    if s.kv is KVPlace.DROPPED:
        return "dropped"
    if s.prefetched:
        return "prefetched"
    return "resident"
