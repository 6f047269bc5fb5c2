"""Session-scoped real Label Studio for tests (crowd and boxes). Import the fixture into a test module:

    from fixtures_labelstudio import labelstudio  # noqa: F401

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

import pytest

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


@pytest.fixture(scope="session")
def labelstudio(artifacts_dir):
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
