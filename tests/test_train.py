"""Model: torchrun + FSDP2 training on CPU, the saved model, and worker failures."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import TINY_RECIPE, run_cli, tiny_stage_inputs

from labtune.recipe import ParallelConfig
from labtune.stages.train import TrainCrashed, TrainError, build_train, fitting_accumulation, train_key
from labtune.store.backends import LocalStore
from labtune.store.outputs import fetch
from labtune.training.batches import rank_batches


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
    return tiny_stage_inputs(tmp_path_factory.mktemp("train"))


def test_two_process_fsdp2_shards_parameters_and_saves_a_loadable_model(tiny_inputs):
    recipe, store, target_uri, data_uri = tiny_inputs
    lines = []
    result = build_train(recipe, store, target_uri, data_uri, log=lines.append)
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
    base = AutoModelForCausalLM.from_pretrained(fetch(store, target_uri))
    changed = [n for n, p in model.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert changed, "training left every weight unchanged"
    # generation keeps its KV cache (training turns it off; a saved `use_cache: false` made answers ~5x slower)
    assert model.config.use_cache and model.generation_config.use_cache
    ids = tokenizer("Lab meeting on 4/14/2023", return_tensors="pt")
    generated = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == ids["input_ids"].shape[1] + 5


def test_tokens_per_second_are_the_tokens_over_the_measured_step_time(tiny_inputs):
    recipe, store, target_uri, data_uri = tiny_inputs
    out = fetch(store, build_train(recipe, store, target_uri, data_uri).uri)  # the run above, from the store
    metrics = json.loads((out / "train_metrics.json").read_text())
    history = metrics["history"]
    previous = 0
    for record in history:
        steps, previous = record["step"] - previous, record["step"]
        assert record["tokens"] > 0 and record["step_time_s"] > 0
        assert record["tokens_per_s"] == pytest.approx(record["tokens"] / (record["step_time_s"] * steps), rel=5e-3)
        assert record["mfu"] is None  # a CPU has no peak in the table: MFU is not reported, not guessed
        peaks = record["peak_memory_gib"]
        assert len(peaks) == 2 and all(peak > 0.05 for peak in peaks)  # each rank's own peak resident set
    assert sum(r["tokens"] for r in history) == metrics["useful_tokens"]
    assert metrics["label_tokens"] < metrics["useful_tokens"]  # the prompts carry no loss
    assert sum(r["step_time_s"] * (r["step"] - p) for r, p in zip(history, [0] + [h["step"] for h in history])) \
        <= metrics["train_seconds"]
    assert metrics["mfu"] is None and "6 x matmul parameters" in metrics["flops_per_token"]


def test_the_flop_count_in_the_metrics_is_the_formula_step_by_step(tiny_inputs):
    """train_flops (and each step's cumulative `flops`) equal 6 x matmul parameters x tokens + the
    output layer on label tokens + attention, summed over the steps, from the counts the history
    records; a run with the embeddings and the lower layer frozen costs 2 there, not 6."""
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM

    from labtune.training.throughput import FlopsModel

    recipe, store, target_uri, data_uri = tiny_inputs
    frozen = recipe.model_copy(deep=True)
    frozen.train.freeze_layers = 1
    cached = frozen.model_copy(deep=True)  # one unsharded process: layer 0 computed once (frozen_prefix)
    cached.parallel.nproc_per_node = 1
    for variant in (recipe, frozen, cached):
        out = fetch(store, build_train(variant, store, target_uri, data_uri, log=lambda line: None).uri)
        metrics = json.loads((out / "train_metrics.json").read_text())
        model = AutoModelForCausalLM.from_pretrained(fetch(store, target_uri))
        if variant.train.freeze_layers:
            model.get_input_embeddings().weight.requires_grad_(False)
            model.model.layers[0].requires_grad_(False)
        counted = FlopsModel.of(model)
        total, labels = 0.0, 0
        prefix = metrics["frozen_prefix"]
        if variant is cached:
            lengths = load_from_disk(str(fetch(store, data_uri) / "train"))["length"]
            assert prefix["layers"] == 1 and prefix["tokens"] == sum(lengths)
            assert prefix["flops"] == pytest.approx(counted.prefix_flops(1, sum(lengths), sum(lengths) / len(lengths)))
            total = prefix["flops"]  # charged once, before the first step
            counted = counted.without_prefix(1)
        else:
            assert prefix is None  # two ranks: FSDP2 runs every layer
        for record in metrics["history"]:
            step_labels, labels = record["label_tokens"] - labels, record["label_tokens"]
            total += counted.flops(record["tokens"], step_labels, record["tokens"] / record["sequences"])
            assert record["flops"] == pytest.approx(total, rel=1e-9)
        assert metrics["train_flops"] == pytest.approx(total, rel=1e-9) and metrics["train_label_tokens"] == labels
        assert labels == metrics["label_tokens"] and total > 0
        everything = counted.trained + counted.frozen + counted.inert
        assert counted.inert == (everything // 2 if variant is frozen else 0)  # one of two layers (cached: none)
    # nothing above layer 0 is frozen; the output layer trains unless it is tied to the frozen embeddings
    assert counted.frozen == 0 and counted.head_trains != model.config.tie_word_embeddings


def test_worker_failure_raises_with_its_last_error_line(tiny_inputs):
    recipe, store, target_uri, data_uri = tiny_inputs
    bad = recipe.model_copy(deep=True)
    bad.train.fsdp_transformer_layer_cls_to_wrap = "NoSuchDecoderLayer"
    with pytest.raises(TrainError, match="fsdp_transformer_layer_cls_to_wrap: no module of class"):
        build_train(bad, store, target_uri, data_uri, log=lambda line: None)
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
    recipe, store, target_uri, tokens_uri = tiny_inputs
    histories = {}
    for nproc, batch in ((2, 4), (1, 8)):
        variant = recipe.model_copy(deep=True)
        variant.parallel.nproc_per_node, variant.train.per_device_train_batch_size = nproc, batch
        out = fetch(store, build_train(variant, store, target_uri, tokens_uri, log=lambda line: None).uri)
        histories[nproc] = [r["loss"] for r in json.loads((out / "train_metrics.json").read_text())["history"]]
    assert len(histories[1]) == len(histories[2]) >= 5
    assert histories[1] == pytest.approx(histories[2], rel=1e-3)
    assert histories[1][0] == pytest.approx(histories[2][0], rel=1e-5)


def _worker_processes() -> list:
    import psutil

    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            cmdline = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if "labtune.training.worker" in cmdline and "torch.distributed.run" not in cmdline:
            found.append(proc)
    return found


def test_a_killed_run_resumes_from_its_last_checkpoint_and_ends_with_the_uninterrupted_weights(tiny_inputs, tmp_path):
    import shutil
    import signal
    import threading
    import time

    import torch
    from safetensors.torch import load_file

    recipe, store, target_uri, tokens_uri = tiny_inputs
    variant = recipe.model_copy(deep=True)
    variant.train.num_train_epochs, variant.train.save_steps, variant.train.save_total_limit = 4, 4, 2

    # The uninterrupted run, in a copy of the store so that it has checkpoints of its own.
    clean = LocalStore(tmp_path / "clean")
    for stage in ("weights", "tokenize"):
        shutil.copytree(store.root / stage, clean.root / stage)
    in_clean = lambda uri: clean.uri_for(store.key_for(uri))  # noqa: E731
    reference = fetch(clean, build_train(variant, clean, in_clean(target_uri), in_clean(tokens_uri), log=lambda line: None).uri)
    total_steps = json.loads((reference / "train_metrics.json").read_text())["optimizer_steps"]

    failure: list[BaseException] = []

    def first_attempt() -> None:
        try:
            build_train(variant, store, target_uri, tokens_uri, log=lambda line: None)
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            failure.append(exc)

    committed = lambda: set((store.root / "checkpoints").glob("*/step-*/manifest.json"))  # noqa: E731
    earlier = committed()  # other tests' runs
    attempt = threading.Thread(target=first_attempt)
    attempt.start()
    deadline = time.time() + 300
    while not committed() - earlier:
        assert time.time() < deadline and attempt.is_alive(), "no checkpoint was committed"
        time.sleep(0.02)
    run_checkpoints = next(iter(committed() - earlier)).parent.parent
    workers = _worker_processes()
    launcher = {p.parent() for p in workers} - {None}  # torchrun's agent
    assert len(workers) == 2
    for proc in workers + list(launcher):  # a crashed machine: workers and torchrun die at once
        proc.send_signal(signal.SIGKILL)
    attempt.join(timeout=120)
    assert failure and isinstance(failure[0], TrainCrashed), failure  # retried by the Prefect task
    assert not (store.root / "train" / run_checkpoints.name / "manifest.json").exists()  # checkpoints share the run's key

    lines: list[str] = []
    out = fetch(store, build_train(variant, store, target_uri, tokens_uri, log=lines.append).uri)
    resumed = [line for line in lines if line.startswith("resumed from checkpoint step ")]
    assert resumed, "the second attempt did not resume"
    resumed_step = int(resumed[0].split()[4])
    assert 4 <= resumed_step < total_steps and resumed_step % 4 == 0
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["resumed_from_step"] == resumed_step
    assert metrics["optimizer_steps"] == total_steps
    assert [r["step"] for r in metrics["history"]] == list(range(1, total_steps + 1))
    expected, actual = load_file(reference / "model.safetensors"), load_file(out / "model.safetensors")
    assert expected.keys() == actual.keys()
    different = [name for name in expected if not torch.equal(expected[name], actual[name])]
    assert not different, f"weights differ from the uninterrupted run: {different[:5]}"
    # save_total_limit: at most 2 complete checkpoints remain in the store
    assert len(list(run_checkpoints.glob("step-*/manifest.json"))) == 2


def test_two_nodes_with_one_process_each_train_together_through_a_c10d_rendezvous(tiny_inputs, monkeypatch):
    """Two torchrun launchers on this machine play two nodes (1 process each) meeting at a c10d
    rendezvous on 127.0.0.1; either may get rank 0, its stage commits and the other waits for it."""
    import threading

    from conftest import free_port

    recipe, store, target_uri, tokens_uri = tiny_inputs
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    endpoint = f"127.0.0.1:{free_port()}"
    results, errors, logs = {}, [], {0: [], 1: []}

    def node(rank: int) -> None:
        try:
            variant = recipe.model_copy(deep=True)
            variant.parallel = ParallelConfig(nproc_per_node=1, nnodes=2, node_rank=rank, rdzv_endpoint=endpoint)
            results[rank] = build_train(variant, store, target_uri, tokens_uri, log=logs[rank].append)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append((rank, exc, logs[rank][-5:]))

    threads = [threading.Thread(target=node, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not errors, errors
    assert results[0].uri == results[1].uri
    assert any("--rdzv_backend=c10d" in line and f"--rdzv_endpoint={endpoint}" in line for line in logs[0])
    metrics = json.loads((fetch(store, results[0].uri) / "train_metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert len(metrics["sharding"]["local_numel_per_rank"]) == 2
    # the same global batches as one node with 2 processes: the same losses
    single = recipe.model_copy(deep=True)
    reference = json.loads((fetch(store, build_train(single, store, target_uri, tokens_uri, log=lambda line: None).uri)
                            / "train_metrics.json").read_text())
    assert [r["loss"] for r in metrics["history"]] == pytest.approx([r["loss"] for r in reference["history"]], rel=1e-4)


def test_lora_run_resumes_and_exports_a_merged_model_that_plain_transformers_loads(tiny_inputs):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe, store, target_uri, tokens_uri = tiny_inputs
    variant = recipe.model_copy(deep=True)
    variant.train.lora, variant.train.lora_r, variant.train.lora_alpha = True, 4, 8
    variant.train.lora_target_modules = ["q_proj", "v_proj", "down_proj"]
    variant.train.num_train_epochs, variant.train.save_steps = 2, 4
    lines: list[str] = []
    result = build_train(variant, store, target_uri, tokens_uri, log=lines.append)
    out = fetch(store, result.uri)
    assert any(line.startswith("lora: r=4 alpha=8") for line in lines)
    first_run = (out / "model.safetensors").read_bytes()
    # the model is lost but the checkpoints are in the store: a re-run resumes and gives the same model
    store.delete_prefix(store.key_for(result.uri))
    lines.clear()
    assert build_train(variant, store, target_uri, tokens_uri, log=lines.append).uri == result.uri
    total = int(next(line for line in lines if line.startswith("training: ")).split()[1])  # optimizer steps
    last = (total - 1) // 4 * 4  # the newest checkpoint before the end; the ones before it pruned (save_total_limit)
    assert any(line.startswith(f"resumed from checkpoint step {last} ") for line in lines), "\n".join(lines)
    assert (out / "model.safetensors").read_bytes() == first_run
    key = train_key(variant, store, target_uri, tokens_uri).key
    checkpoint = next((store.root / "checkpoints" / key).glob("step-*/manifest.json"))  # this run's
    base_dir = fetch(store, target_uri)
    # checkpoints keep the adapter and its optimizer state only: far smaller than the base weights
    assert sum(f["size"] for f in json.loads(checkpoint.read_text())["files"]) < (base_dir / "model.safetensors").stat().st_size

    merged = AutoModelForCausalLM.from_pretrained(out)  # no peft involved
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    changed = {n for n, p in merged.state_dict().items() if not torch.equal(p, base.state_dict()[n])}
    assert changed and all(n.endswith(("q_proj.weight", "v_proj.weight", "down_proj.weight")) for n in changed)
    expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out / "adapter").merge_and_unload()
    for name, tensor in expected.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[name], tensor, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_torch_compile_gives_the_losses_of_eager_mode(tiny_inputs):
    """train.torch_compile compiles each decoder layer (inductor; on CPU it builds C++ with the
    system compiler): same losses as eager mode."""
    recipe, store, target_uri, tokens_uri = tiny_inputs
    histories = {}
    for compiled in (False, True):
        variant = recipe.model_copy(deep=True)
        variant.parallel.nproc_per_node, variant.train.per_device_train_batch_size = 1, 8
        variant.train.torch_compile = compiled
        out = fetch(store, build_train(variant, store, target_uri, tokens_uri, log=lambda line: None).uri)
        histories[compiled] = [r["loss"] for r in json.loads((out / "train_metrics.json").read_text())["history"]]
    assert histories[True] == pytest.approx(histories[False], rel=1e-4)


def test_bf16_on_one_cpu_process_is_autocast_near_the_fp32_losses_or_fp32_where_the_cpu_lacks_bf16(tiny_inputs):
    """train.bf16 with one CPU process: bf16 autocast over fp32 weights and optimizer where the CPU
    computes bf16 natively (AVX512-BF16/AMX: 2x faster), else fp32 with a line that says so."""
    from labtune.precision import native_bf16

    recipe, store, target_uri, tokens_uri = tiny_inputs
    histories, logs = {}, {}
    for bf16 in (False, True):
        variant = recipe.model_copy(deep=True)
        variant.parallel.nproc_per_node, variant.train.per_device_train_batch_size = 1, 8
        variant.train.bf16, variant.train.seed = bf16, 11  # a seed of its own: no other test's cached run
        lines: list[str] = []
        out = fetch(store, build_train(variant, store, target_uri, tokens_uri, log=lines.append).uri)
        histories[bf16] = [r["loss"] for r in json.loads((out / "train_metrics.json").read_text())["history"]]
        logs[bf16] = "\n".join(lines)
    assert "one process in fp32: the model is not sharded" in logs[False]
    if native_bf16():
        assert "one process in bf16 autocast: the model is not sharded" in logs[True]
        assert histories[True] != histories[False]
        assert histories[True] == pytest.approx(histories[False], rel=5e-2)
    else:
        assert "this CPU has no native bf16" in logs[True]
        assert histories[True] == histories[False]


def test_early_stopping_ends_on_a_plateau_decays_and_exports_the_best_evaluated_weights(tmp_path):
    """The dev questions are scored every 5 steps; two evaluations without a gain start the decay
    (a quarter of the steps so far) and training ends there, well before its 10 epochs; the
    exported model is the best-scoring evaluation's (its dev loss, recomputed here in one process,
    is the one recorded for that step)."""
    from transformers import AutoModelForCausalLM

    from labtune.training.batches import collate, load_examples
    from labtune.training.loss import AnswerLoss

    store = tmp_path / "store"
    overrides = [f"store.uri={store}", "data.augment.enabled=true", "data.augment.dev_questions=16",
                 "train.eval_strategy=steps", "train.eval_steps=5", "train.early_stopping_patience=2",
                 "train.lr_scheduler_type=warmup_stable_decay", "train.load_best_model_at_end=true",
                 "train.num_train_epochs=10", "train.learning_rate=3e-3", "train.save_steps=100000"]
    proc = run_cli("train", str(TINY_RECIPE), *overrides, "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = Path(json.loads(proc.stdout)["uri"])
    metrics = json.loads((out / "train_metrics.json").read_text())
    stopping = metrics["early_stopping"]
    evaluations = {e["step"]: e for e in stopping["evaluations"]}
    assert stopping["stopped_at"] is not None and stopping["stopped_at"] in evaluations
    planned = 10 * metrics["optimizer_steps"]  # a lower bound on what 10 epochs would have taken
    assert metrics["optimizer_steps"] == stopping["stopped_at"] + math.ceil(stopping["stopped_at"] / 4) < planned / 2
    after = [r["learning_rate"] for r in metrics["history"] if r["step"] > stopping["stopped_at"]]
    assert after == sorted(after, reverse=True) and after[-1] < 0.05 * 3e-3  # decayed to (nearly) nothing
    assert metrics["dev_flops"] > 0 and metrics["train_flops"] > metrics["dev_flops"]

    best = evaluations[stopping["best_step"]]
    assert best["dev_loss"] == min(e["dev_loss"] for e in evaluations.values() if e["dev_accuracy"] == best["dev_accuracy"])
    tokens = next(p for p in (store / "tokenize").iterdir() if (p / "dev").is_dir())
    dev = load_examples(str(tokens / "dev"))[0]
    model = AutoModelForCausalLM.from_pretrained(out)
    exact, loss = AnswerLoss(model).exact(model, collate([dev[i] for i in range(len(dev))], 0))
    labels = sum(int((torch.as_tensor(dev[i]["labels"])[1:] != -100).sum()) for i in range(len(dev)))
    assert float(loss) / labels == pytest.approx(best["dev_loss"], abs=2e-4)
    if stopping["best_step"] != metrics["optimizer_steps"]:
        assert abs(float(loss) / labels - evaluations[metrics["optimizer_steps"]]["dev_loss"]) > 1e-3
