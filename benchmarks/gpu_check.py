"""The first-GPU check (issue 16): half precision against float32, speed and device memory, one table.

    python benchmarks/gpu_check.py                       # on a CUDA machine: everything, at most ~8 minutes
    python benchmarks/gpu_check.py --device cpu --quick  # the cases part only, bf16 vs fp32 on the CPU

Parts, in this order (a part that would end after `--budget` seconds is skipped, with a row saying so):

1. cases: every CLI case of ../shared/reference/cases.json (tiny models) through the real CLI on the
   device, once in fp32 and once in the half dtype (fp16 on CUDA; bf16 on the CPU, where fp16 has no
   kernels); PSNR of the half output against the fp32 one, and of the fp32 output against the official
   CPU golden image.
2. the v2.1 default restoration (sr x4, 128x128 -> 512x512, edm_dpm++_3m_sde, 10 steps, cfg 6, the
   official prompts) on the FULL-SIZE architecture with random weights (benchmarks/common.py): once in
   fp32 (cold), then the same pipeline converted to fp16, warm (second run), cond + uncond batched
   (the CUDA default) and unbatched; PSNR of fp16 against fp32 (same weights).
3. peak device memory (torch.cuda.max_memory_allocated, weights included) at 2048x2048 and 4096x4096
   outputs with the planner's automatic tiles, and 4096x4096 under --max-memory 10GB (1 step each:
   steps do not change the peak).
4. --compile: torch.compile'd UNet + IRControlNet at 512x512, first run (compilation) and warm.

Nothing is asserted; a failed part prints its error in its row and the others still run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, SHARED, Peak, describe_device  # noqa: E402

sys.path.insert(0, str(REPO / "src"))

REFERENCE = SHARED / "reference"
GiB = 2**30


class Table:
    """Rows of (check, configuration, result), printed once at the end."""

    def __init__(self, budget: float):
        self.rows: list[tuple[str, str, str]] = []
        self.start = time.perf_counter()
        self.budget = budget

    def add(self, check: str, config: str, result: str) -> None:
        self.rows.append((check, config, result))
        print(f"  {check} | {config} | {result}", flush=True)

    def out_of_time(self, check: str, need: float = 10.0) -> bool:
        """True (and a row saying so) when `need` more seconds would overrun the budget."""
        spent = time.perf_counter() - self.start
        if spent + need > self.budget:
            self.add(check, "skipped", f"{spent:.0f} s spent, about {need:.0f} s more needed, budget {self.budget:.0f} s")
            return True
        return False

    def render(self) -> str:
        lines = ["| check | configuration | result |", "|---|---|---|"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in self.rows]
        return "\n".join(lines)


def psnr_u8(a, b) -> float:
    import numpy as np

    if a.shape != b.shape:
        return float("nan")
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def psnr_unit(a, b) -> float:
    """PSNR of two float tensors in [0, 1] (clipped)."""
    mse = float(((a.float().cpu().clamp(0, 1) - b.float().cpu().clamp(0, 1)) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def _db(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.1f} dB"


# -- 1. the reference cases --------------------------------------------------------------------------------


def _with(args: list[str], flag: str, value: str) -> list[str]:
    """`args` with `flag VALUE` set (replaced where present)."""
    out = list(args)
    if flag in out:
        out[out.index(flag) + 1] = value
    else:
        out += [flag, value]
    return out


def check_cases(table: Table, device: str, half: str, only: set[str] | None) -> None:
    import numpy as np
    from PIL import Image

    from restorecli.cli.app import main as cli

    cases = json.loads((REFERENCE / "cases.json").read_text())["cases"]
    here = os.getcwd()
    os.chdir(REFERENCE)  # case paths are relative to the reference folder
    try:
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
            for case in cases:
                if only and case["name"] not in only:
                    continue
                if table.out_of_time(f"case {case['name']}", need=5):
                    return
                outs, seconds = {}, {}
                for precision in ("fp32", half):
                    out = Path(tmp) / f"{case['name']}-{precision}.png"
                    argv = _with(_with(case["args"], "--device", device), "--precision", precision)
                    t0 = time.perf_counter()
                    code = cli([case["input"], "-o", str(out), "--overwrite", *argv])
                    seconds[precision] = time.perf_counter() - t0
                    outs[precision] = np.asarray(Image.open(out).convert("RGB")) if code == 0 and out.exists() else None
                if outs["fp32"] is None or outs[half] is None:
                    table.add(f"case {case['name']}", f"{device} {half} vs fp32", "the CLI failed (see its message above)")
                    continue
                golden = np.asarray(Image.open(REFERENCE / case["expected"]).convert("RGB"))
                table.add(f"case {case['name']}", f"{device} {half} vs fp32",
                          f"PSNR {_db(psnr_u8(outs[half], outs['fp32']))}; fp32 vs official CPU golden "
                          f"{_db(psnr_u8(outs['fp32'], golden))}; {seconds['fp32']:.1f} s / {seconds[half]:.1f} s")
    finally:
        os.chdir(here)


# -- 2-4. the full-size architecture -------------------------------------------------------------------------


def _v21_call(size: int, steps: int = 10, **extra) -> tuple:
    import numpy as np

    from restorecli.settings.defaults import DEFAULT_NEG_PROMPT, DEFAULT_POS_PROMPT

    lq = np.random.default_rng(size).integers(0, 256, (size // 4, size // 4, 3), dtype=np.uint8)
    call = dict(upscale=4, sampler="edm_dpm++_3m_sde", steps=steps, cfg=6.0, prompt=DEFAULT_POS_PROMPT,
                negative_prompt=DEFAULT_NEG_PROMPT, seed=231, output_type="pt", **extra)
    return lq, call


def _timed(pipe, lq, call, device: str):
    """(output, Peak) of one restoration."""
    with Peak(device) as p:
        out = pipe(lq, **call)
    return out, p


def check_full_size(table: Table, device: str, *, steps: int, skip_compile: bool, skip_fp32: bool,
                    dry_run: bool = False) -> None:
    """Parts 2-4 on one pipeline: built in float32 (one fp32 run when asked), then converted to fp16.
    `dry_run`: the tiny reference model instead, 512² only, bf16 on a CPU (checks this script)."""
    import torch

    from common import full_size_pipeline
    from restorecli.pipeline.loading import prepare_for_speed

    if table.out_of_time("full-size v2.1", need=60):
        return
    t0 = time.perf_counter()
    if dry_run:
        from restorecli import DiffBIRPipeline

        pipe = DiffBIRPipeline.from_description(REFERENCE / "model_v.json", device=device, torch_dtype=torch.float32,
                                                captioner="none")
    else:
        pipe = full_size_pipeline("v2.1", device=device, dtype=torch.float32)
    half = torch.float16 if device.startswith("cuda") else torch.bfloat16
    name = str(half).removeprefix("torch.")
    prepare_for_speed(pipe, torch.device(device))
    table.add("full-size v2.1 build" if not dry_run else "tiny model (dry run)", "random weights",
              f"{time.perf_counter() - t0:.0f} s")
    lq, call = _v21_call(512, steps)
    out32 = None
    if not skip_fp32 and not table.out_of_time("512² fp32", need=30):
        out32, p32 = _timed(pipe, lq, call, device)
        table.add("512² v2.1 defaults", "fp32 (cold, for the PSNR below)", f"{p32.seconds:.1f} s")
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # its note on casting with to(): these models keep nothing in fp32
    for module in (pipe.unet, pipe.controlnet, pipe.vae, pipe.text_encoder):
        module.to(half)
    pipe._prompt_cache.clear()  # encode the prompts again with the half-precision text encoder
    if device.startswith("cuda"):
        torch.cuda.empty_cache()

    fp16_out = None
    for label, batch in ((f"{name}, cfg batched (the CUDA default)", None), (f"{name}, cfg unbatched", False)):
        if table.out_of_time(f"512² {label}", need=20):
            return
        pipe.batch_cfg = batch
        try:
            _, first = _timed(pipe, lq, call, device)
            out, p = _timed(pipe, lq, call, device)
            finite = bool(torch.isfinite(out.images).all())
            note = ""
            if batch is None:
                fp16_out = out
                if out32 is not None:
                    note = f"; PSNR vs fp32 (same weights) {_db(psnr_unit(out.images, out32.images))}"
            table.add("512² v2.1 defaults, warm", label, f"{p.seconds:.2f} s (first {first.seconds:.1f} s), "
                      f"peak {p.total / GiB:.1f} GiB, finite {finite}{note}")
        except Exception as exc:  # noqa: BLE001 - reported in the table
            table.add("512² v2.1 defaults, warm", label, f"error: {exc!r}"[:200])
    pipe.batch_cfg = None
    del out32

    big = ((512, None, 30), (512, 2 * GiB, 30)) if dry_run else ((2048, None, 30), (4096, None, 90), (4096, 10 * GiB, 120))
    for size, cap, need in big:
        label = f"{size}², " + ("automatic tiles" if cap is None else f"--max-memory {cap / GiB:.0f}GB")
        if table.out_of_time(f"peak at {label}", need=need):
            continue
        lq_big, call_big = _v21_call(size, 1, **({} if cap is None else {"max_memory": cap}))
        try:
            out, p = _timed(pipe, lq_big, call_big, device)
            table.add("peak device memory", label + ", 1 step",
                      f"{p.total / GiB:.1f} GiB allocated (weights included), {p.seconds:.0f} s; plan: {out.plan.describe()}")
            del out
        except Exception as exc:  # noqa: BLE001
            table.add("peak device memory", label, f"error: {exc!r}"[:200])
        if device.startswith("cuda"):
            torch.cuda.empty_cache()

    if skip_compile or table.out_of_time("512² --compile", need=150):
        return
    try:
        prepare_for_speed(pipe, torch.device(device), compile=True)
        _, first = _timed(pipe, lq, call, device)
        out, p = _timed(pipe, lq, call, device)
        same = f"; PSNR vs uncompiled {_db(psnr_unit(out.images, fp16_out.images))}" if fp16_out is not None else ""
        table.add("512² v2.1 defaults, warm", f"{name}, --compile (cfg batched)",
                  f"{p.seconds:.2f} s (first, compiling: {first.seconds:.0f} s){same}")
    except Exception as exc:  # noqa: BLE001
        table.add("512² v2.1 defaults, warm", f"{name}, --compile", f"error: {exc!r}"[:200])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (the cases part only, bf16)")
    p.add_argument("--quick", action="store_true", help="only the cases part")
    p.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    p.add_argument("--steps", type=int, default=10, help="sampling steps of the 512² runs (default 10, the v2.1 default)")
    p.add_argument("--budget", type=float, default=450.0,
                   help="seconds: a part that would end after this is skipped (default 450; the script ends within 8 minutes)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile part")
    p.add_argument("--no-fp32", action="store_true", help="skip the full-size fp32 comparison")
    p.add_argument("--dry-run", action="store_true", help="parts 2-4 with the tiny model at 512² (checks the script)")
    args = p.parse_args()

    import torch

    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here, nothing to check. This script is for a lent GPU; "
              "`python benchmarks/gpu_check.py --device cpu --quick` runs its cases part (bf16 vs fp32) on the CPU.")
        return 0
    if not (REFERENCE / "cases.json").is_file():
        print(f"gpu_check: the reference data is missing ({REFERENCE}); set RESTORE_SHARED_DIR")
        return 1
    half = "fp16" if device.startswith("cuda") else "bf16"
    table = Table(args.budget)
    print(f"# benchmarks/gpu_check.py: {describe_device(device)}; half precision here: {half}", flush=True)
    check_cases(table, device, half, set(args.cases.split(",")) if args.cases else None)
    if not args.quick:
        if device.startswith("cuda") or args.dry_run:
            check_full_size(table, device, steps=args.steps, skip_compile=args.no_compile, skip_fp32=args.no_fp32,
                            dry_run=args.dry_run)
        else:
            table.add("full-size parts", device, "skipped: they are GPU checks (--dry-run runs them with the tiny model)")
    print(f"\n{describe_device(device)}, {time.perf_counter() - table.start:.0f} s in all\n")
    print(table.render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
