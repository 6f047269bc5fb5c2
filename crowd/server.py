"""Start and stop a local Label Studio server (1.23.x, installed in .venv-labelstudio).

The server runs on 127.0.0.1 on a free port with its own data dir, a pre-created admin with a known legacy
API token, the version check off, and local-files serving rooted at the store folder so task images resolve
as same-origin URLs (no CORS problem in the annotator's browser). It is ready when GET /health says UP; a
fresh SQLite DB needs 40-65 s of migrations, so the default wait is 3 minutes. Stop it by PID.

    >>> srv = start_labelstudio(Path("/tmp/ls-doc"))        # doctest: +SKIP
    >>> srv.url, srv.token                                   # doctest: +SKIP
    ('http://127.0.0.1:40123', '...')
    >>> srv.stop()                                           # doctest: +SKIP
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.services import Service, free_port, start_service

ROOT = Path(__file__).resolve().parent.parent
LS_VENV = Path(os.environ.get("SYNSETFORGE_LABELSTUDIO_VENV", ROOT / ".venv-labelstudio"))
ADMIN_EMAIL = "admin@synsetforge.local"


def labelstudio_binary() -> Path:
    exe = LS_VENV / "bin" / "label-studio"
    if not exe.exists():
        raise FileNotFoundError(
            f"Label Studio is not installed at {exe}; run `make setup` (infra/setup.sh) or set "
            "SYNSETFORGE_LABELSTUDIO_VENV to the venv holding label-studio 1.23.x"
        )
    return exe


@dataclass
class LabelStudioServer:
    """A running server: its URL, the admin's token (a secret: never print it) and the process."""

    url: str
    token: str = field(repr=False)
    username: str
    password: str = field(repr=False)
    data_dir: Path
    files_root: Path | None
    service: Service | None = None
    port: int = 0
    database_url: str | None = field(default=None, repr=False)

    @property
    def pid(self) -> int | None:
        return self.service.pid if self.service else None

    def stop(self, timeout: float = 30.0) -> None:
        if self.service is not None:
            self.service.stop(timeout)

    def restart(self, timeout: float = 180.0) -> None:
        """Stop and start again on the same port and data dir (used by fault tests)."""
        self.stop()
        fresh = start_labelstudio(
            self.data_dir, port=self.port, token=self.token, username=self.username, password=self.password,
            files_root=self.files_root, database_url=self.database_url, timeout=timeout,
        )
        self.service = fresh.service


def postgres_env(database_url: str) -> dict[str, str]:
    """Label Studio's variables for a PostgreSQL database (its settings read DJANGO_DB=default and POSTGRE_*)."""
    from urllib.parse import unquote, urlsplit

    url = urlsplit(database_url)
    if url.scheme not in ("postgresql", "postgres") or not url.hostname or not url.path.strip("/"):
        raise ValueError("database_url must be postgresql://user:password@host:port/name")
    return {"DJANGO_DB": "default", "POSTGRE_NAME": url.path.strip("/"), "POSTGRE_USER": unquote(url.username or ""),
            "POSTGRE_PASSWORD": unquote(url.password or ""), "POSTGRE_HOST": url.hostname,
            "POSTGRE_PORT": str(url.port or 5432)}


def _health_up(status: int, body: bytes) -> bool:
    return status == 200 and b"UP" in body


def start_labelstudio(
    data_dir: Path,
    *,
    port: int | None = None,
    token: str | None = None,
    username: str = ADMIN_EMAIL,
    password: str | None = None,
    files_root: Path | None = None,
    log_path: Path | None = None,
    database_url: str | None = None,
    timeout: float = 180.0,
) -> LabelStudioServer:
    """Start Label Studio and wait for /health. `files_root` enables local-files serving under that folder.
    `database_url` (postgresql://user:password@host:port/name) puts its database on PostgreSQL instead of SQLite."""
    exe = labelstudio_binary()
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    token = token or secrets.token_hex(20)  # legacy tokens are at most 40 characters
    password = password or secrets.token_urlsafe(16)
    env = {
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        "LABEL_STUDIO_USERNAME": username,
        "LABEL_STUDIO_PASSWORD": password,
        "LABEL_STUDIO_USER_TOKEN": token,
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "LABEL_STUDIO_LATEST_VERSION_CHECK": "false",
        "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
        "SENTRY_DSN": "",
        "FRONTEND_SENTRY_DSN": "",
        "COLLECT_ANALYTICS": "false",
        "DJANGO_DB": "sqlite",
        "DEBUG": "false",
        "LOG_LEVEL": "WARNING",
    }
    if database_url is not None:
        env.update(postgres_env(database_url))
    if files_root is not None:
        files_root = Path(files_root).resolve()
        env["LOCAL_FILES_SERVING_ENABLED"] = "true"
        env["LOCAL_FILES_DOCUMENT_ROOT"] = str(files_root)
    cmd = [
        str(exe), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port),
        "--data-dir", str(data_dir), "--log-level", "WARNING",
    ]
    service = start_service(
        "label-studio", cmd, url=f"http://127.0.0.1:{port}", ready_path="/health", accept=_health_up,
        env=env, log_path=log_path or data_dir / "label-studio.log", timeout=timeout, cwd=str(data_dir),
    )
    return LabelStudioServer(
        url=service.url, token=token, username=username, password=password, data_dir=data_dir,
        files_root=files_root, service=service, port=port,
    )
