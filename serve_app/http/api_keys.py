"""The API key file: `fusionserve keys add|list|revoke` write it, the ingress reads it (auth.py).

It holds each key's name, creation time, own limits and the SHA-256 of the key, never the key.
A fast hash is enough because a key is 32 random bytes (256 bits): nothing can be guessed or
brute-forced from its hash, so a slow password hash (scrypt, PBKDF2) would add nothing but
milliseconds to every request. Writes hold a lock and replace the file atomically, so the
ingress never reads half a file and two `keys add` never lose one another's key.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from filelock import FileLock, Timeout
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

KEY_PREFIX = "fs-"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # names are metric labels: no spaces, no quoting
LOCK_TIMEOUT_S = 10.0


class KeyFileError(Exception):
    """The key file cannot be read, parsed or changed as asked; the message says why."""


class StoredKey(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the key, hex")
    created: datetime
    requests_per_minute: int | None = Field(None, ge=1, description="null: the server's api_key_limits")
    max_concurrent: int | None = Field(None, ge=1, description="null: the server's api_key_limits")


class KeyFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    keys: list[StoredKey] = Field(default_factory=list)

    @field_validator("keys")
    @classmethod
    def _names_are_unique(cls, keys: list[StoredKey]) -> list[StoredKey]:
        names = [key.name for key in keys]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"key names must be unique; repeated: {duplicates}")
        return keys

    def named(self, name: str) -> StoredKey | None:
        return next((key for key in self.keys if key.name == name), None)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def read_keys(path: Path, missing_ok: bool = False) -> KeyFile:
    """The file's keys; a missing file is an empty one when `missing_ok`, else an error."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        if missing_ok:
            return KeyFile()
        raise KeyFileError(f"API key file {path} does not exist (create it with `fusionserve keys add`)") from None
    except OSError as exc:
        raise KeyFileError(f"API key file {path} cannot be read: {exc}") from None
    try:
        return KeyFile.model_validate_json(text)
    except ValidationError as exc:  # the first error without its input: the file's content stays out of logs
        raise KeyFileError(f"API key file {path} is not a valid key file: {_first_error(exc)}") from None


def add_key(
    path: Path, name: str | None = None, requests_per_minute: int | None = None, max_concurrent: int | None = None
) -> tuple[StoredKey, str]:
    """A new key stored in `path` (created if missing): (what is stored, the key itself)."""
    key = new_key()
    with _locked(path):
        keys = read_keys(path, missing_ok=True)
        name = name or _free_name(keys)
        if keys.named(name) is not None:
            raise KeyFileError(f"a key named {name!r} exists in {path}; revoke it first or choose another name")
        try:
            stored = StoredKey(
                name=name,
                sha256=hash_key(key),
                created=datetime.now(UTC).replace(microsecond=0),
                requests_per_minute=requests_per_minute,
                max_concurrent=max_concurrent,
            )
        except ValidationError as exc:
            raise KeyFileError(_first_error(exc)) from None
        _write(path, KeyFile(keys=[*keys.keys, stored]))
    return stored, key


def revoke_key(path: Path, name: str) -> None:
    """Remove the key `name`: the server refuses it from its next request on."""
    with _locked(path):
        keys = read_keys(path)
        if keys.named(name) is None:
            known = ", ".join(key.name for key in keys.keys) or "none"
            raise KeyFileError(f"no key named {name!r} in {path} (keys: {known})")
        _write(path, KeyFile(keys=[key for key in keys.keys if key.name != name]))


def _free_name(keys: KeyFile) -> str:
    number = len(keys.keys) + 1
    while keys.named(f"key-{number}") is not None:
        number += 1
    return f"key-{number}"


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"])
    return f"{where}: {error['msg']}" if where else error["msg"]


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    lock = FileLock(str(path.with_name(path.name + ".lock")), timeout=LOCK_TIMEOUT_S)
    try:
        lock.acquire()
    except Timeout:
        raise KeyFileError(f"{lock.lock_file} is held by another process; try again") from None
    try:
        yield
    finally:
        lock.release()


def _write(path: Path, keys: KeyFile) -> None:
    """Write to a temporary file beside `path`, then rename over it (readable by the owner only)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w") as file:  # mkstemp creates it 0600
            file.write(keys.model_dump_json(indent=2) + "\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
