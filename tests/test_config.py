from __future__ import annotations

import pytest

from pipeline.config import ConfigError, load_settings


def test_defaults_file_and_env_layering(tmp_path):
    cfg = tmp_path / "sf.toml"
    cfg.write_text('[store]\nurl = "/from/file"\n[vocabulary]\nroots = ["n02084071"]\nmax_depth = 2\n')
    s = load_settings(cfg, env={"SYNSETFORGE__VOCABULARY__MAX_DEPTH": "4"})
    assert s.store.url == "/from/file"
    assert s.vocabulary.roots == ["n02084071"]
    assert s.vocabulary.max_depth == 4  # env beats file
    assert load_settings(env={}).store.url == "data"


def test_every_problem_is_reported(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_settings(env={"SYNSETFORGE__VOCABULARY__MAX_DEPTH": "-1", "SYNSETFORGE__QC__ACCEPT_AT": "2"})
    assert "vocabulary.max_depth" in str(err.value) and "qc.accept_at" in str(err.value)
    with pytest.raises(ConfigError, match="nonexistent.toml does not exist"):
        load_settings(tmp_path / "nonexistent.toml", env={})
    bad = tmp_path / "bad.toml"
    bad.write_text("[store\n")
    with pytest.raises(ConfigError, match="bad.toml"):
        load_settings(bad, env={})
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[store]\nbukket = 1\n")
    with pytest.raises(ConfigError, match="store.bukket"):
        load_settings(unknown, env={})


def test_secrets_only_from_env_and_never_printed(tmp_path):
    s = load_settings(env={"SYNSETFORGE__CROWD__TOKEN": "tok-123-secret"})
    assert s.crowd.token.get_secret_value() == "tok-123-secret"
    assert "tok-123-secret" not in repr(s) and "tok-123-secret" not in str(s.model_dump())
    digest_with = s.digest()
    assert digest_with == load_settings(env={"SYNSETFORGE__CROWD__TOKEN": "other"}).digest()  # secrets not hashed
    cfg = tmp_path / "leaky.toml"
    cfg.write_text('[crowd]\ntoken = "abc"\n')
    with pytest.raises(ConfigError, match="must come from the environment"):
        load_settings(cfg, env={})


def test_list_fields_from_env():
    s = load_settings(env={"SYNSETFORGE__VOCABULARY__ROOTS": "n1, n2", "SYNSETFORGE__VOCABULARY__EXCLUDE": '["n3"]'})
    assert s.vocabulary.roots == ["n1", "n2"] and s.vocabulary.exclude == ["n3"]


def test_every_list_field_reads_a_comma_list_from_the_environment():
    """List fields are found from their types, not from a list of names (SYNSETFORGE__INGEST__ALLOWED_NETWORKS
    once failed validation)."""
    import typing

    from pipeline.config import Settings, _annotation_has

    found = []
    for section, sfield in Settings.model_fields.items():
        for name, field in sfield.annotation.model_fields.items():
            if not _annotation_has(field.annotation, list):
                continue
            args = [a for a in typing.get_args(field.annotation) if typing.get_origin(a) is list] or [field.annotation]
            item = typing.get_args(args[0])[0] if typing.get_args(args[0]) else str
            if item is not str:
                continue
            env = {f"SYNSETFORGE__{section.upper()}__{name.upper()}": "jpeg, png"}
            found.append(f"{section}.{name}")
            try:
                value = getattr(getattr(load_settings(env=env), section), name)
            except Exception as exc:  # noqa: BLE001 - a validator may refuse these values, but not the shape
                assert "list" not in str(exc).lower(), (section, name, exc)
                continue
            assert value == ["jpeg", "png"], (section, name, value)
    assert {"ingest.allowed_networks", "vocabulary.roots", "collect.sources", "ingest.allowed_formats"} <= set(found)
    s = load_settings(env={"SYNSETFORGE__INGEST__ALLOWED_NETWORKS": "127.0.0.0/8"})
    assert s.ingest.allowed_networks == ["127.0.0.0/8"]


def test_secrets_are_found_by_type_whatever_the_annotation_spelling():
    from typing import Literal, Optional, Union

    from pydantic import BaseModel, SecretStr

    from pipeline.config import _secret_paths

    class Inner(BaseModel):
        a: SecretStr | None = None
        b: Optional[SecretStr] = None  # noqa: UP045 - the spelling is what is tested
        c: Union[SecretStr, None] = None  # noqa: UP007
        d: str = "not secret"
        mode: Literal["SecretStr", "plain"] = "plain"  # names the type but holds no secret

    class Outer(BaseModel):
        inner: Inner = Inner()
        e: SecretStr = SecretStr("x")

    assert sorted(_secret_paths(Outer())) == [("e",), ("inner", "a"), ("inner", "b"), ("inner", "c")]


def test_config_show_names_every_setting_its_source_and_env_var_with_secrets_masked(tmp_path, monkeypatch, capsys):
    from pipeline.cli import main
    from pipeline.config import Settings

    (tmp_path / "c.toml").write_text("[qc]\naccept_at = 0.995\n")
    monkeypatch.setenv("SYNSETFORGE__CROWD__TOKEN", "s3cret-token-value")
    monkeypatch.setenv("SYNSETFORGE__INGEST__CONCURRENCY", "7")
    assert main(["--config", str(tmp_path / "c.toml"), "--store", str(tmp_path / "st"), "config", "show", "--json"]) == 0
    out = capsys.readouterr().out
    assert "s3cret-token-value" not in out
    rows = {r["key"]: r for r in __import__("json").loads(out)}
    n_fields = sum(len(f.annotation.model_fields) for f in Settings.model_fields.values())
    assert len(rows) == n_fields
    assert rows["qc.accept_at"]["source"] == "file" and rows["qc.accept_at"]["value"] == 0.995
    assert rows["ingest.concurrency"]["source"] == "env" and rows["ingest.concurrency"]["value"] == 7
    assert rows["store.url"]["source"] == "command line"
    assert rows["crowd.token"]["value"] == "**********" and rows["crowd.token"]["secret"]
    assert rows["crowd.pseudonym_key"]["value"] is None and rows["qc.reject_at"]["source"] == "default"
    assert rows["ingest.allowed_networks"]["env"] == "SYNSETFORGE__INGEST__ALLOWED_NETWORKS"
    assert main(["config", "show"]) == 0 and "s3cret-token-value" not in capsys.readouterr().out


def test_readme_settings_table_is_the_generated_one():
    from pathlib import Path

    from pipeline.config_cli import readme_block, settings_markdown

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert readme_block(readme) == settings_markdown(), \
        "README's settings table is stale: run `.venv/bin/python -m pipeline.config_cli --write-readme`"
