"""The image formats restorecli writes and their file extensions, defined once.

`FORMATS` is the table; the writer (which Pillow encoder) and output planning (which extension an
output gets, which output names are writable) read the maps derived from it, so a new output format
is one row here plus its encoding in writing.py. `STDIO` is the file name that means stdin or stdout.
"""

from __future__ import annotations

STDIO = "-"

#: Format name -> (Pillow's format name, its extensions; the first is the one outputs get).
FORMATS: dict[str, tuple[str, tuple[str, ...]]] = {
    "png": ("PNG", (".png",)),
    "jpg": ("JPEG", (".jpg", ".jpeg")),
    "webp": ("WEBP", (".webp",)),
    "tif": ("TIFF", (".tif", ".tiff")),
}
#: Extension (lower case) -> format name: ".jpeg" -> "jpg".
WRITABLE_EXTENSIONS = {ext: name for name, (_, exts) in FORMATS.items() for ext in exts}
#: Format name or extension without the dot (lower case) -> the extension an output gets: "jpeg" -> ".jpg".
FORMAT_EXTENSIONS = {ext[1:]: exts[0] for _, exts in FORMATS.values() for ext in exts}
#: Format name or extension without the dot (lower case) -> Pillow's format name: "jpeg" -> "JPEG".
WRITE_FORMATS = {ext[1:]: pillow_name for pillow_name, exts in FORMATS.values() for ext in exts}
