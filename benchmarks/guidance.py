"""Cost of restoration guidance on the FULL-SIZE architecture (random weights, nothing downloaded).

    python benchmarks/guidance.py                      # 512^2 output, 2 spaced steps, CPU (~6 min on 2 cores)
    python benchmarks/guidance.py --size 1024 --steps 4 --device cuda

Builds SD 2.1's UNet, the IRControlNet and the VAE from ``restorecli.models.configs``
(``full_size_cldm_spec`` / ``stage2_configs``) with random initialisation, then samples a 512x512 image
(64x64 latent; random text embedding, random condition latent) with the spaced sampler, cfg 4 (two
denoiser passes per step), without guidance, recording the x0 the hook sees at each step. Each guidance
configuration (latent mse / w_mse, rgb w_mse with and without gradient checkpointing of the decoder) is
then timed as the hook itself on those same x0s and contexts: a guided step costs the unguided step plus
the hook, and the hook's peak is separate from the denoiser's (the denoiser's activations are freed
before the hook runs), so a step's peak is the larger of the two. Timing the hook alone keeps the
benchmark to one denoiser run, which dominates on a CPU. The models are built once, in one process.

Memory: CPU peak RSS during a call over the RSS before it (VmHWM after clearing it), or CUDA
max_memory_allocated over the allocation before it. "latent" includes the target's one-off VAE encode
(first step only), "rgb" one decode with autograd plus its backward per step.
"""

from __future__ import annotations

import argparse
import os

from common import Peak  # benchmarks/ is the script's folder

GUIDED = {
    "latent mse": dict(loss="mse", space="latent"),
    "latent w_mse": dict(loss="w_mse", space="latent"),
    "rgb w_mse": dict(loss="w_mse", space="rgb"),
    "rgb w_mse, checkpointed decoder": dict(loss="w_mse", space="rgb", checkpoint=True),
}


def run(size: int, steps: int, cfg: float, device: str, threads: int) -> list[dict]:
    import torch

    from restorecli.diffusion.conditioning import ControlCondition, ControlledModel
    from restorecli.diffusion.guidance import GuidanceSettings, RestorationGuidance
    from restorecli.diffusion.noise import GeneratorNoise
    from restorecli.diffusion.sampling import sample
    from restorecli.diffusion.schedules import NoiseSchedule
    from restorecli.models.cldm import ControlledUNet
    from restorecli.models.configs import PINNED_DIFFUSION, full_size_cldm_spec, stage2_configs
    from restorecli.models.stage2 import new_controlnet, new_unet, new_vae

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    configs = stage2_configs(full_size_cldm_spec("unused.ckpt", "unused.pth"))
    unet, controlnet, vae = (m.eval().requires_grad_(False).to(device) for m in (
        new_unet(configs.unet), new_controlnet(configs.controlnet), new_vae(configs.vae)))
    schedule = NoiseSchedule.from_spec(PINNED_DIFFUSION["v2"])
    h = w = size // 8
    gen = torch.Generator().manual_seed(1)
    c_txt = torch.randn((1, 77, 1024), generator=gen).to(device)
    c_neg = torch.randn((1, 77, 1024), generator=gen).to(device)
    stage1 = torch.rand((1, 3, size, size), generator=gen)  # stands in for the stage-1 image
    c_img = (torch.randn((1, 4, h, w), generator=gen) * 0.8).to(device)
    noise = GeneratorNoise.from_seed(2)
    x_T = noise.randn((1, 4, h, w), device)
    model = ControlledModel(ControlledUNet(unet, controlnet))

    seen = []

    def record(x0, ctx):
        seen.append((x0.clone(), ctx))
        return x0

    with Peak(device) as off:
        sample("spaced", model, x_T, schedule=schedule, steps=steps, cond=ControlCondition(c_txt, c_img),
               uncond=ControlCondition(c_neg, c_img), cfg=cfg, noise=noise, x0_hook=record)
    rows = [{"name": "off", "step": off.seconds / steps, "hook": 0.0, "calls": [], "peak": off.bytes, "hook_peak": 0}]
    for name, cfg_g in GUIDED.items():
        guide = RestorationGuidance(
            GuidanceSettings(0.5, cfg_g["loss"], cfg_g["space"]), (stage1 * 2 - 1).to(device), vae=vae,
            latent_scale_factor=0.18215, noise=GeneratorNoise.from_seed(3), checkpoint=cfg_g.get("checkpoint", False),
        )
        calls, hook_peak = [], 0
        for x0, ctx in seen:
            with Peak(device) as p:
                out = guide(x0, ctx)
            assert torch.isfinite(out).all()
            calls.append(p.seconds)
            hook_peak = max(hook_peak, p.bytes)
        hook_seconds = sum(calls)
        rows.append({"name": name, "step": off.seconds / steps + hook_seconds / steps, "hook": hook_seconds / steps,
                     "calls": calls, "peak": max(off.bytes, hook_peak), "hook_peak": hook_peak})
        print(f"done: {name}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512, help="output side in pixels (multiple of 64)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    rows = run(args.size, args.steps, args.cfg, args.device, args.threads)
    mem = "CUDA" if args.device.startswith("cuda") else "RSS"
    print(f"\nfull-size SD 2.1 + IRControlNet + VAE, random weights, {args.size}x{args.size} output, spaced sampler, "
          f"cfg {args.cfg:g}, {args.steps} steps, {args.device}, {args.threads} threads, fp32, guidance scale 0.5\n")
    print(f"| guidance | s/step | guidance s/step | guidance s, 1st / later steps | x off | peak {mem} over base, step (MiB) "
          "| guidance alone (MiB) |")
    print("|---|---|---|---|---|---|---|")
    off = rows[0]["step"]
    for r in rows:
        calls = r["calls"]
        split = f"{calls[0]:.2f} / {sum(calls[1:]) / max(1, len(calls) - 1):.2f}" if calls else "-"
        print(f"| {r['name']} | {r['step']:.1f} | {r['hook']:.2f} | {split} | {r['step'] / off:.2f} | "
              f"{r['peak'] / 2**20:.0f} | {r['hook_peak'] / 2**20:.0f} |")


if __name__ == "__main__":
    main()
