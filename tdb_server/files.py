"""Which of the server's files a client may name (an SAE folder, a corpus for activation records).

A client sends paths on the server's file system; reading anything it names would let every client
read the server's files (activation records show the text). Paths are resolved (links, `..`) and must
lie inside an allowed folder: the bundled data, the served model's folder, and each `--data-dir`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from .errors import InvalidArgument, PermissionDenied
from .paths import BUNDLED_DIR


class FileAccess:
    def __init__(self, roots: Iterable[str | Path]):
        self.roots = tuple(dict.fromkeys(Path(r).expanduser().resolve() for r in roots))

    @classmethod
    def for_model(cls, adapter: Any, data_dirs: Iterable[str | Path] = ()) -> "FileAccess":
        model = adapter.model_dir
        return cls([BUNDLED_DIR, *([model] if model is not None else []), *data_dirs])

    def check(self, path: str, what: str) -> Path:
        """The resolved path, if a client may read it; PERMISSION_DENIED otherwise."""
        if "\x00" in path:
            raise InvalidArgument(f"{what}: a path cannot contain a NUL character", reason="BAD_PATH")
        real = Path(path).expanduser().resolve()
        if any(real == root or root in real.parents for root in self.roots):
            return real
        # the client's own string only: the server's folders (and where a link leads) are not the client's to learn
        raise PermissionDenied(f"{what} {path!r} is outside the folders this server lets clients read (its bundled "
                               "data, the model's folder and each --data-dir); start the server with --data-dir "
                               "FOLDER to allow another", reason="PATH_NOT_ALLOWED")
