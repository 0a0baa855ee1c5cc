"""edgekd vs Microsoft Olive: one trained student to its best CPU INT8 model; latency, accuracy, wall time.

One edgekd run (the default radio recipe unless ``--run-dir`` names a finished run to reuse) gives the
trained student and its exported FP32 ONNX. From that one file, in one run on this machine:

1. edgekd: the quantize and compile stages of ``compress`` rerun (forced) for target ``cpu`` (ONNX Runtime
   static QDQ INT8, the recipe's calibration frames) in a copy of the run directory; teacher,
   distillation and export are reused as they are. Wall time: the two stages' own recorded times, with
   the dataset already in memory (as Olive gets its frames from ``.npy`` files already written).
2. Olive (olive-ai, installed on first use into ``benchmarks/.envs/olive`` with one ``pip install
   --target --no-deps`` call, never a project dependency, run in a subprocess on this same interpreter
   with the same onnxruntime / onnx / numpy): a workflow whose input is that ONNX file, with the pass
   ``OnnxStaticQuantization`` calibrated on the very same frames (edgekd's calibration subset, saved as
   ``.npy`` and read by benchmarks/olive_user_script.py), then ``OrtSessionParamsTuning``; Olive's
   search (TPE, joint, exhaustive unless ``--olive-max-iter``) over its own quantisation options
   (int8/uint8, QDQ/QOperator, per-channel, reduce-range, pre-processing, MinMax/Entropy/Percentile)
   and session settings (sequential/parallel, 1 or all intra-op threads); its evaluator with its
   accuracy metric (torchmetrics, priority 1, on ``quantize.accuracy_samples`` train frames that are
   never calibration frames: no held-out frame is seen by either side before the final comparison)
   and its latency metric (priority 2); target: the local CPU, CPUExecutionProvider. Olive's INT8
   result is its best-ranked quantised candidate by those objectives (its pareto frontier may hold
   only the FP32 input). Wall time: ``olive.workflows.run`` alone (interpreter start and
   ``import olive`` excluded).

3. ``edgekd deploy`` on that same FP32 ONNX file, as a user who only has the ONNX runs it: the
   command line in a subprocess (``edgekd deploy FILE --target cpu --data ...`` with the source run's
   recipe), every stage from the model check to the report and bundle. Wall time: the whole command,
   interpreter start included; its INT8 artifact joins the side-by-side rows as ``edgekd deploy INT8``.

Then the INT8 models (edgekd's artifacts and the model Olive returns as best) are measured side by
side in this process with edgekd's protocol: an ONNX Runtime session with edgekd's settings (same
threads, sequential, all graph optimisations), batch 1, ``profile.warmup`` untimed and
``profile.iterations`` timed calls, p50; accuracy of each on the same held-out split (capped by
``profile.eval_samples``) and agreement with the FP32 ONNX. Olive's model is also timed with the
session settings Olive tuned for it, and the FP32 ONNX with edgekd's, for reference.

Prints a table and writes benchmarks/results/vs_olive.json.
    python benchmarks/vs_olive.py [--run-dir models/runs/NAME] [--epochs N] [--threads N]
        [--olive-max-iter N] [--set FIELD=VALUE ...] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from side_env import SideEnvironment  # benchmarks/ is on sys.path: the scripts run from there

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "vs_olive.json"
USER_SCRIPT = HERE / "olive_user_script.py"
OLIVE_VERSION = "0.13.0"
OLIVE_ENV = HERE / ".envs" / "olive"
# Olive sends usage telemetry unless told not to
SIDE_ENV = SideEnvironment(OLIVE_ENV, {"OLIVE_DISABLE_TELEMETRY": "1"})
# What olive-ai 0.13.0 imports on the path this benchmark runs (``olive.workflows.run`` with ONNX
# quantisation, session tuning, custom + latency metrics, the TPE sampler), pinned to what its own
# resolution picks; installed into OLIVE_ENV (with olive-ai, in the same single pip call, --no-deps)
# only when the .venv lacks the module.
# Declared but left out because this path never imports them: pandas, questionary, hf-xet, and
# optuna's storage stack (sqlalchemy, alembic). torch, onnx, onnxruntime, onnxscript, onnx_ir,
# numpy, pydantic, pyyaml, psutil, huggingface_hub and safetensors are the .venv's own.
LIGHT_REQUIREMENTS = (
    ("opentelemetry-api==1.45.2", "opentelemetry._logs"),  # olive.telemetry, imported by olive itself
    ("opentelemetry-sdk==1.45.2", "opentelemetry.sdk"),
    ("opentelemetry-semantic-conventions==0.66b2", "opentelemetry.semconv"),
    ("requests", "requests"),  # olive.telemetry's exporter
    ("urllib3", "urllib3"),
    ("charset-normalizer", "charset_normalizer"),
    ("certifi", "certifi"),
    ("transformers==5.24.0", "transformers"),  # olive.model.config.hf_config
    ("regex", "regex"),  # transformers
    ("tokenizers==0.23.3", "tokenizers"),  # transformers' tokenizer annotations fail without it
    ("torchmetrics==1.9.0", "torchmetrics"),  # olive.evaluator.metric_backend
    ("lightning-utilities==0.15.3", "lightning_utilities"),  # torchmetrics
    ("optuna==5.0.0", "optuna"),  # olive.search.samplers (TPE)
    ("colorlog", "colorlog"),  # optuna.logging
)
FORBIDDEN = ("torch", "numpy", "onnx", "onnxruntime", "onnxscript", "onnx_ir", "pydantic")


# --------------------------------------------------------------------------- Olive environment


def ensure_olive() -> dict[str, Any]:
    """olive-ai and the light modules it imports that the .venv lacks, installed in ONE pip call on first use.

    One call: opentelemetry-api and opentelemetry-sdk share the ``opentelemetry`` namespace folder,
    which pip only merges within a single ``--target`` install (see side_env).
    """
    missing = set(SIDE_ENV.missing_from_base([module for _, module in LIGHT_REQUIREMENTS]))
    requirements = [f"olive-ai=={OLIVE_VERSION}"]
    requirements += [requirement for requirement, module in LIGHT_REQUIREMENTS if module in missing]
    record = SIDE_ENV.ensure(requirements, forbidden=FORBIDDEN)
    probe = subprocess.run(
        [sys.executable, "-c", "import olive, olive.workflows; print(olive.__version__)"],
        capture_output=True,
        text=True,
        env=SIDE_ENV.env(),
    )
    if probe.returncode != 0:
        raise RuntimeError(
            f"olive does not import from {OLIVE_ENV} (delete it to rebuild):\n{probe.stderr[-2000:]}"
        )
    return record


# --------------------------------------------------------------------------- Olive worker


def olive_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The Olive workflow: static INT8 + session tuning, searched jointly, judged by accuracy then latency."""
    work = Path(cfg["work_dir"])
    script = str(USER_SCRIPT)

    def data(name: str, x: str, y: str | None, batch: int) -> dict[str, Any]:
        params = {"x_file": str(work / x), "input_name": cfg["input_name"]}
        params |= {"y_file": str(work / y)} if y else {}
        return {
            "name": name,
            "type": "DataContainer",
            "user_script": script,
            "load_dataset_config": {"type": "edgekd_npy_frames", "params": params},
            "pre_process_data_config": {"type": "skip_pre_process"},
            "post_process_data_config": {"type": "edgekd_argmax"},
            # every component typed: an untyped one serialises as {"type": None, ...}, which Olive
            # 0.13.0's resource scan (find_all_resources) crashes on
            "dataloader_config": {"type": "default_dataloader", "params": {"batch_size": batch}},
        }

    threads = cfg["threads"]
    return {
        "input_model": {"type": "ONNXModel", "model_path": cfg["onnx_file"]},
        "systems": {
            "local_system": {
                "type": "LocalSystem",
                "accelerators": [{"device": "cpu", "execution_providers": ["CPUExecutionProvider"]}],
            }
        },
        "data_configs": [
            # calibration: edgekd's own calibration frames, in edgekd's calibration batch size
            data("calibration", "calibration_x.npy", None, cfg["calibration_batch"]),
            # selection: train frames that are never calibration frames (as edgekd's accuracy budget uses)
            data("selection", "selection_x.npy", "selection_y.npy", 1),
            data("selection_batches", "selection_x.npy", "selection_y.npy", 256),
        ],
        "evaluators": {
            "selection_evaluator": {
                # typed for the same reason as the data components (Olive's ONNX evaluator either way)
                "type": "OnnxEvaluator",
                "metrics": [
                    {
                        "name": "accuracy",
                        "type": "accuracy",  # torchmetrics Accuracy on the argmax of the logits
                        "data_config": "selection_batches",
                        "sub_types": [
                            {
                                "name": "accuracy_score",
                                "priority": 1,
                                "metric_config": {"task": "multiclass", "num_classes": cfg["num_classes"]},
                            }
                        ],
                    },
                    {
                        "name": "latency",
                        "type": "latency",
                        "data_config": "selection",  # its first frame, batch 1
                        "sub_types": [
                            {
                                "name": "avg",
                                "priority": 2,
                                "metric_config": {
                                    "warmup_num": cfg["warmup"],
                                    "repeat_test_num": cfg["iterations"],
                                },
                            }
                        ],
                    },
                ],
            }
        },
        "passes": {
            # every quantisation option left to Olive's search space: precision (int8/uint8), QDQ or
            # QOperator, per-channel, reduce-range, quant pre-processing, MinMax/Entropy/Percentile
            "quantization": {"type": "OnnxStaticQuantization", "data_config": "calibration"},
            "session_params_tuning": {
                "type": "OrtSessionParamsTuning",
                "data_config": "selection",
                "cpu_cores": threads,
                "execution_mode_list": [0, 1],  # ORT_SEQUENTIAL, ORT_PARALLEL
                "intra_thread_num_list": sorted({1, threads}),
            },
        },
        # Olive 0.13.0 drops ``sampler_config`` (max_samples, seed) when it serialises the run config,
        # so its TPE sampler always runs with seed 1 and no sample cap; ``max_iter`` (iterations,
        # invalid points included) survives and caps the search when given. Without it: exhaustive.
        "search_strategy": {"execution_order": "joint", "sampler": "tpe"}
        | ({"max_iter": cfg["max_iter"]} if cfg["max_iter"] else {}),
        "host": "local_system",
        "target": "local_system",
        "evaluator": "selection_evaluator",
        "evaluate_input_model": True,
        "cache_dir": str(work / "olive-cache"),
        "output_dir": str(work / "olive-output"),
        "log_severity_level": 2,  # warnings: failed search points are logged as such
    }


def _node_record(node: Any) -> dict[str, Any]:
    metrics = node.metrics.value.to_json() if node.metrics else None
    return {
        "model_id": node.model_id,
        "parent_model_id": node.parent_model_id,
        "from_pass": node.from_pass,
        "pass_run_config": node.pass_run_config,
        "metrics": {name: value["value"] for name, value in metrics.items()} if metrics else None,
        "pareto_frontier": bool(node.is_pareto_frontier),
    }


def olive_worker(config_file: Path) -> None:
    """Run the Olive workflow; write the chosen INT8 model, its settings and the search record."""
    import olive
    from olive.engine.output import ModelOutput
    from olive.workflows import run as olive_run

    cfg = json.loads(config_file.read_text(encoding="utf-8"))
    work = Path(cfg["work_dir"])
    config = olive_config(cfg)
    (work / "olive_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    start = time.perf_counter()
    output = olive_run(config)
    wall_s = time.perf_counter() - start

    footprint = output.footprint
    # Olive's output models are its pareto frontier, which may hold only the FP32 input model; its INT8
    # result is the best-ranked quantised candidate, ranked by Olive's own objective order.
    candidates = [
        ModelOutput(output.from_device(), output.from_execution_provider(), node)
        for model_id, node in footprint.nodes.items()
        if model_id != footprint.input_model_id and node.metrics is not None and node.metrics.value
    ]
    ranked = output._sort_by_metrics(candidates, footprint.objective_dict)  # noqa: SLF001
    if not ranked:
        raise RuntimeError("Olive evaluated no quantised model (every search point failed or was pruned)")
    chosen = ranked[0]
    best_overall = output.get_best_candidate()
    model_file = work / "olive_int8.onnx"
    shutil.copyfile(chosen.model_path, model_file)
    nodes = [_node_record(node) for node in footprint.nodes.values()]
    result = {
        "wall_s": round(wall_s, 3),
        "olive": olive.__version__,
        "olive_file": olive.__file__,
        "chosen": {
            "model_id": chosen.model_id,
            "model_file": str(model_file),
            "source_path": chosen.model_path,
            "inference_settings": chosen.get_inference_config(),
            "metrics": chosen.metrics_value,
            "history": footprint.trace_back_run_history(chosen.model_id),
        },
        "chosen_on_pareto_frontier": bool(footprint.nodes[chosen.model_id].is_pareto_frontier),
        "best_overall_is_input_fp32": best_overall is not None
        and best_overall.model_id == footprint.input_model_id,
        "pareto_frontier": [m.model_id for m in output.get_output_models()],
        "input_model_metrics": output.get_input_model_metrics(),
        "objectives": footprint.objective_dict,
        "quantized_candidates": sum("quantization" in str(n["from_pass"]).lower() for n in nodes),
        "evaluated_candidates": sum(n["metrics"] is not None for n in nodes) - 1,
        "candidates": nodes,
    }
    (work / "olive_result.json").write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")


# --------------------------------------------------------------------------- edgekd side


def source_run(args: argparse.Namespace) -> Path:
    """The finished edgekd run whose student both sides start from (trained here unless --run-dir)."""
    from edgekd.api import compress
    from edgekd.recipe import load_recipe

    if args.run_dir is not None:
        return args.run_dir.resolve()
    overrides = ["target=cpu", "name=vs-olive", *args.set]
    if args.epochs is not None:
        overrides += [f"distill.train.epochs={args.epochs}", f"teacher.train.epochs={args.epochs}"]
    recipe = load_recipe(None, overrides)
    compress(recipe, log=lambda line: print(f"  {line}"))
    return recipe.run_dir.resolve()


def edgekd_int8(run_dir: Path, root: Path, overrides: list[str]) -> tuple[Any, dict[str, Any]]:
    """Rerun quantize + compile (target cpu) in a copy of ``run_dir``; the context and the two stage times.

    Teacher, distillation and export are reused (their fingerprints do not involve the target or the
    run directory's location). The dataset is built before the stages run, so their wall times hold
    quantisation and compilation only.
    """
    from edgekd.pipeline import RunContext, run_stages
    from edgekd.recipe import apply_overrides, build_recipe
    from edgekd.stages import PIPELINE, STAGE_NAMES

    report = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
    data = apply_overrides(report["recipe"], ["target=cpu", *overrides])
    copy = root / "edgekd-run"
    shutil.copytree(
        run_dir, copy, ignore=shutil.ignore_patterns("bundle", "*-profile", "*-remote", "*-report")
    )
    data["runs_dir"], data["name"] = str(root), copy.name
    recipe = build_recipe(data, str(run_dir / "report.json"))
    ctx = RunContext(recipe=recipe, run_dir=copy, log=lambda line: print(f"  {line}"))
    ctx.dataset  # noqa: B018  (built now, outside the timed stages)
    stages = PIPELINE[: STAGE_NAMES.index("compile") + 1]
    results = run_stages(ctx, stages, force={"quantize", "compile"})
    for name in ("teacher", "distill", "export"):
        if not results[name].cached:
            raise RuntimeError(
                f"stage {name} was not reused from {run_dir}; the comparison needs its student"
            )
    return ctx, {name: round(results[name].wall_s, 3) for name in ("quantize", "compile")}


def edgekd_deploy(ctx: Any, onnx_file: Path, root: Path) -> dict[str, Any]:
    """``edgekd deploy ONNX --target cpu`` in a subprocess, with the source run's recipe; its wall time.

    The recipe (quantize, profile, bundle settings, data) is the source run's, written as YAML; the
    run goes to ``root/deploy``. Returns the command, the wall time, the stages' own recorded times and
    the INT8 artifact's path.
    """
    import yaml

    recipe_file = root / "deploy-recipe.yaml"
    recipe = ctx.recipe.model_dump(mode="json")
    recipe_file.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    command = [
        "edgekd", "deploy", str(onnx_file), "--target", "cpu", "--data", ctx.recipe.data.name,
        "--recipe", str(recipe_file), "--name", "deploy", "--set", f"runs_dir={root}",
        "--set", "student.checkpoint=null",
    ]  # fmt: skip
    if ctx.recipe.data.path is not None:
        command += ["--set", f"data.path={ctx.recipe.data.path}"]
    start = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, "-c", "from edgekd.cli import main; main()", *command[1:]],
        capture_output=True,
        text=True,
    )
    wall_s = round(time.perf_counter() - start, 3)
    if completed.returncode != 0:
        raise RuntimeError(f"edgekd deploy failed (exit {completed.returncode}): {completed.stderr[-2000:]}")
    report = json.loads((root / "deploy" / "report.json").read_text(encoding="utf-8"))
    int8 = next(a for a in report["artifacts"] if a["precision"] == "int8")
    return {
        "command": " ".join(command),
        "wall_s": wall_s,
        "stage_wall_s": {name: stage["wall_s"] for name, stage in report["stages"].items()},
        "int8_file": str(root / "deploy" / int8["path"]),
        "headline": report["headline"],
    }


# --------------------------------------------------------------------------- side-by-side measurement


def _session_runner(path: Path, settings: dict[str, Any], threads: int) -> Any:
    """An OrtRunner over an ONNX Runtime session built with Olive's tuned session options."""
    import onnxruntime as ort

    from edgekd.backends.onnxruntime import OrtRunner

    session_options = dict(settings.get("session_options") or {})
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if session_options.get("intra_op_num_threads"):
        options.intra_op_num_threads = session_options["intra_op_num_threads"]
    if session_options.get("inter_op_num_threads"):
        options.inter_op_num_threads = session_options["inter_op_num_threads"]
    if session_options.get("execution_mode") is not None:
        options.execution_mode = ort.ExecutionMode(session_options["execution_mode"])
    if session_options.get("graph_optimization_level") is not None:
        options.graph_optimization_level = ort.GraphOptimizationLevel(
            session_options["graph_optimization_level"]
        )
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    info = {
        "artifact": str(path),
        "threads": session_options.get("intra_op_num_threads") or threads,
        "session_options": session_options,
        "providers": session.get_providers(),
    }
    return OrtRunner(session, info)


def measure(ctx: Any, models: dict[str, tuple[Path, dict[str, Any] | None]], threads: int) -> dict[str, Any]:
    """Accuracy on the held-out split, agreement with FP32 ONNX, and latency of each model, same protocol.

    ``models`` maps a row name to (ONNX file, Olive inference settings or None for edgekd's session).
    Latency rows are measured in turn, twice (A B C ... A B C ...), and the lower p50 of the two
    rounds is kept, so that no model is favoured by when it happened to run.
    """
    from edgekd.backends import Artifact, get_backend
    from edgekd.profile.accuracy import evaluate_classifier, predict
    from edgekd.profile.latency import measure_latency
    from edgekd.stages.profile import EVAL_BATCH, _evaluation_set

    spec = ctx.recipe.profile
    backend = get_backend("onnxruntime")
    evaluation = _evaluation_set(ctx)
    runners = {}
    for name, (path, settings) in models.items():
        if settings is None:
            precision = "fp32" if "FP32" in name else "int8"
            runners[name] = backend.load(Artifact(path, "onnxruntime", precision), threads=threads)
        else:
            runners[name] = _session_runner(path, settings, threads)
    reference = predict(runners["FP32 ONNX (edgekd export)"], evaluation.x, EVAL_BATCH).argmax(1)
    rows: dict[str, Any] = {}
    for name, runner in runners.items():
        accuracy = evaluate_classifier(runner, evaluation.x, evaluation.y, EVAL_BATCH, reference=reference)
        rows[name] = {
            "model_file": runner.info["artifact"],
            "size_bytes": Path(runner.info["artifact"]).stat().st_size,
            "session": {k: v for k, v in runner.info.items() if k != "artifact"},
            "accuracy": accuracy["accuracy"],
            "agreement_with_fp32": accuracy["agreement"],
            "eval_frames": accuracy["n"],
            "latency_rounds": [],
        }
    sample = np.ascontiguousarray(evaluation.x[: spec.batch_size])
    for _ in range(2):
        for name, runner in runners.items():
            rows[name]["latency_rounds"].append(measure_latency(runner, sample, spec.warmup, spec.iterations))
    for row in rows.values():
        rounds = row.pop("latency_rounds")
        row["latency"] = min(rounds, key=lambda r: r["p50_ms"])
        row["latency_p50_ms_per_round"] = [round(r["p50_ms"], 4) for r in rounds]
    return rows


# --------------------------------------------------------------------------- benchmark


def write_frames(ctx: Any, work: Path) -> dict[str, Any]:
    """edgekd's calibration frames, and the selection frames Olive's evaluator sees, as .npy files.

    Selection frames: ``quantize.accuracy_samples`` train frames that are not calibration frames,
    drawn exactly as edgekd's accuracy-aware INT8 draws its own (``quantize.accuracy_budget``).
    """
    from edgekd.stages.quantize import _calibration_indices, calibration_set

    train_set, _, _ = ctx.dataset
    calib = calibration_set(ctx)
    remaining = np.setdiff1d(np.arange(len(train_set)), _calibration_indices(ctx))
    rng = np.random.default_rng([ctx.recipe.seed, 8])
    count = min(ctx.recipe.quantize.accuracy_samples, len(remaining))
    chosen = np.sort(rng.choice(remaining, size=count, replace=False))
    np.save(work / "calibration_x.npy", calib.data)
    np.save(work / "selection_x.npy", np.ascontiguousarray(train_set.x[chosen], dtype=np.float32))
    np.save(work / "selection_y.npy", train_set.y[chosen].astype(np.int64))
    return {
        "calibration": calib.provenance(),
        "selection_frames": int(count),
        "selection": "train frames, excluding the calibration frames (seeded as edgekd's accuracy budget)",
    }


def run_olive(work: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    config_file = work / "olive_worker.json"
    config_file.write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    start = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--olive-worker", str(config_file)],
        env=SIDE_ENV.env(),
        capture_output=True,
        text=True,
    )
    (work / "olive_worker.log").write_text(completed.stdout + completed.stderr, encoding="utf-8")
    if completed.returncode != 0:
        kept = RESULTS.with_name("vs_olive.worker.log")
        shutil.copyfile(work / "olive_worker.log", kept)
        raise RuntimeError(f"Olive worker failed (exit {completed.returncode}); its log: {kept}")
    result = json.loads((work / "olive_result.json").read_text(encoding="utf-8"))
    result["process_wall_s"] = round(time.perf_counter() - start, 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, help="a finished edgekd run (with report.json) to reuse")
    parser.add_argument("--epochs", type=int, help="teacher and student epochs when training a run here")
    parser.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="recipe override (repeatable)"
    )
    parser.add_argument(
        "--threads", type=int, help="intra-op threads (default: profile.threads or all cores)"
    )
    parser.add_argument(
        "--olive-max-iter", type=int, help="cap Olive's search at this many iterations (default: exhaustive)"
    )
    parser.add_argument("--keep", type=Path, help="copy the work folder (models, Olive config and logs) here")
    parser.add_argument("--out", type=Path, default=RESULTS, help="the JSON to write")
    parser.add_argument("--olive-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.olive_worker is not None:
        olive_worker(args.olive_worker)
        return

    import onnx
    import onnxruntime
    from rich.table import Table

    from edgekd import atomic
    from edgekd.backends.base import resolve_threads
    from edgekd.console import console
    from edgekd.quantize.calibration import DEFAULT_BATCH
    from edgekd.report.build import environment

    olive_env = ensure_olive()
    run_dir = source_run(args)
    console.print(f"student from {run_dir}")
    root = Path(tempfile.mkdtemp(prefix="edgekd-vs-olive-"))
    try:
        console.print("edgekd: quantize + compile (target cpu), forced")
        ctx, edgekd_stage_s = edgekd_int8(run_dir, root, args.set)
        threads = args.threads or resolve_threads(ctx.recipe.profile.threads)
        work = root / "work"
        work.mkdir()
        frames = write_frames(ctx, work)
        onnx_file = ctx.path("export", "onnx_file")
        spec = ctx.recipe.profile
        console.print(f"Olive {OLIVE_VERSION}: workflow on {onnx_file.name} (subprocess)")
        olive = run_olive(
            work,
            {
                "work_dir": str(work),
                "onnx_file": str(onnx_file),
                "threads": threads,
                "warmup": spec.warmup,
                "iterations": spec.iterations,
                "max_iter": args.olive_max_iter,
                "calibration_batch": DEFAULT_BATCH,
                "num_classes": len(ctx.dataset[2].classes),
                "input_name": onnx.load(str(onnx_file), load_external_data=False).graph.input[0].name,
            },
        )
        console.print(f"edgekd deploy {onnx_file.name} --target cpu (subprocess)")
        deployed = edgekd_deploy(ctx, onnx_file, root)
        int8_record = next(a for a in ctx.output("compile", "artifacts") if a["precision"] == "int8")
        olive_file = Path(olive["chosen"]["model_file"])
        console.print("measuring side by side")
        rows = measure(
            ctx,
            {
                "FP32 ONNX (edgekd export)": (onnx_file, None),
                "edgekd INT8": (ctx.run_dir / int8_record["path"], None),
                "edgekd deploy INT8": (Path(deployed["int8_file"]), None),
                "Olive INT8 (edgekd session)": (olive_file, None),
                "Olive INT8 (Olive-tuned session)": (olive_file, olive["chosen"]["inference_settings"]),
            },
            threads,
        )
        if args.keep is not None:
            shutil.copytree(root, args.keep, dirs_exist_ok=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    edgekd_wall = round(sum(edgekd_stage_s.values()), 3)
    ek, ol = rows["edgekd INT8"], rows["Olive INT8 (edgekd session)"]
    summary = {
        "latency_ratio_olive_over_edgekd": round(ol["latency"]["p50_ms"] / ek["latency"]["p50_ms"], 3),
        "latency_ratio_olive_tuned_over_edgekd": round(
            rows["Olive INT8 (Olive-tuned session)"]["latency"]["p50_ms"] / ek["latency"]["p50_ms"], 3
        ),
        "accuracy_edgekd_minus_olive": round(ek["accuracy"] - ol["accuracy"], 5),
        "wall_s": {
            "edgekd_quantize_compile": edgekd_wall,
            "edgekd_deploy_command": deployed["wall_s"],
            "olive_workflow": olive["wall_s"],
            "olive_worker_process": olive.get("process_wall_s"),
        },
        "wall_ratio_olive_over_edgekd": round(olive["wall_s"] / edgekd_wall, 2),
        "wall_ratio_olive_over_edgekd_deploy": round(olive["wall_s"] / deployed["wall_s"], 2),
        "latency_ratio_olive_over_edgekd_deploy": round(
            ol["latency"]["p50_ms"] / rows["edgekd deploy INT8"]["latency"]["p50_ms"], 3
        ),
    }
    summary["goal_no_slower"] = ek["latency"]["p50_ms"] <= ol["latency"]["p50_ms"]
    summary["goal_no_less_accurate"] = ek["accuracy"] >= ol["accuracy"]

    table = Table(
        title=f"{ctx.recipe.student.model} student, CPU INT8, batch {spec.batch_size}, {threads} threads, "
        f"{ek['eval_frames']} held-out frames"
    )
    for column in ("model", "session", "accuracy", "agrees w/ FP32", "p50 ms", "p90 ms", "size KiB"):
        table.add_column(column)
    for name, row in rows.items():
        session = row["session"]
        table.add_row(
            name,
            f"{session.get('threads')} thr " + ("Olive-tuned" if "session_options" in session else "edgekd"),
            f"{row['accuracy']:.4f}",
            f"{row['agreement_with_fp32']:.4f}",
            f"{row['latency']['p50_ms']:.4f}",
            f"{row['latency']['p90_ms']:.4f}",
            f"{row['size_bytes'] / 1024:.1f}",
        )
    console.print(table)
    console.print(
        f"wall time, training excluded: edgekd quantize+compile {edgekd_wall:.2f} s "
        f"({edgekd_stage_s['quantize']:.2f} + {edgekd_stage_s['compile']:.2f}); Olive workflow "
        f"{olive['wall_s']:.2f} s ({olive['quantized_candidates']} quantised models, "
        f"{olive['evaluated_candidates']} evaluated candidates)"
    )
    console.print(
        f"edgekd deploy (the whole command: check, quantise, compile, bundle, profile, report) "
        f"{deployed['wall_s']:.2f} s; Olive p50 / edgekd deploy p50 = "
        f"{summary['latency_ratio_olive_over_edgekd_deploy']}"
    )
    console.print(
        f"Olive p50 / edgekd p50 = {summary['latency_ratio_olive_over_edgekd']} (same session settings), "
        f"{summary['latency_ratio_olive_tuned_over_edgekd']} (Olive's tuned settings); "
        f"accuracy edgekd - Olive = {summary['accuracy_edgekd_minus_olive']:+.4f}; goal no slower: "
        f"{'met' if summary['goal_no_slower'] else 'MISSED'}, no less accurate: "
        f"{'met' if summary['goal_no_less_accurate'] else 'MISSED'}"
    )
    atomic.write_json(
        args.out,
        {
            "benchmark": "vs_olive",
            "environment": {
                **environment(),
                "threads": threads,
                "versions": {
                    "olive-ai": olive["olive"],
                    "onnxruntime": onnxruntime.__version__,
                    "onnx": metadata.version("onnx"),
                    "numpy": np.__version__,
                    "edgekd": metadata.version("edgekd"),
                },
                "olive_env": olive_env,
            },
            "settings": {
                "source_run": str(run_dir),
                "student": ctx.recipe.student.model,
                "data": ctx.recipe.data.name,
                "overrides": args.set,
                "quantize": ctx.recipe.quantize.model_dump(mode="json"),
                "latency_protocol": {
                    "warmup": spec.warmup,
                    "iterations": spec.iterations,
                    "batch": spec.batch_size,
                    "threads": threads,
                    "rounds": 2,
                    "kept": "the lower p50 of two interleaved rounds, per model",
                },
                "olive_search": {
                    "execution_order": "joint",
                    "sampler": "tpe (seed 1: Olive 0.13.0 drops sampler_config)",
                    "max_iter": args.olive_max_iter,
                },
                "frames": frames,
                "deploy": {
                    "command": deployed["command"],
                    "recipe": "the source run's recipe (mode: deploy, student.model: the FP32 ONNX)",
                    "wall": "the whole subprocess, interpreter start included",
                },
            },
            "summary": summary,
            "edgekd": {
                "stage_wall_s": edgekd_stage_s,
                "quantization": ctx.output("quantize", "quantization"),
            },
            "edgekd_deploy": deployed,
            "olive": olive,
            "rows": rows,
        },
    )
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
