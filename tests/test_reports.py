"""Reports: tables and figures from a real smoke sweep's MLflow store, checked against MLflow itself;
the one-factor ablation logic on a small hand-made runs frame; gaps (failed runs, missing metrics)."""
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from reports import data as D
from reports.tables import MISSING, ablation_table, k_tables

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_header(path: Path) -> tuple[int, int]:
    """(width, height) parsed from the PNG signature and IHDR chunk (independent of reports.build)."""
    head = path.read_bytes()[:33]
    assert head[:8] == PNG_SIGNATURE, f"{path.name}: not a PNG"
    assert head[12:16] == b"IHDR", f"{path.name}: no IHDR chunk first"
    w, h = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    assert path.read_bytes()[-8:-4] == b"IEND", f"{path.name}: truncated (no IEND chunk)"
    return w, h


# ---------------------------------------------------------------------------------------------
# The table logic on a synthetic frame shaped like mlflow.search_runs' (fast).

BASE = {"loss.lambda_tight": "0.1", "loss.clamp_ratio": "None", "loss.clamp_reference": "rec",
        "noise.name": "gaussian", "noise.fft_stats": "dataset", "data.dataset": "mnist"}
VARIANTS = [({}, "seed"), ({"loss.lambda_tight": "0.0"}, "loss.lambda_tight,seed"),
            ({"loss.lambda_tight": "0.3"}, "loss.lambda_tight,seed"),
            ({"loss.clamp_ratio": "1.5"}, "loss.clamp_ratio,seed"),
            ({"loss.clamp_ratio": "1.5", "loss.clamp_reference": "drift"}, "loss.clamp_ratio,loss.clamp_reference,seed"),
            ({"noise.name": "fft"}, "noise.name,seed"),
            ({"noise.name": "fft", "noise.fft_stats": "batch"}, "noise.fft_stats,noise.name,seed")]


def synthetic_runs() -> pd.DataFrame:
    rows = []
    rng = np.random.default_rng(0)
    for vi, (diff, swept) in enumerate(VARIANTS):
        for seed in (0, 1):
            p = {**BASE, **diff, "seed": str(seed)}
            row = {"run_id": f"r{vi}{seed}", "status": "FINISHED", "tags.swept": swept,
                   "tags.trial_id": f"t{vi:02d}_{seed}", "tags.error": None}
            row.update({f"params.{k}": v for k, v in p.items()})
            for k in (1, 2, 3):
                row[f"metrics.fid_mnist_k{k}"] = 10.0 + vi + k + rng.random()
                row[f"metrics.precision_mnist_k{k}"] = 0.5 + 0.01 * vi + rng.random() / 100
                row[f"metrics.kid_std_mnist_k{k}"] = 0.001
                row[f"metrics.idem_k{k}"] = 0.1 / k
            row["metrics.drift_real"] = 0.05 + vi / 100
            row["metrics.train/rec"] = 0.1
            rows.append(row)
    df = pd.DataFrame(rows)
    # gaps: λt = 0.3 seed 1 failed; clamp 1.5 seed 0 lacks fid_mnist_k2
    df.loc[df.run_id == "r21", "status"] = "FAILED"
    df.loc[df.run_id == "r21", "tags.error"] = "RuntimeError: out of memory"
    df.loc[df.run_id == "r21", [c for c in df.columns if c.startswith("metrics.")]] = np.nan
    df.loc[df.run_id == "r30", "metrics.fid_mnist_k2"] = np.nan
    return df


def test_one_factor_ablation_tables_on_a_synthetic_frame(tmp_path):
    df = synthetic_runs()
    assert D.is_one_factor(df)
    axes = D.axes_of(df)
    assert axes == ["loss.lambda_tight", "loss.clamp_ratio", "noise.name", "loss.clamp_reference", "noise.fft_stats"]
    metrics = D.result_metrics(df)
    assert "kid_std_mnist_k1" not in metrics and "train/rec" not in metrics and "drift_real" in metrics
    configs = D.aggregate(df, axes, metrics)
    ref = D.reference_key(df, configs)
    assert ref == ("0.1", "None", "gaussian", "rec", "dataset")

    # λt: baseline and the two λt variants, nothing else; mean ± std over the two seeds
    t = ablation_table(configs, "loss.lambda_tight", ref)
    assert [r[0] for r in t.rows] == ["0", "0.1 (baseline)", "0.3"]
    fid1 = df[df["params.loss.lambda_tight"] == "0.0"]["metrics.fid_mnist_k1"]
    row = t.data.iloc[0]
    assert row["n"] == 2
    assert row["fid_mnist_k1_mean"] == pytest.approx(fid1.mean(), abs=1e-12)
    assert row["fid_mnist_k1_std"] == pytest.approx(fid1.std(ddof=1), abs=1e-12)
    col = [lab for _, lab in t.columns].index("k=1")  # the first k=1 column is FID's
    assert t.rows[0][col].startswith(f"{fid1.mean():.2f} ± ")
    # λt = 0.3: one of two seeds failed -> n = 1, no std, the failure in the note
    assert t.data.iloc[2]["n"] == 1 and "1 failed: RuntimeError: out of memory" in t.rows[2][-1]
    # bold: the lowest FID (λt = 0.0 variant has the smallest offset) and the highest precision
    fid_means = t.data["fid_mnist_k1_mean"].tolist()
    assert t.bold[fid_means.index(min(fid_means))][col]
    assert sum(b[col] for b in t.bold) == 1

    # clamp reference: only the two clamped variants differ in it alone (not the baseline)
    t = ablation_table(configs, "loss.clamp_reference", ref)
    assert [r[0] for r in t.rows] == ["drift", "rec"]
    assert list(t.data["loss.clamp_ratio"]) == ["1.5", "1.5"]
    # clamp ratio: baseline (none) vs 1.5; the 1.5 run without fid k2 shows (n=1)
    t = ablation_table(configs, "loss.clamp_ratio", ref)
    assert [r[0] for r in t.rows] == ["none (baseline)", "1.5"]
    k2 = [f"{g} {lab}" for g, lab in t.columns].index("FID (mnist) k=2")
    assert t.rows[1][k2].endswith("(n=1)") and t.data.iloc[1]["fid_mnist_k2_n"] == 1
    # FFT statistics: dataset vs batch, both with FFT noise
    t = ablation_table(configs, "noise.fft_stats", ref)
    assert [r[0] for r in t.rows] == ["batch", "dataset"]
    assert set(t.data["noise.name"]) == {"fft"}

    # k-table of the baseline: k = 1..3, FID and precision with the extractor, idem included
    kt = k_tables(configs, ref, "baseline")
    assert [x.name for x in kt] == ["k_table_mnist"]
    assert list(kt[0].data["k"]) == [1, 2, 3]
    assert kt[0].data.iloc[0]["idem_mean"] == pytest.approx(0.1)

    # a configuration whose runs all failed keeps its row, with gaps marked
    df2 = df.copy()
    df2.loc[df2.run_id == "r20", ["status", "tags.error"]] = ["FAILED", "ValueError: nan loss"]
    df2.loc[df2.run_id == "r20", [c for c in df2.columns if c.startswith("metrics.")]] = np.nan
    c2 = D.aggregate(df2, axes)
    t = ablation_table(c2, "loss.lambda_tight", ref)
    last = t.rows[-1]
    assert last[0] == "0.3" and last[1] == "0" and MISSING in last and "2 failed" in last[-1]

    # writing is deterministic, and LaTeX is booktabs
    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        for axis in axes:
            ablation_table(D.aggregate(df, axes), axis, ref).write(folder)
    for p in sorted(a.iterdir()):
        assert p.read_bytes() == (b / p.name).read_bytes(), p.name
    tex = (a / "ablation_loss_lambda_tight.tex").read_text()
    assert "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex and "\\textbf{" in tex


def test_projection_table_from_logged_metrics():
    from reports.tables import projection_tables
    assert projection_tables({"fid_mnist_k1": 3.0}, "run") is None
    t = projection_tables({"proj_noise_psnr_k0": 15.0, "proj_noise_psnr_k1": 20.5, "proj_noise_psnr_base": 18.0,
                           "proj_clean_fid_real": 3.0}, "run")
    assert [(r[0], r[1], r[2]) for r in t.rows] == [("clean", "real", ""), ("noise", "identity", "0"),
                                                    ("noise", "ign", "1"), ("noise", "baseline", "")]
    assert list(t.data["psnr"].dropna()) == [15.0, 20.5, 18.0]


def test_selection_metric_and_best_config():
    df = synthetic_runs()
    assert D.selection_metric(df) == ("fid_mnist_k1", "min")
    assert D.selection_metric(df, "precision_mnist_k1", "max") == ("precision_mnist_k1", "max")
    assert D.selection_metric(df, "not_logged") == ("fid_mnist_k1", "min")
    configs = D.aggregate(df, D.axes_of(df))
    best = D.best_key(configs, "fid_mnist_k1", "min")
    means = configs.table.set_index(configs.table["key"].map(str))["fid_mnist_k1"]
    assert str(best) == means.idxmin()
    run = D.best_run(df, configs.runs[best], "fid_mnist_k1", "min")
    assert run in configs.runs[best]


# ---------------------------------------------------------------------------------------------
# A real smoke sweep.

@pytest.fixture(scope="module")
def smoke_report(smoke_sweep, tmp_path_factory):
    from reports.build import build_report
    assert smoke_sweep["proc"].returncode == 0, smoke_sweep["proc"].stderr[-2000:]
    out = tmp_path_factory.mktemp("report") / "smoke"
    path = build_report("smoke", out, smoke_sweep["uri"])
    return {"out": out, "path": path, "uri": smoke_sweep["uri"]}


def _runs(uri, experiment="smoke"):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id], max_results=1000)


@pytest.mark.slow
def test_report_tables_equal_mlflow(smoke_report):
    out = smoke_report["out"]
    client, runs = _runs(smoke_report["uri"])
    by_id = {r.info.run_id: r for r in runs}
    # every run's every metric, exactly as MLflow holds it
    csv = pd.read_csv(out / "tables" / "runs.csv")
    assert sorted(csv["run_id"]) == sorted(by_id)
    checked = 0
    for _, row in csv.iterrows():
        metrics = by_id[row["run_id"]].data.metrics
        for key in [c for c in csv.columns if c in metrics]:
            assert row[key] == metrics[key], (row["run_id"], key)
            checked += 1
    assert checked >= 4 * 15
    # ablation cells: mean over the runs with those axis values, read back independently
    for axis in ("loss.lambda_tight", "loss.distance"):
        t = pd.read_csv(out / "tables" / f"ablation_{axis.replace('.', '_')}.csv", dtype={axis: str})
        other = "loss.distance" if axis == "loss.lambda_tight" else "loss.lambda_tight"
        assert len(t) == 4 and set(t["group"]) == {1, 2}
        for _, row in t.iterrows():
            match = [r for r in runs if r.data.params[axis] == str(row[axis])
                     and r.data.params[other] == str(row[other])]
            assert row["n"] == len(match) == 1
            for k in (1, 2, 3):
                assert row[f"swd_k{k}_mean"] == pytest.approx(np.mean([r.data.metrics[f"swd_k{k}"] for r in match]), abs=0)
                assert row[f"idem_k{k}_mean"] == match[0].data.metrics[f"idem_k{k}"]
    # the k-table is the best configuration's (lowest swd_k1)
    best = min(runs, key=lambda r: r.data.metrics["swd_k1"])
    kt = pd.read_csv(out / "tables" / "k_table.csv")
    assert list(kt["k"]) == [1, 2, 3]
    for _, row in kt.iterrows():
        assert row["swd_mean"] == best.data.metrics[f"swd_k{row['k']}"]
        assert row["energy_mean"] == best.data.metrics[f"energy_k{row['k']}"]
    # Table 1 from the best run's params; the architecture walked from the model
    hyp = pd.read_csv(out / "tables" / "table1_hyperparameters.csv").set_index("hyperparameter")["this_run"]
    p = best.data.params
    assert f"λt = {float(p['loss.lambda_tight']):g}" in hyp["Loss term weights"]
    assert hyp["Iterations"] == p["train.steps"] and hyp["Batch size"] == p["train.batch_size"]
    arch = pd.read_csv(out / "tables" / "table1_architecture.csv")
    assert list(arch["Operation"]) == ["Linear"] * (int(p["model.depth"]) + 1)
    assert list(arch["Feature maps"][:-1]) == [int(p["model.hidden"])] * int(p["model.depth"])
    # the header states what stands behind the numbers
    md = (out / "report.md").read_text()
    exp = client.get_experiment_by_name("smoke")
    for text in (f"(id {exp.experiment_id})", smoke_report["uri"], best.data.tags["git_commit"],
                 f"{p['eval.n_samples']} generated samples per k",
                 f"{p['train.steps']} steps at batch size {p['train.batch_size']}", f"Device: `{best.data.tags['device']}` (config `device` = {p['device']})",
                 best.info.run_id):
        assert text in md, text
    for name in ("csv", "md", "tex"):
        assert (out / "tables" / f"ablation_loss_lambda_tight.{name}").is_file()


@pytest.mark.slow
def test_report_figures_are_pngs_of_the_expected_size(smoke_report):
    import json
    out = smoke_report["out"]
    manifest = json.loads((out / "manifest.json").read_text())
    figs = manifest["figures"]
    expected = {"metric_vs_k", "training_curves", "vs_loss_lambda_tight", "vs_loss_distance",
                "fig4_fk_rows", "fig11_14_uncurated", "interpolation"}
    assert expected <= set(figs)
    on_disk = {p.stem for p in (out / "figures").glob("*.png")}
    assert on_disk == set(figs)
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    for name, rec in figs.items():
        w, h = png_header(out / rec["file"])
        assert (w, h) == (rec["width"], rec["height"]), name
        assert w == 1200 and 300 <= h <= 2000, (name, w, h)
        assert f"]({rec['file']})" in md
    assert png_header(out / "figures" / "training_curves.png") == (1200, 420)
    # self-contained HTML: every image inlined, nothing fetched
    assert html.count("src=\"data:image/png;base64,") == len(figs)
    assert not re.search(r"src=\"(?!data:)", html)


@pytest.mark.slow
def test_building_twice_gives_byte_identical_tables(smoke_report, tmp_path):
    from reports.build import build_report
    again = tmp_path / "again"
    build_report("smoke", again, smoke_report["uri"], checkpoint_figures=False)
    first = sorted((smoke_report["out"] / "tables").iterdir())
    assert first and [p.name for p in first] == sorted(p.name for p in (again / "tables").iterdir())
    for p in first:
        assert p.read_bytes() == (again / "tables" / p.name).read_bytes(), p.name


@pytest.mark.slow
def test_failed_run_and_missing_metric_are_marked(smoke_sweep, tmp_path):
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient
    from reports.build import build_report
    src = Path(smoke_sweep["uri"][len("sqlite:///"):])
    db = tmp_path / "mlflow.db"
    shutil.copy(src, db)
    uri = f"sqlite:///{db}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("smoke")
    template = client.search_runs([exp.experiment_id], max_results=1)[0]
    params = dict(template.data.params)

    def add_run(trial, overrides, status, metrics, tags):
        run = client.create_run(exp.experiment_id, run_name=trial,
                                tags={"trial_id": trial, "sweep": "smoke", "swept": "loss.distance,loss.lambda_tight",
                                      "git_commit": "test", **tags})
        p = {**params, **overrides}
        client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in sorted(p.items())],
                         metrics=[Metric(k, v, 0, 300) for k, v in metrics.items()])
        client.set_terminated(run.info.run_id, status)
        return run.info.run_id

    # a failed trial in a new configuration; a finished one without any swd metric
    add_run("zz_failed", {"loss.lambda_tight": "0.5", "loss.distance": "l1"}, "FAILED", {},
            {"error": "RuntimeError: boom at step 7"})
    add_run("zz_nometric", {"loss.lambda_tight": "0.2", "loss.distance": "l2"}, "FINISHED",
            {"idem_k1": 0.5, "drift_real": 0.1}, {})
    out = tmp_path / "report"
    path = build_report("smoke", out, uri, checkpoint_figures=False)
    md = path.read_text()
    assert "failed: RuntimeError: boom at step 7" in md
    assert "swd_k1" in md and "(n=1)" in md
    t = pd.read_csv(out / "tables" / "ablation_loss_lambda_tight.csv", dtype={"loss.lambda_tight": str})
    failed = t[t["loss.lambda_tight"] == "0.5"].iloc[0]
    assert failed["n"] == 0 and failed["n_failed"] == 1 and "boom" in failed["note"]
    assert math.isnan(failed["swd_k1_mean"])
    table_md = (out / "tables" / "ablation_loss_lambda_tight.md").read_text()
    line = next(ln for ln in table_md.splitlines() if ln.startswith("| 0.5 "))
    assert MISSING in line and "1 failed: RuntimeError: boom" in line
    both = t[(t["loss.lambda_tight"] == "0.2") & (t["loss.distance"] == "l2")].iloc[0]
    assert both["n"] == 2 and both["swd_k1_n"] == 1 and both["idem_k1_n"] == 2
    runs = pd.read_csv(out / "tables" / "runs.csv")
    assert set(runs["status"]) == {"FINISHED", "FAILED"}
    assert "boom" in runs.loc[runs["trial_id"] == "zz_failed", "error"].iloc[0]


@pytest.mark.slow
def test_cli_report_and_paper(smoke_sweep, tmp_path, capsys, monkeypatch):
    """`ign-bench report` / `paper` through harness.cli.main (in process: the modules are loaded)."""
    from harness.cli import main
    uri = smoke_sweep["uri"]
    assert main(["report", "no_such_sweep", "--out", str(tmp_path / "x"), "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ign-bench report: error: sweep: no MLflow experiment 'no_such_sweep'")
    assert "allowed: smoke" in err[-1] and not (tmp_path / "x").exists()
    assert main(["report", "smoke", "--out", str(tmp_path / "rep"), "--tracking-uri", uri,
                 "--no-checkpoint-figures"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "rep" / "report.md")
    assert (tmp_path / "rep" / "report.html").is_file() and (tmp_path / "rep" / "tables" / "runs.csv").is_file()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/p.db")
    assert main(["paper", "--dry-run", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert '"sweep": "paper-cpu"' in err and '"will_run": true' in err and "reduced CPU scale" in err
    assert main(["paper", "--dry-run", "--device", "tpu"]) == 2
    assert "device: unknown value 'tpu'" in capsys.readouterr().err
