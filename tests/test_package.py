"""The package root: lazy (PEP 562), yet ``import parameternet`` still registers the models in timm, whichever of
the two is imported first; ``parameternet.deploy`` / ``parameterize`` stay the functions."""

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


@pytest.mark.parametrize("order", ["parameternet first", "timm first"])
def test_the_models_are_registered_in_timm_whichever_is_imported_first(order):
    imports = (
        "import parameternet; import timm" if order == "parameternet first" else "import timm; import parameternet"
    )
    assert _run(f"{imports}; print('parameternet_600m' in timm.list_models('parameternet*'))") == "True"


def test_deploy_and_parameterize_stay_the_functions_after_their_modules_are_imported():
    code = (
        "import parameternet, parameternet.deploy, parameternet.parameterize; "
        "print(callable(parameternet.deploy), callable(parameternet.parameterize), callable(parameternet.profile), "
        "parameternet.deploy.__module__)"
    )
    assert _run(code) == "True True True parameternet.deploy"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        import parameternet

        parameternet.nope  # noqa: B018
