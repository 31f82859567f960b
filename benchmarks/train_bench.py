"""Ray Train's overhead against a plain torch loop, on the same model and batches.

    python benchmarks/train_bench.py                       # CPU: a small ViT, 32 px
    python benchmarks/train_bench.py --model vit_b16 --img-size 224 --batch 64 --gpu

Both sides run the same step function (forward, backward, AdamW step) on the same
pre-made batches; Ray Train's side wraps the model with prepare_model (DDP) inside a
one-worker TorchTrainer and reports metrics every `--report-every` steps, as the
project's loop does. Startup (actors, process group) is timed apart from the steps.
On a GPU it also times timm's ViT of the same shape in the same plain loop and prints
images/s and MFU (training FLOPs = 3 x forward FLOPs) in bf16.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vit_core.model import create_model  # noqa: E402

H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s of an H100 SXM, for MFU


def make_batches(n: int, batch: int, img: int, classes: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch, 3, img, img, generator=g),
            torch.randint(0, classes, (batch,), generator=g),
        )
        for _ in range(n)
    ]


def build(args):
    extra = {}
    if args.small:
        extra = {"patch_size": 4, "embed_dim": 96, "depth": 6, "num_heads": 3}
    return create_model(args.model, img_size=args.img_size, num_classes=10, **extra)


def run_steps(model, batches, steps: int, device, bf16: bool, report=None, report_every: int = 0):
    """Timed training steps; returns steps/s after one warm-up pass over the batches."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ctx = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if bf16
        else torch.autocast(device.type, enabled=False)
    )

    def step(i):
        x, y = batches[i % len(batches)]
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with ctx:
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if report and report_every and (i + 1) % report_every == 0:
            report({"loss": loss.item()})
        return loss

    for i in range(min(3, steps)):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        loss = step(i)
    loss.item()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - t0)


def ray_train_steps_per_s(args) -> tuple[float, float]:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    def loop(config):
        import ray.train.torch

        device = ray.train.torch.get_device()
        torch.set_num_threads(
            config["args"].threads
        )  # Ray sets 1 per CPU asked; match the plain loop
        torch.manual_seed(0)
        model = ray.train.torch.prepare_model(build(config["args"]))
        batches = make_batches(8, config["args"].batch, config["args"].img_size, 10)
        rate = run_steps(
            model, batches, config["args"].steps, device, config["args"].gpu,
            report=lambda m: ray.train.report(m), report_every=config["args"].report_every,
        )  # fmt: skip
        # Train V2 keeps only metrics that come with a checkpoint; the driver is on this
        # machine, so the rate goes through a file.
        Path(config["out"]).write_text(str(rate))

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=os.cpu_count(), logging_level="ERROR")
    out = f"/tmp/vit-train-bench-{os.getpid()}.txt"
    t0 = time.perf_counter()
    trainer = TorchTrainer(
        loop,
        train_loop_config={"args": args, "out": out},
        scaling_config=ray.train.ScalingConfig(
            num_workers=1, use_gpu=args.gpu, resources_per_worker={"CPU": args.threads}
        ),
        run_config=ray.train.RunConfig(storage_path="/tmp/vit-train-bench"),
    )
    trainer.fit()
    wall = time.perf_counter() - t0
    ray.shutdown()  # the plain loop after this one runs without Ray's processes, as before
    return float(Path(out).read_text()), wall


def forward_flops(model, img_size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, 3, img_size, img_size, device=next(model.parameters()).device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_ti16")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--report-every", type=int, default=10)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads, both sides")
    p.add_argument("--small", action=argparse.BooleanOptionalAction, default=True,
                   help="the digits demo's small ViT (patch 4, 6 blocks of 96)")  # fmt: skip
    args = p.parse_args()
    if args.gpu and not torch.cuda.is_available():
        print("error: --gpu asked for but no CUDA device", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.gpu else "cpu")

    def plain_loop() -> float:
        torch.manual_seed(0)
        batches = make_batches(8, args.batch, args.img_size, 10)
        return run_steps(build(args).to(device), batches, args.steps, device, args.gpu)

    # The plain loop runs before and after Ray's, so a drift in machine speed shows.
    before = plain_loop()
    ray_rate, wall = ray_train_steps_per_s(args)
    after = plain_loop()
    plain = (before + after) / 2
    print(
        f"model {args.model}{' (small)' if args.small else ''} at {args.img_size}px, batch {args.batch}, {args.steps} steps, {device}"
    )
    print(f"plain torch loop : {plain:8.2f} steps/s (before {before:.2f}, after {after:.2f})")
    print(f"Ray Train (1 wkr): {ray_rate:8.2f} steps/s   ratio {ray_rate / plain:.3f}")
    print(f"Ray Train wall time incl. start-up: {wall:.1f}s for {args.steps + 3} steps")

    if args.gpu:
        import timm

        ours = build(args).to(device)
        theirs = timm.create_model(
            "vit_base_patch16_224" if args.model == "vit_b16" else "vit_tiny_patch16_224",
            img_size=args.img_size, num_classes=10,
        ).to(device)  # fmt: skip
        batches = make_batches(4, args.batch, args.img_size, 10)
        for name, model in (("vit_core", ours), ("timm", theirs)):
            rate = run_steps(model, batches, args.steps, device, True)
            images = rate * args.batch
            mfu = 3 * forward_flops(model, args.img_size) * images / H100_BF16_PEAK
            print(f"{name:9s} bf16: {images:9.1f} images/s  MFU {mfu:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
