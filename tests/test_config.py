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
