"""Vocabulary DAG: select WordNet synsets and write the `synsets` table. Wiring only; the work is in
pipeline.vocabulary, the same code `synsetforge vocab` runs. The first DAG of the chain: its `synsets` Asset
starts synsetforge_collect, carrying this run's store along."""

from __future__ import annotations

from airflow.sdk import Asset, Param, dag, task

from pipeline.dagtools import DAG_DEFAULTS, fail_fast, store_param

SYNSETS = Asset("synsetforge://tables/synsets")


@dag(
    dag_id="synsetforge_vocabulary",
    schedule=None,
    **DAG_DEFAULTS,
    tags=["synsetforge"],
    params={
        "roots": Param([], type="array", description="root wnids or synset names, e.g. n02084071"),
        "max_depth": Param(None, type=["null", "integer"], minimum=0, description="levels below each root"),
        "leaves_only": Param(False, type="boolean"),
        "wnid_file": Param(None, type=["null", "string"], description="file with one wnid per line"),
        "exclude": Param([], type="array"),
        "store": store_param(),
    },
    doc_md=__doc__,
)
def synsetforge_vocabulary():
    @task(outlets=[SYNSETS])
    @fail_fast
    def build_vocabulary(params=None) -> dict:
        from pipeline.dagtools import announce, settings_from_params
        from pipeline.store import store_from_settings
        from pipeline.vocabulary import run_vocabulary

        settings = settings_from_params(params, "vocabulary", ["roots", "max_depth", "leaves_only", "wnid_file", "exclude"])
        summary = run_vocabulary(settings, store_from_settings(settings))
        summary.pop("depth_range", None)
        announce(settings, SYNSETS)
        return summary

    build_vocabulary()


synsetforge_vocabulary()
