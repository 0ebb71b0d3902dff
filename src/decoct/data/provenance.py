"""Where a set's or a teacher's data lives, and how a later command finds it again.

A set (``manifest.json`` ``meta.data_source``) and a teacher (``teacher.json`` ``data_source``)
record the registry name and the absolute data root their data was loaded from, e.g.
``{"registry": "imagefolder", "root": "/data/flowers"}`` (``root`` is None when the data was
found on the default search roots). The name in a :class:`~decoct.data.DatasetInfo` is not a
registry name for an image-folder tree (it is the folder's name), so it cannot be used to find
the data again. ``--dataset`` and ``--data-root`` override what was recorded; whatever is loaded
must have the recorded classes and image shape.

Sets and teachers made before the record existed fall back to the name in their info (right for
every registered dataset) or, for sets made by the CLI, the ``dataset``/``data_root`` of their
saved config; for an image-folder tree the error says which flags to pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from decoct.data import DATASETS, Dataset, DatasetInfo, load_dataset
from decoct.data.sources import DataNotFoundError

SOURCE_KEY = "data_source"


def read_source(record: Any, where: str) -> dict[str, Any] | None:
    """The validated ``data_source`` entry of a manifest's meta or a teacher.json (None if absent).

    The entry comes from a file a user may have edited, so its shape is checked: a mapping with
    a string ``registry``, a string or null ``root`` and an optional ``options`` mapping.
    """
    if record is None:
        return None
    ok = (isinstance(record, Mapping) and isinstance(record.get("registry"), str)
          and isinstance(record.get("root"), (str, type(None))) and isinstance(record.get("options", {}), Mapping))
    if not ok:
        raise ValueError(f"{where}: '{SOURCE_KEY}' must be {{\"registry\": NAME, \"root\": PATH or null}}, "
                         f"got {str(record)[:80]!r}; fix the entry or pass --dataset NAME --data-root DIR")
    return {"registry": record["registry"], "root": record["root"], "options": dict(record.get("options", {}))}


def legacy_source(config: Any) -> dict[str, Any] | None:
    """The source a CLI run's saved config implies (``dataset`` + an absolute ``data_root``), for
    sets made before ``data_source`` was recorded; None when the config names no registered dataset."""
    if not isinstance(config, Mapping):
        return None
    name, root = config.get("dataset"), config.get("data_root")
    if not isinstance(name, str) or name.lower() not in DATASETS:
        return None
    root = root if isinstance(root, str) and Path(root).expanduser().is_absolute() else None
    return {"registry": name.lower(), "root": root, "options": {}}


def resolve_source(info: DatasetInfo, recorded: dict[str, Any] | None, *, dataset: str | None = None,
                   data_root: str | None = None, what: str = "the set") -> tuple[str, str | None, dict[str, Any]]:
    """``(registry name, root, loader options)`` to load the data of ``what`` (made for ``info``).

    ``dataset``/``data_root`` (the command's flags) override the recorded source; the recorded
    root is used only with the recorded registry name. Raises when the data cannot be found:
    an unregistered name with no record, or a recorded root that no longer exists.
    """
    rec = recorded or {}
    registry = dataset or rec.get("registry") or info.name
    if registry.lower() not in DATASETS:
        if dataset is None and not rec:
            raise ValueError(
                f"{what} was made from the data {info.name!r}, which is not a registered dataset name and "
                f"records no data source (an image-folder tree?); pass --dataset imagefolder --data-root DIR "
                f"(DIR holding train/<class>/ and test/<class>/)")
        known = ", ".join(DATASETS.names())
        raise ValueError(f"unknown dataset {registry!r} for {what}; known: {known}")
    same = rec.get("registry", "").lower() == registry.lower()
    options = dict(rec.get("options", {})) if same else {}
    if data_root is not None:
        return registry, data_root, options
    root = rec.get("root") if same else None
    if root is not None and not Path(root).expanduser().exists():
        raise DataNotFoundError(
            f"{what} was made from {registry} data at {root}, which does not exist any more; "
            f"pass --data-root DIR where that data is now")
    return registry, root, options


def check_same_data(expected: DatasetInfo, got: DatasetInfo, what: str, loaded: str) -> None:
    """Raise unless the loaded data has the classes (in order) and image shape ``what`` was made for."""
    if tuple(expected.classes) != tuple(got.classes):
        n1, n2 = expected.num_classes, got.num_classes
        i = next((k for k, (a, b) in enumerate(zip(expected.classes, got.classes, strict=False)) if a != b),
                 min(n1, n2))
        first = (f"; the class lists differ first at index {i} "
                 f"({_at(expected.classes, i)} vs {_at(got.classes, i)})")
        raise ValueError(f"{what} is for {expected.name!r} with {n1} classes, the data loaded ({loaded}) is "
                         f"{got.name!r} with {n2}{first}; pass the --dataset/--data-root it was made from")
    if expected.image_shape != got.image_shape:
        raise ValueError(f"{what} is for {expected.name!r} images {expected.image_shape}, the data loaded "
                         f"({loaded}) is {got.name!r} with images {got.image_shape}; pass the "
                         "--dataset/--data-root it was made from")


def _at(classes: tuple[str, ...], i: int) -> str:
    return repr(classes[i][:40]) if i < len(classes) else "none"


def load_for(info: DatasetInfo, recorded: dict[str, Any] | None, *, dataset: str | None = None,
             data_root: str | None = None, download: bool = False, what: str = "the set",
             options: dict[str, Any] | None = None) -> Dataset:
    """Load the data a set or teacher made for ``info`` needs (see :func:`resolve_source`), checked
    to have the same classes and image shape. ``options`` (the command's ``--data-mode``,
    ``--workers``, ...) override the recorded loader options."""
    registry, root, recorded_options = resolve_source(info, recorded, dataset=dataset, data_root=data_root, what=what)
    data = load_dataset(registry, root=root, download=download, **{**recorded_options, **(options or {})})
    check_same_data(info, data.info, what, f"{registry}" + (f" at {root}" if root else ""))
    return data


__all__ = ["SOURCE_KEY", "check_same_data", "legacy_source", "load_for", "read_source", "resolve_source"]
