"""Settings: one frozen dataclass tree for a restoration call (`RestoreSettings`) and one for building a
pipeline (`LoadSettings`), the defaults of each version and task, and the enumerated choices.

    from restorecli.settings import default_settings
    s = default_settings("v2", "sr").replace(steps=20, restoration_guidance=0.5)
"""

from .choices import (
    CAPTIONERS, COLOR_FIXES, DEVICES, GUIDANCE_LOSSES, GUIDANCE_SPACES, LLAVA_BITS, PRECISIONS, SAMPLERS, START_POINTS,
    TASKS, VERSIONS, Captioner, ColorFix, FaceDetector, FaceParser, GuidanceLoss, GuidanceSpace, LlavaBit, Precision, Sampler, StartPoint, Task,
    Version,
)
from .defaults import VERSION_DEFAULTS, default_captioner, default_settings, version_of
from .spec import Leaf, SettingError, SettingSpec, leaves, setting
from .tree import (
    DEFAULT_NEG_PROMPT, DEFAULT_POS_PROMPT, FaceSettings, GuidanceSettings, LoadSettings, PromptSettings, RestoreSettings,
    SamplerSettings, TileSettings, flat_settings, parse_size, replace_settings,
)

__all__ = [
    "CAPTIONERS", "LLAVA_BITS", "LlavaBit", "default_captioner", "COLOR_FIXES", "DEVICES", "GUIDANCE_LOSSES", "GUIDANCE_SPACES", "PRECISIONS", "SAMPLERS", "START_POINTS", "TASKS",
    "VERSIONS", "Captioner", "ColorFix", "GuidanceLoss", "GuidanceSpace", "Precision", "Sampler", "StartPoint", "Task",
    "Version", "FaceDetector", "FaceParser", "FaceSettings", "VERSION_DEFAULTS", "default_settings", "version_of", "Leaf", "SettingError", "SettingSpec", "leaves",
    "setting", "DEFAULT_NEG_PROMPT", "DEFAULT_POS_PROMPT", "GuidanceSettings", "LoadSettings", "PromptSettings",
    "RestoreSettings", "SamplerSettings", "TileSettings", "flat_settings", "parse_size", "replace_settings",
]
