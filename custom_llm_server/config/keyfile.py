"""The caller key the server makes when CUSTOM_LLM_API_KEY is not set: made once, kept in a file only
the server's user can read (DATA_DIR/api-key), and the same after every restart and in every worker,
so the playground, `$KEY` and the `api_key` in an Agora agent's configuration keep working."""

import os
import secrets
from pathlib import Path

FILE_NAME = "api-key"


def stored_key(data_dir: Path) -> tuple[str, Path, bool]:
    """(the key, its file, whether it was made now). A file that holds no key is replaced."""
    path = data_dir / FILE_NAME
    try:
        key = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        key = ""
    if key:
        return key, path, False
    key = secrets.token_urlsafe(24)
    data_dir.mkdir(parents=True, exist_ok=True)
    # Created with owner-only permissions from the start (no moment when others could read it), and
    # written through a temporary name so a worker starting beside us never reads half a key.
    temporary = path.with_name(f".{FILE_NAME}.{os.getpid()}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        file.write(key + "\n")
    os.replace(temporary, path)
    return key, path, True
