"""The offline demo corpus: real photographs from scikit-image's wheel, edited copies with known truth, and a
loopback server that answers in the Openverse API format so the real `openverse` source and ingest run on it.

Pure core: `build_corpus(seed)` cuts a few distinct views (the whole photo and crops at other scales) of one
photo per synset, plants near copies of some of them (JPEG re-compression, downscale, a border crop of a few
percent, a brightness change: the crawl edits pipeline/ingest/neardup.py is built to catch), files a crop of
another synset's photo under each query (search noise; its truth is the other class), and adds one truncated
JPEG and one tiny PNG so the ingest rejections show. Every file has a truth row: the class it really shows,
the near copy it was made from, and the object's box in the served image's pixels. Deterministic per seed.

Thin server: `start_openverse_server(corpus)` serves `GET /v1/images/?q=&page=&page_size=` (result_count,
page_count, page_size, page, results[...]) and the files at `/images/<name>` from a daemon thread;
`python -m pipeline.demo_corpus serve --port P` runs the same server as its own process (what `make demo`
starts, so `--keep-running` can leave it up and stop it by PID).

    >>> corpus = build_corpus(seed=0)
    >>> sorted({t["kind"] for t in corpus.truth.values()})
    ['corrupt', 'distinct', 'misfiled', 'near_copy', 'tiny']
    >>> [s.wnid for s in DEMO_SYNSETS][:2]
    ['n02123045', 'n07920052']
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import random
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import numpy as np
from PIL import Image, ImageEnhance

from pipeline.services import ThreadServer, free_port, serve_in_thread

Box = tuple[float, float, float, float]
Rect = tuple[int, int, int, int]
ANON_MAX_PAGE_SIZE = 20  # Openverse's limit for anonymous clients
LICENSES = {  # Openverse license code -> (license_version, license_url)
    "cc0": ("1.0", "https://creativecommons.org/publicdomain/zero/1.0/"),
    "pdm": ("1.0", "https://creativecommons.org/publicdomain/mark/1.0/"),
}
SKIMAGE_DOCS = "https://scikit-image.org/docs/stable/api/skimage.data.html#skimage.data."


@dataclass(frozen=True)
class View:
    """A crop of the photo (pixels of the photo) saved at `scale`; `box` is the object in photo pixels or None
    for 'the whole crop shows the object' (the cat's face fills its photo)."""

    rect: Rect
    scale: float = 1.0
    box: Box | None = None


@dataclass(frozen=True)
class DemoSynset:
    wnid: str
    name: str  # WordNet 3.0 synset name; the wnid is its offset (tests resolve it with nltk)
    lemma: str
    photo: str  # file in skimage/data
    license: str
    creator: str
    views: tuple[View, ...]  # distinct images of the synset (never near copies of each other)
    stray: View  # a crop of this photo filed under another synset's query (misfiled search noise)


# One photo per synset, each a real photograph shipped in the scikit-image wheel (no download), with the
# license its docstring gives. Boxes were read off the photos; coins get theirs from a threshold (`_coin_box`).
DEMO_SYNSETS: tuple[DemoSynset, ...] = (
    DemoSynset(  # tabby.n.01: tabby, tabby cat (an ILSVRC-2012 class)
        "n02123045", "tabby.n.01", "tabby", "chelsea.png", "cc0", "Stefan van der Walt",
        views=(View((0, 0, 451, 300)), View((100, 60, 260, 200), 1.8), View((270, 0, 451, 180), 1.4),
               View((170, 170, 360, 300), 1.6)),
        stray=View((0, 150, 150, 300), 1.5),
    ),
    DemoSynset(  # espresso.n.01: espresso (an ILSVRC-2012 class)
        "n07920052", "espresso.n.01", "espresso", "coffee.png", "cc0", "Rachel Michetti",
        views=(View((0, 0, 600, 400), 1.0, (170, 15, 415, 305)), View((190, 70, 410, 200), 1.6, (190, 70, 410, 200)),
               View((120, 0, 480, 320), 0.75, (170, 15, 415, 305))),
        stray=View((180, 10, 420, 150), 1.3, (180, 10, 420, 150)),
    ),
    DemoSynset(  # astronaut.n.01: astronaut, spaceman, cosmonaut
        "n09818022", "astronaut.n.01", "astronaut", "astronaut.png", "pdm", "NASA",
        views=(View((0, 0, 512, 512), 0.9, (15, 10, 400, 512)), View((110, 0, 330, 240), 1.5, (125, 10, 315, 240)),
               View((0, 220, 340, 512), 1.0, (15, 220, 340, 512))),
        stray=View((130, 20, 310, 170), 1.7, (130, 20, 310, 170)),
    ),
    DemoSynset(  # rocket.n.01: rocket, projectile ("any vehicle self-propelled by a rocket engine")
        "n04099429", "rocket.n.01", "rocket", "rocket.jpg", "pdm", "SpaceX",
        views=(View((0, 0, 640, 427), 1.0, (303, 125, 342, 410)), View((240, 100, 400, 427), 1.5, (303, 125, 342, 410)),
               View((270, 110, 380, 250), 2.2, (303, 125, 342, 250))),
        stray=View((255, 200, 395, 427), 1.6, (303, 200, 342, 410)),
    ),
    DemoSynset(  # coin.n.01: coin ("a flat metal piece (usually a disc) used as money")
        "n13388245", "coin.n.01", "coin", "coins.png", "pdm", "Brooklyn Museum",
        views=(View((285, 0, 384, 95), 2.4), View((298, 140, 384, 236), 2.0), View((178, 14, 252, 88), 3.2),
               View((0, 218, 82, 303), 2.6)),
        stray=View((68, 150, 132, 214), 3.0),
    ),
)
EDIT_KINDS = ("jpeg", "downscale", "crop", "brightness")


@dataclass(frozen=True)
class CorpusFile:
    name: str
    data: bytes = field(repr=False)
    content_type: str
    listed_for: str  # the wnid whose queries return it
    title: str
    license: str
    creator: str
    photo: str


@dataclass
class Corpus:
    files: dict[str, CorpusFile]
    truth: dict[str, dict[str, Any]]  # file name -> kind, wnid (true class), listed_for, near_copy_of, edit, box
    listing: dict[str, list[str]]  # wnid -> file names in search-rank order
    queries: dict[str, list[str]]  # wnid -> phrases its search answers to (lemmas, lower case)

    def digest(self) -> str:
        """sha256 over names and bytes: two processes that built the same corpus agree on it."""
        h = hashlib.sha256()
        for name in sorted(self.files):
            h.update(name.encode() + b"\0" + hashlib.sha256(self.files[name].data).digest())
        return h.hexdigest()

    def match(self, query: str) -> str | None:
        """The wnid whose lemma appears as a whole phrase in `query` (as the synset's expanded queries do)."""
        q = " " + " ".join(query.lower().replace("_", " ").split()) + " "
        best: tuple[int, str] | None = None
        for wnid, phrases in self.queries.items():
            for p in phrases:
                if f" {p} " in q and (best is None or len(p) > best[0]):
                    best = (len(p), wnid)
        return best[1] if best else None

    def write(self, folder: Path) -> Path:
        """The files and truth.json into `folder` (for a person to look at what the demo searched)."""
        folder.mkdir(parents=True, exist_ok=True)
        for f in self.files.values():
            (folder / f.name).write_bytes(f.data)
        (folder / "truth.json").write_text(json.dumps(self.truth, indent=1, sort_keys=True))
        return folder


# ------------------------------------------------------------------------------------------------ pure core
def photo_path(name: str) -> Path:
    """A photo in the installed scikit-image's data folder (shipped in the wheel: no pooch fetch)."""
    import skimage

    path = Path(skimage.__file__).parent / "data" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the demo corpus needs scikit-image's bundled photos "
                                "(reinstall scikit-image from requirements.txt)")
    return path


def load_photo(name: str) -> Image.Image:
    with Image.open(photo_path(name)) as img:
        return img.convert("RGB") if img.mode not in ("RGB", "L") else img.copy()


def _coin_box(img: Image.Image) -> Box:
    """The coin in a crop of coins.png: the bounding box of the largest bright blob (Otsu threshold)."""
    from skimage.filters import threshold_otsu
    from skimage.measure import label, regionprops

    g = np.asarray(img.convert("L"), dtype=np.float64)
    regions = regionprops(label(g > threshold_otsu(g)))
    r = max(regions, key=lambda r: r.area)
    y0, x0, y1, x1 = r.bbox
    return float(x0), float(y0), float(x1), float(y1)


def _render(photo: Image.Image, view: View) -> tuple[Image.Image, Box]:
    """Crop + rescale; the object's box moved into the new image's pixels (clipped to it)."""
    x0, y0, x1, y1 = view.rect
    crop = photo.crop(view.rect)
    size = (round((x1 - x0) * view.scale), round((y1 - y0) * view.scale))
    out = crop.resize(size, Image.Resampling.LANCZOS) if view.scale != 1.0 else crop
    if view.box is None:
        return out, (0.0, 0.0, float(size[0]), float(size[1]))
    bx0, by0, bx1, by1 = view.box
    box = (max(bx0, x0), max(by0, y0), min(bx1, x1), min(by1, y1))
    s = view.scale
    return out, tuple(round(v, 1) for v in ((box[0] - x0) * s, (box[1] - y0) * s, (box[2] - x0) * s, (box[3] - y0) * s))


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, optimize=True)
    return buf.getvalue()


def edit_copy(img: Image.Image, box: Box, kind: str, rng: random.Random) -> tuple[Image.Image, Box, int, str]:
    """One crawl edit of a distinct image: (edited image, moved box, JPEG quality, description)."""
    w, h = img.size
    if kind == "jpeg":
        q = rng.randint(25, 45)
        return img, box, q, f"re-compressed at JPEG quality {q}"
    if kind == "downscale":
        f = rng.uniform(0.45, 0.7)
        size = (max(1, round(w * f)), max(1, round(h * f)))
        fx, fy = size[0] / w, size[1] / h
        moved = (box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy)
        return img.resize(size, Image.Resampling.BICUBIC), _round(moved), 88, f"downscaled to {f:.0%}"
    if kind == "crop":
        lf, t, r, b = (rng.uniform(0.02, 0.05) for _ in range(4))
        rect = (round(w * lf), round(h * t), round(w * (1 - r)), round(h * (1 - b)))
        moved = (max(box[0], rect[0]) - rect[0], max(box[1], rect[1]) - rect[1],
                 min(box[2], rect[2]) - rect[0], min(box[3], rect[3]) - rect[1])
        return img.crop(rect), _round(moved), 90, f"border crop of {lf:.0%}/{t:.0%}/{r:.0%}/{b:.0%}"
    if kind == "brightness":
        f = rng.choice([rng.uniform(0.7, 0.85), rng.uniform(1.15, 1.3)])
        return ImageEnhance.Brightness(img).enhance(f), box, 90, f"brightness x{f:.2f}"
    raise ValueError(f"unknown edit kind {kind!r}; choose from {EDIT_KINDS}")


def _round(box: Sequence[float]) -> Box:
    return tuple(round(float(v), 1) for v in box)  # type: ignore[return-value]


def build_corpus(seed: int = 0, synsets: Sequence[DemoSynset] = DEMO_SYNSETS) -> Corpus:
    """Every file of the demo corpus with its truth; the same bytes for the same seed."""
    rng = random.Random(seed)
    files: dict[str, CorpusFile] = {}
    truth: dict[str, dict[str, Any]] = {}
    listing: dict[str, list[str]] = {s.wnid: [] for s in synsets}

    def add(name: str, data: bytes, ctype: str, syn: DemoSynset, listed_for: str, row: dict[str, Any]) -> None:
        files[name] = CorpusFile(name, data, ctype, listed_for, f"{syn.lemma} ({syn.photo}, {row['kind']})",
                                 syn.license, syn.creator, syn.photo)
        truth[name] = {"listed_for": listed_for, "near_copy_of": None, "edit": None, "box": None, **row}
        listing[listed_for].append(name)

    for si, syn in enumerate(synsets):
        photo = load_photo(syn.photo)
        rendered = []
        for vi, view in enumerate(syn.views):
            img, box = _render(photo, view)
            if syn.photo == "coins.png":
                box = _coin_box(img)
            rendered.append((img, box))
            add(f"{syn.lemma}-{vi}.jpg", _jpeg(img, 92), "image/jpeg", syn, syn.wnid,
                {"kind": "distinct", "wnid": syn.wnid, "box": list(box)})
        for ci in range(2 + si % 2):  # two or three near copies per synset, the edit kinds rotating
            vi, kind = ci % len(rendered), EDIT_KINDS[(si + ci) % len(EDIT_KINDS)]
            img, box = rendered[vi]
            edited, moved, quality, what = edit_copy(img, box, kind, rng)
            add(f"{syn.lemma}-{vi}-copy{ci}.jpg", _jpeg(edited, quality), "image/jpeg", syn, syn.wnid,
                {"kind": "near_copy", "wnid": syn.wnid, "near_copy_of": f"{syn.lemma}-{vi}.jpg", "edit": what,
                 "box": list(moved)})
    for si, syn in enumerate(synsets):  # misfiled: this photo's stray crop answers the next synset's query
        other = synsets[(si + 1) % len(synsets)]
        img, box = _render(load_photo(syn.photo), syn.stray)
        if syn.photo == "coins.png":
            box = _coin_box(img)
        add(f"{syn.lemma}-in-{other.lemma}.jpg", _jpeg(img, 90), "image/jpeg", syn, other.wnid,
            {"kind": "misfiled", "wnid": syn.wnid, "box": list(box)})
    # Broken downloads for the ingest checks: a JPEG cut short, and an icon below ingest.min_side.
    first, second = synsets[0], synsets[1 % len(synsets)]
    whole = files[f"{first.lemma}-0.jpg"].data
    add(f"{first.lemma}-truncated.jpg", whole[: len(whole) // 3], "image/jpeg", first, first.wnid,
        {"kind": "corrupt", "wnid": None, "expect_reject": ["truncated", "decode_error"]})
    buf = io.BytesIO()
    load_photo(second.photo).resize((24, 16), Image.Resampling.BOX).save(buf, "PNG")
    add(f"{second.lemma}-icon.png", buf.getvalue(), "image/png", second, second.wnid,
        {"kind": "tiny", "wnid": None, "expect_reject": ["too_small"]})
    for wnid, names in listing.items():  # search rank: a seeded shuffle, as a search engine mixes noise in
        random.Random(f"{seed}-{wnid}").shuffle(names)
    queries = {s.wnid: _lemmas(s) for s in synsets}
    return Corpus(files, truth, listing, queries)


def _lemmas(syn: DemoSynset) -> list[str]:
    """The synset's lemmas from WordNet when nltk can load it, else the hard-coded lemma (the server must
    not depend on NLTK_DATA; the test checks the two agree)."""
    try:
        from nltk.corpus import wordnet as wn

        return [n.replace("_", " ").lower() for n in wn.synset(syn.name).lemma_names()]
    except (LookupError, ImportError, OSError):
        return [syn.lemma]


# ------------------------------------------------------------------------------------------ Openverse API
def search_page(corpus: Corpus, base_url: str, params: dict[str, str]) -> tuple[int, dict[str, Any]]:
    """(HTTP status, JSON body) for GET /v1/images/ with these query parameters (pure)."""
    try:
        page = int(params.get("page", "1"))
        page_size = int(params.get("page_size", str(ANON_MAX_PAGE_SIZE)))
    except ValueError:
        return 400, {"detail": "page and page_size must be integers"}
    if page < 1:
        return 400, {"detail": {"page": ["Ensure this value is greater than or equal to 1."]}}
    if not 1 <= page_size <= ANON_MAX_PAGE_SIZE:
        return 400, {"detail": {"page_size": [f"Ensure this value is between 1 and {ANON_MAX_PAGE_SIZE} "
                                              "(anonymous requests)."]}}
    wnid = corpus.match(params.get("q", ""))
    names = list(corpus.listing.get(wnid, [])) if wnid else []
    if params.get("license"):
        wanted = {c.strip().lower() for c in params["license"].split(",")}
        names = [n for n in names if corpus.files[n].license in wanted]
    page_count = math.ceil(len(names) / page_size)
    if names and page > page_count:
        return 400, {"detail": "Invalid page: the page is beyond the last page of results."}
    chunk = names[(page - 1) * page_size: page * page_size]
    return 200, {
        "result_count": len(names), "page_count": page_count, "page_size": page_size, "page": page,
        "results": [_result(corpus.files[n], base_url) for n in chunk],
    }


def _result(f: CorpusFile, base_url: str) -> dict[str, Any]:
    version, url = LICENSES[f.license]
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"synsetforge-demo/{f.name}")),
        "title": f.title,
        "foreign_landing_url": SKIMAGE_DOCS + f.photo.split(".")[0],
        "url": f"{base_url}/images/{quote(f.name)}",
        "creator": f.creator,
        "license": f.license,
        "license_version": version,
        "license_url": url,
        "provider": "scikit-image",
        "source": "scikit-image",
        "filetype": f.name.rsplit(".", 1)[-1],
    }


def make_handler(corpus: Corpus) -> type[BaseHTTPRequestHandler]:
    digest = corpus.digest()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # the demo prints its own progress
            pass

        def _send(self, status: int, body: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, doc: Any) -> None:
            self._send(status, json.dumps(doc).encode(), "application/json")

        def do_GET(self) -> None:  # noqa: N802
            parts = urlsplit(self.path)
            if parts.path in ("/v1/images/", "/v1/images"):
                params = {k: v[-1] for k, v in parse_qs(parts.query).items()}
                host, port = self.server.server_address[:2]
                status, doc = search_page(corpus, f"http://{host}:{port}", params)
                self._json(status, doc)
            elif parts.path.startswith("/images/"):
                f = corpus.files.get(unquote(parts.path[len("/images/"):]))
                if f is None:
                    self._json(404, {"detail": "Not found."})
                else:
                    self._send(200, f.data, f.content_type)
            elif parts.path == "/healthz":
                self._json(200, {"status": "UP", "corpus": digest, "files": len(corpus.files)})
            else:
                self._json(404, {"detail": "Not found."})

    return Handler


def start_openverse_server(corpus: Corpus, port: int | None = None) -> ThreadServer:
    """Serve `corpus` on 127.0.0.1 from a daemon thread; `.url` is the API base (collect.openverse_url)."""
    server = ThreadingHTTPServer(("127.0.0.1", port or free_port()), make_handler(corpus))
    server.daemon_threads = True
    return ThreadServer(server, serve_in_thread(server, "openverse-demo"))


def main(argv: list[str] | None = None) -> int:
    """`python -m pipeline.demo_corpus serve --port P [--seed S]` or `write DIR`."""
    p = argparse.ArgumentParser(prog="python -m pipeline.demo_corpus", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run the offline Openverse server in the foreground")
    s.add_argument("--port", type=int, default=0)
    s.add_argument("--seed", type=int, default=0)
    w = sub.add_parser("write", help="write the corpus files and truth.json to a folder")
    w.add_argument("folder", type=Path)
    w.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    corpus = build_corpus(args.seed)
    if args.cmd == "write":
        print(corpus.write(args.folder))
        return 0
    server = ThreadingHTTPServer(("127.0.0.1", args.port or free_port()), make_handler(corpus))
    server.daemon_threads = True
    print(f"offline Openverse API at http://127.0.0.1:{server.server_address[1]} ({len(corpus.files)} files)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
