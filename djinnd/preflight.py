"""Start-up checks that run before torch is imported and the model loads: each failure is one line
naming the flag or file and the fix, so a mistake costs a moment, not a model load and a traceback."""
import grp
import os
import resource

from djinnd.server.listener import prepare_socket_path

MiB = 2**20
FDS_BESIDES_CONNECTIONS = 64      # model files, shm, the log, the loop's own


class StartupError(RuntimeError):
    pass


def check_all(config, path: str, socket_inherited: bool):
    """Everything that needs no torch: the socket, the group, /dev/shm, the open-file limit."""
    check_group(config.server.allowed_group)
    check_shm(config.memory.host_arena_mb)
    check_open_files(config.server.max_connections)
    if not socket_inherited:
        try:
            prepare_socket_path(path, config.server.allowed_group)
        except (RuntimeError, OSError) as e:
            raise StartupError(f"--socket {path}: {e}") from None


def check_model(name: str):
    from djinnd.model.loader import EMBEDDED      # imports torch: run after check_all
    from djinnd.model.presets import PRESETS
    if name.startswith("random:"):
        if name.split(":", 1)[1] not in PRESETS:
            raise StartupError(f"--model {name}: no such random preset; known: "
                               f"{', '.join('random:' + p for p in PRESETS)}")
    elif name != EMBEDDED and not os.path.isdir(name):
        raise StartupError(f"--model {name}: no such model folder; pass a folder with config.json and "
                           f"*.safetensors, {EMBEDDED!r} (embedded) or random:tiny")
    elif name != EMBEDDED:
        check_model_folder(name)


def check_model_folder(path: str):
    """Refuse an architecture or feature this model cannot serve before any weight is read."""
    from djinnd.model.llama import ModelArgs
    from djinnd.model.loader import read_config, shard_files
    try:
        ModelArgs.from_hf(read_config(path))
        shard_files(path)
    except FileNotFoundError as e:
        raise StartupError(f"--model {path}: {e.strerror or e}" if e.filename else f"--model {e}") from None
    except (ValueError, KeyError) as e:
        raise StartupError(f"--model {path}: {e if not isinstance(e, KeyError) else f'config.json has no {e}'}") from None


def check_device(device: str, cuda_available: bool):
    if device.startswith("cuda") and not cuda_available:
        raise StartupError(f"--device {device}: CUDA is not available here (no GPU, driver or CUDA build of "
                           "torch); use --device cpu or --device auto")


def check_group(group: str):
    if group:
        try:
            grp.getgrnam(group)
        except KeyError:
            raise StartupError(f"--allowed-group {group}: no such group; create it (groupadd {group}) "
                               "or leave the key empty") from None


def check_shm(host_arena_mb: float, shm_dir: str = "/dev/shm"):
    """The host arena lives in /dev/shm; one larger than its free space would die of SIGBUS later."""
    if not host_arena_mb or not os.path.isdir(shm_dir):
        return
    st = os.statvfs(shm_dir)
    free = st.f_bavail * st.f_frsize
    if host_arena_mb * MiB > free:
        raise StartupError(f"--host-arena-mb {host_arena_mb:g} does not fit in {shm_dir}, which has "
                           f"{free / MiB:.0f} MiB free; lower --host-arena-mb or enlarge {shm_dir} "
                           "(docker run --shm-size=...)")


def check_open_files(max_connections: int):
    """Raise the soft open-file limit to the hard one; refuse a connection cap it cannot hold."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    need = max_connections + FDS_BESIDES_CONNECTIONS
    if soft != resource.RLIM_INFINITY and need > soft:
        raise StartupError(f"--max-connections {max_connections} needs {need} open files, the limit is {soft}; "
                           "raise it (LimitNOFILE= in the unit, ulimit -n) or lower --max-connections")


def memlock_warning(pin: bool, host_arena_mb: float) -> str | None:
    """cudaHostRegister is not charged to RLIMIT_MEMLOCK by the NVIDIA driver, but a small limit is a
    sign of a container that may refuse pinning: worth one line, not a refusal."""
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if pin and soft != resource.RLIM_INFINITY and soft < host_arena_mb * MiB:
        return (f"djinnd: warning: RLIMIT_MEMLOCK is {soft // MiB} MiB < --host-arena-mb {host_arena_mb:g}; if "
                "pinning fails, set LimitMEMLOCK=infinity (ulimit -l) or --pin-host-arena false")
    return None
