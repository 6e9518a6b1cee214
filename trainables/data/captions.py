"""Image-caption pairs for the contrastive (CLIP) setting.

A :class:`PairSet` is an :class:`ImageSet` whose rows also carry a caption: ``caption[i]`` is an
index into the shared caption table ``texts``. Many rows may share a caption (captions built
from class-name templates), and the contrastive loss treats equal captions as one text.
``class_captions[c]`` lists the table's captions of class ``c``'s name: a dirty-label attack
pairs its poisoned images with one of the target class's captions (:meth:`PairSet.poisoned_copy`).

Where pairs come from (``clip.captions``):

* ``templates``: every image of the data set's training split with a caption drawn from the
  class-name templates (several per class), seeded;
* a ``.tsv``/``.csv`` file (CC3M style: one row per pair, a header naming the image-path column,
  ``filepath``/``image``/``path``, and the caption column, ``title``/``caption``/``text``; paths
  relative to the file's folder);
* a folder of ``NAME.<image>`` files each with a ``NAME.txt`` caption beside it.

Files are checked before any work (:func:`check_caption_source`: a missing image or caption fails
naming the field and the first missing paths); images are decoded once and resized to the run's
square side, as uint8, with label -1 (no class).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ConfigError
from .base import ImageSet

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif")
PATH_COLUMNS = ("filepath", "image", "path", "image_path", "file")
CAPTION_COLUMNS = ("title", "caption", "text")
UNLABELLED = -1
DEFAULT_CAPTION_TEMPLATES = (
    "a photo of a {class}.",
    "a blurry photo of a {class}.",
    "a low resolution photo of the {class}.",
    "a picture of a {class}.",
    "an image showing a {class}.",
    "a close-up photo of the {class}.",
)


def fill(template: str, name: str) -> str:
    """``template`` with ``{class}`` replaced by the class name (no str.format: braces elsewhere stay)."""
    return template.replace("{class}", name.replace("_", " "))


def check_templates(templates: list[str] | tuple[str, ...], path: str) -> None:
    if not templates:
        raise ConfigError(f"{path}: [] is not allowed; allowed: one or more templates containing '{{class}}'")
    for t in templates:
        if not isinstance(t, str) or "{class}" not in t:
            raise ConfigError(f"{path}: {t!r} has no '{{class}}' placeholder; allowed: text containing '{{class}}', "
                              "e.g. 'a photo of a {class}.'")


@dataclass
class PairSet(ImageSet):
    """Images, labels (``-1``: none) and caption indices into ``texts``."""

    caption: torch.Tensor | None = None
    texts: tuple[str, ...] = ()
    class_captions: torch.Tensor | None = None  # (classes, templates): caption indices of each class name

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.caption is None or self.caption.dim() != 1 or len(self.caption) != len(self.x):
            raise ValueError(f"captions must be (N,) indices with N={len(self.x)}")
        self.caption = self.caption.long()
        if len(self.caption) and int(self.caption.max()) >= len(self.texts):
            raise ValueError(f"caption index {int(self.caption.max())} outside the table of {len(self.texts)}")

    def _like(self, x: torch.Tensor, y: torch.Tensor, caption: torch.Tensor) -> "PairSet":
        return PairSet(x, y, caption=caption, texts=self.texts, class_captions=self.class_captions)

    def subset(self, index: torch.Tensor) -> "PairSet":
        index = index.to(self.x.device)
        return self._like(self.x[index], self.y[index], self.caption[index.to(self.caption.device)])

    def to(self, device: torch.device | str) -> "PairSet":
        return self._like(self.x.to(device, non_blocking=True), self.y.to(device, non_blocking=True),
                          self.caption.to(device, non_blocking=True))

    def images(self) -> ImageSet:
        return ImageSet(self.x, self.y)

    def poisoned_copy(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, target: int | None,
                      generator: torch.Generator) -> "PairSet":
        """Rows at ``index`` paired with one of the target class's captions (drawn from
        ``generator``); ``target`` None (clean-label) keeps the captions."""
        caption = self.caption.clone()
        if target is not None and len(index):
            if self.class_captions is None or not 0 <= target < len(self.class_captions):
                raise ValueError(f"no captions for target class {target}")
            choices = self.class_captions[target]
            pick = torch.randint(len(choices), (len(index),), generator=generator)
            caption[index.to(caption.device)] = choices[pick].to(caption.device)
        return self._like(x, y, caption)

    def fingerprint(self) -> str:
        import hashlib

        h = hashlib.sha256(super().fingerprint().encode())
        h.update(self.caption.cpu().numpy().tobytes())
        h.update("\n".join(self.texts).encode())
        return h.hexdigest()[:16]


def caption_table(classes: list[str], templates: list[str] | tuple[str, ...]) -> tuple[list[str], torch.Tensor]:
    """The templated captions of every class and their (classes, templates) index table."""
    texts = [fill(t, c) for c in classes for t in templates]
    return texts, torch.arange(len(texts)).view(len(classes), len(templates))


def templated_pairs(images: ImageSet, classes: list[str], templates: list[str] | tuple[str, ...],
                    generator: torch.Generator) -> PairSet:
    """Every image with one of its class's templated captions, drawn uniformly."""
    texts, table = caption_table(classes, templates)
    pick = torch.randint(len(templates), (len(images),), generator=generator)
    caption = table[images.y.cpu(), pick]
    return PairSet(images.x, images.y, caption=caption.to(images.x.device), texts=tuple(texts), class_captions=table)


# -- pairs read from files -------------------------------------------------------------------------


def _read_table(path: Path, field: str) -> list[tuple[Path, str]]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh, delimiter=delimiter)
            columns = [c.strip().lower() for c in (reader.fieldnames or [])]
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(f"{field}: {str(path)!r} is not a readable {path.suffix} file ({exc})") from None
    by_lower = {c.strip().lower(): c for c in (reader.fieldnames or [])}
    img_col = next((by_lower[c] for c in PATH_COLUMNS if c in columns), None)
    cap_col = next((by_lower[c] for c in CAPTION_COLUMNS if c in columns), None)
    if img_col is None or cap_col is None:
        raise ConfigError(f"{field}: {str(path)!r} has columns {columns}; allowed: a header with an image-path column "
                          f"({', '.join(PATH_COLUMNS)}) and a caption column ({', '.join(CAPTION_COLUMNS)})")
    out = []
    for row in rows:
        p = Path((row.get(img_col) or "").strip())
        out.append((p if p.is_absolute() else path.parent / p, (row.get(cap_col) or "").strip()))
    return out


def _read_folder(root: Path, field: str) -> list[tuple[Path, str]]:
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    captions = sorted(p for p in root.rglob("*.txt") if p.is_file())
    stems = {p.with_suffix("") for p in images}
    orphans = [p for p in captions if p.with_suffix("") not in stems]
    if orphans:
        raise ConfigError(f"{field}: {len(orphans)} caption files in {str(root)!r} have no image beside them "
                          f"(e.g. {', '.join(str(p) for p in orphans[:3])}); allowed: NAME.txt next to NAME.<image>")
    pairs = []
    missing = []
    for img in images:
        txt = img.with_suffix(".txt")
        if not txt.is_file():
            missing.append(txt)
            continue
        pairs.append((img, txt.read_text(encoding="utf-8", errors="replace").strip()))
    if missing:
        raise ConfigError(f"{field}: {len(missing)} images in {str(root)!r} have no caption file "
                          f"(e.g. {', '.join(str(p) for p in missing[:3])}); allowed: NAME.txt next to NAME.<image>")
    return pairs


def list_pairs(source: str, field: str) -> list[tuple[Path, str]]:
    """(image path, caption) of every pair ``source`` (a .tsv/.csv file or a folder) names,
    each image checked to exist: a ConfigError naming ``field`` otherwise. Nothing is decoded."""
    path = Path(source).expanduser()
    if path.is_dir():
        pairs = _read_folder(path, field)
    elif path.is_file() and path.suffix.lower() in (".tsv", ".csv"):
        pairs = _read_table(path, field)
    elif path.suffix.lower() in (".tsv", ".csv"):
        raise ConfigError(f"{field}: {source!r} does not exist; allowed: 'templates', a .tsv/.csv file of image paths "
                          "and captions, or a folder of image and caption files")
    else:
        raise ConfigError(f"{field}: {source!r} is neither 'templates', an existing .tsv/.csv file nor a folder")
    if not pairs:
        raise ConfigError(f"{field}: {source!r} holds no image-caption pairs")
    missing = [p for p, _ in pairs if not p.is_file()]
    if missing:
        raise ConfigError(f"{field}: {len(missing)} of {len(pairs)} images named in {source!r} are missing "
                          f"(e.g. {', '.join(str(p) for p in missing[:3])})")
    empty = [p for p, c in pairs if not c]
    if empty:
        raise ConfigError(f"{field}: {len(empty)} pairs in {source!r} have an empty caption "
                          f"(e.g. the one of {empty[0]})")
    return pairs


def file_pairs(source: str, side: int, classes: list[str], templates: list[str] | tuple[str, ...],
               field: str = "clip.captions") -> PairSet:
    """The pairs ``source`` names, decoded to uint8 (N, 3, side, side), unlabelled; the caption table
    also holds the templated captions of ``classes`` (what a dirty-label attack pairs its images with)."""
    from PIL import Image, UnidentifiedImageError

    pairs = list_pairs(source, field)
    x = torch.empty(len(pairs), 3, side, side, dtype=torch.uint8)
    for i, (p, _) in enumerate(pairs):
        try:
            with Image.open(p) as im:
                im = im.convert("RGB").resize((side, side), Image.BILINEAR)
                x[i] = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(side, side, 3).permute(2, 0, 1)
        except (OSError, UnidentifiedImageError) as exc:
            raise ConfigError(f"{field}: {str(p)!r} is not a readable image ({exc})") from None
    own = sorted({c for _, c in pairs})
    templated, table = caption_table(classes, templates)
    texts = own + [t for t in templated if t not in set(own)]
    index = {t: i for i, t in enumerate(texts)}
    caption = torch.tensor([index[c] for _, c in pairs], dtype=torch.long)
    class_captions = torch.tensor([[index[templated[int(j)]] for j in row] for row in table], dtype=torch.long)
    return PairSet(x, torch.full((len(pairs),), UNLABELLED, dtype=torch.long), caption=caption, texts=tuple(texts),
                   class_captions=class_captions)
