"""DET release DAG (by hand): build a DET release from the fully annotated, fully boxed images (manifest last), then
verify it by re-hashing. Wiring only; the work is pipeline.release.det, the same code `synsetforge det release`
runs. A retry after the manifest was written finds the release there and goes on.
"""

from __future__ import annotations

from airflow.sdk import Asset, Param, dag, task

from pipeline.dagtools import DAG_DEFAULTS, fail_fast, store_param

RELEASES = Asset("synsetforge://releases")


@dag(
    dag_id="synsetforge_det_release",
    schedule=None,
    **DAG_DEFAULTS,
    tags=["synsetforge", "det"],
    params={
        "version": Param(type="string", minLength=1, maxLength=64, pattern="^[A-Za-z0-9][A-Za-z0-9._-]*$",
                         description="new DET release version, e.g. 2026.1-det"),
        "parent": Param(None, type=["null", "string"], description="previous DET release; its images keep their splits"),
        "val": Param(None, type=["null", "number"], minimum=0,
                     description="val images: a count, or a fraction in (0, 1) (default det.val_images)"),
        "test": Param(None, type=["null", "number"], minimum=0,
                      description="test images: a count, or a fraction in (0, 1) (default det.test_images)"),
        "store": store_param(),
    },
    doc_md=__doc__,
)
def synsetforge_det_release():
    @task(outlets=[RELEASES])
    @fail_fast
    def build(params=None) -> str:
        from pipeline.dagtools import settings_from_params
        from pipeline.release.det import build_det_release
        from pipeline.release.manifest import ReleaseExists, read_manifest, release_exists
        from pipeline.store import store_from_settings

        settings = settings_from_params(params, "det", [])
        store = store_from_settings(settings)
        version, parent = params["version"], params.get("parent")
        if release_exists(store, version):
            if read_manifest(store, version)["parent"] != parent:
                raise ReleaseExists(f"release {version!r} exists with another parent; choose a new version")
            return version  # retry of a run that already published
        det = settings.det
        val = params["val"] if params.get("val") is not None else det.val_images
        test = params["test"] if params.get("test") is not None else det.test_images
        val, test = (int(v) if float(v).is_integer() else float(v) for v in (val, test))
        build_det_release(store, version, parent=parent, val=val, test=test, salt=settings.release.split_salt,
                          config_digest=settings.digest(),
                          local_roots=[settings.collect.local_dir] if settings.collect.local_dir else [])
        return version

    @task
    @fail_fast
    def verify(version: str, params=None) -> dict:
        from pipeline.dagtools import settings_from_params
        from pipeline.release.manifest import ReleaseError, verify_release
        from pipeline.store import store_from_settings

        result = verify_release(store_from_settings(settings_from_params(params, "det", [])), version)
        if not result.ok:
            raise ReleaseError(f"release {version} failed verification: {'; '.join(result.problems)}")
        return {"version": version, "files": result.checked}

    verify(build())


synsetforge_det_release()
