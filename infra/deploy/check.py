"""Validate the scale-out deployment files without Docker or Kubernetes: parse them and cross-check every image,
variable, volume and path they name against the project.

    python infra/deploy/check.py                              # exit 0 and "ok", or one line per problem and exit 1
    python infra/deploy/check.py --chart-values values.yaml   # also check helm/values.yaml against a chart's defaults
                                                              # (e.g. from `helm show values apache-airflow/airflow`)

Each `*_problems` function is pure (parsed data in, list of messages out) so tests can feed it broken copies.

    >>> compose_variables("a: ${X}\\nb: $${NOT_ME} ${Y:-d} ${Z:?set Z}")
    {'X': None, 'Y': 'd', 'Z': None}
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = Path(__file__).resolve().parent
LOOPBACK = "127.0.0.1"
PLACEHOLDER = "change-me"
SECRET_WORDS = ("PASSWORD", "SECRET", "TOKEN", "FERNET", "PSEUDONYM")
CELERY_EXECUTOR = "CeleryExecutor"
MIN_WORKERS = 2

# Keys of the official Airflow Helm chart used (or likely to be used) here, as in the chart's values.yaml in
# apache/airflow at commit d6ba4817823e8ffd2d3f676fc92aa7381e7d30f0 (chart for Airflow 3.x, defaultAirflowTag 3.1.3).
# None = a leaf or a free-form map (resources, annotations, ...): anything below it is accepted.
_GROOMER = {"enabled": None, "command": None, "args": None, "retentionDays": None, "frequencyMinutes": None,
            "resources": None, "securityContexts": None, "containerLifecycleHooks": None, "env": None}
_PERSISTENCE = {"enabled": None, "size": None, "storageClassName": None, "annotations": None, "fixPermissions": None,
                "persistentVolumeClaimRetentionPolicy": None, "securityContexts": None, "containerLifecycleHooks": None}
_COMPONENT = {"enabled": None, "replicas": None, "command": None, "args": None, "env": None, "resources": None,
              "nodeSelector": None, "affinity": None, "tolerations": None, "labels": None, "annotations": None,
              "podAnnotations": None, "extraVolumes": None, "extraVolumeMounts": None, "extraContainers": None,
              "extraInitContainers": None, "securityContexts": None, "serviceAccount": None,
              "waitForMigrations": None, "priorityClassName": None, "topologySpreadConstraints": None,
              "livenessProbe": None, "revisionHistoryLimit": None, "logGroomerSidecar": _GROOMER}
CHART_KEYS: dict[str, Any] = {
    **dict.fromkeys([
        "fullnameOverride", "nameOverride", "useStandardNaming", "revisionHistoryLimit", "uid", "gid",
        "securityContext", "securityContexts", "containerLifecycleHooks", "airflowHome", "defaultAirflowRepository",
        "defaultAirflowTag", "defaultAirflowDigest", "airflowVersion", "nodeSelector", "affinity", "tolerations",
        "topologySpreadConstraints", "schedulerName", "labels", "imagePullSecrets", "ingress", "networkPolicies",
        "airflowPodAnnotations", "airflowConfigAnnotations", "airflowLocalSettings", "rbac", "executor",
        "allowPodLaunching", "allowJobLaunching", "env", "volumes", "volumeMounts", "secret",
        "enableBuiltInSecretEnvVars", "priorityClasses", "extraSecrets", "extraConfigMaps", "extraEnv", "extraEnvFrom",
        "data", "fernetKey", "fernetKeySecretName", "fernetKeySecretAnnotations", "apiSecretKey",
        "apiSecretAnnotations", "apiSecretKeySecretName", "jwtSecret", "jwtSecretAnnotations", "jwtSecretName",
        "webserverSecretKey", "webserverSecretAnnotations", "webserverSecretKeySecretName", "kerberos",
        "migrateDatabaseJob", "webserver", "flower", "statsd", "pgbouncer", "registry", "elasticsearch", "opensearch",
        "ports", "quotas", "limits", "cleanup", "databaseCleanup", "multiNamespaceMode", "podTemplate", "logs",
        "config",
    ]),
    "images": {"airflow": {"repository": None, "tag": None, "digest": None, "pullPolicy": None},
               "useDefaultImageForMigration": None, "migrationsWaitTimeout": None, "pod_template": None,
               "flower": None, "statsd": None, "redis": None, "pgbouncer": None, "pgbouncerExporter": None,
               "gitSync": None},
    "workers": {**_COMPONENT, "persistence": _PERSISTENCE, "keda": None, "hpa": None, "strategy": None,
                "updateStrategy": None, "terminationGracePeriodSeconds": None, "safeToEvict": None,
                "volumeClaimTemplates": None, "celery": None, "kubernetes": None},
    "scheduler": {**_COMPONENT, "startupProbe": None, "podDisruptionBudget": None, "strategy": None,
                  "updateStrategy": None, "safeToEvict": None, "hostAliases": None},
    "triggerer": {**_COMPONENT, "persistence": _PERSISTENCE, "keda": None, "strategy": None,
                  "updateStrategy": None, "terminationGracePeriodSeconds": None, "safeToEvict": None},
    "dagProcessor": {**_COMPONENT, "strategy": None, "terminationGracePeriodSeconds": None, "safeToEvict": None},
    "apiServer": {**{k: v for k, v in _COMPONENT.items() if k != "logGroomerSidecar"}, "hpa": None, "service": None,
                  "podDisruptionBudget": None, "strategy": None, "readinessProbe": None, "startupProbe": None,
                  "apiServerConfig": None, "apiServerConfigConfigMapName": None, "hostAliases": None},
    "createUserJob": {"enabled": None, "command": None, "args": None, "env": None, "resources": None,
                      "useHelmHooks": None, "applyCustomEnv": None, "ttlSecondsAfterFinished": None},
    "dags": {"mountPath": None,
             "persistence": {"enabled": None, "size": None, "storageClassName": None, "accessMode": None,
                             "existingClaim": None, "subPath": None, "annotations": None},
             "gitSync": {"enabled": None, "repo": None, "branch": None, "rev": None, "ref": None, "depth": None,
                         "maxFailures": None, "subPath": None, "credentialsSecret": None, "sshKeySecret": None,
                         "sshKey": None, "knownHosts": None, "period": None, "wait": None, "envFrom": None,
                         "containerName": None, "uid": None, "env": None, "resources": None}},
    "postgresql": {"enabled": None, "image": None, "auth": None},
    "redis": {"enabled": None, "terminationGracePeriodSeconds": None, "annotations": None, "serviceAccount": None,
              "service": None, "persistence": {"enabled": None, "size": None, "storageClassName": None,
                                               "annotations": None, "existingClaim": None},
              "resources": None, "passwordSecretName": None, "password": None, "nodeSelector": None,
              "affinity": None, "tolerations": None, "uid": None, "securityContexts": None},
}
CHART_FREE_FORM = {"config"}
# Sections owned by providers the image installs (requirements-deploy.txt) but the project venv does not: core
# Airflow only knows part of them, so their options are not checked here.
PROVIDER_SECTIONS = {"celery", "celery_broker_transport_options", "fab"}  # airflow.cfg sections; checked against Airflow's own option list instead


# ---------------------------------------------------------------------------------------------------- helpers

def load_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SystemExit(f"{path} does not exist") from None
    except yaml.YAMLError as exc:
        raise SystemExit(f"{path} is not valid YAML: {exc}") from None


def pinned_version(requirements: str, package: str) -> str | None:
    """The `package==X` pin in a requirements text (None if absent)."""
    m = re.search(rf"^{re.escape(package)}==([^\s;#]+)", requirements, re.MULTILINE | re.IGNORECASE)
    return m.group(1) if m else None


def requirement_names(requirements: str) -> set[str]:
    names = set()
    for line in requirements.splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            names.add(re.split(r"[=<>!~\[; ]", line, maxsplit=1)[0].lower().replace("_", "-").replace(".", "-"))
    return names


def compose_variables(text: str) -> dict[str, str | None]:
    """Variables compose interpolates: name -> default (`${X:-d}` / `${X-d}`), or None when there is none.
    `$$` is compose's escape for a literal `$` (expanded later by the container's shell), so it is skipped."""
    text = text.replace("$$", "")
    out: dict[str, str | None] = {}
    for m in re.finditer(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)", text):
        name = m.group(1) or m.group(4)
        default = m.group(3) if m.group(2) in (":-", "-") else None
        out[name] = default if out.get(name) is None else out[name]
    return out


def env_file(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            out[key.strip()] = value.strip().strip("'\"")
    return out


def _environment(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def _image_problems(where: str, image: str) -> list[str]:
    ref = image.split("@", 1)[0]
    if "@sha256:" in image:
        return []
    tag = ref.rsplit(":", 1)[1] if ":" in ref.rsplit("/", 1)[-1] else None
    if tag is None:
        return [f"{where}: image {image!r} has no tag (pin a version)"]
    if tag == "latest" or "${" in tag:
        return [f"{where}: image {image!r} is not pinned (tag {tag!r})"]
    return []


def _tag(image: str) -> str:
    return image.split("@", 1)[0].rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""


def settings_problems(where: str, names: Iterable[str], settings_cls: Any = None) -> list[str]:
    """Every SYNSETFORGE__SECTION__FIELD must name a field of pipeline.config.Settings."""
    if settings_cls is None:
        from pipeline.config import Settings as settings_cls
    problems = []
    for name in sorted(set(names)):
        if not name.startswith("SYNSETFORGE__"):
            continue
        parts = name[len("SYNSETFORGE__"):].lower().split("__")
        if len(parts) != 2:
            problems.append(f"{where}: {name} is not SYNSETFORGE__SECTION__FIELD")
            continue
        section, field = parts
        sections = settings_cls.model_fields
        if section not in sections:
            problems.append(f"{where}: {name}: no settings section {section!r} (have {sorted(sections)})")
            continue
        fields = sections[section].annotation.model_fields
        if field not in fields:
            problems.append(f"{where}: {name}: settings section {section!r} has no field {field!r}")
    return problems


def airflow_options() -> dict[str, set[str]] | None:
    """Airflow's own list of config options (section -> options), or None when Airflow is not importable."""
    try:
        from airflow.configuration import conf
    except Exception:  # noqa: BLE001 - Airflow absent or misconfigured: that check is skipped, not failed
        return None
    return {s: set(d.get("options", {})) for s, d in conf.configuration_description.items()}


def airflow_env_problems(where: str, names: Iterable[str], options: Mapping[str, set[str]] | None) -> list[str]:
    """Every AIRFLOW__SECTION__KEY must be a real Airflow option (provider sections included when installed)."""
    if options is None:
        return []
    problems = []
    for name in sorted(set(names)):
        if not name.startswith("AIRFLOW__"):
            continue
        parts = name[len("AIRFLOW__"):].lower().split("__")
        if len(parts) == 2 and parts[0] in PROVIDER_SECTIONS:
            continue
        if len(parts) != 2 or parts[0] not in options or parts[1] not in options[parts[0]]:
            problems.append(f"{where}: {name} is not an Airflow configuration option")
    return problems


# ---------------------------------------------------------------------------------------------------- Dockerfile

def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    lines, buf = [], ""
    for raw in text.splitlines():
        if not buf and raw.lstrip().startswith("#"):
            continue
        if raw.rstrip().endswith("\\"):
            buf += raw.rstrip()[:-1] + " "
            continue
        buf += raw
        if buf.strip():
            word, _, rest = buf.strip().partition(" ")
            lines.append((word.upper(), rest.strip()))
        buf = ""
    return lines


def dockerfile_args(instructions: list[tuple[str, str]]) -> dict[str, str]:
    out = {}
    for word, rest in instructions:
        if word == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            out[k.strip()] = v.strip().strip("'\"")
    return out


def dockerfile_problems(text: str, context: Path, airflow_pin: str | None) -> list[str]:
    where = "Dockerfile"
    ins = parse_dockerfile(text)
    args = dockerfile_args(ins)
    problems = []
    for word, rest in ins:
        if word == "FROM":
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), rest.split()[0])
            problems += _image_problems(f"{where} FROM", image)
        if word in ("COPY", "ADD"):
            parts = [p for p in shlex.split(rest) if not p.startswith("--")]
            if any(p.startswith("--from") for p in shlex.split(rest)):
                continue
            for src in parts[:-1]:
                if not (context / src).exists():
                    problems.append(f"{where}: {word} source {src!r} does not exist in {context}")
    if airflow_pin and args.get("AIRFLOW_VERSION") != airflow_pin:
        problems.append(f"{where}: ARG AIRFLOW_VERSION={args.get('AIRFLOW_VERSION')} but requirements.txt pins "
                        f"apache-airflow=={airflow_pin}")
    return problems


def dockerfile_dags_target(text: str) -> str | None:
    """Where the Dockerfile copies the project's dags/ folder (None if it does not)."""
    for word, rest in parse_dockerfile(text):
        parts = [p for p in shlex.split(rest) if not p.startswith("--")] if word in ("COPY", "ADD") else []
        if parts and any(p.rstrip("/") == "dags" for p in parts[:-1]):
            return parts[-1].rstrip("/")
    return None


# ---------------------------------------------------------------------------------------------------- compose

def _has_healthcheck(service: Mapping[str, Any]) -> bool:
    hc = service.get("healthcheck") or {}
    return bool(hc.get("test")) and not hc.get("disable")


def _is_worker(service: Mapping[str, Any]) -> bool:
    cmd = service.get("command") or ""
    cmd = " ".join(cmd) if isinstance(cmd, list) else str(cmd)
    return "celery worker" in cmd


def compose_problems(compose: Mapping[str, Any], compose_text: str, env_example: Mapping[str, str], *,
                     compose_dir: Path, airflow_pin: str | None, labelstudio_pin: str | None,
                     dags_target: str | None, airflow_opts: Mapping[str, set[str]] | None = None,
                     settings_cls: Any = None) -> list[str]:
    where = "docker-compose.yml"
    problems: list[str] = []
    services = compose.get("services") or {}
    declared_volumes = set((compose.get("volumes") or {}).keys())

    for name, default in sorted(compose_variables(compose_text).items()):
        if name not in env_example:
            problems.append(f"{where}: ${{{name}}} is not listed in .env.example"
                            + (f" (it has a default, {default!r}, but list it anyway)" if default else ""))

    names_set: list[str] = []
    workers = 0
    for sname, svc in services.items():
        w = f"{where} service {sname}"
        image = svc.get("image")
        if not image:
            problems.append(f"{w}: no image (name the image so every component runs the same build)")
        else:
            problems += _image_problems(w, image)
        build = svc.get("build")
        if build:
            ctx = compose_dir / (build.get("context", ".") if isinstance(build, dict) else build)
            dockerfile = ctx / (build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile")
            if not dockerfile.is_file():
                problems.append(f"{w}: build Dockerfile {dockerfile} does not exist")
            if airflow_pin and image and not _tag(image).startswith(airflow_pin + "-"):
                problems.append(f"{w}: image {image!r} tag should start with the pinned Airflow {airflow_pin}-")
        if image and image.split(":")[0].endswith("label-studio") and labelstudio_pin:
            if _tag(image) != labelstudio_pin:
                problems.append(f"{w}: image {image!r} but requirements-labelstudio.txt pins label-studio=={labelstudio_pin}")

        env = _environment(svc)
        names_set += list(env)
        if "AIRFLOW__CORE__EXECUTOR" in env and env["AIRFLOW__CORE__EXECUTOR"] != CELERY_EXECUTOR:
            problems.append(f"{w}: AIRFLOW__CORE__EXECUTOR is {env['AIRFLOW__CORE__EXECUTOR']!r}, not {CELERY_EXECUTOR}")
        if build and env.get("AIRFLOW__CORE__EXECUTOR") is None:
            problems.append(f"{w}: Airflow service without AIRFLOW__CORE__EXECUTOR")
        if "AIRFLOW__CORE__DAGS_FOLDER" in env and env["AIRFLOW__CORE__DAGS_FOLDER"].rstrip("/") != dags_target:
            problems.append(f"{w}: AIRFLOW__CORE__DAGS_FOLDER={env['AIRFLOW__CORE__DAGS_FOLDER']} but the Dockerfile "
                            f"copies the project's dags/ to {dags_target}")
        if _is_worker(svc):
            workers += int(((svc.get("deploy") or {}).get("replicas")) or 1)

        for port in svc.get("ports") or []:
            host_ip = port.get("host_ip") if isinstance(port, dict) else (
                str(port).split(":")[0] if str(port).count(":") == 2 else None)
            if host_ip != LOOPBACK:
                problems.append(f"{w}: port {port!r} is not bound to {LOOPBACK}")

        for vol in svc.get("volumes") or []:
            if isinstance(vol, dict):
                source = vol.get("source")
            else:
                source = str(vol).split(":")[0] if ":" in str(vol) else None
            if not source:
                continue  # anonymous volume
            if source.startswith((".", "/", "~")):
                if not (compose_dir / source).exists():
                    problems.append(f"{w}: bind mount source {source!r} does not exist")
            elif source not in declared_volumes:
                problems.append(f"{w}: volume {source!r} is not declared under top-level volumes")

        one_shot = str(svc.get("restart", "no")) == "no"
        if not one_shot and not _has_healthcheck(svc):
            problems.append(f"{w}: long-running service without a healthcheck")
        for dep, cond in (svc.get("depends_on") or {}).items() if isinstance(svc.get("depends_on"), dict) else []:
            target = services.get(dep)
            if target is None:
                problems.append(f"{w}: depends on unknown service {dep!r}")
                continue
            cond = (cond or {}).get("condition")
            if cond == "service_healthy" and not _has_healthcheck(target):
                problems.append(f"{w}: waits for {dep} to be healthy but {dep} has no healthcheck")
            if cond == "service_completed_successfully" and str(target.get("restart", "no")) != "no":
                problems.append(f"{w}: waits for {dep} to complete but {dep} restarts")

    if workers < MIN_WORKERS:
        problems.append(f"{where}: {workers} Celery worker(s); run at least {MIN_WORKERS} (deploy.replicas)")
    problems += settings_problems(where, names_set, settings_cls)
    problems += airflow_env_problems(where, names_set, airflow_opts)
    return problems


def env_example_problems(env_example: Mapping[str, str]) -> list[str]:
    """Secrets in .env.example must be placeholders, never values someone could deploy with."""
    return [f".env.example: {k} looks like a secret; its value must be the placeholder {PLACEHOLDER!r}"
            for k, v in env_example.items() if any(w in k for w in SECRET_WORDS) and v != PLACEHOLDER]


# ---------------------------------------------------------------------------------------------------- Helm

def unknown_chart_keys(values: Mapping[str, Any], chart: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys of `values` that the chart does not define. `chart` is the chart's default values (or the
    vendored CHART_KEYS); below a key whose default is empty / a leaf, anything is accepted."""
    out = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        if key not in chart:
            out.append(path)
        elif path not in CHART_FREE_FORM and isinstance(value, dict) and isinstance(chart[key], dict) and chart[key]:
            out += unknown_chart_keys(value, chart[key], path + ".")
    return out


def _helm_env_names(values: Mapping[str, Any]) -> list[str]:
    names = [e.get("name", "") for e in values.get("env") or []] + [s.get("envName", "") for s in values.get("secret") or []]
    for comp in ("workers", "scheduler", "triggerer", "dagProcessor", "apiServer"):
        names += [e.get("name", "") for e in (values.get(comp) or {}).get("env") or []]
    return names


def helm_problems(values: Mapping[str, Any], *, chart: Mapping[str, Any], airflow_pin: str | None,
                  dags_target: str | None, airflow_opts: Mapping[str, set[str]] | None = None,
                  settings_cls: Any = None) -> list[str]:
    where = "helm/values.yaml"
    problems = [f"{where}: {k} is not a key of the Airflow Helm chart" for k in unknown_chart_keys(values, chart)]
    if values.get("executor") != CELERY_EXECUTOR:
        problems.append(f"{where}: executor is {values.get('executor')!r}, not {CELERY_EXECUTOR}")
    replicas = (values.get("workers") or {}).get("replicas", 1)
    if not isinstance(replicas, int) or replicas < MIN_WORKERS:
        problems.append(f"{where}: workers.replicas is {replicas!r}; run at least {MIN_WORKERS}")
    image = (values.get("images") or {}).get("airflow") or {}
    tag = str(image.get("tag") or "")
    if not image.get("repository") or not tag or tag == "latest":
        problems.append(f"{where}: images.airflow.repository/tag must name the pinned synsetforge image")
    if airflow_pin and not tag.startswith(airflow_pin + "-"):
        problems.append(f"{where}: images.airflow.tag {tag!r} should start with the pinned Airflow {airflow_pin}-")
    if airflow_pin and str(values.get("airflowVersion")) != airflow_pin:
        problems.append(f"{where}: airflowVersion {values.get('airflowVersion')!r} != pinned Airflow {airflow_pin}")
    dags = values.get("dags") or {}
    folder = str(((values.get("config") or {}).get("core") or {}).get("dags_folder", "")).rstrip("/")
    git = dags.get("gitSync") or {}
    if git.get("enabled"):
        if str(git.get("subPath", "")).strip("/") != "dags":
            problems.append(f"{where}: dags.gitSync.subPath must be the repository's dags folder ('dags')")
    elif folder != dags_target:
        problems.append(f"{where}: config.core.dags_folder {folder!r} is not where the image holds dags/ ({dags_target})")
    names = _helm_env_names(values)
    problems += settings_problems(where, names, settings_cls)
    if airflow_opts is not None:
        for section, opts in (values.get("config") or {}).items():
            for opt in opts or {}:
                if section not in PROVIDER_SECTIONS and opt not in airflow_opts.get(section, set()):
                    problems.append(f"{where}: config.{section}.{opt} is not an Airflow configuration option")
    for e in values.get("env") or []:
        if any(w in e.get("name", "") for w in SECRET_WORDS):
            problems.append(f"{where}: {e.get('name')} is a secret; take it from a Kubernetes Secret (`secret:`)")
    return problems


# ---------------------------------------------------------------------------------------------------- proven settings

_FIELD = r"[^:@/\s]+"


def _proven_patterns() -> dict[str, re.Pattern[str]]:
    """pipeline.celery_stack.celery_settings as regexes: each value the tests' stack runs with, its parts (user,
    password, host, port, database, ...) left as named groups."""
    from pipeline.celery_stack import celery_settings

    names = ("db_user", "db_password", "db_host", "db_port", "db_name", "redis_password", "redis_host", "redis_port",
             "concurrency")
    marked = celery_settings(**{n: f"\x00{n}\x00" for n in names})
    out = {}
    for key, value in marked.items():
        parts = re.split(r"\x00(\w+)\x00", value)
        rx = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>{_FIELD})" for i, p in enumerate(parts))
        out[key] = re.compile(rx)
    return out


# Image names (the last part of the repository) of the servers the tested stack runs, by TESTED_VERSIONS key:
# the official postgres / redis images and Bitnami's postgresql (the Helm chart's bundled database).
_SERVER_IMAGES = {"postgres": "postgres", "postgresql": "postgres", "redis": "redis"}
_SERVER_NAMES = {"postgres": "PostgreSQL", "redis": "Redis"}


def tag_version_problems(where: str, server: str, tag: str) -> list[str]:
    """The image tag (`15.10-bookworm`, `7.0.15`, `15.4.0-debian-11-r45`) names the version the tests' stack ran
    (pipeline.celery_stack.TESTED_VERSIONS: PostgreSQL's major, Redis's major.minor); a shorter tag (`7`) floats.

    >>> tag_version_problems("x", "redis", "7.0.15-bookworm"), len(tag_version_problems("x", "redis", "7.2.10"))
    ([], 1)
    """
    from pipeline.celery_stack import TESTED_VERSIONS

    want = TESTED_VERSIONS[server].split(".")
    m = re.match(r"v?(\d+(?:\.\d+)*)", tag or "")
    if m is None or m.group(1).split(".")[:len(want)] != want:
        return [f"{where}: tag {tag!r} is not {_SERVER_NAMES[server]} {TESTED_VERSIONS[server]}, the version the tests' "
                "stack runs (pipeline/celery_stack.py TESTED_VERSIONS)"]
    return []


def _server_of(image: str) -> str | None:
    """'postgres' / 'redis' for an image of one of the tested servers, else None."""
    name = image.split("@", 1)[0].rsplit("/", 1)[-1].split(":", 1)[0]
    return _SERVER_IMAGES.get(name)


def _metadata_parts(env: Mapping[str, str]) -> dict[str, str] | None:
    """user, password, host, port and database of an Airflow container's metadata URL (None if not the tested shape)."""
    m = _proven_patterns()["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].fullmatch(
        env.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", ""))
    return m.groupdict() if m else None


def initdb_databases(service: Mapping[str, Any], compose_dir: Path) -> set[str]:
    """Databases the init scripts mounted into the service's /docker-entrypoint-initdb.d create (CREATE DATABASE)."""
    names: set[str] = set()
    for vol in service.get("volumes") or []:
        source, target = ((vol.get("source"), vol.get("target")) if isinstance(vol, dict)
                          else (str(vol).split(":") + [None])[:2])
        if not source or not str(target or "").startswith("/docker-entrypoint-initdb.d"):
            continue
        path = compose_dir / source
        files = sorted(path.iterdir()) if path.is_dir() else [path] if path.is_file() else []
        for f in files:
            if f.suffix in (".sql", ".sh"):
                names |= set(re.findall(r'CREATE\s+DATABASE\s+"?(\w+)"?', f.read_text(), re.IGNORECASE))
    return names


def proven_env_problems(where: str, env: Mapping[str, str], services: Mapping[str, Any]) -> list[str]:
    """The Airflow containers' variables say what the tests' CeleryExecutor stack proved: the same executor, metadata
    URL (driver named), result backend on that same database, Redis broker (database 0, with a password), worker
    concurrency and shared secrets; the hosts are compose services whose own settings match the URLs."""
    from pipeline.celery_stack import SHARED_SECRETS

    problems, parts = [], {}
    for key, rx in _proven_patterns().items():
        if key not in env:
            problems.append(f"{where}: {key} is not set (the tested stack sets it)")
            continue
        m = rx.fullmatch(env[key])
        if m is None:
            problems.append(f"{where}: {key}={env[key]!r} is not shaped like the tested stack's {rx.pattern!r}")
            continue
        for name, value in m.groupdict().items():
            if parts.setdefault(name, value) != value:
                problems.append(f"{where}: {key} says {name}={value!r} but another URL says {parts[name]!r}: the "
                                "result backend must be the metadata database, as tested")
    problems += [f"{where}: {k} is not set: every Airflow container needs the same value" for k in SHARED_SECRETS
                 if k not in env]
    db = services.get(parts.get("db_host", ""))
    if "db_host" in parts:
        if db is None:
            problems.append(f"{where}: the metadata database host {parts['db_host']!r} is no compose service")
        else:
            db_env = _environment(db)
            for part, var in (("db_user", "POSTGRES_USER"), ("db_password", "POSTGRES_PASSWORD"),
                              ("db_name", "POSTGRES_DB")):
                if db_env.get(var) != parts.get(part):
                    problems.append(f"{where}: {part}={parts.get(part)!r} but service {parts['db_host']} has "
                                    f"{var}={db_env.get(var)!r}")
    broker = services.get(parts.get("redis_host", ""))
    if "redis_host" in parts:
        cmd = broker.get("command") if broker else None
        cmd = " ".join(cmd) if isinstance(cmd, list) else str(cmd or "")
        if broker is None:
            problems.append(f"{where}: the broker host {parts['redis_host']!r} is no compose service")
        elif f"--requirepass {parts.get('redis_password')}" not in cmd:
            problems.append(f"{where}: the broker URL's password is not the one service {parts['redis_host']} "
                            "requires (--requirepass)")
    return problems


def proven_worker_problems(where: str, command: Any) -> list[str]:
    """A Celery worker runs WORKER_COMMAND, as the tests' workers do."""
    from pipeline.celery_stack import WORKER_COMMAND

    words = shlex.split(command) if isinstance(command, str) else [str(c) for c in command or []]
    if words[:2] == ["bash", "-c"] and len(words) == 3:  # the chart's form: bash -c "exec airflow celery worker"
        words = shlex.split(words[2])
        words = words[1:] if words[:1] == ["exec"] else words
    if words != list(WORKER_COMMAND):
        return [f"{where}: worker command {' '.join(words)!r} is not the tested {' '.join(WORKER_COMMAND)!r}"]
    return []


def proven_labelstudio_problems(where: str, env: Mapping[str, str], services: Mapping[str, Any],
                                metadata: Mapping[str, str] | None = None, compose_dir: Path = DEPLOY) -> list[str]:
    """Label Studio on PostgreSQL with the variables crowd/server.py starts it with in the tests, on the server the
    tests put it on: Airflow's (`metadata`: the parts of the Airflow containers' metadata URL), in a database of its
    own that the server's init scripts create, as that server's user."""
    from crowd.server import postgres_env

    wanted = postgres_env("postgresql://u:p@h:1/n")
    problems = [f"{where}: {k} is not set (Label Studio on PostgreSQL, as tested)" for k in wanted if k not in env]
    if env.get("DJANGO_DB") != wanted["DJANGO_DB"]:
        problems.append(f"{where}: DJANGO_DB={env.get('DJANGO_DB')!r}, not {wanted['DJANGO_DB']!r} (PostgreSQL)")
    host, name = env.get("POSTGRE_HOST", ""), env.get("POSTGRE_NAME")
    if metadata:
        if host != metadata["db_host"]:
            problems.append(f"{where}: POSTGRE_HOST={host!r} is not Airflow's PostgreSQL service "
                            f"{metadata['db_host']!r}: the tests run Label Studio on that server")
        if env.get("POSTGRE_PORT") != metadata["db_port"]:
            problems.append(f"{where}: POSTGRE_PORT={env.get('POSTGRE_PORT')!r} is not the port Airflow uses on "
                            f"{metadata['db_host']} ({metadata['db_port']!r})")
        if name == metadata["db_name"]:
            problems.append(f"{where}: POSTGRE_NAME={name!r} is Airflow's database: the tests give Label Studio a "
                            "database of its own on that server")
    db = services.get(host)
    if db is not None:
        db_env = _environment(db)
        for var, own in (("POSTGRE_USER", "POSTGRES_USER"), ("POSTGRE_PASSWORD", "POSTGRES_PASSWORD")):
            if env.get(var) != db_env.get(own):
                problems.append(f"{where}: {var}={env.get(var)!r} but {host} has {own}={db_env.get(own)!r}")
        if name and name != db_env.get("POSTGRES_DB") and name not in initdb_databases(db, compose_dir):
            problems.append(f"{where}: no init script of service {host} creates database {name!r} (CREATE DATABASE "
                            "in a file mounted into /docker-entrypoint-initdb.d)")
    elif "POSTGRE_HOST" in env:
        problems.append(f"{where}: POSTGRE_HOST {env['POSTGRE_HOST']!r} is no compose service")
    return problems


def compose_proven_problems(compose: Mapping[str, Any], compose_dir: Path = DEPLOY) -> list[str]:
    services = compose.get("services") or {}
    problems = []
    airflow = [_environment(s) for s in services.values()
               if s.get("build") or "AIRFLOW__CORE__EXECUTOR" in _environment(s)]
    metadata = next((parts for parts in map(_metadata_parts, airflow) if parts), None)
    for name, svc in services.items():
        env = _environment(svc)
        if svc.get("build") or "AIRFLOW__CORE__EXECUTOR" in env:
            problems += proven_env_problems(f"docker-compose.yml service {name}", env, services)
        if _is_worker(svc):
            problems += proven_worker_problems(f"docker-compose.yml service {name}", svc.get("command"))
        image = str(svc.get("image") or "")
        if image.split(":")[0].endswith("label-studio"):
            problems += proven_labelstudio_problems(f"docker-compose.yml service {name}", env, services, metadata,
                                                    compose_dir)
        if _server_of(image):
            problems += tag_version_problems(f"docker-compose.yml service {name} image {image!r}", _server_of(image),
                                             _tag(image))
    return problems


def helm_proven_problems(values: Mapping[str, Any]) -> list[str]:
    """The chart builds the URLs itself: its metadata connection must name the tested driver, the results stay in
    that database (no other resultBackendConnection) and the workers run the tested command."""
    from pipeline.celery_stack import METADATA_DRIVER, RESULT_BACKEND_DRIVER

    where = "helm/values.yaml"
    data = values.get("data") or {}
    problems = []
    if not data.get("metadataSecretName"):
        protocol = (data.get("metadataConnection") or {}).get("protocol")
        if protocol != METADATA_DRIVER:
            problems.append(f"{where}: data.metadataConnection.protocol is {protocol!r}, not the tested "
                            f"{METADATA_DRIVER!r} (the chart's default postgresql:// means psycopg 3 to SQLAlchemy 2.1)")
    other = data.get("resultBackendConnection")
    if other and (other.get("protocol") != METADATA_DRIVER or other != data.get("metadataConnection")):
        problems.append(f"{where}: data.resultBackendConnection differs from the metadata database; the tested stack "
                        f"keeps Celery's results there ({RESULT_BACKEND_DRIVER})")
    if data.get("brokerUrl") and not _proven_patterns()["AIRFLOW__CELERY__BROKER_URL"].fullmatch(data["brokerUrl"]):
        problems.append(f"{where}: data.brokerUrl is not shaped like the tested Redis broker URL")
    if not data.get("brokerUrl") and not data.get("brokerUrlSecretName") and not (values.get("redis") or {}).get(
            "enabled", True):
        problems.append(f"{where}: no broker: enable the chart's Redis or set data.brokerUrl(SecretName)")
    workers = values.get("workers") or {}
    if workers.get("command") or workers.get("args"):
        problems += proven_worker_problems(f"{where} workers", [*(workers.get("command") or []),
                                                                *(workers.get("args") or [])])
    else:
        problems.append(f"{where}: workers.args is not set: name the tested worker command")
    if "worker_concurrency" not in ((values.get("config") or {}).get("celery") or {}):
        problems.append(f"{where}: config.celery.worker_concurrency is not set (the tested stack sets it)")
    # The chart's bundled servers run the tested versions (its defaults are other ones: pin them).
    pg, redis = values.get("postgresql") or {}, values.get("redis") or {}
    for enabled, key, server, image in (
            (pg.get("enabled", True), "postgresql.image", "postgres", pg.get("image") or {}),
            (redis.get("enabled", True), "images.redis", "redis", (values.get("images") or {}).get("redis") or {})):
        if not enabled:
            continue
        if not image.get("tag"):
            problems.append(f"{where}: {key}.tag is not set: pin the chart's {_SERVER_NAMES[server]} to the tested "
                            "version")
        else:
            problems += tag_version_problems(f"{where} {key}", server, str(image["tag"]))
    return problems


# ---------------------------------------------------------------------------------------------------- all

def check_deploy(repo: Path = REPO, deploy: Path | None = None, *, chart_values: Mapping[str, Any] | None = None,
                 airflow_opts: Mapping[str, set[str]] | None = None) -> list[str]:
    """Every problem found in the deployment files under `deploy` (default infra/deploy) of the repository `repo`."""
    deploy = deploy or repo / "infra" / "deploy"
    requirements = (repo / "requirements.txt").read_text()
    airflow_pin = pinned_version(requirements, "apache-airflow")
    ls_pin = pinned_version((repo / "requirements-labelstudio.txt").read_text(), "label-studio")
    problems = []
    if airflow_pin is None:
        problems.append("requirements.txt does not pin apache-airflow")

    docker_text = (deploy / "Dockerfile").read_text()
    problems += dockerfile_problems(docker_text, repo, airflow_pin)
    dags_target = dockerfile_dags_target(docker_text)
    if dags_target is None:
        problems.append("Dockerfile: does not copy the project's dags/ folder")

    deploy_reqs = deploy / "requirements-deploy.txt"
    if deploy_reqs.is_file():
        clash = requirement_names(deploy_reqs.read_text()) & requirement_names(requirements)
        if clash:
            problems.append(f"requirements-deploy.txt: re-pins packages of requirements.txt: {sorted(clash)}")

    env_path = deploy / ".env.example"
    env_example = env_file(env_path.read_text()) if env_path.is_file() else {}
    if not env_path.is_file():
        problems.append(".env.example does not exist")
    problems += env_example_problems(env_example)

    compose_path = deploy / "docker-compose.yml"
    compose_text = compose_path.read_text()
    problems += compose_problems(load_yaml(compose_path), compose_text, env_example, compose_dir=deploy,
                                 airflow_pin=airflow_pin, labelstudio_pin=ls_pin, dags_target=dags_target,
                                 airflow_opts=airflow_opts)
    values = load_yaml(deploy / "helm" / "values.yaml")
    problems += helm_problems(values, chart=chart_values or CHART_KEYS,
                              airflow_pin=airflow_pin, dags_target=dags_target, airflow_opts=airflow_opts)
    problems += compose_proven_problems(load_yaml(compose_path), deploy)
    problems += helm_proven_problems(values)
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chart-values", type=Path, help="the chart's default values.yaml (helm show values ...)")
    parser.add_argument("--no-airflow", action="store_true", help="skip checking AIRFLOW__ names against Airflow")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))  # pipeline.config, when run as a script from a checkout
    chart = load_yaml(args.chart_values) if args.chart_values else None
    problems = check_deploy(chart_values=chart, airflow_opts=None if args.no_airflow else airflow_options())
    for p in problems:
        print(p)
    print("ok" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
