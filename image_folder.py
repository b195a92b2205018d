"""A folder of images as a random-access source (`data.name='folder'`, `data.path=DIR`).

Layout (files are found recursively, in sorted path order; hidden files and folders are skipped):

    DIR/cat/0001.png            data.folder_labels='subdirs': the label is the index of the
    DIR/cat/0001.txt            immediate sub-directory ("cat") among DIR's sorted
    DIR/dog/2019/0002.jpg       sub-directories; deeper folders belong to their top class.
    DIR/captions.jsonl          data.folder_labels='none': every image has label 0.

Captions (data.captions='dataset'): a sidecar `.txt` beside each image (same name, UTF-8, the
whole file stripped), or one `DIR/captions.jsonl` (objects {"file_name": "cat/0001.png",
"caption": "..."}; "text" is accepted for "caption") or `DIR/captions.csv` (a header row with
file_name and caption or text). Every image needs one.

The class map (name -> label) is written to `<workdir>/label_map.json` on the first run and
compared on every later one: a changed set of class folders would silently re-label a trained
model, so it stops the run before anything is compiled.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence

import numpy as np

from errors import UserError
from images import DECODE_ERRORS, IMAGE_EXTENSIONS, DecodingSource, ImageSpec, fit

FOLDER = "folder"
FOLDER_LABELS = ("none", "subdirs")
CAPTION_FILES = ("captions.jsonl", "captions.csv")
LABEL_MAP_FILE = "label_map.json"
_PROBE = 16  # files decoded when the folder is opened: a folder of non-images fails there


class ImageFolderError(UserError):
    """data.path is missing, holds no images, or its labels or captions cannot be used."""


class LabelMapChangedError(UserError):
    """The class folders differ from those the workdir's model was trained with."""


def _scan(root: str) -> tuple[list[str], list[str]]:
    """(image paths relative to root, other file names), both sorted; hidden entries skipped."""
    found, others = [], []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            (found if name.lower().endswith(IMAGE_EXTENSIONS) else others).append(rel)
    return sorted(found), others


def _read_caption_file(root: str) -> dict[str, str] | None:
    """{relative path: caption} from DIR/captions.jsonl or .csv; None when neither exists."""
    for name in CAPTION_FILES:
        path = os.path.join(root, name)
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8", newline="") as f:
            if name.endswith(".jsonl"):
                rows = [json.loads(line) for line in f if line.strip()]
            else:
                rows = list(csv.DictReader(f))
        out = {}
        for n, row in enumerate(rows, 1):
            text = row.get("caption", row.get("text"))
            if "file_name" not in row or text is None:
                raise ImageFolderError(
                    f"{path}, row {n}, has no 'file_name' and 'caption' (or 'text'): {row}. Fix: "
                    f"give every row both, e.g. {{\"file_name\": \"cat/1.png\", \"caption\": "
                    f"\"a cat\"}}.")
            out[os.path.normpath(row["file_name"])] = str(text)
        return out
    return None


def _sidecar(root: str, rel: str) -> str | None:
    path = os.path.join(root, os.path.splitext(rel)[0] + ".txt")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


def read_captions(root: str, files: Sequence[str]) -> list[str]:
    """One caption per file: the caption file's, else the sidecar .txt's (module doc)."""
    table = _read_caption_file(root)
    captions, missing = [], []
    for rel in files:
        text = table.get(os.path.normpath(rel)) if table is not None else _sidecar(root, rel)
        if text is None:
            missing.append(rel)
        captions.append(text or "")
    if missing:
        where = (f"{os.path.join(root, CAPTION_FILES[0])} (or .csv)" if table is not None
                 else "a sidecar .txt beside each image")
        raise ImageFolderError(
            f"data.captions='dataset': {len(missing)} of the {len(files)} images in "
            f"data.path={root!r} have no caption in {where}, e.g. {missing[0]}. Fix: caption "
            f"every image, or train without text (--config.data.captions='').")
    return captions


class FolderSource(DecodingSource):
    """Random access to the images of a folder (module doc), decoded and fitted on read."""

    def __init__(self, root: str, spec: ImageSpec, *, labels: str = "none",
                 on_bad_image: str = "skip", captions: bool = False, threads: int = 0,
                 cache_mb: int = 0):
        super().__init__(threads, cache_mb)
        self.root, self.spec, self.on_bad_image = os.path.expanduser(root), spec, on_bad_image
        if not os.path.isdir(self.root):
            raise ImageFolderError(f"data.path={root!r} is not a folder. Fix: "
                                   f"--config.data.path=DIR, a folder of images.")
        self.files, others = _scan(self.root)
        if not self.files:
            seen = f"; it holds {len(others)} other files, e.g. {others[0]}" if others else ""
            raise ImageFolderError(
                f"data.path={root!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}, searched "
                f"recursively){seen}. Fix: point --config.data.path at a folder of images.")
        self.class_names: list[str] = []
        self.labels = np.zeros(len(self.files), np.int32)
        if labels == "subdirs":
            top = [rel.split(os.sep)[0] if os.sep in rel else None for rel in self.files]
            loose = [rel for rel, t in zip(self.files, top, strict=True) if t is None]
            if loose:
                raise ImageFolderError(
                    f"data.folder_labels='subdirs' labels each image by its sub-directory of "
                    f"data.path={root!r}, but {len(loose)} images lie directly in it, e.g. "
                    f"{loose[0]}. Fix: move them into class folders, or "
                    f"--config.data.folder_labels=none.")
            self.class_names = sorted(set(top))
            index = {name: i for i, name in enumerate(self.class_names)}
            self.labels = np.asarray([index[t] for t in top], np.int32)
        self.captions = read_captions(self.root, self.files) if captions else None
        self._probe()

    def _probe(self) -> None:
        """Decodes the first files: a folder of non-images fails here, before any compile."""
        probe = self.files[:_PROBE]
        errors = []
        for i in range(len(probe)):
            (payload,), _ = self.payloads([i])
            try:
                fit(payload, self.spec)
                return
            except DECODE_ERRORS as e:
                errors.append(e)
                self._mark_bad(i, e)  # stops here with on_bad_image='stop'
        raise ImageFolderError(
            f"none of the first {len(probe)} files of data.path={self.root!r} can be read as an "
            f"image, e.g. {probe[0]} ({errors[0]}). Fix: point --config.data.path at a folder "
            f"of PNG/JPEG/WebP/BMP images.")

    def __len__(self) -> int:
        return len(self.files)

    def describe(self, index: int) -> str:
        return os.path.join(self.root, self.files[index])

    def payloads(self, indices: Sequence[int]) -> tuple[list, np.ndarray]:
        out = []
        for i in indices:
            try:
                with open(os.path.join(self.root, self.files[i]), "rb") as f:
                    out.append(f.read())
            except OSError as e:
                out.append(e)  # images.fit raises it: handled as an unreadable file
        return out, self.labels[np.asarray(indices, np.int64)]

    def label_map(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.class_names)}


def check_label_map(source: FolderSource, workdir: str, num_classes: int, *,
                    write: bool = True) -> None:
    """Fails (before any compile) when the classes do not fit the model or the workdir's run.

    model.num_classes must be 0 (unconditional) or the number of class folders. The map is
    written to <workdir>/label_map.json the first time (by process 0: `write`) and compared
    every later time."""
    names = source.class_names
    if num_classes and num_classes != len(names):
        raise ImageFolderError(
            f"model.num_classes={num_classes}, but data.path={source.root!r} has {len(names)} "
            f"classes with data.folder_labels="
            f"{'subdirs' if names else 'none'}{': ' + ', '.join(names[:5]) if names else ''}"
            f"{'...' if len(names) > 5 else ''}. Fix: --config.model.num_classes={len(names)}"
            f"{'' if names else ' needs --config.data.folder_labels=subdirs'}, or 0 for an "
            f"unconditional model.")
    path = os.path.join(workdir, LABEL_MAP_FILE)
    current = source.label_map()
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)["classes"]
        if saved != current:
            added = sorted(set(current) - set(saved))
            removed = sorted(set(saved) - set(current))
            raise LabelMapChangedError(
                f"the class folders of data.path={source.root!r} differ from those this workdir "
                f"was trained with ({path}): added {added}, removed {removed}"
                f"{', renumbered' if not (added or removed) else ''}; the model's labels would "
                f"mean other classes. Fix: restore the class folders the run started with, or "
                f"train in a new --workdir.")
    elif write:
        os.makedirs(workdir, exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"path": source.root, "classes": current}, f, indent=1)
        os.replace(tmp, path)
