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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from pipeline.errors import UserError

ENV_PREFIX = "SYNSETFORGE__"
DEFAULT_DATA_ROOT = "data"


class ConfigError(UserError):
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
    allowed_licenses: list[str] | None = Field(
        None, description="keep only these license families, e.g. [cc0, pdm, cc-by, cc-by-sa]; None keeps all"
    )
    flickr_api_key: SecretStr | None = None
    openverse_url: str = Field("https://api.openverse.org", description="Openverse API base URL")
    wikimedia_url: str = Field("https://commons.wikimedia.org/w/api.php", description="MediaWiki API endpoint")
    flickr_url: str = Field("https://api.flickr.com/services/rest/", description="Flickr REST endpoint")
    page_size: int = Field(50, ge=1, le=500, description="results asked per API page (each API caps it)")
    http_timeout_s: float = Field(20.0, gt=0, description="connect and read timeout for search API calls")
    max_retries: int = Field(4, ge=0, description="retries of a search API call on 429 / 5xx / timeout")
    max_retry_after_s: float = Field(120.0, ge=0, description="longest Retry-After honoured before giving up")
    url_list: str | None = Field(None, description="txt / csv / parquet file of image URLs (url, optional wnid)")
    local_dir: str | None = Field(None, description="folder with one sub-folder of images per wnid")
    local_license: str | None = Field(
        None, description="license of local_dir photos an attribution sidecar does not describe (e.g. cc-by-4.0)")
    local_creator: str | None = Field(None, description="creator of local_dir photos a sidecar does not describe")
    s3_prefix: str | None = Field(None, description="s3://bucket/prefix with one sub-prefix of images per wnid")
    user_agent: str = Field("synsetforge/0.1 (dataset builder)", description="sent to search APIs")
    shard_size: int = Field(50, ge=1, description="synsets per mapped collect/ingest task of the collect DAG")


class IngestSettings(Section):
    concurrency: int = Field(32, ge=1)
    per_host: int = Field(4, ge=1)
    max_bytes: int = Field(20_000_000, ge=1)
    allow_private_addresses: bool = False
    allowed_networks: list[str] = Field(
        default_factory=list, description="CIDRs fetched even though private/loopback, e.g. [127.0.0.0/8] in tests"
    )
    connect_timeout_s: float = Field(10.0, gt=0)
    read_timeout_s: float = Field(20.0, gt=0, description="longest wait for any single read")
    total_timeout_s: float = Field(60.0, gt=0, description="whole download of one URL, redirects included")
    max_retries: int = Field(3, ge=0, description="retries on 429 / 5xx / connection errors")
    backoff_s: float = Field(1.0, ge=0, description="first retry delay; doubles each time")
    max_retry_after_s: float = Field(60.0, ge=0, description="a longer Retry-After settles the URL as http_429")
    max_redirects: int = Field(5, ge=0)
    user_agent: str = "synsetforge/0.1 (dataset builder)"
    min_side: int = Field(32, ge=1, description="smaller images are rejected as too_small")
    max_side: int = Field(20_000, ge=1, description="larger images are rejected as too_large")
    max_pixels: int = Field(89_478_485, ge=1, description="Pillow's decompression-bomb limit")
    allowed_formats: list[str] = Field(default_factory=lambda: ["jpeg", "png", "gif", "webp", "bmp", "tiff"])
    allow_animated: bool = Field(False, description="keep the first frame of animated images instead of rejecting")
    jpeg_quality: int = Field(90, ge=50, le=100, description="quality of the one re-encode of non-clean images")
    processes: int = Field(1, ge=1, description="worker processes (each runs `concurrency` download threads)")
    flush_every: int = Field(1000, ge=1, description="rows per checkpoint part (resume granularity)")
    reuse_validation: bool = Field(True, description="bytes seen before in this run reuse their validation outcome")


class QCSettings(Section):
    method: str = Field(
        "adaptive-ds", pattern="^(adaptive-ds|ds|mv|confidence-table)$",
        description="how votes become labels: adaptive-ds (worker-aware posterior + stopping rule), ds (Dawid-Skene), "
                    "mv (majority vote) or confidence-table (ImageNet's per-synset table)")
    accept_at: float = Field(0.99, gt=0.5, lt=1.0)
    reject_at: float = Field(0.01, gt=0.0, lt=0.5)
    max_votes_per_image: int = Field(10, ge=1)
    initial_votes: int = Field(2, ge=1, description="votes asked for an image nobody has voted on yet")
    max_batch: int | None = Field(None, ge=1, description="most votes asked per image per push (None = as many as needed)")
    budget_per_synset: int | None = Field(None, ge=1, description="total votes a synset may use (None = no limit)")
    prior_accuracy: float = Field(0.8, gt=0.5, lt=1.0, description="assumed accuracy of a worker with no history "
                                  "while the crowd's own prior cannot be estimated (or calibrated is false)")
    prior_strength: float = Field(4.0, ge=0.0, description="pseudo-answers behind prior_accuracy")
    calibrated: bool = Field(True, description="adaptive-ds: learn the worker prior from the crowd (empirical Bayes) "
                             "and weigh each vote by its worker's record on other images; false = the fixed prior")
    calibration_share: float = Field(0.1, gt=0.0, le=1.0, description="confidence-table: share of each synset's "
                                     "images voted max_votes_per_image times to build its table")
    min_votes_to_flag: int = Field(20, ge=1)
    min_gold_to_flag: int = Field(5, ge=1)
    gold_min_accuracy: float = Field(0.6, ge=0.0, le=1.0)
    block_below_accuracy: float = Field(0.75, ge=0.0, lt=1.0, description="flag (block) workers estimated below this")
    ds_max_iter: int = Field(100, ge=1)
    team: list[str] = Field(
        default_factory=list, description="the annotation team as worker pseudonyms (w-..., as `crowd workers` lists "
        "them); empty = everyone who voted within active_days of the newest vote")
    active_days: float = Field(
        14.0, gt=0.0, description="with no qc.team: annotators who voted within this many days of the newest vote are "
        "the active team; QC never asks a pair for more votes than active annotators who have not voted on it")
    small_team_decide: bool = Field(
        True, description="a pair every active annotator has voted on that is still undecided (needs_new_annotator) "
        "is decided at small_team_accept_at / small_team_reject_at; false leaves it pending")
    small_team_accept_at: float = Field(
        0.9, gt=0.5, lt=1.0, description="small team: accept a needs_new_annotator pair at P(yes) >= this")
    small_team_reject_at: float = Field(
        0.25, gt=0.0, lt=0.5, description="small team: reject a needs_new_annotator pair at P(yes) <= this")

    @model_validator(mode="after")
    def _small_team_bars(self) -> QCSettings:
        if self.small_team_accept_at > self.accept_at or self.small_team_reject_at < self.reject_at:
            raise ValueError(f"the small-team bars must lie between the normal ones: reject_at {self.reject_at} <= "
                             f"small_team_reject_at {self.small_team_reject_at} and small_team_accept_at "
                             f"{self.small_team_accept_at} <= accept_at {self.accept_at}")
        return self


class BoxesSettings(BaseModel):
    """Settings of the box loop (`[boxes]`); its policy is read by the state machine in pipeline.boxes."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    draw_overlap: int = Field(1, ge=1, description="drawings per draw task; >1 consolidates several drawers")
    quality_overlap: int = Field(2, ge=1, description="quality votes asked first for a drawn box")
    quality_max_votes: int = Field(3, ge=1, description="split votes get one more vote at a time up to this")
    coverage_overlap: int = Field(2, ge=1, description="coverage votes asked first")
    coverage_max_votes: int = Field(3, ge=1, description="split coverage votes get one more at a time up to this")
    max_boxes: int = Field(12, ge=1, description="accepted boxes per (image, wnid) before the loop stops")
    max_tasks: int = Field(40, ge=3, description="tasks per (image, wnid) before the loop gives up")
    accept_above: float = Field(0.5, ge=0.0, lt=1.0, description="a box is accepted when P(good) > this")
    method: str = Field("majority", pattern="^(majority|dawid_skene)$", description="QC method for quality votes")
    cluster_iou: float = Field(0.5, gt=0.0, le=1.0, description="IoU that puts two drawings in one cluster")
    duplicate_iou: float = Field(0.7, gt=0.0, le=1.0, description="a new box this close to an accepted one is a duplicate")
    min_size_px: float = Field(2.0, ge=0.0, description="boxes thinner than this (after clamping) are degenerate")
    max_images_per_wnid: int | None = Field(None, ge=1, description="box only a sample of each synset's images")
    project_prefix: str = Field("synsetforge boxes", description="Label Studio project titles start with this")


class CrowdSettings(Section):
    url: str | None = Field(None, description="Label Studio base URL")
    public_url: str | None = Field(
        None, description="Label Studio URL as annotators' browsers see it (the CORS origin); default url")
    token: SecretStr | None = None
    pseudonym_key: SecretStr | None = None
    gold_rate: float = Field(0.1, ge=0.0, lt=1.0, description="share of pushed tasks that are gold controls")
    project_prefix: str = Field("synsetforge", min_length=1, description="project titles are '<prefix> <kind>', then "
                                "'<prefix> <kind> <n>' for the kind's n-th project")
    default_overlap: int = Field(3, ge=1, description="annotations per task when the push plan says none")
    batch_size: int = Field(500, ge=1, le=10_000, description="tasks per import call")
    project_size: int = Field(
        50_000, ge=1, description="tasks per Label Studio project: a full project gets no more tasks and the next push "
        "opens '<prefix> <kind> <n>'; a full project with no open task is archived and no longer pulled")
    pull_lag_s: float = Field(
        60.0, ge=0.0, description="pull asks for task changes since its watermark minus this many seconds, so an "
        "annotation saved while the last pull ran is not missed (annotations read twice are dropped by their key)")
    files_root: str | None = Field(
        None, description="LOCAL_FILES_DOCUMENT_ROOT of the Label Studio server (default: the local store's root)")
    image_url_expiry_s: int = Field(7 * 24 * 3600, ge=60, description="lifetime of presigned S3 image URLs")
    gold_min_n: int = Field(5, ge=1, description="gold answers a worker needs before they can be flagged")
    gold_min_accuracy: float = Field(0.7, ge=0.0, le=1.0, description="workers below this gold accuracy are flagged")
    data_dir: str = Field(".labelstudio", description="data dir of the server `synsetforge crowd serve` starts")
    retries: int = Field(5, ge=0, description="retries of a failed Label Studio call, with exponential backoff")
    grid_size: int = Field(48, ge=2, le=200, description="images per grid task (ImageNet used 48)")
    grid_positives: int = Field(3, ge=0, description="known positives (gold) per grid task, when there are any")
    grid_negatives: int = Field(3, ge=0, description="known negatives (gold) per grid task, when there are any")
    gold_seed_file: str | None = Field(
        None, description="expert-checked controls (CSV or Parquet: image_id or url, wnid, answer yes/no)")
    gold_min_confidence: float = Field(
        0.999, gt=0.5, lt=1.0, description="QC confidence an accepted pair needs to become a known positive")
    gold_min_workers: int = Field(
        3, ge=1, description="unflagged workers who must have said yes before an accepted pair becomes gold")
    gold_positives_per_wnid: int = Field(
        3, ge=0, description="known positives per synset taken from the crowd's results (each leaves the labels)")
    gold_max_positive_share: float = Field(
        0.1, ge=0.0, le=1.0, description="a synset gives at most this share of its accepted images as known positives")
    gold_negatives_per_wnid: int = Field(
        5, ge=0, description="known negatives per synset: images accepted for a synset in another subtree")
    auto_block: bool = Field(False, description="the crowd DAG blocks the accounts QC or gold flags")
    block_exempt: list[str] = Field(
        default_factory=list, description="worker pseudonyms auto_block leaves alone (e.g. unblocked by hand)")
    admin_password: SecretStr | None = Field(
        None, description="password of the token's account; blocking goes through Label Studio's /admin/ site")


class ReleaseSettings(Section):
    val_per_class: int | float = Field(
        50, description="val images per class: a count (>= 0) or a fraction in (0, 1) of each class's images")
    test_per_class: int | float = Field(
        100, description="test images per class: a count (>= 0) or a fraction in (0, 1) of each class's images")
    split_salt: str = "synsetforge"
    neardup_check: bool = Field(True, description="drop train images that are near-duplicates of val/test images")
    report_thumbs_per_class: int = Field(8, ge=0, description="thumbnails per class in report.html")
    report_max_thumb_classes: int = Field(200, ge=0, description="classes shown in the thumbnail grid")

    @field_validator("val_per_class", "test_per_class")
    @classmethod
    def _quota(cls, v: int | float) -> int | float:
        """A whole number is a count (50.0 is 50); anything else must be a fraction strictly between 0 and 1."""
        if isinstance(v, bool):
            raise ValueError("expected a count or a fraction, not a boolean")
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, int):
            if v < 0:
                raise ValueError("a count must be >= 0")
            return v
        if not 0.0 < v < 1.0:
            raise ValueError("a fraction must lie strictly between 0 and 1 (e.g. 0.1); write a count as a whole "
                             "number (e.g. 50)")
        return v


class DetSettings(Section):
    """DET (`[det]`): presence of every class in every image asked as a tree of questions, then boxes for every
    present class. Read by pipeline.presence (the presence loop) and the DET box loop."""

    scheme: str = Field("checklist", pattern="^(question|checklist)$",
                        description="question: one yes/no question per task; checklist: a node's children in one task")
    questions_per_round: int = Field(2, ge=1, description="question scheme: questions pushed per image at a time")
    checklist_max: int = Field(12, ge=2, description="most items per checklist (a longer list is split)")
    initial_votes: int | None = Field(
        None, ge=1, description="answers asked of a new question (None: what a typical worker needs to clear a no)")
    max_votes: int = Field(25, ge=1, description="answers per (image, node) before the more probable answer stands")
    accept_at: float = Field(0.99, gt=0.5, lt=1.0, description="present when P(present | answers, co-occurrence) >= this")
    miss_factor: float = Field(
        300.0, gt=1.0, description="absent only when the answers are this many times likelier for an absent object, "
        "times the questions on the node's longest path down to a class (so a class is missed at most 1 in this)")
    gold_positives: int = Field(3, ge=0, description="known positives mixed into every gold_batch presence tasks")
    gold_negatives: int = Field(3, ge=0, description="known negatives mixed into every gold_batch presence tasks")
    gold_batch: int = Field(48, ge=1, description="presence tasks per gold_positives + gold_negatives controls")
    gold_seed_file: str | None = Field(
        None, description="expert-annotated control images (CSV or Parquet: image_id, node_id or wnid, answer)")
    max_images: int | None = Field(None, ge=1, description="annotate only a stable sample of the accepted images")
    box_kind: str = Field("extreme", pattern="^(draw|extreme)$",
                          description="DET boxes by drawing (ILSVRC) or by four extreme clicks (Papadopoulos et al.)")
    val_images: int | float = Field(
        0.2, description="DET release val images: a count (>= 0) or a fraction in (0, 1) of the fully annotated images")
    test_images: int | float = Field(
        0.2, description="DET release test images: a count (>= 0) or a fraction in (0, 1) of the fully annotated images")

    @field_validator("val_images", "test_images")
    @classmethod
    def _quota(cls, v: int | float) -> int | float:
        return ReleaseSettings._quota(v)


class Settings(Section):
    store: StoreSettings = Field(default_factory=StoreSettings)
    vocabulary: VocabularySettings = Field(default_factory=VocabularySettings)
    collect: CollectSettings = Field(default_factory=CollectSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    qc: QCSettings = Field(default_factory=QCSettings)
    crowd: CrowdSettings = Field(default_factory=CrowdSettings)
    release: ReleaseSettings = Field(default_factory=ReleaseSettings)
    boxes: BoxesSettings = Field(default_factory=BoxesSettings)
    det: DetSettings = Field(default_factory=DetSettings)

    @field_validator("*", mode="before")
    @classmethod
    def _none_is_default(cls, v: Any) -> Any:
        return {} if v is None else v

    def digest(self) -> str:
        """sha256 of the non-secret settings: recorded in release manifests."""
        data = self.model_dump(mode="json")
        blob = json.dumps(_drop_secrets(self, data), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


def _annotation_has(annotation: Any, kind: type) -> bool:
    """Whether a field's type is `kind`, or a list / Optional / union containing it (SecretStr | None, list[str])."""
    import typing

    if annotation is kind:
        return True
    origin = typing.get_origin(annotation)
    if origin is not None and origin is kind:
        return True
    return any(_annotation_has(a, kind) for a in typing.get_args(annotation))


def _secret_paths(model: BaseModel, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = []
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            paths += _secret_paths(value, prefix + (name,))
        elif _annotation_has(field.annotation, SecretStr):
            paths.append(prefix + (name,))
    return paths


def _is_list_field(section: str, field: str) -> bool:
    model = Settings.model_fields.get(section)
    info = model.annotation.model_fields.get(field) if model is not None and isinstance(model.annotation, type) else None
    return info is not None and _annotation_has(info.annotation, list)


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
        elif _is_list_field(section, field):  # a comma list: "a,b"; one value; or "" for an empty list
            parsed = [t.strip() for t in text.split(",") if t.strip()]
        else:
            parsed = text
        out.setdefault(section, {})[field] = parsed
    return out


def env_name(section: str, field: str) -> str:
    """The environment variable of a setting: SYNSETFORGE__SECTION__FIELD."""
    return f"{ENV_PREFIX}{section.upper()}__{field.upper()}"


def describe_settings(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Every setting of the effective configuration: key, value (a set secret shows as **********), source
    (default, file, env, command line), environment variable and description."""
    env = os.environ if env is None else env
    settings = load_settings(path, env=env, overrides=overrides)
    path = path or env.get("SYNSETFORGE_CONFIG")
    from_file = tomllib.loads(Path(path).read_text()) if path else {}
    from_env = _env_overrides(env)
    secrets = set(_secret_paths(settings))
    rows = []
    for section in Settings.model_fields:
        model = getattr(settings, section)
        for name, field in type(model).model_fields.items():
            value = getattr(model, name)
            if name in (overrides or {}).get(section, {}):
                source = "command line"
            elif name in from_env.get(section, {}):
                source = "env"
            elif name in from_file.get(section, {}):
                source = "file"
            else:
                source = "default"
            secret = (section, name) in secrets
            shown = None if secret and value is None else ("**********" if secret else _jsonable(value))
            rows.append({"key": f"{section}.{name}", "value": shown, "source": source, "env": env_name(section, name),
                         "secret": secret, "description": field.description or ""})
    return rows


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


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
        for secret in _secret_paths(Settings()):
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
