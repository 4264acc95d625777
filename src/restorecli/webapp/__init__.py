"""`restore ui`: a local web app (Gradio) on the same library and settings as the CLI.

`form` generates the page's fields from the settings tree and writes the equivalent command line;
`jobs` holds the loaded models and runs one job with the CLI's per-file steps (same bytes as
`restore`); `app` is the Gradio page (import it only with the `restorecli[ui]` extra installed).
"""

from .form import MAIN, Field, command_line, field_defaults, fields, settings_from_form
from .jobs import ImageResult, Models, Outcome, Upload, Workspace, restore_uploads

__all__ = ["MAIN", "Field", "command_line", "field_defaults", "fields", "settings_from_form", "ImageResult",
           "Models", "Outcome", "Upload", "Workspace", "restore_uploads"]
