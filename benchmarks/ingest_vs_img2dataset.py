"""Ingest throughput vs img2dataset 1.47.0, same 10,000 URLs from the same loopback server, same run.

    .venv/bin/python benchmarks/ingest_vs_img2dataset.py            # full size: 1,000 images x 10 query strings
    .venv/bin/python benchmarks/ingest_vs_img2dataset.py --images 100 --repeat 3   # smoke size

Corpus: >= 1,000 distinct JPEGs of typical web size (about 400x350, about 100 KB), random scales, crops and
flips of the photos shipped in scikit-image's data folder (read from .venv-bench-ingest, where img2dataset
and scikit-image live; cached under benchmarks/.cache/). A threaded HTTP server in its own process (listen
queue 2048) serves them; each image is requested `--repeat` times with a distinct query string.

Runs, each in a fresh subprocess with CPU time taken from getrusage(RUSAGE_CHILDREN) (children included):
1. synsetforge ingest: full validation (magic bytes, pixel budget, complete entropy decode in draft mode),
   pHash + fingerprint columns, content-addressed store writes, images/image_links tables.
2. img2dataset --image_size 256 --resize_mode border --processes_count 2 --thread_count 32
   --number_sample_per_shard 1000 (default: decode, resize, re-encode).
3. the same with --disable_all_reencoding True.
Prints a Markdown table: images/s, CPU s per image, and our ratio to each img2dataset mode; the 1-minute load
average when each run started; and, because the machine is shared, a load-independent CPU-bound estimate:
cores x images / (tool CPU + server CPU), i.e. the rate if tool and server had every core to themselves.
Then, for each synsetforge run, the CPU per image by step (thread CPU measured inside the workers: receive,
hash, decode, fingerprint, store write, row; the rest of the worker processes; the parent's table rows,
checkpoint parts and merge; start-up imports).

    .venv/bin/python benchmarks/ingest_vs_img2dataset.py --decoders   # JPEG decoders on the corpus, thread CPU
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "benchmarks" / ".cache" / "ingest-corpus"
BENCH_VENV = ROOT / ".venv-bench-ingest"


def skimage_photos() -> list[Path]:
    data = next(BENCH_VENV.glob("lib/python*/site-packages/skimage/data"), None)
    if data is None:
        sys.exit(f"scikit-image not found in {BENCH_VENV}; create it: python3.11 -m venv {BENCH_VENV} && "
                 f"{BENCH_VENV}/bin/pip install img2dataset==1.47.0 scikit-image==0.26.0")
    return sorted(p for p in data.iterdir() if p.suffix.lower() in (".png", ".jpg"))


def make_corpus(n: int, seed: int = 0) -> Path:
    import numpy as np
    from PIL import Image

    out = CACHE / f"n{n}-s{seed}"
    if out.is_dir() and len(list(out.glob("*.jpg"))) == n:
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    photos = []
    for p in skimage_photos():
        img = Image.open(p)
        img = img.convert("RGB")
        if min(img.size) >= 200:
            photos.append(img)
    i = 0
    while i < n:
        src = photos[i % len(photos)]
        scale = rng.uniform(0.8, 2.5)
        big = src.resize((max(430, int(src.width * scale)), max(380, int(src.height * scale))), Image.Resampling.BILINEAR)
        w, h = int(rng.integers(380, 421)), int(rng.integers(330, 371))
        x, y = int(rng.integers(0, big.width - w + 1)), int(rng.integers(0, big.height - h + 1))
        tile = big.crop((x, y, x + w, y + h))
        if rng.random() < 0.5:
            tile = tile.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        arr = np.asarray(tile).astype(np.int16) + rng.normal(0, 14, (h, w, 3)).astype(np.int16)  # sensor-like grain
        tile = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        tile.save(out / f"{i:05d}.jpg", "JPEG", quality=int(rng.integers(94, 98)))
        i += 1
    return out


def serve(folder: str, port: int) -> None:
    """Threaded HTTP/1.1 server (keep-alive, listen queue 2048) answering from memory, so disk and stat() calls do
    not cap either tool; the query string is ignored (each image has 10 URLs)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    files = {f"/{p.name}": p.read_bytes() for p in Path(folder).glob("*.jpg")}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_GET(self):  # noqa: N802
            body = files.get(self.path.split("?", 1)[0])
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 2048

    Server(("127.0.0.1", port), Handler).serve_forever()


def process_cpu(pid: int) -> float:
    """utime + stime of a running process, from /proc (seconds)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_ours(urls_file: str, store_dir: str, concurrency: int, per_host: int, processes: int, reuse: bool = True) -> None:
    import json

    start = os.times()
    import pandas as pd

    from pipeline.config import load_settings
    from pipeline.ingest.stage import run_ingest
    from pipeline.store import open_store

    urls = Path(urls_file).read_text().split()
    store = open_store(store_dir)
    store.write_table("candidates", pd.DataFrame({
        "wnid": "n00000001", "source": "url_list", "query": None, "url": urls, "page_url": None, "title": None,
        "license": None, "license_url": None, "creator": None, "rank": range(len(urls)), "found_at": pd.Timestamp.now("UTC"),
    }))
    settings = load_settings(env={}, overrides={"ingest": {
        "concurrency": concurrency, "per_host": per_host, "allowed_networks": ["127.0.0.0/8"], "processes": processes,
        "flush_every": 2000, "reuse_validation": reuse}})
    steps_dir = Path(store_dir + "-steps")
    steps_dir.mkdir(exist_ok=True)
    os.environ["SYNSETFORGE_INGEST_STEPS"] = str(steps_dir)
    from pipeline.ingest import worker

    ready = os.times()
    summary = run_ingest(store, settings)
    end = os.times()
    mine = worker.STEPS.snapshot()  # rows made in this process (processes = 1)
    (steps_dir / "parent.json").write_text(json.dumps({
        "ns": mine["ns"], "images": mine["images"], "startup_cpu_s": ready.user + ready.system - start.user - start.system,
        "run_cpu_s": end.user + end.system - ready.user - ready.system}))
    print(f"ours: fetched={summary['fetched']} accepted={summary['accepted']} duplicates={summary['duplicates']} "
          f"rejected={summary['rejected']}", file=sys.stderr)


STEP_NAMES = ("receive", "hash", "decode", "fingerprint", "encode", "store_write", "row")


def breakdown(steps_dir: Path, n_images: int) -> list[tuple[str, float]]:
    """CPU ms per image by step, from the workers' and the parent's step files."""
    import json

    parent = json.loads((steps_dir / "parent.json").read_text())
    workers = [json.loads(p.read_text()) for p in steps_dir.glob("steps-*.json")]
    ns = dict(parent["ns"])
    worker_cpu = 0.0
    for w in workers:
        worker_cpu += w["process_cpu_s"]
        for k, v in w["ns"].items():
            ns[k] = ns.get(k, 0) + v
    measured = sum(ns.get(k, 0) for k in STEP_NAMES) / 1e9
    rows = [(k, ns.get(k, 0) / 1e6 / n_images) for k in STEP_NAMES]
    if workers:  # worker processes: threads, queues, pickling rows back, imports
        rows.append(("worker processes, rest (threads, queue to parent, imports)",
                     (worker_cpu - measured) * 1e3 / n_images))
        rows.append(("parent: table rows, checkpoint parts, merge, image_links", parent["run_cpu_s"] * 1e3 / n_images))
    else:
        rows.append(("parent: threads, table rows, checkpoint parts, merge, image_links",
                     (parent["run_cpu_s"] - measured) * 1e3 / n_images))
    rows.append(("parent: start-up imports", parent["startup_cpu_s"] * 1e3 / n_images))
    return rows


def decoders(n: int) -> int:
    """Thread CPU per image of the JPEG decodes a validator could use, on the benchmark corpus."""
    import io

    import simplejpeg
    from PIL import Image

    sys.path.insert(0, str(ROOT))
    from pipeline.ingest.validate import draft_scale

    datas = [p.read_bytes() for p in sorted(make_corpus(n).glob("*.jpg"))][:400]

    def pillow_draft(d: bytes) -> None:
        im = Image.open(io.BytesIO(d))
        im.draft("L", (128, 128))
        im.load()

    def pillow_full(d: bytes) -> None:
        Image.open(io.BytesIO(d)).load()

    def strict_gray(d: bytes) -> None:
        h, w, _, _ = simplejpeg.decode_jpeg_header(d)
        s = draft_scale(w, h)
        simplejpeg.decode_jpeg(d, colorspace="GRAY", min_height=-(-h // s), min_width=-(-w // s), strict=True)

    def strict_rgb(d: bytes) -> None:
        simplejpeg.decode_jpeg(d, colorspace="RGB", strict=True)

    fns = {"Pillow draft L (1/2 scale here), lenient": pillow_draft,
           "simplejpeg GRAY at the same scale, strict": strict_gray,
           "Pillow full RGB, lenient": pillow_full, "simplejpeg full RGB, strict": strict_rgb}
    best = {k: float("inf") for k in fns}
    for _ in range(5):
        for k, fn in fns.items():
            t = time.thread_time()
            for d in datas:
                fn(d)
            best[k] = min(best[k], (time.thread_time() - t) / len(datas) * 1e3)
    print(f"\n{len(datas)} corpus JPEGs (mean {sum(map(len, datas)) / len(datas) / 1000:.0f} KB), thread CPU per image, "
          f"best of 5; load average {loadavg()}\n")
    print("| decode | ms / image |\n|---|---:|")
    for k, v in best.items():
        print(f"| {k} | {v:.3f} |")
    return 0


def loadavg() -> str:
    """1-minute load average: the machine is shared, so each row says how busy it was when the row started."""
    return Path("/proc/loadavg").read_text().split()[0]


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, float, subprocess.CompletedProcess]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        sys.exit(f"{cmd[:3]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall, cpu, proc


def count_img2dataset(out: Path) -> int:
    return sum(1 for _ in out.rglob("*.jpg"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--concurrency", type=int, default=64, help="downloads in flight in total (img2dataset: 2 x 32)")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--no-reuse", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--skip-img2dataset", action="store_true")
    ap.add_argument("--decoders", action="store_true", help="time the JPEG decoders on the corpus and exit")
    ap.add_argument("--serve", nargs=2, metavar=("DIR", "PORT"), help=argparse.SUPPRESS)
    ap.add_argument("--run-ours", nargs=2, metavar=("URLS", "STORE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]))
        return 0
    if args.decoders:
        return decoders(args.images)
    if args.run_ours:
        run_ours(args.run_ours[0], args.run_ours[1], args.concurrency, args.concurrency, args.processes, not args.no_reuse)
        return 0

    sys.path.insert(0, str(ROOT))
    from pipeline.services import free_port, start_service

    corpus = make_corpus(args.images)
    sizes = [p.stat().st_size for p in corpus.glob("*.jpg")]
    work = Path(tempfile.mkdtemp(prefix="sf-bench-ingest-"))
    port = free_port()
    server = start_service("imgserver", [sys.executable, __file__, "--serve", str(corpus), str(port)],
                           url=f"http://127.0.0.1:{port}", ready_path="/00000.jpg", log_path=work / "server.log")
    try:
        names = sorted(p.name for p in corpus.glob("*.jpg"))
        urls = [f"{server.url}/{n}?q={k}" for k in range(args.repeat) for n in names]
        urls_file = work / "urls.txt"
        urls_file.write_text("\n".join(urls) + "\n")
        rows = []
        for label, extra, name in (
            ("synsetforge ingest (full validation + fingerprints of every body)", ["--no-reuse"], "store-noreuse"),
            ("synsetforge ingest (default: repeated bytes reuse their validation)", [], "store"),
        ):
            s0, load = process_cpu(server.pid), loadavg()
            wall, cpu, proc = timed([sys.executable, __file__, "--run-ours", str(urls_file), str(work / name),
                                     "--concurrency", str(args.concurrency), "--processes", str(args.processes), *extra])
            rows.append((label, len(urls), wall, cpu, process_cpu(server.pid) - s0, load))  # every URL settles as accepted or exact duplicate
            print(proc.stderr.strip().splitlines()[-1], file=sys.stderr)
        if not args.skip_img2dataset:
            i2d = str(BENCH_VENV / "bin" / "img2dataset")
            base = [i2d, "--url_list", str(urls_file), "--input_format", "txt", "--image_size", "256",
                    "--resize_mode", "border", "--processes_count", "2", "--thread_count", "32",
                    "--number_sample_per_shard", "1000"]
            for label, extra, name in (("img2dataset default (resize 256 border, re-encode)", [], "i2d"),
                                       ("img2dataset --disable_all_reencoding True", ["--disable_all_reencoding", "True"], "i2d-raw")):
                out = work / name
                s0, load = process_cpu(server.pid), loadavg()
                wall, cpu, _ = timed(base + extra + ["--output_folder", str(out)], env={"PYTHONWARNINGS": "ignore"})
                rows.append((label, count_img2dataset(out), wall, cpu, process_cpu(server.pid) - s0, load))
    finally:
        server.stop()
    rates = [ok / wall for _l, ok, wall, _c, _s, _load in rows]
    print(f"\n{len(urls)} URLs ({args.images} distinct JPEGs x {args.repeat} query strings, mean {sum(sizes) / len(sizes) / 1000:.0f} KB),"
          f" loopback server in its own process, {os.cpu_count()} cores; load average at the end {loadavg()}\n")
    # Load-independent view: images/s if the tool and the server had every core to themselves (CPU-bound).
    cores = os.cpu_count() or 1
    caps = [cores * ok / (cpu + server_cpu) for _l, ok, _w, cpu, server_cpu, _load in rows]
    print("| tool | images ok | wall s | images/s | CPU ms / image | server CPU s | load at start | ours (full) vs this |"
          f" ours (default) vs this | CPU-bound img/s on {cores} cores | ours (full) vs this, CPU-bound |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (label, ok, wall, cpu, server_cpu, load), rate, cap in zip(rows, rates, caps, strict=True):
        print(f"| {label} | {ok} | {wall:.1f} | {rate:.0f} | {cpu / max(ok, 1) * 1000:.2f} | {server_cpu:.1f} | {load} | "
              f"{rates[0] / rate:.2f}x | {rates[1] / rate:.2f}x | {cap:.0f} | {caps[0] / cap:.2f}x |")
    for (label, ok, *_rest), name in zip(rows, ("store-noreuse", "store"), strict=False):
        print(f"\nCPU per image by step, {label} ({ok} images; {args.processes} processes):\n")
        print("| step | CPU ms / image |\n|---|---:|")
        total = 0.0
        for step, ms in breakdown(work / f"{name}-steps", ok):
            total += ms
            print(f"| {step} | {ms:.3f} |")
        print(f"| total | {total:.3f} |")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
