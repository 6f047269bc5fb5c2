"""The real Label Studio for tests (crowd and boxes): the `labelstudio` fixture lives in conftest.py, so a test
session starts one server however many modules use it (a session fixture imported into each module would be one
server per module). This module holds its handle and the helpers tests share.

Set SF_LABELSTUDIO_URL, SF_LABELSTUDIO_TOKEN and SF_LABELSTUDIO_FILES_ROOT to use a server already running.

`labelstudio` gives url, token (admin), files_root (stores made with `new_store()` live under it, so their
images are served by Label Studio's local-files endpoint), admin() -> CrowdClient, annotators(profiles) ->
logged-in simulated annotators, and `server` (to restart it in fault tests). Stopped by PID at the end.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from crowd.client import CrowdClient
from crowd.server import LabelStudioServer, start_labelstudio
from crowd.simulate import Annotator, Profile, make_annotators
from pipeline.store import LocalStore

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class LabelStudioHandle:
    server: LabelStudioServer
    files_root: Path

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def token(self) -> str:
        return self.server.token

    def admin(self, retries: int = 5, backoff_s: float = 0.5) -> CrowdClient:
        return CrowdClient(self.url, self.token, retries=retries, backoff_s=backoff_s)

    def new_store(self) -> LocalStore:
        return LocalStore(self.files_root / f"store-{uuid.uuid4().hex[:8]}")

    def annotators(self, profiles: list[Profile], prefix: str | None = None, password: str = "sim-pass-1234") -> list[Annotator]:
        return make_annotators(self.admin(), profiles, prefix=prefix or f"sim{uuid.uuid4().hex[:6]}", password=password)

    def settings(self, store: LocalStore, **crowd):
        from pipeline.config import load_settings

        values = {"url": self.url, "token": self.token, "pseudonym_key": "test-pseudonym-key",
                  "files_root": str(self.files_root), "project_prefix": f"t{uuid.uuid4().hex[:6]}", **crowd}
        return load_settings(env={}, overrides={"store": {"url": str(store.root)}, "crowd": values})


def make_images(store, n: int, *, seed: int = 0, size: tuple[int, int] = (96, 72), fish: bool = False):
    """n small distinct JPEGs put into the store; returns an `images`-table-shaped DataFrame.
    fish=True paints a recognisable (cartoon) fish instead of noise, for screenshots."""
    import hashlib
    import io

    import numpy as np
    import pandas as pd
    from PIL import Image

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        img = Image.fromarray(arr)
        if fish:
            img = _fish(size, i)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
        data = buf.getvalue()
        rows.append({"image_id": hashlib.sha256(data).hexdigest(), "width": size[0], "height": size[1], "format": "JPEG",
                     "n_bytes": len(data), "phash": None, "storage_key": store.put_content(data, ".jpg"),
                     "first_url": f"http://example.org/{seed}/{i}.jpg", "status": "accepted", "reject_reason": None})
    df = pd.DataFrame(rows)
    from pipeline.schemas import arrow_schema

    for f in arrow_schema("images"):  # columns other stages add later (nullable) stay empty here
        if f.name not in df.columns:
            df[f.name] = None
    store.write_table("images", df)
    return df


def _fish(size: tuple[int, int], i: int):
    from PIL import Image, ImageDraw

    w, h = size
    img = Image.new("RGB", size, (70 + 10 * i, 130, 180))
    d = ImageDraw.Draw(img)
    d.ellipse([w * 0.25, h * 0.35, w * 0.7, h * 0.65], fill=(150, 140, 60), outline=(60, 60, 20), width=3)
    d.polygon([(w * 0.68, h * 0.5), (w * 0.85, h * 0.35), (w * 0.85, h * 0.65)], fill=(130, 120, 50))
    d.ellipse([w * 0.3, h * 0.45, w * 0.34, h * 0.5], fill=(200, 40, 30))
    return img


SYNSETS = [
    {"wnid": "n01440764", "name": "tench.n.01", "lemmas": ["tench", "Tinca tinca"],
     "gloss": "freshwater dace-like game fish of Europe and western Asia noted for ability to survive outside water"},
    {"wnid": "n02084071", "name": "dog.n.01", "lemmas": ["dog", "domestic dog", "Canis familiaris"],
     "gloss": "a member of the genus Canis that has been domesticated by man since prehistoric times"},
]


def write_synsets(store):
    import pandas as pd

    df = pd.DataFrame([{**s, "depth": 5, "parent_wnids": [], "lexname": "noun.animal", "is_leaf": True, "queries": []}
                       for s in SYNSETS])
    store.write_table("synsets", df)
    return df


# One entry per session server handed out (started or reused). conftest.py's pytest_sessionfinish fails the run when
# there is more than one: the `labelstudio` fixture imported into a module, or another session fixture calling
# start_session_labelstudio, would start a server per module. (test_airflow_celery and test_crowd_onboarding start
# their own on purpose, through crowd.server / `crowd serve`, not through here.)
SESSION_SERVERS: list[str] = []


def start_session_labelstudio(artifacts_dir: Path):
    """The one Label Studio of a test session (conftest's `labelstudio` fixture): yields a handle, then stops it."""
    SESSION_SERVERS.append(os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0])
    external = os.environ.get("SF_LABELSTUDIO_URL")
    if external:  # reuse a running server (development, or CI with a service container); it is not stopped here
        srv = LabelStudioServer(url=external, token=os.environ["SF_LABELSTUDIO_TOKEN"], username="", password="",
                                data_dir=Path("."), files_root=Path(os.environ["SF_LABELSTUDIO_FILES_ROOT"]))
        yield LabelStudioHandle(srv, srv.files_root)
        return
    base = Path(tempfile.mkdtemp(prefix="sf-ls-"))
    files_root = base / "files"
    files_root.mkdir()
    server = start_labelstudio(base / "data", files_root=files_root, log_path=artifacts_dir / "label-studio.log",
                               timeout=float(os.environ.get("SF_LS_TIMEOUT", "240")))
    try:
        yield LabelStudioHandle(server, files_root)
    finally:
        server.stop()
        assert server.service is None or server.service.process.poll() is not None
        shutil.rmtree(base, ignore_errors=True)


def browser_login(driver, url: str, email: str, password: str) -> None:
    """Log in through Label Studio's form, as an annotator would, and wait until the login page is left."""
    from conftest import wait_until
    from selenium.webdriver.common.by import By

    driver.get(f"{url}/user/login/")
    driver.find_element(By.NAME, "email").send_keys(email)
    driver.find_element(By.NAME, "password").send_keys(password)
    driver.find_element(By.CSS_SELECTOR, "button[type=submit], input[type=submit]").click()
    wait_until(lambda: "/user/login" not in driver.current_url, 60, "login")


def crash_before_tasks_write(monkeypatch) -> None:
    """Make push die right after the import call and before the `tasks` table write (KeyboardInterrupt)."""
    from crowd import push as push_mod

    real_append = push_mod._append

    def crash(store_, name, old, new, key):
        if name == "tasks":
            raise KeyboardInterrupt("simulated crash between the import call and the table write")
        return real_append(store_, name, old, new, key)

    monkeypatch.setattr(push_mod, "_append", crash)
