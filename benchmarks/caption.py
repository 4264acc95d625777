"""Cost of a caption: seconds per caption and peak memory of each pinned captioner at FULL SIZE with
random weights built from their configs (nothing downloaded), and the share of a restoration it adds.

    python benchmarks/caption.py                       # CPU: florence2 + llava (extrapolated), 10-25 min on 2 cores
    python benchmarks/caption.py --measure-restoration # and a 512² restoration's CPU seconds here, to compare
    python benchmarks/caption.py --device cuda         # fp16 / 4-bit where bitsandbytes runs, all 32 LLaVA layers
    python benchmarks/caption.py --captioners florence2 --tokens 24

What runs. The captioner classes of restorecli.captions (the same prompt building, image processing,
padding and generate call as `restore --captioner NAME`), over models built from the published
architectures with transformers' random initialisation:

* florence2: Florence-2 base (DaViT depths 1/1/9/1, dims 128-1024, window 12, 768 x 768 input,
  577 image tokens; BART base, d_model 768, 6 + 6 layers, vocabulary 51290): fp32 on the CPU,
  fp16 on CUDA; `<CAPTION>`, 3 beams;
* llava: LLaVA-1.5-7B (CLIP ViT-L/14-336, 24 layers; Llama-2-7B text model, 32 layers of 4096,
  vocabulary 32064; 576 image tokens): bf16 on the CPU (16 bits: bitsandbytes does not run there),
  on CUDA `--llava-bit` (default 4: NF4, when bitsandbytes is installed). On a CPU the whole 7B model
  (14 GB in bf16) does not fit next to other work, so it is measured with 2 and with 4 of its 32 text
  layers and extrapolated linearly to 32 (time and memory are linear in the layer count: same
  sequence, same vision tower); the row says so.

Random weights never stop on their own, so every caption generates exactly `--tokens` new tokens
(default 16: LLaVA's "very short description" and Florence-2's `<CAPTION>` answers are one sentence of
about 10-20 tokens); the tokenizers are small local ones (the model's vocabulary size is the real one).
Each configuration runs in its own process: one warm-up caption, then `--repeat` timed captions of a
random 512 x 384 image. "s / caption" is wall time; "CPU s" the process's CPU time (all threads), which
a busy shared machine inflates less: on an idle machine wall time is about CPU time / threads. "peak over weights": the memory a caption adds to the loaded model (CPU:
resident set high-water mark, CUDA: max allocated); "process peak": the whole process, weights included.

Share of a restoration, in CPU seconds on a CPU (a shared machine's load inflates wall times, hardly
CPU times): the README's measured v2.1 restorations on 2 cores, fp32, 10 steps (512^2: 3.1 + 7.5 +
10 x 16.5 + 16.4 = 192 s; 1024^2: 1044 s) taken as that many seconds on each thread, or with
`--measure-restoration` a 512^2 restoration measured here (1 step, sampling counted 10 times).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, Peak, child_env, describe_device, load_average, run_child  # noqa: E402

sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "tests"))  # the small local tokenizers of tests/_tiny_captioners.py

#: measured in README "Memory, tiling and speed" (benchmarks/run.py, CPU, 2 cores, fp32), 10 steps
RESTORE_SECONDS = {"512²": 3.1 + 7.5 + 10 * 16.5 + 16.4, "1024²": 13.8 + 34.4 + 10 * 92.4 + 71.3}
LLAVA_TEXT_LAYERS = 32


# ------------------------------------------------------------------------------------------ the models


def florence_captioner(device, dtype, folder: Path):
    import torch
    from transformers import (BartConfig, CLIPImageProcessor, Florence2Config, Florence2ForConditionalGeneration,
                              Florence2Processor, Florence2VisionConfig)

    import _tiny_captioners as tiny
    from restorecli.captions.florence import FlorenceCaptioner
    from restorecli.captions.base import backend_kwargs

    tokenizer = tiny.florence_tokenizer()
    images = CLIPImageProcessor(size={"height": 768, "width": 768}, do_center_crop=False, crop_size=None,
                                image_seq_length=577, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    Florence2Processor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(folder, **backend_kwargs())
    vision = Florence2VisionConfig(depths=[1, 1, 9, 1], embed_dim=[128, 256, 512, 1024], num_heads=[4, 8, 16, 32],
                                   num_groups=[4, 8, 16, 32], window_size=12, projection_dim=768, drop_path_rate=0.0)
    text = BartConfig(vocab_size=51290, d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
                      decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072, max_position_embeddings=1024,
                      bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.eos_token_id)
    config = Florence2Config(vision_config=vision, text_config=text, image_token_id=tokenizer.image_token_id)
    torch.manual_seed(0)
    model = Florence2ForConditionalGeneration._from_config(config, dtype=dtype).eval().to(device)
    return FlorenceCaptioner(model, processor, name="florence2", revision=None, device=device)


def llava_captioner(device, dtype, folder: Path, layers: int, bits: str):
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    import _tiny_captioners as tiny
    from restorecli.captions.llava import LlavaCaptioner, quantization
    from restorecli.captions.base import pil_image_processor

    tokenizer = tiny.llama_tokenizer()
    CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                       image_mean=tiny.CLIP_MEAN, image_std=tiny.CLIP_STD).save_pretrained(folder)
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=0)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu")
    torch.manual_seed(0)
    quant, why_not = quantization(bits, torch.device(device))
    model = LlavaForConditionalGeneration._from_config(config, dtype=dtype).eval()
    if quant is not None:  # quantize the random weights as from_pretrained would: save, reload 4/8-bit
        model.save_pretrained(folder / "weights")
        del model
        model = LlavaForConditionalGeneration.from_pretrained(folder / "weights", quantization_config=quant,
                                                              device_map={"": device}).eval()
    else:
        model = model.to(device)
    return LlavaCaptioner(model, tokenizer, pil_image_processor(folder), name="llava", revision=None, device=device), \
        ("16" if quant is None else bits), why_not


# ------------------------------------------------------------------------------------------ the child


def child(args) -> dict:
    import tempfile

    import numpy as np
    import torch

    from restorecli.captions.base import quiet_transformers

    torch.set_num_threads(args.threads)
    on_cuda = args.device.startswith("cuda")
    folder = Path(tempfile.mkdtemp(prefix="caption-bench-"))
    t0 = time.perf_counter()
    with quiet_transformers():
        if args.captioner == "florence2":
            dtype = torch.float16 if on_cuda else torch.float32
            captioner, bits, why_not = florence_captioner(args.device, dtype, folder), None, None
        else:
            dtype = torch.float16 if on_cuda else torch.bfloat16
            captioner, bits, why_not = llava_captioner(args.device, dtype, folder, args.layers, args.llava_bit)
    build_s = time.perf_counter() - t0
    model = captioner.model
    model.generation_config.min_new_tokens = args.tokens
    captioner.max_new_tokens = args.tokens
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (384, 512, 3), dtype=np.uint8)

    def one() -> tuple[float, int, int, float]:
        captioner._cache.clear()
        cpu = time.process_time()
        with Peak(args.device) as peak:
            captioner.caption(image)
        return peak.seconds, peak.bytes, peak.total, time.process_time() - cpu

    one()  # warm-up (first-call allocations, kernel selection)
    runs = [one() for _ in range(args.repeat)]
    return {
        "captioner": args.captioner, "device": args.device, "dtype": str(dtype).removeprefix("torch."),
        "bits": bits, "why_not_quantized": why_not, "layers": args.layers, "tokens": args.tokens, "params": params,
        "weight_bytes": weight_bytes, "build_s": build_s, "seconds": [r[0] for r in runs], "cpu_seconds": [r[3] for r in runs],
        "over_weights": max(r[1] for r in runs), "process_peak": max(r[2] for r in runs),
        "threads": torch.get_num_threads(),
    }


def restoration_child(args) -> dict:
    """CPU seconds per stage of one v2.1 restoration of a 512^2 output (x4 from 128^2), 1 sampling step,
    on the full-size architecture with random weights (benchmarks/common.py)."""
    import contextlib

    import numpy as np
    import torch

    from common import full_size_pipeline

    torch.set_num_threads(args.threads)
    pipe = full_size_pipeline("v2.1", device=args.device)
    stages: dict[str, float] = {}

    @contextlib.contextmanager
    def monitor(name):
        t0 = time.process_time()
        try:
            yield
        finally:
            stages[name] = stages.get(name, 0.0) + time.process_time() - t0

    pipe.stage_monitor = monitor
    lq = np.random.default_rng(512).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    wall = time.perf_counter()
    pipe(lq, upscale=4, steps=1, output_type="pt", seed=231)
    return {"cpu_stages": stages, "wall_s": time.perf_counter() - wall, "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------------ the table


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _spawn(args, captioner: str, layers: int | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", "--captioner-child", captioner, "--device", args.device,
           "--tokens", str(args.tokens), "--repeat", str(args.repeat), "--threads", str(args.threads),
           "--llava-bit", args.llava_bit]
    if layers is not None:
        cmd += ["--layers", str(layers)]
    print(f"  running {captioner}{f' ({layers} text layers)' if layers else ''} ...", file=sys.stderr, flush=True)
    return run_child(cmd, env=child_env(threads=args.threads), timeout=args.timeout)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--captioners", default="florence2,llava")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=16, help="new tokens per caption (random weights never stop)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--llava-bit", default="4", choices=("4", "8", "16"))
    parser.add_argument("--llava-layers", default=None, help="text layers to measure, comma-separated "
                        "(default: 2,4 extrapolated to 32 on the CPU, 32 on CUDA)")
    parser.add_argument("--measure-restoration", action="store_true",
                        help="also measure the CPU seconds of a 512² v2.1 restoration here (1 step, extrapolated to 10)")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--captioner-child", help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=LLAVA_TEXT_LAYERS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.captioner = args.captioner_child
        print(json.dumps(restoration_child(args) if args.captioner == "restoration" else child(args)))
        return 0

    rows = []
    for name in args.captioners.split(","):
        if name == "florence2":
            result = _spawn(args, "florence2")
            rows.append(("florence2", result, None))
            continue
        layers = [int(x) for x in (args.llava_layers or ("2,4" if args.device == "cpu" else "32")).split(",")]
        results = {n: _spawn(args, "llava", n) for n in layers}
        for n, result in results.items():
            rows.append((f"llava ({n} of 32 text layers, measured)", result, None))
        if len(layers) >= 2 and LLAVA_TEXT_LAYERS not in results and all("error" not in r for r in results.values()):
            (a, ra), (b, rb) = sorted(results.items())[:2]
            scale = (LLAVA_TEXT_LAYERS - a) / (b - a)

            def line(key):
                return ra[key] + (rb[key] - ra[key]) * scale

            est = dict(rb)
            est.update(seconds=[min(ra["seconds"]) + (min(rb["seconds"]) - min(ra["seconds"])) * scale],
                       cpu_seconds=[min(ra["cpu_seconds"]) + (min(rb["cpu_seconds"]) - min(ra["cpu_seconds"])) * scale],
                       over_weights=line("over_weights"), process_peak=line("process_peak"),
                       weight_bytes=line("weight_bytes"), params=line("params"), layers=LLAVA_TEXT_LAYERS)
            rows.append((f"llava (all 32 layers, extrapolated from {a} and {b})", est, "extrapolated"))

    # what one restoration costs, in CPU seconds (a shared machine's load inflates wall time, not CPU time)
    refs = {k: v * args.threads for k, v in RESTORE_SECONDS.items()}  # README wall s on 2 idle cores x threads
    ref_note = f"README's measured wall seconds x {args.threads} threads"
    if args.measure_restoration and args.device == "cpu":
        print("  running a 512² restoration (1 step) ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, __file__, "--child", "--captioner-child", "restoration", "--device", args.device,
               "--threads", str(args.threads)]
        measured = run_child(cmd, env=child_env(threads=args.threads), timeout=args.timeout)
        if "error" not in measured:
            cpu = measured["cpu_stages"]
            refs = {"512²": sum(cpu.values()) + 9 * cpu.get("sampling", 0.0)}
            ref_note = "measured here: " + ", ".join(f"{k} {v:.0f}" for k, v in cpu.items()) + " CPU s, sampling x 10"

    on_cpu = args.device == "cpu"
    print(f"\nCaption cost ({describe_device(args.device)}; load {load_average()}; {args.tokens} new tokens per "
          f"caption, 512 x 384 input, best of {args.repeat}):\n")
    head = "| captioner | weights | s / caption | " + ("CPU s / caption | " if on_cpu else "") + \
        "peak over weights | process peak | " + " | ".join(f"share of a {k} restoration" for k in refs) + " |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for label, r, _ in rows:
        if "error" in r:
            print(f"| {label} | - | error: {r['error']} |" + " |" * (head.count("|") - 4))
            continue
        wall, cpu = min(r["seconds"]), min(r["cpu_seconds"])
        bits = f", {r['bits']}-bit" if r.get("bits") and r["bits"] != "16" else ""
        weights = f"{r['params'] / 1e9:.2f} B params, {r['dtype']}{bits}, {_gib(r['weight_bytes'])}"
        cost = cpu if on_cpu else wall
        shares = " | ".join(f"+{100 * cost / v:.0f}%" for v in refs.values())
        cpu_cell = f"{cpu:.1f} | " if on_cpu else ""
        print(f"| {label} | {weights} | {wall:.1f} | {cpu_cell}{_gib(r['over_weights'])} | {_gib(r['process_peak'])} | {shares} |")
    print(f"\nShares: the caption's {'CPU' if on_cpu else 'wall'} seconds over one v2.1 restoration's "
          f"(10 steps; {ref_note}).")
    notes = [r.get("why_not_quantized") for _, r, _ in rows if r.get("why_not_quantized")]
    if notes:
        print(f"\nllava ran in 16 bits: {notes[0]}.")
    print("\nThe captioner leaves the accelerator before stage 2, so its peak does not add to the restoration's "
          "on a GPU; on the CPU both share host memory, and the captioner's weights stay loaded for the next image.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
