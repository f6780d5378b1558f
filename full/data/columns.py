"""Which columns of a source hold the images, the label and the caption: the trainers' column flags.

Inside `full/data` every row has the canonical names of the two schemas (docs/conventions.md §10): pairs ``jpg_0, jpg_1,
label_0, caption`` (Pick-a-Pic v2) and binary feedback ``image, caption, label``. A source that names them otherwise
is read with these flags (diffusers' names where its scripts have one), and the readers rename its columns:

    --caption_column prompt                     the prompt (diffusers' text-to-image flag)
    --image_column file                         binary feedback: the image (diffusers' text-to-image flag)
    --pair_image_columns image_a image_b        pairs: the two images, in the order the label refers to
    --label_column preferred                    pairs: 1 the first image won, 0 the second, 0.5 a tie;
                                                binary feedback: 1 desirable, 0 undesirable

A column that is not in the source fails before the model loads, with one line that names the flag, the file and
the columns that are there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

# canonical name -> the flag that renames it; the defaults are the canonical names themselves
FLAGS = {"caption": "--caption_column", "image": "--image_column", "jpg_0": "--pair_image_columns",
         "jpg_1": "--pair_image_columns", "label_0": "--label_column", "label": "--label_column"}


class ColumnMap(dict):
    """``{canonical name: column of the source}`` for one schema; ``flagged`` holds the canonical names whose column
    was given on the command line (a message then says "--caption_column prompt" rather than "the default").
    ``flags``: the flags of names that are not in `FLAGS` (a converter's --score_column)."""

    def __init__(self, names: Mapping[str, str], flagged: Sequence[str] = (), flags: Mapping[str, str] | None = None):
        super().__init__(names)
        self.flagged = frozenset(flagged)
        self.flags = {**FLAGS, **(flags or {})}

    @property
    def sources(self) -> list[str]:
        return list(self.values())

    def missing(self, present: Sequence[str]) -> list[str]:
        """Canonical names whose source column is not in ``present``."""
        return [name for name, source in self.items() if source not in present]

    def describe(self, name: str) -> str:
        """How the user asked for a canonical column: ``--caption_column prompt`` or ``'caption' (the default of
        --caption_column)``."""
        flag = self.flags.get(name)
        if flag is None:  # a plain list of names (e.g. SPO's prompt column): no flag to name
            return repr(self[name])
        if name in self.flagged:
            value = " ".join(self[n] for n in ("jpg_0", "jpg_1")) if flag == "--pair_image_columns" else self[name]
            return f"{flag} {value}"
        return f"{self[name]!r} (the default of {flag})"


def as_column_map(columns: Sequence[str] | Mapping[str, str]) -> ColumnMap:
    """A plain list of names reads the columns as they are named."""
    return columns if isinstance(columns, ColumnMap) else ColumnMap(
        dict(columns) if isinstance(columns, Mapping) else {name: name for name in columns})


def missing_columns_message(columns: ColumnMap, present: Sequence[str], where: str) -> str | None:
    """One line naming each missing column's flag and listing the columns ``where`` has; None if nothing is missing."""
    missing = columns.missing(present)
    if not missing:
        return None
    asked = "; ".join(dict.fromkeys(columns.describe(name) for name in missing))  # jpg_0/jpg_1 share one flag
    return f"{where} is missing column(s): {asked}; it has {list(present)}"


def column_map(schema: str, *, caption: str | None = None, image: str | None = None,
               pair_images: Sequence[str] | None = None, label: str | None = None) -> ColumnMap:
    """The `ColumnMap` of ``schema`` ("pairs" or "feedback") from the column flags' values (None: the canonical
    name); entry points without the flags (the cache builder, SPM) read the canonical names."""
    if schema == "pairs":
        given = {"caption": caption, "jpg_0": pair_images and pair_images[0], "jpg_1": pair_images and pair_images[1],
                 "label_0": label}
        order = ("jpg_0", "jpg_1", "label_0", "caption")
    else:
        given = {"caption": caption, "image": image, "label": label}
        order = ("image", "caption", "label")
    return ColumnMap({name: given[name] or name for name in order}, [name for name in order if given[name]])
