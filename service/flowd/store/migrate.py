"""Migration files: discovery, ordering and checksums. Running them is the Postgres store's job.

Files are ``migrations/NNNN_name.sql``, numbered from 0001 without gaps, never edited once
applied (the recorded checksum would no longer match and ``migrate`` refuses to go on).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

_NAME: Final = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    """One SQL file."""

    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        """sha256 of the file's text."""
        return hashlib.sha256(self.sql.encode()).hexdigest()


class MigrationError(Exception):
    """The migration files or the database's record of them are inconsistent."""


def directory() -> Path:
    """Where the SQL files are: inside the installed wheel, or the repository's migrations/."""
    here = Path(__file__).resolve().parent.parent
    packaged = here / "_migrations"
    return packaged if packaged.is_dir() else here.parent.parent / "migrations"


def load(path: Path | None = None) -> list[Migration]:
    """All migrations in version order; the numbering must be contiguous from 1."""
    found: list[Migration] = []
    for file in sorted((path or directory()).glob("*.sql")):
        match = _NAME.match(file.name)
        if match is None:
            raise MigrationError(f"badly named migration file {file.name}")
        found.append(Migration(int(match[1]), match[2], file.read_text(encoding="utf-8")))
    for expected, migration in enumerate(found, start=1):
        if migration.version != expected:
            raise MigrationError(f"migration {expected:04d} is missing")
    if not found:
        raise MigrationError(f"no migration files in {path or directory()}")
    return found


def pending(migrations: list[Migration], applied: dict[int, str]) -> list[Migration]:
    """Migrations not yet applied; raises if an applied one changed or is unknown."""
    known = {m.version: m for m in migrations}
    for version, checksum in applied.items():
        migration = known.get(version)
        if migration is None:
            raise MigrationError(
                f"database has migration {version:04d} that this flowd does not know; "
                "it is older than the schema"
            )
        if migration.checksum != checksum:
            raise MigrationError(
                f"migration {version:04d}_{migration.name} changed after it was applied"
            )
    return [m for m in migrations if m.version not in applied]
