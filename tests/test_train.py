"""Model: torchrun + FSDP2 training on CPU, the saved model, and worker failures."""

import json
import math

import pytest

from conftest import TINY_RECIPE
from labtune.recipe import load_recipe
from labtune.stage import fetch
from labtune.store import LocalStore
from labtune.train_worker import rank_batches
from tasks.data import build_data
from tasks.tokenize import build_tokenize
from tasks.train import TrainError, build_train, fitting_accumulation
from tasks.weights import build_weights


@pytest.mark.parametrize("n, world, bs", [(3, 2, 4), (70, 2, 4), (5, 1, 8), (9, 3, 2)])
def test_every_rank_gets_the_same_number_of_full_batches(n, world, bs):
    lengths = [10 + (i * 7) % 50 for i in range(n)]
    per_rank = [rank_batches(lengths, 0, 42, rank, world, bs) for rank in range(world)]
    assert len({len(b) for b in per_rank}) == 1
    assert all(len(batch) == bs for batches in per_rank for batch in batches)
    seen = {i for batches in per_rank for batch in batches for i in batch}
    assert seen == set(range(n))  # every example is used each epoch


def test_length_grouping_reduces_padding():
    lengths = [10, 200] * 32
    batches = rank_batches(lengths, 0, 0, 0, 1, 4)
    padded = sum(4 * max(lengths[i] for i in b) for b in batches)
    assert padded == sum(lengths)  # each batch holds examples of one length


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    recipe = load_recipe(TINY_RECIPE, [f"store.uri={root / 'store'}"])
    store = LocalStore(root / "store")
    model_uri = build_weights(recipe, store).uri
    return recipe, store, model_uri, build_tokenize(recipe, store, model_uri, build_data(recipe, store).uri).uri


def test_two_process_fsdp2_shards_parameters_and_saves_a_loadable_model(tiny_inputs):
    recipe, store, model_uri, data_uri = tiny_inputs
    lines = []
    result = build_train(recipe, store, model_uri, data_uri, log=lines.append)
    out = fetch(store, result.uri)
    metrics = json.loads((out / "train_metrics.json").read_text())
    sharding = metrics["sharding"]
    assert sharding["world_size"] == 2 and sharding["dtensor_params"]
    local = sharding["local_numel_per_rank"]
    assert len(local) == 2 and all(0 < n < sharding["full_numel"] for n in local)
    assert sum(local) == sharding["full_numel"]
    examples = json.loads((fetch(store, data_uri) / "report.json").read_text())["train"]["examples"]
    assert metrics["examples"] == examples
    # micro-batches of 2 ranks x 4 examples, 2 per optimizer step
    assert metrics["optimizer_steps"] == math.ceil(math.ceil(examples / 8) / 2)
    assert any(line.startswith("progress ") for line in lines)  # the worker's lines reach the log live

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(fetch(store, model_uri))
    changed = [n for n, p in model.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert changed, "training left every weight unchanged"
    ids = tokenizer("Lab meeting on 4/14/2023", return_tensors="pt")
    generated = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == ids["input_ids"].shape[1] + 5


def test_worker_failure_raises_with_its_last_error_line(tiny_inputs):
    recipe, store, model_uri, data_uri = tiny_inputs
    bad = recipe.model_copy(deep=True)
    bad.train.fsdp_transformer_layer_cls_to_wrap = "NoSuchDecoderLayer"
    with pytest.raises(TrainError, match="fsdp_transformer_layer_cls_to_wrap: no module of class"):
        build_train(bad, store, model_uri, data_uri, log=lambda line: None)
    assert not list((store.root / "train").glob("*/manifest.json")) or all(
        "NoSuchDecoderLayer" not in p.read_text() for p in (store.root / "train").glob("*/manifest.json"))


def test_too_few_examples_for_one_optimizer_step_fail_with_the_numbers_before_torchrun(tiny_inputs):
    recipe, _, _, _ = tiny_inputs
    with pytest.raises(TrainError, match=r"12 training examples are fewer than one optimizer step takes: "
                                         r"parallel.nproc_per_node 2 x train.per_device_train_batch_size 4 x "
                                         r"train.gradient_accumulation_steps 2 = 16"):
        fitting_accumulation(recipe, 12, print)
    assert fitting_accumulation(recipe, 16, print) == 2


def test_accumulation_is_lowered_and_logged_when_the_recipe_allows_it(tiny_inputs):
    recipe, _, _, _ = tiny_inputs
    allowed = recipe.model_copy(deep=True)
    allowed.train.allow_lower_accumulation = True
    lines = []
    assert fitting_accumulation(allowed, 12, lines.append) == 1
    assert "gradient_accumulation_steps lowered to 1" in lines[0]
    with pytest.raises(TrainError, match="lower per_device_train_batch_size or nproc_per_node"):
        fitting_accumulation(allowed, 7, lines.append)


def test_two_ranks_give_the_losses_of_one_process_with_the_whole_batch(tiny_inputs):
    """Each step's loss is the mean over all label tokens of the global batch, so splitting a batch
    of 8 over 2 ranks x 4 gives the same losses (and updates) as 1 process x 8."""
    recipe, store, model_uri, tokens_uri = tiny_inputs
    histories = {}
    for nproc, batch in ((2, 4), (1, 8)):
        variant = recipe.model_copy(deep=True)
        variant.parallel.nproc_per_node, variant.train.per_device_train_batch_size = nproc, batch
        out = fetch(store, build_train(variant, store, model_uri, tokens_uri, log=lambda line: None).uri)
        histories[nproc] = [r["loss"] for r in json.loads((out / "train_metrics.json").read_text())["history"]]
    assert len(histories[1]) == len(histories[2]) >= 5
    assert histories[1] == pytest.approx(histories[2], rel=1e-3)
    assert histories[1][0] == pytest.approx(histories[2][0], rel=1e-5)
