"""train.report_to: TensorBoard event files and an MLflow run, written by the worker's rank 0 and
read back here with each tool's own reader; the evaluate stage adds its summary to the same run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_stage_inputs

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")


def test_training_and_evaluation_reach_tensorboard_and_mlflow(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from labtune.stages.evaluate import build_evaluate
    from labtune.stages.train import build_train

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "labtune-test")
    logging_dir = tmp_path / "tb"
    recipe, store, target_uri, tokens_uri = tiny_stage_inputs(tmp_path, [
        "train.num_train_epochs=1", "train.report_to=[tensorboard, mlflow]", f"train.logging_dir={logging_dir}",
        "evaluation.retrieval=false"])
    plain, *_ = tiny_stage_inputs(tmp_path / "plain", ["train.num_train_epochs=1", "evaluation.retrieval=false"])
    trained = build_train(recipe, store, target_uri, tokens_uri, log=lambda line: None,
                          run_tags={"prefect.flow_run_id": "flow-run-1"})
    from labtune.stages.train import train_key

    # trackers change no model
    assert train_key(recipe, store, target_uri, tokens_uri).key == train_key(plain, store, target_uri, tokens_uri).key
    metrics = json.loads((Path(trained.uri) / "train_metrics.json").read_text())
    steps = [record["step"] for record in metrics["history"]]
    tracked = metrics["tracked"]
    assert tracked["logging_dir"] == str(logging_dir) and tracked["mlflow_run_id"]

    events = EventAccumulator(str(logging_dir))
    events.Reload()
    for tag in ("loss", "learning_rate", "grad_norm", "tokens_per_s", "peak_memory_gib"):
        assert [e.step for e in events.Scalars(tag)] == steps, tag
    assert [round(e.value, 4) for e in events.Scalars("loss")] == [round(r["loss"], 4) for r in metrics["history"]]

    client = MlflowClient(tracking)
    run = client.get_run(tracked["mlflow_run_id"])
    assert run.data.tags["prefect.flow_run_id"] == "flow-run-1" and run.data.tags["recipe"] == recipe.name
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == steps

    summary = json.loads((Path(build_evaluate(recipe, store, target_uri, trained.uri, log=lambda line: None,
                                              tokens_uri=tokens_uri).uri) / "summary.json").read_text())
    expected = summary["accuracy"]["tuned"]["overall"]["accuracy"]
    assert client.get_run(run.info.run_id).data.metrics["eval/tuned/all"] == pytest.approx(expected)
    events.Reload()
    assert events.Scalars("eval/tuned/all")[-1].value == pytest.approx(expected)


def test_report_to_names_what_it_takes():
    from conftest import TINY_RECIPE

    from labtune.errors import RecipeError
    from labtune.recipe import load_recipe

    assert load_recipe(TINY_RECIPE).train.report_to == ["none"]
    assert load_recipe(TINY_RECIPE, ["train.report_to=mlflow"]).train.report_to == ["mlflow"]
    with pytest.raises(RecipeError, match="wandb is not built in"):
        load_recipe(TINY_RECIPE, ["train.report_to=wandb"])
    with pytest.raises(RecipeError, match="train.report_to"):
        load_recipe(TINY_RECIPE, ["train.report_to=[comet]"])
