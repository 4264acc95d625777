"""`--task unaligned_face` on the FULL-SIZE architectures (random weights, nothing downloaded): seconds and
peak memory of detection, of each face and of the background, and of the paste.

    python benchmarks/faces.py                                  # CPU: 128x128 input x4, 2 faces, 1 step
    python benchmarks/faces.py --stage1-only                    # detection, cleaners and paste only (fast on a CPU)
    python benchmarks/faces.py --device cuda --size 512 --faces 4 --steps 10

What runs. Detection: facexlib's RetinaFace (ResNet-50, or `--detector retinaface_mobile0.25`) built full
size with random weights, on the detection image (the input upscaled, short side >= 512, enlarged to 640
for the detector). Random weights "find" thousands of boxes, so the restoration itself uses a stand-in
detector that returns `--faces` faces at fixed places; the paste uses ParseNet built full size (random
weights, so its mask is arbitrary but its cost is the real one). Restoration: DiffBIR v2.1's full-size
SwinIR (background and faces) and SD 2.1 UNet + IRControlNet + VAE + text tower (benchmarks/common.py).
Per part: wall seconds and peak memory over the memory at its start (CPU: resident set; CUDA: allocated).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from common import Peak, describe_device  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=128, help="input side (square), upscaled x4")
    p.add_argument("--faces", type=int, default=2)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--detector", default="retinaface_resnet50")
    p.add_argument("--stage1-only", action="store_true")
    args = p.parse_args()

    import numpy as np
    import torch

    import restorecli.pipeline  # noqa: F401  (import order: pipeline before stage1)
    from _face_standins import FixedDetector, synthetic_photo
    from common import full_size_cleaner, full_size_pipeline
    from restorecli.faces import alignment, detection, parsing
    from restorecli.faces.pipeline import FacePipeline
    from restorecli.stage1.run import pre_upscale

    rows = {}

    def measure(name, fn):
        with Peak(args.device) as peak:
            result = fn()
        rows[name] = {"s": round(peak.seconds, 3), "peak_MiB": round(peak.bytes / 2**20, 1)}
        return result

    lq = synthetic_photo(args.size, args.size, seed=1)
    work = alignment.helper_image(pre_upscale(lq, 4.0))
    net = measure("build detector", lambda: detection.build_retinaface(args.detector, args.device))
    found = measure("detection (random weights)", lambda: detection.detect_faces(net, work))
    rows["detection (random weights)"]["boxes"] = len(found)
    parser = parsing.FaceParser(parsing.build_parser("parsenet").to(args.device), "parsenet")
    measure("parse mask (one face)", lambda: parser.mask(np.zeros((512, 512, 3), np.uint8)))

    pipe = full_size_pipeline("v2.1", device=args.device)
    faces = FacePipeline.from_pipeline(pipe, full_size_cleaner("swinir", device=args.device),
                                       FixedDetector([(0.2 + 0.6 * k / max(1, args.faces - 1), 0.45, 0.1, 0.0)
                                                      for k in range(args.faces)]), parser)
    current = {}

    class Monitor:
        def __call__(self, stage):
            outer = self

            class Block:
                def __enter__(self):
                    self.t0 = time.perf_counter()

                def __exit__(self, *exc):
                    current.setdefault(stage, 0.0)
                    current[stage] += time.perf_counter() - self.t0
            return Block()

    faces.background.stage_monitor = faces.face.stage_monitor = Monitor()
    call = dict(upscale=4.0, steps=args.steps, seed=231, stage1_only=args.stage1_only, prompt="a photo")
    out = measure("whole photo", lambda: faces(lq, **call))
    rows["whole photo"]["faces"] = len(out.faces[0])
    rows["whole photo"]["stages_s"] = {k: round(v, 2) for k, v in current.items()}
    if out.faces[0]:
        one = {x: call[x] for x in ("steps", "seed", "stage1_only", "prompt")}
        measure("one face alone", lambda: faces.face(out.faces[0][0].lq, faces.default_settings.replace(upscale=1.0, **one),
                                                     output_type="pt"))
    measure("background alone", lambda: faces.background(lq, faces.default_settings.replace(**call), output_type="pt"))
    print(json.dumps({"device": describe_device(args.device), "size": args.size, "output": out.pixels[0].shape[:2],
                      "steps": args.steps, "stage1_only": args.stage1_only, "rows": rows}, indent=1, default=str))


if __name__ == "__main__":
    main()
