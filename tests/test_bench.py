"""The benchmark's measuring parts, and a smoke run on a tiny model (no bayesian-lora)."""

from __future__ import annotations

import re

import torch
import yaml

from bench import errors, reference, run
from bench.measure import measure
from bench.workloads import TINY
from lalora.models.adapters import attach_lora
from lalora.models.classifier import answer_logits, answer_token_ids, encode
from lalora.models.zoo import load_card_model


def test_block_error_is_scale_free_and_exact_on_a_copy():
    gen = torch.Generator().manual_seed(0)
    exact = {
        f"m{i}": (
            torch.randn(4, 4, generator=gen, dtype=torch.float64),
            torch.randn(3, 3, generator=gen, dtype=torch.float64),
        )
        for i in range(3)
    }
    scaled = {n: (a * 2.0, g * 0.25) for n, (a, g) in exact.items()}
    err, c = errors.block_error(scaled, exact)
    assert err < 1e-12 and abs(c - 2.0) < 1e-12
    noisy = {
        n: (a + 0.1 * torch.randn(4, 4, generator=gen, dtype=torch.float64), g)
        for n, (a, g) in exact.items()
    }
    err, _ = errors.block_error(noisy, exact)
    dense = lambda b: torch.cat([torch.kron(a, g).flatten() for a, g in b.values()])  # noqa: E731
    x, e = dense(noisy), dense(exact)
    c_ls = float(x @ e / (x @ x))
    assert abs(err - float((c_ls * x - e).norm() / e.norm())) < 1e-10


def test_reference_inputs_give_our_logits():
    """Left padding with explicit positions (the reference's batches) gives the same answer
    logits at position -1 as our right-padded batches at the last prompt token."""
    tok, base = load_card_model(TINY)
    model = attach_lora(base, TINY).eval()
    ids = answer_token_ids(tok, (" A", " B"))
    prompts = ["Short prompt. Answer:", "A much longer prompt with many more words. Answer:"]
    batch = encode(tok, prompts, [0, 1], 64)
    inputs = reference.left_padded(batch)
    assert inputs["attention_mask"][:, -1].all() and not inputs["attention_mask"][0, 0]
    with torch.no_grad():
        ours = answer_logits(model, batch, ids)
        theirs = model(**inputs).logits[:, -1, ids]
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_measure_sees_an_allocation():
    sample, out = measure(lambda n: torch.ones(n, dtype=torch.float64).sum(), 2**25)
    assert float(out) == 2**25 and sample.seconds > 0
    assert sample.peak_bytes >= 0.9 * 2**28  # 256 MiB of float64 ones


def test_smoke_run_reports_exact_errors_at_full_rank(tmp_path):
    """Rank >= every side: the low-rank factors are exact, so both errors vanish; a small rank
    gives a positive factor error."""
    common = [
        "--model",
        "tiny",
        "--n-train",
        "8",
        "--n-test",
        "4",
        "--n-error-train",
        "8",
        "--n-error-test",
        "4",
        "--repeats",
        "1",
        "--no-reference",
        "--threshold",
        "16",
    ]
    report = run.main(
        [*common, "--rank", "64", "--sections", "cost,accuracy", "--out", str(tmp_path / "r.md")]
    )
    assert (tmp_path / "r.md").read_text().strip() == report.strip()
    assert "### 1. Against the floor" in report and "Laplace predictive" in report
    for update in ("svd", "nystrom"):
        row = re.search(rf"\| ours, {update} \| (\S+) \| (\S+) \| (\S+) \|", report)
        assert row is not None
        assert float(row[1]) < 1e-6 and abs(float(row[2]) - 1) < 1e-6 and float(row[3]) < 1e-6
    low = run.main([*common, "--rank", "2", "--sections", "accuracy"])
    row = re.search(r"\| ours, svd \| (\S+) \|", low)
    assert 1e-3 < float(row[1]) < 1


def test_the_study_s_runs_compose_and_name_their_export_stages():
    """bench.study's plan, from conf/ as ``dvc exp run -S`` composes it: every run's overrides
    compose, each run trains the export stages of its own checkpoints, and the runs' names are
    unique."""
    from bench import study

    names = [r.name for r in study.RUNS]
    assert len(set(names)) == len(names)
    for r in study.RUNS:
        raw = study.composed(r)
        targets = study.export_targets(r)
        n = len(raw["models"]) * len(raw["datasets"]) * len(raw["checkpoints"])
        assert len(targets) == len(set(targets)) == n, r.name
        for override in r.overrides:
            key, value = override.split("=", 1)
            if (study.ROOT / "conf" / key).is_dir():
                continue  # a config group's option (data=paper)
            node = raw
            for part in key.split(".")[:-1]:
                node = node[part]
            got, want = node[key.split(".")[-1]], yaml.safe_load(value)
            if isinstance(got, int | float) and not isinstance(got, bool):
                assert got == float(want), override  # YAML 1.1 reads 1e-3 as a string
            else:
                assert got == want, override
