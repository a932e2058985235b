"""The fidelity study's row plan: every row a distinct configuration, every pairing defined."""
import pytest

from turbo_fx.bench import generation_eval as ge
from turbo_fx.config import TurboConfig


def test_rows_are_distinct_configurations_whatever_the_default_components():
    specs = ge.row_specs([0.3, 0.5], alpha=0.05, alpha_sweep=[0.0, 0.05, 1.0], sweep_ratio=0.5)
    names = [name for name, _, _ in specs]
    assert names == ["baseline",
                     "tomesd 0.3", "turbo-sa 0.3", "redundancy-sa 0.3", "turbo-all 0.3",
                     "tomesd 0.5", "turbo-sa 0.5", "redundancy-sa 0.5", "turbo-all 0.5",
                     "turbo-sa 0.5 alpha 0.0", "turbo-sa 0.5 alpha 1.0"]
    turbo = [(name, opts) for name, kind, opts in specs if kind == "turbo"]
    # Resolved through the validated config, no two turbo rows may be the same configuration.
    resolved = [TurboConfig(**opts) for _, opts in turbo]
    assert len({repr(c) for c in resolved}) == len(resolved)
    assert all("merge_components" in opts for _, opts in turbo)
    assert TurboConfig(**dict(turbo)["turbo-all 0.5"]).generation.merge_components == (
        "self-attention", "cross-attention", "feed-forward")


def test_each_semantic_self_attention_row_pairs_with_the_redundancy_row_of_its_ratio():
    specs = ge.row_specs([0.3, 0.5], alpha=0.05, alpha_sweep=[1.0], sweep_ratio=0.5)
    partners = {name: ge.redundancy_partner(opts) for name, kind, opts in specs if kind == "turbo"}
    assert partners == {"turbo-sa 0.3": "redundancy-sa 0.3", "redundancy-sa 0.3": None, "turbo-all 0.3": None,
                        "turbo-sa 0.5": "redundancy-sa 0.5", "redundancy-sa 0.5": None, "turbo-all 0.5": None,
                        "turbo-sa 0.5 alpha 1.0": "redundancy-sa 0.5"}


def test_an_alpha_sweep_at_a_ratio_not_studied_is_refused():
    with pytest.raises(ValueError, match="ratio 0.4"):
        ge.row_specs([0.3, 0.5], alpha=0.05, alpha_sweep=[1.0], sweep_ratio=0.4)
