"""Params: composition of conf/, typed sections, clear errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from lalora.config import (
    ConfigError,
    FinetuneConfig,
    KfacConfig,
    ModelCard,
    Params,
    compose,
    load_params,
    load_section,
)

ROOT = Path(__file__).resolve().parents[1]


def test_committed_params_equal_the_composition_of_defaults():
    committed = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert committed == compose(ROOT / "conf")


def test_every_config_group_option_composes_and_loads():
    for group in ("model", "data"):
        for path in sorted((ROOT / "conf" / group).glob("*.yaml")):
            raw = compose(ROOT / "conf", [f"{group}={path.stem}"])
            params = load_section(Params, raw, "")
            assert params.models and all(m in params.zoo for m in params.models)


def test_laplace_group_switches_the_whole_recipe():
    """`-S laplace=paper`: the paper's normalisation, standard evidence, zero mean, one
    marglik prior; `laplace=ours` is the default composition."""
    for option in ("ours", "paper"):
        raw = compose(ROOT / "conf", [f"laplace={option}"])
        params = load_section(Params, raw, "")
        if option == "ours":
            assert raw == compose(ROOT / "conf")
    assert (params.kfac.normalisation, params.prior.method) == ("sequences_padded", "marglik")
    assert (params.prior.evidence, params.prior.mean, params.prior.structure) == (
        "standard",
        "zero",
        "scalar",
    )
    # the rest of the study is untouched
    default = load_section(Params, compose(ROOT / "conf"), "")
    assert params.finetune == default.finetune and params.kfac.rank == default.kfac.rank


def test_overrides_compose_as_dvc_exp_run_does():
    raw = compose(ROOT / "conf", ["model=paper", "finetune.lr=1e-4"])
    params = load_section(Params, raw, "")
    assert params.models == ("llama2-7b", "llama3-8b", "phi2", "phi3-mini")
    assert params.finetune.lr == 1e-4
    assert params.card("phi3-mini").targets == ("qkv_proj",)


def test_unknown_key_wrong_type_and_unknown_model_are_named():
    with pytest.raises(ConfigError, match=r"finetune: unknown key\(s\) \['lrr'\]"):
        load_section(FinetuneConfig, {"lrr": 1.0}, "finetune")
    with pytest.raises(ConfigError, match=r"finetune\.batch_size: expected int, got str"):
        load_section(FinetuneConfig, {"batch_size": "6"}, "finetune")
    with pytest.raises(ConfigError, match=r"kfac.update: 'qr' is not one of"):
        load_section(KfacConfig, {"update": "qr"}, "kfac")
    raw = compose(ROOT / "conf")
    raw["models"] = ["gpt5"]
    with pytest.raises(ConfigError, match="unknown model 'gpt5'"):
        load_section(Params, raw, "")


def test_checkpoints_must_match_the_schedule(tmp_path):
    raw = compose(ROOT / "conf")
    raw["checkpoints"] = [0, 50]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="checkpoints"):
        load_params(path)
    with pytest.raises(ConfigError, match="multiple"):
        FinetuneConfig(steps=10, save_every=3)


def test_cards_validate_their_source():
    with pytest.raises(ConfigError, match="repo"):
        ModelCard(source="hub")
    with pytest.raises(ConfigError, match="arch"):
        ModelCard(source="tiny")


def test_data_paper_is_the_six_datasets_of_the_paper():
    raw = compose(ROOT / "conf", ["data=paper"])
    params = load_section(Params, raw, "")
    assert params.datasets == ("winogrande_s", "winogrande_m", "arc_c", "arc_e", "obqa", "boolq")
    for name in params.datasets:  # each entry equals its own group option
        alone = compose(ROOT / "conf", [f"data={name}"])
        assert alone["datasets"] == [name] and alone["data"][name] == raw["data"][name]
    assert params.dataset("obqa").name == "obqa" and params.dataset("winogrande_m").n_train == 2558
    with pytest.raises(ConfigError, match="unknown dataset 'mnist'"):
        params.dataset("mnist")
    assert params.shifted("obqa") == ["arc_c", "arc_e"] and params.shifted("arc_c") == []
    raw = compose(ROOT / "conf", ["data=paper", "datasets=[arc_e,obqa]"])
    subset = load_section(Params, raw, "")
    # ARC-C is scored (the shift stage prepares its test split) though the study skips it
    assert subset.datasets == ("arc_e", "obqa") and subset.shifted("obqa") == ["arc_c", "arc_e"]
    assert subset.scored() == ["arc_e", "obqa", "arc_c"]  # trained first, each once
    raw["datasets"] = ["arc_e", "nope"]
    with pytest.raises(ConfigError, match="unknown dataset 'nope'"):
        load_section(Params, raw, "")
    raw["datasets"] = ["arc_e", "obqa"]
    raw["shift"] = {"obqa": ["obqa"]}
    with pytest.raises(ConfigError, match="not shifted from itself"):
        load_section(Params, raw, "")


def test_ensemble_members_give_the_extra_seeds_and_reserved_model_names_are_refused():
    from lalora.config import EnsembleConfig

    assert EnsembleConfig(members=1).seeds(FinetuneConfig(seed=3)) == []
    assert EnsembleConfig(members=3).seeds(FinetuneConfig(seed=3)) == [4, 5]
    with pytest.raises(ConfigError, match=r"ensemble\.members must be >= 1, got 0"):
        EnsembleConfig(members=0)
    raw = compose(ROOT / "conf")
    raw["zoo"]["members"] = raw["zoo"]["smollm2-135m"]
    raw["models"] = ["members"]
    with pytest.raises(ConfigError, match="'members' is reserved"):
        load_section(Params, raw, "")


def test_forge_workflow_tests_runs_a_tiny_study_and_diffs_metrics_and_plots():
    flow = yaml.safe_load((ROOT / ".github" / "workflows" / "study.yml").read_text())
    steps = flow["jobs"]["study"]["steps"]
    runs = "\n".join(s.get("run", "") for s in steps)
    assert "make setup" in runs and "make test" in runs
    tiny = next(s["run"] for s in steps if "dvc exp run" in s.get("run", ""))
    overrides = dict(re.findall(r"-S '?([\w.]+)=([^'\s]+)", tiny))
    raw = compose(ROOT / "conf", [f"{k}={v}" for k, v in overrides.items()])
    params = load_section(Params, raw, "")  # the tiny configuration is a valid one
    assert params.finetune.steps <= 50 and params.data["generated"].n_train <= 100
    summary = next(s["run"] for s in steps if "GITHUB_STEP_SUMMARY" in s.get("run", ""))
    assert re.search(r"dvc metrics diff \S+ --md", summary)
    assert "dvc plots diff" in summary
    assert any(s.get("with", {}).get("fetch-depth") == 0 for s in steps)
