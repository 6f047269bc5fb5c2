"""Release DAG: build a versioned release (manifest last), verify it by re-hashing, write report.html and the
dataset card. Wiring only; the work is in pipeline.release, the same code `synsetforge release` runs.

A retry after the manifest was written finds the release there and goes on (same parent) instead of failing.
"""

from __future__ import annotations

from airflow.sdk import Asset, Param, dag, task

from pipeline.dagtools import DAG_DEFAULTS, fail_fast, store_param

RELEASES = Asset("synsetforge://releases")
_FIELDS = ["val_per_class", "test_per_class", "neardup_check"]


@dag(
    dag_id="synsetforge_release",
    schedule=None,
    **DAG_DEFAULTS,
    tags=["synsetforge"],
    params={
        "version": Param(type="string", minLength=1, maxLength=64, pattern="^[A-Za-z0-9][A-Za-z0-9._-]*$",
                         description="new release version, e.g. 2026.1"),
        "parent": Param(None, type=["null", "string"], description="previous release; its images keep their splits"),
        "val_per_class": Param(None, type=["null", "number"], minimum=0,
                               description="val images per class: a count, or a fraction in (0, 1) of each class"),
        "test_per_class": Param(None, type=["null", "number"], minimum=0,
                                description="test images per class: a count, or a fraction in (0, 1) of each class"),
        "neardup_check": Param(None, type=["null", "boolean"], description="drop train near-duplicates of val/test"),
        "force": Param(False, type="boolean",
                       description="build even if a class would have no train or no val image"),
        "challenge": Param(False, type="boolean",
                           description="keep the test labels out of the public release (for the challenge server)"),
        "store": store_param(),
    },
    doc_md=__doc__,
)
def synsetforge_release():
    @task(outlets=[RELEASES])
    @fail_fast
    def build(params=None) -> str:
        from pipeline.dagtools import settings_from_params
        from pipeline.release.build import build_release
        from pipeline.release.manifest import ReleaseExists, read_manifest, release_exists
        from pipeline.store import store_from_settings

        settings = settings_from_params(params, "release", _FIELDS)
        store = store_from_settings(settings)
        version, parent = params["version"], params.get("parent")
        if release_exists(store, version):
            if read_manifest(store, version)["parent"] != parent:
                raise ReleaseExists(f"release {version!r} exists with another parent; choose a new version")
            return version  # retry of a run that already published
        rs = settings.release
        build_release(store, version, parent=parent, val_per_class=rs.val_per_class,
                      test_per_class=rs.test_per_class, salt=rs.split_salt, config_digest=settings.digest(),
                      neardup=rs.neardup_check, force=bool(params.get("force")),
                      challenge=bool(params.get("challenge")),
                      local_roots=[settings.collect.local_dir] if settings.collect.local_dir else [])
        return version

    @task
    @fail_fast
    def verify(version: str, params=None) -> str:
        from pipeline.dagtools import settings_from_params
        from pipeline.release.manifest import verify_release
        from pipeline.store import store_from_settings

        settings = settings_from_params(params, "release", [])
        res = verify_release(store_from_settings(settings), version)
        if not res.ok:
            raise RuntimeError(f"release {version} failed verification: {res.problems}")
        return version

    @task
    @fail_fast
    def report(version: str, params=None) -> dict:
        from pipeline.dagtools import settings_from_params
        from pipeline.release.report import build_report_from_settings
        from pipeline.store import store_from_settings

        settings = settings_from_params(params, "release", [])
        return build_report_from_settings(store_from_settings(settings), version, settings.release)

    report(verify(build()))


synsetforge_release()
