"""The package root: plain re-exports, each imported on first use, so ``import parameternet.layers`` stays light;
the models register in timm when ``parameternet.models`` is imported; no name is both a module and a function."""

import subprocess
import sys

import pytest


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def test_importing_the_layers_loads_neither_timm_nor_torchprofile():
    loaded = "sorted(m for m in sys.modules if m.startswith(('timm', 'torchprofile')))"
    code = f"import parameternet.layers, sys; print({loaded})"
    assert _run(code) == "[]"


@pytest.mark.parametrize(
    "imports",
    ["import parameternet.models; import timm", "import timm; import parameternet.models",
     "import timm, parameternet; parameternet.create_model"],
)  # fmt: skip
def test_importing_the_models_registers_them_in_timm_whichever_comes_first(imports):
    assert _run(f"{imports}; print('parameternet_600m' in timm.list_models('parameternet*'))") == "True"


def test_the_root_is_a_plain_module_whose_names_are_the_functions():
    code = (
        "import sys, types, importlib, parameternet; "
        "print(type(sys.modules['parameternet']) is types.ModuleType, "
        "[callable(getattr(parameternet, n)) for n in ('deploy', 'parameterize', 'profile', 'export_onnx')], "
        "parameternet.profile.__module__, parameternet.deploy.__module__, parameternet.parameterize.__module__)"
    )
    functions = "True [True, True, True, True] parameternet.profiling.measure parameternet.export.folding"
    assert _run(code) == functions + " parameternet.conversion"
    # no module shares a re-exported function's name, so importing submodules cannot shadow one
    names = "('deploy', 'profile', 'parameterize', 'export_onnx', 'load', 'save')"
    code = f"import importlib.util as u; print([u.find_spec('parameternet.' + n) for n in {names}])"
    assert _run(code) == str([None] * 6)
    import parameternet

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        parameternet.nope  # noqa: B018
    assert set(parameternet.__all__) <= set(dir(parameternet))


def _choices(*path: str) -> dict:
    """{flag: choices} of one CLI subcommand, e.g. _choices("lm", "finetune-cls")."""
    from parameternet.cli import build_parser

    parser = build_parser()
    for name in path:
        parser = next(a for a in parser._actions if hasattr(a, "choices") and isinstance(a.choices, dict)).choices[name]
    return {a.option_strings[0]: tuple(a.choices) for a in parser._actions if a.option_strings and a.choices}


def test_the_cli_offers_exactly_the_library_s_choices():
    """argparse's choices= are literals so that --help imports no torch; they stay the library's names."""
    from parameternet.conversion import INITS, METHODS
    from parameternet.experiments.lm import preset_names
    from parameternet.experiments.pitfall_presets import PRESETS as PITFALL_PRESETS
    from parameternet.export.onnx_export import EXPORTERS
    from parameternet.layers.router import ROUTERS
    from parameternet.train.lm_cls import CLS_TASKS

    assert _choices("convert") == {"--method": METHODS, "--init": INITS, "--router": ROUTERS}
    assert _choices("export")["--exporter"] == EXPORTERS
    assert _choices("lm", "finetune-cls")["--task"] == tuple(CLS_TASKS)
    assert set(_choices("lm", "experiment")["--preset"]) == set(preset_names())
    assert set(_choices("pitfall")["--preset"]) == set(PITFALL_PRESETS)
