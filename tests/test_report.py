"""The run record and its report: the ``--json`` document of a real run checked against the
schema README documents, report.json identical to it, and the section protocol open to a
new stage without edits elsewhere."""
from __future__ import annotations

import contextlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest

from pipeline.report import SCHEMA_PATH, RunRecord, write_report
from tests.json_schema import validate

ROOT = Path(__file__).resolve().parents[1]

TINY_RUN = """
name = "tiny"
stages = ["train", "export", "verify", "profile", "report"]
[train]
model = "mobilenet_v2"
model_kwargs = { width_mult = 0.35 }
data = "digits"
input_size = 16
epochs = 1
threads = 1
[export]
formats = ["onnx"]
[verify]
samples = 32
[profile]
runs = 2
warmup = 1
"""


def _schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A real ``mdeploy run --json`` on the cheapest stages that fill every run-level key."""
    from pipeline.cli import main
    tmp = tmp_path_factory.mktemp("report")
    (tmp / "tiny.toml").write_text(TINY_RUN)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["run", "--config", str(tmp / "tiny.toml"), "--out", str(tmp / "runs"), "--json", "-q"])
    assert code == 0
    return json.loads(out.getvalue())


def test_run_json_matches_the_schema(tiny_run):
    assert validate(tiny_run, _schema()) == []
    assert set(tiny_run) == {"name", "run_dir", "config", "stages", "notes", "train", "export", "verify", "profile"}
    assert list(tiny_run["stages"]) == ["train", "export", "verify", "profile"]
    on_disk = json.loads((Path(tiny_run["run_dir"]) / "report.json").read_text())
    assert on_disk == tiny_run


def test_report_has_one_section_per_stage_in_run_order(tiny_run):
    run_dir = Path(tiny_run["run_dir"])
    md = (run_dir / "report.md").read_text()
    headings = re.findall(r"^## (.+)$", md, re.M)
    assert headings == ["Training", "Artifacts", "Parity against PyTorch", "Latency"] + (
        ["Notes"] if tiny_run["notes"] else []), headings
    # the accuracy/size/latency figure closes the latency section, after the table it plots
    assert md.index("## Latency") < md.index("![accuracy size latency]")
    for name in ("training", "parity", "per_layer_error", "accuracy_size_latency"):
        assert f"(plots/{name}.png)" in md and (run_dir / "plots" / f"{name}.png").is_file(), name
    assert md.count("data:image/png") == 0 and (run_dir / "report.html").read_text().count("data:image/png") == 4


def test_schema_catches_a_wrong_document(tiny_run):
    broken = json.loads(json.dumps(tiny_run))
    broken["verify"]["pairs"][0]["passed"] = "yes"
    del broken["train"]["test_acc"]
    broken["stages"]["train"] = "fast"
    errors = validate(broken, _schema())
    assert any(e.startswith("$.verify.pairs[0].passed: expected boolean") for e in errors), errors
    assert "$.train: missing key 'test_acc'" in errors and any(e.startswith("$.stages.train") for e in errors)


def test_validator_refuses_keywords_it_does_not_implement():
    with pytest.raises(ValueError, match="pattern"):
        validate("x", {"type": "string", "pattern": "^x$"})
    assert validate(True, {"type": "integer"}) and not validate(3.0, {"type": "integer"})


def test_readme_documents_every_key_of_the_schema():
    """README's table of the --json document and the schema file name the same keys."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("#### The `--json` document", 1)[1].split("\n#", 1)[0]
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", section, re.M))
    assert documented == set(_schema()["properties"]), documented ^ set(_schema()["properties"])


@dataclass
class _Lint:
    """A stage the report has never heard of: one class is all it takes."""

    key: ClassVar[str] = "lint"
    warnings: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"warnings": self.warnings}

    def plots(self, run: RunRecord) -> dict[str, bytes]:
        from pipeline.report.plots import plot_training
        return {"lint": plot_training([{"epoch": 1, "train_loss": 1.0, "val_loss": 1.0, "train_acc": 0.5,
                                         "val_acc": 0.5}])}

    def markdown(self, run: RunRecord, figure) -> list[str]:
        return ["## Lint", ""] + [f"- {w}" for w in self.warnings] + [""] + figure("lint")


def test_a_new_stage_is_one_section_class(tmp_path):
    run = RunRecord(name="t", run_dir=str(tmp_path), config={"name": "t", "stages": ["lint"]})
    run.add(_Lint(["`x` unused"]))
    run.stages["lint"] = 1.0
    with pytest.raises(ValueError, match="lint"):
        run.add(_Lint([]))
    with pytest.raises(TypeError):
        run.add(object())
    paths = write_report(tmp_path, run)
    doc = json.loads(paths["json"].read_text())
    assert doc["lint"] == {"warnings": ["`x` unused"]} and validate(doc, _schema()) == []
    md = paths["md"].read_text()
    assert "## Lint" in md and "![lint](plots/lint.png)" in md and (tmp_path / "plots" / "lint.png").is_file()
    assert "<code>x</code> unused" in paths["html"].read_text()
