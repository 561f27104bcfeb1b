"""Bad recipes and bad data are one-line errors naming the file and line or key (fast: nothing trains)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import CI_RECIPE, ROOT, run_training
from training.config import RecipeError, load_recipe


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nsft:\n  epochs: [1\n  lr: 3\n")
    with pytest.raises(RecipeError, match=r"bad\.yaml is not valid YAML: line \d+"):
        load_recipe(bad)


def test_non_utf8_recipe(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(RecipeError, match="not UTF-8"):
        load_recipe(bad)


def test_an_override_that_is_not_yaml() -> None:
    with pytest.raises(RecipeError, match=r"override 'sft\.epochs=\[1'"):
        load_recipe(CI_RECIPE, ["sft.epochs=[1"])


def test_cli_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    for args in (
        ["--set", "sft.epochs=[1"],
        ["--set", f"base.path={tmp_path / 'no-such-model'}"],
    ):
        proc = run_training(
            "run",
            "--recipe",
            str(CI_RECIPE),
            "--out",
            str(tmp_path / "o"),
            "--work",
            str(tmp_path / "w"),
            *args,
            check=False,
        )
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert not (tmp_path / "w").exists()  # nothing started, nothing half-written


def test_a_malformed_data_row_names_file_and_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import training.data as data

    bad = tmp_path / "medtext.jsonl"
    good = (ROOT / "training" / "data" / "medtext.jsonl").read_text(encoding="utf-8").splitlines()
    bad.write_text("\n".join([*good[:3], '{"prompt": "x"', *good[3:5]]) + "\n", encoding="utf-8")
    monkeypatch.setattr(data, "MEDTEXT_PATH", bad)
    data.load_medtext.cache_clear()
    try:
        with pytest.raises(data.DataError, match=r"medtext\.jsonl:4: "):
            data.load_medtext()
    finally:
        data.load_medtext.cache_clear()


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("sft.lr=0", "sft.lr"),
        ("dpo.lr=-1e-5", "dpo.lr"),
        ("sft.epochs=0", "sft.epochs"),
        ("dpo.batch_size=0", "dpo.batch_size"),
        ("dpo.beta=0", "dpo.beta"),
        ("base.build.steps=0", "base.build.steps"),
        ("base.build.block_size=4096", "block_size (4096) must be at most max_position_embeddings"),
        ("base.build.num_heads=7", "hidden_size (128) must be a multiple of num_heads (7)"),
        ("base.build.warmup_steps=100000", "warmup_steps"),
        ("sft.max_length=100000", "sft.max_length (100000) must be at most base.build.max_position_embeddings"),
        ("quantize.group_size=100", "quantize.group_size"),
        (
            "base.build.intermediate_size=200",
            "base.build.intermediate_size (200) must be a multiple of quantize.group_size",
        ),
        ("data.train_rows=1", "data.train_rows"),
        ("evaluate.batch_size=0", "evaluate.batch_size"),
    ],
)
def test_recipe_bounds_and_rules_are_one_line_errors_naming_the_key(override: str, names: str) -> None:
    with pytest.raises(RecipeError) as err:
        load_recipe(CI_RECIPE, [override])
    message = str(err.value)
    assert names in message and "\n" not in message, message


def test_switches_are_explicit_and_keep_the_published_keys() -> None:
    from training.pipeline import stage_keys

    on = load_recipe(CI_RECIPE)
    off = load_recipe(CI_RECIPE, ["sft.enabled=false"])
    assert on.sft.enabled and not off.sft.enabled
    # the switch is left out of the hash while on (stage folders built before it existed stay valid)
    assert "enabled" not in on.sft.model_dump() and off.sft.model_dump()["enabled"] is False
    assert stage_keys(on)["sft"] != stage_keys(off)["sft"] and stage_keys(on)["base"] == stage_keys(off)["base"]
    assert load_recipe(
        CI_RECIPE, ["quantize.group_size=128", "quantize.enabled=false", "base.build.intermediate_size=200"]
    )
