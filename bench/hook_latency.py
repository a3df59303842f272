"""Push-hook latency (bucket → active at a site) and publish throughput from S3, on loopback.

    python -m bench.hook_latency [--size-mb 128] [--files 4] [--repeat 3] [--workdir bench-out/hook]

Starts a real SeaweedFS (`weed mini`, filer webhook on), `fabric origin` on a local
store, `fabric hook` publishing to it and `fabric agent` following `bench:latest`,
each a child process. Then, per run, boto3 uploads a checkpoint of `--files` random
files (multipart, like a trainer's upload) and its torch DCP `.metadata` last, and we
time from the moment the `.metadata` upload returns ("landed") to:

* **detect**: the hook finds the checkpoint complete (its `/checkpoints` says when),
* **publish**: the version is committed at the origin and `latest` moved,
* **sync**: the site agent has fetched, verified and activated it (its `current/` link).

Then, on the same objects in the same run: boto3 `download_file` of every object
(the transfer manager's default 8 MiB parts, 10 threads) against `fabric publish`
streaming the same prefix from the bucket into a new local store (no local copy),
and against publishing the downloaded copy from disk. Best of `--repeat`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from bench import md_table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the SeaweedFS launcher the tests use (helpers_s3)

COMMAND = "python -m bench.hook_latency"
DOWNLOAD = "boto3 download_file (to disk)"
STREAMED = "fabric publish from s3:// (streamed, no local copy)"
FROM_COPY = "fabric publish of the downloaded copy"
TOKEN = "bench-hook-token-51c3a9"
PUBLISH_SECRET, SITE_SECRET = "bench-publish-secret-7d2e", "bench-site-secret-0c4b"


def _tokens(path: Path) -> Path:
    path.write_text(f'[[token]]\nname = "publisher"\nsecret = "{PUBLISH_SECRET}"\nscopes = ["publish", "pull"]\n\n'
                    f'[[token]]\nname = "site"\nsite = "site"\nsecret = "{SITE_SECRET}"\nscopes = ["pull"]\n')
    return path


def _write_random(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 8 << 20)
            f.write(os.urandom(n))
            left -= n


def _mb_s(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / 1e6:.0f}"


def main(argv: Sequence[str] | None = None) -> str:
    p = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mb", type=int, default=128, help="checkpoint size (MB), split over --files")
    p.add_argument("--files", type=int, default=4)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir, removed after)")
    args = p.parse_args(argv)

    from boto3.s3.transfer import TransferConfig
    from helpers.agent import AgentProcess
    from helpers.http import request
    from helpers.origin import OriginProcess
    from helpers.s3 import HookProcess, Weed, free_port, hook_config, wait_until

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="fabric-hook-bench-"))
    if work.exists() and args.workdir:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    hook_port = free_port()
    size = args.size_mb * 1_000_000
    per_file = size // args.files
    multipart = TransferConfig(multipart_threshold=8 << 20, multipart_chunksize=8 << 20)
    latency_rows, throughput = [], {}
    weed = Weed(work / "weed", webhook=(f"http://127.0.0.1:{hook_port}/events", TOKEN)).start()
    procs = []
    try:
        s3 = weed.client()
        s3.create_bucket(Bucket="ckpt")
        origin = OriginProcess(work / "origin-store", _tokens(work / "tokens.toml"), work / "origin.log").start()
        procs.append(origin)
        (work / "hook").mkdir()
        cfg = hook_config(work / "hook", port=hook_port, bucket="ckpt", endpoint=weed.endpoint,
                          origin=(origin.url, PUBLISH_SECRET), token=TOKEN)
        hook = HookProcess(cfg, hook_port).start()
        procs.append(hook)
        agent = AgentProcess(work, "site", origin.url, follow=["bench:latest"], token=SITE_SECRET).start()
        procs.append(agent)
        src = work / "src"
        src.mkdir()
        for run in range(1, args.repeat + 1):
            prefix = f"runs/bench/step-{run}/"
            for i in range(args.files):
                _write_random(src / f"__{i}_0.distcp", per_file)
                s3.upload_file(str(src / f"__{i}_0.distcp"), "ckpt", prefix + f"__{i}_0.distcp", Config=multipart)
            s3.put_object(Bucket="ckpt", Key=prefix + ".metadata", Body=json.dumps({"step": run}).encode())
            landed = time.time()
            version = f"step-{run}"
            wait_until(lambda: agent.active("bench") == version, 300, interval=0.005, what="activation")
            active = time.time()
            cps = request(hook.url, "GET", "/checkpoints", token=TOKEN).json()["checkpoints"]
            cp = next(c for c in cps if c["version"] == version)
            latency_rows.append((run, round(cp["detected"] - landed, 3), round(cp["published"] - cp["detected"], 3),
                                 round(active - cp["published"], 3), round(active - landed, 3)))
        throughput = _throughput(weed, s3, work, "runs/bench/step-1/", args.repeat)
    finally:
        for proc in reversed(procs):
            proc.stop()
        weed.stop()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    report = [
        f"Checkpoint: {args.files} files, {args.size_mb} MB of random bytes, uploaded with boto3 "
        f"(8 MiB multipart), then `.metadata`. Timed from the `.metadata` upload returning.",
        "",
        md_table(["run", "detect s", "publish s", "sync s", "total s"], latency_rows),
        "",
        f"Publish throughput on the same {args.size_mb} MB (best of {args.repeat}):",
        "",
        md_table(["method", "seconds", "MB/s", "speed vs download_file"],
                 [(name, f"{sec:.2f}", _mb_s(size, sec), f"{throughput[DOWNLOAD] / sec:.2f}x")
                  for name, sec in throughput.items()]),
    ]
    text = "\n".join(report)
    print(text)
    return text


def _throughput(weed, s3, work: Path, prefix: str, repeat: int) -> dict[str, float]:
    """Best seconds of: boto3 download_file of every object; fabric publish from s3://; from the local copy."""
    from fabric.publish import LocalTarget, publish
    from fabric.s3source import list_sources
    from fabric.store.store import open_store

    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="ckpt", Prefix=prefix)["Contents"]]
    best = {DOWNLOAD: float("inf"), STREAMED: float("inf"), FROM_COPY: float("inf")}
    for i in range(repeat):
        dest = work / f"download-{i}"
        dest.mkdir()
        t0 = time.perf_counter()
        for key in keys:
            s3.download_file("ckpt", key, str(dest / key.rsplit("/", 1)[-1]))
        os.sync()
        best[DOWNLOAD] = min(best[DOWNLOAD], time.perf_counter() - t0)
        for name, source in ((STREAMED, None), (FROM_COPY, dest)):
            store = open_store(work / f"store-{i}-{len(name)}")
            src = source if source is not None else list_sources(f"s3://ckpt/{prefix}", s3=weed.options)
            t0 = time.perf_counter()
            publish(src, artifact="tp", version=f"v{i}", target=LocalTarget(store))
            os.sync()
            best[name] = min(best[name], time.perf_counter() - t0)
            shutil.rmtree(store.backend.root)
        shutil.rmtree(dest)
    return best


if __name__ == "__main__":
    main()
