"""`heygen-ray` command line: thin wrappers over the library (each command = one library call)."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, NoReturn, Optional, Type

import typer
from rich.console import Console
from rich.table import Table

from heygen_ray import fsutil
from heygen_ray.config import (
    SMOKE_OVERRIDES,
    SPEC_KINDS,
    ConfigError,
    DataSpec,
    PipelineSpec,
    Spec,
    SweepSpec,
    TrainSpec,
    load_spec,
    spec_kind_for,
)
from heygen_ray.uris import is_model_uri

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train, sweep, compress and serve video/text models on Ray.")
config_app = typer.Typer(no_args_is_help=True, help="Inspect and validate configs.")
data_app = typer.Typer(no_args_is_help=True, help="The embedded data set and the Ray Data pipelines.")
pipeline_app = typer.Typer(no_args_is_help=True, help="The end-to-end pipeline.")
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")
app.add_typer(pipeline_app, name="pipeline")
models_app = typer.Typer(no_args_is_help=True, help="The model zoo.")
app.add_typer(models_app, name="models")

console = Console()
err_console = Console(stderr=True)

OVERRIDES = typer.Argument(None, help="dotted overrides, e.g. video.clip_frames=8", show_default=False)


def _config_failure(err: ConfigError) -> NoReturn:
    """Print a config error (the field's dotted path is in the message) and exit with status 2."""
    err_console.print(f"[bold red]config error[/]: {err}", markup=True, highlight=False)
    raise typer.Exit(2)


def _load(cls: Type[Spec], config: Optional[Path], overrides: Optional[List[str]], smoke_key: Optional[str] = None,
          *, storage: bool = True) -> Any:
    """The validated spec; with ``storage``, its storage root (the spec's ``storage``, else
    $HEYGEN_RAY_STORAGE) is checked and set for this process, so a bad one fails before Ray starts."""
    from heygen_ray.runtime import use_storage

    ovr = list(SMOKE_OVERRIDES.get(smoke_key, [])) if smoke_key else []
    ovr += list(overrides or [])
    try:
        spec = load_spec(cls, config, ovr)
        if storage:
            use_storage(getattr(spec, "storage", None))
        return spec
    except ConfigError as err:
        _config_failure(err)


def _write_results(path: Optional[Path], payload: Dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2, default=str))
        console.print(f"results written to {path}")


@config_app.command("show")
def config_show(
    config: Path = typer.Option(..., "--config", "-c", help="YAML file under configs/<kind>/"),
    overrides: Optional[List[str]] = OVERRIDES,
    kind: Optional[str] = typer.Option(None, help=f"spec kind: {', '.join(SPEC_KINDS)} (default: from the folder)"),
) -> None:
    """Validate a config (+ overrides) and print the resolved spec as YAML."""
    try:
        cls = SPEC_KINDS[kind] if kind else spec_kind_for(config)
    except (ConfigError, KeyError) as err:
        err_console.print(f"config error: {err}", highlight=False)
        raise typer.Exit(2)
    spec = _load(cls, config, overrides, storage=False)
    sys.stdout.write(spec.to_yaml())


def _progress_printer():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console)
    tasks: Dict[str, int] = {}

    def update(name: str, done: int, total: int) -> None:
        if name not in tasks:
            tasks[name] = progress.add_task(name, total=total)
        progress.update(tasks[name], completed=done, total=total)

    return progress, update


def print_data_summary(summary: Dict[str, Any]) -> None:
    if summary.get("synth"):
        s = summary["synth"]
        console.print(
            f"generated {s['num_clips']} clips ({s['total_bytes'] / 1e6:.1f} MB) and {s['num_documents']} documents "
            f"in {s['seconds']:.1f} s ({s['clips_per_second']} clips/s) -> {s['output_dir']}"
        )
    v = summary["video"]
    t = Table(title=f"video pipeline: {v['manifest']} ({v['num_classes']} classes; every split decoded in "
                    f"{v['seconds']} s, {v['clips_per_second']} clips/s)")
    for col in ("split", "clips", "clip shape (T,H,W,C)", "dropped"):
        t.add_column(col)
    for split, row in v["splits"].items():
        t.add_row(split, str(row["clips"]), str(tuple(row["shape"] or ())), str(row["dropped"]))
    console.print(t)
    if v.get("dropped"):
        console.print(f"dropped {v['dropped']} files ({v['dropped_reasons']}): {v['dropped_examples']}")
    x = summary["text"]
    t = Table(title=f"text pipeline: tokenizer {x['tokenizer_dir']} "
                    f"(vocab {x['vocab_size']}{', trained now' if x['tokenizer_trained_now'] else ''})")
    for col in ("sequences", "seq_len", "tokens", "seconds", "tokens/s"):
        t.add_column(col)
    t.add_row(str(x["sequences"]), str(x["seq_len"]), str(x["tokens"]), str(x["seconds"]), str(x["tokens_per_second"]))
    console.print(t)


@data_app.command("synth")
def data_synth(
    config: Path = typer.Option(Path("configs/data/quickstart.yaml"), "--config", "-c"),
    overrides: Optional[List[str]] = OVERRIDES,
    local: bool = typer.Option(False, help="render in this process instead of Ray tasks"),
    results: Optional[Path] = typer.Option(None, help="write a JSON summary here"),
) -> None:
    """Generate the embedded data set (captioned clips of moving shapes as H.264 mp4 + manifest + corpus)."""
    from heygen_ray.data.synthetic import generate_dataset
    from heygen_ray.runtime import init_ray

    spec: DataSpec = _load(DataSpec, config, overrides)
    if spec.synth is None:
        err_console.print("config error: the config has no synth section")
        raise typer.Exit(2)
    if not local:
        init_ray()
    progress, update = _progress_printer()
    with progress:
        res = generate_dataset(spec.synth, use_ray=not local, on_progress=lambda d, n: update("synth", d, n))
    console.print(json.dumps(res.to_dict(), indent=1))
    _write_results(results, res.to_dict())


@data_app.command("run")
def data_run(
    config: Path = typer.Option(Path("configs/data/quickstart.yaml"), "--config", "-c"),
    overrides: Optional[List[str]] = OVERRIDES,
    regenerate: bool = typer.Option(False, help="regenerate the embedded set even if it exists"),
    smoke_test: bool = typer.Option(False, "--smoke-test", help="tiny sizes"),
    results: Optional[Path] = typer.Option(None, help="write a JSON summary here"),
) -> None:
    """Generate the embedded set if absent, then run the video and text pipelines and print a summary."""
    from heygen_ray.data.stage import run_data_stage
    from heygen_ray.runtime import init_ray

    spec: DataSpec = _load(DataSpec, config, overrides, "data" if smoke_test else None)
    init_ray()
    progress, update = _progress_printer()
    with progress:
        summary = run_data_stage(spec, regenerate=regenerate, on_progress=update)
    print_data_summary(summary)
    _write_results(results, summary)


@pipeline_app.command("run")
def pipeline_run(
    config: Path = typer.Option(Path("configs/pipeline/quickstart.yaml"), "--config", "-c"),
    overrides: Optional[List[str]] = OVERRIDES,
    smoke_test: bool = typer.Option(False, "--smoke-test", help="tiny sizes for every stage"),
    force: Optional[List[str]] = typer.Option(None, "--force", help="rerun this stage (data, train, train.<entry>, "
                                              "tune, compress, serve) and what depends on it; repeatable"),
    results: Optional[Path] = typer.Option(None, help="write a JSON summary here (default: <output_dir>/results.json)"),
) -> None:
    """Run the pipeline: data -> train -> tune -> compress -> serve. Finished stages whose inputs,
    config and code are unchanged are skipped (see <output_dir>/ledger.json)."""
    from heygen_ray.pipeline import plan_pipeline, run_pipeline
    from heygen_ray.runtime import init_ray

    spec: PipelineSpec = _load(PipelineSpec, config, overrides, "pipeline" if smoke_test else None)
    try:
        plan_pipeline(spec)  # every stage's config is checked before Ray starts
    except ConfigError as err:
        _config_failure(err)
    init_ray(spec.ray)
    progress, update = _progress_printer()
    t_start = time.perf_counter()

    def event(unit: str, what: str, info: Dict[str, Any]) -> None:
        elapsed = f"[{time.perf_counter() - t_start:6.1f} s]"
        if what == "finished":
            line = f"{elapsed} [green]done[/]     {unit} in {info['seconds']:.1f} s" + (
                f"  ({info['metric']})" if info.get("metric") else "")
        elif what == "skipped":
            line = f"{elapsed} [cyan]skipped[/]  {unit} (unchanged since {info.get('finished_at', '?')})"
        elif what == "failed":
            line = f"{elapsed} [red]failed[/]   {unit}: {info.get('error', '')[:300]}"
            if info.get("ray_logs"):
                line += f"\n           the Ray workers' logs: {info['ray_logs']}"
        elif what == "note":
            line = f"{elapsed} [yellow]note[/]     {unit}: {info.get('message', '')}"
        else:
            line = f"{elapsed} [bold]{what}[/]  {unit}"
        progress.console.print(line, soft_wrap=True, highlight=False)

    try:
        with progress:
            summary = run_pipeline(spec, force=force or (), on_progress=update, on_event=event)
    except ConfigError as err:
        _config_failure(err)
    t = Table(title=f"pipeline {summary['name']} ({summary['seconds']:.0f} s)")
    for col in ("stage", "status", "key metric", "seconds"):
        t.add_column(col)
    for row in summary["summary"]:
        t.add_row(row["stage"], row["status"], str(row.get("metric") or ""), f"{row['seconds']:.1f}")
    console.print(t)
    print_where_to_look(summary)
    _write_results(results or Path(fsutil.absolute(spec.output_dir)) / "results.json", summary)


def print_where_to_look(summary: Dict[str, Any]) -> None:
    uri = summary.get("tracking_uri") or ""
    lines = [f"ledger:    {summary['ledger']}"]
    if uri.startswith("sqlite:"):
        lines.append(f"MLflow UI: .venv/bin/mlflow ui --backend-store-uri {uri} --port 5000  ->  http://127.0.0.1:5000")
    elif uri:
        lines.append(f"MLflow UI: {uri}  (the tracking server the runs went to, serving now)")
    serve = summary["stages"].get("serve") or {}
    if serve.get("url"):
        lines.append(f"Serve:     {serve['url']}  (GET /v1/models; stop: make stop)" if serve.get("running")
                     else f"Serve:     was {serve['url']} (shut down after the smoke requests)")
    if summary.get("dashboard_url"):
        lines.append(f"Ray:       {summary['dashboard_url']}  (the dashboard: jobs, actors, Serve, logs)")
    if summary.get("ray_logs"):
        lines.append(f"Ray logs:  {summary['ray_logs']}")
    for line in lines:
        console.print(line, highlight=False, soft_wrap=True)


@app.command("train")
def train(
    config: Path = typer.Option(Path("configs/train/video_classification.yaml"), "--config", "-c"),
    overrides: Optional[List[str]] = OVERRIDES,
    smoke_test: bool = typer.Option(False, "--smoke-test", help="tiny sizes (a minute or two on 2 CPUs)"),
) -> None:
    """Train a model on Ray Train (DDP); resumes when a run with the same name exists. Writes results.json."""
    from heygen_ray.runtime import init_ray
    from heygen_ray.train.driver import run_training

    spec: TrainSpec = _load(TrainSpec, config, overrides, "train" if smoke_test else None)
    init_ray()
    try:
        results = run_training(spec)
    except ConfigError as err:
        _config_failure(err)
    m = results.metrics
    t = Table(title=f"train {results.name} ({results.task}, {results.model})")
    for col in ("step", "metric", "value"):
        t.add_column(col)
    for k in sorted(k for k in m if k.startswith("val_")):
        t.add_row(str(m.get("step")), k, f"{m[k]:.4f}")
    console.print(t)
    if results.model_uri:
        console.print(f"model: {results.model_uri} (registered {results.registered_model_name} v{results.model_version})")
    console.print(f"checkpoint: {results.checkpoint_uri}")
    if results.extra.get("tracking_not_logged"):
        console.print(f"[yellow]not logged to MLflow[/] (the tracking server was unreachable): {results.extra['tracking_not_logged']}")
    console.print(f"results: {results.results_path}")


@app.command("evaluate")
def evaluate_cmd(
    model: str = typer.Option(..., "--model", "-m", help="models:/NAME@ALIAS, models:/NAME/VERSION or a logged model directory"),
    data: Path = typer.Option(..., "--data", "-d", help="a data YAML (configs/data/): a manifest of your videos, or "
                              "the embedded set (synth; generated when absent)"),
    overrides: Optional[List[str]] = OVERRIDES,
    split: str = typer.Option("test", help="manifest split to score (train/val/test); ignored when the manifest has none"),
    tracking_uri: Optional[str] = typer.Option(None, help="the MLflow store of the registry (default: $MLFLOW_TRACKING_URI)"),
    judge: Optional[str] = typer.Option(None, help="text_to_video: a registered video classifier that judges the clips"),
    precision: Optional[str] = typer.Option(None, help="fp32 or bf16 (autocast); default: the precision the model "
                                            "was trained and validated with (recorded in its model.json)"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="write the metrics as JSON here"),
) -> None:
    """Score a registered model (any task) on a split of any manifest with the task's own metrics."""
    import os

    from heygen_ray.evaluate import evaluate_model
    from heygen_ray.runtime import init_ray

    spec: DataSpec = _load(DataSpec, data, overrides)
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if is_model_uri(model) and not uri:
        _config_failure(ConfigError("--tracking-uri: a models:/ URI needs the registry's store (or set MLFLOW_TRACKING_URI)"))
    init_ray()
    try:
        result = evaluate_model(model, spec, split=split, tracking_uri=uri, judge_uri=judge, precision=precision)
    except ConfigError as err:
        _config_failure(err)
    t = Table(title=f"evaluate {model} ({result['task']}) on {result['manifest'] or result['corpus']} [{split}]")
    t.add_column("metric")
    t.add_column("value")
    for k, v in sorted(result["metrics"].items()):
        t.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    console.print(t)
    if result.get("dropped"):
        console.print(f"dropped {result['dropped']} unreadable files: {result['dropped_examples']}")
    _write_results(output, result)


@app.command("tune")
def tune(
    config: Path = typer.Option(Path("configs/sweep/lr_schedule.yaml"), "--config", "-c"),
    overrides: Optional[List[str]] = OVERRIDES,
    smoke_test: bool = typer.Option(False, "--smoke-test", help="4 short trials on the smoke data (a few minutes on 2 "
                                    "CPUs); a compression sweep: 2 trials at the compression smoke sizes"),
) -> None:
    """Sweep a training config (ASHA / Optuna; registers the best model) or a compression config
    (stage: compress; Optuna over quality and latency) with Ray Tune; writes the best trial's config
    as a ready-to-run YAML plus results.json."""
    from heygen_ray.runtime import init_ray
    from heygen_ray.tune.sweep import plan_sweep, run_sweep

    spec: SweepSpec = _load(SweepSpec, config, overrides)
    if smoke_test:  # the smoke sizes depend on the stage the sweep runs
        spec = _load(SweepSpec, config, overrides, "sweep" if spec.stage == "train" else f"sweep_{spec.stage}")
    try:
        plan = plan_sweep(spec)  # the whole search space is checked before Ray starts
        init_ray(spec.ray)
        results = run_sweep(spec, plan=plan)
    except ConfigError as err:
        _config_failure(err)
    t = Table(title=f"sweep {results.name}: {results.metric} ({results.mode})")
    metrics = [m for m, _ in plan.objectives]
    for col in ("trial", "status", "step", *metrics, *[p for p in plan.space.paths]):
        t.add_column(col, no_wrap=True)
    for r in sorted(results.rows, key=lambda r: r.trial_id):
        t.add_row(r.trial_id, r.status, str(r.step),
                  *["" if r.metrics.get(m) is None else f"{r.metrics[m]:.4g}" for m in metrics],
                  *[f"{r.params.get(p):.4g}" if isinstance(r.params.get(p), float) else str(r.params.get(p))
                    for p in plan.space.paths])
    Console(width=max(console.width, 60 + 16 * len(plan.space.paths))).print(t)  # logs are not terminals
    best = results.best
    console.print(f"{results.trials} trials: {results.trials_completed} completed, {results.trials_stopped_early} "
                  f"stopped early, {results.trials_error} failed; {results.seconds} s")
    console.print(f"best: trial {best.trial_id} {results.metric}={best.metric:.4g} (MLflow run {best.mlflow_run_id})")
    if results.pareto_front:
        console.print(f"pareto front ({', '.join(metrics)}): {', '.join(results.pareto_front)}")
    if results.model_version:
        console.print(f"model: {results.model_uri} (registered {results.registered_model_name} v{results.model_version})")
    console.print(f"best config: {results.best_config_path}")


@app.command("compress")
def compress(
    config: Path = typer.Option(Path("configs/compress/video_classifier.yaml"), "--config", "-c"),
    overrides: Optional[List[str]] = OVERRIDES,
    smoke_test: bool = typer.Option(False, "--smoke-test", help="tiny sizes (a few minutes on 2 CPUs)"),
) -> None:
    """Prune -> distill (Ray Train) -> quantize a trained model; measure, report and register every variant."""
    from heygen_ray.compress.stage import run_compression
    from heygen_ray.config import CompressSpec
    from heygen_ray.runtime import init_ray

    spec: CompressSpec = _load(CompressSpec, config, overrides, "compress" if smoke_test else None)
    init_ray()
    try:
        results = run_compression(spec)
    except ConfigError as err:
        _config_failure(err)
    t = Table(title=f"compress {results.name} ({results.model}, {results.metric})")
    for col in ("variant", results.metric, "delta", "params", "MB", "p50 ms bs1", "p50 ms bs8", "x fp32", "x bf16", "gate"):
        t.add_column(col)
    for r in results.variants:
        t.add_row(r["variant"], f"{r['quality']:.4f}", f"{r['quality_delta']:+.4f}", str(r["params"]),
                  f"{r['size_bytes'] / 1e6:.2f}", f"{r['p50_ms_bs1']:.2f}", f"{r['p50_ms_bs8']:.2f}",
                  f"{r['speedup_bs1_vs_fp32']:.2f}", f"{r['speedup_bs1_vs_bf16']:.2f}", "pass" if r["passes_gate"] else "FAIL")
    console.print(t)
    console.print(f"alias {results.alias!r} -> {results.alias_variant}")
    console.print(f"results: {results.results_path}")


@app.command("serve")
def serve_app(
    config: Path = typer.Option(Path("configs/serve/quickstart.yaml"), "--config", "-c"),
    overrides: Optional[List[str]] = OVERRIDES,
    smoke_test: bool = typer.Option(False, "--smoke-test", help="deploy, send one request per endpoint, shut down (exit 0/1)"),
    results: Optional[Path] = typer.Option(None, help="write the deployment (and smoke report) as JSON here"),
) -> None:
    """Deploy the Serve app (models from the MLflow registry) and keep serving until Ctrl-C."""
    import time as _time

    from heygen_ray.config import ServeSpec
    from heygen_ray.runtime import init_ray
    from heygen_ray.serve import deploy, shutdown, smoke

    spec: ServeSpec = _load(ServeSpec, config, overrides)
    init_ray(spec.ray)
    try:
        out = deploy(spec)
    except ConfigError as err:
        _config_failure(err)
    t = Table(title=f"serve {spec.name} at {out['url']}")
    for col in ("endpoint", "path", "model", "variants"):
        t.add_column(col)
    for name, e in out["endpoints"].items():
        t.add_row(name, e["path"], str(e["model"]), ", ".join(e["variants"]))
    console.print(t)
    if not smoke_test:
        _write_results(results, out)
        console.print("serving; Ctrl-C stops")
        try:
            while True:
                _time.sleep(3600)
        except KeyboardInterrupt:
            shutdown()
        return
    code = 0
    try:
        report = smoke(out["url"], spec)
        out["smoke"] = report
        for name, r in report.items():
            console.print(f"{name}: {r['status']} in {r['latency_ms']:.1f} ms ({r['model']} v{r['version']}, {r['variant']})")
    except RuntimeError as err:
        err_console.print(str(err), highlight=False)
        out["smoke_error"] = str(err)
        code = 1
    finally:
        shutdown()
    _write_results(results, out)
    raise typer.Exit(code)


@models_app.command("list")
def models_list(
    details: bool = typer.Option(False, help="build each preset and show parameters and forward GFLOPs/sample"),
    match: Optional[str] = typer.Option(None, help="only names containing this"),
) -> None:
    """The registered model presets (names usable in YAML)."""
    from heygen_ray.models import create_model, list_models

    names = [n for n in list_models() if not match or match in n]
    t = Table(title="models")
    t.add_column("name", no_wrap=True)
    if details:
        for col in ("class", "inputs", "params (M)", "GFLOPs/sample"):
            t.add_column(col, no_wrap=col != "inputs")
    for name in names:
        if details:
            import torch

            with torch.device("meta"):
                m = create_model(name)
            params = sum(p.numel() for p in m.parameters()) / 1e6
            t.add_row(name, type(m).__name__, ", ".join(m.input_names), f"{params:.2f}", f"{m.flops_per_sample() / 1e9:.3f}")
        else:
            t.add_row(name)
    console.print(t)


def main() -> None:  # pragma: no cover - console entry point
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
