"""Rows of a data source: a ``datasets`` dataset (hub or local folder), a local file, or a built-in corpus.

Every reader returns a :class:`Table`: plain row dicts, the column names and a short
description of where they came from for error messages. Reading problems (missing file,
a file that is not what its extension says, an unreachable hub, no rows) are DataErrors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from atp_ray.config import BuiltinSource, FileSource, HubSource, Source
from atp_ray.data import quizzes
from atp_ray.data.corpora import Row, hpo_rows, icd10cm_rows, licence_rows
from atp_ray.errors import DataError

BUILTIN_SOURCES: dict[str, Callable[[], list[Row]]] = {
    "hpo": hpo_rows,
    "icd10cm": icd10cm_rows,
    "licences": licence_rows,
    "hpo-term-quiz": quizzes.hpo_term_quiz,
    "icd10cm-chapter-quiz": quizzes.icd10cm_chapter_quiz,
}


@dataclass
class Table:
    """Rows of a source, with its columns and where it came from (for messages)."""

    rows: list[Row]
    columns: list[str]
    origin: str


def load_table(source: Source, limit: int | None = None) -> Table:
    """The first ``limit`` rows (all when None) of ``source``; DataError if there are none."""
    table = _READERS[source.kind](source, limit)
    if not table.rows:
        raise DataError(f"{table.origin}: the dataset is empty (no rows)")
    return table


# -- built-in corpora --------------------------------------------------------------------


def _builtin_table(source: BuiltinSource, limit: int | None) -> Table:
    if source.name not in BUILTIN_SOURCES:
        raise DataError(f"source: unknown built-in corpus {source.name!r}; built-in: {', '.join(BUILTIN_SOURCES)}")
    rows = BUILTIN_SOURCES[source.name]()[:limit]
    return Table(rows, list(rows[0]) if rows else [], f"built-in corpus {source.name!r}")


# -- local files -------------------------------------------------------------------------


def _read_jsonl(path: Path):
    import pyarrow.json

    return pyarrow.json.read_json(path)


def _read_csv(path: Path):
    import pyarrow.csv

    return pyarrow.csv.read_csv(path)


def _read_parquet(path: Path):
    import pyarrow.parquet

    return pyarrow.parquet.read_table(path)


FILE_READERS = {"jsonl": _read_jsonl, "csv": _read_csv, "parquet": _read_parquet}


def _file_table(source: FileSource, limit: int | None) -> Table:
    import pyarrow

    path = Path(source.path).expanduser()
    file_format = source.format or path.suffix.lstrip(".").lower()
    if file_format not in FILE_READERS:
        known = ", ".join(FILE_READERS)
        raise DataError(f"{path}: unknown file format {file_format!r}; set source.format to one of {known}")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    try:
        table = FILE_READERS[file_format](path)
    except (pyarrow.ArrowInvalid, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a valid {file_format} file ({err})") from None
    if limit is not None:
        table = table.slice(0, limit)
    return Table(table.to_pylist(), table.column_names, f"file {str(path)!r}")


# -- datasets: hub ids and local dataset folders ------------------------------------------


def _open_dataset(source: HubSource):
    import datasets

    folder = Path(source.name).expanduser()
    # load_dataset refuses a folder written by Dataset.save_to_disk; load_from_disk reads both kinds.
    if (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file():
        data = datasets.load_from_disk(str(folder))
        if isinstance(data, datasets.DatasetDict):
            if source.split not in data:
                raise DataError(f"{folder}: no split {source.split!r}; it has {', '.join(data)}")
            return data[source.split]
        return data
    return datasets.load_dataset(source.name, source.subset, split=source.split, revision=source.revision)


def _hub_table(source: HubSource, limit: int | None) -> Table:
    origin = f"dataset {source.name!r} (subset {source.subset}, split {source.split})"
    try:
        data = _open_dataset(source)
    except ConnectionError as err:
        raise DataError(
            f"{origin}: cannot reach the Hugging Face Hub ({err}); machines without hub access "
            "must point source.name at a local dataset folder (datasets save_to_disk) or use a file source"
        ) from None
    except (FileNotFoundError, ValueError) as err:
        raise DataError(f"{origin}: {err}") from None
    if limit is not None:
        data = data.select(range(min(limit, len(data))))
    return Table(data.to_list(), list(data.column_names), origin)


_READERS: dict[str, Callable[[Source, int | None], Table]] = {
    "builtin": _builtin_table,
    "file": _file_table,
    "hub": _hub_table,
}
