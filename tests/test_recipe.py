"""Code: recipe loading, validation and overrides."""

from pathlib import Path

import pytest
from conftest import TINY_RECIPE

from labtune.errors import RecipeError
from labtune.recipe import load_recipe


def test_tiny_recipe_loads_and_resolves_paths_against_the_recipe_file():
    recipe = load_recipe(TINY_RECIPE)
    assert recipe.train.per_device_train_batch_size == 4
    assert recipe.data.sources[0].path == str(TINY_RECIPE.parent / "labnotes")
    assert Path(recipe.store.uri).is_absolute()


def test_dotted_overrides_set_nested_keys_with_yaml_typed_values():
    recipe = load_recipe(TINY_RECIPE, ["train.num_train_epochs=5", "train.bf16=true", "store.uri=s3://b/p",
                                       "store.endpoint_url=http://127.0.0.1:9000", "data.sources.0.weight=0.5"])
    assert recipe.train.num_train_epochs == 5
    assert recipe.train.bf16 is True
    assert recipe.store.uri == "s3://b/p"
    assert recipe.data.sources[0].weight == 0.5


def test_unknown_key_fails_naming_the_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY_RECIPE.read_text().replace("  learning_rate:", "  learnin_rate:"))
    with pytest.raises(RecipeError) as err:
        load_recipe(bad)
    assert str(err.value) == f"{bad}: train.learnin_rate: unknown key"


@pytest.mark.parametrize("override, key", [
    ("train.learning_rate=-1", "train.learning_rate"),
    ("train.lr_scheduler_type=exponential", "train.lr_scheduler_type"),
    ("parallel.nproc_per_node=0", "parallel.nproc_per_node"),
    ("train.fsdp=full_shard bogus", "train.fsdp"),
    ("train.per_device_train_batch_size=four", "train.per_device_train_batch_size"),
])
def test_bad_values_fail_naming_the_key(override, key):
    with pytest.raises(RecipeError) as err:
        load_recipe(TINY_RECIPE, [override])
    message = str(err.value)
    assert f": {key}:" in message and "\n" not in message


def test_scheduler_arguments_must_belong_to_the_scheduler():
    with pytest.raises(RecipeError) as err:
        load_recipe(TINY_RECIPE, ["train.lr_scheduler_type=warmup_stable_decay", "train.lr_scheduler_kwargs.decay_steps=5"])
    assert str(err.value) == (f"{TINY_RECIPE}: train: lr_scheduler_kwargs: ['decay_steps'] do not apply to "
                              "lr_scheduler_type 'warmup_stable_decay' (allowed: ['decay_type', 'min_lr_ratio', "
                              "'num_decay_steps', 'num_stable_steps', 'warmup_type'])")
    with pytest.raises(RecipeError, match="train: lr_scheduler_kwargs: \\['num_decay_steps'\\] do not apply to lr_scheduler_type 'cosine'"):
        load_recipe(TINY_RECIPE, ["train.lr_scheduler_kwargs.num_decay_steps=5"])


def test_warmup_stable_decay_decays_over_the_last_fifth_unless_told():
    import torch

    from labtune.training.worker import make_scheduler

    def rates(overrides):
        train = load_recipe(TINY_RECIPE, ["train.lr_scheduler_type=warmup_stable_decay", "train.warmup_ratio=0.1",
                                          "train.learning_rate=1.0", *overrides]).train
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=train.learning_rate)
        scheduler = make_scheduler(optimizer, train, 100)
        out = []
        for _ in range(100):
            out.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        return out

    default = rates([])
    assert default[5] < 1.0 and default[10:80] == [1.0] * 70  # warmup, then stable until step 80
    assert default[81] < 1.0 and default[99] < 0.01  # then down to zero
    told = rates(["train.lr_scheduler_kwargs.num_decay_steps=50"])
    assert told[49] == 1.0 and told[51] < 1.0


def test_unknown_override_key_is_rejected():
    with pytest.raises(RecipeError, match="train.epochs: unknown key"):
        load_recipe(TINY_RECIPE, ["train.epochs=3"])


def test_override_without_equals_sign_is_rejected():
    with pytest.raises(RecipeError, match="expected dotted key=value"):
        load_recipe(TINY_RECIPE, ["train.num_train_epochs"])


def test_missing_recipe_file_is_named(tmp_path):
    with pytest.raises(RecipeError, match="nope.yaml: recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_example_recipes_validate():
    for path in sorted((TINY_RECIPE.parent).glob("*.yaml")):
        assert load_recipe(path).name


def test_a_bare_no_is_transformers_no_not_yaml_false(tmp_path):
    """`save_strategy: no` and `eval_strategy: no` as transformers writes them: YAML 1.1 reads a
    bare `no` as false, which is still "no" here, in the file and in an override."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(TINY_RECIPE.read_text().replace("train:\n", "train:\n  save_strategy: no\n  eval_strategy: no\n"))
    loaded = load_recipe(recipe, ["train.save_strategy=no"])
    assert (loaded.train.save_strategy, loaded.train.eval_strategy) == ("no", "no")
    assert load_recipe(TINY_RECIPE, ["train.eval_strategy=no"]).train.eval_strategy == "no"
