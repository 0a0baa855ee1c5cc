"""The deployment decision (issue 13): one rule that the bundle, its manifest and the report share."""

import json
import shutil
from pathlib import Path

import pytest

from edgekd.api import deploy
from edgekd.bundle.checksums import MANIFEST_FILE, SUMS_FILE, render_sums
from edgekd.bundle.verify import verify_bundle
from edgekd.deployment import DEFAULT_MAX_DROP, decide
from edgekd.errors import BundleError, RecipeError
from edgekd.stages import DEPLOY_STAGE_NAMES, STAGE_NAMES
from tests.test_cli import assert_user_error, run_cli
from tests.test_deploy import FAST_API, export_mobilenet

# ---------------------------------------------------------------- the rule, on hand-made rows

ARTIFACTS = [
    {"path": "05-compile/student.fp32.onnx", "backend": "onnxruntime", "precision": "fp32"},
    {"path": "05-compile/student.int8.onnx", "backend": "onnxruntime", "precision": "int8"},
]


def _row(precision: str, accuracy: float, p50: float, artifact: bool = True) -> dict:
    row = {
        "name": f"student ({'onnxruntime' if artifact else 'PyTorch'} {precision.upper()})",
        "role": "student",
        "runtime": "onnxruntime" if artifact else "torch",
        "precision": precision,
        "accuracy": {"accuracy": accuracy},
        "latency": {"p50_ms": p50},
        "memory": {"peak_added_mb": 3.0},
    }
    if artifact:
        row["artifact"] = f"05-compile/student.{precision}.onnx"
    return row


def test_fastest_within_budget_wins():
    decision = decide([_row("fp32", 0.90, 2.0), _row("int8", 0.895, 1.0)], ARTIFACTS)
    assert decision["how"] == "rule" and decision["precision"] == "int8"
    assert decision["file"] == "student.int8.onnx" and decision["row"] == "student (onnxruntime INT8)"
    assert decision["budget"]["max_drop"] == DEFAULT_MAX_DROP == 0.01
    assert decision["budget"]["min_accuracy"] == pytest.approx(0.89)
    int8 = decision["candidates"][1]
    assert int8["speedup_vs_fp32"] == 2.0 and int8["drop_vs_fp32"] == pytest.approx(0.005)
    assert int8["budget_met"] is True and int8["chosen"] is True and int8["peak_memory_mb"] == 3.0
    assert "INT8 is 2x FP32" in decision["reason"] and decision["reason"].endswith("deploying INT8")


def test_slower_int8_loses_to_fp32():
    decision = decide([_row("fp32", 0.90, 1.0), _row("int8", 0.90, 1.25)], ARTIFACTS)
    assert decision["precision"] == "fp32" and decision["how"] == "rule"
    assert decision["reason"] == "INT8 is 0.8x FP32 on this target: deploying FP32"
    assert [c["chosen"] for c in decision["candidates"]] == [True, False]


def test_faster_artifact_over_the_budget_loses():
    rows = [_row("fp32", 0.90, 2.0), _row("int8", 0.85, 1.0)]
    decision = decide(rows, ARTIFACTS)
    assert decision["precision"] == "fp32"
    assert decision["candidates"][1]["budget_met"] is False
    assert "INT8 drops 0.0500 accuracy, over the budget of 0.01" in decision["reason"]
    # a wider budget (quantize.max_accuracy_drop) lets it in
    wide = decide(rows, ARTIFACTS, max_drop=0.06)
    assert wide["precision"] == "int8" and wide["budget"]["source"] == "quantize.max_accuracy_drop"


def test_pinned_precision_overrides_the_rule():
    rows = [_row("fp32", 0.90, 1.0), _row("int8", 0.80, 3.0)]
    decision = decide(rows, ARTIFACTS, pinned="int8")
    assert decision["how"] == "pinned" and decision["precision"] == "int8"
    assert decision["reason"].startswith("INT8 is pinned (bundle.artifact or edgekd bundle --artifact)")
    assert "the rule would deploy FP32" in decision["reason"]
    with pytest.raises(RecipeError, match="bundle.artifact 'fp16': target x86-ort built fp32, int8"):
        decide(rows, ARTIFACTS, pinned="fp16", target="x86-ort")


def test_without_a_measurement_the_recipe_precision_is_deployed():
    """TensorRT without a GPU: engines left to the device, nothing measured here."""
    unbuilt = [
        {
            "name": f"student (tensorrt {p.upper()})",
            "backend": "tensorrt",
            "precision": p,
            "engine": f"s.{p}.engine",
            "profiled": False,
            "why": "no CUDA device",
        }
        for p in ("fp32", "fp16", "int8")
    ]
    torch_row = _row("fp32", 0.9, 5.0, artifact=False)
    decision = decide([torch_row], [], unbuilt)
    assert decision["how"] == "fallback" and decision["precision"] == "int8"
    assert decision["artifact"] is None and decision["file"] == "s.int8.engine"
    assert "no artifact was measured" in decision["reason"] and "no CUDA device" in decision["reason"]
    assert decide([torch_row], [], unbuilt, pinned="fp16")["precision"] == "fp16"
    no_int8 = decide([torch_row], [], unbuilt[:2])
    assert no_int8["precision"] == "fp32"


def test_reference_is_the_pytorch_row_without_an_fp32_artifact():
    rows = [_row("fp32", 0.90, 5.0, artifact=False), _row("int8", 0.88, 1.0)]
    decision = decide(rows, ARTIFACTS[1:])
    assert decision["budget"]["reference"] == "student (PyTorch FP32)"
    # 0.02 below the PyTorch FP32 student: over budget, and nothing else measured: the most accurate
    assert decision["precision"] == "int8" and decision["how"] == "rule (budget missed)"
    assert "no artifact meets the accuracy budget" in decision["reason"]


def test_stage_order_profiles_before_bundling():
    for names in (STAGE_NAMES, DEPLOY_STAGE_NAMES):
        assert names[-5:] == ["compile", "profile", "bundle", "remote", "report"]


# ---------------------------------------------------------------- a real run, measured on this machine


@pytest.fixture(scope="module")
def mnv3_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MobileNetV3-Small at 32x32 on ONNX Runtime: FP32 and INT8 are close, so either may win."""
    root = tmp_path_factory.mktemp("decision")
    model = export_mobilenet(root / "mnv3.onnx")
    overrides = ["data.image_size=32", f"runs_dir={root / 'runs'}", *FAST_API, "profile.iterations=40"]
    deploy(model, target="cpu", data="digits", overrides=overrides, log=lambda _: None)
    return root / "runs" / "mnv3"


def test_measured_decision_is_the_bundle_and_the_report(mnv3_run: Path):
    """The faster artifact as measured in this very run is deployed everywhere. Here INT8 is usually
    the slower one (then FP32 ships); on a loaded machine the measurement may flip, and the rule with
    it, so the expectation follows the run's own p50s (the rule itself: the synthetic tests above)."""
    report = json.loads((mnv3_run / "report.json").read_text())
    rows = {row["precision"]: row for row in report["rows"] if "artifact" in row}
    faster = min(("fp32", "int8"), key=lambda p: rows[p]["latency"]["p50_ms"])
    within = (
        rows["fp32"]["accuracy"]["accuracy"] - rows["int8"]["accuracy"]["accuracy"] <= DEFAULT_MAX_DROP + 1e-9
    )
    expected = faster if within else "fp32"
    name, label = f"student.{expected}.onnx", expected.upper()
    assert [p.name for p in sorted(mnv3_run.glob("0*"))][-5:] == [
        "04-compile", "05-profile", "06-bundle", "07-remote", "08-report"
    ]  # fmt: skip
    bundle = mnv3_run / report["bundle"]
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    decision = report["deployment"]
    assert decision["precision"] == expected and decision["how"] == "rule"
    assert manifest["firmware"]["artifact"] == manifest["deployment"]["file"] == name
    assert manifest["firmware"]["precision"] == expected and manifest["deployment"]["embedded"] is True
    assert report["headline"]["deployed"] == f"student (onnxruntime {label})" == decision["row"]
    if within:
        assert "x FP32" in decision["reason"] and decision["reason"].endswith(f"deploying {label}")
    assert name in (bundle / "model_data.h").read_text()
    markdown = (mnv3_run / "report.md").read_text()
    assert "## Deployment" in markdown and f"**{decision['reason']}.**" in markdown
    assert f"| `{name}` | {label} |" in markdown and "| **yes** |" in markdown
    assert dict(verify_bundle(bundle))["model_data.c"].endswith(f"{name}, the deployed artifact")


def test_peak_memory_in_rows_report_and_manifest(mnv3_run: Path):
    report = json.loads((mnv3_run / "report.json").read_text())
    manifest = json.loads((mnv3_run / report["bundle"] / MANIFEST_FILE).read_text())
    for row in (row for row in report["rows"] if "artifact" in row):
        memory = row["memory"]
        assert memory["peak_added_mb"] > 0 and memory["peak_rss_mb"] >= memory["rss_before_mb"] > 0
        assert memory["peak_added_mb"] >= memory["rss_added_mb"] - 0.01 and "VmHWM" in memory["method"]
    for entry in manifest["artifacts"]:
        assert entry["memory"]["peak_added_mb"] > 0
    assert all(c["peak_memory_mb"] > 0 for c in manifest["deployment"]["candidates"])
    assert "peak MB" in (mnv3_run / "report.md").read_text()


def _rewrite_manifest(bundle: Path, manifest: dict) -> None:
    """Change the manifest and make its checksums agree again (what a careless tool would do)."""
    (bundle / MANIFEST_FILE).write_text(json.dumps(manifest))
    names = sorted(p.name for p in bundle.iterdir() if p.name != SUMS_FILE)
    (bundle / SUMS_FILE).write_text(render_sums(bundle, names))


def _deployed_and_other(run: Path) -> tuple[str, str]:
    """The precision the rule deployed in this run and the one it passed over (which one is faster
    depends on the machine's load, so the tests below take either)."""
    deployed = json.loads((run / "report.json").read_text())["deployment"]["precision"]
    return deployed, "int8" if deployed == "fp32" else "fp32"


def test_verify_catches_a_manifest_naming_another_artifact(mnv3_run: Path, tmp_path: Path):
    report = json.loads((mnv3_run / "report.json").read_text())
    deployed, other = _deployed_and_other(mnv3_run)
    bundle = Path(shutil.copytree(mnv3_run / report["bundle"], tmp_path / "x86-ort"))
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    manifest["deployment"]["file"] = f"student.{other}.onnx"  # the C array still holds the deployed model
    _rewrite_manifest(bundle, manifest)
    with pytest.raises(BundleError, match=f"its array is not student.{other}.onnx"):
        verify_bundle(bundle)
    assert_user_error(
        run_cli("verify-bundle", str(bundle)),
        "model_data.c",
        f"student.{other}.onnx",
        f"it embeds student.{deployed}.onnx",
    )
    manifest["firmware"] = None  # a deployment decision but no C array at all
    _rewrite_manifest(bundle, manifest)
    with pytest.raises(
        BundleError, match=f"deployment chose student.{other}.onnx but the bundle embeds no C array"
    ):
        verify_bundle(bundle)


def test_bundle_command_pins_and_says_so(mnv3_run: Path):
    deployed, other = _deployed_and_other(mnv3_run)
    result = run_cli("bundle", str(mnv3_run), "--artifact", other)
    assert result.returncode == 0, result.stderr
    bundle = mnv3_run / "bundle" / "x86-ort"
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    assert manifest["firmware"]["artifact"] == manifest["deployment"]["file"] == f"student.{other}.onnx"
    assert manifest["deployment"]["how"] == "pinned"
    assert f"{other.upper()} is pinned" in manifest["deployment"]["reason"]
    assert f"the rule would deploy {deployed.upper()}" in manifest["deployment"]["reason"]
    verify_bundle(bundle)
