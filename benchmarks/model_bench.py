"""Speed of vit_core's ViT against timm's, same config, same process, interleaved.

Times a forward pass (inference) and a training step without the optimiser (forward +
cross-entropy + backward) for each model, alternating vit_core and timm step by step so both
see the same machine load, and reports the median step time as images/s, the ratio
vit_core/timm, and on a GPU the model FLOP utilisation (MFU).

    python benchmarks/model_bench.py                          # Ti/16, S/16, B/16, batch 32
    python benchmarks/model_bench.py --models s16 --batch 4 --steps 3
    python benchmarks/model_bench.py --device cuda            # bf16, eager and torch.compile

FLOPs are counted analytically (a multiply-add is 2 FLOPs; a training step is 3x the forward);
torch.utils.flop_counter does not count the CPU attention kernel, so it would undercount.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from vit_core.model import ViTConfig, create_model  # noqa: E402

TIMM_NAMES = {
    "ti16": "vit_tiny_patch16_224",
    "s16": "vit_small_patch16_224",
    "s32": "vit_small_patch32_224",
    "b16": "vit_base_patch16_224",
    "b32": "vit_base_patch32_224",
    "l16": "vit_large_patch16_224",
    "l32": "vit_large_patch32_224",
    "h14": "vit_huge_patch14_224",
}

# dense bf16 peak, TFLOP/s, for MFU; anything else needs --peak-tflops
GPU_PEAKS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def forward_flops(c: ViTConfig) -> float:
    """FLOPs of one image's forward pass: the matmuls, which are all but a few percent."""
    gh, gw = c.grid_size
    n = gh * gw
    t = n + (1 if c.class_token else 0)
    d, hidden = c.embed_dim, int(c.embed_dim * c.mlp_ratio)
    patch = 2 * n * (c.patch_size**2 * c.in_chans) * d
    per_block = (
        2 * t * d * 3 * d  # qkv
        + 2 * 2 * t * t * d  # q @ k^T and attn @ v
        + 2 * t * d * d  # out projection
        + 2 * 2 * t * d * hidden  # MLP
    )
    head = 2 * d * c.num_classes
    return float(patch + c.depth * per_block + head)


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAKS.items():
            if key in name:
                return peak
    return None


def make_step(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, train: bool, amp
) -> Callable[[], None]:
    if train:

        def step() -> None:
            with amp():
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            for p in model.parameters():
                p.grad = None

    else:

        def step() -> None:
            with torch.inference_mode(), amp():
                model(x)

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_pair(
    steps: dict[str, Callable[[], None]],
    n: int,
    warmup: int,
    device: torch.device,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Median seconds per step for each, interleaved; the order flips every round."""
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in steps}
    names = list(steps)
    for i in range(n):
        for name in names if i % 2 == 0 else names[::-1]:
            sync(device)
            t0 = clock()
            steps[name]()
            sync(device)
            times[name].append(clock() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="ti16,s16,b16", help=f"of {','.join(TIMM_NAMES)}")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per model (median)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument(
        "--compile", default="auto", choices=["auto", "off", "on", "both"],
        help="torch.compile; auto = both on GPU, off on CPU",
    )  # fmt: skip
    ap.add_argument("--modes", default="fwd,train", help="fwd (inference) and/or train")
    ap.add_argument("--peak-tflops", type=float, default=None, help="for MFU on unknown HW")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument(
        "--clock", default="wall", choices=["wall", "cpu"],
        help="cpu: this process's CPU time (all threads), steadier on a shared CPU; "
        "img/s then means images per CPU-second",
    )  # fmt: skip
    args = ap.parse_args()

    import timm

    if args.threads:
        torch.set_num_threads(args.threads)
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if use_cuda else "fp32")
    compile_modes = {"auto": ["off", "on"] if use_cuda else ["off"], "both": ["off", "on"]}.get(
        args.compile, [args.compile]
    )
    if use_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    def amp():
        if dtype == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return nullcontext()

    if args.clock == "cpu" and use_cuda:
        ap.error("--clock cpu is for CPU runs")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    peak = peak_tflops(device, args.peak_tflops)
    hw = (
        torch.cuda.get_device_name(device)
        if use_cuda
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"# {hw}; torch {torch.__version__}, timm {timm.__version__}; batch {args.batch}, "
        f"{args.steps} timed steps (median), {args.warmup} warmup; {dtype}; {args.clock} clock"
    )
    header = (
        f"{'model':6} {'mode':5} {'compile':7} {'vit_core img/s':>14} {'timm img/s':>11} "
        f"{'ratio':>6} {'GFLOP/img':>9} {'TFLOP/s':>8} {'MFU':>6}"
    )
    print(header)
    print("-" * len(header))
    for short in args.models.split(","):
        short = short.strip().removeprefix("vit_")
        torch.manual_seed(0)
        ours = create_model(f"vit_{short}").to(device)
        ref = timm.create_model(TIMM_NAMES[short], pretrained=False, num_classes=1000).to(device)
        flops_img = forward_flops(ours.config)
        x = torch.randn(args.batch, 3, 224, 224, device=device)
        y = torch.randint(0, 1000, (args.batch,), device=device)
        for comp in compile_modes:
            models = {"vit_core": ours, "timm": ref}
            if comp == "on":
                torch._dynamo.reset()
                models = {k: torch.compile(m) for k, m in models.items()}
            for mode in args.modes.split(","):
                train = mode == "train"
                for m in (ours, ref):
                    m.train(train)
                steps = {k: make_step(m, x, y, train, amp) for k, m in models.items()}
                # compiled graphs need more warmup (compile + autotune)
                warm = args.warmup + (2 if comp == "on" else 0)
                t = time_pair(steps, args.steps, warm, device, clock)
                ips = {k: args.batch / v for k, v in t.items()}
                flops = flops_img * (3 if train else 1) * ips["vit_core"]
                mfu = f"{100 * flops / (peak * 1e12):5.1f}%" if peak else "   n/a"
                print(
                    f"{short:6} {mode:5} {comp:7} {ips['vit_core']:14.2f} {ips['timm']:11.2f} "
                    f"{ips['vit_core'] / ips['timm']:6.3f} {flops_img / 1e9:9.2f} "
                    f"{flops / 1e12:8.3f} {mfu}",
                    flush=True,
                )
        del ours, ref
        if use_cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
