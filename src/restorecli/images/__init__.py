"""Reading and writing images of every mode: safely, atomically, with clear errors.

`read_image` turns whatever Pillow opens into what the model needs, upright sRGB pixels (uint8, or
uint16 for 16-bit sources) and a separate alpha plane; `write_image` writes the result back all or
nothing, keeping alpha, 16 bits, the ICC profile and EXIF where the format can hold them. A bad input
raises `InputError(path, reason)`, a failed write `OutputError`. The library never prints: warnings
go to ``logging.getLogger("restorecli.images")``.

Modules, in the order an image passes through them: reading (open, size limits, stdin), modes
(Pillow modes -> colour and alpha planes), colour (ICC profile -> sRGB), exif (orientation), pixels
(integers <-> the pipeline's floats), writing (encoding), png16 and tiff (the writers Pillow lacks),
atomic (temp file + rename), formats (the writable formats and their extensions) and reasons (how a
failure's detail is worded).
"""

import importlib

# Public name -> the module that defines it. Loaded on first use, so that run/outputs.py (imported by
# the CLI at start-up) can read the formats table without importing numpy and Pillow.
_EXPORTS = {
    "TEMP_FILE_GLOB": "atomic",
    "TEMP_FILE_PATTERN": "atomic",
    "TEMP_FILE_SUFFIX": "atomic",
    "is_temp_file": "atomic",
    "remove_stale_temp_files": "atomic",
    "srgb_profile_bytes": "colour",
    "STDIO": "formats",
    "WRITE_FORMATS": "formats",
    "from_float": "pixels",
    "resize_alpha": "pixels",
    "to_float": "pixels",
    "to_gray": "pixels",
    "DEFAULT_MAX_PIXELS": "reading",
    "LoadedImage": "reading",
    "Source": "reading",
    "is_image_file": "reading",
    "probe": "reading",
    "read_image": "reading",
    "DEFAULT_QUALITY": "writing",
    "encode_image": "writing",
    "output_format": "writing",
    "write_image": "writing",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
