"""The ``predictor`` command: one subcommand per job, each a thin layer over a public function.

Exit codes: 0 success; 2 bad input (a one-line message naming the file/row/column and the
fix; nothing half-written); 130 interrupted.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from predictor.errors import PredictorError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Predict and explain immunotherapy benefit from per-patient CyTOF immune profiles.",
)


def _say(msg: str) -> None:
    typer.echo(msg)


@app.command("inspect")
def inspect_cmd(
    files: Annotated[list[Path], typer.Argument(help="FCS files.")],
) -> None:
    """Show version, events, channels with markers, and quirks of FCS files."""
    from predictor.errors import FCSError
    from predictor.inspect import format_report, inspect_files

    reports = inspect_files(files)
    _say(format_report(reports))
    bad = [r for r in reports if not r.ok]
    if bad:
        names = ", ".join(r.path.name for r in bad)
        raise FCSError(f"{len(bad)} of {len(reports)} file(s) could not be read: {names} "
                       "(reasons above). Re-export them or leave them out.")


@app.command("panel")
def panel_cmd(
    file: Annotated[Path, typer.Argument(help="An FCS file of the cohort.")],
    out: Annotated[Path, typer.Option(help="Panel CSV to write.")],
    force: Annotated[bool, typer.Option(help="Overwrite --out.")] = False,
) -> None:
    """Draft a panel (channel, marker, role, cofactor) from a file, for you to check and edit."""
    import os

    from predictor.errors import OutputExistsError
    from predictor.io.fcs import read_fcs_header
    from predictor.io.panel import draft_panel

    if out.exists() and not force:
        raise OutputExistsError(f"{out}: exists already; choose another --out or pass --force.")
    pnl = draft_panel(read_fcs_header(file))
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        pnl.to_csv(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    counts = pnl.table["role"].value_counts()
    _say(f"Drafted a panel of {len(pnl.table)} channels from {file.name} → {out}")
    _say("  " + ", ".join(f"{n} {role}" for role, n in counts.items()))
    for row in pnl.table.itertuples():
        _say(f"    {row.channel:<24} {row.marker:<20} {row.role}")
    _say("Check the markers and roles (edit the CSV) before using it.")


@app.command()
def simulate(
    out: Annotated[Path, typer.Option(help="Output folder (must be new or empty).")],
    patients: Annotated[int, typer.Option(help="Number of patients.")] = 60,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    cells_per_sample: Annotated[int, typer.Option(help="Mean events per FCS file.")] = 4000,
    batches: Annotated[int, typer.Option(help="Acquisition batches.")] = 2,
    id_prefix: Annotated[str, typer.Option(help="Patient id prefix.")] = "P",
    jobs: Annotated[int, typer.Option(help="Worker processes.")] = 2,
    force: Annotated[bool, typer.Option(help="Write into a non-empty folder.")] = False,
) -> None:
    """Simulate an IL-7 trial cohort: FCS files, sample sheet, clinical table, panel, truth."""
    from predictor.simulate import simulate_cohort

    t0 = time.perf_counter()
    c = simulate_cohort(out, n_patients=patients, seed=seed, cells_per_sample=cells_per_sample,
                        n_batches=batches, id_prefix=id_prefix, overwrite=force, n_jobs=jobs)
    _say(f"Simulated {patients} patients in {time.perf_counter() - t0:.1f} s → {c.root}")
    for label, p in (("sample sheet", c.samples), ("clinical", c.clinical), ("panel", c.panel), ("truth", c.truth)):
        _say(f"  {label:<13}{p}")


@app.command()
def features(
    samples: Annotated[Path, typer.Option(help="Sample sheet CSV.")],
    panel: Annotated[Path, typer.Option(help="Panel CSV.")],
    out: Annotated[Path, typer.Option(help="Output folder for the tables.")],
    template: Annotated[str, typer.Option(help="Gating template YAML, or 'default'.")] = "default",
    clusters: Annotated[int | None, typer.Option(help="FlowSOM metaclusters instead of gating (named by the template).")] = None,
    mode: Annotated[str, typer.Option(help="'on-treatment' or 'baseline'.")] = "on-treatment",
    frac_pos_reference: Annotated[str, typer.Option(help="Positivity gate of frac_pos: 'fixed' (arcsinh --frac-pos-threshold) or 'unstim' (--frac-pos-quantile of the patient's unstimulated sample at that timepoint, per population).")] = "fixed",
    frac_pos_threshold: Annotated[float, typer.Option(help="Fixed positivity threshold, arcsinh units.")] = 2.0,
    frac_pos_quantile: Annotated[float, typer.Option(help="Quantile of the unstimulated sample used as the gate.")] = 0.99,
    median_markers: Annotated[str, typer.Option(help="Markers whose median per population is a feature, comma-separated: 'functional', 'lineage' and/or marker names.")] = "functional",
    jobs: Annotated[int, typer.Option(help="Local worker processes.")] = 2,
    scheduler: Annotated[str | None, typer.Option(help="Dask scheduler address (tcp://host:8786) to run on.")] = None,
    cache: Annotated[Path | None, typer.Option(help="Per-sample cache folder: re-runs skip finished samples.")] = None,
    force: Annotated[bool, typer.Option(help="Replace a non-empty --out.")] = False,
) -> None:
    """Gate populations and compute per-patient features of a cohort (Parquet, CSV, AnnData)."""
    from predictor.config import FeatureConfig
    from predictor.features import extract_features
    from predictor.io.panel import read_panel
    from predictor.io.samplesheet import read_sample_sheet

    cfg = FeatureConfig(mode=mode, n_jobs=jobs, frac_pos_reference=frac_pos_reference,
                        frac_pos_threshold=frac_pos_threshold, frac_pos_quantile=frac_pos_quantile,
                        median_markers=tuple(m.strip() for m in median_markers.split(",") if m.strip()))
    if out.exists() and any(out.iterdir()) and not force:
        raise PredictorError(f"{out}: folder exists and is not empty; choose another --out or pass --force.")
    pnl = read_panel(panel)
    sheet = read_sample_sheet(samples)
    fs = extract_features(sheet, pnl, config=cfg, template=template, clusters=clusters, cache=cache,
                          scheduler=scheduler, progress=True)
    fs.save(out, overwrite=force)
    _say(f"{fs.X.shape[0]} patients × {fs.X.shape[1]} features from {len(fs.qc)} samples → {out}")
    skipped = fs.gating.skipped
    if skipped:
        _say("Populations skipped: " + "; ".join(f"{k} ({v})" for k, v in skipped.items()))


@app.command()
def train(
    experiment: Annotated[Path, typer.Argument(help="Experiment file (TOML).")],
    seed: Annotated[int | None, typer.Option(help="Override the experiment's seed.")] = None,
    scheduler: Annotated[str | None, typer.Option(help="Dask scheduler address to extract features on (overrides [features] scheduler).")] = None,
) -> None:
    """Run an experiment: features, nested grouped CV, MLflow run, registered model, bundle."""
    from dataclasses import replace

    from predictor.config import load_experiment
    from predictor.model.experiment import run_experiment
    from predictor.model.tracking import ui_command

    cfg = load_experiment(experiment, **({"seed": seed} if seed is not None else {}))
    if scheduler is not None:
        cfg = replace(cfg, features=replace(cfg.features, scheduler=scheduler))
    res = run_experiment(cfg, progress=True)
    _print_training(res)
    _say(f"  MLflow UI:   {ui_command(cfg.tracking.store)}")


def _print_training(res) -> None:
    tr = res.training
    p = tr.permutation
    n_cov = len(tr.covariates)
    adjusted = f", adjusted for {', '.join(res.config.model.covariates)}" if n_cov else ""
    _say(f"Experiment {res.config.name}: {len(res.features.X)} patients, "
         f"{res.features.X.shape[1] - n_cov} features{adjusted}")
    for name, v in tr.metrics.items():
        _say(f"  {name:<18} {v['estimate']:.3f}  (95% CI {v['ci_low']:.3f}–{v['ci_high']:.3f})")
    how = f", {p['procedure']}" if p.get("procedure") else ""
    _say(f"  permutation p      {p['p_value']:.3g}  ({p['n_permutations']} permutations{how})")
    key = tr.metric
    for base, table in tr.baselines.items():
        v = table[key]
        _say(f"  baseline {base:<20} {key} {v['estimate']:.3f} ({v['ci_low']:.3f}–{v['ci_high']:.3f})")
    if getattr(tr, "tuning", None):
        _say(f"  tuned settings     {tr.tuning.get('final')}")
    _say(f"  MLflow run:  {res.run_id}  (registered {res.model['registered_model']} v{res.model['registered_version']})")
    _say(f"  bundle:      {res.bundle}")


@app.command()
def score(
    model: Annotated[str, typer.Option(help="models/NAME (newest), models/NAME/vNNN, or models:/NAME@alias.")],
    samples: Annotated[Path, typer.Option(help="Sample sheet of the new patients.")],
    out: Annotated[Path, typer.Option(help="Scores CSV (or .parquet).")],
    clinical: Annotated[Path | None, typer.Option(help="Clinical table of the new patients (patient_id + the model's covariates, e.g. arm); needed when the model has clinical covariates.")] = None,
    report: Annotated[Path | None, typer.Option(help="Also write an HTML report with patient cards.")] = None,
    allow_missing_markers: Annotated[bool, typer.Option(help="Score even if files lack panel markers (features missing, warned).")] = False,
    store: Annotated[Path, typer.Option(help="MLflow SQLite store, for models:/ URIs.")] = Path("mlflow.db"),
    jobs: Annotated[int | None, typer.Option(help="Local worker processes.")] = None,
    scheduler: Annotated[str | None, typer.Option(help="Dask scheduler address to run on.")] = None,
    force: Annotated[bool, typer.Option(help="Overwrite existing outputs.")] = False,
) -> None:
    """Score new patients with a frozen model bundle (an interrupted batch resumes on re-run)."""
    from predictor.report.html import build_report
    from predictor.score import score_samples

    if report is not None and report.exists() and not force:
        raise PredictorError(f"{report}: exists already; choose another --report or pass --force.")
    scores, fs = score_samples(model, samples, out, force=force, allow_missing_markers=allow_missing_markers,
                               store=store, n_jobs=jobs, scheduler=scheduler, progress=True,
                               clinical=clinical)
    survival = "high_risk" in scores
    flagged = int(scores["high_risk" if survival else "flag"].sum())
    what = "at high risk" if survival else "flagged as likely to benefit"
    warned = int((scores["warnings"] != "").sum())
    _say(f"Scored {len(scores)} patients with {scores['model'].iloc[0]} ({flagged} {what}, "
         f"{warned} with warnings) → {out}")
    if report is not None:
        build_report(_bundle_dir(model, store), report, scores=scores, score_features=fs.X, force=force)
        _say(f"Report → {report}")


def _bundle_dir(model: str, store: Path) -> str:
    if model.startswith("models:/"):
        from predictor.model.tracking import resolve_model_uri

        return str(resolve_model_uri(model, store))
    return model


@app.command("report")
def report_cmd(
    out: Annotated[Path, typer.Option(help="HTML file to write.")],
    model: Annotated[str | None, typer.Option(help="Bundle folder models/NAME[/vNNN].")] = None,
    run: Annotated[str | None, typer.Option(help="MLflow run id (its logged bundle is used).")] = None,
    store: Annotated[Path, typer.Option(help="MLflow SQLite store (with --run).")] = Path("mlflow.db"),
    force: Annotated[bool, typer.Option(help="Overwrite --out.")] = False,
) -> None:
    """Write the explanation report of a model (by bundle or by MLflow run)."""
    from predictor.report.html import build_report

    if (model is None) == (run is None):
        raise PredictorError("Give exactly one of --model models/NAME or --run RUN_ID.")
    if run is not None:
        if not store.is_file():
            raise PredictorError(f"{store}: MLflow store not found; pass --store path/to/mlflow.db.")
        from predictor.model.tracking import download_run_artifacts

        try:
            model = str(download_run_artifacts(store, run, "bundle"))
        except Exception as exc:  # MLflow raises several types for unknown runs
            raise PredictorError(f"Run {run!r} has no logged bundle in {store} ({exc}).".splitlines()[0]) from None
    build_report(model, out, force=force)
    _say(f"Report → {out}")


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Folder for data, mlflow.db, mlruns/, models/, outputs.")] = Path("."),
    patients: Annotated[int, typer.Option(help="Training patients to simulate.")] = 200,
    new_patients: Annotated[int, typer.Option(help="Held-out patients to score.")] = 12,
    cells_per_sample: Annotated[int, typer.Option(help="Mean events per FCS file.")] = 4000,
    permutations: Annotated[int | None, typer.Option(help="Label permutations of the AUROC test.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """The whole path on a simulated IL-7 cohort: simulate, gate, features, train, score, report."""
    from predictor.demo import run_demo
    from predictor.model.tracking import ui_command

    t0 = time.perf_counter()
    res = run_demo(workdir, n_patients=patients, n_new=new_patients, cells_per_sample=cells_per_sample,
                   seed=seed, permutations=permutations, progress=True)
    _print_training(res.experiment)
    _say(f"  cohort:      {res.cohort}")
    _say(f"  scores:      {res.scores}")
    _say(f"  report:      {res.report}")
    _say(f"  MLflow UI:   {ui_command(res.workdir / 'mlflow.db')}  (then open http://127.0.0.1:5000)")
    _say(f"Demo finished in {time.perf_counter() - t0:.0f} s.")


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the app and turns user errors into one line and exit code 2."""
    try:
        app(args=argv, standalone_mode=False)
    except PredictorError as exc:
        typer.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("interrupted", err=True)
        return 130
    except typer.Exit as exc:
        return int(getattr(exc, "exit_code", 0) or 0)
    except Exception as exc:
        # Usage errors of click (or the click vendored by typer): one line, exit 2.
        if not (hasattr(exc, "format_message") and hasattr(exc, "exit_code")):
            raise
        if type(exc).__name__ == "NoArgsIsHelpError":
            typer.echo(exc.format_message())
            return 0
        ctx = getattr(exc, "ctx", None)
        command = f"predictor {ctx.info_name} --help" if ctx is not None and ctx.parent else "predictor --help"
        typer.echo(f"error: {exc.format_message()} (see `{command}`)", err=True)
        return 2
    return 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
