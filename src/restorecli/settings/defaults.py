"""The defaults of each model version and task: the one table the CLI, the library and the web app use.

v1, v2.1 and custom models take the HEAD command-line defaults of the official `inference.py` (the same
for every version there; the captioner is florence2 where upstream's is llava); v2 takes the README's
"ECCV paper version" invocation (spaced, 50 steps, cfg 4, its negative prompt, empty positive prompt,
no captioner). `--upscale` is 4 for `sr` and `unaligned_face`
and 1 for `denoise` and `face` (the official default is 4 for every task; its README passes 1 there).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .choices import VERSIONS
from .tree import DEFAULT_NEG_PROMPT, DEFAULT_POS_PROMPT, PromptSettings, RestoreSettings, SamplerSettings

#: The v2 "ECCV paper version" invocation of the HEAD README (and the v2-era CLI defaults).
V2_NEG_PROMPT = "low quality, blurry, low-resolution, noisy, unsharp, weird textures"


@dataclass(frozen=True)
class VersionDefaults:
    sampler: str
    steps: int
    cfg: float
    prompt: str
    negative_prompt: str
    captioner: str = "florence2"


#: HEAD's captioner default is llava (LLaVA-1.5-7B, 4-bit); ours is the lighter florence2, and
#: `captioner="llava"` reproduces upstream's. The v2 invocation of the README passes `--captioner none`.
HEAD_DEFAULTS = VersionDefaults("edm_dpm++_3m_sde", 10, 6.0, DEFAULT_POS_PROMPT, DEFAULT_NEG_PROMPT, "florence2")
VERSION_DEFAULTS = {
    "v1": HEAD_DEFAULTS,
    "v2": VersionDefaults("spaced", 50, 4.0, "", V2_NEG_PROMPT, "none"),
    "v2.1": HEAD_DEFAULTS,
    "custom": HEAD_DEFAULTS,
}
TASK_UPSCALE = {"sr": 4.0, "unaligned_face": 4.0, "denoise": 1.0, "face": 1.0}


def version_of(model: str) -> str:
    """v1 | v2 | v2.1 for a pinned version, "custom" for a model description file."""
    return model if model in VERSIONS else "custom"


def default_captioner(load) -> str:
    """The captioner a `LoadSettings` asks for: its own, else its version's default."""
    if load.captioner is not None:
        return load.captioner
    return VERSION_DEFAULTS[version_of(load.model)].captioner


def default_settings(version: str = "v2.1", task: str = "sr") -> RestoreSettings:
    """The settings a run of `version` (v1, v2, v2.1, custom) and `task` uses when nothing is overridden."""
    if version not in VERSION_DEFAULTS:
        version = version_of(version)
    d = VERSION_DEFAULTS[version]
    base = RestoreSettings()
    return dataclasses.replace(
        base,
        upscale=TASK_UPSCALE.get(task, 4.0),
        sampler=dataclasses.replace(base.sampler, sampler=d.sampler, steps=d.steps, cfg=d.cfg),
        prompts=dataclasses.replace(base.prompts, prompt=d.prompt, negative_prompt=d.negative_prompt),
    )


__all__ = ["HEAD_DEFAULTS", "TASK_UPSCALE", "V2_NEG_PROMPT", "VERSION_DEFAULTS", "VersionDefaults",
           "default_captioner", "default_settings", "version_of", "PromptSettings", "SamplerSettings"]
