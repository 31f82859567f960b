"""Ingest throughput of the data path, on the same shards, in the same process:

  (a) ceiling:  one process decoding + random-resized-cropping the JPEGs in a loop (per core)
  (b) baseline: webdataset + torch DataLoader (standard torchvision transforms:
                RandomResizedCrop, flip, ToTensor, Normalize), N workers, shards read from
                SeaweedFS through pre-signed URLs
  (c) this project: build_dataset + iter_train_batches (Ray Data, N CPUs), shards read
                from SeaweedFS, two ways: normalised float32 batches, as (b) delivers them
                and as a CPU trainer takes them; and uint8 batches, as a GPU trainer takes
                them (it normalises on the device) and as (a) makes them

Images are generated: smooth synthetic photos with texture, about 400x350 and 110 KB as
JPEG (ImageNet-like; noise would not compress like a photo), 10 classes, trained at 224 px.
SeaweedFS is started here (infra.local.stack.SeaweedFS) and stopped at the end.

    python benchmarks/data_bench.py                       # 6000 images in shards of 500, N = CPU count
    python benchmarks/data_bench.py --images 4000 --workers 4 --rounds 3

Reports images/s (the median of --rounds passes, after a warm-up pass), (c)/(b) and (c)
per core against (a). Goals: (c)/(b) >= 1.0 and (c) per core >= 70% of (a).
"""

from __future__ import annotations

import argparse
import io
import os
import secrets
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from infra.local.stack import SeaweedFS  # noqa: E402
from vit_core import storage  # noqa: E402
from vit_core.data import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataConfig,
    build_dataset,
    iter_train_batches,
    make_shards,
    open_dataset,
)
from vit_core.data.index import open_stream  # noqa: E402
from vit_core.data.shards import iter_samples  # noqa: E402
from vit_core.data.transforms import TransformSpec, decode_crop  # noqa: E402

CLASSES = 10


def synthetic_photo(seed: int) -> bytes:
    """A smooth image with band-limited texture, ~400x350, ~110 KB at JPEG quality 93."""
    rng = np.random.default_rng(seed)
    w, h = int(rng.integers(370, 431)), int(rng.integers(320, 381))
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        for _ in range(4):
            fx, fy = rng.uniform(0.002, 0.03, 2)
            img[..., c] += rng.uniform(20, 60) * np.sin(
                6.28 * (x * fx + y * fy) + rng.uniform(0, 6.28)
            )
    img += rng.uniform(60, 190, 3)
    coarse = np.clip(rng.normal(0, 1, (h // 2, w // 2, 3)) * 40 + 128, 0, 255).astype(np.uint8)
    texture = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), np.float32) - 128
    img += texture * rng.uniform(1.0, 1.5) + rng.normal(0, 9, img.shape)
    out = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=93)
    return out.getvalue()


def make_folder(root: Path, count: int) -> Path:
    folder = root / f"photos-{count}"
    done = folder / ".complete"
    if done.exists():
        return folder
    for i in range(count):
        path = folder / f"class_{i % CLASSES:02d}" / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(synthetic_photo(i))
    done.touch()
    return folder


def ceiling(payloads: list[bytes], size: int) -> tuple[float, float]:
    """(a): images per second and per CPU second of decode + random resized crop in one
    process (one core)."""
    spec = TransformSpec(image_size=size, train=True, num_classes=CLASSES, scale=(0.08, 1.0))
    rng = np.random.default_rng(0)
    start, cpu = time.perf_counter(), time.process_time()
    for data in payloads:
        decode_crop(data, spec, rng)
    return len(payloads) / (time.perf_counter() - start), len(payloads) / (
        time.process_time() - cpu
    )


def baseline_loader(urls: list[str], size: int, workers: int, batch: int):
    import torch
    import torchvision.transforms as T
    import webdataset as wds

    transform = T.Compose(
        [
            T.RandomResizedCrop(size, antialias=True),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    dataset = (
        wds.WebDataset(urls, shardshuffle=False, empty_check=False)
        .decode("pil")
        .to_tuple("jpg", "cls")
        .map_tuple(transform, int)
    )
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch, num_workers=workers, persistent_workers=True, prefetch_factor=2
    )


def _kind(proc: psutil.Process) -> str:
    """What a process of this benchmark's tree serves: storage, Ray, or the loader."""
    try:
        cmd = " ".join(proc.cmdline())
    except psutil.Error:
        return "gone"
    if "weed" in cmd:
        return "storage"
    if proc.pid == os.getpid():
        return "driver"
    if cmd.startswith("ray::"):
        return "ray-worker"  # the tasks that read and decode
    if "ray" in cmd.lower():
        return "ray-daemon"  # raylet, GCS, agents: a cost per node and second, not per image
    return "loader"  # DataLoader workers: forked copies of this script


def cpu_seconds() -> dict[int, tuple[str, float]]:
    me = psutil.Process()
    found = {}
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            found[proc.pid] = (_kind(proc), t.user + t.system + t.children_user + t.children_system)
        except psutil.Error:
            continue
    return found


def timed_pass(batches, kinds: set[str]) -> tuple[float, int, dict[str, float]]:
    """(seconds, images, CPU seconds by kind of the processes doing this path's work)."""
    before = cpu_seconds()
    start = time.perf_counter()
    count = 0
    for images, *_ in batches:
        count += len(images)
    seconds = time.perf_counter() - start
    after = cpu_seconds()
    cpu: dict[str, float] = dict.fromkeys(kinds, 0.0)
    for pid, (kind, t) in after.items():
        if kind in kinds:
            cpu[kind] += t - before.get(pid, (kind, 0.0))[1]
    return seconds, count, cpu


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 2, help="DataLoader workers = Ray CPUs"
    )
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--shard-samples", type=int, default=500)
    parser.add_argument(
        "--shuffle-buffer", type=int, default=0, help="(c): rows in the local shuffle buffer"
    )
    parser.add_argument(
        "--rounds", type=int, default=2, help="timed passes per path, after a warm-up"
    )
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "vit-data-bench"))
    args = parser.parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    folder = make_folder(work, args.images)
    print(
        f"{args.images} synthetic JPEGs in {folder} ({time.perf_counter() - t0:.0f}s)", flush=True
    )

    store = SeaweedFS(
        work / "seaweedfs",
        "bench" + secrets.token_hex(4),
        secrets.token_urlsafe(18),
        buckets=("vit",),
    )
    store.start()
    os.environ.update(store.env())
    try:
        return run(args, folder, store)
    finally:
        import ray

        ray.shutdown()
        store.stop()


def run(args, folder: Path, store: SeaweedFS) -> int:
    import ray

    location = "s3://vit/bench/photos/v1"
    make_shards(
        str(folder), location, shard_samples=args.shard_samples, val_fraction=0.0,
        overwrite=True, executor="local", progress=False,
    )  # fmt: skip
    index = open_dataset(location)
    shards = index.shards("train")
    payloads = []
    for shard in shards:
        with open_stream(index.shard_location(shard)) as stream:
            payloads += [s.image for s in iter_samples(stream.read)]
    sizes = [Image.open(io.BytesIO(p)).size for p in payloads[:200]]
    print(
        f"shards: {len(shards)} x {args.shard_samples} samples on SeaweedFS, "
        f"mean JPEG {np.mean([len(p) for p in payloads]) / 1000:.0f} KB, "
        f"mean size {np.mean([s[0] for s in sizes]):.0f}x{np.mean([s[1] for s in sizes]):.0f}; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs",
        flush=True,
    )

    client = storage.s3_client()
    urls = []
    for shard in shards:
        loc = storage.S3Location.parse(index.shard_location(shard))
        url = client.generate_presigned_url(
            "get_object", Params={"Bucket": loc.bucket, "Key": loc.key}, ExpiresIn=3600
        )
        urls.append(f"pipe:curl -s -f {shlex.quote(url)}")

    ray.init(
        num_cpus=args.workers, include_dashboard=False, logging_level="WARNING", log_to_driver=False
    )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    cfg = DataConfig(
        location=location, image_size=args.image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        scale_min=0.08, hflip=0.5, shuffle_buffer=args.shuffle_buffer,
    )  # fmt: skip
    dataset = build_dataset(cfg, "train", train=True, index=index)
    loader = baseline_loader(urls, args.image_size, args.workers, args.batch)

    def ray_pass(epoch: int, normalize: bool):
        return iter_train_batches(
            dataset, args.batch, "cpu", train=True, epoch=epoch, drop_last=False,
            normalize=normalize,
        )  # fmt: skip

    # Wall-clock rates swing with whatever else runs on the machine; CPU seconds spent by
    # the processes doing each path's work (driver, its loader workers or Ray's processes,
    # and SeaweedFS) do not, so both are reported.
    paths = ("a", "b", "c", "c8")
    wall: dict[str, list[float]] = {k: [] for k in paths}
    per_cpu: dict[str, list[float]] = {k: [] for k in paths}
    # (c) per CPU-second of the loader alone: the storage server, which is a remote
    # service on a real cluster, left out.
    per_cpu_loader: dict[str, list[float]] = {"c": [], "c8": []}
    ms_per_image: dict[str, list[dict[str, float]]] = {"b": [], "c": [], "c8": []}
    timed_pass(ray_pass(0, True), set())  # warm-up: worker processes, imports, connections
    timed_pass(loader, set())
    ceiling(payloads[:100], args.image_size)
    ray_kinds = {"driver", "ray-worker", "ray-daemon", "storage"}
    for r in range(args.rounds):
        # Interleaved, so all of them see the same machine load.
        rate, cpu_rate = ceiling(payloads, args.image_size)
        wall["a"].append(rate)
        per_cpu["a"].append(cpu_rate)
        for key, batches, kinds in (
            ("b", loader, {"driver", "loader", "storage"}),
            ("c", ray_pass(2 * r + 1, True), ray_kinds),
            ("c8", ray_pass(2 * r + 2, False), ray_kinds),
        ):
            seconds, n, cpu = timed_pass(batches, kinds)
            assert n == len(payloads), (key, n, len(payloads))
            wall[key].append(n / seconds)
            per_cpu[key].append(n / sum(cpu.values()))
            ms_per_image[key].append({k: 1000 * v / n for k, v in cpu.items()})
            if key in per_cpu_loader:
                per_cpu_loader[key].append(n / (sum(cpu.values()) - cpu["storage"]))
        print(
            f"round {r + 1}: images/s " + ", ".join(f"({k}) {wall[k][-1]:.0f}" for k in paths)
            + "; per CPU-second " + ", ".join(f"({k}) {per_cpu[k][-1]:.0f}" for k in paths)
            + f"; load {os.getloadavg()[0]:.1f}",
            flush=True,
        )  # fmt: skip
    med = {k: statistics.median(wall[k]) for k in paths}
    med_cpu = {k: statistics.median(per_cpu[k]) for k in paths}
    w = args.workers
    print()
    print(
        f"{len(payloads)} images, {args.image_size} px, batch {args.batch}, {w} DataLoader workers "
        f"= {w} Ray CPUs, shuffle buffer {args.shuffle_buffer}, median of {args.rounds} rounds"
    )
    print(f"{'':52}{'images/s':>10}{'per CPU-s':>11}")
    for key, label in (
        ("a", "(a) ceiling: decode+crop to uint8, 1 process"),
        ("b", f"(b) webdataset + DataLoader, {w} workers, float32"),
        ("c", f"(c) Ray Data path, {w} CPUs, float32"),
        ("c8", f"(c8) Ray Data path, {w} CPUs, uint8"),
    ):
        print(f"{label:52}{med[key]:10.0f}{med_cpu[key]:11.0f}")
    print(
        f"(c)/(b), both normalised float32: {med['c'] / med['b']:.2f} wall, "
        f"{med_cpu['c'] / med_cpu['b']:.2f} per CPU-second   (goal >= 1.0)"
    )
    for key in ("c8", "c"):
        loader_only = statistics.median(per_cpu_loader[key])
        print(
            f"({key}) per core / (a): {med[key] / w / med['a']:.0%} wall (({key})/{w} cores), "
            f"{med_cpu[key] / med_cpu['a']:.0%} per CPU-second, {loader_only / med_cpu['a']:.0%} "
            "per CPU-second without the storage server (goal >= 70%)"
        )
    print(f"CPU ms per image: (a) {1000 / med_cpu['a']:.2f} (decode + crop)")
    for key in ("b", "c", "c8"):
        parts = {
            k: statistics.median(r[k] for r in ms_per_image[key]) for k in ms_per_image[key][0]
        }
        print(f"  ({key}) " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(parts.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
