"""The one recipe loader behind both trainers' recipes: YAML and overrides into any dataclass, one sentence per
mistake."""

from dataclasses import dataclass, field

import pytest

from parameternet.errors import ParameterNetError
from parameternet.train.recipe import check_fields, load_recipe, recipe_keys


@dataclass
class Section:
    width: int = 4
    names: list[str] = field(default_factory=list)


@dataclass
class Recipe:
    lr: float = 0.1
    tag: str | None = None
    part: Section = field(default_factory=Section)

    def validate(self) -> "Recipe":
        check_fields(self, [(self.part.width > 0, "part.width", "positive")])
        return self


def test_yaml_then_overrides_into_the_dataclass(tmp_path):
    (tmp_path / "r.yaml").write_text("lr: 1\npart:\n  names: [a, b]\n")
    cfg = load_recipe(Recipe, tmp_path / "r.yaml", ["part.width=8", "tag=x"])
    assert cfg == Recipe(lr=1.0, tag="x", part=Section(8, ["a", "b"]))
    assert recipe_keys(Recipe) == ["lr", "tag", "part.width", "part.names"]
    assert load_recipe(Recipe, None) == Recipe()


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("part:\n  widht: 3\n", [], "unknown recipe key 'part.widht' in "),
        ("", ["part.widht=3"], "unknown recipe key 'part.widht' in the overrides; did you mean 'part.width'?"),
        ("", ["width=3"], "did you mean 'part.width'?"),
        ("", ["lr=fast"], "recipe key lr='fast' has the wrong type; it must be a number"),
        ("part: 3\n", [], "recipe section part in "),
        (
            "part: some_model\n",
            [],
            "must be a mapping of its keys, not 'some_model'; the file may be a recipe for "
            "another command (`parameternet train`",
        ),
        ("part: " + "x" * 100 + "\n", [], "not '" + "x" * 56 + "...; the file"),  # the value, cut short
        ("lr:\n  a: 1\n", [], "recipe key lr={'a': 1} has the wrong type; it must be a number; the file may be"),
        ("", ["part=3"], "override 'part' names a section"),
        ("", ["part.width=0"], "part.width=0 is invalid; it must be positive"),
        ("lr: [1\n", [], "is not valid YAML at line 2; fix the syntax"),
    ],
)
def test_each_mistake_is_one_sentence(tmp_path, text, overrides, message):
    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(ParameterNetError) as e:
        load_recipe(Recipe, tmp_path / "r.yaml", overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_missing_recipe_names_an_example(tmp_path):
    with pytest.raises(ParameterNetError, match="does not exist; pass a YAML file such as configs/x.yaml"):
        load_recipe(Recipe, tmp_path / "nope.yaml", example="configs/x.yaml")


@pytest.mark.parametrize(
    "override, message",
    [
        ("max_steps=-5", "max_steps=-5 is invalid; it must be a positive integer or null"),
        ("max_steps=0", "max_steps=0 is invalid"),
        ("threads=-2", "threads=-2 is invalid"),
        ("threads=0", "threads=0 is invalid"),
        ("device=gpu", "device='gpu' is invalid; it must be auto, cpu, cuda or cuda:N"),
        ("device=cuda:x", "device='cuda:x' is invalid"),
        ("parallel=zero3", "parallel='zero3' is invalid; it must be ddp (the whole model on every process) or fsdp"),
        ("log_every=0", "log_every=0 is invalid; it must be at least 1"),
        ("keep_last=0", "keep_last=0 is invalid; it must be at least 1"),
    ],
)
@pytest.mark.parametrize("kind", ["vision", "lm"])
def test_the_run_keys_both_recipes_share_are_checked_in_both(kind, override, message):
    """RunConfig's keys (seed, steps, device, parallelism, threads, logging, checkpoints) mean the same in the image
    and the language-model recipe, and a bad value is the same sentence in each."""
    from parameternet.train.config import load_config
    from parameternet.train.lm_config import load_lm_config

    load = {
        "vision": lambda o: load_config("configs/smoke.yaml", o),
        "lm": lambda o: load_lm_config("configs/lm-small.yaml", o),
    }
    with pytest.raises(ParameterNetError) as e:
        load[kind]([override])
    assert message in str(e.value) and "\n" not in str(e.value)
