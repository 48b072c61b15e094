"""Settings: grouped by concern, read from RECSERVE_<GROUP>_<FIELD>, validated with the rule; the ablations
apart; the documentation tables printed from the classes and pinned here."""

import pytest
from pydantic import ValidationError

from orchestrator.config import (
    REPO_ROOT,
    TABLES,
    Ablations,
    Settings,
    environment_variables,
    main,
    markdown_table,
    with_table,
)


def test_settings_come_from_the_environment_one_group_per_concern(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSERVE_DEADLINE_REQUEST_MS", "80")
    monkeypatch.setenv("RECSERVE_REDIS_URLS", "redis://a:1/0, redis://b:2/0")
    monkeypatch.setenv("RECSERVE_CACHE_LOCAL_TTL_S", "7")  # the group is the first word; the field keeps its _
    settings = Settings()
    assert settings.deadline.request_ms == 80.0
    assert settings.redis.url_list == ["redis://a:1/0", "redis://b:2/0"]
    assert settings.cache.local_ttl_s == 7.0


def test_every_documented_variable_reaches_its_field(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = Settings()
    numeric = []
    for name, field in environment_variables(Settings):
        if field.annotation in (int, float) and not isinstance(field.default, bool):
            monkeypatch.setenv(name, str(field.default + 1))  # within every rule, from the defaults
            numeric.append(name)
    changed = Settings()
    for name in numeric:
        group, _, member = name.removeprefix("RECSERVE_").lower().partition("_")
        assert getattr(getattr(changed, group), member) == getattr(getattr(defaults, group), member) + 1, name
    assert len(numeric) > 20


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RECSERVE_DEADLINE_REQUEST_MS": "0"}, r"deadline.request_ms\n  Value error, must be > 0, got 0.0"),
        ({"RECSERVE_DEADLINE_FALLBACK_RESERVE_MS": "150"}, r"fallback_reserve_ms must be in 0..request_ms \(100.0\)"),
        ({"RECSERVE_RANKING_LIST_LENGTH": "300"}, r"list_length \(300\) must be <= n_candidates \(200\)"),
        ({"RECSERVE_REDIS_MAX_CONNECTIONS": "0"}, "must be an integer >= 1, got 0"),
        ({"RECSERVE_OVERLOAD_HOLD_S": "-1"}, r"must be >= 0 \(0 turns it off\), got -1.0"),
        ({"RECSERVE_REDIS_URLS": " , "}, "urls must name at least one Redis URL"),
        # A misspelt field of a group stops the start instead of being ignored; so does a renamed one.
        ({"RECSERVE_REDIS_TIMOUT_MS": "10"}, r"redis.timout_ms\n  Extra inputs are not permitted"),
        ({"RECSERVE_DEADLINE_MS": "80"}, r"deadline.ms\n  Extra inputs are not permitted"),
    ],
)
def test_bad_settings_stop_the_service_with_the_rule(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=message):
        Settings()


def test_an_error_shows_the_rule_never_the_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSERVE_REDIS_PASSWORD", "hunter2")
    monkeypatch.setenv("RECSERVE_REDIS_URLS", " , ")
    with pytest.raises(ValidationError, match="urls must name at least one Redis URL") as error:
        Settings()
    assert "hunter2" not in str(error.value)


def test_the_ablations_are_apart_from_the_production_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    production = {name for name, _ in environment_variables(Settings)}
    ablations = {name for name, _ in environment_variables(Ablations)}
    assert all(name.startswith("RECSERVE_ABLATION_") for name in ablations)
    assert not any(name.startswith("RECSERVE_ABLATION_") for name in production)
    monkeypatch.setenv("RECSERVE_ABLATION_CACHE_ENABLED", "false")
    monkeypatch.setenv("RECSERVE_ABLATION_STORE_READS", "one_by_one")
    Settings()  # no group of the production settings: ignored there, not an error
    read = Ablations()
    assert (read.cache_enabled, read.store_reads) == (False, "one_by_one")
    assert Ablations.model_fields.keys() == {
        "cache_enabled",
        "local_cache_enabled",
        "single_flight_enabled",
        "hot_route_enabled",
        "redis_coalesce",
        "store_reads",
        "admission_enabled",
    }


def test_every_setting_has_a_description() -> None:
    for settings_class in (Settings, Ablations):
        undocumented = [name for name, field in environment_variables(settings_class) if not field.description]
        assert not undocumented, f"{undocumented} have no docstring"


@pytest.mark.parametrize("path", sorted(TABLES))
def test_the_documented_tables_are_the_settings(path: str) -> None:
    """README.md (production) and docs/LOADTEST.md (ablations) hold the tables printed from the classes."""
    text = (REPO_ROOT / path).read_text()
    assert with_table(text, path) == text, (
        f"{path}'s settings table differs from orchestrator/config.py; "
        f"run `python -m orchestrator.config --update {path}`"
    )


def test_the_tables_name_each_variable_once_with_its_default() -> None:
    table = markdown_table(Settings)
    assert "| `RECSERVE_REDIS_TIMEOUT_MS` | `25.0` | Per-shard deadline of one batch read. |" in table
    assert "| `RECSERVE_EVENTS_API_KEYS` | unset |" in table
    assert "| `RECSERVE_ONNX_MODEL_PATH` | `model_repository/ranker_onnx/1/model.onnx` |" in table
    assert table.count("| `RECSERVE_") == len(list(environment_variables(Settings)))
    assert "RECSERVE_ABLATION_" not in table


def test_a_file_without_the_markers_is_refused_with_the_markers_it_needs() -> None:
    with pytest.raises(ValueError, match=r"README\.md must hold the lines '<!-- BEGIN settings table"):
        with_table("# no table here\n", "README.md")


def test_the_command_prints_the_tables(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--markdown"]) == 0
    assert capsys.readouterr().out == markdown_table(Settings)
    assert main(["--ablations"]) == 0
    assert capsys.readouterr().out == markdown_table(Ablations)


def test_a_variable_set_under_its_old_name_stops_the_start(monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.app import create_app
    from orchestrator.config import RENAMED, environment_variables
    from orchestrator.errors import RenamedSetting

    read = {name for name, _ in environment_variables(Settings)} | {
        name for name, _ in environment_variables(Ablations)
    }
    assert set(RENAMED.values()) <= read, f"renamed to variables nothing reads: {set(RENAMED.values()) - read}"
    assert not set(RENAMED) & read, "an old name must not also be a current one"
    monkeypatch.setenv("RECSERVE_MAX_IN_FLIGHT", "8")
    with pytest.raises(RenamedSetting, match=r"RECSERVE_MAX_IN_FLIGHT is set, but .* RECSERVE_LIMITS_MAX_IN_FLIGHT"):
        create_app()
