"""Every public function and module documents every argument (help(gem_loss) is the first thing a
user reads): each parameter is named in an Args section, and beta's constraint (> 0) is stated."""

import inspect
import re

import pytest

import gem_kernels
from gem_kernels.reference import gem_loss_reference


def _public():
    items = {
        "gem_loss": gem_kernels.gem_loss,
        "fused_linear_gem_loss": gem_kernels.fused_linear_gem_loss,
        "gem_loss_reference": gem_loss_reference,
        "GEMLoss": gem_kernels.GEMLoss,
        "FusedLinearGEMLoss": gem_kernels.FusedLinearGEMLoss,
    }
    try:
        from gem_kernels.integrations import dtensor, transformers

        for name in ("apply_gem", "remove_gem", "is_gem_applied", "gem_compute_loss_func", "shift_causal_labels"):
            items[name] = getattr(transformers, name)
        items["dtensor_gem_loss"] = dtensor.dtensor_gem_loss
    except ImportError:  # transformers not installed: the core API is still checked
        pass
    return items


PUBLIC = _public()


def _documented_names(fn):
    if inspect.isclass(fn):  # module classes: the options of the function they wrap, and forward's args
        wrapped = gem_kernels.gem_loss if fn is gem_kernels.GEMLoss else gem_kernels.fused_linear_gem_loss
        names = set(inspect.signature(wrapped).parameters) | set(inspect.signature(fn.forward).parameters)
        return names - {"self", "process_group", "vocab_start"} | {"process_group"}
    return {n for n, p in inspect.signature(fn).parameters.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_every_argument_is_documented(name):
    fn = PUBLIC[name]
    doc = inspect.getdoc(fn) or ""
    assert re.search(r"^\s*Args", doc, re.M) or "Args:" in doc, f"{name}: no Args section"
    missing = [a for a in sorted(_documented_names(fn)) if not re.search(rf"\b{re.escape(a)}\b", doc)]
    assert not missing, f"{name}: arguments not documented: {missing}"


@pytest.mark.parametrize("name", ["gem_loss", "fused_linear_gem_loss", "GEMLoss"])
def test_beta_constraint_and_errors_are_documented(name):
    doc = inspect.getdoc(PUBLIC[name])
    assert re.search(r"beta.{0,80}> 0", doc, re.S), f"{name}: does not say beta must be > 0"
    assert "Raises" in doc, f"{name}: no Raises section"
