"""Settings (runtime/settings.py `Settings`, service/settings.py `ServiceSettings`): `FHE_BENTO_*` environment
variables, the defaults docs/operations.md's settings table promises, the values derived from them, and
invalid values refused when the settings are read."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from fhe_bento.runtime.settings import Settings
from fhe_bento.service.settings import ServiceSettings

ROOT = Path(__file__).resolve().parents[2]


def documented_defaults() -> dict[str, str]:
    """Field name -> the default column of docs/operations.md's settings table."""
    text = (ROOT / "docs" / "operations.md").read_text()
    section = text.split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `FHE_BENTO_(\w+)` \| ([^|]*) \|", section, re.MULTILINE)
    return {variable.lower(): default.strip() for variable, default in rows}


DOCUMENTED = documented_defaults()
# Defaults the table gives as a literal value (`256`), not as one derived from elsewhere ($BENTOML_HOME).
LITERAL = {
    field: cell.split("`")[1]
    for field, cell in DOCUMENTED.items()
    if cell.startswith("`") and "$" not in cell
}


@pytest.fixture(autouse=True)
def environment(monkeypatch, tmp_path) -> Path:
    """No FHE_BENTO_* variable set (tests/conftest.py sets FHE_BENTO_MODELS for the servers it starts), and
    a throwaway BENTOML_HOME, which it returns."""
    for name in list(os.environ):
        if name.startswith("FHE_BENTO_"):
            monkeypatch.delenv(name)
    home = tmp_path / "bentoml"
    monkeypatch.setenv("BENTOML_HOME", str(home))
    return home


def plain(value: object) -> object:
    return value.get_secret_value() if isinstance(value, SecretStr) else value


def test_every_setting_has_a_row_in_the_docs_table_and_every_row_is_a_setting():
    assert set(DOCUMENTED) == set(ServiceSettings.model_fields)


@pytest.mark.parametrize(
    "field",
    sorted(LITERAL),
)
def test_documented_literal_defaults_are_the_codes(field):
    assert str(plain(getattr(ServiceSettings(), field))) == LITERAL[field]


def test_a_handful_of_defaults_users_rely_on_by_name():
    """The same check without the table parser in between: these numbers are in the docs' table."""
    settings = ServiceSettings()
    names = ("max_batch_rows", "max_queue_rows", "request_timeout", "max_key_bytes", "max_part_bytes")
    assert [getattr(settings, name) for name in names] == [256, 32, 600, 256 * 1024 * 1024, 5 * 1024 * 1024]
    assert [LITERAL[name] for name in names] == ["256", "32", "600", "268435456", "5242880"]


def test_settings_documented_as_unset_or_empty_default_to_nothing():
    settings = ServiceSettings()
    empty = [field for field, cell in DOCUMENTED.items() if cell.startswith(("unset", "empty"))]
    assert sorted(empty) == [
        "admin_tokens",
        "emf_seconds",
        "endpoint_name",
        "key_cache_bytes",
        "model_dir",
        "predict_tokens",
        "runner_url",
    ]
    assert {field: plain(getattr(settings, field)) for field in empty} == {
        "admin_tokens": "",
        "emf_seconds": None,
        "endpoint_name": "",
        "key_cache_bytes": None,
        "model_dir": None,
        "predict_tokens": "",
        "runner_url": "",
    }
    assert settings.default_model is None  # "the first model": chosen by models/repository.py


def test_the_key_store_defaults_to_a_folder_under_bentoml_home(environment):
    assert DOCUMENTED["key_store"] == "`file://$BENTOML_HOME/fhe-bento/keys`"
    assert Settings().key_store == ""
    assert Settings().key_store_url() == (environment / "fhe-bento" / "keys").resolve().as_uri()
    assert Settings().key_store_url().startswith("file:///")


def test_a_key_store_url_that_is_set_is_used_as_it_is(monkeypatch):
    monkeypatch.setenv("FHE_BENTO_KEY_STORE", "s3://bucket/prefix")
    assert Settings().key_store_url() == "s3://bucket/prefix"


def test_the_staging_folder_defaults_under_bentoml_home_and_is_created(environment):
    assert DOCUMENTED["staging_dir"] == "`$BENTOML_HOME/fhe-bento/staging`"
    path = Settings().staging_path()
    assert path == environment / "fhe-bento" / "staging" and path.is_dir()


def test_a_staging_dir_that_is_set_is_used_and_created(monkeypatch, tmp_path):
    monkeypatch.setenv("FHE_BENTO_STAGING_DIR", str(tmp_path / "spool" / "here"))
    assert Settings().staging_path() == tmp_path / "spool" / "here"
    assert (tmp_path / "spool" / "here").is_dir()


@pytest.mark.parametrize(
    ("variable", "value", "field", "expected"),
    [
        ("FHE_BENTO_MAX_BATCH_ROWS", "10", "max_batch_rows", 10),
        ("FHE_BENTO_MAX_QUEUE_ROWS", "5", "max_queue_rows", 5),
        ("FHE_BENTO_MODEL_DIR", "/opt/ml/model", "model_dir", Path("/opt/ml/model")),
        ("FHE_BENTO_DEFAULT_MODEL", "breast-cancer-logreg", "default_model", "breast-cancer-logreg"),
        ("FHE_BENTO_RUNNER_URL", "http://runner:3000", "runner_url", "http://runner:3000"),
        ("FHE_BENTO_KEY_CACHE_BYTES", "0", "key_cache_bytes", 0),  # 0 keeps no warm key: allowed
        ("FHE_BENTO_KEY_TTL_SECONDS", "3600", "key_ttl_seconds", 3600),
        ("FHE_BENTO_SESSION_SECONDS", "0", "session_seconds", 0),  # 0 opens no session: allowed
        ("FHE_BENTO_BODY_IDLE_SECONDS", "5", "body_idle_seconds", 5),
    ],
)
def test_an_environment_variable_overrides_its_default(monkeypatch, variable, value, field, expected):
    monkeypatch.setenv(variable, value)
    assert getattr(ServiceSettings(), field) == expected


@pytest.mark.parametrize(
    ("variable", "value", "field"),
    [
        ("FHE_BENTO_WORKERS", "0", "workers"),
        ("FHE_BENTO_ROW_THREADS", "-1", "row_threads"),
        ("FHE_BENTO_MAX_BATCH_ROWS", "many", "max_batch_rows"),
        ("FHE_BENTO_MAX_KEY_BYTES", "1.5", "max_key_bytes"),
        ("FHE_BENTO_KEY_CACHE_BYTES", "-1", "key_cache_bytes"),
        ("FHE_BENTO_KEY_TTL_SECONDS", "-1", "key_ttl_seconds"),
        ("FHE_BENTO_UPLOAD_TTL_SECONDS", "0", "upload_ttl_seconds"),
        ("FHE_BENTO_MAX_VERIFICATIONS", "-1", "max_verifications"),
        ("FHE_BENTO_REQUEST_TIMEOUT", "0", "request_timeout"),
        ("FHE_BENTO_ENGINE_MAX_FAILED_STARTS", "0", "engine_max_failed_starts"),
        ("FHE_BENTO_SESSION_SECONDS", "-1", "session_seconds"),
        ("FHE_BENTO_BODY_IDLE_SECONDS", "0", "body_idle_seconds"),
        ("FHE_BENTO_MAX_HEADER_BYTES", "0", "max_header_bytes"),
    ],
)
def test_an_invalid_value_is_refused_naming_its_setting(monkeypatch, variable, value, field):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError) as refused:
        ServiceSettings()
    assert [error["loc"] for error in refused.value.errors()] == [(field,)]


def test_other_fhe_bento_variables_are_ignored(monkeypatch):
    """The client CLI's FHE_BENTO_URL and FHE_BENTO_TOKEN may share a shell with the server."""
    monkeypatch.setenv("FHE_BENTO_URL", "http://127.0.0.1:3000")
    monkeypatch.setenv("FHE_BENTO_TOKEN", "tok")
    monkeypatch.setenv("FHE_BENTO_CLIENT_CACHE", "/tmp/cache")
    assert ServiceSettings().workers == 1


def test_parallel_rows_is_workers_times_engine_processes(monkeypatch):
    monkeypatch.setenv("FHE_BENTO_WORKERS", "3")
    monkeypatch.setenv("FHE_BENTO_ROW_THREADS", "2")
    assert Settings().parallel_rows() == 6


@pytest.mark.parametrize(
    ("cores", "workers", "row_threads", "omp_threads", "per_row"),
    [
        (8, 1, 1, 0, 8),
        (8, 2, 2, 0, 2),
        (8, 3, 1, 0, 2),  # rounded down: never oversubscribed
        (8, 3, 3, 0, 1),  # more rows at once than cores: still one thread each
        (None, 1, 1, 0, 1),  # os.cpu_count() unknown
        (8, 2, 2, 6, 6),  # FHE_BENTO_OMP_THREADS wins when set
    ],
)
def test_omp_threads_per_row_splits_the_cores_between_the_rows_at_once(
    monkeypatch, cores, workers, row_threads, omp_threads, per_row
):
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    monkeypatch.setenv("FHE_BENTO_WORKERS", str(workers))
    monkeypatch.setenv("FHE_BENTO_ROW_THREADS", str(row_threads))
    monkeypatch.setenv("FHE_BENTO_OMP_THREADS", str(omp_threads))
    assert Settings().omp_threads_per_row() == per_row


def test_model_tags_are_the_non_empty_comma_separated_entries(monkeypatch):
    monkeypatch.setenv("FHE_BENTO_MODELS", " a:1 , ,b:latest,")
    assert Settings().model_tags() == ["a:1", "b:latest"]


def test_for_environment_reads_the_prefixed_variables_of_the_mapping_it_is_given():
    """A deployment's settings (modelkit/cli.py sizes SageMaker scaling with them)."""
    settings = Settings.for_environment(
        {"FHE_BENTO_ROW_THREADS": "4", "FHE_BENTO_URL": "http://x", "PATH": "/bin", "WORKERS": "9"}
    )
    assert (settings.workers, settings.row_threads, settings.parallel_rows()) == (1, 4, 4)
    service = ServiceSettings.for_environment({"FHE_BENTO_SESSION_SECONDS": "60"})
    assert isinstance(service, ServiceSettings) and service.session_seconds == 60


def test_for_environment_ignores_this_processs_own_environment(monkeypatch):
    monkeypatch.setenv("FHE_BENTO_WORKERS", "5")
    assert Settings.for_environment({"FHE_BENTO_ROW_THREADS": "4"}).workers == 1


def test_for_environment_refuses_invalid_values_too():
    with pytest.raises(ValidationError) as refused:
        Settings.for_environment({"FHE_BENTO_MAX_QUEUE_ROWS": "0"})
    assert [error["loc"] for error in refused.value.errors()] == [("max_queue_rows",)]


def test_tokens_never_show_in_the_settings_repr(monkeypatch):
    monkeypatch.setenv("FHE_BENTO_PREDICT_TOKENS", "tok-predict-secret")
    monkeypatch.setenv("FHE_BENTO_ADMIN_TOKENS", "tok-admin-secret")
    settings = ServiceSettings()
    assert settings.predict_tokens.get_secret_value() == "tok-predict-secret"
    assert settings.admin_tokens.get_secret_value() == "tok-admin-secret"
    assert "secret" not in repr(settings) and "secret" not in str(settings)


@pytest.mark.parametrize(
    ("env", "interval"),
    [
        ({}, 0),  # off outside SageMaker
        ({"FHE_BENTO_ENDPOINT_NAME": "prod"}, 60),  # the deploy command sets the endpoint's name
        ({"FHE_BENTO_ENDPOINT_NAME": "prod", "FHE_BENTO_EMF_SECONDS": "0"}, 0),
        ({"FHE_BENTO_EMF_SECONDS": "5"}, 5),
    ],
)
def test_emf_lines_are_on_with_an_endpoint_name_unless_their_interval_says_otherwise(
    monkeypatch, env, interval
):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert Settings().emf_interval() == interval


def test_the_endpoint_name_is_read_from_the_variable_the_deploy_command_sets():
    from fhe_bento.runtime.cloudwatch import ENDPOINT_ENV

    assert Settings.for_environment({ENDPOINT_ENV: "prod"}).endpoint_name == "prod"
