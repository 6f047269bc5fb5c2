"""One validated configuration object, read from a TOML file and SYNSETFORGE__SECTION__FIELD env vars.

Precedence: defaults < file < environment. Secrets are `SecretStr` fields that are only accepted from
the environment (or an Airflow Connection passed in by a DAG), so they never live in a committed file
and never print: `repr(settings)` shows `**********`.

    >>> s = load_settings(env={"SYNSETFORGE__STORE__URL": "/tmp/x", "SYNSETFORGE__VOCABULARY__MAX_DEPTH": "3"})
    >>> (s.store.url, s.vocabulary.max_depth)
    ('/tmp/x', 3)
"""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
from pathlib import Path
from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

ENV_PREFIX = "SYNSETFORGE__"
DEFAULT_DATA_ROOT = "data"


class ConfigError(ValueError):
    """The configuration is invalid; the message lists every problem."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StoreSettings(Section):
    url: str = Field(DEFAULT_DATA_ROOT, description="local folder, file:// URL or s3://bucket/prefix")
    s3_endpoint_url: str | None = Field(None, description="S3 API endpoint (MinIO, moto); None = AWS")


class VocabularySettings(Section):
    roots: list[str] = Field(default_factory=list, description="root wnids or synset names, e.g. n02084071 or dog.n.01")
    max_depth: int | None = Field(None, ge=0, description="levels below each root (0 = the root only)")
    leaves_only: bool = False
    wnid_file: str | None = Field(None, description="file with one wnid per line, as ImageNet writes them")
    exclude: list[str] = Field(default_factory=list, description="wnids to drop, with everything below them")
    multilingual: bool = Field(True, description="add Open Multilingual Wordnet queries when its data is present")
    wordnet_dir: str | None = Field(None, description="folder holding corpora/wordnet (nltk data dir)")


class CollectSettings(Section):
    sources: list[str] = Field(default_factory=lambda: ["local_dir"])
    per_synset_budget: int = Field(1000, ge=1)
    allowed_licenses: list[str] | None = None
    flickr_api_key: SecretStr | None = None


class IngestSettings(Section):
    concurrency: int = Field(32, ge=1)
    per_host: int = Field(4, ge=1)
    max_bytes: int = Field(20_000_000, ge=1)
    allow_private_addresses: bool = False


class QCSettings(Section):
    accept_at: float = Field(0.99, gt=0.5, lt=1.0)
    reject_at: float = Field(0.01, gt=0.0, lt=0.5)
    max_votes_per_image: int = Field(10, ge=1)


class CrowdSettings(Section):
    url: str | None = Field(None, description="Label Studio base URL")
    token: SecretStr | None = None
    pseudonym_key: SecretStr | None = None
    gold_rate: float = Field(0.1, ge=0.0, le=1.0)


class ReleaseSettings(Section):
    val_per_class: int = Field(50, ge=0)
    test_per_class: int = Field(100, ge=0)
    split_salt: str = "synsetforge"


class Settings(Section):
    store: StoreSettings = Field(default_factory=StoreSettings)
    vocabulary: VocabularySettings = Field(default_factory=VocabularySettings)
    collect: CollectSettings = Field(default_factory=CollectSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    qc: QCSettings = Field(default_factory=QCSettings)
    crowd: CrowdSettings = Field(default_factory=CrowdSettings)
    release: ReleaseSettings = Field(default_factory=ReleaseSettings)

    @field_validator("*", mode="before")
    @classmethod
    def _none_is_default(cls, v: Any) -> Any:
        return {} if v is None else v

    def digest(self) -> str:
        """sha256 of the non-secret settings: recorded in release manifests."""
        data = self.model_dump(mode="json")
        blob = json.dumps(_drop_secrets(self, data), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


def _secret_paths(model: BaseModel, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = []
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            paths += _secret_paths(value, prefix + (name,))
        elif field.annotation is not None and "SecretStr" in str(field.annotation):
            paths.append(prefix + (name,))
    return paths


def _drop_secrets(model: BaseModel, data: dict[str, Any]) -> dict[str, Any]:
    for path in _secret_paths(model):
        node = data
        for part in path[:-1]:
            node = node[part]
        node.pop(path[-1], None)
    return data


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in env.items():
        if not key.startswith(ENV_PREFIX):
            continue
        parts = key[len(ENV_PREFIX):].lower().split("__")
        if len(parts) != 2:
            raise ConfigError(f"{key}: expected {ENV_PREFIX}SECTION__FIELD")
        section, field = parts
        text = value.strip()
        if text.startswith(("[", "{")):
            try:
                parsed: Any = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{key}: not valid JSON: {exc}") from None
        elif "," in text and field in ("roots", "exclude", "sources", "allowed_licenses"):
            parsed = [t.strip() for t in text.split(",") if t.strip()]
        else:
            parsed = text
        if field in ("roots", "exclude", "sources", "allowed_licenses") and isinstance(parsed, str):
            parsed = [parsed] if parsed else []
        out.setdefault(section, {})[field] = parsed
    return out


def load_settings(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Settings:
    """Build Settings from defaults, an optional TOML file, the environment and explicit overrides.

    The file path may also come from SYNSETFORGE_CONFIG. Secrets found in the file are refused.
    """
    env = os.environ if env is None else env
    path = path or env.get("SYNSETFORGE_CONFIG")
    data: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"configuration file {p} does not exist")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"configuration file {p}: {exc}") from None
        probe = Settings.model_validate(data) if data else Settings()
        for secret in _secret_paths(probe):
            node: Any = data
            for part in secret:
                node = node.get(part) if isinstance(node, dict) else None
            if node is not None:
                raise ConfigError(
                    f"{p}: secret {'.'.join(secret)} must come from the environment "
                    f"({ENV_PREFIX}{'__'.join(s.upper() for s in secret)}), not a file"
                )
    for layer in (_env_overrides(env), overrides or {}):
        for section, values in layer.items():
            data.setdefault(section, {}).update({k: v for k, v in values.items()})
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid configuration: {problems}") from None
